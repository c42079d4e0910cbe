//! `strata push` and `strata pull`: images between the store and a registry, moving only the
//! blobs the other side lacks.
//!
//! Push: every blob (config and layers) is checked with `HEAD` first and skipped if the
//! repository has it; otherwise it is mounted from another repository of the same registry
//! that is known to have it (the caller's [`PushOptions::mount_from`], then repositories this
//! store pushed it to or pulled it from, recorded under the cache key
//! `registry-blob/<registry>/<digest>`), else uploaded. Blobs go in parallel; the manifest goes
//! last, so a registry never holds a manifest whose blobs are missing.
//!
//! Pull: the manifest is resolved (an index to the host platform), blobs the store already has
//! are not fetched, the others are streamed in parallel straight into the store, verified on
//! the way (and resumed with `Range` when a connection breaks). The manifest bytes are stored
//! exactly as received, so the image keeps its digest, and the local name is set last.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use strata_oci::sync::MutexExt;
use strata_oci::{Descriptor, Digest, Index, Manifest, Platform, Reference, media_type};
use strata_registry::{BlobData, BlobPush, Client, ClientOptions};
use strata_store::Store;

use crate::error::{Error, Result};
use crate::import::local_name;

/// How many blobs move at once by default.
pub const DEFAULT_PARALLELISM: usize = 4;
/// How many repositories are remembered per blob for mounts.
const MAX_RECORDED_REPOS: usize = 16;

/// Where a blob stands, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobState {
    /// Asking the registry (push) or the store (pull) whether it is needed.
    Checking,
    /// Bytes are moving.
    Transferring,
    /// The other side had it.
    Skipped,
    /// Mounted from another repository.
    Mounted,
    /// Transferred.
    Done,
}

/// One progress event of one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobProgress {
    pub digest: Digest,
    /// Bytes moved so far.
    pub done: u64,
    /// The blob's size.
    pub total: u64,
    pub state: BlobState,
}

/// Receives progress events; called from several threads.
pub type ProgressFn = dyn Fn(&BlobProgress) + Send + Sync;

/// How to push.
#[derive(Clone)]
pub struct PushOptions {
    /// How to reach the registry (auth, `insecure`, retries, chunking).
    pub client: ClientOptions,
    /// Repositories of the same registry to try mounting blobs from, before those recorded.
    pub mount_from: Vec<String>,
    /// Blobs moved at once.
    pub parallelism: usize,
    pub progress: Option<Arc<ProgressFn>>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            client: ClientOptions::default(),
            mount_from: Vec::new(),
            parallelism: DEFAULT_PARALLELISM,
            progress: None,
        }
    }
}

impl std::fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOptions")
            .field("client", &self.client)
            .field("mount_from", &self.mount_from)
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

/// How to pull.
#[derive(Clone)]
pub struct PullOptions {
    /// How to reach the registry (auth, `insecure`, retries).
    pub client: ClientOptions,
    /// The platform to pick from an index.
    pub platform: Platform,
    /// Blobs moved at once.
    pub parallelism: usize,
    pub progress: Option<Arc<ProgressFn>>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            client: ClientOptions::default(),
            platform: Platform::host(),
            parallelism: DEFAULT_PARALLELISM,
            progress: None,
        }
    }
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("client", &self.client)
            .field("platform", &self.platform)
            .field("parallelism", &self.parallelism)
            .finish_non_exhaustive()
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// Where it went, pinned to the digest of what the tag now points at.
    pub reference: Reference,
    /// The descriptor of the pushed manifest or index.
    pub descriptor: Descriptor,
    /// Blobs the repository already had.
    pub blobs_skipped: usize,
    /// Blobs mounted from another repository.
    pub blobs_mounted: usize,
    /// Blobs uploaded.
    pub blobs_uploaded: usize,
    /// Bytes sent in blob uploads (resent bytes included).
    pub bytes_uploaded: u64,
    /// Uploads that broke and went on (from the registry's offset, or from scratch in a new
    /// session when the registry could not say).
    pub uploads_resumed: u32,
    /// Manifests (and index) put.
    pub manifests_pushed: usize,
    /// The local name is a multi-platform index whose other platforms are not in the store, so
    /// only the host platform's image was pushed.
    pub platform_only: bool,
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// The local name set (`debian:12`, `127.0.0.1:5000/org/app:1`).
    pub name: String,
    /// What the name points at: the registry's index when the reference named one (the store
    /// resolves it to the host's image), else the manifest.
    pub descriptor: Descriptor,
    /// The image manifest pulled.
    pub manifest: Descriptor,
    /// Blobs the store already had.
    pub blobs_present: usize,
    /// Blobs downloaded.
    pub blobs_fetched: usize,
    /// Bytes received for blobs (resent bytes included).
    pub bytes_downloaded: u64,
    /// Broken downloads that were resumed.
    pub resumed: u32,
}

