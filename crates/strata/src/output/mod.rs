//! One stream of events for every command that works a while (build, push, pull, deploy,
//! dev) and one set of renderers for it, chosen by `--progress`:
//!
//! - `plain`: a line per event, for logs and CI;
//! - `tty`: spinners for running steps and a bar per blob, finished work collapsed to a line;
//! - `json`: one object per event and line, `{"event": KIND, …}` (the schema is in docs/cli.md).
//!
//! A command makes one [`Output`] and hands it to everything it runs: the build engine (through
//! [`strata_build::Progress`]), transfers ([`Output::blob_progress`]) and its own messages
//! ([`Output::note`]). Work done for a host reports through [`Output::for_host`], which names
//! the host on every line and in every event.

mod build;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use strata_build::Progress;
use strata_oci::Digest;
use strata_oci::sync::MutexExt;
use strata_transfer::{BlobProgress, BlobState, ProgressFn};
use strata_ui::journal::Journal;

pub use build::plain_line;
use build::{TtyProgress, WriterTerm, terminal_size};

use crate::cli::ProgressArg;
use crate::cmd::human_size;

/// How events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Tty,
    Json,
}

impl Mode {
    /// `--progress`'s value; `auto` is `tty` when stderr is a terminal, else `plain`.
    pub fn of(arg: ProgressArg) -> Mode {
        match arg {
            ProgressArg::Plain => Mode::Plain,
            ProgressArg::Json => Mode::Json,
            ProgressArg::Tty => Mode::Tty,
            ProgressArg::Auto if std::io::stderr().is_terminal() => Mode::Tty,
            ProgressArg::Auto => Mode::Plain,
        }
    }
}

/// An event of the commands around builds; a build's own events are [`strata_build::Event`]s.
/// Both serialize with an `event` field naming the kind, and every event made for a host
/// carries `host`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Note {
    /// A blob of a push or pull was checked, found present, mounted or moved.
    Blob {
        digest: String,
        /// `checking`, `skipped` (the other side had it), `mounted` or `done`.
        state: String,
        /// Bytes moved.
        done: u64,
        /// The blob's size.
        total: u64,
        /// The host the blob came from in a relay (absent: from this machine).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// An image was pushed to a registry, or shipped to a host (then the event has `host`).
    Pushed {
        image: String,
        /// Blobs sent.
        sent: usize,
        /// Their bytes, as stored (compressed).
        bytes: u64,
        /// Blobs mounted from another repository of the registry.
        mounted: usize,
        /// Blobs the other side had.
        present: usize,
        /// Blobs a broken transfer had begun, finished from where it stopped.
        resumed: usize,
        /// The host that sent them in a relay (absent: this machine).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
    },
    /// An image was pulled from a registry, or from a host (then the event has `host`).
    Pulled {
        image: String,
        fetched: usize,
        bytes: u64,
        /// Blobs this store had.
        present: usize,
    },
    /// Something worth knowing on the way (strata being installed on a host, a retry).
    Info { message: String },
    /// A step of a deploy: shipped, released, machine started, healthy, switched.
    Deploy { app: String, message: String },
    /// `strata dev`: a change was synced, ran a command, or rebuilt and redeployed.
    Dev {
        app: String,
        /// `watching`, `synced`, `fallback`, `redeployed`, `failed` or `reset`.
        action: String,
        message: String,
    },
}

/// Where events go. Cheap to clone; clones share the renderer.
#[derive(Clone)]
pub struct Output {
    inner: Arc<Inner>,
    host: Option<String>,
    /// The build journal the dashboard reads (`strata_ui::journal`), if one is kept.
    journal: Option<Arc<Journal>>,
}

struct Inner {
    mode: Mode,
    /// Plain and JSON lines. (TTY output draws through `tty`.)
    out: Mutex<Box<dyn Write + Send>>,
    tty: Option<TtyProgress>,
}

impl Output {
    /// Events for `--progress ARG`, to stderr (stdout carries results).
    pub fn new(arg: ProgressArg) -> Output {
        Output::to(Mode::of(arg), std::io::stderr())
    }

