//! Executing `COPY`/`ADD` without a container: the files are staged in a temporary
//! directory with the metadata the layer must record, and that directory becomes the layer.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::Arc;
use strata_dockerfile::IgnoreMatcher;
use strata_oci::{Descriptor, Digest};

use strata_rootfs::{
    GzMemberCache, HostFile, LayerOptions, LayerSource, MEMBER_SCHEME, MemberCache, MtimePolicy,
    write_layer,
};
use strata_store::{BlobRange, BlobRanges};

use crate::context::{Ctx, StageState};
use crate::error::{Error, Result, io_err};
use crate::plan::{CopySource, CopyStep, FileSource};
use crate::source::{self, Kind, Matched, Origin};
use crate::view::{ImageView, Reads};
use strata_oci::names;

/// What a COPY/ADD reads, found before its cache key is computed.
#[derive(Default)]
pub(crate) struct Prepared {
    /// Matches per source index (context sources only; stage sources are matched when run).
    pub matches: BTreeMap<usize, Vec<Matched>>,
    /// URLs fetched because they have no `--checksum` (their content is part of the key).
    pub downloads: BTreeMap<usize, tempfile::NamedTempFile>,
    /// Hash of everything read, for the key.
    pub files_hash: Option<Digest>,
    /// Per-file short hashes, for explanations.
    pub files: source::PerFile,
}

pub(crate) fn exclude_matcher(step: &CopyStep) -> Result<Option<IgnoreMatcher>> {
    if step.exclude.is_empty() {
        return Ok(None);
    }
    Ok(Some(IgnoreMatcher::parse(
        "--exclude",
        &step.exclude.join("\n"),
    )?))
}

/// Finds and hashes what `step` reads from the context (and fetches URLs without checksum).
pub(crate) fn prepare(ctx: &Ctx<'_>, step: &CopyStep) -> Result<Prepared> {
    let mut p = Prepared::default();
    let exclude = exclude_matcher(step)?;
    let mut all: Vec<(usize, Vec<Matched>)> = Vec::new();
    let mut url_hashes = Vec::new();
    for (i, s) in step.sources.iter().enumerate() {
        match s {
            CopySource::Path { path } if step.from == FileSource::Context => {
                let origin = Origin {
                    root: &ctx.context,
                    ignore: Some(&ctx.ignore),
                    describe: "the build context".to_string(),
                };
                all.push((i, source::select(&origin, path, exclude.as_ref())?));
            }
            CopySource::Url { url } if step.checksum.is_none() => {
                let f = download(ctx, url, None)?;
                let d = source::hash_file(f.path())?;
                p.files.push(url.clone(), d.hex()[..16].to_string());
                url_hashes.push(d.to_string());
                p.downloads.insert(i, f);
            }
            _ => {}
        }
    }
    if !all.is_empty() || !url_hashes.is_empty() {
        let matched = all.iter().flat_map(|(_, m)| m.iter());
        let (h, files) = source::hash_matches(matched, false, Some(&ctx.stat_cache))?;
        // Moved, not merged entry by entry: it is one per copied file.
        let urls = std::mem::replace(&mut p.files, files);
        p.files.extend(urls);
        let mut parts = vec![h.to_string()];
        parts.extend(url_hashes);
        p.files_hash = Some(Digest::sha256(parts.join("\n").as_bytes()));
    }
    p.matches.extend(all);
    Ok(p)
}

