//! Machines: an image running detached the way Fly boots one, with an init as PID 1, its own
//! network namespace, an ephemeral root filesystem and persistent volumes.
//!
//! A machine's private directory (`MachineSpec::dir`) holds everything of one run:
//!
//! ```text
//! dir/
//!   config.json      the runc bundle (the bundle directory is `dir` itself)
//!   rootfs/          overlay mount point: lowers = image layers, upper/work below
//!   upper/ work/     the run's writes; emptied at every start and cleanup
//!   empty-lower/     only for an image without layers (overlay needs one lower)
//!   etc/hosts etc/hostname etc/resolv.conf   bind-mounted into the machine (rw)
//!   pid              runc's pid file (host pid of the machine's PID 1)
//!   runc.log         runc's own JSON log of the last start (its errors)
//! ```
//!
//! The runc container is `strata-m-<id>` under `RuntimeConfig::state_root`; the network
//! namespace is `strata-net<slot>` (`/run/netns`), see [`crate::net`].

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::inroot;
use crate::net::{self, NetSpec};
use crate::run::{
    command_line, delete_container, describe, io_err, is_mount_point, mount_overlay, nofile_limit,
    remove_file_if_exists, runc_log_errors, runc_output, unmount,
};
use crate::spec::{self, BundleSetup};
use crate::{MountSpec, NetworkMode, Rootfs, RunSpec, RuntimeConfig, UserSpec};

/// Where the init is bind-mounted (read-only) inside every machine.
pub const INIT_PATH: &str = "/.strata/init";
/// The init used when `$STRATA_INIT` is not set: Debian's `tini` package ships it.
pub const DEFAULT_INIT: &str = "/usr/bin/tini-static";
/// Name servers a machine gets when the host has none it can reach (Docker's defaults).
pub const DEFAULT_NAMESERVERS: &[&str] = &["8.8.8.8", "8.8.4.4"];
/// How long [`machine_stop`] waits for the machine to die after `SIGKILL`.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often a stopping machine is looked at.
const POLL: Duration = Duration::from_millis(10);

/// A named volume: a host directory bind-mounted read-write into the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// Absolute host directory (or file); a directory is created (mode 0755) when missing.
    /// It outlives the machine.
    pub source: PathBuf,
    /// Absolute path inside the machine, without `..`.
    pub target: String,
    /// Mounted read-only (`-v SRC:DST:ro`).
    pub readonly: bool,
}

/// Everything needed to boot one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    /// `[a-z0-9][a-z0-9-]{0,40}`; the runc container is `strata-m-<id>`.
    pub id: String,
    /// The machine's private directory (see the module docs for what goes in it); absolute.
    pub dir: PathBuf,
    /// The image's unpacked layers, BOTTOM first; used read-only.
    pub lowers: Vec<PathBuf>,
    /// ENTRYPOINT + CMD, already combined; run as the init's child.
    pub args: Vec<String>,
    /// `KEY=VALUE`; Docker's default `PATH` is added when there is none.
    pub env: Vec<String>,
    /// Absolute working directory (created in the ephemeral root if missing).
    pub cwd: String,
    /// Who the process runs as (see [`crate::resolve_user`]).
    pub user: UserSpec,
    /// The machine's hostname, also in its `/etc/hosts` and `/etc/hostname`.
    pub hostname: String,
    /// Read-write volumes, mounted in order.
    pub volumes: Vec<VolumeMount>,
    /// The machine's network (its address).
    pub net: NetSpec,
    /// Host path of a static init (see [`find_init`]), bind-mounted read-only at
    /// [`INIT_PATH`].
    pub init: PathBuf,
    /// The machine's stdout and stderr are appended to this file (created if missing),
    /// unless a terminal is attached.
    pub log: PathBuf,
    /// What the process's stdin (and terminal) are.
    pub attach: Attach,
    /// Memory and CPU limits.
    pub limits: Limits,
}

/// A machine's resource limits (`strata run -m/--cpus`, an app's `memory` and `cpus`), set
/// on its cgroup as Docker sets a container's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory, in bytes; as much swap again where the kernel accounts swap, as Docker's `-m`
    /// alone allows. Past it the kernel's OOM killer ends a process of the machine.
    pub memory: Option<u64>,
    /// CPU time, in thousandths of a CPU (`--cpus 1.5` is 1500): a CFS quota per 100 ms.
    pub millicpus: Option<u64>,
}

