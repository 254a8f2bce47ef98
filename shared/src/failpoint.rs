//! Crash points for the reliability campaign (`tests/integration/crash.rs`).
//!
//! `HYPERFARM_FAILPOINT=<name>` makes the process kill itself with SIGKILL — exactly what
//! `kill -9` does — the first time it reaches the point of that name. Unset (always, in
//! production) a point costs one check of a value read once.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Reach the point `name`.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var("HYPERFARM_FAILPOINT").ok().filter(|s| !s.is_empty()));
    if armed.as_deref() == Some(name) {
        eprintln!("failpoint {name}: killing this process (SIGKILL)");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is not reached.
        std::process::abort();
    }
}

/// Every point, for the campaign to iterate over.
pub const EXPORTER_POINTS: &[&str] =
    &["export.staged", "export.disk-copied", "export.manifest-written", "export.before-rename", "export.published"];

pub const AGENT_POINTS: &[&str] = &[
    "agent.claimed",
    "agent.lease-written",
    "agent.loaded",
    "agent.verified",
    "agent.converted",
    "agent.checked",
    "agent.publish-started",
    "agent.files-linked",
    "agent.record-linked",
    "agent.finished",
];
