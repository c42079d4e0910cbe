//! runc end to end: a busybox lower dir, overlay writes, users, networks, mounts, signals,
//! parallel runs and cleanup. Needs root and runc; skips loudly without them.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use strata_rootfs::{Change, changes_from_overlay_upper};
use strata_runtime::{
    MountSpec, NetworkMode, Rootfs, RunResult, RunSpec, RuntimeConfig, UserSpec, cleanup_stale,
    resolve_user, run,
};
use strata_test_support::{install_busybox, skip};

/// runc and root, or a loud reason why the test does nothing.
fn runtime(state: &Path) -> Option<RuntimeConfig> {
    if !rustix::process::geteuid().is_root() {
        skip("runtime tests need root");
        return None;
    }
    match RuntimeConfig::detect(state.to_path_buf()) {
        Ok(c) => Some(c),
        Err(e) => {
            skip(&e.to_string());
            None
        }
    }
}

/// A busybox root filesystem, built once under cargo's per-target temp dir and shared (read
/// only: it is always a lower dir or copied) by every test and every later test run.
fn busybox() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("runtime-busybox-v1");
        if root.join("bin/sh").exists() {
            return root;
        }
        let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let b = tmp.path();
        std::fs::set_permissions(b, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(b.join("bin")).unwrap();
        std::fs::create_dir_all(b.join("etc")).unwrap();
        std::fs::create_dir_all(b.join("home/app")).unwrap();
        install_busybox(&b.join("bin"));
        std::fs::write(
            b.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            b.join("etc/group"),
            "root:x:0:\napp:x:1001:\nextra:x:2000:app\n",
        )
        .unwrap();
        std::fs::write(b.join("etc/doomed"), "delete me\n").unwrap();
        // Whoever renames first wins; the loser's copy is dropped with its temp dir.
        let _ = std::fs::rename(tmp.keep(), &root);
        root
    })
}

struct Fixture {
    _tmp: tempfile::TempDir,
    cfg: RuntimeConfig,
    upper: PathBuf,
    work: PathBuf,
}

impl Fixture {
    fn new() -> Option<Fixture> {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = runtime(&tmp.path().join("state"))?;
        let upper = tmp.path().join("upper");
        let work = tmp.path().join("work");
        std::fs::create_dir(&upper).unwrap();
        std::fs::create_dir(&work).unwrap();
        Some(Fixture {
            _tmp: tmp,
            cfg,
            upper,
            work,
        })
    }

    fn spec(&self, id: &str, script: &str) -> RunSpec {
        RunSpec {
            id: format!("{id}-{}", std::process::id()),
            rootfs: Rootfs::Overlay {
                lowers: vec![busybox().to_path_buf()],
                upper: self.upper.clone(),
                work: self.work.clone(),
            },
            args: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: UserSpec::default(),
            hostname: "strata-test".into(),
            network: NetworkMode::Host,
            mounts: Vec::new(),
            readonly_rootfs: false,
        }
    }

    fn run(&self, spec: &RunSpec) -> (RunResult, String) {
        let mut out = Vec::new();
        let r = run(&self.cfg, spec, &mut |chunk| out.extend_from_slice(chunk))
            .unwrap_or_else(|e| panic!("run failed: {e}"));
        assert_no_leftovers(&self.cfg);
        (r, String::from_utf8_lossy(&out).into_owned())
    }
}

fn assert_no_leftovers(cfg: &RuntimeConfig) {
    let bundles = cfg.state_root.join("bundles");
    let left: Vec<_> = std::fs::read_dir(&bundles)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "bundle dirs left: {left:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state = cfg.state_root.to_string_lossy().into_owned();
    assert!(
        !mountinfo.lines().any(|l| l.contains(&state)),
        "mounts left under {state}:\n{mountinfo}"
    );
}

fn changes(upper: &Path) -> Vec<Change> {
    changes_from_overlay_upper(upper).unwrap()
}

