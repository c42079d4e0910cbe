//! `strata deploy --target swarm` against a real Docker engine in swarm mode: the app's image
//! pushed to strata's registry and run by digest as a service, a start-first rolling update
//! under a client loop with no failed request, a failed update rolled back by the engine, and
//! a rollback to the first release with `--image`.
//!
//! Needs `dockerd` and `docker` (Debian: `apt-get install docker.io`; .ci/run installs it) and
//! root. The engine is the private one of the Docker interop tests (own socket and roots, no
//! bridge, no iptables). Without iptables, and on kernels without IPVS, the routing mesh
//! carries no traffic, so the service is published with `publish = "none"` on an attachable
//! overlay network and the client runs in a container on that network, finding the service's
//! healthy tasks by DNS, as services in a swarm find each other.

use std::path::Path;
use std::time::{Duration, Instant};

use strata_test_support::{Dockerd, bounded, check, describe, is_root, on_path, skip};

use crate::common::*;

fn can_run_swarm() -> bool {
    let ok = on_path("dockerd") && on_path("docker") && is_root();
    if !ok {
        skip("the Docker Swarm test needs dockerd and docker (apt-get install docker.io) and root");
    }
    ok
}

/// `strata --store STORE deploy ARGS…` with a time limit, asserting success; returns stdout.
fn deploy(env: &Env, args: &[&str]) -> String {
    check(
        bounded(300, env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(env.store())
            .arg("deploy")
            .args(args)
            .env("NO_COLOR", "1"),
    )
}

/// Like [`deploy`], asserting failure; returns stderr.
fn deploy_fails(env: &Env, args: &[&str]) -> String {
    let mut cmd = bounded(300, env!("CARGO_BIN_EXE_strata"));
    cmd.arg("--store")
        .arg(env.store())
        .arg("deploy")
        .args(args)
        .env("NO_COLOR", "1");
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{}", describe(&cmd, &out));
    assert_ne!(out.status.code(), Some(124), "{}", describe(&cmd, &out));
    String::from_utf8(out.stderr).unwrap()
}

const NETWORK: &str = "strata-test";

/// A shell line that prints the address of one of `web`'s healthy tasks, from the swarm's DNS
/// (busybox's own resolver: its static `wget` cannot look names up itself). Requests are
/// bounded with `timeout 5 wget`: busybox-static's `wget -T` crashes (SIGSEGV) here.
const RESOLVE: &str = "nslookup web 127.0.0.11 2>/dev/null | sed -n 's/^Address:[[:space:]]*\\([0-9.]*\\)$/\\1/p' | head -n 1";

/// The project: busybox httpd serving `site/` on 8080, target swarm, pushed to `registry`.
fn write_project(dir: &Path, registry: &str, docker_host: &str, page: &str, health: &str) {
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), page).unwrap();
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
             target = \"swarm\"\nregistry = \"{registry}\"\nkill_timeout = \"2s\"\n\
             health = {{ path = \"{health}\", interval = \"1s\", timeout = \"1s\", deadline = \"30s\" }}\n\n\
             [swarm]\ndocker_host = \"{docker_host}\"\nnetwork = \"{NETWORK}\"\npublish = \"none\"\n"
        ),
    )
    .unwrap();
}

/// The service's spec, as the engine keeps it.
fn spec(docker: &Dockerd) -> serde_json::Value {
    let out = docker.ok(
        30,
        &["service", "inspect", "web", "--format", "{{json .Spec}}"],
    );
    serde_json::from_str(&out).unwrap()
}

/// What the service serves now, asked once from a container on its network.
fn served(docker: &Dockerd, image: &str) -> String {
    docker.ok(
        120,
        &[
            "run",
            "--rm",
            "--network",
            NETWORK,
            image,
            "sh",
            "-c",
            &format!(
                "ip=$({RESOLVE}); [ -n \"$ip\" ] || {{ nslookup web 127.0.0.11; exit 1; }}; \
                 timeout 5 wget -q -O- \"http://$ip:8080/\""
            ),
        ],
    )
}

