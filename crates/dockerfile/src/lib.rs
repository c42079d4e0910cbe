//! Turns Dockerfile text into typed data: lexer, parser, typed instructions, variable
//! expansion and `.dockerignore` matching; it never executes anything.
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
pub use ignore::{IgnoreMatcher, clean_path, find_ignore_file};
pub use instruction::*;
pub use lex::{EmptyEnv, Env, Lexer};
pub use parser::{CheckDirective, Directives, Dockerfile, Stage, Warning};
pub use scope::{BUILTIN_ARGS, ExpandedFrom, StageScope};
