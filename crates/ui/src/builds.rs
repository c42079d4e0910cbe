//! The Builds page's model: a build journal (see [`crate::journal`]) read back into images
//! and their steps, each cached, running, ran or failed, with durations.

use std::path::Path;

/// What became of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepStatus {
    Cached,
    Running,
    Ran,
    /// It was running when the build failed or was killed.
    Failed,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Cached => "cached",
            StepStatus::Running => "running",
            StepStatus::Ran => "ran",
            StepStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepView {
    pub stage: Option<String>,
    pub index: u64,
    pub total: u64,
    pub text: String,
    pub status: StepStatus,
    /// Seconds, for steps that ran.
    pub seconds: Option<f64>,
    /// The last lines of its output (RUN).
    pub output: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageView {
    pub name: String,
    pub steps: Vec<StepView>,
    /// `built in 1.2 s (2 run, 3 cached)`, `rebased onto …` once done.
    pub done: Option<String>,
}

/// How a build ended, or that it has not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildStatus {
    Running,
    Succeeded,
    Failed(String),
    /// Its process is gone without saying how it ended (killed).
    Interrupted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BuildView {
    /// The journal's file name: the build's id on the page.
    pub id: String,
    pub command: String,
    /// Unix ms.
    pub started: u64,
    pub status: BuildStatus,
    pub images: Vec<ImageView>,
}

/// How many output lines of a step the page shows.
const OUTPUT_LINES: usize = 5;

/// Reads one journal; `pid_alive` says whether a process still runs (for builds without an
/// end).
pub fn read(path: &Path, pid_alive: impl Fn(u32) -> bool) -> Option<BuildView> {
    let text = std::fs::read_to_string(path).ok()?;
    let id = path.file_stem()?.to_string_lossy().into_owned();
    let mut view = BuildView {
        id,
        command: String::new(),
        started: 0,
        status: BuildStatus::Running,
        images: Vec::new(),
    };
    let mut pid = None;
    // A line being written when we read has no newline yet: only whole lines count.
    let whole = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    for line in whole.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        apply(&mut view, &v, &mut pid);
    }
    if view.status == BuildStatus::Running && !pid.is_some_and(pid_alive) {
        view.status = BuildStatus::Interrupted;
    }
    if view.status != BuildStatus::Running {
        fail_running(&mut view);
    }
    Some(view)
}

fn fail_running(view: &mut BuildView) {
    for s in view.images.iter_mut().flat_map(|i| i.steps.iter_mut()) {
        if s.status == StepStatus::Running {
            s.status = StepStatus::Failed;
        }
    }
}

fn apply(view: &mut BuildView, v: &serde_json::Value, pid: &mut Option<u32>) {
    let str_of =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|s| s.as_str()).map(String::from);
    match v.get("event").and_then(|e| e.as_str()).unwrap_or("") {
        "journal" => {
            view.command = str_of(v, "command").unwrap_or_default();
            view.started = v.get("at").and_then(|a| a.as_u64()).unwrap_or(0);
            *pid = v.get("pid").and_then(|p| p.as_u64()).map(|p| p as u32);
        }
        "build_started" => {
            let name = str_of(v, "image").unwrap_or_default();
            image_mut(view, &name);
        }
        kind @ ("step_started" | "step_cached" | "step_done" | "output") => {
            let Some(step) = v.get("step") else { return };
            let image = str_of(step, "image").unwrap_or_default();
            let stage = str_of(step, "stage");
            let index = step.get("index").and_then(|i| i.as_u64()).unwrap_or(0);
            let total = step.get("total").and_then(|i| i.as_u64()).unwrap_or(0);
            let text = str_of(step, "text").unwrap_or_default();
            let img = image_mut(view, &image);
            let pos = img
                .steps
                .iter()
                .position(|s| s.stage == stage && s.index == index && s.text == text);
            let s = match pos {
                Some(p) => &mut img.steps[p],
                None => {
                    img.steps.push(StepView {
                        stage,
                        index,
                        total,
                        text,
                        status: StepStatus::Running,
                        seconds: None,
                        output: Vec::new(),
                    });
                    img.steps.last_mut().expect("just pushed")
                }
            };
            match kind {
                "step_cached" => s.status = StepStatus::Cached,
                "step_done" => {
                    s.status = StepStatus::Ran;
                    s.seconds = v.get("duration").and_then(|d| d.as_f64());
                }
                "output" => {
                    if let Some(line) = str_of(v, "line") {
                        s.output.push(line);
                        let n = s.output.len();
                        if n > OUTPUT_LINES {
                            s.output.drain(..n - OUTPUT_LINES);
                        }
                    }
                }
                _ => {}
            }
        }
        "image_done" => {
            let name = str_of(v, "image").unwrap_or_default();
            let secs = v.get("duration").and_then(|d| d.as_f64()).unwrap_or(0.0);
            let run = v.get("steps_run").and_then(|d| d.as_u64()).unwrap_or(0);
            let cached = v.get("steps_cached").and_then(|d| d.as_u64()).unwrap_or(0);
            let img = image_mut(view, &name);
            let already = img.done.take();
            img.done = Some(match already {
                Some(rebased) if rebased.starts_with("rebased") => rebased,
                _ => format!("built in {secs:.2} s ({run} run, {cached} cached)"),
            });
        }
        "rebased" => {
            let name = str_of(v, "image").unwrap_or_default();
            let onto = str_of(v, "onto").unwrap_or_default();
            image_mut(view, &name).done = Some(format!("rebased onto {onto} (no step ran)"));
        }
        "finished" => {
            if v.get("ok").and_then(|o| o.as_bool()) == Some(true) {
                view.status = BuildStatus::Succeeded;
            } else {
                view.status = BuildStatus::Failed(str_of(v, "error").unwrap_or_default());
            }
        }
        _ => {}
    }
}

