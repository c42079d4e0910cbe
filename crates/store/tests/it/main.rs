//! Integration tests of `strata-store`: one test binary, a module per area, helpers in `common`.

#![allow(clippy::unwrap_used)]

mod blobs;
mod common;
mod crash;
mod gc;
mod image;
mod interop;
mod location;
mod meta;
mod refs;
