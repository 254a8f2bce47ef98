//! Prometheus metrics (`GET /metrics`, text exposition format) on a listener of their own,
//! served by the API runtime: a scraper, like a gRPC client, never takes the threads that
//! claiming, heartbeats and signals need, and a scrape never reads the shared storage (queue
//! depths come from the in-memory listing, `index.rs`).
//!
//! Metrics carry no job names, VM names or paths: only counts, sizes and durations.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::agent::Core;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabel {
    pub dir: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabel {
    pub version: String,
    /// Not `instance`: Prometheus gives that name to the scrape target.
    pub agent_instance: String,
}

/// The agent's metrics. Counters and histograms are updated where things happen; gauges are
/// read from the agent's in-memory state at each scrape.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Virtual bytes of the disks this agent converted and published.
    pub converted_bytes: Counter,
    /// Jobs this agent ended, by result (done, failed, cancelled).
    pub finished: Family<ResultLabel, Counter>,
    /// Claim to published result, jobs that ended done.
    pub conversion_seconds: Histogram,
    /// Submission (the job id's time) to the first claim.
    pub queue_wait_seconds: Histogram,
    /// Stale claims (a dead agent's) this agent recovered.
    pub lease_recoveries: Counter,
    /// Jobs failed because a disk did not match its digest.
    pub verification_failures: Counter,
    jobs: Family<StateLabel, Gauge>,
    in_progress: Gauge,
    max_concurrent: Gauge,
    storage_ok: Family<DirLabel, Gauge>,
    grpc_connections: Gauge,
    info: Family<InfoLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("hyperfarm")),
            converted_bytes: Counter::default(),
            finished: Family::default(),
            // 1 s … ~4.5 h
            conversion_seconds: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            // 0.1 s … ~55 min
            queue_wait_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 16)),
            lease_recoveries: Counter::default(),
            verification_failures: Counter::default(),
            jobs: Family::default(),
            in_progress: Gauge::default(),
            max_concurrent: Gauge::default(),
            storage_ok: Family::default(),
            grpc_connections: Gauge::default(),
            info: Family::default(),
        };
        {
            let mut r = m.registry.lock().expect("metrics lock");
            r.register("converted_bytes", "Virtual bytes of disks converted and published", m.converted_bytes.clone());
            r.register("jobs_finished", "Jobs this agent ended, by result", m.finished.clone());
            r.register(
                "conversion_duration_seconds",
                "Claim to published result of jobs that ended done",
                m.conversion_seconds.clone(),
            );
            r.register("queue_wait_seconds", "Submission to first claim", m.queue_wait_seconds.clone());
            r.register("lease_recoveries", "Stale claims of dead agents recovered", m.lease_recoveries.clone());
            r.register(
                "verification_failures",
                "Jobs failed because a disk did not match its digest",
                m.verification_failures.clone(),
            );
            r.register("jobs", "Jobs in the queue by state (the agent's in-memory listing)", m.jobs.clone());
            r.register("conversions_in_progress", "Jobs this agent is converting now", m.in_progress.clone());
            r.register("max_concurrent", "Jobs this agent converts at once at most", m.max_concurrent.clone());
            r.register(
                "storage_ok",
                "1 when the directory (queue, output) is usable and the engine runs, per the last health probe",
                m.storage_ok.clone(),
            );
            r.register("grpc_connections", "Open gRPC connections", m.grpc_connections.clone());
            r.register("agent_info", "The agent's version and instance", m.info.clone());
        }
        m
    }

    /// Count a job's end (`run_claimed`).
    pub fn job_ended(
        &self,
        result: &str,
        started_at_ms: u64,
        finished_at_ms: u64,
        virtual_bytes: u64,
        digest_mismatch: bool,
    ) {
        self.finished.get_or_create(&ResultLabel { result: result.to_string() }).inc();
        if result == "done" {
            self.converted_bytes.inc_by(virtual_bytes);
            self.conversion_seconds.observe(finished_at_ms.saturating_sub(started_at_ms) as f64 / 1000.0);
        }
        if digest_mismatch {
            self.verification_failures.inc();
        }
    }

    /// The exposition text, gauges read from `core` now (memory only).
    pub fn render(&self, core: &Core) -> String {
        let counts = core.index.counts();
        for (i, state) in ["queued", "converting", "done", "failed", "cancelled"].iter().enumerate() {
            self.jobs.get_or_create(&StateLabel { state: state.to_string() }).set(counts[i] as i64);
        }
        self.in_progress.set(core.running_count() as i64);
        self.max_concurrent.set(core.cfg.max_concurrent as i64);
        let h = core.health.snapshot();
        for (dir, ok) in [("queue", h.queue.is_ok()), ("output", h.output.is_ok()), ("engine", h.engine.is_ok())] {
            self.storage_ok.get_or_create(&DirLabel { dir: dir.into() }).set(i64::from(ok));
        }
        self.grpc_connections.set(core.connections.open.load(std::sync::atomic::Ordering::Relaxed) as i64);
        self.info
            .get_or_create(&InfoLabel {
                version: env!("CARGO_PKG_VERSION").into(),
                agent_instance: core.cfg.instance.clone(),
            })
            .set(1);
        let mut out = String::new();
        let r = self.registry.lock().expect("metrics lock");
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// Connections served at once; more are closed on accept (a flood of idle connections costs at
/// most this many descriptors, as with gRPC's `max_connections`).
pub const MAX_CONNECTIONS: usize = 16;
/// A connection must send its request headers within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// And is closed after this, whatever it does (one request per connection).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// Serve `/metrics` on `addr` from the API runtime. A listen failure is logged, not fatal:
/// conversions never stop for want of metrics. Returns the bound address.
pub fn serve(core: Arc<Core>, addr: SocketAddr, rt: &tokio::runtime::Handle) -> Option<SocketAddr> {
    let listener = match std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, "metrics are off: cannot listen on {addr}: {e}; set another metrics_listen (or off)");
            return None;
        }
    };
    let bound = listener.local_addr().ok()?;
    rt.spawn(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!("metrics listener: {e}");
                return;
            }
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: wait instead of spinning.
                    warn!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let core = core.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let core = core.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&core, req.method(), req.uri().path())) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            });
        }
    });
    info!(addr = %bound, "metrics listening (GET /metrics)");
    Some(bound)
}

fn respond(core: &Core, method: &hyper::Method, path: &str) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, ctype, body) = match (method, path) {
        (&hyper::Method::GET, "/metrics") => {
            (hyper::StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", core.metrics.render(core))
        }
        _ => (hyper::StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "only GET /metrics is served here\n".into()),
    };
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_are_encoded_in_the_exposition_format() {
        let m = Metrics::new();
        m.job_ended("done", 1_000, 5_500, 4096, false);
        m.job_ended("failed", 1_000, 2_000, 4096, true);
        m.queue_wait_seconds.observe(0.25);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry.lock().expect("lock")).expect("encode");
        assert!(out.contains("hyperfarm_converted_bytes_total 4096"), "{out}");
        assert!(out.contains("hyperfarm_jobs_finished_total{result=\"done\"} 1"), "{out}");
        assert!(out.contains("hyperfarm_jobs_finished_total{result=\"failed\"} 1"), "{out}");
        assert!(out.contains("hyperfarm_verification_failures_total 1"), "{out}");
        assert!(out.contains("hyperfarm_conversion_duration_seconds_sum 4.5"), "{out}");
        assert!(out.contains("hyperfarm_queue_wait_seconds_bucket{le=\"0.4\"} 1"), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
    }
}
