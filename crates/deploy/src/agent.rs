//! The host agent: one process per store that keeps machines as the state DB says they should
//! be (start, restart per policy, stop, destroy), owns the host ports through the proxy, and
//! rotates machine logs.
//!
//! The CLI never talks to the agent directly: it writes what it wants in the DB and polls for
//! the result, so the agent can restart at any time without losing anything. Machines run
//! detached (`runc run -d`), so they outlive the agent; a new agent adopts them by asking runc.
//! The agent is a child subreaper, so the PID 1 of every machine it started is its child and
//! `waitpid` gives the exit code the restart policy needs.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_oci::sync::MutexExt;
use strata_runtime::{
    MachineStatus, NetSpec, prepare_network, process_alive, process_start_time, teardown_network,
};
use strata_store::Store;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::host::Host;
use crate::proxy::Proxy;
use crate::state::{Desired, Machine, MachineState, State};

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Time between two looks at the DB.
    pub tick: Duration,
    /// A machine log is rotated when it grows past this.
    pub log_max_bytes: u64,
    /// Rotated logs kept (`machine.log.1` … `.N`).
    pub log_keep: u32,
    /// Address the proxy listens on for every route.
    pub listen: IpAddr,
    /// Machine networks (namespace + veth pair) kept made ahead of time: a new machine takes
    /// one instead of waiting for `ip` to make its own (about 6 ms of a start here).
    pub spare_networks: usize,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            tick: Duration::from_millis(100),
            log_max_bytes: 8 << 20,
            log_keep: 2,
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            spare_networks: 2,
        }
    }
}

fn agent_lock_path(root: &Path) -> PathBuf {
    root.join("strata/agent.lock")
}

/// `<store>/strata/agent.log`: the agent's own output.
pub fn agent_log_path(root: &Path) -> PathBuf {
    root.join("strata/agent.log")
}

fn agent_pid_path(root: &Path) -> PathBuf {
    root.join("strata/agent.pid")
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Takes the agent lock of a store, or says who holds it.
fn take_lock(root: &Path) -> Result<Option<File>> {
    let path = agent_lock_path(root);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    match rustix::fs::flock(
        f.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    ) {
        Ok(()) => Ok(Some(f)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(Error::Io {
            op: "lock",
            path,
            source: e.into(),
        }),
    }
}

/// The pid of the store's running agent, if one runs.
pub fn agent_pid(root: &Path) -> Result<Option<u32>> {
    if take_lock(root)?.is_some() {
        return Ok(None);
    }
    Ok(std::fs::read_to_string(agent_pid_path(root))
        .ok()
        .and_then(|s| s.trim().parse().ok()))
}

/// Starts the store's agent in the background (`<exe> --store ROOT agent`) unless one runs, and
/// waits until it holds its lock. An agent that runs another strata binary than `exe` (the
/// one installed before an upgrade) is stopped and started again from `exe`, so what the new
/// binary does for machines takes effect; its machines keep running and the new agent adopts
/// them.
pub fn ensure_agent(root: &Path, exe: &Path) -> Result<u32> {
    if let Some(pid) = agent_pid(root)? {
        if !runs_another_binary(pid, exe) {
            return Ok(pid);
        }
        info!(
            "the agent (pid {pid}) runs another strata binary than {}: restarting it",
            exe.display()
        );
        stop_agent(root)?;
    }
    let log_path = agent_log_path(root);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io("open", &log_path))?;
    let log2 = log.try_clone().map_err(io("open", &log_path))?;
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(exe)
        .arg("--store")
        .arg(root)
        .arg("agent")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C in the terminal that started it does not reach it.
        .process_group(0)
        .spawn()
        .map_err(io("start agent", exe))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(pid) = agent_pid(root)? {
            // Reaped when it exits, so a long-lived caller (a test harness, a daemon embedding
            // us) keeps no zombie; a CLI exits long before and leaves it to init.
            std::thread::spawn(move || child.wait());
            return Ok(pid);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Agent(format!(
                "the agent exited at once ({status}); its log {} says:\n{}",
                log_path.display(),
                crate::host::tail_lines(&log_path, 10)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Agent(format!(
        "the agent did not start within 10 s; see {}",
        log_path.display()
    )))
}

/// Whether process `pid` runs an executable file other than `exe` (compared by device and
/// inode: an upgrade installs a new file). When either cannot be read, it is taken as the same.
fn runs_another_binary(pid: u32, exe: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let running = std::fs::metadata(format!("/proc/{pid}/exe"));
    match (running, std::fs::metadata(exe)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) != (b.dev(), b.ino()),
        _ => false,
    }
}

/// Tells the store's agent that the DB changed (it looks at once instead of at its next tick).
/// Without an agent this does nothing.
pub fn poke(root: &Path) {
    if let Ok(Some(pid)) = agent_pid(root)
        && let Some(pid) = rustix::process::Pid::from_raw(pid as i32)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::USR1);
    }
}

