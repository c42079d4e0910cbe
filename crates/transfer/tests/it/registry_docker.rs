//! Push and pull against Debian's reference registry (`docker-registry`, distribution 2.8),
//! started per test on a free loopback port: round trip with identical digests, nothing
//! uploaded twice, cross-repository mounts, Basic auth, chunked uploads, and transfers that
//! survive a connection cut in the middle (a TCP proxy that cuts once).
//!
//! Skips loudly when `/usr/bin/docker-registry` is absent (CI installs it via `.ci/run`).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_oci::{Descriptor, ImageConfig, Manifest, Reference, media_type};
use strata_registry::{Client, ClientOptions, CredentialSource, Credentials, DockerConfig};
use strata_store::Store;
use strata_transfer::{
    BlobProgress, BlobState, ImportOptions, PullOptions, PushOptions, import_tarball, pull, push,
};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

fn have_registry() -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    eprintln!(
        "SKIPPED: {REGISTRY_BIN} is not installed (apt-get install docker-registry); \
         registry push/pull tests did not run"
    );
    false
}

struct Registry {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    /// Start docker-registry; with `users`, Basic auth against an htpasswd file of them.
    fn start(users: &[(&str, &str)]) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let mut auth = String::new();
        if !users.is_empty() {
            let htpasswd = dir.path().join("htpasswd");
            let mut lines = String::new();
            for (u, p) in users {
                // Cost 4 (the minimum) keeps the registry's per-request check fast.
                lines.push_str(&format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap()));
            }
            std::fs::write(&htpasswd, lines).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: strata-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: strata-test-secret\n{auth}",
            storage.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reg = Registry {
            child,
            port,
            _dir: dir,
        };
        wait_for_port(port);
        reg
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("docker-registry did not listen on {port}");
}

