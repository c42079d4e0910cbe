//! A release of an app: new machines from an image, health checks, the proxy switched to them,
//! the old machines drained and stopped. A release that never gets healthy is marked failed
//! and the one before keeps serving.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::app::App;
use crate::error::{Error, Result};
use crate::health::wait_healthy_unless;
use crate::host::{Host, MachineOptions, tail_lines};
use crate::state::{Desired, Machine, MachineState, Release, ReleaseStatus};

/// What [`deploy_image`] did.
#[derive(Debug, Clone)]
pub struct DeployReport {
    /// The new release.
    pub release: Release,
    /// Its machines.
    pub machines: Vec<String>,
    /// Machines of earlier releases being stopped.
    pub replaced: Vec<String>,
    /// Where the app answers; none for an app without a port.
    pub public: Option<SocketAddr>,
    /// Nothing changed (same image, same machine config, its machines running): the active
    /// release keeps serving and nothing was made.
    pub unchanged: bool,
}

/// Options of [`deploy_image`].
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// The strata binary, to start the agent if it does not run.
    pub exe: std::path::PathBuf,
    /// Address the agent's proxy listens on (for the report).
    pub listen: IpAddr,
    /// Wait until the old machines are gone before returning.
    pub wait_for_old: bool,
}

/// `GET :8080/healthz` or `tcp :8080`, for progress lines.
fn describe(h: &crate::health::HealthConfig) -> String {
    match &h.check {
        crate::health::Check::Http { path, .. } => format!("GET :{}{path}", h.port),
        crate::health::Check::Tcp => format!("tcp :{}", h.port),
    }
}

fn owner(app: &str) -> String {
    format!("app:{app}")
}

/// The holder of the store pin that keeps release `version` of `app` for rollback.
pub fn release_pin(app: &str, version: u32) -> String {
    format!("{}{version}", release_pin_prefix(app))
}

/// What every release pin of `app` starts with ([`release_pin`]).
pub fn release_pin_prefix(app: &str) -> String {
    format!("release:{app}:")
}

/// Waits until `f` says done (Some) or `timeout` passes (then `Ok(None)`), looking every
/// millisecond for the first 200 ms, then every 5 ms.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<Option<T>> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        // Ctrl-C: every wait ends, so the caller's failure path undoes what it made.
        if strata_runtime::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        // A read of the WAL database costs microseconds; waiting longer only adds latency.
        // Most waits (a machine start) end within a few tens of milliseconds: look every
        // millisecond then, every 5 ms after.
        let pause = if start.elapsed() < Duration::from_millis(200) {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(5)
        };
        std::thread::sleep(pause);
    }
}

/// Waits until the agent reports machine `id` running; a failed start is an error with the
/// machine's last log lines.
pub fn wait_running(host: &Host, id: &str, timeout: Duration) -> Result<Machine> {
    let m = poll(timeout, || {
        let Some(m) = host.state.machine(id)? else {
            return Err(Error::UnknownMachine(id.to_string()));
        };
        match m.state.as_str() {
            "running" => Ok(Some(m)),
            "failed" => Err(Error::Machine {
                id: id.to_string(),
                reason: format!(
                    "failed to start: {}\n{}",
                    m.error.unwrap_or_default(),
                    tail_lines(&host.log_path(id), 10)
                ),
            }),
            "exited" if m.desired != Desired::Running => Err(Error::Machine {
                id: id.to_string(),
                reason: format!(
                    "exited with code {} right after starting; last log lines:\n{}",
                    m.exit_code.map_or("?".into(), |c| c.to_string()),
                    tail_lines(&host.log_path(id), 10)
                ),
            }),
            _ => Ok(None),
        }
    })?;
    m.ok_or_else(|| Error::Machine {
        id: id.to_string(),
        reason: format!(
            "not running after {} s; is the agent up? (see strata/agent.log in the store)",
            timeout.as_secs()
        ),
    })
}

/// A new machine restarted this often while its release waits for health is crash-looping:
/// the release fails at once with its exit code instead of waiting out the deadline.
const CRASH_RESTARTS: u32 = 3;

/// Waits until the agent has put the route's current generation in place.
fn wait_route(host: &Host, port: u16, generation: i64) -> Result<()> {
    let done = poll(Duration::from_secs(15), || {
        let Some(r) = host.state.route(port)? else {
            return Ok(Some(()));
        };
        if let Some(e) = r.error {
            return Err(Error::Agent(format!("cannot serve port {port}: {e}")));
        }
        Ok((r.applied >= generation).then_some(()))
    })?;
    done.ok_or_else(|| Error::Agent(format!("the agent did not switch port {port} within 15 s")))
}

