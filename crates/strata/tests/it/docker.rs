//! Interop with a real Docker engine: `docker load` takes what `strata save` writes, and
//! `docker pull` / `docker push` work against `strata registry serve`.
//!
//! Needs `dockerd` and `docker` (Debian: `apt-get install docker.io`; .ci/run installs it) and
//! root. Each test starts its own engine on a private socket, data root and exec root (no
//! bridge, no iptables, so nothing on the host changes) and stops it when done, pass or fail;
//! the host's own Docker, if any, is never touched.

use std::fs;
use std::path::Path;
use std::time::Instant;

use strata_test_support::{Dockerd, bounded, check, is_root, on_path, skip};

use crate::common::*;

/// Whether this machine can run the tests; says so loudly when it cannot.
fn can_run_docker() -> bool {
    let ok = on_path("dockerd") && on_path("docker") && is_root();
    if !ok {
        skip(
            "the Docker interop test needs dockerd and docker (apt-get install docker.io) and root",
        );
    }
    ok
}

/// `strata --store STORE ARGS…` with a time limit, asserting success; returns stdout.
fn strata(store: &Path, secs: u64, args: &[&str]) -> String {
    check(
        bounded(secs, env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(store)
            .args(args)
            .env("NO_COLOR", "1"),
    )
}

/// `busybox` of `env`'s store, saved by strata and loaded into `docker`; what `docker load`
/// said.
fn load_busybox(env: &Env, docker: &Dockerd) -> String {
    let tar = env.path("busybox.tar");
    let path = tar.to_str().unwrap();
    strata(
        &env.store(),
        60,
        &["save", "busybox", "--format", "docker", "-o", path],
    );
    docker.ok(120, &["load", "-i", path])
}

/// `docker image inspect IMAGE`, the one image's object.
fn inspect(docker: &Dockerd, image: &str) -> serde_json::Value {
    let out = docker.ok(30, &["image", "inspect", image]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

fn strata_inspect(store: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&strata(store, 30, &["inspect", name, "--json"])).unwrap()
}

fn layer_digests(inspect: &serde_json::Value) -> Vec<String> {
    inspect["manifest"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn docker_loads_a_strata_save_archive_and_runs_it() {
    if !can_run_docker() {
        return;
    }
    let started = Instant::now();
    let env = Env::new();
    import_busybox(&env, "busybox");
    let ours = strata_inspect(&env.store(), "busybox");
    let config_digest = ours["manifest"]["config"]["digest"].as_str().unwrap();
    let docker = Dockerd::start("docker");
    let out = load_busybox(&env, &docker);
    assert!(
        out.contains("Loaded image: busybox:latest"),
        "docker load said: {out}"
    );
    // Docker's image id is the digest of the config it stored: the same bytes strata wrote.
    let v = inspect(&docker, "busybox:latest");
    assert_eq!(v["Id"], config_digest, "{v:#}");
    assert_eq!(v["RootFS"]["Layers"], ours["config"]["rootfs"]["diff_ids"]);
    assert_eq!(v["Config"]["Cmd"], serde_json::json!(["sh"]));
    assert_eq!(v["Architecture"], ours["config"]["architecture"]);

    // The engine unpacked the layer and runs it (host network: the engine has no bridge).
    let docker_run = |flags: &[&str], script: &str| {
        let mut args = vec!["run", "--rm", "--network", "host"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["busybox:latest", "sh", "-c", script]);
        docker.ok(120, &args)
    };
    let docker_sh = |script: &str| docker_run(&[], script);
    let out = docker_sh("echo hi && cat /etc/motd && ls -l /bin/setuid-me");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hi"), "{out}");
    assert_eq!(lines.next(), Some("hello from strata"), "{out}");
    assert!(
        lines.next().unwrap_or("").starts_with("-rwsr-xr-x"),
        "the setuid bit survives: {out}"
    );
    // What the process sees under `strata run`, against `docker run` of the same image: the
    // names in its environment (HOSTNAME among them), whether setuid can raise privileges,
    // its ids and groups, directory and umask, and what the seccomp filter refuses (a user
    // namespace, a mount namespace). (Not the values: the hostnames differ.)
    let probe = "env | cut -d= -f1 | sort | tr '\\n' ' '; echo; \
                 grep NoNewPrivs /proc/self/status; id -u; id -g; id; pwd; umask; \
                 unshare -U -r true 2>&1; echo $?; unshare -m true 2>&1; echo $?; \
                 grep Seccomp: /proc/self/status";
    let theirs = docker_sh(probe);
    let ours = strata(&env.store(), 120, &["run", "busybox", "sh", "-c", probe]);
    assert_eq!(
        ours, theirs,
        "strata run and docker run see different things"
    );
    // The `docker run` flags Docker users type, taken by `strata run` the same way: `--rm`,
    // a working directory the image lacks (made, owned by root), ids the image does not name.
    let flags = ["-w", "/made/here", "-u", "1000:1000"];
    let probe =
        "id; pwd; ls -ld /made/here | cut -c1-10; ls -ln /made | tr -s ' ' | cut -d' ' -f3,4";
    let theirs = docker_run(&flags, probe);
    let mut args = vec!["run", "--rm"];
    args.extend_from_slice(&flags);
    args.extend_from_slice(&["busybox", "sh", "-c", probe]);
    let ours = strata(&env.store(), 120, &args);
    assert_eq!(
        ours, theirs,
        "strata run and docker run take -w and -u differently"
    );
    // -v with host paths: a directory read-write, a file read-only.
    let shared = env.path("shared");
    fs::create_dir_all(&shared).unwrap();
    fs::write(shared.join("f"), "host file\n").unwrap();
    let file = env.path("one.conf");
    fs::write(&file, "k=v\n").unwrap();
    let (dir_v, file_v) = (
        format!("{}:/mnt", shared.display()),
        format!("{}:/etc/one.conf:ro", file.display()),
    );
    let flags = ["-v", dir_v.as_str(), "-v", file_v.as_str()];
    let probe = "cat /mnt/f /etc/one.conf; (echo x > /etc/one.conf) 2>/dev/null; echo $?; \
                 grep -E ' /mnt | /etc/one.conf ' /proc/self/mounts | cut -d' ' -f2,4 \
                 | cut -d, -f1";
    let theirs = docker_run(&flags, probe);
    let mut args = vec!["run"];
    args.extend_from_slice(&flags);
    args.extend_from_slice(&["busybox", "sh", "-c", probe]);
    let ours = strata(&env.store(), 120, &args);
    assert_eq!(
        ours, theirs,
        "strata run and docker run mount -v differently"
    );
    // -m and --cpus: the same cgroup limits (memory, memory+swap, the CFS quota).
    let flags = ["-m", "64m", "--cpus", "0.5"];
    let probe = "cd /sys/fs/cgroup && cat memory/memory.limit_in_bytes \
                 memory/memory.memsw.limit_in_bytes cpu/cpu.cfs_quota_us cpu/cpu.cfs_period_us";
    if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
        let theirs = docker_run(&flags, probe);
        let mut args = vec!["run"];
        args.extend_from_slice(&flags);
        args.extend_from_slice(&["busybox", "sh", "-c", probe]);
        let ours = strata(&env.store(), 120, &args);
        assert_eq!(ours, theirs, "strata run and docker run limit differently");
    }
    // -i and -t attach as Docker's do: piped input reaches the command with -i (without it,
    // the command reads end of file); -t gives it a terminal that stderr shares, its lines
    // ending in \r\n.
    let input = env.path("input.txt");
    fs::write(&input, "piped in\n").unwrap();
    for (flags, probe) in [
        (&[][..], "cat; echo end"),
        (&["-i"][..], "cat; echo end"),
        (&["-t"][..], "tty; echo out; echo err >&2"),
    ] {
        let stdin = || fs::File::open(&input).unwrap();
        let theirs = check(
            docker
                .cmd(120)
                .args(["run", "--rm", "--network", "host"])
                .args(flags)
                .args(["busybox:latest", "sh", "-c", probe])
                .stdin(stdin()),
        );
        let ours = check(
            bounded(120, env!("CARGO_BIN_EXE_strata"))
                .arg("--store")
                .arg(env.store())
                .arg("run")
                .args(flags)
                .args(["busybox", "sh", "-c", probe])
                .stdin(stdin()),
        );
        assert_eq!(
            ours, theirs,
            "strata run and docker run attach {flags:?} differently"
        );
    }
    eprintln!("docker load + run test: {:?}", started.elapsed());
}

#[test]
fn docker_pulls_from_and_pushes_to_the_strata_registry() {
    if !can_run_docker() {
        return;
    }
    let started = Instant::now();
    let env = Env::new();
    import_busybox(&env, "busybox");
    let ours = strata_inspect(&env.store(), "busybox");
    let config_digest = ours["manifest"]["config"]["digest"].as_str().unwrap();
    let registry = Registry::start(&env);
    let host = format!("127.0.0.1:{}", registry.port);

    // strata pushes; the printed reference is pinned to the manifest digest.
    let src = format!("{host}/team/busybox:1");
    let out = strata(
        &env.store(),
        120,
        &["push", "busybox", &src, "--progress", "plain"],
    );
    let pushed = out.trim().rsplit_once('@').unwrap().1.to_string();
    assert_eq!(pushed, ours["descriptor"]["digest"].as_str().unwrap());

    // docker pulls it (loopback registries are plain HTTP to Docker by default): the same
    // manifest digest, the same config.
    let docker = Dockerd::start("docker");
    docker.ok(180, &["pull", &src]);
    let v = inspect(&docker, &src);
    assert_eq!(
        v["RepoDigests"],
        serde_json::json!([format!("{host}/team/busybox@{pushed}")]),
        "{v:#}"
    );
    assert_eq!(v["Id"], config_digest);
    assert_eq!(v["RootFS"]["Layers"], ours["config"]["rootfs"]["diff_ids"]);

    // docker pushes it under another name (its own Docker schema 2 manifest, blobs mounted
    // or uploaded), and strata pulls that into a fresh store: the same config and layers.
    let dest = format!("{host}/team/other:2");
    docker.ok(30, &["tag", &src, &dest]);
    let out = docker.ok(180, &["push", &dest]);
    assert!(out.contains("digest: sha256:"), "docker push said: {out}");
    // Docker remembers where it pulled the layer from and asks strata to mount it.
    assert!(
        out.contains("Mounted from team/busybox"),
        "docker push said: {out}"
    );

    let fresh = Env::new();
    let out = strata(&fresh.store(), 120, &["pull", &dest, "--progress", "plain"]);
    let mut lines = out.lines();
    let (name, pulled_digest) = (lines.next().unwrap(), lines.next().unwrap());
    assert!(pulled_digest.starts_with("sha256:"), "{out}");
    let theirs = strata_inspect(&fresh.store(), name);
    assert_eq!(theirs["descriptor"]["digest"], pulled_digest);
    assert_eq!(layer_digests(&theirs), layer_digests(&ours));
    assert_eq!(theirs["manifest"]["config"]["digest"], config_digest);
    strata(&fresh.store(), 60, &["validate", name]);
    // The digest docker reported for its push is what strata pulled.
    let v = inspect(&docker, &dest);
    let repo_digests = v["RepoDigests"].to_string();
    assert!(
        repo_digests.contains(&format!("{host}/team/other@{pulled_digest}")),
        "docker's RepoDigests {repo_digests} lack {pulled_digest}"
    );

    // A layer only Docker has (made in a container, committed) is uploaded by docker push,
    // and strata pulls and unpacks it.
    docker.ok(
        120,
        &[
            "run",
            "--name",
            "maker",
            "--network",
            "host",
            &src,
            "sh",
            "-c",
            "echo made by docker > /etc/made",
        ],
    );
    let made = format!("{host}/team/other:3");
    docker.ok(60, &["commit", "maker", &made]);
    let out = docker.ok(180, &["push", &made]);
    assert!(
        out.contains("Pushed"),
        "docker push uploaded nothing: {out}"
    );
    let out = strata(&fresh.store(), 120, &["pull", &made, "--progress", "plain"]);
    let name = out.lines().next().unwrap();
    let theirs = strata_inspect(&fresh.store(), name);
    let layers = layer_digests(&theirs);
    assert_eq!(layers.len(), 2, "{theirs:#}");
    assert_eq!(layers[0], layer_digests(&ours)[0]);
    let unpacked = fresh.path("made");
    strata(
        &fresh.store(),
        60,
        &["unpack", name, unpacked.to_str().unwrap()],
    );
    assert_eq!(
        fs::read_to_string(unpacked.join("etc/made")).unwrap(),
        "made by docker\n"
    );
    assert_eq!(
        fs::read_to_string(unpacked.join("etc/motd")).unwrap(),
        "hello from strata\n"
    );
    eprintln!("docker pull + push test: {:?}", started.elapsed());
}

/// `strata cp` follows `docker cp`'s rules: the same copies, into and out of a running
/// container and a running machine of the same image, give the same trees on both sides
/// (types, modes, owners, link targets, contents) and fail in the same cases.
#[test]
fn strata_cp_and_docker_cp_copy_alike() {
    if !can_run_docker() {
        return;
    }
    let Some(env) = crate::deploy::machine_env() else {
        return;
    };
    let _cleanup = crate::deploy::Cleanup(&env);
    let docker = Dockerd::start("docker");
    load_busybox(&env, &docker);
    docker.ok(
        60,
        &[
            "run",
            "-d",
            "--name",
            "box",
            "--network",
            "host",
            "busybox:latest",
            "sleep",
            "1000",
        ],
    );
    strata(
        &env.store(),
        60,
        &[
            "machine", "run", "busybox", "--name", "box", "--", "sleep", "1000",
        ],
    );

    // A local tree: a file, a link to it, a directory of another mode with a file of
    // another owner.
    let src = env.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    fs::write(src.join("a.txt"), "one\n").unwrap();
    fs::write(src.join("sub/b.txt"), "two\n").unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(src.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
    std::os::unix::fs::chown(src.join("sub/b.txt"), Some(1234), Some(99)).unwrap();
    let s = |p: &str| src.join(p).to_str().unwrap().to_string();

    // Each copy, then what each side holds; `OUT` is a local directory of each tool's own.
    let copies: Vec<Vec<String>> = [
        vec![s(""), "box:/app".into()],
        vec![s(""), "box:/app".into()],
        vec![format!("{}/.", s("")), "box:/app".into()],
        vec![s("a.txt"), "box:/app/renamed.txt".into()],
        vec!["-a".into(), s("sub"), "box:/kept".into()],
        vec![s("a.txt"), "box:/missing/".into()],
        vec![s(""), "box:/app/renamed.txt".into()],
        vec!["box:/app".into(), "OUT/new".into()],
        vec!["box:/app".into(), "OUT".into()],
        vec!["box:/app/.".into(), "OUT/contents".into()],
        vec!["box:/app/link".into(), "OUT/l".into()],
        vec!["-L".into(), "box:/app/link".into(), "OUT/followed".into()],
        vec!["box:/app/renamed.txt".into(), "OUT/".into()],
        vec!["box:/nope".into(), "OUT/x".into()],
        vec!["box:/app".into(), "OUT/new/a.txt".into()],
        vec!["-a".into(), "box:/app".into(), "OUT/archived".into()],
    ]
    .into_iter()
    .collect();
    let listing = "cd / && find app kept -exec stat -c '%n %F %a %u:%g %s' {} + 2>&1 | sort; \
                   find app kept -type l -exec readlink {} + | sort; \
                   find app kept -type f -exec md5sum {} + | sort";
    let mut seen = Vec::new();
    for tool in ["docker", "strata"] {
        let out = env.path(&format!("out-{tool}"));
        fs::create_dir_all(&out).unwrap();
        let mut results = Vec::new();
        for copy in &copies {
            let args: Vec<String> = copy
                .iter()
                .map(|a| a.replace("OUT", out.to_str().unwrap()))
                .collect();
            let mut cmd = if tool == "docker" {
                docker.cmd(60)
            } else {
                let mut c = bounded(60, env!("CARGO_BIN_EXE_strata"));
                c.arg("--store").arg(env.store());
                c
            };
            let status = cmd.arg("cp").args(&args).output().unwrap().status;
            results.push(format!("{copy:?}: {}", status.success()));
        }
        let inside = if tool == "docker" {
            docker.ok(60, &["exec", "box", "sh", "-c", listing])
        } else {
            strata(&env.store(), 60, &["exec", "box", "sh", "-c", listing])
        };
        seen.push((results, inside, tree_listing(&out)));
    }
    let (theirs, ours) = (&seen[0], &seen[1]);
    assert_eq!(ours.0, theirs.0, "the same copies succeed and fail");
    assert_eq!(
        ours.1, theirs.1,
        "the same tree in the machine as in the container"
    );
    assert_eq!(ours.2, theirs.2, "the same tree copied out");
}
