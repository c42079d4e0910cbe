//! Refs: names for images, kept in `index.json` as `org.opencontainers.image.ref.name`
//! annotations so that OCI tools see them.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use strata_oci::{ANNOTATION_REF_NAME, Descriptor, Index};

use crate::Store;
use crate::error::{Error, IoContext, Result};
use crate::lock::{FileLock, LockMode};

impl Store {
    /// Point `name` at `desc` (replacing what it pointed at). The blob must be in the store with
    /// the descriptor's size. Safe against concurrent writers in any process.
    pub fn set_ref(&self, name: &str, desc: Descriptor) -> Result<()> {
        self.set_refs(vec![(name.to_string(), desc)])
    }

    /// [`Store::set_ref`] for many names at once: one rewrite of `index.json` (a batch that
    /// names hundreds of images costs one write, not hundreds). All or none are set; when every
    /// name already points at its descriptor, nothing is written.
    pub fn set_refs(&self, refs: Vec<(String, Descriptor)>) -> Result<()> {
        let mut entries = Vec::with_capacity(refs.len());
        for (name, desc) in refs {
            validate_ref_name(&name)?;
            let on_disk = self.blob_size(&desc.digest)?;
            if on_disk != desc.size {
                return Err(Error::SizeMismatch {
                    digest: desc.digest,
                    expected: desc.size,
                    actual: on_disk,
                });
            }
            let mut entry = desc;
            entry
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(ANNOTATION_REF_NAME.to_string(), name.clone());
            entries.push((name, entry));
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.update_index(|index| {
            let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
            // Another tool may have left duplicates of a name; the first one wins, the rest go,
            // so the name is unambiguous for every reader.
            let i_before = index.manifests.len();
            let mut i = 0;
            index.manifests.retain(|d| {
                let keep = match d.ref_name() {
                    Some(n) if at.contains_key(n) => false,
                    Some(n) => {
                        at.insert(n.to_string(), i);
                        true
                    }
                    None => true,
                };
                if keep {
                    i += 1;
                }
                keep
            });
            let mut changed = index.manifests.len() != i_before;
            for (name, entry) in entries {
                match at.get(&name) {
                    Some(&slot) if index.manifests[slot] == entry => {}
                    Some(&slot) => {
                        index.manifests[slot] = entry;
                        changed = true;
                    }
                    None => {
                        at.insert(name, index.manifests.len());
                        index.manifests.push(entry);
                        changed = true;
                    }
                }
            }
            Ok(changed)
        })
    }

    /// What `name` points at, without the ref-name annotation, or `None`.
    pub fn get_ref(&self, name: &str) -> Result<Option<Descriptor>> {
        Ok(self
            .read_index()?
            .manifests
            .into_iter()
            .find(|d| d.ref_name() == Some(name))
            .map(strip_ref_name))
    }

    /// Remove `name`; returns what it pointed at, or `None` if there was no such ref.
    /// The blobs stay until [`Store::gc`].
    pub fn remove_ref(&self, name: &str) -> Result<Option<Descriptor>> {
        let mut removed = None;
        self.update_index(|index| {
            let before = index.manifests.len();
            index.manifests.retain(|d| {
                if d.ref_name() == Some(name) {
                    if removed.is_none() {
                        removed = Some(strip_ref_name(d.clone()));
                    }
                    false
                } else {
                    true
                }
            });
            Ok(index.manifests.len() != before)
        })?;
        Ok(removed)
    }

    /// Every named ref, sorted by name, with descriptors stripped of the ref-name annotation.
    pub fn list_refs(&self) -> Result<Vec<(String, Descriptor)>> {
        let mut refs: Vec<(String, Descriptor)> = Vec::new();
        for d in self.read_index()?.manifests {
            if let Some(name) = d.ref_name().map(str::to_string)
                && !refs.iter().any(|(n, _)| *n == name)
            {
                refs.push((name, strip_ref_name(d)));
            }
        }
        refs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(refs)
    }

    /// `index.json` as it is on disk (including entries without a name that other tools added).
    pub fn read_index(&self) -> Result<Index> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => parse_index(&bytes, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Index::new()),
            Err(e) => Err(e).ctx("read", path),
        }
    }

    /// Read-modify-write `index.json` under the exclusive index lock; `edit` returns whether it
    /// changed anything (nothing is written otherwise). The new file replaces the old atomically,
    /// so readers without the lock (skopeo, umoci) see the old or the new index, never a mix.
    fn update_index(&self, edit: impl FnOnce(&mut Index) -> Result<bool>) -> Result<()> {
        let _guard = FileLock::acquire(&self.index_lock_path(), LockMode::Exclusive)?;
        let mut index = self.read_index()?;
        if !edit(&mut index)? {
            return Ok(());
        }
        let path = self.index_path();
        let bytes = serialize_index(&index)?;
        self.write_file_atomic(&path, &bytes)
    }
}

