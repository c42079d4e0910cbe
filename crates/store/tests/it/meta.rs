//! The metadata database: pins, build cache index, snapshots, schema version.

use std::path::Path;

use strata_oci::Digest;
use strata_store::{Error, Store};

use crate::common::temp_store;

#[test]
fn db_is_wal_and_versioned() {
    let (_t, store) = temp_store();
    let conn = rusqlite::Connection::open(store.root().join("strata/meta-v1.db")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
}

#[test]
fn a_newer_schema_is_refused() {
    let (_t, store) = temp_store();
    let root = store.root().to_path_buf();
    drop(store);
    let conn = rusqlite::Connection::open(root.join("strata/meta-v1.db")).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    assert!(matches!(
        Store::open(&root),
        Err(Error::DbTooNew { found: 99, .. })
    ));
}

#[test]
fn pins_cache_and_snapshots_round_trip_and_persist() {
    let (_t, store) = temp_store();
    let d = Digest::sha256(b"image");
    store.pin(&d, "machine:a").unwrap();
    store.pin(&d, "machine:a").unwrap(); // idempotent
    store.pin(&d, "release:app/3").unwrap();
    store.cache_put("k1", r#"{"layer":"x"}"#).unwrap();
    store.cache_put("k1", r#"{"layer":"y"}"#).unwrap(); // replaces
    let chain = Digest::sha256(b"chain");
    store.snapshot_record(&chain, Path::new("/snap/1")).unwrap();

    let root = store.root().to_path_buf();
    drop(store);
    let store = Store::open(&root).unwrap();
    let holders: Vec<String> = store
        .pins()
        .unwrap()
        .into_iter()
        .map(|p| p.holder)
        .collect();
    assert_eq!(holders, ["machine:a", "release:app/3"]);
    assert!(store.unpin(&d, "machine:a").unwrap());
    assert!(!store.unpin(&d, "machine:a").unwrap());
    assert_eq!(store.pins().unwrap().len(), 1);

    assert_eq!(
        store.cache_get("k1").unwrap().as_deref(),
        Some(r#"{"layer":"y"}"#)
    );
    assert_eq!(store.cache_get("k2").unwrap(), None);
    assert!(store.cache_remove("k1").unwrap());
    assert_eq!(store.cache_get("k1").unwrap(), None);

    let s = store.snapshot_get(&chain).unwrap().unwrap();
    assert_eq!(s.path, Path::new("/snap/1"));
    assert_eq!(store.snapshots().unwrap(), vec![s]);
    assert!(store.snapshot_remove(&chain).unwrap());
    assert_eq!(store.snapshot_get(&chain).unwrap(), None);
}
