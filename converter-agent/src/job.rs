//! One claimed job: heartbeat, load, verify, convert, check, publish, finish.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use hyperfarm_shared::JobId;
use hyperfarm_shared::engine::EngineKind;
use hyperfarm_shared::fsx;
use hyperfarm_shared::names;
use hyperfarm_shared::progress::{Phase, Progress};
use hyperfarm_shared::queue::{Beat, Claim, ORIGIN, Outcome};
use hyperfarm_shared::results::{Publication, ResultError, ResultRecord, ResultState};
use hyperfarm_shared::worker::{self, JobFailure, LoadedJob};

use crate::agent::Core;
use crate::board::JobView;

/// Why a running job was stopped from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An operator cancelled it: it ends as cancelled with a `.error` saying so.
    Cancel(String),
    /// Another agent recovered it (our lease expired): discard everything, publish nothing.
    Lost,
    /// The agent is shutting down: return it to the queue.
    Shutdown,
    /// It ran longer than `job_timeout`.
    Timeout,
}

/// A running job's stop switch.
#[derive(Debug, Default)]
pub struct JobStop {
    pub token: CancellationToken,
    reason: Mutex<Option<StopReason>>,
}

impl JobStop {
    /// Stop the job for `reason` (the first reason given wins).
    pub fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().expect("stop lock");
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        self.token.cancel();
    }
    pub fn reason(&self) -> Option<StopReason> {
        self.reason.lock().expect("stop lock").clone()
    }
}

type SharedClaim = Arc<Mutex<Option<Claim>>>;

/// Run a claimed job to its end. Never panics the agent: every failure becomes the job's result.
pub async fn run_claimed(core: Arc<Core>, claim: Claim, stop: Arc<JobStop>) {
    let id = claim.id();
    let span = info_span!("job", job = %id);
    async move {
        let token = claim.token().to_string();
        let started_at_ms = hyperfarm_shared::queue::now_ms();
        let attempts = claim.attempts() as u32;
        info!(attempt = attempts, "claimed");
        if attempts == 1 {
            core.metrics.queue_wait_seconds.observe(started_at_ms.saturating_sub(id.created_ms()) as f64 / 1000.0);
        }
        let claim: SharedClaim = Arc::new(Mutex::new(Some(claim)));
        let (ptx, prx) = watch::channel(Progress::phase(Phase::Verifying, 0));
        let view = Arc::new(Mutex::new(JobView {
            id,
            vm_name: None,
            progress: Progress::phase(Phase::Verifying, 0),
            started_at_ms,
            updated_at_ms: started_at_ms,
            summary: None,
            files: vec![],
            engine: Some(core.settings.default_engine().to_string()),
            agent: core.agent_name.clone(),
            finished_at_ms: 0,
            attempts,
            seed_drop: false,
        }));
        core.board.update(view.lock().expect("view").clone());
        let hb = Heartbeat::start(&core, id, claim.clone(), prx.clone(), stop.clone());
        let fwd = tokio::spawn(forward_progress(core.clone(), view.clone(), prx));

        let result = tokio::select! {
            r = execute(&core, &claim, id, &token, started_at_ms, &ptx, &stop, &view) => r,
            _ = tokio::time::sleep(core.cfg.job_timeout) => {
                stop.stop(StopReason::Timeout);
                Err(Ended::Failed(JobFailure::new(None, format!(
                    "the job did not finish within job_timeout ({}) and was stopped; raise job_timeout in the agent's configuration if the VM is that large",
                    hyperfarm_shared::duration::show(core.cfg.job_timeout)
                ))))
            }
        };
        let result = match (result, stop.reason()) {
            (Err(Ended::Failed(f)), Some(StopReason::Cancel(reason))) if f.cancelled => Err(Ended::Failed(JobFailure::cancelled(f.vm_name.as_deref(), &reason))),
            (r, _) => r,
        };
        drop(hb);
        fwd.abort();
        let now = hyperfarm_shared::queue::now_ms();
        match &result {
            Ok(rec) => core.metrics.job_ended("done", started_at_ms, now, rec.files.iter().map(|f| f.virtual_size).sum(), false),
            Err(Ended::Failed(f)) => core.metrics.job_ended(
                if f.cancelled { "cancelled" } else { "failed" },
                started_at_ms,
                now,
                0,
                f.message.contains("digest mismatch"),
            ),
            Err(_) => {}
        }
        finish(&core, &claim, id, &token, started_at_ms, result, &stop, &view).await;
    }
    .instrument(span)
    .await
}

