//! `strata agent`, `strata machine …`, `strata deploy`, `strata releases`, `strata status`,
//! `strata apps destroy`: thin glue over strata-deploy.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use strata_deploy::agent::{AgentOptions, agent_pid, poke, run_agent, stop_agent};
use strata_deploy::app::{
    Target, load_apps, load_orchestrators, parse_duration, parse_volume, pick_app,
};
use strata_deploy::deploy::{DeployOptions, destroy_app, project_file};
use strata_deploy::host::{Host, MachineOptions, parse_signal};
use strata_deploy::state::{Desired, Machine, MachineState, ReleaseStatus, RestartPolicy};
use strata_deploy::{kubernetes, machines, pipeline, swarm};
use strata_oci::Reference;
use strata_store::Store;

use crate::cli::{AgentArgs, AgentCommand, DeployArgs, MachineCommand, MachineIds, ReleasesArgs};
use crate::output::Output;

fn exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the strata binary to start the agent")
}

pub fn agent(store: Store, args: &AgentArgs) -> Result<()> {
    match args.command {
        Some(AgentCommand::Stop) => {
            if stop_agent(store.root())? {
                eprintln!("agent stopped (machines keep running)");
            } else {
                eprintln!("no agent runs for {}", store.root().display());
            }
            Ok(())
        }
        Some(AgentCommand::Status) => {
            match agent_pid(store.root())? {
                Some(pid) => println!("running (pid {pid})"),
                None => println!("not running"),
            }
            Ok(())
        }
        None => {
            let opts = AgentOptions {
                listen: args.listen,
                ..AgentOptions::default()
            };
            run_agent(store, opts)?;
            Ok(())
        }
    }
}

pub(crate) fn host(store: Store) -> Result<Host> {
    Host::open(store).context("cannot open the machine state")
}

fn parse_port(p: &str) -> Result<(u16, u16)> {
    let (h, c) = p.split_once(':').unwrap_or((p, p));
    let parse = |s: &str| -> Result<u16> {
        s.parse()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("port mapping `{p}`: expected HOSTPORT:PORT"))
    };
    Ok((parse(h)?, parse(c)?))
}

fn machine_row(m: &Machine) -> String {
    let state = match (m.state.as_str(), m.exit_code) {
        ("exited" | "stopped", Some(c)) => format!("{} ({c})", m.state),
        (s, _) => s.to_string(),
    };
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}",
        m.id,
        state,
        Host::machine_addr(m),
        m.image,
        m.app.as_deref().map_or("-".to_string(), |a| format!(
            "{a} v{}",
            m.release.unwrap_or(0)
        )),
        m.config
            .ports
            .iter()
            .map(|(h, c)| format!("{h}->{c}"))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// The environment of `--env-file`s then `-e`s, as `docker run` reads them: `K=V`, or a bare
/// `K` that takes the value of `K` here (left out when it is unset); in a file, one entry per
/// line, blank lines and `#` comments skipped, values as written (no quotes removed).
fn docker_env(entries: &[String], files: &[PathBuf]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut take = |entry: &str, at: &dyn Fn() -> String| -> Result<()> {
        let (name, value) = match entry.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (entry, std::env::var(entry).ok()),
        };
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            bail!("{}: invalid environment variable `{entry}`", at());
        }
        if let Some(v) = value {
            out.push(format!("{name}={v}"));
        }
        Ok(())
    };
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--env-file `{}`", file.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            take(line, &|| format!("{}:{}", file.display(), i + 1))?;
        }
    }
    for e in entries {
        take(e, &|| "-e".to_string())?;
    }
    Ok(out)
}

/// What a `-v` of `strata run`/`machine run` mounts.
#[derive(Debug, PartialEq, Eq)]
enum RunVolume {
    /// `NAME:/path`: a named volume of the store.
    Named(String, String),
    /// `/host/path:/path[:ro]` (or `./relative`): a host path.
    Bind(strata_deploy::state::Bind),
}

