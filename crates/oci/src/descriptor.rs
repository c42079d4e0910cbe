//! Descriptors, manifests, indexes and platforms (OCI image spec `descriptor.md`, `manifest.md`,
//! `image-index.md`), which also read Docker v2 schema 2 manifests and manifest lists.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, Error, media_type};

/// Annotation key that names a manifest in an OCI layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A content descriptor: what a blob is, its digest and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl Descriptor {
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest,
            size,
            urls: None,
            annotations: None,
            platform: None,
            artifact_type: None,
            data: None,
        }
    }

    /// The `org.opencontainers.image.ref.name` annotation, if any.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .as_ref()?
            .get(ANNOTATION_REF_NAME)
            .map(String::as_str)
    }
}

/// An image's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in GOOS/GOARCH terms as images use them.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            architecture: architecture.to_string(),
            os: "linux".to_string(),
            os_version: None,
            os_features: None,
            variant: if architecture == "arm64" {
                Some("v8".to_string())
            } else {
                None
            },
        }
    }

    /// Whether an image for `self` runs on `want` (variant compared only when both set).
    pub fn satisfies(&self, want: &Platform) -> bool {
        self.os == want.os
            && self.architecture == want.architecture
            && match (&self.variant, &want.variant) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI, or Docker v2 schema 2 which has the same shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Index {
    /// An empty OCI index.
    pub fn new() -> Index {
        Index {
            schema_version: 2,
            media_type: Some(crate::media_type::OCI_INDEX.to_string()),
            artifact_type: None,
            manifests: Vec::new(),
            subject: None,
            annotations: None,
        }
    }

    /// The entry for `platform`, if this index has one.
    pub fn for_platform(&self, platform: &Platform) -> Option<&Descriptor> {
        self.manifests.iter().find(|d| {
            d.platform.as_ref().is_some_and(|p| p.satisfies(platform))
                && crate::media_type::is_manifest(&d.media_type)
        })
    }
}

impl Default for Index {
    fn default() -> Self {
        Index::new()
    }
}

impl Manifest {
    /// Parse an image manifest (OCI or Docker v2 schema 2); refuses indexes and schema 1.
    pub fn from_slice(bytes: &[u8]) -> Result<Manifest, Error> {
        match ManifestOrIndex::from_slice(bytes, None)? {
            ManifestOrIndex::Manifest(m) => Ok(m),
            ManifestOrIndex::Index(i) => Err(Error::WrongKind {
                expected: "an image manifest",
                media_type: i
                    .media_type
                    .unwrap_or_else(|| media_type::OCI_INDEX.to_string()),
            }),
        }
    }

    /// The media type this manifest declares, or the OCI one when it declares none.
    pub fn media_type_or_default(&self) -> &str {
        self.media_type
            .as_deref()
            .unwrap_or(media_type::OCI_MANIFEST)
    }
}

impl Index {
    /// Parse an image index or Docker manifest list; refuses single manifests and schema 1.
    pub fn from_slice(bytes: &[u8]) -> Result<Index, Error> {
        match ManifestOrIndex::from_slice(bytes, None)? {
            ManifestOrIndex::Index(i) => Ok(i),
            ManifestOrIndex::Manifest(m) => Err(Error::WrongKind {
                expected: "an image index",
                media_type: m
                    .media_type
                    .unwrap_or_else(|| media_type::OCI_MANIFEST.to_string()),
            }),
        }
    }

    /// The media type this index declares, or the OCI one when it declares none.
    pub fn media_type_or_default(&self) -> &str {
        self.media_type.as_deref().unwrap_or(media_type::OCI_INDEX)
    }
}

/// What a registry or store returns for a manifest reference: one image, or an index of them.
// Not boxed: values are few and short-lived, and plain variants are easier to match on.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestOrIndex {
    /// One image (OCI manifest or Docker v2 schema 2).
    Manifest(Manifest),
    /// Several (OCI index or Docker manifest list).
    Index(Index),
}

impl ManifestOrIndex {
    /// Parse a manifest document. The kind comes from its `mediaType` field, else from
    /// `content_type` (an HTTP `Content-Type` or a descriptor's media type; parameters and generic
    /// JSON types are ignored), else from its shape (`manifests` → index, `config` → manifest).
    /// OCI and Docker v2 schema 2 manifests and lists are accepted; schema 1 is refused.
    pub fn from_slice(bytes: &[u8], content_type: Option<&str>) -> Result<ManifestOrIndex, Error> {
        let probe: Probe = serde_json::from_slice(bytes).map_err(|source| Error::Json {
            what: "manifest".to_string(),
            source,
        })?;
        let declared = probe.media_type.as_deref().filter(|m| !m.is_empty());
        let given = content_type.map(essence).filter(|m| !is_generic(m));
        let media_type = match (declared, given.as_deref()) {
            (Some(d), Some(g)) if d != g => {
                return Err(Error::MediaTypeMismatch {
                    what: "manifest".to_string(),
                    descriptor: g.to_string(),
                    content: d.to_string(),
                });
            }
            (Some(d), _) => d.to_string(),
            (None, Some(g)) => g.to_string(),
            (None, None) => {
                if probe.schema_version == Some(1) || probe.fs_layers.is_some() {
                    media_type::DOCKER_SCHEMA1_MANIFEST.to_string()
                } else if probe.manifests.is_some() {
                    media_type::OCI_INDEX.to_string()
                } else {
                    media_type::OCI_MANIFEST.to_string()
                }
            }
        };
        if media_type::is_schema1(&media_type) || probe.schema_version == Some(1) {
            return Err(Error::Schema1 {
                what: "manifest".to_string(),
                media_type,
            });
        }
        if let Some(v) = probe.schema_version
            && v != 2
        {
            return Err(Error::SchemaVersion {
                what: format!("manifest ({media_type})"),
                found: v,
            });
        }
        let json_err = |what: &str| {
            let what = what.to_string();
            move |source| Error::Json { what, source }
        };
        if media_type::is_manifest(&media_type) {
            serde_json::from_slice(bytes)
                .map(ManifestOrIndex::Manifest)
                .map_err(json_err("image manifest"))
        } else if media_type::is_index(&media_type) {
            serde_json::from_slice(bytes)
                .map(ManifestOrIndex::Index)
                .map_err(json_err("image index"))
        } else {
            Err(Error::UnsupportedMediaType {
                what: "manifest".to_string(),
                media_type,
            })
        }
    }

