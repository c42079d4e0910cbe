//! The HTTP client: one [`Client`] per registry, with auth, retries and the distribution API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response, StatusCode};
use strata_oci::sync::MutexExt;
use strata_oci::{Digest, Reference};

use crate::challenge::{Challenge, parse_challenges};
use crate::credentials::{Credentials, DockerConfig};
use crate::error::{Error, RegistryErrors, Result};

/// The host Docker Hub's API lives on (`docker.io` is only its name).
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// A token without `expires_in` lasts this long (distribution's token spec).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Refresh tokens this long before they expire, so a request does not race the expiry.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);
/// How much of an error body we read to find the registry's error JSON.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Where credentials come from.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    /// Docker's config file (looked up only when the registry asks for credentials).
    DockerConfig(DockerConfig),
    /// These credentials.
    Explicit(Credentials),
    /// None: anonymous access only.
    Anonymous,
}

/// How a [`Client`] talks to its registry.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Plain HTTP even for a registry that is not on loopback (`--insecure`). Loopback
    /// registries (`localhost`, `127.0.0.0/8`, `::1`) use plain HTTP regardless, as Docker's
    /// default insecure-registry rule for them.
    pub insecure: bool,
    /// Where credentials come from; default: Docker's config ([`DockerConfig::from_env`]).
    pub credentials: CredentialSource,
    /// Tries per request on connection errors, 5xx and 429 (with exponential backoff).
    pub max_attempts: u32,
    /// First backoff delay; doubled per retry.
    pub backoff: Duration,
    /// Blobs larger than this are uploaded in chunks of [`ClientOptions::chunk_size`] (a broken
    /// chunked upload resumes at the last chunk the registry acknowledged).
    pub chunk_threshold: u64,
    /// Chunk size for chunked uploads (raised to the registry's `OCI-Chunk-Min-Length`).
    pub chunk_size: u64,
    /// `User-Agent` header.
    pub user_agent: String,
    /// How long to wait for a connection, for the answer to a request once it is sent, and for
    /// each next part of an answer's body: an idle timeout, so a large blob that keeps coming
    /// takes as long as it needs (and an upload's body counts as activity while it is being
    /// sent). A registry silent for this long is an [`Error::Timeout`], not retried. Default
    /// 30 s, or `STRATA_REGISTRY_TIMEOUT` seconds (see [`timeout_from_env`]).
    pub timeout: Duration,
}

/// The environment variable that sets [`ClientOptions::timeout`] in seconds.
pub const TIMEOUT_ENV: &str = "STRATA_REGISTRY_TIMEOUT";
/// [`ClientOptions::timeout`] without [`TIMEOUT_ENV`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// [`TIMEOUT_ENV`] as a duration: `Ok(None)` when unset, an error naming the variable when it
/// is not a positive number of seconds (`30`, `2.5`).
pub fn timeout_from_env() -> std::result::Result<Option<Duration>, String> {
    let Some(v) = std::env::var_os(TIMEOUT_ENV) else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    match v.trim().parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() && secs <= 86_400.0 => {
            Ok(Some(Duration::from_secs_f64(secs)))
        }
        _ => Err(format!(
            "{TIMEOUT_ENV}=`{v}`: expected a number of seconds greater than 0 (at most 86400)"
        )),
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: false,
            credentials: CredentialSource::DockerConfig(DockerConfig::from_env()),
            max_attempts: 4,
            backoff: Duration::from_millis(200),
            chunk_threshold: 1 << 30,
            chunk_size: 64 << 20,
            user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
            // A malformed value is reported by the CLI (`timeout_from_env`); here it falls back.
            timeout: timeout_from_env().ok().flatten().unwrap_or(DEFAULT_TIMEOUT),
        }
    }
}

/// Called with the number of bytes of one blob transferred so far.
pub type Progress = dyn Fn(u64) + Send + Sync;

/// The content of a blob to upload.
#[derive(Debug, Clone)]
pub enum BlobData {
    /// In memory.
    Bytes(bytes::Bytes),
    /// A file, read from the offset the upload needs (so an upload can resume).
    File(std::path::PathBuf),
}

/// An upload session the registry opened (`POST /v2/<name>/blobs/uploads/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSession {
    /// Absolute URL of the session (the registry's latest `Location`).
    pub location: String,
    /// Bytes the registry has acknowledged.
    pub offset: u64,
    /// The registry's `OCI-Chunk-Min-Length`: it wants chunks at least this large.
    pub chunk_min: Option<u64>,
}

/// What a cross-repository mount request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// The blob is now in the target repository (201).
    Mounted,
    /// The registry declined and opened an upload session instead (202).
    Upload(UploadSession),
}

/// What [`Client::push_blob`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it.
    Exists,
    /// Mounted from another repository.
    Mounted { from: String },
    /// Uploaded; `bytes_sent` counts what went over the wire (more than the size if a broken
    /// upload had to resend).
    Uploaded { bytes_sent: u64, resumed: u32 },
}

