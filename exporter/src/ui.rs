//! Progress on stderr: a bar on a terminal, plain lines otherwise (logs, CI, systemd).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports the progress of one byte-counted activity.
pub struct Meter {
    label: String,
    total: u64,
    bar: Option<ProgressBar>,
    last_line: Instant,
    last_pct: i64,
    started: Instant,
    quiet: bool,
}

impl Meter {
    pub fn new(label: impl Into<String>, total: u64, quiet: bool) -> Self {
        let label = label.into();
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total.max(1));
            b.set_style(
                ProgressStyle::with_template("{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
            b.set_message(label.clone());
            b
        });
        Meter { label, total, bar, last_line: Instant::now(), last_pct: -1, started: Instant::now(), quiet }
    }

    /// Bytes done so far (absolute), with an optional phase word for plain lines.
    pub fn set(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            return;
        }
        if self.quiet {
            return;
        }
        let pct = if self.total == 0 { 100 } else { (done as f64 * 100.0 / self.total as f64) as i64 };
        if pct / 10 != self.last_pct / 10 || self.last_line.elapsed() >= Duration::from_secs(5) {
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "{}: {} / {} ({pct}%) {}/s",
                self.label,
                human(done),
                human(self.total),
                human((done as f64 / secs) as u64)
            );
            self.last_pct = pct;
            self.last_line = Instant::now();
        }
    }

    /// A percentage-only activity (the agent's conversion).
    pub fn set_percent(&mut self, phase: &str, pct: f64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{} {phase}", self.label));
            b.set_position((pct / 100.0 * self.total.max(1) as f64) as u64);
            return;
        }
        if self.quiet {
            return;
        }
        let p = pct as i64;
        if p / 10 != self.last_pct / 10 || self.last_line.elapsed() >= Duration::from_secs(30) {
            eprintln!("{}: {phase} {pct:.0}%", self.label);
            self.last_pct = p;
            self.last_line = Instant::now();
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

pub use hyperfarm_shared::human::bytes as human;
