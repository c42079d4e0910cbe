//! The parser must never panic: feed it a few thousand pseudo-random mutations of the
//! golden inputs (the same job as `fuzz/fuzz_targets/parse.rs`, small enough for CI).

use std::fs;
use std::path::Path;

use strata_dockerfile::dump::dump;
use strata_dockerfile::{Dockerfile, IgnoreMatcher};

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const TOKENS: &[&str] = &[
    "\\",
    "`",
    "\n",
    "\r\n",
    " ",
    "\t",
    "\"",
    "'",
    "$",
    "${",
    "}",
    "${A:-",
    "${A:?",
    "${A#",
    "[",
    "]",
    "[\"",
    "\",",
    "<<",
    "<<EOF",
    "<<-EOF",
    "<<'EOF'",
    "EOF\n",
    "\tEOF\n",
    "3<<",
    "#",
    "# escape=`\n",
    "# syntax=x\n",
    "# check=skip=all\n",
    "--",
    "--mount=",
    "type=cache,",
    "target=/x",
    "--from=",
    "--link",
    "=",
    ",",
    "\"\"",
    "FROM ",
    "RUN ",
    "COPY ",
    "ADD ",
    "ONBUILD ",
    "HEALTHCHECK ",
    "CMD ",
    "ARG ",
    "ENV ",
    "AS ",
    "é",
    "\u{feff}",
    "\u{a0}",
    "🦀",
];

fn mutate(rng: &mut Rng, input: &[char], pool: &[Vec<char>]) -> Vec<char> {
    let mut s = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(s.len() + 1);
        match rng.below(6) {
            0 if !s.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(s.len());
                s.drain(at.min(end)..end);
            }
            1 | 2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                s.splice(at..at, t.chars());
            }
            3 => {
                let c = char::from_u32(rng.below(0x80) as u32).unwrap_or('x');
                s.insert(at, c);
            }
            4 => {
                // Splice in a chunk of another golden input.
                let other = &pool[rng.below(pool.len())];
                let from = rng.below(other.len());
                let to = (from + rng.below(40)).min(other.len());
                s.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                if at < s.len() {
                    let end = (at + rng.below(20)).min(s.len());
                    let chunk: Vec<char> = s[at..end].to_vec();
                    s.splice(at..at, chunk);
                }
            }
        }
    }
    s
}

fn inputs() -> Vec<Vec<char>> {
    let mut out = Vec::new();
    for kind in ["valid", "invalid"] {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(kind);
        for e in fs::read_dir(root).unwrap() {
            let p = e.unwrap().path().join("Dockerfile");
            if let Ok(b) = fs::read(&p) {
                out.push(String::from_utf8_lossy(&b).chars().collect());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn mutated_inputs_never_panic() {
    let pool = inputs();
    assert!(!pool.is_empty());
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut parsed = 0;
    for i in 0..4000 {
        let base = &pool[i % pool.len()];
        let text: String = mutate(&mut rng, base, &pool).into_iter().collect();
        let result = std::panic::catch_unwind(|| {
            let ok = match Dockerfile::parse("Dockerfile", &text) {
                Ok(df) => {
                    // Expansion and scoping must not panic either.
                    let _ = dump(&df, &strata_dockerfile::EmptyEnv);
                    true
                }
                Err(e) => {
                    let _ = e.to_string();
                    false
                }
            };
            let _ = IgnoreMatcher::parse("fuzz", &text).map(|m| m.is_excluded("a/b/c", true));
            ok
        });
        match result {
            Ok(true) => parsed += 1,
            Ok(false) => {}
            Err(_) => panic!("parser panicked on input {i}: {text:?}"),
        }
    }
    // The mutations must still reach the deep code paths, not just fail early.
    assert!(parsed > 500, "only {parsed} mutated inputs parsed");
}
