//! Orgs, users, API tokens and pins in SQLite (`<root>/registry-v1.db`, WAL).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::Digest as _;
use strata_oci::sync::MutexExt;

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

/// Prefix of every API token; lets Basic auth tell a token from a password.
pub(crate) const TOKEN_PREFIX: &str = "strata_";

pub(crate) struct MetaDb {
    path: PathBuf,
    conn: Mutex<Connection>,
}

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
";

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

impl MetaDb {
    pub fn open(root: &Path) -> Result<MetaDb> {
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
        Ok(MetaDb {
            path,
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        what: &'static str,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T> {
        // A poisoned lock only means another thread panicked mid-query; SQLite itself is
        // consistent (each statement is atomic), so keep going.
        let conn = self.conn.lock_ok();
        f(&conn).map_err(|source| Error::Db {
            path: self.path.clone(),
            what,
            source,
        })
    }

    pub fn org_exists(&self, org: &str) -> Result<bool> {
        self.with("read org", |c| {
            c.query_row("SELECT 1 FROM orgs WHERE name = ?1", [org], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
        })
    }

    pub fn create_org(&self, org: &str) -> Result<()> {
        validate_org(org)?;
        if self.org_exists(org)? {
            return Err(Error::OrgExists {
                org: org.to_string(),
            });
        }
        self.with("create org", |c| {
            c.execute(
                "INSERT INTO orgs(name, created) VALUES (?1, ?2)",
                params![org, util::unix_now() as i64],
            )
        })?;
        Ok(())
    }

    pub fn orgs(&self) -> Result<Vec<String>> {
        self.with("list orgs", |c| {
            let mut st = c.prepare("SELECT name FROM orgs ORDER BY name")?;
            st.query_map([], |r| r.get(0))?.collect()
        })
    }

    pub fn create_user(&self, org: &str, name: &str, password: &str) -> Result<()> {
        validate_user(name)?;
        if !self.org_exists(org)? {
            return Err(Error::UnknownOrg {
                org: org.to_string(),
            });
        }
        let exists = self.with("read user", |c| {
            c.query_row("SELECT 1 FROM users WHERE name = ?1", [name], |_| Ok(()))
                .optional()
        })?;
        if exists.is_some() {
            return Err(Error::UserExists {
                user: name.to_string(),
            });
        }
        let salt = SaltString::encode_b64(&util::random_bytes(16)?)
            .map_err(|e| Error::Password(e.to_string()))?;
        let hash = argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| Error::Password(e.to_string()))?
            .to_string();
        self.with("create user", |c| {
            c.execute(
                "INSERT INTO users(name, org, password, created) VALUES (?1, ?2, ?3, ?4)",
                params![name, org, hash, util::unix_now() as i64],
            )
        })?;
        Ok(())
    }

    /// The user's principal when `password` is right, with the stored hash it was checked
    /// against (a cached login stays valid only while that hash is unchanged).
    pub fn check_password(
        &self,
        name: &str,
        password: &str,
    ) -> Result<Option<(Principal, String)>> {
        let Some((org, stored)) = self.user_hash(name)? else {
            return Ok(None);
        };
        let Ok(parsed) = PasswordHash::new(&stored) else {
            return Err(Error::Corrupt {
                what: "password hash",
                key: format!("users/{name}"),
                reason: "not a PHC string".to_string(),
            });
        };
        let ok = argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
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

    /// Whether `principal` still exists as it was when its credentials were checked: the API
    /// token is not revoked, the user is still in the same org. One indexed read.
    pub fn principal_alive(&self, principal: &Principal) -> Result<bool> {
        if let Some(id) = principal.subject.strip_prefix("token:") {
            let scope: Option<String> = self.with("read token", |c| {
                c.query_row(
                    "SELECT scope FROM tokens WHERE id = ?1 AND org = ?2",
                    [id, principal.org.as_str()],
                    |r| r.get(0),
                )
                .optional()
            })?;
            Ok(scope.and_then(|s| TokenScope::parse(&s)) == Some(principal.max))
        } else {
            Ok(self
                .user_hash(&principal.subject)?
                .is_some_and(|(org, _)| org == principal.org))
        }
    }

    /// Create an API token; the returned secret is stored only as a hash.
    pub fn create_token(&self, org: &str, scope: TokenScope) -> Result<String> {
        if !self.org_exists(org)? {
            return Err(Error::UnknownOrg {
                org: org.to_string(),
            });
        }
        use base64::Engine as _;
        let secret =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(util::random_bytes(32)?);
        let token = format!("{TOKEN_PREFIX}{secret}");
        let hash = token_hash(&token);
        let id = hash[..12].to_string();
        self.with("create token", |c| {
            c.execute(
                "INSERT INTO tokens(id, org, scope, hash, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, org, scope.as_str(), hash, util::unix_now() as i64],
            )
        })?;
        Ok(token)
    }

    pub fn check_token(&self, token: &str) -> Result<Option<Principal>> {
        let hash = token_hash(token);
        let row: Option<(String, String, String)> = self.with("read token", |c| {
            c.query_row(
                "SELECT id, org, scope FROM tokens WHERE hash = ?1",
                [&hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })?;
        Ok(row.and_then(|(id, org, scope)| {
            Some(Principal {
                org,
                subject: format!("token:{id}"),
                max: TokenScope::parse(&scope)?,
            })
        }))
    }

    pub fn tokens(&self, org: Option<&str>) -> Result<Vec<TokenInfo>> {
        let rows: Vec<(String, String, String, i64)> = self.with("list tokens", |c| {
            let mut st = c.prepare(
                "SELECT id, org, scope, created FROM tokens WHERE ?1 IS NULL OR org = ?1 ORDER BY org, created, id",
            )?;
            st.query_map([org], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect()
        })?;
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

    pub fn revoke_token(&self, id: &str) -> Result<bool> {
        self.with("delete token", |c| {
            c.execute("DELETE FROM tokens WHERE id = ?1", [id])
        })
        .map(|n| n > 0)
    }

    pub fn pin(&self, repo: &str, digest: &strata_oci::Digest, holder: &str) -> Result<()> {
        strata_oci::validate_repository_name(repo)?;
        self.with("pin", |c| {
            c.execute(
                "INSERT OR IGNORE INTO pins(repo, digest, holder, created) VALUES (?1, ?2, ?3, ?4)",
                params![repo, digest.to_string(), holder, util::unix_now() as i64],
            )
        })?;
        Ok(())
    }

    pub fn unpin(&self, repo: &str, digest: &strata_oci::Digest, holder: &str) -> Result<bool> {
        self.with("unpin", |c| {
            c.execute(
                "DELETE FROM pins WHERE repo = ?1 AND digest = ?2 AND holder = ?3",
                params![repo, digest.to_string(), holder],
            )
        })
        .map(|n| n > 0)
    }

    pub fn pins(&self) -> Result<Vec<Pin>> {
        let rows: Vec<(String, String, String)> = self.with("list pins", |c| {
            let mut st =
                c.prepare("SELECT repo, digest, holder FROM pins ORDER BY repo, digest, holder")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })?;
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
}
