//! Model-based property test of the queue state machine: random sequences of publish, claim,
//! heartbeat, crash, recover, complete and cancel, applied to the real queue code on a real
//! directory, checked after every step against a simple in-memory model.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Instant;

use proptest::prelude::*;

use hyperfarm_shared::JobId;
use hyperfarm_shared::manifest::Manifest;
use hyperfarm_shared::queue::{
    self, Beat, Claim, LeaseTracker, Liveness, Outcome, Queue, RecoverAction, Staging, State,
};

const MAX_ATTEMPTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Publish,
    Claim {
        agent: usize,
        job: usize,
    },
    Heartbeat {
        agent: usize,
        claim: usize,
    },
    Crash {
        agent: usize,
    },
    /// Another agent takes a live claim back as if its lease had expired (its holder paused).
    Expire {
        agent: usize,
        claim: usize,
    },
    Recover,
    Complete {
        agent: usize,
        claim: usize,
        outcome: u8,
    },
    Cancel {
        job: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Publish),
        4 => (0..2usize, 0..64usize).prop_map(|(agent, job)| Op::Claim { agent, job }),
        2 => (0..2usize, 0..8usize).prop_map(|(agent, claim)| Op::Heartbeat { agent, claim }),
        1 => (0..2usize).prop_map(|agent| Op::Crash { agent }),
        1 => (0..2usize, 0..8usize).prop_map(|(agent, claim)| Op::Expire { agent, claim }),
        2 => Just(Op::Recover),
        3 => (0..2usize, 0..8usize, 0..3u8).prop_map(|(agent, claim, outcome)| Op::Complete { agent, claim, outcome }),
        1 => (0..64usize).prop_map(|job| Op::Cancel { job }),
    ]
}

/// What the model believes about a job.
#[derive(Debug, Clone, PartialEq)]
enum M {
    Queued,
    /// Claimed by an agent; `orphan` once that agent crashed.
    Converting {
        orphan: bool,
        cancel_requested: bool,
    },
    Final(State),
}

