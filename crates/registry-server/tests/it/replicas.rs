//! Replicas: three servers over one S3 bucket (moto) and one PostgreSQL database serve one
//! registry. Requests alternate replicas; accounts, tokens and pins made through one work
//! through all; a replica killed mid-upload leaves an upload another finishes; gc on one
//! replica while another takes pushes never deletes what a tag reaches.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use strata_oci::Digest;
use strata_registry_server::{
    Admin, AuthMode, GcOptions, MetaKind, S3Config, ServerConfig, StorageKind, TokenScope,
};
use strata_test_support::Postgres;

use crate::common::*;
use crate::s3::{Moto, start_moto};

struct Cluster {
    replicas: Vec<Server>,
    storage: StorageKind,
    meta: MetaKind,
    endpoint: String,
    pg_url: String,
    _moto: Moto,
    _pg: Postgres,
}

impl Cluster {
    /// A config for one more replica (or an admin command) with its own root.
    fn config(&self, root: &std::path::Path) -> ServerConfig {
        let mut c = ServerConfig::new(root);
        c.storage = self.storage.clone();
        c.meta = self.meta.clone();
        c
    }
}

async fn cluster(test: &str, n: usize, auth: AuthMode) -> Option<Cluster> {
    let name = test.to_string();
    let pg = tokio::task::spawn_blocking(move || Postgres::start(&name))
        .await
        .unwrap()?;
    let (moto, port) = start_moto().await?;
    let endpoint = format!("http://127.0.0.1:{port}");
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/registry"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    let storage = StorageKind::S3(S3Config {
        bucket: "registry".into(),
        endpoint: Some(endpoint.clone()),
        region: "us-east-1".into(),
        access_key: "test".into(),
        secret_key: "test".into(),
        allow_http: true,
    });
    let meta = MetaKind::Postgres { url: pg.url() };
    let mut replicas = Vec::new();
    for _ in 0..n {
        let (st, mt) = (storage.clone(), meta.clone());
        replicas.push(
            start(move |c| {
                c.storage = st;
                c.meta = mt;
                c.auth = auth;
            })
            .await,
        );
    }
    Some(Cluster {
        replicas,
        storage,
        meta,
        endpoint,
        pg_url: pg.url(),
        _moto: moto,
        _pg: pg,
    })
}

/// Replica 0 as a client that sends each request to the next replica in turn.
fn alternating(c: &mut Cluster) -> &Server {
    let others: Vec<String> = c.replicas[1..].iter().map(|s| s.base.clone()).collect();
    c.replicas[0].others = others;
    &c.replicas[0]
}

fn status_range(r: &reqwest::Response) -> u64 {
    let range = r.headers()["range"].to_str().unwrap();
    let end: u64 = range.trim_start_matches("0-").parse().unwrap();
    end + 1
}