#[test]
fn swarm_deploy_updates_start_first_without_a_failed_request_and_rolls_back() {
    if !can_run_swarm() {
        return;
    }
    let started = Instant::now();
    let env = Env::new();
    import_busybox(&env, "busybox");
    let registry = Registry::start(&env);
    let registry = format!("127.0.0.1:{}/team", registry.port);
    let docker = Dockerd::start("docker");
    docker.swarm_init();
    let proj = env.path("proj");
    let p = proj.to_str().unwrap();
    write_project(&proj, &registry, docker.host(), "v1\n", "/");

    // v1: built, pushed, run as a service by digest from the registry.
    let out = deploy(&env, &["web", "--project", p, "--progress", "plain"]);
    let v1_ref = out.trim().to_string();
    assert!(
        v1_ref.starts_with(&format!("{registry}/web:deployment-")),
        "{out}"
    );
    let s = spec(&docker);
    let v1_image = s["TaskTemplate"]["ContainerSpec"]["Image"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        v1_image.starts_with(&format!("{registry}/web@sha256:")),
        "{s:#}"
    );
    assert_eq!(s["UpdateConfig"]["Order"], "start-first", "{s:#}");
    assert_eq!(s["UpdateConfig"]["FailureAction"], "rollback", "{s:#}");
    assert_eq!(s["RollbackConfig"]["Order"], "start-first", "{s:#}");
    assert_eq!(
        s["TaskTemplate"]["ContainerSpec"]["Healthcheck"]["Test"][0], "CMD-SHELL",
        "{s:#}"
    );
    assert_eq!(served(&docker, &v1_image), "v1\n");

    // A client in a loop on the service's network, for at most 3000 requests, until told to
    // stop: each request goes to a task the swarm's DNS names (healthy ones only).
    let script = format!(
        "i=0; while [ ! -e /tmp/stop ] && [ $i -lt 3000 ]; do i=$((i+1)); \
         ip=$({RESOLVE}); \
         if [ -z \"$ip\" ]; then echo \"FAIL no address\"; sleep 0.1; continue; fi; \
         if body=$(timeout 5 wget -q -O- \"http://$ip:8080/\" 2>&1); then echo \"OK $body\"; \
         else echo \"FAIL $ip $body\"; fi; \
         done; echo DONE"
    );
    docker.ok(
        60,
        &[
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            NETWORK,
            &v1_image,
            "sh",
            "-c",
            &script,
        ],
    );
    let logs = || docker.ok(30, &["logs", "client"]);
    wait_for(
        "the client's first answers",
        Duration::from_secs(60),
        || logs().matches("OK v1").count() >= 5,
    );

    // v2 rolls out while the client runs: the new task starts, passes its health check and
    // joins the DNS before the old one leaves it and stops.
    std::fs::write(proj.join("site/index.html"), "v2\n").unwrap();
    let out = deploy(&env, &["web", "--project", p, "--progress", "plain"]);
    assert!(
        out.trim()
            .starts_with(&format!("{registry}/web:deployment-")),
        "{out}"
    );
    let answered = logs().lines().count();
    wait_for("answers after the update", Duration::from_secs(60), || {
        logs().lines().count() >= answered + 20
    });
    // 90 s: an engine loaded by the whole suite's other tests once took over 30 s to exec.
    docker.ok(90, &["exec", "client", "touch", "/tmp/stop"]);
    docker.ok(60, &["wait", "client"]);
    let log = logs();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"DONE"),
        "the client loop ended early:\n{log}"
    );
    let failed: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FAIL")).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the update: {:?}",
        failed.len(),
        lines.len() - 1,
        &failed[..failed.len().min(5)]
    );
    let ok: Vec<&&str> = lines.iter().filter(|l| l.starts_with("OK")).collect();
    assert!(ok.iter().any(|l| **l == "OK v1") && ok.iter().any(|l| **l == "OK v2"));
    assert!(
        ok[ok.len() - 10..].iter().all(|l| **l == "OK v2"),
        "v1 still answers after the update: {:?}",
        &ok[ok.len() - 10..]
    );
    let v2_image = spec(&docker)["TaskTemplate"]["ContainerSpec"]["Image"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(v2_image, v1_image);
    eprintln!(
        "swarm update: {} requests, none failed ({:?} in)",
        ok.len(),
        started.elapsed()
    );

    // A release that never gets healthy: the engine rolls the update back, strata says so,
    // and v2 keeps serving.
    write_project(&proj, &registry, docker.host(), "v3\n", "/missing.html");
    let err = deploy_fails(&env, &["web", "--project", p, "--progress", "plain"]);
    assert!(err.contains("rolled back"), "{err}");
    assert_eq!(served(&docker, &v1_image), "v2\n");

    // Rollback to v1: its pushed release, deployed again as it is.
    write_project(&proj, &registry, docker.host(), "v3\n", "/");
    deploy(
        &env,
        &[
            "web",
            "--project",
            p,
            "--image",
            &v1_ref,
            "--progress",
            "plain",
        ],
    );
    let s = spec(&docker);
    assert_eq!(
        s["TaskTemplate"]["ContainerSpec"]["Image"],
        v1_image.as_str()
    );
    assert_eq!(served(&docker, &v1_image), "v1\n");

    // A new service whose process exits at once: no spec to roll back to; the deploy fails
    // after three failed tasks with what the engine said, instead of waiting out its deadline.
    std::fs::write(
        proj.join("crash.Dockerfile"),
        "FROM busybox\nCMD [\"sh\", \"-c\", \"exit 3\"]\n",
    )
    .unwrap();
    let mut toml = std::fs::read_to_string(proj.join("strata.toml")).unwrap();
    toml.push_str(&format!(
        "\n[[image]]\nname = \"crash\"\ndockerfile = \"crash.Dockerfile\"\n\n\
         [app.crash]\nimage = \"crash\"\ntarget = \"swarm\"\nregistry = \"{registry}\"\n"
    ));
    std::fs::write(proj.join("strata.toml"), toml).unwrap();
    let failing = Instant::now();
    let err = deploy_fails(&env, &["crash", "--project", p, "--progress", "plain"]);
    assert!(
        err.contains("3 tasks of the new swarm service crash failed")
            && err.contains("non-zero exit (3)"),
        "{err}"
    );
    assert!(
        failing.elapsed() < Duration::from_secs(60),
        "{:?}",
        failing.elapsed()
    );
    eprintln!("swarm test: {:?}", started.elapsed());
}
