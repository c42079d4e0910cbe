//! Server configuration.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::storage::S3Config;

/// Where blobs, manifests and tags are kept.
#[derive(Debug, Clone, Default)]
pub enum StorageKind {
    /// Under [`ServerConfig::root`] (the default).
    #[default]
    Filesystem,
    /// In an S3-compatible bucket (uploads in progress too); the SQLite database (unless
    /// [`MetaKind::Postgres`]), spooled request bodies and the token key live under
    /// [`ServerConfig::root`].
    S3(S3Config),
}

/// Where orgs, users, tokens, pins, upload sessions and gc's coordination are kept.
#[derive(Clone, Default)]
pub enum MetaKind {
    /// `<root>/registry-v1.db`, for one server (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database shared by any number of replicas over the same object storage.
    Postgres {
        /// `postgres://user:password@host:port/database`.
        url: String,
    },
}

impl std::fmt::Debug for MetaKind {
    // The URL may hold a password: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaKind::Sqlite => f.write_str("Sqlite"),
            MetaKind::Postgres { .. } => f.write_str("Postgres { url: <hidden> }"),
        }
    }
}

/// Who may do what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Everything is allowed without credentials (local use).
    #[default]
    Anonymous,
    /// Repositories are `<org>/<repo...>`; users and tokens of an org reach only its
    /// repositories; anonymous requests are refused with a Bearer challenge.
    Orgs,
}

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest manifest accepted (413 above it). Default 4 MiB, the spec's minimum.
    pub max_manifest_bytes: u64,
    /// Largest blob an upload may reach (413 above it). Default 64 GiB.
    pub max_blob_bytes: u64,
    /// A request body that sends nothing for this long is cut off. Default 60 s.
    pub body_idle_timeout: Duration,
    /// A client must send its request headers within this time; a kept-alive connection with
    /// no next request is closed after it too. Default 30 s.
    pub header_read_timeout: Duration,
    /// A response the client reads nothing of for this long is dropped with its connection.
    /// Default 60 s.
    pub send_idle_timeout: Duration,
    /// Connections served at once; more wait to be accepted until one closes. Each holds at
    /// most about 256 KiB of a blob it sends (a 128 KiB read and a 128 KiB send queue), so
    /// 1024 stalled downloads stay near 256 MiB. Default 1024.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_bytes: 4 << 20,
            max_blob_bytes: 64 << 30,
            body_idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
            send_idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Everything [`crate::serve`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Filesystem storage (with [`StorageKind::Filesystem`]), the SQLite metadata database
    /// (`registry-v1.db`), request bodies being received (`tmp/`) and the token signing key
    /// (`token.key`; replicas need the same one: copy it, or keep `root` on shared storage).
    pub root: PathBuf,
    /// Where blobs, manifests and tags go.
    pub storage: StorageKind,
    /// Where orgs, users, tokens, pins and upload sessions go.
    pub meta: MetaKind,
    /// Anonymous (local use) or per-org access.
    pub auth: AuthMode,
    /// Request limits and timeouts.
    pub limits: Limits,
    /// Uploads untouched for longer than this are removed (by the server's cleaner and by gc);
    /// gc also spares blobs and links younger than this, so a push in progress keeps its blobs.
    pub upload_timeout: Duration,
    /// How long a bearer token from `/token` is valid.
    pub token_ttl: Duration,
    /// Base URL clients reach the server at (e.g. `https://registry.example.com`), used for the
    /// token realm in challenges; default: `http://` + the request's `Host`.
    pub public_url: Option<String>,
}

impl ServerConfig {
    /// Defaults: filesystem storage under `root`, anonymous, default limits, uploads abandoned
    /// after 24 hours, tokens valid for 15 minutes.
    pub fn new(root: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            root: root.into(),
            storage: StorageKind::Filesystem,
            meta: MetaKind::Sqlite,
            auth: AuthMode::Anonymous,
            limits: Limits::default(),
            upload_timeout: Duration::from_secs(24 * 3600),
            token_ttl: Duration::from_secs(900),
            public_url: None,
        }
    }
}
