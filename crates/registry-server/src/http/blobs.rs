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

pub(super) async fn get_blob(
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
