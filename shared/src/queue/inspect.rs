//! Reading the queue without an agent: what `hyperctl queue` and the agent's listing show.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::claim::{LeaseInfo, count_claims, read_lease};
use super::recover::parse_claim_name;
use super::{EVENTS, LEASE, Queue, State, read_names};
use crate::jobid::JobId;
use crate::manifest::Manifest;

/// One job as found on disk.
#[derive(Debug, Clone, Serialize)]
pub struct JobEntry {
    pub id: JobId,
    pub state: State,
    pub dir: PathBuf,
    /// From the manifest (only with details).
    pub vm_name: Option<String>,
    /// The claim token (converting jobs).
    pub token: Option<String>,
    /// The lease (converting jobs, with details).
    pub lease: Option<LeaseInfo>,
    /// How many times it was claimed (with details).
    pub attempts: usize,
    /// Whether it came from a seed-style manifest drop.
    pub seed_drop: bool,
}

/// List the jobs in the given states (all if empty), oldest first. With `details`, each job's
/// manifest, lease and history are read too (one small read each).
pub fn list(queue: &Queue, states: &[State], details: bool) -> io::Result<Vec<JobEntry>> {
    let states: Vec<State> = if states.is_empty() { State::ALL.to_vec() } else { states.to_vec() };
    let mut out = Vec::new();
    for state in states {
        let dir = queue.state_dir(state);
        let names = match read_names(&dir) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for name in names {
            let (id, token) = if state == State::Converting {
                match parse_claim_name(&name) {
                    Some((id, t)) => (id, Some(t.to_string())),
                    None => continue,
                }
            } else {
                match name.parse::<JobId>() {
                    Ok(id) => (id, None),
                    Err(_) => continue,
                }
            };
            let path = dir.join(&name);
            let mut entry = JobEntry {
                id,
                state,
                dir: path.clone(),
                vm_name: None,
                token,
                lease: None,
                attempts: 0,
                seed_drop: false,
            };
            if details {
                entry.vm_name = read_vm_name(&path);
                entry.lease = read_lease(&path.join(LEASE)).ok().and_then(|(_, l)| l);
                entry.attempts = count_claims(&path);
                entry.seed_drop = super::has_origin(&path);
            }
            out.push(entry);
        }
    }
    out.sort_by_key(|e| e.id);
    Ok(out)
}

fn read_vm_name(job_dir: &Path) -> Option<String> {
    let bytes = super::read_manifest(job_dir).ok()?;
    Manifest::parse(&bytes).ok()?.vm_name().map(str::to_string)
}

/// At most this many events of one job are read (a queue writer could plant thousands).
const MAX_EVENTS: usize = 1000;

