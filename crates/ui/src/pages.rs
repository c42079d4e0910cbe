//! Routes, pages and their live fragments.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Form;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;
use strata_deploy::host::Host;
use strata_deploy::state::{Machine, MachineState, Release, ReleaseStatus, State as DeployState};

use crate::builds::{BuildStatus, BuildView};
use crate::session::{self, Session};
use crate::{AppState, Pages};

type Shared = Arc<AppState>;

/// How often a live fragment is rendered again (and sent when it changed): the store's state
/// is a few local reads; the registry's listing may be many object-storage requests (every
/// repository, tag and manifest), and changes with pushes only.
fn live_every(kind: &str) -> Duration {
    match kind {
        "registry" => Duration::from_secs(3),
        _ => Duration::from_millis(400),
    }
}

pub(crate) fn routes(state: Shared) -> axum::Router {
    let mut r = Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/static/app.js", get(script))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/registry", get(registry_page))
        .route("/ui/live/{kind}", get(live));
    if state.config.pages == Pages::All {
        r = r
            .route("/ui/", get(apps_page))
            .route("/ui/apps/{app}", get(app_page))
            .route("/ui/apps/{app}/rollback", post(rollback))
            .route("/ui/jobs/{id}/events", get(job_events))
            .route("/ui/machines", get(machines_page))
            .route("/ui/machines/{id}", get(machine_page))
            .route("/ui/machines/{id}/action", post(machine_action))
            .route("/ui/machines/{id}/log", get(machine_log))
            .route("/ui/builds", get(builds_page));
    } else {
        r = r.route("/ui/", get(|| async { Redirect::to("/ui/registry") }));
    }
    r.with_state(state)
}

// ---- errors and the page frame ----

/// A page that could not be shown, with why.
pub(crate) struct UiError {
    status: StatusCode,
    message: String,
}

impl UiError {
    fn new(status: StatusCode, message: impl Into<String>) -> UiError {
        UiError {
            status,
            message: message.into(),
        }
    }

    fn internal(e: impl std::fmt::Display) -> UiError {
        UiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html { head { title { "strata · error" } (style()) }
            body { main {
                h1 { "Something went wrong" }
                p.error #error { (self.message) }
                p { a href="javascript:history.back()" { "Back" } " · " a href="/ui/" { "Home" } }
            } } }
        };
        (self.status, body).into_response()
    }
}

fn style() -> Markup {
    html! { style { (PreEscaped(CSS)) } }
}

