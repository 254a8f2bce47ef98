//! `hyperctl daemon status|list`: agents and their state, from gRPC, and from systemd for local
//! instances that do not answer. The seed's columns (instance, service, status, PID, uptime,
//! watch and output directories) and more.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use hyperfarm_proto::client::AgentEndpoint;
use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::instance;

use crate::{Cli, CtlError, DaemonOp, EXIT_UNREACHABLE, endpoints, print_json, systemd, table};

/// One agent, as `--json` prints it (stable: fields are only ever added).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AgentRow {
    pub instance: String,
    /// The systemd unit of the instance.
    pub service: String,
    /// `running` (answers gRPC), or the unit's state (`active`, `inactive`, `failed`, …), or
    /// `unreachable`.
    pub status: String,
    /// Health: directories writable and an engine usable (gRPC only).
    pub serving: Option<bool>,
    pub pid: Option<u32>,
    pub uptime_seconds: Option<u64>,
    pub host: Option<String>,
    pub url: Option<String>,
    pub version: Option<String>,
    pub watch_dir: Option<String>,
    pub output_dir: Option<String>,
    pub queued: Option<u64>,
    pub converting: Option<u64>,
    pub failed: Option<u64>,
    pub running_jobs: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub engines: Vec<String>,
    /// Where the row came from: `grpc` or `systemd`.
    pub source: String,
    /// Why gRPC did not answer.
    pub error: Option<String>,
    /// Queue scans since the agent started.
    pub scans: Option<u64>,
    /// When the agent last read the queue from the shared storage (ms since the epoch): its
    /// listings are served from memory, so an old time means the share does not answer.
    pub queue_as_of_ms: Option<u64>,
    /// gRPC connections open, and the most the agent accepts.
    pub connections: Option<u32>,
    pub max_connections: Option<u32>,
}

fn row_from_status(url: &str, s: &pb::AgentStatus) -> AgentRow {
    let depth = s.queue_depth.unwrap_or_default();
    AgentRow {
        instance: s.instance.clone(),
        service: instance::unit_name(Some(&s.instance)),
        status: if s.shutting_down { "stopping".into() } else { "running".into() },
        serving: Some(s.serving),
        pid: Some(s.pid),
        uptime_seconds: Some(s.uptime_seconds),
        host: Some(s.host.clone()),
        url: Some(url.to_string()),
        version: Some(s.version.clone()),
        watch_dir: Some(s.watch_dir.clone()),
        output_dir: Some(s.output_dir.clone()),
        queued: Some(depth.queued),
        converting: Some(depth.converting),
        failed: Some(depth.failed),
        running_jobs: Some(s.running.len() as u32),
        max_concurrent: Some(s.max_concurrent),
        engines: s.engines.iter().filter(|e| e.available).map(|e| e.name.clone()).collect(),
        source: "grpc".into(),
        error: None,
        scans: Some(s.scans),
        queue_as_of_ms: Some(s.queue_as_of_ms),
        connections: Some(s.connections),
        max_connections: Some(s.max_connections),
    }
}

/// The listen address and directories an instance's config file declares (for local instances
/// that do not answer).
fn local_config(name: &str) -> (Option<String>, PathBuf, PathBuf) {
    let file = instance::config_file(Some(name));
    let v: Option<toml::Table> = std::fs::read_to_string(&file).ok().and_then(|t| t.parse().ok());
    let get = |k: &str| v.as_ref().and_then(|t| t.get(k)).and_then(|x| x.as_str()).map(str::to_string);
    let listen = get("listen").unwrap_or_else(|| "127.0.0.1:50071".into());
    let url = (!matches!(listen.as_str(), "off" | "none")).then(|| {
        let tls = get("tls_cert").is_some();
        format!("{}://{listen}", if tls { "https" } else { "http" })
    });
    let watch = get("watch_dir").map(PathBuf::from).unwrap_or_else(|| instance::watch_dir(Some(name)));
    let output = get("output_dir").map(PathBuf::from).unwrap_or_else(|| instance::output_dir(Some(name)));
    (url, watch, output)
}

