//! The metadata in PostgreSQL, shared by replicas: a connection pool (deadpool) over
//! tokio-postgres, and versioned migrations applied at open under an advisory lock, so replicas
//! starting together migrate once.

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};

use super::{INFLIGHT_MAX_MS, UploadRow};
use crate::error::{Error, Result};

/// The schema, one step per version; a database records the last one applied in
/// `schema_version`. Steps are never edited once released: a change is a new step.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "
CREATE TABLE orgs(name TEXT PRIMARY KEY, created BIGINT NOT NULL);
CREATE TABLE users(
    name TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    password TEXT NOT NULL,
    created BIGINT NOT NULL);
CREATE TABLE tokens(
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    scope TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created BIGINT NOT NULL);
CREATE TABLE pins(
    repo TEXT NOT NULL,
    digest TEXT NOT NULL,
    holder TEXT NOT NULL,
    created BIGINT NOT NULL,
    PRIMARY KEY(repo, digest, holder));
CREATE TABLE uploads(
    id TEXT PRIMARY KEY,
    repo TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    size BIGINT NOT NULL,
    parts TEXT[] NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL);
CREATE INDEX uploads_updated ON uploads(updated_ms);
CREATE TABLE gc_lease(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    mark_start_ms BIGINT NOT NULL);
CREATE TABLE gc_touches(digest TEXT PRIMARY KEY, at_ms BIGINT NOT NULL);
CREATE INDEX gc_touches_at ON gc_touches(at_ms);
CREATE TABLE gc_deleting(digest TEXT PRIMARY KEY);
CREATE TABLE gc_inflight(
    writer TEXT NOT NULL,
    digest TEXT NOT NULL,
    since_ms BIGINT NOT NULL,
    PRIMARY KEY(writer, digest));
CREATE TABLE secrets(name TEXT PRIMARY KEY, value BYTEA NOT NULL);
",
)];

/// Any key for `pg_advisory_xact_lock`, held while migrating.
const MIGRATION_LOCK: i64 = 0x5354_5241_5441_0001;

/// The server's clock in milliseconds: one clock for all replicas.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Error {
    move |source| Error::Postgres { what, source }
}

pub(crate) struct PgMeta {
    pool: Pool,
}

