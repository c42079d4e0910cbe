//! The stat cache of a build context: path → (size, mtime, ctime, device, inode, mode) →
//! content digest, kept in the store between builds, so a file whose stat is unchanged is never
//! read again to compute a `COPY`'s cache key.
//!
//! Trust rule (git's "racily clean" problem): an entry is recorded only when the file's mtime
//! and ctime are at least [`MARGIN`] older than the moment its stat was taken. Any later write
//! sets ctime to a later time (users can set mtime, never ctime), so the recorded stat can no
//! longer match, even for a same-size edit within the same second on a filesystem with coarse
//! timestamps. A rename gives the new path another entry (or none) and a delete drops it; both
//! change a `COPY`'s key anyway, since paths are part of it.
//!
//! On-disk format (one file per context, see `strata_store::Store::context_stats`):
//!
//! ```text
//! strata-context-stats v1 <entries>
//! <sha256 hex> <size> <mtime s>.<ns> <ctime s>.<ns> <dev> <ino> <st_mode> <path relative to the context>
//! ...
//! ```
//!
//! A file that does not parse whole (another version, a torn write) is ignored: the cost is
//! reading the files once more.
//!
//! Known keys: beside it, the key of each whole selection (a `COPY`'s or a bind mount's files)
//! made when all of its files were trusted, by a fingerprint of everything its records are
//! made of but the files' content, stats included (see `source::hash_matches`). When a later
//! build's fingerprint is the same, every stat is unchanged, and so every digest and the key:
//! it is taken as it is, and the entries above are not even read. File format:
//!
//! ```text
//! strata-context-keys v1
//! <fingerprint sha256 hex> <key>
//! ...
//! ```

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use strata_oci::sync::MutexExt;
use strata_oci::{Algorithm, Digest};
use strata_store::Store;

use crate::error::Result;

/// How much older than the stat a file's mtime and ctime must be for its digest to be
/// recorded: well above any filesystem's timestamp granularity (1 s at worst, ext3/HFS+).
pub(crate) const MARGIN: Duration = Duration::from_secs(2);

const HEADER: &str = "strata-context-stats v1";

const KEYS_HEADER: &str = "strata-context-keys v1";

/// Known keys kept per context: a few per Dockerfile (each `COPY` of the context), for a few
/// Dockerfiles or targets on the same context.
const KEYS_KEPT: usize = 64;

/// What the cache compares: a file is taken as unchanged when all of it is equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStat {
    pub size: u64,
    /// Nanoseconds since the epoch.
    pub mtime: i128,
    pub ctime: i128,
    pub dev: u64,
    pub ino: u64,
    /// `st_mode`: type and permission bits.
    pub mode: u32,
}

impl FileStat {
    pub(crate) fn of(md: &Metadata) -> FileStat {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        FileStat {
            size: md.len(),
            mtime: ns(md.mtime(), md.mtime_nsec()),
            ctime: ns(md.ctime(), md.ctime_nsec()),
            dev: md.dev(),
            ino: md.ino(),
            mode: md.mode(),
        }
    }
}

/// Entries by path relative to the context.
type Entries = HashMap<Vec<u8>, Recorded, foldhash::fast::RandomState>;

/// One context's cache, shared by the steps of a build.
pub(crate) struct StatCache {
    root: PathBuf,
    margin: Duration,
    /// The file `entries` is read from, on the first lookup: a build whose selections all
    /// have known keys does not read it.
    file: Option<PathBuf>,
    /// What earlier builds recorded: looked up without a lock (the builds' common case, on
    /// several threads at once). An entry whose stat still matches is right, whatever this
    /// build recorded since: a file cannot get its old ctime back.
    entries: OnceLock<Entries>,
    /// What this build recorded (`Some`) or found no longer trustworthy (`None`), by path.
    changes: Mutex<HashMap<Vec<u8>, Option<Recorded>>>,
    /// Files read to hash them this build (the rest came from the cache).
    read: AtomicUsize,
    /// Keys of whole selections by fingerprint, the latest first; whether this build added any.
    keys: Mutex<(Vec<(Digest, Digest)>, bool)>,
    /// Selections whose key was a known one since this cache was made.
    known_hits: AtomicUsize,
    /// Whether one was since the last save (the build's, or tests' builds on one cache).
    known_since_save: AtomicBool,
}

