//! The content store: blobs in an OCI image layout, refs in its `index.json`, metadata in SQLite.
//!
//! A store is a directory that skopeo (`oci:DIR:NAME`), umoci (`--image DIR:NAME`) and podman
//! read as it is, plus a `strata/` directory of our own beside the OCI files:
//!
//! ```text
//! <root>/
//! ├── oci-layout            {"imageLayoutVersion":"1.0.0"}
//! ├── index.json            OCI index; each image's descriptor carries the annotation
//! │                         org.opencontainers.image.ref.name = "<name>:<tag>"
//! │                         (the full local name: "myapp:latest", "docker.io/library/debian:12")
//! ├── blobs/
//! │   ├── sha256/<hex>      content, named by its digest, never modified in place
//! │   └── sha512/<hex>
//! └── strata/               everything that is ours, not OCI
//!     ├── meta-v1.db        SQLite (WAL): pins, build cache index, snapshots, named blob
//!     │                     ranges (`range:<key>` → blob, offset, length: gzip members)
//!     ├── snapshots/<hex>   unpacked layer chains by chain ID; gc removes unreachable ones
//!     ├── tmp/              in-flight writes; stale entries (> 1 hour) removed by gc and open
//!     ├── partial/<alg>-<hex>  resumable blob writes (hosts over SSH); gc removes day-old ones
//!     ├── context-stats/<hex>  per build context (sha256 of its absolute path): the builder's
//!     │                        stat cache (path → size, times, inode, mode → content digest)
//!     │   └── <hex>.keys       and its known keys (fingerprint of a selection's stats → key)
//!     └── locks/
//!         ├── index.lock    exclusive while index.json is read-modified-written
//!         └── gc.lock       shared by write sessions, exclusive while gc runs
//! ```
//!
//! # Contract
//!
//! - Every write goes to `strata/tmp/`, is hashed while streaming, checked against the expected
//!   digest and size, fsynced, renamed into `blobs/<alg>/<hex>`, and the directory fsynced. A
//!   mismatch is refused and leaves nothing behind. Putting a blob that exists is a no-op.
//! - Every read checks digest and size: [`Store::read_blob`] before returning,
//!   [`Store::open_blob`] at EOF (an `InvalidData` I/O error naming the digest).
//! - Several processes may use one store at once. `index.json` updates never lose each other's
//!   changes (file lock + atomic replace).
//! - [`Store::gc`] never removes a blob reachable from a ref or a pin. A blob that is written but
//!   not yet referenced is protected by holding a [`WriteSession`] (from [`Store::write_session`])
//!   from before the first put until after the ref or pin is set.

mod blob;
mod context_stats;
mod error;
mod gc;
mod image;
mod lock;
mod meta;
mod owner;
mod partial;
mod ranges;
mod refs;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use blob::{BlobWriter, VerifyingReader};
pub use error::{Error, Result};
pub use gc::GcReport;
pub use image::{Image, ImageParts};
pub use meta::{Pin, Snapshot};
pub use owner::temp_prefix;
pub use partial::{PARTIAL_MAX_AGE, PartialBlob};
pub use ranges::{BlobRange, BlobRanges};
pub use strata_oci::{Descriptor, Digest};

use error::IoContext;
use lock::{FileLock, LockMode};

/// The `imageLayoutVersion` we write and accept.
pub const LAYOUT_VERSION: &str = "1.0.0";

/// Temp files older than this are leftovers of a crashed writer.
pub const STALE_TEMP_AGE: Duration = Duration::from_secs(60 * 60);

/// An open store. Cheap to share between threads (`&Store` is `Sync`).
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    db: Mutex<rusqlite::Connection>,
    /// Write sessions this `Store` holds, so `gc` can refuse instead of deadlocking on itself.
    sessions: Arc<AtomicUsize>,
}

/// Protects blobs written but not yet referenced from a concurrent [`Store::gc`].
///
/// Hold it from before the first put until the ref or pin that keeps the blobs is set. It is a
/// shared lock: any number of writers in any number of processes hold sessions at once, and gc
/// waits until they are all gone (and new sessions wait while gc runs).
#[derive(Debug)]
pub struct WriteSession {
    _lock: FileLock,
    sessions: Arc<AtomicUsize>,
}

impl Drop for WriteSession {
    fn drop(&mut self) {
        self.sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Store {
    /// Open the store at `root`, creating the layout if it is missing, checking the `oci-layout`
    /// version and opening (and migrating) the metadata database.
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        // Absolute from here on: paths under the store go into runtime bundles and mount
        // options, which a relative `--store` would break (runc: "invalid rootfs").
        let root = std::path::absolute(root.as_ref()).ctx("resolve", root.as_ref())?;
        for dir in [
            root.join("blobs/sha256"),
            root.join("blobs/sha512"),
            root.join("strata/tmp"),
            root.join("strata/locks"),
        ] {
            fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        }
        // Through no symlink either: runc refuses a rootfs path that has one ("not an
        // absolute path, or a symlink"), and a store is often a link to a bigger disk.
        let root = fs::canonicalize(&root).ctx("resolve", &root)?;
        let store = Store {
            db: Mutex::new(meta::open_db(&root.join("strata/meta-v1.db"))?),
            root,
            sessions: Arc::new(AtomicUsize::new(0)),
        };
        store.init_layout_files()?;
        // Best effort: a failure to clean leftovers must not stop the store from opening.
        let _ = store.remove_stale_temps(false);
        Ok(store)
    }

    /// Open the default store: `explicit` (from `--store DIR`), else `$STRATA_STORE`, else
    /// `/var/lib/strata` for root and `$XDG_DATA_HOME/strata` (or `~/.local/share/strata`)
    /// for everyone else.
    pub fn open_default(explicit: Option<PathBuf>) -> Result<Store> {
        Store::open(default_root(explicit)?)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Start a write session; see [`WriteSession`]. Blocks while gc runs.
    pub fn write_session(&self) -> Result<WriteSession> {
        let lock = FileLock::acquire(&self.gc_lock_path(), LockMode::Shared)?;
        self.sessions.fetch_add(1, Ordering::SeqCst);
        Ok(WriteSession {
            _lock: lock,
            sessions: Arc::clone(&self.sessions),
        })
    }

    /// `strata/snapshots/`: unpacked layer chains, one directory per chain ID (hex), shared
    /// by builds and machines (see `strata_rootfs::SnapshotCache`). [`Store::gc`] removes those
    /// of chains no reachable image has.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("strata/snapshots")
    }

    fn gc_lock_path(&self) -> PathBuf {
        self.root.join("strata/locks/gc.lock")
    }

    fn index_lock_path(&self) -> PathBuf {
        self.root.join("strata/locks/index.lock")
    }

    pub(crate) fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("strata/tmp")
    }

