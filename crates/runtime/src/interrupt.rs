//! A process-wide interrupt request (Ctrl-C, SIGTERM), set by the binary's signal handler and
//! read by long work: a RUN step's container is killed at once, so the step fails, its mounts
//! and bundle are cleaned up by the usual error path, and the command exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

static FLAG: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

/// The flag a signal handler sets (`signal_hook::flag::register` takes it as it is).
pub fn flag() -> Arc<AtomicBool> {
    Arc::clone(&FLAG)
}

/// Asks every long operation of this process to stop.
pub fn request() {
    FLAG.store(true, Ordering::SeqCst);
}

/// Whether an interrupt was requested.
pub fn requested() -> bool {
    FLAG.load(Ordering::SeqCst)
}
