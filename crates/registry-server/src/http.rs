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

// ---- blobs ----

/// `Range: bytes=a-b | a- | -n` against `size`: `Ok(None)` to send everything (no header, or a
/// multi-range we choose to ignore), `Err(())` when unsatisfiable.
fn parse_range(h: Option<&str>, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(h) = h else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Err(());
    };
    if spec.contains(',') {
        return Ok(None); // RFC 9110 lets a server ignore a multi-range request
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || size == 0 {
            return Err(());
        }
        size.saturating_sub(n)..size
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end = if b.is_empty() {
            size
        } else {
            let e: u64 = b.parse().map_err(|_| ())?;
            if e < start {
                return Err(());
            }
            e.saturating_add(1).min(size)
        };
        if start >= size {
            return Err(());
        }
        start..end
    };
    Ok(Some(range))
}

async fn get_blob(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    d: &str,
    head: bool,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Pull).await?;
    let digest = parse_digest(d)?;
    let Some(size) = st.registry.repo_blob_size(name, &digest).await? else {
        return Err(ApiError::code(Code::BlobUnknown, "").with_detail(json!({ "digest": d })));
    };
    let range = match parse_range(header_str(headers, &RANGE), size) {
        Ok(r) => r,
        Err(()) => {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::BlobUnknown,
                "requested range not satisfiable",
            )
            .header(CONTENT_RANGE, &format!("bytes */{size}")));
        }
    };
    let (status, r) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r),
        None => (StatusCode::OK, 0..size),
    };
    let len = r.end - r.start;
    let mut resp = if head {
        empty(status)
    } else {
        let stream = st.registry.blob_stream(&digest, r.clone()).await?;
        let mut resp = Response::new(Body::from_stream(stream));
        *resp.status_mut() = status;
        resp
    };
    set(&mut resp, CONTENT_LENGTH, &len.to_string());
    set(&mut resp, CONTENT_TYPE, "application/octet-stream");
    set(&mut resp, DOCKER_CONTENT_DIGEST, &digest.to_string());
    set(&mut resp, ETAG, &format!("\"{digest}\""));
    set(&mut resp, ACCEPT_RANGES, "bytes");
    set(&mut resp, CACHE_CONTROL, "max-age=31536000");
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            &mut resp,
            CONTENT_RANGE,
            &format!("bytes {}-{}/{size}", r.start, r.end - 1),
        );
    }
    Ok(resp)
}

async fn delete_blob(st: &AppState, headers: &HeaderMap, name: &str, d: &str) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let digest = parse_digest(d)?;
    if st.registry.unlink_blob(name, &digest).await? {
        Ok(empty(StatusCode::ACCEPTED))
    } else {
        Err(ApiError::code(Code::BlobUnknown, "").with_detail(json!({ "digest": d })))
    }
}

// ---- uploads ----

fn upload_location(name: &str, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// The `Range` header of an upload: inclusive, and `0-0` for an empty one (as Docker's registry).
fn upload_range(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

fn upload_response(status: StatusCode, name: &str, s: &Session) -> Response {
    let mut r = empty(status);
    set(&mut r, LOCATION, &upload_location(name, &s.id));
    set(&mut r, RANGE, &upload_range(s.offset));
    set(&mut r, DOCKER_UPLOAD_UUID, &s.id);
    set(&mut r, UPLOAD_SESSION_ID, &s.id);
    set(&mut r, CONTENT_LENGTH, "0");
    r
}

fn blob_created(name: &str, digest: &Digest) -> Response {
    let mut r = empty(StatusCode::CREATED);
    set(&mut r, LOCATION, &format!("/v2/{name}/blobs/{digest}"));
    set(&mut r, DOCKER_CONTENT_DIGEST, &digest.to_string());
    set(&mut r, CONTENT_LENGTH, "0");
    r
}

fn range_error(name: &str, s: &Session, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        Code::BlobUploadInvalid,
        why,
    )
    .header(LOCATION, &upload_location(name, &s.id))
    .header(RANGE, &upload_range(s.offset))
    .header(UPLOAD_SESSION_ID, &s.id)
    .header(DOCKER_UPLOAD_UUID, &s.id)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, &CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// Check `Content-Range: <start>-<end>` against the session; the expected chunk length.
fn check_content_range(
    headers: &HeaderMap,
    name: &str,
    s: &Session,
) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(CONTENT_RANGE) else {
        return Ok(None);
    };
    let v = v.to_str().unwrap_or_default().trim();
    let v = v.strip_prefix("bytes ").unwrap_or(v);
    let v = v.split('/').next().unwrap_or_default();
    let parsed = v
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)));
    let Some((start, end)) = parsed.filter(|(a, b)| a <= b) else {
        return Err(range_error(name, s, "invalid Content-Range"));
    };
    if start != s.offset {
        return Err(range_error(
            name,
            s,
            &format!("chunk starts at {start}, the upload is at {}", s.offset),
        ));
    }
    let len = end - start + 1;
    if let Some(cl) = content_length(headers)
        && cl != len
    {
        return Err(range_error(
            name,
            s,
            "Content-Range and Content-Length disagree",
        ));
    }
    Ok(Some(len))
}

