//! `strata dev` end to end: a real machine behind the agent's proxy, real files edited in the
//! build context, real HTTP.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::common::{http_get, wait_for};
use crate::deploy::{Cleanup, machine_env};

fn machine_ids(env: &crate::common::Env) -> Vec<String> {
    env.ok(&["machine", "list", "--app", "web", "--json"])
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["state"] == "running")
        .filter_map(|v| v["id"].as_str().map(String::from))
        .collect()
}

/// `strata dev web --project .` in `dir`, its stderr to a log; returns once it watches.
fn start_dev(
    env: &crate::common::Env,
    dir: &std::path::Path,
) -> (std::process::Child, std::path::PathBuf) {
    start_dev_of(env, dir, &["web"])
}

/// `strata dev APPS… --project .` in `dir`, its stderr to a log; returns once it watches
/// every app.
fn start_dev_of(
    env: &crate::common::Env,
    dir: &std::path::Path,
    apps: &[&str],
) -> (std::process::Child, std::path::PathBuf) {
    let log = env.path("dev.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .current_dir(dir)
        .arg("dev")
        .args(apps)
        .args(["--project", ".", "--progress", "plain"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30 + 30 * apps.len() as u64);
    loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.matches("watching").count() == apps.len() {
            break;
        }
        let exited = child.try_wait().unwrap();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "strata dev did not start watching ({exited:?}):\n{said}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, log)
}

#[test]
fn dev_syncs_edits_into_the_running_machine_and_rebuilds_what_it_cannot_sync() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let port = crate::common::free_port();
    let dir = env.path("proj");
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), "v1\n").unwrap();
    std::fs::write(dir.join("site/old.html"), "old\n").unwrap();
    // A project base with a context of its own: its changes rebuild it and the app.
    std::fs::create_dir_all(dir.join("basectx")).unwrap();
    std::fs::write(dir.join("basectx/base.txt"), "b1\n").unwrap();
    std::fs::write(
        dir.join("base.Dockerfile"),
        "FROM busybox\nCOPY base.txt /www/base.txt\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM base\nCOPY site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("strata.toml"),
        format!(
            "[[image]]\nname = \"base\"\ncontext = \"basectx\"\ndockerfile = \"base.Dockerfile\"\n\n\
             [[image]]\nname = \"web\"\nignore = [\"basectx\", \"*.Dockerfile\"]\n\n[app.web]\nimage = \"web\"\nport = 8080\n\
             public_port = {port}\nkill_timeout = \"2s\"\n\
             health = {{ path = \"/\", interval = \"100ms\", timeout = \"1s\", deadline = \"5s\" }}\n\
             live_update = {{ sync = [{{ src = \"site\", dest = \"/www\" }}], \
             run = [{{ cmd = \"echo ran > /www/ran.txt\", trigger = [\"site/trigger.txt\"] }}], \
             fall_back_on = [\"site/version.txt\"] }}\n"
        ),
    )
    .unwrap();
    // A relative project path, as `strata dev` is mostly run (`--project .`).
    let (mut child, log) = start_dev(&env, &dir);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let get = |path: &str| http_get("127.0.0.1", port, path);
    assert_eq!(get("/").unwrap(), "v1\n");
    let first = machine_ids(&env);
    assert_eq!(first.len(), 1, "{}", said());

    // An edit under `sync`: in the running machine at once, no new machine.
    let t = Instant::now();
    std::fs::write(dir.join("site/index.html"), "v2\n").unwrap();
    wait_for("the edit to show", Duration::from_secs(10), || {
        get("/").is_ok_and(|b| b == "v2\n")
    });
    eprintln!("edit → served in {:?}", t.elapsed());
    assert_eq!(machine_ids(&env), first, "synced, not redeployed");
    assert!(
        said().contains("synced site/index.html → /www/index.html to 1 machine(s)"),
        "{}",
        said()
    );

    // New directories and files, and deletes.
    std::fs::create_dir_all(dir.join("site/new")).unwrap();
    std::fs::write(dir.join("site/new/deep.html"), "deep\n").unwrap();
    std::fs::remove_file(dir.join("site/old.html")).unwrap();
    wait_for(
        "the new file and the delete",
        Duration::from_secs(10),
        || get("/new/deep.html").is_ok_and(|b| b == "deep\n") && get("/old.html").is_err(),
    );

    // A file whose name is not UTF-8: synced with its bytes, not a lossy name (busybox httpd
    // decodes `%FF`). Still no new machine (asserted below).
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(
        dir.join(std::ffi::OsStr::from_bytes(b"site/bad\xffname.html")),
        "odd\n",
    )
    .unwrap();
    wait_for("a name that is not UTF-8", Duration::from_secs(10), || {
        get("/bad%FFname.html").is_ok_and(|b| b == "odd\n")
    });

    // A `run` rule fires on its trigger.
    std::fs::write(dir.join("site/trigger.txt"), "go\n").unwrap();
    wait_for("the run rule", Duration::from_secs(10), || {
        get("/ran.txt").is_ok_and(|b| b == "ran\n")
    });
    assert_eq!(machine_ids(&env), first);

    // A change outside `sync` (the Dockerfile): rebuilt and redeployed, a new machine, and
    // the image now carries the edits.
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM base\nENV CHANGED=1\nCOPY site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    wait_for("the redeploy", Duration::from_secs(60), || {
        said().contains("rebuilt and redeployed")
    });
    wait_for("the new machine", Duration::from_secs(30), || {
        let ids = machine_ids(&env);
        ids.len() == 1 && ids != first
    });
    assert_eq!(get("/").unwrap(), "v2\n");
    assert_eq!(get("/new/deep.html").unwrap(), "deep\n");
    assert_eq!(get("/base.txt").unwrap(), "b1\n");

    // A change in the base's context: the base and the app are rebuilt and redeployed.
    std::fs::write(dir.join("basectx/base.txt"), "b2\n").unwrap();
    wait_for(
        "the base's change to be deployed",
        Duration::from_secs(60),
        || get("/base.txt").is_ok_and(|b| b == "b2\n"),
    );
    assert!(said().contains("(base base)"), "{}", said());

    // A path under `sync` that `fall_back_on` names: rebuilt and redeployed, not synced.
    let before = machine_ids(&env);
    let redeploys = said().matches("rebuilt and redeployed").count();
    std::fs::write(dir.join("site/version.txt"), "2\n").unwrap();
    wait_for("the fall_back_on redeploy", Duration::from_secs(60), || {
        said().matches("rebuilt and redeployed").count() > redeploys
    });
    wait_for("its new machine", Duration::from_secs(30), || {
        let ids = machine_ids(&env);
        ids.len() == 1 && ids != before
    });
    assert_eq!(get("/version.txt").unwrap(), "2\n");
    assert!(
        !said().contains("version.txt → "),
        "it was synced: {}",
        said()
    );

    // Ctrl-C ends the loop; the app keeps running.
    rustix_kill(child.id());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "strata dev did not stop: {}",
            said()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}: {}", said());
    assert_eq!(get("/").unwrap(), "v2\n");
    let mut rest = String::new();
    let _ = std::fs::File::open(&log).unwrap().read_to_string(&mut rest);
    assert!(!rest.contains("error:"), "{rest}");
}

