//! RUN steps in runc (root and runc needed; skipped loudly otherwise).

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use strata_build::{BuildOptions, Error, NoProgress, build};

use crate::common::*;

#[test]
fn run_copy_env_cmd_then_cached_then_incremental() {
    let Some((_d, store, ctx)) = run_lab("run_copy_env_cmd_then_cached_then_incremental") else {
        return;
    };
    write_files(
        ctx.path(),
        &[
            ("app.txt", "v1"),
            (
                "Dockerfile",
                "FROM busybox\nRUN echo hello > /file && rm /bin/vi\nCOPY app.txt /app/\nENV A=1\nUSER app\nRUN id -u > /tmp/uid && echo \"A=$A\" > /tmp/env\nCMD [\"cat\", \"/file\"]\n",
            ),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["runtest".into()];
    let (first, _) = build_ok(&store, &opts);
    assert_eq!(first.steps_run, 6);
    let (_g, root) = umoci_unpack(&store, "runtest");
    assert_eq!(
        std::fs::read_to_string(root.join("file")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("app/app.txt")).unwrap(),
        "v1"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("tmp/uid")).unwrap(),
        "1000\n"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("tmp/env")).unwrap(),
        "A=1\n"
    );
    assert_eq!(std::fs::metadata(root.join("tmp/uid")).unwrap().uid(), 1000);
    assert!(!root.join("bin/vi").exists(), "RUN rm is a whiteout");
    assert!(root.join("bin/sh").exists());
    assert!(
        !root.join("proc").exists() && !root.join("etc/resolv.conf").exists(),
        "runc's mount points are not in the layer"
    );
    let cfg = config_of(&store, &first).config.unwrap();
    assert_eq!(cfg.cmd, Some(vec!["cat".to_string(), "/file".to_string()]));
    assert_eq!(cfg.user.as_deref(), Some("app"));
    assert!(cfg.env.unwrap().contains(&"A=1".to_string()));

    let (second, events) = build_ok(&store, &opts);
    assert_eq!(second.steps_run, 0, "{events:#?}");
    assert_eq!(second.descriptor, first.descriptor);

    std::fs::write(ctx.path().join("app.txt"), "v2").unwrap();
    opts.explain = true;
    let (third, events) = build_ok(&store, &opts);
    assert_eq!(
        ran(&events),
        [
            "COPY app.txt /app/",
            "ENV A=1",
            "USER app",
            "RUN id -u > /tmp/uid && echo \"A=$A\" > /tmp/env",
            "CMD [\"cat\", \"/file\"]"
        ]
    );
    assert!(
        third.explanations[0].1.contains("file `app.txt` changed"),
        "{:?}",
        third.explanations
    );
    assert!(events.iter().any(
        |e| matches!(e, strata_build::Event::Explain { reason, .. } if reason.contains("app.txt"))
    ));
}

#[test]
fn build_arg_used_by_run_misses_only_that_run() {
    let Some((_d, store, ctx)) = run_lab("build_arg_used_by_run_misses_only_that_run") else {
        return;
    };
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox\nRUN echo base > /base\nARG VERSION=1\nRUN echo $VERSION > /v\n",
        )],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["argtest".into()];
    build_ok(&store, &opts);
    opts.build_args.insert("VERSION".into(), "2".into());
    let (out, events) = build_ok(&store, &opts);
    assert_eq!(ran(&events), ["RUN echo $VERSION > /v"]);
    assert!(
        out.explanations[0].1.contains("ARG VERSION changed 1→2"),
        "{:?}",
        out.explanations
    );
    let (_g, root) = umoci_unpack(&store, "argtest");
    assert_eq!(std::fs::read_to_string(root.join("v")).unwrap(), "2\n");
}

