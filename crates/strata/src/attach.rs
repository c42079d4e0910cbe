//! `strata run -i` and `-t`: this process's end of a machine's stdin or terminal.
//!
//! The machine is started by the agent, so what it reads and where its terminal goes are
//! handed over through the file system, made here before the machine is created: a FIFO
//! this process holds open for writing (`-i`), or a unix socket runc sends the terminal's
//! master to when it starts the machine (`-t`). Both live in a directory of the store's
//! temp area, named after this process, so a killed client leaves nothing for long.

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

/// A machine's stdin or terminal, waiting for the machine's first start.
pub struct Attachment {
    dir: PathBuf,
    end: End,
}

enum End {
    /// `-i`: the FIFO that is the process's stdin, and its write end.
    Stdin { fifo: PathBuf, writer: File },
    /// `-t`: where runc sends the master; with `input` (`-it`), this terminal's keys go to it.
    Tty {
        socket: PathBuf,
        listener: UnixListener,
        input: bool,
    },
}

impl End {
    /// The socket (`tty`) or the FIFO and its write end in `dir`.
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
        let fifo = dir.join("stdin");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .with_context(|| format!("cannot make the FIFO `{}`", fifo.display()))?;
        // Read-write: opening does not wait for the machine's end, and the machine never sees
        // an end of file before this process closes it.
        let writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .with_context(|| format!("cannot open `{}`", fifo.display()))?;
        Ok(End::Stdin { fifo, writer })
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Attachment {
    /// What `-i` (`interactive`) and `-t` (`tty`) ask for, or `None` for neither. `-it` needs
    /// a terminal on stdin, as Docker says.
    pub fn prepare(store: &Store, interactive: bool, tty: bool) -> Result<Option<Attachment>> {
        if !interactive && !tty {
            return Ok(None);
        }
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
            Ok(end) => Ok(Some(Attachment { dir, end })),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// How the machine's config names this attachment.
    pub fn config(&self) -> Attached {
        match &self.end {
            End::Stdin { fifo, .. } => Attached::Stdin { fifo: fifo.clone() },
            End::Tty { socket, .. } => Attached::Tty {
                socket: socket.clone(),
            },
        }
    }

    /// Once machine `id` started: `-i` copies this process's stdin to it (in a thread) and
    /// prints its output from the log; `-t` relays its terminal (the output, and with `-it`
    /// this terminal's keys, in raw mode). Returns when the machine's process has ended (or
    /// on Ctrl-C, without `-i`).
    pub fn serve(self, host: &Host, id: &str) -> Result<()> {
        match &self.end {
            End::Stdin { fifo, writer } => {
                // A later start of the machine (a restart) gets no stdin from here.
                let _ = std::fs::remove_file(fifo);
                let mut writer = writer.try_clone()?;
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut writer);
                    // Dropped: the machine reads end of file.
                });
                drop(self);
                Ok(machines::copy_log(
                    host,
                    id,
                    true,
                    None,
                    &mut std::io::stdout().lock(),
                )?)
            }
            End::Tty {
                socket,
                listener,
                input,
            } => {
                let master = strata_runtime::receive_console(listener, Duration::from_secs(10))
                    .with_context(|| format!("machine {id}'s terminal"))?;
                let _ = std::fs::remove_file(socket);
                let master = File::from(master);
                relay(&master, *input)?;
                drop(self);
                // The terminal closed when the process ended; the agent records its exit.
                Ok(machines::copy_log(
                    host,
                    id,
                    true,
                    None,
                    &mut std::io::sink(),
                )?)
            }
        }
    }
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
