//! The front end: a parsed Dockerfile → stages of typed, fully expanded steps.
//!
//! Everything Dockerfile-specific (ARG/ENV scoping, SHELL wrapping, WORKDIR joins, ONBUILD
//! triggers, `--from` names) is resolved here; the executor only sees [`Step`]s.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use strata_dockerfile::{
    Dockerfile, Heredoc, Instruction, Located, MountType, Network, Security, Sharing,
    SourcesAndDest,
};
use strata_oci::{ContainerConfig, Descriptor, ImageConfig, Manifest, Platform};
use strata_rootfs::LayerRef;

use crate::config::{Command, ConfigChange, default_shell, resolve_workdir};
use crate::error::{Error, Result};

/// Where a step comes from, for messages: `file:line`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// The Dockerfile's name as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// An image found in the store, resolved to one platform.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The local name it was found under (`busybox:latest`), or `name@digest` when pinned.
    pub name: String,
    /// The manifest's descriptor.
    pub descriptor: Descriptor,
    /// The manifest.
    pub manifest: Manifest,
    /// The image config.
    pub config: ImageConfig,
}

impl ResolvedImage {
    /// The layers with their diff_ids, bottom first.
    pub fn layers(&self) -> Vec<LayerRef> {
        LayerRef::zip(&self.manifest.layers, self.config.diff_ids())
    }
}

/// Finds base images (and `--from` images) by name.
pub trait ImageResolver: Sync {
    /// The image `name` (as written in the Dockerfile, expanded), or `None` when unknown.
    fn resolve(&self, name: &str) -> Result<Option<ResolvedImage>>;
}

/// What a stage starts from.
#[derive(Debug, Clone)]
pub enum Base {
    /// `FROM scratch`.
    Scratch,
    /// An image from the store.
    Image(Box<ResolvedImage>),
    /// An earlier stage, by index.
    Stage(usize),
}

/// Where `COPY --from` / `--mount from=` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FileSource {
    /// The build context.
    Context,
    /// An earlier stage's result, by index.
    Stage { index: usize },
    /// An image (its manifest digest keys the cache).
    Image { name: String, digest: String },
}

/// `RUN --network`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// The host's network (the default).
    #[default]
    Host,
    /// A private network namespace with loopback only.
    None,
}

/// A typed `RUN --mount`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RunMount {
    /// A persistent directory shared between builds.
    Cache {
        target: String,
        id: String,
        sharing: CacheSharing,
        readonly: bool,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// A directory of the context or of a stage/image.
    Bind {
        target: String,
        from: FileSource,
        source: String,
        readonly: bool,
    },
    /// A tmpfs.
    Tmpfs { target: String, size: Option<u64> },
    /// A read-only file made from the Dockerfile itself: a `RUN <<EOF` script that starts
    /// with `#!`, executable at `/dev/pipes/NAME` (BuildKit's place for it).
    Inline {
        target: String,
        content: String,
        mode: u32,
    },
    /// A secret file; only its id is part of the step (never its content).
    Secret {
        id: String,
        target: String,
        required: bool,
        env: Option<String>,
        /// The mounted file's mode and owner (`mode=`, `uid=`, `gid=`; BuildKit's defaults
        /// 0400, 0, 0).
        #[serde(default = "secret_mode")]
        mode: u32,
        #[serde(default)]
        uid: u32,
        #[serde(default)]
        gid: u32,
    },
}

fn secret_mode() -> u32 {
    0o400
}

/// `sharing=` of a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheSharing {
    /// Concurrent users share one directory.
    Shared,
    /// Each build gets its own copy.
    Private,
    /// Users wait for each other (flock).
    Locked,
}

/// A `RUN` step, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStep {
    /// The process to run (shell form already wrapped in the `SHELL`).
    pub argv: Vec<String>,
    /// `KEY=VALUE` environment: the image's ENV plus the build ARGs in scope.
    pub env: Vec<String>,
    /// Build ARGs in scope (part of `env`), for explanations.
    pub args: BTreeMap<String, String>,
    /// `USER` as written (resolved against the image's /etc/passwd when run).
    pub user: String,
    /// Working directory (created if missing).
    pub workdir: String,
    /// `--network`.
    pub network: NetworkMode,
    /// `--mount`s.
    pub mounts: Vec<RunMount>,
}

/// One source of `COPY`/`ADD`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CopySource {
    /// A path or glob in the context, stage or image.
    Path { path: String },
    /// An http(s) URL (ADD only).
    Url { url: String },
    /// An inline file from a heredoc.
    Inline { name: String, content: String },
}

