//! The solver: runs a [`Plan`]'s stages (independent ones in parallel), step by step through
//! the cache, and stores the final image.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use strata_dockerfile::{Dockerfile, IgnoreMatcher, Instruction};
use strata_oci::sync::MutexExt;
use strata_oci::{Descriptor, Digest, History, ImageConfig, Platform, Reference, RootFs};
use strata_rootfs::{LayerRef, MtimePolicy, SnapshotCache};
use strata_store::Store;

use crate::autorebase::{self, Follow, LayerStep, Start};
use crate::cache::{self, BaseInput, BuildRecord, CacheEntry, MadeWith, StepInputs};
use crate::copy;
use crate::error::{Error, Result, io_err};
use crate::plan::{Base, FileSource, Plan, PlanOptions, RunMount, Step, StepKind, plan};
use crate::progress::{Event, Progress, StepRef};
use crate::run;
use crate::source::{self, Origin};
use crate::statcache::StatCache;

pub(crate) use crate::context::{Ctx, StageState};
pub use crate::options::{BuildOptions, BuildOutcome};
pub(crate) use crate::resolve::pull_image;
pub use crate::resolve::{StoreResolver, descriptor_for_digest};

/// RFC 3339 of a Unix time.
fn rfc3339(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The creation time used for configs and history: `$SOURCE_DATE_EPOCH`, else 0 (1970), so
/// the same inputs give the same image digest.
pub fn build_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn local(name: &str) -> Result<String> {
    Ok(Reference::parse_local(name)?.to_string())
}

fn repository_of(name: &str) -> Result<String> {
    let r = Reference::parse_local(name)?;
    Ok(r.name())
}

/// Builds one Dockerfile: plans it, runs or reuses every step, stores the image and its refs.
pub fn build(store: &Store, opts: &BuildOptions, progress: &dyn Progress) -> Result<BuildOutcome> {
    let started = Instant::now();
    let context = std::fs::canonicalize(&opts.context)
        .map_err(io_err("opening build context", &opts.context))?;
    let (df, dockerfile_path) = match (&opts.dockerfile_text, &opts.dockerfile) {
        (Some(text), _) => (Dockerfile::parse("<stdin>", text)?, None),
        (None, Some(p)) => (Dockerfile::from_file(p)?, Some(p.clone())),
        (None, None) => {
            let p = context.join("Dockerfile");
            (Dockerfile::from_file(&p)?, Some(p))
        }
    };
    for w in &df.warnings {
        progress.event(&Event::Warning {
            message: format!("{}:{}: {}", df.file, w.line, w.message),
        });
    }
    let mut ignore_text =
        match strata_dockerfile::find_ignore_file(&context, dockerfile_path.as_deref()) {
            Some(p) => std::fs::read_to_string(&p).map_err(io_err("reading", &p))?,
            None => String::new(),
        };
    for extra in &opts.extra_ignore {
        ignore_text.push('\n');
        ignore_text.push_str(extra);
    }
    let ignore = IgnoreMatcher::parse(".dockerignore", &ignore_text)?;

    // What a killed build left goes first: its RUN container, overlay mount and bundle here;
    // its upper and staging dirs and temp blobs went when the store was opened (they are
    // named after their dead owner).
    if let Err(e) = strata_runtime::cleanup_stale_in(&store.root().join("strata/runtime")) {
        progress.event(&Event::Warning {
            message: format!("cannot clean up what an earlier build left: {e}"),
        });
    }
    let resolver = StoreResolver::new(store, &opts.pinned)
        .with_pulls(&opts.locked, &opts.pull, progress)
        .refreshing(opts.pull_always);
    let plan = plan(
        &df,
        &PlanOptions {
            build_args: &opts.build_args,
            target: opts.target.as_deref(),
            from_override: opts.from_override.as_deref(),
            images: &resolver,
            network: opts.network,
        },
    )?;

    let unused = unused_build_args(&df, &plan, &opts.build_args);
    if !unused.is_empty() {
        progress.event(&Event::Warning {
            message: format!(
                "one or more build-args [{}] were not consumed",
                unused.join(" ")
            ),
        });
    }

    let name = match (&opts.name, opts.tags.first()) {
        (Some(n), _) => repository_of(n)?,
        (None, Some(t)) => repository_of(t)?,
        (None, None) => "strata-build".to_string(),
    };
    let epoch = build_epoch();
    let tmp_root = store.root().join("strata/tmp");
    let mut ctx = Ctx {
        store,
        opts,
        progress,
        snapshots: SnapshotCache::new(store.snapshots_dir())?,
        tmp_root,
        stat_cache: StatCache::load(store, &context),
        context,
        ignore,
        image_name: name.clone(),
        epoch,
        created: rfc3339(epoch),
        run_mtime: MtimePolicy::from_source_date_epoch().unwrap_or(MtimePolicy::Keep),
        multi_stage: plan.order.len() > 1,
        resolver: &resolver,
        rebase_refusal: rebase_refusal(opts, &plan),
        layer_bytes_written: AtomicU64::new(0),
        executor: match &opts.executor {
            Some(e) => e.clone(),
            None => Arc::new(crate::executor::Runc::new(
                store.root().join("strata/runtime"),
                opts.runc.clone(),
            )),
        },
        materialized: Mutex::new(HashMap::new()),
        stages: Mutex::new(BTreeMap::new()),
    };
    progress.event(&Event::BuildStarted {
        image: name.clone(),
        stages: plan.order.len(),
    });
    // Blobs written from here on are unreferenced until the ref is set.
    let _session = store.write_session()?;
    let previous = cache::load_record(store, &name)?;
    let prev_files = cache::PrevFiles::new(store, &name);
    let mut fresh_files: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut record = BuildRecord::default();
    let mut counts = (0usize, 0usize);
    let mut explanations = Vec::new();
    let mut rebased_onto = None;

    let mut remaining: Vec<usize> = plan.order.clone();
    while !remaining.is_empty() {
        let done: Vec<usize> = {
            let g = ctx.stages.lock_ok();
            g.keys().copied().collect()
        };
        let ready: Vec<usize> = remaining
            .iter()
            .copied()
            .filter(|i| plan.stages[*i].deps.iter().all(|d| done.contains(d)))
            .collect();
        if ready.is_empty() {
            return Err(Error::Usage("stage dependencies form a cycle".into()));
        }
        let results: Vec<Result<StageRun>> = if ready.len() == 1 {
            vec![run_stage(
                &ctx,
                &plan,
                ready[0],
                previous.as_ref(),
                &prev_files,
            )]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = ready
                    .iter()
                    .map(|&i| {
                        let ctx = &ctx;
                        let plan = &plan;
                        let previous = previous.as_ref();
                        let prev_files = &prev_files;
                        s.spawn(move || run_stage(ctx, plan, i, previous, prev_files))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(Error::Usage("a build thread panicked".into())))
                    })
                    .collect()
            })
        };
        for (i, r) in ready.iter().zip(results) {
            let r = r?;
            counts.0 += r.run;
            counts.1 += r.cached;
            explanations.extend(r.explanations);
            fresh_files.extend(r.fresh_files);
            if *i == plan.target {
                rebased_onto = r.rebased_onto.clone();
            }
            record
                .stages
                .insert(plan.stages[*i].display_name(), r.inputs);
            ctx.stages.lock_ok().insert(*i, r.state);
        }
        remaining.retain(|i| !ready.contains(i));
    }

    let mut state = {
        let g = ctx.stages.lock_ok();
        g.get(&plan.target)
            .cloned()
            .ok_or_else(|| Error::Usage("target stage was not built".into()))?
    };
    if !opts.labels.is_empty() {
        let change = crate::config::ConfigChange::Label {
            labels: opts
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        state.key = cache::step_key(&state.key, &StepKind::Config(change.clone()), None, None);
        change.apply(&mut state.config);
    }

    // The image: canonical config, OCI manifest.
    let config = ImageConfig {
        created: Some(ctx.created.clone()),
        author: state.author.clone(),
        architecture: state.platform.architecture.clone(),
        os: state.platform.os.clone(),
        variant: state.platform.variant.clone(),
        config: Some(state.config.clone()),
        rootfs: RootFs {
            diff_ids: state.layers.iter().map(|l| l.diff_id.clone()).collect(),
            ..RootFs::default()
        },
        history: Some(state.history.clone()),
        ..ImageConfig::default()
    };
    let layers: Vec<Descriptor> = state.layers.iter().map(|l| l.descriptor.clone()).collect();
    // Layers of steps found in the registry cache that no step here read are still there:
    // fetched now when the image is wanted in this store, else left there (`remote_layers`).
    let mut remote = false;
    if let Some(shared) = &opts.shared_cache {
        if opts.remote_layers {
            remote = layers.iter().any(|d| !store.has_blob(&d.digest));
        } else {
            shared.fetch_layers(store, &layers)?;
        }
    }
    let (descriptor, config_desc) = if remote {
        // Not named: the store names only images whose every blob it has. Its manifest and
        // config are kept by digest, for the push that takes the image to its registry.
        let parts = strata_store::ImageParts::new(&config, layers, base_annotations(&plan))?;
        store.put_blob_bytes(&parts.config_bytes, Some(&parts.config.digest))?;
        store.put_blob_bytes(&parts.manifest_bytes, Some(&parts.manifest.digest))?;
        (parts.manifest, parts.config)
    } else {
        store.put_image(&config, layers, base_annotations(&plan))?
    };
    let config_digest = config_desc.digest;
    let content_tag = if remote {
        format!("{name}@{}", descriptor.digest)
    } else {
        format!("{name}:strata-{}", &state.key[..16])
    };
    let mut tags = Vec::new();
    if !remote {
        for t in &opts.tags {
            tags.push(local(t)?);
        }
        tags.push(content_tag.clone());
    }
    let deployment_tag = if opts.deployment_tag && !remote {
        let t = format!("{name}:deployment-{}", ulid::Ulid::generate().to_string());
        tags.push(t.clone());
        Some(t)
    } else {
        None
    };
    // A no-op rebuild rewrites nothing: index.json and the record are only written when they
    // change, and every name in one write (or in the caller's, with `defer_refs`).
    if !opts.defer_refs {
        store.set_refs(
            tags.iter()
                .map(|t| (t.clone(), descriptor.clone()))
                .collect(),
        )?;
    }
    let record_changed = previous.as_ref() != Some(&record);
    if record_changed || !fresh_files.is_empty() {
        save_files(
            &record,
            previous.as_ref(),
            &prev_files,
            fresh_files,
            store,
            &name,
        )?;
    }
    if record_changed {
        cache::save_record(store, &name, &record)?;
    }
    // A cache: failing to keep it costs the next build a read of the files, nothing more.
    if let Err(e) = ctx.stat_cache.save(store) {
        progress.event(&Event::Warning {
            message: format!("cannot save the build context's stat cache: {e}"),
        });
    }
    // Rebased: the target stage followed its moved base and nothing ran anywhere.
    let rebased_onto = rebased_onto.filter(|_| counts.0 == 0);
    if let Some(onto) = &rebased_onto {
        progress.event(&Event::Rebased {
            image: name.clone(),
            onto: onto.clone(),
        });
    }
    progress.event(&Event::ImageDone {
        image: name,
        digest: descriptor.digest.to_string(),
        content_tag: content_tag.clone(),
        tags: tags.clone(),
        duration: started.elapsed(),
        steps_run: counts.0,
        steps_cached: counts.1,
        layer_bytes_written: ctx.layer_bytes_written.load(Ordering::Relaxed),
    });
    Ok(BuildOutcome {
        descriptor,
        config_digest,
        cache_key: state.key,
        content_tag,
        tags,
        deployment_tag,
        steps_run: counts.0,
        steps_cached: counts.1,
        layer_bytes_written: ctx.layer_bytes_written.load(Ordering::Relaxed),
        explanations,
        images_used: resolver.used(),
        pulled: resolver.pulled(),
        rebased_onto,
        context_files_read: ctx.stat_cache.files_read(),
        context_known_keys: ctx.stat_cache.known_hits(),
    })
}

