//! Differential tests against Docker's BuildKit (the Docker 20.10 engine's built-in Dockerfile
//! front end): every case folder under `tests/buildkit/` is built by strata and by
//! `DOCKER_BUILDKIT=1 docker build`, and the two images must have the same root file systems
//! (paths, kinds, modes incl. setuid/setgid/sticky, owners, link targets, content hashes,
//! hardlink groups; not mtimes) and the same config fields.
//!
//! A case folder holds a `Dockerfile` and its context. Optional files, removed from the context
//! before either build:
//! - `args`: one option a line: `NAME=VALUE` (a build arg), `--target=STAGE`,
//!   `--secret=ID=FILE` (FILE relative to the context), or `--both-refuse` (the case asserts
//!   that both builders refuse the Dockerfile).
//! - `prepare`: a shell script run in the context first, for what git cannot hold (hardlinks,
//!   owners, odd modes, tarballs).
//! - `Dockerfile.buildkit`: syntax newer than BuildKit 20.10's front end (heredocs,
//!   `COPY --link`, `RUN --network`): BuildKit must refuse `Dockerfile` and builds this
//!   equivalent written without it, strata builds `Dockerfile`; the images must still match.
//!
//! One private Docker engine (own socket, data root and exec root, no bridge, no iptables)
//! serves the whole suite and is stopped when it ends, pass or fail. Base images are made by
//! strata and handed to it with `docker load`, so nothing is pulled.
//!
//! Needs root, dockerd, docker, runc, skopeo and umoci; skipped LOUDLY otherwise.
//! `BKDIFF_ONLY=case,case` runs only those cases; `BKDIFF_VERBOSE=1` also prints, per case,
//! both configs, strata's short text files and BuildKit's build output (with `--nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use strata_build::{BuildOptions, CollectProgress, Event};
use strata_oci::{ContainerConfig, Digest};
use strata_store::Store;
use strata_test_support::{Dockerd, bounded, check, describe, is_root, on_path, skip};

use crate::common::*;

const DOCKER: &str = "/usr/bin/docker";
const SKOPEO: &str = "/usr/bin/skopeo";
const UMOCI: &str = "/usr/bin/umoci";

/// Cases where strata is known to differ from BuildKit, and why. Each must still differ: one
/// that starts to match fails the suite until it is removed from here.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[
    (
        "context_special_files",
        "deliberate: strata copies a named pipe and a device node (of the context or of a \
         stage) as what they are and leaves a socket out, as Docker's builder did with its tar \
         of the context; BuildKit 0.8 drops the pipe and makes the device and the socket empty \
         regular files",
    ),
    (
        "copy_chmod_special_bits",
        "not strata's bug: BuildKit 0.8 drops setuid/setgid/sticky from `--chmod` \
         (moby/buildkit#3920); strata keeps them",
    ),
    (
        "dockerignore_exception_wildcard",
        "deliberate: BuildKit 0.8 (Docker 20.10) skips an ignored directory unless an exception \
         pattern spells a path under it literally, so `!**/sub/keep.txt` reopens nothing under \
         an ignored `dir`; BuildKit since fsutil's 2022 walker walks into it when an exception \
         has wildcards and takes the file back, as strata does",
    ),
    (
        "parser_shebang_directive",
        "deliberate: BuildKit 0.8 (Docker 20.10) stops looking for directives after a `#!` \
         first line; newer BuildKit's DirectiveParser skips the `#!` line and reads them, as \
         strata does",
    ),
    (
        "unused_build_arg",
        "deliberate: strata warns `one or more build-args [NEVER_DECLARED] were not consumed` \
         as Docker's builder does; BuildKit 0.8 prints no such warning",
    ),
    (
        "workdir_unclean_path",
        "not strata's bug: BuildKit 0.8 makes the WORKDIR path as written, so \
         /existing/../normalized/./dir also leaves an empty /existing",
    ),
];