/// Asks the store's agent to exit (machines keep running) and waits for it.
pub fn stop_agent(root: &Path) -> Result<bool> {
    let Some(pid) = agent_pid(root)? else {
        return Ok(false);
    };
    let pid_t = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| Error::Agent(format!("bad agent pid {pid}")))?;
    rustix::process::kill_process(pid_t, rustix::process::Signal::TERM)
        .map_err(|e| Error::Agent(format!("cannot signal agent {pid}: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if agent_pid(root)?.is_none() {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Error::Agent(format!(
        "agent {pid} did not exit within 20 s"
    )))
}

/// Work the agent does outside its loop (stopping takes up to a grace period).
#[derive(Default)]
struct Busy {
    ids: HashSet<String>,
}

struct Agent {
    root: PathBuf,
    host: Host,
    opts: AgentOptions,
    rt: tokio::runtime::Runtime,
    /// PID 1 of machines we started (our children) → machine id.
    children: HashMap<u32, String>,
    /// Machines running before this agent started (not our children): id → PID 1 and its
    /// start time, so that a tick sees whether they still run from `/proc`, without a
    /// `runc state` process per machine.
    adopted: HashMap<String, (u32, String)>,
    proxies: HashMap<u16, Proxy>,
    /// Machines being stopped or destroyed by a worker thread.
    busy: Arc<Mutex<Busy>>,
    /// Earliest time a machine may be started again (restart backoff).
    not_before: HashMap<String, Instant>,
    /// When an old machine's connections started draining.
    draining: HashMap<String, Instant>,
    /// The thread making spare networks, while it runs.
    spare_maker: Option<std::thread::JoinHandle<Result<()>>>,
    /// After a spare network could not be made: no new try before then.
    spare_retry: Option<Instant>,
}

/// Runs the agent until SIGTERM or SIGINT. Fails at once if another agent serves the store.
pub fn run_agent(store: Store, opts: AgentOptions) -> Result<()> {
    let root = store.root().to_path_buf();
    let Some(lock) = take_lock(&root)? else {
        return Err(Error::Agent(format!(
            "an agent already serves {} (pid {})",
            root.display(),
            agent_pid(&root)?.map_or("?".into(), |p| p.to_string())
        )));
    };
    // A pid file left by a killed agent must not be read as ours before we write it.
    let pid_path = agent_pid_path(&root);
    let _ = std::fs::remove_file(&pid_path);
    strata_runtime::set_child_subreaper()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime {
            what: "the agent",
            source,
        })?;
    let stop = Arc::new(AtomicBool::new(false));
    // SIGUSR1 from the CLI ("the DB changed") wakes the loop at once instead of at the next
    // tick; SIGTERM/SIGINT also wake it, to stop.
    let (wake_tx, wake_rx) = std::sync::mpsc::channel::<()>();
    {
        let stop = stop.clone();
        // Handlers are installed before the pid file tells the CLI where to send signals:
        // SIGUSR1's default action would end the agent.
        use tokio::signal::unix::{SignalKind, signal};
        let _guard = rt.enter();
        let sig = |kind| {
            signal(kind).map_err(|source| Error::Runtime {
                what: "the agent's signal handlers",
                source,
            })
        };
        let (mut term, mut int, mut usr1) = (
            sig(SignalKind::terminate())?,
            sig(SignalKind::interrupt())?,
            sig(SignalKind::user_defined1())?,
        );
        rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                    _ = usr1.recv() => {
                        let _ = wake_tx.send(());
                    }
                }
            }
            stop.store(true, Ordering::SeqCst);
            let _ = wake_tx.send(());
        });
    }
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .map_err(io("write", &pid_path))?;
    let mut agent = Agent::new(root.clone(), Host::open(store)?, opts, rt);
    info!(store = %root.display(), "agent started");
    // Spares a killed agent left (some perhaps half made) are not trusted: made again later.
    agent.drop_spares();
    agent.adopt()?;
    // Machines' way out (NAT); off the start path of the machine that may be waiting for us.
    std::thread::spawn(|| {
        if let Err(e) = strata_runtime::ensure_host_nat() {
            warn!("machines get no outbound network (NAT): {e}");
        }
    });
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = agent.tick() {
            warn!("agent: {e}");
        }
        // Machines that exit are only seen by polling (waitpid/runc), hence the tick.
        let _ = wake_rx.recv_timeout(agent.opts.tick);
        while wake_rx.try_recv().is_ok() {}
    }
    info!("agent stopping; machines keep running");
    if let Some(maker) = agent.spare_maker.take() {
        let _ = maker.join();
    }
    agent.drop_spares();
    for (_, p) in agent.proxies.drain() {
        agent.rt.block_on(p.shutdown());
    }
    let _ = std::fs::remove_file(&pid_path);
    drop(lock);
    Ok(())
}

