//! The web dashboard: server-rendered pages (the lists read without JavaScript), a submission
//! form that works as a plain HTML form, and a small script (`assets/app.js`) for live progress
//! over server-sent events and for showing the daemon section when it is asked for.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::App;
use super::db::JobRow;
use super::jobs::{self, Refused};
use super::request::{self, ExportOptions, ExportRequest};

pub const COOKIE: &str = "hyperexport_token";
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Escape text for HTML (control characters shown as escapes first).
fn esc(s: &str) -> String {
    hyperfarm_shared::text::markup_escape(&hyperfarm_shared::text::Esc(s).to_string())
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{t} · hyperexport</title><link rel="stylesheet" href="/assets/style.css"></head>
<body><header><a class="brand" href="/">hyperexport</a><nav><a href="/">Jobs</a><a href="/submit">Submit</a><a href="/agents">Agents &amp; queue</a></nav></header>
<main>{body}</main><script src="/assets/app.js" defer></script></body></html>"#,
        t = esc(title)
    ))
}

fn time(ms: i64) -> String {
    hyperfarm_shared::timefmt::rfc3339_ms(ms.max(0) as u64)
}

fn bar(pct: f64) -> String {
    let p = pct.clamp(0.0, 100.0);
    format!(
        r#"<div class="bar" role="progressbar" aria-valuenow="{p:.0}" aria-valuemin="0" aria-valuemax="100"><span style="width:{p:.1}%"></span></div><span class="pct">{p:.0}%</span>"#
    )
}

fn job_tr(j: &JobRow) -> String {
    format!(
        r#"<tr data-job="{id}" data-created="{created_ms}"><td><a href="/jobs/{id}">{name}</a><div class="sub">{mode}</div></td><td><span class="state s-{state}">{state}</span></td><td class="progress">{bar}<div class="phase">{phase}</div></td><td class="when">{created}</td></tr>"#,
        id = esc(&j.id),
        name = esc(&j.name),
        mode = esc(&j.mode),
        state = esc(&j.state),
        bar = bar(j.percent),
        phase = esc(&j.phase),
        created = time(j.created_ms),
        created_ms = j.created_ms,
    )
}

