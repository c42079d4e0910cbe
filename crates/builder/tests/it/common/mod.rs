//! Helpers shared by the build engine's integration tests: a temp store with a busybox base
//! image, Dockerfile contexts, and checks of the images produced.

pub mod images;

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_build::{BuildOptions, BuildOutcome, CollectProgress, Event, build};
use strata_oci::{ImageConfig, validate_image};
use strata_store::Store;
use strata_test_support::can_run_containers;

/// A busybox root filesystem as a tar stream.
pub fn busybox_tar() -> Vec<u8> {
    busybox_rootfs_tar("bin", &[])
}

/// A busybox root filesystem as a tar stream: busybox and a symlink per applet in `bin`,
/// `/etc/passwd` and `/etc/group` with root and app (1000), a sticky `/tmp`, and `links`
/// (path, target) made after the directories their targets name.
pub fn busybox_rootfs_tar(bin: &str, links: &[(&str, &str)]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in [bin, "etc", "tmp"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    for (_, target) in links {
        std::fs::create_dir_all(r.join(target)).unwrap();
    }
    for (link, target) in links {
        std::os::unix::fs::symlink(target, r.join(link)).unwrap();
    }
    std::fs::set_permissions(
        r.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    strata_test_support::install_busybox(&r.join(bin));
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", r).unwrap();
    b.into_inner().unwrap()
}

/// A fresh store holding `busybox:latest`.
pub fn store_with_busybox() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    strata_transfer::import_tarball(
        &store,
        busybox_tar().as_slice(),
        "busybox",
        &strata_transfer::ImportOptions::default(),
    )
    .unwrap();
    (dir, store)
}

/// What a RUN test starts from, where RUN steps can run (else the skip is said, and `None`):
/// a store holding `busybox:latest` (with the directory that holds it) and an empty directory
/// for the build context.
pub fn run_lab(test: &str) -> Option<(tempfile::TempDir, Store, tempfile::TempDir)> {
    if !can_run_containers(test) {
        return None;
    }
    let (dir, store) = store_with_busybox();
    Some((dir, store, tempfile::tempdir().unwrap()))
}

/// Writes `files` (path, content) under `dir`.
pub fn write_files(dir: &Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let path = dir.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
}

/// Builds and checks the image with `validate_image`; returns the outcome and the events.
pub fn build_ok(store: &Store, opts: &BuildOptions) -> (BuildOutcome, Vec<Event>) {
    let progress = CollectProgress::default();
    let out = match build(store, opts, &progress) {
        Ok(o) => o,
        Err(e) => panic!("build failed: {e}\nevents: {:#?}", progress.take()),
    };
    validate_image(store, &out.descriptor).unwrap();
    (out, progress.take())
}

/// The image's config.
pub fn config_of(store: &Store, out: &BuildOutcome) -> ImageConfig {
    ImageConfig::from_slice(&store.read_blob(&out.config_digest).unwrap()).unwrap()
}

/// `umoci unpack` of `tag` into a fresh dir; returns (guard, rootfs path).
pub fn umoci_unpack(store: &Store, tag: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let bundle = d.path().join("bundle");
    let tag = if tag.contains(':') {
        tag.to_string()
    } else {
        format!("{tag}:latest")
    };
    let st = Command::new("/usr/bin/umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", store.root().display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    (d, bundle.join("rootfs"))
}

/// Steps that ran (text), from the events.
pub fn ran(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StepDone { step, .. } => Some(step.text.clone()),
            _ => None,
        })
        .collect()
}