    /// Events in `mode`, to `out`.
    pub fn to<W: Write + Send + 'static>(mode: Mode, out: W) -> Output {
        let (out, tty): (Box<dyn Write + Send>, _) = match mode {
            Mode::Tty => {
                let (width, height) = terminal_size();
                let term = WriterTerm::new(out, width, height);
                let width = term.width;
                let target = ProgressDrawTarget::term_like(Box::new(term));
                (
                    Box::new(std::io::sink()),
                    Some(TtyProgress::new(target, width)),
                )
            }
            Mode::Plain | Mode::Json => (Box::new(out), None),
        };
        Output {
            inner: Arc::new(Inner {
                mode,
                out: Mutex::new(out),
                tty,
            }),
            host: None,
            journal: None,
        }
    }

    /// The same output for work done on `host`: lines start with `host: `, events carry it.
    pub fn for_host(&self, host: &str) -> Output {
        Output {
            inner: self.inner.clone(),
            host: Some(host.to_string()),
            journal: self.journal.clone(),
        }
    }

    /// The same output, also appending the build's events to a journal in `store_root` for
    /// the dashboard's Builds page (`command` names what builds). Best effort: a journal that
    /// cannot be made is skipped, and says so.
    pub fn journaled(&self, store_root: &std::path::Path, command: &str) -> Output {
        let journal = match Journal::start(store_root, command) {
            Ok(j) => Some(Arc::new(j)),
            Err(e) => {
                tracing::warn!(
                    "cannot keep a build journal in {}: {e}",
                    store_root.display()
                );
                None
            }
        };
        Output {
            inner: self.inner.clone(),
            host: self.host.clone(),
            journal,
        }
    }

    /// Ends the journal with how the build ended, and hands `result` back.
    pub fn finish_journal<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if let Some(j) = &self.journal {
            j.finish(result.as_ref().err().map(|e| format!("{e:#}")).as_deref());
        }
        result
    }

    /// Shows one event of the commands around builds.
    pub fn note(&self, note: &Note) {
        if self.inner.mode == Mode::Json {
            return self.json_line(note);
        }
        match note {
            Note::Deploy { message, .. } | Note::Dev { message, .. } | Note::Info { message } => {
                self.line(message)
            }
            Note::Blob {
                digest,
                state,
                total,
                from,
                ..
            } => self.line(&format!(
                "{}: {state} ({}){}",
                short(digest),
                human_size(*total),
                from.as_ref()
                    .map_or(String::new(), |f| format!(" from {f}"))
            )),
            // The summaries of a push or pull name their host themselves:
            // `Pushed web:1: 2 uploaded (3 MB), 0 mounted, 1 already there` to a registry,
            // `Pushed web:1 to web1: 2 sent (3 MB), 1 already there` to a host.
            Note::Pushed {
                image,
                sent,
                bytes,
                mounted,
                present,
                resumed,
                from,
            } => self.raw_line(&match &self.host {
                None => format!(
                    "Pushed {image}: {sent} uploaded ({}), {mounted} mounted, {present} already \
                     there",
                    human_size(*bytes)
                ),
                Some(host) => format!(
                    "Pushed {image} to {host}: {sent} sent ({}{}{}), {present} already there",
                    human_size(*bytes),
                    if *resumed > 0 {
                        format!(", {resumed} resumed")
                    } else {
                        String::new()
                    },
                    from.as_ref()
                        .map_or(String::new(), |f| format!(", relayed from {f}"))
                ),
            }),
            Note::Pulled {
                image,
                fetched,
                bytes,
                present,
            } => self.raw_line(&match &self.host {
                None => format!(
                    "Pulled {image}: {fetched} blobs fetched ({}), {present} already here",
                    human_size(*bytes)
                ),
                Some(host) => format!(
                    "Pulled {image} from {host}: {fetched} fetched ({}), {present} already here",
                    human_size(*bytes)
                ),
            }),
        }
    }

    /// A deploy's message for `app`.
    pub fn deploy(&self, app: &str, message: &str) {
        self.note(&Note::Deploy {
            app: app.to_string(),
            message: message.to_string(),
        });
    }

    /// A summary for people of what events already said (an image built, a blob moved): a
    /// line in plain and TTY modes, nothing in JSON.
    pub fn text(&self, line: &str) {
        if self.inner.mode != Mode::Json {
            self.line(line);
        }
    }

    /// A line of text with the host's prefix, above any bars (plain and TTY modes).
    fn line(&self, text: &str) {
        match &self.host {
            Some(h) => self.raw_line(&format!("{h}: {text}")),
            None => self.raw_line(text),
        }
    }

    fn raw_line(&self, text: &str) {
        match &self.inner.tty {
            Some(tty) => tty.println(text),
            None => {
                // Progress output is best effort: a closed stderr must not fail the work.
                self.write_line(format!("{text}\n"));
            }
        }
    }

    fn json_line<T: Serialize>(&self, event: &T) {
        let Ok(mut v) = serde_json::to_value(event) else {
            return;
        };
        if let (Some(h), Some(obj)) = (&self.host, v.as_object_mut()) {
            obj.insert("host".into(), serde_json::Value::String(h.clone()));
        }
        self.write_line(format!("{v}\n"));
    }

    /// One line in one write: stderr is unbuffered, and `writeln!` of a JSON value would
    /// make a system call per token (a 200-image build wrote 65,000 times).
    fn write_line(&self, line: String) {
        let mut out = self.inner.out.lock_ok();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }

    /// A transfer's progress callback: a bar per blob on a terminal, a line per finished blob
    /// in plain mode (`done` blobs say `verb`), `blob` events in JSON.
    pub fn blob_progress(&self, verb: &'static str) -> Arc<ProgressFn> {
        let out = self.clone();
        let bars: Mutex<HashMap<Digest, ProgressBar>> = Mutex::new(HashMap::new());
        Arc::new(move |p: &BlobProgress| {
            let state = match p.state {
                BlobState::Checking => "checking",
                BlobState::Transferring => "transferring",
                BlobState::Skipped => "skipped",
                BlobState::Mounted => "mounted",
                BlobState::Done => "done",
            };
            let shown = match p.state {
                BlobState::Skipped => "exists",
                BlobState::Mounted => "mounted",
                BlobState::Done => verb,
                BlobState::Checking | BlobState::Transferring => "",
            };
            match (out.inner.mode, &out.inner.tty) {
                (Mode::Json, _) => {
                    // Every byte count would flood the stream; checks and ends are events.
                    if p.state != BlobState::Transferring {
                        out.json_line(&Note::Blob {
                            digest: p.digest.to_string(),
                            state: state.to_string(),
                            done: p.done,
                            total: p.total,
                            from: None,
                        });
                    }
                }
                (_, Some(tty)) => {
                    let mut bars = bars.lock_ok();
                    let bar = bars.entry(p.digest.clone()).or_insert_with(|| {
                        let b = tty.add_bar(p.total);
                        b.set_style(
                            ProgressStyle::with_template(
                                "{prefix} {bar:30} {bytes}/{total_bytes} {msg}",
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        );
                        let label = out
                            .host
                            .as_ref()
                            .map_or(String::new(), |h| format!("{h}: "));
                        b.set_prefix(format!("{label}{}", p.digest.short()));
                        b
                    });
                    bar.set_position(p.done);
                    if !shown.is_empty() {
                        bar.finish_with_message(shown);
                    }
                }
                (_, None) => {
                    if !shown.is_empty() {
                        out.line(&format!(
                            "{}: {shown} ({})",
                            p.digest.short(),
                            human_size(p.total)
                        ));
                    }
                }
            }
        })
    }
}

