//! Hosts over SSH, against real hosts: each test host is a network namespace with its own
//! address and veth link, running Debian's OpenSSH `sshd` with key authentication, and its own
//! store directory (namespaces share the filesystem). Bytes on the wire are counted on the
//! host's veth.

use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Env, have, http_get, import_busybox, wait_for};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether the SSH host tests can run here; says loudly why not.
fn can_run() -> bool {
    let root = std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").unwrap()) == 0;
    let sshd = Path::new("/usr/sbin/sshd").exists();
    if !root || !sshd || !have("ip") || !have("ssh") || !have("ssh-keygen") {
        eprintln!(
            "\n!!!!! SKIPPED: SSH host tests need root, ip (iproute2), ssh and /usr/sbin/sshd \
             (openssh-server; CI installs it via .ci/run) !!!!!\n"
        );
        return false;
    }
    true
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sh(script: &str) -> Output {
    run(Command::new("sh").arg("-c").arg(script))
}

/// The client's side of the test SSH setup: a key, and an ssh config that uses it and trusts
/// the test hosts' keys (made for this test).
pub struct Keys {
    pub dir: PathBuf,
}

impl Keys {
    fn new(env: &Env) -> Keys {
        let dir = env.path("ssh");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        for key in ["id", "hostkey", "other"] {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(key)));
        }
        fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
        fs::write(
            dir.join("config"),
            format!(
                "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  \
                 StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n",
                dir.join("id").display()
            ),
        )
        .unwrap();
        Keys { dir }
    }

    /// `STRATA_SSH_COMMAND` for this setup.
    pub fn ssh_command(&self) -> String {
        format!("ssh -F {}", self.dir.join("config").display())
    }
}

/// One test host: a namespace, a veth link to it, sshd on its address, a store.
pub struct TestHost {
    pub ns: String,
    /// The host-side end of the veth link (its tx bytes are what we send to the host).
    pub veth: String,
    pub addr: String,
    pub store: PathBuf,
    /// The remote user's home (sshd sets it): strata is installed under it when missing.
    pub home: PathBuf,
    sshd: Child,
}

impl TestHost {
    fn start(env: &Env, keys: &Keys) -> TestHost {
        TestHost::start_with_path(env, keys, None)
    }

    /// A host whose sessions look up commands in `path_first` before the system's
    /// directories (sshd's `SetEnv PATH=…`): a script there shadows a system command.
    fn start_with_path(env: &Env, keys: &Keys, path_first: Option<&Path>) -> TestHost {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = std::process::id() % 100_000;
        let ns = format!("strata-h{id}-{n}");
        let veth = format!("sh{id}x{n}");
        let peer = format!("sn{id}x{n}");
        // A /24 per host, picked from the pid and counter so parallel tests do not collide.
        let net = format!("10.77.{}", (id as usize * 7 + n as usize) % 250 + 1);
        let addr = format!("{net}.2");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&format!(
            "set -e; ip netns add {ns}; ip link add {veth} type veth peer name {peer}; \
             ip link set {peer} netns {ns}; ip addr add {net}.1/24 dev {veth}; \
             ip link set {veth} up; ip netns exec {ns} ip link set lo up; \
             ip netns exec {ns} ip addr add {addr}/24 dev {peer}; \
             ip netns exec {ns} ip link set {peer} up"
        ));
        fs::create_dir_all("/run/sshd").unwrap();
        fs::create_dir_all(env.path(&format!("host{n}-home"))).unwrap();
        let cfg = env.path(&format!("sshd-{n}.conf"));
        fs::write(
            &cfg,
            format!(
                "ListenAddress {addr}:22\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 SetEnv HOME={home} STRATA_STORE={store}{path}\n",
                path = path_first
                    .map(|p| format!(
                        " PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        p.display()
                    ))
                    .unwrap_or_default(),
                home = env.path(&format!("host{n}-home")).display(),
                store = env.path(&format!("host{n}-store")).display(),
                hk = keys.dir.join("hostkey").display(),
                pid = env.path(&format!("sshd-{n}.pid")).display(),
                ak = keys.dir.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        // nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup mounts runc
        // needs for machines; a real server has them.
        let sshd = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let host = TestHost {
            ns,
            veth,
            addr: addr.clone(),
            store: env.path(&format!("host{n}-store")),
            home: env.path(&format!("host{n}-home")),
            sshd,
        };
        wait_for("sshd", Duration::from_secs(10), || {
            TcpStream::connect_timeout(
                &format!("{addr}:22").parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok()
        });
        host
    }

    /// Bytes sent to the host so far.
    pub fn tx_bytes(&self) -> u64 {
        fs::read_to_string(format!("/sys/class/net/{}/statistics/tx_bytes", self.veth))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// `[host.NAME]` for strata.toml, with this test binary as the host's strata.
    pub fn toml(&self, name: &str) -> String {
        format!(
            "[host.{name}]\nssh = \"root@{}\"\nstore = \"{}\"\nstrata = \"{}\"\n",
            self.addr,
            self.store.display(),
            env!("CARGO_BIN_EXE_strata")
        )
    }

    /// `strata --store <host store> ARGS` run on the host's side (as its own store).
    pub fn strata(&self, args: &[&str]) -> String {
        let out = run(Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(&self.store)
            .args(args));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Cap the link to the host at `rate` (tc tbf), as a slow network would.
    pub fn limit_rate(&self, rate: &str) {
        sh(&format!(
            "tc qdisc replace dev {} root tbf rate {rate} burst 64kb latency 400ms",
            self.veth
        ));
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Machines deployed there (they run in namespaces of their own, so deleting the host's
        // does not stop them), then its agent.
        let in_ns = |args: &[&str]| {
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.ns))
                .args([env!("CARGO_BIN_EXE_strata"), "--store"])
                .arg(&self.store)
                .args(args)
                .output()
        };
        if self.store.join("strata").exists() {
            if let Ok(out) = in_ns(&["machine", "list", "--json"]) {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some(id) = serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(String::from))
                    {
                        let _ = in_ns(&["machine", "destroy", &id]);
                    }
                }
            }
            let _ = in_ns(&["agent", "stop"]);
        }
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
        // Deleting the namespace kills what still runs in it and removes the veth pair.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            });
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
    }
}

/// A project directory with a strata.toml naming `hosts`.
struct Lab {
    env: Env,
    keys: Keys,
}

impl Lab {
    fn new() -> Lab {
        let env = Env::new();
        let keys = Keys::new(&env);
        Lab { env, keys }
    }

