//! `strata save` and `strata load`: docker-archive (what `docker save` writes and `docker load`
//! reads) and OCI archive (an OCI image layout in a tar, what `skopeo copy oci-archive:` reads).
//!
//! docker-archive, as written here (the layout `docker save` used before Docker 25, which every
//! version of `docker load` and containers/image's `docker-archive:` read):
//!
//! ```text
//! manifest.json              [{"Config":"<hex>.json","RepoTags":["name:tag"],"Layers":["<diff-id hex>/layer.tar"]}]
//! repositories               {"name":{"tag":"<hex of config>"}}
//! <config hex>.json          the config, byte for byte
//! <diff-id hex>/layer.tar    each layer, uncompressed (its digest is its diff_id)
//! ```
//!
//! Loading also accepts Docker 25+ archives (manifest.json pointing into `blobs/sha256/`) and
//! compressed layer files. OCI archives are `oci-layout`, `index.json` and `blobs/<alg>/<hex>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_oci::{
    ANNOTATION_REF_NAME, Descriptor, Digest, ImageConfig, Index, Manifest, ManifestOrIndex,
    media_type,
};
use strata_rootfs::{LayerOptions, decompress, recompress_tar, sniff_compression};
use strata_store::{Image, Store};

use crate::error::{Error, IoContext, Result};
use crate::import::local_name;

/// Annotation containerd and Docker put on index entries with the full image name.
const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The two archive formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// docker-archive, for `docker load`.
    Docker,
    /// OCI image layout in a tar.
    Oci,
}

/// One entry of a docker-archive's `manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
struct DockerArchiveEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Writes the archive of `names` in `format` to `output` (see [`write_output`]).
pub fn save_archive(
    store: &Store,
    names: &[String],
    format: ArchiveFormat,
    output: &Path,
) -> Result<()> {
    let images = images_named(store, names)?;
    write_output(output, ".strata-save-", |f| {
        write_images(store, &images, format, BufWriter::with_capacity(1 << 20, f))?
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", output)?;
        Ok(())
    })
}

/// Writes a file the user named (`save -o`, `build --iidfile`) as `write` makes it, the way a
/// plain write would reach it but never half-written: what is not a regular file (a FIFO, a
/// device such as `/dev/stdout`, through a symlink) is written through; a regular file, new
/// or not (also at the end of a symlink, which stays), is replaced by a temporary file renamed
/// over it, with the mode a plain create would give (0644 under the usual umask) or the
/// replaced file's own. `write`'s errors are the caller's; this function's own convert.
pub fn write_output<E: From<Error>>(
    output: &Path,
    prefix: &str,
    write: impl FnOnce(&mut std::fs::File) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    // `metadata` follows symlinks: what a write to `output` would reach.
    match std::fs::metadata(output) {
        Ok(md) if !md.is_file() && !md.is_dir() => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(output)
                .ctx("open for writing", output)?;
            return write(&mut f);
        }
        _ => {}
    }
    // A symlink to a regular file (or to nothing yet): replace what it points to.
    let target = match std::fs::read_link(output) {
        Ok(t) if t.is_absolute() => t,
        Ok(t) => output.parent().unwrap_or(Path::new(".")).join(t),
        Err(_) => output.to_path_buf(),
    };
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(dir)
        .ctx("create a temporary file in", dir)?;
    let mode = std::fs::metadata(&target)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
        .unwrap_or(0o644);
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(mode),
    )
    .ctx("chmod", tmp.path())?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all().ctx("fsync", output)?;
    tmp.persist(&target)
        .map_err(|e| e.error)
        .ctx("rename into place", &target)?;
    Ok(())
}

/// Streams the archive of `names` in `format` to `out` (`strata save` to stdout).
pub fn write_archive<W: Write>(
    store: &Store,
    names: &[String],
    format: ArchiveFormat,
    out: W,
) -> Result<W> {
    let images = images_named(store, names)?;
    write_images(store, &images, format, out)
}

fn images_named(store: &Store, names: &[String]) -> Result<Vec<(String, Image)>> {
    let mut images = Vec::new();
    for n in names {
        let name = local_name(n)?;
        let image = store.image(&name)?;
        images.push((name, image));
    }
    Ok(images)
}

