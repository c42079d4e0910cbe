//! The build engine: turns a Dockerfile (or a `strata.toml` project of several) into images
//! in the store, running `RUN` in runc, writing `COPY`/`ADD` layers directly, and skipping
//! every step whose inputs have not changed.
//!
//! - [`plan()`]: Dockerfile → [`Plan`] of stages of typed [`Step`]s (the solver never sees
//!   Dockerfile syntax).
//! - [`build()`]: one Dockerfile, like `docker build`, with [`BuildOptions`]; returns a
//!   [`BuildOutcome`] and reports [`Event`]s to a [`Progress`].
//! - [`Project`]: `strata.toml` images built in dependency order ([`Project::build`]), with
//!   `strata.lock` pinning external bases ([`Project::update`]).
//! - Bases: a `FROM` / `COPY --from` / `--mount from=` image is looked up in the store first
//!   (a local image always wins); one the store lacks is pulled from the registry its name
//!   points at (`127.0.0.1:5000/org/base:1`; `debian:12` → Docker Hub), by the digest
//!   strata.lock holds for it when there is one ([`StoreResolver::with_pulls`]).
//!
//! Reproducibility: configs and history use `created = $SOURCE_DATE_EPOCH`, else the Unix
//! epoch (0); files written by COPY/ADD get that mtime in the layer (so mtimes are not part of
//! the cache key); RUN layers keep the mtimes the command left, clamped to
//! `$SOURCE_DATE_EPOCH` when it is set.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod autorebase;
pub mod cache;
pub mod config;
mod context;
mod copy;
mod engine;
mod error;
pub mod executor;
mod glob;
mod options;
mod par;
pub mod plan;
mod progress;
mod project;
pub mod rebase;
mod resolve;
mod run;
pub mod shared_cache;
mod source;
mod statcache;
mod view;

pub use config::{ConfigChange, apply_changes, apply_instruction};
pub use engine::{
    BuildOptions, BuildOutcome, StoreResolver, build, build_epoch, descriptor_for_digest,
};
pub use error::{Error, Result};
pub use plan::{NetworkMode, Plan, PlanOptions, Step, StepKind, plan};
pub use progress::{CollectProgress, Event, NoProgress, Progress, StepRef};
pub use project::{
    CacheSection, ImageSpec, LockFile, LockUpdate, Project, ProjectBuild, ProjectOptions,
};