/// Deploys `image` (a ref of the store) as a new release of `app`.
pub fn deploy_image(
    host: &mut Host,
    app: &App,
    image: &str,
    opts: &DeployOptions,
    log: &mut dyn FnMut(&str),
) -> Result<DeployReport> {
    let img = crate::host::find_image(&host.store, image)?;
    let digest = img.descriptor.digest.clone();
    // An app without a port (a worker) has no route: nothing to check or switch.
    let port = app.public_port();
    if let Some(port) = port {
        check_port_free(host, app, SocketAddr::new(opts.listen, port))?;
    }
    let machine_opts_for = |v: u32| -> Result<MachineOptions> {
        Ok(MachineOptions {
            env: app
                .spec
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            volumes: app.volumes()?,
            service_port: app.spec.port,
            restart: app.restart()?,
            kill_timeout_ms: Some(app.kill_timeout()?.as_millis() as u64),
            app: Some((app.name.clone(), v)),
            memory: app.memory()?,
            millicpus: app.millicpus()?,
            ..MachineOptions::default()
        })
    };
    let public = port.map(|port| SocketAddr::new(opts.listen, port));
    if let Some(report) = unchanged(host, app, image, &digest, &machine_opts_for, public)? {
        log(&format!(
            "nothing changed: v{} of {} keeps running ({})",
            report.release.version,
            app.name,
            digest.short()
        ));
        return Ok(report);
    }
    crate::agent::ensure_agent(host.store.root(), &opts.exe)?;
    let release = host.state.begin_release(&app.name, image, &digest)?;
    let v = release.version;
    host.store
        .pin(&digest, &release_pin(&app.name, v))
        .map_err(|source| Error::Image {
            image: image.to_string(),
            source,
        })?;
    log(&format!(
        "release v{v} of {}: {image} ({})",
        app.name,
        digest.short()
    ));
    let health = app.health()?;
    let machine_opts = machine_opts_for(v)?;
    // Whether the agent restarts an exited machine (else one exit ends the release's hopes).
    let restarts = !matches!(machine_opts.restart, crate::state::RestartPolicy::No);
    let mut new = Vec::new();
    let outcome = (|| -> Result<()> {
        for _ in 0..app.count() {
            let m = host.create_machine(image, &machine_opts)?;
            log(&format!("machine {} created", m.id));
            new.push(m);
        }
        crate::agent::poke(host.store.root());
        for m in &new {
            wait_running(host, &m.id, Duration::from_secs(60))?;
            let addr = IpAddr::V4(Host::machine_addr(m));
            let Some((health, deadline)) = &health else {
                log(&format!(
                    "machine {} running at {addr} (no health check)",
                    m.id
                ));
                continue;
            };
            log(&format!(
                "machine {} running at {addr}; checking health ({})",
                m.id,
                describe(health)
            ));
            let crashing = || -> Option<String> {
                let m = host.state.machine(&m.id).ok()??;
                let code = m.exit_code.map_or("?".into(), |c| c.to_string());
                match m.state.as_str() {
                    "failed" => Some(format!(
                        "failed to start: {}",
                        m.error.clone().unwrap_or_default()
                    )),
                    _ if m.restarts >= CRASH_RESTARTS => Some(format!(
                        "exited with code {code}, restarted {} times",
                        m.restarts
                    )),
                    "exited" if m.desired == Desired::Running && m.restarts == 0 && !restarts => {
                        Some(format!("exited with code {code}"))
                    }
                    _ => None,
                }
            };
            wait_healthy_unless(addr, health, *deadline, &crashing).map_err(|e| {
                Error::Machine {
                    id: m.id.clone(),
                    reason: format!(
                        "unhealthy: {e}; last log lines:\n{}",
                        tail_lines(&host.log_path(&m.id), 10)
                    ),
                }
            })?;
            log(&format!("machine {} healthy", m.id));
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        let reason = e.to_string();
        host.state
            .set_release_status(&app.name, v, ReleaseStatus::Failed, Some(&reason))?;
        for m in &new {
            host.state.set_desired(&m.id, Desired::Destroyed)?;
        }
        crate::agent::poke(host.store.root());
        let _ = host.store.unpin(&digest, &release_pin(&app.name, v));
        let serving = host
            .state
            .releases(Some(&app.name))?
            .into_iter()
            .find(|r| r.status == ReleaseStatus::Active)
            .map_or("no earlier release serves the app".to_string(), |r| {
                format!("v{} keeps serving", r.version)
            });
        return Err(Error::ReleaseFailed {
            app: app.name.clone(),
            version: v,
            reason: format!("{reason}\n{serving}"),
        });
    }
    // Switch: new connections go to the new machines; the agent drains the old ones. An app
    // without a port has no route: its old machines just stop.
    if let (Some(port), Some(app_port)) = (port, app.spec.port) {
        // Switch: new connections go to the new machines; the agent drains the old ones.
        let previous = host.state.route(port)?;
        let backends: Vec<SocketAddr> = new
            .iter()
            .map(|m| SocketAddr::new(IpAddr::V4(Host::machine_addr(m)), app_port))
            .collect();
        let generation = host.state.set_route(port, &owner(&app.name), &backends)?;
        crate::agent::poke(host.store.root());
        if let Err(e) = wait_route(host, port, generation) {
            // Put the route back as it was and remove what this release made.
            match &previous {
                Some(r) => {
                    host.state.set_route(port, &r.owner, &r.backends)?;
                }
                None => host.state.delete_route(port)?,
            }
            for m in &new {
                host.state.set_desired(&m.id, Desired::Destroyed)?;
            }
            crate::agent::poke(host.store.root());
            host.state.set_release_status(
                &app.name,
                v,
                ReleaseStatus::Failed,
                Some(&e.to_string()),
            )?;
            let _ = host.store.unpin(&digest, &release_pin(&app.name, v));
            return Err(Error::ReleaseFailed {
                app: app.name.clone(),
                version: v,
                reason: e.to_string(),
            });
        }
    }
    let new_ids: Vec<String> = new.iter().map(|m| m.id.clone()).collect();
    let mut replaced = Vec::new();
    for m in host.state.app_machines(&app.name)? {
        if !new_ids.contains(&m.id) && m.desired != Desired::Destroyed {
            host.state.set_desired(&m.id, Desired::Destroyed)?;
            replaced.push(m.id);
        }
    }
    for r in host.state.releases(Some(&app.name))? {
        if r.version != v && r.status == ReleaseStatus::Active {
            host.state
                .set_release_status(&app.name, r.version, ReleaseStatus::Superseded, None)?;
        }
    }
    host.state
        .set_release_status(&app.name, v, ReleaseStatus::Active, None)?;
    unpin_old_releases(host, app)?;
    match port {
        Some(port) => log(&format!(
            "v{v} serves {}:{port}; {} old machine(s) draining",
            opts.listen,
            replaced.len()
        )),
        None => log(&format!(
            "v{v} runs (no port, no route); {} old machine(s) stopping",
            replaced.len()
        )),
    }
    if opts.wait_for_old {
        let timeout = app.kill_timeout()? * 2 + Duration::from_secs(15);
        for id in &replaced {
            let gone = poll(timeout, || {
                Ok(host.state.machine(id)?.is_none().then_some(()))
            })?;
            if gone.is_none() {
                warn!(machine = %id, "old machine still exists");
            }
        }
    }
    Ok(DeployReport {
        release: Release {
            status: ReleaseStatus::Active,
            ..release
        },
        machines: new_ids,
        replaced,
        public,
        unchanged: false,
    })
}

/// The active release, when deploying `image` would change nothing: the same manifest, the
/// same machine config, its machines all running (as many as `count`), and its route in place.
fn unchanged(
    host: &Host,
    app: &App,
    image: &str,
    digest: &strata_oci::Digest,
    machine_opts_for: &dyn Fn(u32) -> Result<MachineOptions>,
    public: Option<SocketAddr>,
) -> Result<Option<DeployReport>> {
    let Some(active) = host
        .state
        .releases(Some(&app.name))?
        .into_iter()
        .find(|r| r.status == ReleaseStatus::Active)
    else {
        return Ok(None);
    };
    if active.digest != *digest {
        return Ok(None);
    }
    let (_, planned) = host.machine_config(image, &machine_opts_for(active.version)?)?;
    let machines: Vec<Machine> = host
        .state
        .app_machines(&app.name)?
        .into_iter()
        .filter(|m| m.desired != Desired::Destroyed)
        .collect();
    let all_running = machines.len() == app.count() as usize
        && machines.iter().all(|m| {
            m.release == Some(active.version)
                && m.desired == Desired::Running
                && m.state == MachineState::Running
                && m.config == planned
        });
    if !all_running {
        return Ok(None);
    }
    if let Some(public) = public {
        let mut backends: Vec<SocketAddr> = machines
            .iter()
            .filter_map(|m| {
                Some(SocketAddr::new(
                    IpAddr::V4(Host::machine_addr(m)),
                    app.spec.port?,
                ))
            })
            .collect();
        backends.sort();
        let routed = host.state.route(public.port())?.is_some_and(|r| {
            let mut now = r.backends.clone();
            now.sort();
            r.owner == owner(&app.name) && now == backends
        });
        if !routed {
            return Ok(None);
        }
    }
    Ok(Some(DeployReport {
        machines: machines.iter().map(|m| m.id.clone()).collect(),
        release: active,
        replaced: Vec::new(),
        public,
        unchanged: true,
    }))
}

/// The app's public port must be this app's route already, or free: checked before anything
/// is created, so a taken port leaves nothing behind.
fn check_port_free(host: &Host, app: &App, addr: SocketAddr) -> Result<()> {
    check_port(host, &owner(&app.name), addr)
        .map_err(|e| Error::Config(format!("app {}: {e}; set public_port", app.name)))
}

/// Whether `owner` (`app:web`, `machine:ID`) may serve on `addr`: the port is its route
/// already, or no route and no other program has it. The error says who has it.
pub fn check_port(host: &Host, owner: &str, addr: SocketAddr) -> Result<()> {
    match host.state.route(addr.port())? {
        Some(r) if r.owner == owner => Ok(()),
        Some(r) => Err(Error::Config(format!(
            "port {} is already served for {}",
            addr.port(),
            r.owner
        ))),
        None => match std::net::TcpListener::bind(addr) {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::Config(format!(
                "cannot serve on {addr}: {e} (another program uses the port)"
            ))),
        },
    }
}

/// Keeps the images of the newest `keep_releases` non-failed releases pinned (for rollback);
/// unpins the rest.
fn unpin_old_releases(host: &Host, app: &App) -> Result<()> {
    let keep = app.spec.keep_releases.unwrap_or(3) as usize;
    let releases = host.state.releases(Some(&app.name))?;
    for r in releases
        .iter()
        .filter(|r| r.status != ReleaseStatus::Failed)
        .skip(keep.max(1))
    {
        let _ = host
            .store
            .unpin(&r.digest, &release_pin(&app.name, r.version));
    }
    Ok(())
}

/// What [`destroy_app`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destroyed {
    /// The app's machines (stopped and removed by the agent).
    pub machines: Vec<String>,
    /// Store names its deploys made (`<app>:deployment-<ULID>`, `--image-label`).
    pub tags: Vec<String>,
    /// Snapshots no image of the store needs any more (see `Store::prune_snapshots`).
    pub snapshots: usize,
}

