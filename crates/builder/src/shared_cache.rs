//! The step cache shared through a registry (docs/cache.md): `--cache-from REF` looks a step's
//! key up there when this store misses it, `--cache-to REF` exports the entries of every step
//! a build went through. Keys are the local cache's own (content addresses of a step's
//! inputs), so an entry made on one machine is valid on any other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use strata_oci::Descriptor;
use strata_oci::sync::MutexExt;
use strata_store::Store;
use strata_transfer::cache::RegistryCache;

use crate::cache::{self, CacheEntry};
use crate::error::{Error, Result};

/// The export's schema, inside the cache manifest's config blob.
const SCHEMA: &str = "strata-build-cache-export/1";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Exported {
    schema: String,
    /// Step key → entry.
    entries: BTreeMap<String, CacheEntry>,
}

/// The registry caches a build reads from (`--cache-from`) and writes to (`--cache-to`): the
/// same repository, two, or only one of them.
pub struct SharedCache {
    from: Option<RegistryCache>,
    to: Option<RegistryCache>,
    /// The entries of `from`, read at the first lookup (`None` until then).
    read: Mutex<Option<BTreeMap<String, CacheEntry>>>,
    /// Every key this build looked up, in order (exported when they have an entry).
    keys: Mutex<Vec<String>>,
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
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = |c: &Option<RegistryCache>| c.as_ref().map(|c| c.reference().to_string());
        f.debug_struct("SharedCache")
            .field("from", &name(&self.from))
            .field("to", &name(&self.to))
            .finish()
    }
}

impl SharedCache {
    /// Steps looked up in `from` and exported to `to`.
    pub fn new(from: Option<RegistryCache>, to: Option<RegistryCache>) -> SharedCache {
        SharedCache {
            from,
            to,
            read: Mutex::new(None),
            keys: Mutex::new(Vec::new()),
            stats: Mutex::new(SharedStats::default()),
        }
    }

    /// Whether builds look steps up there.
    pub fn imports(&self) -> bool {
        self.from.is_some()
    }

    /// Where steps are looked up (else where they are exported), for messages.
    pub fn reference(&self) -> String {
        self.from
            .as_ref()
            .or(self.to.as_ref())
            .map(|c| c.reference().to_string())
            .unwrap_or_default()
    }

    /// Where the build's entries are exported, if anywhere.
    pub fn export_reference(&self) -> Option<String> {
        self.to.as_ref().map(|c| c.reference().to_string())
    }

    /// What it did so far.
    pub fn stats(&self) -> SharedStats {
        *self.stats.lock_ok()
    }

    fn entries(&self) -> Result<BTreeMap<String, CacheEntry>> {
        let mut read = self.read.lock_ok();
        if let Some(e) = &*read {
            return Ok(e.clone());
        }
        let Some(from) = &self.from else {
            return Ok(BTreeMap::new());
        };
        let entries = read_entries(from)?;
        *read = Some(entries.clone());
        Ok(entries)
    }

    /// Notes that the build went through step `key` (for the export).
    pub(crate) fn saw(&self, key: &str) {
        if self.to.is_some() {
            self.keys.lock_ok().push(key.to_string());
        }
    }

    /// Step `key` from the registry, on a miss in `store`: its layer fetched into the store
    /// and the entry recorded there, so the step is a hit from now on. `None` when the
    /// registry has no entry, or the entry's layer is gone from it.
    pub(crate) fn lookup(&self, store: &Store, key: &str) -> Result<Option<CacheEntry>> {
        let Some(from) = &self.from else {
            return Ok(None);
        };
        let Some(entry) = self.entries()?.get(key).cloned() else {
            return Ok(None);
        };
        if let Some(layer) = &entry.layer {
            let fetched = from.fetch(store, layer).map_err(|e| Error::SharedCache {
                reference: self.reference(),
                message: e.to_string(),
            })?;
            let Some(bytes) = fetched else {
                self.stats.lock_ok().gone += 1;
                return Ok(None);
            };
            self.stats.lock_ok().bytes_fetched += bytes;
        }
        cache::put(store, key, &entry)?;
        self.stats.lock_ok().hits += 1;
        Ok(Some(entry))
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
        let mut entries = read_entries(to)?;
        let keys: Vec<String> = self.keys.lock_ok().clone();
        for key in keys {
            if let Some(e) = cache::get(store, &key)? {
                entries.insert(key, e);
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
        let count = entries.len();
        let body = serde_json::to_vec(&Exported {
            schema: SCHEMA.to_string(),
            entries,
        })
        .map_err(|e| Error::SharedCache {
            reference: reference.clone(),
            message: e.to_string(),
        })?;
        to.write(store, &body, layers, None).map_err(err)?;
        Ok(Some(count))
    }
}

/// The entries of `cache`'s latest export (none when it has none, or when it is another
/// version's: its entries are misses, not errors).
fn read_entries(cache: &RegistryCache) -> Result<BTreeMap<String, CacheEntry>> {
    let snapshot = cache.read().map_err(|e| Error::SharedCache {
        reference: cache.reference().to_string(),
        message: e.to_string(),
    })?;
    Ok(snapshot
        .and_then(|snap| serde_json::from_slice::<Exported>(&snap.entries).ok())
        .filter(|e| e.schema == SCHEMA)
        .map(|e| e.entries)
        .unwrap_or_default())
}
