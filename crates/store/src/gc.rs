//! Garbage collection: mark from refs and pins, sweep unreachable blobs, snapshots of layer
//! chains no reachable image has, and stale temp files.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::time::SystemTime;

use strata_oci::{Digest, chain_id, media_type};

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
    /// Abandoned resumable writes removed from `strata/partial/` (see
    /// [`crate::PARTIAL_MAX_AGE`]), and the bytes they held.
    pub partials_removed: usize,
    /// Bytes the removed partial writes held.
    pub partial_bytes_freed: u64,
    /// Snapshots removed from `strata/snapshots/` (or that would be): chain IDs no reachable
    /// image has, sorted.
    pub snapshots_removed: Vec<Digest>,
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
        let _locks = self.gc_locks()?;
        let (reachable, configs) = self.mark()?;
        let mut report = GcReport {
            snapshots_removed: self.sweep_snapshots(&self.live_chains(&configs), dry_run)?,
            ..GcReport::default()
        };
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
        (report.partials_removed, report.partial_bytes_freed) = self.sweep_partials(dry_run)?;
        Ok(report)
    }

    /// What gc holds while it runs: the gc lock (no write session anywhere) and the index lock
    /// (no ref change). Refused while this `Store` holds a session itself (it would wait for
    /// itself).
    fn gc_locks(&self) -> Result<(FileLock, FileLock)> {
        let held = self.sessions.load(std::sync::atomic::Ordering::SeqCst);
        if held > 0 {
            return Err(Error::GcDuringWriteSession {
                root: self.root.clone(),
                sessions: held,
            });
        }
        // Lock order everywhere: gc.lock, then index.lock.
        let gc = FileLock::acquire(&self.gc_lock_path(), LockMode::Exclusive)?;
        let index = FileLock::acquire(&self.index_lock_path(), LockMode::Exclusive)?;
        Ok((gc, index))
    }

    /// Remove the snapshots (unpacked layer chains under [`Store::snapshots_dir`]) that no
    /// image reachable from a ref or a pin has, and unpacks killed long ago; returns the chain
    /// IDs removed (or, with `dry_run`, that would be). Blobs are left alone. Takes the same
    /// locks as [`Store::gc`], so no build (a write session) runs meanwhile; a machine's image
    /// is pinned, so its snapshots stay.
    pub fn prune_snapshots(&self, dry_run: bool) -> Result<Vec<Digest>> {
        let _locks = self.gc_locks()?;
        let (_, configs) = self.mark()?;
        self.sweep_snapshots(&self.live_chains(&configs), dry_run)
    }

    /// The chain IDs of every prefix of the layers of the images whose configs are given.
    /// A config that cannot be read names no chain: its snapshots are unusable anyway.
    fn live_chains(&self, configs: &HashSet<Digest>) -> HashSet<Digest> {
        let mut live = HashSet::new();
        for config in configs {
            if self.blob_size(config).map_or(true, |s| s > MAX_SNIFF_SIZE) {
                continue;
            }
            let Ok(bytes) = self.read_blob(config) else {
                continue;
            };
            let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let diff_ids: Vec<Digest> = doc
                .pointer("/rootfs/diff_ids")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str()?.parse().ok())
                .collect();
            live.extend((1..=diff_ids.len()).filter_map(|n| chain_id(&diff_ids[..n])));
        }
        live
    }

    /// Removes every snapshot whose chain ID is not in `live`. A snapshot is first renamed to
    /// `tmp-gc-<hex>` and then removed, so a killed gc never leaves a half-removed tree under
    /// a valid name (the cache would mount it). `tmp-gc-*` left by a killed gc go at once;
    /// other `tmp-*` (unpacks in progress) only once older than [`crate::STALE_TEMP_AGE`].
    fn sweep_snapshots(&self, live: &HashSet<Digest>, dry_run: bool) -> Result<Vec<Digest>> {
        let dir = self.snapshots_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).ctx("list", dir),
        };
        let mut removed = Vec::new();
        let now = SystemTime::now();
        for entry in entries {
            let entry = entry.ctx("list", &dir)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if let Some(rest) = name.strip_prefix("tmp-") {
                let stale = rest.starts_with("gc-")
                    || entry.metadata().is_ok_and(|m| crate::is_stale(&m, now));
                if stale && !dry_run {
                    remove_tree(&path)?;
                }
                continue;
            }
            // Snapshot names are sha256 chain IDs' hex; anything else is not ours to remove.
            let Ok(chain) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            if live.contains(&chain) {
                continue;
            }
            if !dry_run {
                let doomed = dir.join(format!("tmp-gc-{name}"));
                match fs::rename(&path, &doomed) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e).ctx("rename", path),
                }
                remove_tree(&doomed)?;
            }
            removed.push(chain);
        }
        removed.sort_by_key(|a| a.to_string());
        Ok(removed)
    }

    /// Every digest reachable from `index.json` and the pins, and the configs of the image
    /// manifests among them.
    fn mark(&self) -> Result<(HashSet<Digest>, HashSet<Digest>)> {
        let mut work: Vec<(Digest, Walk)> = Vec::new();
        for d in self.read_index()?.manifests {
            work.push((d.digest.clone(), walk_for(&d.media_type)));
        }
        for pin in self.pins()? {
            work.push((pin.digest, Walk::IfJson));
        }
        let mut marked = HashSet::new();
        let mut configs = HashSet::new();
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
                    Role::Config => {
                        configs.insert(child.0.clone());
                        Walk::Never
                    }
                    Role::Leaf => Walk::Never,
                    Role::Manifest => walk_for(&child.1),
                };
                work.push((child.0, walk));
            }
        }
        Ok((marked, configs))
    }
}

#[derive(Debug, Clone, Copy)]
enum Role {
    /// An image manifest's config.
    Config,
    /// layers, legacy artifact `blobs`, the config of an artifact manifest.
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
        let role = if media_type::is_image_config(&c.1) {
            Role::Config
        } else {
            Role::Leaf
        };
        out.push((c, role));
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

fn remove_tree(path: &std::path::Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx("remove", path.to_path_buf()),
    }
}
