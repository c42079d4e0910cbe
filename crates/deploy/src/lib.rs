//! Apps, releases and the host agent: deploy images as machines, health checks, the proxy.
//!
//! [`state`] keeps machines, releases and routes in the store's SQLite DB; [`host`] turns an
//! image into a machine and a machine into the runtime's spec; [`agent`] is the per-store
//! supervisor that makes the DB true (starts, restarts, stops machines, owns host ports via
//! [`proxy`]); [`deploy`] makes a release (new machines → [`health`] → switch → drain old);
//! [`machines`] are the single-machine operations (start, stop, destroy, logs) the CLI
//! asks for; [`app`] reads `[app.NAME]` from strata.toml. [`kubernetes`] and [`swarm`] deploy
//! an app into an orchestrator instead: Kubernetes objects, a Docker Swarm service.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod app;
pub mod deploy;
pub mod health;
pub mod host;
pub mod kubernetes;
pub mod live;
pub mod machines;
pub mod pipeline;
pub mod proxy;
pub mod rollout;
pub mod state;
pub mod swarm;

mod error;

pub use error::{Error, Result};