/// A `COPY` or `ADD` step, fully resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyStep {
    /// `ADD` (local tars are extracted, URLs fetched).
    pub add: bool,
    /// Where paths are read.
    pub from: FileSource,
    /// The sources in order.
    pub sources: Vec<CopySource>,
    /// Absolute destination, cleaned.
    pub dest: String,
    /// The destination names a directory (trailing `/`, `.`).
    pub dest_is_dir: bool,
    /// `--chown` as written (names resolved in the target image when run).
    pub chown: Option<String>,
    /// `--chmod`, octal.
    pub chmod: Option<u32>,
    /// `--link`.
    pub link: bool,
    /// `--parents`.
    pub parents: bool,
    /// `--exclude` patterns.
    pub exclude: Vec<String>,
    /// `ADD --checksum`.
    pub checksum: Option<String>,
    /// `ADD --unpack` (default: unpack local archives, not URLs).
    pub unpack: Option<bool>,
    /// `WORKDIR` in effect (already applied to `dest`; not part of the cache key).
    #[serde(skip)]
    pub workdir: String,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
pub enum StepKind {
    /// Run a command in a container; its changes are a layer.
    Run(RunStep),
    /// Write files into a layer without a container.
    Copy(CopyStep),
    /// Change the image config only.
    Config(ConfigChange),
}

/// One step of a stage.
#[derive(Debug, Clone)]
pub struct Step {
    /// Where it is written.
    pub location: Location,
    /// The instruction as written (for display and history).
    pub text: String,
    /// What it does.
    pub kind: StepKind,
}

/// One stage of the plan.
#[derive(Debug, Clone)]
pub struct StagePlan {
    /// Position in the Dockerfile.
    pub index: usize,
    /// `AS name`.
    pub name: Option<String>,
    /// What it starts from.
    pub base: Base,
    /// The `FROM` line's place.
    pub location: Location,
    /// The `FROM` line as written.
    pub from_text: String,
    /// Its steps (ONBUILD triggers of the base first).
    pub steps: Vec<Step>,
    /// Stages it reads (base, `COPY --from`, `--mount from=`).
    pub deps: BTreeSet<usize>,
    /// The config it ends with (static: config steps do not depend on execution).
    pub final_config: ContainerConfig,
}

impl StagePlan {
    /// The stage's display name: its name, or its index.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.index.to_string())
    }
}

/// A Dockerfile turned into stages of steps.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The Dockerfile's name.
    pub file: String,
    /// Every stage up to the target (stages after it are not planned).
    pub stages: Vec<StagePlan>,
    /// The target stage's index.
    pub target: usize,
    /// The stages the target needs, in an order where dependencies come first.
    pub order: Vec<usize>,
}

/// Inputs of [`plan`].
pub struct PlanOptions<'a> {
    /// `--build-arg`s (platform args are added when missing).
    pub build_args: &'a BTreeMap<String, String>,
    /// `--target` stage name.
    pub target: Option<&'a str>,
    /// Replaces the first stage's `FROM` image (strata.toml `from`).
    pub from_override: Option<&'a str>,
    /// Looks base images up.
    pub images: &'a dyn ImageResolver,
    /// The network of RUN steps that do not say (`docker build --network`; `RUN
    /// --network=default` takes it too).
    pub network: NetworkMode,
}

/// The build args with BuildKit's platform args for the host added when absent.
pub fn with_platform_args(args: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let mut out = args.clone();
    let host = Platform::host();
    let platform = match &host.variant {
        Some(v) => format!("{}/{}/{v}", host.os, host.architecture),
        None => format!("{}/{}", host.os, host.architecture),
    };
    for prefix in ["BUILD", "TARGET"] {
        out.entry(format!("{prefix}PLATFORM"))
            .or_insert_with(|| platform.clone());
        out.entry(format!("{prefix}OS"))
            .or_insert_with(|| host.os.clone());
        out.entry(format!("{prefix}ARCH"))
            .or_insert_with(|| host.architecture.clone());
        out.entry(format!("{prefix}VARIANT"))
            .or_insert_with(|| host.variant.clone().unwrap_or_default());
    }
    out
}

fn loc_of(df: &Dockerfile, l: &Located) -> Location {
    Location {
        file: df.file.clone(),
        line: l.span.start_line,
    }
}

