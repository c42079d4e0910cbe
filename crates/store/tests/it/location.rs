//! Where the default store is: `--store`, else `$STRATA_STORE`, else by user.

use std::path::PathBuf;
use std::process::Command;

use strata_store::default_root;

/// Child half of the tests below (env vars cannot be changed safely in a threaded test process);
/// a no-op unless spawned with `PRINT_DEFAULT_ROOT`.
#[test]
fn child_print_default_root() {
    if std::env::var_os("PRINT_DEFAULT_ROOT").is_none() {
        return;
    }
    println!("root={}", default_root(None).unwrap().display());
}

fn default_root_with(env: &[(&str, &str)]) -> PathBuf {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "location::child_print_default_root",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("PRINT_DEFAULT_ROOT", "1")
    .env_remove("STRATA_STORE")
    .env_remove("XDG_DATA_HOME");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
    let line = out.lines().find_map(|l| l.split_once("root=")).unwrap().1;
    PathBuf::from(line)
}

#[test]
fn explicit_beats_env_beats_per_user_default() {
    assert_eq!(
        default_root(Some(PathBuf::from("/x"))).unwrap(),
        PathBuf::from("/x")
    );
    assert_eq!(
        default_root_with(&[("STRATA_STORE", "/from/env")]),
        PathBuf::from("/from/env")
    );
    let expected = if rustix::process::geteuid().is_root() {
        PathBuf::from("/var/lib/strata")
    } else {
        PathBuf::from("/xdg/strata")
    };
    assert_eq!(default_root_with(&[("XDG_DATA_HOME", "/xdg")]), expected);
}

/// A store opened through a symlink (a store linked to a bigger disk) works from its real
/// path: runc refuses a bundle's rootfs whose path has a symlink in it.
#[test]
fn a_store_reached_through_a_symlink_is_used_at_its_real_path() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("disk/store");
    std::fs::create_dir_all(&real).unwrap();
    let link = dir.path().join("store");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let store = strata_store::Store::open(&link).unwrap();
    assert_eq!(store.root(), std::fs::canonicalize(&real).unwrap());
}
