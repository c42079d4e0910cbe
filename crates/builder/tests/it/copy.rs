//! COPY/ADD and config steps (no container needed): destination semantics, metadata, the
//! cache, and the pinned cache keys of a fixture.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

use strata_build::BuildOptions;

use crate::common::*;
use strata_test_support::is_root;

fn chmod(p: &std::path::Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for (p, c) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(c.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, p, c.as_bytes()).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn copy_follows_docker_destination_rules() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("a.txt", "a"),
            ("dir/b.txt", "b"),
            ("dir/x.md", "md"),
            ("dir/sub/c.txt", "c"),
            (
                "Dockerfile",
                "FROM scratch\n\
                 WORKDIR /w\n\
                 COPY a.txt .\n\
                 COPY a.txt /renamed\n\
                 COPY dir /d\n\
                 COPY dir/*.txt /g/\n\
                 COPY --chmod=0700 --chown=1000:1001 a.txt /o/\n\
                 COPY --parents dir/sub/c.txt /p/\n\
                 COPY --exclude=*.md dir /e/\n\
                 ADD arch.tar.gz /x/\n\
                 COPY <<EOF /h.txt\nhello\nEOF\n\
                 CMD [\"/bin/sh\"]\n",
            ),
        ],
    );
    std::fs::write(ctx.path().join("arch.tar.gz"), tar_gz(&[("in/t.txt", "t")])).unwrap();
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["copytest".into()];
    let (out, _) = build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "copytest");
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("w/a.txt"), "a");
    assert_eq!(read("renamed"), "a");
    assert_eq!(read("d/b.txt"), "b");
    assert_eq!(read("d/sub/c.txt"), "c");
    assert!(
        !root.join("d/dir").exists(),
        "a directory's contents are copied"
    );
    assert_eq!(read("g/b.txt"), "b");
    assert!(!root.join("g/x.md").exists());
    assert_eq!(read("p/dir/sub/c.txt"), "c");
    assert!(root.join("e/b.txt").exists());
    assert!(!root.join("e/x.md").exists(), "--exclude");
    assert_eq!(read("x/in/t.txt"), "t", "ADD extracts local archives");
    assert_eq!(read("h.txt"), "hello\n");
    let md = std::fs::metadata(root.join("o/a.txt")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o700);
    assert_eq!((md.uid(), md.gid()), (1000, 1001));
    let md = std::fs::metadata(root.join("w/a.txt")).unwrap();
    assert_eq!((md.uid(), md.gid()), (0, 0), "context files belong to root");
    assert_eq!(md.mtime(), 0, "copied files get the fixed epoch");
    let cfg = config_of(&store, &out);
    let c = cfg.config.unwrap();
    assert_eq!(c.working_dir.as_deref(), Some("/w"));
    assert_eq!(c.cmd, Some(vec!["/bin/sh".to_string()]));
    let hist = cfg.history.unwrap();
    assert_eq!(hist.len(), 11);
    assert_eq!(hist[0].created_by.as_deref(), Some("WORKDIR /w"));
    assert!(
        !hist[0].is_empty_layer(),
        "WORKDIR creates a missing directory in a layer of its own, like BuildKit"
    );
    assert!(!hist[1].is_empty_layer());
    assert_eq!(
        hist.iter().filter(|h| !h.is_empty_layer()).count(),
        cfg.rootfs.diff_ids.len()
    );
    assert_eq!(cfg.created.as_deref(), Some("1970-01-01T00:00:00Z"));
}

#[test]
fn chown_names_resolve_in_the_target_image_and_copy_from_stage() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("a.txt", "a"),
            (
                "Dockerfile",
                "FROM busybox AS one\nCOPY --chown=app a.txt /one/\n\
                 FROM scratch\nCOPY --from=one /one/a.txt /copied\nCOPY --from=busybox /etc/passwd /passwd\n",
            ),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["fromtest".into()];
    let (out, _) = build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "fromtest");
    let md = std::fs::metadata(root.join("copied")).unwrap();
    assert_eq!(
        (md.uid(), md.gid()),
        (1000, 1000),
        "owner kept from the stage"
    );
    assert!(
        std::fs::read_to_string(root.join("passwd"))
            .unwrap()
            .contains("app:x:1000")
    );
    assert_eq!(config_of(&store, &out).rootfs.diff_ids.len(), 2);
}

