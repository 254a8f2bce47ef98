//! Progress on stderr: a bar on a terminal, plain lines otherwise (logs, CI, systemd).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

static JSON: AtomicBool = AtomicBool::new(false);

/// `--progress json`: progress and events as JSON lines on stdout, for a program reading them
/// (`hyperexport serve`), instead of bars or lines on stderr.
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Print one event line (JSON mode only). A closed stdout is ignored: the export goes on.
pub fn event(v: &serde_json::Value) {
    if json() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
}

/// Reports the progress of one byte-counted activity.
pub struct Meter {
    stage: &'static str,
    item: String,
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
        let bar = (!quiet && !json() && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total.max(1));
            b.set_style(
                ProgressStyle::with_template("{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
            b.set_message(label.clone());
            b
        });
        Meter {
            stage: "convert",
            item: String::new(),
            label,
            total,
            bar,
            last_line: Instant::now(),
            last_pct: -1,
            started: Instant::now(),
            quiet,
        }
    }

    /// What the JSON events say this is: `export` (copying a disk into the queue, the item is
    /// the disk) or `convert` (the default).
    pub fn stage(mut self, stage: &'static str, item: &str) -> Self {
        self.stage = stage;
        self.item = item.to_string();
        self
    }

    /// JSON mode: one event per whole percent changed, or every second.
    fn json_event(&mut self, phase: &str, pct: f64, done: Option<u64>) -> bool {
        if !json() {
            return false;
        }
        let p = pct.floor() as i64;
        if p != self.last_pct || self.last_line.elapsed() >= Duration::from_secs(1) {
            event(&serde_json::json!({
                "event": "progress", "stage": self.stage, "item": self.item, "phase": phase,
                "percent": (pct * 10.0).round() / 10.0, "done": done, "total": done.map(|_| self.total),
            }));
            self.last_pct = p;
            self.last_line = Instant::now();
        }
        true
    }

    /// Bytes done so far (absolute), with an optional phase word for plain lines.
    pub fn set(&mut self, done: u64) {
        let pct = if self.total == 0 { 100.0 } else { done as f64 * 100.0 / self.total as f64 };
        if self.json_event("copy", pct, Some(done)) {
            return;
        }
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
        if self.json_event(phase, pct, None) {
            return;
        }
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

    /// Run `work` to its end, showing the byte count `done` every 200 ms, and once more (then
    /// finishing the bar) when it is over.
    pub async fn follow<F: std::future::Future>(&mut self, work: F, done: &std::sync::atomic::AtomicU64) -> F::Output {
        tokio::pin!(work);
        let out = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tokio::time::sleep(Duration::from_millis(200)) => self.set(done.load(Ordering::Relaxed)),
            }
        };
        self.set(done.load(Ordering::Relaxed));
        self.finish();
        out
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.finish();
    }
}

pub use hyperfarm_shared::human::bytes as human;
