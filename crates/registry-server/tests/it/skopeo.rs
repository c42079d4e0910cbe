//! Interop: skopeo copies an image from an OCI layout (made by strata-store) into the registry and
//! back, anonymously and with credentials through the token flow. Needs /usr/bin/skopeo (CI
//! installs it); without it the tests say so and pass.

use std::path::Path;
use std::process::Command;

use reqwest::{Method, StatusCode};
use strata_oci::{Descriptor, Digest, Manifest, media_type};
use strata_registry_server::{Admin, AuthMode, TokenScope};
use strata_store::Store;

use crate::common::*;

const SKOPEO: &str = "/usr/bin/skopeo";

fn have_skopeo() -> bool {
    if Path::new(SKOPEO).exists() {
        return true;
    }
    eprintln!("SKIPPED: {SKOPEO} is not installed (apt-get install skopeo)");
    false
}

/// A one-layer image with a real gzip tar layer, stored under `name` in a new OCI layout.
fn layout_with_image(dir: &Path, name: &str) -> (Store, Descriptor) {
    let store = Store::open(dir).unwrap();
    let mut tar_bytes = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar_bytes);
        let text = b"hello from strata's registry\n";
        let mut h = tar::Header::new_gnu();
        h.set_path("hello.txt").unwrap();
        h.set_mode(0o644);
        h.set_size(text.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, &text[..]).unwrap();
        b.finish().unwrap();
    }
    let diff_id = Digest::sha256(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
    let layer = gz.finish().unwrap();
    let (ld, ls) = store.put_blob_bytes(&layer, None).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let (cd, cs) = store.put_blob_bytes(config.as_bytes(), None).unwrap();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_string()),
        artifact_type: None,
        config: Descriptor::new(media_type::OCI_CONFIG, cd, cs),
        layers: vec![Descriptor::new(media_type::OCI_LAYER_GZIP, ld, ls)],
        subject: None,
        annotations: None,
    };
    let desc = store.put_manifest(&manifest).unwrap();
    store.set_ref(name, desc.clone()).unwrap();
    (store, desc)
}

fn skopeo(args: &[String]) {
    let out = Command::new(SKOPEO).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn round_trip(s: &Server, creds: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let (src, desc) = layout_with_image(&tmp.path().join("src"), "app:1");
    let dest = format!("docker://127.0.0.1:{}/org/app:1", s.addr.port());
    let mut push = vec![
        "copy".to_string(),
        "--dest-tls-verify=false".to_string(),
        format!("oci:{}:app:1", src.root().display()),
        dest.clone(),
    ];
    let mut pull = vec![
        "copy".to_string(),
        "--src-tls-verify=false".to_string(),
        dest.clone(),
        format!("oci:{}:back", tmp.path().join("back").display()),
    ];
    if let Some(c) = creds {
        push.insert(1, format!("--dest-creds={c}"));
        pull.insert(1, format!("--src-creds={c}"));
    }
    let push_task = tokio::task::spawn_blocking(move || skopeo(&push));
    push_task.await.unwrap();

    // The registry holds the exact manifest bytes.
    let req_creds = match creds {
        Some(c) => {
            let (u, p) = c.split_once(':').unwrap();
            Creds::Basic(u.to_string(), p.to_string())
        }
        None => Creds::None,
    };
    let r = s
        .req(Method::GET, "/v2/org/app/manifests/1", &req_creds)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-content-digest"],
        desc.digest.to_string().as_str()
    );
    let src_bytes = src.read_blob(&desc.digest).unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &src_bytes[..]);

    tokio::task::spawn_blocking(move || skopeo(&pull))
        .await
        .unwrap();
    let back = Store::open(tmp.path().join("back")).unwrap();
    let got = back.get_ref("back").unwrap().unwrap();
    assert_eq!(got.digest, desc.digest);
    let image = back.image("back").unwrap();
    assert_eq!(image.manifest_bytes, src_bytes);
    strata_oci::validate_image(&back, &got).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_round_trip_anonymous() {
    if !have_skopeo() {
        return;
    }
    let s = start(|_| {}).await;
    round_trip(&s, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_round_trip_with_credentials_and_tokens() {
    if !have_skopeo() {
        return;
    }
    let s = start(|c| c.auth = AuthMode::Orgs).await;
    let admin = Admin::open(&s.root).unwrap();
    admin.create_org("org").unwrap();
    admin.create_user("org", "dev", "s3cret").unwrap();
    round_trip(&s, Some("dev:s3cret")).await;

    // An API token works as the password too.
    let token = admin.create_token("org", TokenScope::Pull).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let args = vec![
        "copy".to_string(),
        format!("--src-creds=org:{token}"),
        "--src-tls-verify=false".to_string(),
        format!("docker://127.0.0.1:{}/org/app:1", s.addr.port()),
        format!("oci:{}:x", tmp.path().display()),
    ];
    tokio::task::spawn_blocking(move || skopeo(&args))
        .await
        .unwrap();

    // Without credentials skopeo is refused.
    let out = Command::new(SKOPEO)
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://127.0.0.1:{}/org/app:1", s.addr.port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
}
