//! `strata cp`: files between a running machine and this host, with `docker cp`'s rules.
//!
//! A machine's root filesystem is an overlay mounted on the host while it runs, and its named
//! volumes are directories of the store, so both directions are file operations here. Paths
//! in the machine resolve as it sees them, never leaving its root (symlinks followed inside
//! it); what is read out of a machine is walked with `openat` and `O_NOFOLLOW` below the
//! starting directory, so a link the machine swaps in meanwhile is not followed out of it.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use strata_deploy::host::Host;
use strata_deploy::machines;
use strata_deploy::state::{Machine, MachineState};
use strata_runtime::SyncOp;

/// One side of `strata cp`, read as Docker reads it: `ID:PATH` names a machine's path; an
/// argument with no `:` before its first `/`, or that starts with `/` or `.`, is local.
#[derive(Debug, PartialEq, Eq)]
enum Side {
    Local(String),
    Machine { id: String, path: String },
}

fn side(arg: &str) -> Side {
    if arg.starts_with('/') || arg.starts_with('.') {
        return Side::Local(arg.into());
    }
    match arg.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') => Side::Machine {
            id: id.into(),
            path: path.into(),
        },
        _ => Side::Local(arg.into()),
    }
}

/// What `strata cp` was asked, besides its two sides.
pub struct Options {
    /// `-L`: follow a symlink named as the source.
    pub follow_link: bool,
}

pub fn cp(host: &Host, src: &str, dest: &str, opts: &Options) -> Result<()> {
    if src == "-" || dest == "-" {
        bail!("`strata cp` copies files and directories; tar streams (`-`) are not taken");
    }
    match (side(src), side(dest)) {
        (Side::Machine { id, path }, Side::Local(to)) => {
            let place = Place::of(host, &id, &path, false)?;
            copy_out(&place, &path, Path::new(&to), opts)
                .with_context(|| format!("cannot copy {src} to `{to}`"))
        }
        (Side::Local(from), Side::Machine { id, path }) => {
            let place = Place::of(host, &id, &path, true)?;
            copy_in(Path::new(&from), &place, &path, opts)
                .with_context(|| format!("cannot copy `{from}` to {dest}"))
        }
        (Side::Local(_), Side::Local(_)) => bail!(
            "one side of `strata cp` is a machine's path: `strata cp ID:/path DEST` or \
             `strata cp SRC ID:/path`"
        ),
        (Side::Machine { .. }, Side::Machine { .. }) => {
            bail!("`strata cp` copies between a machine and this host, not between machines")
        }
    }
}

/// Where a machine path is on this host: the running machine's root, or the named volume
/// mounted over it there.
struct Place {
    machine: Machine,
    /// The root filesystem (or the volume's directory) the path is in.
    root: PathBuf,
    /// The path inside `root`, absolute.
    path: String,
}

impl Place {
    /// Where machine `id`'s `path` is, to read it or (`writing`) to write there.
    fn of(host: &Host, id: &str, path: &str, writing: bool) -> Result<Place> {
        let machine = machines::find(host, id)?;
        if machine.state != MachineState::Running {
            bail!(
                "machine {} is {}: `strata cp` needs it running (a machine's root starts \
                 fresh at its start)",
                machine.id,
                machine.state
            );
        }
        // Relative paths are the root's, as in Docker.
        let clean: Vec<&str> = path
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let mut place = Place {
            root: host.machine_dir(&machine.id).join("rootfs"),
            path: format!("/{}", clean.join("/")),
            machine,
        };
        // The deepest mount at or above the path holds it: a named volume, or a host
        // directory mounted with `-v` (a file mounted alone is not followed).
        let config = &place.machine.config;
        let mounts = config
            .volumes
            .iter()
            .map(|(name, target)| (target, host.volume_dir(name), false))
            .chain(
                config
                    .binds
                    .iter()
                    .filter(|b| b.source.is_dir())
                    .map(|b| (&b.target, b.source.clone(), b.readonly)),
            );
        let mut best: Option<(usize, PathBuf, bool, &String)> = None;
        for (target, root, readonly) in mounts {
            let t: Vec<&str> = target.split('/').filter(|c| !c.is_empty()).collect();
            if !t.is_empty()
                && clean.starts_with(&t)
                && best.as_ref().is_none_or(|(depth, ..)| t.len() > *depth)
            {
                best = Some((t.len(), root, readonly, target));
            }
        }
        if let Some((depth, root, readonly, target)) = best {
            if writing && readonly {
                bail!(
                    "`{target}` of machine {} is mounted read-only",
                    place.machine.id
                );
            }
            place.path = format!("/{}", clean[depth..].join("/"));
            place.root = root;
        }
        // The files the machine's runtime mounts over its root's.
        if let ["etc", name @ ("hosts" | "hostname" | "resolv.conf")] = clean.as_slice() {
            if writing {
                bail!(
                    "/etc/{name} of machine {} is made by strata at each start: `strata cp` \
                     does not write it",
                    place.machine.id
                );
            }
            place.root = host.machine_dir(&place.machine.id).join("etc");
            place.path = format!("/{name}");
        }
        Ok(place)
    }