impl Limits {
    /// `linux.resources` entries for these limits, added to `resources`.
    fn apply(&self, resources: &mut Value) {
        if let Some(bytes) = self.memory {
            let mut memory = json!({ "limit": bytes });
            // cgroup v1 needs swap accounting for a memory+swap limit (cgroup v2 has it).
            if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists()
                || Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
            {
                memory["swap"] = json!(bytes.saturating_mul(2));
            }
            resources["memory"] = memory;
        }
        if let Some(m) = self.millicpus {
            resources["cpu"] = json!({ "quota": m * 100, "period": 100_000 });
        }
    }
}

/// What a machine's stdin is, and whether it has a terminal (`strata run -i`, `-t`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Attach {
    /// stdin is empty; stdout and stderr go to the log.
    #[default]
    None,
    /// The process's stdio are FIFOs of an attached client (`strata run`): stdin, when given,
    /// is read from the FIFO at that path, which the client holds open for writing before the
    /// machine starts (so the process never reads a premature end of file), else empty;
    /// stdout and stderr are written to theirs, which the client holds open for reading, so
    /// the two stay apart (and the log gets neither).
    Pipes {
        /// The FIFO the process reads, if any.
        stdin: Option<PathBuf>,
        /// The FIFO its stdout goes to.
        stdout: PathBuf,
        /// The FIFO its stderr goes to.
        stderr: PathBuf,
    },
    /// A pseudo-terminal is the process's stdin, stdout and stderr: runc sends its master to
    /// the unix socket at this path (the attached client listens there), so the output goes
    /// through it, not to the log.
    Tty(PathBuf),
}

/// What runc says about a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineStatus {
    /// Its PID 1 is alive (or paused); `pid` is the host pid.
    Running {
        /// Host pid of the machine's PID 1 (the init).
        pid: u32,
    },
    /// The container exists but its process exited; [`machine_cleanup`] removes it.
    Stopped,
    /// runc knows no such container (never started, or cleaned up).
    Missing,
}

/// How [`machine_stop`] ended the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// It was not running (already exited, or never started).
    NotRunning,
    /// It exited within the grace period after the signal.
    Exited,
    /// It was still running after the grace period and got `SIGKILL`.
    Killed,
}

/// The runc container id of machine `id`.
pub fn container_id(id: &str) -> String {
    format!("strata-m-{id}")
}

/// Whether `id` can name a machine: `[a-z0-9][a-z0-9-]{0,40}`.
pub fn valid_machine_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 41
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn machine_err(id: &str, reason: impl Into<String>) -> Error {
    Error::Machine {
        id: id.to_string(),
        reason: reason.into(),
    }
}

fn check_id(id: &str) -> Result<()> {
    if valid_machine_id(id) {
        Ok(())
    } else {
        Err(machine_err(
            id,
            "invalid machine id: use 1 to 41 of `a-z`, `0-9`, `-`, not starting with `-`",
        ))
    }
}

fn clean_container_path(p: &str) -> bool {
    p.starts_with('/') && !Path::new(p).components().any(|c| c.as_os_str() == "..")
}

fn validate(spec: &MachineSpec) -> Result<()> {
    let id = spec.id.as_str();
    check_id(id)?;
    let bad = |reason: String| Err(machine_err(id, reason));
    if !spec.dir.is_absolute() {
        return bad(format!(
            "directory `{}` is not absolute",
            spec.dir.display()
        ));
    }
    if spec.args.is_empty() {
        return bad("no command (args is empty)".into());
    }
    if !spec.cwd.starts_with('/') {
        return bad(format!("working directory `{}` is not absolute", spec.cwd));
    }
    if let Some(e) = spec.env.iter().find(|e| !e.contains('=')) {
        return bad(format!("environment entry `{e}` has no `=`"));
    }
    if spec.hostname.is_empty()
        || spec.hostname.len() > 64
        || !spec
            .hostname
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return bad(format!(
            "hostname `{}` must be 1 to 64 of letters, digits, `-._`",
            spec.hostname
        ));
    }
    if spec.net.index > net::MAX_NET_INDEX {
        return bad(format!(
            "network index {} is over the maximum {}",
            spec.net.index,
            net::MAX_NET_INDEX
        ));
    }
    if let Some(l) = spec.lowers.iter().find(|l| !l.is_dir()) {
        return bad(format!("layer `{}` is not a directory", l.display()));
    }
    if !spec.init.is_file() {
        return bad(format!("init `{}` is not a file", spec.init.display()));
    }
    for v in &spec.volumes {
        if !v.source.is_absolute() {
            return bad(format!(
                "volume source `{}` is not absolute",
                v.source.display()
            ));
        }
        if !clean_container_path(&v.target) || v.target.trim_end_matches('/').is_empty() {
            return bad(format!(
                "volume target `{}` must be an absolute path other than `/`, without `..`",
                v.target
            ));
        }
    }
    Ok(())
}

