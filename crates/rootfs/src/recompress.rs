//! Turning an existing tar stream (a `docker import` tarball, a docker-archive layer) into a
//! layer blob, with both digests computed in the one pass.

use std::io::{self, Read, Write};

use strata_oci::Compression;

use crate::compress::decompress;
use crate::write::LayerStream;
use crate::{Error, LayerInfo, LayerOptions, Result};

/// Detects the compression of a stream from its first bytes (gzip `1f 8b`, zstd `28 b5 2f fd`).
pub fn sniff_compression(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// Reads a tar stream (plain, gzip or zstd: detected), and writes it to `sink` compressed per
/// `opts.compression`, returning the diff_id (of the plain tar) and the blob digest and size.
///
/// The tar bytes are kept as they are (no re-ordering); only the compression changes. In the
/// same pass every header is parsed and every entry read to its end, so a stream that is not a
/// tar, or is cut inside an entry, is refused ([`Error::BadHeader`], [`Error::Truncated`]).
/// Entry *names* are not judged here: [`crate::apply_layer`] refuses hostile ones at unpack.
pub fn recompress_tar(
    input: impl Read,
    opts: &LayerOptions,
    sink: impl Write,
) -> Result<LayerInfo> {
    let mut input = io::BufReader::with_capacity(256 * 1024, input);
    let head =
        io::BufRead::fill_buf(&mut input).map_err(|source| Error::Stream { offset: 0, source })?;
    if head.is_empty() {
        return Err(Error::BadHeader {
            offset: 0,
            reason: "empty input, expected a tar stream".to_string(),
        });
    }
    let compression = sniff_compression(head);
    let plain =
        decompress(input, compression).map_err(|source| Error::Stream { offset: 0, source })?;

    let mut archive = tar::Archive::new(Tee {
        from: plain,
        to: LayerStream::new(sink, opts)?,
        failed_write: None,
    });
    let mut entries = archive
        .entries()
        .map_err(|source| Error::Stream { offset: 0, source })?;
    let mut count = 0u64;
    loop {
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                return Err(Error::BadHeader {
                    offset: 0,
                    reason: format!("after {count} entries: {e}"),
                });
            }
        };
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let offset = entry.raw_header_position();
        let size = entry.size();
        let copied = io::copy(&mut entry, &mut io::sink()).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => Error::Truncated {
                entry: name.clone(),
                offset,
            },
            _ => Error::Stream { offset, source: e },
        })?;
        // The tar crate ends an entry's reader quietly at the end of the stream.
        if copied < size {
            return Err(Error::Truncated {
                entry: name,
                offset,
            });
        }
        count += 1;
    }
    // Whatever follows the end-of-archive marker (padding to the record size) is part of the
    // layer's bytes too: the diff_id covers the whole stream.
    let mut tee = archive.into_inner();
    io::copy(&mut tee, &mut io::sink()).map_err(|source| Error::Stream { offset: 0, source })?;
    if let Some(e) = tee.failed_write {
        return Err(Error::Sink(e));
    }
    tee.to.finish(opts)
}

/// Copies everything read from `from` into `to`, so the tar parser drives the recompression.
struct Tee<R, W> {
    from: R,
    to: W,
    /// A write error, kept apart so it is reported as a sink error, not a bad stream.
    failed_write: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.from.read(buf)?;
        if let Err(e) = self.to.write_all(&buf[..n]) {
            let msg = e.to_string();
            self.failed_write = Some(e);
            return Err(io::Error::other(msg));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn diff_id_is_the_digest_of_the_plain_tar_whatever_the_input_compression() {
        let plain = tar_of(&[("a", b"hello"), ("b/c", b"world")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        for input in [&plain, &gz] {
            let mut out = Vec::new();
            let info = recompress_tar(&input[..], &LayerOptions::default(), &mut out).unwrap();
            assert_eq!(info.diff_id, strata_oci::Digest::sha256(&plain));
            assert_eq!(info.digest, strata_oci::Digest::sha256(&out));
            assert_eq!(info.size, out.len() as u64);
            assert_eq!(info.uncompressed_size, plain.len() as u64);
        }
    }

    /// Reads at most `n` bytes per call, to vary how the input is split.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn output_does_not_depend_on_how_the_input_is_read() {
        let big: Vec<u8> = (0..300_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7) as u8)
            .collect();
        let plain = tar_of(&[("a", &big), ("b", b"tail")]);
        for compression in [Compression::Gzip, Compression::Zstd] {
            let opts = LayerOptions {
                compression,
                ..LayerOptions::default()
            };
            let whole = recompress_tar(&plain[..], &opts, Vec::new()).unwrap();
            for step in [1usize, 511, 4096, 70_000] {
                let info = recompress_tar(Dribble(&plain, step), &opts, Vec::new()).unwrap();
                assert_eq!(
                    info.digest, whole.digest,
                    "{compression:?} read {step} at a time"
                );
            }
        }
    }

    #[test]
    fn truncated_or_non_tar_input_is_refused() {
        let plain = tar_of(&[("big", &[7u8; 5000])]);
        let cut = &plain[..512 + 1000];
        let err = recompress_tar(cut, &LayerOptions::default(), Vec::new()).unwrap_err();
        assert!(
            matches!(err, Error::Truncated { ref entry, .. } if entry == "big"),
            "{err}"
        );
        let err = recompress_tar(
            &b"this is not a tar file at all, just some text"[..],
            &LayerOptions::default(),
            Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::BadHeader { .. }), "{err}");
        let err = recompress_tar(&b""[..], &LayerOptions::default(), Vec::new()).unwrap_err();
        assert!(matches!(err, Error::BadHeader { .. }), "{err}");
    }
}
