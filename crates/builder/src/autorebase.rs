//! Automatic rebase: when the image a stage starts `FROM` moved since the last build of the
//! image (a new build of a project base, `strata update`), the stage's layer steps take the
//! layers that build wrote instead of running again, as long as each would write the same
//! bytes on the new base. The image then comes out exactly as a clean build on the new base
//! would make it (the solver assembles config, history and manifest as usual); only its
//! config and manifest are new blobs. docs/rebase.md says when this applies and why.
//!
//! A step is followed from the last build ([`Follow`]) when:
//! - its key on the *old* base's chain (the last build's keys, from its record) is the key
//!   the last build gave it: the same instruction, build args and copied files;
//! - it is a COPY/ADD/WORKDIR whose cache entry says what it read of the image below it
//!   ([`MadeWith`]), and the old and new bases answer every one of those paths (and their
//!   parents) and files alike: same type, mode, owner, size, link target, content for the
//!   files it read whole. The layers between the base and the step are the same in both
//!   builds (each was followed too), so the step saw the same image either way;
//! - it is a config step (ENV, LABEL, CMD…): these never change a layer except through the
//!   instructions of later steps, which their keys hold; USER must be unchanged, since
//!   WORKDIR creates its directory for that user.
//!
//! A RUN step is never followed: its command may read any file of the base.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use strata_oci::{Digest, ImageConfig, Platform};
use strata_rootfs::LayerRef;

use crate::cache::{self, CacheEntry, MadeWith, StepInputs};
use crate::config::ConfigChange;
use crate::context::Ctx;
use crate::error::Result;
use crate::plan::{Step, StepKind};
use crate::view::{ImageView, clean};

/// A stage being followed from the last build of the image onto its moved base.
pub(crate) struct Follow<'p> {
    /// The last build's steps of this stage.
    prev: &'p [StepInputs],
    /// The last build's key of the step before the current one (its base's key at first).
    parent: String,
    old_base: Vec<LayerRef>,
    new_base: Vec<LayerRef>,
    /// Old and new base, unpacked on first need.
    views: Option<(ImageView, ImageView)>,
}

/// Whether a stage can follow its base, decided before its first step.
pub(crate) enum Start<'p> {
    /// The base did not move (or nothing is known of the last build): the cache decides.
    Unmoved,
    /// The base moved but the stage is rebuilt, for this reason.
    Refused(String),
    /// The base moved; each step is tried.
    Follow(Box<Follow<'p>>),
}

/// What to do with one layer step.
pub(crate) enum LayerStep {
    /// Take this entry (the last build's layer): nothing runs, nothing is written.
    Reuse(Box<CacheEntry>),
    /// The step hit the cache on the new chain with the layer the last build had: go on.
    Continue,
    /// Stop following: the step (and every later one) is built, for this reason.
    Stop(String),
}

/// `step` as messages name it: its text and place.
fn named(step: &Step) -> String {
    format!("`{}` ({})", step.text, step.location)
}

/// Decides whether the stage whose base is the image `new_digest` (with `new_layers`) follows
/// the last build (`prev`: its record of this stage). `refusal` is why following is off for
/// this build, if it is; `old_base_key` gives the stage's first key for a base digest.
pub(crate) fn start<'p>(
    ctx: &Ctx<'_>,
    new_digest: &Digest,
    new_layers: Vec<LayerRef>,
    steps: &[Step],
    prev: Option<&'p [StepInputs]>,
    refusal: Option<&str>,
    old_base_key: impl Fn(&str) -> String,
) -> Result<Start<'p>> {
    let Some(prev) = prev else {
        return Ok(Start::Unmoved);
    };
    let Some(old) = prev.first().and_then(|s| s.base_digest.as_deref()) else {
        return Ok(Start::Unmoved);
    };
    if old == new_digest.to_string() {
        return Ok(Start::Unmoved);
    }
    if let Some(why) = refusal {
        return Ok(Start::Refused(why.to_string()));
    }
    if prev.len() != steps.len() {
        return Ok(Start::Refused(format!(
            "the stage has {} steps and had {} in the last build",
            steps.len(),
            prev.len()
        )));
    }
    let Some(old_base) = image_layers(ctx, old)? else {
        return Ok(Start::Refused(format!(
            "the old base {old} is no longer in the store"
        )));
    };
    Ok(Start::Follow(Box::new(Follow {
        prev,
        parent: old_base_key(old),
        old_base,
        new_base: new_layers,
        views: None,
    })))
}

