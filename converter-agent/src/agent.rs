//! Start-up, the scan/claim loop, recovery of other agents' stale claims, and shutdown.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use hyperfarm_shared::JobId;
use hyperfarm_shared::engine::hyper2kvm::Hyper2kvm;
use hyperfarm_shared::engine::{EngineChoice, QemuImg};

use hyperfarm_shared::fsx;
use hyperfarm_shared::queue::{self, IngestOutcome, LeaseTracker, Liveness, Queue, RecoverAction, SeedTracker, State};
use hyperfarm_shared::results::{OutputDir, Publication, ResultState};
use hyperfarm_shared::worker::WorkerSettings;

use crate::board::Board;
use crate::config::{self, Config};
use crate::job::{self, JobStop, StopReason};
use crate::{EXIT_DIRS, EXIT_ENGINE, Fatal, sdnotify};

/// A job this agent is running.
#[derive(Debug)]
pub struct RunningJob {
    pub token: String,
    pub stop: Arc<JobStop>,
}

/// Everything the agent's tasks share.
#[derive(Debug)]
pub struct Core {
    pub cfg: Config,
    pub queue: Queue,
    pub output: OutputDir,
    pub settings: WorkerSettings,
    /// `<instance>@<host>`, written into leases and records.
    pub agent_name: String,
    pub board: Board,
    pub running: Mutex<HashMap<JobId, RunningJob>>,
    /// Cancelled when the agent stops claiming (shutdown).
    pub shutdown: CancellationToken,
    pub started: Instant,
    pub qemu_version: String,
    /// The queue as the API shows it, in memory (refreshed by a thread of its own).
    pub index: Arc<crate::index::JobIndex>,
    /// gRPC connections (open, refused, timed out).
    pub connections: Arc<crate::grpc::conn::ConnStats>,
    /// The last health probe (directories writable, engine usable).
    pub health: Arc<crate::grpc::HealthState>,
    /// Prometheus counters and histograms (`metrics.rs`).
    pub metrics: crate::metrics::Metrics,
    /// Queued jobs already announced on the board.
    announced: Mutex<HashSet<JobId>>,
    /// Unknown queue entries already reported (each is logged once).
    unknown_warned: Mutex<HashSet<String>>,
    /// Jobs this agent will not claim again before a time (their result could not be published).
    backoff: Mutex<HashMap<JobId, Instant>>,
    tracker: Mutex<LeaseTracker>,
    seeds: Mutex<SeedTracker>,
    scans: std::sync::atomic::AtomicU64,
}

impl Core {
    pub fn running_tokens(&self) -> HashSet<String> {
        self.running.lock().expect("running lock").values().map(|r| r.token.clone()).collect()
    }
    pub fn running_count(&self) -> usize {
        self.running.lock().expect("running lock").len()
    }
    /// Do not claim `id` again for a while after its `tries`-th failed publication: the poll
    /// interval doubled per try, at most 5 minutes. Returns the wait.
    pub fn back_off(&self, id: JobId, tries: usize) -> std::time::Duration {
        let wait = self.cfg.poll_interval.saturating_mul(1 << tries.min(16)).min(std::time::Duration::from_secs(300));
        self.backoff.lock().expect("backoff lock").insert(id, Instant::now() + wait);
        wait
    }

    fn backing_off(&self, id: &JobId) -> bool {
        let mut b = self.backoff.lock().expect("backoff lock");
        b.retain(|_, until| *until > Instant::now());
        b.contains_key(id)
    }