/// Plans `df`: resolves bases, expands every instruction and types it.
pub fn plan(df: &Dockerfile, opts: &PlanOptions<'_>) -> Result<Plan> {
    if df.stages.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no FROM instruction; a Dockerfile must start with FROM",
            df.file
        )));
    }
    let target = match opts.target {
        Some(t) => df.stage(t).map(|s| s.index).ok_or_else(|| {
            let names: Vec<String> = df.stages.iter().filter_map(|s| s.name.clone()).collect();
            Error::Usage(format!(
                "target stage `{t}` not found in {}; stages: {}",
                df.file,
                if names.is_empty() {
                    "(none named)".to_string()
                } else {
                    names.join(", ")
                }
            ))
        })?,
        None => df.stages.len() - 1,
    };
    let args = with_platform_args(opts.build_args);
    let mut stages: Vec<StagePlan> = Vec::new();
    for idx in 0..=target {
        stages.push(plan_stage(df, idx, &args, opts, &stages)?);
    }
    // Stages the target needs, by walking dependencies.
    let mut needed = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(s) = todo.pop() {
        if needed.insert(s) {
            todo.extend(stages[s].deps.iter().copied());
        }
    }
    Ok(Plan {
        file: df.file.clone(),
        stages,
        target,
        order: needed.into_iter().collect(),
    })
}

/// Resolves `--from=name` of COPY or a mount: an earlier stage by name or index, else an image.
fn file_source(
    name: &str,
    current: usize,
    df: &Dockerfile,
    images: &dyn ImageResolver,
    location: &Location,
) -> Result<FileSource> {
    if let Ok(i) = name.parse::<usize>() {
        if i < current {
            return Ok(FileSource::Stage { index: i });
        }
        return Err(Error::Invalid {
            location: location.to_string(),
            message: format!("--from={i}: only earlier stages (0..{current}) can be used"),
        });
    }
    let lower = name.to_ascii_lowercase();
    if let Some(s) = df.stages[..current]
        .iter()
        .find(|s| s.name.as_deref() == Some(lower.as_str()))
    {
        return Ok(FileSource::Stage { index: s.index });
    }
    match images.resolve(name)? {
        Some(img) => Ok(FileSource::Image {
            name: img.name.clone(),
            digest: img.descriptor.digest.to_string(),
        }),
        None => Err(Error::BaseNotFound {
            location: location.to_string(),
            image: name.to_string(),
        }),
    }
}

