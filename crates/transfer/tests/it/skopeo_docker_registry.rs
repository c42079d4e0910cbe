//! Interop with the two reference tools at once: `skopeo copy` moves an image out of a strata
//! store (an OCI layout) into Debian's `docker-registry` (distribution 2.8) and back into a
//! fresh OCI directory with the manifest digest unchanged; then `strata_transfer::pull` fetches
//! what skopeo pushed into an empty store and the image validates.
//!
//! Skips loudly when `/usr/bin/docker-registry` or `/usr/bin/skopeo` is absent (CI installs
//! both via `.ci/run`).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_oci::Reference;
use strata_registry::{ClientOptions, CredentialSource};
use strata_store::Store;
use strata_transfer::{ImportOptions, PullOptions, import_tarball, pull};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const SKOPEO: &str = "/usr/bin/skopeo";

fn have_tools() -> bool {
    let missing: Vec<&str> = [REGISTRY_BIN, SKOPEO]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "!!!!!!!!!! SKIPPED: {missing:?} not installed (apt-get install docker-registry skopeo); \
         the skopeo/docker-registry interop test did not run !!!!!!!!!!"
    );
    false
}

/// docker-registry on a free loopback port, killed on drop; same setup as registry_docker.rs.
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
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: strata-test-secret\n",
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
    for d in ["bin", "etc", "root", "tmp"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, d, std::io::empty()).unwrap();
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

fn skopeo(args: &[String]) {
    let out = Command::new(SKOPEO).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn skopeo_moves_a_strata_image_through_docker_registry_and_strata_pulls_it_back() {
    if !have_tools() {
        return;
    }
    let reg = Registry::start();
    let tmp = tempfile::tempdir().unwrap();

    // The source: a strata store holding busybox, imported from a rootfs tar.
    let src_dir = tmp.path().join("src");
    let src = Store::open(&src_dir).unwrap();
    let imported = import_tarball(
        &src,
        &busybox_tar()[..],
        "busybox",
        &ImportOptions::default(),
    )
    .unwrap();
    assert_eq!(imported.name, "busybox:latest");
    let src_manifest = src.read_blob(&imported.descriptor.digest).unwrap();

    // strata store -> docker-registry, by skopeo reading the store as an OCI layout.
    let remote = format!("{}/interop/busybox:1", reg.host());
    skopeo(&[
        "copy".into(),
        "--dest-tls-verify=false".into(),
        format!("oci:{}:busybox:latest", src_dir.display()),
        format!("docker://{remote}"),
    ]);

    // docker-registry -> a fresh OCI directory: the manifest comes back byte for byte.
    let back_dir = tmp.path().join("back");
    skopeo(&[
        "copy".into(),
        "--src-tls-verify=false".into(),
        format!("docker://{remote}"),
        format!("oci:{}:back", back_dir.display()),
    ]);
    let back = Store::open(&back_dir).unwrap();
    let back_desc = back.get_ref("back").unwrap().unwrap();
    assert_eq!(back_desc.digest, imported.descriptor.digest);
    assert_eq!(back.read_blob(&back_desc.digest).unwrap(), src_manifest);
    strata_oci::validate_image(&back, &back_desc).unwrap();

    // docker-registry -> an empty strata store, by strata's own client.
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = Store::open(dst_dir.path()).unwrap();
    let opts = PullOptions {
        client: ClientOptions {
            credentials: CredentialSource::Anonymous,
            backoff: Duration::from_millis(20),
            ..ClientOptions::default()
        },
        ..PullOptions::default()
    };
    let report = pull(&dst, &Reference::parse(&remote).unwrap(), &opts).unwrap();
    assert_eq!(report.manifest.digest, imported.descriptor.digest);
    assert_eq!(report.descriptor.digest, imported.descriptor.digest);
    let pulled = dst.get_ref(&report.name).unwrap().unwrap();
    assert_eq!(pulled.digest, imported.descriptor.digest);
    assert_eq!(dst.read_blob(&pulled.digest).unwrap(), src_manifest);
    strata_oci::validate_image(&dst, &pulled).unwrap();
    // Every layer of the original arrived with the same digest.
    let image = dst.image(&report.name).unwrap();
    let src_image = src.image("busybox:latest").unwrap();
    assert_eq!(image.manifest.layers, src_image.manifest.layers);
    assert_eq!(image.config_bytes, src_image.config_bytes);
}
