//! Big build contexts: the stat cache spares reading unchanged files, a one-file change
//! reuses the gzip members of the last layer, and that layer is an ordinary gzip blob that
//! tar, skopeo and Docker read, with the same digest as one compressed from scratch.

use std::path::Path;
use std::process::Command;

use strata_build::BuildOptions;
use strata_oci::{Digest, Manifest};
use strata_store::Store;
use strata_test_support::{Dockerd, check, is_root, on_path, skip};

use crate::common::*;

/// `n` text files of 4–12 KiB (different words per file, so the layer does not shrink to
/// nothing), 50 per directory, and a Dockerfile copying them all.
fn big_context(dir: &Path, n: usize) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..n {
        let path = dir.join(format!("d{:02}/f{i:04}.txt", i / 50));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let size = 4096 + (next() % 8192) as usize;
        let mut text = String::with_capacity(size + 16);
        while text.len() < size {
            text.push_str(&format!("{:x} ", next() % 100_000));
        }
        std::fs::write(path, text).unwrap();
    }
    std::fs::write(dir.join("Dockerfile"), "FROM scratch\nCOPY . /app/\n").unwrap();
}

fn layer_of(store: &Store, manifest: &Digest) -> Digest {
    let m = Manifest::from_slice(&store.read_blob(manifest).unwrap()).unwrap();
    assert_eq!(m.layers.len(), 1);
    m.layers[0].digest.clone()
}

fn build_tagged(store: &Store, ctx: &Path) -> strata_build::BuildOutcome {
    let mut opts = BuildOptions::new(ctx);
    opts.tags = vec!["big:latest".into()];
    build_ok(store, &opts).0
}

#[test]
fn a_one_file_change_reuses_members_and_the_layer_reads_everywhere() {
    let ctx = tempfile::tempdir().unwrap();
    big_context(ctx.path(), 600);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("a")).unwrap();
    // Older than the stat cache's margin, so the first build records every file.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let first = build_tagged(&store, ctx.path());
    assert_eq!(
        first.context_files_read, 601,
        "600 files and the Dockerfile"
    );
    assert_eq!(first.context_known_keys, 0);
    let noop = build_tagged(&store, ctx.path());
    assert_eq!(noop.steps_run, 0);
    assert_eq!(noop.context_files_read, 0, "a no-op build reads no file");
    assert_eq!(
        noop.context_known_keys, 1,
        "every stat unchanged: the COPY's key is the known one"
    );
    assert_eq!(noop.descriptor, first.descriptor);
    let old_layer = layer_of(&store, &first.descriptor.digest);

    let changed = ctx.path().join("d06/f0300.txt");
    let mut text = std::fs::read_to_string(&changed).unwrap();
    text.insert_str(100, "a line inserted in the middle of the layer\n");
    std::fs::write(&changed, &text).unwrap();
    let second = build_tagged(&store, ctx.path());
    assert_eq!(second.steps_run, 1);
    assert_eq!(
        second.context_files_read, 1,
        "only the changed file is read for the key"
    );
    assert_eq!(second.context_known_keys, 0, "a stat changed");
    let layer = layer_of(&store, &second.descriptor.digest);
    assert_ne!(layer, old_layer);

    // The same context built in a store without any members: the same blob.
    let fresh = Store::open(dir.path().join("b")).unwrap();
    let again = build_tagged(&fresh, ctx.path());
    assert_eq!(layer_of(&fresh, &again.descriptor.digest), layer);
    assert_eq!(again.descriptor, second.descriptor);

    // GNU tar reads the multi-member blob and finds the change.
    let blob = store.blob_path(&layer);
    let listing = check(Command::new("tar").arg("-tzf").arg(&blob));
    assert_eq!(listing.lines().filter(|l| l.ends_with(".txt")).count(), 600);
    let out = tempfile::tempdir().unwrap();
    check(
        Command::new("tar")
            .arg("-xzf")
            .arg(&blob)
            .arg("-C")
            .arg(out.path()),
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("app/d06/f0300.txt")).unwrap(),
        text
    );

    // skopeo copies it out of the store (verifying every digest) and decompresses it.
    if on_path("skopeo") {
        let dest = tempfile::tempdir().unwrap();
        check(
            Command::new("skopeo")
                .args(["copy", "--dest-decompress"])
                .arg(format!("oci:{}:big:latest", store.root().display()))
                .arg(format!("dir:{}", dest.path().display())),
        );
    } else {
        skip("context: skopeo is not installed (apt-get install skopeo)");
    }

    // Docker loads it (checking each layer's diff_id against its decompressed bytes).
    if !(is_root() && on_path("dockerd") && Path::new("/usr/bin/docker").exists()) {
        skip(
            "context: docker load needs root, dockerd and /usr/bin/docker (apt-get install docker.io)",
        );
        return;
    }
    let archive = dir.path().join("big.tar");
    strata_transfer::save_archive(
        &store,
        &["big:latest".to_string()],
        strata_transfer::ArchiveFormat::Docker,
        &archive,
    )
    .unwrap();
    let docker = Dockerd::start("/usr/bin/docker");
    docker.ok(120, &["load", "-i", archive.to_str().unwrap()]);
    let ids = docker.ok(
        30,
        &["image", "inspect", "-f", "{{.RootFS.Layers}}", "big:latest"],
    );
    let diff_id = config_of(&store, &second).diff_ids()[0].to_string();
    assert!(ids.contains(&diff_id), "{ids} lacks {diff_id}");
}

