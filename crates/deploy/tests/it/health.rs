//! Health checks against real servers on 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_deploy::health::{
    Check, CheckFailure, HealthConfig, STARTING_RETRY, Stage, check_once, wait_healthy,
    wait_healthy_blocking,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Serves `response` (raw bytes) to every connection after reading the request head, and
/// records each request line with the time it arrived.
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<(Instant, String)>>>,
}

async fn serve(response: &'static str) -> Server {
    serve_on(TcpListener::bind((LOOPBACK, 0)).await.unwrap(), response)
}

fn serve_on(listener: TcpListener, response: &'static str) -> Server {
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let line = text.lines().next().unwrap_or_default().to_owned();
                log.lock().unwrap().push((Instant::now(), line));
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Server { port, requests }
}

/// A port nothing listens on (bound, then released).
fn dead_port() -> u16 {
    std::net::TcpListener::bind((LOOPBACK, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, path: &str) -> HealthConfig {
    HealthConfig {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        ..HealthConfig::http(port, path)
    }
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
const ERROR: &str = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n";

#[tokio::test]
async fn http_200_passes_and_sends_the_path() {
    let server = serve(OK).await;
    check_once(LOOPBACK, &http(server.port, "/healthz?full=1"))
        .await
        .unwrap();
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].1, "GET /healthz?full=1 HTTP/1.1");
}

#[tokio::test]
async fn redirect_passes_by_default() {
    let server = serve("HTTP/1.0 302 Found\r\nLocation: /\r\n\r\n").await;
    check_once(LOOPBACK, &http(server.port, "/")).await.unwrap();
}

#[tokio::test]
async fn http_500_fails_with_status_and_path() {
    let server = serve(ERROR).await;
    let err = check_once(LOOPBACK, &http(server.port, "/healthz"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CheckFailure::Status { status: 500, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("status 500 at /healthz"), "{message}");
}

#[tokio::test]
async fn expected_status_range_is_honoured() {
    let server = serve(ERROR).await;
    let mut cfg = http(server.port, "/");
    cfg.check = Check::Http {
        path: "/".into(),
        expect_status: Some(500..=599),
    };
    check_once(LOOPBACK, &cfg).await.unwrap();

    let ok = serve(OK).await;
    cfg.port = ok.port;
    let err = check_once(LOOPBACK, &cfg).await.unwrap_err();
    assert!(
        matches!(err, CheckFailure::Status { status: 200, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn silent_server_fails_by_timeout() {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accepts and holds connections, never answers.
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            open.push(stream);
        }
    });
    let cfg = HealthConfig {
        timeout: Duration::from_millis(300),
        ..http(port, "/")
    };
    let start = Instant::now();
    let err = check_once(LOOPBACK, &cfg).await.unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(
            err,
            CheckFailure::Timeout {
                stage: Stage::Response,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("timeout after 300ms"), "{err}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1000),
        "{took:?}"
    );
    held.abort();
}

#[tokio::test]
async fn refused_port_fails() {
    let port = dead_port();
    let err = check_once(LOOPBACK, &http(port, "/")).await.unwrap_err();
    assert!(matches!(err, CheckFailure::Refused { .. }), "{err:?}");
    assert!(err.to_string().contains("refused"), "{err}");
    let err = check_once(LOOPBACK, &HealthConfig::tcp(port))
        .await
        .unwrap_err();
    assert!(matches!(err, CheckFailure::Refused { .. }), "{err:?}");
}

#[tokio::test]
async fn non_http_answer_is_malformed() {
    let server = serve("SSH-2.0-OpenSSH_9.6\r\n").await;
    let err = check_once(LOOPBACK, &http(server.port, "/"))
        .await
        .unwrap_err();
    assert!(matches!(err, CheckFailure::Malformed { .. }), "{err:?}");
    assert!(err.to_string().contains("SSH-2.0"), "{err}");

    // Closing without a word is malformed too, not a pass.
    let closer = serve("").await;
    let err = check_once(LOOPBACK, &http(closer.port, "/"))
        .await
        .unwrap_err();
    assert!(matches!(err, CheckFailure::Malformed { .. }), "{err:?}");
}

#[tokio::test]
async fn invalid_path_is_rejected_before_connecting() {
    let server = serve(OK).await;
    for path in ["healthz", "/a b", "/x\r\nHost: evil"] {
        let err = check_once(LOOPBACK, &http(server.port, path))
            .await
            .unwrap_err();
        assert!(matches!(err, CheckFailure::InvalidPath { .. }), "{err:?}");
    }
    assert!(server.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn tcp_check_needs_only_a_listener() {
    // A listener that never accepts still completes handshakes (backlog): that is "open".
    let listener = TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    check_once(LOOPBACK, &HealthConfig::tcp(port))
        .await
        .unwrap();
    drop(listener);
    assert!(
        check_once(LOOPBACK, &HealthConfig::tcp(port))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn wait_healthy_passes_once_a_late_server_listens() {
    let port = dead_port();
    let started = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let listener = TcpListener::bind((LOOPBACK, port)).await.unwrap();
        serve_on(listener, OK)
    });
    let start = Instant::now();
    wait_healthy(LOOPBACK, &http(port, "/"), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let server = started.await.unwrap();
    assert_eq!(server.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn wait_healthy_waits_for_grace_first() {
    let server = serve(OK).await;
    let cfg = HealthConfig {
        grace: Duration::from_millis(300),
        ..http(server.port, "/")
    };
    let start = Instant::now();
    wait_healthy(LOOPBACK, &cfg, Duration::from_secs(5))
        .await
        .unwrap();
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 1);
    assert!(
        requests[0].0 - start >= Duration::from_millis(300),
        "checked {:?} after the call",
        requests[0].0 - start
    );
}

#[tokio::test]
async fn wait_healthy_gives_up_with_last_failure_and_attempts() {
    let server = serve(ERROR).await;
    let cfg = HealthConfig {
        interval: Duration::from_millis(100),
        ..http(server.port, "/ready")
    };
    let start = Instant::now();
    let err = wait_healthy(LOOPBACK, &cfg, Duration::from_millis(550))
        .await
        .unwrap_err();
    let took = start.elapsed();
    let CheckFailure::GaveUp {
        attempts, ref last, ..
    } = err
    else {
        panic!("{err:?}");
    };
    // Attempts at 0, 100, ..., 500 ms; a slow machine may push the last one past 550 ms.
    assert!((5..=6).contains(&attempts), "{err}");
    assert_eq!(server.requests.lock().unwrap().len() as u32, attempts);
    assert!(matches!(**last, CheckFailure::Status { status: 500, .. }));
    let message = err.to_string();
    assert!(
        message.contains(&format!("{attempts} attempt")),
        "{message}"
    );
    assert!(message.contains("status 500 at /ready"), "{message}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn grace_longer_than_deadline_still_checks_once() {
    let port = dead_port();
    let cfg = HealthConfig {
        grace: Duration::from_secs(10),
        ..HealthConfig::tcp(port)
    };
    let start = Instant::now();
    let err = wait_healthy(LOOPBACK, &cfg, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(err, CheckFailure::GaveUp { attempts: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn blocking_helper_for_sync_callers() {
    let listener = std::net::TcpListener::bind((LOOPBACK, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    wait_healthy_blocking(LOOPBACK, &HealthConfig::tcp(port), Duration::from_secs(2)).unwrap();
    drop(listener);
    let err = wait_healthy_blocking(
        LOOPBACK,
        &HealthConfig {
            interval: Duration::from_millis(50),
            ..HealthConfig::tcp(port)
        },
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            strata_deploy::Error::Unhealthy(CheckFailure::GaveUp { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_port_that_starts_listening_is_seen_long_before_the_interval() {
    let port = dead_port();
    let cfg = HealthConfig {
        interval: Duration::from_secs(5),
        ..HealthConfig::tcp(port)
    };
    // The "machine" starts listening 150 ms after the first (refused) attempt.
    let listener = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        let l = std::net::TcpListener::bind((LOOPBACK, port)).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        drop(l);
    });
    let start = Instant::now();
    wait_healthy(LOOPBACK, &cfg, Duration::from_secs(10))
        .await
        .unwrap();
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "took {took:?}: a refused port is tried again every {STARTING_RETRY:?}, not every 5 s"
    );
    listener.join().unwrap();
}
