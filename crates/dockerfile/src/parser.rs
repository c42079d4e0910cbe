//! Dockerfile text → typed instructions and stages.
//!
//! The steps follow BuildKit's `frontend/dockerfile/parser` and `instructions` packages:
//! parser directives, logical lines (continuations, comments, empty continuation lines),
//! the command keyword, `--flags`, the per-instruction argument syntax, heredoc bodies, then
//! typed instructions grouped into stages.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{Diagnostic, Error, Result};
use crate::instruction::*;
use crate::lex::{EmptyEnv, Lexer};
use crate::mount::parse_mount;

/// The `# check=` directive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckDirective {
    /// Rules to skip (`skip=A,B`); may hold `all`.
    pub skip: Vec<String>,
    /// `error=true`: check warnings fail the build.
    pub error: bool,
}

/// Parser directives from the top of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directives {
    /// The escape character, `\` unless `# escape=`` ` ``.
    pub escape: char,
    /// `# syntax=` as written.
    pub syntax: Option<String>,
    /// `# check=`.
    pub check: Option<CheckDirective>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            escape: '\\',
            syntax: None,
            check: None,
        }
    }
}

/// Something accepted but discouraged, with its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// 1-based line.
    pub line: usize,
    /// What to change.
    pub message: String,
}

/// A build stage: one `FROM` and the instructions up to the next.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Position among the stages, from 0.
    pub index: usize,
    /// `AS name`, lower-cased.
    pub name: Option<String>,
    /// Base image or stage as written (may need [`crate::Dockerfile::expand_from`]).
    pub base: String,
    /// `--platform` as written.
    pub platform: Option<String>,
    /// The `FROM` line.
    pub from: Located,
    /// Instructions after `FROM`, in order.
    pub instructions: Vec<Located>,
}

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq)]
pub struct Dockerfile {
    /// File name used in diagnostics.
    pub file: String,
    /// Parser directives.
    pub directives: Directives,
    /// `ARG`s before the first `FROM`: usable in `FROM` lines only, unless a stage
    /// re-declares them.
    pub meta_args: Vec<Located>,
    /// The stages in order.
    pub stages: Vec<Stage>,
    /// Non-fatal findings.
    pub warnings: Vec<Warning>,
    /// The source, one entry per line without line endings, for later diagnostics.
    pub(crate) lines: Vec<String>,
}

impl Dockerfile {
    /// Parses `text`; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Dockerfile> {
        Parser::new(file, text).run()
    }

    /// Reads and parses the file at `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Dockerfile> {
        let text = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Dockerfile::from_bytes(&path.display().to_string(), &text)
    }

    /// Parses a Dockerfile's bytes; `file` names it in diagnostics. Text that is not UTF-8
    /// is an error at its first bad byte.
    pub fn from_bytes(file: &str, bytes: &[u8]) -> Result<Dockerfile> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Dockerfile::parse(file, text),
            Err(e) => Err(invalid_utf8(file, bytes, e.valid_up_to())),
        }
    }

    /// The stage called `name` (case-insensitive, like `--target`).
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        let name = name.to_ascii_lowercase();
        self.stages
            .iter()
            .find(|s| s.name.as_deref() == Some(name.as_str()))
    }

    /// A diagnostic at `line`/`column` of this file.
    pub fn diagnostic(&self, line: usize, column: usize, message: String) -> Error {
        let source_line = self
            .lines
            .get(line.saturating_sub(1))
            .cloned()
            .unwrap_or_default();
        Error::Syntax(Box::new(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            message,
            source_line,
        }))
    }
}

/// A logical line: physical lines joined, with a map back to where each piece came from.
struct Logical {
    text: String,
    /// (offset in `text`, physical line index, byte column in that line)
    segs: Vec<(usize, usize, usize)>,
    start: usize,
    end: usize,
}

impl Logical {
    fn push(&mut self, piece: &str, line: usize, col: usize) {
        self.segs.push((self.text.len(), line, col));
        self.text.push_str(piece);
        self.end = line;
    }
}

/// A parse failure at a byte offset of the logical line.
struct At(usize, String);

type PResult<T> = std::result::Result<T, At>;

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

/// Go's `reWhitespace` (`[\t\v\f\r ]`): what separates the keyword and plain arguments.
fn is_sep(c: char) -> bool {
    matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ')
}

struct Parser<'a> {
    file: &'a str,
    lines: Vec<&'a str>,
    idx: usize,
    escape: char,
    directives: Directives,
    warnings: Vec<Warning>,
}