/// A job's history, oldest first.
pub fn read_events(job_dir: &Path) -> Vec<serde_json::Value> {
    let mut names = read_names(&job_dir.join(EVENTS)).unwrap_or_default();
    names.sort();
    names
        .iter()
        .take(MAX_EVENTS)
        .filter_map(|n| super::read_small(&job_dir.join(EVENTS).join(n)).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// A claim whose lease looks expired.
#[derive(Debug, Clone, Serialize)]
pub struct StaleClaim {
    pub id: JobId,
    pub token: String,
    pub agent: Option<String>,
    pub host: Option<String>,
    /// Seconds since its lease last changed, by the file server's clock.
    pub lease_age_secs: u64,
}

/// Counts and health of a queue, read straight from the shared storage.
#[derive(Debug, Clone, Serialize)]
pub struct QueueSummary {
    pub watch_dir: PathBuf,
    pub counts: BTreeMap<State, usize>,
    /// Age of the oldest queued job, from its id's timestamp, in seconds.
    pub oldest_queued_age_secs: Option<u64>,
    pub oldest_queued: Option<JobId>,
    pub stale_claims: Vec<StaleClaim>,
    /// Entries in `tmp/` (submissions in progress or leftovers).
    pub staging_entries: usize,
    /// `*.json` files waiting at the top level (seed-style drops not yet ingested).
    pub pending_drops: usize,
    /// Entries of the state directories and `tmp/` that are not the protocol's (a job directory
    /// renamed by hand, `queued/<id>.hold`, a file): no agent will ever take them. At most 100.
    pub unknown: Vec<String>,
}

/// Entries in the queue's state directories and `tmp/` that the protocol does not know (placeholders
/// of NFS and FUSE excluded), as `state/name`, at most `max`.
pub fn unknown_entries(queue: &Queue, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    for state in State::ALL {
        let dir = queue.state_dir(state);
        for name in read_names(&dir).unwrap_or_default() {
            let known = if state == State::Converting {
                parse_claim_name(&name).is_some()
            } else {
                name.parse::<JobId>().is_ok() && dir.join(&name).is_dir()
            };
            if !known && !name.starts_with(".hyperfarm-probe-") {
                out.push(format!("{}/{name}", state.dir_name()));
            }
        }
    }
    for name in read_names(&queue.tmp_dir()).unwrap_or_default() {
        let known = name.starts_with(".clock.")
            || name.starts_with('.')
            || super::publish::parse_staging_name(name.trim_end_matches(".seed.json")).is_some();
        if !known {
            out.push(format!("tmp/{name}"));
        }
    }
    out.sort();
    out.truncate(max);
    out
}

/// Summarise the queue. A claim is reported stale when its lease file's timestamp is older than
/// `lease_timeout` by the file server's clock.
pub fn summarize(queue: &Queue, lease_timeout: Duration) -> io::Result<QueueSummary> {
    let jobs = list(queue, &[], false)?;
    let mut counts: BTreeMap<State, usize> = State::ALL.iter().map(|s| (*s, 0)).collect();
    for j in &jobs {
        *counts.entry(j.state).or_default() += 1;
    }
    let oldest = jobs.iter().filter(|j| j.state == State::Queued).map(|j| j.id).min();
    let now_ms = super::now_ms();
    let server_now = super::server_now(&queue.tmp_dir()).ok();
    let mut stale_claims = Vec::new();
    for j in jobs.iter().filter(|j| j.state == State::Converting) {
        let lease_path = j.dir.join(LEASE);
        let mtime = fs::metadata(&lease_path).or_else(|_| fs::metadata(&j.dir)).and_then(|m| m.modified());
        let age = match (server_now, mtime) {
            (Some(now), Ok(m)) => now.duration_since(m).unwrap_or_default(),
            _ => Duration::ZERO,
        };
        if age >= lease_timeout {
            let lease = read_lease(&lease_path).ok().and_then(|(_, l)| l);
            stale_claims.push(StaleClaim {
                id: j.id,
                token: j.token.clone().unwrap_or_default(),
                agent: lease.as_ref().map(|l| l.agent.clone()),
                host: lease.as_ref().map(|l| l.host.clone()),
                lease_age_secs: age.as_secs(),
            });
        }
    }
    let staging_entries = read_names(&queue.tmp_dir())
        .map(|n| {
            n.iter()
                .filter(|n| {
                    !n.starts_with('.')
                        && super::publish::parse_staging_name(n.trim_end_matches(".seed.json")).is_some()
                })
                .count()
        })
        .unwrap_or(0);
    let pending_drops = read_names(queue.root())
        .map(|n| n.iter().filter(|n| !n.starts_with('.') && n.to_ascii_lowercase().ends_with(".json")).count())
        .unwrap_or(0);
    Ok(QueueSummary {
        watch_dir: queue.root().to_path_buf(),
        counts,
        oldest_queued_age_secs: oldest.map(|id| now_ms.saturating_sub(id.created_ms()) / 1000),
        oldest_queued: oldest,
        stale_claims,
        staging_entries,
        pending_drops,
        unknown: unknown_entries(queue, 100),
    })
}
