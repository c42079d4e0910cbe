//! Unpacked layers cached by chain ID, for overlay lowerdirs; and flattening a chain into one
//! directory.
//!
//! ```text
//! <root>/
//!   <chain-id hex>/     layer n unpacked alone (overlay whiteouts kept), parents 0..n-1 implied
//!   tmp-XXXXXX/         an unpack in progress; renamed to <chain-id hex> when complete
//! ```
//!
//! A snapshot directory appears only by `rename(2)` of a finished unpack, so a killed process
//! leaves at most a `tmp-*` directory, never a half snapshot under a chain ID. Two processes
//! creating the same snapshot both unpack; the second rename fails and its copy is discarded.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use strata_oci::{Descriptor, Digest, chain_id, media_type};

use crate::apply::{ApplyOptions, ApplyStats, WhiteoutMode, apply_layer_with};
use crate::error::{Error, Result};

/// A layer of an image: its manifest descriptor and its diff_id from the image config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    /// The layer blob's descriptor (media type gives the compression).
    pub descriptor: Descriptor,
    /// sha256 of the uncompressed layer, checked while unpacking.
    pub diff_id: Digest,
}

impl LayerRef {
    /// An image's layers, bottom first: each manifest layer with the config's diff_id at the
    /// same position (extra entries on either side are dropped, as `zip` does).
    pub fn zip(layers: &[Descriptor], diff_ids: &[Digest]) -> Vec<LayerRef> {
        layers
            .iter()
            .zip(diff_ids)
            .map(|(d, id)| LayerRef {
                descriptor: d.clone(),
                diff_id: id.clone(),
            })
            .collect()
    }
}

/// A directory of unpacked layers keyed by chain ID.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    root: PathBuf,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The chain IDs of every prefix of `layers` (bottom first).
fn chain_ids(layers: &[LayerRef]) -> Vec<Digest> {
    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
    (1..=diff_ids.len())
        .filter_map(|n| chain_id(&diff_ids[..n]))
        .collect()
}

