//! Store commands end to end: images, inspect, tag, rmi, gc, import errors, interrupted writes.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

#[test]
fn tag_rmi_and_gc_keep_what_is_named_and_free_the_rest() {
    let env = Env::new();
    let digest = import_busybox(&env, "busybox:1");
    env.ok(&["tag", "busybox:1", "base"]);
    let listed = env.ok(&["images", "-q"]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["base:latest", "busybox:1"]
    );
    let json = env.ok(&["images", "--json"]);
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["digest"], digest.as_str());
    }

    // Still named once: gc deletes nothing.
    env.ok(&["rmi", "busybox:1"]);
    let out = env.ok(&["gc"]);
    assert!(out.contains("Deleted 0 blobs"), "{out}");
    env.ok(&["validate", "base"]);

    // Not named any more: dry run lists, deletes nothing; gc then deletes all three blobs.
    env.ok(&["rmi", "base"]);
    let before = env.blob_files().len();
    let out = env.ok(&["gc", "--dry-run"]);
    assert!(out.contains("Would delete 3 blobs"), "{out}");
    assert_eq!(env.blob_files().len(), before);
    let out = env.ok(&["gc"]);
    assert!(out.contains("Deleted 3 blobs"), "{out}");
    assert!(env.blob_files().is_empty());

    let err = env.fails(&["rmi", "base"]);
    assert!(err.contains("no image named `base:latest`"), "{err}");
}

#[test]
fn inspect_shows_config_and_layers_and_json_for_tools() {
    let env = Env::new();
    let digest = import_busybox(&env, "busybox:1");
    let out = env.ok(&["inspect", "busybox:1"]);
    assert!(out.contains(&format!("Digest:     {digest}")), "{out}");
    assert!(out.contains("Cmd:        [\"sh\"]"), "{out}");
    assert!(
        out.contains("application/vnd.oci.image.layer.v1.tar+gzip"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "busybox:1", "--json"])).unwrap();
    assert_eq!(
        v["config"]["rootfs"]["diff_ids"].as_array().unwrap().len(),
        1
    );
    assert_eq!(
        v["manifest"]["layers"][0]["digest"],
        v["manifest"]["layers"][0]["digest"]
    );
    let err = env.fails(&["inspect", "nope:1"]);
    assert!(err.contains("no image named `nope:1`"), "{err}");

    // What a machine of the image gets: ports, labels, stop signal.
    let tar = env.path("rootfs.tar");
    env.ok(&[
        "import",
        tar.to_str().unwrap(),
        "svc:1",
        "--change",
        "EXPOSE 8080 53/udp",
        "--change",
        "LABEL team=web",
        "--change",
        "STOPSIGNAL SIGINT",
    ]);
    let out = env.ok(&["inspect", "svc:1"]);
    assert!(out.contains("Expose:     53/udp 8080/tcp"), "{out}");
    assert!(out.contains("Label:      team=web"), "{out}");
    assert!(out.contains("StopSignal: SIGINT"), "{out}");
}

