//! Refs in index.json: persistence, replacement, concurrent writers in threads and processes.

use std::io::BufRead;
use std::sync::Arc;

use strata_oci::{ANNOTATION_REF_NAME, Descriptor, media_type};
use strata_store::{Error, Store};

use crate::common::{CHILD_ROLE, spawn_self, temp_store};

fn blob_desc(store: &Store, content: &[u8]) -> Descriptor {
    let (d, n) = store.put_blob_bytes(content, None).unwrap();
    Descriptor::new(media_type::OCI_MANIFEST, d, n)
}

#[test]
fn refs_persist_across_reopen_and_are_visible_in_index_json() {
    let (_t, store) = temp_store();
    let a = blob_desc(&store, b"a");
    let b = blob_desc(&store, b"b");
    store.set_ref("myapp:latest", a.clone()).unwrap();
    store
        .set_ref("docker.io/library/debian:12", b.clone())
        .unwrap();
    let root = store.root().to_path_buf();
    drop(store);

    let store = Store::open(&root).unwrap();
    assert_eq!(store.get_ref("myapp:latest").unwrap(), Some(a.clone()));
    assert_eq!(
        store.list_refs().unwrap(),
        vec![
            ("docker.io/library/debian:12".to_string(), b.clone()),
            ("myapp:latest".to_string(), a.clone()),
        ]
    );
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("index.json")).unwrap()).unwrap();
    let names: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["annotations"][ANNOTATION_REF_NAME].as_str().unwrap())
        .collect();
    assert_eq!(names, ["myapp:latest", "docker.io/library/debian:12"]);
}

#[test]
fn set_ref_replaces_and_remove_ref_removes() {
    let (_t, store) = temp_store();
    let a = blob_desc(&store, b"a");
    let b = blob_desc(&store, b"b");
    store.set_ref("app:1", a.clone()).unwrap();
    store.set_ref("app:1", b.clone()).unwrap();
    assert_eq!(
        store.list_refs().unwrap(),
        vec![("app:1".to_string(), b.clone())]
    );
    assert_eq!(store.remove_ref("app:1").unwrap(), Some(b));
    assert_eq!(store.remove_ref("app:1").unwrap(), None);
    assert_eq!(store.get_ref("app:1").unwrap(), None);
    assert!(store.list_refs().unwrap().is_empty());
}

#[test]
fn set_ref_refuses_bad_names_missing_blobs_and_wrong_sizes() {
    let (_t, store) = temp_store();
    let a = blob_desc(&store, b"a");
    assert!(matches!(
        store.set_ref("bad name", a.clone()),
        Err(Error::InvalidRefName { .. })
    ));
    let missing = Descriptor::new(
        media_type::OCI_MANIFEST,
        strata_oci::Digest::sha256(b"x"),
        1,
    );
    assert!(matches!(
        store.set_ref("app:1", missing),
        Err(Error::BlobNotFound { .. })
    ));
    let mut wrong = a;
    wrong.size = 99;
    assert!(matches!(
        store.set_ref("app:1", wrong),
        Err(Error::SizeMismatch { .. })
    ));
    assert!(store.list_refs().unwrap().is_empty());
}

#[test]
fn other_annotations_survive_and_unnamed_entries_are_kept() {
    let (_t, store) = temp_store();
    let mut a = blob_desc(&store, b"a");
    a.annotations = Some([("org.example.note".to_string(), "hi".to_string())].into());
    store.set_ref("app:1", a.clone()).unwrap();
    assert_eq!(store.get_ref("app:1").unwrap(), Some(a));
    // An entry another tool added without a name is neither listed nor dropped by our updates.
    let mut index = store.read_index().unwrap();
    index.manifests.push(blob_desc(&store, b"unnamed"));
    std::fs::write(
        store.root().join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    store.set_ref("app:2", blob_desc(&store, b"b")).unwrap();
    assert_eq!(store.read_index().unwrap().manifests.len(), 3);
    assert_eq!(store.list_refs().unwrap().len(), 2);
}

const REFS_PER_WORKER: usize = 15;

fn add_refs(store: &Store, worker: &str) {
    for k in 0..REFS_PER_WORKER {
        let desc = blob_desc(store, format!("{worker}-{k}").as_bytes());
        store.set_ref(&format!("{worker}:r{k}"), desc).unwrap();
    }
}

#[test]
fn concurrent_threads_lose_no_ref() {
    let (_t, store) = temp_store();
    let store = Arc::new(store);
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || add_refs(&store, &format!("thread{i}")))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(store.list_refs().unwrap().len(), 6 * REFS_PER_WORKER);
}

/// Child half of `concurrent_processes_lose_no_ref`; a no-op unless spawned by it.
#[test]
fn child_add_refs() {
    if std::env::var(CHILD_ROLE).as_deref() != Ok("add_refs") {
        return;
    }
    let root = std::env::var("STORE_ROOT").unwrap();
    let worker = std::env::var("WORKER").unwrap();
    // Open separately in each child, so migrations and layout creation race as well.
    let store = Store::open(root).unwrap();
    println!("child-ready");
    add_refs(&store, &worker);
}

#[test]
fn concurrent_processes_lose_no_ref() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    let children: Vec<_> = (0..6)
        .map(|i| {
            spawn_self(
                "refs::child_add_refs",
                "add_refs",
                &[
                    ("STORE_ROOT", root.display().to_string()),
                    ("WORKER", format!("proc{i}")),
                ],
            )
        })
        .collect();
    for mut c in children {
        let out = std::io::BufReader::new(c.stdout.take().unwrap());
        let lines: Vec<String> = out.lines().map(Result::unwrap).collect();
        assert!(c.wait().unwrap().success());
        assert!(
            lines.iter().any(|l| l.contains("child-ready")),
            "child did not run: {lines:?}"
        );
    }
    let store = Store::open(&root).unwrap();
    let refs = store.list_refs().unwrap();
    assert_eq!(refs.len(), 6 * REFS_PER_WORKER);
    for i in 0..6 {
        for k in 0..REFS_PER_WORKER {
            let name = format!("proc{i}:r{k}");
            let d = store.get_ref(&name).unwrap().unwrap();
            assert_eq!(
                store.read_blob(&d.digest).unwrap(),
                format!("proc{i}-{k}").as_bytes()
            );
        }
    }
}
