//! Running the jobs of `hyperexport serve`.
//!
//! Each job is the hyperexport CLI itself, run as a child process with `--progress json` (the
//! same code as on the command line, and a crash of one export cannot take the daemon down); its
//! events update the job's row and are broadcast to the browsers (server-sent events). In daemon
//! mode those events come from the child following the agent's gRPC watch stream, falling back
//! to polling the output directory exactly as the CLI does.
//!
//! The queue job's id is chosen here and given to the child (`--job-id`): a child run again for
//! the same job — after a restart of serve, or a retry of an interrupted job — finds the job in
//! the queue and follows it instead of submitting it twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::sync::{Semaphore, broadcast};

use hyperfarm_shared::JobId;
use hyperfarm_shared::queue::{Queue, State};

use super::db::{Db, JobRow, Update};
use super::metrics::Metrics;
use super::request::{ExportRequest, Mode};

/// Longest line read from a child (longer ones are cut).
const MAX_LINE: usize = 64 * 1024;
/// Children (hyperexport processes) at once, exporting or following a job in the farm: a
/// follower holds no export slot, but each is a process.
pub const MAX_CHILDREN: usize = 32;

/// States of a job in serve's history.
pub const PENDING: &str = "pending";
pub const EXPORTING: &str = "exporting";
pub const QUEUED: &str = "queued";
pub const CONVERTING: &str = "converting";
pub const DONE: &str = "done";
pub const FAILED: &str = "failed";
pub const CANCELLED: &str = "cancelled";
pub const INTERRUPTED: &str = "interrupted";
pub const ALL_STATES: [&str; 8] = [PENDING, EXPORTING, QUEUED, CONVERTING, DONE, FAILED, CANCELLED, INTERRUPTED];
/// States with a child process (or waiting for one).
const ACTIVE: [&str; 4] = [PENDING, EXPORTING, QUEUED, CONVERTING];

pub fn is_final(state: &str) -> bool {
    matches!(state, DONE | FAILED | CANCELLED | INTERRUPTED)
}

pub fn now_ms() -> i64 {
    hyperfarm_shared::queue::now_ms() as i64
}

#[derive(Debug, Default)]
struct Running {
    pid: Option<u32>,
    cancel: bool,
    queue: Option<PathBuf>,
    queue_job_id: String,
}

/// What a submission with an idempotency key did.
#[derive(Debug)]
pub enum Submitted {
    New(Vec<JobRow>),
    /// The key was used before for the same request: its jobs, nothing new.
    Earlier(Vec<JobRow>),
    /// The key was used before for another request.
    KeyReused,
}

/// Why an action on a job was refused (HTTP 404 / 409).
#[derive(Debug)]
pub enum Refused {
    NotFound,
    Conflict(String),
    Internal(String),
}

/// What hyperexport.toml says about queues (for finding a job's queue without its child).
#[derive(Debug, Clone, Default)]
pub struct QueueDefaults {
    pub config_watch_dir: Option<PathBuf>,
    pub config_instance: Option<String>,
}

pub struct Manager {
    queues: QueueDefaults,
    pub db: Arc<Db>,
    exe: PathBuf,
    config: Option<PathBuf>,
    /// Children copying into the queue (or converting here) at once: `--max-concurrent`.
    slots: Arc<Semaphore>,
    /// Children at all, exporting or following a published job.
    children: Arc<Semaphore>,
    /// Serialises the decisions that start a job again or end one without its child (retry,
    /// cancel of a job with no child), so that two requests cannot both act on one job.
    control: Mutex<()>,
    pub events: broadcast::Sender<Arc<str>>,
    running: Mutex<HashMap<String, Running>>,
    shutting_down: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub max_concurrent: usize,
}

