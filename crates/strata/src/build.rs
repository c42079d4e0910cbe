//! `strata build` and `strata update`: flags → the build engine's options, outcome → stdout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use std::sync::Arc;

use strata_build::shared_cache::SharedCache;
use strata_build::{BuildOptions, BuildOutcome, NetworkMode, Project, ProjectOptions};
use strata_oci::Compression;
use strata_store::Store;
use strata_transfer::cache::RegistryCache;

use crate::cli::{BuildArgs, CompressionArg, NetworkArg};
use crate::output::{Note, Output};

impl From<CompressionArg> for Compression {
    fn from(c: CompressionArg) -> Compression {
        match c {
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::None => Compression::None,
        }
    }
}

fn parse_build_args(raw: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in raw {
        match a.split_once('=') {
            Some((k, v)) => out.insert(k.to_string(), v.to_string()),
            // Docker: `--build-arg KEY` takes the value from the environment, if set.
            None => match std::env::var(a) {
                Ok(v) => out.insert(a.clone(), v),
                Err(_) => continue,
            },
        };
    }
    Ok(out)
}

/// `--label KEY=VALUE`; a bare `KEY` is an empty label, as in Docker.
fn parse_labels(raw: &[String]) -> BTreeMap<String, String> {
    raw.iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect()
}

/// `--iidfile`: the digest, written whole or not at all, through a FIFO or device, never
/// replacing one (as `save -o` writes).
fn write_iidfile(path: &Path, digest: &str) -> Result<()> {
    strata_transfer::write_output(path, ".strata-iid-", |f| -> Result<()> {
        std::io::Write::write_all(f, digest.as_bytes())?;
        Ok(())
    })
    .with_context(|| format!("--iidfile `{}`", path.display()))
}

fn parse_secrets(raw: &[String]) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for s in raw {
        let (mut id, mut src) = (None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
                _ => bail!("--secret `{s}`: expected `id=ID,src=PATH`"),
            }
        }
        let (Some(id), Some(src)) = (id, src) else {
            bail!("--secret `{s}`: expected `id=ID,src=PATH`");
        };
        if !src.is_file() {
            bail!("--secret `{s}`: `{}` is not a file", src.display());
        }
        out.insert(id, src);
    }
    Ok(out)
}

fn check_platform(platform: Option<&str>) -> Result<()> {
    let Some(p) = platform else { return Ok(()) };
    let host = strata_oci::Platform::host();
    let want = format!("{}/{}", host.os, host.architecture);
    if p != want && p != host.to_string() {
        bail!("--platform {p}: strata builds for the host platform only ({want}) for now");
    }
    Ok(())
}

/// Dockerfile mode when `-f`/`-t` is given or the one argument is a directory.
fn dockerfile_mode(args: &BuildArgs) -> bool {
    args.file.is_some()
        || !args.tags.is_empty()
        || args.args == ["-"]
        || (args.args.len() == 1 && Path::new(&args.args[0]).is_dir())
}

/// A Dockerfile read from stdin (`-f -`, or `-` as the context), as `docker build` takes it.
/// A tar archive there (Docker's other `-`) is refused with what to do instead.
fn dockerfile_from_stdin() -> Result<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::io::stdin()
        .read_to_end(&mut bytes)
        .context("cannot read the Dockerfile from stdin")?;
    let compressed = [
        &[0x1f, 0x8b][..],
        b"BZh",
        &[0xfd, b'7', b'z', b'X', b'Z', 0],
        &[0x28, 0xb5, 0x2f, 0xfd],
    ]
    .iter()
    .any(|magic| bytes.starts_with(magic));
    if compressed || bytes.get(257..262) == Some(b"ustar") {
        bail!(
            "stdin holds an archive: strata takes a Dockerfile there, not a build context; \
             unpack it (`mkdir ctx && tar -xf FILE -C ctx`) and build the directory"
        );
    }
    String::from_utf8(bytes).context("the Dockerfile on stdin is not UTF-8 text")
}

