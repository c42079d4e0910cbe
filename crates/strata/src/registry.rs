//! `strata login|pull|push` (the distribution client) and `strata registry …` (the embedded
//! registry server and its admin commands).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use strata_oci::{Digest, Reference};
use strata_registry::{ClientOptions, DockerConfig};
use strata_registry_server::{
    Admin, AuthMode, MetaKind, S3Config, ServerConfig, StorageKind, TokenScope,
};
use strata_store::Store;
use strata_transfer::{PullOptions, PushOptions};

use crate::cli::{
    AuthArg, LoginArgs, OrgCommand, PullArgs, PushArgs, RegistryCommand, RegistryRootArg,
    RegistryServeArgs, TokenCommand, UserCommand,
};
use crate::cmd::human_size;
use crate::output::{Note, Output};

/// Client options for `--insecure`, with the timeout from `STRATA_REGISTRY_TIMEOUT` (checked
/// here, so a malformed value is an error rather than the default).
pub(crate) fn client_options(insecure: bool) -> Result<ClientOptions> {
    let timeout = strata_registry::timeout_from_env()
        .map_err(anyhow::Error::msg)?
        .unwrap_or(strata_registry::DEFAULT_TIMEOUT);
    Ok(ClientOptions {
        insecure,
        timeout,
        ..ClientOptions::default()
    })
}

pub fn login(args: &LoginArgs) -> Result<()> {
    let password = match &args.password {
        Some(p) => p.clone(),
        None => {
            if std::io::stdin().is_terminal() {
                eprint!("Password: ");
            }
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    let config = DockerConfig::from_env();
    strata_registry::login_blocking(
        &args.host,
        &args.username,
        &password,
        &config,
        client_options(args.insecure)?,
    )
    .with_context(|| format!("login to `{}` failed", args.host))?;
    println!("Login Succeeded");
    Ok(())
}

pub fn pull(store: &Store, args: &PullArgs) -> Result<()> {
    let report = pull_image(store, args)?;
    println!("{}", report.name);
    println!("{}", report.descriptor.digest);
    Ok(())
}

/// [`pull`] without printing its result on stdout: for commands that pull on the way to
/// something else (`strata run`, `machine run`), whose stdout is the machine's.
pub fn pull_image(store: &Store, args: &PullArgs) -> Result<strata_transfer::PullReport> {
    let src = Reference::parse(&args.image)?;
    let out = Output::new(args.progress);
    let opts = PullOptions {
        client: client_options(args.insecure)?,
        progress: Some(out.blob_progress("pulled")),
        ..PullOptions::default()
    };
    // What the name was before, to put back if the pulled image cannot be unpacked.
    let local = strata_transfer::local_name(&args.image).ok();
    let before = match &local {
        Some(n) => store.get_ref(n)?,
        None => None,
    };
    let report = strata_transfer::pull(store, &src, &opts)
        .with_context(|| format!("cannot pull `{}`", args.image))?;
    let before = before.filter(|_| local.as_deref() == Some(report.name.as_str()));
    crate::cmd::unpack_or_unname(store, &report.name, before)?;
    out.note(&Note::Pulled {
        image: report.name.clone(),
        fetched: report.blobs_fetched,
        bytes: report.bytes_downloaded,
        present: report.blobs_present,
    });
    Ok(report)
}

pub fn push(store: &Store, args: &PushArgs) -> Result<()> {
    let dest_text = args.dest.as_deref().unwrap_or(&args.image);
    if dest_text.starts_with("ssh://") {
        bail!(
            "`{dest_text}` is a host over SSH: pushing to hosts is not available yet\n\
             hint: push to a registry (`strata push IMAGE HOST[:PORT]/REPO[:TAG]`), or \
             `strata save IMAGE | ssh HOST docker load`"
        );
    }
    let dest = Reference::parse(dest_text)?;
    let out = Output::new(args.progress);
    let opts = PushOptions {
        client: client_options(args.insecure)?,
        mount_from: args.mount_from.clone(),
        progress: Some(out.blob_progress("pushed")),
        ..PushOptions::default()
    };
    let report = strata_transfer::push(store, &args.image, &dest, &opts)
        .with_context(|| format!("cannot push `{}` to `{dest_text}`", args.image))?;
    out.note(&pushed_note(&report));
    println!("{}", report.reference);
    Ok(())
}

fn registry_root(store: Option<PathBuf>, root: &RegistryRootArg) -> Result<PathBuf> {
    match &root.root {
        Some(r) => Ok(r.clone()),
        None => Ok(strata_store::default_root(store)?.join("registry")),
    }
}

/// `strata registry serve --config FILE`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    addr: Option<String>,
    root: Option<PathBuf>,
    auth: Option<AuthArg>,
    public_url: Option<String>,
    upload_timeout_secs: Option<u64>,
    max_manifest_bytes: Option<u64>,
    max_connections: Option<usize>,
    send_idle_timeout_secs: Option<u64>,
    s3: Option<S3File>,
    postgres: Option<PostgresFile>,
}

/// `[postgres]`: the shared metadata database of replicas.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PostgresFile {
    url: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct S3File {
    bucket: String,
    endpoint: Option<String>,
    #[serde(default = "default_region")]
    region: String,
    access_key: String,
    secret_key: String,
    #[serde(default)]
    allow_http: bool,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// The registry `root` (with its `--config FILE`, if any) names: what `serve` serves and the
/// admin commands act on. The file's `addr`, when set.
fn registry_config(
    store: Option<PathBuf>,
    root_arg: &RegistryRootArg,
) -> Result<(ServerConfig, Option<String>)> {
    let file: ServeFile = match &root_arg.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read `{}`", path.display()))?;
            toml::from_str(&text).with_context(|| format!("invalid `{}`", path.display()))?
        }
        None => ServeFile::default(),
    };
    let root = match (&root_arg.root, &file.root) {
        (Some(r), _) | (None, Some(r)) => r.clone(),
        (None, None) => registry_root(store, root_arg)?,
    };
    let mut config = ServerConfig::new(root);
    config.auth = match file.auth {
        Some(AuthArg::Orgs) => AuthMode::Orgs,
        _ => AuthMode::Anonymous,
    };
    config.public_url = file.public_url;
    if let Some(secs) = file.upload_timeout_secs {
        config.upload_timeout = std::time::Duration::from_secs(secs);
    }
    if let Some(max) = file.max_manifest_bytes {
        config.limits.max_manifest_bytes = max;
    }
    if let Some(max) = file.max_connections {
        if max == 0 {
            bail!(
                "`{}`: `max_connections` must be at least 1",
                root_arg
                    .config
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            );
        }
        config.limits.max_connections = max;
    }
    if let Some(secs) = file.send_idle_timeout_secs {
        config.limits.send_idle_timeout = std::time::Duration::from_secs(secs.max(1));
    }
    if let Some(s3) = file.s3 {
        config.storage = StorageKind::S3(S3Config {
            bucket: s3.bucket,
            endpoint: s3.endpoint,
            region: s3.region,
            access_key: s3.access_key,
            secret_key: s3.secret_key,
            allow_http: s3.allow_http,
        });
    }
    if let Some(pg) = file.postgres {
        if !pg.url.starts_with("postgres://") && !pg.url.starts_with("postgresql://") {
            bail!(
                "`{}`: `[postgres] url` must start with `postgres://`",
                root_arg
                    .config
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            );
        }
        config.meta = MetaKind::Postgres { url: pg.url };
    }
    Ok((config, file.addr))
}

