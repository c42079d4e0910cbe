//! `strata.toml` projects: several images, built in dependency order (a `FROM` or
//! `COPY --from` naming another project image), independent ones in parallel; and
//! `strata.lock`, which pins the digest every external base resolved to.
//!
//! ```toml
//! [[image]]
//! name = "site-base"              # required; the image's local name (tag `latest`)
//! context = "package"             # build context, relative to strata.toml (default ".")
//! dockerfile = "base.Dockerfile"  # relative to strata.toml (default <context>/Dockerfile)
//! build_args = { VERSION = "1" }  # --build-arg
//! target = "runtime"              # --target
//! ignore = ["*.log"]              # patterns added to .dockerignore
//! from = "busybox:1.36"           # replaces the first stage's FROM
//! from_cache_version = "2"        # change it to rebuild the first stage from scratch
//! labels = { team = "web" }       # added to the image config
//! rebase = false                  # never follow a moved base without running the steps
//! ```
//!
//! `strata.lock` (TOML, written next to strata.toml, meant to be committed):
//!
//! ```toml
//! version = 1
//! [bases]
//! "busybox:latest" = "sha256:…"
//! ```
//!
//! A locked base missing from the store is pulled by its locked digest, so a tag that moved
//! at the registry does not change the build; [`Project::update_with`] asks the registry again
//! and moves the lock.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_dockerfile::{Dockerfile, Instruction};
use strata_oci::{Compression, Digest, Reference};
use strata_store::Store;

use strata_transfer::PullOptions;

use crate::engine::{BuildOptions, BuildOutcome, build, pull_image};
use crate::error::{Error, Result};
use crate::plan::with_platform_args;
use crate::progress::{NoProgress, Progress};

pub use strata_project::{CacheSection, ImageSpec};

/// `strata.lock`: the digest each external base resolved to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct LockFile {
    /// Format version (1).
    pub version: u32,
    /// Local name (`busybox:latest`) → manifest digest.
    #[serde(default)]
    pub bases: BTreeMap<String, String>,
}

/// A loaded project.
#[derive(Debug, Clone)]
pub struct Project {
    /// strata.toml's path.
    pub path: PathBuf,
    /// Its directory (paths are relative to it).
    pub root: PathBuf,
    /// The images, in file order.
    pub images: Vec<ImageSpec>,
    /// Image → project images it needs.
    pub deps: BTreeMap<String, BTreeSet<String>>,
    /// Image → external images it reads (local names).
    pub externals: BTreeMap<String, BTreeSet<String>>,
    /// `[cache]`.
    pub cache: CacheSection,
}

/// Options of [`Project::build`].
#[derive(Debug, Clone, Default)]
pub struct ProjectOptions {
    /// `--no-cache`.
    pub no_cache: bool,
    /// `--explain`.
    pub explain: bool,
    /// `--deployment-tag`.
    pub deployment_tag: bool,
    /// `--secret`s.
    pub secrets: BTreeMap<String, PathBuf>,
    /// Layer compression (default gzip).
    pub compression: Option<Compression>,
    /// runc path.
    pub runc: Option<PathBuf>,
    /// How bases missing from the store are pulled.
    pub pull: PullOptions,
    /// A build cache in a registry for every image (docs/cache.md).
    pub shared_cache: Option<std::sync::Arc<crate::shared_cache::SharedCache>>,
    /// [`BuildOptions::remote_layers`] for every image.
    pub remote_layers: bool,
}

/// What [`Project::build`] did.
#[derive(Debug, Clone)]
pub struct ProjectBuild {
    /// Images in the order they were finished.
    pub order: Vec<String>,
    /// Each image's outcome.
    pub images: BTreeMap<String, BuildOutcome>,
    /// Lock entries added by this build.
    pub locked: BTreeMap<String, String>,
}

/// One moved lock entry reported by [`Project::update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockUpdate {
    /// The base's local name.
    pub base: String,
    /// Digest before (`None`: was not locked).
    pub old: Option<String>,
    /// Digest now.
    pub new: String,
    /// Project images that use it, directly or through another project image.
    pub affected: Vec<String>,
}

fn local(name: &str) -> Option<String> {
    Reference::parse_local(name).ok().map(|r| r.to_string())
}

