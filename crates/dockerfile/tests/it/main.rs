//! Integration tests of `strata-dockerfile`: one test binary, a module per area.

#![allow(clippy::unwrap_used)]

mod golden;
mod no_panic;
mod scoping;
