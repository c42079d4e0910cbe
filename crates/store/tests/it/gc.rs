//! Garbage collection keeps everything reachable (refs, indexes, subjects, pins) and nothing else.

use strata_oci::{Descriptor, Digest, Index, Manifest, Platform, media_type};
use strata_store::{Error, Store};

use crate::common::{files_under, put_small_image, temp_store};

fn all_blobs(store: &Store) -> Vec<Digest> {
    store
        .list_blobs()
        .unwrap()
        .into_iter()
        .map(|(d, _)| d)
        .collect()
}

/// Every blob the image `desc` reaches, by walking it by hand.
fn image_blobs(store: &Store, desc: &Descriptor) -> Vec<Digest> {
    let m: Manifest = serde_json::from_slice(&store.read_blob(&desc.digest).unwrap()).unwrap();
    let mut v = vec![desc.digest.clone(), m.config.digest.clone()];
    v.extend(m.layers.iter().map(|l| l.digest.clone()));
    v
}

#[test]
fn gc_keeps_refs_indexes_subjects_and_pins_and_removes_the_rest() {
    let (_t, store) = temp_store();
    let session = store.write_session().unwrap();

    // 1. Named directly.
    let (direct, _, _) = put_small_image(&store, "direct");
    store.set_ref("direct:1", direct.clone()).unwrap();

    // 2. Reached only through a named index.
    let (via_index, _, _) = put_small_image(&store, "via index");
    let mut entry = via_index.clone();
    entry.platform = Some(Platform::host());
    let mut index = Index::new();
    index.manifests.push(entry);
    let index_desc = store.put_index(&index).unwrap();
    store.set_ref("multi:1", index_desc.clone()).unwrap();

    // 3. Reached only as the `subject` of a named artifact manifest.
    let (subject, _, _) = put_small_image(&store, "subject");
    let (empty, _) = store.put_blob_bytes(b"{}", None).unwrap();
    let artifact = Manifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_string()),
        artifact_type: Some("application/example".to_string()),
        config: Descriptor::new(media_type::OCI_EMPTY, empty.clone(), 2),
        layers: vec![],
        subject: Some(subject.clone()),
        annotations: None,
    };
    let artifact_desc = store.put_manifest(&artifact).unwrap();
    store.set_ref("sig:1", artifact_desc.clone()).unwrap();

    // 4. Pinned only (a deployed release), no ref.
    let (pinned, _, _) = put_small_image(&store, "pinned");
    store.pin(&pinned.digest, "machine:m1").unwrap();

    // 5. Garbage: an image whose ref was removed, and a stray blob.
    let (gone, _, _) = put_small_image(&store, "gone");
    store.set_ref("gone:1", gone.clone()).unwrap();
    store.remove_ref("gone:1").unwrap();
    let (stray, _) = store.put_blob_bytes(b"stray", None).unwrap();
    drop(session);

    let mut keep = vec![
        index_desc.digest.clone(),
        artifact_desc.digest.clone(),
        empty,
    ];
    for d in [&direct, &via_index, &subject, &pinned] {
        keep.extend(image_blobs(&store, d));
    }
    keep.sort();
    keep.dedup();
    let mut garbage = image_blobs(&store, &gone);
    garbage.push(stray);
    garbage.sort();
    let before = all_blobs(&store);

    // Dry run: reports, removes nothing.
    let dry = store.gc(true).unwrap();
    assert_eq!(all_blobs(&store), before);
    let dry_removed: Vec<Digest> = dry.removed.iter().map(|(d, _)| d.clone()).collect();
    assert_eq!(dry_removed, garbage);

    let report = store.gc(false).unwrap();
    assert_eq!(report.removed, dry.removed);
    assert_eq!(report.kept, keep.len());
    assert_eq!(
        report.bytes_freed,
        report.removed.iter().map(|(_, n)| n).sum::<u64>()
    );
    assert_eq!(all_blobs(&store), keep);
    // Every image is still whole and readable.
    for name in ["direct:1", "multi:1"] {
        store.image(name).unwrap();
    }
    // Unpinning makes the pinned image (and only it) garbage.
    let mut pinned_blobs = image_blobs(&store, &pinned);
    pinned_blobs.sort();
    assert!(store.unpin(&pinned.digest, "machine:m1").unwrap());
    let report = store.gc(false).unwrap();
    let removed: Vec<Digest> = report.removed.into_iter().map(|(d, _)| d).collect();
    assert_eq!(removed, pinned_blobs);
}

#[test]
fn gc_refuses_while_this_store_holds_a_session() {
    let (_t, store) = temp_store();
    let _s = store.write_session().unwrap();
    assert!(matches!(
        store.gc(false),
        Err(Error::GcDuringWriteSession { sessions: 1, .. })
    ));
}

#[test]
fn gc_waits_for_a_session_in_another_store_handle() {
    let (_t, store) = temp_store();
    let other = Store::open(store.root()).unwrap();
    let session = other.write_session().unwrap();
    let (blob, _) = other.put_blob_bytes(b"not yet referenced", None).unwrap();
    std::thread::scope(|s| {
        let gc = s.spawn(|| store.gc(false).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!gc.is_finished(), "gc must wait for the write session");
        // The writer finishes its job: the blob gets a ref before the session ends.
        let desc = Descriptor::new("application/octet-stream", blob.clone(), 18);
        other.set_ref("kept:1", desc).unwrap();
        drop(session);
        let report = gc.join().unwrap();
        assert!(report.removed.is_empty(), "{report:?}");
    });
    assert!(store.has_blob(&blob));
}

