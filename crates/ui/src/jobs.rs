//! Work a button started that outlives its request (a roll back: `strata deploy APP --image
//! REF`, run as its own process so the page's server never holds a deploy's locks), with its
//! output kept for the page to stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use strata_oci::sync::MutexExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

/// One job's output so far and its end.
#[derive(Debug, Clone, Default)]
pub struct JobState {
    pub lines: Vec<String>,
    /// `Some(Ok)` when it succeeded, `Some(Err(why))` when it failed.
    pub end: Option<Result<(), String>>,
}

pub struct Job {
    pub title: String,
    pub app: String,
    pub state: watch::Receiver<JobState>,
}

#[derive(Default)]
pub struct Jobs {
    map: Mutex<HashMap<String, Arc<Job>>>,
}

impl Jobs {
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.map.lock_ok().get(id).cloned()
    }

    /// Starts `exe ARGS…` for `app`; returns the job's id.
    pub fn spawn(&self, title: String, app: String, exe: PathBuf, args: Vec<String>) -> String {
        let id = crate::session::random_id()[..16].to_string();
        let (tx, rx) = watch::channel(JobState::default());
        self.map.lock_ok().insert(
            id.clone(),
            Arc::new(Job {
                title,
                app,
                state: rx,
            }),
        );
        tokio::spawn(run(exe, args, tx));
        id
    }
}

async fn run(exe: PathBuf, args: Vec<String>, tx: watch::Sender<JobState>) {
    let child = tokio::process::Command::new(&exe)
        .args(&args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tx.send_modify(|s| s.end = Some(Err(format!("cannot start {}: {e}", exe.display()))));
            return;
        }
    };
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tx.send_modify(|s| s.lines.push(line));
            }
        }));
    }
    for r in readers {
        let _ = r.await;
    }
    let end = match child.wait().await {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("the deploy failed ({status})")),
        Err(e) => Err(format!("cannot wait for the deploy: {e}")),
    };
    tx.send_modify(|s| s.end = Some(end));
}
