//! Step cache keys (an on-disk format: change them only on purpose, the fixture test pins
//! them), cache entries, and the per-image record `explain` diffs against.
//!
//! ```text
//! meta-v1.db, table cache (key → JSON):
//!   strata-build/1/step/<key hex>   → {"layer": Descriptor|null, "diff_id": Digest|null,
//!                                      "made_with"?: {"paths": [..], "files": [..], "epoch": N}}
//!   strata-build/1/explain/<image>  → {"stages": {"<stage>": [StepInputs, ...]}}
//!   strata-build/1/explain-files/<image> → {"steps": {"<step key>": {"<path>": "<short hash>"}}}
//! key = sha256(canonical JSON {schema: "strata-build-cache/1", parent: <parent key>,
//!              step: <typed expanded step>, files: <content hash>|null, origin: <key>|null})
//! first parent = sha256(canonical JSON {schema, base: {...}, from_cache_version, platform})
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use strata_oci::{Descriptor, Digest};
use strata_store::Store;

use crate::error::{Error, Result};
use crate::plan::StepKind;

/// Version of the key derivation; part of every key.
pub const CACHE_SCHEMA: &str = "strata-build-cache/1";

const STEP_PREFIX: &str = "strata-build/1/step/";
const EXPLAIN_PREFIX: &str = "strata-build/1/explain/";
const FILES_PREFIX: &str = "strata-build/1/explain-files/";

/// What a stage's first key is derived from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum BaseInput {
    /// `FROM scratch`.
    Scratch,
    /// An image, by manifest digest.
    Image { digest: String },
    /// An earlier stage, by its final key.
    Stage { key: String },
}

fn hash_json<T: Serialize>(v: &T) -> String {
    Digest::sha256(&strata_oci::to_canonical_json(v))
        .hex()
        .to_string()
}

/// The key a stage's steps start from.
pub fn base_key(base: &BaseInput, from_cache_version: Option<&str>, platform: &str) -> String {
    #[derive(Serialize)]
    struct K<'a> {
        schema: &'a str,
        base: &'a BaseInput,
        from_cache_version: Option<&'a str>,
        platform: &'a str,
    }
    hash_json(&K {
        schema: CACHE_SCHEMA,
        base,
        from_cache_version,
        platform,
    })
}

/// The key of one step: its parent's key, the typed expanded step, the content hash of the
/// files it reads (COPY/ADD, bind mounts) and the key of the stage it reads from, if any.
pub fn step_key(
    parent: &str,
    step: &StepKind,
    files: Option<&Digest>,
    origin: Option<&str>,
) -> String {
    #[derive(Serialize)]
    struct K<'a> {
        schema: &'a str,
        parent: &'a str,
        step: &'a StepKind,
        files: Option<String>,
        origin: Option<&'a str>,
    }
    hash_json(&K {
        schema: CACHE_SCHEMA,
        parent,
        step,
        files: files.map(|d| d.to_string()),
        origin,
    })
}

/// What a cached filesystem step produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The layer, `None` when the step changed nothing.
    pub layer: Option<Descriptor>,
    /// Its diff_id.
    pub diff_id: Option<Digest>,
    /// What the layer was made from besides the key's inputs, for a layer step that writes
    /// its layer itself (COPY, ADD, WORKDIR); `None` for RUN, whose process may read any
    /// file of the image, and for entries older strata versions wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made_with: Option<MadeWith>,
}

/// What a COPY/ADD/WORKDIR layer depends on besides its key's inputs (the instruction and the
/// content of the files it copies): the parts of the image below it that it read, and the
/// mtime its files got. The same step on another base writes the same bytes when that base
/// answers these paths and files the same (docs/rebase.md), which is what lets `strata build`
/// move an image onto a new base without running its steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MadeWith {
    /// Paths looked up in the image below (`usr/local/bin`, relative to the root, no symlink
    /// followed): the destination and its parents, each directory the copy placed, the links
    /// resolved on the way.
    #[serde(default)]
    pub paths: BTreeSet<String>,
    /// Files of the image below read whole (`etc/passwd` and `etc/group` to resolve a name).
    #[serde(default)]
    pub files: BTreeSet<String>,
    /// The mtime given to the layer's files (`SOURCE_DATE_EPOCH`, else 0).
    pub epoch: u64,
}

