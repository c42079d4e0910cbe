//! The runc driver: bundle directory, overlay mount, `runc run`, and cleanup.

use std::ffi::{CString, OsStr};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;

use rustix::mount::{MountFlags, UnmountFlags};

use crate::error::{Error, Result};
use crate::inroot;
use crate::spec::{self, BundleSetup};
use crate::{MountSpec, Rootfs, RunResult, RunSpec, RuntimeConfig};

/// Name of the file in a bundle that records which process owns it (`<pid> <start time>`),
/// so [`cleanup_stale`] leaves the bundles of live processes alone.
const OWNER_FILE: &str = "owner";
/// runc's JSON log inside the bundle: how runc's own failures are told apart from the
/// process's exit status (both reach us through the same stderr and exit code).
const RUNC_LOG: &str = "runc.log";
/// How much of the process's stderr is kept for an error message.
const STDERR_TAIL: usize = 8 * 1024;
/// Largest overlay option string the kernel accepts (one page, NUL included).
const MAX_MOUNT_DATA: usize = 4095;

pub(crate) fn io_err<'a>(
    id: &'a str,
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        id: id.to_string(),
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes file `path`; one that is not there is fine.
pub(crate) fn remove_file_if_exists(id: &str, path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(id, "removing", path)(e)),
    }
}

fn invalid(spec: &RunSpec, reason: impl Into<String>) -> Error {
    Error::InvalidSpec {
        id: spec.id.clone(),
        reason: reason.into(),
    }
}

/// runc accepts `^[\w+-\.]+$`; we also refuse a leading `.` so an id is never `.`/`..`.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'+'))
}

fn validate(spec: &RunSpec) -> Result<()> {
    if !valid_id(&spec.id) {
        return Err(invalid(
            spec,
            "container id must be letters, digits, `_.+-`, not starting with `.`",
        ));
    }
    if spec.args.is_empty() {
        return Err(invalid(spec, "no command (args is empty)"));
    }
    if !spec.cwd.starts_with('/') {
        return Err(invalid(
            spec,
            format!("working directory `{}` is not absolute", spec.cwd),
        ));
    }
    for m in &spec.mounts {
        let target = match m {
            MountSpec::Bind { source, target, .. } => {
                if !source.is_absolute() {
                    return Err(invalid(
                        spec,
                        format!("bind source `{}` is not absolute", source.display()),
                    ));
                }
                target
            }
            MountSpec::Tmpfs { target, .. } => target,
        };
        if !target.starts_with('/')
            || Path::new(target)
                .components()
                .any(|c| c.as_os_str() == "..")
        {
            return Err(invalid(
                spec,
                format!("mount target `{target}` must be absolute without `..`"),
            ));
        }
    }
    if let Some(bad) = spec.env.iter().find(|e| !e.contains('=')) {
        return Err(invalid(
            spec,
            format!("environment entry `{bad}` has no `=`"),
        ));
    }
    Ok(())
}

/// Runs `spec` to completion under runc. The process's stdout and stderr are handed to
/// `output` chunk by chunk as they arrive (stdin is `/dev/null`).
///
/// A process that exits non-zero or is killed is a normal [`RunResult`]; an `Err` means the
/// container could not be set up or runc itself failed ([`Error::Runc`] carries runc's
/// message). Whatever happens, including a panic in `output`, the container is deleted, the
/// overlay unmounted and the bundle directory removed.
pub fn run(
    cfg: &RuntimeConfig,
    spec: &RunSpec,
    output: &mut dyn FnMut(&[u8]),
) -> Result<RunResult> {
    validate(spec)?;
    let id = spec.id.as_str();
    let bundles = cfg.bundles_dir();
    std::fs::create_dir_all(&bundles).map_err(io_err(
        id,
        "creating bundles directory",
        &bundles,
    ))?;
    let dir = cfg.bundle_dir(id);
    if let Err(e) = std::fs::create_dir(&dir) {
        return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
            invalid(
                spec,
                format!(
                    "bundle `{}` already exists (id in use, or left by a killed process: see cleanup_stale)",
                    dir.display()
                ),
            )
        } else {
            io_err(id, "creating bundle directory", &dir)(e)
        });
    }
    let mut bundle = Bundle {
        cfg,
        id,
        dir,
        overlay: None,
        rootfs: PathBuf::new(),
        stubs: Vec::new(),
        child: None,
        reaper: None,
        finished: false,
    };
    let owner = bundle.dir.join(OWNER_FILE);
    std::fs::write(&owner, owner_stamp(std::process::id()).unwrap_or_default())
        .map_err(io_err(id, "writing", &owner))?;

    let result = bundle
        .prepare(spec)
        .and_then(|()| bundle.start_and_wait(output));
    let cleaned = bundle.finish();
    let r = result?;
    cleaned?;
    Ok(r)
}

