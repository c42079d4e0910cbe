//! Mark and sweep: keep what a tag, an index, a referrer or a pin reaches; remove the rest.
//!
//! Roots, per repository: every tag's manifest, every pinned manifest, and every manifest or
//! link younger than the grace period (a push in progress uploads blobs and index children before
//! the manifest or tag that makes them reachable). From the roots: an index marks its children,
//! a manifest its config and layers, and a marked manifest marks the manifests whose `subject`
//! it is (referrers: signatures, SBOMs). Unmarked manifests and links are removed from their
//! repository; a blob that no repository still reaches is deleted from storage.
//!
//! Online, on any replica: one gc at a time holds a lease in the metadata store (renewed while
//! it runs; a gc that loses it deletes nothing more). Pushes go on meanwhile. Every write that
//! makes a digest reachable (an upload's closing `PUT`, a mount, a manifest `PUT` for itself
//! and all it names, a pin) first records the use (`Meta::protect`: in flight, used at T),
//! then checks whether gc is deleting the digest and waits until it is not, then checks the
//! digest exists and writes, and finally records the use again (`Meta::done`). Gc, after
//! its mark, records every digest it is about to delete, then reads the uses (in flight, or
//! at or after the time its mark began) and the pins again, marks again from what they reach,
//! and deletes only what is left. Both sides write before they read in one database, so at
//! least one sees the other: gc sees the use and keeps the digest, or the writer sees the
//! deletion, waits for it to end and finds the digest gone (and says so: `BLOB_UNKNOWN`). A
//! write that gc's listing missed recorded its use either in flight or after the mark began.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use strata_oci::{Digest, ManifestOrIndex};

use crate::error::{Error, Result};
use crate::registry::{Registry, RepoKey, blob_key};
use crate::util;

/// What a gc run removed (or, with `dry_run`, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Whether this was a dry run (nothing removed).
    pub dry_run: bool,
    /// Manifests removed from a repository: `(repository, digest)`.
    pub manifests_removed: Vec<(String, Digest)>,
    /// Blob links removed from a repository.
    pub links_removed: Vec<(String, Digest)>,
    /// Blobs deleted from storage.
    pub blobs_removed: Vec<Digest>,
    /// Bytes of the deleted blobs.
    pub bytes_freed: u64,
    /// Abandoned upload sessions removed.
    pub uploads_removed: Vec<String>,
    /// Manifests kept, over all repositories.
    pub manifests_kept: usize,
    /// Blobs kept in storage.
    pub blobs_kept: usize,
}

#[derive(Default)]
struct RepoState {
    /// Manifest digest → last modified.
    manifests: HashMap<Digest, SystemTime>,
    links: HashMap<Digest, SystemTime>,
    tags: Vec<String>,
    /// (subject, referrer)
    referrers: Vec<(Digest, Digest)>,
}

/// How long a gc's lease lasts without renewal (renewed every third of it).
const LEASE: Duration = Duration::from_secs(30);

struct Lease {
    holder: String,
    mark_start_ms: i64,
    lost: Arc<AtomicBool>,
}

pub(crate) async fn run(
    registry: &Registry,
    grace: Duration,
    upload_grace: Duration,
    dry_run: bool,
) -> Result<GcReport> {
    if dry_run {
        return collect(registry, grace, upload_grace, None).await;
    }
    let meta = registry.meta.clone();
    let holder = format!("gc-{}-{}", std::process::id(), util::random_hex(6));
    let mark_start_ms = meta.gc_acquire(&holder, LEASE).await?;
    let lost = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (meta, holder, lost) = (meta.clone(), holder.clone(), lost.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                if !matches!(meta.gc_renew(&holder, LEASE).await, Ok(true)) {
                    lost.store(true, Ordering::SeqCst);
                    break;
                }
            }
        })
    };
    let lease = Lease {
        holder: holder.clone(),
        mark_start_ms,
        lost,
    };
    let result = collect(registry, grace, upload_grace, Some(&lease)).await;
    renewer.abort();
    let released = meta.gc_release(&holder).await;
    let report = result?;
    released?;
    Ok(report)
}

