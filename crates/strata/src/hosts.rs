//! Hosts over SSH: `strata push|pull … ssh://…` / `--host`, and `strata serve --stdio`, the
//! other end of them (see docs/hosts.md and [`strata_transfer::ssh`]).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use strata_store::Store;
use strata_transfer::ssh::{ConnectOptions, HostSession, ServeOptions, SshHost};

use strata_deploy::app::App;

use crate::cli::{DeployArgs, HostArg, ProgressArg, PullArgs, PushArgs};
use crate::output::{Note, Output};

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

/// `work` on every host, several at a time; each host's name and result, in order.
fn on_hosts<T: Send>(
    hosts: &[SshHost],
    work: impl Fn(&SshHost) -> Result<T> + Sync,
) -> Vec<(String, Result<T>)> {
    let results =
        strata_deploy::rollout::on_each(hosts, strata_deploy::rollout::MAX_AT_ONCE, |h| {
            work(h).map_err(|e| format!("{e:#}"))
        });
    hosts
        .iter()
        .zip(results)
        .map(|(h, r)| (h.name.clone(), r.map_err(anyhow::Error::msg)))
        .collect()
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
    let file = strata_deploy::deploy::project_file(project);
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
pub fn connect_options(out: &Output) -> ConnectOptions {
    let out = out.clone();
    ConnectOptions {
        version: crate::cmd::version(),
        exe: strata_transfer::ssh::current_exe(),
        notice: Some(Arc::new(move |msg: &str| {
            out.note(&Note::Info {
                message: msg.to_string(),
            })
        })),
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
    let out = Output::new(args.progress);
    let opts = connect_options(&out);
    let several = hosts.len() > 1;
    let results = on_hosts(&hosts, |host| {
        let progress = if several {
            out.for_host(&host.name).blob_progress("sent")
        } else {
            out.blob_progress("sent")
        };
        let mut session = HostSession::connect(host, &opts)?;
        let report = session.push(store, &args.image, &remote_name, Some(progress.as_ref()))?;
        session.close()?;
        Ok(report)
    });
    let mut failed = Vec::new();
    for (host, r) in results {
        match r {
            Ok(rep) => {
                out.for_host(&host).note(&shipped_note(&rep));
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
    let out = Output::new(args.progress);
    let progress = out.blob_progress("fetched");
    let mut session = HostSession::connect(&host, &connect_options(&out))?;
    let report = session
        .pull(store, &name, &local, Some(progress.as_ref()))
        .with_context(|| format!("cannot pull `{name}` from {}", host.name))?;
    session.close()?;
    crate::cmd::unpack_or_unname(store, &report.name, before)?;
    out.for_host(&host.name).note(&Note::Pulled {
        image: report.name.clone(),
        fetched: report.blobs_fetched,
        bytes: report.bytes_fetched,
        present: report.blobs_present,
    });
    println!("{}", report.name);
    println!("{}", report.descriptor.digest);
    Ok(())
}

/// `strata releases|status|logs --host H …`: the same command run by the host's strata, its
/// output streamed here; exits with its exit code.
pub fn run_there(on: &HostArg, args: &[String]) -> Result<()> {
    let Some(spec) = &on.host else {
        bail!("no host given");
    };
    let host = resolve_host(spec, &on.project)?;
    let session = HostSession::connect(&host, &connect_options(&Output::new(ProgressArg::Auto)))?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = session
        .strata_command(&[], &args)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot run ssh for {}", host.name))?;
    drop(session);
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// This command line for the host: the arguments after `strata`, less the ones that only mean
/// something here (`--host`, `--project`, `--store`, with their values).
pub fn argv_for_host() -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if ["--host", "--project", "--store"].contains(&a.as_str()) {
            args.next();
            continue;
        }
        if ["--host=", "--project=", "--store="]
            .iter()
            .any(|p| a.starts_with(p))
        {
            continue;
        }
        out.push(a);
    }
    out
}

/// The `[app.NAME]` table a host deploys: strata.toml's, without what only the client uses
/// (`registry`: the image arrives over SSH; `hosts`, `strategy`).
pub(crate) fn app_spec_for_host(file: &Path, app: &str) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("cannot parse {}", file.display()))?;
    let mut table = doc
        .get("app")
        .and_then(|a| a.get(app))
        .and_then(toml::Value::as_table)
        .cloned()
        .with_context(|| format!("no [app.{app}] in {}", file.display()))?;
    for key in ["registry", "hosts", "strategy", "parallelism"] {
        table.remove(key);
    }
    let mut apps = toml::Table::new();
    apps.insert(app.to_string(), toml::Value::Table(table));
    let mut out = toml::Table::new();
    out.insert("app".into(), toml::Value::Table(apps));
    Ok(toml::to_string(&out)?)
}

/// `strata deploy APP` for hosts over SSH: ship the image each host lacks, then run the same
/// deploy there (its agent, machines, health check, switch, releases), all hosts at once or
/// one after another (`strategy = "rolling"`), each host's progress prefixed with its name.
pub fn deploy_to_hosts(
    store: &Store,
    args: &DeployArgs,
    out: &Output,
    app: &App,
    local: &str,
    remote_image: &str,
    host_names: &[String],
) -> Result<()> {
    let strategy = app.strategy()?;
    let spec = app_spec_for_host(
        &strata_deploy::deploy::project_file(&args.project),
        &app.name,
    )?;
    let hosts = host_names
        .iter()
        .map(|h| resolve_host(h, &args.project))
        .collect::<Result<Vec<_>>>()?;
    let one = |host: &SshHost| -> Result<()> {
        let out = out.for_host(&host.name);
        let mut session = HostSession::connect(host, &connect_options(&out))?;
        let rep = session.push(store, local, remote_image, None)?;
        out.note(&shipped_note(&rep));
        let mut remote = vec![
            "deploy",
            app.name.as_str(),
            "--spec",
            spec.as_str(),
            "--image",
            remote_image,
            "--progress",
            "json",
        ];
        if args.detach {
            remote.push("--detach");
        }
        let mut child = session
            .strata_command(&[("STRATA_AGENT_LISTEN", "0.0.0.0")], &remote)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run ssh for {}", host.name))?;
        let mut last_error = String::new();
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).lines() {
                let line = line.unwrap_or_default();
                if line.starts_with("error:") || !last_error.is_empty() {
                    last_error.push_str(&line);
                    last_error.push('\n');
                }
                // The host's events, named by host here; anything else (its error) as text.
                match serde_json::from_str::<Note>(&line) {
                    Ok(note) => out.note(&note),
                    Err(_) => out.deploy(&app.name, &strata_oci::printable(&line)),
                }
            }
        }
        let status = child.wait()?;
        drop(session);
        if !status.success() {
            bail!(
                "the deploy on {} failed: {}",
                host.name,
                last_error
                    .trim()
                    .trim_start_matches("error: ")
                    .lines()
                    .next()
                    .unwrap_or("(no message)")
            );
        }
        Ok(())
    };
    strata_deploy::rollout::roll_out(
        &app.name,
        &hosts,
        |h| h.name.clone(),
        strategy,
        |h| one(h).map_err(|e| format!("{e:#}")),
    )?;
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    out.deploy(
        &app.name,
        &format!("{} is deployed on {}", app.name, names.join(", ")),
    );
    Ok(())
}

/// The event of an image shipped to a host (the host is the output's).
fn shipped_note(rep: &strata_transfer::ssh::ShipReport) -> Note {
    Note::Pushed {
        image: rep.name.clone(),
        sent: rep.blobs_sent,
        bytes: rep.bytes_sent,
        mounted: 0,
        present: rep.blobs_present,
        resumed: rep.resumed,
    }
}