impl Agent {
    /// An agent of the store at `root` (seen through `host`) that has done nothing yet.
    fn new(root: PathBuf, host: Host, opts: AgentOptions, rt: tokio::runtime::Runtime) -> Agent {
        Agent {
            root,
            host,
            opts,
            rt,
            children: HashMap::new(),
            adopted: HashMap::new(),
            proxies: HashMap::new(),
            busy: Arc::default(),
            not_before: HashMap::new(),
            draining: HashMap::new(),
            spare_maker: None,
            spare_retry: None,
        }
    }

    /// Machines that were running when the last agent stopped: runc still knows them.
    fn adopt(&mut self) -> Result<()> {
        for m in self.host.state.machines()? {
            if m.state != MachineState::Running {
                continue;
            }
            match self.host.driver.status(&m.id)? {
                MachineStatus::Running { pid } => {
                    info!(machine = %m.id, pid, "adopted");
                    if let Some(start) = process_start_time(pid) {
                        self.adopted.insert(m.id.clone(), (pid, start));
                    }
                    self.host.state.set_observed(
                        &m.id,
                        MachineState::Running,
                        Some(pid),
                        None,
                        None,
                    )?;
                }
                _ => self.on_exit(&m, None)?,
            }
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<()> {
        // Exits of our children, by pid only: waiting for any child would also reap the runc
        // commands worker threads are waiting for.
        let mut exits: HashMap<String, Option<i32>> = HashMap::new();
        let pids: Vec<u32> = self.children.keys().copied().collect();
        for pid in pids {
            let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
                continue;
            };
            match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                Ok(Some((_, status))) => {
                    if let Some(id) = self.children.remove(&pid) {
                        exits.insert(id, exit_code(status));
                    }
                }
                Ok(None) => {}
                Err(_) => {
                    if let Some(id) = self.children.remove(&pid) {
                        exits.insert(id, None);
                    }
                }
            }
        }
        let machines = self.host.state.machines()?;
        let adopted_running: Vec<&Machine> = machines
            .iter()
            .filter(|m| {
                m.state == MachineState::Running
                    && !exits.contains_key(&m.id)
                    && !m.pid.is_some_and(|p| self.children.contains_key(&p))
            })
            .collect();
        for m in adopted_running {
            if self.is_busy(&m.id) {
                continue;
            }
            let alive = match self.adopted.get(&m.id) {
                Some((pid, start)) if m.pid == Some(*pid) => process_alive(*pid, start),
                // Not seen at adoption (or its pid changed): ask runc, once.
                _ => match self.host.driver.status(&m.id)? {
                    MachineStatus::Running { pid } => {
                        if let Some(start) = process_start_time(pid) {
                            self.adopted.insert(m.id.clone(), (pid, start));
                        }
                        true
                    }
                    _ => false,
                },
            };
            if !alive {
                self.adopted.remove(&m.id);
                exits.insert(m.id.clone(), None);
            }
        }
        self.adopted
            .retain(|id, _| machines.iter().any(|m| &m.id == id));
        for m in &machines {
            if let Some(code) = exits.get(&m.id) {
                self.on_exit(m, *code)?;
            }
        }
        self.apply_routes()?;
        // Desired states, with what on_exit changed (read again only if it changed rows).
        let machines = if exits.is_empty() {
            machines
        } else {
            self.host.state.machines()?
        };
        for m in &machines {
            if self.is_busy(&m.id) {
                continue;
            }
            if let Err(e) = self.reconcile(m) {
                warn!(machine = %m.id, "{e}");
                self.host.state.set_observed(
                    &m.id,
                    MachineState::Failed,
                    None,
                    None,
                    Some(&e.to_string()),
                )?;
                if m.desired == Desired::Running {
                    self.host.state.give_up(&m.id)?;
                }
            }
        }
        self.rotate_logs(&machines);
        self.keep_spares();
        Ok(())
    }

