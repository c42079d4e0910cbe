//! Applying a layer to a directory without ever writing outside it.
//!
//! Every name in the stream (entry paths, hard link targets, whiteouts) is resolved as if the
//! target were `/`: `..` is resolved lexically and clamped at the root, and symlinks already in
//! the target are followed by hand, one component at a time with `O_NOFOLLOW`, so an absolute
//! or `../..` symlink lands back inside the target. Files are then created with `*at` calls
//! relative to the resolved parent directory, never by path.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use strata_oci::{Compression, Digest};

use crate::compress::{HashingReader, decompress};
use crate::error::{Error, Refusal, Result};
use crate::fsmeta::xattr_is_layer_content;
use crate::tarfmt::{DataError, Kind, Meta, TarReader};
use crate::write::{OPAQUE_MARKER, WHITEOUT_PREFIX};

/// Symlinks followed while resolving one path before we give up (Linux's own limit).
const MAX_SYMLINK_HOPS: u32 = 40;

/// What to do with whiteout entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WhiteoutMode {
    /// Delete what they name in the target (flattening layers into one tree).
    #[default]
    Apply,
    /// Keep them as overlayfs expects in a lowerdir: a 0/0 character device for a deleted path,
    /// `trusted.overlay.opaque=y` on an opaque directory. Needs root.
    Overlay,
}

/// Options of [`apply_layer_with`].
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// How whiteouts are applied.
    pub whiteouts: WhiteoutMode,
    /// Set owners from the layer (default: when running as root).
    pub chown: bool,
    /// Create device nodes (default: when running as root; otherwise they are counted in
    /// [`ApplyStats::skipped_devices`]).
    pub devices: bool,
    /// The image's lower layers (snapshot directories in overlay form, top first) when the
    /// target is a layer of its own (overlay lowerdirs). They take part in resolving entry
    /// paths as if they were in the target, which is the one rule of every tree strata makes
    /// (`strata unpack` applies all layers into one tree and gets the same): a lower layer's
    /// symlink on an entry's path is followed inside the image (`x -> /` makes `x/etc/f`
    /// land at `etc/f`, as Docker does), a lower file there is not a directory (refused),
    /// and a parent directory created without an entry of its own takes the lower
    /// directory's mode, owner and mtime (an implied `/tmp` must not shadow the lower 1777
    /// with 0755), else 0755. They are read with [`crate::lookup_in_layers`], which never
    /// follows a symlink out of the image.
    pub lower_layers: Vec<PathBuf>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        let root = rustix::process::geteuid().is_root();
        ApplyOptions {
            whiteouts: WhiteoutMode::Apply,
            chown: root,
            devices: root,
            lower_layers: Vec::new(),
        }
    }
}

/// What [`apply_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    /// sha256 of the uncompressed stream, end padding included: compare with the diff_id.
    pub diff_id: Digest,
    /// Bytes of uncompressed stream read.
    pub uncompressed_size: u64,
    /// Entries in the stream (whiteouts included, PAX headers not).
    pub entries: u64,
    /// Regular files created.
    pub files: u64,
    /// Directories created or updated (the root included).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Hard links created.
    pub hardlinks: u64,
    /// Character and block devices and fifos created.
    pub specials: u64,
    /// Whiteouts applied (or recorded, in overlay mode).
    pub whiteouts: u64,
    /// Opaque directory markers applied.
    pub opaque_dirs: u64,
    /// Bytes of regular file data written.
    pub file_bytes: u64,
    /// Device nodes not created because [`ApplyOptions::devices`] was off.
    pub skipped_devices: u64,
    /// Extended attributes that could not be set (filesystem or privilege limits).
    pub xattr_failures: u64,
}

/// Applies a layer (compressed as `compression`) to `target`, which must exist, with
/// [`ApplyOptions::default`].
///
/// A failed apply leaves `target` partly written: unpack into a fresh directory and rename it
/// into place on success (as [`crate::SnapshotCache`] does).
pub fn apply_layer(
    reader: impl Read,
    compression: Compression,
    target: &Path,
) -> Result<ApplyStats> {
    apply_layer_with(reader, compression, target, &ApplyOptions::default())
}