/// Why a build does not follow a moved base: `--no-cache`, strata.toml `rebase = false`, or
/// the label `rebase=false` (which `strata rebase` honours too).
fn rebase_refusal(opts: &BuildOptions, plan: &Plan) -> Option<String> {
    let label = crate::rebase::OPT_OUT_LABEL;
    let labelled = opts.labels.get(label).map(String::as_str) == Some("false")
        || plan
            .stages
            .get(plan.target)
            .and_then(|s| s.final_config.labels.as_ref())
            .and_then(|l| l.get(label))
            .map(String::as_str)
            == Some("false");
    if opts.no_cache {
        Some("--no-cache runs every step".into())
    } else if !opts.rebase {
        Some("automatic rebase is off for this image (`rebase = false`)".into())
    } else if labelled {
        Some(format!("the image carries the label `{label}=false`"))
    } else {
        None
    }
}

struct StageRun {
    state: StageState,
    inputs: Vec<StepInputs>,
    run: usize,
    cached: usize,
    explanations: Vec<(String, String)>,
    /// Per-file hashes of the steps that ran, by step key.
    fresh_files: Vec<(String, BTreeMap<String, String>)>,
    /// `base@sha256:…` when the stage followed its moved base to the end.
    rebased_onto: Option<String>,
}

/// Saves the per-file hashes of this build's steps that read context files: those of the steps
/// that ran, and the last build's for the steps that hit (from its files record, or inline in
/// a record of an earlier strata version).
fn save_files(
    record: &BuildRecord,
    previous: Option<&BuildRecord>,
    prev_files: &cache::PrevFiles<'_>,
    mut fresh: BTreeMap<String, BTreeMap<String, String>>,
    store: &Store,
    name: &str,
) -> Result<()> {
    let inline: HashMap<&str, &BTreeMap<String, String>> = previous
        .iter()
        .flat_map(|p| p.stages.values().flatten())
        .filter(|s| !s.files.is_empty())
        .map(|s| (s.key.as_str(), &s.files))
        .collect();
    let mut files = cache::FilesRecord::default();
    for step in record.stages.values().flatten() {
        if step.files_hash.is_none() {
            continue;
        }
        let found = fresh.remove(&step.key).or_else(|| {
            prev_files
                .of(&step.key)
                .or_else(|| inline.get(step.key.as_str()).copied())
                .cloned()
        });
        if let Some(f) = found {
            files.steps.insert(step.key.clone(), f);
        }
    }
    cache::save_files(store, name, &files)
}

