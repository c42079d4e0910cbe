//! Test helpers: a temp store, a busybox root filesystem, running the `strata` binary.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A temporary directory holding a store (`store/`) and whatever else a test makes.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// `strata --store <store> ARGS…`, returning its output whatever the exit status.
    pub fn strata(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(self.store())
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }

    /// Like [`Env::strata`], asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.strata(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Like [`Env::strata`], asserting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.strata(args);
        assert!(
            !out.status.success(),
            "strata {args:?} should have failed; stdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// Every blob file under the store, as (name, bytes).
    pub fn blob_files(&self) -> Vec<(String, Vec<u8>)> {
        let dir = self.store().join("blobs/sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(dir).into_iter().flatten() {
            let e = e.unwrap();
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            ));
        }
        out.sort();
        out
    }
}

/// Whether an external tool is on PATH; prints a loud skip note when it is not.
pub fn have(tool: &str) -> bool {
    let found = strata_test_support::on_path(tool);
    if !found {
        strata_test_support::skip(&format!(
            "`{tool}` is not installed (CI installs it via .ci/run)"
        ));
    }
    found
}

/// A busybox root filesystem at `root`: the static binary, a symlink per applet, /etc files,
/// and a few entries that exercise modes and link kinds (a hardlink, a sticky /tmp, a setuid
/// file, an empty dir).
pub fn busybox_rootfs(root: &Path) {
    strata_test_support::install_busybox(&root.join("bin"));
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/motd"), "hello from strata\n").unwrap();
    fs::hard_link(root.join("etc/motd"), root.join("etc/motd.link")).unwrap();
    for (dir, mode) in [("tmp", 0o1777), ("root", 0o700), ("var/empty", 0o755)] {
        fs::create_dir_all(root.join(dir)).unwrap();
        fs::set_permissions(root.join(dir), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::write(root.join("bin/setuid-me"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(
        root.join("bin/setuid-me"),
        fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    symlink("/etc/motd", root.join("motd-abs")).unwrap();
}

/// A tar of `root`'s contents (entries relative, like `tar -C root -cf out .`).
pub fn tar_dir(root: &Path, out: &Path) {
    let status = Command::new("tar")
        .arg("-C")
        .arg(root)
        .arg("--numeric-owner")
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
}

/// One line per entry under `root`: path, type, mode, link target or content hash; hardlinked
/// files are listed with their content, so trees compare equal whatever the link layout.
pub fn tree_listing(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = root.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&full)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        entries.sort();
        for name in entries {
            let rel = rel.join(&name);
            let p = root.join(&rel);
            let m = fs::symlink_metadata(&p).unwrap();
            let mode = m.mode() & 0o7777;
            let line = if m.file_type().is_symlink() {
                format!(
                    "{} link -> {}",
                    rel.display(),
                    fs::read_link(&p).unwrap().display()
                )
            } else if m.is_dir() {
                stack.push(rel.clone());
                format!("{} dir {mode:o} {}:{}", rel.display(), m.uid(), m.gid())
            } else {
                let data = fs::read(&p).unwrap();
                format!(
                    "{} file {mode:o} {}:{} {} {}",
                    rel.display(),
                    m.uid(),
                    m.gid(),
                    data.len(),
                    strata_oci::Digest::sha256(&data).short()
                )
            };
            out.push(line);
        }
    }
    out.sort();
    out
}

/// Import a busybox rootfs as `name`; returns the manifest digest.
pub fn import_busybox(env: &Env, name: &str) -> String {
    let root = env.path("rootfs");
    if !root.exists() {
        busybox_rootfs(&root);
        tar_dir(&root, &env.path("rootfs.tar"));
    }
    let tar = env.path("rootfs.tar");
    env.ok(&[
        "import",
        tar.to_str().unwrap(),
        name,
        "--change",
        r#"CMD ["sh"]"#,
    ])
    .trim()
    .to_string()
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `ready` says yes, failing the test with `what` after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "{what}: not ready after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends SIGINT (Ctrl-C) to `child`, a strata command, and checks it exits 130 within `limit`.
pub fn interrupt_exits_130_within(child: &mut Child, limit: Duration) {
    let started = Instant::now();
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(
        started.elapsed() < limit,
        "{:?} to end after SIGINT",
        started.elapsed()
    );
}

/// `strata registry serve` on a free loopback port, killed on drop.
pub struct Registry {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Registry {
    pub fn start(env: &Env) -> Registry {
        let port = free_port();
        let log = env.path("registry.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(env.path("registry-store"))
            .args(["registry", "serve", "--addr", &format!("127.0.0.1:{port}")])
            .arg("--root")
            .arg(env.path("registry"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut reg = Registry { child, port, log };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for("strata registry serve", Duration::from_secs(30), || {
            if let Some(status) = reg.child.try_wait().unwrap() {
                panic!(
                    "the registry exited ({status}):\n{}",
                    fs::read_to_string(&reg.log).unwrap_or_default()
                );
            }
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        });
        reg
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.0 GET of `path` at `addr:port`: the body of a 200 answer, or why not.
pub fn http_get(addr: &str, port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let sa: SocketAddr = format!("{addr}:{port}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if !out.starts_with("HTTP/1.0 200") && !out.starts_with("HTTP/1.1 200") {
        return Err(out.lines().next().unwrap_or("empty answer").to_string());
    }
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// A TCP proxy to the registry on 127.0.0.1:`port` that counts the bytes each way.
pub struct CountingProxy {
    pub port: u16,
    /// Bytes from the client to the registry, and back.
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
}

impl CountingProxy {
    pub fn start(port: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = CountingProxy {
            port: listener.local_addr().unwrap().port(),
            up: Arc::new(AtomicU64::new(0)),
            down: Arc::new(AtomicU64::new(0)),
        };
        let (up, down) = (proxy.up.clone(), proxy.down.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let relay = |mut from: TcpStream, mut to: TcpStream, count: Arc<AtomicU64>| {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            count.fetch_add(n as u64, Ordering::SeqCst);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                };
                relay(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    up.clone(),
                );
                relay(server, client, down.clone());
            }
        });
        proxy
    }

    /// (bytes up, bytes down) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::SeqCst),
            self.down.load(Ordering::SeqCst),
        )
    }
}
