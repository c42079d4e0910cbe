//! `strata deploy`, `machine`, `agent`, `releases` end to end: real runc machines behind the
//! agent's proxy, real HTTP. Needs root, runc, tini-static and busybox (CI installs them).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Env, free_port, have, import_busybox, interrupt_exits_130_within, wait_for};

fn can_run_machines() -> bool {
    let ok = strata_test_support::is_root()
        && have("runc")
        && have("ip")
        && Path::new("/usr/bin/tini-static").exists()
        && Path::new("/bin/busybox").exists();
    if !ok {
        strata_test_support::skip(
            "machine tests need root, runc, ip, tini-static (apt-get install tini) and busybox-static",
        );
    }
    ok
}

/// A store with `busybox:latest`, when this host can run machines (else the skip is said).
pub(crate) fn machine_env() -> Option<Env> {
    if !can_run_machines() {
        return None;
    }
    let env = Env::new();
    import_busybox(&env, "busybox:latest");
    Some(env)
}

/// One HTTP/1.0 GET; the body, or why not.
fn get(port: u16) -> Result<String, String> {
    crate::common::http_get("127.0.0.1", port, "/")
}

/// Destroys whatever the test started and stops its agent, even when the test fails.
pub(crate) struct Cleanup<'a>(pub &'a Env);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let out = self.0.strata(&["machine", "list", "--json"]);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(id) = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["id"].as_str().map(String::from))
            {
                let _ = self.0.strata(&["machine", "destroy", &id]);
            }
        }
        let _ = self.0.strata(&["agent", "stop"]);
    }
}

/// The id of the one machine of the store.
fn only_machine(env: &Env) -> String {
    let list = env.ok(&["machine", "list", "--json"]);
    let rows: Vec<serde_json::Value> = list
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 1, "{list}");
    rows[0]["id"].as_str().unwrap().to_string()
}

fn machine_json(env: &Env, id: &str) -> serde_json::Value {
    env.ok(&["machine", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["id"] == id)
        .unwrap_or_else(|| panic!("no machine {id}"))
}

/// A project whose app serves `page.html` with busybox httpd on :8080.
pub(crate) fn project(env: &Env, public_port: u16, health: &str) -> std::path::PathBuf {
    let dir = env.path("proj");
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), "v1\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY site/ /www/\nEXPOSE 8080\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("strata.toml"),
        format!(
            "[[image]]\nname = \"web\"\n\n[app.web]\nimage = \"web\"\nport = 8080\n\
             public_port = {public_port}\nkill_timeout = \"2s\"\nvolumes = [\"webdata:/data\"]\n\
             health = {{ path = \"{health}\", interval = \"100ms\", timeout = \"1s\", deadline = \"5s\" }}\n"
        ),
    )
    .unwrap();
    dir
}

