//! `strata deploy` from end to end: the image (given, pulled or built), its release name,
//! the push to the app's registry, then the release on this host (machines, health, switch).
//! What builds, pulls and pushes is the caller's, behind [`ImageSource`] and [`Publisher`]:
//! this crate does not depend on the build engine or the registry client.

use strata_oci::{Descriptor, Digest};
use strata_store::Store;

use crate::app::App;
use crate::deploy::{DeployOptions, DeployReport, deploy_image};
use crate::host::{Host, find_image};
use crate::{Error, Result};

/// What the caller's side failed with (a build, a pull, a push), kept whole for its message.
pub type External = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where a deploy's image comes from.
pub trait ImageSource {
    /// Builds the project's image `image` (and what it depends on, when changed) or takes it
    /// from the store; returns the local reference to deploy.
    fn build(&self, store: &Store, image: &str) -> std::result::Result<String, External>;
    /// Pulls `reference` (not in the store) and returns its local name.
    fn pull(&self, store: &Store, reference: &str) -> std::result::Result<String, External>;
}

/// Where a release is published: the app's registry.
pub trait Publisher {
    /// Pushes the local image `local` (its manifest is `digest`) to `dest` for `app`, and
    /// keeps it there while a release of the app uses it.
    fn publish(
        &self,
        store: &Store,
        local: &str,
        dest: &str,
        digest: &Digest,
        app: &str,
    ) -> std::result::Result<(), External>;
    /// Lets the registry drop what only releases that aged out (`keep_releases`) used.
    fn release_aged(&self, store: &Store, app: &str);
}

/// What to deploy, as `strata deploy`'s flags say.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// An image to deploy as it is (`--image`), else the app's image is built.
    pub image: Option<String>,
    /// The release's label (`--image-label`), else `deployment-<ULID>`.
    pub label: Option<String>,
    /// Push even when the app sets no registry (`--push`; then it must set one).
    pub push: bool,
}

/// The image a deploy releases, once it is in the store (and pushed, when it is).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Its local reference.
    pub local: String,
    /// Its manifest.
    pub descriptor: Descriptor,
    /// The name it was given for this deploy (`<app>:deployment-<ULID>`), when built.
    pub tagged: Option<String>,
    /// What the release records as its image: the pushed reference, else the local name.
    pub release_ref: String,
}

/// Steps 1 and 2 of a deploy: the image into the store (given, pulled or built), named for
/// the release, and pushed to the app's registry when it has one (or `push` asks).
pub fn prepare(
    store: &Store,
    app: &App,
    req: &Request,
    source: &dyn ImageSource,
    publisher: &dyn Publisher,
    say: &mut dyn FnMut(&str),
) -> Result<Prepared> {
    let external = |what: String| move |source: External| Error::External { what, source };
    let label = req
        .label
        .clone()
        .unwrap_or_else(|| format!("deployment-{}", ulid::Ulid::generate()));
    let local = match &req.image {
        Some(r) if find_image(store, r).is_ok() => r.clone(),
        Some(r) => {
            say(&format!("pulling {r}"));
            source
                .pull(store, r)
                .map_err(external(format!("cannot pull `{r}`")))?
        }
        None => source
            .build(store, &app.spec.image)
            .map_err(external(format!("cannot build `{}`", app.spec.image)))?,
    };
    let image = find_image(store, &local)?;
    let descriptor = image.descriptor;
    // A build that left cached layers in the app's registry made an image this store keeps
    // by digest only (it names only images it has whole): it is pushed, not named here.
    let whole = image
        .manifest
        .layers
        .iter()
        .all(|l| store.has_blob(&l.digest));
    let mut tagged = None;
    if req.image.is_none() && whole {
        let name = format!("{}:{label}", app.name);
        let stored = strata_oci::Reference::parse_local(&name)?.to_string();
        // Recorded first: `apps destroy` removes the names deploys made.
        crate::state::State::open(store.root())?.add_app_tag(&app.name, &stored)?;
        store
            .set_ref(&stored, descriptor.clone())
            .map_err(|source| Error::Image {
                image: stored.clone(),
                source,
            })?;
        tagged = Some(name);
    }
    let mut release_ref = tagged.clone().unwrap_or_else(|| local.clone());
    if req.push || app.spec.registry.is_some() {
        let Some(registry) = &app.spec.registry else {
            return Err(Error::Config(format!(
                "--push needs `registry = \"host[:port]/org\"` in [app.{}]",
                app.name
            )));
        };
        let dest = format!("{}/{}:{label}", registry.trim_end_matches('/'), app.name);
        publisher
            .publish(store, &local, &dest, &descriptor.digest, &app.name)
            .map_err(external(format!("cannot push `{local}` to `{dest}`")))?;
        release_ref = dest;
    }
    Ok(Prepared {
        local,
        descriptor,
        tagged,
        release_ref,
    })
}

