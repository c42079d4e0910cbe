//! Selecting the files a `COPY`/`ADD` reads (globs, `.dockerignore`, `--exclude`) and hashing
//! exactly them, with the metadata that ends up in the layer.

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;
use strata_dockerfile::{IgnoreMatcher, clean_path};
use strata_oci::sync::MutexExt;
use strata_oci::{Digest, Hasher};

use crate::error::{Error, Result, io_err};
use crate::glob;
use crate::par;
use crate::statcache::{FileStat, StatCache};
use strata_oci::names;

/// A directory files are read from: the context (with its ignore rules) or a stage's rootfs.
pub(crate) struct Origin<'a> {
    pub root: &'a Path,
    /// `.dockerignore` (context only).
    pub ignore: Option<&'a IgnoreMatcher>,
    /// How to name it in errors: `the build context`, `stage build`.
    pub describe: String,
}

/// The type of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    File {
        size: u64,
    },
    Dir,
    Symlink {
        target: PathBuf,
    },
    /// A named pipe: copied as one, never opened (as Docker's builder copied its tar of the
    /// context; BuildKit 0.8 drops it).
    Fifo,
    /// A character or block device: copied as a device node with its number (likewise;
    /// BuildKit 0.8 writes an empty file).
    Device {
        block: bool,
        rdev: u64,
    },
    /// A socket: left out of the copy, as Docker's builder left it out of its tar.
    Socket,
}

/// One file or directory to copy.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Path relative to the match (`""` for the match itself).
    pub rel: String,
    /// Where it is on the host.
    pub path: PathBuf,
    pub kind: Kind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// (device, inode) of a regular file with more than one name.
    pub link_id: Option<(u64, u64)>,
    /// A regular file's stat, and a time before it was taken (for the stat cache).
    pub stat: Option<(FileStat, SystemTime)>,
}

/// One source path or glob match.
#[derive(Debug, Clone)]
pub(crate) struct Matched {
    /// Path relative to the origin root (`.` for the root itself).
    pub rel: String,
    /// A directory: its contents are copied.
    pub is_dir: bool,
    /// The match (first, rel `""`) and, for a directory, everything under it, parents first.
    pub entries: Vec<Entry>,
}

fn entry(rel: String, path: PathBuf, md: &Metadata, stat_time: SystemTime) -> Entry {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File { size: md.len() }
    } else if ft.is_symlink() {
        Kind::Symlink {
            target: std::fs::read_link(&path).unwrap_or_default(),
        }
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        Kind::Device {
            block: ft.is_block_device(),
            rdev: md.rdev(),
        }
    };
    // A file with other names: the layer keeps the names linked (Docker does).
    let link_id = (ft.is_file() && md.nlink() > 1).then(|| (md.dev(), md.ino()));
    Entry {
        rel,
        path,
        stat: ft.is_file().then(|| (FileStat::of(md), stat_time)),
        kind,
        link_id,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
    }
}

/// Follows symlinks of `rel` inside `root` (an absolute link target means `root`-relative):
/// the path it names, still relative to `root`, never escaping it.
fn resolve_in_root(root: &Path, rel: &str) -> Result<Option<String>> {
    let mut parts: Vec<String> = Vec::new();
    let mut todo: Vec<String> = rel
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .rev()
        .map(str::to_string)
        .collect();
    let mut hops = 0;
    while let Some(p) = todo.pop() {
        if p == ".." {
            parts.pop();
            continue;
        }
        let candidate = root
            .join(names::decode(&parts.join("/")))
            .join(names::decode(&p));
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Ok(None);
                }
                let target = std::fs::read_link(&candidate)
                    .map_err(io_err("reading symlink", &candidate))?;
                let t = names::encode(target.into_os_string());
                if t.starts_with('/') {
                    parts.clear();
                }
                for q in t.split('/').filter(|s| !s.is_empty() && *s != ".").rev() {
                    todo.push(q.to_string());
                }
            }
            Ok(_) => parts.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("stat", &candidate)(e)),
        }
    }
    Ok(Some(if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    }))
}