fn serve_config(
    store: Option<PathBuf>,
    args: &RegistryServeArgs,
) -> Result<(String, ServerConfig)> {
    let (mut config, file_addr) = registry_config(store, &args.root)?;
    // Flags win over the file, except the defaults the flags always have.
    if args.auth == AuthArg::Orgs {
        config.auth = AuthMode::Orgs;
    }
    let addr = if args.addr == "127.0.0.1:5000" {
        file_addr.unwrap_or_else(|| args.addr.clone())
    } else {
        args.addr.clone()
    };
    Ok((addr, config))
}

/// The admin side of the registry `root` names (its `--config FILE` included).
fn open_admin(store: Option<PathBuf>, root: &RegistryRootArg) -> Result<Admin> {
    let (config, _) = registry_config(store, root)?;
    Ok(Admin::with_config(&config)?)
}

pub fn registry(store: Option<PathBuf>, command: RegistryCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match command {
        RegistryCommand::Serve(args) => {
            let (addr, config) = serve_config(store, &args)?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}\nhint: is another registry running there? try --addr 127.0.0.1:0"))?;
                let local = listener.local_addr()?;
                eprintln!(
                    "strata registry serving on http://{local} ({} auth, data in {})",
                    match config.auth {
                        AuthMode::Anonymous => "anonymous",
                        AuthMode::Orgs => "orgs",
                    },
                    config.root.display()
                );
                let shutdown = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                // The dashboard's Registry page, at /ui/ (docs/ui.md), behind the registry's
                // own tokens when it has orgs.
                let pages = strata_ui::router(strata_ui::UiConfig {
                    store_root: config.root.clone(),
                    exe: std::env::current_exe()?,
                    project: PathBuf::from("strata.toml"),
                    registry: Some(config.clone()),
                    registry_host: config
                        .public_url
                        .as_deref()
                        .map(|u| u.split_once("://").map_or(u, |(_, h)| h).trim_end_matches('/'))
                        .map_or_else(|| local.to_string(), String::from),
                    require_token: matches!(config.auth, AuthMode::Orgs),
                    pages: strata_ui::Pages::RegistryOnly,
                })
                .await?;
                strata_registry_server::serve_with_routes(config, listener, shutdown, pages)
                    .await?;
                anyhow::Ok(())
            })
        }
        RegistryCommand::Org { command, root } => {
            let admin = open_admin(store, &root)?;
            match command {
                OrgCommand::Create { name } => {
                    admin.create_org(&name)?;
                    println!("{name}");
                }
                OrgCommand::List => {
                    for o in admin.orgs()? {
                        println!("{o}");
                    }
                }
            }
            Ok(())
        }
        RegistryCommand::User { command, root } => {
            let admin = open_admin(store, &root)?;
            match command {
                UserCommand::Create {
                    name,
                    org,
                    password,
                } => {
                    let password = match password {
                        Some(p) => p,
                        None => {
                            let mut line = String::new();
                            std::io::stdin().lock().read_line(&mut line)?;
                            line.trim_end_matches(['\n', '\r']).to_string()
                        }
                    };
                    if password.is_empty() {
                        bail!("an empty password is not allowed");
                    }
                    admin.create_user(&org, &name, &password)?;
                    println!("{name}");
                }
            }
            Ok(())
        }
        RegistryCommand::Token { command, root } => {
            let admin = open_admin(store, &root)?;
            match command {
                TokenCommand::Create { org, scope } => {
                    let Some(scope) = TokenScope::parse(&scope) else {
                        bail!("--scope `{scope}`: expected `pull` or `push`");
                    };
                    let token = admin.create_token(&org, scope)?;
                    eprintln!(
                        "Token for {org} ({}); it is shown only once:",
                        scope.as_str()
                    );
                    println!("{token}");
                }
                TokenCommand::List { org } => {
                    for t in admin.tokens(org.as_deref())? {
                        println!(
                            "{}\t{}\t{}\t{}",
                            t.id,
                            t.org,
                            t.scope.as_str(),
                            t.created_unix
                        );
                    }
                }
                TokenCommand::Revoke { id } => {
                    if !admin.revoke_token(&id)? {
                        bail!("no token with id `{id}`");
                    }
                    println!("revoked {id}");
                }
            }
            Ok(())
        }
        RegistryCommand::Gc { dry_run, root } => {
            let admin = open_admin(store, &root)?;
            let report = rt.block_on(admin.gc(dry_run))?;
            let verb = if dry_run { "Would delete" } else { "Deleted" };
            for (repo, d) in &report.manifests_removed {
                println!("manifest {repo}@{d}");
            }
            for d in &report.blobs_removed {
                println!("blob {d}");
            }
            println!(
                "{verb} {} manifests, {} blobs ({}), {} abandoned uploads; kept {} manifests, {} blobs",
                report.manifests_removed.len(),
                report.blobs_removed.len(),
                human_size(report.bytes_freed),
                report.uploads_removed.len(),
                report.manifests_kept,
                report.blobs_kept
            );
            Ok(())
        }
    }
}

