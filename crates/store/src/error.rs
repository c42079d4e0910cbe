//! The store's one error type.

use std::path::PathBuf;

use strata_oci::Digest;

/// Everything that can go wrong in the store, each with the path, digest or ref it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("cannot {action} `{}`: {source}", path.display())]
    Io {
        /// What we were doing, as a verb phrase ("create", "read", "rename into place"...).
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The directory has an `oci-layout` file we do not understand.
    #[error("`{}` is not an OCI image layout we can use: {reason}", path.display())]
    BadLayout { path: PathBuf, reason: String },

    /// `index.json` cannot be parsed.
    #[error("`{}` is corrupt: {source}", path.display())]
    BadIndexJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// Content did not hash to the digest it was announced with. Nothing was stored.
    #[error("digest mismatch: expected {expected}, content hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },

    /// Content did not have the size it was announced with. Nothing was stored.
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    /// A blob on disk no longer matches its name (disk corruption or tampering).
    #[error("blob {digest} at `{}` is corrupt: {reason}", path.display())]
    CorruptBlob {
        digest: Digest,
        path: PathBuf,
        reason: String,
    },

    /// The store has no blob with this digest.
    #[error("blob {digest} is not in the store")]
    BlobNotFound { digest: Digest },

    /// A manifest names a blob the store does not have.
    #[error("manifest {manifest} references {digest}, which is not in the store")]
    MissingReferencedBlob { manifest: Digest, digest: Digest },

    /// A blob that should be JSON (manifest, index, config) is not what we expected.
    #[error("blob {digest} is not a valid {what}: {reason}")]
    BadJson {
        digest: Digest,
        what: &'static str,
        reason: String,
    },

    /// Serializing our own JSON failed (only possible with non-string map keys, i.e. a bug).
    #[error("cannot serialize {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// An image model value could not be serialized (a config made here).
    #[error(transparent)]
    Oci(#[from] strata_oci::Error),

    /// No ref with this name.
    #[error("no image named `{name}` in the store")]
    RefNotFound { name: String },

    /// A short digest that more than one image's digest starts with.
    #[error("`{prefix}` is the start of {count} images' digests: give more of it")]
    AmbiguousDigest { prefix: String, count: usize },

    /// A ref name that the OCI layout's `ref.name` grammar does not allow.
    #[error("invalid image name `{name}`: {reason}")]
    InvalidRefName { name: String, reason: String },

    /// A ref points at something that is not a manifest or index.
    #[error("`{name}` points at {digest} of type `{media_type}`, not an image manifest or index")]
    NotAnImage {
        name: String,
        digest: Digest,
        media_type: String,
    },

    /// An index has no manifest for the wanted platform.
    #[error("`{name}` ({digest}) has no image for platform {platform}")]
    NoMatchingPlatform {
        name: String,
        digest: Digest,
        platform: String,
    },

    /// Indexes nested deeper than we follow (a loop, or a hostile image).
    #[error("`{name}`: indexes nested more than {depth} deep")]
    IndexTooDeep { name: String, depth: usize },

    /// The metadata database failed.
    #[error("metadata database `{}`: {source}", path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// The metadata database was written by a newer strata.
    #[error(
        "metadata database `{}` has schema version {found}, this strata knows up to {supported}; upgrade strata",
        path.display()
    )]
    DbTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// GC was asked for while this same `Store` holds a write session, which would deadlock.
    #[error("cannot collect garbage while this process holds {sessions} write session(s) on `{}`", root.display())]
    GcDuringWriteSession { root: PathBuf, sessions: usize },

    /// A reachable manifest could not be read, so GC cannot know what it keeps; nothing was removed.
    #[error("gc stopped, nothing removed: cannot walk reachable blob {digest}: {reason}")]
    GcUnreadable { digest: Digest, reason: String },

    /// No store location was given and none could be derived from the environment.
    #[error(
        "no store location: pass `--store DIR` or set `STRATA_STORE` (neither `XDG_DATA_HOME` nor `HOME` is set)"
    )]
    NoDefaultLocation,
}

/// The store's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach an action and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            action,
            path: path.into(),
            source,
        })
    }
}