/// Reads `-v` as `docker run` does: `NAME:/path` or `/host/path:/path`, then `:ro`/`:rw` (and
/// SELinux's `z`/`Z`, which change nothing here); a host path may be relative (`./site`), as
/// newer Docker takes it.
fn parse_run_volume(v: &str) -> Result<RunVolume> {
    let parts: Vec<&str> = v.split(':').collect();
    let (source, target, flags) = match parts.as_slice() {
        [s, t] => (*s, *t, ""),
        [s, t, f] => (*s, *t, *f),
        [_] => bail!(
            "volume `{v}`: name it (`-v NAME:{v}`) or give a host path (`-v /host/path:{v}`); \
             anonymous volumes are not made"
        ),
        _ => bail!("volume `{v}`: expected NAME:/path or /host/path:/path[:ro]"),
    };
    let mut readonly = false;
    for flag in flags.split(',').filter(|f| !f.is_empty()) {
        match flag {
            "ro" => readonly = true,
            "rw" | "z" | "Z" => {}
            _ => bail!("volume `{v}`: unknown option `{flag}` (ro, rw)"),
        }
    }
    if !(source.starts_with('/') || source.starts_with('.')) {
        if readonly {
            bail!("volume `{v}`: a named volume is mounted read-write (`:ro` is a host path's)");
        }
        let (name, target) = parse_volume(&format!("{source}:{target}"))?;
        return Ok(RunVolume::Named(name, target));
    }
    if !target.starts_with('/') || target.split('/').any(|c| c == "..") || target == "/" {
        bail!(
            "volume `{v}`: the path in the machine must be absolute, other than `/`, without `..`"
        );
    }
    let source = std::path::absolute(source)
        .with_context(|| format!("volume `{v}`: cannot make `{source}` absolute"))?;
    Ok(RunVolume::Bind(strata_deploy::state::Bind {
        source,
        target: target.to_string(),
        readonly,
    }))
}

/// Which command a machine of [`start_machine`] is for.
enum Started {
    /// `machine run`: detached, kept until destroyed.
    Detached,
    /// `strata run`: removed when its command exits, and when it fails to start; its stdio or
    /// terminal attached to this process.
    Once(strata_deploy::state::Attached),
}

/// `machine run` and `run`: a new machine from `a` (pulling the image when the store lacks
/// it, as `docker run` does), its ports routed, the agent up, and the machine running.
fn start_machine(
    host: &mut Host,
    a: &crate::cli::MachineRunArgs,
    started: Started,
) -> Result<(Machine, Vec<(u16, u16)>)> {
    let mut opts = MachineOptions {
        cmd: (!a.command.is_empty()).then(|| a.command.clone()),
        entrypoint: a.entrypoint.as_ref().map(|e| vec![e.clone()]),
        env: docker_env(&a.env, &a.env_files)?,
        restart: RestartPolicy::parse(&a.restart)?,
        id: a.name.clone(),
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        attach: match &started {
            Started::Once(attach) => Some(attach.clone()),
            Started::Detached => None,
        },
        ..MachineOptions::default()
    };
    for v in &a.volumes {
        match parse_run_volume(v)? {
            RunVolume::Named(name, target) => opts.volumes.push((name, target)),
            RunVolume::Bind(b) => opts.binds.push(b),
        }
    }
    for p in &a.ports {
        opts.ports.push(parse_port(p)?);
    }
    if let Some(t) = &a.kill_timeout {
        opts.kill_timeout_ms = Some(parse_duration(t)?.as_millis() as u64);
    }
    opts.memory = a
        .memory
        .as_deref()
        .map(strata_deploy::app::parse_memory)
        .transpose()?;
    opts.millicpus = a.cpus.map(strata_deploy::app::parse_cpus).transpose()?;
    if let Some(s) = &a.stop_signal {
        opts.stop_signal = Some(parse_signal(s).with_context(|| format!("unknown signal `{s}`"))?);
    }
    // A taken port fails the run before anything is pulled or made.
    machines::check_ports(host, &opts)?;
    if strata_deploy::host::find_image(&host.store, &a.image).is_err() {
        let pull = crate::cli::PullArgs {
            image: a.image.clone(),
            insecure: false,
            progress: crate::cli::ProgressArg::Auto,
            host: None,
            project: ".".into(),
        };
        crate::registry::pull_image(&host.store, &pull)
            .with_context(|| format!("`{}` is not in the store and cannot be pulled", a.image))?;
    }
    let m = if matches!(started, Started::Once(_)) {
        machines::run_machine_removed_on_failure(host, &a.image, &opts, &exe()?)?
    } else {
        machines::run_machine(host, &a.image, &opts, &exe()?)?
    };
    Ok((m, opts.ports))
}

