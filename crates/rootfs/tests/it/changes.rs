//! Whiteouts and opaque directories over a lower layer; diff_dirs and overlay upper dirs
//! turned into layers that reproduce the upper tree.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_rootfs::{
    Change, Compression, LayerOptions, LayerSource, apply_layer, changes_from_overlay_upper,
    diff_dirs, write_layer,
};

use crate::common::{RawTar, assert_same_tree, tree};

fn w(root: &Path, p: &str, data: &[u8]) {
    let p = root.join(p);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn lower_tree(root: &Path) {
    w(root, "a/1", b"one");
    w(root, "a/2", b"two");
    w(root, "b/x", b"x");
    w(root, "c/deep/y", b"y");
    w(root, "c/keep-name", b"lower");
    w(root, "keep", b"keep");
    w(root, "gone/inner/file", b"bye");
    std::os::unix::fs::symlink("keep", root.join("lnk")).unwrap();
}

fn layer_of(src: &Path, changes: Option<&[Change]>) -> Vec<u8> {
    let mut blob = Vec::new();
    let source = match changes {
        Some(changes) => LayerSource::Changes { root: src, changes },
        None => LayerSource::Dir(src),
    };
    write_layer(source, &LayerOptions::default(), &mut blob).unwrap();
    blob
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

#[test]
fn whiteouts_and_opaque_dirs_apply_over_a_lower_layer() {
    let lower = tempfile::tempdir().unwrap();
    lower_tree(lower.path());
    let src = tempfile::tempdir().unwrap();
    w(src.path(), "b/z", b"z");
    w(src.path(), "c/new", b"new");
    w(src.path(), "c/keep-name", b"upper");
    let changes = vec![
        Change::Deleted(p("a/1")),
        Change::Deleted(p("gone")),
        Change::Added(p("b/z")),
        Change::Opaque(p("c")),
        Change::Added(p("c/new")),
        Change::Added(p("c/keep-name")),
    ];
    let target = tempfile::tempdir().unwrap();
    apply_layer(
        &layer_of(lower.path(), None)[..],
        Compression::Gzip,
        target.path(),
    )
    .unwrap();
    let stats = apply_layer(
        &layer_of(src.path(), Some(&changes))[..],
        Compression::Gzip,
        target.path(),
    )
    .unwrap();
    assert_eq!(stats.whiteouts, 2);
    assert_eq!(stats.opaque_dirs, 1);

    let t = target.path();
    assert!(!t.join("a/1").exists());
    assert_eq!(std::fs::read(t.join("a/2")).unwrap(), b"two");
    assert!(!t.join("gone").exists());
    assert_eq!(std::fs::read(t.join("b/x")).unwrap(), b"x");
    assert_eq!(std::fs::read(t.join("b/z")).unwrap(), b"z");
    assert!(
        !t.join("c/deep").exists(),
        "opaque dir keeps no lower content"
    );
    assert_eq!(std::fs::read(t.join("c/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(t.join("c/keep-name")).unwrap(), b"upper");
    assert_eq!(std::fs::read(t.join("keep")).unwrap(), b"keep");
}

#[test]
fn whiteouts_and_opaque_markers_never_hide_the_same_layers_entries() {
    let target = tempfile::tempdir().unwrap();
    w(target.path(), "d/lower", b"lower");
    w(target.path(), "d/sub/lower", b"lower");
    // The marker comes after this layer's own entries in d/, and a whiteout names one of them.
    let layer = RawTar::default()
        .dir("d")
        .file("d/mine", b"mine")
        .file("d/sub/mine", b"mine")
        .file("d/.wh..wh..opq", b"")
        .file("d/.wh.mine", b"")
        .end();
    apply_layer(&layer[..], Compression::None, target.path()).unwrap();
    let got: Vec<_> = tree(target.path(), false)
        .into_keys()
        .map(|k| String::from_utf8(k).unwrap())
        .collect();
    assert_eq!(got, ["d", "d/mine", "d/sub", "d/sub/mine"]);
}

#[test]
fn diff_dirs_then_write_then_apply_over_lower_reproduces_upper() {
    let lower = tempfile::tempdir().unwrap();
    lower_tree(lower.path());
    let upper = tempfile::tempdir().unwrap();
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", lower.path().display()))
            .arg(upper.path())
            .status()
            .unwrap()
            .success()
    );
    let u = upper.path();
    std::fs::remove_file(u.join("a/1")).unwrap();
    std::fs::remove_dir_all(u.join("gone")).unwrap();
    w(u, "b/z", b"z");
    w(u, "keep", b"KEEP"); // same size, new content, new mtime
    std::fs::remove_file(u.join("lnk")).unwrap();
    std::os::unix::fs::symlink("a/2", u.join("lnk")).unwrap();
    std::fs::remove_dir_all(u.join("c/deep")).unwrap();
    w(u, "c/deep", b"now a file");
    std::fs::remove_file(u.join("b/x")).unwrap();
    w(u, "b/x/inside", b"file became dir");
    std::os::unix::fs::chown(u.join("a/2"), Some(42), Some(42)).unwrap();

    let changes = diff_dirs(lower.path(), u).unwrap();
    assert_eq!(
        changes,
        vec![
            Change::Deleted(p("a/1")),
            Change::Modified(p("a/2")),
            Change::Modified(p("b/x")),
            Change::Added(p("b/x/inside")),
            Change::Added(p("b/z")),
            Change::Modified(p("c/deep")),
            Change::Deleted(p("gone")),
            Change::Modified(p("keep")),
            Change::Modified(p("lnk")),
        ]
    );

    let target = tempfile::tempdir().unwrap();
    apply_layer(
        &layer_of(lower.path(), None)[..],
        Compression::Gzip,
        target.path(),
    )
    .unwrap();
    apply_layer(
        &layer_of(u, Some(&changes))[..],
        Compression::Gzip,
        target.path(),
    )
    .unwrap();
    assert_same_tree(&tree(u, true), &tree(target.path(), true));

    // Identical trees have no changes (the applied tree differs from `u` in sub-second
    // mtimes, which a layer does not record, so compare a tree with itself).
    assert!(diff_dirs(u, u).unwrap().is_empty());
}

#[test]
fn overlay_upper_conventions_become_changes() {
    let upper = tempfile::tempdir().unwrap();
    let u = upper.path();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        u.join("gone"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .unwrap();
    std::fs::create_dir(u.join("op")).unwrap();
    xattr::set(u.join("op"), "trusted.overlay.opaque", b"y").unwrap();
    w(u, "op/child", b"c");
    std::fs::create_dir(u.join("plain")).unwrap();
    w(u, "plain/f", b"f");
    // A real character device (not 0/0) is content, not a whiteout.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        u.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    assert_eq!(
        changes_from_overlay_upper(u).unwrap(),
        vec![
            Change::Deleted(p("gone")),
            Change::Modified(p("null")),
            Change::Opaque(p("op")),
            Change::Modified(p("op/child")),
            Change::Modified(p("plain")),
            Change::Modified(p("plain/f")),
        ]
    );
    // The opaque xattr is overlay bookkeeping: it must not end up in the layer.
    let changes = changes_from_overlay_upper(u).unwrap();
    let layer = layer_of(u, Some(&changes));
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&layer[..]));
    let mut names = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for r in pax {
                assert!(!r.unwrap().key().unwrap().contains("overlay"));
            }
        }
        names.push(String::from_utf8(e.path_bytes().into_owned()).unwrap());
    }
    assert_eq!(
        names,
        [
            ".wh.gone",
            "null",
            "op/",
            "op/.wh..wh..opq",
            "op/child",
            "plain/",
            "plain/f"
        ]
    );
}

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_real_overlay_mount_upper_dir_turns_into_a_layer_equal_to_the_merged_view() {
    let base = tempfile::tempdir().unwrap();
    let (l, u, wk, m) = (
        base.path().join("l"),
        base.path().join("u"),
        base.path().join("w"),
        base.path().join("m"),
    );
    for d in [&l, &u, &wk, &m] {
        std::fs::create_dir(d).unwrap();
    }
    lower_tree(&l);
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.display(),
        u.display(),
        wk.display()
    );
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&m)
        .status()
        .unwrap();
    assert!(st.success(), "overlay mount failed (tests run as root)");
    let mount = Mount(m.clone());

    std::fs::remove_file(m.join("a/1")).unwrap();
    std::fs::remove_dir_all(m.join("c")).unwrap();
    w(&m, "c/fresh", b"fresh"); // rmdir + mkdir of a lower dir: the kernel marks it opaque
    w(&m, "b/x", b"rewritten");
    w(&m, "new/dir/file", b"new");
    std::os::unix::fs::chown(m.join("keep"), Some(7), Some(7)).unwrap();
    let merged = tree(&m, true);
    drop(mount);

    let changes = changes_from_overlay_upper(&u).unwrap();
    assert!(changes.contains(&Change::Deleted(p("a/1"))), "{changes:?}");
    assert!(changes.contains(&Change::Opaque(p("c"))), "{changes:?}");

    let target = tempfile::tempdir().unwrap();
    apply_layer(&layer_of(&l, None)[..], Compression::Gzip, target.path()).unwrap();
    apply_layer(
        &layer_of(&u, Some(&changes))[..],
        Compression::Gzip,
        target.path(),
    )
    .unwrap();
    assert_same_tree(&merged, &tree(target.path(), true));
    assert_eq!(
        std::fs::metadata(target.path().join("keep")).unwrap().uid(),
        7
    );
}
