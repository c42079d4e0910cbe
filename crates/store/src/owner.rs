//! Temp entries named after the process that writes them, so a sweep can tell what a killed
//! process left (its owner is gone: remove now) from what a live one is writing (keep, however
//! old), without waiting an hour.
//!
//! A name is `o<pid>.<start time>.<kind>-<random>`: the start time (clock ticks since boot,
//! `/proc/<pid>/stat` field 22) tells a pid reused by another process from the owner.

use std::sync::OnceLock;

/// `<pid>.<start time>` of `pid`, `None` when it does not run.
fn stamp(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid}.{start}"))
}

/// The prefix of a temp entry of `kind` (`blob`, `run`, …) written by this process.
pub fn temp_prefix(kind: &str) -> String {
    static OWN: OnceLock<String> = OnceLock::new();
    let own = OWN.get_or_init(|| stamp(std::process::id()).unwrap_or_else(|| "0.0".into()));
    format!("o{own}.{kind}-")
}

/// For a temp entry named by [`temp_prefix`]: whether its owner still runs. `None` for other
/// names (their age decides).
pub(crate) fn owner_alive(name: &str) -> Option<bool> {
    let rest = name.strip_prefix('o')?;
    let mut parts = rest.splitn(3, '.');
    let pid: u32 = parts.next()?.parse().ok()?;
    let start: u64 = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(stamp(pid).is_some_and(|now| now == format!("{pid}.{start}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_entries_are_alive_and_dead_or_foreign_ones_are_told_apart() {
        let mine = format!("{}abc", temp_prefix("run"));
        assert_eq!(owner_alive(&mine), Some(true));
        assert_eq!(owner_alive("o999999999.1.run-abc"), Some(false));
        let pid = std::process::id();
        assert_eq!(
            owner_alive(&format!("o{pid}.1.run-abc")),
            Some(false),
            "pid reused"
        );
        assert_eq!(owner_alive("blob-abc"), None);
        assert_eq!(owner_alive("other"), None);
    }
}
