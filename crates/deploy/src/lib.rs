//! Apps, releases and the host agent: deploy images as machines, health checks, the proxy.

pub mod health;
pub mod proxy;

mod error;

pub use error::{Error, Result};