/// The context of `strata build -`: none, as `docker build - < Dockerfile` has (an empty
/// directory of the store's, made once; COPY then finds nothing to copy).
fn empty_context(store: &Store) -> Result<PathBuf> {
    let dir = store.root().join("strata/empty-context");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make `{}`", dir.display()))?;
    Ok(dir)
}

pub fn build(store: &Store, args: &BuildArgs) -> Result<()> {
    check_platform(args.platform.as_deref())?;
    // Its events also go to a journal the dashboard's Builds page reads (docs/ui.md).
    let shown = if args.quiet {
        // `docker build -q`: the result only; an error still goes to stderr.
        Output::to(crate::output::Mode::Plain, std::io::sink())
    } else {
        Output::new(args.progress)
    };
    let progress = shown.journaled(store.root(), "build");
    progress.finish_journal(build_to(store, args, &progress))
}

fn build_to(store: &Store, args: &BuildArgs, progress: &Output) -> Result<()> {
    let secrets = parse_secrets(&args.secrets)?;
    if dockerfile_mode(args) {
        let from_stdin = args.file.as_deref() == Some(Path::new("-"));
        let (context, dockerfile_text) = match args.args.as_slice() {
            [c] if c == "-" && args.file.is_some() => bail!(
                "with `-` as the context, the Dockerfile is what stdin holds: -f is not taken"
            ),
            [c] if c == "-" => (empty_context(store)?, Some(dockerfile_from_stdin()?)),
            [c] => (
                PathBuf::from(c),
                from_stdin.then(dockerfile_from_stdin).transpose()?,
            ),
            [] => bail!("which build context? e.g. `strata build -t NAME .`"),
            more => bail!("one build context expected, got {}: {more:?}", more.len()),
        };
        let mut opts = BuildOptions::new(&context);
        opts.dockerfile = args.file.clone().filter(|_| !from_stdin);
        opts.dockerfile_text = dockerfile_text;
        opts.build_args = parse_build_args(&args.build_args)?;
        opts.target = args.target.clone();
        opts.tags = args.tags.clone();
        opts.no_cache = args.no_cache;
        opts.explain = args.explain;
        opts.secrets = secrets;
        opts.deployment_tag = args.deployment_tag;
        opts.compression = args.compression.into();
        opts.shared_cache = shared_cache(args, None, &[])?;
        opts.labels = parse_labels(&args.labels);
        opts.pull_always = args.pull;
        opts.network = match args.network {
            NetworkArg::Default | NetworkArg::Host => NetworkMode::Host,
            NetworkArg::None => NetworkMode::None,
        };
        let outcome = strata_build::build(store, &opts, progress)
            .with_context(|| format!("build of `{}` failed", args.args[0]))?;
        export_cache(store, opts.shared_cache.as_deref(), progress)?;
        let digest = outcome.descriptor.digest.to_string();
        if let Some(path) = &args.iidfile {
            write_iidfile(path, &digest)?;
        }
        if args.quiet {
            println!("{digest}");
            return Ok(());
        }
        // Every name the image got (`-t` names, its content tag, a deployment tag), once
        // each, then its digest.
        let mut names: Vec<&String> = outcome.tags.iter().collect();
        names.extend(&outcome.deployment_tag);
        if !names.contains(&&outcome.content_tag) {
            names.push(&outcome.content_tag);
        }
        let mut seen = std::collections::HashSet::new();
        for t in names.into_iter().filter(|t| seen.insert(*t)) {
            println!("{t}");
        }
        println!("{}", outcome.descriptor.digest);
        return Ok(());
    }
    if !args.build_args.is_empty() || args.target.is_some() {
        bail!(
            "--build-arg and --target apply to one Dockerfile\n\
             hint: set `build_args` and `target` per image in strata.toml, or use `strata build -f FILE -t NAME DIR`"
        );
    }
    if args.quiet || args.iidfile.is_some() || !args.labels.is_empty() || args.pull {
        bail!(
            "-q, --iidfile, --label and --pull apply to one Dockerfile (a project builds several images)\n\
             hint: set `labels` per image in strata.toml; each built image's digest is printed; `strata update` moves the bases strata.lock holds; or use `strata build -f FILE -t NAME DIR`"
        );
    }
    if args.network != NetworkArg::Default {
        bail!(
            "--network applies to one Dockerfile\n\
             hint: write `RUN --network=none` in the Dockerfile, or use `strata build -f FILE -t NAME DIR`"
        );
    }
    let project = Project::load(&args.project)?;
    let opts = ProjectOptions {
        no_cache: args.no_cache,
        explain: args.explain,
        deployment_tag: args.deployment_tag,
        secrets,
        compression: Some(args.compression.into()),
        shared_cache: shared_cache(
            args,
            project.cache.registry.as_deref(),
            &project.cache.mounts,
        )?,
        ..ProjectOptions::default()
    };
    let built = project.build(store, &args.args, &opts, progress)?;
    export_cache(store, opts.shared_cache.as_deref(), progress)?;
    for name in &built.order {
        let o = &built.images[name];
        println!(
            "{name}\t{}\t{}\t{} ({} run, {} cached)",
            o.content_tag,
            o.descriptor.digest,
            status(o),
            o.steps_run,
            o.steps_cached
        );
    }
    for (base, digest) in &built.locked {
        eprintln!("Locked {base} at {digest} in strata.lock");
    }
    Ok(())
}