/// A COPY whose files are unchanged but whose key is not (an earlier step changed) takes its
/// key from the known keys, without the files' records: the next build still names the file
/// that changed.
#[test]
fn a_copy_keyed_from_a_known_key_still_explains_file_by_file() {
    let ctx = tempfile::tempdir().unwrap();
    big_context(ctx.path(), 100);
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nARG V=1\nENV V=$V\nCOPY . /app/\n",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Older than the stat cache's margin: the first build knows the COPY's key.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["known:latest".into()];
    let (first, _) = build_ok(&store, &opts);
    assert_eq!((first.steps_run, first.context_known_keys), (2, 0));

    opts.build_args.insert("V".into(), "2".into());
    let (second, _) = build_ok(&store, &opts);
    assert_eq!(second.steps_run, 2, "the ENV and so the COPY after it");
    assert_eq!(second.context_known_keys, 1);
    assert_eq!(second.context_files_read, 0);

    std::fs::write(ctx.path().join("d01/f0070.txt"), "changed").unwrap();
    opts.explain = true;
    let (third, _) = build_ok(&store, &opts);
    assert_eq!(third.steps_run, 1);
    assert_eq!(third.context_known_keys, 0);
    let reason = &third.explanations[0].1;
    assert!(reason.contains("file `d01/f0070.txt` changed"), "{reason}");
    assert!(!reason.contains("f0071"), "{reason}");
}

/// Every entry of the one layer of `manifest`: path bytes and content.
fn layer_files(store: &Store, manifest: &Digest) -> Vec<(Vec<u8>, Vec<u8>)> {
    let blob = store.read_blob(&layer_of(store, manifest)).unwrap();
    let plain = strata_rootfs::decompress(blob.as_slice(), strata_rootfs::sniff_compression(&blob))
        .unwrap();
    let mut t = tar::Archive::new(plain);
    let mut out = Vec::new();
    for e in t.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path_bytes().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        out.push((path, data));
    }
    out
}

#[test]
fn names_that_are_not_utf8_are_copied_and_keyed_by_their_bytes() {
    use std::os::unix::ffi::OsStrExt;
    let name = |b: &[u8]| std::ffi::OsStr::from_bytes(b).to_os_string();
    let ctx = tempfile::tempdir().unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY . /app/\n",
    )
    .unwrap();
    std::fs::create_dir(ctx.path().join(name(b"dir\xfe"))).unwrap();
    std::fs::write(ctx.path().join(name(b"dir\xfe/a\xff")), "one").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["names:latest".into()];
    opts.explain = true;
    let (first, _) = build_ok(&store, &opts);
    assert_eq!(first.steps_run, 1);
    let files = layer_files(&store, &first.descriptor.digest);
    assert!(
        files.contains(&(b"app/dir\xfe/a\xff".to_vec(), b"one".to_vec())),
        "the layer holds the name's bytes: {files:?}"
    );

    // Another name that no UTF-8 form tells apart from the first (both are `a\u{FFFD}`
    // lossily): the key must change, and the layer must have the new name.
    std::fs::rename(
        ctx.path().join(name(b"dir\xfe/a\xff")),
        ctx.path().join(name(b"dir\xfe/a\xfd")),
    )
    .unwrap();
    let (second, _) = build_ok(&store, &opts);
    assert_eq!(second.steps_run, 1, "a renamed file is a new COPY");
    let reason = &second.explanations[0].1;
    assert!(
        reason.contains("file `dir\\xfe/a\\xfd` added")
            && reason.contains("file `dir\\xfe/a\\xff` removed"),
        "{reason}"
    );
    let files = layer_files(&store, &second.descriptor.digest);
    assert!(
        files.contains(&(b"app/dir\xfe/a\xfd".to_vec(), b"one".to_vec())),
        "{files:?}"
    );
    assert!(
        !files.iter().any(|(p, _)| p.ends_with(b"a\xff")),
        "{files:?}"
    );

    let (third, _) = build_ok(&store, &opts);
    assert_eq!(
        (third.steps_run, third.steps_cached),
        (0, 1),
        "nothing changed"
    );
}