#[derive(Debug)]
struct Recorded {
    stat: FileStat,
    digest: Digest,
    /// Looked up this build.
    seen: AtomicBool,
}

impl StatCache {
    /// An empty cache for the context at `root` (absolute).
    pub(crate) fn new(root: &Path, margin: Duration) -> StatCache {
        StatCache {
            root: root.to_path_buf(),
            margin,
            file: None,
            entries: OnceLock::new(),
            changes: Mutex::new(HashMap::new()),
            read: AtomicUsize::new(0),
            keys: Mutex::new((Vec::new(), false)),
            known_hits: AtomicUsize::new(0),
            known_since_save: AtomicBool::new(false),
        }
    }

    /// The cache `store` holds for the context at `root`: its known keys now, its entries on
    /// the first lookup; empty when there are none or they do not parse.
    pub(crate) fn load(store: &Store, root: &Path) -> StatCache {
        StatCache::load_with(store, root, MARGIN)
    }

    fn load_with(store: &Store, root: &Path, margin: Duration) -> StatCache {
        let mut cache = StatCache::new(root, margin);
        cache.file = Some(store.context_stats_path(root));
        // A cache: one that cannot be read costs reading the files, not the build.
        match store.context_keys(root) {
            Ok(Some(bytes)) => {
                cache.keys.get_mut().unwrap_or_else(|p| p.into_inner()).0 = parse_keys(&bytes);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("reading the build context's known keys: {e}"),
        }
        cache
    }

    /// The entries earlier builds recorded, read on first use. A cache that cannot be read is
    /// an empty one: the cost is reading the files.
    fn entries(&self) -> &Entries {
        self.entries.get_or_init(|| {
            let Some(file) = &self.file else {
                return Entries::default();
            };
            match std::fs::read(file) {
                Ok(bytes) => parse(&bytes).unwrap_or_default(),
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!("reading the stat cache {}: {e}", file.display());
                    }
                    Entries::default()
                }
            }
        })
    }

    /// Whether a file's stat, taken at `stat_time`, is old enough for its digest to be
    /// trusted later (see the module docs).
    pub(crate) fn trusted(&self, md: &FileStat, stat_time: SystemTime) -> bool {
        let stat_ns = stat_time
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_nanos() as i128)
            .unwrap_or(0);
        md.mtime.max(md.ctime) + (self.margin.as_nanos() as i128) <= stat_ns
    }

    /// The key recorded for a selection with this fingerprint, if any.
    pub(crate) fn known_key(&self, fingerprint: &Digest) -> Option<Digest> {
        let keys = self.keys.lock_ok();
        let key = keys.0.iter().find(|(f, _)| f == fingerprint)?.1.clone();
        self.known_hits.fetch_add(1, Ordering::Relaxed);
        self.known_since_save.store(true, Ordering::Relaxed);
        Some(key)
    }

    /// Records the key of a selection whose files were all trusted.
    pub(crate) fn remember_key(&self, fingerprint: Digest, key: Digest) {
        let mut keys = self.keys.lock_ok();
        keys.0.retain(|(f, _)| *f != fingerprint);
        keys.0.insert(0, (fingerprint, key));
        keys.0.truncate(KEYS_KEPT);
        keys.1 = true;
    }

    /// How many selections had a known key since this cache was made.
    pub(crate) fn known_hits(&self) -> usize {
        self.known_hits.load(Ordering::Relaxed)
    }

    /// Writes the cache back when this build changed it. Entries of paths this build did not
    /// look at are kept while the path still exists (another Dockerfile on the same context
    /// may copy them).
    pub(crate) fn save(&mut self, store: &Store) -> Result<()> {
        let keys = self.keys.get_mut().unwrap_or_else(|p| p.into_inner());
        if keys.1 {
            store.put_context_keys(&self.root, &serialize_keys(&keys.0))?;
            keys.1 = false;
        }
        let changes = std::mem::take(
            self.changes
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // Each one is a change: an entry recorded, or one dropped that was there.
        let changed = !changes.is_empty();
        // Selections with known keys did not look their files up: entries not seen are
        // kept as they are (one that is gone is dropped by a later build).
        let check_unseen = !std::mem::take(self.known_since_save.get_mut());
        // Never read: nothing looked up, nothing recorded.
        let Some(entries) = self.entries.get_mut() else {
            return Ok(());
        };
        for (rel, r) in changes {
            match r {
                Some(r) => entries.insert(rel, r),
                None => entries.remove(&rel),
            };
        }
        let before = entries.len();
        entries.retain(|rel, r| {
            *r.seen.get_mut()
                || !check_unseen
                || std::fs::symlink_metadata(self.root.join(std::ffi::OsStr::from_bytes(rel)))
                    .is_ok()
        });
        // The next build starts here (tests run several on one cache).
        for r in entries.values_mut() {
            *r.seen.get_mut() = false;
        }
        if !changed && entries.len() == before {
            return Ok(());
        }
        store.put_context_stats(&self.root, &serialize(entries))?;
        Ok(())
    }

    /// How many files were read to hash them since this cache was made.
    pub(crate) fn files_read(&self) -> usize {
        self.read.load(Ordering::Relaxed)
    }

    /// The sha256 of the file at `path` whose metadata `md` was taken at `stat_time`: from the
    /// cache when the stat matches the recorded one, else read (and recorded when it is old
    /// enough to be trusted, see the module docs).
    pub(crate) fn digest(
        &self,
        path: &Path,
        md: &FileStat,
        stat_time: SystemTime,
        hash: impl FnOnce(&Path) -> Result<Digest>,
    ) -> Result<Digest> {
        // The walker's paths are `root` joined with the relative path: a byte prefix (per
        // file, cheaper than comparing components), else the component-wise strip.
        let rel = rel_bytes(&self.root, path)
            .or_else(|| {
                path.strip_prefix(&self.root)
                    .ok()
                    .map(|r| r.as_os_str().as_bytes())
            })
            // A newline would end the entry's line in the file.
            .filter(|r| !r.contains(&b'\n'));
        let Some(rel) = rel else {
            self.read.fetch_add(1, Ordering::Relaxed);
            return hash(path);
        };
        if let Some(r) = self.entries().get(rel)
            && r.stat == *md
        {
            r.seen.store(true, Ordering::Relaxed);
            return Ok(r.digest.clone());
        }
        if let Some(Some(r)) = self.changes.lock_ok().get(rel)
            && r.stat == *md
        {
            return Ok(r.digest.clone());
        }
        self.read.fetch_add(1, Ordering::Relaxed);
        let d = hash(path)?;
        let trusted = self.trusted(md, stat_time);
        let mut changes = self.changes.lock_ok();
        if trusted {
            let r = Recorded {
                stat: *md,
                digest: d.clone(),
                seen: AtomicBool::new(true),
            };
            changes.insert(rel.to_vec(), Some(r));
        } else if self.entries().contains_key(rel) || matches!(changes.get(rel), Some(Some(_))) {
            // Recorded before, no longer to be trusted: dropped when saved.
            changes.insert(rel.to_vec(), None);
        }
        Ok(d)
    }
}

