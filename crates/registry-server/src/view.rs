//! A read-only view of a registry for people (the web dashboard's Registry page): its
//! repositories, their tags with digests and sizes, and what pins each image, limited to one
//! org when the viewer signed in with that org's token.

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_oci::Digest;

use crate::config::ServerConfig;
use crate::error::Result;
use crate::meta::Meta;
use crate::registry::Registry;

/// One image of a repository: a tag, or a pinned digest no tag names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    /// The tag, `None` for a pinned digest without one.
    pub tag: Option<String>,
    pub digest: Digest,
    /// The manifest's media type.
    pub media_type: String,
    /// Bytes a pull moves: the manifest, its config and layers (an index: its own bytes and
    /// its children's manifests').
    pub size: u64,
    /// Who pins it (`deploy:APP`, a machine id, …), sorted.
    pub pinned_by: Vec<String>,
}

/// A repository and its images, tags first (sorted), then untagged pinned digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRow {
    pub name: String,
    pub images: Vec<ImageRow>,
}

/// The registry as the dashboard reads it. Cheap to clone.
#[derive(Clone)]
pub struct RegistryView {
    meta: Arc<Meta>,
    registry: Arc<Registry>,
}

impl RegistryView {
    /// Opens the registry `config` describes (the same storage and database `serve` uses).
    pub async fn open(config: &ServerConfig) -> Result<RegistryView> {
        let parts = crate::open_parts(config).await?;
        Ok(RegistryView {
            meta: parts.meta,
            registry: parts.registry,
        })
    }

    /// The org whose API token `token` is (any scope), `None` for a wrong or revoked one.
    pub async fn token_org(&self, token: &str) -> Result<Option<String>> {
        Ok(self.meta.check_token(token).await?.map(|p| p.org))
    }

    /// Every org, sorted.
    pub async fn orgs(&self) -> Result<Vec<String>> {
        self.meta.orgs().await
    }

    /// The repositories `org` owns (`<org>/…`), or every one for `None`, with their images.
    pub async fn repositories(&self, org: Option<&str>) -> Result<Vec<RepoRow>> {
        let prefix = org.map(|o| format!("{o}/"));
        let visible = |repo: &str| prefix.as_deref().is_none_or(|p| repo.starts_with(p));
        let mut pins: BTreeMap<(String, Digest), Vec<String>> = BTreeMap::new();
        for p in self.meta.pins().await? {
            if visible(&p.repo) {
                pins.entry((p.repo, p.digest)).or_default().push(p.holder);
            }
        }
        let mut repos = Vec::new();
        for name in self.registry.catalog().await? {
            if !visible(&name) {
                continue;
            }
            let mut images = Vec::new();
            let mut tagged = std::collections::HashSet::new();
            for tag in self.registry.tags(&name).await? {
                let Some(digest) = self.registry.resolve_tag(&name, &tag).await? else {
                    continue; // deleted since the listing
                };
                tagged.insert(digest.clone());
                if let Some(row) = self.image(&name, Some(tag), digest, &pins).await? {
                    images.push(row);
                }
            }
            let untagged: Vec<Digest> = pins
                .keys()
                .filter(|(r, d)| r == &name && !tagged.contains(d))
                .map(|(_, d)| d.clone())
                .collect();
            for digest in untagged {
                if let Some(row) = self.image(&name, None, digest, &pins).await? {
                    images.push(row);
                }
            }
            repos.push(RepoRow { name, images });
        }
        Ok(repos)
    }

    async fn image(
        &self,
        repo: &str,
        tag: Option<String>,
        digest: Digest,
        pins: &BTreeMap<(String, Digest), Vec<String>>,
    ) -> Result<Option<ImageRow>> {
        let Some(m) = self.registry.get_manifest(repo, &digest).await? else {
            return Ok(None);
        };
        let size = m.bytes.len() as u64 + self.referenced_size(repo, &m.bytes, 0).await?;
        let mut pinned_by = pins
            .get(&(repo.to_string(), digest.clone()))
            .cloned()
            .unwrap_or_default();
        pinned_by.sort();
        Ok(Some(ImageRow {
            tag,
            digest,
            media_type: m.media_type,
            size,
            pinned_by,
        }))
    }

    /// The sizes a manifest's descriptors name: config and layers, or (an index) each
    /// child manifest with what it names in turn. Unreadable JSON counts nothing.
    async fn referenced_size(&self, repo: &str, bytes: &[u8], depth: u8) -> Result<u64> {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return Ok(0);
        };
        let size = |d: &serde_json::Value| d.get("size").and_then(|s| s.as_u64()).unwrap_or(0);
        let mut total = v.get("config").map_or(0, size);
        for l in v
            .get("layers")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
        {
            total += size(l);
        }
        // An index's children (one level: an index of indexes is not worth a deeper walk).
        if depth == 0 {
            for m in v
                .get("manifests")
                .and_then(|l| l.as_array())
                .into_iter()
                .flatten()
            {
                total += size(m);
                let child = m
                    .get("digest")
                    .and_then(|d| d.as_str())
                    .and_then(|d| d.parse::<Digest>().ok());
                if let Some(child) = child
                    && let Some(cm) = self.registry.get_manifest(repo, &child).await?
                {
                    total += Box::pin(self.referenced_size(repo, &cm.bytes, 1)).await?;
                }
            }
        }
        Ok(total)
    }
}
