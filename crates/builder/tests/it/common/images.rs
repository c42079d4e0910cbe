//! Base images beyond plain busybox.

use strata_store::Store;

/// A merged-/usr busybox root filesystem, laid out as Debian 12 and Ubuntu lay out theirs:
/// the programs in `/usr/bin`, and `/bin`, `/lib`, `/sbin` symlinks into `/usr`.
pub fn merged_usr_tar() -> Vec<u8> {
    super::busybox_rootfs_tar(
        "usr/bin",
        &[("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/sbin")],
    )
}

/// Imports [`merged_usr_tar`] into `store` as `merged:latest`.
pub fn import_merged_usr(store: &Store) {
    strata_transfer::import_tarball(
        store,
        merged_usr_tar().as_slice(),
        "merged",
        &strata_transfer::ImportOptions::default(),
    )
    .unwrap();
}