impl<'a> Parser<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        Parser {
            file,
            lines: text.split_inclusive('\n').collect(),
            idx: 0,
            escape: '\\',
            directives: Directives::default(),
            warnings: Vec::new(),
        }
    }

    fn error(&self, line: usize, byte_col: usize, message: impl Into<String>) -> Error {
        let src = self.lines.get(line).map(|l| trim_newline(l)).unwrap_or("");
        let mut b = byte_col.min(src.len());
        while !src.is_char_boundary(b) {
            b -= 1;
        }
        Error::Syntax(Box::new(Diagnostic {
            file: self.file.to_string(),
            line: line + 1,
            column: src[..b].chars().count() + 1,
            message: message.into(),
            source_line: src.to_string(),
        }))
    }

    fn error_in(&self, lg: &Logical, off: usize, message: impl Into<String>) -> Error {
        let seg = lg
            .segs
            .iter()
            .rev()
            .find(|s| s.0 <= off)
            .or(lg.segs.first())
            .copied()
            .unwrap_or((0, lg.start, 0));
        self.error(seg.1, seg.2 + (off - seg.0.min(off)), message)
    }

    /// Parses a directive line; `Ok(false)` ends the directive block.
    fn directive(&mut self, line: &str, seen: &mut Vec<String>, lineno: usize) -> Result<bool> {
        // A `#!` first line (a Dockerfile run as a script) leaves the directives open, as
        // in BuildKit's DirectiveParser.
        if lineno == 0 && line.starts_with("#!") {
            return Ok(true);
        }
        let Some(rest) = line.strip_prefix('#') else {
            return Ok(false);
        };
        let rest = rest.trim_start();
        let key_len = rest
            .char_indices()
            .find(|(i, c)| !(c.is_ascii_alphabetic() || (*i > 0 && c.is_ascii_digit())))
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        if key_len == 0 {
            return Ok(false);
        }
        let key = rest[..key_len].to_ascii_lowercase();
        let Some(value) = rest[key_len..].trim_start().strip_prefix('=') else {
            return Ok(false);
        };
        // ` //` starts a comment after the value (`# syntax=docker/dockerfile:1 // why`).
        let value = match value.find(" //") {
            Some(i) => &value[..i],
            None => value,
        };
        let value = value.trim();
        if value.is_empty() || !matches!(key.as_str(), "escape" | "syntax" | "check") {
            return Ok(false);
        }
        let col = line.len() - line.trim_start_matches('#').trim_start().len();
        if seen.contains(&key) {
            return Err(self.error(
                lineno,
                col,
                format!("only one {key} parser directive can be used"),
            ));
        }
        seen.push(key.clone());
        match key.as_str() {
            "escape" => match value {
                "\\" | "`" => {
                    self.escape = value.chars().next().unwrap_or('\\');
                    self.directives.escape = self.escape;
                }
                _ => {
                    return Err(self.error(
                        lineno,
                        col,
                        format!("invalid escape token '{value}' does not match ` or \\"),
                    ));
                }
            },
            "syntax" => self.directives.syntax = Some(value.to_string()),
            _ => {
                let check = parse_check(value).map_err(|m| self.error(lineno, col, m))?;
                self.directives.check = Some(check);
            }
        }
        Ok(true)
    }

    /// Strips a trailing escape character that continues the line (Docker's
    /// `lineContinuationRegex`): returns the text and whether the line continues.
    fn trim_continuation<'s>(&self, line: &'s str) -> (&'s str, bool) {
        let t = line.trim_end_matches([' ', '\t']);
        let Some(before) = t.strip_suffix(self.escape) else {
            return (line, false);
        };
        if before.is_empty() {
            return ("", true);
        }
        // An escaped escape character (`\\`) at the end is not a continuation.
        if before.ends_with(self.escape) {
            return (line, false);
        }
        (before, true)
    }

    fn run(mut self) -> Result<Dockerfile> {
        let mut directives_open = true;
        let mut seen = Vec::new();
        let mut items: Vec<Located> = Vec::new();
        while self.idx < self.lines.len() {
            let lineno = self.idx;
            let raw = trim_newline(self.lines[lineno]);
            self.idx += 1;
            let body = raw.trim_start();
            let lead = raw.len() - body.len();
            if directives_open {
                directives_open = self.directive(body, &mut seen, lineno)?;
            }
            if body.starts_with('#') {
                continue;
            }
            let (first, mut cont) = self.trim_continuation(body);
            if !cont && first.is_empty() {
                continue;
            }
            let mut lg = Logical {
                text: String::new(),
                segs: Vec::new(),
                start: lineno,
                end: lineno,
            };
            lg.push(first, lineno, lead);
            let mut empty_continuation = false;
            while cont && self.idx < self.lines.len() {
                let n = self.idx;
                self.idx += 1;
                let raw = trim_newline(self.lines[n]);
                let t = raw.trim_start();
                if t.starts_with('#') {
                    continue;
                }
                if t.is_empty() {
                    empty_continuation = true;
                    continue;
                }
                let (piece, c) = self.trim_continuation(raw);
                cont = c;
                lg.push(piece, n, 0);
            }
            if empty_continuation {
                self.warnings.push(Warning {
                    line: lg.end + 1,
                    message: format!(
                        "Empty continuation line found in: {} (empty continuation lines will become errors in a future release)",
                        lg.text
                    ),
                });
            }
            let located = self.instruction(&mut lg)?;
            items.push(located);
        }
        self.finish(items)
    }

    /// Turns one logical line (plus any heredoc bodies after it) into an instruction.
    fn instruction(&mut self, lg: &mut Logical) -> Result<Located> {
        let heredocs = self.read_heredocs(lg)?;
        let text = std::mem::take(&mut lg.text);
        let parsed = self.parse_line(&text, &heredocs);
        lg.text = text;
        let kw_off = lg.text.len() - lg.text.trim_start().len();
        let instruction = parsed.map_err(|At(off, msg)| self.error_in(lg, off, msg))?;
        let (_, line, col) = lg.segs.first().copied().unwrap_or((0, lg.start, 0));
        let src = trim_newline(self.lines.get(line).copied().unwrap_or(""));
        let b = (col + kw_off).min(src.len());
        let column = src.get(..b).map(|s| s.chars().count()).unwrap_or(0) + 1;
        Ok(Located {
            instruction,
            span: Span {
                start_line: lg.start + 1,
                end_line: self.idx.max(lg.start + 1),
                column,
            },
            original: lg.text.trim().to_string(),
        })
    }

    /// Reads the bodies of the heredocs the line opens, consuming lines up to each
    /// delimiter.
    fn read_heredocs(&mut self, lg: &Logical) -> Result<Vec<Heredoc>> {
        if !self.may_have_heredocs(&lg.text) {
            return Ok(Vec::new());
        }
        let mut docs = heredocs_in_line(&lg.text);
        for doc in &mut docs {
            let mut content = String::new();
            let mut done = false;
            while self.idx < self.lines.len() {
                let raw = self.lines[self.idx];
                self.idx += 1;
                let mut candidate = trim_newline(raw);
                if doc.chomp {
                    candidate = candidate.trim_start_matches('\t');
                }
                if candidate == doc.name {
                    done = true;
                    break;
                }
                content.push_str(raw);
            }
            if !done {
                let off = lg.text.find("<<").unwrap_or(0);
                return Err(self.error_in(lg, off, "unterminated heredoc"));
            }
            doc.content = if doc.chomp {
                chomp_tabs(&content)
            } else {
                content
            };
        }
        Ok(docs)
    }

    /// Heredocs are only read for RUN, COPY and ADD (also under ONBUILD) in shell form.
    fn may_have_heredocs(&self, line: &str) -> bool {
        if !line.contains("<<") {
            return false;
        }
        let (mut cmd, mut rest) = split_keyword(line);
        if cmd.eq_ignore_ascii_case("onbuild") {
            let (_, r) = extract_flags(rest, self.escape);
            (cmd, rest) = split_keyword(r);
        }
        let cmd = cmd.to_ascii_lowercase();
        if !matches!(cmd.as_str(), "run" | "copy" | "add") {
            return false;
        }
        let (_, args) = extract_flags(rest, self.escape);
        !matches!(parse_json(args.trim()), Ok(Some(_)))
    }

    fn parse_line(&self, text: &str, heredocs: &[Heredoc]) -> PResult<Instruction> {
        let (cmd, rest) = split_keyword(text);
        let cmd_off = offset(text, cmd);
        let (flags, args) = extract_flags(rest, self.escape);
        let args = args.trim();
        let args_off = if args.is_empty() {
            text.trim_end().len()
        } else {
            offset(text, args)
        };
        let flags = Flags::new(flags, text);
        let lower = cmd.to_ascii_lowercase();
        let ins = match lower.as_str() {
            "from" => {
                let mut f = flags.spec(&[("platform", Kind::Str)])?;
                let words = split_ws(args);
                let name = match words.as_slice() {
                    [_] => None,
                    [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                        let lower = name.to_ascii_lowercase();
                        if !valid_stage_name(&lower) {
                            return Err(At(
                                offset(text, name),
                                format!(
                                    "invalid name for build stage: {name:?}, name can't start with a number or contain symbols"
                                ),
                            ));
                        }
                        Some(lower)
                    }
                    _ => {
                        return Err(At(
                            args_off,
                            "FROM requires either one or three arguments".into(),
                        ));
                    }
                };
                Instruction::From(From {
                    image: words[0].to_string(),
                    platform: f.string("platform"),
                    name,
                })
            }
            "run" => {
                let mut f = flags.spec(&[
                    ("mount", Kind::Strs),
                    ("network", Kind::Str),
                    ("security", Kind::Str),
                ])?;
                let mount_flags = f.strings("mount");
                let mut mounts = Vec::new();
                for (raw, off) in &mount_flags {
                    mounts.push(parse_mount(raw, None).map_err(|m| At(*off, m))?);
                }
                let network = match f.string_at("network") {
                    None => None,
                    Some((v, off)) => Some(match v.as_str() {
                        "default" => Network::Default,
                        "none" => Network::None,
                        "host" => Network::Host,
                        _ => return Err(At(off, format!("invalid network mode {v:?}"))),
                    }),
                };
                let security = match f.string_at("security") {
                    None => None,
                    Some((v, off)) => Some(match v.as_str() {
                        "insecure" => Security::Insecure,
                        "sandbox" => Security::Sandbox,
                        _ => return Err(At(off, format!("security {v:?} is not valid"))),
                    }),
                };
                Instruction::Run(Run {
                    command: maybe_json(args, args_off)?,
                    heredocs: heredocs.to_vec(),
                    mounts,
                    mount_flags: mount_flags.into_iter().map(|(s, _)| s).collect(),
                    network,
                    security,
                })
            }
            "cmd" => {
                flags.spec(&[])?;
                Instruction::Cmd(maybe_json(args, args_off)?)
            }
            "entrypoint" => {
                flags.spec(&[])?;
                Instruction::Entrypoint(maybe_json(args, args_off)?)
            }
            "shell" => {
                flags.spec(&[])?;
                match maybe_json(args, args_off)? {
                    CommandLine::Exec(v) if v.is_empty() => {
                        return Err(At(args_off, "SHELL requires at least one argument".into()));
                    }
                    CommandLine::Exec(v) => Instruction::Shell(v),
                    CommandLine::Shell(s) if s.is_empty() => {
                        return Err(At(args_off, "SHELL requires at least one argument".into()));
                    }
                    CommandLine::Shell(_) => {
                        return Err(At(
                            args_off,
                            "SHELL requires the arguments to be in JSON form".into(),
                        ));
                    }
                }
            }
            "env" | "label" => {
                flags.spec(&[])?;
                let name = if lower == "env" { "ENV" } else { "LABEL" };
                let kvs = self.name_values(args, text, name)?;
                if lower == "env" {
                    Instruction::Env(kvs)
                } else {
                    Instruction::Label(kvs)
                }
            }
            "maintainer" => {
                flags.spec(&[])?;
                if args.is_empty() {
                    return Err(At(
                        args_off,
                        "MAINTAINER requires exactly one argument".into(),
                    ));
                }
                Instruction::Maintainer(args.to_string())
            }
            "expose" => {
                flags.spec(&[])?;
                let ports = split_ws(args);
                if ports.is_empty() {
                    return Err(At(args_off, "EXPOSE requires at least one argument".into()));
                }
                for p in &ports {
                    // Ports holding variables are checked after expansion.
                    if !p.contains('$') {
                        PortSpec::parse(p).map_err(|m| At(offset(text, p), m))?;
                    }
                }
                Instruction::Expose(ports.iter().map(|s| s.to_string()).collect())
            }
            "add" | "copy" => {
                let is_add = lower == "add";
                let spec: &[(&str, Kind)] = if is_add {
                    &[
                        ("chown", Kind::Str),
                        ("chmod", Kind::Str),
                        ("link", Kind::Bool),
                        ("keep-git-dir", Kind::Bool),
                        ("checksum", Kind::Str),
                        ("unpack", Kind::Bool),
                        ("exclude", Kind::Strs),
                    ]
                } else {
                    &[
                        ("chown", Kind::Str),
                        ("from", Kind::Str),
                        ("chmod", Kind::Str),
                        ("link", Kind::Bool),
                        ("exclude", Kind::Strs),
                        ("parents", Kind::Bool),
                    ]
                };
                let mut f = flags.spec(spec)?;
                let name = if is_add { "ADD" } else { "COPY" };
                let files = sources_and_dest(args, args_off, text, heredocs, name)?;
                let exclude = f.strings("exclude").into_iter().map(|(s, _)| s).collect();
                if is_add {
                    Instruction::Add(Add {
                        files,
                        chown: f.string("chown"),
                        chmod: f.string("chmod"),
                        link: f.bool("link").unwrap_or(false),
                        exclude,
                        checksum: f.string("checksum"),
                        keep_git_dir: f.bool("keep-git-dir"),
                        unpack: f.bool("unpack"),
                    })
                } else {
                    Instruction::Copy(Copy {
                        files,
                        from: f.string("from"),
                        chown: f.string("chown"),
                        chmod: f.string("chmod"),
                        link: f.bool("link").unwrap_or(false),
                        parents: f.bool("parents").unwrap_or(false),
                        exclude,
                    })
                }
            }
            "volume" => {
                flags.spec(&[])?;
                let list = json_or_words(args, args_off)?;
                if list.is_empty() {
                    return Err(At(args_off, "VOLUME requires at least one argument".into()));
                }
                let mut out = Vec::new();
                for v in list {
                    let v = v.trim();
                    if v.is_empty() {
                        return Err(At(
                            args_off,
                            "VOLUME specified can not be an empty string".into(),
                        ));
                    }
                    out.push(v.to_string());
                }
                Instruction::Volume(out)
            }
            "user" | "workdir" | "stopsignal" => {
                flags.spec(&[])?;
                if args.is_empty() {
                    return Err(At(
                        args_off,
                        format!("{} requires exactly one argument", lower.to_uppercase()),
                    ));
                }
                let v = args.to_string();
                match lower.as_str() {
                    "user" => Instruction::User(v),
                    "workdir" => Instruction::Workdir(v),
                    _ => Instruction::StopSignal(v),
                }
            }
            "arg" => {
                flags.spec(&[])?;
                let words = parse_words(args, self.escape);
                if words.is_empty() {
                    return Err(At(args_off, "ARG requires at least one argument".into()));
                }
                let mut out = Vec::new();
                for (w, off) in words {
                    let (name, default) = match w.split_once('=') {
                        Some((k, v)) => (k.to_string(), Some(v.to_string())),
                        None => (w.clone(), None),
                    };
                    if name.is_empty() {
                        return Err(At(args_off + off, "ARG names can not be blank".into()));
                    }
                    out.push(ArgDecl { name, default });
                }
                Instruction::Arg(out)
            }
            "onbuild" => {
                flags.spec(&[])?;
                if args.is_empty() {
                    return Err(At(
                        args_off,
                        "ONBUILD requires at least one argument".into(),
                    ));
                }
                let (sub, _) = split_keyword(args);
                let sub_up = sub.to_ascii_uppercase();
                match sub_up.as_str() {
                    "ONBUILD" => {
                        return Err(At(
                            args_off,
                            "Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed".into(),
                        ));
                    }
                    "MAINTAINER" | "FROM" => {
                        return Err(At(
                            args_off,
                            format!("{sub_up} isn't allowed as an ONBUILD trigger"),
                        ));
                    }
                    _ => {}
                }
                let inner = self
                    .parse_line(args, heredocs)
                    .map_err(|At(o, m)| At(args_off + o, m))?;
                let mut expression = args.to_string();
                for h in heredocs {
                    expression.push('\n');
                    expression.push_str(&h.content);
                    expression.push_str(&h.name);
                }
                Instruction::Onbuild(Onbuild {
                    expression,
                    instruction: Box::new(inner),
                })
            }
            "healthcheck" => self.healthcheck(args, args_off, text, flags)?,
            _ => return Err(At(cmd_off, format!("unknown instruction: {cmd}"))),
        };
        Ok(ins)
    }

    fn healthcheck(
        &self,
        args: &str,
        args_off: usize,
        text: &str,
        flags: Flags,
    ) -> PResult<Instruction> {
        let typ_end = args.find(char::is_whitespace).unwrap_or(args.len());
        let typ = &args[..typ_end];
        if typ.is_empty() {
            return Err(At(
                args_off,
                "HEALTHCHECK requires at least one argument".into(),
            ));
        }
        let rest = args[typ_end..].trim_start();
        let rest_off = if rest.is_empty() {
            text.trim_end().len()
        } else {
            offset(text, rest)
        };
        let upper = typ.to_ascii_uppercase();
        if upper == "NONE" {
            if !rest.is_empty() {
                return Err(At(rest_off, "HEALTHCHECK NONE takes no arguments".into()));
            }
            if let Some((_, off)) = flags.raw.first() {
                return Err(At(*off, "HEALTHCHECK NONE takes no arguments".into()));
            }
            return Ok(Instruction::Healthcheck(Healthcheck::None));
        }
        let mut f = flags.spec(&[
            ("interval", Kind::Str),
            ("timeout", Kind::Str),
            ("start-period", Kind::Str),
            ("start-interval", Kind::Str),
            ("retries", Kind::Str),
        ])?;
        if upper != "CMD" {
            return Err(At(
                args_off,
                format!("Unknown type {typ:?} in HEALTHCHECK (try CMD)"),
            ));
        }
        let command = maybe_json(rest, rest_off)?;
        let empty = match &command {
            CommandLine::Exec(v) => v.is_empty(),
            CommandLine::Shell(s) => s.is_empty(),
        };
        if empty {
            return Err(At(rest_off, "Missing command after HEALTHCHECK CMD".into()));
        }
        let mut dur = |name: &str| -> PResult<Option<Duration>> {
            let Some((v, off)) = f.string_at(name) else {
                return Ok(None);
            };
            let d = parse_go_duration(&v).map_err(|m| At(off, m))?;
            if d.is_none() {
                return Ok(None);
            }
            match d {
                Some(d) if d >= Duration::from_millis(1) => Ok(Some(d)),
                _ => Err(At(
                    off,
                    format!("Interval {name:?} cannot be less than 1ms"),
                )),
            }
        };
        let interval = dur("interval")?;
        let timeout = dur("timeout")?;
        let start_period = dur("start-period")?;
        let start_interval = dur("start-interval")?;
        let retries = match f.string_at("retries") {
            None => None,
            Some((v, off)) => match v.parse::<i64>() {
                Ok(n) if n < 0 => {
                    return Err(At(off, format!("--retries cannot be negative ({n})")));
                }
                Ok(n) => Some(
                    u32::try_from(n)
                        .map_err(|_| At(off, format!("--retries value out of range: {v}")))?,
                ),
                Err(_) => {
                    return Err(At(off, format!("invalid value for --retries: {v:?}")));
                }
            },
        };
        Ok(Instruction::Healthcheck(Healthcheck::Check {
            command,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        }))
    }

    /// ENV/LABEL arguments: `k=v ...` or the legacy `k v` form.
    fn name_values(&self, args: &str, text: &str, name: &str) -> PResult<Vec<KeyValue>> {
        let words = parse_words(args, self.escape);
        let base = if args.is_empty() {
            text.trim_end().len()
        } else {
            offset(text, args)
        };
        let Some((first, _)) = words.first() else {
            return Err(At(base, format!("{name} requires at least one argument")));
        };
        if !first.contains('=') {
            // Legacy `ENV key value with spaces`: the rest of the line is the value.
            let Some(split) = args.find(is_sep) else {
                return Err(At(base, format!("{name} must have two arguments")));
            };
            let key = &args[..split];
            let value = args[split..].trim_start_matches(is_sep);
            return Ok(vec![KeyValue {
                key: key.to_string(),
                value: value.to_string(),
            }]);
        }
        let mut out = Vec::new();
        for (w, off) in words {
            let Some((k, v)) = w.split_once('=') else {
                return Err(At(
                    base + off,
                    format!(
                        "Syntax error - can't find = in {w:?}. Must be of the form: name=value"
                    ),
                ));
            };
            if k.is_empty() {
                return Err(At(base + off, format!("{name} names can not be blank")));
            }
            out.push(KeyValue {
                key: k.to_string(),
                value: v.to_string(),
            });
        }
        Ok(out)
    }

    fn finish(self, items: Vec<Located>) -> Result<Dockerfile> {
        let lines: Vec<String> = self
            .lines
            .iter()
            .map(|l| trim_newline(l).to_string())
            .collect();
        let mut df = Dockerfile {
            file: self.file.to_string(),
            directives: self.directives,
            meta_args: Vec::new(),
            stages: Vec::new(),
            warnings: self.warnings,
            lines,
        };
        if items.is_empty() {
            let line = df.lines.len().max(1);
            return Err(df.diagnostic(line, 1, "file with no instructions".into()));
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        for item in items {
            match &item.instruction {
                Instruction::From(from) => {
                    if let Some(name) = &from.name
                        && names.insert(name.clone(), df.stages.len()).is_some()
                    {
                        return Err(df.diagnostic(
                            item.span.start_line,
                            item.span.column,
                            format!("duplicate stage name {name:?}"),
                        ));
                    }
                    df.stages.push(Stage {
                        index: df.stages.len(),
                        name: from.name.clone(),
                        base: from.image.clone(),
                        platform: from.platform.clone(),
                        from: item.clone(),
                        instructions: Vec::new(),
                    });
                }
                other => match df.stages.last_mut() {
                    Some(stage) => stage.instructions.push(item),
                    None if matches!(other, Instruction::Arg(_)) => df.meta_args.push(item),
                    None => {
                        return Err(df.diagnostic(
                            item.span.start_line,
                            item.span.column,
                            format!(
                                "no build stage in current context: {} must come after FROM",
                                other.keyword()
                            ),
                        ));
                    }
                },
            }
        }
        if df.stages.is_empty() {
            return Err(df.diagnostic(1, 1, "dockerfile contains no stages to build".into()));
        }
        Ok(df)
    }
}

