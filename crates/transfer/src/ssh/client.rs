//! The client side: one multiplexed OpenSSH connection per host, `strata serve --stdio` at the
//! other end (installed there first when missing or of another version), and push and pull
//! over it.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use strata_oci::sync::MutexExt;
use strata_oci::{Descriptor, Index, Manifest, Platform, media_type};
use strata_store::Store;

use super::proto::{BlobRef, Missing, PROTOCOL, Reply, Request, read_frame, write_frame};
use super::serve::STREAM_BUFFER;
use crate::error::{Error, Result};
use crate::import::local_name;
use crate::registry::{BlobProgress, BlobState, ProgressFn};

/// Where strata is found (and installed) on a host unless `[host.NAME] strata` says otherwise.
pub const DEFAULT_REMOTE_STRATA: &str = "~/.strata/bin/strata";
/// The environment variable naming the ssh command (program and arguments, split at spaces),
/// as `GIT_SSH_COMMAND` does for git. Default `ssh`.
pub const SSH_COMMAND_ENV: &str = "STRATA_SSH_COMMAND";
/// The exit status of the remote command when strata is not at its path.
const NO_STRATA: i32 = 97;

/// A host reached over SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshHost {
    /// How the user named it: a `[host.NAME]` name or the `ssh://` URL.
    pub name: String,
    pub user: Option<String>,
    /// Host name or address (IPv6 without brackets).
    pub address: String,
    pub port: Option<u16>,
    /// A private key for `ssh -i`.
    pub identity: Option<PathBuf>,
    /// The store on the host; `None`: strata's default there (`$STRATA_STORE`, else
    /// `/var/lib/strata` for root).
    pub store: Option<String>,
    /// strata's path on the host (`~/` is the remote home).
    pub strata: String,
    /// More `ssh` arguments, before strata's own (a relay's host key checking).
    pub ssh_options: Vec<String>,
    /// Whether this host takes part in relays: receives blobs from another host, and sends
    /// them on to others (see docs/hosts.md).
    pub relay: bool,
    /// `address[:port]` other hosts reach this one at, when it is not the address this side
    /// uses (a private network between the hosts).
    pub relay_address: Option<String>,
}

impl SshHost {
    /// A host from `[user@]address[:port]` (strata.toml's `ssh = …`).
    pub fn from_target(name: &str, target: &str) -> Result<SshHost> {
        let bad = |reason: &str| Error::Host {
            host: name.to_string(),
            reason: format!("`{target}`: {reason}; expected user@address[:port]"),
        };
        let (user, rest) = match target.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(bad("empty user")),
            None => (None, target),
        };
        let (address, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (a, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            match after {
                "" => (a, None),
                p => (
                    a,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?),
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((a, p)) => (a, Some(p)),
                None => (rest, None),
            }
        };
        if address.is_empty()
            || address.starts_with('-')
            || !address
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:_%".contains(c))
        {
            return Err(bad("not a host name or address"));
        }
        if user
            .as_deref()
            .is_some_and(|u| u.starts_with('-') || u.chars().any(|c| c.is_whitespace()))
        {
            return Err(bad("not a user name"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| bad("bad port"))?,
            ),
        };
        Ok(SshHost {
            name: name.to_string(),
            user,
            address: address.to_string(),
            port,
            identity: None,
            store: None,
            strata: DEFAULT_REMOTE_STRATA.to_string(),
            ssh_options: Vec::new(),
            relay: false,
            relay_address: None,
        })
    }

    /// `ssh://[user@]address[:port][/NAME[:TAG]]`: the host and the image name after it.
    pub fn parse_url(url: &str) -> Result<(SshHost, Option<String>)> {
        let rest = url.strip_prefix("ssh://").ok_or_else(|| Error::Host {
            host: url.to_string(),
            reason: "not an ssh:// URL".into(),
        })?;
        let (target, path) = match rest.split_once('/') {
            Some((t, p)) if !p.is_empty() => (t, Some(p.to_string())),
            Some((t, _)) => (t, None),
            None => (rest, None),
        };
        let host_name = format!("ssh://{target}");
        Ok((SshHost::from_target(&host_name, target)?, path))
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Host {
            host: self.name.clone(),
            reason: reason.into(),
        }
    }
}

/// The name the relay's ssh checks the target's host key under (`HostKeyAlias`): its own
/// known_hosts file holds only the keys the developer's side trusts, under this name.
const RELAY_HOST_KEY_ALIAS: &str = "strata-relay-target";

/// A host as another host reaches it in a relay (see [`HostSession::relay_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    pub user: String,
    /// Host name or address (IPv6 without brackets).
    pub address: String,
    pub port: u16,
    /// `TYPE BASE64` of each host key the developer's known_hosts accepts for the host.
    pub host_keys: Vec<String>,
}

impl RelayTarget {
    /// `user@address:port`, as [`SshHost::from_target`] reads it.
    pub fn target(&self) -> String {
        if self.address.contains(':') {
            format!("{}@[{}]:{}", self.user, self.address, self.port)
        } else {
            format!("{}@{}:{}", self.user, self.address, self.port)
        }
    }
}

/// The keys (`TYPE BASE64`) of `ssh-keygen -F` output; revoked keys and CA lines are left out
/// (a relay trusts plain host keys only).
fn known_host_keys(found: &str) -> Vec<String> {
    found
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('@'))
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(1);
            Some(format!("{} {}", f.next()?, f.next()?))
        })
        .collect()
}

