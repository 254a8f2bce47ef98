//! Local agent instances as systemd knows them, through machine-readable `systemctl` output
//! (`show -p …` key=value and `list-units --output=json`), never its English text.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// A unit's state.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UnitState {
    pub unit: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    pub main_pid: Option<u32>,
    pub uptime_seconds: Option<u64>,
}

async fn systemctl(args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("systemctl").args(args).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| "systemctl did not answer within 5s".to_string())?
    .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if !out.status.success() {
        let e = String::from_utf8_lossy(&out.stderr).trim().replace('\n', " ");
        return Err(if e.is_empty() { format!("systemctl {} failed", args.join(" ")) } else { e });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Parse `systemctl show` key=value output.
pub fn parse_show(text: &str) -> BTreeMap<String, String> {
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The state of one unit.
pub async fn show(unit: &str) -> Result<UnitState, String> {
    let text = systemctl(&[
        "show",
        "--no-pager",
        "-p",
        "LoadState,ActiveState,SubState,MainPID,ActiveEnterTimestampMonotonic",
        "--",
        unit,
    ])
    .await?;
    Ok(state_from(unit, &parse_show(&text), monotonic_usec()))
}

pub fn state_from(unit: &str, kv: &BTreeMap<String, String>, now_usec: Option<u64>) -> UnitState {
    let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
    let pid = get("MainPID").parse::<u32>().ok().filter(|p| *p > 0);
    let active = get("ActiveState");
    let since = get("ActiveEnterTimestampMonotonic").parse::<u64>().ok().filter(|t| *t > 0);
    let uptime = match (active.as_str(), since, now_usec) {
        ("active" | "reloading" | "deactivating", Some(s), Some(now)) if now >= s => Some((now - s) / 1_000_000),
        _ => None,
    };
    UnitState {
        unit: unit.to_string(),
        load_state: get("LoadState"),
        active_state: active,
        sub_state: get("SubState"),
        main_pid: pid,
        uptime_seconds: uptime,
    }
}

/// CLOCK_MONOTONIC in microseconds (what systemd's *Monotonic timestamps use).
fn monotonic_usec() -> Option<u64> {
    let t = uptime_clock()?;
    Some(t.as_micros() as u64)
}

fn uptime_clock() -> Option<Duration> {
    // /proc/uptime is CLOCK_BOOTTIME while systemd stamps CLOCK_MONOTONIC; they differ only by
    // time spent suspended, which servers do not do.
    let up = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = up.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64(secs))
}

/// Agent units systemd knows here (loaded or not-found instances are both listed).
pub async fn agent_units() -> Result<Vec<String>, String> {
    let text = systemctl(&["list-units", "--all", "--no-pager", "--output=json", "hyper2kvm-agent*.service"]).await?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("systemctl list-units JSON: {e}"))?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|u| u.get("unit").and_then(|x| x.as_str()).map(str::to_string)).collect())
        .unwrap_or_default())
}

/// The instance a unit name stands for: `hyper2kvm-agent.service` → default,
/// `hyper2kvm-agent@x.service` → x.
pub fn instance_of(unit: &str) -> Option<String> {
    let stem = unit.strip_suffix(".service")?;
    if stem == "hyper2kvm-agent" {
        return Some(hyperfarm_shared::instance::DEFAULT.to_string());
    }
    stem.strip_prefix("hyper2kvm-agent@").map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_output() {
        let kv = parse_show(
            "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=4242\nActiveEnterTimestampMonotonic=5000000\n",
        );
        let s = state_from("hyper2kvm-agent.service", &kv, Some(65_000_000));
        assert_eq!(s.main_pid, Some(4242));
        assert_eq!(s.uptime_seconds, Some(60));
        assert_eq!(s.sub_state, "running");
        let kv = parse_show(
            "LoadState=loaded\nActiveState=inactive\nSubState=dead\nMainPID=0\nActiveEnterTimestampMonotonic=0\n",
        );
        let s = state_from("x", &kv, Some(1));
        assert_eq!((s.main_pid, s.uptime_seconds), (None, None));
        assert_eq!(instance_of("hyper2kvm-agent@vsphere.service").as_deref(), Some("vsphere"));
        assert_eq!(instance_of("hyper2kvm-agent.service").as_deref(), Some("default"));
        assert_eq!(instance_of("sshd.service"), None);
    }
}