fn write_images<W: Write>(
    store: &Store,
    images: &[(String, Image)],
    format: ArchiveFormat,
    out: W,
) -> Result<W> {
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Deterministic);
    match format {
        ArchiveFormat::Docker => write_docker_archive(store, images, &mut tar)?,
        ArchiveFormat::Oci => write_oci_archive(store, images, &mut tar)?,
    }
    tar.into_inner().ctx("finish", "the archive")
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, bytes: &[u8]) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, bytes).ctx("append", path)
}

fn append_reader<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    size: u64,
    reader: impl Read,
) -> Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, reader).ctx("append", path)
}

fn write_docker_archive<W: Write>(
    store: &Store,
    images: &[(String, Image)],
    tar: &mut tar::Builder<W>,
) -> Result<()> {
    let mut manifest = Vec::new();
    let mut repositories: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut written = BTreeSet::new();
    for (name, image) in images {
        let config = ImageConfig::from_slice(&image.config_bytes)?;
        if config.diff_ids().len() != image.manifest.layers.len() {
            return Err(Error::Image {
                name: name.clone(),
                reason: "config diff_ids and manifest layers differ in number".to_string(),
            });
        }
        let config_hex = image.manifest.config.digest.hex().to_string();
        let config_path = format!("{config_hex}.json");
        if written.insert(config_path.clone()) {
            append_bytes(tar, &config_path, &image.config_bytes)?;
        }
        let mut layers = Vec::new();
        for (desc, diff_id) in image.manifest.layers.iter().zip(config.diff_ids()) {
            let path = format!("{}/layer.tar", diff_id.hex());
            if written.insert(path.clone()) {
                append_plain_layer(store, tar, desc, diff_id, &path)?;
            }
            layers.push(path);
        }
        // A digest reference (`app@sha256:…`) is no tag: `docker save` of one writes none.
        let tagged = !name.contains('@');
        manifest.push(DockerArchiveEntry {
            config: config_path,
            repo_tags: Some(if tagged {
                vec![name.clone()]
            } else {
                Vec::new()
            }),
            layers,
        });
        if let Some((repo, tag)) = name
            .rsplit_once(':')
            .filter(|(_, t)| tagged && !t.contains('/'))
        {
            repositories
                .entry(repo.to_string())
                .or_default()
                .insert(tag.to_string(), config_hex);
        }
    }
    append_bytes(tar, "manifest.json", &json(&manifest)?)?;
    append_bytes(tar, "repositories", &json(&repositories)?)?;
    Ok(())
}

/// Append a layer uncompressed. The tar header needs the size before the bytes, so a
/// compressed layer is decompressed into a temporary file first (and its diff_id checked).
fn append_plain_layer<W: Write>(
    store: &Store,
    tar: &mut tar::Builder<W>,
    desc: &Descriptor,
    diff_id: &Digest,
    path: &str,
) -> Result<()> {
    let compression =
        media_type::layer_compression(&desc.media_type).ok_or_else(|| Error::Archive {
            archive: PathBuf::from(path),
            reason: format!(
                "layer {} has unknown media type `{}`",
                desc.digest, desc.media_type
            ),
        })?;
    let blob = store.open_descriptor(desc)?;
    let mut plain = decompress(blob, compression).ctx("decompress layer", path)?;
    let mut tmp = tempfile::tempfile_in(store.root().join("strata/tmp"))
        .ctx("create a temporary file in", store.root())?;
    let mut hashed = strata_oci::HashingWriter::new(BufWriter::new(&mut tmp));
    io::copy(&mut plain, &mut hashed).ctx("decompress layer", path)?;
    let (w, actual, size) = hashed.finish();
    w.into_inner()
        .map_err(|e| e.into_error())
        .ctx("write", path)?;
    if actual != *diff_id {
        return Err(Error::Image {
            name: path.to_string(),
            reason: format!(
                "layer {} unpacks to {actual}, the config says {diff_id}",
                desc.digest
            ),
        });
    }
    tmp.rewind().ctx("rewind", path)?;
    append_reader(tar, path, size, io::BufReader::new(tmp))
}

