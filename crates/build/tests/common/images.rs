//! Base images beyond plain busybox.

use std::process::Command;

use strata_store::Store;

/// A merged-/usr busybox root filesystem, laid out as Debian 12 and Ubuntu lay out theirs:
/// the programs in `/usr/bin`, and `/bin`, `/lib`, `/sbin` symlinks into `/usr`.
pub fn merged_usr_tar() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in ["usr/bin", "usr/lib", "usr/sbin", "etc", "tmp"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::set_permissions(
        r.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    for (link, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/sbin")] {
        std::os::unix::fs::symlink(target, r.join(link)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("usr/bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", r.join("usr/bin").join(applet)).unwrap();
        }
    }
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", r).unwrap();
    b.into_inner().unwrap()
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
