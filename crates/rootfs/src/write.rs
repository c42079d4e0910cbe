//! Writing a layer: a directory tree or a change list → reproducible tar → compressed blob,
//! with diff_id and blob digest computed in the same pass.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, Metadata};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path};

use strata_oci::{Compression, Descriptor, Digest, HashingWriter};

use crate::compress::{DEFAULT_GZIP_LEVEL, DEFAULT_ZSTD_LEVEL, Encoder, GzMemberCache};
use crate::diff::Change;
use crate::error::{Error, Result};
use crate::fsmeta::read_xattrs;
use crate::pargz::GzMember;
use crate::tarfmt::{self, Kind, Meta};

/// Name prefix that marks a whiteout (OCI image spec, layer.md "Whiteouts").
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of the opaque-directory marker (OCI image spec, layer.md "Opaque Whiteout").
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// How entry mtimes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtimePolicy {
    /// The file's own mtime (whole seconds). Whiteouts get 0.
    #[default]
    Keep,
    /// The file's own mtime, but never later than this (BuildKit's `SOURCE_DATE_EPOCH`
    /// rewrite); whiteouts get this value.
    Clamp(u64),
    /// This value for every entry.
    Set(u64),
}

impl MtimePolicy {
    /// `Clamp($SOURCE_DATE_EPOCH)` when that variable holds a number, else `None`.
    pub fn from_source_date_epoch() -> Option<MtimePolicy> {
        let v = std::env::var("SOURCE_DATE_EPOCH").ok()?;
        v.trim().parse().ok().map(MtimePolicy::Clamp)
    }

    fn apply(self, mtime: i64) -> u64 {
        let own = u64::try_from(mtime).unwrap_or(0);
        match self {
            MtimePolicy::Keep => own,
            MtimePolicy::Clamp(e) => own.min(e),
            MtimePolicy::Set(e) => e,
        }
    }

    fn for_whiteout(self) -> u64 {
        match self {
            MtimePolicy::Keep => 0,
            MtimePolicy::Clamp(e) | MtimePolicy::Set(e) => e,
        }
    }
}

/// Options of [`write_layer`].
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Compression of the blob.
    pub compression: Compression,
    /// gzip level 0–9 (default [`DEFAULT_GZIP_LEVEL`]).
    pub gzip_level: u32,
    /// zstd level (default [`DEFAULT_ZSTD_LEVEL`]).
    pub zstd_level: i32,
    /// Entry mtimes.
    pub mtime: MtimePolicy,
    /// Record this uid/gid for every entry instead of the files' own (COPY without `--chown`).
    pub owner: Option<(u32, u32)>,
    /// Record extended attributes (default true).
    pub xattrs: bool,
    /// gzip members of earlier layers to reuse (see [`crate::MemberCache`]); the blob is the
    /// same bytes with or without it.
    pub gzip_members: Option<GzMemberCache>,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            compression: Compression::Gzip,
            gzip_level: DEFAULT_GZIP_LEVEL,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            mtime: MtimePolicy::Keep,
            owner: None,
            xattrs: true,
            gzip_members: None,
        }
    }
}

impl LayerOptions {
    /// Options for a reproducible layer: mtimes clamped to `epoch`.
    pub fn reproducible(compression: Compression, epoch: u64) -> Self {
        LayerOptions {
            compression,
            mtime: MtimePolicy::Clamp(epoch),
            ..LayerOptions::default()
        }
    }
}

/// What [`write_layer`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// sha256 of the uncompressed tar (goes in the image config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// sha256 of the blob as written to the sink.
    pub digest: Digest,
    /// Size of the blob as written to the sink.
    pub size: u64,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// The OCI layer media type matching the compression.
    pub media_type: &'static str,
    /// The compression used.
    pub compression: Compression,
    /// Where each gzip member is in the blob and what it holds (empty unless gzip with
    /// [`LayerOptions::gzip_members`]).
    pub gzip_members: Vec<GzMember>,
}

impl LayerInfo {
    /// The manifest descriptor of this layer.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.media_type, self.digest.clone(), self.size)
    }
}

