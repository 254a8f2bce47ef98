//! The agent's gRPC server: `hyperfarm.v1.AgentService`, the standard health service
//! (`grpc.health.v1`) and server reflection (v1 and v1alpha, for grpcurl and friends).
//!
//! Beyond loopback the server requires TLS (mutual TLS with `tls_client_ca`) or an explicit
//! `insecure_listen`.
//!
//! The API can never take what the agent's own work needs:
//! - it runs on a **runtime of its own** (two worker threads, at most [`API_BLOCKING_THREADS`]
//!   blocking threads), so no load of RPCs can starve the claim loop, the heartbeats (threads of
//!   their own, see `job.rs`) or signal handling;
//! - it answers status and listings **from memory** (the board, the job index refreshed by a
//!   thread of its own, the last health probe), so a hung share never blocks an RPC; the few
//!   calls that must touch the share (cancel, retry, a job's full error text) do it on the API's
//!   blocking threads with a deadline;
//! - its **connections are limited** below the descriptor budget, with handshake and idle
//!   deadlines ([`conn`]); watch streams are limited too.

pub mod auth;
pub mod conn;
pub mod jobs;
pub mod service;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use hyperfarm_proto::v1::agent_service_server::AgentServiceServer;
use hyperfarm_shared::fsx;
use hyperfarm_shared::queue::State;

use crate::agent::Core;
use crate::{EXIT_CONFIG, EXIT_LISTEN, Fatal};

/// The service name health is reported for (besides the empty "whole server" name).
pub const SERVICE_NAME: &str = "hyperfarm.v1.AgentService";
/// How often health is probed.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// A probe that takes longer than this (a hung NFS mount) counts as a failure.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Blocking threads of the API's runtime: calls that touch the share (cancel, retry, a job's full
/// error) run there, with a deadline, never on the agent's own blocking pool.
pub const API_BLOCKING_THREADS: usize = 8;
/// Deadline of an API call that has to touch the share.
pub const DISK_DEADLINE: Duration = Duration::from_secs(5);

/// The last health probe.
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    pub queue: Result<(), String>,
    pub output: Result<(), String>,
    pub engine: Result<(), String>,
    /// Free and total bytes of the queue's and the output's file systems.
    pub queue_space: (u64, u64),
    pub output_space: (u64, u64),
    /// When this probe finished (milliseconds since the epoch; 0: never).
    pub probed_at_ms: u64,
}

impl HealthSnapshot {
    pub fn serving(&self) -> bool {
        self.queue.is_ok() && self.output.is_ok() && self.engine.is_ok()
    }
}

/// Shared between the probe thread, the service and the rest of the agent.
#[derive(Debug)]
pub struct HealthState {
    inner: Mutex<HealthSnapshot>,
    /// When the probe running now started (a probe stuck on a hung share never finishes).
    probing_since: Mutex<Option<Instant>>,
    started: std::sync::atomic::AtomicBool,
}

impl Default for HealthState {
    fn default() -> Self {
        let pending = || Err("not probed yet".to_string());
        HealthState {
            inner: Mutex::new(HealthSnapshot {
                queue: pending(),
                output: pending(),
                engine: pending(),
                queue_space: (0, 0),
                output_space: (0, 0),
                probed_at_ms: 0,
            }),
            probing_since: Mutex::new(None),
            started: Default::default(),
        }
    }
}

impl HealthState {
    /// The last probe's result, or a failure if the probe running now has been stuck longer than
    /// [`PROBE_TIMEOUT`] (the share is hung).
    pub fn snapshot(&self) -> HealthSnapshot {
        let mut s = self.inner.lock().expect("health lock").clone();
        if let Some(since) = *self.probing_since.lock().expect("health lock")
            && since.elapsed() > PROBE_TIMEOUT
        {
            let hung = || {
                Err(format!(
                    "the health probe has not finished for {}s (is the share hung?)",
                    since.elapsed().as_secs()
                ))
            };
            s.queue = hung();
            s.output = hung();
        }
        s
    }
    fn set(&self, s: HealthSnapshot) {
        *self.inner.lock().expect("health lock") = s;
    }
}