    /// Another developer's side (a fresh store) with the same ssh keys.
    fn sharing_keys(&self) -> Lab {
        Lab {
            env: Env::new(),
            keys: Keys {
                dir: self.keys.dir.clone(),
            },
        }
    }

    fn project(&self, hosts: &[(&str, &TestHost)]) -> PathBuf {
        let dir = self.env.path("project");
        fs::create_dir_all(&dir).unwrap();
        let toml: String = hosts.iter().map(|(n, h)| h.toml(n)).collect();
        fs::write(dir.join("strata.toml"), toml).unwrap();
        dir
    }

    /// `strata ARGS` on the developer's side with the test ssh setup.
    fn strata(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--store")
            .arg(self.env.store())
            .args(args)
            .env("STRATA_SSH_COMMAND", self.keys.ssh_command())
            .env("NO_COLOR", "1");
        c
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.strata(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.strata(args);
        assert!(
            !out.status.success(),
            "strata {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// An app image FROM `base` with one layer of `app_bytes` random bytes.
    fn build_app(&self, base: &str, name: &str, app_bytes: usize, seed: u8) {
        let ctx = self.env.path(&format!("ctx-{seed}"));
        fs::create_dir_all(&ctx).unwrap();
        let mut data = vec![0u8; app_bytes];
        // Incompressible, so the layer is about `app_bytes` on the wire too.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(seed);
        for b in &mut data {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        fs::write(ctx.join("payload"), &data).unwrap();
        fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {base}\nCOPY payload /app/payload\nCMD [\"cat\", \"/app/payload\"]\n"),
        )
        .unwrap();
        self.ok(&["build", "-t", name, ctx.to_str().unwrap()]);
    }

    /// Sizes of the blobs of `image` that are not blobs of `base`.
    fn own_blob_bytes(&self, image: &str, base: &str) -> u64 {
        let blobs = |name: &str| -> Vec<(String, u64)> {
            let out = self.ok(&["inspect", "--json", name]).0;
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let m = &v["manifest"];
            let mut all = vec![(
                m["config"]["digest"].as_str().unwrap().to_string(),
                m["config"]["size"].as_u64().unwrap(),
            )];
            for l in m["layers"].as_array().unwrap() {
                all.push((
                    l["digest"].as_str().unwrap().to_string(),
                    l["size"].as_u64().unwrap(),
                ));
            }
            all
        };
        let base_blobs = blobs(base);
        blobs(image)
            .into_iter()
            .filter(|b| !base_blobs.contains(b))
            .map(|(_, s)| s)
            .sum()
    }
}

#[test]
fn push_sends_only_what_the_host_lacks_and_nothing_the_second_time() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let host = TestHost::start(&lab.env, &lab.keys);
    let project = lab.project(&[("web1", &host)]);
    let p = project.to_str().unwrap();
    import_busybox(&lab.env, "base:1");
    lab.build_app("base:1", "app:1", 3_000_000, 1);

    // The base first: the host has nothing.
    let (out, err) = lab.ok(&["push", "base:1", "--host", "web1", "--project", p]);
    assert!(out.starts_with("web1 base:1@sha256:"), "{out}");
    assert!(err.contains("Pushed base:1 to web1: 3 sent"), "{err}");

    // Then the app: only its own layer, config and manifest cross the wire.
    let before = host.tx_bytes();
    let (_, err) = lab.ok(&[
        "push",
        "app:1",
        "--host",
        "web1",
        "--project",
        p,
        "--progress",
        "json",
    ]);
    let sent = host.tx_bytes() - before;
    let manifest = lab.ok(&["inspect", "--json", "app:1"]).0;
    let manifest_size = serde_json::from_str::<serde_json::Value>(&manifest).unwrap()["descriptor"]
        ["size"]
        .as_u64()
        .unwrap();
    let missing = lab.own_blob_bytes("app:1", "base:1") + manifest_size;
    // `--progress json`: events only, the summary naming the host.
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let summary = events.last().unwrap();
    assert_eq!(
        (&summary["event"], &summary["host"]),
        (&serde_json::json!("pushed"), &serde_json::json!("web1")),
        "{err}"
    );
    assert_eq!(
        (&summary["sent"], &summary["present"]),
        (&3.into(), &1.into()),
        "{err}"
    );
    assert!(
        sent as f64 <= missing as f64 * 1.02 + 64.0 * 1024.0,
        "{sent} bytes on the wire for {missing} missing bytes"
    );
    assert!(sent >= missing, "{sent} < {missing}: the count is wrong");

    // The host has the image, named, valid, unpacked; it runs there the same.
    host.strata(&["validate", "app:1"]);
    let here = lab.ok(&["inspect", "--json", "app:1"]).0;
    let there = host.strata(&["inspect", "--json", "app:1"]);
    let digest = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["descriptor"]["digest"].clone()
    };
    assert_eq!(digest(&here), digest(&there));

    // Again: no blob moves, only the handshake and one `have`.
    let before = host.tx_bytes();
    let t = Instant::now();
    let (_, err) = lab.ok(&[
        "push",
        "app:1",
        "--host",
        "web1",
        "--project",
        p,
        "--progress",
        "json",
    ]);
    let sent = host.tx_bytes() - before;
    let summary: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&summary["sent"], &summary["present"]),
        (&0.into(), &4.into()),
        "{err}"
    );
    assert!(sent < 64 * 1024, "a no-op push sent {sent} bytes");
    eprintln!("no-op push: {:?}, {sent} bytes", t.elapsed());
}

