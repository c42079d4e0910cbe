//! Paths inside a container root filesystem, resolved on the host without leaving it:
//! symlinks are followed relative to the root (like runc's securejoin), never to the host.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Symlinks followed before giving up, as the kernel's `MAXSYMLINKS`.
const MAX_SYMLINKS: u32 = 40;

/// Where a container path leads inside `root`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The longest existing prefix, symlinks resolved, relative to root.
    pub existing: PathBuf,
    /// The components below `existing` that do not exist (empty when the whole path exists).
    pub missing: Vec<OsString>,
}

/// `path` with `.` dropped and `..` applied lexically, as a list of names (Go's `filepath.Clean`
/// on an absolute path, which is what Docker does to `WORKDIR` and mount targets).
fn clean(path: &Path) -> VecDeque<OsString> {
    let mut out: VecDeque<OsString> = VecDeque::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push_back(n.to_os_string()),
            Component::ParentDir => {
                out.pop_back();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The parent (absolute) and last name of `container_path`, a path in the string form of
/// [`strata_oci::names`] (a live update's paths may name files that are not UTF-8); `None` for
/// the root itself.
fn parent_and_name(container_path: &str) -> Option<(PathBuf, OsString)> {
    let mut names = clean(Path::new(&strata_oci::names::decode(container_path)));
    let name = names.pop_back()?;
    let mut parent = PathBuf::from("/");
    parent.extend(names);
    Some((parent, name))
}

/// Resolves container path `path` inside `root`. With `create`, missing directories are made
/// (mode 0755, owned by the caller: root, like Docker's `WORKDIR`) and `missing` comes back
/// empty.
pub(crate) fn resolve(root: &Path, path: impl AsRef<Path>, create: bool) -> io::Result<Resolved> {
    let path = path.as_ref();
    let mut todo = clean(path);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        if name == "." {
            continue;
        }
        let host = root.join(&resolved).join(&name);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many levels of symbolic links resolving `{}`",
                        path.display()
                    )));
                }
                let target = std::fs::read_link(&host)?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push_front(n.to_os_string()),
                        Component::ParentDir => todo.push_front("..".into()),
                        _ => {}
                    }
                }
            }
            Ok(m) if m.is_dir() => resolved.push(&name),
            Ok(_) if todo.is_empty() => resolved.push(&name),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!(
                        "`{}` is not a directory",
                        Path::new("/").join(&resolved).join(&name).display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if create {
                    std::fs::DirBuilder::new().mode(0o755).create(&host)?;
                    // The umask must not decide the mode of a directory that ends up in a layer.
                    std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))?;
                    resolved.push(&name);
                } else {
                    let mut missing = vec![name];
                    missing.extend(todo);
                    return Ok(Resolved {
                        existing: resolved,
                        missing,
                    });
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Resolved {
        existing: resolved,
        missing: Vec::new(),
    })
}

/// `root/rel` if no component of `rel` is a symlink (so the host path stays inside root).
pub(crate) fn without_symlinks(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(n) = c else {
            return None;
        };
        p.push(n);
        if std::fs::symlink_metadata(&p).ok()?.file_type().is_symlink() {
            return None;
        }
    }
    Some(p)
}