/// A Dockerfile that is not UTF-8 is refused at its first bad byte (BuildKit refuses it too),
/// never read with replacement characters that would then run.
fn invalid_utf8(file: &str, text: &[u8], at: usize) -> Error {
    let before = String::from_utf8_lossy(&text[..at]);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line_end = text[at..]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(text.len(), |i| at + i);
    let source_line = String::from_utf8_lossy(&text[..line_end])[line_start..].to_string();
    Error::Syntax(Box::new(crate::error::Diagnostic {
        file: file.to_string(),
        line,
        column,
        message: format!(
            "invalid UTF-8 (byte 0x{:02x}): a Dockerfile must be UTF-8 text",
            text[at]
        ),
        source_line,
    }))
}

fn parse_check(value: &str) -> std::result::Result<CheckDirective, String> {
    let mut check = CheckDirective::default();
    for part in value.split(';') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((k, v)) = part.split_once('=') else {
            return Err(format!(
                "invalid check directive {part:?}: expected key=value"
            ));
        };
        match k.trim().to_ascii_lowercase().as_str() {
            "skip" => {
                check.skip = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
            }
            "error" => {
                check.error = match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(format!(
                            "invalid check directive: error={v:?} is not a boolean"
                        ));
                    }
                };
            }
            other => return Err(format!("invalid check directive: unknown key {other:?}")),
        }
    }
    Ok(check)
}

