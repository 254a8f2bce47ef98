//! Daemon mode: follow this job to its own result.
//!
//! With an agent endpoint, the job is followed over the agent's gRPC watch stream (live
//! progress, the result the moment it is published). When the agent cannot be reached, or the
//! stream breaks, the exporter falls back to polling the output directory for its job's result
//! record — at once, then every poll interval — and tries the stream again at every poll, going
//! back to it when the agent answers (or, when no agent was named, any agent registered in the
//! queue: the one it followed may be gone for good and another host recovering the job). Either way it reports only this job's result (the record
//! named by its job id) and honours the timeout; on timeout it withdraws the job if no agent has
//! claimed it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_stream::StreamExt;

use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::JobId;
use hyperfarm_shared::queue::{self, LeaseInfo, Queue, State};
use hyperfarm_shared::results::{OutputDir, ResultRecord};
use hyperfarm_shared::text::Esc;

use crate::ui::Meter;
use hyperfarm_proto::client::AgentEndpoint;

/// How waiting ended.
#[derive(Debug)]
pub enum Waited {
    /// The job's record (done, failed or cancelled).
    Result(ResultRecord),
    /// The agent reported the final state but the record is not readable from here (the output
    /// directory is not mounted on this host).
    Remote(pb::Job),
    /// The job ended without a record: cancelled/withdrawn by someone (the reason), or failed.
    EndedWithoutRecord {
        state: State,
        reason: String,
    },
    TimedOut {
        withdrawn: bool,
        state: Option<State>,
        lease: Option<LeaseInfo>,
    },
    Interrupted {
        withdrawn: bool,
    },
}

pub struct WaitParams {
    pub queue: Queue,
    pub output: OutputDir,
    pub id: JobId,
    pub poll: Duration,
    pub timeout: Duration,
    pub quiet: bool,
    pub vm_name: String,
    /// Follow over gRPC when set.
    pub agent: Option<AgentEndpoint>,
    /// While polling, look for agents registered in the queue (`.agents/`) and follow the first
    /// that answers (TLS settings and token from this endpoint): detection found the queue but no
    /// agent answering, e.g. its gRPC port is blocked, and it may answer later.
    pub rediscover: Option<AgentEndpoint>,
}

enum Step {
    Done(Box<Waited>),
    /// The stream is unusable: poll (and retry the stream at each poll).
    Poll(String),
}

/// Follow the job until it ends, the timeout passes, or `interrupt` fires.
pub async fn follow(p: &WaitParams, interrupt: Arc<Notify>) -> Waited {
    let deadline = Instant::now() + p.timeout;
    let mut meter = Meter::new(format!("job {}", p.id.short()), 1000, p.quiet).stage("convert", &p.id.to_string());
    let mut agent = p.agent.clone();
    let mut streaming = agent.is_some();
    let mut final_without_record = 0;
    let mut first_poll = true;
    loop {
        if streaming && let Some(agent) = &agent {
            let step = tokio::select! {
                s = stream(p, agent, &mut meter) => s,
                _ = tokio::time::sleep_until(deadline.into()) => Step::Poll("timeout".into()),
                _ = interrupt.notified() => return interrupted(p, &mut meter).await,
            };
            match step {
                Step::Done(w) => {
                    meter.finish();
                    return *w;
                }
                Step::Poll(why) => {
                    if Instant::now() < deadline {
                        tracing::warn!(job = %p.id, "following over gRPC failed ({why}); falling back to polling {}", p.output.path().display());
                    }
                    streaming = false;
                    first_poll = true;
                }
            }
        }
        // Poll: check at once, then every poll interval.
        if !first_poll {
            let now = Instant::now();
            if now >= deadline {
                meter.finish();
                return timed_out(p).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(p.poll.min(deadline - now)) => {}
                _ = interrupt.notified() => return interrupted(p, &mut meter).await,
            }
        }
        first_poll = false;
        let (q, o, id) = (p.queue.clone(), p.output.clone(), p.id);
        match tokio::task::spawn_blocking(move || look(&q, &o, &id)).await {
            Ok(Look::Record(r)) => {
                meter.finish();
                return Waited::Result(r);
            }
            Ok(Look::State(Some((state, lease)))) => {
                if state.is_final() {
                    final_without_record += 1;
                    // A recovering agent writes the record just after moving the job; give it a
                    // few polls before reporting what the queue says.
                    if final_without_record >= 3 {
                        meter.finish();
                        let reason = reason_of(&p.queue, &p.id, state);
                        return Waited::EndedWithoutRecord { state, reason };
                    }
                } else if let Some(l) = lease {
                    meter.set_percent(&l.phase, l.percent);
                } else {
                    meter.set_percent(state.dir_name(), 0.0);
                }
            }
            Ok(Look::State(None)) => {}
            Err(e) => tracing::warn!("checking the result: {e}"),
        }
        if Instant::now() >= deadline {
            meter.finish();
            return timed_out(p).await;
        }
        // Back to the stream as soon as an agent answers again.
        if let Some(ep) = answering(p, agent.as_ref()).await {
            tracing::info!(job = %p.id, "back on the gRPC stream: the agent at {} answers; following the job there", ep.url);
            agent = Some(ep);
            streaming = true;
        }
    }
}

