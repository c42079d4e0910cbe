//! `FROM` (and `COPY --from`) of an image the store lacks pulls it from the registry its name
//! points at, through strata.lock: against strata's own registry, in process on 127.0.0.1:0.
//! COPY-only Dockerfiles, so nothing here needs runc.

use std::time::Duration;

use strata_build::{BuildOptions, Event, Project, ProjectOptions};
use strata_oci::{Digest, Reference};
use strata_registry::ClientOptions;
use strata_store::Store;
use strata_transfer::{ImportOptions, PullOptions, PushOptions, import_tarball, push};

use crate::common::{build_ok, busybox_tar, write_files};

/// strata's registry on a background thread; stops when dropped.
struct Registry {
    host: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let config = strata_registry_server::ServerConfig::new(dir.path());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (host_tx, host_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                host_tx
                    .send(listener.local_addr().unwrap().to_string())
                    .unwrap();
                strata_registry_server::serve_with_shutdown(config, listener, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        let host = host_rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Registry {
            host,
            shutdown: Some(tx),
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fast_pulls() -> PullOptions {
    PullOptions {
        client: ClientOptions {
            max_attempts: 1,
            backoff: Duration::from_millis(10),
            ..ClientOptions::default()
        },
        ..PullOptions::default()
    }
}

/// A store (A) with busybox imported under `name`, plus `extra` files in the tarball.
fn import(store: &Store, name: &str, extra: Option<(&str, &str)>) {
    let mut tar_bytes = busybox_tar();
    if let Some((path, content)) = extra {
        // Append one more entry: drop the two zero blocks that end the archive first.
        tar_bytes.truncate(tar_bytes.len() - 1024);
        let mut b = tar::Builder::new(tar_bytes);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, path, content.as_bytes()).unwrap();
        tar_bytes = b.into_inner().unwrap();
    }
    import_tarball(store, &tar_bytes[..], name, &ImportOptions::default()).unwrap();
}

/// Pushes store `a`'s `local` to `dest`; returns the manifest digest the registry holds.
fn push_to(a: &Store, local: &str, dest: &str) -> Digest {
    let report = push(
        a,
        local,
        &Reference::parse(dest).unwrap(),
        &PushOptions::default(),
    )
    .unwrap();
    report.descriptor.digest
}

fn pull_warnings(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning { message } if message.starts_with("pull") => Some(message.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn from_and_copy_from_pull_missing_remote_images_once() {
    let reg = Registry::start();
    let dir_a = tempfile::tempdir().unwrap();
    let a = Store::open(dir_a.path()).unwrap();
    import(&a, "busybox", None);
    let base = format!("{}/org/base:1", reg.host);
    let tools = format!("{}/org/tools:1", reg.host);
    let base_digest = push_to(&a, "busybox:latest", &base);
    push_to(&a, "busybox:latest", &tools);

    let dir_b = tempfile::tempdir().unwrap();
    let b = Store::open(dir_b.path()).unwrap();
    assert!(b.list_refs().unwrap().is_empty());
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            (
                "Dockerfile",
                &format!(
                    "FROM {base}\nCOPY hello.txt /hello.txt\nCOPY --from={tools} /etc/passwd /tools-passwd\n"
                ),
            ),
            ("hello.txt", "hello\n"),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.tags = vec!["app:1".into()];
    opts.pull = fast_pulls();

    let (first, events) = build_ok(&b, &opts);
    assert_eq!(first.pulled.len(), 2, "{:#?}", first.pulled);
    assert_eq!(first.pulled[0].name, base);
    assert_eq!(first.pulled[0].manifest.digest, base_digest);
    // config + the busybox layer came over the wire once; the second image shares both.
    assert_eq!(first.pulled[0].blobs_fetched, 2);
    assert_eq!(first.pulled[1].name, tools);
    assert_eq!(first.pulled[1].blobs_fetched, 0);
    assert_eq!(first.pulled[1].blobs_present, 2);
    assert_eq!(first.images_used[&base], base_digest);
    assert_eq!(b.get_ref(&base).unwrap().unwrap().digest, base_digest);
    assert!(b.get_ref(&tools).unwrap().is_some());
    let warnings = pull_warnings(&events);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(&format!("pulling {base}"))),
        "{warnings:?}"
    );
    assert_eq!(first.steps_run, 2);
    // The image is the base's layer plus the two COPY layers.
    let manifest = b.image("app:1").unwrap().manifest;
    assert_eq!(manifest.layers.len(), 3);

    // Everything is local now: nothing is pulled, every step is cached, same image.
    let (second, events) = build_ok(&b, &opts);
    assert!(second.pulled.is_empty(), "{:#?}", second.pulled);
    assert!(pull_warnings(&events).is_empty());
    assert_eq!(second.steps_run, 0);
    assert_eq!(second.steps_cached, 2);
    assert_eq!(second.descriptor, first.descriptor);
}

#[test]
fn lock_keeps_the_pulled_digest_until_update() {
    let reg = Registry::start();
    let dir_a = tempfile::tempdir().unwrap();
    let a = Store::open(dir_a.path()).unwrap();
    import(&a, "busybox", None);
    import(&a, "busybox-v2", Some(("etc/v2", "two\n")));
    let base = format!("{}/org/base:1", reg.host);
    let v1 = push_to(&a, "busybox:latest", &base);

    let project_dir = tempfile::tempdir().unwrap();
    write_files(
        project_dir.path(),
        &[
            ("strata.toml", "[[image]]\nname = \"app\"\n"),
            ("Dockerfile", &format!("FROM {base}\nCOPY a.txt /a.txt\n")),
            ("a.txt", "a\n"),
        ],
    );
    let project = Project::load(project_dir.path()).unwrap();
    assert!(project.externals["app"].contains(&base));
    let popts = ProjectOptions {
        pull: fast_pulls(),
        ..ProjectOptions::default()
    };
    let progress = strata_build::CollectProgress::default();

    // Store B: the first build pulls the base and locks its digest.
    let dir_b = tempfile::tempdir().unwrap();
    let b = Store::open(dir_b.path()).unwrap();
    let first = project.build(&b, &[], &popts, &progress).unwrap();
    assert_eq!(first.locked[&base], v1.to_string());
    assert_eq!(first.images["app"].pulled.len(), 1);
    assert_eq!(project.lock().unwrap().bases[&base], v1.to_string());

    // The tag moves upstream.
    let v2 = push_to(&a, "busybox-v2:latest", &base);
    assert_ne!(v1, v2);

    // Store B still builds from v1: the lock pins it and it is local, so nothing is pulled.
    let second = project.build(&b, &[], &popts, &progress).unwrap();
    assert!(second.images["app"].pulled.is_empty());
    assert_eq!(second.images["app"].steps_run, 0);
    assert_eq!(second.images["app"].images_used[&base], v1);
    assert_eq!(
        second.images["app"].descriptor,
        first.images["app"].descriptor
    );
    // Without a lock a local image wins too: a plain build does not look at the registry.
    let mut plain = BuildOptions::new(project_dir.path());
    plain.pull = fast_pulls();
    let (out, _) = build_ok(&b, &plain);
    assert!(out.pulled.is_empty());
    assert_eq!(out.images_used[&base], v1);

    // A fresh store C with the committed lock pulls v1 by digest, not what the tag says now,
    // and builds the very same image.
    let dir_c = tempfile::tempdir().unwrap();
    let c = Store::open(dir_c.path()).unwrap();
    let third = project.build(&c, &[], &popts, &progress).unwrap();
    let pulled = &third.images["app"].pulled;
    assert_eq!(pulled.len(), 1);
    assert_eq!(pulled[0].manifest.digest, v1);
    assert_eq!(third.images["app"].images_used[&base], v1);
    assert_eq!(
        third.images["app"].descriptor,
        first.images["app"].descriptor
    );
    assert!(third.locked.is_empty());

    // update re-resolves the tag at the registry and moves the lock; builds follow.
    let updates = project
        .update_with(&b, &[], &fast_pulls(), &progress)
        .unwrap();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].base, base);
    assert_eq!(updates[0].old.as_deref(), Some(v1.to_string().as_str()));
    assert_eq!(updates[0].new, v2.to_string());
    assert_eq!(updates[0].affected, ["app"]);
    assert_eq!(project.lock().unwrap().bases[&base], v2.to_string());
    assert_eq!(b.get_ref(&base).unwrap().unwrap().digest, v2);
    let fourth = project.build(&b, &[], &popts, &progress).unwrap();
    assert_eq!(fourth.images["app"].images_used[&base], v2);
    // A copy-only app follows the moved base: rebased, no step runs (docs/rebase.md).
    assert_eq!(fourth.images["app"].steps_run, 0);
    assert!(
        fourth.images["app"]
            .rebased_onto
            .as_deref()
            .is_some_and(|o| o.ends_with(&v2.to_string())),
        "{:?}",
        fourth.images["app"].rebased_onto
    );
    assert_ne!(
        fourth.images["app"].descriptor,
        first.images["app"].descriptor
    );
    // The v2 base's one layer (with /etc/v2) + the COPY layer.
    let img = b.image("app:latest").unwrap();
    assert_eq!(img.manifest.layers.len(), 2);
    let v2_layer = b.image(&base).unwrap().manifest.layers[0].digest.clone();
    assert_eq!(img.manifest.layers[0].digest, v2_layer);
    // A second update finds nothing to move.
    assert!(
        project
            .update_with(&b, &[], &fast_pulls(), &progress)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn unreachable_registry_names_the_host_and_the_line() {
    // A port nothing listens on.
    let host = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[
            (
                "Dockerfile",
                &format!("# base\nFROM {host}/org/base:1\nCOPY a /a\n"),
            ),
            ("a", "a"),
        ],
    );
    let mut opts = BuildOptions::new(ctx.path());
    opts.pull = fast_pulls();
    let err = strata_build::build(&store, &opts, &strata_build::NoProgress).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("Dockerfile:2"), "{text}");
    assert!(text.contains(&format!("FROM {host}/org/base:1")), "{text}");
    assert!(
        text.contains(&format!("pulling it from {host} failed")),
        "{text}"
    );
    // The cause (the refused connection) is in the chain the CLI prints.
    let mut chain = Vec::new();
    let mut cur: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = cur {
        chain.push(e.to_string());
        cur = e.source();
    }
    assert!(chain.len() > 2, "{chain:?}");
    assert!(store.list_refs().unwrap().is_empty());

    // `COPY --from=` an unreachable image: the COPY line is named.
    write_files(
        ctx.path(),
        &[(
            "Dockerfile",
            &format!("FROM scratch\nCOPY --from={host}/org/tools:1 /x /x\n"),
        )],
    );
    let text = strata_build::build(&store, &opts, &strata_build::NoProgress)
        .unwrap_err()
        .to_string();
    assert!(text.contains("Dockerfile:2"), "{text}");
    assert!(text.contains(&format!("pulling it from {host}")), "{text}");
}