#[test]
fn unchanged_inputs_are_cached_and_keys_are_pinned() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("a.txt", "a"),
            ("dir/b.txt", "b"),
            ("ignored.log", "x"),
            (".dockerignore", "*.log\n"),
            (
                "Dockerfile",
                "FROM scratch\nARG V=1\nENV X=$V\nWORKDIR /app\nCOPY a.txt .\nCOPY . /all/\nLABEL l=$X\n",
            ),
        ],
    );
    for p in [
        "a.txt",
        "dir/b.txt",
        "ignored.log",
        ".dockerignore",
        "Dockerfile",
    ] {
        chmod(&ctx.path().join(p), 0o644);
    }
    chmod(&ctx.path().join("dir"), 0o755);
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["keys".into()];
    let (first, _) = build_ok(&store, &opts);
    // The keys are an on-disk format: this literal changes only on purpose (last: WORKDIR
    // steps are keyed as the mkdir layer they now make).
    assert_eq!(
        first.cache_key,
        "41dab5ed359ed765f0b0bd2ae4ca6224d17c751c08f25e7b050d8015d0fc40c0"
    );
    assert_eq!(
        first.content_tag,
        format!("keys:strata-{}", &first.cache_key[..16])
    );

    let (second, events) = build_ok(&store, &opts);
    assert_eq!(second.steps_run, 0, "{events:#?}");
    assert_eq!(
        second.descriptor, first.descriptor,
        "same inputs, same image"
    );

    // An ignored file does not matter.
    std::fs::write(ctx.path().join("ignored.log"), "changed").unwrap();
    let (third, _) = build_ok(&store, &opts);
    assert_eq!(third.steps_run, 0);

    // A copied file does: that COPY and what follows rerun, and explain names the file.
    std::fs::write(ctx.path().join("dir/b.txt"), "changed").unwrap();
    opts.explain = true;
    let (fourth, events) = build_ok(&store, &opts);
    assert_eq!(ran(&events), ["COPY . /all/", "LABEL l=$X"]);
    assert!(
        fourth.explanations[0]
            .1
            .contains("file `dir/b.txt` changed"),
        "{:?}",
        fourth.explanations
    );
    assert_ne!(fourth.descriptor, first.descriptor);

    // A build arg changes the ENV that uses it.
    opts.build_args.insert("V".into(), "2".into());
    let (_, events) = build_ok(&store, &opts);
    assert_eq!(ran(&events).first().map(String::as_str), Some("ENV X=$V"));

    // --no-cache reruns everything.
    opts.no_cache = true;
    let (nc, _) = build_ok(&store, &opts);
    assert_eq!(nc.steps_cached, 0);
}

#[test]
fn unknown_base_and_target_are_clear_errors() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "# c\nFROM nosuch:1\nRUN true\n")],
    );
    // Not in the store, so it is pulled from Docker Hub, which is not reachable from the
    // tests: the error names the line, the image and the registry.
    let mut opts = BuildOptions::new(ctx.path());
    opts.pull.client.max_attempts = 1;
    let err = strata_build::build(&store, &opts, &strata_build::NoProgress)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Dockerfile:2"), "{err}");
    assert!(
        err.contains(
            "image `docker.io/library/nosuch:1` is not in the store and pulling it from docker.io failed"
        ),
        "{err}"
    );
    assert!(store.get_ref("nosuch:1").unwrap().is_none());
    let mut opts = BuildOptions::new(ctx.path());
    opts.target = Some("nope".into());
    let err = strata_build::build(&store, &opts, &strata_build::NoProgress).unwrap_err();
    assert!(
        err.to_string().contains("target stage `nope` not found"),
        "{err}"
    );
}

/// Serves `body` over HTTP on 127.0.0.1; returns the URL and a request counter.
fn serve(body: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (format!("http://{addr}/files/tool.sh"), hits)
}