fn ignored(origin: &Origin<'_>, rel: &str, is_dir: bool) -> bool {
    rel != "." && origin.ignore.is_some_and(|m| m.is_excluded(rel, is_dir))
}

/// Expands a pattern (relative to the origin root) into matching paths, sorted.
fn expand_glob(origin: &Origin<'_>, pattern: &str) -> Result<Vec<String>> {
    let mut current = vec![String::new()];
    for comp in pattern.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let mut next = Vec::new();
        for base in &current {
            let dir = origin.root.join(names::decode(base));
            if !glob::has_meta(comp) {
                let rel = join(base, comp);
                if std::fs::symlink_metadata(origin.root.join(names::decode(&rel))).is_ok() {
                    next.push(rel);
                }
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut found = Vec::new();
            for e in rd {
                let e = e.map_err(io_err("reading directory", &dir))?;
                found.push(e.file_name());
            }
            // In the order of the names' bytes, as the walk lists a directory.
            found.sort();
            for n in found.into_iter().map(names::encode) {
                let hit = glob::matches(comp, &n)
                    .map_err(|m| Error::Usage(format!("invalid pattern `{pattern}`: {m}")))?;
                if hit {
                    next.push(join(base, &n));
                }
            }
        }
        current = next;
    }
    Ok(current
        .into_iter()
        .map(|r| if r.is_empty() { ".".to_string() } else { r })
        .collect())
}

fn join(base: &str, name: &str) -> String {
    let mut out = String::with_capacity(base.len() + 1 + name.len());
    join_into(&mut out, base, name);
    out
}

/// Appends `base/name` to `out` (`name` alone below the top).
fn join_into(out: &mut String, base: &str, name: &str) {
    if !is_top(base) {
        out.push_str(base);
        out.push('/');
    }
    out.push_str(name);
}

/// Whether `rel` is the top of its tree: nothing to put before a name below it.
fn is_top(rel: &str) -> bool {
    rel.is_empty() || rel == "."
}

/// The matches of one `COPY` source path. An explicit path that is missing or ignored is an
/// error; a glob that matches nothing copies nothing (BuildKit's `AllowEmptyWildcard`: Docker's
/// legacy builder refused it, BuildKit builds it).
pub(crate) fn select(
    origin: &Origin<'_>,
    source: &str,
    exclude: Option<&IgnoreMatcher>,
) -> Result<Vec<Matched>> {
    let cleaned = clean_path(&format!("/{source}"));
    let rel = cleaned.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    let is_glob = glob::has_meta(rel);
    let candidates = if is_glob {
        expand_glob(origin, rel)?
    } else {
        vec![rel.to_string()]
    };
    let mut out = Vec::new();
    // Before any stat of this walk: the stat cache's trust rule compares file times with it.
    let stat_time = SystemTime::now();
    for cand in candidates {
        let Some(resolved) = resolve_in_root(origin.root, &cand)? else {
            continue;
        };
        let path = origin.root.join(names::decode(&resolved));
        let md = std::fs::metadata(&path).map_err(io_err("stat", &path))?;
        if ignored(origin, &cand, md.is_dir()) {
            continue;
        }
        if exclude.is_some_and(|m| cand != "." && m.is_excluded(&cand, md.is_dir())) {
            continue;
        }
        let mut entries = vec![entry(String::new(), path.clone(), &md, stat_time)];
        if md.is_dir() {
            walk(origin, &cand, &path, "", exclude, stat_time, &mut entries)?;
        }
        out.push(Matched {
            rel: cand,
            is_dir: md.is_dir(),
            entries,
        });
    }
    if out.is_empty() && !is_glob {
        return Err(Error::SourceNotFound {
            source_path: source.to_string(),
            origin: origin.describe.clone(),
        });
    }
    Ok(out)
}

/// One directory's listing, as the walk keeps it: its entries in name order.
type Listing = Vec<Child>;

