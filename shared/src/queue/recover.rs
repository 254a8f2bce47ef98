//! Recovering jobs whose agent died or stalled, and cleaning the staging area.
//!
//! A claim is stale when its lease stops changing for the lease timeout, measured by the observer's
//! own monotonic clock (no clocks of two hosts are ever compared), or at once when the lease file's
//! server timestamp is older than the timeout by the server's own clock, or — for a lease of this
//! very host — when its process or boot is gone or its lock is free.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::claim::{read_lease, record_event};
use super::{LEASE, Queue, State, read_names};
use crate::fsx::{self, Moved};
use crate::jobid::JobId;

/// What we concluded about a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Stale, with the reason (for the log and the job's history).
    Stale(String),
}

/// Remembers, per claim, when its lease last changed.
#[derive(Debug)]
pub struct LeaseTracker {
    timeout: Duration,
    seen: HashMap<String, (Vec<u8>, Instant)>,
    host: String,
    host_id: String,
    boot_id: String,
}

impl LeaseTracker {
    pub fn new(timeout: Duration) -> Self {
        LeaseTracker {
            timeout,
            seen: HashMap::new(),
            host: fsx::hostname(),
            host_id: fsx::host_id(),
            boot_id: fsx::boot_id(),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Judge the claim `converting/<name>`. `server_now` is the file server's clock (see
    /// [`super::server_now`]); without it only the observer's clock is used.
    pub fn assess(&mut self, queue: &Queue, name: &str, server_now: Option<SystemTime>) -> Liveness {
        self.assess_at(queue, name, server_now, Instant::now())
    }

    /// [`Self::assess`] with the observer's clock given.
    pub fn assess_at(&mut self, queue: &Queue, name: &str, server_now: Option<SystemTime>, now: Instant) -> Liveness {
        let dir = queue.state_dir(State::Converting).join(name);
        let lease_path = dir.join(LEASE);
        let (content, mtime) = match read_lease(&lease_path) {
            Ok((bytes, info)) => {
                // "This host" by identity (host name and machine id), never by host name alone:
                // two hosts sharing a name must not judge each other's live claims dead.
                let this_host = |i: &super::claim::LeaseInfo| {
                    if i.host_id.is_empty() { i.host == self.host } else { i.host_id == self.host_id }
                };
                if let Some(info) = &info
                    && this_host(info)
                {
                    if !info.boot_id.is_empty() && info.boot_id != self.boot_id {
                        return Liveness::Stale(format!(
                            "its agent {} (pid {}) ran before this host rebooted",
                            info.agent, info.pid
                        ));
                    }
                    if !fsx::pid_alive(info.pid) {
                        return Liveness::Stale(format!(
                            "its agent {} (pid {}) on this host is gone",
                            info.agent, info.pid
                        ));
                    }
                    if let Ok(f) = fsx::open_regular(&lease_path)
                        && f.try_lock().is_ok()
                    {
                        let who = if info.pid == std::process::id() {
                            "it names this agent's pid, but this agent does not work on it: its job ended without leaving converting/ (see the log above), or the pid was reused after a restart".to_string()
                        } else {
                            format!("pid {} is another process now", info.pid)
                        };
                        return Liveness::Stale(format!("nobody holds its lease lock ({who})"));
                    }
                }
                (bytes, fs::metadata(&lease_path).and_then(|m| m.modified()).ok())
            }
            // No lease yet: the claimer died between the rename and writing its lease, or is
            // writing it now. Judge by the directory. A "lease" that is not a regular file (a
            // FIFO, a device, a symlink planted by a queue writer) or is too large is no lease
            // either: judged the same way, it is recovered like any dead claim.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData
                ) =>
            {
                (Vec::new(), fs::metadata(&dir).and_then(|m| m.modified()).ok())
            }
            // Unreadable now (ESTALE, EIO): no conclusion this time.
            Err(_) => return Liveness::Alive,
        };
        match self.seen.get_mut(name) {
            Some((last, since)) if *last == content => {
                let idle = now.duration_since(*since);
                if idle >= self.timeout {
                    return Liveness::Stale(format!(
                        "its lease did not change for {}s (timeout {}s)",
                        idle.as_secs(),
                        self.timeout.as_secs()
                    ));
                }
            }
            Some(entry) => *entry = (content, now),
            None => {
                self.seen.insert(name.to_string(), (content, now));
                if let (Some(server_now), Some(mtime)) = (server_now, mtime)
                    && let Ok(age) = server_now.duration_since(mtime)
                    && age >= self.timeout
                {
                    return Liveness::Stale(format!(
                        "its lease was last refreshed {}s ago by the file server's clock (timeout {}s)",
                        age.as_secs(),
                        self.timeout.as_secs()
                    ));
                }
            }
        }
        Liveness::Alive
    }

    /// Forget claims that are no longer in `converting/`.
    pub fn retain(&mut self, present: &HashSet<String>) {
        self.seen.retain(|k, _| present.contains(k));
    }
}

/// What recovery did with a stale claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoverAction {
    /// Back in `queued/` for another attempt.
    Requeued { attempts: usize },
    /// Too many deaths: moved to `failed/`; the caller publishes the error result. `attempts`:
    /// deaths counted against the job; `deaths`: all.
    Failed { attempts: usize, deaths: usize },
    /// Someone had asked for it to be cancelled: moved to `cancelled/` (the request is honoured,
    /// not forgotten on the way back to the queue); the caller publishes the cancelled result.
    Cancelled { reason: String },
    /// Someone else recovered or finished it first.
    Gone,
}

