//! Health checks of a machine: is its port open, does its HTTP endpoint answer 2xx/3xx.
//!
//! The HTTP check is a hand-written HTTP/1.1 GET over a `TcpStream` rather than an HTTP client
//! library: it sends one request and reads only the status line, so a client (connection pool,
//! body decoding, redirects) would add weight and behaviour we do not want.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::{Error, Result};

/// Longest status line we accept; a real one is about 20 bytes.
const MAX_STATUS_LINE: usize = 8 * 1024;

/// What to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET path` must answer with a status in `expect_status` (default `200..=399`).
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// Accepted statuses; `None` means `200..=399`.
        expect_status: Option<RangeInclusive<u16>>,
    },
    /// The port must accept a TCP connection.
    Tcp,
}

/// A health check of one port of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// What to check.
    pub check: Check,
    /// The port on the machine's address.
    pub port: u16,
    /// Time between the starts of two attempts in [`wait_healthy`].
    pub interval: Duration,
    /// Limit for one attempt (connect, request and status line together).
    pub timeout: Duration,
    /// Time [`wait_healthy`] waits before the first attempt, for the process to start.
    pub grace: Duration,
}

impl HealthConfig {
    /// An HTTP check of `GET path` on `port` expecting 200..=399, every second, 2 s timeout,
    /// no grace.
    pub fn http(port: u16, path: impl Into<String>) -> HealthConfig {
        HealthConfig {
            check: Check::Http {
                path: path.into(),
                expect_status: None,
            },
            port,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            grace: Duration::ZERO,
        }
    }

    /// A TCP connect check on `port`, every second, 2 s timeout, no grace.
    pub fn tcp(port: u16) -> HealthConfig {
        HealthConfig {
            check: Check::Tcp,
            ..HealthConfig::http(port, "/")
        }
    }
}

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    /// Nothing listens on the port.
    #[error("connection to {addr} refused")]
    Refused {
        /// The checked address.
        addr: SocketAddr,
    },
    /// Connecting failed for another reason (unreachable network, ...).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The checked address.
        addr: SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// The attempt took longer than the configured timeout.
    #[error("timeout after {timeout:?} {stage} {addr}")]
    Timeout {
        /// The checked address.
        addr: SocketAddr,
        /// The configured limit.
        timeout: Duration,
        /// What we were waiting for, e.g. "connecting to".
        stage: Stage,
    },
    /// The server answered with a status outside the expected range.
    #[error("status {status} at {path} on {addr} (expected {}..={})", expected.start(), expected.end())]
    Status {
        /// The checked address.
        addr: SocketAddr,
        /// The request path.
        path: String,
        /// The status the server sent.
        status: u16,
        /// The statuses that pass.
        expected: RangeInclusive<u16>,
    },
    /// The server's answer is not an HTTP/1.x status line.
    #[error("malformed response from {addr} for {path}: {detail}")]
    Malformed {
        /// The checked address.
        addr: SocketAddr,
        /// The request path.
        path: String,
        /// What is wrong, with the start of what was received.
        detail: String,
    },
    /// Sending the request or reading the answer failed.
    #[error("reading the response from {addr} for {path}: {source}")]
    Io {
        /// The checked address.
        addr: SocketAddr,
        /// The request path.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The configured path cannot be sent in a request line.
    #[error(
        "invalid health check path {path:?}: it must start with `/` and contain no spaces or control characters"
    )]
    InvalidPath {
        /// The configured path.
        path: String,
    },
    /// [`wait_healthy`] gave up; `last` is the failure of the last attempt.
    #[error("not healthy after {attempts} attempt(s) in {waited:?}: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time from the call to giving up, grace included.
        waited: Duration,
        /// The last attempt's failure.
        last: Box<CheckFailure>,
    },
}

/// The step of an attempt that timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// TCP connect.
    Connect,
    /// Waiting for the HTTP status line.
    Response,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connect => "connecting to",
            Stage::Response => "waiting for the status line from",
        })
    }
}

/// One attempt of `cfg.check` against `addr:cfg.port`, bounded by `cfg.timeout`.
pub async fn check_once(addr: IpAddr, cfg: &HealthConfig) -> Result<(), CheckFailure> {
    check_within(SocketAddr::new(addr, cfg.port), &cfg.check, cfg.timeout).await
}

/// Time between two attempts while the port refuses connections (the process is starting).
pub const STARTING_RETRY: Duration = Duration::from_millis(25);

/// Waits `cfg.grace`, then checks every `cfg.interval` until one attempt passes or `deadline`
/// (counted from the call, grace included) has passed; while nothing listens on the port yet,
/// every [`STARTING_RETRY`] instead. At least one attempt is always made.
/// The error is [`CheckFailure::GaveUp`] with the number of attempts and the last failure.
pub async fn wait_healthy(
    addr: IpAddr,
    cfg: &HealthConfig,
    deadline: Duration,
) -> Result<(), CheckFailure> {
    let start = Instant::now();
    let end = start + deadline;
    let target = SocketAddr::new(addr, cfg.port);
    tokio::time::sleep_until((start + cfg.grace).min(end)).await;
    let mut attempts = 0u32;
    loop {
        let attempt_start = Instant::now();
        // Clip the attempt to the deadline so the call returns close to it, but give the first
        // attempt its full timeout: a grace as long as the deadline must not mean "no check".
        let remaining = end.saturating_duration_since(attempt_start);
        let timeout = if attempts == 0 || remaining >= cfg.timeout {
            cfg.timeout
        } else {
            remaining
        };
        attempts += 1;
        let failure = match check_within(target, &cfg.check, timeout).await {
            Ok(()) => {
                tracing::debug!(%target, attempts, "health: passed");
                return Ok(());
            }
            Err(failure) => failure,
        };
        tracing::debug!(%target, attempts, %failure, "health: attempt failed");
        if matches!(failure, CheckFailure::InvalidPath { .. }) {
            return Err(failure);
        }
        // Nothing listening yet is what a starting machine looks like: look again soon (a
        // refused connect costs the machine nothing), as Docker's start interval does; any
        // other failure waits the whole interval.
        let pause = if matches!(failure, CheckFailure::Refused { .. }) {
            cfg.interval.min(STARTING_RETRY)
        } else {
            cfg.interval
        };
        let next = attempt_start + pause;
        if next >= end {
            return Err(CheckFailure::GaveUp {
                attempts,
                waited: start.elapsed(),
                last: Box::new(failure),
            });
        }
        tokio::time::sleep_until(next).await;
    }
}

