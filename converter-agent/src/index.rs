//! The in-memory listing of the queue that the API serves: every job's state, VM name, lease
//! progress (converting) and result summary (finished), refreshed from the shared storage by a
//! thread of its own.
//!
//! No RPC ever reads the share to list jobs or count them: a hung NFS mount, a planted FIFO or
//! 200 clients listing 20,000 jobs at once cost the API only memory, and never the threads that
//! claiming, heartbeats and signals need. What the listing costs the share is bounded too: queued
//! and converting jobs are re-listed every second, finished ones every ten; a job's manifest and
//! result record are read once (both are immutable) and at most [`READS_PER_ROUND`] of them per
//! pass; every read is bounded and never blocks on a FIFO.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyperfarm_shared::JobId;
use hyperfarm_shared::queue::{self, LeaseInfo, Queue, State};
use hyperfarm_shared::results::{OutputDir, ResultRecord};

/// Manifests and records read per pass at most (a backlog of 20,000 is indexed over a few passes
/// instead of one long stall).
pub const READS_PER_ROUND: usize = 2000;
/// How often queued and converting jobs are re-listed.
pub const ACTIVE_EVERY: Duration = Duration::from_secs(1);
/// How often finished jobs are re-listed.
pub const FINISHED_EVERY: Duration = Duration::from_secs(10);

/// What the listing knows of one job.
#[derive(Debug, Clone)]
pub struct Indexed {
    pub id: JobId,
    pub state: State,
    /// `None` until read (or when the manifest has no valid name).
    pub vm_name: Option<String>,
    pub seed_drop: bool,
    /// Converting jobs: their lease (agent, phase, progress).
    pub lease: Option<LeaseInfo>,
    /// Finished jobs: their result record (the error cut to its first line).
    pub record: Option<Arc<ResultRecord>>,
    /// Finished jobs without a record: why (withdrawn before any agent claimed them, or failed
    /// when not even the failure could be published).
    pub cancel_reason: Option<String>,
    /// Whether the manifest (and, when finished, the record) was read.
    looked_at: bool,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: BTreeMap<JobId, Indexed>,
    /// When each state was last listed (milliseconds since the epoch).
    listed_at_ms: u64,
}

/// The listing. Cheap to read from any thread; written by [`JobIndex::refresh`] only.
#[derive(Debug)]
pub struct JobIndex {
    inner: RwLock<Inner>,
    limit: usize,
    started: AtomicBool,
}

/// One page of a listing.
#[derive(Debug, Clone)]
pub struct Page {
    pub jobs: Vec<Indexed>,
    pub total: u64,
    /// The last id of this page, when more follow.
    pub next: Option<JobId>,
    pub as_of_ms: u64,
}

impl JobIndex {
    pub fn new(limit: usize) -> JobIndex {
        JobIndex { inner: RwLock::default(), limit, started: AtomicBool::new(false) }
    }

    /// When the queue was last read from the share (0: not yet).
    pub fn as_of_ms(&self) -> u64 {
        self.inner.read().expect("index lock").listed_at_ms
    }

    /// Jobs per state.
    pub fn counts(&self) -> [u64; 5] {
        let g = self.inner.read().expect("index lock");
        let mut c = [0u64; 5];
        for j in g.jobs.values() {
            c[state_slot(j.state)] += 1;
        }
        c
    }

    pub fn get(&self, id: &JobId) -> Option<Indexed> {
        self.inner.read().expect("index lock").jobs.get(id).cloned()
    }

