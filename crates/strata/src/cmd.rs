//! One function per command; each prints results on stdout and returns errors with context.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::json;
use strata_oci::{ContainerConfig, Digest, ImageConfig, media_type, printable};
use strata_store::Store;
use strata_transfer::{ArchiveFormat, ImportOptions, local_name};

use crate::cli::{self, AppsCommand, Cli, Command};

/// Run the command `cli` asks for.
pub fn run(cli: Cli) -> Result<()> {
    let store = || -> Result<Store> {
        let root = strata_store::default_root(cli.store.clone())?;
        Store::open(&root).with_context(|| format!("cannot open the store at `{}`", root.display()))
    };
    match cli.command {
        Command::Images(args) => images(&store()?, &args),
        Command::Inspect(args) => inspect(&store()?, &args),
        Command::Tag { source, target } => tag(&store()?, &source, &target),
        Command::Rmi { images, force } => rmi(&store()?, &images, force),
        Command::Gc { dry_run } => gc(&store()?, dry_run),
        Command::Import(args) => import(&store()?, &args),
        Command::Save(args) => save(&store()?, &args),
        Command::Load(args) => load(&store()?, &args),
        Command::Build(args) => crate::build::build(&store()?, &args),
        Command::Update { images, project } => crate::build::update(&store()?, &images, &project),
        Command::Login(args) => crate::registry::login(&args),
        Command::Pull(args) if args.is_from_host() => crate::hosts::pull(&store()?, &args),
        Command::Pull(args) => crate::registry::pull(&store()?, &args),
        Command::Push(args) if args.is_to_hosts() => crate::hosts::push(&store()?, &args),
        Command::Push(args) => crate::registry::push(&store()?, &args),
        Command::Serve(_) => crate::hosts::serve(&store()?),
        Command::Relay(args) => crate::hosts::relay(&store()?, &args),
        Command::Registry(command) => crate::registry::registry(cli.store.clone(), command),
        Command::Validate { image } => validate(&store()?, &image),
        Command::Unpack { image, dir } => unpack(&store()?, &image, &dir),
        Command::Machine {
            host: Some(host),
            project,
            ..
        }
        | Command::Apps {
            host: Some(host),
            project,
            ..
        } => crate::hosts::run_there(
            &cli::HostArg {
                host: Some(host),
                project,
            },
            &crate::hosts::argv_for_host(),
        ),
        Command::Machine { command, .. } => crate::deploy::machine(store()?, command),
        Command::Agent(args) => crate::deploy::agent(store()?, &args),
        Command::Deploy(args) => crate::deploy::deploy(store()?, &args),
        Command::Dev(args) => crate::dev::dev(store()?.root(), &args),
        Command::DevApply { app, spec } => crate::dev::dev_apply(store()?.root(), &app, &spec),
        Command::Releases(args) if args.on.host.is_some() => {
            crate::hosts::run_there(&args.on, &crate::hosts::argv_for_host())
        }
        Command::Releases(args) => crate::deploy::releases(store()?, &args),
        Command::Ui(args) => crate::registry::ui(store()?, &args),
        Command::Status { on, .. } if on.host.is_some() => {
            crate::hosts::run_there(&on, &crate::hosts::argv_for_host())
        }
        Command::Status { app, .. } => crate::deploy::status(store()?, app.as_deref()),
        Command::Apps {
            command: AppsCommand::Destroy { app, volumes },
            ..
        } => crate::deploy::apps_destroy(store()?, &app, volumes),
        Command::Apps {
            command: AppsCommand::List { json },
            ..
        } => crate::deploy::apps_list(store()?, json),
        Command::Run(args) => crate::deploy::run(store()?, &args),
        Command::Logs { on, .. } if on.host.is_some() => {
            crate::hosts::run_there(&on, &crate::hosts::argv_for_host())
        }
        Command::Logs {
            app, follow, tail, ..
        } => crate::deploy::app_logs(store()?, &app, follow, tail),
        Command::Ps {
            app, quiet: true, ..
        } => crate::deploy::machine_ids(store()?, app.as_deref()),
        Command::Ps { app, json, .. } => {
            crate::deploy::machine(store()?, cli::MachineCommand::List { app, json })
        }
        Command::Exec(args) => crate::deploy::machine(store()?, cli::MachineCommand::Exec(args)),
        Command::Start(ids) => crate::deploy::machine(store()?, cli::MachineCommand::Start(ids)),
        Command::Stop(ids) => crate::deploy::machine(store()?, cli::MachineCommand::Stop(ids)),
        Command::Restart(ids) => {
            crate::deploy::machine(store()?, cli::MachineCommand::Restart(ids))
        }
        Command::Rm { ids, force } => crate::deploy::rm(store()?, &ids, force),
        Command::Kill { ids, signal } => crate::deploy::kill(store()?, &ids, &signal),
        Command::Cp {
            src,
            dest,
            follow_link,
            ..
        } => crate::cp::cp(
            &crate::deploy::host(store()?)?,
            &src,
            &dest,
            &crate::cp::Options { follow_link },
        ),
        Command::History { image, json } => history(&store()?, &image, json),
        Command::Rebase {
            all: true,
            onto,
            push,
            insecure,
            progress,
            ..
        } => crate::rebase::rebase_all(&store()?, &onto, push, insecure, progress),
        Command::Rebase {
            image,
            onto,
            old_base,
            tag,
            push,
            insecure,
            progress,
            ..
        } => crate::rebase::rebase(
            &store()?,
            &crate::rebase::One {
                image: image.as_deref().unwrap_or_default(),
                onto: &onto,
                old_base: old_base.as_deref(),
                tag: tag.as_deref(),
                push,
                insecure,
            },
            progress,
        ),
        Command::Version => {
            println!("strata {}", version());
            Ok(())
        }
    }
}

