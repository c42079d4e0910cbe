//! Command-line argument types (raw flags); `main` turns them into validated settings.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// strata: build, ship and run container images around base images.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about, long_about = None)]
pub struct Cli {
    /// The store directory (OCI image layout + metadata).
    /// Default: $STRATA_STORE, else /var/lib/strata as root, else $XDG_DATA_HOME/strata.
    #[arg(long, global = true, env = "STRATA_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// More logging on stderr (repeat for more); `STRATA_LOG` takes tracing filters.
    /// (Long form only: `-v` is a volume, as in `docker run -v`.)
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List images in the store.
    Images(ImagesArgs),
    /// Show an image's manifest and config.
    Inspect(InspectArgs),
    /// Give an image another name: `strata tag SRC DST`.
    Tag { source: String, target: String },
    /// Remove image names (blobs go at the next `strata gc`).
    Rmi {
        /// Names, or an image's digest or its start (then its names are removed).
        #[arg(required = true)]
        images: Vec<String>,
        /// With a digest: remove every name of the image, even when it has several.
        #[arg(short, long)]
        force: bool,
    },
    /// Delete blobs no image, index or pin references.
    Gc {
        /// Print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Create an image from a root filesystem tarball, like `docker import`.
    Import(ImportArgs),
    /// Write an image to an archive (`docker load` or OCI archive).
    Save(SaveArgs),
    /// Load images from a docker-archive or OCI archive.
    Load(LoadArgs),
    /// Build the images of ./strata.toml that changed (dependencies first), or one Dockerfile
    /// like `docker build` (`strata build -f Dockerfile -t NAME DIR`).
    Build(BuildArgs),
    /// Move `strata.lock` to the bases' current digests and say which images that affects.
    Update {
        /// Project images whose bases to move (default: all).
        images: Vec<String>,
        /// The project file or its directory.
        #[arg(long, default_value = ".")]
        project: std::path::PathBuf,
    },
    /// Log in to a registry; credentials go to ~/.docker/config.json (or $DOCKER_CONFIG).
    Login(LoginArgs),
    /// Pull an image from a registry into the store (only missing blobs).
    Pull(PullArgs),
    /// Push an image to a registry (`strata push NAME [DEST]`) or to hosts over SSH
    /// (`strata push NAME ssh://user@host[/NAME:TAG]`, `--host`): only blobs they lack.
    Push(PushArgs),
    /// Speak strata's host protocol on stdin/stdout: what `strata push|pull ssh://…` runs on
    /// the host through SSH (see docs/hosts.md).
    Serve(ServeArgs),
    /// Sends an image of this store on to another host (run over SSH by `strata push|deploy`
    /// with relays, see docs/hosts.md).
    #[command(hide = true)]
    Relay(RelayArgs),
    /// Applies `strata dev --host`'s stream of file operations here (run by it over SSH).
    #[command(hide = true)]
    DevApply {
        /// The app.
        app: String,
        /// The app's strata.toml table.
        #[arg(long)]
        spec: String,
    },
    /// The embedded multi-tenant OCI registry.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Check every digest, size and diff_id of an image.
    Validate { image: String },
    /// Machines: images running on this host (detached, own network, ephemeral root).
    Machine {
        /// Run the machine command on this host over SSH: a `[host.NAME]` of strata.toml or
        /// `ssh://user@address`.
        #[arg(long, global = true)]
        host: Option<String>,
        /// The project file (or its directory) that defines `[host.NAME]`.
        #[arg(long, global = true, default_value = ".")]
        project: PathBuf,
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// The host agent: keeps machines running, owns the app ports (started on demand).
    Agent(AgentArgs),
    /// Deploy an app of strata.toml: build what changed, push, start new machines, wait until
    /// healthy, switch traffic, stop the old ones.
    Deploy(DeployArgs),
    /// Deploy an app, then keep its machines current while you edit: changes its
    /// `live_update` rules cover are written into the running machines at once; any other
    /// change rebuilds and redeploys (until Ctrl-C).
    Dev(DevArgs),
    /// An app's releases (`--image` for their images and digests).
    Releases(ReleasesArgs),
    /// The web dashboard: apps, releases (roll back), machines (logs, stop/start/restart),
    /// builds and the registry's images, live, at http://127.0.0.1:7700/ (until Ctrl-C).
    Ui(UiArgs),
    /// The agent, apps, their current release and machines.
    Status {
        /// One app (default: all).
        app: Option<String>,
        #[command(flatten)]
        on: HostArg,
    },
    /// Apps deployed on this host.
    Apps {
        /// Run the apps command on this host over SSH: a `[host.NAME]` of strata.toml or
        /// `ssh://user@address`.
        #[arg(long, global = true)]
        host: Option<String>,
        /// The project file (or its directory) that defines `[host.NAME]`.
        #[arg(long, global = true, default_value = ".")]
        project: PathBuf,
        #[command(subcommand)]
        command: AppsCommand,
    },
    /// Run a command in a new machine, attached, and remove the machine when it exits (like
    /// `docker run --rm`); exits with the command's code.
    Run(RunArgs),
    /// An app's output: every machine of the app, each line prefixed with its machine id.
    Logs {
        app: String,
        /// Keep printing until every machine of the app has exited or is gone.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (of each machine), or `all`.
        #[arg(short = 'n', long, value_name = "N|all", value_parser = parse_tail)]
        tail: Option<Tail>,
        #[command(flatten)]
        on: HostArg,
    },
    /// Move an image onto a new base without rebuilding it: the old base's layers are
    /// replaced by the new base's, the image's own layers kept byte for byte, and what the
    /// image inherited in its config (PATH, CMD, labels, ...) comes from the new base.
    Rebase {
        /// The image to rebase.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        image: Option<String>,
        /// The new base.
        #[arg(long)]
        onto: String,
        /// The base the image was built on (default: the base its manifest records).
        #[arg(long, conflicts_with = "all")]
        old_base: Option<String>,
        /// Name the result (default: the image's own name moves to it).
        #[arg(short, long, conflicts_with = "all")]
        tag: Option<String>,
        /// Every image of the store built on an older image of the new base's repository.
        #[arg(long)]
        all: bool,
        /// Push the result to the registry its name (or -t) names: only its config and
        /// manifest move (and the new base's layers, where the registry lacks them). An IMAGE
        /// the store lacks is rebased in its registry, reading its manifest and config only.
        /// With --all: push each rebased image that names a registry back there.
        #[arg(long)]
        push: bool,
        /// Allow plain HTTP and unverified TLS for --push.
        #[arg(long, requires = "push")]
        insecure: bool,
        /// Progress output (--push).
        #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
        progress: ProgressArg,
    },
    /// Machines on this host, running or not, like `docker ps -a` (`strata machine list`).
    Ps {
        /// Only this app's machines.
        #[arg(long)]
        app: Option<String>,
        /// One JSON object per line.
        #[arg(long, conflicts_with = "quiet")]
        json: bool,
        /// Only the machines' ids, one per line (`strata rm -f $(strata ps -q)`).
        #[arg(short, long)]
        quiet: bool,
        /// Every machine: what `ps` always lists (accepted, as `docker ps -a` users type it).
        #[arg(short, long)]
        all: bool,
    },
    /// Run a command in a running machine, like `docker exec` (`strata machine exec`).
    Exec(ExecArgs),
    /// Copy files between a running machine and this host, like `docker cp`:
    /// `strata cp ID:/path DEST` or `strata cp SRC ID:/path`.
    Cp {
        src: String,
        dest: String,
        /// Follow a symlink named as the source.
        #[arg(short = 'L', long)]
        follow_link: bool,
        /// Accepted, as `docker cp -a` users type it: owners go as without it (see
        /// docs/deploy.md).
        #[arg(short, long)]
        archive: bool,
    },
    /// Start stopped machines, like `docker start` (`strata machine start`).
    Start(MachineIds),
    /// Stop machines, like `docker stop` (`strata machine stop`).
    Stop(MachineIds),
    /// Stop and start machines, like `docker restart` (`strata machine restart`).
    Restart(MachineIds),
    /// Send a signal to machines, like `docker kill`: SIGKILL (the default) stops them for
    /// good; another signal (`-s HUP`) is only delivered.
    Kill {
        #[arg(required = true)]
        ids: Vec<String>,
        /// The signal, by name (`HUP`, `SIGUSR1`) or number.
        #[arg(short, long, default_value = "KILL")]
        signal: String,
    },
    /// Remove stopped machines, like `docker rm`; `-f` stops running ones first (`strata
    /// machine destroy`). Named volumes stay.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Stop a running machine, then remove it.
        #[arg(short, long)]
        force: bool,
    },
    /// An image's history: one line per step, newest first, like `docker history`.
    History {
        image: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// strata's version and the commit it was built from.
    Version,
    /// Unpack an image's layers into a directory (its root filesystem), like `umoci unpack`.
    Unpack {
        image: String,
        /// Target directory; must be absent or empty.
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct ImagesArgs {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only print image names.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    pub image: String,
    /// Print `{"descriptor", "manifest", "config"}` as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// A tar of the root filesystem (plain, gzip or zstd), or `-` for stdin.
    pub tarball: PathBuf,
    /// Name of the new image, `NAME[:TAG]`.
    pub name: String,
    /// Apply a Dockerfile instruction to the config (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL,
    /// ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR), like `docker import --change`.
    #[arg(short, long = "change", value_name = "INSTRUCTION")]
    pub changes: Vec<String>,
    /// Commit message for the history entry.
    #[arg(short, long)]
    pub message: Option<String>,
    /// Layer compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    pub compression: CompressionArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    Gzip,
    Zstd,
    None,
}

#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    /// Images to save (`NAME[:TAG]`).
    #[arg(required = true)]
    pub images: Vec<String>,
    /// Output file; `-` or none writes the archive to stdout (like `docker save`). A FIFO
    /// or device is written through; a regular file is replaced atomically.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Archive format: `docker` (for `docker load`) or `oci` (OCI image layout in a tar).
    #[arg(long, value_enum, default_value_t = ArchiveFormat::Docker)]
    pub format: ArchiveFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchiveFormat {
    Docker,
    Oci,
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// A docker-archive or OCI archive tar (format detected).
    #[arg(short, long)]
    pub input: Option<PathBuf>,
    /// Same as `--input`.
    #[arg(conflicts_with = "input")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Project mode: names of strata.toml images to build (default: all).
    /// Dockerfile mode (with -f or -t, or when the one argument is a directory): the context;
    /// `-`: no context, the Dockerfile is read from stdin.
    pub args: Vec<String>,
    /// The Dockerfile (default: CONTEXT/Dockerfile; `-`: read from stdin). Selects Dockerfile
    /// mode.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<std::path::PathBuf>,
    /// Name the image `NAME[:TAG]` (repeatable). Selects Dockerfile mode.
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tags: Vec<String>,
    /// The project file or its directory (project mode).
    #[arg(long, default_value = ".")]
    pub project: std::path::PathBuf,
    /// Build-time variable `KEY=VALUE` (or `KEY` to take it from the environment).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Build this stage and what it needs, not the last one.
    #[arg(long)]
    pub target: Option<String>,
    /// Only the host platform is supported.
    #[arg(long)]
    pub platform: Option<String>,
    /// Run every step, use no cached result.
    #[arg(long)]
    pub no_cache: bool,
    /// For each step that runs, say which input changed since the last build.
    #[arg(long)]
    pub explain: bool,
    /// Look steps up in this build cache in a registry (`host[:port]/org/repo[:tag]`) when
    /// this store lacks them (docs/cache.md); repeat it to look in several, in order.
    /// Default: strata.toml's `[cache] registry`.
    #[arg(long, value_name = "REF")]
    pub cache_from: Vec<String>,
    /// Export the cache entries of every step of the build there (docs/cache.md). Default:
    /// strata.toml's `[cache] registry`.
    #[arg(long, value_name = "REF")]
    pub cache_to: Option<String>,
    /// Share this `RUN --mount=type=cache` mount (its `id`, else its target path) through
    /// the build cache too (repeatable; adds to strata.toml's `[cache] mounts`).
    #[arg(long = "cache-mount", value_name = "ID")]
    pub cache_mounts: Vec<String>,
    /// Secret for `RUN --mount=type=secret`: `id=NAME,src=PATH`.
    #[arg(long = "secret", value_name = "id=ID,src=PATH")]
    pub secrets: Vec<String>,
    /// Also tag each image `deployment-<ULID>`.
    #[arg(long)]
    pub deployment_tag: bool,
    /// Progress output: plain, tty or json (one event per line).
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
    /// Layer compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::Gzip)]
    pub compression: CompressionArg,
    /// Pull every base named by a tag from its registry again, even when the store has it
    /// (a tag that moved there is followed; Dockerfile mode).
    #[arg(long)]
    pub pull: bool,
    /// Print only the image's digest (`sha256:…`, which every strata command takes as the
    /// image), no progress (Dockerfile mode).
    #[arg(short, long)]
    pub quiet: bool,
    /// Write the image's digest to this file (Dockerfile mode).
    #[arg(long, value_name = "FILE")]
    pub iidfile: Option<std::path::PathBuf>,
    /// Set a label on the image, `KEY=VALUE` (repeatable; after the Dockerfile's LABELs;
    /// Dockerfile mode).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// The network of RUN steps that do not set `RUN --network`: `host` (the default, as
    /// `default`) or `none` (Dockerfile mode).
    #[arg(long, value_enum, default_value_t = NetworkArg::Default)]
    pub network: NetworkArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkArg {
    Default,
    Host,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProgressArg {
    Auto,
    Plain,
    Tty,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// Registry host, e.g. `127.0.0.1:5000` or `ghcr.io`.
    pub host: String,
    #[arg(short, long)]
    pub username: String,
    /// Password or token; default: read from stdin (`--password-stdin` style).
    #[arg(short, long)]
    pub password: Option<String>,
    /// Plain HTTP (always used for loopback hosts).
    #[arg(long)]
    pub insecure: bool,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Serve one client on stdin/stdout (the only mode).
    #[arg(long, required = true)]
    pub stdio: bool,
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    /// The image here, and its name there.
    pub image: String,
    /// `user@address:port` of the host to send to.
    #[arg(long)]
    pub to: String,
    /// The host's name (in messages).
    #[arg(long)]
    pub name: String,
    /// A host key (`TYPE BASE64`) the host must present (repeat for several).
    #[arg(long = "host-key", value_name = "KEY")]
    pub host_keys: Vec<String>,
    /// strata's path there.
    #[arg(long)]
    pub strata: String,
    /// The store there.
    #[arg(long)]
    pub target_store: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// `host[:port]/path:tag` or `@digest`; `debian` means `docker.io/library/debian:latest`;
    /// `ssh://user@host/NAME:TAG` for an image of a host over SSH.
    pub image: String,
    /// Pull IMAGE (a name on the host) from this host: a `[host.NAME]` of strata.toml or
    /// `ssh://user@address[:port]`.
    #[arg(long)]
    pub host: Option<String>,
    /// The project file (or its directory) that defines `[host.NAME]`.
    #[arg(long, default_value = ".")]
    pub project: PathBuf,
    /// Plain HTTP (always used for loopback hosts).
    #[arg(long)]
    pub insecure: bool,
    /// Progress output.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The local image.
    pub image: String,
    /// Where to push (default: the image's own name, which must then include a registry), or
    /// `ssh://user@address[:port][/NAME[:TAG]]` for a host over SSH.
    pub dest: Option<String>,
    /// Push to this host over SSH (repeat for several; they receive in parallel): a
    /// `[host.NAME]` of strata.toml or `ssh://user@address[:port]`. DEST, if given, is the
    /// name on the hosts.
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// The project file (or its directory) that defines `[host.NAME]`.
    #[arg(long, default_value = ".")]
    pub project: PathBuf,
    /// Plain HTTP (always used for loopback hosts).
    #[arg(long)]
    pub insecure: bool,
    /// Other repositories of the same registry to mount shared blobs from.
    #[arg(long = "mount-from", value_name = "REPO")]
    pub mount_from: Vec<String>,
    /// Hosts relay blobs to each other: each missing blob leaves this machine once, and hosts
    /// that have the image send it on (see docs/hosts.md). Default: the hosts' `relay`.
    #[arg(long)]
    pub relay: bool,
    /// Progress output.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Serve the OCI distribution API (until interrupted).
    Serve(RegistryServeArgs),
    /// Manage orgs (namespaces).
    Org {
        #[command(subcommand)]
        command: OrgCommand,
        #[command(flatten)]
        root: RegistryRootArg,
    },
    /// Create a user of an org (password from --password or stdin).
    User {
        #[command(subcommand)]
        command: UserCommand,
        #[command(flatten)]
        root: RegistryRootArg,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        root: RegistryRootArg,
    },
    /// Delete what no tag, index, referrer or pin reaches; abandoned uploads.
    Gc {
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        root: RegistryRootArg,
    },
}

#[derive(Debug, clap::Args)]
pub struct UiArgs {
    /// Address to listen on. Anything but a loopback address requires a registry token to
    /// sign in (see --require-token).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub addr: String,
    /// The project file (or its directory) whose apps a Roll back deploys.
    #[arg(long, default_value = ".")]
    pub project: std::path::PathBuf,
    /// Require a registry token of an org to sign in, and show only that org's repositories
    /// (always on when --addr is not a loopback address).
    #[arg(long)]
    pub require_token: bool,
    /// The registry shown on the Registry page, and whose tokens sign in: its data directory
    /// (default: <store>/registry, the one `strata registry serve` uses).
    #[arg(long, value_name = "DIR")]
    pub registry_root: Option<std::path::PathBuf>,
    /// Or the same `--config FILE` as `strata registry serve` (S3, PostgreSQL).
    #[arg(long, value_name = "FILE")]
    pub registry_config: Option<std::path::PathBuf>,
    /// The registry's address in the pull references the Registry page shows.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:5000")]
    pub registry_host: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RegistryRootArg {
    /// The registry's data directory (default: <store>/registry).
    #[arg(long, value_name = "DIR", global = true)]
    pub root: Option<std::path::PathBuf>,
    /// A TOML file with the server's settings, `[s3]` storage and a `[postgres]` database (see
    /// docs/registry.md); admin commands given the file act on the same registry as `serve`.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct RegistryServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub addr: String,
    #[command(flatten)]
    pub root: RegistryRootArg,
    /// `anonymous` (everything allowed; local use) or `orgs` (users and tokens per org).
    #[arg(long, value_enum, default_value_t = AuthArg::Anonymous)]
    pub auth: AuthArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthArg {
    Anonymous,
    Orgs,
}

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an org.
    Create { name: String },
    /// List orgs.
    List,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user in an org.
    Create {
        name: String,
        #[arg(long)]
        org: String,
        #[arg(long)]
        password: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token for an org; printed once.
    Create {
        #[arg(long)]
        org: String,
        /// `pull` or `push` (push includes pull).
        #[arg(long, default_value = "pull")]
        scope: String,
    },
    /// List tokens (ids, not secrets).
    List {
        #[arg(long)]
        org: Option<String>,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Create and start a machine from an image: `strata machine run IMAGE [CMD...]`.
    Run(Box<MachineRunArgs>),
    /// List machines.
    #[command(alias = "ls")]
    List {
        /// Only this app's machines.
        #[arg(long)]
        app: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Start stopped machines (their root filesystems start fresh; volumes stay).
    Start(MachineIds),
    /// Stop machines: their StopSignal, then SIGKILL after the kill timeout.
    Stop(MachineIds),
    /// Stop and start machines.
    Restart(MachineIds),
    /// Stop and remove machines (their named volumes stay).
    #[command(alias = "rm")]
    Destroy {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print a machine's output (stdout and stderr).
    Logs {
        id: String,
        /// Keep printing new output until the machine is destroyed.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines, or `all`.
        #[arg(short = 'n', long, value_name = "N|all", value_parser = parse_tail)]
        tail: Option<Tail>,
    },
    /// Run a command inside a running machine.
    Exec(ExecArgs),
}

/// One or more machines, by id or its start.
#[derive(Debug, clap::Args)]
pub struct MachineIds {
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// `logs --tail`: how many lines from the end (`None`: all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail(pub Option<usize>);

fn parse_tail(s: &str) -> Result<Tail, String> {
    if s == "all" {
        return Ok(Tail(None));
    }
    s.parse()
        .map(|n| Tail(Some(n)))
        .map_err(|_| format!("`{s}` is not a number of lines or `all`"))
}

/// `exec` (`strata exec`, `strata machine exec`): `docker exec`'s flags.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Attach stdin (without it, the command reads end of file at once).
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal (stdin must be one; `-it` for a shell).
    #[arg(short, long)]
    pub tty: bool,
    /// Extra environment, `K=V`, or `K` to pass this shell's `K`.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Extra environment from a file: `K=V` or `K` per line, `#` comments (before `-e`).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<PathBuf>,
    /// Working directory, an absolute path (default: the machine's).
    #[arg(short, long, value_name = "PATH")]
    pub workdir: Option<String>,
    /// Who the command runs as, `NAME|UID[:GROUP|GID]` (default: the machine's user; names
    /// are looked up in the machine's /etc/passwd and /etc/group).
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// The machine (its id or the start of it).
    pub id: String,
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// `strata run`: a machine's flags, and the `docker run` habits it takes or explains.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Remove the machine when it exits: what `strata run` always does (accepted, as
    /// `docker run --rm` users type it).
    #[arg(long)]
    pub rm: bool,
    /// Attach stdin: what this process reads goes to the command (without it, the command
    /// reads end of file at once).
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the command a terminal: its output comes through it, and with `-i` this terminal's
    /// keys go to it (`strata run -it IMAGE sh`).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Detached: start the machine, print its id and return; it is kept (with its
    /// `--restart` policy) until `strata rm`, as `strata machine run` does.
    #[arg(short = 'd', long)]
    pub detach: bool,
    #[command(flatten)]
    pub machine: MachineRunArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct MachineRunArgs {
    /// The image (a name in the store).
    pub image: String,
    /// Replaces the image's CMD.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// The machine's id (default: generated).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment, `K=V` (after the image's), or `K` to pass this shell's `K`.
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Environment from a file: `K=V` or `K` per line, `#` comments (before `-e`).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_files: Vec<std::path::PathBuf>,
    /// Working directory, an absolute path (replaces the image's WORKDIR; made if missing).
    #[arg(short, long, value_name = "PATH")]
    pub workdir: Option<String>,
    /// Who the command runs as, `NAME|UID[:GROUP|GID]` (replaces the image's USER; names are
    /// looked up in the image's /etc/passwd and /etc/group).
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// `NAME:/path`: a named volume, kept under the store across machines; or
    /// `/host/path:/path[:ro]`: a host directory or file, as `docker run -v` mounts it.
    #[arg(short, long = "volume", value_name = "SRC:PATH[:ro]")]
    pub volumes: Vec<String>,
    /// Serve machine PORT on 127.0.0.1:HOSTPORT through the agent's proxy.
    #[arg(short, long = "publish", value_name = "HOSTPORT:PORT")]
    pub ports: Vec<String>,
    /// `no` (default), `always`, `on-failure[:N]`.
    #[arg(long, default_value = "no")]
    pub restart: String,
    /// Replaces the image's ENTRYPOINT.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Replaces the image's StopSignal.
    #[arg(long)]
    pub stop_signal: Option<String>,
    /// Time between the stop signal and SIGKILL (default 10s).
    #[arg(long)]
    pub kill_timeout: Option<String>,
    /// Memory limit, as `docker run -m` takes it (`512m`, `1g`).
    #[arg(short, long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// CPU limit, as `docker run --cpus` takes it (`0.5`, `2`).
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
}

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    /// Address the proxy listens on (a host deployed over SSH sets 0.0.0.0 through the
    /// environment when its deploy starts the agent).
    #[arg(long, default_value = "127.0.0.1", env = "STRATA_AGENT_LISTEN")]
    pub listen: std::net::IpAddr,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum AgentCommand {
    /// Stop the agent (machines keep running; the next one adopts them).
    Stop,
    /// Whether the agent runs.
    Status,
}

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The app (`[app.NAME]` of strata.toml); optional when there is one.
    pub app: Option<String>,
    /// The project file or its directory.
    #[arg(long, default_value = ".")]
    pub project: std::path::PathBuf,
    /// Build (and with --push, push) the image; start nothing.
    #[arg(long)]
    pub build_only: bool,
    /// Push to the app's registry (implied when the app sets `registry`).
    #[arg(long)]
    pub push: bool,
    /// Deploy this image instead of building (e.g. an earlier release: a rollback).
    #[arg(long)]
    pub image: Option<String>,
    /// Tag the image with this label instead of `deployment-<ULID>`.
    #[arg(long)]
    pub image_label: Option<String>,
    /// Plain HTTP to the registry (always used for loopback hosts).
    #[arg(long)]
    pub insecure: bool,
    /// Return once traffic is switched; don't wait for old machines to stop.
    #[arg(long)]
    pub detach: bool,
    /// Deploy on this host over SSH (repeat for several; default: the app's `hosts`, else
    /// this machine): a `[host.NAME]` of strata.toml or `ssh://user@address[:port]`.
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Hosts relay the image's blobs to each other: each missing blob leaves this machine
    /// once (see docs/hosts.md). Default: the hosts' `relay`.
    #[arg(long)]
    pub relay: bool,
    /// Where the app goes: `local` (machines here or on `--host`), `kubernetes` (objects
    /// written with `--out` or applied in a kubectl context) or `swarm` (a Docker Swarm
    /// service); default: the app's `target`, else local.
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// With `--target kubernetes`: write the objects to DIR/<app>.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
    /// With `--target kubernetes`: apply the objects in this kubectl context.
    #[arg(long, value_name = "CONTEXT")]
    pub kube_context: Option<String>,
    /// The app's definition as TOML (an `[app.NAME]` table) instead of strata.toml's: what a
    /// deploy over SSH sends the host.
    #[arg(long, hide = true)]
    pub spec: Option<String>,
    /// Progress output.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The apps (`[app.NAME]` of strata.toml), each kept current; optional when there is one.
    pub apps: Vec<String>,
    /// The project file or its directory.
    #[arg(long, default_value = ".")]
    pub project: PathBuf,
    /// Drop what `strata dev` synced into the app's machines and restart them on their
    /// deployed image as it was built, then exit.
    #[arg(long)]
    pub reset: bool,
    /// Deploy to this host over SSH and keep its machines current there: a `[host.NAME]` of
    /// strata.toml or `ssh://user@address[:port]` (docs/dev.md).
    #[arg(long)]
    pub host: Option<String>,
    /// Progress output.
    #[arg(long, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
}

/// Where a command looks: this machine, or a host over SSH.
#[derive(Debug, Clone, clap::Args)]
pub struct HostArg {
    /// Run on this host over SSH: a `[host.NAME]` of strata.toml or `ssh://user@address`.
    #[arg(long)]
    pub host: Option<String>,
    /// The project file (or its directory) that defines `[host.NAME]`.
    #[arg(long, default_value = ".")]
    pub project: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ReleasesArgs {
    /// One app (default: all).
    pub app: Option<String>,
    #[command(flatten)]
    pub on: HostArg,
    /// Show each release's image reference and digest.
    #[arg(long)]
    pub image: bool,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Apps on this host: active release, machines, public address.
    #[command(alias = "ls")]
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove an app from this host: machines, route, releases, pins.
    Destroy {
        app: String,
        /// Also remove the named volumes its machines used.
        #[arg(long)]
        volumes: bool,
    },
}