    /// Jobs in `states` (all when empty), oldest first, at most `limit` after `after`.
    pub fn page(&self, states: &[State], after: Option<JobId>, limit: usize) -> Page {
        let g = self.inner.read().expect("index lock");
        let wanted = |j: &&Indexed| states.is_empty() || states.contains(&j.state);
        let total = g.jobs.values().filter(wanted).count() as u64;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut jobs: Vec<Indexed> =
            g.jobs.range((from, Bound::Unbounded)).map(|(_, j)| j).filter(wanted).take(limit + 1).cloned().collect();
        let next = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|j| j.id)
        } else {
            None
        };
        Page { jobs, total, next, as_of_ms: g.listed_at_ms }
    }

    /// Start the refreshing thread (once). It runs until the process ends; a hung share stops only
    /// it, and the listing then grows stale (its `as_of_ms` says so) instead of blocking anyone.
    pub fn start(self: &Arc<Self>, queue: Queue, output: OutputDir, poll: Duration) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let index = self.clone();
        let active_every = ACTIVE_EVERY.min(poll);
        let spawned = std::thread::Builder::new().name("index".into()).spawn(move || {
            let mut last_finished: Option<Instant> = None;
            loop {
                let finished = last_finished.is_none_or(|t| t.elapsed() >= FINISHED_EVERY);
                index.refresh(&queue, &output, finished);
                if finished {
                    last_finished = Some(Instant::now());
                }
                std::thread::sleep(active_every);
            }
        });
        if let Err(e) = spawned {
            tracing::error!("cannot start the listing thread: {e}; job lists will stay empty");
        }
    }

    /// One pass: list the state directories (the finished ones only when `finished`), read what is
    /// new, forget what is gone. Blocking; runs on the index thread (or a test).
    pub fn refresh(&self, q: &Queue, out: &OutputDir, finished: bool) {
        let states: &[State] = if finished { &State::ALL } else { &[State::Queued, State::Converting] };
        let mut listed: Vec<(State, queue::JobEntry)> = Vec::new();
        let mut ok_states: Vec<State> = Vec::new();
        for &state in states {
            match queue::list(q, &[state], false) {
                Ok(entries) => {
                    ok_states.push(state);
                    listed.extend(entries.into_iter().map(|e| (state, e)));
                }
                Err(e) => tracing::debug!("listing {}: {e}", q.state_dir(state).display()),
            }
        }
        if ok_states.is_empty() {
            return;
        }
        // What is new or changed state needs a look; converting jobs' leases are read every pass.
        let (known, cutoff): (std::collections::HashMap<JobId, (State, bool)>, Option<JobId>) = {
            let g = self.inner.read().expect("index lock");
            // At the limit, finished jobs older than the oldest one kept stay left out.
            let cutoff = (g.jobs.len() >= self.limit)
                .then(|| g.jobs.values().find(|j| j.state.is_final()).map(|j| j.id))
                .flatten();
            (g.jobs.values().map(|j| (j.id, (j.state, j.looked_at))).collect(), cutoff)
        };
        // A job that left queued/ or converting/ between two listings of the finished states is
        // looked up where it went, so that it never vanishes from the listing for those seconds.
        if !finished {
            let listed_now: HashSet<JobId> = listed.iter().map(|(_, e)| e.id).collect();
            let vanished: Vec<JobId> = known
                .iter()
                .filter(|(id, (s, _))| ok_states.contains(s) && !listed_now.contains(id))
                .map(|(id, _)| *id)
                .take(READS_PER_ROUND)
                .collect();
            for id in vanished {
                if let Ok(Some((state, dir))) = q.locate(&id)
                    && state.is_final()
                {
                    let entry = queue::JobEntry {
                        id,
                        state,
                        dir,
                        vm_name: None,
                        token: None,
                        lease: None,
                        attempts: 0,
                        seed_drop: false,
                    };
                    listed.push((state, entry));
                }
            }
        }
        let mut reads = 0usize;
        // Each listed job, and whether what was read of it before still holds.
        let mut fresh: Vec<(Indexed, bool)> = Vec::with_capacity(listed.len());
        for (state, e) in &listed {
            if state.is_final() && cutoff.is_some_and(|c| e.id < c) {
                continue;
            }
            let prev = known.get(&e.id);
            let needs_look = prev.is_none_or(|(s, looked)| s != state || !looked);
            let mut j = Indexed {
                id: e.id,
                state: *state,
                vm_name: None,
                seed_drop: false,
                lease: None,
                record: None,
                cancel_reason: None,
                looked_at: false,
            };
            if needs_look && reads < READS_PER_ROUND {
                reads += 1;
                j.looked_at = true;
                j.seed_drop = queue::has_origin(&e.dir);
                j.vm_name = queue::read_manifest(&e.dir)
                    .ok()
                    .and_then(|b| hyperfarm_shared::manifest::Manifest::parse(&b).ok())
                    .and_then(|m| m.vm_name().map(str::to_string));
                if state.is_final() {
                    j.record = out.read_record(&e.id).ok().flatten().map(|mut r| {
                        if let Some(err) = &r.error {
                            r.error = Some(err.lines().next().unwrap_or_default().to_string());
                        }
                        Arc::new(r)
                    });
                    if *state == State::Cancelled && j.record.is_none() {
                        j.cancel_reason = queue::cancel_reason(&e.dir).map(|r| format!("cancelled: {r}"));
                    }
                    if *state == State::Failed && j.record.is_none() {
                        j.cancel_reason = queue::failure_reason(&e.dir);
                    }
                }
            }
            if *state == State::Converting {
                j.lease = queue::read_lease(&e.dir.join(queue::LEASE)).ok().and_then(|(_, l)| l);
            }
            fresh.push((j, !needs_look));
        }
        let mut g = self.inner.write().expect("index lock");
        let present: HashSet<JobId> = listed.iter().map(|(_, e)| e.id).collect();
        // Forget jobs gone from the directories that were listed.
        g.jobs.retain(|id, j| !ok_states.contains(&j.state) || present.contains(id));
        for (mut j, carry) in fresh {
            if carry && let Some(old) = g.jobs.get(&j.id) {
                j.looked_at = true;
                j.vm_name = old.vm_name.clone();
                j.seed_drop = old.seed_drop;
                j.record = old.record.clone();
                j.cancel_reason = old.cancel_reason.clone();
            }
            g.jobs.insert(j.id, j);
        }
        // Bounded: beyond the limit, the oldest finished jobs are left out (they stay on disk).
        let excess = g.jobs.len().saturating_sub(self.limit);
        if excess > 0 {
            let oldest: Vec<JobId> =
                g.jobs.values().filter(|j| j.state.is_final()).take(excess).map(|j| j.id).collect();
            for id in oldest {
                g.jobs.remove(&id);
            }
        }
        g.listed_at_ms = queue::now_ms();
    }
}

