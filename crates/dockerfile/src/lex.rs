//! Shell-like word processing: quotes, the escape character and `$VAR` expansion, following
//! the rules of BuildKit's `shell.Lex` (which the Dockerfile reference documents as
//! "environment replacement").

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A source of variable values for expansion.
pub trait Env {
    /// The value of `name`, or `None` when it is unset (which differs from empty for
    /// `${V-x}`, `${V+x}` and `${V?x}`).
    fn lookup(&self, name: &str) -> Option<String>;
}

impl Env for HashMap<String, String> {
    fn lookup(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl Env for BTreeMap<String, String> {
    fn lookup(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// `KEY=VALUE` pairs; the last pair with a key wins, like a process environment.
impl Env for [(String, String)] {
    fn lookup(&self, name: &str) -> Option<String> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

impl Env for Vec<(String, String)> {
    fn lookup(&self, name: &str) -> Option<String> {
        self.as_slice().lookup(name)
    }
}

/// An environment where nothing is set.
#[derive(Debug, Clone, Copy, Default)]
pub struct EmptyEnv;

impl Env for EmptyEnv {
    fn lookup(&self, _name: &str) -> Option<String> {
        None
    }
}

impl<E: Env + ?Sized> Env for &E {
    fn lookup(&self, name: &str) -> Option<String> {
        (**self).lookup(name)
    }
}

/// The outcome of processing one word.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Processed {
    /// The word with quotes removed and variables replaced, spaces kept.
    pub word: String,
    /// The same text split into fields on unquoted whitespace.
    pub words: Vec<String>,
    /// Variables the word referred to that were set.
    pub used: BTreeSet<String>,
    /// Variables the word referred to that were unset.
    pub unset: BTreeSet<String>,
}

/// Word processor. `Lexer::new(escape)` gives Docker's behaviour for instruction arguments;
/// the other switches exist for heredoc detection, which must see words as written.
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    /// The escape character: `\` or `` ` `` (set by the `escape` directive).
    pub escape: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Leave references to unset variables as written.
    pub skip_unset: bool,
    /// Treat quotes as ordinary characters (heredoc bodies).
    pub skip_quotes: bool,
}

impl Lexer {
    /// Docker's word processing with the given escape character.
    pub fn new(escape: char) -> Self {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset: false,
            skip_quotes: false,
        }
    }

    /// Expands `word` as a single word (`ProcessWord` in BuildKit): quotes go, variables
    /// are replaced, whitespace stays.
    pub fn expand_word(&self, word: &str, env: &dyn Env) -> Result<String, String> {
        Ok(self.process(word, env)?.word)
    }

    /// Expands `word` and splits the result into fields (`ProcessWords`): used by `EXPOSE`.
    pub fn expand_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, String> {
        Ok(self.process(word, env)?.words)
    }

    /// Processes `word` fully, reporting which variables it used.
    pub fn process(&self, word: &str, env: &dyn Env) -> Result<Processed, String> {
        let chars: Vec<char> = word.chars().collect();
        let mut st = State {
            lx: self,
            env,
            chars: &chars,
            pos: 0,
            used: BTreeSet::new(),
            unset: BTreeSet::new(),
            depth: 0,
        };
        let (word, words) = st.until(None, self.raw_escapes)?;
        Ok(Processed {
            word,
            words,
            used: st.used,
            unset: st.unset,
        })
    }
}

struct State<'a> {
    lx: &'a Lexer,
    env: &'a dyn Env,
    chars: &'a [char],
    pos: usize,
    used: BTreeSet<String>,
    unset: BTreeSet<String>,
    depth: usize,
}

/// Nesting limit for `${a:-${b:-...}}`, so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 64;

/// Builds the field-split view alongside the plain result.
#[derive(Default)]
struct Fields {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Fields {
    fn push(&mut self, c: char) {
        if c.is_whitespace() {
            if self.in_word && !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else {
            self.push_raw(c);
        }
    }
    fn push_raw(&mut self, c: char) {
        self.buf.push(c);
        self.in_word = true;
    }
    fn push_str(&mut self, s: &str) {
        s.chars().for_each(|c| self.push(c));
    }
    fn push_raw_str(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(self.buf);
        }
        self.words
    }
}

impl State<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes up to `stop` (consumed) or the end of input.
    fn until(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), String> {
        let mut out = String::new();
        let mut fields = Fields::default();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.pos += 1;
                return Ok((out, fields.finish()));
            }
            match c {
                '$' => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                    // Expanded values are split into fields, quoted text is not.
                    fields.push_str(&v);
                }
                '<' => {
                    let v = self.possible_heredoc();
                    out.push_str(&v);
                    fields.push_raw_str(&v);
                }
                '\'' if !self.lx.skip_quotes => {
                    let v = self.single_quoted()?;
                    out.push_str(&v);
                    fields.push_raw_str(&v);
                }
                '"' if !self.lx.skip_quotes => {
                    let v = self.double_quoted(raw_escapes)?;
                    out.push_str(&v);
                    fields.push_raw_str(&v);
                }
                _ => {
                    self.pos += 1;
                    if c == self.lx.escape {
                        if raw_escapes {
                            fields.push_raw(c);
                            out.push(c);
                        }
                        // An escape at the very end is dropped.
                        let Some(escaped) = self.next() else { break };
                        fields.push_raw(escaped);
                        out.push(escaped);
                    } else {
                        fields.push(c);
                        out.push(c);
                    }
                }
            }
        }
        if let Some(stop) = stop {
            return Err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((out, fields.finish()))
    }

    fn single_quoted(&mut self) -> Result<String, String> {
        let mut out = String::new();
        self.pos += 1;
        if self.lx.raw_quotes {
            out.push('\'');
        }
        loop {
            match self.next() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching single-quote"
                            .into(),
                    );
                }
                Some('\'') => {
                    if self.lx.raw_quotes {
                        out.push('\'');
                    }
                    return Ok(out);
                }
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self, raw_escapes: bool) -> Result<String, String> {
        let mut out = String::new();
        self.pos += 1;
        if self.lx.raw_quotes {
            out.push('"');
        }
        loop {
            match self.peek() {
                None => {
                    return Err(
                        "unexpected end of statement while looking for matching double-quote"
                            .into(),
                    );
                }
                Some('"') => {
                    self.pos += 1;
                    if self.lx.raw_quotes {
                        out.push('"');
                    }
                    return Ok(out);
                }
                Some('$') => {
                    let v = self.dollar()?;
                    out.push_str(&v);
                }
                Some(mut c) => {
                    self.pos += 1;
                    if c == self.lx.escape {
                        if raw_escapes {
                            out.push(c);
                        }
                        match self.peek() {
                            None => continue,
                            // Inside double quotes only these can be escaped; any other
                            // escape character stays literal, as in sh.
                            Some(n) if n == '"' || n == '$' || n == self.lx.escape => {
                                self.pos += 1;
                                c = n;
                            }
                            Some(_) => {}
                        }
                    }
                    out.push(c);
                }
            }
        }
    }

    fn possible_heredoc(&mut self) -> String {
        self.pos += 1;
        if self.peek() != Some('<') {
            return "<".into();
        }
        self.pos += 1;
        let mut out = String::from("<<");
        // `<< EOF` keeps its spaces so the heredoc word stays one field.
        while let Some(c) = self.peek().filter(|c| *c == ' ' || *c == '\t') {
            out.push(c);
            self.pos += 1;
        }
        out
    }

    fn get(&mut self, name: &str) -> Option<String> {
        match self.env.lookup(name) {
            Some(v) => {
                self.used.insert(name.to_string());
                Some(v)
            }
            None => {
                self.unset.insert(name.to_string());
                None
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && c.is_ascii_digit() {
                // Positional parameters: all the digits.
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    name.push(d);
                    self.pos += 1;
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.pos += 1;
                return c.to_string();
            }
            if !(c.is_alphanumeric() || c == '_') {
                break;
            }
            name.push(c);
            self.pos += 1;
        }
        name
    }

    fn dollar(&mut self) -> Result<String, String> {
        if self.depth >= MAX_DEPTH {
            return Err("syntax error: substitutions nested too deeply".into());
        }
        self.depth += 1;
        let r = self.dollar_inner();
        self.depth -= 1;
        r
    }

    fn dollar_inner(&mut self) -> Result<String, String> {
        self.pos += 1;
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get(&name) {
                Some(v) => v,
                None if self.lx.skip_unset => format!("${name}"),
                None => String::new(),
            });
        }
        self.pos += 1;
        match self.peek() {
            None => return Err("syntax error: missing '}'".into()),
            Some('{' | '}' | ':') => return Err("syntax error: bad substitution".into()),
            Some(_) => {}
        }
        let name = self.name();
        let Some(mut op) = self.next() else {
            return Err("syntax error: missing '}'".into());
        };
        if op == '}' {
            return Ok(match self.get(&name) {
                Some(v) => v,
                None if self.lx.skip_unset => format!("${{{name}}}"),
                None => String::new(),
            });
        }
        let mut ops = op.to_string();
        let colon = op == ':';
        if colon {
            let Some(o) = self.next() else {
                return Err("syntax error: missing '}'".into());
            };
            op = o;
            ops.push(op);
        }
        if !matches!(op, '-' | '+' | '?' | '#' | '%') {
            return Err(format!("unsupported modifier ({ops}) in substitution"));
        }
        let pattern_op = op == '#' || op == '%';
        if colon && pattern_op {
            return Err(format!("unsupported modifier ({ops}) in substitution"));
        }
        let (word, _) = match self.until(Some('}'), pattern_op) {
            Ok(w) => w,
            Err(_) if self.peek().is_none() => return Err("syntax error: missing '}'".into()),
            Err(e) => return Err(e),
        };
        let value = self.get(&name);
        if self.lx.skip_unset && value.is_none() {
            return Ok(format!("${{{name}{ops}{word}}}"));
        }
        let empty_or_unset = match &value {
            None => true,
            Some(v) => colon && v.is_empty(),
        };
        Ok(match op {
            '-' => {
                if empty_or_unset {
                    word
                } else {
                    value.unwrap_or_default()
                }
            }
            '+' => {
                if empty_or_unset {
                    String::new()
                } else {
                    word
                }
            }
            '?' => match value {
                None => {
                    let msg = if word.is_empty() {
                        "is not allowed to be unset"
                    } else {
                        &word
                    };
                    return Err(format!("{name}: {msg}"));
                }
                Some(v) if colon && v.is_empty() => {
                    let msg = if word.is_empty() {
                        "is not allowed to be empty"
                    } else {
                        &word
                    };
                    return Err(format!("{name}: {msg}"));
                }
                Some(v) => v,
            },
            _ => {
                let value = value.unwrap_or_default();
                let (longest, pat) = match word.strip_prefix(op) {
                    Some(rest) => (true, rest.to_string()),
                    None => (false, word),
                };
                let pat = glob_tokens(&pat)?;
                if op == '#' {
                    trim_prefix(&value, &pat, longest)
                } else {
                    trim_suffix(&value, &pat, longest)
                }
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Glob {
    Any,
    One,
    Lit(char),
}

/// Compiles the pattern of `${V#pat}` / `${V%pat}`: `*`, `?` and `\` escapes (raw escapes
/// were kept for exactly this).
fn glob_tokens(pat: &str) -> Result<Vec<Glob>, String> {
    let mut out = Vec::new();
    let mut it = pat.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '*' => {
                // Consecutive stars match the same as one; collapsing keeps matching linear.
                if out.last() != Some(&Glob::Any) {
                    out.push(Glob::Any);
                }
            }
            '?' => out.push(Glob::One),
            '\\' => match it.next() {
                Some(e @ ('*' | '?' | '\\')) => out.push(Glob::Lit(e)),
                Some(e @ ('}' | '/')) => out.push(Glob::Lit(e)),
                Some(e) => {
                    return Err(format!(
                        "invalid pattern ({pat}) in substitution: invalid escape '\\{e}'"
                    ));
                }
                None => {}
            },
            c => out.push(Glob::Lit(c)),
        }
    }
    Ok(out)
}

/// For each `n`, whether `s[..n]` matches `pat`: one pass of an NFA over the text, so
/// hostile patterns like `*a*a*a*b` stay linear in pattern × text.
fn prefix_matches(pat: &[Glob], s: &[char]) -> Vec<bool> {
    let close = |states: &mut Vec<bool>| {
        for j in 0..pat.len() {
            if states[j] && pat[j] == Glob::Any {
                states[j + 1] = true;
            }
        }
    };
    let mut states = vec![false; pat.len() + 1];
    states[0] = true;
    close(&mut states);
    let mut out = Vec::with_capacity(s.len() + 1);
    out.push(states[pat.len()]);
    for c in s {
        let mut next = vec![false; pat.len() + 1];
        for j in 0..pat.len() {
            if !states[j] {
                continue;
            }
            match &pat[j] {
                Glob::Any => next[j] = true,
                Glob::One => next[j + 1] = true,
                Glob::Lit(l) if l == c => next[j + 1] = true,
                Glob::Lit(_) => {}
            }
        }
        close(&mut next);
        states = next;
        out.push(states[pat.len()]);
    }
    out
}

fn trim_prefix(value: &str, pat: &[Glob], longest: bool) -> String {
    let chars: Vec<char> = value.chars().collect();
    let ok = prefix_matches(pat, &chars);
    let n = if longest {
        ok.iter().rposition(|b| *b)
    } else {
        ok.iter().position(|b| *b)
    };
    match n {
        Some(n) => chars[n..].iter().collect(),
        None => value.to_string(),
    }
}

fn trim_suffix(value: &str, pat: &[Glob], longest: bool) -> String {
    // A suffix match is a prefix match of the reversed text against the reversed pattern.
    let rev: Vec<char> = value.chars().rev().collect();
    let rpat: Vec<Glob> = pat.iter().rev().cloned().collect();
    let ok = prefix_matches(&rpat, &rev);
    let n = if longest {
        ok.iter().rposition(|b| *b)
    } else {
        ok.iter().position(|b| *b)
    };
    match n {
        Some(n) => rev[n..].iter().rev().collect(),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        [
            ("SET", "value"),
            ("EMPTY", ""),
            ("SP", "a b  c"),
            ("P", "/a/b.tar.gz"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn word(s: &str) -> Result<String, String> {
        Lexer::new('\\').expand_word(s, &env())
    }

    #[test]
    fn expansion_table() {
        let cases: &[(&str, &str)] = &[
            ("$SET", "value"),
            ("${SET}", "value"),
            ("x${SET}y", "xvaluey"),
            ("$SET_", ""),
            ("${SET}_", "value_"),
            ("$UNSET", ""),
            ("${SET:-d}", "value"),
            ("${EMPTY:-d}", "d"),
            ("${UNSET:-d}", "d"),
            ("${EMPTY-d}", ""),
            ("${UNSET-d}", "d"),
            ("${SET:+alt}", "alt"),
            ("${EMPTY:+alt}", ""),
            ("${EMPTY+alt}", "alt"),
            ("${UNSET+alt}", ""),
            ("${UNSET:-$SET}", "value"),
            ("${UNSET:-${EMPTY:-deep}}", "deep"),
            ("'$SET'", "$SET"),
            ("\"$SET\"", "value"),
            ("\"'$SET'\"", "'value'"),
            ("\\$SET", "$SET"),
            ("\"\\$SET\"", "$SET"),
            ("\"a\\b\"", "a\\b"),
            ("a\\ b", "a b"),
            ("$", "$"),
            ("a$", "a$"),
            ("$1", ""),
            ("${P#*/}", "a/b.tar.gz"),
            ("${P##*/}", "b.tar.gz"),
            ("${P%.*}", "/a/b.tar"),
            ("${P%%.*}", "/a/b"),
            ("${P#nomatch}", "/a/b.tar.gz"),
            ("trailing\\", "trailing"),
        ];
        for (input, want) in cases {
            assert_eq!(word(input).as_deref(), Ok(*want), "input {input:?}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(word("${UNSET:?need it}").unwrap_err(), "UNSET: need it");
        assert_eq!(
            word("${UNSET?}").unwrap_err(),
            "UNSET: is not allowed to be unset"
        );
        assert_eq!(
            word("${EMPTY:?}").unwrap_err(),
            "EMPTY: is not allowed to be empty"
        );
        assert_eq!(word("${EMPTY?}").unwrap(), "");
        assert_eq!(word("${SET:?x}").unwrap(), "value");
        assert_eq!(word("${SET").unwrap_err(), "syntax error: missing '}'");
        assert_eq!(word("${}").unwrap_err(), "syntax error: bad substitution");
        assert_eq!(
            word("${:-x}").unwrap_err(),
            "syntax error: bad substitution"
        );
        assert!(
            word("${SET:#x}")
                .unwrap_err()
                .contains("unsupported modifier")
        );
        assert!(word("'open").unwrap_err().contains("single-quote"));
        assert!(word("\"open").unwrap_err().contains("double-quote"));
    }

    #[test]
    fn backtick_escape() {
        let lx = Lexer::new('`');
        assert_eq!(lx.expand_word("`$SET", &env()).unwrap(), "$SET");
        assert_eq!(lx.expand_word("c:\\dir", &env()).unwrap(), "c:\\dir");
    }

    #[test]
    fn words_split_on_unquoted_whitespace_only() {
        let lx = Lexer::new('\\');
        assert_eq!(lx.expand_words("$SP", &env()).unwrap(), vec!["a", "b", "c"]);
        assert_eq!(
            lx.expand_words("\"$SP\" x", &env()).unwrap(),
            vec!["a b  c", "x"]
        );
        assert_eq!(lx.expand_word("$SP", &env()).unwrap(), "a b  c");
    }

    #[test]
    fn reports_used_and_unset_variables() {
        let p = Lexer::new('\\').process("$SET ${NOPE:-x}", &env()).unwrap();
        assert!(p.used.contains("SET"));
        assert!(p.unset.contains("NOPE"));
    }

    #[test]
    fn skip_unset_keeps_references() {
        let mut lx = Lexer::new('\\');
        lx.skip_unset = true;
        assert_eq!(
            lx.expand_word("$NOPE ${NOPE} ${NOPE:-x}", &EmptyEnv)
                .unwrap(),
            "$NOPE ${NOPE} ${NOPE:-x}"
        );
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "${A:-".repeat(10_000) + &"}".repeat(10_000);
        assert!(Lexer::new('\\').expand_word(&deep, &EmptyEnv).is_err());
        let ok = "${A:-".repeat(10) + "x" + &"}".repeat(10);
        assert_eq!(Lexer::new('\\').expand_word(&ok, &EmptyEnv).unwrap(), "x");
    }

    #[test]
    fn pathological_globs_stay_fast() {
        let env = vec![("V".to_string(), "a".repeat(3000))];
        let w = "${V#*a*a*a*a*a*a*a*a*a*b}";
        assert_eq!(Lexer::new('\\').expand_word(w, &env).unwrap().len(), 3000);
    }
}