#[tokio::test(flavor = "multi_thread")]
async fn distribution_flows_alternating_replicas() {
    let Some(mut c) = cluster(
        "distribution_flows_alternating_replicas",
        3,
        AuthMode::Anonymous,
    )
    .await
    else {
        return;
    };
    let s = alternating(&mut c);
    let none = Creds::None;

    // Monolithic pushes and a manifest: every request on another replica.
    let (m1, body1) = s.push_image("org/app", "v1", "one", &none).await;
    for _ in 0..3 {
        let r = s
            .req(Method::GET, "/v2/org/app/manifests/v1", &none)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["docker-content-digest"],
            m1.to_string().as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), body1);
        let r = s
            .req(Method::HEAD, &format!("/v2/org/app/manifests/{m1}"), &none)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    // A chunked upload: POST, three PATCHes, status, closing PUT, each on the next replica.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let digest = Digest::sha256(&data);
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &none)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mut loc = r.headers()["location"].to_str().unwrap().to_string();
    for chunk in data.chunks(100_000).enumerate() {
        let (i, bytes) = chunk;
        let start = i * 100_000;
        let r = s
            .req(Method::PATCH, &loc, &none)
            .header(
                "content-range",
                format!("{start}-{}", start + bytes.len() - 1),
            )
            .header("content-type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "chunk {i}");
        assert_eq!(status_range(&r), (start + bytes.len()) as u64);
        loc = r.headers()["location"].to_str().unwrap().to_string();
        let r = s.req(Method::GET, &loc, &none).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(status_range(&r), (start + bytes.len()) as u64);
    }
    // A chunk that does not start where the upload is: refused on any replica.
    let r = s
        .req(Method::PATCH, &loc, &none)
        .header("content-range", "5-9")
        .body(vec![0u8; 5])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={digest}"), &none)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    for _ in 0..3 {
        let r = s
            .req(Method::GET, &format!("/v2/org/app/blobs/{digest}"), &none)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.bytes().await.unwrap(), data);
    }
    // A wrong digest at the close is refused and the session is gone everywhere.
    let r = s
        .req(Method::POST, "/v2/org/app/blobs/uploads/", &none)
        .send()
        .await
        .unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let wrong = Digest::sha256(b"other");
    let r = s
        .req(Method::PUT, &format!("{loc}?digest={wrong}"), &none)
        .body(b"content".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_codes(r).await, ["DIGEST_INVALID"]);
    for _ in 0..3 {
        let r = s.req(Method::GET, &loc, &none).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    // Mount into another repository, then a referrer of v1, tags, catalog.
    let r = s
        .req(
            Method::POST,
            &format!("/v2/org/other/blobs/uploads/?mount={digest}&from=org/app"),
            &none,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(
            Method::HEAD,
            &format!("/v2/org/other/blobs/{digest}"),
            &none,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cd = s.push_blob("org/app", b"{}", &none).await;
    let referrer = manifest_json(
        &cd,
        2,
        &[],
        Some(serde_json::json!({
            "artifactType": "application/vnd.example.sig",
            "subject": {"mediaType": OCI_MANIFEST, "digest": m1.to_string(), "size": body1.len()},
        })),
    );
    let rd = Digest::sha256(&referrer);
    let r = s
        .put_manifest("org/app", &rd.to_string(), OCI_MANIFEST, &referrer, &none)
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(Method::GET, &format!("/v2/org/app/referrers/{m1}"), &none)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"][0]["digest"], rd.to_string().as_str());
    s.push_image("org/app", "v2", "two", &none).await;
    let r = s
        .req(Method::GET, "/v2/org/app/tags/list", &none)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tags"], serde_json::json!(["v1", "v2"]));
    let r = s
        .req(Method::GET, "/v2/_catalog", &none)
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["org/app", "org/other"])
    );

    // Delete on one replica, gone on all.
    let r = s
        .req(
            Method::DELETE,
            &format!("/v2/org/app/manifests/{m1}"),
            &none,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    for _ in 0..3 {
        let r = s
            .req(Method::GET, "/v2/org/app/manifests/v1", &none)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_tokens_and_pins_made_through_one_replica_work_on_all() {
    let Some(c) = cluster(
        "accounts_tokens_and_pins_made_through_one_replica_work_on_all",
        3,
        AuthMode::Orgs,
    )
    .await
    else {
        return;
    };
    // The admin commands act on the shared database, each from its own root.
    let roots: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let admins: Vec<Admin> = roots
        .iter()
        .map(|r| Admin::with_config(&c.config(r.path())).unwrap())
        .collect();
    admins[0].create_org("acme").unwrap();
    admins[1].create_user("acme", "alice", "pw").unwrap();
    let token = admins[2].create_token("acme", TokenScope::Push).unwrap();
    let alice = Creds::Basic("alice".into(), "pw".into());
    let tok = Creds::Basic("acme".into(), token.clone());

    let (m, _) = c.replicas[0]
        .push_image("acme/app", "v1", "one", &alice)
        .await;
    for s in &c.replicas {
        for creds in [&alice, &tok, &Creds::Bearer(token.clone())] {
            let r = s
                .req(Method::GET, "/v2/acme/app/manifests/v1", creds)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{} {creds:?}", s.base);
        }
    }
    // A bearer token from `/token` on one replica works on the others (one signing key).
    let r = c.replicas[1]
        .req(
            Method::GET,
            "/token?service=strata&scope=repository:acme/app:pull",
            &alice,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().await.unwrap();
    let jwt = Creds::Bearer(v["token"].as_str().unwrap().to_string());
    for s in &c.replicas {
        let r = s
            .req(Method::GET, "/v2/acme/app/manifests/v1", &jwt)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", s.base);
    }
    // Revoked through one, refused by all at once.
    let id = admins[0].tokens(Some("acme")).unwrap()[0].id.clone();
    assert!(admins[1].revoke_token(&id).unwrap());
    for s in &c.replicas {
        let r = s
            .req(Method::GET, "/v2/acme/app/manifests/v1", &tok)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{}", s.base);
    }

    // A pin made through one replica protects the image from gc run on another.
    admins[0].pin("acme/app", &m, "machine-1").unwrap();
    let r = c.replicas[2]
        .req(Method::DELETE, "/v2/acme/app/manifests/v1", &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let gc = GcOptions {
        dry_run: false,
        grace: Duration::ZERO,
        upload_grace: None,
    };
    let report = admins[1].gc_with(gc.clone()).await.unwrap();
    assert!(report.manifests_removed.is_empty(), "{report:?}");
    for s in &c.replicas {
        let r = s
            .req(Method::GET, &format!("/v2/acme/app/manifests/{m}"), &alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", s.base);
    }
    assert!(admins[2].unpin("acme/app", &m, "machine-1").unwrap());
    let report = admins[0].gc_with(gc).await.unwrap();
    assert_eq!(
        report.manifests_removed,
        [("acme/app".to_string(), m.clone())]
    );
    assert_eq!(report.blobs_removed.len(), 3, "{report:?}");
    let r = c.replicas[1]
        .req(Method::GET, &format!("/v2/acme/app/manifests/{m}"), &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// Not a test on its own: with `STRATA_TEST_REPLICA` set, the body of a replica process that
/// `a_replica_killed_mid_upload_leaves_an_upload_another_finishes` starts and kills.
#[tokio::test(flavor = "multi_thread")]
async fn replica_process() {
    let Ok(spec) = std::env::var("STRATA_TEST_REPLICA") else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let mut config = ServerConfig::new(v["root"].as_str().unwrap());
    config.storage = StorageKind::S3(S3Config {
        bucket: "registry".into(),
        endpoint: Some(v["endpoint"].as_str().unwrap().to_string()),
        region: "us-east-1".into(),
        access_key: "test".into(),
        secret_key: "test".into(),
        allow_http: true,
    });
    config.meta = MetaKind::Postgres {
        url: v["pg"].as_str().unwrap().to_string(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let port_file = v["port_file"].as_str().unwrap();
    std::fs::write(format!("{port_file}.tmp"), port.to_string()).unwrap();
    std::fs::rename(format!("{port_file}.tmp"), port_file).unwrap();
    strata_registry_server::serve(config, listener)
        .await
        .unwrap();
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_mid_upload_leaves_an_upload_another_finishes() {
    let Some(c) = cluster(
        "a_replica_killed_mid_upload_leaves_an_upload_another_finishes",
        2,
        AuthMode::Anonymous,
    )
    .await
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let port_file = tmp.path().join("port");
    let spec = serde_json::json!({
        "root": tmp.path().join("root"),
        "endpoint": c.endpoint,
        "pg": c.pg_url,
        "port_file": port_file,
    });
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["replicas::replica_process", "--exact", "--nocapture"])
        .env("STRATA_TEST_REPLICA", spec.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut doomed = Killed(child);
    let mut port = None;
    for _ in 0..400 {
        if let Ok(p) = std::fs::read_to_string(&port_file) {
            port = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let doomed_base = format!(
        "http://127.0.0.1:{}",
        port.expect("replica process started")
    );
    let http = reqwest::Client::new();

    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let digest = Digest::sha256(&data);
    let first = 1_000_000;
    // Start and send a first chunk to the replica that will die.
    let r = http
        .post(format!("{doomed_base}/v2/org/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = http
        .patch(format!("{doomed_base}{loc}"))
        .header("content-range", format!("0-{}", first - 1))
        .body(data[..first].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // The second chunk is half sent when the replica is killed.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let half = data[first..first + 500_000].to_vec();
    let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) }).chain(
        futures_util::stream::once(async move {
            let _ = rx.await;
            Err(std::io::Error::other("never sent"))
        }),
    );
    let url = format!("{doomed_base}{loc}");
    let stuck = tokio::spawn(async move {
        http.patch(url)
            .header("content-range", format!("{first}-{}", data.len() - 1))
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = doomed.0.kill();
    let _ = doomed.0.wait();
    assert!(
        stuck.await.unwrap().is_err(),
        "the killed replica cannot answer"
    );
    drop(tx);

    // Another replica knows the upload and where it stands; the rest goes there.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let s = &c.replicas[0];
    let r = s.req(Method::GET, &loc, &Creds::None).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let at = status_range(&r) as usize;
    assert_eq!(
        at, first,
        "the first chunk survives, the cut one is not half kept"
    );
    let r = s
        .req(Method::PATCH, &loc, &Creds::None)
        .header("content-range", format!("{at}-{}", data.len() - 1))
        .body(data[at..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c.replicas[1]
        .req(Method::PUT, &format!("{loc}?digest={digest}"), &Creds::None)
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
        .req(
            Method::GET,
            &format!("/v2/org/app/blobs/{digest}"),
            &Creds::None,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), data);
}

/// A tiny deterministic generator (xorshift); the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Push an image whose layers are `layers` (content seeds); retried from the blobs when gc
/// deleted one of them between upload and manifest (the registry says which: BLOB_UNKNOWN).
async fn push_retrying(
    s: &Server,
    repo: &str,
    tag: &str,
    layers: &[u64],
    nonce: u64,
) -> (Digest, Vec<Digest>) {
    let none = Creds::None;
    // With no grace at all a blob uploaded before its manifest is garbage to every gc that
    // starts in between; real registries give uploads minutes.
    for _ in 0..200 {
        // The nonce makes every push's manifest its own: deleting one never takes another tag.
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","layers":{layers:?},"nonce":{nonce}}}"#
        );
        let cd = s.push_blob(repo, config.as_bytes(), &none).await;
        let mut descs = Vec::new();
        for l in layers {
            let bytes = format!("layer {l}").repeat(50).into_bytes();
            let d = Digest::sha256(&bytes);
            // Reuse what the repository has, as clients do: the race gc must survive.
            let r = s
                .req(Method::HEAD, &format!("/v2/{repo}/blobs/{d}"), &none)
                .send()
                .await
                .unwrap();
            if r.status() != StatusCode::OK {
                s.push_blob(repo, &bytes, &none).await;
            }
            descs.push((d, bytes.len()));
        }
        let refs: Vec<(&Digest, usize)> = descs.iter().map(|(d, n)| (d, *n)).collect();
        let m = manifest_json(&cd, config.len(), &refs, None);
        let r = s.put_manifest(repo, tag, OCI_MANIFEST, &m, &none).await;
        if r.status() == StatusCode::CREATED {
            let mut blobs: Vec<Digest> = descs.into_iter().map(|(d, _)| d).collect();
            blobs.push(cd);
            return (Digest::sha256(&m), blobs);
        }
        let codes = error_codes(r).await;
        assert!(
            !codes.is_empty() && codes.iter().all(|c| c == "MANIFEST_BLOB_UNKNOWN"),
            "only collected blobs may refuse a push: {codes:?}"
        );
    }
    panic!("push of {repo}:{tag} kept losing its blobs");
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_on_one_replica_while_another_pushes_never_deletes_what_is_reachable() {
    let Some(c) = cluster(
        "gc_on_one_replica_while_another_pushes_never_deletes_what_is_reachable",
        2,
        AuthMode::Anonymous,
    )
    .await
    else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("gc interleavings: seed {seed}");
    let gc_root = tempfile::tempdir().unwrap();
    let admin = std::sync::Arc::new(Admin::with_config(&c.config(gc_root.path())).unwrap());
    // Blobs get no grace; uploads in progress do (the pusher's own sessions are not garbage).
    let gc = GcOptions {
        dry_run: false,
        grace: Duration::ZERO,
        upload_grace: Some(Duration::from_secs(3600)),
    };

    // Tag → the image it names and every blob that image reaches, across rounds.
    let mut live: BTreeMap<String, (Digest, Vec<Digest>)> = BTreeMap::new();
    for round in 0..6u64 {
        let mut rng = Rng(seed.wrapping_add(round.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
        // Gc runs again and again, at random pauses, while the other replica takes pushes
        // that reuse layers of images whose tags were just deleted (garbage gc may be deleting).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let collector = {
            let (admin, stop, gc) = (admin.clone(), stop.clone(), gc.clone());
            let mut rng = Rng(rng.next() | 1);
            tokio::spawn(async move {
                let mut runs = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
                    match admin.gc_with(gc.clone()).await {
                        Ok(_) => runs += 1,
                        Err(strata_registry_server::Error::GcBusy { .. }) => {}
                        Err(e) => panic!("gc: {e}"),
                    }
                }
                runs
            })
        };
        let s = &c.replicas[1];
        for step in 0..8 {
            let tag = format!("t{}", rng.below(4));
            let layers: Vec<u64> = (0..1 + rng.below(3)).map(|_| rng.below(6)).collect();
            if rng.below(3) == 0 && live.contains_key(&tag) {
                let r = s
                    .req(
                        Method::DELETE,
                        &format!("/v2/org/app/manifests/{}", live[&tag].0),
                        &Creds::None,
                    )
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    r.status(),
                    StatusCode::ACCEPTED,
                    "round {round} step {step}"
                );
                live.remove(&tag);
                continue;
            }
            let pushed = push_retrying(s, "org/app", &tag, &layers, round * 100 + step).await;
            live.insert(tag, pushed);
            // Everything a live tag reaches is there, on both replicas, right now.
            check_reachable(&c, &live).await;
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let runs = collector.await.unwrap();
        assert!(runs > 0, "round {round}: gc never ran");
        check_reachable(&c, &live).await;
        // Once pushes stop, garbage goes: one more gc leaves exactly what tags reach.
        admin.gc_with(gc.clone()).await.unwrap();
        check_reachable(&c, &live).await;
        let mut want: BTreeSet<Digest> = BTreeSet::new();
        for (m, blobs) in live.values() {
            want.insert(m.clone());
            want.extend(blobs.iter().cloned());
        }
        let report = admin
            .gc_with(GcOptions {
                dry_run: true,
                grace: Duration::ZERO,
                upload_grace: None,
            })
            .await
            .unwrap();
        assert!(
            report.blobs_removed.is_empty(),
            "round {round}: garbage left: {report:?}"
        );
        assert_eq!(report.blobs_kept, want.len(), "round {round}: seed {seed}");
    }
}

async fn check_reachable(c: &Cluster, live: &BTreeMap<String, (Digest, Vec<Digest>)>) {
    for s in &c.replicas {
        for (tag, (m, blobs)) in live {
            let r = s
                .req(
                    Method::GET,
                    &format!("/v2/org/app/manifests/{tag}"),
                    &Creds::None,
                )
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "tag {tag} lost its manifest");
            assert_eq!(r.headers()["docker-content-digest"], m.to_string().as_str());
            for b in blobs {
                let r = s
                    .req(Method::GET, &format!("/v2/org/app/blobs/{b}"), &Creds::None)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK, "tag {tag} lost blob {b}");
                let bytes = r.bytes().await.unwrap();
                assert_eq!(Digest::sha256(&bytes), *b, "blob {b} corrupt");
            }
        }
    }
}
