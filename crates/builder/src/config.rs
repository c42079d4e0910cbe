//! Instructions that only change an image's config (CMD, ENV, LABEL, ...): turned into a
//! typed [`ConfigChange`] by the planner and applied to a [`ContainerConfig`].
//!
//! Also serves `docker import --change` ([`apply_changes`]).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use strata_dockerfile::{CommandLine, Dockerfile, EmptyEnv, Healthcheck, Instruction};
use strata_oci::{ContainerConfig, EmptyObject, HealthConfig};

use crate::error::{Error, Result};

/// The instructions `docker import --change` accepts.
pub const CHANGE_KEYWORDS: &[&str] = &[
    "CMD",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// A command as the plan keeps it: exec form, or shell form still to be wrapped in the
/// `SHELL` in effect when it is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// `["prog", "arg"]`.
    Exec(Vec<String>),
    /// `prog arg`.
    Shell(String),
}

impl From<&CommandLine> for Command {
    fn from(c: &CommandLine) -> Self {
        match c {
            CommandLine::Exec(v) => Command::Exec(v.clone()),
            CommandLine::Shell(s) => Command::Shell(s.clone()),
        }
    }
}

impl Command {
    /// The argv, shell form wrapped in `shell`.
    pub fn argv(&self, shell: &[String]) -> Vec<String> {
        match self {
            Command::Exec(v) => v.clone(),
            Command::Shell(s) => {
                let mut v = shell.to_vec();
                v.push(s.clone());
                v
            }
        }
    }
}

/// The default `SHELL` of Linux images.
pub fn default_shell() -> Vec<String> {
    vec!["/bin/sh".to_string(), "-c".to_string()]
}

/// One typed, expanded change to an image config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ConfigChange {
    /// `CMD`.
    Cmd { command: Command },
    /// `ENTRYPOINT` (resets an inherited `CMD`, like Docker).
    Entrypoint { command: Command },
    /// `ENV k=v ...`.
    Env { vars: Vec<(String, String)> },
    /// `EXPOSE` entries (`80`, `53/udp`).
    Expose { ports: Vec<String> },
    /// `LABEL k=v ...`.
    Label { labels: Vec<(String, String)> },
    /// `MAINTAINER`: the image's `author` (outside the container config, like Docker).
    Maintainer { author: String },
    /// `USER`.
    User { user: String },
    /// `WORKDIR` (relative to the previous one).
    Workdir { path: String },
    /// `VOLUME`.
    Volume { paths: Vec<String> },
    /// `STOPSIGNAL`.
    StopSignal { signal: String },
    /// `SHELL`.
    Shell { shell: Vec<String> },
    /// `ONBUILD` trigger text.
    Onbuild { trigger: String },
    /// `HEALTHCHECK` (`None` fields stay unset; `test` as Docker stores it).
    Healthcheck {
        test: Vec<String>,
        interval: Option<i64>,
        timeout: Option<i64>,
        start_period: Option<i64>,
        start_interval: Option<i64>,
        retries: Option<i64>,
    },
}

impl ConfigChange {
    /// The change an expanded instruction makes; `original` is its source text (for
    /// `ONBUILD`). `None` for instructions that are not config changes.
    pub fn from_instruction(ins: &Instruction, original: &str) -> Option<ConfigChange> {
        let kvs = |v: &[strata_dockerfile::KeyValue]| {
            v.iter()
                .map(|kv| (kv.key.clone(), kv.value.clone()))
                .collect()
        };
        Some(match ins {
            Instruction::Cmd(c) => ConfigChange::Cmd { command: c.into() },
            Instruction::Entrypoint(c) => ConfigChange::Entrypoint { command: c.into() },
            Instruction::Env(v) => ConfigChange::Env { vars: kvs(v) },
            Instruction::Expose(p) => ConfigChange::Expose { ports: p.clone() },
            Instruction::Label(v) => ConfigChange::Label { labels: kvs(v) },
            Instruction::Maintainer(m) => ConfigChange::Maintainer { author: m.clone() },
            Instruction::User(u) => ConfigChange::User { user: u.clone() },
            Instruction::Workdir(w) => ConfigChange::Workdir { path: w.clone() },
            Instruction::Volume(v) => ConfigChange::Volume { paths: v.clone() },
            Instruction::StopSignal(s) => ConfigChange::StopSignal { signal: s.clone() },
            Instruction::Shell(s) => ConfigChange::Shell { shell: s.clone() },
            Instruction::Onbuild(_) => ConfigChange::Onbuild {
                trigger: original
                    .trim_start()
                    .get("ONBUILD".len()..)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            },
            Instruction::Healthcheck(h) => match h {
                Healthcheck::None => ConfigChange::Healthcheck {
                    test: vec!["NONE".to_string()],
                    interval: None,
                    timeout: None,
                    start_period: None,
                    start_interval: None,
                    retries: None,
                },
                Healthcheck::Check {
                    command,
                    interval,
                    timeout,
                    start_period,
                    start_interval,
                    retries,
                } => {
                    let nanos = |d: &Option<std::time::Duration>| {
                        d.map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                    };
                    let test = match command {
                        CommandLine::Exec(v) => {
                            let mut t = vec!["CMD".to_string()];
                            t.extend(v.iter().cloned());
                            t
                        }
                        CommandLine::Shell(s) => vec!["CMD-SHELL".to_string(), s.clone()],
                    };
                    ConfigChange::Healthcheck {
                        test,
                        interval: nanos(interval),
                        timeout: nanos(timeout),
                        start_period: nanos(start_period),
                        start_interval: nanos(start_interval),
                        retries: retries.map(i64::from),
                    }
                }
            },
            _ => return None,
        })
    }

