//! The host's machines, apps, releases and routes, in the store's SQLite database.
//!
//! The CLI writes what it wants (a machine's desired state, an app's route); the agent reads it
//! on every tick and makes it so, writing back what it observed (pid, state, exit code). One
//! table per concept; every change is one statement or one transaction, so a killed process
//! never leaves a half-made machine or release behind.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use strata_oci::Digest;

use crate::error::{Error, Result};

/// Our tables live in the store's metadata database, beside its own (which we never touch).
/// `deploy_schema` records which of [`MIGRATIONS`] ran, so the store's `user_version` stays the
/// store's.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE machines (
    id          TEXT PRIMARY KEY,
    app         TEXT,
    release     INTEGER,
    image       TEXT NOT NULL,
    digest      TEXT NOT NULL,
    config      TEXT NOT NULL,
    net_index   INTEGER NOT NULL UNIQUE,
    desired     TEXT NOT NULL,
    state       TEXT NOT NULL,
    pid         INTEGER,
    exit_code   INTEGER,
    restarts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    created     INTEGER NOT NULL,
    updated     INTEGER NOT NULL
);
CREATE TABLE releases (
    app         TEXT NOT NULL,
    version     INTEGER NOT NULL,
    image       TEXT NOT NULL,
    digest      TEXT NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT,
    created     INTEGER NOT NULL,
    PRIMARY KEY (app, version)
);
CREATE TABLE routes (
    port        INTEGER PRIMARY KEY,
    owner       TEXT NOT NULL,
    backends    TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    applied     INTEGER NOT NULL DEFAULT 0,
    error       TEXT
);
"#,
    r#"
CREATE TABLE spare_nets (
    net_index   INTEGER PRIMARY KEY,
    ready       INTEGER NOT NULL DEFAULT 0
);
"#,
    r#"
CREATE TABLE app_tags (
    app         TEXT NOT NULL,
    tag         TEXT NOT NULL,
    PRIMARY KEY (app, tag)
);
"#,
];

/// How a machine's process should be started; stored as JSON in `machines.config`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// ENTRYPOINT + CMD, combined.
    pub args: Vec<String>,
    /// KEY=VALUE, image Env then overrides.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// USER of the image (or override), resolved when the machine starts.
    pub user: String,
    /// Named volumes: (name, path inside).
    #[serde(default)]
    pub volumes: Vec<(String, String)>,
    /// Host paths mounted in (`-v /host/path:/path[:ro]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<Bind>,
    /// Host port → machine port, served by the agent's proxy.
    #[serde(default)]
    pub ports: Vec<(u16, u16)>,
    /// The port an app serves on inside the machine (the proxy's target).
    #[serde(default)]
    pub service_port: Option<u16>,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Signal sent first on stop (the image's StopSignal, default SIGTERM).
    pub stop_signal: i32,
    /// Time between the stop signal and SIGKILL, in milliseconds.
    pub kill_timeout_ms: u64,
    /// A client attached to the process's stdin or terminal (`strata run -i`, `-t`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attach: Option<Attached>,
    /// Memory limit in bytes (`-m`, an app's `memory`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// CPU limit in thousandths of a CPU (`--cpus`, an app's `cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millicpus: Option<u64>,
}

/// A host path mounted into a machine (`docker run -v /host/path:/path[:ro]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// The absolute host path (a directory, made when missing, or a file).
    pub source: PathBuf,
    /// Where it is in the machine.
    pub target: String,
    /// Mounted read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// Where an attached client (`strata run -i`, `-t`) waits for a machine's first start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Attached {
    /// The process's stdio are the client's FIFOs: stdin (when given; the client holds its
    /// write end), stdout and stderr (the client holds their read ends).
    Pipes {
        /// The FIFO the process reads, if any (`-i`).
        #[serde(default)]
        stdin: Option<PathBuf>,
        /// Its stdout's FIFO.
        stdout: PathBuf,
        /// Its stderr's FIFO.
        stderr: PathBuf,
    },
    /// The process has a terminal whose master runc sends to this unix socket.
    Tty {
        /// The socket's path.
        socket: PathBuf,
    },
}

/// When the agent starts a machine again after its process exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    #[default]
    No,
    /// Whatever the exit code.
    Always,
    /// On a non-zero exit, at most `max` times in a row.
    OnFailure {
        /// Restarts allowed.
        max: u32,
    },
}