/// Where the entries of a layer come from.
#[derive(Debug, Clone, Copy)]
pub enum LayerSource<'a> {
    /// Every entry under this directory (the directory itself is not an entry).
    Dir(&'a Path),
    /// Only these changes; added and modified paths are read from `root`. A directory change
    /// writes the directory entry alone, not its contents.
    Changes {
        root: &'a Path,
        changes: &'a [Change],
    },
    /// Every entry under `root`, and regular files read where they are instead of from a
    /// copy under `root`, by their path in the layer (relative, `/`-separated bytes).
    /// `root` holds their parent directories.
    Staged {
        root: &'a Path,
        files: &'a BTreeMap<Vec<u8>, HostFile>,
    },
}

/// A regular file written into a layer from wherever it is, with the metadata the layer
/// records for it (no xattrs, as a copy made with `std::fs::copy` has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFile {
    /// Where it is read from (a final symlink is refused).
    pub path: std::path::PathBuf,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

enum Item<'a> {
    /// Read this path (relative to the source root) from disk.
    Disk,
    /// An empty whiteout file.
    Whiteout,
    /// A regular file read where it is.
    Host(&'a HostFile),
}

/// Writes a layer from `source` into `sink` and returns its digests and sizes, computed
/// while writing (the sink is never read back).
///
/// Entries are sorted by path bytes (so parents come before children), user and group names
/// are empty, only mtime is recorded, and a file seen twice by inode within the layer becomes
/// a hard link to the first path. Sockets are skipped (tar cannot hold them).
pub fn write_layer(
    source: LayerSource<'_>,
    opts: &LayerOptions,
    sink: impl Write,
) -> Result<LayerInfo> {
    let (root, plan) = match source {
        LayerSource::Dir(root) => {
            let mut plan = BTreeMap::new();
            walk(root, &mut Vec::new(), &mut plan)?;
            (root, plan)
        }
        LayerSource::Changes { root, changes } => (root, plan_changes(changes)?),
        LayerSource::Staged { root, files } => {
            let mut plan = BTreeMap::new();
            walk(root, &mut Vec::new(), &mut plan)?;
            for (name, file) in files {
                change_name(Path::new(std::ffi::OsStr::from_bytes(name)))?;
                plan.insert(name.clone(), Item::Host(file));
            }
            (root, plan)
        }
    };

    let mut tar = LayerStream::new(sink, opts)?;

    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    for (name, item) in &plan {
        match item {
            Item::Whiteout => {
                let meta = Meta {
                    path: name.clone(),
                    link: Vec::new(),
                    kind: Kind::File,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime: opts.mtime.for_whiteout(),
                    size: 0,
                    major: 0,
                    minor: 0,
                    xattrs: Vec::new(),
                    offset: 0,
                };
                tarfmt::write_header(&mut tar, &meta).map_err(Error::Sink)?;
            }
            Item::Disk => {
                let path = root.join(std::ffi::OsStr::from_bytes(name));
                write_disk_entry(&mut tar, &path, name, opts, &mut links, &mut buf)?;
            }
            Item::Host(file) => write_host_file(&mut tar, file, name, opts, &mut buf)?,
        }
    }
    tarfmt::write_end(&mut tar).map_err(Error::Sink)?;

    tar.finish(opts)
}

/// The writer stack every layer goes through: tar bytes → sha256 (diff_id) → compressor →
/// sha256 + size (blob digest) → sink. Both digests come out of the one pass.
pub(crate) struct LayerStream<W: Write> {
    tar: HashingWriter<Encoder<HashingWriter<BufWriter<W>>>>,
}

impl<W: Write> LayerStream<W> {
    pub(crate) fn new(sink: W, opts: &LayerOptions) -> Result<Self> {
        let blob = HashingWriter::new(BufWriter::with_capacity(256 * 1024, sink));
        let encoder = Encoder::new(
            blob,
            opts.compression,
            opts.gzip_level,
            opts.zstd_level,
            opts.gzip_members.as_ref(),
        )
        .map_err(Error::Sink)?;
        Ok(LayerStream {
            tar: HashingWriter::new(encoder),
        })
    }