    /// Scans of the queue since start.
    pub fn scans(&self) -> u64 {
        self.scans.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn fatal(code: u8, message: String) -> anyhow::Error {
    Fatal { code, message }.into()
}

/// Check the directories and qemu-img, build the shared state. Exits with a documented code when
/// the host cannot work.
pub async fn prepare(cfg: Config) -> anyhow::Result<Arc<Core>> {
    let queue = Queue::new(&cfg.watch_dir);
    let output = OutputDir::new(&cfg.output_dir);
    let (q2, o2) = (queue.clone(), output.clone());
    let (watch_dir, output_dir) = (cfg.watch_dir.clone(), cfg.output_dir.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        check_dir("watch", &watch_dir, || q2.init())?;
        check_dir("output", &output_dir, || o2.init())?;
        Ok(())
    })
    .await??;
    let allowed = config::canonical_allowed(&cfg)?;
    hyperfarm_shared::engine::sandbox::set_required(cfg.require_confinement);
    match hyperfarm_shared::engine::sandbox::available() {
        Ok(()) => info!("engines run confined to their job's files (Landlock)"),
        Err(why) if cfg.require_confinement => {
            return Err(fatal(
                crate::EXIT_CONFIG,
                format!(
                    "{why}. Engines must be confined so that a job cannot make them read other files; use a kernel with Landlock (Linux 5.13+), allow its system calls (the units' SystemCallFilter does), or set require_confinement = false to run engines unconfined"
                ),
            ));
        }
        Err(why) => warn!("{why}: engines run UNCONFINED (require_confinement = false)"),
    }
    let qemu = QemuImg::new(&cfg.qemu_img);
    let qemu_version = qemu.version().await.map_err(|e| {
        fatal(EXIT_ENGINE, format!("qemu-img is not usable: {e}. Install qemu-utils (Debian) or qemu-img (RHEL), or set qemu_img in the configuration"))
    })?;
    let hyper2kvm = match cfg.engine {
        EngineChoice::QemuImg => Err("the agent's engine is qemu-img".to_string()),
        choice => match Hyper2kvm::probe(&cfg.hyper2kvm_path, Some(cfg.hyper2kvm_timeout)).await {
            Ok(h) => {
                info!(path = %h.program.display(), version = %h.version, stages = %h.stages().join(","), "hyper2kvm engine available");
                Ok(h)
            }
            Err(e) if choice == EngineChoice::Hyper2kvm => {
                return Err(fatal(
                    EXIT_ENGINE,
                    format!(
                        "engine = hyper2kvm but hyper2kvm is not usable: {e}. Install it (pip install 'hyper2kvm[ui,daemon]==0.2.1' requests) and set hyper2kvm_path, or use engine = auto"
                    ),
                ));
            }
            Err(e) => {
                info!("hyper2kvm is not usable ({e}); converting with qemu-img");
                Err(e)
            }
        },
    };
    // Engines a killed predecessor on this host left running are ended before anything else.
    if let Some(d) = &cfg.cache_dir {
        hyperfarm_shared::engine::process::set_local_notes(d);
        let killed = hyperfarm_shared::engine::process::kill_local_leftovers();
        if killed > 0 {
            warn!(killed, "ended engine processes that an earlier agent on this host left running");
        }
    }
    let zero_cache = Arc::new(match &cfg.cache_dir {
        Some(d) => hyperfarm_shared::tree_hash::ZeroCache::open(d),
        None => hyperfarm_shared::tree_hash::ZeroCache::memory(),
    });
    let settings = WorkerSettings {
        qemu,
        convert: cfg.convert.clone(),
        allowed_source_dirs: allowed,
        path_map: cfg.path_map.clone(),
        engine: cfg.engine,
        hyper2kvm,
        zero_cache,
        verify: cfg.verify,
        max_virtual_size: cfg.max_virtual_size,
    };
    let agent_name = format!("{}@{}", cfg.instance, fsx::hostname());
    Ok(Arc::new(Core {
        tracker: Mutex::new(LeaseTracker::new(cfg.lease_timeout)),
        backoff: Default::default(),
        unknown_warned: Default::default(),
        seeds: Mutex::new(SeedTracker::new()),
        scans: Default::default(),
        queue,
        output,
        settings,
        agent_name,
        board: Board::new(),
        running: Mutex::new(HashMap::new()),
        index: Arc::new(crate::index::JobIndex::new(cfg.max_listed_jobs)),
        connections: Default::default(),
        health: Default::default(),
        metrics: crate::metrics::Metrics::new(),
        announced: Default::default(),
        shutdown: CancellationToken::new(),
        started: Instant::now(),
        qemu_version,
        cfg,
    }))
}

fn check_dir(what: &str, dir: &Path, init: impl FnOnce() -> std::io::Result<()>) -> anyhow::Result<()> {
    let hint = "create it (and mount the share, if it is on NFS), give the agent's user write access to it, or point --{what}-dir elsewhere";
    let hint = hint.replace("{what}", what);
    match std::fs::metadata(dir) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => {
            return Err(fatal(EXIT_DIRS, format!("the {what} directory {} is not a directory; {hint}", dir.display())));
        }
        Err(e) => {
            return Err(fatal(EXIT_DIRS, format!("the {what} directory {} is unusable ({e}); {hint}", dir.display())));
        }
    }
    init().map_err(|e| {
        fatal(EXIT_DIRS, format!("cannot prepare the {what} directory {} ({e}); {hint}", dir.display()))
    })?;
    fsx::probe_writable(dir).map_err(|e| {
        fatal(EXIT_DIRS, format!("the {what} directory {} is not writable ({e}); {hint}", dir.display()))
    })?;
    Ok(())
}