/// The init to run as every machine's PID 1: `$STRATA_INIT` if set, else
/// [`DEFAULT_INIT`]. It must be static: it runs inside images that may have no libc.
pub fn find_init() -> Result<PathBuf> {
    init_at(std::env::var_os("STRATA_INIT"))
}

fn init_at(explicit: Option<OsString>) -> Result<PathBuf> {
    let path = explicit
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_INIT));
    if crate::is_executable(&path) {
        Ok(path)
    } else {
        Err(Error::InitNotFound { looked_at: path })
    }
}

/// Makes the calling process a child subreaper: the PID 1 of every machine it starts is
/// reparented to it when `runc run -d` exits, so it can `waitpid` that pid and learn the
/// machine's exit code (the init exits with its child's code).
pub fn set_child_subreaper() -> Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).map_err(|e| Error::Os {
        op: "becoming a child subreaper (prctl PR_SET_CHILD_SUBREAPER)",
        source: e.into(),
    })
}

/// The process arguments of a machine: the init, then the command.
///
/// tini forwards the signals it gets to its child, reaps orphans, and exits with the child's
/// exit code (128 + n when the child is killed by signal n). `-g` makes it signal the child's
/// whole process group instead of the child alone: an entrypoint that is a shell wrapper
/// (`sh -c "app | logger"`, `sh -c "trap ... TERM; app"`) has its workers stopped too, and
/// a shell waiting on a foreground command sees the command die instead of running its
/// trap only after the command ends by itself. tini puts the child in its own group, so
/// this never reaches tini. `-s` is not needed: tini is PID 1 of the machine's PID namespace,
/// which reaps orphans anyway.
fn init_args(args: &[String]) -> Vec<String> {
    let mut out = vec![INIT_PATH.to_string(), "-g".to_string(), "--".to_string()];
    out.extend(args.iter().cloned());
    out
}

/// `env` with `HOSTNAME` first, as Docker sets it for every container, unless the image or
/// the user set it.
fn with_hostname(env: &[String], hostname: &str) -> Vec<String> {
    if env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        return env.to_vec();
    }
    let mut out = Vec::with_capacity(env.len() + 1);
    out.push(format!("HOSTNAME={hostname}"));
    out.extend_from_slice(env);
    out
}

/// `/etc/hosts` of a machine: localhost and its own name at its address.
fn hosts_file(hostname: &str, addr: Ipv4Addr) -> String {
    format!("{}{addr}\t{hostname}\n", spec::ISOLATED_HOSTS)
}

/// The host's `resolv.conf` without name servers on loopback (a local resolver such as
/// systemd-resolved's 127.0.0.53 is not reachable from the machine's namespace); when no
/// server is left, [`DEFAULT_NAMESERVERS`] (as Docker does).
fn machine_resolv_conf(host: Option<&str>) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for line in host.unwrap_or("").lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            let loopback = words
                .next()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .is_none_or(|a| a.is_loopback());
            if loopback {
                continue;
            }
            servers += 1;
        }
        out.push_str(line);
        out.push('\n');
    }
    if servers == 0 {
        for s in DEFAULT_NAMESERVERS {
            out.push_str(&format!("nameserver {s}\n"));
        }
    }
    out
}

/// The machine's `config.json`: the shared defaults of [`spec::config_json`], joined to the
/// existing network namespace at `netns`, with the machine's own rw `/etc` files (given in
/// `run.mounts`) instead of the read-only `/etc/hosts` of an isolated container.
fn machine_config(run: &RunSpec, files: BundleSetup<'_>, netns: &Path) -> Value {
    let mut config = spec::config_json(run, files);
    if let Some(namespaces) = config["linux"]["namespaces"].as_array_mut() {
        for ns in namespaces.iter_mut() {
            if ns["type"] == "network" {
                ns["path"] = json!(netns);
            }
        }
    }
    if let Some(mounts) = config["mounts"].as_array_mut() {
        let ro = json!("ro");
        mounts.retain(|m| {
            let read_only = m["options"].as_array().is_some_and(|o| o.contains(&ro));
            !(m["destination"] == "/etc/hosts" && read_only)
        });
    }
    config
}

/// Machine directory paths.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(spec: &MachineSpec) -> Layout {
        Layout {
            dir: spec.dir.clone(),
        }
    }
    fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }
    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    fn etc(&self, name: &str) -> PathBuf {
        self.dir.join("etc").join(name)
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join("pid")
    }
    fn runc_log(&self) -> PathBuf {
        self.dir.join("runc.log")
    }
}

fn runc(cfg: &RuntimeConfig) -> Command {
    let mut c = Command::new(&cfg.runc);
    c.arg("--root").arg(&cfg.state_root);
    c
}