    /// Applies the change to `config`.
    pub fn apply(&self, config: &mut ContainerConfig) {
        let shell = config.shell.clone().unwrap_or_else(default_shell);
        match self {
            ConfigChange::Cmd { command } => config.cmd = Some(command.argv(&shell)),
            ConfigChange::Entrypoint { command } => {
                config.entrypoint = Some(command.argv(&shell));
                // Docker: ENTRYPOINT resets a CMD inherited from the base image. A CMD set
                // earlier in the same stage is kept: callers that know (the build engine,
                // `apply_changes`) put it back.
                config.cmd = None;
            }
            ConfigChange::Env { vars } => {
                let env = config.env.get_or_insert_with(Vec::new);
                let mut index = env_index(env);
                for (k, v) in vars {
                    let entry = format!("{k}={v}");
                    match index.get(k.as_str()) {
                        Some(&i) => env[i] = entry,
                        None => {
                            index.insert(k.clone(), env.len());
                            env.push(entry);
                        }
                    }
                }
            }
            ConfigChange::Expose { ports } => {
                let exposed = config.exposed_ports.get_or_insert_with(BTreeMap::new);
                for p in ports {
                    let p = if p.contains('/') {
                        p.clone()
                    } else {
                        format!("{p}/tcp")
                    };
                    exposed.insert(p, EmptyObject::default());
                }
            }
            ConfigChange::Label { labels } => {
                let map = config.labels.get_or_insert_with(BTreeMap::new);
                for (k, v) in labels {
                    map.insert(k.clone(), v.clone());
                }
            }
            // Not a container config field: the engine sets the image's author.
            ConfigChange::Maintainer { .. } => {}
            ConfigChange::User { user } => config.user = Some(user.clone()),
            ConfigChange::Workdir { path } => {
                config.working_dir = Some(resolve_workdir(config.working_dir.as_deref(), path));
            }
            ConfigChange::Volume { paths } => {
                let volumes = config.volumes.get_or_insert_with(BTreeMap::new);
                for v in paths {
                    volumes.insert(v.clone(), EmptyObject::default());
                }
            }
            ConfigChange::StopSignal { signal } => config.stop_signal = Some(signal.clone()),
            ConfigChange::Shell { shell } => config.shell = Some(shell.clone()),
            ConfigChange::Onbuild { trigger } => {
                config
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(trigger.clone());
            }
            ConfigChange::Healthcheck {
                test,
                interval,
                timeout,
                start_period,
                start_interval,
                retries,
            } => {
                config.healthcheck = Some(HealthConfig {
                    test: Some(test.clone()),
                    interval: *interval,
                    timeout: *timeout,
                    start_period: *start_period,
                    start_interval: *start_interval,
                    retries: *retries,
                    ..HealthConfig::default()
                })
            }
        }
    }
}

/// `WORKDIR path` after `WORKDIR base`: absolute wins, relative joins (Docker).
pub fn resolve_workdir(base: Option<&str>, path: &str) -> String {
    if path.starts_with('/') {
        return strata_dockerfile::clean_path(path);
    }
    let base = base.filter(|b| !b.is_empty()).unwrap_or("/");
    strata_dockerfile::clean_path(&format!("{}/{path}", base.trim_end_matches('/')))
}

/// Applies one expanded config instruction to `config`. `original` is its source text (for
/// ONBUILD). Instructions that touch files (RUN, COPY, ...) are refused.
pub fn apply_instruction(
    config: &mut ContainerConfig,
    ins: &Instruction,
    original: &str,
) -> Result<()> {
    match ConfigChange::from_instruction(ins, original) {
        Some(change) => {
            change.apply(config);
            Ok(())
        }
        None => Err(Error::Usage(format!(
            "{} does not change the image config",
            ins.keyword()
        ))),
    }
}

/// Where each name of a `KEY=VALUE` list is (its first entry, the one a change replaces), so
/// that applying many variables costs one pass, not one scan each.
pub(crate) fn env_index(env: &[String]) -> HashMap<String, usize> {
    let mut index = HashMap::with_capacity(env.len());
    for (i, e) in env.iter().enumerate() {
        let name = e.split_once('=').map_or(e.as_str(), |(k, _)| k);
        index.entry(name.to_string()).or_insert(i);
    }
    index
}

