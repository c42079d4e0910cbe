//! `strata rebase`: an image moved onto a new base without rebuilding it (docs/rebase.md),
//! in the store, in the store and then pushed, or in a registry that alone holds the image.

use anyhow::{Context, Result, bail};
use strata_oci::{Digest, Reference};
use strata_store::Store;
use strata_transfer::{PullOptions, PushOptions, local_name};

use crate::cli::ProgressArg;
use crate::output::Output;

/// `strata rebase IMAGE --onto BASE [--push]`.
pub struct One<'a> {
    pub image: &'a str,
    pub onto: &'a str,
    pub old_base: Option<&'a str>,
    pub tag: Option<&'a str>,
    pub push: bool,
    pub insecure: bool,
}

/// `strata rebase IMAGE --onto BASE`: see [`strata_build::rebase`]. With `--push`, the result
/// goes to the registry its name (or `-t`) names; an image the store lacks is rebased in its
/// registry, from its manifest and config alone ([`rebase_in_registry`]).
pub fn rebase(store: &Store, args: &One<'_>, progress: ProgressArg) -> Result<()> {
    let dest = if args.push {
        let name = args.tag.unwrap_or(args.image);
        let named = Reference::parse_local(name)
            .with_context(|| format!("`{name}` is not an image name"))?;
        if named.registry().is_none() {
            bail!(
                "--push sends the result to the registry its name names, and `{name}` names \
                 none\nhint: name the result with -t REGISTRY/REPOSITORY:TAG"
            );
        }
        Some(Reference::parse(&named.familiar())?)
    } else {
        None
    };
    let Some(dest) = dest else {
        rebase_in_store(store, args)?;
        return Ok(());
    };
    let out = Output::new(progress);
    if store.find_ref(&local_name(args.image)?)?.is_none() {
        return rebase_in_registry(store, args, &dest, &out);
    }
    let target = rebase_in_store(store, args)?;
    let report = crate::registry::push_ref(store, &target, &dest, args.insecure, &out)
        .with_context(|| format!("cannot push `{target}` to `{dest}`"))?;
    out.note(&crate::registry::pushed_note(&report));
    Ok(())
}

/// The local rebase; returns the name the result got.
fn rebase_in_store(store: &Store, args: &One<'_>) -> Result<String> {
    let (image, onto, old_base, tag) = (args.image, args.onto, args.old_base, args.tag);
    let load = |what: &str, name: &str| -> Result<(String, strata_store::Image)> {
        let local = local_name(name)?;
        let img = store
            .image(&local)
            .with_context(|| format!("no {what} `{local}` in the store"))?;
        Ok((local, img))
    };
    let (name, img) = load("image", image)?;
    let (_, old) = match old_base {
        Some(b) => load("old base", b)?,
        None => {
            let recorded = strata_build::rebase::recorded_base(&img).with_context(|| {
                format!(
                    "`{name}` records no base image\nhint: name the base it was built on with \
                     --old-base"
                )
            })?;
            load("old base", &recorded.to_string())?
        }
    };
    let (new_name, new) = load("new base", onto)?;
    let rebased = strata_build::rebase::rebase(store, &name, &img, &old, &new_name, &new)?;
    strata_oci::validate_image(store, &rebased.descriptor)
        .context("the rebased image does not validate")?;
    let target = match tag {
        Some(t) => local_name(t)?,
        None if image.parse::<Digest>().is_err() && !image.contains('@') => name.clone(),
        None => bail!("a digest names no image to move: give the result a name with -t"),
    };
    store.set_ref(&target, rebased.descriptor.clone())?;
    eprintln!(
        "Rebased {name} onto {new_name} as {target}: {} base layer(s), {} own layer(s) kept, no \
         layer written",
        rebased.base_layers, rebased.own_layers
    );
    println!("{}", rebased.descriptor.digest);
    Ok(target)
}

