//! Is there an agent to hand the job to? Replaces the seed's local-only `systemctl is-active`:
//!
//! 1. the agent answers over gRPC → daemon mode with live progress;
//! 2. else the local systemd unit of the instance is active → daemon mode, following by polling;
//! 3. else → direct mode (convert on this host), with a warning that says why.
//!
//! The instance name selects both the unit and the directories (`hyperfarm_shared::instance`).

use std::time::Duration;

use hyperfarm_proto::v1 as pb;

use hyperfarm_proto::client::AgentEndpoint;

#[derive(Debug)]
pub enum Detected {
    Grpc(Box<pb::AgentStatus>),
    Systemd { unit: String, grpc_error: String },
    Nothing { why: String },
}

/// Ask gRPC, then systemd.
pub async fn detect(agent: &AgentEndpoint, instance: Option<&str>) -> Detected {
    let grpc_error = match agent.status().await {
        Ok(s) => return Detected::Grpc(Box::new(s)),
        Err(e) => e,
    };
    let unit = hyperfarm_shared::instance::unit_name(instance);
    match unit_state(&unit).await {
        Ok(state) if state == "active" => Detected::Systemd { unit, grpc_error },
        Ok(state) => Detected::Nothing {
            why: format!("no agent answered at {} ({grpc_error}) and the unit {unit} is {state}", agent.url),
        },
        Err(e) => Detected::Nothing {
            why: format!(
                "no agent answered at {} ({grpc_error}) and systemd could not be asked about {unit} ({e})",
                agent.url
            ),
        },
    }
}

/// `systemctl is-active UNIT`: its one-word answer (active, inactive, failed, activating …).
pub async fn unit_state(unit: &str) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("systemctl").args(["is-active", "--", unit]).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| "systemctl did not answer within 5s".to_string())?
    .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let word = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if word.is_empty() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(word)
}