pub fn machine(store: Store, command: MachineCommand) -> Result<()> {
    let mut host = host(store)?;
    match command {
        MachineCommand::Run(a) => {
            let (m, ports) = start_machine(&mut host, &a, Started::Detached)?;
            eprintln!(
                "machine {} running at {}{}",
                m.id,
                Host::machine_addr(&m),
                ports
                    .iter()
                    .map(|(h, c)| format!(", 127.0.0.1:{h} -> :{c}"))
                    .collect::<String>()
            );
            println!("{}", m.id);
            Ok(())
        }
        MachineCommand::List { app, json } => {
            let machines = listed(&host, app.as_deref())?;
            if json {
                for m in &machines {
                    let v = serde_json::json!({
                        "id": m.id, "state": m.state, "desired": format!("{:?}", m.desired).to_lowercase(),
                        "address": Host::machine_addr(m).to_string(), "image": m.image, "digest": m.digest,
                        "app": m.app, "release": m.release, "pid": m.pid, "exit_code": m.exit_code,
                        "restarts": m.restarts, "error": m.error,
                    });
                    println!("{v}");
                }
            } else {
                println!("ID\tSTATE\tADDRESS\tIMAGE\tAPP\tPORTS");
                for m in &machines {
                    println!("{}", machine_row(m));
                }
            }
            Ok(())
        }
        MachineCommand::Start(MachineIds { ids }) => {
            each_machine(&ids, |id| Ok(machines::start(&host, id, &exe()?)?))
        }
        MachineCommand::Stop(MachineIds { ids }) => {
            each_machine(&ids, |id| Ok(machines::stop(&host, id, &exe()?)?))
        }
        MachineCommand::Restart(MachineIds { ids }) => {
            each_machine(&ids, |id| Ok(machines::restart(&host, id, &exe()?)?))
        }
        MachineCommand::Destroy { ids } => {
            each_machine(&ids, |id| Ok(machines::destroy(&host, id, &exe()?)?))
        }
        MachineCommand::Logs { id, follow, tail } => {
            let m = machines::find(&host, &id)?;
            Ok(machines::copy_log(
                &host,
                &m.id,
                follow,
                tail.and_then(|t| t.0),
                &mut std::io::stdout().lock(),
            )?)
        }
        MachineCommand::Exec(a) => {
            let m = machines::find(&host, &a.id)?;
            if m.state != MachineState::Running {
                bail!("machine {} is {}, not running", m.id, m.state);
            }
            let mut env = m.config.env.clone();
            env.extend(docker_env(&a.env, &a.env_files)?);
            let user = match &a.user {
                // Looked up in the machine's own root, as `docker exec -u NAME` does.
                Some(u) => Some(
                    strata_runtime::resolve_user(&[host.machine_dir(&m.id).join("rootfs")], u)
                        .with_context(|| format!("--user `{u}` in machine {}", m.id))?,
                ),
                None => None,
            };
            let opts = strata_runtime::ExecOptions {
                env,
                tty: a.tty,
                stdin: a.interactive,
                workdir: a.workdir.clone(),
                user,
            };
            let code = host.driver.exec(&m.id, &a.command, &opts)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
    }
}

/// `strata ps -q`: the machines' ids, one per line.
pub fn machine_ids(store: Store, app: Option<&str>) -> Result<()> {
    for m in listed(&host(store)?, app)? {
        println!("{}", m.id);
    }
    Ok(())
}

/// The machines `ps` and `machine list` show: `app`'s, or all.
fn listed(host: &Host, app: Option<&str>) -> Result<Vec<Machine>> {
    Ok(match app {
        Some(a) => host.state.app_machines(a)?,
        None => host.state.machines()?,
    })
}

/// Runs `what` on each machine of `ids` in turn, printing each one's id as it is done (as
/// `docker stop A B` does); stops at the first error.
fn each_machine(ids: &[String], mut what: impl FnMut(&str) -> Result<Machine>) -> Result<()> {
    for id in ids {
        println!("{}", what(id)?.id);
    }
    Ok(())
}

/// `strata kill`: `docker kill [-s SIGNAL]` for machines.
pub fn kill(store: Store, ids: &[String], signal: &str) -> Result<()> {
    let host = host(store)?;
    let Some(n) = parse_signal(signal) else {
        bail!("unknown signal `{signal}` (a name such as HUP, USR1, TERM, KILL, or a number)");
    };
    each_machine(ids, |id| Ok(machines::kill(&host, id, n, &exe()?)?))
}

/// `strata rm`: `docker rm`'s rule, a running machine is removed only with `-f`.
pub fn rm(store: Store, ids: &[String], force: bool) -> Result<()> {
    let host = host(store)?;
    if !force {
        for id in ids {
            let m = machines::find(&host, id)?;
            if m.state == MachineState::Running {
                bail!(
                    "machine {} is running: stop it first (`strata stop {}`) or remove it with \
                     `strata rm -f {}`",
                    m.id,
                    m.id,
                    m.id
                );
            }
        }
    }
    each_machine(ids, |id| Ok(machines::destroy(&host, id, &exe()?)?))
}

/// `strata run`: a machine attached to the terminal's output and removed when its command
/// exits (`docker run --rm`); strata exits with the command's code. Ctrl-C removes it too.
pub fn run(store: Store, args: &crate::cli::RunArgs) -> Result<()> {
    if args.detach {
        // `docker run -d`: `machine run`.
        if args.rm {
            bail!(
                "`strata run -d` keeps its machine until `strata rm` (--rm with -d is not \
                 taken); without -d, `strata run` waits and removes it"
            );
        }
        if args.interactive || args.tty {
            bail!(
                "a detached machine has no stdin or terminal to attach (-i/-t with -d are not \
                 taken); open a shell in it with `strata exec -it ID sh`"
            );
        }
        return machine(store, MachineCommand::Run(Box::new(args.machine.clone())));
    }
    let a = &args.machine;
    if a.restart != "no" {
        // Docker: "Conflicting options: --restart and --rm".
        bail!(
            "`strata run` removes its machine when the command exits, so it takes no --restart; \
             a machine restarted by a policy is `strata machine run --restart {} IMAGE`",
            a.restart
        );
    }
    let mut host = host(store)?;
    let attachment = crate::attach::Attachment::prepare(&host.store, args.interactive, args.tty)?;
    let attach = attachment.config();
    let (m, _) = start_machine(&mut host, a, Started::Once(attach))?;
    let followed = attachment.serve(&host, &m.id);
    let code = host.state.machine(&m.id)?.and_then(|now| now.exit_code);
    host.state.set_desired(&m.id, Desired::Destroyed)?;
    poke(host.store.root());
    if !machines::wait_gone(&host, &m)? {
        eprintln!(
            "warning: machine {} was not removed within {} s",
            m.id,
            machines::stop_timeout(&m).as_secs()
        );
    }
    followed?;
    if strata_runtime::interrupt::requested() {
        bail!("interrupted: machine {} removed", m.id);
    }
    match code {
        Some(0) => Ok(()),
        Some(c) => std::process::exit(c),
        None => bail!("machine {} ended without an exit code", m.id),
    }
}

/// `strata logs APP`: the output of every machine of the app, line by line, each prefixed
/// with its machine id; `-f` follows until every one of them has ended.
pub fn app_logs(
    store: Store,
    app: &str,
    follow: bool,
    tail: Option<crate::cli::Tail>,
) -> Result<()> {
    let host = host(store)?;
    let tail = tail.and_then(|t| t.0);
    // `docker logs ID`: a name no app has but a machine's id (or its unique start) does gives
    // that machine's output, as `machine logs` would.
    if host.state.app_machines(app)?.is_empty()
        && let Ok(m) = machines::find(&host, app)
    {
        return Ok(machines::copy_log(
            &host,
            &m.id,
            follow,
            tail,
            &mut std::io::stdout().lock(),
        )?);
    }
    Ok(machines::copy_app_logs(
        &host,
        app,
        follow,
        tail,
        &mut std::io::stdout().lock(),
    )?)
}

pub fn deploy(store: Store, args: &DeployArgs) -> Result<()> {
    deploy_with(store, args, &Output::new(args.progress))
}

/// [`deploy`], reporting to `out` (`strata dev` shows its deploys in its own stream).
pub fn deploy_with(store: Store, args: &DeployArgs, out: &Output) -> Result<()> {
    let file = project_file(&args.project);
    let apps = match &args.spec {
        Some(text) => strata_deploy::app::parse_apps(text, std::path::Path::new("--spec"))?,
        None => load_apps(&file)?,
    };
    let app = pick_app(&apps, args.app.as_deref(), &file)?;
    let target = match &args.target {
        Some(t) => Target::parse(t, "--target")?,
        // A host's own deploy (sent its app's table) is local to it.
        None if args.spec.is_some() => Target::Local,
        None => app.target()?,
    };
    // An orchestrator target is checked before anything is built: it needs the app's
    // registry (its nodes pull from there) and, for Kubernetes, where the objects go.
    let orchestrator = match target {
        Target::Local => None,
        _ if !args.hosts.is_empty() => {
            bail!(
                "--host deploys machines over SSH; it cannot be combined with --target kubernetes or swarm"
            )
        }
        _ if app.spec.registry.is_none() => bail!(
            "app `{}`: an orchestrator target runs the image from the app's registry: set \
             `registry = \"host[:port]/org\"` in [app.{}]",
            app.name,
            app.name
        ),
        Target::Kubernetes => {
            let (section, _) = load_orchestrators(&file)?;
            let dir = file.parent().unwrap_or(std::path::Path::new("."));
            let dest = kubernetes::Destination::new(
                &section,
                dir,
                args.out.clone(),
                args.kube_context.clone(),
            )?;
            Some(Orchestrator::Kubernetes(section, dest))
        }
        Target::Swarm => {
            let (_, section) = load_orchestrators(&file)?;
            let settings = swarm::Settings::new(&section, std::env::var("DOCKER_HOST").ok())?;
            Some(Orchestrator::Swarm(settings))
        }
    };
    if orchestrator.is_none() && (args.out.is_some() || args.kube_context.is_some()) {
        bail!("--out and --kube-context go with --target kubernetes");
    }
    // Every line of the deploy goes to stderr in the mode `--progress` asks for: with `json`,
    // one event per line (docs/cli.md), the build's and the push's too.
    let mut say = |message: &str| out.deploy(&app.name, message);
    let parts = DeployParts {
        project: &args.project,
        insecure: args.insecure,
        out,
        // Used from the app's registry only (built and pushed, or run by an orchestrator):
        // layers the build finds in a registry cache there need not come here.
        used_from: app
            .spec
            .registry
            .clone()
            .filter(|_| args.build_only || orchestrator.is_some()),
    };
    let req = pipeline::Request {
        image: args.image.clone(),
        label: args.image_label.clone(),
        push: args.push,
    };
    // 1. The image: given, pulled or built; 2. pushed where the app publishes.
    let prepared = pipeline::prepare(&store, &app, &req, &parts, &parts, &mut say)?;
    println!("{}", prepared.release_ref);
    if args.build_only {
        return Ok(());
    }
    match orchestrator {
        Some(Orchestrator::Kubernetes(section, dest)) => {
            let image = prepared.pinned(&app, "kubernetes")?;
            kubernetes::release(&app, &image, &section, &dest, &mut say)?;
            return Ok(());
        }
        Some(Orchestrator::Swarm(settings)) => {
            let image = prepared.pinned(&app, "swarm")?;
            swarm::release(&app, &image, &settings, args.detach, &mut say)?;
            return Ok(());
        }
        None => {}
    }
    // On hosts over SSH: the command line's, else the app's (a host's own deploy has none).
    let hosts = if !args.hosts.is_empty() {
        args.hosts.clone()
    } else if args.spec.is_none() {
        app.spec.hosts.clone()
    } else {
        Vec::new()
    };
    if !hosts.is_empty() {
        let remote_image = prepared.tagged.as_deref().unwrap_or(&prepared.local);
        return crate::hosts::deploy_to_hosts(
            &store,
            args,
            out,
            &app,
            &prepared.local,
            remote_image,
            &hosts,
        );
    }
    // 3. Machines, health, switch.
    let mut host = host(store)?;
    let opts = DeployOptions {
        exe: exe()?,
        listen: IpAddr::from([127, 0, 0, 1]),
        wait_for_old: !args.detach,
    };
    pipeline::release_here(&mut host, &app, &prepared, &opts, &parts, &mut say)?;
    Ok(())
}

/// Where an orchestrator target deploys, checked before the build.
enum Orchestrator {
    Kubernetes(kubernetes::KubernetesSection, kubernetes::Destination),
    Swarm(swarm::Settings),
}

/// Where `strata deploy` gets and publishes images: the build engine, the registry client.
struct DeployParts<'a> {
    project: &'a std::path::Path,
    insecure: bool,
    out: &'a Output,
    /// The registry the image is used from when nothing here runs it.
    used_from: Option<String>,
}

