//! `strata ui` end to end in a real browser (headless Chromium over WebDriver): the busybox
//! app deployed twice, seen live; a roll back clicked and the old release serving; a
//! machine's log line appearing live; its stop and start buttons; the builds; the registry's
//! tags; sign-in with an org's token showing only that org's repositories. Needs root, runc
//! and Chromium (CI installs them).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use strata_test_support::Chromedriver;

use crate::common::{Env, free_port, http_get, wait_for};
use crate::deploy::{Cleanup, machine_env, project};

/// A `strata` server process of the test, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(env: &Env, args: &[&str], port: u16) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(env.store())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_for("server listening", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    server
}

async fn browser(driver: &Chromedriver) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "args": driver.chromium_args(), "binary": "/usr/bin/chromium" }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url())
        .await
        .expect("a WebDriver session with headless Chromium")
}

/// Chromium abandons a page load when the host's network changes (ERR_NETWORK_CHANGED), and
/// machines starting and stopping add and remove interfaces: such a page is loaded again.
async fn reload_if_interrupted(c: &Client) -> bool {
    let page = c.source().await.unwrap_or_default();
    if page.contains("ERR_NETWORK_CHANGED") {
        let _ = c.refresh().await;
        return true;
    }
    false
}

async fn goto(c: &Client, url: &str) {
    c.goto(url).await.unwrap();
    for _ in 0..20 {
        if !reload_if_interrupted(c).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{url}: the page load kept being interrupted");
}

/// Waits until the text of the first element `css` matches `ready`; fails with the page.
async fn wait_text(c: &Client, css: &str, limit: Duration, ready: impl Fn(&str) -> bool) -> String {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match c.find(Locator::Css(css)).await {
            Ok(e) => {
                if let Ok(t) = e.text().await {
                    if ready(&t) {
                        return t;
                    }
                    last = t;
                }
            }
            Err(_) => {
                reload_if_interrupted(c).await;
            }
        }
        if start.elapsed() > limit {
            let page = c.source().await.unwrap_or_default();
            let page = &page[..page.len().min(4000)];
            panic!("`{css}` never got ready within {limit:?}; last text {last:?}; page:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks the first element `css`, again if a live update replaced it meanwhile.
async fn click(c: &Client, css: &str) {
    for _ in 0..20 {
        match c.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return,
                Err(err) if err.to_string().contains("stale") => {}
                Err(err) => panic!("cannot click `{css}`: {err}"),
            },
            Err(err) => panic!("no `{css}`: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("`{css}` kept going stale");
}

/// Types `token` into the sign-in form and sends it.
async fn sign_in(c: &Client, token: &str) {
    let field = c.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    click(c, "#signin").await;
}

/// With `STRATA_UI_SCREENSHOTS=DIR`, saves the page as DIR/NAME.png (docs/ui.md's pictures).
async fn screenshot(c: &Client, name: &str) {
    if let Some(dir) = std::env::var_os("STRATA_UI_SCREENSHOTS") {
        let png = c.screenshot().await.unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

fn machines(env: &Env) -> Vec<serde_json::Value> {
    env.ok(&["machine", "list", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_dashboard_shows_apps_live_rolls_back_tails_logs_and_shows_each_org_its_repositories() {
    let Some(env) = machine_env() else {
        return;
    };
    let Some(driver) = Chromedriver::start("the dashboard's browser test") else {
        return;
    };
    let _cleanup = Cleanup(&env);

    // The store's registry: two orgs, a token each, an image in each.
    env.ok(&["registry", "org", "create", "acme"]);
    env.ok(&["registry", "org", "create", "other"]);
    let acme_token = env.ok(&["registry", "token", "create", "--org", "acme"]);
    let rport = free_port();
    let _registry = spawn(
        &env,
        &["registry", "serve", "--addr", &format!("127.0.0.1:{rport}")],
        rport,
    );
    for dest in ["acme/base:1", "other/secret:1"] {
        env.ok(&[
            "push",
            "busybox:latest",
            &format!("127.0.0.1:{rport}/{dest}"),
        ]);
    }

    // The app, published to acme's repository (its releases pinned there), deployed twice.
    let port = free_port();
    let proj = project(&env, port, "/");
    let toml = proj.join("strata.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        format!("{text}registry = \"127.0.0.1:{rport}/acme\"\n"),
    )
    .unwrap();
    let p = proj.to_str().unwrap();
    env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
    std::fs::write(proj.join("site/index.html"), "v2\n").unwrap();
    env.ok(&["deploy", "web", "--project", p, "--progress", "plain"]);
    assert_eq!(http_get("127.0.0.1", port, "/").unwrap(), "v2\n");
    // And built once more with nothing changed: every step cached.
    env.ok(&["build", "--project", p, "--progress", "plain"]);

    let ui_port = free_port();
    let _ui = spawn(
        &env,
        &[
            "ui",
            "--addr",
            &format!("127.0.0.1:{ui_port}"),
            "--project",
            p,
            "--registry-host",
            &format!("127.0.0.1:{rport}"),
        ],
        ui_port,
    );
    let base = format!("http://127.0.0.1:{ui_port}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = browser(&driver).await;
        let long = Duration::from_secs(60);

        // Apps: web on v2, healthy, one machine, its public address.
        goto(&c, &format!("{base}/ui/")).await;
        wait_text(&c, "tr[data-app=web] .release", long, |t| {
            t.starts_with("v2 ")
        })
        .await;
        wait_text(&c, "tr[data-app=web] .health", long, |t| t == "healthy").await;
        let machines_cell = wait_text(&c, "tr[data-app=web] .machines", long, |_| true).await;
        assert_eq!(machines_cell, "1");
        let page = c.source().await.unwrap();
        assert!(page.contains(&format!("127.0.0.1:{port}")), "{page}");
        screenshot(&c, "apps").await;

        // Roll back to v1 with the button: the job's output streams, v1's content serves,
        // and the releases table turns live to v3 (v1's image) active.
        goto(&c, &format!("{base}/ui/apps/web")).await;
        click(&c, "tr[data-version='1'] button.rollback").await;
        let status = wait_text(&c, "#job-status", Duration::from_secs(120), |t| {
            t == "done" || t.starts_with("failed")
        })
        .await;
        let output = c
            .find(Locator::Css("#job"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(status, "done", "{output}");
        assert!(output.contains("v3"), "the roll back's output: {output}");
        assert_eq!(http_get("127.0.0.1", port, "/").unwrap(), "v1\n");
        wait_text(&c, "#active", long, |t| t == "v3").await;
        let releases = env.ok(&["releases", "web", "--json"]);
        let newest: serde_json::Value =
            serde_json::from_str(releases.lines().next().unwrap()).unwrap();
        let v1: serde_json::Value = serde_json::from_str(releases.lines().nth(2).unwrap()).unwrap();
        assert_eq!(newest["version"], 3);
        assert_eq!(newest["digest"], v1["digest"], "v3 runs v1's image");
        screenshot(&c, "app").await;

        // A stale page's button (a release that is gone) gets a clear message.
        c.execute(
            "document.querySelector(\"tr[data-version='2'] input[name=version]\").value = '99'",
            vec![],
        )
        .await
        .unwrap();
        click(&c, "tr[data-version='2'] button.rollback").await;
        let err = wait_text(&c, "#error", long, |_| true).await;
        assert!(err.contains("release v99 of web no longer exists"), "{err}");

        // A machine's log line appears live; stop and start from its page.
        let ms = machines(&env);
        assert_eq!(ms.len(), 1, "{ms:?}");
        let id = ms[0]["id"].as_str().unwrap().to_string();
        goto(&c, &format!("{base}/ui/machines/{id}")).await;
        wait_text(&c, "#machine-state", long, |t| t == "running").await;
        env.ok(&[
            "machine",
            "exec",
            &id,
            "sh",
            "-c",
            "echo hello-from-the-dashboard-test > /proc/1/fd/1",
        ]);
        wait_text(&c, "#log", long, |t| {
            t.contains("hello-from-the-dashboard-test")
        })
        .await;
        screenshot(&c, "machine").await;
        click(&c, "button.act-stop").await;
        wait_text(&c, "#machine-state", long, |t| t == "stopped").await;
        assert_eq!(machines(&env)[0]["state"], "stopped");
        click(&c, "button.act-start").await;
        wait_text(&c, "#machine-state", long, |t| t == "running").await;
        wait_for("the app serving again", long, || {
            http_get("127.0.0.1", port, "/").is_ok_and(|b| b == "v1\n")
        });

        // Builds: the deploys' builds of web, their steps cached or ran, with times.
        goto(&c, &format!("{base}/ui/builds")).await;
        wait_text(&c, ".build-status", long, |t| t == "succeeded").await;
        let newest = c
            .find(Locator::Css("section.build"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(newest.starts_with("strata build"), "{newest}");
        let cached = c
            .find_all(Locator::Css("section.build:first-of-type td.step-cached"))
            .await
            .unwrap();
        assert_eq!(cached.len(), 3, "{newest}");
        let builds = c
            .find(Locator::Css("#builds"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(builds.contains("COPY site/ /www/"), "{builds}");
        assert!(builds.contains("strata deploy"), "{builds}");
        let ran = c.find_all(Locator::Css("td.step-ran")).await.unwrap();
        assert_eq!(ran.len(), 6, "two deploys ran 3 steps each:\n{builds}");
        screenshot(&c, "builds").await;

        // A build running now shows live: its RUN step running, then ran, with its output.
        let slow = env.path("slow");
        std::fs::create_dir_all(&slow).unwrap();
        std::fs::write(
            slow.join("Dockerfile"),
            "FROM busybox:latest\nRUN echo slow-step-output && sleep 3\n",
        )
        .unwrap();
        let mut build = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(env.store())
            .args(["build", "-t", "slow:1", "--progress", "plain"])
            .arg(&slow)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_text(
            &c,
            "section.build:first-of-type td.step-running",
            long,
            |_| true,
        )
        .await;
        wait_text(&c, "section.build:first-of-type .build-status", long, |t| {
            t == "succeeded"
        })
        .await;
        assert!(build.wait().unwrap().success());
        let newest = c
            .find(Locator::Css("section.build"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            newest.contains("slow-step-output") && newest.contains("ran"),
            "{newest}"
        );

        // Registry: every repository (no sign-in on loopback), tags, pull references.
        goto(&c, &format!("{base}/ui/registry")).await;
        wait_text(&c, "section[data-repo='acme/base'] .tag", long, |t| {
            t == "1"
        })
        .await;
        let pull = c
            .find(Locator::Css("section[data-repo='acme/base'] input.pull"))
            .await
            .unwrap()
            .prop("value")
            .await
            .unwrap();
        assert_eq!(
            pull.as_deref(),
            Some(format!("127.0.0.1:{rport}/acme/base:1").as_str())
        );
        assert!(c.source().await.unwrap().contains("other/secret"));
        // The app's releases, pushed there and pinned by its deploys.
        let web = wait_text(&c, "section[data-repo='acme/web']", long, |_| true).await;
        assert!(
            web.contains("deployment-") && web.contains("deploy:web"),
            "{web}"
        );
        screenshot(&c, "registry").await;
        c.close().await.unwrap();
    });

    // With tokens required: a wrong token is refused; acme's shows acme's repositories only.
    let ui2_port = free_port();
    let _ui2 = spawn(
        &env,
        &[
            "ui",
            "--addr",
            &format!("127.0.0.1:{ui2_port}"),
            "--require-token",
            "--project",
            p,
        ],
        ui2_port,
    );
    let base2 = format!("http://127.0.0.1:{ui2_port}");
    rt.block_on(async {
        let c = browser(&driver).await;
        let long = Duration::from_secs(30);
        goto(&c, &format!("{base2}/ui/registry")).await;
        let url = c.current_url().await.unwrap();
        assert!(url.path().ends_with("/ui/login"), "{url}");
        sign_in(&c, "strata_not-a-token").await;
        let err = wait_text(&c, "#error", long, |_| true).await;
        assert!(err.contains("refused"), "{err}");
        sign_in(&c, acme_token.trim()).await;
        wait_text(&c, "#org", long, |t| t == "acme").await;
        goto(&c, &format!("{base2}/ui/registry")).await;
        wait_text(&c, "section[data-repo='acme/base'] .tag", long, |t| {
            t == "1"
        })
        .await;
        let page = c.source().await.unwrap();
        assert!(
            !page.contains("other/secret"),
            "another org's repository shown:\n{page}"
        );
        c.close().await.unwrap();
    });
    // `strata registry serve --auth orgs` serves the Registry page, behind its tokens.
    let r2port = free_port();
    let _registry2 = spawn(
        &env,
        &[
            "registry",
            "serve",
            "--auth",
            "orgs",
            "--addr",
            &format!("127.0.0.1:{r2port}"),
        ],
        r2port,
    );
    rt.block_on(async {
        let c = browser(&driver).await;
        let long = Duration::from_secs(30);
        goto(&c, &format!("http://127.0.0.1:{r2port}/ui/")).await;
        let url = c.current_url().await.unwrap();
        assert!(url.path().ends_with("/ui/login"), "{url}");
        sign_in(&c, acme_token.trim()).await;
        goto(&c, &format!("http://127.0.0.1:{r2port}/ui/")).await;
        wait_text(&c, "section[data-repo='acme/base'] .tag", long, |t| {
            t == "1"
        })
        .await;
        let page = c.source().await.unwrap();
        assert!(!page.contains("other/secret"), "{page}");
        assert!(
            page.contains(&format!("127.0.0.1:{r2port}/acme/base:1")),
            "{page}"
        );
        assert!(
            !page.contains("/ui/machines"),
            "the registry serves its page only:\n{page}"
        );
        c.close().await.unwrap();
    });

    // A POST without a session and its CSRF token (a form on another site) is refused.
    let answer = raw_post(ui_port, "/ui/apps/web/rollback", "csrf=x&version=1");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
}

/// One form POST without cookies; the whole answer.
fn raw_post(port: u16, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
