//! Machines end to end with real runc, tini-static, busybox and iproute2: network from the
//! host, init as PID 1, exit codes through a subreaper, stop, ephemeral root, volumes, exec,
//! destroy. Needs root; skips loudly when something is missing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use strata_runtime::ensure_host_nat;
use strata_runtime::{
    Attach, ExecOptions, MachineSpec, MachineStatus, NetSpec, RuntimeConfig, StopOutcome, UserSpec,
    VolumeMount, container_id, find_init, machine_cleanup, machine_destroy, machine_exec,
    machine_start, machine_status, machine_stop, prepare_network, receive_console,
    set_child_subreaper, teardown_network,
};

fn skip(why: &str) -> Option<Lab> {
    strata_test_support::skip(&format!("machine tests need {why}"));
    None
}

/// A busybox root filesystem shared (read-only, always a lower) by every test and run.
fn busybox() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("machines-busybox-v1");
        if root.join("bin/sh").exists() {
            return root;
        }
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let b = tmp.path();
        std::fs::set_permissions(b, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for d in ["bin", "etc", "home/app", "tmp"] {
            std::fs::create_dir_all(b.join(d)).unwrap();
        }
        strata_test_support::install_busybox(&b.join("bin"));
        std::fs::write(
            b.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(b.join("etc/group"), "root:x:0:\napp:x:1001:\n").unwrap();
        let _ = std::fs::rename(tmp.keep(), &root);
        root
    })
}

/// One test's machines, state and directories; dropping it destroys every machine it made,
/// even when the test failed, so no netns, veth, mount or runc state is left behind.
struct Lab {
    cfg: RuntimeConfig,
    init: PathBuf,
    specs: Vec<MachineSpec>,
    name: String,
    tmp: tempfile::TempDir,
}

