//! The registry's metadata: orgs, users, API tokens, pins, upload sessions and gc's
//! coordination (its lease, the digests it is deleting, the digests writers just used).
//!
//! Two stores hold it with one behaviour: SQLite beside one server (`<root>/registry-v1.db`,
//! WAL; the default) and PostgreSQL shared by any number of replicas (`[postgres] url`).
//! [`Meta`] has the rules (validation, hashing); the backends only read and write rows.

mod postgres;
mod sqlite;

use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use sha2::Digest as _;

use crate::config::MetaKind;
use crate::error::{Error, Result};
use crate::util;

/// What an API token (or a user) may do in its org's repositories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TokenScope {
    /// Read manifests, blobs, tags and referrers.
    Pull,
    /// Everything `Pull` may, and push, mount and delete.
    Push,
}

impl TokenScope {
    /// `pull` or `push`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Pull => "pull",
            TokenScope::Push => "push",
        }
    }

    /// The inverse of [`TokenScope::as_str`].
    pub fn parse(s: &str) -> Option<TokenScope> {
        match s {
            "pull" => Some(TokenScope::Pull),
            "push" => Some(TokenScope::Push),
            _ => None,
        }
    }
}

impl std::str::FromStr for TokenScope {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        TokenScope::parse(s)
            .ok_or_else(|| format!("unknown scope `{s}`; expected `pull` or `push`"))
    }
}

/// Who is making a request, once credentials have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Principal {
    pub org: String,
    /// A user name, or `token:<id>`.
    pub subject: String,
    pub max: TokenScope,
}

/// A pin: `holder` uses `repo@digest`, so gc keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// Repository, `<org>/<name>`.
    pub repo: String,
    /// The pinned manifest or index.
    pub digest: strata_oci::Digest,
    /// Who needs it (a machine id, a deployment...); one pin per holder.
    pub holder: String,
}

/// An API token as listed (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Short id for listing and revoking (a prefix of the secret's hash).
    pub id: String,
    /// The org the token acts for.
    pub org: String,
    /// What it may do.
    pub scope: TokenScope,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// An upload session as stored: its bytes are the objects `parts` (under `_uploads/<id>/`),
/// in order; `size` is their total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UploadRow {
    pub repo: String,
    pub algorithm: String,
    pub size: u64,
    pub parts: Vec<String>,
}

/// A write's use of digests, from [`Meta::protect`] to [`Meta::done`].
#[must_use = "end the use with `Meta::done`"]
pub(crate) struct InUse {
    writer: String,
    keys: Vec<String>,
}

/// A use still in flight after this long is from a writer that died: gc ignores it.
const INFLIGHT_MAX_MS: i64 = 3600 * 1000;

/// Prefix of every API token; lets Basic auth tell a token from a password.
pub(crate) const TOKEN_PREFIX: &str = "strata_";

/// An org is one repository path component: it is the first component of its repositories.
pub(crate) fn validate_org(name: &str) -> Result<()> {
    let bad = |reason: &str| Error::InvalidOrg {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.contains('/') {
        return Err(bad("must be a single path component (no `/`)"));
    }
    strata_oci::validate_repository_name(name).map_err(|e| bad(&e.to_string()))
}

fn validate_user(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidUser {
            name: name.to_string(),
            reason: "use 1-128 letters, digits, `.`, `_`, `-` or `@`".to_string(),
        })
    }
}

fn token_hash(token: &str) -> String {
    util::hex(&sha2::Sha256::digest(token.as_bytes()))
}

/// The metadata store: SQLite or PostgreSQL.
pub(crate) enum Meta {
    Sqlite(sqlite::SqliteMeta),
    Postgres(postgres::PgMeta),
}

/// Runs the same call on either backend (SQLite's are synchronous: one indexed statement).
macro_rules! on {
    ($self:expr, $db:ident => $call:expr) => {
        match $self {
            Meta::Sqlite($db) => $call,
            Meta::Postgres($db) => $call.await,
        }
    };
}

