//! The OCI runtime `config.json` (spec 1.0.2) for a [`RunSpec`]: Docker's defaults for
//! capabilities, mounts, masked and read-only paths, and a seccomp filter ([`crate::seccomp`]).

use std::path::Path;

use serde_json::{Value, json};

use crate::{MountSpec, NetworkMode, RunSpec};

/// The OCI runtime spec version we write.
pub const OCI_VERSION: &str = "1.0.2";

/// Docker's default capability set (moby `oci/caps/defaults.go`).
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Paths Docker hides from containers (moby `oci/defaults.go`).
pub const MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths Docker makes read-only in containers (moby `oci/defaults.go`).
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The soft and hard `RLIMIT_NOFILE` of container processes.
pub const NOFILE_LIMIT: u64 = 1_048_576;

/// Host files that a container on the host network sees read-only at the same path.
pub const HOST_NETWORK_FILES: &[&str] = &["/etc/resolv.conf", "/etc/hosts"];

/// `/etc/hosts` of a container without network.
pub const ISOLATED_HOSTS: &str =
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// The `PATH` a process gets when its environment has none (Docker's default, so `RUN`
/// finds `sh` and friends in images that do not set `ENV PATH`).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the bundle needs besides the [`RunSpec`]: where its own files are, and host limits.
#[derive(Debug, Clone, Copy)]
pub struct BundleSetup<'a> {
    /// The root filesystem (absolute, or relative to the bundle directory).
    pub rootfs: &'a Path,
    /// The generated `/etc/hosts`, mounted for [`NetworkMode::None`].
    pub isolated_hosts: &'a Path,
    /// `linux.cgroupsPath`; `None` lets runc pick its default.
    pub cgroups_path: Option<&'a str>,
    /// The soft and hard `RLIMIT_NOFILE`: [`NOFILE_LIMIT`], or less when the caller's own
    /// hard limit is lower and it cannot raise it (no `CAP_SYS_RESOURCE`).
    pub nofile_limit: u64,
}

/// Every mount point inside the container, in mount order: the standard filesystems, the
/// network files, then the caller's mounts.
pub fn mount_targets(spec: &RunSpec) -> Vec<String> {
    mounts(spec, Path::new("/hosts"))
        .iter()
        .filter_map(|m| m["destination"].as_str().map(str::to_string))
        .collect()
}

fn mounts(spec: &RunSpec, isolated_hosts: &Path) -> Vec<Value> {
    let mut out = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    let ro_bind = |source: &Path, destination: &str| {
        json!({"destination": destination, "type": "bind", "source": source,
               "options": ["rbind", "rprivate", "ro"]})
    };
    match spec.network {
        NetworkMode::Host => {
            for file in HOST_NETWORK_FILES {
                // A host without the file (no resolver configured) gives none to the container.
                if Path::new(file).exists() {
                    out.push(ro_bind(Path::new(file), file));
                }
            }
        }
        NetworkMode::None => out.push(ro_bind(isolated_hosts, "/etc/hosts")),
    }
    for m in &spec.mounts {
        out.push(match m {
            MountSpec::Bind {
                source,
                target,
                readonly,
            } => {
                let mut options = vec!["rbind", "rprivate"];
                options.push(if *readonly { "ro" } else { "rw" });
                json!({"destination": target, "type": "bind", "source": source, "options": options})
            }
            MountSpec::Tmpfs { target, size } => {
                let mut options = vec![
                    "nosuid".to_string(),
                    "nodev".to_string(),
                    "mode=1777".to_string(),
                ];
                if let Some(size) = size {
                    options.push(format!("size={size}"));
                }
                json!({"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options})
            }
        });
    }
    out
}

/// The `config.json` document for `spec`.
pub fn config_json(spec: &RunSpec, files: BundleSetup<'_>) -> Value {
    let caps: Vec<&str> = DEFAULT_CAPABILITIES.to_vec();
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if spec.network == NetworkMode::None {
        namespaces.push(json!({"type": "network"}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
        // Deny every device; runc adds its default allow list (null, zero, tty, pts...).
        "resources": {"devices": [{"allow": false, "access": "rwm"}]},
        // The system calls Docker keeps from a container (crate::seccomp).
        "seccomp": crate::seccomp::profile(),
    });
    if let Some(cg) = files.cgroups_path {
        linux["cgroupsPath"] = json!(cg);
    }
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    let mut user = json!({"uid": spec.user.uid, "gid": spec.user.gid});
    if !spec.user.additional_gids.is_empty() {
        user["additionalGids"] = json!(spec.user.additional_gids);
    }
    json!({
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": false,
            "user": user,
            "args": spec.args,
            "env": env,
            "cwd": spec.cwd,
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": files.nofile_limit, "soft": files.nofile_limit}],
            // As Docker runs a RUN step and a container: a setuid binary (sudo, su) still
            // works for a non-root user. With the flag set, `USER app` + `RUN sudo …` fails.
            "noNewPrivileges": false,
        },
        "root": {"path": files.rootfs, "readonly": spec.readonly_rootfs},
        "hostname": spec.hostname,
        "mounts": mounts(spec, files.isolated_hosts),
        "linux": linux,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Rootfs, UserSpec};
    use std::path::PathBuf;

    fn spec(network: NetworkMode) -> RunSpec {
        RunSpec {
            id: "t".into(),
            rootfs: Rootfs::Dir(PathBuf::from("/r")),
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            cwd: "/w".into(),
            user: UserSpec {
                uid: 5,
                gid: 6,
                additional_gids: vec![7],
            },
            hostname: "h".into(),
            network,
            mounts: vec![MountSpec::Tmpfs {
                target: "/tmp".into(),
                size: Some(1024),
            }],
            readonly_rootfs: true,
        }
    }

    fn files() -> BundleSetup<'static> {
        BundleSetup {
            rootfs: Path::new("rootfs"),
            isolated_hosts: Path::new("/b/hosts"),
            cgroups_path: Some("strata/t"),
            nofile_limit: NOFILE_LIMIT,
        }
    }

    #[test]
    fn network_none_has_a_netns_and_a_private_hosts_file() {
        let c = config_json(&spec(NetworkMode::None), files());
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        let hosts: Vec<&Value> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["destination"] == "/etc/hosts")
            .collect();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0]["source"], "/b/hosts");
    }

    #[test]
    fn host_network_has_no_netns() {
        let c = config_json(&spec(NetworkMode::Host), files());
        assert!(
            !c["linux"]["namespaces"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["type"] == "network")
        );
    }

    #[test]
    fn process_fields() {
        let c = config_json(&spec(NetworkMode::Host), files());
        let p = &c["process"];
        assert_eq!(
            p["user"],
            json!({"uid": 5, "gid": 6, "additionalGids": [7]})
        );
        assert_eq!(p["noNewPrivileges"], false);
        assert_eq!(p["env"], json!(["A=1", DEFAULT_PATH]));
        assert_eq!(p["terminal"], false);
        assert_eq!(p["capabilities"]["bounding"].as_array().unwrap().len(), 14);
        assert_eq!(p["rlimits"][0]["hard"], 1_048_576);
        assert_eq!(c["root"], json!({"path": "rootfs", "readonly": true}));
        assert_eq!(c["linux"]["cgroupsPath"], "strata/t");
        let tmp = c["mounts"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(tmp["destination"], "/tmp");
        assert!(
            tmp["options"]
                .as_array()
                .unwrap()
                .contains(&json!("size=1024"))
        );
    }
}
