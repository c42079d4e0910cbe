//! Differential tests against `buildah bud`: the same Dockerfiles built by strata and by
//! buildah must give the same file trees (paths, kinds, modes, owners, link targets, content
//! hashes; not mtimes) and the same config fields (Env, Cmd, Entrypoint, WorkingDir, User,
//! ExposedPorts, Labels, Volumes).
//!
//! Needs root, runc, umoci and buildah (Debian package `buildah`); skipped LOUDLY otherwise.
//! buildah runs with `--storage-driver vfs --isolation chroot` and its own `--root`/`--runroot`
//! in a temp dir, so it touches nothing of the machine's container storage.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use strata_build::BuildOptions;
use strata_oci::{ContainerConfig, Digest, ImageConfig};
use strata_test_support::{can_run_containers, skip};

use crate::common::*;

const BUILDAH: &str = "/usr/bin/buildah";
const SKOPEO: &str = "/usr/bin/skopeo";

/// Paths buildah leaves in its images that strata does not, and why they are not a
/// difference in behaviour. Each is ignored only when strata's tree lacks it AND buildah's
/// entry is empty (an empty directory or a zero-byte file), so real content there still counts.
const BUILDAH_LEFTOVERS: &[(&str, &str)] = &[
    // Mount points buildah's chroot isolation creates for RUN (proc, sysfs, devtmpfs, the
    // run tmpfs) and commits as empty directories. strata drops runtime mount points from
    // its RUN layers (the image never had them), like BuildKit does.
    ("dev", "RUN mount point (devtmpfs)"),
    ("proc", "RUN mount point (procfs)"),
    ("sys", "RUN mount point (sysfs)"),
    ("run", "RUN mount point (tmpfs)"),
    // Empty files buildah bind-mounts the host's network files onto during RUN and then
    // commits; their content at run time comes from the host, never from the image.
    (
        "etc/hosts",
        "RUN bind-mount target of the host's hosts file",
    ),
    ("etc/hostname", "RUN bind-mount target of the hostname"),
    (
        "etc/resolv.conf",
        "RUN bind-mount target of the host's resolv.conf",
    ),
];

/// Labels buildah adds on its own.
const BUILDAH_LABELS: &[&str] = &["io.buildah.version"];

fn can_diff(test: &str) -> bool {
    if !can_run_containers(test) {
        return false;
    }
    let missing: Vec<&str> = [BUILDAH, SKOPEO, "/usr/bin/umoci"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        skip(&format!(
            "{test}: the buildah differential test needs {missing:?} \
             (apt-get install buildah skopeo umoci)"
        ));
        return false;
    }
    true
}

/// One file-system entry, everything compared except mtimes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `dir`, `file`, `symlink`, `fifo`, `char`, `block`, `socket`.
    kind: &'static str,
    /// Permission bits incl. setuid/setgid/sticky.
    mode: u32,
    uid: u32,
    gid: u32,
    /// Link target for symlinks, sha256 of the content for files, empty otherwise.
    what: String,
}

fn walk(root: &Path) -> BTreeMap<String, Entry> {
    fn go(root: &Path, dir: &Path, out: &mut BTreeMap<String, Entry>) {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            use std::os::unix::fs::FileTypeExt;
            let (kind, what) = if ft.is_dir() {
                ("dir", String::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    std::fs::read_link(&p).unwrap().display().to_string(),
                )
            } else if ft.is_file() {
                (
                    "file",
                    Digest::sha256(&std::fs::read(&p).unwrap()).to_string(),
                )
            } else if ft.is_fifo() {
                ("fifo", String::new())
            } else if ft.is_char_device() {
                ("char", format!("{:x}", md.rdev()))
            } else if ft.is_block_device() {
                ("block", format!("{:x}", md.rdev()))
            } else {
                ("socket", String::new())
            };
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: md.permissions().mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    what,
                },
            );
            if ft.is_dir() {
                go(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, root, &mut out);
    out
}

/// A temp buildah storage holding `localhost/busybox:latest` = strata's `busybox:latest`.
struct Buildah {
    dir: tempfile::TempDir,
}