#[test]
fn output_and_exit_code() {
    let Some(f) = Fixture::new() else { return };
    let spec = f.spec(
        "exit",
        "echo hi; echo err >&2; grep memory /proc/self/cgroup; exit 3",
    );
    let (r, out) = f.run(&spec);
    assert_eq!(r.exit_code, 3, "{out}");
    // Its own cgroup, nested under ours.
    assert!(out.contains(&format!("/strata/{}\n", spec.id)), "{out}");
    assert_eq!(r.signal, None);
    assert!(!r.success());
    assert!(out.contains("hi\n") && out.contains("err\n"), "{out}");
    // Mount points runc had to create (/proc, /dev, /sys, /etc/hosts...) are not changes.
    let ch = changes(&f.upper);
    assert!(
        ch.iter()
            .all(|c| matches!(c, Change::Modified(p) if p == Path::new("etc"))),
        "{ch:?}"
    );
}

#[test]
fn writes_land_in_the_upper_dir_only() {
    let Some(f) = Fixture::new() else { return };
    let (r, out) = f.run(&f.spec(
        "writes",
        "echo new > /added && rm /etc/doomed && test ! -e /etc/doomed",
    ));
    assert!(r.success(), "{r:?} {out}");
    let lower = busybox();
    assert!(lower.join("etc/doomed").is_file(), "lower changed");
    assert!(!lower.join("added").exists(), "lower changed");
    assert_eq!(
        std::fs::read_to_string(f.upper.join("added")).unwrap(),
        "new\n"
    );
    let wh = std::fs::symlink_metadata(f.upper.join("etc/doomed")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "not a whiteout"
    );
    let ch = changes(&f.upper);
    // An upper dir alone cannot tell added from modified; either names the new file.
    assert!(
        ch.iter().any(
            |c| matches!(c, Change::Added(p) | Change::Modified(p) if p == Path::new("added"))
        ),
        "{ch:?}"
    );
    assert!(ch.contains(&Change::Deleted("etc/doomed".into())), "{ch:?}");
}

#[test]
fn cwd_is_created_and_env_is_visible() {
    let Some(f) = Fixture::new() else { return };
    let mut spec = f.spec("cwd", "pwd; echo \"$GREETING\"; touch here");
    spec.cwd = "/work/dir/../deep".into();
    spec.env.push("GREETING=hello world".into());
    let (r, out) = f.run(&spec);
    assert!(r.success(), "{r:?} {out}");
    assert_eq!(out, "/work/deep\nhello world\n");
    assert!(f.upper.join("work/deep/here").is_file());
    let m = std::fs::metadata(f.upper.join("work/deep")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (0, 0o755));
}

#[test]
fn users_resolve_and_the_process_runs_as_them() {
    let Some(f) = Fixture::new() else { return };
    let layers = [busybox().to_path_buf()];
    let app = resolve_user(&layers, "app").unwrap();
    assert_eq!(
        app,
        UserSpec {
            uid: 1000,
            gid: 1001,
            additional_gids: vec![2000]
        }
    );
    assert_eq!(resolve_user(&layers, "1000").unwrap(), app);
    assert_eq!(resolve_user(&layers, "app:extra").unwrap().gid, 2000);
    assert_eq!(resolve_user(&layers, "1234:5678").unwrap().uid, 1234);
    assert!(resolve_user(&layers, "nosuchuser").is_err());

    for (user, want) in [
        (app, "1000\n1001\n1001 2000\n"),
        (
            resolve_user(&layers, "1234:5678").unwrap(),
            "1234\n5678\n5678\n",
        ),
        (resolve_user(&layers, "").unwrap(), "0\n0\n0\n"),
    ] {
        let mut spec = f.spec("user", "id -u; id -g; id -G");
        spec.user = user;
        let (r, out) = f.run(&spec);
        assert!(r.success(), "{r:?} {out}");
        assert_eq!(out, want);
    }
}

