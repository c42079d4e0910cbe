//! `strata deploy --target kubernetes`: an app of strata.toml as Kubernetes objects (a
//! Deployment of the image pinned by digest, a Service, a PersistentVolumeClaim per volume),
//! made with the API's own types (`k8s-openapi`), written to a directory and/or applied with
//! `kubectl apply -f -` in a configured context.
//!
//! How the app's keys map:
//! - `count` → `replicas`; a rolling update with `maxSurge: 1, maxUnavailable: 0`, so a new
//!   pod is ready before an old one goes (zero downtime); `keep_releases` → the Deployment's
//!   `revisionHistoryLimit` (what `kubectl rollout undo` can go back to);
//! - `health` → a startup probe that gives the pod `deadline` to pass the check once, then
//!   readiness (out of the Service at the first failure) and liveness (restarted after three)
//!   probes of the same check; `grace` → their initial delay;
//! - `port` / `public_port` → the container port and a ClusterIP Service port;
//! - `env` → the container's env; `volumes` → a claim each, mounted at its path;
//! - `kill_timeout` → `terminationGracePeriodSeconds`; `restart` must be `always` (the only
//!   policy a Deployment's pods may have);
//! - `memory` and `cpus` → the container's resource limits.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, Service, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
pub use strata_project::KubernetesSection;

use crate::app::App;
use crate::health::Check;
use crate::state::RestartPolicy;
use crate::{Error, Result};

/// The label every object carries with the app's name; the Deployment's selector.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The label saying strata made the object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// An app's objects.
#[derive(Debug, Clone, PartialEq)]
pub struct Objects {
    /// The volumes' claims, first: the Deployment's pods wait for them.
    pub claims: Vec<PersistentVolumeClaim>,
    /// The app's pods.
    pub deployment: Deployment,
    /// Its port inside the cluster; none for an app without `port`.
    pub service: Option<Service>,
}

/// A Kubernetes object name (RFC 1123 label) for a strata volume name, which may hold `_`,
/// `.` and capitals.
pub fn object_name(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

/// Whole seconds, rounded up (a probe period of 200ms is 1 s), at least `min`.
fn secs(d: Duration, min: i32) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX).max(min)
}

