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

mod auth;
mod upload;

use auth::AuthState;
pub use upload::{BlobData, BlobPush, Mount, UploadSession};

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

/// What [`Client::fetch_blob`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobFetch {
    pub size: u64,
    /// Bytes received over the wire (including any the registry resent).
    pub bytes_received: u64,
    /// How many times a broken download was resumed.
    pub resumed: u32,
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
    use super::auth::scope_key;
    use super::upload::parse_upload_range;
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