/// `path` relative to `root` when `path` is `root`, a `/` and more, byte for byte.
fn rel_bytes<'p>(root: &Path, path: &'p Path) -> Option<&'p [u8]> {
    let root = root.as_os_str().as_bytes();
    let rest = path.as_os_str().as_bytes().strip_prefix(root)?;
    let rest = if root.ends_with(b"/") {
        rest
    } else {
        rest.strip_prefix(b"/")?
    };
    // `COPY . /app/` walks `root/./…`: the component-wise strip drops `.`, so must this.
    let mut rest = rest;
    while let Some(r) = rest.strip_prefix(b"./") {
        rest = r;
    }
    // Anything else unusual (or not UTF-8) is left to the component-wise strip.
    std::str::from_utf8(rest)
        .is_ok_and(strata_dockerfile::is_clean)
        .then_some(rest)
}

fn serialize<S>(entries: &HashMap<Vec<u8>, Recorded, S>) -> Vec<u8> {
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = format!("{HEADER} {}\n", sorted.len()).into_bytes();
    let split = |t: i128| (t.div_euclid(1_000_000_000), t.rem_euclid(1_000_000_000));
    for (
        rel,
        Recorded {
            stat: s, digest: d, ..
        },
    ) in sorted
    {
        let (ms, mn) = split(s.mtime);
        let (cs, cn) = split(s.ctime);
        out.extend_from_slice(
            format!(
                "{} {} {ms}.{mn:09} {cs}.{cn:09} {} {} {} ",
                d.hex(),
                s.size,
                s.dev,
                s.ino,
                s.mode
            )
            .as_bytes(),
        );
        out.extend_from_slice(rel);
        out.push(b'\n');
    }
    out
}

