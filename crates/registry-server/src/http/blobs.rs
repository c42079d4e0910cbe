//! Blobs: `GET`/`HEAD` (with `Range`) and `DELETE`.

use super::*;

/// `Range: bytes=a-b | a- | -n` against `size`: `Ok(None)` to send everything (no header, or a
/// multi-range we choose to ignore), `Err(())` when unsatisfiable.
pub(super) fn parse_range(h: Option<&str>, size: u64) -> Result<Option<Range<u64>>, ()> {
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

/// A blob `GET`/`HEAD` that may be answered: what to send, before any byte of the blob is read.
pub(super) struct BlobAnswer {
    pub status: StatusCode,
    pub digest: Digest,
    /// The blob's size.
    pub size: u64,
    /// The bytes to send (all of them for `200`).
    pub range: Range<u64>,
}

impl BlobAnswer {
    /// The response headers, the same whichever way the body is sent.
    pub fn headers(&self) -> Vec<(HeaderName, String)> {
        let (r, size) = (&self.range, self.size);
        let mut h = vec![
            (CONTENT_LENGTH, (r.end - r.start).to_string()),
            (CONTENT_TYPE, "application/octet-stream".to_string()),
            (DOCKER_CONTENT_DIGEST, self.digest.to_string()),
            (ETAG, format!("\"{}\"", self.digest)),
            (ACCEPT_RANGES, "bytes".to_string()),
            (CACHE_CONTROL, "max-age=31536000".to_string()),
        ];
        if self.status == StatusCode::PARTIAL_CONTENT {
            h.push((
                CONTENT_RANGE,
                format!("bytes {}-{}/{size}", r.start, r.end - 1),
            ));
        }
        h
    }
}

/// Checks access, existence and `Range` for a blob `GET`/`HEAD` of `d` in `name`.
pub(super) async fn blob_answer(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    d: &str,
) -> Result<BlobAnswer, ApiError> {
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
    let (status, range) = match range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r),
        None => (StatusCode::OK, 0..size),
    };
    Ok(BlobAnswer {
        status,
        digest,
        size,
        range,
    })
}

pub(super) async fn get_blob(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    d: &str,
    head: bool,
) -> ApiResult {
    let answer = blob_answer(st, headers, name, d).await?;
    let mut resp = if head {
        empty(answer.status)
    } else {
        let stream = st
            .registry
            .blob_stream(&answer.digest, answer.range.clone())
            .await?;
        let mut resp = Response::new(Body::from_stream(stream));
        *resp.status_mut() = answer.status;
        resp
    };
    for (name, value) in answer.headers() {
        set(&mut resp, name, &value);
    }
    Ok(resp)
}

pub(super) async fn delete_blob(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    d: &str,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Push).await?;
    let digest = parse_digest(d)?;
    if st.registry.unlink_blob(name, &digest).await? {
        Ok(empty(StatusCode::ACCEPTED))
    } else {
        Err(ApiError::code(Code::BlobUnknown, "").with_detail(json!({ "digest": d })))
    }
}
