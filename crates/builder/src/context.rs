//! [`Ctx`], what every stage of one build shares, and [`StageState`], a stage at some step.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use strata_dockerfile::IgnoreMatcher;
use strata_oci::sync::MutexExt;
use strata_oci::{ContainerConfig, Descriptor, History, Platform};
use strata_rootfs::{LayerRef, MtimePolicy, SnapshotCache};
use strata_store::Store;

use crate::error::{Error, Result, io_err};
use crate::options::BuildOptions;
use crate::plan::{FileSource, ImageResolver};
use crate::progress::Progress;
use crate::resolve::StoreResolver;
use crate::statcache::StatCache;

/// A stage's filesystem and config at some step.
#[derive(Debug, Clone)]
pub(crate) struct StageState {
    pub layers: Vec<LayerRef>,
    pub history: Vec<History>,
    pub config: ContainerConfig,
    /// The image's `author` (inherited from the base, set by MAINTAINER).
    pub author: Option<String>,
    pub platform: Platform,
    pub key: String,
}

/// Shared by every stage of one build.
pub(crate) struct Ctx<'a> {
    pub store: &'a Store,
    pub opts: &'a BuildOptions,
    pub progress: &'a dyn Progress,
    pub snapshots: SnapshotCache,
    pub tmp_root: PathBuf,
    pub context: PathBuf,
    pub ignore: IgnoreMatcher,
    /// What the context's files hashed to, by stat (kept in the store between builds).
    pub stat_cache: StatCache,
    pub image_name: String,
    pub epoch: u64,
    pub created: String,
    pub run_mtime: MtimePolicy,
    pub multi_stage: bool,
    pub resolver: &'a StoreResolver<'a>,
    /// Why this build does not follow a moved base (an opt-out), if it does not.
    pub rebase_refusal: Option<String>,
    /// Bytes of the layer blobs this build's steps wrote.
    pub layer_bytes_written: AtomicU64,
    /// What runs RUN steps: the options' executor, else runc.
    pub executor: Arc<dyn crate::executor::Executor>,
    pub(crate) materialized: Mutex<HashMap<String, Arc<tempfile::TempDir>>>,
    /// Final states of finished stages (for `--from` reads).
    pub stages: Mutex<BTreeMap<usize, StageState>>,
}

impl Ctx<'_> {
    pub fn tempdir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(&strata_store::temp_prefix(prefix.trim_end_matches('-')))
            .tempdir_in(&self.tmp_root)
            .map_err(io_err("creating temporary directory in", &self.tmp_root))
    }

    /// A layer's bytes: from the store, fetched there first when a step found it in the
    /// registry cache and left it there until now.
    fn open_blob(&self, d: &Descriptor) -> std::io::Result<strata_store::VerifyingReader> {
        if let Some(shared) = &self.opts.shared_cache
            && !self.store.has_blob(&d.digest)
        {
            shared
                .fetch_layers(self.store, std::slice::from_ref(d))
                .map_err(std::io::Error::other)?;
        }
        self.store.open_descriptor(d).map_err(std::io::Error::other)
    }

    /// The snapshot directories of `layers`, bottom first (unpacked on first use).
    pub fn snapshots_of(&self, layers: &[LayerRef]) -> Result<Vec<PathBuf>> {
        Ok(self.snapshots.ensure(layers, |d| self.open_blob(d))?)
    }

    /// A flattened rootfs of a stage or image, for `COPY --from` and bind mounts.
    pub fn origin_root(&self, from: &FileSource) -> Result<PathBuf> {
        let (key, layers) = match from {
            FileSource::Context => return Ok(self.context.clone()),
            FileSource::Stage { index } => {
                let stages = self.stages.lock_ok();
                let st = stages.get(index).ok_or_else(|| Error::DependencyFailed {
                    stage: index.to_string(),
                })?;
                (st.key.clone(), st.layers.clone())
            }
            FileSource::Image { name, .. } => {
                let img = self
                    .resolver
                    .resolve(name)?
                    .ok_or_else(|| Error::BaseNotFound {
                        location: "--from".into(),
                        image: name.clone(),
                    })?;
                (img.descriptor.digest.to_string(), img.layers())
            }
        };
        let mut map = self.materialized.lock_ok();
        if let Some(t) = map.get(&key) {
            return Ok(t.path().join("rootfs"));
        }
        let t = self.tempdir("rootfs-")?;
        let dest = t.path().join("rootfs");
        strata_rootfs::materialize(&layers, |d| self.open_blob(d), &dest)?;
        map.insert(key, Arc::new(t));
        Ok(dest)
    }
}
