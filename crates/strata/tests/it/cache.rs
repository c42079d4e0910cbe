//! The build cache shared through a registry (docs/cache.md), against the embedded registry:
//! a fresh store builds nothing that was built before, a changed file reruns only its steps,
//! two builders export at once, and an entry whose layer is gone is a miss.

use std::path::{Path, PathBuf};

use crate::common::{Env, Registry, import_busybox};

/// A project of a base (`FROM bb`, a RUN) and an app on it (COPY, RUN, ENV): four steps.
fn project(dir: &Path, cache: &str) {
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "strata.toml",
        &format!(
            "[cache]\nregistry = \"{cache}\"\n\n[[image]]\nname = \"base\"\ncontext = \"base\"\n\n\
             [[image]]\nname = \"app\"\ncontext = \"app\"\n"
        ),
    );
    write(
        "base/Dockerfile",
        "FROM bb\nRUN echo base > /base.txt && date +%s%N > /base-built-at\n",
    );
    write(
        "app/Dockerfile",
        "FROM base\nCOPY src/ /app/\nRUN cat /app/*.txt > /app/all && date +%s%N > /app/built-at\nENV APP=1\n",
    );
    write("app/src/a.txt", "a\n");
    write("app/src/b.txt", "b\n");
}

/// `strata build` of the project with `--progress json`: (steps run, steps cached, stderr).
fn build(env: &Env, dir: &Path, extra: &[&str]) -> (usize, usize, String) {
    let mut args = vec![
        "build",
        "--project",
        dir.to_str().unwrap(),
        "--progress",
        "json",
    ];
    args.extend(extra);
    let out = env.strata(&args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let (mut run, mut cached) = (0, 0);
    for e in err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "image_done")
    {
        run += e["steps_run"].as_u64().unwrap() as usize;
        cached += e["steps_cached"].as_u64().unwrap() as usize;
    }
    (run, cached, err)
}

fn digest(env: &Env, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["inspect", name, "--json"])).unwrap();
    v["descriptor"]["digest"].as_str().unwrap().to_string()
}

/// A fresh store with the same `bb` (by digest: saved and loaded) and a copy of the project.
fn fresh(first: &Env, from: &Path) -> (Env, PathBuf) {
    let env = Env::new();
    let tar = env.path("bb.tar");
    first.ok(&["save", "bb", "-o", tar.to_str().unwrap()]);
    env.ok(&["load", "-i", tar.to_str().unwrap()]);
    let dir = env.path("proj");
    copy_tree(from, &dir);
    (env, dir)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn a_fresh_store_builds_nothing_the_registry_cache_has() {
    if !strata_test_support::can_run_containers(
        "a_fresh_store_builds_nothing_the_registry_cache_has",
    ) {
        return;
    }
    let first = Env::new();
    import_busybox(&first, "bb");
    let registry = Registry::start(&first);
    let cache = format!("127.0.0.1:{}/team/cache", registry.port);
    let dir = first.path("proj");
    project(&dir, &cache);

    // The first build runs everything and exports.
    let (run, _, err) = build(&first, &dir, &[]);
    assert_eq!(run, 4, "{err}");
    assert!(err.contains("entries exported"), "{err}");

    // A fresh store: every step from the cache, the same images, no RUN ran again.
    let (second, dir2) = fresh(&first, &dir);
    let (run, cached, err) = build(&second, &dir2, &[]);
    assert_eq!((run, cached), (0, 4), "{err}");
    for img in ["base", "app"] {
        assert_eq!(digest(&second, img), digest(&first, img), "{img} differs");
    }
    second.ok(&["validate", "app"]);

    // One app file changed, in another fresh store: only the app's COPY and what follows run.
    let (third, dir3) = fresh(&first, &dir);
    std::fs::write(dir3.join("app/src/b.txt"), "b2\n").unwrap();
    let (run, cached, err) = build(&third, &dir3, &["--explain"]);
    assert_eq!((run, cached), (3, 1), "{err}");
    assert!(
        err.contains("not in this store's cache nor in 127.0.0.1:"),
        "--explain says where it looked: {err}"
    );
    // That export added the new steps: the second store now gets them from the cache too.
    std::fs::write(dir2.join("app/src/b.txt"), "b2\n").unwrap();
    let (run, _, err) = build(&second, &dir2, &[]);
    assert_eq!(run, 0, "{err}");
    assert_eq!(digest(&second, "app"), digest(&third, "app"));

    // Read from one repository and written to another: the other has what the build used.
    let other = format!("127.0.0.1:{}/team/cache2", registry.port);
    let (fourth, dir4) = fresh(&first, &dir);
    let (run, _, err) = build(
        &fourth,
        &dir4,
        &["--cache-from", &cache, "--cache-to", &other],
    );
    assert_eq!(run, 0, "{err}");
    assert!(err.contains("4 entries exported to 127.0.0.1:"), "{err}");
    let (fifth, dir5) = fresh(&first, &dir);
    let (run, cached, err) = build(&fifth, &dir5, &["--cache-from", &other]);
    assert_eq!((run, cached), (0, 4), "{err}");
    assert_eq!(digest(&fifth, "app"), digest(&first, "app"));
}

/// Two builders export to the same cache at once: both succeed, and the cache they leave is
/// whole (one of them wins the tag; a fresh store then gets that one's steps).
#[test]
fn two_builders_export_at_once_and_the_cache_stays_whole() {
    if !strata_test_support::can_run_containers(
        "two_builders_export_at_once_and_the_cache_stays_whole",
    ) {
        return;
    }
    let env = Env::new();
    import_busybox(&env, "bb");
    let registry = Registry::start(&env);
    let cache = format!("127.0.0.1:{}/team/cache", registry.port);
    let dir = env.path("proj");
    project(&dir, &cache);
    let (a, dir_a) = fresh(&env, &dir);
    let (b, dir_b) = fresh(&env, &dir);
    std::fs::write(dir_b.join("app/src/a.txt"), "other\n").unwrap();
    std::thread::scope(|s| {
        let one = s.spawn(|| build(&a, &dir_a, &[]));
        let two = s.spawn(|| build(&b, &dir_b, &[]));
        one.join().unwrap();
        two.join().unwrap();
    });
    let (c, dir_c) = fresh(&env, &dir);
    let (run, cached, err) = build(&c, &dir_c, &[]);
    // The base's steps are in either export; the app's are there when A's export won.
    assert!(cached >= 1 && run + cached == 4, "{err}");
    c.ok(&["validate", "app"]);
}

/// An entry whose layer the registry lost is a miss (the step runs), not an error.
#[test]
fn an_entry_whose_layer_is_gone_is_a_miss() {
    if !strata_test_support::can_run_containers("an_entry_whose_layer_is_gone_is_a_miss") {
        return;
    }
    let env = Env::new();
    import_busybox(&env, "bb");
    let registry = Registry::start(&env);
    let cache = format!("127.0.0.1:{}/team/cache", registry.port);
    let dir = env.path("proj");
    project(&dir, &cache);
    build(&env, &dir, &[]);
    // The app's RUN layer, deleted from the registry's storage.
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "app", "--json"])).unwrap();
    let layers = v["manifest"]["layers"].as_array().unwrap();
    let run_layer = layers.last().unwrap()["digest"].as_str().unwrap();
    let hex = run_layer.trim_start_matches("sha256:");
    let removed = remove_named(&env.path("registry"), hex);
    assert!(
        removed > 0,
        "the layer {hex} was not in the registry's storage"
    );

    let (other, dir2) = fresh(&env, &dir);
    let (run, cached, err) = build(&other, &dir2, &[]);
    assert_eq!((run, cached), (1, 3), "{err}");
    assert!(err.contains("whose layer was gone"), "{err}");
}

