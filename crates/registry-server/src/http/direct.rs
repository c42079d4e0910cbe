//! Blob `GET`s answered without hyper: the response head is written here and the blob goes
//! from the file to the socket with `sendfile`, never through this process's memory.
//!
//! hyper sends a body only as buffers it is handed, so a blob served through it is read into
//! memory and copied to the socket (two copies of every byte, on a 2-core machine as much CPU
//! as the client's). A connection therefore starts here: while its requests are blob `GET`s or
//! `HEAD`s that succeed on a backend keeping blobs as files, they are answered directly; the
//! first other request (another route, an error to report, a body, HTTP/1.0, the S3 backend)
//! hands the connection, with the bytes read so far, to hyper for the rest of its life. So
//! there is one place that writes errors (the router), and a client that sends a manifest
//! request first on a connection gets hyper's path on that connection, as before.

use std::os::fd::AsFd;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::*;

/// Longest request head read here; a longer one goes to hyper, which has its own limit.
const MAX_HEAD: usize = 16 << 10;
/// Most bytes one `sendfile` call is asked for (the kernel sends what the socket takes).
const SENDFILE_CHUNK: usize = 8 << 20;

/// How a connection's blob requests are served and when it stops waiting.
pub(crate) struct Timeouts {
    /// For a request head (and between requests), as hyper's `header_read_timeout`.
    pub header_read: Duration,
    /// For the client to take any byte of a response.
    pub send_idle: Duration,
}

/// What to do with the connection after [`serve_blobs`].
pub(crate) enum Next {
    /// Closed, or to be closed: nothing more to do.
    Done,
    /// Hand it to hyper, with these bytes read from it first.
    Hyper(TcpStream, Vec<u8>),
}

/// Serves the requests of `stream` as long as they are blob `GET`/`HEAD`s this module answers.
pub(crate) async fn serve_blobs(st: &AppState, mut stream: TcpStream, t: &Timeouts) -> Next {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // A request head: read until it parses, the client goes away, or time runs out.
        let head_len = loop {
            if !buf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) => break n,
                    Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                    // Malformed, too many headers or too long: hyper says so.
                    _ => return Next::Hyper(stream, buf),
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(t.header_read, stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Next::Done,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let Some(req) = blob_request(&buf[..head_len]) else {
            return Next::Hyper(stream, buf);
        };
        // Anything that is not a success goes to the router, which writes every error.
        let Ok(answer) = blob_answer(st, &req.headers, &req.name, &req.digest).await else {
            return Next::Hyper(stream, buf);
        };
        let file = match (req.head, st.registry.blob_file(&answer.digest)) {
            (true, _) => None,
            (false, Some(path)) => match std::fs::File::open(&path) {
                Ok(f) => Some(f),
                Err(_) => return Next::Hyper(stream, buf),
            },
            (false, None) => return Next::Hyper(stream, buf),
        };
        let head = response_head(&answer, req.close);
        if send_response(&mut stream, &head, file.as_ref(), &answer.range, t)
            .await
            .is_err()
            || req.close
        {
            // A response cut short cannot be followed by another: close (as hyper does).
            let _ = stream.shutdown().await;
            return Next::Done;
        }
        // A pipelined next request may already be here.
        buf.drain(..head_len);
    }
}

/// A blob request this module may answer.
struct BlobRequest {
    name: String,
    digest: String,
    head: bool,
    headers: HeaderMap,
    /// `Connection: close`.
    close: bool,
}

