//! Integration tests of `strata-registry`: one test binary, a module per area.

#![allow(clippy::unwrap_used)]

mod bearer_flow;
mod timeouts;
mod upload_resume;
