//! The Bearer token flow, retries and digest checks over real HTTP, against a small registry
//! front written here (docker-registry's token auth needs a JWT-signing token server; strata's
//! own registry will replace this front in the in-process tests): challenge → token request
//! with service and scope and Basic credentials → cached token → refreshed after a 401.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use strata_oci::Digest;
use strata_registry::{Client, ClientOptions, CredentialSource, Credentials, Error};

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

#[derive(Default)]
struct State {
    token_queries: Vec<String>,
    valid: HashSet<String>,
    issued: u32,
    hits: HashMap<String, u32>,
}

struct Front {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Front {
    fn start() -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let st = Arc::clone(&st);
                std::thread::spawn(move || serve(conn, port, &st));
            }
        });
        Front { port, state }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn serve(mut conn: TcpStream, port: u16, state: &Mutex<State>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        let _ = std::io::copy(&mut (&mut reader).take(n), &mut std::io::sink());
    }
    let auth = headers.get("authorization").cloned().unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut st = state.lock().unwrap();
    *st.hits.entry(path.to_string()).or_default() += 1;
    let hits = st.hits[path];
    let mut respond = |status: &str, headers: &[(&str, String)], body: &str| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(body);
        let _ = conn.write_all(out.as_bytes());
    };
    if path == "/token" {
        let good = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("alice:pw")
        );
        if auth != good {
            respond(
                "401 Unauthorized",
                &[],
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
            );
            return;
        }
        st.token_queries.push(query.to_string());
        st.issued += 1;
        let token = format!("tok{}", st.issued);
        st.valid.insert(token.clone());
        respond(
            "200 OK",
            &[("Content-Type", "application/json".into())],
            &format!(r#"{{"token":"{token}","expires_in":300}}"#),
        );
        return;
    }
    let bearer = auth.strip_prefix("Bearer ").unwrap_or("");
    if !st.valid.contains(bearer) {
        let scope = if path == "/v2/" {
            String::new()
        } else {
            ",scope=\"repository:a/b:pull\"".to_string()
        };
        respond(
            "401 Unauthorized",
            &[(
                "WWW-Authenticate",
                format!(
                    "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test-registry\"{scope}"
                ),
            )],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        );
        return;
    }
    let digest = Digest::sha256(MANIFEST.as_bytes()).to_string();
    let manifest_headers = |d: String| {
        vec![
            (
                "Content-Type",
                "application/vnd.oci.image.manifest.v1+json".to_string(),
            ),
            ("Docker-Content-Digest", d),
        ]
    };
    match (method.as_str(), path) {
        ("GET", "/v2/") => respond("200 OK", &[], "{}"),
        ("GET", "/v2/a/b/manifests/latest") => {
            respond("200 OK", &manifest_headers(digest), MANIFEST)
        }
        ("GET", "/v2/a/b/manifests/lying") => respond(
            "200 OK",
            &manifest_headers(Digest::sha256(b"something else").to_string()),
            MANIFEST,
        ),
        ("GET", "/v2/a/b/manifests/flaky") if hits <= 2 => {
            respond("503 Service Unavailable", &[], "")
        }
        ("GET", "/v2/a/b/manifests/flaky") => {
            respond("200 OK", &manifest_headers(digest), MANIFEST)
        }
        ("GET", "/v2/a/b/manifests/down") => respond(
            "503 Service Unavailable",
            &[],
            r#"{"errors":[{"code":"UNAVAILABLE","message":"maintenance","detail":"back at noon"}]}"#,
        ),
        _ => respond(
            "404 Not Found",
            &[],
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        ),
    }
}

fn client(front: &Front, creds: Option<(&str, &str)>) -> Client {
    let credentials = match creds {
        Some((u, p)) => CredentialSource::Explicit(Credentials::UserPassword {
            username: u.into(),
            password: p.into(),
        }),
        None => CredentialSource::Anonymous,
    };
    Client::new(
        &front.host(),
        ClientOptions {
            credentials,
            backoff: Duration::from_millis(10),
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

#[tokio::test]
async fn token_is_requested_with_scope_cached_and_refreshed_after_401() {
    let front = Front::start();
    let c = client(&front, Some(("alice", "pw")));
    let m = c.get_manifest("a/b", "latest").await.unwrap();
    assert_eq!(m.bytes, MANIFEST.as_bytes());
    assert_eq!(m.digest, Digest::sha256(MANIFEST.as_bytes()));
    assert_eq!(m.media_type, "application/vnd.oci.image.manifest.v1+json");
    {
        let st = front.state.lock().unwrap();
        assert_eq!(st.token_queries.len(), 1);
        let q = &st.token_queries[0];
        assert!(q.contains("service=test-registry"), "{q}");
        assert!(q.contains("scope=repository%3Aa%2Fb%3Apull"), "{q}");
    }
    // Cached: no second token request.
    c.get_manifest("a/b", "latest").await.unwrap();
    assert_eq!(front.state.lock().unwrap().token_queries.len(), 1);
    // The registry forgets the token: one 401, a new token, success.
    front.state.lock().unwrap().valid.clear();
    c.get_manifest("a/b", "latest").await.unwrap();
    assert_eq!(front.state.lock().unwrap().token_queries.len(), 2);
    // Ping asks for a token without scope.
    front.state.lock().unwrap().valid.clear();
    c.ping().await.unwrap();
    let st = front.state.lock().unwrap();
    assert!(
        !st.token_queries[2].contains("scope"),
        "{}",
        st.token_queries[2]
    );
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_unauthorized_with_the_registry_message() {
    let front = Front::start();
    for c in [
        client(&front, Some(("alice", "nope"))),
        client(&front, None),
    ] {
        let e = c.get_manifest("a/b", "latest").await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("bad credentials") && msg.contains(&front.host()),
            "{msg}"
        );
    }
}

#[tokio::test]
async fn digest_header_is_checked_and_transient_errors_are_retried() {
    let front = Front::start();
    let c = client(&front, Some(("alice", "pw")));
    let e = c.get_manifest("a/b", "lying").await.unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e:?}");

    // Two 503s, then success.
    c.get_manifest("a/b", "flaky").await.unwrap();
    // Always 503: bounded tries, and the registry's error JSON in the message.
    let e = c.get_manifest("a/b", "down").await.unwrap_err();
    assert_eq!(e.status(), Some(503));
    let msg = e.to_string();
    assert!(
        msg.contains("UNAVAILABLE: maintenance (back at noon)") && msg.contains("a/b:down"),
        "{msg}"
    );
    let hits = front.state.lock().unwrap().hits["/v2/a/b/manifests/down"];
    assert_eq!(hits, ClientOptions::default().max_attempts);

    let e = c.get_manifest("a/b", "missing").await.unwrap_err();
    assert_eq!(e.codes(), vec!["MANIFEST_UNKNOWN"]);
}