impl PgMeta {
    /// Connect to `url` (`postgres://user:password@host:port/db`) and bring the schema up to
    /// date.
    pub async fn open(url: &str) -> Result<PgMeta> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| Error::PgConfig(e.to_string()))?;
        let manager = Manager::from_config(
            config,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(16)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .wait_timeout(Some(std::time::Duration::from_secs(30)))
            .build()
            .map_err(|e| Error::PgConfig(e.to_string()))?;
        let db = PgMeta { pool };
        db.migrate().await?;
        Ok(db)
    }

    async fn client(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| Error::PgPool(e.to_string()))
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg("migrate"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg("migrate"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)")
            .await
            .map_err(pg("migrate"))?;
        let row = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
            .await
            .map_err(pg("migrate"))?;
        let current: i32 = row.get(0);
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if current > newest {
            return Err(Error::PgConfig(format!(
                "the database's schema is version {current}, newer than this strata's {newest}; \
                 hint: upgrade strata"
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            tx.batch_execute(sql).await.map_err(pg("migrate"))?;
            tx.execute(
                "INSERT INTO schema_version(version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(pg("migrate"))?;
        }
        tx.commit().await.map_err(pg("migrate"))
    }

    async fn exec(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        let client = self.client().await?;
        let st = client.prepare_cached(sql).await.map_err(pg(what))?;
        client.execute(&st, params).await.map_err(pg(what))
    }

    async fn rows(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let client = self.client().await?;
        let st = client.prepare_cached(sql).await.map_err(pg(what))?;
        client.query(&st, params).await.map_err(pg(what))
    }

    pub async fn now_ms(&self) -> Result<i64> {
        let rows = self
            .rows("read the clock", &format!("SELECT {NOW_MS}"), &[])
            .await?;
        Ok(rows.first().map_or(0, |r| r.get(0)))
    }

    /// The secret `name`, made from `fresh` by whichever replica asks first.
    pub async fn shared_secret(&self, name: &str, fresh: Vec<u8>) -> Result<Vec<u8>> {
        self.exec(
            "store a secret",
            "INSERT INTO secrets(name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&name, &fresh],
        )
        .await?;
        let rows = self
            .rows(
                "read a secret",
                "SELECT value FROM secrets WHERE name = $1",
                &[&name],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)).unwrap_or(fresh))
    }

    pub async fn org_exists(&self, org: &str) -> Result<bool> {
        let rows = self
            .rows("read org", "SELECT 1 FROM orgs WHERE name = $1", &[&org])
            .await?;
        Ok(!rows.is_empty())
    }

    pub async fn insert_org(&self, org: &str, now: i64) -> Result<bool> {
        self.exec(
            "create org",
            "INSERT INTO orgs(name, created) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&org, &now],
        )
        .await
        .map(|n| n > 0)
    }

    pub async fn orgs(&self) -> Result<Vec<String>> {
        let rows = self
            .rows("list orgs", "SELECT name FROM orgs ORDER BY name", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn insert_user(&self, name: &str, org: &str, hash: &str, now: i64) -> Result<bool> {
        self.exec(
            "create user",
            "INSERT INTO users(name, org, password, created) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&name, &org, &hash, &now],
        )
        .await
        .map(|n| n > 0)
    }

    pub async fn user_hash(&self, name: &str) -> Result<Option<(String, String)>> {
        let rows = self
            .rows(
                "read user",
                "SELECT org, password FROM users WHERE name = $1",
                &[&name],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    pub async fn token_scope(&self, id: &str, org: &str) -> Result<Option<String>> {
        let rows = self
            .rows(
                "read token",
                "SELECT scope FROM tokens WHERE id = $1 AND org = $2",
                &[&id, &org],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    pub async fn insert_token(
        &self,
        id: &str,
        org: &str,
        scope: &str,
        hash: &str,
        now: i64,
    ) -> Result<()> {
        self.exec(
            "create token",
            "INSERT INTO tokens(id, org, scope, hash, created) VALUES ($1, $2, $3, $4, $5)",
            &[&id, &org, &scope, &hash, &now],
        )
        .await?;
        Ok(())
    }

    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<(String, String, String)>> {
        let rows = self
            .rows(
                "read token",
                "SELECT id, org, scope FROM tokens WHERE hash = $1",
                &[&hash],
            )
            .await?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    pub async fn tokens(&self, org: Option<&str>) -> Result<Vec<(String, String, String, i64)>> {
        let rows = self
            .rows(
                "list tokens",
                "SELECT id, org, scope, created FROM tokens
                 WHERE $1::TEXT IS NULL OR org = $1 ORDER BY org, created, id",
                &[&org],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    pub async fn delete_token(&self, id: &str) -> Result<bool> {
        self.exec("delete token", "DELETE FROM tokens WHERE id = $1", &[&id])
            .await
            .map(|n| n > 0)
    }

    pub async fn insert_pin(&self, repo: &str, digest: &str, holder: &str, now: i64) -> Result<()> {
        self.exec(
            "pin",
            "INSERT INTO pins(repo, digest, holder, created) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&repo, &digest, &holder, &now],
        )
        .await?;
        Ok(())
    }

    pub async fn delete_pin(&self, repo: &str, digest: &str, holder: &str) -> Result<bool> {
        self.exec(
            "unpin",
            "DELETE FROM pins WHERE repo = $1 AND digest = $2 AND holder = $3",
            &[&repo, &digest, &holder],
        )
        .await
        .map(|n| n > 0)
    }

    pub async fn pins(&self) -> Result<Vec<(String, String, String)>> {
        let rows = self
            .rows(
                "list pins",
                "SELECT repo, digest, holder FROM pins ORDER BY repo, digest, holder",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub async fn upload_create(&self, id: &str, repo: &str, algorithm: &str) -> Result<()> {
        self.exec(
            "create upload",
            &format!(
                "INSERT INTO uploads(id, repo, algorithm, size, parts, created_ms, updated_ms)
                 VALUES ($1, $2, $3, 0, '{{}}', {NOW_MS}, {NOW_MS})"
            ),
            &[&id, &repo, &algorithm],
        )
        .await?;
        Ok(())
    }

    pub async fn upload(&self, id: &str) -> Result<Option<UploadRow>> {
        let rows = self
            .rows(
                "read upload",
                "SELECT repo, algorithm, size, parts FROM uploads WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(rows.first().map(|r| UploadRow {
            repo: r.get(0),
            algorithm: r.get(1),
            size: r.get::<_, i64>(2).max(0) as u64,
            parts: r.get(3),
        }))
    }

    pub async fn upload_advance(&self, id: &str, from: i64, to: i64, part: &str) -> Result<bool> {
        self.exec(
            "advance upload",
            &format!(
                "UPDATE uploads SET size = $3, parts = array_append(parts, $4::TEXT),
                     updated_ms = {NOW_MS}
                 WHERE id = $1 AND size = $2"
            ),
            &[&id, &from, &to, &part],
        )
        .await
        .map(|n| n > 0)
    }

    pub async fn upload_delete(&self, id: &str) -> Result<Option<Vec<String>>> {
        let rows = self
            .rows(
                "delete upload",
                "DELETE FROM uploads WHERE id = $1 RETURNING parts",
                &[&id],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    pub async fn uploads_stale(&self, max_age_ms: i64) -> Result<Vec<(String, Vec<String>)>> {
        let rows = self
            .rows(
                "list uploads",
                &format!("SELECT id, parts FROM uploads WHERE updated_ms < {NOW_MS} - $1"),
                &[&max_age_ms],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    pub async fn gc_acquire(
        &self,
        holder: &str,
        ttl: i64,
    ) -> Result<std::result::Result<i64, String>> {
        let mut client = self.client().await?;
        let what = "take the gc lease";
        let tx = client.transaction().await.map_err(pg(what))?;
        // The row is taken only when free or expired; `RETURNING` says whether it was.
        let taken = tx
            .query(
                &format!(
                    "INSERT INTO gc_lease(id, holder, expires_ms, mark_start_ms)
                     VALUES (1, $1, {NOW_MS} + $2, {NOW_MS})
                     ON CONFLICT (id) DO UPDATE SET holder = excluded.holder,
                         expires_ms = excluded.expires_ms, mark_start_ms = excluded.mark_start_ms
                     WHERE gc_lease.expires_ms <= excluded.mark_start_ms
                     RETURNING mark_start_ms"
                ),
                &[&holder, &ttl],
            )
            .await
            .map_err(pg(what))?;
        let Some(row) = taken.first() else {
            let other = tx
                .query("SELECT holder FROM gc_lease WHERE id = 1", &[])
                .await
                .map_err(pg(what))?;
            return Ok(Err(other.first().map(|r| r.get(0)).unwrap_or_default()));
        };
        let start: i64 = row.get(0);
        tx.execute("DELETE FROM gc_deleting", &[])
            .await
            .map_err(pg(what))?;
        tx.commit().await.map_err(pg(what))?;
        Ok(Ok(start))
    }

    pub async fn gc_renew(&self, holder: &str, ttl: i64) -> Result<bool> {
        self.exec(
            "renew the gc lease",
            &format!(
                "UPDATE gc_lease SET expires_ms = {NOW_MS} + $2
                 WHERE id = 1 AND holder = $1 AND expires_ms > {NOW_MS}"
            ),
            &[&holder, &ttl],
        )
        .await
        .map(|n| n > 0)
    }

    pub async fn gc_release(&self, holder: &str) -> Result<()> {
        let mut client = self.client().await?;
        let what = "release the gc lease";
        let tx = client.transaction().await.map_err(pg(what))?;
        let n = tx
            .execute(
                "UPDATE gc_lease SET expires_ms = 0 WHERE id = 1 AND holder = $1",
                &[&holder],
            )
            .await
            .map_err(pg(what))?;
        if n > 0 {
            tx.execute("DELETE FROM gc_deleting", &[])
                .await
                .map_err(pg(what))?;
        }
        tx.commit().await.map_err(pg(what))
    }

    pub async fn gc_mark_deleting(&self, digests: &[String]) -> Result<()> {
        self.exec(
            "mark deletions",
            "INSERT INTO gc_deleting(digest) SELECT unnest($1::TEXT[]) ON CONFLICT DO NOTHING",
            &[&digests],
        )
        .await?;
        Ok(())
    }

    pub async fn gc_clear_deleting(&self, digests: &[String]) -> Result<()> {
        self.exec(
            "clear deletions",
            "DELETE FROM gc_deleting WHERE digest = ANY($1::TEXT[])",
            &[&digests],
        )
        .await?;
        Ok(())
    }

    pub async fn deleting_among(&self, digests: &[String]) -> Result<Vec<String>> {
        let rows = self
            .rows(
                "read deletions",
                &format!(
                    "SELECT digest FROM gc_deleting WHERE digest = ANY($1::TEXT[])
                     AND EXISTS (SELECT 1 FROM gc_lease WHERE id = 1 AND expires_ms > {NOW_MS})"
                ),
                &[&digests],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// `begin`: the writer starts using `digests` (in flight, and used now); otherwise it is
    /// done with them (used now, no longer in flight).
    pub async fn use_digests(&self, writer: &str, digests: &[String], begin: bool) -> Result<()> {
        let mut client = self.client().await?;
        let what = "record use";
        let tx = client.transaction().await.map_err(pg(what))?;
        let touch = tx
            .prepare_cached(&format!(
                "INSERT INTO gc_touches(digest, at_ms)
                 SELECT d, {NOW_MS} FROM (SELECT DISTINCT unnest($1::TEXT[]) AS d) AS used
                 ON CONFLICT (digest) DO UPDATE SET at_ms = excluded.at_ms"
            ))
            .await
            .map_err(pg(what))?;
        tx.execute(&touch, &[&digests]).await.map_err(pg(what))?;
        if begin {
            let st = tx
                .prepare_cached(&format!(
                    "INSERT INTO gc_inflight(writer, digest, since_ms)
                     SELECT $1, d, {NOW_MS} FROM (SELECT DISTINCT unnest($2::TEXT[]) AS d) AS used
                     ON CONFLICT DO NOTHING"
                ))
                .await
                .map_err(pg(what))?;
            tx.execute(&st, &[&writer, &digests])
                .await
                .map_err(pg(what))?;
        } else {
            let st = tx
                .prepare_cached("DELETE FROM gc_inflight WHERE writer = $1")
                .await
                .map_err(pg(what))?;
            tx.execute(&st, &[&writer]).await.map_err(pg(what))?;
        }
        tx.commit().await.map_err(pg(what))
    }

    pub async fn used_since(&self, since: i64, inflight_since: i64) -> Result<Vec<String>> {
        let rows = self
            .rows(
                "read uses",
                "SELECT digest FROM gc_touches WHERE at_ms >= $1
                 UNION SELECT digest FROM gc_inflight WHERE since_ms >= $2",
                &[&since, &inflight_since],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn trim_touches(&self, before: i64) -> Result<()> {
        self.exec(
            "trim uses",
            "DELETE FROM gc_touches WHERE at_ms < $1",
            &[&before],
        )
        .await?;
        self.exec(
            "trim uses",
            "DELETE FROM gc_inflight WHERE since_ms < $1",
            &[&(before - INFLIGHT_MAX_MS)],
        )
        .await?;
        Ok(())
    }
}