#[test]
fn deploy_redeploys_without_dropping_requests_rolls_back_and_a_failed_release_leaves_the_old_one() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let port = free_port();
    let proj = project(&env, port, "/");
    let p = proj.to_str().unwrap();

    env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
    assert_eq!(get(port).unwrap(), "v1\n");

    // Data written in the volume must survive the redeploy; data in the root must not.
    let v1_machine = only_machine(&env);
    env.ok(&[
        "machine",
        "exec",
        &v1_machine,
        "sh",
        "-c",
        "echo kept > /data/v; echo lost > /r",
    ]);

    // Redeploy under load: 20 clients in a loop; every answer is v1 or v2, none fails.
    std::fs::write(proj.join("site/index.html"), "v2\n").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut bad = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match get(port) {
                        Ok(b) if b == "v1\n" || b == "v2\n" => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(b) => bad.push(format!("unexpected body {b:?}")),
                        Err(e) => bad.push(e),
                    }
                }
                bad
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let bad: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        bad.is_empty(),
        "{} requests failed during the deploy: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert!(
        ok.load(Ordering::SeqCst) > 100,
        "{}",
        ok.load(Ordering::SeqCst)
    );
    assert_eq!(get(port).unwrap(), "v2\n");
    let v2_machine = only_machine(&env);
    assert_ne!(v1_machine, v2_machine);
    let seen = env.ok(&[
        "machine",
        "exec",
        &v2_machine,
        "sh",
        "-c",
        "cat /data/v; test -e /r && echo root-kept || echo root-fresh",
    ]);
    assert_eq!(seen, "kept\nroot-fresh\n");

    // The old machine is gone; releases say what happened; v1's image is pinned.
    let machines = env.ok(&["machine", "list", "--json"]);
    assert!(machines.contains("\"release\":2"), "{machines}");
    let releases = env.ok(&["releases", "web", "--json"]);
    let rows: Vec<serde_json::Value> = releases
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows[0]["version"], 2);
    assert_eq!(rows[0]["status"], "active");
    assert_eq!(rows[1]["status"], "superseded");
    let v1_digest = rows[1]["digest"].as_str().unwrap().to_string();
    // Remove every name of v1's image; only the release's pin keeps it through gc.
    for line in env.ok(&["images", "--json"]).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["digest"] == v1_digest.as_str() {
            env.ok(&["rmi", v["name"].as_str().unwrap()]);
        }
    }
    env.ok(&["gc"]);

    // Rollback: deploy v1's image by digest; gc kept it because the release pins it.
    let by_digest = format!("web@{v1_digest}");
    env.ok(&[
        "deploy",
        "web",
        "--project",
        p,
        "--image",
        &by_digest,
        "--progress",
        "plain",
    ]);
    assert_eq!(get(port).unwrap(), "v1\n");

    // A release that never gets healthy fails and leaves the serving one alone.
    let broken = project(&env, port, "/missing.html");
    std::fs::write(broken.join("site/index.html"), "v3\n").unwrap();
    let err = env.fails(&["deploy", "web", "--project", p, "--progress", "plain"]);
    assert!(
        err.contains("release v4 of web failed") && err.contains("unhealthy"),
        "{err}"
    );
    assert!(err.contains("v3 keeps serving"), "{err}");
    assert_eq!(get(port).unwrap(), "v1\n");
    let releases = env.ok(&["releases", "web"]);
    assert!(releases.contains("v4\tfailed"), "{releases}");
    // The failed release's machines are removed by the agent.
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.ok(&["machine", "list", "--json"]).lines().count() != 1 {
        assert!(
            Instant::now() < deadline,
            "failed release's machine not removed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The commands Docker and Fly users reach for: `ps`, `apps list`, `status`.
    let id = only_machine(&env);
    let ps = env.ok(&["ps", "--app", "web"]);
    assert!(ps.starts_with("ID\tSTATE") && ps.contains(&id), "{ps}");
    assert_eq!(
        env.ok(&["ps", "--app", "other"]).lines().count(),
        1,
        "header only"
    );
    let apps = env.ok(&["apps", "list"]);
    assert!(
        apps.lines()
            .any(|l| l.starts_with("web\tv3\tfailed\t1/1\t")
                && l.contains(&format!("127.0.0.1:{port}"))),
        "{apps}"
    );
    let status = env.ok(&["status", "web"]);
    assert!(
        status.contains(&format!("serving on 127.0.0.1:{port}")),
        "{status}"
    );
    env.ok(&["agent", "stop"]);
    let status = env.ok(&["status", "web"]);
    assert!(
        status.contains("agent: not running")
            && status.contains(&format!("not serving 127.0.0.1:{port}")),
        "status must not claim the port is served while the agent is stopped: {status}"
    );

    // Destroying the app frees its machines, route, releases, pins, the names its deploys
    // made and the snapshots only its images had (the volume stays).
    let snapshots = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(env.store().join("strata/snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = snapshots();
    assert!(env.ok(&["images"]).contains("deployment-"));
    let out = env.strata(&["apps", "destroy", "web"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let after = snapshots();
    assert!(after.len() < before.len(), "{said}\n{before:?}\n{after:?}");
    assert!(
        said.contains(&format!(
            "{} snapshot(s) removed",
            before.len() - after.len()
        )),
        "{said}"
    );
    assert!(!env.ok(&["images"]).contains("deployment-"));
    // The base is still named, so its snapshot stays for the next build or machine.
    let base: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "--json", "busybox:latest"])).unwrap();
    let base_chain = base["config"]["rootfs"]["diff_ids"][0].as_str().unwrap();
    assert!(after.contains(&base_chain.trim_start_matches("sha256:").to_string()));
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");
    assert_eq!(env.ok(&["releases", "--json"]), "");
    assert!(get(port).is_err(), "the port is still served");
    let gc = env.ok(&["gc"]);
    assert!(
        gc.contains(&format!("deleted {v1_digest}")),
        "v1 is unpinned and unnamed now, so gc collects it: {gc}"
    );
    assert!(env.store().join("strata/volumes/webdata/v").exists());
}

/// The agent's pid, from `agent status`.
fn agent_pid(env: &Env) -> String {
    let status = env.ok(&["agent", "status"]);
    status.chars().filter(|c| c.is_ascii_digit()).collect()
}

/// An agent another strata binary started (the one installed before an upgrade) is replaced
/// by the next command's binary, so what the new binary does for machines takes effect; its
/// machines keep running, adopted. The same binary keeps the agent it has.
#[test]
fn an_agent_of_another_binary_is_replaced_and_its_machines_keep_running() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let old = env.path("old-strata");
    std::fs::copy(env!("CARGO_BIN_EXE_strata"), &old).unwrap();
    let started = std::process::Command::new(&old)
        .arg("--store")
        .arg(env.store())
        .args([
            "machine", "run", "busybox", "--name", "keep", "--", "sleep", "1000",
        ])
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    let exe_of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let first = agent_pid(&env);
    assert_eq!(exe_of(&first), old);
    let machine = machine_json(&env, "keep")["pid"].as_u64().unwrap();

    env.ok(&["machine", "start", "keep"]);
    let second = agent_pid(&env);
    assert_ne!(second, first, "the old binary's agent was kept");
    assert_eq!(
        exe_of(&second),
        std::fs::canonicalize(env!("CARGO_BIN_EXE_strata")).unwrap()
    );
    // Exited (a zombie until whoever adopted it reaps it).
    let state = std::fs::read_to_string(format!("/proc/{first}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z "),
        "the old agent still runs: {state}"
    );
    let m = machine_json(&env, "keep");
    assert_eq!(
        m["pid"].as_u64().unwrap(),
        machine,
        "adopted, not restarted: {m}"
    );
    assert_eq!(m["state"], "running", "{m}");

    env.ok(&["machine", "start", "keep"]);
    assert_eq!(
        agent_pid(&env),
        second,
        "the same binary restarted its own agent"
    );
}

#[test]
fn machines_restart_by_policy_keep_logs_exec_and_survive_an_agent_restart() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let port = free_port();

    // A server published on a host port, with a volume.
    let id = env
        .ok(&[
            "machine",
            "run",
            "busybox",
            "--name",
            "srv",
            "-p",
            &format!("{port}:8080"),
            "-v",
            "data:/data",
            "--restart",
            "always",
            "--",
            "sh",
            "-c",
            "echo started; mkdir /w; echo hi > /w/index.html; exec httpd -f -p 8080 -h /w",
        ])
        .trim()
        .to_string();
    assert_eq!(id, "srv");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match get(port) {
            Ok(b) => break b,
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(body, "hi\n");
    assert!(env.ok(&["machine", "logs", "srv"]).contains("started"));

    // exec: runs inside, returns the code, sees the volume.
    let out = env.strata(&[
        "machine",
        "exec",
        "srv",
        "sh",
        "-c",
        "echo x > /data/f; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));

    // Killing the app's process: the agent starts the machine again (restart = always).
    let pid = machine_json(&env, "srv")["pid"].as_u64().unwrap();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let app_pid = children
        .split_whitespace()
        .next()
        .expect("the init has a child")
        .to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &app_pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for("restart after kill", Duration::from_secs(20), || {
        let m = machine_json(&env, "srv");
        m["restarts"] == 1 && m["state"] == "running" && get(port).is_ok()
    });
    let pid = machine_json(&env, "srv")["pid"].as_u64().unwrap();

    // Killing the agent (SIGKILL): the machine keeps running; a new agent adopts it (same
    // pid, not restarted) and serves its port again.
    let status = env.ok(&["agent", "status"]);
    let agent_pid: String = status.chars().filter(|c| c.is_ascii_digit()).collect();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &agent_pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for("agent gone", Duration::from_secs(10), || {
        env.ok(&["agent", "status"]).contains("not running")
    });
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the machine died with the agent"
    );
    env.ok(&["machine", "start", "srv"]); // starts an agent; srv is running already
    wait_for(
        "port served by the new agent",
        Duration::from_secs(10),
        || get(port).is_ok(),
    );
    let m = machine_json(&env, "srv");
    assert_eq!(
        m["pid"].as_u64().unwrap(),
        pid,
        "adopted, not restarted: {m}"
    );
    assert_eq!(m["state"], "running", "{m}");
    // The adopted machine is not the new agent's child: it still sees it exit (from /proc),
    // and restarts it.
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let app_pid = children.split_whitespace().next().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &app_pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for(
        "restart of the adopted machine after kill",
        Duration::from_secs(20),
        || {
            let m = machine_json(&env, "srv");
            // (`machine start` above reset the count.)
            m["restarts"] == 1
                && m["state"] == "running"
                && m["pid"].as_u64() != Some(pid)
                && get(port).is_ok()
        },
    );

    // on-failure:2: a failing command is started three times in all, then left exited.
    // (`machine run` may already see it exit; what counts is what the agent does next.)
    env.strata(&[
        "machine",
        "run",
        "busybox",
        "--name",
        "flaky",
        "--restart",
        "on-failure:2",
        "--",
        "sh",
        "-c",
        "echo run; exit 3",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = env.ok(&["machine", "list", "--json"]);
        let flaky: serde_json::Value = list
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["id"] == "flaky")
            .unwrap();
        if flaky["desired"] == "stopped" {
            assert_eq!(flaky["exit_code"], 3, "{flaky}");
            assert_eq!(flaky["restarts"], 2, "{flaky}");
            break;
        }
        assert!(Instant::now() < deadline, "flaky never gave up: {flaky}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = env.ok(&["machine", "logs", "flaky"]);
    assert_eq!(logs.matches("run").count(), 3, "{logs}");
    // `--tail N` as `docker logs --tail N`: the last N lines, or `all`.
    assert_eq!(
        env.ok(&["machine", "logs", "--tail", "1", "flaky"]),
        "run\n"
    );
    assert_eq!(env.ok(&["logs", "-n", "2", "flaky"]), "run\nrun\n");
    assert_eq!(env.ok(&["logs", "--tail", "0", "flaky"]), "");
    assert_eq!(env.ok(&["logs", "--tail", "all", "flaky"]), logs);
    let e = env.fails(&["logs", "--tail", "some", "flaky"]);
    assert!(e.contains("`some` is not a number of lines"), "{e}");

    // Destroy frees the machine; the named volume stays.
    env.ok(&["machine", "destroy", "srv", "flaky"]);
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");
    assert_eq!(
        std::fs::read_to_string(env.store().join("strata/volumes/data/f")).unwrap(),
        "x\n"
    );
}

/// Slots of this store's spare networks, from the host-wide claims: (slot, made).
fn spare_slots(env: &Env) -> Vec<(u32, bool)> {
    let db = env
        .store()
        .join("strata/meta-v1.db")
        .canonicalize()
        .unwrap();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/run/strata/net") else {
        return out;
    };
    for e in dir.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut lines = text.lines();
        let (Some(owner), Some("@spare")) = (lines.next(), lines.next()) else {
            continue;
        };
        if Path::new(owner).canonicalize().ok().as_deref() != Some(db.as_path()) {
            continue;
        }
        let slot: u32 = e.file_name().to_str().unwrap().parse().unwrap();
        let made = Path::new("/run/strata/net-ready")
            .join(slot.to_string())
            .exists();
        out.push((slot, made));
    }
    out.sort();
    out
}

fn netns_exists(slot: u32) -> bool {
    Path::new(&format!("/run/netns/strata-net{slot}")).exists()
}

/// The network slot of a machine, from its address (10.89.0.0 + 4 * slot + 2).
fn machine_slot(env: &Env, id: &str) -> u32 {
    let addr: std::net::Ipv4Addr = machine_json(env, id)["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (u32::from(addr) - u32::from(std::net::Ipv4Addr::new(10, 89, 0, 0)) - 2) / 4
}

#[test]
fn the_agent_keeps_spare_networks_that_new_machines_take_and_stop_frees_them() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let run = |name: &str| {
        env.ok(&[
            "machine", "run", "busybox", "--name", name, "--", "sleep", "1000",
        ])
    };
    run("first");
    let made = |env: &Env| {
        let s = spare_slots(env);
        s.len() == 2 && s.iter().all(|(_, m)| *m)
    };
    wait_for("two spare networks", Duration::from_secs(10), || made(&env));
    let spares = spare_slots(&env);
    for (slot, _) in &spares {
        assert!(netns_exists(*slot));
    }

    // The next machine takes the lowest spare, as it is.
    run("second");
    let slot = machine_slot(&env, "second");
    assert_eq!(slot, spares[0].0, "spares were {spares:?}");
    assert!(!spare_slots(&env).iter().any(|(s, _)| *s == slot));
    assert!(
        !Path::new("/run/strata/net-ready")
            .join(slot.to_string())
            .exists()
    );
    let out = env.strata(&["machine", "exec", "second", "--", "ip", "-o", "addr"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("sm{slot}c")),
        "{out:?}"
    );
    // The agent makes another to keep two.
    wait_for("spares made again", Duration::from_secs(10), || made(&env));

    // Stopping the agent frees the spares; the machines keep their networks.
    let spares = spare_slots(&env);
    env.ok(&["agent", "stop"]);
    assert_eq!(spare_slots(&env), []);
    for (s, _) in &spares {
        // Tests run in parallel: another store's agent may take a freed slot at once.
        // (Ours it is not: `spare_slots` is empty.)
        if std::fs::read_to_string(format!("/run/strata/net/{s}")).is_ok() {
            continue;
        }
        assert!(!netns_exists(*s), "spare {s} left behind");
        assert!(
            !Path::new("/run/strata/net-ready")
                .join(s.to_string())
                .exists()
        );
    }
    assert!(netns_exists(slot));
    assert!(netns_exists(machine_slot(&env, "first")));
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    // An image without CMD or ENTRYPOINT.
    let tar = env.path("rootfs.tar");
    env.ok(&["import", tar.to_str().unwrap(), "bare:1"]);
    let e = env.fails(&["machine", "run", "bare:1"]);
    assert!(e.contains("no ENTRYPOINT or CMD"), "{e}");
    // A missing image.
    let e = env.fails(&["machine", "run", "nope:1"]);
    assert!(e.contains("nope:1"), "{e}");
    // An app this host never saw: an error, not a quiet no-op.
    let e = env.fails(&["apps", "destroy", "nope"]);
    assert!(e.contains("no app `nope` on this host"), "{e}");
    // A public port another program holds.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let proj = project(&env, port, "/");
    let e = env.fails(&[
        "deploy",
        "--project",
        proj.to_str().unwrap(),
        "--progress",
        "plain",
    ]);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("public_port"),
        "{e}"
    );
    // `machine run -p` on a port another program holds fails too (it reported success).
    let e = env.fails(&[
        "machine",
        "run",
        "busybox",
        "-p",
        &format!("{port}:8080"),
        "--",
        "sleep",
        "100",
    ]);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("another program"),
        "{e}"
    );
    drop(taken);
    // A broken strata.toml.
    std::fs::write(
        proj.join("strata.toml"),
        "[[image]]\nname = \"web\"\n[app.web]\nimage = \"web\"\nport = \"eighty\"\n",
    )
    .unwrap();
    let e = env.fails(&["deploy", "--project", proj.to_str().unwrap()]);
    assert!(
        e.contains("strata.toml:5:") && e.contains("invalid type"),
        "{e}"
    );
    // Nothing was created by any of them.
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");
    assert_eq!(env.ok(&["releases", "--json"]), "");
}

