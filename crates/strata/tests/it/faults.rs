//! Faults a server must survive: clients that go away in the middle of a response.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

/// One `GET path` on a fresh connection, reading at most `limit` bytes of the answer; the
/// connection is then dropped (reset when `reset`, so the server's next write fails at once).
fn get_then_drop(port: u16, path: &str, limit: usize, reset: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < limit {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if reset {
        // SO_LINGER 0: close sends RST instead of FIN.
        let _ = socket2_linger_zero(&s);
    }
    got
}

/// Sets SO_LINGER {on, 0} through the `setsockopt` the standard library has no wrapper for.
#[allow(unsafe_code)]
fn socket2_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket we own, with a pointer to a live `linger` and its size.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `GET /v2/` answered 200.
fn v2_answers(port: u16) -> bool {
    let mut s = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(_) => return false,
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(
        s,
        "GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// A client that closes in the middle of a blob download must never take the registry down
/// (it used to die of SIGPIPE, silently): 50 such clients, half of them resetting, and the
/// registry still answers and still serves the whole blob.
/// Imports `big`: busybox plus `mib` MiB of incompressible bytes, so moving its layer takes
/// many writes. Returns the layer's digest and size.
fn import_big(env: &Env, mib: usize) -> (String, u64) {
    let root = env.path("big-rootfs");
    busybox_rootfs(&root);
    let mut noise = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(root.join("noise.bin"), &noise).unwrap();
    tar_dir(&root, &env.path("big.tar"));
    env.ok(&["import", env.path("big.tar").to_str().unwrap(), "big"]);
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "big", "--json"])).unwrap();
    let layer = &inspect["manifest"]["layers"][0];
    (
        layer["digest"].as_str().unwrap().to_string(),
        layer["size"].as_u64().unwrap(),
    )
}

#[test]
fn registry_survives_clients_that_drop_mid_blob() {
    let started = Instant::now();
    let env = Env::new();
    let (layer, size) = import_big(&env, 24);

    let mut registry = Registry::start(&env);
    let port = registry.port;
    env.ok(&["push", "big", &format!("127.0.0.1:{port}/team/big:1")]);
    let path = format!("/v2/team/big/blobs/{layer}");

    for i in 0..50 {
        let got = get_then_drop(port, &path, 64 << 10, i % 2 == 0);
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "round {i}: {}",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        );
        if let Some(status) = registry.child.try_wait().unwrap() {
            panic!(
                "the registry died after client {i} went away ({status}):\n{}",
                std::fs::read_to_string(&registry.log).unwrap_or_default()
            );
        }
        assert!(v2_answers(port), "round {i}: /v2/ no longer answers");
    }
    // And a whole download still works.
    let whole = get_then_drop(port, &path, usize::MAX, false);
    assert!(whole.len() as u64 > size, "{} of {size} bytes", whole.len());
    eprintln!(
        "registry_survives_clients_that_drop_mid_blob: {:?}",
        started.elapsed()
    );
}

/// What a store's build left: overlay mounts under it, runc bundles, RUN temp dirs.
fn build_leftovers(store: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        if let Some(target) = line.split_whitespace().nth(1)
            && target.starts_with(store.to_str().unwrap())
        {
            found.push(format!("mount {target}"));
        }
    }
    for dir in ["strata/runtime/bundles", "strata/tmp"] {
        for e in std::fs::read_dir(store.join(dir))
            .into_iter()
            .flatten()
            .flatten()
        {
            found.push(format!("{dir}/{}", e.file_name().to_string_lossy()));
        }
    }
    found
}

/// A store with `busybox` where RUN steps can run (root and runc), else the skip is said.
fn build_lab(test: &str) -> Option<Env> {
    if !strata_test_support::can_run_containers(test) {
        return None;
    }
    let env = Env::new();
    import_busybox(&env, "busybox");
    Some(env)
}

