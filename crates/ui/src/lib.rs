//! The web dashboard: apps, releases, machines, builds and the registry's images, live.
//!
//! Server-rendered HTML (maud) from the store's deploy state, its build journals and a
//! registry; each live part of a page is a fragment the browser replaces when the server
//! sends a newer one over server-sent events (`/ui/live/…`), with a few lines of hand-written
//! JS and no build step. Buttons are forms posting to the server with the session's CSRF token.
//!
//! ```text
//! /ui/                      apps (release, health, address, machines)
//! /ui/apps/NAME             releases with Roll back, machines; a roll back's output, live
//! /ui/machines[/ID]         machines; one machine with its log tail and stop/start/restart
//! /ui/builds                the newest builds' images and steps (cached/ran/failed), live
//! /ui/registry              repositories, tags, digests, sizes, pins, pull references
//! /ui/login                 a registry token, when the server requires one
//! ```
//!
//! `strata ui` serves every page; `strata registry serve` serves the Registry page only.

// Tests may unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod builds;
mod jobs;
pub mod journal;
mod pages;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use strata_registry_server::{RegistryView, ServerConfig};

/// Errors starting the dashboard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the registry at {root} for the dashboard")]
    Registry {
        root: PathBuf,
        #[source]
        source: strata_registry_server::Error,
    },
    #[error(
        "the dashboard needs registry tokens to check on {addr}, but there is no registry at {root}\n\
         hint: create an org and a token with `strata registry org create NAME` and \
         `strata registry token create --org NAME`, or listen on 127.0.0.1"
    )]
    NoRegistryForTokens { addr: String, root: PathBuf },
}

/// Which pages a server shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// Apps, machines, builds and the registry (`strata ui`).
    All,
    /// The registry's page only (`strata registry serve`).
    RegistryOnly,
}

/// What the dashboard shows and how it acts.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// The store whose apps, machines and builds are shown.
    pub store_root: PathBuf,
    /// The `strata` binary: roll backs run `strata deploy`, machine buttons wake its agent.
    pub exe: PathBuf,
    /// strata.toml, whose apps a roll back deploys.
    pub project: PathBuf,
    /// The registry to show (and whose tokens sign in), if any.
    pub registry: Option<ServerConfig>,
    /// `host:port` a pull reference names.
    pub registry_host: String,
    /// Every page needs a registry token of an org (and shows only its repositories).
    pub require_token: bool,
    pub pages: Pages,
}

pub(crate) struct AppState {
    pub config: UiConfig,
    pub registry: Option<RegistryView>,
    pub sessions: session::Sessions,
    pub jobs: jobs::Jobs,
}

/// The dashboard's routes (all under `/ui`, and `/` sends there).
pub async fn router(config: UiConfig) -> Result<Router, Error> {
    let registry = match &config.registry {
        Some(rc)
            if rc.root.exists()
                || !matches!(rc.storage, strata_registry_server::StorageKind::Filesystem) =>
        {
            Some(
                RegistryView::open(rc)
                    .await
                    .map_err(|source| Error::Registry {
                        root: rc.root.clone(),
                        source,
                    })?,
            )
        }
        _ => None,
    };
    if config.require_token && registry.is_none() {
        return Err(Error::NoRegistryForTokens {
            addr: String::new(),
            root: config
                .registry
                .as_ref()
                .map_or_else(|| config.store_root.join("registry"), |r| r.root.clone()),
        });
    }
    let state = Arc::new(AppState {
        config,
        registry,
        sessions: session::Sessions::default(),
        jobs: jobs::Jobs::default(),
    });
    Ok(pages::routes(state))
}

/// Serves the dashboard on `listener` until `shutdown` completes.
pub async fn serve(
    config: UiConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let app = router(config).await.map_err(|e| match e {
        Error::NoRegistryForTokens { root, .. } => Error::NoRegistryForTokens { addr, root },
        e => e,
    })?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
