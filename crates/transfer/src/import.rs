//! `strata import`: an image of one layer from a root filesystem tarball, like `docker import`.

use std::io::Read;
use std::time::SystemTime;

use strata_oci::{
    Compression, ContainerConfig, Descriptor, History, ImageConfig, Platform, Reference, RootFs,
};
use strata_rootfs::{LayerInfo, LayerOptions, recompress_tar};
use strata_store::Store;

use crate::error::{Error, Result};

/// What to put in the imported image besides its layer.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Compression of the stored layer.
    pub compression: Compression,
    /// Container defaults (from `--change`).
    pub config: ContainerConfig,
    /// History comment (`--message`).
    pub message: Option<String>,
    /// Creation time recorded in the config and history.
    pub created: SystemTime,
    /// Where the tarball came from, for the history entry (a file name or `-`).
    pub source: String,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            compression: Compression::Gzip,
            config: ContainerConfig::default(),
            message: None,
            created: SystemTime::now(),
            source: "-".to_string(),
        }
    }
}

/// The image [`import_tarball`] made.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The store name it got, e.g. `busybox:latest`.
    pub name: String,
    /// Its manifest.
    pub descriptor: Descriptor,
    /// Its one layer.
    pub layer: LayerInfo,
}

/// The normalized store name of a user-given image name: `busybox` is `busybox:latest`,
/// `docker.io/library/debian:12` is `debian:12`.
pub fn local_name(name: &str) -> Result<String> {
    Reference::parse_local(name)
        .map(|r| r.to_string())
        .map_err(|source| Error::Name {
            name: name.to_string(),
            source,
        })
}

/// Store the tar stream `input` (plain, gzip or zstd) as the single layer of a new image named
/// `name`. The stream is checked to be a whole tar while it is recompressed; nothing is named
/// unless every blob is in the store.
pub fn import_tarball(
    store: &Store,
    input: impl Read,
    name: &str,
    opts: &ImportOptions,
) -> Result<Imported> {
    let name = local_name(name)?;
    let _session = store.write_session()?;
    let mut writer = store.blob_writer()?;
    let layer_opts = LayerOptions {
        compression: opts.compression,
        ..LayerOptions::default()
    };
    let layer = recompress_tar(input, &layer_opts, &mut writer).map_err(|source| Error::Layer {
        what: format!("from `{}`", opts.source),
        source,
    })?;
    writer.commit(Some((&layer.digest, Some(layer.size))))?;

    let created = humantime::format_rfc3339_seconds(opts.created).to_string();
    let host = Platform::host();
    let mut created_by = format!("strata import {}", opts.source);
    if opts.config != ContainerConfig::default() {
        created_by.push_str(" (with --change)");
    }
    let config = ImageConfig {
        created: Some(created.clone()),
        architecture: host.architecture,
        os: host.os,
        variant: host.variant,
        config: Some(opts.config.clone()),
        rootfs: RootFs {
            diff_ids: vec![layer.diff_id.clone()],
            ..RootFs::default()
        },
        history: Some(vec![History {
            created: Some(created),
            created_by: Some(created_by),
            comment: opts.message.clone(),
            ..History::default()
        }]),
        ..ImageConfig::default()
    };
    let (descriptor, _) = store.put_image(&config, vec![layer.descriptor()], None)?;
    store.set_ref(&name, descriptor.clone())?;
    Ok(Imported {
        name,
        descriptor,
        layer,
    })
}