/// Until `Error` has a variant of its own for registry errors, they are reported as image
/// errors naming the reference (the registry error's text is kept whole).
fn registry_error(reference: &Reference) -> impl Fn(strata_registry::Error) -> Error + '_ {
    move |source| Error::Registry {
        reference: reference.to_string(),
        source: Box::new(source),
    }
}

fn runtime(reference: &Reference) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Image {
            name: reference.to_string(),
            reason: format!("cannot start the async runtime: {e}"),
        })
}

fn remote_registry(reference: &Reference) -> Result<&str> {
    reference.registry().ok_or_else(|| Error::Image {
        name: reference.to_string(),
        reason: "a registry reference needs a registry host".to_string(),
    })
}

/// Run `work` on `items` with up to `workers` threads; stops handing out work after the first
/// error, which is returned.
fn parallel<T: Send, R: Send>(
    items: Vec<T>,
    workers: usize,
    work: impl Fn(T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let n = workers.max(1).min(items.len().max(1));
    let queue = Mutex::new(items.into_iter());
    let results = Mutex::new(Vec::new());
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let next = queue.lock_ok().next();
                    let Some(item) = next else { break };
                    let r = work(item);
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    results.lock_ok().push(r);
                }
            });
        }
    });
    results.into_inner_ok().into_iter().collect()
}

fn cache_key(registry: &str, digest: &Digest) -> String {
    format!("registry-blob/{registry}/{digest}")
}

/// Repositories of `registry` this store knows to have `digest`.
pub fn known_repositories(store: &Store, registry: &str, digest: &Digest) -> Result<Vec<String>> {
    let Some(v) = store.cache_get(&cache_key(registry, digest))? else {
        return Ok(Vec::new());
    };
    // A damaged entry is only a missed optimization.
    Ok(serde_json::from_str(&v).unwrap_or_default())
}

/// Remember that `repo` of `registry` has `digest` (most recent first, bounded).
pub fn record_repository(store: &Store, registry: &str, digest: &Digest, repo: &str) -> Result<()> {
    let mut repos = known_repositories(store, registry, digest)?;
    if repos.first().map(String::as_str) == Some(repo) {
        return Ok(());
    }
    repos.retain(|r| r != repo);
    repos.insert(0, repo.to_string());
    repos.truncate(MAX_RECORDED_REPOS);
    let v = serde_json::to_string(&repos).map_err(|e| Error::Image {
        name: repo.to_string(),
        reason: e.to_string(),
    })?;
    store.cache_put(&cache_key(registry, digest), &v)?;
    Ok(())
}

fn namespace(repo: &str) -> Option<&str> {
    repo.split_once('/').map(|(ns, _)| ns)
}

/// One manifest to push and the blobs it needs.
struct ManifestToPush {
    bytes: Vec<u8>,
    descriptor: Descriptor,
    blobs: Vec<Descriptor>,
}

fn blobs_of(manifest: &Manifest) -> Vec<Descriptor> {
    std::iter::once(&manifest.config)
        .chain(&manifest.layers)
        // Foreign layers live elsewhere (their `urls`); registries refuse them.
        .filter(|d| {
            !media_type::is_foreign_layer(&d.media_type)
                && d.urls.as_ref().is_none_or(|u| u.is_empty())
        })
        .cloned()
        .collect()
}

fn parse_manifest(name: &str, bytes: &[u8]) -> Result<Manifest> {
    Manifest::from_slice(bytes).map_err(|e| Error::Image {
        name: name.to_string(),
        reason: format!("bad manifest: {e}"),
    })
}