impl Project {
    /// Reads strata.toml at `path` (or `<path>/strata.toml` for a directory), checks names and
    /// finds dependencies between images.
    pub fn load(path: &Path) -> Result<Project> {
        let path = if path.is_dir() {
            path.join("strata.toml")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Project {
            path: path.clone(),
            line: None,
            message: format!("cannot read: {e}\nhint: create strata.toml with [[image]] entries"),
        })?;
        let file = strata_project::StrataToml::parse(&text, &path).map_err(|e| Error::Project {
            path: e.path,
            line: e.at,
            message: e.message,
        })?;
        let root = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let err = |message: String| Error::Project {
            path: path.clone(),
            line: None,
            message,
        };
        if file.image.is_empty() {
            return Err(err("no [[image]] entries".into()));
        }
        let mut by_local: BTreeMap<String, String> = BTreeMap::new();
        for img in &file.image {
            let l = local(&img.name)
                .ok_or_else(|| err(format!("image name `{}` is not a valid name", img.name)))?;
            if by_local.insert(l, img.name.clone()).is_some() {
                return Err(err(format!("image `{}` is defined twice", img.name)));
            }
        }
        let mut project = Project {
            path: path.clone(),
            root,
            images: file.image,
            deps: BTreeMap::new(),
            externals: BTreeMap::new(),
            cache: file.cache,
        };
        for img in project.images.clone() {
            let df_path = project.dockerfile_of(&img);
            let df = Dockerfile::from_file(&df_path)?;
            let mut deps = BTreeSet::new();
            let mut ext = BTreeSet::new();
            for name in referenced_images(&df, &img)? {
                let Some(l) = local(&name) else { continue };
                match by_local.get(&l) {
                    Some(n) if *n == img.name => {
                        return Err(err(format!("image `{}` uses itself as a base", img.name)));
                    }
                    Some(n) => {
                        deps.insert(n.clone());
                    }
                    None => {
                        ext.insert(l);
                    }
                }
            }
            project.deps.insert(img.name.clone(), deps);
            project.externals.insert(img.name.clone(), ext);
        }
        project.order(&[])?;
        Ok(project)
    }

    /// The image called `name`.
    pub fn image(&self, name: &str) -> Option<&ImageSpec> {
        self.images.iter().find(|i| i.name == name)
    }

    /// The build context directory of `img`.
    pub fn context_of(&self, img: &ImageSpec) -> PathBuf {
        self.root.join(&img.context)
    }

    /// The Dockerfile of `img`.
    pub fn dockerfile_of(&self, img: &ImageSpec) -> PathBuf {
        match &img.dockerfile {
            Some(d) => self.root.join(d),
            None => self.context_of(img).join("Dockerfile"),
        }
    }

