//! Agents announce themselves in the queue they serve:
//! `<watch-dir>/.agents/<host-id>@<instance>@<boot>@<pid>.json`,
//! rewritten every few seconds while the agent runs and removed when it stops.
//!
//! This is how an exporter on another host learns where to reach an agent over gRPC (its
//! `advertise_url`), without any configuration but the queue it already names; and how an agent
//! learns, at start-up, that another host with the same identity (host name *and* machine id: a
//! cloned VM) serves the same queue — which would make them judge each other's live claims dead.
//!
//! Freshness is judged by the file server's clock (the registration's mtime against a probe file's),
//! never by comparing two hosts' clocks.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{Queue, make_dir, read_names};
use crate::fsx;

/// The directory of registrations in the watch directory (hidden: never taken for a seed drop).
pub const AGENTS: &str = ".agents";
/// How often a running agent rewrites its registration.
pub const REFRESH: Duration = Duration::from_secs(5);
/// A registration not rewritten for this long (by the file server's clock) is an agent gone.
pub const FRESH: Duration = Duration::from_secs(30);

/// What an agent says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registration {
    pub host_id: String,
    pub host: String,
    pub instance: String,
    pub pid: u32,
    pub boot_id: String,
    pub started_at_ms: u64,
    /// Where exporters reach its gRPC API (`http://…` or `https://…`), if anywhere but loopback.
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// Where exporters on this very host reach it (a loopback address), when it listens there.
    #[serde(default)]
    pub local_url: Option<String>,
    #[serde(default)]
    pub tls: bool,
    pub version: String,
    /// Incremented at every rewrite, so that a reader sees a live agent's file change.
    #[serde(default)]
    pub beat: u64,
}

impl Registration {
    fn file_name(&self) -> String {
        // The boot id tells apart two clones that share host id, instance and even pid.
        let boot: String = self.boot_id.chars().filter(|c| c.is_ascii_alphanumeric()).take(12).collect();
        format!("{}@{}@{boot}@{}.json", self.host_id, self.instance, self.pid)
    }
}

fn dir(queue: &Queue) -> PathBuf {
    queue.root().join(AGENTS)
}

/// Write (or rewrite) this agent's registration, atomically.
pub fn register(queue: &Queue, reg: &Registration) -> io::Result<()> {
    let d = dir(queue);
    make_dir(&d)?;
    let mut bytes = serde_json::to_vec_pretty(reg).expect("registrations serialise");
    bytes.push(b'\n');
    fsx::replace_file(&d.join(reg.file_name()), &bytes)
}

/// Remove this agent's registration (a clean stop).
pub fn unregister(queue: &Queue, reg: &Registration) -> io::Result<()> {
    fsx::remove_file(&dir(queue).join(reg.file_name()))
}

/// A registration as found, with its age by the file server's clock (`None`: unknown).
#[derive(Debug, Clone)]
pub struct Found {
    pub reg: Registration,
    pub age: Option<Duration>,
    pub path: PathBuf,
}

impl Found {
    /// Rewritten recently enough to belong to a running agent.
    pub fn fresh(&self) -> bool {
        self.age.is_some_and(|a| a < FRESH)
    }
}

/// Every readable registration (bounded reads; anything planted that is not one is skipped).
pub fn list(queue: &Queue, server_now: Option<SystemTime>) -> io::Result<Vec<Found>> {
    let d = dir(queue);
    let names = match read_names(&d) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.into_iter().filter(|n| n.ends_with(".json") && !n.starts_with('.')) {
        let path = d.join(&name);
        let Ok(bytes) = super::read_small(&path) else { continue };
        let Ok(reg) = serde_json::from_slice::<Registration>(&bytes) else { continue };
        let age = match (server_now, fs::metadata(&path).and_then(|m| m.modified())) {
            (Some(now), Ok(m)) => Some(now.duration_since(m).unwrap_or_default()),
            _ => None,
        };
        out.push(Found { reg, age, path });
    }
    Ok(out)
}

/// Remove registrations not refreshed for ten times [`FRESH`] (agents that died without
/// unregistering). Returns how many.
pub fn cleanup(queue: &Queue, server_now: SystemTime) -> io::Result<usize> {
    let mut n = 0;
    for f in list(queue, Some(server_now))? {
        if f.age.is_some_and(|a| a > FRESH * 10) {
            fsx::remove_file(&f.path)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Registrations of other hosts that claim *our* identity (same host id, another boot): a clone of
/// this host serves the same queue. Only fresh ones count; the caller confirms they are alive by
/// watching them change.
pub fn same_identity_elsewhere(found: &[Found], me: &Registration) -> Vec<Found> {
    found.iter().filter(|f| f.fresh() && f.reg.host_id == me.host_id && f.reg.boot_id != me.boot_id).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(host_id: &str, boot: &str, pid: u32) -> Registration {
        Registration {
            host_id: host_id.into(),
            host: "h".into(),
            instance: "default".into(),
            pid,
            boot_id: boot.into(),
            started_at_ms: 1,
            advertise_url: Some("http://10.0.0.1:50071".into()),
            local_url: None,
            tls: false,
            version: "0".into(),
            beat: 0,
        }
    }

    #[test]
    fn registrations_round_trip_and_clones_are_found() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let me = reg("conv01-aaaa", "boot-1", 10);
        register(&q, &me).expect("register");
        register(&q, &reg("conv01-aaaa", "boot-2", 10)).expect("a clone");
        register(&q, &reg("conv02-bbbb", "boot-3", 10)).expect("another host");
        fs::write(dir(&q).join("planted.json"), b"not a registration").expect("write");
        let now = crate::queue::server_now(&q.tmp_dir()).expect("clock");
        let found = list(&q, Some(now)).expect("list");
        assert_eq!(found.len(), 3);
        assert!(found.iter().all(Found::fresh));
        let clones = same_identity_elsewhere(&found, &me);
        assert_eq!(clones.len(), 1);
        assert_eq!(clones[0].reg.boot_id, "boot-2");
        unregister(&q, &me).expect("unregister");
        assert_eq!(list(&q, Some(now)).expect("list").len(), 2);
        assert_eq!(cleanup(&q, now + FRESH * 11).expect("cleanup"), 2);
    }
}
