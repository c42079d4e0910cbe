//! The HTTP API: OCI distribution spec v1.1 routes and Docker's `/token` endpoint.

use std::ops::Range;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    EXPECT, HOST, LINK, LOCATION, RANGE, TRANSFER_ENCODING, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use serde_json::json;
use strata_oci::{Algorithm, Descriptor, Digest, ManifestOrIndex, media_type};

use crate::auth::{Action, Auth, Credential, Refusal, SERVICE, authorize};
use crate::config::Limits;
use crate::error::{ApiError, Code};
use crate::registry::{AppendEnd, Registry, Session, subject_of};

mod blobs;
mod direct;
mod listings;
mod manifests;
mod token;
mod uploads;

use blobs::*;
pub(crate) use direct::{Next, Timeouts, serve_blobs};
use listings::*;
use manifests::*;
use token::*;
use uploads::*;

type ApiResult = Result<Response, ApiError>;

pub(crate) struct AppState {
    pub registry: Arc<Registry>,
    /// `None` in anonymous mode.
    pub auth: Option<Arc<Auth>>,
    pub limits: Limits,
    pub public_url: Option<String>,
}

const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const DOCKER_UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
const UPLOAD_SESSION_ID: HeaderName = HeaderName::from_static("blob-upload-session-id");
const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
const OCI_TAG: HeaderName = HeaderName::from_static("oci-tag");
const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");

/// Upper bound on `n` for tag and catalog pages; larger requests get this many and a `Link`.
const MAX_PAGE: usize = 10_000;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2", any(v2_root))
        .route("/v2/", any(v2_root))
        .route("/v2/{*rest}", any(v2))
        .route("/token", get(token))
        .layer(axum::middleware::map_response(add_version_header))
        .with_state(state)
}

async fn add_version_header(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    resp
}

/// A route under `/v2/`, with the repository name split off (names may contain `/`, so the
/// suffix is matched from the right).
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Catalog,
    Tags(String),
    Manifest(String, String),
    Blob(String, String),
    Uploads(String),
    Upload(String, String),
    Referrers(String, String),
}

