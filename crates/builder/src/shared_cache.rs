//! The step cache shared through a registry (docs/cache.md): `--cache-from REF` looks a step's
//! key up there when this store misses it, `--cache-to REF` exports the entries of every step
//! a build went through. Keys are the local cache's own (content addresses of a step's
//! inputs), so an entry made on one machine is valid on any other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use strata_oci::sync::MutexExt;
use strata_oci::{Descriptor, Digest};
use strata_store::Store;
use strata_transfer::cache::RegistryCache;

use crate::cache::{self, CacheEntry};
use crate::error::{Error, Result};

/// The export's schema, inside the cache manifest's config blob.
const SCHEMA: &str = "strata-build-cache-export/1";

/// The media type of a cache mount's blob: its directory as a zstd-compressed tar.
pub const MOUNT_MEDIA_TYPE: &str = "application/vnd.strata.build-cache.mount.v1.tar+zstd";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Exported {
    schema: String,
    /// Step key → entry.
    entries: BTreeMap<String, CacheEntry>,
    /// Cache mount id → its directory's blob (a field older exports lack: none then).
    #[serde(default)]
    mounts: BTreeMap<String, Descriptor>,
}

/// The registry caches a build reads from (`--cache-from`, several in order of preference)
/// and writes to (`--cache-to`): the same repository, others, or only one side.
pub struct SharedCache {
    from: Vec<RegistryCache>,
    to: Option<RegistryCache>,
    /// Cache mount ids shared through the cache (opt-in: `[cache] mounts`).
    mounts: Vec<String>,
    /// The exports of `from`, read at the first lookup (`None` until then).
    read: Mutex<Option<Vec<Exported>>>,
    /// Every key this build looked up, in order (exported when they have an entry).
    keys: Mutex<Vec<String>>,
    /// Layers of hits left in the registry until something reads them: digest → (the
    /// index in `from` of the cache that has it, its descriptor).
    remote: Mutex<HashMap<Digest, (usize, Descriptor)>>,
    /// The entries of those hits (this store's cache does not answer a key whose layer it
    /// lacks), for the export.
    remote_entries: Mutex<HashMap<String, CacheEntry>>,
    /// Held while a layer is fetched, so steps of parallel stages fetch each once.
    fetching: Mutex<()>,
    stats: Mutex<SharedStats>,
}

/// What the shared cache did for a build.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SharedStats {
    /// Steps found there (and not in this store).
    pub hits: usize,
    /// Layer bytes fetched for them.
    pub bytes_fetched: u64,
    /// Entries found there whose layer the registry no longer has (each a miss).
    pub gone: usize,
    /// Cache mounts fetched from there, and their bytes.
    pub mounts_fetched: usize,
    pub mount_bytes: u64,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from: Vec<String> = self
            .from
            .iter()
            .map(|c| c.reference().to_string())
            .collect();
        f.debug_struct("SharedCache")
            .field("from", &from)
            .field("to", &self.to.as_ref().map(|c| c.reference().to_string()))
            .field("mounts", &self.mounts)
            .finish()
    }
}

impl SharedCache {
    /// Steps looked up in `from` and exported to `to`.
    pub fn new(from: Option<RegistryCache>, to: Option<RegistryCache>) -> SharedCache {
        SharedCache::with_sources(from.into_iter().collect(), to)
    }

    /// Steps looked up in each of `from`, the first that has a step's entry giving it, and
    /// exported to `to`.
    pub fn with_sources(from: Vec<RegistryCache>, to: Option<RegistryCache>) -> SharedCache {
        SharedCache {
            from,
            to,
            mounts: Vec::new(),
            read: Mutex::new(None),
            keys: Mutex::new(Vec::new()),
            remote: Mutex::new(HashMap::new()),
            remote_entries: Mutex::new(HashMap::new()),
            fetching: Mutex::new(()),
            stats: Mutex::new(SharedStats::default()),
        }
    }

    /// Also shares the cache mounts with these ids (`RUN --mount=type=cache,id=…`, or the
    /// target path for a mount without an id).
    pub fn sharing_mounts(mut self, ids: Vec<String>) -> SharedCache {
        self.mounts = ids;
        self
    }

    /// Whether builds look steps up there.
    pub fn imports(&self) -> bool {
        !self.from.is_empty()
    }

    /// Where steps are looked up (else where they are exported), for messages.
    pub fn reference(&self) -> String {
        if self.from.is_empty() {
            return self
                .to
                .as_ref()
                .map(|c| c.reference().to_string())
                .unwrap_or_default();
        }
        let names: Vec<String> = self
            .from
            .iter()
            .map(|c| c.reference().to_string())
            .collect();
        names.join(", ")
    }

    /// Where the build's entries are exported, if anywhere.
    pub fn export_reference(&self) -> Option<String> {
        self.to.as_ref().map(|c| c.reference().to_string())
    }