fn rustix_kill(pid: u32) {
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
}

/// path → (type, mode, content or link target) of every entry below `root`.
fn tree(root: &std::path::Path) -> std::collections::BTreeMap<String, (char, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        // The machine's tree may change while it is read (a sync in flight): what vanishes
        // is left out, and the caller compares again.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                let Ok(t) = std::fs::read_link(&p) else {
                    continue;
                };
                out.insert(rel, ('l', 0, t.to_string_lossy().as_bytes().to_vec()));
            } else if m.is_dir() {
                out.insert(rel, ('d', mode, Vec::new()));
                todo.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.insert(rel, ('f', mode, bytes));
            }
        }
    }
    out
}

#[test]
fn after_a_thousand_random_edits_the_machine_holds_the_local_tree() {
    use std::os::unix::fs::PermissionsExt;
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let port = crate::common::free_port();
    let dir = env.path("proj");
    let site = dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "v1\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("strata.toml"),
        format!(
            "[[image]]\nname = \"web\"\n\n[app.web]\nimage = \"web\"\nport = 8080\n\
             public_port = {port}\nkill_timeout = \"2s\"\n\
             live_update = {{ sync = [{{ src = \"site\", dest = \"/www\" }}] }}\n"
        ),
    )
    .unwrap();
    let (mut child, log) = start_dev(&env, &dir);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let id = machine_ids(&env).pop().unwrap();
    let remote = env
        .store()
        .join("strata/machines")
        .join(&id)
        .join("rootfs/www");

    // Random edits: create, modify, delete, rename, chmod, symlink, nested directories.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d ^ u64::from(std::process::id());
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    for i in 0..1000 {
        let dirs: Vec<std::path::PathBuf> = std::iter::once(site.clone())
            .chain(
                tree(&site)
                    .into_iter()
                    .filter(|(_, (t, _, _))| *t == 'd')
                    .map(|(p, _)| site.join(p)),
            )
            .collect();
        let files: Vec<std::path::PathBuf> = tree(&site)
            .into_iter()
            .filter(|(_, (t, _, _))| *t != 'd')
            .map(|(p, _)| site.join(p))
            .collect();
        let d = &dirs[next(dirs.len() as u64) as usize];
        let name = format!("n{}", next(40));
        match next(8) {
            0 | 1 => {
                let _ = std::fs::write(d.join(&name), format!("{i} {}\n", next(1000)));
            }
            2 if !files.is_empty() => {
                let f = &files[next(files.len() as u64) as usize];
                let _ = std::fs::remove_file(f);
            }
            3 if !files.is_empty() => {
                let f = &files[next(files.len() as u64) as usize];
                let _ = std::fs::rename(f, d.join(&name));
            }
            4 if !files.is_empty() => {
                let f = &files[next(files.len() as u64) as usize];
                if !std::fs::symlink_metadata(f)
                    .unwrap()
                    .file_type()
                    .is_symlink()
                {
                    let mode = [0o600, 0o644, 0o755, 0o640][next(4) as usize];
                    let _ = std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode));
                }
            }
            5 => {
                let _ = std::os::unix::fs::symlink(format!("t{}", next(9)), d.join(&name));
            }
            6 => {
                let _ = std::fs::create_dir_all(d.join(&name).join(format!("s{}", next(3))));
            }
            _ if dirs.len() > 1 && next(4) == 0 => {
                let _ = std::fs::remove_dir_all(&dirs[1 + next(dirs.len() as u64 - 1) as usize]);
            }
            _ => {
                let _ = std::fs::write(d.join(&name), b"x");
            }
        }
        if i % 97 == 0 {
            // Let some batches go through mid-way.
            std::thread::sleep(Duration::from_millis(60));
        }
        // Some edits while the machine is stopped: they go into its dev layer, which its
        // start mounts.
        if i == 400 {
            env.ok(&["machine", "stop", &id]);
        }
        if i == 700 {
            std::thread::sleep(Duration::from_millis(100));
            env.ok(&["machine", "start", &id]);
        }
    }
    let local = tree(&site);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let there = tree(&remote);
        if there == local {
            break;
        }
        if Instant::now() > deadline {
            let only_here: Vec<_> = local.keys().filter(|k| !there.contains_key(*k)).collect();
            let only_there: Vec<_> = there.keys().filter(|k| !local.contains_key(*k)).collect();
            let differ: Vec<_> = local
                .iter()
                .filter(|(k, v)| there.get(*k).is_some_and(|t| t != *v))
                .map(|(k, _)| k)
                .collect();
            panic!(
                "trees differ: only local {only_here:?}, only in the machine {only_there:?}, \
                 differ {differ:?}\n{}",
                said()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        local.len() > 3,
        "the edits made a tree ({} entries)",
        local.len()
    );
    assert_eq!(
        machine_ids(&env),
        vec![id.clone()],
        "synced, never redeployed"
    );
    assert!(
        said().contains("to 0 machine(s)"),
        "some batches came while the machine was stopped:\n{}",
        said()
    );
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // Restarted, the machine's root is built again from the image and the dev layer: the
    // same tree (whiteouts hide what the image had, opaque directories what it had below).
    env.ok(&["machine", "restart", &id]);
    let there = tree(&remote);
    let differ: Vec<_> = local
        .keys()
        .chain(there.keys())
        .filter(|k| local.get(*k) != there.get(*k))
        .collect();
    let show: Vec<_> = differ
        .iter()
        .map(|k| (k, local.get(*k), there.get(*k)))
        .collect();
    assert!(
        differ.is_empty(),
        "after a restart, these differ (here, there): {show:?}"
    );
}

