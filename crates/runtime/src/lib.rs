//! Runs processes and machines as OCI runtime bundles under runc: overlay root filesystem,
//! generated `config.json`, output, exit status, and cleanup.
//!
//! [`run`] is the whole life cycle of one container: mount the rootfs (overlay or plain
//! directory) under `<state_root>/bundles/<id>/rootfs`, create the working directory, write
//! `config.json` (see [`spec::config_json`]), run `runc run` with stdout/stderr piped to the
//! caller, then `runc delete -f`, unmount and remove the bundle, whatever happened.
//! [`resolve_user`] turns Docker's `USER` string into ids from the image's own files.
//! [`cleanup_stale`] removes what a killed parent process left behind.
//!
//! A *machine* ([`MachineDriver`], runc's in [`Runc`]) is an image booted detached the way
//! Fly boots one: tini as PID 1, its own network namespace reachable from the host ([`net`]), an
//! ephemeral overlay root and persistent volumes; see `docs/machines.md`.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod driver;
mod error;
mod inroot;
pub mod interrupt;
mod machine;
pub mod net;
mod run;
mod scratch;
mod seccomp;
pub mod spec;
mod user;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

pub use driver::{MachineDriver, Runc};
pub use error::{Error, Result};
pub use inroot::{SyncOp, chown_in_root, host_path_in_root, record_in_layer, sync_in_root};
pub use machine::{
    Attach, DEFAULT_INIT, ExecOptions, INIT_PATH, Limits, MachineSpec, MachineStatus, StopOutcome,
    VolumeMount, container_id, find_init, machine_cleanup, machine_destroy, machine_exec,
    machine_signal, machine_start, machine_status, machine_stop, process_alive, process_start_time,
    receive_console, set_child_subreaper, valid_machine_id,
};
pub use net::{NetSpec, ensure_host_nat, prepare_network, teardown_network};
pub use run::{cleanup_stale, cleanup_stale_in, kill, run};
pub use scratch::ScratchRoot;
pub use user::{chown_ids, resolve_user};

/// Where runc is and where it keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// The runc binary.
    pub runc: PathBuf,
    /// runc's `--root` (its container state); bundles live under `<state_root>/bundles`.
    pub state_root: PathBuf,
}

impl RuntimeConfig {
    /// Finds runc: `$STRATA_RUNTIME` if set (a path, or a name looked up on `$PATH`), else
    /// `runc` on `$PATH`, else `/usr/sbin/runc`.
    pub fn detect(state_root: PathBuf) -> Result<RuntimeConfig> {
        let runc = find_runc(std::env::var_os("STRATA_RUNTIME"), std::env::var_os("PATH"))?;
        Ok(RuntimeConfig { runc, state_root })
    }

    /// The directory that holds one bundle directory per running container.
    pub fn bundles_dir(&self) -> PathBuf {
        self.state_root.join("bundles")
    }

    /// The bundle directory of container `id`.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.bundles_dir().join(id)
    }
}

/// [`RuntimeConfig::detect`] with the environment passed in.
fn find_runc(explicit: Option<OsString>, path: Option<OsString>) -> Result<PathBuf> {
    if let Some(explicit) = explicit.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(&explicit);
        let found = if p.components().count() == 1 {
            find_on_path(path.as_deref(), &explicit)
        } else {
            is_executable(&p).then_some(p.clone())
        };
        return found.ok_or_else(|| Error::RuncNotFound {
            looked_at: format!("$STRATA_RUNTIME={}", p.display()),
        });
    }
    if let Some(runc) = find_on_path(path.as_deref(), OsStr::new("runc")) {
        return Ok(runc);
    }
    let fallbacks = ["/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc"];
    fallbacks
        .iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::RuncNotFound {
            looked_at: format!("$PATH, {}", fallbacks.join(", ")),
        })
}

