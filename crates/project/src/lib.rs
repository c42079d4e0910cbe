//! strata.toml: its schema, parsed in one place. `[[image]]` (what `strata build` builds),
//! `[app.NAME]` (what `strata deploy` runs), `[host.NAME]` (servers over SSH), `[cache]` (the
//! build cache in a registry), `[kubernetes]` and `[swarm]` (the orchestrator targets). Every table and key is named, so a typo (`[[imgae]]`,
//! `[ap.web]`, `prot = 8080`) is an error at its `strata.toml:line:col` instead of a silently
//! dropped image or app. The crates that act on the tables (strata-build, strata-deploy) check
//! the values.

#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A strata.toml that does not parse: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct Error {
    /// The file.
    pub path: PathBuf,
    /// 1-based line and column, when known.
    pub at: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrataToml {
    /// `[[image]]`, in file order.
    #[serde(default)]
    pub image: Vec<ImageSpec>,
    /// `[app.NAME]`.
    #[serde(default)]
    pub app: BTreeMap<String, AppSpec>,
    /// `[host.NAME]`.
    #[serde(default)]
    pub host: BTreeMap<String, HostEntry>,
    /// `[cache]`.
    #[serde(default)]
    pub cache: CacheSection,
    /// `[kubernetes]`.
    #[serde(default)]
    pub kubernetes: KubernetesSection,
    /// `[swarm]`.
    #[serde(default)]
    pub swarm: SwarmSection,
}

impl StrataToml {
    /// Parses strata.toml text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<StrataToml, Error> {
        toml::from_str(text).map_err(|e| Error {
            path: path.to_path_buf(),
            at: e.span().map(|s| line_col(text, s.start)),
            message: e.message().to_string(),
        })
    }

    /// Reads and parses the strata.toml at `path`.
    pub fn load(path: &Path) -> Result<StrataToml, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            path: path.to_path_buf(),
            at: None,
            message: format!("cannot read: {e}"),
        })?;
        StrataToml::parse(&text, path)
    }
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// One `[[image]]` of strata.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// The image's name in the store.
    pub name: String,
    /// Build context, relative to strata.toml.
    #[serde(default = "dot")]
    pub context: PathBuf,
    /// Dockerfile, relative to strata.toml (default `<context>/Dockerfile`).
    #[serde(default)]
    pub dockerfile: Option<PathBuf>,
    /// Build arguments.
    #[serde(default)]
    pub build_args: BTreeMap<String, String>,
    /// Target stage.
    #[serde(default)]
    pub target: Option<String>,
    /// Extra ignore patterns.
    #[serde(default)]
    pub ignore: Vec<String>,
    /// Replaces the first stage's `FROM`.
    #[serde(default)]
    pub from: Option<String>,
    /// Part of the first stage's base cache key.
    #[serde(default)]
    pub from_cache_version: Option<String>,
    /// Labels added to the image.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Follow a moved base without running steps when that gives what a rebuild would
    /// (default); `false` always rebuilds (docs/rebase.md).
    #[serde(default = "yes")]
    pub rebase: bool,
}

fn dot() -> PathBuf {
    PathBuf::from(".")
}

fn yes() -> bool {
    true
}

/// `[cache] registry = "host[:port]/org/repo"` (docs/cache.md).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Where builds of this project read and write their step cache.
    pub registry: Option<String>,
    /// Ids of `RUN --mount=type=cache` mounts (the `id=`, else the target path) shared
    /// through that cache too: exported with the entries, fetched when a step that mounts one
    /// runs and this store has none of it yet.
    #[serde(default)]
    pub mounts: Vec<String>,
}

/// `[kubernetes]`: where `strata deploy --target kubernetes` puts an app's objects
/// (docs/deploy.md, "Orchestrator targets").
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSection {
    /// A kubectl context: the objects are applied there with `kubectl apply -f -`.
    pub context: Option<String>,
    /// The namespace of the objects (default: the context's).
    pub namespace: Option<String>,
    /// A directory the objects are written to (one `<app>.json` each), relative to strata.toml.
    pub out: Option<PathBuf>,
    /// The size each volume's PersistentVolumeClaim asks for (default `1Gi`).
    pub volume_size: Option<String>,
    /// The kubectl program (default `kubectl` on `PATH`).
    pub kubectl: Option<PathBuf>,
}