    /// What it did so far.
    pub fn stats(&self) -> SharedStats {
        *self.stats.lock_ok()
    }

    /// The exports of every `--cache-from`, in order, read once.
    fn exports(&self) -> Result<Vec<Exported>> {
        let mut read = self.read.lock_ok();
        if let Some(e) = &*read {
            return Ok(e.clone());
        }
        let exports = self
            .from
            .iter()
            .map(read_export)
            .collect::<Result<Vec<_>>>()?;
        *read = Some(exports.clone());
        Ok(exports)
    }

    /// Notes that the build went through step `key` (for the export).
    pub(crate) fn saw(&self, key: &str) {
        if self.to.is_some() {
            self.keys.lock_ok().push(key.to_string());
        }
    }

    /// Step `key` from the registry, on a miss in `store`. Its layer is not fetched: a step
    /// built on it needs no bytes of it, and a step that reads it, or the image when it is
    /// wanted in the store, fetches it then ([`fetch_layers`](Self::fetch_layers)). The
    /// registry is asked (`HEAD`) that it still has the layer, and the store records that
    /// the cache's repository has it, so a push to another repository of that registry mounts
    /// it. `None` when the registry has no entry, or the entry's layer is gone from it.
    pub(crate) fn lookup(&self, store: &Store, key: &str) -> Result<Option<CacheEntry>> {
        // The first cache that has the entry and still its layer gives it.
        for (i, (from, export)) in self.from.iter().zip(self.exports()?).enumerate() {
            let Some(entry) = export.entries.get(key).cloned() else {
                continue;
            };
            if let Some(layer) = &entry.layer
                && !store.has_blob(&layer.digest)
            {
                let err = |e: strata_transfer::Error| Error::SharedCache {
                    reference: from.reference().to_string(),
                    message: e.to_string(),
                };
                if !from.has(layer).map_err(err)? {
                    self.stats.lock_ok().gone += 1;
                    continue;
                }
                from.remember(store, &layer.digest).map_err(err)?;
                self.remote
                    .lock_ok()
                    .entry(layer.digest.clone())
                    .or_insert((i, layer.clone()));
                self.remote_entries
                    .lock_ok()
                    .insert(key.to_string(), entry.clone());
            }
            cache::put(store, key, &entry)?;
            self.stats.lock_ok().hits += 1;
            return Ok(Some(entry));
        }
        Ok(None)
    }

    /// Fetches into `store` those of `layers` it lacks that a hit left in the registry
    /// (verified as they stream); a layer it lacks for another reason is left for the reader
    /// to report. A layer gone from the registry since the hit is an error naming it.
    pub(crate) fn fetch_layers(&self, store: &Store, layers: &[Descriptor]) -> Result<()> {
        for d in layers {
            if store.has_blob(&d.digest) {
                continue;
            }
            let _one_at_a_time = self.fetching.lock_ok();
            let Some((i, desc)) = self.remote.lock_ok().get(&d.digest).cloned() else {
                continue;
            };
            let from = &self.from[i];
            let err = |message: String| Error::SharedCache {
                reference: from.reference().to_string(),
                message,
            };
            match from.fetch(store, &desc).map_err(|e| err(e.to_string()))? {
                Some(bytes) => self.stats.lock_ok().bytes_fetched += bytes,
                None => {
                    return Err(err(format!(
                        "layer {} is gone from the registry since this build found it there",
                        d.digest
                    )));
                }
            }
            self.remote.lock_ok().remove(&d.digest);
        }
        Ok(())
    }

    /// Fills cache mount `id`'s directory `dir` (which does not exist) from the first cache
    /// that exported it, when the mount is shared; else leaves it missing. The blob is
    /// verified as it arrives, unpacked (as safely as a layer) beside `dir` and renamed into
    /// place, so a build running meanwhile sees the whole directory or none.
    pub(crate) fn import_mount(&self, store: &Store, id: &str, dir: &Path) -> Result<()> {
        if !self.mounts.iter().any(|m| m == id) {
            return Ok(());
        }
        for (from, export) in self.from.iter().zip(self.exports()?) {
            let Some(desc) = export.mounts.get(id) else {
                continue;
            };
            let err = |message: String| Error::SharedCache {
                reference: from.reference().to_string(),
                message,
            };
            let Some(bytes) = from.fetch(store, desc).map_err(|e| err(e.to_string()))? else {
                continue; // gone from the registry: an empty mount, as without the cache
            };
            let parent = dir.parent().unwrap_or(dir);
            let tmp = tempfile::Builder::new()
                .prefix("tmp-import-")
                .tempdir_in(parent)
                .map_err(|e| {
                    err(format!(
                        "cannot make a directory in {}: {e}",
                        parent.display()
                    ))
                })?;
            let reader = store.open_blob(&desc.digest)?;
            strata_rootfs::apply_layer(reader, strata_oci::Compression::Zstd, tmp.path())
                .map_err(|e| err(format!("cache mount `{id}` ({}): {e}", desc.digest)))?;
            // As a new mount starts (`RUN --mount=type=cache`'s default mode).
            let _ = std::fs::set_permissions(
                tmp.path(),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            );
            let kept = tmp.keep();
            // Another build may have made it meanwhile: theirs wins.
            if std::fs::rename(&kept, dir).is_err() {
                let _ = std::fs::remove_dir_all(&kept);
            }
            let mut stats = self.stats.lock_ok();
            stats.mounts_fetched += 1;
            stats.mount_bytes += bytes;
            return Ok(());
        }
        Ok(())
    }