    /// Flush the compressor and the sink; the layer's digests and sizes.
    pub(crate) fn finish(self, opts: &LayerOptions) -> Result<LayerInfo> {
        let (encoder, diff_id, uncompressed_size) = self.tar.finish();
        let (blob, gzip_members) = encoder.finish().map_err(Error::Sink)?;
        let (mut sink, digest, size) = blob.finish();
        sink.flush().map_err(Error::Sink)?;
        Ok(LayerInfo {
            diff_id,
            digest,
            size,
            uncompressed_size,
            media_type: opts.compression.oci_layer_media_type(),
            compression: opts.compression,
            gzip_members,
        })
    }
}

impl<W: Write> Write for LayerStream<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tar.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.tar.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tar.flush()
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Collects every path under `root/rel` (relative names) into `plan`.
fn walk(root: &Path, rel: &mut Vec<u8>, plan: &mut BTreeMap<Vec<u8>, Item<'_>>) -> Result<()> {
    let dir = root.join(std::ffi::OsStr::from_bytes(rel));
    for entry in std::fs::read_dir(&dir).map_err(io_err("reading directory", &dir))? {
        let entry = entry.map_err(io_err("reading directory", &dir))?;
        let name = entry.file_name();
        let name = name.as_bytes();
        let file_type = entry.file_type().map_err(io_err("stat", &entry.path()))?;
        if file_type.is_socket() {
            continue;
        }
        if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return Err(Error::InvalidChange {
                path: entry.path(),
                reason: "names starting with `.wh.` are reserved for whiteouts",
            });
        }
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name);
        plan.insert(rel.clone(), Item::Disk);
        if file_type.is_dir() {
            walk(root, rel, plan)?;
        }
        rel.truncate(len);
    }
    Ok(())
}

/// Relative path bytes of a change, refusing absolute paths and `..`.
fn change_name(path: &Path) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(s.as_bytes());
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                return Err(Error::InvalidChange {
                    path: path.to_path_buf(),
                    reason: "change paths must be relative and free of `..`",
                });
            }
        }
    }
    if out.is_empty() {
        return Err(Error::InvalidChange {
            path: path.to_path_buf(),
            reason: "the root itself cannot be a change",
        });
    }
    Ok(out)
}

fn plan_changes(changes: &[Change]) -> Result<BTreeMap<Vec<u8>, Item<'static>>> {
    let mut plan = BTreeMap::new();
    let mut deleted = Vec::new();
    for change in changes {
        let name = change_name(change.path())?;
        let (parent, base) = match name.iter().rposition(|b| *b == b'/') {
            Some(i) => (&name[..=i], &name[i + 1..]),
            None => (&b""[..], &name[..]),
        };
        if base.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return Err(Error::InvalidChange {
                path: change.path().to_path_buf(),
                reason: "names starting with `.wh.` are reserved for whiteouts",
            });
        }
        match change {
            Change::Added(_) | Change::Modified(_) => {
                plan.insert(name, Item::Disk);
            }
            Change::Opaque(_) => {
                let mut marker = name.clone();
                marker.push(b'/');
                marker.extend_from_slice(OPAQUE_MARKER.as_bytes());
                plan.insert(marker, Item::Whiteout);
                plan.insert(name, Item::Disk);
            }
            Change::Deleted(_) => {
                let mut wh = parent.to_vec();
                wh.extend_from_slice(WHITEOUT_PREFIX.as_bytes());
                wh.extend_from_slice(base);
                deleted.push((name, wh));
            }
        }
    }
    for (name, wh) in deleted {
        // A path both deleted and present ends up present: the entry replaces the lower one
        // anyway, so the whiteout would only be noise.
        if !plan.contains_key(&name) {
            plan.insert(wh, Item::Whiteout);
        }
    }
    Ok(plan)
}

