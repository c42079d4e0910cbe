//! Metadata of a path in an image kept as a stack of snapshot directories (overlay form:
//! whiteouts are 0/0 character devices, opaque directories carry
//! `trusted.overlay.opaque=y`), read without mounting anything and without ever following a
//! symlink: a symlink on the way (`x -> /`) is where the image's path ends, never a way onto
//! the host. Every metadata read of an image path goes through here.

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

fn is_whiteout(md: &Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn is_opaque(p: &Path) -> bool {
    let mut buf = [0u8; 8];
    matches!(rustix::fs::lgetxattr(p, "trusted.overlay.opaque", &mut buf), Ok(n) if n >= 1 && buf[0] == b'y')
}

/// Where `rel` (relative to the image root; `.` and empty components ignored, `..` not
/// allowed) is in the merged image of `top_first` (snapshot directories, top layer first),
/// with its metadata; `None` when the image has nothing there. Symlinks are not followed,
/// neither the last component nor any on the way: a path below an image symlink is not in
/// the image (resolve the link inside the image first, see `ImageView::resolve` in the
/// build engine or [`crate::apply_layer_with`]).
pub fn lookup_in_layers(top_first: &[PathBuf], rel: &Path) -> Option<(PathBuf, Metadata)> {
    let parts: Vec<&std::ffi::OsStr> = rel
        .as_os_str()
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|s| !s.is_empty() && *s != b".")
        .map(std::ffi::OsStr::from_bytes)
        .collect();
    if parts.iter().any(|p| p.as_bytes() == b"..") {
        return None;
    }
    if parts.is_empty() {
        let top = top_first.first()?;
        return std::fs::symlink_metadata(top)
            .ok()
            .map(|md| (top.clone(), md));
    }
    // Layers below an opaque directory do not count under it: `hidden_below` is the number
    // of components from which lower layers are hidden.
    let mut hidden_below: Option<usize> = None;
    for dir in top_first {
        let mut p = dir.clone();
        let mut opaque_here: Option<usize> = None;
        for (i, part) in parts.iter().enumerate() {
            if hidden_below.is_some_and(|h| i >= h) {
                // Below an opaque directory of a higher layer: nothing deeper counts.
                return None;
            }
            p.push(part);
            match std::fs::symlink_metadata(&p) {
                Ok(md) if is_whiteout(&md) => return None,
                Ok(md) if i + 1 == parts.len() => return Some((p, md)),
                Ok(md) if md.is_dir() => {
                    if opaque_here.is_none() && is_opaque(&p) {
                        opaque_here = Some(i + 1);
                    }
                }
                // A file or a symlink on the way: the path ends here in the image.
                Ok(_) => return None,
                Err(_) => break,
            }
        }
        if let Some(o) = opaque_here {
            hidden_below = Some(hidden_below.map_or(o, |h| h.min(o)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_on_the_way_end_the_path_even_below_an_opaque_directory() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        std::fs::create_dir_all(host.join("secret")).unwrap();
        let low = t.path().join("low");
        let top = t.path().join("top");
        std::fs::create_dir_all(low.join("a/d")).unwrap();
        std::fs::create_dir_all(top.join("a")).unwrap();
        symlink(&host, low.join("x")).unwrap();
        symlink(&host, top.join("a/x")).unwrap();
        let layers = vec![top.clone(), low.clone()];
        assert!(lookup_in_layers(&layers, Path::new("x/secret")).is_none());
        assert!(lookup_in_layers(&layers, Path::new("a/x/secret")).is_none());
        assert!(
            lookup_in_layers(&layers, Path::new("x"))
                .unwrap()
                .1
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            lookup_in_layers(&layers, Path::new("a/d")).unwrap().0,
            low.join("a/d")
        );
        assert!(lookup_in_layers(&layers, Path::new("a/../x")).is_none());
    }
}