/// Paths BuildKit leaves in its images that strata does not, and why that is no difference in
/// behaviour. Ignored only when strata's tree lacks the path and BuildKit's entry is an empty
/// directory or an empty file.
const BUILDKIT_LEFTOVERS: &[(&str, &str)] = &[
    // BuildKit 0.8 (Docker 20.10) creates the mount points of a RUN container in the root
    // file system and commits them; BuildKit 0.9 and later remove such stubs again
    // (executor/stubs.go), as strata does. The image never had them.
    ("dev", "RUN mount point (devtmpfs), left by BuildKit 0.8"),
    ("proc", "RUN mount point (procfs), left by BuildKit 0.8"),
    ("sys", "RUN mount point (sysfs), left by BuildKit 0.8"),
    // Likewise the target of every `RUN --mount` (and the parents created for it): BuildKit
    // 0.8 leaves an empty directory or file there, later versions do not.
    (
        "<RUN --mount targets>",
        "stub of a RUN --mount target, left by BuildKit 0.8",
    ),
];

/// BuildKit's tree without the [`BUILDKIT_LEFTOVERS`]: a leftover path goes when strata's
/// tree lacks it and BuildKit's holds nothing there but an empty file or directories of
/// leftovers.
fn without_leftovers(bt: &Tree, st: &Tree, mount_targets: &[String]) -> Tree {
    let mut candidates: BTreeSet<String> = BTreeSet::new();
    let fixed = BUILDKIT_LEFTOVERS
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !p.starts_with('<'));
    for p in fixed
        .map(str::to_string)
        .chain(mount_targets.iter().cloned())
    {
        // The parents BuildKit had to create for a mount target are stubs too.
        let mut p = p.trim_matches('/').to_string();
        while !p.is_empty() {
            candidates.insert(p.clone());
            p = p
                .rsplit_once('/')
                .map(|(a, _)| a.to_string())
                .unwrap_or_default();
        }
    }
    let mut bt = bt.clone();
    // Deepest first, so a parent is judged after its stub children are gone.
    let mut ordered: Vec<String> = candidates.into_iter().collect();
    ordered.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for p in ordered {
        if st.contains_key(&p) {
            continue;
        }
        let stub = match bt.get(&p) {
            Some(e) if e.kind == "dir" => {
                let prefix = format!("{p}/");
                !bt.keys().any(|k| k.starts_with(&prefix))
            }
            Some(e) if e.kind == "file" => e.what == Digest::sha256(b"").to_string(),
            _ => false,
        };
        if stub {
            bt.remove(&p);
        }
    }
    bt
}

/// The targets of every `RUN --mount=…` in a Dockerfile (the `target`, `dst` or
/// `destination` key; a secret without one goes to `/run/secrets/ID`).
fn mount_targets(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in dockerfile.split_whitespace() {
        if let Some(spec) = word.strip_prefix("--mount=") {
            let kv: BTreeMap<&str, &str> = spec
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .collect();
            let target = ["target", "dst", "destination"]
                .iter()
                .find_map(|k| kv.get(k));
            match (target, kv.get("type"), kv.get("id")) {
                (Some(t), _, _) => out.push(t.to_string()),
                (None, Some(&"secret"), Some(id)) => out.push(format!("/run/secrets/{id}")),
                _ => {}
            }
        }
    }
    out
}

/// Whether this machine can run the suite; says so loudly when it cannot.
fn can_diff() -> bool {
    let mut missing: Vec<&str> = Vec::new();
    if !is_root() {
        missing.push("root");
    }
    for tool in ["dockerd", "runc", "timeout"] {
        if !on_path(tool) {
            missing.push(tool);
        }
    }
    for p in [DOCKER, SKOPEO, UMOCI] {
        if !Path::new(p).exists() {
            missing.push(p);
        }
    }
    if !missing.is_empty() {
        skip(&format!(
            "buildkit_diff: the BuildKit differential suite needs {missing:?} \
             (apt-get install docker.io runc skopeo umoci; run as root)"
        ));
        return false;
    }
    true
}

/// The most the whole suite may take (it takes about a minute): strata's builds run in this
/// process, beyond the reach of `timeout`.
const WHOLE_SUITE_SECS: u64 = 600;

