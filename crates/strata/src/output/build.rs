//! How build events look: `[2/4] COPY . . CACHED` lines for logs, and for a terminal a
//! spinner per running step over its output tail.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use strata_build::{Event, Progress, StepRef};
use strata_oci::sync::MutexExt;

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
        Event::Rebased { image, onto } => format!(
            "rebased {} onto {onto} (no step ran)",
            if image.is_empty() { "image" } else { image }
        ),
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

/// Lines of a running `RUN` step's output kept under its spinner.
const TAIL_LINES: usize = 5;

/// Renders for a terminal: one spinner line per running step (several when stages build in
/// parallel) with its elapsed time and the last [`TAIL_LINES`] lines of its output below it.
/// A finished step collapses to `✔ [image 3/4] RUN make  1.2s` (or `CACHED`), its output cleared;
/// a step still running when the renderer is dropped (the build failed) is printed as
/// `✘ ...` with its output tail kept, so the cause stays on screen above the error.
pub struct TtyProgress {
    bars: MultiProgress,
    width: usize,
    color: bool,
    running: Mutex<HashMap<StepKey, Running>>,
}

/// Identifies a step across its events: parallel stages interleave.
type StepKey = (String, Option<String>, usize);

struct Running {
    bar: ProgressBar,
    started: Instant,
    tail: VecDeque<String>,
}

fn step_key(s: &StepRef) -> StepKey {
    (s.image.clone(), s.stage.clone(), s.index)
}

impl TtyProgress {
    /// A renderer drawing on `target`, lines cut to `width` columns (a line wider than the
    /// terminal would wrap and break the redraw, which counts lines).
    pub fn new(target: ProgressDrawTarget, width: u16) -> Self {
        TtyProgress {
            bars: MultiProgress::with_draw_target(target),
            width: usize::from(width.max(20)),
            color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            running: Mutex::new(HashMap::new()),
        }
    }

    /// A line above the spinners and bars, not cut: a deploy's message must be read in full.
    pub(super) fn println(&self, line: &str) {
        let _ = self.bars.println(line);
    }

    /// A bar (a blob being moved) below the running steps.
    pub(super) fn add_bar(&self, total: u64) -> ProgressBar {
        self.bars.add(ProgressBar::new(total))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<StepKey, Running>> {
        self.running.lock_ok()
    }

    /// Prints a finished line above the spinners (best effort, like all progress output).
    fn print(&self, line: &str) {
        let _ = self.bars.println(truncate(line, self.width));
    }

    /// Prints `✔ text` or `✘ text`, the text cut to fit beside the mark.
    fn print_marked(&self, ok: bool, text: &str) {
        let _ = self.bars.println(format!(
            "{} {}",
            self.mark(ok),
            truncate(text, self.width.saturating_sub(2))
        ));
    }

    fn mark(&self, ok: bool) -> &'static str {
        match (ok, self.color) {
            (true, true) => "\x1b[32m✔\x1b[0m",
            (true, false) => "✔",
            (false, true) => "\x1b[31m✘\x1b[0m",
            (false, false) => "✘",
        }
    }

    /// The spinner line and output tail of a running step.
    fn running_message(&self, tail: &VecDeque<String>) -> String {
        let mut msg = String::new();
        for line in tail {
            msg.push('\n');
            // "  │ " plus the line, cut so it never wraps.
            msg.push_str(&truncate(&format!("  │ {line}"), self.width));
        }
        msg
    }

    fn start(&self, step: &StepRef) {
        let bar = self.bars.add(ProgressBar::new_spinner());
        // `{elapsed}` renders like `3s`; the step text is cut to leave room for it.
        let head = truncate(
            &format!("{} {}", prefix(step), step.text),
            self.width.saturating_sub(10),
        );
        let style = ProgressStyle::with_template("{spinner} {prefix}  {elapsed}{msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ");
        bar.set_style(style);
        bar.set_prefix(head);
        bar.enable_steady_tick(Duration::from_millis(100));
        let old = self.running().insert(
            step_key(step),
            Running {
                bar,
                started: Instant::now(),
                tail: VecDeque::new(),
            },
        );
        if let Some(old) = old {
            old.bar.finish_and_clear();
            self.bars.remove(&old.bar);
        }
    }

    fn finish(&self, step: &StepRef, what: &str) {
        if let Some(r) = self.running().remove(&step_key(step)) {
            r.bar.finish_and_clear();
            self.bars.remove(&r.bar);
        }
        // The result goes first when the line is too long: `CACHED` or the time must show.
        let text = format!("{} {}", prefix(step), step.text);
        let room = self.width.saturating_sub(2 + what.chars().count());
        self.print_marked(true, &format!("{}{what}", truncate(&text, room)));
    }