fn download(ctx: &Ctx<'_>, url: &str, checksum: Option<&str>) -> Result<tempfile::NamedTempFile> {
    let err = |message: String| Error::Download {
        url: url.to_string(),
        message,
    };
    let mut resp = ureq::get(url).call().map_err(|e| err(e.to_string()))?;
    let mut f = tempfile::Builder::new()
        .prefix(&strata_store::temp_prefix("download"))
        .tempfile_in(&ctx.tmp_root)
        .map_err(io_err("creating temp file in", &ctx.tmp_root))?;
    let mut reader = resp.body_mut().as_reader();
    let mut hasher = strata_oci::Hasher::sha256();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = reader.read(&mut buf).map_err(|e| err(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        std::io::Write::write_all(&mut f, &buf[..n]).map_err(io_err("writing", f.path()))?;
    }
    let got = hasher.finish();
    if let Some(want) = checksum {
        let want_d: Digest = want.parse().map_err(|_| {
            err(format!(
                "--checksum `{want}` is not a digest (sha256:<hex>)"
            ))
        })?;
        if want_d != got {
            return Err(err(format!(
                "checksum mismatch: expected {want_d}, got {got}"
            )));
        }
    }
    Ok(f)
}

fn join_dest(dest: &str, rel: &str) -> String {
    let d = dest.trim_end_matches('/');
    if rel.is_empty() || rel == "." {
        if d.is_empty() {
            "/".to_string()
        } else {
            d.to_string()
        }
    } else {
        format!("{d}/{rel}")
    }
}

fn base_name(p: &str) -> &str {
    p.rsplit('/').find(|s| !s.is_empty()).unwrap_or(p)
}

/// The path `abs` names in the layer (no leading `/`), as bytes: names that are not UTF-8
/// are carried in `abs` in their string form (see `names`).
fn layer_key(abs: &str) -> std::borrow::Cow<'_, std::ffi::OsStr> {
    names::decode(abs.trim_start_matches('/'))
}

/// Staging area: what was placed and with which metadata.
struct Stage<'a> {
    root: PathBuf,
    view: &'a ImageView,
    /// Owner for created directories.
    owner: (u32, u32),
    /// Directories placed as entries (not merely created as parents).
    explicit: std::collections::BTreeSet<String>,
    /// Directories created as parents.
    created: std::collections::BTreeSet<String>,
    /// Where the first name of a multiply linked source file was placed, by (dev, inode).
    links: BTreeMap<(u64, u64), String>,
    /// Regular files the layer reads where they are (not copied into `root`), by layer path
    /// (no leading `/`). `root` has their parent directories.
    in_place: BTreeMap<Vec<u8>, HostFile>,
    /// Whether files may be read in place (not when an archive is unpacked into the tree,
    /// which may write where a recorded file is).
    in_place_ok: bool,
    /// Directories known to be in `root`, and other entries placed there, so placing a file
    /// needs no stat of its parents or of itself. Not kept once an archive is unpacked into
    /// the tree (`untracked`): then every path is looked at.
    dirs: std::collections::HashSet<String>,
    placed: std::collections::HashSet<String>,
    untracked: bool,
    /// Who a staged copy belongs to when chown is not possible (not root).
    euid: Option<(u32, u32)>,
}

fn set_meta(path: &Path, mode: u32, uid: u32, gid: u32, symlink: bool) -> Result<()> {
    let root = rustix::process::geteuid().is_root();
    if root {
        let r = if symlink {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        } else {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
        };
        r.map_err(io_err("chown", path))?;
    }
    if !symlink {
        // After chown: chown clears setuid/setgid bits.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", path))?;
    }
    Ok(())
}

/// The image `state` has built so far, as its snapshot directories (empty for no layers),
/// recording what the step asks of it (kept in the step's cache entry).
fn image_view(ctx: &Ctx<'_>, state: &StageState) -> Result<ImageView> {
    if state.layers.is_empty() {
        return Ok(ImageView::default());
    }
    Ok(ImageView::recording(
        ctx.snapshots_of(&state.layers)?.into_iter().rev().collect(),
    ))
}

/// A layer a step wrote (`None`: it wrote nothing), and what it read of the image below it.
pub(crate) type Made = (Option<(Descriptor, Digest)>, Reads);

impl<'a> Stage<'a> {
    /// An empty staging tree at `root` for a layer on top of `view`; directories it makes
    /// belong to `owner` unless the image has them.
    fn new(root: &Path, view: &'a ImageView, owner: (u32, u32)) -> Stage<'a> {
        Stage {
            root: root.to_path_buf(),
            view,
            owner,
            explicit: Default::default(),
            created: Default::default(),
            links: Default::default(),
            in_place: Default::default(),
            in_place_ok: true,
            dirs: Default::default(),
            placed: Default::default(),
            untracked: false,
            euid: (!rustix::process::geteuid().is_root()).then(|| {
                (
                    rustix::process::geteuid().as_raw(),
                    rustix::process::getegid().as_raw(),
                )
            }),
        }
    }

    /// Forgets what it knew of `abs` and everything under it (removed from the tree).
    fn forget_tree(&mut self, abs: &str) {
        let under = format!("{abs}/");
        self.dirs.retain(|d| d != abs && !d.starts_with(&under));
        self.placed.retain(|d| d != abs && !d.starts_with(&under));
    }

    /// Forgets files to be read in place at `abs` or under it (something else goes there).
    fn forget_in_place(&mut self, abs: &str) {
        if self.in_place.is_empty() {
            return;
        }
        let key = layer_key(abs);
        let key = key.as_bytes();
        self.in_place.remove(key);
        let mut under = key.to_vec();
        under.push(b'/');
        let doomed: Vec<Vec<u8>> = self
            .in_place
            .range(under.clone()..)
            .take_while(|(k, _)| k.starts_with(&under))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.in_place.remove(&k);
        }
    }