impl RestartPolicy {
    /// Parses `no`, `always`, `on-failure` or `on-failure:N` (Docker's spelling).
    pub fn parse(s: &str) -> Result<RestartPolicy> {
        match s {
            "no" | "never" => Ok(RestartPolicy::No),
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure { max: 3 }),
            _ => match s.strip_prefix("on-failure:").map(str::parse) {
                Some(Ok(max)) => Ok(RestartPolicy::OnFailure { max }),
                _ => Err(Error::Config(format!(
                    "restart policy `{s}`: expected no, always, on-failure or on-failure:N"
                ))),
            },
        }
    }

    /// Whether a process that exited with `code` (None: unknown) after `restarts` restarts in a
    /// row is started again.
    pub fn restarts_after(&self, code: Option<i32>, restarts: u32) -> bool {
        match self {
            RestartPolicy::No => false,
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure { max } => code != Some(0) && restarts < *max,
        }
    }
}

/// One row of `machines`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// Short unique id (lowercase ULID suffix).
    pub id: String,
    /// The app it serves, if any.
    pub app: Option<String>,
    /// The app's release it belongs to.
    pub release: Option<u32>,
    /// The image reference it was created from.
    pub image: String,
    /// The manifest digest it runs.
    pub digest: Digest,
    /// How to run it.
    pub config: MachineConfig,
    /// Its network slot (see `strata_runtime::NetSpec`).
    pub net_index: u32,
    /// What the user wants.
    pub desired: Desired,
    /// What the agent last saw.
    pub state: MachineState,
    /// Host pid of its PID 1 while running.
    pub pid: Option<u32>,
    /// Exit code of the last run.
    pub exit_code: Option<i32>,
    /// Restarts in a row by the restart policy.
    pub restarts: u32,
    /// Why the last start or stop failed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds.
    pub updated: i64,
}

/// What the user wants a machine to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// Running (started again per its restart policy).
    Running,
    /// Stopped, kept.
    Stopped,
    /// Gone: stopped, its files and network removed, its row deleted.
    Destroyed,
}

impl Desired {
    fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
            Desired::Destroyed => "destroyed",
        }
    }

    fn parse(s: &str) -> Desired {
        match s {
            "running" => Desired::Running,
            "destroyed" => Desired::Destroyed,
            _ => Desired::Stopped,
        }
    }
}

/// Text columns that hold one of a few words: written as the word, read back strictly (a
/// word this version does not know is an error naming it, not a guess).
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Its word, as stored and printed.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word,)*
                }
            }

            /// The value of `word`.
            pub fn parse(word: &str) -> Option<$name> {
                match word {
                    $($word => Some($name::$variant),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                let word = v.as_str()?;
                $name::parse(word).ok_or_else(|| {
                    rusqlite::types::FromSqlError::Other(
                        format!(concat!("unknown ", stringify!($name), " `{}`"), word).into(),
                    )
                })
            }
        }
    };
}

word_enum! {
    /// What the agent last saw of a machine.
    MachineState {
        /// Made, never started.
        Created = "created",
        /// Its process runs.
        Running = "running",
        /// Its process ended by itself (exit code in `exit_code`).
        Exited = "exited",
        /// Stopped on request.
        Stopped = "stopped",
        /// It could not be started or stopped (why in `error`).
        Failed = "failed",
    }
}

word_enum! {
    /// Where a release is in its life.
    ReleaseStatus {
        /// Its machines are being made and checked.
        Deploying = "deploying",
        /// It serves the app.
        Active = "active",
        /// A later release took over.
        Superseded = "superseded",
        /// It never served (why in `reason`).
        Failed = "failed",
    }
}

/// A digest column, read strictly.
fn digest_column(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<Digest> {
    let text: String = r.get(i)?;
    text.parse().map_err(|e: strata_oci::Error| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// One row of `releases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Release {
    /// App name.
    pub app: String,
    /// 1, 2, 3, … per app.
    pub version: u32,
    /// Image reference deployed.
    pub image: String,
    /// Its manifest digest.
    pub digest: Digest,
    pub status: ReleaseStatus,
    /// Why it failed.
    pub reason: Option<String>,
    /// Unix seconds.
    pub created: i64,
}

/// One row of `routes`: a host port the agent's proxy owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Host port.
    pub port: u16,
    /// `app:NAME` or `machine:ID`.
    pub owner: String,
    /// Where connections go.
    pub backends: Vec<std::net::SocketAddr>,
    /// Bumped on every change.
    pub generation: i64,
    /// The generation the agent has put in place.
    pub applied: i64,
    /// Why the agent could not put it in place (e.g. port in use).
    pub error: Option<String>,
}

/// The deploy tables of one store.
#[derive(Debug)]
pub struct State {
    root: PathBuf,
    path: PathBuf,
    conn: Connection,
    /// Host-wide claims of network slots, one file per slot: veth names and addresses are
    /// host-wide, and several stores (users, tests) may run machines on one host.
    claims: PathBuf,
}

/// Where network slots are claimed: `$STRATA_NET_CLAIMS`, else `/run/strata/net` (a tmpfs:
/// claims vanish with the network namespaces on reboot).
fn default_claims() -> PathBuf {
    std::env::var_os("STRATA_NET_CLAIMS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/strata/net"))
}

