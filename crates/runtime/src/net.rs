//! A machine's network: its own named network namespace joined to the host by a veth pair on
//! a /30 of 10.89.0.0/16, so the host reaches the machine at a fixed address.
//!
//! The namespace and the links are made with iproute2's `ip`: talking rtnetlink by hand
//! (veth creation with a peer in another namespace, addresses, routes) is a few hundred lines
//! of message encoding for three commands, and `ip` is on every host that runs runc.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::run::{io_err, remove_file_if_exists};

/// The largest [`NetSpec::index`]: 10.89.0.0/16 holds 16384 /30 networks.
pub const MAX_NET_INDEX: u32 = (1 << 14) - 1;

/// The machines' addresses: one /30 per slot.
const MACHINES_NET: &str = "10.89.0.0/16";

/// Where `ip netns add` puts the namespace files.
const NETNS_DIR: &str = "/run/netns";

/// Markers of networks made ahead of time and not used yet ([`prepare_network`]). Under /run,
/// like the namespaces: both vanish on reboot.
const READY_DIR: &str = "/run/strata/net-ready";

/// A machine's place in 10.89.0.0/16: network `index` is the /30 starting at
/// `10.89.0.0 + 4 * index`; the host end of the veth pair is `.1` in it, the machine `.2`.
///
/// The caller allocates indexes, one per live machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NetSpec {
    /// 0 ..= [`MAX_NET_INDEX`].
    pub index: u32,
}

impl NetSpec {
    fn base(&self) -> u32 {
        u32::from(Ipv4Addr::new(10, 89, 0, 0)) + 4 * (self.index & MAX_NET_INDEX)
    }

    /// The host's address on the machine's /30 (the machine's default gateway).
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 1)
    }

    /// The machine's address, which the host reaches directly.
    pub fn machine_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base() + 2)
    }

    /// The host end of the veth pair (`sm<index>h`; interface names have at most 15 bytes).
    pub fn host_link(&self) -> String {
        format!("sm{}h", self.index)
    }

    /// The machine end of the veth pair, inside the machine's namespace.
    pub fn machine_link(&self) -> String {
        format!("sm{}c", self.index)
    }

    /// The name of the slot's network namespace (`ip netns` name). Named by slot, not by
    /// machine: a slot is unique on the host (machine ids are only unique in a store), and a
    /// namespace made ahead of time ([`prepare_network`]) has no machine yet.
    pub fn netns_name(&self) -> String {
        format!("strata-net{}", self.index)
    }

    /// The file that holds the slot's network namespace (what runc's `linux.namespaces`
    /// points at).
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns_name())
    }

    /// Present while the slot's network is made and no machine has used it yet.
    fn ready_marker(&self) -> PathBuf {
        Path::new(READY_DIR).join(self.index.to_string())
    }
}

/// Runs `ip args...`; a failure names the machine, the command and ip's stderr.
fn ip(id: &str, args: &[&str]) -> Result<()> {
    let out = ip_output(id, args)?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Network {
        id: id.to_string(),
        command: format!("ip {}", args.join(" ")),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

fn ip_output(id: &str, args: &[&str]) -> Result<std::process::Output> {
    Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            id: id.to_string(),
            command: format!("ip {}", args.join(" ")),
            source,
        })
}