impl SshHost {
    /// `target` (`user@address[:port]`) as a relay on another host reaches it: ssh there reads
    /// no config file, trusts only `host_keys` (written to `known_hosts`, a file of the
    /// caller's that must outlive the connection) and authenticates with the agent the
    /// developer's side forwarded.
    pub fn for_relay(
        name: &str,
        target: &str,
        host_keys: &[String],
        known_hosts: &Path,
    ) -> Result<SshHost> {
        let mut host = SshHost::from_target(name, target)?;
        if host_keys.is_empty() {
            return Err(host.err("no host key to check it by"));
        }
        let port = host.port.unwrap_or(22);
        let mut lines = String::new();
        for k in host_keys {
            if k.split_whitespace().count() != 2 || k.contains('\n') {
                return Err(host.err(format!("`{k}` is not a host key (TYPE BASE64)")));
            }
            lines.push_str(&format!("{RELAY_HOST_KEY_ALIAS} {k}\n"));
            lines.push_str(&format!("[{RELAY_HOST_KEY_ALIAS}]:{port} {k}\n"));
        }
        std::fs::write(known_hosts, lines)
            .map_err(|e| host.err(format!("cannot write {}: {e}", known_hosts.display())))?;
        host.ssh_options = [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            &format!("HostKeyAlias={RELAY_HOST_KEY_ALIAS}"),
            "-o",
            "CheckHostIP=no",
            "-o",
            "UpdateHostKeys=no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Ok(host)
    }
}

/// A path for the remote shell: `~/x` becomes `"$HOME"/'x'`, anything else single-quoted.
fn shell_path(path: &str) -> String {
    match path.strip_prefix("~/") {
        Some(rest) => format!("\"$HOME\"/{}", shell_quote(rest)),
        None => shell_quote(path),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// One OpenSSH master connection to a host (`ssh -M`); every session of the command runs over
/// it. Dropping it closes the master.
struct Mux {
    host: SshHost,
    dir: tempfile::TempDir,
    ssh: Vec<String>,
}

impl Mux {
    fn start(host: &SshHost) -> Result<Mux> {
        let ssh: Vec<String> = std::env::var(SSH_COMMAND_ENV)
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map_or_else(
                || vec!["ssh".to_string()],
                |s| s.split_whitespace().map(str::to_string).collect(),
            );
        // A short path: unix socket paths are limited to about 100 bytes.
        let dir = tempfile::Builder::new()
            .prefix("strata-ssh-")
            .tempdir_in(std::env::temp_dir())
            .map_err(|e| host.err(format!("cannot create a control directory: {e}")))?;
        let mux = Mux {
            host: host.clone(),
            dir,
            ssh,
        };
        let log_path = mux.dir.path().join("master.log");
        let log = File::create(&log_path)
            .map_err(|e| host.err(format!("cannot create {}: {e}", log_path.display())))?;
        let status = mux
            .base()
            // -f: background after authentication, so the foreground exit says whether the
            // connection stands; ControlPersist: the master ends by itself if this process is
            // killed and cannot send `-O exit`.
            .args(["-M", "-f", "-N", "-o", "ControlPersist=30"])
            .arg(mux.destination())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .map_err(|e| host.err(format!("cannot run `{}`: {e}", mux.ssh[0])))?;
        if !status.success() {
            let said = std::fs::read_to_string(&log_path).unwrap_or_default();
            return Err(host.err(format!(
                "ssh cannot connect to {}: {}",
                mux.destination(),
                tail(&said)
            )));
        }
        Ok(mux)
    }

    fn control_path(&self) -> PathBuf {
        self.dir.path().join("cm")
    }

    fn destination(&self) -> String {
        match &self.host.user {
            Some(u) => format!("{u}@{}", self.host.address),
            None => self.host.address.clone(),
        }
    }

    /// `ssh` with the options every invocation shares, before the destination.
    fn base(&self) -> Command {
        let mut c = self.unshared();
        c.arg("-S").arg(self.control_path());
        c
    }

    /// `ssh` with the options of [`Mux::base`] but its own connection (not the master's).
    fn unshared(&self) -> Command {
        let mut c = Command::new(&self.ssh[0]);
        // The first value of an option wins: the host's own options before the user's.
        c.args(&self.host.ssh_options);
        c.args(&self.ssh[1..]);
        // No prompt can be answered (strata is not interactive): fail instead of hanging; and
        // notice a dead link within a minute.
        c.args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
            "-o",
            "ConnectTimeout=20",
            "-T",
        ]);
        if let Some(p) = self.host.port {
            c.arg("-p").arg(p.to_string());
        }
        if let Some(i) = &self.host.identity {
            c.arg("-i").arg(i);
        }
        c
    }

    /// A session on a connection of its own (no master) that forwards the user's agent,
    /// running `remote`: the agent is reachable on the host only while this session runs.
    /// (A session over the master could forward it only if the master did, for the whole
    /// command.)
    fn command_forwarding_agent(&self, remote: &str) -> Command {
        let mut c = self.unshared();
        c.args(["-o", "ControlPath=none", "-o", "ForwardAgent=yes"])
            .arg(self.destination());
        c.arg("--").arg(remote);
        c
    }

    /// A session over the master running the remote shell command `remote`.
    fn command(&self, remote: &str) -> Command {
        let mut c = self.base();
        c.args(["-o", "ControlMaster=no"]).arg(self.destination());
        c.arg("--").arg(remote);
        c
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        let _ = self
            .base()
            .args(["-O", "exit"])
            .arg(self.destination())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The last lines of what a process said, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let t = lines[lines.len().saturating_sub(6)..].join("\n");
    if t.is_empty() {
        "(nothing on stderr)".to_string()
    } else {
        strata_oci::printable(&t).into_owned()
    }
}

/// Receives notices meant for the user.
pub type Notice = dyn Fn(&str) + Send + Sync;

/// Options of [`HostSession::connect`].
#[derive(Clone)]
pub struct ConnectOptions {
    /// This binary's version: a host running another one gets this binary.
    pub version: String,
    /// The binary to install on a host that lacks strata (normally this process's own).
    pub exe: Option<PathBuf>,
    /// Told what happens that the user should know (an install).
    pub notice: Option<Arc<Notice>>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("version", &self.version)
            .field("exe", &self.exe)
            .finish()
    }
}

/// What a push to a host moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipReport {
    /// The image's name on the host.
    pub name: String,
    pub descriptor: Descriptor,
    /// Blobs sent (whole or the rest of an interrupted one).
    pub blobs_sent: usize,
    /// Blobs the host had.
    pub blobs_present: usize,
    /// Blob bytes sent.
    pub bytes_sent: u64,
    /// Blobs continued from what an interrupted transfer left on the host.
    pub resumed: usize,
}

