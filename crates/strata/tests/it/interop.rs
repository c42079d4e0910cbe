//! The store and archives read by the real tools: skopeo and umoci.

use std::process::Command;

use crate::common::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn skopeo_digest(transport_ref: &str) -> String {
    let out = run(Command::new("skopeo").args(["inspect", transport_ref]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["Digest"].as_str().unwrap().to_string()
}

#[test]
fn imported_busybox_is_read_by_skopeo_and_unpacked_by_umoci_with_the_same_tree() {
    if !have("skopeo") || !have("umoci") {
        return;
    }
    let env = Env::new();
    let digest = import_busybox(&env, "busybox:1");
    let store = env.store();
    let store = store.to_str().unwrap();

    // skopeo reads the layout as it is, by ref name.
    assert_eq!(skopeo_digest(&format!("oci:{store}:busybox:1")), digest);
    let raw = run(Command::new("skopeo").args([
        "inspect",
        "--config",
        &format!("oci:{store}:busybox:1"),
    ]));
    let config: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));

    // skopeo copies it out: the same manifest, every blob verified by skopeo on the way.
    let dir = env.path("copied");
    run(Command::new("skopeo").args([
        "copy",
        "--preserve-digests",
        &format!("oci:{store}:busybox:1"),
        &format!("dir:{}", dir.display()),
    ]));
    let manifest = std::fs::read(dir.join("manifest.json")).unwrap();
    assert_eq!(strata_oci::Digest::sha256(&manifest).to_string(), digest);

    // umoci unpacks the same file tree as the tarball we imported.
    let bundle = env.path("bundle");
    run(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{store}:busybox:1"),
        bundle.to_str().unwrap(),
    ]));
    let want = tree_listing(&env.path("rootfs"));
    let got = tree_listing(&bundle.join("rootfs"));
    assert!(
        want.len() > 250,
        "busybox has hundreds of applets: {}",
        want.len()
    );
    assert_eq!(got, want, "umoci's tree differs from the imported one");

    // And `strata unpack` gives the same tree as umoci.
    let ours = env.path("ours");
    env.ok(&["unpack", "busybox:1", ours.to_str().unwrap()]);
    assert_eq!(tree_listing(&ours), want, "strata unpack's tree differs");
}

#[test]
fn saved_archives_are_read_by_skopeo_and_load_back_to_the_same_image() {
    if !have("skopeo") {
        return;
    }
    let env = Env::new();
    let digest = import_busybox(&env, "busybox:1");
    let docker_tar = env.path("docker.tar");
    let oci_tar = env.path("oci.tar");
    env.ok(&["save", "busybox:1", "-o", docker_tar.to_str().unwrap()]);
    env.ok(&[
        "save",
        "busybox:1",
        "-o",
        oci_tar.to_str().unwrap(),
        "--format",
        "oci",
    ]);

    // docker-archive: skopeo sees the tag and the layer count.
    let out = run(Command::new("skopeo").args([
        "inspect",
        &format!("docker-archive:{}", docker_tar.display()),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["Layers"].as_array().unwrap().len(), 1);
    assert_eq!(v["Architecture"], "amd64");
    // OCI archive: the very same manifest.
    assert_eq!(
        skopeo_digest(&format!("oci-archive:{}:busybox:1", oci_tar.display())),
        digest
    );

    // Both load back into a fresh store as the same image (same manifest digest).
    for archive in [&docker_tar, &oci_tar] {
        let other = Env::new();
        let out = other.ok(&["load", "-i", archive.to_str().unwrap()]);
        assert_eq!(out.trim(), "Loaded image: busybox:1");
        let v: serde_json::Value =
            serde_json::from_str(&other.ok(&["inspect", "busybox:1", "--json"])).unwrap();
        assert_eq!(
            v["descriptor"]["digest"],
            digest.as_str(),
            "{}",
            archive.display()
        );
        other.ok(&["validate", "busybox:1"]);
    }

    // An archive skopeo wrote (from our store) loads too.
    let skopeo_tar = env.path("skopeo.tar");
    run(Command::new("skopeo").args([
        "copy",
        &format!("oci:{}:busybox:1", env.store().display()),
        &format!("docker-archive:{}:other/name:2", skopeo_tar.display()),
    ]));
    let other = Env::new();
    assert_eq!(
        other
            .ok(&["load", "-i", skopeo_tar.to_str().unwrap()])
            .trim(),
        "Loaded image: other/name:2"
    );
    other.ok(&["validate", "other/name:2"]);
}
