//! The seccomp filter of every container strata starts (RUN steps, machines, `strata run`):
//! the system calls Docker's default profile keeps from a container without
//! `CAP_SYS_ADMIN` fail with `EPERM`, as they do under `docker run` and in BuildKit's RUN.
//!
//! Docker's profile is an allow list (about 44 calls of 300+ are left out). This one is the
//! other way round, a deny list of the calls Docker documents as blocked and why: everything
//! not named here is allowed. The reasons, by group:
//! - new namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*` flag): an unprivileged
//!   user namespace gives a process every capability inside it, and with them the kernel's
//!   whole mount, netfilter and BPF surface;
//! - mounting, in both APIs: the container's mounts are fixed when it starts;
//! - the kernel's global state: modules, kexec, reboot, swap, the clock, quotas, accounting,
//!   the kernel keyring (not namespaced), `perf_event_open`, `bpf`, `userfaultfd` (an aid to
//!   kernel exploits), io_uring (as Docker's profile since 25.0), NUMA memory policy;
//! - `open_by_handle_at`, `name_to_handle_at`: opening host files by handle;
//! - obsolete calls no program needs (`uselib`, `ustat`, `sysfs`, `_sysctl`, `vm86`, ...);
//! - `personality` with `ADDR_NO_RANDOMIZE` or `READ_IMPLIES_EXEC` (turning off ASLR or NX).
//!
//! `clone3` answers `ENOSYS` instead, as in Docker's profile: its flags live in memory a
//! filter cannot read, and C libraries fall back to `clone`, whose flags it can.

use serde_json::{Value, json};

/// Called with any argument: fail with `EPERM`.
const DENIED: &[&str] = &[
    // Namespaces and mounts.
    "unshare",
    "setns",
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    // Kernel modules, kexec, reboot, swap.
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    // The clock (not namespaced).
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    // Accounting, quotas, the keyring, tracing the kernel.
    "acct",
    "quotactl",
    "quotactl_fd",
    "add_key",
    "request_key",
    "keyctl",
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // NUMA memory policy of the host.
    "mbind",
    "set_mempolicy",
    "move_pages",
    "migrate_pages",
    // Files by handle.
    "open_by_handle_at",
    "name_to_handle_at",
    // I/O ports, obsolete and legacy calls.
    "ioperm",
    "iopl",
    "nfsservctl",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "vm86",
    "vm86old",
];

/// `CLONE_NEWNS`, `CLONE_NEWCGROUP`, `CLONE_NEWUTS`, `CLONE_NEWIPC`, `CLONE_NEWUSER`,
/// `CLONE_NEWPID`, `CLONE_NEWNET`: a `clone` with any of them fails.
const CLONE_NEW_FLAGS: &[u64] = &[
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// `personality` flags that turn off address-space randomization (`ADDR_NO_RANDOMIZE`) or
/// make readable memory executable (`READ_IMPLIES_EXEC`).
const PERSONALITY_FLAGS: &[u64] = &[0x0004_0000, 0x0040_0000];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The seccomp architectures of this host: its own and the 32-bit ones its programs may use
/// (a call from an architecture the filter does not list is killed).
fn architectures() -> Vec<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "x86" => vec!["SCMP_ARCH_X86"],
        "arm" => vec!["SCMP_ARCH_ARM"],
        "riscv64" => vec!["SCMP_ARCH_RISCV64"],
        "powerpc64" => vec!["SCMP_ARCH_PPC64LE"],
        "s390x" => vec!["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
        _ => Vec::new(),
    }
}

/// The argument of `clone` that holds its flags (the second on s390, the first elsewhere).
fn clone_flags_arg() -> u32 {
    if cfg!(target_arch = "s390x") { 1 } else { 0 }
}

/// One rule per flag: the call fails when that bit of argument `index` is set (seccomp
/// compares one argument with one value per condition, and conditions of a rule all hold).
fn deny_when_flag_set(name: &str, index: u32, flags: &[u64]) -> Vec<Value> {
    flags
        .iter()
        .map(|flag| {
            json!({
                "names": [name],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": index, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            })
        })
        .collect()
}

/// The `linux.seccomp` object of a runtime spec. Names this kernel or libseccomp does not
/// know are skipped by runc.
pub fn profile() -> Value {
    let mut syscalls = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    syscalls.extend(deny_when_flag_set(
        "clone",
        clone_flags_arg(),
        CLONE_NEW_FLAGS,
    ));
    syscalls.extend(deny_when_flag_set("personality", 0, PERSONALITY_FLAGS));
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": architectures(),
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_for(p: &Value, name: &str) -> Vec<Value> {
        p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"].as_array().unwrap().iter().any(|n| n == name))
            .cloned()
            .collect()
    }

    #[test]
    fn namespaces_mounts_and_kernel_state_are_denied_everything_else_allowed() {
        let p = profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        for name in [
            "unshare",
            "setns",
            "mount",
            "keyctl",
            "bpf",
            "open_by_handle_at",
        ] {
            let rules = rules_for(&p, name);
            assert_eq!(rules.len(), 1, "{name}");
            assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO");
            assert_eq!(rules[0]["errnoRet"], 1);
            assert!(
                rules[0].get("args").is_none(),
                "{name} is denied whatever its arguments"
            );
        }
        // What Docker's profile lets a container do stays allowed.
        for name in [
            "ptrace",
            "chroot",
            "clone",
            "personality",
            "socket",
            "setuid",
        ] {
            assert!(
                rules_for(&p, name).iter().all(|r| r.get("args").is_some()),
                "{name} must not be denied outright"
            );
        }
        assert_eq!(rules_for(&p, "clone3")[0]["errnoRet"], 38);
    }

    #[test]
    fn clone_is_denied_for_each_new_namespace_flag_and_only_those() {
        let p = profile();
        let rules = rules_for(&p, "clone");
        let masked: Vec<u64> = rules
            .iter()
            .map(|r| {
                let a = &r["args"][0];
                assert_eq!(a["op"], "SCMP_CMP_MASKED_EQ");
                assert_eq!(a["value"], a["valueTwo"], "the flag's bit, set");
                a["value"].as_u64().unwrap()
            })
            .collect();
        // CLONE_NEWUSER and CLONE_NEWNS among them; thread and fork flags not.
        assert!(masked.contains(&0x1000_0000) && masked.contains(&0x0002_0000));
        let all = masked.iter().fold(0, |a, b| a | b);
        assert_eq!(all, 0x7E02_0000);
        assert_eq!(
            all & 0x0001_0f00,
            0,
            "CLONE_VM|FS|FILES|SIGHAND|THREAD stay allowed"
        );
    }

    #[test]
    fn the_host_architecture_and_its_32_bit_one_are_listed() {
        let archs = architectures();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                archs,
                ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
            );
        }
        assert!(!archs.is_empty());
    }
}
