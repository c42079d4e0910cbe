//! Manifests: `GET`/`HEAD`, `PUT` (with reference checks and `subject`), `DELETE`.

use super::*;

pub(super) enum Reference {
    Tag(String),
    Digest(Digest),
}

pub(super) fn parse_reference(r: &str) -> Result<Reference, ApiError> {
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

pub(super) fn manifest_unknown(r: &str) -> ApiError {
    ApiError::code(Code::ManifestUnknown, "").with_detail(json!({ "reference": r }))
}

pub(super) async fn get_manifest(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    r: &str,
    head: bool,
) -> ApiResult {
    check_name(name)?;
    st.gate(headers, Some(name), Action::Pull).await?;
    let found = match parse_reference(r) {
        Ok(Reference::Digest(d)) => st.registry.get_manifest(name, &d).await?,
        Ok(Reference::Tag(t)) => st.registry.get_manifest_by_tag(name, &t).await?,
        // A malformed tag cannot name anything.
        Err(e) if e.status() == StatusCode::BAD_REQUEST && !r.contains(':') => {
            return Err(manifest_unknown(r));
        }
        Err(e) => return Err(e),
    };
    let Some(m) = found else {
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

pub(super) fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Code::SizeInvalid,
        format!("manifests are limited to {limit} bytes"),
    )
    .with_detail(json!({ "limit": limit }))
}

pub(super) async fn read_limited(
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

pub(super) async fn put_manifest(
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
    // Used before they are looked at: a gc running now either keeps them or is done with them
    // (see the `gc` module).
    let mut used = vec![digest.clone()];
    match &parsed {
        ManifestOrIndex::Manifest(m) => used.extend(
            std::iter::once(&m.config)
                .chain(&m.layers)
                .map(|d| d.digest.clone()),
        ),
        ManifestOrIndex::Index(i) => used.extend(i.manifests.iter().map(|d| d.digest.clone())),
    }
    let used = st.registry.meta.protect(&used).await?;
    let stored = match check_references(st, name, &parsed).await {
        Ok(()) => st
            .registry
            .put_manifest(name, &parsed, bytes, &media_type, &digest, &tags)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    st.registry.meta.done(used).await?;
    stored?;
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
pub(super) async fn check_references(
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

pub(super) async fn delete_manifest(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    r: &str,
) -> ApiResult {
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
