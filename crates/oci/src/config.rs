//! The image configuration (OCI image spec `config.md`) as a superset that keeps Docker's fields.
//!
//! Every object keeps the keys it does not model in an `extra` map, so a config read and written
//! again loses no data. One normalization happens: a known field that is JSON `null` (Docker
//! writes `"Cmd": null`, `"Volumes": null`) reads as absent and is not written back; unknown keys
//! keep their `null`s.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{Digest, Error, Platform};

/// Keys an object had that the model does not know, kept for the round trip.
pub type Extra = BTreeMap<String, Value>;

/// An image configuration: platform, runtime defaults, layer diff IDs and history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// RFC 3339 creation time, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// GOARCH value, e.g. `amd64`. Required by the spec; read as empty when missing.
    #[serde(default)]
    pub architecture: String,
    /// GOOS value, e.g. `linux`. Required by the spec; read as empty when missing.
    #[serde(default)]
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
    /// Defaults for containers run from the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<History>>,
    /// Docker's `container`, `container_config`, `docker_version`, … and anything newer.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ImageConfig {
    /// Parse a config blob.
    pub fn from_slice(bytes: &[u8]) -> Result<ImageConfig, Error> {
        serde_json::from_slice(bytes).map_err(|source| Error::Json {
            what: "image config".to_string(),
            source,
        })
    }

    /// The config as canonical JSON (sorted keys, no whitespace), ready to be stored as a blob.
    pub fn to_canonical_json(&self) -> Result<Vec<u8>, Error> {
        crate::try_to_canonical_json(self)
    }

    /// The platform this image is for.
    pub fn platform(&self) -> Platform {
        Platform {
            architecture: self.architecture.clone(),
            os: self.os.clone(),
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
            variant: self.variant.clone(),
        }
    }

    /// The layer diff IDs, bottom layer first.
    pub fn diff_ids(&self) -> &[Digest] {
        &self.rootfs.diff_ids
    }

    /// The container defaults, created empty if the config had none.
    pub fn config_mut(&mut self) -> &mut ContainerConfig {
        self.config.get_or_insert_with(ContainerConfig::default)
    }
}

/// Runtime defaults (`config` in the image config). Field names are Docker's PascalCase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `"8080/tcp": {}` entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, EmptyObject>>,
    /// `KEY=value` entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_list"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_list"
    )]
    pub cmd: Option<Vec<String>>,
    /// `"/data": {}` entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, EmptyObject>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Windows-only in Docker; kept for the round trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthConfig>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "string_or_list"
    )]
    pub shell: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// Docker's `Hostname`, `Domainname`, `AttachStdin`, `Image`, … and anything newer.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A health check (Docker's `Healthcheck`); durations are nanoseconds as Docker writes them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The layer list of an image: `type` is `layers`, `diff_ids` the uncompressed layer digests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    /// Docker omits this for an image without layers, so absent and `null` read as empty.
    /// Always written, as the OCI spec requires it.
    #[serde(default, deserialize_with = "null_as_default")]
    pub diff_ids: Vec<Digest>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".to_string(),
            diff_ids: Vec::new(),
            extra: Extra::new(),
        }
    }
}

/// One entry of an image's history, bottom first; `empty_layer` entries made no layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Kept as read (Docker omits it when false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_layer: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl History {
    /// Whether this step produced no layer.
    pub fn is_empty_layer(&self) -> bool {
        self.empty_layer == Some(true)
    }
}

/// The `{}` value of `ExposedPorts` and `Volumes` entries; keeps any keys it may carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EmptyObject {
    #[serde(flatten)]
    pub extra: Extra,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Docker's `StrSlice`: old images wrote `"Cmd": "/bin/sh"`, read as `["/bin/sh"]`.
