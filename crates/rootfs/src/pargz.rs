//! Block-parallel gzip: the input is cut into blocks at content-defined boundaries (a gear
//! rolling hash, as FastCDC cuts: 64 KiB to 1 MiB, about 320 KiB on average), each block is
//! compressed on a worker thread by libdeflate into a gzip member of its own, and the members
//! are written in order. Boundaries that depend on the bytes, not on offsets, make an edit in
//! the middle of a layer change only the members around it: with a [`MemberCache`] (members
//! of earlier layers by the sha256 of their uncompressed bytes) a one-file change in a large
//! COPY compresses about that file. A cached member is used only after it decompresses to
//! exactly the block, so the blob is the same bytes with or without the cache.
//!
//! A gzip file is a series of members (RFC 1952 §2.2; bgzip and `pigz --independent`
//! write such files) and every reader of layers decodes them: Go's `gzip.Reader` (Docker,
//! containerd, skopeo, umoci), zlib's `gzread`, flate2's `MultiGzDecoder`. Tar reading and
//! hashing stay on the caller's thread, so a 1 GB layer commits in about its size divided by
//! the number of cores times libdeflate's speed.
//!
//! Written here rather than taken from a crate: `gzp` (the parallel gzip crate) wants an owned
//! `'static` sink and its output is not promised to be independent of the thread count. Ours
//! depends only on the input bytes, the block size and the level (never on the number of
//! threads or how writes were split), which the blob digests of reproducible layers need.
//! The compression itself is libdeflate's (through `libdeflater`): at level 6 it needs about
//! 40% less CPU than zlib for a smaller output, and whole-buffer compression is what blocks
//! need.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use libdeflater::{CompressionLvl, Compressor, Decompressor};
use strata_oci::Digest;

/// Largest block: a cut is forced here. Large enough that the per-member header and trailer
/// (18 bytes) and the window restart at each member cost nothing measurable, small enough to
/// keep a few blocks in flight per thread.
pub(crate) const BLOCK: usize = 1024 * 1024;
/// Smallest block: no cut before it.
pub(crate) const MIN_BLOCK: usize = 64 * 1024;
/// A cut where the gear hash has these bits clear: one in 2^18 positions, so blocks average
/// about MIN_BLOCK + 256 KiB.
const CUT_MASK: u64 = ((1 << 18) - 1) << 46;

/// Names the member format in cache keys: change it when the cutting rule, the gzip header or
/// libdeflate's output (a libdeflate upgrade) may change, so old members are not reused.
pub const MEMBER_SCHEME: &str = "gzm1";

/// The gear table: 256 fixed pseudo-random words (splitmix64 of the byte), so boundaries
/// depend on nothing but the bytes.
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut z = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
};

/// Compressed members of earlier layers, by the sha256 of their uncompressed bytes.
pub trait MemberCache: Send + Sync {
    /// The gzip member (header to trailer) that holds the bytes hashing to `key` compressed
    /// at `level`, if known. A wrong answer costs a compression, never a wrong blob.
    fn get(&self, key: &Digest, level: u32) -> Option<Vec<u8>>;
}

/// Where one gzip member is in a blob, and the sha256 of what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzMember {
    /// sha256 of the member's uncompressed bytes.
    pub key: Digest,
    /// Offset of the member in the blob.
    pub offset: u64,
    /// Compressed length.
    pub len: u64,
}

/// A finished member: the sha256 of its input (only with a cache: nothing else needs it),
/// and its bytes.
type Block = io::Result<(Option<Digest>, Vec<u8>)>;

/// What makes members: a compressor, and the cache with what checks its answers.
struct Maker {
    c: Compressor,
    d: Option<Decompressor>,
    level: u32,
    cache: Option<Arc<dyn MemberCache>>,
}

impl Maker {
    fn new(level: CompressionLvl, cache: Option<Arc<dyn MemberCache>>) -> Maker {
        Maker {
            c: Compressor::new(level),
            d: None,
            level: level_number(level),
            cache,
        }
    }