const CSS: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
nav{background:#1d2330;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}
nav a{color:#c9d1e0;text-decoration:none}nav a.on,nav a:hover{color:#fff}
nav .brand{color:#fff;font-weight:700;margin-right:1em}nav .who{margin-left:auto;color:#c9d1e0}
main{padding:1.2em 1.6em}h1{font-size:1.4em;margin:.2em 0 .6em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:60%}
th,td{border-bottom:1px solid #e3e6ec;padding:.35em .7em;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}code{font:12px ui-monospace,monospace}
.state-running,.status-active,.step-ran,.step-cached,.ok{color:#1a7f37}
.state-failed,.status-failed,.step-failed,.error{color:#c0262d}
.state-stopped,.state-exited,.status-superseded{color:#6b7385}
.step-running,.status-deploying{color:#9a6700}
pre.log,pre.job{background:#11151c;color:#d8dee9;padding:.8em;max-height:24em;overflow:auto}
form.inline{display:inline}button{cursor:pointer}
.muted{color:#6b7385}input.pull{width:36em;font:12px ui-monospace,monospace}
";

/// A whole page: nav, title, body.
fn page(state: &AppState, s: &Session, on: &str, title: &str, body: Markup) -> Markup {
    let all = state.config.pages == Pages::All;
    let tab = |href: &str, name: &str, key: &str| {
        html! { a.on[on == key] href=(href) { (name) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "strata · " (title) }
                (style())
                script src="/ui/static/app.js" defer {}
            }
            body {
                nav {
                    span.brand { "strata" }
                    @if all {
                        (tab("/ui/", "Apps", "apps"))
                        (tab("/ui/machines", "Machines", "machines"))
                        (tab("/ui/builds", "Builds", "builds"))
                    }
                    (tab("/ui/registry", "Registry", "registry"))
                    @if let Some(org) = &s.org {
                        span.who {
                            "org " b #org { (org) } " · "
                            form.inline method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

/// A live part of a page (its element id: `kind`): replaced by what `/ui/live/KIND?name=…`
/// sends.
fn live_div(kind: &str, name: Option<&str>, content: Markup) -> Markup {
    let content = content.into_string();
    // The stream is told what the page shows, so it sends only what differs from it (a
    // replaced fragment would take the button under a user's pointer away).
    let seen = fingerprint(&content);
    let src = match name {
        Some(n) => format!("/ui/live/{kind}?name={}&seen={seen}", url_encode(n)),
        None => format!("/ui/live/{kind}?seen={seen}"),
    };
    let content = PreEscaped(content);
    html! { div id=(kind) data-live=(src) { (content) } }
}

/// The live part `kind` (of `name`) of a page, rendered as its stream renders it.
async fn live_part(
    state: &Shared,
    s: &Session,
    kind: &str,
    name: Option<&str>,
) -> Result<Markup, UiError> {
    Ok(live_div(kind, name, fragment(state, s, kind, name).await?))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

const SCRIPT: &str = r#"// Live parts: each [data-live] element is replaced by what its event stream sends;
// [data-tail] elements append lines (a machine's log, a roll back's output).
function live(el) {
  const es = new EventSource(el.dataset.live);
  es.onmessage = (e) => { el.innerHTML = e.data; };
}
function tail(el) {
  const es = new EventSource(el.dataset.tail);
  es.onmessage = (e) => {
    el.append(e.data + "\n");
    el.scrollTop = el.scrollHeight;
  };
  es.addEventListener("end", (e) => {
    es.close();
    const s = document.getElementById(el.id + "-status");
    if (s) { s.textContent = e.data; s.className = e.data.startsWith("done") ? "ok" : "error"; }
  });
}
document.querySelectorAll("[data-live]").forEach(live);
document.querySelectorAll("[data-tail]").forEach(tail);
"#;

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

/// The page or redirect, or the error's page.
fn respond<T: IntoResponse>(result: Result<T, UiError>) -> Response {
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

// ---- sessions ----

/// The viewer's session, or where to send them: to sign in when tokens are required; else a
/// new anonymous session (the cookie is set on the answer).
enum Viewer {
    Known(Session),
    New(Session),
    SignIn,
}

fn viewer(state: &AppState, headers: &HeaderMap) -> Viewer {
    match state.sessions.get(headers) {
        Some(s) => Viewer::Known(s),
        None if state.config.require_token => Viewer::SignIn,
        None => Viewer::New(state.sessions.create(None)),
    }
}

/// Runs `render` for the viewer and answers with its page (setting a new session's cookie).
async fn with_session<F, Fut>(state: Shared, headers: HeaderMap, render: F) -> Response
where
    F: FnOnce(Shared, Session) -> Fut,
    Fut: std::future::Future<Output = Result<Markup, UiError>>,
{
    let (s, new) = match viewer(&state, &headers) {
        Viewer::Known(s) => (s, false),
        Viewer::New(s) => (s, true),
        Viewer::SignIn => return Redirect::to("/ui/login").into_response(),
    };
    let cookie = new.then(|| session::set_cookie(&s.id));
    let mut resp = match render(state, s).await {
        Ok(m) => m.into_response(),
        Err(e) => e.into_response(),
    };
    if let Some(c) = cookie
        && let Ok(v) = HeaderValue::from_str(&c)
    {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// The session of a POST, checked: known, same origin, and the form's CSRF token its own.
fn checked_post(state: &AppState, headers: &HeaderMap, csrf: &str) -> Result<Session, UiError> {
    let forbidden = |m: &str| UiError::new(StatusCode::FORBIDDEN, m);
    if !session::same_origin(headers) {
        return Err(forbidden(
            "refused: the request did not come from this dashboard",
        ));
    }
    let s = state.sessions.get(headers).ok_or_else(|| {
        forbidden(
            "your session has expired (or the server restarted): reload the page and try again",
        )
    })?;
    if s.csrf != csrf {
        return Err(forbidden(
            "refused: the form's token does not match your session (reload the page)",
        ));
    }
    Ok(s)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login_page(State(state): State<Shared>) -> Markup {
    login_markup(&state, None)
}

fn login_markup(state: &AppState, error: Option<&str>) -> Markup {
    let anon = Session {
        id: String::new(),
        org: None,
        csrf: String::new(),
    };
    page(
        state,
        &anon,
        "login",
        "Sign in",
        html! {
            @if let Some(e) = error { p.error #error { (e) } }
            p { "Sign in with a registry token of your org (" code { "strata registry token create --org NAME" } ")." }
            form method="post" action="/ui/login" {
                input #token type="password" name="token" placeholder="token" size="60" autofocus;
                " " button #signin type="submit" { "Sign in" }
            }
        },
    )
}

async fn login(
    State(state): State<Shared>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !session::same_origin(&headers) {
        return UiError::new(StatusCode::FORBIDDEN, "refused: cross-site sign in").into_response();
    }
    let Some(registry) = &state.registry else {
        return UiError::new(
            StatusCode::NOT_FOUND,
            "this dashboard has no registry to sign in to",
        )
        .into_response();
    };
    let org = match registry.token_org(f.token.trim()).await {
        Ok(o) => o,
        Err(e) => return UiError::internal(e).into_response(),
    };
    let Some(org) = org else {
        return (
            StatusCode::UNAUTHORIZED,
            login_markup(&state, Some("that token was refused (wrong, or revoked)")),
        )
            .into_response();
    };
    let s = state.sessions.create(Some(org));
    let mut resp = Redirect::to("/ui/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&s.id)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(state): State<Shared>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    match checked_post(&state, &headers, &f.csrf) {
        Ok(s) => {
            state.sessions.remove(&s.id);
            Redirect::to("/ui/login").into_response()
        }
        Err(e) => e.into_response(),
    }
}

// ---- reading the store ----

/// Runs a read of the deploy state on a blocking thread.
async fn with_deploy_state<T: Send + 'static>(
    state: &Shared,
    f: impl FnOnce(&DeployState) -> Result<T, UiError> + Send + 'static,
) -> Result<T, UiError> {
    let root = state.config.store_root.clone();
    tokio::task::spawn_blocking(move || {
        let st = DeployState::open(&root).map_err(UiError::internal)?;
        f(&st)
    })
    .await
    .map_err(UiError::internal)?
}

fn ago(unix: i64) -> String {
    let secs = (strata_deploy::state::now() - unix).max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs / 60 % 60),
        _ => format!("{}d", secs / 86400),
    }
}

fn short(d: &strata_oci::Digest) -> String {
    d.short().to_string()
}

/// The public address of `app`, if its port is routed.
fn public_addr(routes: &[strata_deploy::state::Route], app: &str) -> Option<String> {
    routes
        .iter()
        .find(|r| r.owner == format!("app:{app}"))
        .map(|r| format!("127.0.0.1:{}", r.port))
}

fn state_class(m: &Machine) -> String {
    format!("state-{}", m.state)
}

// ---- apps ----

fn apps_fragment(st: &DeployState) -> Result<Markup, UiError> {
    let releases = st.releases(None).map_err(UiError::internal)?;
    let routes = st.routes().map_err(UiError::internal)?;
    let mut names: Vec<String> = releases.iter().map(|r| r.app.clone()).collect();
    names.extend(
        st.machines()
            .map_err(UiError::internal)?
            .into_iter()
            .filter_map(|m| m.app),
    );
    names.sort();
    names.dedup();
    let mut rows = Vec::new();
    for a in &names {
        let active = releases
            .iter()
            .find(|r| &r.app == a && r.status == ReleaseStatus::Active);
        let machines = st.app_machines(a).map_err(UiError::internal)?;
        let running = machines
            .iter()
            .filter(|m| m.state == MachineState::Running)
            .count();
        rows.push((
            a.clone(),
            active.cloned(),
            machines.len(),
            running,
            public_addr(&routes, a),
        ));
    }
    Ok(html! {
        @if rows.is_empty() {
            p.muted { "No app is deployed in this store yet: " code { "strata deploy APP" } "." }
        } @else {
            table #apps-table {
                tr { th { "App" } th { "Release" } th { "Health" } th { "Public address" } th { "Machines" } }
                @for (name, active, total, running, public) in &rows {
                    tr data-app=(name) {
                        td { a href={ "/ui/apps/" (url_encode(name)) } { b { (name) } } }
                        td.release { @match active {
                            Some(r) => { "v" (r.version) " " span.muted { (r.image) } },
                            None => span.muted { "no active release" },
                        } }
                        td { @if *total > 0 && running == total {
                            span.ok.health { "healthy" }
                        } @else {
                            span.error.health { (running) "/" (total) " running" }
                        } }
                        td { @match public {
                            Some(p) => a href={ "http://" (p) "/" } { (p) },
                            None => span.muted { "—" },
                        } }
                        td.machines { (total) }
                    }
                }
            }
        }
    })
}

async fn apps_page(State(state): State<Shared>, headers: HeaderMap) -> Response {
    with_session(state, headers, |state, s| async move {
        let body = live_part(&state, &s, "apps", None).await?;
        Ok(page(&state, &s, "apps", "Apps", body))
    })
    .await
}

fn releases_fragment(st: &DeployState, app: &str, csrf: &str) -> Result<Markup, UiError> {
    let releases = st.releases(Some(app)).map_err(UiError::internal)?;
    let machines = st.app_machines(app).map_err(UiError::internal)?;
    let routes = st.routes().map_err(UiError::internal)?;
    if releases.is_empty() && machines.is_empty() {
        return Err(UiError::new(
            StatusCode::NOT_FOUND,
            format!("no app `{app}` has been deployed in this store"),
        ));
    }
    let active = releases.iter().find(|r| r.status == ReleaseStatus::Active);
    Ok(html! {
        p {
            "Serving: " @match active {
                Some(r) => { b #active { "v" (r.version) } " (" code { (r.image) } ")" },
                None => span.muted #active { "no active release" },
            }
            @if let Some(p) = public_addr(&routes, app) {
                " on " a href={ "http://" (p) "/" } { (p) }
            }
        }
        h2 { "Releases" }
        table #releases {
            tr { th { "Version" } th { "Status" } th { "Image" } th { "Digest" } th { "Created" } th {} }
            @for r in &releases {
                tr data-version=(r.version) {
                    td { "v" (r.version) }
                    td class={ "status-" (r.status) } { (r.status)
                        @if let Some(why) = &r.reason { br; span.muted { (why.lines().next().unwrap_or("")) } } }
                    td { code { (r.image) } }
                    td { code title=(r.digest) { (short(&r.digest)) } }
                    td { (ago(r.created)) " ago" }
                    td { @if r.status != ReleaseStatus::Active && r.status != ReleaseStatus::Deploying {
                        (rollback_form(app, r, csrf))
                    } }
                }
            }
        }
        h2 { "Machines" }
        (machines_table(&machines, csrf))
    })
}

fn rollback_form(app: &str, r: &Release, csrf: &str) -> Markup {
    html! {
        form.inline method="post" action={ "/ui/apps/" (url_encode(app)) "/rollback" } {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="version" value=(r.version);
            button.rollback type="submit" { "Roll back to v" (r.version) }
        }
    }
}

#[derive(Deserialize)]
struct JobQuery {
    job: Option<String>,
}

async fn app_page(
    State(state): State<Shared>,
    Path(app): Path<String>,
    Query(q): Query<JobQuery>,
    headers: HeaderMap,
) -> Response {
    with_session(state, headers, move |state, s| async move {
        let releases = live_part(&state, &s, "app", Some(&app)).await?;
        let job = q
            .job
            .as_deref()
            .and_then(|id| state.jobs.get(id).map(|j| (id.to_string(), j)))
            .filter(|(_, j)| j.app == app);
        let body = html! {
            @if let Some((id, job)) = &job {
                h2 { (job.title) " " span #job-status.muted { "running…" } }
                pre.job #job data-tail={ "/ui/jobs/" (id) "/events" } {}
            }
            (releases)
        };
        Ok(page(&state, &s, "apps", &format!("App {app}"), body))
    })
    .await
}

#[derive(Deserialize)]
struct RollbackForm {
    csrf: String,
    version: String,
}

/// `name@digest` of a release: its image by digest, which its pin kept.
fn image_by_digest(r: &Release) -> String {
    let without_digest = r.image.split('@').next().unwrap_or(&r.image);
    let name = match without_digest.rfind(':') {
        Some(i) if !without_digest[i..].contains('/') => &without_digest[..i],
        _ => without_digest,
    };
    format!("{name}@{}", r.digest)
}

async fn rollback(
    State(state): State<Shared>,
    Path(app): Path<String>,
    headers: HeaderMap,
    Form(f): Form<RollbackForm>,
) -> Response {
    let result = async {
        checked_post(&state, &headers, &f.csrf)?;
        let version: u32 = f.version.trim().parse().map_err(|_| {
            UiError::new(
                StatusCode::BAD_REQUEST,
                format!("`{}` is not a release version", f.version),
            )
        })?;
        let name = app.clone();
        let release = with_deploy_state(&state, move |st| {
            Ok(st
                .releases(Some(&name))
                .map_err(UiError::internal)?
                .into_iter()
                .find(|r| r.version == version))
        })
        .await?;
        let Some(release) = release else {
            return Err(UiError::new(
                StatusCode::CONFLICT,
                format!(
                    "release v{version} of {app} no longer exists (old releases are dropped as \
                     new ones come); reload the page to see the releases there are"
                ),
            ));
        };
        if !state.config.project.exists() {
            return Err(UiError::new(
                StatusCode::CONFLICT,
                format!(
                    "cannot roll back {app}: the dashboard has no strata.toml at {} to deploy it \
                     with (start `strata ui` in the project's directory or give --project)",
                    state.config.project.display()
                ),
            ));
        }
        let image = image_by_digest(&release);
        let args = vec![
            "--store".to_string(),
            state.config.store_root.display().to_string(),
            "deploy".into(),
            app.clone(),
            "--project".into(),
            state.config.project.display().to_string(),
            "--image".into(),
            image.clone(),
            "--progress".into(),
            "plain".into(),
        ];
        let title = format!("Rolling back {app} to v{version} ({image})");
        let id = state
            .jobs
            .spawn(title, app.clone(), state.config.exe.clone(), args);
        Ok(Redirect::to(&format!(
            "/ui/apps/{}?job={id}",
            url_encode(&app)
        )))
    }
    .await;
    respond(result)
}

async fn job_events(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if state.sessions.get(&headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(job) = state.jobs.get(&id) else {
        return UiError::new(StatusCode::NOT_FOUND, format!("no job {id}")).into_response();
    };
    let rx = job.state.clone();
    let stream =
        futures_util::stream::unfold((rx, 0usize, false), |(mut rx, sent, ended)| async move {
            if ended {
                return None;
            }
            loop {
                let snapshot = rx.borrow_and_update().clone();
                if snapshot.lines.len() > sent {
                    let events: Vec<Result<Event, Infallible>> = snapshot.lines[sent..]
                        .iter()
                        .map(|l| Ok(Event::default().data(l)))
                        .collect();
                    let n = snapshot.lines.len();
                    return Some((futures_util::stream::iter(events), (rx, n, false)));
                }
                if let Some(end) = snapshot.end {
                    let msg = match end {
                        Ok(()) => "done".to_string(),
                        Err(e) => format!("failed: {e}"),
                    };
                    let ev = vec![Ok(Event::default().event("end").data(msg))];
                    return Some((futures_util::stream::iter(ev), (rx, sent, true)));
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        });
    Sse::new(futures_util::StreamExt::flatten(stream))
        .keep_alive(KeepAlive::default())
        .into_response()
}

// ---- machines ----

fn machines_table(machines: &[Machine], csrf: &str) -> Markup {
    html! {
        @if machines.is_empty() {
            p.muted { "No machines." }
        } @else {
            table.machines {
                tr { th { "Machine" } th { "App" } th { "State" } th { "Address" } th { "Image" } th { "Since" } th { "Restarts" } th {} }
                @for m in machines {
                    tr data-machine=(m.id) {
                        td { a href={ "/ui/machines/" (m.id) } { code { (m.id) } } }
                        td { @match &m.app {
                            Some(a) => { a href={ "/ui/apps/" (url_encode(a)) } { (a) } " v" (m.release.unwrap_or(0)) },
                            None => span.muted { "—" },
                        } }
                        td class=(state_class(m)) { span.state { (m.state) }
                            @if let Some(c) = m.exit_code { @if m.state != MachineState::Running { " (" (c) ")" } } }
                        td { code { (Host::machine_addr(m)) } }
                        td { code { (m.image) } }
                        td { (ago(m.updated)) }
                        td { (m.restarts) }
                        td { (machine_buttons(m, csrf)) }
                    }
                }
            }
        }
    }
}

fn machine_buttons(m: &Machine, csrf: &str) -> Markup {
    let actions: &[&str] = if m.state == MachineState::Running {
        &["stop", "restart"]
    } else {
        &["start"]
    };
    html! {
        @for a in actions {
            form.inline method="post" action={ "/ui/machines/" (m.id) "/action" } {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="do" value=(a);
                button class={ "act-" (a) } type="submit" { (a) }
            }
            " "
        }
    }
}

async fn machines_page(State(state): State<Shared>, headers: HeaderMap) -> Response {
    with_session(state, headers, |state, s| async move {
        let body = live_part(&state, &s, "machines", None).await?;
        Ok(page(&state, &s, "machines", "Machines", body))
    })
    .await
}

fn machine_fragment(st: &DeployState, id: &str, csrf: &str) -> Result<Markup, UiError> {
    let m = st.machine(id).map_err(UiError::internal)?.ok_or_else(|| {
        UiError::new(
            StatusCode::NOT_FOUND,
            format!("no machine {id} (destroyed?)"),
        )
    })?;
    Ok(html! {
        table {
            tr { th { "State" } td class=(state_class(&m)) { span #machine-state { (m.state) } } }
            tr { th { "App" } td { (m.app.as_deref().unwrap_or("—")) @if let Some(v) = m.release { " v" (v) } } }
            tr { th { "Address" } td { code { (Host::machine_addr(&m)) } } }
            tr { th { "Image" } td { code { (m.image) } " " code.muted { (short(&m.digest)) } } }
            tr { th { "Since" } td { (ago(m.updated)) } }
            tr { th { "Restarts" } td { (m.restarts) } }
            @if let Some(e) = &m.error { tr { th { "Error" } td.error { (e) } } }
            tr { th {} td { (machine_buttons(&m, csrf)) } }
        }
    })
}

async fn machine_page(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    with_session(state, headers, move |state, s| async move {
        let machine = live_part(&state, &s, "machine", Some(&id)).await?;
        let body = html! {
            (machine)
            h2 { "Log" }
            pre.log #log data-tail={ "/ui/machines/" (id) "/log" } {}
        };
        Ok(page(&state, &s, "machines", &format!("Machine {id}"), body))
    })
    .await
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: String,
    #[serde(rename = "do")]
    action: String,
}

async fn machine_action(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<ActionForm>,
) -> Response {
    let result = async {
        checked_post(&state, &headers, &f.csrf)?;
        let root = state.config.store_root.clone();
        let exe = state.config.exe.clone();
        let mid = id.clone();
        let action = f.action.clone();
        tokio::task::spawn_blocking(move || -> Result<(), UiError> {
            let store = strata_store::Store::open(&root).map_err(UiError::internal)?;
            let host = Host::open(store).map_err(UiError::internal)?;
            let done = match action.as_str() {
                "start" => strata_deploy::machines::start(&host, &mid, &exe),
                "stop" => strata_deploy::machines::stop(&host, &mid, &exe),
                "restart" => strata_deploy::machines::restart(&host, &mid, &exe),
                other => {
                    return Err(UiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("unknown machine action `{other}`"),
                    ));
                }
            };
            done.map(|_| ()).map_err(|e| {
                UiError::new(
                    StatusCode::CONFLICT,
                    format!("cannot {action} machine {mid}: {e}"),
                )
            })
        })
        .await
        .map_err(UiError::internal)??;
        // Back where the button was.
        let back = headers
            .get(header::REFERER)
            .and_then(|v| v.to_str().ok())
            .and_then(|r| r.find("/ui/").map(|i| r[i..].to_string()))
            .unwrap_or_else(|| format!("/ui/machines/{id}"));
        Ok::<_, UiError>(Redirect::to(&back))
    }
    .await;
    respond(result)
}

async fn machine_log(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if state.sessions.get(&headers).is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    // Only a machine the store knows: its id is a safe path component.
    let mid = id.clone();
    match with_deploy_state(&state, move |st| {
        st.machine(&mid).map_err(UiError::internal)
    })
    .await
    {
        Ok(Some(_)) => {}
        Ok(None) => {
            return UiError::new(StatusCode::NOT_FOUND, format!("no machine {id}")).into_response();
        }
        Err(e) => return e.into_response(),
    }
    let path = state
        .config
        .store_root
        .join("strata/machines")
        .join(&id)
        .join("machine.log");
    // Follows the file as `machine logs -f` does: from the start, then what it gains (from
    // the start again when rotation truncated it); a partial last line waits for its end.
    let stream = futures_util::stream::unfold(
        (path, 0u64, Vec::<u8>::new()),
        |(path, mut pos, mut partial)| async move {
            loop {
                let read = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || read_from(&path, pos)
                })
                .await
                .ok()
                .flatten();
                if let Some((bytes, new_pos)) = read {
                    pos = new_pos;
                    partial.extend_from_slice(&bytes);
                    if let Some(end) = partial.iter().rposition(|b| *b == b'\n') {
                        let whole: Vec<u8> = partial.drain(..=end).collect();
                        let events: Vec<Result<Event, Infallible>> =
                            String::from_utf8_lossy(&whole)
                                .lines()
                                .map(|l| Ok(Event::default().data(l)))
                                .collect();
                        return Some((futures_util::stream::iter(events), (path, pos, partial)));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    );
    Sse::new(futures_util::StreamExt::flatten(stream))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The bytes of `path` after `pos` and the new position (0 again after a truncation).
fn read_from(path: &std::path::Path, pos: u64) -> Option<(Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = if len < pos { 0 } else { pos };
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let end = start + buf.len() as u64;
    Some((buf, end))
}

// ---- builds ----

fn builds_fragment(builds: &[BuildView]) -> Markup {
    html! {
        @if builds.is_empty() {
            p.muted { "No builds recorded in this store yet (" code { "strata build" } ", " code { "strata deploy" } " and " code { "strata dev" } " record theirs)." }
        }
        @for b in builds {
            section.build data-build=(b.id) {
                h2 {
                    "strata " (b.command) " "
                    span.muted { (ago((b.started / 1000) as i64)) " ago" } " "
                    @match &b.status {
                        BuildStatus::Running => span.step-running.build-status { "running" },
                        BuildStatus::Succeeded => span.ok.build-status { "succeeded" },
                        BuildStatus::Failed(e) => span.error.build-status { "failed: " (e) },
                        BuildStatus::Interrupted => span.error.build-status { "interrupted" },
                    }
                }
                @for img in &b.images {
                    h3 { (img.name) " " @if let Some(d) = &img.done { span.muted { (d) } } }
                    table.steps {
                        tr { th { "Step" } th { "Instruction" } th { "Status" } th { "Time" } }
                        @for s in &img.steps {
                            tr {
                                td { @if let Some(st) = &s.stage { (st) " " } (s.index) "/" (s.total) }
                                td { code { (s.text) }
                                    @if !s.output.is_empty() { pre.log { (s.output.join("\n")) } } }
                                td class={ "step-" (s.status.as_str()) } { (s.status.as_str()) }
                                td { @if let Some(t) = s.seconds { (format!("{t:.2} s")) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn builds_page(State(state): State<Shared>, headers: HeaderMap) -> Response {
    with_session(state, headers, |state, s| async move {
        let body = live_part(&state, &s, "builds", None).await?;
        Ok(page(&state, &s, "builds", "Builds", body))
    })
    .await
}

// ---- registry ----

async fn registry_fragment(state: &AppState, s: &Session) -> Result<Markup, UiError> {
    let Some(reg) = &state.registry else {
        return Ok(html! {
            p.muted { "No registry here: " code { "strata registry serve" } " keeps its images beside this store." }
        });
    };
    let repos = reg
        .repositories(s.org.as_deref())
        .await
        .map_err(UiError::internal)?;
    let host = &state.config.registry_host;
    Ok(html! {
        @if let Some(org) = &s.org { p { "Repositories of org " b { (org) } "." } }
        @if repos.is_empty() { p.muted { "No repositories yet." } }
        @for repo in &repos {
            section.repo data-repo=(repo.name) {
                h2 { (repo.name) }
                table {
                    tr { th { "Tag" } th { "Digest" } th { "Size" } th { "Pinned by" } th { "Pull" } }
                    @for img in &repo.images {
                        @let pull = match &img.tag {
                            Some(t) => format!("{host}/{}:{t}", repo.name),
                            None => format!("{host}/{}@{}", repo.name, img.digest),
                        };
                        tr {
                            td.tag { @match &img.tag { Some(t) => b { (t) }, None => span.muted { "(untagged)" } } }
                            td { code title=(img.digest) { (img.digest.short()) } }
                            td { (human_size(img.size)) }
                            td { @if img.pinned_by.is_empty() { span.muted { "—" } } @else { (img.pinned_by.join(", ")) } }
                            td { input.pull readonly value=(pull) onclick="this.select()"; }
                        }
                    }
                }
            }
        }
    })
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn registry_page(State(state): State<Shared>, headers: HeaderMap) -> Response {
    with_session(state, headers, |state, s| async move {
        let body = live_part(&state, &s, "registry", None).await?;
        Ok(page(&state, &s, "registry", "Registry", body))
    })
    .await
}

// ---- live fragments ----

#[derive(Deserialize)]
struct LiveQuery {
    name: Option<String>,
    /// The fingerprint of the fragment the page shows.
    seen: Option<String>,
}

/// A short fingerprint of a fragment (not a secret: only "has it changed").
fn fingerprint(html: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    html.hash(&mut h);
    format!("{:016x}", h.finish())
}

async fn fragment(
    state: &Shared,
    s: &Session,
    kind: &str,
    name: Option<&str>,
) -> Result<Markup, UiError> {
    let all = state.config.pages == Pages::All;
    let csrf = s.csrf.clone();
    let name = name.map(String::from);
    match (kind, name) {
        ("registry", _) => registry_fragment(state, s).await,
        ("apps", _) if all => with_deploy_state(state, apps_fragment).await,
        ("machines", _) if all => {
            with_deploy_state(state, move |st| {
                Ok(machines_table(
                    &st.machines().map_err(UiError::internal)?,
                    &csrf,
                ))
            })
            .await
        }
        ("app", Some(app)) if all => {
            with_deploy_state(state, move |st| releases_fragment(st, &app, &csrf)).await
        }
        ("machine", Some(id)) if all => {
            with_deploy_state(state, move |st| machine_fragment(st, &id, &csrf)).await
        }
        ("builds", _) if all => {
            let root = state.config.store_root.clone();
            let builds = tokio::task::spawn_blocking(move || crate::builds::recent(&root, 10))
                .await
                .map_err(UiError::internal)?;
            Ok(builds_fragment(&builds))
        }
        _ => Err(UiError::new(
            StatusCode::NOT_FOUND,
            format!("no live part `{kind}`"),
        )),
    }
}

async fn live(
    State(state): State<Shared>,
    Path(kind): Path<String>,
    Query(q): Query<LiveQuery>,
    headers: HeaderMap,
) -> Response {
    let Some(s) = state.sessions.get(&headers) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let stream = live_stream(state, s, kind, q.name, q.seen.unwrap_or_default());
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Renders the fragment again every [`live_every`] and sends it when it changed; an error
/// (the machine destroyed, the app gone) is sent once, as the fragment.
fn live_stream(
    state: Shared,
    s: Session,
    kind: String,
    name: Option<String>,
    seen: String,
) -> impl Stream<Item = Result<Event, Infallible>> {
    futures_util::stream::unfold(
        (state, s, kind, name, seen, true),
        |(state, s, kind, name, last, first)| async move {
            let mut first = first;
            loop {
                if !first {
                    tokio::time::sleep(live_every(&kind)).await;
                }
                first = false;
                let html = match fragment(&state, &s, &kind, name.as_deref()).await {
                    Ok(m) => m.into_string(),
                    Err(e) => html! { p.error { (e.message) } }.into_string(),
                };
                let now = fingerprint(&html);
                if now != last {
                    let ev = Event::default().data(&html);
                    return Some((Ok(ev), (state, s, kind, name, now, false)));
                }
            }
        },
    )
}
