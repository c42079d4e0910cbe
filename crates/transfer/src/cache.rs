//! A build cache kept in a registry repository (docs/cache.md): one OCI manifest per export,
//! `artifactType` [`CACHE_ARTIFACT_TYPE`], whose config blob holds the entries (the build
//! engine's JSON; opaque here) and whose layers are the layer blobs the entries name, so the
//! registry keeps them and a client fetches each by digest. The tag names the latest export.

use std::collections::BTreeMap;

use strata_oci::{Descriptor, Digest, Manifest, Reference, media_type};
use strata_registry::{Client, ClientOptions};
use strata_store::Store;

use crate::registry::{PushOptions, PushReport, push_descriptor};
use crate::{Error, Result};

/// The cache manifest's `artifactType`.
pub const CACHE_ARTIFACT_TYPE: &str = "application/vnd.strata.build-cache.v1+json";
/// The media type of its config blob (the entries).
pub const CACHE_CONFIG_TYPE: &str = "application/vnd.strata.build-cache.config.v1+json";
/// Entries larger than this are refused when read (a registry cannot make a client buffer
/// without bound).
const MAX_ENTRIES_SIZE: u64 = 64 << 20;

/// A cache repository: `host[:port]/org/repo[:tag]` (tag default `latest`).
pub struct RegistryCache {
    reference: Reference,
    repo: String,
    client: Client,
    rt: tokio::runtime::Runtime,
    opts: ClientOptions,
}

/// What reading the cache found.
#[derive(Debug, Clone)]
pub struct CacheSnapshot {
    /// The entries (the config blob's bytes).
    pub entries: Vec<u8>,
    /// The manifest's digest, to tell whether another builder exported since.
    pub manifest: Digest,
}