/// One bundle directory and everything set up for it; dropping it cleans up.
struct Bundle<'a> {
    cfg: &'a RuntimeConfig,
    id: &'a str,
    dir: PathBuf,
    /// The overlay mount point, once mounted.
    overlay: Option<PathBuf>,
    rootfs: PathBuf,
    /// Mount points runc will create in the rootfs (relative, parents before children);
    /// removed afterwards so they do not end up in a layer.
    stubs: Vec<PathBuf>,
    child: Option<Child>,
    /// Kills the container if this process dies before [`Bundle::finish`]; see [`Reaper`].
    reaper: Option<Reaper>,
    finished: bool,
}

/// A watchdog for one RUN container: `sh` in a process group of its own (a terminal's Ctrl-C
/// does not reach it), reading a pipe whose write end only this process holds. When the pipe
/// ends without the word `done` (this process died, even by `kill -9`), it kills and deletes
/// the container, so no RUN outlives its build. [`Reaper::dismiss`] sends `done` once the
/// container is gone. The mount and bundle a killed build leaves are reclaimed by the next
/// command (`cleanup_stale_in`); the running process is what cannot wait.
struct Reaper {
    child: Child,
}

impl Reaper {
    fn start(cfg: &RuntimeConfig, id: &str) -> Option<Reaper> {
        use std::os::unix::process::CommandExt;
        let script = r#"read word; [ "$word" = done ] && exit 0
"$1" --root "$2" kill "$3" KILL 2>/dev/null
"$1" --root "$2" delete --force "$3" 2>/dev/null
exit 0"#;
        Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg("strata-reaper")
            .arg(&cfg.runc)
            .arg(&cfg.state_root)
            .arg(id)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok()
            .map(|child| Reaper { child })
    }

    /// The container is gone: the watchdog exits without doing anything.
    fn dismiss(mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        let _ = self.child.wait();
    }
}