impl Lab {
    fn new(name: &str) -> Option<Lab> {
        if !rustix::process::geteuid().is_root() {
            return skip("root");
        }
        if !Path::new("/bin/busybox").exists() {
            return skip("/bin/busybox (apt-get install busybox-static)");
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return skip("iproute2 (`ip`)");
        }
        let init = match find_init() {
            Ok(i) => i,
            Err(e) => return skip(&e.to_string()),
        };
        let tmp = tempfile::tempdir().unwrap();
        let cfg = match RuntimeConfig::detect(tmp.path().join("state")) {
            Ok(c) => c,
            Err(e) => return skip(&e.to_string()),
        };
        Some(Lab {
            cfg,
            init,
            specs: Vec::new(),
            name: name.to_string(),
            tmp,
        })
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A spec for machine `n` of this test: a test-unique id and network index (pid-derived,
    /// so parallel test processes do not collide on veth names).
    fn spec(&self, n: u32, script: &str) -> MachineSpec {
        let pid = std::process::id();
        let id = format!("t{pid}-{}-{n}", self.name);
        let index = (pid % 500) * 32 + test_number(&self.name) * 2 + n;
        MachineSpec {
            dir: self.root().join("machines").join(&id),
            log: self.root().join("logs").join(format!("{id}.log")),
            id,
            lowers: vec![busybox().to_path_buf()],
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: UserSpec::default(),
            hostname: format!("m{n}"),
            volumes: Vec::new(),
            net: NetSpec { index },
            init: self.init.clone(),
            attach: Attach::None,
            limits: Default::default(),
        }
    }

    fn start(&mut self, spec: &MachineSpec) -> u32 {
        if !self.specs.iter().any(|s| s.id == spec.id) {
            self.specs.push(spec.clone());
        }
        machine_start(&self.cfg, spec).unwrap_or_else(|e| panic!("start: {e}"))
    }

    fn status(&self, spec: &MachineSpec) -> MachineStatus {
        machine_status(&self.cfg, &spec.id).unwrap()
    }

    fn wait_stopped(&self, spec: &MachineSpec) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.status(spec) != MachineStatus::Stopped {
            assert!(Instant::now() < deadline, "{} did not stop", spec.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn exec(&self, spec: &MachineSpec, script: &str) -> i32 {
        machine_exec(
            &self.cfg,
            &spec.id,
            &["/bin/sh".into(), "-c".into(), script.into()],
            &ExecOptions::default(),
        )
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for spec in &self.specs {
            if let Err(e) = machine_destroy(&self.cfg, spec) {
                eprintln!("cleanup of {} failed: {e}", spec.id);
            }
        }
    }
}

/// Each test gets its own block of network indexes.
fn test_number(name: &str) -> u32 {
    const TESTS: &[&str] = &[
        "httpd",
        "init",
        "term",
        "ignore",
        "ephemeral",
        "env",
        "exec",
        "two",
        "destroy",
        "state",
        "failed",
        "detached",
        "prepared",
        "nat",
        "tty",
    ];
    TESTS.iter().position(|t| *t == name).unwrap() as u32
}

fn read_log(spec: &MachineSpec) -> String {
    std::fs::read_to_string(&spec.log).unwrap_or_default()
}

fn wait_for_log(spec: &MachineSpec, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = read_log(spec);
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "`{needle}` never showed up in the log of {}:\n{log}",
            spec.id
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /` over a plain TcpStream, retried while the server starts.
fn http_get(spec: &MachineSpec, port: u16) -> String {
    let addr = SocketAddr::new(spec.net.machine_addr().into(), port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: m\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) => return body,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("GET http://{addr}/: {e}\nlog:\n{}", read_log(spec)),
        }
    }
}

/// A lower layer with `/www/index.html` holding `text`.
fn www_layer(lab: &Lab, n: u32, text: &str) -> PathBuf {
    let layer = lab.root().join(format!("www-layer-{n}"));
    std::fs::create_dir_all(layer.join("www")).unwrap();
    std::fs::write(layer.join("www/index.html"), text).unwrap();
    layer
}

fn httpd_spec(lab: &Lab, n: u32, text: &str) -> MachineSpec {
    let mut spec = lab.spec(n, "");
    spec.lowers.push(www_layer(lab, n, text));
    spec.args = ["httpd", "-f", "-p", "8080", "-h", "/www"]
        .map(String::from)
        .to_vec();
    spec
}

#[test]
fn httpd_answers_on_the_machine_address() {
    let Some(mut lab) = Lab::new("httpd") else {
        return;
    };
    let spec = httpd_spec(&lab, 0, "hello from a machine\n");
    let pid = lab.start(&spec);
    assert_eq!(lab.status(&spec), MachineStatus::Running { pid });
    let page = http_get(&spec, 8080);
    assert!(
        page.starts_with("HTTP/1.") && page.contains(" 200 "),
        "{page}"
    );
    assert!(page.ends_with("hello from a machine\n"), "{page}");
}

#[test]
fn two_machines_at_once_have_their_own_addresses() {
    let Some(mut lab) = Lab::new("two") else {
        return;
    };
    let a = httpd_spec(&lab, 0, "machine a\n");
    let b = httpd_spec(&lab, 1, "machine b\n");
    assert_ne!(a.net.machine_addr(), b.net.machine_addr());
    lab.start(&a);
    lab.start(&b);
    assert!(http_get(&a, 8080).ends_with("machine a\n"));
    assert!(http_get(&b, 8080).ends_with("machine b\n"));
    // Stopping one leaves the other answering.
    machine_stop(&lab.cfg, &a, 15, Duration::from_secs(5)).unwrap();
    assert!(http_get(&b, 8080).ends_with("machine b\n"));
}

#[test]
fn init_is_pid_1_and_the_exit_code_reaches_the_subreaper() {
    let Some(mut lab) = Lab::new("init") else {
        return;
    };
    set_child_subreaper().unwrap();
    let spec = lab.spec(
        0,
        "tr '\\0' ' ' < /proc/1/cmdline; echo; echo \"me=$$ parent=$PPID\"; exit 7",
    );
    let pid = lab.start(&spec);
    let (got, status) = rustix::process::waitpid(
        Some(rustix::process::Pid::from_raw(pid as i32).unwrap()),
        rustix::process::WaitOptions::empty(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(got.as_raw_nonzero().get() as u32, pid);
    assert_eq!(status.exit_status(), Some(7), "{:?}", read_log(&spec));
    let log = read_log(&spec);
    assert!(log.starts_with("/.strata/init -g -- /bin/sh -c "), "{log}");
    assert!(log.contains("parent=1\n"), "{log}");
    assert!(!log.contains("me=1 "), "{log}");
    // Exited, not yet cleaned up: stopped; cleanup makes it missing, twice is fine.
    assert_eq!(lab.status(&spec), MachineStatus::Stopped);
    machine_cleanup(&lab.cfg, &spec).unwrap();
    machine_cleanup(&lab.cfg, &spec).unwrap();
    assert_eq!(lab.status(&spec), MachineStatus::Missing);
}

#[test]
fn stop_with_a_term_handler_needs_no_kill() {
    let Some(mut lab) = Lab::new("term") else {
        return;
    };
    let spec = lab.spec(
        0,
        "trap 'echo got-term; exit 0' TERM; echo ready; while :; do sleep 30; done",
    );
    lab.start(&spec);
    wait_for_log(&spec, "ready\n");
    let t = Instant::now();
    let outcome = machine_stop(&lab.cfg, &spec, 15, Duration::from_secs(8)).unwrap();
    assert_eq!(outcome, StopOutcome::Exited);
    // `-g`: the foreground sleep got TERM too, so the trap ran at once instead of after it.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(read_log(&spec).contains("got-term\n"));
    assert_eq!(lab.status(&spec), MachineStatus::Missing);
    // Stopping a stopped machine is fine.
    let again = machine_stop(&lab.cfg, &spec, 15, Duration::from_secs(1)).unwrap();
    assert_eq!(again, StopOutcome::NotRunning);
}

#[test]
fn stop_of_a_machine_ignoring_term_kills_after_the_grace() {
    let Some(mut lab) = Lab::new("ignore") else {
        return;
    };
    let spec = lab.spec(0, "trap '' TERM; echo ready; while :; do sleep 1; done");
    lab.start(&spec);
    wait_for_log(&spec, "ready\n");
    let t = Instant::now();
    let outcome = machine_stop(&lab.cfg, &spec, 15, Duration::from_millis(700)).unwrap();
    assert_eq!(outcome, StopOutcome::Killed);
    assert!(t.elapsed() >= Duration::from_millis(700));
    assert_eq!(lab.status(&spec), MachineStatus::Missing);
}

#[test]
fn root_is_ephemeral_and_volumes_persist() {
    let Some(mut lab) = Lab::new("ephemeral") else {
        return;
    };
    let volume = lab.root().join("volumes/data");
    let mut spec = lab.spec(
        0,
        "echo x > /rootfile; echo kept >> /data/file; echo ready; exec sleep 1000",
    );
    spec.volumes.push(VolumeMount {
        source: volume.clone(),
        target: "/data".into(),
        readonly: false,
    });
    lab.start(&spec);
    wait_for_log(&spec, "ready\n");
    assert_eq!(lab.exec(&spec, "test -f /rootfile"), 0);
    machine_stop(&lab.cfg, &spec, 15, Duration::from_secs(5)).unwrap();
    // Nothing of the run's root is left on the host either.
    assert!(!spec.dir.join("upper").exists());

    spec.args[2] = "echo again; exec sleep 1000".into();
    lab.start(&spec);
    wait_for_log(&spec, "again\n");
    assert_eq!(lab.exec(&spec, "test -e /rootfile"), 1, "root kept a file");
    assert_eq!(lab.exec(&spec, "test \"$(cat /data/file)\" = kept"), 0);
    // The image layer was never written to.
    assert!(!busybox().join("rootfile").exists());

    machine_destroy(&lab.cfg, &spec).unwrap();
    assert!(!spec.dir.exists());
    assert_eq!(
        std::fs::read_to_string(volume.join("file")).unwrap(),
        "kept\n"
    );
}

#[test]
fn environment_user_cwd_and_names_are_visible_inside() {
    let Some(mut lab) = Lab::new("env") else {
        return;
    };
    let mut spec = lab.spec(
        0,
        "id -u; id -g; pwd; hostname; cat /etc/hostname; echo \"FOO=$FOO\"; cat /etc/hosts; \
         grep -c nameserver /etc/resolv.conf; touch /etc/hosts && echo hosts-writable",
    );
    spec.env.push("FOO=bar baz".into());
    spec.cwd = "/home/app/work".into();
    spec.user = UserSpec {
        uid: 1000,
        gid: 1001,
        additional_gids: vec![],
    };
    spec.hostname = "web-7".into();
    lab.start(&spec);
    lab.wait_stopped(&spec);
    let log = read_log(&spec);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines[..6],
        [
            "1000",
            "1001",
            "/home/app/work",
            "web-7",
            "web-7",
            "FOO=bar baz"
        ],
        "{log}"
    );
    assert!(log.contains("127.0.0.1\tlocalhost\n"), "{log}");
    let own = format!("{}\tweb-7\n", spec.net.machine_addr());
    assert!(log.contains(&own), "{log}");
    // Our /etc files are bind mounts from the machine dir, not written into the image.
    assert!(!busybox().join("etc/hosts").exists());
    assert!(
        std::fs::read_to_string(spec.dir.join("etc/hosts"))
            .unwrap()
            .contains(&own)
    );
    // uid 1000 may not write root's /etc/hosts: it is the machine's, but not the user's.
    assert!(!log.contains("hosts-writable"), "{log}");
}

#[test]
fn exec_runs_in_the_running_machine() {
    let Some(mut lab) = Lab::new("exec") else {
        return;
    };
    let mut spec = lab.spec(0, "echo made > /tmp/marker; echo ready; exec sleep 1000");
    spec.env.push("CODE=9".into());
    lab.start(&spec);
    wait_for_log(&spec, "ready\n");
    assert_eq!(lab.exec(&spec, "exit 3"), 3);
    // The machine's environment, and `env` overriding it.
    assert_eq!(lab.exec(&spec, "exit $CODE"), 9);
    // It sees the machine's files, name and environment, plus the extra variables.
    assert_eq!(
        lab.exec(
            &spec,
            "test \"$(cat /tmp/marker)\" = made && test \"$(hostname)\" = m0"
        ),
        0
    );
    let code = machine_exec(
        &lab.cfg,
        &spec.id,
        &["/bin/sh".into(), "-c".into(), "exit $CODE".into()],
        &ExecOptions {
            env: vec!["CODE=42".into()],
            ..ExecOptions::default()
        },
    )
    .unwrap();
    assert_eq!(code, 42);
    // Another user and working directory (`docker exec -u -w`), the primary group among the
    // supplementary ones as at a machine's start.
    let as_other = ExecOptions {
        workdir: Some("/tmp".into()),
        user: Some(UserSpec {
            uid: 1000,
            gid: 1001,
            additional_gids: vec![5],
        }),
        ..ExecOptions::default()
    };
    let script = "test \"$(id -u):$(id -g)\" = 1000:1001 && id -G | grep -qw 5 \
                  && test \"$PWD\" = /tmp && test \"$(pwd)\" = /tmp";
    let run = |opts: &ExecOptions, script: &str| {
        machine_exec(
            &lab.cfg,
            &spec.id,
            &["/bin/sh".into(), "-c".into(), script.into()],
            opts,
        )
    };
    assert_eq!(run(&as_other, script).unwrap(), 0, "{script}");
    // By default, the machine's own: root in /.
    assert_eq!(
        run(
            &ExecOptions::default(),
            "test \"$(id -u)\" = 0 && test \"$(pwd)\" = /"
        )
        .unwrap(),
        0
    );
    let relative = ExecOptions {
        workdir: Some("tmp".into()),
        ..ExecOptions::default()
    };
    let e = run(&relative, "true").unwrap_err().to_string();
    assert!(e.contains("`tmp` must be an absolute path"), "{e}");
    // A command that is not there: runc's failure, reported as an error naming the machine.
    let e = machine_exec(
        &lab.cfg,
        &spec.id,
        &["/no/such".into()],
        &ExecOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains(&container_id(&spec.id)), "{e}");
    machine_stop(&lab.cfg, &spec, 15, Duration::from_secs(5)).unwrap();
    let e = machine_exec(
        &lab.cfg,
        &spec.id,
        &["true".into()],
        &ExecOptions::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("not running"), "{e}");
}

fn ip_link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .output()
        .unwrap()
        .status
        .success()
}

fn netns_list() -> String {
    String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn destroy_removes_network_mounts_state_and_dir() {
    let Some(mut lab) = Lab::new("destroy") else {
        return;
    };
    let spec = httpd_spec(&lab, 0, "bye\n");
    lab.start(&spec);
    http_get(&spec, 8080);
    let host_link = spec.net.host_link();
    let ns = spec.net.netns_name();
    assert!(ip_link_exists(&host_link));
    assert!(netns_list().contains(&ns));
    let dir = spec.dir.to_string_lossy().into_owned();
    let mountinfo = || std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mountinfo().contains(&dir));

    machine_destroy(&lab.cfg, &spec).unwrap();
    assert!(!ip_link_exists(&host_link));
    assert!(!netns_list().contains(&ns));
    assert!(!Path::new("/run/netns").join(&ns).exists());
    assert!(!mountinfo().contains(&dir), "{}", mountinfo());
    assert_eq!(lab.status(&spec), MachineStatus::Missing);
    assert!(!lab.cfg.state_root.join(container_id(&spec.id)).exists());
    assert!(!spec.dir.exists());
    // Idempotent.
    machine_destroy(&lab.cfg, &spec).unwrap();
}

#[test]
fn starting_a_running_machine_and_bad_specs_are_errors() {
    let Some(mut lab) = Lab::new("state") else {
        return;
    };
    assert_eq!(
        machine_status(&lab.cfg, "never-started").unwrap(),
        MachineStatus::Missing
    );
    let spec = lab.spec(0, "exec sleep 1000");
    let pid = lab.start(&spec);
    let e = machine_start(&lab.cfg, &spec).unwrap_err().to_string();
    assert!(e.contains(&spec.id) && e.contains("already running"), "{e}");
    assert_eq!(lab.status(&spec), MachineStatus::Running { pid });

    let mut bad = lab.spec(1, "true");
    bad.id = "Bad_Id".into();
    let e = machine_start(&lab.cfg, &bad).unwrap_err().to_string();
    assert!(
        e.contains("Bad_Id") && e.contains("invalid machine id"),
        "{e}"
    );
    let mut bad = lab.spec(1, "true");
    bad.volumes.push(VolumeMount {
        source: lab.root().join("v"),
        target: "/../etc".into(),
        readonly: false,
    });
    let e = machine_start(&lab.cfg, &bad).unwrap_err().to_string();
    assert!(e.contains(&bad.id) && e.contains("volume target"), "{e}");
    // A command that does not exist: the machine starts (the init runs) and exits 127.
    let mut missing = lab.spec(1, "");
    missing.args = vec!["/no/such/program".into()];
    lab.start(&missing);
    lab.wait_stopped(&missing);
}

#[test]
fn a_failed_start_names_runc_and_leaves_nothing_mounted() {
    let Some(mut lab) = Lab::new("failed") else {
        return;
    };
    let mut spec = lab.spec(0, "true");
    // A directory over a regular file: runc refuses to make that mount.
    spec.volumes.push(VolumeMount {
        source: lab.root().join("v"),
        target: "/etc/passwd".into(),
        readonly: false,
    });
    lab.specs.push(spec.clone());
    let e = machine_start(&lab.cfg, &spec).unwrap_err().to_string();
    assert!(
        e.contains(&container_id(&spec.id)) && e.contains("runc") && e.contains(" run -d "),
        "{e}"
    );
    let dir = spec.dir.to_string_lossy().into_owned();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(&dir), "{mountinfo}");
    assert_eq!(lab.status(&spec), MachineStatus::Missing);
    // The same machine starts once the spec is fixed.
    spec.volumes[0].target = "/data".into();
    lab.start(&spec);
}

/// Not a test by itself: run by `a_machine_outlives_the_process_that_started_it` in a child
/// process, it starts the machine described by `$STRATA_TEST_STARTER` and exits.
#[test]
fn starter_helper() {
    let Ok(args) = std::env::var("STRATA_TEST_STARTER") else {
        return;
    };
    let f: Vec<&str> = args.split('\n').collect();
    let cfg = RuntimeConfig {
        runc: f[0].into(),
        state_root: f[1].into(),
    };
    let spec = MachineSpec {
        id: f[2].into(),
        dir: f[3].into(),
        lowers: vec![f[4].into(), f[5].into()],
        args: ["httpd", "-f", "-p", "8080", "-h", "/www"]
            .map(String::from)
            .to_vec(),
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: UserSpec::default(),
        hostname: "detached".into(),
        volumes: Vec::new(),
        net: NetSpec {
            index: f[6].parse().unwrap(),
        },
        init: f[7].into(),
        log: f[8].into(),
        attach: Attach::None,
        limits: Default::default(),
    };
    let pid = machine_start(&cfg, &spec).unwrap();
    println!("started pid {pid}");
}

#[test]
fn a_machine_outlives_the_process_that_started_it() {
    let Some(mut lab) = Lab::new("detached") else {
        return;
    };
    let spec = httpd_spec(&lab, 0, "still here\n");
    lab.specs.push(spec.clone());
    let fields = [
        lab.cfg.runc.to_str().unwrap().to_string(),
        lab.cfg.state_root.to_str().unwrap().to_string(),
        spec.id.clone(),
        spec.dir.to_str().unwrap().to_string(),
        spec.lowers[0].to_str().unwrap().to_string(),
        spec.lowers[1].to_str().unwrap().to_string(),
        spec.net.index.to_string(),
        spec.init.to_str().unwrap().to_string(),
        spec.log.to_str().unwrap().to_string(),
    ];
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "machines::starter_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STRATA_TEST_STARTER", fields.join("\n"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("started pid"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The starter is gone; the machine still runs and answers.
    let MachineStatus::Running { pid } = lab.status(&spec) else {
        panic!("machine not running after its starter exited");
    };
    assert!(http_get(&spec, 8080).ends_with("still here\n"));
    // In a session of its own (a Ctrl-C or hangup at our terminal would not reach it).
    let machine = rustix::process::Pid::from_raw(pid as i32).unwrap();
    assert_eq!(rustix::process::getsid(Some(machine)).unwrap(), machine);
    assert_ne!(
        rustix::process::getpgid(Some(machine)).unwrap(),
        rustix::process::getpgrp()
    );
}

/// `ip -o addr show dev LINK` (empty when the link is missing).
fn link_addrs(link: &str) -> String {
    let out = Command::new("ip")
        .args(["-o", "addr", "show", "dev", link])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_prepared_network_is_taken_as_it_is_and_made_again_when_broken() {
    let Some(mut lab) = Lab::new("prepared") else {
        return;
    };
    let marker = |net: &NetSpec| Path::new("/run/strata/net-ready").join(net.index.to_string());

    // Made ahead of any machine: namespace, veth pair, marker.
    let a = httpd_spec(&lab, 0, "prepared\n");
    lab.specs.push(a.clone());
    prepare_network(&a.net).unwrap();
    assert!(netns_list().contains(&a.net.netns_name()));
    assert!(ip_link_exists(&a.net.host_link()));
    assert!(marker(&a.net).exists());
    // A mark only a start that takes the network as it is keeps (a remade pair loses it).
    let probe = "10.254.0.1/32";
    let added = Command::new("ip")
        .args(["addr", "add", probe, "dev", &a.net.host_link()])
        .status()
        .unwrap();
    assert!(added.success());
    lab.start(&a);
    assert!(http_get(&a, 8080).ends_with("prepared\n"));
    assert!(link_addrs(&a.net.host_link()).contains(probe));
    assert!(!marker(&a.net).exists(), "the start used the network up");
    // A restart of the machine makes its network again: the network is no longer fresh.
    machine_stop(&lab.cfg, &a, 15, Duration::from_secs(5)).unwrap();
    lab.start(&a);
    assert!(http_get(&a, 8080).ends_with("prepared\n"));
    assert!(!link_addrs(&a.net.host_link()).contains(probe));

    // A prepared network that lost its host end is made again, not trusted.
    let b = httpd_spec(&lab, 1, "remade\n");
    lab.specs.push(b.clone());
    prepare_network(&b.net).unwrap();
    let deleted = Command::new("ip")
        .args(["link", "del", &b.net.host_link()])
        .status()
        .unwrap();
    assert!(deleted.success());
    lab.start(&b);
    assert!(http_get(&b, 8080).ends_with("remade\n"));

    // Tearing down a spare nobody used leaves nothing.
    machine_destroy(&lab.cfg, &b).unwrap();
    prepare_network(&b.net).unwrap();
    teardown_network("spare", &b.net).unwrap();
    assert!(!ip_link_exists(&b.net.host_link()));
    assert!(!netns_list().contains(&b.net.netns_name()));
    assert!(!marker(&b.net).exists());
}

/// A network namespace standing for "the world": a veth pair to the host on 10.254.<k>.0/30
/// and no route back to the machines' 10.89.0.0/16. Removed on drop.
struct World {
    ns: String,
    host_link: String,
    addr: std::net::Ipv4Addr,
    host_addr: std::net::Ipv4Addr,
}

impl World {
    fn new() -> World {
        let k = std::process::id() % 250;
        let ns = format!("strata-test-world-{}", std::process::id());
        let host_link = format!("stw{k}h");
        let (host_addr, addr) = (
            std::net::Ipv4Addr::new(10, 254, k as u8, 1),
            std::net::Ipv4Addr::new(10, 254, k as u8, 2),
        );
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        run(&["netns", "add", &ns]);
        let world = World {
            ns: ns.clone(),
            host_link: host_link.clone(),
            addr,
            host_addr,
        };
        let peer = format!("stw{k}w");
        run(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &peer, "netns", &ns,
        ]);
        run(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_link]);
        run(&["link", "set", &host_link, "up"]);
        run(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &peer,
        ]);
        run(&["-n", &ns, "link", "set", &peer, "up"]);
        run(&["-n", &ns, "link", "set", "lo", "up"]);
        world
    }

    /// Accepts one TCP connection on `port` inside the world namespace (on a thread that
    /// joined it) and returns the peer address the world saw.
    fn accept_one(&self, port: u16) -> std::thread::JoinHandle<std::io::Result<SocketAddr>> {
        let ns = Path::new("/run/netns").join(&self.ns);
        let addr = SocketAddr::new(self.addr.into(), port);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let f = std::fs::File::open(&ns)?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&f),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            ready_tx.send(()).unwrap();
            // Bounded: without NAT the handshake never completes (no route back).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        conn.set_nonblocking(false)?;
                        conn.write_all(b"hello from the world\n")?;
                        return Ok(peer);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no connection reached the world within 10 s",
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        handle
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn a_machine_reaches_other_networks_through_the_hosts_nat() {
    let Some(mut lab) = Lab::new("nat") else {
        return;
    };
    if Command::new("nft").arg("--version").output().is_err() {
        strata_test_support::skip("the NAT test needs nft (apt-get install nftables)");
        return;
    }
    // A host firewall that drops forwarded traffic (what a Docker engine leaves behind) is
    // the host's policy: ensure_host_nat does not override it, so the test cannot pass there.
    let forward = Command::new("iptables").args(["-S", "FORWARD"]).output();
    if forward.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("-P FORWARD DROP")) {
        strata_test_support::skip(
            "the NAT test: the host's FORWARD policy is DROP (a Docker engine?)",
        );
        return;
    }
    ensure_host_nat().unwrap();
    ensure_host_nat().unwrap(); // idempotent
    let world = World::new();
    let server = world.accept_one(9000);
    let spec = lab.spec(0, "sleep 1000");
    lab.start(&spec);
    let code = lab.exec(
        &spec,
        &format!(
            "nc -w 5 {} 9000 </dev/null | grep -q 'hello from the world'",
            world.addr
        ),
    );
    let peer = server
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the machine's connection never reached the world: {e}"));
    assert_eq!(code, 0, "the machine did not get the world's answer");
    // The world has no route to 10.89.0.0/16: it only answers the host's own address.
    assert_eq!(peer.ip(), std::net::IpAddr::V4(world.host_addr), "{peer}");
    // One table, one rule, however often it was set up.
    let ruleset = Command::new("nft")
        .args(["list", "table", "ip", "strata"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ruleset.stdout);
    assert_eq!(text.matches("masquerade").count(), 1, "{text}");
}

/// Not a test by itself: run under `script` (a pseudo-terminal) by
/// `exec_with_a_tty_gets_a_terminal`, it execs `$STRATA_TEST_TTY` in a machine with a tty.
#[test]
fn tty_helper() {
    let Ok(args) = std::env::var("STRATA_TEST_TTY") else {
        return;
    };
    let f: Vec<&str> = args.split('\n').collect();
    let cfg = RuntimeConfig {
        runc: f[0].into(),
        state_root: f[1].into(),
    };
    let script = "tty; exit 4".to_string();
    let r = machine_exec(
        &cfg,
        f[2],
        &["/bin/sh".into(), "-c".into(), script],
        &ExecOptions {
            tty: true,
            ..ExecOptions::default()
        },
    );
    println!("\nresult={r:?}");
}

#[test]
fn exec_with_a_tty_gets_a_terminal() {
    let Some(mut lab) = Lab::new("tty") else {
        return;
    };
    if Command::new("script").arg("--version").output().is_err() {
        strata_test_support::skip("the tty test needs `script` (util-linux)");
        return;
    }
    let spec = lab.spec(0, "echo ready; exec sleep 1000");
    lab.start(&spec);
    wait_for_log(&spec, "ready\n");
    // Without a terminal on stdin, a clear error instead of runc's.
    let tty = ExecOptions {
        tty: true,
        ..ExecOptions::default()
    };
    let e = machine_exec(&lab.cfg, &spec.id, &["true".into()], &tty).unwrap_err();
    assert!(e.to_string().contains("terminal"), "{e}");
    let fields = [
        lab.cfg.runc.to_str().unwrap(),
        lab.cfg.state_root.to_str().unwrap(),
        &spec.id,
    ];
    let helper = format!(
        "{} --exact machines::tty_helper --nocapture --test-threads=1",
        std::env::current_exe().unwrap().display()
    );
    let out = Command::new("script")
        .args(["-qec", &helper, "/dev/null"])
        .env("STRATA_TEST_TTY", fields.join("\n"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("result=Ok(4)"), "{text}");

    // A machine whose stdin is a FIFO the client held open before the start: the process
    // reads what the client writes, then end of file when it closes its end.
    let dir = lab.root().join("attach");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("stdin");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let mut writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    // Its stdout and stderr are FIFOs of their own the client reads.
    let fifos = ["stdout", "stderr"].map(|n| {
        let p = dir.join(n);
        assert!(Command::new("mkfifo").arg(&p).status().unwrap().success());
        p
    });
    let readers = fifos.clone().map(|p| {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(p)
            .unwrap()
    });
    let mut spec = lab.spec(1, "cat; echo end; echo apart >&2");
    spec.attach = Attach::Pipes {
        stdin: Some(fifo.clone()),
        stdout: fifos[0].clone(),
        stderr: fifos[1].clone(),
    };
    lab.start(&spec);
    std::thread::sleep(Duration::from_millis(200));
    writer.write_all(b"fed in\n").unwrap();
    drop(writer);
    wait_exited(&lab, &spec);
    let [mut out, mut err] = readers;
    let (mut o, mut e) = (String::new(), String::new());
    out.read_to_string(&mut o).unwrap();
    err.read_to_string(&mut e).unwrap();
    assert_eq!((o.as_str(), e.as_str()), ("fed in\nend\n", "apart\n"));
    assert_eq!(read_log(&spec), "", "attached output is not logged");
    machine_destroy(&lab.cfg, &spec).unwrap();

    // A machine with a terminal: its master comes to the console socket, what is typed there
    // is the process's input, and its output comes back through it (not to the log).
    let socket = dir.join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut spec = lab.spec(1, "tty; read x; echo got:$x; echo to-stderr >&2");
    spec.attach = Attach::Tty(socket.clone());
    lab.start(&spec);
    let master = receive_console(&listener, Duration::from_secs(10)).unwrap();
    let mut master = std::fs::File::from(master);
    master.write_all(b"typed\n").unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    // The master reads EIO once every process holding the terminal has ended.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let seen = String::from_utf8_lossy(&seen);
    assert!(seen.contains("/dev/pts/0\r\n"), "{seen}");
    assert!(seen.contains("got:typed\r\n"), "{seen}");
    assert!(seen.contains("to-stderr\r\n"), "{seen}");
    wait_exited(&lab, &spec);
    assert_eq!(read_log(&spec), "", "a terminal's output is not logged");
}

fn wait_exited(lab: &Lab, spec: &MachineSpec) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(
        machine_status(&lab.cfg, &spec.id).unwrap(),
        MachineStatus::Running { .. }
    ) {
        assert!(Instant::now() < deadline, "{} never exited", spec.id);
        std::thread::sleep(Duration::from_millis(20));
    }
}