fn short(d: &str) -> String {
    d.chars().take(19).collect()
}

fn run_stage(
    ctx: &Ctx<'_>,
    plan: &Plan,
    idx: usize,
    previous: Option<&BuildRecord>,
    prev_files: &cache::PrevFiles<'_>,
) -> Result<StageRun> {
    let sp = &plan.stages[idx];
    let host = Platform::host();
    let platform_text = format!("{}/{}", host.os, host.architecture);
    let fcv = if idx == 0 {
        ctx.opts.from_cache_version.as_deref()
    } else {
        None
    };
    let (mut state, base_desc) = match &sp.base {
        Base::Scratch => (
            StageState {
                layers: Vec::new(),
                history: Vec::new(),
                config: crate::plan::scratch_config(),
                author: None,
                platform: host.clone(),
                key: cache::base_key(&BaseInput::Scratch, fcv, &platform_text),
            },
            "scratch".to_string(),
        ),
        Base::Image(img) => {
            let mut config = img.config.config.clone().unwrap_or_default();
            config.on_build = None;
            let digest = img.descriptor.digest.to_string();
            (
                StageState {
                    layers: img.layers(),
                    history: img.config.history.clone().unwrap_or_default(),
                    config,
                    author: img.config.author.clone(),
                    platform: img.config.platform(),
                    key: cache::base_key(
                        &BaseInput::Image {
                            digest: digest.clone(),
                        },
                        fcv,
                        &platform_text,
                    ),
                },
                format!("{}@{}", img.name, short(&digest)),
            )
        }
        Base::Stage(j) => {
            let g = ctx.stages.lock_ok();
            let mut st = g.get(j).cloned().ok_or_else(|| Error::DependencyFailed {
                stage: plan.stages[*j].display_name(),
            })?;
            st.config.on_build = None;
            let desc = format!("stage {} {}", plan.stages[*j].display_name(), &st.key[..12]);
            st.key = cache::base_key(
                &BaseInput::Stage {
                    key: st.key.clone(),
                },
                fcv,
                &platform_text,
            );
            (st, desc)
        }
    };
    // Like BuildKit and buildah: an image whose base sets no PATH gets the default one.
    if !matches!(sp.base, Base::Stage(_)) {
        crate::plan::with_default_path(&mut state.config);
    }
    let prev_steps = previous.and_then(|p| p.stages.get(&sp.display_name()));
    let total = sp.steps.len();
    let mut out = StageRun {
        state: state.clone(),
        inputs: Vec::new(),
        run: 0,
        cached: 0,
        explanations: Vec::new(),
        fresh_files: Vec::new(),
        rebased_onto: None,
    };
    // A moved base: follow the last build where that gives what a rebuild would.
    let mut follow: Option<Box<Follow<'_>>> = None;
    let mut why_not: Option<String> = None;
    // Steps that missed the cache on the new base and were followed instead of run.
    let mut followed_misses = 0usize;
    let mut onto = None;
    if let Base::Image(img) = &sp.base {
        let base_text = format!(
            "{}@{}",
            repository_of(&img.name).unwrap_or_else(|_| img.name.clone()),
            img.descriptor.digest
        );
        let start = autorebase::start(
            ctx,
            &img.descriptor.digest,
            img.layers(),
            &sp.steps,
            prev_steps.map(Vec::as_slice),
            ctx.rebase_refusal.as_deref(),
            |old| {
                cache::base_key(
                    &BaseInput::Image {
                        digest: old.to_string(),
                    },
                    fcv,
                    &platform_text,
                )
            },
        )?;
        match start {
            Start::Unmoved => {}
            Start::Refused(why) => why_not = Some(why),
            Start::Follow(f) => {
                follow = Some(f);
                onto = Some(base_text);
            }
        }
    }
    let base_digest = match &sp.base {
        Base::Image(img) => Some(img.descriptor.digest.to_string()),
        _ => None,
    };
    // Docker: ENTRYPOINT clears only a CMD inherited from the base, not one set in this stage.
    let mut cmd_set_here = false;
    for (i, step) in sp.steps.iter().enumerate() {
        if strata_runtime::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        let step_ref = StepRef {
            image: if ctx.opts.name.is_some() {
                ctx.image_name.clone()
            } else {
                String::new()
            },
            stage: ctx.multi_stage.then(|| sp.display_name()),
            index: i + 1,
            total,
            text: step.text.clone(),
        };
        let wrap = |e: Error| e.at(&step.location.to_string(), &step.text);
        let mut inputs = StepInputs {
            text: step.text.clone(),
            instruction: String::from_utf8_lossy(&strata_oci::to_canonical_json(&step.kind))
                .to_string(),
            base: (i == 0).then(|| base_desc.clone()),
            base_digest: base_digest.clone().filter(|_| i == 0),
            from_cache_version: if i == 0 {
                fcv.map(str::to_string)
            } else {
                None
            },
            ..StepInputs::default()
        };
        let started = Instant::now();
        // What the step reads from the context, per file: made into the record's map only
        // when the step runs.
        let mut step_files = source::PerFile::new();
        let (key, hit) = match &step.kind {
            StepKind::Config(change) => {
                // WORKDIR also creates its directory (BuildKit's mkdir): a layer, keyed
                // apart from the config-only steps of earlier strata versions.
                let mkdir = matches!(change, crate::config::ConfigChange::Workdir { .. });
                let key =
                    cache::step_key(&state.key, &step.kind, None, mkdir.then_some(WORKDIR_MKDIR));
                let cmd_before = state.config.cmd.clone();
                change.apply(&mut state.config);
                match change {
                    crate::config::ConfigChange::Maintainer { author } => {
                        state.author = Some(author.clone());
                    }
                    crate::config::ConfigChange::Cmd { .. } => cmd_set_here = true,
                    crate::config::ConfigChange::Entrypoint { .. } if cmd_set_here => {
                        state.config.cmd = cmd_before;
                    }
                    _ => {}
                }
                if mkdir {
                    let dir = state.config.working_dir.clone().unwrap_or_default();
                    let layer = Layer {
                        index: i,
                        step,
                        key: &key,
                        step_ref: &step_ref,
                    };
                    let key_on =
                        |p: &str| cache::step_key(p, &step.kind, None, Some(WORKDIR_MKDIR));
                    let (hit, followed) = followed_or_made(
                        ctx,
                        &mut follow,
                        &mut why_not,
                        &layer,
                        key_on,
                        &mut state,
                        |st| {
                            let (layer, reads) = copy::workdir_step(ctx, st, &dir).map_err(wrap)?;
                            Ok((layer, Some(made_with(ctx, reads))))
                        },
                    )?;
                    followed_misses += usize::from(followed);
                    (key, hit || followed)
                } else {
                    state.history.push(History {
                        created: Some(ctx.created.clone()),
                        created_by: Some(step.text.clone()),
                        comment: Some("strata".to_string()),
                        empty_layer: Some(true),
                        ..History::default()
                    });
                    // Recorded like filesystem steps so a changed ENV/LABEL reads as a miss.
                    let hit = lookup(ctx, &key)?.is_some();
                    if !hit {
                        cache::put(ctx.store, &key, &CacheEntry::default())?;
                    }
                    let followed = match follow.as_mut() {
                        Some(f) => match f
                            .config_step(i, step, |p| cache::step_key(p, &step.kind, None, None))
                        {
                            None => true,
                            Some(why) => {
                                follow = None;
                                why_not = Some(why);
                                false
                            }
                        },
                        None => false,
                    };
                    if followed && !hit {
                        followed_misses += 1;
                    }
                    (key, hit || followed)
                }
            }
            StepKind::Copy(c) => {
                let mut prepared = copy::prepare(ctx, c).map_err(wrap)?;
                step_files = std::mem::take(&mut prepared.files);
                inputs.files_hash = prepared.files_hash.as_ref().map(|d| d.hex()[..16].into());
                let origin_key = stage_key_of(ctx, &c.from);
                let key = cache::step_key(
                    &state.key,
                    &step.kind,
                    prepared.files_hash.as_ref(),
                    origin_key.as_deref(),
                );
                let layer = Layer {
                    index: i,
                    step,
                    key: &key,
                    step_ref: &step_ref,
                };
                let files_hash = prepared.files_hash.clone();
                let key_on = |p: &str| {
                    cache::step_key(p, &step.kind, files_hash.as_ref(), origin_key.as_deref())
                };
                let (hit, followed) = followed_or_made(
                    ctx,
                    &mut follow,
                    &mut why_not,
                    &layer,
                    key_on,
                    &mut state,
                    |st| {
                        let (layer, reads) =
                            copy::copy_step(ctx, st, c, &mut prepared).map_err(wrap)?;
                        Ok((layer, Some(made_with(ctx, reads))))
                    },
                )?;
                followed_misses += usize::from(followed);
                (key, hit || followed)
            }
            StepKind::Run(r) => {
                inputs.args = r.args.clone();
                // Bind mounts read files: their content is an input like COPY's.
                let mut extra = Vec::new();
                let mut context_hashes = Vec::new();
                for m in &r.mounts {
                    if let RunMount::Bind { from, source, .. } = m {
                        match from {
                            FileSource::Context => {
                                let origin = Origin {
                                    root: &ctx.context,
                                    ignore: Some(&ctx.ignore),
                                    describe: "the build context".into(),
                                };
                                let matches =
                                    source::select(&origin, source, None).map_err(wrap)?;
                                let (h, files) =
                                    source::hash_matches(&matches, false, Some(&ctx.stat_cache))
                                        .map_err(wrap)?;
                                step_files.extend(files);
                                extra.push(h.to_string());
                                context_hashes.push(h.to_string());
                            }
                            other => {
                                if let Some(k) = stage_key_of(ctx, other) {
                                    extra.push(k);
                                }
                            }
                        }
                    }
                }
                let files_hash =
                    (!extra.is_empty()).then(|| Digest::sha256(extra.join("\n").as_bytes()));
                inputs.files_hash = (!context_hashes.is_empty()).then(|| {
                    Digest::sha256(context_hashes.join("\n").as_bytes()).hex()[..16].into()
                });
                let key = cache::step_key(&state.key, &step.kind, files_hash.as_ref(), None);
                if let Some(f) = follow.take() {
                    why_not = Some(f.run_step(step));
                }
                let found = lookup(ctx, &key)?;
                let hit =
                    cached_or_made(ctx, &key, found, &step_ref, &mut state, &step.text, |st| {
                        // A process may read anything: no `MadeWith`, never followed.
                        Ok((
                            run::run_step(ctx, st, step, r, &step_ref).map_err(wrap)?,
                            None,
                        ))
                    })?;
                (key, hit)
            }
        };
        state.key = key.clone();
        inputs.key = key;
        if hit {
            out.cached += 1;
            ctx.progress.event(&Event::StepCached { step: step_ref });
        } else {
            out.run += 1;
            let whole = step_files.is_whole();
            inputs.files = step_files.into_pairs().into_iter().collect();
            let prev = prev_steps.and_then(|p| p.get(i));
            // The last build's per-file hashes are kept apart from its record.
            let prev_with_files = prev
                .filter(|p| p.files.is_empty() && p.files_hash.is_some())
                .and_then(|p| {
                    prev_files.of(&p.key).map(|f| StepInputs {
                        files: f.clone(),
                        ..p.clone()
                    })
                });
            let mut prev = prev_with_files.as_ref().or(prev);
            // Files keyed from a known key (unchanged stats) have no per-file hashes here:
            // the last build's are theirs when its hash over all of them is the same;
            // otherwise the step is explained from that hash alone.
            let without_files;
            if !whole {
                match prev.filter(|p| !p.files.is_empty() && p.files_hash == inputs.files_hash) {
                    Some(p) => inputs.files = p.files.clone(),
                    None => {
                        inputs.files.clear();
                        without_files = prev.map(|p| StepInputs {
                            files: Default::default(),
                            ..p.clone()
                        });
                        prev = without_files.as_ref();
                    }
                }
            }
            let mut reason = cache::explain(prev, &inputs);
            if !inputs.files.is_empty() {
                out.fresh_files
                    .push((inputs.key.clone(), std::mem::take(&mut inputs.files)));
            }
            if let Some(why) = why_not.take() {
                // Past the first step, "an earlier step changed" hides the cause: the base.
                if i > 0
                    && let Some(old) = prev_steps
                        .and_then(|p| p.first())
                        .and_then(|s| s.base.as_ref())
                    && reason == cache::EARLIER_STEP_CHANGED
                {
                    reason = format!("base image changed {old}→{base_desc}");
                }
                reason = format!("{reason}; not rebased onto the new base: {why}");
            }
            if let Some(shared) = ctx.opts.shared_cache.as_ref().filter(|s| s.imports())
                && !ctx.opts.no_cache
            {
                reason = format!(
                    "{reason}; not in this store's cache nor in {}",
                    shared.reference()
                );
            }
            if ctx.opts.explain {
                ctx.progress.event(&Event::Explain {
                    step: step_ref.clone(),
                    reason: reason.clone(),
                });
            }
            out.explanations.push((step.text.clone(), reason));
            ctx.progress.event(&Event::StepDone {
                step: step_ref,
                duration: started.elapsed(),
            });
        }
        out.inputs.push(inputs);
    }
    out.state = state;
    if follow.is_some() && followed_misses > 0 {
        out.rebased_onto = onto;
    }
    Ok(out)
}

