//! Hosts over SSH: `strata push|pull … ssh://…` / `--host`, and `strata serve --stdio`, the
//! other end of them (see docs/hosts.md and [`strata_transfer::ssh`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use strata_store::Store;
use strata_transfer::ssh::{ConnectOptions, HostSession, ServeOptions, SshHost};

use crate::cli::{PullArgs, PushArgs};
use crate::cmd::human_size;

/// At most this many hosts receive at once.
const HOST_PARALLELISM: usize = 8;

impl PushArgs {
    /// Whether this push goes to hosts over SSH rather than a registry.
    pub fn is_to_hosts(&self) -> bool {
        !self.hosts.is_empty()
            || self
                .dest
                .as_deref()
                .is_some_and(|d| d.starts_with("ssh://"))
    }
}

impl PullArgs {
    /// Whether this pull comes from a host over SSH rather than a registry.
    pub fn is_from_host(&self) -> bool {
        self.host.is_some() || self.image.starts_with("ssh://")
    }
}

/// `strata serve --stdio`: one client's session on this store. Images it names are unpacked
/// into the snapshot cache as `strata pull` does, and unnamed again if that fails.
pub fn serve(store: &Store) -> Result<()> {
    let on_tag = |store: &Store, name: &str, before| {
        crate::cmd::unpack_or_unname(store, name, before).map_err(|e| format!("{e:#}"))
    };
    let opts = ServeOptions {
        version: crate::cmd::version(),
        on_tag: Some(&on_tag),
    };
    let stdin = std::io::stdin().lock();
    let stdout = std::io::stdout().lock();
    strata_transfer::ssh::serve(store, stdin, stdout, &opts)
        .context("`strata serve --stdio` ended")?;
    Ok(())
}

/// A host named on the command line: `ssh://…`, or a `[host.NAME]` of the project's
/// strata.toml.
pub fn resolve_host(spec: &str, project: &Path) -> Result<SshHost> {
    if spec.starts_with("ssh://") {
        let (host, path) = SshHost::parse_url(spec)?;
        if let Some(p) = path {
            bail!("`{spec}`: a host here, not an image (`/{p}`): name the image separately");
        }
        return Ok(host);
    }
    let file = if project.is_dir() {
        project.join("strata.toml")
    } else {
        project.to_path_buf()
    };
    if !file.is_file() {
        bail!(
            "unknown host `{spec}`: there is no {} to define it\n\
             hint: add [host.{spec}] with ssh = \"user@address\" to strata.toml, or give \
             ssh://user@address",
            file.display()
        );
    }
    let hosts = strata_deploy::app::load_hosts(&file)?;
    let Some(entry) = hosts.get(spec) else {
        let known: Vec<&str> = hosts.keys().map(String::as_str).collect();
        bail!(
            "unknown host `{spec}`: {} defines {}\n\
             hint: add [host.{spec}] with ssh = \"user@address\", or give ssh://user@address",
            file.display(),
            if known.is_empty() {
                "no [host.NAME] tables".to_string()
            } else {
                format!("the hosts {}", known.join(", "))
            }
        );
    };
    let mut host = SshHost::from_target(spec, &entry.ssh)?;
    if let Some(i) = &entry.identity {
        // Relative to strata.toml's directory, like every path in it.
        let base = file.parent().unwrap_or(Path::new("."));
        host.identity = Some(base.join(i));
    }
    if let Some(s) = &entry.store {
        host.store = Some(s.clone());
    }
    if let Some(s) = &entry.strata {
        host.strata = s.clone();
    }
    Ok(host)
}

/// How to reach hosts: this binary's version, and this binary to install where strata is
/// missing or older.
pub fn connect_options() -> ConnectOptions {
    ConnectOptions {
        version: crate::cmd::version(),
        exe: strata_transfer::ssh::current_exe(),
        notice: Some(Arc::new(|msg: &str| eprintln!("{msg}"))),
    }
}