fn plan_stage(
    df: &Dockerfile,
    idx: usize,
    args: &BTreeMap<String, String>,
    opts: &PlanOptions<'_>,
    earlier: &[StagePlan],
) -> Result<StagePlan> {
    let stage = &df.stages[idx];
    let location = loc_of(df, &stage.from);
    let mut from = df.expand_from(idx, args)?;
    if idx == 0
        && let Some(o) = opts.from_override
    {
        from.base = o.to_string();
    }
    if let Some(p) = &from.platform {
        let host = with_platform_args(&BTreeMap::new());
        if host.get("TARGETPLATFORM") != Some(p) {
            return Err(Error::Invalid {
                location: location.to_string(),
                message: format!(
                    "--platform={p}: only the host platform ({}) can be built",
                    host.get("TARGETPLATFORM")
                        .map(String::as_str)
                        .unwrap_or("?")
                ),
            });
        }
    }
    let mut deps = BTreeSet::new();
    let lower = from.base.to_ascii_lowercase();
    let earlier_stage = earlier
        .iter()
        .find(|s| s.name.as_deref() == Some(lower.as_str()));
    let (base, mut cfg) = if lower == "scratch" {
        (Base::Scratch, scratch_config())
    } else if let Some(s) = earlier_stage {
        deps.insert(s.index);
        (Base::Stage(s.index), s.final_config.clone())
    } else {
        // A failed pull has no place of its own: give it the FROM line.
        let found = opts
            .images
            .resolve(&from.base)
            .map_err(|e| e.at(&location.to_string(), stage.from.original.trim()))?;
        match found {
            Some(img) => {
                let cfg = img.config.config.clone().unwrap_or_default();
                (Base::Image(Box::new(img)), cfg)
            }
            None => {
                return Err(Error::BaseNotFound {
                    location: location.to_string(),
                    image: from.base.clone(),
                });
            }
        }
    };
    // BuildKit: a stage whose base image (or scratch) sets no PATH gets the default one at
    // FROM, so `$PATH` expands to it, every RUN sees it and the final config records it.
    if !matches!(base, Base::Stage(_)) {
        with_default_path(&mut cfg);
    }
    // Docker runs the base's triggers once and does not pass them on.
    let triggers = cfg.on_build.take().unwrap_or_default();
    let base_env = cfg.env.clone().unwrap_or_default();
    let mut scope = df.stage_scope(idx, args)?.with_base_env(&base_env);

    let mut trigger_dfs = Vec::new();
    for t in &triggers {
        let text = format!("FROM scratch\n{t}\n");
        let tdf = Dockerfile::parse(&format!("{} (ONBUILD of the base)", df.file), &text)?;
        trigger_dfs.push(tdf);
    }
    let mut items: Vec<(&Dockerfile, &Located, Location)> = Vec::new();
    for tdf in &trigger_dfs {
        for l in tdf.stages.iter().flat_map(|s| s.instructions.iter()) {
            items.push((tdf, l, location.clone()));
        }
    }
    for l in &stage.instructions {
        items.push((df, l, loc_of(df, l)));
    }

    let mut steps = Vec::new();
    // ARGs declared after the last ENV of the same name: in a RUN's environment their value
    // wins over the ENV's (BuildKit applies ENV and ARG to the RUN state in order), while the
    // image config and expansion keep the ENV value.
    let mut args_over_env: BTreeSet<String> = BTreeSet::new();
    for (file, l, loc) in items {
        let text = l.original.trim().to_string();
        let invalid = |message: String| Error::Invalid {
            location: loc.to_string(),
            message,
        };
        let expanded = scope.apply(file, l)?;
        match &expanded {
            Instruction::Arg(decls) => args_over_env.extend(decls.iter().map(|d| d.name.clone())),
            Instruction::Env(kvs) => {
                for kv in kvs {
                    args_over_env.remove(&kv.key);
                }
            }
            _ => {}
        }
        let kind = match &expanded {
            Instruction::Arg(_) => continue,
            Instruction::From(_) => return Err(invalid("FROM inside a stage".into())),
            Instruction::Run(run) => {
                if run.security == Some(Security::Insecure) {
                    return Err(invalid("RUN --security=insecure is not supported".into()));
                }
                let shell = cfg.shell.clone().unwrap_or_else(default_shell);
                let mut inline_mounts = Vec::new();
                let argv = match (&run.command, run.heredocs.as_slice()) {
                    (c, []) => Command::from(c).argv(&shell),
                    // `RUN <<EOF` with the script as the whole command: the shell runs
                    // the body (BuildKit does the same for a script without `#!`).
                    (strata_dockerfile::CommandLine::Shell(s), [h])
                        if s.trim()
                            .trim_start_matches("<<-")
                            .trim_start_matches("<<")
                            .trim_matches(['"', '\''])
                            == h.name =>
                    {
                        if h.content.starts_with("#!") {
                            // BuildKit: a script with its own interpreter line is a file of
                            // its own, run directly.
                            let target = format!("/dev/pipes/{}", h.name);
                            inline_mounts.push(RunMount::Inline {
                                target: target.clone(),
                                content: h.content.clone(),
                                mode: 0o755,
                            });
                            vec![target]
                        } else {
                            let mut v = shell.clone();
                            v.push(h.content.clone());
                            v
                        }
                    }
                    // Any other use (`cat <<EOF > f`, `<<A sh && <<B sh`, several
                    // heredocs): like BuildKit, the bodies go back after the command line,
                    // each closed by its delimiter, and the shell reads them as heredocs.
                    (strata_dockerfile::CommandLine::Shell(s), docs) => {
                        let mut full = s.clone();
                        for h in docs {
                            full.push('\n');
                            full.push_str(&h.content);
                            full.push_str(&h.name);
                        }
                        Command::Shell(full).argv(&shell)
                    }
                    (strata_dockerfile::CommandLine::Exec(_), _) => {
                        return Err(invalid(
                            "RUN with here-documents needs the shell form (not a JSON array)"
                                .into(),
                        ));
                    }
                };
                let mut env = cfg.env.clone().unwrap_or_default();
                let mut index = crate::config::env_index(&env);
                let mut run_args = BTreeMap::new();
                for (k, v) in scope.args() {
                    run_args.insert(k.clone(), v.clone());
                    match index.get(k.as_str()) {
                        None => {
                            index.insert(k.clone(), env.len());
                            env.push(format!("{k}={v}"));
                        }
                        Some(&i) if args_over_env.contains(k) => env[i] = format!("{k}={v}"),
                        Some(_) => {}
                    }
                }
                if !env.iter().any(|e| e.starts_with("PATH=")) {
                    env.push(format!("PATH={DEFAULT_PATH}"));
                }
                let workdir = cfg.working_dir.clone().unwrap_or_else(|| "/".to_string());
                let mut mounts = inline_mounts;
                for m in &run.mounts {
                    mounts.push(
                        run_mount(m, idx, df, opts.images, &loc, &workdir, &mut deps)
                            .map_err(|e| e.at(&loc.to_string(), &text))?,
                    );
                }
                StepKind::Run(RunStep {
                    argv,
                    env,
                    args: run_args,
                    user: cfg.user.clone().unwrap_or_default(),
                    workdir,
                    network: match run.network {
                        Some(Network::None) => NetworkMode::None,
                        Some(Network::Host) => NetworkMode::Host,
                        Some(Network::Default) | None => opts.network,
                    },
                    mounts,
                })
            }
            Instruction::Copy(c) => {
                let from = match &c.from {
                    Some(f) => file_source(f, idx, df, opts.images, &loc)
                        .map_err(|e| e.at(&loc.to_string(), &text))?,
                    None => FileSource::Context,
                };
                if let FileSource::Stage { index } = from {
                    deps.insert(index);
                }
                StepKind::Copy(copy_step(
                    &c.files,
                    false,
                    from,
                    CopyFlags {
                        chown: c.chown.clone(),
                        chmod: c.chmod.clone(),
                        link: c.link,
                        parents: c.parents,
                        exclude: c.exclude.clone(),
                        checksum: None,
                        unpack: None,
                    },
                    &cfg,
                    &loc,
                )?)
            }
            Instruction::Add(a) => StepKind::Copy(copy_step(
                &a.files,
                true,
                FileSource::Context,
                CopyFlags {
                    chown: a.chown.clone(),
                    chmod: a.chmod.clone(),
                    link: a.link,
                    parents: false,
                    exclude: a.exclude.clone(),
                    checksum: a.checksum.clone(),
                    unpack: a.unpack,
                },
                &cfg,
                &loc,
            )?),
            other => match ConfigChange::from_instruction(other, &l.original) {
                Some(change) => {
                    change.apply(&mut cfg);
                    StepKind::Config(change)
                }
                None => return Err(invalid(format!("{} cannot be built", other.keyword()))),
            },
        };
        steps.push(Step {
            location: loc,
            text,
            kind,
        });
    }
    Ok(StagePlan {
        index: idx,
        name: stage.name.clone(),
        base,
        location,
        from_text: stage.from.original.trim().to_string(),
        steps,
        deps,
        final_config: cfg,
    })
}

