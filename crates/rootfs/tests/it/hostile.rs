//! Hand-made hostile layers: each is refused or contained, and nothing outside the target
//! changes.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use strata_rootfs::{Compression, Error, Refusal, apply_layer};

use crate::common::{Node, RawTar, header, tree};

/// A target directory with sentinels around it: a sibling dir with files, a file beside the
/// target, and a unique absolute path in /tmp that hostile symlinks point at.
struct Arena {
    base: tempfile::TempDir,
    outside: PathBuf,
    before: BTreeMap<Vec<u8>, Node>,
    passwd: (u64, u64, Vec<u8>),
}

impl Arena {
    fn new() -> Arena {
        let base = tempfile::tempdir().unwrap();
        std::fs::create_dir(base.path().join("target")).unwrap();
        std::fs::create_dir_all(base.path().join("sentinel/victim")).unwrap();
        std::fs::write(base.path().join("sentinel/victim/keep"), b"keep").unwrap();
        std::fs::write(base.path().join("x"), b"outside x").unwrap();
        std::fs::write(base.path().join("escape"), b"original").unwrap();
        let outside = PathBuf::from(format!(
            "/tmp/strata-hostile-{}",
            base.path().file_name().unwrap().to_string_lossy()
        ));
        let md = std::fs::metadata("/etc/passwd").unwrap();
        let arena = Arena {
            before: BTreeMap::new(),
            passwd: (md.nlink(), md.ino(), std::fs::read("/etc/passwd").unwrap()),
            base,
            outside,
        };
        Arena {
            before: arena.outside_tree(),
            ..arena
        }
    }

    fn target(&self) -> PathBuf {
        self.base.path().join("target")
    }

    /// Everything under base except the target.
    fn outside_tree(&self) -> BTreeMap<Vec<u8>, Node> {
        tree(self.base.path(), true)
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b"target"))
            .collect()
    }

    fn apply(&self, layer: &[u8]) -> strata_rootfs::Result<strata_rootfs::ApplyStats> {
        apply_layer(layer, Compression::None, &self.target())
    }

    /// Nothing outside the target was created or changed.
    fn assert_contained(&self) {
        crate::common::assert_same_tree(&self.before, &self.outside_tree());
        assert!(
            !self.outside.exists(),
            "{} was created on the host",
            self.outside.display()
        );
        let md = std::fs::metadata("/etc/passwd").unwrap();
        assert_eq!(
            (md.nlink(), md.ino(), std::fs::read("/etc/passwd").unwrap()),
            self.passwd
        );
        assert!(!Path::new("/file").exists() && !Path::new("/evil").exists());
    }
}

