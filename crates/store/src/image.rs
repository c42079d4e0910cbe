//! Images: manifests and indexes in, a resolved (manifest, config) pair out.

use serde::Serialize;
use strata_oci::{Descriptor, Digest, Index, Manifest, Platform, media_type};

use crate::Store;
use crate::error::{Error, Result};

/// How many index levels [`Store::image`] follows before calling it a loop.
const MAX_INDEX_DEPTH: usize = 4;

/// An image resolved to one platform: its manifest and config, both read and verified.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest's descriptor (for a multi-platform ref: the entry chosen from the index).
    pub descriptor: Descriptor,
    /// The manifest exactly as stored.
    pub manifest_bytes: Vec<u8>,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The config exactly as stored.
    pub config_bytes: Vec<u8>,
    /// The descriptor the ref points at when that is an index, `None` for a plain manifest.
    pub index: Option<Descriptor>,
}

/// An image made here, serialized as [`Store::put_image`] stores it: its config as canonical
/// JSON and an OCI manifest of that config and its layers. (A rebase of an image that only a
/// registry holds pushes these without storing them: the store lacks its layers.)
#[derive(Debug, Clone)]
pub struct ImageParts {
    /// The config's descriptor and bytes.
    pub config: Descriptor,
    pub config_bytes: Vec<u8>,
    /// The manifest's descriptor and bytes.
    pub manifest: Descriptor,
    pub manifest_bytes: Vec<u8>,
}

impl ImageParts {
    /// `config` and an OCI manifest of it, `layers` and `annotations`.
    pub fn new(
        config: &strata_oci::ImageConfig,
        layers: Vec<Descriptor>,
        annotations: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<ImageParts> {
        let config_bytes = config.to_canonical_json()?;
        let config = Descriptor::new(
            media_type::OCI_CONFIG,
            Digest::sha256(&config_bytes),
            config_bytes.len() as u64,
        );
        let manifest_bytes = to_json(&Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config: config.clone(),
            layers,
            subject: None,
            annotations,
        })?;
        let manifest = Descriptor::new(
            media_type::OCI_MANIFEST,
            Digest::sha256(&manifest_bytes),
            manifest_bytes.len() as u64,
        );
        Ok(ImageParts {
            config,
            config_bytes,
            manifest,
            manifest_bytes,
        })
    }
}

