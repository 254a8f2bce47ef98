//! `hyperexport serve`: the export host's daemon.
//!
//! An HTTP API (`/api/v1`, described by `/openapi.json`) and a web dashboard to submit exports and
//! follow them, a job history in SQLite that survives restarts, live updates as server-sent
//! events, and `/metrics`. Bound to loopback by default; any other address needs TLS and a token
//! (the same rule as the agent's gRPC). Jobs run the hyperexport CLI as child processes
//! ([`jobs`]), at most `--max-concurrent` at once.

pub mod api;
pub mod db;
pub mod jobs;
pub mod metrics;
pub mod request;
pub mod web;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use hyperfarm_shared::instance;
use hyperfarm_shared::queue::{self, Queue};

/// `hyperexport serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; anything but loopback needs --tls-cert, --tls-key and --token-file
    #[arg(long, default_value = "127.0.0.1:8470", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Where the job history lives (jobs.sqlite)
    #[arg(long, default_value = "/var/lib/hyperexport", value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Exports run at once at most (more wait in the history as pending)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64), value_name = "N")]
    pub max_concurrent: u16,
    /// PEM certificate (chain) for HTTPS
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// File holding the API token (16 characters or more): clients send `Authorization: Bearer
    /// <token>`, browsers log in once at /login
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// hyperexport.toml given to every export (defaults for the queue, output, agent, TLS)
    /// [default: /etc/hyper2kvm/hyperexport.toml, if present]
    #[arg(long, env = "HYPEREXPORT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP connections served at once; more are refused
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_connections: usize,
    /// Jobs that ended more than this many days ago are forgotten (checked at start and every
    /// hour; 0 keeps them for ever)
    #[arg(long, default_value_t = 90, value_name = "DAYS")]
    pub keep_days: u32,
    /// Where a request's vm_path is when the request does not say (`provider`): `local` files,
    /// or `vsphere` (an inventory path or name on the vCenter given with --vsphere-url, as the
    /// seed's API took it)
    #[arg(long, default_value = "local", value_parser = ["local", "vsphere"])]
    pub provider: String,
    #[command(flatten)]
    pub vsphere: crate::vsphere::VsphereArgs,
}

/// What the handlers share.
pub struct App {
    pub mgr: Arc<jobs::Manager>,
    token: Option<String>,
    /// The queue the agents views and the form's defaults refer to.
    pub watch_dir: PathBuf,
    pub output_dir: PathBuf,
    pub tls: bool,
    /// Event-stream clients at once ([`api::MAX_SSE_CLIENTS`]).
    pub sse_slots: Arc<tokio::sync::Semaphore>,
}

impl App {
    /// The agents registered in the queue (`.agents/`), freshest first.
    pub fn agents(&self) -> Result<Vec<serde_json::Value>, String> {
        let q = Queue::new(&self.watch_dir);
        let now = queue::server_now(&q.tmp_dir()).ok();
        let found = queue::agents::list(&q, now).map_err(|e| format!("{}: {e}", self.watch_dir.display()))?;
        let mut v: Vec<_> = found
            .into_iter()
            .map(|f| {
                serde_json::json!({
                    "instance": f.reg.instance,
                    "host": f.reg.host,
                    "host_id": f.reg.host_id,
                    "url": f.reg.advertise_url.clone().or(f.reg.local_url.clone()),
                    "tls": f.reg.tls,
                    "version": f.reg.version,
                    "pid": f.reg.pid,
                    "started_at_ms": f.reg.started_at_ms,
                    "age_secs": f.age.map(|a| a.as_secs()),
                    "fresh": f.fresh(),
                })
            })
            .collect();
        v.sort_by_key(|a| a["age_secs"].as_u64().unwrap_or(u64::MAX));
        Ok(v)
    }

    pub fn storage_ok(&self) -> Vec<(String, bool)> {
        [("queue", &self.watch_dir), ("output", &self.output_dir)]
            .into_iter()
            .map(|(n, d)| (n.to_string(), std::fs::metadata(d).is_ok_and(|m| m.is_dir())))
            .collect()
    }