impl Meta {
    /// Open (and create or migrate) the store `kind` names; SQLite lives under `root`.
    pub async fn open(kind: &MetaKind, root: &std::path::Path) -> Result<Meta> {
        Ok(match kind {
            MetaKind::Sqlite => Meta::Sqlite(sqlite::SqliteMeta::open(root)?),
            MetaKind::Postgres { url } => Meta::Postgres(postgres::PgMeta::open(url).await?),
        })
    }

    /// The key that signs bearer tokens: `<root>/token.key` with SQLite; with PostgreSQL, one
    /// key in the database, so a token from `/token` on one replica works on all.
    pub async fn token_key(&self, root: &std::path::Path) -> Result<Vec<u8>> {
        match self {
            Meta::Sqlite(_) => crate::auth::load_or_create_key(root),
            Meta::Postgres(db) => db.shared_secret("token.key", util::random_bytes(32)?).await,
        }
    }

    /// The store's clock, in milliseconds since the Unix epoch (PostgreSQL's own clock, so
    /// replicas on several machines agree).
    pub async fn now_ms(&self) -> Result<i64> {
        on!(self, db => db.now_ms())
    }

    pub async fn org_exists(&self, org: &str) -> Result<bool> {
        on!(self, db => db.org_exists(org))
    }

    pub async fn create_org(&self, org: &str) -> Result<()> {
        validate_org(org)?;
        let now = util::unix_now() as i64;
        if !on!(self, db => db.insert_org(org, now))? {
            return Err(Error::OrgExists {
                org: org.to_string(),
            });
        }
        Ok(())
    }

    pub async fn orgs(&self) -> Result<Vec<String>> {
        on!(self, db => db.orgs())
    }

