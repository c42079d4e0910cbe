//! Manifests: get (exact bytes, verified), resolve an index to a platform, head, put.

use reqwest::header;
use strata_oci::{Descriptor, Digest, Manifest, ManifestOrIndex, Platform, media_type};

use crate::client::{Client, at, header_str, pull_scope, push_scope};
use crate::error::{Error, Result};

/// Manifests larger than this are refused (the distribution spec asks registries to accept at
/// least 4 MiB; anything larger is not an image manifest we can use).
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// Every manifest type we can use, for `Accept`.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest or index as the registry sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteManifest {
    /// The exact bytes (their digest is [`RemoteManifest::digest`], checked).
    pub bytes: Vec<u8>,
    /// The media type (`Content-Type`, else the document's `mediaType`, else its shape).
    pub media_type: String,
    /// The digest of `bytes`.
    pub digest: Digest,
}

impl RemoteManifest {
    /// Its descriptor.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            self.media_type.clone(),
            self.digest.clone(),
            self.bytes.len() as u64,
        )
    }

    /// Whether it is an index / manifest list.
    pub fn is_index(&self) -> bool {
        media_type::is_index(&self.media_type)
    }
}

/// An image resolved to one platform.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The index the reference named, when it named one.
    pub index: Option<RemoteManifest>,
    /// The image manifest (chosen from the index for the platform, or named directly).
    pub manifest: RemoteManifest,
    /// `manifest` parsed.
    pub parsed: Manifest,
}

impl ResolvedImage {
    /// What the reference itself names: the index if there is one, else the manifest.
    pub fn top(&self) -> &RemoteManifest {
        self.index.as_ref().unwrap_or(&self.manifest)
    }
}

