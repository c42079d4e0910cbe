//! Garbage collection: mark from refs and pins, sweep unreachable blobs and stale temp files.

use std::collections::HashSet;
use std::fs;
use std::io;

use strata_oci::{Digest, media_type};

use crate::Store;
use crate::error::{Error, IoContext, Result};
use crate::image::sniff;
use crate::lock::{FileLock, LockMode};

/// Blobs of unknown type larger than this are not parsed to look for references (pins may name
/// any blob; a multi-gigabyte layer is certainly not a manifest).
const MAX_SNIFF_SIZE: u64 = 16 * 1024 * 1024;

/// What [`Store::gc`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs kept because something reaches them.
    pub kept: usize,
    /// Blobs removed (or that would be), with their sizes, sorted by digest.
    pub removed: Vec<(Digest, u64)>,
    /// Sum of the removed sizes.
    pub bytes_freed: u64,
    /// Stale temp files removed from `strata/tmp/`.
    pub temps_removed: usize,
}

/// Whether a reached blob may hold references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// A manifest or index: it must parse, or GC stops (its children would look unreachable).
    Must,
    /// Unknown type (pins, entries without a media type): walk it if it looks like one.
    IfJson,
    /// A config or layer.
    Never,
}

impl Store {
    /// Remove every blob that no ref in `index.json` and no pin reaches, following indexes to
    /// their manifests, manifests to their config, layers and `subject`; also remove temp files
    /// older than [`crate::STALE_TEMP_AGE`]. With `dry_run`, report without removing anything.
    ///
    /// Waits for all [`crate::WriteSession`]s in every process to end, and blocks new ones and
    /// ref changes while it runs. Refuses to run while this `Store` holds a session itself.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let held = self.sessions.load(std::sync::atomic::Ordering::SeqCst);
        if held > 0 {
            return Err(Error::GcDuringWriteSession {
                root: self.root.clone(),
                sessions: held,
            });
        }
        // Lock order everywhere: gc.lock, then index.lock.
        let _gc = FileLock::acquire(&self.gc_lock_path(), LockMode::Exclusive)?;
        let _index = FileLock::acquire(&self.index_lock_path(), LockMode::Exclusive)?;

        let reachable = self.mark()?;
        let mut report = GcReport::default();
        let mut touched_dirs = HashSet::new();
        for (digest, size) in self.list_blobs()? {
            if reachable.contains(&digest) {
                report.kept += 1;
                continue;
            }
            if !dry_run {
                let path = self.blob_path(&digest);
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).ctx("remove", path),
                }
                touched_dirs.insert(digest.algorithm());
            }
            report.bytes_freed += size;
            report.removed.push((digest, size));
        }
        for alg in touched_dirs {
            // Make the removals durable; a crash before this only brings garbage back.
            crate::fsync_dir(&self.root.join("blobs").join(alg.as_str()))?;
        }
        report.temps_removed = self.remove_stale_temps(dry_run)?;
        Ok(report)
    }

    /// Every digest reachable from `index.json` and the pins.
    fn mark(&self) -> Result<HashSet<Digest>> {
        let mut work: Vec<(Digest, Walk)> = Vec::new();
        for d in self.read_index()?.manifests {
            work.push((d.digest.clone(), walk_for(&d.media_type)));
        }
        for pin in self.pins()? {
            work.push((pin.digest, Walk::IfJson));
        }
        let mut marked = HashSet::new();
        while let Some((digest, walk)) = work.pop() {
            if !marked.insert(digest.clone()) || walk == Walk::Never {
                continue;
            }
            let size = match self.blob_size(&digest) {
                Ok(s) => s,
                // Dangling: a partial pull, or a ref to a blob another tool removed.
                Err(Error::BlobNotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            if walk == Walk::IfJson && size > MAX_SNIFF_SIZE {
                continue;
            }
            let bytes = match self.read_blob(&digest) {
                Ok(b) => b,
                Err(e) if walk == Walk::Must => {
                    return Err(Error::GcUnreadable {
                        digest,
                        reason: e.to_string(),
                    });
                }
                Err(_) => continue,
            };
            if walk == Walk::IfJson && sniff(&bytes).is_none() {
                continue;
            }
            let doc: serde_json::Value = match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) if walk == Walk::Must => {
                    return Err(Error::GcUnreadable {
                        digest,
                        reason: format!("not JSON: {e}"),
                    });
                }
                Err(_) => continue,
            };
            for (child, role) in children(&doc) {
                let walk = match role {
                    Role::Leaf => Walk::Never,
                    Role::Manifest => walk_for(&child.1),
                };
                work.push((child.0, walk));
            }
        }
        Ok(marked)
    }
}

#[derive(Debug, Clone, Copy)]
enum Role {
    /// config, layers, legacy artifact `blobs`.
    Leaf,
    /// index entries and `subject`.
    Manifest,
}

fn walk_for(mt: &str) -> Walk {
    if media_type::is_manifest(mt) || media_type::is_index(mt) {
        Walk::Must
    } else if media_type::layer_compression(mt).is_some() {
        Walk::Never
    } else {
        Walk::IfJson
    }
}

/// The descriptors a manifest or index refers to, read loosely from JSON so that fields our
/// typed model does not know (or gets wrong) cannot hide a reference.
fn children(doc: &serde_json::Value) -> Vec<((Digest, String), Role)> {
    let desc = |v: &serde_json::Value| -> Option<(Digest, String)> {
        let digest = v.get("digest")?.as_str()?.parse().ok()?;
        let mt = v
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string();
        Some((digest, mt))
    };
    let mut out = Vec::new();
    let list = |key: &str| {
        doc.get(key)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
    };
    if let Some(c) = doc.get("config").and_then(desc) {
        out.push((c, Role::Leaf));
    }
    for key in ["layers", "blobs"] {
        out.extend(list(key).filter_map(desc).map(|d| (d, Role::Leaf)));
    }
    out.extend(
        list("manifests")
            .filter_map(desc)
            .map(|d| (d, Role::Manifest)),
    );
    if let Some(s) = doc.get("subject").and_then(desc) {
        out.push((s, Role::Manifest));
    }
    out
}