/// The owner named in the claim of a spare network's slot (never a machine id: those are
/// checked by `valid_machine_id`).
const SPARE: &str = "@spare";

/// What a slot's claim file says: the store's DB and the machine.
fn claim_owner(db: &Path, id: &str) -> String {
    format!("{}\n{id}\n", db.display())
}

/// Hands a claim this store holds to `owner` (a stale claim taken over, a spare given to a
/// machine).
fn rewrite_claim(file: &Path, owner: &str) -> Result<()> {
    std::fs::write(file, owner).map_err(|source| Error::Io {
        op: "write",
        path: file.to_path_buf(),
        source,
    })
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

const MACHINE_COLS: &str = "id, app, release, image, digest, config, net_index, desired, state, \
     pid, exit_code, restarts, error, created, updated";

/// Turns a SQLite error into ours, naming the DB file.
fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> Error + Copy + '_ {
    move |source| Error::Db {
        path: path.to_path_buf(),
        source,
    }
}

impl State {
    /// Opens (and migrates) the deploy tables in `<store>/strata/meta-v1.db`.
    pub fn open(store_root: &Path) -> Result<State> {
        let path = store_root.join("strata/meta-v1.db");
        let db = db_err(&path);
        let mut conn = Connection::open(&path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        // As the store's own connection to this file: in WAL mode NORMAL never corrupts the
        // DB, and only a power loss can drop the last commits (machine states the agent
        // re-observes anyway); FULL would fsync each commit on the path of every machine start.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        tx.execute_batch("CREATE TABLE IF NOT EXISTS deploy_schema (version INTEGER NOT NULL)")
            .map_err(db)?;
        let version: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM deploy_schema",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(Error::Config(format!(
                "{}: deploy schema {version} is newer than this strata ({supported}); upgrade strata",
                path.display()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql).map_err(db)?;
            tx.execute(
                "INSERT INTO deploy_schema (version) VALUES (?1)",
                [i as i64 + 1],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(State {
            root: store_root.to_path_buf(),
            path,
            conn,
            claims: default_claims(),
        })
    }

    /// The same, with network slot claims in `claims` (tests).
    pub fn open_with_claims(store_root: &Path, claims: PathBuf) -> Result<State> {
        Ok(State {
            claims,
            ..State::open(store_root)?
        })
    }

    /// Another connection to the same tables and claims (for a worker thread).
    pub fn reopen(&self) -> Result<State> {
        Ok(State {
            claims: self.claims.clone(),
            ..State::open(&self.root)?
        })
    }

    fn claim_owner(&self, id: &str) -> String {
        claim_owner(&self.path, id)
    }

    /// Slots in use in this store: its machines' and its spare networks'.
    fn used_slots(tx: &rusqlite::Transaction<'_>, path: &Path) -> Result<HashSet<i64>> {
        let db = db_err(path);
        let mut used = HashSet::new();
        for sql in [
            "SELECT net_index FROM machines",
            "SELECT net_index FROM spare_nets",
        ] {
            let mut stmt = tx.prepare(sql).map_err(db)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(db)?;
            for r in rows {
                used.insert(r.map_err(db)?);
            }
        }
        Ok(used)
    }

    /// Claims a slot for a spare network (made ahead of time by the agent, so that a machine
    /// start does not wait for it). It is not handed to a machine before [`State::spare_ready`].
    pub fn claim_spare(&mut self) -> Result<u32> {
        let db = db_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let used = Self::used_slots(&tx, &self.path)?;
        let index = Self::claim_slot(&self.claims, &self.path, SPARE, &used)?;
        tx.execute(
            "INSERT INTO spare_nets (net_index, ready) VALUES (?1, 0)",
            [index],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(index as u32)
    }

    /// The spare network in slot `index` is made: the next new machine may take it.
    pub fn spare_ready(&self, index: u32) -> Result<()> {
        self.db(self.conn.execute(
            "UPDATE spare_nets SET ready = 1 WHERE net_index = ?1",
            [index],
        ))?;
        Ok(())
    }

    /// How many spare networks are made or being made.
    pub fn spare_count(&self) -> Result<usize> {
        let n: i64 = self.db(self
            .conn
            .query_row("SELECT COUNT(*) FROM spare_nets", [], |r| r.get(0)))?;
        Ok(n as usize)
    }

    /// Removes every spare's row, ready or not, and returns their slots: no machine can take
    /// them any more. The caller tears their networks down, then calls
    /// [`State::release_spare`] for each.
    pub fn take_spares(&mut self) -> Result<Vec<u32>> {
        let db = db_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let slots = {
            let mut stmt = tx
                .prepare("SELECT net_index FROM spare_nets ORDER BY net_index")
                .map_err(db)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<u32>>>().map_err(db)?
        };
        tx.execute("DELETE FROM spare_nets", []).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(slots)
    }

    /// Forgets one spare (whose network is torn down) and frees its slot.
    pub fn drop_spare(&self, index: u32) -> Result<()> {
        self.db(self
            .conn
            .execute("DELETE FROM spare_nets WHERE net_index = ?1", [index]))?;
        self.release_spare(index);
        Ok(())
    }

    /// Frees the host-wide claim of a spare's slot (after [`State::take_spares`]).
    pub fn release_spare(&self, index: u32) {
        self.release_claim(index, SPARE);
    }

    fn release_claim(&self, index: u32, owner: &str) {
        let file = self.claims.join(index.to_string());
        if std::fs::read_to_string(&file).is_ok_and(|o| o == self.claim_owner(owner)) {
            let _ = std::fs::remove_file(&file);
        }
    }

    /// Claims the lowest slot that neither this store nor another one on the host uses. A
    /// claim of this store naming a machine it no longer has is stale and taken over.
    fn claim_slot(claims: &Path, db: &Path, id: &str, used: &HashSet<i64>) -> Result<i64> {
        std::fs::create_dir_all(claims).map_err(|source| Error::Io {
            op: "create",
            path: claims.to_path_buf(),
            source,
        })?;
        let mine = format!("{}\n", db.display());
        for i in 0..16384i64 {
            if used.contains(&i) {
                continue;
            }
            let file = claims.join(i.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&file)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(claim_owner(db, id).as_bytes())
                        .map_err(|source| Error::Io {
                            op: "write",
                            path: file.clone(),
                            source,
                        })?;
                    return Ok(i);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&file).unwrap_or_default();
                    if owner.starts_with(&mine) {
                        // Ours but not in the DB (used was read inside the transaction):
                        // a machine deleted by a process killed before it released the claim.
                        rewrite_claim(&file, &claim_owner(db, id))?;
                        return Ok(i);
                    }
                }
                Err(source) => {
                    return Err(Error::Io {
                        op: "claim",
                        path: file,
                        source,
                    });
                }
            }
        }
        Err(Error::Config(
            "no free machine network slot on this host (16384 in use)".into(),
        ))
    }

    fn db<T>(&self, r: rusqlite::Result<T>) -> Result<T> {
        r.map_err(db_err(&self.path))
    }

    /// Inserts a new machine (desired running), taking the lowest free network slot.
    #[allow(clippy::too_many_arguments)]
    pub fn create_machine(
        &mut self,
        id: &str,
        app: Option<&str>,
        release: Option<u32>,
        image: &str,
        digest: &Digest,
        config: &MachineConfig,
    ) -> Result<Machine> {
        let config_json =
            serde_json::to_string(config).map_err(|e| Error::Config(e.to_string()))?;
        let t = now();
        let db = db_err(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        // A spare network the agent made is taken first: the machine starts without waiting
        // for one to be made.
        let spare: Option<i64> = tx
            .query_row(
                "SELECT net_index FROM spare_nets WHERE ready = 1 ORDER BY net_index LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let net_index = match spare {
            Some(index) => {
                tx.execute("DELETE FROM spare_nets WHERE net_index = ?1", [index])
                    .map_err(db)?;
                rewrite_claim(
                    &self.claims.join(index.to_string()),
                    &claim_owner(&self.path, id),
                )?;
                index
            }
            None => {
                let used = Self::used_slots(&tx, &self.path)?;
                Self::claim_slot(&self.claims, &self.path, id, &used)?
            }
        };
        tx.execute(
            "INSERT INTO machines (id, app, release, image, digest, config, net_index, desired, \
             state, restarts, created, updated) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', \
             'created', 0, ?8, ?8)",
            params![
                id,
                app,
                release,
                image,
                digest.to_string(),
                config_json,
                net_index,
                t
            ],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        self.machine(id)?
            .ok_or_else(|| Error::UnknownMachine(id.to_string()))
    }

    fn row_to_machine(r: &rusqlite::Row<'_>) -> rusqlite::Result<Machine> {
        let config: String = r.get(5)?;
        let config = serde_json::from_str(&config).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, Box::new(e))
        })?;
        let desired: String = r.get(7)?;
        Ok(Machine {
            id: r.get(0)?,
            app: r.get(1)?,
            release: r.get(2)?,
            image: r.get(3)?,
            digest: digest_column(r, 4)?,
            config,
            net_index: r.get(6)?,
            desired: Desired::parse(&desired),
            state: r.get(8)?,
            pid: r.get(9)?,
            exit_code: r.get(10)?,
            restarts: r.get(11)?,
            error: r.get(12)?,
            created: r.get(13)?,
            updated: r.get(14)?,
        })
    }

    /// One machine by id (or unique id prefix).
    pub fn machine(&self, id: &str) -> Result<Option<Machine>> {
        let exact = self.db(self
            .conn
            .query_row(
                &format!("SELECT {MACHINE_COLS} FROM machines WHERE id = ?1"),
                [id],
                Self::row_to_machine,
            )
            .optional())?;
        if exact.is_some() {
            return Ok(exact);
        }
        let like: Vec<Machine> = self
            .machines()?
            .into_iter()
            .filter(|m| m.id.starts_with(id))
            .collect();
        match like.len() {
            1 => Ok(like.into_iter().next()),
            0 => Ok(None),
            n => Err(Error::Config(format!(
                "machine id `{id}` is ambiguous ({n} machines start with it)"
            ))),
        }
    }

    /// Every machine, oldest first.
    pub fn machines(&self) -> Result<Vec<Machine>> {
        let mut stmt = self.db(self.conn.prepare(&format!(
            "SELECT {MACHINE_COLS} FROM machines ORDER BY created, id"
        )))?;
        let rows = self.db(stmt.query_map([], Self::row_to_machine))?;
        self.db(rows.collect())
    }

    /// The machines of an app.
    pub fn app_machines(&self, app: &str) -> Result<Vec<Machine>> {
        Ok(self
            .machines()?
            .into_iter()
            .filter(|m| m.app.as_deref() == Some(app))
            .collect())
    }

    /// Sets what the user wants; a new desire resets the restart count.
    pub fn set_desired(&self, id: &str, desired: Desired) -> Result<()> {
        self.db(self.conn.execute(
            "UPDATE machines SET desired = ?2, restarts = 0, updated = ?3 WHERE id = ?1",
            params![id, desired.as_str(), now()],
        ))?;
        Ok(())
    }

    /// Records what the agent saw.
    pub fn set_observed(
        &self,
        id: &str,
        state: MachineState,
        pid: Option<u32>,
        exit_code: Option<i32>,
        error: Option<&str>,
    ) -> Result<()> {
        self.db(self.conn.execute(
            "UPDATE machines SET state = ?2, pid = ?3, exit_code = COALESCE(?4, exit_code), \
             error = ?5, updated = ?6 WHERE id = ?1",
            params![id, state, pid, exit_code, error, now()],
        ))?;
        Ok(())
    }

    /// The restart policy gave up (or the start failed): stopped, restart count kept for
    /// `machine list`.
    pub fn give_up(&self, id: &str) -> Result<()> {
        self.db(self.conn.execute(
            // Only if the user still wants it running: a stop or destroy asked for meanwhile
            // (the agent acts on a row read a moment ago) must not be overwritten.
            "UPDATE machines SET desired = 'stopped', updated = ?2 \
             WHERE id = ?1 AND desired = 'running'",
            params![id, now()],
        ))?;
        Ok(())
    }

    /// Counts a restart by policy.
    pub fn bump_restarts(&self, id: &str) -> Result<()> {
        self.db(self.conn.execute(
            "UPDATE machines SET restarts = restarts + 1 WHERE id = ?1",
            [id],
        ))?;
        Ok(())
    }

    /// Removes a machine's row (after the agent destroyed it) and frees its network slot.
    pub fn delete_machine(&self, id: &str) -> Result<()> {
        let slot = self
            .machine(id)?
            .filter(|m| m.id == id)
            .map(|m| m.net_index);
        self.db(self
            .conn
            .execute("DELETE FROM machines WHERE id = ?1", [id]))?;
        if let Some(i) = slot {
            self.release_claim(i, id);
        }
        Ok(())
    }

    /// Starts a new release of `app` (status `deploying`), numbered after the last one.
    pub fn begin_release(&mut self, app: &str, image: &str, digest: &Digest) -> Result<Release> {
        let db = db_err(&self.path);
        let created = now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let version: u32 = tx
            .query_row(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM releases WHERE app = ?1",
                [app],
                |r| r.get(0),
            )
            .map_err(db)?;
        tx.execute(
            "INSERT INTO releases (app, version, image, digest, status, created) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                app,
                version,
                image,
                digest.to_string(),
                ReleaseStatus::Deploying,
                created
            ],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Release {
            app: app.to_string(),
            version,
            image: image.to_string(),
            digest: digest.clone(),
            status: ReleaseStatus::Deploying,
            reason: None,
            created,
        })
    }

    /// Sets a release's status (and why).
    pub fn set_release_status(
        &self,
        app: &str,
        version: u32,
        status: ReleaseStatus,
        reason: Option<&str>,
    ) -> Result<()> {
        self.db(self.conn.execute(
            "UPDATE releases SET status = ?3, reason = ?4 WHERE app = ?1 AND version = ?2",
            params![app, version, status, reason],
        ))?;
        Ok(())
    }

    /// Records the reference a release is known by (e.g. where it was pushed).
    pub fn set_release_image(&self, app: &str, version: u32, image: &str) -> Result<()> {
        self.db(self.conn.execute(
            "UPDATE releases SET image = ?3 WHERE app = ?1 AND version = ?2",
            params![app, version, image],
        ))?;
        Ok(())
    }

    /// Releases of one app (or all), newest first.
    pub fn releases(&self, app: Option<&str>) -> Result<Vec<Release>> {
        let mut stmt = self.db(self.conn.prepare(
            "SELECT app, version, image, digest, status, reason, created FROM releases \
             WHERE ?1 IS NULL OR app = ?1 ORDER BY app, version DESC",
        ))?;
        let rows = self.db(stmt.query_map([app], |r| {
            Ok(Release {
                app: r.get(0)?,
                version: r.get(1)?,
                image: r.get(2)?,
                digest: digest_column(r, 3)?,
                status: r.get(4)?,
                reason: r.get(5)?,
                created: r.get(6)?,
            })
        }))?;
        self.db(rows.collect())
    }

    /// Deletes every release row of an app.
    pub fn delete_releases(&self, app: &str) -> Result<()> {
        self.db(self
            .conn
            .execute("DELETE FROM releases WHERE app = ?1", [app]))?;
        Ok(())
    }

    /// Records that `strata deploy` named an image of `app` `tag` in the store (its
    /// `<app>:deployment-<ULID>` or `--image-label` tags), so that destroying the app removes
    /// the name.
    pub fn add_app_tag(&self, app: &str, tag: &str) -> Result<()> {
        self.db(self.conn.execute(
            "INSERT OR IGNORE INTO app_tags (app, tag) VALUES (?1, ?2)",
            [app, tag],
        ))?;
        Ok(())
    }

    /// The store names deploys of `app` made.
    pub fn app_tags(&self, app: &str) -> Result<Vec<String>> {
        let db = db_err(&self.path);
        let mut stmt = self
            .conn
            .prepare("SELECT tag FROM app_tags WHERE app = ?1 ORDER BY tag")
            .map_err(db)?;
        let rows = stmt.query_map([app], |r| r.get(0)).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    /// Forgets the names deploys of `app` made.
    pub fn delete_app_tags(&self, app: &str) -> Result<()> {
        self.db(self
            .conn
            .execute("DELETE FROM app_tags WHERE app = ?1", [app]))?;
        Ok(())
    }

    /// Points host `port` at `backends` (a new generation the agent will apply).
    pub fn set_route(
        &self,
        port: u16,
        owner: &str,
        backends: &[std::net::SocketAddr],
    ) -> Result<i64> {
        let b = serde_json::to_string(backends).map_err(|e| Error::Config(e.to_string()))?;
        let current = self.route(port)?;
        if let Some(r) = &current
            && r.owner != owner
        {
            return Err(Error::Config(format!(
                "host port {port} is already served for {}",
                r.owner
            )));
        }
        let generation = current.map_or(1, |r| r.generation + 1);
        self.db(self.conn.execute(
            "INSERT INTO routes (port, owner, backends, generation) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT(port) DO UPDATE SET backends = ?3, generation = ?4, error = NULL",
            params![port, owner, b, generation],
        ))?;
        Ok(generation)
    }

    /// Stops serving a port.
    pub fn delete_route(&self, port: u16) -> Result<()> {
        self.db(self
            .conn
            .execute("DELETE FROM routes WHERE port = ?1", [port]))?;
        Ok(())
    }

    /// One route.
    pub fn route(&self, port: u16) -> Result<Option<Route>> {
        Ok(self.routes()?.into_iter().find(|r| r.port == port))
    }

    /// Every route.
    pub fn routes(&self) -> Result<Vec<Route>> {
        let mut stmt = self.db(self.conn.prepare(
            "SELECT port, owner, backends, generation, applied, error FROM routes ORDER BY port",
        ))?;
        let rows = self.db(stmt.query_map([], |r| {
            let b: String = r.get(2)?;
            Ok(Route {
                port: r.get(0)?,
                owner: r.get(1)?,
                backends: serde_json::from_str(&b).unwrap_or_default(),
                generation: r.get(3)?,
                applied: r.get(4)?,
                error: r.get(5)?,
            })
        }))?;
        self.db(rows.collect())
    }

    /// The agent put `generation` of `port` in place (or could not: `error`).
    pub fn route_applied(&self, port: u16, generation: i64, error: Option<&str>) -> Result<()> {
        self.db(self.conn.execute(
            "UPDATE routes SET applied = ?2, error = ?3 WHERE port = ?1",
            params![port, generation, error],
        ))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policy_follows_docker() {
        let p = RestartPolicy::parse("on-failure:2").unwrap();
        assert!(p.restarts_after(Some(1), 0));
        assert!(p.restarts_after(None, 1));
        assert!(!p.restarts_after(Some(1), 2));
        assert!(!p.restarts_after(Some(0), 0));
        assert!(RestartPolicy::Always.restarts_after(Some(0), 100));
        assert!(!RestartPolicy::No.restarts_after(Some(1), 0));
        assert!(RestartPolicy::parse("sometimes").is_err());
    }

    /// A store directory with the deploy tables, and a claims directory of its own.
    fn fixture() -> (tempfile::TempDir, PathBuf, State) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("strata")).unwrap();
        let claims = dir.path().join("claims");
        let s = State::open_with_claims(dir.path(), claims.clone()).unwrap();
        (dir, claims, s)
    }

    /// States, statuses and digests read back as written; a word this version does not know
    /// (a newer strata wrote it, or a hand edit) is an error naming it, never a guess.
    #[test]
    fn states_and_digests_round_trip_and_unknown_words_are_errors() {
        let (_dir, _claims, mut s) = fixture();
        let d = Digest::sha256(b"image");
        let m = s
            .create_machine(
                "m",
                Some("web"),
                Some(1),
                "web:1",
                &d,
                &MachineConfig::default(),
            )
            .unwrap();
        assert_eq!((m.state, &m.digest), (MachineState::Created, &d));
        s.set_observed("m", MachineState::Exited, None, Some(3), None)
            .unwrap();
        let m = s.machine("m").unwrap().unwrap();
        assert_eq!((m.state, m.exit_code), (MachineState::Exited, Some(3)));
        let r = s.begin_release("web", "web:1", &d).unwrap();
        assert_eq!(r.status, ReleaseStatus::Deploying);
        s.set_release_status("web", 1, ReleaseStatus::Active, None)
            .unwrap();
        let back = &s.releases(Some("web")).unwrap()[0];
        assert_eq!((back.status, &back.digest), (ReleaseStatus::Active, &d));
        assert_eq!(
            serde_json::to_value(back).unwrap()["status"],
            serde_json::json!("active")
        );

        s.conn
            .execute("UPDATE machines SET state = 'hibernating'", [])
            .unwrap();
        let err = s.machine("m").unwrap_err().to_string();
        assert!(err.contains("unknown MachineState `hibernating`"), "{err}");
        s.conn
            .execute("UPDATE releases SET digest = 'sha256:nothex'", [])
            .unwrap();
        assert!(s.releases(Some("web")).is_err());
    }

    #[test]
    fn machines_get_distinct_lowest_free_slots_and_releases_count_up() {
        let (dir, claims, mut s) = fixture();
        let c = MachineConfig::default();
        let a = s
            .create_machine("a", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        let b = s
            .create_machine("b", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        let c3 = s
            .create_machine("c", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!((a.net_index, b.net_index, c3.net_index), (0, 1, 2));
        s.delete_machine("b").unwrap();
        let d = s
            .create_machine("d", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!(d.net_index, 1);
        s.delete_machine("a").unwrap();
        let e = s
            .create_machine("e", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!(e.net_index, 0);
        // Opening again (another process) sees the same rows and does not re-migrate.
        let again = State::open(dir.path()).unwrap();
        assert_eq!(again.machines().unwrap().len(), 3);
        // Another store on the same host never gets a slot this one holds.
        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("strata")).unwrap();
        let mut o = State::open_with_claims(other.path(), claims).unwrap();
        let x = o
            .create_machine("x", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!(x.net_index, 3);

        // The agent giving up on a machine never undoes a destroy asked for meanwhile.
        s.set_desired("c", Desired::Destroyed).unwrap();
        s.give_up("c").unwrap();
        assert_eq!(s.machine("c").unwrap().unwrap().desired, Desired::Destroyed);
        s.give_up("d").unwrap();
        assert_eq!(s.machine("d").unwrap().unwrap().desired, Desired::Stopped);

        let r1 = s
            .begin_release("web", "web:1", &Digest::sha256(b"1"))
            .unwrap();
        let r2 = s
            .begin_release("web", "web:2", &Digest::sha256(b"2"))
            .unwrap();
        assert_eq!((r1.version, r2.version), (1, 2));
        s.set_release_status("web", 1, ReleaseStatus::Failed, Some("unhealthy"))
            .unwrap();
        let rs = s.releases(Some("web")).unwrap();
        assert_eq!(rs[0].version, 2);
        assert_eq!(rs[1].reason.as_deref(), Some("unhealthy"));

        let g1 = s.set_route(8080, "app:web", &[]).unwrap();
        let g2 = s
            .set_route(8080, "app:web", &["10.89.0.2:80".parse().unwrap()])
            .unwrap();
        assert_eq!((g1, g2), (1, 2));
        assert!(s.set_route(8080, "machine:x", &[]).is_err());
    }

    #[test]
    fn spare_slots_go_to_new_machines_only_once_made() {
        let (_dir, claims, mut s) = fixture();
        let c = MachineConfig::default();
        let a = s
            .create_machine("a", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!(a.net_index, 0);
        let (one, two) = (s.claim_spare().unwrap(), s.claim_spare().unwrap());
        assert_eq!((one, two), (1, 2));
        assert_eq!(s.spare_count().unwrap(), 2);
        // Being made: not handed out, and its claim is not taken over as stale.
        let b = s
            .create_machine("b", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!(b.net_index, 3);
        // Made: the next machine takes it, and the claim names the machine.
        s.spare_ready(two).unwrap();
        let d = s
            .create_machine("d", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!(d.net_index, 2);
        assert_eq!(s.spare_count().unwrap(), 1);
        let owner = std::fs::read_to_string(claims.join("2")).unwrap();
        assert!(owner.ends_with("\nd\n"), "{owner}");
        // Another connection (the agent's worker) sees the same spares.
        assert_eq!(s.reopen().unwrap().spare_count().unwrap(), 1);
        // Taking the spares away hands out none; releasing frees the claim.
        assert_eq!(s.take_spares().unwrap(), [1]);
        assert_eq!(s.spare_count().unwrap(), 0);
        s.release_spare(1);
        assert!(!claims.join("1").exists());
        assert!(claims.join("2").exists());
        let e = s
            .create_machine("e", None, None, "i", &Digest::sha256(b"d"), &c)
            .unwrap();
        assert_eq!(e.net_index, 1);
        // A spare that could not be made is forgotten and its slot freed.
        let f = s.claim_spare().unwrap();
        s.drop_spare(f).unwrap();
        assert_eq!(s.spare_count().unwrap(), 0);
        assert!(!claims.join(f.to_string()).exists());
    }
}