fn out_record_exists(core: &Core, id: &hyperfarm_shared::JobId) -> bool {
    core.output.record_path(id).exists()
}

/// How `execute` ended, when not with a published success.
#[derive(Debug)]
enum Ended {
    /// Publish this failure (or cancellation).
    Failed(JobFailure),
    /// Nothing to publish: give the job back (shutdown) or forget it (lost).
    Abandon,
    /// Already has a result (a previous attempt published it before dying).
    AlreadyPublished(Box<ResultRecord>),
}

#[allow(clippy::too_many_arguments)]
async fn execute(
    core: &Arc<Core>,
    claim: &SharedClaim,
    id: JobId,
    token: &str,
    started_at_ms: u64,
    ptx: &watch::Sender<Progress>,
    stop: &Arc<JobStop>,
    view: &Arc<Mutex<JobView>>,
) -> Result<ResultRecord, Ended> {
    // A previous attempt may have published before dying: the job is over. Unless the job had
    // ended (failed or cancelled; its history says so) and an operator put it back into the queue
    // by hand: then the earlier record is set aside and the job runs again.
    let dir = claim.lock().expect("claim lock").as_ref().map(|c| c.dir().to_path_buf()).ok_or(Ended::Abandon)?;
    let (out, d2) = (core.output.clone(), dir.clone());
    let earlier = tokio::task::spawn_blocking(move || -> Option<Result<ResultRecord, String>> {
        let rec = out.read_record(&id).ok().flatten()?;
        let ended_before = hyperfarm_shared::queue::read_events(&d2)
            .iter()
            .any(|e| matches!(e.get("event").and_then(|k| k.as_str()), Some("failed" | "cancelled")));
        if rec.state == ResultState::Done || !ended_before {
            return Some(Ok(rec));
        }
        Some(
            out.set_aside_record(&id)
                .map(|to| {
                    info!(earlier = %to.display(), "the job was put back into the queue by hand after it {}; running it again", if rec.state == ResultState::Failed { "failed" } else { "was cancelled" });
                    rec
                })
                .map_err(|e| format!("cannot set the earlier result of this job aside: {e}")),
        )
    })
    .await
    .ok()
    .flatten();
    match earlier {
        Some(Ok(rec)) if rec.state == ResultState::Done || out_record_exists(core, &id) => {
            return Err(Ended::AlreadyPublished(Box::new(rec)));
        }
        Some(Err(e)) => return Err(Ended::Failed(JobFailure::new(None, e))),
        _ => {}
    }

    let allowed = core.settings.allowed_source_dirs.clone();
    let map = core.settings.path_map.clone();
    let loaded: LoadedJob = tokio::task::spawn_blocking(move || worker::load_job(&dir, id, &allowed, &map))
        .await
        .map_err(|e| Ended::Failed(JobFailure::new(None, format!("loading the job crashed: {e}"))))?
        .map_err(Ended::Failed)?;
    hyperfarm_shared::failpoint::hit("agent.loaded");
    let vm = loaded.vm_name.clone();
    {
        let mut v = view.lock().expect("view");
        v.vm_name = Some(vm.clone());
        v.seed_drop = loaded.seed_drop;
    }
    info!(vm = %vm, disks = loaded.disks.len(), bytes = loaded.total_bytes(), seed_drop = loaded.seed_drop, "loaded");

    let names = loaded.output_names();
    core.output
        .check_free(&vm, &names, core.cfg.on_existing)
        .map_err(|e| Ended::Failed(JobFailure::new(Some(&vm), e.to_string())))?;

    let out = core.output.clone();
    let tok = token.to_string();
    let publication = tokio::task::spawn_blocking(move || Publication::begin(&out, id, &tok))
        .await
        .map_err(|e| Ended::Failed(JobFailure::new(Some(&vm), format!("preparing the output crashed: {e}"))))?
        .map_err(|e| {
            Ended::Failed(JobFailure::new(Some(&vm), format!(
                "cannot prepare the work area in {}: {e}; check that the output directory is writable and has space",
                core.output.tmp_dir().display()
            )))
        })?;

    let converted = worker::convert_job(&core.settings, &loaded, publication.work_dir(), ptx, &stop.token).await;
    let converted = match converted {
        Ok(c) => c,
        Err(f) => {
            publication.discard();
            return Err(match stop.reason() {
                Some(StopReason::Lost | StopReason::Shutdown) => Ended::Abandon,
                _ => Ended::Failed(f),
            });
        }
    };
    if matches!(stop.reason(), Some(StopReason::Lost | StopReason::Shutdown)) {
        publication.discard();
        return Err(Ended::Abandon);
    }

    ptx.send_replace(Progress { phase: Phase::Publishing, percent: 100.0, ..Default::default() });
    let defined = define_if_asked(core, &loaded, &converted.files, publication.work_dir()).await;
    let libvirt = defined.as_ref().map(|d| d.outcome.clone());
    let attempts = claim.lock().expect("claim lock").as_ref().map(|c| c.attempts()).unwrap_or(1);
    let record = ResultRecord {
        job_id: id,
        state: ResultState::Done,
        vm_name: vm.clone(),
        files: converted.files,
        error_file: None,
        error: None,
        archived: vec![],
        engine: converted.engine.to_string(),
        agent: core.agent_name.clone(),
        host: fsx::hostname(),
        token: token.to_string(),
        attempts,
        started_at_ms,
        finished_at_ms: hyperfarm_shared::queue::now_ms(),
        libvirt,
    };
    let policy = core.cfg.on_existing;
    let claim_dir = claim.lock().expect("claim lock").as_ref().map(|c| c.dir().to_path_buf()).ok_or(Ended::Abandon)?;
    let published =
        tokio::task::spawn_blocking(move || publication.publish(record, None, policy, || claim_dir.exists()))
            .await
            .map_err(|e| Ended::Failed(JobFailure::new(Some(&vm), format!("publishing crashed: {e}"))))?;
    tracing::debug!("published");
    if let Some(d) = defined {
        after_publish(core, d, id, token).await;
    }
    match published {
        Ok(rec) => Ok(rec),
        Err(ResultError::Lost { .. }) => {
            stop.stop(StopReason::Lost);
            Err(Ended::Abandon)
        }
        Err(e @ ResultError::Conflict { .. }) => Err(Ended::Failed(JobFailure::new(Some(&vm), e.to_string()))),
        Err(e) => Err(Ended::Failed(JobFailure::new(Some(&vm), e.to_string()))),
    }
}