/// Past its deadline, stops the engine and ends the test process, so a hung build fails the
/// suite instead of hanging it (and leaves no dockerd behind). Disarmed on drop.
struct Watchdog {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    fn start(d: &Dockerd, limit: Duration) -> Watchdog {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let pid = d.pid();
        let sock = d.sock().to_path_buf();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < limit {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            eprintln!("buildkit_diff: still running after {limit:?}; stopping dockerd and failing");
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(15));
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let _ = fs::remove_file(&sock);
            std::process::exit(101);
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One file-system entry, everything compared except mtimes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// `dir`, `file`, `symlink`, `fifo`, `char`, `block`, `socket`.
    kind: &'static str,
    /// Permission bits incl. setuid/setgid/sticky, in octal.
    mode: String,
    uid: u32,
    gid: u32,
    /// Link target for symlinks, sha256 of the content for files, device number for devices.
    what: String,
    /// For a file with other hardlinks in the tree: every path of its group, sorted.
    hardlinks: Vec<String>,
}

type Tree = BTreeMap<String, Entry>;

/// A path as the trees compare it: one string per byte string (not lossy), bytes that are not
/// UTF-8 written `\xNN` and a backslash `\\`.
fn show_name(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in name.as_bytes().utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

fn walk(root: &Path) -> Tree {
    fn go(root: &Path, dir: &Path, out: &mut Tree, inodes: &mut BTreeMap<(u64, u64), Vec<String>>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let (kind, what) = if ft.is_dir() {
                ("dir", String::new())
            } else if ft.is_symlink() {
                ("symlink", show_name(fs::read_link(&p).unwrap().as_os_str()))
            } else if ft.is_file() {
                let data = fs::read(&p).unwrap();
                // Short text is shown as it is: a difference then says what each side wrote.
                match std::str::from_utf8(&data) {
                    Ok(t) if t.len() <= 160 && !t.contains('\0') => ("file", format!("{t:?}")),
                    _ => ("file", Digest::sha256(&data).to_string()),
                }
            } else if ft.is_fifo() {
                ("fifo", String::new())
            } else if ft.is_char_device() {
                ("char", format!("{:x}", md.rdev()))
            } else if ft.is_block_device() {
                ("block", format!("{:x}", md.rdev()))
            } else {
                ("socket", String::new())
            };
            let rel = show_name(p.strip_prefix(root).unwrap().as_os_str());
            if ft.is_file() && md.nlink() > 1 {
                inodes
                    .entry((md.dev(), md.ino()))
                    .or_default()
                    .push(rel.clone());
            }
            out.insert(
                rel,
                Entry {
                    kind,
                    mode: format!("{:04o}", md.permissions().mode() & 0o7777),
                    uid: md.uid(),
                    gid: md.gid(),
                    what,
                    hardlinks: Vec::new(),
                },
            );
            if ft.is_dir() {
                go(root, &p, out, inodes);
            }
        }
    }
    let mut out = BTreeMap::new();
    let mut inodes = BTreeMap::new();
    go(root, root, &mut out, &mut inodes);
    for mut group in inodes.into_values() {
        if group.len() > 1 {
            group.sort();
            for p in &group {
                out.get_mut(p).unwrap().hardlinks = group.clone();
            }
        }
    }
    out
}

/// The compared config fields of an image config (OCI or Docker JSON), normalised: absent,
/// null, empty strings, lists and maps all mean "not set" to a runtime.
fn compared(image: &serde_json::Value) -> BTreeMap<&'static str, String> {
    fn norm(v: Option<&serde_json::Value>) -> String {
        use serde_json::Value;
        match v {
            None | Some(Value::Null) => "unset".into(),
            Some(Value::String(s)) if s.is_empty() => "unset".into(),
            Some(Value::Array(a)) if a.is_empty() => "unset".into(),
            Some(Value::Object(o)) if o.is_empty() => "unset".into(),
            Some(v) => v.to_string(),
        }
    }
    let c = &image["config"];
    let mut out = BTreeMap::new();
    for f in [
        "Env",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "ExposedPorts",
        "Volumes",
        "Labels",
        "StopSignal",
        "Healthcheck",
        "OnBuild",
        "Shell",
    ] {
        out.insert(f, norm(c.get(f)));
    }
    out.insert("author", norm(image.get("author")));
    out
}

/// What one builder made of a case.
enum Built {
    Image {
        tree: Tree,
        config: BTreeMap<&'static str, String>,
        /// The `--build-arg`s no Dockerfile line names that the builder warned about.
        unused_args_warned: BTreeSet<String>,
    },
    Refused(String),
}

/// A case folder's options.
#[derive(Default, Clone)]
struct CaseArgs {
    build_args: BTreeMap<String, String>,
    target: Option<String>,
    /// `--secret`s: id → file, relative to the context.
    secrets: BTreeMap<String, String>,
    both_refuse: bool,
    /// `--label`s, as `KEY=VALUE` or a bare `KEY`.
    labels: Vec<String>,
    /// `--network=none` (default: the host's, which both builders get).
    network_none: bool,
}

