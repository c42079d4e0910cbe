//! One set of behaviour tests for the metadata store, run on SQLite and on PostgreSQL (a private
//! cluster; the PostgreSQL half skips loudly only when PostgreSQL is not installed).

use strata_oci::Digest;
use strata_registry_server::{Admin, Error, MetaKind, ServerConfig, TokenScope};
use strata_test_support::Postgres;

fn check_store(admin: &Admin, again: &Admin) {
    // Orgs: created once, listed sorted, names checked.
    admin.create_org("zeta").unwrap();
    admin.create_org("acme").unwrap();
    assert!(matches!(
        admin.create_org("acme"),
        Err(Error::OrgExists { .. })
    ));
    assert!(matches!(
        admin.create_org("Bad/Org"),
        Err(Error::InvalidOrg { .. })
    ));
    assert_eq!(again.orgs().unwrap(), ["acme", "zeta"]);

    // Users: unique across orgs, in an existing org, with a valid name.
    admin.create_user("acme", "alice", "secret").unwrap();
    assert!(matches!(
        again.create_user("zeta", "alice", "other"),
        Err(Error::UserExists { .. })
    ));
    assert!(matches!(
        admin.create_user("nope", "bob", "pw"),
        Err(Error::UnknownOrg { .. })
    ));
    assert!(matches!(
        admin.create_user("acme", "bad name", "pw"),
        Err(Error::InvalidUser { .. })
    ));

    // Tokens: made on one handle, listed (no secrets) and revoked on another.
    let token = admin.create_token("acme", TokenScope::Push).unwrap();
    assert!(token.starts_with("strata_"));
    admin.create_token("zeta", TokenScope::Pull).unwrap();
    assert!(matches!(
        admin.create_token("nope", TokenScope::Pull),
        Err(Error::UnknownOrg { .. })
    ));
    let all = again.tokens(None).unwrap();
    assert_eq!(all.len(), 2);
    let acme = again.tokens(Some("acme")).unwrap();
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0].scope, TokenScope::Push);
    assert_eq!(acme[0].id.len(), 12);
    assert!(again.revoke_token(&acme[0].id).unwrap());
    assert!(!admin.revoke_token(&acme[0].id).unwrap());
    assert_eq!(admin.tokens(Some("acme")).unwrap(), []);

    // Pins: one per holder, idempotent, removed by holder.
    let d = Digest::sha256(b"manifest");
    admin.pin("acme/app", &d, "m1").unwrap();
    admin.pin("acme/app", &d, "m1").unwrap();
    again.pin("acme/app", &d, "m2").unwrap();
    let pins = admin.pins().unwrap();
    assert_eq!(pins.len(), 2);
    assert!(pins.iter().all(|p| p.repo == "acme/app" && p.digest == d));
    assert!(admin.pin("Bad Repo", &d, "m1").is_err());
    assert!(again.unpin("acme/app", &d, "m1").unwrap());
    assert!(!admin.unpin("acme/app", &d, "m1").unwrap());
    assert_eq!(admin.pins().unwrap().len(), 1);
}

#[test]
fn metadata_behaviour_on_sqlite() {
    let tmp = tempfile::tempdir().unwrap();
    let admin = Admin::open(tmp.path()).unwrap();
    let again = Admin::open(tmp.path()).unwrap();
    check_store(&admin, &again);
}

#[test]
fn metadata_behaviour_on_postgres() {
    let Some(pg) = Postgres::start("metadata_behaviour_on_postgres") else {
        return;
    };
    let url = pg.create_database("meta");
    // Two registries with their own roots share everything through the database.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let config = |root: &std::path::Path| {
        let mut c = ServerConfig::new(root);
        c.meta = MetaKind::Postgres { url: url.clone() };
        c
    };
    let admin = Admin::with_config(&config(a.path())).unwrap();
    let again = Admin::with_config(&config(b.path())).unwrap();
    check_store(&admin, &again);
    assert!(
        !a.path().join("registry-v1.db").exists(),
        "no SQLite file with PostgreSQL"
    );

    // Opening an up-to-date database migrates nothing and keeps the data.
    drop(admin);
    let reopened = Admin::with_config(&config(a.path())).unwrap();
    assert_eq!(reopened.orgs().unwrap(), ["acme", "zeta"]);

    // A bad URL is an error that names the setting, not a panic or a hang.
    let mut bad = ServerConfig::new(a.path());
    bad.meta = MetaKind::Postgres {
        url: "postgres://x@127.0.0.1:notaport/db".into(),
    };
    let err = Admin::with_config(&bad).err().expect("a bad URL must fail");
    assert!(err.to_string().contains("[postgres] url"), "{err}");
}
