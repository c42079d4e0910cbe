//! The distribution API in anonymous mode: every endpoint's success and error paths.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use strata_oci::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const NONE: Creds = Creds::None;

#[tokio::test(flavor = "multi_thread")]
async fn ping_answers_200_with_the_api_version() {
    let s = start(|_| {}).await;
    let r = s.req(Method::GET, "/v2/", &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn monolithic_post_then_head_get_and_ranges() {
    let s = start(|_| {}).await;
    let data = b"0123456789abcdef".to_vec();
    let d = Digest::sha256(&data);
    let r = s
        .req(
            Method::POST,
            &format!("/v2/org/app/blobs/uploads/?digest={d}"),
            &NONE,
        )
        .header("content-type", "application/octet-stream")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["location"],
        format!("/v2/org/app/blobs/{d}").as_str()
    );

    let blob = format!("/v2/org/app/blobs/{d}");
    let r = s.req(Method::HEAD, &blob, &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], "16");
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());

    let r = s.req(Method::GET, &blob, &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);

    let r = s
        .req(Method::GET, &blob, &NONE)
        .header("range", "bytes=2-5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 2-5/16");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"2345");

    let r = s
        .req(Method::GET, &blob, &NONE)
        .header("range", "bytes=-3")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"def");

    let r = s
        .req(Method::GET, &blob, &NONE)
        .header("range", "bytes=10-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 10-15/16");
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"abcdef");

    let r = s
        .req(Method::GET, &blob, &NONE)
        .header("range", "bytes=16-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["content-range"], "bytes */16");

    // Another repository does not see it; an unknown blob is BLOB_UNKNOWN.
    let r = s
        .req(Method::GET, &format!("/v2/org/other/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_codes(r).await, ["BLOB_UNKNOWN"]);
    let r = s
        .req(
            Method::HEAD,
            &format!("/v2/org/app/blobs/{}", Digest::sha256(b"nope")),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn digest_mismatch_and_bad_digests_are_refused() {
    let s = start(|_| {}).await;
    let wrong = Digest::sha256(b"something else");
    let r = s
        .req(
            Method::POST,
            &format!("/v2/org/app/blobs/uploads/?digest={wrong}"),
            &NONE,
        )
        .body(b"hello".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_codes(r).await, ["DIGEST_INVALID"]);
    let r = s
        .req(Method::HEAD, &format!("/v2/org/app/blobs/{wrong}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(
            Method::HEAD,
            &format!("/v2/org/app/blobs/{}", Digest::sha256(b"hello")),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a refused upload leaves nothing"
    );

    // POST then PUT with the wrong digest: 400 and the session is gone.
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &NONE)
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={wrong}"), &NONE)
        .body(b"hello".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_codes(r).await, ["DIGEST_INVALID"]);
    let r = s.req(Method::GET, &loc, &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_codes(r).await, ["BLOB_UPLOAD_UNKNOWN"]);

    for bad in ["sha256:abc", "md5:00", "sha256:..%2F..%2Fetc", "SHA256:AB"] {
        let r = s
            .req(Method::GET, &format!("/v2/org/app/blobs/{bad}"), &NONE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(error_codes(r).await, ["DIGEST_INVALID"], "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chunked_upload_checks_order_and_reports_status() {
    let s = start(|_| {}).await;
    let data: Vec<u8> = (0..13u8).collect();
    let d = Digest::sha256(&data);
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &NONE)
        .header("content-length", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["range"], "0-0");
    let id = r.headers()["docker-upload-uuid"]
        .to_str()
        .unwrap()
        .to_string();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.ends_with(&id), "{loc}");

    let patch = |range: &'static str, body: Vec<u8>| {
        s.req(Method::PATCH, &loc, &NONE)
            .header("content-type", "application/octet-stream")
            .header("content-range", range)
            .body(body)
    };
    let r = patch("0-4", data[0..5].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["range"], "0-4");

    // Out of order: 416 with the current range, nothing appended.
    let r = patch("10-12", data[10..13].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["range"], "0-4");
    let r = patch("0-4", data[0..5].to_vec()).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::RANGE_NOT_SATISFIABLE,
        "a repeated chunk is out of order too"
    );
    let r = patch("garbage", data[5..10].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    let r = s.req(Method::GET, &loc, &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["range"], "0-4");
    assert_eq!(r.headers()["location"], loc.as_str());

    let r = patch("5-9", data[5..10].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(r.headers()["range"], "0-9");

    // The last chunk with the closing PUT.
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={d}"), &NONE)
        .header("content-range", "10-12")
        .body(data[10..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(Method::GET, &format!("/v2/org/app/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
    // The finished session is gone.
    let r = s.req(Method::GET, &loc, &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_patches_then_empty_put_and_cancel() {
    let s = start(|_| {}).await;
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &NONE)
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    for part in [&b"streamed "[..], b"without ", b"ranges"] {
        let r = s
            .req(Method::PATCH, &loc, &NONE)
            .body(part.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let d = Digest::sha256(b"streamed without ranges");
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Cancel: 204, then the session is unknown.
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &NONE)
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    s.req(Method::PATCH, &loc, &NONE)
        .body(b"abc".to_vec())
        .send()
        .await
        .unwrap();
    let r = s.req(Method::DELETE, &loc, &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s
        .req(Method::PATCH, &loc, &NONE)
        .body(b"more".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_codes(r).await, ["BLOB_UPLOAD_UNKNOWN"]);
    // A session belongs to its repository.
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &NONE)
        .send()
        .await
        .unwrap();
    let id = r.headers()["docker-upload-uuid"]
        .to_str()
        .unwrap()
        .to_string();
    let r = s
        .req(
            Method::GET,
            &format!("/v2/org/other/blobs/uploads/{id}"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Ids are never paths.
    let r = s
        .req(
            Method::GET,
            "/v2/org/app/blobs/uploads/..%2F..%2F..%2Fetc",
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_upload_resumes_from_the_servers_offset_even_after_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let d = Digest::sha256(&data);
    let loc;
    {
        let s = start_at(tmp.path(), |_| {}).await;
        let r = s
            .req(Method::POST, "/v2/org/app/blobs/uploads/", &NONE)
            .send()
            .await
            .unwrap();
        loc = r.headers()["location"].to_str().unwrap().to_string();
        // A raw PATCH that promises all the data, sends 120000 bytes and dies.
        let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let head = format!(
            "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            s.addr,
            data.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(&data[..120_000]).await.unwrap();
        sock.flush().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(sock);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let r = s.req(Method::GET, &loc, &NONE).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(r.headers()["range"], "0-119999");
    }
    // A new server process on the same root knows the session (the hash is rebuilt from disk).
    let s = start_at(tmp.path(), |_| {}).await;
    let r = s.req(Method::GET, &loc, &NONE).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["range"], "0-119999");
    let r = s
        .req(Method::PATCH, &loc, &NONE)
        .header("content-range", format!("120000-{}", data.len() - 1))
        .body(data[120_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let got = s
        .req(Method::GET, &format!("/v2/org/app/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(got.bytes().await.unwrap().as_ref(), &data[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn size_limits_answer_413() {
    let s = start(|c| {
        c.limits.max_manifest_bytes = 300;
        c.limits.max_blob_bytes = 1000;
    })
    .await;
    let big = vec![7u8; 1500];
    let r = s
        .req(
            Method::POST,
            &format!("/v2/org/app/blobs/uploads/?digest={}", Digest::sha256(&big)),
            &NONE,
        )
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_codes(r).await, ["SIZE_INVALID"]);

    let cd = s.push_blob("org/app", b"{}", &NONE).await;
    let pad = "x".repeat(400);
    let m = manifest_json(&cd, 2, &[], Some(json!({"annotations": {"pad": pad}})));
    let r = s
        .put_manifest("org/app", "big", OCI_MANIFEST, &m, &NONE)
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_codes(r).await, ["SIZE_INVALID"]);
    let r = s
        .req(Method::GET, "/v2/org/app/manifests/big", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_delete_and_mount() {
    let s = start(|_| {}).await;
    let d = s.push_blob("org/a", b"shared layer", &NONE).await;
    // Mount into another repository: 201 and visible there.
    let r = s
        .req(
            Method::POST,
            &format!("/v2/org/b/blobs/uploads/?mount={d}&from=org/a"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["location"],
        format!("/v2/org/b/blobs/{d}").as_str()
    );
    assert_eq!(r.headers()["docker-content-digest"], d.to_string().as_str());
    let r = s
        .req(Method::HEAD, &format!("/v2/org/b/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Mount of something `from` lacks: 202 and an upload session instead.
    let missing = Digest::sha256(b"missing");
    let r = s
        .req(
            Method::POST,
            &format!("/v2/org/c/blobs/uploads/?mount={missing}&from=org/a"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/v2/org/c/blobs/uploads/")
    );

    let r = s
        .req(Method::DELETE, &format!("/v2/org/a/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .req(Method::HEAD, &format!("/v2/org/a/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(Method::DELETE, &format!("/v2/org/a/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_codes(r).await, ["BLOB_UNKNOWN"]);
    // Deleting from one repository leaves the other's link.
    let r = s
        .req(Method::HEAD, &format!("/v2/org/b/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pushes_of_one_blob_all_succeed() {
    let s = std::sync::Arc::new(start(|_| {}).await);
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 7 % 256) as u8).collect();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            s.push_blob(&format!("org/r{i}"), &data, &Creds::None).await
        }));
    }
    let d = Digest::sha256(&data);
    for t in tasks {
        assert_eq!(t.await.unwrap(), d);
    }
    for i in 0..8 {
        let r = s
            .req(Method::GET, &format!("/v2/org/r{i}/blobs/{d}"), &NONE)
            .send()
            .await
            .unwrap();
        assert_eq!(Digest::sha256(&r.bytes().await.unwrap()), d);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_by_tag_and_digest() {
    let s = start(|_| {}).await;
    let (md, m) = s.push_image("org/app", "v1", "one", &NONE).await;
    for reference in ["v1".to_string(), md.to_string()] {
        let r = s
            .req(
                Method::GET,
                &format!("/v2/org/app/manifests/{reference}"),
                &NONE,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(
            r.headers()["docker-content-digest"],
            md.to_string().as_str()
        );
        assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..], "exact bytes");
        let r = s
            .req(
                Method::HEAD,
                &format!("/v2/org/app/manifests/{reference}"),
                &NONE,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-length"], m.len().to_string().as_str());
    }
    let r = s
        .req(Method::GET, "/v2/org/app/manifests/nope", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_codes(r).await, ["MANIFEST_UNKNOWN"]);

    // PUT by digest checks the digest; extra ?tag= params tag it (OCI-Tag).
    let r = s
        .put_manifest(
            "org/app",
            &Digest::sha256(b"x").to_string(),
            OCI_MANIFEST,
            &m,
            &NONE,
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_codes(r).await, ["DIGEST_INVALID"]);
    let r = s
        .req(
            Method::PUT,
            &format!("/v2/org/app/manifests/{md}?tag=a&tag=b"),
            &NONE,
        )
        .header("content-type", OCI_MANIFEST)
        .body(m.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        r.headers()["location"],
        format!("/v2/org/app/manifests/{md}").as_str()
    );
    let tags: Vec<_> = r
        .headers()
        .get_all("oci-tag")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(tags, ["a", "b"]);

    // Invalid documents.
    for (body, ct) in [
        (&b"not json"[..], OCI_MANIFEST),
        (
            br#"{"schemaVersion":1,"fsLayers":[]}"#,
            "application/vnd.docker.distribution.manifest.v1+json",
        ),
        (
            br#"{"schemaVersion":2,"mediaType":"text/html"}"#,
            "text/html",
        ),
    ] {
        let r = s.put_manifest("org/app", "bad", ct, body, &NONE).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_codes(r).await, ["MANIFEST_INVALID"]);
    }
    // A Content-Type that contradicts mediaType is invalid.
    let r = s.put_manifest("org/app", "bad", OCI_INDEX, &m, &NONE).await;
    assert_eq!(error_codes(r).await, ["MANIFEST_INVALID"]);
    let r = s
        .put_manifest("org/app", "-bad-tag", OCI_MANIFEST, &m, &NONE)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Delete the tag: the digest stays; delete the digest: every tag of it goes.
    let r = s
        .req(Method::DELETE, "/v2/org/app/manifests/v1", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .req(Method::GET, "/v2/org/app/manifests/v1", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(Method::GET, &format!("/v2/org/app/manifests/{md}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(
            Method::DELETE,
            &format!("/v2/org/app/manifests/{md}"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    for reference in ["a".to_string(), md.to_string()] {
        let r = s
            .req(
                Method::GET,
                &format!("/v2/org/app/manifests/{reference}"),
                &NONE,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{reference}");
    }
    let r = s
        .req(
            Method::DELETE,
            &format!("/v2/org/app/manifests/{md}"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_need_their_blobs_in_the_same_repository() {
    let s = start(|_| {}).await;
    let cd = s.push_blob("org/app", b"{}", &NONE).await;
    let l1 = Digest::sha256(b"layer one");
    let l2 = Digest::sha256(b"layer two");
    let m = manifest_json(&cd, 2, &[(&l1, 9), (&l2, 9)], None);
    let r = s
        .put_manifest("org/app", "v1", OCI_MANIFEST, &m, &NONE)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    let errs = v["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 2, "{v}");
    assert!(errs.iter().all(|e| e["code"] == "MANIFEST_BLOB_UNKNOWN"));
    assert_eq!(errs[0]["detail"]["digest"], l1.to_string().as_str());

    // A blob that exists only in another repository does not count.
    s.push_blob("org/elsewhere", b"layer one", &NONE).await;
    s.push_blob("org/app", b"layer two", &NONE).await;
    let r = s
        .put_manifest("org/app", "v1", OCI_MANIFEST, &m, &NONE)
        .await;
    assert_eq!(error_codes(r).await, ["MANIFEST_BLOB_UNKNOWN"]);
    s.push_blob("org/app", b"layer one", &NONE).await;
    let r = s
        .put_manifest("org/app", "v1", OCI_MANIFEST, &m, &NONE)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);

    // A descriptor with the wrong size is invalid.
    let lied = manifest_json(&cd, 3, &[], None);
    let r = s
        .put_manifest("org/app", "v2", OCI_MANIFEST, &lied, &NONE)
        .await;
    assert_eq!(error_codes(r).await, ["MANIFEST_INVALID"]);

    // An index needs its children.
    let md = Digest::sha256(&m);
    let ghost = Digest::sha256(b"ghost");
    let index = |children: &[(&Digest, usize)]| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": children.iter().map(|(d, n)| json!({"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": n,
                "platform": {"architecture": "amd64", "os": "linux"}})).collect::<Vec<_>>()
        }))
        .unwrap()
    };
    let r = s
        .put_manifest(
            "org/app",
            "multi",
            OCI_INDEX,
            &index(&[(&md, m.len()), (&ghost, 10)]),
            &NONE,
        )
        .await;
    assert_eq!(error_codes(r).await, ["MANIFEST_BLOB_UNKNOWN"]);
    let ix = index(&[(&md, m.len())]);
    let r = s
        .put_manifest("org/app", "multi", OCI_INDEX, &ix, &NONE)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(Method::GET, "/v2/org/app/manifests/multi", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &ix[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_are_sorted_and_paged() {
    let s = start(|_| {}).await;
    let (_, m) = s.push_image("org/app", "b", "x", &NONE).await;
    for t in ["a", "C", "d", "e"] {
        let r = s.put_manifest("org/app", t, OCI_MANIFEST, &m, &NONE).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let list = |q: &str| {
        s.req(Method::GET, &format!("/v2/org/app/tags/list{q}"), &NONE)
            .send()
    };
    let r = list("").await.unwrap();
    assert!(r.headers().get("link").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"name": "org/app", "tags": ["C", "a", "b", "d", "e"]})
    );

    let r = list("?n=2").await.unwrap();
    let link = r.headers()["link"].to_str().unwrap().to_string();
    assert_eq!(link, r#"</v2/org/app/tags/list?n=2&last=a>; rel="next""#);
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!(["C", "a"]));
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let r = s.req(Method::GET, next, &NONE).send().await.unwrap();
    assert!(r.headers().get("link").is_some());
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!(["b", "d"]));
    let r = list("?n=2&last=d").await.unwrap();
    assert!(r.headers().get("link").is_none(), "last page has no Link");
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!(["e"]));
    let r = list("?last=b").await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!(["d", "e"]));
    let r = list("?n=0").await.unwrap();
    assert!(r.headers().get("link").is_none());
    assert_eq!(r.json::<Value>().await.unwrap()["tags"], json!([]));

    let r = s
        .req(Method::GET, "/v2/org/nothing/tags/list", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_codes(r).await, ["NAME_UNKNOWN"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn referrers_list_and_filter() {
    let s = start(|_| {}).await;
    let (subject, m) = s.push_image("org/app", "v1", "subj", &NONE).await;
    let empty = s.push_blob("org/app", b"{}", &NONE).await;
    let sig_body = s.push_blob("org/app", b"signature", &NONE).await;
    let artifact = |at: &str, note: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": sig_body.to_string(), "size": 9}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": m.len()},
            "annotations": {"note": note}
        }))
        .unwrap()
    };
    let sig = artifact("application/vnd.example.sig", "s");
    let sbom = artifact("application/vnd.example.sbom", "b");
    for a in [&sig, &sbom] {
        let d = Digest::sha256(a);
        let r = s
            .put_manifest("org/app", &d.to_string(), OCI_MANIFEST, a, &NONE)
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.headers()["oci-subject"], subject.to_string().as_str());
    }
    let r = s
        .req(
            Method::GET,
            &format!("/v2/org/app/referrers/{subject}"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert!(r.headers().get("oci-filters-applied").is_none());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["mediaType"], OCI_INDEX);
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let sig_entry = list
        .iter()
        .find(|e| e["digest"] == Digest::sha256(&sig).to_string().as_str())
        .unwrap();
    assert_eq!(sig_entry["artifactType"], "application/vnd.example.sig");
    assert_eq!(sig_entry["annotations"]["note"], "s");
    assert_eq!(sig_entry["size"], sig.len());
    assert_eq!(sig_entry["mediaType"], OCI_MANIFEST);

    let r = s
        .req(
            Method::GET,
            &format!("/v2/org/app/referrers/{subject}?artifactType=application/vnd.example.sbom"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        v["manifests"][0]["digest"],
        Digest::sha256(&sbom).to_string().as_str()
    );

    // No referrers: 200 and an empty index (never 404). Bad digest: 400.
    let r = s
        .req(
            Method::GET,
            &format!("/v2/org/app/referrers/{}", Digest::sha256(b"z")),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["manifests"], json!([]));
    let r = s
        .req(Method::GET, "/v2/org/app/referrers/sha256:zz", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Deleting a referrer removes it from the list.
    let r = s
        .req(
            Method::DELETE,
            &format!("/v2/org/app/manifests/{}", Digest::sha256(&sig)),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .req(
            Method::GET,
            &format!("/v2/org/app/referrers/{subject}"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["manifests"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn catalog_is_sorted_and_paged() {
    let s = start(|_| {}).await;
    for r in ["org/b", "org/a", "org/a/nested", "other/z"] {
        s.push_image(r, "v1", r, &NONE).await;
    }
    let r = s
        .req(Method::GET, "/v2/_catalog", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"repositories": ["org/a", "org/a/nested", "org/b", "other/z"]})
    );
    let r = s
        .req(Method::GET, "/v2/_catalog?n=3", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["link"],
        r#"</v2/_catalog?n=3&last=org%2Fb>; rel="next""#
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["repositories"],
        json!(["org/a", "org/a/nested", "org/b"])
    );
    let r = s
        .req(Method::GET, "/v2/_catalog?n=3&last=org%2Fb", &NONE)
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("link").is_none());
    assert_eq!(
        r.json::<Value>().await.unwrap()["repositories"],
        json!(["other/z"])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn names_are_validated_and_paths_cannot_escape() {
    let s = start(|_| {}).await;
    for path in [
        "/v2/Org/App/tags/list",
        "/v2/org/_x/tags/list",
        "/v2/org/..%2F..%2Fetc/tags/list",
        "/v2/org//app/tags/list",
    ] {
        let r = s.req(Method::GET, path, &NONE).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(error_codes(r).await, ["NAME_INVALID"], "{path}");
    }
    let r = s
        .req(Method::GET, "/v2/org/app/nothing", &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(
            Method::POST,
            "/v2/org/app/blobs/uploads/?digest-algorithm=md5",
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Nothing was written outside the root.
    assert!(!s.root.join("../etc").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn sha512_uploads() {
    let s = start(|_| {}).await;
    let data = b"five hundred and twelve".to_vec();
    let d = Digest::of(strata_oci::Algorithm::Sha512, &data);
    let r = s
        .req(
            Method::POST,
            "/v2/org/app/blobs/uploads/?digest-algorithm=sha512",
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={d}"), &NONE)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(Method::GET, &format!("/v2/org/app/blobs/{d}"), &NONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_off() {
    let s = start(|c| c.limits.header_read_timeout = std::time::Duration::from_millis(300)).await;
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    sock.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        sock.read_to_end(&mut buf),
    )
    .await;
    assert!(n.is_ok(), "the server closed the connection");
}

/// One HTTP/1.1 response from `sock`, `buf` keeping bytes read past it: `None` when the server
/// closed the connection first.
async fn read_response(
    sock: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(u16, String, Vec<u8>)> {
    let deadline = std::time::Duration::from_secs(10);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(deadline, sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no response within {deadline:?}"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(deadline, sock.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed inside a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    buf.drain(..head_end + len);
    Some((status, head, body))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_order_patch_keeps_the_connection_usable() {
    let s = start(|_| {}).await;
    let r = s
        .req(Method::POST, "/v2/conn/blobs/uploads/", &NONE)
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut buf = Vec::new();
    // The chunk claims to start at 10; the upload is at 0. Its body follows the headers a
    // moment later, as it does when a client streams it: the server has refused by then.
    let chunk = vec![7u8; 64 << 10];
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Content-Range: 10-{}\r\nContent-Length: {}\r\n\r\n",
        s.addr,
        10 + chunk.len() - 1,
        chunk.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The body and the next request may meet a closed socket on a broken server.
    let _ = sock.write_all(&chunk).await;
    let next = format!("GET {loc} HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr);
    let _ = sock.write_all(next.as_bytes()).await;

    let (status, head, _) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(status, 416, "{head}");
    assert!(head.contains("\r\nrange: 0-0\r\n"), "{head}");
    match read_response(&mut sock, &mut buf).await {
        Some((status, head, _)) => {
            assert_eq!(status, 204, "{head}");
            assert!(head.contains("\r\nrange: 0-0\r\n"), "{head}");
        }
        // Closing is fine too, but only when the 416 said so.
        None => assert!(head.contains("\r\nconnection: close\r\n"), "{head}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_large_body_closes_the_connection_and_says_so() {
    let s = start(|_| {}).await;
    let r = s
        .req(Method::POST, "/v2/conn/blobs/uploads/", &NONE)
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut buf = Vec::new();
    let head = format!(
        "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nContent-Range: 10-{}\r\nContent-Length: {}\r\n\r\n",
        s.addr,
        10 + (64 << 20) - 1,
        64 << 20
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let (status, head, _) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(status, 416, "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_reader_is_dropped_and_frees_its_connection_slot() {
    let s = start(|c| {
        c.limits.max_connections = 1;
        c.limits.send_idle_timeout = std::time::Duration::from_secs(1);
        // The push's kept-alive connection gives the slot up after this.
        c.limits.header_read_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let blob: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let d = s.push_blob("slow/reader", &blob, &NONE).await;
    // The only slot: a GET of the blob whose answer is never read.
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /v2/slow/reader/blobs/{d} HTTP/1.1\r\nHost: {}\r\n\r\n",
        s.addr
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    // A new client waits for the slot, which the stalled one gives up after 1 s of no progress.
    let http = reqwest::Client::new();
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        http.get(s.url("/v2/")).send(),
    )
    .await
    .expect("no answer while a stalled reader holds the only slot")
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(500),
        "answered at once: the connection limit is not applied"
    );
    drop(sock);
}

/// The response head without its `date` line (the one header that differs between two answers).
fn without_date(head: &str) -> String {
    head.lines()
        .filter(|l| !l.starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn large_blob_gets_and_ranges_return_exactly_the_stored_bytes() {
    let s = start(|_| {}).await;
    // Over 8 MiB (one `sendfile` call), an odd size, and bytes that differ at every offset.
    let blob: Vec<u8> = (0..(20u32 << 20) + 12_345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let d = s.push_blob("big/blob", &blob, &NONE).await;
    let path = format!("/v2/big/blob/blobs/{d}");
    let get = |extra: &str| format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n", s.addr);

    // One connection: a whole GET, two ranges (one across the 8 MiB mark, one suffix) sent
    // pipelined, then a request of another route, answered by the router.
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut buf = Vec::new();
    sock.write_all(get("").as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(status, 200, "{head}");
    assert_eq!(body.len(), blob.len());
    assert!(body == blob, "the whole blob differs from what was pushed");
    assert!(
        head.contains(&format!("\r\ndocker-content-digest: {d}\r\n")),
        "{head}"
    );
    assert!(head.contains("\r\ndocker-distribution-api-version: registry/2.0\r\n"));

    let (a, b) = ((8 << 20) - 1000, (9 << 20) + 77);
    let pipelined = get(&format!("Range: bytes={a}-{b}\r\n")) + &get("Range: bytes=-5000\r\n");
    sock.write_all(pipelined.as_bytes()).await.unwrap();
    let (status, head, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(status, 206, "{head}");
    assert!(
        head.contains(&format!(
            "\r\ncontent-range: bytes {a}-{b}/{}\r\n",
            blob.len()
        )),
        "{head}"
    );
    assert!(body == blob[a..=b], "range {a}-{b} differs");
    let (status, _, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(status, 206);
    assert!(
        body == blob[blob.len() - 5000..],
        "the suffix range differs"
    );

    let ping = format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr);
    sock.write_all(ping.as_bytes()).await.unwrap();
    let (status, head, _) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(status, 200, "{head}");
    // The router has the connection now and still serves blobs on it.
    sock.write_all(get("Range: bytes=3-9\r\n").as_bytes())
        .await
        .unwrap();
    let (status, routed, body) = read_response(&mut sock, &mut buf).await.unwrap();
    assert_eq!(status, 206, "{routed}");
    assert_eq!(body, blob[3..=9]);

    // The same range on a fresh connection, answered directly: the same headers.
    let mut direct = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut dbuf = Vec::new();
    direct
        .write_all(get("Range: bytes=3-9\r\n").as_bytes())
        .await
        .unwrap();
    let (_, direct_head, body) = read_response(&mut direct, &mut dbuf).await.unwrap();
    assert_eq!(body, blob[3..=9]);
    let mut h1: Vec<_> = without_date(&routed).lines().map(str::to_string).collect();
    let mut h2: Vec<_> = without_date(&direct_head)
        .lines()
        .map(str::to_string)
        .collect();
    h1.sort();
    h2.sort();
    assert_eq!(
        h1, h2,
        "the direct answer's headers differ from the router's"
    );

    // `Connection: close` is honoured: the answer, then the end of the stream.
    direct
        .write_all(get("Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let (status, head, body) = read_response(&mut direct, &mut dbuf).await.unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(body == blob);
    assert!(read_response(&mut direct, &mut dbuf).await.is_none());

    // Errors still come from the router, in its format, on a connection that starts with one.
    let mut other = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut obuf = Vec::new();
    let req = format!(
        "GET /v2/big/other/blobs/{d} HTTP/1.1\r\nHost: {}\r\n\r\n",
        s.addr
    );
    other.write_all(req.as_bytes()).await.unwrap();
    let (status, _, body) = read_response(&mut other, &mut obuf).await.unwrap();
    assert_eq!(status, 404);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
}