/// [`apply_layer`] with explicit options.
pub fn apply_layer_with(
    reader: impl Read,
    compression: Compression,
    target: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyStats> {
    let root = rustix::fs::open(
        target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::Io {
        op: "opening target directory",
        path: target.to_path_buf(),
        source: e.into(),
    })?;
    let decoder =
        decompress(reader, compression).map_err(|source| Error::Stream { offset: 0, source })?;
    let mut hashing = HashingReader::new(decoder);
    let mut applier = Applier {
        root,
        target: target.to_path_buf(),
        opts: opts.clone(),
        layer_paths: HashSet::new(),
        layer_inodes: HashSet::new(),
        dirs: Vec::new(),
        stats: Counters::default(),
        buf: vec![0u8; 256 * 1024],
        parent_cache: None,
        cache_stale: false,
    };
    let mut tar = TarReader::new(&mut hashing);
    while let Some(meta) = tar.next_entry()? {
        applier.stats.entries += 1;
        applier.entry(&meta, &mut tar)?;
    }
    applier.finish_dirs()?;
    // The diff_id covers the whole stream, including the zero blocks after the end marker.
    let offset = tar.offset();
    drop(tar);
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|source| Error::Stream { offset, source })?;
    let (diff_id, uncompressed_size) = hashing.finish();
    let c = applier.stats;
    Ok(ApplyStats {
        diff_id,
        uncompressed_size,
        entries: c.entries,
        files: c.files,
        dirs: c.dirs,
        symlinks: c.symlinks,
        hardlinks: c.hardlinks,
        specials: c.specials,
        whiteouts: c.whiteouts,
        opaque_dirs: c.opaque_dirs,
        file_bytes: c.file_bytes,
        skipped_devices: c.skipped_devices,
        xattr_failures: c.xattr_failures,
    })
}

#[derive(Default)]
struct Counters {
    entries: u64,
    files: u64,
    dirs: u64,
    symlinks: u64,
    hardlinks: u64,
    specials: u64,
    whiteouts: u64,
    opaque_dirs: u64,
    file_bytes: u64,
    skipped_devices: u64,
    xattr_failures: u64,
}

/// Why resolving or creating something failed, before the entry context is attached.
enum Fail {
    Refuse(Refusal),
    Os(&'static str, std::io::Error),
}

impl From<Refusal> for Fail {
    fn from(r: Refusal) -> Self {
        Fail::Refuse(r)
    }
}

fn os(op: &'static str) -> impl FnOnce(Errno) -> Fail {
    move |e| Fail::Os(op, e.into())
}

type Comps = Vec<Vec<u8>>;

/// Splits an archive path into components, resolving `.` and `..` lexically and clamping at
/// the root (so `../../etc` is `etc` and `/abs` is `abs`).
/// The longest path an entry may name, in bytes once cleaned: Linux's `PATH_MAX` less its
/// NUL. The kernel refuses longer paths anyway; bounding them here keeps the work per entry
/// (and the memory of [`Applier::mark_layer_path`]) bounded whatever a layer holds.
pub const MAX_PATH_BYTES: usize = 4095;

fn clean(path: &[u8]) -> Result<Comps, Refusal> {
    if path.contains(&0) {
        return Err(Refusal::NulInPath);
    }
    let mut out: Comps = Vec::new();
    // Bytes of `out` joined with `/`, kept as it changes so the bound costs nothing.
    let mut len = 0usize;
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if let Some(last) = out.pop() {
                    len -= last.len() + usize::from(!out.is_empty());
                }
            }
            c => {
                len += c.len() + usize::from(!out.is_empty());
                if len > MAX_PATH_BYTES {
                    return Err(Refusal::PathTooLong {
                        limit: MAX_PATH_BYTES,
                    });
                }
                out.push(c.to_vec());
            }
        }
    }
    Ok(out)
}

