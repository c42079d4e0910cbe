//! Variable scoping and expansion of instructions, as the build engine needs them.
//!
//! Rules (Dockerfile reference, "Scope" and "Environment replacement", and BuildKit's
//! dispatcher): `ARG`s before the first `FROM` are global and visible only to `FROM` lines;
//! inside a stage, `ARG name` without a default imports the global value; a `--build-arg`
//! overrides any `ARG` default; `ARG` and `ENV` assign in order, so an `ENV` overrides an
//! earlier `ARG` of the same name (and a later `ARG` overrides an earlier `ENV`, as in
//! BuildKit). Only ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME and WORKDIR
//! are expanded by the builder; RUN, CMD and ENTRYPOINT are left to the shell.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::instruction::*;
use crate::lex::{Env, Lexer};
use crate::mount::parse_mount;
use crate::parser::Dockerfile;

/// Arguments BuildKit defines in the global scope without an `ARG` line; the engine
/// passes their values in `build_args`.
pub const BUILTIN_ARGS: &[&str] = &[
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
    "TARGETSTAGE",
];

/// A stage's `FROM` after expansion with the global `ARG`s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandedFrom {
    /// Base image reference or stage name.
    pub base: String,
    /// `--platform`, expanded.
    pub platform: Option<String>,
    /// Stage name.
    pub name: Option<String>,
}

impl Dockerfile {
    /// The lexer for this file (its escape character).
    pub fn lexer(&self) -> Lexer {
        Lexer::new(self.directives.escape)
    }

    /// Values of the global `ARG`s in order: a build argument wins, else the default
    /// (expanded with the globals before it); an `ARG` with neither stays unset. The
    /// platform arguments ([`BUILTIN_ARGS`]) are global without a declaration when
    /// `build_args` provides them, as BuildKit predefines them.
    pub fn global_args(&self, build_args: &dyn Env) -> Result<Vec<(String, String)>> {
        let lx = self.lexer();
        let mut globals = Vars::default();
        for k in BUILTIN_ARGS {
            if let Some(v) = build_args.lookup(k) {
                globals.set(k, v);
            }
        }
        for loc in &self.meta_args {
            let Instruction::Arg(decls) = &loc.instruction else {
                continue;
            };
            for d in decls {
                let value = match build_args.lookup(&d.name) {
                    Some(v) => Some(v),
                    None => match &d.default {
                        Some(def) => {
                            Some(lx.expand_word(def, &globals).map_err(|m| self.at(loc, m))?)
                        }
                        None => None,
                    },
                };
                if let Some(v) = value {
                    globals.set(&d.name, v);
                }
            }
        }
        Ok(globals.list)
    }

    /// Expands stage `index`'s `FROM` (image and `--platform`) with the global `ARG`s.
    pub fn expand_from(&self, index: usize, build_args: &dyn Env) -> Result<ExpandedFrom> {
        let stage = self.stages.get(index).ok_or_else(|| Error::Expand {
            word: index.to_string(),
            message: format!("no stage {index}: the file has {}", self.stages.len()),
        })?;
        let globals = self.global_args(build_args)?;
        let lx = self.lexer();
        let base = lx
            .expand_word(&stage.base, &globals)
            .map_err(|m| self.at(&stage.from, m))?;
        if base.is_empty() {
            return Err(self.at(
                &stage.from,
                format!("base name ({}) should not be blank", stage.base),
            ));
        }
        let platform = match &stage.platform {
            None => None,
            Some(p) => Some(
                lx.expand_word(p, &globals)
                    .map_err(|m| self.at(&stage.from, m))?,
            ),
        };
        Ok(ExpandedFrom {
            base,
            platform,
            name: stage.name.clone(),
        })
    }