/// Boots machine `spec` and returns the host pid of its PID 1 (the init). The machine runs
/// detached: it keeps running after the caller exits, its output goes straight to
/// `spec.log`. See [`set_child_subreaper`] to wait for it.
///
/// Every start begins from an empty root-filesystem upper layer: what the last run wrote
/// outside volumes is gone. The network namespace and veth pair are (re)made as needed.
/// A machine that is running is an error; one that is stopped is cleaned up first.
pub fn machine_start(cfg: &RuntimeConfig, spec: &MachineSpec) -> Result<u32> {
    validate(spec)?;
    if let MachineStatus::Running { pid } = machine_status(cfg, &spec.id)? {
        return Err(machine_err(
            &spec.id,
            format!("already running (pid {pid}); stop it first"),
        ));
    }
    machine_cleanup(cfg, spec)?;
    net::setup_network(&spec.id, &spec.net)?;
    let started = boot(cfg, spec);
    if started.is_err() {
        // Leave no mount or half-made container behind; the network stays for the next try.
        let _ = machine_cleanup(cfg, spec);
    }
    started
}

fn boot(cfg: &RuntimeConfig, spec: &MachineSpec) -> Result<u32> {
    let cid = container_id(&spec.id);
    let cid = cid.as_str();
    let l = Layout::new(spec);
    for d in [
        &l.dir,
        &l.upper(),
        &l.work(),
        &l.rootfs(),
        &l.dir.join("etc"),
    ] {
        std::fs::create_dir_all(d).map_err(io_err(cid, "creating", d))?;
    }
    let mut lowers = spec.lowers.clone();
    if lowers.is_empty() {
        let empty = l.dir.join("empty-lower");
        std::fs::create_dir_all(&empty).map_err(io_err(cid, "creating", &empty))?;
        lowers.push(empty);
    }
    let rootfs = l.rootfs();
    mount_overlay(cid, &lowers, &l.upper(), &l.work(), &rootfs)?;

    inroot::resolve(&rootfs, &spec.cwd, true).map_err(io_err(
        cid,
        "creating working directory",
        Path::new(&spec.cwd),
    ))?;

    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").ok();
    let etc_files = [
        ("hosts", hosts_file(&spec.hostname, spec.net.machine_addr())),
        ("hostname", format!("{}\n", spec.hostname)),
        ("resolv.conf", machine_resolv_conf(host_resolv.as_deref())),
    ];
    let mut mounts = Vec::new();
    for (name, text) in &etc_files {
        let path = l.etc(name);
        std::fs::write(&path, text).map_err(io_err(cid, "writing", &path))?;
        mounts.push(MountSpec::Bind {
            source: path,
            target: format!("/etc/{name}"),
            readonly: false,
        });
    }
    mounts.push(MountSpec::Bind {
        source: spec.init.clone(),
        target: INIT_PATH.to_string(),
        readonly: true,
    });
    for v in &spec.volumes {
        // A missing source is made a directory, as `docker run -v` makes it; a file stays one.
        if std::fs::symlink_metadata(&v.source).is_err() {
            std::fs::create_dir_all(&v.source).map_err(io_err(
                cid,
                "creating volume",
                &v.source,
            ))?;
        }
        mounts.push(MountSpec::Bind {
            source: v.source.clone(),
            target: v.target.clone(),
            readonly: v.readonly,
        });
    }

    let run = RunSpec {
        id: cid.to_string(),
        rootfs: Rootfs::Dir(rootfs.clone()),
        args: init_args(&spec.args),
        env: with_hostname(&spec.env, &spec.hostname),
        cwd: spec.cwd.clone(),
        user: spec.user.clone(),
        hostname: spec.hostname.clone(),
        network: NetworkMode::None,
        mounts,
        readonly_rootfs: false,
    };
    let cgroups_path = format!("strata/{cid}");
    let hosts = l.etc("hosts");
    let mut config = machine_config(
        &run,
        BundleSetup {
            rootfs: &rootfs,
            isolated_hosts: &hosts,
            cgroups_path: Some(&cgroups_path),
            nofile_limit: nofile_limit(),
        },
        &spec.net.netns_path(),
    );
    if matches!(spec.attach, Attach::Tty(_)) {
        config["process"]["terminal"] = json!(true);
    }
    spec.limits.apply(&mut config["linux"]["resources"]);
    let stdin = match &spec.attach {
        Attach::Pipes {
            stdin: Some(fifo), ..
        } => Stdio::from(open_fifo(fifo, false).map_err(io_err(
            cid,
            "opening the stdin FIFO",
            fifo,
        ))?),
        _ => Stdio::null(),
    };
    let config_path = l.dir.join("config.json");
    let bytes = serde_json::to_vec_pretty(&config)
        .map_err(|e| io_err(cid, "encoding", &config_path)(e.into()))?;
    std::fs::write(&config_path, bytes).map_err(io_err(cid, "writing", &config_path))?;

    if let Some(parent) = spec.log.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(cid, "creating", parent))?;
    }
    let log = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(&spec.log)
        .map_err(io_err(cid, "opening log", &spec.log))?;
    let log2 = log
        .try_clone()
        .map_err(io_err(cid, "opening log", &spec.log))?;
    let pid_file = l.pid_file();
    let runc_log = l.runc_log();
    for stale in [&pid_file, &runc_log] {
        remove_file_if_exists(cid, stale)?;
    }
    std::fs::create_dir_all(&cfg.state_root).map_err(io_err(cid, "creating", &cfg.state_root))?;

    let mut cmd = runc(cfg);
    cmd.arg("--log")
        .arg(&runc_log)
        .args(["--log-format", "json", "run", "-d", "--pid-file"])
        .arg(&pid_file);
    if let Attach::Tty(socket) = &spec.attach {
        cmd.arg("--console-socket").arg(socket);
    }
    cmd.arg("--bundle").arg(&l.dir).arg(cid).stdin(stdin);
    match &spec.attach {
        Attach::Pipes { stdout, stderr, .. } => {
            // ENXIO here: the attached client is gone.
            let out = open_fifo(stdout, true).map_err(io_err(
                cid,
                "opening the attached stdout FIFO",
                stdout,
            ))?;
            let err = open_fifo(stderr, true).map_err(io_err(
                cid,
                "opening the attached stderr FIFO",
                stderr,
            ))?;
            cmd.stdout(out).stderr(err);
        }
        _ => {
            cmd.stdout(Stdio::from(log)).stderr(Stdio::from(log2));
        }
    }
    cmd
        // runc puts the machine in a session of its own; this keeps a Ctrl-C at the starting
        // terminal from reaching runc itself while it is half way through starting it.
        .process_group(0);
    let command = command_line(&cmd);
    let status = cmd.status().map_err(|source| Error::Spawn {
        id: cid.to_string(),
        command: command.clone(),
        source,
    })?;
    if !status.success() {
        let errors = runc_log_errors(&runc_log);
        let stderr = if errors.is_empty() {
            format!("see `{}`", spec.log.display())
        } else {
            errors.join("; ")
        };
        return Err(Error::Runc {
            id: cid.to_string(),
            command,
            status: describe(status),
            stderr,
        });
    }
    let text = std::fs::read_to_string(&pid_file).map_err(io_err(cid, "reading", &pid_file))?;
    text.trim().parse::<u32>().map_err(|e| {
        io_err(cid, "reading", &pid_file)(std::io::Error::other(format!(
            "`{}` is not a pid: {e}",
            text.trim()
        )))
    })
}