/// A `FROM scratch` image holding one static binary and running as `USER 65534`: no shell,
/// no tar, no root in the machine, and edits still land (written from the host).
#[test]
fn dev_syncs_into_a_scratch_image_running_as_nobody() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let port = crate::common::free_port();
    let dir = env.path("proj");
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), "s1\n").unwrap();
    std::fs::copy("/bin/busybox", dir.join("busybox")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY site/ /www/\nUSER 65534\n\
         CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("strata.toml"),
        format!(
            "[[image]]\nname = \"web\"\n\n[app.web]\nimage = \"web\"\nport = 8080\n\
             public_port = {port}\nkill_timeout = \"2s\"\n\
             live_update = {{ sync = [{{ src = \"site\", dest = \"/www\" }}] }}\n"
        ),
    )
    .unwrap();
    let (mut child, log) = start_dev(&env, &dir);
    let get = |path: &str| http_get("127.0.0.1", port, path);
    assert_eq!(get("/").unwrap(), "s1\n");
    let first = machine_ids(&env);
    std::fs::write(dir.join("site/index.html"), "s2\n").unwrap();
    std::fs::create_dir_all(dir.join("site/sub")).unwrap();
    std::fs::write(dir.join("site/sub/page.html"), "sub\n").unwrap();
    wait_for(
        "the edits in a scratch machine",
        Duration::from_secs(10),
        || get("/").is_ok_and(|b| b == "s2\n") && get("/sub/page.html").is_ok_and(|b| b == "sub\n"),
    );
    assert_eq!(machine_ids(&env), first, "synced, not redeployed");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("live update failed"), "{said}");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// `restart = "process"`: a sync restarts the app's machines in place (same machine and