    /// Exports the entries of every step the build went through (with what the registry
    /// already holds from other builds), pushing the layers it lacks. Returns how many entries
    /// the export holds, or `None` when this cache is not written to.
    pub fn export(&self, store: &Store) -> Result<Option<usize>> {
        let Some(to) = &self.to else {
            return Ok(None);
        };
        let reference = to.reference().to_string();
        let err = |e: strata_transfer::Error| Error::SharedCache {
            reference: reference.clone(),
            message: e.to_string(),
        };
        // What the cache holds now (others may have exported meanwhile), read again: the
        // newest wins the tag; entries of ours are added to it.
        let previous = read_export(to)?;
        let mut entries = previous.entries;
        let keys: Vec<String> = self.keys.lock_ok().clone();
        let remote = self.remote_entries.lock_ok().clone();
        for key in keys {
            if let Some(e) = cache::get(store, &key)? {
                entries.insert(key, e);
            } else if let Some(e) = remote.get(&key) {
                // A hit whose layer stayed in the registry: the push mounts or finds it.
                entries.insert(key, e.clone());
            }
        }
        // The manifest names every layer an entry uses, so the registry keeps them; those
        // this store lacks (others' entries) must still be there, or the push says which.
        let mut layers: Vec<Descriptor> = Vec::new();
        let mut seen = BTreeSet::new();
        for l in entries.values().filter_map(|e| e.layer.as_ref()) {
            if seen.insert(l.digest.clone()) {
                layers.push(l.clone());
            }
        }
        // Shared cache mounts this store has, as they are now; others' stay as exported.
        let mut mounts = previous.mounts;
        for id in &self.mounts {
            let dir = crate::run::cache_mount_dir(store.root(), id);
            if dir.is_dir() {
                mounts.insert(id.clone(), mount_blob(store, id, &dir)?);
            }
        }
        for m in mounts.values() {
            if seen.insert(m.digest.clone()) {
                layers.push(m.clone());
            }
        }
        let count = entries.len();
        let body = serde_json::to_vec(&Exported {
            schema: SCHEMA.to_string(),
            entries,
            mounts,
        })
        .map_err(|e| Error::SharedCache {
            reference: reference.clone(),
            message: e.to_string(),
        })?;
        to.write(store, &body, layers, None).map_err(err)?;
        Ok(Some(count))
    }
}

/// `cache`'s latest export (empty when it has none, or when it is another version's: its
/// entries are misses, not errors).
fn read_export(cache: &RegistryCache) -> Result<Exported> {
    let snapshot = cache.read().map_err(|e| Error::SharedCache {
        reference: cache.reference().to_string(),
        message: e.to_string(),
    })?;
    Ok(snapshot
        .and_then(|snap| serde_json::from_slice::<Exported>(&snap.entries).ok())
        .filter(|e| e.schema == SCHEMA)
        .unwrap_or_default())
}

/// Cache mount `id`'s directory as a blob of `store`: a zstd tar with the files' own mtimes
/// and owners (a compiler's cache keys on them), entries sorted, so an unchanged directory
/// gives the same digest and its export uploads nothing.
fn mount_blob(store: &Store, id: &str, dir: &Path) -> Result<Descriptor> {
    let opts = strata_rootfs::LayerOptions {
        compression: strata_oci::Compression::Zstd,
        ..strata_rootfs::LayerOptions::default()
    };
    let mut writer = store.blob_writer()?;
    let info = strata_rootfs::write_layer(strata_rootfs::LayerSource::Dir(dir), &opts, &mut writer)
        .map_err(|e| Error::SharedCache {
            reference: format!("cache mount `{id}`"),
            message: format!("cannot pack {}: {e}", dir.display()),
        })?;
    writer.commit(Some((&info.digest, Some(info.size))))?;
    let mut desc = Descriptor::new(MOUNT_MEDIA_TYPE, info.digest, info.size);
    desc.annotations = Some(BTreeMap::from([(
        "dev.strata.cache.mount.id".to_string(),
        id.to_string(),
    )]));
    Ok(desc)
}