/// The layers of the manifest `digest`, `None` when the store lacks it.
fn image_layers(ctx: &Ctx<'_>, digest: &str) -> Result<Option<Vec<LayerRef>>> {
    let Ok(d) = digest.parse::<Digest>() else {
        return Ok(None);
    };
    let Some(desc) = crate::resolve::descriptor_for_digest(ctx.store, &d)? else {
        return Ok(None);
    };
    let img = ctx.store.resolve_image(digest, desc, &Platform::host())?;
    let config = ImageConfig::from_slice(&img.config_bytes)?;
    if ctx.store.has_blob(&img.manifest.config.digest)
        && img
            .manifest
            .layers
            .iter()
            .all(|l| ctx.store.has_blob(&l.digest))
    {
        Ok(Some(LayerRef::zip(&img.manifest.layers, config.diff_ids())))
    } else {
        Ok(None)
    }
}

impl Follow<'_> {
    /// A config step (not WORKDIR, which makes a layer): `key_on(parent)` is its key on a
    /// chain. `Some(reason)` stops following.
    pub fn config_step(
        &mut self,
        i: usize,
        step: &Step,
        key_on: impl Fn(&str) -> String,
    ) -> Option<String> {
        let prev = &self.prev[i];
        let key = key_on(&self.parent);
        if key == prev.key {
            self.parent = key;
            return None;
        }
        let user = matches!(step.kind, StepKind::Config(ConfigChange::User { .. }));
        if user || prev.text != step.text {
            return Some(format!(
                "{} is not the step the last build ran there{}",
                named(step),
                if user {
                    " (WORKDIR creates its directory for the USER)"
                } else {
                    ""
                }
            ));
        }
        // Same line, another value: it expanded a variable the base sets (`ENV
        // PATH=/app/bin:$PATH`). The config comes from the new base as a rebuild makes it,
        // and later layer steps are checked by their own keys.
        self.parent = prev.key.clone();
        None
    }

    /// A RUN step: it stops following.
    pub fn run_step(&self, step: &Step) -> String {
        format!(
            "{} runs a command on the base, and what it writes may depend on the base's files",
            named(step)
        )
    }

    /// A COPY/ADD/WORKDIR step: `key_on(parent)` is its key on a chain, `hit` its entry on
    /// the new chain when the cache has one.
    pub fn layer_step(
        &mut self,
        ctx: &Ctx<'_>,
        i: usize,
        step: &Step,
        key_on: impl Fn(&str) -> String,
        hit: Option<&CacheEntry>,
    ) -> Result<LayerStep> {
        let prev = &self.prev[i];
        let key = key_on(&self.parent);
        if key != prev.key {
            return Ok(LayerStep::Stop(format!(
                "{} is not the step the last build ran there (its instruction or files changed)",
                named(step)
            )));
        }
        let Some(entry) = cache::get(ctx.store, &key)? else {
            return Ok(LayerStep::Stop(format!(
                "the layer the last build wrote for {} is no longer in the store",
                named(step)
            )));
        };
        if let Some(h) = hit {
            // Built on the new base before: go on only if it wrote the same layer.
            if h.layer != entry.layer {
                return Ok(LayerStep::Stop(format!(
                    "{} has another layer in the cache on the new base",
                    named(step)
                )));
            }
            self.parent = key;
            return Ok(LayerStep::Continue);
        }
        let Some(made) = entry.made_with.as_ref() else {
            return Ok(LayerStep::Stop(format!(
                "the layer of {} was written by an older strata, which did not record what it \
                 read of the base",
                named(step)
            )));
        };
        if made.epoch != ctx.epoch {
            return Ok(LayerStep::Stop(format!(
                "the layer of {} has file times from SOURCE_DATE_EPOCH={}, this build uses {}",
                named(step),
                made.epoch,
                ctx.epoch
            )));
        }
        if let Some(l) = &entry.layer
            && l.media_type != ctx.opts.compression.oci_layer_media_type()
        {
            return Ok(LayerStep::Stop(format!(
                "the layer of {} is `{}`, this build writes `{}`",
                named(step),
                l.media_type,
                ctx.opts.compression.oci_layer_media_type()
            )));
        }
        if let Some(why) = self.differs(ctx, made)? {
            return Ok(LayerStep::Stop(format!(
                "{why} between the old base and the new one, and {} reads it",
                named(step)
            )));
        }
        self.parent = key;
        Ok(LayerStep::Reuse(Box::new(entry)))
    }

    /// The first path or file `made` read that the old and new base answer differently.
    fn differs(&mut self, ctx: &Ctx<'_>, made: &MadeWith) -> Result<Option<String>> {
        if made.paths.is_empty() && made.files.is_empty() {
            return Ok(None);
        }
        if self.views.is_none() {
            let view = |layers: &[LayerRef]| -> Result<ImageView> {
                Ok(ImageView::new(
                    ctx.snapshots_of(layers)?.into_iter().rev().collect(),
                ))
            };
            self.views = Some((view(&self.old_base)?, view(&self.new_base)?));
        }
        let Some((old, new)) = &self.views else {
            return Ok(None);
        };
        let mut asked = std::collections::BTreeSet::new();
        for p in &made.paths {
            // A path's parents decide whether it exists at all: they are asked too.
            let p = clean(p);
            if p.is_empty() {
                asked.insert(p.clone());
            }
            let mut prefix = String::new();
            for part in p.split('/').filter(|s| !s.is_empty()) {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(part);
                asked.insert(prefix.clone());
            }
        }
        for p in &asked {
            if entry_of(old, p) != entry_of(new, p) {
                return Ok(Some(format!("`/{p}` differs")));
            }
        }
        for f in &made.files {
            if file_of(old, f) != file_of(new, f) {
                return Ok(Some(format!("`/{}` differs", clean(f))));
            }
        }
        Ok(None)
    }
}

