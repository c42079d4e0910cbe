//! Machine operations as `strata machine …`, `strata run` and `strata logs` use them: each
//! sets what the machine should be in the state DB, has the agent act on it, and waits until
//! it has. The agent alone starts and stops processes; these only ask and watch.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::agent::{ensure_agent, poke};
use crate::deploy::{check_port, poll, wait_running};
use crate::host::{Host, MachineOptions};
use crate::state::{Desired, Machine, MachineState};
use crate::{Error, Result};

/// How long a machine may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The machine `id` (a full id or a name).
pub fn find(host: &Host, id: &str) -> Result<Machine> {
    host.state
        .machine(id)?
        .ok_or_else(|| Error::UnknownMachine(id.to_string()))
}

/// Starts the agent of `host`'s store if it is not running (`exe` is the strata binary it
/// runs as) and tells it to look at the DB now.
pub fn wake_agent(host: &Host, exe: &Path) -> Result<u32> {
    let pid = ensure_agent(host.store.root(), exe)?;
    poke(host.store.root());
    Ok(pid)
}

/// How long a stop may take: the machine's kill timeout plus slack for the agent.
pub fn stop_timeout(m: &Machine) -> Duration {
    Duration::from_millis(m.config.kill_timeout_ms) + Duration::from_secs(30)
}

/// A new machine of `image` with `opts`, its host ports routed, running. A port another
/// owner holds fails it before anything is made.
pub fn run_machine(
    host: &mut Host,
    image: &str,
    opts: &MachineOptions,
    exe: &Path,
) -> Result<Machine> {
    let m = run_machine_created(host, image, opts, exe)?;
    wait_running(host, &m.id, START_TIMEOUT)
}

/// [`run_machine`] for a machine that lives only as long as its command (`strata run`, like
/// `docker run --rm`): one that fails to start (an unknown user, a missing executable) is
/// removed before the error is returned, not left behind as a failed machine.
pub fn run_machine_removed_on_failure(
    host: &mut Host,
    image: &str,
    opts: &MachineOptions,
    exe: &Path,
) -> Result<Machine> {
    let m = run_machine_created(host, image, opts, exe)?;
    match wait_running(host, &m.id, START_TIMEOUT) {
        Ok(m) => Ok(m),
        Err(e) => {
            host.state.set_desired(&m.id, Desired::Destroyed)?;
            wake_agent(host, exe)?;
            wait_gone(host, &m)?;
            Err(e)
        }
    }
}

/// Creates the machine, its `-p` routes, and wakes the agent to start it.
fn run_machine_created(
    host: &mut Host,
    image: &str,
    opts: &MachineOptions,
    exe: &Path,
) -> Result<Machine> {
    check_ports(host, opts)?;
    let m = host.create_machine(image, opts)?;
    for (h, c) in &opts.ports {
        let backend = SocketAddr::new(IpAddr::V4(Host::machine_addr(&m)), *c);
        if let Err(e) = host
            .state
            .set_route(*h, &format!("machine:{}", m.id), &[backend])
        {
            host.state.set_desired(&m.id, Desired::Destroyed)?;
            return Err(e);
        }
    }
    wake_agent(host, exe)?;
    Ok(m)
}

/// Fails when a host port of `opts` is taken (by an app, a machine or another program).
pub fn check_ports(host: &Host, opts: &MachineOptions) -> Result<()> {
    for (h, _) in &opts.ports {
        let addr = SocketAddr::from(([127, 0, 0, 1], *h));
        check_port(host, "", addr)
            .map_err(|e| Error::Config(format!("cannot publish port {h}: {e}")))?;
    }
    Ok(())
}

/// Starts a stopped machine and waits until it runs.
pub fn start(host: &Host, id: &str, exe: &Path) -> Result<Machine> {
    let m = find(host, id)?;
    host.state.set_desired(&m.id, Desired::Running)?;
    wake_agent(host, exe)?;
    wait_running(host, &m.id, START_TIMEOUT)
}

/// Stops a machine (its stop signal, then SIGKILL after its kill timeout) and waits.
/// `docker kill`: sends `signal` to machine `id`. SIGKILL stops it for good (its restart
/// policy does not start it again, as a stop); another signal is only delivered (a process
/// that exits of it is restarted as its policy says).
pub fn kill(host: &Host, id: &str, signal: i32, exe: &Path) -> Result<Machine> {
    let m = find(host, id)?;
    if m.state != MachineState::Running {
        return Err(Error::Config(format!(
            "cannot kill machine {}: it is {}, not running",
            m.id, m.state
        )));
    }
    if signal != 9 {
        host.driver.signal(&m.id, signal)?;
        return Ok(m);
    }
    host.state.set_desired(&m.id, Desired::Stopped)?;
    // Killed here at once; the agent then records the stop (and finds it already dead).
    host.driver.signal(&m.id, 9)?;
    wake_agent(host, exe)?;
    wait_stopped(host, &m)?;
    Ok(m)
}