/// Append `body` to the session, mapping how it ended to an error when it did not complete.
async fn receive(
    st: &AppState,
    name: &str,
    s: &mut Session,
    body: &mut Option<Body>,
    expect: Option<u64>,
) -> Result<(), ApiError> {
    let before = s.offset;
    let end = st
        .registry
        .append(
            s,
            body.take().unwrap_or_default().into_data_stream(),
            st.limits.max_blob_bytes,
            st.limits.body_idle_timeout,
        )
        .await?;
    match end {
        AppendEnd::Complete => {}
        AppendEnd::TooLarge => {
            st.registry.discard(s).await;
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::SizeInvalid,
                format!("blobs are limited to {} bytes", st.limits.max_blob_bytes),
            ));
        }
        AppendEnd::Broken | AppendEnd::Idle => {
            return Err(ApiError::code(
                Code::BlobUploadInvalid,
                format!(
                    "request body ended early; the upload is at {} bytes",
                    s.offset
                ),
            )
            .header(LOCATION, &upload_location(name, &s.id))
            .header(RANGE, &upload_range(s.offset)));
        }
    }
    if let Some(want) = expect
        && s.offset - before != want
    {
        return Err(ApiError::code(
            Code::SizeInvalid,
            format!("expected {want} bytes, received {}", s.offset - before),
        ));
    }
    Ok(())
}

async fn start_upload(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    q: &[(String, String)],
    body: &mut Option<Body>,
) -> ApiResult {
    check_name(name)?;
    let cred = st.gate(headers, Some(name), Action::Push).await?;
    if let Some(m) = param(q, "mount") {
        // Any failure to mount (bad arguments, no access to `from`, blob absent) falls back to a
        // normal upload, as the spec asks; the answer never tells whether the blob exists
        // elsewhere.
        if let (Ok(digest), Some(from)) = (m.parse::<Digest>(), param(q, "from"))
            && strata_oci::validate_repository_name(from).is_ok()
            && (st.auth.is_none() || authorize(cred.as_ref(), from, Action::Pull).is_ok())
            && st.registry.repo_blob_size(from, &digest).await?.is_some()
        {
            st.registry.link_blob(name, &digest).await?;
            return Ok(blob_created(name, &digest));
        }
    }
    let algorithm = match param(q, "digest-algorithm") {
        None | Some("sha256") => Algorithm::Sha256,
        Some("sha512") => Algorithm::Sha512,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::Unsupported,
                format!("digest algorithm `{other}` is not supported"),
            )
            .with_detail(json!({ "algorithm": other })));
        }
    };
    if let Some(d) = param(q, "digest") {
        // Monolithic upload in one POST.
        let digest = parse_digest(d)?;
        let session = st.registry.start_upload(name, digest.algorithm())?;
        let mut s = session.lock().await;
        let expect = content_length(headers);
        if let Err(e) = receive(st, name, &mut s, body, expect).await {
            st.registry.discard(&s).await;
            return Err(e);
        }
        return finish_upload(st, name, &mut s, &digest).await;
    }
    let session = st.registry.start_upload(name, algorithm)?;
    let s = session.lock().await;
    Ok(upload_response(StatusCode::ACCEPTED, name, &s))
}

async fn finish_upload(st: &AppState, name: &str, s: &mut Session, digest: &Digest) -> ApiResult {
    match st.registry.finish(s, digest).await? {
        Ok(_) => Ok(blob_created(name, digest)),
        Err(actual) => {
            st.registry.discard(s).await;
            Err(ApiError::code(
                Code::DigestInvalid,
                format!("content has digest {actual}, not {digest}"),
            )
            .with_detail(json!({ "digest": digest.to_string(), "actual": actual.to_string() })))
        }
    }
}