    /// A fresh variable scope for stage `index`.
    pub fn stage_scope<'a>(&self, index: usize, build_args: &'a dyn Env) -> Result<StageScope<'a>> {
        if index >= self.stages.len() {
            return Err(Error::Expand {
                word: index.to_string(),
                message: format!("no stage {index}: the file has {}", self.stages.len()),
            });
        }
        Ok(StageScope {
            lexer: self.lexer(),
            build_args,
            globals: Vars::from_list(self.global_args(build_args)?),
            vars: Vars::default(),
            env: Vars::default(),
            args: Vars::default(),
        })
    }

    pub(crate) fn at(&self, loc: &Located, message: String) -> Error {
        self.diagnostic(loc.span.start_line, loc.span.column, message)
    }
}

/// Variables in the order they were first set, with an index by name: setting and looking
/// up one variable costs the same however many there are (an `ENV` of 40,000 pairs must not
/// take a scan per pair).
#[derive(Debug, Default)]
struct Vars {
    list: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl Vars {
    fn from_list(pairs: Vec<(String, String)>) -> Vars {
        let mut v = Vars::default();
        for (k, value) in pairs {
            v.set(&k, value);
        }
        v
    }

    /// Sets `key`; a variable set before keeps its place, a new one goes last.
    fn set(&mut self, key: &str, value: String) {
        match self.index.get(key) {
            Some(&i) => self.list[i].1 = value,
            None => {
                self.index.insert(key.to_string(), self.list.len());
                self.list.push((key.to_string(), value));
            }
        }
    }
}

impl Env for Vars {
    fn lookup(&self, name: &str) -> Option<String> {
        self.index.get(name).map(|&i| self.list[i].1.clone())
    }
}

/// The variables in effect while walking one stage's instructions.
pub struct StageScope<'a> {
    lexer: Lexer,
    build_args: &'a dyn Env,
    globals: Vars,
    /// Everything visible to expansion, in assignment order (ENV and ARG alike).
    vars: Vars,
    /// `ENV` values (base image first), for the image config.
    env: Vars,
    /// `ARG` values in effect (for RUN's environment and cache keys).
    args: Vars,
}

impl Env for StageScope<'_> {
    fn lookup(&self, name: &str) -> Option<String> {
        self.vars.lookup(name)
    }
}

impl<'a> StageScope<'a> {
    /// Seeds the scope with the base image's `Env` (`KEY=VALUE` strings from its config).
    pub fn with_base_env<S: AsRef<str>>(mut self, base_env: &[S]) -> Self {
        for kv in base_env {
            let (k, v) = kv.as_ref().split_once('=').unwrap_or((kv.as_ref(), ""));
            self.env.set(k, v.to_string());
            self.vars.set(k, v.to_string());
        }
        self
    }

    /// `ENV` values so far, for the image config.
    pub fn env(&self) -> &[(String, String)] {
        &self.env.list
    }

    /// `ARG` values in effect, for `RUN`'s environment.
    pub fn args(&self) -> &[(String, String)] {
        &self.args.list
    }

    /// Expands one word with the current variables (`ProcessWord`).
    pub fn expand_word(&self, word: &str) -> Result<String> {
        self.lexer
            .expand_word(word, &self.vars)
            .map_err(|message| Error::Expand {
                word: word.to_string(),
                message,
            })
    }