impl Bundle<'_> {
    fn prepare(&mut self, spec: &RunSpec) -> Result<()> {
        let id = self.id;
        match &spec.rootfs {
            Rootfs::Dir(d) => {
                if !d.is_dir() {
                    return Err(invalid(
                        spec,
                        format!("rootfs `{}` is not a directory", d.display()),
                    ));
                }
                self.rootfs = d.clone();
            }
            Rootfs::Overlay {
                lowers,
                upper,
                work,
            } => {
                let target = self.dir.join("rootfs");
                std::fs::create_dir(&target).map_err(io_err(id, "creating", &target))?;
                let mut lowers = lowers.clone();
                if lowers.is_empty() {
                    // overlayfs needs one lower: an empty image is an empty directory.
                    let empty = self.dir.join("empty-lower");
                    std::fs::create_dir(&empty).map_err(io_err(id, "creating", &empty))?;
                    lowers.push(empty);
                }
                mount_overlay(id, &lowers, upper, work, &target)?;
                self.overlay = Some(target.clone());
                self.rootfs = target;
            }
        }

        inroot::resolve(&self.rootfs, &spec.cwd, true).map_err(io_err(
            id,
            "creating working directory",
            Path::new(&spec.cwd),
        ))?;

        // Mount points that do not exist are made by runc in the rootfs; remember them so
        // they can be removed afterwards. Targets under an earlier mount (`/dev/pts` under
        // `/dev`) are not in the rootfs.
        let targets = spec::mount_targets(spec);
        for (i, t) in targets.iter().enumerate() {
            let nested = targets[..i]
                .iter()
                .any(|p| Path::new(t).starts_with(p) && p != t);
            if nested {
                continue;
            }
            let r = inroot::resolve(&self.rootfs, t, false).map_err(io_err(
                id,
                "resolving mount point",
                Path::new(t),
            ))?;
            let mut p = r.existing.clone();
            for name in &r.missing {
                p.push(name);
                if !self.stubs.contains(&p) {
                    self.stubs.push(p.clone());
                }
            }
        }

        let hosts = self.dir.join("hosts");
        std::fs::write(&hosts, spec::ISOLATED_HOSTS).map_err(io_err(id, "writing", &hosts))?;
        let cgroups_path = format!("strata/{id}");
        let config = spec::config_json(
            spec,
            BundleSetup {
                rootfs: &self.rootfs,
                isolated_hosts: &hosts,
                cgroups_path: Some(&cgroups_path),
                nofile_limit: nofile_limit(),
            },
        );
        let path = self.dir.join("config.json");
        let bytes = serde_json::to_vec_pretty(&config)
            .map_err(|e| io_err(id, "encoding", &path)(e.into()))?;
        std::fs::write(&path, bytes).map_err(io_err(id, "writing", &path))?;
        Ok(())
    }

    fn runc(&self) -> Command {
        let mut c = Command::new(&self.cfg.runc);
        c.arg("--root").arg(&self.cfg.state_root);
        c
    }

    fn start_and_wait(&mut self, output: &mut dyn FnMut(&[u8])) -> Result<RunResult> {
        let id = self.id;
        let log = self.dir.join(RUNC_LOG);
        let mut cmd = self.runc();
        cmd.arg("--log")
            .arg(&log)
            .args(["--log-format", "json", "run", "--bundle"])
            .arg(&self.dir)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command = command_line(&cmd);
        // Before the container exists, so that no instant of its life is unwatched.
        self.reaper = Reaper::start(self.cfg, id);
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            id: id.to_string(),
            command: command.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel::<(bool, Vec<u8>)>();
        let mut readers = Vec::new();
        for (is_err, pipe) in [
            (
                false,
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
            (
                true,
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
            ),
        ] {
            let Some(mut pipe) = pipe else { continue };
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            if tx.send((is_err, buf[..n].to_vec())).is_err() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        drop(tx);
        self.child = Some(child);

        let mut stderr_tail: Vec<u8> = Vec::new();
        let mut interrupted = false;
        // Ends when both pipes are closed: the container's pid 1 exited, which kills the rest
        // of its pid namespace, and runc exited. An interrupt kills the container (pid 1 and
        // so its namespace) and the loop goes on until that is done.
        loop {
            let (is_err, chunk) = match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !interrupted && crate::interrupt::requested() {
                        interrupted = true;
                        let _ = kill(self.cfg, id, 9); // SIGKILL
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            if is_err {
                stderr_tail.extend_from_slice(&chunk);
                if stderr_tail.len() > STDERR_TAIL {
                    stderr_tail.drain(..stderr_tail.len() - STDERR_TAIL);
                }
            }
            output(&chunk);
        }
        for r in readers {
            let _ = r.join();
        }
        let status = match self.child.as_mut().map(Child::wait) {
            Some(Ok(s)) => s,
            Some(Err(e)) => return Err(io_err(id, "waiting for runc", &self.cfg.runc)(e)),
            None => {
                return Err(io_err(id, "waiting for runc", &self.cfg.runc)(
                    std::io::Error::other("no child"),
                ));
            }
        };
        self.child = None;
        if interrupted {
            return Err(Error::Interrupted { id: id.to_string() });
        }

        if !status.success() {
            let errors = runc_log_errors(&log);
            if !errors.is_empty() {
                let mut stderr = errors.join("; ");
                let tail = String::from_utf8_lossy(&stderr_tail);
                let tail = tail.trim();
                if !tail.is_empty() && !stderr.contains(tail) {
                    stderr.push_str("; stderr: ");
                    stderr.push_str(tail);
                }
                return Err(Error::Runc {
                    id: id.to_string(),
                    command,
                    status: describe(status),
                    stderr,
                });
            }
        }
        Ok(run_result(status))
    }

    /// Deletes the container, removes runc-made mount points, unmounts and removes the bundle.
    /// The first failure is returned; every step is tried regardless.
    fn finish(&mut self) -> Result<()> {
        self.finished = true;
        let mut first: Option<Error> = None;
        let mut keep = |r: Result<()>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(mut child) = self.child.take() {
            // Still running: the caller's callback panicked, or reading failed. Kill the
            // container first so runc run returns, then runc itself.
            let _ = delete_container(self.cfg, self.id);
            let _ = child.kill();
            let _ = child.wait();
        }
        keep(delete_container(self.cfg, self.id));
        if let Some(r) = self.reaper.take() {
            r.dismiss();
        }
        for stub in self.stubs.iter().rev() {
            inroot::remove_if_empty_stub(&self.rootfs, stub);
        }
        if let Some(target) = self.overlay.take() {
            keep(unmount(self.id, &target));
        }
        keep(remove_bundle_dir(self.id, &self.dir));
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Bundle<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.finish();
        }
    }
}

/// [`spec::NOFILE_LIMIT`], lowered to our own hard limit unless we may raise it: runc's init
/// inherits our limits and fails to start the container when asked for more.
pub(crate) fn nofile_limit() -> u64 {
    let ours = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let can_raise = rustix::thread::capabilities(None).is_ok_and(|c| {
        c.effective
            .contains(rustix::thread::CapabilitySet::SYS_RESOURCE)
    });
    match ours {
        Some(hard) if hard < spec::NOFILE_LIMIT && !can_raise => hard,
        _ => spec::NOFILE_LIMIT,
    }
}

fn run_result(status: ExitStatus) -> RunResult {
    match (status.code(), status.signal()) {
        (Some(code), _) => RunResult {
            exit_code: code,
            // runc (like a shell) reports death by signal n as 128 + n.
            signal: (129..=128 + 64).contains(&code).then_some(code - 128),
        },
        (None, Some(sig)) => RunResult {
            exit_code: 128 + sig,
            signal: Some(sig),
        },
        (None, None) => RunResult {
            exit_code: -1,
            signal: None,
        },
    }
}

pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `msg` of every error-level entry in runc's JSON log.
pub(crate) fn runc_log_errors(log: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal" | "panic")))
        .filter_map(|v| v["msg"].as_str().map(str::to_string))
        .collect()
}

pub(crate) fn mount_overlay(
    id: &str,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<()> {
    let lowerdir = strata_rootfs::overlay_lowerdir(lowers).map_err(|source| Error::Rootfs {
        id: id.to_string(),
        source,
    })?;
    let mut data = b"lowerdir=".to_vec();
    data.extend_from_slice(lowerdir.as_bytes());
    for (key, dir) in [(",upperdir=", upper), (",workdir=", work)] {
        if dir
            .as_os_str()
            .as_bytes()
            .iter()
            .any(|b| matches!(b, b':' | b','))
        {
            return Err(Error::Mount {
                id: id.to_string(),
                target: target.to_path_buf(),
                lowerdir: lowerdir.to_string_lossy().into_owned(),
                source: std::io::Error::other(format!(
                    "`{}` contains `:` or `,`, which overlay options cannot hold",
                    dir.display()
                )),
            });
        }
        data.extend_from_slice(key.as_bytes());
        data.extend_from_slice(dir.as_os_str().as_bytes());
    }
    let mount_err = |source: std::io::Error| Error::Mount {
        id: id.to_string(),
        target: target.to_path_buf(),
        lowerdir: lowerdir.to_string_lossy().into_owned(),
        source,
    };
    if data.len() > MAX_MOUNT_DATA {
        return Err(mount_err(std::io::Error::other(format!(
            "overlay options are {} bytes, over the kernel's limit of {MAX_MOUNT_DATA} ({} lower layers)",
            data.len(),
            lowers.len()
        ))));
    }
    // `volatile` (Linux 5.10+): the upper dir is never synced. Both users throw it away or
    // read it back only after the container exited (a build step's upper becomes a layer, a
    // machine's root is ephemeral and emptied before each start), so fsyncs inside (dpkg
    // does one per file) would be pure cost. Older kernels refuse the option: mount without.
    // The kernel leaves `<workdir>/work/incompat/volatile` behind and refuses to mount that work dir
    // again until it is gone (it cannot know whether the last user synced). Our callers
    // reuse a work dir only after the container exited and was unmounted cleanly.
    let _ = std::fs::remove_dir_all(work.join("work/incompat/volatile"));
    let mut volatile = data.clone();
    volatile.extend_from_slice(b",volatile");
    let mount = |data: Vec<u8>| -> Result<()> {
        let data = CString::new(data).map_err(|e| mount_err(std::io::Error::other(e)))?;
        rustix::mount::mount(
            "overlay",
            target,
            "overlay",
            MountFlags::empty(),
            data.as_c_str(),
        )
        .map_err(|e| mount_err(e.into()))
    };
    if volatile.len() <= MAX_MOUNT_DATA && mount(volatile).is_ok() {
        return Ok(());
    }
    mount(data)
}

/// Unmounts `target`, falling back to a lazy unmount when it is busy.
pub(crate) fn unmount(id: &str, target: &Path) -> Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(_) => rustix::mount::unmount(target, UnmountFlags::DETACH)
            .map_err(|e| io_err(id, "unmounting", target)(e.into())),
    }
}

