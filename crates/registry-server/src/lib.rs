//! An OCI distribution (v1.1) registry server: HTTP routes, storage backends, orgs and tokens, GC.
//!
//! [`serve`] answers the distribution API on a listener; [`Admin`] manages orgs, users, tokens,
//! pins and garbage collection for the CLI (`strata registry org create|token create|gc`).
//!
//! Layout under [`ServerConfig::root`]:
//!
//! ```text
//! <root>/
//! ├── registry-v1.db        SQLite (WAL): orgs, users (argon2 hashes), API tokens (sha256), pins,
//! │                         upload sessions, gc's lease (all in PostgreSQL with `[postgres]`)
//! ├── token.key             HS256 key for bearer tokens (0600, made on first start; in the
//! │                         database with PostgreSQL, so replicas share it)
//! ├── tmp/                  request bodies being received; in-flight writes (filesystem storage)
//! ├── blobs/<alg>/<hex>     ┐
//! ├── repos/<name>/…        │ filesystem storage; the same keys in S3
//! ├── catalog/<name>/_repo  │ (see the `registry` module for the key layout)
//! └── _uploads/<id>/<part>  ┘
//! ```
//!
//! Replicas: any number of servers over one S3 bucket and one PostgreSQL database serve one
//! registry; no request depends on which replica served the one before (see docs/registry.md).

// Tests may unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod auth;
mod config;
mod error;
mod gc;
mod http;
mod meta;
mod registry;
mod storage;
mod util;
mod view;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use config::{AuthMode, Limits, MetaKind, S3Config, ServerConfig, StorageKind};
pub use error::{Error, Result};
pub use gc::GcReport;
pub use meta::{Pin, TokenInfo, TokenScope};
pub use storage::{Backend, ByteStream, FsBackend, ObjectInfo, S3Backend};
pub use strata_oci::Digest;
pub use view::{ImageRow, RegistryView, RepoRow};

use error::IoContext;
use meta::Meta;
use registry::Registry;

struct Parts {
    meta: Arc<Meta>,
    registry: Arc<Registry>,
}

async fn open_parts(config: &ServerConfig) -> Result<Parts> {
    std::fs::create_dir_all(&config.root).at("create", &config.root)?;
    let backend: Arc<dyn Backend> = match &config.storage {
        StorageKind::Filesystem => Arc::new(FsBackend::open(&config.root)?),
        StorageKind::S3(s3) => Arc::new(S3Backend::open(s3)?),
    };
    let meta = Arc::new(Meta::open(&config.meta, &config.root).await?);
    Ok(Parts {
        registry: Arc::new(Registry::new(backend, meta.clone(), &config.root)?),
        meta,
    })
}

/// Serve the registry on `listener` until the process ends.
pub async fn serve(config: ServerConfig, listener: tokio::net::TcpListener) -> Result<()> {
    serve_with_shutdown(config, listener, std::future::pending()).await
}

/// Serve the registry on `listener` until `shutdown` completes; requests in flight are dropped.
pub async fn serve_with_shutdown(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_with_routes(config, listener, shutdown, axum::Router::new()).await
}

