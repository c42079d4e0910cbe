//! `strata registry org|user|token|gc --config FILE`: the admin commands read the file `serve`
//! reads, so with `[postgres]` they act on the database every replica shares.

use strata_test_support::Postgres;

use crate::common::*;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn admin_commands_act_on_the_database_of_the_serve_config() {
    let Some(pg) = Postgres::start("admin_commands_act_on_the_database_of_the_serve_config") else {
        return;
    };
    let env = Env::new();
    // Two replicas' files: their own roots, one database.
    for name in ["a", "b"] {
        std::fs::write(
            env.path(&format!("{name}.toml")),
            format!(
                "root = {:?}\nauth = \"orgs\"\n[postgres]\nurl = {:?}\n",
                env.path(&format!("root-{name}")),
                pg.url()
            ),
        )
        .unwrap();
    }
    let (a, b) = (env.path("a.toml"), env.path("b.toml"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    ok(&env.strata(&["registry", "org", "create", "acme", "--config", a]));
    ok(&env.strata(&[
        "registry",
        "user",
        "create",
        "alice",
        "--org",
        "acme",
        "--password",
        "pw",
        "--config",
        b,
    ]));
    let token = ok(&env.strata(&[
        "registry", "token", "create", "--org", "acme", "--scope", "push", "--config", b,
    ]));
    assert!(token.trim().starts_with("strata_"), "{token}");
    assert_eq!(
        ok(&env.strata(&["registry", "org", "list", "--config", b])),
        "acme\n"
    );
    let listed = ok(&env.strata(&["registry", "token", "list", "--config", a]));
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let id = listed.split('\t').next().unwrap();
    ok(&env.strata(&["registry", "token", "revoke", id, "--config", a]));
    assert_eq!(
        ok(&env.strata(&["registry", "token", "list", "--config", b])),
        ""
    );
    let gc = ok(&env.strata(&["registry", "gc", "--config", b]));
    assert!(gc.contains("Deleted 0 manifests"), "{gc}");
    assert!(
        !env.path("root-a/registry-v1.db").exists(),
        "nothing in SQLite when the file names PostgreSQL"
    );

    // A URL of another kind is refused, naming the file and the key.
    std::fs::write(
        env.path("bad.toml"),
        "[postgres]\nurl = \"mysql://db/registry\"\n",
    )
    .unwrap();
    let out = env.strata(&[
        "registry",
        "org",
        "list",
        "--config",
        env.path("bad.toml").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("[postgres] url"),
        "{err}"
    );
}
