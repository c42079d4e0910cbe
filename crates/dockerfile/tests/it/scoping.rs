//! Stage structure, ARG/ENV scoping and error rendering through the public API.

use std::collections::BTreeMap;

use strata_dockerfile::{Dockerfile, EmptyEnv, Instruction};

fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const MULTI: &str = "ARG BASE=alpine\nARG TAG=3.20\nFROM --platform=$TARGETPLATFORM ${BASE}:${TAG} AS one\nARG TAG\nARG OTHER=o\nRUN true\nFROM one AS two\nENV TAG=env\nARG TAG\n";

#[test]
fn global_args_only_reach_from_lines_unless_redeclared() {
    let df = Dockerfile::parse("Dockerfile", MULTI).unwrap();
    assert_eq!(df.meta_args.len(), 2);
    assert_eq!(df.stages.len(), 2);
    assert_eq!(df.stage("ONE").unwrap().index, 0);
    let from = df.expand_from(0, &EmptyEnv).unwrap();
    assert_eq!(from.base, "alpine:3.20");
    let from = df
        .expand_from(
            0,
            &args(&[("TAG", "edge"), ("TARGETPLATFORM", "linux/arm64")]),
        )
        .unwrap();
    assert_eq!(from.base, "alpine:edge");
    assert_eq!(from.platform.as_deref(), Some("linux/arm64"));

    // Stage one re-declares TAG (imports 3.20) but not BASE.
    let mut scope = df.stage_scope(0, &EmptyEnv).unwrap();
    for loc in &df.stages[0].instructions {
        scope.apply(&df, loc).unwrap();
    }
    assert_eq!(scope.expand_word("$TAG-$BASE-$OTHER").unwrap(), "3.20--o");
    assert_eq!(scope.args().len(), 2);

    // Stage two: ENV then ARG; the build arg given on the command line wins for ARG,
    // the image config keeps ENV's value.
    let ba = args(&[("TAG", "cli")]);
    let mut scope = df.stage_scope(1, &ba).unwrap();
    for loc in &df.stages[1].instructions {
        scope.apply(&df, loc).unwrap();
    }
    assert_eq!(scope.env(), &[("TAG".to_string(), "env".to_string())]);
    assert_eq!(scope.expand_word("$TAG").unwrap(), "cli");
}

#[test]
fn env_overrides_earlier_arg_and_base_env_is_visible() {
    let df = Dockerfile::parse(
        "Dockerfile",
        "FROM x\nARG V=arg\nENV V=env\nWORKDIR /$V/$HOME\n",
    )
    .unwrap();
    let mut scope = df
        .stage_scope(0, &EmptyEnv)
        .unwrap()
        .with_base_env(&["HOME=/root", "PATH=/bin"]);
    let mut last = None;
    for loc in &df.stages[0].instructions {
        last = Some(scope.apply(&df, loc).unwrap());
    }
    assert_eq!(last, Some(Instruction::Workdir("/env//root".into())));
}

#[test]
fn run_is_not_expanded_by_the_builder() {
    let df =
        Dockerfile::parse("Dockerfile", "FROM x\nENV A=1\nRUN echo $A\nCMD echo $A\n").unwrap();
    let mut scope = df.stage_scope(0, &EmptyEnv).unwrap();
    for loc in &df.stages[0].instructions {
        assert_eq!(
            scope.apply(&df, loc).unwrap(),
            match &loc.instruction {
                Instruction::Env(_) => scope_env_expected(),
                other => other.clone(),
            }
        );
    }
}

fn scope_env_expected() -> Instruction {
    Instruction::Env(vec![strata_dockerfile::KeyValue {
        key: "A".into(),
        value: "1".into(),
    }])
}

#[test]
fn expansion_errors_carry_the_location() {
    let df = Dockerfile::parse("Dockerfile", "FROM x\n  LABEL a=\"${NEED:?set NEED}\"\n").unwrap();
    let mut scope = df.stage_scope(0, &EmptyEnv).unwrap();
    let err = scope.apply(&df, &df.stages[0].instructions[0]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:2:3: NEED: set NEED\n  LABEL a=\"${NEED:?set NEED}\"\n  ^"
    );
    let df = Dockerfile::parse("Dockerfile", "ARG B\nFROM $B\n").unwrap();
    let err = df.expand_from(0, &EmptyEnv).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Dockerfile:2:1: base name ($B) should not be blank\nFROM $B\n^"
    );
}

#[test]
fn diagnostic_renders_file_line_column_and_caret() {
    let err = Dockerfile::parse(
        "path/to/Dockerfile",
        "FROM x\nRUN --mount=type=cache \\\n  --bad=1 true\n",
    )
    .unwrap_err();
    let d = err.diagnostic().unwrap();
    assert_eq!(
        (d.file.as_str(), d.line, d.column),
        ("path/to/Dockerfile", 3, 3)
    );
    assert_eq!(d.message, "unknown flag: --bad");
    assert_eq!(
        err.to_string(),
        "path/to/Dockerfile:3:3: unknown flag: --bad\n  --bad=1 true\n  ^"
    );
    // Columns count characters, not bytes.
    let err = Dockerfile::parse("D", "FROM x\nLABEL é=1 ü\n").unwrap_err();
    assert_eq!(err.diagnostic().unwrap().column, 11);
    assert!(err.to_string().ends_with("LABEL é=1 ü\n          ^"));
}

#[test]
fn spans_cover_continuations_and_heredocs() {
    let df = Dockerfile::parse(
        "D",
        "FROM x\nRUN a \\\n  b\nCOPY <<EOF /f\nhi\nEOF\nUSER u\n",
    )
    .unwrap();
    let spans: Vec<(usize, usize)> = df.stages[0]
        .instructions
        .iter()
        .map(|l| (l.span.start_line, l.span.end_line))
        .collect();
    assert_eq!(spans, vec![(2, 3), (4, 6), (7, 7)]);
}
