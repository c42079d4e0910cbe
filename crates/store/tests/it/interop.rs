//! The store is a real OCI image layout: skopeo and umoci read our images as they are.

use std::path::Path;
use std::process::Command;

use crate::common::{put_small_image, temp_store};

fn tool(path: &str) -> Option<&Path> {
    let p = Path::new(path);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("!!!! SKIPPED: {path} is not installed; OCI interop is NOT verified !!!!");
        None
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn skopeo_inspects_our_images_by_full_name_and_by_plain_tag() {
    let Some(skopeo) = tool("/usr/bin/skopeo") else {
        return;
    };
    let (_t, store) = temp_store();
    let (desc, layer, _) = put_small_image(&store, "hello from strata\n");
    store.set_ref("myapp:latest", desc.clone()).unwrap();
    store.set_ref("latest", desc.clone()).unwrap();
    store
        .set_ref("docker.io/library/debian:12", desc.clone())
        .unwrap();
    let image = store.image("myapp:latest").unwrap();

    // skopeo splits `oci:DIR:REF` at the first colon after DIR, so a ref name may contain `:`.
    for name in ["myapp:latest", "latest", "docker.io/library/debian:12"] {
        let out = run(Command::new(skopeo)
            .arg("inspect")
            .arg(format!("oci:{}:{name}", store.root().display())));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Digest"], desc.digest.to_string(), "{name}");
        assert_eq!(
            v["Layers"],
            serde_json::json!([layer.to_string()]),
            "{name}"
        );
        assert_eq!(v["Os"], "linux");
    }
    // The raw manifest skopeo serves is our bytes, unchanged.
    let raw = run(Command::new(skopeo)
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:myapp:latest", store.root().display())));
    assert_eq!(raw.as_bytes(), image.manifest_bytes.as_slice());
    // And a name we never set is an error, not some other image.
    let out = Command::new(skopeo)
        .arg("inspect")
        .arg(format!("oci:{}:nope:1", store.root().display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn umoci_unpacks_our_image() {
    let Some(umoci) = tool("/usr/bin/umoci") else {
        return;
    };
    let (t, store) = temp_store();
    let (desc, _, _) = put_small_image(&store, "hello from strata\n");
    store.set_ref("myapp:latest", desc).unwrap();
    let bundle = t.path().join("bundle");
    let mut cmd = Command::new(umoci);
    cmd.arg("unpack");
    if !rustix::process::geteuid().is_root() {
        cmd.arg("--rootless");
    }
    run(cmd
        .arg("--image")
        .arg(format!("{}:myapp:latest", store.root().display()))
        .arg(&bundle));
    let text = std::fs::read_to_string(bundle.join("rootfs/hello.txt")).unwrap();
    assert_eq!(text, "hello from strata\n");
    assert!(bundle.join("rootfs/etc").is_dir());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["process"]["args"], serde_json::json!(["/bin/sh"]));
}