/// Applies one layer blob to `target`, checking the diff_id.
fn apply_one<R: Read>(
    layer: &LayerRef,
    open_blob: &impl Fn(&Descriptor) -> io::Result<R>,
    target: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyStats> {
    let desc = &layer.descriptor;
    let compression = media_type::layer_compression(&desc.media_type).ok_or_else(|| {
        Error::UnsupportedMediaType {
            digest: desc.digest.clone(),
            media_type: desc.media_type.clone(),
        }
    })?;
    let blob = open_blob(desc).map_err(|source| Error::OpenBlob {
        digest: desc.digest.clone(),
        source,
    })?;
    let stats = apply_layer_with(blob, compression, target, opts)?;
    if stats.diff_id != layer.diff_id {
        return Err(Error::DiffIdMismatch {
            blob: desc.digest.clone(),
            expected: layer.diff_id.clone(),
            actual: stats.diff_id,
        });
    }
    Ok(stats)
}

impl SnapshotCache {
    /// A cache rooted at `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<SnapshotCache> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io_err("creating snapshot directory", &root))?;
        Ok(SnapshotCache { root })
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the snapshot of a chain ID lives (it may not exist).
    pub fn path_of(&self, chain_id: &Digest) -> PathBuf {
        self.root.join(chain_id.hex())
    }

    /// The snapshot directories of `layers` (bottom first) if all are present.
    pub fn get(&self, layers: &[LayerRef]) -> Option<Vec<PathBuf>> {
        chain_ids(layers)
            .iter()
            .map(|c| Some(self.path_of(c)).filter(|p| p.is_dir()))
            .collect()
    }

    /// Makes sure every layer of the chain is unpacked; returns their directories, bottom
    /// first (reverse them for overlay, or use [`overlay_lowerdir`]). Missing layers are
    /// read with `open_blob`, unpacked in overlay form (whiteouts as 0/0 devices) and checked
    /// against their diff_id.
    pub fn ensure<R: Read>(
        &self,
        layers: &[LayerRef],
        open_blob: impl Fn(&Descriptor) -> io::Result<R>,
    ) -> Result<Vec<PathBuf>> {
        let mut dirs: Vec<PathBuf> = Vec::with_capacity(layers.len());
        for (layer, chain) in layers.iter().zip(chain_ids(layers)) {
            let dest = self.path_of(&chain);
            if !dest.is_dir() {
                let tmp = tempfile::Builder::new()
                    .prefix("tmp-")
                    .tempdir_in(&self.root)
                    .map_err(io_err("creating temporary snapshot", &self.root))?;
                std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))
                    .map_err(io_err("chmod", tmp.path()))?;
                let opts = ApplyOptions {
                    whiteouts: WhiteoutMode::Overlay,
                    lower_layers: dirs.iter().rev().cloned().collect(),
                    ..ApplyOptions::default()
                };
                apply_one(layer, &open_blob, tmp.path(), &opts)?;
                sync_filesystem(tmp.path())?;
                match std::fs::rename(tmp.path(), &dest) {
                    Ok(()) => {
                        // Renamed away: nothing left for the guard to delete.
                        let _ = tmp.keep();
                        sync_dir(&self.root)?;
                    }
                    // Another process finished the same snapshot first; ours is dropped.
                    Err(e)
                        if dest.is_dir()
                            && matches!(
                                e.raw_os_error(),
                                Some(libc::ENOTEMPTY) | Some(libc::EEXIST)
                            ) => {}
                    Err(e) => return Err(io_err("renaming snapshot into place", &dest)(e)),
                }
            }
            dirs.push(dest);
        }
        Ok(dirs)
    }

    /// Makes `dir`, an overlay upper directory holding exactly the entries of the last layer
    /// of `layers`, that layer's snapshot, without unpacking the blob again: a build step's
    /// upper dir is already the layer in overlay form (whiteouts as 0/0 devices, opaque
    /// directories marked). `left_out` (paths relative to `dir` that the layer does not hold,
    /// such as the runtime's empty mount points) are deleted deepest first, as are sockets
    /// and overlayfs's own bookkeeping xattrs; the mtimes of the directories they leave are
    /// put back, so the snapshot matches the layer written before. Then `dir` is renamed
    /// into place; it must be on the cache's filesystem. Returns false, leaving `dir` alone,
    /// when the snapshot already exists.
    ///
    /// The caller vouches that `dir` matches the layer (it wrote the layer from it).
    pub fn adopt(&self, layers: &[LayerRef], dir: &Path, left_out: &[&Path]) -> Result<bool> {
        let Some(chain) = chain_ids(layers).pop() else {
            return Ok(false);
        };
        let dest = self.path_of(&chain);
        if dest.is_dir() {
            return Ok(false);
        }
        let mut gone: Vec<PathBuf> = left_out.iter().map(|p| dir.join(p)).collect();
        scrub_upper(dir, &mut gone)?;
        remove_keeping_parent_mtimes(&mut gone)?;
        // An unpacked snapshot's root is 0755 root:root whatever the step did to `/`.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", dir))?;
        std::os::unix::fs::lchown(dir, Some(0), Some(0)).map_err(io_err("chown", dir))?;
        sync_filesystem(dir)?;
        match std::fs::rename(dir, &dest) {
            Ok(()) => {
                sync_dir(&self.root)?;
                Ok(true)
            }
            Err(e)
                if dest.is_dir()
                    && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) =>
            {
                Ok(false)
            }
            Err(e) => Err(io_err("renaming snapshot into place", &dest)(e)),
        }
    }

    /// Removes `tmp-*` directories left by killed processes. Only call it when no other
    /// process is unpacking into this cache.
    pub fn remove_leftovers(&self) -> Result<usize> {
        let mut n = 0;
        for e in std::fs::read_dir(&self.root).map_err(io_err("reading directory", &self.root))? {
            let e = e.map_err(io_err("reading directory", &self.root))?;
            if e.file_name().as_bytes().starts_with(b"tmp-") {
                std::fs::remove_dir_all(e.path()).map_err(io_err("removing", &e.path()))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// Makes every write to the filesystem holding `dir` durable (syncfs), before a snapshot is
/// renamed to its chain ID: after a power cut a snapshot under a valid name must not hold
/// files whose data never reached the disk (the cache would mount it as it is). One syncfs
/// instead of an fsync per file: a layer holds thousands of files, and the kernel writes
/// them back together. A caller that will [`SnapshotCache::adopt`] a big directory can run
/// this early on a thread of its own, so the writeback overlaps other work (the layer's
/// compression) and adopt's own sync finds little left to do.
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(io_err("opening", dir))?;
    rustix::fs::syncfs(&f).map_err(|e| io_err("syncing the filesystem of", dir)(e.into()))
}

/// fsync of a directory, so that a rename into it is durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing", dir))
}

/// The `lowerdir=` value for an overlay mount of snapshot directories given bottom first
/// (overlayfs wants the top layer first, separated by `:`).
pub fn overlay_lowerdir(dirs: &[PathBuf]) -> Result<OsString> {
    let mut out = OsString::new();
    for (i, d) in dirs.iter().rev().enumerate() {
        // `:` separates layers and `,` separates mount options; escaping them is possible but
        // our own paths never need it.
        for ch in [':', ','] {
            if d.as_os_str().as_bytes().contains(&(ch as u8)) {
                return Err(Error::OverlayPath {
                    path: d.clone(),
                    ch,
                });
            }
        }
        if i > 0 {
            out.push(":");
        }
        out.push(d.as_os_str());
    }
    Ok(out)
}

/// Applies every layer in order into `dest` (created if missing), whiteouts applied: the
/// flattened root filesystem, like `umoci unpack`. Each layer's diff_id is checked.
///
/// A failure leaves `dest` partly written; unpack into a fresh directory and rename it.
pub fn materialize<R: Read>(
    layers: &[LayerRef],
    open_blob: impl Fn(&Descriptor) -> io::Result<R>,
    dest: &Path,
) -> Result<Vec<ApplyStats>> {
    if !dest.exists() {
        std::fs::create_dir_all(dest).map_err(io_err("creating directory", dest))?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", dest))?;
    }
    let opts = ApplyOptions::default();
    layers
        .iter()
        .map(|l| apply_one(l, &open_blob, dest, &opts))
        .collect()
}

/// Strips overlayfs xattrs other than the opaque marker (origin file handles, impure flags:
/// they would make a later mount second-guess the snapshot) and lists sockets in `gone`.
fn scrub_upper(dir: &Path, gone: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(io_err("reading directory", dir))?;
    for e in entries {
        let e = e.map_err(io_err("reading directory", dir))?;
        let path = e.path();
        let ft = e.file_type().map_err(io_err("stat", &path))?;
        if std::os::unix::fs::FileTypeExt::is_socket(&ft) {
            gone.push(path);
            continue;
        }
        strip_overlay_xattrs(&path)?;
        if ft.is_dir() {
            scrub_upper(&path, gone)?;
        }
    }
    strip_overlay_xattrs(dir)
}

/// Deletes `paths` (files, or directories emptied by earlier entries), deepest first, then
/// sets their parent directories' mtimes back to what they were.
fn remove_keeping_parent_mtimes(paths: &mut [PathBuf]) -> Result<()> {
    paths.sort_by(|a, b| b.cmp(a));
    let mut parents: Vec<(PathBuf, std::time::SystemTime)> = Vec::new();
    for p in paths.iter() {
        if let Some(parent) = p.parent()
            && !parents.iter().any(|(q, _)| q == parent)
            && let Ok(md) = std::fs::symlink_metadata(parent)
        {
            parents.push((
                parent.to_path_buf(),
                md.modified().map_err(io_err("stat", parent))?,
            ));
        }
    }
    for p in paths.iter() {
        let md = std::fs::symlink_metadata(p).map_err(io_err("stat", p))?;
        let res = if md.is_dir() {
            std::fs::remove_dir(p)
        } else {
            std::fs::remove_file(p)
        };
        res.map_err(io_err("removing", p))?;
    }
    for (dir, mtime) in parents {
        // A parent that was itself left out is gone.
        if let Ok(f) = std::fs::File::open(&dir) {
            f.set_modified(mtime)
                .map_err(io_err("setting mtime of", &dir))?;
        }
    }
    Ok(())
}

fn strip_overlay_xattrs(path: &Path) -> Result<()> {
    let Ok(names) = xattr::list(path) else {
        // A file system or entry without xattrs has nothing to strip.
        return Ok(());
    };
    for n in names {
        let b = n.as_bytes();
        if crate::fsmeta::is_overlay_xattr(b) && !b.ends_with(b".opaque") {
            xattr::remove(path, &n).map_err(io_err("removing overlay xattr", path))?;
        }
    }
    Ok(())
}