impl RegistryCache {
    /// The cache at `reference` (nothing is contacted yet).
    pub fn open(reference: &Reference, opts: ClientOptions) -> Result<RegistryCache> {
        let registry = reference.registry().ok_or_else(|| Error::Image {
            name: reference.to_string(),
            reason: "a cache reference needs a registry host (`host[:port]/org/repo`)".into(),
        })?;
        let client = Client::new(registry, opts.clone()).map_err(|e| registry_err(reference, e))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Image {
                name: reference.to_string(),
                reason: format!("cannot start the async runtime: {e}"),
            })?;
        Ok(RegistryCache {
            repo: reference.repository().to_string(),
            reference: reference.clone(),
            client,
            rt,
            opts,
        })
    }

    /// The reference, as given.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    fn tag(&self) -> String {
        self.reference
            .tag()
            .unwrap_or(strata_oci::reference::DEFAULT_TAG)
            .to_string()
    }

    /// The entries of the latest export, or `None` when the repository has none yet.
    pub fn read(&self) -> Result<Option<CacheSnapshot>> {
        let got = self
            .rt
            .block_on(self.client.get_manifest(&self.repo, &self.tag()));
        let manifest = match got {
            Ok(m) => m,
            Err(strata_registry::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(registry_err(&self.reference, e)),
        };
        let parsed = Manifest::from_slice(&manifest.bytes).map_err(|e| Error::Image {
            name: self.reference.to_string(),
            reason: format!("not a build cache: {e}"),
        })?;
        if parsed.artifact_type.as_deref() != Some(CACHE_ARTIFACT_TYPE)
            || parsed.config.media_type != CACHE_CONFIG_TYPE
        {
            return Err(Error::Image {
                name: self.reference.to_string(),
                reason: format!(
                    "not a strata build cache (artifactType {:?}); name a repository only \
                     caches use",
                    parsed.artifact_type
                ),
            });
        }
        if parsed.config.size > MAX_ENTRIES_SIZE {
            return Err(Error::Image {
                name: self.reference.to_string(),
                reason: format!("cache entries of {} bytes", parsed.config.size),
            });
        }
        let mut entries = Vec::new();
        self.rt
            .block_on(self.client.fetch_blob(
                &self.repo,
                &parsed.config.digest,
                Some(parsed.config.size),
                &mut entries,
                None,
            ))
            .map_err(|e| registry_err(&self.reference, e))?;
        Ok(Some(CacheSnapshot {
            entries,
            manifest: manifest.descriptor().digest,
        }))
    }

    /// Fetches blob `desc` of the cache repository into `store` (verified as it streams) unless
    /// the store has it; returns the bytes received. A blob the registry no longer has is
    /// `Ok(None)`: a cache entry that points at it is a miss, not an error.
    pub fn fetch(&self, store: &Store, desc: &Descriptor) -> Result<Option<u64>> {
        if store.has_blob(&desc.digest) && store.blob_size(&desc.digest).ok() == Some(desc.size) {
            return Ok(Some(0));
        }
        let mut writer = store.blob_writer_with(desc.digest.algorithm())?;
        let got = self.rt.block_on(self.client.fetch_blob(
            &self.repo,
            &desc.digest,
            Some(desc.size),
            &mut writer,
            None,
        ));
        match got {
            Ok(f) => {
                writer.commit(Some((&desc.digest, Some(desc.size))))?;
                Ok(Some(f.bytes_received))
            }
            Err(strata_registry::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(registry_err(&self.reference, e)),
        }
    }

    /// Whether the cache repository still has blob `desc` (a `HEAD`, no bytes): a lazy hit's
    /// check that its layer can still be fetched or mounted.
    pub fn has(&self, desc: &Descriptor) -> Result<bool> {
        let got = self
            .rt
            .block_on(self.client.head_blob(&self.repo, &desc.digest))
            .map_err(|e| registry_err(&self.reference, e))?;
        Ok(got.is_some())
    }

    /// Records in `store` that this repository has blob `digest`, so a push of an image that
    /// uses it (a build that left its layers here) to another repository of the same registry
    /// mounts it from here instead of needing its bytes.
    pub fn remember(&self, store: &Store, digest: &Digest) -> Result<()> {
        let registry = self.reference.registry().unwrap_or_default();
        crate::registry::record_repository(store, registry, digest, &self.repo)
    }

    /// Exports `entries` (the engine's JSON) and the `layers` they name (all in `store`): the
    /// layers the registry lacks are uploaded (or mounted), then the config and the manifest,
    /// and the tag is moved last. Two builders exporting at once each write a whole manifest;
    /// the tag names one of them, and the other's entries are lost, never mixed.
    pub fn write(
        &self,
        store: &Store,
        entries: &[u8],
        layers: Vec<Descriptor>,
        progress: Option<std::sync::Arc<crate::ProgressFn>>,
    ) -> Result<PushReport> {
        let (config, size) = store.put_blob_bytes(entries, None)?;
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "org.opencontainers.image.title".to_string(),
            "strata build cache".to_string(),
        );
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_string()),
            artifact_type: Some(CACHE_ARTIFACT_TYPE.to_string()),
            config: Descriptor::new(CACHE_CONFIG_TYPE, config, size),
            layers,
            subject: None,
            annotations: Some(annotations),
        };
        // Stored as bytes only: it names layers of other builders this store does not have
        // (the push checks that the registry has them).
        let bytes = strata_oci::to_canonical_json(&manifest);
        let (digest, size) = store.put_blob_bytes(&bytes, None)?;
        let desc = Descriptor::new(media_type::OCI_MANIFEST, digest, size);
        let dest = self.reference.without_digest();
        let opts = PushOptions {
            client: self.opts.clone(),
            progress,
            ..PushOptions::default()
        };
        push_descriptor(store, "the build cache", desc, &dest, &opts)
    }
}

fn registry_err(reference: &Reference, e: strata_registry::Error) -> Error {
    Error::Registry {
        reference: reference.to_string(),
        source: Box::new(e),
    }
}
