//! The agent's gRPC server: `hyperfarm.v1.AgentService`, the standard health service
//! (`grpc.health.v1`) and server reflection (v1 and v1alpha, for grpcurl and friends).
//!
//! Beyond loopback the server requires TLS (mutual TLS with `tls_client_ca`) or an explicit
//! `insecure_listen`. The server runs on the agent's runtime; it never touches the shared storage
//! from its own tasks (all file I/O goes to blocking threads), so a hung NFS mount cannot stop it
//! from answering.

pub mod auth;
pub mod jobs;
pub mod service;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// The last health probe.
#[derive(Debug, Clone)]
pub struct HealthSnapshot {
    pub queue: Result<(), String>,
    pub output: Result<(), String>,
    pub engine: Result<(), String>,
}

impl HealthSnapshot {
    pub fn serving(&self) -> bool {
        self.queue.is_ok() && self.output.is_ok() && self.engine.is_ok()
    }
}

/// Shared between the probe task, the service and the rest of the agent.
#[derive(Debug)]
pub struct HealthState {
    inner: Mutex<HealthSnapshot>,
}

impl Default for HealthState {
    fn default() -> Self {
        let pending = || Err("not probed yet".to_string());
        HealthState { inner: Mutex::new(HealthSnapshot { queue: pending(), output: pending(), engine: pending() }) }
    }
}

impl HealthState {
    pub fn snapshot(&self) -> HealthSnapshot {
        self.inner.lock().expect("health lock").clone()
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
    let output =
        fsx::probe_writable(&core.cfg.output_dir).map_err(|e| format!("output {}: {e}", core.cfg.output_dir.display()));
    let engine = executable(&core.cfg.qemu_img).map_err(|e| format!("qemu-img: {e}"));
    HealthSnapshot { queue, output, engine }
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

/// The running server.
#[derive(Debug)]
pub struct GrpcServer {
    pub addr: SocketAddr,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

impl GrpcServer {
    /// Stop accepting, give streams a moment to end, then stop.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut handle = self.handle;
        if tokio::time::timeout(Duration::from_secs(2), &mut handle).await.is_err() {
            handle.abort();
        }
    }
}

fn read_pem(what: &str, p: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| Fatal { code: EXIT_CONFIG, message: format!("{what} {}: {e}", p.display()) }.into())
}

/// Start the server (if `listen` is set) and the health probe (after a first, synchronous probe:
/// the agent claims nothing while it is not healthy).
pub async fn start(core: Arc<Core>, health: Arc<HealthState>) -> anyhow::Result<Option<GrpcServer>> {
    let c = core.clone();
    if let Ok(Ok(first)) = tokio::time::timeout(PROBE_TIMEOUT, tokio::task::spawn_blocking(move || probe(&c))).await {
        health.set(first);
    }
    let g = core.cfg.grpc.clone();
    let Some(listen) = g.listen else {
        info!("gRPC is off (listen = off)");
        spawn_probe(core, health, None);
        return Ok(None);
    };
    let policy =
        auth::ControlPolicy::load(g.control_token_file.as_deref(), &g.control_clients, g.control_from_loopback)
            .map_err(|m| Fatal { code: EXIT_CONFIG, message: m })?;
    let mut builder = Server::builder().http2_keepalive_interval(Some(Duration::from_secs(20))).tcp_nodelay(true);
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
    if !listen.ip().is_loopback() && !tls {
        warn!(%listen, "gRPC listens beyond loopback WITHOUT TLS (insecure_listen): anyone on the network can read job data");
    }
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| Fatal {
        code: EXIT_LISTEN,
        message: format!("cannot listen on {listen}: {e}; choose another address with --listen (or --listen off)"),
    })?;
    let addr = listener.local_addr()?;

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    reporter.set_service_status(SERVICE_NAME, ServingStatus::NotServing).await;
    spawn_probe(core.clone(), health.clone(), Some(reporter));

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
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let handle = tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop2.cancelled()).await {
            tracing::error!("gRPC server stopped: {e}");
        }
    });
    info!(%addr, tls, mutual_tls = mutual, "gRPC listening");
    Ok(Some(GrpcServer { addr, stop, handle }))
}

fn spawn_probe(core: Arc<Core>, health: Arc<HealthState>, reporter: Option<tonic_health::server::HealthReporter>) {
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let c = core.clone();
            let snap = match tokio::time::timeout(PROBE_TIMEOUT, tokio::task::spawn_blocking(move || probe(&c))).await {
                Ok(Ok(s)) => s,
                _ => {
                    let hung = || {
                        Err(format!(
                            "the health probe took longer than {}s (is the share hung?)",
                            PROBE_TIMEOUT.as_secs()
                        ))
                    };
                    HealthSnapshot { queue: hung(), output: hung(), engine: Ok(()) }
                }
            };
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
            health.set(snap);
            tokio::time::sleep(HEALTH_INTERVAL).await;
        }
    });
}