/// The pseudo-terminal master runc sends to the console socket `listener` when it starts a
/// machine with [`Attach::Tty`] (the socket is bound before the machine starts, so runc's
/// message waits in it). Fails after `limit` without one.
pub fn receive_console(
    listener: &std::os::unix::net::UnixListener,
    limit: Duration,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + limit;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "runc sent no terminal",
                ));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(limit))?;
    // runc sends the terminal's name as the data and the master as the one descriptor.
    let mut name = [0u8; 4096];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        &stream,
        &mut [std::io::IoSliceMut::new(&mut name)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(fd);
        }
    }
    Err(std::io::Error::other(
        "runc's console message carried no descriptor",
    ))
}

/// The read (or, with `write`, the write) end of the FIFO at `path`, opened without waiting
/// for the other end (the attached client holds it already: else a write end fails at once)
/// and then made blocking. Anything but a FIFO is refused.
fn open_fifo(path: &Path, write: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::FileTypeExt;
    let file = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW).bits() as i32)
        .open(path)?;
    if !file.metadata()?.file_type().is_fifo() {
        return Err(std::io::Error::other("not a FIFO"));
    }
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::empty())?;
    Ok(file)
}

/// `runc state` of machine `id`, parsed; `None` when runc knows no such container.
fn runc_state(cfg: &RuntimeConfig, id: &str) -> Result<Option<Value>> {
    let cid = container_id(id);
    if !crate::run::runc_knows(cfg, &cid) {
        return Ok(None);
    }
    let mut cmd = runc(cfg);
    cmd.arg("state").arg(&cid);
    let out = runc_output(&cid, &mut cmd)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("does not exist") {
            return Ok(None);
        }
        return Err(Error::Runc {
            id: cid,
            command: command_line(&cmd),
            status: describe(out.status),
            stderr: stderr.trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| Error::Runc {
            id: cid.clone(),
            command: command_line(&cmd),
            status: describe(out.status),
            stderr: format!("unreadable state JSON: {e}"),
        })
}

/// Whether machine `id` runs, has stopped (exited, not yet cleaned up) or does not exist,
/// as `runc state` says. A PID 1 that exited but was not yet reaped counts as stopped.
pub fn machine_status(cfg: &RuntimeConfig, id: &str) -> Result<MachineStatus> {
    check_id(id)?;
    let Some(state) = runc_state(cfg, id)? else {
        return Ok(MachineStatus::Missing);
    };
    let pid = state["pid"].as_u64().and_then(|p| u32::try_from(p).ok());
    Ok(match (state["status"].as_str(), pid) {
        (Some("running" | "paused" | "created"), Some(pid)) if pid > 0 => {
            MachineStatus::Running { pid }
        }
        _ => MachineStatus::Stopped,
    })
}

/// `(state, start time)` of a host process from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields after the name start at field 3 (state); the start time is field 22.
    let start = fields.nth(18)?.to_string();
    Some((state, start))
}

