//! Claiming a job (one rename), holding its lease (a locked, heartbeated file), and ending it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    CANCEL, EVENTS, FAILURE, FILE_MODE, LEASE, Queue, State, make_dir, now_ms, read_names, write_json_noreplace,
};
use crate::fsx::{self, Moved};
use crate::jobid::JobId;

/// The event of a requeue whose cause was a result that could not be published.
const PUBLISH_FAILED: &str = "publish-failed";

/// The lease record is rewritten in place at this fixed size (padded with spaces), so a reader on
/// another host never sees a truncated file, only possibly a torn one, which counts as "changed".
const LEASE_RECORD: usize = 1024;

/// A fresh random claim token (16 hex digits).
pub fn claim_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

/// What `lease.json` says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseInfo {
    pub job_id: JobId,
    pub token: String,
    /// The agent instance name.
    pub agent: String,
    /// The host name, for people.
    pub host: String,
    /// The host's identity ([`fsx::host_id`]): what "this host's claim" is decided on. Empty in
    /// leases of older agents (then `host` is used).
    #[serde(default)]
    pub host_id: String,
    pub boot_id: String,
    pub pid: u32,
    pub claimed_at_ms: u64,
    /// Incremented by every heartbeat.
    pub heartbeat: u64,
    pub heartbeat_at_ms: u64,
    /// The job's phase (verifying, converting, checking, publishing) and progress, for readers
    /// such as `hyperctl queue` and exporters that poll.
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub percent: f64,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// How many jobs the agent was running at this heartbeat, this one included: when the agent
    /// dies, a death while it ran several jobs is the host's fault (killed, out of memory, a
    /// watchdog), not this job's, and is not counted against it (see `recover_claim`). 0: unknown.
    #[serde(default)]
    pub running: u32,
}

/// The held lease: the open, locked `lease.json`.
#[derive(Debug)]
pub struct Lease {
    file: File,
    pub info: LeaseInfo,
}

impl Lease {
    fn write(&self) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(&self.info).expect("lease serialises");
        if bytes.len() < LEASE_RECORD {
            bytes.resize(LEASE_RECORD - 1, b' ');
            bytes.push(b'\n');
        }
        self.file.write_all_at(&bytes, 0)?;
        self.file.sync_data()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("cannot claim job {id} in {dir}: {source}")]
    Io {
        id: JobId,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed,
    Cancelled,
}

impl Outcome {
    pub fn state(self) -> State {
        match self {
            Outcome::Done => State::Done,
            Outcome::Failed => State::Failed,
            Outcome::Cancelled => State::Cancelled,
        }
    }
}

/// What a heartbeat learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Beat {
    /// We still own the job.
    Owned,
    /// Someone asked for the job to be cancelled (the reason given).
    CancelRequested(String),
    /// The claim directory is gone: another agent recovered the job after our lease expired.
    Lost,
}

/// A job this agent owns: `converting/<id>@<token>`.
#[derive(Debug)]
pub struct Claim {
    queue: Queue,
    id: JobId,
    token: String,
    dir: PathBuf,
    lease: Lease,
}