struct Case {
    name: String,
    /// The prepared context (a copy of the folder).
    ctx: tempfile::TempDir,
    args: CaseArgs,
    /// `Dockerfile.buildkit` was given: BuildKit builds that one instead.
    buildkit_dockerfile: Option<(tempfile::TempDir, PathBuf)>,
    /// The text of the Dockerfile(s).
    dockerfile_text: String,
    /// Where the Dockerfiles mount things in RUN (see [`BUILDKIT_LEFTOVERS`]).
    mount_targets: Vec<String>,
}

impl Case {
    /// The `--build-arg` names that appear nowhere in the case's Dockerfiles.
    fn undeclared_args(&self) -> impl Iterator<Item = String> + '_ {
        self.args
            .build_args
            .keys()
            .filter(|k| !self.dockerfile_text.contains(k.as_str()))
            .cloned()
    }
}

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/buildkit")
}

fn prepare_case(name: &str) -> Case {
    let src = cases_dir().join(name);
    let ctx = tempfile::tempdir().unwrap();
    check(
        bounded(30, "cp")
            .arg("-a")
            .arg(format!("{}/.", src.display()))
            .arg(ctx.path()),
    );
    let mut args = CaseArgs::default();
    let args_file = ctx.path().join("args");
    if args_file.exists() {
        for line in fs::read_to_string(&args_file).unwrap().lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line == "--both-refuse" {
                args.both_refuse = true;
            } else if let Some((id, file)) = line
                .strip_prefix("--secret=")
                .and_then(|s| s.split_once('='))
            {
                args.secrets.insert(id.to_string(), file.to_string());
            } else if let Some(l) = line.strip_prefix("--label=") {
                args.labels.push(l.to_string());
            } else if line == "--network=none" {
                args.network_none = true;
            } else if let Some(t) = line.strip_prefix("--target=") {
                args.target = Some(t.to_string());
            } else if let Some((k, v)) = line.split_once('=') {
                args.build_args.insert(k.to_string(), v.to_string());
            } else {
                panic!("{name}/args: cannot read `{line}`");
            }
        }
        fs::remove_file(&args_file).unwrap();
    }
    let prepare = ctx.path().join("prepare");
    if prepare.exists() {
        check(
            bounded(30, "sh")
                .arg("-e")
                .arg(&prepare)
                .current_dir(ctx.path()),
        );
        fs::remove_file(&prepare).unwrap();
    }
    // BuildKit's Dockerfile lives outside the context, so strata's `COPY .` cannot see it.
    let mut dockerfiles = fs::read_to_string(ctx.path().join("Dockerfile")).unwrap();
    let buildkit_dockerfile = {
        let p = ctx.path().join("Dockerfile.buildkit");
        p.exists().then(|| {
            dockerfiles.push_str(&fs::read_to_string(&p).unwrap());
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("Dockerfile");
            fs::rename(&p, &dest).unwrap();
            (dir, dest)
        })
    };
    Case {
        mount_targets: mount_targets(&dockerfiles),
        dockerfile_text: dockerfiles,
        name: name.to_string(),
        ctx,
        args,
        buildkit_dockerfile,
    }
}

fn tag_of(case: &str) -> String {
    format!("bkdiff-{}:latest", case.replace('_', "-"))
}

fn build_strata(store: &Store, case: &Case) -> Built {
    let mut opts = BuildOptions::new(case.ctx.path());
    opts.tags = vec![tag_of(&case.name)];
    opts.build_args = case.args.build_args.clone();
    opts.target = case.args.target.clone();
    for l in &case.args.labels {
        let (k, v) = l.split_once('=').unwrap_or((l, ""));
        opts.labels.insert(k.to_string(), v.to_string());
    }
    if case.args.network_none {
        opts.network = strata_build::NetworkMode::None;
    }
    opts.secrets = case
        .args
        .secrets
        .iter()
        .map(|(id, f)| (id.clone(), case.ctx.path().join(f)))
        .collect();
    let progress = CollectProgress::default();
    let out = match strata_build::build(store, &opts, &progress) {
        Ok(o) => o,
        Err(e) => return Built::Refused(e.to_string()),
    };
    let config: serde_json::Value =
        serde_json::from_slice(&store.read_blob(&out.config_digest).unwrap()).unwrap();
    let warnings: Vec<String> = progress
        .take()
        .into_iter()
        .filter_map(|e| match e {
            Event::Warning { message } => Some(message),
            _ => None,
        })
        .collect();
    let unused_args_warned = case
        .undeclared_args()
        .filter(|k| warnings.iter().any(|w| w.contains(k.as_str())))
        .collect();
    let work = tempfile::tempdir().unwrap();
    let rootfs = work.path().join("rootfs");
    if let Err(e) = unpack(store.root(), &tag_of(&case.name), &rootfs) {
        return Built::Refused(format!("strata built an image umoci cannot unpack: {e}"));
    }
    Built::Image {
        tree: walk(&rootfs),
        config: compared(&config),
        unused_args_warned,
    }
}