    fn host_path(&self, follow: bool) -> io::Result<PathBuf> {
        strata_runtime::host_path_in_root(&self.root, &self.path, follow)
    }
}

/// The name a copy takes inside an existing destination directory: the source's last one.
fn base_name(path: &str) -> Option<&str> {
    path.split('/').rfind(|c| !c.is_empty() && *c != ".")
}

/// Docker's "contents of the directory" form: `SRC/.`.
fn contents_only(path: &str) -> bool {
    path == "." || path.ends_with("/.")
}

fn copy_out(place: &Place, raw: &str, dest: &Path, opts: &Options) -> Result<()> {
    let from = place.host_path(opts.follow_link)?;
    let meta = std::fs::symlink_metadata(&from).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "no such file or directory in machine {}: `{}`",
                place.machine.id,
                place.path
            )
        } else {
            e.into()
        }
    })?;
    let dest_meta = std::fs::metadata(dest).ok();
    let dest_raw = dest.as_os_str().to_string_lossy();
    if !meta.is_dir() {
        let target = match &dest_meta {
            None if dest_raw.ends_with('/') => {
                bail!(
                    "the destination directory `{}` does not exist",
                    dest.display()
                )
            }
            Some(d) if d.is_dir() => dest.join(base_name(&place.path).unwrap_or("file")),
            _ => dest.to_path_buf(),
        };
        let parent = open_dir_of(&from)?;
        let name = from.file_name().unwrap_or(OsStr::new("."));
        return copy_entry_out(parent.as_fd(), name, &target);
    }
    let target = match &dest_meta {
        None => dest.to_path_buf(),
        Some(d) if !d.is_dir() => bail!("cannot copy a directory to the file `{}`", dest.display()),
        Some(_) if contents_only(raw) || place.path == "/" => dest.to_path_buf(),
        Some(_) => dest.join(base_name(&place.path).unwrap_or(".")),
    };
    // Not through a link the machine put there since it was looked at.
    let dir = rustix::fs::open(
        &from,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    make_dir(&target, meta.mode() & 0o1777)?;
    copy_dir_out(dir.as_fd(), &target)
}

/// The directory holding `path`, opened.
fn open_dir_of(path: &Path) -> Result<OwnedFd> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    Ok(rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Makes directory `target` (or keeps the one there) with `mode`, whose set-id bits the
/// callers have dropped: a setuid-root program of a machine does not become one on this host.
fn make_dir(target: &Path, mode: u32) -> Result<()> {
    match std::fs::create_dir(target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && target.is_dir() => {}
        Err(e) => return Err(e).with_context(|| format!("cannot make `{}`", target.display())),
    }
    std::fs::set_permissions(target, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn copy_dir_out(dir: std::os::fd::BorrowedFd<'_>, target: &Path) -> Result<()> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    names.sort();
    for name in names {
        copy_entry_out(dir, &name, &target.join(&name))?;
    }
    Ok(())
}

/// Copies entry `name` of the machine's directory `dir` to `target`, never following a link.
fn copy_entry_out(dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, target: &Path) -> Result<()> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let mode = st.st_mode & 0o1777;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let sub = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            make_dir(target, mode)?;
            copy_dir_out(sub.as_fd(), target)?;
        }
        FileType::RegularFile => {
            let src = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            // Written beside, then renamed over: the destination is whole or as it was.
            let tmp = sibling(target, ".strata-cp");
            let written = (|| -> io::Result<()> {
                let mut out = File::create(&tmp)?;
                io::copy(&mut File::from(src), &mut out)?;
                out.set_permissions(std::fs::Permissions::from_mode(mode))?;
                std::fs::rename(&tmp, target)
            })();
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written.with_context(|| format!("cannot write `{}`", target.display()))?;
        }
        FileType::Symlink => {
            let to = rustix::fs::readlinkat(dir, name, Vec::new())?;
            let to = PathBuf::from(OsStr::from_bytes(to.as_bytes()));
            if std::fs::symlink_metadata(target).is_ok() {
                std::fs::remove_file(target)?;
            }
            std::os::unix::fs::symlink(&to, target)
                .with_context(|| format!("cannot make the link `{}`", target.display()))?;
        }
        _ => {
            eprintln!(
                "warning: `{}` is not a file, directory or link: not copied",
                target.display()
            );
            return Ok(());
        }
    }
    Ok(())
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{suffix}-{}", std::process::id()));
    path.with_file_name(name)
}