    /// The queue's counts and stale claims, and whether its directories are there.
    pub fn queue_health(&self) -> serde_json::Value {
        let q = Queue::new(&self.watch_dir);
        let storage: serde_json::Map<String, serde_json::Value> =
            self.storage_ok().into_iter().map(|(k, v)| (k, serde_json::Value::Bool(v))).collect();
        match queue::summarize(&q, Duration::from_secs(60)) {
            Ok(s) => serde_json::json!({
                "queue": self.watch_dir, "output": self.output_dir, "reachable": true, "storage_ok": storage,
                "summary": serde_json::to_value(&s).unwrap_or_default(),
            }),
            Err(e) => serde_json::json!({
                "queue": self.watch_dir, "output": self.output_dir, "reachable": false, "storage_ok": storage,
                "error": format!("{}: {e}", self.watch_dir.display()),
            }),
        }
    }
}

pub fn main(args: ServeArgs) -> ExitCode {
    let providers = request::Providers::from_args(&args);
    // vSphere settings are checked now (URL, user, the password file readable by this user, the
    // CA), so that a mistake stops serve at once (exit 2) rather than failing every export.
    if (providers.vsphere || providers.default_vsphere)
        && let Err(e) = crate::vsphere::connection(&args.vsphere)
    {
        eprintln!("hyperexport serve: {}", hyperfarm_shared::text::escape_lines(&e.to_string()));
        return ExitCode::from(e.code());
    }
    request::set_providers(providers);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyperexport serve: cannot start the runtime: {e}");
            return ExitCode::from(crate::EXIT_INTERNAL);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("hyperexport serve: {}", hyperfarm_shared::text::escape_lines(&msg));
            ExitCode::from(code)
        }
    }
}

