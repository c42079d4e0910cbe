//! Helpers the workspace's test suites share: loud skips, root and tool checks, a busybox root
//! filesystem, a private Docker engine, a private PostgreSQL cluster, a headless Chromium, peer tools under a time
//! limit. A dev-dependency only.

// Helpers of tests fail the way tests do: by panicking.
#![allow(clippy::unwrap_used)]

mod browser;
mod docker;
mod postgres;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output};

pub use browser::Chromedriver;
pub use docker::Dockerd;
pub use postgres::Postgres;

/// Says loudly on stderr that a test did not run and why (`what`: the test or suite and what it
/// lacks), so that a skip never passes for a success in a log.
pub fn skip(what: &str) {
    eprintln!("\n!!!!! SKIPPED: {what} !!!!!\n");
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Whether `tool` is found on `PATH`.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `test` can run containers here (root and runc); [`skip`]s it otherwise.
pub fn can_run_containers(test: &str) -> bool {
    let root = is_root();
    let runc = on_path("runc")
        || ["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc"]
            .iter()
            .any(|p| Path::new(p).exists());
    if !(root && runc) {
        skip(&format!(
            "{test}: needs root and runc (root={root}, runc={runc})"
        ));
    }
    root && runc
}

/// Where busybox-static puts its binary (Debian: `apt-get install busybox-static`).
const BUSYBOX: &str = "/bin/busybox";

/// Copies busybox into `bin` (made if missing) with a symlink per applet beside it; an entry
/// already there is kept.
pub fn install_busybox(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    std::fs::copy(BUSYBOX, bin.join("busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        let link = bin.join(applet);
        if !applet.is_empty() && applet != "busybox" && link.symlink_metadata().is_err() {
            symlink("busybox", link).unwrap();
        }
    }
}

/// `program` under coreutils `timeout`, so a hung peer tool fails the test instead of hanging
/// it (exit status 124 when it timed out).
pub fn bounded(secs: u64, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=5").arg(secs.to_string()).arg(program);
    cmd
}

/// What `cmd` printed when it failed, for an assertion message.
pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "{cmd:?} failed ({}; 124 means it timed out):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`, asserting success; returns its stdout.
pub fn check(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", describe(cmd, &out));
    String::from_utf8(out.stdout).unwrap()
}