fn chomp_tabs(s: &str) -> String {
    s.split_inclusive('\n')
        .map(|l| l.trim_start_matches('\t'))
        .collect()
}

fn offset(whole: &str, part: &str) -> usize {
    (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize)
}

fn valid_stage_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
}

/// Keyword and the rest, like Docker's `splitCommand` before flag extraction.
fn split_keyword(line: &str) -> (&str, &str) {
    let t = line.trim();
    match t.find(is_sep) {
        Some(i) => (&t[..i], t[i..].trim_start_matches(is_sep)),
        None => (t, ""),
    }
}

fn split_ws(s: &str) -> Vec<&str> {
    s.split(is_sep).filter(|w| !w.is_empty()).collect()
}

/// Pulls the leading `--flag[=value]` words off `line` (quotes and escapes processed);
/// returns them with their offsets in `line`, and the remaining text.
fn extract_flags(line: &str, escape: char) -> (Vec<(String, usize)>, &str) {
    let mut flags = Vec::new();
    let mut chars = line.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return (flags, "");
        };
        if !line[start..].starts_with("--") {
            return (flags, &line[start..]);
        }
        let mut word = String::new();
        let mut quote: Option<char> = None;
        let mut end = line.len();
        while let Some((i, c)) = chars.next() {
            match quote {
                None if c.is_whitespace() => {
                    end = i;
                    break;
                }
                None if c == '\'' || c == '"' => quote = Some(c),
                Some(q) if c == q => quote = None,
                _ if c == escape => {
                    if let Some((_, n)) = chars.next() {
                        word.push(n);
                    } else if quote.is_some() {
                        quote = None;
                    }
                }
                _ => word.push(c),
            }
        }
        // A bare `--` ends the flags.
        if word == "--" {
            return (flags, &line[end.min(line.len())..]);
        }
        flags.push((word, start));
    }
}

