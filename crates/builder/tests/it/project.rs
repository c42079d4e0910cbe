//! strata.toml projects: the Tilt base-image example, dependency order, lock file, errors.

use std::collections::BTreeMap;
use std::path::Path;

use strata_build::{CollectProgress, Error, Event, Project, ProjectBuild, ProjectOptions};
use strata_store::Store;
use strata_test_support::can_run_containers;

use crate::common::*;

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

fn example() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tilt-base-image"),
        d.path(),
    );
    d
}

fn build_project(store: &Store, p: &Project, opts: &ProjectOptions) -> (ProjectBuild, Vec<Event>) {
    let progress = CollectProgress::default();
    let out = match p.build(store, &[], opts, &progress) {
        Ok(o) => o,
        Err(e) => panic!("project build failed: {e}\n{:#?}", progress.take()),
    };
    for o in out.images.values() {
        strata_oci::validate_image(store, &o.descriptor).unwrap();
    }
    (out, progress.take())
}

fn run_per_image(b: &ProjectBuild) -> BTreeMap<String, usize> {
    b.images
        .iter()
        .map(|(n, o)| (n.clone(), o.steps_run))
        .collect()
}

#[test]
fn tilt_base_image_example_rebuilds_only_what_changed() {
    if !can_run_containers("tilt_base_image_example_rebuilds_only_what_changed") {
        return;
    }
    let (_d, store) = store_with_busybox();
    let dir = example();
    let project = Project::load(&dir.path().join("strata.toml")).unwrap();
    assert_eq!(
        project.order(&[]).unwrap(),
        vec![vec!["tilt-base".to_string()], vec!["tilt-app".to_string()]]
    );
    let opts = ProjectOptions {
        explain: true,
        ..ProjectOptions::default()
    };

    // Cold build: both images, base first; the app is pinned to the base just built.
    let (cold, _) = build_project(&store, &project, &opts);
    assert_eq!(cold.order, ["tilt-base", "tilt-app"]);
    assert_eq!(
        run_per_image(&cold),
        BTreeMap::from([("tilt-app".into(), 4), ("tilt-base".into(), 4)])
    );
    let (_g, root) = umoci_unpack(&store, "tilt-app");
    assert_eq!(
        std::fs::read_to_string(root.join("app/deps-seen.txt")).unwrap(),
        "express\nlodash\n"
    );
    assert!(root.join("deps/node_modules/lodash/index.js").exists());
    assert!(root.join("app/start.sh").exists() && root.join("app/index.js").exists());
    assert!(!root.join("app/package").exists() && !root.join("app/strata.toml").exists());
    let app_cfg = config_of(&store, &cold.images["tilt-app"]).config.unwrap();
    assert_eq!(app_cfg.labels.unwrap()["org.example.app"], "tilt-app");
    assert!(
        app_cfg
            .env
            .unwrap()
            .contains(&"NODE_PATH=/deps/node_modules".to_string())
    );
    // The external base is locked.
    let lock = project.lock().unwrap();
    assert_eq!(lock.bases.keys().collect::<Vec<_>>(), ["busybox:latest"]);
    assert!(dir.path().join("strata.lock").exists());

    // Nothing changed: nothing runs, same images.
    let t = std::time::Instant::now();
    project
        .build(&store, &[], &opts, &strata_build::NoProgress)
        .unwrap();
    eprintln!("no-op rebuild of the two-image project: {:?}", t.elapsed());
    let (noop, events) = build_project(&store, &project, &opts);
    assert_eq!(
        run_per_image(&noop),
        BTreeMap::from([("tilt-app".into(), 0), ("tilt-base".into(), 0)]),
        "{events:#?}"
    );
    assert_eq!(
        noop.images["tilt-app"].descriptor,
        cold.images["tilt-app"].descriptor
    );

    // An app source changed: only the app's steps from the COPY on.
    std::fs::write(dir.path().join("src/index.js"), "console.log('v2');\n").unwrap();
    let (app, events) = build_project(&store, &project, &opts);
    assert_eq!(
        run_per_image(&app),
        BTreeMap::from([("tilt-app".into(), 3), ("tilt-base".into(), 0)])
    );
    assert_eq!(
        ran(&events),
        [
            "COPY src/ ./",
            "RUN ls \"$NODE_PATH\" > /app/deps-seen.txt",
            "CMD [\"sh\", \"/app/start.sh\"]"
        ]
    );
    assert!(
        app.images["tilt-app"].explanations[0]
            .1
            .contains("file `src/index.js` changed")
    );

    // A dependency was added: the base rebuilds from its COPY; the app's WORKDIR and COPY
    // follow the new base (the last build's layers), its RUN and what follows run again.
    std::fs::write(
        dir.path().join("package/deps.txt"),
        "express\nlodash\nleft-pad\n",
    )
    .unwrap();
    let (both, _) = build_project(&store, &project, &opts);
    assert_eq!(
        run_per_image(&both),
        BTreeMap::from([("tilt-app".into(), 2), ("tilt-base".into(), 3)])
    );
    assert!(both.images["tilt-app"].rebased_onto.is_none());
    let app_why = &both.images["tilt-app"].explanations[0].1;
    assert!(
        app_why.contains("base image changed")
            && app_why.contains("not rebased onto the new base: `RUN ls"),
        "{app_why}"
    );
    assert!(
        both.images["tilt-base"].explanations[0]
            .1
            .contains("file `deps.txt` changed")
    );
    let (_g, root) = umoci_unpack(&store, "tilt-app");
    assert!(
        std::fs::read_to_string(root.join("app/deps-seen.txt"))
            .unwrap()
            .contains("left-pad")
    );

    // Building only the app still builds (here: checks) its base first.
    let progress = CollectProgress::default();
    let only = project
        .build(&store, &["tilt-app".to_string()], &opts, &progress)
        .unwrap();
    assert_eq!(only.order, ["tilt-base", "tilt-app"]);
    assert!(only.images.values().all(|o| o.steps_run == 0));
}

