//! Integration tests of `strata-deploy`: one test binary, a module per area.

#![allow(clippy::unwrap_used)]

mod health;
mod proxy;