struct Child {
    /// The entry, unless only its contents are copied (a directory matched by an ignore
    /// pattern that a later `!` pattern may reopen inside it).
    entry: Option<Entry>,
    /// Path relative to the match when there is no entry (the entry's `rel` otherwise: one
    /// string per file, not two).
    rel_without_entry: String,
    /// A directory to walk into.
    descend: bool,
}

impl Child {
    /// Path relative to the match.
    fn sub_rel(&self) -> &str {
        self.entry
            .as_ref()
            .map_or(&self.rel_without_entry, |e| &e.rel)
    }
}

/// Appends everything under `dir` (the match `match_rel`, itself `rel` below it) to `out`,
/// parents first and each directory's entries in name order. Directories are listed and their
/// entries stat-ed on all cores, then put in that order.
fn walk(
    origin: &Origin<'_>,
    match_rel: &str,
    dir: &Path,
    rel: &str,
    exclude: Option<&IgnoreMatcher>,
    stat_time: SystemTime,
    out: &mut Vec<Entry>,
) -> Result<()> {
    let list = |dir: &Path, rel: &str| list_dir(origin, match_rel, dir, rel, exclude, stat_time);
    let root = (dir.to_path_buf(), rel.to_string());
    let mut listings = list_parallel(par::cores(), root, &list)?;
    // Made to size once: growing it copies every entry so far (tens of MB for a big context).
    out.reserve(listings.values().map(Vec::len).sum());
    put_in_order(rel, &mut listings, out);
    Ok(())
}

/// The directories `l` walks into, with their paths relative to the match.
fn subdirs(l: &Listing) -> impl Iterator<Item = (PathBuf, String)> + '_ {
    l.iter()
        .filter(|c| c.descend)
        .filter_map(|c| Some((c.entry.as_ref()?.path.clone(), c.sub_rel().to_string())))
}

fn put_in_order(
    rel: &str,
    listings: &mut std::collections::HashMap<String, Listing>,
    out: &mut Vec<Entry>,
) {
    let Some(children) = listings.remove(rel) else {
        return;
    };
    for c in children {
        let dir = c.descend.then(|| c.sub_rel().to_string());
        if let Some(e) = c.entry {
            out.push(e);
        }
        if let Some(dir) = dir {
            put_in_order(&dir, listings, out);
        }
    }
}

/// Lists the tree from `root` on `threads` threads: each takes a directory still to list,
/// lists it, and queues its subdirectories.
fn list_parallel(
    threads: usize,
    root: (PathBuf, String),
    list: &(dyn Fn(&Path, &str) -> Result<Listing> + Sync),
) -> Result<std::collections::HashMap<String, Listing>> {
    use std::sync::{Condvar, Mutex};
    struct Queue {
        todo: Vec<(PathBuf, String)>,
        /// Directories being listed (their subdirectories are not queued yet).
        busy: usize,
        failed: Option<Error>,
    }
    let queue = Mutex::new(Queue {
        todo: vec![root],
        busy: 0,
        failed: None,
    });
    let wake = Condvar::new();
    let done = Mutex::new(std::collections::HashMap::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let (dir, rel) = {
                        let mut q = queue.lock_ok();
                        loop {
                            if q.failed.is_some() {
                                return;
                            }
                            if let Some(job) = q.todo.pop() {
                                q.busy += 1;
                                break job;
                            }
                            if q.busy == 0 {
                                return;
                            }
                            q = wake.wait(q).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    let listed = list(&dir, &rel);
                    let mut q = queue.lock_ok();
                    q.busy -= 1;
                    match listed {
                        Ok(l) => {
                            q.todo.extend(subdirs(&l));
                            done.lock_ok().insert(rel, l);
                        }
                        Err(e) => {
                            q.failed.get_or_insert(e);
                        }
                    }
                    wake.notify_all();
                }
            });
        }
    });
    let q = queue.into_inner().unwrap_or_else(|p| p.into_inner());
    match q.failed {
        Some(e) => Err(e),
        None => Ok(done.into_inner().unwrap_or_else(|p| p.into_inner())),
    }
}

