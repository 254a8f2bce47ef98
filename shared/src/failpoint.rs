//! Crash points for the reliability campaign (`tests/integration/crash.rs`).
//!
//! `HYPERFARM_FAILPOINT=<name>` makes the process kill itself with SIGKILL — exactly what
//! `kill -9` does — the first time it reaches the point of that name. `HYPERFARM_FAILPOINT=stop:<name>`
//! makes it stop itself (SIGSTOP) there instead, every time, so that a test can change the world at
//! exactly that instant and let it go on with SIGCONT (races made deterministic). Unset (always, in
//! production) a point costs one check of a value read once.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Reach the point `name`.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var("HYPERFARM_FAILPOINT").ok().filter(|s| !s.is_empty()));
    if let Some(point) = armed.as_deref().and_then(|a| a.strip_prefix("stop:"))
        && point == name
    {
        eprintln!("failpoint {name}: stopping this process (SIGSTOP); continue it with SIGCONT");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
        return;
    }
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
    "agent.inspected",
    "agent.verified",
    "agent.converted",
    "agent.checked",
    "agent.publish-started",
    "agent.files-linked",
    "agent.record-linked",
    "agent.finished",
];
