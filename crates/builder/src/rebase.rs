//! `strata rebase`: an image moved onto a new base without rebuilding it. The old base's
//! layers must be exactly the image's first layers (by diff_id); they are replaced by the new
//! base's, the image's own layers are kept byte for byte, and the config is rebuilt: what the
//! image's own instructions set is kept, what it inherited comes from the new base (unlike
//! crane, which keeps the old config and so a stale PATH). No layer bytes are written.

use std::collections::BTreeMap;

use strata_oci::{ContainerConfig, Descriptor, Digest, History, ImageConfig};
use strata_store::{Image, ImageParts, Store};

use crate::error::{Error, Result};

/// Manifest annotation: the base image's name (OCI image-spec annotations).
pub const BASE_NAME: &str = "org.opencontainers.image.base.name";
/// Manifest annotation: the base image's manifest digest.
pub const BASE_DIGEST: &str = "org.opencontainers.image.base.digest";
/// A label an image sets to `false` to refuse being rebased (its steps depend on the base's
/// contents, e.g. they compiled against its libraries).
pub const OPT_OUT_LABEL: &str = "rebase";

/// What [`rebase`] made.
#[derive(Debug, Clone)]
pub struct Rebased {
    /// The new manifest.
    pub descriptor: Descriptor,
    /// Layers taken from the new base, and kept from the image.
    pub base_layers: usize,
    pub own_layers: usize,
    /// The new config and manifest, as stored (or pushed).
    pub parts: ImageParts,
}

fn refuse(image: &str, reason: String) -> Error {
    Error::Usage(format!("cannot rebase `{image}`: {reason}"))
}

/// Moves `image` (named `image_name` in errors) from `old_base` onto `new_base`
/// (`new_base_name` is recorded in the annotation) and stores the result; names nothing.
pub fn rebase(
    store: &Store,
    image_name: &str,
    image: &Image,
    old_base: &Image,
    new_base_name: &str,
    new_base: &Image,
) -> Result<Rebased> {
    let r = rebased(image_name, image, old_base, new_base_name, new_base)?;
    store.put_image_parts(&r.parts)?;
    Ok(r)
}

