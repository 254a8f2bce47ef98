//! The job queue on shared storage. The contract is in `docs/protocol.md`; in short:
//!
//! ```text
//! <watch-dir>/
//!   tmp/<job-id>.<host>.<pid>/       an exporter stages a job here (readers never look)
//!   queued/<job-id>/                 published by one rename: manifest.json, disks/…
//!   converting/<job-id>@<token>/     claimed by one rename; lease.json is the agent's lease
//!   done/<job-id>/  failed/<job-id>/  cancelled/<job-id>/
//!   *.json                           seed-style manifest drops (HyperSDK), ingested into queued/
//! ```
//!
//! Every state change is one `rename` of the job directory, so the state of every job is visible on
//! disk with `ls`, and a crash at any instant leaves each job in exactly one state.

pub mod agents;
mod claim;
mod inspect;
mod publish;
mod recover;
mod retry;
mod seed;

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub use claim::{
    Beat, Claim, ClaimError, Lease, LeaseInfo, MAX_REASON, Outcome, cancel_reason, claim, claim_token, failure_reason,
    read_lease,
};
pub use inspect::{JobEntry, QueueSummary, StaleClaim, list, read_events, summarize, unknown_entries};
pub use publish::{PublishError, Staging, cleanup_own_staging};
pub use recover::{
    LeaseTracker, Liveness, RecoverAction, cleanup_tmp, finish_foreign, parse_claim_name, recover_claim,
};
pub use retry::{RetryError, retry};
pub use seed::{IngestOutcome, REJECTED, SeedTracker, ingest_seed_drops};

use crate::jobid::JobId;

/// The states a job can be in; each is a directory of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Converting,
    Done,
    Failed,
    Cancelled,
}

impl State {
    pub const ALL: [State; 5] = [State::Queued, State::Converting, State::Done, State::Failed, State::Cancelled];

