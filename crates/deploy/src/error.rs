//! The crate's one error type.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::health::CheckFailure;

/// What went wrong in `strata-deploy`, with the address or operation it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Ctrl-C or SIGTERM while waiting: what the command made is being undone.
    #[error("interrupted")]
    Interrupted,
    /// The proxy could not listen on the address it was given.
    #[error("proxy: cannot listen on {addr}: {source}")]
    Bind {
        /// The address we tried to bind.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A tokio runtime for a blocking helper could not be built.
    #[error("cannot start an async runtime for {what}: {source}")]
    Runtime {
        /// What the runtime was for.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A health check did not pass.
    #[error(transparent)]
    Unhealthy(#[from] CheckFailure),
    /// strata.toml or a command-line value is not what it must be.
    #[error("{0}")]
    Config(String),
    /// The state database failed.
    #[error("state database {}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A file operation failed.
    #[error("{op} `{}`: {source}", path.display())]
    Io {
        /// What we were doing.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An image of the store could not be read or pinned.
    #[error("image `{image}`: {source}")]
    Image {
        /// The reference.
        image: String,
        /// The store's error.
        source: strata_store::Error,
    },
    /// No such machine.
    #[error("no machine `{0}` (see `strata machine list`)")]
    UnknownMachine(String),
    /// The agent could not be started, reached or stopped.
    #[error("agent: {0}")]
    Agent(String),
    /// A machine failed to start or to become healthy.
    #[error("machine {id}: {reason}")]
    Machine {
        /// Its id.
        id: String,
        /// What happened, with its last log lines.
        reason: String,
    },
    /// A release did not go live; the previous one (if any) still serves.
    #[error("release v{version} of {app} failed: {reason}")]
    ReleaseFailed {
        /// The app.
        app: String,
        /// The release number.
        version: u32,
        /// Why, and which release still serves.
        reason: String,
    },
    /// An orchestrator (Kubernetes, Docker Swarm) refused or did not finish a deploy.
    #[error("{app}: {reason}")]
    Orchestrator {
        /// The app.
        app: String,
        /// What happened, and what still serves.
        reason: String,
    },
    /// What the caller did for a deploy (a build, a pull, a push) failed.
    #[error("{what}")]
    External {
        /// What was tried.
        what: String,
        /// Its error, whole.
        source: crate::pipeline::External,
    },
    /// An image config could not be read.
    #[error(transparent)]
    Oci(#[from] strata_oci::Error),
    /// runc or the machine runtime failed.
    #[error(transparent)]
    Machines(#[from] strata_runtime::Error),
    /// Unpacking the image's layers failed.
    #[error(transparent)]
    Rootfs(#[from] strata_rootfs::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
