//! This host's view of machines: from an image in the store to a row in the state DB, and
//! from a row to the runtime's [`MachineSpec`] (snapshots unpacked, user resolved, volumes).

use std::path::{Path, PathBuf};

use std::sync::Arc;
use strata_oci::{Digest, ImageConfig};
use strata_rootfs::{LayerRef, SnapshotCache};

use strata_runtime::{
    Attach, Limits, MachineDriver, MachineSpec, NetSpec, Runc, RuntimeConfig, VolumeMount,
};
use strata_store::Store;

use crate::error::{Error, Result};
use crate::state::{Attached, Bind, Machine, MachineConfig, RestartPolicy, State};

/// What `strata machine run` (or a deploy) asks of a new machine beyond its image.
#[derive(Debug, Clone, Default)]
pub struct MachineOptions {
    /// Replaces the image's CMD (Docker's `docker run IMAGE ARGS...`).
    pub cmd: Option<Vec<String>>,
    /// Replaces the image's ENTRYPOINT.
    pub entrypoint: Option<Vec<String>>,
    /// `-e K=V`, after the image's Env.
    pub env: Vec<String>,
    /// `-v NAME:/path`.
    pub volumes: Vec<(String, String)>,
    /// `-v /host/path:/path[:ro]`.
    pub binds: Vec<Bind>,
    /// `-p HOST:PORT`.
    pub ports: Vec<(u16, u16)>,
    /// The app's port inside the machine.
    pub service_port: Option<u16>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Stop signal → SIGKILL delay in ms (default 10 s).
    pub kill_timeout_ms: Option<u64>,
    /// App and release it belongs to.
    pub app: Option<(String, u32)>,
    /// `--name`: the machine's id (default: generated).
    pub id: Option<String>,
    /// Replaces the image's StopSignal.
    pub stop_signal: Option<i32>,
    /// `-w PATH`: replaces the image's WorkingDir (absolute; made if missing).
    pub workdir: Option<String>,
    /// `-u USER[:GROUP]`: replaces the image's User.
    pub user: Option<String>,
    /// `strata run -i`/`-t`: the client waiting for the machine's stdin or terminal.
    pub attach: Option<Attached>,
    /// `-m`: memory limit in bytes.
    pub memory: Option<u64>,
    /// `--cpus`, in thousandths of a CPU.
    pub millicpus: Option<u64>,
}

/// The store, the state DB and the machine runtime, together.
#[derive(Debug)]
pub struct Host {
    /// The content store.
    pub store: Store,
    /// Machines, releases, routes.
    pub state: State,
    /// What starts, stops and removes machines (runc, unless [`Host::with_driver`] says).
    pub driver: Arc<dyn MachineDriver>,
}

/// Maps a signal name (`SIGTERM`, `TERM`) or number to its number.
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let name = s.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ABRT" => 6,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        "TSTP" => 20,
        "WINCH" => 28,
        "PWR" => 30,
        _ => return None,
    })
}

impl Host {
    /// Opens the host view of a store; runc is found as for build steps.
    pub fn open(store: Store) -> Result<Host> {
        let state = State::open(store.root())?;
        let config = RuntimeConfig::detect(store.root().join("strata/runc"))?;
        Ok(Host::with_driver(store, state, Arc::new(Runc { config })))
    }

    /// The host view of a store whose machines `driver` runs.
    pub fn with_driver(store: Store, state: State, driver: Arc<dyn MachineDriver>) -> Host {
        Host {
            store,
            state,
            driver,
        }
    }

    /// `<store>/strata/machines/<id>`: the machine's private directory (upper, bundle, log).
    pub fn machine_dir(&self, id: &str) -> PathBuf {
        self.store.root().join("strata/machines").join(id)
    }