/// Pulls `src` for `strata deploy --image`; returns its local name. (The deploy names what
/// failed: no context here.)
pub fn pull_ref(store: &Store, src: &Reference, insecure: bool, out: &Output) -> Result<String> {
    let opts = PullOptions {
        client: client_options(insecure)?,
        progress: Some(out.blob_progress("pulled")),
        ..PullOptions::default()
    };
    Ok(strata_transfer::pull(store, src, &opts)?.name)
}

/// Pushes a local image for `strata deploy` and `rebase --all --push`. (The caller names what
/// failed: no context here.)
pub fn push_ref(
    store: &Store,
    local: &str,
    dest: &Reference,
    insecure: bool,
    out: &Output,
) -> Result<strata_transfer::PushReport> {
    let opts = PushOptions {
        client: client_options(insecure)?,
        progress: Some(out.blob_progress("pushed")),
        ..PushOptions::default()
    };
    Ok(strata_transfer::push(store, local, dest, &opts)?)
}

/// The event of a push to a registry.
pub fn pushed_note(report: &strata_transfer::PushReport) -> Note {
    Note::Pushed {
        image: report.reference.to_string(),
        sent: report.blobs_uploaded,
        bytes: report.bytes_uploaded,
        mounted: report.blobs_mounted,
        present: report.blobs_skipped,
        resumed: 0,
        from: None,
    }
}