/// Docker's default `PATH` for RUN when the image sets none.
/// One value with the runtime's (`PATH=` + this), which machines get.
pub const DEFAULT_PATH: &str = strata_runtime::spec::DEFAULT_PATH.split_at("PATH=".len()).1;

/// The config a `FROM scratch` stage starts from: BuildKit's empty image has WorkingDir `/`
/// (and the default PATH, added with every other base's).
pub(crate) fn scratch_config() -> ContainerConfig {
    ContainerConfig {
        working_dir: Some("/".to_string()),
        ..ContainerConfig::default()
    }
}

/// Appends `PATH=`[`DEFAULT_PATH`] to `cfg`'s Env when it has no PATH (BuildKit's
/// dockerfile2llb does this for every stage that does not start from another stage).
pub(crate) fn with_default_path(cfg: &mut ContainerConfig) {
    let env = cfg.env.get_or_insert_with(Vec::new);
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
}

struct CopyFlags {
    chown: Option<String>,
    chmod: Option<String>,
    link: bool,
    parents: bool,
    exclude: Vec<String>,
    checksum: Option<String>,
    unpack: Option<bool>,
}

fn copy_step(
    files: &SourcesAndDest,
    add: bool,
    from: FileSource,
    flags: CopyFlags,
    cfg: &ContainerConfig,
    loc: &Location,
) -> Result<CopyStep> {
    let invalid = |message: String| Error::Invalid {
        location: loc.to_string(),
        message,
    };
    let mut sources = Vec::new();
    for s in &files.sources {
        if s.starts_with("http://") || s.starts_with("https://") {
            if !add {
                return Err(invalid(format!(
                    "COPY cannot fetch URLs (`{s}`); hint: use ADD"
                )));
            }
            sources.push(CopySource::Url { url: s.clone() });
        } else if s.starts_with("git@") || s.ends_with(".git") && s.contains("://") {
            return Err(invalid(format!(
                "ADD of git repositories is not supported (`{s}`)"
            )));
        } else {
            sources.push(CopySource::Path { path: s.clone() });
        }
    }
    for Heredoc { name, content, .. } in &files.heredocs {
        sources.push(CopySource::Inline {
            name: name.clone(),
            content: content.clone(),
        });
    }
    if sources.is_empty() {
        return Err(invalid("COPY needs at least one source".into()));
    }
    let workdir = cfg.working_dir.clone().unwrap_or_else(|| "/".to_string());
    let raw = files.dest.as_str();
    let dest_is_dir = raw.ends_with('/') || raw == "." || raw.ends_with("/.") || raw == "..";
    let dest = resolve_workdir(Some(&workdir), raw);
    if sources.len() > 1 && !dest_is_dir {
        return Err(invalid(
            "when using COPY with more than one source file, the destination must be a directory and end with a /"
                .into(),
        ));
    }
    let chmod = match flags.chmod {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(&m, 8)
                .ok()
                .filter(|v| *v <= 0o7777)
                .ok_or_else(|| {
                    invalid(format!(
                        "--chmod={m}: only octal modes (e.g. 0755) are supported"
                    ))
                })?,
        ),
    };
    Ok(CopyStep {
        add,
        from,
        sources,
        dest,
        dest_is_dir,
        chown: flags.chown.filter(|c| !c.is_empty()),
        chmod,
        link: flags.link,
        parents: flags.parents,
        exclude: flags.exclude,
        checksum: flags.checksum,
        unpack: flags.unpack,
        workdir,
    })
}