/// This binary's version and commit: `0.1.0 (commit 0123456789ab)`. Hosts over SSH compare
/// it to decide whether to install this binary there.
pub fn version() -> String {
    format!(
        "{} (commit {})",
        env!("CARGO_PKG_VERSION"),
        env!("STRATA_COMMIT")
    )
}

/// `strata history IMAGE`: the config's history, newest first, with each step's layer size
/// (`docker history`).
fn history(store: &Store, image: &str, json: bool) -> Result<()> {
    let name = local_name(image)?;
    let img = store
        .image(&name)
        .with_context(|| format!("no image named `{name}`\nhint: `strata images` lists them"))?;
    let config = strata_oci::ImageConfig::from_slice(&img.config_bytes)?;
    let mut layers = img.manifest.layers.iter();
    let mut rows = Vec::new();
    for h in config.history.clone().unwrap_or_default() {
        let size = if h.is_empty_layer() {
            0
        } else {
            layers.next().map_or(0, |l| l.size)
        };
        rows.push((h, size));
    }
    if !json {
        println!("{:<22}  {:>10}  CREATED BY", "CREATED", "SIZE");
    }
    for (h, size) in rows.iter().rev() {
        let created = h.created.clone().unwrap_or_default();
        let by = h.created_by.clone().unwrap_or_default();
        if json {
            let v = serde_json::json!({
                "created": created, "created_by": by, "size": size,
                "empty_layer": h.is_empty_layer(), "comment": h.comment,
            });
            println!("{v}");
        } else {
            let by: String = by.chars().filter(|c| !c.is_control()).take(90).collect();
            println!(
                "{:<22}  {:>10}  {by}",
                printable(&created),
                human_size(*size)
            );
        }
    }
    Ok(())
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.3}{}", UNITS[u])
            .trim_end_matches('0')
            .replace(".kB", "kB")
            .replace(".MB", "MB")
            .replace(".GB", "GB")
            .replace(".TB", "TB")
    }
}