/// Take a stale claim `converting/<id>@<token>` back: to `queued/`, or to `failed/` once the job
/// has been the death of its agents too often (a job that kills its agent must not do so for ever).
///
/// Which deaths count against the job: only those of an agent that was running this job alone
/// (its last heartbeat says so), because a death while it ran several jobs says nothing about any
/// one of them — on a farm the likely killers are outside (an operator, the OOM killer, a watchdog
/// firing on a hung share). `max_attempts` counted deaths fail the job; so do `10 × max_attempts`
/// deaths of any kind (a job whose agents keep dying, whatever the cause, is surfaced rather than
/// retried for ever). A graceful requeue never counts. Exactly one recoverer wins the rename.
pub fn recover_claim(queue: &Queue, name: &str, why: &str, max_attempts: usize) -> io::Result<RecoverAction> {
    let Some((id, token)) = parse_claim_name(name) else {
        return Ok(RecoverAction::Gone);
    };
    let dir = queue.state_dir(State::Converting).join(name);
    let lease = read_lease(&dir.join(LEASE)).ok().and_then(|(_, l)| l);
    let counted = lease.as_ref().is_none_or(|l| l.running <= 1);
    let (earlier_counted, earlier_all) = count_deaths(&dir);
    let attempts = earlier_counted + usize::from(counted);
    let deaths = earlier_all + 1;
    let (state, action) = if let Some(reason) = super::claim::cancel_reason(&dir) {
        (State::Cancelled, RecoverAction::Cancelled { reason })
    } else if attempts >= max_attempts || deaths >= max_attempts.saturating_mul(10) {
        (State::Failed, RecoverAction::Failed { attempts, deaths })
    } else {
        (State::Queued, RecoverAction::Requeued { attempts })
    };
    record_event(&dir, "expired", token, serde_json::json!({ "why": why, "counted": counted }));
    super::ensure_state_dir(queue, state)?;
    match fsx::rename_noreplace(&dir, &queue.job_dir(state, &id))? {
        Moved::Yes => {
            fsx::fsync_dir(&queue.state_dir(state))?;
            fsx::fsync_dir(&queue.state_dir(State::Converting))?;
            Ok(action)
        }
        _ => Ok(RecoverAction::Gone),
    }
}

