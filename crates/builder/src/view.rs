//! Read-only questions about a parent image's filesystem, answered from its unpacked
//! snapshot directories (overlay form: whiteouts are 0/0 character devices, opaque
//! directories carry `trusted.overlay.opaque=y`) without mounting anything.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs::Metadata;
use std::path::{Path, PathBuf};

/// Symlinks followed in one path before giving up (Linux's `MAXSYMLINKS`).
pub(crate) const MAX_SYMLINKS: usize = 40;

/// The non-empty, non-`.` components of a `/`-separated path.
fn components(path: &str) -> impl DoubleEndedIterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty() && *s != ".")
}

/// `rel` as `a/b/c`: no leading, trailing or doubled `/`, no `.` components.
pub(crate) fn clean(rel: &str) -> String {
    components(rel).collect::<Vec<_>>().join("/")
}

/// A stack of snapshot directories, top layer first.
#[derive(Debug, Clone, Default)]
pub(crate) struct ImageView {
    pub top_first: Vec<PathBuf>,
    /// What was asked of the image, when the view records it (see [`ImageView::recording`]).
    reads: Option<RefCell<Reads>>,
}

/// What a step asked of the image below it: every path looked up (symlink resolution
/// included) and every file read whole. A layer step's output depends on the image only
/// through these, so another image that answers them the same gives the same layer (the
/// ground of automatic rebase, `crate::cache::MadeWith`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Reads {
    pub paths: BTreeSet<String>,
    pub files: BTreeSet<String>,
}

impl ImageView {
    /// A view of `top_first` that answers without recording.
    pub fn new(top_first: Vec<PathBuf>) -> Self {
        ImageView {
            top_first,
            reads: None,
        }
    }

    /// A view of `top_first` that records what it is asked ([`ImageView::reads`]).
    pub fn recording(top_first: Vec<PathBuf>) -> Self {
        ImageView {
            top_first,
            reads: Some(RefCell::default()),
        }
    }

    /// What was asked so far (empty for a view that does not record).
    pub fn reads(&self) -> Reads {
        self.reads
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default()
    }

    /// `user` (`name`, `uid`, `name:group`…) resolved in the image's /etc/passwd and
    /// /etc/group, recording that both files were read.
    pub fn resolve_user(&self, user: &str) -> strata_runtime::Result<strata_runtime::UserSpec> {
        if let Some(r) = &self.reads {
            let mut r = r.borrow_mut();
            r.files.insert("etc/passwd".into());
            r.files.insert("etc/group".into());
        }
        strata_runtime::resolve_user(&self.top_first, user)
    }

    /// The metadata of `rel` (a `/`-separated path relative to the root, no symlinks
    /// followed) as the merged image shows it, `None` when absent.
    pub fn lookup(&self, rel: &str) -> Option<Metadata> {
        self.locate(rel).map(|(_, md)| md)
    }

    /// Like [`lookup`](Self::lookup), with the path of the entry in its snapshot directory.
    /// Never follows a symlink, on the way or at the end (`strata_rootfs::lookup_in_layers`).
    pub(crate) fn locate(&self, rel: &str) -> Option<(PathBuf, Metadata)> {
        if let Some(r) = &self.reads {
            r.borrow_mut().paths.insert(clean(rel));
        }
        // A name that is not UTF-8 is in its string form here (see `names`).
        strata_rootfs::lookup_in_layers(&self.top_first, Path::new(&strata_oci::names::decode(rel)))
    }

    /// `path` with every symlink on it, the last component included, resolved in the image
    /// as if its root were `/`: absolute targets start again at the image's root and `..`
    /// never climbs above it, so the result always names a path inside the image. This is
    /// where Docker (BuildKit's `fs.RootPath`) writes a COPY/ADD destination or creates a
    /// WORKDIR: `/lib/x` on a merged-/usr image (`/lib -> usr/lib`) is `/usr/lib/x`.
    /// Components that do not exist are kept as they are. Errors after
    /// [`MAX_SYMLINKS`] links, as the kernel does (`ELOOP`).
    ///
    /// `path` is as the Dockerfile wrote it; the result is in the string form of
    /// [`strata_oci::names`] (an image symlink's target may not be UTF-8).
    pub fn resolve(&self, path: &str) -> Result<String, String> {
        let path = &*strata_oci::names::encode_os(std::ffi::OsStr::new(path));
        // Components still to walk, the next one last.
        let mut todo: Vec<String> = components(path).rev().map(str::to_string).collect();
        let mut done: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(part) = todo.pop() {
            if part == ".." {
                done.pop();
                continue;
            }
            done.push(part);
            let here = done.join("/");
            let Some((host, md)) = self.locate(&here) else {
                continue;
            };
            if !md.file_type().is_symlink() {
                continue;
            }
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(format!(
                    "too many levels of symbolic links resolving `{path}` in the image"
                ));
            }
            let target = std::fs::read_link(&host).map_err(|e| e.to_string())?;
            let target = strata_oci::names::encode(target.into_os_string());
            done.pop();
            if target.starts_with('/') {
                done.clear();
            }
            todo.extend(
                components(&target)
                    .rev()
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            );
        }
        Ok(format!("/{}", done.join("/")))
    }

    /// Whether `rel` is a directory in the image.
    pub fn is_dir(&self, rel: &str) -> bool {
        self.lookup(rel).is_some_and(|m| m.is_dir())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::symlink;

    /// A merged-/usr image: a base layer with `/lib -> usr/lib` and `/bin -> /usr/bin`
    /// (one relative, one absolute), and an upper layer adding `/opt/up -> ../../../usr`.
    fn merged_usr() -> (tempfile::TempDir, ImageView) {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base");
        let top = t.path().join("top");
        std::fs::create_dir_all(base.join("usr/lib")).unwrap();
        std::fs::create_dir_all(base.join("usr/bin")).unwrap();
        symlink("usr/lib", base.join("lib")).unwrap();
        symlink("/usr/bin", base.join("bin")).unwrap();
        symlink("loop2", base.join("loop1")).unwrap();
        symlink("loop1", base.join("loop2")).unwrap();
        std::fs::create_dir_all(top.join("opt")).unwrap();
        symlink("../../../usr", top.join("opt/up")).unwrap();
        let view = ImageView::new(vec![top, base]);
        (t, view)
    }

    #[test]
    fn resolve_follows_the_image_symlinks_and_never_leaves_its_root() {
        let (_t, v) = merged_usr();
        assert_eq!(v.resolve("/lib/x/a.txt").unwrap(), "/usr/lib/x/a.txt");
        assert_eq!(v.resolve("/lib").unwrap(), "/usr/lib");
        assert_eq!(v.resolve("/bin/").unwrap(), "/usr/bin");
        assert_eq!(v.resolve("/opt/up/lib").unwrap(), "/usr/lib");
        assert_eq!(v.resolve("/srv/../lib/app").unwrap(), "/usr/lib/app");
        assert_eq!(v.resolve("/new/dir").unwrap(), "/new/dir");
        assert_eq!(v.resolve("/").unwrap(), "/");
        let err = v.resolve("/loop1/x").unwrap_err();
        assert!(err.contains("too many levels"), "{err}");
    }

    #[test]
    fn resolve_sees_what_upper_layers_hide() {
        let (t, mut v) = merged_usr();
        // A later layer replaces the `/lib` link by a real directory.
        let upper = t.path().join("upper");
        std::fs::create_dir_all(upper.join("lib")).unwrap();
        v.top_first.insert(0, upper);
        assert_eq!(v.resolve("/lib/x").unwrap(), "/lib/x");
    }
}
