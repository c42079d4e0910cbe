//! Turns Dockerfile text into typed data: lexer, parser, typed instructions, variable
//! expansion and `.dockerignore` matching; it never executes anything.
//!
//! - [`Dockerfile::parse`] follows the Dockerfile reference and BuildKit's parser: parser
//!   directives (`escape`, `syntax`, `check`), comments, line continuations, heredocs,
//!   exec/shell forms and every instruction with its flags. Instructions keep their
//!   arguments as written (quotes included), grouped into [`Stage`]s with [`Span`]s;
//!   `ARG`s before the first `FROM` are [`Dockerfile::meta_args`].
//! - Errors are [`Error::Syntax`] with a [`Diagnostic`] that renders `file:line:col`, the
//!   line and a caret.
//! - Expansion is done by the build engine, instruction by instruction: [`Dockerfile::expand_from`]
//!   for `FROM`, and a [`StageScope`] that expands what Docker expands and tracks `ARG`/`ENV`.
//!   [`Lexer`] is the underlying word processor (`$V`, `${V:-x}`, quotes, escapes).
//! - [`IgnoreMatcher`] answers `.dockerignore` questions with moby/patternmatcher's rules.
//!
//! ```
//! use strata_dockerfile::{Dockerfile, Instruction, lex::EmptyEnv};
//!
//! let df = Dockerfile::parse("Dockerfile", "ARG V=3.20\nFROM alpine:$V AS base\nRUN echo hi\n").unwrap();
//! assert_eq!(df.stages[0].name.as_deref(), Some("base"));
//! assert_eq!(df.expand_from(0, &EmptyEnv).unwrap().base, "alpine:3.20");
//! assert!(matches!(df.stages[0].instructions[0].instruction, Instruction::Run(_)));
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod dump;
mod error;
pub mod ignore;
mod instruction;
pub mod lex;
mod mount;
mod parser;
mod scope;

pub use error::{Diagnostic, Error, Result};
pub use ignore::{IgnoreMatcher, clean_path, find_ignore_file, is_clean};
pub use instruction::*;
pub use lex::{EmptyEnv, Env, Lexer};
pub use parser::{CheckDirective, Directives, Dockerfile, Stage, Warning};
pub use scope::{BUILTIN_ARGS, ExpandedFrom, StageScope};