    pub async fn create_user(&self, org: &str, name: &str, password: &str) -> Result<()> {
        validate_user(name)?;
        if !self.org_exists(org).await? {
            return Err(Error::UnknownOrg {
                org: org.to_string(),
            });
        }
        if self.user_hash(name).await?.is_some() {
            return Err(Error::UserExists {
                user: name.to_string(),
            });
        }
        let salt = SaltString::encode_b64(&util::random_bytes(16)?)
            .map_err(|e| Error::Password(e.to_string()))?;
        let password = password.to_string();
        let hash = tokio::task::spawn_blocking(move || {
            argon2::Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| Error::Password(e.to_string()))
        })
        .await??;
        let now = util::unix_now() as i64;
        if !on!(self, db => db.insert_user(name, org, &hash, now))? {
            return Err(Error::UserExists {
                user: name.to_string(),
            });
        }
        Ok(())
    }

    /// The user's principal when `password` is right, with the stored hash it was checked
    /// against (a cached login stays valid only while that hash is unchanged).
    pub async fn check_password(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Option<(Principal, String)>> {
        let Some((org, stored)) = self.user_hash(name).await? else {
            return Ok(None);
        };
        let (password, checked) = (password.to_string(), stored.clone());
        let ok = tokio::task::spawn_blocking(move || match PasswordHash::new(&checked) {
            Ok(parsed) => Ok(argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()),
            Err(_) => Err(()),
        })
        .await?
        .map_err(|()| Error::Corrupt {
            what: "password hash",
            key: format!("users/{name}"),
            reason: "not a PHC string".to_string(),
        })?;
        Ok(ok.then(|| {
            (
                Principal {
                    org,
                    subject: name.to_string(),
                    max: TokenScope::Push,
                },
                stored,
            )
        }))
    }

    /// The stored password hash of user `name` and its org, or `None` when there is no such
    /// user. Cheap (one indexed read): used to recheck a cached Basic login on every request.
    pub async fn user_hash(&self, name: &str) -> Result<Option<(String, String)>> {
        on!(self, db => db.user_hash(name))
    }

    /// Whether `principal` still exists as it was when its credentials were checked: the API
    /// token is not revoked, the user is still in the same org. One indexed read.
    pub async fn principal_alive(&self, principal: &Principal) -> Result<bool> {
        if let Some(id) = principal.subject.strip_prefix("token:") {
            let scope = on!(self, db => db.token_scope(id, &principal.org))?;
            Ok(scope.and_then(|s| TokenScope::parse(&s)) == Some(principal.max))
        } else {
            Ok(self
                .user_hash(&principal.subject)
                .await?
                .is_some_and(|(org, _)| org == principal.org))
        }
    }

    /// Create an API token; the returned secret is stored only as a hash.
    pub async fn create_token(&self, org: &str, scope: TokenScope) -> Result<String> {
        if !self.org_exists(org).await? {
            return Err(Error::UnknownOrg {
                org: org.to_string(),
            });
        }
        use base64::Engine as _;
        let secret =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(util::random_bytes(32)?);
        let token = format!("{TOKEN_PREFIX}{secret}");
        let hash = token_hash(&token);
        let id = &hash[..12];
        let now = util::unix_now() as i64;
        on!(self, db => db.insert_token(id, org, scope.as_str(), &hash, now))?;
        Ok(token)
    }

    pub async fn check_token(&self, token: &str) -> Result<Option<Principal>> {
        let hash = token_hash(token);
        let row = on!(self, db => db.token_by_hash(&hash))?;
        Ok(row.and_then(|(id, org, scope)| {
            Some(Principal {
                org,
                subject: format!("token:{id}"),
                max: TokenScope::parse(&scope)?,
            })
        }))
    }

    pub async fn tokens(&self, org: Option<&str>) -> Result<Vec<TokenInfo>> {
        let rows = on!(self, db => db.tokens(org))?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, org, scope, created)| {
                Some(TokenInfo {
                    id,
                    org,
                    scope: TokenScope::parse(&scope)?,
                    created_unix: created.max(0) as u64,
                })
            })
            .collect())
    }

    pub async fn revoke_token(&self, id: &str) -> Result<bool> {
        on!(self, db => db.delete_token(id))
    }

    /// Record the pin as a use of the digest (see [`Meta::protect`]): a gc running now keeps
    /// the pinned manifest and all it reaches, or had deleted it before the pin was made.
    pub async fn pin(&self, repo: &str, digest: &strata_oci::Digest, holder: &str) -> Result<()> {
        strata_oci::validate_repository_name(repo)?;
        let now = util::unix_now() as i64;
        let used = self.protect(std::slice::from_ref(digest)).await?;
        let pinned = on!(self, db => db.insert_pin(repo, &digest.to_string(), holder, now));
        self.done(used).await?;
        pinned
    }

    pub async fn unpin(
        &self,
        repo: &str,
        digest: &strata_oci::Digest,
        holder: &str,
    ) -> Result<bool> {
        on!(self, db => db.delete_pin(repo, &digest.to_string(), holder))
    }

    pub async fn pins(&self) -> Result<Vec<Pin>> {
        let rows = on!(self, db => db.pins())?;
        rows.into_iter()
            .map(|(repo, digest, holder)| {
                let digest = digest
                    .parse()
                    .map_err(|e: strata_oci::Error| Error::Corrupt {
                        what: "pin",
                        key: format!("pins/{repo}"),
                        reason: e.to_string(),
                    })?;
                Ok(Pin {
                    repo,
                    digest,
                    holder,
                })
            })
            .collect()
    }

    // ---- upload sessions ----

    pub async fn upload_create(&self, id: &str, repo: &str, algorithm: &str) -> Result<()> {
        on!(self, db => db.upload_create(id, repo, algorithm))
    }

    pub async fn upload(&self, id: &str) -> Result<Option<UploadRow>> {
        on!(self, db => db.upload(id))
    }

    /// Append `part` (of `to - from` bytes) to the session if it is still at `from`; `false`
    /// when another request moved it first.
    pub async fn upload_advance(&self, id: &str, from: u64, to: u64, part: &str) -> Result<bool> {
        on!(self, db => db.upload_advance(id, from as i64, to as i64, part))
    }

    /// Forget the session; its parts, for the caller to delete (`None`: it was not there).
    pub async fn upload_delete(&self, id: &str) -> Result<Option<Vec<String>>> {
        on!(self, db => db.upload_delete(id))
    }

    /// Sessions untouched for longer than `max_age`, with their parts.
    pub async fn uploads_stale(&self, max_age: Duration) -> Result<Vec<(String, Vec<String>)>> {
        let max_age = max_age.as_millis() as i64;
        on!(self, db => db.uploads_stale(max_age))
    }

    // ---- gc coordination ----

    /// Take the gc lease for `ttl` when no live gc holds it; the store's time the mark starts
    /// at. `Err(GcBusy)` names the holder otherwise. Markers a dead gc left are cleared.
    pub async fn gc_acquire(&self, holder: &str, ttl: Duration) -> Result<i64> {
        let ttl = ttl.as_millis() as i64;
        match on!(self, db => db.gc_acquire(holder, ttl))? {
            Ok(start) => Ok(start),
            Err(holder) => Err(Error::GcBusy { holder }),
        }
    }

    /// Extend the lease; `false` when it was lost (expired and taken by another gc).
    pub async fn gc_renew(&self, holder: &str, ttl: Duration) -> Result<bool> {
        let ttl = ttl.as_millis() as i64;
        on!(self, db => db.gc_renew(holder, ttl))
    }

    /// Give the lease up and clear its deletion markers.
    pub async fn gc_release(&self, holder: &str) -> Result<()> {
        on!(self, db => db.gc_release(holder))
    }

    pub async fn gc_mark_deleting(&self, digests: &[String]) -> Result<()> {
        on!(self, db => db.gc_mark_deleting(digests))
    }

    pub async fn gc_clear_deleting(&self, digests: &[String]) -> Result<()> {
        on!(self, db => db.gc_clear_deleting(digests))
    }

    /// Digests in use by a writer now, or used at or after `since_ms`.
    pub async fn used_since(&self, since_ms: i64) -> Result<Vec<String>> {
        let inflight_since = self.now_ms().await? - INFLIGHT_MAX_MS;
        on!(self, db => db.used_since(since_ms, inflight_since))
    }

    /// Forget uses older than `before_ms` (gc no longer needs them).
    pub async fn trim_touches(&self, before_ms: i64) -> Result<()> {
        on!(self, db => db.trim_touches(before_ms))
    }

    /// Record that `digests` are being made reachable by a write starting now, then wait while
    /// a live gc is deleting any of them. Afterwards either gc sees the use and keeps them, or
    /// it has finished deleting them and the caller's existence check (made after this) sees
    /// them gone. [`Meta::done`] ends the use once the write that makes them reachable is
    /// stored (a gc whose listing missed that write then sees them used after it started).
    pub async fn protect(&self, digests: &[strata_oci::Digest]) -> Result<InUse> {
        let keys: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
        let writer = util::random_hex(12);
        if !keys.is_empty() {
            on!(self, db => db.use_digests(&writer, &keys, true))?;
            if let Err(e) = self.wait_not_deleting(digests).await {
                self.done(InUse { writer, keys }).await?;
                return Err(e);
            }
        }
        Ok(InUse { writer, keys })
    }

    /// End a use [`Meta::protect`] began (also when the write failed).
    pub async fn done(&self, used: InUse) -> Result<()> {
        if used.keys.is_empty() {
            return Ok(());
        }
        on!(self, db => db.use_digests(&used.writer, &used.keys, false))
    }

    async fn wait_not_deleting(&self, digests: &[strata_oci::Digest]) -> Result<()> {
        const LIMIT: Duration = Duration::from_secs(120);
        let keys: Vec<String> = digests.iter().map(|d| d.to_string()).collect();
        let started = std::time::Instant::now();
        loop {
            let busy = on!(self, db => db.deleting_among(&keys))?;
            let Some(first) = busy.into_iter().next() else {
                return Ok(());
            };
            if started.elapsed() > LIMIT {
                return Err(Error::GcStuck {
                    digest: first,
                    secs: LIMIT.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
