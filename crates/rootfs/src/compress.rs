//! Layer compression: encoders that can be finished, decoders as plain readers.

use std::io::{self, Read, Write};

use strata_oci::{Compression, Digest, Hasher};

/// Default gzip level. Level 6 is what `gzip`, Go's `compress/gzip` (Docker, containerd) and
/// BuildKit use, so our blobs are about the size the ecosystem expects; layers are written once
/// and pulled many times, and zlib-rs makes 6 fast enough that the writer is not the bottleneck
/// of a build (see bench/rootfs/RESULTS-rootfs.md).
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
/// Default zstd level: zstd's own default, the one BuildKit and containerd use.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

pub(crate) enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub(crate) fn new(
        w: W,
        compression: Compression,
        gzip_level: u32,
        zstd_level: i32,
    ) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Encoder::None(w),
            // GzBuilder's defaults put no name and mtime 0 in the gzip header: reproducible.
            Compression::Gzip => Encoder::Gzip(
                flate2::GzBuilder::new().write(w, flate2::Compression::new(gzip_level.min(9))),
            ),
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, zstd_level)?),
        })
    }

    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.write_all(buf),
            Encoder::Gzip(e) => e.write_all(buf),
            Encoder::Zstd(e) => e.write_all(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
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
