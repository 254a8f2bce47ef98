//! The `hyperfarm.v1.AgentService` implementation.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::Ordering;

use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::JobId;
use hyperfarm_shared::fsx;
use hyperfarm_shared::queue::State;

use super::HealthState;
use super::auth::ControlPolicy;
use super::jobs;
use crate::agent::Core;
use crate::job::StopReason;

/// Messages buffered per streaming client; a client that lets them pile up is dropped.
const STREAM_BUFFER: usize = 32;
/// Default heartbeat period of the watch streams.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How often a watched job that this agent is not running is re-read from disk.
const DISK_POLL: Duration = Duration::from_millis(500);

/// Concurrent ListJobs calls at most (each is served from memory; the bound keeps a flood of
/// them from taking the API's two threads for long).
const MAX_LISTINGS: usize = 16;
/// Jobs per ListJobs page at most (and by default).
pub const MAX_PAGE: usize = 1000;

/// The service: a thin layer over the agent's [`Core`].
#[derive(Debug, Clone)]
pub struct AgentApi {
    core: Arc<Core>,
    policy: ControlPolicy,
    health: Arc<HealthState>,
    tls: bool,
    mutual_tls: bool,
    listings: Arc<Semaphore>,
    watchers: Arc<Semaphore>,
}

impl AgentApi {
    pub fn new(core: Arc<Core>, policy: ControlPolicy, health: Arc<HealthState>, tls: bool, mutual_tls: bool) -> Self {
        let watchers = Arc::new(Semaphore::new(core.cfg.grpc.max_watchers));
        AgentApi { core, policy, health, tls, mutual_tls, listings: Arc::new(Semaphore::new(MAX_LISTINGS)), watchers }
    }

    fn watcher_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many watch streams are open (max_watchers = {}); retry later",
                self.core.cfg.grpc.max_watchers
            ))
        })
    }
}

fn parse_id(s: &str) -> Result<JobId, Status> {
    s.parse().map_err(|e| Status::invalid_argument(format!("{e}")))
}

/// Run `f`, which touches the shared storage, on the API's blocking threads, with a deadline: a
/// hung share makes the call fail UNAVAILABLE, never hang.
async fn disk<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    match tokio::time::timeout(super::DISK_DEADLINE, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Status::internal(format!("worker task failed: {e}"))),
        Err(_) => Err(Status::unavailable(format!(
            "the shared storage did not answer within {}s; try again when it does",
            super::DISK_DEADLINE.as_secs()
        ))),
    }
}

fn space(path: &std::path::Path, (free, total): (u64, u64), writable: Result<(), String>) -> pb::FileSystemSpace {
    pb::FileSystemSpace {
        path: path.display().to_string(),
        free_bytes: free,
        total_bytes: total,
        writable: writable.is_ok(),
        error: writable.err().unwrap_or_default(),
    }
}

