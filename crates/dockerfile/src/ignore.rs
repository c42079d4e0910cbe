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

/// Whether `clean_path` would return `p` unchanged (relative, no empty, `.` or `..` element).
pub fn is_clean(p: &str) -> bool {
    !p.is_empty() && !p.starts_with('/') && p.split('/').all(|c| !matches!(c, "" | "." | ".."))
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
            Some(Tok::One) => {
                s.get(si).is_some_and(|c| *c != '/') && go(toks, s, ti + 1, si + 1, memo)
            }
            Some(Tok::Class { negated, ranges }) => {
                s.get(si)
                    .is_some_and(|c| class_matches(*negated, ranges, *c))
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
                path.ends_with(suf.as_str()) || suf.strip_prefix('/').is_some_and(|s| path == s)
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
        // Called for every file of every walk of the context: no work without patterns, and
        // no allocation for a path that is already clean (the walker's always are).
        if self.patterns.is_empty() {
            return false;
        }
        let rel_path = rel_path.trim_start_matches('/');
        let path: std::borrow::Cow<'_, str> = if is_clean(rel_path) {
            rel_path.into()
        } else {
            clean_path(rel_path).into()
        };
        if path == "." || path.is_empty() {
            return false;
        }
        // The parents, as prefixes of the clean path: `a`, `a/b` for `a/b/c`.
        let parents: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let mut matched = false;
        for pat in &self.patterns {
            // An include only matters while unmatched, an exception only once matched.
            if pat.exception != matched {
                continue;
            }
            let mut hit = pat.matches(&path);
            if !hit {
                hit = parents.iter().any(|p| pat.matches(p));
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
    if let Some(name) = dockerfile.and_then(Path::file_name) {
        let mut n = name.to_os_string();
        n.push(".dockerignore");
        let candidate = dockerfile.map(|df| df.with_file_name(n));
        if let Some(candidate) = candidate.filter(|c| c.is_file()) {
            return Some(candidate);
        }
    }
    let default = context.join(".dockerignore");
    default.is_file().then_some(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(patterns: &[&str]) -> IgnoreMatcher {
        IgnoreMatcher::parse("test", &patterns.join("\n")).unwrap()
    }

    /// (pattern, path, excluded) with the answers moby/patternmatcher gives
    /// (`MatchesOrParentMatches`).
    const TABLE: &[(&str, &str, bool)] = &[
        ("**", "file", true),
        ("**/", "file", true),
        ("**", "dir/file", true),
        ("**/**", "dir/file", true),
        ("dir/**", "dir/file", true),
        ("dir/**", "dir/dir2/file", true),
        ("**/dir", "dir", true),
        ("**/dir", "dir/file", true),
        ("**/dir2/*", "dir/dir2/file", true),
        ("**/dir2/**", "dir/dir2/dir3/file", true),
        ("**file", "file", true),
        ("**file", "dir/file", true),
        ("**file", "dir/barfile", true),
        ("**/file", "dir/dir/file", true),
        ("**/file*", "dir/dir/file.txt", true),
        ("**/file*.txt*", "dir/dir/file.txt", true),
        ("**/**/*.txt", "dir/dir/file.txt", true),
        ("**/**/*.txt2", "dir/dir/file.txt", false),
        ("**/*.txt", "file.txt", true),
        ("a**/*.txt", "a/dir/dir/file.txt", true),
        ("a/*.txt", "a/dir/file.txt", false),
        ("a/*.txt", "a/file.txt", true),
        ("a/*.txt**", "a/file.txt", true),
        ("a[b-d]e", "ae", false),
        ("a[b-d]e", "ace", true),
        ("a[b-d]e", "aae", false),
        ("a[^b-d]e", "aze", true),
        (".*", ".foo", true),
        (".*", "foo", false),
        ("abc.def", "abcdef", false),
        ("abc.def", "abc.def", true),
        ("abc?def", "abcZdef", true),
        ("abc?def", "abcdef", false),
        ("a\\\\", "a\\", true),
        ("a\\*b", "a*b", true),
        ("a\\*b", "axb", false),
        ("**/foo/bar", "foo/bar", true),
        ("**/foo/bar", "dir/dir2/foo/bar", true),
        ("abc/**", "abc", false),
        ("abc/**", "abc/def/ghi", true),
        ("**/.foo", ".foo", true),
        ("**/.foo", "bar.foo", false),
        ("a(b)c/def", "a(b)c/def", true),
        ("a(b)c/def", "a(b)c/xyz", false),
        ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
        (
            "dist/*.whl",
            "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
            true,
        ),
        // `*` and `?` stop at `/`, but a matching parent excludes everything below it.
        ("*", "a/b/c", true),
        ("*.go", "dir/x.go", false),
        ("docs", "docs/a/b.md", true),
        ("docs", "docsx", false),
        // Leading `/` and `./` and other path noise are cleaned away.
        ("/build", "build/out", true),
        ("./build", "build", true),
        ("build/../dist", "dist/x", true),
        ("a//b/./c", "a/b/c", true),
    ];

    #[test]
    fn pattern_table() {
        for (pattern, path, want) in TABLE {
            assert_eq!(
                m(&[pattern]).matches(path),
                *want,
                "pattern {pattern:?} path {path:?}"
            );
        }
    }

    #[test]
    fn last_match_wins_with_exceptions() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["**", "!util/docker/web"], "util/docker/web/foo", false),
            (
                &["**", "!util/docker/web", "util/docker/web/foo"],
                "util/docker/web/foo",
                true,
            ),
            (&["**", "!dist/*.whl"], "dist/a-1.0-py3-none-any.whl", false),
            (&["*.md", "!README.md"], "README.md", false),
            (&["*.md", "!README.md"], "CHANGES.md", true),
            (&["!README.md", "*.md"], "README.md", true),
            (&["docs", "!docs/keep.md"], "docs/keep.md", false),
            (&["docs", "!docs/keep.md"], "docs/other.md", true),
        ];
        for (patterns, path, want) in cases {
            assert_eq!(m(patterns).matches(path), *want, "{patterns:?} {path:?}");
        }
    }

    #[test]
    fn directories_are_skipped_unless_an_exception_may_match_inside() {
        let pm = m(&[
            "docs",
            "!docs/keep.md",
            "node_modules",
            "vendor",
            "!vendor/*/LICENSE",
        ]);
        assert!(!pm.is_excluded("docs", true));
        assert!(pm.is_excluded("docs", false));
        assert!(pm.is_excluded("docs/drop.md", false));
        assert!(!pm.is_excluded("docs/keep.md", false));
        assert!(pm.is_excluded("node_modules", true));
        assert!(!pm.is_excluded("vendor", true));
        assert!(!pm.is_excluded("vendor/foo", true));
        assert!(!pm.is_excluded("vendor/foo/LICENSE", false));
        assert!(pm.is_excluded("vendor/foo/src", true));
        assert!(!pm.is_excluded("src", true));
        let all = m(&["**", "!**/*.go"]);
        assert!(!all.is_excluded("deep/dir", true));
    }

    #[test]
    fn file_syntax() {
        let pm = IgnoreMatcher::parse(
            "x",
            "\u{feff}# comment\n  # not a comment: a pattern\n\n  *.tmp  \n! keep.tmp\n",
        )
        .unwrap();
        assert!(pm.matches("a.tmp"));
        assert!(!pm.matches("keep.tmp"));
        assert!(pm.matches("# not a comment: a pattern"));
        assert!(!pm.matches("."));
        assert!(!pm.matches(""));
        assert!(matches!(
            IgnoreMatcher::parse("x", "!\n"),
            Err(Error::IgnorePattern { .. })
        ));
        assert!(matches!(
            IgnoreMatcher::parse("x", "a[b\n"),
            Err(Error::IgnorePattern { .. })
        ));
    }

    #[test]
    fn clean_matches_go() {
        for (i, o) in [
            ("", "."),
            (".", "."),
            ("./a", "a"),
            ("a/", "a"),
            ("a//b", "a/b"),
            ("a/../..", ".."),
            ("/..", "/"),
            ("/a/./b/../c", "/a/c"),
        ] {
            assert_eq!(clean_path(i), o, "{i:?}");
            // The fast path agrees: a path it takes as clean is what clean_path returns.
            assert!(!is_clean(i) || clean_path(i) == i, "{i:?}");
        }
        for p in ["a", "a/b", "a.b/..c/d.", "...", "a/.b"] {
            assert!(is_clean(p) && clean_path(p) == p, "{p:?}");
        }
    }

    #[test]
    fn ignore_file_lookup_prefers_dockerfile_specific_file() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path();
        let df = ctx.join("build").join("app.Dockerfile");
        std::fs::create_dir_all(df.parent().unwrap()).unwrap();
        std::fs::write(&df, "FROM x\n").unwrap();
        assert_eq!(find_ignore_file(ctx, Some(&df)), None);
        std::fs::write(ctx.join(".dockerignore"), "a\n").unwrap();
        assert_eq!(
            find_ignore_file(ctx, Some(&df)),
            Some(ctx.join(".dockerignore"))
        );
        let specific = ctx.join("build").join("app.Dockerfile.dockerignore");
        std::fs::write(&specific, "b\n").unwrap();
        assert_eq!(find_ignore_file(ctx, Some(&df)), Some(specific));
        let pm = IgnoreMatcher::for_build(ctx, Some(&df)).unwrap();
        assert!(pm.matches("b") && !pm.matches("a"));
        let pm = IgnoreMatcher::for_build(ctx, None).unwrap();
        assert!(pm.matches("a") && !pm.matches("b"));
        assert!(matches!(
            IgnoreMatcher::from_file(&ctx.join("missing")),
            Err(Error::Io { .. })
        ));
    }
}
