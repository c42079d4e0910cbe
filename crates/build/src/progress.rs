//! Build events and their renderers: plain text (`[2/4] COPY . . CACHED`), JSON lines, TTY.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

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
        match self.events.lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

impl Progress for CollectProgress {
    fn event(&self, event: &Event) {
        match self.events.lock() {
            Ok(mut g) => g.push(event.clone()),
            Err(p) => p.into_inner().push(event.clone()),
        }
    }
}

/// `--progress` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// Lines for logs and CI.
    Plain,
    /// For a terminal (same lines as plain for now).
    Tty,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for ProgressMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(ProgressMode::Plain),
            "tty" | "auto" => Ok(ProgressMode::Tty),
            "json" => Ok(ProgressMode::Json),
            _ => Err(format!(
                "unknown progress mode `{s}`; hint: use plain, tty or json"
            )),
        }
    }
}

/// A renderer for `mode` writing to `out` (usually stderr).
pub fn renderer<W: Write + Send + 'static>(mode: ProgressMode, out: W) -> Box<dyn Progress> {
    match mode {
        ProgressMode::Plain | ProgressMode::Tty => Box::new(PlainProgress::new(out)),
        ProgressMode::Json => Box::new(JsonProgress::new(out)),
    }
}

/// Renders `[2/4] COPY . . CACHED`, `[3/4] RUN go build  1.2s` and `#3 ` prefixed output.
pub struct PlainProgress<W> {
    out: Mutex<W>,
}

impl<W: Write + Send> PlainProgress<W> {
    /// A renderer writing to `out`.
    pub fn new(out: W) -> Self {
        PlainProgress {
            out: Mutex::new(out),
        }
    }
}

fn prefix(s: &StepRef) -> String {
    let mut p = String::from("[");
    if !s.image.is_empty() {
        p.push_str(&s.image);
        p.push(' ');
    }
    if let Some(stage) = &s.stage {
        p.push_str(stage);
        p.push(' ');
    }
    p.push_str(&format!("{}/{}]", s.index, s.total));
    p
}

/// The plain-text line for an event, `None` for events plain output does not show.
pub fn plain_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::BuildStarted { image, stages } => {
            if image.is_empty() {
                return None;
            }
            format!(
                "building {image} ({stages} stage{})",
                if *stages == 1 { "" } else { "s" }
            )
        }
        Event::StepStarted { step } => format!("{} {}", prefix(step), step.text),
        Event::StepCached { step } => format!("{} {} CACHED", prefix(step), step.text),
        Event::StepDone { step, duration } => format!(
            "{} {}  {:.1}s",
            prefix(step),
            step.text,
            duration.as_secs_f64()
        ),
        Event::Output { step, line } => format!("{} | {line}", prefix(step)),
        Event::Explain { step, reason } => format!("{} missed: {reason}", prefix(step)),
        Event::Warning { message } => format!("warning: {message}"),
        Event::ImageDone {
            image,
            digest,
            content_tag,
            duration,
            steps_run,
            steps_cached,
            ..
        } => format!(
            "built {} {digest} ({content_tag}) in {:.1}s: {steps_run} run, {steps_cached} cached",
            if image.is_empty() { "image" } else { image },
            duration.as_secs_f64()
        ),
    })
}

impl<W: Write + Send> Progress for PlainProgress<W> {
    fn event(&self, event: &Event) {
        // StepStarted is only worth a line when the step will take a while: RUN prints its
        // output under it, COPY finishes with a `StepDone` line of its own.
        if matches!(event, Event::StepStarted { .. }) {
            return;
        }
        if let Some(line) = plain_line(event) {
            let mut out = match self.out.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            // Progress output is best effort: a closed stderr must not fail the build.
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// One JSON object per event and line.
pub struct JsonProgress<W> {
    out: Mutex<W>,
}

impl<W: Write + Send> JsonProgress<W> {
    /// A renderer writing to `out`.
    pub fn new(out: W) -> Self {
        JsonProgress {
            out: Mutex::new(out),
        }
    }
}

impl<W: Write + Send> Progress for JsonProgress<W> {
    fn event(&self, event: &Event) {
        let Ok(line) = serde_json::to_string(event) else {
            return;
        };
        let mut out = match self.out.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: usize, text: &str) -> StepRef {
        StepRef {
            image: String::new(),
            stage: None,
            index: i,
            total: 4,
            text: text.into(),
        }
    }

    #[test]
    fn plain_lines_look_like_docker() {
        assert_eq!(
            plain_line(&Event::StepCached {
                step: step(2, "COPY . .")
            })
            .unwrap(),
            "[2/4] COPY . . CACHED"
        );
        assert_eq!(
            plain_line(&Event::StepDone {
                step: step(3, "RUN go build"),
                duration: Duration::from_millis(1234)
            })
            .unwrap(),
            "[3/4] RUN go build  1.2s"
        );
    }

    #[test]
    fn json_is_one_object_per_line() {
        let buf: Vec<u8> = Vec::new();
        let p = JsonProgress::new(buf);
        p.event(&Event::Output {
            step: step(1, "RUN x"),
            line: "hi".into(),
        });
        let out = p.out.into_inner().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["event"], "output");
        assert_eq!(v["line"], "hi");
        assert_eq!(v["step"]["index"], 1);
    }
}