/// Parses each `change` as one Dockerfile instruction and applies it to `config`, expanding
/// variables with the config's `Env` like a Dockerfile would (`docker import --change`).
pub fn apply_changes(config: &mut ContainerConfig, changes: &[String]) -> Result<()> {
    let mut cmd_set_here = false;
    for change in changes {
        let text = format!("FROM scratch\n{change}\n");
        let df = Dockerfile::parse("--change", &text)?;
        let Some(stage) = df.stages.first() else {
            return Err(Error::Usage(format!("invalid --change `{change}`")));
        };
        let [loc] = stage.instructions.as_slice() else {
            return Err(Error::Usage(format!(
                "--change `{change}` must be exactly one instruction"
            )));
        };
        let keyword = loc.instruction.keyword();
        if !CHANGE_KEYWORDS.contains(&keyword) {
            return Err(Error::Usage(format!(
                "--change `{change}`: {keyword} cannot be applied to an image config\n\
                 hint: use one of {}",
                CHANGE_KEYWORDS.join(", ")
            )));
        }
        let env = config.env.clone().unwrap_or_default();
        let mut scope = df.stage_scope(0, &EmptyEnv)?.with_base_env(&env);
        let expanded = scope.apply(&df, loc)?;
        let cmd_before = config.cmd.clone();
        apply_instruction(config, &expanded, &loc.original)?;
        match expanded {
            Instruction::Cmd(_) => cmd_set_here = true,
            Instruction::Entrypoint(_) if cmd_set_here => config.cmd = cmd_before,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changed(changes: &[&str]) -> ContainerConfig {
        let mut c = ContainerConfig::default();
        apply_changes(
            &mut c,
            &changes.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        c
    }

    #[test]
    fn cmd_forms_and_env_expansion_follow_docker() {
        let c = changed(&[
            r#"CMD ["sh"]"#,
            "ENV APP=/srv HOME=/root",
            "WORKDIR $APP",
            "WORKDIR sub",
            "EXPOSE 8080 53/udp",
        ]);
        assert_eq!(c.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(c.working_dir.as_deref(), Some("/srv/sub"));
        assert_eq!(
            c.env,
            Some(vec!["APP=/srv".to_string(), "HOME=/root".to_string()])
        );
        let ports: Vec<_> = c.exposed_ports.unwrap().into_keys().collect();
        assert_eq!(ports, ["53/udp", "8080/tcp"]);
        // Docker keeps a CMD set by the same changes, and resets an inherited one.
        let c = changed(&["CMD echo hi", "ENTRYPOINT [\"/init\"]"]);
        assert_eq!(c.cmd.as_ref().map(|v| v[2].as_str()), Some("echo hi"));
        assert_eq!(c.entrypoint, Some(vec!["/init".to_string()]));
        let mut inherited = ContainerConfig {
            cmd: Some(vec!["sh".to_string()]),
            ..ContainerConfig::default()
        };
        apply_changes(&mut inherited, &["ENTRYPOINT [\"/init\"]".to_string()]).unwrap();
        assert_eq!(inherited.cmd, None, "ENTRYPOINT resets an inherited CMD");
        let mut c = ContainerConfig::default();
        ConfigChange::Shell {
            shell: vec!["/bin/bash".into(), "-lc".into()],
        }
        .apply(&mut c);
        ConfigChange::Cmd {
            command: Command::Shell("echo $HOME".into()),
        }
        .apply(&mut c);
        assert_eq!(
            c.cmd,
            Some(vec![
                "/bin/bash".to_string(),
                "-lc".to_string(),
                "echo $HOME".to_string()
            ])
        );
    }

    #[test]
    fn instructions_that_touch_files_are_refused() {
        let mut c = ContainerConfig::default();
        let err = apply_changes(&mut c, &["RUN echo no".to_string()]).unwrap_err();
        assert!(err.to_string().contains("RUN cannot be applied"), "{err}");
        let err = apply_changes(&mut c, &["CMD [".to_string(), "BOGUS x".to_string()]);
        assert!(err.is_err());
    }

    #[test]
    fn healthcheck_and_onbuild_are_recorded() {
        let c = changed(&[
            "HEALTHCHECK --interval=5s --retries=3 CMD wget -q localhost",
            "ONBUILD RUN echo child",
        ]);
        let h = c.healthcheck.unwrap();
        assert_eq!(h.interval, Some(5_000_000_000));
        assert_eq!(h.retries, Some(3));
        assert_eq!(h.test.unwrap()[0], "CMD-SHELL");
        assert_eq!(c.on_build, Some(vec!["RUN echo child".to_string()]));
    }

    #[test]
    fn workdir_is_cleaned_and_joined() {
        assert_eq!(resolve_workdir(None, "app"), "/app");
        assert_eq!(resolve_workdir(Some("/a/"), "b/../c"), "/a/c");
        assert_eq!(resolve_workdir(Some("/a"), "/x/"), "/x");
    }
}