/// The start time of host process `pid` (in clock ticks since boot, as `/proc/<pid>/stat`
/// gives it), to tell it from a later process that reuses the pid; `None` if there is none.
pub fn process_start_time(pid: u32) -> Option<String> {
    proc_stat(pid).map(|(_, start)| start)
}

/// Whether process `pid`, started at `start` ([`process_start_time`]), still runs (a zombie
/// does not). One read of `/proc`, against a `runc state` process for [`machine_status`]:
/// what a supervisor polling machines it did not start (so cannot `waitpid`) uses.
pub fn process_alive(pid: u32, start: &str) -> bool {
    matches!(proc_stat(pid), Some((state, s)) if s == start && !matches!(state, 'Z' | 'X' | 'x'))
}

/// Waits up to `limit` for process `pid` (started at `start`) to exit; true when it did.
/// A zombie has exited: its parent (a subreaper, or the host's init) reaps it when it likes.
fn wait_exit(pid: u32, start: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !process_alive(pid, start) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `signal` to the machine's init (which forwards it to the command's process group),
/// waits up to `grace` for it to exit, then sends `SIGKILL` if needed; then
/// [`machine_cleanup`]. A machine that is not running is only cleaned up.
pub fn machine_stop(
    cfg: &RuntimeConfig,
    spec: &MachineSpec,
    signal: i32,
    grace: Duration,
) -> Result<StopOutcome> {
    check_id(&spec.id)?;
    let outcome = match machine_status(cfg, &spec.id)? {
        MachineStatus::Missing | MachineStatus::Stopped => StopOutcome::NotRunning,
        MachineStatus::Running { pid } => stop_running(cfg, &spec.id, pid, signal, grace)?,
    };
    machine_cleanup(cfg, spec)?;
    Ok(outcome)
}

/// Sends `signal` to running machine `id`'s PID 1 (the init, which passes it on to the
/// command), as `docker kill -s` does; an error when it is not running.
pub fn machine_signal(cfg: &RuntimeConfig, id: &str, signal: i32) -> Result<()> {
    check_id(id)?;
    match machine_status(cfg, id)? {
        MachineStatus::Running { .. } => crate::run::kill(cfg, &container_id(id), signal),
        _ => Err(machine_err(id, "not running")),
    }
}

fn stop_running(
    cfg: &RuntimeConfig,
    id: &str,
    pid: u32,
    signal: i32,
    grace: Duration,
) -> Result<StopOutcome> {
    let cid = container_id(id);
    let Some((_, start)) = proc_stat(pid) else {
        return Ok(StopOutcome::NotRunning);
    };
    if let Err(e) = crate::run::kill(cfg, &cid, signal) {
        // It may have exited between the status and the kill.
        return match machine_status(cfg, id)? {
            MachineStatus::Running { .. } => Err(e),
            _ => Ok(StopOutcome::NotRunning),
        };
    }
    if wait_exit(pid, &start, grace) {
        return Ok(StopOutcome::Exited);
    }
    if let Err(e) = crate::run::kill(cfg, &cid, 9)
        && matches!(machine_status(cfg, id)?, MachineStatus::Running { .. })
    {
        return Err(e);
    }
    if wait_exit(pid, &start, KILL_WAIT) {
        Ok(StopOutcome::Killed)
    } else {
        Err(machine_err(
            id,
            format!(
                "pid {pid} still alive {}s after SIGKILL",
                KILL_WAIT.as_secs()
            ),
        ))
    }
}

