//! `strata run`: this process's end of a machine's stdio or terminal.
//!
//! The machine is started by the agent, so what it reads and writes are handed over through
//! the file system, made here before the machine is created: FIFOs for its stdout and stderr
//! (kept apart, as `docker run` keeps them) and with `-i` its stdin, or with `-t` a unix
//! socket runc sends the terminal's master to when it starts the machine. They live in a
//! directory of the store's temp area, named after this process, so a killed client leaves
//! nothing for long.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use strata_deploy::host::Host;
use strata_deploy::machines;
use strata_deploy::state::Attached;
use strata_store::Store;

/// A machine's stdio or terminal, waiting for the machine's first start.
pub struct Attachment {
    dir: PathBuf,
    end: End,
}

enum End {
    /// Without `-t`: FIFOs for the process's stdout and stderr (their read ends), and with
    /// `-i` for its stdin (its write end).
    Pipes {
        stdin: Option<(PathBuf, File)>,
        stdout: (PathBuf, File),
        stderr: (PathBuf, File),
    },
    /// `-t`: where runc sends the master; with `input` (`-it`), this terminal's keys go to it.
    Tty {
        socket: PathBuf,
        listener: UnixListener,
        input: bool,
    },
}

/// A FIFO at `path`, opened: for reading (without waiting for a writer), or with `write`
/// read-write (so the machine, its reader, never sees an end of file before this process
/// closes it).
fn fifo(path: PathBuf, write: bool) -> Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .with_context(|| format!("cannot make the FIFO `{}`", path.display()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(if write {
            0
        } else {
            rustix::fs::OFlags::NONBLOCK.bits() as i32
        })
        .open(&path)
        .with_context(|| format!("cannot open `{}`", path.display()))?;
    Ok((path, file))
}

impl End {
    /// The socket (`tty`) or the FIFOs in `dir`.
    fn make(dir: &std::path::Path, interactive: bool, tty: bool) -> Result<End> {
        if tty {
            let socket = dir.join("console.sock");
            let listener = UnixListener::bind(&socket)
                .with_context(|| format!("cannot listen on `{}`", socket.display()))?;
            return Ok(End::Tty {
                socket,
                listener,
                input: interactive,
            });
        }
        Ok(End::Pipes {
            stdin: interactive
                .then(|| fifo(dir.join("stdin"), true))
                .transpose()?,
            stdout: fifo(dir.join("stdout"), false)?,
            stderr: fifo(dir.join("stderr"), false)?,
        })
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Attachment {
    /// The hand-over for `strata run`: FIFOs (stdin with `-i`), or a terminal with `-t`. `-it`
    /// needs a terminal on stdin, as Docker says.
    pub fn prepare(store: &Store, interactive: bool, tty: bool) -> Result<Attachment> {
        if interactive && tty && !std::io::stdin().is_terminal() {
            bail!(
                "the input device is not a TTY: `-it` needs a terminal on stdin (`-i` alone \
                 passes piped input, `-t` alone gives the command a terminal for its output)"
            );
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tmp = store.root().join("strata/tmp");
        let dir = tmp.join(format!(
            "{}{}",
            strata_store::temp_prefix("attach"),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&tmp)
            .and_then(|()| std::fs::DirBuilder::new().mode(0o700).create(&dir))
            .with_context(|| format!("cannot make `{}`", dir.display()))?;
        match End::make(&dir, interactive, tty) {
            Ok(end) => Ok(Attachment { dir, end }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// How the machine's config names this attachment.
    pub fn config(&self) -> Attached {
        match &self.end {
            End::Pipes {
                stdin,
                stdout,
                stderr,
            } => Attached::Pipes {
                stdin: stdin.as_ref().map(|(p, _)| p.clone()),
                stdout: stdout.0.clone(),
                stderr: stderr.0.clone(),
            },
            End::Tty { socket, .. } => Attached::Tty {
                socket: socket.clone(),
            },
        }
    }

    /// Once machine `id` started: copies its stdout and stderr to this process's (and with
    /// `-i` this process's stdin to it, in a thread), or with `-t` relays its terminal (the
    /// output, and with `-it` this terminal's keys, in raw mode). Returns when the machine's
    /// process has ended (or on Ctrl-C, but for `-it`, whose Ctrl-C is the command's).
    pub fn serve(mut self, host: &Host, id: &str) -> Result<()> {
        // A later start of the machine (a restart) finds nothing to attach to.
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        match &mut self.end {
            End::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                // The only write end: when the thread is done with it, the machine reads end
                // of file.
                if let Some((_, mut writer)) = stdin.take() {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut writer);
                    });
                }
                copy_streams(&stdout.1, &stderr.1)?;
            }
            End::Tty {
                listener, input, ..
            } => {
                let master = strata_runtime::receive_console(listener, Duration::from_secs(10))
                    .with_context(|| format!("machine {id}'s terminal"))?;
                relay(&File::from(master), *input)?;
            }
        }
        drop(self);
        // The output ended when the process did; the agent records its exit.
        Ok(machines::copy_log(
            host,
            id,
            true,
            None,
            &mut std::io::sink(),
        )?)
    }
}

/// Copies the machine's `stdout` and `stderr` FIFOs to this process's until both end (every
/// process of the machine that held them has ended), or Ctrl-C.
fn copy_streams(stdout: &File, stderr: &File) -> Result<()> {
    let mut open = [true, true];
    let mut buf = [0u8; 8192];
    let tick = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    while open.iter().any(|o| *o) && !strata_runtime::interrupt::requested() {
        let mut fds: Vec<rustix::event::PollFd<'_>> = [stdout, stderr]
            .iter()
            .map(|f| rustix::event::PollFd::new(*f, rustix::event::PollFlags::IN))
            .collect();
        match rustix::event::poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(std::io::Error::from(e)).context("waiting for the machine"),
        }
        // (A FIFO shows readiness only once a writer has opened it: before the machine
        // starts, nothing is read, and an end of file is a real one.)
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        for (i, (mut from, ready)) in [stdout, stderr].into_iter().zip(ready).enumerate() {
            if !ready || !open[i] {
                continue;
            }
            match from.read(&mut buf) {
                Ok(0) => open[i] = false,
                Ok(n) => {
                    let written = if i == 0 {
                        let mut out = std::io::stdout().lock();
                        out.write_all(&buf[..n]).and_then(|()| out.flush())
                    } else {
                        let mut err = std::io::stderr().lock();
                        err.write_all(&buf[..n]).and_then(|()| err.flush())
                    };
                    written.context("writing the machine's output")?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("reading the machine's output"),
            }
        }
    }
    Ok(())
}

/// This terminal in raw mode until dropped: every key goes to the machine's terminal as typed
/// (Ctrl-C included, as `docker run -it` does).
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        let stdin = std::io::stdin();
        let before = rustix::termios::tcgetattr(stdin.as_fd()).context("reading the terminal")?;
        let mut raw = before.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Now, &raw)
            .context("setting the terminal to raw mode")?;
        Ok(RawMode(before))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin().as_fd(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

/// Copies the machine's terminal `master` to stdout until the process side closes, keeping its
/// size that of this terminal; with `input`, stdin goes to it.
fn relay(master: &File, input: bool) -> Result<()> {
    let size = || rustix::termios::tcgetwinsize(std::io::stdout().as_fd()).ok();
    let mut last = size();
    if let Some(ws) = last {
        let _ = rustix::termios::tcsetwinsize(master, ws);
    }
    let _raw = if input {
        let raw = RawMode::enter()?;
        let mut to_machine = master.try_clone()?;
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || to_machine.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        Some(raw)
    } else {
        None
    };
    let mut out = std::io::stdout().lock();
    let mut reader = master;
    let mut buf = [0u8; 8192];
    let tick = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    loop {
        let mut fds = [rustix::event::PollFd::new(
            master,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => {}
            Ok(_) => match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    out.write_all(&buf[..n])
                        .and_then(|()| out.flush())
                        .context("writing the machine's output")?;
                }
                // EIO: every process holding the terminal's other side has ended.
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the machine's terminal"),
            },
            Err(e) => return Err(std::io::Error::from(e)).context("waiting for the machine"),
        }
        if strata_runtime::interrupt::requested() {
            return Ok(());
        }
        let now = size();
        if let Some(ws) = now
            && last.is_none_or(|l| (l.ws_row, l.ws_col) != (ws.ws_row, ws.ws_col))
        {
            let _ = rustix::termios::tcsetwinsize(master, ws);
        }
        last = now;
    }
}