/// While polling: the agent followed before, else (when asked to) another registered in the queue,
/// if it accepts a connection now. Each try is bounded by the poll interval (at most 1 s), so a
/// silently dropped port does not stretch the polling.
async fn answering(p: &WaitParams, known: Option<&AgentEndpoint>) -> Option<AgentEndpoint> {
    let quick = |ep: &AgentEndpoint| {
        let mut q = ep.clone();
        q.connect_timeout = q.connect_timeout.min(p.poll).min(Duration::from_secs(1)).max(Duration::from_millis(200));
        q
    };
    if let Some(ep) = known
        && quick(ep).connect().await.is_ok()
    {
        return Some(ep.clone());
    }
    let base = p.rediscover.as_ref()?;
    let (eps, _) = crate::detect::registered(p.queue.root(), base).await;
    for ep in eps.into_iter().filter(|e| known.is_none_or(|k| k.url != e.url)) {
        if quick(&ep).connect().await.is_ok() {
            return Some(ep);
        }
    }
    None
}

/// Follow the watch stream until the final state (or a failure of the stream).
async fn stream(p: &WaitParams, agent: &AgentEndpoint, meter: &mut Meter) -> Step {
    let mut client = match agent.connect().await {
        Ok(c) => c,
        Err(e) => return Step::Poll(e),
    };
    let req = pb::WatchJobRequest { id: p.id.to_string(), heartbeat_seconds: 2 };
    let mut s = match client.watch_job(req).await {
        Ok(r) => r.into_inner(),
        Err(st) if st.code() == tonic::Code::NotFound => {
            // The agent does not see the job (yet): its share may lag (NFS caches directory
            // listings); poll, and come back.
            return Step::Poll(format!("the agent does not see job {} yet: {}", p.id, Esc(st.message())));
        }
        Err(st) => return Step::Poll(format!("{}: {}", st.code(), Esc(st.message()))),
    };
    // A heartbeat arrives every 2 s: silence for much longer means a dead link.
    let silence = Duration::from_secs(10);
    loop {
        let next = match tokio::time::timeout(silence, s.next()).await {
            Ok(n) => n,
            Err(_) => return Step::Poll(format!("nothing from the agent for {}s", silence.as_secs())),
        };
        match next {
            Some(Ok(u)) => {
                let Some(job) = u.job else { continue };
                let pct = job.progress.as_ref().map(|x| x.percent).unwrap_or(0.0);
                meter.set_percent(phase_name(job.phase()), pct);
                if u.is_final {
                    return Step::Done(Box::new(final_result(p, job, &mut client).await));
                }
            }
            Some(Err(st)) => return Step::Poll(format!("the stream broke: {}: {}", st.code(), Esc(st.message()))),
            None => return Step::Poll("the stream ended before the job did".into()),
        }
    }
}

