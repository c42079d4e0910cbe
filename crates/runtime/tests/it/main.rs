//! Integration tests of `strata-runtime`: one test binary, a module per area.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod machines;
mod run;
