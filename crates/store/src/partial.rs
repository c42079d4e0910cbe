//! Resumable blob writes: `strata/partial/<alg>-<hex>` holds the bytes received so far of one
//! blob, so a transfer cut by a dropped connection or a killed process continues where it
//! stopped instead of starting over (hosts over SSH use it on both ends).
//!
//! A partial file is locked (`flock`, exclusive) while a writer holds it, so two transfers of
//! one blob into one store take turns. Its bytes are a prefix of what was sent: data reaches the
//! file only by `write(2)`, which a killed process cannot tear. The prefix is hashed again when a
//! writer resumes, and the whole blob is verified against its digest and size before it is
//! renamed into `blobs/`; a prefix that turns out wrong is removed, so the next attempt starts
//! from zero. [`Store::gc`] removes partial files nobody holds that were not written for a day.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::FlockOperation;
use strata_oci::{Digest, Hasher};

use crate::error::{Error, IoContext, Result};
use crate::lock::flock_retrying;
use crate::{Store, fsync_parent};

/// Partial files untouched for this long are abandoned: gc removes them.
pub const PARTIAL_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Buffer between a network reader's small writes and the partial file.
const WRITE_BUFFER: usize = 1024 * 1024;

impl Store {
    fn partial_dir(&self) -> PathBuf {
        self.root.join("strata/partial")
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.partial_dir()
            .join(format!("{}-{}", digest.algorithm().as_str(), digest.hex()))
    }

    /// How many bytes of `digest` an interrupted transfer left (0 when none). Not verified:
    /// [`Store::partial_blob`] hashes them again before it appends.
    pub fn partial_len(&self, digest: &Digest) -> u64 {
        fs::metadata(self.partial_path(digest)).map_or(0, |m| m.len())
    }

    /// Open the resumable write of `digest` (`size` bytes), waiting while another writer holds
    /// it. The bytes already there are hashed again; more than `size` of them is impossible for
    /// an honest sender, so such a file starts over. See [`PartialBlob::offset`].
    pub fn partial_blob(&self, digest: &Digest, size: u64) -> Result<PartialBlob> {
        let dir = self.partial_dir();
        fs::create_dir_all(&dir).ctx("create", &dir)?;
        let path = self.partial_path(digest);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .ctx("open", &path)?;
        flock_retrying(&file, FlockOperation::LockExclusive).ctx("lock", &path)?;
        let mut hasher = digest.algorithm().hasher();
        let mut len = file.metadata().ctx("stat", &path)?.len();
        if len > size {
            file.set_len(0).ctx("truncate", &path)?;
            len = 0;
        }
        if len > 0 {
            // The prefix is hashed again: the hasher's state cannot be saved across processes.
            let mut buf = vec![0u8; WRITE_BUFFER];
            let mut left = len;
            file.seek(SeekFrom::Start(0)).ctx("seek", &path)?;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = file.read(&mut buf[..want]).ctx("read", &path)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            len -= left;
        }
        file.seek(SeekFrom::Start(len)).ctx("seek", &path)?;
        file.set_len(len).ctx("truncate", &path)?;
        Ok(PartialBlob {
            root: self.root.clone(),
            path,
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            hasher: Some(hasher),
            digest: digest.clone(),
            size,
            len,
        })
    }

    /// Remove partial files nobody holds that were not written for [`PARTIAL_MAX_AGE`];
    /// returns how many bytes they held.
    pub(crate) fn sweep_partials(&self, dry_run: bool) -> Result<(usize, u64)> {
        let dir = self.partial_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(e).ctx("read", &dir),
        };
        let now = SystemTime::now();
        let (mut count, mut bytes) = (0, 0);
        for entry in entries {
            let entry = entry.ctx("read", &dir)?;
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            let age = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age < PARTIAL_MAX_AGE {
                continue;
            }
            let Ok(file) = File::open(&path) else {
                continue;
            };
            // Held by a writer right now: not abandoned, however old its last write.
            if flock_retrying(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
                continue;
            }
            if !dry_run {
                fs::remove_file(&path).ctx("remove", &path)?;
            }
            count += 1;
            bytes += meta.len();
        }
        Ok((count, bytes))
    }
}

/// The resumable write of one blob; see the module docs. Dropping it keeps what was written
/// for the next attempt.
pub struct PartialBlob {
    root: PathBuf,
    path: PathBuf,
    file: BufWriter<File>,
    /// `None` after a commit.
    hasher: Option<Hasher>,
    digest: Digest,
    size: u64,
    len: u64,
}

impl std::fmt::Debug for PartialBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartialBlob")
            .field("digest", &self.digest)
            .field("size", &self.size)
            .field("len", &self.len)
            .finish()
    }
}