/// address), and what was synced outlives that restart and a `machine restart` (it is kept in
/// a dev layer, deletes as whiteouts); `strata dev --reset` drops it all.
#[test]
fn synced_files_outlive_restarts_and_reset_drops_them() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let port = crate::common::free_port();
    let dir = env.path("proj");
    std::fs::create_dir_all(dir.join("site/sub")).unwrap();
    std::fs::write(dir.join("site/index.html"), "v1\n").unwrap();
    std::fs::write(dir.join("site/sub/old.html"), "old\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY --chown=1234:2345 site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("strata.toml"),
        format!(
            "[[image]]\nname = \"web\"\n\n[app.web]\nimage = \"web\"\nport = 8080\n\
             public_port = {port}\nkill_timeout = \"2s\"\n\
             health = {{ path = \"/\", interval = \"100ms\", timeout = \"1s\", deadline = \"5s\" }}\n\
             live_update = {{ sync = [{{ src = \"site\", dest = \"/www\" }}], restart = \"process\" }}\n"
        ),
    )
    .unwrap();
    let (mut child, log) = start_dev(&env, &dir);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let get = |path: &str| http_get("127.0.0.1", port, path);
    let first = machine_ids(&env);
    assert_eq!(first.len(), 1, "{}", said());
    let machine = |id: &str| -> serde_json::Value {
        env.ok(&["machine", "list", "--json"])
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["id"] == id)
            .unwrap()
    };
    let before = machine(&first[0]);

    // An edit and a delete: synced, then the machine's process restarted in place.
    std::fs::write(dir.join("site/index.html"), "v2\n").unwrap();
    std::fs::remove_file(dir.join("site/sub/old.html")).unwrap();
    wait_for("the sync and restart", Duration::from_secs(20), || {
        said().contains("; ran restart")
    });
    wait_for("the edit to be served", Duration::from_secs(20), || {
        get("/").is_ok_and(|b| b == "v2\n")
    });
    assert!(get("/sub/old.html").is_err());
    let after = machine(&first[0]);
    assert_eq!(machine_ids(&env), first, "the same machine: {}", said());
    // Owned as the Dockerfile's `COPY --chown` makes them.
    let owner = || {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(
            env.store()
                .join("strata/machines")
                .join(&first[0])
                .join("rootfs/www/index.html"),
        )
        .unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner(), (1234, 2345));
    assert_eq!(after["address"], before["address"]);
    assert_ne!(after["pid"], before["pid"], "its process was restarted");

    // A restart of the machine itself keeps them too.
    rustix_kill(child.id());
    let _ = child.wait();
    env.ok(&["machine", "restart", &first[0]]);
    wait_for("the restarted machine", Duration::from_secs(20), || {
        get("/").is_ok_and(|b| b == "v2\n")
    });
    assert!(get("/sub/old.html").is_err(), "a synced delete came back");
    assert_eq!(owner(), (1234, 2345), "the dev layer keeps the owner");

    // --reset: the image as built again.
    let out = env.strata(&[
        "dev",
        "web",
        "--project",
        dir.to_str().unwrap(),
        "--reset",
        "--progress",
        "plain",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the built files back", Duration::from_secs(20), || {
        get("/").is_ok_and(|b| b == "v1\n") && get("/sub/old.html").is_ok_and(|b| b == "old\n")
    });
    assert_eq!(machine_ids(&env), first);
}

