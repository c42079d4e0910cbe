//! Push and pull against strata's own registry (`strata-registry-server`, in process on
//! 127.0.0.1:0) in multi-tenant mode: the Bearer flow through its `/token` endpoint, a mount
//! between repositories of one org, and refusals across orgs.

use std::process::Command;
use std::time::Duration;

use strata_oci::Reference;
use strata_registry::{ClientOptions, CredentialSource, Credentials};
use strata_registry_server::{Admin, AuthMode, ServerConfig};
use strata_store::Store;
use strata_transfer::{ImportOptions, PullOptions, PushOptions, import_tarball, pull, push};

struct Server {
    host: String,
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn start_orgs_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path());
    config.auth = AuthMode::Orgs;
    let admin = Admin::with_config(&config).unwrap();
    admin.create_org("a").unwrap();
    admin.create_org("b").unwrap();
    admin.create_user("a", "alice", "alice-pw").unwrap();
    admin.create_user("b", "bob", "bob-pw").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let host = listener.local_addr().unwrap().to_string();
    rt.spawn(async move {
        let _ = strata_registry_server::serve(config, listener).await;
    });
    Server {
        host,
        _rt: rt,
        _dir: dir,
    }
}

fn busybox_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let bin = std::fs::read("/bin/busybox").unwrap();
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
    b.into_inner().unwrap()
}

fn user(u: &str, p: &str) -> ClientOptions {
    ClientOptions {
        credentials: CredentialSource::Explicit(Credentials::UserPassword {
            username: u.into(),
            password: p.into(),
        }),
        backoff: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

#[test]
fn bearer_flow_mount_within_org_and_refusal_across_orgs() {
    let srv = start_orgs_server();
    let dir = tempfile::tempdir().unwrap();
    let a = Store::open(dir.path()).unwrap();
    import_tarball(&a, &busybox_tar()[..], "busybox", &ImportOptions::default()).unwrap();
    let alice = user("alice", "alice-pw");
    let push_as = |c: &ClientOptions| PushOptions {
        client: c.clone(),
        ..PushOptions::default()
    };
    let pull_as = |c: &ClientOptions| PullOptions {
        client: c.clone(),
        ..PullOptions::default()
    };

    let base = Reference::parse(&format!("{}/a/base:1", srv.host)).unwrap();
    let r = push(&a, "busybox", &base, &push_as(&alice)).unwrap();
    assert_eq!(r.blobs_uploaded, 2, "{r:?}");

    // Another repository of org a: the layer is mounted (the token carries pull on a/base).
    let other = Reference::parse(&format!("{}/a/other:1", srv.host)).unwrap();
    let r = push(&a, "busybox", &other, &push_as(&alice)).unwrap();
    assert_eq!((r.blobs_mounted, r.bytes_uploaded), (2, 0), "{r:?}");

    // Pull back into an empty store through the token flow.
    let dir_b = tempfile::tempdir().unwrap();
    let b = Store::open(dir_b.path()).unwrap();
    let p = pull(&b, &base, &pull_as(&alice)).unwrap();
    assert_eq!(
        p.descriptor.digest,
        a.image("busybox:latest").unwrap().descriptor.digest
    );

    // Bob (org b) cannot pull org a's image, nor push into it; anonymous cannot either.
    let bob = user("bob", "bob-pw");
    let e = pull(&b, &base, &pull_as(&bob)).unwrap_err().to_string();
    assert!(e.contains("DENIED") && e.contains("a/base"), "{e}");
    let e = push(&a, "busybox", &base, &push_as(&bob))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("denied") || e.contains("unauthorized") || e.contains("DENIED"),
        "{e}"
    );
    let anon = ClientOptions {
        credentials: CredentialSource::Anonymous,
        ..ClientOptions::default()
    };
    assert!(pull(&b, &base, &pull_as(&anon)).is_err());
    // Wrong password: a clear error naming the registry.
    let e = pull(&b, &base, &pull_as(&user("alice", "nope")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unauthorized") && e.contains(&srv.host), "{e}");

    // Bob pushing his own copy into org b works; mounting from a/base is refused by the server
    // and falls back to an upload.
    let mine = Reference::parse(&format!("{}/b/copy:1", srv.host)).unwrap();
    let mut opts = push_as(&bob);
    opts.mount_from = vec!["a/base".to_string()];
    let r = push(&a, "busybox", &mine, &opts).unwrap();
    assert_eq!((r.blobs_mounted, r.blobs_uploaded), (0, 2), "{r:?}");
}