    /// The machine's log file (stdout and stderr, rotated by the agent).
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.machine_dir(id).join("machine.log")
    }

    /// `<store>/strata/volumes/<name>`: a named volume, kept until removed on request.
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.store.root().join("strata/volumes").join(name)
    }

    /// The image `image` names and the config a machine made from it with `opts` gets (what
    /// [`Host::create_machine`] stores), without making anything: `deploy` compares it with
    /// the running release's to see that nothing changed.
    pub fn machine_config(
        &self,
        image: &str,
        opts: &MachineOptions,
    ) -> Result<(strata_store::Image, MachineConfig)> {
        let img = find_image(&self.store, image)?;
        let config = ImageConfig::from_slice(&img.config_bytes)?;
        let c = config.config.clone().unwrap_or_default();
        let entrypoint = opts
            .entrypoint
            .clone()
            .or(c.entrypoint.clone())
            .unwrap_or_default();
        // Docker: an explicit entrypoint drops the image's CMD unless a CMD is given too.
        let cmd = match (&opts.cmd, &opts.entrypoint) {
            (Some(cmd), _) => cmd.clone(),
            (None, Some(_)) => Vec::new(),
            (None, None) => c.cmd.clone().unwrap_or_default(),
        };
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            return Err(Error::Config(format!(
                "image `{image}` has no ENTRYPOINT or CMD: give a command to run"
            )));
        }
        let mut env = c.env.clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            // Docker's default, as for build steps.
            env.insert(0, strata_runtime::spec::DEFAULT_PATH.to_string());
        }
        for kv in &opts.env {
            let key = kv.split('=').next().unwrap_or(kv);
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        let stop_signal = match (opts.stop_signal, c.stop_signal.as_deref()) {
            (Some(n), _) => n,
            (None, None) => 15,
            (None, Some(s)) => parse_signal(s).ok_or_else(|| {
                Error::Config(format!("image `{image}`: unknown StopSignal `{s}`"))
            })?,
        };
        if let Some(w) = opts.workdir.as_deref().filter(|w| !w.starts_with('/')) {
            // Docker refuses a relative `-w` too ("it needs to be an absolute path").
            return Err(Error::Config(format!(
                "--workdir `{w}`: the working directory must be an absolute path"
            )));
        }
        let mconfig = MachineConfig {
            args,
            env,
            cwd: opts
                .workdir
                .clone()
                .or_else(|| c.working_dir.clone())
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| "/".into()),
            // `-u ""` is no override, as in Docker.
            user: opts
                .user
                .clone()
                .filter(|u| !u.is_empty())
                .or_else(|| c.user.clone())
                .unwrap_or_default(),
            volumes: opts.volumes.clone(),
            binds: opts.binds.clone(),
            ports: opts.ports.clone(),
            service_port: opts.service_port,
            restart: opts.restart,
            stop_signal,
            kill_timeout_ms: opts.kill_timeout_ms.unwrap_or(10_000),
            attach: opts.attach.clone(),
            memory: opts.memory,
            millicpus: opts.millicpus,
        };
        Ok((img, mconfig))
    }

    /// Creates a machine from an image of the store (desired running; the agent starts it).
    /// The image is pinned against `strata gc` for as long as the machine exists.
    pub fn create_machine(&mut self, image: &str, opts: &MachineOptions) -> Result<Machine> {
        let (img, mconfig) = self.machine_config(image, opts)?;
        let id = match &opts.id {
            Some(id) => {
                if !strata_runtime::valid_machine_id(id) {
                    return Err(Error::Config(format!(
                        "machine name `{id}`: use up to 41 lowercase letters, digits and '-'"
                    )));
                }
                if self.state.machine(id)?.is_some_and(|m| m.id == *id) {
                    return Err(Error::Config(format!("a machine named `{id}` exists")));
                }
                id.clone()
            }
            // The random part of a ULID: unique enough per host, short enough to type.
            None => ulid::Ulid::generate().to_string().to_lowercase()[14..].to_string(),
        };
        let digest = img.descriptor.digest.clone();
        self.store
            .pin(&digest, &format!("machine:{id}"))
            .map_err(|source| Error::Image {
                image: image.to_string(),
                source,
            })?;
        let (app, release) = match &opts.app {
            Some((a, r)) => (Some(a.as_str()), Some(*r)),
            None => (None, None),
        };
        self.state
            .create_machine(&id, app, release, image, &digest, &mconfig)
    }

    /// The runtime's description of a machine: its image's snapshots unpacked (cached per
    /// chain ID, shared with builds), its user resolved from the image's own passwd/group.
    pub fn spec(&self, m: &Machine) -> Result<MachineSpec> {
        let img = find_image(&self.store, &m.digest.to_string())?;
        let config = ImageConfig::from_slice(&img.config_bytes)?;
        if img.manifest.layers.len() != config.rootfs.diff_ids.len() {
            return Err(Error::Config(format!(
                "image `{}`: {} layers but {} diff_ids in its config",
                m.image,
                img.manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let layers = LayerRef::zip(&img.manifest.layers, config.diff_ids());
        let cache = SnapshotCache::new(self.store.snapshots_dir())?;
        let lowers = cache.ensure(&layers, |d| {
            self.store
                .open_descriptor(d)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })?;
        let mut lowers = lowers;
        if let Some(dev) = self.dev_layer(m).filter(|d| d.is_dir()) {
            lowers.push(dev);
        }
        let top_first: Vec<PathBuf> = lowers.iter().rev().cloned().collect();
        let user = strata_runtime::resolve_user(&top_first, &m.config.user)?.with_primary_group();
        let volumes = m
            .config
            .volumes
            .iter()
            .map(|(name, target)| VolumeMount {
                source: self.volume_dir(name),
                target: target.clone(),
                readonly: false,
            })
            .chain(m.config.binds.iter().map(|b| VolumeMount {
                source: b.source.clone(),
                target: b.target.clone(),
                readonly: b.readonly,
            }))
            .collect();
        Ok(MachineSpec {
            id: m.id.clone(),
            dir: self.machine_dir(&m.id),
            lowers,
            args: m.config.args.clone(),
            env: m.config.env.clone(),
            cwd: m.config.cwd.clone(),
            user,
            hostname: m.id.clone(),
            volumes,
            net: NetSpec { index: m.net_index },
            init: strata_runtime::find_init()?,
            log: self.log_path(&m.id),
            // Only while the client waits there: a later start (a restart) has nobody
            // attached, and starts as any machine does.
            attach: match &m.config.attach {
                Some(Attached::Pipes {
                    stdin,
                    stdout,
                    stderr,
                }) if stdout.exists() => Attach::Pipes {
                    stdin: stdin.clone(),
                    stdout: stdout.clone(),
                    stderr: stderr.clone(),
                },
                Some(Attached::Tty { socket }) if socket.exists() => Attach::Tty(socket.clone()),
                _ => Attach::None,
            },
            limits: Limits {
                memory: m.config.memory,
                millicpus: m.config.millicpus,
            },
        })
    }

    /// `<store>/strata/dev/<app>`: the dev layers of an app (`strata dev`).
    pub fn dev_dir(&self, app: &str) -> PathBuf {
        self.store.root().join("strata/dev").join(app)
    }

    /// The dev layer of machine `m`'s app and image, `<store>/strata/dev/<app>/<alg>-<hex>`:
    /// what `strata dev` synced into machines of that image, laid over the image's layers when
    /// one starts (docs/dev.md). Keyed by the image, so a rebuilt image, which has the changes
    /// itself, starts clean. None for a machine of no app.
    pub fn dev_layer(&self, m: &Machine) -> Option<PathBuf> {
        let app = m.app.as_deref()?;
        Some(
            self.dev_dir(app)
                .join(m.digest.to_string().replace(':', "-")),
        )
    }

    /// Removes the dev layers of `app` but the one of image `keep`: a new release's machines
    /// start from its image as built (a rolled-back image too, without what was synced into
    /// it before).
    pub fn prune_dev_layers(&self, app: &str, keep: &strata_oci::Digest) -> Result<()> {
        let keep = self.dev_dir(app).join(keep.to_string().replace(':', "-"));
        let Ok(entries) = std::fs::read_dir(self.dev_dir(app)) else {
            return Ok(());
        };
        for e in entries.flatten() {
            if e.path() != keep {
                std::fs::remove_dir_all(e.path()).map_err(|source| Error::Io {
                    op: "cannot remove",
                    path: e.path(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    /// The address the host reaches a machine at.
    pub fn machine_addr(m: &Machine) -> std::net::Ipv4Addr {
        NetSpec { index: m.net_index }.machine_addr()
    }

    /// Removes a named volume (only on request; machines using it must be gone).
    pub fn remove_volume(&self, name: &str) -> Result<bool> {
        let users: Vec<String> = self
            .state
            .machines()?
            .into_iter()
            .filter(|m| m.config.volumes.iter().any(|(n, _)| n == name))
            .map(|m| m.id)
            .collect();
        if !users.is_empty() {
            return Err(Error::Config(format!(
                "volume `{name}` is used by machine(s) {}",
                users.join(", ")
            )));
        }
        let dir = self.volume_dir(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Io {
                op: "remove volume",
                path: dir,
                source,
            }),
        }
    }
}

/// An image of the store by name (`web:1`), by `name@sha256:…` or by a bare digest: a
/// machine or release keeps the digest, so it still starts after its name was removed.
pub fn find_image(store: &Store, image: &str) -> Result<strata_store::Image> {
    let digest_part = image.rsplit_once('@').map_or(image, |(_, d)| d);
    let by_digest = digest_part.parse::<Digest>().ok().and_then(|digest| {
        let size = store.blob_size(&digest).ok()?;
        // An empty media type makes the store sniff manifest vs index from the bytes.
        let desc = strata_oci::Descriptor::new("", digest, size);
        store
            .resolve_image(image, desc, &strata_oci::Platform::host())
            .ok()
    });
    if let Some(img) = by_digest {
        return Ok(img);
    }
    // The store's own spelling of the name (`busybox` is `busybox:latest`, as in
    // `docker run busybox`), the same normalization `strata pull` and `import` use.
    let local = strata_oci::Reference::parse_local(image).map(|r| r.to_string());
    match (store.image(image), local) {
        (Err(_), Ok(local)) if local != image => store.image(&local),
        (found, _) => found,
    }
    .map_err(|source| Error::Image {
        image: image.to_string(),
        source,
    })
}

/// Last `n` lines of a file (for error messages and `logs`).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("quit"), Some(3));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGNOPE"), None);
        assert_eq!(parse_signal("0"), None);
    }
}