/// The first 12 hex characters of a digest's text, as [`Digest::short`] gives them.
fn short(digest: &str) -> &str {
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    &hex[..hex.len().min(12)]
}

impl Progress for Output {
    fn event(&self, event: &strata_build::Event) {
        if let Some(j) = &self.journal {
            j.record(event);
        }
        match self.inner.mode {
            Mode::Json => self.json_line(event),
            Mode::Tty => {
                if let Some(tty) = &self.inner.tty {
                    tty.event(event);
                }
            }
            Mode::Plain => {
                // StepStarted is only worth a line when the step will take a while: RUN prints
                // its output under it, COPY finishes with a `StepDone` line of its own.
                if matches!(event, strata_build::Event::StepStarted { .. }) {
                    return;
                }
                if let Some(line) = plain_line(event) {
                    self.line(&line);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_build::{Event, StepRef};

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock_ok().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock_ok().clone()).unwrap()
        }
    }

    /// Step `i` of 4 of an unnamed image.
    pub(super) fn step(i: usize, text: &str) -> StepRef {
        StepRef {
            image: String::new(),
            stage: None,
            index: i,
            total: 4,
            text: text.into(),
        }
    }

    fn blob(state: BlobState) -> BlobProgress {
        BlobProgress {
            digest: Digest::sha256(b"x"),
            done: 3,
            total: 3,
            state,
        }
    }

    #[test]
    fn json_is_one_object_per_event_and_names_the_host() {
        let buf = Shared::default();
        let out = Output::to(Mode::Json, buf.clone());
        out.event(&Event::Output {
            step: step(1, "RUN x"),
            line: "hi".into(),
        });
        let on_a = out.for_host("a");
        on_a.deploy("web", "released v2");
        let progress = on_a.blob_progress("sent");
        progress(&blob(BlobState::Transferring));
        progress(&blob(BlobState::Done));
        let lines: Vec<serde_json::Value> = buf
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["event"], "output");
        assert_eq!(lines[0]["line"], "hi");
        assert_eq!(lines[0]["step"]["index"], 1);
        assert!(lines[0].get("host").is_none());
        assert_eq!(lines[1]["event"], "deploy");
        assert_eq!(lines[1]["host"], "a");
        assert_eq!(lines[1]["message"], "released v2");
        assert_eq!(lines[2]["event"], "blob");
        assert_eq!(lines[2]["state"], "done");
        assert_eq!(lines[2]["host"], "a");
        // A deploy event read back (as a client reads a host's stream) is the same note.
        let back: Note = serde_json::from_value(lines[1].clone()).unwrap();
        assert_eq!(
            back,
            Note::Deploy {
                app: "web".into(),
                message: "released v2".into()
            }
        );
    }

    #[test]
    fn plain_lines_carry_the_host_and_the_verb() {
        let buf = Shared::default();
        let out = Output::to(Mode::Plain, buf.clone());
        out.event(&Event::StepStarted {
            step: step(1, "RUN x"),
        });
        out.event(&Event::StepCached {
            step: step(2, "COPY . ."),
        });
        let on_a = out.for_host("a");
        on_a.deploy("web", "released v2");
        let progress = on_a.blob_progress("sent");
        progress(&blob(BlobState::Checking));
        progress(&blob(BlobState::Done));
        progress(&blob(BlobState::Skipped));
        let d = Digest::sha256(b"x");
        assert_eq!(
            buf.text(),
            format!(
                "[2/4] COPY . . CACHED\na: released v2\na: {s}: sent (3B)\na: {s}: exists (3B)\n",
                s = d.short()
            )
        );
    }
}