    fn host(&self, abs: &str) -> PathBuf {
        self.root.join(layer_key(abs))
    }

    /// Creates the parents of `abs` that are missing in the staging dir.
    fn parents(&mut self, abs: &str) -> Result<()> {
        let parts: Vec<&str> = abs.split('/').filter(|s| !s.is_empty()).collect();
        let mut prefix = String::new();
        for part in &parts[..parts.len().saturating_sub(1)] {
            prefix.push('/');
            prefix.push_str(part);
            if !self.untracked && self.dirs.contains(&prefix) {
                continue;
            }
            if !self.in_place.is_empty() {
                self.in_place.remove(layer_key(&prefix).as_bytes());
            }
            let p = self.host(&prefix);
            let known_absent =
                !self.untracked && !self.placed.contains(&prefix) && !self.dirs.contains(&prefix);
            if !known_absent {
                match std::fs::symlink_metadata(&p) {
                    Ok(md) if md.is_dir() => {
                        self.dirs.insert(prefix.clone());
                        continue;
                    }
                    Ok(_) => {
                        std::fs::remove_file(&p).map_err(io_err("removing", &p))?;
                        self.placed.remove(&prefix);
                    }
                    Err(_) => {}
                }
            }
            std::fs::create_dir(&p).map_err(io_err("creating directory", &p))?;
            self.dirs.insert(prefix.clone());
            self.created.insert(prefix.clone());
        }
        Ok(())
    }