/// A domain this attempt defined (or tried to).
struct Defined {
    outcome: hyperfarm_shared::libvirt::Outcome,
}

/// Once the publication is decided. Published (by this attempt or a recoverer of it: the record
/// carries this attempt's token): the domain stays, its XML beside the disks. Otherwise the
/// domain this attempt defined points at disks that will not appear: it is undefined again.
async fn after_publish(core: &Arc<Core>, d: Defined, id: JobId, token: &str) {
    let o = d.outcome;
    if !o.defined {
        return;
    }
    let (out, token) = (core.output.clone(), token.to_string());
    let r = tokio::task::spawn_blocking(move || {
        let ours = out.read_record(&id).ok().flatten().is_some_and(|rec| rec.token == token);
        if ours {
            return Ok(());
        }
        hyperfarm_shared::libvirt::undefine(&o.uri, &o.domain)
            .map(|_| info!(domain = %o.domain, "this attempt's result was not published: its libvirt domain was undefined"))
            .map_err(|e| format!("undefining {} after a publication that did not happen: {e}", o.domain))
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("{e}"),
        Err(e) => warn!("libvirt clean-up crashed: {e}"),
    }
}

/// The job asked (`hyperexport --libvirt` in daemon mode) for the converted VM to be defined in
/// libvirt on this host: the domain XML from the manifest's facts and the names the disks are
/// published under (its UUID the job's id), validated and defined at this agent's URI from the
/// attempt's work area, before the qcow2 files are renamed into place (libvirt does not open a
/// domain's disks until it starts); `after_publish` finishes. The conversion stands whatever
/// happens here; the outcome goes into the result record for the exporter to report.
async fn define_if_asked(
    core: &Arc<Core>,
    loaded: &LoadedJob,
    files: &[hyperfarm_shared::results::ResultFile],
    work: &Path,
) -> Option<Defined> {
    use hyperfarm_shared::libvirt::{self, DefineRequest, Outcome};
    let m = loaded.manifest.as_ref()?;
    let vm = loaded.vm_name.clone();
    let out_dir = std::path::absolute(core.output.path()).unwrap_or_else(|_| core.output.path().to_path_buf());
    let xml = out_dir.join(format!("{vm}.xml"));
    let uri = core.cfg.libvirt_uri.clone();
    let refused = |why: String| Defined {
        outcome: Outcome {
            domain: vm.clone(),
            uri: uri.clone(),
            xml: xml.display().to_string(),
            validated: false,
            defined: false,
            host: fsx::hostname(),
            error: Some(why),
        },
    };
    let req = match DefineRequest::of(m) {
        Ok(Some(r)) => r,
        Ok(None) => return None,
        Err(e) => {
            return Some(refused(format!(
                "the job's libvirt request is invalid: {e}; the VM was converted, not defined"
            )));
        }
    };
    if !core.cfg.libvirt_define {
        return Some(refused(format!(
            "agent {} does not define libvirt domains (libvirt_define = false); the VM was converted: define it by hand, or let hyperexport define it (--libvirt-side exporter)",
            core.agent_name
        )));
    }
    let mut ordered: Vec<&hyperfarm_shared::results::ResultFile> = files.iter().collect();
    ordered.sort_by_key(|f| !f.boot);
    let disks = ordered.iter().map(|f| out_dir.join(&f.name)).collect();
    let spec = libvirt::spec_from_manifest(m, &vm, disks, &req);
    if let Err(e) = spec.xml() {
        return Some(refused(format!("the domain of {vm} cannot be written: {e}; the VM was converted, not defined")));
    }
    // Staged in the work area under its final name: the publication moves it beside the disks
    // before the record is committed (also when a recoverer completes the publication).
    let staged = work.join(format!("{vm}.xml"));
    let (uri2, shown) = (uri.clone(), xml.clone());
    let defined = tokio::task::spawn_blocking(move || {
        let mut o = libvirt::define_domain(&spec, &staged, &uri2);
        // The XML an operator finishes by hand with is the one published beside the disks.
        o.xml = shown.display().to_string();
        o.error = o.error.map(|e| e.replace(&staged.display().to_string(), &o.xml));
        o
    })
    .await;
    let outcome = match defined {
        Ok(o) => o,
        Err(e) => refused(format!("defining the libvirt domain crashed: {e}")).outcome,
    };
    match &outcome.error {
        None => info!(domain = %outcome.domain, uri = %outcome.uri, "defined in libvirt"),
        Some(e) => warn!("{e}"),
    }
    Some(Defined { outcome })
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    core: &Arc<Core>,
    claim: &SharedClaim,
    id: JobId,
    token: &str,
    started_at_ms: u64,
    result: Result<ResultRecord, Ended>,
    stop: &Arc<JobStop>,
    view: &Arc<Mutex<JobView>>,
) {
    let Some(claim) = claim.lock().expect("claim lock").take() else {
        return;
    };
    let result = match result {
        Err(Ended::AlreadyPublished(rec)) => Ok(*rec),
        other => other,
    };
    let core2 = core.clone();
    let token = token.to_string();
    let engine = core.settings.default_engine().to_string();
    let result_engine = result.as_ref().ok().map(|r| r.engine.clone());
    let (phase, summary, files) = match &result {
        Ok(rec) => (
            match rec.state {
                ResultState::Done => Phase::Done,
                ResultState::Failed => Phase::Failed,
                ResultState::Cancelled => Phase::Cancelled,
            },
            rec.error.as_ref().map(|_| rec.summary()),
            rec.files.iter().map(|f| f.name.clone()).collect(),
        ),
        Err(Ended::Failed(f)) => (
            if f.cancelled { Phase::Cancelled } else { Phase::Failed },
            Some(f.message.lines().next().unwrap_or_default().to_string()),
            vec![],
        ),
        Err(Ended::Abandon | Ended::AlreadyPublished(_)) => (Phase::Queued, None, vec![]),
    };
    let reason = stop.reason();
    let outcome = tokio::task::spawn_blocking(move || -> Result<String, String> {
        match result {
            Ok(rec) => {
                let outcome = match rec.state {
                    ResultState::Done => Outcome::Done,
                    ResultState::Failed => Outcome::Failed,
                    ResultState::Cancelled => Outcome::Cancelled,
                };
                finish_claim(&core2, claim, outcome)
            }
            Err(Ended::Failed(f)) => {
                let vm = f.vm_name.clone().unwrap_or_else(|| fallback_vm_name(claim.dir(), &id));
                let state = if f.cancelled { ResultState::Cancelled } else { ResultState::Failed };
                let message = format!("{}\njob: {id}\nagent: {}\n", f.message, core2.agent_name);
                let record = ResultRecord {
                    job_id: id,
                    state,
                    vm_name: vm,
                    files: vec![],
                    error_file: None,
                    error: None,
                    archived: vec![],
                    engine,
                    agent: core2.agent_name.clone(),
                    host: fsx::hostname(),
                    token: token.clone(),
                    attempts: claim.attempts(),
                    started_at_ms,
                    finished_at_ms: hyperfarm_shared::queue::now_ms(),
                    libvirt: None,
                };
                let dir = claim.dir().to_path_buf();
                // When even the error cannot be written, the job goes back to the queue. If the
                // output directory is unusable (gone, read-only, full), the agent claims nothing
                // while it is unhealthy and the job waits. If it is usable, the fault is this
                // job's: it is counted, tried again only after a back-off, and after
                // max_attempts it is failed with the reason in failure.json — never requeued and
                // reclaimed for ever.
                let requeue = |claim: Claim, why: String| {
                    if !core2.health.snapshot().serving() {
                        return match claim.requeue(&why) {
                            Ok(true) => Err(format!("{why}; the job was returned to the queue")),
                            Ok(false) => Ok(gone(&core2)),
                            Err(e) => Err(format!("{why}; returning the job to the queue failed too: {e}")),
                        };
                    }
                    let tries = claim.publish_failures() + 1;
                    let max = core2.cfg.max_attempts;
                    if tries >= max {
                        return match claim.fail_unpublishable(&why) {
                            Ok(true) => Err(format!(
                                "{why}; its result could not be published {tries} times, so the job was failed without one (reason in failure.json; hyperctl jobs show {id})"
                            )),
                            Ok(false) => Ok(gone(&core2)),
                            Err(e) => Err(format!("{why}; failing the job failed too: {e}")),
                        };
                    }
                    match claim.requeue_after_publish_failure(&why) {
                        Ok(true) => {
                            let wait = core2.back_off(id, tries);
                            Err(format!(
                                "{why}; the job was returned to the queue (try {tries} of {max}; this agent tries again in {})",
                                hyperfarm_shared::duration::show(wait)
                            ))
                        }
                        Ok(false) => Ok(gone(&core2)),
                        Err(e) => Err(format!("{why}; returning the job to the queue failed too: {e}")),
                    }
                };
                let publication = match Publication::begin(&core2.output, id, &token) {
                    Ok(p) => p,
                    Err(e) => {
                        return requeue(
                            claim,
                            format!("cannot write the error result into {}: {e}", core2.output.tmp_dir().display()),
                        );
                    }
                };
                match publication.publish(record, Some(&message), core2.cfg.on_existing, || dir.exists()) {
                    Ok(_) => {}
                    Err(ResultError::Lost { .. }) => return Ok(gone(&core2)),
                    Err(e) => {
                        publication.discard();
                        return requeue(claim, format!("cannot publish the error result: {e}"));
                    }
                }
                finish_claim(&core2, claim, if f.cancelled { Outcome::Cancelled } else { Outcome::Failed })
            }
            Err(Ended::AlreadyPublished(_)) => unreachable!("turned into Ok above"),
            Err(Ended::Abandon) => match reason {
                Some(StopReason::Lost) => Ok(gone(&core2)),
                _ => match claim.requeue("agent shutting down") {
                    Ok(true) => Ok("returned to the queue".into()),
                    Ok(false) => Ok(gone(&core2)),
                    Err(e) => Err(format!("cannot return the job to the queue: {e}")),
                },
            },
        }
    })
    .await;
    match outcome {
        Ok(Ok(what)) => info!(phase = %phase, summary = summary.as_deref().unwrap_or(""), "{what}"),
        Ok(Err(e)) => error!("{e}"),
        Err(e) => error!("finishing the job crashed: {e}"),
    }
    let mut v = view.lock().expect("view").clone();
    if phase == Phase::Queued {
        core.board.remove(&id, Phase::Queued);
        return;
    }
    v.progress.phase = phase;
    v.progress.rate = 0.0;
    v.progress.eta_secs = None;
    v.summary = summary;
    v.files = files;
    if let Some(e) = result_engine {
        v.engine = Some(e);
    }

    v.updated_at_ms = hyperfarm_shared::queue::now_ms();
    v.finished_at_ms = v.updated_at_ms;
    core.board.update(v);
}

/// Why a claim we held is no longer there: taken by another agent after our lease expired, or the
/// queue itself went away (a share unmounted or the directory removed) — two very different
/// things for an operator.
fn gone(core: &Core) -> String {
    let converting = core.queue.state_dir(hyperfarm_shared::queue::State::Converting);
    if std::fs::symlink_metadata(&converting).is_err() {
        format!(
            "the job's claim vanished with the queue's {} directory (share unmounted, or the queue removed or replaced); nothing was published",
            converting.display()
        )
    } else {
        "lost to another agent (our lease expired and it recovered the job); nothing was published".into()
    }
}

fn finish_claim(core: &Core, claim: Claim, outcome: Outcome) -> Result<String, String> {
    let id = claim.id();
    let seed = hyperfarm_shared::queue::has_origin(claim.dir());
    match claim.finish(outcome) {
        Ok(true) => {
            hyperfarm_shared::failpoint::hit("agent.finished");
            // The job's own copies of its disks are no longer needed once converted or
            // cancelled (failed jobs keep them for inspection). A seed drop's disks are the
            // exporter's and are never touched.
            if !seed && !core.cfg.keep_done_disks && outcome != Outcome::Failed {
                let disks = core.queue.job_dir(outcome.state(), &id).join(hyperfarm_shared::queue::DISKS);
                if let Err(e) = fsx::remove_tree(&disks) {
                    warn!("cannot remove {}: {e}", disks.display());
                }
            }
            Ok(match outcome {
                Outcome::Done => "done",
                Outcome::Failed => "failed",
                Outcome::Cancelled => "cancelled",
            }
            .into())
        }
        Ok(false) => Ok(gone(core)),
        Err(e) => Err(format!("cannot move the job to its final state: {e}")),
    }
}

/// A name for `<name>.error` when the manifest gave no valid VM name: the seed drop's file stem,
/// else `job-<id>`.
fn fallback_vm_name(job_dir: &Path, id: &JobId) -> String {
    let from_origin = hyperfarm_shared::queue::read_small(&job_dir.join(ORIGIN))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("original_name").and_then(|n| n.as_str()).map(str::to_string))
        .and_then(|n| names::sanitize_vm_name(n.trim_end_matches(".json")));
    from_origin.unwrap_or_else(|| format!("job-{id}"))
}

