//! Block-parallel gzip: the input is cut into fixed 1 MiB blocks, each block is compressed on a
//! worker thread by libdeflate into a gzip member of its own, and the members are written in
//! order. A gzip file is a series of members (RFC 1952 §2.2; bgzip and `pigz --independent`
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

use libdeflater::{CompressionLvl, Compressor};

/// Input block size: large enough that the per-member header and trailer (18 bytes) and the
/// window restart at each member cost nothing measurable, small enough to keep a few blocks
/// in flight per thread.
pub(crate) const BLOCK: usize = 1024 * 1024;

type Block = io::Result<Vec<u8>>;

struct Job {
    input: Vec<u8>,
    done: SyncSender<Block>,
}

struct Pool {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(threads: usize, level: CompressionLvl) -> Pool {
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                std::thread::spawn(move || {
                    let mut c = Compressor::new(level);
                    loop {
                        // The lock is held only while taking a job, never while compressing.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // The encoder may be gone (an error elsewhere): nobody to tell.
                        let _ = job.done.send(gzip_member(&mut c, &job.input));
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
fn gzip_member(c: &mut Compressor, input: &[u8]) -> Block {
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
    members: u64,
    pool: Option<Pool>,
    in_flight: VecDeque<Receiver<Block>>,
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
            members: 0,
            pool: None,
            in_flight: VecDeque::new(),
        })
    }

    /// Hands a block to the workers, started on the first full block: a layer smaller than
    /// one block is compressed on the caller's thread and spawns none.
    fn submit(&mut self, input: Vec<u8>, last: bool) -> io::Result<()> {
        self.members += 1;
        if last && self.pool.is_none() {
            let out = gzip_member(&mut Compressor::new(self.level), &input)?;
            return self.sink.write_all(&out);
        }
        let (threads, level) = (self.threads, self.level);
        let pool = self.pool.get_or_insert_with(|| Pool::start(threads, level));
        let (done, result) = sync_channel(1);
        pool.jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip workers already stopped"))?
            .send(Job { input, done })
            .map_err(|_| io::Error::other("gzip worker threads are gone"))?;
        self.in_flight.push_back(result);
        while self.in_flight.len() > 2 * self.threads {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(rx) = self.in_flight.pop_front() {
            let out = rx
                .recv()
                .map_err(|_| io::Error::other("a gzip worker thread died"))??;
            self.sink.write_all(&out)?;
        }
        Ok(())
    }

    /// Compresses what is left and returns the sink. Empty input still gives one (empty)
    /// member: a valid gzip file.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.pending.is_empty() || self.members == 0 {
            let last = std::mem::take(&mut self.pending);
            self.submit(last, true)?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.pool.take();
        Ok(self.sink)
    }
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = (BLOCK - self.pending.len()).min(buf.len());
        self.pending.extend_from_slice(&buf[..take]);
        if self.pending.len() == BLOCK {
            let block = std::mem::replace(&mut self.pending, Vec::with_capacity(BLOCK));
            self.submit(block, false)?;
        }
        Ok(take)
    }

    /// Blocks are cut at fixed sizes only (the output must not depend on flushes), so this
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
        let mut e = ParGzEncoder::with_threads(Vec::new(), 6, threads).unwrap();
        for c in data.chunks(split.max(1)) {
            e.write_all(c).unwrap();
        }
        e.finish().unwrap()
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

    #[test]
    fn incompressible_blocks_round_trip() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let data: Vec<u8> = (0..2 * BLOCK + 5)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(gunzip(&gz(&data, 2, 4096)), data);
    }
}