fn images(store: &Store, args: &cli::ImagesArgs) -> Result<()> {
    let mut rows = Vec::new();
    for (name, desc) in store.list_refs()? {
        let (repo, tag) = match name.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
            _ => (name.clone(), String::new()),
        };
        let (created, size) = match store.image(&name) {
            Ok(img) => {
                let created = ImageConfig::from_slice(&img.config_bytes)
                    .ok()
                    .and_then(|c| c.created)
                    .unwrap_or_default();
                let size = img.manifest.config.size
                    + img.manifest.layers.iter().map(|l| l.size).sum::<u64>();
                (created, size)
            }
            Err(e) => {
                tracing::warn!("image `{name}`: {e}");
                (String::new(), 0)
            }
        };
        rows.push((name, repo, tag, desc, created, size));
    }
    let mut out = io::stdout().lock();
    if args.quiet {
        for (name, ..) in &rows {
            writeln!(out, "{}", printable(name))?;
        }
        return Ok(());
    }
    if args.json {
        for (name, repo, tag, desc, created, size) in &rows {
            let line = json!({
                "name": name, "repository": repo, "tag": tag,
                "digest": desc.digest.to_string(), "mediaType": desc.media_type,
                "created": created, "size": size,
            });
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    let mut table = vec![["REPOSITORY", "TAG", "DIGEST", "CREATED", "SIZE"].map(String::from)];
    // Names, tags and dates came with images (a pull, a load): shown with control
    // characters escaped.
    for (_, repo, tag, desc, created, size) in &rows {
        table.push([
            printable(repo).into_owned(),
            printable(tag).into_owned(),
            desc.digest.short().to_string(),
            printable(created).into_owned(),
            human_size(*size),
        ]);
    }
    write_table(&mut out, &table, &[4])?;
    Ok(())
}

/// `rows` as aligned columns, as Docker prints its tables: each column as wide as its widest
/// cell, three spaces apart; the columns in `right` aligned right (sizes).
fn write_table<const N: usize>(
    out: &mut dyn Write,
    rows: &[[String; N]],
    right: &[usize],
) -> io::Result<()> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = " ".repeat(widths[i] - cell.chars().count());
            if i > 0 {
                line.push_str("   ");
            }
            if right.contains(&i) {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < N {
                    line.push_str(&pad);
                }
            }
        }
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn inspect(store: &Store, args: &cli::InspectArgs) -> Result<()> {
    let name = local_name(&args.image)?;
    let img = store
        .image(&name)
        .with_context(|| format!("cannot inspect `{name}`"))?;
    let config: serde_json::Value =
        serde_json::from_slice(&img.config_bytes).context("the image config is not JSON")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&img.manifest_bytes).context("the manifest is not JSON")?;
    let mut out = io::stdout().lock();
    if args.json {
        let doc = json!({
            "name": name,
            "descriptor": img.descriptor,
            "index": img.index,
            "manifest": manifest,
            "config": config,
        });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
        return Ok(());
    }
    // Everything below came with the image (a registry, an archive): control characters
    // are escaped so that it cannot drive the terminal. `--json` escapes them as JSON does.
    let cfg = ImageConfig::from_slice(&img.config_bytes)?;
    writeln!(out, "Name:       {}", printable(&name))?;
    writeln!(out, "Digest:     {}", img.descriptor.digest)?;
    writeln!(out, "MediaType:  {}", printable(&img.descriptor.media_type))?;
    if let Some(index) = &img.index {
        writeln!(out, "Index:      {}", index.digest)?;
    }
    writeln!(
        out,
        "Platform:   {}",
        printable(&cfg.platform().to_string())
    )?;
    if let Some(c) = &cfg.created {
        writeln!(out, "Created:    {}", printable(c))?;
    }
    writeln!(out, "Config:     {}", img.manifest.config.digest)?;
    let c = cfg.config.clone().unwrap_or_default();
    let show = |v: &Option<Vec<String>>| {
        v.as_ref()
            .map(|v| serde_json::to_string(v).unwrap_or_default())
    };
    for (k, v) in [
        ("Entrypoint", show(&c.entrypoint)),
        ("Cmd", show(&c.cmd)),
        ("WorkingDir", c.working_dir.clone()),
        ("User", c.user.clone()),
        (
            "Expose",
            c.exposed_ports
                .as_ref()
                .filter(|p| !p.is_empty())
                .map(|p| p.keys().cloned().collect::<Vec<_>>().join(" ")),
        ),
        ("StopSignal", c.stop_signal.clone()),
    ] {
        if let Some(v) = v {
            writeln!(out, "{:<11} {}", format!("{k}:"), printable(&v))?;
        }
    }
    for e in c.env.iter().flatten() {
        writeln!(out, "Env:        {}", printable(e))?;
    }
    for (k, v) in c.labels.iter().flatten() {
        writeln!(out, "Label:      {}={}", printable(k), printable(v))?;
    }
    writeln!(out, "Layers:")?;
    for (l, diff_id) in img.manifest.layers.iter().zip(cfg.diff_ids()) {
        writeln!(
            out,
            "  {}  {:>10}  {}  (diff_id {})",
            l.digest,
            human_size(l.size),
            printable(&l.media_type),
            diff_id.short()
        )?;
    }
    Ok(())
}

fn tag(store: &Store, source: &str, target: &str) -> Result<()> {
    let source = local_name(source)?;
    let target = local_name(target)?;
    let desc = store
        .find_ref(&source)?
        .with_context(|| format!("no image named `{source}`\nhint: `strata images` lists them"))?;
    store.set_ref(&target, desc)?;
    Ok(())
}