#[test]
fn import_is_reproducible_with_source_date_epoch() {
    let env = Env::new();
    busybox_rootfs(&env.path("rootfs"));
    tar_dir(&env.path("rootfs"), &env.path("rootfs.tar"));
    let tar = env.path("rootfs.tar");
    let run = |name: &str, compression: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["--store", env.store().to_str().unwrap(), "import"])
            .args([tar.to_str().unwrap(), name, "--compression", compression])
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run("a:1", "gzip"), run("b:1", "gzip"));
    let zstd = run("c:1", "zstd");
    assert_ne!(zstd, run("a:1", "gzip"));
    env.ok(&["validate", "c:1"]);
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "c:1", "--json"])).unwrap();
    assert_eq!(
        v["manifest"]["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    assert_eq!(v["config"]["created"], "2023-11-14T22:13:20Z");
}

#[test]
fn a_truncated_or_bogus_tarball_is_refused_and_the_store_is_unchanged() {
    let env = Env::new();
    import_busybox(&env, "busybox:1");
    let blobs_before = env.blob_files();
    let index_before = std::fs::read(env.store().join("index.json")).unwrap();

    let full = std::fs::read(env.path("rootfs.tar")).unwrap();
    let cut = env.path("cut.tar");
    std::fs::write(&cut, &full[..full.len() / 2 + 100]).unwrap();
    let err = env.fails(&["import", cut.to_str().unwrap(), "broken:1"]);
    assert!(err.contains("truncated"), "{err}");
    assert!(err.contains("cut.tar"), "the error names the input: {err}");

    let bogus = env.path("bogus.tar");
    std::fs::write(&bogus, vec![b'x'; 4096]).unwrap();
    let err = env.fails(&["import", bogus.to_str().unwrap(), "broken:2"]);
    assert!(err.contains("bad tar header"), "{err}");

    let err = env.fails(&[
        "import",
        env.path("rootfs.tar").to_str().unwrap(),
        "bad:1",
        "--change",
        "RUN rm -rf /",
    ]);
    assert!(err.contains("RUN cannot be applied"), "{err}");
    let err = env.fails(&[
        "import",
        env.path("rootfs.tar").to_str().unwrap(),
        "Bad Name",
    ]);
    assert!(err.contains("invalid image name"), "{err}");

    assert_eq!(env.blob_files(), blobs_before, "no blob added or changed");
    assert_eq!(
        std::fs::read(env.store().join("index.json")).unwrap(),
        index_before
    );
    let tmp: Vec<_> = std::fs::read_dir(env.store().join("strata/tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "temp files left: {tmp:?}");
}

#[test]
fn killing_an_import_midway_leaves_no_partial_blob_and_no_name() {
    let env = Env::new();
    import_busybox(&env, "busybox:1");
    let blobs_before = env.blob_files();
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "--store",
            env.store().to_str().unwrap(),
            "import",
            "-",
            "half:1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let data = std::fs::read(env.path("rootfs.tar")).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data[..data.len() / 2]).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);

    // Every visible blob is whole (its bytes hash to its name) and none was added.
    for (name, bytes) in env.blob_files() {
        assert_eq!(strata_oci::Digest::sha256(&bytes).hex(), name);
    }
    assert_eq!(env.blob_files(), blobs_before);
    let listed = env.ok(&["images", "-q"]);
    assert_eq!(listed.trim(), "busybox:1");
    // The store still works.
    import_busybox(&env, "busybox:2");
    env.ok(&["validate", "busybox:2"]);
}

#[test]
fn a_blob_corrupted_on_disk_is_caught_by_validate_and_load_refuses_a_lying_archive() {
    let env = Env::new();
    import_busybox(&env, "busybox:1");
    let oci_tar = env.path("oci.tar");
    env.ok(&[
        "save",
        "busybox:1",
        "-o",
        oci_tar.to_str().unwrap(),
        "--format",
        "oci",
    ]);

    // Flip a byte of the layer blob on disk: validate names the blob.
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "busybox:1", "--json"])).unwrap();
    let layer = v["manifest"]["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = env
        .store()
        .join("blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = env.fails(&["validate", "busybox:1"]);
    assert!(err.contains(&layer), "{err}");

    // An OCI archive whose blob does not match its name is refused, nothing is named.
    let mut archive = tar::Archive::new(std::fs::File::open(&oci_tar).unwrap());
    let mut builder = tar::Builder::new(Vec::new());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
        if name.ends_with(layer.trim_start_matches("sha256:")) {
            let mid = data.len() / 2;
            data[mid] ^= 0xff;
        }
        let mut h = entry.header().clone();
        builder.append_data(&mut h, &name, &data[..]).unwrap();
    }
    let lying = env.path("lying.tar");
    std::fs::write(&lying, builder.into_inner().unwrap()).unwrap();
    let other = Env::new();
    let err = other.fails(&["load", "-i", lying.to_str().unwrap()]);
    assert!(err.contains("digest"), "{err}");
    assert_eq!(other.ok(&["images", "-q"]).trim(), "");
    assert!(
        other
            .blob_files()
            .iter()
            .all(|(n, _)| *n != layer.trim_start_matches("sha256:"))
    );
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::io::Read;
    let env = Env::new();
    import_busybox(&env, "busybox:1");
    // `strata images | true`: the reader is gone before strata writes (it is still starting
    // when the pipe is closed). A panic here was "failed printing to stdout: Broken pipe".
    for _ in 0..5 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(env.store())
            .arg("images")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(!err.contains("panicked"), "{err}");
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.success() || status.signal() == Some(libc::SIGPIPE),
            "{status:?}: {err}"
        );
    }
}