fn remove_dir_if_exists(cid: &str, dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(cid, "removing", dir)(e)),
    }
}

/// After the machine exited: deletes the runc container (`runc delete -f`, which also kills
/// a machine still running), unmounts the root filesystem and removes the upper and work
/// directories, so nothing of the run's root filesystem survives. Idempotent.
pub fn machine_cleanup(cfg: &RuntimeConfig, spec: &MachineSpec) -> Result<()> {
    check_id(&spec.id)?;
    let cid = container_id(&spec.id);
    delete_container(cfg, &cid)?;
    let l = Layout::new(spec);
    let rootfs = l.rootfs();
    // A crashed caller may have mounted more than once; a few rounds peel them all.
    for _ in 0..8 {
        if !is_mount_point(&rootfs) {
            break;
        }
        unmount(&cid, &rootfs)?;
    }
    if is_mount_point(&rootfs) {
        return Err(io_err(&cid, "unmounting", &rootfs)(std::io::Error::other(
            "still mounted",
        )));
    }
    remove_dir_if_exists(&cid, &l.upper())?;
    remove_dir_if_exists(&cid, &l.work())?;
    Ok(())
}

/// Mount points on the host at or below `dir`, from `/proc/self/mountinfo`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes space, tab, newline and backslash as octal.
        .map(|m| {
            PathBuf::from(
                m.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Kills the machine if it runs, cleans up, removes its network namespace and veth pair and
/// deletes its directory. Volumes (host directories outside `dir`) are kept. Idempotent.
pub fn machine_destroy(cfg: &RuntimeConfig, spec: &MachineSpec) -> Result<()> {
    check_id(&spec.id)?;
    let cid = container_id(&spec.id);
    machine_stop(cfg, spec, 9, Duration::ZERO)?;
    net::teardown_network(&spec.id, &spec.net)?;
    // Never delete through a mount (a volume bind made by hand, a leftover overlay).
    let mounted = mounts_under(&spec.dir);
    if !mounted.is_empty() {
        return Err(io_err(&cid, "removing machine directory", &spec.dir)(
            std::io::Error::other(format!("mounts remain below it: {mounted:?}")),
        ));
    }
    remove_dir_if_exists(&cid, &spec.dir)
}

/// How [`machine_exec`] runs its command (`docker exec`'s flags); the default is the machine's
/// own user, working directory and environment, no terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// `K=V` entries added to the machine's environment.
    pub env: Vec<String>,
    /// Give the process a pseudo-terminal (stdin must be one, and is attached).
    pub tty: bool,
    /// Attach the caller's stdin (`docker exec -i`); otherwise the process reads end of
    /// file at once.
    pub stdin: bool,
    /// Working directory, an absolute path (default: the machine's).
    pub workdir: Option<String>,
    /// Who the process runs as (default: the machine's user).
    pub user: Option<UserSpec>,
}

/// Runs `args` inside running machine `id` (`runc exec`) as `opts` say; stdin, stdout and
/// stderr are the caller's. Returns its exit code (`128 + n` when killed by signal n); an
/// `Err` means the machine is not running or runc failed.
pub fn machine_exec(
    cfg: &RuntimeConfig,
    id: &str,
    args: &[String],
    opts: &ExecOptions,
) -> Result<i32> {
    let ExecOptions {
        env,
        tty,
        stdin,
        workdir,
        user,
    } = opts;
    let tty = *tty;
    check_id(id)?;
    if args.is_empty() {
        return Err(machine_err(id, "exec: no command"));
    }
    if let Some(w) = workdir.as_deref().filter(|w| !w.starts_with('/')) {
        return Err(machine_err(
            id,
            format!("exec: the working directory `{w}` must be an absolute path"),
        ));
    }
    if let Some(e) = env.iter().find(|e| !e.contains('=')) {
        return Err(machine_err(
            id,
            format!("exec: environment entry `{e}` has no `=`"),
        ));
    }
    if tty && !std::io::stdin().is_terminal() {
        // runc would fail later with `open /dev/tty: no such device or address`.
        return Err(machine_err(
            id,
            "exec with a tty needs a terminal on stdin; run without a tty",
        ));
    }
    let state = runc_state(cfg, id)?;
    let running = state
        .as_ref()
        .is_some_and(|s| s["status"] == "running" || s["status"] == "paused");
    let Some(state) = state.filter(|_| running) else {
        return Err(machine_err(id, "exec: the machine is not running"));
    };
    let cid = container_id(id);
    // runc's own failures and the command's exit status share the exit code: runc's JSON
    // log tells them apart. It goes in the bundle (the machine's directory).
    let log = state["bundle"]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!(
            "exec-{}-{}.log",
            std::process::id(),
            exec_counter()
        ));
    let mut cmd = runc(cfg);
    cmd.arg("--log")
        .arg(&log)
        .args(["--log-format", "json", "exec"]);
    if tty {
        cmd.arg("-t");
    } else if !stdin {
        cmd.stdin(std::process::Stdio::null());
    }
    for e in env {
        cmd.arg("--env").arg(e);
    }
    if let Some(w) = workdir {
        cmd.arg("--cwd").arg(w);
    }
    if let Some(u) = user {
        cmd.arg("--user").arg(format!("{}:{}", u.uid, u.gid));
        for g in &u.clone().with_primary_group().additional_gids {
            cmd.arg("--additional-gids").arg(g.to_string());
        }
    }
    cmd.arg(&cid).args(args);
    let command = command_line(&cmd);
    let status = cmd.status().map_err(|source| Error::Spawn {
        id: cid.clone(),
        command: command.clone(),
        source,
    });
    let errors = runc_log_errors(&log);
    let _ = std::fs::remove_file(&log);
    let status = status?;
    if !status.success() && !errors.is_empty() {
        return Err(Error::Runc {
            id: cid,
            command,
            status: describe(status),
            stderr: errors.join("; "),
        });
    }
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => -1,
    })
}