/// What a pull from a host moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    /// The local name set.
    pub name: String,
    pub descriptor: Descriptor,
    pub blobs_fetched: usize,
    pub blobs_present: usize,
    pub bytes_fetched: u64,
    pub resumed: usize,
}

/// A running `strata serve --stdio` on a host.
pub struct HostSession {
    host: SshHost,
    child: Child,
    input: BufWriter<ChildStdin>,
    output: BufReader<ChildStdout>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The host's strata version.
    pub remote_version: String,
    // Dropped after the session (fields drop in order).
    mux: Mux,
}

impl std::fmt::Debug for HostSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSession")
            .field("host", &self.host.name)
            .field("remote_version", &self.remote_version)
            .finish()
    }
}

/// A started `strata serve` that greeted with our version.
struct Started {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    stderr: Arc<Mutex<Vec<u8>>>,
    version: String,
}

enum Start {
    Ready(Box<Started>),
    /// Strata must be (re)installed there, for this reason.
    Install(String),
}

impl HostSession {
    /// Connect to `host`, installing this binary there first if strata is missing or of
    /// another version.
    pub fn connect(host: &SshHost, opts: &ConnectOptions) -> Result<HostSession> {
        let mux = Mux::start(host)?;
        let mut installed = false;
        loop {
            match Self::start(&mux, opts)? {
                Start::Ready(s) => {
                    let Started {
                        child,
                        input,
                        output,
                        stderr,
                        version,
                    } = *s;
                    return Ok(HostSession {
                        host: host.clone(),
                        child,
                        input: BufWriter::with_capacity(STREAM_BUFFER, input),
                        output,
                        stderr,
                        remote_version: version,
                        mux,
                    });
                }
                Start::Install(why) if installed => {
                    return Err(host.err(format!(
                        "strata installed at {} still does not answer: {why}",
                        host.strata
                    )));
                }
                Start::Install(why) => {
                    install(&mux, opts, &why)?;
                    installed = true;
                }
            }
        }
    }

