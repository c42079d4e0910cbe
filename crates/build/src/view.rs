//! Read-only questions about a parent image's filesystem, answered from its unpacked
//! snapshot directories (overlay form: whiteouts are 0/0 character devices, opaque
//! directories carry `trusted.overlay.opaque=y`) without mounting anything.

use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A stack of snapshot directories, top layer first.
#[derive(Debug, Clone, Default)]
pub(crate) struct ImageView {
    pub top_first: Vec<PathBuf>,
}

fn is_whiteout(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(p: &Path) -> bool {
    let mut buf = [0u8; 8];
    matches!(rustix::fs::lgetxattr(p, "trusted.overlay.opaque", &mut buf), Ok(n) if n >= 1 && buf[0] == b'y')
}

impl ImageView {
    /// The metadata of `rel` (a `/`-separated path relative to the root, no symlinks
    /// followed) as the merged image shows it, `None` when absent.
    pub fn lookup(&self, rel: &str) -> Option<Metadata> {
        let parts: Vec<&str> = rel
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        if parts.is_empty() {
            return self
                .top_first
                .first()
                .and_then(|d| std::fs::symlink_metadata(d).ok());
        }
        'layers: for dir in &self.top_first {
            // A whiteout or an opaque directory on the way hides everything below.
            let mut p = dir.clone();
            for (i, part) in parts.iter().enumerate() {
                p.push(part);
                match std::fs::symlink_metadata(&p) {
                    Ok(md) if is_whiteout(&md) => return None,
                    Ok(md) if i + 1 == parts.len() => return Some(md),
                    Ok(md) if md.is_dir() => {
                        if is_opaque(&p) {
                            // Deeper layers do not count below this directory.
                            let mut q = p.clone();
                            for rest in &parts[i + 1..] {
                                q.push(rest);
                            }
                            return std::fs::symlink_metadata(&q)
                                .ok()
                                .filter(|m| !is_whiteout(m));
                        }
                    }
                    Ok(_) => return None,
                    Err(_) => continue 'layers,
                }
            }
        }
        None
    }

    /// Whether `rel` is a directory in the image.
    pub fn is_dir(&self, rel: &str) -> bool {
        self.lookup(rel).is_some_and(|m| m.is_dir())
    }
}