    fn dir(&mut self, abs: &str, mode: u32, owner: (u32, u32)) -> Result<()> {
        self.parents(abs)?;
        if !self.in_place.is_empty() {
            self.in_place.remove(layer_key(abs).as_bytes());
        }
        let p = self.host(abs);
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                std::fs::remove_file(&p).map_err(io_err("removing", &p))?;
                std::fs::create_dir(&p).map_err(io_err("creating directory", &p))?;
            }
            Err(_) => std::fs::create_dir(&p).map_err(io_err("creating directory", &p))?,
        }
        self.placed.remove(abs);
        self.dirs.insert(abs.to_string());
        self.created.remove(abs);
        self.explicit.insert(abs.to_string());
        set_meta(&p, mode, owner.0, owner.1, false)
    }

    /// Makes room for a non-directory at `abs`: its parents exist, nothing is there. The
    /// caller places something there next (and records it in `placed`, unless in place).
    fn clear(&mut self, abs: &str) -> Result<PathBuf> {
        self.parents(abs)?;
        self.forget_in_place(abs);
        let p = self.host(abs);
        if !self.untracked && !self.placed.contains(abs) && !self.dirs.contains(abs) {
            return Ok(p);
        }
        match std::fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => std::fs::remove_dir_all(&p).map_err(io_err("removing", &p))?,
            Ok(_) => std::fs::remove_file(&p).map_err(io_err("removing", &p))?,
            Err(_) => {}
        }
        self.forget_tree(abs);
        Ok(p)
    }

    fn file_from(&mut self, abs: &str, src: &Path, mode: u32, owner: (u32, u32)) -> Result<()> {
        let p = self.clear(abs)?;
        std::fs::copy(src, &p).map_err(io_err("copying", src))?;
        self.placed.insert(abs.to_string());
        set_meta(&p, mode, owner.0, owner.1, false)
    }

    /// Like [`Self::file_from`], but the layer reads `src` where it is (no copy), when that
    /// gives the same entry.
    fn file_in_place(&mut self, abs: &str, src: &Path, mode: u32, owner: (u32, u32)) -> Result<()> {
        if !self.in_place_ok || abs.trim_start_matches('/').is_empty() {
            return self.file_from(abs, src, mode, owner);
        }
        self.clear(abs)?;
        // What a staged copy would be owned by: chown works only for root.
        let (uid, gid) = self.euid.unwrap_or(owner);
        self.in_place.insert(
            layer_key(abs).as_bytes().to_vec(),
            HostFile {
                path: src.to_path_buf(),
                mode,
                uid,
                gid,
            },
        );
        Ok(())
    }

    fn file_bytes(&mut self, abs: &str, bytes: &[u8], mode: u32, owner: (u32, u32)) -> Result<()> {
        let p = self.clear(abs)?;
        std::fs::write(&p, bytes).map_err(io_err("writing", &p))?;
        self.placed.insert(abs.to_string());
        set_meta(&p, mode, owner.0, owner.1, false)
    }

    /// `abs` as another name of the already staged file `first` (a hard link in the layer).
    fn hard_link(&mut self, abs: &str, first: &str) -> Result<()> {
        let p = self.clear(abs)?;
        let first = self.host(first);
        std::fs::hard_link(&first, &p).map_err(io_err("linking", &p))?;
        self.placed.insert(abs.to_string());
        Ok(())
    }

    /// A named pipe or device node at `abs` (made, never opened).
    fn node(
        &mut self,
        abs: &str,
        kind: rustix::fs::FileType,
        rdev: u64,
        mode: u32,
        owner: (u32, u32),
    ) -> Result<()> {
        let p = self.clear(abs)?;
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &p,
            kind,
            rustix::fs::Mode::from_raw_mode(mode & 0o777),
            rdev,
        )
        .map_err(|e| io_err("making the node", &p)(e.into()))?;
        self.placed.insert(abs.to_string());
        set_meta(&p, mode, owner.0, owner.1, false)
    }

    fn symlink(&mut self, abs: &str, target: &Path, owner: (u32, u32)) -> Result<()> {
        let p = self.clear(abs)?;
        std::os::unix::fs::symlink(target, &p).map_err(io_err("creating symlink", &p))?;
        self.placed.insert(abs.to_string());
        set_meta(&p, 0, owner.0, owner.1, true)
    }

    /// The mode and owner a directory at `abs` gets in the layer: the image's own when it has
    /// that directory (the layer must not change it), else 0755 and the copy's owner.
    fn dir_meta(&self, abs: &str) -> (u32, (u32, u32)) {
        match self.view.lookup(abs) {
            Some(md) if md.is_dir() => (md.mode() & 0o7777, (md.uid(), md.gid())),
            _ => (0o755, self.owner),
        }
    }

    /// Gives directories created only as parents the image's metadata when the image has
    /// them (the layer must not change them), else 0755 and the copy's owner.
    fn finish_parents(&self) -> Result<()> {
        for d in &self.created {
            let (mode, (uid, gid)) = self.dir_meta(d);
            set_meta(&self.host(d), mode, uid, gid, false)?;
        }
        Ok(())
    }
}

/// The compressions `ADD` sees through when it decides whether a local file is a tar archive,
/// told by their magic numbers as Docker's `DetectCompression` does. Docker documents gzip,
/// bzip2 and xz, and its builder copies a zstd-compressed tar as it is: so does strata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveCompression {
    None,
    Gzip,
    Bzip2,
    Xz,
}

fn sniff_archive(head: &[u8]) -> ArchiveCompression {
    if head.starts_with(&[0x1f, 0x8b, 0x08]) {
        ArchiveCompression::Gzip
    } else if head.starts_with(b"BZh") {
        ArchiveCompression::Bzip2
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
        ArchiveCompression::Xz
    } else {
        ArchiveCompression::None
    }
}

/// `path`'s content, decompressed when its first bytes say how.
fn open_archive(path: &Path) -> std::io::Result<Box<dyn Read>> {
    let mut f = std::fs::File::open(path)?;
    let mut head = [0u8; 6];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let f = std::io::BufReader::with_capacity(
        128 * 1024,
        std::io::Read::chain(std::io::Cursor::new(head[..n].to_vec()), f),
    );
    Ok(match sniff_archive(&head[..n]) {
        ArchiveCompression::None => Box::new(f),
        // Multi-member and multi-stream, like the tools that make these files.
        ArchiveCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(f)),
        ArchiveCompression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(f)),
        ArchiveCompression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(f)),
    })
}