/// Starts `strata build` of a Dockerfile whose RUN sleeps, and waits until the RUN runs.
fn build_in_a_long_run(env: &Env) -> std::process::Child {
    std::fs::write(
        env.path("Dockerfile"),
        "FROM busybox\nRUN echo started && sleep 60\n",
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args(["build", "-f"])
        .arg(env.path("Dockerfile"))
        .args(["-t", "slow:1", "--progress", "plain"])
        .arg(env.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let bundles = env.store().join("strata/runtime/bundles");
    wait_for("the RUN container", Duration::from_secs(30), || {
        std::fs::read_dir(&bundles).is_ok_and(|mut d| d.next().is_some())
    });
    // runc has started the container once its state exists.
    std::thread::sleep(Duration::from_millis(500));
    child
}

/// Ctrl-C (SIGINT) during a RUN: the container is killed, the overlay mount, bundle and upper
/// directory are removed, and strata exits 130 at once.
#[test]
fn an_interrupted_build_cleans_up_its_run_step() {
    let Some(env) = build_lab("an_interrupted_build_cleans_up_its_run_step") else {
        return;
    };
    let mut child = build_in_a_long_run(&env);
    assert!(
        !build_leftovers(&env.store()).is_empty(),
        "the RUN is set up"
    );
    interrupt_exits_130_within(&mut child, Duration::from_secs(10));
    assert_eq!(build_leftovers(&env.store()), Vec::<String>::new());
    assert!(!env.ok(&["images", "-q"]).contains("slow:1"));
}

/// `kill -9` of a build mid-RUN: the container dies with it (its watchdog kills it); the next
/// command reclaims the rest: `strata gc` removes its mount, its bundle and its temp dirs.
#[test]
fn what_a_killed_build_left_is_reclaimed_by_gc() {
    let Some(env) = build_lab("what_a_killed_build_left_is_reclaimed_by_gc") else {
        return;
    };
    let mut child = build_in_a_long_run(&env);
    let runc_list = || {
        let out = std::process::Command::new("runc")
            .arg("--root")
            .arg(env.store().join("strata/runtime"))
            .args(["list", "-q"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_ne!(runc_list(), "", "the RUN container runs");
    child.kill().unwrap();
    child.wait().unwrap();
    // The RUN does not outlive its build: its watchdog kills and deletes the container.
    wait_for(
        "the killed build's container to be gone",
        Duration::from_secs(10),
        || runc_list().is_empty(),
    );
    assert!(
        !build_leftovers(&env.store()).is_empty(),
        "kill -9 leaves the mount and bundle behind"
    );
    let out = env.ok(&["gc"]);
    assert!(
        out.contains("removed the leftovers of killed build container"),
        "{out}"
    );
    assert_eq!(build_leftovers(&env.store()), Vec::<String>::new());
    let list = std::process::Command::new("runc")
        .arg("--root")
        .arg(env.store().join("strata/runtime"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).trim(),
        "",
        "no container left"
    );
}

/// `strata pull` and `strata push` against a registry that accepts connections and never
/// answers fail after `STRATA_REGISTRY_TIMEOUT`, naming the registry and what they waited for
/// (they used to hang for 481 s in silence).
#[test]
fn pull_and_push_give_up_on_a_registry_that_never_answers() {
    let env = Env::new();
    import_busybox(&env, "bb");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut conn, &mut std::io::sink());
            });
        }
    });
    let image = format!("{host}/team/app:1");
    for (args, waiting_for) in [
        (
            vec!["pull", image.as_str()],
            "GET manifest team/app:1".to_string(),
        ),
        (
            vec!["push", "bb", image.as_str()],
            "HEAD blob team/app@".to_string(),
        ),
    ] {
        let started = Instant::now();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(env.store())
            .args(&args)
            .env("STRATA_REGISTRY_TIMEOUT", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("strata {args:?} still waiting after 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "strata {args:?} succeeded:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "no answer from {host} for 1 s while waiting for the answer to {waiting_for}"
            )),
            "strata {args:?}:\n{stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "strata {args:?} took {:?}",
            started.elapsed()
        );
    }
    // A malformed timeout is refused, naming the variable.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args(["pull", image.as_str()])
        .env("STRATA_REGISTRY_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("STRATA_REGISTRY_TIMEOUT=`soon`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `VmRSS` of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// 500 clients that ask for a 16 MB blob and read nothing cost the registry a bounded amount
/// of memory (it used to buffer several MiB per connection: 1,000 such clients took 3.2 GB),
/// and it keeps answering while they hang on and after they go.
#[test]
fn stalled_blob_readers_keep_registry_memory_bounded() {
    const CLIENTS: usize = 500;
    const BOUND: u64 = 300 << 20;
    let started = Instant::now();
    let env = Env::new();
    let (layer, size) = import_big(&env, 16);
    assert!(size > 15 << 20, "layer of {size} bytes");

    let registry = Registry::start(&env);
    let port = registry.port;
    env.ok(&["push", "big", &format!("127.0.0.1:{port}/team/big:1")]);
    let pid = registry.child.id();
    let before = rss_bytes(pid);
    let path = format!("/v2/team/big/blobs/{layer}");
    let mut stalled = Vec::new();
    for _ in 0..CLIENTS {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        stalled.push(s);
    }
    // Let every response fill what it can.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        v2_answers(port),
        "/v2/ no longer answers with {CLIENTS} stalled readers"
    );
    let during = rss_bytes(pid);
    eprintln!(
        "registry RSS: {} MiB before, {} MiB with {CLIENTS} stalled readers",
        before >> 20,
        during >> 20
    );
    assert!(
        during < BOUND,
        "registry RSS {} MiB with {CLIENTS} stalled readers (bound {} MiB)",
        during >> 20,
        BOUND >> 20
    );
    drop(stalled);
    wait_for(
        "/v2/ after the readers left",
        Duration::from_secs(10),
        || v2_answers(port),
    );
    // And a whole download still works.
    let whole = get_then_drop(port, &path, usize::MAX, false);
    assert!(whole.len() as u64 > size, "{} of {size} bytes", whole.len());
    eprintln!(
        "stalled_blob_readers_keep_registry_memory_bounded: {:?}",
        started.elapsed()
    );
}