    fn start(mux: &Mux, opts: &ConnectOptions) -> Result<Start> {
        let host = mux.host.clone();
        let store = host
            .store
            .as_deref()
            .map_or(String::new(), |s| format!("--store {} ", shell_path(s)));
        let script = format!(
            "p={}; if [ -x \"$p\" ]; then exec \"$p\" {store}serve --stdio; \
             else echo \"no strata at $p\" >&2; exit {NO_STRATA}; fi",
            shell_path(&host.strata),
        );
        let mut child = mux
            .command(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| host.err(format!("cannot run ssh: {e}")))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut s = sink.lock_ok();
                    // Keep the last 64 KiB: enough for any error message.
                    if s.len() > 64 * 1024 {
                        s.drain(..32 * 1024);
                    }
                    s.extend_from_slice(&buf[..n]);
                }
            });
        }
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(host.err("ssh has no stdin/stdout"));
        };
        let mut output = BufReader::with_capacity(STREAM_BUFFER, output);
        let hello = read_frame::<Reply>(&mut output);
        match hello {
            Ok(Some(Reply::Hello {
                protocol,
                version,
                arch: _,
                store: _,
            })) => {
                if protocol == PROTOCOL && version == opts.version {
                    return Ok(Start::Ready(Box::new(Started {
                        child,
                        input,
                        output,
                        stderr,
                        version,
                    })));
                }
                drop(input);
                let _ = child.wait();
                Ok(Start::Install(format!(
                    "it runs strata {version} (protocol {protocol}); this is {} (protocol {PROTOCOL})",
                    opts.version
                )))
            }
            Ok(Some(other)) => Err(host.err(format!(
                "strata on the host did not greet as expected: {other:?}"
            ))),
            Ok(None) | Err(_) => {
                drop(input);
                let status = child.wait().ok().and_then(|s| s.code());
                let said = last_words(&stderr);
                match (status, hello) {
                    (Some(NO_STRATA), _) => Ok(Start::Install(said)),
                    (Some(255), _) => Err(host.err(format!("ssh failed: {said}"))),
                    (_, Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
                        Err(host.err(format!(
                            "what the host sent is not strata's protocol ({e}); does a shell \
                             startup file print something? {said}"
                        )))
                    }
                    (code, _) => Err(host.err(format!(
                        "`strata serve` on the host ended ({}) before greeting: {said}",
                        code.map_or("killed".to_string(), |c| format!("exit {c}"))
                    ))),
                }
            }
        }
    }

    /// The host this session talks to.
    pub fn host(&self) -> &SshHost {
        &self.host
    }

    /// `strata [--store S] ARGS…` on the host, over this session's connection, with `env`
    /// (`NAME=value`) set: the caller picks stdio and runs it. The host's strata is this
    /// binary's version (checked when the session started).
    pub fn strata_command(&self, env: &[(&str, &str)], args: &[&str]) -> Command {
        self.mux.command(&self.strata_script(env, args))
    }

    fn strata_script(&self, env: &[(&str, &str)], args: &[&str]) -> String {
        let mut script = String::from("exec env");
        for (k, v) in env {
            script.push_str(&format!(" {}", shell_quote(&format!("{k}={v}"))));
        }
        script.push_str(&format!(" {}", shell_path(&self.host.strata)));
        if let Some(s) = &self.host.store {
            script.push_str(&format!(" --store {}", shell_path(s)));
        }
        for a in args {
            script.push(' ');
            script.push_str(&shell_quote(a));
        }
        script
    }

    /// How another host reaches this one for a relay: the user, address and port this
    /// side's ssh uses for it (`ssh -G`: aliases and `~/.ssh/config` resolved), or the
    /// host's `relay_address`; and the host keys this side's known_hosts files accept for it,
    /// so the other host trusts exactly what this side trusts.
    pub fn relay_target(&self) -> Result<RelayTarget> {
        let out = self
            .mux
            .unshared()
            .arg("-G")
            .arg(self.mux.destination())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.host.err(format!("cannot run `ssh -G`: {e}")))?;
        if !out.status.success() {
            return Err(self.host.err(format!(
                "`ssh -G` failed: {}",
                tail(&String::from_utf8_lossy(&out.stderr))
            )));
        }
        let config = String::from_utf8_lossy(&out.stdout);
        let value = |key: &str| {
            config.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().to_string())
            })
        };
        let user = value("user").ok_or_else(|| self.host.err("`ssh -G` names no user"))?;
        let hostname = value("hostname").unwrap_or_else(|| self.host.address.clone());
        let port = value("port")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(22);
        let alias = value("hostkeyalias").filter(|a| a != "none");
        let lookup = {
            let name = alias.as_deref().unwrap_or(&hostname);
            if port == 22 {
                name.to_string()
            } else {
                format!("[{name}]:{port}")
            }
        };
        let home = std::env::var("HOME").unwrap_or_default();
        let files: Vec<String> = ["userknownhostsfile", "globalknownhostsfile"]
            .iter()
            .filter_map(|k| value(k))
            .flat_map(|v| {
                v.split_whitespace()
                    .map(|f| match f.strip_prefix("~/") {
                        Some(rest) => format!("{home}/{rest}"),
                        None => f.to_string(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut host_keys = Vec::new();
        for file in files.iter().filter(|f| Path::new(f).is_file()) {
            let found = Command::new("ssh-keygen")
                .args(["-F", &lookup, "-f", file])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map_err(|e| self.host.err(format!("cannot run `ssh-keygen -F`: {e}")))?;
            host_keys.extend(known_host_keys(&String::from_utf8_lossy(&found.stdout)));
        }
        host_keys.dedup();
        let (address, port) = match &self.host.relay_address {
            Some(a) => {
                let h = SshHost::from_target(&self.host.name, a)?;
                (h.address, h.port.unwrap_or(22))
            }
            None => (hostname, port),
        };
        Ok(RelayTarget {
            user,
            address,
            port,
            host_keys,
        })
    }

    /// `strata [--store S] ARGS…` on the host over a connection of its own that forwards
    /// the user's agent, for a relay from this host to another (its ssh authenticates with
    /// the agent). The agent is reachable there only while this command runs.
    pub fn strata_command_with_agent(&self, args: &[&str]) -> Command {
        self.mux
            .command_forwarding_agent(&self.strata_script(&[], args))
    }

    /// An error for a broken stream: what failed, and what the host said on stderr.
    fn lost(&self, doing: &str, e: &io::Error) -> Error {
        self.host.err(format!(
            "connection lost while {doing} ({e}); the host said: {}",
            last_words(&self.stderr)
        ))
    }

    fn call(&mut self, req: &Request) -> Result<Reply> {
        write_frame(&mut self.input, req).map_err(|e| self.lost("sending a request", &e))?;
        match read_frame::<Reply>(&mut self.output) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(self.lost(
                "waiting for an answer",
                &io::ErrorKind::UnexpectedEof.into(),
            )),
            Err(e) => Err(self.lost("waiting for an answer", &e)),
        }
    }

    /// Which of `blobs` the host lacks (one round trip).
    pub fn missing(&mut self, blobs: &[Descriptor]) -> Result<Vec<Missing>> {
        let req = Request::Have {
            blobs: blobs
                .iter()
                .map(|d| BlobRef {
                    digest: d.digest.clone(),
                    size: d.size,
                })
                .collect(),
        };
        match self.call(&req)? {
            Reply::Have { missing } => Ok(missing),
            other => Err(self.unexpected(&other)),
        }
    }

    fn unexpected(&self, reply: &Reply) -> Error {
        self.host.err(describe(reply))
    }

    /// Push the store's image `local` to the host as `remote_name`, sending only the blobs it
    /// lacks (and only the rest of a blob an interrupted push left there).
    pub fn push(
        &mut self,
        store: &Store,
        local: &str,
        remote_name: &str,
        progress: Option<&ProgressFn>,
    ) -> Result<ShipReport> {
        let local = local_name(local)?;
        let remote_name = local_name(remote_name)?;
        let closure = ImageClosure::of(store, &local)?;
        let all: Vec<Descriptor> = closure
            .blobs
            .iter()
            .chain(&closure.manifests)
            .cloned()
            .collect();
        let missing = self.missing(&all)?;
        let wanted: BTreeSet<_> = missing.iter().map(|m| m.digest.clone()).collect();
        let report = |d: &Descriptor, done: u64, state: BlobState| {
            if let Some(p) = progress {
                p(&BlobProgress {
                    digest: d.digest.clone(),
                    done,
                    total: d.size,
                    state,
                });
            }
        };
        for d in all.iter().filter(|d| !wanted.contains(&d.digest)) {
            report(d, d.size, BlobState::Skipped);
        }
        let sends: Vec<(Descriptor, u64)> = missing
            .iter()
            .filter_map(|m| {
                let d = all.iter().find(|d| d.digest == m.digest)?;
                Some((d.clone(), m.offset.min(d.size)))
            })
            .collect();
        let tag = Request::Tag {
            name: remote_name.clone(),
            manifests: closure.manifests.clone(),
        };
        let HostSession { input, output, .. } = self;
        // Replies are read on another thread while blobs are written, so neither side ever
        // waits for the other to drain a pipe.
        let (replies, sent) = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut replies = Vec::new();
                for _ in 0..=sends.len() {
                    match read_frame::<Reply>(output) {
                        Ok(Some(r)) => replies.push(r),
                        Ok(None) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                        Err(e) => return Err(e),
                    }
                }
                Ok(replies)
            });
            let sent = send_blobs(store, input, &sends, &tag, &report);
            (reader.join(), sent)
        });
        let replies = match (replies, sent) {
            (Ok(Ok(r)), Ok(_)) => r,
            (Ok(Err(e)), _) => return Err(self.lost("sending blobs", &e)),
            (_, Err((what, e))) => return Err(self.lost(&what, &e)),
            (Err(_), _) => return Err(self.host.err("reader thread panicked")),
        };
        let mut failures = Vec::new();
        for (r, (d, _)) in replies.iter().zip(&sends) {
            match r {
                Reply::Ok => {}
                Reply::Error { message } => failures.push(format!(
                    "blob {}: {}",
                    d.digest,
                    strata_oci::printable(message)
                )),
                other => failures.push(describe(other)),
            }
        }
        if !failures.is_empty() {
            return Err(self.host.err(failures.join("\n")));
        }
        match replies.last() {
            Some(Reply::Ok) => {}
            Some(other) => {
                return Err(self
                    .host
                    .err(format!("cannot name `{remote_name}`: {}", describe(other))));
            }
            None => return Err(self.host.err("no answer to the tag")),
        }
        Ok(ShipReport {
            name: remote_name,
            descriptor: closure.top,
            blobs_sent: sends.len(),
            blobs_present: all.len() - sends.len(),
            bytes_sent: sends.iter().map(|(d, o)| d.size - o).sum(),
            resumed: sends.iter().filter(|(_, o)| *o > 0).count(),
        })
    }

    /// What `name` points at on the host.
    pub fn resolve(&mut self, name: &str) -> Result<Option<Descriptor>> {
        match self.call(&Request::Resolve {
            name: name.to_string(),
        })? {
            Reply::Resolved { descriptor } => Ok(descriptor.map(|d| *d)),
            other => Err(self.unexpected(&other)),
        }
    }

    /// Pull the host's image `remote_name` into the store as `local` (the host's platform
    /// for an index), fetching only the blobs the store lacks.
    pub fn pull(
        &mut self,
        store: &Store,
        remote_name: &str,
        local: &str,
        progress: Option<&ProgressFn>,
    ) -> Result<FetchReport> {
        let local = local_name(local)?;
        let top = self.resolve(remote_name)?.ok_or_else(|| {
            self.host.err(format!(
                "has no image `{remote_name}` (see `strata images` there)"
            ))
        })?;
        let _session = store.write_session()?;
        let mut fetched = Vec::new();
        let mut present = 0usize;
        let mut fetch = |this: &mut Self, ds: &[Descriptor], present: &mut usize| {
            let need: Vec<Descriptor> = ds
                .iter()
                .filter(|d| store.blob_size(&d.digest).ok() != Some(d.size))
                .cloned()
                .collect();
            *present += ds.len() - need.len();
            let got = this.fetch_blobs(store, &need, progress)?;
            fetched.extend(got);
            Ok::<_, Error>(())
        };
        fetch(self, std::slice::from_ref(&top), &mut present)?;
        let top_bytes = store.read_descriptor(&top)?;
        let mut manifests = vec![top.clone()];
        let manifest_desc = if media_type::is_index(&top.media_type) {
            let idx = Index::from_slice(&top_bytes).map_err(|e| Error::Image {
                name: remote_name.to_string(),
                reason: format!("bad index: {e}"),
            })?;
            let child = idx
                .for_platform(&Platform::host())
                .cloned()
                .ok_or_else(|| Error::Image {
                    name: remote_name.to_string(),
                    reason: format!("no manifest for {}", Platform::host()),
                })?;
            fetch(self, std::slice::from_ref(&child), &mut present)?;
            manifests.insert(0, child.clone());
            child
        } else {
            top.clone()
        };
        let m = Manifest::from_slice(&store.read_descriptor(&manifest_desc)?).map_err(|e| {
            Error::Image {
                name: remote_name.to_string(),
                reason: format!("bad manifest: {e}"),
            }
        })?;
        let blobs: Vec<Descriptor> = std::iter::once(&m.config)
            .chain(&m.layers)
            .filter(|d| d.urls.as_ref().is_none_or(|u| u.is_empty()))
            .cloned()
            .collect();
        fetch(self, &blobs, &mut present)?;
        for d in &manifests {
            let bytes = store.read_descriptor(d)?;
            store.put_manifest_bytes(&bytes, &d.media_type)?;
        }
        let mut named = top.clone();
        named.annotations = None;
        store.set_ref(&local, named)?;
        Ok(FetchReport {
            name: local,
            descriptor: top,
            blobs_fetched: fetched.len(),
            blobs_present: present,
            bytes_fetched: fetched.iter().map(|(_, n, _)| n).sum(),
            resumed: fetched.iter().filter(|(_, _, r)| *r).count(),
        })
    }

    /// Fetch `blobs` into the store: every `get` is sent at once (from another thread) while
    /// the data is read here, each blob continuing what an interrupted pull left. Returns
    /// (blob, bytes received, resumed) of each.
    fn fetch_blobs(
        &mut self,
        store: &Store,
        blobs: &[Descriptor],
        progress: Option<&ProgressFn>,
    ) -> Result<Vec<(Descriptor, u64, bool)>> {
        if blobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut partials = Vec::new();
        for d in blobs {
            partials.push(store.partial_blob(&d.digest, d.size)?);
        }
        let gets: Vec<Request> = blobs
            .iter()
            .zip(&partials)
            .map(|(d, p)| Request::Get {
                digest: d.digest.clone(),
                offset: p.offset(),
            })
            .collect();
        let HostSession {
            input,
            output,
            host,
            ..
        } = self;
        let host = host.clone();
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                for g in &gets {
                    write_frame(input, g)?;
                }
                Ok::<_, io::Error>(())
            });
            let mut out = Vec::new();
            let mut buf = vec![0u8; STREAM_BUFFER];
            for (d, mut p) in blobs.iter().zip(partials) {
                let offset = p.offset();
                let size = match read_frame::<Reply>(output) {
                    Ok(Some(Reply::Data { size })) => size,
                    Ok(Some(Reply::Error { message })) => {
                        return Err(host.err(format!(
                            "blob {}: {}",
                            d.digest,
                            strata_oci::printable(&message)
                        )));
                    }
                    Ok(Some(other)) => {
                        return Err(host.err(describe(&other)));
                    }
                    Ok(None) => {
                        return Err(host.err("connection lost while fetching blobs"));
                    }
                    Err(e) => return Err(host.err(format!("connection lost: {e}"))),
                };
                if size != d.size {
                    return Err(host.err(format!(
                        "blob {} has {size} bytes there, its descriptor says {}",
                        d.digest, d.size
                    )));
                }
                let mut left = size - offset;
                let mut done = offset;
                while left > 0 {
                    let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = match output.read(&mut buf[..want]) {
                        Ok(0) => {
                            return Err(host.err(format!(
                                "connection lost {done} bytes into blob {}",
                                d.digest
                            )));
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(host.err(format!("connection lost: {e}"))),
                    };
                    p.write_all(&buf[..n]).map_err(|e| Error::Io {
                        op: "write",
                        path: p.path().to_path_buf(),
                        source: e,
                    })?;
                    left -= n as u64;
                    done += n as u64;
                    if let Some(f) = progress {
                        f(&BlobProgress {
                            digest: d.digest.clone(),
                            done,
                            total: size,
                            state: BlobState::Transferring,
                        });
                    }
                }
                p.commit().map_err(|e| host.err(e.to_string()))?;
                if let Some(f) = progress {
                    f(&BlobProgress {
                        digest: d.digest.clone(),
                        done: size,
                        total: size,
                        state: BlobState::Done,
                    });
                }
                out.push((d.clone(), size - offset, offset > 0));
            }
            writer
                .join()
                .map_err(|_| host.err("writer thread panicked"))?
                .map_err(|e| host.err(format!("connection lost: {e}")))?;
            Ok(out)
        })
    }

    /// Say bye and wait for the host's strata to exit.
    pub fn close(mut self) -> Result<()> {
        let r = self.call(&Request::Bye);
        let _ = self.child.wait();
        r.map(|_| ())
    }
}

