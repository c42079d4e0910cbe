//! The metadata in SQLite (`<root>/registry-v1.db`, WAL): one server's default.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use strata_oci::sync::MutexExt;

use super::{INFLIGHT_MAX_MS, UploadRow};
use crate::error::{Error, Result};

pub(crate) struct SqliteMeta {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// `CREATE ... IF NOT EXISTS` throughout: a database made by an older version gains the tables
/// it lacks.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orgs(name TEXT PRIMARY KEY, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS users(
    name TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    password TEXT NOT NULL,
    created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tokens(
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    scope TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pins(
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    holder TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY(repo, digest, holder));
CREATE TABLE IF NOT EXISTS uploads(
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    size INTEGER NOT NULL,
    parts TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gc_lease(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    mark_start_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gc_touches(digest TEXT PRIMARY KEY, at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS gc_deleting(digest TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS gc_inflight(
    writer TEXT NOT NULL,
    digest TEXT NOT NULL,
    since_ms INTEGER NOT NULL,
    PRIMARY KEY(writer, digest));
";

fn split_parts(s: &str) -> Vec<String> {
    s.lines().map(str::to_string).collect()
}

impl SqliteMeta {
    pub fn open(root: &Path) -> Result<SqliteMeta> {
        let path = root.join("registry-v1.db");
        let db = |what| {
            let path = path.clone();
            move |source| Error::Db { path, what, source }
        };
        let conn = Connection::open(&path).map_err(db("open"))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db("configure"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db("configure"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db("configure"))?;
        conn.execute_batch(SCHEMA).map_err(db("create schema"))?;
        Ok(SqliteMeta {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        // A poisoned lock only means another thread panicked mid-query; SQLite itself is
        // consistent (each statement is atomic), so keep going.
        let mut conn = self.conn.lock_ok();
        f(&mut conn).map_err(|source| Error::Db {
            path: self.path.clone(),
            what,
            source,
        })
    }

    pub fn now_ms(&self) -> Result<i64> {
        Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0))
    }

    pub fn org_exists(&self, org: &str) -> Result<bool> {
        self.with("read org", |c| {
            c.query_row("SELECT 1 FROM orgs WHERE name = ?1", [org], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
    }

    pub fn insert_org(&self, org: &str, now: i64) -> Result<bool> {
        self.with("create org", |c| {
            c.execute(
                "INSERT OR IGNORE INTO orgs(name, created) VALUES (?1, ?2)",
                params![org, now],
            )
        })
        .map(|n| n > 0)
    }

    pub fn orgs(&self) -> Result<Vec<String>> {
        self.with("list orgs", |c| {
            let mut st = c.prepare("SELECT name FROM orgs ORDER BY name")?;
            st.query_map([], |r| r.get(0))?.collect()
        })
    }

    pub fn insert_user(&self, name: &str, org: &str, hash: &str, now: i64) -> Result<bool> {
        self.with("create user", |c| {
            c.execute(
                "INSERT OR IGNORE INTO users(name, org, password, created) VALUES (?1, ?2, ?3, ?4)",
                params![name, org, hash, now],
            )
        })
        .map(|n| n > 0)
    }

    pub fn user_hash(&self, name: &str) -> Result<Option<(String, String)>> {
        self.with("read user", |c| {
            c.query_row(
                "SELECT org, password FROM users WHERE name = ?1",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    pub fn token_scope(&self, id: &str, org: &str) -> Result<Option<String>> {
        self.with("read token", |c| {
            c.query_row(
                "SELECT scope FROM tokens WHERE id = ?1 AND org = ?2",
                [id, org],
                |r| r.get(0),
            )
            .optional()
        })
    }

    pub fn insert_token(
        &self,
        id: &str,
        org: &str,
        scope: &str,
        hash: &str,
        now: i64,
    ) -> Result<()> {
        self.with("create token", |c| {
            c.execute(
                "INSERT INTO tokens(id, org, scope, hash, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, org, scope, hash, now],
            )
        })?;
        Ok(())
    }

    pub fn token_by_hash(&self, hash: &str) -> Result<Option<(String, String, String)>> {
        self.with("read token", |c| {
            c.query_row(
                "SELECT id, org, scope FROM tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
    }

    pub fn tokens(&self, org: Option<&str>) -> Result<Vec<(String, String, String, i64)>> {
        self.with("list tokens", |c| {
            let mut st = c.prepare(
                "SELECT id, org, scope, created FROM tokens WHERE ?1 IS NULL OR org = ?1 ORDER BY org, created, id",
            )?;
            st.query_map([org], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect()
        })
    }

    pub fn delete_token(&self, id: &str) -> Result<bool> {
        self.with("delete token", |c| {
            c.execute("DELETE FROM tokens WHERE id = ?1", [id])
        })
        .map(|n| n > 0)
    }

    pub fn insert_pin(&self, repo: &str, digest: &str, holder: &str, now: i64) -> Result<()> {
        self.with("pin", |c| {
            c.execute(
                "INSERT OR IGNORE INTO pins(repo, digest, holder, created) VALUES (?1, ?2, ?3, ?4)",
                params![repo, digest, holder, now],
            )
        })?;
        Ok(())
    }

    pub fn delete_pin(&self, repo: &str, digest: &str, holder: &str) -> Result<bool> {
        self.with("unpin", |c| {
            c.execute(
                "DELETE FROM pins WHERE repo = ?1 AND digest = ?2 AND holder = ?3",
                params![repo, digest, holder],
            )
        })
        .map(|n| n > 0)
    }

    pub fn pins(&self) -> Result<Vec<(String, String, String)>> {
        self.with("list pins", |c| {
            let mut st =
                c.prepare("SELECT repo, digest, holder FROM pins ORDER BY repo, digest, holder")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
    }

    pub fn upload_create(&self, id: &str, repo: &str, algorithm: &str) -> Result<()> {
        let now = self.now_ms()?;
        self.with("create upload", |c| {
            c.execute(
                "INSERT INTO uploads(id, repo, algorithm, size, parts, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, 0, '', ?4, ?4)",
                params![id, repo, algorithm, now],
            )
        })?;
        Ok(())
    }

    pub fn upload(&self, id: &str) -> Result<Option<UploadRow>> {
        self.with("read upload", |c| {
            c.query_row(
                "SELECT repo, algorithm, size, parts FROM uploads WHERE id = ?1",
                [id],
                |r| {
                    Ok(UploadRow {
                        repo: r.get(0)?,
                        algorithm: r.get(1)?,
                        size: r.get::<_, i64>(2)?.max(0) as u64,
                        parts: split_parts(&r.get::<_, String>(3)?),
                    })
                },
            )
            .optional()
        })
    }

    pub fn upload_advance(&self, id: &str, from: i64, to: i64, part: &str) -> Result<bool> {
        let now = self.now_ms()?;
        self.with("advance upload", |c| {
            c.execute(
                "UPDATE uploads SET size = ?3, parts = parts || ?4 || char(10), updated_ms = ?5
                 WHERE id = ?1 AND size = ?2",
                params![id, from, to, part, now],
            )
        })
        .map(|n| n > 0)
    }

    pub fn upload_delete(&self, id: &str) -> Result<Option<Vec<String>>> {
        self.with("delete upload", |c| {
            c.query_row(
                "DELETE FROM uploads WHERE id = ?1 RETURNING parts",
                [id],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(|p| p.map(|p| split_parts(&p)))
        })
    }

    pub fn uploads_stale(&self, max_age_ms: i64) -> Result<Vec<(String, Vec<String>)>> {
        let before = self.now_ms()? - max_age_ms;
        self.with("list uploads", |c| {
            let mut st = c.prepare("SELECT id, parts FROM uploads WHERE updated_ms < ?1")?;
            st.query_map([before], |r| {
                Ok((r.get(0)?, split_parts(&r.get::<_, String>(1)?)))
            })?
            .collect()
        })
    }

    pub fn gc_acquire(&self, holder: &str, ttl: i64) -> Result<std::result::Result<i64, String>> {
        let now = self.now_ms()?;
        self.with("take the gc lease", |c| {
            let tx = c.transaction()?;
            let current: Option<(String, i64)> = tx
                .query_row(
                    "SELECT holder, expires_ms FROM gc_lease WHERE id = 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((other, expires)) = current
                && expires > now
            {
                return Ok(Err(other));
            }
            tx.execute(
                "INSERT INTO gc_lease(id, holder, expires_ms, mark_start_ms) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET holder = excluded.holder,
                     expires_ms = excluded.expires_ms, mark_start_ms = excluded.mark_start_ms",
                params![holder, now + ttl, now],
            )?;
            tx.execute("DELETE FROM gc_deleting", [])?;
            tx.commit()?;
            Ok(Ok(now))
        })
    }

    pub fn gc_renew(&self, holder: &str, ttl: i64) -> Result<bool> {
        let now = self.now_ms()?;
        self.with("renew the gc lease", |c| {
            c.execute(
                "UPDATE gc_lease SET expires_ms = ?2 WHERE id = 1 AND holder = ?1 AND expires_ms > ?3",
                params![holder, now + ttl, now],
            )
        })
        .map(|n| n > 0)
    }

    pub fn gc_release(&self, holder: &str) -> Result<()> {
        self.with("release the gc lease", |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE gc_lease SET expires_ms = 0 WHERE id = 1 AND holder = ?1",
                [holder],
            )?;
            if n > 0 {
                tx.execute("DELETE FROM gc_deleting", [])?;
            }
            tx.commit()
        })
    }

    pub fn gc_mark_deleting(&self, digests: &[String]) -> Result<()> {
        self.with("mark deletions", |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare("INSERT OR IGNORE INTO gc_deleting(digest) VALUES (?1)")?;
                for d in digests {
                    st.execute([d])?;
                }
            }
            tx.commit()
        })
    }

    pub fn gc_clear_deleting(&self, digests: &[String]) -> Result<()> {
        self.with("clear deletions", |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare("DELETE FROM gc_deleting WHERE digest = ?1")?;
                for d in digests {
                    st.execute([d])?;
                }
            }
            tx.commit()
        })
    }

    pub fn deleting_among(&self, digests: &[String]) -> Result<Vec<String>> {
        let now = self.now_ms()?;
        self.with("read deletions", |c| {
            let live: bool = c
                .query_row(
                    "SELECT 1 FROM gc_lease WHERE id = 1 AND expires_ms > ?1",
                    [now],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if !live {
                return Ok(Vec::new());
            }
            let mut st = c.prepare_cached("SELECT 1 FROM gc_deleting WHERE digest = ?1")?;
            let mut out = Vec::new();
            for d in digests {
                if st.query_row([d], |_| Ok(())).optional()?.is_some() {
                    out.push(d.clone());
                }
            }
            Ok(out)
        })
    }

    /// `begin`: the writer starts using `digests` (in flight, and used now); otherwise it is
    /// done with them (used now, no longer in flight).
    pub fn use_digests(&self, writer: &str, digests: &[String], begin: bool) -> Result<()> {
        let now = self.now_ms()?;
        self.with("record use", |c| {
            let tx = c.transaction()?;
            {
                let mut st = tx.prepare_cached(
                    "INSERT INTO gc_touches(digest, at_ms) VALUES (?1, ?2)
                     ON CONFLICT(digest) DO UPDATE SET at_ms = excluded.at_ms",
                )?;
                for d in digests {
                    st.execute(params![d, now])?;
                }
            }
            if begin {
                let mut st = tx.prepare_cached(
                    "INSERT OR REPLACE INTO gc_inflight(writer, digest, since_ms) VALUES (?1, ?2, ?3)",
                )?;
                for d in digests {
                    st.execute(params![writer, d, now])?;
                }
            } else {
                tx.execute("DELETE FROM gc_inflight WHERE writer = ?1", [writer])?;
            }
            tx.commit()
        })
    }

    pub fn used_since(&self, since: i64, inflight_since: i64) -> Result<Vec<String>> {
        self.with("read uses", |c| {
            let mut st = c.prepare(
                "SELECT digest FROM gc_touches WHERE at_ms >= ?1
                 UNION SELECT digest FROM gc_inflight WHERE since_ms >= ?2",
            )?;
            st.query_map([since, inflight_since], |r| r.get(0))?
                .collect()
        })
    }

    pub fn trim_touches(&self, before: i64) -> Result<()> {
        self.with("trim uses", |c| {
            c.execute("DELETE FROM gc_touches WHERE at_ms < ?1", [before])?;
            c.execute(
                "DELETE FROM gc_inflight WHERE since_ms < ?1",
                [before - INFLIGHT_MAX_MS],
            )
        })?;
        Ok(())
    }
}