pub(crate) fn is_mount_point(path: &Path) -> bool {
    let (Ok(m), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    m.dev() != parent.dev()
}

/// Removes a bundle directory, but never through a rootfs that is still mounted (that would
/// delete through the overlay, or worse, through a bind mount).
fn remove_bundle_dir(id: &str, dir: &Path) -> Result<()> {
    let rootfs = dir.join("rootfs");
    if is_mount_point(&rootfs) {
        return Err(io_err(id, "removing bundle", dir)(std::io::Error::other(
            "its rootfs is still mounted",
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(id, "removing bundle", dir)(e)),
    }
}

/// `runc delete -f <id>`; a container that does not exist (already gone) is fine.
pub(crate) fn delete_container(cfg: &RuntimeConfig, id: &str) -> Result<()> {
    if !runc_knows(cfg, id) {
        return Ok(());
    }
    let mut cmd = Command::new(&cfg.runc);
    cmd.arg("--root")
        .arg(&cfg.state_root)
        .args(["delete", "-f", id]);
    let out = runc_output(id, &mut cmd)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("does not exist") || stderr.contains("not exist") {
        return Ok(());
    }
    Err(Error::Runc {
        id: id.to_string(),
        command: command_line(&cmd),
        status: describe(out.status),
        stderr: stderr.trim().to_string(),
    })
}

/// Whether runc may hold state for container `id`: its state directory exists under `--root`.
/// When it does not, asking runc (a process spawn, several ms) can only answer "does not exist".
pub(crate) fn runc_knows(cfg: &RuntimeConfig, id: &str) -> bool {
    cfg.state_root.join(id).exists()
}

pub(crate) fn runc_output(id: &str, cmd: &mut Command) -> Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            id: id.to_string(),
            command: command_line(cmd),
            source,
        })
}