/// The entry for `key`, if present and its blob is still in the store.
pub fn get(store: &Store, key: &str) -> Result<Option<CacheEntry>> {
    let full = format!("{STEP_PREFIX}{key}");
    let Some(json) = store.cache_get(&full)? else {
        return Ok(None);
    };
    let Ok(entry) = serde_json::from_str::<CacheEntry>(&json) else {
        // An entry we cannot read is a miss, not an error: it is rebuilt and overwritten.
        return Ok(None);
    };
    if let Some(l) = &entry.layer
        && !store.has_blob(&l.digest)
    {
        return Ok(None);
    }
    Ok(Some(entry))
}

/// Records `entry` under `key`.
pub fn put(store: &Store, key: &str, entry: &CacheEntry) -> Result<()> {
    let json = serde_json::to_string(entry).map_err(|e| Error::Cache {
        key: key.to_string(),
        message: e.to_string(),
    })?;
    store.cache_put(&format!("{STEP_PREFIX}{key}"), &json)?;
    Ok(())
}

/// The inputs of one step as recorded for explanations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInputs {
    /// The instruction as written.
    pub text: String,
    /// Canonical JSON of the typed step (the expanded instruction).
    pub instruction: String,
    /// Build args in scope.
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// Per copied file: a short hash of its content and metadata. Filled only to explain a
    /// step that ran, and kept out of the saved record ([`FilesRecord`] holds them); records
    /// of earlier strata versions carry them here.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// Short hash of all the context files the step reads (COPY, RUN bind mounts): names a
    /// change of files when the per-file hashes of the last build are gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<String>,
    /// The base (first step only): image digest, `scratch` or `stage <name> <key>`.
    #[serde(default)]
    pub base: Option<String>,
    /// The base image's full manifest digest (first step of a stage `FROM` an image), so the
    /// next build knows the base this one was made on (automatic rebase).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<String>,
    /// `from_cache_version` of the stage (first step of the first stage only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cache_version: Option<String>,
    /// The step's key.
    pub key: String,
}

/// The inputs of every step of the last build of an image, per stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRecord {
    /// Stage display name → its steps.
    pub stages: BTreeMap<String, Vec<StepInputs>>,
}

/// The per-file short hashes of the last build's steps, by step key. Kept apart from the
/// [`BuildRecord`]: a no-op build compares records and must neither read nor write tens of
/// thousands of file entries; these are read only when a step misses, and written only when
/// the record changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesRecord {
    /// Step key → path → short hash.
    pub steps: BTreeMap<String, BTreeMap<String, String>>,
}

/// The per-file hashes of the last build of `image`.
pub fn load_files(store: &Store, image: &str) -> Result<Option<FilesRecord>> {
    load_json(store, FILES_PREFIX, image)
}

/// Saves the per-file hashes of this build of `image`.
pub fn save_files(store: &Store, image: &str, files: &FilesRecord) -> Result<()> {
    save_json(store, FILES_PREFIX, image, files)
}

/// The JSON value under `prefix` + `image`; `None` when absent or unreadable (a record only
/// explains, it never decides what runs).
fn load_json<T: serde::de::DeserializeOwned>(
    store: &Store,
    prefix: &str,
    image: &str,
) -> Result<Option<T>> {
    Ok(store
        .cache_get(&format!("{prefix}{image}"))?
        .and_then(|j| serde_json::from_str(&j).ok()))
}

fn save_json<T: Serialize>(store: &Store, prefix: &str, image: &str, value: &T) -> Result<()> {
    let json = serde_json::to_string(value).map_err(|e| Error::Cache {
        key: image.to_string(),
        message: e.to_string(),
    })?;
    store.cache_put(&format!("{prefix}{image}"), &json)?;
    Ok(())
}

/// The last build's [`FilesRecord`], read on first use (a build where every step hits never
/// reads it).
pub struct PrevFiles<'a> {
    store: &'a Store,
    image: &'a str,
    loaded: std::sync::OnceLock<Option<FilesRecord>>,
}

impl<'a> PrevFiles<'a> {
    pub fn new(store: &'a Store, image: &'a str) -> Self {
        PrevFiles {
            store,
            image,
            loaded: std::sync::OnceLock::new(),
        }
    }

    /// The per-file hashes the last build recorded for the step with `key`.
    pub fn of(&self, key: &str) -> Option<&BTreeMap<String, String>> {
        self.loaded
            .get_or_init(|| load_files(self.store, self.image).ok().flatten())
            .as_ref()
            .and_then(|r| r.steps.get(key))
    }
}

/// The record of the last build of `image`.
pub fn load_record(store: &Store, image: &str) -> Result<Option<BuildRecord>> {
    load_json(store, EXPLAIN_PREFIX, image)
}

/// Saves the record of this build of `image`.
pub fn save_record(store: &Store, image: &str, record: &BuildRecord) -> Result<()> {
    save_json(store, EXPLAIN_PREFIX, image, record)
}