    /// Write `oci-layout` and `index.json` if missing; refuse a layout version we do not know.
    fn init_layout_files(&self) -> Result<()> {
        let layout = self.root.join("oci-layout");
        match fs::read(&layout) {
            Ok(bytes) => check_layout_version(&layout, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let body = format!("{{\"imageLayoutVersion\":\"{LAYOUT_VERSION}\"}}");
                self.write_file_atomic_if_absent(&layout, body.as_bytes())?;
                // Another process may have won the race with different content; check again.
                let bytes = fs::read(&layout).ctx("read", &layout)?;
                check_layout_version(&layout, &bytes)?;
            }
            Err(e) => return Err(e).ctx("read", &layout),
        }
        let index = self.index_path();
        if !index.exists() {
            let _guard = FileLock::acquire(&self.index_lock_path(), LockMode::Exclusive)?;
            if !index.exists() {
                let body = refs::serialize_index(&strata_oci::Index::new())?;
                self.write_file_atomic(&index, &body)?;
            }
        }
        Ok(())
    }

    /// Replace `path` with `bytes` atomically: temp file in `strata/tmp`, fsync, rename, fsync dir.
    pub(crate) fn write_file_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.write_temp(bytes)?;
        tmp.persist(path)
            .map_err(|e| e.error)
            .ctx("rename into place", path)?;
        fsync_parent(path)
    }

    /// Like [`Self::write_file_atomic`] but leaves an existing file alone.
    fn write_file_atomic_if_absent(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.write_temp(bytes)?;
        match tmp.persist_noclobber(path) {
            Ok(_) => fsync_parent(path),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e.error).ctx("create", path),
        }
    }

    fn write_temp(&self, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
        let dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix(&temp_prefix("file"))
            .tempfile_in(&dir)
            .ctx("create temp file in", &dir)?;
        tmp.write_all(bytes).ctx("write", tmp.path())?;
        tmp.as_file().sync_all().ctx("fsync", tmp.path())?;
        Ok(tmp)
    }

    /// Remove entries of `strata/tmp` whose writer is gone (named by [`temp_prefix`]) or, for
    /// other names, older than [`STALE_TEMP_AGE`]; returns how many.
    pub(crate) fn remove_stale_temps(&self, dry_run: bool) -> Result<usize> {
        let dir = self.tmp_dir();
        let now = SystemTime::now();
        let mut removed = 0;
        for entry in fs::read_dir(&dir).ctx("list", &dir)? {
            let entry = entry.ctx("list", &dir)?;
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            // Named by its writer: gone means abandoned (now), alive means in use (keep).
            let abandoned = match owner::owner_alive(&entry.file_name().to_string_lossy()) {
                Some(alive) => !alive,
                None => is_stale(&meta, now),
            };
            if !abandoned {
                continue;
            }
            if !dry_run {
                let res = if meta.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                match res {
                    Ok(()) => {}
                    // Another gc got there first.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).ctx("remove stale temp file", path),
                }
            }
            removed += 1;
        }
        Ok(removed)
    }
}

fn check_layout_version(path: &Path, bytes: &[u8]) -> Result<()> {
    let bad = |reason: String| Error::BadLayout {
        path: path.to_path_buf(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("oci-layout is not JSON: {e}")))?;
    match v.get("imageLayoutVersion").and_then(|v| v.as_str()) {
        Some(LAYOUT_VERSION) => Ok(()),
        Some(other) => Err(bad(format!(
            "imageLayoutVersion is `{other}`, only `{LAYOUT_VERSION}` is supported"
        ))),
        None => Err(bad("oci-layout has no imageLayoutVersion".to_string())),
    }
}

/// fsync the directory holding `path`, so a rename into it survives a crash.
pub(crate) fn fsync_parent(path: &Path) -> Result<()> {
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// fsync a directory, making renames and removals in it durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// Where [`Store::open_default`] opens.
pub fn default_root(explicit: Option<PathBuf>) -> Result<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = explicit {
        return Ok(p);
    }
    if let Some(p) = env("STRATA_STORE") {
        return Ok(PathBuf::from(p));
    }
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/strata"));
    }
    if let Some(p) = env("XDG_DATA_HOME") {
        return Ok(PathBuf::from(p).join("strata"));
    }
    match env("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/strata")),
        None => Err(Error::NoDefaultLocation),
    }
}

/// Whether a temp entry was last modified [`STALE_TEMP_AGE`] or more before `now` (so no live
/// writer can still be using it). An entry without a readable mtime is not.
pub(crate) fn is_stale(meta: &fs::Metadata, now: SystemTime) -> bool {
    meta.modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .is_some_and(|age| age >= STALE_TEMP_AGE)
}
