//! Build events: what a build reports while it runs. The binary renders them (plain text,
//! TTY, JSON lines) together with every other command's events.

use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use strata_oci::sync::MutexExt;

/// Which step an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepRef {
    /// The image being built (its first tag or project name), empty if it has none.
    pub image: String,
    /// Stage name (or index as text) when the Dockerfile has several stages.
    pub stage: Option<String>,
    /// 1-based position in the stage.
    pub index: usize,
    /// Steps in the stage.
    pub total: usize,
    /// The instruction as written (ARG/ENV expanded where the builder expands them).
    pub text: String,
}

/// Something that happened during a build.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A build of one image starts.
    BuildStarted { image: String, stages: usize },
    /// A step starts running (a cache miss).
    StepStarted { step: StepRef },
    /// A step was satisfied from the cache.
    StepCached { step: StepRef },
    /// A step ran and finished.
    StepDone {
        step: StepRef,
        #[serde(serialize_with = "secs")]
        duration: Duration,
    },
    /// One line of a `RUN` command's output (without the newline).
    Output { step: StepRef, line: String },
    /// Why a step missed the cache (only with `explain`).
    Explain { step: StepRef, reason: String },
    /// Something the user should know that does not stop the build.
    Warning { message: String },
    /// The image followed its moved base without running a step: every layer is the last
    /// build's, on the new base's layers (docs/rebase.md).
    Rebased { image: String, onto: String },
    /// An image was built and stored.
    ImageDone {
        image: String,
        digest: String,
        content_tag: String,
        tags: Vec<String>,
        #[serde(serialize_with = "secs")]
        duration: Duration,
        steps_run: usize,
        steps_cached: usize,
        /// Bytes of the layer blobs the steps that ran wrote (0 for a rebase).
        layer_bytes_written: u64,
    },
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// Receives build events; called from several threads when stages build in parallel.
pub trait Progress: Send + Sync {
    /// Handles one event.
    fn event(&self, event: &Event);
}

/// Drops every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&self, _event: &Event) {}
}

/// Collects events in memory (for tests and callers that render later).
#[derive(Debug, Default)]
pub struct CollectProgress {
    /// Every event received, in order.
    pub events: Mutex<Vec<Event>>,
}

impl CollectProgress {
    /// A copy of the events so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock_ok())
    }
}

impl Progress for CollectProgress {
    fn event(&self, event: &Event) {
        self.events.lock_ok().push(event.clone());
    }
}