/// The build cache in a registry: `--cache-from`/`--cache-to`, else strata.toml's
/// `[cache] registry` (`project_registry`), read and written.
fn shared_cache(
    args: &BuildArgs,
    project_registry: Option<&str>,
    project_mounts: &[String],
) -> Result<Option<Arc<SharedCache>>> {
    let open = |reference: &str| -> Result<RegistryCache> {
        let parsed = strata_oci::Reference::parse(reference)
            .with_context(|| format!("build cache `{reference}`"))?;
        Ok(RegistryCache::open(
            &parsed,
            crate::registry::client_options(false)?,
        )?)
    };
    let (from, to) = match (args.cache_from.as_slice(), &args.cache_to, project_registry) {
        ([], None, None) => return Ok(None),
        ([], None, Some(r)) => (vec![r.to_string()], Some(r.to_string())),
        (from, to, _) => (from.to_vec(), to.clone()),
    };
    let mut mounts = project_mounts.to_vec();
    mounts.extend(args.cache_mounts.iter().cloned());
    Ok(Some(Arc::new(
        SharedCache::with_sources(
            from.iter().map(|r| open(r)).collect::<Result<Vec<_>>>()?,
            to.as_deref().map(open).transpose()?,
        )
        .sharing_mounts(mounts),
    )))
}

/// Writes the build's cache entries to the registry cache, if it is written to, and says what
/// the cache did.
pub(crate) fn export_cache(store: &Store, cache: Option<&SharedCache>, out: &Output) -> Result<()> {
    let Some(cache) = cache else { return Ok(()) };
    let stats = cache.stats();
    let started = std::time::Instant::now();
    let exported = cache.export(store).with_context(|| {
        format!(
            "cannot export the build cache to {}",
            cache.export_reference().unwrap_or_default()
        )
    })?;
    out.note(&Note::Info {
        message: format!(
            "build cache {}: {} step(s) found there ({} fetched){}{}{}",
            cache.reference(),
            stats.hits,
            crate::cmd::human_size(stats.bytes_fetched),
            if stats.mounts_fetched > 0 {
                format!(
                    ", {} cache mount(s) fetched ({})",
                    stats.mounts_fetched,
                    crate::cmd::human_size(stats.mount_bytes)
                )
            } else {
                String::new()
            },
            if stats.gone > 0 {
                format!(", {} whose layer was gone", stats.gone)
            } else {
                String::new()
            },
            match (exported, cache.export_reference()) {
                (Some(n), Some(to)) if to != cache.reference() => format!(
                    "; {n} entries exported to {to} in {:.2} s",
                    started.elapsed().as_secs_f64()
                ),
                (Some(n), _) => format!(
                    "; {n} entries exported in {:.2} s",
                    started.elapsed().as_secs_f64()
                ),
                _ => String::new(),
            }
        ),
    });
    Ok(())
}