/// [`serve_with_shutdown`], also answering `extra`'s routes (the dashboard's pages under
/// `/ui`); the distribution API keeps `/v2` and `/token`.
pub async fn serve_with_routes(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    extra: axum::Router,
) -> Result<()> {
    let parts = open_parts(&config).await?;
    let auth = match config.auth {
        AuthMode::Anonymous => None,
        AuthMode::Orgs => Some(Arc::new(auth::Auth::new(
            parts.meta.clone(),
            parts.meta.token_key(&config.root).await?,
            config.token_ttl,
        ))),
    };
    let state = Arc::new(http::AppState {
        registry: parts.registry.clone(),
        auth,
        limits: config.limits.clone(),
        public_url: config.public_url.clone(),
    });
    let app = http::router(state.clone()).merge(extra);

    // The abandoned-upload cleaner: often enough that an upload is gone soon after its timeout.
    let cleaner = {
        let registry = parts.registry.clone();
        let timeout = config.upload_timeout;
        let every = (timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = registry.clean_uploads(timeout, false).await {
                    tracing::warn!("cleaning abandoned uploads: {e}");
                }
            }
        })
    };

    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let header_timeout = config.limits.header_read_timeout;
    let send_idle = config.limits.send_idle_timeout;
    // A connection is accepted only with a permit: beyond the limit, clients wait in the
    // listen backlog instead of each costing memory here.
    let permits = Arc::new(tokio::sync::Semaphore::new(
        config.limits.max_connections.max(1),
    ));
    let mut shutdown = std::pin::pin!(shutdown);
    let result = loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()), // never closed
            },
            () = &mut shutdown => break Ok(()),
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break Ok(()),
        };
        let (stream, _) = match accepted {
            Ok(a) => a,
            Err(e) if is_transient_accept_error(&e) => {
                // Out of file descriptors or a connection reset before accept: back off, go on.
                tracing::warn!("accept on {addr}: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(source) => break Err(Error::Listen { addr, source }),
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let state = state.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Blob downloads first (sendfile), then hyper for whatever else comes.
            let timeouts = http::Timeouts {
                header_read: header_timeout,
                send_idle,
            };
            let http::Next::Hyper(stream, read) =
                http::serve_blobs(&state, stream, &timeouts).await
            else {
                return;
            };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                // What a connection queues to send (and reads ahead) before it waits: with one
                // blob chunk being produced, a client that stops reading pins about 256 KiB.
                .max_buf_size(128 << 10);
            // The bytes read for the blob path come first, then the rest of the connection.
            let (rx, tx) = stream.into_split();
            let rewound = tokio::io::AsyncReadExt::chain(std::io::Cursor::new(read), rx);
            let io = hyper_util::rt::TokioIo::new(util::SendIdle::new(
                tokio::io::join(rewound, tx),
                send_idle,
            ));
            if let Err(e) = builder.serve_connection(io, svc).await {
                tracing::debug!("connection: {e}");
            }
        });
    };
    cleaner.abort();
    result
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(libc_emfile) if libc_emfile == 24 || libc_emfile == 23)
}

/// Options of [`Admin::gc_with`].
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would be removed without removing it.
    pub dry_run: bool,
    /// Manifests, links and blobs younger than this are kept (a push may be in progress), and
    /// uploads older than this are removed.
    pub grace: Duration,
    /// Uploads untouched for longer than this are removed; `None`: [`GcOptions::grace`].
    pub upload_grace: Option<Duration>,
}