/// `strata push IMAGE ssh://…` / `strata push IMAGE [NAME] --host H…`.
pub fn push(store: &Store, args: &PushArgs) -> Result<()> {
    let mut hosts = Vec::new();
    let mut remote_name = None;
    match args.dest.as_deref() {
        Some(d) if d.starts_with("ssh://") => {
            let (host, path) = SshHost::parse_url(d)?;
            hosts.push(host);
            remote_name = path;
        }
        Some(d) => remote_name = Some(d.to_string()),
        None => {}
    }
    for h in &args.hosts {
        hosts.push(resolve_host(h, &args.project)?);
    }
    let remote_name = remote_name.unwrap_or_else(|| args.image.clone());
    let opts = connect_options();
    let several = hosts.len() > 1;
    let results: Vec<(String, Result<strata_transfer::ssh::ShipReport>)> =
        std::thread::scope(|s| {
            let mut done = Vec::new();
            for chunk in hosts.chunks(HOST_PARALLELISM) {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|host| {
                        let opts = opts.clone();
                        let remote_name = &remote_name;
                        s.spawn(move || {
                            let label = several.then(|| host.name.clone());
                            let progress =
                                crate::registry::blob_progress_for(args.progress, "sent", label);
                            let r = (|| {
                                let mut session = HostSession::connect(host, &opts)?;
                                let report = session.push(
                                    store,
                                    &args.image,
                                    remote_name,
                                    Some(progress.as_ref()),
                                )?;
                                session.close()?;
                                Ok::<_, anyhow::Error>(report)
                            })();
                            (host.name.clone(), r)
                        })
                    })
                    .collect();
                for h in handles {
                    done.push(h.join().unwrap_or_else(|_| {
                        (
                            String::new(),
                            Err(anyhow::anyhow!("a push thread panicked")),
                        )
                    }));
                }
            }
            done
        });
    let mut failed = Vec::new();
    for (host, r) in results {
        match r {
            Ok(rep) => {
                eprintln!(
                    "Pushed {} to {host}: {} sent ({}{}), {} already there",
                    rep.name,
                    rep.blobs_sent,
                    human_size(rep.bytes_sent),
                    if rep.resumed > 0 {
                        format!(", {} resumed", rep.resumed)
                    } else {
                        String::new()
                    },
                    rep.blobs_present
                );
                println!("{host} {}@{}", rep.name, rep.descriptor.digest);
            }
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "cannot push `{}` to {} of {} hosts:\n{}",
            args.image,
            failed.len(),
            hosts.len(),
            failed.join("\n")
        );
    }
    Ok(())
}

/// `strata pull ssh://host/NAME[:TAG]` / `strata pull NAME --host H`.
pub fn pull(store: &Store, args: &PullArgs) -> Result<()> {
    let (host, name) = match &args.host {
        Some(h) => (resolve_host(h, &args.project)?, args.image.clone()),
        None => {
            let (host, path) = SshHost::parse_url(&args.image)?;
            let Some(name) = path else {
                bail!(
                    "`{}` names a host, not an image: ssh://HOST/NAME[:TAG]",
                    args.image
                );
            };
            (host, name)
        }
    };
    let local = strata_transfer::local_name(&name)?;
    let before = store.get_ref(&local)?;
    let progress = crate::registry::blob_progress_for(args.progress, "fetched", None);
    let mut session = HostSession::connect(&host, &connect_options())?;
    let report = session
        .pull(store, &name, &local, Some(progress.as_ref()))
        .with_context(|| format!("cannot pull `{name}` from {}", host.name))?;
    session.close()?;
    crate::cmd::unpack_or_unname(store, &report.name, before)?;
    eprintln!(
        "Pulled {} from {}: {} fetched ({}), {} already here",
        report.name,
        host.name,
        report.blobs_fetched,
        human_size(report.bytes_fetched),
        report.blobs_present
    );
    println!("{}", report.name);
    println!("{}", report.descriptor.digest);
    Ok(())
}
