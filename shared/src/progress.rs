//! Job phases and progress, as the agent reports them (lease file, logs, gRPC).

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Queued,
    Verifying,
    Converting,
    Checking,
    Publishing,
    Done,
    Failed,
    Cancelled,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Verifying => "verifying",
            Phase::Converting => "converting",
            Phase::Checking => "checking",
            Phase::Publishing => "publishing",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a job's progress. `percent` covers the whole job's current phase; bytes are of
/// the disk data that phase goes through.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    pub percent: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The disk being worked on.
    pub disk: Option<String>,
}

impl Progress {
    pub fn phase(phase: Phase, bytes_total: u64) -> Self {
        Progress {
            phase,
            percent: 0.0,
            bytes_done: 0,
            bytes_total,
            disk: None,
        }
    }
}