#[test]
fn add_url_with_checksum_is_cached_without_download() {
    let (_d, store) = store_with_busybox();
    let (url, hits) = serve("echo tool\n");
    let sum = strata_oci::Digest::sha256(b"echo tool\n");
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!("FROM scratch\nADD --checksum={sum} {url} /opt/\nADD {url} /unchecked.sh\n"),
        )],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["urltest".into()];
    let (first, _) = build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "urltest");
    assert_eq!(
        std::fs::read_to_string(root.join("opt/tool.sh")).unwrap(),
        "echo tool\n"
    );
    let md = std::fs::metadata(root.join("unchecked.sh")).unwrap();
    assert_eq!(
        md.mode() & 0o7777,
        0o600,
        "downloaded files are 0600 like Docker's"
    );
    let before = hits.load(std::sync::atomic::Ordering::SeqCst);
    let (second, events) = build_ok(&store, &opts);
    assert_eq!(second.steps_run, 0);
    assert_eq!(second.descriptor, first.descriptor);
    // Only the URL without checksum was fetched again (its content is its key).
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst) - before, 1);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, strata_build::Event::StepCached { step }
            if step.index == 1 && step.text.starts_with("ADD --checksum"))),
        "{events:?}"
    );

    // A wrong checksum is refused.
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!(
                "FROM scratch\nADD --checksum=sha256:{} {url} /x\n",
                "0".repeat(64)
            ),
        )],
    );
    let err = strata_build::build(&store, &opts, &strata_build::NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains("Dockerfile:2"),
        "{err}"
    );
}

#[test]
fn onbuild_triggers_run_in_the_child_and_deployment_tags() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("a.txt", "from the child's context"),
            (
                "Dockerfile",
                "FROM scratch\nONBUILD COPY a.txt /onbuild.txt\nENV BASE=1\n",
            ),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["parent".into()];
    let (parent, _) = build_ok(&store, &opts);
    let pc = config_of(&store, &parent).config.unwrap();
    assert_eq!(
        pc.on_build,
        Some(vec!["COPY a.txt /onbuild.txt".to_string()])
    );
    assert!(config_of(&store, &parent).rootfs.diff_ids.is_empty());

    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM parent\nENV CHILD=$BASE\n")],
    );
    opts.tags = vec!["child".into()];
    opts.deployment_tag = true;
    let (child, _) = build_ok(&store, &opts);
    let cfg = config_of(&store, &child);
    let c = cfg.config.unwrap();
    assert_eq!(c.on_build, None, "triggers are not inherited further");
    assert!(c.env.unwrap().contains(&"CHILD=1".to_string()));
    assert_eq!(cfg.rootfs.diff_ids.len(), 1);
    let (_g, root) = umoci_unpack(&store, "child");
    assert_eq!(
        std::fs::read_to_string(root.join("onbuild.txt")).unwrap(),
        "from the child's context"
    );
    let dep = child.deployment_tag.clone().unwrap();
    assert!(dep.starts_with("child:deployment-"), "{dep}");
    assert_eq!(store.get_ref(&dep).unwrap(), Some(child.descriptor.clone()));
    assert!(child.tags.contains(&"child:latest".to_string()));
    assert!(child.tags.contains(&child.content_tag));
}

/// Docker's config rules at FROM and for EXPOSE/MAINTAINER, and its warning for build args
/// no ARG takes.
#[test]
fn config_gets_default_path_port_ranges_author_and_unused_arg_warning() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM scratch\n\
             ARG USED\n\
             MAINTAINER Jane Doe <jane@example.com>\n\
             ENV PATH=/opt/bin:$PATH\n\
             EXPOSE 8000-8002 9000/UDP\n",
        )],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["cfg".into()];
    for (k, v) in [("USED", "1"), ("UNUSED", "2"), ("HTTP_PROXY", "http://p")] {
        opts.build_args.insert(k.into(), v.into());
    }
    let (out, events) = build_ok(&store, &opts);
    let cfg = config_of(&store, &out);
    assert_eq!(cfg.author.as_deref(), Some("Jane Doe <jane@example.com>"));
    let c = cfg.config.unwrap();
    assert_eq!(c.labels, None, "MAINTAINER is no label");
    assert_eq!(
        c.env.unwrap(),
        ["PATH=/opt/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "the default PATH is in the stage's env at FROM"
    );
    let ports: Vec<String> = c.exposed_ports.unwrap().into_keys().collect();
    assert_eq!(ports, ["8000/tcp", "8001/tcp", "8002/tcp", "9000/udp"]);
    let warnings: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            strata_build::Event::Warning { message } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(
        warnings,
        ["one or more build-args [UNUSED] were not consumed"],
        "{events:#?}"
    );
}

