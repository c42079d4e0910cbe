//! Hosts over SSH: `strata push|pull … ssh://…` / `--host`, and `strata serve --stdio`, the
//! other end of them (see docs/hosts.md and [`strata_transfer::ssh`]).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use strata_oci::sync::MutexExt;
use strata_store::Store;
use strata_transfer::ssh::{
    ConnectOptions, HostSession, ImageClosure, ServeOptions, ShipReport, SshHost,
};

use strata_deploy::app::App;

use crate::cli::{DeployArgs, HostArg, ProgressArg, PullArgs, PushArgs, RelayArgs};
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
    host.relay = entry.relay;
    if let Some(a) = &entry.relay_address {
        // Checked here, so a typo is an error before anything moves.
        SshHost::from_target(spec, a)
            .with_context(|| format!("[host.{spec}] relay_address in {}", file.display()))?;
        host.relay_address = Some(a.clone());
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
    if args.relay {
        for h in &mut hosts {
            h.relay = true;
        }
    }
    let remote_name = remote_name.unwrap_or_else(|| args.image.clone());
    let out = Output::new(args.progress);
    let results = ship(store, &hosts, &args.image, &remote_name, &out, true);
    let mut failed = Vec::new();
    for (host, r) in results {
        match r {
            Ok(rep) => println!("{host} {}@{}", rep.name, rep.descriptor.digest),
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
    let mut hosts = host_names
        .iter()
        .map(|h| resolve_host(h, &args.project))
        .collect::<Result<Vec<_>>>()?;
    if args.relay {
        for h in &mut hosts {
            h.relay = true;
        }
    }
    // With relays, the image goes to every host first (they send it on to each other); the
    // deploys then find it there.
    let shipped = hosts.iter().any(|h| h.relay);
    if shipped {
        let failed: Vec<String> = ship(store, &hosts, local, remote_image, out, false)
            .into_iter()
            .filter_map(|(_, r)| r.err().map(|e| format!("{e:#}")))
            .collect();
        if !failed.is_empty() {
            bail!(
                "cannot ship the image of {} to {} of {} hosts (nothing deployed):\n{}",
                app.name,
                failed.len(),
                hosts.len(),
                failed.join("\n")
            );
        }
    }
    let one = |host: &SshHost| -> Result<()> {
        let out = out.for_host(&host.name);
        let mut session = HostSession::connect(host, &connect_options(&out))?;
        let rep = session.push(store, local, remote_image, None)?;
        if !shipped {
            out.note(&shipped_note(&rep));
        }
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
        from: None,
    }
}

/// Ship the image `image` of the store, named `remote_name` there, to every host, each
/// host's `pushed` event said (with `blob_events`, each blob's too); each host's name and
/// result, in order. Hosts with `relay` get the blobs from each other (see [`ship_relayed`]);
/// the others from here, 8 at a time.
fn ship(
    store: &Store,
    hosts: &[SshHost],
    image: &str,
    remote_name: &str,
    out: &Output,
    blob_events: bool,
) -> Vec<(String, Result<ShipReport>)> {
    let relaying = hosts.iter().filter(|h| h.relay).count() > 1;
    let (relayed, direct): (Vec<usize>, Vec<usize>) =
        (0..hosts.len()).partition(|&i| relaying && hosts[i].relay);
    let mut results: Vec<Option<Result<ShipReport>>> = (0..hosts.len()).map(|_| None).collect();
    let several = hosts.len() > 1;
    let direct_hosts: Vec<SshHost> = direct.iter().map(|&i| hosts[i].clone()).collect();
    let relay_hosts: Vec<SshHost> = relayed.iter().map(|&i| hosts[i].clone()).collect();
    let (direct_results, relay_results) = std::thread::scope(|s| {
        let relays = s.spawn(|| {
            if relay_hosts.is_empty() {
                return Vec::new();
            }
            ship_relayed(store, &relay_hosts, image, remote_name, out, blob_events)
        });
        let direct = on_hosts(&direct_hosts, |host| {
            let host_out = out.for_host(&host.name);
            let progress = match (blob_events, several) {
                (false, _) => None,
                (true, true) => Some(host_out.blob_progress("sent")),
                // One host: its blobs without the host's prefix.
                (true, false) => Some(out.blob_progress("sent")),
            };
            let mut session = HostSession::connect(host, &connect_options(out))?;
            let report = session.push(store, image, remote_name, progress.as_deref())?;
            session.close()?;
            host_out.note(&shipped_note(&report));
            Ok(report)
        });
        let relays = relays
            .join()
            .unwrap_or_else(|_| vec![Err(anyhow::anyhow!("the relay thread panicked"))]);
        (direct, relays)
    });
    for (i, (_, r)) in direct.iter().zip(direct_results) {
        results[*i] = Some(r);
    }
    for (i, r) in relayed.iter().zip(relay_results) {
        results[*i] = Some(r);
    }
    hosts
        .iter()
        .zip(results)
        .map(|(h, r)| {
            (
                h.name.clone(),
                r.unwrap_or_else(|| Err(anyhow::anyhow!("{}: not shipped", h.name))),
            )
        })
        .collect()
}

/// Who sends a host its blobs in a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// This machine.
    Here,
    /// The host of that index, which has the whole image.
    Host(usize),
}

/// Ship to `hosts` with relays: each missing blob leaves this machine once. Every host is
/// asked what it lacks; hosts that lack nothing are named at once and become sources. If
/// none is, this machine sends to the first host only. Then every host that has the image
/// sends it on to one host that lacks it, over its own SSH to that host (`strata relay`,
/// authenticated with this side's agent forwarded for that session, checking the host key
/// this side's known_hosts holds), so the number of sources doubles each round. A relay that
/// fails is said (one line naming both hosts and why) and this machine sends that host the
/// rest itself (a blob the relay had begun continues from where it stopped). Every host's
/// image is then checked over this side's own connection (a `have`, and the name set).
fn ship_relayed(
    store: &Store,
    hosts: &[SshHost],
    image: &str,
    remote_name: &str,
    out: &Output,
    blob_events: bool,
) -> Vec<Result<ShipReport>> {
    let all_fail = |e: anyhow::Error| {
        hosts
            .iter()
            .map(|_| Err(anyhow::anyhow!("{e:#}")))
            .collect::<Vec<_>>()
    };
    let (local, remote_name) = match (
        strata_transfer::local_name(image),
        strata_transfer::local_name(remote_name),
    ) {
        (Ok(l), Ok(r)) => (l, r),
        (Err(e), _) | (_, Err(e)) => return all_fail(e.into()),
    };
    let closure = match ImageClosure::of(store, &local) {
        Ok(c) => c,
        Err(e) => return all_fail(e.into()),
    };
    let blobs: Vec<_> = closure
        .blobs
        .iter()
        .chain(&closure.manifests)
        .cloned()
        .collect();
    let opts = connect_options(out);
    // Every host: connected, and whether it lacks anything.
    let connected = on_hosts(hosts, |host| {
        let mut session = HostSession::connect(host, &opts)?;
        let lacks = !session.missing(&blobs)?.is_empty();
        Ok((Mutex::new(session), lacks))
    });
    let mut results: Vec<Option<Result<ShipReport>>> = Vec::new();
    let mut sessions = Vec::new();
    let mut pending = VecDeque::new();
    let mut sources = Vec::new();
    for (i, (_, c)) in connected.into_iter().enumerate() {
        match c {
            Ok((session, lacks)) => {
                sessions.push(Some(session));
                results.push(None);
                if lacks {
                    pending.push_back(i);
                } else {
                    sources.push(i);
                }
            }
            Err(e) => {
                sessions.push(None);
                results.push(Some(Err(e)));
            }
        }
    }
    let agent = std::env::var_os("SSH_AUTH_SOCK").is_some_and(|s| !s.is_empty());
    if !agent && !pending.is_empty() {
        out.note(&Note::Info {
            message: "no relays: no ssh-agent here (SSH_AUTH_SOCK is not set) for the hosts to \
                      authenticate to each other with; sending to every host from here"
                .into(),
        });
    }
    let job = |src: Source, t: usize| -> Result<ShipReport> {
        let target = &hosts[t];
        let host_out = out.for_host(&target.name);
        let session = sessions[t].as_ref().context("no session to the host")?;
        let mut from = None;
        if let Source::Host(s) = src {
            let source = &hosts[s];
            let relayed = sessions[s]
                .as_ref()
                .ok_or_else(|| "no session to it".to_string())
                .and_then(|src_session| {
                    relay_between(
                        src_session,
                        session,
                        target,
                        &remote_name,
                        &host_out,
                        &source.name,
                        blob_events,
                    )
                });
            match relayed {
                Ok(note) => {
                    host_out.note(&note);
                    from = Some(source.name.clone());
                }
                Err(why) => host_out.note(&Note::Info {
                    message: format!(
                        "the relay from {} to {} failed ({why}); sending from here instead",
                        source.name, target.name
                    ),
                }),
            }
        }
        let progress = (blob_events && from.is_none()).then(|| host_out.blob_progress("sent"));
        let report = session
            .lock_ok()
            .push(store, &local, &remote_name, progress.as_deref())?;
        if from.is_none() || report.blobs_sent > 0 {
            host_out.note(&shipped_note(&report));
        }
        Ok(report)
    };
    let job = &job;
    let mut idle: Vec<Source> = Vec::new();
    std::thread::scope(|scope| {
        // Hosts that lack nothing only need the name: they are sources at once.
        let named: Vec<_> = sources
            .iter()
            .map(|&i| (i, scope.spawn(move || job(Source::Here, i))))
            .collect();
        for (i, h) in named {
            let r = h
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the thread for it panicked")));
            if r.is_ok() && agent {
                idle.push(Source::Host(i));
            }
            results[i] = Some(r);
        }
        if idle.is_empty() {
            idle.push(Source::Here);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut running = 0usize;
        loop {
            while running < strata_deploy::rollout::MAX_AT_ONCE && !pending.is_empty() {
                // Without an agent, this machine sends to every host (as without relays).
                let src = if agent {
                    match idle.pop() {
                        Some(src) => src,
                        None => break,
                    }
                } else {
                    Source::Here
                };
                let Some(t) = pending.pop_front() else { break };
                let tx = tx.clone();
                scope.spawn(move || {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(src, t)))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the thread for it panicked")));
                    let _ = tx.send((src, t, r));
                });
                running += 1;
            }
            if running == 0 {
                break;
            }
            let Ok((src, t, r)) = rx.recv() else { break };
            running -= 1;
            let ok = r.is_ok();
            results[t] = Some(r);
            if agent {
                if ok {
                    idle.push(Source::Host(t));
                }
                match src {
                    Source::Host(_) => idle.push(src),
                    // This machine only starts the tree, or starts it again when its host
                    // failed.
                    Source::Here if !ok => idle.push(src),
                    Source::Here => {}
                }
                if idle.is_empty() && running == 0 {
                    idle.push(Source::Here);
                }
            }
        }
    });
    for session in sessions.into_iter().flatten() {
        let _ = session.into_inner().map(HostSession::close);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("not shipped"))))
        .collect()
}