/// The entries of a cache file; `None` unless all of it parses. A big file's lines are parsed
/// on all cores (it is read before every build of its context).
fn parse(bytes: &[u8]) -> Option<Entries> {
    let end = bytes.iter().position(|b| *b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..end]).ok()?;
    let count: usize = header.strip_prefix(HEADER)?.trim().parse().ok()?;
    let body = &bytes[end + 1..];
    // Every entry ends with a newline, the last one the file's last byte.
    if !(body.is_empty() || body.ends_with(b"\n")) {
        return None;
    }
    let threads = crate::par::threads_for(count, 8192);
    // Pieces of about equal size, each ending after a newline.
    let mut pieces = Vec::with_capacity(threads);
    let mut rest = body;
    for i in (1..=threads).rev() {
        let cut = if i == 1 {
            rest.len()
        } else {
            let at = rest.len() / i;
            rest[at..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(rest.len(), |p| at + p + 1)
        };
        let (piece, r) = rest.split_at(cut);
        pieces.push(piece);
        rest = r;
    }
    let parsed = crate::par::map_pieces(pieces, parse_lines);
    let mut entries = Entries::with_capacity_and_hasher(count, Default::default());
    for part in parsed {
        entries.extend(part?);
    }
    let lines = body.iter().filter(|b| **b == b'\n').count();
    (lines == count && entries.len() == count).then_some(entries)
}

/// One parsed line: the path relative to the context and what was recorded for it.
type Entry = (Vec<u8>, Recorded);

/// The entries of whole lines, each ending with a newline; `None` unless all parse.
fn parse_lines(lines: &[u8]) -> Option<Vec<Entry>> {
    let mut out = Vec::with_capacity(lines.len() / 150);
    for line in lines.split(|b| *b == b'\n') {
        if line.is_empty() {
            // Only after the last newline (an empty line has no fields and fails below).
            continue;
        }
        let mut f = line.splitn(8, |b| *b == b' ');
        let digest =
            Digest::from_hex(Algorithm::Sha256, std::str::from_utf8(f.next()?).ok()?).ok()?;
        let size = uint(f.next()?)?;
        let time = |t: &[u8]| -> Option<i128> {
            let dot = t.iter().position(|b| *b == b'.')?;
            let (s, n) = (&t[..dot], &t[dot + 1..]);
            let secs = match s.strip_prefix(b"-") {
                Some(s) => -i128::from(uint(s)?),
                None => i128::from(uint(s)?),
            };
            Some(secs * 1_000_000_000 + i128::from(uint(n)?))
        };
        let mtime = time(f.next()?)?;
        let ctime = time(f.next()?)?;
        let dev = uint(f.next()?)?;
        let ino = uint(f.next()?)?;
        let mode = u32::try_from(uint(f.next()?)?).ok()?;
        let rel = f.next()?.to_vec();
        if rel.is_empty() {
            return None;
        }
        let stat = FileStat {
            size,
            mtime,
            ctime,
            dev,
            ino,
            mode,
        };
        let seen = AtomicBool::new(false);
        out.push((rel, Recorded { stat, digest, seen }));
    }
    Some(out)
}

fn serialize_keys(keys: &[(Digest, Digest)]) -> Vec<u8> {
    let mut out = format!("{KEYS_HEADER}\n");
    for (fingerprint, key) in keys {
        out.push_str(&format!("{} {key}\n", fingerprint.hex()));
    }
    out.into_bytes()
}