/// The entries of one directory, in name order, with the ignore rules applied.
fn list_dir(
    origin: &Origin<'_>,
    match_rel: &str,
    dir: &Path,
    rel: &str,
    exclude: Option<&IgnoreMatcher>,
    stat_time: SystemTime,
) -> Result<Listing> {
    let mut listed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err("reading directory", dir))? {
        let e = e.map_err(io_err("reading directory", dir))?;
        listed.push((e.file_name(), e));
    }
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(listed.len());
    // Patterns see the path relative to the origin: made only when there are patterns and
    // it differs from the path relative to the match.
    let patterns = origin.ignore.is_some_and(|m| !m.is_empty());
    for (os_name, dirent) in listed {
        let path = dir.join(&os_name);
        let name = names::encode(os_name);
        let sub_rel = join(rel, &name);
        let origin_rel = if patterns && !is_top(match_rel) {
            std::borrow::Cow::Owned(join(match_rel, &sub_rel))
        } else {
            std::borrow::Cow::Borrowed(sub_rel.as_str())
        };
        // Relative to the open directory (fstatat), not a walk of the whole path per file.
        let md = dirent.metadata().map_err(io_err("stat", &path))?;
        let is_dir = md.is_dir();
        if ignored(origin, &origin_rel, is_dir) {
            continue;
        }
        // `--exclude` patterns are relative to the source being copied.
        if exclude.is_some_and(|m| m.is_excluded(&sub_rel, is_dir)) {
            continue;
        }
        let keep = !origin.ignore.is_some_and(|m| m.matches(&origin_rel))
            && !exclude.is_some_and(|m| m.matches(&sub_rel));
        drop(origin_rel);
        let (entry, rel_without_entry) = if keep || is_dir {
            (Some(entry(sub_rel, path, &md, stat_time)), String::new())
        } else {
            (None, sub_rel)
        };
        out.push(Child {
            entry,
            rel_without_entry,
            descend: is_dir,
        });
    }
    Ok(out)
}

/// What the cache key and the explanation record about one copied entry.
#[derive(Debug, Serialize)]
struct EntryRecord<'a> {
    path: &'a str,
    kind: &'static str,
    mode: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<(u32, u32)>,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<&'a Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<String>,
    /// A device's number.
    #[serde(skip_serializing_if = "Option::is_none")]
    rdev: Option<u64>,
}

