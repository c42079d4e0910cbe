//! An upload cut in the middle resumes from the offset the registry reports (GET on the
//! session → `Range`), instead of starting over. docker-registry cannot show this (its signed
//! upload state refuses to resume after a broken request), so this front keeps what it
//! received, like the spec allows, and drops the connection once mid-body.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_oci::Digest;
use strata_registry::{BlobData, BlobPush, Client, ClientOptions, CredentialSource};

#[derive(Default)]
struct Upload {
    data: Vec<u8>,
    /// Body bytes received over the wire, resent ones included.
    received: u64,
    /// Cut the connection once after this many body bytes.
    cut_after: Option<usize>,
    done: Option<Vec<u8>>,
    /// `OCI-Chunk-Min-Length` to announce.
    chunk_min: Option<u64>,
    patches: u32,
}

fn serve(conn: TcpStream, st: &Mutex<Upload>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
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
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Read the body, cutting once if asked.
    let cut = st.lock().unwrap().cut_after.take();
    let mut body = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let limit = cut.map_or(len, |c| c.min(len));
        if got >= limit {
            // Keep what arrived (a registry writes the stream as it comes), then hang up.
            let mut u = st.lock().unwrap();
            u.received += got as u64;
            u.data.extend_from_slice(&body[..got]);
            drop(u);
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
        let n = reader.read(&mut body[got..limit]).unwrap_or(0);
        if n == 0 {
            return;
        }
        got += n;
    }
    if let Some(c) = cut
        && c >= len
    {
        // Not cut this time; keep the cut for a later request.
        st.lock().unwrap().cut_after = Some(c);
    }
    let mut u = st.lock().unwrap();
    u.received += len as u64;
    let path = target.split('?').next().unwrap_or("");
    let range = |n: usize| format!("0-{}", n.saturating_sub(1));
    let (status, extra): (&str, Vec<(String, String)>) = match (method.as_str(), path) {
        ("GET", "/v2/") => ("200 OK", vec![]),
        ("HEAD", p) if p.starts_with("/v2/r/blobs/") => ("404 Not Found", vec![]),
        ("POST", "/v2/r/blobs/uploads/") => {
            let mut h = vec![("Location".into(), "/up/1".into())];
            if let Some(m) = u.chunk_min {
                h.push(("OCI-Chunk-Min-Length".into(), m.to_string()));
            }
            ("202 Accepted", h)
        }
        ("GET", "/up/1") => (
            "204 No Content",
            vec![
                ("Location".into(), "/up/1".into()),
                ("Range".into(), range(u.data.len())),
            ],
        ),
        ("PATCH", "/up/1") => {
            let start: usize = headers
                .get("content-range")
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(usize::MAX);
            if start != u.data.len() {
                ("416 Range Not Satisfiable", vec![])
            } else {
                u.patches += 1;
                u.data.extend_from_slice(&body);
                (
                    "202 Accepted",
                    vec![
                        ("Location".into(), "/up/1".into()),
                        ("Range".into(), range(u.data.len())),
                    ],
                )
            }
        }
        ("PUT", "/up/1") => {
            u.data.extend_from_slice(&body);
            let want = target
                .split("digest=")
                .nth(1)
                .unwrap_or("")
                .replace("%3A", ":");
            if Digest::sha256(&u.data).to_string() == want {
                u.done = Some(u.data.clone());
                ("201 Created", vec![("Docker-Content-Digest".into(), want)])
            } else {
                ("400 Bad Request", vec![])
            }
        }
        _ => ("404 Not Found", vec![]),
    };
    drop(u);
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let _ = conn.write_all(out.as_bytes());
}

fn start(upload: Upload) -> (String, Arc<Mutex<Upload>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
    let st = Arc::new(Mutex::new(upload));
    let s = Arc::clone(&st);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let s = Arc::clone(&s);
            std::thread::spawn(move || serve(conn, &s));
        }
    });
    (host, st)
}

fn blob() -> Vec<u8> {
    (0..3_000_000u32)
        .map(|i| (i * 7 + i / 1000) as u8)
        .collect()
}

async fn push(host: &str, data: &[u8], opts: ClientOptions) -> BlobPush {
    let c = Client::new(
        host,
        ClientOptions {
            credentials: CredentialSource::Anonymous,
            backoff: Duration::from_millis(10),
            ..opts
        },
    )
    .unwrap();
    let d = Digest::sha256(data);
    c.push_blob(
        "r",
        &d,
        data.len() as u64,
        &BlobData::Bytes(data.to_vec().into()),
        &[],
        None,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn monolithic_upload_cut_midway_resumes_from_the_registry_offset() {
    let data = blob();
    let (host, st) = start(Upload {
        cut_after: Some(1_000_000),
        ..Upload::default()
    });
    let r = push(&host, &data, ClientOptions::default()).await;
    let BlobPush::Uploaded { resumed, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(resumed, 1);
    let u = st.lock().unwrap();
    assert_eq!(u.done.as_deref(), Some(&data[..]), "assembled blob differs");
    // Resumed, not restarted: the registry got each byte once.
    assert_eq!(u.received, data.len() as u64);
    assert_eq!(u.patches, 1);
}

#[tokio::test]
async fn registry_chunk_minimum_makes_the_upload_chunked_and_a_cut_chunk_resumes() {
    let data = blob();
    let (host, st) = start(Upload {
        chunk_min: Some(1 << 20),
        cut_after: Some(300_000),
        ..Upload::default()
    });
    let opts = ClientOptions {
        chunk_size: 512 * 1024,
        ..ClientOptions::default()
    };
    let r = push(&host, &data, opts).await;
    assert!(matches!(r, BlobPush::Uploaded { resumed: 1, .. }), "{r:?}");
    let u = st.lock().unwrap();
    assert_eq!(u.done.as_deref(), Some(&data[..]));
    assert_eq!(u.received, data.len() as u64);
    // Chunks of the registry's 1 MiB minimum, not our 512 KiB: after the first chunk was cut
    // at 300 000 bytes, three chunks from there cover the 3 000 000 bytes.
    assert_eq!(u.patches, 3);
}