/// `strata rebase REGISTRY/REPO:TAG --onto BASE --push` for an image the store lacks: its
/// manifest and config are read from the registry (never a layer), the old base (the one it
/// records, or `--old-base`) and the new one are read from the store or, when it lacks them,
/// from their registry the same way; the new config and manifest are pushed to `dest`, the
/// image's own layers stay where they are, and the new base's layers are mounted (or pushed
/// from the store) only where `dest` lacks them. Nothing is stored or named locally.
fn rebase_in_registry(store: &Store, args: &One<'_>, dest: &Reference, out: &Output) -> Result<()> {
    let name = local_name(args.image)?;
    let src = Reference::parse_local(&name)?;
    if src.registry().is_none() {
        bail!("no image `{name}` in the store\nhint: `strata images` lists them");
    }
    let src = src.to_remote();
    let pull = PullOptions {
        client: crate::registry::client_options(args.insecure)?,
        ..PullOptions::default()
    };
    let image = strata_transfer::fetch_image(&src, &pull)
        .with_context(|| format!("no image `{name}` in the store, nor readable in its registry"))?;
    // Where what the manifest names is (registry, repository): mounts come from those on
    // dest's registry.
    let mut mount_from = vec![remote_repository(&src)];
    let old = match args.old_base {
        Some(b) => base_image(store, "old base", b, &pull, &mut mount_from)?.1,
        None => {
            let digest = strata_build::rebase::recorded_base(&image).with_context(|| {
                format!(
                    "`{name}` records no base image\nhint: name the base it was built on with \
                     --old-base"
                )
            })?;
            match store.find_ref(&digest.to_string())? {
                Some(_) => store.image(&digest.to_string())?,
                None => {
                    let recorded = image
                        .manifest
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(strata_build::rebase::BASE_NAME))
                        .with_context(|| {
                            format!(
                                "`{name}` records its base by digest only ({digest}), and the \
                                 store lacks it\nhint: name the base with --old-base"
                            )
                        })?;
                    let pinned = format!("{}@{digest}", without_tag(recorded)?);
                    base_image(store, "old base", &pinned, &pull, &mut mount_from)?.1
                }
            }
        }
    };
    let (new_name, new) = base_image(store, "new base", args.onto, &pull, &mut mount_from)?;
    let rebased = strata_build::rebase::rebased(&name, &image, &old, &new_name, &new)?;
    let mut same_registry: Vec<String> = Vec::new();
    for (registry, repo) in mount_from {
        if Some(registry.as_str()) == dest.registry()
            && repo != dest.repository()
            && !same_registry.contains(&repo)
        {
            same_registry.push(repo);
        }
    }
    let push = PushOptions {
        client: pull.client.clone(),
        mount_from: same_registry,
        progress: Some(out.blob_progress("pushed")),
        ..PushOptions::default()
    };
    let report = strata_transfer::push_parts(store, &rebased.parts, dest, &push)
        .with_context(|| format!("cannot push the rebased `{name}` to `{dest}`"))?;
    out.note(&crate::registry::pushed_note(&report));
    eprintln!(
        "Rebased {name} onto {new_name} in its registry as {dest}: {} base layer(s), {} own \
         layer(s) kept; no layer downloaded, only a config and a manifest written",
        rebased.base_layers, rebased.own_layers
    );
    println!("{}", rebased.descriptor.digest);
    Ok(())
}

/// The registry and repository of a remote reference.
fn remote_repository(r: &Reference) -> (String, String) {
    (
        r.registry().unwrap_or_default().to_string(),
        r.repository().to_string(),
    )
}

/// `name` without its tag or digest (`r/app:1` → `r/app`).
fn without_tag(name: &str) -> Result<String> {
    Ok(Reference::parse_local(name)?.name())
}