/// Administration of a registry, for the CLI: orgs, users, tokens, pins, gc. Safe to use while
/// servers run on the same storage and database (gc included: see the `gc` module).
///
/// Its methods are synchronous and work from any thread, inside an async runtime or not: the
/// work runs on a small runtime of the `Admin`'s own, where its database connections live.
pub struct Admin {
    config: ServerConfig,
    meta: Arc<Meta>,
    registry: Arc<Registry>,
    handle: tokio::runtime::Handle,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Admin {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async caller may not: let it wind down alone.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Admin {
    /// Open the registry at `root` with filesystem storage.
    pub fn open(root: impl AsRef<Path>) -> Result<Admin> {
        Admin::with_config(&ServerConfig::new(root.as_ref()))
    }

    /// Open the registry `config` describes (e.g. with S3 storage and PostgreSQL).
    pub fn with_config(config: &ServerConfig) -> Result<Admin> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("registry-admin")
            .enable_all()
            .build()
            .at("start a runtime for", &config.root)?;
        let handle = rt.handle().clone();
        let cfg = config.clone();
        let parts = on_thread(&handle, async move { open_parts(&cfg).await });
        let parts = match parts {
            Ok(p) => p,
            Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
        Ok(Admin {
            config: config.clone(),
            meta: parts.meta,
            registry: parts.registry,
            handle,
            rt: Some(rt),
        })
    }

    fn block<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        on_thread(&self.handle, fut)
    }

    /// Create an org; it owns every repository named `<org>/...`.
    pub fn create_org(&self, name: &str) -> Result<()> {
        let (meta, name) = (self.meta.clone(), name.to_string());
        self.block(async move { meta.create_org(&name).await })
    }

    /// All orgs, sorted.
    pub fn orgs(&self) -> Result<Vec<String>> {
        let meta = self.meta.clone();
        self.block(async move { meta.orgs().await })
    }

    /// Create a user of `org` (push and pull on the org's repositories); the password is stored
    /// as an argon2 hash. User names are unique across orgs.
    pub fn create_user(&self, org: &str, name: &str, password: &str) -> Result<()> {
        let meta = self.meta.clone();
        let (org, name, password) = (org.to_string(), name.to_string(), password.to_string());
        self.block(async move { meta.create_user(&org, &name, &password).await })
    }

    /// Create an API token for `org`. The returned secret is shown once and stored only as a
    /// hash; use it as the password with any user name (`docker login -u <org>`), or as a
    /// bearer token.
    pub fn create_token(&self, org: &str, scope: TokenScope) -> Result<String> {
        let (meta, org) = (self.meta.clone(), org.to_string());
        self.block(async move { meta.create_token(&org, scope).await })
    }

    /// API tokens (ids, not secrets), of one org or all.
    pub fn tokens(&self, org: Option<&str>) -> Result<Vec<TokenInfo>> {
        let (meta, org) = (self.meta.clone(), org.map(str::to_string));
        self.block(async move { meta.tokens(org.as_deref()).await })
    }

    /// Revoke the token with this id; `false` when there was none.
    pub fn revoke_token(&self, id: &str) -> Result<bool> {
        let (meta, id) = (self.meta.clone(), id.to_string());
        self.block(async move { meta.revoke_token(&id).await })
    }

    /// Keep `repo@digest` (and all it references) through gc until unpinned by `holder`.
    pub fn pin(&self, repo: &str, digest: &Digest, holder: &str) -> Result<()> {
        let meta = self.meta.clone();
        let (repo, digest, holder) = (repo.to_string(), digest.clone(), holder.to_string());
        self.block(async move { meta.pin(&repo, &digest, &holder).await })
    }

    /// Remove a pin; `false` when there was none.
    pub fn unpin(&self, repo: &str, digest: &Digest, holder: &str) -> Result<bool> {
        let meta = self.meta.clone();
        let (repo, digest, holder) = (repo.to_string(), digest.clone(), holder.to_string());
        self.block(async move { meta.unpin(&repo, &digest, &holder).await })
    }

    /// All pins.
    pub fn pins(&self) -> Result<Vec<Pin>> {
        let meta = self.meta.clone();
        self.block(async move { meta.pins().await })
    }

    /// Mark and sweep with the configured upload timeout as the grace period.
    pub async fn gc(&self, dry_run: bool) -> Result<GcReport> {
        self.gc_with(GcOptions {
            dry_run,
            grace: self.config.upload_timeout,
            upload_grace: None,
        })
        .await
    }

    /// Mark and sweep (see the `gc` module docs for what is kept, and how it runs beside
    /// pushes and other replicas). `Err(GcBusy)` while another gc runs.
    pub async fn gc_with(&self, opts: GcOptions) -> Result<GcReport> {
        let registry = self.registry.clone();
        self.handle
            .spawn(async move {
                let uploads = opts.upload_grace.unwrap_or(opts.grace);
                gc::run(&registry, opts.grace, uploads, opts.dry_run).await
            })
            .await?
    }
}

/// Run `fut` on `handle`'s runtime and wait for it on a thread of its own, which works whether
/// or not the caller is inside an async runtime.
fn on_thread<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let task = handle.spawn(fut);
    std::thread::scope(|s| s.spawn(|| handle.block_on(task)).join())
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?
}
