//! Image names to images: the store, pins and locks, and pulls of what the store lacks.

use std::collections::BTreeMap;
use std::sync::Mutex;

use strata_oci::sync::MutexExt;
use strata_oci::{Descriptor, Digest, ImageConfig, Platform, Reference, media_type};
use strata_store::Store;
use strata_transfer::{PullOptions, PullReport};

use crate::error::{Error, Result};
use crate::plan::{ImageResolver, ResolvedImage};
use crate::progress::{Event, Progress};

static NOTHING_LOCKED: BTreeMap<String, Digest> = BTreeMap::new();

/// Resolves image names in the store, honouring pins and locks; with
/// [`StoreResolver::with_pulls`], pulls what the store lacks from the registry the name points
/// at. Remembers what it resolved and pulled.
pub struct StoreResolver<'a> {
    store: &'a Store,
    pinned: &'a BTreeMap<String, Descriptor>,
    locked: &'a BTreeMap<String, Digest>,
    pull: Option<(&'a PullOptions, &'a dyn Progress)>,
    /// `--pull`: a name (not a digest, pin or lock) is pulled even when the store has it.
    refresh: bool,
    used: Mutex<BTreeMap<String, Digest>>,
    pulled: Mutex<Vec<PullReport>>,
}

impl<'a> StoreResolver<'a> {
    /// A resolver over `store` with `pinned` names; it never pulls.
    pub fn new(store: &'a Store, pinned: &'a BTreeMap<String, Descriptor>) -> Self {
        StoreResolver {
            store,
            pinned,
            locked: &NOTHING_LOCKED,
            pull: None,
            refresh: false,
            used: Mutex::new(BTreeMap::new()),
            pulled: Mutex::new(Vec::new()),
        }
    }

    /// Also resolve `locked` names to their digest, and pull images missing from the store
    /// (a locked one by its digest, others by the name as written) with `opts`, reporting
    /// each pull to `progress`. A name the store has is never pulled.
    pub fn with_pulls(
        mut self,
        locked: &'a BTreeMap<String, Digest>,
        opts: &'a PullOptions,
        progress: &'a dyn Progress,
    ) -> Self {
        self.locked = locked;
        self.pull = Some((opts, progress));
        self
    }

    /// Pull every name from its registry even when the store has it (`docker build --pull`):
    /// a tag that moved there is followed. Digests, pins and locks are exact and not pulled
    /// again. Needs [`StoreResolver::with_pulls`].
    pub fn refreshing(mut self, refresh: bool) -> Self {
        self.refresh = refresh;
        self
    }

    /// The images resolved so far.
    pub fn used(&self) -> BTreeMap<String, Digest> {
        self.used.lock_ok().clone()
    }

    /// The pulls done so far.
    pub fn pulled(&self) -> Vec<PullReport> {
        self.pulled.lock_ok().clone()
    }

    /// `reference` from its registry, when pulling is on; `None` when it is off. `why` is
    /// said with it (`not in the store`, `--pull`).
    fn pull(&self, reference: &Reference, why: &str) -> Result<Option<Descriptor>> {
        let Some((opts, progress)) = self.pull else {
            return Ok(None);
        };
        let report = pull_image(self.store, reference, opts, progress, why)?;
        let descriptor = report.descriptor.clone();
        self.pulled.lock_ok().push(report);
        Ok(Some(descriptor))
    }

    /// The manifest `digest` of `reference`: from the store, else pulled by digest.
    fn by_digest(&self, reference: &Reference, digest: &Digest) -> Result<Option<Descriptor>> {
        if let Some(d) = descriptor_for_digest(self.store, digest)? {
            return Ok(Some(d));
        }
        if self
            .pull(&reference.with_digest(digest.clone()), "not in the store")?
            .is_none()
        {
            return Ok(None);
        }
        descriptor_for_digest(self.store, digest)
    }
}

/// Pulls `reference` into the store (a name without a registry host comes from Docker Hub),
/// announcing it to `progress` as a warning before and after; registry failures become
/// [`Error::Pull`] naming the image and the registry.
pub(crate) fn pull_image(
    store: &Store,
    reference: &Reference,
    opts: &PullOptions,
    progress: &dyn Progress,
    why: &str,
) -> Result<PullReport> {
    let remote = reference.to_remote();
    let registry = remote.registry().unwrap_or_default().to_string();
    progress.event(&Event::Warning {
        message: format!("pulling {remote} ({why})"),
    });
    let report = strata_transfer::pull(store, &remote, opts).map_err(|e| Error::Pull {
        image: remote.to_string(),
        registry,
        source: Box::new(e),
    })?;
    progress.event(&Event::Warning {
        message: format!(
            "pulled {remote} as {}: {} blobs fetched ({} bytes), {} already in the store",
            report.name, report.blobs_fetched, report.bytes_downloaded, report.blobs_present
        ),
    });
    Ok(report)
}

/// The descriptor of a manifest stored under `digest` (media type from its content).
pub fn descriptor_for_digest(store: &Store, digest: &Digest) -> Result<Option<Descriptor>> {
    if !store.has_blob(digest) {
        return Ok(None);
    }
    let bytes = store.read_blob(digest)?;
    let mt = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| media_type::OCI_MANIFEST.to_string());
    Ok(Some(Descriptor::new(
        mt,
        digest.clone(),
        bytes.len() as u64,
    )))
}

impl ImageResolver for StoreResolver<'_> {
    fn resolve(&self, name: &str) -> Result<Option<ResolvedImage>> {
        let reference = Reference::parse_local(name)?;
        let local = reference.to_string();
        let host = Platform::host();
        let desc = if let Some(d) = self.pinned.get(&local) {
            Some(d.clone())
        } else if let Some(d) = self.locked.get(&local) {
            let missing = |reason: String| Error::LockedBaseMissing {
                image: local.clone(),
                digest: d.to_string(),
                reason,
            };
            match self.by_digest(&reference, d) {
                Ok(Some(desc)) => Some(desc),
                Ok(None) => return Err(missing("pulling is off".into())),
                Err(e) => return Err(missing(format!("and pulling it failed: {e}"))),
            }
        } else if let Some(d) = reference.digest() {
            self.by_digest(&reference, d)?
        } else {
            match self.store.get_ref(&local)? {
                Some(_) if self.refresh => self.pull(&reference, "--pull")?,
                Some(d) => Some(d),
                None => self.pull(&reference, "not in the store")?,
            }
        };
        let Some(desc) = desc else {
            return Ok(None);
        };
        let img = self.store.resolve_image(&local, desc, &host)?;
        let config = ImageConfig::from_slice(&img.config_bytes)?;
        self.used
            .lock_ok()
            .insert(local.clone(), img.descriptor.digest.clone());
        Ok(Some(ResolvedImage {
            name: local,
            descriptor: img.descriptor,
            manifest: img.manifest,
            config,
        }))
    }
}
