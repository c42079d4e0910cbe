//! A client for OCI Distribution v1.1 / Docker Registry v2 registries: manifests (exact bytes,
//! verified), blobs (streamed, resumable), uploads (monolithic, chunked, resumable,
//! cross-repository mounts), tags, and auth (anonymous, Basic, Bearer tokens, Docker's
//! credentials).
//!
//! One [`Client`] talks to one registry; its methods are `async` (tokio). Every request retries
//! connection errors, 5xx and 429 with exponential backoff (bounded by
//! [`ClientOptions::max_attempts`]), and a 401 triggers the challenge flow once: Basic sends the
//! credentials, Bearer fetches a token for the request's scopes from the realm (cached per
//! scope set until it expires). Errors carry the registry, the operation (repository and
//! tag / digest) and the registry's own error JSON.
//!
//! Loopback registries (`localhost`, `127.0.0.1`, `[::1]`) are spoken to over plain HTTP, like
//! Docker's default insecure-registry rule; others over HTTPS unless
//! [`ClientOptions::insecure`].

// Tests may unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod challenge;
mod client;
mod credentials;
mod download;
mod error;
mod manifests;

pub use challenge::{Challenge, parse_challenges};
pub use client::{
    BlobData, BlobFetch, BlobPush, Client, ClientOptions, CredentialSource, DEFAULT_TIMEOUT, Mount,
    Progress, TIMEOUT_ENV, UploadSession, is_loopback, registry_base_url, timeout_from_env,
};
pub use credentials::{Credentials, DOCKER_HUB_AUTH_KEY, DockerConfig, auth_key};
pub use error::{Error, RegistryError, RegistryErrors, Result};
pub use manifests::{MANIFEST_ACCEPT, MAX_MANIFEST_SIZE, RemoteManifest, ResolvedImage};

/// `strata login`: check `username`/`password` against `registry`'s `/v2/` (through its token
/// service when it uses one) and, if accepted, save them in `config` (Docker's config file, or
/// the credential helper it names). `opts.credentials` is ignored.
pub async fn login(
    registry: &str,
    username: &str,
    password: &str,
    config: &DockerConfig,
    opts: ClientOptions,
) -> Result<()> {
    let opts = ClientOptions {
        credentials: CredentialSource::Explicit(Credentials::UserPassword {
            username: username.to_string(),
            password: password.to_string(),
        }),
        ..opts
    };
    let client = Client::new(registry, opts)?;
    client.ping().await?;
    config.store(registry, username, password)
}

/// [`login`] for callers without a tokio runtime.
pub fn login_blocking(
    registry: &str,
    username: &str,
    password: &str,
    config: &DockerConfig,
    opts: ClientOptions,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::InvalidRegistry {
            registry: registry.to_string(),
            reason: format!("cannot start the async runtime: {e}"),
        })?;
    rt.block_on(login(registry, username, password, config, opts))
}