/// `[swarm]`: the Docker engine `strata deploy --target swarm` deploys services through.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmSection {
    /// The engine's API, `unix:///path/docker.sock` (default: `$DOCKER_HOST`, else
    /// `unix:///var/run/docker.sock`).
    pub docker_host: Option<String>,
    /// An overlay network the services join (made, attachable, when missing).
    pub network: Option<String>,
    /// How `public_port` is published: `ingress` (default; the routing mesh, on every node)
    /// or `none` (no published port; the service is reached by name on `network`, DNS round
    /// robin over its healthy tasks).
    pub publish: Option<String>,
}

/// One app as written in strata.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// An image of the project (`[[image]] name`), built on deploy; or any image reference in
    /// the store.
    pub image: String,
    /// The port the app listens on inside its machines. None for a worker (or a base app that
    /// only sleeps): no public port, no route; its machines are healthy once running.
    #[serde(default)]
    pub port: Option<u16>,
    /// The host port the agent's proxy serves it on (default: `port`).
    #[serde(default)]
    pub public_port: Option<u16>,
    /// Address the proxy listens on (default 127.0.0.1).
    #[serde(default)]
    pub listen: Option<std::net::IpAddr>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Named volumes, `NAME:/path`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Health check; without one a machine is healthy once its port accepts connections.
    #[serde(default)]
    pub health: Option<HealthSpec>,
    /// `no`, `always` (default), `on-failure[:N]`.
    #[serde(default)]
    pub restart: Option<String>,
    /// Machines per release (default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Push each release here (`host[:port]/org`), as `<registry>/<app>:deployment-<ULID>`.
    #[serde(default)]
    pub registry: Option<String>,
    /// Time between the stop signal and SIGKILL (default 10s).
    #[serde(default)]
    pub kill_timeout: Option<String>,
    /// How many earlier releases keep their images pinned for rollback (default 3).
    #[serde(default)]
    pub keep_releases: Option<u32>,
    /// Deploy on these `[host.NAME]`s over SSH instead of this machine.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// How several hosts are deployed: `parallel` (default; all at once) or `rolling` (one
    /// after another, each gated on its health check).
    #[serde(default)]
    pub strategy: Option<String>,
    /// With `strategy = "rolling"`: hosts deployed at once, each batch gated on their health
    /// checks (default 1).
    #[serde(default)]
    pub parallelism: Option<u32>,
    /// What `strata dev` does with a change instead of rebuilding (docs/dev.md).
    #[serde(default)]
    pub live_update: Option<LiveUpdate>,
    /// Where `strata deploy` puts it by default: `local` (machines here or on `hosts`),
    /// `kubernetes` or `swarm`.
    #[serde(default)]
    pub target: Option<String>,
    /// Memory limit of each machine, as `docker run -m` takes it (`512m`, `1g`).
    #[serde(default)]
    pub memory: Option<String>,
    /// CPU limit of each machine, as `docker run --cpus` takes it (`0.5`, `2`).
    #[serde(default)]
    pub cpus: Option<Cpus>,
}

/// A number of CPUs, written as an integer (`cpus = 2`) or not (`cpus = 0.5`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(from = "CpusWritten")]
pub struct Cpus(pub f64);

#[derive(Deserialize)]
#[serde(untagged)]
enum CpusWritten {
    Int(i64),
    Float(f64),
}

impl From<CpusWritten> for Cpus {
    fn from(w: CpusWritten) -> Cpus {
        match w {
            CpusWritten::Int(n) => Cpus(n as f64),
            CpusWritten::Float(f) => Cpus(f),
        }
    }
}

/// `live_update = { sync = [...], run = [...], restart = "none", fall_back_on = [...] }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveUpdate {
    /// Context paths written straight into the running machines.
    #[serde(default)]
    pub sync: Vec<SyncRule>,
    /// Commands run in each machine after a sync, when a changed path matches a trigger.
    #[serde(default)]
    pub run: Vec<RunRule>,
    /// `none` (default): the app picks changes up itself; `process`: its machines restart
    /// after a sync (same machine, address and routes; synced files kept).
    #[serde(default)]
    pub restart: Option<String>,
    /// Context patterns (`.dockerignore` syntax) whose change means a rebuild and redeploy.
    #[serde(default)]
    pub fall_back_on: Vec<String>,
}

/// `{ src = "site", dest = "/www" }`: the context path `src` (a file or directory) is `dest` in
/// the machines.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRule {
    pub src: String,
    pub dest: String,
}