#[test]
fn build_with_a_dockerfile_prints_each_name_once_then_the_digest() {
    let env = Env::new();
    import_busybox(&env, "busybox:latest");
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nENV A=1\n").unwrap();
    let out = env.ok(&[
        "build",
        "-f",
        ctx.join("Dockerfile").to_str().unwrap(),
        "-t",
        "web:1",
        ctx.to_str().unwrap(),
    ]);
    let lines: Vec<&str> = out.lines().collect();
    let mut unique = lines.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), lines.len(), "a name printed twice:\n{out}");
    assert_eq!(lines[0], "web:1", "{out}");
    assert!(lines[1].starts_with("web:strata-"), "{out}");
    assert_eq!(lines.len(), 3, "{out}");
    let digest = env.ok(&["images", "--json"]);
    assert!(digest.contains(lines[2]), "{out}\n{digest}");
}

/// `docker build --pull`: a base named by a tag is pulled again even when the store has it, so
/// a tag moved in its registry is followed; without the flag the stored base is used.
#[test]
fn build_pull_follows_a_tag_moved_in_the_registry() {
    let env = Env::new();
    import_busybox(&env, "busybox:latest");
    let registry = Registry::start(&env);
    let base = format!("127.0.0.1:{}/team/base:1", registry.port);
    env.ok(&["push", "busybox", &base]);
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {base}\nENV A=1\n")).unwrap();
    let ctx = ctx.to_str().unwrap();
    let first = env.ok(&["build", "-q", "-t", "app:1", ctx]);

    // The tag moves to another image in the registry.
    let moved = env.path("moved");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::write(moved.join("Dockerfile"), "FROM busybox\nENV MOVED=1\n").unwrap();
    env.ok(&["build", "-q", "-t", "moved:1", moved.to_str().unwrap()]);
    env.ok(&["push", "moved:1", &base]);

    // --iidfile through a symlink: the file it points to gets the digest, the link stays, and
    // the mode is a plain create's, not a temporary file's 0600.
    let link = env.path("iid-link");
    std::os::unix::fs::symlink("iid-real", &link).unwrap();
    let again = env.ok(&[
        "build",
        "-q",
        "--iidfile",
        link.to_str().unwrap(),
        "-t",
        "app:2",
        ctx,
    ]);
    assert_eq!(again, first);
    assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
    let real = env.path("iid-real");
    assert_eq!(std::fs::read_to_string(&real).unwrap(), first.trim());
    let mode = std::os::unix::fs::PermissionsExt::mode(&real.metadata().unwrap().permissions());
    assert_eq!(mode & 0o777, 0o644, "{mode:o}");
    let out = env.strata(&["build", "--pull", "--progress", "plain", "-t", "app:3", ctx]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pulling {base} (--pull)")), "{err}");
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "app:3", "--json"])).unwrap();
    let env_vars = inspect["config"]["config"]["Env"].to_string();
    assert!(
        env_vars.contains("MOVED=1") && env_vars.contains("A=1"),
        "{env_vars}"
    );
    // A digest names one image: --pull takes it from the store as it is.
    let pinned = env.path("pinned");
    std::fs::create_dir_all(&pinned).unwrap();
    let digest = env.ok(&["build", "-q", "-t", "moved:1", moved.to_str().unwrap()]);
    std::fs::write(
        pinned.join("Dockerfile"),
        format!("FROM {}@{}\n", base.trim_end_matches(":1"), digest.trim()),
    )
    .unwrap();
    drop(registry);
    env.ok(&[
        "build",
        "--pull",
        "-q",
        "-t",
        "pinned:1",
        pinned.to_str().unwrap(),
    ]);
}