/// Push the store's image `local` (a local name such as `app:1`) to `dest`
/// (`registry/repo:tag`). Returns what moved.
pub fn push(
    store: &Store,
    local: &str,
    dest: &Reference,
    opts: &PushOptions,
) -> Result<PushReport> {
    let name = local_name(local)?;
    let desc = store
        .find_ref(&name)?
        .ok_or_else(|| strata_store::Error::RefNotFound { name: name.clone() })?;
    push_descriptor(store, &name, desc, dest, opts)
}

/// [`push`] of the manifest or index `desc` of the store (`name` says what it is in errors),
/// named or not: what a build cache's manifest is pushed with.
pub fn push_descriptor(
    store: &Store,
    name: &str,
    desc: Descriptor,
    dest: &Reference,
    opts: &PushOptions,
) -> Result<PushReport> {
    let name = name.to_string();
    remote_registry(dest)?;
    let top_bytes = store.read_descriptor(&desc)?;

    // What to push: one manifest, or every child of an index and then the index.
    let mut children: Vec<ManifestToPush> = Vec::new();
    let mut top = ManifestToPush {
        bytes: top_bytes,
        descriptor: desc.clone(),
        blobs: Vec::new(),
    };
    let mut platform_only = false;
    if media_type::is_index(&desc.media_type) {
        let idx = Index::from_slice(&top.bytes).map_err(|e| Error::Image {
            name: name.clone(),
            reason: format!("bad index: {e}"),
        })?;
        let all_local = idx.manifests.iter().all(|d| store.has_blob(&d.digest));
        if all_local {
            for d in &idx.manifests {
                let bytes = store.read_descriptor(d)?;
                let m = parse_manifest(&name, &bytes)?;
                children.push(ManifestToPush {
                    blobs: blobs_of(&m),
                    bytes,
                    descriptor: d.clone(),
                });
            }
        } else {
            let image = store.image(&name)?;
            platform_only = true;
            top = ManifestToPush {
                blobs: blobs_of(&image.manifest),
                bytes: image.manifest_bytes,
                descriptor: image.descriptor,
            };
        }
    } else {
        let m = parse_manifest(&name, &top.bytes)?;
        top.blobs = blobs_of(&m);
    }
    let mut report = push_manifests(store, &name, children, top, &[], dest, opts)?;
    report.platform_only = platform_only;
    Ok(report)
}

/// Push an image made here but not stored (`parts`: its config and manifest in memory), as a
/// rebase of an image that only a registry holds makes it. Each layer is pushed from the store
/// when it has it; a layer it lacks must be in `dest`'s repository already or be mounted there
/// from one of `opts.mount_from` (the repositories the image and its new base came from).
pub fn push_parts(
    store: &Store,
    parts: &strata_store::ImageParts,
    dest: &Reference,
    opts: &PushOptions,
) -> Result<PushReport> {
    let manifest = parse_manifest(&dest.to_string(), &parts.manifest_bytes)?;
    let top = ManifestToPush {
        bytes: parts.manifest_bytes.clone(),
        descriptor: parts.manifest.clone(),
        blobs: blobs_of(&manifest),
    };
    let config = (parts.config.clone(), parts.config_bytes.clone());
    push_manifests(
        store,
        &parts.manifest.digest.to_string(),
        Vec::new(),
        top,
        &[config],
        dest,
        opts,
    )
}

/// Where a blob to push comes from.
enum Source {
    /// Its bytes are here (a config made but not stored).
    Memory(bytes::Bytes),
    /// The store has it.
    Store,
    /// Neither: it must be in the destination repository already, or be mounted there.
    Registry,
}