/// Whether the host has a link named `name` (in our namespace).
fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Our veth ends (`sm<digits>c`) in `ip -o link show` output.
fn machine_links(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| {
            n.strip_prefix("sm")
                .and_then(|r| r.strip_suffix('c'))
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// Makes machine `id`'s network. A network that [`prepare_network`] made for the slot and no
/// machine used yet is taken as it is (no process to spawn: this is what a start waits for).
/// Otherwise it is made whatever state a previous run left: the namespace if it is missing,
/// then a fresh veth pair (an old pair is replaced: its peer may be in another namespace after
/// a crash), addresses, `lo` up and the default route via the host.
pub fn setup_network(id: &str, net: &NetSpec) -> Result<()> {
    if take_prepared(net) {
        return Ok(());
    }
    make_network(id, net)
}

/// Makes the network of slot `net` ahead of any machine, so that the first machine given the
/// slot starts without waiting for it (the deploy agent keeps a few such spares).
pub fn prepare_network(net: &NetSpec) -> Result<()> {
    let id = format!("(spare network {})", net.index);
    let marker = net.ready_marker();
    remove_file_if_exists(&id, &marker)?;
    make_network(&id, net)?;
    std::fs::create_dir_all(READY_DIR)
        .and_then(|()| std::fs::write(&marker, b""))
        .map_err(io_err(&id, "writing", &marker))
}

/// Whether slot `net` holds a network made by [`prepare_network`] that no machine used yet;
/// it counts as used from now on. The marker alone is not trusted: the namespace and the
/// host end of the pair must still be there (nothing else on the host removes them but us or
/// a person).
fn take_prepared(net: &NetSpec) -> bool {
    let marker = net.ready_marker();
    if std::fs::remove_file(&marker).is_err() {
        return false;
    }
    net.netns_path().exists() && link_exists(&net.host_link())
}

fn make_network(id: &str, net: &NetSpec) -> Result<()> {
    if net.index > MAX_NET_INDEX {
        return Err(Error::InvalidSpec {
            id: id.to_string(),
            reason: format!(
                "network index {} is over the maximum {MAX_NET_INDEX}",
                net.index
            ),
        });
    }
    let ns = net.netns_name();
    let fresh = !net.netns_path().exists();
    let host = net.host_link();
    let peer = net.machine_link();
    if link_exists(&host) {
        ip(id, &["link", "del", &host])?;
    }
    // Veths left inside the namespace by an earlier start (whose host end was deleted by hand,
    // or made there by hand) would keep old addresses and block the name: remove them. A
    // namespace made just now has none.
    if !fresh {
        let listing = ip_output(id, &["-n", &ns, "-o", "link", "show"])?;
        for name in machine_links(&String::from_utf8_lossy(&listing.stdout)) {
            ip(id, &["-n", &ns, "link", "del", &name])?;
        }
    }
    let host_cidr = format!("{}/30", net.host_addr());
    let machine_cidr = format!("{}/30", net.machine_addr());
    let gateway = net.host_addr();
    // Two `ip -batch` runs (the namespace and the host side, then inside the namespace)
    // instead of one process per command: each `ip` start costs a few milliseconds and
    // machine start time counts.
    let add_ns = if fresh {
        format!("netns add {ns}\n")
    } else {
        String::new()
    };
    ip_batch(
        id,
        None,
        &format!(
            "{add_ns}link add {host} type veth peer name {peer} netns {ns}\n\
             addr replace {host_cidr} dev {host}\n\
             link set {host} up\n"
        ),
    )?;
    ip_batch(
        id,
        Some(&ns),
        &format!(
            "link set lo up\n\
             addr replace {machine_cidr} dev {peer}\n\
             link set {peer} up\n\
             route replace default via {gateway}\n"
        ),
    )?;
    Ok(())
}

/// `ip [-n NS] -batch -` with `commands` on stdin; stops at the first failing command.
fn ip_batch(id: &str, netns: Option<&str>, commands: &str) -> Result<()> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    run_script(id, "ip", &args, commands)
}

/// Runs `program args...` with `script` on stdin; a failure names the machine (`id`), the
/// command with its script, and the program's stderr.
fn run_script(id: &str, program: &str, args: &[&str], script: &str) -> Result<()> {
    use std::io::Write;
    let what = || format!("{program} {} <<< {script:?}", args.join(" "));
    let spawn_err = |source| Error::Spawn {
        id: id.to_string(),
        command: what(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Network {
        id: id.to_string(),
        command: what(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// The nftables table that holds the machines' NAT rule ([`ensure_host_nat`]).
pub const NAT_TABLE: &str = "strata";

/// Gives machines a way out, as Docker's bridge network does: IPv4 forwarding on, and one
/// nftables rule masquerading what leaves 10.89.0.0/16 for anywhere else (so a machine
/// reaches the host's networks, DNS servers and the internet with the host's address).
/// Idempotent and atomic (the table is declared, flushed and filled in one `nft -f`
/// transaction); the agent calls it once when it starts. A host firewall that drops forwarded
/// traffic must let 10.89.0.0/16 through; that is the host's policy, not ours to change.
pub fn ensure_host_nat() -> Result<()> {
    let id = "(host NAT)".to_string();
    let forward = Path::new("/proc/sys/net/ipv4/ip_forward");
    let on = std::fs::read_to_string(forward).is_ok_and(|v| v.trim() == "1");
    if !on {
        std::fs::write(forward, b"1").map_err(io_err(
            &id,
            "enabling IPv4 forwarding in",
            forward,
        ))?;
    }
    let script = format!(
        "table ip {NAT_TABLE} {{}}\n\
         flush table ip {NAT_TABLE}\n\
         table ip {NAT_TABLE} {{\n\
         chain postrouting {{\n\
         type nat hook postrouting priority srcnat; policy accept;\n\
         ip saddr {MACHINES_NET} ip daddr != {MACHINES_NET} masquerade\n\
         }}\n\
         }}\n"
    );
    run_script(&id, "nft", &["-f", "-"], &script)
}

/// Removes machine `id`'s veth pair and namespace (or a spare's); what is already gone is
/// fine.
pub fn teardown_network(id: &str, net: &NetSpec) -> Result<()> {
    remove_file_if_exists(id, &net.ready_marker())?;
    let host = net.host_link();
    // Deleting one end of a veth pair deletes both.
    if link_exists(&host) {
        ip(id, &["link", "del", &host])?;
    }
    if net.netns_path().exists() {
        ip(id, &["netns", "del", &net.netns_name()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_links_in_a_listing() {
        let listing = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue\n\
                       2: sm12c@if9: <BROADCAST,MULTICAST> mtu 1500\n\
                       3: smxc@if10: <BROADCAST> mtu 1500\n\
                       4: sm7c: <BROADCAST> mtu 1500\n";
        assert_eq!(machine_links(listing), ["sm12c", "sm7c"]);
    }

    #[test]
    fn addresses() {
        let n = NetSpec { index: 0 };
        assert_eq!(n.host_addr(), Ipv4Addr::new(10, 89, 0, 1));
        assert_eq!(n.machine_addr(), Ipv4Addr::new(10, 89, 0, 2));
        let n = NetSpec { index: 64 };
        assert_eq!(n.host_addr(), Ipv4Addr::new(10, 89, 1, 1));
        assert_eq!(n.machine_addr(), Ipv4Addr::new(10, 89, 1, 2));
        let n = NetSpec { index: 65 };
        assert_eq!(n.machine_addr(), Ipv4Addr::new(10, 89, 1, 6));
        let n = NetSpec {
            index: MAX_NET_INDEX,
        };
        assert_eq!(n.host_addr(), Ipv4Addr::new(10, 89, 255, 253));
        assert_eq!(n.machine_addr(), Ipv4Addr::new(10, 89, 255, 254));
        assert_eq!(n.host_link(), "sm16383h");
        assert!(n.machine_link().len() <= 15);
    }
}