fn interfaces(proc_net_dev: &str) -> Vec<String> {
    let mut v: Vec<String> = proc_net_dev
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn network_none_has_only_loopback_and_host_sees_the_host() {
    let Some(f) = Fixture::new() else { return };
    let mut spec = f.spec("netnone", "cat /proc/net/dev; echo ---; cat /etc/hosts");
    spec.network = NetworkMode::None;
    let (r, out) = f.run(&spec);
    assert!(r.success(), "{r:?} {out}");
    let (dev, hosts) = out.split_once("---\n").unwrap();
    assert_eq!(interfaces(dev), ["lo"]);
    assert!(hosts.contains("127.0.0.1\tlocalhost"), "{hosts}");

    let (r, out) = f.run(&f.spec("nethost", "cat /proc/net/dev"));
    assert!(r.success(), "{r:?} {out}");
    let host = std::fs::read_to_string("/proc/net/dev").unwrap();
    assert_eq!(interfaces(&out), interfaces(&host));
    assert!(
        interfaces(&host).len() > 1,
        "host has only lo; the check is weak here"
    );
}

#[test]
fn bind_and_tmpfs_mounts_are_visible() {
    let Some(f) = Fixture::new() else { return };
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("file"), "from host\n").unwrap();
    let rw = tempfile::tempdir().unwrap();
    let mut spec = f.spec(
        "mounts",
        "cat /data/file; touch /data/x 2>/dev/null && echo ro-writable; \
         echo out > /out/result; grep ' /scratch ' /proc/mounts | cut -d' ' -f3",
    );
    spec.mounts = vec![
        MountSpec::Bind {
            source: ro.path().to_path_buf(),
            target: "/data".into(),
            readonly: true,
        },
        MountSpec::Bind {
            source: rw.path().to_path_buf(),
            target: "/out".into(),
            readonly: false,
        },
        MountSpec::Tmpfs {
            target: "/scratch".into(),
            size: Some(1 << 20),
        },
    ];
    let (r, out) = f.run(&spec);
    assert!(r.success(), "{r:?} {out}");
    assert_eq!(out, "from host\ntmpfs\n");
    assert_eq!(
        std::fs::read_to_string(rw.path().join("result")).unwrap(),
        "out\n"
    );
    assert!(!ro.path().join("x").exists());
    // Their mount points were made by runc and are gone from the layer again.
    for p in ["data", "out", "scratch"] {
        assert!(!f.upper.join(p).exists(), "{p} left in upper");
    }
}

#[test]
fn readonly_rootfs_refuses_writes() {
    let Some(f) = Fixture::new() else { return };
    let mut spec = f.spec("ro", "touch /x");
    spec.readonly_rootfs = true;
    let (r, out) = f.run(&spec);
    assert_ne!(r.exit_code, 0, "{out}");
    assert!(out.contains("Read-only"), "{out}");
}

#[test]
fn a_killed_process_reports_its_signal() {
    let Some(f) = Fixture::new() else { return };
    let spec = f.spec("signal", "echo ready; exec sleep 100");
    let mut killed = false;
    let r = run(&f.cfg, &spec, &mut |chunk| {
        if !killed && chunk.starts_with(b"ready") {
            killed = true;
            strata_runtime::kill(&f.cfg, &spec.id, 9).unwrap();
        }
    })
    .unwrap();
    assert!(killed);
    assert_eq!((r.exit_code, r.signal), (137, Some(9)));
    assert_no_leftovers(&f.cfg);
}

#[test]
fn parallel_runs_with_different_ids() {
    let Some(f) = Fixture::new() else { return };
    let second = Fixture::new().unwrap();
    // Both in one state root, as concurrent builds would be.
    let cfg = f.cfg.clone();
    std::thread::scope(|s| {
        let handles: Vec<_> = [(&f, "par-a"), (&second, "par-b")]
            .into_iter()
            .map(|(fx, name)| {
                let cfg = cfg.clone();
                s.spawn(move || {
                    let spec = fx.spec(name, &format!("sleep 0.3; echo {name} > /who; cat /who"));
                    let mut out = Vec::new();
                    let r = run(&cfg, &spec, &mut |c| out.extend_from_slice(c)).unwrap();
                    (r, String::from_utf8(out).unwrap())
                })
            })
            .collect();
        for (h, name) in handles.into_iter().zip(["par-a", "par-b"]) {
            let (r, out) = h.join().unwrap();
            assert!(r.success());
            assert_eq!(out, format!("{name}\n"));
        }
    });
    assert_eq!(
        std::fs::read_to_string(f.upper.join("who")).unwrap(),
        "par-a\n"
    );
    assert_eq!(
        std::fs::read_to_string(second.upper.join("who")).unwrap(),
        "par-b\n"
    );
    assert_no_leftovers(&cfg);
}