fn write_disk_entry(
    tar: &mut impl Write,
    path: &Path,
    name: &[u8],
    opts: &LayerOptions,
    links: &mut HashMap<(u64, u64), Vec<u8>>,
    buf: &mut [u8],
) -> Result<()> {
    let md = std::fs::symlink_metadata(path).map_err(io_err("stat", path))?;
    let ft = md.file_type();
    let (uid, gid) = opts.owner.unwrap_or((md.uid(), md.gid()));
    let mut meta = Meta {
        path: name.to_vec(),
        link: Vec::new(),
        kind: Kind::File,
        mode: md.mode() & 0o7777,
        uid: u64::from(uid),
        gid: u64::from(gid),
        mtime: opts.mtime.apply(md.mtime()),
        size: 0,
        major: 0,
        minor: 0,
        xattrs: if opts.xattrs {
            read_xattrs(path)
        } else {
            Vec::new()
        },
        offset: 0,
    };
    if ft.is_socket() {
        return Ok(());
    }
    if !ft.is_dir() && md.nlink() > 1 {
        if let Some(first) = links.get(&(md.dev(), md.ino())) {
            meta.kind = Kind::Hardlink;
            meta.link = first.clone();
            meta.xattrs.clear();
            return tarfmt::write_header(tar, &meta).map_err(Error::Sink);
        }
        links.insert((md.dev(), md.ino()), name.to_vec());
    }
    if ft.is_dir() {
        meta.kind = Kind::Dir;
    } else if ft.is_symlink() {
        meta.kind = Kind::Symlink;
        meta.link = std::fs::read_link(path)
            .map_err(io_err("readlink", path))?
            .as_os_str()
            .as_bytes()
            .to_vec();
    } else if ft.is_char_device() || ft.is_block_device() {
        meta.kind = if ft.is_char_device() {
            Kind::Char
        } else {
            Kind::Block
        };
        meta.major = rustix::fs::major(md.rdev());
        meta.minor = rustix::fs::minor(md.rdev());
    } else if ft.is_fifo() {
        meta.kind = Kind::Fifo;
    } else {
        meta.size = md.len();
        return write_file(tar, path, &meta, &md, buf);
    }
    tarfmt::write_header(tar, &meta).map_err(Error::Sink)
}

/// A [`HostFile`]: opened once, its size and mtime taken from the open file.
fn write_host_file(
    tar: &mut impl Write,
    file: &HostFile,
    name: &[u8],
    opts: &LayerOptions,
    buf: &mut [u8],
) -> Result<()> {
    let path = &file.path;
    let f = open_nofollow(path)?;
    let md = f.metadata().map_err(io_err("stat", path))?;
    if !md.is_file() {
        return Err(Error::InvalidChange {
            path: path.clone(),
            reason: "a file to copy is no longer a regular file",
        });
    }
    let (uid, gid) = opts.owner.unwrap_or((file.uid, file.gid));
    let meta = Meta {
        path: name.to_vec(),
        link: Vec::new(),
        kind: Kind::File,
        mode: file.mode & 0o7777,
        uid: u64::from(uid),
        gid: u64::from(gid),
        mtime: opts.mtime.apply(md.mtime()),
        size: md.len(),
        major: 0,
        minor: 0,
        xattrs: Vec::new(),
        offset: 0,
    };
    copy_file_data(tar, f, path, &meta, &md, buf)
}

// O_NOFOLLOW: the path was a regular file when we looked; if it was swapped for a symlink
// since, fail instead of archiving whatever it points to.
fn open_nofollow(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("opening", path))
}

fn write_file(
    tar: &mut impl Write,
    path: &Path,
    meta: &Meta,
    md: &Metadata,
    buf: &mut [u8],
) -> Result<()> {
    let file = open_nofollow(path)?;
    copy_file_data(tar, file, path, meta, md, buf)
}

/// The header of `meta`, then exactly `meta.size` bytes of `file` and the padding; a file
/// that shrank or grew meanwhile is an error, never a cut or padded entry.
fn copy_file_data(
    tar: &mut impl Write,
    mut file: File,
    path: &Path,
    meta: &Meta,
    md: &Metadata,
    buf: &mut [u8],
) -> Result<()> {
    tarfmt::write_header(tar, meta).map_err(Error::Sink)?;
    let changed = || Error::FileChanged {
        path: path.to_path_buf(),
        expected: md.len(),
    };
    let mut left = meta.size;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => return Err(changed()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("reading", path)(e)),
        };
        tar.write_all(&buf[..n]).map_err(Error::Sink)?;
        left -= n as u64;
    }
    // A file that grew would be silently cut: refuse instead.
    if file.read(&mut buf[..1]).map_err(io_err("reading", path))? != 0 {
        return Err(changed());
    }
    tarfmt::write_padding(tar, meta.size).map_err(Error::Sink)
}