/// The explanation of a step whose own inputs are the last build's.
pub const EARLIER_STEP_CHANGED: &str = "an earlier step changed";

/// Why `now` missed the cache, compared with the same step of the previous build.
pub fn explain(prev: Option<&StepInputs>, now: &StepInputs) -> String {
    let Some(prev) = prev else {
        return "no previous build of this step".to_string();
    };
    let mut reasons = Vec::new();
    if prev.from_cache_version != now.from_cache_version {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "unset".into());
        reasons.push(format!(
            "from_cache_version changed {}→{}",
            show(&prev.from_cache_version),
            show(&now.from_cache_version)
        ));
    }
    if prev.base != now.base {
        reasons.push(format!(
            "base image changed {}→{}",
            prev.base.as_deref().unwrap_or("?"),
            now.base.as_deref().unwrap_or("?")
        ));
    }
    if prev.instruction != now.instruction {
        if prev.text != now.text {
            reasons.push(format!("instruction changed (was `{}`)", prev.text));
        } else {
            reasons.push("instruction changed (after variable expansion)".to_string());
        }
    }
    let keys: std::collections::BTreeSet<&String> =
        prev.args.keys().chain(now.args.keys()).collect();
    for k in keys {
        match (prev.args.get(k), now.args.get(k)) {
            (Some(a), Some(b)) if a != b => reasons.push(format!("ARG {k} changed {a}→{b}")),
            (None, Some(b)) => reasons.push(format!("ARG {k} set to {b}")),
            (Some(_), None) => reasons.push(format!("ARG {k} unset")),
            _ => {}
        }
    }
    let mut file_reasons = Vec::new();
    // Without the last build's per-file hashes (gone, or the step came from a shared cache),
    // only their hash over all files says whether they changed.
    let per_file_known = !prev.files.is_empty() || prev.files_hash.is_none();
    if !per_file_known && prev.files_hash != now.files_hash {
        file_reasons.push("the files it reads changed".to_string());
    }
    let files: std::collections::BTreeSet<&String> = if per_file_known {
        prev.files.keys().chain(now.files.keys()).collect()
    } else {
        Default::default()
    };
    for f in files {
        // A name that is not UTF-8 shows its odd bytes as `\xNN`.
        let shown = strata_oci::names::display(f);
        match (prev.files.get(f), now.files.get(f)) {
            (Some(a), Some(b)) if a != b => file_reasons.push(format!("file `{shown}` changed")),
            (None, Some(_)) => file_reasons.push(format!("file `{shown}` added")),
            (Some(_), None) => file_reasons.push(format!("file `{shown}` removed")),
            _ => {}
        }
    }
    if file_reasons.len() > 5 {
        let more = file_reasons.len() - 5;
        file_reasons.truncate(5);
        file_reasons.push(format!("and {more} more files"));
    }
    reasons.extend(file_reasons);
    if reasons.is_empty() {
        if prev.key == now.key {
            "not in the cache (removed, or --no-cache)".to_string()
        } else {
            EARLIER_STEP_CHANGED.to_string()
        }
    } else {
        reasons.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanations_name_what_changed() {
        let mut a = StepInputs {
            text: "COPY . /app".into(),
            instruction: "{}".into(),
            key: "k1".into(),
            ..StepInputs::default()
        };
        a.files.insert("src/main.go".into(), "aa".into());
        a.args.insert("VERSION".into(), "1".into());
        let mut b = a.clone();
        b.key = "k2".into();
        b.files.insert("src/main.go".into(), "bb".into());
        b.args.insert("VERSION".into(), "2".into());
        let r = explain(Some(&a), &b);
        assert!(r.contains("file `src/main.go` changed"), "{r}");
        assert!(r.contains("ARG VERSION changed 1→2"), "{r}");
        let mut c = a.clone();
        c.key = "k3".into();
        assert_eq!(explain(Some(&a), &c), "an earlier step changed");
        assert_eq!(explain(None, &c), "no previous build of this step");
        // The last build's per-file hashes are gone: only their overall hash is compared.
        let mut d = a.clone();
        d.files.clear();
        d.files_hash = Some("h1".into());
        let mut e = b.clone();
        e.files_hash = Some("h2".into());
        let r = explain(Some(&d), &e);
        assert!(r.contains("the files it reads changed"), "{r}");
        assert!(!r.contains("added"), "{r}");
        e.files_hash = Some("h1".into());
        e.args = d.args.clone();
        assert_eq!(explain(Some(&d), &e), "an earlier step changed");
    }
}