/// Gather every agent we know of.
pub async fn gather(cli: &Cli) -> Result<Vec<AgentRow>, CtlError> {
    let mut rows: Vec<AgentRow> = Vec::new();
    let mut urls_seen = Vec::new();
    for (name, ep) in endpoints(cli)? {
        urls_seen.push(ep.url.clone());
        rows.push(match ep.status().await {
            Ok(s) => row_from_status(&ep.url, &s),
            Err(e) => AgentRow {
                instance: name.clone().unwrap_or_else(|| "?".into()),
                service: name.as_deref().map(|n| instance::unit_name(Some(n))).unwrap_or_default(),
                status: "unreachable".into(),
                url: Some(ep.url.clone()),
                source: "grpc".into(),
                error: Some(e),
                ..Default::default()
            },
        });
    }
    // Local instances systemd knows: fill in (or add) what gRPC could not say.
    if let Ok(units) = systemd::agent_units().await {
        for unit in units {
            let Some(name) = systemd::instance_of(&unit) else { continue };
            let Ok(state) = systemd::show(&unit).await else { continue };
            let (url, watch, output) = local_config(&name);
            if let Some(r) =
                rows.iter_mut().find(|r| r.instance == name && r.source == "grpc" && r.status != "unreachable")
            {
                r.service = unit.clone();
                continue;
            }
            let mut grpc_error = None;
            if let Some(u) = &url
                && !urls_seen.contains(u)
            {
                let ep = AgentEndpoint { connect_timeout: Duration::from_secs(2), ..AgentEndpoint::new(u.clone()) };
                match ep.status().await {
                    Ok(s) => {
                        let mut r = row_from_status(u, &s);
                        r.service = unit.clone();
                        rows.push(r);
                        continue;
                    }
                    Err(e) => grpc_error = Some(e),
                }
            }
            rows.retain(|r| !(r.status == "unreachable" && url.as_deref() == r.url.as_deref()));
            rows.push(AgentRow {
                instance: name,
                service: unit,
                status: format!("{} ({})", state.active_state, state.sub_state),
                serving: None,
                pid: state.main_pid,
                uptime_seconds: state.uptime_seconds,
                host: Some(hyperfarm_shared::fsx::hostname()),
                url,
                version: None,
                watch_dir: Some(watch.display().to_string()),
                output_dir: Some(output.display().to_string()),
                source: "systemd".into(),
                error: grpc_error,
                ..Default::default()
            });
        }
    }
    Ok(rows)
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

pub async fn run(cli: &Cli, op: &DaemonOp) -> Result<(), CtlError> {
    let mut rows = gather(cli).await?;
    if let DaemonOp::Status { instance: Some(name) } = op {
        rows.retain(|r| &r.instance == name);
        if rows.is_empty() {
            return Err(crate::err(
                crate::EXIT_NOT_FOUND,
                format!("no agent instance {name:?} answers or is known to systemd here"),
            ));
        }
    }
    if cli.json {
        print_json(&rows);
    } else {
        match op {
            DaemonOp::List => table::print(
                &["INSTANCE", "SERVICE", "STATUS", "PID", "UPTIME", "QUEUED", "RUNNING", "WATCH-DIR", "OUTPUT-DIR"],
                &rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.instance.clone(),
                            r.service.clone(),
                            status_word(r),
                            opt(&r.pid),
                            r.uptime_seconds.map(table::duration).unwrap_or_else(|| "-".into()),
                            opt(&r.queued),
                            r.running_jobs
                                .map(|n| format!("{n}/{}", opt(&r.max_concurrent)))
                                .unwrap_or_else(|| "-".into()),
                            opt(&r.watch_dir),
                            opt(&r.output_dir),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ),
            DaemonOp::Status { .. } => {
                for r in &rows {
                    println!("{} ({})", r.instance, r.service);
                    println!("  status:     {}", status_word(r));
                    println!("  pid:        {}", opt(&r.pid));
                    println!("  uptime:     {}", r.uptime_seconds.map(table::duration).unwrap_or_else(|| "-".into()));
                    println!("  host:       {}", opt(&r.host));
                    println!("  url:        {}", opt(&r.url));
                    println!("  version:    {}", opt(&r.version));
                    println!("  watch dir:  {}", opt(&r.watch_dir));
                    println!("  output dir: {}", opt(&r.output_dir));
                    println!(
                        "  queue:      {} queued, {} converting, {} failed",
                        opt(&r.queued),
                        opt(&r.converting),
                        opt(&r.failed)
                    );
                    println!("  engines:    {}", if r.engines.is_empty() { "-".into() } else { r.engines.join(", ") });
                    if let Some(e) = &r.error {
                        println!("  gRPC:       {e}");
                    }
                }
            }
        }
    }
    if rows.iter().all(|r| r.status == "unreachable") {
        return Err(crate::err(EXIT_UNREACHABLE, "no agent answered"));
    }
    Ok(())
}

fn status_word(r: &AgentRow) -> String {
    match r.serving {
        Some(true) => format!("{} (serving)", r.status),
        Some(false) => format!("{} (NOT serving)", r.status),
        None => r.status.clone(),
    }
}
