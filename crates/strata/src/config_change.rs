//! Dockerfile instructions that only change an image's config (`docker import --change`, and
//! later the build engine's non-filesystem steps) applied to a [`ContainerConfig`].

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use strata_dockerfile::{CommandLine, Dockerfile, EmptyEnv, Healthcheck, Instruction};
use strata_oci::{ContainerConfig, EmptyObject, HealthConfig};

/// The instructions `docker import --change` accepts.
const CHANGE_KEYWORDS: &[&str] = &[
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

/// Parse each `change` as one Dockerfile instruction and apply it to `config`, expanding
/// variables with the config's `Env` like a Dockerfile would.
pub fn apply_changes(config: &mut ContainerConfig, changes: &[String]) -> Result<()> {
    for change in changes {
        let text = format!("FROM scratch\n{change}\n");
        let df = Dockerfile::parse("--change", &text)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("invalid --change `{change}`"))?;
        let stage = &df.stages[0];
        let [loc] = stage.instructions.as_slice() else {
            bail!("--change `{change}` must be exactly one instruction");
        };
        let keyword = loc.instruction.keyword();
        if !CHANGE_KEYWORDS.contains(&keyword) {
            bail!(
                "--change `{change}`: {keyword} cannot be applied to an image config\n\
                 hint: use one of {}",
                CHANGE_KEYWORDS.join(", ")
            );
        }
        let env = config.env.clone().unwrap_or_default();
        let mut scope = df
            .stage_scope(0, &EmptyEnv)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_base_env(&env);
        let expanded = scope.apply(&df, loc).map_err(|e| anyhow::anyhow!("{e}"))?;
        apply_instruction(config, &expanded, &loc.original)?;
    }
    Ok(())
}

/// Apply one expanded config instruction. `original` is its source text (for ONBUILD).
pub fn apply_instruction(
    config: &mut ContainerConfig,
    ins: &Instruction,
    original: &str,
) -> Result<()> {
    let shell = || {
        config
            .shell
            .clone()
            .unwrap_or_else(|| vec!["/bin/sh".to_string(), "-c".to_string()])
    };
    let argv = |cmd: &CommandLine| match cmd {
        CommandLine::Exec(v) => v.clone(),
        CommandLine::Shell(s) => {
            let mut v = shell();
            v.push(s.clone());
            v
        }
    };
    match ins {
        Instruction::Cmd(cmd) => config.cmd = Some(argv(cmd)),
        Instruction::Entrypoint(cmd) => {
            config.entrypoint = Some(argv(cmd));
            // Docker: ENTRYPOINT resets a CMD inherited from the base image.
            config.cmd = None;
        }
        Instruction::Env(kvs) => {
            let env = config.env.get_or_insert_with(Vec::new);
            for kv in kvs {
                let entry = format!("{}={}", kv.key, kv.value);
                match env
                    .iter_mut()
                    .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == kv.key)
                {
                    Some(slot) => *slot = entry,
                    None => env.push(entry),
                }
            }
        }
        Instruction::Expose(ports) => {
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
        Instruction::Label(kvs) => {
            let labels = config.labels.get_or_insert_with(BTreeMap::new);
            for kv in kvs {
                labels.insert(kv.key.clone(), kv.value.clone());
            }
        }
        Instruction::User(u) => config.user = Some(u.clone()),
        Instruction::Workdir(w) => {
            let base = config
                .working_dir
                .clone()
                .unwrap_or_else(|| "/".to_string());
            config.working_dir = Some(if w.starts_with('/') {
                w.clone()
            } else {
                format!("{}/{w}", base.trim_end_matches('/'))
            });
        }
        Instruction::Volume(vols) => {
            let volumes = config.volumes.get_or_insert_with(BTreeMap::new);
            for v in vols {
                volumes.insert(v.clone(), EmptyObject::default());
            }
        }
        Instruction::StopSignal(s) => config.stop_signal = Some(s.clone()),
        Instruction::Shell(s) => config.shell = Some(s.clone()),
        Instruction::Onbuild(_) => {
            let trigger = original
                .trim_start()
                .get("ONBUILD".len()..)
                .unwrap_or_default()
                .trim()
                .to_string();
            config.on_build.get_or_insert_with(Vec::new).push(trigger);
        }
        Instruction::Healthcheck(h) => {
            config.healthcheck = Some(match h {
                Healthcheck::None => HealthConfig {
                    test: Some(vec!["NONE".to_string()]),
                    ..HealthConfig::default()
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
                    HealthConfig {
                        test: Some(test),
                        interval: nanos(interval),
                        timeout: nanos(timeout),
                        start_period: nanos(start_period),
                        start_interval: nanos(start_interval),
                        retries: retries.map(i64::from),
                        ..HealthConfig::default()
                    }
                }
            })
        }
        other => bail!("{} does not change the image config", other.keyword()),
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
        let c = changed(&["CMD echo hi", "ENTRYPOINT [\"/init\"]"]);
        assert_eq!(c.cmd, None, "ENTRYPOINT resets CMD");
        assert_eq!(c.entrypoint, Some(vec!["/init".to_string()]));
        let c = changed(&["CMD echo $HOME"]);
        assert_eq!(
            c.cmd,
            Some(vec![
                "/bin/sh".to_string(),
                "-c".to_string(),
                "echo $HOME".to_string()
            ])
        );
    }

    #[test]
    fn instructions_that_touch_files_are_refused() {
        let mut c = ContainerConfig::default();
        let err = apply_changes(&mut c, &["RUN echo no".to_string()]).unwrap_err();
        assert!(
            format!("{err:#}").contains("RUN cannot be applied"),
            "{err:#}"
        );
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
}