/// Publish the result of a job no agent holds any more: failed after too many attempts, or
/// cancelled while its agent was gone.
pub fn publish_orphan_result(core: &Core, id: JobId, job_dir: &Path, message: &str, state: ResultState) {
    let loaded = worker::load_job(job_dir, id, &core.settings.allowed_source_dirs, &core.settings.path_map);
    let vm = match &loaded {
        Ok(j) => j.vm_name.clone(),
        Err(f) => f.vm_name.clone().unwrap_or_else(|| fallback_vm_name(job_dir, &id)),
    };
    let token = format!("recovery-{}", hyperfarm_shared::queue::claim_token());
    let record = ResultRecord {
        job_id: id,
        state,
        vm_name: vm,
        files: vec![],
        error_file: None,
        error: None,
        archived: vec![],
        engine: EngineKind::QemuImg.to_string(),
        agent: core.agent_name.clone(),
        host: fsx::hostname(),
        token: token.clone(),
        attempts: 0,
        started_at_ms: hyperfarm_shared::queue::now_ms(),
        finished_at_ms: hyperfarm_shared::queue::now_ms(),
        libvirt: None,
    };
    let result = Publication::begin(&core.output, id, &token)
        .map_err(ResultError::from_io(id, core.output.tmp_dir()))
        .and_then(|p| p.publish(record, Some(message), core.cfg.on_existing, || true));
    if let Err(e) = result {
        error!(job = %id, "cannot publish the failure: {e}");
    }
}

