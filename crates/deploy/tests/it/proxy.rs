//! The proxy against real sockets: tiny HTTP/1.1 backends on 127.0.0.1 and clients that speak
//! HTTP by hand, so every byte on the wire is the test's own.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use strata_deploy::proxy::{Proxy, ProxyConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};

const LOCAL: &str = "127.0.0.1:0";
/// Bound on any single network wait in these tests, so a bug fails instead of hanging.
const STEP: Duration = Duration::from_secs(5);

/// A keep-alive HTTP/1.1 server answering every request with `body`; it closes the connection
/// after answering a request that says `Connection: close`.
async fn backend(body: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(LOCAL).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let Some(end) = find(&buf, b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end + 4);
                    let close = head.contains("connection: close");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An address nothing listens on (bound, then released).
fn dead_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind(LOCAL).unwrap();
    listener.local_addr().unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP/1.1 client on one connection.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = timeout(STEP, TcpStream::connect(addr)).await??;
        Ok(Client {
            stream,
            buf: Vec::new(),
        })
    }

    async fn send(&mut self, close: bool) -> io::Result<()> {
        let connection = if close { "close" } else { "keep-alive" };
        let request = format!("GET / HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await
    }

    /// Reads one response: (status, body). Cancel-safe: bytes read so far stay in `buf`.
    async fn recv(&mut self) -> io::Result<(u16, String)> {
        let mut chunk = [0u8; 1024];
        let end = loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a response",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_string();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .ok_or_else(|| io::Error::other(format!("no content-length in {head:?}")))?;
        while self.buf.len() < end + 4 + length {
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short body"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + length]).to_string();
        self.buf.drain(..end + 4 + length);
        Ok((status, body))
    }

    async fn request(&mut self, close: bool) -> io::Result<(u16, String)> {
        timeout(STEP, async {
            self.send(close).await?;
            self.recv().await
        })
        .await?
    }
}

/// One request on a new connection.
async fn get(addr: SocketAddr) -> io::Result<(u16, String)> {
    Client::connect(addr).await?.request(true).await
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + STEP;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn switch_moves_new_connections_and_keeps_established_ones() {
    let a = backend("A").await;
    let b = backend("B").await;
    let proxy = Proxy::bind(LOCAL.parse().unwrap()).await.unwrap();
    assert_ne!(proxy.local_addr().port(), 0);
    proxy.set_backends(vec![a]);
    assert_eq!(proxy.backends(), vec![a]);
    assert_eq!(get(proxy.local_addr()).await.unwrap(), (200, "A".into()));

    let mut long = Client::connect(proxy.local_addr()).await.unwrap();
    assert_eq!(long.request(false).await.unwrap().1, "A");
    // The first connection may still be closing; then only `long` is left.
    wait_for("one connection on A", || proxy.active_connections(a) == 1).await;

    proxy.set_backends(vec![b]);
    assert_eq!(proxy.backends(), vec![b]);
    for _ in 0..3 {
        assert_eq!(get(proxy.local_addr()).await.unwrap(), (200, "B".into()));
    }
    // The connection opened before the switch still talks to A.
    for _ in 0..3 {
        assert_eq!(long.request(false).await.unwrap().1, "A");
    }
    assert_eq!(proxy.active_connections(a), 1);
    wait_for("B's connections to close", || {
        proxy.active_connections(b) == 0
    })
    .await;

    drop(long);
    wait_for("A to drain", || proxy.active_connections(a) == 0).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_downtime_while_switching_back_and_forth() {
    let a = backend("A").await;
    let b = backend("B").await;
    let proxy = Proxy::bind(LOCAL.parse().unwrap()).await.unwrap();
    proxy.set_backends(vec![a]);
    let addr = proxy.local_addr();
    let stop = Arc::new(AtomicBool::new(false));

    let client = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            let (mut ok, mut failed, mut seen_a, mut seen_b) = (0u32, Vec::new(), false, false);
            let mut keep_alive = Client::connect(addr).await.unwrap();
            let keep_alive_backend = keep_alive.request(false).await.unwrap().1;
            while !stop.load(Ordering::Relaxed) {
                match get(addr).await {
                    Ok((200, body)) => {
                        ok += 1;
                        seen_a |= body == "A";
                        seen_b |= body == "B";
                    }
                    other => failed.push(format!("new connection: {other:?}")),
                }
                match keep_alive.request(false).await {
                    Ok((200, body)) if body == keep_alive_backend => ok += 1,
                    other => failed.push(format!("keep-alive: {other:?}")),
                }
            }
            (ok, failed, seen_a, seen_b)
        }
    });

    for i in 0..12 {
        tokio::time::sleep(Duration::from_millis(160)).await;
        proxy.set_backends(vec![if i % 2 == 0 { b } else { a }]);
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, seen_a, seen_b) = client.await.unwrap();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 20, "only {ok} requests in 2 s");
    assert!(seen_a && seen_b, "saw A: {seen_a}, saw B: {seen_b}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn dead_backend_is_skipped_and_all_dead_gives_502() {
    let live = backend("live").await;
    let (dead1, dead2) = (dead_addr(), dead_addr());
    let proxy = Proxy::bind(LOCAL.parse().unwrap()).await.unwrap();

    // Round-robin starts at every position of the set, so each dead one is hit first sometimes.
    proxy.set_backends(vec![dead1, live, dead2]);
    for _ in 0..9 {
        assert_eq!(get(proxy.local_addr()).await.unwrap(), (200, "live".into()));
    }

    proxy.set_backends(vec![dead1, dead2]);
    let (status, body) = get(proxy.local_addr()).await.unwrap();
    assert_eq!(status, 502);
    assert!(body.contains("no backend"), "{body:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn empty_set_gives_502() {
    let proxy = Proxy::bind(LOCAL.parse().unwrap()).await.unwrap();
    assert!(proxy.backends().is_empty());
    assert_eq!(get(proxy.local_addr()).await.unwrap().0, 502);

    // And the listener is still serving once a backend appears.
    let a = backend("A").await;
    proxy.set_backends(vec![a]);
    assert_eq!(get(proxy.local_addr()).await.unwrap(), (200, "A".into()));
    proxy.shutdown().await;
}

#[tokio::test]
async fn connection_limit_queues_extra_clients_and_survives() {
    let a = backend("A").await;
    let config = ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    };
    let proxy = Proxy::bind_with(LOCAL.parse().unwrap(), config)
        .await
        .unwrap();
    proxy.set_backends(vec![a]);
    let addr = proxy.local_addr();

    let mut first = Client::connect(addr).await.unwrap();
    let mut second = Client::connect(addr).await.unwrap();
    assert_eq!(first.request(false).await.unwrap().1, "A");
    assert_eq!(second.request(false).await.unwrap().1, "A");
    assert_eq!(proxy.active_connections(a), 2);

    // Over the limit: the kernel completes the handshake (backlog) but the proxy does not serve.
    let mut waiting = Client::connect(addr).await.unwrap();
    waiting.send(false).await.unwrap();
    assert!(
        timeout(Duration::from_millis(300), waiting.recv())
            .await
            .is_err(),
        "a third connection was served with a limit of 2"
    );
    let mut extra = Vec::new();
    for _ in 0..20 {
        // Some may be refused once the backlog is full; that is allowed, a crash is not.
        if let Ok(Ok(stream)) = timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
        {
            extra.push(stream);
        }
    }
    assert_eq!(proxy.active_connections(a), 2);

    // A slot frees up: the queued client is served.
    drop(first);
    let (status, body) = timeout(STEP, waiting.recv()).await.unwrap().unwrap();
    assert_eq!((status, body.as_str()), (200, "A"));
    assert_eq!(second.request(false).await.unwrap().1, "A");

    drop((extra, second, waiting));
    wait_for("all connections to close", || {
        proxy.active_connections(a) == 0
    })
    .await;
    for _ in 0..3 {
        assert_eq!(get(addr).await.unwrap(), (200, "A".into()));
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_listener_and_connections() {
    let a = backend("A").await;
    let proxy = Proxy::bind(LOCAL.parse().unwrap()).await.unwrap();
    let handle = proxy.clone();
    proxy.set_backends(vec![a]);
    let addr = proxy.local_addr();
    let mut open = Client::connect(addr).await.unwrap();
    assert_eq!(open.request(false).await.unwrap().1, "A");
    // A clone sees the same state.
    assert_eq!(handle.active_connections(a), 1);

    proxy.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    assert!(open.request(false).await.is_err(), "connection survived");
    assert_eq!(handle.active_connections(a), 0);
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_proxy() {
    let proxy = Proxy::bind(LOCAL.parse().unwrap()).await.unwrap();
    let addr = proxy.local_addr();
    drop(proxy);
    let deadline = Instant::now() + STEP;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "listener outlived its last handle"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let taken = TcpListener::bind(LOCAL).await.unwrap();
    let addr = taken.local_addr().unwrap();
    let err = Proxy::bind(addr).await.unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