impl Manager {
    pub fn new(
        db: Arc<Db>,
        exe: PathBuf,
        config: Option<PathBuf>,
        max_concurrent: usize,
        metrics: Arc<Metrics>,
        queues: QueueDefaults,
    ) -> Arc<Manager> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Manager {
            db,
            exe,
            config,
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            children: Arc::new(Semaphore::new(MAX_CHILDREN.max(max_concurrent))),
            control: Mutex::new(()),
            events,
            running: Mutex::new(HashMap::new()),
            shutting_down: AtomicBool::new(false),
            metrics,
            max_concurrent: max_concurrent.max(1),
            queues,
        })
    }

    /// The queue a request's job goes to, as its child resolves it (the request, then
    /// hyperexport.toml, then the instance's default); `None` in direct mode.
    fn queue_of(&self, r: &ExportRequest) -> Option<PathBuf> {
        match r.mode() {
            Mode::Direct => None,
            Mode::ExportOnly => r.output_dir.clone().map(PathBuf::from),
            Mode::Daemon => Some(match (&r.options.hyper2kvm_watch_dir, &self.queues.config_watch_dir) {
                (Some(d), _) => PathBuf::from(d),
                (None, Some(d)) => d.clone(),
                (None, None) => hyperfarm_shared::instance::watch_dir(
                    r.options
                        .hyper2kvm_instance
                        .as_deref()
                        .filter(|i| !i.is_empty())
                        .or(self.queues.config_instance.as_deref()),
                ),
            }),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Persist a change and tell the browsers. Returns whether the row changed (an update with
    /// `only_active` leaves an ended job alone).
    fn update(&self, id: &str, u: &Update) -> bool {
        let changed = match self.db.update(id, u, now_ms()) {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::error!(job = %id, "cannot record the job's state in the job database: {e}");
                false
            }
        };
        if changed {
            self.announce(id);
        }
        changed
    }

    /// Broadcast the row without its request (small and bounded whatever was submitted).
    fn announce(&self, id: &str) {
        if let Ok(Some(mut row)) = self.db.get(id) {
            row.request = serde_json::Value::Null;
            if let Ok(text) = serde_json::to_string(&row) {
                let _ = self.events.send(text.into());
            }
        }
    }

    /// Record the requests (all or none) and start them.
    pub fn submit(self: &Arc<Self>, reqs: Vec<ExportRequest>) -> Result<Vec<JobRow>, String> {
        match self.submit_once(reqs, None)? {
            Submitted::New(rows) | Submitted::Earlier(rows) => Ok(rows),
            Submitted::KeyReused => Err("internal: a key conflict without a key".into()),
        }
    }

    /// Like [`Manager::submit`], with an idempotency key (the client's key and the request's
    /// hash): a key seen before returns the jobs it made, nothing new is started.
    pub fn submit_once(
        self: &Arc<Self>,
        reqs: Vec<ExportRequest>,
        key: Option<(&str, &str)>,
    ) -> Result<Submitted, String> {
        let now = now_ms();
        let rows: Vec<JobRow> = reqs
            .into_iter()
            .map(|r| {
                let id = JobId::new().to_string();
                JobRow::pending(
                    id.clone(),
                    r.display_name(),
                    r.mode().as_str(),
                    (r.mode() != Mode::Direct).then_some(id),
                    serde_json::to_value(&r).unwrap_or_default(),
                    now,
                )
            })
            .collect();
        let earlier = self
            .db
            .insert_all_once(&rows, key)
            .map_err(|e| format!("cannot record the jobs in the job database: {e}"))?;
        if let Some((hash, ids)) = earlier {
            if key.is_some_and(|(_, h)| h != hash) {
                return Ok(Submitted::KeyReused);
            }
            let rows = ids.iter().filter_map(|id| self.db.get(id).ok().flatten()).collect();
            return Ok(Submitted::Earlier(rows));
        }
        for r in &rows {
            tracing::info!(job = %r.id, name = %hyperfarm_shared::text::Esc(&r.name), mode = %r.mode, "job submitted");
            self.announce(&r.id);
            self.start(r.id.clone());
        }
        Ok(Submitted::New(rows))
    }

    /// Start the job's task unless one runs: the entry in `running` is made here, before the
    /// task, so that a second start (a double retry) finds it.
    fn start(self: &Arc<Self>, id: String) -> bool {
        {
            let mut running = self.running();
            if running.contains_key(&id) {
                return false;
            }
            running.insert(id.clone(), Running::default());
        }
        let me = self.clone();
        tokio::spawn(async move { me.run(id).await });
        true
    }

    /// Pick up the history after a start: jobs that were published are followed again (the
    /// child finds them in the queue), jobs caught halfway through their export are marked
    /// interrupted, to be retried.
    pub async fn recover(self: &Arc<Self>) -> Result<(), String> {
        let rows = self.db.in_states(&ACTIVE).map_err(|e| format!("job database: {e}"))?;
        for r in rows {
            if let Some(pid) = r.pid {
                stop_leftover_child(pid as u32, r.queue_job_id.as_deref().unwrap_or(&r.id)).await;
            }
            if r.state == PENDING {
                self.start(r.id.clone());
            } else if let Some(q) = self.published_meanwhile(&r) {
                // Its export finished (a child that outlived the earlier serve) after the last
                // event serve recorded: follow it.
                tracing::info!(job = %r.id, queue = %q.display(), "the job reached the queue while serve was down: following it");
                self.db
                    .log(
                        &r.id,
                        &["hyperexport serve restarted: the job is in the queue, following it".into()],
                        now_ms(),
                    )
                    .ok();
                self.update(&r.id, &Update { queue: Some(Some(q.display().to_string())), ..Default::default() });
                self.start(r.id.clone());
            } else if r.queue.is_some() {
                tracing::info!(job = %r.id, queue_job = ?r.queue_job_id, "following the job again after a restart (it is in the queue)");
                self.db.log(&r.id, &["hyperexport serve restarted: following this job again".into()], now_ms()).ok();
                self.start(r.id.clone());
            } else {
                tracing::warn!(job = %r.id, "the job was interrupted by a restart of hyperexport serve during its export");
                self.update(
                    &r.id,
                    &Update {
                        state: Some(INTERRUPTED.into()),
                        error: Some(Some(
                            "hyperexport serve stopped while this job was exporting. Retry it: the retry uses the same queue job id, so a job that did reach the queue is followed, never submitted twice".into(),
                        )),
                        finished_ms: Some(Some(now_ms())),
                        pid: Some(None),
                        ..Default::default()
                    },
                );
            }
        }
        Ok(())
    }

    /// A job recorded as exporting whose queue job is in its queue after all.
    fn published_meanwhile(&self, r: &JobRow) -> Option<PathBuf> {
        if r.queue.is_some() {
            return None;
        }
        let req: ExportRequest = serde_json::from_value(r.request.clone()).ok()?;
        let root = self.queue_of(&req)?;
        let qid: JobId = r.queue_job_id.as_deref()?.parse().ok()?;
        let found = tokio::task::block_in_place(|| Queue::new(&root).locate(&qid)).ok().flatten();
        found.map(|_| root)
    }

    /// Cancel a job: not started yet → cancelled at once; exporting → the child is stopped
    /// (its staged copy is removed); in the queue → a cancel request the agent acts on, and
    /// the child (if any) sees the job end cancelled.
    pub async fn cancel(self: &Arc<Self>, id: &str) -> Result<JobRow, Refused> {
        let row = self.db.get(id).map_err(|e| Refused::Internal(e.to_string()))?.ok_or(Refused::NotFound)?;
        if is_final(&row.state) {
            return Err(Refused::Conflict(format!("job {id} is already {}; nothing to cancel", row.state)));
        }
        let (pid, queue, qid) = {
            let mut running = self.running();
            match running.get_mut(id) {
                Some(r) => {
                    r.cancel = true;
                    (r.pid, r.queue.clone(), Some(r.queue_job_id.clone()).filter(|q| !q.is_empty()))
                }
                None => (None, None, None),
            }
        };
        // A published job whose follower is not running (waiting for a slot after a restart):
        // its queue is in the row.
        let queue = queue.or_else(|| row.queue.clone().map(PathBuf::from));
        let qid = qid.or_else(|| row.queue_job_id.clone());
        match (pid, queue, qid) {
            (_, Some(q), Some(qid)) => {
                let qid2 = qid.clone();
                let asked = tokio::task::spawn_blocking(move || -> std::io::Result<Option<State>> {
                    let id: JobId = qid2.parse().map_err(|e| std::io::Error::other(format!("{e}")))?;
                    Queue::new(q).request_cancel(&id, "cancelled from hyperexport serve")
                })
                .await
                .map_err(|e| Refused::Internal(e.to_string()))?;
                match asked {
                    Ok(Some(s)) if !s.is_final() || s == State::Cancelled => {
                        self.db.log(id, &[format!("cancel requested: queue job {qid} ({s})")], now_ms()).ok();
                        if pid.is_none() {
                            self.end_without_child(id, CANCELLED, "cancelled in the queue");
                        }
                    }
                    Ok(Some(s)) => {
                        // It ended meanwhile (done or failed): its follower reports that.
                        if let Some(r) = self.running().get_mut(id) {
                            r.cancel = false;
                        }
                        return Err(Refused::Conflict(format!(
                            "queue job {qid} already ended ({s}); nothing to cancel"
                        )));
                    }
                    Ok(None) => {
                        // Not in the queue (removed by hand, or the wrong queue): stop following.
                        match pid {
                            Some(pid) => signal(pid, rustix::process::Signal::TERM),
                            None => self.end_without_child(id, CANCELLED, "cancelled (the queue job was not found)"),
                        }
                    }
                    Err(e) => {
                        if let Some(r) = self.running().get_mut(id) {
                            r.cancel = false;
                        }
                        return Err(Refused::Internal(format!(
                            "cannot ask the queue to cancel job {qid}: {e}; nothing was changed"
                        )));
                    }
                }
            }
            (Some(pid), _, _) => {
                self.db.log(id, &["cancel requested: stopping the export".into()], now_ms()).ok();
                signal(pid, rustix::process::Signal::TERM);
            }
            _ => {
                // Waiting for a slot, never published: it will not start.
                self.end_without_child(id, CANCELLED, "cancelled before it started");
            }
        }
        self.db.get(id).map_err(|e| Refused::Internal(e.to_string()))?.ok_or(Refused::NotFound)
    }

    /// End a job that has no child running, unless it ended meanwhile.
    fn end_without_child(&self, id: &str, state: &str, phase: &str) {
        let _g = self.control.lock().unwrap_or_else(|p| p.into_inner());
        if self.running().get(id).is_some_and(|r| r.pid.is_some()) {
            return;
        }
        self.update(
            id,
            &Update {
                state: Some(state.into()),
                phase: Some(phase.into()),
                finished_ms: Some(Some(now_ms())),
                only_active: true,
                ..Default::default()
            },
        );
    }

    /// Run a failed, cancelled or interrupted job again. A job whose queue job is still in the
    /// queue and not ended (interrupted, or failed while following it) keeps its queue id and is
    /// followed; the others get a new id and are submitted anew.
    pub fn retry(self: &Arc<Self>, id: &str) -> Result<JobRow, Refused> {
        let _g = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let row = self.db.get(id).map_err(|e| Refused::Internal(e.to_string()))?.ok_or(Refused::NotFound)?;
        if !matches!(row.state.as_str(), FAILED | CANCELLED | INTERRUPTED) {
            return Err(Refused::Conflict(format!(
                "job {id} is {}; only failed, cancelled or interrupted jobs can be retried",
                row.state
            )));
        }
        if self.running().contains_key(id) {
            return Err(Refused::Conflict(format!("job {id} is still stopping; retry it in a moment")));
        }
        let alive_in_queue = || -> bool {
            let (Some(q), Some(qid)) = (&row.queue, row.queue_job_id.as_deref().and_then(|q| q.parse::<JobId>().ok()))
            else {
                return false;
            };
            tokio::task::block_in_place(|| Queue::new(q).locate(&qid))
                .ok()
                .flatten()
                .is_some_and(|(s, _)| !s.is_final())
        };
        let qid = match (row.mode.as_str(), row.state.as_str()) {
            ("direct", _) => None,
            (_, INTERRUPTED) => row.queue_job_id.clone(),
            _ if alive_in_queue() => row.queue_job_id.clone(),
            _ => Some(JobId::new().to_string()),
        };
        self.db
            .log(id, &[format!("retry {} (queue job {})", row.attempts + 1, qid.as_deref().unwrap_or("-"))], now_ms())
            .ok();
        self.update(
            id,
            &Update {
                state: Some(PENDING.into()),
                phase: Some("waiting for a slot".into()),
                percent: Some(0.0),
                disks: Some(serde_json::json!({})),
                queue_job_id: Some(qid),
                queue: Some(None),
                job_dir: Some(None),
                files: Some(serde_json::json!([])),
                error: Some(None),
                exit_code: Some(None),
                attempts: Some(row.attempts + 1),
                finished_ms: Some(None),
                pid: Some(None),
                only_active: false,
            },
        );
        self.start(id.to_string());
        self.db.get(id).map_err(|e| Refused::Internal(e.to_string()))?.ok_or(Refused::NotFound)
    }

    /// Stop for a shutdown: exports in progress are stopped (their staged copies removed) and
    /// marked interrupted; children following a published job are killed without withdrawing it
    /// (the job goes on in the farm, and is followed again at the next start).
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        // Jobs still waiting for a slot stay pending (started at the next start).
        self.slots.close();
        self.children.close();
        let children: Vec<(String, Option<u32>, bool)> =
            self.running().iter().map(|(id, r)| (id.clone(), r.pid, r.queue.is_some())).collect();
        for (id, pid, published) in &children {
            if let Some(pid) = pid {
                tracing::info!(job = %id, published, "shutdown: stopping the job's hyperexport");
                signal(*pid, if *published { rustix::process::Signal::KILL } else { rustix::process::Signal::TERM });
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.running().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn run(self: Arc<Self>, id: String) {
        // Closed semaphores: serve is stopping; the job stays as it is for the next start.
        let Ok(child_permit) = self.children.clone().acquire_owned().await else {
            self.running().remove(&id);
            return;
        };
        let published = matches!(self.db.get(&id), Ok(Some(r)) if r.queue.is_some());
        // A job already in the queue only needs following: no export slot.
        let export_permit = if published {
            None
        } else {
            match self.slots.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => {
                    self.running().remove(&id);
                    return;
                }
            }
        };
        let row = match self.db.get(&id) {
            Ok(Some(r)) if !is_final(&r.state) && !self.shutting_down.load(Ordering::Relaxed) => r,
            _ => {
                self.running().remove(&id);
                return;
            }
        };
        if self.running().get(&id).is_some_and(|r| r.cancel) {
            self.running().remove(&id);
            return;
        }
        let outcome = self.run_child(&row, export_permit).await;
        drop(child_permit);
        self.running().remove(&id);
        if let Some((state, started)) = outcome {
            self.metrics.job_ended(&state, started.elapsed());
        }
    }

    async fn run_child(
        &self,
        row: &JobRow,
        mut export_permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Option<(String, Instant)> {
        let id = row.id.clone();
        let req: ExportRequest = match serde_json::from_value(row.request.clone()) {
            Ok(r) => r,
            Err(e) => {
                self.update(
                    &id,
                    &Update {
                        state: Some(FAILED.into()),
                        error: Some(Some(format!("the stored request cannot be read: {e}"))),
                        finished_ms: Some(Some(now_ms())),
                        ..Default::default()
                    },
                );
                return None;
            }
        };
        let qid = row.queue_job_id.clone().unwrap_or_else(|| row.id.clone());
        let args = super::request::command_args(&req, &qid, self.config.as_deref());
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at serve's terminal is serve's to handle.
            .process_group(0)
            .env("HYPEREXPORT_LOG", "info")
            .kill_on_drop(false);
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                self.update(
                    &id,
                    &Update {
                        state: Some(FAILED.into()),
                        error: Some(Some(format!("cannot start {}: {e}", self.exe.display()))),
                        finished_ms: Some(Some(now_ms())),
                        ..Default::default()
                    },
                );
                return Some((FAILED.into(), started));
            }
        };
        let pid = child.id();
        {
            let mut running = self.running();
            let r = running.entry(id.clone()).or_default();
            r.pid = pid;
            r.queue_job_id = qid.clone();
            r.queue = row.queue.clone().map(PathBuf::from);
            if let Some(pid) = pid {
                if r.cancel {
                    // Cancelled while it was being started.
                    signal(pid, rustix::process::Signal::TERM);
                } else if self.shutting_down.load(Ordering::Relaxed) {
                    // Started while serve began stopping (after shutdown's look at the children).
                    let sig =
                        if r.queue.is_some() { rustix::process::Signal::KILL } else { rustix::process::Signal::TERM };
                    signal(pid, sig);
                }
            }
        }
        let state = if row.queue.is_some() { row.state.clone() } else { EXPORTING.to_string() };
        self.update(
            &id,
            &Update {
                state: Some(state),
                phase: Some(if row.queue.is_some() { "following".into() } else { "reading the VM".into() }),
                pid: Some(pid.map(i64::from)),
                only_active: true,
                ..Default::default()
            },
        );
        self.metrics.running.inc();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let err_lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr_task = {
            let (db, id, err_lines) = (self.db.clone(), id.clone(), err_lines.clone());
            tokio::spawn(async move {
                let Some(e) = stderr else { return };
                let mut r = BufReader::new(e);
                let mut batch = Vec::new();
                let mut last_flush = Instant::now();
                let mut in_error = false;
                while let Ok(Some(line)) = next_line(&mut r, MAX_LINE).await {
                    let line = hyperfarm_shared::text::Esc(&line).to_string();
                    if let Some(msg) = line.strip_prefix("hyperexport: ") {
                        in_error = true;
                        let mut el = err_lines.lock().unwrap_or_else(|p| p.into_inner());
                        el.clear();
                        el.push(msg.to_string());
                    } else if in_error {
                        let mut el = err_lines.lock().unwrap_or_else(|p| p.into_inner());
                        if el.len() < 200 {
                            el.push(line.clone());
                        }
                    }
                    batch.push(line);
                    if batch.len() >= 50 || last_flush.elapsed() >= Duration::from_millis(500) {
                        db.log(&id, &std::mem::take(&mut batch), now_ms()).ok();
                        last_flush = Instant::now();
                    }
                }
                db.log(&id, &batch, now_ms()).ok();
            })
        };
        let mut result: Option<serde_json::Value> = None;
        let mut disks = serde_json::Map::new();
        // Progress is written (and broadcast) at most once a second per job, and at every change
        // of state or phase.
        let mut last_progress: Option<(Instant, String, String)> = None;
        if let Some(o) = stdout {
            let mut r = BufReader::new(o);
            while let Ok(Some(line)) = next_line(&mut r, MAX_LINE).await {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                match v.get("event").and_then(|e| e.as_str()) {
                    Some("published") => {
                        let queue = v.get("queue").and_then(|q| q.as_str()).map(str::to_string);
                        if let Some(b) = v.get("bytes").and_then(|b| b.as_u64()) {
                            self.metrics.exported_bytes.inc_by(b);
                        }
                        // The export is over: its slot goes to the next job while this one is
                        // followed in the farm.
                        export_permit.take();
                        if let Some(r) = self.running().get_mut(&id) {
                            r.queue = queue.clone().map(PathBuf::from);
                        }
                        let cancel_now = self.running().get(&id).is_some_and(|r| r.cancel);
                        self.update(
                            &id,
                            &Update {
                                state: Some(QUEUED.into()),
                                phase: Some("queued".into()),
                                percent: Some(0.0),
                                queue: Some(queue.clone()),
                                job_dir: Some(v.get("job_dir").and_then(|q| q.as_str()).map(str::to_string)),
                                only_active: true,
                                ..Default::default()
                            },
                        );
                        if cancel_now && let Some(q) = queue {
                            // Cancelled while its export finished: cancel it in the queue too.
                            let qid = qid.clone();
                            tokio::task::spawn_blocking(move || {
                                if let Ok(jid) = qid.parse::<JobId>() {
                                    let _ = Queue::new(q).request_cancel(&jid, "cancelled from hyperexport serve");
                                }
                            });
                        }
                    }
                    Some("progress") => {
                        let stage = v.get("stage").and_then(|s| s.as_str()).unwrap_or("");
                        let item = v.get("item").and_then(|s| s.as_str()).unwrap_or("").to_string();
                        let phase = v.get("phase").and_then(|s| s.as_str()).unwrap_or("").to_string();
                        let pct = v.get("percent").and_then(|p| p.as_f64()).unwrap_or(0.0).clamp(0.0, 100.0);
                        let key = (format!("{stage}/{item}"), phase.clone());
                        if pct < 100.0
                            && last_progress.as_ref().is_some_and(|(t, k, ph)| {
                                t.elapsed() < Duration::from_secs(1) && *k == key.0 && *ph == key.1
                            })
                        {
                            if stage == "export" {
                                disks.insert(item.clone(), serde_json::json!(pct));
                            }
                            continue;
                        }
                        last_progress = Some((Instant::now(), key.0, key.1));
                        let u = if stage == "export" {
                            disks.insert(item.clone(), serde_json::json!(pct));
                            Update {
                                state: Some(EXPORTING.into()),
                                phase: Some(format!("copying {item}")),
                                percent: Some(pct),
                                disks: Some(serde_json::Value::Object(disks.clone())),
                                only_active: true,
                                ..Default::default()
                            }
                        } else {
                            let queued = phase == "queued";
                            Update {
                                state: Some(if queued { QUEUED } else { CONVERTING }.into()),
                                phase: Some(phase),
                                percent: Some(pct),
                                only_active: true,
                                ..Default::default()
                            }
                        };
                        self.update(&id, &u);
                    }
                    Some(_) => {}
                    None => result = Some(v),
                }
            }
        }
        let status = child.wait().await;
        // The pid may be reused from now on: never signal it again.
        if let Some(r) = self.running().get_mut(&id) {
            r.pid = None;
        }
        let _ = stderr_task.await;
        self.metrics.running.dec();
        let code = status.as_ref().ok().and_then(|s| s.code());
        let cancelled = self.running().get(&id).is_some_and(|r| r.cancel);
        let error_text = {
            let el = err_lines.lock().unwrap_or_else(|p| p.into_inner());
            (!el.is_empty()).then(|| el.join("\n"))
        };
        let shutting_down = self.shutting_down.load(Ordering::Relaxed);
        // A cancel that reached an export-only child too late to stop it: serve withdrew the
        // job it published, so the job ends cancelled, not done (a daemon-mode child that exits
        // 0 converted it: done).
        let withdrawn = if cancelled && code == Some(0) {
            let (q, qid) =
                self.running().get(&id).map(|r| (r.queue.clone(), r.queue_job_id.clone())).unwrap_or_default();
            match (q, qid.parse::<JobId>()) {
                (Some(q), Ok(qid)) => tokio::task::spawn_blocking(move || Queue::new(q).locate(&qid))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
                    .is_some_and(|(s, _)| s == State::Cancelled),
                _ => false,
            }
        } else {
            false
        };
        let (state, error) = match code {
            Some(0) if withdrawn => (
                CANCELLED,
                Some("cancelled: the published job was withdrawn from the queue before an agent claimed it".into()),
            ),
            Some(0) => (DONE, None),
            Some(7) => (CANCELLED, error_text),
            _ if cancelled => (CANCELLED, Some(error_text.unwrap_or_else(|| "cancelled".into()))),
            None | Some(130) if shutting_down => {
                if self.db.get(&id).ok().flatten().is_some_and(|r| r.queue.is_some()) {
                    // Published: followed again at the next start.
                    return None;
                }
                (INTERRUPTED, Some("hyperexport serve was stopped during the export; retry the job".to_string()))
            }
            Some(c) => (FAILED, Some(error_text.unwrap_or_else(|| format!("hyperexport exited with code {c}")))),
            None => (FAILED, Some(error_text.unwrap_or_else(|| "hyperexport was killed by a signal".into()))),
        };
        let files = result
            .as_ref()
            .and_then(|r| r.get("files").cloned())
            .or_else(|| result.as_ref().and_then(|r| r.get("job_dir")).map(|d| serde_json::json!([d])))
            .unwrap_or_else(|| serde_json::json!([]));
        self.update(
            &id,
            &Update {
                state: Some(state.into()),
                phase: Some(if state == DONE { "done".into() } else { state.into() }),
                percent: (state == DONE).then_some(100.0),
                files: Some(files),
                error: Some(error),
                exit_code: Some(code.map(i64::from)),
                finished_ms: Some(Some(now_ms())),
                pid: Some(None),
                ..Default::default()
            },
        );
        Some((state.into(), started))
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// A child of an earlier serve that outlived it (serve killed outside systemd): kill it before
/// deciding the job's fate, so that it cannot publish behind our back. Only a process whose
/// command line names this queue job is touched.
async fn stop_leftover_child(pid: u32, queue_job_id: &str) {
    let ours = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).ok().is_some_and(|c| {
            let needle = format!("--job-id\0{queue_job_id}\0");
            c.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
    };
    if !ours(pid) {
        return;
    }
    tracing::warn!(pid, queue_job = %queue_job_id, "a hyperexport of an earlier serve is still running this job: killing it");
    signal(pid, rustix::process::Signal::KILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ours(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One line (without its newline), at most `max` bytes kept; `None` at the end.
async fn next_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Option<String>> {
    let mut out = Vec::new();
    let mut seen = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(seen.then(|| String::from_utf8_lossy(&out).into_owned()));
        }
        seen = true;
        let (take, used, end) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i, i + 1, true),
            None => (buf.len(), buf.len(), false),
        };
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&buf[..take.min(room)]);
        r.consume(used);
        if end {
            return Ok(Some(String::from_utf8_lossy(&out).into_owned()));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded_and_the_last_one_needs_no_newline() {
        let data = format!("short\n{}\nlast", "x".repeat(100));
        let mut r = BufReader::with_capacity(7, data.as_bytes());
        assert_eq!(next_line(&mut r, 10).await.unwrap().as_deref(), Some("short"));
        assert_eq!(next_line(&mut r, 10).await.unwrap().as_deref(), Some("xxxxxxxxxx"));
        assert_eq!(next_line(&mut r, 10).await.unwrap().as_deref(), Some("last"));
        assert_eq!(next_line(&mut r, 10).await.unwrap(), None);
    }
}
