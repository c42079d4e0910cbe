//! Integration tests of `strata-rootfs`: one test binary, a module per area, helpers in `common`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod changes;
mod common;
mod hostile;
mod roundtrip;
mod snapshots;