#[test]
fn pull_from_a_host_and_push_by_url_under_another_name() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let host = TestHost::start(&lab.env, &lab.keys);
    let project = lab.project(&[("h", &host)]);
    let p = project.to_str().unwrap();
    import_busybox(&lab.env, "base:1");
    lab.build_app("base:1", "app:1", 500_000, 2);
    lab.ok(&["push", "app:1", "--host", "h", "--project", p]);

    // A fresh store pulls it back: same digest, valid, and a pull of what is here moves nothing.
    let other = lab.sharing_keys();
    let (out, err) = other.ok(&["pull", "app:1", "--host", "h", "--project", p]);
    let want = lab.ok(&["inspect", "--json", "app:1"]).0;
    let want = serde_json::from_str::<serde_json::Value>(&want).unwrap()["descriptor"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(out, format!("app:1\n{want}\n"), "{err}");
    assert!(err.contains("4 fetched"), "{err}");
    other.ok(&["validate", "app:1"]);
    let (_, err) = other.ok(&["pull", "app:1", "--host", "h", "--project", p]);
    assert!(
        err.contains("0 fetched") && err.contains("4 already here"),
        "{err}"
    );

    // By URL (the host's default store; strata already where [host.h] put it is not used, so
    // this also installs strata under the remote home).
    let url = format!("ssh://root@{}/copy:2", host.addr);
    let (out, err) = lab.ok(&["push", "app:1", &url]);
    assert!(out.contains("copy:2@sha256:"), "{out}");
    assert!(err.contains("installing strata"), "{err}");
    let installed = host.home.join(".strata/bin/strata");
    assert_eq!(
        fs::read(&installed).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_strata")).unwrap(),
        "the installed binary is this one"
    );
    assert!(
        err.contains("0 sent"),
        "same store as [host.h]: nothing to send\n{err}"
    );
    host.strata(&["validate", "copy:2"]);
    let url = format!("ssh://root@{}/copy:2", host.addr);
    let (_, err) = other.ok(&["pull", &url]);
    assert!(!err.contains("installing"), "installed once: {err}");
    other.ok(&["validate", "copy:2"]);

    // A host that lies: its copy of the app's layer has other bytes than its digest says. A
    // pull refuses the blob, names the host, and stores and names nothing.
    let there = host.strata(&["inspect", "--json", "app:1"]);
    let layer = serde_json::from_str::<serde_json::Value>(&there).unwrap()["manifest"]["layers"][1]
        ["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let file = host
        .store
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&file, &bytes).unwrap();
    let third = lab.sharing_keys();
    let err = third.fails(&["pull", "app:1", "--host", "h", "--project", p]);
    assert!(err.contains("host `h`") && err.contains(&layer), "{err}");
    assert!(
        err.contains("mismatch") || err.contains("does not match"),
        "{err}"
    );
    let images = third.strata(&["images", "-q"]);
    assert!(!String::from_utf8_lossy(&images.stdout).contains("app"));
    assert!(
        !third
            .env
            .store()
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:"))
            .exists(),
        "the bad blob is not stored under the digest"
    );
}

#[test]
fn unknown_hosts_refused_keys_and_missing_images_are_clear_errors() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let host = TestHost::start(&lab.env, &lab.keys);
    let project = lab.project(&[("h", &host)]);
    let p = project.to_str().unwrap();
    import_busybox(&lab.env, "base:1");

    let err = lab.fails(&["push", "base:1", "--host", "nope", "--project", p]);
    assert!(
        err.contains("unknown host `nope`") && err.contains("the hosts h"),
        "{err}"
    );

    // A key the host does not know.
    let out = lab
        .command(&["push", "base:1", "--host", "h", "--project", p])
        .env(
            "STRATA_SSH_COMMAND",
            format!(
                "ssh -F {} -i {}",
                lab.keys.dir.join("config").display(),
                lab.keys.dir.join("other").display()
            ),
        )
        .env("STRATA_SSH_COMMAND", format!("ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -i {}", lab.keys.dir.join("other").display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("host `h`") && err.contains("Permission denied"),
        "{err}"
    );

    // Nothing listening.
    let dead = format!("ssh://root@{}:2/x:1", host.addr);
    let err = lab.fails(&["push", "base:1", &dead]);
    assert!(
        err.contains("ssh cannot connect") && err.contains("refused"),
        "{err}"
    );

    // strata missing there and no place to install it: said, with ssh's words.
    let dir = lab.env.path("project-ro");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("strata.toml"),
        format!(
            "[host.ro]\nssh = \"root@{}\"\nstrata = \"/proc/strata-cannot-be-here\"\n",
            host.addr
        ),
    )
    .unwrap();
    let err = lab.fails(&[
        "push",
        "base:1",
        "--host",
        "ro",
        "--project",
        dir.to_str().unwrap(),
    ]);
    assert!(
        err.contains("host `ro`: cannot install strata at /proc/strata-cannot-be-here"),
        "{err}"
    );

    // An image the host does not have.
    let err = lab.fails(&["pull", "ghost:1", "--host", "h", "--project", p]);
    assert!(err.contains("host `h`: has no image `ghost:1`"), "{err}");
    assert!(
        !lab.env.store().join("index.json").exists() || !lab.ok(&["images"]).0.contains("ghost")
    );
}

