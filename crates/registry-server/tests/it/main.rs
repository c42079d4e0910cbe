//! Integration tests of `strata-registry-server`: one test binary, a module per area, helpers in `common`.

#![allow(clippy::unwrap_used)]

mod api;
mod auth;
mod common;
mod gc;
mod meta;
mod replicas;
mod s3;
mod skopeo;