/// Whether `ADD` unpacks the local file `path`: a tar archive, plain or compressed.
fn is_archive(path: &Path) -> bool {
    let Ok(mut r) = open_archive(path) else {
        return false;
    };
    let mut block = vec![0u8; 512];
    if r.read_exact(&mut block).is_err() {
        return false;
    }
    &block[257..262] == b"ustar"
}

fn extract(path: &Path, dest: &Path) -> Result<()> {
    let r = open_archive(path).map_err(io_err("opening", path))?;
    strata_rootfs::apply_layer(r, strata_oci::Compression::None, dest)?;
    Ok(())
}

/// Writes the layer of `step` on top of `state`; `None` when it copies nothing.
pub(crate) fn copy_step(
    ctx: &Ctx<'_>,
    state: &StageState,
    step: &CopyStep,
    prepared: &mut Prepared,
) -> Result<Made> {
    let needs_view = !step.link
        || step
            .chown
            .as_deref()
            .is_some_and(|c| c.split(':').any(|p| p.parse::<u32>().is_err()));
    let view = if needs_view {
        image_view(ctx, state)?
    } else {
        ImageView::default()
    };
    let chown = match &step.chown {
        Some(c) => Some(strata_runtime::chown_ids(c, |s| view.resolve_user(s))?),
        None => None,
    };
    let owner = chown.unwrap_or((0, 0));
    let staging = ctx.tempdir("copy-")?;
    let mut st = Stage::new(staging.path(), &view, owner);
    let unpack = step.add && step.unpack != Some(false);
    st.in_place_ok = !unpack;
    let exclude = exclude_matcher(step)?;
    let origin_root = match &step.from {
        FileSource::Context => ctx.context.clone(),
        other => ctx.origin_root(other)?,
    };
    let keep_owner = step.from != FileSource::Context;
    // Docker writes through the image's own symlinks (`/lib -> usr/lib`): the destination
    // is resolved in the parent image, never leaving its root. `--link` copies onto an
    // empty root, so there is nothing to resolve.
    let dest = if step.link {
        names::encode_os(std::ffi::OsStr::new(&step.dest)).into_owned()
    } else {
        view.resolve(&step.dest).map_err(Error::Usage)?
    };
    let dest_dir_like = step.dest_is_dir || view.is_dir(&dest);

    for (i, s) in step.sources.iter().enumerate() {
        match s {
            CopySource::Path { path } => {
                let matches = match prepared.matches.remove(&i) {
                    Some(m) => m,
                    None => {
                        let origin = Origin {
                            root: &origin_root,
                            ignore: None,
                            describe: match &step.from {
                                FileSource::Stage { index } => format!("stage {index}"),
                                FileSource::Image { name, .. } => format!("image `{name}`"),
                                FileSource::Context => "the build context".into(),
                            },
                        };
                        source::select(&origin, path, exclude.as_ref())?
                    }
                };
                let many = matches.len() > 1;
                if many && !step.dest_is_dir {
                    return Err(Error::Usage(
                        "when using COPY with more than one source file, the destination must be a directory and end with a /".into(),
                    ));
                }
                for m in &matches {
                    let top = if step.parents {
                        join_dest(&dest, &m.rel)
                    } else if m.is_dir {
                        dest.clone()
                    } else if dest_dir_like || many {
                        join_dest(&dest, base_name(&m.rel))
                    } else {
                        dest.clone()
                    };
                    place(&mut st, m, &top, &dest, step, chown, keep_owner, unpack)?;
                }
            }
            CopySource::Url { url } => {
                let f = match prepared.downloads.remove(&i) {
                    Some(f) => f,
                    None => download(ctx, url, step.checksum.as_deref())?,
                };
                let name = base_name(url.split(['?', '#']).next().unwrap_or(url));
                let target = if dest_dir_like {
                    join_dest(&dest, name)
                } else {
                    dest.clone()
                };
                st.file_from(&target, f.path(), step.chmod.unwrap_or(0o600), owner)?;
            }
            CopySource::Inline { name, content } => {
                let target = if dest_dir_like {
                    join_dest(&dest, name)
                } else {
                    dest.clone()
                };
                st.file_bytes(
                    &target,
                    content.as_bytes(),
                    step.chmod.unwrap_or(0o644),
                    owner,
                )?;
            }
        }
    }
    st.finish_parents()?;
    Ok((
        write_staged(ctx, staging.path(), &st.in_place)?,
        view.reads(),
    ))
}

