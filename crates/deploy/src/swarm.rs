//! `strata deploy --target swarm`: an app of strata.toml as a Docker Swarm service, made or
//! updated through the engine's API (`bollard`), then watched until its tasks run the new
//! image.
//!
//! How the app's keys map (docs/deploy.md, "Orchestrator targets"):
//! - the service is named after the app and runs its image pinned by digest;
//! - `count` → replicas; `env`, `volumes` (named volumes) and `kill_timeout` (stop grace) as
//!   they are; `restart` → the task restart policy; `memory` and `cpus` → the task's
//!   resource limits;
//! - `health` → the container's health check, run inside the image (`wget`, else `curl`, for
//!   HTTP; `nc -z` for TCP): a task counts as running, and gets traffic, only once healthy;
//! - updates start the new task first (`order: start-first`), one at a time, and roll back on
//!   failure (`failure_action: rollback`); a rollback also starts first;
//! - `public_port` is published through the routing mesh (`[swarm] publish = "ingress"`), or
//!   not at all (`publish = "none"`: the service is found by name on `[swarm] network`, DNS
//!   round robin over its healthy tasks; what works where the kernel lacks IPVS).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::Task;
use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, EndpointSpecModeEnum, HealthConfig, Limit, Mount, MountType,
    NetworkAttachmentConfig, NetworkCreateRequest, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, ServiceSpecRollbackConfig,
    ServiceSpecRollbackConfigFailureActionEnum, ServiceSpecRollbackConfigOrderEnum,
    ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, ServiceUpdateStatusStateEnum, TaskSpec,
    TaskSpecContainerSpec, TaskSpecResources, TaskSpecRestartPolicy,
    TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{ListTasksOptions, UpdateServiceOptions};
pub use strata_project::SwarmSection;

use crate::app::App;
use crate::health::Check;
use crate::state::RestartPolicy;
use crate::{Error, Result};

/// The label on services and networks strata made, with the app's name.
pub const APP_LABEL: &str = "dev.strata.app";

/// How `public_port` is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// The routing mesh: every node serves the port and balances over the healthy tasks.
    Ingress,
    /// Not published; reached by name on the service's network (DNS round robin).
    None,
}

impl Publish {
    /// `[swarm] publish`.
    pub fn parse(s: Option<&str>) -> Result<Publish> {
        match s {
            None | Some("ingress") => Ok(Publish::Ingress),
            Some("none") => Ok(Publish::None),
            Some(other) => Err(Error::Config(format!(
                "[swarm] publish = \"{other}\": expected \"ingress\" or \"none\""
            ))),
        }
    }
}

/// Where and how to deploy, from `[swarm]` and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The engine's API address.
    pub docker_host: String,
    /// The overlay network services join.
    pub network: Option<String>,
    /// How the public port is published.
    pub publish: Publish,
}

impl Settings {
    /// `[swarm]`, with `$DOCKER_HOST` (passed as `env_host`) or the engine's usual socket when
    /// it names no `docker_host`.
    pub fn new(section: &SwarmSection, env_host: Option<String>) -> Result<Settings> {
        Ok(Settings {
            docker_host: section
                .docker_host
                .clone()
                .or(env_host)
                .unwrap_or_else(|| "unix:///var/run/docker.sock".into()),
            network: section.network.clone(),
            publish: Publish::parse(section.publish.as_deref())?,
        })
    }
}