fn rmi(store: &Store, images: &[String], force: bool) -> Result<()> {
    let mut failed = 0;
    for image in images {
        let name = local_name(image)?;
        if let Some(desc) = store.remove_ref(&name)? {
            println!("Untagged: {name} ({})", desc.digest);
            continue;
        }
        // An image named by its digest or the start of it (`docker rmi ID`): its names go.
        let desc = match store.find_ref(image) {
            Ok(Some(desc)) => desc,
            Ok(None) => {
                eprintln!("error: no image named `{name}`");
                failed += 1;
                continue;
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
                continue;
            }
        };
        let names: Vec<String> = store
            .list_refs()?
            .into_iter()
            .filter(|(_, d)| d.digest == desc.digest)
            .map(|(n, _)| n)
            .collect();
        if names.len() > 1 && !force {
            eprintln!(
                "error: `{image}` is the image named {}: remove names one by one, or give -f \
                 to remove them all",
                names.join(", ")
            );
            failed += 1;
            continue;
        }
        for n in names {
            store.remove_ref(&n)?;
            println!("Untagged: {n} ({})", desc.digest);
        }
    }
    if failed > 0 {
        bail!("{failed} of {} images not found", images.len());
    }
    Ok(())
}

fn gc(store: &Store, dry_run: bool) -> Result<()> {
    // RUN containers, overlay mounts and bundles of killed builds (their owner is gone).
    if !dry_run {
        let cleaned = strata_runtime::cleanup_stale_in(&store.root().join("strata/runtime"))
            .context("cannot clean up what killed builds left")?;
        for id in &cleaned {
            println!("removed the leftovers of killed build container {id}");
        }
    }
    let report = store.gc(dry_run)?;
    let verb = if dry_run { "would delete" } else { "deleted" };
    for (digest, size) in &report.removed {
        println!("{verb} {digest} ({})", human_size(*size));
    }
    for chain in &report.snapshots_removed {
        println!("{verb} snapshot {}", chain.short());
    }
    if report.partials_removed > 0 {
        println!(
            "{verb} {} abandoned partial transfer(s) ({})",
            report.partials_removed,
            human_size(report.partial_bytes_freed)
        );
    }
    println!(
        "{} {} blobs, {} freed; {} kept; {} snapshot(s) of layer chains no image has",
        if dry_run { "Would delete" } else { "Deleted" },
        report.removed.len(),
        human_size(report.bytes_freed),
        report.kept,
        report.snapshots_removed.len()
    );
    Ok(())
}

fn import(store: &Store, args: &cli::ImportArgs) -> Result<()> {
    let mut config = ContainerConfig::default();
    strata_build::apply_changes(&mut config, &args.changes)?;
    let compression = args.compression.into();
    let opts = ImportOptions {
        compression,
        config,
        message: args.message.clone(),
        created: created_time(),
        source: args.tarball.display().to_string(),
    };
    let input: Box<dyn Read> = if args.tarball == Path::new("-") {
        Box::new(io::stdin().lock())
    } else {
        Box::new(
            File::open(&args.tarball)
                .with_context(|| format!("cannot open `{}`", args.tarball.display()))?,
        )
    };
    let before = store.get_ref(&local_name(&args.name)?)?;
    let imported = strata_transfer::import_tarball(store, input, &args.name, &opts)
        .with_context(|| format!("cannot import `{}`", args.tarball.display()))?;
    unpack_or_unname(store, &imported.name, before)?;
    eprintln!(
        "Imported {} ({} layer, {})",
        imported.name,
        imported.layer.digest.short(),
        human_size(imported.layer.size)
    );
    println!("{}", imported.descriptor.digest);
    Ok(())
}

/// Now, or `SOURCE_DATE_EPOCH` when set, so imports can be reproducible.
fn created_time() -> std::time::SystemTime {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
        .unwrap_or_else(std::time::SystemTime::now)
}

fn save(store: &Store, args: &cli::SaveArgs) -> Result<()> {
    let format = match args.format {
        cli::ArchiveFormat::Docker => ArchiveFormat::Docker,
        cli::ArchiveFormat::Oci => ArchiveFormat::Oci,
    };
    match args.output.as_deref().filter(|p| p.as_os_str() != "-") {
        Some(path) => strata_transfer::save_archive(store, &args.images, format, path)
            .with_context(|| format!("cannot save to `{}`", path.display()))?,
        None => {
            use std::io::{IsTerminal, Write};
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                bail!(
                    "refusing to write an archive to a terminal\n\
                     hint: give a file with `-o FILE`, or redirect: `strata save IMAGE > FILE`"
                );
            }
            let out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            strata_transfer::write_archive(store, &args.images, format, out)
                .context("cannot save to stdout")?
                .flush()
                .context("cannot save to stdout")?;
        }
    }
    Ok(())
}

