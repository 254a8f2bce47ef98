//! The agent's in-memory view of its jobs: what is running, with what progress, and the last
//! results. Every change gets a sequence number and is broadcast on a bounded channel (slow
//! readers lose events and must re-read the snapshot; the worker never waits for them).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::broadcast;

use hyperfarm_shared::JobId;
use hyperfarm_shared::progress::{Phase, Progress};

/// Finished jobs remembered in memory.
const RECENT: usize = 1000;
/// Changes buffered for live readers.
const EVENTS: usize = 1024;
/// Changes remembered for readers resuming from a sequence number.
const HISTORY: usize = 4096;

#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: JobId,
    pub vm_name: Option<String>,
    pub progress: Progress,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    /// First line of the error, for failed and cancelled jobs.
    pub summary: Option<String>,
    /// Output files (done jobs).
    pub files: Vec<String>,
    pub engine: Option<String>,
    /// `<instance>@<host>`.
    pub agent: String,
    pub finished_at_ms: u64,
    pub attempts: u32,
    pub seed_drop: bool,
}

#[derive(Debug, Clone)]
pub struct Change {
    pub seq: u64,
    pub view: JobView,
}

#[derive(Debug)]
struct Inner {
    seq: u64,
    running: HashMap<JobId, JobView>,
    recent: VecDeque<JobView>,
    history: VecDeque<Change>,
}

impl Inner {
    fn push(&mut self, view: JobView) -> Change {
        self.seq += 1;
        let change = Change { seq: self.seq, view };
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        change
    }
}

#[derive(Debug)]
pub struct Board {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Change>,
}

impl Default for Board {
    fn default() -> Self {
        Self::new()
    }
}

impl Board {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(EVENTS);
        Board {
            inner: Mutex::new(Inner {
                seq: 0,
                running: HashMap::new(),
                recent: VecDeque::new(),
                history: VecDeque::new(),
            }),

            tx,
        }
    }

    /// Record a job's new view and broadcast it.
    pub fn update(&self, view: JobView) -> u64 {
        let mut g = self.inner.lock().expect("board lock poisoned");
        if view.progress.phase.is_final() {
            g.running.remove(&view.id);
            g.recent.retain(|v| v.id != view.id);
            g.recent.push_back(view.clone());
            while g.recent.len() > RECENT {
                g.recent.pop_front();
            }
        } else if view.progress.phase == Phase::Queued {
            // A job seen waiting in the queue: announced, not held (the queue on disk is the
            // record of waiting jobs).
        } else {
            g.running.insert(view.id, view.clone());
        }
        let change = g.push(view);

        let seq = change.seq;
        let _ = self.tx.send(change);
        seq
    }

    /// Forget a job without a final state (returned to the queue on shutdown, or lost).
    pub fn remove(&self, id: &JobId, phase: Phase) {
        let mut g = self.inner.lock().expect("board lock poisoned");
        if let Some(mut v) = g.running.remove(id) {
            v.progress.phase = phase;
            let change = g.push(v);
            let _ = self.tx.send(change);
        }
    }

    pub fn running(&self) -> Vec<JobView> {
        let g = self.inner.lock().expect("board lock poisoned");
        let mut v: Vec<JobView> = g.running.values().cloned().collect();
        v.sort_by_key(|j| j.id);
        v
    }

    pub fn recent(&self) -> Vec<JobView> {
        self.inner.lock().expect("board lock poisoned").recent.iter().cloned().collect()
    }

    pub fn get(&self, id: &JobId) -> Option<JobView> {
        let g = self.inner.lock().expect("board lock poisoned");
        g.running.get(id).cloned().or_else(|| g.recent.iter().rev().find(|v| v.id == *id).cloned())
    }

    /// The current sequence number and a receiver for changes after it.
    pub fn subscribe(&self) -> (u64, broadcast::Receiver<Change>) {
        let g = self.inner.lock().expect("board lock poisoned");
        (g.seq, self.tx.subscribe())
    }

    pub fn seq(&self) -> u64 {
        self.inner.lock().expect("board lock poisoned").seq
    }

    /// The changes after `seq`, with a receiver for later ones, or `Err(oldest)` when changes
    /// after `seq` are no longer remembered.
    pub fn since(&self, seq: u64) -> Result<(Vec<Change>, broadcast::Receiver<Change>), u64> {
        let g = self.inner.lock().expect("board lock poisoned");
        let oldest = g.history.front().map(|c| c.seq).unwrap_or(g.seq + 1);
        if seq > g.seq || (seq + 1 < oldest && seq < g.seq) {
            return Err(oldest);
        }
        let changes = g.history.iter().filter(|c| c.seq > seq).cloned().collect();
        Ok((changes, self.tx.subscribe()))
    }

    /// Every job the board knows (running, then recent), with the sequence number they reflect
    /// and a receiver for later changes.
    pub fn snapshot(&self) -> (u64, Vec<JobView>, broadcast::Receiver<Change>) {
        let g = self.inner.lock().expect("board lock poisoned");
        let mut v: Vec<JobView> = g.running.values().cloned().collect();
        v.sort_by_key(|j| j.id);
        v.extend(g.recent.iter().cloned());
        (g.seq, v, self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(phase: Phase) -> JobView {
        JobView {
            id: JobId::new(),
            vm_name: None,
            progress: Progress::phase(phase, 0),
            started_at_ms: 0,
            updated_at_ms: 0,
            summary: None,
            files: vec![],
            engine: None,
            agent: "a".into(),
            finished_at_ms: 0,
            attempts: 1,
            seed_drop: false,
        }
    }

    #[test]
    fn history_replays_and_knows_when_it_is_too_old() {
        let b = Board::new();
        let mut v = view(Phase::Converting);
        for _ in 0..10 {
            b.update(v.clone());
        }
        v.progress.phase = Phase::Done;
        b.update(v.clone());
        assert_eq!(b.seq(), 11);
        assert!(b.running().is_empty());
        assert_eq!(b.recent().len(), 1);
        let (changes, _) = b.since(8).expect("remembered");
        assert_eq!(changes.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![9, 10, 11]);
        assert!(b.since(11).expect("nothing new").0.is_empty());
        assert!(b.since(12).is_err(), "from the future");
        for _ in 0..HISTORY + 5 {
            b.update(view(Phase::Converting));
        }
        assert!(b.since(3).is_err(), "forgotten");
        let (seq, jobs, _) = b.snapshot();
        assert_eq!(seq, b.seq());
        assert_eq!(jobs.len(), HISTORY + 5 + 1);
    }
}