/// Pushes `children` (an index's manifests), then `top`, with every blob they name: blobs of
/// `memory` from there, the others from the store or already in the registry. `name` says
/// what is pushed in errors.
fn push_manifests(
    store: &Store,
    name: &str,
    children: Vec<ManifestToPush>,
    top: ManifestToPush,
    memory: &[(Descriptor, Vec<u8>)],
    dest: &Reference,
    opts: &PushOptions,
) -> Result<PushReport> {
    let registry = remote_registry(dest)?.to_string();
    let repo = dest.repository().to_string();
    let mut blobs: Vec<(Descriptor, Source)> = Vec::new();
    let mut seen = BTreeSet::new();
    for d in children
        .iter()
        .chain(std::iter::once(&top))
        .flat_map(|m| &m.blobs)
    {
        if seen.insert(d.digest.clone()) {
            let source = match memory.iter().find(|(m, _)| m.digest == d.digest) {
                Some((_, bytes)) => Source::Memory(bytes::Bytes::from(bytes.clone())),
                None if store.has_blob(&d.digest) => Source::Store,
                None => Source::Registry,
            };
            blobs.push((d.clone(), source));
        }
    }

    let rt = runtime(dest)?;
    let to_err = registry_error(dest);
    let client = Client::new(&registry, opts.client.clone()).map_err(&to_err)?;
    // A blob this store lacks may already be in the destination (a build cache's export names
    // layers other builders pushed; a registry-only rebase keeps the image's layers), or be
    // mounted from a repository named in `mount_from`; anything else missing is an error
    // before any upload.
    let mut outcomes = Vec::new();
    let mut to_push = Vec::new();
    for (d, source) in blobs {
        if !matches!(source, Source::Registry) {
            to_push.push((d, source));
            continue;
        }
        let report = |state| {
            if let Some(p) = &opts.progress {
                p(&BlobProgress {
                    digest: d.digest.clone(),
                    done: d.size,
                    total: d.size,
                    state,
                });
            }
        };
        let there = rt
            .block_on(client.head_blob(&repo, &d.digest))
            .map_err(&to_err)?;
        if there.is_some() {
            report(BlobState::Skipped);
            outcomes.push(BlobPush::Exists);
            continue;
        }
        // Where to mount it from: the caller's repositories, then those this store knows
        // have it (a build that left a layer in its registry cache recorded that one).
        let mut sources: Vec<String> = opts.mount_from.clone();
        for r in known_repositories(store, &registry, &d.digest)? {
            if !sources.contains(&r) {
                sources.push(r);
            }
        }
        let mut mounted = None;
        for from in sources.iter().filter(|f| **f != repo) {
            match rt.block_on(client.mount_blob(&repo, &d.digest, from)) {
                Ok(strata_registry::Mount::Mounted) => {
                    mounted = Some(from.clone());
                    break;
                }
                Ok(strata_registry::Mount::Upload(session)) => {
                    rt.block_on(client.cancel_upload(&repo, &session));
                }
                // Not there or not ours to read: try the next (as `Client::push_blob` does).
                Err(
                    strata_registry::Error::Denied { .. }
                    | strata_registry::Error::NotFound { .. }
                    | strata_registry::Error::Unauthorized { .. },
                ) => {}
                Err(e) => return Err(to_err(e)),
            }
        }
        match mounted {
            Some(from) => {
                report(BlobState::Mounted);
                outcomes.push(BlobPush::Mounted { from });
            }
            None if sources.is_empty() => {
                return Err(strata_store::Error::BlobNotFound {
                    digest: d.digest.clone(),
                }
                .into());
            }
            None => {
                return Err(Error::Image {
                    name: name.to_string(),
                    reason: format!(
                        "blob {} is neither in the store nor in {registry}/{repo} nor in {}",
                        d.digest,
                        sources.join(", ")
                    ),
                });
            }
        }
    }
    let bytes_uploaded = AtomicU64::new(0);
    let pushed = parallel(
        to_push,
        opts.parallelism,
        |(d, source): (Descriptor, Source)| {
            let report = |done: u64, state: BlobState| {
                if let Some(p) = &opts.progress {
                    p(&BlobProgress {
                        digest: d.digest.clone(),
                        done,
                        total: d.size,
                        state,
                    });
                }
            };
            report(0, BlobState::Checking);
            let mut candidates: Vec<String> = opts.mount_from.clone();
            for r in known_repositories(store, &registry, &d.digest)? {
                let same_ns = namespace(&repo).is_none() || namespace(&r) == namespace(&repo);
                if same_ns && r != repo && !candidates.contains(&r) {
                    candidates.push(r);
                }
            }
            candidates.truncate(4);
            let progress = transferring(&opts.progress, &d);
            let data = match source {
                Source::Memory(bytes) => BlobData::Bytes(bytes),
                _ => BlobData::File(store.blob_path(&d.digest)),
            };
            let outcome = rt
                .block_on(client.push_blob(
                    &repo,
                    &d.digest,
                    d.size,
                    &data,
                    &candidates,
                    progress.as_ref(),
                ))
                .map_err(&to_err)?;
            match &outcome {
                BlobPush::Exists => report(d.size, BlobState::Skipped),
                BlobPush::Mounted { .. } => report(d.size, BlobState::Mounted),
                BlobPush::Uploaded { bytes_sent, .. } => {
                    bytes_uploaded.fetch_add(*bytes_sent, Ordering::Relaxed);
                    report(d.size, BlobState::Done);
                }
            }
            record_repository(store, &registry, &d.digest, &repo)?;
            Ok(outcome)
        },
    )?;
    outcomes.extend(pushed);

    let mut manifests_pushed = 0;
    for m in &children {
        rt.block_on(client.put_manifest(
            &repo,
            &m.descriptor.digest.to_string(),
            &m.bytes,
            &m.descriptor.media_type,
        ))
        .map_err(&to_err)?;
        manifests_pushed += 1;
    }
    let target = match (dest.tag(), dest.digest()) {
        (Some(t), _) => t.to_string(),
        (None, Some(d)) => {
            if *d != top.descriptor.digest {
                return Err(Error::Image {
                    name: dest.to_string(),
                    reason: format!(
                        "`{name}` is {}, not the digest the destination names",
                        top.descriptor.digest
                    ),
                });
            }
            d.to_string()
        }
        (None, None) => strata_oci::reference::DEFAULT_TAG.to_string(),
    };
    let digest = rt
        .block_on(client.put_manifest(&repo, &target, &top.bytes, &top.descriptor.media_type))
        .map_err(&to_err)?;
    manifests_pushed += 1;

    let count = |f: fn(&BlobPush) -> bool| outcomes.iter().filter(|o| f(o)).count();
    Ok(PushReport {
        reference: dest.without_digest().with_digest(digest),
        descriptor: top.descriptor,
        blobs_skipped: count(|o| matches!(o, BlobPush::Exists)),
        blobs_mounted: count(|o| matches!(o, BlobPush::Mounted { .. })),
        blobs_uploaded: count(|o| matches!(o, BlobPush::Uploaded { .. })),
        bytes_uploaded: bytes_uploaded.load(Ordering::Relaxed),
        uploads_resumed: outcomes
            .iter()
            .map(|o| match o {
                BlobPush::Uploaded { resumed, .. } => *resumed,
                _ => 0,
            })
            .sum(),
        manifests_pushed,
        platform_only: false,
    })
}