/// Text a registry or an image supplied reaches the terminal with its control characters
/// escaped: a registry's error message that retitles the window (`ESC ] 0 ; … BEL`), and an
/// image's label and environment shown by `strata inspect`.
#[test]
fn registry_and_image_text_cannot_drive_the_terminal() {
    const EVIL: &str = "\u{1b}]0;pwned\u{7}";
    const SHOWN: &str = "\\u{1b}]0;pwned\\u{7}";
    let env = Env::new();
    // A registry that answers every request 400 with a spec error whose message is hostile.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = serde_json::json!({"errors": [{
                    "code": "DENIED",
                    "message": format!("no {EVIL} way"),
                    "detail": format!("see {EVIL}"),
                }]})
                .to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    let stderr = env.fails(&["pull", &format!("{host}/team/app:1")]);
    assert!(
        !stderr.contains('\u{1b}') && !stderr.contains('\u{7}'),
        "raw control characters on stderr: {stderr:?}"
    );
    assert!(
        stderr.contains(&format!("DENIED: no {SHOWN} way (see {SHOWN})")),
        "{stderr}"
    );

    // An image whose config carries the same text.
    let root = env.path("rootfs");
    busybox_rootfs(&root);
    tar_dir(&root, &env.path("rootfs.tar"));
    env.ok(&[
        "import",
        env.path("rootfs.tar").to_str().unwrap(),
        "evil",
        "--change",
        &format!("LABEL title=\"{EVIL}\""),
        "--change",
        &format!("ENV TITLE=\"{EVIL}\""),
    ]);
    let out = env.ok(&["inspect", "evil"]);
    assert!(
        !out.contains('\u{1b}') && !out.contains('\u{7}'),
        "raw control characters in inspect: {out:?}"
    );
    assert!(out.contains(&format!("Label:      title={SHOWN}")), "{out}");
    assert!(out.contains(&format!("Env:        TITLE={SHOWN}")), "{out}");
}

/// A TCP proxy to `port` that cuts the first connection carrying more than `cut_after` bytes
/// upstream, once (a network that drops a push mid-blob); every other connection is relayed.
fn dropping_proxy(
    port: u16,
    cut_after: usize,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let was_cut = cut.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            let cut = cut.clone();
            std::thread::spawn(move || {
                let mut sent = 0usize;
                let mut buf = [0u8; 64 * 1024];
                loop {
                    let n = match c_read.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    sent += n;
                    if sent > cut_after && !cut.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        let _ = c_read.shutdown(std::net::Shutdown::Both);
                        let _ = s_write.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (proxy_port, was_cut)
}

/// A push whose connection drops in the middle of a blob neither dies (SIGPIPE) nor gives up:
/// it resumes and completes, and the registry holds the whole image.
#[test]
fn a_push_cut_mid_blob_resumes_and_completes() {
    let env = Env::new();
    let _ = import_big(&env, 8);
    let registry = Registry::start(&env);
    let (proxy, cut) = dropping_proxy(registry.port, 4 << 20);
    let out = env.strata(&["push", "big", &format!("127.0.0.1:{proxy}/team/big:1")]);
    assert!(
        out.status.success(),
        "push through a dropping connection failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cut.load(std::sync::atomic::Ordering::SeqCst),
        "the proxy cut the upload"
    );
    // The registry really has it: a fresh store pulls and validates it, straight from it.
    let other = Env::new();
    let src = format!("127.0.0.1:{}/team/big:1", registry.port);
    other.ok(&["pull", &src]);
    other.ok(&["validate", &src]);
}