fn join(comps: &[Vec<u8>]) -> Vec<u8> {
    comps.join(&b'/')
}

fn lossy(comps: &[Vec<u8>]) -> String {
    crate::tarfmt::printable_path(&join(comps))
}

fn timestamps(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn id(what: &'static str, value: u64) -> Result<u32, Refusal> {
    u32::try_from(value).map_err(|_| Refusal::IdOutOfRange { what, value })
}

/// Removes `name` in `dir`, recursively if it is a directory, never following symlinks.
fn remove_all(dir: BorrowedFd<'_>, name: &[u8]) -> rustix::io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for child in list_dir(fd.as_fd())? {
        remove_all(fd.as_fd(), &child)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Names in a directory (opened for reading), `.` and `..` left out.
fn list_dir(fd: BorrowedFd<'_>) -> rustix::io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    Ok(names)
}

struct Applier {
    root: OwnedFd,
    /// Where `root` is (for reading the lower layers at the same paths).
    target: PathBuf,
    opts: ApplyOptions,
    /// Paths (lexical) that this layer created, and their ancestors: whiteouts and opaque
    /// markers only hide lower layers' content (OCI layer.md), never this layer's.
    layer_paths: HashSet<Vec<u8>>,
    /// The files, symlinks and nodes this layer created, by (device, inode): a hard link must
    /// name one of them, never a lower layer's file, in every tree strata makes (a snapshot
    /// cannot link into another layer's directory, so `strata unpack`'s one tree refuses it
    /// too).
    layer_inodes: HashSet<(u64, u64)>,
    /// Directories whose mode and mtime are set at the end, when no child will change them.
    dirs: Vec<(Comps, u32, u64)>,
    stats: Counters,
    buf: Vec<u8>,
    /// The last parent directory resolved, reused by the next entry with the same parent
    /// (entries come sorted, so most do). Dropped whenever anything is removed or a symlink
    /// appears, since either can change what a path resolves to.
    parent_cache: Option<(Comps, OwnedFd)>,
    cache_stale: bool,
}

impl Applier {
    fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Opens (`O_PATH`) the directory at `comps` inside the root, following symlinks inside the
    /// root only. With `create`, missing directories are made (0755); without, a missing one
    /// gives `None`.
    fn resolve_dir(&self, comps: &[Vec<u8>], create: bool) -> Result<Option<OwnedFd>, Fail> {
        let mut stack: Vec<OwnedFd> = Vec::new();
        let mut queue: VecDeque<Vec<u8>> = comps.iter().cloned().collect();
        let mut walked: Comps = Vec::new();
        // The path of stack's top inside the root, after symlinks.
        let mut real: Comps = Vec::new();
        let mut hops = 0;
        while let Some(c) = queue.pop_front() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                stack.pop();
                real.pop();
                continue;
            }
            let cur = stack.last().map_or(self.root_fd(), |f| f.as_fd());
            let fd = match rustix::fs::openat(
                cur,
                &c,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    let mut path = real.clone();
                    path.push(c.clone());
                    match self.in_lower_layers(&path) {
                        Some((host, md)) if md.file_type().is_symlink() => {
                            // A lower layer's symlink: followed inside the image.
                            walked.push(c);
                            hops += 1;
                            if hops > MAX_SYMLINK_HOPS {
                                return Err(Refusal::SymlinkLoop(MAX_SYMLINK_HOPS).into());
                            }
                            let target =
                                rustix::fs::readlink(&host, Vec::new()).map_err(os("readlink"))?;
                            let target = target.to_bytes();
                            if target.starts_with(b"/") {
                                stack.clear();
                                real.clear();
                            }
                            for part in target.split(|b| *b == b'/').rev() {
                                queue.push_front(part.to_vec());
                            }
                            continue;
                        }
                        Some((_, md)) if !md.is_dir() => {
                            walked.push(c);
                            return Err(Refusal::NotADirectory(lossy(&walked)).into());
                        }
                        _ => {}
                    }
                    match rustix::fs::mkdirat(cur, &c, Mode::from_raw_mode(0o755)) {
                        Ok(()) => {
                            let mut path = real.clone();
                            path.push(c.clone());
                            self.copy_parent_template(cur, &c, &path)?;
                        }
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(os("creating parent directory")(e)),
                    }
                    queue.push_front(c);
                    continue;
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(e) => return Err(os("opening parent directory")(e)),
            };
            walked.push(c);
            let st = rustix::fs::fstat(&fd).map_err(os("stat"))?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => {
                    stack.push(fd);
                    real.push(walked[walked.len() - 1].clone());
                }
                FileType::Symlink => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(Refusal::SymlinkLoop(MAX_SYMLINK_HOPS).into());
                    }
                    let target =
                        rustix::fs::readlinkat(&fd, "", Vec::new()).map_err(os("readlink"))?;
                    let target = target.to_bytes();
                    if target.starts_with(b"/") {
                        stack.clear();
                        real.clear();
                    }
                    for part in target.split(|b| *b == b'/').rev() {
                        queue.push_front(part.to_vec());
                    }
                }
                _ => return Err(Refusal::NotADirectory(lossy(&walked)).into()),
            }
        }
        match stack.pop() {
            Some(fd) => Ok(Some(fd)),
            None => self
                .root
                .try_clone()
                .map(Some)
                .map_err(|e| Fail::Os("dup", e)),
        }
    }

    /// What the lower layers have at `comps` (this layer's own entries above them), never
    /// following a symlink; `None` without lower layers.
    fn in_lower_layers(&self, comps: &[Vec<u8>]) -> Option<(PathBuf, std::fs::Metadata)> {
        if self.opts.lower_layers.is_empty() {
            return None;
        }
        let mut layers = Vec::with_capacity(self.opts.lower_layers.len() + 1);
        layers.push(self.target.clone());
        layers.extend(self.opts.lower_layers.iter().cloned());
        let rel = PathBuf::from(std::ffi::OsStr::from_bytes(&join(comps)));
        crate::lookup_in_layers(&layers, &rel)
    }

    /// Gives a directory we had to create the metadata of the same path in the lower layers.
    fn copy_parent_template(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        real: &[Vec<u8>],
    ) -> Result<(), Fail> {
        use std::os::unix::fs::MetadataExt;
        // The merged lower layers, read without following any symlink: a lower `x -> /` must
        // never make the host's `/etc` the template of an implied `x/etc`.
        let rel = PathBuf::from(std::ffi::OsStr::from_bytes(&join(real)));
        let Some(md) = crate::lookup_in_layers(&self.opts.lower_layers, &rel)
            .map(|(_, md)| md)
            .filter(|m| m.is_dir())
        else {
            return Ok(());
        };
        if self.opts.chown {
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(md.uid())),
                Some(rustix::fs::Gid::from_raw(md.gid())),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(os("chown"))?;
        }
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode(md.mode() & 0o7777),
            AtFlags::empty(),
        )
        .map_err(os("chmod"))?;
        let mtime = u64::try_from(md.mtime()).unwrap_or(0);
        rustix::fs::utimensat(dir, name, &timestamps(mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(os("setting mtime"))
    }

    fn err(meta: &Meta, fail: Fail) -> Error {
        match fail {
            Fail::Refuse(reason) => Error::Refused {
                entry: meta.display_path(),
                offset: meta.offset,
                reason,
            },
            Fail::Os(op, source) => Error::Apply {
                entry: meta.display_path(),
                offset: meta.offset,
                op,
                source,
            },
        }
    }

    fn entry<R: Read>(&mut self, meta: &Meta, tar: &mut TarReader<R>) -> Result<()> {
        let comps = clean(&meta.path).map_err(|r| Self::err(meta, r.into()))?;
        if let Some(base) = comps.last()
            && let Some(name) = base.strip_prefix(WHITEOUT_PREFIX.as_bytes())
        {
            let parent = &comps[..comps.len() - 1];
            return if base == OPAQUE_MARKER.as_bytes() {
                self.opaque(parent).map_err(|f| Self::err(meta, f))
            } else if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                // `.wh..wh.*` other than the opaque marker is AUFS bookkeeping (hard link
                // directories); Docker and containerd ignore it too.
                Ok(())
            } else {
                self.whiteout(parent, name).map_err(|f| Self::err(meta, f))
            };
        }
        self.create(meta, &comps, tar).map_err(|e| match e {
            CreateError::Fail(f) => Self::err(meta, f),
            CreateError::Stream(e) => e,
        })
    }

    fn whiteout(&mut self, parent: &[Vec<u8>], name: &[u8]) -> Result<(), Fail> {
        if name.is_empty() || name == b"." || name == b".." {
            return Err(Refusal::BadWhiteout(format!(
                "{WHITEOUT_PREFIX}{}",
                crate::tarfmt::printable_path(name)
            ))
            .into());
        }
        let mut path = parent.to_vec();
        path.push(name.to_vec());
        if self.layer_paths.contains(&join(&path)) {
            return Ok(());
        }
        self.stats.whiteouts += 1;
        self.parent_cache = None;
        match self.opts.whiteouts {
            WhiteoutMode::Apply => {
                let Some(dir) = self.resolve_dir(parent, false)? else {
                    return Ok(());
                };
                remove_all(dir.as_fd(), name).map_err(os("removing whited-out path"))
            }
            WhiteoutMode::Overlay => {
                let Some(dir) = self.resolve_dir(parent, true)? else {
                    return Ok(());
                };
                remove_all(dir.as_fd(), name).map_err(os("removing whited-out path"))?;
                rustix::fs::mknodat(
                    &dir,
                    name,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(os("creating overlay whiteout device"))
            }
        }
    }

    fn opaque(&mut self, dir_comps: &[Vec<u8>]) -> Result<(), Fail> {
        self.stats.opaque_dirs += 1;
        self.parent_cache = None;
        let Some(dir) = self.resolve_dir(dir_comps, true)? else {
            return Ok(());
        };
        let dir = rustix::fs::openat(
            &dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(os("opening opaque directory"))?;
        match self.opts.whiteouts {
            WhiteoutMode::Apply => self.clear_lower(dir.as_fd(), &join(dir_comps)),
            WhiteoutMode::Overlay => {
                rustix::fs::fsetxattr(&dir, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                    .map_err(os("setting trusted.overlay.opaque"))
            }
        }
    }

    /// Removes everything under `dir` that this layer did not create.
    fn clear_lower(&self, dir: BorrowedFd<'_>, prefix: &[u8]) -> Result<(), Fail> {
        for name in list_dir(dir).map_err(os("listing opaque directory"))? {
            let mut child = prefix.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(&name);
            if !self.layer_paths.contains(&child) {
                remove_all(dir, &name).map_err(os("emptying opaque directory"))?;
                continue;
            }
            match rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(sub) => self.clear_lower(sub.as_fd(), &child)?,
                Err(Errno::NOTDIR) | Err(Errno::LOOP) => {}
                Err(e) => return Err(os("opening directory")(e)),
            }
        }
        Ok(())
    }

    /// Records `comps` and its ancestors. Longest first, stopping at the first one already
    /// known (its ancestors are known too): siblings add one path each, not their depth.
    fn mark_layer_path(&mut self, comps: &[Vec<u8>]) {
        let mut p = join(comps);
        for i in (1..=comps.len()).rev() {
            if !self.layer_paths.insert(p.clone()) {
                return;
            }
            let parent_len = p.len().saturating_sub(comps[i - 1].len() + 1);
            p.truncate(parent_len);
        }
    }

    fn create<R: Read>(
        &mut self,
        meta: &Meta,
        comps: &[Vec<u8>],
        tar: &mut TarReader<R>,
    ) -> Result<(), CreateError> {
        let Some((_, parent_comps)) = comps.split_last() else {
            if meta.kind != Kind::Dir {
                return Err(Fail::Refuse(Refusal::RootNotDir(meta.kind.name())).into());
            }
            self.stats.dirs += 1;
            if self.opts.chown {
                let (uid, gid) = (id("uid", meta.uid)?, id("gid", meta.gid)?);
                rustix::fs::fchown(
                    &self.root,
                    Some(rustix::fs::Uid::from_raw(uid)),
                    Some(rustix::fs::Gid::from_raw(gid)),
                )
                .map_err(os("chown"))?;
            }
            self.dirs.push((Vec::new(), meta.mode, meta.mtime));
            return Ok(());
        };
        let uid = id("uid", meta.uid)?;
        let gid = id("gid", meta.gid)?;

        // Resolve a hard link's target before touching the destination: it may be the same path.
        let link_target = if meta.kind == Kind::Hardlink {
            Some(self.hardlink_target(meta)?)
        } else {
            None
        };
        self.mark_layer_path(comps);
        let parent = match self.parent_cache.take() {
            Some((cached, fd)) if cached.as_slice() == parent_comps => fd,
            _ => self
                .resolve_dir(parent_comps, true)?
                .ok_or(Fail::Os("opening parent directory", Errno::NOENT.into()))?,
        };
        self.cache_stale = false;
        let result = self.create_in(meta, comps, parent.as_fd(), link_target, (uid, gid), tar);
        if result.is_ok()
            && matches!(
                meta.kind,
                Kind::File | Kind::Symlink | Kind::Char | Kind::Block | Kind::Fifo
            )
        {
            let name: &[u8] = comps.last().map_or(&[][..], |n| n.as_slice());
            if let Ok(st) = rustix::fs::statat(parent.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) {
                self.layer_inodes.insert((st.st_dev, st.st_ino));
            }
        }
        if !self.cache_stale {
            self.parent_cache = Some((parent_comps.to_vec(), parent));
        }
        result
    }

    fn create_in<R: Read>(
        &mut self,
        meta: &Meta,
        comps: &[Vec<u8>],
        parent: BorrowedFd<'_>,
        link_target: Option<(OwnedFd, Vec<u8>, rustix::fs::Stat)>,
        (uid, gid): (u32, u32),
        tar: &mut TarReader<R>,
    ) -> Result<(), CreateError> {
        let name: &[u8] = comps.last().map_or(&[][..], |n| n.as_slice());
        match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                if let Some((_, _, tst)) = &link_target
                    && tst.st_ino == st.st_ino
                    && tst.st_dev == st.st_dev
                {
                    // Already the same inode (a link to itself, or applied twice).
                    self.stats.hardlinks += 1;
                    return Ok(());
                }
                if !(is_dir && meta.kind == Kind::Dir) {
                    self.cache_stale = true;
                    remove_all(parent, name).map_err(os("replacing existing path"))?;
                }
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(os("stat")(e).into()),
        }

        let chown = |dir: BorrowedFd<'_>, name: &[u8]| -> Result<(), Fail> {
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(os("chown"))
        };

        match meta.kind {
            Kind::File => {
                let fd = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(os("creating file"))?;
                let mut file = File::from(fd);
                let n = tar
                    .copy_data(&mut file, &mut self.buf)
                    .map_err(|e| match e {
                        DataError::Read(e) => CreateError::Stream(e),
                        DataError::Write(e) => CreateError::Fail(Fail::Os("writing file", e)),
                    })?;
                self.stats.files += 1;
                self.stats.file_bytes += n;
                // Order matters: chown clears setuid bits, and writing or chown clears
                // security.capability, so mode and xattrs come after both.
                if self.opts.chown {
                    rustix::fs::fchown(
                        &file,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )
                    .map_err(os("chown"))?;
                }
                rustix::fs::fchmod(&file, Mode::from_raw_mode(meta.mode)).map_err(os("chmod"))?;
                self.set_xattrs_fd(file.as_fd(), meta);
                rustix::fs::futimens(&file, &timestamps(meta.mtime))
                    .map_err(os("setting mtime"))?;
            }
            Kind::Dir => {
                match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(os("creating directory")(e).into()),
                }
                let dir = rustix::fs::openat(
                    parent,
                    name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(os("opening directory"))?;
                self.stats.dirs += 1;
                if self.opts.chown {
                    rustix::fs::fchown(
                        &dir,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )
                    .map_err(os("chown"))?;
                }
                self.set_xattrs_fd(dir.as_fd(), meta);
                self.dirs.push((comps.to_vec(), meta.mode, meta.mtime));
            }
            Kind::Symlink => {
                if meta.link.contains(&0) {
                    return Err(Fail::Refuse(Refusal::NulInPath).into());
                }
                rustix::fs::symlinkat(meta.link.as_slice(), parent, name)
                    .map_err(os("creating symlink"))?;
                self.stats.symlinks += 1;
                if self.opts.chown {
                    chown(parent, name)?;
                }
                self.set_xattrs_path(parent, name, meta);
                rustix::fs::utimensat(
                    parent,
                    name,
                    &timestamps(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(os("setting mtime"))?;
            }
            Kind::Hardlink => {
                let Some((tdir, tname, _)) = link_target else {
                    return Ok(());
                };
                rustix::fs::linkat(&tdir, tname, parent, name, AtFlags::empty())
                    .map_err(os("creating hard link"))?;
                self.stats.hardlinks += 1;
            }
            Kind::Char | Kind::Block | Kind::Fifo => {
                let (ft, dev) = match meta.kind {
                    Kind::Char => (
                        FileType::CharacterDevice,
                        rustix::fs::makedev(meta.major, meta.minor),
                    ),
                    Kind::Block => (
                        FileType::BlockDevice,
                        rustix::fs::makedev(meta.major, meta.minor),
                    ),
                    _ => (FileType::Fifo, 0),
                };
                if ft != FileType::Fifo && !self.opts.devices {
                    self.stats.skipped_devices += 1;
                    return Ok(());
                }
                rustix::fs::mknodat(parent, name, ft, Mode::from_raw_mode(meta.mode), dev)
                    .map_err(os("creating device node"))?;
                self.stats.specials += 1;
                if self.opts.chown {
                    chown(parent, name)?;
                }
                // mknod applies the umask; set the exact mode. The node was just created by
                // us and is not a symlink, so following is not a concern.
                rustix::fs::chmodat(
                    parent,
                    name,
                    Mode::from_raw_mode(meta.mode),
                    AtFlags::empty(),
                )
                .map_err(os("chmod"))?;
                self.set_xattrs_path(parent, name, meta);
                rustix::fs::utimensat(
                    parent,
                    name,
                    &timestamps(meta.mtime),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(os("setting mtime"))?;
            }
        }
        Ok(())
    }

    /// The directory, name and stat of a hard link's target, which must already be in the target.
    fn hardlink_target(&self, meta: &Meta) -> Result<(OwnedFd, Vec<u8>, rustix::fs::Stat), Fail> {
        let shown = crate::tarfmt::printable_path(&meta.link);
        let comps = clean(&meta.link)?;
        let Some((name, parent)) = comps.split_last() else {
            return Err(Refusal::HardlinkToRoot.into());
        };
        let missing = || Fail::Refuse(Refusal::HardlinkTargetMissing(shown.clone()));
        let dir = match self.resolve_dir(parent, false) {
            Ok(Some(dir)) => dir,
            Ok(None) | Err(Fail::Refuse(Refusal::NotADirectory(_))) => return Err(missing()),
            Err(e) => return Err(e),
        };
        let st = match rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Err(missing()),
            Err(e) => return Err(os("stat hard link target")(e)),
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            return Err(Refusal::HardlinkToDir(shown).into());
        }
        if !self.layer_inodes.contains(&(st.st_dev, st.st_ino)) {
            return Err(Refusal::HardlinkToLowerLayer(shown).into());
        }
        Ok((dir, name.clone(), st))
    }

    fn set_xattrs_fd(&mut self, fd: BorrowedFd<'_>, meta: &Meta) {
        for (k, v) in &meta.xattrs {
            if !xattr_is_layer_content(k) {
                continue;
            }
            if rustix::fs::fsetxattr(fd, k.as_slice(), v, XattrFlags::empty()).is_err() {
                self.stats.xattr_failures += 1;
            }
        }
    }

    /// For symlinks and device nodes, which cannot be opened for `fsetxattr`: go through the
    /// parent's `/proc/self/fd` link, whose last component is not followed by `lsetxattr`.
    fn set_xattrs_path(&mut self, dir: BorrowedFd<'_>, name: &[u8], meta: &Meta) {
        let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
        path.extend_from_slice(name);
        for (k, v) in &meta.xattrs {
            if !xattr_is_layer_content(k) {
                continue;
            }
            if rustix::fs::lsetxattr(path.as_slice(), k.as_slice(), v, XattrFlags::empty()).is_err()
            {
                self.stats.xattr_failures += 1;
            }
        }
    }

    /// Sets directory modes and mtimes, deepest first, once nothing else will be created in them.
    fn finish_dirs(&mut self) -> Result<()> {
        let dirs = std::mem::take(&mut self.dirs);
        for (comps, mode, mtime) in dirs.into_iter().rev() {
            let shown = lossy(&comps);
            let fail = |op: &'static str| {
                let entry = shown.clone();
                move |e: Errno| Error::Apply {
                    entry,
                    offset: 0,
                    op,
                    source: e.into(),
                }
            };
            let Some((name, parent)) = comps.split_last() else {
                rustix::fs::fchmod(&self.root, Mode::from_raw_mode(mode)).map_err(fail("chmod"))?;
                rustix::fs::futimens(&self.root, &timestamps(mtime))
                    .map_err(fail("setting mtime"))?;
                continue;
            };
            // Later entries may have replaced or removed the directory: then there is nothing to do.
            let Ok(Some(dir)) = self.resolve_dir(parent, false) else {
                continue;
            };
            match rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
                _ => continue,
            }
            rustix::fs::chmodat(
                &dir,
                name.as_slice(),
                Mode::from_raw_mode(mode),
                AtFlags::empty(),
            )
            .map_err(fail("chmod"))?;
            rustix::fs::utimensat(
                &dir,
                name.as_slice(),
                &timestamps(mtime),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(fail("setting mtime"))?;
        }
        Ok(())
    }
}

enum CreateError {
    Fail(Fail),
    Stream(Error),
}

impl From<Fail> for CreateError {
    fn from(f: Fail) -> Self {
        CreateError::Fail(f)
    }
}

impl From<Refusal> for CreateError {
    fn from(r: Refusal) -> Self {
        CreateError::Fail(Fail::Refuse(r))
    }
}

use std::os::unix::ffi::OsStrExt;

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> Vec<String> {
        clean(p.as_bytes())
            .unwrap()
            .into_iter()
            .map(|c| String::from_utf8(c).unwrap())
            .collect()
    }

    #[test]
    fn clean_resolves_dots_lexically_and_clamps_at_the_root() {
        assert_eq!(c("../../etc/passwd"), ["etc", "passwd"]);
        assert_eq!(c("/abs//path/./x/"), ["abs", "path", "x"]);
        assert_eq!(c("a/b/../../../c"), ["c"]);
        assert!(c("./").is_empty());
        assert!(c("a/..").is_empty());
        assert_eq!(clean(b"a\0b"), Err(Refusal::NulInPath));
    }
}