    /// The member for `input`: the cache's when it decompresses to exactly `input` (the
    /// member's CRC-32 and size are checked too), else compressed here.
    fn member(&mut self, input: &[u8]) -> Block {
        let Some(cache) = &self.cache else {
            return Ok((None, gzip_member(&mut self.c, input)?));
        };
        let key = Digest::sha256(input);
        if let Some(member) = cache.get(&key, self.level) {
            let d = self.d.get_or_insert_with(Decompressor::new);
            let mut out = vec![0u8; input.len()];
            if matches!(d.gzip_decompress(&member, &mut out), Ok(n) if n == input.len())
                && out == input
            {
                return Ok((Some(key), member));
            }
        }
        Ok((Some(key), gzip_member(&mut self.c, input)?))
    }
}

struct Job {
    input: Vec<u8>,
    done: SyncSender<Block>,
}

struct Pool {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(threads: usize, level: CompressionLvl, cache: Option<Arc<dyn MemberCache>>) -> Pool {
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                let cache = cache.clone();
                std::thread::spawn(move || {
                    let mut maker = Maker::new(level, cache);
                    loop {
                        // The lock is held only while taking a job, never while compressing.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // The encoder may be gone (an error elsewhere): nobody to tell.
                        let _ = job.done.send(maker.member(&job.input));
                    }
                })
            })
            .collect();
        Pool {
            jobs: Some(tx),
            workers,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the job channel ends every worker's loop.
        self.jobs.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// One complete gzip member holding `input`.
fn gzip_member(c: &mut Compressor, input: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; c.gzip_compress_bound(input.len())];
    let n = c
        .gzip_compress(input, &mut out)
        .map_err(|e| io::Error::other(format!("gzip: {e:?}")))?;
    out.truncate(n);
    Ok(out)
}

/// A gzip writer that compresses blocks on worker threads.
pub(crate) struct ParGzEncoder<W: Write> {
    sink: W,
    level: CompressionLvl,
    threads: usize,
    pending: Vec<u8>,
    /// The gear hash over `pending` so far.
    gear: u64,
    members: u64,
    pool: Option<Pool>,
    in_flight: VecDeque<Receiver<Block>>,
    cache: Option<Arc<dyn MemberCache>>,
    /// Bytes written to the sink so far.
    written: u64,
    written_members: Vec<GzMember>,
}

