//! Blob writes and reads: verification, idempotence, nothing left behind on refusal.

use std::io::{Read, Write};

use strata_oci::{Algorithm, Descriptor, Digest};
use strata_store::{Error, Store};

use crate::common::{files_under, temp_store};

#[test]
fn bytes_round_trip_and_land_at_the_layout_path() {
    let (_t, store) = temp_store();
    let (d, size) = store.put_blob_bytes(b"hello", None).unwrap();
    assert_eq!(d, Digest::sha256(b"hello"));
    assert_eq!(size, 5);
    assert_eq!(store.read_blob(&d).unwrap(), b"hello");
    assert!(store.has_blob(&d));
    assert_eq!(store.blob_size(&d).unwrap(), 5);
    assert_eq!(
        store.blob_path(&d),
        store.root().join("blobs/sha256").join(d.hex())
    );
    let mut s = String::new();
    store.open_blob(&d).unwrap().read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello");
}

#[test]
fn reader_round_trip_with_expected_digest_and_size() {
    let (_t, store) = temp_store();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let want = Digest::sha256(&data);
    let (d, n) = store
        .put_blob_reader(&data[..], Some((&want, Some(data.len() as u64))))
        .unwrap();
    assert_eq!((d.clone(), n), (want, data.len() as u64));
    assert_eq!(store.read_blob(&d).unwrap(), data);
}

#[test]
fn sha512_blobs_go_under_blobs_sha512() {
    let (_t, store) = temp_store();
    let want = Digest::of(Algorithm::Sha512, b"abc");
    let (d, _) = store
        .put_blob_reader(&b"abc"[..], Some((&want, None)))
        .unwrap();
    assert_eq!(d, want);
    assert!(store.root().join("blobs/sha512").join(want.hex()).is_file());
    assert_eq!(store.read_blob(&want).unwrap(), b"abc");
}