/// sha256 of a file's content.
pub(crate) fn hash_file(path: &Path) -> Result<Digest> {
    let mut f = std::fs::File::open(path).map_err(io_err("opening", path))?;
    let mut h = Hasher::sha256();
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

/// Per file: its path and a short hash of its record, in match order, for explanations. Only
/// a step that runs needs them: until then they stay the records the key was hashed from.
#[derive(Default)]
pub(crate) struct PerFile {
    parts: Vec<PerFilePart>,
    /// Some selection's key was a known one (see `statcache`): its files are unchanged, and
    /// not in `parts`.
    unchanged_left_out: bool,
}

enum PerFilePart {
    One(String, String),
    Records(Records),
}

impl PerFile {
    pub(crate) fn new() -> PerFile {
        PerFile::default()
    }

    /// One more file (or URL) and its short hash.
    pub(crate) fn push(&mut self, path: String, short: String) {
        self.parts.push(PerFilePart::One(path, short));
    }

    pub(crate) fn extend(&mut self, other: PerFile) {
        self.parts.extend(other.parts);
        self.unchanged_left_out |= other.unchanged_left_out;
    }

    /// Whether every file read is here: not when some selection's key was a known one.
    pub(crate) fn is_whole(&self) -> bool {
        !self.unchanged_left_out
    }

    /// Path and short hash of each file, in order.
    pub(crate) fn into_pairs(self) -> Vec<(String, String)> {
        #[derive(serde::Deserialize)]
        struct Head {
            kind: String,
            path: String,
        }
        let mut out = Vec::new();
        for part in self.parts {
            match part {
                PerFilePart::One(path, short) => out.push((path, short)),
                PerFilePart::Records(r) => {
                    for rec in r.escaped.split(|b| *b == RECORD_END) {
                        // Written by `records_of` just before: they parse.
                        let Ok(one) = serde_json::from_slice::<String>(rec) else {
                            continue;
                        };
                        let Ok(head) = serde_json::from_str::<Head>(&one) else {
                            continue;
                        };
                        if head.kind != "dir" {
                            let short = Digest::sha256(one.as_bytes()).hex()[..16].to_string();
                            out.push((head.path, short));
                        }
                    }
                }
            }
        }
        out
    }
}

/// Below this many entries a key is computed on one thread (spawning costs more than it saves).
const PARALLEL_MIN_ENTRIES: usize = 4096;

/// The content hash of exactly these matches: path, type, mode, owner (when it ends up in
/// the layer), size, content digest and link target of every entry. mtimes are not part of
/// it: copied files get a fixed mtime in the layer. Returns the digest and, per source path,
/// a short digest for explanations. With a `cache` (the context's), a file whose stat it has
/// recorded is not read. Big selections are split across the machine's cores; the bytes
/// hashed, and so the key, are the same as on one.
pub(crate) fn hash_matches<'m>(
    matches: impl IntoIterator<Item = &'m Matched>,
    keep_owner: bool,
    cache: Option<&StatCache>,
) -> Result<(Digest, PerFile)> {
    let entries: Vec<(&Matched, &Entry)> = matches
        .into_iter()
        .flat_map(|m| m.entries.iter().map(move |e| (m, e)))
        .collect();
    let threads = par::threads_for(entries.len(), PARALLEL_MIN_ENTRIES);
    let per = entries.len().div_ceil(threads).max(1);
    let known = cache.and_then(|c| fingerprint(&entries, per, keep_owner, c).map(|f| (c, f)));
    if let Some((c, (fp, _))) = &known
        && let Some(key) = c.known_key(fp)
    {
        let per_file = PerFile {
            parts: Vec::new(),
            unchanged_left_out: true,
        };
        return Ok((key, per_file));
    }
    let parts = par::map_pieces(entries.chunks(per).collect(), |chunk| {
        records_of(chunk, keep_owner, cache)
    });
    // The canonical JSON of the records as an array of strings, hashed as it is written (the
    // same bytes as `to_canonical_json(&Vec<String>)`, a test checks, without a `Value` tree
    // of every record or one buffer of all of them).
    let mut h = Hasher::sha256();
    h.update(b"[");
    let mut per_file = PerFile::new();
    let mut first = true;
    for part in parts {
        let part = part?;
        for r in part.escaped.split_inclusive(|b| *b == RECORD_END) {
            if !first {
                h.update(b",");
            }
            first = false;
            h.update(&r[..r.len() - 1]);
        }
        per_file.parts.push(PerFilePart::Records(part));
    }
    h.update(b"]");
    let key = h.finish();
    if let Some((c, (fp, true))) = known {
        c.remember_key(fp, key.clone());
    }
    Ok((key, per_file))
}