/// `built`, `rebased onto base@sha256:…` or `unchanged`.
fn status(o: &BuildOutcome) -> String {
    match &o.rebased_onto {
        Some(onto) => format!("rebased onto {onto}"),
        None if o.steps_run == 0 => "unchanged".into(),
        None => "built".into(),
    }
}

pub fn update(store: &Store, images: &[String], project: &Path) -> Result<()> {
    let project = Project::load(project)?;
    let updates = project.update(store, images)?;
    if updates.is_empty() {
        println!("strata.lock is up to date");
    }
    for u in updates {
        println!(
            "{}: {} -> {} (affects {})",
            u.base,
            u.old.as_deref().unwrap_or("unlocked"),
            u.new,
            if u.affected.is_empty() {
                "nothing".to_string()
            } else {
                u.affected.join(", ")
            }
        );
    }
    Ok(())
}

/// Builds what `image` needs for `strata deploy`: the project's image of that name (and the
/// images it depends on, if they changed). An image the project does not declare is taken
/// from the store as it is. Returns the local reference to deploy.
pub fn build_for_deploy(
    store: &Store,
    project_path: &Path,
    image: &str,
    used_from: Option<&str>,
    out: &Output,
) -> Result<String> {
    let project = Project::load(project_path)?;
    if !project.images.iter().any(|i| i.name == image) {
        store.image(image).with_context(|| {
            format!("`{image}` is neither an image of the project nor in the store")
        })?;
        return Ok(image.to_string());
    }
    let out = out.journaled(store.root(), "deploy");
    out.finish_journal(build_project_image(store, &project, image, used_from, &out))
}

/// [`build_for_deploy`] of an image the project declares.
fn build_project_image(
    store: &Store,
    project: &Project,
    image: &str,
    used_from: Option<&str>,
    out: &Output,
) -> Result<String> {
    // strata.toml's `[cache] registry`, read and written, as `strata build` does.
    let shared = match &project.cache.registry {
        Some(r) => {
            let parsed =
                strata_oci::Reference::parse(r).with_context(|| format!("build cache `{r}`"))?;
            let client = crate::registry::client_options(false)?;
            let from = RegistryCache::open(&parsed, client.clone())?;
            let to = RegistryCache::open(&parsed, client)?;
            Some(Arc::new(
                SharedCache::new(Some(from), Some(to)).sharing_mounts(project.cache.mounts.clone()),
            ))
        }
        None => None,
    };
    // An image used only from the registry the cache is in gets its cached layers mounted
    // there by the push, not fetched here.
    let remote_layers = match (used_from, &project.cache.registry) {
        (Some(used), Some(cache)) => {
            let host = |r: &str| {
                strata_oci::Reference::parse(r)
                    .ok()
                    .and_then(|r| r.registry().map(str::to_string))
            };
            let used = host(used);
            used.is_some() && used == host(cache)
        }
        _ => false,
    };
    let opts = ProjectOptions {
        shared_cache: shared.clone(),
        remote_layers,
        ..ProjectOptions::default()
    };
    let built = project.build(store, &[image.to_string()], &opts, out)?;
    export_cache(store, shared.as_deref(), out)?;
    for name in &built.order {
        let o = &built.images[name];
        // In JSON the build's own `image_done` events say this.
        out.text(&format!(
            "{name}: {} ({} run, {} cached)",
            status(o),
            o.steps_run,
            o.steps_cached
        ));
    }
    let outcome = built
        .images
        .get(image)
        .with_context(|| format!("the build did not produce `{image}`"))?;
    Ok(outcome.content_tag.clone())
}