/// Docker's `parseWords`: split on whitespace, keeping quotes and escapes in the words
/// (they are removed at expansion). Offsets are relative to `rest`.
fn parse_words(rest: &str, escape: char) -> Vec<(String, usize)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut start = 0;
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut blank_ok = false;
    let mut it = rest.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if !in_word {
            if c.is_whitespace() {
                continue;
            }
            in_word = true;
            start = i;
        }
        match quote {
            None => {
                if c.is_whitespace() {
                    if blank_ok || !word.is_empty() {
                        words.push((std::mem::take(&mut word), start));
                    }
                    word.clear();
                    in_word = false;
                    blank_ok = false;
                    continue;
                }
                if c == '\'' || c == '"' {
                    quote = Some(c);
                    blank_ok = true;
                }
                if c == escape {
                    match it.next() {
                        None => continue,
                        Some((_, n)) => {
                            word.push(c);
                            word.push(n);
                            continue;
                        }
                    }
                }
                word.push(c);
            }
            Some(q) => {
                if c == q {
                    quote = None;
                }
                if c == escape && q != '\'' {
                    match it.next() {
                        None => {
                            quote = None;
                            continue;
                        }
                        Some((_, n)) => {
                            word.push(c);
                            word.push(n);
                            continue;
                        }
                    }
                }
                word.push(c);
            }
        }
    }
    if in_word && (blank_ok || !word.is_empty()) {
        words.push((word, start));
    }
    words
}