/// A tar of a busybox root filesystem.
fn busybox_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let bin = std::fs::read("/bin/busybox").unwrap();
    let add_dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, p, std::io::empty()).unwrap();
    };
    for d in ["bin", "etc", "root", "tmp"] {
        add_dir(&mut b, d);
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(bin.len() as u64);
    b.append_data(&mut h, "bin/busybox", &bin[..]).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8(list.stdout).unwrap().lines() {
        if applet == "busybox" || applet.is_empty() {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .unwrap();
    }
    for (p, body) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, p, body.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn store_with_busybox() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    import_tarball(
        &store,
        &busybox_tar()[..],
        "busybox",
        &ImportOptions::default(),
    )
    .unwrap();
    (dir, store)
}

fn empty_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// An image `app:1` = busybox's layer + one small uncompressed layer; returns the sizes of
/// (app layer, app config).
fn add_app_image(store: &Store) -> (u64, u64) {
    let base = store.image("busybox:latest").unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let body = b"hello from the app\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(body.len() as u64);
    b.append_data(&mut h, "hello.txt", &body[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let (layer_digest, layer_size) = store.put_blob_bytes(&layer, None).unwrap();
    let mut config: ImageConfig = serde_json::from_slice(&base.config_bytes).unwrap();
    config.rootfs.diff_ids.push(layer_digest.clone());
    let config_bytes = config.to_canonical_json().unwrap();
    let (config_digest, config_size) = store.put_blob_bytes(&config_bytes, None).unwrap();
    let mut layers = base.manifest.layers.clone();
    layers.push(Descriptor::new(
        media_type::OCI_LAYER_TAR,
        layer_digest,
        layer_size,
    ));
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.to_string()),
        artifact_type: None,
        config: Descriptor::new(media_type::OCI_CONFIG, config_digest, config_size),
        layers,
        subject: None,
        annotations: None,
    };
    let desc = store.put_manifest(&manifest).unwrap();
    store.set_ref("app:1", desc).unwrap();
    (layer_size, config_size)
}

fn anon() -> ClientOptions {
    ClientOptions {
        credentials: CredentialSource::Anonymous,
        backoff: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

fn push_opts(client: ClientOptions) -> PushOptions {
    PushOptions {
        client,
        ..PushOptions::default()
    }
}

fn pull_opts(client: ClientOptions) -> PullOptions {
    PullOptions {
        client,
        ..PullOptions::default()
    }
}

fn reference(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

#[test]
fn push_pull_round_trip_skips_existing_and_mounts_shared_layers() {
    if !have_registry() {
        return;
    }
    let reg = Registry::start(&[]);
    let (_a, a) = store_with_busybox();
    let local = a.image("busybox:latest").unwrap();
    let layer_size = local.manifest.layers[0].size;
    let config_size = local.manifest.config.size;

    // First push: everything goes up, with progress for each blob.
    let events: Arc<Mutex<Vec<BlobProgress>>> = Arc::default();
    let ev = Arc::clone(&events);
    let mut opts = push_opts(anon());
    opts.progress = Some(Arc::new(move |p: &BlobProgress| {
        ev.lock().unwrap().push(p.clone())
    }));
    let dest = reference(&format!("{}/team/busybox:1", reg.host()));
    let r = push(&a, "busybox", &dest, &opts).unwrap();
    assert_eq!(r.blobs_uploaded, 2, "{r:?}");
    assert_eq!(r.blobs_skipped + r.blobs_mounted, 0, "{r:?}");
    assert_eq!(r.bytes_uploaded, layer_size + config_size, "{r:?}");
    assert_eq!(r.reference.digest(), Some(&local.descriptor.digest));
    let events = events.lock().unwrap();
    let layer = &local.manifest.layers[0].digest;
    assert!(
        events
            .iter()
            .any(|e| e.digest == *layer && e.state == BlobState::Done && e.done == layer_size)
    );
    assert!(
        events
            .iter()
            .any(|e| e.digest == *layer && e.state == BlobState::Transferring && e.done > 0)
    );
    drop(events);

    // Second push: nothing to upload.
    let r2 = push(&a, "busybox", &dest, &push_opts(anon())).unwrap();
    assert_eq!((r2.blobs_skipped, r2.blobs_uploaded), (2, 0), "{r2:?}");
    assert_eq!(r2.bytes_uploaded, 0);

    // Pull into an empty store: same manifest digest, valid image, named like Docker does.
    let (_b, b) = empty_store();
    let p = pull(&b, &dest, &pull_opts(anon())).unwrap();
    assert_eq!(p.name, format!("{}/team/busybox:1", reg.host()));
    assert_eq!(p.blobs_fetched, 2);
    assert_eq!(p.descriptor.digest, local.descriptor.digest);
    let pulled = b.image(&p.name).unwrap();
    assert_eq!(pulled.manifest_bytes, local.manifest_bytes);
    assert_eq!(pulled.config_bytes, local.config_bytes);
    strata_oci::validate_image(&b, &pulled.descriptor).unwrap();

    // Pull again: nothing fetched.
    let p2 = pull(&b, &dest, &pull_opts(anon())).unwrap();
    assert_eq!((p2.blobs_present, p2.blobs_fetched), (2, 0), "{p2:?}");
    assert_eq!(p2.bytes_downloaded, 0);

    // Pull by digest gives a name with the digest.
    let by_digest = reference(&format!(
        "{}/team/busybox@{}",
        reg.host(),
        local.descriptor.digest
    ));
    let p3 = pull(&b, &by_digest, &pull_opts(anon())).unwrap();
    assert!(
        p3.name.ends_with(&format!("@{}", local.descriptor.digest)),
        "{}",
        p3.name
    );

    // An app image sharing the base layer, pushed into another repository of the namespace:
    // the base layer is mounted (the store remembers team/busybox has it), only the app's
    // layer and config are uploaded.
    let (app_layer, app_config) = add_app_image(&a);
    let app_dest = reference(&format!("{}/team/app:1", reg.host()));
    let r3 = push(&a, "app:1", &app_dest, &push_opts(anon())).unwrap();
    assert_eq!(r3.blobs_mounted, 1, "{r3:?}");
    assert_eq!(r3.blobs_uploaded, 2, "{r3:?}");
    assert_eq!(r3.bytes_uploaded, app_layer + app_config, "{r3:?}");

    // The app pulls back whole into the second store, reusing its busybox layer.
    let p4 = pull(&b, &app_dest, &pull_opts(anon())).unwrap();
    assert_eq!((p4.blobs_present, p4.blobs_fetched), (1, 2), "{p4:?}");
    strata_oci::validate_image(&b, &b.image(&p4.name).unwrap().descriptor).unwrap();

    // Tags and HEAD through the client.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(&reg.host(), anon()).unwrap();
    let tags = rt.block_on(client.tags("team/busybox")).unwrap();
    assert_eq!(tags, vec!["1".to_string()]);
    let head = rt
        .block_on(client.head_manifest("team/busybox", "1"))
        .unwrap()
        .unwrap();
    assert_eq!(head.digest, local.descriptor.digest);
    assert!(
        rt.block_on(client.head_manifest("team/busybox", "nope"))
            .unwrap()
            .is_none()
    );
    // A missing manifest is a clear error with the registry's own code.
    let e = rt
        .block_on(client.get_manifest("team/busybox", "nope"))
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("MANIFEST_UNKNOWN") && msg.contains("team/busybox:nope"),
        "{msg}"
    );
    assert_eq!(e.status(), Some(404));
}

#[test]
fn basic_auth_wrong_password_fails_clearly_right_one_works_and_login_saves_it() {
    if !have_registry() {
        return;
    }
    let reg = Registry::start(&[("alice", "s3cret")]);
    let (_a, a) = store_with_busybox();
    let dest = reference(&format!("{}/alice/busybox:1", reg.host()));
    let with = |user: &str, pass: &str| ClientOptions {
        credentials: CredentialSource::Explicit(Credentials::UserPassword {
            username: user.into(),
            password: pass.into(),
        }),
        ..anon()
    };

    let e = push(&a, "busybox", &dest, &push_opts(with("alice", "wrong"))).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("unauthorized") && msg.contains(&reg.host()),
        "{msg}"
    );
    assert!(msg.contains("strata login"), "hint missing: {msg}");
    let e = pull(&empty_store().1, &dest, &pull_opts(anon())).unwrap_err();
    assert!(e.to_string().contains("unauthorized"), "{e}");

    push(&a, "busybox", &dest, &push_opts(with("alice", "s3cret"))).unwrap();

    // login: a wrong password is refused and nothing is written; the right one is saved
    // and then used by pull through the Docker config.
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = DockerConfig::in_dir(cfg_dir.path());
    let e =
        strata_registry::login_blocking(&reg.host(), "alice", "nope", &cfg, anon()).unwrap_err();
    assert!(e.to_string().contains("unauthorized"), "{e}");
    assert!(!cfg.path().exists());
    strata_registry::login_blocking(&reg.host(), "alice", "s3cret", &cfg, anon()).unwrap();
    let via_config = ClientOptions {
        credentials: CredentialSource::DockerConfig(cfg.clone()),
        ..anon()
    };
    let (_b, b) = empty_store();
    let p = pull(&b, &dest, &pull_opts(via_config)).unwrap();
    assert_eq!(p.blobs_fetched, 2);
}

#[test]
fn chunked_upload_round_trips() {
    if !have_registry() {
        return;
    }
    let reg = Registry::start(&[]);
    let (_a, a) = store_with_busybox();
    let client = ClientOptions {
        chunk_threshold: 64 * 1024,
        chunk_size: 200 * 1024,
        ..anon()
    };
    let dest = reference(&format!("{}/team/chunked:1", reg.host()));
    let r = push(&a, "busybox", &dest, &push_opts(client)).unwrap();
    assert_eq!(r.blobs_uploaded, 2);
    let (_b, b) = empty_store();
    let p = pull(&b, &dest, &pull_opts(anon())).unwrap();
    assert_eq!(
        p.descriptor.digest,
        a.image("busybox:latest").unwrap().descriptor.digest
    );
}

/// Which way the proxy cuts.
#[derive(Clone, Copy)]
enum Cut {
    /// After this many bytes from the registry on one connection.
    Download(u64),
    /// After this many bytes to the registry on one connection.
    Upload(u64),
}

/// A TCP proxy to `upstream` that cuts one connection once, and notes whether a client sent a
/// `Range` request header.
struct CuttingProxy {
    port: u16,
    cut_done: Arc<AtomicBool>,
    saw_range: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: u16, cut: Cut) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_done = Arc::new(AtomicBool::new(false));
        let saw_range = Arc::new(AtomicBool::new(false));
        let (cd, sr) = (Arc::clone(&cut_done), Arc::clone(&saw_range));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (cd, sr) = (Arc::clone(&cd), Arc::clone(&sr));
                std::thread::spawn(move || proxy_conn(client, server, cut, cd, sr));
            }
        });
        CuttingProxy {
            port,
            cut_done,
            saw_range,
        }
    }
}

