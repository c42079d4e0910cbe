//! The crate's one error type.

use std::io;
use std::net::SocketAddr;

use crate::health::CheckFailure;

/// What went wrong in `strata-deploy`, with the address or operation it concerns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
