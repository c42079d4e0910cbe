//! The README's "Using strata" block, run as it is written (after its first line, which
//! builds the release binary: the test binary is put on PATH instead), on a fresh store. Its
//! steps must chain for a newcomer, so they must chain here.

use std::path::Path;
use std::process::Command;

use crate::common::have;

/// The first ```sh block after `## Using strata`, without its first line.
fn using_strata_block() -> String {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let section = text
        .split_once("## Using strata")
        .expect("the README has a `## Using strata` section")
        .1;
    let block = section
        .split_once("```sh\n")
        .expect("the section has a sh block")
        .1
        .split_once("```")
        .expect("the sh block ends")
        .0;
    let (first, rest) = block.split_once('\n').unwrap();
    assert!(
        first.starts_with("cargo build --release"),
        "the block's first line builds strata: {first}"
    );
    rest.to_string()
}

#[test]
fn the_readme_using_strata_block_runs_top_to_bottom() {
    let root = strata_test_support::is_root();
    let missing: Vec<&str> = ["runc", "skopeo", "umoci", "curl", "ip"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !root || !missing.is_empty() || !Path::new("/usr/bin/tini-static").exists() {
        strata_test_support::skip(&format!(
            "the README block needs root, tini-static and {missing:?}"
        ));
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_strata")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Whatever the block started is stopped even when a step fails.
    let script = format!(
        "trap 'strata apps destroy tilt-app >/dev/null 2>&1 || true; \
         strata agent stop >/dev/null 2>&1 || true; kill ${{registry:-}} 2>/dev/null || true' EXIT\n{}",
        using_strata_block()
    );
    let out = Command::new("timeout")
        .args([
            "--kill-after=10",
            "300",
            "bash",
            "-euo",
            "pipefail",
            "-c",
            &script,
        ])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .env("PATH", path)
        .env("TMPDIR", tmp.path())
        .env_remove("STRATA_STORE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the README block failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Hello from tilt-app"),
        "the app answered: {stdout}"
    );
}