/// [`wait_healthy`] for synchronous callers: runs it on a current-thread runtime of its own.
/// Must not be called from inside a tokio runtime.
pub fn wait_healthy_blocking(addr: IpAddr, cfg: &HealthConfig, deadline: Duration) -> Result<()> {
    wait_healthy_unless(addr, cfg, deadline, &|| None)
}

/// [`wait_healthy_blocking`] that also gives up as soon as `gave_up` says why (looked at
/// every 100 ms): a machine that keeps crashing will never pass, and saying it exited beats
/// waiting out the deadline to report "connection refused".
pub fn wait_healthy_unless(
    addr: IpAddr,
    cfg: &HealthConfig,
    deadline: Duration,
    gave_up: &dyn Fn() -> Option<String>,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime {
            what: "a health check",
            source,
        })?;
    runtime.block_on(async {
        let stopped = async {
            loop {
                if let Some(why) = gave_up() {
                    return why;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::select! {
            r = wait_healthy(addr, cfg, deadline) => r.map_err(Error::from),
            () = interrupted() => Err(Error::Interrupted),
            why = stopped => Err(Error::Config(why)),
        }
    })?;
    Ok(())
}

async fn interrupted() {
    while !strata_runtime::interrupt::requested() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn check_within(
    target: SocketAddr,
    check: &Check,
    timeout: Duration,
) -> Result<(), CheckFailure> {
    if let Check::Http { path, .. } = check {
        validate_path(path)?;
    }
    let deadline = Instant::now() + timeout;
    let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(target)).await {
        Err(_) => {
            return Err(CheckFailure::Timeout {
                addr: target,
                timeout,
                stage: Stage::Connect,
            });
        }
        Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(CheckFailure::Refused { addr: target });
        }
        Ok(Err(source)) => {
            return Err(CheckFailure::Connect {
                addr: target,
                source,
            });
        }
        Ok(Ok(stream)) => stream,
    };
    let Check::Http {
        path,
        expect_status,
    } = check
    else {
        return Ok(());
    };
    let status = match tokio::time::timeout_at(deadline, http_status(stream, target, path)).await {
        Err(_) => {
            return Err(CheckFailure::Timeout {
                addr: target,
                timeout,
                stage: Stage::Response,
            });
        }
        Ok(result) => result?,
    };
    let expected = expect_status.clone().unwrap_or(200..=399);
    if expected.contains(&status) {
        Ok(())
    } else {
        Err(CheckFailure::Status {
            addr: target,
            path: path.clone(),
            status,
            expected,
        })
    }
}

fn validate_path(path: &str) -> Result<(), CheckFailure> {
    if path.starts_with('/') && !path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Ok(())
    } else {
        Err(CheckFailure::InvalidPath {
            path: path.to_owned(),
        })
    }
}

/// Sends `GET path` and returns the status code of the answer's status line.
async fn http_status(
    mut stream: TcpStream,
    target: SocketAddr,
    path: &str,
) -> Result<u16, CheckFailure> {
    let io_err = |source| CheckFailure::Io {
        addr: target,
        path: path.to_owned(),
        source,
    };
    // SocketAddr's Display brackets IPv6 addresses, as the Host header needs.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: strata-health\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(io_err)?;
    let mut line = Vec::with_capacity(64);
    let mut buf = [0u8; 512];
    loop {
        let n = stream.read(&mut buf).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_STATUS_LINE {
            break;
        }
    }
    parse_status_line(&line).map_err(|detail| CheckFailure::Malformed {
        addr: target,
        path: path.to_owned(),
        detail,
    })
}

/// Parses `HTTP/1.x SSS reason` (RFC 9112 section 4); the reason phrase may be empty.
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let shown = || {
        let end = line.len().min(64);
        format!("{:?}", String::from_utf8_lossy(&line[..end]))
    };
    if line.is_empty() {
        return Err("the connection closed before a status line".to_owned());
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line
        .strip_prefix(b"HTTP/1.")
        .filter(|rest| rest.len() >= 5 && rest[0].is_ascii_digit() && rest[1] == b' ')
        .ok_or_else(|| format!("not an HTTP/1.x status line: {}", shown()))?;
    let code = &rest[2..5];
    let after = rest.get(5);
    if !code.iter().all(u8::is_ascii_digit) || after.is_some_and(|&b| b != b' ') {
        return Err(format!("bad status code in {}", shown()));
    }
    Ok(code
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::parse_status_line;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Ok(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable"),
            Ok(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.1 204 "), Ok(204));
        assert!(parse_status_line(b"").is_err());
        assert!(parse_status_line(b"SSH-2.0-OpenSSH_9.6").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2x0 OK").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 OK").is_err());
        assert!(parse_status_line(b"HTTP/2 200").is_err());
    }
}
