//! Jobs as the API shows them: from the board (this agent's running and recent jobs) or from the
//! queue and output directory on disk (anyone's).

use std::collections::HashMap;
use std::sync::Mutex;

use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::JobId;
use hyperfarm_shared::manifest::Manifest;
use hyperfarm_shared::progress::{Phase, Progress};
use hyperfarm_shared::queue::{self, LeaseInfo, State};
use hyperfarm_shared::results::{ResultRecord, ResultState};

use crate::agent::Core;
use crate::board::JobView;

/// VM names by job id (manifests never change once published).
#[derive(Debug, Default)]
pub struct NameCache {
    names: Mutex<HashMap<JobId, Option<String>>>,
}

impl NameCache {
    /// The VM name of a job whose directory is `dir` (blocking: may read the manifest).
    pub fn get(&self, id: &JobId, dir: &std::path::Path) -> Option<String> {
        if let Some(n) = self.names.lock().expect("name cache").get(id) {
            return n.clone();
        }
        let name = queue::read_manifest(dir)
            .ok()
            .and_then(|b| Manifest::parse(&b).ok())
            .and_then(|m| m.vm_name().map(str::to_string));
        let mut g = self.names.lock().expect("name cache");
        if g.len() > 200_000 {
            g.clear();
        }
        g.insert(*id, name.clone());
        name
    }
}

pub fn phase_to_pb(p: Phase) -> pb::Phase {
    match p {
        Phase::Queued => pb::Phase::Queued,
        Phase::Verifying => pb::Phase::Verifying,
        Phase::Converting => pb::Phase::Converting,
        Phase::Checking => pb::Phase::Checking,
        Phase::Publishing => pb::Phase::Publishing,
        Phase::Done => pb::Phase::Done,
        Phase::Failed => pb::Phase::Failed,
        Phase::Cancelled => pb::Phase::Cancelled,
    }
}

