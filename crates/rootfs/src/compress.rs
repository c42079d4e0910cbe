//! Layer compression: encoders that can be finished, decoders as plain readers.

use std::io::{self, Read, Write};

use strata_oci::{Compression, Digest, Hasher};

use crate::pargz::{GzMember, MemberCache, ParGzEncoder};

/// A [`MemberCache`] for [`crate::LayerOptions`]: gzip layers take the members it has instead
/// of compressing them again.
#[derive(Clone)]
pub struct GzMemberCache(pub std::sync::Arc<dyn MemberCache>);

impl std::fmt::Debug for GzMemberCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GzMemberCache")
    }
}

/// Default gzip level (libdeflate's scale): the cheapest level whose blobs are no larger than
/// the ones Docker and BuildKit push (Go's `compress/gzip` at its default level), so layers
/// are the size the ecosystem expects: they are written once and pulled many times. Measured
/// on real layers (bench/RESULTS.md, "The gzip level"): the Fly example's 637 MB apt-get layer
/// is 243.7 MB at level 4 against Go's 244.5 MB, a Debian 12 root filesystem 49.2 MB against
/// 49.6 MB; level 6 makes them 2% smaller for 35% more CPU (1.06 s more on that layer, on the
/// critical path of a build), level 3 is already larger than Go's. Who needs speed over size
/// should pick zstd, which is both faster and smaller.
pub const DEFAULT_GZIP_LEVEL: u32 = 4;
/// Default zstd level: zstd's own default, the one BuildKit and containerd use.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Input is handed to the compressor in chunks of exactly this size (the last one may be
/// shorter). zstd's streaming output depends on how its input is split into `write` calls, so
/// without this the same tar read through different buffers (a file, an entry of an archive)
/// would give different bytes and a different blob digest. (gzip cuts its own fixed blocks.)
const ENCODER_CHUNK: usize = 64 * 1024;

enum Codec<W: Write> {
    None(W),
    Gzip(ParGzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Codec<W> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Codec::None(w) => w.write_all(buf),
            Codec::Gzip(e) => e.write_all(buf),
            Codec::Zstd(e) => e.write_all(buf),
        }
    }
}

/// A layer compressor whose output depends only on the bytes written, not on how they were
/// split into writes.
pub(crate) struct Encoder<W: Write> {
    codec: Codec<W>,
    pending: Vec<u8>,
}

impl<W: Write> Encoder<W> {
    pub(crate) fn new(
        w: W,
        compression: Compression,
        gzip_level: u32,
        zstd_level: i32,
        members: Option<&GzMemberCache>,
    ) -> io::Result<Self> {
        let codec = match compression {
            Compression::None => Codec::None(w),
            // Blocks deflated in parallel; the bytes depend only on the input and the level.
            Compression::Gzip => {
                let e = ParGzEncoder::new(w, gzip_level)?;
                Codec::Gzip(match members {
                    Some(c) => e.with_cache(std::sync::Arc::clone(&c.0)),
                    None => e,
                })
            }
            Compression::Zstd => Codec::Zstd(zstd::stream::write::Encoder::new(w, zstd_level)?),
        };
        Ok(Encoder {
            codec,
            pending: Vec::with_capacity(ENCODER_CHUNK),
        })
    }

    /// The sink, and where each gzip member went (none for other compressions).
    pub(crate) fn finish(mut self) -> io::Result<(W, Vec<GzMember>)> {
        if !self.pending.is_empty() {
            self.codec.write_all(&self.pending)?;
        }
        match self.codec {
            Codec::None(w) => Ok((w, Vec::new())),
            Codec::Gzip(e) => e.finish(),
            Codec::Zstd(e) => Ok((e.finish()?, Vec::new())),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            if self.pending.is_empty() && buf.len() >= ENCODER_CHUNK {
                let (chunk, rest) = buf.split_at(ENCODER_CHUNK);
                self.codec.write_all(chunk)?;
                buf = rest;
                continue;
            }
            let take = (ENCODER_CHUNK - self.pending.len()).min(buf.len());
            self.pending.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.pending.len() == ENCODER_CHUNK {
                self.codec.write_all(&self.pending)?;
                self.pending.clear();
            }
        }
        Ok(())
    }

    /// Does not push pending input into the compressor (that would change the output); the
    /// bytes reach the sink at [`Encoder::finish`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Wraps a compressed layer stream in the matching decoder.
pub fn decompress<'a, R: Read + 'a>(
    reader: R,
    compression: Compression,
) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match compression {
        Compression::None => Box::new(reader),
        // Multi-member: `pigz` and concatenated gzip files are valid gzip layers.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(128 * 1024, reader),
        )),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
    })
}

/// A reader adaptor that hashes and counts everything read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::sha256(),
            len: 0,
        }
    }

    pub(crate) fn finish(self) -> (Digest, u64) {
        (self.hasher.finish(), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}