impl Drop for HostSession {
    fn drop(&mut self) {
        // Closing stdin ends the server; reap it so no zombie is left.
        let _ = self.input.flush();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a reply that is not the expected one says: the host's error, or the reply itself.
fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Error { message } => strata_oci::printable(message).into_owned(),
        other => format!("unexpected answer {other:?}"),
    }
}

/// The last lines the host's side wrote on stderr, after a moment for the reader thread to
/// collect them.
fn last_words(stderr: &Mutex<Vec<u8>>) -> String {
    std::thread::sleep(std::time::Duration::from_millis(50));
    tail(&String::from_utf8_lossy(&stderr.lock_ok()))
}

/// Write each `put` and its bytes, then the tag. On failure: what was being done, and why.
fn send_blobs(
    store: &Store,
    input: &mut BufWriter<ChildStdin>,
    sends: &[(Descriptor, u64)],
    tag: &Request,
    report: &dyn Fn(&Descriptor, u64, BlobState),
) -> std::result::Result<(), (String, io::Error)> {
    for (d, offset) in sends {
        let what = || format!("sending blob {}", d.digest);
        write_frame(
            input,
            &Request::Put {
                digest: d.digest.clone(),
                size: d.size,
                offset: *offset,
            },
        )
        .map_err(|e| (what(), e))?;
        let path = store.blob_path(&d.digest);
        let mut f = File::open(&path).map_err(|e| (what(), e))?;
        f.seek(SeekFrom::Start(*offset)).map_err(|e| (what(), e))?;
        let mut f = f.take(d.size - offset);
        let mut buf = vec![0u8; STREAM_BUFFER];
        let mut done = *offset;
        report(d, done, BlobState::Transferring);
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((what(), e)),
            };
            input.write_all(&buf[..n]).map_err(|e| (what(), e))?;
            done += n as u64;
            report(d, done, BlobState::Transferring);
        }
        if done != d.size {
            return Err((
                what(),
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the local blob file {} is short", path.display()),
                ),
            ));
        }
        report(d, d.size, BlobState::Done);
    }
    write_frame(input, tag).map_err(|e| ("naming the image".to_string(), e))
}