fn find_on_path(path: Option<&OsStr>, name: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The root filesystem of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    /// overlayfs: lowers listed BOTTOM FIRST (as layers stack); upper and work are empty dirs
    /// on the same filesystem. The container's writes land in `upper`.
    Overlay {
        /// Read-only layers, bottom first; may be empty (an empty lower is made).
        lowers: Vec<PathBuf>,
        /// Receives every write (the layer of a build step).
        upper: PathBuf,
        /// overlayfs scratch space, on the same filesystem as `upper`.
        work: PathBuf,
    },
    /// A plain directory, used as it is (writes land in it).
    Dir(PathBuf),
}

/// The container's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// The host's network namespace; `/etc/resolv.conf` and `/etc/hosts` come from the host.
    #[default]
    Host,
    /// A new network namespace with only `lo`; `/etc/hosts` names only localhost.
    None,
}

/// An extra mount inside the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    /// A host file or directory bind-mounted at `target` (an absolute container path).
    Bind {
        /// Absolute host path.
        source: PathBuf,
        /// Absolute container path, no `..`.
        target: String,
        /// Mount read-only.
        readonly: bool,
    },
    /// An empty tmpfs (mode 1777, nosuid, nodev).
    Tmpfs {
        /// Absolute container path, no `..`.
        target: String,
        /// Size limit in bytes; the kernel default (half of RAM) when `None`.
        size: Option<u64>,
    },
}

/// The ids a container process runs as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserSpec {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

impl UserSpec {
    /// With the primary group first among the supplementary ones (unless there already), as
    /// `docker run` starts a process: `id` lists it in `groups=`. RUN steps get the same.
    pub fn with_primary_group(mut self) -> UserSpec {
        if !self.additional_gids.contains(&self.gid) {
            self.additional_gids.insert(0, self.gid);
        }
        self
    }
}

/// Everything needed to run one process in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    /// Unique container id (the caller makes it unique); `[A-Za-z0-9_.-]`, not starting with `.`.
    pub id: String,
    /// The root filesystem; an overlay is mounted by [`run`] and unmounted after.
    pub rootfs: Rootfs,
    /// The command line; `args[0]` is looked up on the container's `PATH` by runc.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries; Docker's default `PATH` is added when there is none.
    pub env: Vec<String>,
    /// Absolute working directory; created inside the rootfs (as root, mode 0755) if missing,
    /// like Docker's `WORKDIR`.
    pub cwd: String,
    /// Who the process runs as (see [`resolve_user`]).
    pub user: UserSpec,
    /// The container's hostname (it has its own UTS namespace).
    pub hostname: String,
    /// Host network or none.
    pub network: NetworkMode,
    /// Extra mounts, after the standard ones, in order.
    pub mounts: Vec<MountSpec>,
    /// Mount the root filesystem read-only.
    pub readonly_rootfs: bool,
}

/// How a container process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunResult {
    /// The exit status, Docker style: `128 + n` when killed by signal `n`.
    pub exit_code: i32,
    /// The signal that killed the process, if it was killed.
    ///
    /// runc reports a death by signal as exit status `128 + n` (as shells do), so a process
    /// that itself exits with `128 + n` also reads as killed by `n`.
    pub signal: Option<i32>,
}

impl RunResult {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && self.signal.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn finding_runc() {
        let t = tempfile::tempdir().unwrap();
        let fake = t.path().join("runc");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = Some(t.path().as_os_str().to_owned());
        assert_eq!(find_runc(None, path.clone()).unwrap(), fake);
        assert_eq!(find_runc(Some("runc".into()), path.clone()).unwrap(), fake);
        assert_eq!(find_runc(Some(fake.clone().into()), None).unwrap(), fake);
        let e = find_runc(Some("/no/such/runc".into()), path)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("runc not found") && e.contains("hint: apt-get install runc"),
            "{e}"
        );
        assert!(e.contains("/no/such/runc"), "{e}");
        // Not executable: not a runc.
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(find_runc(Some(fake.into()), None).is_err());
    }
}