/// A base image by name: from the store, else (when the name has a registry host) its
/// manifest and config from the registry, whose repository then joins `mount_from`. Returns
/// its local name (what the rebased image records) and the image.
fn base_image(
    store: &Store,
    what: &str,
    name: &str,
    pull: &PullOptions,
    mount_from: &mut Vec<(String, String)>,
) -> Result<(String, strata_store::Image)> {
    let local = local_name(name)?;
    if store.find_ref(&local)?.is_some() {
        return Ok((local.clone(), store.image(&local)?));
    }
    let r = Reference::parse_local(&local)?;
    if r.registry().is_none() {
        bail!(
            "no {what} `{local}` in the store\nhint: pull it, or name it with its registry \
             (REGISTRY/REPOSITORY:TAG)"
        );
    }
    let image = strata_transfer::fetch_image(&r, pull).with_context(|| {
        format!("no {what} `{local}` in the store, nor readable in its registry")
    })?;
    mount_from.push(remote_repository(&r));
    Ok((local, image))
}

/// `strata rebase --all --onto BASE [--push]`: every image of the store whose recorded base
/// is another image of BASE's repository, moved onto BASE in one pass (one `index.json` write);
/// with `--push`, each one that names a registry pushed back (config and manifest only).
pub fn rebase_all(
    store: &Store,
    onto: &str,
    push: bool,
    insecure: bool,
    progress: ProgressArg,
) -> Result<()> {
    let new_name = local_name(onto)?;
    let new = store
        .image(&new_name)
        .with_context(|| format!("no new base `{new_name}` in the store"))?;
    let repository = |name: &str| {
        strata_oci::Reference::parse_local(name)
            .map(|r| (r.registry().map(str::to_string), r.repository().to_string()))
            .ok()
    };
    let want = repository(&new_name);
    let (mut moved, mut current, mut refused) = (Vec::new(), 0usize, Vec::new());
    for (name, _) in store.list_refs()? {
        // A content tag (`app:strata-<key>`) names what a build made from its inputs: it
        // keeps naming that build.
        let content_tag = strata_oci::Reference::parse_local(&name)
            .is_ok_and(|r| r.tag().is_some_and(|t| t.starts_with("strata-")));
        if content_tag {
            continue;
        }
        let Ok(img) = store.image(&name) else {
            continue;
        };
        let recorded_name = img
            .manifest
            .annotations
            .as_ref()
            .and_then(|a| a.get(strata_build::rebase::BASE_NAME));
        let Some(old_digest) = strata_build::rebase::recorded_base(&img) else {
            continue;
        };
        if recorded_name.and_then(|n| repository(n)) != want || name == new_name {
            continue;
        }
        if old_digest == new.descriptor.digest {
            current += 1;
            continue;
        }
        let result = store
            .image(&old_digest.to_string())
            .with_context(|| format!("its old base {old_digest} is not in the store"))
            .and_then(|old| {
                Ok(strata_build::rebase::rebase(
                    store, &name, &img, &old, &new_name, &new,
                )?)
            });
        match result {
            Ok(r) => moved.push((name, r)),
            Err(e) => refused.push(format!("{name}: {e:#}")),
        }
    }
    store.set_refs(
        moved
            .iter()
            .map(|(n, r)| (n.clone(), r.descriptor.clone()))
            .collect(),
    )?;
    for (name, r) in &moved {
        println!("{name}\t{}", r.descriptor.digest);
    }
    eprintln!(
        "Rebased {} image(s) onto {new_name}, no layer written; {current} already on it{}",
        moved.len(),
        if refused.is_empty() {
            String::new()
        } else {
            format!("; {} refused", refused.len())
        }
    );
    let mut failed = refused;
    if push {
        let out = crate::output::Output::new(progress);
        for (name, _) in &moved {
            // Only names with a registry host: a local name (`app:1`) stays local.
            let names_registry =
                strata_oci::Reference::parse_local(name).is_ok_and(|r| r.registry().is_some());
            let Ok(dest) = strata_oci::Reference::parse(name) else {
                continue;
            };
            if !names_registry {
                continue;
            }
            match crate::registry::push_ref(store, name, &dest, insecure, &out) {
                Ok(report) => out.note(&crate::registry::pushed_note(&report)),
                Err(e) => failed.push(format!("{name}: cannot push to `{dest}`: {e:#}")),
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} image(s) not rebased or not pushed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(())
}
