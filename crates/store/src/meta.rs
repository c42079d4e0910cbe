//! The metadata database `strata/meta-v1.db`: what the OCI layout cannot hold.
//!
//! SQLite in WAL mode so readers never block the writer; a busy timeout so concurrent strata
//! processes wait for each other instead of failing; `PRAGMA user_version` is the schema version
//! and [`MIGRATIONS`] bring an older database forward inside one immediate transaction.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use strata_oci::Digest;
use strata_oci::sync::MutexExt;

use crate::Store;
use crate::error::{Error, Result};

/// Schema migrations; entry `i` takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: pins (GC roots for deploys), build cache index, rootfs snapshots.
    "CREATE TABLE pins (
        digest  TEXT NOT NULL,
        holder  TEXT NOT NULL,
        created INTEGER NOT NULL,
        PRIMARY KEY (digest, holder)
     );
     CREATE TABLE cache (
        key     TEXT PRIMARY KEY,
        value   TEXT NOT NULL,
        created INTEGER NOT NULL
     );
     CREATE TABLE snapshots (
        chain_id  TEXT PRIMARY KEY,
        path      TEXT NOT NULL,
        created   INTEGER NOT NULL,
        last_used INTEGER NOT NULL
     );",
];

/// How long a statement waits for another process's write transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// A GC root held in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The pinned blob (usually a manifest or index; everything it reaches is kept too).
    pub digest: Digest,
    /// Who holds it, e.g. `machine:<id>` or `release:<app>/<n>`.
    pub holder: String,
    /// Unix seconds.
    pub created: i64,
}

/// An unpacked rootfs for a layer chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The chain ID of the layer stack unpacked there.
    pub chain_id: Digest,
    /// Where the rootfs is.
    pub path: PathBuf,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds.
    pub last_used: i64,
}