/// The local name a pulled `src` gets: the way Docker shows it (`debian:12`,
/// `ghcr.io/org/app:1`); a reference by digest alone keeps the digest (`app@sha256:…`).
pub fn pulled_name(src: &Reference) -> Result<String> {
    if src.tag().is_some() {
        local_name(&src.without_digest().familiar())
    } else {
        local_name(&src.familiar())
    }
}

/// Pull `src` (`registry/repo:tag` or `@digest`) into the store and name it
/// [`pulled_name`]`(src)`. Blobs the store has are not fetched.
pub fn pull(store: &Store, src: &Reference, opts: &PullOptions) -> Result<PullReport> {
    let src = src.to_remote();
    let registry = remote_registry(&src)?.to_string();
    let repo = src.repository().to_string();
    let name = pulled_name(&src)?;
    let reference = match (src.digest(), src.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => strata_oci::reference::DEFAULT_TAG.to_string(),
    };
    let rt = runtime(&src)?;
    let to_err = registry_error(&src);
    let client = Client::new(&registry, opts.client.clone()).map_err(&to_err)?;
    let resolved = rt
        .block_on(client.resolve_image(&repo, &reference, &opts.platform))
        .map_err(&to_err)?;

    // From the first blob written until the name is set, gc must keep away.
    let _session = store.write_session()?;
    let blobs = blobs_of(&resolved.parsed);
    let mut missing = Vec::new();
    let mut blobs_present = 0;
    let mut seen = BTreeSet::new();
    for d in blobs {
        if !seen.insert(d.digest.clone()) {
            continue;
        }
        let have = store.has_blob(&d.digest) && store.blob_size(&d.digest).ok() == Some(d.size);
        if have {
            blobs_present += 1;
            if let Some(p) = &opts.progress {
                p(&BlobProgress {
                    digest: d.digest.clone(),
                    done: d.size,
                    total: d.size,
                    state: BlobState::Skipped,
                });
            }
        } else {
            missing.push(d);
        }
    }
    let blobs_fetched = missing.len();
    let fetched = parallel(missing, opts.parallelism, |d: Descriptor| {
        let progress = transferring(&opts.progress, &d);
        let mut writer = store.blob_writer_with(d.digest.algorithm())?;
        let got = rt
            .block_on(client.fetch_blob(
                &repo,
                &d.digest,
                Some(d.size),
                &mut writer,
                progress.as_ref(),
            ))
            .map_err(&to_err)?;
        writer.commit(Some((&d.digest, Some(d.size))))?;
        if let Some(p) = &opts.progress {
            p(&BlobProgress {
                digest: d.digest.clone(),
                done: d.size,
                total: d.size,
                state: BlobState::Done,
            });
        }
        Ok(got)
    })?;

    let manifest =
        store.put_manifest_bytes(&resolved.manifest.bytes, &resolved.manifest.media_type)?;
    let descriptor = match &resolved.index {
        Some(idx) => store.put_manifest_bytes(&idx.bytes, &idx.media_type)?,
        None => manifest.clone(),
    };
    store.set_ref(&name, descriptor.clone())?;
    for d in blobs_of(&resolved.parsed) {
        record_repository(store, &registry, &d.digest, &repo)?;
    }
    Ok(PullReport {
        name,
        descriptor,
        manifest,
        blobs_present,
        blobs_fetched,
        bytes_downloaded: fetched.iter().map(|f| f.bytes_received).sum(),
        resumed: fetched.iter().map(|f| f.resumed).sum(),
    })
}