    /// Starts a thread that makes spare networks when fewer than `spare_networks` exist and
    /// none is being made. Runs after the tick's starts, so it never delays one.
    fn keep_spares(&mut self) {
        if let Some(maker) = self.spare_maker.take_if(|m| m.is_finished()) {
            let failed = match maker.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("the thread making it panicked".to_string()),
            };
            if let Some(e) = failed {
                warn!("could not make a spare machine network (next try in a minute): {e}");
                self.spare_retry = Some(Instant::now() + Duration::from_secs(60));
            }
        }
        if self.spare_maker.is_some() || self.spare_retry.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let missing = match self.host.state.spare_count() {
            Ok(n) => self.opts.spare_networks.saturating_sub(n),
            Err(e) => {
                warn!("spare networks: {e}");
                return;
            }
        };
        if missing == 0 {
            return;
        }
        match self.host.state.reopen() {
            Ok(state) => {
                self.spare_maker = Some(std::thread::spawn(move || make_spares(state, missing)));
            }
            Err(e) => warn!("spare networks: {e}"),
        }
    }

    /// Tears down every spare network and frees its slot.
    fn drop_spares(&mut self) {
        let slots = match self.host.state.take_spares() {
            Ok(s) => s,
            Err(e) => {
                warn!("spare networks: {e}");
                return;
            }
        };
        for index in slots {
            match teardown_network("spare", &NetSpec { index }) {
                Ok(()) => self.host.state.release_spare(index),
                // The claim stays: the slot is not handed out with a network in an unknown state.
                Err(e) => warn!("spare network {index}: {e}"),
            }
        }
    }

    fn is_busy(&self, id: &str) -> bool {
        self.busy.lock_ok().ids.contains(id)
    }

    fn on_exit(&mut self, m: &Machine, code: Option<i32>) -> Result<()> {
        info!(machine = %m.id, ?code, "exited");
        if let Ok(spec) = self.host.spec(m)
            && let Err(e) = self.host.driver.cleanup(&spec)
        {
            warn!(machine = %m.id, "cleanup: {e}");
        }
        self.host
            .state
            .set_observed(&m.id, MachineState::Exited, None, code, None)?;
        if m.desired == Desired::Running {
            if m.config.restart.restarts_after(code, m.restarts) {
                self.host.state.bump_restarts(&m.id)?;
                // Backoff doubles per restart in a row: 100 ms, 200 ms, … at most 10 s.
                let delay =
                    Duration::from_millis(100u64 << m.restarts.min(7)).min(Duration::from_secs(10));
                self.not_before.insert(m.id.clone(), Instant::now() + delay);
            } else {
                // Keeps its restart count; only a user's start resets it.
                self.host.state.give_up(&m.id)?;
            }
        }
        Ok(())
    }

    fn reconcile(&mut self, m: &Machine) -> Result<()> {
        match m.desired {
            Desired::Running => {
                if m.state == MachineState::Running {
                    return Ok(());
                }
                if self
                    .not_before
                    .get(&m.id)
                    .is_some_and(|t| Instant::now() < *t)
                {
                    return Ok(());
                }
                self.not_before.remove(&m.id);
                let t0 = Instant::now();
                // The image's snapshots are unpacked (spec) and mounted (start) inside a write
                // session: a `strata gc` running meanwhile waits, so it never removes a snapshot
                // between the two (the image's pin keeps it from then on).
                let session = self
                    .host
                    .store
                    .write_session()
                    .map_err(|source| Error::Image {
                        image: m.image.clone(),
                        source,
                    })?;
                let spec = self.host.spec(m)?;
                let t_spec = t0.elapsed();
                // A stopped container left by a crash would make `runc run` refuse the id; a
                // machine never started has none (and its start is what users wait for).
                if m.state != MachineState::Created {
                    self.host.driver.cleanup(&spec)?;
                }
                let t_cleanup = t0.elapsed();
                let pid = self.host.driver.start(&spec)?;
                drop(session);
                debug!(machine = %m.id, ?t_spec, ?t_cleanup, total = ?t0.elapsed(), "start timings");
                info!(machine = %m.id, pid, "started");
                self.children.insert(pid, m.id.clone());
                self.host.state.set_observed(
                    &m.id,
                    MachineState::Running,
                    Some(pid),
                    None,
                    None,
                )?;
            }
            Desired::Stopped | Desired::Destroyed => {
                if m.state == MachineState::Running && !self.drained(m) {
                    return Ok(());
                }
                if m.state == MachineState::Running || m.desired == Desired::Destroyed {
                    self.spawn_stop(m)?;
                }
            }
        }
        Ok(())
    }

    /// Whether no proxy still forwards connections to the machine (or draining took longer
    /// than its kill timeout).
    fn drained(&mut self, m: &Machine) -> bool {
        let addr = IpAddr::V4(Host::machine_addr(m));
        let addrs: Vec<SocketAddr> = m
            .config
            .ports
            .iter()
            .map(|(_, port)| *port)
            .chain(m.config.service_port)
            .map(|port| SocketAddr::new(addr, port))
            .collect();
        if addrs.is_empty() {
            return true;
        }
        // The machine's own published ports (`machine run -p`) route only to it and stay
        // until it is gone: they are no traffic to drain first (as `docker stop`).
        let own: Vec<u16> = m.config.ports.iter().map(|(host, _)| *host).collect();
        let others = || {
            self.proxies
                .iter()
                .filter(|(port, _)| !own.contains(port))
                .map(|(_, p)| p)
        };
        let routed = others().any(|p| p.backends().iter().any(|b| addrs.contains(b)));
        let active: usize = others()
            .flat_map(|p| addrs.iter().map(|a| p.active_connections(*a)))
            .sum();
        // No settling time needed: the proxy counts a connection from the moment it picks a
        // backend, under the lock a switch takes (see `proxy`), so once no proxy routes here
        // and none counts a connection, none ever will.
        let since = *self
            .draining
            .entry(m.id.clone())
            .or_insert_with(Instant::now);
        let done = (!routed && active == 0)
            || since.elapsed() >= Duration::from_millis(m.config.kill_timeout_ms);
        if done {
            self.draining.remove(&m.id);
        }
        done
    }

    /// Stops (and for destroy, removes) a machine on a worker thread: the stop signal's grace
    /// period must not hold up the other machines.
    fn spawn_stop(&mut self, m: &Machine) -> Result<()> {
        let spec = self.host.spec(m).ok();
        let was_child = m.pid.and_then(|p| self.children.remove(&p).map(|_| p));
        self.busy.lock_ok().ids.insert(m.id.clone());
        let busy = self.busy.clone();
        let driver = self.host.driver.clone();
        let root = self.root.clone();
        let m = m.clone();
        std::thread::spawn(move || {
            let result = (|| -> Result<Option<i32>> {
                let mut code = None;
                if let Some(spec) = &spec {
                    if m.state == MachineState::Running {
                        let outcome = driver.stop(
                            spec,
                            m.config.stop_signal,
                            Duration::from_millis(m.config.kill_timeout_ms),
                        )?;
                        debug!(machine = %m.id, ?outcome, "stopped");
                    }
                    // Our child: reap it (no zombie) and keep its exit code.
                    if let Some(pid) =
                        was_child.and_then(|p| rustix::process::Pid::from_raw(p as i32))
                        && let Ok(Some((_, s))) = rustix::process::waitpid(
                            Some(pid),
                            rustix::process::WaitOptions::empty(),
                        )
                    {
                        code = exit_code(s);
                    }
                    if m.desired == Desired::Destroyed {
                        driver.destroy(spec)?;
                    } else {
                        driver.cleanup(spec)?;
                    }
                }
                Ok(code)
            })();
            let finish = || -> Result<()> {
                let store = Store::open(&root).map_err(|source| Error::Image {
                    image: root.display().to_string(),
                    source,
                })?;
                let state = crate::state::State::open(&root)?;
                match &result {
                    Ok(code) if m.desired == Desired::Destroyed => {
                        let _ = store.unpin(&m.digest, &format!("machine:{}", m.id));
                        for (host_port, _) in &m.config.ports {
                            if state
                                .route(*host_port)?
                                .is_some_and(|r| r.owner == format!("machine:{}", m.id))
                            {
                                state.delete_route(*host_port)?;
                            }
                        }
                        let _ = code;
                        state.delete_machine(&m.id)?;
                        info!(machine = %m.id, "destroyed");
                    }
                    Ok(code) => {
                        state.set_observed(&m.id, MachineState::Stopped, None, *code, None)?
                    }
                    Err(e) => state.set_observed(
                        &m.id,
                        MachineState::Failed,
                        None,
                        None,
                        Some(&e.to_string()),
                    )?,
                }
                Ok(())
            };
            if let Err(e) = finish() {
                warn!(machine = %m.id, "{e}");
            }
            busy.lock_ok().ids.remove(&m.id);
        });
        Ok(())
    }

    /// Puts every route of the DB in place: a listener per host port, its backend set.
    fn apply_routes(&mut self) -> Result<()> {
        let routes = self.host.state.routes()?;
        let wanted: HashSet<u16> = routes.iter().map(|r| r.port).collect();
        let gone: Vec<u16> = self
            .proxies
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(p) = self.proxies.remove(&port) {
                self.rt.block_on(p.shutdown());
            }
        }
        for r in routes {
            let fresh = !self.proxies.contains_key(&r.port);
            if fresh {
                let addr = SocketAddr::new(self.opts.listen, r.port);
                match self.rt.block_on(Proxy::bind(addr)) {
                    Ok(p) => {
                        self.proxies.insert(r.port, p);
                    }
                    Err(e) => {
                        if r.error.as_deref() != Some(&e.to_string()) {
                            self.host.state.route_applied(
                                r.port,
                                r.applied,
                                Some(&e.to_string()),
                            )?;
                        }
                        continue;
                    }
                }
            }
            // A new listener (e.g. after an agent restart) gets the route's backends too.
            if fresh || r.applied != r.generation || r.error.is_some() {
                if let Some(p) = self.proxies.get(&r.port) {
                    p.set_backends(r.backends.clone());
                }
                self.host.state.route_applied(r.port, r.generation, None)?;
            }
        }
        Ok(())
    }

    /// copytruncate: the machine holds its log open with O_APPEND, so the file is copied aside
    /// and emptied in place; at most a few lines written in between can be lost.
    fn rotate_logs(&self, machines: &[Machine]) {
        for m in machines {
            let log = self.host.log_path(&m.id);
            let Ok(meta) = std::fs::metadata(&log) else {
                continue;
            };
            if meta.len() <= self.opts.log_max_bytes {
                continue;
            }
            if let Err(e) = rotate(&log, self.opts.log_keep) {
                warn!(machine = %m.id, "log rotation: {e}");
            }
        }
    }
}