/// A release pushed to the embedded registry served from this store (`<store>/registry`, the
/// default root of `strata registry serve`) is pinned there, so its gc keeps what a machine
/// may be redeployed from. Another registry keeps images by its own rules; a failure here
/// is reported, not fatal: the image is already pushed and pinned in the store.
pub fn pin_in_embedded_registry(store: &Store, dest: &Reference, digest: &Digest, app: &str) {
    let Some(root) = embedded_registry(store) else {
        return;
    };
    let holder = deploy_pin(app);
    match Admin::open(&root).and_then(|admin| admin.pin(dest.repository(), digest, &holder)) {
        Ok(()) => eprintln!(
            "pinned {}@{} in the embedded registry",
            dest.repository(),
            digest.short()
        ),
        Err(e) => eprintln!("warning: cannot pin the release in {}: {e}", root.display()),
    }
}

/// Drops the embedded registry's pins that deploys of `app` made (holder `deploy:<app>`), so
/// its gc may collect the app's images; returns how many. Like the pinning, best effort: a
/// registry that cannot be opened gets a warning.
pub fn unpin_app_in_embedded_registry(store: &Store, app: &str) -> usize {
    drop_deploy_pins(store, app, |_| false)
}

/// Drops the embedded registry's pins of `app` whose image no release of the app keeps any
/// more (the store's `release:<app>:<version>` pins say which do: the releases within
/// `keep_releases`), so the registry's gc may collect releases that aged out, as the store's
/// does. Returns how many.
pub fn unpin_aged_releases_in_embedded_registry(store: &Store, app: &str) -> usize {
    let prefix = strata_deploy::deploy::release_pin_prefix(app);
    let kept: std::collections::HashSet<Digest> = match store.pins() {
        Ok(pins) => pins
            .into_iter()
            .filter(|p| p.holder.starts_with(&prefix))
            .map(|p| p.digest)
            .collect(),
        Err(e) => {
            eprintln!("warning: cannot read the store's pins: {e}");
            return 0;
        }
    };
    drop_deploy_pins(store, app, |d| kept.contains(d))
}

/// Drops the `deploy:<app>` pins of the store's embedded registry whose digest `keep` refuses.
fn drop_deploy_pins(store: &Store, app: &str, keep: impl Fn(&Digest) -> bool) -> usize {
    let Some(root) = embedded_registry(store) else {
        return 0;
    };
    let holder = deploy_pin(app);
    let dropped = Admin::open(&root).and_then(|admin| {
        let mut n = 0;
        for p in admin.pins()? {
            if p.holder == holder && !keep(&p.digest) && admin.unpin(&p.repo, &p.digest, &holder)? {
                n += 1;
            }
        }
        Ok(n)
    });
    dropped.unwrap_or_else(|e| {
        eprintln!("warning: cannot unpin app {app} in {}: {e}", root.display());
        0
    })
}

/// The root of the embedded registry served from the store (`<store>/registry`), if there is
/// one: only that registry's pins are ours to set.
fn embedded_registry(store: &Store) -> Option<PathBuf> {
    Some(store.root().join("registry")).filter(|root| root.exists())
}

/// The holder of the embedded registry's pins that deploys of `app` set.
fn deploy_pin(app: &str) -> String {
    format!("deploy:{app}")
}

/// `strata ui`: the dashboard of this store (and its registry), until Ctrl-C.
pub fn ui(store: Store, args: &crate::cli::UiArgs) -> Result<()> {
    let root_arg = RegistryRootArg {
        root: args.registry_root.clone(),
        config: args.registry_config.clone(),
    };
    let (registry, _) = registry_config(Some(store.root().to_path_buf()), &root_arg)?;
    let addr: std::net::SocketAddr = args
        .addr
        .parse()
        .with_context(|| format!("--addr `{}` is not an address:port", args.addr))?;
    let config = strata_ui::UiConfig {
        store_root: store.root().to_path_buf(),
        exe: std::env::current_exe().context("cannot find the strata binary")?,
        project: strata_deploy::deploy::project_file(&args.project),
        registry: Some(registry),
        registry_host: args.registry_host.clone(),
        // Off this machine, every page needs an org's token.
        require_token: args.require_token || !addr.ip().is_loopback(),
        pages: strata_ui::Pages::All,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}\nhint: is `strata ui` running already? try --addr 127.0.0.1:0"))?;
        let local = listener.local_addr()?;
        eprintln!(
            "strata ui on http://{local}/{}",
            if config.require_token { " (sign in with a registry token)" } else { "" }
        );
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        strata_ui::serve(config, listener, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        anyhow::Ok(())
    })
}