async fn find_session(
    st: &AppState,
    name: &str,
    id: &str,
) -> Result<Arc<tokio::sync::Mutex<Session>>, ApiError> {
    st.registry.session(name, id)?.ok_or_else(|| {
        ApiError::code(Code::BlobUploadUnknown, "").with_detail(json!({ "session": id }))
    })
}

async fn patch_upload(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    id: &str,
    body: &mut Option<Body>,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let session = find_session(st, name, id).await?;
    let mut s = session.lock().await;
    let expect = check_content_range(headers, name, &s)?;
    receive(st, name, &mut s, body, expect).await?;
    Ok(upload_response(StatusCode::ACCEPTED, name, &s))
}

async fn put_upload(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    id: &str,
    q: &[(String, String)],
    body: &mut Option<Body>,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let session = find_session(st, name, id).await?;
    let mut s = session.lock().await;
    let Some(d) = param(q, "digest") else {
        return Err(ApiError::code(
            Code::DigestInvalid,
            "the closing PUT needs ?digest=",
        ));
    };
    let digest = parse_digest(d)?;
    let expect = check_content_range(headers, name, &s)?;
    receive(st, name, &mut s, body, expect).await?;
    finish_upload(st, name, &mut s, &digest).await
}

async fn upload_status(st: &AppState, headers: &HeaderMap, name: &str, id: &str) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let session = find_session(st, name, id).await?;
    let s = session.lock().await;
    Ok(upload_response(StatusCode::NO_CONTENT, name, &s))
}

async fn cancel_upload(st: &AppState, headers: &HeaderMap, name: &str, id: &str) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let session = find_session(st, name, id).await?;
    let s = session.lock().await;
    st.registry.discard(&s).await;
    Ok(empty(StatusCode::NO_CONTENT))
}

// ---- manifests ----

enum Reference {
    Tag(String),
    Digest(Digest),
}

fn parse_reference(r: &str) -> Result<Reference, ApiError> {
    if r.contains(':') {
        parse_digest(r).map(Reference::Digest)
    } else {
        strata_oci::validate_tag(r)
            .map(|()| Reference::Tag(r.to_string()))
            .map_err(|e| {
                ApiError::code(Code::ManifestInvalid, e.to_string())
                    .with_detail(json!({ "tag": r }))
            })
    }
}

fn manifest_unknown(r: &str) -> ApiError {
    ApiError::code(Code::ManifestUnknown, "").with_detail(json!({ "reference": r }))
}

async fn get_manifest(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    r: &str,
    head: bool,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Pull).await?;
    let digest = match parse_reference(r) {
        Ok(Reference::Digest(d)) => d,
        Ok(Reference::Tag(t)) => match st.registry.resolve_tag(name, &t).await? {
            Some(d) => d,
            None => return Err(manifest_unknown(r)),
        },
        // A malformed tag cannot name anything.
        Err(e) if e.status() == StatusCode::BAD_REQUEST && !r.contains(':') => {
            return Err(manifest_unknown(r));
        }
        Err(e) => return Err(e),
    };
    let Some(m) = st.registry.get_manifest(name, &digest).await? else {
        return Err(manifest_unknown(r));
    };
    let len = m.bytes.len();
    let mut resp = if head {
        empty(StatusCode::OK)
    } else {
        Response::new(Body::from(m.bytes))
    };
    set(&mut resp, CONTENT_TYPE, &m.media_type);
    set(&mut resp, CONTENT_LENGTH, &len.to_string());
    set(&mut resp, DOCKER_CONTENT_DIGEST, &m.digest.to_string());
    set(&mut resp, ETAG, &format!("\"{}\"", m.digest));
    Ok(resp)
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Code::SizeInvalid,
        format!("manifests are limited to {limit} bytes"),
    )
    .with_detail(json!({ "limit": limit }))
}