/// `docker build` of the case; its output (stdout and stderr) when it succeeds.
fn docker_build(d: &Dockerd, case: &Case, dockerfile: Option<&Path>) -> Result<String, String> {
    let mut cmd = d.cmd(180);
    cmd.env("DOCKER_BUILDKIT", "1");
    let network = if case.args.network_none {
        "none"
    } else {
        "host"
    };
    cmd.args(["build", "--network", network, "-t", &tag_of(&case.name)]);
    for l in &case.args.labels {
        cmd.arg("--label").arg(l);
    }
    if let Some(f) = dockerfile {
        cmd.arg("-f").arg(f);
    }
    for (k, v) in &case.args.build_args {
        cmd.arg("--build-arg").arg(format!("{k}={v}"));
    }
    if let Some(t) = &case.args.target {
        cmd.arg("--target").arg(t);
    }
    for (id, f) in &case.args.secrets {
        cmd.arg("--secret")
            .arg(format!("id={id},src={}", case.ctx.path().join(f).display()));
    }
    cmd.arg(case.ctx.path());
    let out = cmd.output().unwrap();
    if out.status.code() == Some(124) {
        panic!("{}", describe(&cmd, &out));
    }
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // The last lines say why; the rest is progress.
        let lines: Vec<&str> = err.lines().collect();
        return Err(lines[lines.len().saturating_sub(3)..].join("\n"));
    }
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

fn build_buildkit(d: &Dockerd, case: &Case) -> Built {
    let equivalent = case.buildkit_dockerfile.as_ref().map(|(_, f)| f.as_path());
    if equivalent.is_some() {
        // The original must need the newer syntax, or the equivalent proves nothing.
        if docker_build(d, case, None).is_ok() {
            return Built::Refused(
                "BuildKit 20.10 built `Dockerfile`: drop `Dockerfile.buildkit` from this case"
                    .into(),
            );
        }
    }
    let output = match docker_build(d, case, equivalent) {
        Ok(o) => o,
        Err(e) if equivalent.is_some() => {
            return Built::Refused(format!("(Dockerfile.buildkit) {e}"));
        }
        Err(e) => return Built::Refused(e),
    };
    if std::env::var_os("BKDIFF_VERBOSE").is_some() {
        eprintln!("=== {} BuildKit output:\n{output}", case.name);
    }
    let unused_args_warned = case
        .undeclared_args()
        .filter(|k| output.contains(k.as_str()))
        .collect();
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("image.tar");
    let tag = tag_of(&case.name);
    check(d.cmd(120).arg("save").arg("-o").arg(&archive).arg(&tag));
    let config = archive_config(&archive);
    let layout = work.path().join("layout");
    check(
        bounded(120, SKOPEO)
            .args(["copy", "-q"])
            .arg(format!("docker-archive:{}", archive.display()))
            .arg(format!("oci:{}:img", layout.display())),
    );
    let rootfs = work.path().join("rootfs");
    if let Err(e) = unpack(&layout, "img", &rootfs) {
        return Built::Refused(format!("BuildKit built an image umoci cannot unpack: {e}"));
    }
    Built::Image {
        tree: walk(&rootfs),
        config: compared(&config),
        unused_args_warned,
    }
}

/// Applies the layers of `layout:tag` to a new directory `rootfs` (`umoci raw unpack`: only the
/// file system, so a config runc would refuse does not stop the comparison).
fn unpack(layout: &Path, tag: &str, rootfs: &Path) -> Result<(), String> {
    let mut cmd = bounded(120, UMOCI);
    cmd.args(["raw", "unpack", "--image"])
        .arg(format!("{}:{tag}", layout.display()))
        .arg(rootfs);
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(describe(&cmd, &out))
    }
}

