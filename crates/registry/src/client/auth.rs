//! Authentication: challenges, credentials, and bearer tokens cached by scope.

use super::*;

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
pub(super) struct AuthState {
    scheme: Option<Scheme>,
    /// Bearer tokens by their scope set (sorted, space-joined).
    tokens: HashMap<String, Token>,
    /// Credentials once looked up (`Some(None)`: looked up, there are none).
    credentials: Option<Option<Credentials>>,
}

pub(super) fn scope_key(scopes: &[String]) -> String {
    let mut s: Vec<&str> = scopes.iter().map(String::as_str).collect();
    s.sort_unstable();
    s.dedup();
    s.join(" ")
}

impl Client {
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
    pub(super) async fn authorization(&self, scopes: &[String]) -> Result<Option<HeaderValue>> {
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
    pub(super) async fn handle_challenge(
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
}
