//! Garbage collection keeps what tags, indexes, referrers and pins reach, and removes the rest.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use strata_oci::Digest;
use strata_registry_server::{Admin, GcOptions};

use crate::common::*;

const NONE: Creds = Creds::None;

async fn push_manifest(
    s: &Server,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> Digest {
    let r = s
        .put_manifest(repo, reference, media_type, body, &NONE)
        .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    Digest::sha256(body)
}

/// An image manifest (untagged: pushed by digest) with its own config and a layer.
async fn untagged_image(
    s: &Server,
    repo: &str,
    seed: &str,
    extra: Option<serde_json::Value>,
) -> Digest {
    let config = format!(r#"{{"seed":"{seed}"}}"#);
    let layer = format!("layer {seed}");
    let cd = s.push_blob(repo, config.as_bytes(), &NONE).await;
    let ld = s.push_blob(repo, layer.as_bytes(), &NONE).await;
    let m = manifest_json(&cd, config.len(), &[(&ld, layer.len())], extra);
    let d = Digest::sha256(&m);
    push_manifest(s, repo, &d.to_string(), OCI_MANIFEST, &m).await
}

async fn status(s: &Server, path: &str) -> StatusCode {
    s.req(Method::HEAD, path, &NONE)
        .send()
        .await
        .unwrap()
        .status()
}

fn blob_file(s: &Server, d: &Digest) -> std::path::PathBuf {
    s.root.join("blobs/sha256").join(d.hex())
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_keeps_reachable_content_and_removes_the_rest() {
    let s = start(|_| {}).await;
    let repo = "org/app";
    // Tagged image: kept with its blobs.
    let (tagged, tagged_bytes) = s.push_image(repo, "v1", "tagged", &NONE).await;
    let tagged_layer = Digest::sha256(b"layer of tagged");
    // Untagged image: removed with its blobs.
    let orphan = untagged_image(&s, repo, "orphan", None).await;
    let orphan_layer = Digest::sha256(b"layer orphan");
    // Index (tagged) with two untagged children: all kept.
    let c1 = untagged_image(&s, repo, "child1", None).await;
    let c2 = untagged_image(&s, repo, "child2", None).await;
    let c_size = |d: &Digest| std::fs::metadata(blob_file(&s, d)).unwrap().len();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": c1.to_string(), "size": c_size(&c1)},
            {"mediaType": OCI_MANIFEST, "digest": c2.to_string(), "size": c_size(&c2)},
        ]
    }))
    .unwrap();
    let index_d = push_manifest(&s, repo, "multi", OCI_INDEX, &index).await;
    // A referrer of the tagged image: kept. A referrer of the orphan: removed.
    let subject = |d: &Digest, n: usize| {
        Some(json!({"subject": {"mediaType": OCI_MANIFEST, "digest": d.to_string(), "size": n}}))
    };
    let sig = untagged_image(&s, repo, "sig", subject(&tagged, tagged_bytes.len())).await;
    let sig_layer = Digest::sha256(b"layer sig");
    let orphan_sig = untagged_image(
        &s,
        repo,
        "orphan-sig",
        subject(&orphan, c_size(&orphan) as usize),
    )
    .await;
    // A pinned untagged image: kept while pinned.
    let pinned = untagged_image(&s, repo, "pinned", None).await;
    let pinned_layer = Digest::sha256(b"layer pinned");
    let admin = Admin::open(&s.root).unwrap();
    admin.pin(repo, &pinned, "machine-1").unwrap();
    // A blob nobody references, and an upload nobody finished.
    let dangling = s.push_blob(repo, b"dangling", &NONE).await;
    let r = s
        .req(Method::POST, &format!("/v2/{repo}/blobs/uploads/"), &NONE)
        .send()
        .await
        .unwrap();
    let upload = r.headers()["location"].to_str().unwrap().to_string();

    // Within the grace period nothing goes.
    let report = admin.gc(false).await.unwrap();
    assert!(
        report.manifests_removed.is_empty() && report.blobs_removed.is_empty(),
        "{report:?}"
    );

    let now = GcOptions {
        dry_run: true,
        grace: Duration::ZERO,
        upload_grace: None,
    };
    let dry = admin.gc_with(now.clone()).await.unwrap();
    assert!(dry.dry_run);
    let mut removed: Vec<Digest> = dry
        .manifests_removed
        .iter()
        .map(|(_, d)| d.clone())
        .collect();
    removed.sort();
    let mut expected = vec![orphan.clone(), orphan_sig.clone()];
    expected.sort();
    assert_eq!(removed, expected, "{dry:?}");
    assert!(dry.blobs_removed.contains(&dangling));
    assert!(dry.blobs_removed.contains(&orphan_layer));
    assert_eq!(dry.uploads_removed.len(), 1);
    // A dry run changes nothing.
    assert_eq!(
        status(&s, &format!("/v2/{repo}/manifests/{orphan}")).await,
        StatusCode::OK
    );
    assert!(blob_file(&s, &dangling).exists());

    let report = admin
        .gc_with(GcOptions {
            dry_run: false,
            ..now.clone()
        })
        .await
        .unwrap();
    assert_eq!(report.manifests_removed.len(), 2);
    assert!(report.bytes_freed > 0);
    for kept in [&tagged, &index_d, &c1, &c2, &sig, &pinned] {
        assert_eq!(
            status(&s, &format!("/v2/{repo}/manifests/{kept}")).await,
            StatusCode::OK,
            "{kept}"
        );
    }
    for layer in [&tagged_layer, &sig_layer, &pinned_layer] {
        assert_eq!(
            status(&s, &format!("/v2/{repo}/blobs/{layer}")).await,
            StatusCode::OK,
            "{layer}"
        );
        assert!(blob_file(&s, layer).exists());
    }
    for gone in [&orphan, &orphan_sig] {
        assert_eq!(
            status(&s, &format!("/v2/{repo}/manifests/{gone}")).await,
            StatusCode::NOT_FOUND
        );
        assert!(!blob_file(&s, gone).exists());
    }
    for gone in [&orphan_layer, &dangling] {
        assert_eq!(
            status(&s, &format!("/v2/{repo}/blobs/{gone}")).await,
            StatusCode::NOT_FOUND
        );
        assert!(!blob_file(&s, gone).exists(), "{gone}");
    }
    let r = s.req(Method::GET, &upload, &NONE).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "abandoned upload removed"
    );
    // The referrers list no longer names the removed referrer's subject entry.
    let r = s
        .req(
            Method::GET,
            &format!("/v2/{repo}/referrers/{orphan}"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["manifests"],
        json!([])
    );

    // Unpinned, the pinned image goes on the next run; a second run then has nothing to do.
    assert!(admin.unpin(repo, &pinned, "machine-1").unwrap());
    let report = admin
        .gc_with(GcOptions {
            dry_run: false,
            ..now.clone()
        })
        .await
        .unwrap();
    assert_eq!(
        report.manifests_removed,
        vec![(repo.to_string(), pinned.clone())]
    );
    assert!(!blob_file(&s, &pinned_layer).exists());
    let report = admin
        .gc_with(GcOptions {
            dry_run: false,
            ..now
        })
        .await
        .unwrap();
    assert!(
        report.manifests_removed.is_empty()
            && report.blobs_removed.is_empty()
            && report.links_removed.is_empty(),
        "{report:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_shared_with_a_live_repository_survives() {
    let s = start(|_| {}).await;
    let (_, _) = s.push_image("org/keep", "v1", "shared", &NONE).await;
    // The same config and layer pushed to another repository, whose manifest is then deleted.
    let (md, _) = s.push_image("org/drop", "v1", "shared", &NONE).await;
    let r = s
        .req(
            Method::DELETE,
            &format!("/v2/org/drop/manifests/{md}"),
            &NONE,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let admin = Admin::open(&s.root).unwrap();
    let report = admin
        .gc_with(GcOptions {
            dry_run: false,
            grace: Duration::ZERO,
            upload_grace: None,
        })
        .await
        .unwrap();
    assert!(report.blobs_removed.is_empty(), "{report:?}");
    assert_eq!(report.links_removed.len(), 2, "{report:?}");
    let layer = Digest::sha256(b"layer of shared");
    assert_eq!(
        status(&s, &format!("/v2/org/keep/blobs/{layer}")).await,
        StatusCode::OK
    );
    assert_eq!(
        status(&s, &format!("/v2/org/drop/blobs/{layer}")).await,
        StatusCode::NOT_FOUND
    );
}
