//! A stable text rendering of a parsed Dockerfile, for golden tests and debugging.

use std::fmt::Write;

use crate::instruction::{Instruction, Located};
use crate::lex::{EmptyEnv, Env};
use crate::parser::Dockerfile;

fn lines(span: &crate::instruction::Span) -> String {
    if span.start_line == span.end_line {
        format!("L{}", span.start_line)
    } else {
        format!("L{}-{}", span.start_line, span.end_line)
    }
}

fn item(out: &mut String, loc: &Located) {
    let _ = writeln!(
        out,
        "  {}:{} {:?}",
        lines(&loc.span),
        loc.span.column,
        loc.instruction
    );
}

/// Renders `df`: directives, warnings, global ARGs, then each stage with its instructions
/// as written and, below any instruction that expansion changes, its expanded form (using
/// `build_args` and the defaults in the file).
pub fn dump(df: &Dockerfile, build_args: &dyn Env) -> String {
    let mut out = String::new();
    let d = &df.directives;
    let _ = writeln!(
        out,
        "directives: escape={:?} syntax={:?} check={:?}",
        d.escape, d.syntax, d.check
    );
    for w in &df.warnings {
        let _ = writeln!(out, "warning L{}: {}", w.line, w.message);
    }
    if !df.meta_args.is_empty() {
        let _ = writeln!(out, "meta_args:");
        for a in &df.meta_args {
            item(&mut out, a);
        }
        match df.global_args(build_args) {
            Ok(g) => {
                let _ = writeln!(out, "  => {g:?}");
            }
            Err(e) => {
                let _ = writeln!(out, "  => error: {e}");
            }
        }
    }
    for stage in &df.stages {
        let _ = writeln!(
            out,
            "stage {} name={:?} base={:?} platform={:?}",
            stage.index, stage.name, stage.base, stage.platform
        );
        item(&mut out, &stage.from);
        match df.expand_from(stage.index, build_args) {
            Ok(f) => {
                let _ = writeln!(out, "  => {f:?}");
            }
            Err(e) => {
                let _ = writeln!(out, "  => error: {e}");
            }
        }
        let mut scope = match df.stage_scope(stage.index, build_args) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(out, "  => error: {e}");
                continue;
            }
        };
        for loc in &stage.instructions {
            item(&mut out, loc);
            match scope.apply(df, loc) {
                Ok(expanded) if expanded == loc.instruction => {}
                Ok(expanded) => {
                    let _ = writeln!(out, "    => {expanded:?}");
                }
                Err(e) => {
                    let _ = writeln!(out, "    => error: {e}");
                }
            }
            if let Instruction::Onbuild(o) = &loc.instruction {
                let _ = writeln!(out, "    expression: {:?}", o.expression);
            }
        }
        let _ = writeln!(out, "  env: {:?}", scope.env());
        let _ = writeln!(out, "  args: {:?}", scope.args());
    }
    out
}

/// [`dump`] with no build arguments.
pub fn dump_default(df: &Dockerfile) -> String {
    dump(df, &EmptyEnv)
}