fn write_oci_archive<W: Write>(
    store: &Store,
    images: &[(String, Image)],
    tar: &mut tar::Builder<W>,
) -> Result<()> {
    append_bytes(tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut index = Index::new();
    let mut written = BTreeSet::new();
    for (name, image) in images {
        // The whole ref (an index stays an index), not just the host platform's manifest.
        let top = store
            .find_ref(name)?
            .ok_or_else(|| strata_store::Error::RefNotFound { name: name.clone() })?;
        for desc in reachable(store, &top)? {
            if written.insert(desc.digest.clone()) {
                let path = format!(
                    "blobs/{}/{}",
                    desc.digest.algorithm().as_str(),
                    desc.digest.hex()
                );
                append_reader(tar, &path, desc.size, store.open_descriptor(&desc)?)?;
            }
        }
        let _ = image;
        let mut entry = top;
        let ann = entry.annotations.get_or_insert_with(BTreeMap::new);
        ann.insert(ANNOTATION_REF_NAME.to_string(), name.clone());
        ann.insert(ANNOTATION_CONTAINERD_NAME.to_string(), name.clone());
        index.manifests.push(entry);
    }
    append_bytes(tar, "index.json", &strata_oci::to_canonical_json(&index))?;
    Ok(())
}

/// Every descriptor reachable from `top` that is in the store (an index's entries for other
/// platforms may be absent after a single-platform pull; they are skipped), `top` included.
fn reachable(store: &Store, top: &Descriptor) -> Result<Vec<Descriptor>> {
    let mut out = Vec::new();
    let mut todo = vec![top.clone()];
    while let Some(desc) = todo.pop() {
        if !store.has_blob(&desc.digest) {
            if desc == *top {
                return Err(strata_store::Error::BlobNotFound {
                    digest: desc.digest,
                }
                .into());
            }
            continue;
        }
        if media_type::is_manifest(&desc.media_type) || media_type::is_index(&desc.media_type) {
            let bytes = store.read_descriptor(&desc)?;
            match ManifestOrIndex::from_slice(&bytes, Some(&desc.media_type))? {
                ManifestOrIndex::Manifest(m) => {
                    todo.push(m.config.clone());
                    todo.extend(m.layers.iter().filter(|l| l.urls.is_none()).cloned());
                }
                ManifestOrIndex::Index(i) => todo.extend(i.manifests.iter().cloned()),
            }
        }
        out.push(desc);
    }
    Ok(out)
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    Ok(strata_oci::to_canonical_json(value))
}

/// An image [`load_archive`] put in the store.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    /// The name it got (`None` for an unnamed image, known only by digest).
    pub name: Option<String>,
    pub descriptor: Descriptor,
}

/// What an archive's entry turned into while streaming.
enum Stored {
    /// A small JSON file kept in memory (manifest.json, index.json, oci-layout, configs...).
    Bytes(Vec<u8>),
    /// A file streamed into the store as a blob.
    Blob { digest: Digest, size: u64 },
    /// A layer tar recompressed into the store.
    Layer(strata_rootfs::LayerInfo),
}

/// Files smaller than this are kept in memory as they may be JSON metadata.
const SMALL_FILE: u64 = 4 << 20;

