//! Integration tests of `strata-build`: one test binary, a module per area, helpers in `common`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod buildah_diff;
mod buildkit_diff;
mod common;
mod context;
mod copy;
mod from_pull;
mod project;
mod run;