impl Store {
    /// Store a manifest (serialized by us) whose config and layers are already in the store;
    /// returns its descriptor. The media type is the manifest's own, or the OCI one.
    pub fn put_manifest(&self, manifest: &Manifest) -> Result<Descriptor> {
        let mt = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| media_type::OCI_MANIFEST.to_string());
        self.put_manifest_bytes(&to_json(manifest)?, &mt)
    }

    /// Store an image made here ([`ImageParts::new`]: `config` as canonical JSON, an OCI
    /// manifest of it and `layers`, already in the store, with `annotations`); returns the
    /// manifest's descriptor and the config's. What a build, a rebase and an import all end
    /// with.
    pub fn put_image(
        &self,
        config: &strata_oci::ImageConfig,
        layers: Vec<Descriptor>,
        annotations: Option<std::collections::BTreeMap<String, String>>,
    ) -> Result<(Descriptor, Descriptor)> {
        let parts = ImageParts::new(config, layers, annotations)?;
        self.put_image_parts(&parts)?;
        Ok((parts.manifest, parts.config))
    }

    /// Store `parts` (their layers already in the store), config first.
    pub fn put_image_parts(&self, parts: &ImageParts) -> Result<()> {
        self.put_blob_bytes(&parts.config_bytes, Some(&parts.config.digest))?;
        self.put_manifest_bytes(&parts.manifest_bytes, &parts.manifest.media_type)?;
        Ok(())
    }

    /// Store an index (serialized by us); returns its descriptor.
    pub fn put_index(&self, index: &Index) -> Result<Descriptor> {
        let mt = index
            .media_type
            .clone()
            .unwrap_or_else(|| media_type::OCI_INDEX.to_string());
        self.put_manifest_bytes(&to_json(index)?, &mt)
    }

    /// Store manifest or index bytes exactly as given (as received from a registry, say).
    ///
    /// For a manifest media type the bytes must parse as a manifest whose config and
    /// (non-foreign) layers are in the store; for an index they must parse as an index (its
    /// manifests may be absent: a pull fetches only the host's platform). A `mediaType` field
    /// inside must agree with `media_type`. Nothing is stored when a check fails.
    pub fn put_manifest_bytes(&self, bytes: &[u8], media_type: &str) -> Result<Descriptor> {
        let digest = Digest::sha256(bytes);
        if media_type::is_manifest(media_type) {
            let m: Manifest = parse_json(bytes, &digest, "manifest")?;
            check_inner_media_type(m.media_type.as_deref(), media_type, &digest)?;
            for d in std::iter::once(&m.config).chain(&m.layers) {
                let foreign = d.urls.as_ref().is_some_and(|u| !u.is_empty());
                if !foreign && !self.has_blob(&d.digest) {
                    return Err(Error::MissingReferencedBlob {
                        manifest: digest,
                        digest: d.digest.clone(),
                    });
                }
            }
        } else if media_type::is_index(media_type) {
            let i: Index = parse_json(bytes, &digest, "index")?;
            check_inner_media_type(i.media_type.as_deref(), media_type, &digest)?;
        }
        let (digest, size) = self.put_blob_bytes(bytes, Some(&digest))?;
        Ok(Descriptor::new(media_type, digest, size))
    }

    /// The image `name` refers to, resolved to the host platform if it is an index.
    pub fn image(&self, name: &str) -> Result<Image> {
        self.image_for(name, &Platform::host())
    }

    /// The image `name` refers to, resolved to `platform` if it is an index. `name` may also
    /// be `name@sha256:…` or a bare digest: the digest names the manifest (or index) in the
    /// store, whatever the name's tags point to now, as `docker inspect app@sha256:…` does.
    pub fn image_for(&self, name: &str, platform: &Platform) -> Result<Image> {
        let desc = self.find_ref(name)?.ok_or_else(|| Error::RefNotFound {
            name: name.to_string(),
        })?;
        self.resolve_image(name, desc, platform)
    }

    /// What `name` names: a ref of the store (`app:1`), or the manifest or index that
    /// `app@sha256:…` or a bare `sha256:…` pins, when the store has that blob, or the one
    /// named image whose digest starts with `name` (at least 4 hex digits, with or without
    /// `sha256:`: the short digest `strata images` shows, as `docker run` takes an image ID
    /// prefix; a name is looked up first). Every command that takes an image resolves it so,
    /// so a digest works wherever a name does.
    pub fn find_ref(&self, name: &str) -> Result<Option<Descriptor>> {
        if let Some(d) = self.get_ref(name)? {
            return Ok(Some(d));
        }
        let digest_part = name.rsplit_once('@').map_or(name, |(_, d)| d);
        let Ok(digest) = digest_part.parse::<Digest>() else {
            return self.find_by_digest_prefix(name);
        };
        if !self.has_blob(&digest) {
            return Ok(None);
        }
        let bytes = self.read_blob(&digest)?;
        let declared = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_string));
        let media_type = match (declared, sniff(&bytes)) {
            (Some(mt), _) if media_type::is_manifest(&mt) || media_type::is_index(&mt) => mt,
            (_, Some(Kind::Manifest)) => media_type::OCI_MANIFEST.to_string(),
            (_, Some(Kind::Index)) => media_type::OCI_INDEX.to_string(),
            // A config or layer digest is not an image.
            (_, None) => return Ok(None),
        };
        Ok(Some(Descriptor::new(
            media_type,
            digest,
            bytes.len() as u64,
        )))
    }

    /// The named image whose manifest digest starts with the hex digits `prefix` (optionally
    /// after `sha256:`); an error when several images match.
    fn find_by_digest_prefix(&self, prefix: &str) -> Result<Option<Descriptor>> {
        // Commands spell a name without a tag as `NAME:latest` before looking it up.
        let prefix = prefix.strip_suffix(":latest").unwrap_or(prefix);
        if !is_digest_prefix(prefix) {
            return Ok(None);
        }
        unique_by_digest_prefix(prefix, self.list_refs()?.into_iter().map(|(_, d)| d))
    }

    /// Resolve a manifest or index descriptor (not necessarily named) to an image for
    /// `platform`; `name` is only used in errors.
    pub fn resolve_image(
        &self,
        name: &str,
        desc: Descriptor,
        platform: &Platform,
    ) -> Result<Image> {
        let mut desc = desc;
        let mut index = None;
        for _ in 0..=MAX_INDEX_DEPTH {
            let bytes = self.read_descriptor(&desc)?;
            let kind = if media_type::is_manifest(&desc.media_type) {
                Kind::Manifest
            } else if media_type::is_index(&desc.media_type) {
                Kind::Index
            } else {
                sniff(&bytes).ok_or_else(|| Error::NotAnImage {
                    name: name.to_string(),
                    digest: desc.digest.clone(),
                    media_type: desc.media_type.clone(),
                })?
            };
            match kind {
                Kind::Manifest => {
                    let manifest: Manifest = parse_json(&bytes, &desc.digest, "manifest")?;
                    let config_bytes = self.read_descriptor(&manifest.config)?;
                    return Ok(Image {
                        descriptor: desc,
                        manifest_bytes: bytes,
                        manifest,
                        config_bytes,
                        index,
                    });
                }
                Kind::Index => {
                    let idx: Index = parse_json(&bytes, &desc.digest, "index")?;
                    let chosen = idx.for_platform(platform).cloned().or_else(|| {
                        // An index of one entry without a platform (common for single-image
                        // OCI archives) means "this image".
                        match idx.manifests.as_slice() {
                            [only] if only.platform.is_none() => Some(only.clone()),
                            _ => None,
                        }
                    });
                    let Some(chosen) = chosen else {
                        return Err(Error::NoMatchingPlatform {
                            name: name.to_string(),
                            digest: desc.digest,
                            platform: platform.to_string(),
                        });
                    };
                    if index.is_none() {
                        index = Some(desc);
                    }
                    desc = chosen;
                }
            }
        }
        Err(Error::IndexTooDeep {
            name: name.to_string(),
            depth: MAX_INDEX_DEPTH,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Manifest,
    Index,
}

/// Guess manifest vs index from the JSON when the media type does not say (Docker and OCI both
/// allow omitting it in some places).
pub(crate) fn sniff(bytes: &[u8]) -> Option<Kind> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let mt = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
    if media_type::is_manifest(mt) || (v.get("config").is_some() && v.get("layers").is_some()) {
        Some(Kind::Manifest)
    } else if media_type::is_index(mt) || v.get("manifests").is_some() {
        Some(Kind::Index)
    } else {
        None
    }
}

/// Our own manifests are canonical JSON, so equal content always has one digest.
fn to_json(value: &impl Serialize) -> Result<Vec<u8>> {
    strata_oci::try_to_canonical_json(value).map_err(|e| match e {
        strata_oci::Error::Serialize(source) => Error::Serialize {
            what: "manifest",
            source,
        },
        other => Error::Serialize {
            what: "manifest",
            source: <serde_json::Error as serde::ser::Error>::custom(other),
        },
    })
}

pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    digest: &Digest,
    what: &'static str,
) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadJson {
        digest: digest.clone(),
        what,
        reason: e.to_string(),
    })
}

