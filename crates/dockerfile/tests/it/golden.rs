//! Golden-file tests: `tests/golden/valid/<case>/Dockerfile` must parse and dump to
//! `expected.txt`; `tests/golden/invalid/<case>/Dockerfile` must fail with exactly the
//! rendered error in `expected.txt`. An optional `build-args` file (`K=V` lines) feeds
//! expansion. `UPDATE_GOLDEN=1` rewrites the expected files.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use strata_dockerfile::Dockerfile;
use strata_dockerfile::dump::dump;

fn cases(kind: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(kind);
    let mut dirs: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Dockerfile").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn build_args(dir: &Path) -> BTreeMap<String, String> {
    let Ok(text) = fs::read_to_string(dir.join("build-args")) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn check(dir: &Path, actual: &str, failures: &mut Vec<String>) {
    let expected_path = dir.join("expected.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&expected_path, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(&expected_path).unwrap_or_default();
    if expected != actual {
        failures.push(format!(
            "{}:\n--- expected\n{expected}\n--- actual\n{actual}",
            dir.display()
        ));
    }
}

fn parse(dir: &Path) -> Result<Dockerfile, strata_dockerfile::Error> {
    let bytes = fs::read(dir.join("Dockerfile")).unwrap();
    Dockerfile::from_bytes("Dockerfile", &bytes)
}

#[test]
fn valid_cases_match_their_dumps() {
    let dirs = cases("valid");
    assert!(dirs.len() >= 25, "only {} valid cases", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        match parse(dir) {
            Ok(df) => check(dir, &dump(&df, &build_args(dir)), &mut failures),
            Err(e) => failures.push(format!("{}: unexpected error:\n{e}", dir.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn invalid_cases_fail_with_their_rendered_error() {
    let dirs = cases("invalid");
    assert!(dirs.len() >= 12, "only {} invalid cases", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        match parse(dir) {
            Ok(df) => failures.push(format!(
                "{}: parsed but should fail:\n{}",
                dir.display(),
                dump(&df, &build_args(dir))
            )),
            Err(e) => {
                // Every parse error must point at a place in the file.
                assert!(e.diagnostic().is_some(), "{}: {e}", dir.display());
                check(dir, &format!("{e}\n"), &mut failures)
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
