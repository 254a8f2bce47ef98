//! Agent instances: one name selects the systemd unit, the configuration file and the
//! directories, the same way on the exporter's side and the agent's side.

use std::path::PathBuf;

/// The default instance's name.
pub const DEFAULT: &str = "default";
/// Base of all instances' state.
pub const STATE_BASE: &str = "/var/lib/hyper2kvm";
/// Base of configuration files.
pub const CONFIG_BASE: &str = "/etc/hyper2kvm";

/// Whether `name` is usable as an instance name (it becomes part of paths and unit names).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "instance name {name:?} must be 1-64 ASCII letters, digits, '-', '_' or '.', not starting with '-' or '.'"
        ))
    }
}

fn is_default(name: Option<&str>) -> bool {
    matches!(name, None | Some("") | Some(DEFAULT))
}

/// The queue (watch) directory: `/var/lib/hyper2kvm/queue` for the default instance (the seed's
/// default), `/var/lib/hyper2kvm/<name>/queue` for a named one.
pub fn watch_dir(name: Option<&str>) -> PathBuf {
    match name {
        n if is_default(n) => PathBuf::from(STATE_BASE).join("queue"),
        Some(n) => PathBuf::from(STATE_BASE).join(n).join("queue"),
        None => unreachable!("handled above"),
    }
}

/// The output directory, likewise.
pub fn output_dir(name: Option<&str>) -> PathBuf {
    match name {
        n if is_default(n) => PathBuf::from(STATE_BASE).join("output"),
        Some(n) => PathBuf::from(STATE_BASE).join(n).join("output"),
        None => unreachable!("handled above"),
    }
}

/// The agent's configuration file: `/etc/hyper2kvm/agent.toml` or `/etc/hyper2kvm/agent-<name>.toml`.
pub fn config_file(name: Option<&str>) -> PathBuf {
    match name {
        n if is_default(n) => PathBuf::from(CONFIG_BASE).join("agent.toml"),
        Some(n) => PathBuf::from(CONFIG_BASE).join(format!("agent-{n}.toml")),
        None => unreachable!("handled above"),
    }
}

/// The systemd unit: `hyper2kvm-agent.service` or `hyper2kvm-agent@<name>.service`.
pub fn unit_name(name: Option<&str>) -> String {
    match name {
        n if is_default(n) => "hyper2kvm-agent.service".to_string(),
        Some(n) => format!("hyper2kvm-agent@{n}.service"),
        None => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_selects_everything() {
        assert_eq!(watch_dir(None), PathBuf::from("/var/lib/hyper2kvm/queue"));
        assert_eq!(output_dir(Some("default")), PathBuf::from("/var/lib/hyper2kvm/output"));
        assert_eq!(watch_dir(Some("vsphere-prod")), PathBuf::from("/var/lib/hyper2kvm/vsphere-prod/queue"));
        assert_eq!(unit_name(Some("vsphere-prod")), "hyper2kvm-agent@vsphere-prod.service");
        assert_eq!(config_file(Some("x")), PathBuf::from("/etc/hyper2kvm/agent-x.toml"));
        assert!(check_name("vsphere-prod").is_ok());
        for bad in ["", "../x", "a/b", "-x", ".x", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