fn image_mut<'a>(view: &'a mut BuildView, name: &str) -> &'a mut ImageView {
    match view.images.iter().position(|i| i.name == name) {
        Some(p) => &mut view.images[p],
        None => {
            view.images.push(ImageView {
                name: name.to_string(),
                steps: Vec::new(),
                done: None,
            });
            view.images.last_mut().expect("just pushed")
        }
    }
}

/// The newest `n` builds of the store, newest first.
pub fn recent(store_root: &Path, n: usize) -> Vec<BuildView> {
    let files = crate::journal::list(&crate::journal::dir(store_root));
    files
        .iter()
        .rev()
        .take(n)
        .filter_map(|p| read(p, |pid| Path::new(&format!("/proc/{pid}")).exists()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: u64, text: &str) -> serde_json::Value {
        serde_json::json!({"image": "web", "stage": null, "index": i, "total": 3, "text": text})
    }

    #[test]
    fn steps_are_cached_ran_or_failed_and_a_killed_build_is_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("1-1.jsonl");
        let lines = [
            serde_json::json!({"event": "journal", "command": "build", "pid": 1, "at": 5}),
            serde_json::json!({"event": "build_started", "image": "web", "stages": 1}),
            serde_json::json!({"event": "step_cached", "step": step(1, "FROM busybox")}),
            serde_json::json!({"event": "step_started", "step": step(2, "RUN make")}),
            serde_json::json!({"event": "output", "step": step(2, "RUN make"), "line": "cc a.c"}),
            serde_json::json!({"event": "step_done", "step": step(2, "RUN make"), "duration": 1.5}),
            serde_json::json!({"event": "step_started", "step": step(3, "RUN test")}),
        ];
        let mut text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        text.push_str("{\"event\":\"step_done\""); // a line being written
        std::fs::write(&p, &text).unwrap();

        let running = read(&p, |_| true).unwrap();
        assert_eq!(running.status, BuildStatus::Running);
        assert_eq!(running.command, "build");
        let steps = &running.images[0].steps;
        let st: Vec<_> = steps.iter().map(|s| s.status).collect();
        assert_eq!(
            st,
            [StepStatus::Cached, StepStatus::Ran, StepStatus::Running]
        );
        assert_eq!(steps[1].seconds, Some(1.5));
        assert_eq!(steps[1].output, ["cc a.c"]);

        let killed = read(&p, |_| false).unwrap();
        assert_eq!(killed.status, BuildStatus::Interrupted);
        assert_eq!(killed.images[0].steps[2].status, StepStatus::Failed);

        let end = serde_json::json!({"event": "finished", "ok": false, "error": "exit 2"});
        std::fs::write(
            &p,
            format!("{}{end}\n", &text[..text.rfind('\n').unwrap() + 1]),
        )
        .unwrap();
        let failed = read(&p, |_| true).unwrap();
        assert_eq!(failed.status, BuildStatus::Failed("exit 2".into()));
        assert_eq!(failed.images[0].steps[2].status, StepStatus::Failed);
    }
}