/// Match decoded path segments (a `%2F` inside a segment stays inside it, so it can only make a
/// name or digest invalid, never move the route).
fn parse_route(segs: &[String]) -> Option<Route> {
    if segs.len() == 1 && segs[0] == "_catalog" {
        return Some(Route::Catalog);
    }
    let n = segs.len();
    let name = |k: usize| segs[..n - k].join("/");
    if n >= 3 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        return Some(if segs[n - 1].is_empty() {
            Route::Uploads(name(3))
        } else {
            Route::Upload(name(3), segs[n - 1].to_string())
        });
    }
    if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        return Some(Route::Uploads(name(2)));
    }
    if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        return Some(Route::Tags(name(2)));
    }
    if n >= 3 {
        let last = segs[n - 1].to_string();
        match segs[n - 2].as_str() {
            "blobs" => return Some(Route::Blob(name(2), last)),
            "manifests" => return Some(Route::Manifest(name(2), last)),
            "referrers" => return Some(Route::Referrers(name(2), last)),
            _ => {}
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hexval(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Query parameters in order, repeated keys kept.
fn query(uri: &Uri) -> Vec<(String, String)> {
    uri.query()
        .and_then(|q| serde_urlencoded::from_str::<Vec<(String, String)>>(q).ok())
        .unwrap_or_default()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn header_str<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

fn set(r: &mut Response, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

impl AppState {
    fn realm(&self, headers: &HeaderMap) -> String {
        match &self.public_url {
            Some(u) => format!("{}/token", u.trim_end_matches('/')),
            None => format!(
                "http://{}/token",
                header_str(headers, &HOST).unwrap_or("localhost")
            ),
        }
    }

    fn challenge(&self, headers: &HeaderMap, scope: Option<(&str, Action)>) -> ApiError {
        let mut value = format!(
            r#"Bearer realm="{}",service="{SERVICE}""#,
            self.realm(headers)
        );
        if let Some((repo, action)) = scope {
            let actions = match action {
                Action::Pull => "pull",
                Action::Push => "pull,push",
            };
            value.push_str(&format!(r#",scope="repository:{repo}:{actions}""#));
        }
        ApiError::code(Code::Unauthorized, "").header(WWW_AUTHENTICATE, &value)
    }

    /// Check credentials and the access rule for `action` on `repo` (or just credentials when
    /// `repo` is `None`). Anonymous mode lets everything through.
    async fn gate(
        &self,
        headers: &HeaderMap,
        repo: Option<&str>,
        action: Action,
    ) -> Result<Option<Credential>, ApiError> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let cred = match auth.authenticate(headers).await? {
            Ok(c) => c,
            Err(()) => return Err(self.challenge(headers, repo.map(|r| (r, action)))),
        };
        match repo {
            None if cred.is_none() => Err(self.challenge(headers, None)),
            None => Ok(cred),
            Some(repo) => match authorize(cred.as_ref(), repo, action) {
                Ok(()) => Ok(cred),
                Err(Refusal::Unauthorized) => Err(self.challenge(headers, Some((repo, action)))),
                Err(Refusal::Denied) => Err(ApiError::code(
                    Code::Denied,
                    format!("access to repository `{repo}` is denied"),
                )),
            },
        }
    }
}

fn check_name(name: &str) -> Result<(), ApiError> {
    strata_oci::validate_repository_name(name).map_err(|e| {
        ApiError::code(Code::NameInvalid, e.to_string()).with_detail(json!({ "name": name }))
    })
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>().map_err(|e| {
        ApiError::code(Code::DigestInvalid, e.to_string()).with_detail(json!({ "digest": s }))
    })
}

async fn v2_root(State(st): State<Arc<AppState>>, method: Method, headers: HeaderMap) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return method_not_allowed();
    }
    match st.gate(&headers, None, Action::Pull).await {
        Ok(_) => {
            let mut r = axum::Json(json!({})).into_response();
            *r.status_mut() = StatusCode::OK;
            r
        }
        Err(e) => e.into_response(),
    }
}

fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::Unsupported,
        "method not allowed here",
    )
    .into_response()
}

async fn v2(
    State(st): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path().strip_prefix("/v2/").unwrap_or_default();
    let segs: Vec<String> = path.split('/').map(percent_decode).collect();
    let Some(route) = parse_route(&segs) else {
        return ApiError::new(StatusCode::NOT_FOUND, Code::NameUnknown, "no such endpoint")
            .into_response();
    };
    let q = query(&uri);
    // Handlers that read the body take it; one left here was never read.
    let mut body = Some(body);
    let res = match (&method, route) {
        (&Method::GET, Route::Catalog) => catalog(&st, &headers, &q).await,
        (_, Route::Catalog) => Ok(method_not_allowed()),
        (m, Route::Tags(name)) if m == Method::GET => tags(&st, &headers, &name, &q).await,
        (m, Route::Blob(name, d)) if m == Method::GET || m == Method::HEAD => {
            get_blob(&st, &headers, &name, &d, m == Method::HEAD).await
        }
        (&Method::DELETE, Route::Blob(name, d)) => delete_blob(&st, &headers, &name, &d).await,
        (&Method::POST, Route::Uploads(name)) => {
            start_upload(&st, &headers, &name, &q, &mut body).await
        }
        (&Method::PATCH, Route::Upload(name, id)) => {
            patch_upload(&st, &headers, &name, &id, &mut body).await
        }
        (&Method::PUT, Route::Upload(name, id)) => {
            put_upload(&st, &headers, &name, &id, &q, &mut body).await
        }
        (&Method::GET, Route::Upload(name, id)) => upload_status(&st, &headers, &name, &id).await,
        (&Method::DELETE, Route::Upload(name, id)) => {
            cancel_upload(&st, &headers, &name, &id).await
        }
        (m, Route::Manifest(name, r)) if m == Method::GET || m == Method::HEAD => {
            get_manifest(&st, &headers, &name, &r, m == Method::HEAD).await
        }
        (&Method::PUT, Route::Manifest(name, r)) => {
            put_manifest(&st, &headers, &name, &r, &q, &mut body).await
        }
        (&Method::DELETE, Route::Manifest(name, r)) => {
            delete_manifest(&st, &headers, &name, &r).await
        }
        (&Method::GET, Route::Referrers(name, d)) => referrers(&st, &headers, &name, &d, &q).await,
        _ => Ok(method_not_allowed()),
    };
    let mut resp = res.unwrap_or_else(IntoResponse::into_response);
    if has_body(&headers) {
        let keep_alive = match body {
            // Answered without reading the body (a refused or out-of-order chunk): read a small
            // one to its end so the connection stays usable for the client's next request.
            Some(body) => !expects_continue(&headers) && drain(body, &headers).await,
            // Read, but refused: the body may have been cut short (too large, idle, broken).
            None => !resp.status().is_client_error() && !resp.status().is_server_error(),
        };
        if !keep_alive {
            // The rest of the body is still on the wire: say so, rather than have the client's
            // next request on this connection meet a closed socket.
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
    }
    resp
}

/// A request body of at most this many bytes left unread by a refusal is read and dropped, so
/// the connection can serve the next request; a larger one closes the connection.
const DRAIN_MAX: u64 = 4 << 20;
/// How long draining waits for the next bytes of such a body.
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING) || content_length(headers).is_some_and(|n| n > 0)
}

fn expects_continue(headers: &HeaderMap) -> bool {
    header_str(headers, &EXPECT).is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// Read `body` to its end when it is at most [`DRAIN_MAX`] bytes and keeps coming; `false`
/// when it is larger, stalls or breaks (then the connection must close).
async fn drain(body: Body, headers: &HeaderMap) -> bool {
    use futures_util::StreamExt;
    if content_length(headers).is_some_and(|n| n > DRAIN_MAX) {
        return false;
    }
    let mut stream = body.into_data_stream();
    let mut read = 0u64;
    loop {
        match tokio::time::timeout(DRAIN_IDLE, stream.next()).await {
            Ok(None) => return true,
            Ok(Some(Ok(chunk))) => {
                read += chunk.len() as u64;
                if read > DRAIN_MAX {
                    return false;
                }
            }
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_split_names_from_the_right() {
        let parse_route =
            |p: &str| parse_route(&p.split('/').map(str::to_string).collect::<Vec<_>>());
        assert_eq!(
            parse_route("org/blobs/manifests/latest"),
            Some(Route::Manifest("org/blobs".into(), "latest".into()))
        );
        assert_eq!(
            parse_route("a/b/blobs/uploads/"),
            Some(Route::Uploads("a/b".into()))
        );
        assert_eq!(
            parse_route("a/b/blobs/uploads/xyz"),
            Some(Route::Upload("a/b".into(), "xyz".into()))
        );
        assert_eq!(
            parse_route("a/uploads/blobs/sha256:00"),
            Some(Route::Blob("a/uploads".into(), "sha256:00".into()))
        );
        assert_eq!(parse_route("a/tags/list"), Some(Route::Tags("a".into())));
        assert_eq!(parse_route("_catalog"), Some(Route::Catalog));
        assert_eq!(parse_route("a/b"), None);
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Ok(Some(0..5)));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some(5..10)));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some(7..10)));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some(8..10)));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=5-4"), 10), Err(()));
        assert_eq!(parse_range(Some("items=0-1"), 10), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Ok(None));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("sha256%3Aab"), "sha256:ab");
        assert_eq!(percent_decode("%2e%2e"), "..");
        assert_eq!(percent_decode("a%"), "a%");
    }
}