impl Prepared {
    /// The image as an orchestrator pulls it: from the app's registry, pinned by digest
    /// (`<registry>/<app>@sha256:…`), never by a tag that can move.
    pub fn pinned(&self, app: &App, target: &str) -> Result<String> {
        let Some(registry) = &app.spec.registry else {
            return Err(Error::Config(format!(
                "--target {target} runs the image from the app's registry: set `registry = \
                 \"host[:port]/org\"` in [app.{}]",
                app.name
            )));
        };
        Ok(format!(
            "{}/{}@{}",
            registry.trim_end_matches('/'),
            app.name,
            self.descriptor.digest
        ))
    }
}

/// Step 3 on this host: new machines, health, switch; the release records `prepared`'s
/// reference. An unchanged app keeps its release and machines.
pub fn release_here(
    host: &mut Host,
    app: &App,
    prepared: &Prepared,
    opts: &DeployOptions,
    publisher: &dyn Publisher,
    say: &mut dyn FnMut(&str),
) -> Result<DeployReport> {
    let mut report = deploy_image(host, app, &prepared.local, opts, say)?;
    let served = |r: &DeployReport| {
        r.public
            .map(|a| format!(" and serves http://{a}/"))
            .unwrap_or_default()
    };
    if report.unchanged {
        // The active release keeps its image reference and machines.
        say(&format!(
            "{} v{} is unchanged{}",
            app.name,
            report.release.version,
            served(&report)
        ));
        return Ok(report);
    }
    report.release.image = prepared.release_ref.clone();
    host.state
        .set_release_image(&app.name, report.release.version, &prepared.release_ref)?;
    // Releases that aged out of keep_releases lost their store pin; their registry pin goes too.
    publisher.release_aged(&host.store, &app.name);
    // What `strata dev` synced into earlier releases' machines is not this release's.
    host.prune_dev_layers(&app.name, &report.release.digest)?;
    match report.public {
        Some(addr) => say(&format!(
            "{} v{} is live: http://{addr}/",
            app.name, report.release.version
        )),
        None => say(&format!(
            "{} v{} is running ({} machine(s), no port)",
            app.name,
            report.release.version,
            report.machines.len()
        )),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Records what the pipeline asked of the caller's side (a fake: this is the pipeline's
    /// logic; the real build, pull and push are tested end to end in the CLI's tests).
    #[derive(Default)]
    struct Calls {
        built: RefCell<Vec<String>>,
        pulled: RefCell<Vec<String>>,
        published: RefCell<Vec<(String, String, String)>>,
        image: String,
        fail_push: bool,
    }

    impl ImageSource for Calls {
        fn build(&self, _: &Store, image: &str) -> std::result::Result<String, External> {
            self.built.borrow_mut().push(image.to_string());
            Ok(self.image.clone())
        }
        fn pull(&self, _: &Store, r: &str) -> std::result::Result<String, External> {
            self.pulled.borrow_mut().push(r.to_string());
            Ok(self.image.clone())
        }
    }

    impl Publisher for Calls {
        fn publish(
            &self,
            _: &Store,
            local: &str,
            dest: &str,
            _: &Digest,
            app: &str,
        ) -> std::result::Result<(), External> {
            if self.fail_push {
                return Err("registry said no".into());
            }
            self.published
                .borrow_mut()
                .push((local.into(), dest.into(), app.into()));
            Ok(())
        }
        fn release_aged(&self, _: &Store, _: &str) {}
    }

    /// A store holding an image named `name` (an empty one: a config and no layers).
    fn store_with(name: &str) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}"#;
        let (digest, size) = store.put_blob_bytes(config, None).unwrap();
        let manifest = strata_oci::Manifest {
            schema_version: 2,
            media_type: Some(strata_oci::media_type::OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::new(strata_oci::media_type::OCI_CONFIG, digest, size),
            layers: Vec::new(),
            subject: None,
            annotations: None,
        };
        let desc = store.put_manifest(&manifest).unwrap();
        store.set_ref(name, desc).unwrap();
        (dir, store)
    }

    fn app(toml: &str) -> App {
        let apps: BTreeMap<String, App> =
            crate::app::parse_apps(toml, std::path::Path::new("strata.toml")).unwrap();
        apps.into_values().next().unwrap()
    }

    #[test]
    fn a_built_image_is_named_for_its_release_and_pushed_where_the_app_publishes() {
        let (_dir, store) = store_with("web-built:1");
        let calls = Calls {
            image: "web-built:1".into(),
            ..Calls::default()
        };
        let web = app("[app.web]\nimage = \"web\"\nregistry = \"127.0.0.1:5000/team\"\n");
        let req = Request {
            label: Some("v7".into()),
            ..Request::default()
        };
        let mut said = Vec::new();
        let p = prepare(&store, &web, &req, &calls, &calls, &mut |l| {
            said.push(l.to_string())
        })
        .unwrap();
        assert_eq!(*calls.built.borrow(), ["web"]);
        assert!(calls.pulled.borrow().is_empty());
        assert_eq!(p.local, "web-built:1");
        assert_eq!(p.tagged.as_deref(), Some("web:v7"));
        // The release name is in the store, on the built image, and recorded for the app.
        assert_eq!(store.image("web:v7").unwrap().descriptor, p.descriptor);
        let state = crate::state::State::open(store.root()).unwrap();
        assert_eq!(state.app_tags("web").unwrap(), ["web:v7"]);
        assert_eq!(
            *calls.published.borrow(),
            [(
                "web-built:1".to_string(),
                "127.0.0.1:5000/team/web:v7".to_string(),
                "web".to_string()
            )]
        );
        assert_eq!(p.release_ref, "127.0.0.1:5000/team/web:v7");
    }

    #[test]
    fn a_given_image_is_pulled_only_when_missing_and_never_renamed() {
        let (_dir, store) = store_with("web:given");
        let calls = Calls {
            image: "web:given".into(),
            ..Calls::default()
        };
        let web = app("[app.web]\nimage = \"web\"\n");
        let here = Request {
            image: Some("web:given".into()),
            ..Request::default()
        };
        let p = prepare(&store, &web, &here, &calls, &calls, &mut |_| {}).unwrap();
        assert!(calls.pulled.borrow().is_empty() && calls.built.borrow().is_empty());
        assert_eq!((p.tagged, p.release_ref.as_str()), (None, "web:given"));

        let remote = Request {
            image: Some("registry.example/team/web:3".into()),
            ..Request::default()
        };
        let mut said = Vec::new();
        prepare(&store, &web, &remote, &calls, &calls, &mut |l| {
            said.push(l.to_string())
        })
        .unwrap();
        assert_eq!(*calls.pulled.borrow(), ["registry.example/team/web:3"]);
        assert_eq!(said, ["pulling registry.example/team/web:3"]);
        assert!(calls.published.borrow().is_empty());
    }

    #[test]
    fn push_without_a_registry_or_a_failed_push_is_an_error_naming_it() {
        let (_dir, store) = store_with("web-built:1");
        let calls = Calls {
            image: "web-built:1".into(),
            ..Calls::default()
        };
        let web = app("[app.web]\nimage = \"web\"\n");
        let push = Request {
            push: true,
            ..Request::default()
        };
        let err = prepare(&store, &web, &push, &calls, &calls, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("[app.web]"), "{err}");

        let failing = Calls {
            image: "web-built:1".into(),
            fail_push: true,
            ..Calls::default()
        };
        let web = app("[app.web]\nimage = \"web\"\nregistry = \"r.example/team\"\n");
        let err = prepare(
            &store,
            &web,
            &Request::default(),
            &failing,
            &failing,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot push `web-built:1` to `r.example/team/web:deployment-"),
            "{err}"
        );
        assert_eq!(
            std::error::Error::source(&err).map(|s| s.to_string()),
            Some("registry said no".to_string())
        );
    }
}