/// The blob `GET`/`HEAD` `head` asks for; `None` for anything else (another route or method,
/// HTTP/1.0, a request body, an `Expect` or `Upgrade`).
fn blob_request(head: &[u8]) -> Option<BlobRequest> {
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw);
    req.parse(head).ok()?;
    let is_head = match req.method? {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    if req.version? != 1 {
        return None;
    }
    let path = req.path?.split('?').next()?.strip_prefix("/v2/")?;
    let segs: Vec<String> = path.split('/').map(percent_decode).collect();
    let Some(Route::Blob(name, digest)) = parse_route(&segs) else {
        return None;
    };
    let mut headers = HeaderMap::new();
    let mut close = false;
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        if name == CONTENT_LENGTH && value != "0" {
            return None;
        }
        if name == TRANSFER_ENCODING || name == EXPECT || name == axum::http::header::UPGRADE {
            return None;
        }
        if name == CONNECTION {
            let v = value.to_str().ok()?;
            if v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            {
                return None;
            }
            close |= v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
        headers.append(name, value);
    }
    Some(BlobRequest {
        name,
        digest,
        head: is_head,
        headers,
        close,
    })
}

/// The status line and headers: the router's for the same request (its version header
/// included), and hyper's `date`.
fn response_head(answer: &BlobAnswer, close: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        answer.status.as_u16(),
        answer.status.canonical_reason().unwrap_or("")
    );
    for (name, value) in answer.headers() {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("{API_VERSION}: registry/2.0\r\n"));
    if close {
        out.push_str("connection: close\r\n");
    }
    out.push_str(&format!(
        "date: {}\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    ));
    out.into_bytes()
}

/// Writes `head`, then `range` of `file` (none for `HEAD`) with `sendfile`. Fails when the
/// client takes nothing for `send_idle`, goes away, or the file is shorter than the range.
async fn send_response(
    stream: &mut TcpStream,
    head: &[u8],
    file: Option<&std::fs::File>,
    range: &Range<u64>,
    t: &Timeouts,
) -> std::io::Result<()> {
    let stalled = || std::io::Error::new(std::io::ErrorKind::TimedOut, "the client read nothing");
    tokio::time::timeout(t.send_idle, stream.write_all(head))
        .await
        .map_err(|_| stalled())??;
    let Some(file) = file else { return Ok(()) };
    let mut offset = range.start;
    while offset < range.end {
        let want = (range.end - offset).min(SENDFILE_CHUNK as u64) as usize;
        let sent = tokio::time::timeout(
            t.send_idle,
            stream.async_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(stream.as_fd(), file, Some(&mut offset), want)
                    .map_err(std::io::Error::from)
            }),
        )
        .await
        .map_err(|_| stalled())??;
        if sent == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "blob shorter than its recorded size",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_blob_gets_and_heads_are_taken() {
        let d = "sha256:".to_string() + &"a".repeat(64);
        let get = |extra: &str| format!("GET /v2/a/b/blobs/{d} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
        let r = blob_request(get("").as_bytes()).unwrap();
        assert_eq!(
            (r.name.as_str(), r.digest.as_str(), r.head),
            ("a/b", &d[..], false)
        );
        assert!(!r.close);
        assert!(
            blob_request(get("Connection: close\r\n").as_bytes())
                .unwrap()
                .close
        );
        assert!(blob_request(get("Content-Length: 0\r\n").as_bytes()).is_some());
        let r = blob_request(format!("HEAD /v2/a/blobs/{d} HTTP/1.1\r\n\r\n").as_bytes());
        assert!(r.unwrap().head);
        for refused in [
            get("Content-Length: 3\r\n"),
            get("Transfer-Encoding: chunked\r\n"),
            get("Connection: Upgrade\r\nUpgrade: h2c\r\n"),
            get("Expect: 100-continue\r\n"),
            format!("GET /v2/a/blobs/{d} HTTP/1.0\r\n\r\n"),
            format!("DELETE /v2/a/blobs/{d} HTTP/1.1\r\n\r\n"),
            "GET /v2/a/manifests/latest HTTP/1.1\r\n\r\n".to_string(),
            "GET /v2/a/blobs/uploads/x HTTP/1.1\r\n\r\n".to_string(),
            "GET /ui/ HTTP/1.1\r\n\r\n".to_string(),
        ] {
            assert!(blob_request(refused.as_bytes()).is_none(), "{refused}");
        }
    }
}
