//! `strata deploy`, `machine`, `agent`, `releases` end to end: real runc machines behind the
//! agent's proxy, real HTTP. Needs root, runc, tini-static and busybox (CI installs them).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Env, have, import_busybox};

fn can_run_machines() -> bool {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n");
    let ok = root
        && have("runc")
        && have("ip")
        && Path::new("/usr/bin/tini-static").exists()
        && Path::new("/bin/busybox").exists();
    if !ok {
        eprintln!(
            "SKIPPED: machine tests need root, runc, ip, tini-static (apt-get install tini) and busybox-static"
        );
    }
    ok
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.0 GET; the body, or why not.
fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    if !out.starts_with("HTTP/1.0 200") && !out.starts_with("HTTP/1.1 200") {
        return Err(out.lines().next().unwrap_or("empty answer").to_string());
    }
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// Destroys whatever the test started and stops its agent, even when the test fails.
struct Cleanup<'a>(&'a Env);

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

/// A project whose app serves `page.html` with busybox httpd on :8080.
fn project(env: &Env, public_port: u16, health: &str) -> std::path::PathBuf {
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
             public_port = {public_port}\nkill_timeout = \"2s\"\n\
             health = {{ path = \"{health}\", interval = \"100ms\", timeout = \"1s\", deadline = \"5s\" }}\n"
        ),
    )
    .unwrap();
    dir
}

#[test]
fn deploy_redeploys_without_dropping_requests_rolls_back_and_a_failed_release_leaves_the_old_one() {
    if !can_run_machines() {
        return;
    }
    let env = Env::new();
    let _cleanup = Cleanup(&env);
    import_busybox(&env, "busybox:latest");
    let port = free_port();
    let proj = project(&env, port, "/");
    let p = proj.to_str().unwrap();

    env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
    assert_eq!(get(port).unwrap(), "v1\n");

    // Redeploy under load: every request before, during and after the switch succeeds.
    std::fs::write(proj.join("site/index.html"), "v2\n").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match get(port) {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
            errors
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let errors = load.join().unwrap();
    assert!(
        errors.is_empty(),
        "requests failed during the deploy: {errors:?}"
    );
    assert!(ok.load(Ordering::SeqCst) > 10);
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert_eq!(get(port).unwrap(), "v2\n");

    // The old machine is gone; releases say what happened; v1's image is pinned.
    let machines = env.ok(&["machine", "list", "--json"]);
    assert_eq!(machines.lines().count(), 1, "{machines}");
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
}

#[test]
fn machines_restart_by_policy_keep_logs_exec_and_survive_an_agent_restart() {
    if !can_run_machines() {
        return;
    }
    let env = Env::new();
    let _cleanup = Cleanup(&env);
    import_busybox(&env, "busybox:latest");
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

    // The agent restarts; the machine keeps running and is adopted; the port comes back.
    env.ok(&["agent", "stop"]);
    assert!(get(port).is_err(), "the proxy belongs to the agent");
    let list = env.ok(&["machine", "list", "--json"]);
    assert!(list.contains("\"state\":\"running\""), "{list}");
    env.ok(&["status"]); // does not start the agent
    env.ok(&["machine", "restart", "srv"]); // starts it again, restarts the machine
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(port).is_err() {
        assert!(
            Instant::now() < deadline,
            "port not served after agent restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

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

    // Destroy frees the machine; the named volume stays.
    env.ok(&["machine", "destroy", "srv", "flaky"]);
    assert_eq!(env.ok(&["machine", "list", "--json"]), "");
    assert_eq!(
        std::fs::read_to_string(env.store().join("strata/volumes/data/f")).unwrap(),
        "x\n"
    );
}