#[test]
fn runc_failures_are_errors_and_still_clean_up() {
    let Some(f) = Fixture::new() else { return };
    let mut spec = f.spec("nocmd", "");
    spec.args = vec!["/no/such/binary".into()];
    let err = run(&f.cfg, &spec, &mut |_| {}).unwrap_err();
    match &err {
        strata_runtime::Error::Runc { id, stderr, .. } => {
            assert_eq!(id, &spec.id);
            assert!(stderr.contains("/no/such/binary"), "{stderr}");
        }
        other => panic!("wanted Error::Runc, got {other:?}"),
    }
    assert_no_leftovers(&f.cfg);
    // A second run with the same id works: nothing of the first is left in runc's state.
    let (r, _) = f.run(&f.spec("nocmd", "true"));
    assert!(r.success());
}

#[test]
fn a_panicking_callback_still_cleans_up() {
    let Some(f) = Fixture::new() else { return };
    let spec = f.spec("panic", "echo first; sleep 100");
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&f.cfg, &spec, &mut |_| panic!("callback failed"))
    }));
    assert!(res.is_err());
    assert_no_leftovers(&f.cfg);
    let list = Command::new(&f.cfg.runc)
        .arg("--root")
        .arg(&f.cfg.state_root)
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "");
}

#[test]
fn a_plain_directory_rootfs_is_used_as_is() {
    let Some(f) = Fixture::new() else { return };
    let dir = f.upper.parent().unwrap().join("plain");
    assert!(
        Command::new("cp")
            .arg("-a")
            .arg(busybox())
            .arg(&dir)
            .status()
            .unwrap()
            .success()
    );
    let mut spec = f.spec("plain", "echo x > /made");
    spec.rootfs = Rootfs::Dir(dir.clone());
    let (r, out) = f.run(&spec);
    assert!(r.success(), "{out}");
    assert_eq!(std::fs::read_to_string(dir.join("made")).unwrap(), "x\n");
    for stub in ["proc", "dev", "sys", "etc/hosts"] {
        assert!(!dir.join(stub).exists(), "mount point {stub} left behind");
    }
}

#[test]
fn cleanup_stale_removes_dead_bundles_and_keeps_live_ones() {
    let Some(f) = Fixture::new() else { return };
    // A bundle left by a killed process: its rootfs still mounted.
    let stale = f.cfg.state_root.join("bundles/stale-1");
    std::fs::create_dir_all(stale.join("rootfs")).unwrap();
    std::fs::write(stale.join("owner"), "999999999 1").unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(stale.join("rootfs"))
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(stale.join("rootfs/data"), "x").unwrap();

    let spec = f.spec("live", "echo ready; sleep 1; echo done");
    let (tx, rx) = std::sync::mpsc::channel();
    let cfg = f.cfg.clone();
    let live = std::thread::spawn(move || {
        let mut out = Vec::new();
        let r = run(&cfg, &spec, &mut |c| {
            out.extend_from_slice(c);
            let _ = tx.send(());
        })
        .unwrap();
        (r, String::from_utf8(out).unwrap())
    });
    rx.recv().unwrap();
    let cleaned = cleanup_stale(&f.cfg).unwrap();
    assert_eq!(cleaned, ["stale-1"]);
    assert!(!stale.exists());
    let (r, out) = live.join().unwrap();
    assert!(r.success());
    assert_eq!(out, "ready\ndone\n");
    assert_no_leftovers(&f.cfg);
}
