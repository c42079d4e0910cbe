//! Hosts over SSH: images shipped to and from a server through the user's OpenSSH client,
//! with strata itself at the other end (`strata serve --stdio`) and nothing else installed.
//!
//! One `have` round trip tells which blobs of an image the host lacks; only those move, each
//! verified on arrival and committed atomically into the host's store, and a blob cut short by
//! a dropped connection or a killed process continues from what arrived. See docs/hosts.md.

mod client;
mod proto;
mod serve;

pub use client::{
    ConnectOptions, DEFAULT_REMOTE_STRATA, FetchReport, HostSession, ImageClosure, Notice,
    RelayTarget, SSH_COMMAND_ENV, ShipReport, SshHost, current_exe,
};
pub use proto::{BlobRef, MAX_FRAME, Missing, PROTOCOL, Reply, Request};
pub use serve::{OnTag, ServeOptions, serve};
