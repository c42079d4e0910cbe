//! End-to-end tests of the `strata` binary, with the real peer tools (skopeo, umoci) where
//! installed. One integration binary; helpers in `common`.

#![allow(clippy::unwrap_used)]

mod architecture;
mod cache;
mod common;
mod deploy;
mod dev;
mod docker;
mod faults;
mod hosts;
mod images;
mod interop;
mod kubernetes;
mod readme;
mod rebase;
mod registry_cli;
mod swarm;
mod ui;