/// Run the agent until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let core = prepare(cfg).await?;
    serve(core, std::future::pending::<()>()).await
}

/// The main loop. Returns after a signal (or `extra_stop` completing) and a graceful shutdown.
pub async fn serve(core: Arc<Core>, extra_stop: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let cfg = &core.cfg;
    info!(
        instance = %cfg.instance, watch_dir = %cfg.watch_dir.display(), output_dir = %cfg.output_dir.display(),
        max_concurrent = cfg.max_concurrent, qemu_img = %core.qemu_version, "starting"
    );
    // How the share is mounted (docs/protocol.md, "What the shared storage must provide"): what
    // this host can see of it is checked once, and wrong settings are logged, not refused — the
    // protocol stays safe without them, only slower to see other hosts' changes.
    let dirs = [("queue", cfg.watch_dir.clone()), ("output", cfg.output_dir.clone())];
    let checked = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::task::spawn_blocking(move || {
            dirs.into_iter()
                .filter_map(|(what, d)| Some((what, hyperfarm_shared::storage::check(&d)?)))
                .collect::<Vec<_>>()
        }),
    )
    .await;
    for (what, (fs, advice)) in checked.ok().and_then(Result::ok).unwrap_or_default() {
        info!(dir = what, storage = %fs, "shared storage");
        for a in advice {
            warn!(dir = what, "storage: {}", hyperfarm_shared::text::Esc(a.as_str()));
        }
    }

    let grpc = crate::grpc::start(core.clone(), core.health.clone()).await?;
    // Announce this agent in the queue (where exporters on other hosts find its gRPC address),
    // after making sure no clone of this host serves it.
    let tls = core.cfg.grpc.tls_cert.is_some();
    let url =
        crate::registration::advertise_url(core.cfg.grpc.advertise_url.as_deref(), grpc.as_ref().map(|g| g.addr), tls);
    let local = crate::registration::local_url(grpc.as_ref().map(|g| g.addr), tls);
    let me = crate::registration::this_agent(&core.cfg.instance, url.clone(), local, tls);
    {
        let (q, me) = (core.queue.clone(), me.clone());
        tokio::task::spawn_blocking(move || crate::registration::check_identity(&q, &me)).await??;
    }
    info!(host_id = %me.host_id, advertise_url = url.as_deref().unwrap_or("-"), "registered in the queue");
    let _registered = crate::registration::Registered::start(core.queue.clone(), me);
    let wake = Arc::new(Notify::new());
    let _watcher = start_watcher(&core.queue, wake.clone());
    let _changes = ChangeCheck::start(&core.queue, wake.clone(), core.cfg.poll_interval);
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut jobs: JoinSet<JobId> = JoinSet::new();
    tokio::pin!(extra_stop);

    // Start-up recovery: this host's dead claims are taken back at once.
    let mut first = true;
    let mut unhealthy_logged = false;
    let watchdog = sdnotify::watchdog_interval();
    let mut last_watchdog = Instant::now();
    let mut last_status = String::new();
    loop {
        let mut queued_now = None;
        let scan = {
            let core = core.clone();
            tokio::task::spawn_blocking(move || scan(&core)).await
        };
        match scan {
            Ok(Ok(queued)) => {
                queued_now = Some(queued.len());
                // While the queue or output directory is unusable (a share unmounted, a full or
                // read-only file system), jobs stay queued rather than fail.
                let health = core.health.snapshot();
                let healthy = health.serving();
                if !healthy && !queued.is_empty() && !unhealthy_logged {
                    let why: Vec<String> = [&health.queue, &health.output, &health.engine]
                        .iter()
                        .filter_map(|r| (*r).clone().err())
                        .collect();
                    warn!(queued = queued.len(), "not claiming jobs while unhealthy: {}", why.join("; "));
                }
                unhealthy_logged = !healthy;
                for id in queued.into_iter().take(if healthy { usize::MAX } else { 0 }) {
                    if core.running_count() >= core.cfg.max_concurrent || core.shutdown.is_cancelled() {
                        break;
                    }
                    if core.backing_off(&id) {
                        continue;
                    }
                    let c2 = core.clone();
                    let running = core.running_count() as u32 + 1;
                    let claimed =
                        tokio::task::spawn_blocking(move || queue::claim(&c2.queue, id, &c2.agent_name, running)).await;
                    match claimed {
                        Ok(Ok(Some(claim))) => {
                            let stop = Arc::new(JobStop::default());
                            core.running
                                .lock()
                                .expect("running lock")
                                .insert(id, RunningJob { token: claim.token().to_string(), stop: stop.clone() });
                            let c3 = core.clone();
                            jobs.spawn(async move {
                                job::run_claimed(c3.clone(), claim, stop).await;
                                c3.running.lock().expect("running lock").remove(&id);
                                id
                            });
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => warn!(job = %id, "{e:#}"),
                        Err(e) => error!(job = %id, "claim task failed: {e}"),
                    }
                }
            }
            Ok(Err(e)) => warn!("scanning the queue: {e:#}"),
            Err(e) => error!("scan task failed: {e}"),
        }
        if first {
            first = false;
            info!("ready");
            sdnotify::notify("READY=1");
        }
        // `systemctl status` shows this line: what the agent is doing, at a glance.
        let health = core.health.snapshot();
        let problem = [&health.queue, &health.output, &health.engine].iter().find_map(|r| (*r).clone().err());
        let status =
            sdnotify::status_line(queued_now, core.running_count(), core.cfg.max_concurrent, problem.as_deref());
        if status != last_status {
            sdnotify::notify(&format!("STATUS={status}"));
            last_status = status;
        }
        if let Some(every) = watchdog
            && last_watchdog.elapsed() >= every
        {
            sdnotify::notify("WATCHDOG=1");
            last_watchdog = Instant::now();
        }
        let tick = watchdog.map_or(core.cfg.poll_interval, |w| w.min(core.cfg.poll_interval));
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = wake.notified() => {
                // Debounce: events come in bursts (a file copied into the watch directory, many
                // jobs published at once); one scan after a short quiet period serves them all.
                tokio::time::sleep(EVENT_DEBOUNCE.min(core.cfg.poll_interval)).await;
            }
            Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = &mut extra_stop => { info!("stop requested"); break; }
        }
    }
    shutdown(&core, jobs, &mut sigterm).await;
    if let Some(g) = grpc {
        g.shutdown().await;
    }
    info!("stopped");
    Ok(())
}