/// `machine stop` of a machine with a published port returns as soon as it stopped: its own
/// route is no traffic to drain (it waited the whole kill timeout, 10 s).
#[test]
fn stopping_a_machine_with_a_published_port_does_not_wait_its_kill_timeout() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let port = free_port();
    let id = env
        .ok(&[
            "machine",
            "run",
            "busybox",
            "-p",
            &format!("{port}:8080"),
            "--",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/etc",
        ])
        .trim()
        .to_string();
    // Any HTTP answer from httpd (a 404 for `/`) proves the route reaches the machine.
    wait_for(
        "the published port",
        Duration::from_secs(10),
        || match get(port) {
            Ok(_) => true,
            Err(line) => line.starts_with("HTTP/"),
        },
    );
    let started = std::time::Instant::now();
    env.ok(&["machine", "stop", &id]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
}

/// An app without a port (a worker, or Fly's base app that only sleeps) deploys: no route,
/// no health check, healthy once running; a redeploy replaces its machine.
#[test]
fn an_app_without_a_port_deploys_and_redeploys() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let dir = env.path("worker");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCMD [\"sh\", \"-c\", \"echo working; exec sleep 1000\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("strata.toml"),
        "[[image]]\nname = \"worker\"\n\n[app.worker]\nimage = \"worker\"\nkill_timeout = \"1s\"\n",
    )
    .unwrap();
    let p = dir.to_str().unwrap();
    let out = env.strata(&["deploy", "--project", p, "--progress", "plain"]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("worker v1 is running (1 machine(s), no port)"),
        "{said}"
    );
    let first = only_machine(&env);
    wait_for("the worker's output", Duration::from_secs(10), || {
        env.ok(&["logs", "worker"]) == format!("{} | working\n", &first[..first.len().min(12)])
    });
    // An app's `--tail N` is per machine.
    assert_eq!(env.ok(&["logs", "--tail", "0", "worker"]), "");
    assert_eq!(
        env.ok(&["logs", "--tail", "1", "worker"]),
        env.ok(&["logs", "worker"])
    );
    // Deploying again with nothing changed keeps the running release and its machine; with
    // `--progress json` every line of stderr is a JSON event (the deploy's were plain text).
    let out = env.strata(&["deploy", "--project", p, "--progress", "json"]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    let events: Vec<serde_json::Value> = said
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        events.iter().any(|e| e["event"] == "deploy"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("worker v1 is unchanged"))),
        "{said}"
    );
    assert_eq!(only_machine(&env), first);
    assert_eq!(env.ok(&["releases", "worker", "--json"]).lines().count(), 1);
    std::fs::write(
        dir.join("strata.toml"),
        "[[image]]\nname = \"worker\"\n\n[app.worker]\nimage = \"worker\"\nkill_timeout = \"1s\"\nenv = { V = \"2\" }\n\
         memory = \"64m\"\ncpus = 0.5\n",
    )
    .unwrap();
    env.ok(&["deploy", "--project", p, "--progress", "plain"]);
    // The app's `memory` and `cpus` are its machines' cgroup limits.
    if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        let id = env
            .ok(&["ps", "-q", "--app", "worker"])
            .lines()
            .find(|id| *id != first)
            .unwrap()
            .to_string();
        let limits = env.ok(&[
            "exec",
            &id,
            "cat",
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
        ]);
        assert_eq!(limits, "67108864\n50000\n");
    }
    let releases = env.ok(&["releases", "worker"]);
    assert!(
        releases.contains("v2\tactive") && releases.contains("v1\tsuperseded"),
        "{releases}"
    );
    wait_for("the old machine's removal", Duration::from_secs(30), || {
        let list = env.ok(&["machine", "list", "--json"]);
        list.lines().count() == 1 && !list.contains(&first)
    });
    assert!(
        env.ok(&["apps", "list"])
            .contains("worker\tv2\tactive\t1/1\t-\t")
    );
    // The human output of releases and status, as snapshots (times, ids, addresses and
    // release names filtered out): a change to it is deliberate.
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", "[time]");
    settings.add_filter(r"deployment-[0-9A-Z]{26}", "deployment-[ulid]");
    settings.add_filter(r"sha256:[0-9a-f]{64}", "sha256:[digest]");
    settings.add_filter(r"\b10\.89\.\d+\.\d+\b", "[address]");
    settings.add_filter(r"pid \d+", "pid [pid]");
    settings.add_filter(r"strata-[0-9a-f]{16}", "strata-[key]");
    settings.add_filter(r"(?m)^(\s*)[0-9a-z]{12}\t", "$1[id]\t");
    settings.bind(|| {
        insta::assert_snapshot!("releases", env.ok(&["releases", "worker"]));
        insta::assert_snapshot!("status", env.ok(&["status", "worker"]));
    });
}