#[test]
fn project_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("strata.toml");
    std::fs::write(&p, "[[image]]\nname = \"a\"\ncontext = 3\n").unwrap();
    let err = Project::load(&p).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Project {
                line: Some((3, _)),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("strata.toml:3:"), "{err}");

    std::fs::write(&p, "[[image]]\nname = \"a\"\nbogus = 1\n").unwrap();
    let err = Project::load(&p).unwrap_err().to_string();
    assert!(err.contains("bogus"), "{err}");

    // A misspelt table drops nothing silently: it is an error at its line.
    std::fs::write(&p, "[[image]]\nname = \"a\"\n\n[[imgae]]\nname = \"b\"\n").unwrap();
    let err = Project::load(&p).unwrap_err().to_string();
    assert!(
        err.contains("strata.toml:4:") && err.contains("imgae"),
        "{err}"
    );
    write_files(dir.path(), &[("Dockerfile", "FROM busybox\n")]);
    std::fs::write(&p, "[[image]]\nname = \"a\"\n[app.a]\nimage = \"a\"\n").unwrap();
    Project::load(&p).expect("[app.*] tables are strata deploy's, and allowed");

    // A cycle.
    write_files(
        dir.path(),
        &[
            ("a/Dockerfile", "FROM b\n"),
            ("b/Dockerfile", "FROM busybox AS x\nCOPY --from=a / /\n"),
        ],
    );
    std::fs::write(
        &p,
        "[[image]]\nname = \"a\"\ncontext = \"a\"\n[[image]]\nname = \"b\"\ncontext = \"b\"\n",
    )
    .unwrap();
    let err = Project::load(&p).unwrap_err().to_string();
    assert!(err.contains("cycle"), "{err}");

    // Unknown image names.
    write_files(dir.path(), &[("b/Dockerfile", "FROM busybox\n")]);
    let project = Project::load(&p).unwrap();
    assert_eq!(project.deps["a"].iter().collect::<Vec<_>>(), ["b"]);
    let err = project
        .order(&["nope".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no image `nope`"), "{err}");
}

#[test]
fn lock_pins_external_bases_until_update() {
    let Some((_d, store, dir)) = run_lab("lock_pins_external_bases_until_update") else {
        return;
    };
    write_files(
        dir.path(),
        &[
            ("strata.toml", "[[image]]\nname = \"locked\"\n"),
            (
                "Dockerfile",
                "FROM busybox\nRUN cat /marker 2>/dev/null > /seen || true\n",
            ),
        ],
    );
    let project = Project::load(dir.path()).unwrap();
    let opts = ProjectOptions::default();
    let (first, _) = build_project(&store, &project, &opts);
    let old = store.get_ref("busybox:latest").unwrap().unwrap();

    // busybox:latest moves: a new image with an extra layer, via a build.
    let ctx = tempfile::tempdir().unwrap();
    write_files(
        ctx.path(),
        &[("Dockerfile", "FROM busybox\nRUN echo new > /marker\n")],
    );
    let mut o = strata_build::BuildOptions::new(ctx.path());
    o.tags = vec!["busybox:latest".into()];
    build_ok(&store, &o);
    assert_ne!(store.get_ref("busybox:latest").unwrap().unwrap(), old);

    // The lock still says the old digest: nothing rebuilds.
    let (second, _) = build_project(&store, &project, &opts);
    assert_eq!(second.images["locked"].steps_run, 0);
    assert_eq!(
        second.images["locked"].descriptor,
        first.images["locked"].descriptor
    );

    // gc may delete the locked base once no name reaches it; the next build then says what
    // happened and what to run (it used to blame `FROM` and a registry).
    let report = store.gc(false).unwrap();
    assert!(
        report.removed.iter().any(|(d, _)| *d == old.digest),
        "gc collects the old base manifest: {:?}",
        report.removed
    );
    {
        let err = match project.build(&store, &[], &opts, &CollectProgress::default()) {
            Ok(_) => panic!("the locked base is gone, yet the build succeeded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("strata.lock")
                && err.contains("strata update")
                && err.contains(&old.digest.to_string()),
            "{err}"
        );
    }

    // update moves it and names the affected image; the next build uses the new base.
    let updates = project.update(&store, &[]).unwrap();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].base, "busybox:latest");
    assert_eq!(updates[0].affected, ["locked"]);
    let (third, _) = build_project(&store, &project, &opts);
    assert_eq!(third.images["locked"].steps_run, 1);
    let (_g, root) = umoci_unpack(&store, "locked");
    assert_eq!(std::fs::read_to_string(root.join("seen")).unwrap(), "new\n");
}