/// One COPY/ADD/WORKDIR step of a stage, for [`followed_or_made`].
struct Layer<'s> {
    index: usize,
    step: &'s Step,
    key: &'s str,
    step_ref: &'s StepRef,
}

/// What a layer step read and the time its files got, kept in its cache entry.
fn made_with(ctx: &Ctx<'_>, reads: crate::view::Reads) -> MadeWith {
    MadeWith {
        paths: reads.paths,
        files: reads.files,
        epoch: ctx.epoch,
    }
}

/// A layer step on a stage that may be following its moved base: the last build's layer
/// when [`Follow::layer_step`] says it is what the step would write (recorded under the new
/// key too), else the cache or `make`, as [`cached_or_made`]. Returns (cache hit, followed).
fn followed_or_made(
    ctx: &Ctx<'_>,
    follow: &mut Option<Box<Follow<'_>>>,
    why_not: &mut Option<String>,
    layer: &Layer<'_>,
    key_on: impl Fn(&str) -> String,
    state: &mut StageState,
    make: impl FnOnce(&StageState) -> Result<Made>,
) -> Result<(bool, bool)> {
    let found = lookup(ctx, layer.key)?;
    if let Some(f) = follow.as_mut() {
        match f.layer_step(ctx, layer.index, layer.step, key_on, found.as_ref())? {
            LayerStep::Reuse(entry) => {
                cache::put(ctx.store, layer.key, &entry)?;
                push_layer(ctx, state, &entry, &layer.step.text);
                return Ok((false, true));
            }
            LayerStep::Continue => {}
            LayerStep::Stop(why) => {
                *follow = None;
                *why_not = Some(why);
            }
        }
    }
    let hit = cached_or_made(
        ctx,
        layer.key,
        found,
        layer.step_ref,
        state,
        &layer.step.text,
        make,
    )?;
    Ok((hit, false))
}