/// Sends `signal` to the process of running container `id` (`runc kill`).
pub fn kill(cfg: &RuntimeConfig, id: &str, signal: i32) -> Result<()> {
    let mut cmd = Command::new(&cfg.runc);
    cmd.arg("--root")
        .arg(&cfg.state_root)
        .arg("kill")
        .arg(id)
        .arg(signal.to_string());
    let out = runc_output(id, &mut cmd)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Runc {
            id: id.to_string(),
            command: command_line(&cmd),
            status: describe(out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `<pid> <start time in clock ticks>` of a process, which names it even after pid reuse.
fn owner_stamp(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at field 3; the start time is field 22.
    let start = rest.split_whitespace().nth(19)?;
    Some(format!("{pid} {start}"))
}

fn owner_alive(stamp: &str) -> bool {
    let Some(pid) = stamp
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return false;
    };
    owner_stamp(pid).is_some_and(|now| now == stamp.trim())
}

/// [`cleanup_stale`] for the RUN containers under `state_root`, cheap when there is nothing
/// to look at (no bundle, no container state: no runc is even looked for), so every build
/// and `strata gc` can call it: what a `kill -9` left is reclaimed by the next command.
pub fn cleanup_stale_in(state_root: &Path) -> Result<Vec<String>> {
    let has_entries = |dir: &Path, skip: &str| {
        std::fs::read_dir(dir)
            .map(|entries| entries.flatten().any(|e| e.file_name() != skip))
            .unwrap_or(false)
    };
    let probe = RuntimeConfig {
        runc: PathBuf::new(),
        state_root: state_root.to_path_buf(),
    };
    if !has_entries(&probe.bundles_dir(), "") && !has_entries(state_root, "bundles") {
        return Ok(Vec::new());
    }
    cleanup_stale(&RuntimeConfig::detect(state_root.to_path_buf())?)
}

/// Removes what killed processes left under `cfg.state_root`: for every bundle whose owning
/// process is gone, its runc container (`runc delete -f`), its overlay mount and its
/// directory; and every runc container whose bundle directory is gone. Bundles of live
/// processes (other strata processes sharing the state root) are left alone.
/// Returns the ids cleaned up.
pub fn cleanup_stale(cfg: &RuntimeConfig) -> Result<Vec<String>> {
    let mut cleaned = Vec::new();
    let bundles = cfg.bundles_dir();
    let mut live: Vec<PathBuf> = Vec::new();
    match std::fs::read_dir(&bundles) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(io_err("-", "reading", &bundles))?;
                let dir = e.path();
                let id = e.file_name().to_string_lossy().into_owned();
                let stamp = std::fs::read_to_string(dir.join(OWNER_FILE)).unwrap_or_default();
                if owner_alive(&stamp) {
                    live.push(dir);
                    continue;
                }
                delete_container(cfg, &id)?;
                let rootfs = dir.join("rootfs");
                if is_mount_point(&rootfs) {
                    unmount(&id, &rootfs)?;
                }
                remove_bundle_dir(&id, &dir)?;
                cleaned.push(id);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("-", "reading", &bundles)(e)),
    }
    // Containers whose bundle is gone (removed by hand, or a crash between steps).
    let mut cmd = Command::new(&cfg.runc);
    cmd.arg("--root")
        .arg(&cfg.state_root)
        .args(["list", "--format", "json"]);
    let out = runc_output("-", &mut cmd)?;
    if out.status.success() {
        let list: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        for c in list.as_array().into_iter().flatten() {
            let (Some(id), Some(bundle)) = (c["id"].as_str(), c["bundle"].as_str()) else {
                continue;
            };
            let bundle = PathBuf::from(bundle);
            if !bundle.join("config.json").exists() && !live.contains(&bundle) {
                delete_container(cfg, id)?;
                cleaned.push(id.to_string());
            }
        }
    }
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("build-1.step_2+x"));
        for bad in ["", ".", "..", ".x", "a/b", "a b", "a:b"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn exit_statuses() {
        let r = run_result(ExitStatus::from_raw(3 << 8));
        assert_eq!((r.exit_code, r.signal), (3, None));
        let r = run_result(ExitStatus::from_raw(137 << 8));
        assert_eq!((r.exit_code, r.signal), (137, Some(9)));
        let r = run_result(ExitStatus::from_raw(15));
        assert_eq!((r.exit_code, r.signal), (143, Some(15)));
    }

    #[test]
    fn own_stamp_is_alive() {
        let me = owner_stamp(std::process::id()).unwrap();
        assert!(owner_alive(&me));
        assert!(!owner_alive("999999999 1"));
        assert!(!owner_alive(""));
    }
}
