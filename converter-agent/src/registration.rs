//! The agent's registration in its queue (`shared::queue::agents`): who it is, where exporters reach
//! it, refreshed by a thread of its own; and the start-up check that no other host with the same
//! identity serves the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyperfarm_shared::fsx;
use hyperfarm_shared::queue::{Queue, agents};

use crate::{EXIT_CONFIG, Fatal};

/// The URL exporters on other hosts reach the agent at: `advertise_url` if set; else the bound
/// address (the host name for 0.0.0.0/[::]); nothing for loopback (other hosts cannot use it).
pub fn advertise_url(configured: Option<&str>, bound: Option<std::net::SocketAddr>, tls: bool) -> Option<String> {
    if let Some(u) = configured {
        return Some(u.to_string());
    }
    let addr = bound?;
    let scheme = if tls { "https" } else { "http" };
    let ip = addr.ip().to_canonical();
    if ip.is_loopback() {
        return None;
    }
    let host = if ip.is_unspecified() {
        fsx::hostname()
    } else if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    Some(format!("{scheme}://{host}:{}", addr.port()))
}

/// The URL exporters on this host reach the agent at, when it listens on loopback.
pub fn local_url(bound: Option<std::net::SocketAddr>, tls: bool) -> Option<String> {
    let addr = bound?;
    let ip = addr.ip().to_canonical();
    ip.is_loopback().then(|| {
        let host = if ip.is_ipv6() { format!("[{ip}]") } else { ip.to_string() };
        format!("{}://{host}:{}", if tls { "https" } else { "http" }, addr.port())
    })
}

/// This agent's registration.
pub fn this_agent(
    instance: &str,
    advertise_url: Option<String>,
    local_url: Option<String>,
    tls: bool,
) -> agents::Registration {
    agents::Registration {
        host_id: fsx::host_id(),
        host: fsx::hostname(),
        instance: instance.to_string(),
        pid: std::process::id(),
        boot_id: fsx::boot_id(),
        started_at_ms: hyperfarm_shared::queue::now_ms(),
        advertise_url,
        local_url,
        tls,
        version: env!("CARGO_PKG_VERSION").to_string(),
        beat: 0,
    }
}

/// Refuse to start when another host with this host's identity (host name and machine id)
/// serves the queue: their agents would take each other's live claims for dead ones. A fresh
/// registration of another boot is watched for two refresh periods; only one that keeps changing
/// is a live clone (a registration left by this host's previous boot stops changing).
pub fn check_identity(queue: &Queue, me: &agents::Registration) -> anyhow::Result<()> {
    let now = hyperfarm_shared::queue::server_now(&queue.tmp_dir()).ok();
    let found = agents::list(queue, now)?;
    let suspects = agents::same_identity_elsewhere(&found, me);
    if suspects.is_empty() {
        return Ok(());
    }
    tracing::info!(
        "another boot of this host identity ({}) is registered in the queue; watching whether it is alive",
        me.host_id
    );
    let deadline = Instant::now() + agents::REFRESH * 2 + Duration::from_secs(1);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = hyperfarm_shared::queue::server_now(&queue.tmp_dir()).ok();
        let again = agents::list(queue, now)?;
        for s in &suspects {
            if let Some(f) = again.iter().find(|f| f.path == s.path)
                && f.reg.beat != s.reg.beat
            {
                return Err(Fatal {
                    code: EXIT_CONFIG,
                    message: format!(
                        "another host with this host's identity {} (host name {:?} and the same machine id; a cloned VM?) serves this queue: agent pid {} there, boot {}. Two such hosts would take each other's live jobs for dead ones. Give each host its own machine id (rm /etc/machine-id && systemd-machine-id-setup) or host name",
                        me.host_id, f.reg.host, f.reg.pid, f.reg.boot_id
                    ),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// Keeps the registration fresh on a thread of its own; removes it when dropped (a clean stop).
pub struct Registered {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Registered {
    pub fn start(queue: Queue, mut reg: agents::Registration) -> Registered {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("registration".into())
            .spawn(move || {
                let mut since_cleanup = 0u32;
                while !stop2.load(Ordering::Relaxed) {
                    reg.beat += 1;
                    if let Err(e) = agents::register(&queue, &reg) {
                        tracing::debug!("refreshing this agent's registration in the queue: {e}");
                    }
                    since_cleanup += 1;
                    if since_cleanup >= 60
                        && let Ok(now) = hyperfarm_shared::queue::server_now(&queue.tmp_dir())
                    {
                        since_cleanup = 0;
                        let _ = agents::cleanup(&queue, now);
                    }
                    let until = Instant::now() + agents::REFRESH;
                    while Instant::now() < until && !stop2.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                let _ = agents::unregister(&queue, &reg);
            })
            .ok();
        Registered { stop, thread }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // A hung share must not hang the shutdown: give it a moment, then leave it.
            let t0 = Instant::now();
            while !t.is_finished() && t0.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_addresses() {
        let a = |s: &str| Some(s.parse().expect("addr"));
        assert_eq!(advertise_url(None, a("127.0.0.1:50071"), false), None, "loopback is not advertised");
        assert_eq!(advertise_url(None, a("10.1.2.3:50071"), false).as_deref(), Some("http://10.1.2.3:50071"));
        assert_eq!(advertise_url(None, a("[fd00::1]:50071"), true).as_deref(), Some("https://[fd00::1]:50071"));
        assert_eq!(advertise_url(None, a("0.0.0.0:50071"), true), Some(format!("https://{}:50071", fsx::hostname())));
        assert_eq!(
            advertise_url(Some("https://conv01:443"), a("0.0.0.0:1"), false).as_deref(),
            Some("https://conv01:443")
        );
        assert_eq!(advertise_url(None, None, false), None);
    }
}