fn refused(r: strata_rootfs::Result<strata_rootfs::ApplyStats>) -> (String, Refusal) {
    match r {
        Err(Error::Refused { entry, reason, .. }) => (entry, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn dotdot_and_absolute_names_stay_inside() {
    let a = Arena::new();
    let layer = RawTar::default()
        .file("../escape", b"pwned")
        .file("../../../../../evil", b"pwned")
        .file("/abs/path", b"abs")
        .file("./a/../../b/./c", b"c")
        .end();
    a.apply(&layer).unwrap();
    assert_eq!(std::fs::read(a.target().join("escape")).unwrap(), b"pwned");
    assert_eq!(std::fs::read(a.target().join("evil")).unwrap(), b"pwned");
    assert_eq!(std::fs::read(a.target().join("abs/path")).unwrap(), b"abs");
    assert_eq!(std::fs::read(a.target().join("b/c")).unwrap(), b"c");
    a.assert_contained();
}

#[test]
fn writes_through_absolute_symlink_land_inside() {
    let a = Arena::new();
    let outside = a.outside.to_str().unwrap().to_string();
    let layer = RawTar::default()
        .symlink("link", &outside)
        .file("link/file", b"through link")
        .symlink("a", "/etc")
        .file("a/passwd", b"root::0:0::/:/bin/sh\n")
        .end();
    a.apply(&layer).unwrap();
    let inside = a
        .target()
        .join(outside.trim_start_matches('/'))
        .join("file");
    assert_eq!(std::fs::read(inside).unwrap(), b"through link");
    assert_eq!(
        std::fs::read(a.target().join("etc/passwd")).unwrap(),
        b"root::0:0::/:/bin/sh\n"
    );
    assert!(
        std::fs::symlink_metadata(a.target().join("a"))
            .unwrap()
            .is_symlink()
    );
    a.assert_contained();
}

#[test]
fn a_symlink_to_itself_through_the_root_is_a_loop() {
    // In the target, `/etc` is the symlink `etc -> /etc`: resolving it loops, as in a chroot.
    let a = Arena::new();
    let layer = RawTar::default()
        .symlink("etc", "/etc")
        .file("etc/passwd", b"x")
        .end();
    assert_eq!(refused(a.apply(&layer)).1, Refusal::SymlinkLoop(40));
    a.assert_contained();
}

#[test]
fn writes_through_dotdot_symlinks_are_clamped_at_the_root() {
    let a = Arena::new();
    let layer = RawTar::default()
        .symlink("up", "../../..")
        .file("up/file", b"clamped")
        .dir("d")
        .symlink("d/up2", "../../sentinel")
        .file("d/up2/victim/keep", b"overwritten?")
        .end();
    a.apply(&layer).unwrap();
    assert_eq!(std::fs::read(a.target().join("file")).unwrap(), b"clamped");
    assert_eq!(
        std::fs::read(a.target().join("sentinel/victim/keep")).unwrap(),
        b"overwritten?"
    );
    a.assert_contained();
}

#[test]
fn a_file_entry_replaces_a_symlink_instead_of_writing_through_it() {
    let a = Arena::new();
    let layer = RawTar::default()
        .symlink("escape", "../escape")
        .file("escape", b"replaced")
        .symlink("x", "/etc/passwd")
        .file("x", b"not passwd")
        .end();
    a.apply(&layer).unwrap();
    let md = std::fs::symlink_metadata(a.target().join("escape")).unwrap();
    assert!(md.is_file());
    assert_eq!(std::fs::read(a.target().join("x")).unwrap(), b"not passwd");
    a.assert_contained();
}

#[test]
fn symlink_loops_are_refused() {
    let a = Arena::new();
    let layer = RawTar::default()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", b"x")
        .end();
    let (entry, reason) = refused(a.apply(&layer));
    assert_eq!(entry, "a/x");
    assert_eq!(reason, Refusal::SymlinkLoop(40));
    a.assert_contained();
}

#[test]
fn hardlinks_to_missing_or_outside_targets_are_refused() {
    for (target, shown) in [
        ("/etc/passwd", "/etc/passwd"),
        ("../x", "../x"),
        ("nope", "nope"),
        ("etcl/passwd", "etcl/passwd"),
    ] {
        let a = Arena::new();
        let layer = RawTar::default()
            .symlink("etcl", "/etc")
            .hardlink("h", target)
            .end();
        let (entry, reason) = refused(a.apply(&layer));
        assert_eq!(entry, "h");
        assert_eq!(reason, Refusal::HardlinkTargetMissing(shown.into()));
        assert!(!a.target().join("h").exists());
        a.assert_contained();
    }
}

#[test]
fn a_hardlink_to_a_lower_layers_file_is_refused_in_one_tree_too() {
    // `strata unpack` applies every layer into one tree, where the lower file exists; the
    // rule is the snapshots' (a link names a file of its own layer), so one image gives one
    // tree everywhere.
    let a = Arena::new();
    a.apply(&RawTar::default().file("f", b"lower").end())
        .unwrap();
    let upper = RawTar::default()
        .file("own", b"upper")
        .hardlink("h", "f")
        .end();
    let (entry, reason) = refused(a.apply(&upper));
    assert_eq!(entry, "h");
    assert_eq!(reason, Refusal::HardlinkToLowerLayer("f".into()));
    assert!(!a.target().join("h").exists());
    // A link to the layer's own file (even one it replaced) is fine.
    let upper = RawTar::default()
        .file("f", b"replaced")
        .hardlink("h", "f")
        .end();
    a.apply(&upper).unwrap();
    assert_eq!(std::fs::read(a.target().join("h")).unwrap(), b"replaced");
    a.assert_contained();
}

#[test]
fn hardlinks_resolve_inside_the_target() {
    let a = Arena::new();
    let layer = RawTar::default()
        .dir("etc")
        .file("etc/passwd", b"inside")
        .symlink("etcl", "/etc")
        .hardlink("h1", "/etc/passwd")
        .hardlink("h2", "../../etcl/passwd")
        .symlink("s", "/etc/passwd")
        .hardlink("h3", "s")
        .end();
    a.apply(&layer).unwrap();
    let ino = |p: &str| std::fs::symlink_metadata(a.target().join(p)).unwrap().ino();
    assert_eq!(ino("etc/passwd"), ino("h1"));
    assert_eq!(ino("etc/passwd"), ino("h2"));
    // A hard link to a symlink is the symlink itself, not what it points to.
    assert_eq!(ino("s"), ino("h3"));
    assert!(
        std::fs::symlink_metadata(a.target().join("h3"))
            .unwrap()
            .is_symlink()
    );
    a.assert_contained();
}

#[test]
fn bad_whiteouts_are_refused_and_good_ones_stay_inside() {
    for name in [".wh...", ".wh..", "sub/.wh...", ".wh."] {
        let a = Arena::new();
        let layer = RawTar::default().file(name, b"").end();
        let (_, reason) = refused(a.apply(&layer));
        assert!(
            matches!(reason, Refusal::BadWhiteout(_)),
            "{name}: {reason:?}"
        );
        a.assert_contained();
    }
    let a = Arena::new();
    std::fs::create_dir_all(a.target().join("sentinel/victim")).unwrap();
    std::fs::write(a.target().join("x"), b"inside x").unwrap();
    let victim = a.base.path().join("sentinel/victim");
    let layer = RawTar::default()
        .file("../.wh.x", b"")
        .symlink("vl", victim.to_str().unwrap())
        .file("vl/.wh.keep", b"")
        .file("vl/.wh..wh..opq", b"")
        .symlink("up", "../..")
        .file("up/sentinel/.wh.victim", b"")
        .end();
    a.apply(&layer).unwrap();
    assert!(!a.target().join("x").exists());
    assert!(!a.target().join("sentinel/victim").exists());
    a.assert_contained();
}

#[test]
fn oversized_extension_headers_are_refused() {
    let a = Arena::new();
    let huge = vec![b'a'; 2 << 20];
    let layer = RawTar::default().pax(&huge).file("f", b"x").end();
    let (_, reason) = refused(a.apply(&layer));
    assert!(
        matches!(reason, Refusal::HeaderTooLarge { kind: "PAX", .. }),
        "{reason:?}"
    );

    // Declared huge but the bytes are not even there: refused before reading.
    let layer = RawTar::default()
        .raw(&header(b"PaxHeaders/f", b'x', 1 << 40, b""))
        .end();
    let (_, reason) = refused(a.apply(&layer));
    assert!(matches!(reason, Refusal::HeaderTooLarge { size, .. } if size == 1 << 40));

    let layer = RawTar::default()
        .raw(&header(b"././@LongLink", b'L', 64 << 20, b""))
        .end();
    let (_, reason) = refused(a.apply(&layer));
    assert!(matches!(
        reason,
        Refusal::HeaderTooLarge {
            kind: "GNU long name",
            ..
        }
    ));
    a.assert_contained();
}

#[test]
fn truncated_streams_are_errors_naming_the_entry() {
    let a = Arena::new();
    let full = RawTar::default()
        .file("first", b"ok")
        .file("big", &vec![1u8; 10_000])
        .end();
    // Cut in the middle of big's data.
    let cut = &full[..512 + 512 + 512 + 4000];
    match a.apply(cut) {
        Err(Error::Truncated { entry, offset }) => {
            assert_eq!(entry, "big");
            assert!(offset > 1536, "{offset}");
        }
        other => panic!("expected truncation, got {other:?}"),
    }
    // Cut at a header boundary: the end-of-archive marker is missing.
    let cut = &full[..1024];
    assert!(matches!(a.apply(cut), Err(Error::Truncated { .. })));
    // Cut inside a header.
    let cut = &full[..1024 + 100];
    assert!(matches!(a.apply(cut), Err(Error::Truncated { .. })));

    // Truncated gzip.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&full).unwrap();
    let gz = gz.finish().unwrap();
    let t = tempfile::tempdir().unwrap();
    let err = apply_layer(&gz[..gz.len() / 2], Compression::Gzip, t.path()).unwrap_err();
    assert!(
        matches!(err, Error::Truncated { .. } | Error::Stream { .. }),
        "{err:?}"
    );
    a.assert_contained();
}

#[test]
fn malformed_and_unsupported_headers_are_refused() {
    let a = Arena::new();
    let mut bad = header(b"f", b'0', 0, b"");
    bad[0] ^= 1; // checksum no longer matches
    assert!(matches!(
        a.apply(&RawTar::default().raw(&bad).end()),
        Err(Error::BadHeader { .. })
    ));

    for flag in [b'S', b'V', b'M', b'Z'] {
        let layer = RawTar::default().raw(&header(b"weird", flag, 0, b"")).end();
        let (entry, reason) = refused(a.apply(&layer));
        assert_eq!(entry, "weird");
        assert_eq!(reason, Refusal::UnsupportedType(char::from(flag)));
    }

    for name in ["/", ".", "..", "a/.."] {
        let layer = RawTar::default().file(name, b"x").end();
        let (_, reason) = refused(a.apply(&layer));
        assert_eq!(reason, Refusal::RootNotDir("regular file"));
        let layer = RawTar::default().symlink(name, "/etc").end();
        assert_eq!(refused(a.apply(&layer)).1, Refusal::RootNotDir("symlink"));
    }
    let layer = RawTar::default().hardlink("h", "/").end();
    assert_eq!(refused(a.apply(&layer)).1, Refusal::HardlinkToRoot);

    // A file where a directory is needed.
    let layer = RawTar::default().file("f", b"").file("f/g", b"").end();
    assert!(matches!(refused(a.apply(&layer)).1, Refusal::NotADirectory(p) if p == "f"));
    a.assert_contained();
}

#[test]
fn device_nodes_are_created_inside() {
    let a = Arena::new();
    let mut dev = header(b"../dev/evil", b'3', 0, b"");
    {
        let mut h = tar::Header::from_byte_slice(&dev).clone();
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_cksum();
        dev.copy_from_slice(h.as_bytes());
    }
    let stats = a.apply(&RawTar::default().raw(&dev).end()).unwrap();
    assert_eq!(stats.specials, 1);
    let md = std::fs::symlink_metadata(a.target().join("dev/evil")).unwrap();
    assert_eq!(md.rdev(), rustix::fs::makedev(1, 3));
    a.assert_contained();
}

/// A path deeper than PATH_MAX is refused before it costs anything (one 200,000 levels
/// deep once took 24 GB), and many files deep in one tree apply in time linear in the layer
/// (10,000 files at depth 1,000 took 44 s).
#[test]
fn deep_paths_are_bounded_and_cost_what_they_hold() {
    let a = Arena::new();
    let deep = "a/".repeat(200_000) + "f";
    let layer = RawTar::default()
        .pax(&pax_path(&deep))
        .file("placeholder", b"x")
        .end();
    let started = std::time::Instant::now();
    let (_, reason) = refused(a.apply(&layer));
    assert!(
        matches!(reason, Refusal::PathTooLong { limit: 4095 }),
        "{reason:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(2));

    // Just under the bound, 2,000 files in one directory 1,000 levels down.
    let dir = "d/".repeat(1000);
    let mut tar = RawTar::default();
    for i in 0..2000 {
        let name = format!("{dir}f{i}");
        tar = tar.pax(&pax_path(&name)).file("placeholder", b"x");
    }
    let layer = tar.end();
    let b = Arena::new();
    let started = std::time::Instant::now();
    let stats = b.apply(&layer).unwrap();
    assert_eq!(stats.files, 2000);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(b.target().join(format!("{dir}f1999")).exists());
    b.assert_contained();
}

/// One PAX `path` record.
fn pax_path(path: &str) -> Vec<u8> {
    let body = format!(" path={path}\n");
    // The length prefix counts its own digits.
    let mut n = body.len() + 1;
    while format!("{n}{body}").len() != n {
        n += 1;
    }
    format!("{n}{body}").into_bytes()
}
