//! Blobs: streaming, verified writes into `blobs/<alg>/<hex>` and verified reads.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use strata_oci::{Algorithm, Descriptor, Digest, Hasher};

use crate::error::{Error, IoContext, Result};
use crate::{Store, fsync_parent};

/// Buffer between producers' small writes and the temp file.
const WRITE_BUFFER: usize = 256 * 1024;

impl Store {
    /// Where the blob `digest` lives (or would live). For tools that need a path; readers in
    /// strata use [`Store::open_blob`], which verifies.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path_in(&self.root, digest)
    }

    /// Whether the store has the blob `digest` (not verified).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// The size in bytes of the blob `digest`.
    pub fn blob_size(&self, digest: &Digest) -> Result<u64> {
        let path = self.blob_path(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::BlobNotFound {
                digest: digest.clone(),
            }),
            Err(e) => Err(e).ctx("stat", path),
        }
    }

    /// A writer that streams a new sha256 blob into the store; see [`BlobWriter::commit`].
    pub fn blob_writer(&self) -> Result<BlobWriter> {
        self.blob_writer_with(Algorithm::Sha256)
    }

    /// A writer that hashes with `algorithm`.
    pub fn blob_writer_with(&self, algorithm: Algorithm) -> Result<BlobWriter> {
        BlobWriter::new(&self.root, algorithm, None)
    }

    /// Store `bytes`; if `expected` is given, refuse (storing nothing) unless they hash to it.
    /// Returns the digest and size. Idempotent.
    pub fn put_blob_bytes(&self, bytes: &[u8], expected: Option<&Digest>) -> Result<(Digest, u64)> {
        let alg = expected.map_or(Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(alg, bytes);
        if let Some(want) = expected
            && *want != digest
        {
            return Err(Error::DigestMismatch {
                expected: want.clone(),
                actual: digest,
            });
        }
        let size = bytes.len() as u64;
        if self.existing_blob_has_size(&digest, size) {
            return Ok((digest, size));
        }
        let mut w = BlobWriter::new(&self.root, alg, None)?;
        w.write_all(bytes).ctx("write", w.temp_path())?;
        w.commit(Some((&digest, Some(size))))
    }

    /// Stream `reader` into the store, hashing as it goes. With `expected = (digest, size)` the
    /// content must match both (a reader that runs past `size` is cut off early); otherwise
    /// nothing is stored. Returns the digest and size. Idempotent.
    pub fn put_blob_reader(
        &self,
        mut reader: impl Read,
        expected: Option<(&Digest, Option<u64>)>,
    ) -> Result<(Digest, u64)> {
        let alg = expected.map_or(Algorithm::Sha256, |(d, _)| d.algorithm());
        let limit = expected.and_then(|(_, s)| s);
        let mut w = BlobWriter::new(&self.root, alg, limit)?;
        match io::copy(&mut reader, &mut w) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
                if let (Some((digest, _)), Some(limit)) = (expected, limit) {
                    return Err(Error::SizeMismatch {
                        digest: digest.clone(),
                        expected: limit,
                        actual: w.len(),
                    });
                }
                return Err(e).ctx("write", w.temp_path());
            }
            Err(e) => return Err(e).ctx("stream into", w.temp_path()),
        }
        w.commit(expected)
    }

    /// Open the blob `digest` for reading. The reader checks digest and size at EOF and fails
    /// with an `InvalidData` I/O error naming the digest if the content is not what it should be.
    pub fn open_blob(&self, digest: &Digest) -> Result<VerifyingReader> {
        let size = self.blob_size(digest)?;
        self.open_blob_sized(digest, size)
    }

    /// Open the blob a descriptor names; the size must also match the descriptor's.
    pub fn open_descriptor(&self, desc: &Descriptor) -> Result<VerifyingReader> {
        let on_disk = self.blob_size(&desc.digest)?;
        if on_disk != desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: on_disk,
            });
        }
        self.open_blob_sized(&desc.digest, desc.size)
    }

    fn open_blob_sized(&self, digest: &Digest, size: u64) -> Result<VerifyingReader> {
        let path = self.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::BlobNotFound {
                    digest: digest.clone(),
                });
            }
            Err(e) => return Err(e).ctx("open", path),
        };
        Ok(VerifyingReader {
            file,
            hasher: Some(digest.algorithm().hasher()),
            digest: digest.clone(),
            expected_size: size,
            read: 0,
            failure: None,
        })
    }

    /// Read the whole blob `digest`, verified.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::BlobNotFound {
                    digest: digest.clone(),
                });
            }
            Err(e) => return Err(e).ctx("read", path),
        };
        let actual = Digest::of(digest.algorithm(), &bytes);
        if actual != *digest {
            return Err(Error::CorruptBlob {
                digest: digest.clone(),
                path,
                reason: format!("content hashes to {actual}"),
            });
        }
        Ok(bytes)
    }

    /// Read the whole blob a descriptor names, verified against its digest and size.
    pub fn read_descriptor(&self, desc: &Descriptor) -> Result<Vec<u8>> {
        let bytes = self.read_blob(&desc.digest)?;
        if bytes.len() as u64 != desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.clone(),
                expected: desc.size,
                actual: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    /// Every blob under `blobs/sha256` and `blobs/sha512`, with its size, sorted by digest.
    /// Files whose names are not digests are ignored.
    pub fn list_blobs(&self) -> Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(alg.as_str());
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx("list", dir),
            };
            for entry in entries {
                let entry = entry.ctx("list", &dir)?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(digest) = format!("{}:{name}", alg.as_str()).parse::<Digest>() else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_file() {
                    out.push((digest, meta.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn existing_blob_has_size(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.blob_path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }
}

pub(crate) fn blob_path_in(root: &Path, digest: &Digest) -> PathBuf {
    // `Digest` guarantees a known algorithm and lowercase hex, so this cannot escape `blobs/`.
    root.join("blobs")
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

/// Streams a new blob into `strata/tmp/`, hashing and counting; [`BlobWriter::commit`] verifies
/// and moves it into `blobs/`. Dropped without commit, it removes its temp file.
pub struct BlobWriter {
    root: PathBuf,
    file: BufWriter<tempfile::NamedTempFile>,
    hasher: Hasher,
    len: u64,
    /// Refuse writes past this many bytes, so a stream longer than announced is cut off early.
    limit: Option<u64>,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("temp", &self.temp_path())
            .field("len", &self.len)
            .finish()
    }
}

impl BlobWriter {
    fn new(root: &Path, algorithm: Algorithm, limit: Option<u64>) -> Result<BlobWriter> {
        let tmp_dir = root.join("strata/tmp");
        let tmp = tempfile::Builder::new()
            .prefix(&crate::temp_prefix("blob"))
            .tempfile_in(&tmp_dir)
            .ctx("create temp file in", &tmp_dir)?;
        Ok(BlobWriter {
            root: root.to_path_buf(),
            file: BufWriter::with_capacity(WRITE_BUFFER, tmp),
            hasher: algorithm.hasher(),
            len: 0,
            limit,
        })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The temp file being written (under `strata/tmp/`).
    pub fn temp_path(&self) -> &Path {
        self.file.get_ref().path()
    }

    /// Verify what was written against `expected` (digest, and size if given), then make it a
    /// blob: fsync, rename into `blobs/<alg>/<hex>`, fsync the directory. On a mismatch nothing
    /// is stored and the temp file is removed. If the blob already exists the temp file is
    /// discarded. Returns the digest and size.
    pub fn commit(self, expected: Option<(&Digest, Option<u64>)>) -> Result<(Digest, u64)> {
        let BlobWriter {
            root,
            file,
            hasher,
            len,
            ..
        } = self;
        let temp_path = file.get_ref().path().to_path_buf();
        let tmp = file
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("flush", temp_path)?;
        let digest = hasher.finish();
        if let Some((want, size)) = expected {
            if let Some(size) = size
                && size != len
            {
                return Err(Error::SizeMismatch {
                    digest: want.clone(),
                    expected: size,
                    actual: len,
                });
            }
            if *want != digest {
                return Err(Error::DigestMismatch {
                    expected: want.clone(),
                    actual: digest,
                });
            }
        }
        let target = blob_path_in(&root, &digest);
        // Same digest and size: it is the same content (a truncated leftover would differ in size
        // and gets replaced).
        if fs::metadata(&target).is_ok_and(|m| m.is_file() && m.len() == len) {
            return Ok((digest, len));
        }
        tmp.as_file().sync_all().ctx("fsync", tmp.path())?;
        tmp.persist(&target)
            .map_err(|e| e.error)
            .ctx("rename into place", &target)?;
        fsync_parent(&target)?;
        Ok((digest, len))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit
            && self.len + buf.len() as u64 > limit
        {
            self.len += buf.len() as u64;
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("blob is larger than the expected {limit} bytes"),
            ));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Reads a blob and checks, at EOF, that it had the expected size and digest. A mismatch is an
/// `InvalidData` I/O error whose message names the digest; so is reading past the expected size.
pub struct VerifyingReader {
    file: File,
    /// `None` once EOF was verified.
    hasher: Option<Hasher>,
    digest: Digest,
    expected_size: u64,
    read: u64,
    /// Set on the first mismatch and returned again by every later read.
    failure: Option<String>,
}

impl std::fmt::Debug for VerifyingReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingReader")
            .field("digest", &self.digest)
            .field("expected_size", &self.expected_size)
            .field("read", &self.read)
            .finish()
    }
}

impl VerifyingReader {
    /// The digest being verified.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The size the blob must have.
    pub fn size(&self) -> u64 {
        self.expected_size
    }

    fn fail(&mut self, reason: String) -> io::Error {
        let msg = format!("blob {} is corrupt: {reason}", self.digest);
        self.failure = Some(msg.clone());
        io::Error::new(io::ErrorKind::InvalidData, msg)
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(msg) = &self.failure {
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg.clone()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.file.read(buf)?;
        if n == 0 {
            let Some(hasher) = self.hasher.take() else {
                return Ok(0);
            };
            if self.read != self.expected_size {
                let reason = format!("expected {} bytes, read {}", self.expected_size, self.read);
                return Err(self.fail(reason));
            }
            let actual = hasher.finish();
            if actual != self.digest {
                return Err(self.fail(format!("content hashes to {actual}")));
            }
            return Ok(0);
        }
        self.read += n as u64;
        if self.read > self.expected_size {
            let reason = format!("longer than the expected {} bytes", self.expected_size);
            return Err(self.fail(reason));
        }
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Raw blob reads for [`strata_oci::validate_image`], which does its own digest and size checks
/// so that it can report exactly which blob is wrong and how.
impl strata_oci::BlobSource for Store {
    fn open(&self, digest: &Digest) -> io::Result<Box<dyn Read + '_>> {
        Ok(Box::new(io::BufReader::with_capacity(
            256 * 1024,
            std::fs::File::open(self.blob_path(digest))?,
        )))
    }
}