/// `memory` and `cpus` as the task's resource limits (`docker service create --limit-memory
/// --limit-cpu`).
fn limits(app: &App) -> Result<Option<TaskSpecResources>> {
    let (memory, millicpus) = (app.memory()?, app.millicpus()?);
    if memory.is_none() && millicpus.is_none() {
        return Ok(None);
    }
    Ok(Some(TaskSpecResources {
        limits: Some(Limit {
            nano_cpus: millicpus.map(|m| (m * 1_000_000) as i64),
            memory_bytes: memory.map(|b| b as i64),
            pids: None,
        }),
        ..TaskSpecResources::default()
    }))
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// A string as one shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// How long the engine watches each updated task for a failure before the next one
/// (`UpdateConfig.Monitor`): three health intervals, from 1 s to 30 s.
fn monitor(app: &App) -> Result<Duration> {
    let interval = app
        .health()?
        .map_or(Duration::from_secs(1), |(h, _)| h.interval);
    Ok((interval * 3).clamp(Duration::from_secs(1), Duration::from_secs(30)))
}

/// The service spec of `app` running `image` (pinned by digest).
pub fn service_spec(app: &App, image: &str, settings: &Settings) -> Result<ServiceSpec> {
    if !image.contains("@sha256:") {
        return Err(Error::Config(format!(
            "image `{image}`: a Swarm service runs an image pinned by digest (`repo@sha256:…`)"
        )));
    }
    let health_check = match app.health()? {
        Some((h, _)) => {
            let test = match &h.check {
                Check::Http { path, .. } => {
                    let url = shell_quote(&format!("http://127.0.0.1:{}{path}", h.port));
                    format!("wget -q -O /dev/null {url} || curl -fsS -o /dev/null {url}")
                }
                Check::Tcp => format!("nc -z 127.0.0.1 {}", h.port),
            };
            Some(HealthConfig {
                test: Some(vec!["CMD-SHELL".into(), test]),
                interval: Some(nanos(h.interval)),
                timeout: Some(nanos(h.timeout)),
                start_period: Some(nanos(h.grace)),
                retries: Some(3),
                start_interval: None,
            })
        }
        // `health = { type = "none" }`: no check, not even the image's HEALTHCHECK.
        None if app.spec.health.is_some() => Some(HealthConfig {
            test: Some(vec!["NONE".into()]),
            ..HealthConfig::default()
        }),
        None => None,
    };
    let restart = match app.restart()? {
        RestartPolicy::Always => TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
            delay: Some(nanos(Duration::from_secs(1))),
            ..TaskSpecRestartPolicy::default()
        },
        RestartPolicy::No => TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
            ..TaskSpecRestartPolicy::default()
        },
        RestartPolicy::OnFailure { max } => TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::ON_FAILURE),
            delay: Some(nanos(Duration::from_secs(1))),
            max_attempts: Some(i64::from(max)),
            ..TaskSpecRestartPolicy::default()
        },
    };
    let mounts: Vec<Mount> = app
        .volumes()?
        .into_iter()
        .map(|(name, path)| Mount {
            target: Some(path),
            source: Some(name),
            typ: Some(MountType::VOLUME),
            ..Mount::default()
        })
        .collect();
    let labels = HashMap::from([(APP_LABEL.to_string(), app.name.clone())]);
    let monitor = nanos(monitor(app)?);
    let endpoint = match (settings.publish, app.spec.port, app.public_port()) {
        (Publish::Ingress, Some(port), Some(public)) => EndpointSpec {
            mode: Some(EndpointSpecModeEnum::VIP),
            ports: Some(vec![EndpointPortConfig {
                protocol: Some(EndpointPortConfigProtocolEnum::TCP),
                target_port: Some(i64::from(port)),
                published_port: Some(i64::from(public)),
                publish_mode: Some(EndpointPortConfigPublishModeEnum::INGRESS),
                ..EndpointPortConfig::default()
            }]),
        },
        (Publish::Ingress, _, _) => EndpointSpec {
            mode: Some(EndpointSpecModeEnum::VIP),
            ports: None,
        },
        (Publish::None, _, _) => EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: None,
        },
    };
    Ok(ServiceSpec {
        name: Some(app.name.clone()),
        labels: Some(labels.clone()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(image.to_string()),
                labels: Some(labels),
                env: (!app.spec.env.is_empty()).then(|| {
                    app.spec
                        .env
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect()
                }),
                mounts: (!mounts.is_empty()).then_some(mounts),
                stop_grace_period: Some(nanos(app.kill_timeout()?)),
                health_check,
                ..TaskSpecContainerSpec::default()
            }),
            restart_policy: Some(restart),
            resources: limits(app)?,
            networks: settings.network.as_ref().map(|n| {
                vec![NetworkAttachmentConfig {
                    target: Some(n.clone()),
                    aliases: None,
                    driver_opts: None,
                }]
            }),
            ..TaskSpec::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(i64::from(app.count())),
            }),
            ..ServiceSpecMode::default()
        }),
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(1),
            delay: Some(0),
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK),
            monitor: Some(monitor),
            max_failure_ratio: Some(0.0),
            order: Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST),
        }),
        rollback_config: Some(ServiceSpecRollbackConfig {
            parallelism: Some(1),
            delay: Some(0),
            failure_action: Some(ServiceSpecRollbackConfigFailureActionEnum::PAUSE),
            monitor: Some(monitor),
            max_failure_ratio: Some(0.0),
            order: Some(ServiceSpecRollbackConfigOrderEnum::START_FIRST),
        }),
        endpoint_spec: Some(endpoint),
        ..ServiceSpec::default()
    })
}

