//! Listings: tags, catalog and referrers, paginated.

use super::*;

/// `n` and `last` of a paged listing: the page and whether more follow.
pub(super) fn page(
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

pub(super) fn link_next(path: &str, n: usize, last: &str) -> String {
    format!(
        "<{path}?{}>; rel=\"next\"",
        serde_urlencoded::to_string([("n", n.to_string()), ("last", last.to_string())])
            .unwrap_or_default()
    )
}

pub(super) async fn tags(
    st: &AppState,
    headers: &HeaderMap,
    name: &str,
    q: &[(String, String)],
) -> ApiResult {
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

pub(super) async fn catalog(
    st: &AppState,
    headers: &HeaderMap,
    q: &[(String, String)],
) -> ApiResult {
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

pub(super) async fn referrers(
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
