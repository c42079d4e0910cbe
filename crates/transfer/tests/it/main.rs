//! Integration tests of `strata-transfer`: one test binary, a module per area.

#![allow(clippy::unwrap_used)]

mod registry_docker;
mod registry_strata;
mod skopeo_docker_registry;