pub fn state_of_phase(p: Phase) -> pb::JobState {
    match p {
        Phase::Queued => pb::JobState::Queued,
        Phase::Verifying | Phase::Converting | Phase::Checking | Phase::Publishing => pb::JobState::Converting,
        Phase::Done => pb::JobState::Done,
        Phase::Failed => pb::JobState::Failed,
        Phase::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn state_to_pb(s: State) -> pb::JobState {
    match s {
        State::Queued => pb::JobState::Queued,
        State::Converting => pb::JobState::Converting,
        State::Done => pb::JobState::Done,
        State::Failed => pb::JobState::Failed,
        State::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn state_from_pb(s: pb::JobState) -> Option<State> {
    match s {
        pb::JobState::Queued => Some(State::Queued),
        pb::JobState::Converting => Some(State::Converting),
        pb::JobState::Done => Some(State::Done),
        pb::JobState::Failed => Some(State::Failed),
        pb::JobState::Cancelled => Some(State::Cancelled),
        pb::JobState::Unspecified => None,
    }
}

pub fn is_final(job: &pb::Job) -> bool {
    matches!(job.state(), pb::JobState::Done | pb::JobState::Failed | pb::JobState::Cancelled)
}

fn progress_to_pb(p: &Progress) -> pb::Progress {
    pb::Progress {
        percent: p.percent,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        rate_bytes_per_second: p.rate,
        eta_seconds: p.eta_secs,
        disk_id: p.disk.clone().unwrap_or_default(),
    }
}

/// A board view as an API job.
pub fn from_view(v: &JobView) -> pb::Job {
    let mut j = pb::Job {
        id: v.id.to_string(),
        vm_name: v.vm_name.clone().unwrap_or_default(),
        progress: Some(progress_to_pb(&v.progress)),
        agent: v.agent.clone(),
        created_at_ms: v.id.created_ms(),
        started_at_ms: v.started_at_ms,
        updated_at_ms: v.updated_at_ms,
        finished_at_ms: v.finished_at_ms,
        error_summary: v.summary.clone().unwrap_or_default(),
        error: String::new(),
        files: v.files.clone(),
        engine: v.engine.clone().unwrap_or_default(),
        attempts: v.attempts,
        seed_drop: v.seed_drop,
        ..Default::default()
    };
    j.set_state(state_of_phase(v.progress.phase));
    j.set_phase(phase_to_pb(v.progress.phase));
    j
}

/// A job read from disk (blocking). `None`: no such job here.
pub fn from_disk(core: &Core, id: &JobId, with_error: bool) -> Option<pb::Job> {
    let record = core.output.read_record(id).ok().flatten();
    let located = core.queue.locate(id).ok().flatten();
    if record.is_none() && located.is_none() {
        return None;
    }
    let mut j = pb::Job { id: id.to_string(), created_at_ms: id.created_ms(), ..Default::default() };
    if let Some((state, dir)) = &located {
        j.set_state(state_to_pb(*state));
        j.vm_name = core.names.get(id, dir).unwrap_or_default();
        j.seed_drop = queue::has_origin(dir);
        let lease: Option<LeaseInfo> = queue::read_lease(&dir.join(queue::LEASE)).ok().and_then(|(_, l)| l);
        if *state == State::Converting
            && let Some(l) = &lease
        {
            j.agent = l.agent.clone();
            j.started_at_ms = l.claimed_at_ms;
            j.updated_at_ms = l.heartbeat_at_ms;
            j.progress = Some(pb::Progress {
                percent: l.percent,
                bytes_done: l.bytes_done,
                bytes_total: l.bytes_total,
                ..Default::default()
            });
            j.set_phase(match l.phase.as_str() {
                "verifying" => pb::Phase::Verifying,
                "converting" => pb::Phase::Converting,
                "checking" => pb::Phase::Checking,
                "publishing" => pb::Phase::Publishing,
                _ => pb::Phase::Verifying,
            });
        } else {
            j.set_phase(match state {
                State::Queued => pb::Phase::Queued,
                State::Converting => pb::Phase::Verifying,
                State::Done => pb::Phase::Done,
                State::Failed => pb::Phase::Failed,
                State::Cancelled => pb::Phase::Cancelled,
            });
        }
        if *state == State::Cancelled && record.is_none() {
            j.error_summary =
                queue::cancel_reason(dir).map(|r| format!("cancelled: {r}")).unwrap_or_else(|| "cancelled".into());
        }
    }
    if let Some(r) = &record {
        apply_record(&mut j, r, with_error);
        // A record is final even if the job directory has not moved yet.
        if located.as_ref().is_none_or(|(s, _)| !s.is_final()) {
            j.set_state(match r.state {
                ResultState::Done => pb::JobState::Done,
                ResultState::Failed => pb::JobState::Failed,
                ResultState::Cancelled => pb::JobState::Cancelled,
            });
        }
    }
    Some(j)
}

fn apply_record(j: &mut pb::Job, r: &ResultRecord, with_error: bool) {
    j.vm_name = r.vm_name.clone();
    j.agent = r.agent.clone();
    j.engine = r.engine.clone();
    j.attempts = r.attempts as u32;
    j.started_at_ms = r.started_at_ms;
    j.finished_at_ms = r.finished_at_ms;
    j.updated_at_ms = r.finished_at_ms;
    let mut files = r.files.clone();
    files.sort_by_key(|f| !f.boot);
    j.files = files.iter().map(|f| f.name.clone()).collect();
    if r.error.is_some() {
        j.error_summary = r.summary();
        if with_error {
            j.error = r.error.clone().unwrap_or_default();
        }
    }
    j.set_phase(match r.state {
        ResultState::Done => pb::Phase::Done,
        ResultState::Failed => pb::Phase::Failed,
        ResultState::Cancelled => pb::Phase::Cancelled,
    });
    j.progress = Some(pb::Progress { percent: 100.0, ..Default::default() });
}

/// A job, preferring this agent's live view. Blocking.
pub fn lookup(core: &Core, id: &JobId, with_error: bool) -> Option<pb::Job> {
    if let Some(v) = core.board.get(id) {
        let final_on_board = v.progress.phase.is_final();
        // The result record is written before the board hears of the end: once it exists, the
        // disk is the truth (and has the full error text).
        let published = !final_on_board && core.output.record_path(id).exists();
        if !published && (!final_on_board || !with_error) {
            return Some(from_view(&v));
        }
    }
    from_disk(core, id, with_error)
}

/// Every job of the queue in the given states, oldest first, this agent's live progress on top.
/// Blocking.
pub fn list(core: &Core, states: &[State], limit: usize) -> std::io::Result<(Vec<pb::Job>, u64)> {
    let entries = queue::list(&core.queue, states, false)?;
    let total = entries.len() as u64;
    let running: HashMap<JobId, JobView> = core.board.running().into_iter().map(|v| (v.id, v)).collect();
    let take = if limit == 0 { entries.len() } else { limit.min(entries.len()) };
    let mut out = Vec::with_capacity(take);
    for e in entries.into_iter().take(take) {
        if let Some(v) = running.get(&e.id) {
            out.push(from_view(v));
            continue;
        }
        let mut j = pb::Job {
            id: e.id.to_string(),
            created_at_ms: e.id.created_ms(),
            vm_name: core.names.get(&e.id, &e.dir).unwrap_or_default(),
            ..Default::default()
        };
        j.set_state(state_to_pb(e.state));
        j.set_phase(match e.state {
            State::Queued => pb::Phase::Queued,
            State::Converting => pb::Phase::Converting,
            State::Done => pb::Phase::Done,
            State::Failed => pb::Phase::Failed,
            State::Cancelled => pb::Phase::Cancelled,
        });
        if e.state.is_final()
            && let Some(r) = core.records.get(&core.output, &e.id)
        {
            apply_record(&mut j, &r, false);
        }
        out.push(j);
    }
    Ok((out, total))
}

/// Result records by job id. A record never changes once written, so it is read once.
#[derive(Debug, Default)]
pub struct RecordCache {
    records: Mutex<HashMap<JobId, std::sync::Arc<ResultRecord>>>,
}

impl RecordCache {
    /// The record of a finished job (blocking: may read it).
    pub fn get(&self, out: &hyperfarm_shared::results::OutputDir, id: &JobId) -> Option<std::sync::Arc<ResultRecord>> {
        if let Some(r) = self.records.lock().expect("record cache").get(id) {
            return Some(r.clone());
        }
        let mut r = out.read_record(id).ok().flatten()?;
        // Lists show the summary only; keep the cache small.
        if let Some(e) = &r.error {
            r.error = Some(e.lines().next().unwrap_or_default().to_string());
        }
        let r = std::sync::Arc::new(r);
        let mut g = self.records.lock().expect("record cache");
        if g.len() > 100_000 {
            g.clear();
        }
        g.insert(*id, r.clone());
        Some(r)
    }
}
