//! [`Executor`]: the seam between the build engine and a container runtime. The engine
//! prepares a `RUN` step (its root filesystem as an overlay of the parent's snapshots over an
//! empty upper directory, its mounts, user, environment and network) and an executor runs the
//! process; whatever the process writes ends up in the upper directory, which the engine turns
//! into the step's layer. [`Runc`] is runc's (the runtime crate); another runtime, a microVM
//! say, stands here.

use std::path::PathBuf;

use strata_oci::sync::MutexExt;
use strata_runtime::{RunResult, RunSpec, RuntimeConfig};

use crate::error::Result;

/// Runs one step's process.
pub trait Executor: Send + Sync + std::fmt::Debug {
    /// Runs `spec` to its end, handing its output (stdout and stderr, interleaved) to `output`
    /// as it comes; returns how it ended. Changes to the root filesystem go to the spec's
    /// overlay upper directory.
    fn run(&self, spec: &RunSpec, output: &mut dyn FnMut(&[u8])) -> Result<RunResult>;
}

/// RUN steps under runc, state kept under `<store>/strata/runtime`; runc found as
/// [`RuntimeConfig::detect`] finds it (or the path given), once, at the first step.
#[derive(Debug)]
pub struct Runc {
    state_root: PathBuf,
    runc: Option<PathBuf>,
    config: std::sync::Mutex<Option<RuntimeConfig>>,
}

impl Runc {
    /// runc keeping its state under `state_root`; `runc` overrides the binary.
    pub fn new(state_root: PathBuf, runc: Option<PathBuf>) -> Runc {
        Runc {
            state_root,
            runc,
            config: std::sync::Mutex::new(None),
        }
    }

    fn config(&self) -> Result<RuntimeConfig> {
        let mut g = self.config.lock_ok();
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let mut cfg = RuntimeConfig::detect(self.state_root.clone())?;
        if let Some(r) = &self.runc {
            cfg.runc = r.clone();
        }
        *g = Some(cfg.clone());
        Ok(cfg)
    }
}

impl Executor for Runc {
    fn run(&self, spec: &RunSpec, output: &mut dyn FnMut(&[u8])) -> Result<RunResult> {
        Ok(strata_runtime::run(&self.config()?, spec, output)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use strata_runtime::Rootfs;

    use crate::progress::{CollectProgress, Event};
    use crate::{BuildOptions, build};

    /// A runtime that "runs" a step by writing its argv to `/out` in the upper directory (a
    /// fake for the engine's own logic: caching and explain; real RUN steps are tested with
    /// runc in the integration tests).
    #[derive(Debug, Default)]
    struct Scribe {
        runs: AtomicUsize,
    }

    impl Executor for Scribe {
        fn run(&self, spec: &RunSpec, output: &mut dyn FnMut(&[u8])) -> Result<RunResult> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let Rootfs::Overlay { upper, .. } = &spec.rootfs else {
                panic!("RUN steps get an overlay root");
            };
            std::fs::write(upper.join("out"), spec.args.join(" ")).unwrap();
            output(b"wrote /out\n");
            Ok(RunResult {
                exit_code: 0,
                signal: None,
            })
        }
    }

    #[test]
    fn run_steps_are_cached_by_their_inputs_and_explain_names_the_argument() {
        let store_dir = tempfile::tempdir().unwrap();
        let store = strata_store::Store::open(store_dir.path()).unwrap();
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            "FROM scratch\nARG V=1\nRUN make $V\n",
        )
        .unwrap();
        let scribe = Arc::new(Scribe::default());
        let opts = |v: &str| {
            let mut o = BuildOptions::new(ctx.path());
            o.tags = vec!["app:1".into()];
            o.explain = true;
            o.build_args.insert("V".into(), v.into());
            o.executor = Some(scribe.clone());
            o
        };
        let progress = CollectProgress::default();
        let first = build(&store, &opts("1"), &progress).unwrap();
        assert_eq!(
            (first.steps_run, scribe.runs.load(Ordering::SeqCst)),
            (1, 1)
        );
        assert!(
            progress
                .take()
                .iter()
                .any(|e| matches!(e, Event::Output { line, .. } if line == "wrote /out"))
        );
        // Its layer holds what the process wrote.
        let img = store.image("app:1").unwrap();
        assert_eq!(img.manifest.layers.len(), 1);

        // The same inputs: a hit, nothing runs.
        let again = build(&store, &opts("1"), &progress).unwrap();
        assert_eq!(
            (again.steps_run, scribe.runs.load(Ordering::SeqCst)),
            (0, 1)
        );
        assert_eq!(again.descriptor, first.descriptor);
        progress.take();

        // Another value of the argument: the step runs, and explain says why.
        let other = build(&store, &opts("2"), &progress).unwrap();
        assert_eq!(
            (other.steps_run, scribe.runs.load(Ordering::SeqCst)),
            (1, 2)
        );
        let reasons: Vec<String> = progress
            .take()
            .into_iter()
            .filter_map(|e| match e {
                Event::Explain { reason, .. } => Some(reason),
                _ => None,
            })
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains('V')),
            "explain does not name the argument: {reasons:?}"
        );
    }
}