pub fn stop(host: &Host, id: &str, exe: &Path) -> Result<Machine> {
    let m = find(host, id)?;
    host.state.set_desired(&m.id, Desired::Stopped)?;
    wake_agent(host, exe)?;
    wait_stopped(host, &m)?;
    Ok(m)
}

/// Stops, then starts a machine (a fresh root filesystem; volumes stay).
pub fn restart(host: &Host, id: &str, exe: &Path) -> Result<Machine> {
    let m = stop(host, id, exe)?;
    host.state.set_desired(&m.id, Desired::Running)?;
    poke(host.store.root());
    wait_running(host, &m.id, START_TIMEOUT)
}

/// Stops and removes a machine, its log and upper directory (volumes stay), and waits.
pub fn destroy(host: &Host, id: &str, exe: &Path) -> Result<Machine> {
    let m = find(host, id)?;
    host.state.set_desired(&m.id, Desired::Destroyed)?;
    wake_agent(host, exe)?;
    if !wait_gone(host, &m)? {
        return Err(Error::Machine {
            id: m.id.clone(),
            reason: format!("was not destroyed within {} s", stop_timeout(&m).as_secs()),
        });
    }
    Ok(m)
}

/// Waits until the agent reports `m` stopped (not running).
pub fn wait_stopped(host: &Host, m: &Machine) -> Result<()> {
    let timeout = stop_timeout(m);
    let stopped = poll(timeout, || {
        let now = host.state.machine(&m.id)?;
        Ok(now
            .is_none_or(|now| now.state != MachineState::Running)
            .then_some(()))
    })?;
    match stopped {
        Some(()) => Ok(()),
        None => Err(Error::Machine {
            id: m.id.clone(),
            reason: format!("is still running after {} s", timeout.as_secs()),
        }),
    }
}

/// Waits until the agent has removed `m`; false when it has not within its stop timeout.
pub fn wait_gone(host: &Host, m: &Machine) -> Result<bool> {
    Ok(poll(stop_timeout(m), || {
        Ok(host.state.machine(&m.id)?.is_none().then_some(()))
    })?
    .is_some())
}

/// Whether a followed machine's output has ended: it ran and stopped, or is not meant to run
/// (like `docker logs -f`, which ends when the container's process does).
fn ended(host: &Host, id: &str, seen_running: &mut bool) -> Result<bool> {
    Ok(match host.state.machine(id)? {
        None => true,
        Some(m) if m.state == MachineState::Running => {
            *seen_running = true;
            false
        }
        Some(m) => *seen_running || m.desired != Desired::Running,
    })
}

/// Reads what machine `id`'s log gained since `pos` (from the start again when it was
/// rotated, copytruncate-style); nothing when there is no log yet.
fn read_new(host: &Host, id: &str, pos: &mut u64) -> Result<Vec<u8>> {
    let path = host.log_path(id);
    let io = |source| Error::Io {
        op: "cannot read",
        path: path.clone(),
        source,
    };
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    if f.metadata().map_err(io)?.len() < *pos {
        *pos = 0;
    }
    f.seek(SeekFrom::Start(*pos)).map_err(io)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(io)?;
    *pos += buf.len() as u64;
    Ok(buf)
}

fn write_err(source: std::io::Error) -> Error {
    Error::Io {
        op: "cannot write the log to",
        path: "stdout".into(),
        source,
    }
}

/// Where the last `lines` lines of the file at `path` start (`docker logs --tail N`): 0 when
/// it has no more than that, or is missing. A last line without its newline counts as one.
/// Reads the file backwards, a block at a time, so a long log costs what is shown.
pub fn tail_offset(path: &Path, lines: usize) -> Result<u64> {
    let io = |source| Error::Io {
        op: "cannot read",
        path: path.to_path_buf(),
        source,
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    if lines == 0 {
        return Ok(len);
    }
    let mut end = len;
    let mut newlines = 0usize;
    let mut block = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(block.len() as u64);
        let chunk = &mut block[..(end - start) as usize];
        f.seek(SeekFrom::Start(start)).map_err(io)?;
        f.read_exact(chunk).map_err(io)?;
        for (i, b) in chunk.iter().enumerate().rev() {
            let at = start + i as u64;
            // The file's own last newline ends the last line; it starts none.
            if *b != b'\n' || at + 1 == len {
                continue;
            }
            newlines += 1;
            if newlines == lines {
                return Ok(at + 1);
            }
        }
        end = start;
    }
    Ok(0)
}