/// Writes the staged tree at `staging`, with `in_place` files read where they are, as a layer
/// into the store; `None` when it is empty.
fn write_staged(
    ctx: &Ctx<'_>,
    staging: &Path,
    in_place: &BTreeMap<Vec<u8>, HostFile>,
) -> Result<Option<(Descriptor, Digest)>> {
    if in_place.is_empty()
        && std::fs::read_dir(staging)
            .map_err(io_err("reading directory", staging))?
            .next()
            .is_none()
    {
        return Ok(None);
    }
    let mut opts = LayerOptions {
        compression: ctx.opts.compression,
        mtime: MtimePolicy::Set(ctx.epoch),
        ..LayerOptions::default()
    };
    // gzip members of earlier COPY layers: a layer that changed a little is compressed a
    // little. Without the index (an error opening it) the layer is only slower, not other.
    let ranges = match opts.compression {
        strata_oci::Compression::Gzip => ctx.store.blob_ranges().ok(),
        _ => None,
    };
    if let Some(r) = ranges {
        opts.gzip_members = Some(GzMemberCache(Arc::new(StoreMembers(r))));
    }
    let mut writer = ctx.store.blob_writer()?;
    let source = LayerSource::Staged {
        root: staging,
        files: in_place,
    };
    let info = write_layer(source, &opts, &mut writer)?;
    writer.commit(Some((&info.digest, Some(info.size))))?;
    if !info.gzip_members.is_empty() {
        let ranges: Vec<BlobRange> = info
            .gzip_members
            .iter()
            .map(|m| BlobRange {
                key: member_key(&m.key, opts.gzip_level),
                blob: info.digest.clone(),
                offset: m.offset,
                len: m.len,
            })
            .collect();
        if let Err(e) = ctx.store.put_blob_ranges(&ranges) {
            ctx.progress.event(&crate::progress::Event::Warning {
                message: format!("cannot record the gzip members of {}: {e}", info.digest),
            });
        }
    }
    Ok(Some((info.descriptor(), info.diff_id)))
}

/// The store's named blob ranges as a gzip member cache.
struct StoreMembers(BlobRanges);

impl MemberCache for StoreMembers {
    fn get(&self, key: &Digest, level: u32) -> Option<Vec<u8>> {
        self.0.get(&member_key(key, level))
    }
}

/// `gzm1:<level>:<sha256 hex of the member's uncompressed bytes>`.
fn member_key(key: &Digest, level: u32) -> String {
    format!("{MEMBER_SCHEME}:{level}:{}", key.hex())
}

/// The layer `WORKDIR path` makes, as BuildKit does: the directory (resolved through the
/// image's symlinks) and its missing parents, mode 0755, owned by the stage's `USER` when
/// there is one; `None` when the image has the directory already.
pub(crate) fn workdir_step(ctx: &Ctx<'_>, state: &StageState, path: &str) -> Result<Made> {
    let view = image_view(ctx, state)?;
    let dir = view.resolve(path).map_err(Error::Usage)?;
    if dir == "/" || view.is_dir(&dir) {
        return Ok((None, view.reads()));
    }
    let mut prefix = String::new();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        if let Some(md) = view.lookup(&prefix)
            && !md.is_dir()
        {
            return Err(Error::Usage(format!(
                "WORKDIR {path}: `{prefix}` exists in the image and is not a directory"
            )));
        }
    }
    let owner = match state.config.user.as_deref().filter(|u| !u.is_empty()) {
        Some(user) => {
            let u = view.resolve_user(user)?;
            (u.uid, u.gid)
        }
        None => (0, 0),
    };
    let staging = ctx.tempdir("workdir-")?;
    let mut st = Stage::new(staging.path(), &view, owner);
    st.dir(&dir, 0o755, owner)?;
    st.finish_parents()?;
    Ok((
        write_staged(ctx, staging.path(), &BTreeMap::new())?,
        view.reads(),
    ))
}

