//! Authentication (Basic with a password or API token, Bearer with our own signed tokens) and
//! the per-org access rule.
//!
//! Bearer tokens are JWTs signed with HS256 by a key kept in `<root>/token.key`; they carry the
//! principal's org and rights, and the repository actions granted by `/token` (Docker's token
//! flow: a client that lacks an action gets a 401 whose challenge names the scope to ask for).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use strata_oci::sync::MutexExt;

use crate::error::{Error, IoContext, Result};
use crate::meta::{Meta, Principal, TOKEN_PREFIX, TokenScope};
use crate::util;

/// The `service` our tokens are issued for.
pub(crate) const SERVICE: &str = "strata";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What a request wants to do to a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Pull,
    Push,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
        }
    }
}

/// One `access` entry of a token (Docker's token format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    org: String,
    max: String,
    access: Vec<AccessEntry>,
    iat: u64,
    exp: u64,
}

/// Checked credentials.
#[derive(Debug, Clone)]
pub(crate) enum Credential {
    /// Basic auth with a user's password or an API token: the principal's full rights.
    Direct(Principal),
    /// A bearer token from `/token`: only the actions it was granted.
    Bearer {
        principal: Principal,
        access: Vec<AccessEntry>,
    },
}

impl Credential {
    pub fn principal(&self) -> &Principal {
        match self {
            Credential::Direct(p) | Credential::Bearer { principal: p, .. } => p,
        }
    }
}

/// Why access is refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No (or not enough) credentials: answer 401 with a challenge for this scope.
    Unauthorized,
    /// Authenticated, but this principal may not do it: 403 DENIED.
    Denied,
}

pub(crate) struct Auth {
    meta: Arc<Meta>,
    key: Vec<u8>,
    token_ttl: Duration,
    /// Argon2 is deliberately slow; a push makes dozens of requests with the same Basic
    /// credentials, so a verified (user, password) pair is remembered for a few minutes, keyed by
    /// a hash so no password stays in memory, with the stored hash it was checked against. A hit
    /// is still rechecked against the database (one indexed read, no argon2): a user whose
    /// password changed or who is gone is refused at once, whichever process changed it.
    /// API tokens are never cached: checking one is a SHA-256 and an indexed read.
    cache: Mutex<HashMap<[u8; 32], (Principal, String, Instant)>>,
}

const CACHE_TTL: Duration = Duration::from_secs(300);