/// A RUN's bind mount of context files is an input like a COPY's: a change of a mounted file
/// reruns the step, and `--explain` names that file, also after a build where the RUN hit.
#[test]
fn explain_names_a_changed_file_a_run_mounts() {
    let Some((_d, store, ctx)) = run_lab("explain_names_a_changed_file_a_run_mounts") else {
        return;
    };
    write_files(
        ctx.path(),
        &[
            ("a.txt", "a1"),
            ("b.txt", "b1"),
            (
                "Dockerfile",
                "FROM busybox\nRUN --mount=type=bind,target=/ctx cat /ctx/a.txt /ctx/b.txt > /both\n\
                 ARG V=1\nLABEL v=$V\n",
            ),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["bindexplain".into()];
    build_ok(&store, &opts);
    opts.build_args.insert("V".into(), "2".into());
    let (_, events) = build_ok(&store, &opts);
    assert_eq!(ran(&events), ["LABEL v=$V"]);
    std::fs::write(ctx.path().join("b.txt"), "b2").unwrap();
    opts.explain = true;
    let (out, events) = build_ok(&store, &opts);
    assert_eq!(
        ran(&events).first().map(String::as_str),
        Some("RUN --mount=type=bind,target=/ctx cat /ctx/a.txt /ctx/b.txt > /both")
    );
    let reason = &out.explanations[0].1;
    assert!(reason.contains("file `b.txt` changed"), "{reason}");
    assert!(!reason.contains("a.txt"), "{reason}");
    let (_g, root) = umoci_unpack(&store, "bindexplain");
    assert_eq!(std::fs::read_to_string(root.join("both")).unwrap(), "a1b2");
}

#[test]
fn multi_stage_builds_only_what_the_target_needs() {
    let Some((_d, store, ctx)) = run_lab("multi_stage_builds_only_what_the_target_needs") else {
        return;
    };
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox AS build\nRUN echo compiled > /out\n\
             FROM busybox AS other\nRUN echo other > /other\n\
             FROM busybox AS unused\nRUN exit 1\n\
             FROM busybox AS final\nCOPY --from=build /out /app/out\nCOPY --from=other /other /app/\n\
             FROM final AS child\nRUN cat /app/out /app/other > /both\n",
        )],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["multi".into()];
    let (out, _) = build_ok(&store, &opts);
    assert_eq!(out.steps_run, 5, "the unused stage is not built");
    let (_g, root) = umoci_unpack(&store, "multi");
    assert_eq!(
        std::fs::read_to_string(root.join("both")).unwrap(),
        "compiled\nother\n"
    );
    opts.target = Some("build".into());
    opts.tags = vec!["multi-build".into()];
    let (out, _) = build_ok(&store, &opts);
    assert_eq!(out.steps_run, 0);
}

#[test]
fn run_failure_names_line_exit_code_and_output() {
    let Some((_d, store, ctx)) = run_lab("run_failure_names_line_exit_code_and_output") else {
        return;
    };
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox\nRUN echo first-line; echo last-line; exit 3\n",
        )],
    );
    let err = build(&store, &BuildOptions::new(ctx.path()), &NoProgress).unwrap_err();
    match &err {
        Error::RunFailed {
            exit_code, tail, ..
        } => {
            assert_eq!(*exit_code, 3);
            assert!(tail.contains("last-line"), "{tail}");
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("Dockerfile:2"), "{msg}");
    assert!(msg.contains("exit code 3"), "{msg}");
    assert!(msg.contains("RUN echo first-line"), "{msg}");
}