/// Removes every file named `name` below `dir`; how many.
fn remove_named(dir: &Path, name: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            n += remove_named(&p, name);
        } else if e.file_name().to_string_lossy() == name
            || p.parent()
                .is_some_and(|d| d.file_name().is_some_and(|f| f == name))
        {
            std::fs::remove_file(&p).unwrap();
            n += 1;
        }
    }
    n
}

/// A Dockerfile whose RUN says whether its cache mount (`id=tools`) was warm, and warms it.
fn mount_project(dir: &Path, input: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM bb\nCOPY input /input\n\
         RUN --mount=type=cache,id=tools,target=/cache \
         sh -c 'if [ -f /cache/warm ]; then cat /cache/warm > /out; else echo cold > /out; fi; \
         cat /input > /cache/warm; mkdir -p /cache/d/e; echo deep > /cache/d/e/f'\n",
    )
    .unwrap();
    std::fs::write(dir.join("input"), input).unwrap();
}

/// What the image's RUN wrote to /out.
fn out_of(env: &Env, image: &str) -> String {
    let dir = env.path(&format!("unpacked-{image}"));
    env.ok(&["unpack", image, dir.to_str().unwrap()]);
    std::fs::read_to_string(dir.join("out")).unwrap()
}

/// `[cache] mounts` / `--cache-mount`: a cache mount exported with the entries reaches a fresh
/// store's RUN that misses (its input changed); without the opt-in, or from a cache that
/// lacks it, the mount starts empty. Several `--cache-from` are looked up in order.
#[test]
fn cache_mounts_travel_through_the_registry_when_asked() {
    if !strata_test_support::can_run_containers("cache_mounts_travel_through_the_registry") {
        return;
    }
    let first = Env::new();
    import_busybox(&first, "bb");
    let registry = Registry::start(&first);
    let cache = format!("127.0.0.1:{}/team/cache", registry.port);
    let empty = format!("127.0.0.1:{}/team/empty", registry.port);
    let dir = first.path("ctx");
    mount_project(&dir, "from-the-first-builder\n");
    let d = dir.to_str().unwrap();
    let build = |env: &Env, extra: &[&str]| {
        let mut args = vec!["build", "-t", "m:1", "--progress", "plain"];
        args.extend(extra);
        args.push(d);
        let out = env.strata(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    build(&first, &["--cache-to", &cache, "--cache-mount", "tools"]);
    assert_eq!(out_of(&first, "m:1"), "cold\n");

    // A fresh store, another input (the RUN misses): the mount comes from the registry.
    let (second, _) = fresh(&first, &dir);
    mount_project(&dir, "second\n");
    let err = build(
        &second,
        &[
            "--cache-from",
            &empty,
            "--cache-from",
            &cache,
            "--cache-mount",
            "tools",
        ],
    );
    assert_eq!(out_of(&second, "m:1"), "from-the-first-builder\n", "{err}");
    assert!(err.contains("1 cache mount(s) fetched"), "{err}");
    let deep = strata_build_mount(&second, "tools").join("d/e/f");
    assert_eq!(std::fs::read_to_string(&deep).unwrap(), "deep\n");

    // Without the opt-in the mount is not fetched: it starts empty.
    let (third, _) = fresh(&first, &dir);
    mount_project(&dir, "third\n");
    build(&third, &["--cache-from", &cache]);
    assert_eq!(out_of(&third, "m:1"), "cold\n");
}

/// Where the store keeps cache mount `id` (as the build engine names it).
fn strata_build_mount(env: &Env, id: &str) -> PathBuf {
    let hex = strata_oci::Digest::sha256(id.as_bytes()).hex().to_string();
    env.store().join("strata/cache-mounts").join(&hex[..32])
}

/// A fresh builder that only pushes (`strata deploy APP --build-only` to the registry the
/// cache is in) downloads no layer: every step is a hit, the layers stay in the registry and
/// are mounted into the app's repository, and only manifests and configs cross the wire
/// (counted through a proxy, against a 2 MB layer). The store names no image it lacks layers
/// of; the image pulled back is the first builder's, whole. A plain `strata build` there
/// then wants the images in the store and fetches their layers.
#[test]
fn a_builder_that_only_pushes_fetches_no_layer() {
    if !strata_test_support::can_run_containers("a_builder_that_only_pushes_fetches_no_layer") {
        return;
    }
    let first = Env::new();
    import_busybox(&first, "bb");
    let registry = Registry::start(&first);
    let proxy = crate::common::CountingProxy::start(registry.port);
    let cache = format!("127.0.0.1:{}/team/cache", proxy.port);
    let dir = first.path("proj");
    project(&dir, &cache);
    // A base layer big enough to tell from manifests and configs.
    std::fs::write(
        dir.join("base/Dockerfile"),
        "FROM bb\nRUN head -c 2000000 /dev/urandom > /blob && echo base > /base.txt\n",
    )
    .unwrap();
    let toml = dir.join("strata.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    text.push_str(&format!(
        "\n[app.app]\nimage = \"app\"\nregistry = \"127.0.0.1:{}/team\"\n",
        proxy.port
    ));
    std::fs::write(&toml, text).unwrap();
    let (run, _, err) = build(&first, &dir, &[]);
    assert_eq!(run, 4, "{err}");

    let (second, dir2) = fresh(&first, &dir);
    let (_, down0) = proxy.counts();
    let out = second.strata(&[
        "deploy",
        "app",
        "--build-only",
        "--project",
        dir2.to_str().unwrap(),
        "--progress",
        "json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    let (_, down1) = proxy.counts();
    let pushed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(pushed.contains("/team/app:deployment-"), "{pushed}");
    let ran: u64 = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "image_done")
        .map(|e| e["steps_run"].as_u64().unwrap())
        .sum();
    assert_eq!(ran, 0, "{err}");
    let down = down1 - down0;
    assert!(
        down < 64 * 1024,
        "{down} bytes came down for manifests and configs only\n{err}"
    );
    let big = second
        .blob_files()
        .into_iter()
        .filter(|(_, bytes)| bytes.len() > 1_900_000)
        .count();
    assert_eq!(big, 0, "no layer of the cache is in the store");
    assert!(
        second.strata(&["inspect", "app"]).status.code() != Some(0),
        "an image whose layers are elsewhere is not named in the store"
    );

    // What the registry got is the first builder's app, whole.
    let third = Env::new();
    third.ok(&["pull", &pushed]);
    let v: serde_json::Value =
        serde_json::from_str(&third.ok(&["inspect", &pushed, "--json"])).unwrap();
    assert_eq!(
        v["descriptor"]["digest"].as_str().unwrap(),
        digest(&first, "app")
    );
    third.ok(&["validate", &pushed]);

    // Wanted in the store: the same build fetches the layers and names the images.
    let (run, cached, err) = build(&second, &dir2, &[]);
    assert_eq!((run, cached), (0, 4), "{err}");
    assert_eq!(digest(&second, "app"), digest(&first, "app"));
    second.ok(&["validate", "app"]);
}