/// Probe the directories and the engine (blocking).
pub fn probe(core: &Core) -> HealthSnapshot {
    let queue = (|| -> Result<(), String> {
        fsx::probe_writable(&core.cfg.watch_dir).map_err(|e| format!("queue {}: {e}", core.cfg.watch_dir.display()))?;
        for s in [State::Queued, State::Converting] {
            let d = core.queue.state_dir(s);
            if !d.is_dir() {
                return Err(format!(
                    "{} is missing: the queue directory was replaced or its share unmounted",
                    d.display()
                ));
            }
        }
        Ok(())
    })();
    let output = (|| -> Result<(), String> {
        fsx::probe_writable(&core.cfg.output_dir)
            .map_err(|e| format!("output {}: {e}", core.cfg.output_dir.display()))?;
        // Results are committed in these: a file or a missing directory there fails every job.
        for d in [core.output.results_dir(), core.output.tmp_dir()] {
            if !d.is_dir() {
                core.output.init().map_err(|e| {
                    format!("{} is not a usable directory ({e}); move whatever is there away", d.display())
                })?;
            }
        }
        Ok(())
    })();
    let engine = executable(&core.cfg.qemu_img).map_err(|e| format!("qemu-img: {e}"));
    HealthSnapshot {
        queue,
        output,
        engine,
        queue_space: fsx::space(&core.cfg.watch_dir).unwrap_or((0, 0)),
        output_space: fsx::space(&core.cfg.output_dir).unwrap_or((0, 0)),
        probed_at_ms: hyperfarm_shared::queue::now_ms(),
    }
}