/// A host whose `uname -m` names another architecture (a script ahead of the real `uname` on
/// its PATH) gets no strata binary: the client compares the architectures, refuses, and says
/// what to do; with the same architecture under its other name (`amd64`, `arm64`) it installs.
#[test]
fn a_host_of_another_architecture_gets_no_binary_and_a_clear_refusal() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let bin = lab.env.path("remote-bin");
    fs::create_dir_all(&bin).unwrap();
    let answer = bin.join("answer");
    let uname = bin.join("uname");
    fs::write(
        &uname,
        format!(
            "#!/bin/sh\n[ \"$1\" = -m ] && exec cat {}\nexec /bin/uname \"$@\"\n",
            answer.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&uname, fs::Permissions::from_mode(0o755)).unwrap();
    let (other, alias) = match std::env::consts::ARCH {
        "x86_64" => ("aarch64", "amd64"),
        "aarch64" => ("x86_64", "arm64"),
        a => panic!("no test architecture pair for {a}"),
    };
    fs::write(&answer, format!("{other}\n")).unwrap();
    let host = TestHost::start_with_path(&lab.env, &lab.keys, Some(&bin));
    import_busybox(&lab.env, "base:1");
    // strata is not at the default path on the host, so the client would install itself.
    let url = format!("ssh://root@{}/copy:1", host.addr);
    let installed = host.home.join(".strata/bin/strata");
    let err = lab.fails(&["push", "base:1", &url]);
    assert!(
        err.contains(&format!(
            "it is {other} and this strata is {}: install strata for {other} there",
            std::env::consts::ARCH
        )),
        "{err}"
    );
    assert!(err.contains("strata = \"PATH\""), "says what to do: {err}");
    assert!(!err.contains("installing strata"), "{err}");
    assert!(
        !installed.exists(),
        "a binary of another architecture was installed"
    );

    // The same architecture spelled as Debian and macOS do: installed, and the push goes on.
    fs::write(&answer, format!("{alias}\n")).unwrap();
    let (out, err) = lab.ok(&["push", "base:1", &url]);
    assert!(err.contains("installing strata"), "{err}");
    assert!(out.contains("copy:1@sha256:"), "{out}");
    assert_eq!(
        fs::read(&installed).unwrap(),
        fs::read(env!("CARGO_BIN_EXE_strata")).unwrap()
    );
}