/// Try to claim `queued/<id>`. `Ok(None)`: another agent was first (or the job was withdrawn).
/// `running`: how many jobs the agent will run with this one (the lease says so from its first
/// write, so a death before the first heartbeat is judged right; 0: unknown).
pub fn claim(queue: &Queue, id: JobId, agent: &str, running: u32) -> Result<Option<Claim>, ClaimError> {
    let token = claim_token();
    let from = queue.job_dir(State::Queued, &id);
    let converting = queue.state_dir(State::Converting);
    let dir = converting.join(format!("{id}@{token}"));
    let err = |source| ClaimError::Io { id, dir: converting.clone(), source };
    make_dir(&converting).map_err(err)?;
    match fsx::rename_noreplace(&from, &dir).map_err(err)? {
        Moved::Yes => {}
        Moved::SourceGone => return Ok(None),
        Moved::DestinationExists => {
            return Err(err(io::Error::new(io::ErrorKind::AlreadyExists, "claim token collision")));
        }
    }
    crate::failpoint::hit("agent.claimed");
    let durable = (|| {
        fsx::fsync_dir(&converting)?;
        fsx::fsync_dir(&queue.state_dir(State::Queued))
    })();
    durable.map_err(err)?;

    let now = now_ms();
    let info = LeaseInfo {
        job_id: id,
        token: token.clone(),
        agent: agent.to_string(),
        host: fsx::hostname(),
        host_id: fsx::host_id(),
        boot_id: fsx::boot_id(),
        pid: std::process::id(),
        claimed_at_ms: now,
        heartbeat: 0,
        heartbeat_at_ms: now,
        phase: "claimed".into(),
        percent: 0.0,
        bytes_done: 0,
        bytes_total: 0,
        running,
    };
    let lease = (|| -> io::Result<Lease> {
        // A previous attempt's lease (its agent died and the job was recovered) is history now;
        // ours is a new file, so a paused former owner still writing its old one changes nothing.
        fsx::remove_file(&dir.join(LEASE))?;
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(FILE_MODE).open(dir.join(LEASE))?;
        // A same-host guard: a later agent on this host that can take this lock knows we are dead.
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "lease file already locked"));
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let lease = Lease { file, info };
        lease.write()?;
        fsx::fsync_dir(&dir)?;
        Ok(lease)
    })()
    .map_err(|source| ClaimError::Io { id, dir: dir.clone(), source })?;

    crate::failpoint::hit("agent.lease-written");
    let claim = Claim { queue: queue.clone(), id, token, dir, lease };
    claim.record_event("claim", serde_json::json!({"agent": agent}));
    Ok(Some(claim))
}