/// On a merged-/usr base (`/lib -> usr/lib`), COPY, ADD and WORKDIR write through the
/// image's symlinks as Docker does, instead of hiding `/usr/lib` behind a real `lib/`.
#[test]
fn destinations_resolve_through_the_image_symlinks() {
    let (_d, store) = store_with_busybox();
    crate::common::images::import_merged_usr(&store);
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("a.txt", "a"),
            ("entrypoint.sh", "#!/bin/sh\n"),
            (
                "Dockerfile",
                "FROM merged\n\
                 COPY a.txt /lib/x/\n\
                 COPY entrypoint.sh /bin/\n\
                 ADD app.tar.gz /lib/\n\
                 WORKDIR /lib/app\n\
                 COPY a.txt rel.txt\n\
                 USER app\n\
                 WORKDIR /home/app/work\n",
            ),
        ],
    );
    std::fs::write(
        ctx.path().join("app.tar.gz"),
        tar_gz(&[("libapp.so", "elf")]),
    )
    .unwrap();
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["merged-app".into()];
    let (out, _) = build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "merged-app");
    for link in ["lib", "bin"] {
        let md = std::fs::symlink_metadata(root.join(link)).unwrap();
        assert!(md.file_type().is_symlink(), "/{link} is still a symlink");
    }
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("usr/lib/x/a.txt"), "a");
    assert_eq!(read("usr/bin/entrypoint.sh"), "#!/bin/sh\n");
    assert_eq!(read("usr/lib/libapp.so"), "elf");
    assert_eq!(read("usr/lib/app/rel.txt"), "a");
    assert!(root.join("usr/bin/busybox").exists());
    // WORKDIR under USER: made by and for that user, missing parents included (BuildKit).
    for d in ["home", "home/app", "home/app/work"] {
        let md = std::fs::symlink_metadata(root.join(d)).unwrap();
        assert!(md.is_dir(), "{d}");
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (1000, 1000, 0o755),
            "{d}"
        );
    }
    let c = config_of(&store, &out).config.unwrap();
    assert_eq!(
        c.working_dir.as_deref(),
        Some("/home/app/work"),
        "the config keeps the path as written"
    );
}