fn run_mount(
    m: &strata_dockerfile::Mount,
    idx: usize,
    df: &Dockerfile,
    images: &dyn ImageResolver,
    loc: &Location,
    workdir: &str,
    deps: &mut BTreeSet<usize>,
) -> Result<RunMount> {
    let invalid = |message: String| Error::Invalid {
        location: loc.to_string(),
        message,
    };
    let target = m
        .target
        .as_deref()
        .map(|t| resolve_workdir(Some(workdir), t));
    Ok(match m.kind {
        MountType::Cache => {
            let target = target.ok_or_else(|| invalid("cache mount needs a target".into()))?;
            if m.from.is_some() {
                return Err(invalid("cache mounts with from= are not supported".into()));
            }
            RunMount::Cache {
                id: m.id.clone().unwrap_or_else(|| target.clone()),
                target,
                sharing: match m.sharing {
                    Some(Sharing::Private) => CacheSharing::Private,
                    Some(Sharing::Locked) => CacheSharing::Locked,
                    _ => CacheSharing::Shared,
                },
                readonly: m.readonly,
                mode: m.mode.unwrap_or(0o755),
                uid: m.uid.unwrap_or(0),
                gid: m.gid.unwrap_or(0),
            }
        }
        MountType::Bind => {
            let target = target.ok_or_else(|| invalid("bind mount needs a target".into()))?;
            let from = match &m.from {
                Some(f) => file_source(f, idx, df, images, loc)?,
                None => FileSource::Context,
            };
            if let FileSource::Stage { index } = from {
                deps.insert(index);
            }
            RunMount::Bind {
                target,
                from,
                source: m.source.clone().unwrap_or_else(|| ".".to_string()),
                readonly: m.readonly,
            }
        }
        MountType::Tmpfs => RunMount::Tmpfs {
            target: target.ok_or_else(|| invalid("tmpfs mount needs a target".into()))?,
            size: m.size,
        },
        MountType::Secret => {
            let id =
                m.id.clone()
                    .or_else(|| {
                        m.target
                            .as_deref()
                            .and_then(|t| t.rsplit('/').next())
                            .map(str::to_string)
                    })
                    .ok_or_else(|| invalid("secret mount needs an id".into()))?;
            RunMount::Secret {
                target: match (&m.target, &m.env) {
                    (Some(_), _) => target.unwrap_or_default(),
                    (None, Some(_)) => String::new(),
                    (None, None) => format!("/run/secrets/{id}"),
                },
                id,
                required: m.required,
                env: m.env.clone(),
                mode: m.mode.unwrap_or_else(secret_mode),
                uid: m.uid.unwrap_or(0),
                gid: m.gid.unwrap_or(0),
            }
        }
        MountType::Ssh => return Err(invalid("RUN --mount=type=ssh is not supported".into())),
    })
}
