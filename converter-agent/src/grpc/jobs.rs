//! Jobs as the API shows them: from the board (this agent's running and recent jobs) or from the
//! queue and output directory on disk (anyone's).

use std::collections::HashMap;

use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::JobId;
use hyperfarm_shared::manifest::Manifest;
use hyperfarm_shared::progress::{Phase, Progress};
use hyperfarm_shared::queue::{self, LeaseInfo, State};
use hyperfarm_shared::results::{ResultRecord, ResultState};

use crate::agent::Core;
use crate::board::JobView;
use crate::index::Indexed;

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
        j.vm_name = queue::read_manifest(dir)
            .ok()
            .and_then(|b| Manifest::parse(&b).ok())
            .and_then(|m| m.vm_name().map(str::to_string))
            .unwrap_or_default();
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
        if *state == State::Failed
            && record.is_none()
            && let Some(why) = queue::failure_reason(dir)
        {
            j.error_summary = why.lines().next().unwrap_or_default().to_string();
            j.error = why;
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
    // Like the full error, only in GetJob's answer (lists and streams stay small).
    j.libvirt = r.libvirt.as_ref().filter(|_| with_error).map(|o| pb::LibvirtDomain {
        domain: o.domain.clone(),
        uri: o.uri.clone(),
        host: o.host.clone(),
        xml: o.xml.clone(),
        validated: o.validated,
        defined: o.defined,
        error: o.error.clone().unwrap_or_default(),
    });
}

/// A job from the in-memory index (no disk read).
pub fn from_index(j: &Indexed) -> pb::Job {
    let mut out = pb::Job {
        id: j.id.to_string(),
        created_at_ms: j.id.created_ms(),
        vm_name: j.vm_name.clone().unwrap_or_default(),
        seed_drop: j.seed_drop,
        ..Default::default()
    };
    out.set_state(state_to_pb(j.state));
    out.set_phase(match j.state {
        State::Queued => pb::Phase::Queued,
        State::Converting => pb::Phase::Verifying,
        State::Done => pb::Phase::Done,
        State::Failed => pb::Phase::Failed,
        State::Cancelled => pb::Phase::Cancelled,
    });
    if let Some(l) = &j.lease {
        out.agent = l.agent.clone();
        out.started_at_ms = l.claimed_at_ms;
        out.updated_at_ms = l.heartbeat_at_ms;
        out.progress = Some(pb::Progress {
            percent: l.percent,
            bytes_done: l.bytes_done,
            bytes_total: l.bytes_total,
            ..Default::default()
        });
        out.set_phase(phase_of_lease(&l.phase));
    }
    if let Some(r) = &j.record {
        apply_record(&mut out, r, false);
    } else if let Some(reason) = &j.cancel_reason {
        out.error_summary = reason.lines().next().unwrap_or_default().to_string();
    }
    out
}

fn phase_of_lease(phase: &str) -> pb::Phase {
    match phase {
        "verifying" => pb::Phase::Verifying,
        "converting" => pb::Phase::Converting,
        "checking" => pb::Phase::Checking,
        "publishing" => pb::Phase::Publishing,
        _ => pb::Phase::Verifying,
    }
}

/// A job from memory: this agent's live view, else the index. `None`: not known in memory (the
/// caller may look on disk, with a deadline).
pub fn lookup_memory(core: &Core, id: &JobId) -> Option<pb::Job> {
    if let Some(v) = core.board.get(id) {
        return Some(from_view(&v));
    }
    core.index.get(id).map(|j| from_index(&j))
}

/// One page of jobs in the given states, oldest first, this agent's live progress on top.
/// Memory only.
pub fn list(
    core: &Core,
    states: &[State],
    after: Option<JobId>,
    limit: usize,
) -> (Vec<pb::Job>, u64, Option<JobId>, u64) {
    let page = core.index.page(states, after, limit);
    let running: HashMap<JobId, JobView> = core.board.running().into_iter().map(|v| (v.id, v)).collect();
    let jobs = page
        .jobs
        .iter()
        .map(|j| match running.get(&j.id) {
            Some(v) => from_view(v),
            None => match core.board.get(&j.id) {
                // Finished here since the index last looked: the board knows first.
                Some(v) if v.progress.phase.is_final() && !j.state.is_final() => from_view(&v),
                _ => from_index(j),
            },
        })
        .collect();
    (jobs, page.total, page.next, page.as_of_ms)
}
