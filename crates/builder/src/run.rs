//! Executing a `RUN` step: overlay of the parent's snapshots, mounts, runc, and the upper
//! directory turned into a layer.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use strata_oci::Digest;
use strata_rootfs::{
    Change, LayerOptions, LayerRef, LayerSource, changes_from_overlay_upper, write_layer,
};
use strata_runtime::{MountSpec, Rootfs, RunSpec, UserSpec};

use crate::context::{Ctx, StageState};
use crate::error::{Error, Result, io_err};
use crate::plan::{CacheSharing, FileSource, NetworkMode, RunMount, RunStep, Step};
use crate::progress::{Event, StepRef};
use crate::view::ImageView;

/// How many lines of output a failure shows.
const TAIL_LINES: usize = 20;

/// Things that must live as long as the container runs.
#[derive(Default)]
struct Held {
    locks: Vec<File>,
    temps: Vec<tempfile::TempDir>,
}

fn rel(p: &str) -> String {
    p.trim_start_matches('/').to_string()
}

/// Runs `run` on top of `state`; returns the layer it produced (`None`: no changes).
pub(crate) fn run_step(
    ctx: &Ctx<'_>,
    state: &StageState,
    step: &Step,
    run: &RunStep,
    step_ref: &StepRef,
) -> Result<Option<(strata_oci::Descriptor, Digest)>> {
    let lowers = ctx.snapshots_of(&state.layers)?;
    let tmp = ctx.tempdir("run-")?;
    let upper = tmp.path().join("upper");
    let work = tmp.path().join("work");
    let empty = tmp.path().join("empty");
    for d in [&upper, &work, &empty] {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(d)
            .map_err(io_err("creating directory", d))?;
    }
    let view = ImageView::new(lowers.iter().rev().cloned().collect());
    let lowers = if lowers.is_empty() {
        vec![empty.clone()]
    } else {
        lowers
    };

    // Docker creates a missing WORKDIR; only the parts the image lacks go in the upper dir.
    // Through the image's own symlinks, like WORKDIR (`/lib/app` is `/usr/lib/app` when
    // `/lib -> usr/lib`): a real `lib/` in the layer would hide the image's `/usr/lib`.
    let workdir = view.resolve(&run.workdir).map_err(Error::Usage)?;
    make_dirs_like_image(&view, &upper, &rel(&workdir))?;

    let user = if run.user.is_empty() {
        UserSpec {
            uid: 0,
            gid: 0,
            additional_gids: Vec::new(),
        }
    } else {
        strata_runtime::resolve_user(&view.top_first, &run.user)?
    }
    .with_primary_group();

    let mut held = Held::default();
    let mut mounts = Vec::new();
    let mut env = run.env.clone();
    for m in &run.mounts {
        if let Some(spec) = mount_spec(ctx, m, &mut held, &mut env)? {
            mounts.push(spec);
        }
    }
    let spec = RunSpec {
        id: format!(
            "strata-build-{}",
            ulid::Ulid::generate().to_string().to_lowercase()
        ),
        rootfs: Rootfs::Overlay {
            lowers,
            upper: upper.clone(),
            work,
        },
        args: run.argv.clone(),
        env,
        cwd: run.workdir.clone(),
        user,
        // BuildKit's, so a step that records the hostname writes what it writes under BuildKit.
        hostname: "buildkitsandbox".to_string(),
        network: match run.network {
            NetworkMode::Host => strata_runtime::NetworkMode::Host,
            NetworkMode::None => strata_runtime::NetworkMode::None,
        },
        mounts,
        readonly_rootfs: false,
    };
    // Mount points the image lacks are created by runc in the upper dir; they are not the
    // command's changes and are removed from the layer when still empty.
    let absent: Vec<String> = strata_runtime::spec::mount_targets(&spec)
        .iter()
        .map(|t| rel(t))
        .filter(|p| view.lookup(p).is_none())
        .collect();
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut partial: Vec<u8> = Vec::new();
    let emit = |line: &[u8], tail: &mut VecDeque<String>| {
        let line = String::from_utf8_lossy(line)
            .trim_end_matches('\r')
            .to_string();
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        ctx.progress.event(&Event::Output {
            step: step_ref.clone(),
            line,
        });
    };
    let run_started = Instant::now();
    let result = ctx.executor.run(&spec, &mut |chunk: &[u8]| {
        partial.extend_from_slice(chunk);
        while let Some(i) = partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            emit(&line[..line.len() - 1], &mut tail);
        }
    })?;
    if !partial.is_empty() {
        let rest = std::mem::take(&mut partial);
        emit(&rest, &mut tail);
    }
    drop(held);
    tracing::debug!("{}: ran in {:.2?}", step.text, run_started.elapsed());
    if result.exit_code != 0 || result.signal.is_some() {
        let status = match result.signal {
            Some(s) => format!("killed by signal {s}"),
            None => format!("exit code {}", result.exit_code),
        };
        return Err(Error::RunFailed {
            location: step.location.to_string(),
            instruction: step.text.clone(),
            status,
            exit_code: result.exit_code,
            tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
        });
    }

    let all = changes_from_overlay_upper(&upper)?;
    let changes = drop_mountpoints(&upper, all.clone(), &absent, &view);
    if changes.is_empty() {
        return Ok(None);
    }
    // The upper dir becomes the layer's snapshot (below), which must be on disk first: start
    // its writeback now, while the layer is compressed from the page cache.
    let early_sync = {
        let upper = upper.clone();
        std::thread::spawn(move || strata_rootfs::sync_filesystem(&upper))
    };
    let opts = LayerOptions {
        compression: ctx.opts.compression,
        mtime: ctx.run_mtime,
        ..LayerOptions::default()
    };
    let started = Instant::now();
    let mut writer = ctx.store.blob_writer()?;
    let info = write_layer(
        LayerSource::Changes {
            root: &upper,
            changes: &changes,
        },
        &opts,
        &mut writer,
    )?;
    writer.commit(Some((&info.digest, Some(info.size))))?;
    tracing::debug!(
        "{}: layer {} ({} bytes, {} uncompressed) written in {:.2?}",
        step.text,
        info.digest,
        info.size,
        info.uncompressed_size,
        started.elapsed()
    );
    let layer = LayerRef {
        descriptor: info.descriptor(),
        diff_id: info.diff_id.clone(),
    };
    // The upper dir is this layer in overlay form: it becomes the snapshot the next step
    // mounts, instead of unpacking the blob just written (seconds for a big apt layer).
    // Failing that costs only time: the snapshot is unpacked on first use as before.
    let mut chain = state.layers.clone();
    chain.push(layer.clone());
    let kept: BTreeSet<&Path> = changes.iter().map(|c| c.path()).collect();
    let left_out: Vec<&Path> = all
        .iter()
        .map(|c| c.path())
        .filter(|p| !kept.contains(p))
        .collect();
    // Its errors are adopt's to meet again (it syncs once more, with little left to write).
    let _ = early_sync.join();
    if let Err(e) = ctx.snapshots.adopt(&chain, &upper, &left_out) {
        tracing::warn!("keeping the step's upper dir as its snapshot failed: {e}");
    }
    Ok(Some((layer.descriptor, layer.diff_id)))
}

