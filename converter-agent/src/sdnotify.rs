//! systemd's notification protocol (`Type=notify`): a datagram to `$NOTIFY_SOCKET`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Send a state string such as `READY=1` or `WATCHDOG=1`. Without `$NOTIFY_SOCKET` (not under
/// systemd) this does nothing.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(abs) => SocketAddr::from_abstract_name(abs.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let Ok(addr) = addr else { return };
    if let Ok(sock) = UnixDatagram::unbound() {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any, halved for safety.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}

/// The `STATUS=` text: the agent's state as `systemctl status` shows it. `queued` is what the
/// last scan saw (None: the scan failed); `problem` is why the agent does not claim, if it does
/// not. One line, at most 200 characters, control characters escaped.
pub fn status_line(queued: Option<usize>, running: usize, max: usize, problem: Option<&str>) -> String {
    let queued = queued.map_or_else(|| "queue unreadable".to_string(), |n| format!("{n} queued"));
    let line = match problem {
        None => format!("serving: {running}/{max} converting, {queued}"),
        Some(p) => format!("NOT serving ({p}): {running}/{max} converting, {queued}"),
    };
    let line = hyperfarm_shared::text::escape(&line).into_owned();
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &line[..i]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_says_what_the_agent_does_in_one_bounded_line() {
        assert_eq!(status_line(Some(3), 1, 2, None), "serving: 1/2 converting, 3 queued");
        assert_eq!(status_line(None, 0, 2, None), "serving: 0/2 converting, queue unreadable");
        let bad = status_line(Some(0), 0, 4, Some("output /srv/out: read-only file system\nx"));
        assert!(bad.starts_with("NOT serving (output /srv/out: read-only"), "{bad}");
        assert!(!bad.contains('\n'), "{bad}");
        let long = status_line(Some(0), 0, 4, Some(&"x".repeat(500)));
        assert!(long.chars().count() <= 203 && long.ends_with("..."), "{long}");
    }
}