/// Removes an app from this host: its route, machines (the agent stops them, removing their
/// logs and upper dirs), releases and their pins, the store names its deploys made, and then
/// the snapshots no remaining image needs; its named volumes only when `volumes` is set. The
/// images themselves stay until `strata gc` (as after `docker rmi`) unless something else
/// names or pins them.
pub fn destroy_app(host: &Host, name: &str, volumes: bool) -> Result<Destroyed> {
    let mut destroyed = Destroyed::default();
    let mut vols = Vec::new();
    for m in host.state.app_machines(name)? {
        vols.extend(m.config.volumes.iter().map(|(n, _)| n.clone()));
        host.state.set_desired(&m.id, Desired::Destroyed)?;
        destroyed.machines.push(m.id);
    }
    for r in host.state.routes()? {
        if r.owner == owner(name) {
            host.state.delete_route(r.port)?;
        }
    }
    for r in host.state.releases(Some(name))? {
        let _ = host.store.unpin(&r.digest, &release_pin(name, r.version));
    }
    host.state.delete_releases(name)?;
    crate::agent::poke(host.store.root());
    // Wait until the agent has stopped and removed them: when this returns, nothing of the
    // app runs or holds a mount.
    for id in &destroyed.machines {
        let gone = poll(Duration::from_secs(60), || {
            Ok(host.state.machine(id)?.is_none().then_some(()))
        })?;
        if gone.is_none() {
            return Err(Error::Machine {
                id: id.clone(),
                reason: "still not destroyed after 60 s; is the agent running?".into(),
            });
        }
    }
    for tag in host.state.app_tags(name)? {
        let removed = host.store.remove_ref(&tag).map_err(|source| Error::Image {
            image: tag.clone(),
            source,
        })?;
        if removed.is_some() {
            destroyed.tags.push(tag);
        }
    }
    host.state.delete_app_tags(name)?;
    // What `strata dev` synced into the app's machines.
    let dev = host.dev_dir(name);
    match std::fs::remove_dir_all(&dev) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::Io {
                op: "cannot remove",
                path: dev,
                source: e,
            });
        }
        _ => {}
    }
    destroyed.snapshots = host
        .store
        .prune_snapshots(false)
        .map_err(|source| Error::Image {
            image: format!("snapshots of {name}"),
            source,
        })?
        .len();
    if volumes {
        vols.sort();
        vols.dedup();
        for v in vols {
            host.remove_volume(&v)?;
        }
    }
    Ok(destroyed)
}

/// Where strata.toml is for a project directory or file.
pub fn project_file(path: &Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join("strata.toml")
    } else {
        path.to_path_buf()
    }
}