#[test]
fn hardlinks_stay_linked_pipes_and_devices_are_copied_and_sockets_left_out() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("d/one", "same"),
            ("Dockerfile", "FROM scratch\nCOPY d /d/\n"),
        ],
    );
    std::fs::hard_link(ctx.path().join("d/one"), ctx.path().join("d/two")).unwrap();
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["links".into()];
    build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "links");
    let one = std::fs::metadata(root.join("d/one")).unwrap();
    let two = std::fs::metadata(root.join("d/two")).unwrap();
    assert_eq!(one.ino(), two.ino(), "one file, two names");
    assert_eq!(one.nlink(), 2);

    let fifo = ctx.path().join("d/pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // A device node (root only) and a socket too.
    let device = is_root()
        && std::process::Command::new("mknod")
            .args(["-m", "0620"])
            .arg(ctx.path().join("d/null"))
            .args(["c", "1", "3"])
            .status()
            .unwrap()
            .success();
    let _socket = std::os::unix::net::UnixListener::bind(ctx.path().join("d/sock")).unwrap();
    // As Docker's builder copies them (a tar of the context): the pipe and the device made in
    // the layer as what they are, never opened (opening the pipe would wait for a writer
    // forever), the socket left out.
    build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "links");
    let pipe = std::fs::symlink_metadata(root.join("d/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo(), "{pipe:?}");
    assert!(!root.join("d/sock").exists(), "sockets are left out");
    if device {
        let null = std::fs::symlink_metadata(root.join("d/null")).unwrap();
        assert!(null.file_type().is_char_device(), "{null:?}");
        assert_eq!(null.rdev(), std::fs::metadata("/dev/null").unwrap().rdev());
        assert_eq!(null.mode() & 0o7777, 0o620);
    } else {
        eprintln!("NOT RUN: the device node part needs root");
    }
}

/// Planning and applying ENV costs about the same per variable however many there are: one
/// ENV of 40,000 pairs, and one with a 2 MB value, build in a few seconds (a debug build took
/// 23 s for the first and never finished the second when every variable was a scan).
#[test]
fn huge_env_builds_in_linear_time() {
    let (_d, store) = store_with_busybox();
    let n = 40_000;
    let mut pairs = String::new();
    for i in 0..n {
        pairs.push_str(&format!(" K{i}=v{i}"));
    }
    let big = "x".repeat(2 << 20);
    for (tag, dockerfile) in [
        (
            "manyenv",
            format!("FROM scratch\nENV{pairs}\nENV K7=again\n"),
        ),
        (
            "bigenv",
            format!("FROM scratch\nENV BIG={big}\nENV AFTER=$BIG\n"),
        ),
    ] {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::write(ctx.path().join("Dockerfile"), &dockerfile).unwrap();
        let mut opts = BuildOptions::new(ctx.path());
        opts.tags = vec![tag.into()];
        let started = std::time::Instant::now();
        let (out, _) = build_ok(&store, &opts);
        let took = started.elapsed();
        eprintln!("{tag}: built in {took:?}");
        assert!(
            took < std::time::Duration::from_secs(10),
            "{tag}: the build took {took:?}"
        );
        let env = config_of(&store, &out).config.unwrap().env.unwrap();
        if tag == "manyenv" {
            // Docker's order: the default PATH first, then each variable where it was first
            // set, a later ENV replacing the value in place.
            assert_eq!(env.len(), n + 1);
            assert!(env[0].starts_with("PATH="));
            assert_eq!(env[1], "K0=v0");
            assert_eq!(env[8], "K7=again");
            assert_eq!(env[n], format!("K{}=v{}", n - 1, n - 1));
        } else {
            // Compared without printing 2 MB on failure.
            assert_eq!(env.len(), 3);
            assert!(env[1] == format!("BIG={big}"), "BIG is the 2 MB value");
            assert!(env[2] == format!("AFTER={big}"), "AFTER is $BIG expanded");
        }
    }
}

/// Appends one tar entry to `b`: a file (`link` empty) or a symlink to `link`.
fn tar_entry(b: &mut tar::Builder<Vec<u8>>, path: &str, link: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(if link.is_empty() { 0o644 } else { 0o777 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    if link.is_empty() {
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        b.append_data(&mut h, path, &b"f"[..]).unwrap();
    } else {
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, path, link).unwrap();
    }
}

/// One resolution rule, and never the host's metadata: an image whose lower layer has
/// `x -> <a host directory's parent>` and whose upper layer has only `x/hostdir/f` (its
/// parents implied). Unpacking the upper layer follows the lower symlink inside the image,
/// as Docker and `strata unpack` do, and a later COPY to `/x/hostdir/g` lands in the image's
/// own `<parent>/hostdir`: no layer records the host directory's mode (0712) or owner (4321),
/// which the snapshot used to copy from the host and the COPY layer then recorded.
#[test]
fn lower_layer_symlinks_resolve_inside_the_image_never_onto_the_host() {
    if !rustix::process::geteuid().is_root() {
        strata_test_support::skip(
            "lower_layer_symlinks_resolve_inside_the_image_never_onto_the_host needs root to give \
             the host directory an owner",
        );
        return;
    }
    let (_d, store) = store_with_busybox();
    let host = tempfile::tempdir().unwrap();
    let hostdir = host.path().join("hostdir");
    std::fs::create_dir(&hostdir).unwrap();
    std::os::unix::fs::chown(&hostdir, Some(4321), Some(4321)).unwrap();
    chmod(&hostdir, 0o712);
    let host_abs = host.path().to_str().unwrap().to_string();

    // A docker-archive of two layers, loaded as `xlink:1`.
    let mut layers = Vec::new();
    for entries in [vec![("x", host_abs.as_str())], vec![("x/hostdir/f", "")]] {
        let mut b = tar::Builder::new(Vec::new());
        for (p, l) in entries {
            tar_entry(&mut b, p, l);
        }
        layers.push(b.into_inner().unwrap());
    }
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| strata_oci::Digest::sha256(l).to_string())
        .collect();
    let config = serde_json::json!({
        "architecture": strata_oci::Platform::host().architecture,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let mut archive = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        archive.append_data(&mut h, name, bytes).unwrap();
    };
    add("config.json", config.as_bytes());
    add("l1.tar", &layers[0]);
    add("l2.tar", &layers[1]);
    let manifest = serde_json::json!([{
        "Config": "config.json", "RepoTags": ["xlink:1"], "Layers": ["l1.tar", "l2.tar"],
    }])
    .to_string();
    add("manifest.json", manifest.as_bytes());
    let archive_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(archive_file.path(), archive.into_inner().unwrap()).unwrap();
    strata_transfer::load_archive(&store, archive_file.path()).unwrap();

    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("g", "g"),
            ("Dockerfile", "FROM xlink:1\nCOPY g /x/hostdir/g\n"),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["xlinkcopy".into()];
    build_ok(&store, &opts);

    // Every entry of every layer of the result.
    let img = store.image("xlinkcopy:latest").unwrap();
    let mut entries = Vec::new();
    let mut copy_layer = Vec::new();
    for l in &img.manifest.layers {
        copy_layer.clear();
        let blob = store.read_blob(&l.digest).unwrap();
        let compression = strata_rootfs::sniff_compression(&blob);
        let plain = strata_rootfs::decompress(blob.as_slice(), compression).unwrap();
        let mut t = tar::Archive::new(plain);
        for e in t.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            entries.push((path.clone(), h.mode().unwrap() & 0o7777, h.uid().unwrap()));
            copy_layer.push(path);
        }
    }
    let from_host: Vec<_> = entries
        .iter()
        .filter(|(_, mode, uid)| *mode == 0o712 || *uid == 4321)
        .collect();
    assert!(
        from_host.is_empty(),
        "layers record the host directory's metadata: {from_host:?}"
    );
    let inside = format!("{}/hostdir/g", host_abs.trim_start_matches('/'));
    assert!(
        copy_layer.contains(&inside),
        "COPY follows the lower layer's symlink inside the image to `{inside}`: {copy_layer:?}"
    );
    assert!(
        !copy_layer.iter().any(|p| p.starts_with("x/")),
        "COPY writes nothing below the symlink `x`: {copy_layer:?}"
    );
}

/// `--explain` names a changed `from_cache_version` (it said "an earlier step changed").
#[test]
fn explain_names_a_changed_from_cache_version() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("a.txt", "a"),
            ("Dockerfile", "FROM busybox\nCOPY a.txt /\n"),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["fcv".into()];
    build_ok(&store, &opts);
    opts.from_cache_version = Some("2".into());
    opts.explain = true;
    let (out, _) = build_ok(&store, &opts);
    assert_eq!(out.steps_run, 1);
    assert!(
        out.explanations[0]
            .1
            .contains("from_cache_version changed unset→2"),
        "{:?}",
        out.explanations
    );
}

