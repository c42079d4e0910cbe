//! `.dockerignore`: reading the file and matching context paths the way Docker does
//! (moby/patternmatcher and its `ignorefile` reader, plus BuildKit's directory skipping).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Lexically cleans a slash path like Go's `filepath.Clean`: no repeated `/`, no `.`
/// elements, `..` folded where possible; `""` becomes `"."`.
pub fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut out: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => match out.last() {
                Some(&last) if last != ".." => {
                    out.pop();
                }
                _ if rooted => {}
                _ => out.push(".."),
            },
            _ => out.push(part),
        }
    }
    let joined = out.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(char),
    /// `*`: any run of non-`/` characters.
    Star,
    /// `?`: one non-`/` character.
    One,
    /// `**` followed by more pattern: `(.*/)?`.
    AnyDirs,
    /// `**` at the end: anything.
    AnyTail,
    /// `[...]`, as a regular-expression class (so `^` negates).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Exact,
    Prefix(String),
    Suffix(String),
    Tokens(Vec<Tok>),
}

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq)]
struct Pattern {
    cleaned: String,
    exception: bool,
    kind: Kind,
}

fn compile(p: &str) -> std::result::Result<Kind, String> {
    #[derive(PartialEq, Clone, Copy)]
    enum Detected {
        Exact,
        Prefix,
        Suffix,
        Regexp,
    }
    let chars: Vec<char> = p.chars().collect();
    let mut toks = Vec::new();
    // patternmatcher picks cheaper match types for plain, `prefix/**` and `**suffix`
    // patterns, and they are not quite the regular expression: `**foo` is a plain suffix
    // test there, so it matches `barfoo`. We keep the same types to give the same answers.
    let mut detected = Detected::Exact;
    let mut i = 0;
    let mut first = true;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        match c {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    toks.push(Tok::AnyTail);
                    detected = if detected == Detected::Exact {
                        Detected::Prefix
                    } else {
                        Detected::Regexp
                    };
                } else {
                    toks.push(Tok::AnyDirs);
                    detected = Detected::Regexp;
                }
                if first {
                    detected = Detected::Suffix;
                }
            }
            '*' => {
                toks.push(Tok::Star);
                detected = Detected::Regexp;
            }
            '?' => {
                toks.push(Tok::One);
                detected = Detected::Regexp;
            }
            '\\' => match chars.get(i) {
                Some(&n) => {
                    i += 1;
                    toks.push(Tok::Lit(n));
                    detected = Detected::Regexp;
                }
                None => toks.push(Tok::Lit('\\')),
            },
            '[' => {
                let mut negated = false;
                if chars.get(i) == Some(&'^') {
                    negated = true;
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut closed = false;
                let mut first_in_class = true;
                while i < chars.len() {
                    let mut lo = chars[i];
                    i += 1;
                    if lo == ']' && !first_in_class {
                        closed = true;
                        break;
                    }
                    first_in_class = false;
                    if lo == '\\' {
                        lo = *chars.get(i).ok_or("syntax error in pattern")?;
                        i += 1;
                    }
                    let mut hi = lo;
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
                        hi = chars[i + 1];
                        i += 2;
                        if hi == '\\' {
                            hi = *chars.get(i).ok_or("syntax error in pattern")?;
                            i += 1;
                        }
                        if hi < lo {
                            return Err("syntax error in pattern".into());
                        }
                    }
                    ranges.push((lo, hi));
                }
                if !closed {
                    return Err("syntax error in pattern".into());
                }
                toks.push(Tok::Class { negated, ranges });
                detected = Detected::Regexp;
            }
            c => toks.push(Tok::Lit(c)),
        }
        first = false;
    }
    Ok(match detected {
        Detected::Exact => Kind::Exact,
        Detected::Prefix => Kind::Prefix(p[..p.len() - 2].to_string()),
        Detected::Suffix => Kind::Suffix(p[2..].to_string()),
        Detected::Regexp => Kind::Tokens(toks),
    })
}

fn class_matches(negated: bool, ranges: &[(char, char)], c: char) -> bool {
    ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != negated
}