/// The fingerprint of a selection (its entries in order, `per` to a thread), and whether the
/// stat of every file in it is trusted (see `statcache`). It covers all a record is made of
/// (path, type, mode, owner when kept, size, link target) but the content digest, and every
/// file's stat instead: with the same fingerprint, trusted stats, and so the same key. `None`
/// when a file has no stat.
fn fingerprint(
    entries: &[(&Matched, &Entry)],
    per: usize,
    keep_owner: bool,
    cache: &StatCache,
) -> Option<(Digest, bool)> {
    let pieces = par::map_pieces(entries.chunks(per).collect(), |chunk| {
        let mut h = Hasher::sha256();
        let mut trusted = true;
        let mut buf = Vec::with_capacity(256);
        for (m, e) in chunk {
            buf.clear();
            for s in [m.rel.as_bytes(), e.rel.as_bytes()] {
                buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
                buf.extend_from_slice(s);
            }
            buf.extend_from_slice(&e.mode.to_le_bytes());
            if keep_owner {
                buf.extend_from_slice(&e.uid.to_le_bytes());
                buf.extend_from_slice(&e.gid.to_le_bytes());
            }
            match &e.kind {
                Kind::File { size } => {
                    let (stat, at) = e.stat.as_ref()?;
                    trusted &= cache.trusted(stat, *at);
                    buf.push(b'f');
                    buf.extend_from_slice(&size.to_le_bytes());
                    buf.extend_from_slice(&stat.size.to_le_bytes());
                    buf.extend_from_slice(&stat.mtime.to_le_bytes());
                    buf.extend_from_slice(&stat.ctime.to_le_bytes());
                    buf.extend_from_slice(&stat.dev.to_le_bytes());
                    buf.extend_from_slice(&stat.ino.to_le_bytes());
                    buf.extend_from_slice(&stat.mode.to_le_bytes());
                }
                Kind::Dir => buf.push(b'd'),
                Kind::Symlink { target } => {
                    let t = target.as_os_str().as_encoded_bytes();
                    buf.push(b'l');
                    buf.extend_from_slice(&(t.len() as u64).to_le_bytes());
                    buf.extend_from_slice(t);
                }
                Kind::Fifo => buf.push(b'p'),
                Kind::Socket => buf.push(b's'),
                Kind::Device { block, rdev } => {
                    buf.push(if *block { b'b' } else { b'c' });
                    buf.extend_from_slice(&rdev.to_le_bytes());
                }
            }
            h.update(&buf);
        }
        Some((h.finish(), trusted))
    });
    let mut h = Hasher::sha256();
    h.update(b"strata selection fingerprint v1\0");
    h.update(&[u8::from(keep_owner)]);
    h.update(&(entries.len() as u64).to_le_bytes());
    let mut trusted = true;
    for piece in pieces {
        let (d, t) = piece?;
        h.update(d.hex().as_bytes());
        trusted &= t;
    }
    Some((h.finish(), trusted))
}

/// Ends each escaped record in [`Records::escaped`]: a byte a JSON string never contains raw.
const RECORD_END: u8 = b'\n';

/// The records of a run of entries, in order.
struct Records {
    /// Each record as a JSON string (quoted and escaped), followed by [`RECORD_END`].
    escaped: Vec<u8>,
}

fn records_of(
    entries: &[(&Matched, &Entry)],
    keep_owner: bool,
    cache: Option<&StatCache>,
) -> Result<Records> {
    let mut out = Records {
        // About a record's escaped size: growing it copies all the records made so far.
        escaped: Vec::with_capacity(entries.len() * 320),
    };
    // Reused for every entry: this runs for every file of every COPY.
    let mut path = String::new();
    let mut one = Vec::with_capacity(256);
    for (m, e) in entries {
        path.clear();
        if e.rel.is_empty() {
            path.push_str(&m.rel);
        } else {
            join_into(&mut path, &m.rel, &e.rel);
        }
        let digest;
        let mut rdev = None;
        let (kind, size, sha256, link) = match &e.kind {
            Kind::File { size } => {
                digest = match (cache, &e.stat) {
                    (Some(c), Some((stat, at))) => c.digest(&e.path, stat, *at, hash_file)?,
                    _ => hash_file(&e.path)?,
                };
                ("file", *size, Some(&digest), None)
            }
            Kind::Dir => ("dir", 0, None, None),
            Kind::Symlink { target } => (
                "symlink",
                0,
                None,
                Some(names::encode_os(target.as_os_str()).into_owned()),
            ),
            Kind::Fifo => ("fifo", 0, None, None),
            Kind::Socket => ("socket", 0, None, None),
            Kind::Device { block, rdev: r } => {
                rdev = Some(*r);
                (if *block { "block" } else { "char" }, 0, None, None)
            }
        };
        let rec = EntryRecord {
            path: &path,
            kind,
            mode: e.mode,
            owner: keep_owner.then_some((e.uid, e.gid)),
            size,
            sha256,
            link,
            rdev,
        };
        one.clear();
        rec.write_canonical_json(&mut one);
        escape_json_text(&mut out.escaped, &one);
        out.escaped.push(RECORD_END);
    }
    Ok(out)
}