/// Deaths of this job's agents so far: (counted against the job, all). Events of older agents,
/// which did not say, count.
fn count_deaths(job_dir: &Path) -> (usize, usize) {
    let events = job_dir.join(super::EVENTS);
    let names = read_names(&events).unwrap_or_default();
    let mut counted = 0;
    let mut all = 0;
    for n in names.iter().filter(|n| n.contains("-expired-")).take(10_000) {
        all += 1;
        let v: serde_json::Value =
            super::read_small(&events.join(n)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        if v.pointer("/detail/counted").and_then(|c| c.as_bool()) != Some(false) {
            counted += 1;
        }
    }
    (counted, all)
}

/// Move a claim we do not own to a final state (used after completing a dead agent's publication).
pub fn finish_foreign(queue: &Queue, name: &str, state: State) -> io::Result<bool> {
    let Some((id, token)) = parse_claim_name(name) else {
        return Ok(false);
    };
    let dir = queue.state_dir(State::Converting).join(name);
    record_event(&dir, state.dir_name(), token, serde_json::json!({"completed_by_recovery": true}));
    super::ensure_state_dir(queue, state)?;
    Ok(fsx::rename_noreplace(&dir, &queue.job_dir(state, &id))? == Moved::Yes)
}

/// `<job-id>@<token>` → its parts.
pub fn parse_claim_name(name: &str) -> Option<(JobId, &str)> {
    let (id, token) = name.split_once('@')?;
    Some((id.parse().ok()?, token))
}

/// Remove staging leftovers: this host's whose exporter is gone, at once; anybody's once nothing
/// in them changed for `max_age` by the file server's clock. Returns the names removed.
pub fn cleanup_tmp(queue: &Queue, max_age: Duration, server_now: Option<SystemTime>) -> io::Result<Vec<String>> {
    let tmp = queue.tmp_dir();
    let mut removed = Vec::new();
    let names = match read_names(&tmp) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    let host = fsx::host_id();
    for name in names {
        // Clock probes are short-lived; interrupted ingestions of manifest drops are resumed by
        // the ingestion code of the host that took them, never deleted.
        if name.starts_with(".clock.") || name.ends_with(".seed.json") {
            continue;
        }
        let path = tmp.join(&name);
        let own_dead =
            super::publish::parse_staging_name(&name).is_some_and(|(_, h, pid)| h == host && !fsx::pid_alive(pid));
        let old = server_now.is_some_and(|now| {
            newest_mtime(&path).is_some_and(|m| now.duration_since(m).is_ok_and(|age| age >= max_age))
        });
        if own_dead || old {
            fsx::remove_tree(&path)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// The newest mtime of a staging entry and the files directly in it and in its `disks/`.
fn newest_mtime(path: &Path) -> Option<SystemTime> {
    let mut newest = fs::symlink_metadata(path).ok()?.modified().ok()?;
    for sub in [path.to_path_buf(), path.join(super::DISKS)] {
        if let Ok(rd) = fs::read_dir(&sub) {
            for e in rd.flatten() {
                if let Ok(m) = e.metadata().and_then(|m| m.modified())
                    && m > newest
                {
                    newest = m;
                }
            }
        }
    }
    Some(newest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::claim;

    #[test]
    fn a_claim_whose_lease_stops_changing_goes_stale_and_is_requeued_once() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        fs::create_dir(q.job_dir(State::Queued, &id)).expect("mkdir");
        let mut c = claim(&q, id, "a", 1).expect("claim").expect("won");
        let name = c.dir().file_name().expect("name").to_string_lossy().into_owned();

        // Same host, live process holding the lock: alive until the lease stops changing.
        let mut t = LeaseTracker::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(t.assess_at(&q, &name, None, at(0)), Liveness::Alive);
        assert_eq!(t.assess_at(&q, &name, None, at(50)), Liveness::Alive);
        c.heartbeat("converting", 1.0, 1, 100).expect("beat");
        assert_eq!(t.assess_at(&q, &name, None, at(70)), Liveness::Alive, "changed: the timer restarts");
        assert_eq!(t.assess_at(&q, &name, None, at(120)), Liveness::Alive, "50 s without change");
        assert!(matches!(t.assess_at(&q, &name, None, at(131)), Liveness::Stale(_)));

        assert_eq!(recover_claim(&q, &name, "test", 3).expect("recover"), RecoverAction::Requeued { attempts: 1 });
        assert_eq!(recover_claim(&q, &name, "test", 3).expect("again"), RecoverAction::Gone);
        assert!(q.job_dir(State::Queued, &id).is_dir());
        assert!(!c.finish(claim::Outcome::Done).expect("finish"), "the old owner lost it");
    }

    #[test]
    fn a_dead_local_owner_is_stale_at_once() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        let dir = q.state_dir(State::Converting).join(format!("{id}@deadbeef"));
        fs::create_dir(&dir).expect("mkdir");
        let lease = serde_json::json!({
            "job_id": id, "token": "deadbeef", "agent": "x", "host": fsx::hostname(), "host_id": fsx::host_id(),
            "boot_id": fsx::boot_id(), "pid": 999_999_999u32, "claimed_at_ms": 0, "heartbeat": 0,
            "heartbeat_at_ms": 0
        });
        fs::write(dir.join(LEASE), lease.to_string()).expect("write");
        let mut t = LeaseTracker::new(Duration::from_secs(3600));
        let name = format!("{id}@deadbeef");
        assert!(matches!(t.assess(&q, &name, None), Liveness::Stale(why) if why.contains("gone")));
    }

    #[test]
    fn another_host_with_the_same_name_is_not_this_host() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        let dir = q.state_dir(State::Converting).join(format!("{id}@cafe"));
        fs::create_dir(&dir).expect("mkdir");
        // Same host name, another machine: its pid means nothing here.
        let lease = serde_json::json!({
            "job_id": id, "token": "cafe", "agent": "x", "host": fsx::hostname(),
            "host_id": fsx::host_id_of(&fsx::hostname(), "another-machine"),
            "boot_id": "another-boot", "pid": 999_999_999u32, "claimed_at_ms": 0, "heartbeat": 0,
            "heartbeat_at_ms": 0
        });
        fs::write(dir.join(LEASE), lease.to_string()).expect("write");
        let mut t = LeaseTracker::new(Duration::from_secs(3600));
        assert_eq!(t.assess(&q, &format!("{id}@cafe"), None), Liveness::Alive, "judged by its lease only");
    }

    #[test]
    fn an_old_lease_by_the_server_clock_is_stale_at_first_sight() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        let dir = q.state_dir(State::Converting).join(format!("{id}@0123"));
        fs::create_dir(&dir).expect("mkdir");
        fs::write(dir.join(LEASE), b"{\"host\": \"elsewhere\"}").expect("write");
        let mut t = LeaseTracker::new(Duration::from_secs(60));
        let name = format!("{id}@0123");
        let now = crate::queue::server_now(&q.tmp_dir()).expect("clock");
        assert_eq!(t.assess(&q, &name, Some(now)), Liveness::Alive);
        let mut t = LeaseTracker::new(Duration::from_secs(60));
        let later = now + Duration::from_secs(61);
        assert!(matches!(t.assess(&q, &name, Some(later)), Liveness::Stale(_)));
    }

    #[test]
    fn too_many_attempts_fail_the_job() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        fs::create_dir(q.job_dir(State::Queued, &id)).expect("mkdir");
        for _ in 0..2 {
            let c = claim(&q, id, "a", 1).expect("claim").expect("won");
            let name = c.dir().file_name().expect("name").to_string_lossy().into_owned();
            drop(c);
            let _ = recover_claim(&q, &name, "crash", 2).expect("recover");
        }
        assert!(q.job_dir(State::Failed, &id).is_dir());
    }

    /// Claim and "die" (recover the claim) `n` times, the agent running `running` jobs.
    fn die(q: &Queue, id: JobId, running: u32, n: usize, max: usize) -> Vec<RecoverAction> {
        (0..n)
            .map(|_| {
                let c = claim(q, id, "a", running).expect("claim").expect("won");
                let name = c.dir().file_name().expect("name").to_string_lossy().into_owned();
                drop(c);
                recover_claim(q, &name, "killed", max).expect("recover")
            })
            .collect()
    }

    #[test]
    fn deaths_while_the_agent_ran_several_jobs_do_not_count_against_the_job() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        fs::create_dir(q.job_dir(State::Queued, &id)).expect("mkdir");
        let acts = die(&q, id, 2, 10, 3);
        assert!(acts.iter().all(|a| *a == RecoverAction::Requeued { attempts: 0 }), "{acts:?}");
        // Then it runs alone: those deaths count, and three of them fail it.
        let acts = die(&q, id, 1, 3, 3);
        assert_eq!(acts[..2], [RecoverAction::Requeued { attempts: 1 }, RecoverAction::Requeued { attempts: 2 }]);
        assert_eq!(acts[2], RecoverAction::Failed { attempts: 3, deaths: 13 });
        assert!(q.job_dir(State::Failed, &id).is_dir());
    }

    #[test]
    fn deaths_of_any_kind_fail_the_job_at_ten_times_the_limit() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        fs::create_dir(q.job_dir(State::Queued, &id)).expect("mkdir");
        let acts = die(&q, id, 4, 19, 2);
        assert!(acts.iter().all(|a| matches!(a, RecoverAction::Requeued { .. })), "{acts:?}");
        assert_eq!(die(&q, id, 4, 1, 2), [RecoverAction::Failed { attempts: 0, deaths: 20 }]);
    }

    #[test]
    fn a_lease_of_unknown_load_counts_the_death() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        fs::create_dir(q.job_dir(State::Queued, &id)).expect("mkdir");
        assert_eq!(die(&q, id, 0, 1, 3), [RecoverAction::Requeued { attempts: 1 }]);
    }

    #[test]
    fn staging_cleanup_rule() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let dead = q.tmp_dir().join(format!("{}.{}.999999999", JobId::new(), fsx::host_id()));
        let live = q.tmp_dir().join(format!("{}.{}.{}", JobId::new(), fsx::host_id(), std::process::id()));
        let foreign = q.tmp_dir().join(format!("{}.otherhost.12", JobId::new()));
        for p in [&dead, &live, &foreign] {
            fs::create_dir(p).expect("mkdir");
        }
        let now = crate::queue::server_now(&q.tmp_dir()).expect("clock");
        let removed = cleanup_tmp(&q, Duration::from_secs(3600), Some(now)).expect("cleanup");
        assert_eq!(removed.len(), 1);
        assert!(!dead.exists() && live.exists() && foreign.exists());
        let removed =
            cleanup_tmp(&q, Duration::from_secs(3600), Some(now + Duration::from_secs(7200))).expect("cleanup");
        assert_eq!(removed.len(), 2);
    }
}