/// `{ cmd = "npm install", trigger = ["package.json"] }`: `sh -c CMD` in each machine after a
/// sync that changed a path matching a trigger (`.dockerignore` syntax; none: every sync).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRule {
    pub cmd: String,
    #[serde(default)]
    pub trigger: Vec<String>,
}

/// `health = { type = "http", path = "/", interval = "1s", timeout = "2s", grace = "0s" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// `http` (default when `path` is set) or `tcp`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// HTTP path.
    #[serde(default)]
    pub path: Option<String>,
    /// Port to check (default: the app's port).
    #[serde(default)]
    pub port: Option<u16>,
    /// Between attempts (default 1s).
    #[serde(default)]
    pub interval: Option<String>,
    /// Per attempt (default 2s).
    #[serde(default)]
    pub timeout: Option<String>,
    /// Before the first attempt (default 0s).
    #[serde(default)]
    pub grace: Option<String>,
    /// Give up after (default 60s).
    #[serde(default)]
    pub deadline: Option<String>,
}

/// A `[host.NAME]` table: a server reached over SSH (see docs/hosts.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// `user@address[:port]`, as `ssh` takes it.
    pub ssh: String,
    /// A private key file (`ssh -i`); default: what ssh would use (agent, ~/.ssh/config).
    pub identity: Option<std::path::PathBuf>,
    /// The store on the host (default: strata's default there, `$STRATA_STORE` or
    /// `/var/lib/strata` for root).
    pub store: Option<String>,
    /// strata's path on the host (default `~/.strata/bin/strata`; installed there when
    /// missing or of another version).
    pub strata: Option<String>,
    /// Take part in relays: receive an image's blobs from another host that has them, and
    /// send them on (default false; `--relay` turns it on for every host of a command).
    #[serde(default)]
    pub relay: bool,
    /// `address[:port]` other hosts reach this one at in a relay, when it is not the address
    /// of `ssh` (a private network between the hosts).
    pub relay_address: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        StrataToml::parse(text, Path::new("strata.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn every_table_parses_and_a_typo_anywhere_names_its_line() {
        let ok = StrataToml::parse(
            "[cache]\nregistry = \"r:5000/t/c\"\nmounts = [\"go-build\"]\n\n[[image]]\nname = \"web\"\n\n\
             [app.web]\nimage = \"web\"\nport = 8080\ntarget = \"swarm\"\n\n\
             [host.a]\nssh = \"root@10.0.0.1\"\nrelay = true\nrelay_address = \"192.168.0.1\"\n\n[kubernetes]\ncontext = \"kind\"\n\n\
             [swarm]\nnetwork = \"apps\"\n",
            Path::new("strata.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.image[0].name, "web");
        assert_eq!(ok.app["web"].port, Some(8080));
        assert_eq!(ok.host["a"].ssh, "root@10.0.0.1");
        assert!(ok.host["a"].relay);
        assert_eq!(ok.host["a"].relay_address.as_deref(), Some("192.168.0.1"));
        assert_eq!(ok.cache.registry.as_deref(), Some("r:5000/t/c"));
        assert_eq!(ok.cache.mounts, ["go-build"]);
        assert_eq!(ok.app["web"].target.as_deref(), Some("swarm"));
        assert_eq!(ok.kubernetes.context.as_deref(), Some("kind"));
        assert_eq!(ok.swarm.network.as_deref(), Some("apps"));
        let e = err("[swarm]\nnetwrok = \"x\"\n");
        assert!(
            e.starts_with("strata.toml:2:") && e.contains("netwrok"),
            "{e}"
        );

        let e = err("[[image]]\nname = \"a\"\n\n[[imgae]]\nname = \"b\"\n");
        assert!(
            e.starts_with("strata.toml:4:") && e.contains("imgae"),
            "{e}"
        );
        let e = err("[[image]]\nname = \"web\"\n\n[ap.web]\nimage = \"web\"\n");
        assert!(e.starts_with("strata.toml:4:") && e.contains("ap"), "{e}");
        let e = err("[app.web]\nimage = \"web\"\nprot = 8080\n");
        assert!(e.starts_with("strata.toml:3:") && e.contains("prot"), "{e}");
        let e = err("[cache]\nregistyr = \"x\"\n");
        assert!(
            e.starts_with("strata.toml:2:") && e.contains("registyr"),
            "{e}"
        );
    }
}