/// The image config Docker wrote into a `docker save` archive, as it is (skopeo's conversion to
/// OCI would drop Docker-only fields such as Healthcheck, OnBuild and Shell).
fn archive_config(archive: &Path) -> serde_json::Value {
    let read = |name: &str| -> Vec<u8> {
        let mut a = tar::Archive::new(fs::File::open(archive).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().to_string_lossy() == name {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut v).unwrap();
                return v;
            }
        }
        panic!("{} has no {name}", archive.display());
    };
    let manifest: serde_json::Value = serde_json::from_slice(&read("manifest.json")).unwrap();
    let config = manifest[0]["Config"].as_str().unwrap().to_string();
    serde_json::from_slice(&read(&config)).unwrap()
}

/// Every difference between the two builds of a case; empty when they agree.
fn differences(case: &Case, strata: &Built, buildkit: &Built) -> Vec<String> {
    let mut diffs = Vec::new();
    match (strata, buildkit) {
        (Built::Refused(s), Built::Refused(b)) => {
            if !case.args.both_refuse {
                diffs.push(format!("both refused it:\n  strata: {s}\n  BuildKit: {b}"));
            }
        }
        (Built::Refused(s), Built::Image { .. }) => {
            diffs.push(format!("strata refused what BuildKit built: {s}"))
        }
        (Built::Image { .. }, Built::Refused(b)) => {
            diffs.push(format!("BuildKit refused what strata built: {b}"))
        }
        (
            Built::Image {
                tree: st,
                config: sc,
                unused_args_warned: sw,
            },
            Built::Image {
                tree: bt,
                config: bc,
                unused_args_warned: bw,
            },
        ) => {
            if sw != bw {
                diffs.push(format!(
                    "warning about unused build args: strata names {sw:?} | BuildKit names {bw:?}"
                ));
            }
            if case.args.both_refuse {
                diffs.push("both built it, but the case expects both to refuse".into());
            }
            for (field, s) in sc {
                if bc[field] != *s {
                    diffs.push(format!(
                        "config {field}: strata {s} | BuildKit {}",
                        bc[field]
                    ));
                }
            }
            let bt = without_leftovers(bt, st, &case.mount_targets);
            for (p, s) in st {
                match bt.get(p) {
                    None => diffs.push(format!("/{p}: only in strata's image: {}", show(s))),
                    Some(b) if b != s => {
                        diffs.push(format!("/{p}: strata {} | BuildKit {}", show(s), show(b)))
                    }
                    Some(_) => {}
                }
            }
            for (p, b) in &bt {
                if !st.contains_key(p) {
                    diffs.push(format!("/{p}: only in BuildKit's image: {}", show(b)));
                }
            }
        }
    }
    diffs
}