/// The known keys of a file; none unless all of it parses.
fn parse_keys(bytes: &[u8]) -> Vec<(Digest, Digest)> {
    let parse = || -> Option<Vec<(Digest, Digest)>> {
        let text = std::str::from_utf8(bytes).ok()?;
        let body = text.strip_prefix(KEYS_HEADER)?.strip_prefix('\n')?;
        if !(body.is_empty() || body.ends_with('\n')) {
            return None;
        }
        body.lines()
            .map(|line| {
                let (fingerprint, key) = line.split_once(' ')?;
                Some((
                    Digest::from_hex(Algorithm::Sha256, fingerprint).ok()?,
                    key.parse().ok()?,
                ))
            })
            .collect()
    };
    parse().unwrap_or_default()
}

/// A decimal number of ASCII digits only (what `serialize` writes), without going through
/// `str`: the cache's lines are parsed before every build of the context.
fn uint(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let d = d.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(p: &Path) -> FileStat {
        FileStat::of(&std::fs::symlink_metadata(p).unwrap())
    }

    #[test]
    fn relative_paths_are_byte_prefixes_of_the_root() {
        let r = |root: &str, p: &str| rel_bytes(Path::new(root), Path::new(p)).map(<[u8]>::to_vec);
        assert_eq!(r("/ctx", "/ctx/a/b"), Some(b"a/b".to_vec()));
        assert_eq!(r("/", "/a"), Some(b"a".to_vec()));
        assert_eq!(r("/ctx", "/ctxa/b"), None);
        assert_eq!(r("/ctx", "/ctx"), None);
        assert_eq!(r("/ctx", "/ctx//a"), None);
        assert_eq!(r("/ctx", "/ctx/./a/b"), Some(b"a/b".to_vec()));
        assert_eq!(r("/ctx", "/ctx/a/./b"), None);
        // What the component-wise strip gives, for the paths the walker makes.
        for p in ["/ctx/a/b", "/ctx/./a/b", "/ctx/././a"] {
            let by_components = Path::new(p).strip_prefix("/ctx").unwrap();
            assert_eq!(
                r("/ctx", p).as_deref(),
                Some(by_components.as_os_str().as_bytes()),
                "{p}"
            );
        }
        assert_eq!(r("/ctx", "/other/a"), None);
    }

    #[test]
    fn known_keys_round_trip_and_a_damaged_file_is_ignored() {
        let keys: Vec<(Digest, Digest)> = (0u8..3)
            .map(|i| (Digest::sha256(&[i]), Digest::sha256(&[i, i])))
            .collect();
        let bytes = serialize_keys(&keys);
        assert_eq!(parse_keys(&bytes), keys);
        assert_eq!(parse_keys(&serialize_keys(&[])), []);
        assert_eq!(
            parse_keys(&bytes[..bytes.len() - 1]),
            [],
            "no final newline"
        );
        let mut bad = bytes.clone();
        bad[KEYS_HEADER.len() + 5] = b'x';
        assert_eq!(parse_keys(&bad), [], "not hex");
        assert_eq!(parse_keys(b"strata-context-keys v9\n"), []);
        assert_eq!(parse_keys(&[0xff, 0xfe]), []);
    }

    #[test]
    fn numbers_are_plain_decimal_digits() {
        assert_eq!(uint(b"0"), Some(0));
        assert_eq!(uint(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"+1",
            b"-1",
            b"1 ",
            b"0x1",
            b"1.5",
        ] {
            assert_eq!(uint(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_file_format_round_trips_and_a_torn_file_is_ignored() {
        let mut e = HashMap::new();
        let rec = |stat, digest| Recorded {
            stat,
            digest,
            seen: AtomicBool::new(false),
        };
        let s = FileStat {
            size: 3,
            mtime: -1_500_000_000,
            ctime: 1_700_000_000_123_456_789,
            dev: 2049,
            ino: 77,
            mode: 0o100644,
        };
        e.insert(b"dir/a file".to_vec(), rec(s, Digest::sha256(b"x")));
        e.insert(b"b".to_vec(), rec(s, Digest::sha256(b"y")));
        let bytes = serialize(&e);
        assert_eq!(serialize(&parse(&bytes).unwrap()), bytes);
        assert!(
            parse(&bytes[..bytes.len() - 1]).is_none(),
            "no final newline"
        );
        let cut = bytes.iter().rposition(|b| *b == b'\n').unwrap();
        let prev = bytes[..cut].iter().rposition(|b| *b == b'\n').unwrap();
        assert!(parse(&bytes[..=prev]).is_none(), "an entry missing");
        assert!(parse(b"strata-context-stats v9 0\n").is_none());

        // Big enough to be parsed in pieces: the same entries, and a damaged line anywhere
        // still rejects the whole file.
        let mut big = HashMap::new();
        for i in 0..20_000u64 {
            let s = FileStat { ino: i, ..s };
            big.insert(
                format!("d{}/f {i}", i % 97).into_bytes(),
                rec(s, Digest::sha256(&i.to_le_bytes())),
            );
        }
        let bytes = serialize(&big);
        let back = parse(&bytes).unwrap();
        assert_eq!(back.len(), big.len());
        for (k, v) in &big {
            assert_eq!((back[k].stat, &back[k].digest), (v.stat, &v.digest));
        }
        assert_eq!(serialize(&back), bytes);
        for at in [bytes.len() / 3, bytes.len() / 2, bytes.len() - 10] {
            let mut bad = bytes.clone();
            let nl = at + bad[at..].iter().position(|b| *b == b'\n').unwrap();
            bad.insert(nl, b'\n'); // an empty line
            assert!(parse(&bad).is_none(), "empty line at {nl}");
            let mut bad = bytes.clone();
            bad[at - 40..at].fill(b'x');
            assert!(parse(&bad).is_none(), "garbage at {at}");
        }
    }

    #[test]
    fn an_entry_is_trusted_only_when_its_times_are_old_enough() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "aaaa").unwrap();
        let cache = StatCache::new(d.path(), MARGIN);
        let hash = |p: &Path| crate::source::hash_file(p);
        // Just written: read, and not recorded.
        cache
            .digest(&f, &stat(&f), SystemTime::now(), hash)
            .unwrap();
        cache
            .digest(&f, &stat(&f), SystemTime::now(), hash)
            .unwrap();
        assert_eq!(cache.files_read(), 2);
        // Seen from far enough in the future, it is recorded, then served from the cache.
        let later = SystemTime::now() + MARGIN + Duration::from_secs(1);
        let first = cache.digest(&f, &stat(&f), later, hash).unwrap();
        assert_eq!(cache.digest(&f, &stat(&f), later, hash).unwrap(), first);
        assert_eq!(cache.files_read(), 3);
    }
}

/// The stat cache as `COPY` uses it: through `source::select` and `source::hash_matches`.
#[cfg(test)]
mod key_tests {
    use super::*;
    use crate::source::{Origin, hash_matches, select};
    use std::os::unix::fs::PermissionsExt;

    /// Long enough above the timestamp granularity of the filesystems tests run on (ns on
    /// ext4, xfs, btrfs and tmpfs, advancing with the kernel's coarse clock, a few ms).
    const TEST_MARGIN: Duration = Duration::from_millis(300);

    fn key(root: &Path, cache: &StatCache) -> Digest {
        let origin = Origin {
            root,
            ignore: None,
            describe: "ctx".into(),
        };
        hash_matches(&select(&origin, ".", None).unwrap(), false, Some(cache))
            .unwrap()
            .0
    }

    fn settle() {
        std::thread::sleep(TEST_MARGIN + Duration::from_millis(100));
    }

    #[test]
    fn the_key_changes_exactly_when_the_copied_files_do() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("a.txt"), "hello").unwrap();
        std::fs::write(r.join("b.txt"), "world").unwrap();
        std::fs::write(r.join("sub/c.txt"), "c").unwrap();
        settle();
        let mut cache = StatCache::new(r, TEST_MARGIN);
        let k0 = key(r, &cache);
        assert_eq!(cache.files_read(), 3);
        assert_eq!(key(r, &cache), k0);
        assert_eq!(cache.files_read(), 3, "unchanged files are not read again");
        // The cache itself does not change what the key is.
        let (plain, _) = hash_matches(
            &select(
                &Origin {
                    root: r,
                    ignore: None,
                    describe: "ctx".into(),
                },
                ".",
                None,
            )
            .unwrap(),
            false,
            None,
        )
        .unwrap();
        assert_eq!(plain, k0);

        // Kept in the store and loaded by the next build: still nothing read.
        let sd = tempfile::tempdir().unwrap();
        let store = Store::open(sd.path()).unwrap();
        cache.save(&store).unwrap();
        // Known keys that cannot be read (here a directory where the file goes): a cache
        // without them, not a failed build.
        let keys_file = format!("{}.keys", store.context_stats_path(r).display());
        let keys = std::fs::read(&keys_file).unwrap();
        std::fs::remove_file(&keys_file).unwrap();
        std::fs::create_dir(&keys_file).unwrap();
        let unreadable = StatCache::load_with(&store, r, TEST_MARGIN);
        assert_eq!(key(r, &unreadable), k0);
        assert_eq!(unreadable.known_hits(), 0);
        std::fs::remove_dir(&keys_file).unwrap();
        std::fs::write(&keys_file, keys).unwrap();
        let mut cache = StatCache::load_with(&store, r, TEST_MARGIN);
        assert_eq!(key(r, &cache), k0);
        assert_eq!(cache.files_read(), 0);
        assert_eq!(cache.known_hits(), 1, "every stat unchanged: the known key");
        assert!(
            cache.entries.get().is_none(),
            "the entries were not even read"
        );

        // A same-size edit within the same second, the mtime put back as it was: only ctime
        // tells, and the key changes.
        let a = r.join("a.txt");
        let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
        std::fs::write(&a, "HELLO").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().modified().unwrap(), mtime);
        let k1 = key(r, &cache);
        assert_ne!(k1, k0);
        assert_eq!(cache.files_read(), 1);
        assert_eq!(cache.known_hits(), 1, "a ctime changed: not the known key");
        // Edited back right away (not yet trusted): read again, the first key again.
        std::fs::write(&a, "hello").unwrap();
        assert_eq!(key(r, &cache), k0);
        assert_eq!(cache.files_read(), 2);

        // A touch (new mtime, same bytes): read again, same key.
        settle();
        let b = r.join("b.txt");
        std::fs::File::options()
            .write(true)
            .open(&b)
            .unwrap()
            .set_modified(SystemTime::now())
            .unwrap();
        assert_eq!(key(r, &cache), k0);
        assert_eq!(
            cache.files_read(),
            4,
            "a.txt (now recorded) and b.txt (too recent)"
        );
        settle();
        assert_eq!(key(r, &cache), k0);
        assert_eq!(
            cache.files_read(),
            5,
            "b.txt, now old enough to be recorded"
        );
        assert_eq!(key(r, &cache), k0);
        assert_eq!(cache.files_read(), 5);

        // A mode change.
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k_mode = key(r, &cache);
        assert_ne!(k_mode, k0);
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o644)).unwrap();

        // A rename: same bytes under another name.
        std::fs::rename(r.join("sub/c.txt"), r.join("sub/d.txt")).unwrap();
        let k_renamed = key(r, &cache);
        assert_ne!(k_renamed, k0);
        assert_ne!(k_renamed, k_mode);
        std::fs::rename(r.join("sub/d.txt"), r.join("sub/c.txt")).unwrap();
        assert_eq!(key(r, &cache), k0, "renamed back");

        // A delete, in a build of its own.
        cache.save(&store).unwrap();
        std::fs::remove_file(&b).unwrap();
        let k_deleted = key(r, &cache);
        assert_ne!(k_deleted, k0);
        // Saving drops the deleted file's entry.
        cache.save(&store).unwrap();
        let saved = store.context_stats(r).unwrap().unwrap();
        let entries = parse(&saved).unwrap();
        assert!(!entries.contains_key(&b"b.txt"[..]), "{entries:?}");
        settle();
        assert_eq!(key(r, &cache), k_deleted);
        cache.save(&store).unwrap();
        let saved = store.context_stats(r).unwrap().unwrap();
        let mut names: Vec<_> = parse(&saved).unwrap().into_keys().collect();
        names.sort();
        assert_eq!(names, [&b"a.txt"[..], &b"sub/c.txt"[..]]);
    }
}