/// `strata run` is `docker run --rm`: attached output, the command's exit code, the machine
/// removed; an image only in a registry is pulled first.
#[test]
fn run_is_attached_exits_with_the_code_and_leaves_nothing() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let out = env.strata(&["run", "busybox", "--", "sh", "-c", "echo hi; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    // stdout and stderr stay apart, as under `docker run`.
    let apart = env.strata(&[
        "run",
        "busybox",
        "sh",
        "-c",
        "echo out; echo err >&2; echo more",
    ]);
    assert!(apart.status.success(), "{apart:?}");
    assert_eq!(String::from_utf8_lossy(&apart.stdout), "out\nmore\n");
    assert!(
        String::from_utf8_lossy(&apart.stderr).ends_with("err\n"),
        "{apart:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");

    // An image only a registry has: pulled, then run.
    let registry = crate::common::Registry::start(&env);
    let remote = format!("127.0.0.1:{}/team/bb:1", registry.port);
    env.ok(&["push", "busybox", &remote]);
    let other = Env::new();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(other.store())
        .args(["run", &remote, "--", "echo", "pulled"])
        .output()
        .unwrap();
    let _other_cleanup = Cleanup(&other);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pulled\n");
}

/// The `docker run` flags: `--rm` taken, `-w`/`-u` replace the image's WORKDIR and USER
/// (names from the image's passwd), and what strata does not take is refused with what to use.
#[test]
fn run_takes_docker_run_flags_and_explains_the_rest() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let out = env.ok(&[
        "run",
        "--rm",
        "-w",
        "/srv/app",
        "-u",
        "root:0",
        "-e",
        "X=1",
        "busybox",
        "sh",
        "-c",
        "pwd; id -u; id -g; echo $X",
    ]);
    assert_eq!(out, "/srv/app\n0\n0\n1\n");
    let out = env.ok(&[
        "run",
        "-u",
        "4242:77",
        "busybox",
        "sh",
        "-c",
        "id -u; id -g; pwd",
    ]);
    assert_eq!(out, "4242\n77\n/\n");

    // `--env-file` then `-e`, as Docker reads them: a bare name passes this shell's value, or
    // nothing when it is unset; a later entry wins.
    let file = env.path("app.env");
    std::fs::write(
        &file,
        "# comment\n\n  FROM_FILE=1\nBOTH=file\nPASSED\nUNSET_HERE\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args([
            "run",
            "--env-file",
            file.to_str().unwrap(),
            "-e",
            "BOTH=flag",
        ])
        .args(["-e", "SHELL_VAR", "busybox", "sh", "-c"])
        .arg("echo $FROM_FILE $BOTH $PASSED $SHELL_VAR; env | grep -c UNSET_HERE || true")
        .env("PASSED", "p")
        .env("SHELL_VAR", "s")
        .env_remove("UNSET_HERE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1 flag p s\n0\n");
    let e = env.fails(&["run", "-e", "=x", "busybox", "true"]);
    assert!(e.contains("invalid environment variable `=x`"), "{e}");
    std::fs::write(&file, "OK=1\nBAD NAME=2\n").unwrap();
    let e = env.fails(&[
        "run",
        "--env-file",
        file.to_str().unwrap(),
        "busybox",
        "true",
    ]);
    assert!(e.contains("app.env:2") && e.contains("`BAD NAME=2`"), "{e}");

    let e = env.fails(&["run", "-w", "srv", "busybox", "true"]);
    assert!(
        e.contains("--workdir `srv`") && e.contains("absolute"),
        "{e}"
    );
    let e = env.fails(&["run", "-u", "nosuch", "busybox", "true"]);
    assert!(
        e.contains("user `nosuch`") && e.contains("/etc/passwd"),
        "{e}"
    );
    let e = env.fails(&["run", "-it", "busybox", "sh"]);
    assert!(e.contains("not a TTY"), "{e}");
    // -v with a host path, as `docker run -v`: read-write, read-only, a single file, and a
    // missing directory made.
    let site = env.path("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "from the host\n").unwrap();
    let conf = env.path("app.conf");
    std::fs::write(&conf, "k=v\n").unwrap();
    let made = env.path("made/here");
    let (site_s, conf_s, made_s) = (
        site.to_str().unwrap(),
        conf.to_str().unwrap(),
        made.to_str().unwrap(),
    );
    let out = env.ok(&[
        "run",
        "-v",
        &format!("{site_s}:/www"),
        "-v",
        &format!("{conf_s}:/etc/app.conf:ro"),
        "-v",
        &format!("{made_s}:/made"),
        "busybox",
        "sh",
        "-c",
        "cat /www/index.html /etc/app.conf; echo out > /www/written; \
         (echo no > /etc/app.conf) 2>/dev/null || echo read-only; ls -A /made",
    ]);
    assert_eq!(out, "from the host\nk=v\nread-only\n");
    assert_eq!(
        std::fs::read_to_string(site.join("written")).unwrap(),
        "out\n"
    );
    assert!(made.is_dir());
    let e = env.fails(&["run", "-v", "/data", "busybox", "true"]);
    assert!(e.contains("anonymous volumes"), "{e}");
    // -d: `docker run -d`, the machine kept and its id printed.
    let id = env.ok(&["run", "-d", "--name", "bg", "busybox", "sleep", "1000"]);
    assert_eq!(id, "bg\n");
    assert_eq!(machine_json(&env, "bg")["state"], "running");
    env.ok(&["rm", "-f", "bg"]);
    let e = env.fails(&["run", "-d", "--rm", "busybox", "sleep", "9"]);
    assert!(e.contains("--rm with -d is not taken"), "{e}");
    let e = env.fails(&["run", "-dit", "busybox", "sh"]);
    assert!(e.contains("strata exec -it ID sh"), "{e}");
    let e = env.fails(&["run", "--restart", "always", "busybox", "true"]);
    assert!(e.contains("machine run --restart always"), "{e}");
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");
}