fn proxy_conn(
    client: TcpStream,
    server: TcpStream,
    cut: Cut,
    cut_done: Arc<AtomicBool>,
    saw_range: Arc<AtomicBool>,
) {
    let pair = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let kill = move || {
        let _ = pair.0.shutdown(Shutdown::Both);
        let _ = pair.1.shutdown(Shutdown::Both);
    };
    let kill = Arc::new(kill);
    let pump = |mut from: TcpStream,
                mut to: TcpStream,
                limit: Option<u64>,
                sniff: bool,
                kill: Arc<dyn Fn() + Send + Sync>,
                cut_done: Arc<AtomicBool>,
                saw_range: Arc<AtomicBool>| {
        let count = AtomicU64::new(0);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if sniff
                && String::from_utf8_lossy(&buf[..n])
                    .to_ascii_lowercase()
                    .contains("range: bytes=")
            {
                saw_range.store(true, Ordering::SeqCst);
            }
            let total = count.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
            if let Some(limit) = limit
                && total > limit
                && !cut_done.swap(true, Ordering::SeqCst)
            {
                // Forward part of this read, then cut: the peer sees a truncated stream.
                let _ = to.write_all(&buf[..n / 2]);
                kill();
                break;
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    };
    let (down, up) = match cut {
        Cut::Download(n) => (Some(n), None),
        Cut::Upload(n) => (None, Some(n)),
    };
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (k1, cd1, sr1) = (kill.clone(), cut_done.clone(), saw_range.clone());
    let t = std::thread::spawn(move || pump(c2, s2, up, true, k1, cd1, sr1));
    pump(server, client, down, false, kill, cut_done, saw_range);
    let _ = t.join();
}

#[test]
fn interrupted_download_resumes_with_range() {
    if !have_registry() {
        return;
    }
    let reg = Registry::start(&[]);
    let (_a, a) = store_with_busybox();
    let dest = reference(&format!("{}/team/busybox:1", reg.host()));
    push(&a, "busybox", &dest, &push_opts(anon())).unwrap();
    let layer_size = a.image("busybox:latest").unwrap().manifest.layers[0].size;
    assert!(
        layer_size > 300 * 1024,
        "the layer must be larger than the cut point"
    );

    let proxy = CuttingProxy::start(reg.port, Cut::Download(200 * 1024));
    let via_proxy = reference(&format!("127.0.0.1:{}/team/busybox:1", proxy.port));
    let (_b, b) = empty_store();
    let mut opts = pull_opts(anon());
    opts.parallelism = 1;
    let p = pull(&b, &via_proxy, &opts).unwrap();
    assert!(proxy.cut_done.load(Ordering::SeqCst), "the proxy never cut");
    assert!(p.resumed >= 1, "{p:?}");
    assert!(
        proxy.saw_range.load(Ordering::SeqCst),
        "no Range request after the cut"
    );
    // Resumed, not restarted: far less than two layers came over the wire.
    assert!(p.bytes_downloaded < layer_size + layer_size / 2, "{p:?}");
    assert_eq!(
        p.descriptor.digest,
        a.image("busybox:latest").unwrap().descriptor.digest
    );
    let img = b.image(&p.name).unwrap();
    strata_oci::validate_image(&b, &img.descriptor).unwrap();
}

#[test]
fn interrupted_upload_still_completes() {
    if !have_registry() {
        return;
    }
    let reg = Registry::start(&[]);
    let (_a, a) = store_with_busybox();
    for (i, chunked) in [(0, false), (1, true)] {
        let proxy = CuttingProxy::start(reg.port, Cut::Upload(300 * 1024));
        let dest = reference(&format!("127.0.0.1:{}/team/up{i}:1", proxy.port));
        let mut client = anon();
        if chunked {
            client.chunk_threshold = 64 * 1024;
            client.chunk_size = 128 * 1024;
        }
        let mut opts = push_opts(client);
        opts.parallelism = 1;
        let r = push(&a, "busybox", &dest, &opts).unwrap();
        assert!(proxy.cut_done.load(Ordering::SeqCst), "the proxy never cut");
        assert_eq!(r.blobs_uploaded, 2);
        assert!(r.uploads_resumed >= 1, "{r:?}");
        eprintln!("chunked={chunked}: {r:?}");
        // The registry has the image whole: pull it back directly.
        let (_b, b) = empty_store();
        let direct = reference(&format!("{}/team/up{i}:1", reg.host()));
        let p = pull(&b, &direct, &pull_opts(anon())).unwrap();
        assert_eq!(
            p.descriptor.digest,
            a.image("busybox:latest").unwrap().descriptor.digest
        );
    }
}