/// `s` as a JSON string, escaped as serde_json (and so canonical JSON) writes it.
fn json_string(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `json`, the text of a record (valid UTF-8, itself JSON), as a JSON string: the bytes
/// `json_string` writes, a test checks. Written by hand because a record's text needs no
/// UTF-8 check and has only quotes and backslashes to escape, and this runs once per file.
fn escape_json_text(out: &mut Vec<u8>, json: &[u8]) {
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in json.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0..=0x1f => {
                // Not in a record's text (its strings are escaped already); as serde_json.
                let mut one = Vec::with_capacity(8);
                json_string(&mut one, std::str::from_utf8(&[b]).unwrap_or_default());
                out.extend_from_slice(&json[start..i]);
                out.extend_from_slice(&one[1..one.len() - 1]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&json[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&json[start..]);
    out.push(b'"');
}

impl EntryRecord<'_> {
    /// The canonical JSON of the record (keys sorted, no spaces), written directly: it is
    /// computed for every file of every COPY, and a test pins it to `to_canonical_json`.
    fn write_canonical_json(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        out.extend_from_slice(b"{\"kind\":");
        json_string(out, self.kind);
        if let Some(link) = &self.link {
            out.extend_from_slice(b",\"link\":");
            json_string(out, link);
        }
        let _ = write!(out, ",\"mode\":{}", self.mode);
        if let Some((uid, gid)) = self.owner {
            let _ = write!(out, ",\"owner\":[{uid},{gid}]");
        }
        out.extend_from_slice(b",\"path\":");
        json_string(out, self.path);
        if let Some(rdev) = self.rdev {
            let _ = write!(out, ",\"rdev\":{rdev}");
        }
        if let Some(d) = self.sha256 {
            // A digest is ASCII letters, digits and a colon: nothing to escape.
            out.extend_from_slice(b",\"sha256\":\"");
            out.extend_from_slice(d.algorithm().as_str().as_bytes());
            out.push(b':');
            out.extend_from_slice(d.hex().as_bytes());
            out.push(b'"');
        }
        let _ = write!(out, ",\"size\":{}}}", self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_written_as_canonical_json() {
        let sha = Digest::sha256(b"a");
        for (owner, sha, link, rdev) in [
            (None, None, None, None),
            (Some((0, 0)), Some(&sha), None, None),
            (
                Some((1000, 50)),
                None,
                Some("../a \"b\"\\\n\u{7f}é".to_string()),
                None,
            ),
            (None, None, None, Some(u64::MAX)),
        ] {
            let rec = EntryRecord {
                path: "dir/\"q\"\\ \t\u{1}ü",
                kind: "file",
                mode: 0o4755,
                owner,
                size: u64::MAX,
                sha256: sha,
                link,
                rdev,
            };
            let want = strata_oci::to_canonical_json(&rec);
            let mut got = Vec::new();
            rec.write_canonical_json(&mut got);
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
            let records = vec![String::from_utf8_lossy(&want).to_string(), "x".into()];
            let mut all = vec![b'['];
            escape_json_text(&mut all, &want);
            all.push(b',');
            json_string(&mut all, &records[1]);
            all.push(b']');
            assert_eq!(all, strata_oci::to_canonical_json(&records));
        }
    }

    #[test]
    fn record_text_is_escaped_as_serde_json_escapes_it() {
        let mut text = String::from("{\"a\":\"b\\\\c\"} é \u{7f} ");
        text.extend((0u8..0x20).map(char::from));
        let mut got = Vec::new();
        escape_json_text(&mut got, text.as_bytes());
        let mut want = Vec::new();
        json_string(&mut want, &text);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want)
        );
    }

    #[test]
    fn per_file_hashes_name_each_file_by_its_record() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/a \"q\".txt"), "a").unwrap();
        std::fs::write(r.join("b.txt"), "b").unwrap();
        let origin = Origin {
            root: r,
            ignore: None,
            describe: "the build context".into(),
        };
        let matches = select(&origin, ".", None).unwrap();
        let (_, per_file) = hash_matches(&matches, false, None).unwrap();
        let mut urls = PerFile::new();
        urls.push("https://x/y".into(), "0123".into());
        let mut all = per_file;
        all.extend(urls);
        let pairs = all.into_pairs();
        // Files only, no directories, in match order, then what was pushed.
        let names: Vec<&str> = pairs.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["b.txt", "sub/a \"q\".txt", "https://x/y"]);
        // Each short hash is of the file's record: its content changes it.
        let sha = Digest::sha256(b"a");
        let rec = EntryRecord {
            path: "sub/a \"q\".txt",
            kind: "file",
            mode: std::fs::metadata(r.join("sub/a \"q\".txt")).unwrap().mode() & 0o7777,
            owner: None,
            size: 1,
            sha256: Some(&sha),
            link: None,
            rdev: None,
        };
        let want = Digest::sha256(&strata_oci::to_canonical_json(&rec));
        assert_eq!(pairs[1].1, want.hex()[..16]);
        assert_eq!(pairs[2].1, "0123");
    }

    #[test]
    fn globs_ignore_and_exclude_select_the_right_files() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("src/sub")).unwrap();
        std::fs::write(r.join("a.go"), "a").unwrap();
        std::fs::write(r.join("b.go"), "b").unwrap();
        std::fs::write(r.join("c.txt"), "c").unwrap();
        std::fs::write(r.join("src/x.go"), "x").unwrap();
        std::fs::write(r.join("src/sub/y.md"), "y").unwrap();
        std::fs::write(r.join("src/secret.key"), "k").unwrap();
        std::os::unix::fs::symlink("../c.txt", r.join("src/link")).unwrap();
        let ignore = IgnoreMatcher::parse("t", "**/*.key\n").unwrap();
        let origin = Origin {
            root: r,
            ignore: Some(&ignore),
            describe: "ctx".into(),
        };
        let m = select(&origin, "*.go", None).unwrap();
        let names: Vec<_> = m.iter().map(|m| m.rel.as_str()).collect();
        assert_eq!(names, ["a.go", "b.go"]);
        let m = select(&origin, "src", None).unwrap();
        let rels: Vec<_> = m[0].entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["", "link", "sub", "sub/y.md", "x.go"]);
        let ex = IgnoreMatcher::parse("--exclude", "**/*.md").unwrap();
        let m = select(&origin, "src", Some(&ex)).unwrap();
        let rels: Vec<_> = m[0].entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["", "link", "sub", "x.go"]);
        assert!(matches!(
            select(&origin, "src/secret.key", None),
            Err(Error::SourceNotFound { .. })
        ));
        assert!(select(&origin, "*.rs", None).unwrap().is_empty());
        // A top-level symlink is followed, inside the root.
        let m = select(&origin, "src/link", None).unwrap();
        assert_eq!(m[0].entries[0].kind, Kind::File { size: 1 });

        let (h1, files) = hash_matches(&select(&origin, ".", None).unwrap(), false, None).unwrap();
        let files = files.into_pairs();
        assert!(files.iter().any(|(p, _)| p == "src/x.go"), "{files:?}");
        assert!(!files.iter().any(|(p, _)| p == "src/secret.key"));
        std::fs::write(r.join("src/secret.key"), "changed").unwrap();
        let (h2, _) = hash_matches(&select(&origin, ".", None).unwrap(), false, None).unwrap();
        assert_eq!(h1, h2, "ignored files are not part of the hash");
        std::fs::write(r.join("src/x.go"), "changed").unwrap();
        let (h3, _) = hash_matches(&select(&origin, ".", None).unwrap(), false, None).unwrap();
        assert_ne!(h1, h3);
    }
}