#[test]
fn gc_stops_without_removing_anything_when_a_reachable_manifest_is_corrupt() {
    let (_t, store) = temp_store();
    let (desc, _, _) = put_small_image(&store, "x");
    store.set_ref("x:1", desc.clone()).unwrap();
    store.put_blob_bytes(b"garbage", None).unwrap();
    let before = all_blobs(&store);
    std::fs::write(
        store.blob_path(&desc.digest),
        b"not json at all, not a manifest",
    )
    .unwrap();
    assert!(matches!(store.gc(false), Err(Error::GcUnreadable { .. })));
    assert_eq!(all_blobs(&store), before);
}

#[test]
fn gc_removes_only_stale_temp_files() {
    let (_t, store) = temp_store();
    let tmp = store.root().join("strata/tmp");
    std::fs::write(tmp.join("blob-old"), b"partial").unwrap();
    std::fs::write(tmp.join("blob-young"), b"in flight").unwrap();
    let two_hours_ago = filetime::FileTime::from_system_time(
        std::time::SystemTime::now() - std::time::Duration::from_secs(7200),
    );
    filetime::set_file_mtime(tmp.join("blob-old"), two_hours_ago).unwrap();
    assert_eq!(store.gc(true).unwrap().temps_removed, 1);
    assert_eq!(files_under(&tmp).len(), 2);
    assert_eq!(store.gc(false).unwrap().temps_removed, 1);
    assert_eq!(files_under(&tmp), vec![tmp.join("blob-young")]);
}

/// Names under `strata/snapshots/`, sorted.
fn snapshot_names(store: &Store) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.snapshots_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn gc_removes_snapshots_of_chains_no_reachable_image_has() {
    let (_t, store) = temp_store();
    let session = store.write_session().unwrap();
    let (tagged, layer_a, diff_a) = put_small_image(&store, "tagged");
    store.set_ref("tagged:1", tagged.clone()).unwrap();
    let (pinned, _, diff_p) = put_small_image(&store, "pinned");
    store.pin(&pinned.digest, "machine:m1").unwrap();
    let (_, layer_g, diff_g) = put_small_image(&store, "gone");
    // A two-layer image reached through a named index: both of its chains are live.
    let config = serde_json::json!({
        "architecture": Platform::host().architecture, "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [diff_a.to_string(), diff_g.to_string()] },
    });
    let config = serde_json::to_vec(&config).unwrap();
    let (config_digest, config_size) = store.put_blob_bytes(&config, None).unwrap();
    let layer = |d: &Digest| {
        Descriptor::new(
            media_type::OCI_LAYER_GZIP,
            d.clone(),
            store.blob_size(d).unwrap(),
        )
    };
    let two = store
        .put_manifest(&Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config: Descriptor::new(media_type::OCI_CONFIG, config_digest, config_size),
            layers: vec![layer(&layer_a), layer(&layer_g)],
            subject: None,
            annotations: None,
        })
        .unwrap();
    let mut index = Index::new();
    index.manifests.push(two);
    let index_desc = store.put_index(&index).unwrap();
    store.set_ref("two:1", index_desc).unwrap();
    drop(session);

    let chain_ag = strata_oci::chain_id(&[diff_a.clone(), diff_g.clone()]).unwrap();
    let dir = store.snapshots_dir();
    // Live: the tagged image's, the pinned one's, both chains of the two-layer image. Dead:
    // the chain of `gone` alone (no reachable image starts with it) and an unknown chain.
    let unknown = Digest::sha256(b"no image has this");
    for d in [&diff_a, &diff_p, &chain_ag, &diff_g, &unknown] {
        std::fs::create_dir_all(dir.join(d.hex()).join("etc/deep")).unwrap();
        std::fs::write(dir.join(d.hex()).join("etc/deep/f"), "x").unwrap();
    }
    // A half-removed tree of a killed gc goes; an unpack in progress and foreign names stay.
    std::fs::create_dir_all(dir.join("tmp-gc-killed/etc")).unwrap();
    std::fs::create_dir_all(dir.join("tmp-unpacking")).unwrap();
    std::fs::create_dir_all(dir.join("notes")).unwrap();

    let mut dead = vec![diff_g.clone(), unknown.clone()];
    dead.sort_by_key(|d| d.to_string());
    let before = snapshot_names(&store);
    assert_eq!(store.prune_snapshots(true).unwrap(), dead);
    assert_eq!(store.gc(true).unwrap().snapshots_removed, dead);
    assert_eq!(snapshot_names(&store), before, "a dry run removes nothing");

    assert_eq!(store.gc(false).unwrap().snapshots_removed, dead);
    let mut left = vec![
        diff_a.hex().to_string(),
        diff_p.hex().to_string(),
        chain_ag.hex().to_string(),
        "notes".to_string(),
        "tmp-unpacking".to_string(),
    ];
    left.sort();
    assert_eq!(snapshot_names(&store), left);

    // Unpinning frees the pinned image's snapshot; a second prune finds nothing more.
    store.unpin(&pinned.digest, "machine:m1").unwrap();
    assert_eq!(store.prune_snapshots(false).unwrap(), vec![diff_p]);
    assert_eq!(store.prune_snapshots(false).unwrap(), []);
    assert!(dir.join(diff_a.hex()).join("etc/deep/f").exists());
}