/// The objects of `app`, running `image` (a reference pinned by digest); `section` gives the
/// namespace and the claims' size.
pub fn objects(app: &App, image: &str, section: &KubernetesSection) -> Result<Objects> {
    if app.restart()? != RestartPolicy::Always {
        return Err(Error::Config(format!(
            "app `{}`: restart = {:?}: a Kubernetes Deployment's pods always restart \
             (restartPolicy: Always); remove `restart` to deploy it to Kubernetes",
            app.name,
            app.spec.restart.as_deref().unwrap_or_default()
        )));
    }
    if !image.contains("@sha256:") {
        return Err(Error::Config(format!(
            "image `{image}`: a Kubernetes target runs images pinned by digest (`repo@sha256:…`)"
        )));
    }
    let size = section.volume_size.clone().unwrap_or_else(|| "1Gi".into());
    let labels = BTreeMap::from([
        (NAME_LABEL.to_string(), app.name.clone()),
        (MANAGED_BY_LABEL.to_string(), "strata".to_string()),
    ]);
    let selector = BTreeMap::from([(NAME_LABEL.to_string(), app.name.clone())]);
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_string()),
        namespace: section.namespace.clone(),
        labels: Some(labels.clone()),
        ..ObjectMeta::default()
    };

    let mut claims = Vec::new();
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    for (volume, path) in app.volumes()? {
        let name = object_name(&volume);
        if name.is_empty() {
            return Err(Error::Config(format!(
                "app `{}`: volume `{volume}` has no letter or digit to name its claim",
                app.name
            )));
        }
        claims.push(PersistentVolumeClaim {
            metadata: meta(&name),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(size.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        });
        volumes.push(Volume {
            name: name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: name.clone(),
                read_only: None,
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name,
            mount_path: path,
            ..VolumeMount::default()
        });
    }

    let (startup, readiness, liveness, deadline) = match app.health()? {
        None => (None, None, None, None),
        Some((check, deadline)) => {
            let port = IntOrString::Int(i32::from(check.port));
            let period = secs(check.interval, 1);
            let probe = Probe {
                http_get: match &check.check {
                    Check::Http { path, .. } => Some(HTTPGetAction {
                        path: Some(path.clone()),
                        port: port.clone(),
                        ..HTTPGetAction::default()
                    }),
                    Check::Tcp => None,
                },
                tcp_socket: match check.check {
                    Check::Tcp => Some(TCPSocketAction { port, host: None }),
                    Check::Http { .. } => None,
                },
                period_seconds: Some(period),
                timeout_seconds: Some(secs(check.timeout, 1)),
                initial_delay_seconds: (!check.grace.is_zero()).then(|| secs(check.grace, 0)),
                ..Probe::default()
            };
            let startup = Probe {
                // The pod has `deadline` to pass once before it is restarted.
                failure_threshold: Some((secs(deadline, 1) / period).max(1)),
                ..probe.clone()
            };
            let readiness = Probe {
                failure_threshold: Some(1),
                initial_delay_seconds: None,
                ..probe.clone()
            };
            let liveness = Probe {
                failure_threshold: Some(3),
                initial_delay_seconds: None,
                ..probe
            };
            (
                Some(startup),
                Some(readiness),
                Some(liveness),
                Some(secs(deadline, 1)),
            )
        }
    };

    let container = Container {
        name: app.name.clone(),
        image: Some(image.to_string()),
        ports: app.spec.port.map(|p| {
            vec![ContainerPort {
                container_port: i32::from(p),
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            }]
        }),
        env: (!app.spec.env.is_empty()).then(|| {
            app.spec
                .env
                .iter()
                .map(|(k, v)| EnvVar {
                    name: k.clone(),
                    value: Some(v.clone()),
                    value_from: None,
                })
                .collect()
        }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        resources: limits(app)?,
        startup_probe: startup,
        readiness_probe: readiness,
        liveness_probe: liveness,
        ..Container::default()
    };
    let deployment = Deployment {
        metadata: meta(&app.name),
        spec: Some(DeploymentSpec {
            replicas: Some(i32::try_from(app.count()).unwrap_or(i32::MAX)),
            revision_history_limit: Some(
                i32::try_from(app.spec.keep_releases.unwrap_or(3)).unwrap_or(i32::MAX),
            ),
            // A rollout that has not made progress in this long is reported failed.
            progress_deadline_seconds: deadline.map(|d| d.max(10)),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    restart_policy: Some("Always".into()),
                    termination_grace_period_seconds: Some(i64::from(secs(app.kill_timeout()?, 0))),
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let service = match (app.spec.port, app.public_port()) {
        (Some(port), Some(public)) => Some(Service {
            metadata: meta(&app.name),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(selector),
                ports: Some(vec![ServicePort {
                    port: i32::from(public),
                    target_port: Some(IntOrString::Int(i32::from(port))),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }),
        _ => None,
    };
    Ok(Objects {
        claims,
        deployment,
        service,
    })
}

impl Objects {
    /// The objects as one `v1` `List`, pretty JSON (what `kubectl apply -f` takes).
    pub fn to_json(&self) -> String {
        let mut items: Vec<serde_json::Value> = Vec::new();
        let value = |v: serde_json::Result<serde_json::Value>| {
            // The API types serialize to JSON values by construction.
            v.unwrap_or(serde_json::Value::Null)
        };
        for c in &self.claims {
            items.push(value(serde_json::to_value(c)));
        }
        items.push(value(serde_json::to_value(&self.deployment)));
        if let Some(s) = &self.service {
            items.push(value(serde_json::to_value(s)));
        }
        let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
        let mut text = serde_json::to_string_pretty(&list).unwrap_or_default();
        text.push('\n');
        text
    }

    /// Reads back what [`Objects::to_json`] wrote, each item as its API type: an unknown
    /// field, a wrong type or an object of another kind is an error (naming `origin`).
    pub fn from_json(text: &str, origin: &Path) -> Result<Objects> {
        let bad = |what: String| Error::Config(format!("{}: {what}", origin.display()));
        let list: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if list["kind"] != "List" || list["apiVersion"] != "v1" {
            return Err(bad("expected a v1 List".into()));
        }
        let items = list["items"]
            .as_array()
            .ok_or_else(|| bad("a List without items".into()))?;
        let mut claims = Vec::new();
        let mut deployment = None;
        let mut service = None;
        for (i, item) in items.iter().enumerate() {
            let typed = |e: serde_json::Error| bad(format!("items[{i}]: {e}"));
            match item["kind"].as_str() {
                Some("PersistentVolumeClaim") => {
                    claims.push(strict::<PersistentVolumeClaim>(item).map_err(typed)?)
                }
                Some("Deployment") => deployment = Some(strict::<Deployment>(item).map_err(typed)?),
                Some("Service") => service = Some(strict::<Service>(item).map_err(typed)?),
                other => return Err(bad(format!("items[{i}]: unexpected kind {other:?}"))),
            }
        }
        Ok(Objects {
            claims,
            deployment: deployment.ok_or_else(|| bad("no Deployment".into()))?,
            service,
        })
    }
}

/// `item` as `T`, refusing a field `T` does not have: the API types accept and drop unknown
/// fields, so a misspelt one is found by serializing the typed value again and comparing.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(
    item: &serde_json::Value,
) -> serde_json::Result<T> {
    let typed: T = serde_json::from_value(item.clone())?;
    let again = serde_json::to_value(&typed)?;
    if &again != item {
        return Err(serde::de::Error::custom(format!(
            "fields the API type does not have or changes: {}",
            first_difference(item, &again, "")
        )));
    }
    Ok(typed)
}

/// The path of the first value that differs between `a` and `b`.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> String {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) if w == v => {}
                    Some(w) => return first_difference(v, w, &format!("{at}.{k}")),
                    None => return format!("{at}.{k}"),
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map_or_else(|| at.to_string(), |k| format!("{at}.{k}"))
        }
        (serde_json::Value::Array(x), serde_json::Value::Array(y)) => x
            .iter()
            .zip(y)
            .enumerate()
            .find(|(_, (v, w))| v != w)
            .map_or_else(
                || format!("{at}[]"),
                |(i, (v, w))| first_difference(v, w, &format!("{at}[{i}]")),
            ),
        _ => at.to_string(),
    }
}

/// Where the objects go: a directory, a kubectl context, or both.
#[derive(Debug, Clone, Default)]
pub struct Destination {
    /// Write `<app>.json` here.
    pub out: Option<PathBuf>,
    /// `kubectl --context CONTEXT apply -f -`.
    pub context: Option<String>,
    /// The kubectl program.
    pub kubectl: PathBuf,
}

impl Destination {
    /// From `[kubernetes]` (relative paths from `project_dir`) and the command line's `--out`
    /// and `--kube-context`, which win.
    pub fn new(
        section: &KubernetesSection,
        project_dir: &Path,
        out: Option<PathBuf>,
        context: Option<String>,
    ) -> Result<Destination> {
        let out = out.or_else(|| section.out.as_ref().map(|o| project_dir.join(o)));
        let context = context.or_else(|| section.context.clone());
        if out.is_none() && context.is_none() {
            return Err(Error::Config(
                "--target kubernetes: say where the objects go: `--out DIR` (or `out` in \
                 [kubernetes]) writes them, a kubectl context (`--kube-context` or `context` in \
                 [kubernetes]) applies them"
                    .into(),
            ));
        }
        Ok(Destination {
            out,
            context,
            kubectl: section
                .kubectl
                .clone()
                .unwrap_or_else(|| PathBuf::from("kubectl")),
        })
    }
}

/// `objects` of `app` written to `dir/<app>.json` (atomically: a temp file renamed); returns
/// the file.
pub fn write(dir: &Path, app: &str, objects: &Objects) -> Result<PathBuf> {
    let io = |op: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { op, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let file = dir.join(format!("{app}.json"));
    let mut tmp = tempfile_in(dir, app).map_err(io("create a temp file in", dir))?;
    tmp.1
        .write_all(objects.to_json().as_bytes())
        .and_then(|()| tmp.1.sync_all())
        .map_err(io("write", &tmp.0))?;
    std::fs::rename(&tmp.0, &file).map_err(|source| {
        let _ = std::fs::remove_file(&tmp.0);
        Error::Io {
            op: "rename into place",
            path: file.clone(),
            source,
        }
    })?;
    Ok(file)
}

/// A new file `.<app>.json.<pid>.<n>.tmp` in `dir`.
fn tempfile_in(dir: &Path, app: &str) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = dir.join(format!(
        ".{app}.json.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    Ok((path, f))
}

/// The command that applies the objects: `kubectl --context CONTEXT apply -f -`.
pub fn apply_command(kubectl: &Path, context: &str) -> Command {
    let mut cmd = Command::new(kubectl);
    cmd.args(["--context", context, "apply", "-f", "-"]);
    cmd
}

/// Pipes `objects` to [`apply_command`]; returns what kubectl printed (one line per object).
pub fn apply(kubectl: &Path, context: &str, objects: &Objects) -> Result<String> {
    let mut cmd = apply_command(kubectl, context);
    let failed = |why: String| {
        Error::Config(format!(
            "`{} --context {context} apply -f -` {why}",
            kubectl.display()
        ))
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot start: {e} (is kubectl installed?)")))?;
    let json = objects.to_json();
    // kubectl reads all of stdin before it answers; a write error shows in its exit status.
    let written = child
        .stdin
        .take()
        .map(|mut stdin| stdin.write_all(json.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("cannot be waited for: {e}")))?;
    if !out.status.success() {
        return Err(failed(format!(
            "failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if let Some(Err(e)) = written {
        return Err(failed(format!("did not read the objects: {e}")));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes and/or applies `app`'s objects running `image`, as `dest` says; says what it did.
pub fn release(
    app: &App,
    image: &str,
    section: &KubernetesSection,
    dest: &Destination,
    say: &mut dyn FnMut(&str),
) -> Result<Objects> {
    let objects = objects(app, image, section)?;
    let kinds = {
        let mut k = vec![format!("Deployment/{}", app.name)];
        if objects.service.is_some() {
            k.push(format!("Service/{}", app.name));
        }
        for c in &objects.claims {
            k.push(format!(
                "PersistentVolumeClaim/{}",
                c.metadata.name.as_deref().unwrap_or("")
            ));
        }
        k.join(", ")
    };
    if let Some(dir) = &dest.out {
        let file = write(dir, &app.name, &objects)?;
        say(&format!("wrote {kinds} to {}", file.display()));
    }
    if let Some(context) = &dest.context {
        say(&format!("applying {kinds} in context {context}"));
        let said = apply(&dest.kubectl, context, &objects)?;
        for line in said.lines().filter(|l| !l.trim().is_empty()) {
            say(&format!("kubectl: {line}"));
        }
    }
    Ok(objects)
}

/// `memory` and `cpus` as the container's resource limits (bytes, and millicores).
fn limits(app: &App) -> Result<Option<ResourceRequirements>> {
    let mut limits = BTreeMap::new();
    if let Some(bytes) = app.memory()? {
        limits.insert("memory".to_string(), Quantity(bytes.to_string()));
    }
    if let Some(m) = app.millicpus()? {
        limits.insert("cpu".to_string(), Quantity(format!("{m}m")));
    }
    Ok((!limits.is_empty()).then(|| ResourceRequirements {
        limits: Some(limits),
        ..ResourceRequirements::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::parse_apps;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn app(toml: &str, name: &str) -> App {
        parse_apps(toml, Path::new("strata.toml")).unwrap()[name].clone()
    }

    /// The busybox example of docs/deploy.md: httpd on 8080, no health table.
    fn busybox() -> App {
        app(
            "[app.web]\nimage = \"web\"\nport = 8080\nregistry = \"127.0.0.1:5099/personal\"\n",
            "web",
        )
    }

    /// An app with env, volumes, an HTTP health check, a public port and a count.
    fn full() -> App {
        app(
            r#"[app.api]
image = "api"
port = 3000
public_port = 80
count = 2
kill_timeout = "30s"
keep_releases = 5
memory = "512m"
cpus = 0.5
registry = "registry.example.com/team"
env = { RUST_LOG = "info", DATABASE_URL = "postgres://db/api" }
volumes = ["api_data:/var/lib/api", "Uploads.v2:/srv/uploads"]
health = { path = "/healthz", interval = "2s", timeout = "500ms", grace = "3s", deadline = "90s" }
"#,
            "api",
        )
    }

    fn image(app: &App) -> String {
        format!(
            "{}/{}@{DIGEST}",
            app.spec.registry.as_deref().unwrap(),
            app.name
        )
    }

    #[test]
    fn golden_objects_of_the_busybox_example() {
        let a = busybox();
        let o = objects(&a, &image(&a), &KubernetesSection::default()).unwrap();
        insta::assert_snapshot!("busybox_web", o.to_json());
    }

    #[test]
    fn golden_objects_of_an_app_with_env_volumes_and_a_health_check() {
        let a = full();
        let section = KubernetesSection {
            namespace: Some("prod".into()),
            volume_size: Some("5Gi".into()),
            ..KubernetesSection::default()
        };
        let o = objects(&a, &image(&a), &section).unwrap();
        insta::assert_snapshot!("full_api", o.to_json());
    }

    #[test]
    fn the_output_reads_back_as_the_api_types_and_a_wrong_field_is_refused() {
        let a = full();
        let o = objects(&a, &image(&a), &KubernetesSection::default()).unwrap();
        let back = Objects::from_json(&o.to_json(), Path::new("api.json")).unwrap();
        assert_eq!(back, o);
        // What the API server needs of each object.
        let d = back.deployment.spec.as_ref().unwrap();
        let pod = d.template.spec.as_ref().unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some(image(&a).as_str()));
        let limits = pod.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref();
        assert_eq!(
            limits.unwrap()["memory"],
            Quantity((512u64 << 20).to_string())
        );
        assert_eq!(limits.unwrap()["cpu"], Quantity("500m".into()));
        assert_eq!(
            d.template
                .metadata
                .as_ref()
                .unwrap()
                .labels
                .as_ref()
                .unwrap()[NAME_LABEL],
            "api"
        );
        assert_eq!(d.selector.match_labels.as_ref().unwrap()[NAME_LABEL], "api");
        let rolling = d
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .as_ref()
            .unwrap();
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(back.claims.len(), 2);
        assert_eq!(
            pod.volumes.as_ref().unwrap()[1]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "uploads-v2"
        );

        // A misspelt field, a wrong type and a wrong kind are each refused, by name.
        let mut v: serde_json::Value = serde_json::from_str(&o.to_json()).unwrap();
        v["items"][2]["spec"]["replica"] = serde_json::json!(3);
        let e = Objects::from_json(&v.to_string(), Path::new("api.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("api.json: items[2]") && e.contains(".spec.replica"),
            "{e}"
        );
        let mut v: serde_json::Value = serde_json::from_str(&o.to_json()).unwrap();
        v["items"][2]["spec"]["replicas"] = serde_json::json!("two");
        let e = Objects::from_json(&v.to_string(), Path::new("api.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("items[2]") && e.contains("invalid type"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&o.to_json()).unwrap();
        v["items"][2]["apiVersion"] = serde_json::json!("v1");
        assert!(Objects::from_json(&v.to_string(), Path::new("api.json")).is_err());
    }

    #[test]
    fn an_image_not_pinned_by_digest_and_a_restart_policy_pods_cannot_have_are_refused() {
        let a = busybox();
        let e = objects(
            &a,
            "127.0.0.1:5099/personal/web:latest",
            &Default::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pinned by digest"), "{e}");
        let a = app(
            "[app.job]\nimage = \"job\"\nrestart = \"on-failure:2\"\n",
            "job",
        );
        let e = objects(&a, &format!("r/job@{DIGEST}"), &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("on-failure:2") && e.contains("restartPolicy"),
            "{e}"
        );
    }

    #[test]
    fn a_destination_is_required_and_the_command_line_wins() {
        let e = Destination::new(&Default::default(), Path::new("/p"), None, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--out DIR") && e.contains("--kube-context"),
            "{e}"
        );
        let section = KubernetesSection {
            out: Some("k8s".into()),
            context: Some("staging".into()),
            ..Default::default()
        };
        let d = Destination::new(&section, Path::new("/p"), None, None).unwrap();
        assert_eq!(d.out, Some(PathBuf::from("/p/k8s")));
        assert_eq!(d.context.as_deref(), Some("staging"));
        assert_eq!(d.kubectl, PathBuf::from("kubectl"));
        let d = Destination::new(&section, Path::new("/p"), None, Some("prod".into())).unwrap();
        assert_eq!(d.context.as_deref(), Some("prod"));
    }

    /// A stand-in `kubectl` (a shell script) records its arguments and stdin: this tests the
    /// command line and the bytes strata hands kubectl, not kubectl.
    #[test]
    fn fake_kubectl_receives_apply_with_the_context_and_the_objects_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("kubectl");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\necho \"$@\" > {0}/args\ncat > {0}/stdin\n\
                 echo 'deployment.apps/web created'\necho 'service/web created'\n",
                dir.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let a = busybox();
        let out = dir.path().join("out");
        let dest = Destination {
            out: Some(out.clone()),
            context: Some("kind-strata".into()),
            kubectl: fake.clone(),
        };
        let mut said = Vec::new();
        let o = release(
            &a,
            &image(&a),
            &Default::default(),
            &dest,
            &mut |m: &str| said.push(m.to_string()),
        )
        .unwrap();
        let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
        assert_eq!(args, "--context kind-strata apply -f -\n");
        let stdin = std::fs::read_to_string(dir.path().join("stdin")).unwrap();
        assert_eq!(stdin, o.to_json());
        assert_eq!(
            std::fs::read_to_string(out.join("web.json")).unwrap(),
            stdin
        );
        assert!(
            said.iter().any(|l| l == "kubectl: service/web created"),
            "{said:?}"
        );
        // Only the file is left in the directory (no temp file).
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

        // A failing kubectl is an error with what it said.
        std::fs::write(
            &fake,
            "#!/bin/sh\ncat >/dev/null\necho 'no context x' >&2\nexit 1\n",
        )
        .unwrap();
        let e = apply(&fake, "x", &o).unwrap_err().to_string();
        assert!(
            e.contains("--context x apply -f -") && e.contains("no context x"),
            "{e}"
        );
    }
}