/// `strata run -i` passes piped input to the command (without it, the command reads end of
/// file), `-t` gives it a terminal its output comes through, and `-it` under a terminal is an
/// interactive session that exits with the command's code.
#[test]
fn run_attaches_stdin_and_a_terminal() {
    use std::io::Write;
    use std::process::Stdio;
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let strata = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--store").arg(env.store());
        c
    };
    // Feeds `input` (then closes stdin, or keeps it open with `hold`) to `strata args`.
    let feed = |args: &[&str], input: &[u8], hold: bool| {
        let mut child = strata()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        let held = hold.then_some(stdin);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("strata {args:?} never returned");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(held);
        child.wait_with_output().unwrap()
    };
    let cat = ["busybox", "sh", "-c", "cat; echo end"];
    let out = feed(&[&["run", "-i"][..], &cat].concat(), b"piped in\n", false);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped in\nend\n");
    let out = feed(&[&["run"][..], &cat].concat(), b"not read\n", true);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "end\n");

    // -t: a terminal (its line discipline turns \n into \r\n, as under `docker run -t`),
    // stderr through it too, and the command's exit code.
    let out = feed(
        &[
            "run",
            "-t",
            "busybox",
            "sh",
            "-c",
            "tty; echo out; echo err >&2; exit 3",
        ],
        b"",
        true,
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/dev/pts/0\r\nout\r\nerr\r\n"
    );
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");

    // -it in a terminal (`script` makes one): what is typed reaches the shell.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        strata_test_support::skip("`strata run -it` needs `script` (util-linux) to test");
        return;
    }
    let line = format!(
        "{} --store {} run -it busybox sh -c 'read x; echo got:$x; exit 4'",
        env!("CARGO_BIN_EXE_strata"),
        env.store().display()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut typed = false;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "strata run -it never returned");
        // Typed once the machine runs (before that, the terminal is not raw yet).
        if !typed && env.ok(&["machine", "list", "--json"]).contains("running") {
            std::thread::sleep(Duration::from_millis(300));
            stdin.write_all(b"typed\r").unwrap();
            typed = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("got:typed"), "{text}");
    assert_eq!(out.status.code(), Some(4), "{text}");
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");
}