/// [`rebase`] without the store: the new config and manifest, made from the three images'
/// manifests and configs alone (no layer is read), as a registry-only rebase pushes them.
pub fn rebased(
    image_name: &str,
    image: &Image,
    old_base: &Image,
    new_base_name: &str,
    new_base: &Image,
) -> Result<Rebased> {
    let cfg = ImageConfig::from_slice(&image.config_bytes)?;
    let old = ImageConfig::from_slice(&old_base.config_bytes)?;
    let new = ImageConfig::from_slice(&new_base.config_bytes)?;
    let own_config = cfg.config.clone().unwrap_or_default();
    if own_config
        .labels
        .as_ref()
        .and_then(|l| l.get(OPT_OUT_LABEL))
        .is_some_and(|v| v == "false")
    {
        return Err(refuse(
            image_name,
            format!("it carries the label `{OPT_OUT_LABEL}=false`"),
        ));
    }
    if (cfg.os.as_str(), cfg.architecture.as_str()) != (new.os.as_str(), new.architecture.as_str())
        || cfg.variant != new.variant
    {
        return Err(refuse(
            image_name,
            format!(
                "it is {}/{} and the new base is {}/{}",
                cfg.os, cfg.architecture, new.os, new.architecture
            ),
        ));
    }
    let ids = cfg.diff_ids();
    let old_ids = old.diff_ids();
    if old_ids.len() > ids.len() || ids[..old_ids.len()] != old_ids[..] {
        let at = ids
            .iter()
            .zip(old_ids.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(ids.len().min(old_ids.len()));
        return Err(refuse(
            image_name,
            format!(
                "the old base's layers are not its first layers (they differ at layer {}: the \
                 image has {} layers, the old base {})\nhint: name the base it was built on \
                 with --old-base",
                at + 1,
                ids.len(),
                old_ids.len()
            ),
        ));
    }
    if image.manifest.layers.len() != ids.len()
        || new_base.manifest.layers.len() != new.diff_ids().len()
    {
        return Err(refuse(
            image_name,
            "its manifest and config list different numbers of layers".into(),
        ));
    }
    let own_layers = &image.manifest.layers[old_ids.len()..];
    let own_ids = &ids[old_ids.len()..];

    let mut out = cfg.clone();
    out.rootfs.diff_ids = new.diff_ids().iter().chain(own_ids).cloned().collect();
    out.config = Some(rebased_config(
        &own_config,
        &old.config.clone().unwrap_or_default(),
        &new.config.clone().unwrap_or_default(),
    ));
    let old_history = old.history.clone().unwrap_or_default();
    let own_history: Vec<History> = cfg
        .history
        .clone()
        .unwrap_or_default()
        .into_iter()
        .skip(old_history.len())
        .collect();
    out.history = Some(
        new.history
            .clone()
            .unwrap_or_default()
            .into_iter()
            .chain(own_history)
            .collect(),
    );
    if out.author == old.author {
        out.author = new.author.clone();
    }
    let mut annotations = image.manifest.annotations.clone().unwrap_or_default();
    annotations.insert(BASE_NAME.to_string(), new_base_name.to_string());
    annotations.insert(
        BASE_DIGEST.to_string(),
        new_base.descriptor.digest.to_string(),
    );
    let parts = ImageParts::new(
        &out,
        new_base
            .manifest
            .layers
            .iter()
            .chain(own_layers)
            .cloned()
            .collect(),
        Some(annotations),
    )?;
    Ok(Rebased {
        descriptor: parts.manifest.clone(),
        base_layers: new_base.manifest.layers.len(),
        own_layers: own_layers.len(),
        parts,
    })
}

/// The base digest an image records (`org.opencontainers.image.base.digest`), if any.
pub fn recorded_base(image: &Image) -> Option<Digest> {
    image
        .manifest
        .annotations
        .as_ref()?
        .get(BASE_DIGEST)?
        .parse()
        .ok()
}

/// `own`'s config with what it inherited from `old` replaced by `new`'s: a field (or an Env
/// variable, a label, a port, a volume) equal to the old base's was inherited; anything else
/// the image's own instructions set and is kept.
pub fn rebased_config(
    own: &ContainerConfig,
    old: &ContainerConfig,
    new: &ContainerConfig,
) -> ContainerConfig {
    fn pick<T: Clone + PartialEq>(own: &Option<T>, old: &Option<T>, new: &Option<T>) -> Option<T> {
        if own == old { new.clone() } else { own.clone() }
    }
    fn keyed<V: Clone + PartialEq>(
        own: &Option<BTreeMap<String, V>>,
        old: &Option<BTreeMap<String, V>>,
        new: &Option<BTreeMap<String, V>>,
    ) -> Option<BTreeMap<String, V>> {
        let empty = BTreeMap::new();
        let (o, b) = (
            own.as_ref().unwrap_or(&empty),
            old.as_ref().unwrap_or(&empty),
        );
        let mut out = new.clone().unwrap_or_default();
        for (k, v) in o {
            // Set or changed by the image itself: kept over the new base's.
            if b.get(k) != Some(v) {
                out.insert(k.clone(), v.clone());
            }
        }
        (!out.is_empty() || own.is_some()).then_some(out)
    }
    let split = |env: &Option<Vec<String>>| -> Vec<(String, String)> {
        env.iter()
            .flatten()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (e.clone(), String::new()),
            })
            .collect()
    };
    let (own_env, old_env, new_env) = (split(&own.env), split(&old.env), split(&new.env));
    // The new base's variables in its order, each replaced by the image's value where the
    // image set it; then the image's own variables the new base does not have.
    let set_by_image = |k: &str, v: &str| !old_env.iter().any(|(ok, ov)| ok == k && ov == v);
    let mut env: Vec<(String, String)> = new_env
        .iter()
        .map(|(k, v)| {
            match own_env
                .iter()
                .find(|(ok, ov)| ok == k && set_by_image(ok, ov))
            {
                Some((_, own_v)) => (k.clone(), own_v.clone()),
                None => (k.clone(), v.clone()),
            }
        })
        .collect();
    for (k, v) in &own_env {
        if set_by_image(k, v) && !env.iter().any(|(ek, _)| ek == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    ContainerConfig {
        user: pick(&own.user, &old.user, &new.user),
        exposed_ports: keyed(&own.exposed_ports, &old.exposed_ports, &new.exposed_ports),
        env: (!env.is_empty()).then_some(env),
        entrypoint: pick(&own.entrypoint, &old.entrypoint, &new.entrypoint),
        cmd: pick(&own.cmd, &old.cmd, &new.cmd),
        volumes: keyed(&own.volumes, &old.volumes, &new.volumes),
        working_dir: pick(&own.working_dir, &old.working_dir, &new.working_dir),
        labels: keyed(&own.labels, &old.labels, &new.labels),
        stop_signal: pick(&own.stop_signal, &old.stop_signal, &new.stop_signal),
        args_escaped: own.args_escaped,
        healthcheck: pick(&own.healthcheck, &old.healthcheck, &new.healthcheck),
        shell: pick(&own.shell, &old.shell, &new.shell),
        on_build: own.on_build.clone(),
        extra: own.extra.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(env: &[&str], cmd: &[&str], labels: &[(&str, &str)]) -> ContainerConfig {
        ContainerConfig {
            env: Some(env.iter().map(|s| s.to_string()).collect()),
            cmd: (!cmd.is_empty()).then(|| cmd.iter().map(|s| s.to_string()).collect()),
            labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            ..ContainerConfig::default()
        }
    }

    #[test]
    fn inherited_settings_follow_the_new_base_and_own_ones_stay() {
        let old = cfg(&["PATH=/old/bin", "LANG=C"], &["sh"], &[("base", "1")]);
        let new = cfg(
            &["PATH=/new/bin", "LANG=C.UTF-8", "TZ=UTC"],
            &["bash"],
            &[("base", "2")],
        );
        // The app kept PATH and LANG as inherited, set APP=1 and its own CMD and label.
        let own = cfg(
            &["PATH=/old/bin", "LANG=C", "APP=1"],
            &["/app/run"],
            &[("base", "1"), ("app", "x")],
        );
        let r = rebased_config(&own, &old, &new);
        assert_eq!(
            r.env.unwrap(),
            ["PATH=/new/bin", "LANG=C.UTF-8", "TZ=UTC", "APP=1"]
        );
        assert_eq!(r.cmd.unwrap(), ["/app/run"]);
        let labels = r.labels.unwrap();
        assert_eq!(labels["base"], "2");
        assert_eq!(labels["app"], "x");

        // An app that set PATH itself keeps its PATH; an inherited CMD follows the new base.
        let own = cfg(&["PATH=/opt/app/bin:/old/bin", "LANG=C"], &["sh"], &[]);
        let r = rebased_config(&own, &old, &new);
        assert_eq!(
            r.env.unwrap(),
            ["PATH=/opt/app/bin:/old/bin", "LANG=C.UTF-8", "TZ=UTC"]
        );
        assert_eq!(r.cmd.unwrap(), ["bash"]);
    }
}