/// A number that differs between calls in one process (names of exec logs).
fn exec_counter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids() {
        for ok in ["a", "web-1", "0abc", &"a".repeat(41)] {
            assert!(valid_machine_id(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", "a b", &"a".repeat(42)] {
            assert!(!valid_machine_id(bad), "{bad}");
        }
        assert_eq!(container_id("web"), "strata-m-web");
    }

    #[test]
    fn hostname_is_in_the_environment_unless_set() {
        let env = vec!["PATH=/bin".to_string()];
        assert_eq!(with_hostname(&env, "m1"), ["HOSTNAME=m1", "PATH=/bin"]);
        let own = vec!["HOSTNAME=mine".to_string(), "A=1".to_string()];
        assert_eq!(with_hostname(&own, "m1"), own);
    }

    #[test]
    fn init_lookup() {
        let t = tempfile::tempdir().unwrap();
        let e = init_at(Some(t.path().join("nope").into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("apt-get install tini") && e.contains("nope"),
            "{e}"
        );
        let fake = t.path().join("init");
        std::fs::write(&fake, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(init_at(Some(fake.clone().into())).unwrap(), fake);
    }

    #[test]
    fn init_wraps_the_command() {
        assert_eq!(
            init_args(&["sh".into(), "-c".into(), "x".into()]),
            ["/.strata/init", "-g", "--", "sh", "-c", "x"]
        );
    }

    #[test]
    fn resolv_conf_drops_loopback_servers() {
        let host = "# x\nnameserver 127.0.0.53\noptions edns0\n";
        assert_eq!(
            machine_resolv_conf(Some(host)),
            "# x\noptions edns0\nnameserver 8.8.8.8\nnameserver 8.8.4.4\n"
        );
        let host = "search lan\nnameserver 192.168.1.1\nnameserver ::1\n";
        assert_eq!(
            machine_resolv_conf(Some(host)),
            "search lan\nnameserver 192.168.1.1\n"
        );
        assert!(machine_resolv_conf(None).contains("8.8.8.8"));
    }

    #[test]
    fn config_joins_the_netns_and_binds_own_etc_files() {
        let run = RunSpec {
            id: "strata-m-x".into(),
            rootfs: Rootfs::Dir("/m/rootfs".into()),
            args: init_args(&["app".into()]),
            env: vec![],
            cwd: "/".into(),
            user: UserSpec::default(),
            hostname: "x".into(),
            network: NetworkMode::None,
            mounts: vec![MountSpec::Bind {
                source: "/m/etc/hosts".into(),
                target: "/etc/hosts".into(),
                readonly: false,
            }],
            readonly_rootfs: false,
        };
        let c = machine_config(
            &run,
            BundleSetup {
                rootfs: Path::new("/m/rootfs"),
                isolated_hosts: Path::new("/m/etc/hosts"),
                cgroups_path: None,
                nofile_limit: 1024,
            },
            Path::new("/run/netns/strata-x"),
        );
        let net: Vec<&Value> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] == "network")
            .collect();
        assert_eq!(net.len(), 1);
        assert_eq!(net[0]["path"], "/run/netns/strata-x");
        let hosts: Vec<&Value> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["destination"] == "/etc/hosts")
            .collect();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0]["options"], json!(["rbind", "rprivate", "rw"]));
        assert_eq!(c["process"]["args"][0], INIT_PATH);
    }
}