/// `-m` and `--cpus` limit a machine as `docker run`'s do: its cgroup's limits, and a process
/// past the memory limit is killed (137, as in Docker).
#[test]
fn run_limits_memory_and_cpus() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    if !Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
        strata_test_support::skip("the limits test reads cgroup v1 files, which this host lacks");
        return;
    }
    let out = env.ok(&[
        "run",
        "-m",
        "64m",
        "--cpus",
        "0.5",
        "busybox",
        "cat",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us",
        "/sys/fs/cgroup/cpu/cpu.cfs_period_us",
    ]);
    assert_eq!(out, "67108864\n50000\n100000\n");
    let out = env.strata(&[
        "run",
        "-m",
        "16m",
        "busybox",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=64M",
        "count=1",
    ]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let e = env.fails(&["run", "-m", "4m", "busybox", "true"]);
    assert!(e.contains("6MB"), "{e}");
    let e = env.fails(&["run", "--cpus", "0", "busybox", "true"]);
    assert!(e.contains("at least 0.01"), "{e}");
}

/// The `docker` verbs for containers work on machines: `exec` (stdin attached, `-u`, `-w`,
/// `-e`, `--env-file`), `stop`/`start`/`restart` of several at once, `rm` (a running one only
/// with `-f`) and `ps -q`.
#[test]
fn docker_exec_stop_start_restart_rm_and_ps_q_work_on_machines() {
    use std::io::Write;
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    for name in ["a", "b"] {
        env.ok(&[
            "machine", "run", "busybox", "--name", name, "--", "sleep", "1000",
        ]);
    }
    let file = env.path("exec.env");
    std::fs::write(&file, "FROM_FILE=f\n").unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args(["exec", "-i", "-u", "4242:77", "-w", "/tmp", "-e", "X=1"])
        .args(["--env-file", file.to_str().unwrap(), "a", "sh", "-c"])
        .arg("cat; id -u; id -g; pwd; echo $X $FROM_FILE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"piped in\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "piped in\n4242\n77\n/tmp\n1 f\n"
    );
    // Without -i, stdin is not attached: the command reads end of file at once.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args(["exec", "a", "sh", "-c", "cat; echo done"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let held_open = child.stdin.take();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("exec without -i waited for stdin");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held_open);
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");
    // Names are looked up in the machine's own /etc/passwd and /etc/group.
    assert_eq!(
        env.ok(&["exec", "-u", "root:root", "a", "sh", "-c", "id -u; id -g"]),
        "0\n0\n"
    );
    let e = env.fails(&["exec", "-u", "nosuch", "a", "true"]);
    assert!(e.contains("`nosuch`") && e.contains("machine a"), "{e}");
    let e = env.fails(&["exec", "-w", "tmp", "a", "true"]);
    assert!(e.contains("`tmp` must be an absolute path"), "{e}");
    assert_eq!(
        env.strata(&["exec", "a", "sh", "-c", "exit 5"])
            .status
            .code(),
        Some(5)
    );
    // -t needs a terminal on stdin, as `docker exec -t` says.
    let e = env.fails(&["exec", "-it", "a", "sh"]);
    assert!(e.contains("terminal"), "{e}");

    let mut ids: Vec<String> = env.ok(&["ps", "-q"]).lines().map(String::from).collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(env.ok(&["ps", "-a", "-q"]).lines().count(), 2);

    let e = env.fails(&["rm", "a"]);
    assert!(
        e.contains("machine a is running") && e.contains("strata rm -f a"),
        "{e}"
    );
    assert_eq!(env.ok(&["stop", "a", "b"]), "a\nb\n");
    for id in ["a", "b"] {
        assert_eq!(machine_json(&env, id)["state"], "stopped");
    }
    assert_eq!(env.ok(&["start", "a"]), "a\n");
    assert_eq!(machine_json(&env, "a")["state"], "running");
    let pid = machine_json(&env, "a")["pid"].clone();
    assert_eq!(env.ok(&["restart", "a"]), "a\n");
    let m = machine_json(&env, "a");
    assert!(m["state"] == "running" && m["pid"] != pid, "{m}");
    assert_eq!(env.ok(&["rm", "b"]), "b\n");
    assert_eq!(env.ok(&["rm", "-f", "a"]), "a\n");
    assert_eq!(env.ok(&["ps", "-q"]), "");
    let e = env.fails(&["stop", "nosuch"]);
    assert!(e.contains("nosuch"), "{e}");

    // `kill -s SIG` delivers the signal (through the init, to the command); `kill` alone is
    // SIGKILL, which stops the machine for good, whatever its restart policy.
    env.ok(&[
        "machine",
        "run",
        "busybox",
        "--name",
        "k",
        "--restart",
        "always",
        "--",
        "sh",
        "-c",
        "trap 'echo got-hup' HUP; echo ready; while :; do sleep 0.1; done",
    ]);
    wait_for("the trap", Duration::from_secs(10), || {
        env.ok(&["logs", "k"]).contains("ready")
    });
    assert_eq!(env.ok(&["kill", "-s", "HUP", "k"]), "k\n");
    wait_for("the HUP", Duration::from_secs(10), || {
        env.ok(&["logs", "k"]).contains("got-hup")
    });
    assert_eq!(machine_json(&env, "k")["state"], "running");
    let e = env.fails(&["kill", "-s", "NOPE", "k"]);
    assert!(e.contains("unknown signal `NOPE`"), "{e}");
    assert_eq!(env.ok(&["kill", "k"]), "k\n");
    // Ended (the agent records it exited of the signal, 137, or stopped, when its own stop
    // was under way), and kept so.
    let ended = |m: &serde_json::Value| {
        (m["state"] == "exited" && m["exit_code"] == 137 || m["state"] == "stopped")
            && m["desired"] == "stopped"
            && m["restarts"] == 0
    };
    let m = machine_json(&env, "k");
    assert!(ended(&m), "{m}");
    std::thread::sleep(Duration::from_millis(1500));
    let m = machine_json(&env, "k");
    assert!(ended(&m), "not restarted: {m}");
    let e = env.fails(&["kill", "k"]);
    assert!(e.contains("not running"), "{e}");
}