fn read_token(p: &Path) -> Result<String, String> {
    let meta = std::fs::symlink_metadata(p).map_err(|e| format!("--token-file {}: {e}", p.display()))?;
    if !meta.is_file() || meta.len() > 4096 {
        return Err(format!("--token-file {}: not a regular file of at most 4 KiB", p.display()));
    }
    let t = std::fs::read_to_string(p).map_err(|e| format!("--token-file {}: {e}", p.display()))?;
    let t = t.trim().to_string();
    if t.len() < 16 || !t.chars().all(|c| c.is_ascii_graphic() && !matches!(c, ';' | ',' | '"' | '\\')) {
        return Err(format!(
            "--token-file {}: the token must be at least 16 visible ASCII characters, without spaces, ; , \" or \\ (it is also the dashboard's cookie)",
            p.display()
        ));
    }
    Ok(t)
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("--tls-cert {}: no certificate in the file", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--tls-key {}: {e}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| format!("TLS: {e}"))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn run(args: ServeArgs) -> Result<(), (u8, String)> {
    let usage = |m: String| (crate::EXIT_USAGE, m);
    let loopback = args.listen.ip().is_loopback();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k).map_err(usage)?),
        _ => None,
    };
    let token = args.token_file.as_deref().map(read_token).transpose().map_err(usage)?;
    if !loopback && (tls.is_none() || token.is_none()) {
        return Err(usage(format!(
            "--listen {} is not a loopback address: give --tls-cert, --tls-key and --token-file (the API starts exports on this host)",
            args.listen
        )));
    }
    let file = match &args.config {
        Some(p) => Some(p.clone()),
        None if Path::new(crate::cli::DEFAULT_CONFIG).is_file() => Some(PathBuf::from(crate::cli::DEFAULT_CONFIG)),
        None => None,
    };
    let fc: crate::cli::FileConfig = match &file {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| usage(format!("configuration file {}: {e}", p.display())))?;
            toml::from_str(&text).map_err(|e| usage(format!("configuration file {}: {e}", p.display())))?
        }
        None => Default::default(),
    };
    let inst = fc.instance.as_deref();
    let watch_dir = fc.watch_dir.clone().unwrap_or_else(|| instance::watch_dir(inst));
    let output_dir = fc.output_dir.clone().unwrap_or_else(|| instance::output_dir(inst));

    std::fs::create_dir_all(&args.state_dir)
        .map_err(|e| (crate::EXIT_UNREACHABLE, format!("state directory {}: {e}", args.state_dir.display())))?;
    let db_path = args.state_dir.join("jobs.sqlite");
    let db = Arc::new(db::Db::open(&db_path).map_err(|e| (crate::EXIT_UNREACHABLE, e))?);
    let exe = std::env::current_exe().map_err(|e| (crate::EXIT_INTERNAL, format!("cannot find this program: {e}")))?;
    let metrics = Arc::new(metrics::Metrics::new());
    let queues = jobs::QueueDefaults { config_watch_dir: fc.watch_dir.clone(), config_instance: fc.instance.clone() };
    let mgr = jobs::Manager::new(db, exe, file.clone(), usize::from(args.max_concurrent), metrics, queues);
    mgr.recover().await.map_err(|e| (crate::EXIT_INTERNAL, e))?;
    if args.keep_days > 0 {
        let (db, days) = (mgr.db.clone(), i64::from(args.keep_days));
        tokio::spawn(async move {
            loop {
                let before = jobs::now_ms() - days * 86_400_000;
                let db2 = db.clone();
                match tokio::task::spawn_blocking(move || db2.prune(before)).await {
                    Ok(Ok(n)) if n > 0 => tracing::info!(jobs = n, days, "forgot jobs that ended long ago"),
                    Ok(Err(e)) => tracing::warn!("pruning the job history: {e}"),
                    _ => {}
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
    }

    let app = Arc::new(App {
        mgr: mgr.clone(),
        token,
        watch_dir,
        output_dir,
        tls: tls.is_some(),
        sse_slots: Arc::new(tokio::sync::Semaphore::new(api::MAX_SSE_CLIENTS)),
    });
    let router = router(app.clone());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| (crate::EXIT_UNREACHABLE, format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener.local_addr().map_err(|e| (crate::EXIT_INTERNAL, e.to_string()))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        url = %format!("{scheme}://{addr}/"), db = %db_path.display(), queue = %app.watch_dir.display(),
        max_concurrent = args.max_concurrent, token = app.token.is_some(),
        "hyperexport serve listening"
    );
    // Tests and scripts read the address from here (the port may be 0 = any).
    println!("listening on {scheme}://{addr}/");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = sd_notify("READY=1\nSTATUS=serving");

    let slots = Arc::new(tokio::sync::Semaphore::new(args.max_connections.max(1)));
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections: closing a new one");
                drop(stream);
                continue;
            };
            let (router, tls, metrics) = (router.clone(), tls.clone(), app.mgr.metrics.clone());
            tokio::spawn(async move {
                let _permit = permit;
                metrics.http_connections.inc();
                let svc = hyper_util::service::TowerToHyperService::new(router);
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
                match tls {
                    Some(acc) => {
                        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(10), acc.accept(stream)).await {
                            let _ = b.serve_connection(hyper_util::rt::TokioIo::new(s), svc).await;
                        }
                    }
                    None => {
                        let _ = b.serve_connection(hyper_util::rt::TokioIo::new(stream), svc).await;
                    }
                }
                metrics.http_connections.dec();
            });
        }
    };
    let stop = async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return std::future::pending::<()>().await;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    };
    tokio::select! {
        () = accept => {}
        () = stop => {
            tracing::info!("stopping: exports in progress are interrupted, jobs in the queue are followed again at the next start");
            let _ = sd_notify("STOPPING=1");
            mgr.shutdown().await;
        }
    }
    Ok(())
}