/// Makes `n` spare networks, one slot at a time; each is handed out only once made. A slot
/// whose network failed is torn down and freed.
fn make_spares(mut state: State, n: usize) -> Result<()> {
    for _ in 0..n {
        let index = state.claim_spare()?;
        let net = NetSpec { index };
        if let Err(e) = prepare_network(&net) {
            if teardown_network("spare", &net).is_ok() {
                state.drop_spare(index)?;
            }
            return Err(e.into());
        }
        state.spare_ready(index)?;
        debug!(slot = index, "spare network made");
    }
    Ok(())
}

/// A process's exit code as a shell reports it: its status, or 128 + the signal that killed it.
fn exit_code(status: rustix::process::WaitStatus) -> Option<i32> {
    status
        .exit_status()
        .or_else(|| status.terminating_signal().map(|s| 128 + s))
}

/// Shifts `log.1..` up, copies `log` to `log.1` and empties `log`.
pub fn rotate(log: &Path, keep: u32) -> std::io::Result<()> {
    let name = |n: u32| {
        let mut s = log.as_os_str().to_owned();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    };
    let keep = keep.max(1);
    let _ = std::fs::remove_file(name(keep));
    for n in (1..keep).rev() {
        let _ = std::fs::rename(name(n), name(n + 1));
    }
    std::fs::copy(log, name(1))?;
    let f = std::fs::OpenOptions::new().write(true).open(log)?;
    f.set_len(0)?;
    let mut f = f;
    f.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MachineConfig, RestartPolicy};
    use strata_runtime::{MachineDriver, MachineSpec, StopOutcome};

    /// A runtime that only counts what it was asked (a fake for the agent's own logic; the
    /// real runc path is tested end to end with machines).
    #[derive(Debug, Default)]
    struct Counting {
        calls: Mutex<Vec<String>>,
    }

    impl MachineDriver for Counting {
        fn start(&self, spec: &MachineSpec) -> strata_runtime::Result<u32> {
            self.calls.lock_ok().push(format!("start {}", spec.id));
            Ok(1)
        }
        fn status(&self, _: &str) -> strata_runtime::Result<MachineStatus> {
            Ok(MachineStatus::Missing)
        }
        fn stop(
            &self,
            _: &MachineSpec,
            _: i32,
            _: Duration,
        ) -> strata_runtime::Result<StopOutcome> {
            Ok(StopOutcome::NotRunning)
        }
        fn exec(
            &self,
            _: &str,
            _: &[String],
            _: &strata_runtime::ExecOptions,
        ) -> strata_runtime::Result<i32> {
            Ok(0)
        }
        fn signal(&self, _: &str, _: i32) -> strata_runtime::Result<()> {
            Ok(())
        }
        fn cleanup(&self, _: &MachineSpec) -> strata_runtime::Result<()> {
            Ok(())
        }
        fn destroy(&self, _: &MachineSpec) -> strata_runtime::Result<()> {
            Ok(())
        }
    }

    /// An agent over a store in `dir` whose machines `Counting` runs: no root, no runc.
    fn agent(dir: &Path) -> Agent {
        let store = Store::open(dir).unwrap();
        let state =
            crate::state::State::open_with_claims(store.root(), dir.join("claims")).unwrap();
        let host = Host::with_driver(store, state, Arc::new(Counting::default()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        Agent::new(dir.to_path_buf(), host, AgentOptions::default(), rt)
    }

    /// The restart policy as the agent applies it when a machine exits: Docker's rules, a
    /// backoff that doubles, and a machine that used its restarts up is stopped, not retried.
    #[test]
    fn exits_restart_by_policy_with_backoff_then_give_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = agent(dir.path());
        let digest = strata_oci::Digest::sha256(b"image");
        let config = |restart| MachineConfig {
            restart,
            ..MachineConfig::default()
        };
        let mut make = |id: &str, restart| {
            a.host
                .state
                .create_machine(id, None, None, "img", &digest, &config(restart))
                .unwrap()
        };
        let on_failure = make("flaky", RestartPolicy::OnFailure { max: 2 });
        let clean = make("done", RestartPolicy::OnFailure { max: 2 });
        let always = make("daemon", RestartPolicy::Always);
        let now = |a: &Agent, id: &str| a.host.state.machine(id).unwrap().unwrap();

        // Exit 1 twice: restarted each time, later each time.
        let mut waits = Vec::new();
        for round in 1..=2 {
            let before = Instant::now();
            let m = now(&a, "flaky");
            a.on_exit(&m, Some(1)).unwrap();
            let m = now(&a, "flaky");
            assert_eq!((m.desired, m.restarts), (Desired::Running, round));
            assert_eq!((m.state, m.exit_code), (MachineState::Exited, Some(1)));
            waits.push(a.not_before["flaky"] - before);
        }
        assert!(waits[1] > waits[0], "backoff does not grow: {waits:?}");
        // A third failure is one too many: stopped, its count kept for `machine list`.
        let m = now(&a, "flaky");
        a.on_exit(&m, Some(1)).unwrap();
        let m = now(&a, "flaky");
        assert_eq!((m.desired, m.restarts), (Desired::Stopped, 2));
        assert_eq!(on_failure.id, m.id);

        // on-failure: a clean exit is not restarted; always: any exit is.
        a.on_exit(&clean, Some(0)).unwrap();
        assert_eq!(now(&a, "done").desired, Desired::Stopped);
        a.on_exit(&always, Some(0)).unwrap();
        let m = now(&a, "daemon");
        assert_eq!((m.desired, m.restarts), (Desired::Running, 1));
    }

    #[test]
    fn rotation_keeps_n_files_and_empties_the_log_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("machine.log");
        // The writer holds the file open with O_APPEND, as the machine does.
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        for round in 1..=3 {
            writeln!(writer, "round {round}").unwrap();
            rotate(&log, 2).unwrap();
        }
        writeln!(writer, "after").unwrap();
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("machine.log"), "after\n");
        assert_eq!(read("machine.log.1"), "round 3\n");
        assert_eq!(read("machine.log.2"), "round 2\n");
        assert!(!dir.path().join("machine.log.3").exists());
    }
}