/// `strata dev web api`: two apps kept current by one command, each edit landing in its own
/// app's machine, neither redeployed.
#[test]
fn dev_keeps_several_apps_current_at_once() {
    let Some(env) = machine_env() else {
        return;
    };
    let _cleanup = Cleanup(&env);
    let dir = env.path("proj");
    let ports = [crate::common::free_port(), crate::common::free_port()];
    let mut toml = String::new();
    for (name, port) in ["web", "api"].iter().zip(ports) {
        let ctx = dir.join(name);
        std::fs::create_dir_all(ctx.join("site")).unwrap();
        std::fs::write(ctx.join("site/index.html"), format!("{name} v1\n")).unwrap();
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM busybox\nCOPY site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
        )
        .unwrap();
        toml.push_str(&format!(
            "[[image]]\nname = \"{name}\"\ncontext = \"{name}\"\n\n[app.{name}]\nimage = \"{name}\"\n\
             port = 8080\npublic_port = {port}\nkill_timeout = \"2s\"\n\
             live_update = {{ sync = [{{ src = \"site\", dest = \"/www\" }}] }}\n\n"
        ));
    }
    std::fs::write(dir.join("strata.toml"), toml).unwrap();
    let (mut child, log) = start_dev_of(&env, &dir, &["web", "api"]);
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let ids = |app: &str| -> Vec<String> {
        env.ok(&["machine", "list", "--app", app, "--json"])
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["id"].as_str().map(String::from))
            .collect()
    };
    let before = (ids("web"), ids("api"));
    for (name, port) in ["web", "api"].iter().zip(ports) {
        assert_eq!(
            http_get("127.0.0.1", port, "/").unwrap(),
            format!("{name} v1\n")
        );
        std::fs::write(
            dir.join(name).join("site/index.html"),
            format!("{name} v2\n"),
        )
        .unwrap();
    }
    for (name, port) in ["web", "api"].iter().zip(ports) {
        wait_for(&format!("{name}'s edit"), Duration::from_secs(20), || {
            http_get("127.0.0.1", port, "/").is_ok_and(|b| b == format!("{name} v2\n"))
        });
    }
    assert_eq!((ids("web"), ids("api")), before, "synced, not redeployed");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", said());
}