pub async fn index(State(app): State<Arc<App>>) -> Response {
    let (jobs, total) = match app.mgr.db.list(None, 200, 0) {
        Ok(x) => x,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let mut b = String::new();
    let _ = write!(
        b,
        r#"<noscript><meta http-equiv="refresh" content="5"></noscript><h1>Jobs <small>{total}</small></h1><p><a class="button" href="/submit">Submit an export</a></p>"#
    );
    if jobs.is_empty() {
        b.push_str("<p class=\"empty\">No jobs yet.</p>");
    } else {
        b.push_str(r#"<table class="jobs" id="jobs"><thead><tr><th>Job</th><th>State</th><th>Progress</th><th>Created</th></tr></thead><tbody>"#);
        for j in &jobs {
            b.push_str(&job_tr(j));
        }
        b.push_str("</tbody></table>");
    }
    page("Jobs", &b).into_response()
}

pub async fn job(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let j = match app.mgr.db.get(&id) {
        Ok(Some(j)) => j,
        Ok(None) => return (StatusCode::NOT_FOUND, page("No such job", "<h1>No such job</h1>")).into_response(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let log = app.mgr.db.log_tail(&id, 200).unwrap_or_default();
    let mut b = String::new();
    if !jobs::is_final(&j.state) {
        b.push_str(r#"<noscript><meta http-equiv="refresh" content="3"></noscript>"#);
    }
    let _ = write!(
        b,
        r#"<h1>{name}</h1><section class="detail" data-job="{id}" data-final="{fin}"><dl>
<dt>State</dt><dd><span class="state s-{state}">{state}</span></dd>
<dt>Progress</dt><dd class="progress">{bar}<div class="phase">{phase}</div></dd>
<dt>Mode</dt><dd>{mode}</dd><dt>VM</dt><dd><code>{vm}</code></dd>
<dt>Queue job</dt><dd><code>{qid}</code></dd><dt>Queue</dt><dd><code>{queue}</code></dd>
<dt>Attempts</dt><dd>{attempts}</dd><dt>Created</dt><dd>{created}</dd></dl>"#,
        name = esc(&j.name),
        id = esc(&j.id),
        fin = jobs::is_final(&j.state),
        state = esc(&j.state),
        bar = bar(j.percent),
        phase = esc(&j.phase),
        mode = esc(&j.mode),
        vm = esc(j.request.get("vm_path").and_then(|v| v.as_str()).unwrap_or("")),
        qid = esc(j.queue_job_id.as_deref().unwrap_or("-")),
        queue = esc(j.queue.as_deref().unwrap_or("-")),
        attempts = j.attempts,
        created = time(j.created_ms),
    );
    if let Some(d) = j.disks.as_object().filter(|d| !d.is_empty()) {
        b.push_str("<h2>Disks</h2><table class=\"disks\">");
        for (disk, pct) in d {
            let _ = write!(
                b,
                "<tr><td>{}</td><td class=\"progress\">{}</td></tr>",
                esc(disk),
                bar(pct.as_f64().unwrap_or(0.0))
            );
        }
        b.push_str("</table>");
    }
    if let Some(files) = j.files.as_array().filter(|f| !f.is_empty()) {
        b.push_str("<h2>Result</h2><ul class=\"files\">");
        for f in files {
            let _ = write!(b, "<li><code class=\"result\">{}</code></li>", esc(f.as_str().unwrap_or("")));
        }
        b.push_str("</ul>");
    }
    if let Some(e) = &j.error {
        let _ = write!(b, "<h2>Error</h2><pre class=\"error\">{}</pre>", esc(e));
    }
    b.push_str("<div class=\"actions\">");
    if !jobs::is_final(&j.state) {
        let _ = write!(
            b,
            r#"<form method="post" action="/jobs/{}/cancel"><button class="danger" id="cancel">Cancel</button></form>"#,
            esc(&j.id)
        );
    }
    if matches!(j.state.as_str(), jobs::FAILED | jobs::CANCELLED | jobs::INTERRUPTED) {
        let _ = write!(
            b,
            r#"<form method="post" action="/jobs/{}/retry"><button id="retry">Retry</button></form>"#,
            esc(&j.id)
        );
    }
    b.push_str("</div></section><h2>Log</h2><pre class=\"log\">");
    for (_, l) in &log {
        b.push_str(&esc(l));
        b.push('\n');
    }
    b.push_str("</pre>");
    page(&j.name, &b).into_response()
}

pub async fn cancel(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.mgr.cancel(&id).await {
        Ok(_) | Err(Refused::Conflict(_)) => Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(Refused::NotFound) => (StatusCode::NOT_FOUND, "no such job").into_response(),
        Err(Refused::Internal(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

pub async fn retry(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.mgr.retry(&id) {
        Ok(_) | Err(Refused::Conflict(_)) => Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(Refused::NotFound) => (StatusCode::NOT_FOUND, "no such job").into_response(),
        Err(Refused::Internal(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// The form's fields (a plain HTML form: checkboxes are present when ticked).
#[derive(Debug, Default, Deserialize)]
pub struct SubmitForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    vm_path: String,
    #[serde(default)]
    vm_name: String,
    #[serde(default)]
    output_dir: String,
    #[serde(default)]
    enable_pipeline: Option<String>,
    #[serde(default)]
    hyper2kvm_daemon: Option<String>,
    #[serde(default)]
    hyper2kvm_instance: String,
    #[serde(default)]
    hyper2kvm_watch_dir: String,
    #[serde(default)]
    hyper2kvm_output_dir: String,
    #[serde(default)]
    hyper2kvm_poll_interval: String,
    #[serde(default)]
    hyper2kvm_daemon_timeout: String,
    #[serde(default)]
    engine: String,
    #[serde(default)]
    stage_inspect: Option<String>,
    #[serde(default)]
    stage_fix: Option<String>,
    #[serde(default)]
    stage_validate: Option<String>,
    /// Made with the form: a second press of Submit (or a reload of the POST) names the same
    /// submission and gets the job the first one made.
    #[serde(default)]
    idempotency_key: String,
}

fn opt(s: &str) -> Option<String> {
    let t = s.trim();
    (!t.is_empty()).then(|| t.to_string())
}

fn number(field: &str, s: &str) -> Result<Option<u64>, request::Invalid> {
    match opt(s) {
        None => Ok(None),
        Some(t) => t
            .parse::<u64>()
            .map(Some)
            .map_err(|_| request::Invalid::field(field, format!("{t:?} is not a whole number"))),
    }
}

impl SubmitForm {
    fn request(&self) -> Result<ExportRequest, request::Invalid> {
        let stages: Vec<String> =
            [("inspect", &self.stage_inspect), ("fix", &self.stage_fix), ("validate", &self.stage_validate)]
                .into_iter()
                .filter(|(_, v)| v.is_some())
                .map(|(n, _)| n.to_string())
                .collect();
        let daemon = self.hyper2kvm_daemon.is_some();
        let r = ExportRequest {
            name: opt(&self.name),
            vm_path: self.vm_path.trim().to_string(),
            provider: None,
            output_dir: opt(&self.output_dir),
            format: None,
            vm_name: opt(&self.vm_name),
            options: ExportOptions {
                enable_pipeline: Some(self.enable_pipeline.is_some() || daemon),
                hyper2kvm_daemon: Some(daemon),
                // The daemon section counts only when the daemon phase is asked for.
                hyper2kvm_instance: if daemon { opt(&self.hyper2kvm_instance) } else { None },
                hyper2kvm_watch_dir: if daemon { opt(&self.hyper2kvm_watch_dir) } else { None },
                hyper2kvm_output_dir: if daemon { opt(&self.hyper2kvm_output_dir) } else { None },
                hyper2kvm_poll_interval: if daemon {
                    number("options.hyper2kvm_poll_interval", &self.hyper2kvm_poll_interval)?
                } else {
                    None
                },
                hyper2kvm_daemon_timeout: if daemon {
                    number("options.hyper2kvm_daemon_timeout", &self.hyper2kvm_daemon_timeout)?
                } else {
                    None
                },
                libvirt_integration: None,
                engine: opt(&self.engine).filter(|e| e != "auto"),
                stages: (!stages.is_empty()).then_some(stages),
            },
        };
        if r.vm_path.is_empty() {
            return Err(request::Invalid::field("vm_path", "give the VM's path"));
        }
        request::validate(&r)?;
        Ok(r)
    }
}

fn form_page(app: &App, f: &SubmitForm, error: Option<&request::Invalid>, agents: &[serde_json::Value]) -> String {
    let mut b = String::from("<h1>Submit an export</h1>");
    if let Some(e) = error {
        let _ = write!(
            b,
            r#"<p class="form-error" id="form-error" role="alert"><strong>{}</strong>: {}</p>"#,
            esc(e.field.as_deref().unwrap_or("request")),
            esc(&e.message)
        );
    }
    let checked = |v: &Option<String>| if v.is_some() { " checked" } else { "" };
    let val = |s: &str| esc(s);
    let mut instances = String::from(r#"<option value="">(default)</option>"#);
    let mut seen = std::collections::BTreeSet::new();
    for a in agents {
        let inst = a["instance"].as_str().unwrap_or("");
        if inst.is_empty() || !seen.insert(inst.to_string()) {
            continue;
        }
        let label = format!(
            "{inst} on {}{}",
            a["host"].as_str().unwrap_or("?"),
            if a["fresh"].as_bool() == Some(true) { "" } else { " (not seen lately)" }
        );
        let sel = if f.hyper2kvm_instance == inst { " selected" } else { "" };
        let _ = write!(instances, r#"<option value="{}"{sel}>{}</option>"#, esc(inst), esc(&label));
    }
    let _ = write!(
        b,
        r#"<form method="post" action="/submit" id="submit-form" class="submit">
<fieldset><legend>VM</legend>
<label>VM path <input name="vm_path" id="vm_path" required placeholder="/srv/export/web01.ova" value="{vm_path}"></label>
<label>Job name <input name="name" id="name" value="{name}"></label>
<label>VM name (names the qcow2) <input name="vm_name" id="vm_name" value="{vm_name}"></label>
<label>Output directory <input name="output_dir" id="output_dir" placeholder="queue (export only) or qcow2 directory (here)" value="{output_dir}"></label>
</fieldset>
<fieldset><legend>Pipeline</legend>
<label class="check"><input type="checkbox" name="enable_pipeline" id="enable_pipeline" value="on"{pipe}> Convert to qcow2</label>
<label>Engine <select name="engine" id="engine"><option value="auto">auto</option><option value="qemu-img"{qi}>qemu-img</option><option value="hyper2kvm"{hk}>hyper2kvm</option></select></label>
<div class="checks"><label class="check"><input type="checkbox" name="stage_inspect" value="on"{si}> inspect</label><label class="check"><input type="checkbox" name="stage_fix" value="on"{sf}> fix</label><label class="check"><input type="checkbox" name="stage_validate" value="on"{sv}> validate</label></div>
<label class="check"><input type="checkbox" name="hyper2kvm_daemon" id="hyper2kvm_daemon" value="on"{daemon}> Convert on the farm (daemon phase)</label>
</fieldset>
<fieldset id="daemon-section"><legend>Daemon phase</legend>
<label>Instance <select name="hyper2kvm_instance" id="hyper2kvm_instance">{instances}</select></label>
<label>Watch (queue) directory <input name="hyper2kvm_watch_dir" id="hyper2kvm_watch_dir" placeholder="{wd}" value="{watch}"></label>
<label>Output directory <input name="hyper2kvm_output_dir" id="hyper2kvm_output_dir" placeholder="{od}" value="{out}"></label>
<label>Poll interval (seconds, 1–60) <input type="number" name="hyper2kvm_poll_interval" id="hyper2kvm_poll_interval" min="1" max="60" placeholder="5" value="{poll}"></label>
<label>Timeout (minutes, 1–240) <input type="number" name="hyper2kvm_daemon_timeout" id="hyper2kvm_daemon_timeout" min="1" max="240" placeholder="60" value="{timeout}"></label>
</fieldset>
<input type="hidden" name="idempotency_key" value="{key}">
<button type="submit" id="submit">Submit</button></form>"#,
        vm_path = val(&f.vm_path),
        name = val(&f.name),
        vm_name = val(&f.vm_name),
        output_dir = val(&f.output_dir),
        pipe = checked(&f.enable_pipeline),
        qi = if f.engine == "qemu-img" { " selected" } else { "" },
        hk = if f.engine == "hyper2kvm" { " selected" } else { "" },
        si = checked(&f.stage_inspect),
        sf = checked(&f.stage_fix),
        sv = checked(&f.stage_validate),
        daemon = checked(&f.hyper2kvm_daemon),
        wd = esc(&app.watch_dir.display().to_string()),
        od = esc(&app.output_dir.display().to_string()),
        watch = val(&f.hyper2kvm_watch_dir),
        out = val(&f.hyper2kvm_output_dir),
        poll = val(&f.hyper2kvm_poll_interval),
        timeout = val(&f.hyper2kvm_daemon_timeout),
        key = if f.idempotency_key.is_empty() { uuid::Uuid::new_v4().to_string() } else { val(&f.idempotency_key) },
    );
    b
}

async fn agent_list(app: &Arc<App>) -> Vec<serde_json::Value> {
    let a = app.clone();
    tokio::task::spawn_blocking(move || a.agents()).await.ok().and_then(Result::ok).unwrap_or_default()
}

pub async fn submit_form(State(app): State<Arc<App>>) -> Response {
    let agents = agent_list(&app).await;
    let f =
        SubmitForm { enable_pipeline: Some("on".into()), hyper2kvm_daemon: Some("on".into()), ..Default::default() };
    page("Submit", &form_page(&app, &f, None, &agents)).into_response()
}

pub async fn submit(
    State(app): State<Arc<App>>,
    form: Result<Form<SubmitForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(f)) = form else {
        return (StatusCode::BAD_REQUEST, page("Submit", "<h1>Bad form</h1>")).into_response();
    };
    let checked = tokio::task::spawn_blocking(move || {
        let r = f.request();
        (f, r)
    })
    .await;
    let Ok((f, r)) = checked else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response();
    };
    match r {
        Ok(req) => {
            use super::jobs::Submitted;
            let key = Some(f.idempotency_key.trim())
                .filter(|k| (1..=128).contains(&k.len()) && k.chars().all(|c| c.is_ascii_graphic()));
            let hash = blake3::hash(serde_json::to_string(&req).unwrap_or_default().as_bytes()).to_hex().to_string();
            match app.mgr.submit_once(vec![req], key.map(|k| (k, hash.as_str()))) {
                Ok(Submitted::New(rows) | Submitted::Earlier(rows)) if !rows.is_empty() => {
                    Redirect::to(&format!("/jobs/{}", rows[0].id)).into_response()
                }
                Ok(_) => {
                    let inv = request::Invalid::field(
                        "form",
                        "this form was already submitted with other values; reload the form to submit again",
                    );
                    let agents = agent_list(&app).await;
                    (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        page(
                            "Submit",
                            &form_page(&app, &SubmitForm { idempotency_key: String::new(), ..f }, Some(&inv), &agents),
                        ),
                    )
                        .into_response()
                }
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
            }
        }
        Err(inv) => {
            let agents = agent_list(&app).await;
            (StatusCode::UNPROCESSABLE_ENTITY, page("Submit", &form_page(&app, &f, Some(&inv), &agents)))
                .into_response()
        }
    }
}

pub async fn agents(State(app): State<Arc<App>>) -> Response {
    let a = app.clone();
    let (agents, health) = tokio::task::spawn_blocking(move || (a.agents(), a.queue_health()))
        .await
        .unwrap_or_else(|_| (Ok(vec![]), serde_json::json!({})));
    let mut b = String::from(r#"<noscript><meta http-equiv="refresh" content="10"></noscript><h1>Agents</h1>"#);
    match agents {
        Ok(list) if list.is_empty() => {
            let _ = write!(
                b,
                "<p class=\"empty\">No agent is registered in {}.</p>",
                esc(&app.watch_dir.display().to_string())
            );
        }
        Ok(list) => {
            b.push_str(r#"<table class="agents"><thead><tr><th>Instance</th><th>Host</th><th>Address</th><th>Version</th><th>Seen</th></tr></thead><tbody>"#);
            for a in list {
                let fresh = a["fresh"].as_bool() == Some(true);
                let _ = write!(
                    b,
                    r#"<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td><span class="state {}">{}</span></td></tr>"#,
                    esc(a["instance"].as_str().unwrap_or("")),
                    esc(a["host"].as_str().unwrap_or("")),
                    esc(a["url"].as_str().unwrap_or("-")),
                    esc(a["version"].as_str().unwrap_or("")),
                    if fresh { "s-done" } else { "s-failed" },
                    a["age_secs"].as_u64().map(|s| format!("{s} s ago")).unwrap_or_else(|| "?".into())
                );
            }
            b.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(b, "<p class=\"form-error\">{}</p>", esc(&e));
        }
    }
    let _ = write!(b, "<h1>Queue</h1><p><code>{}</code></p>", esc(&app.watch_dir.display().to_string()));
    if let Some(c) = health.pointer("/summary/counts").and_then(|c| c.as_object()) {
        b.push_str("<table class=\"counts\"><tbody>");
        for (k, v) in c {
            let _ = write!(b, "<tr><th>{}</th><td>{}</td></tr>", esc(k), v);
        }
        b.push_str("</tbody></table>");
    } else if let Some(e) = health.get("error").and_then(|e| e.as_str()) {
        let _ = write!(b, "<p class=\"form-error\">The queue cannot be read: {}</p>", esc(e));
    }
    if let Some(s) = health.get("storage_ok").and_then(|s| s.as_object()) {
        b.push_str("<ul>");
        for (k, v) in s {
            let _ = write!(
                b,
                "<li>{}: {}</li>",
                esc(k),
                if v.as_bool() == Some(true) { "reachable" } else { "NOT reachable" }
            );
        }
        b.push_str("</ul>");
    }
    page("Agents & queue", &b).into_response()
}

pub async fn login_form() -> Response {
    page(
        "Log in",
        r#"<h1>Log in</h1><form method="post" action="/login" class="submit"><label>Token <input type="password" name="token" id="token" required autocomplete="current-password"></label><button type="submit">Log in</button></form>"#,
    )
    .into_response()
}

#[derive(Debug, Deserialize)]
pub struct Login {
    token: String,
}

pub async fn login(
    State(app): State<Arc<App>>,
    form: Result<Form<Login>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(l)) = form else { return (StatusCode::BAD_REQUEST, "bad form").into_response() };
    match &app.token {
        Some(t) if super::same(l.token.trim().as_bytes(), t.as_bytes()) => {
            let secure = if app.tls { "; Secure" } else { "" };
            let cookie = format!("{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{secure}", t);
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Some(_) => (
            StatusCode::UNAUTHORIZED,
            page(
                "Log in",
                "<h1>Log in</h1><p class=\"form-error\">Wrong token.</p><p><a href=\"/login\">Try again</a></p>",
            ),
        )
            .into_response(),
        None => Redirect::to("/").into_response(),
    }
}

pub async fn app_js() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS).into_response()
}

pub async fn style_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS).into_response()
}