/// `name@sha256:…` (and a bare manifest digest) names an image for every command that takes
/// one, as the documented rollback `deploy --image app@sha256:…` needs.
#[test]
fn a_digest_reference_works_wherever_a_name_does() {
    let env = Env::new();
    let digest = import_busybox(&env, "bb:1");
    let pinned = format!("bb@{digest}");
    env.ok(&["inspect", &pinned]);
    env.ok(&["inspect", &digest]);
    env.ok(&["validate", &pinned]);
    env.ok(&["tag", &pinned, "copy:2"]);
    assert!(env.ok(&["images", "-q"]).contains("copy:2"));
    // The name moves on; the digest still names the first image.
    env.ok(&["rmi", "bb:1"]);
    let out = env.path("pinned.tar");
    env.ok(&["save", &pinned, "-o", out.to_str().unwrap()]);
    let registry = Registry::start(&env);
    let dest = format!("127.0.0.1:{}/team/bb:1", registry.port);
    let pushed = env.ok(&["push", &pinned, &dest]);
    assert!(pushed.trim().ends_with(&digest), "{pushed}");
    // A config digest is not an image: a clear error, not a crash.
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", &pinned, "--json"])).unwrap();
    let config = inspect["manifest"]["config"]["digest"].as_str().unwrap();
    let err = env.fails(&["inspect", &format!("bb@{config}")]);
    assert!(err.contains("no image named"), "{err}");

    // The short digest `strata images` shows names the image too, as `docker run` takes an
    // image ID prefix; a config's digest prefix does not.
    let listed = env.ok(&["images"]);
    let short = &digest["sha256:".len()..][..12];
    assert!(listed.contains(short), "{listed}");
    env.ok(&["tag", short, "short:1"]);
    let tagged: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", "short:1", "--json"])).unwrap();
    assert_eq!(tagged["manifest"], inspect["manifest"]);
    env.ok(&[
        "save",
        &format!("sha256:{}", &short[..6]),
        "-o",
        out.to_str().unwrap(),
    ]);
    let err = env.fails(&["inspect", &config["sha256:".len()..][..12]]);
    assert!(err.contains("no image named"), "{err}");

    // `rmi` by short digest, as `docker rmi ID`: an image with two names keeps them unless -f.
    let err = env.fails(&["rmi", short]);
    assert!(
        err.contains("copy:2") && err.contains("short:1") && err.contains("-f"),
        "{err}"
    );
    let out = env.ok(&["rmi", "-f", short]);
    assert_eq!(out.lines().count(), 2, "{out}");
    let left = env.ok(&["images", "-q"]);
    assert!(
        !left.contains("copy:2") && !left.contains("short:1"),
        "{left}"
    );
}

/// `save -o` replaces a regular file atomically (mode 0644, a symlink stays a link) and
/// writes through anything else (a FIFO, /dev/null); `-o -` or no `-o` streams to stdout.
#[test]
fn save_writes_through_links_pipes_and_devices_and_streams_to_stdout() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let env = Env::new();
    import_busybox(&env, "bb");
    let file = env.path("a.tar");
    env.ok(&["save", "bb", "-o", file.to_str().unwrap()]);
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.len() > 100_000);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    let link = env.path("link.tar");
    std::os::unix::fs::symlink("b.tar", &link).unwrap();
    env.ok(&["save", "bb", "-o", link.to_str().unwrap()]);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(std::fs::read(env.path("b.tar")).unwrap(), bytes);

    let fifo = env.path("pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    env.ok(&["save", "bb", "-o", fifo.to_str().unwrap()]);
    assert_eq!(reader.join().unwrap(), bytes);
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );

    if strata_test_support::is_root() {
        env.ok(&["save", "bb", "-o", "/dev/null"]);
        let md = std::fs::symlink_metadata("/dev/null").unwrap();
        assert!(md.file_type().is_char_device(), "/dev/null was replaced!");
    }
    assert_eq!(env.strata(&["save", "bb", "-o", "-"]).stdout, bytes);
    assert_eq!(env.strata(&["save", "bb"]).stdout, bytes);
}

