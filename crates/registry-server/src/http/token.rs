//! `/token`: the bearer token endpoint.

use super::*;

pub(super) async fn token(
    State(st): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
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