    fn output(&self, step: &StepRef, line: &str) {
        let mut running = self.running();
        match running.get_mut(&step_key(step)) {
            Some(r) => {
                if r.tail.len() == TAIL_LINES {
                    r.tail.pop_front();
                }
                // A tab or carriage return would move the cursor in ways the redraw
                // does not count.
                r.tail.push_back(line.replace(['\t', '\r'], " "));
                r.bar.set_message(self.running_message(&r.tail));
            }
            None => {
                drop(running);
                self.print(&format!("{} | {line}", prefix(step)));
            }
        }
    }
}

impl Progress for TtyProgress {
    fn event(&self, event: &Event) {
        match event {
            Event::StepStarted { step } => self.start(step),
            Event::StepCached { step } => self.finish(step, " CACHED"),
            Event::StepDone { step, duration } => {
                self.finish(step, &format!("  {:.1}s", duration.as_secs_f64()))
            }
            Event::Output { step, line } => self.output(step, line),
            other => {
                // Not cut: a warning or the built image's digest must be read in full, and
                // indicatif counts the rows a wrapped line takes.
                if let Some(line) = plain_line(other) {
                    let _ = self.bars.println(line);
                }
            }
        }
    }
}

impl Drop for TtyProgress {
    fn drop(&mut self) {
        // Steps still running when the build returns did not finish: the build failed (or
        // was cancelled). Keep their output tail on screen under a ✘ line.
        let running: Vec<(StepKey, Running)> = self.running().drain().collect();
        for (_, r) in running {
            r.bar.finish_and_clear();
            self.bars.remove(&r.bar);
            let what = format!("  failed after {:.1}s", r.started.elapsed().as_secs_f64());
            let room = self.width.saturating_sub(2 + what.chars().count());
            self.print_marked(false, &format!("{}{what}", truncate(&r.bar.prefix(), room)));
            for line in &r.tail {
                self.print(&format!("  │ {line}"));
            }
        }
    }
}

/// `s` cut to at most `width` characters (by `char`; wide glyphs are rare in step text).
fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut out: String = s.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The size (columns, rows) of the terminal on stderr: the kernel's window size, else
/// `$COLUMNS`/`$LINES`, else 80x24. indicatif relies on the terminal wrapping a line exactly at
/// its width, so the kernel's value (right after a resize too) beats a possibly stale variable.
pub(super) fn terminal_size() -> (u16, u16) {
    if let Ok(ws) = rustix::termios::tcgetwinsize(std::io::stderr())
        && ws.ws_col > 0
        && ws.ws_row > 0
    {
        return (ws.ws_col, ws.ws_row);
    }
    let var = |name: &str, default: u16| {
        std::env::var(name)
            .ok()
            .and_then(|c| c.parse().ok())
            .filter(|&c| c > 0)
            .unwrap_or(default)
    };
    (var("COLUMNS", 80), var("LINES", 24))
}

/// A terminal made of any writer: indicatif's redraw needs only a few ANSI cursor moves.
/// [`super::Output`] takes a writer (stderr in the CLI) rather than a `console::Term`, so `tty` output
/// goes where it is asked to, terminal or not.
pub(super) struct WriterTerm<W> {
    out: Mutex<W>,
    pub(super) width: u16,
    height: u16,
}

impl<W> WriterTerm<W> {
    pub(super) fn new(out: W, width: u16, height: u16) -> Self {
        WriterTerm {
            out: Mutex::new(out),
            width,
            height,
        }
    }

    fn write(&self, s: &str) -> std::io::Result<()>
    where
        W: Write,
    {
        let mut out = self.out.lock_ok();
        out.write_all(s.as_bytes())
    }
}

impl<W> std::fmt::Debug for WriterTerm<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterTerm")
            .field("width", &self.width)
            .field("height", &self.height)
            .finish()
    }
}