/// Stop claiming; let running jobs finish within the grace period; then stop them and return
/// them to the queue. A second SIGTERM skips the grace period.
async fn shutdown(core: &Arc<Core>, mut jobs: JoinSet<JobId>, sigterm: &mut tokio::signal::unix::Signal) {
    core.shutdown.cancel();
    sdnotify::notify("STOPPING=1");
    let n = jobs.len();
    if n > 0 {
        info!(running = n, grace = %hyperfarm_shared::duration::show(core.cfg.shutdown_grace), "waiting for running jobs");
        let deadline = tokio::time::sleep(core.cfg.shutdown_grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                r = jobs.join_next() => if r.is_none() { break },
                _ = &mut deadline => break,
                _ = sigterm.recv() => { info!("second SIGTERM: not waiting any longer"); break; }
            }
        }
        if !jobs.is_empty() {
            let running: Vec<Arc<JobStop>> =
                core.running.lock().expect("running lock").values().map(|r| r.stop.clone()).collect();
            info!(jobs = running.len(), "returning unfinished jobs to the queue");
            for stop in running {
                stop.stop(StopReason::Shutdown);
            }
            while jobs.join_next().await.is_some() {}
        }
    }
}

/// One pass over the queue (blocking I/O): ingest seed drops, recover stale claims, clean
/// leftovers. Returns the queued job ids, oldest first.
fn scan(core: &Core) -> anyhow::Result<Vec<JobId>> {
    let n = core.scans.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let periodic = n.is_multiple_of(20);
    let queue = &core.queue;

    if !core.shutdown.is_cancelled() {
        let outcomes = {
            let mut seeds = core.seeds.lock().expect("seed lock");
            queue::ingest_seed_drops(queue, &mut seeds, core.cfg.settle_time)
        };
        match outcomes {
            Ok(list) => {
                for o in list {
                    if let IngestOutcome::Ingested { name, id } = o {
                        info!(job = %id, drop = %name, "ingested a manifest drop");
                    }
                }
            }
            Err(e) => warn!("ingesting manifest drops in {}: {e}", queue.root().display()),
        }
    }

    // Other agents' (and our previous incarnations') claims.
    let mine = core.running_tokens();
    let converting = queue.state_dir(State::Converting);
    let names = std::fs::read_dir(&converting)
        .with_context(|| format!("listing {}", converting.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Vec<_>>();
    let server_now = if periodic { queue::server_now(&queue.tmp_dir()).ok() } else { None };
    let mut present = HashSet::new();
    let mut stale = Vec::new();
    {
        let mut tracker = core.tracker.lock().expect("tracker lock");
        for name in &names {
            let Some((_, token)) = queue::parse_claim_name(name) else {
                continue;
            };
            if mine.contains(token) {
                continue;
            }
            present.insert(name.clone());
            if let Liveness::Stale(why) = tracker.assess(queue, name, server_now) {
                stale.push((name.clone(), why));
            }
        }
        tracker.retain(&present);
    }
    for (name, why) in stale {
        if let Err(e) = recover(core, &name, &why) {
            warn!(claim = %name, "recovering a stale claim: {e:#}");
        }
    }

    if periodic {
        match queue::cleanup_tmp(queue, core.cfg.staging_max_age, server_now) {
            Ok(removed) if !removed.is_empty() => {
                info!(count = removed.len(), "removed staging leftovers: {}", removed.join(", "))
            }
            Ok(_) => {}
            Err(e) => warn!("cleaning {}: {e}", queue.tmp_dir().display()),
        }
        let converting = queue.state_dir(State::Converting);
        let live = |id: &JobId, token: &str| {
            let live = converting.join(format!("{id}@{token}")).exists();
            if !live {
                hyperfarm_shared::engine::process::kill_leftovers(&core.output.work_dir(id, token));
            }
            live
        };
        if let Err(e) = core.output.cleanup_work(live) {
            warn!("cleaning {}: {e}", core.output.tmp_dir().display());
        }
    }

    if periodic {
        let unknown = queue::unknown_entries(queue, 100);
        let mut warned = core.unknown_warned.lock().expect("unknown lock");
        for u in unknown.iter().filter(|u| !warned.contains(*u)) {
            warn!(entry = %hyperfarm_shared::text::Esc(u.as_str()), "an entry of the queue that no agent will take (not a job directory the protocol knows); move it away, or back where it belongs");
        }
        *warned = unknown.into_iter().collect();
    }
    let entries = queue::list(queue, &[State::Queued], false)?;
    announce_queued(core, &entries);
    let mut queued: Vec<JobId> = entries.into_iter().map(|j| j.id).collect();
    queued.sort();
    Ok(queued)
}

/// Tell board watchers about jobs that newly appeared in `queued/` (at most 1000 a scan, so that
/// a huge backlog at start-up does not flood them; the rest follow on later scans).
fn announce_queued(core: &Core, entries: &[queue::JobEntry]) {
    let mut announced = core.announced.lock().expect("announced lock");
    let present: HashSet<JobId> = entries.iter().map(|e| e.id).collect();
    announced.retain(|id| present.contains(id));
    let mut n = 0;
    for e in entries {
        if n >= 1000 {
            break;
        }
        if announced.insert(e.id) {
            n += 1;
            core.board.update(crate::board::JobView {
                id: e.id,
                vm_name: None,
                progress: hyperfarm_shared::progress::Progress::phase(hyperfarm_shared::progress::Phase::Queued, 0),
                started_at_ms: 0,
                updated_at_ms: queue::now_ms(),
                summary: None,
                files: vec![],
                engine: None,
                agent: String::new(),
                finished_at_ms: 0,
                attempts: 0,
                seed_drop: false,
            });
        }
    }
}

/// Take back a stale claim: complete its publication if its agent got that far, else requeue it
/// (or fail it after too many attempts).
fn recover(core: &Core, name: &str, why: &str) -> anyhow::Result<()> {
    let Some((id, token)) = queue::parse_claim_name(name) else {
        return Ok(());
    };
    let queue = &core.queue;
    let claim_dir = queue.state_dir(State::Converting).join(name);
    warn!(job = %id, claim = %name, "stale claim: {why}");
    // An engine an earlier incarnation of this agent left running (kill -9) must be gone before
    // the job is touched: no two conversions of one job at once, no work area removed under it.
    let killed = hyperfarm_shared::engine::process::kill_leftovers(&core.output.work_dir(&id, token));
    if killed > 0 {
        warn!(job = %id, killed, "ended engine processes a dead agent of this host had left running");
    }
    if let Some((publication, record)) = Publication::resume(&core.output, id, token) {
        let state = match record.state {
            ResultState::Done => State::Done,
            ResultState::Failed => State::Failed,
            ResultState::Cancelled => State::Cancelled,
        };
        match publication.publish(record, None, core.cfg.on_existing, || claim_dir.exists()) {
            Ok(_) => info!(job = %id, "completed the publication its agent had begun"),
            Err(e) => {
                warn!(job = %id, "could not complete the publication its agent had begun: {e}")
            }
        }
        if core.output.read_record(&id).ok().flatten().is_some() {
            queue::finish_foreign(queue, name, state)?;
            return Ok(());
        }
    }
    // The claim published its result (the record carries its token) and only the move out of
    // converting/ is missing (the agent died just then, or the share refused the move): the job
    // is over, it is not converted again.
    if let Some(rec) = core.output.read_record(&id).ok().flatten()
        && rec.token == token
    {
        let state = match rec.state {
            ResultState::Done => State::Done,
            ResultState::Failed => State::Failed,
            ResultState::Cancelled => State::Cancelled,
        };
        if queue::finish_foreign(queue, name, state)? {
            info!(job = %id, state = %state, "the claim had published its result; moved the job to its final state");
        }
        let _ = fsx::remove_tree(&core.output.work_dir(&id, token));
        return Ok(());
    }
    let action = queue::recover_claim(queue, name, why, core.cfg.max_attempts)?;
    if !matches!(action, RecoverAction::Gone) {
        core.metrics.lease_recoveries.inc();
    }
    match action {
        RecoverAction::Requeued { attempts } => {
            info!(job = %id, attempts, "returned to the queue");
            let _ = fsx::remove_tree(&core.output.work_dir(&id, token));
        }
        RecoverAction::Failed { attempts, deaths } => {
            let _ = fsx::remove_tree(&core.output.work_dir(&id, token));
            let dir = queue.job_dir(State::Failed, &id);
            let message = format!(
                "job {id}: its agent stopped {deaths} times while converting it, {attempts} of them while converting nothing else (last: {why}); it was not retried again.\n\
                 The job's disks stay in {} for inspection. If the VM is fine, submit it again (hyperctl jobs retry {id}); if an agent crashes on it, report the agent's log.",
                dir.display()
            );
            job::publish_orphan_result(core, id, &dir, &message, ResultState::Failed);
        }
        RecoverAction::Cancelled { reason } => {
            let _ = fsx::remove_tree(&core.output.work_dir(&id, token));
            let dir = queue.job_dir(State::Cancelled, &id);
            let message = format!("cancelled: {reason} (its agent stopped before it could stop the job itself)");
            job::publish_orphan_result(core, id, &dir, &message, ResultState::Cancelled);
        }
        RecoverAction::Gone => {}
    }
    Ok(())
}

/// How often the queue's directories are looked at (one `stat` each) between full scans: a
/// submission from another host is claimed within about this long instead of a whole poll
/// interval. inotify never sees other hosts' writes; a directory's mtime does (on NFS once the
/// attribute cache expires: mount with a small `actimeo`, see docs/protocol.md).
pub const CHANGE_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// A thread that stats `queued/` every [`CHANGE_CHECK`] and wakes the loop when it changed (a job
/// published from any host). One thread: a hung share stops only it.
struct ChangeCheck {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ChangeCheck {
    fn start(queue: &Queue, wake: Arc<Notify>, poll: std::time::Duration) -> Option<ChangeCheck> {
        if poll <= CHANGE_CHECK {
            return None;
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        // queued/ only: the watch directory itself changes with every health probe, and seed drops
        // there wait for their settle time anyway.
        let dirs = [queue.state_dir(State::Queued)];
        std::thread::Builder::new()
            .name("queue-changes".into())
            .spawn(move || {
                use std::os::unix::fs::MetadataExt;
                let look = |d: &std::path::Path| {
                    std::fs::metadata(d).ok().map(|m| (m.mtime(), m.mtime_nsec(), m.ctime_nsec(), m.nlink(), m.size()))
                };
                let mut last: Vec<_> = dirs.iter().map(|d| look(d)).collect();
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(CHANGE_CHECK);
                    let now: Vec<_> = dirs.iter().map(|d| look(d)).collect();
                    if now != last {
                        wake.notify_one();
                        last = now;
                    }
                }
            })
            .ok()?;
        Some(ChangeCheck { stop })
    }
}

impl Drop for ChangeCheck {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long the loop waits after a file-system event before scanning, so that a burst of events
/// costs one scan.
pub const EVENT_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(100);

/// Wake the loop early on file-system events in the watch directory and `queued/` (local
/// writers only; NFS delivers no events from other hosts, so the timer always rescans too).
fn start_watcher(queue: &Queue, wake: Arc<Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res
            && wakes(&event)
        {
            wake.notify_one();
        }
    };

    let mut w = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            warn!("file-system events unavailable ({e}); relying on the poll interval");
            return None;
        }
    };
    for dir in [queue.root().to_path_buf(), queue.state_dir(State::Queued)] {
        if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
            warn!("cannot watch {}: {e}; relying on the poll interval", dir.display());
        }
    }
    Some(w)
}