/// Mark from `roots` within one repository: the manifests and blobs they reach.
async fn mark(
    registry: &Registry,
    repo: &str,
    state: &RepoState,
    roots: Vec<Digest>,
    parsed: &mut HashMap<Digest, Option<ManifestOrIndex>>,
) -> Result<(BTreeSet<Digest>, BTreeSet<Digest>)> {
    let backend = &registry.backend;
    let mut marked_manifests: BTreeSet<Digest> = BTreeSet::new();
    let mut marked_blobs: BTreeSet<Digest> = BTreeSet::new();
    let mut queue = roots;
    loop {
        while let Some(d) = queue.pop() {
            if !state.manifests.contains_key(&d) {
                // A pin or tag of something this repository lacks: keep the blob if linked.
                marked_blobs.insert(d);
                continue;
            }
            if !marked_manifests.insert(d.clone()) {
                continue;
            }
            if !parsed.contains_key(&d) {
                let doc = match backend.get(&blob_key(&d)).await? {
                    Some(bytes) => {
                        let mt = backend
                            .get(&RepoKey::Manifest(repo.to_string(), d.clone()).key())
                            .await?
                            .map(|b| String::from_utf8_lossy(&b).into_owned());
                        ManifestOrIndex::from_slice(&bytes, mt.as_deref()).ok()
                    }
                    None => None,
                };
                parsed.insert(d.clone(), doc);
            }
            match parsed.get(&d) {
                Some(Some(ManifestOrIndex::Manifest(m))) => {
                    marked_blobs.insert(m.config.digest.clone());
                    marked_blobs.extend(m.layers.iter().map(|l| l.digest.clone()));
                }
                Some(Some(ManifestOrIndex::Index(i))) => {
                    queue.extend(i.manifests.iter().map(|c| c.digest.clone()));
                }
                _ => {}
            }
        }
        // Referrers of what is marked are marked too; repeat until nothing new.
        for (subject, r) in &state.referrers {
            if marked_manifests.contains(subject) && !marked_manifests.contains(r) {
                queue.push(r.clone());
            }
        }
        if queue.is_empty() {
            break;
        }
    }
    Ok((marked_manifests, marked_blobs))
}