/// A job's heartbeat: a thread of its own, so that nothing else the agent does (API load, a busy
/// runtime, other jobs' I/O) can delay the lease refresh past the lease timeout and have another
/// agent take the job while it runs. Stops when dropped (at its next tick).
struct Heartbeat {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Heartbeat {
    fn start(
        core: &Arc<Core>,
        id: hyperfarm_shared::JobId,
        claim: SharedClaim,
        progress: watch::Receiver<Progress>,
        stop: Arc<JobStop>,
    ) -> Heartbeat {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let every = core.cfg.heartbeat_interval();
        let stop2 = stop.clone();
        let core = core.clone();
        let spawned = std::thread::Builder::new().name(format!("heartbeat-{id}")).spawn(move || {
            let _span = info_span!("job", job = %id).entered();
            loop {
                match rx.recv_timeout(every) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let p = progress.borrow().clone();
                let running = core.running_count() as u32;
                let beat = {
                    let mut g = claim.lock().expect("claim lock");
                    g.as_mut().map(|claim| {
                        claim.set_running(running);
                        claim.heartbeat(p.phase.as_str(), p.percent, p.bytes_done, p.bytes_total)
                    })
                };
                match beat {
                    Some(Ok(Beat::Owned)) => {}
                    Some(Ok(Beat::CancelRequested(reason))) => {
                        info!(reason = %reason, "cancel requested");
                        stop.stop(StopReason::Cancel(reason));
                    }
                    Some(Ok(Beat::Lost)) => {
                        warn!(
                            "lost the job: another agent recovered it after our lease expired; stopping without publishing"
                        );
                        stop.stop(StopReason::Lost);
                        return;
                    }
                    Some(Err(e)) => warn!("heartbeat failed: {e}"),
                    None => return,
                }
            }
        });
        if let Err(e) = spawned {
            error!("cannot start the heartbeat thread: {e}; stopping the job");
            stop2.stop(StopReason::Shutdown);
        }
        Heartbeat { _stop: tx }
    }
}

async fn forward_progress(core: Arc<Core>, view: Arc<Mutex<JobView>>, mut rx: watch::Receiver<Progress>) {
    let mut rate = hyperfarm_shared::progress::RateMeter::default();
    while rx.changed().await.is_ok() {
        let mut p = rx.borrow_and_update().clone();
        rate.update(&mut p);
        let v = {
            let mut g = view.lock().expect("view");
            g.progress = p;
            g.updated_at_ms = hyperfarm_shared::queue::now_ms();
            g.clone()
        };
        core.board.update(v);
    }
}
