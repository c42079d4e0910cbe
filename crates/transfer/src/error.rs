//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while moving images between the store and elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] strata_store::Error),

    #[error(transparent)]
    Oci(#[from] strata_oci::Error),

    /// A layer stream could not be read or written.
    #[error("layer {what}: {source}")]
    Layer {
        what: String,
        #[source]
        source: strata_rootfs::Error,
    },

    #[error("{op} `{path}`: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// An archive is not what its format says it must be.
    #[error("archive `{archive}`: {reason}")]
    Archive { archive: PathBuf, reason: String },

    /// An image in the store cannot be written out as asked.
    #[error("image `{name}`: {reason}")]
    Image { name: String, reason: String },

    /// The registry refused or failed a request.
    #[error("registry request for `{reference}` failed: {source}")]
    Registry {
        reference: String,
        #[source]
        source: Box<strata_registry::Error>,
    },

    /// A host over SSH could not be reached, refused, or failed.
    #[error("host `{host}`: {reason}")]
    Host { host: String, reason: String },

    /// An image name given by the user is not a valid reference.
    #[error("invalid image name `{name}`: {source}")]
    Name {
        name: String,
        #[source]
        source: strata_oci::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
