use crate::Digest;

/// Everything that can be wrong with image metadata or with an image's blobs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid digest `{digest}`: {reason}")]
    InvalidDigest { digest: String, reason: String },

    #[error("invalid image reference `{reference}`: {reason}")]
    InvalidReference { reference: String, reason: String },

    #[error("invalid repository name `{name}`: {reason}")]
    InvalidRepositoryName { name: String, reason: String },

    #[error("invalid tag `{tag}`: {reason}")]
    InvalidTag { tag: String, reason: String },

    /// JSON that does not parse as the document it claims to be.
    #[error("invalid {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },

    /// A value that cannot be written as JSON (e.g. a map with non-string keys).
    #[error("cannot serialize as JSON: {0}")]
    Serialize(#[source] serde_json::Error),

    #[error(
        "{what} is a Docker schema 1 manifest (`{media_type}`), which is deprecated and not supported; \
         hint: pull it with a newer registry or re-push it with a current Docker"
    )]
    Schema1 { what: String, media_type: String },

    #[error("{what} has unsupported media type `{media_type}`")]
    UnsupportedMediaType { what: String, media_type: String },

    #[error("expected {expected}, found a document of type `{media_type}`")]
    WrongKind {
        expected: &'static str,
        media_type: String,
    },

    #[error("{what} has schemaVersion {found}, expected 2")]
    SchemaVersion { what: String, found: u32 },

    #[error("{what}: descriptor says media type `{descriptor}` but the content says `{content}`")]
    MediaTypeMismatch {
        what: String,
        descriptor: String,
        content: String,
    },

    #[error("{what} ({digest}) is missing")]
    MissingBlob { what: String, digest: Digest },

    #[error("cannot read {what} ({digest}): {source}")]
    BlobRead {
        what: String,
        digest: Digest,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} ({digest}) has size {actual}, descriptor says {expected}")]
    SizeMismatch {
        what: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },

    #[error("{what} has digest {actual}, descriptor says {expected}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },

    #[error("{what} ({digest}) is larger than {limit} bytes, refusing to read it into memory")]
    TooLarge {
        what: String,
        digest: Digest,
        limit: u64,
    },

    #[error("cannot decompress {what} ({digest}) as {compression:?}: {source}")]
    Decompress {
        what: String,
        digest: Digest,
        compression: crate::Compression,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{what} has uncompressed digest {actual}, but the config's rootfs.diff_ids[{index}] is {expected}"
    )]
    DiffIdMismatch {
        what: String,
        index: usize,
        expected: Digest,
        actual: Digest,
    },

    #[error(
        "config {config} lists {diff_ids} diff_ids but manifest {manifest} has {layers} layers"
    )]
    DiffIdCount {
        config: Digest,
        manifest: Digest,
        diff_ids: usize,
        layers: usize,
    },

    #[error("index nesting deeper than {limit} levels at {digest}")]
    TooDeep { digest: Digest, limit: usize },
}
