//! Benchmark driver for bench/rootfs/run.sh: generate a tree, write a layer, apply a layer.
//!
//! ```text
//! layerbench gen DIR FILES          deterministic tree of FILES files (~6 KiB average)
//! layerbench write DIR none|gzip|zstd OUT [GZIP_LEVEL]
//! layerbench apply BLOB none|gzip|zstd TARGET
//! ```

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use strata_rootfs::{Compression, LayerOptions, LayerSource, apply_layer, write_layer};

fn compression(s: &str) -> Result<Compression, String> {
    match s {
        "none" => Ok(Compression::None),
        "gzip" => Ok(Compression::Gzip),
        "zstd" => Ok(Compression::Zstd),
        other => Err(format!("unknown compression `{other}`")),
    }
}

/// xorshift: deterministic, dependency-free pseudo-random numbers for the fixture.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Files like a distribution tree: mostly small text-ish files, some medium, a few large,
/// about a third of the bytes incompressible (binaries, archives).
fn generate(dir: &Path, files: u64) -> Result<(), String> {
    let words: Vec<&[u8]> = [
        &b"the "[..],
        b"config ",
        b"value=",
        b"true\n",
        b"#include <stdio.h>\n",
        b"function ",
        b"return ",
        b"0x7f ",
        b"usr/lib/",
        b"Copyright ",
        b"license ",
        b"{\"key\": ",
        b"}\n",
        b"    ",
        b"error",
        b"warning: ",
    ]
    .to_vec();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut total = 0u64;
    for i in 0..files {
        let sub = dir.join(format!("d{:03}/s{:02}", i % 500, (i / 500) % 20));
        std::fs::create_dir_all(&sub).map_err(|e| e.to_string())?;
        let size = if i % 1000 == 0 {
            1_000_000 + rng.next() % 200_000
        } else if i % 50 == 0 {
            32_768 + rng.next() % 65_536
        } else {
            rng.next() % 8192
        };
        let random = rng.next().is_multiple_of(3);
        let mut data = Vec::with_capacity(size as usize);
        while (data.len() as u64) < size {
            if random {
                data.extend_from_slice(&rng.next().to_le_bytes());
            } else {
                data.extend_from_slice(words[(rng.next() % words.len() as u64) as usize]);
            }
        }
        data.truncate(size as usize);
        total += size;
        std::fs::write(sub.join(format!("f{i}")), &data).map_err(|e| e.to_string())?;
    }
    eprintln!("generated {files} files, {} MB", total / 1_000_000);
    Ok(())
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, dir, n] if cmd == "gen" => generate(Path::new(dir), n.parse().map_err(|_| "FILES must be a number")?),
        [cmd, dir, c, out, rest @ ..] if cmd == "write" => {
            let mut opts = LayerOptions { compression: compression(c)?, ..LayerOptions::default() };
            if let Some(level) = rest.first() {
                opts.gzip_level = level.parse().map_err(|_| "GZIP_LEVEL must be a number")?;
            }
            let file = std::fs::File::create(out).map_err(|e| format!("{out}: {e}"))?;
            let info = write_layer(LayerSource::Dir(Path::new(dir)), &opts, file).map_err(|e| e.to_string())?;
            writeln!(std::io::stdout(), "{} {} {} {}", info.diff_id, info.digest, info.size, info.uncompressed_size)
                .map_err(|e| e.to_string())
        }
        [cmd, blob, c, target] if cmd == "apply" => {
            let file = std::fs::File::open(blob).map_err(|e| format!("{blob}: {e}"))?;
            std::fs::create_dir_all(target).map_err(|e| format!("{target}: {e}"))?;
            let stats = apply_layer(file, compression(c)?, Path::new(target)).map_err(|e| e.to_string())?;
            writeln!(std::io::stdout(), "{} {} entries", stats.diff_id, stats.entries).map_err(|e| e.to_string())
        }
        _ => Err("usage: layerbench gen DIR FILES | write DIR COMPRESSION OUT [LEVEL] | apply BLOB COMPRESSION TARGET".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("layerbench: {e}");
            ExitCode::FAILURE
        }
    }
}
