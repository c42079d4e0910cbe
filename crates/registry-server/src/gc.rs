//! Mark and sweep: keep what a tag, an index, a referrer or a pin reaches; remove the rest.
//!
//! Roots, per repository: every tag's manifest, every pinned manifest, and every manifest or
//! link younger than the grace period (a push in progress uploads blobs and index children before
//! the manifest or tag that makes them reachable). From the roots: an index marks its children,
//! a manifest its config and layers, and a marked manifest marks the manifests whose `subject`
//! it is (referrers: signatures, SBOMs). Unmarked manifests and links are removed from their
//! repository; a blob that no repository still reaches is deleted from storage.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use strata_oci::{Digest, ManifestOrIndex};

use crate::error::Result;
use crate::meta::Pin;
use crate::registry::{Registry, RepoKey, blob_key};

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

pub(crate) async fn run(
    registry: &Registry,
    pins: &[Pin],
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport> {
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

    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };
    // Blobs (and manifests, which are blobs too) that some repository keeps.
    let mut keep: BTreeSet<Digest> = BTreeSet::new();
    // Parsed manifests, shared across repositories.
    let mut parsed: HashMap<Digest, Option<ManifestOrIndex>> = HashMap::new();

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
                                .get(&format!(
                                    "repos/{repo}/_manifests/{}/{}",
                                    d.algorithm().as_str(),
                                    d.hex()
                                ))
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

        for d in state.manifests.keys() {
            if marked_manifests.contains(d) {
                report.manifests_kept += 1;
                keep.insert(d.clone());
                continue;
            }
            report.manifests_removed.push((repo.clone(), d.clone()));
            if !dry_run {
                registry.delete_manifest(repo, d).await?;
            }
        }
        for (subject, r) in &state.referrers {
            if !marked_manifests.contains(r) && !dry_run {
                // Entries whose manifest is gone (delete_manifest removes them when it can
                // parse the manifest; this catches the rest).
                backend
                    .delete(&RepoKey::Referrer(repo.clone(), subject.clone(), r.clone()).key())
                    .await?;
            }
        }
        for (d, t) in &state.links {
            if marked_blobs.contains(d) || young(*t) {
                keep.insert(d.clone());
                continue;
            }
            report.links_removed.push((repo.clone(), d.clone()));
            if !dry_run {
                registry.unlink_blob(repo, d).await?;
            }
        }
        // Reachable blobs stay even if their link was deleted through the API.
        keep.extend(marked_blobs);
    }

    for o in backend.list("blobs/").await? {
        let Some(d) = o.key.replacen('/', ":", 1).parse::<Digest>().ok() else {
            continue;
        };
        if keep.contains(&d) || young(o.modified) {
            report.blobs_kept += 1;
            continue;
        }
        report.bytes_freed += o.size;
        if !dry_run {
            backend.delete(&blob_key(&d)).await?;
        }
        report.blobs_removed.push(d);
    }
    report.uploads_removed = registry.clean_uploads(grace, dry_run).await?;
    Ok(report)
}