/// `Ok(Some)` for a JSON array of strings, `Ok(None)` when not JSON (shell form), and an
/// error for a JSON array with non-strings (Docker refuses that instead of falling back).
fn parse_json(s: &str) -> std::result::Result<Option<Vec<String>>, String> {
    let s = s.trim_start();
    if !s.starts_with('[') {
        return Ok(None);
    }
    let Ok(values) = serde_json::from_str::<Vec<serde_json::Value>>(s) else {
        return Ok(None);
    };
    values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(s),
            _ => {
                Err("when using JSON array syntax, arrays must be comprised of strings only".into())
            }
        })
        .collect::<std::result::Result<Vec<_>, String>>()
        .map(Some)
}

fn maybe_json(args: &str, off: usize) -> PResult<CommandLine> {
    match parse_json(args).map_err(|m| At(off, m))? {
        Some(v) => Ok(CommandLine::Exec(v)),
        None => Ok(CommandLine::Shell(args.to_string())),
    }
}

fn json_or_words(args: &str, off: usize) -> PResult<Vec<String>> {
    match parse_json(args).map_err(|m| At(off, m))? {
        Some(v) => Ok(v),
        None => Ok(split_ws(args).into_iter().map(str::to_string).collect()),
    }
}

fn sources_and_dest(
    args: &str,
    args_off: usize,
    text: &str,
    heredocs: &[Heredoc],
    name: &str,
) -> PResult<SourcesAndDest> {
    let json = parse_json(args).map_err(|m| At(args_off, m))?;
    let is_json = json.is_some();
    let list: Vec<(String, usize)> = match json {
        Some(v) => v.into_iter().map(|s| (s, args_off)).collect(),
        None => split_ws(args)
            .into_iter()
            .map(|w| (w.to_string(), offset(text, w)))
            .collect(),
    };
    let Some(((dest, dest_off), srcs)) = list.split_last() else {
        return Err(At(
            args_off,
            format!(
                "{name} requires at least two arguments, but only one was provided. Destination could not be determined"
            ),
        ));
    };
    if srcs.is_empty() {
        return Err(At(
            args_off,
            format!(
                "{name} requires at least two arguments, but only one was provided. Destination could not be determined"
            ),
        ));
    }
    if heredoc_word(dest).is_some() {
        return Err(At(
            *dest_off,
            format!("{name} cannot accept a heredoc as a destination"),
        ));
    }
    let mut sources = Vec::new();
    let mut docs = Vec::new();
    for (src, _) in srcs {
        match heredoc_word(src) {
            Some(h) if !is_json => {
                let content = heredocs
                    .iter()
                    .find(|d| d.name == h.name)
                    .map(|d| d.content.clone())
                    .unwrap_or_default();
                docs.push(Heredoc { content, ..h });
            }
            _ => sources.push(src.clone()),
        }
    }
    Ok(SourcesAndDest {
        sources,
        heredocs: docs,
        dest: dest.clone(),
        json: is_json,
    })
}

