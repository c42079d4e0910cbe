//! The `strata` command: parses flags, runs one command, prints the error chain on failure.

mod build;
mod cli;
mod cmd;
mod deploy;
mod registry;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    default_sigpipe();
    let cli = cli::Cli::parse();
    init_logging(cli.verbose);
    match cmd::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            // Many of our errors already carry their cause in their own text; print a
            // cause only when it adds something the lines above do not say.
            let mut shown = err.to_string();
            for cause in err.chain().skip(1) {
                let text = cause.to_string();
                if !shown.contains(&text) {
                    eprintln!("  caused by: {text}");
                    shown.push('\n');
                    shown.push_str(&text);
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// Rust starts programs with SIGPIPE ignored, so `strata images | head` would get EPIPE on a
/// print and panic. Like every Unix filter, end quietly instead when the reader is gone.
#[allow(unsafe_code)]
fn default_sigpipe() {
    // SAFETY: signal(2) restoring SIG_DFL, called first in main before any other thread
    // exists; no handler of ours is involved. The only unsafe of the crate, at a syscall.
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
