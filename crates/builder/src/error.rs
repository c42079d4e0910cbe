//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while planning or running a build, or loading a project.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Dockerfile (or a `.dockerignore`) could not be read, parsed or expanded; the
    /// message carries `file:line:col` when the place is known.
    #[error("{0}")]
    Dockerfile(#[from] strata_dockerfile::Error),

    /// A step failed; `location` is `file:line`, `instruction` the line as written.
    #[error("{location}: `{instruction}`: {source}")]
    Step {
        location: String,
        instruction: String,
        #[source]
        source: Box<Error>,
    },

    /// A `RUN` command exited non-zero or was killed.
    #[error(
        "{location}: `{instruction}` failed: {status}{}",
        if tail.is_empty() { String::new() } else { format!("\nlast lines of output:\n{tail}") }
    )]
    RunFailed {
        location: String,
        instruction: String,
        /// `exit code 2` or `killed by signal 9`.
        status: String,
        /// The exit code (128 + signal when killed).
        exit_code: i32,
        /// The last lines of output, newline separated.
        tail: String,
    },

    /// A base image (or `--from` image) is not in the local store.
    #[error("{location}: image `{image}` is not in the store\nhint: strata import / strata pull")]
    BaseNotFound { location: String, image: String },

    /// A base image (or `--from` image) missing from the store could not be pulled from the
    /// registry its name points at (`docker.io` for names without a host).
    #[error("image `{image}` is not in the store and pulling it from {registry} failed")]
    Pull {
        /// The reference pulled (`127.0.0.1:5000/org/base:1`, `debian:12@sha256:…`).
        image: String,
        /// The registry host asked.
        registry: String,
        #[source]
        source: Box<strata_transfer::Error>,
    },

    /// Something in the Dockerfile is valid syntax but cannot be built.
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },

    /// A usage error not tied to a Dockerfile line (unknown target, bad option).
    #[error("{0}")]
    Usage(String),

    /// strata.lock pins a base by digest and the store no longer has that image (gc removed
    /// it after its name moved), nor could it be pulled.
    #[error(
        "strata.lock pins `{image}` to {digest}, which is not in the store any more ({reason})\n\
         hint: `strata update` locks the image `{image}` names now; `strata pull` of \
         `{image}@{digest}` fetches the locked one"
    )]
    LockedBaseMissing {
        image: String,
        digest: String,
        reason: String,
    },

    /// Ctrl-C or SIGTERM: the build stopped between steps (a running RUN is killed and
    /// cleaned up first).
    #[error("interrupted")]
    Interrupted,

    /// A source of `COPY`/`ADD` does not exist (or is excluded by `.dockerignore`).
    #[error("source `{source_path}` not found in {origin}")]
    SourceNotFound { source_path: String, origin: String },

    /// A filesystem operation failed.
    #[error("{op} `{path}`: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The store refused or failed an operation.
    #[error(transparent)]
    Store(#[from] strata_store::Error),

    /// Writing, applying or unpacking a layer failed.
    #[error(transparent)]
    Layer(#[from] strata_rootfs::Error),

    /// The container runtime failed (not the command: see [`Error::RunFailed`]).
    #[error(transparent)]
    Runtime(#[from] strata_runtime::Error),

    /// An image model error (a config that does not parse, a bad reference).
    #[error(transparent)]
    Oci(#[from] strata_oci::Error),

    /// Downloading an `ADD` URL failed or its checksum did not match.
    #[error("ADD `{url}`: {message}")]
    Download { url: String, message: String },

    /// A cache entry could not be read or written as JSON.
    #[error("cache entry `{key}`: {message}")]
    Cache { key: String, message: String },

    /// The build cache in a registry (`--cache-from`, `--cache-to`) could not be read or
    /// written.
    #[error("build cache {reference}: {message}")]
    SharedCache { reference: String, message: String },

    /// `strata.toml` or `strata.lock` is invalid.
    #[error("{path}{}: {message}", line.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Project {
        path: PathBuf,
        /// 1-based line and column when known.
        line: Option<(usize, usize)>,
        message: String,
    },

    /// A step of another thread failed, so this stage could not start.
    #[error("stage `{stage}` not built: a stage it needs failed")]
    DependencyFailed { stage: String },
}

impl Error {
    /// Wraps `self` with the step's place, unless it already has one.
    pub(crate) fn at(self, location: &str, instruction: &str) -> Error {
        match self {
            e @ (Error::Step { .. }
            | Error::RunFailed { .. }
            | Error::BaseNotFound { .. }
            | Error::Invalid { .. }
            | Error::Dockerfile(_)) => e,
            other => Error::Step {
                location: location.to_string(),
                instruction: instruction.to_string(),
                source: Box::new(other),
            },
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `map_err` helper for I/O on a path.
pub(crate) fn io_err<P: Into<PathBuf>>(
    op: &'static str,
    path: P,
) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { op, path, source }
}
