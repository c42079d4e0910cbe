//! Live updates of an app's running machines (`strata dev`, docs/dev.md): file operations
//! written straight into each machine's root filesystem from the host, recorded in the dev
//! layer of its image (so a restart keeps them), then commands run in the machines and, if the
//! app asks, its machines restarted in place. What changed and which commands a change
//! triggers is the caller's to decide.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use strata_runtime::{SyncOp, sync_in_root};

use crate::host::Host;
use crate::state::{Machine, MachineState};
use crate::{Error, Result};

/// One change: an op at `dest` (a path in the machines), and the `--chown` of the COPY that
/// wrote it in the image, if any (the owner a synced file gets).
#[derive(Debug, Clone)]
pub struct LiveOp {
    pub dest: String,
    pub op: SyncOp,
    pub owner: Option<String>,
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Machines updated.
    pub machines: usize,
    /// The commands that ran, then `restart` if the machines were restarted.
    pub ran: Vec<String>,
}

/// Not there (any more): removed, or a parent is no longer a directory.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn io_err(what: String) -> impl FnOnce(io::Error) -> Error {
    move |e| Error::Config(format!("{what}: {e}"))
}

/// Writes `ops` into every running machine of `app` (and the dev layer of its image), runs
/// each of `commands` (`sh -c`) in each machine, then restarts the machines in place when
/// `restart` (the agent runs as `exe`).
pub fn apply(
    host: &Host,
    app: &str,
    ops: &[LiveOp],
    commands: &[String],
    restart: bool,
    exe: &Path,
) -> Result<Applied> {
    let all: Vec<Machine> = host
        .state
        .machines()?
        .into_iter()
        .filter(|m| m.app.as_deref() == Some(app))
        .collect();
    if all.is_empty() {
        return Err(Error::Config(format!("no machine of {app} exists here")));
    }
    let mut machines: Vec<Machine> = all
        .iter()
        .filter(|m| m.state == MachineState::Running)
        .cloned()
        .collect();
    // Each image's dev layer is written once, after the first of its machines got the ops.
    let mut recorded: BTreeSet<String> = BTreeSet::new();
    let mut stopped_meanwhile = Vec::new();
    for m in &machines {
        let root = host.machine_dir(&m.id).join("rootfs");
        match write_ops(&root, ops, &m.id) {
            Ok(()) => {}
            // It stopped while the batch was written: its dev layer is written below, as for
            // any stopped machine's.
            Err(e) if !is_running(host, &m.id) => {
                tracing::debug!("machine {} stopped during a sync: {e}", m.id);
                stopped_meanwhile.push(m.id.clone());
                continue;
            }
            Err(e) => return Err(e),
        }
        if let Some(layer) = host.dev_layer(m)
            && recorded.insert(m.digest.to_string())
        {
            record(host, m, &layer, &root, ops)?;
        }
    }
    machines.retain(|m| !stopped_meanwhile.contains(&m.id));
    // Images only stopped machines run: the ops go into a scratch root of the image (its
    // layers and dev layer) and from there into the dev layer, which their next start mounts.
    for m in &all {
        if recorded.contains(&m.digest.to_string()) {
            continue;
        }
        let Some(layer) = host.dev_layer(m) else {
            continue;
        };
        let lowers = host.spec(m)?.lowers;
        let dir = host.store.root().join("strata/tmp").join(format!(
            "{}{}",
            strata_store::temp_prefix("dev-scratch"),
            m.id
        ));
        let scratch = strata_runtime::ScratchRoot::mount(&lowers, &dir)?;
        write_ops(scratch.path(), ops, &m.id)?;
        record(host, m, &layer, scratch.path(), ops)?;
        recorded.insert(m.digest.to_string());
    }
    let mut ran = Vec::new();
    for cmd in commands {
        for m in &machines {
            let code = host.driver.exec(
                &m.id,
                &["sh".to_string(), "-c".to_string(), cmd.clone()],
                &strata_runtime::ExecOptions {
                    env: m.config.env.clone(),
                    ..Default::default()
                },
            )?;
            if code != 0 {
                return Err(Error::Machine {
                    id: m.id.clone(),
                    reason: format!("`{cmd}` exited {code}"),
                });
            }
        }
        ran.push(cmd.clone());
    }
    if restart {
        // The same machines, addresses and routes; the dev layer keeps what was synced.
        for m in &machines {
            crate::machines::restart(host, &m.id, exe)?;
        }
        ran.push("restart".into());
    }
    Ok(Applied {
        machines: machines.len(),
        ran,
    })
}