impl pipeline::ImageSource for DeployParts<'_> {
    fn build(&self, store: &Store, image: &str) -> Result<String, pipeline::External> {
        Ok(crate::build::build_for_deploy(
            store,
            self.project,
            image,
            self.used_from.as_deref(),
            self.out,
        )?)
    }

    fn pull(&self, store: &Store, reference: &str) -> Result<String, pipeline::External> {
        let reference = Reference::parse(reference)?;
        Ok(crate::registry::pull_ref(
            store,
            &reference,
            self.insecure,
            self.out,
        )?)
    }
}

impl pipeline::Publisher for DeployParts<'_> {
    fn publish(
        &self,
        store: &Store,
        local: &str,
        dest: &str,
        digest: &strata_oci::Digest,
        app: &str,
    ) -> Result<(), pipeline::External> {
        let dest = Reference::parse(dest)?;
        let report = crate::registry::push_ref(store, local, &dest, self.insecure, self.out)?;
        self.out.note(&crate::registry::pushed_note(&report));
        crate::registry::pin_in_embedded_registry(store, &dest, digest, app);
        Ok(())
    }

    fn release_aged(&self, store: &Store, app: &str) {
        crate::registry::unpin_aged_releases_in_embedded_registry(store, app);
    }
}

pub fn releases(store: Store, args: &ReleasesArgs) -> Result<()> {
    let host = host(store)?;
    let rs = host.state.releases(args.app.as_deref())?;
    if args.json {
        for r in &rs {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    if args.image {
        println!("APP\tVERSION\tSTATUS\tIMAGE\tDIGEST\tCREATED");
    } else {
        println!("APP\tVERSION\tSTATUS\tCREATED\tREASON");
    }
    for r in rs {
        let created = format_time(r.created);
        if args.image {
            println!(
                "{}\tv{}\t{}\t{}\t{}\t{created}",
                r.app, r.version, r.status, r.image, r.digest
            );
        } else {
            println!(
                "{}\tv{}\t{}\t{created}\t{}",
                r.app,
                r.version,
                r.status,
                r.reason
                    .as_deref()
                    .unwrap_or("")
                    .lines()
                    .next()
                    .unwrap_or("")
            );
        }
    }
    Ok(())
}

fn format_time(unix: i64) -> String {
    // UTC, like `docker image ls --format {{.CreatedAt}}` without a timezone database.
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), Howard Hinnant's civil_from_days.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn status(store: Store, app: Option<&str>) -> Result<()> {
    let host = host(store)?;
    let agent = agent_pid(host.store.root())?;
    match agent {
        Some(pid) => println!("agent: running (pid {pid})"),
        None => println!("agent: not running"),
    }
    let releases = host.state.releases(app)?;
    let mut apps: Vec<String> = releases.iter().map(|r| r.app.clone()).collect();
    apps.dedup();
    if let Some(a) = app
        && apps.is_empty()
    {
        bail!("no app `{a}` has been deployed on this host");
    }
    for a in apps {
        let current = releases
            .iter()
            .find(|r| r.app == a && r.status == ReleaseStatus::Active);
        let route = host
            .state
            .routes()?
            .into_iter()
            .find(|r| r.owner == format!("app:{a}"));
        println!(
            "app {a}: {}{}",
            current.map_or("no active release".to_string(), |r| format!(
                "v{} ({})",
                r.version, r.image
            )),
            route.map_or(String::new(), |r| match agent {
                Some(_) => format!(", serving on 127.0.0.1:{}", r.port),
                // The port is the agent's: nothing answers there while it is stopped.
                None => format!(
                    ", not serving 127.0.0.1:{} (the agent is stopped; `strata agent` or any \
                     deploy starts it)",
                    r.port
                ),
            })
        );
        for m in host.state.app_machines(&a)? {
            println!("  {}", machine_row(&m));
        }
    }
    Ok(())
}

/// `strata apps list`: every app with a release or machine here, its active release,
/// machine count and public address.
pub fn apps_list(store: Store, json: bool) -> Result<()> {
    let host = host(store)?;
    let releases = host.state.releases(None)?;
    let routes = host.state.routes()?;
    let mut names: Vec<String> = releases.iter().map(|r| r.app.clone()).collect();
    names.extend(host.state.machines()?.into_iter().filter_map(|m| m.app));
    names.sort();
    names.dedup();
    if !json {
        println!("NAME\tRELEASE\tSTATUS\tMACHINES\tPUBLIC\tIMAGE");
    }
    for a in names {
        let active = releases
            .iter()
            .find(|r| r.app == a && r.status == ReleaseStatus::Active);
        let newest = releases.iter().find(|r| r.app == a);
        let machines = host.state.app_machines(&a)?;
        let running = machines
            .iter()
            .filter(|m| m.state == MachineState::Running)
            .count();
        let public = routes
            .iter()
            .find(|r| r.owner == format!("app:{a}"))
            .map(|r| format!("127.0.0.1:{}", r.port));
        if json {
            let v = serde_json::json!({
                "name": a, "release": active.map(|r| r.version),
                "status": newest.map(|r| r.status), "machines": machines.len(),
                "running": running, "public": public, "image": active.map(|r| r.image.clone()),
            });
            println!("{v}");
        } else {
            println!(
                "{a}\t{}\t{}\t{running}/{}\t{}\t{}",
                active.map_or("-".to_string(), |r| format!("v{}", r.version)),
                newest.map_or("-", |r| r.status.as_str()),
                machines.len(),
                public.as_deref().unwrap_or("-"),
                active.map_or("-", |r| r.image.as_str()),
            );
        }
    }
    Ok(())
}

pub fn apps_destroy(store: Store, app: &str, volumes: bool) -> Result<()> {
    let host = host(store)?;
    // Like `fly apps destroy`: a name this host knows nothing of is an error, not a no-op
    // (a typo must not look like success).
    if host.state.releases(Some(app))?.is_empty()
        && host.state.app_machines(app)?.is_empty()
        && host.state.app_tags(app)?.is_empty()
    {
        bail!("no app `{app}` on this host: it has no release, machine or release name here");
    }
    machines::wake_agent(&host, &exe()?)?;
    let destroyed = destroy_app(&host, app, volumes)?;
    let registry_pins = crate::registry::unpin_app_in_embedded_registry(&host.store, app);
    eprintln!(
        "app {app}: {} machine(s) destroyed, {} release name(s) and {} snapshot(s) removed, \
         {} registry pin(s) dropped{}",
        destroyed.machines.len(),
        destroyed.tags.len(),
        destroyed.snapshots,
        registry_pins,
        if volumes { ", volumes removed" } else { "" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_volumes_read_as_docker_reads_them() {
        let bind = |source: &str, target: &str, readonly| {
            RunVolume::Bind(strata_deploy::state::Bind {
                source: source.into(),
                target: target.into(),
                readonly,
            })
        };
        assert_eq!(
            parse_run_volume("data:/data").unwrap(),
            RunVolume::Named("data".into(), "/data".into())
        );
        assert_eq!(
            parse_run_volume("/srv/site:/www").unwrap(),
            bind("/srv/site", "/www", false)
        );
        assert_eq!(
            parse_run_volume("/etc/app.conf:/etc/app.conf:ro").unwrap(),
            bind("/etc/app.conf", "/etc/app.conf", true)
        );
        assert_eq!(
            parse_run_volume("/a:/b:rw,z").unwrap(),
            bind("/a", "/b", false)
        );
        let here = std::env::current_dir().unwrap().join("site");
        assert_eq!(
            parse_run_volume("./site:/www").unwrap(),
            bind(here.to_str().unwrap(), "/www", false)
        );
        for (bad, says) in [
            ("/data", "anonymous volumes"),
            ("/a:/b:rx", "unknown option `rx`"),
            ("/a:b", "must be absolute"),
            ("/a:/b/../c", "without `..`"),
            ("/a:/", "other than `/`"),
            ("data:/d:ro", "read-write"),
            ("a:b:c:d", "expected NAME:/path"),
        ] {
            let e = parse_run_volume(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