/// What a COPY can learn of a path in an image: kind, mode, owner, size, device, link target.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    rdev: u64,
    target: Option<PathBuf>,
}

fn entry_of(view: &ImageView, rel: &str) -> Option<Entry> {
    let (host, md) = view.locate(rel)?;
    let ft = md.file_type();
    Some(Entry {
        kind: md.mode() & 0o170000,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        // A directory's size is the filesystem's business, not the image's.
        size: (!ft.is_dir()).then_some(md.len()),
        rdev: md.rdev(),
        target: if ft.is_symlink() {
            std::fs::read_link(&host).ok()
        } else {
            None
        },
    })
}

/// The file `rel` as a user lookup reads it (`strata_runtime::resolve_user`): from the
/// topmost layer that has an entry there; `None` when that entry is not a regular file or a
/// parent on the way is not a directory.
fn file_of(view: &ImageView, rel: &str) -> Option<Vec<u8>> {
    let rel = clean(rel);
    let (dir, _) = rel.rsplit_once('/').unwrap_or(("", &rel));
    for layer in &view.top_first {
        if !dir.is_empty() {
            match std::fs::symlink_metadata(layer.join(dir)) {
                Ok(md) if md.is_dir() => {}
                Ok(_) => return None,
                Err(_) => continue,
            }
        }
        match std::fs::symlink_metadata(layer.join(&rel)) {
            Ok(md) if md.is_file() => return std::fs::read(layer.join(&rel)).ok(),
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}