/// Removes `root/rel` if it is an empty directory or an empty regular file (a mount point
/// runc created), refusing symlinked paths. Returns whether it was removed.
pub(crate) fn remove_if_empty_stub(root: &Path, rel: &Path) -> bool {
    let Some(host) = without_symlinks(root, rel) else {
        return false;
    };
    match std::fs::symlink_metadata(&host) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(&host).is_ok(),
        Ok(m) if m.is_file() && m.len() == 0 => std::fs::remove_file(&host).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn symlinks_stay_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("real/x")).unwrap();
        symlink("/real", root.join("abs")).unwrap();
        symlink("../../real", root.join("real/x/up")).unwrap();
        symlink("/../../../../etc", root.join("escape")).unwrap();
        let r = resolve(root, "/abs/x", false).unwrap();
        assert_eq!(r.existing, Path::new("real/x"));
        assert!(r.missing.is_empty());
        // `..` above the root stays at the root.
        let r = resolve(root, "/real/x/up/x/new/deeper", false).unwrap();
        assert_eq!(r.existing, Path::new("real/x"));
        assert_eq!(
            r.missing,
            vec![OsString::from("new"), OsString::from("deeper")]
        );
        let r = resolve(root, "/escape/passwd", false).unwrap();
        assert_eq!(r.existing, Path::new(""));
        assert_eq!(
            r.missing,
            vec![OsString::from("etc"), OsString::from("passwd")]
        );
    }

    #[test]
    fn create_makes_directories_through_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir(root.join("run")).unwrap();
        std::fs::create_dir(root.join("var")).unwrap();
        symlink("../run", root.join("var/run")).unwrap();
        resolve(root, "/var/run/app/./data/../data", true).unwrap();
        let m = std::fs::metadata(root.join("run/app/data")).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        std::fs::write(root.join("file"), b"x").unwrap();
        assert!(resolve(root, "/file/sub", true).is_err());
    }

    #[test]
    fn stubs_are_removed_only_when_empty_and_not_behind_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/empty"), b"").unwrap();
        std::fs::write(root.join("a/full"), b"x").unwrap();
        symlink("a", root.join("l")).unwrap();
        assert!(!remove_if_empty_stub(root, Path::new("l/b/empty")));
        assert!(remove_if_empty_stub(root, Path::new("a/b/empty")));
        assert!(remove_if_empty_stub(root, Path::new("a/b")));
        assert!(!remove_if_empty_stub(root, Path::new("a/full")));
        assert!(!remove_if_empty_stub(root, Path::new("a")));
    }

    #[test]
    fn host_paths_resolve_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("usr/lib/app")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("usr/lib/app/f"), b"x").unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("/etc/passwd", root.join("usr/lib/app/out")).unwrap();
        symlink("app", root.join("usr/lib/dir-link")).unwrap();
        let at = |p: &str, follow: bool| host_path_in_root(root, p, follow);
        assert_eq!(at("/lib/app/f", false).unwrap(), root.join("usr/lib/app/f"));
        assert_eq!(at("/", false).unwrap(), root);
        // The last component is the link itself unless followed, and followed in the root.
        assert_eq!(
            at("/lib/app/out", false).unwrap(),
            root.join("usr/lib/app/out")
        );
        assert_eq!(at("/lib/app/out", true).unwrap(), root.join("etc/passwd"));
        assert_eq!(at("/lib/dir-link", true).unwrap(), root.join("usr/lib/app"));
        assert_eq!(
            at("/lib/app/new", false).unwrap(),
            root.join("usr/lib/app/new")
        );
        assert_eq!(
            at("/nope/x", false).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            at("/lib/app/f/x", false).unwrap_err().kind(),
            io::ErrorKind::NotADirectory
        );
    }

    /// A batch that turned a directory into a file (`n/child` gone, then `n` a file) leaves
    /// the file in the dev layer, whatever order its ops come in.
    #[test]
    fn a_directory_turned_file_stays_a_file_in_the_layer() {
        let t = tempfile::tempdir().unwrap();
        let (merged, layer, src) = (t.path().join("m"), t.path().join("l"), t.path().join("s"));
        std::fs::create_dir_all(merged.join("www")).unwrap();
        std::fs::create_dir_all(&layer).unwrap();
        std::fs::write(&src, b"now a file\n").unwrap();
        let file = SyncOp::File {
            from: src.clone(),
            mode: 0o600,
        };
        // What the machine went through, then the layer, op by op.
        let ops = [
            ("/www/n/child", SyncOp::Dir { mode: 0o755 }),
            ("/www/n", file.clone()),
            ("/www/n/child", SyncOp::Remove),
            ("/www/n/child", file.clone()),
        ];
        for (path, op) in &ops {
            match sync_in_root(&merged, path, op) {
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => {}
                r => r.unwrap(),
            }
        }
        for (path, op) in &ops {
            record_in_layer(&layer, &merged, &[], path, op).unwrap();
        }
        for root in [&merged, &layer] {
            let m = std::fs::symlink_metadata(root.join("www/n")).unwrap();
            assert!(m.is_file(), "{} holds a file", root.display());
            assert_eq!(m.permissions().mode() & 0o7777, 0o600);
            assert_eq!(std::fs::read(root.join("www/n")).unwrap(), b"now a file\n");
        }
    }
}