impl<W: Write> ParGzEncoder<W> {
    /// An encoder with one worker per core.
    pub(crate) fn new(sink: W, level: u32) -> io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        Self::with_threads(sink, level, threads)
    }

    /// An encoder with `threads` workers (at least one); gzip `level` 0–9. The output does not
    /// depend on the thread count.
    pub(crate) fn with_threads(sink: W, level: u32, threads: usize) -> io::Result<Self> {
        let level = CompressionLvl::new(level.min(9) as i32)
            .map_err(|e| io::Error::other(format!("gzip level {level}: {e:?}")))?;
        Ok(ParGzEncoder {
            sink,
            level,
            threads: threads.max(1),
            pending: Vec::with_capacity(BLOCK),
            gear: 0,
            members: 0,
            pool: None,
            in_flight: VecDeque::new(),
            cache: None,
            written: 0,
            written_members: Vec::new(),
        })
    }

    /// Takes members from `cache` when it has them (checked before use).
    pub(crate) fn with_cache(mut self, cache: Arc<dyn MemberCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Hands a block to the workers (hashing, the cache and compression happen there),
    /// started on the first full block: a layer of one block is made on the caller's thread
    /// and spawns none.
    fn submit(&mut self, input: Vec<u8>, last: bool) -> io::Result<()> {
        self.members += 1;
        let (done, result) = sync_channel(1);
        if last && self.pool.is_none() {
            let block = Maker::new(self.level, self.cache.clone()).member(&input);
            // The receiver is ours and still here: this cannot fail.
            let _ = done.send(block);
        } else {
            let (threads, level, cache) = (self.threads, self.level, self.cache.clone());
            let pool = self
                .pool
                .get_or_insert_with(|| Pool::start(threads, level, cache));
            pool.jobs
                .as_ref()
                .ok_or_else(|| io::Error::other("gzip workers already stopped"))?
                .send(Job { input, done })
                .map_err(|_| io::Error::other("gzip worker threads are gone"))?;
        }
        self.in_flight.push_back(result);
        while self.in_flight.len() > 2 * self.threads {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.in_flight.pop_front() {
            let (key, out) = rx
                .recv()
                .map_err(|_| io::Error::other("a gzip worker thread died"))??;
            self.sink.write_all(&out)?;
            if let Some(key) = key {
                self.written_members.push(GzMember {
                    key,
                    offset: self.written,
                    len: out.len() as u64,
                });
            }
            self.written += out.len() as u64;
        }
        Ok(())
    }

    /// Compresses what is left and returns the sink and where each member went (with a
    /// cache; else none). Empty input still gives one (empty) member: a valid gzip file.
    pub(crate) fn finish(mut self) -> io::Result<(W, Vec<GzMember>)> {
        if !self.pending.is_empty() || self.members == 0 {
            let last = std::mem::take(&mut self.pending);
            self.submit(last, true)?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.pool.take();
        Ok((self.sink, self.written_members))
    }
}

/// The number of a libdeflate level (0–12).
fn level_number(level: CompressionLvl) -> u32 {
    (0..=12)
        .find(|n| CompressionLvl::new(*n).is_ok_and(|l| l == level))
        .unwrap_or(6) as u32
}

/// Where the next cut in `buf` is, given the gear hash `gear` over the `len` bytes of the
/// block before it: `Ok(index just past the cut)`, or `Err(gear)` when `buf` holds none.
fn find_cut(buf: &[u8], mut gear: u64, len: usize) -> Result<usize, u64> {
    // The bounds are worked out once, not tested per byte (this loop sees every byte of a
    // layer on the caller's thread): bytes past the forced cut at BLOCK are not looked at,
    // and the ones before MIN_BLOCK only feed the hash.
    let limit = BLOCK.saturating_sub(len).min(buf.len());
    let warm = MIN_BLOCK.saturating_sub(len + 1).min(limit);
    for b in &buf[..warm] {
        gear = (gear << 1).wrapping_add(GEAR[*b as usize]);
    }
    for (i, b) in buf[warm..limit].iter().enumerate() {
        gear = (gear << 1).wrapping_add(GEAR[*b as usize]);
        if gear & CUT_MASK == 0 {
            return Ok(warm + i + 1);
        }
    }
    if len + limit >= BLOCK {
        return Ok(limit);
    }
    Err(gear)
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The bytes before MIN_BLOCK cannot hold a cut; their hash is not needed either,
        // since the gear hash forgets everything older than 64 bytes.
        let skip = MIN_BLOCK
            .saturating_sub(64 + self.pending.len())
            .min(buf.len());
        if skip > 0 {
            self.pending.extend_from_slice(&buf[..skip]);
            return Ok(skip);
        }
        match find_cut(buf, self.gear, self.pending.len()) {
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                self.gear = 0;
                let block = std::mem::replace(&mut self.pending, Vec::with_capacity(BLOCK));
                self.submit(block, false)?;
                Ok(n)
            }
            Err(gear) => {
                self.gear = gear;
                self.pending.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    /// Blocks are cut by content only (the output must not depend on flushes), so this
    /// pushes nothing; the rest is written by [`ParGzEncoder::finish`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: text-like runs with a changing counter.
        let mut v = Vec::with_capacity(len);
        let mut i: u64 = 0;
        while v.len() < len {
            v.extend_from_slice(
                format!("line {i} of the sample {}\n", i * 2654435761 % 977).as_bytes(),
            );
            i += 1;
        }
        v.truncate(len);
        v
    }

    fn gz(data: &[u8], threads: usize, split: usize) -> Vec<u8> {
        gz_members(data, threads, split, None).0
    }

    fn gz_members(
        data: &[u8],
        threads: usize,
        split: usize,
        cache: Option<Arc<dyn MemberCache>>,
    ) -> (Vec<u8>, Vec<GzMember>) {
        let mut e = ParGzEncoder::with_threads(Vec::new(), 6, threads).unwrap();
        if let Some(c) = cache {
            e = e.with_cache(c);
        }
        for c in data.chunks(split.max(1)) {
            e.write_all(c).unwrap();
        }
        e.finish().unwrap()
    }

    /// Members of earlier blobs, by key; counts its answers. `lie` answers with another
    /// member than asked.
    #[derive(Default)]
    struct MapCache {
        members: Mutex<std::collections::HashMap<Digest, Vec<u8>>>,
        hits: std::sync::atomic::AtomicUsize,
        lie: bool,
    }

    impl MapCache {
        fn learn(&self, blob: &[u8], members: &[GzMember]) {
            let mut m = self.members.lock().unwrap();
            for g in members {
                let bytes = blob[g.offset as usize..(g.offset + g.len) as usize].to_vec();
                m.insert(g.key.clone(), bytes);
            }
        }
    }

    impl MemberCache for MapCache {
        fn get(&self, key: &Digest, level: u32) -> Option<Vec<u8>> {
            assert_eq!(level, 6);
            let m = self.members.lock().unwrap();
            let found = if self.lie {
                m.iter().find(|(k, _)| *k != key).map(|(_, v)| v.clone())
            } else {
                m.get(key).cloned()
            };
            if found.is_some() {
                self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            found
        }
    }

    /// `data` with `insert` put in at `at`.
    fn edited(data: &[u8], at: usize, insert: &[u8]) -> Vec<u8> {
        let mut v = data[..at].to_vec();
        v.extend_from_slice(insert);
        v.extend_from_slice(&data[at..]);
        v
    }

    #[test]
    fn an_insertion_changes_only_the_members_around_it() {
        let data = sample(12 * BLOCK);
        let empty = || -> Option<Arc<dyn MemberCache>> { Some(Arc::new(MapCache::default())) };
        let (_, before) = gz_members(&data, 2, 65536, empty());
        let next = edited(&data, 6 * BLOCK + 123, b"new line\n");
        let (_, after) = gz_members(&next, 2, 65536, empty());
        assert!(
            gz_members(&next, 2, 65536, None).1.is_empty(),
            "no cache, no keys"
        );
        assert!(before.len() > 12, "{} members", before.len());
        let old: std::collections::HashSet<_> = before.iter().map(|m| &m.key).collect();
        let changed = after.iter().filter(|m| !old.contains(&m.key)).count();
        assert!(
            (1..=2).contains(&changed),
            "{changed} of {} members changed",
            after.len()
        );
        // Members are contiguous and cover the blob.
        let mut at = 0;
        for m in &after {
            assert_eq!(m.offset, at);
            at += m.len;
        }
    }

    #[test]
    fn cached_members_give_the_same_blob_and_a_lying_cache_is_not_believed() {
        let data = sample(10 * BLOCK + 777);
        let empty = || -> Option<Arc<dyn MemberCache>> { Some(Arc::new(MapCache::default())) };
        let (blob, members) = gz_members(&data, 2, 65536, empty());
        let next = edited(&data, 3 * BLOCK, b"changed");
        let (want, want_members) = gz_members(&next, 2, 65536, empty());
        assert_eq!(gz_members(&next, 2, 65536, None).0, want);

        let cache = std::sync::Arc::new(MapCache::default());
        cache.learn(&blob, &members);
        let (got, got_members) = gz_members(&next, 2, 4096, Some(cache.clone()));
        assert_eq!(got, want, "the cache changed the blob");
        assert_eq!(got_members, want_members);
        let hits = cache.hits.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            hits + 2 >= members.len(),
            "{hits} hits of {}",
            members.len()
        );
        assert_eq!(gunzip(&got), next);

        let liar = std::sync::Arc::new(MapCache {
            lie: true,
            ..MapCache::default()
        });
        liar.learn(&blob, &members);
        let (got, _) = gz_members(&next, 1, 65536, Some(liar.clone()));
        assert!(liar.hits.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert_eq!(got, want);
    }

    fn gunzip(blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn round_trips_at_every_size_around_block_edges() {
        for len in [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let data = sample(len);
            let blob = gz(&data, 2, 65536);
            assert_eq!(
                &blob[..3],
                [0x1f, 0x8b, 8],
                "len {len}: a gzip header first"
            );
            assert_eq!(gunzip(&blob), data, "len {len}");
        }
    }

    #[test]
    fn output_depends_only_on_the_bytes() {
        let data = sample(5 * BLOCK + 12345);
        let one = gz(&data, 1, 7919);
        assert_eq!(
            one,
            gz(&data, 4, 1 << 20),
            "thread count or write split changed the blob"
        );
        assert_eq!(one, gz(&data, 2, 1));
    }

    #[test]
    fn members_cost_no_more_than_one_zlib_stream() {
        let data = sample(4 * BLOCK + 999);
        let blob = gz(&data, 2, 65536);
        let mut single = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap();
        assert!(
            blob.len() < single.len() + single.len() / 50,
            "parallel {} vs single {}",
            blob.len(),
            single.len()
        );
        assert_eq!(gunzip(&blob), data);
    }

    /// `len` incompressible bytes (xorshift from `seed`).
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    /// The cutting rule as first written, one test per byte.
    fn cut_by_the_rule(buf: &[u8], mut gear: u64, len: usize) -> Result<usize, u64> {
        for (i, b) in buf.iter().enumerate() {
            let at = len + i + 1;
            gear = (gear << 1).wrapping_add(GEAR[*b as usize]);
            if at >= BLOCK || (at >= MIN_BLOCK && gear & CUT_MASK == 0) {
                return Ok(i + 1);
            }
        }
        Err(gear)
    }

    #[test]
    fn cuts_are_where_the_rule_puts_them() {
        let noise = noise(3 * BLOCK, 0x2545_f491_4f6c_dd1d);
        let text = sample(3 * BLOCK);
        let zeros = vec![0u8; 3 * BLOCK];
        let mut cuts = 0;
        for data in [&noise, &text, &zeros] {
            for len in [
                0,
                1,
                MIN_BLOCK - 65,
                MIN_BLOCK - 2,
                MIN_BLOCK - 1,
                MIN_BLOCK,
                MIN_BLOCK + 1,
                BLOCK / 2,
                BLOCK - 2,
                BLOCK - 1,
            ] {
                for (start, n) in [(0, 0), (0, 1), (7, 4096), (100, 300_000), (5, 2 * BLOCK)] {
                    let buf = &data[start..start + n];
                    for gear in [0, 0xdead_beef_u64 << 20] {
                        let want = cut_by_the_rule(buf, gear, len);
                        cuts += usize::from(want.is_ok());
                        assert_eq!(find_cut(buf, gear, len), want, "len {len}, {n} bytes");
                    }
                }
            }
        }
        assert!(
            cuts > 100,
            "only {cuts} cuts: the cases miss the cutting paths"
        );

        // Where the hash itself allows a cut, put that byte just before, at and after the
        // edges MIN_BLOCK and BLOCK of the block.
        let fold = |bytes: &[u8]| {
            bytes
                .iter()
                .fold(0u64, |g, b| (g << 1).wrapping_add(GEAR[*b as usize]))
        };
        let candidates: Vec<usize> = (128..noise.len())
            .filter(|c| fold(&noise[c - 63..=*c]) & CUT_MASK == 0)
            .take(4)
            .collect();
        assert!(!candidates.is_empty(), "no cut candidate in the noise");
        for c in candidates {
            let start = c - 40;
            let gear = fold(&noise[start - 64..start]);
            let buf = &noise[start..start + 100];
            // The candidate is buf[40]: `at` is len + 41 there.
            for at in [MIN_BLOCK - 1, MIN_BLOCK, MIN_BLOCK + 1, BLOCK - 1, BLOCK] {
                let len = at - 41;
                assert_eq!(
                    find_cut(buf, gear, len),
                    cut_by_the_rule(buf, gear, len),
                    "a candidate at {at}"
                );
            }
            assert_eq!(find_cut(buf, gear, MIN_BLOCK - 41), Ok(41));
            assert_ne!(
                find_cut(buf, gear, MIN_BLOCK - 42),
                Ok(41),
                "a cut before MIN_BLOCK"
            );
        }
    }

    #[test]
    fn incompressible_blocks_round_trip() {
        let data = noise(2 * BLOCK + 5, 0x9e37_79b9_7f4a_7c15);
        assert_eq!(gunzip(&gz(&data, 2, 4096)), data);
    }
}