/// Have the host of `source_session` send the image `name` to `target` (`strata relay` run
/// there over a connection that forwards the agent); the relay's blob events are said for
/// the target, marked with the source. Returns the relay's `pushed` event, or why it failed.
fn relay_between(
    source_session: &Mutex<HostSession>,
    target_session: &Mutex<HostSession>,
    target: &SshHost,
    name: &str,
    out: &Output,
    source: &str,
    blob_events: bool,
) -> std::result::Result<Note, String> {
    let to = target_session
        .lock_ok()
        .relay_target()
        .map_err(|e| e.to_string())?;
    if to.host_keys.is_empty() {
        return Err(format!(
            "no known_hosts entry here for {} ({}) to check its host key by",
            target.name, to.address
        ));
    }
    let to_arg = to.target();
    let mut args: Vec<&str> = vec![
        "relay",
        name,
        "--to",
        &to_arg,
        "--name",
        &target.name,
        "--strata",
        &target.strata,
    ];
    if let Some(st) = &target.store {
        args.extend(["--target-store", st.as_str()]);
    }
    for k in &to.host_keys {
        args.extend(["--host-key", k.as_str()]);
    }
    let mut child = source_session
        .lock_ok()
        .strata_command_with_agent(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ssh: {e}"))?;
    let mut pushed = None;
    let mut said = Vec::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let line = line.unwrap_or_default();
            match serde_json::from_str::<Note>(&line) {
                Ok(Note::Blob {
                    digest,
                    state,
                    done,
                    total,
                    ..
                }) => {
                    if blob_events {
                        out.note(&Note::Blob {
                            digest,
                            state,
                            done,
                            total,
                            from: Some(source.to_string()),
                        });
                    }
                }
                Ok(Note::Pushed {
                    image,
                    sent,
                    bytes,
                    mounted,
                    present,
                    resumed,
                    ..
                }) => {
                    pushed = Some(Note::Pushed {
                        image,
                        sent,
                        bytes,
                        mounted,
                        present,
                        resumed,
                        from: Some(source.to_string()),
                    });
                }
                // Its notices name the target already; `out` does too.
                Ok(Note::Info { message }) => out.note(&Note::Info {
                    message: message
                        .strip_prefix(&format!("{}: ", target.name))
                        .unwrap_or(&message)
                        .to_string(),
                }),
                Ok(note) => out.note(&note),
                Err(_) if !line.trim().is_empty() => {
                    said.push(strata_oci::printable(&line).into_owned())
                }
                Err(_) => {}
            }
        }
    }
    let status = child.wait().map_err(|e| format!("ssh: {e}"))?;
    match pushed {
        Some(note) if status.success() => Ok(note),
        _ => {
            let why = said
                .iter()
                .rev()
                .take(3)
                .rev()
                .map(|l| l.trim_start_matches("error: ").to_string())
                .collect::<Vec<_>>()
                .join("; ");
            Err(if why.is_empty() {
                format!("`strata relay` on {source} ended with {status}")
            } else {
                why
            })
        }
    }
}

/// `strata relay IMAGE --to …`: on a source host of a relay, send the image to the target
/// over SSH with the agent the developer forwarded, trusting only the host keys given (see
/// docs/hosts.md). Events go to stderr as JSON, for the developer's side.
pub fn relay(store: &Store, args: &RelayArgs) -> Result<()> {
    let out = Output::new(ProgressArg::Json).for_host(&args.name);
    if std::env::var_os("SSH_AUTH_SOCK").is_none_or(|s| s.is_empty()) {
        bail!("no agent was forwarded here (SSH_AUTH_SOCK is not set)");
    }
    let dir = tempfile::Builder::new()
        .prefix("strata-relay-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mut host = SshHost::for_relay(
        &args.name,
        &args.to,
        &args.host_keys,
        &dir.path().join("known_hosts"),
    )?;
    host.strata = args.strata.clone();
    host.store = args.target_store.clone();
    let progress = out.blob_progress("sent");
    let mut session = HostSession::connect(&host, &connect_options(&out))?;
    let report = session.push(store, &args.image, &args.image, Some(progress.as_ref()))?;
    session.close()?;
    out.note(&shipped_note(&report));
    Ok(())
}