    pub fn dir_name(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Converting => "converting",
            State::Done => "done",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.dir_name() == s)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// Name of the manifest inside a job directory.
pub const MANIFEST: &str = "manifest.json";
/// Subdirectory of a job holding its disks.
pub const DISKS: &str = "disks";
/// The lease file of a claimed job.
pub const LEASE: &str = "lease.json";
/// A cancel request dropped into a job directory.
pub const CANCEL: &str = "cancel.json";
/// Why a job failed when even its failure could not be published (written by the agent that gave
/// up on it, in `failed/<id>/`).
pub const FAILURE: &str = "failure.json";
/// Where a seed-style drop came from (its original name), for ingested jobs.
pub const ORIGIN: &str = "origin.json";
/// One file per event (claims, recoveries), for history and the attempt count.
pub const EVENTS: &str = "events";
/// The staging area's name.
pub const TMP: &str = "tmp";

/// Mode of every directory we create in the queue: group-writable and setgid, so that exporters
/// and the agent, in one group, can all create, rename and remove jobs (see docs/production.md).
pub const DIR_MODE: u32 = 0o2775;
/// Mode of files we create in the queue: readable by the group.
pub const FILE_MODE: u32 = 0o664;

/// A queue rooted at a watch directory.
#[derive(Debug, Clone)]
pub struct Queue {
    root: PathBuf,
}

impl Queue {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Queue { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Create the state directories that are missing. The root itself must exist: a missing watch
    /// directory is an operator's mistake (a share not mounted) that we must not paper over.
    pub fn init(&self) -> io::Result<()> {
        let md = fs::metadata(&self.root)?;
        if !md.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "is not a directory"));
        }
        for sub in State::ALL.iter().map(|s| s.dir_name()).chain([TMP]) {
            make_dir(&self.root.join(sub))?;
        }
        Ok(())
    }

    pub fn state_dir(&self, state: State) -> PathBuf {
        self.root.join(state.dir_name())
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP)
    }

    /// Path of a job in a final or queued state (converting jobs carry a token: see [`Claim`]).
    pub fn job_dir(&self, state: State, id: &JobId) -> PathBuf {
        self.state_dir(state).join(id.to_string())
    }

    /// Find a job in whatever state it is. Returns its state and directory.
    pub fn locate(&self, id: &JobId) -> io::Result<Option<(State, PathBuf)>> {
        for state in State::ALL {
            if state == State::Converting {
                let prefix = format!("{id}@");
                if let Some(name) = read_names(&self.state_dir(state))?.into_iter().find(|n| n.starts_with(&prefix)) {
                    return Ok(Some((state, self.state_dir(state).join(name))));
                }
            } else {
                let p = self.job_dir(state, id);
                if fs::symlink_metadata(&p).is_ok() {
                    return Ok(Some((state, p)));
                }
            }
        }
        Ok(None)
    }

    /// Withdraw a job that no agent has claimed: `queued/<id>` → `cancelled/<id>`, with a note of
    /// who withdrew it and why. Returns `Ok(false)` when the job is no longer queued.
    pub fn withdraw(&self, id: &JobId, reason: &str) -> io::Result<bool> {
        let from = self.job_dir(State::Queued, id);
        let to = self.job_dir(State::Cancelled, id);
        match crate::fsx::rename_noreplace(&from, &to)? {
            crate::fsx::Moved::Yes => {
                crate::fsx::fsync_dir(&self.state_dir(State::Queued))?;
                crate::fsx::fsync_dir(&self.state_dir(State::Cancelled))?;
                let note = serde_json::json!({
                    "job_id": id, "reason": reason, "by": crate::fsx::hostname(),
                    "pid": std::process::id(), "at_ms": now_ms(),
                });
                let _ = write_json_noreplace(&to.join(CANCEL), &note);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Ask for a job to be cancelled: a queued job is withdrawn at once; a converting one gets a
    /// cancel request that its agent acts on within a heartbeat. Returns the state seen.
    pub fn request_cancel(&self, id: &JobId, reason: &str) -> io::Result<Option<State>> {
        if self.withdraw(id, reason)? {
            return Ok(Some(State::Cancelled));
        }
        match self.locate(id)? {
            Some((State::Converting, dir)) => {
                let note = serde_json::json!({
                    "job_id": id, "reason": reason, "by": crate::fsx::hostname(),
                    "pid": std::process::id(), "at_ms": now_ms(),
                });
                write_json_noreplace(&dir.join(CANCEL), &note)?;
                Ok(Some(State::Converting))
            }
            Some((state, _)) => Ok(Some(state)),
            None => Ok(None),
        }
    }
}

/// Create one directory with [`DIR_MODE`] (not subject to the umask) and fsync its parent.
pub(crate) fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => {
            fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
            if let Some(parent) = dir.parent() {
                crate::fsx::fsync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a name is a file system's own placeholder: an NFS silly-rename (`.nfsXXXX`, a file
/// removed while open) or a FUSE hidden file (`.fuse_hiddenXXXX`, the same on GlusterFS and other
/// FUSE clients). Never a job, never staging, never reported.
pub fn is_placeholder(name: &str) -> bool {
    name.starts_with(".nfs") || name.starts_with(".fuse_hidden")
}

/// Make sure a state directory of an initialised queue exists before a job moves into it. One that
/// has to be made again was removed behind the agents' back: it is made (the job must go
/// somewhere) and said so, not papered over.
pub(crate) fn ensure_state_dir(queue: &Queue, state: State) -> io::Result<()> {
    let dir = queue.state_dir(state);
    if dir.is_dir() {
        return Ok(());
    }
    make_dir(&dir)?;
    tracing::warn!(
        dir = %dir.display(),
        "the queue's {}/ directory was missing (removed by hand, or the queue replaced?) and was created again",
        state.dir_name()
    );
    Ok(())
}

/// Names in a directory, skipping the file systems' placeholders ([`is_placeholder`]).
pub(crate) fn read_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_placeholder(&name) {
            continue;
        }
        out.push(name);
    }
    Ok(out)
}

/// Read a small protocol file of the queue (lease, cancel request, event, origin): anyone who can
/// write the queue could have planted a FIFO, a device or a symlink in its place, so it is read
/// without following symlinks, without blocking, and at most [`crate::fsx::SMALL_FILE_MAX`] bytes.
pub fn read_small(path: &Path) -> io::Result<Vec<u8>> {
    crate::fsx::read_bounded(path, crate::fsx::SMALL_FILE_MAX)
}

/// Read a job's `manifest.json` the same way, up to the manifest size limit.
pub fn read_manifest(job_dir: &Path) -> io::Result<Vec<u8>> {
    crate::fsx::read_bounded(&job_dir.join(MANIFEST), crate::manifest::MAX_MANIFEST_BYTES)
}

/// Whether a job carries `origin.json` as a regular file (a symlink or FIFO there is not an origin).
pub fn has_origin(job_dir: &Path) -> bool {
    fs::symlink_metadata(job_dir.join(ORIGIN)).is_ok_and(|m| m.file_type().is_file())
}

/// Write a small JSON file that must not exist yet (one writer, never replaced).
pub(crate) fn write_json_noreplace(path: &Path, value: &serde_json::Value) -> io::Result<bool> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("JSON values serialise");
    bytes.push(b'\n');
    crate::fsx::create_file_noreplace(path, &bytes)
}

/// Milliseconds since the Unix epoch, by this host's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The file server's idea of "now": the mtime of a file we just wrote in `dir`. Lease and age
/// decisions compare server timestamps with server timestamps, never with a client clock.
pub fn server_now(dir: &Path) -> io::Result<std::time::SystemTime> {
    let probe = dir.join(format!(".clock.{}.{}", crate::fsx::host_id(), std::process::id()));
    let _ = fs::remove_file(&probe);
    // The server stamps the mtime when it creates the file; nothing to write, nothing to sync.
    drop(fs::OpenOptions::new().write(true).create_new(true).open(&probe)?);
    let t = fs::metadata(&probe)?.modified();
    let _ = fs::remove_file(&probe);
    t
}