fn essence(ct: &str) -> String {
    ct.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

impl Client {
    /// `GET` the manifest `reference` (a tag or a digest) of `repo`, keeping its exact bytes.
    /// The bytes must hash to the digest when `reference` is one, and to the registry's
    /// `Docker-Content-Digest` when it sends that.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<RemoteManifest> {
        let what = format!("GET manifest {}", at(repo, reference));
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let resp = self
            .send(&what, &[pull_scope(repo)], true, || {
                self.http.get(&url).header(header::ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        if resp.status().as_u16() != 200 {
            return Err(self.error_for(resp, &what).await);
        }
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST_SIZE as u64)
        {
            return Err(self.protocol(
                &what,
                format!("manifest larger than {MAX_MANIFEST_SIZE} bytes"),
            ));
        }
        let content_type = header_str(resp.headers(), "content-type").map(essence);
        let header_digest = header_str(resp.headers(), "docker-content-digest")
            .and_then(|d| d.trim().parse::<Digest>().ok());
        let mut resp = resp;
        let mut bytes = Vec::new();
        while let Some(chunk) = self.chunk_within(&mut resp, &what).await? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_MANIFEST_SIZE {
                return Err(self.protocol(
                    &what,
                    format!("manifest larger than {MAX_MANIFEST_SIZE} bytes"),
                ));
            }
        }
        let requested: Option<Digest> = reference.parse().ok();
        for expected in requested.iter().chain(header_digest.iter()) {
            let actual = Digest::of(expected.algorithm(), &bytes);
            if actual != *expected {
                return Err(Error::DigestMismatch {
                    what: format!("{}/{repo}: manifest `{reference}`", self.registry),
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        let digest = requested.unwrap_or_else(|| Digest::sha256(&bytes));
        let parsed =
            ManifestOrIndex::from_slice(&bytes, content_type.as_deref()).map_err(|source| {
                Error::Manifest {
                    registry: self.registry.clone(),
                    repository: repo.to_string(),
                    reference: reference.to_string(),
                    source: Box::new(source),
                }
            })?;
        // The document's own type when the header is missing or generic; from_slice has
        // checked that they agree otherwise.
        let media_type = match content_type {
            Some(ct) if media_type::is_manifest(&ct) || media_type::is_index(&ct) => ct,
            _ => parsed.media_type().to_string(),
        };
        Ok(RemoteManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Get `reference` and, if it is an index, the entry for `platform` (an index of one entry
    /// without platform counts as that image).
    pub async fn resolve_image(
        &self,
        repo: &str,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        let top = self.get_manifest(repo, reference).await?;
        let bad = |source| Error::Manifest {
            registry: self.registry.clone(),
            repository: repo.to_string(),
            reference: reference.to_string(),
            source: Box::new(source),
        };
        match ManifestOrIndex::from_slice(&top.bytes, Some(&top.media_type)).map_err(bad)? {
            ManifestOrIndex::Manifest(m) => Ok(ResolvedImage {
                index: None,
                manifest: top,
                parsed: m,
            }),
            ManifestOrIndex::Index(idx) => {
                let chosen = idx.for_platform(platform).cloned().or_else(|| {
                    match idx.manifests.as_slice() {
                        [only] if only.platform.is_none() => Some(only.clone()),
                        _ => None,
                    }
                });
                let Some(chosen) = chosen else {
                    let available: Vec<String> = idx
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                        .collect();
                    return Err(Error::NoMatchingPlatform {
                        registry: self.registry.clone(),
                        repository: repo.to_string(),
                        reference: reference.to_string(),
                        platform: platform.to_string(),
                        available: if available.is_empty() {
                            "none".to_string()
                        } else {
                            available.join(", ")
                        },
                    });
                };
                let manifest = self.get_manifest(repo, &chosen.digest.to_string()).await?;
                if manifest.bytes.len() as u64 != chosen.size {
                    return Err(self.protocol(
                        &format!("GET manifest {repo}@{}", chosen.digest),
                        format!(
                            "the index says {} bytes, the registry sent {}",
                            chosen.size,
                            manifest.bytes.len()
                        ),
                    ));
                }
                let parsed =
                    match ManifestOrIndex::from_slice(&manifest.bytes, Some(&manifest.media_type))
                        .map_err(bad)?
                    {
                        ManifestOrIndex::Manifest(m) => m,
                        ManifestOrIndex::Index(_) => {
                            return Err(self.protocol(
                                &format!("GET manifest {repo}@{}", chosen.digest),
                                "an index inside an index is not an image",
                            ));
                        }
                    };
                Ok(ResolvedImage {
                    index: Some(top),
                    manifest,
                    parsed,
                })
            }
        }
    }

    /// `HEAD` a manifest: its descriptor if it exists, `None` if not. When the registry does not
    /// send `Docker-Content-Digest`, the manifest is fetched to compute it.
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Result<Option<Descriptor>> {
        let what = format!("HEAD manifest {}", at(repo, reference));
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let resp = self
            .send(&what, &[pull_scope(repo)], true, || {
                self.http.head(&url).header(header::ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.error_for(resp, &what).await),
        }
        let digest = header_str(resp.headers(), "docker-content-digest")
            .and_then(|d| d.trim().parse::<Digest>().ok());
        let ct = header_str(resp.headers(), "content-type").map(essence);
        let size = resp.content_length();
        match (digest, ct, size) {
            (Some(d), Some(ct), Some(size))
                if media_type::is_manifest(&ct) || media_type::is_index(&ct) =>
            {
                Ok(Some(Descriptor::new(ct, d, size)))
            }
            _ => Ok(Some(self.get_manifest(repo, reference).await?.descriptor())),
        }
    }

    /// `PUT` manifest `bytes` as `reference` (a tag, or its digest) in `repo`; returns its digest.
    /// Every blob and child manifest it references must already be in `repo`.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest> {
        let what = format!("PUT manifest {}", at(repo, reference));
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let body = bytes::Bytes::copy_from_slice(bytes);
        let resp = self
            .send(&what, &[push_scope(repo)], true, || {
                self.http
                    .put(&url)
                    .header(header::CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        if resp.status().as_u16() != 201 {
            return Err(self.error_for(resp, &what).await);
        }
        let ours = Digest::sha256(bytes);
        if let Some(d) = header_str(resp.headers(), "docker-content-digest")
            && let Ok(theirs) = d.trim().parse::<Digest>()
            && theirs.algorithm() == ours.algorithm()
            && theirs != ours
        {
            return Err(Error::DigestMismatch {
                what: format!("{}/{repo}: pushed manifest `{reference}`", self.registry),
                expected: ours,
                actual: theirs,
            });
        }
        Ok(ours)
    }
}