#[test]
fn cache_mount_persists_and_secret_stays_out_of_layers() {
    let Some((_d, store, ctx)) = run_lab("cache_mount_persists_and_secret_stays_out_of_layers")
    else {
        return;
    };
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox\nARG N=1\n\
             RUN --mount=type=cache,target=/cache echo $N >> /cache/log && cp /cache/log /seen\n\
             RUN --mount=type=secret,id=tok test \"$(cat /run/secrets/tok)\" = s3cret-value && cp /run/secrets/tok /tmp/leak-check-$(wc -c < /run/secrets/tok) && rm /tmp/leak-check-*\n\
             RUN --mount=type=tmpfs,target=/scratch echo tmp > /scratch/x && ls /scratch > /listing\n",
        )],
    );
    let secret = ctx.path().join("secret.txt");
    std::fs::write(&secret, "s3cret-value").unwrap();
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["mounts".into()];
    opts.secrets.insert("tok".into(), secret.clone());
    build_ok(&store, &opts);
    opts.build_args.insert("N".into(), "2".into());
    let (out, _) = build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "mounts");
    assert_eq!(
        std::fs::read_to_string(root.join("seen")).unwrap(),
        "1\n2\n",
        "cache mount kept"
    );
    assert!(
        !root.join("cache").exists(),
        "cache mount point not in the layer"
    );
    assert!(
        !root.join("run/secrets").exists(),
        "secret mount point not in the layer"
    );
    assert!(!root.join("scratch").exists());
    assert_eq!(
        std::fs::read_to_string(root.join("listing")).unwrap(),
        "x\n"
    );
    // No blob of the image holds the secret.
    let m: strata_oci::Manifest =
        serde_json::from_slice(&store.read_blob(&out.descriptor.digest).unwrap()).unwrap();
    for l in &m.layers {
        let mut tar = Vec::new();
        let blob = store.read_blob(&l.digest).unwrap();
        std::io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(blob.as_slice()),
            &mut tar,
        )
        .unwrap();
        assert!(
            !tar.windows(12).any(|w| w == b"s3cret-value"),
            "secret in layer {}",
            l.digest
        );
    }
    // The key holds the secret's id only: new content, same cache.
    std::fs::write(&secret, "s3cret-value").unwrap();
    let (again, _) = build_ok(&store, &opts);
    assert_eq!(again.steps_run, 0);
    // A required secret that is missing is a clear error.
    opts.secrets.clear();
    opts.no_cache = true;
    let err = build(&store, &opts, &NoProgress).unwrap_err().to_string();
    assert!(
        err.contains("/run/secrets/tok") || err.contains("exit code"),
        "{err}"
    );
}

/// What a tree holds, entry by entry, as a layer can record it (mtime in whole seconds, no
/// overlayfs bookkeeping xattrs but the opaque marker).
fn tree(root: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mut xattrs: Vec<String> = xattr::list(&p)
                .unwrap()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| !n.contains("overlay.") || n.ends_with("overlay.opaque"))
                .map(|n| format!("{n}={:?}", xattr::get(&p, &n).unwrap()))
                .collect();
            xattrs.sort();
            let whiteout = md.file_type().is_char_device() && md.rdev() == 0;
            let what = if md.is_file() {
                let bytes = std::fs::read(&p).unwrap();
                let fnv = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
                });
                format!("{} bytes {fnv:x}", bytes.len())
            } else if md.file_type().is_symlink() {
                std::fs::read_link(&p).unwrap().display().to_string()
            } else {
                String::new()
            };
            out.insert(
                p.strip_prefix(root).unwrap().display().to_string(),
                format!(
                    "mode {:o} uid {} gid {} nlink {} rdev {} mtime {} {xattrs:?} {what}",
                    md.mode(),
                    md.uid(),
                    md.gid(),
                    if md.is_dir() { 0 } else { md.nlink() },
                    md.rdev(),
                    // A whiteout's own mtime is never seen through the overlay.
                    if whiteout { 0 } else { md.mtime() }
                ),
            );
            if md.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn run_upper_dir_becomes_the_same_snapshot_an_unpack_gives() {
    let Some((_d, store, ctx)) = run_lab("run_upper_dir_becomes_the_same_snapshot_an_unpack_gives")
    else {
        return;
    };
    // Added, changed and deleted files, an opaque directory (removed and made again), links,
    // a chmod of an image file, and runc's mount points (/proc, /dev, /etc/hosts...) that
    // must not stay in the snapshot since they are not in the layer.
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            "FROM busybox\n\
             RUN mkdir -p /data/sub && echo x > /data/sub/f && ln /data/sub/f /data/hard \
             && ln -s sub/f /data/link && chmod 0711 /data && rm /bin/vi && chmod 0700 /bin/ls \
             && rm -rf /tmp && mkdir /tmp && echo y > /tmp/only && chown 1000:1000 /tmp/only && sleep 1\n\
             RUN --mount=type=tmpfs,target=/scratch cat /data/link > /copy\n",
        )],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["snap".into()];
    let (out, _) = build_ok(&store, &opts);
    let manifest =
        strata_oci::Manifest::from_slice(&store.read_blob(&out.descriptor.digest).unwrap())
            .unwrap();
    let config = config_of(&store, &out);
    let layers = strata_rootfs::LayerRef::zip(&manifest.layers, &config.rootfs.diff_ids);
    assert_eq!(layers.len(), 3, "busybox + two RUN layers");

    let built = strata_rootfs::SnapshotCache::new(store.snapshots_dir()).unwrap();
    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = strata_rootfs::SnapshotCache::new(fresh_dir.path()).unwrap();
    let unpacked = fresh
        .ensure(&layers, |d| {
            store.open_descriptor(d).map_err(std::io::Error::other)
        })
        .unwrap();
    let kept = built
        .get(&layers)
        .expect("the build left a snapshot for every layer");
    for (i, (k, u)) in kept.iter().zip(&unpacked).enumerate().skip(1) {
        let (k, u) = (tree(k), tree(u));
        assert!(!k.is_empty(), "layer {i}: empty snapshot");
        let differ: Vec<_> = k
            .keys()
            .chain(u.keys())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .filter(|p| k.get(*p) != u.get(*p))
            .map(|p| format!("{p}:\n  kept     {:?}\n  unpacked {:?}", k.get(p), u.get(p)))
            .collect();
        assert!(
            differ.is_empty(),
            "layer {i}: the kept upper dir differs from the unpacked layer:\n{}",
            differ.join("\n")
        );
    }
    let top = tree(&kept[1]);
    assert!(
        top.contains_key("data/hard") && top.contains_key("bin/vi"),
        "{top:#?}"
    );
    assert!(
        top["tmp"].contains("overlay.opaque"),
        "rm -rf + mkdir makes /tmp opaque: {}",
        top["tmp"]
    );
    assert!(
        !top.contains_key("proc") && !top.contains_key("etc/hosts"),
        "{top:#?}"
    );
    assert!(!tree(&kept[2]).contains_key("scratch"));
}