impl Claim {
    pub fn id(&self) -> JobId {
        self.id
    }
    pub fn token(&self) -> &str {
        &self.token
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn queue(&self) -> &Queue {
        &self.queue
    }
    pub fn lease(&self) -> &LeaseInfo {
        &self.lease.info
    }

    /// Tell the lease how many jobs this agent runs now (written at the next heartbeat).
    pub fn set_running(&mut self, n: u32) {
        self.lease.info.running = n;
    }

    /// How many times this job has been claimed, this claim included.
    pub fn attempts(&self) -> usize {
        count_claims(&self.dir)
    }

    /// Refresh the lease (and publish progress), then look for a cancel request and for the loss of
    /// the claim. Call it from a blocking thread.
    pub fn heartbeat(&mut self, phase: &str, percent: f64, bytes_done: u64, bytes_total: u64) -> io::Result<Beat> {
        if fs::symlink_metadata(&self.dir).is_err() {
            return Ok(Beat::Lost);
        }
        let info = &mut self.lease.info;
        info.heartbeat += 1;
        info.heartbeat_at_ms = now_ms();
        info.phase = phase.to_string();
        info.percent = percent;
        info.bytes_done = bytes_done;
        info.bytes_total = bytes_total;
        self.lease.write()?;
        Ok(match cancel_reason(&self.dir) {
            Some(reason) => Beat::CancelRequested(reason),
            None => Beat::Owned,
        })
    }

    /// Whether our claim directory still exists (it is gone if another agent recovered the job).
    pub fn still_owned(&self) -> bool {
        fs::symlink_metadata(&self.dir).is_ok()
    }

    /// Move the job to its final state directory. `Ok(false)`: we no longer owned it.
    pub fn finish(self, outcome: Outcome) -> io::Result<bool> {
        let state_dir = self.queue.state_dir(outcome.state());
        super::ensure_state_dir(&self.queue, outcome.state())?;
        let target = state_dir.join(self.id.to_string());
        self.record_event(outcome.state().dir_name(), serde_json::json!({}));
        // The result is published: this move is worth waiting for. A client that serves stale
        // handles for a while (gluster with its default caches, measured on the bed) must not turn
        // a finished job into a stale claim that is converted again.
        match fsx::rename_noreplace_for(&self.dir, &target, std::time::Duration::from_secs(20))? {
            Moved::Yes => {
                fsx::fsync_dir(&state_dir)?;
                fsx::fsync_dir(&self.queue.state_dir(State::Converting))?;
                Ok(true)
            }
            Moved::SourceGone => Ok(false),
            Moved::DestinationExists => Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already exists: the job ended twice (report this as a bug)", target.display()),
            )),
        }
    }

    /// Give the job back to the queue (shutdown, or an engine that could not start).
    pub fn requeue(self, reason: &str) -> io::Result<bool> {
        self.requeue_as("requeue", reason)
    }

    /// How many times this job's result could not be published although the output directory was
    /// usable (`publish-failed` events).
    pub fn publish_failures(&self) -> usize {
        count_events(&self.dir, PUBLISH_FAILED)
    }

    /// Give the job back after its result could not be published, counting it
    /// ([`Claim::publish_failures`]): such a job must not go round for ever.
    pub fn requeue_after_publish_failure(self, reason: &str) -> io::Result<bool> {
        self.requeue_as(PUBLISH_FAILED, reason)
    }

    /// End a job whose result cannot be published at all: the reason goes into the job directory
    /// (`failure.json`, what `hyperctl` and waiting exporters show) and the job moves to `failed/`.
    pub fn fail_unpublishable(self, reason: &str) -> io::Result<bool> {
        let note = serde_json::json!({
            "job_id": self.id, "reason": reason, "by": fsx::hostname(), "pid": std::process::id(), "at_ms": now_ms(),
        });
        let _ = write_json_noreplace(&self.dir.join(FAILURE), &note);
        self.record_event(PUBLISH_FAILED, serde_json::json!({"reason": reason, "final": true}));
        self.finish(Outcome::Failed)
    }

    fn requeue_as(self, kind: &str, reason: &str) -> io::Result<bool> {
        self.record_event(kind, serde_json::json!({"reason": reason}));
        let _ = fs::remove_file(self.dir.join(LEASE));
        let target = self.queue.job_dir(State::Queued, &self.id);
        match fsx::rename_noreplace(&self.dir, &target)? {
            Moved::Yes => {
                fsx::fsync_dir(&self.queue.state_dir(State::Queued))?;
                fsx::fsync_dir(&self.queue.state_dir(State::Converting))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn record_event(&self, kind: &str, detail: serde_json::Value) {
        record_event(&self.dir, kind, &self.token, detail);
    }
}

/// Append an event to a job's history: one new file per event, so there is never a second writer.
pub(crate) fn record_event(job_dir: &Path, kind: &str, token: &str, detail: serde_json::Value) {
    let events = job_dir.join(EVENTS);
    if make_dir(&events).is_err() {
        return;
    }
    let at = now_ms();
    let value = serde_json::json!({
        "event": kind, "at_ms": at, "token": token, "host": fsx::hostname(),
        "pid": std::process::id(), "detail": detail,
    });
    let name = format!("{at:013}-{kind}-{token}.json");
    if let Err(e) = write_json_noreplace(&events.join(name), &value) {
        tracing::warn!(job_dir = %job_dir.display(), error = %e, "cannot record event {kind}");
    }
}

pub(crate) fn count_claims(job_dir: &Path) -> usize {
    count_events(job_dir, "claim")
}

/// How many events of this kind a job's history holds.
pub(crate) fn count_events(job_dir: &Path, kind: &str) -> usize {
    let needle = format!("-{kind}-");
    read_names(&job_dir.join(EVENTS)).map(|names| names.iter().filter(|n| n.contains(&needle)).count()).unwrap_or(0)
}

/// Longest cancel reason kept (characters, after escaping).
pub const MAX_REASON: usize = 500;

/// The reason of a pending cancel request, if any. `cancel.json` may be written by any queue
/// writer (the withdraw protocol), so its reason is escaped and bounded; a `cancel.json` that is not
/// a readable regular file still counts as a request.
pub fn cancel_reason(job_dir: &Path) -> Option<String> {
    let path = job_dir.join(CANCEL);
    fs::symlink_metadata(&path).ok()?;
    let v: serde_json::Value =
        super::read_small(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let reason = v.get("reason").and_then(|r| r.as_str()).unwrap_or("cancel requested");
    Some(crate::text::bounded(reason, MAX_REASON))
}

/// Why a job failed without a published result (`failure.json`), if it did.
pub fn failure_reason(job_dir: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&super::read_small(&job_dir.join(FAILURE)).ok()?).ok()?;
    v.get("reason").and_then(|r| r.as_str()).map(|r| crate::text::bounded(r, MAX_REASON))
}

/// Read a lease file (tolerating padding): bounded, never following a symlink or blocking.
pub fn read_lease(path: &Path) -> io::Result<(Vec<u8>, Option<LeaseInfo>)> {
    let bytes = super::read_small(path)?;
    let info = serde_json::from_slice(bytes.trim_ascii()).ok();
    Ok((bytes, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::State;

    fn queue_with_job() -> (tempfile::TempDir, Queue, JobId) {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        fs::create_dir(q.job_dir(State::Queued, &id)).expect("mkdir");
        (d, q, id)
    }

    #[test]
    fn exactly_one_claim_wins() {
        let (_d, q, id) = queue_with_job();
        let a = claim(&q, id, "a", 1).expect("claim a");
        let b = claim(&q, id, "b", 1).expect("claim b");
        assert!(a.is_some() && b.is_none());
        let a = a.expect("a");
        assert_eq!(a.attempts(), 1);
        let (_, info) = read_lease(&a.dir().join(LEASE)).expect("lease");
        assert_eq!(info.expect("parsed").token, a.token());
        // The lock is held: a second open cannot take it.
        let f = File::open(a.dir().join(LEASE)).expect("open");
        assert!(matches!(f.try_lock(), Err(fs::TryLockError::WouldBlock)));
        assert!(a.finish(Outcome::Done).expect("finish"));
        assert!(q.job_dir(State::Done, &id).join(EVENTS).is_dir());
        // Released with the file: the lock can be taken now.
        assert!(File::open(q.job_dir(State::Done, &id).join(LEASE)).expect("open").try_lock().is_ok());
    }

    #[test]
    fn heartbeat_sees_cancel_and_loss() {
        let (_d, q, id) = queue_with_job();
        let mut c = claim(&q, id, "a", 1).expect("claim").expect("won");
        assert_eq!(c.heartbeat("converting", 10.0, 1, 10).expect("beat"), Beat::Owned);
        assert_eq!(q.request_cancel(&id, "operator said so").expect("cancel"), Some(State::Converting));
        assert_eq!(
            c.heartbeat("converting", 20.0, 2, 10).expect("beat"),
            Beat::CancelRequested("operator said so".into())
        );
        // Another agent recovers the job: our directory disappears.
        fs::rename(c.dir(), q.job_dir(State::Queued, &id)).expect("steal");
        assert_eq!(c.heartbeat("converting", 30.0, 3, 10).expect("beat"), Beat::Lost);
        assert!(!c.finish(Outcome::Done).expect("finish"), "a lost claim must not finish");
        assert!(!q.job_dir(State::Done, &id).exists());
    }

    #[test]
    fn requeue_counts_attempts() {
        let (_d, q, id) = queue_with_job();
        let c = claim(&q, id, "a", 1).expect("claim").expect("won");
        assert!(c.requeue("shutdown").expect("requeue"));
        let c = claim(&q, id, "a", 1).expect("claim").expect("won");
        assert_eq!(c.attempts(), 2);
    }
}