/// The host path of `container_path` inside the root filesystem `root`, resolved as the
/// container would see it without leaving `root`: its directories through symlinks inside
/// `root`, and the last component too with `follow` (else a symlink there is the path
/// itself). The path need not exist when only its last component is missing; a missing
/// directory above it is `NotFound`, a file there `NotADirectory`.
pub fn host_path_in_root(root: &Path, container_path: &str, follow: bool) -> io::Result<PathBuf> {
    let Some((parent, name)) = parent_and_name(container_path) else {
        return Ok(root.to_path_buf());
    };
    let missing = || {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no such file or directory: `{container_path}`"),
        )
    };
    let r = resolve(root, &parent, false)?;
    if !r.missing.is_empty() {
        return Err(missing());
    }
    let dir = root.join(&r.existing);
    if !std::fs::metadata(&dir)?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("`{}` is not a directory", parent.display()),
        ));
    }
    let here = dir.join(&name);
    if !follow || !std::fs::symlink_metadata(&here).is_ok_and(|m| m.file_type().is_symlink()) {
        return Ok(here);
    }
    let mut whole = parent;
    whole.push(&name);
    let r = resolve(root, &whole, false)?;
    match r.missing.len() {
        0 => Ok(root.join(r.existing)),
        // A link to a name that is not there (yet): the name it gives.
        1 => Ok(root.join(r.existing).join(&r.missing[0])),
        _ => Err(missing()),
    }
}

/// What [`sync_in_root`] does at one container path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncOp {
    /// Make it a copy of this host file, with this mode (written beside, then renamed over).
    File { from: PathBuf, mode: u32 },
    /// Make it a directory with this mode (kept if one is there).
    Dir { mode: u32 },
    /// Make it a symlink to `target`.
    Symlink { target: PathBuf },
    /// Remove it (and what is below it) if it is there.
    Remove,
}

/// Apply `op` at `container_path` inside the root filesystem `root`, from the host, as a live
/// update does: the path's directories resolve inside `root` (a symlink there is followed as
/// the container would, never out of `root`), missing parents are made (0755, root), and the
/// last component itself is never followed. Owned by root, as a `COPY` without `--chown`.
pub fn sync_in_root(root: &Path, container_path: &str, op: &SyncOp) -> io::Result<()> {
    let (parent, name) = parent_and_name(container_path)
        .ok_or_else(|| io::Error::other("cannot replace the root directory"))?;
    let dir = match op {
        SyncOp::Remove => {
            let r = match resolve(root, &parent, false) {
                Ok(r) => r,
                // A parent is a file now: nothing is below it to remove.
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
                Err(e) => return Err(e),
            };
            if !r.missing.is_empty() {
                return Ok(());
            }
            root.join(r.existing)
        }
        _ => root.join(resolve(root, &parent, true)?.existing),
    };
    let target = dir.join(&name);
    let existing = std::fs::symlink_metadata(&target).ok();
    let remove_existing = |keep_dir: bool| -> io::Result<()> {
        match &existing {
            Some(m) if m.is_dir() && !m.file_type().is_symlink() => {
                if keep_dir {
                    Ok(())
                } else {
                    std::fs::remove_dir_all(&target)
                }
            }
            Some(_) => std::fs::remove_file(&target),
            None => Ok(()),
        }
    };
    match op {
        SyncOp::Remove => remove_existing(false),
        SyncOp::Dir { mode } => {
            remove_existing(true)?;
            if !std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                std::fs::create_dir(&target)?;
            }
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(*mode & 0o7777))
        }
        SyncOp::Symlink { target: to } => {
            remove_existing(false)?;
            std::os::unix::fs::symlink(to, &target)
        }
        SyncOp::File { from, mode } => {
            let mut tmp_name = name.clone();
            tmp_name.push(format!(".strata-sync-{}", std::process::id()));
            let tmp = dir.join(tmp_name);
            // The source first: when it is gone, nothing is made here.
            let mut src = std::fs::File::open(from)?;
            let _ = std::fs::remove_file(&tmp);
            // O_EXCL: never through something the machine put at that name meanwhile.
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            let written = io::copy(&mut src, &mut out)
                .and_then(|_| {
                    drop(out);
                    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode & 0o7777))
                })
                .and_then(|()| {
                    if existing
                        .as_ref()
                        .is_some_and(|m| m.is_dir() && !m.file_type().is_symlink())
                    {
                        std::fs::remove_dir_all(&target)?;
                    }
                    std::fs::rename(&tmp, &target)
                });
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written
        }
    }
}

/// An overlay whiteout (a 0/0 character device): hides the name in the layers below.
fn is_whiteout(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    m.file_type().is_char_device() && m.rdev() == 0
}

/// Makes `path` a whiteout.
fn make_whiteout(path: &Path) -> io::Result<()> {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .map_err(io::Error::from)
}

/// Makes `path` (missing, or a whiteout) a directory that hides what the layers below have
/// there (an overlay opaque directory), with `mode`.
fn make_opaque_dir(path: &Path, mode: u32) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(path)?;
    rustix::fs::lsetxattr(
        path,
        "trusted.overlay.opaque",
        b"y",
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
}