/// `strata cp` reaches a machine's volumes and its own /etc files, refuses what it cannot do
/// with a reason, and drops set-id bits from what it copies out (the rules themselves are
/// compared with `docker cp` in the interop tests).
#[test]
fn cp_reaches_volumes_and_says_what_it_cannot_do() {
    use std::os::unix::fs::PermissionsExt;
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    env.ok(&[
        "machine",
        "run",
        "busybox",
        "--name",
        "vm",
        "-v",
        "vol:/data",
        "--",
        "sleep",
        "1000",
    ]);
    let local = env.path("local");
    std::fs::create_dir_all(&local).unwrap();
    std::fs::write(local.join("f"), "in the volume\n").unwrap();
    env.ok(&["cp", local.join("f").to_str().unwrap(), "vm:/data/f"]);
    assert_eq!(
        std::fs::read_to_string(env.store().join("strata/volumes/vol/f")).unwrap(),
        "in the volume\n"
    );
    assert_eq!(env.ok(&["exec", "vm", "cat", "/data/f"]), "in the volume\n");
    // The machine's own /etc/hostname, not the empty mount point under it.
    let out = local.join("hostname");
    env.ok(&["cp", "vm:/etc/hostname", out.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "vm\n");
    let e = env.fails(&["cp", local.join("f").to_str().unwrap(), "vm:/etc/hosts"]);
    assert!(
        e.contains("/etc/hosts of machine vm is made by strata"),
        "{e}"
    );
    // A setuid program of the machine does not come out setuid.
    let out = local.join("setuid-me");
    env.ok(&["cp", "vm:/bin/setuid-me", out.to_str().unwrap()]);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    let e = env.fails(&["cp", "vm:/nope", out.to_str().unwrap()]);
    assert!(
        e.contains("no such file or directory in machine vm: `/nope`"),
        "{e}"
    );
    let e = env.fails(&["cp", "a", "b"]);
    assert!(
        e.contains("one side of `strata cp` is a machine's path"),
        "{e}"
    );
    let e = env.fails(&["cp", "vm:/x", "-"]);
    assert!(e.contains("tar streams"), "{e}");
    env.ok(&["stop", "vm"]);
    let e = env.fails(&["cp", "vm:/data/f", out.to_str().unwrap()]);
    assert!(e.contains("machine vm is stopped"), "{e}");
}

/// `docker build` habits: `-q` prints the digest alone, `--iidfile` writes it, `--label` labels
/// the image, `--network none` is what RUN steps get unless they say (`RUN
/// --network=default` follows the flag, `--network=host` does not); the digest names the
/// image for `strata run`. In project mode these flags are refused with a hint.
#[test]
fn build_takes_docker_build_flags() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\n\
         RUN ip link | grep -c ': ' > /unset\n\
         RUN --network=default ip link | grep -c ': ' > /default\n\
         RUN --network=host ip link | grep -c ': ' > /host\n",
    )
    .unwrap();
    let iid = env.path("out/iid");
    std::fs::create_dir_all(iid.parent().unwrap()).unwrap();
    let out = env.ok(&[
        "build",
        "-q",
        "--iidfile",
        iid.to_str().unwrap(),
        "--network",
        "none",
        "--label",
        "team=payments",
        "-t",
        "quiet:1",
        ctx.to_str().unwrap(),
    ]);
    let digest = out.trim();
    assert!(
        digest.starts_with("sha256:") && out.lines().count() == 1,
        "-q prints the digest alone: {out:?}"
    );
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), digest);
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "quiet:1", "--json"])).unwrap();
    assert_eq!(inspect["config"]["config"]["Labels"]["team"], "payments");
    let seen = env.ok(&["run", digest, "cat", "/unset", "/default", "/host"]);
    let counts: Vec<u32> = seen.lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(&counts[..2], &[1, 1], "loopback only: {seen}");
    assert!(
        counts[2] > 1,
        "RUN --network=host has the host's links: {seen}"
    );

    // Without the flags: the host's network, and the progress and names printed as before.
    let out = env.ok(&[
        "build",
        "--progress",
        "plain",
        "-t",
        "loud:1",
        ctx.to_str().unwrap(),
    ]);
    assert!(out.lines().count() > 1, "{out}");
    let seen = env.ok(&["run", "loud:1", "cat", "/unset"]);
    assert!(seen.trim().parse::<u32>().unwrap() > 1, "{seen}");

    std::fs::write(
        env.path("strata.toml"),
        "[[image]]\nname = \"x\"\ncontext = \"ctx\"\n",
    )
    .unwrap();
    let project = env.path("strata.toml");
    let project = project.to_str().unwrap();
    for flags in [&["-q"][..], &["--label", "a=b"], &["--network", "none"]] {
        let mut args = vec!["build", "--project", project];
        args.extend_from_slice(flags);
        let e = env.fails(&args);
        assert!(e.contains("to one Dockerfile"), "{flags:?}: {e}");
    }

    // The Dockerfile from stdin: `-f -` with a context, or `-` for no context at all.
    std::fs::write(ctx.join("f.txt"), "from the context\n").unwrap();
    let with_stdin = |args: &[&str], input: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(env.store())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let ctx_arg = ctx.to_str().unwrap();
    let out = with_stdin(
        &["build", "-q", "-f", "-", "-t", "piped:1", ctx_arg],
        "FROM busybox\nCOPY f.txt /\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        env.ok(&["run", "piped:1", "cat", "/f.txt"]),
        "from the context\n"
    );
    let out = with_stdin(
        &["build", "-q", "-t", "bare:1", "-"],
        "FROM busybox\nRUN echo made > /made\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(env.ok(&["run", "bare:1", "cat", "/made"]), "made\n");
    // No context: nothing to COPY; errors name the Dockerfile `<stdin>`.
    let out = with_stdin(
        &["build", "-t", "bare:2", "-"],
        "FROM busybox\nCOPY f.txt /\n",
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("<stdin>:2") && e.contains("`f.txt` not found"),
        "{e}"
    );
    // A tar on stdin (Docker's other `-`) is refused with what to do.
    let tar = std::process::Command::new("tar")
        .args(["-C", ctx_arg, "-cf", "-", "."])
        .output()
        .unwrap()
        .stdout;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args(["build", "-t", "bare:3", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&tar).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("stdin holds an archive"),
        "{e}"
    );
}

