//! Build journals: every `strata build`, deploy build and `strata dev` rebuild appends its
//! build events to a file of its own in the store, which the dashboard's Builds page reads
//! (while the build runs, too).
//!
//! ```text
//! <store>/strata/builds/
//! └── <unix ms>-<pid>-<n>.jsonl   {"event":"journal","command":"build","pid":…,"at":…}
//!                             one line per build event (`--progress json`'s objects, plus "at")
//!                             {"event":"finished","ok":true|false,"error":…,"at":…}
//! ```
//!
//! A journal without its `finished` line belongs to a build still running, or (its process
//! gone) to one that was killed. The newest [`KEEP`] journals are kept.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use strata_oci::sync::MutexExt;

/// How many journals a store keeps.
pub const KEEP: usize = 20;

/// `<store>/strata/builds`.
pub fn dir(store_root: &Path) -> PathBuf {
    store_root.join("strata/builds")
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One build's journal, appended to as events arrive.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl Journal {
    /// Starts a journal for `command` (`build`, `deploy`, `dev`), dropping the oldest beyond
    /// [`KEEP`].
    pub fn start(store_root: &Path, command: &str) -> std::io::Result<Journal> {
        let dir = dir(store_root);
        std::fs::create_dir_all(&dir)?;
        prune(&dir, KEEP.saturating_sub(1));
        // Named by time, process and a count: builds of one process may start in the same
        // millisecond (`strata dev web api`).
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = dir.join(format!(
            "{}-{}-{}.jsonl",
            now_ms(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let journal = Journal {
            path,
            file: Mutex::new(Some(file)),
        };
        journal.record(&serde_json::json!({
            "event": "journal", "command": command, "pid": std::process::id(),
        }));
        Ok(journal)
    }

    /// Where it is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` (an object) with the time. Best effort: a journal that cannot be
    /// written stops being written, and never fails the build.
    pub fn record<T: Serialize>(&self, event: &T) {
        let Ok(mut v) = serde_json::to_value(event) else {
            return;
        };
        if let Some(obj) = v.as_object_mut() {
            obj.insert("at".into(), now_ms().into());
        }
        let mut file = self.file.lock_ok();
        if let Some(f) = file.as_mut() {
            // One write per line, so a reader sees whole lines (O_APPEND).
            let line = format!("{v}\n");
            if f.write_all(line.as_bytes()).is_err() {
                *file = None;
            }
        }
    }

    /// Records how the build ended.
    pub fn finish(&self, error: Option<&str>) {
        self.record(&serde_json::json!({
            "event": "finished", "ok": error.is_none(), "error": error,
        }));
        *self.file.lock_ok() = None;
    }
}

/// Removes all but the newest `keep` journals of `dir`.
fn prune(dir: &Path, keep: usize) {
    let mut files = list(dir);
    if files.len() > keep {
        let drop = files.len() - keep;
        for p in files.drain(..drop) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The journals of `dir`, oldest first (their names start with the time).
pub fn list(dir: &Path) -> Vec<PathBuf> {
    // Sorted by time, then by the process's count (`<ms>-<pid>-<n>`).
    let mut files: Vec<((u64, u64), PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mut parts = name.strip_suffix(".jsonl")?.split('-');
            let ms = parts.next()?.parse().ok()?;
            let n = parts.nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            Some(((ms, n), e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_has_its_header_events_and_end_and_old_ones_are_pruned() {
        let store = tempfile::tempdir().unwrap();
        let j = Journal::start(store.path(), "build").unwrap();
        j.record(&serde_json::json!({"event": "step_cached", "step": {"index": 1}}));
        j.finish(Some("boom"));
        let text = std::fs::read_to_string(j.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["event"], "journal");
        assert_eq!(lines[0]["command"], "build");
        assert_eq!(lines[1]["step"]["index"], 1);
        assert!(lines[1]["at"].as_u64().unwrap() > 0);
        assert_eq!(lines[2]["ok"], false);
        assert_eq!(lines[2]["error"], "boom");

        let d = dir(store.path());
        for i in 0..KEEP + 5 {
            std::fs::write(d.join(format!("{}-1.jsonl", 1000 + i)), "").unwrap();
        }
        // Two in one millisecond of one process get names of their own.
        let _twin = Journal::start(store.path(), "dev").unwrap();
        let newest = Journal::start(store.path(), "dev").unwrap();
        let left = list(&d);
        assert_eq!(left.len(), KEEP);
        assert_eq!(left.last().unwrap(), newest.path());
        assert!(!left.iter().any(|p| p.ends_with("1000-1.jsonl")));
    }
}