/// Everything an image's name reaches in the store, in the order a receiver must get it.
#[derive(Debug, Clone)]
pub struct ImageClosure {
    /// What the name points at.
    pub top: Descriptor,
    /// Manifests, children before the index listing them; `top` last.
    pub manifests: Vec<Descriptor>,
    /// Configs and layers, each once.
    pub blobs: Vec<Descriptor>,
}

impl ImageClosure {
    /// The closure of the local image `name`. For an index whose platforms are not all here
    /// (a pull takes one), the index and the platforms that are.
    pub fn of(store: &Store, name: &str) -> Result<ImageClosure> {
        let top = store
            .find_ref(name)?
            .ok_or_else(|| strata_store::Error::RefNotFound {
                name: name.to_string(),
            })?;
        let bad = |what: &str, e: strata_oci::Error| Error::Image {
            name: name.to_string(),
            reason: format!("bad {what}: {e}"),
        };
        let mut manifests = Vec::new();
        if media_type::is_index(&top.media_type) {
            let idx =
                Index::from_slice(&store.read_descriptor(&top)?).map_err(|e| bad("index", e))?;
            manifests.extend(
                idx.manifests
                    .iter()
                    .filter(|d| store.has_blob(&d.digest))
                    .cloned(),
            );
        }
        let mut blobs = Vec::new();
        let mut seen = BTreeSet::new();
        let children = if manifests.is_empty() {
            vec![top.clone()]
        } else {
            manifests.clone()
        };
        for d in &children {
            let m =
                Manifest::from_slice(&store.read_descriptor(d)?).map_err(|e| bad("manifest", e))?;
            for b in std::iter::once(&m.config).chain(&m.layers) {
                let foreign = b.urls.as_ref().is_some_and(|u| !u.is_empty());
                if foreign || !seen.insert(b.digest.clone()) {
                    continue;
                }
                if !store.has_blob(&b.digest) {
                    return Err(strata_store::Error::BlobNotFound {
                        digest: b.digest.clone(),
                    }
                    .into());
                }
                blobs.push(b.clone());
            }
        }
        let mut top_plain = top.clone();
        top_plain.annotations = None;
        manifests.push(top_plain.clone());
        Ok(ImageClosure {
            top: top_plain,
            manifests,
            blobs,
        })
    }
}