    /// The media type the document declares, or the OCI type of its kind.
    pub fn media_type(&self) -> &str {
        match self {
            ManifestOrIndex::Manifest(m) => m.media_type_or_default(),
            ManifestOrIndex::Index(i) => i.media_type_or_default(),
        }
    }
}

/// Just enough of a manifest document to tell what it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    fs_layers: Option<serde::de::IgnoredAny>,
}

/// `application/json; charset=utf-8` → `application/json`.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// Content types that say "some JSON" and nothing about the kind of document.
fn is_generic(mt: &str) -> bool {
    matches!(
        mt,
        "" | "application/json" | "application/octet-stream" | "text/plain"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const LAYER: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn docker_manifest() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","size":7023,"digest":"{CFG}"}},
            "layers":[{{"mediaType":"{}","size":32654,"digest":"{LAYER}"}}]}}"#,
            media_type::DOCKER_MANIFEST,
            media_type::DOCKER_CONFIG,
            media_type::DOCKER_LAYER_GZIP
        )
    }

    fn docker_list() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","size":7143,
            "digest":"{CFG}","platform":{{"architecture":"ppc64le","os":"linux"}}}}]}}"#,
            media_type::DOCKER_MANIFEST_LIST,
            media_type::DOCKER_MANIFEST
        )
    }

    #[test]
    fn docker_and_oci_documents_parse_by_media_type() {
        let m = Manifest::from_slice(docker_manifest().as_bytes()).unwrap();
        assert_eq!(m.media_type_or_default(), media_type::DOCKER_MANIFEST);
        assert_eq!(m.layers[0].size, 32654);
        let i = Index::from_slice(docker_list().as_bytes()).unwrap();
        assert_eq!(
            i.manifests[0].platform.as_ref().unwrap().architecture,
            "ppc64le"
        );

        // An OCI manifest without `mediaType`: the Content-Type decides, parameters ignored.
        let bare = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","size":2,"digest":"{CFG}"}},"layers":[]}}"#,
            media_type::OCI_CONFIG
        );
        let got = ManifestOrIndex::from_slice(
            bare.as_bytes(),
            Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
        )
        .unwrap();
        assert!(matches!(got, ManifestOrIndex::Manifest(_)));
        assert_eq!(got.media_type(), media_type::OCI_MANIFEST);
        // Without a Content-Type (or a generic one), the shape decides.
        let got = ManifestOrIndex::from_slice(
            br#"{"schemaVersion":2,"manifests":[]}"#,
            Some("application/json"),
        )
        .unwrap();
        assert!(matches!(got, ManifestOrIndex::Index(_)));
        let got = ManifestOrIndex::from_slice(bare.as_bytes(), None).unwrap();
        assert!(matches!(got, ManifestOrIndex::Manifest(_)));
    }

    #[test]
    fn wrong_kinds_and_schema1_are_refused_clearly() {
        let e = Manifest::from_slice(docker_list().as_bytes()).unwrap_err();
        assert!(matches!(e, Error::WrongKind { .. }), "{e}");
        let e = Index::from_slice(docker_manifest().as_bytes()).unwrap_err();
        assert!(matches!(e, Error::WrongKind { .. }), "{e}");

        let schema1 = br#"{"schemaVersion":1,"name":"library/debian","tag":"7","architecture":"amd64",
            "fsLayers":[{"blobSum":"sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4"}],
            "history":[],"signatures":[]}"#;
        for ct in [None, Some(media_type::DOCKER_SCHEMA1_SIGNED_MANIFEST)] {
            let e = ManifestOrIndex::from_slice(schema1, ct).unwrap_err();
            assert!(matches!(e, Error::Schema1 { .. }), "{e}");
            assert!(e.to_string().contains("schema 1"), "{e}");
        }

        let e = ManifestOrIndex::from_slice(
            docker_manifest().as_bytes(),
            Some(media_type::OCI_MANIFEST),
        )
        .unwrap_err();
        assert!(matches!(e, Error::MediaTypeMismatch { .. }), "{e}");
        let e =
            ManifestOrIndex::from_slice(br#"{"schemaVersion":2,"mediaType":"text/html"}"#, None)
                .unwrap_err();
        assert!(matches!(e, Error::UnsupportedMediaType { .. }), "{e}");
        let e = ManifestOrIndex::from_slice(br#"{"schemaVersion":3,"manifests":[]}"#, None)
            .unwrap_err();
        assert!(matches!(e, Error::SchemaVersion { found: 3, .. }), "{e}");
        let e = Manifest::from_slice(br#"{"schemaVersion":2,"layers":[]}"#).unwrap_err();
        assert!(e.to_string().contains("invalid image manifest"), "{e}");
        let e = Manifest::from_slice(b"not json").unwrap_err();
        assert!(matches!(e, Error::Json { .. }), "{e}");
    }
}