/// The final state arrived over gRPC: the record in the output directory is authoritative. When
/// it is not readable from this host (the output is not mounted here, or not yet visible), the
/// agent's own view of the job is the answer: asked for once more with `GetJob`, which carries what
/// the stream leaves out (the full error, the libvirt outcome).
async fn final_result(
    p: &WaitParams,
    job: pb::Job,
    client: &mut pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
) -> Waited {
    for _ in 0..20 {
        let (o, id) = (p.output.clone(), p.id);
        if let Ok(Ok(Some(r))) = tokio::task::spawn_blocking(move || o.read_record(&id)).await {
            return Waited::Result(r);
        }
        if !p.output.path().is_dir() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(
        job = %p.id,
        "the result record is not readable in {} (not mounted on this host?): taking the agent's answer",
        p.output.path().display()
    );
    let req = pb::GetJobRequest { id: p.id.to_string() };
    match tokio::time::timeout(Duration::from_secs(5), client.get_job(req)).await {
        Ok(Ok(full)) if full.get_ref().state() == job.state() => Waited::Remote(full.into_inner()),
        Ok(Ok(_)) => Waited::Remote(job),
        Ok(Err(st)) => {
            tracing::debug!("GetJob {} after its end: {}: {}", p.id, st.code(), Esc(st.message()));
            Waited::Remote(job)
        }
        Err(_) => Waited::Remote(job),
    }
}

pub fn phase_name(p: pb::Phase) -> &'static str {
    match p {
        pb::Phase::Queued => "queued",
        pb::Phase::Verifying => "verifying",
        pb::Phase::Converting => "converting",
        pb::Phase::Checking => "checking",
        pb::Phase::Publishing => "publishing",
        pb::Phase::Done => "done",
        pb::Phase::Failed => "failed",
        pb::Phase::Cancelled => "cancelled",
        pb::Phase::Unspecified => "unknown",
    }
}

enum Look {
    Record(ResultRecord),
    State(Option<(State, Option<LeaseInfo>)>),
}

fn look(q: &Queue, o: &OutputDir, id: &JobId) -> Look {
    if let Ok(Some(r)) = o.read_record(id) {
        return Look::Record(r);
    }
    match q.locate(id) {
        Ok(Some((state, dir))) => {
            let lease = queue::read_lease(&dir.join(queue::LEASE)).ok().and_then(|(_, l)| l);
            Look::State(Some((state, lease)))
        }
        _ => Look::State(None),
    }
}

fn reason_of(q: &Queue, id: &JobId, state: State) -> String {
    let dir = q.job_dir(state, id);
    queue::cancel_reason(&dir)
        .or_else(|| queue::failure_reason(&dir))
        .unwrap_or_else(|| format!("the job is in {}/ without a result record", state.dir_name()))
}

async fn interrupted(p: &WaitParams, meter: &mut Meter) -> Waited {
    meter.finish();
    let (q, id) = (p.queue.clone(), p.id);
    let withdrawn = tokio::task::spawn_blocking(move || q.withdraw(&id, "hyperexport was interrupted while waiting"))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(false);
    Waited::Interrupted { withdrawn }
}

async fn timed_out(p: &WaitParams) -> Waited {
    let (q, id) = (p.queue.clone(), p.id);
    let reason = format!("hyperexport timed out after {}", hyperfarm_shared::duration::show(p.timeout));
    let res = tokio::task::spawn_blocking(move || {
        let withdrawn = q.withdraw(&id, &reason).unwrap_or(false);
        let located = q.locate(&id).ok().flatten();
        let lease =
            located.as_ref().and_then(|(_, dir)| queue::read_lease(&dir.join(queue::LEASE)).ok().and_then(|(_, l)| l));
        (withdrawn, located.map(|(s, _)| s), lease)
    })
    .await;
    match res {
        Ok((withdrawn, state, lease)) => Waited::TimedOut { withdrawn, state, lease },
        Err(_) => Waited::TimedOut { withdrawn: false, state: None, lease: None },
    }
}

/// Full paths of a record's files, boot disk first: where each of *this job's* files is now (with
/// `on_existing = "archive"`, a later job of the same VM may already have moved it aside).
pub fn result_paths(output: &OutputDir, r: &ResultRecord) -> Vec<PathBuf> {
    let mut files: Vec<_> = r.files.iter().collect();
    files.sort_by_key(|f| !f.boot);
    files
        .iter()
        .map(|f| match output.locate(f) {
            Some(p) => {
                if p.file_name().is_some_and(|n| n.to_string_lossy() != f.name) {
                    tracing::warn!(
                        job = %r.job_id,
                        "a later job of VM {} took the name {}; this job's disk was moved to {}",
                        r.vm_name,
                        f.name,
                        p.display()
                    );
                }
                p
            }
            None => {
                tracing::warn!(job = %r.job_id, "{} no longer holds this job's disk (moved or removed since)", f.name);
                output.path().join(&f.name)
            }
        })
        .collect()
}