/// The signing key under `root`, created (0600) on first use.
pub(crate) fn load_or_create_key(root: &Path) -> Result<Vec<u8>> {
    let path = root.join("token.key");
    match std::fs::read(&path) {
        Ok(k) if k.len() >= 32 => return Ok(k),
        Ok(_) => {
            return Err(Error::Corrupt {
                what: "token signing key",
                key: path.display().to_string(),
                reason: "shorter than 32 bytes".to_string(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).at("read", &path),
    }
    let key = util::random_bytes(32)?;
    let tmp = root.join(format!("token.key.tmp-{}", util::random_hex(6)));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .at("create", &tmp)?;
        f.write_all(&key)
            .and_then(|()| f.sync_all())
            .at("write", &tmp)?;
    }
    // Two processes starting at once: the first rename wins and both read the winner's key.
    if std::fs::hard_link(&tmp, &path).is_err() {
        let _ = std::fs::remove_file(&tmp);
        return std::fs::read(&path).at("read", &path);
    }
    let _ = std::fs::remove_file(&tmp);
    Ok(key)
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    // RFC 2104 with a 64-byte block; keys longer than a block are hashed first.
    let mut k = [0u8; 64];
    if key.len() > 64 {
        let h = sha2::Sha256::digest(key);
        k[..32].copy_from_slice(&h);
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = sha2::Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let inner = inner.finalize();
    let mut outer = sha2::Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner);
    outer.finalize().to_vec()
}

/// A scope as `/token` and challenges spell it: `repository:<name>:<actions>`.
pub(crate) fn parse_scope(scope: &str) -> Option<(String, Vec<String>)> {
    let rest = scope.strip_prefix("repository:")?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        name.to_string(),
        actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// The org that owns a repository: its first path component.
pub(crate) fn org_of(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

impl Auth {
    pub fn new(meta: Arc<Meta>, key: Vec<u8>, token_ttl: Duration) -> Auth {
        Auth {
            meta,
            key,
            token_ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Check the `Authorization` header. `Ok(None)`: no credentials. `Err(())`: credentials that
    /// are wrong, expired or malformed.
    pub async fn authenticate(
        self: &Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<Result<Option<Credential>, ()>> {
        let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
            return Ok(Ok(None));
        };
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let Some((user, pass)) = B64
                .decode(rest.trim_end_matches('='))
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| {
                    s.split_once(':')
                        .map(|(u, p)| (u.to_string(), p.to_string()))
                })
            else {
                return Ok(Err(()));
            };
            Ok(self
                .check_basic(user, pass)
                .await?
                .map(|p| Some(Credential::Direct(p)))
                .ok_or(()))
        } else if scheme.eq_ignore_ascii_case("bearer") {
            if rest.starts_with(TOKEN_PREFIX) {
                // An API token used directly as a bearer token.
                let p = self.meta.check_token(rest).await?;
                return Ok(p.map(|p| Some(Credential::Direct(p))).ok_or(()));
            }
            let cred = match self.verify_jwt(rest) {
                Ok(c) => c,
                Err(()) => return Ok(Err(())),
            };
            // A token from `/token` outlives nothing it was issued for: its API token revoked
            // (or its user gone), it is refused at once, not when it expires.
            let alive = self.meta.principal_alive(cred.principal()).await?;
            Ok(if alive { Ok(Some(cred)) } else { Err(()) })
        } else {
            Ok(Err(()))
        }
    }

    async fn check_basic(
        self: &Arc<Self>,
        user: String,
        pass: String,
    ) -> Result<Option<Principal>> {
        if pass.starts_with(TOKEN_PREFIX) {
            // Looked up on every request, so a revoked token stops working at once.
            return self.meta.check_token(&pass).await;
        }
        let mut h = sha2::Sha256::new();
        h.update(user.as_bytes());
        h.update([0]);
        h.update(pass.as_bytes());
        let cache_key: [u8; 32] = h.finalize().into();
        let cached = {
            let cache = self.cache.lock_ok();
            cache
                .get(&cache_key)
                .filter(|(_, _, at)| at.elapsed() < CACHE_TTL)
                .map(|(p, stored, _)| (p.clone(), stored.clone()))
        };
        if let Some((p, stored)) = cached {
            let now = self.meta.user_hash(&user).await?;
            if now.is_some_and(|(org, hash)| org == p.org && hash == stored) {
                return Ok(Some(p));
            }
            // Changed or gone: forget it and check the password again below.
            let mut cache = self.cache.lock_ok();
            cache.remove(&cache_key);
        }
        let found = self.meta.check_password(&user, &pass).await?;
        Ok(found.map(|(p, stored)| {
            let mut cache = self.cache.lock_ok();
            cache.retain(|_, (_, _, at)| at.elapsed() < CACHE_TTL);
            cache.insert(cache_key, (p.clone(), stored, Instant::now()));
            p
        }))
    }

    fn verify_jwt(&self, token: &str) -> Result<Credential, ()> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(());
        };
        let sig = B64.decode(s).map_err(|_| ())?;
        let expected = hmac_sha256(&self.key, format!("{h}.{c}").as_bytes());
        if !util::constant_time_eq(&sig, &expected) {
            return Err(());
        }
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(h).map_err(|_| ())?).map_err(|_| ())?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(());
        }
        let claims: Claims =
            serde_json::from_slice(&B64.decode(c).map_err(|_| ())?).map_err(|_| ())?;
        if claims.exp <= util::unix_now() || claims.aud != SERVICE {
            return Err(());
        }
        Ok(Credential::Bearer {
            principal: Principal {
                org: claims.org,
                subject: claims.sub,
                max: TokenScope::parse(&claims.max).ok_or(())?,
            },
            access: claims.access,
        })
    }

    /// Issue a bearer token for `principal` with the requested scopes, each cut down to what the
    /// principal may do (Docker's flow: a refused action is simply not granted).
    pub fn issue(&self, principal: &Principal, scopes: &[String]) -> TokenResponse {
        let mut access = Vec::new();
        for s in scopes {
            let Some((name, actions)) = parse_scope(s) else {
                continue;
            };
            let granted: Vec<String> = actions
                .into_iter()
                .filter(|a| {
                    let action = match a.as_str() {
                        "pull" => Action::Pull,
                        "push" | "delete" | "*" => Action::Push,
                        _ => return false,
                    };
                    allowed(principal, &name, action)
                })
                .collect();
            access.push(AccessEntry {
                kind: "repository".to_string(),
                name,
                actions: granted,
            });
        }
        let now = util::unix_now();
        let claims = Claims {
            iss: SERVICE.to_string(),
            aud: SERVICE.to_string(),
            sub: principal.subject.clone(),
            org: principal.org.clone(),
            max: principal.max.as_str().to_string(),
            access,
            iat: now,
            exp: now + self.token_ttl.as_secs(),
        };
        let header = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = B64.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let sig = B64.encode(hmac_sha256(
            &self.key,
            format!("{header}.{body}").as_bytes(),
        ));
        let token = format!("{header}.{body}.{sig}");
        TokenResponse {
            access_token: token.clone(),
            token,
            expires_in: self.token_ttl.as_secs(),
            issued_at: rfc3339(now),
        }
    }
}