fn load(store: &Store, args: &cli::LoadArgs) -> Result<()> {
    let Some(path) = args.input.as_ref().or(args.file.as_ref()) else {
        bail!("which archive? give it as `strata load -i FILE`");
    };
    let loaded = strata_transfer::load_archive(store, path)
        .with_context(|| format!("cannot load `{}`", path.display()))?;
    for image in loaded {
        match image.name {
            Some(name) => println!("Loaded image: {}", printable(&name)),
            None => println!("Loaded image ID: {}", image.descriptor.digest),
        }
    }
    Ok(())
}

fn validate(store: &Store, image: &str) -> Result<()> {
    let name = local_name(image)?;
    let desc = match image.parse::<Digest>() {
        Ok(d) => {
            let size = store.blob_size(&d)?;
            strata_oci::Descriptor::new(media_type::OCI_MANIFEST, d, size)
        }
        Err(_) => store
            .find_ref(&name)?
            .with_context(|| format!("no image named `{name}`"))?,
    };
    let report = strata_oci::validate_image(store, &desc)
        .with_context(|| format!("image `{name}` is damaged"))?;
    println!(
        "{name}: ok ({} manifests, {} configs, {} layers, {} diff_ids, {} bytes checked)",
        report.manifests, report.configs, report.layers, report.diff_ids, report.bytes
    );
    Ok(())
}

/// An image's layers with their diff_ids, checked to pair up.
fn layers_of(store: &Store, name: &str) -> Result<Vec<strata_rootfs::LayerRef>> {
    let img = store.image(name)?;
    let config = ImageConfig::from_slice(&img.config_bytes)?;
    if config.diff_ids().len() != img.manifest.layers.len() {
        bail!(
            "image `{name}`: the config lists {} diff_ids for {} layers",
            config.diff_ids().len(),
            img.manifest.layers.len()
        );
    }
    Ok(strata_rootfs::LayerRef::zip(
        &img.manifest.layers,
        config.diff_ids(),
    ))
}

/// [`unpack_snapshots`] of an image `import` or `pull` just named; when the unpack fails (a
/// hostile layer, a full disk) the name goes back to what it was (`before`), so a failed
/// command leaves no image that no machine or build could use.
pub(crate) fn unpack_or_unname(
    store: &Store,
    name: &str,
    before: Option<strata_oci::Descriptor>,
) -> Result<()> {
    let Err(err) = unpack_snapshots(store, name) else {
        return Ok(());
    };
    let restored = match before {
        Some(desc) => store.set_ref(name, desc).map(|_| ()),
        None => store.remove_ref(name).map(|_| ()),
    };
    if let Err(e) = restored {
        return Err(err.context(format!("and `{name}` could not be unnamed: {e}")));
    }
    Err(err.context(format!("`{name}` is left as it was before")))
}

/// Unpacks an image's layers into the store's snapshot cache (those not there yet), as
/// `docker pull` and `buildah pull` do: the first build step or machine on this image then
/// mounts them at once.
pub(crate) fn unpack_snapshots(store: &Store, name: &str) -> Result<()> {
    let layers = layers_of(store, name)?;
    let cache = strata_rootfs::SnapshotCache::new(store.snapshots_dir())?;
    cache
        .ensure(&layers, |d| {
            store.open_descriptor(d).map_err(io::Error::other)
        })
        .with_context(|| format!("cannot unpack `{name}` into the snapshot cache"))?;
    Ok(())
}

fn unpack(store: &Store, image: &str, dir: &Path) -> Result<()> {
    let name = local_name(image)?;
    let layers = layers_of(store, &name).with_context(|| format!("cannot unpack `{name}`"))?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "`{}` is not empty\nhint: unpack into a new directory",
            dir.display()
        );
    }
    let stats = strata_rootfs::materialize(
        &layers,
        |d| store.open_descriptor(d).map_err(io::Error::other),
        dir,
    )
    .with_context(|| format!("cannot unpack `{name}` into `{}`", dir.display()))?;
    eprintln!(
        "Unpacked {name}: {} layers into {}",
        stats.len(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_as_wide_as_their_widest_cells() {
        let rows = [
            ["REPOSITORY", "TAG", "SIZE"].map(String::from),
            ["app", "strata-0123456789abcdef", "1.2MB"].map(String::from),
            ["a-much-longer-name", "latest", "12kB"].map(String::from),
        ];
        let mut out = Vec::new();
        write_table(&mut out, &rows, &[2]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "REPOSITORY           TAG                        SIZE\n\
             app                  strata-0123456789abcdef   1.2MB\n\
             a-much-longer-name   latest                     12kB\n"
        );
    }
}