fn show(e: &Entry) -> String {
    let mut s = format!("{} {} {}:{}", e.kind, e.mode, e.uid, e.gid);
    if !e.what.is_empty() {
        s.push(' ');
        s.push_str(&e.what);
    }
    if !e.hardlinks.is_empty() {
        s.push_str(&format!(" hardlinks {:?}", e.hardlinks));
    }
    s
}

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A root file system whose `/bin`, `/lib` and `/sbin` are symlinks into `/usr` (as Debian 12
/// and Fedora have it), with busybox at `/usr/bin/busybox`.
fn usrmerge_tar() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in ["usr/bin", "usr/sbin", "usr/lib/os", "etc", "tmp", "root"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::set_permissions(r.join("tmp"), PermissionsExt::from_mode(0o1777)).unwrap();
    fs::copy("/bin/busybox", r.join("usr/bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", r.join("usr/bin").join(applet)).unwrap();
        }
    }
    for (link, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/sbin")] {
        std::os::unix::fs::symlink(target, r.join(link)).unwrap();
    }
    fs::write(r.join("usr/lib/os/release"), "ID=usrmerge\n").unwrap();
    fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(r.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", r).unwrap();
    b.into_inner().unwrap()
}

/// The base images every case may use, made by strata in `store` and loaded into Docker:
/// `busybox` (like Docker Hub's: a PATH and `CMD ["sh"]`), `usrmerge` (merged /usr, same
/// config) and `nopath` (busybox with no Env at all).
fn make_bases(store: &Store, d: &Dockerd, work: &Path) {
    let busybox = ContainerConfig {
        env: Some(vec![DEFAULT_PATH.to_string()]),
        cmd: Some(vec!["sh".to_string()]),
        ..Default::default()
    };
    let nopath = ContainerConfig {
        cmd: Some(vec!["sh".to_string()]),
        ..Default::default()
    };
    let bases = [
        ("busybox", busybox_tar(), busybox.clone()),
        ("usrmerge", usrmerge_tar(), busybox),
        ("nopath", busybox_tar(), nopath),
    ];
    let mut names = Vec::new();
    for (name, tar, config) in bases {
        strata_transfer::import_tarball(
            store,
            tar.as_slice(),
            name,
            &strata_transfer::ImportOptions {
                config,
                ..Default::default()
            },
        )
        .unwrap();
        names.push(format!("{name}:latest"));
    }
    let archive = work.join("bases.tar");
    strata_transfer::save_archive(
        store,
        &names,
        strata_transfer::ArchiveFormat::Docker,
        &archive,
    )
    .unwrap();
    check(d.cmd(120).arg("load").arg("-i").arg(&archive));
}

#[test]
fn buildkit_differential() {
    if !can_diff() {
        return;
    }
    let started = Instant::now();
    let only = std::env::var("BKDIFF_ONLY").ok();
    let mut names: Vec<String> = fs::read_dir(cases_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == n)))
        .collect();
    names.sort();
    for (k, _) in KNOWN_DIFFERENCES {
        assert!(
            cases_dir().join(k).is_dir(),
            "KNOWN_DIFFERENCES names {k}, which is no case folder"
        );
    }

    let work = tempfile::tempdir().unwrap();
    let store = Store::open(work.path().join("store")).unwrap();
    let docker = Dockerd::start(DOCKER);
    let _watchdog = Watchdog::start(&docker, Duration::from_secs(WHOLE_SUITE_SECS));
    make_bases(&store, &docker, work.path());

    let cases: Vec<Case> = names.iter().map(|n| prepare_case(n)).collect();
    // BuildKit works in its own processes: its builds run beside strata's.
    let (strata_built, buildkit_built) = std::thread::scope(|s| {
        let bk = s.spawn(|| {
            cases
                .iter()
                .map(|c| build_buildkit(&docker, c))
                .collect::<Vec<_>>()
        });
        let st: Vec<Built> = cases.iter().map(|c| build_strata(&store, c)).collect();
        (st, bk.join().unwrap())
    });

    let known: BTreeMap<&str, &str> = KNOWN_DIFFERENCES.iter().copied().collect();
    let mut failures = Vec::new();
    let mut report = String::new();
    for ((case, s), b) in cases.iter().zip(&strata_built).zip(&buildkit_built) {
        let diffs = differences(case, s, b);
        let name = case.name.as_str();
        if std::env::var_os("BKDIFF_VERBOSE").is_some()
            && let (Built::Image { config: sc, .. }, Built::Image { config: bc, .. }) = (s, b)
        {
            eprintln!("=== {name}\n  strata   {sc:?}\n  BuildKit {bc:?}");
        }
        if std::env::var_os("BKDIFF_VERBOSE").is_some()
            && let Built::Image { tree, .. } = s
        {
            for (p, e) in tree {
                if e.kind == "file" && e.what.starts_with('"') && !p.starts_with("etc/") {
                    eprintln!("  strata /{p}: {}", e.what);
                }
            }
        }
        if !diffs.is_empty() {
            report.push_str(&format!("--- {name}:\n"));
            for d in &diffs {
                report.push_str(&format!("    {d}\n"));
            }
        }
        match (known.get(name), diffs.is_empty()) {
            (Some(why), true) => failures.push(format!(
                "{name} now matches BuildKit: remove it from KNOWN_DIFFERENCES ({why})"
            )),
            (None, false) => failures.push(format!(
                "{name} differs from BuildKit:\n    {}",
                diffs.join("\n    ")
            )),
            _ => {}
        }
    }
    let refused: BTreeSet<&str> = cases
        .iter()
        .zip(&strata_built)
        .filter(|(_, b)| matches!(b, Built::Refused(_)))
        .map(|(c, _)| c.name.as_str())
        .collect();
    eprintln!(
        "buildkit_diff: {} cases in {:?}; strata refused {refused:?}\n{report}",
        cases.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "strata and BuildKit disagree:\n{}",
        failures.join("\n")
    );
}