/// A layer a step made, and what it read of the image below (`None`: unknown, for RUN).
type Made = (Option<(Descriptor, Digest)>, Option<MadeWith>);

/// The `--build-arg`s no `ARG` of the build declares (before the first FROM or in a stage
/// that is built), Docker's "not consumed" warning. The predefined proxy and platform
/// arguments never count.
fn unused_build_args(
    df: &Dockerfile,
    plan: &Plan,
    build_args: &BTreeMap<String, String>,
) -> Vec<String> {
    const PREDEFINED: &[&str] = &[
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "FTP_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
    ];
    let built = plan.order.iter().filter_map(|i| df.stages.get(*i));
    let declared: BTreeSet<&str> = df
        .meta_args
        .iter()
        .chain(built.flat_map(|s| s.instructions.iter()))
        .filter_map(|l| match &l.instruction {
            Instruction::Arg(decls) => Some(decls.iter().map(|d| d.name.as_str())),
            _ => None,
        })
        .flatten()
        .collect();
    build_args
        .keys()
        .filter(|k| {
            !declared.contains(k.as_str())
                && !PREDEFINED.contains(&k.to_ascii_uppercase().as_str())
                && !strata_dockerfile::BUILTIN_ARGS.contains(&k.as_str())
        })
        .cloned()
        .collect()
}