fn strip_ref_name(mut d: Descriptor) -> Descriptor {
    if let Some(a) = &mut d.annotations {
        a.remove(ANNOTATION_REF_NAME);
        if a.is_empty() {
            d.annotations = None;
        }
    }
    d
}

fn parse_index(bytes: &[u8], path: &Path) -> Result<Index> {
    serde_json::from_slice(bytes).map_err(|source| Error::BadIndexJson {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn serialize_index(index: &Index) -> Result<Vec<u8>> {
    serde_json::to_vec(index).map_err(|source| Error::Serialize {
        what: "index.json",
        source,
    })
}

/// Check `name` against the OCI image layout's grammar for `org.opencontainers.image.ref.name`
/// (image-spec `annotations.md`): `component ("/" component)*`, a component being alphanumerics
/// joined by one of `-._:@+` or by `--`.
pub fn validate_ref_name(name: &str) -> Result<()> {
    let bad = |reason: &str| Error::InvalidRefName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > 1024 {
        return Err(bad("it is longer than 1024 bytes"));
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err(bad("it has an empty path component"));
        }
        let mut separators = String::new();
        for (i, c) in component.char_indices() {
            if c.is_ascii_alphanumeric() {
                if separators.len() > 1 && separators != "--" {
                    return Err(bad(&format!("`{separators}` is not a separator")));
                }
                separators.clear();
            } else if "-._:@+".contains(c) {
                if i == 0 {
                    return Err(bad("a component must start with a letter or digit"));
                }
                separators.push(c);
            } else {
                return Err(bad(&format!(
                    "`{}` is not allowed (letters, digits, `/` and `-._:@+`)",
                    c.escape_default()
                )));
            }
        }
        if !separators.is_empty() {
            return Err(bad("a component must end with a letter or digit"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::validate_ref_name;
    use crate::Store;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn setting_refs_to_what_they_name_already_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let (a, _) = store.put_blob_bytes(b"{}", None).unwrap();
        let (b, _) = store.put_blob_bytes(b"[]", None).unwrap();
        let desc =
            |digest| strata_oci::Descriptor::new(strata_oci::media_type::OCI_MANIFEST, digest, 2);
        store
            .set_refs(vec![
                ("a:1".into(), desc(a.clone())),
                ("b:1".into(), desc(b.clone())),
            ])
            .unwrap();
        let index = d.path().join("index.json");
        let inode = std::fs::metadata(&index).unwrap().ino();
        // The same names and descriptors again: index.json is not replaced.
        store
            .set_refs(vec![
                ("b:1".into(), desc(b.clone())),
                ("a:1".into(), desc(a.clone())),
            ])
            .unwrap();
        assert_eq!(std::fs::metadata(&index).unwrap().ino(), inode);
        // One name moves: it is replaced, and both names read back.
        store
            .set_refs(vec![("a:1".into(), desc(b.clone()))])
            .unwrap();
        assert_ne!(std::fs::metadata(&index).unwrap().ino(), inode);
        assert_eq!(store.get_ref("a:1").unwrap(), Some(desc(b.clone())));
        assert_eq!(store.get_ref("b:1").unwrap(), Some(desc(b)));
    }

    #[test]
    fn ref_names_follow_the_layout_grammar() {
        for ok in [
            "latest",
            "myapp:latest",
            "docker.io/library/debian:12",
            "127.0.0.1:5000/personal/app:deployment-01J",
            "a--b",
            "app@sha256:abc",
            "v1.2.3+build",
        ] {
            validate_ref_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "", "/a", "a/", "a//b", ":latest", "app:", "a..b", "a---b", "a b", "a\nb", "é",
        ] {
            assert!(validate_ref_name(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
