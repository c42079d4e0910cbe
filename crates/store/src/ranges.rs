//! Named byte ranges of stored blobs: `key → (blob, offset, length)` in the metadata database,
//! so a writer can reuse a part of a blob it wrote before (the gzip members of layers, keyed by
//! what they hold) without keeping a second copy of the bytes.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use strata_oci::Digest;
use strata_oci::sync::MutexExt;

use crate::Store;
use crate::blob::blob_path_in;
use crate::error::{Error, Result};

/// Key prefix in the `cache` table.
const PREFIX: &str = "range:";

/// Largest range handed out (a range is read into memory whole).
const MAX_RANGE: u64 = 64 * 1024 * 1024;

/// One named range of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRange {
    pub key: String,
    pub blob: Digest,
    pub offset: u64,
    pub len: u64,
}

/// A read-only handle on the ranges of a store, usable from any thread for as long as it is
/// kept (it holds its own database connection).
pub struct BlobRanges {
    root: PathBuf,
    db: Mutex<Connection>,
}

impl std::fmt::Debug for BlobRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobRanges")
            .field("root", &self.root)
            .finish()
    }
}

impl Store {
    /// Records `ranges` (replacing older ones of the same keys) in one transaction.
    pub fn put_blob_ranges(&self, ranges: &[BlobRange]) -> Result<()> {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let path = self.root.join("strata/meta-v1.db");
        let mut db = self.db.lock_ok();
        let db_err = |source| Error::Db {
            path: path.clone(),
            source,
        };
        let tx = db.transaction().map_err(db_err)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO cache (key, value, created) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value,
                                                     created = excluded.created",
                )
                .map_err(db_err)?;
            for r in ranges {
                let value = format!("{} {} {}", r.blob, r.offset, r.len);
                stmt.execute(params![format!("{PREFIX}{}", r.key), value, t])
                    .map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    /// A handle to read ranges with, from any thread.
    pub fn blob_ranges(&self) -> Result<BlobRanges> {
        let path = self.root.join("strata/meta-v1.db");
        let db_err = |source| Error::Db {
            path: path.clone(),
            source,
        };
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(db_err)?;
        Ok(BlobRanges {
            root: self.root.clone(),
            db: Mutex::new(conn),
        })
    }
}

impl BlobRanges {
    /// The bytes of the range named `key`; `None` when there is none, its blob is gone or
    /// shorter, or anything fails (a range is only ever a shortcut: the caller checks the
    /// bytes and has another way to make them).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let value: String = {
            let db = self.db.lock_ok();
            db.query_row(
                "SELECT value FROM cache WHERE key = ?1",
                [format!("{PREFIX}{key}")],
                |r| r.get(0),
            )
            .optional()
            .ok()??
        };
        let mut parts = value.split(' ');
        let blob: Digest = parts.next()?.parse().ok()?;
        let offset: u64 = parts.next()?.parse().ok()?;
        let len: u64 = parts.next()?.parse().ok()?;
        if len > MAX_RANGE {
            return None;
        }
        let f = std::fs::File::open(blob_path_in(&self.root, &blob)).ok()?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ranges_read_back_the_bytes_of_their_blob_until_it_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let (digest, _) = store.put_blob_bytes(b"0123456789", None).unwrap();
        let range = |key: &str, offset, len| BlobRange {
            key: key.into(),
            blob: digest.clone(),
            offset,
            len,
        };
        store
            .put_blob_ranges(&[range("a", 2, 3), range("b", 8, 5)])
            .unwrap();
        let ranges = store.blob_ranges().unwrap();
        assert_eq!(ranges.get("a").as_deref(), Some(&b"234"[..]));
        assert_eq!(ranges.get("b"), None, "past the end");
        assert_eq!(ranges.get("c"), None);
        store.put_blob_ranges(&[range("a", 0, 1)]).unwrap();
        assert_eq!(ranges.get("a").as_deref(), Some(&b"0"[..]));
        std::fs::remove_file(store.blob_path(&digest)).unwrap();
        assert_eq!(ranges.get("a"), None);
    }
}