/// Probe now and then every [`HEALTH_INTERVAL`], on a thread of its own: however long a probe
/// hangs, it holds that one thread, and [`HealthState::snapshot`] reports it hung. Waits up to
/// [`PROBE_TIMEOUT`] for the first result (the agent claims nothing until it is healthy).
pub async fn start_probe(core: Arc<Core>) {
    let health = core.health.clone();
    if health.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let h2 = health.clone();
    let spawned = std::thread::Builder::new().name("health".into()).spawn(move || {
        loop {
            *h2.probing_since.lock().expect("health lock") = Some(Instant::now());
            let snap = probe(&core);
            h2.set(snap);
            *h2.probing_since.lock().expect("health lock") = None;
            std::thread::sleep(HEALTH_INTERVAL);
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start the health probe: {e}");
        return;
    }
    let t0 = Instant::now();
    while health.snapshot().probed_at_ms == 0 && t0.elapsed() < PROBE_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `program` (a path, or a name looked up in PATH) is an executable file.
pub fn executable(program: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let ok =
        |p: &Path| std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if program.components().count() > 1 {
        return if ok(program) { Ok(()) } else { Err(format!("{} is not an executable file", program.display())) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| ok(&d.join(program))) {
        Ok(())
    } else {
        Err(format!("{} is not on PATH", program.display()))
    }
}

/// The running server, on its own runtime.
#[derive(Debug)]
pub struct GrpcServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<()>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl GrpcServer {
    /// Stop accepting, give streams a moment to end, then stop.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut self.handle).await.is_err() {
            self.handle.abort();
        }
        // Drop stops the runtime.
    }
}

/// An early return (a start-up error after the server started) drops the server inside the
/// agent's runtime, where dropping a runtime would panic: stop it in the background instead.
impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn read_pem(what: &str, p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| Fatal { code: EXIT_CONFIG, message: format!("{what} {}: {e}", p.display()) }.into())
}

/// Start the health probe ([`start_probe`]) and its reporting, and the server (if `listen` is set),
/// the server on a runtime of its own.
pub async fn start(core: Arc<Core>, health: Arc<HealthState>) -> anyhow::Result<Option<GrpcServer>> {
    start_probe(core.clone()).await;
    core.index.start(core.queue.clone(), core.output.clone(), core.cfg.poll_interval);
    let g = core.cfg.grpc.clone();
    let Some(listen) = g.listen else {
        info!("gRPC is off (listen = off); so are the metrics, which it serves");
        spawn_reporter(health, None);
        return Ok(None);
    };
    let policy =
        auth::ControlPolicy::load(g.control_token_file.as_deref(), &g.control_clients, g.control_from_loopback)
            .map_err(|m| Fatal { code: EXIT_CONFIG, message: m })?;
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(64))
        .tcp_nodelay(true);
    let tls = g.tls_cert.is_some();
    let mutual = g.tls_client_ca.is_some();
    if let (Some(cert), Some(key)) = (&g.tls_cert, &g.tls_key) {
        let mut t =
            ServerTlsConfig::new().identity(Identity::from_pem(read_pem("tls_cert", cert)?, read_pem("tls_key", key)?));
        if let Some(ca) = &g.tls_client_ca {
            t = t.client_ca_root(Certificate::from_pem(read_pem("tls_client_ca", ca)?)).client_auth_optional(false);
        }
        builder = builder
            .tls_config(t)
            .map_err(|e| Fatal { code: EXIT_CONFIG, message: format!("TLS configuration: {e}") })?;
    }
    if !conn::is_loopback(listen.ip()) && !tls {
        warn!(%listen, "gRPC listens beyond loopback WITHOUT TLS (insecure_listen): anyone on the network can read job data");
    }
    let listener = std::net::TcpListener::bind(listen).map_err(|e| Fatal {
        code: EXIT_LISTEN,
        message: format!("cannot listen on {listen}: {e}; choose another address with --listen (or --listen off)"),
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let limits = conn::Limits {
        max_connections: conn::budget(g.max_connections, core.cfg.max_concurrent),
        handshake_timeout: g.handshake_timeout,
        idle_timeout: g.idle_timeout,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(API_BLOCKING_THREADS)
        .thread_name("grpc")
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the gRPC runtime: {e}"))?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
    spawn_reporter(health.clone(), Some(reporter));

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(hyperfarm_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| anyhow::anyhow!("reflection: {e}"))?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| anyhow::anyhow!("reflection: {e}"))?;
    let api = service::AgentApi::new(core.clone(), policy, health, tls, mutual);
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AgentServiceServer::new(api));
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    let stats = core.connections.clone();
    let handle = runtime.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("gRPC listener: {e}");
                return;
            }
        };
        let incoming = conn::incoming(listener, limits, stats);
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop2.cancelled()).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    info!(%addr, tls, mutual_tls = mutual, max_connections = limits.max_connections, "gRPC listening");
    if let Some(m) = core.cfg.grpc.metrics_listen {
        crate::metrics::serve(core.clone(), m, runtime.handle());
    }
    Ok(Some(GrpcServer { addr, stop, handle, runtime: Some(runtime) }))
}

/// Tell the health service (and the log) when the probe's verdict changes.
fn spawn_reporter(health: Arc<HealthState>, reporter: Option<tonic_health::server::HealthReporter>) {
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let snap = health.snapshot();
            let serving = snap.serving();
            if last != Some(serving) {
                if serving {
                    info!("health: SERVING");
                } else {
                    let why: Vec<String> =
                        [&snap.queue, &snap.output, &snap.engine].iter().filter_map(|r| (*r).clone().err()).collect();
                    warn!("health: NOT_SERVING: {}", why.join("; "));
                }
                if let Some(r) = &reporter {
                    let st = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
                    r.set_service_status("", st).await;
                    r.set_service_status(SERVICE_NAME, st).await;
                }
                last = Some(serving);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}
