//! The snapshot cache: per-layer overlay dirs keyed by chain ID, atomic creation, diff_id
//! checks; `materialize` equals an overlay mount of the cached lowerdirs.

use std::cell::Cell;
use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_oci::{Descriptor, Digest, chain_id};
use strata_rootfs::{
    Change, Compression, Error, LayerOptions, LayerRef, LayerSource, SnapshotCache, materialize,
    overlay_lowerdir, write_layer,
};

use crate::common::{assert_same_tree, tree};

fn w(root: &Path, p: &str, data: &[u8]) {
    let p = root.join(p);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

/// Two layers: a base, and one that deletes a file, makes a dir opaque and adds a file under
/// `/tmp` (1777) without a `tmp` entry of its own.
fn two_layers(compression: Compression) -> (Vec<LayerRef>, HashMap<Digest, Vec<u8>>) {
    let base = tempfile::tempdir().unwrap();
    let b = base.path();
    w(b, "etc/os-release", b"ID=test\n");
    w(b, "etc/old", b"old");
    w(b, "opt/app/lib/a.so", b"a");
    std::fs::create_dir(b.join("tmp")).unwrap();
    std::fs::set_permissions(b.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();

    let top = tempfile::tempdir().unwrap();
    let t = top.path();
    w(t, "opt/app/new.so", b"new");
    w(t, "tmp/scratch", b"s");
    let changes = vec![
        Change::Deleted(PathBuf::from("etc/old")),
        Change::Opaque(PathBuf::from("opt/app")),
        Change::Added(PathBuf::from("opt/app/new.so")),
        Change::Added(PathBuf::from("tmp/scratch")),
    ];

    let mut blobs = HashMap::new();
    let mut layers = Vec::new();
    let opts = LayerOptions {
        compression,
        ..LayerOptions::default()
    };
    for source in [
        LayerSource::Dir(b),
        LayerSource::Changes {
            root: t,
            changes: &changes,
        },
    ] {
        let mut blob = Vec::new();
        let info = write_layer(source, &opts, &mut blob).unwrap();
        blobs.insert(info.digest.clone(), blob);
        layers.push(LayerRef {
            descriptor: info.descriptor(),
            diff_id: info.diff_id,
        });
    }
    (layers, blobs)
}

#[test]
fn ensure_unpacks_each_layer_once_in_overlay_form() {
    let (layers, blobs) = two_layers(Compression::Zstd);
    let root = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(root.path().join("snapshots")).unwrap();
    let opened = Cell::new(0);
    let open = |d: &Descriptor| {
        opened.set(opened.get() + 1);
        Ok(std::io::Cursor::new(blobs[&d.digest].clone()))
    };
    let dirs = cache.ensure(&layers, open).unwrap();
    assert_eq!(opened.get(), 2);
    let ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(
        dirs[0],
        cache.root().join(chain_id(&ids[..1]).unwrap().hex())
    );
    assert_eq!(dirs[1], cache.root().join(chain_id(&ids).unwrap().hex()));
    assert_eq!(cache.get(&layers), Some(dirs.clone()));

    // Layer 1 alone: the whiteout is a 0/0 char device, the opaque dir carries the xattr,
    // and the implied /tmp copied 1777 from the layer below.
    let top = &dirs[1];
    let md = std::fs::symlink_metadata(top.join("etc/old")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), 0);
    assert_eq!(
        xattr::get(top.join("opt/app"), "trusted.overlay.opaque").unwrap(),
        Some(b"y".to_vec())
    );
    assert!(!top.join("etc/os-release").exists());
    assert_eq!(
        std::fs::metadata(top.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );

    // Second call: nothing opened, nothing left in tmp-*.
    let dirs2 = cache.ensure(&layers, open).unwrap();
    assert_eq!(dirs, dirs2);
    assert_eq!(opened.get(), 2);
    let names: Vec<_> = std::fs::read_dir(cache.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    assert_eq!(
        overlay_lowerdir(&dirs).unwrap(),
        std::ffi::OsString::from(format!("{}:{}", dirs[1].display(), dirs[0].display()))
    );
    assert!(matches!(
        overlay_lowerdir(&[PathBuf::from("/a:b")]),
        Err(Error::OverlayPath { ch: ':', .. })
    ));
}

#[test]
fn materialize_equals_an_overlay_mount_of_the_snapshots() {
    let (layers, blobs) = two_layers(Compression::Gzip);
    let open = |d: &Descriptor| Ok(std::io::Cursor::new(blobs[&d.digest].clone()));
    let work = tempfile::tempdir().unwrap();
    let flat = work.path().join("flat");
    let stats = materialize(&layers, open, &flat).unwrap();
    assert_eq!(stats.len(), 2);
    assert!(!flat.join("etc/old").exists());
    assert!(!flat.join("opt/app/lib").exists());
    assert_eq!(std::fs::read(flat.join("opt/app/new.so")).unwrap(), b"new");
    assert_eq!(std::fs::metadata(&flat).unwrap().mode() & 0o777, 0o755);

    let cache = SnapshotCache::new(work.path().join("snap")).unwrap();
    let dirs = cache.ensure(&layers, open).unwrap();
    let m = work.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let lower = overlay_lowerdir(&dirs).unwrap();
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("ro,lowerdir={}", lower.to_str().unwrap()))
        .arg(&m)
        .status()
        .unwrap();
    assert!(st.success());
    let merged = tree(&m, true);
    Command::new("umount").arg(&m).status().unwrap();
    assert_same_tree(&tree(&flat, true), &merged);
}

#[test]
fn a_wrong_diff_id_leaves_no_snapshot_behind() {
    let (mut layers, blobs) = two_layers(Compression::Gzip);
    layers[0].diff_id = Digest::sha256(b"lies");
    let root = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(root.path()).unwrap();
    let err = cache
        .ensure(&layers, |d: &Descriptor| {
            Ok(std::io::Cursor::new(blobs[&d.digest].clone()))
        })
        .unwrap_err();
    assert!(matches!(err, Error::DiffIdMismatch { .. }), "{err:?}");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);

    // A blob opener failure is reported with the digest.
    let (layers, _) = two_layers(Compression::Gzip);
    let err = cache
        .ensure(&layers, |_: &Descriptor| -> std::io::Result<&[u8]> {
            Err(std::io::Error::other("gone"))
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::OpenBlob { ref digest, .. } if *digest == layers[0].descriptor.digest)
    );
}

#[test]
fn concurrent_creators_agree_on_one_snapshot() {
    let (layers, blobs) = two_layers(Compression::Gzip);
    let root = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(root.path()).unwrap();
    let results: Vec<Vec<PathBuf>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    cache.ensure(&layers, |d: &Descriptor| {
                        Ok(std::io::Cursor::new(blobs[&d.digest].clone()))
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    let mut names: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "no tmp-* left: {names:?}");
    assert_eq!(cache.remove_leftovers().unwrap(), 0);
}

#[test]
fn adopt_turns_an_upper_dir_into_the_snapshot_without_overlay_leftovers() {
    let root = tempfile::tempdir().unwrap();
    let cache = SnapshotCache::new(root.path().join("snapshots")).unwrap();
    let (layers, _) = two_layers(Compression::Gzip);
    let upper = root.path().join("upper");
    w(&upper, "d/file", b"x");
    std::fs::create_dir_all(upper.join("proc")).unwrap();
    w(&upper, "etc/hosts", b"");
    let _sock = std::os::unix::net::UnixListener::bind(upper.join("d/sock")).unwrap();
    xattr::set(upper.join("d"), "trusted.overlay.opaque", b"y").unwrap();
    xattr::set(upper.join("d"), "trusted.overlay.origin", b"\0handle").unwrap();
    xattr::set(upper.join("d/file"), "trusted.overlay.impure", b"y").unwrap();
    xattr::set(upper.join("d/file"), "user.kept", b"1").unwrap();
    let old = filetime::FileTime::from_unix_time(1_000_000, 0);
    for d in ["d", "etc"] {
        filetime::set_file_mtime(upper.join(d), old).unwrap();
    }

    let left_out = [Path::new("proc"), Path::new("etc/hosts")];
    assert!(cache.adopt(&layers, &upper, &left_out).unwrap());
    assert!(!upper.exists(), "renamed, not copied");
    let ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let snap = cache.path_of(&chain_id(&ids).unwrap());
    assert!(snap.is_dir(), "the upper dir is the top layer's snapshot");
    assert_eq!(std::fs::read(snap.join("d/file")).unwrap(), b"x");
    assert!(!snap.join("d/sock").exists(), "sockets are in no layer");
    assert!(!snap.join("proc").exists() && !snap.join("etc/hosts").exists());
    assert!(snap.join("etc").is_dir());
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = xattr::list(p)
            .unwrap()
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&snap.join("d")), ["trusted.overlay.opaque"]);
    assert_eq!(names(&snap.join("d/file")), ["user.kept"]);
    for d in ["d", "etc"] {
        let md = std::fs::metadata(snap.join(d)).unwrap();
        assert_eq!(
            md.mtime(),
            1_000_000,
            "{d}: mtime put back after removing entries"
        );
    }
    assert_eq!(std::fs::metadata(&snap).unwrap().mode() & 0o7777, 0o755);

    // A second adopt of the same layer keeps the first snapshot and leaves its dir alone.
    let again = root.path().join("again");
    w(&again, "other", b"y");
    assert!(!cache.adopt(&layers, &again, &[]).unwrap());
    assert!(again.join("other").exists() && !snap.join("other").exists());
}
