//! Helpers shared by the store's integration tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use strata_oci::{Descriptor, Digest, Manifest, media_type};
use strata_store::Store;

/// Env var that turns a test binary spawned by [`spawn_self`] into a helper child process.
pub const CHILD_ROLE: &str = "STRATA_STORE_TEST_CHILD";

/// A fresh store in a temp dir (kept alive by the returned guard).
pub fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

/// Run this test binary again as a child that executes only the test `entry` with
/// `CHILD_ROLE=role` and the given extra environment.
pub fn spawn_self(entry: &str, role: &str, env: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([entry, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A tiny but real image: one gzip tar layer holding `hello.txt`, an OCI config, a manifest.
/// Returns the manifest descriptor, the layer digest and the diff ID.
pub fn put_small_image(store: &Store, text: &str) -> (Descriptor, Digest, Digest) {
    let mut tar_bytes = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar_bytes);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path("etc/").unwrap();
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_path("hello.txt").unwrap();
        h.set_mode(0o644);
        h.set_size(text.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, text.as_bytes()).unwrap();
        b.finish().unwrap();
    }
    let diff_id = Digest::sha256(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
    let layer = gz.finish().unwrap();
    let (layer_digest, layer_size) = store.put_blob_bytes(&layer, None).unwrap();

    let platform = strata_oci::Platform::host();
    let config = serde_json::json!({
        "architecture": platform.architecture,
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id.to_string()] },
        "history": [{ "created_by": "strata-store test" }],
    });
    let config = serde_json::to_vec(&config).unwrap();
    let (config_digest, config_size) = store.put_blob_bytes(&config, None).unwrap();

    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_string()),
        artifact_type: None,
        config: Descriptor::new(media_type::OCI_CONFIG, config_digest, config_size),
        layers: vec![Descriptor::new(
            media_type::OCI_LAYER_GZIP,
            layer_digest.clone(),
            layer_size,
        )],
        subject: None,
        annotations: None,
    };
    let desc = store.put_manifest(&manifest).unwrap();
    (desc, layer_digest, diff_id)
}
