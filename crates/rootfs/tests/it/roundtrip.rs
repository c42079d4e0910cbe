//! Tree → layer → apply gives the same tree; layers are reproducible; GNU tar agrees with us.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use strata_oci::Digest;
use strata_rootfs::{
    Compression, LayerOptions, LayerSource, MtimePolicy, apply_layer, decompress, write_layer,
};

use crate::common::{assert_same_tree, tree};

/// A v2 `security.capability` value granting cap_net_bind_service (bit 10), effective.
const CAP_NET_BIND: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn mknod(path: &Path, ft: rustix::fs::FileType, major: u32, minor: u32) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        ft,
        rustix::fs::Mode::from_raw_mode(0o640),
        rustix::fs::makedev(major, minor),
    )
    .unwrap();
}

/// A tree with every kind of entry a layer can hold.
fn rich_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    w("empty", b"");
    w("one", b"1");
    w("dir/block511", &vec![7u8; 511]);
    w("dir/block512", &vec![8u8; 512]);
    w("dir/block513", &vec![9u8; 513]);
    w(
        "dir/sub/big",
        &(0..300_000u32)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let long_dir = "d".repeat(90);
    let long_name = format!("{long_dir}/{}", "n".repeat(120));
    w(&long_name, b"long name");
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("dir/sub/big", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink(format!("/{}", "t".repeat(150)), root.join("long-link")).unwrap();
    std::fs::hard_link(root.join("dir/sub/big"), root.join("hard-a")).unwrap();
    std::fs::hard_link(root.join("dir/sub/big"), root.join("zz-hard-b")).unwrap();
    mknod(&root.join("fifo"), rustix::fs::FileType::Fifo, 0, 0);
    mknod(
        &root.join("null"),
        rustix::fs::FileType::CharacterDevice,
        1,
        3,
    );
    mknod(&root.join("loop9"), rustix::fs::FileType::BlockDevice, 7, 9);
    w("suid", b"#!/bin/sh\n");
    std::os::unix::fs::chown(root.join("suid"), Some(1234), Some(5678)).unwrap();
    std::fs::set_permissions(root.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::create_dir(root.join("private")).unwrap();
    std::os::unix::fs::chown(root.join("private"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::create_dir(root.join("sticky")).unwrap();
    std::fs::set_permissions(root.join("sticky"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    w("capped", b"binary");
    xattr::set(root.join("capped"), "security.capability", &CAP_NET_BIND).unwrap();
    // user xattrs need filesystem support; tolerate its absence in the fixture.
    let _ = xattr::set(root.join("one"), "user.note", b"hello\n\0binary\xff\n");
    filetime::set_file_mtime(
        root.join("one"),
        filetime::FileTime::from_unix_time(1_500_000_000, 0),
    )
    .unwrap();
}

fn write(src: &Path, opts: &LayerOptions) -> (strata_rootfs::LayerInfo, Vec<u8>) {
    let mut blob = Vec::new();
    let info = write_layer(LayerSource::Dir(src), opts, &mut blob).unwrap();
    (info, blob)
}

#[test]
fn round_trip_preserves_everything_for_each_compression() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let want = tree(src.path(), true);
    assert!(
        want.get(&b"capped"[..])
            .unwrap()
            .xattrs
            .iter()
            .any(|(k, _)| k == b"security.capability")
    );

    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let opts = LayerOptions {
            compression,
            ..LayerOptions::default()
        };
        let (info, blob) = write(src.path(), &opts);

        // Both digests were computed in the write pass; check them against the bytes.
        assert_eq!(info.digest, Digest::sha256(&blob), "{compression:?}");
        assert_eq!(info.size, blob.len() as u64);
        assert_eq!(info.media_type, compression.oci_layer_media_type());
        let mut plain = Vec::new();
        decompress(&blob[..], compression)
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(info.diff_id, Digest::sha256(&plain));
        assert_eq!(info.uncompressed_size, plain.len() as u64);
        if compression != Compression::None {
            assert!(blob.len() < plain.len());
        }

        let dst = tempfile::tempdir().unwrap();
        let stats = apply_layer(&blob[..], compression, dst.path()).unwrap();
        assert_eq!(stats.diff_id, info.diff_id);
        assert_eq!(stats.uncompressed_size, info.uncompressed_size);
        assert_eq!(stats.hardlinks, 2);
        assert_eq!(stats.specials, 3);
        assert_eq!(stats.xattr_failures, 0);
        assert_same_tree(&want, &tree(dst.path(), true));

        let ino = |p: &str| std::fs::metadata(dst.path().join(p)).unwrap().ino();
        assert_eq!(ino("dir/sub/big"), ino("hard-a"));
        assert_eq!(ino("dir/sub/big"), ino("zz-hard-b"));
    }
}

#[test]
fn entries_are_sorted_with_empty_names_and_no_atime() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let (_, blob) = write(
        src.path(),
        &LayerOptions {
            compression: Compression::None,
            ..LayerOptions::default()
        },
    );
    let mut archive = tar::Archive::new(&blob[..]);
    let mut names = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header();
        assert_eq!(h.username_bytes(), Some(&b""[..]));
        assert_eq!(h.groupname_bytes(), Some(&b""[..]));
        let path = e.path_bytes().into_owned();
        // No atime/ctime records (our own PAX parser is checked in the unit tests; the tar
        // crate's splits binary xattr values at newlines, so only look at the keys it finds).
        if let Ok(Some(pax)) = e.pax_extensions() {
            for rec in pax.flatten() {
                let key = rec.key().unwrap_or_default().to_string();
                assert!(
                    !key.contains("atime") && !key.contains("ctime"),
                    "unexpected PAX {key}"
                );
            }
        }
        let mut p = path.clone();
        if p.ends_with(b"/") {
            p.pop();
        }
        names.push(p);
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(
        names.iter().any(|n| n.len() > 200),
        "the long name went through PAX"
    );
}

#[test]
fn clamped_mtimes_give_identical_digests_after_touching() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let opts = LayerOptions::reproducible(Compression::Gzip, 1_000_000_000);
    let (a, blob_a) = write(src.path(), &opts);

    // Touch everything (mtime = now, later than the epoch) and write again.
    for (p, _) in tree(src.path(), false) {
        let p = src
            .path()
            .join(std::ffi::OsStr::from_encoded_bytes_unchecked_safe(&p));
        let _ = filetime::set_symlink_file_times(
            &p,
            filetime::FileTime::now(),
            filetime::FileTime::now(),
        );
    }
    let (b, blob_b) = write(src.path(), &opts);
    assert_eq!(a, b);
    assert_eq!(blob_a, blob_b);

    // Same for zstd, and `Set` ignores the files' mtimes entirely.
    let z = LayerOptions {
        mtime: MtimePolicy::Set(0),
        ..LayerOptions::reproducible(Compression::Zstd, 0)
    };
    assert_eq!(write(src.path(), &z).0, write(src.path(), &z).0);

    // Keeping real mtimes does change the digest after a touch (the test above is not vacuous).
    let keep = LayerOptions::default();
    let before = write(src.path(), &keep).0;
    filetime::set_file_mtime(
        src.path().join("one"),
        filetime::FileTime::from_unix_time(1, 0),
    )
    .unwrap();
    assert_ne!(before.diff_id, write(src.path(), &keep).0.diff_id);
}

trait FromBytes {
    fn from_encoded_bytes_unchecked_safe(b: &[u8]) -> &std::ffi::OsStr;
}
impl FromBytes for std::ffi::OsStr {
    fn from_encoded_bytes_unchecked_safe(b: &[u8]) -> &std::ffi::OsStr {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

#[test]
fn owner_override_records_fixed_ids() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let opts = LayerOptions {
        owner: Some((0, 0)),
        ..LayerOptions::default()
    };
    let (_, blob) = write(src.path(), &opts);
    let dst = tempfile::tempdir().unwrap();
    apply_layer(&blob[..], Compression::Gzip, dst.path()).unwrap();
    for (p, node) in tree(dst.path(), false) {
        assert_eq!(
            (node.uid, node.gid),
            (0, 0),
            "{}",
            String::from_utf8_lossy(&p)
        );
    }
}

#[test]
fn gnu_tar_reads_our_layers_and_we_read_gnu_tars() {
    let src = tempfile::tempdir().unwrap();
    rich_tree(src.path());
    let want = tree(src.path(), true);

    // Ours → GNU tar.
    let (_, blob) = write(
        src.path(),
        &LayerOptions {
            compression: Compression::None,
            ..LayerOptions::default()
        },
    );
    let work = tempfile::tempdir().unwrap();
    let tar_path = work.path().join("layer.tar");
    std::fs::write(&tar_path, &blob).unwrap();
    let out = tempfile::tempdir().unwrap();
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--same-owner", "-xpf"])
        .arg(&tar_path)
        .arg("-C")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(st.success());
    assert_same_tree(&want, &tree(out.path(), true));

    // GNU tar (PAX format, xattrs) → ours.
    let gnu = work.path().join("gnu.tar");
    let st = Command::new("tar")
        .args(["--format=pax", "--xattrs", "--xattrs-include=*", "-cf"])
        .arg(&gnu)
        .arg("-C")
        .arg(src.path())
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let dst = tempfile::tempdir().unwrap();
    let file = std::fs::File::open(&gnu).unwrap();
    apply_layer(file, Compression::None, dst.path()).unwrap();
    assert_same_tree(&want, &tree(dst.path(), true));
}

/// Files read where they are (`LayerSource::Staged`) give the very layer their copies in the
/// staging tree would: same bytes, same digests.
#[test]
fn files_read_in_place_give_the_layer_of_their_staged_copies() {
    let host = tempfile::tempdir().unwrap();
    let copied = tempfile::tempdir().unwrap();
    let staged = tempfile::tempdir().unwrap();
    let uid = rustix::process::geteuid().as_raw();
    let gid = rustix::process::getegid().as_raw();
    let mut files = std::collections::BTreeMap::new();
    for (i, (name, mode)) in [
        ("app/a.txt", 0o644),
        ("app/sub/run.sh", 0o755),
        ("top", 0o600),
    ]
    .into_iter()
    .enumerate()
    {
        let src = host.path().join(format!("src{i}"));
        std::fs::write(&src, vec![b'x' + i as u8; 700 * (i + 1)]).unwrap();
        let dst = copied.path().join(name);
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&src, &dst).unwrap();
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some(parent) = Path::new(name)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(staged.path().join(parent)).unwrap();
        }
        files.insert(
            name.as_bytes().to_vec(),
            strata_rootfs::HostFile {
                path: src,
                mode,
                uid,
                gid,
            },
        );
    }
    for dir in ["app", "app/sub"] {
        for root in [copied.path(), staged.path()] {
            std::fs::set_permissions(root.join(dir), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
    }
    let opts = LayerOptions {
        mtime: MtimePolicy::Set(0),
        ..LayerOptions::default()
    };
    let (want, want_blob) = write(copied.path(), &opts);
    let mut blob = Vec::new();
    let source = LayerSource::Staged {
        root: staged.path(),
        files: &files,
    };
    let got = write_layer(source, &opts, &mut blob).unwrap();
    assert_eq!(got, want);
    assert_eq!(blob, want_blob);

    // A file swapped for a symlink since it was recorded is refused, never followed.
    let victim = host.path().join("src0");
    std::fs::remove_file(&victim).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &victim).unwrap();
    let err = write_layer(source, &opts, &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("src0"), "{err}");
}