/// The `/token` response body (Docker token spec).
#[derive(Debug, Serialize)]
pub(crate) struct TokenResponse {
    pub token: String,
    pub access_token: String,
    pub expires_in: u64,
    pub issued_at: String,
}

/// Whether `principal` may do `action` to `repo` at all (ignoring token scopes).
fn allowed(principal: &Principal, repo: &str, action: Action) -> bool {
    org_of(repo) == principal.org && (action == Action::Pull || principal.max == TokenScope::Push)
}

/// The access rule: a principal reaches only its own org's repositories, and pushes only with
/// push rights; a bearer token also needs the action granted for that repository.
pub(crate) fn authorize(
    cred: Option<&Credential>,
    repo: &str,
    action: Action,
) -> Result<(), Refusal> {
    let Some(cred) = cred else {
        return Err(Refusal::Unauthorized);
    };
    if !allowed(cred.principal(), repo, action) {
        return Err(Refusal::Denied);
    }
    match cred {
        Credential::Direct(_) => Ok(()),
        Credential::Bearer { access, .. } => {
            let granted = access.iter().any(|a| {
                a.kind == "repository"
                    && a.name == repo
                    && a.actions.iter().any(|x| {
                        x == action.as_str() || x == "*" || (action == Action::Pull && x == "push")
                    })
            });
            if granted {
                Ok(())
            } else {
                Err(Refusal::Unauthorized)
            }
        }
    }
}

/// `2024-01-02T03:04:05Z` for a Unix time (civil-from-days, Howard Hinnant's algorithm).
fn rfc3339(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            util::hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn scopes_parse_with_ports_in_names() {
        assert_eq!(
            parse_scope("repository:org/app:pull,push"),
            Some((
                "org/app".to_string(),
                vec!["pull".to_string(), "push".to_string()]
            ))
        );
        assert_eq!(parse_scope("registry:catalog:*"), None);
    }

    #[test]
    fn org_rule() {
        let p = Principal {
            org: "a".into(),
            subject: "u".into(),
            max: TokenScope::Pull,
        };
        let c = Credential::Direct(p);
        assert_eq!(authorize(Some(&c), "a/x", Action::Pull), Ok(()));
        assert_eq!(
            authorize(Some(&c), "a/x", Action::Push),
            Err(Refusal::Denied)
        );
        assert_eq!(
            authorize(Some(&c), "b/x", Action::Pull),
            Err(Refusal::Denied)
        );
        assert_eq!(
            authorize(Some(&c), "ab/x", Action::Pull),
            Err(Refusal::Denied)
        );
        assert_eq!(
            authorize(None, "a/x", Action::Pull),
            Err(Refusal::Unauthorized)
        );
    }
}