#[allow(clippy::too_many_arguments)]
fn place(
    st: &mut Stage<'_>,
    m: &Matched,
    top: &str,
    dest: &str,
    step: &CopyStep,
    chown: Option<(u32, u32)>,
    keep_owner: bool,
    unpack: bool,
) -> Result<()> {
    for e in &m.entries {
        let abs = join_dest(top, &e.rel);
        let owner = match chown {
            Some(o) => o,
            None if keep_owner => (e.uid, e.gid),
            None => (0, 0),
        };
        let mode = step.chmod.unwrap_or(e.mode);
        match &e.kind {
            Kind::Dir if e.rel.is_empty() => {
                // The destination directory: keep the image's when it has one.
                let (mode, owner) = st.dir_meta(&abs);
                st.dir(&abs, mode, owner)?;
            }
            Kind::Dir => {
                // A directory copied onto a symlink of the image (a context `lib/` onto a
                // merged-/usr root): BuildKit refuses rather than replace the link, and so
                // do we, since replacing it would hide what the link points to.
                if st
                    .view
                    .lookup(&abs)
                    .is_some_and(|md| md.file_type().is_symlink())
                {
                    return Err(Error::Usage(format!(
                        "cannot copy directory `{}` to `{abs}`: the image has a symlink there \
                         (copy into the directory it points to instead)",
                        e.path.display()
                    )));
                }
                st.dir(&abs, mode, owner)?
            }
            Kind::File { .. } if unpack && e.rel.is_empty() && is_archive(&e.path) => {
                let dir_abs = dest.to_string();
                let (mode, owner) = st.dir_meta(&dir_abs);
                st.dir(&dir_abs, mode, owner)?;
                let host = st.host(&dir_abs);
                st.untracked = true;
                extract(&e.path, &host)?;
                // The archive's own `./` entry must not change the destination directory
                // (BuildKit keeps it as the image has it, or as it made it).
                set_meta(&host, mode, owner.0, owner.1, false)?;
            }
            Kind::File { .. } => match e.link_id.and_then(|id| st.links.get(&id).cloned()) {
                Some(first) => st.hard_link(&abs, &first)?,
                // A file with other names is copied: its later names become hard links to
                // the staged copy.
                None if e.link_id.is_none() => st.file_in_place(&abs, &e.path, mode, owner)?,
                None => {
                    st.file_from(&abs, &e.path, mode, owner)?;
                    if let Some(id) = e.link_id {
                        st.links.insert(id, abs.clone());
                    }
                }
            },
            Kind::Symlink { target } => st.symlink(&abs, target, owner)?,
            Kind::Fifo => st.node(&abs, rustix::fs::FileType::Fifo, 0, mode, owner)?,
            Kind::Device { block, rdev } => {
                let t = if *block {
                    rustix::fs::FileType::BlockDevice
                } else {
                    rustix::fs::FileType::CharacterDevice
                };
                st.node(&abs, t, *rdev, mode, owner)?
            }
            // Docker's builder left sockets out of its tar of the context.
            Kind::Socket => {}
        }
    }
    Ok(())
}

/// Copies a directory tree (metadata included) into `dst`, which must exist.
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(io_err("reading directory", src))? {
        let e = e.map_err(io_err("reading directory", src))?;
        copy_any(&e.path(), &dst.join(e.file_name()))?;
    }
    Ok(())
}

/// Copies a file, symlink or directory tree to `dst` (which must not exist).
pub(crate) fn copy_any(src: &Path, dst: &Path) -> Result<()> {
    let md = std::fs::symlink_metadata(src).map_err(io_err("stat", src))?;
    let ft = md.file_type();
    if ft.is_dir() {
        std::fs::create_dir(dst).map_err(io_err("creating directory", dst))?;
        copy_tree(src, dst)?;
        set_meta(dst, md.mode() & 0o7777, md.uid(), md.gid(), false)
    } else if ft.is_symlink() {
        let t = std::fs::read_link(src).map_err(io_err("reading symlink", src))?;
        std::os::unix::fs::symlink(&t, dst).map_err(io_err("creating symlink", dst))?;
        set_meta(dst, 0, md.uid(), md.gid(), true)
    } else if ft.is_file() {
        std::fs::copy(src, dst).map_err(io_err("copying", src))?;
        set_meta(dst, md.mode() & 0o7777, md.uid(), md.gid(), false)
    } else {
        Ok(())
    }
}