fn is_running(host: &Host, id: &str) -> bool {
    matches!(host.state.machine(id), Ok(Some(m)) if m.state == MachineState::Running)
}

/// Writes `ops` into the root filesystem `root` (a machine's, or a scratch root of its
/// image), owned as the rules say.
fn write_ops(root: &Path, ops: &[LiveOp], id: &str) -> Result<()> {
    {
        let mut ids: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for LiveOp { dest, op, owner } in ops {
            let r = match sync_in_root(root, dest, op) {
                // The file went away while it was copied: it is gone here too (its removal
                // is another event, acted on in the next batch).
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound && matches!(op, SyncOp::File { .. }) =>
                {
                    sync_in_root(root, dest, &SyncOp::Remove)
                }
                // A parent was a file when this batch looked at it and is a directory now:
                // that change is the next batch's, which sends the directory whole.
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(()),
                r => r,
            };
            r.map_err(io_err(format!("cannot write {dest} in machine {id}")))?;
            if let (Some(spec), false) = (owner.as_deref(), matches!(op, SyncOp::Remove)) {
                let (uid, gid) = match ids.get(spec) {
                    Some(v) => *v,
                    None => {
                        let v = strata_runtime::chown_ids(spec, |s| {
                            strata_runtime::resolve_user(&[root.to_path_buf()], s)
                        })
                        .map_err(|e| {
                            Error::Config(format!(
                                "--chown={spec} of the COPY to {dest} in machine {id}: {e}"
                            ))
                        })?;
                        *ids.entry(spec).or_insert(v)
                    }
                };
                match strata_runtime::chown_in_root(root, dest, uid, gid) {
                    Err(e) if gone(&e) => {}
                    r => r.map_err(io_err(format!("cannot chown {dest} in machine {id}")))?,
                }
            }
        }
    }
    Ok(())
}

/// Drops what was synced into `app`'s machines (its dev layers) and restarts its running
/// machines, which then serve their image as it was built. Returns how many restarted.
pub fn reset(host: &Host, app: &str, exe: &Path) -> Result<usize> {
    let dir = host.dev_dir(app);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if !gone(&e) => {
            return Err(io_err(format!("cannot remove {}", dir.display()))(e));
        }
        _ => {}
    }
    let mut restarted = 0;
    for m in host.state.app_machines(app)? {
        if m.state == MachineState::Running {
            crate::machines::restart(host, &m.id, exe)?;
            restarted += 1;
        }
    }
    Ok(restarted)
}

/// Writes `ops` (already applied in machine `m`, whose root is `merged`) into the dev layer of
/// `m`'s image, so a restart of the process or the machine keeps them.
fn record(host: &Host, m: &Machine, layer: &Path, merged: &Path, ops: &[LiveOp]) -> Result<()> {
    // The image's layers, below the dev layer: only a removal needs them (for a whiteout).
    let mut below: Option<Vec<PathBuf>> = None;
    let mut below = || -> Result<Vec<PathBuf>> {
        if below.is_none() {
            let lowers = host.spec(m)?.lowers;
            below = Some(lowers.into_iter().filter(|l| l != layer).collect());
        }
        Ok(below.clone().unwrap_or_default())
    };
    if !layer.is_dir() {
        let tmp = layer.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .and_then(|()| std::fs::rename(&tmp, layer))
            .map_err(io_err(format!(
                "cannot make the dev layer {}",
                layer.display()
            )))?;
    }
    for LiveOp { dest, op, .. } in ops {
        let under = match op {
            SyncOp::Remove => below()?,
            _ => Vec::new(),
        };
        let r = match strata_runtime::record_in_layer(layer, merged, &under, dest, op) {
            // Gone from the context while it was copied: gone from the machine too (see
            // `apply`), so from the layer as well.
            Err(e) if gone(&e) && matches!(op, SyncOp::File { .. }) => {
                strata_runtime::record_in_layer(layer, merged, &below()?, dest, &SyncOp::Remove)
            }
            // A parent turned into a directory meanwhile: the next batch's.
            Err(e) if e.kind() == io::ErrorKind::NotADirectory => Ok(()),
            r => r,
        };
        r.map_err(io_err(format!("cannot keep {dest} in {}", layer.display())))?;
    }
    Ok(())
}
