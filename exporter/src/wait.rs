//! Daemon mode: wait for this job's own result record, checking at once and then every poll
//! interval, until the timeout; on timeout, withdraw the job if no agent has claimed it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use hyperfarm_shared::JobId;
use hyperfarm_shared::queue::{self, LeaseInfo, Queue, State};
use hyperfarm_shared::results::{OutputDir, ResultRecord};

use crate::ui::Meter;

/// How waiting ended.
#[derive(Debug)]
pub enum Waited {
    /// The job's record (done, failed or cancelled).
    Result(ResultRecord),
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
}

/// Follow the job by polling the output directory (and the queue, for progress).
pub async fn poll(p: &WaitParams, interrupt: Arc<Notify>) -> Waited {
    let deadline = Instant::now() + p.timeout;
    let mut meter = Meter::new(format!("job {}", p.id.short()), 1000, p.quiet);
    let mut final_without_record = 0;
    loop {
        let (q, o, id) = (p.queue.clone(), p.output.clone(), p.id);
        let look = tokio::task::spawn_blocking(move || look(&q, &o, &id)).await;
        match look {
            Ok(Look::Record(r)) => return Waited::Result(r),
            Ok(Look::State(Some((state, lease)))) => {
                if state.is_final() {
                    final_without_record += 1;
                    // A recovering agent writes the record just after moving the job; give it
                    // a few polls before reporting what the queue says.
                    if final_without_record >= 3 {
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
        let now = Instant::now();
        if now >= deadline {
            meter.finish();
            return timed_out(p).await;
        }
        let sleep = p.poll.min(deadline - now);
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = interrupt.notified() => {
                meter.finish();
                let (q, id) = (p.queue.clone(), p.id);
                let withdrawn = tokio::task::spawn_blocking(move || q.withdraw(&id, "hyperexport was interrupted while waiting"))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(false);
                return Waited::Interrupted { withdrawn };
            }
        }
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
            let lease = std::fs::read(dir.join(queue::LEASE))
                .ok()
                .and_then(|b| serde_json::from_slice::<LeaseInfo>(b.trim_ascii()).ok());
            Look::State(Some((state, lease)))
        }
        _ => Look::State(None),
    }
}

fn reason_of(q: &Queue, id: &JobId, state: State) -> String {
    let dir = q.job_dir(state, id);
    std::fs::read(dir.join(queue::CANCEL))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_string))
        .unwrap_or_else(|| {
            format!(
                "the job is in {}/ without a result record",
                state.dir_name()
            )
        })
}

async fn timed_out(p: &WaitParams) -> Waited {
    let (q, id) = (p.queue.clone(), p.id);
    let reason = format!(
        "hyperexport timed out after {}",
        hyperfarm_shared::duration::show(p.timeout)
    );
    let res = tokio::task::spawn_blocking(move || {
        let withdrawn = q.withdraw(&id, &reason).unwrap_or(false);
        let located = q.locate(&id).ok().flatten();
        let lease = located.as_ref().and_then(|(_, dir)| {
            std::fs::read(dir.join(queue::LEASE))
                .ok()
                .and_then(|b| serde_json::from_slice::<LeaseInfo>(b.trim_ascii()).ok())
        });
        (withdrawn, located.map(|(s, _)| s), lease)
    })
    .await;
    match res {
        Ok((withdrawn, state, lease)) => Waited::TimedOut {
            withdrawn,
            state,
            lease,
        },
        Err(_) => Waited::TimedOut {
            withdrawn: false,
            state: None,
            lease: None,
        },
    }
}

/// Full paths of a record's files.
pub fn result_paths(output: &OutputDir, r: &ResultRecord) -> Vec<PathBuf> {
    let mut files: Vec<_> = r.files.iter().collect();
    files.sort_by_key(|f| !f.boot);
    files.iter().map(|f| output.path().join(&f.name)).collect()
}
