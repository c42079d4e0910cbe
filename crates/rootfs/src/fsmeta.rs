//! Reading the metadata of files on the host the way a layer records it.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Whether an extended attribute is overlayfs's own (`trusted.overlay.*`, or `user.overlay.*`
/// with `userxattr`).
pub(crate) fn is_overlay_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Extended attributes that never belong in a layer: overlayfs bookkeeping (it would change how
/// a later overlay mount sees the layer) and SELinux labels of the build host.
pub(crate) fn xattr_is_layer_content(name: &[u8]) -> bool {
    !(is_overlay_xattr(name) || name == b"security.selinux")
}

/// The layer-worthy xattrs of `path` (not following a final symlink), sorted by name.
/// Attributes that cannot be read are skipped: a layer is still useful without them.
pub(crate) fn read_xattrs(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = names
        .filter(|n| xattr_is_layer_content(n.as_bytes()))
        .filter_map(|n| match xattr::get(path, &n) {
            Ok(Some(v)) => Some((n.as_bytes().to_vec(), v)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}
