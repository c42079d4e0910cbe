//! A headless Chromium for one test, driven over WebDriver through Debian's `chromedriver`
//! (`apt-get install chromium chromium-driver`).

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `chromedriver` of its own on a free loopback port; killed on drop, pass or fail.
pub struct Chromedriver {
    child: Child,
    port: u16,
    /// Chromium's profile, gone with the test.
    pub profile: tempfile::TempDir,
}

impl Chromedriver {
    /// Starts `chromedriver`, or says loudly why not (`None`) when it or `chromium` is missing.
    pub fn start(test: &str) -> Option<Chromedriver> {
        if !(crate::on_path("chromedriver") && crate::on_path("chromium")) {
            crate::skip(&format!(
                "{test}: needs chromium and chromedriver (apt-get install chromium chromium-driver)"
            ));
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Chromedriver {
            child,
            port,
            profile: tempfile::tempdir().unwrap(),
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(d)
    }

    /// Its WebDriver URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Chromium's command line for a test: headless, no sandbox (root), nothing fetched from
    /// the network on its own, a profile of the test's.
    pub fn chromium_args(&self) -> Vec<String> {
        vec![
            "--headless=new".into(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", self.profile.path().display()),
        ]
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that failed before closing its session leaves Chromium running: its
        // processes are the ones whose command line names this test's profile.
        let marker = format!("--user-data-dir={}", self.profile.path().display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == marker.as_bytes())
            {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }
}
