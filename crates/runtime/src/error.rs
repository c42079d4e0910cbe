//! The crate's one error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while preparing, running or cleaning up a container.
///
/// A process that runs and exits non-zero (or is killed) is not an error: that is a
/// [`crate::RunResult`]. These variants are about the runtime itself failing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The process was asked to stop (Ctrl-C, SIGTERM) while the container ran; it was
    /// killed and everything set up for it removed.
    #[error("interrupted: container `{id}` was stopped")]
    Interrupted { id: String },
    /// No runc binary was found.
    #[error(
        "runc not found (looked at {looked_at}); hint: apt-get install runc, or set $STRATA_RUNTIME"
    )]
    RuncNotFound { looked_at: String },

    /// The run description cannot be turned into a bundle (bad id, relative path...).
    #[error("container `{id}`: invalid run spec: {reason}")]
    InvalidSpec { id: String, reason: String },

    /// A filesystem operation on a host path failed.
    #[error("container `{id}`: {op} `{path}`: {source}")]
    Io {
        id: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Mounting the overlay root filesystem failed.
    #[error("container `{id}`: mounting overlay on `{target}` (lowerdir={lowerdir}): {source}")]
    Mount {
        id: String,
        target: PathBuf,
        lowerdir: String,
        #[source]
        source: io::Error,
    },

    /// The lower directories cannot be written as an overlay `lowerdir=` option.
    #[error("container `{id}`: {source}")]
    Rootfs {
        id: String,
        #[source]
        source: strata_rootfs::Error,
    },

    /// runc could not be started at all.
    #[error("container `{id}`: starting `{command}`: {source}")]
    Spawn {
        id: String,
        command: String,
        #[source]
        source: io::Error,
    },

    /// runc itself failed (it could not create or start the container, or a management
    /// command such as `delete` or `kill` failed); `stderr` holds runc's own error text.
    #[error("container `{id}`: runc failed: `{command}` ({status}): {stderr}")]
    Runc {
        id: String,
        command: String,
        status: String,
        stderr: String,
    },

    /// Setting up or tearing down a machine's network failed; `stderr` is iproute2's message.
    #[error("machine `{id}`: network: `{command}` ({status}): {stderr}")]
    Network {
        id: String,
        command: String,
        status: String,
        stderr: String,
    },

    /// No init binary to run as a machine's PID 1.
    #[error(
        "no init for machines: `{looked_at}` is not an executable file; hint: apt-get install tini (it ships /usr/bin/tini-static), or set $STRATA_INIT to a static init"
    )]
    InitNotFound { looked_at: PathBuf },

    /// A machine spec is invalid, or the machine is in a state that does not allow the
    /// operation (start while running, exec while stopped...).
    #[error("machine `{id}`: {reason}")]
    Machine { id: String, reason: String },

    /// A process-wide system call failed.
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// A Docker `USER` string could not be resolved against the image's passwd/group files.
    #[error("user `{user}`: {reason}")]
    User { user: String, reason: String },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
