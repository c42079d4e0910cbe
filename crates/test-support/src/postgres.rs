//! A private PostgreSQL cluster for a test: `initdb` in a temporary directory, a server on
//! 127.0.0.1 and a free port with trust authentication, stopped and removed on drop.
//!
//! PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user
//! (Debian's package makes it) or `nobody`, and its programs run under `setpriv`, which execs
//! them as that user (no extra process between us and the server).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster; dropped, it is stopped and its files removed.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    user: Option<(u32, u32)>,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The directory with `initdb`, `postgres` and `pg_ctl`: Debian's versioned one (the newest),
/// or the one `initdb` on `PATH` is in.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    (out.status.success() && path.is_absolute()).then(|| path.parent().map(Path::to_path_buf))?
}

fn id_of(user: &str, flag: &str) -> Option<u32> {
    let out = Command::new("id").args([flag, user]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())?
}

impl Postgres {
    /// Start a cluster for `test`; `None` (after a loud [`crate::skip`]) only when PostgreSQL's
    /// programs are not installed. Any other failure panics.
    pub fn start(test: &str) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            crate::skip(&format!(
                "{test}: PostgreSQL is not installed (no initdb); on Debian: apt-get install postgresql"
            ));
            return None;
        };
        let user = if crate::is_root() {
            let name = ["postgres", "nobody"]
                .into_iter()
                .find(|u| id_of(u, "-u").is_some())
                .expect("neither a `postgres` nor a `nobody` user to run PostgreSQL as");
            Some((id_of(name, "-u").unwrap(), id_of(name, "-g").unwrap()))
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("strata-pg-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        }
        let cmd = |program: &str| -> Command {
            let path = bin.join(program);
            match user {
                Some((uid, gid)) => {
                    let mut c = Command::new("setpriv");
                    c.args([
                        &format!("--reuid={uid}"),
                        &format!("--regid={gid}"),
                        "--clear-groups",
                        "--",
                    ])
                    .arg(path);
                    c
                }
                None => Command::new(path),
            }
        };
        let out = cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = cmd("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pg = Postgres {
            bin,
            data,
            port,
            user,
            child,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            let ready = Command::new(pg.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return Some(pg);
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "PostgreSQL did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The URL of database `postgres` (user `postgres`, no password).
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    /// The URL of database `name` of this cluster.
    pub fn url_of(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Create database `name`; its URL.
    pub fn create_database(&self, name: &str) -> String {
        let out = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg(name)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url_of(name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // `pg_ctl` must run as the cluster's owner; an immediate stop ends every backend.
        let mut stop = match self.user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={gid}"),
                    "--clear-groups",
                    "--",
                ])
                .arg(self.bin.join("pg_ctl"));
                c
            }
            None => Command::new(self.bin.join("pg_ctl")),
        };
        let stopped = stop
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