/// Records a live update in a *dev layer*: an overlay layer directory that a machine's root is
/// built with when it starts next, above the image's layers, so synced files outlive restarts
/// of the process and of the machine.
///
/// `merged` is the running machine's root, where `op` was already applied: the path's
/// directories resolve there (symlinks followed as the container follows them), so the layer
/// holds the real path, and directories the layer gets for it take their mode and owner from
/// there (a layer's directory decides the merged directory's attributes). `below` are the
/// image's layers: a removed path that one of them has becomes a whiteout, and a directory
/// made where the layer had a whiteout hides what they have under it (opaque).
pub fn record_in_layer(
    layer: &Path,
    merged: &Path,
    below: &[PathBuf],
    container_path: &str,
    op: &SyncOp,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (parent, name) = parent_and_name(container_path)
        .ok_or_else(|| io::Error::other("cannot replace the root directory"))?;
    let r = match resolve(merged, &parent, false) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
        Err(e) => return Err(e),
    };
    if !r.missing.is_empty() {
        // The parent is gone in the machine: its removal was recorded with it.
        return Ok(());
    }
    if !std::fs::symlink_metadata(merged.join(&r.existing)).is_ok_and(|m| m.is_dir()) {
        // The parent is a file in the machine (a batch that removed a directory and made a
        // file of its name): the op did nothing there, so the layer keeps that file too.
        return Ok(());
    }
    // The parent's directories in the layer, as the machine has them.
    let mut rel = PathBuf::new();
    for c in r.existing.components() {
        rel.push(c);
        let here = layer.join(&rel);
        let seen = merged.join(&rel);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.is_dir() => continue,
            Ok(m) if is_whiteout(&m) => make_opaque_dir(&here, 0o755)?,
            Ok(_) => {
                std::fs::remove_file(&here)?;
                std::fs::DirBuilder::new().mode(0o700).create(&here)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o700).create(&here)?;
            }
            Err(e) => return Err(e),
        }
        let m = std::fs::metadata(&seen)?;
        rustix::fs::chown(
            &here,
            Some(rustix::process::Uid::from_raw(m.uid())),
            Some(rustix::process::Gid::from_raw(m.gid())),
        )
        .map_err(io::Error::from)?;
        std::fs::set_permissions(&here, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    let rel_target = r.existing.join(&name);
    let target = layer.join(&rel_target);
    let in_layer = format!("/{}", rel_target.display());
    let existing = std::fs::symlink_metadata(&target).ok();
    match op {
        SyncOp::Remove => {
            if existing.as_ref().is_some_and(is_whiteout) {
                return Ok(());
            }
            sync_in_root(layer, &in_layer, &SyncOp::Remove)?;
            if below
                .iter()
                .any(|l| std::fs::symlink_metadata(l.join(&rel_target)).is_ok())
            {
                make_whiteout(&target)?;
            }
            Ok(())
        }
        SyncOp::Dir { mode } if existing.as_ref().is_some_and(is_whiteout) => {
            make_opaque_dir(&target, *mode)?;
            same_owner(&merged.join(&rel_target), &target)
        }
        _ => {
            if existing.as_ref().is_some_and(is_whiteout) {
                std::fs::remove_file(&target)?;
            }
            sync_in_root(layer, &in_layer, op)?;
            same_owner(&merged.join(&rel_target), &target)
        }
    }
}

/// Gives `to` the owner `from` has (neither followed if a symlink); nothing if `from` is gone.
fn same_owner(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(from) else {
        return Ok(());
    };
    rustix::fs::chownat(
        rustix::fs::CWD,
        to,
        Some(rustix::process::Uid::from_raw(m.uid())),
        Some(rustix::process::Gid::from_raw(m.gid())),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

/// Gives `container_path` inside `root` (its directories resolved there, the last component not
/// followed) the owner `uid:gid`, as a `COPY --chown` would have.
pub fn chown_in_root(root: &Path, container_path: &str, uid: u32, gid: u32) -> io::Result<()> {
    let (parent, name) = parent_and_name(container_path)
        .ok_or_else(|| io::Error::other("cannot change the root directory's owner"))?;
    let r = resolve(root, &parent, false)?;
    if !r.missing.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("`{container_path}` is not in the root filesystem"),
        ));
    }
    rustix::fs::chownat(
        rustix::fs::CWD,
        root.join(r.existing).join(name),
        Some(rustix::process::Uid::from_raw(uid)),
        Some(rustix::process::Gid::from_raw(gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(io::Error::from)
}