    /// Expands `ins` with the current variables without recording anything: the
    /// instructions the builder expands come back expanded, the others unchanged.
    pub fn expand(&self, ins: &Instruction) -> std::result::Result<Instruction, String> {
        let w = |s: &str| self.lexer.expand_word(s, &self.vars);
        let opt = |s: &Option<String>| -> std::result::Result<Option<String>, String> {
            s.as_deref().map(w).transpose()
        };
        let list = |v: &[String]| -> std::result::Result<Vec<String>, String> {
            v.iter().map(|s| w(s)).collect()
        };
        let kvs = |v: &[KeyValue]| -> std::result::Result<Vec<KeyValue>, String> {
            v.iter()
                .map(|kv| {
                    Ok(KeyValue {
                        key: w(&kv.key)?,
                        value: w(&kv.value)?,
                    })
                })
                .collect()
        };
        let files = |f: &SourcesAndDest| -> std::result::Result<SourcesAndDest, String> {
            let mut heredocs = Vec::new();
            for h in &f.heredocs {
                let mut h = h.clone();
                if h.expand {
                    // Heredoc bodies keep their quotes: only variables are replaced.
                    let mut lx = Lexer::new('\\');
                    lx.skip_quotes = true;
                    h.content = lx.expand_word(&h.content, &self.vars)?;
                }
                heredocs.push(h);
            }
            Ok(SourcesAndDest {
                sources: list(&f.sources)?,
                heredocs,
                dest: w(&f.dest)?,
                json: f.json,
            })
        };
        Ok(match ins {
            Instruction::Env(v) => Instruction::Env(kvs(v)?),
            Instruction::Label(v) => Instruction::Label(kvs(v)?),
            Instruction::Expose(ports) => {
                let mut out = Vec::new();
                for p in ports {
                    for e in self.lexer.expand_words(p, &self.vars)? {
                        // One entry per port, as the config records it.
                        out.extend(PortSpec::parse(&e)?.exposed_keys());
                    }
                }
                Instruction::Expose(out)
            }
            Instruction::Volume(v) => Instruction::Volume(list(v)?),
            Instruction::User(s) => Instruction::User(w(s)?),
            Instruction::Workdir(s) => Instruction::Workdir(w(s)?),
            Instruction::StopSignal(s) => Instruction::StopSignal(w(s)?),
            Instruction::Copy(c) => Instruction::Copy(Copy {
                files: files(&c.files)?,
                from: opt(&c.from)?,
                chown: opt(&c.chown)?,
                chmod: opt(&c.chmod)?,
                link: c.link,
                parents: c.parents,
                exclude: list(&c.exclude)?,
            }),
            Instruction::Add(a) => Instruction::Add(Add {
                files: files(&a.files)?,
                chown: opt(&a.chown)?,
                chmod: opt(&a.chmod)?,
                link: a.link,
                exclude: list(&a.exclude)?,
                checksum: opt(&a.checksum)?,
                keep_git_dir: a.keep_git_dir,
                unpack: a.unpack,
            }),
            Instruction::Run(r) => {
                // The command is the shell's business; mount options are expanded.
                let mut r = r.clone();
                r.mounts = self.mounts(&r)?;
                Instruction::Run(r)
            }
            other => other.clone(),
        })
    }

    /// `RUN --mount` options re-parsed with variables expanded.
    pub fn mounts(&self, run: &Run) -> std::result::Result<Vec<Mount>, String> {
        let f = |s: &str| self.lexer.expand_word(s, &self.vars);
        run.mount_flags
            .iter()
            .map(|raw| parse_mount(raw, Some(&f)))
            .collect()
    }

    /// Expands `loc` and records what it assigns (`ARG`, `ENV`); returns the expanded
    /// instruction. Errors carry the instruction's place in `df`.
    pub fn apply(&mut self, df: &Dockerfile, loc: &Located) -> Result<Instruction> {
        match &loc.instruction {
            Instruction::Arg(decls) => {
                let mut out = Vec::new();
                for d in decls {
                    let value = match self.build_args.lookup(&d.name) {
                        Some(v) => Some(v),
                        None => match &d.default {
                            Some(def) => Some(
                                self.lexer
                                    .expand_word(def, &self.vars)
                                    .map_err(|m| df.at(loc, m))?,
                            ),
                            None => self.globals.lookup(&d.name),
                        },
                    };
                    if let Some(v) = &value {
                        self.vars.set(&d.name, v.clone());
                        self.args.set(&d.name, v.clone());
                    }
                    out.push(ArgDecl {
                        name: d.name.clone(),
                        default: value,
                    });
                }
                Ok(Instruction::Arg(out))
            }
            other => {
                let expanded = self.expand(other).map_err(|m| df.at(loc, m))?;
                if let Instruction::Env(kvs) = &expanded {
                    for kv in kvs {
                        self.vars.set(&kv.key, kv.value.clone());
                        self.env.set(&kv.key, kv.value.clone());
                    }
                }
                Ok(expanded)
            }
        }
    }
}
