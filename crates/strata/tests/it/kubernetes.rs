//! `strata deploy --target kubernetes` end to end without a cluster: the app is built, pushed
//! to strata's registry and written as Kubernetes objects that run the image by the digest the
//! registry has; what is missing is refused before anything is built. (Applying with kubectl
//! is a unit test of the command line, with a stand-in kubectl: CI has no cluster.)

use std::path::Path;

use strata_deploy::kubernetes::Objects;

use crate::common::*;

fn write_project(dir: &Path, app: &str) {
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), "v1\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM busybox\nCOPY site/ /www/\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("strata.toml"),
        format!("[[image]]\nname = \"web\"\n\n{app}"),
    )
    .unwrap();
}

#[test]
fn deploy_to_kubernetes_writes_objects_that_run_the_pushed_digest() {
    let env = Env::new();
    import_busybox(&env, "busybox");
    let registry = Registry::start(&env);
    let registry = format!("127.0.0.1:{}/team", registry.port);
    let proj = env.path("proj");
    let p = proj.to_str().unwrap();
    write_project(
        &proj,
        &format!(
            "[app.web]\nimage = \"web\"\nport = 8080\nregistry = \"{registry}\"\n\
             env = {{ GREETING = \"hi\" }}\nvolumes = [\"web_data:/data\"]\n\
             health = {{ path = \"/\", interval = \"1s\" }}\n"
        ),
    );

    // Refused before anything is built: nowhere to put the objects, an unknown target.
    let err = env.fails(&["deploy", "web", "--project", p, "--target", "kubernetes"]);
    assert!(err.contains("`--out DIR`"), "{err}");
    let err = env.fails(&["deploy", "web", "--project", p, "--target", "nomad"]);
    assert!(
        err.contains("--target `nomad`: expected local, kubernetes or swarm"),
        "{err}"
    );
    assert!(!env.ok(&["images"]).contains("web:"), "built anyway");

    let out = env.path("k8s");
    let o = out.to_str().unwrap();
    let stdout = env.ok(&[
        "deploy",
        "web",
        "--project",
        p,
        "--target",
        "kubernetes",
        "--out",
        o,
        "--progress",
        "plain",
    ]);
    let pushed = stdout.trim();
    assert!(
        pushed.starts_with(&format!("{registry}/web:deployment-")),
        "{stdout}"
    );
    // The digest the deploy pushed, from the image the registry serves.
    let local = pushed.replacen(&format!("{registry}/"), "", 1);
    let inspect: serde_json::Value =
        serde_json::from_str(&env.ok(&["inspect", &local, "--json"])).unwrap();
    let digest = inspect["descriptor"]["digest"].as_str().unwrap();
    let fresh = Env::new();
    let pulled = fresh.ok(&["pull", pushed, "--progress", "plain"]);
    assert!(pulled.contains(digest), "{pulled}");

    let file = out.join("web.json");
    let objects = Objects::from_json(&std::fs::read_to_string(&file).unwrap(), &file).unwrap();
    let pod = objects
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some(format!("{registry}/web@{digest}").as_str())
    );
    assert_eq!(c.env.as_ref().unwrap()[0].name, "GREETING");
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/")
    );
    assert_eq!(objects.claims[0].metadata.name.as_deref(), Some("web-data"));
    assert!(objects.service.is_some());

    // `target` and `[kubernetes] out` in strata.toml do the same without flags; the image is
    // the one already pushed (nothing changed), so the objects are the same.
    write_project(
        &proj,
        &format!(
            "[app.web]\nimage = \"web\"\nport = 8080\nregistry = \"{registry}\"\n\
             target = \"kubernetes\"\nenv = {{ GREETING = \"hi\" }}\n\
             volumes = [\"web_data:/data\"]\nhealth = {{ path = \"/\", interval = \"1s\" }}\n\n\
             [kubernetes]\nout = \"objects\"\n"
        ),
    );
    env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
    assert_eq!(
        std::fs::read_to_string(proj.join("objects/web.json")).unwrap(),
        std::fs::read_to_string(&file).unwrap()
    );

    // An app without a registry cannot be run by an orchestrator.
    write_project(&proj, "[app.web]\nimage = \"web\"\nport = 8080\n");
    let err = env.fails(&[
        "deploy",
        "web",
        "--project",
        p,
        "--target",
        "kubernetes",
        "--out",
        o,
    ]);
    assert!(err.contains("set `registry ="), "{err}");
}
