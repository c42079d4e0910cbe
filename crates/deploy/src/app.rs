//! `[app.NAME]` tables of strata.toml: what `strata deploy` runs and how.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::health::{Check, HealthConfig};
use crate::state::RestartPolicy;

use strata_project::StrataToml;
pub use strata_project::{
    AppSpec, HealthSpec, HostEntry, KubernetesSection, LiveUpdate, RunRule, SwarmSection, SyncRule,
};

/// Where `strata deploy` puts an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Machines on this host, or on the app's `hosts` over SSH.
    Local,
    /// Kubernetes objects, written or applied with kubectl.
    Kubernetes,
    /// A Docker Swarm service.
    Swarm,
}

impl Target {
    /// `local`, `kubernetes` or `swarm`; `what` names where the value was written.
    pub fn parse(s: &str, what: &str) -> Result<Target> {
        match s {
            "local" => Ok(Target::Local),
            "kubernetes" => Ok(Target::Kubernetes),
            "swarm" => Ok(Target::Swarm),
            other => Err(Error::Config(format!(
                "{what} `{other}`: expected local, kubernetes or swarm"
            ))),
        }
    }
}

/// How a deploy to several hosts proceeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every host at once.
    Parallel,
    /// `parallelism` hosts at a time, one batch after another; a batch with a failed host
    /// stops the rollout.
    Rolling {
        /// Hosts at once (at least 1).
        parallelism: usize,
    },
}

/// An app with its name and defaults applied.
#[derive(Debug, Clone)]
pub struct App {
    /// Its name (the table key).
    pub name: String,
    /// As written.
    pub spec: AppSpec,
}