fn copy_in(from: &Path, place: &Place, raw: &str, opts: &Options) -> Result<()> {
    let meta = if opts.follow_link {
        std::fs::metadata(from)
    } else {
        std::fs::symlink_metadata(from)
    }
    .with_context(|| format!("cannot read `{}`", from.display()))?;
    let dest_meta = place
        .host_path(true)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok());
    let from_name = from
        .file_name()
        .map(|n| strata_oci::names::encode_os(n).into_owned());
    let into = |name: Option<String>| match name {
        Some(n) if place.path == "/" => format!("/{n}"),
        Some(n) => format!("{}/{n}", place.path),
        None => place.path.clone(),
    };
    let from_raw = from.as_os_str().to_string_lossy();
    if !meta.is_dir() {
        let target = match &dest_meta {
            None if raw.ends_with('/') => bail!(
                "the destination directory `{}` does not exist in machine {}",
                place.path,
                place.machine.id
            ),
            Some(d) if d.is_dir() => into(from_name),
            _ => place.path.clone(),
        };
        return put(from, &meta, place, &target);
    }
    let target = match &dest_meta {
        None => place.path.clone(),
        Some(d) if !d.is_dir() => bail!(
            "cannot copy a directory to the file `{}` in machine {}",
            place.path,
            place.machine.id
        ),
        Some(_) if contents_only(&from_raw) => place.path.clone(),
        Some(_) => into(from_name),
    };
    put_tree(from, &meta, place, &target)
}

fn put_tree(from: &Path, meta: &std::fs::Metadata, place: &Place, target: &str) -> Result<()> {
    // The root of a volume (or of the machine) stays as it is; what is in it is copied.
    if target != "/" {
        put(from, meta, place, target)?;
    }
    if !meta.is_dir() {
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("cannot read `{}`", from.display()))?
        .collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let name = strata_oci::names::encode_os(&e.file_name()).into_owned();
        put_tree(&path, &meta, place, &format!("{target}/{name}"))?;
    }
    Ok(())
}

/// Writes one local entry at `target` in the machine, with its local numeric owner, as
/// Docker's engine does.
fn put(from: &Path, meta: &std::fs::Metadata, place: &Place, target: &str) -> Result<()> {
    let op = if meta.is_dir() {
        SyncOp::Dir { mode: meta.mode() }
    } else if meta.file_type().is_symlink() {
        SyncOp::Symlink {
            target: std::fs::read_link(from)?,
        }
    } else if meta.is_file() {
        SyncOp::File {
            from: from.to_path_buf(),
            mode: meta.mode(),
        }
    } else {
        eprintln!(
            "warning: `{}` is not a file, directory or link: not copied",
            from.display()
        );
        return Ok(());
    };
    strata_runtime::sync_in_root(&place.root, target, &op)
        .with_context(|| format!("cannot write `{target}` in machine {}", place.machine.id))?;
    // Docker's engine keeps the numeric owner of what it is given, `-a` or not (measured
    // against Docker 20.10 by the interop test).
    strata_runtime::chown_in_root(&place.root, target, meta.uid(), meta.gid())
        .with_context(|| format!("cannot chown `{target}` in machine {}", place.machine.id))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_read_as_docker_reads_them() {
        let m = |id: &str, path: &str| Side::Machine {
            id: id.into(),
            path: path.into(),
        };
        assert_eq!(side("web:/etc/hosts"), m("web", "/etc/hosts"));
        assert_eq!(side("a1b2:rel/path"), m("a1b2", "rel/path"));
        assert_eq!(side("./web:/x"), Side::Local("./web:/x".into()));
        assert_eq!(side("/tmp/a:b"), Side::Local("/tmp/a:b".into()));
        assert_eq!(side("dir/a:b"), Side::Local("dir/a:b".into()));
        assert_eq!(side("plain"), Side::Local("plain".into()));
        assert_eq!(side(":x"), Side::Local(":x".into()));
        assert_eq!(base_name("/a/b/"), Some("b"));
        assert_eq!(base_name("/a/b/."), Some("b"));
        assert_eq!(base_name("/"), None);
        assert!(contents_only("/a/.") && contents_only(".") && !contents_only("/a/b"));
    }
}