fn tokens_match(toks: &[Tok], s: &[char]) -> bool {
    let width = s.len() + 1;
    let mut memo: Vec<Option<bool>> = vec![None; (toks.len() + 1) * width];
    fn go(toks: &[Tok], s: &[char], ti: usize, si: usize, memo: &mut Vec<Option<bool>>) -> bool {
        let width = s.len() + 1;
        if let Some(v) = memo[ti * width + si] {
            return v;
        }
        let r = match toks.get(ti) {
            None => si == s.len(),
            Some(Tok::Lit(c)) => s.get(si) == Some(c) && go(toks, s, ti + 1, si + 1, memo),
            Some(Tok::One) => s.get(si).is_some_and(|c| *c != '/') && go(toks, s, ti + 1, si + 1, memo),
            Some(Tok::Class { negated, ranges }) => {
                s.get(si).is_some_and(|c| class_matches(*negated, ranges, *c))
                    && go(toks, s, ti + 1, si + 1, memo)
            }
            Some(Tok::Star) => {
                let mut k = si;
                loop {
                    if go(toks, s, ti + 1, k, memo) {
                        break true;
                    }
                    if k == s.len() || s[k] == '/' {
                        break false;
                    }
                    k += 1;
                }
            }
            Some(Tok::AnyDirs) => {
                go(toks, s, ti + 1, si, memo)
                    || (si..s.len()).any(|k| s[k] == '/' && go(toks, s, ti + 1, k + 1, memo))
            }
            Some(Tok::AnyTail) => (si..=s.len()).any(|k| go(toks, s, ti + 1, k, memo)),
        };
        memo[ti * width + si] = Some(r);
        r
    }
    let _ = width;
    go(toks, s, 0, 0, &mut memo)
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.cleaned,
            Kind::Prefix(p) => path.starts_with(p.as_str()),
            Kind::Suffix(suf) => {
                path.ends_with(suf.as_str())
                    || suf.strip_prefix('/').is_some_and(|s| path == s)
            }
            Kind::Tokens(t) => {
                let chars: Vec<char> = path.chars().collect();
                tokens_match(t, &chars)
            }
        }
    }

    /// Whether this pattern could match something strictly inside `dir`.
    fn may_match_inside(&self, dir: &str) -> bool {
        let pat: Vec<&str> = self.cleaned.split('/').collect();
        let parts: Vec<&str> = dir.split('/').collect();
        for (i, d) in parts.iter().enumerate() {
            let Some(p) = pat.get(i) else {
                return false;
            };
            if p.contains("**") {
                return true;
            }
            let Ok(kind) = compile(p) else {
                return false;
            };
            let one = Pattern {
                cleaned: p.to_string(),
                exception: false,
                kind,
            };
            if !one.matches(d) {
                return false;
            }
        }
        pat.len() > parts.len()
    }
}

/// The patterns of one `.dockerignore`, ready to test context paths.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IgnoreMatcher {
    patterns: Vec<Pattern>,
}

impl IgnoreMatcher {
    /// Parses the text of a `.dockerignore`; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for line in text.lines() {
            // Only a `#` in the first column starts a comment.
            if line.starts_with('#') {
                continue;
            }
            let mut p = line.trim();
            if p.is_empty() {
                continue;
            }
            let exception = p.starts_with('!');
            if exception {
                p = p[1..].trim();
            }
            let mut cleaned = if p.is_empty() {
                String::new()
            } else {
                clean_path(p)
            };
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            if cleaned.is_empty() {
                return Err(Error::IgnorePattern {
                    path: origin.to_string(),
                    pattern: line.to_string(),
                    message: "illegal exclusion pattern: \"!\"".into(),
                });
            }
            let kind = compile(&cleaned).map_err(|message| Error::IgnorePattern {
                path: origin.to_string(),
                pattern: line.to_string(),
                message,
            })?;
            patterns.push(Pattern {
                cleaned,
                exception,
                kind,
            });
        }
        Ok(IgnoreMatcher { patterns })
    }

    /// Reads and parses the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        IgnoreMatcher::parse(&path.display().to_string(), &String::from_utf8_lossy(&text))
    }

    /// The matcher for a build: `<Dockerfile>.dockerignore` next to a named Dockerfile wins
    /// over `<context>/.dockerignore`; no file means nothing is ignored.
    pub fn for_build(context: &Path, dockerfile: Option<&Path>) -> Result<Self> {
        match find_ignore_file(context, dockerfile) {
            Some(p) => IgnoreMatcher::from_file(&p),
            None => Ok(IgnoreMatcher::default()),
        }
    }

    /// Whether there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `rel_path` (relative to the context, `/`-separated) matches: a pattern
    /// matching the path or one of its parents excludes it, a later `!` pattern takes it
    /// back; the last match wins. The context root itself is never excluded.
    pub fn matches(&self, rel_path: &str) -> bool {
        let path = clean_path(rel_path.trim_start_matches('/'));
        if path == "." || path.is_empty() {
            return false;
        }
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for pat in &self.patterns {
            // An include only matters while unmatched, an exception only once matched.
            if pat.exception != matched {
                continue;
            }
            let mut hit = pat.matches(&path);
            if !hit {
                for i in 1..=parents.len() {
                    if pat.matches(&parents[..i].join("/")) {
                        hit = true;
                        break;
                    }
                }
            }
            if hit {
                matched = !pat.exception;
            }
        }
        matched
    }

    /// Whether `rel_path` is left out of the build context. A directory that matches is
    /// still kept (to be walked) when an exception pattern might match inside it, so a
    /// walker may skip a directory exactly when this returns `true`.
    pub fn is_excluded(&self, rel_path: &str, is_dir: bool) -> bool {
        if !self.matches(rel_path) {
            return false;
        }
        if !is_dir {
            return true;
        }
        let dir = clean_path(rel_path.trim_start_matches('/'));
        !self
            .patterns
            .iter()
            .any(|p| p.exception && p.may_match_inside(&dir))
    }
}

/// Where the ignore file for a build is: `<dir>/<name>.dockerignore` for a Dockerfile at
/// `<dir>/<name>` if it exists, else `<context>/.dockerignore` if it exists.
pub fn find_ignore_file(context: &Path, dockerfile: Option<&Path>) -> Option<PathBuf> {
    if let Some(df) = dockerfile {
        if let Some(name) = df.file_name() {
            let mut n = name.to_os_string();
            n.push(".dockerignore");
            let candidate = df.with_file_name(n);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let default = context.join(".dockerignore");
    default.is_file().then_some(default)
}
