//! A private Docker engine for one test.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{bounded, check};

/// A Docker engine of its own (own socket, data root and exec root; no bridge, no iptables, so
/// nothing on the host changes and the host's own Docker, if any, is never touched); stopped
/// (SIGTERM, then SIGKILL) and its mounts and directories removed on drop, pass or fail.
pub struct Dockerd {
    child: Child,
    host: String,
    sock: PathBuf,
    cli: PathBuf,
    /// data/, exec/, the pid file, an empty daemon.json, the log and the CLI's config dir.
    dir: tempfile::TempDir,
    /// The host interface of the swarm's `docker_gwbridge` network, once [`Dockerd::swarm_init`]
    /// made it: it outlives the engine, so drop removes it.
    gwbridge: std::sync::OnceLock<String>,
}

impl Dockerd {
    /// Starts `dockerd` and waits until `cli` (the `docker` client to drive it with) gets an
    /// answer from it.
    pub fn start(cli: impl Into<PathBuf>) -> Dockerd {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::SeqCst);
        let sock = PathBuf::from(format!(
            "/run/strata-test-docker-{}-{n}.sock",
            std::process::id()
        ));
        let _ = fs::remove_file(&sock);
        let dir = tempfile::tempdir().unwrap();
        let p = |rel: &str| dir.path().join(rel);
        fs::create_dir_all(p("cli")).unwrap();
        // An empty config file so a host /etc/docker/daemon.json cannot change the engine.
        fs::write(p("daemon.json"), "{}").unwrap();
        let log = fs::File::create(p("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--iptables=false")
            .arg("--bridge=none")
            .arg("--config-file")
            .arg(p("daemon.json"))
            .arg("--host")
            .arg(format!("unix://{}", sock.display()))
            .arg("--data-root")
            .arg(p("data"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("dockerd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Dockerd {
            child,
            host: format!("unix://{}", sock.display()),
            sock,
            cli: cli.into(),
            dir,
            gwbridge: std::sync::OnceLock::new(),
        };
        let start = Instant::now();
        loop {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("dockerd exited ({status}) at start:\n{}", d.log_tail());
            }
            let info = d
                .cmd(10)
                .args(["info", "--format", "{{.ServerVersion}}"])
                .output();
            if info.is_ok_and(|o| o.status.success()) {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                panic!("dockerd not answering after 60 s:\n{}", d.log_tail());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("dockerd up in {:?}", start.elapsed());
        d
    }

    /// `docker` aimed at this engine (and a private CLI config dir, so no host credentials or
    /// credential helpers are used), with a time limit.
    pub fn cmd(&self, secs: u64) -> Command {
        let mut cmd = bounded(secs, &self.cli);
        cmd.env("DOCKER_HOST", &self.host)
            .env("DOCKER_CONFIG", self.dir.path().join("cli"));
        cmd
    }

    /// `docker ARGS…`, asserting success; returns stdout.
    pub fn ok(&self, secs: u64, args: &[&str]) -> String {
        check(self.cmd(secs).args(args))
    }

    /// Makes the engine a one-node swarm manager (`docker swarm init`), advertised and
    /// listening on loopback only; the swarm goes with the engine's data root.
    ///
    /// The engine runs without iptables and the kernel may lack IPVS, so the routing mesh
    /// (ingress publishing, a service's virtual IP) may not carry traffic: services meant to
    /// be reached here use DNS round robin on an attachable overlay network.
    pub fn swarm_init(&self) {
        // Containers on overlay networks reach out through the bridge network
        // `docker_gwbridge`. Made here first, its host interface gets a name of this engine's
        // own (not `docker_gwbridge`, which a host's own swarm may use), removed on drop.
        let bridge = format!("sgw{}-{}", std::process::id(), self.sock_number());
        self.ok(
            30,
            &[
                "network",
                "create",
                "--driver",
                "bridge",
                "--opt",
                &format!("com.docker.network.bridge.name={bridge}"),
                "--opt",
                "com.docker.network.bridge.enable_icc=false",
                "--opt",
                "com.docker.network.bridge.enable_ip_masquerade=false",
                "docker_gwbridge",
            ],
        );
        let _ = self.gwbridge.set(bridge);
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listen.local_addr().unwrap().port();
        drop(listen);
        self.ok(
            60,
            &[
                "swarm",
                "init",
                "--advertise-addr",
                "127.0.0.1",
                "--listen-addr",
                &format!("127.0.0.1:{port}"),
            ],
        );
    }

    /// The engine's API address, as `DOCKER_HOST` takes it (`unix:///…`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The number in this engine's socket name (`…-N.sock`), unique in the process.
    fn sock_number(&self) -> String {
        let name = self.sock.file_stem().unwrap_or_default().to_string_lossy();
        name.rsplit('-').next().unwrap_or("0").to_string()
    }

    /// The engine's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The engine's API socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The last 40 lines of the engine's log.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // dockerd leaves its netns bind mount (and, after a crash, overlay mounts) under its
        // roots; unmount them, deepest first, so the temp dir can be removed.
        let root = self.dir.path().to_string_lossy().into_owned();
        let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        let _ = fs::remove_file(&self.sock);
        if let Some(bridge) = self.gwbridge.get() {
            let _ = Command::new("ip").args(["link", "delete", bridge]).status();
        }
    }
}