fn assert_nothing_stored(store: &Store) {
    assert_eq!(
        files_under(&store.root().join("blobs")),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(
        files_under(&store.root().join("strata/tmp")),
        Vec::<std::path::PathBuf>::new()
    );
}

#[test]
fn wrong_digest_is_refused_and_nothing_is_left() {
    let (_t, store) = temp_store();
    let wrong = Digest::sha256(b"something else");
    match store.put_blob_bytes(b"hello", Some(&wrong)) {
        Err(Error::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, Digest::sha256(b"hello"));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    let err = store
        .put_blob_reader(&b"hello"[..], Some((&wrong, Some(5))))
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let mut w = store.blob_writer().unwrap();
    w.write_all(b"hello").unwrap();
    let err = w.commit(Some((&wrong, None))).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert_nothing_stored(&store);
}

#[test]
fn wrong_size_is_refused_both_shorter_and_longer() {
    let (_t, store) = temp_store();
    let d = Digest::sha256(b"hello");
    for announced in [4, 6] {
        match store.put_blob_reader(&b"hello"[..], Some((&d, Some(announced)))) {
            Err(Error::SizeMismatch {
                digest, expected, ..
            }) => {
                assert_eq!(digest, d);
                assert_eq!(expected, announced);
            }
            other => panic!("announced {announced}: expected a size mismatch, got {other:?}"),
        }
    }
    assert_nothing_stored(&store);
}

#[test]
fn dropped_writer_leaves_nothing() {
    let (_t, store) = temp_store();
    let mut w = store.blob_writer().unwrap();
    w.write_all(&[7; 100_000]).unwrap();
    assert!(w.temp_path().starts_with(store.root().join("strata/tmp")));
    drop(w);
    assert_nothing_stored(&store);
}

#[test]
fn blob_writer_streams_and_commits() {
    let (_t, store) = temp_store();
    let mut w = store.blob_writer().unwrap();
    for _ in 0..100 {
        w.write_all(&[1; 10_000]).unwrap();
    }
    assert_eq!(w.len(), 1_000_000);
    let (d, n) = w.commit(None).unwrap();
    assert_eq!(n, 1_000_000);
    assert_eq!(d, Digest::sha256(&[1; 1_000_000]));
    assert!(store.has_blob(&d));
    assert!(files_under(&store.root().join("strata/tmp")).is_empty());
}

#[test]
fn put_is_idempotent() {
    let (_t, store) = temp_store();
    let a = store.put_blob_bytes(b"same", None).unwrap();
    let b = store.put_blob_bytes(b"same", None).unwrap();
    let c = store.put_blob_reader(&b"same"[..], None).unwrap();
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(files_under(&store.root().join("blobs")).len(), 1);
    assert!(files_under(&store.root().join("strata/tmp")).is_empty());
}

#[test]
fn put_repairs_a_truncated_blob() {
    let (_t, store) = temp_store();
    let (d, _) = store.put_blob_bytes(b"full content", None).unwrap();
    std::fs::write(store.blob_path(&d), b"full").unwrap();
    store.put_blob_bytes(b"full content", None).unwrap();
    assert_eq!(store.read_blob(&d).unwrap(), b"full content");
}

#[test]
fn corrupted_blob_fails_at_eof_naming_the_digest() {
    let (_t, store) = temp_store();
    let data = vec![42u8; 200_000];
    let (d, _) = store.put_blob_bytes(&data, None).unwrap();
    // Same size, one byte flipped: only the hash can tell.
    let mut corrupt = data.clone();
    corrupt[100_000] ^= 1;
    std::fs::write(store.blob_path(&d), &corrupt).unwrap();

    let mut r = store.open_blob(&d).unwrap();
    let mut buf = vec![0; 150_000];
    r.read_exact(&mut buf).unwrap(); // no error before EOF
    let mut rest = Vec::new();
    let err = r.read_to_end(&mut rest).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains(&d.to_string()), "{err}");
    // And it keeps failing, so a caller retrying cannot mistake it for a clean EOF.
    assert!(r.read(&mut [0; 10]).is_err());

    match store.read_blob(&d) {
        Err(Error::CorruptBlob { digest, .. }) => assert_eq!(digest, d),
        other => panic!("expected corrupt blob, got {other:?}"),
    }
}

#[test]
fn truncated_or_extended_blob_fails_in_the_reader() {
    let (_t, store) = temp_store();
    let (d, _) = store.put_blob_bytes(b"0123456789", None).unwrap();
    let desc = Descriptor::new("application/octet-stream", d.clone(), 10);
    std::fs::write(store.blob_path(&d), b"01234").unwrap();
    assert!(matches!(
        store.open_descriptor(&desc),
        Err(Error::SizeMismatch { .. })
    ));
    // Opened by digest alone the size on disk is trusted, so the hash catches it at EOF.
    let err = store
        .open_blob(&d)
        .unwrap()
        .read_to_end(&mut Vec::new())
        .unwrap_err();
    assert!(err.to_string().contains(&d.to_string()), "{err}");
}

#[test]
fn missing_blob_is_a_typed_error() {
    let (_t, store) = temp_store();
    let d = Digest::sha256(b"nope");
    assert!(!store.has_blob(&d));
    assert!(matches!(
        store.read_blob(&d),
        Err(Error::BlobNotFound { .. })
    ));
    assert!(matches!(
        store.open_blob(&d),
        Err(Error::BlobNotFound { .. })
    ));
    assert!(matches!(
        store.blob_size(&d),
        Err(Error::BlobNotFound { .. })
    ));
}

#[test]
fn layout_files_are_created_and_checked() {
    let (t, store) = temp_store();
    let layout = std::fs::read_to_string(store.root().join("oci-layout")).unwrap();
    assert_eq!(layout, r#"{"imageLayoutVersion":"1.0.0"}"#);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.root().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert!(store.root().join("strata/meta-v1.db").is_file());

    let other = t.path().join("future");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("oci-layout"),
        r#"{"imageLayoutVersion":"2.0.0"}"#,
    )
    .unwrap();
    match Store::open(&other) {
        Err(Error::BadLayout { reason, .. }) => assert!(reason.contains("2.0.0"), "{reason}"),
        other => panic!("expected a layout error, got {other:?}"),
    }
}