/// Install `opts.exe` at the host's strata path (after checking the architecture), saying so.
fn install(mux: &Mux, opts: &ConnectOptions, why: &str) -> Result<()> {
    let host = &mux.host;
    let exe = opts.exe.as_deref().ok_or_else(|| {
        host.err(format!(
            "strata is not usable at {} ({why}) and no binary was given to install",
            host.strata
        ))
    })?;
    let out = mux
        .command("uname -m")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| host.err(format!("cannot run ssh: {e}")))?;
    if !out.status.success() {
        return Err(host.err(format!(
            "`uname -m` failed: {}",
            tail(&String::from_utf8_lossy(&out.stderr))
        )));
    }
    let remote_arch = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let remote = match remote_arch.as_str() {
        "arm64" => "aarch64",
        "amd64" => "x86_64",
        a => a,
    };
    if remote != std::env::consts::ARCH {
        return Err(host.err(format!(
            "it is {remote_arch} and this strata is {}: install strata for {remote_arch} there \
             and set `strata = \"PATH\"` in its [host] table",
            std::env::consts::ARCH
        )));
    }
    let size = std::fs::metadata(exe).map(|m| m.len()).unwrap_or(0);
    if let Some(n) = &opts.notice {
        n(&format!(
            "{}: installing strata {} at {} ({:.1} MB; {})",
            host.name,
            opts.version,
            host.strata,
            size as f64 / 1e6,
            why.lines().last().unwrap_or(why)
        ));
    }
    let script = format!(
        "p={}; t=\"$p.tmp.$$\"; mkdir -p \"$(dirname \"$p\")\" && cat > \"$t\" && chmod 755 \"$t\" \
         && mv -f \"$t\" \"$p\" || {{ rm -f \"$t\"; exit 1; }}",
        shell_path(&host.strata)
    );
    let file =
        File::open(exe).map_err(|e| host.err(format!("cannot read {}: {e}", exe.display())))?;
    let out = mux
        .command(&script)
        .stdin(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| host.err(format!("cannot run ssh: {e}")))?;
    if !out.status.success() {
        return Err(host.err(format!(
            "cannot install strata at {}: {}",
            host.strata,
            tail(&String::from_utf8_lossy(&out.stderr))
        )));
    }
    Ok(())
}