/// What [`Client::fetch_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobFetch {
    pub size: u64,
    /// Bytes received over the wire (including any the registry resent).
    pub bytes_received: u64,
    /// How many times a broken download was resumed.
    pub resumed: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scheme {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct AuthState {
    scheme: Option<Scheme>,
    /// Bearer tokens by their scope set (sorted, space-joined).
    tokens: HashMap<String, Token>,
    /// Credentials once looked up (`Some(None)`: looked up, there are none).
    credentials: Option<Option<Credentials>>,
}

/// A client for one registry. Cheap to share between tasks (`&Client` is `Send + Sync`).
#[derive(Debug)]
pub struct Client {
    pub(crate) registry: String,
    base: String,
    pub(crate) http: reqwest::Client,
    pub(crate) opts: ClientOptions,
    auth: Mutex<AuthState>,
}

/// The base URL of `registry`'s API: `http://` for loopback hosts or when `insecure`,
/// `https://` otherwise; Docker Hub (`docker.io`) is served by `registry-1.docker.io`. A
/// registry given with an explicit `http://` or `https://` keeps it.
pub fn registry_base_url(registry: &str, insecure: bool) -> Result<String> {
    let bad = |reason: &str| Error::InvalidRegistry {
        registry: registry.to_string(),
        reason: reason.to_string(),
    };
    let (explicit, host) = if let Some(h) = registry.strip_prefix("http://") {
        (Some("http"), h)
    } else if let Some(h) = registry.strip_prefix("https://") {
        (Some("https"), h)
    } else {
        (None, registry)
    };
    let host = host.trim_end_matches('/');
    if host.is_empty() {
        return Err(bad("it is empty"));
    }
    if host.contains(['/', '?', '#', '@', ' ']) {
        return Err(bad("a registry is a host with an optional port"));
    }
    let host = match host {
        "docker.io" | "index.docker.io" => DOCKER_HUB_API,
        h => h,
    };
    let scheme = explicit.unwrap_or(if insecure || is_loopback(host) {
        "http"
    } else {
        "https"
    });
    Ok(format!("{scheme}://{host}"))
}

/// Whether `host` (with optional port) is a loopback address or `localhost`.
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if host.matches(':').count() > 1 {
        host // a bare IPv6 address
    } else {
        host.split(':').next().unwrap_or(host)
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

pub(crate) fn at(repo: &str, reference: &str) -> String {
    if reference.contains(':') {
        format!("{repo}@{reference}")
    } else {
        format!("{repo}:{reference}")
    }
}

pub(crate) fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

pub(crate) fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

fn scope_key(scopes: &[String]) -> String {
    let mut s: Vec<&str> = scopes.iter().map(String::as_str).collect();
    s.sort_unstable();
    s.dedup();
    s.join(" ")
}

/// Percent-encode a query component (RFC 3986 unreserved characters stay).
pub(crate) fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub(crate) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Parse an upload `Range` header (`0-1023`, or `bytes=0-1023`) into the number of bytes the
/// registry has. `0-0` is ambiguous in docker distribution (empty or one byte); it is read as
/// empty so that at worst a byte is resent, which the registry then refuses and we restart.
fn parse_upload_range(v: &str) -> Option<u64> {
    let v = v.trim().trim_start_matches("bytes=");
    let (start, end) = v.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if start != 0 || end == 0 {
        return Some(0);
    }
    Some(end + 1)
}

fn is_transient_status(status: u16) -> bool {
    status == 429 || status == 408 || (500..600).contains(&status) && status != 501
}

fn is_transient(e: &Error) -> bool {
    match e {
        Error::Connection { .. } => true,
        // 416: the registry and we disagree about the offset; ask it and go on from there.
        Error::Status { status, .. } => is_transient_status(*status) || *status == 416,
        _ => false,
    }
}

impl Client {
    /// A client for `registry` (`docker.io`, `ghcr.io`, `127.0.0.1:5000`...).
    pub fn new(registry: &str, opts: ClientOptions) -> Result<Client> {
        let base = registry_base_url(registry, opts.insecure)?;
        let http = reqwest::Client::builder()
            .user_agent(opts.user_agent.clone())
            // The answer and its body are watched by `answer_within` and `chunk_within`: an idle
            // timeout that an upload's progress resets, which reqwest's `read_timeout` (one
            // timer from the send to the answer) cannot do.
            .connect_timeout(opts.timeout)
            .build()
            .map_err(|e| Error::InvalidRegistry {
                registry: registry.to_string(),
                reason: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(Client {
            registry: registry.to_string(),
            base,
            http,
            opts,
            auth: Mutex::new(AuthState::default()),
        })
    }

    /// A client for the registry `reference` names (a local name means Docker Hub).
    pub fn for_reference(reference: &Reference, opts: ClientOptions) -> Result<Client> {
        let remote = reference.to_remote();
        Client::new(remote.registry().unwrap_or("docker.io"), opts)
    }

    /// The registry this client talks to, as given.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The base URL requests go to (`https://ghcr.io`, `http://127.0.0.1:5000`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The options this client was made with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Make a `Location` header absolute.
    pub(crate) fn resolve_location(&self, loc: &str) -> String {
        if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else if loc.starts_with('/') {
            self.url(loc)
        } else {
            format!("{}/{loc}", self.base)
        }
    }

    // ---- auth --------------------------------------------------------------------------

    fn lock_auth(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // A panic while holding the lock cannot leave the cache inconsistent (plain inserts).
        self.auth.lock_ok()
    }

    fn credentials(&self) -> Result<Option<Credentials>> {
        if let Some(c) = &self.lock_auth().credentials {
            return Ok(c.clone());
        }
        let creds = match &self.opts.credentials {
            CredentialSource::Explicit(c) => Some(c.clone()),
            CredentialSource::Anonymous => None,
            CredentialSource::DockerConfig(cfg) => cfg.lookup(&self.registry)?,
        };
        self.lock_auth().credentials = Some(creds.clone());
        Ok(creds)
    }

    /// The `Authorization` header for a request needing `scopes`, fetching a token if needed.
    async fn authorization(&self, scopes: &[String]) -> Result<Option<HeaderValue>> {
        let scheme = self.lock_auth().scheme.clone();
        let value = match scheme {
            None => return Ok(None),
            Some(Scheme::Basic) => match self.credentials()? {
                Some(Credentials::UserPassword { username, password }) => {
                    format!("Basic {}", B64.encode(format!("{username}:{password}")))
                }
                _ => return Ok(None),
            },
            Some(Scheme::Bearer { realm, service }) => {
                let key = scope_key(scopes);
                let cached = self
                    .lock_auth()
                    .tokens
                    .get(&key)
                    .filter(|t| t.expires > Instant::now())
                    .map(|t| t.value.clone());
                let token = match cached {
                    Some(t) => t,
                    None => self.fetch_token(&realm, service.as_deref(), scopes).await?,
                };
                format!("Bearer {token}")
            }
        };
        HeaderValue::from_str(&value)
            .map(Some)
            .map_err(|_| Error::Auth {
                registry: self.registry.clone(),
                reason: "credentials or token contain characters not allowed in a header"
                    .to_string(),
            })
    }

    /// Learn from a 401's challenges. Returns whether a retry can succeed (we have something
    /// new to send).
    async fn handle_challenge(
        &self,
        headers: &HeaderMap,
        scopes: &[String],
        sent: Option<&HeaderValue>,
    ) -> Result<bool> {
        let challenges: Vec<Challenge> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        if let Some(b) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = b.param("realm").filter(|r| !r.is_empty()) else {
                return Err(Error::Auth {
                    registry: self.registry.clone(),
                    reason: "the Bearer challenge has no realm".to_string(),
                });
            };
            let service = b.param("service").map(str::to_string);
            let mut all_scopes = scopes.to_vec();
            if let Some(s) = b.param("scope") {
                // The registry may want more than we guessed (several scopes space-separated).
                all_scopes.extend(s.split(' ').filter(|s| !s.is_empty()).map(str::to_string));
            }
            {
                let mut st = self.lock_auth();
                st.scheme = Some(Scheme::Bearer {
                    realm: realm.to_string(),
                    service: service.clone(),
                });
                st.tokens.remove(&scope_key(scopes));
                st.tokens.remove(&scope_key(&all_scopes));
            }
            self.fetch_token(realm, service.as_deref(), &all_scopes)
                .await?;
            // Cache it also under the scopes the caller asks with, so the next request with
            // them finds it.
            let mut st = self.lock_auth();
            if let Some(t) = st.tokens.get(&scope_key(&all_scopes)).cloned() {
                st.tokens.insert(scope_key(scopes), t);
            }
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            self.lock_auth().scheme = Some(Scheme::Basic);
            let has_creds = matches!(self.credentials()?, Some(Credentials::UserPassword { .. }));
            // Retry only if this request did not carry them already (another task may have
            // switched to Basic meanwhile: what counts is what this request sent).
            let sent_basic = sent
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("Basic "));
            return Ok(has_creds && !sent_basic);
        }
        Ok(false)
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<String> {
        let creds = self.credentials()?;
        let auth_err = |reason: String| Error::Auth {
            registry: self.registry.clone(),
            reason,
        };
        let mut params: Vec<(String, String)> = Vec::new();
        if let Some(s) = service {
            params.push(("service".into(), s.into()));
        }
        let resp = match &creds {
            Some(Credentials::IdentityToken(refresh)) => {
                // OAuth2 refresh-token grant (distribution's oauth.md).
                params.push(("grant_type".into(), "refresh_token".into()));
                params.push(("refresh_token".into(), refresh.clone()));
                params.push(("client_id".into(), "strata".into()));
                if !scopes.is_empty() {
                    params.push(("scope".into(), scope_key(scopes)));
                }
                let body = params
                    .iter()
                    .map(|(k, v)| format!("{k}={}", encode_query(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                self.send_raw("POST token", true, None, || {
                    self.http
                        .post(realm)
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(body.clone())
                })
                .await?
            }
            other => {
                for s in scopes {
                    params.push(("scope".into(), s.clone()));
                }
                let query = params
                    .iter()
                    .map(|(k, v)| format!("{k}={}", encode_query(v)))
                    .collect::<Vec<_>>()
                    .join("&");
                let sep = if realm.contains('?') { '&' } else { '?' };
                let url = if query.is_empty() {
                    realm.to_string()
                } else {
                    format!("{realm}{sep}{query}")
                };
                self.send_raw("GET token", true, None, || {
                    let rb = self.http.get(&url);
                    match other {
                        Some(Credentials::UserPassword { username, password }) => {
                            rb.basic_auth(username, Some(password))
                        }
                        _ => rb,
                    }
                })
                .await?
            }
        };
        let status = resp.status().as_u16();
        if status == 401 || status == 403 {
            let errors = read_errors(resp, self.opts.timeout).await;
            return Err(Error::Unauthorized {
                registry: self.registry.clone(),
                what: format!("token for `{}`", scope_key(scopes)),
                errors,
            });
        }
        if !resp.status().is_success() {
            let errors = read_errors(resp, self.opts.timeout).await;
            return Err(Error::Status {
                registry: self.registry.clone(),
                what: format!("token from {realm}"),
                status,
                errors,
            });
        }
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let body = self
            .body_within(resp, "GET token", 1 << 20)
            .await
            .map_err(|e| auth_err(format!("reading the token answer: {e}")))?;
        let ans: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|e| auth_err(format!("token answer is not JSON: {e}")))?;
        let value = ans
            .token
            .filter(|t| !t.is_empty())
            .or(ans.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| {
                auth_err("token answer has neither `token` nor `access_token`".into())
            })?;
        let lifetime = ans
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
            .max(DEFAULT_TOKEN_LIFETIME);
        self.lock_auth().tokens.insert(
            scope_key(scopes),
            Token {
                value: value.clone(),
                expires: Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
            },
        );
        Ok(value)
    }

    // ---- sending -----------------------------------------------------------------------

    pub(crate) fn backoff(&self, attempt: u32, resp_headers: Option<&HeaderMap>) -> Duration {
        let retry_after = resp_headers
            .and_then(|h| header_str(h, "retry-after"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(30)));
        retry_after.unwrap_or_else(|| {
            self.opts
                .backoff
                .saturating_mul(1 << attempt.saturating_sub(1).min(6))
        })
    }

    /// Send without auth handling; retries transient failures when `idempotent`. `activity`, a
    /// counter of request body bytes sent, keeps the answer's timeout from running while the
    /// body still moves.
    async fn send_raw(
        &self,
        what: &str,
        idempotent: bool,
        activity: Option<&AtomicU64>,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let last = !idempotent || attempt >= self.opts.max_attempts.max(1);
            match self.answer_within(what, activity, build().send()).await? {
                // Silence for the whole timeout is not worth another one (or three).
                Err(source) if source.is_timeout() => {
                    return Err(self.timeout_error(what, "the answer to"));
                }
                Err(_) if !last => {
                    tokio::time::sleep(self.backoff(attempt, None)).await;
                }
                Err(source) => {
                    return Err(Error::Connection {
                        registry: self.registry.clone(),
                        what: what.to_string(),
                        source,
                    });
                }
                Ok(resp) if !last && is_transient_status(resp.status().as_u16()) => {
                    tokio::time::sleep(self.backoff(attempt, Some(resp.headers()))).await;
                }
                Ok(resp) => return Ok(resp),
            }
        }
    }

    /// Send with auth (challenge → credentials or token → one retry) and retries of transient
    /// failures when `idempotent`. Returns whatever status the registry answered, except that
    /// a 401 after authenticating becomes [`Error::Unauthorized`].
    pub(crate) async fn send(
        &self,
        what: &str,
        scopes: &[String],
        idempotent: bool,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        self.send_with(what, scopes, idempotent, None, build).await
    }

    /// [`Client::send`] for a request whose body counts the bytes it sent into `activity`.
    pub(crate) async fn send_with(
        &self,
        what: &str,
        scopes: &[String],
        idempotent: bool,
        activity: Option<&AtomicU64>,
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response> {
        let mut reauthed = false;
        loop {
            let auth = self.authorization(scopes).await?;
            let resp = self
                .send_raw(what, idempotent, activity, || {
                    let rb = build();
                    match &auth {
                        Some(a) => rb.header(header::AUTHORIZATION, a.clone()),
                        None => rb,
                    }
                })
                .await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if !reauthed
                && self
                    .handle_challenge(resp.headers(), scopes, auth.as_ref())
                    .await?
            {
                reauthed = true;
                continue;
            }
            let errors = read_errors(resp, self.opts.timeout).await;
            return Err(Error::Unauthorized {
                registry: self.registry.clone(),
                what: what.to_string(),
                errors,
            });
        }
    }

    /// `fut` (sending a request), failing with [`Error::Timeout`] when neither an answer nor
    /// progress of the request body (`activity`) came for [`ClientOptions::timeout`].
    async fn answer_within<T>(
        &self,
        what: &str,
        activity: Option<&AtomicU64>,
        fut: impl std::future::Future<Output = T>,
    ) -> Result<T> {
        let limit = self.opts.timeout;
        let tick = (limit / 4).max(Duration::from_millis(10));
        let mut fut = std::pin::pin!(fut);
        let mut seen = activity.map(|a| a.load(Ordering::Relaxed));
        let mut idle_since = Instant::now();
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                () = tokio::time::sleep(tick.min(limit.saturating_sub(idle_since.elapsed()))) => {
                    let now = activity.map(|a| a.load(Ordering::Relaxed));
                    if now != seen {
                        seen = now;
                        idle_since = Instant::now();
                    } else if idle_since.elapsed() >= limit {
                        return Err(self.timeout_error(what, "the answer to"));
                    }
                }
            }
        }
    }

    /// The next part of `resp`'s body, waiting at most [`ClientOptions::timeout`] for it.
    pub(crate) async fn chunk_within(
        &self,
        resp: &mut Response,
        what: &str,
    ) -> Result<Option<bytes::Bytes>> {
        match tokio::time::timeout(self.opts.timeout, resp.chunk()).await {
            Err(_) => Err(self.timeout_error(what, "more of the answer to")),
            Ok(Err(source)) if source.is_timeout() => {
                Err(self.timeout_error(what, "more of the answer to"))
            }
            Ok(Err(source)) => Err(Error::Connection {
                registry: self.registry.clone(),
                what: what.to_string(),
                source,
            }),
            Ok(Ok(c)) => Ok(c),
        }
    }

    /// All of `resp`'s body, at most `limit` bytes, each part within the timeout.
    async fn body_within(&self, resp: Response, what: &str, limit: usize) -> Result<Vec<u8>> {
        let mut resp = resp;
        let mut body = Vec::new();
        while let Some(c) = self.chunk_within(&mut resp, what).await? {
            body.extend_from_slice(&c);
            if body.len() > limit {
                return Err(self.protocol(what, format!("answer larger than {limit} bytes")));
            }
        }
        Ok(body)
    }

    pub(crate) fn timeout_error(&self, what: &str, waiting: &'static str) -> Error {
        Error::Timeout {
            registry: self.registry.clone(),
            what: what.to_string(),
            waiting,
            after: self.opts.timeout,
        }
    }

    /// The error for an unexpected answer, with the registry's error JSON.
    pub(crate) async fn error_for(&self, resp: Response, what: &str) -> Error {
        let status = resp.status().as_u16();
        let errors = read_errors(resp, self.opts.timeout).await;
        let registry = self.registry.clone();
        let what = what.to_string();
        match status {
            401 => Error::Unauthorized {
                registry,
                what,
                errors,
            },
            403 => Error::Denied {
                registry,
                what,
                errors,
            },
            404 => Error::NotFound {
                registry,
                what,
                errors,
            },
            _ => Error::Status {
                registry,
                what,
                status,
                errors,
            },
        }
    }

    pub(crate) fn protocol(&self, what: &str, reason: impl Into<String>) -> Error {
        Error::Protocol {
            registry: self.registry.clone(),
            what: what.to_string(),
            reason: reason.into(),
        }
    }

    // ---- API -----------------------------------------------------------------------------

    /// `GET /v2/`: check that the registry speaks the API and that our credentials (if it asks
    /// for any) are accepted.
    pub async fn ping(&self) -> Result<()> {
        let what = "GET /v2/";
        let url = self.url("/v2/");
        let resp = self.send(what, &[], true, || self.http.get(&url)).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.error_for(resp, what).await)
        }
    }

    /// All tags of `repo`, following `Link` pagination.
    pub async fn tags(&self, repo: &str) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let what = format!("GET tags of {repo}");
        let scopes = [pull_scope(repo)];
        let mut url = self.url(&format!("/v2/{repo}/tags/list?n=1000"));
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let resp = self
                .send(&what, &scopes, true, || self.http.get(&url))
                .await?;
            if !resp.status().is_success() {
                return Err(self.error_for(resp, &what).await);
            }
            let next = header_str(resp.headers(), "link").and_then(parse_next_link);
            let body = self.body_within(resp, &what, 64 << 20).await?;
            let list: TagList = serde_json::from_slice(&body)
                .map_err(|e| self.protocol(&what, format!("bad tag list JSON: {e}")))?;
            out.extend(list.tags.unwrap_or_default());
            match next {
                Some(n) => url = self.resolve_location(&n),
                None => return Ok(out),
            }
        }
        Err(self.protocol(&what, "too many pages"))
    }

    /// `HEAD` a blob: its size if `repo` has it, `None` if not.
    pub async fn head_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let what = format!("HEAD blob {repo}@{digest}");
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let resp = self
            .send(&what, &[pull_scope(repo)], true, || self.http.head(&url))
            .await?;
        match resp.status().as_u16() {
            200 => Ok(Some(resp.content_length().unwrap_or(0))),
            404 => Ok(None),
            _ => Err(self.error_for(resp, &what).await),
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/`: open an upload session.
    pub async fn start_upload(&self, repo: &str) -> Result<UploadSession> {
        let what = format!("start upload to {repo}");
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"));
        let resp = self
            .send(&what, &[push_scope(repo)], true, || {
                self.http.post(&url).header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        if resp.status().as_u16() != 202 {
            return Err(self.error_for(resp, &what).await);
        }
        self.session_from(resp.headers(), &what, 0)
    }

    fn session_from(&self, headers: &HeaderMap, what: &str, offset: u64) -> Result<UploadSession> {
        let loc = header_str(headers, "location")
            .ok_or_else(|| self.protocol(what, "202 without a Location header"))?;
        Ok(UploadSession {
            location: self.resolve_location(loc),
            offset: header_str(headers, "range")
                .and_then(parse_upload_range)
                .unwrap_or(offset),
            chunk_min: header_str(headers, "oci-chunk-min-length").and_then(|v| v.parse().ok()),
        })
    }

    /// Ask the registry to mount `digest` from repository `from` into `repo`.
    pub async fn mount_blob(&self, repo: &str, digest: &Digest, from: &str) -> Result<Mount> {
        let what = format!("mount {digest} from {from} into {repo}");
        let url = self.url(&format!(
            "/v2/{repo}/blobs/uploads/?mount={}&from={}",
            encode_query(&digest.to_string()),
            encode_query(from)
        ));
        let scopes = [push_scope(repo), pull_scope(from)];
        let resp = self
            .send(&what, &scopes, true, || {
                self.http.post(&url).header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        match resp.status().as_u16() {
            201 => Ok(Mount::Mounted),
            202 => Ok(Mount::Upload(self.session_from(
                resp.headers(),
                &what,
                0,
            )?)),
            _ => Err(self.error_for(resp, &what).await),
        }
    }

    /// Where an upload session stands (`GET <location>`): the registry's offset and location.
    pub async fn upload_status(
        &self,
        repo: &str,
        session: &UploadSession,
    ) -> Result<UploadSession> {
        let what = format!("upload status in {repo}");
        let resp = self
            .send(&what, &[push_scope(repo)], true, || {
                self.http.get(&session.location)
            })
            .await?;
        if resp.status().as_u16() != 204 {
            return Err(self.error_for(resp, &what).await);
        }
        let mut s = self.session_from(resp.headers(), &what, 0)?;
        if header_str(resp.headers(), "range").is_none() {
            s.offset = 0;
        }
        s.chunk_min = s.chunk_min.or(session.chunk_min);
        Ok(s)
    }

    /// Cancel an upload session (best effort: errors are ignored).
    pub async fn cancel_upload(&self, repo: &str, session: &UploadSession) {
        let what = format!("cancel upload in {repo}");
        let _ = self
            .send(&what, &[push_scope(repo)], false, || {
                self.http.delete(&session.location)
            })
            .await;
    }

    /// Push one blob: nothing if `repo` has it, else a mount from the first of `mount_from`
    /// that the registry accepts, else an upload (into the session a refused mount opened).
    pub async fn push_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        data: &BlobData,
        mount_from: &[String],
        progress: Option<&Arc<Progress>>,
    ) -> Result<BlobPush> {
        if self.head_blob(repo, digest).await?.is_some() {
            if let Some(p) = progress {
                p(size);
            }
            return Ok(BlobPush::Exists);
        }
        let mut session = None;
        for from in mount_from.iter().filter(|f| f.as_str() != repo) {
            match self.mount_blob(repo, digest, from).await {
                Ok(Mount::Mounted) => {
                    if let Some(p) = progress {
                        p(size);
                    }
                    return Ok(BlobPush::Mounted { from: from.clone() });
                }
                Ok(Mount::Upload(s)) => {
                    if let Some(old) = session.replace(s) {
                        self.cancel_upload(repo, &old).await;
                    }
                }
                // A refused mount (no access to `from`...) is not fatal: upload instead.
                Err(Error::Denied { .. } | Error::NotFound { .. } | Error::Unauthorized { .. }) => {
                }
                Err(e) => return Err(e),
            }
        }
        let (bytes_sent, resumed) = self
            .upload_blob(repo, digest, size, data, session, progress)
            .await?;
        Ok(BlobPush::Uploaded {
            bytes_sent,
            resumed,
        })
    }

    /// Upload a blob: monolithic (`PUT` with the content) unless the registry wants chunks or
    /// the blob is larger than [`ClientOptions::chunk_threshold`]. A broken upload asks the
    /// registry for its offset and goes on from there; if the session is gone it starts over.
    /// Returns the bytes sent and how many times it resumed.
    pub async fn upload_blob(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        data: &BlobData,
        session: Option<UploadSession>,
        progress: Option<&Arc<Progress>>,
    ) -> Result<(u64, u32)> {
        let mut session = match session {
            Some(s) => s,
            None => self.start_upload(repo).await?,
        };
        let sent = Arc::new(AtomicU64::new(0));
        let mut failures = 0u32;
        loop {
            match self
                .upload_from(repo, digest, size, data, &mut session, &sent, progress)
                .await
            {
                Ok(()) => return Ok((sent.load(Ordering::Relaxed), failures)),
                Err(e) if is_transient(&e) && failures + 1 < self.opts.max_attempts.max(1) => {
                    failures += 1;
                    tokio::time::sleep(self.backoff(failures, None)).await;
                    session = match self.upload_status(repo, &session).await {
                        Ok(s) if s.offset <= size => s,
                        // The session is gone or confused (docker distribution cannot resume
                        // after a broken request): start a new one.
                        _ => self.start_upload(repo).await?,
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_from(
        &self,
        repo: &str,
        digest: &Digest,
        size: u64,
        data: &BlobData,
        session: &mut UploadSession,
        sent: &Arc<AtomicU64>,
        progress: Option<&Arc<Progress>>,
    ) -> Result<()> {
        let what = format!("upload {digest} to {repo}");
        let chunked = session.chunk_min.is_some() || size > self.opts.chunk_threshold;
        if let Some(p) = progress {
            p(session.offset);
        }
        if !chunked && session.offset == 0 {
            // Monolithic: one PUT with everything.
            return self
                .put_upload(repo, digest, session, data, 0, size, sent, progress)
                .await;
        }
        let chunk = if chunked {
            self.opts
                .chunk_size
                .max(session.chunk_min.unwrap_or(0))
                .max(1)
        } else {
            u64::MAX
        };
        while session.offset < size {
            let start = session.offset;
            let end = start.saturating_add(chunk).min(size);
            let body = self.body(data, start, end, sent, progress);
            let url = session.location.clone();
            let resp = self
                .send_with(
                    &what,
                    &[push_scope(repo)],
                    false,
                    Some(sent.as_ref()),
                    || {
                        self.http
                            .patch(&url)
                            .header(header::CONTENT_TYPE, "application/octet-stream")
                            .header("Content-Range", format!("{start}-{}", end - 1))
                            .header(header::CONTENT_LENGTH, end - start)
                            .body(body())
                    },
                )
                .await?;
            if resp.status().as_u16() != 202 {
                return Err(self.error_for(resp, &what).await);
            }
            let next = self.session_from(resp.headers(), &what, end)?;
            if next.offset <= start {
                return Err(self.protocol(
                    &what,
                    format!(
                        "the registry acknowledged {} bytes after a chunk ending at {end}",
                        next.offset
                    ),
                ));
            }
            session.location = next.location;
            session.offset = next.offset;
        }
        self.put_upload(repo, digest, session, data, size, size, sent, progress)
            .await
    }

    /// The closing `PUT ?digest=`, carrying `data[start..end]` (empty after chunks).
    #[allow(clippy::too_many_arguments)]
    async fn put_upload(
        &self,
        repo: &str,
        digest: &Digest,
        session: &UploadSession,
        data: &BlobData,
        start: u64,
        end: u64,
        sent: &Arc<AtomicU64>,
        progress: Option<&Arc<Progress>>,
    ) -> Result<()> {
        let what = format!("upload {digest} to {repo}");
        let sep = if session.location.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{sep}digest={}",
            session.location,
            encode_query(&digest.to_string())
        );
        let body = self.body(data, start, end, sent, progress);
        let resp = self
            .send_with(
                &what,
                &[push_scope(repo)],
                false,
                Some(sent.as_ref()),
                || {
                    self.http
                        .put(&url)
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, end - start)
                        .body(body())
                },
            )
            .await?;
        if resp.status().as_u16() != 201 {
            return Err(self.error_for(resp, &what).await);
        }
        if let Some(d) = header_str(resp.headers(), "docker-content-digest")
            && let Ok(got) = d.parse::<Digest>()
            && got != *digest
        {
            return Err(Error::DigestMismatch {
                what: format!("{}/{repo}: uploaded blob", self.registry),
                expected: digest.clone(),
                actual: got,
            });
        }
        Ok(())
    }

    /// A factory of request bodies for `data[start..end]` that count what they send and report
    /// the position reached to `progress`.
    fn body(
        &self,
        data: &BlobData,
        start: u64,
        end: u64,
        sent: &Arc<AtomicU64>,
        progress: Option<&Arc<Progress>>,
    ) -> impl Fn() -> reqwest::Body + use<> {
        let data = data.clone();
        let sent = Arc::clone(sent);
        let progress = progress.cloned();
        move || {
            stream_body(
                data.clone(),
                start,
                end,
                Arc::clone(&sent),
                progress.clone(),
            )
        }
    }
}

fn stream_body(
    data: BlobData,
    start: u64,
    end: u64,
    counter: Arc<AtomicU64>,
    progress: Option<Arc<Progress>>,
) -> reqwest::Body {
    const CHUNK: u64 = 256 * 1024;
    if start >= end {
        return reqwest::Body::from(Vec::new());
    }
    struct St {
        data: BlobData,
        file: Option<tokio::fs::File>,
        pos: u64,
        end: u64,
        counter: Arc<AtomicU64>,
        progress: Option<Arc<Progress>>,
    }
    let st = St {
        data,
        file: None,
        pos: start,
        end,
        counter,
        progress,
    };
    let stream = futures_util::stream::try_unfold(st, |mut st| async move {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        if st.pos >= st.end {
            return Ok::<_, std::io::Error>(None);
        }
        let want = (st.end - st.pos).min(CHUNK);
        let chunk = match &st.data {
            BlobData::Bytes(b) => {
                let s = usize::try_from(st.pos).unwrap_or(usize::MAX);
                let e = usize::try_from(st.pos + want).unwrap_or(usize::MAX);
                if e > b.len() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "blob data shorter than its size",
                    ));
                }
                b.slice(s..e)
            }
            BlobData::File(path) => {
                if st.file.is_none() {
                    let mut f = tokio::fs::File::open(path).await?;
                    f.seek(std::io::SeekFrom::Start(st.pos)).await?;
                    st.file = Some(f);
                }
                let f = st
                    .file
                    .as_mut()
                    .ok_or_else(|| std::io::Error::other("file handle vanished"))?;
                let mut buf = vec![0u8; want as usize];
                let mut got = 0;
                while got < buf.len() {
                    let n = f.read(&mut buf[got..]).await?;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("`{}` is shorter than the blob size", path.display()),
                        ));
                    }
                    got += n;
                }
                bytes::Bytes::from(buf)
            }
        };
        st.pos += chunk.len() as u64;
        st.counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if let Some(p) = &st.progress {
            p(st.pos);
        }
        Ok(Some((chunk, st)))
    });
    reqwest::Body::wrap_stream(stream)
}

async fn read_errors(resp: Response, timeout: Duration) -> RegistryErrors {
    let mut resp = resp;
    let mut body = Vec::new();
    // A body that stalls leaves what came so far (the status says enough).
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout(timeout, resp.chunk()).await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ERROR_BODY {
            break;
        }
    }
    RegistryErrors::from_body(&body)
}

/// `<url>; rel="next"` from a `Link` header.
fn parse_next_link(v: &str) -> Option<String> {
    for part in v.split(',') {
        let part = part.trim();
        if part.contains("rel=\"next\"") || part.contains("rel=next") {
            let s = part.find('<')?;
            let e = part.find('>')?;
            return Some(part[s + 1..e].to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_loopback_is_plain_http_others_https() {
        let url = |r: &str, insecure| registry_base_url(r, insecure).unwrap();
        assert_eq!(url("127.0.0.1:5000", false), "http://127.0.0.1:5000");
        assert_eq!(url("localhost:5000", false), "http://localhost:5000");
        assert_eq!(url("localhost", false), "http://localhost");
        assert_eq!(url("[::1]:5000", false), "http://[::1]:5000");
        assert_eq!(url("127.1.2.3", false), "http://127.1.2.3");
        assert_eq!(url("ghcr.io", false), "https://ghcr.io");
        assert_eq!(url("10.0.0.5:5000", false), "https://10.0.0.5:5000");
        assert_eq!(url("10.0.0.5:5000", true), "http://10.0.0.5:5000");
        assert_eq!(url("docker.io", false), "https://registry-1.docker.io");
        assert_eq!(
            url("index.docker.io", false),
            "https://registry-1.docker.io"
        );
        assert_eq!(url("http://reg.example:80", false), "http://reg.example:80");
        assert_eq!(
            url("https://localhost:5000/", false),
            "https://localhost:5000"
        );
        for bad in ["", "reg/x", "a b", "u@host"] {
            assert!(registry_base_url(bad, false).is_err(), "{bad:?}");
        }
        assert!(!is_loopback("localhost.example.com"));
        assert!(!is_loopback("128.0.0.1"));
    }

    #[test]
    fn references_map_to_api_urls() {
        let opts = ClientOptions {
            credentials: CredentialSource::Anonymous,
            ..ClientOptions::default()
        };
        let r = Reference::parse("debian:12").unwrap();
        let c = Client::for_reference(&r, opts.clone()).unwrap();
        assert_eq!(c.registry(), "docker.io");
        assert_eq!(
            c.url(&format!(
                "/v2/{}/manifests/{}",
                r.repository(),
                r.tag().unwrap()
            )),
            "https://registry-1.docker.io/v2/library/debian/manifests/12"
        );
        let r = Reference::parse("127.0.0.1:5000/org/app:1").unwrap();
        let c = Client::for_reference(&r, opts).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:5000");
        assert_eq!(
            c.resolve_location("/v2/org/app/blobs/uploads/x?_state=1"),
            "http://127.0.0.1:5000/v2/org/app/blobs/uploads/x?_state=1"
        );
        assert_eq!(
            c.resolve_location("https://s3.example/up?x=1"),
            "https://s3.example/up?x=1"
        );
    }

    #[test]
    fn upload_ranges_links_and_query_encoding() {
        assert_eq!(parse_upload_range("0-1023"), Some(1024));
        assert_eq!(parse_upload_range("bytes=0-99"), Some(100));
        assert_eq!(parse_upload_range("0-0"), Some(0));
        assert_eq!(parse_upload_range("junk"), None);
        assert_eq!(
            parse_next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(parse_next_link(r#"<x>; rel="prev""#), None);
        assert_eq!(
            encode_query("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(scope_key(&["b".into(), "a".into(), "b".into()]), "a b");
    }
}
