//! Advisory `flock(2)` locks on files under `strata/locks/`.
//!
//! `flock` locks belong to an open file description, so every guard opens its own descriptor:
//! two guards in one process conflict exactly like two processes would, and the kernel drops a
//! lock when its holder dies (even by SIGKILL), so a crashed writer never wedges the store.

use std::fs::{File, OpenOptions};
use std::path::Path;

use rustix::fs::{FlockOperation, flock};
use rustix::io::Errno;

use crate::error::{IoContext, Result};

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockMode {
    Shared,
    Exclusive,
}

/// A held lock; released when dropped (closing the descriptor releases it).
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Block until the lock on `path` (created if missing) is held in `mode`.
    pub(crate) fn acquire(path: &Path, mode: LockMode) -> Result<FileLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx("open lock file", path)?;
        let op = match mode {
            LockMode::Shared => FlockOperation::LockShared,
            LockMode::Exclusive => FlockOperation::LockExclusive,
        };
        flock_retrying(&file, op).ctx("lock", path)?;
        Ok(FileLock { _file: file })
    }
}

/// `flock(2)` on `file`, waiting again when a signal handler interrupts the wait.
pub(crate) fn flock_retrying(file: &File, op: FlockOperation) -> std::io::Result<()> {
    loop {
        match flock(file, op) {
            Ok(()) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
