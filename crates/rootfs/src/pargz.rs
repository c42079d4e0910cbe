//! Block-parallel gzip, pigz's scheme: the input is cut into fixed blocks, each block is
//! deflated on a worker thread with the previous block's last 32 KiB as its dictionary and ends
//! with a sync flush, and the pieces are written in order as one gzip member. Hashing, CRC and
//! tar reading stay on the caller's thread, so a 1 GB layer commits in about its size divided
//! by the number of cores times deflate's speed.
//!
//! Written here rather than taken from a crate: `gzp` (the parallel gzip crate) wants an owned
//! `'static` sink and its own thread pool per writer, and its output is not promised to be
//! independent of the thread count. Ours depends only on the input bytes, the block size and
//! the level (never on the number of threads or how writes were split), which the blob digests
//! of reproducible layers need. Every part but the scheduling is flate2's.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Crc, FlushCompress};

/// Input block size. pigz uses 128 KiB; larger blocks cost fewer sync markers and dictionary
/// resets on big layers, and stay small enough that a few are in flight per thread.
pub(crate) const BLOCK: usize = 1024 * 1024;
/// Deflate's window: what each block takes from the one before as its dictionary.
const DICT: usize = 32 * 1024;
/// The gzip header: deflate, no flags, mtime 0, no extra flags, OS "unknown" (what flate2's
/// GzBuilder writes by default, so the header never depends on the machine).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty final block (fixed Huffman, end-of-block only): closes the deflate stream after the
/// sync-flushed data blocks.
const LAST_BLOCK: [u8; 2] = [0x03, 0x00];

type Block = io::Result<Vec<u8>>;

struct Job {
    input: Vec<u8>,
    dict: Vec<u8>,
    done: SyncSender<Block>,
}

struct Pool {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn start(threads: usize, level: u32) -> Pool {
        let (tx, rx) = sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                std::thread::spawn(move || {
                    loop {
                        // The lock is held only while taking a job, never while deflating.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // The encoder may be gone (an error elsewhere): nobody to tell.
                        let _ = job.done.send(deflate_block(level, &job.dict, &job.input));
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

/// Raw deflate of one block, dictionary first, ending byte-aligned with a sync flush.
fn deflate_block(level: u32, dict: &[u8], input: &[u8]) -> Block {
    let mut c = Compress::new(flate2::Compression::new(level.min(9)), false);
    if !dict.is_empty() {
        c.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(input.len() + input.len() / 16 + 1024);
    loop {
        let done = c.total_in() as usize;
        c.compress_vec(&input[done..], &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        // zlib's rule: the flush is complete when all input is taken and output space is left.
        if c.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        out.reserve(64 * 1024);
    }
}

/// A gzip writer that deflates blocks on worker threads.
pub(crate) struct ParGzEncoder<W: Write> {
    sink: W,
    level: u32,
    threads: usize,
    pending: Vec<u8>,
    dict: Vec<u8>,
    crc: Crc,
    pool: Option<Pool>,
    in_flight: VecDeque<Receiver<Block>>,
}

impl<W: Write> ParGzEncoder<W> {
    /// An encoder with one worker per core.
    pub(crate) fn new(sink: W, level: u32) -> io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        Self::with_threads(sink, level, threads)
    }

    /// An encoder with `threads` workers (at least one). The output does not depend on it.
    pub(crate) fn with_threads(mut sink: W, level: u32, threads: usize) -> io::Result<Self> {
        sink.write_all(&HEADER)?;
        Ok(ParGzEncoder {
            sink,
            level,
            threads: threads.max(1),
            pending: Vec::with_capacity(BLOCK),
            dict: Vec::new(),
            crc: Crc::new(),
            pool: None,
            in_flight: VecDeque::new(),
        })
    }

    /// Hands a block to the workers (started on the first one: a small layer spawns none).
    fn submit(&mut self, input: Vec<u8>, inline: bool) -> io::Result<()> {
        self.crc.update(&input);
        let dict = std::mem::replace(
            &mut self.dict,
            input[input.len().saturating_sub(DICT)..].to_vec(),
        );
        if inline && self.pool.is_none() {
            let out = deflate_block(self.level, &dict, &input)?;
            return self.sink.write_all(&out);
        }
        let level = self.level;
        let threads = self.threads;
        let pool = self.pool.get_or_insert_with(|| Pool::start(threads, level));
        let (done, result) = sync_channel(1);
        let jobs = pool
            .jobs
            .as_ref()
            .expect("job channel open while the encoder lives");
        jobs.send(Job { input, dict, done })
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

    /// Compresses what is left, writes the end of the stream and returns the sink.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.pending.is_empty() {
            let last = std::mem::take(&mut self.pending);
            self.submit(last, true)?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.pool.take();
        self.sink.write_all(&LAST_BLOCK)?;
        self.sink.write_all(&self.crc.sum().to_le_bytes())?;
        self.sink.write_all(&self.crc.amount().to_le_bytes())?;
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
        flate2::read::GzDecoder::new(blob)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn round_trips_at_every_size_around_block_edges() {
        for len in [0, 1, 100, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17] {
            let data = sample(len);
            assert_eq!(gunzip(&gz(&data, 2, 65536)), data, "len {len}");
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
    fn dictionary_keeps_the_ratio_of_one_stream() {
        // Blocks repeating each other compress only if each block sees the one before.
        let chunk = sample(20 * 1024);
        let data: Vec<u8> = chunk.iter().cycle().take(4 * BLOCK).copied().collect();
        let blob = gz(&data, 2, 65536);
        let mut single = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        single.write_all(&data).unwrap();
        let single = single.finish().unwrap();
        assert!(
            blob.len() < single.len() + single.len() / 20 + 64,
            "parallel {} vs single {}",
            blob.len(),
            single.len()
        );
        assert_eq!(gunzip(&blob), data);
    }

    #[test]
    fn incompressible_blocks_are_stored_whole() {
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
