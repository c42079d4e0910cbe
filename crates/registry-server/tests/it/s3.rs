//! The S3 backend against a real S3 server running here (`moto_server`, from PyPI:
//! `pip install 'moto[server]'`). Without it on PATH the test says so and passes.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use strata_oci::Digest;
use strata_registry_server::{Admin, GcOptions, S3Config, StorageKind};

use crate::common::*;

pub struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn start_moto() -> Option<(Moto, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = match Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "SKIPPED: cannot run moto_server ({e}); install it with `pip install 'moto[server]'`"
            );
            return None;
        }
    };
    let moto = Moto(child);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some((moto, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("moto_server did not start listening on port {port}");
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_on_s3_pushes_pulls_and_collects() {
    let Some((_moto, port)) = start_moto().await else {
        return;
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    // moto takes unsigned requests; create the bucket with a plain PUT.
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/registry"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());

    let s3 = S3Config {
        bucket: "registry".into(),
        endpoint: Some(endpoint.clone()),
        region: "us-east-1".into(),
        access_key: "test".into(),
        secret_key: "test".into(),
        allow_http: true,
    };
    let storage = StorageKind::S3(s3);
    let st = storage.clone();
    let s = start(move |c| c.storage = st).await;
    let none = Creds::None;

    let (md, m) = s.push_image("org/app", "v1", "s3", &none).await;
    let r = s
        .req(Method::GET, "/v2/org/app/manifests/v1", &none)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &m[..]);

    // A blob larger than one multipart part, uploaded in two chunks.
    let big: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 253) as u8).collect();
    let bd = Digest::sha256(&big);
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &none)
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let half = big.len() / 2;
    let r = s
        .req(Method::PATCH, &loc, &none)
        .header("content-range", format!("0-{}", half - 1))
        .body(big[..half].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={bd}"), &none)
        .body(big[half..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let r = s
        .req(Method::GET, &format!("/v2/org/app/blobs/{bd}"), &none)
        .send()
        .await
        .unwrap();
    assert_eq!(Digest::sha256(&r.bytes().await.unwrap()), bd);
    let r = s
        .req(Method::GET, &format!("/v2/org/app/blobs/{bd}"), &none)
        .header("range", "bytes=1000-1009")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &big[1000..1010]);

    // Nothing went to the local root except uploads, the database and the key.
    assert!(!s.root.join("blobs").exists());
    assert!(!s.root.join("repos").exists());

    let r = s
        .req(Method::GET, "/v2/org/app/tags/list", &none)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["tags"],
        serde_json::json!(["v1"])
    );

    // gc over S3: the unreferenced big blob goes, the tagged image stays.
    let mut cfg = s.config.clone();
    cfg.storage = storage;
    let admin = Admin::with_config(&cfg).unwrap();
    let report = admin
        .gc_with(GcOptions {
            dry_run: false,
            grace: Duration::ZERO,
            upload_grace: None,
        })
        .await
        .unwrap();
    assert_eq!(report.blobs_removed, vec![bd.clone()], "{report:?}");
    let r = s
        .req(Method::HEAD, &format!("/v2/org/app/blobs/{bd}"), &none)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(Method::GET, &format!("/v2/org/app/manifests/{md}"), &none)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