async fn read_limited(
    body: Body,
    limit: u64,
    idle: std::time::Duration,
) -> Result<Bytes, ApiError> {
    use futures_util::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => {
                return Err(ApiError::code(
                    Code::ManifestInvalid,
                    "request body timed out",
                ));
            }
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => {
                return Err(ApiError::code(
                    Code::ManifestInvalid,
                    format!("reading body: {e}"),
                ));
            }
            Ok(Some(Ok(chunk))) => {
                if (buf.len() + chunk.len()) as u64 > limit {
                    return Err(too_large(limit));
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

async fn put_manifest(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    r: &str,
    q: &[(String, String)],
    body: &mut Option<Body>,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let reference = parse_reference(r)?;
    let limit = st.limits.max_manifest_bytes;
    if content_length(headers).is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let bytes = read_limited(
        body.take().unwrap_or_default(),
        limit,
        st.limits.body_idle_timeout,
    )
    .await?;
    let content_type = header_str(headers, &CONTENT_TYPE);
    let parsed = ManifestOrIndex::from_slice(&bytes, content_type)
        .map_err(|e| ApiError::code(Code::ManifestInvalid, e.to_string()))?;
    let media_type = parsed.media_type().to_string();
    let mut tags = Vec::new();
    let digest = match reference {
        Reference::Digest(d) => {
            let actual = Digest::of(d.algorithm(), &bytes);
            if actual != d {
                return Err(ApiError::code(
                    Code::DigestInvalid,
                    format!("manifest has digest {actual}, not {d}"),
                )
                .with_detail(json!({ "digest": d.to_string() })));
            }
            for (k, v) in q {
                if k == "tag" {
                    strata_oci::validate_tag(v)
                        .map_err(|e| ApiError::code(Code::ManifestInvalid, e.to_string()))?;
                    tags.push(v.clone());
                }
            }
            d
        }
        Reference::Tag(t) => {
            tags.push(t);
            Digest::sha256(&bytes)
        }
    };
    check_references(st, name, &parsed).await?;
    st.registry
        .put_manifest(name, &parsed, bytes, &media_type, &digest, &tags)
        .await?;
    let mut resp = empty(StatusCode::CREATED);
    set(
        &mut resp,
        LOCATION,
        &format!("/v2/{name}/manifests/{digest}"),
    );
    set(&mut resp, DOCKER_CONTENT_DIGEST, &digest.to_string());
    set(&mut resp, CONTENT_LENGTH, "0");
    if let Some(subject) = subject_of(&parsed) {
        set(&mut resp, OCI_SUBJECT, &subject.digest.to_string());
    }
    if matches!(parse_reference(r), Ok(Reference::Digest(_))) {
        for t in &tags {
            if let Ok(v) = HeaderValue::from_str(t) {
                resp.headers_mut().append(OCI_TAG, v);
            }
        }
    }
    Ok(resp)
}

/// Every blob and child manifest the document names must be in this repository (checked per
/// repository, so a digest seen in another org's repository cannot be borrowed). The subject
/// need not exist (spec: referrers may be pushed before their subject).
async fn check_references(
    st: &AppState,
    name: &str,
    parsed: &ManifestOrIndex,
) -> Result<(), ApiError> {
    let mut missing: Vec<&Descriptor> = Vec::new();
    let mut wrong_size: Vec<(&Descriptor, u64)> = Vec::new();
    match parsed {
        ManifestOrIndex::Manifest(m) => {
            for d in std::iter::once(&m.config).chain(&m.layers) {
                // Non-distributable layers live elsewhere (their `urls`); nobody pushes them here.
                if media_type::is_foreign_layer(&d.media_type)
                    && d.urls.as_ref().is_some_and(|u| !u.is_empty())
                {
                    continue;
                }
                match st.registry.repo_blob_size(name, &d.digest).await? {
                    None => missing.push(d),
                    Some(size) if size != d.size => wrong_size.push((d, size)),
                    Some(_) => {}
                }
            }
        }
        ManifestOrIndex::Index(i) => {
            for d in &i.manifests {
                if !st.registry.has_manifest(name, &d.digest).await?
                    && st.registry.repo_blob_size(name, &d.digest).await?.is_none()
                {
                    missing.push(d);
                }
            }
        }
    }
    if let Some((first, rest)) = missing.split_first() {
        let entry = |d: &Descriptor| {
            (
                format!("blob {} is unknown to repository `{name}`", d.digest),
                json!({ "digest": d.digest.to_string() }),
            )
        };
        let (msg, detail) = entry(first);
        let mut err = ApiError::code(Code::ManifestBlobUnknown, msg).with_detail(detail);
        for d in rest {
            let (msg, detail) = entry(d);
            err = err.and(Code::ManifestBlobUnknown, msg, detail);
        }
        return Err(err);
    }
    if let Some((d, size)) = wrong_size.first() {
        return Err(ApiError::code(
            Code::ManifestInvalid,
            format!(
                "descriptor of {} says {} bytes, the blob has {size}",
                d.digest, d.size
            ),
        )
        .with_detail(json!({ "digest": d.digest.to_string() })));
    }
    Ok(())
}

async fn delete_manifest(st: &AppState, headers: &HeaderMap, name: &str, r: &str) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let deleted = match parse_reference(r)? {
        Reference::Tag(t) => st.registry.delete_tag(name, &t).await?,
        Reference::Digest(d) => st.registry.delete_manifest(name, &d).await?,
    };
    if deleted {
        Ok(empty(StatusCode::ACCEPTED))
    } else {
        Err(manifest_unknown(r))
    }
}

// ---- listings ----

/// `n` and `last` of a paged listing: the page and whether more follow.
fn page(
    items: Vec<String>,
    q: &[(String, String)],
) -> Result<(Vec<String>, Option<usize>, bool), ApiError> {
    let n = match param(q, "n") {
        None | Some("") => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::Unsupported,
                format!("invalid n `{v}`"),
            )
            .with_detail(json!({ "n": v }))
        })?),
    };
    let start: Vec<String> = match param(q, "last") {
        Some(last) if !last.is_empty() => items.into_iter().filter(|t| t.as_str() > last).collect(),
        _ => items,
    };
    let Some(n) = n else {
        return Ok((start, None, false));
    };
    let take = n.min(MAX_PAGE);
    let more = start.len() > take;
    Ok((start.into_iter().take(take).collect(), Some(take), more))
}