    /// strata.lock's path.
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("strata.lock")
    }

    /// The lock file (empty when absent).
    pub fn lock(&self) -> Result<LockFile> {
        let p = self.lock_path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(LockFile {
                    version: 1,
                    bases: BTreeMap::new(),
                });
            }
            Err(e) => {
                return Err(Error::Project {
                    path: p,
                    line: None,
                    message: e.to_string(),
                });
            }
        };
        toml::from_str(&text).map_err(|e| Error::Project {
            path: p.clone(),
            line: e.span().map(|s| strata_project::line_col(&text, s.start)),
            message: e.message().to_string(),
        })
    }

    fn write_lock(&self, lock: &LockFile) -> Result<()> {
        let p = self.lock_path();
        let body = toml::to_string(lock).map_err(|e| Error::Project {
            path: p.clone(),
            line: None,
            message: e.to_string(),
        })?;
        let text = format!(
            "# strata.lock: the digest each external base image resolved to.\n\
             # Written by `strata build`, moved by `strata update`; commit it.\n{body}"
        );
        let tmp = p.with_extension("lock.tmp");
        std::fs::write(&tmp, text).map_err(crate::error::io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &p).map_err(crate::error::io_err("renaming into place", &p))?;
        Ok(())
    }

    /// `names` (all images when empty) and everything they need, in dependency order;
    /// groups of images that can build in parallel.
    pub fn order(&self, names: &[String]) -> Result<Vec<Vec<String>>> {
        let mut wanted = BTreeSet::new();
        let mut todo: Vec<String> = if names.is_empty() {
            self.images.iter().map(|i| i.name.clone()).collect()
        } else {
            names.to_vec()
        };
        while let Some(n) = todo.pop() {
            if self.image(&n).is_none() {
                let all: Vec<&str> = self.images.iter().map(|i| i.name.as_str()).collect();
                return Err(Error::Project {
                    path: self.path.clone(),
                    line: None,
                    message: format!("no image `{n}` in the project; images: {}", all.join(", ")),
                });
            }
            if wanted.insert(n.clone()) {
                todo.extend(self.deps.get(&n).into_iter().flatten().cloned());
            }
        }
        let mut done: BTreeSet<String> = BTreeSet::new();
        let mut waves = Vec::new();
        while done.len() < wanted.len() {
            let wave: Vec<String> = self
                .images
                .iter()
                .map(|i| i.name.clone())
                .filter(|n| wanted.contains(n) && !done.contains(n))
                .filter(|n| {
                    self.deps
                        .get(n)
                        .is_none_or(|d| d.iter().all(|x| done.contains(x)))
                })
                .collect();
            if wave.is_empty() {
                let stuck: Vec<String> = wanted.difference(&done).cloned().collect();
                return Err(Error::Project {
                    path: self.path.clone(),
                    line: None,
                    message: format!(
                        "images depend on each other in a cycle: {}",
                        stuck.join(" → ")
                    ),
                });
            }
            done.extend(wave.iter().cloned());
            waves.push(wave);
        }
        Ok(waves)
    }

    fn options_for(
        &self,
        img: &ImageSpec,
        opts: &ProjectOptions,
        built: &BTreeMap<String, BuildOutcome>,
        lock: &LockFile,
    ) -> Result<BuildOptions> {
        let mut o = BuildOptions::new(self.context_of(img));
        o.dockerfile = Some(self.dockerfile_of(img));
        o.build_args = img.build_args.clone();
        o.target = img.target.clone();
        o.tags = vec![img.name.clone()];
        o.name = Some(img.name.clone());
        o.no_cache = opts.no_cache;
        o.explain = opts.explain;
        o.secrets = opts.secrets.clone();
        o.deployment_tag = opts.deployment_tag;
        o.from_override = img.from.clone();
        o.from_cache_version = img.from_cache_version.clone();
        o.labels = img.labels.clone();
        o.rebase = img.rebase;
        o.extra_ignore = img.ignore.clone();
        o.compression = opts.compression.unwrap_or(Compression::Gzip);
        o.runc = opts.runc.clone();
        o.pull = opts.pull.clone();
        o.shared_cache = opts.shared_cache.clone();
        o.remote_layers = opts.remote_layers;
        for dep in self.deps.get(&img.name).into_iter().flatten() {
            if let (Some(out), Some(l)) = (built.get(dep), local(dep)) {
                o.pinned.insert(l, out.descriptor.clone());
            }
        }
        for ext in self.externals.get(&img.name).into_iter().flatten() {
            if let Some(d) = lock.bases.get(ext) {
                let digest: Digest = d.parse().map_err(|_| Error::Project {
                    path: self.lock_path(),
                    line: None,
                    message: format!("`{ext}` = `{d}` is not a digest"),
                })?;
                // The build finds it in the store or pulls it by this digest.
                o.locked.insert(ext.clone(), digest);
            }
        }
        Ok(o)
    }

    /// Builds `names` (all when empty) and what they need, dependencies first, independent
    /// images in parallel. Unchanged images are cache hits (no step runs). New external
    /// bases are recorded in strata.lock.
    pub fn build(
        &self,
        store: &Store,
        names: &[String],
        opts: &ProjectOptions,
        progress: &dyn Progress,
    ) -> Result<ProjectBuild> {
        let waves = self.order(names)?;
        let lock = self.lock()?;
        let mut built: BTreeMap<String, BuildOutcome> = BTreeMap::new();
        let mut order = Vec::new();
        // The images' blobs stay safe from gc until their refs are set, after each wave.
        let _session = store.write_session()?;
        for wave in waves {
            let mut jobs = Vec::new();
            for n in &wave {
                let img = self
                    .image(n)
                    .ok_or_else(|| Error::Usage(format!("no image `{n}`")))?;
                let mut o = self.options_for(img, opts, &built, &lock)?;
                o.defer_refs = true;
                jobs.push((n.clone(), o));
            }
            let results: Vec<(String, Result<BuildOutcome>)> = if jobs.len() == 1 {
                jobs.into_iter()
                    .map(|(n, o)| {
                        let r = build(store, &o, progress);
                        (n, r)
                    })
                    .collect()
            } else {
                std::thread::scope(|s| {
                    let handles: Vec<_> = jobs
                        .into_iter()
                        .map(|(n, o)| {
                            s.spawn(move || {
                                let r = build(store, &o, progress);
                                (n, r)
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|h| {
                            h.join().unwrap_or_else(|_| {
                                (
                                    String::new(),
                                    Err(Error::Usage("a build thread panicked".into())),
                                )
                            })
                        })
                        .collect()
                })
            };
            // The wave's names in one index.json write (a wave of 200 images would otherwise
            // queue 200 read-modify-writes on the index lock); the built ones are named even
            // when another failed.
            let mut refs = Vec::new();
            let mut failed = None;
            for (n, r) in results {
                match r {
                    Ok(out) => {
                        refs.extend(out.tags.iter().map(|t| (t.clone(), out.descriptor.clone())));
                        order.push(n.clone());
                        built.insert(n, out);
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                }
            }
            store.set_refs(refs)?;
            if let Some(e) = failed {
                return Err(e);
            }
        }
        // Lock what was resolved by name for the first time.
        let mut lock = lock;
        let mut locked = BTreeMap::new();
        for (name, out) in &built {
            for (img, digest) in &out.images_used {
                let is_external = self.externals.get(name).is_some_and(|e| e.contains(img));
                if is_external && !lock.bases.contains_key(img) {
                    lock.bases.insert(img.clone(), digest.to_string());
                    locked.insert(img.clone(), digest.to_string());
                }
            }
        }
        if !locked.is_empty() {
            lock.version = 1;
            self.write_lock(&lock)?;
        }
        Ok(ProjectBuild {
            order,
            images: built,
            locked,
        })
    }

    /// [`Project::update_with`] with default pull options and no progress.
    pub fn update(&self, store: &Store, names: &[String]) -> Result<Vec<LockUpdate>> {
        self.update_with(store, names, &PullOptions::default(), &NoProgress)
    }

    /// Moves the lock of the external bases used by `names` (all when empty) to what they
    /// resolve to now; returns what moved and which images that affects.
    ///
    /// A base whose name has a registry host (`127.0.0.1:5000/org/base:1`, `ghcr.io/o/i`) is
    /// pulled again by its tag, so the lock follows the registry. A base without one
    /// (`busybox`, `debian:12`) resolves to the store's ref, as imported and locally built
    /// images are named that way; only when the store lacks it is it pulled from Docker Hub.
    pub fn update_with(
        &self,
        store: &Store,
        names: &[String],
        pull: &PullOptions,
        progress: &dyn Progress,
    ) -> Result<Vec<LockUpdate>> {
        let selected: BTreeSet<String> = self.order(names)?.into_iter().flatten().collect();
        let mut lock = self.lock()?;
        let mut updates = Vec::new();
        let bases: BTreeSet<String> = selected
            .iter()
            .flat_map(|n| self.externals.get(n).into_iter().flatten().cloned())
            .collect();
        for base in bases {
            let reference = Reference::parse_local(&base)?;
            let local = if reference.registry().is_some() {
                None
            } else {
                store.get_ref(&base)?
            };
            let now = match local {
                Some(desc) => store
                    .resolve_image(&base, desc, &strata_oci::Platform::host())?
                    .descriptor
                    .digest
                    .to_string(),
                None => pull_image(store, &reference, pull, progress, "not in the store")?
                    .manifest
                    .digest
                    .to_string(),
            };
            let old = lock.bases.get(&base).cloned();
            if old.as_deref() != Some(now.as_str()) {
                lock.bases.insert(base.clone(), now.clone());
                updates.push(LockUpdate {
                    affected: self.affected_by(&base),
                    base,
                    old,
                    new: now,
                });
            }
        }
        if !updates.is_empty() {
            lock.version = 1;
            self.write_lock(&lock)?;
        }
        Ok(updates)
    }

    /// Project images that use external `base`, directly or through other project images.
    pub fn affected_by(&self, base: &str) -> Vec<String> {
        let mut hit: BTreeSet<String> = self
            .externals
            .iter()
            .filter(|(_, e)| e.contains(base))
            .map(|(n, _)| n.clone())
            .collect();
        loop {
            let more: Vec<String> = self
                .deps
                .iter()
                .filter(|(n, d)| !hit.contains(*n) && d.iter().any(|x| hit.contains(x)))
                .map(|(n, _)| n.clone())
                .collect();
            if more.is_empty() {
                break;
            }
            hit.extend(more);
        }
        self.images
            .iter()
            .map(|i| i.name.clone())
            .filter(|n| hit.contains(n))
            .collect()
    }
}

/// Every image name a Dockerfile reads: FROM bases that are not stages, `COPY --from` and
/// `--mount from=` values that are not stages.
fn referenced_images(df: &Dockerfile, img: &ImageSpec) -> Result<Vec<String>> {
    let args = with_platform_args(&img.build_args);
    let mut stage_names: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for (i, stage) in df.stages.iter().enumerate() {
        let mut base = df.expand_from(i, &args)?.base;
        if i == 0
            && let Some(f) = &img.from
        {
            base = f.clone();
        }
        let lower = base.to_ascii_lowercase();
        if lower != "scratch" && !stage_names.contains(&lower) {
            out.push(base);
        }
        let mut from_values = Vec::new();
        for l in &stage.instructions {
            match &l.instruction {
                Instruction::Copy(c) => from_values.extend(c.from.clone()),
                Instruction::Run(r) => {
                    from_values.extend(r.mounts.iter().filter_map(|m| m.from.clone()))
                }
                _ => {}
            }
        }
        for f in from_values {
            let lf = f.to_ascii_lowercase();
            if f.parse::<usize>().is_err() && !stage_names.contains(&lf) && !f.contains('$') {
                out.push(f);
            }
        }
        if let Some(n) = &stage.name {
            stage_names.insert(n.clone());
        }
    }
    Ok(out)
}
