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
/// Changes buffered for readers.
const EVENTS: usize = 1024;

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
            }),
            tx,
        }
    }

    /// Record a job's new view and broadcast it.
    pub fn update(&self, view: JobView) -> u64 {
        let mut g = self.inner.lock().expect("board lock poisoned");
        g.seq += 1;
        let seq = g.seq;
        if view.progress.phase.is_final() {
            g.running.remove(&view.id);
            g.recent.retain(|v| v.id != view.id);
            g.recent.push_back(view.clone());
            while g.recent.len() > RECENT {
                g.recent.pop_front();
            }
        } else {
            g.running.insert(view.id, view.clone());
        }
        let _ = self.tx.send(Change { seq, view });
        seq
    }

    /// Forget a job without a final state (returned to the queue on shutdown, or lost).
    pub fn remove(&self, id: &JobId, phase: Phase) {
        let mut g = self.inner.lock().expect("board lock poisoned");
        if let Some(mut v) = g.running.remove(id) {
            g.seq += 1;
            let seq = g.seq;
            v.progress.phase = phase;
            let _ = self.tx.send(Change { seq, view: v });
        }
    }

    pub fn running(&self) -> Vec<JobView> {
        let g = self.inner.lock().expect("board lock poisoned");
        let mut v: Vec<JobView> = g.running.values().cloned().collect();
        v.sort_by_key(|j| j.id);
        v
    }

    pub fn recent(&self) -> Vec<JobView> {
        self.inner
            .lock()
            .expect("board lock poisoned")
            .recent
            .iter()
            .cloned()
            .collect()
    }

    pub fn get(&self, id: &JobId) -> Option<JobView> {
        let g = self.inner.lock().expect("board lock poisoned");
        g.running
            .get(id)
            .cloned()
            .or_else(|| g.recent.iter().rev().find(|v| v.id == *id).cloned())
    }

    /// The current sequence number and a receiver for changes after it.
    pub fn subscribe(&self) -> (u64, broadcast::Receiver<Change>) {
        let g = self.inner.lock().expect("board lock poisoned");
        (g.seq, self.tx.subscribe())
    }

    pub fn seq(&self) -> u64 {
        self.inner.lock().expect("board lock poisoned").seq
    }
}
