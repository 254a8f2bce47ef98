//! `/metrics` of `hyperexport serve` (Prometheus text format), on serve's own HTTP listener.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::db::Db;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabel {
    dir: String,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    jobs: Family<StateLabel, Gauge>,
    finished: Family<ResultLabel, Counter>,
    duration: Histogram,
    pub running: Gauge,
    pub exported_bytes: Counter,
    pub sse_clients: Gauge,
    pub http_connections: Gauge,
    storage_ok: Family<DirLabel, Gauge>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("hyperexport")),
            jobs: Family::default(),
            finished: Family::default(),
            // 1 s … ~4.5 h
            duration: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            running: Gauge::default(),
            exported_bytes: Counter::default(),
            sse_clients: Gauge::default(),
            http_connections: Gauge::default(),
            storage_ok: Family::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register("jobs", "Jobs in serve's history, by state", m.jobs.clone());
            r.register("jobs_finished", "Jobs that ended since serve started, by result", m.finished.clone());
            r.register(
                "job_duration_seconds",
                "Start to end of jobs (export, queue and conversion)",
                m.duration.clone(),
            );
            r.register("exports_running", "hyperexport processes running now", m.running.clone());
            r.register(
                "exported_bytes",
                "Bytes of disks copied into the queue (holes included)",
                m.exported_bytes.clone(),
            );
            r.register("sse_clients", "Browsers following live updates", m.sse_clients.clone());
            r.register("http_connections", "Open HTTP connections", m.http_connections.clone());
            r.register(
                "storage_ok",
                "1 when the queue (watch) and output directories are usable",
                m.storage_ok.clone(),
            );
        }
        m
    }

    pub fn job_ended(&self, result: &str, took: Duration) {
        self.finished.get_or_create(&ResultLabel { result: result.to_string() }).inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn render(&self, db: &Db, storage: &[(&str, bool)]) -> String {
        let counts = db.counts().unwrap_or_default();
        for st in super::jobs::ALL_STATES {
            let n = counts.iter().find(|(s, _)| s == st).map(|(_, n)| *n).unwrap_or(0);
            self.jobs.get_or_create(&StateLabel { state: st.to_string() }).set(n);
        }
        for (dir, ok) in storage {
            self.storage_ok.get_or_create(&DirLabel { dir: dir.to_string() }).set(i64::from(*ok));
        }
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