/// This process's binary, to install on hosts.
pub fn current_exe() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .filter(|p| Path::new(p).is_file())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_and_urls_parse_and_bad_ones_name_the_host() {
        let h = SshHost::from_target("web", "deploy@10.0.0.2:2222").unwrap();
        assert_eq!(h.user.as_deref(), Some("deploy"));
        assert_eq!(h.address, "10.0.0.2");
        assert_eq!(h.port, Some(2222));
        assert_eq!(h.store, None);
        let h = SshHost::from_target("v6", "[fd00::2]:22").unwrap();
        assert_eq!((h.address.as_str(), h.port), ("fd00::2", Some(22)));
        let (h, path) = SshHost::parse_url("ssh://root@box/app:1").unwrap();
        assert_eq!(h.name, "ssh://root@box");
        assert_eq!(path.as_deref(), Some("app:1"));
        assert_eq!(SshHost::parse_url("ssh://box").unwrap().1, None);
        for bad in [
            "",
            "@box",
            "box:0",
            "box:x",
            "-oProxyCommand=x",
            "a b",
            "[::1",
        ] {
            let e = SshHost::from_target("h", bad).unwrap_err().to_string();
            assert!(e.contains("host `h`"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_relay_trusts_exactly_the_keys_given_and_refuses_junk() {
        let found = "# Host 10.0.0.2 found: line 3\n\
                     |1|abc= ssh-ed25519 AAAAkey1\n\
                     10.0.0.* ecdsa-sha2-nistp256 AAAAkey2 comment\n\
                     @revoked 10.0.0.2 ssh-rsa AAAAbad\n\
                     @cert-authority *.example ssh-ed25519 AAAAca\n";
        assert_eq!(
            known_host_keys(found),
            ["ssh-ed25519 AAAAkey1", "ecdsa-sha2-nistp256 AAAAkey2"]
        );
        let t = RelayTarget {
            user: "root".into(),
            address: "fd00::2".into(),
            port: 22,
            host_keys: Vec::new(),
        };
        assert_eq!(t.target(), "root@[fd00::2]:22");
        let parsed = SshHost::from_target("x", &t.target()).unwrap();
        assert_eq!(
            (parsed.address.as_str(), parsed.port),
            ("fd00::2", Some(22))
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("known_hosts");
        let keys = vec!["ssh-ed25519 AAAAkey1".to_string()];
        let h = SshHost::for_relay("web2", "deploy@10.0.0.3:2222", &keys, &file).unwrap();
        assert_eq!((h.address.as_str(), h.port), ("10.0.0.3", Some(2222)));
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            text,
            "strata-relay-target ssh-ed25519 AAAAkey1\n\
             [strata-relay-target]:2222 ssh-ed25519 AAAAkey1\n"
        );
        let opts = h.ssh_options.join(" ");
        for want in [
            "-F /dev/null",
            "StrictHostKeyChecking=yes",
            "GlobalKnownHostsFile=/dev/null",
            "HostKeyAlias=strata-relay-target",
        ] {
            assert!(opts.contains(want), "{opts}");
        }
        let e = SshHost::for_relay("web2", "10.0.0.3", &[], &file).unwrap_err();
        assert!(e.to_string().contains("no host key"), "{e}");
        let bad = vec!["ssh-ed25519 AAAA\n10.0.0.9 ssh-rsa X".to_string()];
        let e = SshHost::for_relay("web2", "10.0.0.3", &bad, &file).unwrap_err();
        assert!(e.to_string().contains("not a host key"), "{e}");
    }

    #[test]
    fn remote_paths_are_quoted_and_home_relative_ones_expand() {
        assert_eq!(shell_path("/var/lib/strata"), "'/var/lib/strata'");
        assert_eq!(
            shell_path("~/.strata/bin/strata"),
            "\"$HOME\"/'.strata/bin/strata'"
        );
        assert_eq!(shell_path("/a'b"), r"'/a'\''b'");
    }
}