/// The heredocs a line opens, in order (bodies not read yet).
fn heredocs_in_line(line: &str) -> Vec<Heredoc> {
    // Heredoc detection always uses `\`, whatever the escape directive says (BuildKit does
    // the same), and must see quotes and escapes as written.
    let lx = Lexer {
        escape: '\\',
        raw_quotes: true,
        raw_escapes: true,
        skip_unset: true,
        skip_quotes: false,
    };
    let Ok(p) = lx.process(line, &EmptyEnv) else {
        return Vec::new();
    };
    p.words.iter().filter_map(|w| heredoc_word(w)).collect()
}

/// Recognises one heredoc word: `[fd]<<[-]["']NAME["']`.
pub(crate) fn heredoc_word(word: &str) -> Option<Heredoc> {
    let digits = word.len() - word.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let rest = word[digits..].strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let rest = rest.trim_start_matches([' ', '\t', '\n', '\x0c', '\r']);
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let fd = word[..digits].parse::<u32>().unwrap_or(0);
    let mut lx = Lexer::new('\\');
    lx.skip_unset = true;
    let plain = lx.process(rest, &EmptyEnv).ok()?.words;
    if plain.len() != 1 {
        return None;
    }
    lx.raw_quotes = true;
    let raw = lx.process(rest, &EmptyEnv).ok()?.words;
    if raw.len() != 1 {
        return None;
    }
    let quotes = |s: &str| s.chars().filter(|c| *c == '\'' || *c == '"').count();
    Some(Heredoc {
        name: plain[0].clone(),
        content: String::new(),
        expand: quotes(&plain[0]) == quotes(&raw[0]),
        chomp,
        fd,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bool,
    Str,
    Strs,
}

/// Raw `--flags` of one instruction.
struct Flags<'a> {
    raw: Vec<(String, usize)>,
    text: &'a str,
}

/// Flags checked against what an instruction accepts.
struct FlagValues {
    values: HashMap<String, Vec<(String, usize)>>,
}

impl<'a> Flags<'a> {
    fn new(raw: Vec<(String, usize)>, text: &'a str) -> Self {
        // Offsets from extract_flags are relative to the text after the keyword.
        let (_, rest) = split_keyword(text);
        let base = offset(text, rest);
        Flags {
            raw: raw.into_iter().map(|(s, o)| (s, o + base)).collect(),
            text,
        }
    }

    fn spec(&self, spec: &[(&str, Kind)]) -> PResult<FlagValues> {
        let _ = self.text;
        let mut values: HashMap<String, Vec<(String, usize)>> = HashMap::new();
        for (arg, off) in &self.raw {
            let off = *off;
            let Some(body) = arg.strip_prefix("--") else {
                return Err(At(off, format!("arg should start with -- : {arg}")));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some((_, kind)) = spec.iter().find(|(n, _)| *n == name) else {
                return Err(At(off, format!("unknown flag: --{name}")));
            };
            let entry = values.entry(name.to_string()).or_default();
            if !entry.is_empty() && *kind != Kind::Strs {
                return Err(At(off, format!("duplicate flag specified: --{name}")));
            }
            let v = match (kind, value) {
                (Kind::Bool, Some("")) => {
                    return Err(At(off, format!("missing a value on flag: --{name}")));
                }
                (Kind::Bool, None) => "true".to_string(),
                (Kind::Bool, Some(v)) => match v.to_ascii_lowercase().as_str() {
                    "true" => "true".to_string(),
                    "false" => "false".to_string(),
                    _ => {
                        return Err(At(
                            off,
                            format!("expecting boolean value for flag --{name}, not: {v}"),
                        ));
                    }
                },
                (_, None) => return Err(At(off, format!("missing a value on flag: --{name}"))),
                (_, Some(v)) => v.to_string(),
            };
            entry.push((v, off));
        }
        Ok(FlagValues { values })
    }
}

impl FlagValues {
    fn string_at(&mut self, name: &str) -> Option<(String, usize)> {
        self.values.remove(name).and_then(|mut v| v.pop())
    }
    fn string(&mut self, name: &str) -> Option<String> {
        self.string_at(name).map(|(s, _)| s)
    }
    fn strings(&mut self, name: &str) -> Vec<(String, usize)> {
        self.values.remove(name).unwrap_or_default()
    }
    fn bool(&mut self, name: &str) -> Option<bool> {
        self.string(name).map(|s| s == "true")
    }
}

/// Go's `time.ParseDuration`; `Ok(None)` for zero (which Docker treats as unset).
pub(crate) fn parse_go_duration(s: &str) -> std::result::Result<Option<Duration>, String> {
    let bad = || format!("time: invalid duration {s:?}");
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok(None);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num = &rest[..num_len];
        if num.is_empty() || num == "." {
            return Err(bad());
        }
        let n: f64 = num.parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(format!("time: missing unit in duration {s:?}")),
            _ => return Err(format!("time: unknown unit {unit:?} in duration {s:?}")),
        };
        total += n * scale;
    }
    if !total.is_finite() || total > 9.2e9 {
        return Err(bad());
    }
    if neg && total > 0.0 {
        // Negative durations are below Docker's 1ms minimum.
        return Ok(Some(Duration::ZERO));
    }
    if total == 0.0 {
        return Ok(None);
    }
    Ok(Some(Duration::from_secs_f64(total)))
}