/// Creates the directories of `rel_path` missing from the image in `upper`; components the
/// image has are created with the image's metadata (what an overlay copy-up would do).
fn make_dirs_like_image(view: &ImageView, upper: &Path, rel_path: &str) -> Result<()> {
    let parts: Vec<&str> = rel_path.split('/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() || view.lookup(rel_path).is_some() {
        return Ok(());
    }
    let mut prefix = String::new();
    for part in parts {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        let dst = upper.join(strata_oci::names::decode(&prefix));
        if dst.exists() {
            continue;
        }
        std::fs::create_dir(&dst).map_err(io_err("creating directory", &dst))?;
        let (mode, uid, gid) = match view.lookup(&prefix) {
            Some(md) if md.is_dir() => (md.mode() & 0o7777, md.uid(), md.gid()),
            _ => (0o755, 0, 0),
        };
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
            .map_err(io_err("chmod", &dst))?;
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid))
            .map_err(io_err("chown", &dst))
            .or_else(|e| {
                if rustix::process::geteuid().is_root() {
                    Err(e)
                } else {
                    Ok(())
                }
            })?;
    }
    Ok(())
}

/// Removes from `changes` the mount points runc created (absent from the image, still
/// empty) and directories created only to hold them.
fn drop_mountpoints(
    upper: &Path,
    changes: Vec<Change>,
    absent: &[String],
    view: &ImageView,
) -> Vec<Change> {
    let mut dropped: BTreeSet<PathBuf> = BTreeSet::new();
    for p in absent {
        let full = upper.join(p);
        let empty = match std::fs::symlink_metadata(&full) {
            Ok(md) if md.is_dir() => std::fs::read_dir(&full).is_ok_and(|mut d| d.next().is_none()),
            Ok(md) if md.is_file() => md.len() == 0,
            _ => false,
        };
        if empty {
            dropped.insert(PathBuf::from(p));
        }
    }
    let mut kept: Vec<Change> = changes
        .into_iter()
        .filter(|c| !dropped.contains(c.path()))
        .collect();
    // Parents of dropped mount points that the image lacks and that hold nothing else.
    loop {
        let before = kept.len();
        let paths: Vec<PathBuf> = kept.iter().map(|c| c.path().to_path_buf()).collect();
        kept.retain(|c| {
            let p = c.path();
            let is_parent_of_dropped = dropped.iter().any(|d| d.starts_with(p) && d != p);
            if !is_parent_of_dropped {
                return true;
            }
            let in_image = view
                .lookup(&strata_oci::names::encode_os(p.as_os_str()))
                .is_some();
            let has_children = paths.iter().any(|q| q.starts_with(p) && q != p);
            in_image || has_children
        });
        if kept.len() == before {
            break;
        }
    }
    kept
}

