//! The crate's one error type.

use std::io;
use std::path::PathBuf;

use strata_oci::Digest;

/// Everything that can go wrong while writing, reading, applying or caching layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation on a host path failed (walking a source tree, snapshot cache...).
    #[error("{op} `{path}`: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Writing the layer to the caller's sink (or compressing it) failed.
    #[error("writing layer stream: {0}")]
    Sink(#[source] io::Error),

    /// A source file changed size while it was being written into the layer.
    #[error("`{path}` changed while it was written into the layer (expected {expected} bytes)")]
    FileChanged { path: PathBuf, expected: u64 },

    /// A change list given to the writer is not usable.
    #[error("change `{path}`: {reason}")]
    InvalidChange { path: PathBuf, reason: &'static str },

    /// Reading or decompressing the layer stream failed.
    #[error("reading layer stream at offset {offset}: {source}")]
    Stream {
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// The stream ended inside an entry, or before the end-of-archive marker.
    #[error("layer stream truncated at offset {offset} (in {entry})")]
    Truncated { entry: String, offset: u64 },

    /// A tar header is malformed (checksum, number fields...).
    #[error("bad tar header at offset {offset}: {reason}")]
    BadHeader { offset: u64, reason: String },

    /// An entry was refused for safety or because it cannot be represented.
    #[error("refusing tar entry `{entry}` at offset {offset}: {reason}")]
    Refused {
        entry: String,
        offset: u64,
        reason: Refusal,
    },

    /// A filesystem operation while applying one entry failed.
    #[error("applying tar entry `{entry}` at offset {offset}: {op}: {source}")]
    Apply {
        entry: String,
        offset: u64,
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// The uncompressed layer does not hash to the diff_id the image config promised.
    #[error("layer {blob}: diff_id is {actual}, expected {expected}")]
    DiffIdMismatch {
        blob: Digest,
        expected: Digest,
        actual: Digest,
    },

    /// A path cannot be used in an overlay mount option.
    #[error("`{path}` cannot be used as an overlay lowerdir: it contains `{ch}`")]
    OverlayPath { path: PathBuf, ch: char },

    /// A layer descriptor has a media type we cannot unpack.
    #[error("layer {digest}: unsupported media type `{media_type}`")]
    UnsupportedMediaType { digest: Digest, media_type: String },

    /// The caller's blob opener failed.
    #[error("opening layer blob {digest}: {source}")]
    OpenBlob {
        digest: Digest,
        #[source]
        source: io::Error,
    },
}

/// Why an entry of a layer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("a {0} cannot replace the root directory")]
    RootNotDir(&'static str),
    #[error("whiteout names no entry (`{0}`)")]
    BadWhiteout(String),
    #[error("hard link target `{0}` does not exist in the target")]
    HardlinkTargetMissing(String),
    #[error("hard link target `{0}` is a directory")]
    HardlinkToDir(String),
    #[error(
        "hard link target `{0}` is a file of a lower layer: a hard link must name a file of its own layer"
    )]
    HardlinkToLowerLayer(String),
    #[error("hard link target is the root directory")]
    HardlinkToRoot,
    #[error("path component `{0}` is not a directory")]
    NotADirectory(String),
    #[error("too many levels of symbolic links (more than {0})")]
    SymlinkLoop(u32),
    #[error("{kind} header of {size} bytes exceeds the {limit}-byte limit")]
    HeaderTooLarge {
        kind: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("unsupported entry type `{0}`")]
    UnsupportedType(char),
    #[error("two {0} headers describe one entry")]
    DuplicateExtension(&'static str),
    #[error("path contains a NUL byte")]
    NulInPath,
    #[error("path is longer than {limit} bytes (PATH_MAX)")]
    PathTooLong { limit: usize },
    #[error("{what} {value} does not fit in 32 bits")]
    IdOutOfRange { what: &'static str, value: u64 },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