fn state_slot(s: State) -> usize {
    match s {
        State::Queued => 0,
        State::Converting => 1,
        State::Done => 2,
        State::Failed => 3,
        State::Cancelled => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_pages_and_forgets_and_never_grows_past_its_limit() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path().join("q"));
        std::fs::create_dir_all(q.root()).expect("mkdir");
        q.init().expect("init");
        let out = OutputDir::new(d.path().join("o"));
        std::fs::create_dir_all(out.path()).expect("mkdir");
        out.init().expect("init");
        let mut ids = Vec::new();
        for i in 0..250 {
            let id = JobId::new();
            let state = if i % 2 == 0 { State::Done } else { State::Queued };
            std::fs::create_dir(q.job_dir(state, &id)).expect("mkdir");
            ids.push(id);
        }
        // A planted FIFO manifest does not stop the pass.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            q.job_dir(State::Queued, &ids[1]).join(queue::MANIFEST),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        let index = JobIndex::new(200);
        index.refresh(&q, &out, true);
        let [queued, _, done, _, _] = index.counts();
        assert_eq!(queued, 125);
        assert_eq!(done, 75, "the oldest finished jobs beyond the limit are left out");
        let p1 = index.page(&[State::Queued], None, 100);
        assert_eq!((p1.jobs.len(), p1.total), (100, 125));
        let p2 = index.page(&[State::Queued], p1.next, 100);
        assert_eq!(p2.jobs.len(), 25);
        assert!(p2.next.is_none());
        assert!(p1.jobs.last().expect("one").id < p2.jobs[0].id, "oldest first, no overlap");
        std::fs::remove_dir_all(q.job_dir(State::Queued, &ids[1])).expect("rm");
        index.refresh(&q, &out, false);
        assert_eq!(index.counts()[0], 124, "a removed job is forgotten");
        assert!(index.as_of_ms() > 0);
    }
}