/// The runtime mount for one `RUN --mount` (and the secret env var, if asked).
fn mount_spec(
    ctx: &Ctx<'_>,
    m: &RunMount,
    held: &mut Held,
    env: &mut Vec<String>,
) -> Result<Option<MountSpec>> {
    Ok(Some(match m {
        RunMount::Cache {
            target,
            id,
            sharing,
            readonly,
            mode,
            uid,
            gid,
        } => {
            let dir = cache_mount_dir(ctx.store.root(), id);
            let root = dir.parent().map(Path::to_path_buf).unwrap_or_default();
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::create_dir_all(&root).map_err(io_err("creating directory", &root))?;
            // A mount this store has never had may come from the registry cache.
            if !dir.exists()
                && let Some(shared) = &ctx.opts.shared_cache
            {
                shared.import_mount(ctx.store, id, &dir)?;
            }
            if !dir.exists() {
                let tmp = tempfile::Builder::new()
                    .prefix("tmp-")
                    .tempdir_in(&root)
                    .map_err(io_err("creating directory in", &root))?;
                std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(*mode))
                    .map_err(io_err("chmod", tmp.path()))?;
                let _ = std::os::unix::fs::chown(tmp.path(), Some(*uid), Some(*gid));
                let kept = tmp.keep();
                // Another build may have created it meanwhile: theirs wins.
                if std::fs::rename(&kept, &dir).is_err() {
                    let _ = std::fs::remove_dir_all(&kept);
                }
            }
            let source = match sharing {
                CacheSharing::Shared => dir,
                CacheSharing::Locked => {
                    let lock_path = root.join(format!("{name}.lock"));
                    let f = File::create(&lock_path).map_err(io_err("creating", &lock_path))?;
                    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
                        .map_err(|e| io_err("locking", &lock_path)(e.into()))?;
                    held.locks.push(f);
                    dir
                }
                CacheSharing::Private => {
                    let t = ctx.tempdir("cache-")?;
                    crate::copy::copy_tree(&dir, t.path())?;
                    let p = t.path().to_path_buf();
                    held.temps.push(t);
                    p
                }
            };
            MountSpec::Bind {
                source,
                target: target.clone(),
                readonly: *readonly,
            }
        }
        RunMount::Bind {
            target,
            from,
            source,
            readonly,
        } => {
            let root = match from {
                FileSource::Context => ctx.context.clone(),
                other => ctx.origin_root(other)?,
            };
            let rel_src = strata_dockerfile::clean_path(&format!("/{source}"));
            let src = root.join(rel_src.trim_start_matches('/'));
            if !src.exists() {
                return Err(Error::SourceNotFound {
                    source_path: source.clone(),
                    origin: "the bind mount's source".to_string(),
                });
            }
            let src = if *readonly {
                src
            } else {
                // Writes to a read-write bind are thrown away (BuildKit): give it a copy.
                let t = ctx.tempdir("bind-")?;
                let dst = t.path().join("src");
                crate::copy::copy_any(&src, &dst)?;
                held.temps.push(t);
                dst
            };
            MountSpec::Bind {
                source: src,
                target: target.clone(),
                readonly: *readonly,
            }
        }
        RunMount::Inline {
            target,
            content,
            mode,
        } => {
            let dir = ctx.tempdir("inline-")?;
            let file = dir.path().join("script");
            std::fs::write(&file, content).map_err(io_err("writing", &file))?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))
                .map_err(io_err("chmod", &file))?;
            held.temps.push(dir);
            MountSpec::Bind {
                source: file,
                target: target.clone(),
                readonly: true,
            }
        }
        RunMount::Tmpfs { target, size } => MountSpec::Tmpfs {
            target: target.clone(),
            size: *size,
        },
        RunMount::Secret {
            id,
            target,
            required,
            env: env_name,
            mode,
            uid,
            gid,
        } => {
            let Some(src) = ctx.opts.secrets.get(id) else {
                if *required {
                    return Err(Error::Usage(format!(
                        "secret `{id}` is required but was not given\nhint: --secret id={id},src=FILE"
                    )));
                }
                return Ok(None);
            };
            if let Some(name) = env_name {
                let value = std::fs::read_to_string(src).map_err(io_err("reading secret", src))?;
                env.push(format!("{name}={}", value.trim_end_matches('\n')));
            }
            if target.is_empty() {
                return Ok(None);
            }
            // A copy with the mode and owner the mount asks for, in a directory of the
            // build's own (0700), removed when the step ends; the user's file is untouched.
            let dir = ctx.tempdir("secret-")?;
            let copy = dir.path().join("secret");
            std::fs::copy(src, &copy).map_err(io_err("copying secret", src))?;
            if rustix::process::geteuid().is_root() {
                std::os::unix::fs::chown(&copy, Some(*uid), Some(*gid))
                    .map_err(io_err("chown", &copy))?;
            }
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(*mode & 0o7777))
                .map_err(io_err("chmod", &copy))?;
            held.temps.push(dir);
            MountSpec::Bind {
                source: copy,
                target: target.clone(),
                readonly: true,
            }
        }
    }))
}

/// Where the cache mount `id` of the store at `store_root` lives:
/// `<store>/strata/cache-mounts/<first 32 hex of sha256(id)>`.
pub fn cache_mount_dir(store_root: &Path, id: &str) -> std::path::PathBuf {
    let name = Digest::sha256(id.as_bytes()).hex()[..32].to_string();
    store_root.join("strata/cache-mounts").join(name)
}