/// Tell systemd (Type=notify) when NOTIFY_SOCKET is set.
fn sd_notify(msg: &str) -> std::io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(()) };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let p = std::path::PathBuf::from(&path);
    if let Some(abs) = p.to_str().and_then(|s| s.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes())?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), &p)?;
    }
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/openapi.json", get(api::openapi))
        .route("/api/v1/health", get(api::health))
        .route("/api/v1/jobs", post(api::submit).get(api::list))
        .route("/api/v1/jobs/{id}", get(api::get))
        .route("/api/v1/jobs/{id}/cancel", post(api::cancel))
        .route("/api/v1/jobs/{id}/retry", post(api::retry))
        .route("/api/v1/jobs/{id}/log", get(api::log))
        .route("/api/v1/jobs/{id}/events", get(api::job_events))
        .route("/api/v1/events", get(api::events))
        .route("/api/v1/agents", get(api::agents))
        .route("/api/v1/queue", get(api::queue))
        .route("/metrics", get(api::metrics))
        .route("/", get(web::index))
        .route("/jobs/{id}", get(web::job))
        .route("/jobs/{id}/cancel", post(web::cancel))
        .route("/jobs/{id}/retry", post(web::retry))
        .route("/submit", get(web::submit_form).post(web::submit))
        .route("/agents", get(web::agents))
        .route("/login", get(web::login_form).post(web::login))
        .route("/assets/app.js", get(web::app_js))
        .route("/assets/style.css", get(web::style_css))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn(deadline))
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024))
        .with_state(app)
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(n, _)| n).unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Compare without an early exit (the token's length is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The token a request carries: `Authorization: Bearer` (any case) or the dashboard's cookie.
fn given_token(h: &HeaderMap) -> Option<String> {
    if let Some(v) = h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let mut parts = v.trim().splitn(2, ' ');
        if parts.next().is_some_and(|s| s.eq_ignore_ascii_case("bearer")) {
            return parts.next().map(|t| t.trim().to_string());
        }
    }
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(web::COOKIE).and_then(|r| r.strip_prefix('=')).map(str::to_string))
}

/// A request (its body included) must be answered within this; event streams are exempt.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A slow client cannot hold a connection slot with a body it never finishes sending.
async fn deadline(req: Request, next: Next) -> Response {
    if req.uri().path().ends_with("/events") {
        return next.run(req).await;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => api::error(StatusCode::REQUEST_TIMEOUT, None, "the request took too long"),
    }
}

/// Authentication (when a token is configured) and cross-site request refusal (always).
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let h = req.headers();
    // A web page elsewhere must not make a browser on this host submit or cancel exports.
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let cross = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()).is_some_and(|v| v == "cross-site");
        let origin_mismatch = match (
            h.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
            h.get(header::HOST).and_then(|v| v.to_str().ok()),
        ) {
            (Some(o), Some(host)) => o != "null" && o.split_once("://").map(|(_, rest)| rest) != Some(host),
            (Some(o), None) => o != "null",
            _ => false,
        } || h.get(header::ORIGIN).is_some_and(|o| o == "null");
        if cross || origin_mismatch {
            return api::error(StatusCode::FORBIDDEN, None, "cross-site request refused");
        }
    }
    // Without a token (loopback only), a request must name this host by a loopback address or
    // `localhost`: a page elsewhere that rebinds its own DNS name to 127.0.0.1 gets nothing.
    if app.token.is_none() && !h.get(header::HOST).and_then(|v| v.to_str().ok()).is_some_and(loopback_host) {
        return api::error(
            StatusCode::MISDIRECTED_REQUEST,
            None,
            "without a token, hyperexport serve answers only requests to a loopback address or localhost",
        );
    }
    let open = path == "/login" || path.starts_with("/assets/") || path == "/api/v1/health";
    if let Some(token) = &app.token
        && !open
    {
        let ok = given_token(h).is_some_and(|t| same(t.as_bytes(), token.as_bytes()));
        if !ok {
            if path.starts_with("/api/") || path == "/metrics" || path == "/openapi.json" {
                let mut r = api::error(
                    StatusCode::UNAUTHORIZED,
                    None,
                    "send `Authorization: Bearer <token>` with the token of hyperexport serve (--token-file)",
                );
                r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                return r;
            }
            return axum::response::Redirect::to("/login").into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_names_pass_without_a_token() {
        for ok in ["127.0.0.1:8470", "localhost:8470", "LOCALHOST", "[::1]:8470", "127.0.0.2"] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in ["evil.example:8470", "10.0.0.1:8470", "[::2]:1", "localhost.evil.example", ""] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn the_token_comes_from_the_header_in_any_case_or_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "BEARER abc".parse().expect("header"));
        assert_eq!(given_token(&h).as_deref(), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=b; hyperexport_token=xyz".parse().expect("header"));
        assert_eq!(given_token(&h).as_deref(), Some("xyz"));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Basic abc".parse().expect("header"));
        assert_eq!(given_token(&h), None);
    }
}