/// The states a ListJobs request asks for; unspecified and unknown values are refused.
pub fn parse_states(raw: &[i32]) -> Result<Vec<State>, Status> {
    raw.iter()
        .map(|&v| {
            pb::JobState::try_from(v).ok().and_then(jobs::state_from_pb).ok_or_else(|| {
                Status::invalid_argument(format!("states: {v} is not a job state (1 to 5; 0 is not a filter)"))
            })
        })
        .collect()
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Result<Response<pb::AgentStatus>, Status> {
        // Memory only: the index for the queue, the last probe for the file systems.
        let may_control = self.policy.allows(&req);
        let core = &self.core;
        let health = self.health.snapshot();
        let [queued, converting, done, failed, cancelled] = core.index.counts();
        let depth = pb::QueueDepth { queued, converting, done, failed, cancelled };
        let now = hyperfarm_shared::queue::now_ms();
        let started_at_ms = now.saturating_sub(core.started.elapsed().as_millis() as u64);
        Ok(Response::new(pb::AgentStatus {
            instance: core.cfg.instance.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            host: fsx::hostname(),
            pid: std::process::id(),
            started_at_ms,
            uptime_seconds: core.started.elapsed().as_secs(),
            engines: vec![
                pb::Engine {
                    name: "qemu-img".into(),
                    version: core.qemu_version.clone(),
                    available: health.engine.is_ok(),
                    path: core.cfg.qemu_img.display().to_string(),
                    stages: vec!["convert".into(), "validate".into()],
                    detail: health.engine.clone().err().unwrap_or_default(),
                },
                match &core.settings.hyper2kvm {
                    Ok(h) => pb::Engine {
                        name: "hyper2kvm".into(),
                        version: h.version.clone(),
                        available: true,
                        path: h.program.display().to_string(),
                        stages: h.stages().iter().map(|s| s.to_string()).collect(),
                        detail: h.caps.can_fix().err().map(|why| format!("no fix stage: {why}")).unwrap_or_default(),
                    },
                    Err(why) => pb::Engine {
                        name: "hyper2kvm".into(),
                        available: false,
                        path: core.cfg.hyper2kvm_path.display().to_string(),
                        detail: why.clone(),
                        ..Default::default()
                    },
                },
            ],
            default_engine: core.settings.default_engine().to_string(),
            queue_depth: Some(depth),
            running: core.board.running().iter().map(jobs::from_view).collect(),
            queue_fs: Some(space(&core.cfg.watch_dir, health.queue_space, health.queue.clone())),
            output_fs: Some(space(&core.cfg.output_dir, health.output_space, health.output.clone())),
            watch_dir: core.cfg.watch_dir.display().to_string(),
            output_dir: core.cfg.output_dir.display().to_string(),
            max_concurrent: core.cfg.max_concurrent as u32,
            shutting_down: core.shutdown.is_cancelled(),
            caller_may_control: may_control,
            tls: self.tls,
            mutual_tls: self.mutual_tls,
            serving: health.serving(),
            scans: core.scans(),
            queue_as_of_ms: core.index.as_of_ms(),
            connections: core.connections.open.load(Ordering::Relaxed) as u32,
            max_connections: core.connections.max.load(Ordering::Relaxed) as u32,
            probed_at_ms: health.probed_at_ms,
        }))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let _slot = self.listings.try_acquire().map_err(|_| {
            Status::resource_exhausted(format!("more than {MAX_LISTINGS} listings at once; retry shortly"))
        })?;
        let r = req.into_inner();
        let states = parse_states(&r.states)?;
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(r.page_token.parse::<JobId>().map_err(|_| {
                Status::invalid_argument(
                    "page_token is not a token this agent gave (pass next_page_token back as it is)",
                )
            })?)
        };
        let limit = if r.limit == 0 { MAX_PAGE } else { (r.limit as usize).min(MAX_PAGE) };
        let (list, total, next, as_of_ms) = jobs::list(&self.core, &states, after, limit);
        Ok(Response::new(pb::ListJobsResponse {
            jobs: list,
            total,
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
            as_of_ms,
        }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let id = parse_id(&req.get_ref().id)?;
        let in_memory = jobs::lookup_memory(&self.core, &id);
        // One job is worth one bounded look at the share: its record has the full error text and
        // is the truth the moment it is written. Otherwise memory has the live view; and when the
        // share does not answer in time, memory answers alone.
        let core = self.core.clone();
        let on_disk = disk(move || jobs::from_disk(&core, &id, true)).await;
        match (on_disk, in_memory) {
            (Ok(Some(d)), _) if jobs::is_final(&d) => Ok(Response::new(d)),
            (_, Some(m)) => Ok(Response::new(m)),
            (Ok(Some(d)), None) => Ok(Response::new(d)),
            (Ok(None), None) => Err(Status::not_found(format!("no job {id} in {}", self.core.cfg.watch_dir.display()))),
            (Err(e), None) => Err(e),
        }
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.policy.check(&req)?;
        let r = req.into_inner();
        let id = parse_id(&r.id)?;
        let reason = if r.reason.trim().is_empty() {
            "cancelled through the agent's API".to_string()
        } else {
            hyperfarm_shared::text::bounded(&r.reason, hyperfarm_shared::queue::MAX_REASON)
        };
        let core = self.core.clone();
        let reason2 = reason.clone();
        let seen = disk(move || core.queue.request_cancel(&id, &reason2))
            .await?
            .map_err(|e| Status::unavailable(format!("cannot write the cancel request: {e}")))?;
        // A job this agent runs stops now rather than at its next heartbeat.
        if let Some(r) = self.core.running.lock().expect("running lock").get(&id) {
            r.stop.stop(StopReason::Cancel(reason.clone()));
        }
        tracing::info!(job = %id, reason = %reason, "cancel requested through the API");
        let (state, message) = match seen {
            Some(State::Cancelled) => {
                (pb::JobState::Cancelled, "withdrawn from the queue before any agent claimed it".to_string())
            }
            Some(State::Converting) => (
                pb::JobState::Converting,
                "the agent converting it will stop it and publish a cancelled result".to_string(),
            ),
            Some(s) => (jobs::state_to_pb(s), format!("the job had already ended ({s}); nothing to cancel")),
            None => return Err(Status::not_found(format!("no job {id} in {}", self.core.cfg.watch_dir.display()))),
        };
        let mut resp = pb::CancelJobResponse { message, ..Default::default() };
        resp.set_state(state);
        Ok(Response::new(resp))
    }

    async fn retry_job(&self, req: Request<pb::RetryJobRequest>) -> Result<Response<pb::RetryJobResponse>, Status> {
        self.policy.check(&req)?;
        let id = parse_id(&req.get_ref().id)?;
        let core = self.core.clone();
        let new = disk(move || hyperfarm_shared::queue::retry(&core.queue, &id)).await?.map_err(|e| match e {
            hyperfarm_shared::queue::RetryError::NotFound(_) => Status::not_found(e.to_string()),
            hyperfarm_shared::queue::RetryError::Io { .. } | hyperfarm_shared::queue::RetryError::Publish { .. } => {
                Status::unavailable(e.to_string())
            }
            _ => Status::failed_precondition(e.to_string()),
        })?;
        tracing::info!(job = %id, new = %new, "retried through the API");
        Ok(Response::new(pb::RetryJobResponse { new_id: new.to_string() }))
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobUpdate, Status>>;

    async fn watch_job(&self, req: Request<pb::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let r = req.into_inner();
        let id = parse_id(&r.id)?;
        let heartbeat = if r.heartbeat_seconds == 0 {
            HEARTBEAT
        } else {
            Duration::from_secs(u64::from(r.heartbeat_seconds.clamp(1, 300)))
        };
        let slot = self.watcher_slot()?;
        let (_, mut sub) = self.core.board.subscribe();
        let first = match jobs::lookup_memory(&self.core, &id) {
            Some(j) => j,
            None => {
                let core = self.core.clone();
                disk(move || jobs::from_disk(&core, &id, false))
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no job {id} in {}", self.core.cfg.watch_dir.display())))?
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let core = self.core.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let send = |job: pb::Job, heartbeat: bool| {
                let is_final = jobs::is_final(&job);
                let update = pb::JobUpdate { job: Some(job), heartbeat, is_final, seq: core.board.seq() };
                match tx.try_send(Ok(update)) {
                    Ok(()) => true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::info!(job = %id, "dropping a watch client that does not keep up");
                        false
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => false,
                }
            };
            let mut last = first;
            if !send(last.clone(), false) || jobs::is_final(&last) {
                return;
            }
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
            let mut poll = tokio::time::interval(DISK_POLL);
            loop {
                let next = tokio::select! {
                    r = sub.recv() => match r {
                        Ok(change) if change.view.id == id => Some(jobs::from_view(&change.view)),
                        Ok(_) => None,
                        Err(broadcast::error::RecvError::Lagged(_)) => jobs::lookup_memory(&core, &id),
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = poll.tick() => {
                        // Jobs another agent converts are followed through the index (memory).
                        if core.board.get(&id).is_some_and(|v| !v.progress.phase.is_final()) { None } else { jobs::lookup_memory(&core, &id) }
                    }
                    _ = beat.tick() => {
                        if !send(last.clone(), true) { return; }
                        None
                    }
                    _ = tx.closed() => return,
                };
                let Some(job) = next else { continue };
                if job != last {
                    last = job;
                    if !send(last.clone(), false) {
                        return;
                    }
                    beat.reset();
                }
                if jobs::is_final(&last) {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type WatchJobsStream = ReceiverStream<Result<pb::JobsUpdate, Status>>;

    async fn watch_jobs(&self, req: Request<pb::WatchJobsRequest>) -> Result<Response<Self::WatchJobsStream>, Status> {
        let slot = self.watcher_slot()?;
        let from = req.into_inner().from_seq;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let core = self.core.clone();
        let (mut sub, mut seq) = if from == 0 {
            let (seq, views, sub) = core.board.snapshot();
            let mut jobs_now: Vec<pb::Job> = views.iter().map(jobs::from_view).collect();
            let (queued, _, _, _) = jobs::list(&core, &[State::Queued], None, MAX_PAGE);
            jobs_now.extend(queued.into_iter().filter(|q| !views.iter().any(|v| v.id.to_string() == q.id)));
            let update = pb::JobsUpdate {
                seq,
                update: Some(pb::jobs_update::Update::Snapshot(pb::JobsSnapshot { jobs: jobs_now })),
            };
            tx.try_send(Ok(update)).map_err(|_| Status::internal("stream buffer"))?;
            (sub, seq)
        } else {
            let (changes, sub) = core.board.since(from).map_err(|oldest| {
                Status::out_of_range(format!(
                    "changes after {from} are no longer remembered (the oldest is {oldest}); list again with from_seq = 0"
                ))
            })?;
            let mut seq = from;
            for c in changes {
                seq = c.seq;
                let update = pb::JobsUpdate {
                    seq: c.seq,
                    update: Some(pb::jobs_update::Update::Change(jobs::from_view(&c.view))),
                };
                if tx.try_send(Ok(update)).is_err() {
                    return Err(Status::resource_exhausted("too many changes to replay; list again with from_seq = 0"));
                }
            }
            (sub, seq)
        };
        tokio::spawn(async move {
            let _slot = slot;
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
            loop {
                let update = tokio::select! {
                    r = sub.recv() => match r {
                        Ok(c) if c.seq <= seq => continue,
                        Ok(c) => {
                            seq = c.seq;
                            beat.reset();
                            pb::JobsUpdate { seq: c.seq, update: Some(pb::jobs_update::Update::Change(jobs::from_view(&c.view))) }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx.try_send(Err(Status::out_of_range(format!(
                                "this client fell {n} changes behind; resume with from_seq = {seq} or list again"
                            ))));
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = beat.tick() => pb::JobsUpdate { seq, update: Some(pb::jobs_update::Update::Heartbeat(true)) },
                    _ = tx.closed() => return,
                };
                if tx.try_send(Ok(update)).is_err() {
                    tracing::info!("dropping a jobs watcher that does not keep up");
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