/// Parses `1.5s`, `200ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| Error::Config(format!("duration `{s}`: expected e.g. 500ms, 2s, 1m")))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(Error::Config(format!(
                "duration `{s}`: unknown unit `{unit}` (ms, s, m, h)"
            )));
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a memory size as `docker run -m` does: a number of bytes, or with `b`, `k`, `m`,
/// `g` or `t` (binary: 1k is 1024 bytes; `kb`, `KiB` alike), at least 6 MiB as Docker asks.
pub fn parse_memory(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let bad = || {
        Error::Config(format!(
            "memory `{s}`: expected a size such as 512m, 1.5g or 268435456"
        ))
    };
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim_start();
    let unit = unit.strip_suffix('b').unwrap_or(unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let scale: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = (n * scale as f64) as u64;
    if bytes < 6 << 20 {
        return Err(Error::Config(format!(
            "memory `{s}`: the least a machine may have is 6MB, as in Docker"
        )));
    }
    Ok(bytes)
}

/// Parses a CPU count as `docker run --cpus` does (`0.5`, `2`), into thousandths of a CPU.
pub fn parse_cpus(cpus: f64) -> Result<u64> {
    if !(cpus.is_finite() && cpus >= 0.01) {
        return Err(Error::Config(format!(
            "cpus `{cpus}`: expected a number of CPUs of at least 0.01, e.g. 0.5 or 2"
        )));
    }
    Ok((cpus * 1000.0).round() as u64)
}

impl App {
    /// Its machines' memory limit in bytes (`memory`), if any.
    pub fn memory(&self) -> Result<Option<u64>> {
        self.spec.memory.as_deref().map(parse_memory).transpose()
    }

    /// Its machines' CPU limit in thousandths of a CPU (`cpus`), if any.
    pub fn millicpus(&self) -> Result<Option<u64>> {
        self.spec.cpus.map(|c| parse_cpus(c.0)).transpose()
    }

    /// The host port the proxy serves; none for an app without a `port`.
    pub fn public_port(&self) -> Option<u16> {
        self.spec.port.map(|p| self.spec.public_port.unwrap_or(p))
    }

    /// How its hosts are deployed (`strategy`).
    pub fn strategy(&self) -> Result<Strategy> {
        let strategy = match self.spec.strategy.as_deref() {
            None | Some("parallel") => Strategy::Parallel,
            Some("rolling") => Strategy::Rolling {
                parallelism: self.spec.parallelism.unwrap_or(1) as usize,
            },
            Some(other) => {
                return Err(Error::Config(format!(
                    "app `{}`: strategy `{other}`: expected parallel or rolling",
                    self.name
                )));
            }
        };
        match (self.spec.parallelism, strategy) {
            (Some(0), _) => Err(Error::Config(format!(
                "app `{}`: parallelism = 0: at least one host must be deployed at a time",
                self.name
            ))),
            (Some(_), Strategy::Parallel) => Err(Error::Config(format!(
                "app `{}`: parallelism applies to strategy = \"rolling\" (parallel deploys \
                 every host at once)",
                self.name
            ))),
            _ => Ok(strategy),
        }
    }

    /// Machines per release.
    pub fn count(&self) -> u32 {
        self.spec.count.unwrap_or(1).max(1)
    }

    /// The restart policy (default `always`, as Fly keeps an app's machines up).
    pub fn restart(&self) -> Result<RestartPolicy> {
        self.spec
            .restart
            .as_deref()
            .map_or(Ok(RestartPolicy::Always), RestartPolicy::parse)
    }

    /// Stop signal → SIGKILL delay.
    pub fn kill_timeout(&self) -> Result<Duration> {
        self.spec
            .kill_timeout
            .as_deref()
            .map_or(Ok(Duration::from_secs(10)), parse_duration)
    }

    /// The health check and how long to wait for it; `None` when there is none to make
    /// (`health = { type = "none" }`, or no `port` and no `health`): a machine is then healthy
    /// once it runs.
    pub fn health(&self) -> Result<Option<(HealthConfig, Duration)>> {
        if self.spec.public_port.is_some() && self.spec.port.is_none() {
            return Err(Error::Config(format!(
                "app `{}`: `public_port` needs `port` (the port the app listens on)",
                self.name
            )));
        }
        let h = self.spec.health.clone();
        let d =
            |v: Option<&String>, default: Duration| v.map_or(Ok(default), |s| parse_duration(s));
        let Some(h) = h else {
            return Ok(self.spec.port.map(|port| {
                (
                    HealthConfig {
                        check: Check::Tcp,
                        port,
                        interval: Duration::from_millis(200),
                        timeout: Duration::from_secs(2),
                        grace: Duration::ZERO,
                    },
                    Duration::from_secs(60),
                )
            }));
        };
        let check = match (h.kind.as_deref(), &h.path) {
            (Some("none"), _) => return Ok(None),
            (Some("tcp"), _) => Check::Tcp,
            (Some("http") | None, path) => Check::Http {
                path: path.clone().unwrap_or_else(|| "/".into()),
                expect_status: None,
            },
            (Some(other), _) => {
                return Err(Error::Config(format!(
                    "app `{}`: health type `{other}`: expected http, tcp or none",
                    self.name
                )));
            }
        };
        let Some(port) = h.port.or(self.spec.port) else {
            return Err(Error::Config(format!(
                "app `{}`: a {} health check needs a port: set `port`, or `port` in `health`",
                self.name,
                h.kind.as_deref().unwrap_or("http")
            )));
        };
        Ok(Some((
            HealthConfig {
                check,
                port,
                interval: d(h.interval.as_ref(), Duration::from_secs(1))?,
                timeout: d(h.timeout.as_ref(), Duration::from_secs(2))?,
                grace: d(h.grace.as_ref(), Duration::ZERO)?,
            },
            d(h.deadline.as_ref(), Duration::from_secs(60))?,
        )))
    }

    /// Where `strata deploy` puts it unless told otherwise (`target`, default local).
    pub fn target(&self) -> Result<Target> {
        self.spec.target.as_deref().map_or(Ok(Target::Local), |t| {
            Target::parse(t, &format!("app `{}`: target", self.name))
        })
    }

    /// Named volumes as (name, path).
    pub fn volumes(&self) -> Result<Vec<(String, String)>> {
        self.spec.volumes.iter().map(|v| parse_volume(v)).collect()
    }
}

/// `NAME:/path` → (name, path); names are `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn parse_volume(v: &str) -> Result<(String, String)> {
    let bad = || Error::Config(format!("volume `{v}`: expected NAME:/absolute/path"));
    let (name, path) = v.split_once(':').ok_or_else(bad)?;
    let name_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !name_ok || !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(bad());
    }
    Ok((name.to_string(), path.to_string()))
}

