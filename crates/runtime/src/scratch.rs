//! A throwaway writable root over an image's layers: what a machine's root would be if it
//! started now, for writing into while the machine is stopped (a dev loop's synced files are
//! applied there and recorded into the machine's dev layer, which its next start mounts).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An overlay of `lowers` with an upper directory of its own, unmounted and removed on drop.
#[derive(Debug)]
pub struct ScratchRoot {
    /// Holds `upper/`, `work/` and `merged/`.
    dir: PathBuf,
    merged: PathBuf,
    mounted: bool,
}

impl ScratchRoot {
    /// Mounts `lowers` (bottom first) writable in the new directory `dir` (a store's temp
    /// directory, named so its gc sweeps what a killed process left).
    pub fn mount(lowers: &[PathBuf], dir: &Path) -> Result<ScratchRoot> {
        let io = |what: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source: std::io::Error| Error::Io {
                id: "scratch".to_string(),
                op: what,
                path: p,
                source,
            }
        };
        let dir = dir.to_path_buf();
        let _ = std::fs::remove_dir_all(&dir);
        let (upper, work, merged) = (dir.join("upper"), dir.join("work"), dir.join("merged"));
        for d in [&upper, &work, &merged] {
            std::fs::create_dir_all(d).map_err(io("creating", d))?;
        }
        let mut root = ScratchRoot {
            dir,
            merged: merged.clone(),
            mounted: false,
        };
        crate::run::mount_overlay("scratch", lowers, &upper, &work, &merged)?;
        root.mounted = true;
        Ok(root)
    }

    /// The merged root, to read and write as the machine's `/`.
    pub fn path(&self) -> &Path {
        &self.merged
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        // Still mounted, removing the directory would remove through the mount into the
        // layers below: then it is left (gc sweeps it once it is unmounted).
        if !self.mounted || crate::run::unmount("scratch", &self.merged).is_ok() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