async fn collect(
    registry: &Registry,
    grace: Duration,
    upload_grace: Duration,
    lease: Option<&Lease>,
) -> Result<GcReport> {
    let dry_run = lease.is_none();
    let backend = &registry.backend;
    let now = SystemTime::now();
    let young = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO) < grace;

    let mut repos: BTreeMap<String, RepoState> = BTreeMap::new();
    for o in backend.list("repos/").await? {
        let Some(k) = RepoKey::parse(&o.key) else {
            continue;
        };
        match k {
            RepoKey::Link(r, d) => {
                repos.entry(r).or_default().links.insert(d, o.modified);
            }
            RepoKey::Manifest(r, d) => {
                repos.entry(r).or_default().manifests.insert(d, o.modified);
            }
            RepoKey::Tag(r, t) => repos.entry(r).or_default().tags.push(t),
            RepoKey::Referrer(r, s, d) => repos.entry(r).or_default().referrers.push((s, d)),
        }
    }
    let pins = registry.meta.pins().await?;

    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    // Blobs (and manifests, which are blobs too) that some repository keeps.
    let mut keep: BTreeSet<Digest> = BTreeSet::new();
    // Parsed manifests, shared across repositories.
    let mut parsed: HashMap<Digest, Option<ManifestOrIndex>> = HashMap::new();
    // Per repository: manifests and links to remove.
    let mut doomed: BTreeMap<String, (Vec<Digest>, Vec<Digest>)> = BTreeMap::new();

    for (repo, state) in &repos {
        let mut roots: Vec<Digest> = Vec::new();
        for t in &state.tags {
            if let Some(d) = registry.resolve_tag(repo, t).await? {
                roots.push(d);
            }
        }
        roots.extend(
            pins.iter()
                .filter(|p| &p.repo == repo)
                .map(|p| p.digest.clone()),
        );
        roots.extend(
            state
                .manifests
                .iter()
                .filter(|(_, t)| young(**t))
                .map(|(d, _)| d.clone()),
        );
        let (marked_manifests, marked_blobs) =
            mark(registry, repo, state, roots, &mut parsed).await?;
        let entry = doomed.entry(repo.clone()).or_default();
        for d in state.manifests.keys() {
            if marked_manifests.contains(d) {
                keep.insert(d.clone());
            } else {
                entry.0.push(d.clone());
            }
        }
        for (d, t) in &state.links {
            if marked_blobs.contains(d) || young(*t) {
                keep.insert(d.clone());
            } else {
                entry.1.push(d.clone());
            }
        }
        // Reachable blobs stay even if their link was deleted through the API.
        keep.extend(marked_blobs);
    }
    let mut blobs: Vec<(Digest, u64)> = Vec::new();
    for o in backend.list("blobs/").await? {
        let Some(d) = o.key.replacen('/', ":", 1).parse::<Digest>().ok() else {
            continue;
        };
        if keep.contains(&d) || young(o.modified) {
            report.blobs_kept += 1;
        } else {
            blobs.push((d, o.size));
        }
    }

    let mut marked_deleting: Vec<String> = Vec::new();
    if let Some(lease) = lease {
        // Announce the deletions, then look at the uses writers announced: see the module docs.
        let mut all: BTreeSet<String> = blobs.iter().map(|(d, _)| d.to_string()).collect();
        for (manifests, links) in doomed.values() {
            all.extend(manifests.iter().chain(links).map(|d| d.to_string()));
        }
        marked_deleting = all.into_iter().collect();
        registry.meta.gc_mark_deleting(&marked_deleting).await?;
        let used: BTreeSet<Digest> = registry
            .meta
            .used_since(lease.mark_start_ms)
            .await?
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect();
        let pins = registry.meta.pins().await?;
        let mut rescued = used.clone();
        for (repo, state) in &repos {
            let roots: Vec<Digest> = used
                .iter()
                .filter(|d| state.manifests.contains_key(*d))
                .cloned()
                .chain(
                    pins.iter()
                        .filter(|p| &p.repo == repo)
                        .map(|p| p.digest.clone()),
                )
                .collect();
            if roots.is_empty() {
                continue;
            }
            let (manifests, blobs) = mark(registry, repo, state, roots, &mut parsed).await?;
            if let Some((m, l)) = doomed.get_mut(repo) {
                m.retain(|d| !manifests.contains(d));
                l.retain(|d| !blobs.contains(d));
            }
            rescued.extend(manifests);
            rescued.extend(blobs);
        }
        for (manifests, links) in doomed.values_mut() {
            manifests.retain(|d| !rescued.contains(d));
            links.retain(|d| !rescued.contains(d));
        }
        let before = blobs.len();
        blobs.retain(|(d, _)| !rescued.contains(d));
        report.blobs_kept += before - blobs.len();
        // Nothing is deleted without the lease: another gc may have taken over.
        if lease.lost.load(Ordering::SeqCst)
            || !registry.meta.gc_renew(&lease.holder, LEASE).await?
        {
            return Err(Error::GcLeaseLost);
        }
    }

    for (repo, (manifests, links)) in &doomed {
        let state = &repos[repo];
        report.manifests_kept += state.manifests.len() - manifests.len();
        for d in manifests {
            report.manifests_removed.push((repo.clone(), d.clone()));
            if !dry_run {
                registry.delete_manifest(repo, d).await?;
            }
        }
        for (subject, r) in &state.referrers {
            if dry_run {
                break;
            }
            let gone = manifests.contains(r)
                || (!state.manifests.contains_key(r) && !registry.has_manifest(repo, r).await?);
            if gone {
                // Entries whose manifest is gone (delete_manifest removes them when it can
                // parse the manifest; this catches the rest).
                backend
                    .delete(&RepoKey::Referrer(repo.clone(), subject.clone(), r.clone()).key())
                    .await?;
            }
        }
        for d in links {
            report.links_removed.push((repo.clone(), d.clone()));
            if !dry_run {
                registry.unlink_blob(repo, d).await?;
            }
        }
    }
    for (d, size) in blobs {
        report.bytes_freed += size;
        if !dry_run {
            backend.delete(&blob_key(&d)).await?;
        }
        report.blobs_removed.push(d);
    }
    if let Some(lease) = lease {
        registry.meta.gc_clear_deleting(&marked_deleting).await?;
        registry.meta.trim_touches(lease.mark_start_ms).await?;
    }
    report.uploads_removed = registry.clean_uploads(upload_grace, dry_run).await?;
    Ok(report)
}