/// Copies machine `id`'s output to `out`, from its last `tail` lines when given; with
/// `follow`, keeps copying until its process ends (or Ctrl-C).
pub fn copy_log(
    host: &Host,
    id: &str,
    follow: bool,
    tail: Option<usize>,
    out: &mut dyn Write,
) -> Result<()> {
    let mut pos = match tail {
        Some(n) => tail_offset(&host.log_path(id), n)?,
        None => 0,
    };
    let mut seen_running = false;
    loop {
        let ended = ended(host, id, &mut seen_running)?;
        let buf = read_new(host, id, &mut pos)?;
        out.write_all(&buf).map_err(write_err)?;
        out.flush().map_err(write_err)?;
        if !follow || ended || strata_runtime::interrupt::requested() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Copies the output of every machine of `app` to `out`, line by line, each line prefixed
/// with its machine's short id, from each one's last `tail` lines when given; with `follow`,
/// until every one of them has ended.
pub fn copy_app_logs(
    host: &Host,
    app: &str,
    follow: bool,
    tail: Option<usize>,
    out: &mut dyn Write,
) -> Result<()> {
    struct Followed {
        id: String,
        pos: u64,
        partial: Vec<u8>,
        seen_running: bool,
        ended: bool,
    }
    let mut all: Vec<Followed> = host
        .state
        .app_machines(app)?
        .into_iter()
        .filter(|m| m.desired != Desired::Destroyed)
        .map(|m| Followed {
            id: m.id,
            pos: 0,
            partial: Vec::new(),
            seen_running: false,
            ended: false,
        })
        .collect();
    if all.is_empty() {
        return Err(Error::Config(format!(
            "app `{app}` has no machines on this host (see `strata apps list`)"
        )));
    }
    if let Some(n) = tail {
        for f in &mut all {
            f.pos = tail_offset(&host.log_path(&f.id), n)?;
        }
    }
    loop {
        for f in all.iter_mut().filter(|f| !f.ended) {
            let ended = ended(host, &f.id, &mut f.seen_running)?;
            let buf = read_new(host, &f.id, &mut f.pos)?;
            f.partial.extend_from_slice(&buf);
            let short = &f.id[..f.id.len().min(12)];
            let mut line_out = |line: &[u8], newline: bool| -> std::io::Result<()> {
                write!(out, "{short} | ")?;
                out.write_all(line)?;
                if newline {
                    writeln!(out)?;
                }
                Ok(())
            };
            while let Some(nl) = f.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = f.partial.drain(..=nl).collect();
                line_out(&line, false).map_err(write_err)?;
            }
            // A last line without its newline is shown once the machine can add no more.
            if (ended || !follow) && !f.partial.is_empty() {
                line_out(&std::mem::take(&mut f.partial), true).map_err(write_err)?;
            }
            out.flush().map_err(write_err)?;
            f.ended = ended || !follow;
        }
        if all.iter().all(|f| f.ended) || strata_runtime::interrupt::requested() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_offset_finds_where_the_last_lines_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let tail = |text: &[u8], n: usize| {
            std::fs::write(&path, text).unwrap();
            let at = tail_offset(&path, n).unwrap() as usize;
            String::from_utf8_lossy(&text[at..]).into_owned()
        };
        assert_eq!(tail(b"a\nb\nc\n", 2), "b\nc\n");
        assert_eq!(tail(b"a\nb\nc\n", 1), "c\n");
        assert_eq!(tail(b"a\nb\nc\n", 3), "a\nb\nc\n");
        assert_eq!(tail(b"a\nb\nc\n", 9), "a\nb\nc\n");
        assert_eq!(tail(b"a\nb\nc\n", 0), "");
        // A last line still being written counts as a line.
        assert_eq!(tail(b"a\nb\npart", 1), "part");
        assert_eq!(tail(b"a\nb\npart", 2), "b\npart");
        assert_eq!(tail(b"\n\n", 1), "\n");
        assert_eq!(tail(b"", 3), "");
        // Across the blocks it reads backwards.
        let long: Vec<u8> = (0..50_000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        assert_eq!(tail(&long, 2), "line 49998\nline 49999\n");
        assert_eq!(tail(&long, 50_000).len(), long.len());
        assert!(tail(&long, 20_000).starts_with("line 30000\n"));
        assert_eq!(tail_offset(&dir.path().join("missing"), 3).unwrap(), 0);
    }
}