/// The largest image config [`fetch_image`] reads (configs are a few KB; this bounds what a
/// manifest that claims a huge one can make us hold in memory).
const MAX_CONFIG_SIZE: u64 = 8 << 20;

/// The image `src` names, resolved to `opts.platform`, as its manifest and config only: no
/// layer is fetched and nothing is stored. What a rebase of an image that only a registry
/// holds reads of it, of its old base and of its new one.
pub fn fetch_image(src: &Reference, opts: &PullOptions) -> Result<strata_store::Image> {
    let src = src.to_remote();
    let registry = remote_registry(&src)?.to_string();
    let repo = src.repository().to_string();
    let reference = match (src.digest(), src.tag()) {
        (Some(d), _) => d.to_string(),
        (None, Some(t)) => t.to_string(),
        (None, None) => strata_oci::reference::DEFAULT_TAG.to_string(),
    };
    let rt = runtime(&src)?;
    let to_err = registry_error(&src);
    let client = Client::new(&registry, opts.client.clone()).map_err(&to_err)?;
    let resolved = rt
        .block_on(client.resolve_image(&repo, &reference, &opts.platform))
        .map_err(&to_err)?;
    let config = &resolved.parsed.config;
    if config.size > MAX_CONFIG_SIZE {
        return Err(Error::Image {
            name: src.to_string(),
            reason: format!(
                "its config {} is {} bytes, more than the {MAX_CONFIG_SIZE} an image config may be",
                config.digest, config.size
            ),
        });
    }
    let mut config_bytes = Vec::new();
    rt.block_on(client.fetch_blob(
        &repo,
        &config.digest,
        Some(config.size),
        &mut config_bytes,
        None,
    ))
    .map_err(&to_err)?;
    Ok(strata_store::Image {
        descriptor: resolved.manifest.descriptor(),
        manifest_bytes: resolved.manifest.bytes,
        manifest: resolved.parsed,
        config_bytes,
        index: resolved.index.map(|i| i.descriptor()),
    })
}

/// The registry client's byte counter for blob `d`, reported as `Transferring` progress.
fn transferring(
    progress: &Option<Arc<ProgressFn>>,
    d: &Descriptor,
) -> Option<Arc<strata_registry::Progress>> {
    progress.as_ref().map(|p| {
        let p = Arc::clone(p);
        let digest = d.digest.clone();
        let total = d.size;
        Arc::new(move |done: u64| {
            p(&BlobProgress {
                digest: digest.clone(),
                done,
                total,
                state: BlobState::Transferring,
            })
        }) as Arc<strata_registry::Progress>
    })
}