struct World {
    _dir: tempfile::TempDir,
    q: Queue,
    jobs: Vec<JobId>,
    model: HashMap<JobId, M>,
    crashes: HashMap<JobId, usize>,
    agents: [Vec<Claim>; 2],
    /// Jobs whose claim was taken from a still-running holder.
    stale: Vec<JobId>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path());
        q.init().unwrap();
        World {
            _dir: dir,
            q,
            jobs: vec![],
            model: HashMap::new(),
            crashes: HashMap::new(),
            agents: [vec![], vec![]],
            stale: vec![],
        }
    }

    fn publish(&mut self) {
        let id = JobId::new();
        let st = Staging::create(&self.q, id).unwrap();
        std::fs::write(st.disk_path("d0.raw"), [0u8; 512]).unwrap();
        let m = Manifest::parse(
            format!(
                r#"{{"manifest_version":"1.0","source":{{"vm_name":"m"}},"disks":[{{"id":"d0","source_format":"raw","bytes":512,"local_path":"disks/d0.raw"}}],"hyperfarm":{{"schema_version":1,"job_id":"{id}"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        st.publish(&m).unwrap();
        self.jobs.push(id);
        self.model.insert(id, M::Queued);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Publish => self.publish(),
            Op::Claim { agent, job } => {
                let Some(&id) = self.jobs.get(job % self.jobs.len().max(1)) else { return };
                let got = queue::claim(&self.q, id, &format!("agent{agent}"), 1).unwrap();
                if self.model[&id] == M::Queued {
                    let c = got.expect("a queued job must be claimable");
                    self.agents[agent].push(c);
                    self.model.insert(id, M::Converting { orphan: false, cancel_requested: false });
                } else {
                    assert!(got.is_none(), "job {id} in {:?} was claimed", self.model[&id]);
                }
            }
            Op::Heartbeat { agent, claim } => {
                let n = self.agents[agent].len();
                if n == 0 {
                    return;
                }
                let c = &mut self.agents[agent][claim % n];
                let id = c.id();
                let token = c.token().to_string();
                let beat = c.heartbeat("converting", 1.0, 1, 2).unwrap();
                let current = self.q.locate(&id).unwrap().is_some_and(|(s, d)| {
                    s == State::Converting && d.file_name().unwrap().to_string_lossy().ends_with(&token)
                });
                if !current {
                    assert_eq!(beat, Beat::Lost, "job {id}: a holder whose claim was taken must learn it");
                    return;
                }
                match &self.model[&id] {
                    M::Converting { orphan: false, cancel_requested } => {
                        let want = if *cancel_requested { "cancel" } else { "owned" };
                        match (beat, want) {
                            (Beat::Owned, "owned") | (Beat::CancelRequested(_), "cancel") => {}
                            (b, w) => panic!("job {id}: heartbeat {b:?}, model expects {w}"),
                        }
                    }
                    // The claim is gone (recovered after a crash… of another holder) or finished.
                    _ => assert_eq!(beat, Beat::Lost, "job {id}: a claim the model does not own"),
                }
            }
            Op::Crash { agent } => {
                for c in std::mem::take(&mut self.agents[agent]) {
                    // Only the current holder's death orphans the job (a paused holder's stale
                    // claim object may still be around).
                    if c.dir().exists()
                        && let Some(M::Converting { orphan, .. }) = self.model.get_mut(&c.id())
                    {
                        *orphan = true;
                    }
                    // Dropping the claim closes the lease file: its lock is released, as when the
                    // process dies.
                    drop(c);
                }
            }
            Op::Expire { agent, claim } => {
                let n = self.agents[agent].len();
                if n == 0 {
                    return;
                }
                let c = &self.agents[agent][claim % n];
                let id = c.id();
                if !matches!(self.model[&id], M::Converting { orphan: false, .. }) || !c.dir().exists() {
                    return;
                }
                let name = c.dir().file_name().unwrap().to_string_lossy().into_owned();
                let crashes = self.crashes.entry(id).or_default();
                *crashes += 1;
                let action = queue::recover_claim(&self.q, &name, "lease expired", MAX_ATTEMPTS).unwrap();
                let cancel = matches!(self.model[&id], M::Converting { cancel_requested: true, .. });
                let want = expected_recovery(cancel, *crashes);
                assert!(recovery_matches(&action, &want), "{action:?} vs {want:?}");
                // The paused holder keeps its Claim object: the model now says it does not own it.
                self.model.insert(id, want);
                self.stale.push(id);
            }
            Op::Recover => {
                let mut tracker = LeaseTracker::new(std::time::Duration::from_secs(3600));
                let names: Vec<String> = std::fs::read_dir(self.q.state_dir(State::Converting))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                for name in names {
                    let (id, _) = queue::parse_claim_name(&name).unwrap();
                    let live = tracker.assess_at(&self.q, &name, None, Instant::now());
                    let orphan = matches!(self.model[&id], M::Converting { orphan: true, .. });
                    assert_eq!(
                        matches!(live, Liveness::Stale(_)),
                        orphan,
                        "job {id}: {live:?} but model orphan = {orphan}"
                    );
                    if orphan {
                        let crashes = self.crashes.entry(id).or_default();
                        *crashes += 1;
                        let action = queue::recover_claim(&self.q, &name, "test crash", MAX_ATTEMPTS).unwrap();
                        let cancel = matches!(self.model[&id], M::Converting { cancel_requested: true, .. });
                        let want = expected_recovery(cancel, *crashes);
                        assert!(
                            recovery_matches(&action, &want),
                            "job {id}: recovery {action:?}, model expects {want:?}"
                        );
                        self.model.insert(id, want);
                    }
                }
            }
            Op::Complete { agent, claim, outcome } => {
                let n = self.agents[agent].len();
                if n == 0 {
                    return;
                }
                let c = self.agents[agent].remove(claim % n);
                let id = c.id();
                let token = c.token().to_string();
                let current = self.q.locate(&id).unwrap().is_some_and(|(s, d)| {
                    s == State::Converting && d.file_name().unwrap().to_string_lossy().ends_with(&token)
                });
                let outcome = [Outcome::Done, Outcome::Failed, Outcome::Cancelled][outcome as usize];
                let moved = c.finish(outcome).unwrap();
                let owned = current && matches!(self.model[&id], M::Converting { orphan: false, .. });
                assert_eq!(moved, owned, "job {id}: finish moved = {moved}, model owned = {owned}");
                if moved {
                    self.model.insert(id, M::Final(outcome.state()));
                }
            }
            Op::Cancel { job } => {
                let Some(&id) = self.jobs.get(job % self.jobs.len().max(1)) else { return };
                let seen = self.q.request_cancel(&id, "test").unwrap();
                match self.model[&id].clone() {
                    M::Queued => {
                        assert_eq!(seen, Some(State::Cancelled));
                        self.model.insert(id, M::Final(State::Cancelled));
                    }
                    M::Converting { orphan, cancel_requested } => {
                        // A second request finds the first one's file: still "converting".
                        assert_eq!(seen, Some(State::Converting), "cancel_requested = {cancel_requested}");
                        self.model.insert(id, M::Converting { orphan, cancel_requested: true });
                    }
                    M::Final(s) => assert_eq!(seen, Some(s)),
                }
            }
        }
    }

    /// Every job is in exactly one state directory, the one the model says.
    fn check(&self) {
        for (&id, m) in &self.model {
            let mut found = Vec::new();
            for s in State::ALL {
                for e in std::fs::read_dir(self.q.state_dir(s)).unwrap() {
                    let name = e.unwrap().file_name().to_string_lossy().into_owned();
                    if name == id.to_string() || name.starts_with(&format!("{id}@")) {
                        found.push(s);
                    }
                }
            }
            let want = match m {
                M::Queued => State::Queued,
                M::Converting { .. } => State::Converting,
                M::Final(s) => *s,
            };
            assert_eq!(found, vec![want], "job {id}: on disk in {found:?}, model {m:?}");
        }
        let tmp: Vec<_> = std::fs::read_dir(self.q.tmp_dir()).unwrap().collect();
        assert!(tmp.is_empty(), "nothing is left in tmp/");
    }
}

/// What recovery must do: honour a pending cancel, fail after too many crashes, else requeue.
fn expected_recovery(cancel_requested: bool, crashes: usize) -> M {
    if cancel_requested {
        M::Final(State::Cancelled)
    } else if crashes >= MAX_ATTEMPTS {
        M::Final(State::Failed)
    } else {
        M::Queued
    }
}

fn recovery_matches(action: &RecoverAction, want: &M) -> bool {
    matches!(
        (action, want),
        (RecoverAction::Requeued { .. }, M::Queued)
            | (RecoverAction::Failed { .. }, M::Final(State::Failed))
            | (RecoverAction::Cancelled { .. }, M::Final(State::Cancelled))
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_queue_follows_its_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        w.publish();
        for op in &ops {
            w.apply(op);
            w.check();
        }
    }
}
