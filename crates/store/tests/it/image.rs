//! Manifests and indexes in, images resolved to a platform out.

use strata_oci::{Descriptor, Digest, Index, Manifest, Platform, media_type};
use strata_store::Error;

use crate::common::{put_small_image, temp_store};

#[test]
fn image_resolves_a_manifest_ref() {
    let (_t, store) = temp_store();
    let (desc, layer, _) = put_small_image(&store, "x");
    store.set_ref("app:1", desc.clone()).unwrap();
    let img = store.image("app:1").unwrap();
    assert_eq!(img.descriptor, desc);
    assert!(img.index.is_none());
    assert_eq!(img.manifest.layers[0].digest, layer);
    assert_eq!(Digest::sha256(&img.manifest_bytes), desc.digest);
    let config: serde_json::Value = serde_json::from_slice(&img.config_bytes).unwrap();
    assert_eq!(config["os"], "linux");
    assert!(matches!(
        store.image("nope:1"),
        Err(Error::RefNotFound { .. })
    ));
}

#[test]
fn image_resolves_an_index_to_the_host_platform() {
    let (_t, store) = temp_store();
    let (host, _, _) = put_small_image(&store, "host");
    let (other, _, _) = put_small_image(&store, "other");
    let mut index = Index::new();
    let mut o = other.clone();
    o.platform = Some(Platform {
        architecture: "s390x".to_string(),
        os: "linux".to_string(),
        os_version: None,
        os_features: None,
        variant: None,
    });
    let mut h = host.clone();
    h.platform = Some(Platform::host());
    index.manifests = vec![o.clone(), h.clone()];
    let idx = store.put_index(&index).unwrap();
    store.set_ref("multi:1", idx.clone()).unwrap();

    let img = store.image("multi:1").unwrap();
    assert_eq!(img.descriptor.digest, host.digest);
    assert_eq!(img.index, Some(idx));
    let s390 = o.platform.clone().unwrap();
    assert_eq!(
        store.image_for("multi:1", &s390).unwrap().descriptor.digest,
        other.digest
    );
    let mut arm = s390;
    arm.architecture = "riscv64".to_string();
    assert!(matches!(
        store.image_for("multi:1", &arm),
        Err(Error::NoMatchingPlatform { .. })
    ));
}

#[test]
fn put_manifest_refuses_missing_blobs_and_mismatched_media_types() {
    let (_t, store) = temp_store();
    let m = Manifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_string()),
        artifact_type: None,
        config: Descriptor::new(media_type::OCI_CONFIG, Digest::sha256(b"missing"), 7),
        layers: vec![],
        subject: None,
        annotations: None,
    };
    assert!(matches!(
        store.put_manifest(&m),
        Err(Error::MissingReferencedBlob { .. })
    ));
    let bytes = serde_json::to_vec(&Index::new()).unwrap();
    assert!(matches!(
        store.put_manifest_bytes(&bytes, media_type::DOCKER_MANIFEST_LIST),
        Err(Error::BadJson { .. })
    ));
    assert!(matches!(
        store.put_manifest_bytes(b"{not json", media_type::OCI_INDEX),
        Err(Error::BadJson { .. })
    ));
    assert!(store.list_blobs().unwrap().is_empty());
}

#[test]
fn manifest_bytes_are_stored_exactly() {
    let (_t, store) = temp_store();
    let (_, layer, _) = put_small_image(&store, "x");
    let cfg = store.put_blob_bytes(b"{}", None).unwrap();
    // Odd spacing and key order, as a registry might serve it: must be kept byte for byte.
    let raw = format!(
        "{{ \"schemaVersion\": 2, \"layers\": [ {{\"digest\": \"{layer}\", \"size\": {}, \"mediaType\": \"{}\"}} ],\n \"config\": {{\"mediaType\": \"{}\", \"digest\": \"{}\", \"size\": 2}} }}",
        store.blob_size(&layer).unwrap(),
        media_type::DOCKER_LAYER_GZIP,
        media_type::DOCKER_CONFIG,
        cfg.0
    );
    let desc = store
        .put_manifest_bytes(raw.as_bytes(), media_type::DOCKER_MANIFEST)
        .unwrap();
    assert_eq!(desc.digest, Digest::sha256(raw.as_bytes()));
    store.set_ref("docker:1", desc).unwrap();
    assert_eq!(
        store.image("docker:1").unwrap().manifest_bytes,
        raw.as_bytes()
    );
}