/// What a Swarm deploy did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The service's id.
    pub service_id: String,
    /// Whether the service was made (else updated).
    pub created: bool,
    /// The image its tasks run.
    pub image: String,
}

fn docker_error(what: String) -> impl FnOnce(bollard::errors::Error) -> Error {
    move |e| Error::Config(format!("{what}: {e}"))
}

fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Makes or updates `app`'s service to run `image`; unless `detach`, waits until its tasks
/// run it (healthy), and fails when the engine rolled the update back.
pub fn release(
    app: &App,
    image: &str,
    settings: &Settings,
    detach: bool,
    say: &mut dyn FnMut(&str),
) -> Result<Report> {
    let spec = service_spec(app, image, settings)?;
    let deadline = app
        .health()?
        .map_or(Duration::from_secs(60), |(_, d)| d)
        .max(Duration::from_secs(30))
        // Pulling the image comes first.
        + Duration::from_secs(120);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Runtime {
            what: "the Docker API client",
            source,
        })?;
    rt.block_on(release_async(app, spec, settings, detach, deadline, say))
}

async fn release_async(
    app: &App,
    spec: ServiceSpec,
    settings: &Settings,
    detach: bool,
    deadline: Duration,
    say: &mut dyn FnMut(&str),
) -> Result<Report> {
    let host = &settings.docker_host;
    let docker = Docker::connect_with_host(host)
        .map_err(docker_error(format!(
            "cannot reach the Docker engine at {host}"
        )))?
        .negotiate_version()
        .await
        .map_err(docker_error(format!(
            "cannot reach the Docker engine at {host}"
        )))?;
    docker.inspect_swarm().await.map_err(|e| {
        Error::Config(format!(
            "the Docker engine at {host} is not a swarm manager (`docker swarm init` makes \
             one): {e}"
        ))
    })?;
    if let Some(net) = &settings.network {
        ensure_network(&docker, net, &app.name, say).await?;
    }
    let image = spec
        .task_template
        .as_ref()
        .and_then(|t| t.container_spec.as_ref())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let name = app.name.clone();
    let list_tasks = || {
        docker.list_tasks(Some(ListTasksOptions {
            filters: Some(HashMap::from([("service".into(), vec![name.clone()])])),
        }))
    };
    // Tasks from before this deploy (a failed one of an earlier release is not this one's).
    let before: HashSet<String> = match list_tasks().await {
        Ok(tasks) => tasks.into_iter().filter_map(|t| t.id).collect(),
        // No such service yet: no tasks.
        Err(e) if not_found(&e) => HashSet::new(),
        Err(e) => return Err(docker_error(format!("cannot list the tasks of {name}"))(e)),
    };
    let submitted = Instant::now();
    let (service_id, created, previous_update) = match docker.inspect_service(&name, None).await {
        Ok(current) => {
            let version = current
                .version
                .as_ref()
                .and_then(|v| v.index)
                .ok_or_else(|| Error::Config(format!("service {name} has no version")))?;
            let previous = current
                .update_status
                .as_ref()
                .and_then(|u| u.started_at.clone());
            say(&format!(
                "updating swarm service {name} to {image} (start-first)"
            ));
            docker
                .update_service(
                    &name,
                    spec,
                    UpdateServiceOptions {
                        version: i32::try_from(version).unwrap_or(i32::MAX),
                        ..UpdateServiceOptions::default()
                    },
                    None,
                )
                .await
                .map_err(docker_error(format!("cannot update swarm service {name}")))?;
            (current.id.unwrap_or_default(), false, previous)
        }
        Err(e) if not_found(&e) => {
            say(&format!("creating swarm service {name} with {image}"));
            let made = docker
                .create_service(spec, None)
                .await
                .map_err(docker_error(format!("cannot create swarm service {name}")))?;
            (made.id.unwrap_or_default(), true, None)
        }
        Err(e) => {
            return Err(docker_error(format!("cannot inspect swarm service {name}"))(e));
        }
    };
    let report = Report {
        service_id,
        created,
        image: image.clone(),
    };
    if detach {
        return Ok(report);
    }
    let replicas = usize::try_from(app.count()).unwrap_or(usize::MAX);
    let mut last_said = String::new();
    // Without a health check, a task that runs may exit a moment later: it must keep running
    // as long as the engine would watch it in an update.
    let settle = if app.health()?.is_some() {
        Duration::ZERO
    } else {
        monitor(app)?
    };
    let mut converged_since: Option<Instant> = None;
    loop {
        let service = docker
            .inspect_service(&name, None)
            .await
            .map_err(docker_error(format!("cannot inspect swarm service {name}")))?;
        // An update of this deploy (not the one before it) that the engine gave up on.
        if let Some(u) = service
            .update_status
            .as_ref()
            .filter(|u| u.started_at.is_some() && u.started_at != previous_update)
        {
            use ServiceUpdateStatusStateEnum as S;
            if matches!(
                u.state,
                Some(S::ROLLBACK_STARTED | S::ROLLBACK_COMPLETED | S::ROLLBACK_PAUSED | S::PAUSED)
            ) {
                return Err(Error::Orchestrator {
                    app: name.clone(),
                    reason: format!(
                        "swarm {} the update: {}; the previous spec keeps serving",
                        match u.state {
                            Some(S::PAUSED) => "paused",
                            _ => "rolled back",
                        },
                        u.message.as_deref().unwrap_or("no message")
                    ),
                });
            }
        }
        let tasks = list_tasks()
            .await
            .map_err(docker_error(format!("cannot list the tasks of {name}")))?;
        let now = progress(&tasks, &before, &image, replicas);
        if now != Progress::Converged {
            converged_since = None;
        }
        let (new, old) = match now {
            Progress::Converged
                if settle.is_zero()
                    || converged_since.is_some_and(|since| since.elapsed() >= settle) =>
            {
                say(&format!("swarm service {name} runs {image}"));
                return Ok(report);
            }
            Progress::Converged => {
                converged_since.get_or_insert_with(Instant::now);
                (replicas, 0)
            }
            // A new service has no spec to roll back to: its tasks fail over and over.
            Progress::Failing { failed, last } if created => {
                return Err(Error::Orchestrator {
                    app: name.clone(),
                    reason: format!(
                        "{failed} tasks of the new swarm service {name} failed (last: {last}); \
                         the engine keeps trying (`docker service ps {name}`)"
                    ),
                });
            }
            Progress::Failing { .. } => (0, 0),
            Progress::Waiting { new, old } => (new, old),
        };
        let state = format!("{new}/{replicas} task(s) of the new spec running, {old} old");
        if state != last_said {
            say(&format!("service {name}: {state}"));
            last_said = state.clone();
        }
        if submitted.elapsed() > deadline {
            let why = tasks
                .iter()
                .filter(|t| state_of(t) != Some(TaskState::RUNNING))
                .filter_map(|t| t.status.as_ref())
                .filter_map(|s| s.err.clone().or_else(|| s.message.clone()))
                .next_back()
                .unwrap_or_else(|| "no task error".into());
            return Err(Error::Orchestrator {
                app: name.clone(),
                reason: format!(
                    "swarm service {name} did not converge in {} s ({state}; last task \
                     error: {why})",
                    deadline.as_secs()
                ),
            });
        }
        if strata_runtime::interrupt::requested() {
            return Err(Error::Interrupted);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where a service's tasks stand against the spec running `image`.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// `replicas` tasks of the new spec run (healthy, when it has a check), no other does.
    Converged,
    /// Running tasks of the new spec and of older ones.
    Waiting { new: usize, old: usize },
    /// Three or more tasks of the new spec made by this deploy failed or were rejected, and
    /// not enough run: `last` is what the engine said of the latest.
    Failing { failed: usize, last: String },
}

fn state_of(t: &Task) -> Option<TaskState> {
    t.status.as_ref().and_then(|s| s.state)
}

/// `tasks` of a service (`before`: the ids that existed before this deploy) against the spec
/// running `image` with `replicas` tasks.
fn progress(tasks: &[Task], before: &HashSet<String>, image: &str, replicas: usize) -> Progress {
    let runs_ours = |t: &&Task| {
        t.spec
            .as_ref()
            .and_then(|s| s.container_spec.as_ref())
            .and_then(|c| c.image.as_deref())
            == Some(image)
    };
    let running = |t: &&Task| state_of(t) == Some(TaskState::RUNNING);
    let new = tasks.iter().filter(running).filter(runs_ours).count();
    let old = tasks
        .iter()
        .filter(running)
        .filter(|t| !runs_ours(t))
        .count();
    if new >= replicas && old == 0 {
        return Progress::Converged;
    }
    let mut failed: Vec<&Task> = tasks
        .iter()
        .filter(runs_ours)
        .filter(|t| t.id.as_ref().is_none_or(|id| !before.contains(id)))
        .filter(|t| matches!(state_of(t), Some(TaskState::FAILED | TaskState::REJECTED)))
        .collect();
    if failed.len() >= 3 && new < replicas {
        failed.sort_by_key(|t| t.status.as_ref().and_then(|s| s.timestamp.clone()));
        let last = failed
            .last()
            .and_then(|t| t.status.as_ref())
            .and_then(|s| s.err.clone().or_else(|| s.message.clone()))
            .unwrap_or_else(|| "no error given".into());
        return Progress::Failing {
            failed: failed.len(),
            last,
        };
    }
    Progress::Waiting { new, old }
}

/// Makes the overlay network `name` (attachable, so `docker run --network` can reach the
/// services too) unless it exists.
async fn ensure_network(
    docker: &Docker,
    name: &str,
    app: &str,
    say: &mut dyn FnMut(&str),
) -> Result<()> {
    match docker.inspect_network(name, None).await {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => {
            say(&format!("creating overlay network {name}"));
            docker
                .create_network(NetworkCreateRequest {
                    name: name.to_string(),
                    driver: Some("overlay".into()),
                    attachable: Some(true),
                    labels: Some(HashMap::from([(APP_LABEL.to_string(), app.to_string())])),
                    ..NetworkCreateRequest::default()
                })
                .await
                .map_err(docker_error(format!("cannot create network {name}")))?;
            Ok(())
        }
        Err(e) => Err(docker_error(format!("cannot inspect network {name}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::parse_apps;
    use std::path::Path;

    const IMAGE: &str = "127.0.0.1:5099/personal/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn app(toml: &str) -> App {
        parse_apps(toml, Path::new("strata.toml"))
            .unwrap()
            .into_values()
            .next()
            .unwrap()
    }

    fn settings(publish: Publish) -> Settings {
        Settings {
            docker_host: "unix:///x.sock".into(),
            network: Some("apps".into()),
            publish,
        }
    }

    fn task(id: &str, image: &str, state: TaskState, err: Option<&str>) -> Task {
        Task {
            id: Some(id.into()),
            spec: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(image.into()),
                    ..TaskSpecContainerSpec::default()
                }),
                ..TaskSpec::default()
            }),
            status: Some(bollard::models::TaskStatus {
                state: Some(state),
                err: err.map(String::from),
                timestamp: Some(format!("2026-01-01T00:00:0{}Z", id.len())),
                ..bollard::models::TaskStatus::default()
            }),
            ..Task::default()
        }
    }

    #[test]
    fn progress_waits_for_the_new_tasks_and_the_old_to_go_and_names_repeated_failures() {
        use TaskState::*;
        let none = HashSet::new();
        let old = "r/web@sha256:old";
        let tasks = vec![
            task("a", old, RUNNING, None),
            task("b", IMAGE, STARTING, None),
        ];
        assert_eq!(
            progress(&tasks, &none, IMAGE, 1),
            Progress::Waiting { new: 0, old: 1 }
        );
        let tasks = vec![
            task("a", old, RUNNING, None),
            task("b", IMAGE, RUNNING, None),
        ];
        assert_eq!(
            progress(&tasks, &none, IMAGE, 1),
            Progress::Waiting { new: 1, old: 1 }
        );
        let tasks = vec![
            task("a", old, SHUTDOWN, None),
            task("b", IMAGE, RUNNING, None),
        ];
        assert_eq!(progress(&tasks, &none, IMAGE, 1), Progress::Converged);

        // Three failures of this deploy's tasks, the latest named; failures from before it
        // (an earlier deploy of the same image) do not count.
        let tasks = vec![
            task("f", IMAGE, FAILED, Some("first")),
            task("ff", IMAGE, REJECTED, Some("no such image")),
            task("fff", IMAGE, FAILED, Some("exit 1")),
            task("p", IMAGE, PENDING, None),
        ];
        assert_eq!(
            progress(&tasks, &none, IMAGE, 1),
            Progress::Failing {
                failed: 3,
                last: "exit 1".into()
            }
        );
        let before = HashSet::from(["f".to_string()]);
        assert_eq!(
            progress(&tasks, &before, IMAGE, 1),
            Progress::Waiting { new: 0, old: 0 }
        );
    }

    #[test]
    fn the_spec_starts_first_rolls_back_checks_health_and_publishes_as_asked() {
        let a = app(
            "[app.web]\nimage = \"web\"\nport = 8080\npublic_port = 80\ncount = 2\n\
             env = { A = \"1\" }\nvolumes = [\"data:/data\"]\nrestart = \"on-failure:4\"\n\
             health = { path = \"/it's\", interval = \"2s\", timeout = \"1s\", grace = \"5s\" }\n",
        );
        let spec = service_spec(&a, IMAGE, &settings(Publish::Ingress)).unwrap();
        let u = spec.update_config.as_ref().unwrap();
        assert_eq!(u.order, Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST));
        assert_eq!(
            u.failure_action,
            Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK)
        );
        assert_eq!(u.monitor, Some(6_000_000_000));
        let c = spec
            .task_template
            .as_ref()
            .unwrap()
            .container_spec
            .as_ref()
            .unwrap();
        assert_eq!(c.image.as_deref(), Some(IMAGE));
        assert_eq!(c.env, Some(vec!["A=1".to_string()]));
        let h = c.health_check.as_ref().unwrap();
        let test = h.test.as_ref().unwrap();
        assert_eq!(test[0], "CMD-SHELL");
        assert!(
            test[1].starts_with("wget -q -O /dev/null 'http://127.0.0.1:8080/it'\\''s'"),
            "{}",
            test[1]
        );
        assert_eq!(h.start_period, Some(5_000_000_000));
        let restart = spec
            .task_template
            .as_ref()
            .unwrap()
            .restart_policy
            .as_ref()
            .unwrap();
        assert_eq!(restart.max_attempts, Some(4));
        let port = &spec.endpoint_spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.target_port, port.published_port),
            (Some(8080), Some(80))
        );
        assert_eq!(
            port.publish_mode,
            Some(EndpointPortConfigPublishModeEnum::INGRESS)
        );

        let spec = service_spec(&a, IMAGE, &settings(Publish::None)).unwrap();
        let e = spec.endpoint_spec.unwrap();
        assert_eq!(e.mode, Some(EndpointSpecModeEnum::DNSRR));
        assert!(e.ports.is_none());

        let e = service_spec(&a, "web:latest", &settings(Publish::None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pinned by digest"), "{e}");
        let e = Settings::new(
            &SwarmSection {
                publish: Some("host".into()),
                ..SwarmSection::default()
            },
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[swarm] publish = \"host\""), "{e}");

        // `memory` and `cpus`: the task's limits; none without them.
        let limited = app("[app.web]\nimage = \"web\"\nport = 8080\nmemory = \"256m\"\ncpus = 2\n");
        let spec = service_spec(&limited, IMAGE, &settings(Publish::None)).unwrap();
        let limits = spec
            .task_template
            .unwrap()
            .resources
            .unwrap()
            .limits
            .unwrap();
        assert_eq!(limits.memory_bytes, Some(256 << 20));
        assert_eq!(limits.nano_cpus, Some(2_000_000_000));
        let spec = service_spec(&a, IMAGE, &settings(Publish::None)).unwrap();
        assert!(spec.task_template.unwrap().resources.is_none());
    }
}
