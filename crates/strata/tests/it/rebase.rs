//! Automatic rebase in `strata build`: an app whose steps do not depend on its base follows a
//! moved base without running a step, and comes out as a clean build on the new base would;
//! anything else is rebuilt, and `--explain` says why (docs/rebase.md).

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use crate::common::{CountingProxy, Env, Registry, import_busybox};

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

fn inspect(env: &Env, name: &str) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["inspect", name, "--json"])).unwrap()
}

fn digest_of(v: &serde_json::Value, what: &str) -> String {
    match what {
        "manifest" => v["descriptor"]["digest"].as_str().unwrap().to_string(),
        _ => v["manifest"]["config"]["digest"]
            .as_str()
            .unwrap()
            .to_string(),
    }
}

fn layers(v: &serde_json::Value) -> Vec<String> {
    v["manifest"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

fn blob_names(env: &Env) -> BTreeSet<String> {
    env.blob_files()
        .into_iter()
        .map(|(n, _)| format!("sha256:{n}"))
        .collect()
}

/// A project: `base` FROM busybox (its version file and PATH set by `round`), `app` that
/// only copies files and sets config, `optout` (strata.toml `rebase = false`) and
/// `labelled` (`LABEL rebase=false`), both copy-only too.
fn project(dir: &Path, round: u32) {
    write(
        &dir.join("strata.toml"),
        r#"
[[image]]
name = "base"
context = "base"

[[image]]
name = "app"
context = "app"

[[image]]
name = "optout"
context = "app"
dockerfile = "app/optout.Dockerfile"
rebase = false

[[image]]
name = "labelled"
context = "app"
dockerfile = "app/labelled.Dockerfile"
"#,
    );
    write(
        &dir.join("base/Dockerfile"),
        &format!("FROM bb\nCOPY version /etc/version\nENV PATH=/base{round}/bin:/bin\n"),
    );
    write(&dir.join("base/version"), &format!("{round}\n"));
    let app = "FROM base\nCOPY app.txt /app/\nCOPY --chown=root:root conf/ /etc/app/\n\
               ENV APP=1\nWORKDIR /srv/app\nCMD [\"cat\", \"/app/app.txt\"]\n";
    write(&dir.join("app/Dockerfile"), app);
    write(&dir.join("app/optout.Dockerfile"), app);
    write(
        &dir.join("app/labelled.Dockerfile"),
        &format!("{app}LABEL rebase=false\n"),
    );
    write(&dir.join("app/app.txt"), "app\n");
    write(&dir.join("app/conf/app.conf"), "port = 8080\n");
}

/// `strata build` of the project in `dir`: stdout (one line per image) and stderr.
fn build(env: &Env, dir: &Path, extra: &[&str]) -> (String, String) {
    let mut args = vec!["build", "--project", dir.to_str().unwrap()];
    args.extend(extra);
    let out = env.strata(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn line<'a>(stdout: &'a str, image: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(&format!("{image}\t")))
        .unwrap_or_else(|| panic!("no line for {image}: {stdout}"))
}

/// The `image_done` event of `image` in JSON progress.
fn image_done(stderr: &str, image: &str) -> serde_json::Value {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "image_done" && e["image"] == image)
        .unwrap_or_else(|| panic!("no image_done for {image}: {stderr}"))
}

/// The base moves: the copy-only app is rebased (no step runs, no layer blob is written, the
/// manifest digest is the one a clean build on the new base gives, its own ENV kept and the
/// new base's PATH taken), a following build changes nothing, the opt-outs are rebuilt and
/// say why; a push of the rebased app uploads its config only.
#[test]
fn a_copy_only_app_follows_its_moved_base_like_a_clean_build() {
    let env = Env::new();
    import_busybox(&env, "bb");
    let dir = env.path("proj");
    project(&dir, 1);
    let (out, _) = build(&env, &dir, &[]);
    assert!(line(&out, "app").contains("built"), "{out}");

    let registry = Registry::start(&env);
    let remote = |repo: &str| format!("127.0.0.1:{}/team/{repo}", registry.port);
    env.ok(&["push", "base", &remote("base:1")]);
    env.ok(&["push", "app", &remote("app:1")]);
    let old = inspect(&env, "app");

    project(&dir, 2);
    let before = blob_names(&env);
    let (out, err) = build(&env, &dir, &["--explain", "--progress", "json"]);
    let base = inspect(&env, "base");
    let app = inspect(&env, "app");
    let rebased = line(&out, "app");
    assert!(
        rebased.contains(&format!(
            "rebased onto base@{} (0 run",
            digest_of(&base, "manifest")
        )),
        "{out}"
    );
    assert!(
        err.contains(r#""event":"rebased""#) && err.contains(r#""image":"app""#),
        "{err}"
    );
    let done = image_done(&err, "app");
    assert_eq!(done["steps_run"], 0, "{done}");
    assert_eq!(done["layer_bytes_written"], 0, "{done}");

    // No layer blob: what is new in the store is the base's and the two images' configs and
    // manifests (optout and labelled rewrite the same layers they had).
    let new: BTreeSet<String> = blob_names(&env).difference(&before).cloned().collect();
    let mut allowed: BTreeSet<String> = layers(&base).into_iter().collect();
    for img in ["base", "app", "optout", "labelled"] {
        let v = inspect(&env, img);
        allowed.insert(digest_of(&v, "manifest"));
        allowed.insert(digest_of(&v, "config"));
    }
    assert!(
        new.is_subset(&allowed),
        "new blobs {new:?}, allowed {allowed:?}"
    );
    let own = &layers(&app)[layers(&base).len()..];
    assert_eq!(own, &layers(&old)[layers(&old).len() - own.len()..]);
    assert!(
        own.iter().all(|l| before.contains(l)),
        "the app's layers are the old ones"
    );

    // Config: the app's own settings kept, the inherited PATH from the new base.
    let cfg = &app["config"]["config"];
    let envs: Vec<&str> = cfg["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(envs.contains(&"PATH=/base2/bin:/bin"), "{envs:?}");
    assert!(envs.contains(&"APP=1"), "{envs:?}");
    assert_eq!(cfg["WorkingDir"], "/srv/app");
    assert_eq!(
        app["manifest"]["annotations"]["org.opencontainers.image.base.digest"],
        digest_of(&base, "manifest")
    );
    env.ok(&["validate", "app"]);

    // The opt-outs are rebuilt, and --explain says why.
    for (img, why) in [
        ("optout", "`rebase = false`"),
        ("labelled", "label `rebase=false`"),
    ] {
        let l = line(&out, img);
        assert!(l.contains("\tbuilt ("), "{l}");
        assert!(
            err.lines()
                .any(|e| e.contains(r#""event":"explain""#) && e.contains(img) && e.contains(why)),
            "{img}: {err}"
        );
    }

    // Cache entries were recorded: the next build runs nothing and says unchanged.
    let (again, _) = build(&env, &dir, &[]);
    assert!(line(&again, "app").contains("unchanged (0 run"), "{again}");
    assert_eq!(
        digest_of(&inspect(&env, "app"), "manifest"),
        digest_of(&app, "manifest")
    );

    // A clean build of the same project on the new base, in a fresh store (busybox moved
    // over by save/load, so strata.lock's digest holds), gives the same manifest digest.
    let fresh = Env::new();
    let bb = env.path("bb.tar");
    env.ok(&["save", "bb", "-o", bb.to_str().unwrap(), "--format", "oci"]);
    fresh.ok(&["load", "-i", bb.to_str().unwrap()]);
    let (clean, _) = build(&fresh, &dir, &[]);
    assert!(line(&clean, "app").contains("\tbuilt ("), "{clean}");
    assert_eq!(
        digest_of(&inspect(&fresh, "app"), "manifest"),
        digest_of(&app, "manifest"),
        "rebased and clean builds differ"
    );

    // Push: the new base first, then the rebased app mounting its layer: the app's upload
    // is its config (the manifest is not a blob), nothing else.
    env.ok(&["push", "base", &remote("base:2")]);
    let out = env.strata(&[
        "push",
        "app",
        &remote("app:2"),
        "--mount-from",
        "team/base",
        "--progress",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["event"] == "blob")
        .collect();
    let uploaded: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["state"] == "done").collect();
    assert_eq!(uploaded.len(), 1, "{events:?}");
    assert_eq!(uploaded[0]["digest"], digest_of(&app, "config"));
    let config_size = app["manifest"]["config"]["size"].as_u64().unwrap();
    assert_eq!(uploaded[0]["total"].as_u64().unwrap(), config_size);
    assert!(config_size < 4096, "{config_size}");
}

/// An app with a RUN step is rebuilt when its base moves, and `--explain` names the RUN.
#[test]
fn an_app_that_runs_a_command_is_rebuilt_and_explain_names_the_run() {
    if !strata_test_support::can_run_containers("rebase of a RUN app") {
        return;
    }
    let env = Env::new();
    import_busybox(&env, "bb");
    let dir = env.path("proj");
    write(
        &dir.join("strata.toml"),
        "[[image]]\nname = \"base\"\ncontext = \"base\"\n\n[[image]]\nname = \"app\"\ncontext = \"app\"\n",
    );
    let base = |round: u32| {
        write(
            &dir.join("base/Dockerfile"),
            "FROM bb\nCOPY version /etc/version\n",
        );
        write(&dir.join("base/version"), &format!("{round}\n"));
    };
    base(1);
    write(
        &dir.join("app/Dockerfile"),
        "FROM base\nCOPY app.txt /app/\nRUN cat /etc/version /app/app.txt > /app/both\n",
    );
    write(&dir.join("app/app.txt"), "app\n");
    build(&env, &dir, &[]);
    base(2);
    let (out, err) = build(&env, &dir, &["--explain", "--progress", "plain"]);
    let l = line(&out, "app");
    assert!(l.contains("\tbuilt (1 run"), "{out}");
    assert!(!err.contains("rebased app"), "{err}");
    let why = err
        .lines()
        .find(|e| e.contains("not rebased"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        why.contains("`RUN cat /etc/version /app/app.txt > /app/both`")
            && why.contains("Dockerfile:3"),
        "{why}"
    );
}

/// `strata build -f -t`: a base that moved without touching what the app's COPY reads is
/// followed; one that changed the mode of the directory the app copies into is not (the
/// layer would record the new mode), and `--explain` names the path and the step.
#[test]
fn a_base_that_changed_what_a_copy_reads_is_rebuilt_and_explain_names_the_path() {
    let env = Env::new();
    let root = env.path("rootfs");
    crate::common::busybox_rootfs(&root);
    let import = || {
        crate::common::tar_dir(&root, &env.path("base.tar"));
        env.ok(&["import", env.path("base.tar").to_str().unwrap(), "base"]);
    };
    import();
    let ctx = env.path("ctx");
    write(
        &ctx.join("Dockerfile"),
        "FROM base\nCOPY app.txt /srv/app/\n",
    );
    write(&ctx.join("app.txt"), "app\n");
    let build = || {
        let out = env.strata(&[
            "build",
            "-t",
            "app",
            "--explain",
            "--progress",
            "plain",
            ctx.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    };
    build();

    fs::write(root.join("etc/motd"), "a new base\n").unwrap();
    import();
    let err = build();
    assert!(err.contains("rebased app onto base@sha256:"), "{err}");

    fs::create_dir_all(root.join("srv/app")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("srv/app"), fs::Permissions::from_mode(0o750)).unwrap();
    import();
    let err = build();
    assert!(!err.contains("rebased app"), "{err}");
    assert!(
        err.contains("not rebased onto the new base: `/srv` differs")
            && err.contains("`COPY app.txt /srv/app/`"),
        "{err}"
    );
    let v = inspect(&env, "app");
    let diff_ids = v["config"]["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), 2);
}

/// `strata rebase --all --onto base:2 --push`: every image built on another `base` is moved
/// in one pass (an image on another base is left alone), each is a valid image on the new
/// base's layers with its own layer kept, and the push sends each app's config and nothing
/// else of it (the new base's layers are mounted or already there).
#[test]
fn rebase_all_moves_every_app_of_the_base_and_pushes_only_configs() {
    let env = Env::new();
    import_busybox(&env, "bb");
    let registry = Registry::start(&env);
    let remote = |name: &str| format!("127.0.0.1:{}/team/{name}", registry.port);
    let dir = env.path("ctx");
    write(&dir.join("v"), "1\n");
    write(
        &dir.join("base.Dockerfile"),
        "FROM bb\nCOPY v /etc/base-version\n",
    );
    let build = |file: &str, tag: &str| {
        env.ok(&[
            "build",
            "-f",
            dir.join(file).to_str().unwrap(),
            "-t",
            tag,
            dir.to_str().unwrap(),
        ]);
    };
    build("base.Dockerfile", "base:1");
    write(&dir.join("app.txt"), "app\n");
    write(
        &dir.join("app.Dockerfile"),
        "FROM base:1\nCOPY app.txt /app/\n",
    );
    write(
        &dir.join("other.Dockerfile"),
        "FROM bb\nCOPY app.txt /app/\n",
    );
    let apps: Vec<String> = (1..=3).map(|i| remote(&format!("app{i}:1"))).collect();
    for a in &apps {
        build("app.Dockerfile", a);
        env.ok(&["push", a]);
    }
    build("other.Dockerfile", "other:1");
    let other_before = digest_of(&inspect(&env, "other:1"), "manifest");
    write(&dir.join("v"), "2\n");
    build("base.Dockerfile", "base:2");
    env.ok(&["push", "base:2", &remote("base:2")]);

    let out = env.strata(&[
        "rebase",
        "--all",
        "--onto",
        "base:2",
        "--push",
        "--progress",
        "json",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(
        stderr.contains("Rebased 3 image(s) onto base:2"),
        "{stderr}"
    );
    let base2 = layers(&inspect(&env, "base:2"));
    for a in &apps {
        let v = inspect(&env, a);
        let l = layers(&v);
        assert_eq!(l[..base2.len()], base2[..], "{a} is not on base:2's layers");
        assert_eq!(l.len(), base2.len() + 1, "{a} keeps its own layer");
        env.ok(&["validate", a]);
    }
    assert_eq!(
        digest_of(&inspect(&env, "other:1"), "manifest"),
        other_before,
        "an image on another base moved"
    );
    // One push per app, each uploading its config only.
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let pushed = events.iter().filter(|e| e["event"] == "pushed").count();
    assert_eq!(pushed, 3, "{stderr}");
    let uploaded: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "blob" && e["state"] == "done")
        .collect();
    // (The three apps have one config: uploaded once, then mounted.)
    let configs: BTreeSet<String> = apps
        .iter()
        .map(|a| digest_of(&inspect(&env, a), "config"))
        .collect();
    assert!(!uploaded.is_empty());
    for u in uploaded {
        assert!(
            configs.contains(u["digest"].as_str().unwrap()),
            "not a config was uploaded: {u}"
        );
    }

    // Again: nothing to move.
    let out = env.strata(&["rebase", "--all", "--onto", "base:2"]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Rebased 0 image(s) onto base:2, no layer written; 3 already on it"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A name and --all at once is a usage error.
    let out = env.strata(&["rebase", "app", "--all", "--onto", "base:2"]);
    assert!(!out.status.success());
}

/// An app that only a registry holds (built and pushed elsewhere) is rebased there from a
/// store that has none of it: the app's manifest and config and its bases' are read, never a
/// layer (bytes counted on the wire); only the new config and manifest are written, the new
/// base's layer is mounted from its repository; and the result is the image a local
/// `strata rebase` makes, which a fresh store pulls and validates. A store that has the app
/// rebases it locally and pushes the same image.
#[test]
fn an_image_only_a_registry_holds_is_rebased_there_reading_no_layer() {
    let env = Env::new();
    import_busybox(&env, "bb");
    let registry = Registry::start(&env);
    let proxy = CountingProxy::start(registry.port);
    let remote = |name: &str| format!("127.0.0.1:{}/team/{name}", proxy.port);
    let dir = env.path("ctx");
    write(&dir.join("v"), "1\n");
    write(
        &dir.join("base.Dockerfile"),
        "FROM bb\nCOPY v /etc/base-version\nENV PATH=/base/bin:/bin\n",
    );
    // The app's own layer: 1 MiB that does not compress, so a download of it would show.
    let noise: Vec<u8> = (0u32..1 << 18)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    fs::write(dir.join("blob.bin"), &noise).unwrap();
    write(
        &dir.join("app.Dockerfile"),
        &format!(
            "FROM {}\nCOPY blob.bin /app/\nENV APP=1\nCMD [\"/app/run\"]\n",
            remote("base:1")
        ),
    );
    let build = |file: &str, tag: &str| {
        env.ok(&[
            "build",
            "-f",
            dir.join(file).to_str().unwrap(),
            "-t",
            tag,
            dir.to_str().unwrap(),
        ]);
        env.ok(&["push", tag]);
    };
    build("base.Dockerfile", &remote("base:1"));
    build("app.Dockerfile", &remote("app:1"));
    write(&dir.join("v"), "2\n");
    build("base.Dockerfile", &remote("base:2"));
    // What a rebase in a store that has everything makes.
    let local = env.ok(&[
        "rebase",
        &remote("app:1"),
        "--onto",
        &remote("base:2"),
        "-t",
        "rebased:1",
    ]);
    let app_layer = layers(&inspect(&env, &remote("app:1")))[2].clone();

    // A store with nothing in it (a CI job, say).
    let ci = Env::new();
    let (up0, down0) = proxy.counts();
    let out = ci.strata(&[
        "rebase",
        &remote("app:1"),
        "--onto",
        &remote("base:2"),
        "--push",
        "--progress",
        "json",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    let (up, down) = proxy.counts();
    let (up, down) = (up - up0, down - down0);
    eprintln!("registry-only rebase: {up} bytes up, {down} bytes down");
    assert_eq!(stdout, local, "not the image a local rebase makes");
    assert!(
        down < 64 * 1024,
        "{down} bytes came down: a layer (1 MiB) was read"
    );
    assert!(up < 64 * 1024, "{up} bytes went up: more than a config");
    assert!(
        !blob_names(&ci).contains(&app_layer),
        "the app's layer is in the store"
    );
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let state_of = |state: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["event"] == "blob" && e["state"] == state)
            .map(|e| e["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let base2_layer = layers(&inspect(&env, &remote("base:2")))[1].clone();
    let config = digest_of(&inspect(&env, "rebased:1"), "config");
    assert_eq!(state_of("done"), [config], "only the config is uploaded");
    assert_eq!(state_of("mounted"), [base2_layer], "{stderr}");
    assert!(state_of("skipped").contains(&app_layer), "{stderr}");

    // The registry serves it: a fresh store pulls and validates it, with the new base's PATH.
    let check = Env::new();
    check.ok(&["pull", &remote("app:1")]);
    check.ok(&["validate", &remote("app:1")]);
    let v = inspect(&check, &remote("app:1"));
    assert_eq!(format!("{}\n", digest_of(&v, "manifest")), local);
    assert_eq!(
        layers(&v)[..2],
        layers(&inspect(&env, &remote("base:2")))[..]
    );

    // The store that has the app rebases it there, names it and pushes the same image.
    let out = env.ok(&[
        "rebase",
        &remote("app:1"),
        "--onto",
        &remote("base:2"),
        "-t",
        &remote("app:2"),
        "--push",
    ]);
    assert_eq!(out, local);
    check.ok(&["pull", &remote("app:2")]);
    assert_eq!(
        format!(
            "{}\n",
            digest_of(&inspect(&check, &remote("app:2")), "manifest")
        ),
        local
    );

    // Clear refusals: a base nowhere to be found, a result with no registry to go to, an
    // image that is neither here nor there.
    let err = ci.fails(&[
        "rebase",
        &remote("app:1"),
        "--onto",
        &remote("base:9"),
        "--push",
    ]);
    assert!(
        err.contains(&format!("no new base `{}`", remote("base:9"))),
        "{err}"
    );
    let err = ci.fails(&[
        "rebase",
        &remote("app:1"),
        "--onto",
        &remote("base:2"),
        "--push",
        "-t",
        "mine:1",
    ]);
    assert!(err.contains("`mine:1` names none"), "{err}");
    let err = ci.fails(&[
        "rebase",
        &remote("ghost:1"),
        "--onto",
        &remote("base:2"),
        "--push",
    ]);
    assert!(
        err.contains(&format!("no image `{}` in the store", remote("ghost:1"))),
        "{err}"
    );
}