impl<W: Write + Send> TermLike for WriterTerm<W> {
    fn width(&self) -> u16 {
        self.width
    }
    fn height(&self) -> u16 {
        self.height
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.write(&format!("\x1b[{n}A"))
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.write(&format!("\x1b[{n}B"))
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.write(&format!("\x1b[{n}C"))
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.write(&format!("\x1b[{n}D"))
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write(s)?;
        self.write("\n")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.write(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.write("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut out = self.out.lock_ok();
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::tests::step;

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

    fn img_step(i: usize, text: &str) -> StepRef {
        StepRef {
            image: "app".into(),
            stage: None,
            index: i,
            total: 3,
            text: text.into(),
        }
    }

    fn tty(term: &indicatif::InMemoryTerm) -> TtyProgress {
        let mut p = TtyProgress::new(ProgressDrawTarget::term_like(Box::new(term.clone())), 60);
        p.color = false;
        p
    }

    /// Waits for the spinner's steady tick (100 ms) to redraw with the latest message; direct
    /// redraws are rate limited, so an intermediate state needs a tick to reach the screen.
    /// The screen once `ready` holds of it (the renderer redraws on its own tick, later on a
    /// loaded machine), or as it is after 5 s, for the assertions to report.
    fn screen_when(term: &indicatif::InMemoryTerm, ready: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let screen = term.contents();
            if ready(&screen) || std::time::Instant::now() >= deadline {
                return screen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn tty_collapses_finished_steps_and_clears_output() {
        let term = indicatif::InMemoryTerm::new(30, 60);
        let p = tty(&term);
        p.event(&Event::StepCached {
            step: img_step(1, "FROM busybox"),
        });
        let run = img_step(2, "RUN make");
        p.event(&Event::StepStarted { step: run.clone() });
        for i in 1..=7 {
            p.event(&Event::Output {
                step: run.clone(),
                line: format!("line {i}"),
            });
        }
        let screen = screen_when(&term, |s| {
            s.contains("✔ [app 1/3] FROM busybox CACHED")
                && s.contains("[app 2/3] RUN make")
                && s.contains("  │ line 7")
        });
        assert!(
            screen.contains("✔ [app 1/3] FROM busybox CACHED"),
            "{screen}"
        );
        assert!(screen.contains("[app 2/3] RUN make"), "{screen}");
        // Only the tail: the last five lines, under the running step.
        assert!(!screen.contains("line 2"), "{screen}");
        for i in 3..=7 {
            assert!(screen.contains(&format!("  │ line {i}")), "{screen}");
        }
        p.event(&Event::StepDone {
            step: run,
            duration: Duration::from_millis(1234),
        });
        p.event(&Event::StepCached {
            step: img_step(3, "CMD [\"make\"]"),
        });
        drop(p);
        let screen = term.contents();
        assert_eq!(
            screen,
            "✔ [app 1/3] FROM busybox CACHED\n✔ [app 2/3] RUN make  1.2s\n\
             ✔ [app 3/3] CMD [\"make\"] CACHED"
        );
    }

    #[test]
    fn tty_keeps_output_of_a_step_that_did_not_finish() {
        let term = indicatif::InMemoryTerm::new(30, 60);
        let p = tty(&term);
        let run = img_step(2, "RUN false");
        p.event(&Event::StepStarted { step: run.clone() });
        p.event(&Event::Output {
            step: run,
            line: "make: *** [all] Error 1".into(),
        });
        // The build returned an error: the CLI drops the renderer before printing it.
        drop(p);
        let screen = term.contents();
        let lines: Vec<&str> = screen.lines().collect();
        assert_eq!(lines.len(), 2, "{screen}");
        assert!(
            lines[0].starts_with("✘ [app 2/3] RUN false  failed after "),
            "{screen}"
        );
        assert_eq!(lines[1], "  │ make: *** [all] Error 1");
    }

    #[test]
    fn tty_runs_parallel_steps_on_separate_lines_and_cuts_long_lines() {
        let term = indicatif::InMemoryTerm::new(30, 60);
        let p = tty(&term);
        let a = StepRef {
            stage: Some("a".into()),
            ..img_step(1, "RUN sleep 1")
        };
        let b = StepRef {
            stage: Some("b".into()),
            ..img_step(1, "RUN sleep 2")
        };
        p.event(&Event::StepStarted { step: a.clone() });
        p.event(&Event::StepStarted { step: b.clone() });
        p.event(&Event::Output {
            step: b.clone(),
            line: "x".repeat(200),
        });
        let screen = screen_when(&term, |s| {
            s.contains("[app a 1/3] RUN sleep 1")
                && s.contains("[app b 1/3] RUN sleep 2")
                && s.contains("  │ xxx")
        });
        assert!(screen.contains("[app a 1/3] RUN sleep 1"), "{screen}");
        assert!(screen.contains("[app b 1/3] RUN sleep 2"), "{screen}");
        assert!(screen.lines().all(|l| l.chars().count() <= 60), "{screen}");
        assert!(screen.contains("  │ xxx"), "{screen}");
        p.event(&Event::StepDone {
            step: b,
            duration: Duration::from_millis(2000),
        });
        let screen = screen_when(&term, |s| {
            s.contains("✔ [app b 1/3] RUN sleep 2  2.0s")
                && !s.contains("xxx")
                && s.contains("[app a 1/3] RUN sleep 1")
        });
        assert!(
            screen.contains("✔ [app b 1/3] RUN sleep 2  2.0s"),
            "{screen}"
        );
        assert!(!screen.contains("xxx"), "{screen}");
        assert!(screen.contains("[app a 1/3] RUN sleep 1"), "{screen}");
        p.event(&Event::StepDone {
            step: a,
            duration: Duration::from_millis(1000),
        });
    }

    #[test]
    fn tty_renderer_writes_to_the_given_writer() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Shared::default();
        let p = super::super::Output::to(super::super::Mode::Tty, buf.clone());
        p.event(&Event::StepCached {
            step: img_step(1, "FROM busybox"),
        });
        drop(p);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        // indicatif pads each line to the terminal's width and lets the terminal wrap.
        assert!(out.contains("✔"), "{out:?}");
        assert!(out.contains(" [app 1/3] FROM busybox CACHED  "), "{out:?}");
    }
}