/// The `origin` part of a WORKDIR step's cache key: its entry holds the mkdir layer.
const WORKDIR_MKDIR: &str = "workdir-mkdir";

/// The final key of the stage a `--from` names (its content is identified by it).
fn stage_key_of(ctx: &Ctx<'_>, from: &FileSource) -> Option<String> {
    match from {
        FileSource::Stage { index } => {
            let g = ctx.stages.lock_ok();
            g.get(index).map(|s| s.key.clone())
        }
        _ => None,
    }
}

fn lookup(ctx: &Ctx<'_>, key: &str) -> Result<Option<CacheEntry>> {
    if let Some(shared) = &ctx.opts.shared_cache {
        shared.saw(key);
    }
    if ctx.opts.no_cache {
        return Ok(None);
    }
    match cache::get(ctx.store, key)? {
        Some(e) => Ok(Some(e)),
        None => match &ctx.opts.shared_cache {
            Some(shared) => shared.lookup(ctx.store, key),
            None => Ok(None),
        },
    }
}

/// The OCI base-image annotations of the image `plan` builds: the image its target stage
/// starts from (through earlier stages), so `strata rebase` knows the old base; none when it
/// starts from scratch.
fn base_annotations(plan: &Plan) -> Option<BTreeMap<String, String>> {
    let mut idx = plan.target;
    for _ in 0..=plan.stages.len() {
        match &plan.stages.get(idx)?.base {
            Base::Stage(j) => idx = *j,
            Base::Scratch => return None,
            Base::Image(img) => {
                let name = img.name.split('@').next().unwrap_or(&img.name);
                return Some(BTreeMap::from([
                    (crate::rebase::BASE_NAME.to_string(), name.to_string()),
                    (
                        crate::rebase::BASE_DIGEST.to_string(),
                        img.descriptor.digest.to_string(),
                    ),
                ]));
            }
        }
    }
    None
}