/// The `[kubernetes]` and `[swarm]` tables of a strata.toml.
pub fn load_orchestrators(strata_toml: &Path) -> Result<(KubernetesSection, SwarmSection)> {
    let file = read_file(strata_toml)?;
    Ok((file.kubernetes, file.swarm))
}

/// The hosts of a strata.toml, by name.
pub fn load_hosts(strata_toml: &Path) -> Result<BTreeMap<String, HostEntry>> {
    let file = read_file(strata_toml)?;
    for name in file.host.keys() {
        if !valid_name(name) {
            return Err(Error::Config(format!(
                "{}: host name `{name}`: use lowercase letters, digits and '-'",
                strata_toml.display()
            )));
        }
    }
    Ok(file.host)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn read_file(strata_toml: &Path) -> Result<StrataToml> {
    let text = std::fs::read_to_string(strata_toml).map_err(|source| Error::Io {
        op: "read",
        path: strata_toml.to_path_buf(),
        source,
    })?;
    parse_file(&text, strata_toml)
}

fn parse_file(text: &str, strata_toml: &Path) -> Result<StrataToml> {
    StrataToml::parse(text, strata_toml).map_err(|e| Error::Config(e.to_string()))
}

/// The app `name` of `apps` (read from `origin`, which errors name), or the only app when
/// no name is given.
pub fn pick_app(apps: &BTreeMap<String, App>, name: Option<&str>, origin: &Path) -> Result<App> {
    let names = || apps.keys().cloned().collect::<Vec<_>>().join(", ");
    match name {
        Some(name) => apps.get(name).cloned().ok_or_else(|| {
            Error::Config(format!(
                "no app `{name}` in {} (apps: {})",
                origin.display(),
                names()
            ))
        }),
        None => match apps.values().next() {
            Some(only) if apps.len() == 1 => Ok(only.clone()),
            _ => Err(Error::Config(format!(
                "which app? {} declares {}",
                origin.display(),
                if apps.is_empty() {
                    "none (add an [app.NAME] table)".to_string()
                } else {
                    names()
                }
            ))),
        },
    }
}

/// The apps of a strata.toml, by name.
pub fn load_apps(strata_toml: &Path) -> Result<BTreeMap<String, App>> {
    apps_of(read_file(strata_toml)?, strata_toml)
}

/// The apps of strata.toml text (`origin` names it in errors): what a host deploys when the
/// client sends it an app's table.
pub fn parse_apps(text: &str, origin: &Path) -> Result<BTreeMap<String, App>> {
    apps_of(parse_file(text, origin)?, origin)
}

fn apps_of(file: StrataToml, strata_toml: &Path) -> Result<BTreeMap<String, App>> {
    let mut apps = BTreeMap::new();
    for (name, spec) in file.app {
        if !valid_name(&name) {
            return Err(Error::Config(format!(
                "{}: app name `{name}`: use lowercase letters, digits and '-'",
                strata_toml.display()
            )));
        }
        let app = App { name, spec };
        app.health()?;
        app.restart()?;
        app.volumes()?;
        app.kill_timeout()?;
        app.strategy()?;
        app.target()?;
        if let Some(lu) = &app.spec.live_update {
            match lu.restart.as_deref() {
                None | Some("none" | "process") => {}
                Some(other) => {
                    return Err(Error::Config(format!(
                        "app `{}`: live_update restart `{other}`: expected \"none\" or \"process\"",
                        app.name
                    )));
                }
            }
            for r in &lu.sync {
                if !r.dest.starts_with('/') {
                    return Err(Error::Config(format!(
                        "app `{}`: live_update sync dest `{}` must be an absolute path",
                        app.name, r.dest
                    )));
                }
            }
        }
        apps.insert(app.name.clone(), app);
    }
    Ok(apps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_cpus_read_as_docker_reads_them() {
        assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_memory("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_memory("8192kb").unwrap(), 8 << 20);
        assert_eq!(parse_memory("268435456").unwrap(), 256 << 20);
        for bad in ["", "m", "12x", "1.2.3m", "-5m"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        let e = parse_memory("4m").unwrap_err().to_string();
        assert!(e.contains("6MB"), "{e}");
        assert_eq!(parse_cpus(0.5).unwrap(), 500);
        assert_eq!(parse_cpus(2.0).unwrap(), 2000);
        assert!(parse_cpus(0.0).is_err() && parse_cpus(f64::NAN).is_err());
    }

    #[test]
    fn durations_and_volumes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 days").is_err());
        assert_eq!(
            parse_volume("data:/var/lib/data").unwrap(),
            ("data".into(), "/var/lib/data".into())
        );
        assert!(parse_volume("data:relative").is_err());
        assert!(parse_volume("../x:/y").is_err());
        assert!(parse_volume("x:/a/../b").is_err());
    }

    #[test]
    fn rolling_takes_a_parallelism_and_nothing_else_does() {
        let app = |extra: &str| {
            parse_apps(
                &format!("[app.web]\nimage = \"web\"\n{extra}"),
                Path::new("strata.toml"),
            )
            .map(|apps| apps["web"].clone())
        };
        assert_eq!(app("").unwrap().strategy().unwrap(), Strategy::Parallel);
        assert_eq!(
            app("strategy = \"rolling\"\n").unwrap().strategy().unwrap(),
            Strategy::Rolling { parallelism: 1 }
        );
        assert_eq!(
            app("strategy = \"rolling\"\nparallelism = 3\n")
                .unwrap()
                .strategy()
                .unwrap(),
            Strategy::Rolling { parallelism: 3 }
        );
        let err = app("strategy = \"rolling\"\nparallelism = 0\n").unwrap_err();
        assert!(err.to_string().contains("parallelism = 0"), "{err}");
        let err = app("parallelism = 2\n").unwrap_err();
        assert!(err.to_string().contains("rolling"), "{err}");
    }

    #[test]
    fn apps_load_with_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("strata.toml");
        std::fs::write(
            &f,
            "[[image]]\nname = \"web\"\n\n[app.web]\nimage = \"web\"\nport = 8080\n\
             public_port = 18080\nhealth = { path = \"/healthz\", interval = \"100ms\" }\n",
        )
        .unwrap();
        let apps = load_apps(&f).unwrap();
        let web = &apps["web"];
        assert_eq!(web.public_port(), Some(18080));
        assert_eq!(web.count(), 1);
        assert_eq!(web.restart().unwrap(), RestartPolicy::Always);
        let (h, deadline) = web.health().unwrap().unwrap();
        assert_eq!(h.interval, Duration::from_millis(100));
        assert_eq!(deadline, Duration::from_secs(60));
        assert!(matches!(h.check, Check::Http { ref path, .. } if path == "/healthz"));

        std::fs::write(&f, "[app.web]\nimage = \"web\"\nport = 1\nprot = 2\n").unwrap();
        let e = load_apps(&f).unwrap_err().to_string();
        assert!(e.contains("prot"), "{e}");

        // A worker: no port, so no health check and no public port; `type = "none"` too.
        std::fs::write(&f, "[app.worker]\nimage = \"w\"\n[app.quiet]\nimage = \"q\"\nport = 80\nhealth = { type = \"none\" }\n").unwrap();
        let apps = load_apps(&f).unwrap();
        assert_eq!(apps["worker"].public_port(), None);
        assert!(apps["worker"].health().unwrap().is_none());
        assert!(apps["quiet"].health().unwrap().is_none());
        assert_eq!(apps["quiet"].public_port(), Some(80));
        std::fs::write(&f, "[app.w]\nimage = \"w\"\nhealth = { path = \"/\" }\n").unwrap();
        let e = load_apps(&f).unwrap_err().to_string();
        assert!(e.contains("needs a port"), "{e}");
        std::fs::write(&f, "[app.w]\nimage = \"w\"\npublic_port = 9\n").unwrap();
        let e = load_apps(&f).unwrap_err().to_string();
        assert!(e.contains("`public_port` needs `port`"), "{e}");

        // A misspelt `[app.*]` table is an error at its line, not an app quietly dropped.
        std::fs::write(
            &f,
            "[[image]]\nname = \"web\"\n\n[ap.web]\nimage = \"web\"\n",
        )
        .unwrap();
        let e = load_apps(&f).unwrap_err().to_string();
        assert!(e.contains("strata.toml:4:") && e.contains("`ap`"), "{e}");
    }
}
