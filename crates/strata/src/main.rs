//! The `strata` command: parses flags, runs one command, prints the error chain on failure.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod attach;
mod build;
mod cli;
mod cmd;
mod cp;
mod deploy;
mod dev;
mod hosts;
mod output;
mod rebase;
mod registry;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: a no-op build of a 50k-file context made ~3,600
/// `mprotect` calls (arena growth) and ~2,000 futex waits in glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if writes_listing(&cli.command) {
        default_sigpipe();
    }
    init_logging(cli.verbose);
    if cleans_up_on_interrupt(&cli.command)
        && let Err(e) = install_interrupt_handler()
    {
        eprintln!("warning: Ctrl-C will not clean up: {e}");
    }
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) if strata_runtime::interrupt::requested() => {
            eprintln!("error: interrupted; what this command had started was stopped and removed");
            ExitCode::from(130)
        }
        Err(err) => {
            eprintln!("error: {}", terminal_safe(&err.to_string()));
            // Many of our errors already carry their cause in their own text; print a
            // cause only when it adds something the lines above do not say.
            let mut shown = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {}", terminal_safe(&text));
                    shown.push('\n');
                    shown.push_str(&text);
                }
            }
            if let Some(hint) = hint_for(&err) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What to do next, for failures whose cause a newcomer cannot act on as it is worded (an
/// error that already carries a hint gets none).
fn hint_for(err: &anyhow::Error) -> Option<&'static str> {
    let text: Vec<String> = err.chain().map(|c| c.to_string()).collect();
    let any = |needle: &str| text.iter().any(|t| t.contains(needle));
    if any("hint:") {
        return None;
    }
    let refused = err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    }) || any("Connection refused");
    if refused && any("registry request") {
        return Some(
            "nothing answers at that address: is the registry running? \
             (`strata registry serve --addr HOST:PORT`)",
        );
    }
    if any("is not in the store and pulling it from") {
        return Some(
            "make the image first: `strata import ROOTFS.tar NAME`, `strata load -i ARCHIVE`, \
             `strata pull REGISTRY/REPO:TAG` or `strata tag IMAGE NAME`; an image of the \
             project is built when strata.toml lists it",
        );
    }
    None
}

/// An error message with control characters escaped except its line breaks: an error may
/// quote what a registry, an image or a layer said, and that must not drive the terminal.
fn terminal_safe(text: &str) -> String {
    text.split('\n')
        .map(strata_oci::printable)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `command` only writes a result to stdout for a reader (`strata images | head`),
/// so that ending quietly when the reader is gone is right. Servers (`registry serve`, the
/// agent) and transfers (push, pull, deploy, load) must never die of SIGPIPE: a client that
/// closes a connection mid-body would kill the server, and a dropped connection would end a
/// push before its retry and resume run. They keep Rust's default (ignored: a write to a
/// closed socket fails with EPIPE, which they handle).
fn writes_listing(command: &cli::Command) -> bool {
    use cli::{Command as C, MachineCommand as M};
    matches!(
        command,
        C::Images(_)
            | C::Inspect(_)
            | C::Releases(_)
            | C::Status { .. }
            | C::Validate { .. }
            | C::Save(_)
            | C::Machine {
                command: M::List { .. } | M::Logs { .. },
                ..
            }
    )
}

/// Commands that set up state they must take down when interrupted: a build's RUN container,
/// overlay mount and bundle; a deploy's release and new machines.
fn cleans_up_on_interrupt(command: &cli::Command) -> bool {
    matches!(
        command,
        cli::Command::Build(_)
            | cli::Command::Deploy(_)
            | cli::Command::Run(_)
            | cli::Command::Dev(_)
    )
}

/// SIGINT and SIGTERM set the process-wide interrupt flag: a running RUN container is killed,
/// waits end, and the command unwinds through its normal failure path, removing what it made.
/// A second signal exits at once (130), for a user who really wants out.
fn install_interrupt_handler() -> std::io::Result<()> {
    let flag = strata_runtime::interrupt::flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())?;
        signal_hook::flag::register(signal, flag.clone())?;
    }
    Ok(())
}

/// Rust starts programs with SIGPIPE ignored, so `strata images | head` would get EPIPE on a
/// print and panic. Like every Unix filter, end quietly instead when the reader is gone.
#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: signal(2) restoring SIG_DFL, called at the start of main before any other
    // thread exists (argument parsing starts none); no handler of ours is involved. The only
    // unsafe of the crate, at a syscall.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .without_time()
        .init();
}