/// The per-file hashes `--explain` compares are kept out of the build record (a no-op build
/// compares records and so would read them all), and survive builds where the COPY hit.
#[test]
fn explain_names_a_changed_file_after_builds_where_the_copy_hit() {
    let (_d, store) = store_with_busybox();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            ("a.txt", "a"),
            ("b.txt", "b"),
            (
                "Dockerfile",
                "FROM busybox\nARG V=1\nCOPY . /app/\nLABEL v=$V\n",
            ),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["perfile".into()];
    build_ok(&store, &opts);
    // Only the LABEL after the COPY changes: the record changes, the COPY hits.
    opts.build_args.insert("V".into(), "2".into());
    let (out, events) = build_ok(&store, &opts);
    assert_eq!(ran(&events), ["LABEL v=$V"], "{out:?}");
    let name = strata_oci::Reference::parse_local("perfile")
        .unwrap()
        .name();
    let record = store
        .cache_get(&format!("strata-build/1/explain/{name}"))
        .unwrap()
        .expect("a build record");
    assert!(
        !record.contains("a.txt"),
        "per-file hashes are not in the record: {record}"
    );
    let files = store
        .cache_get(&format!("strata-build/1/explain-files/{name}"))
        .unwrap()
        .expect("a per-file record");
    assert!(
        files.contains("a.txt") && files.contains("b.txt"),
        "{files}"
    );

    std::fs::write(ctx.path().join("b.txt"), "changed").unwrap();
    opts.explain = true;
    let (out, _) = build_ok(&store, &opts);
    assert_eq!(out.steps_run, 2);
    let reason = &out.explanations[0].1;
    assert!(reason.contains("file `b.txt` changed"), "{reason}");
    assert!(!reason.contains("a.txt"), "{reason}");

    // The per-file record gone (as after a build of an earlier strata version's store with
    // the step from a shared cache): the COPY's overall hash still says files changed.
    store
        .cache_remove(&format!("strata-build/1/explain-files/{name}"))
        .unwrap();
    std::fs::write(ctx.path().join("a.txt"), "changed too").unwrap();
    let (out, _) = build_ok(&store, &opts);
    let reason = &out.explanations[0].1;
    assert!(reason.contains("the files it reads changed"), "{reason}");
}