/// Load every image of a docker-archive or OCI archive at `path` (format detected) into the
/// store. Blobs are verified as they stream in; names are set only at the end, when every
/// image is complete. Returns the images loaded.
pub fn load_archive(store: &Store, path: &Path) -> Result<Vec<LoadedImage>> {
    let file = File::open(path).ctx("open", path)?;
    let mut head = [0u8; 4];
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let n = io::BufRead::fill_buf(&mut reader)
        .ctx("read", path)?
        .len()
        .min(4);
    head[..n].copy_from_slice(&io::BufRead::fill_buf(&mut reader).ctx("read", path)?[..n]);
    let input = decompress(reader, sniff_compression(&head[..n])).ctx("decompress", path)?;

    let _session = store.write_session()?;
    let bad = |reason: String| Error::Archive {
        archive: path.to_path_buf(),
        reason,
    };
    let mut files: HashMap<String, Stored> = HashMap::new();
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries().ctx("read", path)? {
        let mut entry = entry.ctx("read", path)?;
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let name =
            clean_archive_path(&raw).ok_or_else(|| bad(format!("unsafe entry name `{raw}`")))?;
        if kind.is_symlink() {
            // Docker's legacy archives link identical layers to each other.
            let target = entry
                .link_name()
                .ctx("read", path)?
                .map(|t| t.to_string_lossy().into_owned())
                .ok_or_else(|| bad(format!("symlink `{raw}` without target")))?;
            let base = Path::new(&name).parent().unwrap_or(Path::new(""));
            let resolved = clean_archive_path(&base.join(target).to_string_lossy())
                .ok_or_else(|| bad(format!("symlink `{raw}` points outside the archive")))?;
            let Some(Stored::Layer(info)) = files.get(&resolved) else {
                return Err(bad(format!(
                    "symlink `{raw}` points at `{resolved}`, not a layer read before it"
                )));
            };
            let info = info.clone();
            files.insert(name, Stored::Layer(info));
            continue;
        }
        if !kind.is_file() {
            return Err(bad(format!("unexpected entry type of `{raw}`")));
        }
        let size = entry.size();
        let stored = if let Some(digest) = blob_path_digest(&name) {
            let (digest, size) = store
                .put_blob_reader(&mut entry, Some((&digest, Some(size))))
                .map_err(|e| bad(format!("`{name}`: {e}")))?;
            Stored::Blob { digest, size }
        } else if name.ends_with("/layer.tar") || name.ends_with(".tar") {
            let mut writer = store.blob_writer()?;
            let info = recompress_tar(&mut entry, &LayerOptions::default(), &mut writer).map_err(
                |source| Error::Layer {
                    what: format!("`{name}` in `{}`", path.display()),
                    source,
                },
            )?;
            writer.commit(Some((&info.digest, Some(info.size))))?;
            Stored::Layer(info)
        } else if size <= SMALL_FILE {
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes).ctx("read", path)?;
            Stored::Bytes(bytes)
        } else {
            // Something big that is neither a blob nor a layer: not part of either format.
            continue;
        };
        files.insert(name, stored);
    }

    if files.contains_key("manifest.json") {
        load_docker(store, &files, &bad)
    } else if files.contains_key("index.json") {
        load_oci(store, &files, &bad)
    } else {
        Err(bad(
            "neither `manifest.json` (docker-archive) nor `index.json` (OCI archive) found"
                .to_string(),
        ))
    }
}

/// The digest named by a `blobs/<alg>/<hex>` path, if it is one.
fn blob_path_digest(name: &str) -> Option<Digest> {
    let rest = name.strip_prefix("blobs/")?;
    let (alg, hex) = rest.split_once('/')?;
    format!("{alg}:{hex}").parse().ok()
}

/// `./a//b/` → `a/b`; `None` for absolute paths, `..` or an empty name.
fn clean_archive_path(raw: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    if raw.starts_with('/') || parts.is_empty() {
        return None;
    }
    Some(parts.join("/"))
}

fn file_bytes<'a>(
    files: &'a HashMap<String, Stored>,
    name: &str,
    store: &Store,
    bad: &dyn Fn(String) -> Error,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    match files.get(name) {
        Some(Stored::Bytes(b)) => Ok(std::borrow::Cow::Borrowed(b)),
        Some(Stored::Blob { digest, .. }) => Ok(std::borrow::Cow::Owned(store.read_blob(digest)?)),
        Some(Stored::Layer(_)) => Err(bad(format!("`{name}` is a layer, expected JSON"))),
        None => Err(bad(format!("`{name}` is missing"))),
    }
}