fn link_next(path: &str, n: usize, last: &str) -> String {
    format!(
        "<{path}?{}>; rel=\"next\"",
        serde_urlencoded::to_string([("n", n.to_string()), ("last", last.to_string())])
            .unwrap_or_default()
    )
}

async fn tags(st: &AppState, headers: &HeaderMap, name: &str, q: &[(String, String)]) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Pull).await?;
    if !st.registry.repo_exists(name).await? {
        return Err(ApiError::code(Code::NameUnknown, "").with_detail(json!({ "name": name })));
    }
    let all = st.registry.tags(name).await?;
    let (tags, n, more) = page(all, q)?;
    let mut resp = axum::Json(json!({ "name": name, "tags": tags })).into_response();
    if more && let (Some(n), Some(last)) = (n, tags.last()) {
        set(
            &mut resp,
            LINK,
            &link_next(&format!("/v2/{name}/tags/list"), n, last),
        );
    }
    Ok(resp)
}

async fn catalog(st: &AppState, headers: &HeaderMap, q: &[(String, String)]) -> ApiResult {
    let cred = st.gate(headers, None, Action::Pull).await?;
    let mut repos = st.registry.catalog().await?;
    if let Some(c) = &cred {
        // A principal sees its own org's repositories only.
        let prefix = format!("{}/", c.principal().org);
        repos.retain(|r| r.starts_with(&prefix));
    }
    let (repos, n, more) = page(repos, q)?;
    let mut resp = axum::Json(json!({ "repositories": repos })).into_response();
    if more && let (Some(n), Some(last)) = (n, repos.last()) {
        set(&mut resp, LINK, &link_next("/v2/_catalog", n, last));
    }
    Ok(resp)
}

async fn referrers(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    d: &str,
    q: &[(String, String)],
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Pull).await?;
    let subject = parse_digest(d)?;
    let mut list = st.registry.referrers(name, &subject).await?;
    let filter = param(q, "artifactType");
    if let Some(at) = filter {
        list.retain(|d| d.artifact_type.as_deref() == Some(at));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": list,
    });
    let body = serde_json::to_vec(&index).unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    set(&mut resp, CONTENT_TYPE, media_type::OCI_INDEX);
    if filter.is_some() {
        set(&mut resp, OCI_FILTERS_APPLIED, "artifactType");
    }
    Ok(resp)
}

// ---- /token ----

async fn token(State(st): State<Arc<AppState>>, uri: Uri, headers: HeaderMap) -> Response {
    let Some(auth) = &st.auth else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            Code::Unsupported,
            "this registry is anonymous and issues no tokens",
        )
        .into_response();
    };
    let basic_challenge = |message: &str| {
        ApiError::code(Code::Unauthorized, message)
            .header(WWW_AUTHENTICATE, &format!(r#"Basic realm="{SERVICE}""#))
            .into_response()
    };
    let cred = match auth.authenticate(&headers).await {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return basic_challenge("credentials required"),
        // Credentials were given and are wrong: say so, not that none were given.
        Ok(Err(())) => return basic_challenge("incorrect username or password"),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let q = query(&uri);
    if let Some(service) = param(&q, "service")
        && service != SERVICE
    {
        return ApiError::code(
            Code::Denied,
            format!("tokens here are for service `{SERVICE}`"),
        )
        .into_response();
    }
    let scopes: Vec<String> = q
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let resp = auth.issue(cred.principal(), &scopes);
    axum::Json(resp).into_response()
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
