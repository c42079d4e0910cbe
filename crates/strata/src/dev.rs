//! `strata dev`: deploy an app, then keep its running machines current as its build context
//! changes: a change its `live_update` rules cover is written straight into the machines'
//! root filesystems from this host (no helper, shell or tar in the image); any other change
//! rebuilds and redeploys (docs/dev.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use strata_deploy::app::{App, LiveUpdate, load_apps};
use strata_deploy::deploy::project_file;
use strata_deploy::host::Host;
use strata_dockerfile::ignore::IgnoreMatcher;
use strata_oci::names;
use strata_runtime::SyncOp;
use strata_store::Store;

use serde::{Deserialize, Serialize};
use strata_deploy::live::LiveOp as Op;

use crate::cli::{DeployArgs, DevArgs};
use crate::output::{Note, Output};

/// How long the context must stay quiet before a batch of changes is acted on: editors write a
/// file in several steps (a temp file, a rename, a chmod), so the wait adapts to how far apart
/// a batch's events come, from 20 ms up to 50 ms, without the 200–500 ms other tools wait.
const QUIET_MIN: Duration = Duration::from_millis(20);
const QUIET_MAX: Duration = Duration::from_millis(50);

/// How long after a failed rebuild, with nothing else changed, it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// `strata dev [APP...]`: each app in a loop of its own (its own watcher, context and
/// machines), all reporting to one output; Ctrl-C ends them all, and so does an error in one.
pub fn dev(store_root: &Path, args: &DevArgs) -> Result<()> {
    let out = Output::new(args.progress);
    if args.apps.len() <= 1 {
        return dev_app(
            store_root,
            args,
            args.apps.first().map(String::as_str),
            &out,
        );
    }
    std::thread::scope(|s| {
        let loops: Vec<_> = args
            .apps
            .iter()
            .map(|name| {
                let out = out.clone();
                s.spawn(move || {
                    let r = dev_app(store_root, args, Some(name), &out)
                        .with_context(|| format!("strata dev of `{name}`"));
                    if r.is_err() {
                        // One app's loop failed: end the others' too.
                        strata_runtime::interrupt::request();
                    }
                    r
                })
            })
            .collect();
        let mut first_err = None;
        for l in loops {
            let r = l
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a dev loop panicked")));
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    })
}

/// `strata dev` of one app (`None`: the project's only app).
fn dev_app(store_root: &Path, args: &DevArgs, name: Option<&str>, out: &Output) -> Result<()> {
    let file = project_file(&args.project);
    let apps = load_apps(&file)?;
    let app = strata_deploy::app::pick_app(&apps, name, &file)?;
    // Where the machines are: `--host`, else the app's only host, else this one.
    let host = match (&args.host, app.spec.hosts.as_slice()) {
        (Some(h), _) => Some(h.clone()),
        (None, []) => None,
        (None, [one]) => Some(one.clone()),
        (None, many) => bail!(
            "app `{}` deploys to {} hosts ({}); strata dev keeps one current: name it with --host",
            app.name,
            many.len(),
            many.join(", ")
        ),
    };
    if args.reset {
        let there = match &host {
            Some(h) => Some(Remote::open(h, &args.project, &app.name, out)?),
            None => None,
        };
        return reset(store_root, &app.name, there, out);
    }
    let project = strata_build::Project::load(&file)?;
    let Some(image) = project.image(&app.spec.image).cloned() else {
        bail!(
            "app `{}`: its image `{}` is not an [[image]] of {}: strata dev watches a build \
             context, so the app must be built from strata.toml",
            app.name,
            app.spec.image,
            file.display()
        );
    };
    // Absolute: the watcher reports absolute paths, which are matched against it.
    let absolute = |p: std::path::PathBuf| std::fs::canonicalize(&p).unwrap_or(p);
    let context = absolute(project.context_of(&image));
    let ignore = ignore_of(&project, &image)?;
    // The project images the app's image is built on (its bases, transitively): a change in
    // their contexts rebuilds them and the app.
    let mut bases: Vec<(String, std::path::PathBuf, IgnoreMatcher)> = Vec::new();
    let mut todo: Vec<String> = project
        .deps
        .get(&image.name)
        .map(|d| d.iter().cloned().collect())
        .unwrap_or_default();
    while let Some(name) = todo.pop() {
        if bases.iter().any(|(n, _, _)| *n == name) {
            continue;
        }
        if let Some(spec) = project.image(&name) {
            bases.push((
                name.clone(),
                absolute(project.context_of(spec)),
                ignore_of(&project, spec)?,
            ));
            todo.extend(project.deps.get(&name).into_iter().flatten().cloned());
        }
    }
    let say = Say {
        out: out.clone(),
        app: app.name.clone(),
    };
    let deploy_args = DeployArgs {
        app: Some(app.name.clone()),
        project: args.project.clone(),
        build_only: false,
        push: false,
        image: None,
        image_label: None,
        insecure: false,
        detach: true,
        hosts: host.iter().cloned().collect(),
        relay: false,
        // `strata dev` keeps machines it can write into: here or on a host, whatever the
        // app's `target`.
        target: Some("local".into()),
        out: None,
        kube_context: None,
        spec: None,
        progress: args.progress,
    };
    redeploy(store_root, &deploy_args, &say.out)?;
    let mut target = match &host {
        Some(h) => Target::There(Box::new(Remote::open(
            h,
            &args.project,
            &app.name,
            &say.out,
        )?)),
        None => Target::Here,
    };
    // Synced files get the owner the build gives them (`COPY --chown`).
    let chowns = match &app.spec.live_update {
        Some(lu) => sync_chowns(store_root, &project, &image, lu)?,
        None => Vec::new(),
    };

    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .context("cannot watch the build context")?;
    use notify::Watcher;
    for dir in std::iter::once(&context).chain(bases.iter().map(|(_, c, _)| c)) {
        watcher
            .watch(dir, notify::RecursiveMode::Recursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    say.line(
        "watching",
        &format!(
            "watching {} for {} (Ctrl-C to stop)",
            context.display(),
            app.name
        ),
    );
    // What a failed rebuild left undeployed: the next batch rebuilds again with it, or, when
    // nothing else changes, a retry a moment later (a build that failed because the context
    // changed under it succeeds then). Nothing edited is ever dropped.
    let mut unsettled: Option<(Vec<String>, Instant)> = None;
    loop {
        if strata_runtime::interrupt::requested() {
            return Ok(());
        }
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some((what, since)) = &unsettled
                    && since.elapsed() >= RETRY_AFTER
                {
                    let what = what.clone();
                    unsettled = full(store_root, &deploy_args, &say, &what, Instant::now())
                        .then_some(())
                        .map_or(Some((what, Instant::now())), |()| None);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the file watcher stopped"),
        };
        let started = Instant::now();
        let mut raw = BTreeSet::new();
        collect(first, &mut raw);
        // Until the contexts are quiet: 20 ms after a save whose events come together, longer
        // (four times the widest gap seen between its events, up to 50 ms) when they come
        // spread out (an editor that writes, then renames, then chmods, a few ms apart).
        let mut quiet = QUIET_MIN;
        let mut last = Instant::now();
        while let Ok(ev) = rx.recv_timeout(quiet) {
            collect(ev, &mut raw);
            let gap = last.elapsed();
            last = Instant::now();
            quiet = quiet.max((gap * 4).clamp(QUIET_MIN, QUIET_MAX));
        }
        tracing::debug!(paths = ?raw, "context events");
        let base_change = raw.iter().find_map(|p| {
            bases.iter().find_map(|(name, ctx, ign)| {
                let rel = names::encode_os(p.strip_prefix(ctx).ok()?.as_os_str()).into_owned();
                // Kept in the string form: shown through `names::display` when printed.
                (!rel.is_empty() && !ign.matches(&rel)).then(|| format!("{rel} (base {name})"))
            })
        });
        let changed: Vec<String> = raw
            .iter()
            .filter_map(|p| p.strip_prefix(&context).ok())
            // A name that is not UTF-8 in its string form (strata_oci::names), not lossily.
            .map(|rel| names::encode_os(rel.as_os_str()).into_owned())
            .filter(|rel| !rel.is_empty() && !ignore.matches(rel))
            .collect();
        if let Some(what) = base_change {
            // A base changed: the next step rebuilds, with whatever was still unsettled.
            let mut all = unsettled.take().map(|(w, _)| w).unwrap_or_default();
            all.push(what);
            unsettled = Some((all, Instant::now()));
        }
        if changed.is_empty() && unsettled.is_none() {
            continue;
        }
        if let Some((mut what, _)) = unsettled.take() {
            what.extend(changed);
            what.sort();
            what.dedup();
            if !full(store_root, &deploy_args, &say, &what, started) {
                unsettled = Some((what, Instant::now()));
            }
            continue;
        }
        match plan(&app, &changed) {
            Some(syncs) => match collect_ops(&context, &syncs, &chowns)
                .and_then(|ops| target.apply(store_root, &app, &ops, &changed))
            {
                Ok((machines, ran)) => say.line(
                    "synced",
                    &format!(
                        "synced {} to {machines} machine(s) in {} ms{}",
                        describe(&syncs),
                        started.elapsed().as_millis(),
                        if ran.is_empty() {
                            String::new()
                        } else {
                            format!("; ran {}", ran.join(", "))
                        }
                    ),
                ),
                Err(e) => {
                    say.line(
                        "fallback",
                        &format!("live update failed ({e:#}); rebuilding and redeploying"),
                    );
                    if !full(store_root, &deploy_args, &say, &changed, started) {
                        unsettled = Some((changed, Instant::now()));
                    }
                }
            },
            None => {
                if !full(store_root, &deploy_args, &say, &changed, started) {
                    unsettled = Some((changed, Instant::now()));
                }
            }
        }
    }
}

/// What the loop reports: `dev` events (docs/cli.md), the deploys' own events between them.
struct Say {
    out: Output,
    app: String,
}

impl Say {
    fn line(&self, action: &str, message: &str) {
        self.out.note(&Note::Dev {
            app: self.app.clone(),
            action: action.to_string(),
            message: message.to_string(),
        });
    }
}

fn redeploy(store_root: &Path, args: &DeployArgs, out: &Output) -> Result<()> {
    let store = Store::open(store_root)?;
    crate::deploy::deploy_with(store, args, out)
}

/// Rebuilds and redeploys; whether that worked.
fn full(
    store_root: &Path,
    args: &DeployArgs,
    say: &Say,
    changed: &[String],
    started: Instant,
) -> bool {
    let what = changed
        .iter()
        .take(3)
        .map(|c| names::display(c))
        .collect::<Vec<_>>()
        .join(", ");
    match redeploy(store_root, args, &say.out) {
        Ok(()) => {
            say.line(
                "redeployed",
                &format!(
                    "rebuilt and redeployed in {:.1} s (changed: {what}{})",
                    started.elapsed().as_secs_f64(),
                    if changed.len() > 3 { ", …" } else { "" }
                ),
            );
            true
        }
        Err(e) => {
            say.line(
                "failed",
                &format!(
                    "rebuild failed ({e:#}); still watching, the running release is kept; \
                     the rebuild is tried again"
                ),
            );
            false
        }
    }
}

/// The paths of a watcher event.
fn collect(ev: notify::Result<notify::Event>, out: &mut BTreeSet<std::path::PathBuf>) {
    let Ok(ev) = ev else { return };
    if matches!(ev.kind, notify::EventKind::Access(_)) {
        return;
    }
    out.extend(ev.paths);
}

/// What the build of `spec` leaves out of its context: its `.dockerignore` and its `ignore`
/// patterns in strata.toml.
fn ignore_of(
    project: &strata_build::Project,
    spec: &strata_build::ImageSpec,
) -> Result<IgnoreMatcher> {
    let context = project.context_of(spec);
    let dockerfile = project.dockerfile_of(spec);
    let mut text = String::new();
    if let Some(p) = strata_dockerfile::ignore::find_ignore_file(&context, Some(&dockerfile)) {
        text = std::fs::read_to_string(&p).unwrap_or_default();
    }
    for pat in &spec.ignore {
        text.push('\n');
        text.push_str(pat);
    }
    Ok(IgnoreMatcher::parse(".dockerignore", &text)?)
}

/// (context path, machine path, index of its `sync` rule) for every changed path, when the
/// app's `live_update` covers them all; `None` means rebuild.
fn plan(app: &App, changed: &[String]) -> Option<Vec<(String, String, usize)>> {
    let lu: &LiveUpdate = app.spec.live_update.as_ref()?;
    let fall_back =
        IgnoreMatcher::parse("fall_back_on", &lu.fall_back_on.join("\n")).unwrap_or_default();
    let mut out = Vec::new();
    for rel in changed {
        if !lu.fall_back_on.is_empty() && fall_back.matches(rel) {
            return None;
        }
        let (rule, dest) = lu.sync.iter().enumerate().find_map(|(i, r)| {
            let src = strata_dockerfile::ignore::clean_path(&r.src);
            let src = src.trim_start_matches('/');
            if src.is_empty() || src == "." {
                return Some((i, format!("{}/{rel}", r.dest.trim_end_matches('/'))));
            }
            if rel == src {
                return Some((i, r.dest.clone()));
            }
            rel.strip_prefix(src)
                .and_then(|rest| rest.strip_prefix('/'))
                .map(|rest| (i, format!("{}/{rest}", r.dest.trim_end_matches('/'))))
        })?;
        out.push((rel.clone(), dest, rule));
    }
    Some(out)
}

/// Where the app's machines are: this host, or a host over SSH (`strata dev --host`).
enum Target {
    Here,
    There(Box<Remote>),
}

impl Target {
    fn apply(
        &mut self,
        store_root: &Path,
        app: &App,
        ops: &[Op],
        changed: &[String],
    ) -> Result<(usize, Vec<String>)> {
        match self {
            Target::Here => apply_ops(store_root, app, ops, changed),
            Target::There(remote) => match remote.apply(ops, changed) {
                Err(e) if remote.broken => {
                    // A dropped connection (a network blip, the host's strata killed): open it
                    // again and send the batch once more; a second failure falls back.
                    let again = remote
                        .reopen()
                        .with_context(|| format!("{e:#}; and opening it again failed"))?;
                    **remote = again;
                    remote.out.note(&Note::Info {
                        message: format!("reconnected to {} ({e:#})", remote.name),
                    });
                    remote.apply(ops, changed)
                }
                other => other,
            },
        }
    }
}

/// One frame of the stream `strata dev --host` sends to `strata dev-apply` on the host: a
/// JSON line, followed for a file by its bytes. `commit` ends a batch; the host answers it
/// with one [`Applied`] line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Frame {
    File {
        dest: String,
        mode: u32,
        size: u64,
        owner: Option<String>,
    },
    Dir {
        dest: String,
        mode: u32,
        owner: Option<String>,
    },
    Symlink {
        dest: String,
        /// In the string form of `strata_oci::names`: JSON holds no bytes that are not UTF-8.
        target: String,
        owner: Option<String>,
    },
    Remove {
        dest: String,
    },
    Commit {
        changed: Vec<String>,
    },
    /// `strata dev --reset`: drop the app's dev layers and restart its machines.
    Reset,
}

/// The host's answer to a batch.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Applied {
    machines: usize,
    ran: Vec<String>,
    error: Option<String>,
}

/// `strata dev-apply` on a host over SSH, kept running for the loop.
struct Remote {
    name: String,
    /// What opened it (`--host`'s value, the project, the app, the output), to open it again.
    spec: String,
    project: std::path::PathBuf,
    app: String,
    out: Output,
    /// The connection broke (a write failed, or the host ended it): open it again.
    broken: bool,
    child: std::process::Child,
    input: std::io::BufWriter<std::process::ChildStdin>,
    output: std::io::BufReader<std::process::ChildStdout>,
    // Keeps the multiplexed connection the command runs on.
    _session: strata_transfer::ssh::HostSession,
}

impl Remote {
    fn open(spec: &str, project: &Path, app: &str, out: &Output) -> Result<Remote> {
        use std::process::Stdio;
        let host = crate::hosts::resolve_host(spec, project)?;
        let session = strata_transfer::ssh::HostSession::connect(
            &host,
            &crate::hosts::connect_options(&out.for_host(&host.name)),
        )?;
        let app_spec = crate::hosts::app_spec_for_host(&project_file(project), app)?;
        let mut child = session
            .strata_command(&[], &["dev-apply", app, "--spec", &app_spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run ssh for {}", host.name))?;
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("no pipes to ssh for {}", host.name);
        };
        Ok(Remote {
            name: host.name.clone(),
            spec: spec.to_string(),
            project: project.to_path_buf(),
            app: app.to_string(),
            out: out.clone(),
            broken: false,
            child,
            input: std::io::BufWriter::new(input),
            output: std::io::BufReader::new(output),
            _session: session,
        })
    }

    /// The same connection, made again.
    fn reopen(&self) -> Result<Remote> {
        Remote::open(&self.spec, &self.project, &self.app, &self.out)
    }

    /// Sends a batch of file operations and the commit that ends it; the host's answer.
    fn apply(&mut self, ops: &[Op], changed: &[String]) -> Result<(usize, Vec<String>)> {
        for Op { dest, op, owner } in ops {
            let dest = dest.clone();
            let owner = owner.clone();
            let (frame, bytes) = match op {
                SyncOp::File { from, mode } => match std::fs::read(from) {
                    Ok(b) => (
                        Frame::File {
                            dest,
                            mode: *mode,
                            size: b.len() as u64,
                            owner,
                        },
                        b,
                    ),
                    // Gone while it was read: gone there too (as on this host).
                    Err(e) if gone(&e) => (Frame::Remove { dest }, Vec::new()),
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot read {}", from.display()));
                    }
                },
                SyncOp::Dir { mode } => (
                    Frame::Dir {
                        dest,
                        mode: *mode,
                        owner,
                    },
                    Vec::new(),
                ),
                SyncOp::Symlink { target } => (
                    Frame::Symlink {
                        dest,
                        target: names::encode_os(target.as_os_str()).into_owned(),
                        owner,
                    },
                    Vec::new(),
                ),
                SyncOp::Remove => (Frame::Remove { dest }, Vec::new()),
            };
            self.write_frame(&frame, &bytes)?;
        }
        let commit = Frame::Commit {
            changed: changed.to_vec(),
        };
        self.write_frame(&commit, &[])?;
        let applied = self.answer()?;
        Ok((applied.machines, applied.ran))
    }

    /// `strata dev --reset` there: the app's dev layers dropped and its machines restarted.
    fn reset(&mut self) -> Result<usize> {
        self.write_frame(&Frame::Reset, &[])?;
        Ok(self.answer()?.machines)
    }

    /// Writes `frame`'s line and the `bytes` that follow it; a failed write marks the
    /// connection broken.
    fn write_frame(&mut self, frame: &Frame, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let line = serde_json::to_string(frame)?;
        let written = writeln!(self.input, "{line}").and_then(|()| self.input.write_all(bytes));
        written.map_err(|e| self.lost(e))
    }

    /// Flushes what was written and reads the host's answer to it: an error the host reports
    /// is an error here; a connection that fails or ends is marked broken.
    fn answer(&mut self) -> Result<Applied> {
        use std::io::{BufRead, Write};
        self.input.flush().map_err(|e| self.lost(e))?;
        let mut line = String::new();
        if self.output.read_line(&mut line).map_err(|e| self.lost(e))? == 0 {
            self.broken = true;
            let status = self.child.try_wait().ok().flatten();
            bail!(
                "strata on {} ended the dev connection ({status:?})",
                self.name
            );
        }
        let applied: Applied = serde_json::from_str(&line)
            .with_context(|| format!("{} answered {line:?}", self.name))?;
        match applied.error {
            Some(e) => bail!("on {}: {e}", self.name),
            None => Ok(applied),
        }
    }

    fn lost(&mut self, e: std::io::Error) -> anyhow::Error {
        self.broken = true;
        anyhow::anyhow!("the dev connection to {} broke: {e}", self.name)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `strata dev-apply APP --spec TOML` (run by `strata dev --host` over SSH): applies the
/// batches of file operations read on stdin to the app's machines here, answering each batch
/// on stdout, until stdin ends.
pub fn dev_apply(store_root: &Path, app: &str, spec: &str) -> Result<()> {
    use std::io::{BufRead, Read, Write};
    let apps = strata_deploy::app::parse_apps(spec, Path::new("--spec"))?;
    let app = strata_deploy::app::pick_app(&apps, Some(app), Path::new("--spec"))?;
    // In the store's temp directory, named for this process: a `strata gc` sweeps it if the
    // process is killed before it removes it.
    let tmp = tempfile::Builder::new()
        .prefix(&strata_store::temp_prefix("dev-apply"))
        .tempdir_in(store_root.join("strata/tmp"))
        .context("cannot make a temporary directory in the store")?;
    let mut input = std::io::BufReader::new(std::io::stdin().lock());
    let mut out = std::io::stdout().lock();
    let mut ops: Vec<Op> = Vec::new();
    let mut n = 0u64;
    loop {
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let frame: Frame =
            serde_json::from_str(&line).with_context(|| format!("bad frame {line:?}"))?;
        match frame {
            Frame::File {
                dest,
                mode,
                size,
                owner,
            } => {
                n += 1;
                let path = tmp.path().join(n.to_string());
                let mut f = std::fs::File::create(&path)?;
                let copied = std::io::copy(&mut (&mut input).take(size), &mut f)?;
                if copied != size {
                    bail!("the stream ended inside {dest}");
                }
                ops.push(Op {
                    dest,
                    op: SyncOp::File { from: path, mode },
                    owner,
                });
            }
            Frame::Dir { dest, mode, owner } => ops.push(Op {
                dest,
                op: SyncOp::Dir { mode },
                owner,
            }),
            Frame::Symlink {
                dest,
                target,
                owner,
            } => ops.push(Op {
                dest,
                op: SyncOp::Symlink {
                    target: names::decode(&target).into_owned().into(),
                },
                owner,
            }),
            Frame::Remove { dest } => ops.push(Op {
                dest,
                op: SyncOp::Remove,
                owner: None,
            }),
            Frame::Reset => {
                let applied = match reset_here(store_root, &app.name) {
                    Ok(machines) => Applied {
                        machines,
                        ..Applied::default()
                    },
                    Err(e) => Applied {
                        error: Some(format!("{e:#}")),
                        ..Applied::default()
                    },
                };
                writeln!(out, "{}", serde_json::to_string(&applied)?)?;
                out.flush()?;
            }
            Frame::Commit { changed } => {
                let applied = match apply_ops(store_root, &app, &ops, &changed) {
                    Ok((machines, ran)) => Applied {
                        machines,
                        ran,
                        error: None,
                    },
                    Err(e) => Applied {
                        error: Some(format!("{e:#}")),
                        ..Applied::default()
                    },
                };
                for op in ops.drain(..) {
                    if let SyncOp::File { from, .. } = op.op {
                        let _ = std::fs::remove_file(from);
                    }
                }
                writeln!(out, "{}", serde_json::to_string(&applied)?)?;
                out.flush()?;
            }
        }
    }
}

/// The ops for `syncs` (context path, machine path, rule), read from the context now.
fn collect_ops(
    context: &Path,
    syncs: &[(String, String, usize)],
    chowns: &[Option<String>],
) -> Result<Vec<Op>> {
    let mut ops: Vec<Op> = Vec::new();
    for (rel, dest, rule) in syncs {
        let owner = chowns.get(*rule).cloned().flatten();
        let op = op_for(&context.join(names::decode(rel)))?;
        let is_dir = matches!(op, SyncOp::Dir { .. });
        ops.push(Op {
            dest: dest.clone(),
            op,
            owner: owner.clone(),
        });
        if is_dir {
            // A new directory's contents may have been written before the watcher saw the
            // directory (inotify watches a new directory only once it exists): send them all.
            subtree(&context.join(names::decode(rel)), dest, &owner, &mut ops)?;
        }
    }
    Ok(ops)
}

/// Writes `ops` into every running machine of the app here (and the dev layer of its image),
/// then runs the `run` rules `changed` triggers and restarts the machines if the app says so.
/// Returns how many machines were updated and what ran.
fn apply_ops(
    store_root: &Path,
    app: &App,
    ops: &[Op],
    changed: &[String],
) -> Result<(usize, Vec<String>)> {
    let host = Host::open(Store::open(store_root)?)?;
    let mut commands = Vec::new();
    let mut restart = false;
    if let Some(lu) = &app.spec.live_update {
        for rule in &lu.run {
            let matcher =
                IgnoreMatcher::parse("trigger", &rule.trigger.join("\n")).unwrap_or_default();
            if rule.trigger.is_empty() || changed.iter().any(|c| matcher.matches(c)) {
                commands.push(rule.cmd.clone());
            }
        }
        restart = lu.restart.as_deref() == Some("process");
    }
    let exe = std::env::current_exe().context("cannot find the strata binary")?;
    let applied = strata_deploy::live::apply(&host, &app.name, ops, &commands, restart, &exe)?;
    Ok((applied.machines, applied.ran))
}

/// `strata dev --reset APP`: the app's dev layers removed, its running machines restarted
/// on their image as built.
fn reset(store_root: &Path, app: &str, there: Option<Remote>, out: &Output) -> Result<()> {
    let restarted = match there {
        Some(mut remote) => remote.reset()?,
        None => reset_here(store_root, app)?,
    };
    out.note(&Note::Dev {
        app: app.to_string(),
        action: "reset".into(),
        message: format!(
            "{app}: dev changes dropped, {restarted} machine(s) restarted on the deployed image"
        ),
    });
    Ok(())
}

/// Drops the app's dev layers on this host and restarts its running machines; how many.
fn reset_here(store_root: &Path, app: &str) -> Result<usize> {
    let host = Host::open(Store::open(store_root)?)?;
    let exe = std::env::current_exe().context("cannot find the strata binary")?;
    Ok(strata_deploy::live::reset(&host, app, &exe)?)
}

/// Per sync rule of `lu`, the `--chown` of the COPY from the build context in the image's
/// target stage that last wrote the rule's destination or a directory above it (`None`: root,
/// as a COPY without `--chown` gives).
fn sync_chowns(
    store_root: &Path,
    project: &strata_build::Project,
    image: &strata_build::ImageSpec,
    lu: &LiveUpdate,
) -> Result<Vec<Option<String>>> {
    let store = Store::open(store_root)?;
    let df = strata_dockerfile::Dockerfile::from_file(&project.dockerfile_of(image))?;
    let args = strata_build::plan::with_platform_args(&image.build_args);
    let pinned = BTreeMap::new();
    let resolver = strata_build::StoreResolver::new(&store, &pinned);
    let plan = strata_build::plan(
        &df,
        &strata_build::PlanOptions {
            build_args: &args,
            target: image.target.as_deref(),
            from_override: image.from.as_deref(),
            images: &resolver,
            network: strata_build::NetworkMode::default(),
        },
    )?;
    let Some(stage) = plan.stages.iter().find(|s| s.index == plan.target) else {
        return Ok(vec![None; lu.sync.len()]);
    };
    // Both without a trailing `/` (`/` itself is the empty string, above every path).
    let under = |dest: &str, dir: &str| {
        dest == dir || dest.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
    };
    Ok(lu
        .sync
        .iter()
        .map(|rule| {
            let dest = rule.dest.trim_end_matches('/');
            stage
                .steps
                .iter()
                .rev()
                .find_map(|st| match &st.kind {
                    strata_build::StepKind::Copy(c)
                        if matches!(c.from, strata_build::plan::FileSource::Context)
                            && under(dest, c.dest.trim_end_matches('/')) =>
                    {
                        Some(c.chown.clone())
                    }
                    _ => None,
                })
                .flatten()
        })
        .collect())
}

/// Every entry below the local directory `dir`, as ops at `dest`/… (parents first), owned by
/// `owner`'s `--chown` like the directory.
fn subtree(dir: &Path, dest: &str, owner: &Option<String>, ops: &mut Vec<Op>) -> Result<()> {
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok()).collect(),
        // Removed meanwhile: its removal is the next batch's.
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let d = format!(
            "{}/{}",
            dest.trim_end_matches('/'),
            names::encode_os(&e.file_name())
        );
        let op = op_for(&path)?;
        let is_dir = matches!(op, SyncOp::Dir { .. });
        ops.push(Op {
            dest: d.clone(),
            op,
            owner: owner.clone(),
        });
        if is_dir {
            subtree(&path, &d, owner, ops)?;
        }
    }
    Ok(())
}

/// Whether an error says the path is not there (anymore): removed, or a parent is no longer a
/// directory. The context changes while it is read; such a path is synced as removed, and the
/// event of what replaced it comes in the next batch.
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// What a context path is now: a file, directory or symlink to copy, or gone.
fn op_for(path: &Path) -> Result<SyncOp> {
    use std::os::unix::fs::PermissionsExt;
    Ok(match std::fs::symlink_metadata(path) {
        Err(e) if gone(&e) => SyncOp::Remove,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(path) {
            Ok(target) => SyncOp::Symlink { target },
            Err(e) if gone(&e) => SyncOp::Remove,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        },
        Ok(m) if m.is_dir() => SyncOp::Dir {
            mode: m.permissions().mode(),
        },
        Ok(m) => SyncOp::File {
            from: path.to_path_buf(),
            mode: m.permissions().mode(),
        },
    })
}

fn describe(syncs: &[(String, String, usize)]) -> String {
    let mut s: Vec<String> = syncs
        .iter()
        .take(3)
        .map(|(rel, dest, _)| format!("{} → {}", names::display(rel), names::display(dest)))
        .collect();
    if syncs.len() > 3 {
        s.push(format!("and {} more", syncs.len() - 3));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    /// A symlink whose target is not UTF-8 crosses the JSON frames to a host and back intact
    /// (a `PathBuf` field could not be serialized at all).
    #[test]
    fn a_symlink_target_that_is_not_utf8_survives_the_frames() {
        let target = std::ffi::OsStr::from_bytes(b"../bad\xffname");
        let frame = Frame::Symlink {
            dest: names::encode_os(std::ffi::OsStr::from_bytes(b"/www/l\xfe")).into_owned(),
            target: names::encode_os(target).into_owned(),
            owner: None,
        };
        let line = serde_json::to_string(&frame).unwrap();
        let Frame::Symlink {
            dest, target: t, ..
        } = serde_json::from_str(&line).unwrap()
        else {
            panic!("{line}");
        };
        assert_eq!(names::decode(&t).as_bytes(), target.as_bytes());
        assert_eq!(names::decode(&dest).as_bytes(), b"/www/l\xfe");
    }
}
