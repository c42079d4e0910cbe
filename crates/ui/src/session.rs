//! Who is looking: sessions (a random id in an `HttpOnly`, `SameSite=Strict` cookie), the org
//! a registry token signed in as, and each session's CSRF token, which every form carries
//! and every POST must return.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use strata_oci::sync::MutexExt;

pub const COOKIE: &str = "strata_ui";

/// Sessions idle longer than this are forgotten.
const IDLE: Duration = Duration::from_secs(12 * 3600);

/// One signed-in (or, without tokens, anonymous) viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// The org whose token signed in; `None` without token checks (everything visible).
    pub org: Option<String>,
    /// Echoed by every form.
    pub csrf: String,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, (Session, Instant)>>,
}

/// 32 random bytes as hex.
pub fn random_id() -> String {
    let mut b = [0u8; 32];
    // The OS's generator; without it no session could be safe, so there is no fallback.
    getrandom::fill(&mut b).expect("the OS random number generator works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Sessions {
    /// A new session for `org`.
    pub fn create(&self, org: Option<String>) -> Session {
        let s = Session {
            id: random_id(),
            org,
            csrf: random_id(),
        };
        let mut map = self.map.lock_ok();
        map.retain(|_, (_, at)| at.elapsed() < IDLE);
        map.insert(s.id.clone(), (s.clone(), Instant::now()));
        s
    }

    /// The session the request's cookie names, if it is known.
    pub fn get(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let mut map = self.map.lock_ok();
        let (s, at) = map.get_mut(&id)?;
        if at.elapsed() >= IDLE {
            map.remove(&id);
            return None;
        }
        *at = Instant::now();
        Some(s.clone())
    }

    pub fn remove(&self, id: &str) {
        self.map.lock_ok().remove(id);
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (RFC 6265 §5.4: `a=b; c=d`).
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// The `Set-Cookie` value for session `id`.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict")
}

/// Whether a POST comes from our own pages: when the browser says where it comes from
/// (`Origin`, or `Sec-Fetch-Site`), it must be this server. The CSRF token is checked besides.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest == host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn cookies_sessions_and_origins() {
        let sessions = Sessions::default();
        let s = sessions.create(Some("acme".into()));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("x=1; {COOKIE}={}", s.id)).unwrap(),
        );
        assert_eq!(sessions.get(&h), Some(s.clone()));
        sessions.remove(&s.id);
        assert_eq!(sessions.get(&h), None);

        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8000"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8000"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }
}