/// Every heredoc form BuildKit takes, RUN on a merged-/usr base after COPY into `/bin/`,
/// and the user's primary group among the RUN process's groups.
#[test]
fn heredocs_merged_usr_and_groups_behave_as_in_buildkit() {
    let Some((_d, store, ctx)) = run_lab("heredocs_merged_usr_and_groups_behave_as_in_buildkit")
    else {
        return;
    };
    crate::common::images::import_merged_usr(&store);
    write_files(
        ctx.path(),
        &[
            ("tool.sh", "#!/bin/sh\necho tool\n"),
            (
                "Dockerfile",
                "FROM merged\n\
                 ENV GREETING=hi\n\
                 COPY tool.sh /bin/\n\
                 RUN sh /usr/bin/tool.sh > /tool.out && ls /lib > /dev/null\n\
                 RUN cat <<EOF > /one\nsay $GREETING\nEOF\n\
                 RUN <<A sh && cat <<'B' > /two-b\necho a > /two-a\nA\n$GREETING\nB\n\
                 RUN cat <<-EOF > /chomp\n\t\ttabbed\n\tEOF\n\
                 RUN tr a-z A-Z <<EOF >/upper && cat /upper >/upper2\nshout\nEOF\n\
                 RUN <<EOF\n#!/bin/sh\necho \"$0\" > /shebang\nEOF\n\
                 USER app\n\
                 RUN grep ^Groups: /proc/self/status > /tmp/groups\n",
            ),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["heredocs".into()];
    build_ok(&store, &opts);
    let (_g, root) = umoci_unpack(&store, "heredocs");
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(read("tool.out"), "tool\n");
    assert!(
        std::fs::symlink_metadata(root.join("bin"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(read("one"), "say hi\n", "an unquoted delimiter expands");
    assert_eq!(read("two-a"), "a\n");
    assert_eq!(read("two-b"), "$GREETING\n", "a quoted delimiter does not");
    assert_eq!(read("chomp"), "tabbed\n", "<<- strips leading tabs");
    assert_eq!(read("upper2"), "SHOUT\n", "a heredoc as a command's stdin");
    assert_eq!(
        read("shebang"),
        "/dev/pipes/EOF\n",
        "a #! script runs as a file of its own"
    );
    assert_eq!(
        read("tmp/groups").split_whitespace().collect::<Vec<_>>(),
        ["Groups:", "1000"]
    );
}