fn string_or_list<'de, D>(d: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrSlice {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<StrSlice>::deserialize(d)? {
        None => None,
        Some(StrSlice::One(s)) => Some(vec![s]),
        Some(StrSlice::Many(v)) => Some(v),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config the way `docker build` (classic builder) writes one, trimmed, plus keys from the
    /// future at every level.
    const DOCKER_CONFIG: &str = r##"{
  "architecture": "amd64",
  "config": {
    "Hostname": "",
    "Domainname": "",
    "User": "app",
    "AttachStdin": false,
    "AttachStdout": false,
    "ExposedPorts": {"8080/tcp": {}, "9090/udp": {"Future": 1}},
    "Tty": false,
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "A=b c"],
    "Cmd": null,
    "Healthcheck": {"Test": ["CMD-SHELL", "curl -f http://localhost/ || exit 1"], "Interval": 30000000000, "Retries": 3, "FutureHc": "x"},
    "Image": "sha256:2b7a3e3b2c3c3e0f3bb0a1a3b1c7d5d6f1f0e1e2e3e4e5e6e7e8e9eaebecedee",
    "Volumes": {"/data": {}},
    "WorkingDir": "/srv",
    "Entrypoint": ["/bin/app", "--serve"],
    "OnBuild": null,
    "Labels": {"org.opencontainers.image.source": "https://example.com/app", "maintainer": "me"},
    "StopSignal": "SIGTERM",
    "Shell": ["/bin/bash", "-c"],
    "NullUnknown": null
  },
  "container": "3f4e5d6c7b8a",
  "container_config": {"Hostname": "3f4e5d6c7b8a", "Cmd": ["/bin/sh", "-c", "#(nop) ", "CMD [\"/bin/app\"]"]},
  "created": "2024-05-01T12:34:56.123456789Z",
  "docker_version": "24.0.7",
  "history": [
    {"created": "2024-04-30T00:00:00Z", "created_by": "/bin/sh -c #(nop) ADD file:abc in / "},
    {"created": "2024-04-30T00:00:01Z", "created_by": "/bin/sh -c #(nop)  CMD [\"bash\"]", "empty_layer": true, "future_history": [1, 2]},
    {"created": "2024-05-01T12:34:56Z", "created_by": "COPY app /bin/app # buildkit", "comment": "buildkit.dockerfile.v0", "empty_layer": false}
  ],
  "os": "linux",
  "rootfs": {
    "type": "layers",
    "diff_ids": [
      "sha256:1111111111111111111111111111111111111111111111111111111111111111",
      "sha256:2222222222222222222222222222222222222222222222222222222222222222"
    ],
    "future_rootfs": true
  },
  "variant": "v2",
  "future_top": {"nested": {"b": 1, "a": null}}
}"##;

    /// Remove the `null`s of fields the model knows (they read as absent, by design).
    fn without_known_nulls(mut v: Value) -> Value {
        let config = v.get_mut("config").and_then(Value::as_object_mut).unwrap();
        config.remove("Cmd");
        config.remove("OnBuild");
        v
    }

    #[test]
    fn docker_config_round_trips_without_loss() {
        let cfg = ImageConfig::from_slice(DOCKER_CONFIG.as_bytes()).unwrap();
        let c = cfg.config.as_ref().unwrap();
        assert_eq!(c.cmd, None, "Cmd: null reads as absent");
        assert_eq!(c.on_build, None);
        assert_eq!(c.user.as_deref(), Some("app"));
        assert_eq!(c.entrypoint.as_deref().unwrap(), ["/bin/app", "--serve"]);
        assert_eq!(c.healthcheck.as_ref().unwrap().retries, Some(3));
        assert_eq!(
            c.healthcheck.as_ref().unwrap().interval,
            Some(30_000_000_000)
        );
        assert!(c.exposed_ports.as_ref().unwrap().contains_key("8080/tcp"));
        assert_eq!(c.extra["Hostname"], Value::String(String::new()));
        assert_eq!(c.extra["NullUnknown"], Value::Null);
        assert_eq!(cfg.diff_ids().len(), 2);
        assert_eq!(cfg.extra["docker_version"], "24.0.7");
        let h = cfg.history.as_ref().unwrap();
        assert!(!h[0].is_empty_layer() && h[1].is_empty_layer() && !h[2].is_empty_layer());
        assert_eq!(h[2].empty_layer, Some(false));
        assert_eq!(cfg.platform().to_string(), "linux/amd64/v2");

        // Written canonically, it is exactly the canonical form of the input (minus known nulls).
        let ours = cfg.to_canonical_json().unwrap();
        let input: Value = serde_json::from_str(DOCKER_CONFIG).unwrap();
        let expected = crate::to_canonical_json(&without_known_nulls(input));
        assert_eq!(
            String::from_utf8(ours.clone()).unwrap(),
            String::from_utf8(expected).unwrap()
        );
        // And reading that again changes nothing.
        let again = ImageConfig::from_slice(&ours).unwrap();
        assert_eq!(again, cfg);
        assert_eq!(again.to_canonical_json().unwrap(), ours);
    }

    #[test]
    fn old_and_minimal_configs_read() {
        // Docker omits diff_ids for a layerless image; very old images have a string Cmd.
        let cfg = ImageConfig::from_slice(
            br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers"},
                "config":{"Cmd":"/bin/sh","Entrypoint":null,"Env":null}}"#,
        )
        .unwrap();
        assert!(cfg.diff_ids().is_empty());
        let c = cfg.config.as_ref().unwrap();
        assert_eq!(c.cmd.as_deref().unwrap(), ["/bin/sh"]);
        assert_eq!(c.entrypoint, None);
        // The OCI spec requires diff_ids, so we always write it.
        let out = String::from_utf8(cfg.to_canonical_json().unwrap()).unwrap();
        assert!(
            out.contains(r#""rootfs":{"diff_ids":[],"type":"layers"}"#),
            "{out}"
        );

        let err =
            ImageConfig::from_slice(br#"{"rootfs":{"type":"layers","diff_ids":["sha256:x"]}}"#)
                .unwrap_err();
        assert!(err.to_string().contains("invalid image config"), "{err}");
    }
}
