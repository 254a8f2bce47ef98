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
    /// Smoothed rate of `bytes_done`, bytes per second (0 when unknown).
    #[serde(default)]
    pub rate: f64,
    /// Seconds to the end of the phase, when the rate is known.
    #[serde(default)]
    pub eta_secs: Option<f64>,
}

impl Progress {
    pub fn phase(phase: Phase, bytes_total: u64) -> Self {
        Progress { phase, bytes_total, ..Default::default() }
    }
}

/// Turns a series of progress snapshots into a smoothed rate and an ETA.
#[derive(Debug, Default)]
pub struct RateMeter {
    last: Option<(Phase, Option<String>, u64, std::time::Instant)>,
    rate: f64,
}

impl RateMeter {
    /// Fill in `p.rate` and `p.eta_secs` from the previous snapshots.
    pub fn update(&mut self, p: &mut Progress) {
        self.update_at(p, std::time::Instant::now());
    }

    pub fn update_at(&mut self, p: &mut Progress, now: std::time::Instant) {
        match &self.last {
            Some((phase, disk, bytes, at)) if *phase == p.phase && *disk == p.disk && p.bytes_done >= *bytes => {
                let dt = now.duration_since(*at).as_secs_f64();
                if dt < 0.2 {
                    p.rate = self.rate;
                } else {
                    let inst = (p.bytes_done - bytes) as f64 / dt;
                    self.rate = if self.rate == 0.0 { inst } else { 0.7 * self.rate + 0.3 * inst };
                    self.last = Some((p.phase, p.disk.clone(), p.bytes_done, now));
                    p.rate = self.rate;
                }
            }
            _ => {
                self.rate = 0.0;
                self.last = Some((p.phase, p.disk.clone(), p.bytes_done, now));
                p.rate = 0.0;
            }
        }
        p.eta_secs =
            (p.rate > 0.0 && p.bytes_total >= p.bytes_done).then(|| (p.bytes_total - p.bytes_done) as f64 / p.rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn rate_and_eta_follow_the_bytes() {
        let mut m = RateMeter::default();
        let t0 = Instant::now();
        let mut p = Progress { phase: Phase::Converting, bytes_total: 1000, ..Default::default() };
        m.update_at(&mut p, t0);
        assert_eq!(p.rate, 0.0);
        assert_eq!(p.eta_secs, None);
        p.bytes_done = 100;
        m.update_at(&mut p, t0 + Duration::from_secs(1));
        assert_eq!(p.rate, 100.0);
        assert_eq!(p.eta_secs, Some(9.0));
        // A new phase starts over.
        p.phase = Phase::Checking;
        m.update_at(&mut p, t0 + Duration::from_secs(2));
        assert_eq!(p.rate, 0.0);
    }
}