/// Bytes of partial blob files in `store`.
fn partial_bytes(store: &Path) -> u64 {
    fs::read_dir(store.join("strata/partial"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The `strata serve` processes running in the host's namespace.
fn remote_servers(host: &TestHost) -> Vec<String> {
    remote_processes(host, "serve\0--stdio")
}

/// The pids of the processes in the host's namespace whose command line (NUL-separated)
/// contains `needle`.
fn remote_processes(host: &TestHost, needle: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "pids", &host.ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn a_push_killed_on_either_side_resumes_and_resends_only_the_rest() {
    if !can_run() || !have("tc") {
        return;
    }
    let lab = Lab::new();
    let host = TestHost::start(&lab.env, &lab.keys);
    let project = lab.project(&[("h", &host)]);
    let p = project.to_str().unwrap();
    import_busybox(&lab.env, "base:1");
    lab.build_app("base:1", "big:1", 24_000_000, 3);
    lab.ok(&["push", "base:1", "--host", "h", "--project", p]);
    // 40 Mbit/s: the 24 MB layer takes about 5 s, time enough to kill the push midway.
    host.limit_rate("40mbit");

    // 1. The client is killed (kill -9) a few MB into the layer.
    let mut child = lab
        .command(&["push", "big:1", "--host", "h", "--project", p])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "part of the layer on the host",
        Duration::from_secs(30),
        || partial_bytes(&host.store) > 4_000_000,
    );
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for(
        "the host's strata to notice",
        Duration::from_secs(10),
        || remote_servers(&host).is_empty(),
    );
    let held = partial_bytes(&host.store);
    assert!(held > 4_000_000 && held < 24_000_000, "{held}");
    assert!(
        host.strata(&["images"]).lines().all(|l| !l.contains("big")),
        "not named yet"
    );

    // 2. The retry is killed on the host's side (kill -9 of `strata serve`).
    let child = lab
        .command(&["push", "big:1", "--host", "h", "--project", p])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        "more of the layer on the host",
        Duration::from_secs(30),
        || partial_bytes(&host.store) > held + 4_000_000,
    );
    for pid in remote_servers(&host) {
        Command::new("kill").args(["-9", &pid]).status().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("host `h`") && err.contains("connection lost"),
        "{err}"
    );
    let held = partial_bytes(&host.store);

    // 3. The last retry sends only what is missing, at full speed.
    Command::new("tc")
        .args(["qdisc", "del", "dev", &host.veth, "root"])
        .status()
        .unwrap();
    let before = host.tx_bytes();
    let (_, err) = lab.ok(&["push", "big:1", "--host", "h", "--project", p]);
    let sent = host.tx_bytes() - before;
    assert!(err.contains("1 resumed"), "{err}");
    let layer = lab.own_blob_bytes("big:1", "base:1");
    assert!(
        sent <= layer - held + 4 * 1024 * 1024,
        "resent {sent} bytes; the host held {held} of {layer}"
    );
    host.strata(&["validate", "big:1"]);
    assert_eq!(
        partial_bytes(&host.store),
        0,
        "the partial file became the blob"
    );
}

/// Whether machines can run here (root, runc, tini-static, busybox); says loudly why not.
fn can_run_machines() -> bool {
    let ok = have("runc") && Path::new("/usr/bin/tini-static").exists();
    if !ok {
        eprintln!(
            "\n!!!!! SKIPPED: deploying to SSH hosts needs runc and tini-static (CI installs them) !!!!!\n"
        );
    }
    ok
}

/// A project of one busybox httpd app `web` serving `site/` (its `index.html` says `index`),
/// with `app_toml` after the app's image and port in `[app.web]` (and any tables after it).
fn web_project(lab: &Lab, index: &str, app_toml: &str) -> PathBuf {
    let dir = lab.env.path("project");
    fs::create_dir_all(dir.join("site")).unwrap();
    fs::write(dir.join("site/index.html"), index).unwrap();
    fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    fs::write(
        dir.join("strata.toml"),
        format!("[[image]]\nname = \"web\"\n\n[app.web]\nimage = \"web\"\nport = 8080\n{app_toml}"),
    )
    .unwrap();
    dir
}

#[test]
fn rolling_deploy_to_two_hosts_drops_no_request_stops_at_a_failing_host_and_rolls_back() {
    if !can_run() || !can_run_machines() {
        return;
    }
    let lab = Lab::new();
    let a = TestHost::start(&lab.env, &lab.keys);
    let b = TestHost::start(&lab.env, &lab.keys);
    import_busybox(&lab.env, "busybox:latest");
    let port = 18_300 + (std::process::id() % 500) as u16;
    let dir = web_project(
        &lab,
        "v1\n",
        &format!(
            "public_port = {port}\nkill_timeout = \"2s\"\nvolumes = [\"webdata:/data\"]\n\
             hosts = [\"a\", \"b\"]\nstrategy = \"rolling\"\n\
             health = {{ path = \"/ok.html\", interval = \"100ms\", timeout = \"1s\", deadline = \"4s\" }}\n\n{}{}",
            a.toml("a"),
            b.toml("b")
        ),
    );
    // The health check reads a file each host keeps in its volume: a host without it fails.
    std::os::unix::fs::symlink("/data/ok.html", dir.join("site/ok.html")).unwrap();
    for h in [&a, &b] {
        let vol = h.store.join("strata/volumes/webdata");
        fs::create_dir_all(&vol).unwrap();
        fs::write(vol.join("ok.html"), "ok\n").unwrap();
    }
    let p = dir.to_str().unwrap();

    // v1 on both.
    let (v1, err) = lab.ok(&["deploy", "web", "--project", p]);
    let v1 = v1.trim().to_string();
    assert!(err.contains("a: ") && err.contains("b: "), "{err}");
    assert!(err.contains("web is deployed on a, b"), "{err}");
    for h in [&a, &b] {
        assert_eq!(http_get(&h.addr, port, "/").unwrap(), "v1\n");
    }

    // A client hits both hosts all through the next deploys.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loop_ = {
        let stop = stop.clone();
        let addrs = [a.addr.clone(), b.addr.clone()];
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            let started = Instant::now();
            while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(120) {
                for addr in &addrs {
                    match http_get(addr, port, "/") {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{addr}: {e}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        })
    };

    // Which host each event of a `--progress json` deploy was about, in order.
    let hosts_in_order = |err: &str| -> Vec<String> {
        err.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|e| e["host"].as_str().map(String::from))
            .collect()
    };

    // v2, rolling one at a time: both switch, b only once a is done.
    fs::write(dir.join("site/index.html"), "v2\n").unwrap();
    let (_, err) = lab.ok(&["deploy", "web", "--project", p, "--progress", "json"]);
    for h in [&a, &b] {
        assert_eq!(http_get(&h.addr, port, "/").unwrap(), "v2\n");
    }
    let order = hosts_in_order(&err);
    let last_a = order.iter().rposition(|h| h == "a").unwrap();
    let first_b = order.iter().position(|h| h == "b").unwrap();
    assert!(last_a < first_b, "b started before a was done: {order:?}");

    // v3 with b's health file gone: a switches, b fails its check, the rollout stops there
    // and b keeps serving v2.
    fs::remove_file(b.store.join("strata/volumes/webdata/ok.html")).unwrap();
    fs::write(dir.join("site/index.html"), "v3\n").unwrap();
    let err = lab.fails(&["deploy", "web", "--project", p]);
    assert!(
        err.contains("stopped at b (batch 2 of 2)") && err.contains("a run(s) the new release"),
        "{err}"
    );
    assert_eq!(http_get(&a.addr, port, "/").unwrap(), "v3\n");
    assert_eq!(http_get(&b.addr, port, "/").unwrap(), "v2\n");

    // Roll every host back to v1 by its image, both hosts at once (`parallelism = 2`).
    fs::write(b.store.join("strata/volumes/webdata/ok.html"), "ok\n").unwrap();
    let toml = fs::read_to_string(dir.join("strata.toml")).unwrap();
    fs::write(
        dir.join("strata.toml"),
        toml.replace(
            "strategy = \"rolling\"\n",
            "strategy = \"rolling\"\nparallelism = 2\n",
        ),
    )
    .unwrap();
    let (_, err) = lab.ok(&[
        "deploy",
        "web",
        "--project",
        p,
        "--image",
        &v1,
        "--progress",
        "json",
    ]);
    for h in [&a, &b] {
        assert_eq!(http_get(&h.addr, port, "/").unwrap(), "v1\n");
    }
    let order = hosts_in_order(&err);
    let last_a = order.iter().rposition(|h| h == "a").unwrap();
    let first_b = order.iter().position(|h| h == "b").unwrap();
    let last_b = order.iter().rposition(|h| h == "b").unwrap();
    let first_a = order.iter().position(|h| h == "a").unwrap();
    assert!(
        first_b < last_a && first_a < last_b,
        "the hosts were not deployed together: {order:?}"
    );
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = loop_.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} requests made");

    // Releases are recorded on each host, and readable from here.
    let out = lab
        .command(&["releases", "web", "--host", "b", "--project", p])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("v4") && text.contains("failed"), "{text}");
    let out = lab
        .command(&["status", "web", "--host", "a", "--project", p])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Machine and app commands there: the host's machines, not this machine's.
    let out = lab
        .command(&["machine", "list", "--json", "--host", "a", "--project", p])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        rows.iter()
            .any(|r| r["app"] == "web" && r["state"] == "running"),
        "{rows:?}"
    );
    let out = lab
        .command(&["apps", "--host", "b", "--project", p, "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("web"), "{text}");
    assert!(
        lab.ok(&["machine", "list", "--json"]).0.trim().is_empty(),
        "none here"
    );
}

#[test]
fn a_host_without_space_fails_naming_it_and_names_nothing_half_shipped() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    let host = TestHost::start(&lab.env, &lab.keys);
    // The host's store on a 12 MB filesystem.
    fs::create_dir_all(&host.store).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=12m tmpfs {}",
        host.store.display()
    ));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(host.store.clone());
    let project = lab.project(&[("h", &host)]);
    let p = project.to_str().unwrap();
    import_busybox(&lab.env, "base:1");
    lab.build_app("base:1", "big:1", 16_000_000, 4);
    lab.ok(&["push", "base:1", "--host", "h", "--project", p]);

    let err = lab.fails(&["push", "big:1", "--host", "h", "--project", p]);
    assert!(err.contains("host `h`"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let images = host.strata(&["images", "-q"]);
    assert!(
        images.contains("base:1") && !images.contains("big"),
        "{images}"
    );
    host.strata(&["validate", "base:1"]);
}

/// `strata dev --host`: the app is deployed on the host, a synced edit lands in the host's
/// running machine (no new machine), a Dockerfile change rebuilds here and redeploys there.
#[test]
fn dev_against_a_host_syncs_edits_there_and_redeploys_there() {
    if !can_run() || !can_run_machines() {
        return;
    }
    let lab = Lab::new();
    let h = TestHost::start(&lab.env, &lab.keys);
    import_busybox(&lab.env, "busybox:latest");
    let port = 18_400 + (std::process::id() % 500) as u16;
    let dir = web_project(
        &lab,
        "v1\n",
        &format!(
            "public_port = {port}\nkill_timeout = \"2s\"\n\
             live_update = {{ sync = [{{ src = \"site\", dest = \"/www\" }}] }}\n\n{}",
            h.toml("h")
        ),
    );
    let log = lab.env.path("dev.log");
    let mut child = lab
        .command(&[
            "dev",
            "web",
            "--host",
            "h",
            "--project",
            dir.to_str().unwrap(),
            "--progress",
            "plain",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let said = || fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !said().contains("watching") {
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "strata dev did not start ({exited:?}):\n{}",
            said()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let machines = || -> Vec<String> {
        h.strata(&["machine", "list", "--app", "web", "--json"])
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["state"] == "running")
            .filter_map(|v| v["id"].as_str().map(String::from))
            .collect()
    };
    let get = || http_get(&h.addr, port, "/");
    assert_eq!(get().unwrap(), "v1\n");
    let first = machines();
    assert_eq!(first.len(), 1);

    // A synced edit: in the host's machine, the same machine.
    fs::write(dir.join("site/index.html"), "v2\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get().ok().as_deref() != Some("v2\n") {
        assert!(
            Instant::now() < deadline,
            "the edit did not land:\n{}",
            said()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        said().contains("synced site/index.html → /www/index.html to 1 machine(s)"),
        "{}",
        said()
    );
    assert_eq!(machines(), first, "synced, not redeployed");

    // The host's end of the dev connection killed (a dropped link does the same): the next
    // edit opens it again and is synced, not redeployed.
    let killed = remote_processes(&h, "\0dev-apply\0");
    assert_eq!(killed.len(), 1, "one dev-apply on the host: {killed:?}");
    Command::new("kill")
        .args(["-9", &killed[0]])
        .status()
        .unwrap();
    fs::write(dir.join("site/index.html"), "v3\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get().ok().as_deref() != Some("v3\n") {
        assert!(
            Instant::now() < deadline,
            "the edit after the broken connection did not land:\n{}",
            said()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(said().contains("reconnected to h"), "{}", said());
    assert_eq!(
        machines(),
        first,
        "synced over the new connection, not redeployed"
    );

    // A change the rules do not cover: rebuilt here, shipped and redeployed there.
    fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nENV CHANGED=1\nCOPY site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !said().contains("rebuilt and redeployed") {
        assert!(Instant::now() < deadline, "no redeploy:\n{}", said());
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = machines();
        if now.len() == 1 && now != first {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new machine on the host: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(get().unwrap(), "v3\n");
    // One more synced edit, then Ctrl-C: the edit stays (a dev layer) until `dev --reset`,
    // which acts on the host the app is on.
    fs::write(dir.join("site/index.html"), "v4\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get().ok().as_deref() != Some("v4\n") {
        assert!(Instant::now() < deadline, "v4 did not land:\n{}", said());
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", said());
    let reset = lab
        .command(&[
            "dev",
            "web",
            "--reset",
            "--host",
            "h",
            "--project",
            dir.to_str().unwrap(),
            "--progress",
            "plain",
        ])
        .output()
        .unwrap();
    let reset_err = String::from_utf8_lossy(&reset.stderr);
    assert!(reset.status.success(), "{reset_err}");
    assert!(
        reset_err.contains("dev changes dropped, 1 machine(s) restarted"),
        "{reset_err}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while get().ok().as_deref() != Some("v3\n") {
        assert!(
            Instant::now() < deadline,
            "after --reset the host serves the deployed image's page: {:?}",
            get()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    h.strata(&["apps", "destroy", "web"]);
}

/// Test hosts that reach each other through this namespace (each one's default route points
/// at its end of the link, and this namespace forwards), with nftables counting the bytes
/// this namespace sends to the hosts itself (its output hook) apart from the bytes it only
/// forwards between them (its forward hook). Put back as it was when dropped.
struct Relaying {
    table: String,
    ip_forward: String,
}

impl Relaying {
    fn new(hosts: &[&TestHost]) -> Relaying {
        let ip_forward = fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
        let table = format!("strata_relay_{}", std::process::id());
        let veths: Vec<String> = hosts.iter().map(|h| format!("\"{}\"", h.veth)).collect();
        let veths = veths.join(", ");
        let relaying = Relaying { table, ip_forward };
        fs::write("/proc/sys/net/ipv4/ip_forward", "1\n").unwrap();
        for h in hosts {
            let gateway = format!("{}.1", h.addr.rsplit_once('.').unwrap().0);
            sh(&format!(
                "ip netns exec {} ip route replace default via {gateway}",
                h.ns
            ));
        }
        let t = &relaying.table;
        sh(&format!(
            "nft add table inet {t}; \
             nft add chain inet {t} from_here '{{ type filter hook output priority 0; policy accept; }}'; \
             nft add chain inet {t} between '{{ type filter hook forward priority 0; policy accept; }}'; \
             nft add rule inet {t} from_here oifname '{{ {veths} }}' counter; \
             nft add rule inet {t} between oifname '{{ {veths} }}' counter accept"
        ));
        relaying
    }

    /// Bytes (IP packets) sent to the hosts: (by this namespace, forwarded between hosts).
    fn counters(&self) -> (u64, u64) {
        let out = sh(&format!("nft list table inet {}", self.table));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut chain = "";
        let (mut sent, mut forwarded) = (0, 0);
        for line in text.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix("chain ") {
                chain = if name.starts_with("from_here") {
                    "out"
                } else {
                    "fwd"
                };
            }
            if let Some(rest) = line.split(" bytes ").nth(1) {
                let n: u64 = rest.split_whitespace().next().unwrap().parse().unwrap();
                match chain {
                    "out" => sent += n,
                    _ => forwarded += n,
                }
            }
        }
        (sent, forwarded)
    }
}

impl Drop for Relaying {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .status();
        let _ = fs::write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward);
    }
}

/// An ssh-agent holding the test key, and an ssh config that checks host keys against a
/// known_hosts file (the test hosts share one host key), as a relay requires.
struct Agent {
    socket: PathBuf,
    process: Child,
    ssh_command: String,
}

impl Agent {
    fn new(lab: &Lab) -> Agent {
        let dir = &lab.keys.dir;
        let socket = lab.env.path("agent.sock");
        let process = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for("ssh-agent", Duration::from_secs(10), || socket.exists());
        run(Command::new("ssh-add")
            .arg("-q")
            .arg(dir.join("id"))
            .env("SSH_AUTH_SOCK", &socket));
        let hostkey = fs::read_to_string(dir.join("hostkey.pub")).unwrap();
        let key: Vec<&str> = hostkey.split_whitespace().take(2).collect();
        fs::write(
            dir.join("known_hosts"),
            format!("10.77.*.* {}\n", key.join(" ")),
        )
        .unwrap();
        fs::write(
            dir.join("config-strict"),
            format!(
                "Host *\n  User root\n  IdentityFile {}\n  IdentitiesOnly yes\n  \
                 StrictHostKeyChecking yes\n  UserKnownHostsFile {}\n  \
                 GlobalKnownHostsFile /dev/null\n  LogLevel ERROR\n",
                dir.join("id").display(),
                dir.join("known_hosts").display()
            ),
        )
        .unwrap();
        Agent {
            ssh_command: format!("ssh -F {}", dir.join("config-strict").display()),
            socket,
            process,
        }
    }

    /// `strata ARGS` on the developer's side with the agent and host key checking.
    fn strata(&self, lab: &Lab, args: &[&str]) -> (String, String) {
        let out = lab
            .command(args)
            .env("SSH_AUTH_SOCK", &self.socket)
            .env("STRATA_SSH_COMMAND", &self.ssh_command)
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        assert!(out.status.success(), "strata {args:?} failed:\n{stderr}");
        (stdout, stderr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Blob events and `pushed` events of a `--progress json` run, per host.
fn json_events(err: &str) -> Vec<serde_json::Value> {
    err.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// Three hosts with relays: each missing byte leaves the developer's side about once (the
/// hosts forward the rest to each other), every host's store holds the image, valid; the
/// events say which host each relayed blob came from. A host the others cannot reach gets
/// the image from the developer's side instead, said in one line.
#[test]
fn hosts_relay_blobs_so_each_missing_byte_leaves_here_once() {
    if !can_run() || !have("nft") || !have("ssh-agent") {
        if !have("nft") || !have("ssh-agent") {
            eprintln!(
                "\n!!!!! SKIPPED: relay tests need nft (nftables) and ssh-agent (CI installs them) !!!!!\n"
            );
        }
        return;
    }
    let lab = Lab::new();
    let hosts: Vec<TestHost> = (0..3)
        .map(|_| TestHost::start(&lab.env, &lab.keys))
        .collect();
    let relaying = Relaying::new(&hosts.iter().collect::<Vec<_>>());
    let agent = Agent::new(&lab);
    let names = ["h1", "h2", "h3"];
    let dir = lab.env.path("project");
    fs::create_dir_all(&dir).unwrap();
    let toml: String = names
        .iter()
        .zip(&hosts)
        .map(|(n, h)| format!("{}relay = true\n", h.toml(n)))
        .collect();
    fs::write(dir.join("strata.toml"), &toml).unwrap();
    let p = dir.to_str().unwrap();
    import_busybox(&lab.env, "base:1");
    lab.build_app("base:1", "app:1", 4_000_000, 5);
    let manifest = |image: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&lab.ok(&["inspect", "--json", image]).0).unwrap();
        let m = &v["manifest"];
        let mut sizes = vec![v["descriptor"]["size"].as_u64().unwrap()];
        sizes.push(m["config"]["size"].as_u64().unwrap());
        for l in m["layers"].as_array().unwrap() {
            sizes.push(l["size"].as_u64().unwrap());
        }
        sizes
    };
    let missing: u64 = manifest("app:1").iter().sum();

    // 1. Nothing on the hosts: the whole image is missing everywhere.
    let (before_sent, before_fwd) = relaying.counters();
    let (out, err) = agent.strata(
        &lab,
        &[
            "push",
            "app:1",
            "--host",
            "h1",
            "--host",
            "h2",
            "--host",
            "h3",
            "--project",
            p,
            "--progress",
            "json",
        ],
    );
    let (sent, fwd) = relaying.counters();
    let (sent, fwd) = (sent - before_sent, fwd - before_fwd);
    eprintln!("3 hosts, {missing} missing bytes: {sent} sent from here, {fwd} between hosts");
    for n in names {
        assert!(out.contains(&format!("{n} app:1@sha256:")), "{out}");
    }
    for h in &hosts {
        h.strata(&["validate", "app:1"]);
    }
    // Without relays this would be 3x the missing bytes from here.
    assert!(
        sent as f64 <= missing as f64 * 1.15 + 256.0 * 1024.0,
        "{sent} bytes left here for {missing} missing bytes on each of 3 hosts\n{err}"
    );
    assert!(sent >= missing, "{sent} < {missing}: the count is wrong");
    assert!(
        fwd >= 2 * missing,
        "{fwd} bytes between hosts: the other two got the image from a host\n{err}"
    );
    let events = json_events(&err);
    let relayed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "pushed" && e["from"].is_string())
        .collect();
    assert_eq!(relayed.len(), 2, "{err}");
    for e in &relayed {
        assert_ne!(e["from"], e["host"], "{e}");
        assert!(names.contains(&e["from"].as_str().unwrap()), "{e}");
    }
    assert!(
        events.iter().any(|e| e["event"] == "blob"
            && e["state"] == "done"
            && e["from"].is_string()
            && e["host"] != e["from"]),
        "blob events name the host a blob came from\n{err}"
    );

    // 2. A host the others cannot reach (its relay address refuses connections): the relay
    // to it fails, it gets the new layer from here, and that is said naming both hosts.
    let toml = toml.replace(
        &format!("[host.h3]\nssh = \"root@{}\"\n", hosts[2].addr),
        &format!(
            "[host.h3]\nssh = \"root@{}\"\nrelay_address = \"{}:2\"\n",
            hosts[2].addr, hosts[2].addr
        ),
    );
    fs::write(dir.join("strata.toml"), &toml).unwrap();
    lab.build_app("base:1", "app:2", 2_000_000, 6);
    let layer = lab.own_blob_bytes("app:2", "base:1");
    let (before_sent, _) = relaying.counters();
    let (out, err) = agent.strata(
        &lab,
        &[
            "push",
            "app:2",
            "--relay",
            "--host",
            "h1",
            "--host",
            "h2",
            "--host",
            "h3",
            "--project",
            p,
        ],
    );
    let (sent, _) = relaying.counters();
    let sent = sent - before_sent;
    eprintln!("fallback: {layer} new bytes, {sent} sent from here\n{err}");
    for n in names {
        assert!(out.contains(&format!("{n} app:2@sha256:")), "{out}");
    }
    for h in &hosts {
        h.strata(&["validate", "app:2"]);
    }
    let line = err
        .lines()
        .find(|l| l.contains("failed") && l.contains("sending from here instead"))
        .unwrap_or_else(|| panic!("no fallback line\n{err}"));
    assert!(
        line.contains("to h3") && (line.contains("from h1") || line.contains("from h2")),
        "{line}"
    );
    assert!(
        err.lines().filter(|l| l.contains("relayed from")).count() == 1,
        "h2 still got the image from h1\n{err}"
    );
    // Twice the new bytes from here (h1, then h3 directly), not three times.
    assert!(
        sent >= 2 * layer && (sent as f64) < layer as f64 * 2.5,
        "{sent} bytes from here for {layer} new bytes"
    );
}

/// `strata deploy --relay`: the image reaches the second host from the first (the
/// developer's side sends it once), then the app is deployed on both and serves there.
#[test]
fn deploy_with_relays_ships_once_and_deploys_on_every_host() {
    if !can_run() || !can_run_machines() || !have("nft") || !have("ssh-agent") {
        return;
    }
    let lab = Lab::new();
    let a = TestHost::start(&lab.env, &lab.keys);
    let b = TestHost::start(&lab.env, &lab.keys);
    let relaying = Relaying::new(&[&a, &b]);
    let agent = Agent::new(&lab);
    import_busybox(&lab.env, "busybox:latest");
    let port = 18_800 + (std::process::id() % 500) as u16;
    let dir = web_project(
        &lab,
        "relayed\n",
        &format!(
            "public_port = {port}\nkill_timeout = \"2s\"\nhosts = [\"a\", \"b\"]\n\n{}{}",
            a.toml("a"),
            b.toml("b")
        ),
    );
    let p = dir.to_str().unwrap();
    let (before, _) = relaying.counters();
    let (_, err) = agent.strata(&lab, &["deploy", "web", "--relay", "--project", p]);
    let (after, between) = relaying.counters();
    assert!(err.contains("web is deployed on a, b"), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("Pushed ")
            && l.contains("to b")
            && l.contains("relayed from a")),
        "{err}"
    );
    let image: u64 = {
        let v: serde_json::Value =
            serde_json::from_str(&lab.ok(&["inspect", "--json", "web:latest"]).0).unwrap();
        let m = &v["manifest"];
        v["descriptor"]["size"].as_u64().unwrap()
            + m["config"]["size"].as_u64().unwrap()
            + m["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["size"].as_u64().unwrap())
                .sum::<u64>()
    };
    eprintln!(
        "deploy --relay: image {image} bytes, {} from here, {between} between hosts",
        after - before
    );
    // The image once from here (plus handshakes and the deploys' sessions), once between hosts.
    assert!(
        (after - before) < image + image / 2,
        "{} bytes from here for an image of {image}\n{err}",
        after - before
    );
    assert!(between >= image, "{between} between hosts\n{err}");
    for h in [&a, &b] {
        assert_eq!(http_get(&h.addr, port, "/").unwrap(), "relayed\n");
    }
}