/// A filesystem step: its cache entry `found` for `key` when there is one, else the layer
/// `make` writes on top of `state` (announced as started, then cached); the layer (or an
/// empty history entry) is added to `state`. Returns whether it was a cache hit.
fn cached_or_made(
    ctx: &Ctx<'_>,
    key: &str,
    found: Option<CacheEntry>,
    step: &StepRef,
    state: &mut StageState,
    text: &str,
    make: impl FnOnce(&StageState) -> Result<Made>,
) -> Result<bool> {
    let (entry, hit) = match found {
        Some(e) => (e, true),
        None => {
            ctx.progress
                .event(&Event::StepStarted { step: step.clone() });
            let (layer, made_with) = make(state)?;
            if let Some((d, _)) = &layer {
                ctx.layer_bytes_written.fetch_add(d.size, Ordering::Relaxed);
            }
            let e = CacheEntry {
                layer: layer.as_ref().map(|l| l.0.clone()),
                diff_id: layer.map(|l| l.1),
                made_with,
            };
            cache::put(ctx.store, key, &e)?;
            (e, false)
        }
    };
    push_layer(ctx, state, &entry, text);
    Ok(hit)
}

fn push_layer(ctx: &Ctx<'_>, state: &mut StageState, entry: &CacheEntry, text: &str) {
    let empty = match (&entry.layer, &entry.diff_id) {
        (Some(d), Some(id)) => {
            state.layers.push(LayerRef {
                descriptor: d.clone(),
                diff_id: id.clone(),
            });
            false
        }
        _ => true,
    };
    state.history.push(History {
        created: Some(ctx.created.clone()),
        created_by: Some(text.to_string()),
        comment: Some("strata".to_string()),
        empty_layer: empty.then_some(true),
        ..History::default()
    });
}
