//! Comparing trees: two directories, or an overlayfs upper directory, into a change list for
//! the layer writer.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsmeta::read_xattrs;

/// One difference between a lower and an upper tree. Paths are relative to the tree roots.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    /// The path exists only in the upper tree.
    Added(PathBuf),
    /// The path exists in both but differs (content, type or metadata).
    Modified(PathBuf),
    /// The path exists only in the lower tree: written as a whiteout.
    Deleted(PathBuf),
    /// The directory hides everything of the lower tree under it (written as the directory
    /// entry plus an opaque marker); its upper children come as their own changes.
    Opaque(PathBuf),
}

impl Change {
    /// The path this change is about.
    pub fn path(&self) -> &Path {
        match self {
            Change::Added(p) | Change::Modified(p) | Change::Deleted(p) | Change::Opaque(p) => p,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn names(dir: &Path) -> Result<BTreeSet<OsString>> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).map_err(io_err("reading directory", dir))? {
        out.insert(e.map_err(io_err("reading directory", dir))?.file_name());
    }
    Ok(out)
}

/// The changes that turn `lower` into `upper`, sorted by path bytes.
///
/// Like Docker and containerd, files count as equal when type, mode, owner, size, mtime
/// (nanoseconds), link target, device number and xattrs are equal; contents are compared only
/// when both mtimes have no sub-second part (filesystems with coarse timestamps). Directory
/// mtimes are ignored: adding a child changes them, and the child is its own change.
pub fn diff_dirs(lower: &Path, upper: &Path) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    diff_into(lower, upper, Path::new(""), &mut out)?;
    out.sort_by(|a, b| {
        a.path()
            .as_os_str()
            .as_bytes()
            .cmp(b.path().as_os_str().as_bytes())
    });
    Ok(out)
}

fn diff_into(lower: &Path, upper: &Path, rel: &Path, out: &mut Vec<Change>) -> Result<()> {
    let lnames = names(&lower.join(rel))?;
    let unames = names(&upper.join(rel))?;
    for name in lnames.difference(&unames) {
        out.push(Change::Deleted(rel.join(name)));
    }
    for name in &unames {
        let r = rel.join(name);
        let up = upper.join(&r);
        let umd = std::fs::symlink_metadata(&up).map_err(io_err("stat", &up))?;
        if umd.file_type().is_socket() {
            continue;
        }
        if !lnames.contains(name) {
            out.push(Change::Added(r.clone()));
            if umd.is_dir() {
                add_all(upper, &r, out)?;
            }
            continue;
        }
        let lp = lower.join(&r);
        let lmd = std::fs::symlink_metadata(&lp).map_err(io_err("stat", &lp))?;
        if lmd.is_dir() && umd.is_dir() {
            if !same_meta(&lp, &lmd, &up, &umd)? {
                out.push(Change::Modified(r.clone()));
            }
            diff_into(lower, upper, &r, out)?;
        } else if !same_meta(&lp, &lmd, &up, &umd)? {
            out.push(Change::Modified(r.clone()));
            if umd.is_dir() {
                add_all(upper, &r, out)?;
            }
        }
    }
    Ok(())
}

/// Every path under `root/rel` as `Added`.
fn add_all(root: &Path, rel: &Path, out: &mut Vec<Change>) -> Result<()> {
    let dir = root.join(rel);
    for name in names(&dir)? {
        let r = rel.join(&name);
        let p = root.join(&r);
        let md = std::fs::symlink_metadata(&p).map_err(io_err("stat", &p))?;
        if md.file_type().is_socket() {
            continue;
        }
        out.push(Change::Added(r.clone()));
        if md.is_dir() {
            add_all(root, &r, out)?;
        }
    }
    Ok(())
}

fn same_meta(lp: &Path, l: &Metadata, up: &Path, u: &Metadata) -> Result<bool> {
    // Type bits and permission bits together.
    if l.mode() != u.mode() || l.uid() != u.uid() || l.gid() != u.gid() {
        return Ok(false);
    }
    if read_xattrs(lp) != read_xattrs(up) {
        return Ok(false);
    }
    let ft = u.file_type();
    if ft.is_dir() {
        return Ok(true);
    }
    if ft.is_char_device() || ft.is_block_device() {
        return Ok(l.rdev() == u.rdev());
    }
    if l.size() != u.size() || l.mtime() != u.mtime() || l.mtime_nsec() != u.mtime_nsec() {
        return Ok(false);
    }
    if ft.is_symlink() {
        let lt = std::fs::read_link(lp).map_err(io_err("readlink", lp))?;
        let ut = std::fs::read_link(up).map_err(io_err("readlink", up))?;
        return Ok(lt == ut);
    }
    if ft.is_file() && l.mtime_nsec() == 0 {
        return same_content(lp, up);
    }
    Ok(true)
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let mut fa = std::fs::File::open(a).map_err(io_err("opening", a))?;
    let mut fb = std::fs::File::open(b).map_err(io_err("opening", b))?;
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let n = read_full(&mut fa, &mut ba).map_err(io_err("reading", a))?;
        let m = read_full(&mut fb, &mut bb).map_err(io_err("reading", b))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// The changes recorded in an overlayfs upper directory (kernel conventions,
/// Documentation/filesystems/overlayfs.rst): a character device 0/0 is a deleted path, a
/// directory with `trusted.overlay.opaque=y` (or `user.overlay.opaque=y` for `userxattr`
/// mounts) is opaque, and everything else present is `Modified` (an upper dir cannot tell
/// added from copied-up). Sorted by path bytes.
///
/// Mount the overlay with `redirect_dir=off` and `metacopy=off` (the kernel defaults): a
/// renamed directory or a metadata-only copy-up is not visible from the upper dir alone.
pub fn changes_from_overlay_upper(upper: &Path) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    overlay_into(upper, Path::new(""), &mut out)?;
    out.sort_by(|a, b| {
        a.path()
            .as_os_str()
            .as_bytes()
            .cmp(b.path().as_os_str().as_bytes())
    });
    Ok(out)
}

fn is_opaque(path: &Path) -> bool {
    [
        OsStr::new("trusted.overlay.opaque"),
        OsStr::new("user.overlay.opaque"),
    ]
    .iter()
    .any(|n| matches!(xattr::get(path, n), Ok(Some(v)) if v == b"y"))
}

fn overlay_into(upper: &Path, rel: &Path, out: &mut Vec<Change>) -> Result<()> {
    for name in names(&upper.join(rel))? {
        let r = rel.join(&name);
        let p = upper.join(&r);
        let md = std::fs::symlink_metadata(&p).map_err(io_err("stat", &p))?;
        let ft = md.file_type();
        if ft.is_socket() {
            continue;
        }
        if ft.is_char_device() && md.rdev() == 0 {
            out.push(Change::Deleted(r));
            continue;
        }
        if ft.is_dir() {
            out.push(if is_opaque(&p) {
                Change::Opaque(r.clone())
            } else {
                Change::Modified(r.clone())
            });
            overlay_into(upper, &r, out)?;
            continue;
        }
        out.push(Change::Modified(r));
    }
    Ok(())
}