/// A relative `--store` works for every command, RUN steps included (runc needs absolute
/// bundle paths; it used to fail with "invalid rootfs").
#[test]
fn a_relative_store_path_works_for_run_steps() {
    let env = Env::new();
    import_busybox(&env, "busybox");
    std::fs::write(
        env.path("Dockerfile"),
        "FROM busybox\nRUN echo ran > /ran\n",
    )
    .unwrap();
    if !strata_test_support::can_run_containers("a_relative_store_path_works_for_run_steps") {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .current_dir(env.dir.path())
        .args([
            "--store",
            "store",
            "build",
            "-f",
            "Dockerfile",
            "-t",
            "rel:1",
            ".",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(env.ok(&["images", "-q"]).contains("rel:1"));
}

/// An import whose layer cannot be unpacked (here a path deeper than PATH_MAX) fails fast,
/// with bounded memory, and leaves the name as it was: no image nothing could run.
#[test]
fn an_import_that_cannot_be_unpacked_names_nothing() {
    let env = Env::new();
    let first = import_busybox(&env, "img");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    let deep = "a/".repeat(50_000) + "f";
    b.append_data(&mut h, &deep, &b"x"[..]).unwrap();
    let tar = env.path("deep.tar");
    std::fs::write(&tar, b.into_inner().unwrap()).unwrap();
    let started = std::time::Instant::now();
    let err = env.fails(&["import", tar.to_str().unwrap(), "img"]);
    assert!(
        err.contains("PATH_MAX") && err.contains("left as it was"),
        "{err}"
    );
    assert!(
        err.len() < 2000,
        "the error shows a shortened path: {} bytes",
        err.len()
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let listed = env.ok(&["images", "--json"]);
    assert!(
        listed.contains(first.trim()),
        "img still names the first image: {listed}"
    );
    let err = env.fails(&["import", tar.to_str().unwrap(), "fresh"]);
    assert!(err.contains("fresh"), "{err}");
    assert!(!env.ok(&["images", "-q"]).contains("fresh"));
}

/// `strata version` names the commit; `strata history` lists an image's steps, newest first.
#[test]
fn version_and_history() {
    let env = Env::new();
    let v = env.ok(&["version"]);
    assert!(v.starts_with("strata 0.") && v.contains("(commit "), "{v}");
    import_busybox(&env, "bb");
    let h = env.ok(&["history", "bb"]);
    let lines: Vec<&str> = h.lines().collect();
    assert_eq!(lines.len(), 2, "{h}");
    assert!(
        lines[0].starts_with("CREATED") && lines[1].contains("strata import"),
        "{h}"
    );
    let j: serde_json::Value =
        serde_json::from_str(env.ok(&["history", "bb", "--json"]).trim()).unwrap();
    assert_eq!(j["empty_layer"], false);
    assert!(j["size"].as_u64().unwrap() > 100_000);
    let e = env.fails(&["history", "nope"]);
    assert!(e.contains("no image named `nope:latest`"), "{e}");
}

/// Errors a newcomer meets first say what to do next.
#[test]
fn first_hour_errors_say_what_to_do() {
    let env = Env::new();
    import_busybox(&env, "bb");
    let port = free_port();
    let e = env.fails(&["push", "bb", &format!("ssh://root@127.0.0.1:{port}/app:1")]);
    assert!(
        e.contains(&format!(
            "host `ssh://root@127.0.0.1:{port}`: ssh cannot connect"
        )),
        "{e}"
    );
    assert!(!e.contains("bad digest"), "{e}");
    let e = env.fails(&["push", "bb", &format!("127.0.0.1:{port}/team/bb:1")]);
    assert!(e.contains("hint: nothing answers at that address"), "{e}");
    std::fs::write(env.path("Dockerfile"), "FROM nothere:1\n").unwrap();
    let e = env.fails(&[
        "build",
        "-f",
        env.path("Dockerfile").to_str().unwrap(),
        env.dir.path().to_str().unwrap(),
    ]);
    assert!(e.contains("hint: make the image first"), "{e}");
}

/// `strata rebase`: the app's own layers kept byte for byte on the new base's, the config's
/// inherited parts from the new base, the same layers and Env a rebuild gives; refusals with
/// the reason.
#[test]
fn rebase_moves_an_image_onto_a_new_base_like_a_rebuild() {
    let env = Env::new();
    let root = env.path("rootfs");
    busybox_rootfs(&root);
    tar_dir(&root, &env.path("base1.tar"));
    std::fs::write(root.join("etc/base2"), "2\n").unwrap();
    tar_dir(&root, &env.path("base2.tar"));
    let import = |tar: &str, name: &str, path: &str, label: &str, cmd: &str| {
        env.ok(&[
            "import",
            env.path(tar).to_str().unwrap(),
            name,
            "--change",
            &format!("ENV PATH={path}"),
            "--change",
            &format!("LABEL base={label}"),
            "--change",
            &format!("CMD {cmd}"),
        ]);
    };
    import("base1.tar", "base1", "/old/bin:/bin", "1", r#"["sh"]"#);
    import(
        "base2.tar",
        "base2",
        "/new/bin:/bin",
        "2",
        r#"["sh", "-l"]"#,
    );
    let ctx = env.path("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("app.txt"), "app\n").unwrap();
    let dockerfile = |base: &str, extra: &str| {
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {base}\nCOPY app.txt /app/\nENV APP=1\n{extra}"),
        )
        .unwrap();
    };
    let build = |tag: &str| {
        env.ok(&[
            "build",
            "-f",
            ctx.join("Dockerfile").to_str().unwrap(),
            "-t",
            tag,
            ctx.to_str().unwrap(),
        ]);
    };
    dockerfile("base1", "");
    build("app:1");
    dockerfile("base2", "");
    build("app:rebuilt");
    let inspect = |name: &str| -> serde_json::Value {
        serde_json::from_str(&env.ok(&["inspect", name, "--json"])).unwrap()
    };

    env.ok(&[
        "rebase",
        "app:1",
        "--onto",
        "base2",
        "--old-base",
        "base1",
        "-t",
        "app:2",
    ]);
    let (app1, app2, base2, rebuilt) = (
        inspect("app:1"),
        inspect("app:2"),
        inspect("base2"),
        inspect("app:rebuilt"),
    );
    let layers = |v: &serde_json::Value| v["manifest"]["layers"].as_array().unwrap().clone();
    assert_eq!(layers(&app2)[0], layers(&base2)[0], "the new base's layer");
    assert_eq!(
        layers(&app2)[1..],
        layers(&app1)[1..],
        "the app's own layers, byte for byte"
    );
    assert_eq!(
        app2["config"]["rootfs"]["diff_ids"], rebuilt["config"]["rootfs"]["diff_ids"],
        "the same layers a rebuild gives"
    );
    for field in ["Env", "Cmd", "Labels", "WorkingDir"] {
        assert_eq!(
            app2["config"]["config"][field], rebuilt["config"]["config"][field],
            "{field} as a rebuild gives it"
        );
    }
    assert!(
        app2["config"]["config"]["Env"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("PATH=/new/bin:/bin")),
        "no stale PATH: {app2:#}"
    );
    let annotations = &app2["manifest"]["annotations"];
    assert_eq!(
        annotations["org.opencontainers.image.base.name"],
        "base2:latest"
    );
    assert_eq!(
        annotations["org.opencontainers.image.base.digest"],
        base2["descriptor"]["digest"]
    );
    env.ok(&["validate", "app:2"]);
    // The recorded base is the default old base: rebasing app:2 back needs no --old-base.
    env.ok(&["rebase", "app:2", "--onto", "base1", "-t", "app:back"]);
    assert_eq!(
        inspect("app:back")["config"]["rootfs"]["diff_ids"],
        app1["config"]["rootfs"]["diff_ids"]
    );

    // Refusals: a base the image was not built on; the opt-out label; no recorded base.
    let e = env.fails(&["rebase", "app:1", "--onto", "base2", "--old-base", "base2"]);
    assert!(e.contains("not its first layers"), "{e}");
    // A built image records its base, so --old-base is not needed for it.
    let same = env.ok(&["rebase", "app:1", "--onto", "base2", "-t", "app:3"]);
    assert_eq!(same.trim(), app2["descriptor"]["digest"].as_str().unwrap());
    assert_eq!(
        app1["manifest"]["annotations"]["org.opencontainers.image.base.name"],
        "base1:latest"
    );
    let e = env.fails(&["rebase", "base1", "--onto", "base2"]);
    assert!(
        e.contains("records no base") && e.contains("--old-base"),
        "{e}"
    );
    dockerfile("base1", "LABEL rebase=false\n");
    build("pinned:1");
    let e = env.fails(&[
        "rebase",
        "pinned:1",
        "--onto",
        "base2",
        "--old-base",
        "base1",
    ]);
    assert!(e.contains("rebase=false"), "{e}");
}

/// The human output of the newcomers' commands, as snapshots (digests, times, sizes and the
/// commit filtered out): a change to it is deliberate.
#[test]
fn human_output_snapshots() {
    let env = Env::new();
    import_busybox(&env, "bb");
    env.ok(&["tag", "bb", "bb:2"]);
    let mut settings = insta::Settings::clone_current();
    // In order: the commit first (it may end in -dirty), then what varies per run.
    settings.add_filter(
        r"commit [0-9a-f]+(-dirty)?|commit unknown",
        "commit [commit]",
    );
    settings.add_filter(r"/tmp/\.tmp\w+", "[tmp]");
    settings.add_filter(r"sha256:[0-9a-f]{64}", "sha256:[digest]");
    settings.add_filter(r"\b[0-9a-f]{12}\b", "[short]");
    settings.add_filter(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "[time]");
    settings.add_filter(r"\d+(\.\d+)?(B|kB|MB)\b", "[size]");
    settings.add_filter(r"strata \d+\.\d+\.\d+", "strata [version]");
    settings.bind(|| {
        insta::assert_snapshot!("version", env.ok(&["version"]));
        insta::assert_snapshot!("images", env.ok(&["images"]));
        insta::assert_snapshot!("history", env.ok(&["history", "bb"]));
        insta::assert_snapshot!("ps_empty", env.ok(&["ps"]));
        insta::assert_snapshot!("apps_list_empty", env.ok(&["apps", "list"]));
        insta::assert_snapshot!("inspect", env.ok(&["inspect", "bb"]));
    });
    // A build's plain progress (no RUN, so it needs no runc), durations filtered too.
    std::fs::write(env.path("a.txt"), "a\n").unwrap();
    std::fs::write(
        env.path("Dockerfile"),
        "FROM bb\nCOPY a.txt /a.txt\nENV A=1\nCMD [\"cat\", \"/a.txt\"]\n",
    )
    .unwrap();
    let build = |env: &Env| {
        let out = env.strata(&[
            "build",
            "-f",
            env.path("Dockerfile").to_str().unwrap(),
            "-t",
            "snap:1",
            "--progress",
            "plain",
            env.dir.path().to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    settings.add_filter(r"\d+\.\d+s\b", "[secs]");
    // The content tag is the build's key, which the base's (time-stamped) digest feeds.
    settings.add_filter(r"strata-[0-9a-f]{16}", "strata-[key]");
    settings.bind(|| {
        insta::assert_snapshot!("build_plain_first", build(&env));
        insta::assert_snapshot!("build_plain_cached", build(&env));
    });
}

/// `--progress json` prints one event per line and nothing else on stderr, for push and pull
/// as for builds and deploys (docs/cli.md's schema): each blob's end, then the summary.
#[test]
fn push_and_pull_report_json_events_only() {
    let env = Env::new();
    let digest = import_busybox(&env, "bb:1");
    let registry = Registry::start(&env);
    let dest = format!("127.0.0.1:{}/team/bb:1", registry.port);
    let events = |args: &[&str], store: &std::path::Path| -> Vec<serde_json::Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(store)
            .args(args)
            .args(["--progress", "json"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    };
    let pushed = events(&["push", "bb:1", &dest], &env.store());
    let kind = |e: &serde_json::Value| e["event"].as_str().unwrap_or_default().to_string();
    let done_blobs = pushed
        .iter()
        .filter(|e| kind(e) == "blob" && e["state"] == "done")
        .count();
    // busybox: one layer and the config; the manifest is not a blob event.
    assert_eq!(done_blobs, 2, "{pushed:?}");
    let summary = pushed.last().unwrap();
    assert_eq!(kind(summary), "pushed", "{pushed:?}");
    assert_eq!(summary["sent"], 2);
    assert_eq!(summary["present"], 0);
    assert!(
        summary["image"].as_str().unwrap().contains("/team/bb"),
        "{summary}"
    );

    let other = Env::new();
    let pulled = events(&["pull", &dest], &other.store());
    let summary = pulled.last().unwrap();
    assert_eq!(kind(summary), "pulled", "{pulled:?}");
    assert_eq!(summary["fetched"], 2);
    assert!(summary.get("host").is_none());
    assert!(other.ok(&["inspect", &dest]).contains(&digest[7..19]));
}