/// `machine logs -f` ends when the machine's process does, like `docker logs -f` (it waited
/// until the machine was destroyed).
#[test]
fn logs_follow_returns_when_the_machine_exits() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let id = env
        .ok(&[
            "machine",
            "run",
            "busybox",
            "--restart",
            "no",
            "--",
            "sh",
            "-c",
            "echo hello; sleep 1; echo bye",
        ])
        .trim()
        .to_string();
    let started = Instant::now();
    let out = std::process::Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_strata"), "--store"])
        .arg(env.store())
        .args(["machine", "logs", "-f", &id])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\nbye\n");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // `strata logs ID`, as `docker logs ID`: a machine's id (or its start) where an app's name
    // goes gives that machine's output; a name neither has still says so.
    assert_eq!(env.ok(&["logs", &id[..6]]), "hello\nbye\n");
    let e = env.fails(&["logs", "nosuchapp"]);
    assert!(e.contains("app `nosuchapp` has no machines"), "{e}");
}

/// A new release whose process keeps exiting fails as soon as it is seen crash-looping, saying
/// so (it waited the whole health deadline and recorded "connection refused").
#[test]
fn a_crash_looping_release_fails_fast_with_its_exit_code() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let proj = project(&env, free_port(), "/");
    std::fs::write(
        proj.join("Dockerfile"),
        "FROM busybox\nCMD [\"sh\", \"-c\", \"echo boom; exit 3\"]\n",
    )
    .unwrap();
    let toml = std::fs::read_to_string(proj.join("strata.toml")).unwrap();
    std::fs::write(
        proj.join("strata.toml"),
        toml.replace("deadline = \"5s\"", "deadline = \"120s\""),
    )
    .unwrap();
    let started = Instant::now();
    let err = env.fails(&[
        "deploy",
        "--project",
        proj.to_str().unwrap(),
        "--progress",
        "plain",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.contains("exited with code 3, restarted") && err.contains("boom"),
        "{err}"
    );
    let releases = env.ok(&["releases", "web"]);
    assert!(releases.contains("v1\tfailed"), "{releases}");
}

/// Ctrl-C while a release waits for health: the release is marked failed and its machines are
/// removed (it stayed `deploying` for ever with its machine running); strata exits 130.
#[test]
fn an_interrupted_deploy_fails_its_release_and_removes_its_machines() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let proj = project(&env, free_port(), "/never-healthy");
    let toml = std::fs::read_to_string(proj.join("strata.toml")).unwrap();
    std::fs::write(
        proj.join("strata.toml"),
        toml.replace("deadline = \"5s\"", "deadline = \"120s\""),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args([
            "deploy",
            "--project",
            proj.to_str().unwrap(),
            "--progress",
            "plain",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the release's machine", Duration::from_secs(60), || {
        env.ok(&["machine", "list", "--json"])
            .contains("\"running\"")
    });
    std::thread::sleep(Duration::from_millis(300));
    interrupt_exits_130_within(&mut child, Duration::from_secs(10));
    let releases = env.ok(&["releases", "web"]);
    assert!(releases.contains("v1\tfailed"), "{releases}");
    wait_for("the machine's removal", Duration::from_secs(30), || {
        env.ok(&["machine", "list", "--json"]).is_empty()
    });
}

#[test]
fn an_agent_started_in_process_is_reaped_when_it_stops() {
    if !can_run_machines() {
        return;
    }
    let env = Env::new();
    env.ok(&["images"]); // makes the store
    let exe = Path::new(env!("CARGO_BIN_EXE_strata"));
    let pid = strata_deploy::agent::ensure_agent(&env.store(), exe).unwrap();
    assert!(strata_deploy::agent::stop_agent(&env.store()).unwrap());
    // This process started it: once it exits, nothing of it may stay (a zombie would).
    wait_for("the agent reaped", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
}

/// The embedded registry's pins held by deploys of `app`, as digests.
fn registry_pins(env: &Env, app: &str) -> Vec<String> {
    let admin = strata_registry_server::Admin::open(env.store().join("registry")).unwrap();
    let mut v: Vec<String> = admin
        .pins()
        .unwrap()
        .into_iter()
        .filter(|p| p.holder == format!("deploy:{app}"))
        .map(|p| p.digest.to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn releases_that_age_out_lose_their_embedded_registry_pin_and_destroy_drops_the_rest() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    // The embedded registry served from the store's own registry/ (where deploys pin).
    let rport = free_port();
    let mut registry = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args(["registry", "serve", "--addr", &format!("127.0.0.1:{rport}")])
        .arg("--root")
        .arg(env.store().join("registry"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("registry up", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", rport)).is_ok()
    });
    let port = free_port();
    let proj = project(&env, port, "/");
    let toml = proj.join("strata.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(&format!(
        "registry = \"127.0.0.1:{rport}/personal\"\nkeep_releases = 1\n"
    ));
    std::fs::write(&toml, text).unwrap();
    let p = proj.to_str().unwrap();
    let digest_of = |v: u32| -> String {
        env.ok(&["releases", "web", "--json"])
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|r| r["version"] == v)
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
        assert_eq!(registry_pins(&env, "web"), [digest_of(1)]);
        std::fs::write(proj.join("site/index.html"), "v2\n").unwrap();
        env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
        assert_eq!(get(port).unwrap(), "v2\n");
        // keep_releases = 1: v1 aged out, in the store and in the registry alike.
        assert_eq!(registry_pins(&env, "web"), [digest_of(2)]);
        env.ok(&["apps", "destroy", "web"]);
        assert_eq!(registry_pins(&env, "web"), Vec::<String>::new());
    }));
    let _ = registry.kill();
    let _ = registry.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