impl Buildah {
    fn new(store: &strata_store::Store) -> Self {
        let b = Buildah {
            dir: tempfile::tempdir().unwrap(),
        };
        // strata's store is an OCI layout whose index.json names refs `busybox:latest`;
        // skopeo copies it into buildah's storage under the name the Dockerfiles use.
        // (`buildah pull oci:DIR:…` would do too, but names the image after DIR, which
        // must then be lowercase: temp dirs are not.)
        let dest = format!(
            "containers-storage:[vfs@{}+{}]localhost/busybox:latest",
            b.dir.path().join("root").display(),
            b.dir.path().join("runroot").display()
        );
        let out = Command::new(SKOPEO)
            .arg("copy")
            .arg("-q")
            .arg(format!("oci:{}:busybox:latest", store.root().display()))
            .arg(dest)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        b
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(BUILDAH)
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "buildah {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `buildah bud` then `buildah push` to an OCI layout; returns (layout dir, config).
    fn build(&self, ctx: &Path, tag: &str, args: &BTreeMap<String, String>) -> PathBuf {
        let mut a: Vec<String> = [
            "bud",
            "--pull-never",
            "--layers",
            "--isolation",
            "chroot",
            "-t",
            tag,
            "-f",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(ctx.join("Dockerfile").display().to_string());
        for (k, v) in args {
            a.push("--build-arg".into());
            a.push(format!("{k}={v}"));
        }
        a.push(ctx.display().to_string());
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        self.run(&a);
        let layout = self.dir.path().join(format!("oci-{tag}"));
        self.run(&["push", tag, &format!("oci:{}:{tag}", layout.display())]);
        layout
    }
}

fn umoci(layout: &Path, tag: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let bundle = d.path().join("bundle");
    let out = Command::new("/usr/bin/umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (d, bundle.join("rootfs"))
}

/// The image config of the single image in an OCI layout.
fn layout_config(layout: &Path) -> ImageConfig {
    let blob = |d: &str| {
        let hex = d.strip_prefix("sha256:").unwrap();
        std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    ImageConfig::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap()
}

/// The compared config fields, normalised: buildah's own labels dropped, empty maps/lists
/// and absent ones equal (both mean "not set" to a runtime).
fn compared(c: &ContainerConfig) -> BTreeMap<&'static str, String> {
    fn list(v: &Option<Vec<String>>) -> String {
        match v {
            Some(v) if !v.is_empty() => format!("{v:?}"),
            _ => "unset".into(),
        }
    }
    fn keys<V>(v: &Option<BTreeMap<String, V>>) -> String {
        match v {
            Some(m) if !m.is_empty() => format!("{:?}", m.keys().collect::<Vec<_>>()),
            _ => "unset".into(),
        }
    }
    fn opt(v: &Option<String>) -> String {
        match v {
            Some(s) if !s.is_empty() => format!("{s:?}"),
            _ => "unset".into(),
        }
    }
    let mut labels = c.labels.clone().unwrap_or_default();
    for l in BUILDAH_LABELS {
        labels.remove(*l);
    }
    BTreeMap::from([
        ("Env", list(&c.env)),
        ("Cmd", list(&c.cmd)),
        ("Entrypoint", list(&c.entrypoint)),
        ("WorkingDir", opt(&c.working_dir)),
        ("User", opt(&c.user)),
        ("ExposedPorts", keys(&c.exposed_ports)),
        ("Labels", format!("{labels:?}")),
        ("Volumes", keys(&c.volumes)),
    ])
}

/// Builds `dockerfile` over `files` with both builders and returns every difference found.
fn differences(
    name: &str,
    base: &ContainerConfig,
    dockerfile: &str,
    files: &[(&str, &str, u32)],
    args: &[(&str, &str)],
) -> Vec<String> {
    let _d = tempfile::tempdir().unwrap();
    let store = strata_store::Store::open(_d.path().join("store")).unwrap();
    strata_transfer::import_tarball(
        &store,
        busybox_tar().as_slice(),
        "busybox",
        &strata_transfer::ImportOptions {
            config: base.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let ctx = tempfile::tempdir().unwrap();
    write_files(ctx.path(), &[("Dockerfile", dockerfile)]);
    for (p, c, mode) in files {
        write_files(ctx.path(), &[(p, c)]);
        std::fs::set_permissions(ctx.path().join(p), PermissionsExt::from_mode(*mode)).unwrap();
    }
    let args: BTreeMap<String, String> = args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();

    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec![name.to_string()];
    opts.build_args = args.clone();
    let (out, _) = build_ok(&store, &opts);
    let (_sg, strata_root) = umoci_unpack(&store, name);
    let strata_tree = walk(&strata_root);
    let strata_cfg = config_of(&store, &out).config.unwrap_or_default();

    let buildah = Buildah::new(&store);
    let layout = buildah.build(ctx.path(), name, &args);
    let (_bg, buildah_root) = umoci(&layout, name);
    let mut buildah_tree = walk(&buildah_root);
    let buildah_cfg = layout_config(&layout).config.unwrap_or_default();

    for (path, _why) in BUILDAH_LEFTOVERS {
        let empty = match buildah_tree.get(*path) {
            Some(e) if e.kind == "dir" => std::fs::read_dir(buildah_root.join(path))
                .unwrap()
                .next()
                .is_none(),
            Some(e) if e.kind == "file" => {
                std::fs::metadata(buildah_root.join(path)).unwrap().len() == 0
            }
            _ => false,
        };
        if empty && !strata_tree.contains_key(*path) {
            buildah_tree.remove(*path);
        }
    }

    let mut diffs = Vec::new();
    for (p, s) in &strata_tree {
        match buildah_tree.get(p) {
            None => diffs.push(format!("{name}: /{p} only in strata's image: {s:?}")),
            Some(b) if b != s => {
                diffs.push(format!("{name}: /{p} differs: strata {s:?} buildah {b:?}"))
            }
            Some(_) => {}
        }
    }
    for (p, b) in &buildah_tree {
        if !strata_tree.contains_key(p) {
            diffs.push(format!("{name}: /{p} only in buildah's image: {b:?}"));
        }
    }
    let (sc, bc) = (compared(&strata_cfg), compared(&buildah_cfg));
    for (field, s) in &sc {
        if bc[field] != *s {
            diffs.push(format!(
                "{name}: config {field} differs: strata {s} buildah {}",
                bc[field]
            ));
        }
    }
    diffs
}

/// The base image's config, like Docker Hub's busybox: a PATH and `CMD ["sh"]`.
fn busybox_config() -> ContainerConfig {
    ContainerConfig {
        env: Some(vec![DEFAULT_PATH.to_string()]),
        cmd: Some(vec!["sh".to_string()]),
        ..Default::default()
    }
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn assert_same(name: &str, dockerfile: &str, files: &[(&str, &str, u32)], args: &[(&str, &str)]) {
    assert_same_on(name, &busybox_config(), dockerfile, files, args);
}

fn assert_same_on(
    name: &str,
    base: &ContainerConfig,
    dockerfile: &str,
    files: &[(&str, &str, u32)],
    args: &[(&str, &str)],
) {
    let diffs = differences(name, base, dockerfile, files, args);
    assert!(
        diffs.is_empty(),
        "strata and buildah disagree on {name}:\n{}",
        diffs.join("\n")
    );
}

#[test]
fn multi_stage_copy_from() {
    if !can_diff("multi_stage_copy_from") {
        return;
    }
    assert_same(
        "multistage",
        "FROM busybox AS builder\n\
         ARG GREETING=hello\n\
         ENV OUT=/out\n\
         RUN mkdir -p $OUT/sub && echo \"$GREETING world\" > $OUT/greeting \
             && ln -s greeting $OUT/link && chmod 0600 $OUT/greeting \
             && echo deep > $OUT/sub/deep && chown 1000:1000 $OUT/sub/deep\n\
         FROM busybox AS unused\n\
         RUN echo never > /never\n\
         FROM busybox\n\
         COPY --from=builder /out /opt/out\n\
         COPY --from=builder /out/greeting /single\n\
         COPY --from=0 /out/sub/ /flat/\n\
         CMD [\"cat\", \"/single\"]\n",
        &[],
        &[],
    );
}

#[test]
fn arg_env_substitution() {
    if !can_diff("arg_env_substitution") {
        return;
    }
    assert_same(
        "argenv",
        "ARG BASE=busybox\n\
         FROM ${BASE}\n\
         ARG VERSION=1.0\n\
         ARG NAME\n\
         ARG UNSET\n\
         ENV APP_VERSION=$VERSION APP_HOME=/srv/${NAME:-app}\n\
         ENV DERIVED=\"${APP_HOME}/v${APP_VERSION}\" DEFAULTED=${UNSET:-fallback} ALT=${NAME:+set}\n\
         WORKDIR $APP_HOME\n\
         RUN echo \"$VERSION $NAME $APP_VERSION $DERIVED $UNSET\" > args.txt\n\
         COPY ${NAME}.txt $DERIVED/\n\
         LABEL version=\"$APP_VERSION\" name=${NAME} literal='$NAME'\n",
        &[("demo.txt", "demo file\n", 0o644)],
        &[("NAME", "demo")],
    );
}

#[test]
fn user_and_workdir() {
    if !can_diff("user_and_workdir") {
        return;
    }
    assert_same(
        "userwd",
        "FROM busybox\n\
         WORKDIR /work/deep\n\
         RUN touch created-by-root && mkdir /home && mkdir -m 0755 /home/app && chown app:app /home/app\n\
         USER app\n\
         WORKDIR /home/app\n\
         RUN id -u > uid.txt && id -g > gid.txt && touch mine\n\
         USER 1000:1000\n\
         RUN echo numeric > /tmp/numeric\n\
         USER root\n\
         WORKDIR relative/path\n\
         RUN pwd > /pwd.txt\n\
         USER app\n",
        &[],
        &[],
    );
}

#[test]
fn copy_chown_chmod() {
    if !can_diff("copy_chown_chmod") {
        return;
    }
    assert_same(
        "chown",
        "FROM busybox\n\
         COPY --chown=app:app files/ /data/\n\
         COPY --chown=1000:1000 --chmod=0640 secret.txt /etc/secret.txt\n\
         COPY --chmod=755 run.sh /usr/local/bin/\n\
         COPY --chown=app files/sub/b.txt run.sh /multi/\n\
         COPY exec.sh plain.txt /keep/\n\
         ADD --chown=1000:0 plain.txt /opt/\n",
        &[
            ("files/a.txt", "a\n", 0o644),
            ("files/sub/b.txt", "b\n", 0o600),
            ("secret.txt", "s3cret\n", 0o644),
            ("run.sh", "#!/bin/sh\necho run\n", 0o644),
            ("exec.sh", "#!/bin/sh\necho exec\n", 0o755),
            ("plain.txt", "plain\n", 0o664),
        ],
        &[],
    );
}

#[test]
fn whiteouts_from_run_rm() {
    if !can_diff("whiteouts_from_run_rm") {
        return;
    }
    assert_same(
        "whiteouts",
        "FROM busybox\n\
         RUN mkdir -p /d/sub /e && echo a > /d/a && echo b > /d/sub/b && echo keep > /d/keep \
             && echo e > /e/file\n\
         RUN rm -rf /d/sub /d/a /bin/vi /etc/group && echo new > /d/new\n\
         RUN rm -rf /e && mkdir /e && echo fresh > /e/x\n\
         RUN rm /d/new && mkdir /d/new && chmod 0700 /d/new\n",
        &[],
        &[],
    );
}

#[test]
fn config_fields() {
    if !can_diff("config_fields") {
        return;
    }
    assert_same(
        "config",
        "FROM busybox\n\
         EXPOSE 8080 53/udp\n\
         EXPOSE 9090/tcp\n\
         LABEL a=1 \"b c\"=\"d e\"\n\
         LABEL a=2\n\
         VOLUME [\"/data\", \"/logs\"]\n\
         VOLUME /cache\n\
         ENV PATH=/usr/local/bin:/bin GREETING=\"hello world\"\n\
         ENTRYPOINT [\"/bin/sh\", \"-c\"]\n\
         CMD [\"echo hi\"]\n",
        &[],
        &[],
    );
}

#[test]
fn entrypoint_resets_inherited_cmd() {
    if !can_diff("entrypoint_resets_inherited_cmd") {
        return;
    }
    // The base has `CMD ["sh"]`: ENTRYPOINT drops it (Docker, BuildKit and buildah agree).
    assert_same(
        "entrypointonly",
        "FROM busybox\nENTRYPOINT echo \"from entrypoint\"\n",
        &[],
        &[],
    );
}

// Known difference (reported, not fixed): strata's `ConfigChange::Entrypoint` always clears
// Cmd; Docker/BuildKit (`if !d.cmdSet`) and buildah clear only a CMD inherited from the base,
// keeping one set earlier in the same stage. buildah: Cmd ["sh"], strata: unset.
#[test]
fn entrypoint_keeps_cmd_of_same_stage() {
    if !can_diff("entrypoint_keeps_cmd_of_same_stage") {
        return;
    }
    assert_same(
        "cmdthenentrypoint",
        "FROM busybox\nCMD [\"sh\"]\nENTRYPOINT echo \"from entrypoint\"\n",
        &[],
        &[],
    );
}

// Known difference (reported, not fixed): when the base image has no PATH, Docker/BuildKit and
// buildah write the default PATH into the built image's Env; strata leaves Env without it.
#[test]
fn default_path_when_base_has_none() {
    if !can_diff("default_path_when_base_has_none") {
        return;
    }
    assert_same_on(
        "nopath",
        &ContainerConfig::default(),
        "FROM busybox\nRUN echo hi > /hi\n",
        &[],
        &[],
    );
}
