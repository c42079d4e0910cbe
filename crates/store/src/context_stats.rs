//! Per build context, the bytes of its stat cache (kept by the builder: path → stat → content
//! digest), so a file whose stat is unchanged is not read again on the next build, and of its
//! known keys (the builder's: the key of a whole selection of files whose stats are unchanged).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use strata_oci::Digest;

use crate::error::{IoContext, Result};
use crate::{Store, temp_prefix};

impl Store {
    /// `strata/context-stats/<sha256 of the context's absolute path>`: the file
    /// [`Store::context_stats`] reads.
    pub fn context_stats_path(&self, context: &Path) -> PathBuf {
        let key = Digest::sha256(context.as_os_str().as_encoded_bytes());
        self.root.join("strata/context-stats").join(key.hex())
    }

    /// The same with `.keys` appended.
    fn context_keys_path(&self, context: &Path) -> PathBuf {
        let mut p = self.context_stats_path(context).into_os_string();
        p.push(".keys");
        p.into()
    }

    /// The stat cache last saved for `context` (an absolute path), if any.
    pub fn context_stats(&self, context: &Path) -> Result<Option<Vec<u8>>> {
        read_if_any(&self.context_stats_path(context))
    }

    /// The known keys last saved for `context`, if any.
    pub fn context_keys(&self, context: &Path) -> Result<Option<Vec<u8>>> {
        read_if_any(&self.context_keys_path(context))
    }

    /// Replaces the known keys of `context` as [`Store::put_context_stats`] replaces its stat
    /// cache.
    pub fn put_context_keys(&self, context: &Path, bytes: &[u8]) -> Result<()> {
        self.replace_context_file(&self.context_keys_path(context), bytes)
    }

    /// Replaces the stat cache of `context` atomically (temp file, rename): a reader sees the
    /// old bytes or the new ones, never a mix, and the last of two concurrent builds wins.
    ///
    /// Not fsynced: it is a cache whose reader checks it as a whole (the builder's format
    /// carries its entry count), and losing it costs only reading the files again.
    pub fn put_context_stats(&self, context: &Path, bytes: &[u8]) -> Result<()> {
        self.replace_context_file(&self.context_stats_path(context), bytes)
    }

    fn replace_context_file(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let dir = self.root.join("strata/context-stats");
        fs::create_dir_all(&dir).ctx("create directory", &dir)?;
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::Builder::new()
            .prefix(&temp_prefix("context-stats"))
            .tempfile_in(&tmp_dir)
            .ctx("create temp file in", &tmp_dir)?;
        tmp.write_all(bytes).ctx("write", tmp.path())?;
        tmp.persist(path)
            .map_err(|e| e.error)
            .ctx("rename into place", path)?;
        Ok(())
    }
}

fn read_if_any(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx("read", path),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn context_stats_are_kept_per_context_and_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let (a, b) = (Path::new("/src/a"), Path::new("/src/b"));
        assert_eq!(store.context_stats(a).unwrap(), None);
        store.put_context_stats(a, b"one").unwrap();
        store.put_context_stats(b, b"two").unwrap();
        store.put_context_stats(a, b"three").unwrap();
        assert_eq!(
            store.context_stats(a).unwrap().as_deref(),
            Some(&b"three"[..])
        );
        assert_eq!(
            store.context_stats(b).unwrap().as_deref(),
            Some(&b"two"[..])
        );
        // The known keys are a file of their own.
        assert_eq!(store.context_keys(a).unwrap(), None);
        store.put_context_keys(a, b"keys").unwrap();
        assert_eq!(
            store.context_keys(a).unwrap().as_deref(),
            Some(&b"keys"[..])
        );
        assert_eq!(
            store.context_stats(a).unwrap().as_deref(),
            Some(&b"three"[..])
        );
        // Nothing is left in tmp.
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0);
    }
}