fn load_docker(
    store: &Store,
    files: &HashMap<String, Stored>,
    bad: &dyn Fn(String) -> Error,
) -> Result<Vec<LoadedImage>> {
    let manifest_json = file_bytes(files, "manifest.json", store, bad)?;
    let entries: Vec<DockerArchiveEntry> =
        serde_json::from_slice(&manifest_json).map_err(|e| bad(format!("`manifest.json`: {e}")))?;
    let mut loaded = Vec::new();
    let mut names = Vec::new();
    for entry in &entries {
        let config_name = clean_archive_path(&entry.config)
            .ok_or_else(|| bad(format!("unsafe config path `{}`", entry.config)))?;
        let config_bytes = file_bytes(files, &config_name, store, bad)?;
        let config = ImageConfig::from_slice(&config_bytes)?;
        if config.diff_ids().len() != entry.layers.len() {
            return Err(bad(format!(
                "`{config_name}` lists {} diff_ids but manifest.json {} layers",
                config.diff_ids().len(),
                entry.layers.len()
            )));
        }
        let (config_digest, config_size) = store.put_blob_bytes(&config_bytes, None)?;
        let mut layers = Vec::new();
        for (layer_name, diff_id) in entry.layers.iter().zip(config.diff_ids()) {
            let layer_name = clean_archive_path(layer_name)
                .ok_or_else(|| bad(format!("unsafe layer path `{layer_name}`")))?;
            let desc = match files.get(&layer_name) {
                Some(Stored::Layer(info)) => {
                    if info.diff_id != *diff_id {
                        return Err(bad(format!(
                            "layer `{layer_name}` has diff_id {}, the config says {diff_id}",
                            info.diff_id
                        )));
                    }
                    info.descriptor()
                }
                Some(Stored::Blob { digest, size }) => {
                    // Docker 25+: an uncompressed layer as a blob. Its digest is its diff_id
                    // only if it is not compressed.
                    let mut head = [0u8; 4];
                    let n = store
                        .open_blob(digest)?
                        .read(&mut head)
                        .ctx("read", store.blob_path(digest))?;
                    let compression = sniff_compression(&head[..n]);
                    if compression == strata_oci::Compression::None && digest != diff_id {
                        return Err(bad(format!(
                            "layer `{layer_name}` is {digest}, the config says {diff_id}"
                        )));
                    }
                    Descriptor::new(compression.oci_layer_media_type(), digest.clone(), *size)
                }
                _ => return Err(bad(format!("layer `{layer_name}` is missing"))),
            };
            layers.push(desc);
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(media_type::OCI_MANIFEST.to_string()),
            artifact_type: None,
            config: Descriptor::new(media_type::OCI_CONFIG, config_digest, config_size),
            layers,
            subject: None,
            annotations: None,
        };
        let descriptor = store.put_manifest(&manifest)?;
        let tags = entry.repo_tags.clone().unwrap_or_default();
        if tags.is_empty() {
            loaded.push(LoadedImage {
                name: None,
                descriptor: descriptor.clone(),
            });
        }
        for tag in tags {
            names.push((local_name(&tag)?, descriptor.clone()));
        }
    }
    for (name, descriptor) in names {
        store.set_ref(&name, descriptor.clone())?;
        loaded.push(LoadedImage {
            name: Some(name),
            descriptor,
        });
    }
    Ok(loaded)
}

fn load_oci(
    store: &Store,
    files: &HashMap<String, Stored>,
    bad: &dyn Fn(String) -> Error,
) -> Result<Vec<LoadedImage>> {
    let layout = file_bytes(files, "oci-layout", store, bad)?;
    let layout: serde_json::Value =
        serde_json::from_slice(&layout).map_err(|e| bad(format!("`oci-layout`: {e}")))?;
    if layout.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(bad(format!(
            "`oci-layout` has unsupported version: {layout}"
        )));
    }
    let index_bytes = file_bytes(files, "index.json", store, bad)?;
    let index = Index::from_slice(&index_bytes)?;
    let mut loaded = Vec::new();
    for desc in &index.manifests {
        // Every blob reachable from this entry must have come in with the archive.
        for d in reachable(store, desc)? {
            if !store.has_blob(&d.digest) {
                return Err(bad(format!("blob {} is missing", d.digest)));
            }
        }
        let name = desc
            .annotations
            .as_ref()
            .and_then(|a| {
                a.get(ANNOTATION_CONTAINERD_NAME)
                    .or_else(|| a.get(ANNOTATION_REF_NAME))
            })
            .map(|n| local_name(n))
            .transpose()?;
        let mut clean = desc.clone();
        clean.annotations = None;
        store.resolve_image(
            name.as_deref().unwrap_or("<unnamed>"),
            clean.clone(),
            &strata_oci::Platform::host(),
        )?;
        loaded.push(LoadedImage {
            name,
            descriptor: clean,
        });
    }
    for image in &loaded {
        if let Some(name) = &image.name {
            store.set_ref(name, image.descriptor.clone())?;
        }
    }
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_are_cleaned_and_escapes_refused() {
        assert_eq!(clean_archive_path("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(clean_archive_path("a/../b").as_deref(), Some("b"));
        assert_eq!(clean_archive_path("../etc/passwd"), None);
        assert_eq!(clean_archive_path("/etc/passwd"), None);
        assert_eq!(clean_archive_path("."), None);
    }

    #[test]
    fn blob_paths_name_digests() {
        let d = Digest::sha256(b"x");
        assert_eq!(
            blob_path_digest(&format!("blobs/sha256/{}", d.hex())),
            Some(d)
        );
        assert_eq!(blob_path_digest("blobs/sha256/../../x"), None);
        assert_eq!(blob_path_digest("manifest.json"), None);
    }
}
