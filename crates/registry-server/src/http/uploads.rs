//! Uploads: sessions, monolithic and chunked `PATCH`/`PUT`, status, cancel.

use super::*;

pub(super) fn upload_location(name: &str, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// The `Range` header of an upload: inclusive, and `0-0` for an empty one (as Docker's registry).
pub(super) fn upload_range(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}

pub(super) fn upload_response(status: StatusCode, name: &str, s: &Session) -> Response {
    let mut r = empty(status);
    set(&mut r, LOCATION, &upload_location(name, &s.id));
    set(&mut r, RANGE, &upload_range(s.offset));
    set(&mut r, DOCKER_UPLOAD_UUID, &s.id);
    set(&mut r, UPLOAD_SESSION_ID, &s.id);
    set(&mut r, CONTENT_LENGTH, "0");
    r
}

pub(super) fn blob_created(name: &str, digest: &Digest) -> Response {
    let mut r = empty(StatusCode::CREATED);
    set(&mut r, LOCATION, &format!("/v2/{name}/blobs/{digest}"));
    set(&mut r, DOCKER_CONTENT_DIGEST, &digest.to_string());
    set(&mut r, CONTENT_LENGTH, "0");
    r
}

pub(super) fn range_error(name: &str, s: &Session, why: &str) -> ApiError {
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

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    header_str(headers, &CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

/// Check `Content-Range: <start>-<end>` against the session; the expected chunk length.
pub(super) fn check_content_range(
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
pub(super) async fn receive(
    st: &AppState,
    name: &str,
    s: &mut Session,
    body: &mut Option<Body>,
    expect: Option<u64>,
    last: bool,
) -> Result<(), ApiError> {
    let before = s.offset;
    let end = st
        .registry
        .append(
            s,
            body.take().unwrap_or_default().into_data_stream(),
            st.limits.max_blob_bytes,
            st.limits.body_idle_timeout,
            last,
        )
        .await?;
    match end {
        AppendEnd::Complete => {}
        AppendEnd::TooLarge => {
            st.registry.discard(s).await?;
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::SizeInvalid,
                format!("blobs are limited to {} bytes", st.limits.max_blob_bytes),
            ));
        }
        AppendEnd::Moved => {
            return Err(range_error(
                name,
                s,
                "another request appended to this upload first; ask for its status and resume",
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
        if s.is_local() {
            // The closing request's body was never stored: the upload cannot go on.
            st.registry.discard(s).await?;
        }
        return Err(ApiError::code(
            Code::SizeInvalid,
            format!("expected {want} bytes, received {}", s.offset - before),
        ));
    }
    Ok(())
}

pub(super) async fn start_upload(
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
        {
            // Used before it is looked at: a gc running now either keeps it or is done with it.
            let used = st
                .registry
                .meta
                .protect(std::slice::from_ref(&digest))
                .await?;
            let mounted = match st.registry.repo_blob_size(from, &digest).await {
                Ok(Some(_)) => st.registry.link_blob(name, &digest).await.map(|()| true),
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            st.registry.meta.done(used).await?;
            if mounted? {
                return Ok(blob_created(name, &digest));
            }
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
        let mut s = st.registry.start_upload(name, digest.algorithm()).await?;
        let expect = content_length(headers);
        if let Err(e) = receive(st, name, &mut s, body, expect, true).await {
            st.registry.discard(&s).await?;
            return Err(e);
        }
        return finish_upload(st, name, &mut s, &digest).await;
    }
    let s = st.registry.start_upload(name, algorithm).await?;
    Ok(upload_response(StatusCode::ACCEPTED, name, &s))
}

pub(super) async fn finish_upload(
    st: &AppState,
    name: &str,
    s: &mut Session,
    digest: &Digest,
) -> ApiResult {
    match st.registry.finish(s, digest).await? {
        Ok(_) => Ok(blob_created(name, digest)),
        Err(actual) => {
            st.registry.discard(s).await?;
            Err(ApiError::code(
                Code::DigestInvalid,
                format!("content has digest {actual}, not {digest}"),
            )
            .with_detail(json!({ "digest": digest.to_string(), "actual": actual.to_string() })))
        }
    }
}

pub(super) async fn find_session(st: &AppState, name: &str, id: &str) -> Result<Session, ApiError> {
    st.registry.session(name, id).await?.ok_or_else(|| {
        ApiError::code(Code::BlobUploadUnknown, "").with_detail(json!({ "session": id }))
    })
}

pub(super) async fn patch_upload(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    id: &str,
    body: &mut Option<Body>,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let mut s = find_session(st, name, id).await?;
    let expect = check_content_range(headers, name, &s)?;
    receive(st, name, &mut s, body, expect, false).await?;
    Ok(upload_response(StatusCode::ACCEPTED, name, &s))
}

pub(super) async fn put_upload(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    id: &str,
    q: &[(String, String)],
    body: &mut Option<Body>,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let mut s = find_session(st, name, id).await?;
    let Some(d) = param(q, "digest") else {
        return Err(ApiError::code(
            Code::DigestInvalid,
            "the closing PUT needs ?digest=",
        ));
    };
    let digest = parse_digest(d)?;
    let expect = check_content_range(headers, name, &s)?;
    receive(st, name, &mut s, body, expect, true).await?;
    finish_upload(st, name, &mut s, &digest).await
}

pub(super) async fn upload_status(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    id: &str,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let s = find_session(st, name, id).await?;
    Ok(upload_response(StatusCode::NO_CONTENT, name, &s))
}

pub(super) async fn cancel_upload(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    id: &str,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let s = find_session(st, name, id).await?;
    st.registry.discard(&s).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
