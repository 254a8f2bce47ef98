//! Is there an agent to hand the job to, and how do we follow it? Replaces the seed's local-only
//! `systemctl is-active`, which made a two-host farm silently convert on the export host:
//!
//! 1. the agent named with `--agent` (or `agent_url`) answers over gRPC → follow it live;
//! 2. else an agent registered in the queue (`<watch-dir>/.agents/`, written by every running
//!    agent with the address it can be reached at) answers → follow it live;
//! 3. else a local agent on the default address answers → follow it live;
//! 4. else, when the user named the queue (`--hyper2kvm-watch-dir` or `watch_dir` in the
//!    configuration: they asked for the farm), or an agent is registered in it (alive, but its gRPC
//!    port blocked), or the local systemd unit is active → submit to the queue and follow by
//!    polling the output directory (returning to gRPC when an agent answers again);
//! 5. only when none of that holds — no queue named, no agent anywhere — convert here (direct
//!    mode), with a warning that says why (the seed's rule).
//!
//! The instance name selects both the unit and the directories (`hyperfarm_shared::instance`).

use std::path::Path;
use std::time::Duration;

use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::queue::{Queue, agents};

use hyperfarm_proto::client::AgentEndpoint;

#[derive(Debug)]
pub enum Detected {
    /// This agent answers over gRPC.
    Grpc(AgentEndpoint, Box<pb::AgentStatus>),
    /// Daemon mode, followed by polling: why no gRPC.
    Poll { why: String },
    /// No farm here: convert on this host.
    Nothing { why: String },
}

/// What the exporter knows to look for an agent.
#[derive(Debug, Clone)]
pub struct Lookup<'a> {
    /// `--agent`/`agent_url`, or the default local address.
    pub agent: &'a AgentEndpoint,
    pub agent_explicit: bool,
    pub instance: Option<&'a str>,
    pub watch_dir: &'a Path,
    /// The user named the queue: they asked for the farm.
    pub queue_named: bool,
}

/// Agents registered in the queue, fresh ones first: their endpoints (TLS settings from `base`).
pub async fn registered(watch_dir: &Path, base: &AgentEndpoint) -> (Vec<AgentEndpoint>, usize) {
    let q = Queue::new(watch_dir);
    let found = tokio::task::spawn_blocking(move || {
        let now = hyperfarm_shared::queue::server_now(&q.tmp_dir()).ok();
        agents::list(&q, now).unwrap_or_default()
    });
    let found = match tokio::time::timeout(Duration::from_secs(10), found).await {
        Ok(Ok(f)) => f,
        _ => return (Vec::new(), 0),
    };
    let fresh: Vec<_> = found.into_iter().filter(|f| f.fresh()).collect();
    let n = fresh.len();
    // An agent on this very host may be reached on loopback; others at their advertised address.
    let me = hyperfarm_shared::fsx::host_id();
    let eps = fresh
        .into_iter()
        .filter_map(|f| if f.reg.host_id == me { f.reg.local_url.or(f.reg.advertise_url) } else { f.reg.advertise_url })
        .map(|url| AgentEndpoint { url, token: None, ..base.clone() })
        .collect();
    (eps, n)
}

/// Whether two paths on this host name the same directory (same device and inode).
fn same_dir(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Find an agent to follow, or decide how to go on without one.
pub async fn detect(l: &Lookup<'_>) -> Detected {
    let mut tried: Vec<String> = Vec::new();
    if l.agent_explicit {
        match l.agent.status().await {
            Ok(s) => return Detected::Grpc(l.agent.clone(), Box::new(s)),
            Err(e) => tried.push(format!("{} ({e})", l.agent.url)),
        }
    }
    let (eps, registered_alive) = registered(l.watch_dir, l.agent).await;
    for ep in eps {
        match ep.status().await {
            Ok(s) => return Detected::Grpc(ep, Box::new(s)),
            Err(e) => tried.push(format!("{} ({e})", ep.url)),
        }
    }
    if !l.agent_explicit {
        match l.agent.status().await {
            // A local agent that watches another queue (e.g. the packaged default instance on an
            // export host whose jobs go to a shared queue) would never see this job.
            Ok(s) if !same_dir(Path::new(&s.watch_dir), l.watch_dir) => tried.push(format!(
                "{} (watches another queue: {})",
                l.agent.url,
                hyperfarm_shared::text::escape(&s.watch_dir)
            )),
            Ok(s) => return Detected::Grpc(l.agent.clone(), Box::new(s)),
            Err(e) => tried.push(format!("{} ({e})", l.agent.url)),
        }
    }
    let tried = if tried.is_empty() { "no agent address known".to_string() } else { tried.join("; ") };
    if l.queue_named {
        return Detected::Poll {
            why: format!("no agent answered over gRPC ({tried}); the queue was named, so the job goes to it"),
        };
    }
    if registered_alive > 0 {
        return Detected::Poll {
            why: format!(
                "{registered_alive} agent(s) are registered in the queue but none answered over gRPC ({tried})"
            ),
        };
    }
    let unit = hyperfarm_shared::instance::unit_name(l.instance);
    match unit_state(&unit).await {
        Ok(state) if state == "active" => {
            Detected::Poll { why: format!("no agent answered over gRPC ({tried}) but the unit {unit} is active") }
        }
        Ok(state) => Detected::Nothing {
            why: format!(
                "no queue was named, no agent is registered in {} and none answered ({tried}); the unit {unit} is {state}",
                l.watch_dir.display()
            ),
        },
        Err(e) => Detected::Nothing {
            why: format!(
                "no queue was named, no agent is registered in {} and none answered ({tried}); systemd could not be asked about {unit} ({e})",
                l.watch_dir.display()
            ),
        },
    }
}

/// `systemctl is-active UNIT`: its one-word answer (active, inactive, failed, activating …).
pub async fn unit_state(unit: &str) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("systemctl").args(["is-active", "--", unit]).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| "systemctl did not answer within 5s".to_string())?
    .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let word = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if word.is_empty() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(word)
}