pub(crate) fn open_db(path: &Path) -> Result<Connection> {
    let db_err = |source| Error::Db {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    // SQLite answers "busy" at once, without its busy handler, where waiting could deadlock:
    // several processes opening a new store together, each switching it to WAL. Those steps
    // are tried again until one of them has done it.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        let done = conn
            .pragma_update(None, "journal_mode", "WAL")
            // WAL + NORMAL is durable across application crashes; only an OS crash can lose
            // the last commits, and everything here can be rebuilt (cache, snapshots) or is
            // re-pinned on deploy.
            .and_then(|()| conn.pragma_update(None, "synchronous", "NORMAL"))
            .map_err(db_err)
            .and_then(|()| migrate(&mut conn, path));
        match done {
            Err(Error::Db {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            }) if e.code == rusqlite::ErrorCode::DatabaseBusy
                && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            done => return done.map(|()| conn),
        }
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let db_err = |source| Error::Db {
        path: path.to_path_buf(),
        source,
    };
    let supported = MIGRATIONS.len() as i64;
    // IMMEDIATE takes the write lock first, so two processes opening a new store at once do not
    // both run the same migration.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db_err)?;
    if version > supported {
        return Err(Error::DbTooNew {
            path: path.to_path_buf(),
            found: version,
            supported,
        });
    }
    for sql in MIGRATIONS
        .iter()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.execute_batch(sql).map_err(db_err)?;
    }
    if version < supported {
        tx.pragma_update(None, "user_version", supported)
            .map_err(db_err)?;
    }
    tx.commit().map_err(db_err)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Store {
    fn db_path(&self) -> PathBuf {
        self.root.join("strata/meta-v1.db")
    }

    /// Run `f` on the connection, attaching the database path to errors.
    fn with_db<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        // A panic while holding the lock cannot leave SQLite inconsistent (its own transactions
        // guard that), so a poisoned mutex is still usable.
        let conn = self.db.lock_ok();
        f(&conn).map_err(|source| Error::Db {
            path: self.db_path(),
            source,
        })
    }

    /// Keep `digest` (and everything it references) from GC on behalf of `holder`.
    /// Pinning twice is a no-op.
    pub fn pin(&self, digest: &Digest, holder: &str) -> Result<()> {
        self.with_db(|c| {
            c.execute(
                "INSERT OR IGNORE INTO pins (digest, holder, created) VALUES (?1, ?2, ?3)",
                params![digest.to_string(), holder, now()],
            )
            .map(drop)
        })
    }

    /// Drop `holder`'s pin on `digest`; returns whether there was one.
    pub fn unpin(&self, digest: &Digest, holder: &str) -> Result<bool> {
        self.with_db(|c| {
            c.execute(
                "DELETE FROM pins WHERE digest = ?1 AND holder = ?2",
                params![digest.to_string(), holder],
            )
            .map(|n| n > 0)
        })
    }

    /// Every pin, by digest then holder. Rows whose digest does not parse are skipped.
    pub fn pins(&self) -> Result<Vec<Pin>> {
        let rows: Vec<(String, String, i64)> = self.with_db(|c| {
            let mut st =
                c.prepare("SELECT digest, holder, created FROM pins ORDER BY digest, holder")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(d, holder, created)| {
                Some(Pin {
                    digest: d.parse().ok()?,
                    holder,
                    created,
                })
            })
            .collect())
    }

    /// The build cache entry for `key` (a result as JSON), if any.
    pub fn cache_get(&self, key: &str) -> Result<Option<String>> {
        self.with_db(|c| {
            c.query_row("SELECT value FROM cache WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
        })
    }

    /// Record (or replace) the build cache entry `key` → `value`.
    pub fn cache_put(&self, key: &str, value: &str) -> Result<()> {
        self.with_db(|c| {
            c.execute(
                "INSERT INTO cache (key, value, created) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, created = excluded.created",
                params![key, value, now()],
            )
            .map(drop)
        })
    }

    /// Forget the build cache entry `key`; returns whether there was one.
    pub fn cache_remove(&self, key: &str) -> Result<bool> {
        self.with_db(|c| {
            c.execute("DELETE FROM cache WHERE key = ?1", [key])
                .map(|n| n > 0)
        })
    }

    /// Record that the rootfs for `chain_id` is unpacked at `path` (replacing an older record).
    pub fn snapshot_record(&self, chain_id: &Digest, path: &Path) -> Result<()> {
        let t = now();
        self.with_db(|c| {
            c.execute(
                "INSERT INTO snapshots (chain_id, path, created, last_used) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (chain_id) DO UPDATE SET path = excluded.path,
                    created = excluded.created, last_used = excluded.last_used",
                params![chain_id.to_string(), path.to_string_lossy(), t],
            )
            .map(drop)
        })
    }

    /// The snapshot for `chain_id`, if recorded; marks it used now.
    pub fn snapshot_get(&self, chain_id: &Digest) -> Result<Option<Snapshot>> {
        let t = now();
        let row: Option<(String, i64)> = self.with_db(|c| {
            c.execute(
                "UPDATE snapshots SET last_used = ?2 WHERE chain_id = ?1",
                params![chain_id.to_string(), t],
            )?;
            c.query_row(
                "SELECT path, created FROM snapshots WHERE chain_id = ?1",
                [chain_id.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        Ok(row.map(|(path, created)| Snapshot {
            chain_id: chain_id.clone(),
            path: PathBuf::from(path),
            created,
            last_used: t,
        }))
    }

    /// Forget the snapshot record for `chain_id` (the directory is the caller's to remove);
    /// returns whether there was one.
    pub fn snapshot_remove(&self, chain_id: &Digest) -> Result<bool> {
        self.with_db(|c| {
            c.execute(
                "DELETE FROM snapshots WHERE chain_id = ?1",
                [chain_id.to_string()],
            )
            .map(|n| n > 0)
        })
    }

    /// Every snapshot record, least recently used first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let rows: Vec<(String, String, i64, i64)> = self.with_db(|c| {
            let mut st = c.prepare(
                "SELECT chain_id, path, created, last_used FROM snapshots
                 ORDER BY last_used, chain_id",
            )?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, path, created, last_used)| {
                Some(Snapshot {
                    chain_id: id.parse().ok()?,
                    path: PathBuf::from(path),
                    created,
                    last_used,
                })
            })
            .collect())
    }
}