fn check_inner_media_type(inner: Option<&str>, outer: &str, digest: &Digest) -> Result<()> {
    match inner {
        Some(inner) if inner != outer => Err(Error::BadJson {
            digest: digest.clone(),
            what: "manifest",
            reason: format!("its mediaType is `{inner}` but it was stored as `{outer}`"),
        }),
        _ => Ok(()),
    }
}

/// Whether `s` can be a short digest: 4 to 63 lowercase hex digits, maybe after `sha256:`.
fn is_digest_prefix(s: &str) -> bool {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    (4..64).contains(&hex.len())
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The one descriptor of `candidates` whose digest starts with `prefix` (several refs to one
/// image are one match); an error when different images do.
fn unique_by_digest_prefix(
    prefix: &str,
    candidates: impl IntoIterator<Item = Descriptor>,
) -> Result<Option<Descriptor>> {
    let hex = prefix.strip_prefix("sha256:").unwrap_or(prefix);
    let mut found: Vec<Descriptor> = Vec::new();
    for d in candidates {
        if d.digest.hex().starts_with(hex) && !found.iter().any(|f| f.digest == d.digest) {
            found.push(d);
        }
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        n => Err(Error::AmbiguousDigest {
            prefix: prefix.to_string(),
            count: n,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_short_digest_names_the_one_image_it_starts() {
        let desc = |hex: &str| {
            Descriptor::new(
                media_type::OCI_MANIFEST,
                format!("sha256:{hex:0<64}").parse().unwrap(),
                1,
            )
        };
        let images = [desc("abcd1"), desc("abcd2"), desc("abcd2"), desc("ffff")];
        let one = unique_by_digest_prefix("abcd2", images.clone())
            .unwrap()
            .unwrap();
        assert_eq!(
            one.digest, images[1].digest,
            "two refs to one image are one match"
        );
        let sha = unique_by_digest_prefix("sha256:ffff", images.clone()).unwrap();
        assert_eq!(sha.unwrap().digest, images[3].digest);
        assert!(
            unique_by_digest_prefix("0123", images.clone())
                .unwrap()
                .is_none()
        );
        let e = unique_by_digest_prefix("abcd", images)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`abcd`") && e.contains("2 images"), "{e}");
        for not in ["abc", "ABCD", "abcg", "app", "sha256:ab", &"a".repeat(64)] {
            assert!(!is_digest_prefix(not), "{not}");
        }
        assert!(is_digest_prefix("a38ad865294c") && is_digest_prefix("sha256:a38a"));
    }
}
