//! A registry that accepts connections and never answers is reported after the client's timeout
//! (it used to hang for 481 s: a 120 s read timeout, tried four times), while a blob that keeps
//! coming, however slowly, is not cut off: the timeout is an idle one.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use strata_oci::Digest;
use strata_registry::{BlobData, Client, ClientOptions, CredentialSource, Error};

fn opts(timeout: Duration) -> ClientOptions {
    ClientOptions {
        credentials: CredentialSource::Anonymous,
        timeout,
        ..ClientOptions::default()
    }
}

/// Accepts every connection and holds it open, reading whatever comes, answering nothing.
fn silent_registry() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut conn, &mut std::io::sink());
            });
        }
    });
    host
}

/// Answers every request with `data` as a 200, sent in 10 parts `gap` apart.
fn trickling_registry(data: Vec<u8>, gap: Duration) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let host = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let data = data.clone();
            std::thread::spawn(move || trickle(conn, &data, gap));
        }
    });
    host
}

fn trickle(conn: TcpStream, data: &[u8], gap: Duration) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let mut conn = conn;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        data.len()
    );
    conn.write_all(head.as_bytes()).unwrap();
    for part in data.chunks(data.len().div_ceil(10)) {
        std::thread::sleep(gap);
        if conn.write_all(part).is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_registry_fails_after_the_timeout_and_a_slow_blob_still_arrives() {
    let host = silent_registry();
    let client = Client::new(&host, opts(Duration::from_secs(1))).unwrap();

    // Pull: the manifest.
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.get_manifest("team/app", "1"),
    )
    .await
    .expect("still waiting after 20 s")
    .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "no answer from {host} for 1 s while waiting for the answer to GET manifest team/app:1"
        )
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // Push: the blob's upload (its HEAD first).
    let data = bytes::Bytes::from_static(b"some layer");
    let digest = Digest::sha256(&data);
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        client.push_blob(
            "team/app",
            &digest,
            data.len() as u64,
            &BlobData::Bytes(data.clone()),
            &[],
            None,
        ),
    )
    .await
    .expect("still waiting after 20 s")
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("no answer from {host} for 1 s while waiting for the answer to HEAD blob team/app@{digest}")),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // A blob trickling in for 3 s with a 1 s timeout: every part comes within it.
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = Digest::sha256(&blob);
    let host = trickling_registry(blob.clone(), Duration::from_millis(300));
    let client = Client::new(&host, opts(Duration::from_secs(1))).unwrap();
    let mut sink = Vec::new();
    let got = client
        .fetch_blob(
            "team/app",
            &digest,
            Some(blob.len() as u64),
            &mut sink,
            None,
        )
        .await
        .unwrap();
    assert_eq!(got.resumed, 0);
    assert_eq!(sink, blob);
}