impl PartialBlob {
    /// Bytes held so far (verified as a prefix only at commit): the sender continues here.
    pub fn offset(&self) -> u64 {
        self.len
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Check the bytes against the digest and size, then rename them into `blobs/` (fsynced).
    /// On a mismatch the partial file is removed, nothing is stored, and the error says why.
    pub fn commit(mut self) -> Result<Digest> {
        self.file.flush().ctx("flush", &self.path)?;
        let digest = self.hasher.take().map(Hasher::finish);
        let wrong = if self.len != self.size {
            Some(Error::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.len,
            })
        } else if digest.as_ref() != Some(&self.digest) {
            Some(Error::DigestMismatch {
                expected: self.digest.clone(),
                actual: digest.unwrap_or_else(|| self.digest.clone()),
            })
        } else {
            None
        };
        if let Some(e) = wrong {
            fs::remove_file(&self.path).ctx("remove", &self.path)?;
            return Err(e);
        }
        let target = crate::blob::blob_path_in(&self.root, &self.digest);
        if fs::metadata(&target).is_ok_and(|m| m.is_file() && m.len() == self.len) {
            fs::remove_file(&self.path).ctx("remove", &self.path)?;
            return Ok(self.digest.clone());
        }
        if let Some(dir) = target.parent() {
            fs::create_dir_all(dir).ctx("create", dir)?;
        }
        self.file.get_ref().sync_all().ctx("fsync", &self.path)?;
        fs::rename(&self.path, &target).ctx("rename into place", &target)?;
        fsync_parent(&target)?;
        Ok(self.digest.clone())
    }
}

impl Write for PartialBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "blob {} is larger than the expected {} bytes",
                    self.digest, self.size
                ),
            ));
        }
        let n = self.file.write(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for PartialBlob {
    fn drop(&mut self) {
        // What was received stays for the next attempt (best effort: a failed flush only costs
        // those bytes being sent again).
        let _ = self.file.flush();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        (dir, store)
    }

    #[test]
    fn an_interrupted_write_resumes_at_its_offset_and_commits_verified() {
        let (_d, store) = store();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::sha256(&data);
        let size = data.len() as u64;
        {
            let mut p = store.partial_blob(&digest, size).unwrap();
            assert_eq!(p.offset(), 0);
            p.write_all(&data[..1_234_567]).unwrap();
            // Dropped without commit: a connection that died.
        }
        assert_eq!(store.partial_len(&digest), 1_234_567);
        assert!(!store.has_blob(&digest));
        let mut p = store.partial_blob(&digest, size).unwrap();
        assert_eq!(p.offset(), 1_234_567);
        p.write_all(&data[1_234_567..]).unwrap();
        assert_eq!(p.commit().unwrap(), digest);
        assert_eq!(store.read_blob(&digest).unwrap(), data);
        assert_eq!(store.partial_len(&digest), 0, "partial file removed");
    }

    #[test]
    fn a_wrong_prefix_is_refused_at_commit_and_the_next_attempt_starts_over() {
        let (_d, store) = store();
        let data = vec![7u8; 100_000];
        let digest = Digest::sha256(&data);
        {
            let mut p = store.partial_blob(&digest, data.len() as u64).unwrap();
            p.write_all(&[8u8; 50_000]).unwrap();
        }
        let mut p = store.partial_blob(&digest, data.len() as u64).unwrap();
        p.write_all(&data[50_000..]).unwrap();
        let err = p.commit().unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&digest));
        assert_eq!(store.partial_blob(&digest, 100_000).unwrap().offset(), 0);
    }

    #[test]
    fn more_bytes_than_the_size_are_refused() {
        let (_d, store) = store();
        let digest = Digest::sha256(b"abc");
        let mut p = store.partial_blob(&digest, 3).unwrap();
        let err = p.write_all(b"abcd").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
    }

    #[test]
    fn gc_sweeps_only_old_unheld_partials() {
        let (_d, store) = store();
        let a = Digest::sha256(b"a");
        let b = Digest::sha256(b"b");
        drop(store.partial_blob(&a, 10).unwrap());
        let held = store.partial_blob(&b, 10).unwrap();
        let old = SystemTime::now() - PARTIAL_MAX_AGE - Duration::from_secs(60);
        for d in [&a, &b] {
            File::options()
                .write(true)
                .open(store.partial_path(d))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        assert_eq!(store.sweep_partials(false).unwrap().0, 1);
        assert!(!store.partial_path(&a).exists());
        assert!(held.path().exists(), "a held partial is never swept");
    }
}