/// Whether a file-system event is news: a name created, renamed or removed, or a file closed after
/// writing (a seed drop finished) — not each write into a growing file (a 2 GiB disk copied into the
/// watch directory is thousands of those), not attribute changes, not the agent's own reads
/// (opening and listing a directory generates access events, which would otherwise wake the loop
/// for ever) and not its own probe files.
fn wakes(event: &notify::Event) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    let relevant = matches!(
        event.kind,
        EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Access(AccessKind::Close(AccessMode::Write))
    );
    let own_probe = event.paths.iter().all(|p| {
        p.file_name()
            .map(|n| n.to_string_lossy())
            .is_some_and(|n| n.starts_with(".hyperfarm-probe-") || n.starts_with(".clock."))
    });
    relevant && !own_probe
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, EventKind};

    #[test]
    fn only_news_wakes_the_loop() {
        let ev = |kind, path: &str| notify::Event::new(kind).add_path(path.into());
        assert!(wakes(&ev(EventKind::Create(CreateKind::Folder), "/q/queued/01a")));
        assert!(!wakes(&ev(EventKind::Access(AccessKind::Open(notify::event::AccessMode::Any)), "/q/queued")));
        assert!(!wakes(&ev(EventKind::Create(CreateKind::File), "/q/.hyperfarm-probe-host-1")));
        use notify::event::{AccessMode, DataChange, ModifyKind, RenameMode};
        assert!(!wakes(&ev(EventKind::Modify(ModifyKind::Data(DataChange::Any)), "/q/big.vmdk")), "each write");
        assert!(!wakes(&ev(EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any)), "/q/x")));
        assert!(wakes(&ev(EventKind::Modify(ModifyKind::Name(RenameMode::To)), "/q/queued/01a")));
        assert!(wakes(&ev(EventKind::Access(AccessKind::Close(AccessMode::Write)), "/q/drop.json")));
    }
}
