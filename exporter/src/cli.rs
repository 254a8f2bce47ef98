//! hyperexport's flags (the seed's names and defaults) and configuration file.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use hyperfarm_shared::duration;
use hyperfarm_shared::engine::EngineChoice;

use hyperfarm_shared::results::OnExisting;

/// hyperexport: export a VM (OVA, OVF, VMX, VMDK, VHD, VHDX, raw, qcow2) into a hyperfarm queue
/// and follow its conversion to KVM qcow2, or convert it on this host.
///
/// Modes: daemon (`--pipeline --hyper2kvm-daemon`): publish into the agent's watch directory and
/// wait for this job's result. Direct (`--pipeline`): convert here into `--output`. Export only
/// (no `--pipeline`): publish the job into the queue at `--output` for a conversion server.
#[derive(Debug, Parser)]
#[command(
    name = "hyperexport",
    version,
    about,
    long_about = None,
    args_override_self = true,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The interactive wizard on a terminal: pick the VM, the output, the pipeline stages and
    /// (when asked for) the daemon phase, see a summary, then follow the export to the end
    #[arg(long, short = 'i')]
    pub interactive: bool,
    /// TOML configuration file [default: /etc/hyper2kvm/hyperexport.toml, if present]
    #[arg(long, env = "HYPEREXPORT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the VM comes from: `local` files, or `vsphere` (a vCenter or ESXi, see --vsphere-url)
    #[arg(long, default_value = "local", value_parser = ["local", "vsphere"])]
    pub provider: String,
    /// The VM: an .ova, an .ovf (disks beside it), a .vmx (VMDKs beside it), or a disk image;
    /// with --provider vsphere, its name or inventory path (/DC1/vm/folder/name)
    #[arg(long, value_name = "PATH", required_unless_present = "interactive")]
    pub vm: Option<PathBuf>,
    #[command(flatten)]
    pub vsphere: crate::vsphere::VsphereArgs,
    /// vSphere: export a running VM from a snapshot of its disks taken for the export (removed
    /// after it; crash-consistent) instead of refusing it
    #[arg(long)]
    pub allow_powered_on: bool,
    /// vSphere: how often the export lease is renewed while disks download (vSphere ends a
    /// lease that hears nothing for its timeout, 5 minutes by default)
    #[arg(long, value_parser = parse_seconds, default_value = "10s", value_name = "DURATION")]
    pub vsphere_keepalive: Duration,
    /// vSphere: how many times a broken disk transfer is resumed before the export fails
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub vsphere_retries: u32,
    /// VM name (default: from the OVF/VMX, else the file name); names the output files
    #[arg(long)]
    pub name: Option<String>,
    /// Export only: the queue directory to publish into. Direct mode: where <vm>.qcow2 is written
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Write an Artifact Manifest v1.0 (always done; accepted for compatibility with HyperSDK)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub manifest: Option<bool>,
    /// Convert to qcow2 (daemon mode with --hyper2kvm-daemon, else on this host)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub pipeline: Option<bool>,
    /// hyper2kvm program for direct mode [default: hyper2kvm from PATH when the hyper2kvm engine is used]
    #[arg(long, value_name = "PATH")]
    pub hyper2kvm_path: Option<PathBuf>,
    /// Submit to the conversion agent through its queue and wait for the result
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub hyper2kvm_daemon: Option<bool>,
    /// Agent instance: selects its directories (/var/lib/hyper2kvm/<instance>/{queue,output})
    #[arg(long, value_name = "NAME")]
    pub hyper2kvm_instance: Option<String>,
    /// The agent's watch (queue) directory [default: /var/lib/hyper2kvm/queue]
    #[arg(long, value_name = "DIR")]
    pub hyper2kvm_watch_dir: Option<PathBuf>,
    /// The agent's output directory [default: /var/lib/hyper2kvm/output]
    #[arg(long, value_name = "DIR")]
    pub hyper2kvm_output_dir: Option<PathBuf>,
    /// Seconds between checks for the result (or a duration such as 500ms) [default: 5]
    #[arg(long, value_parser = parse_seconds, value_name = "SECONDS")]
    pub hyper2kvm_poll_interval: Option<Duration>,
    /// Minutes to wait for the result (or a duration such as 90s) [default: 60]
    #[arg(long, value_parser = parse_minutes, value_name = "MINUTES")]
    pub hyper2kvm_daemon_timeout: Option<Duration>,
    /// Conversion engine: in direct mode the one used here; in daemon mode written into the job
    /// (pipeline.engine) to override the agent's [default: auto = hyper2kvm when usable, else qemu-img]
    #[arg(long, value_parser = parse_engine, value_name = "auto|qemu-img|hyper2kvm")]
    pub engine: Option<EngineChoice>,
    /// hyper2kvm pipeline stages the job asks for besides convert: inspect, fix, validate
    /// (comma-separated; fix needs root and nbd on the converting host)
    #[arg(long, value_delimiter = ',', value_parser = ["inspect", "fix", "validate"], value_name = "STAGES")]
    pub hyper2kvm_stages: Vec<String>,
    /// Largest disk (file size, holes included: every byte is hashed) exported, e.g. 4T; larger
    /// disks are refused before anything is copied [default: 64T]
    #[arg(long, value_parser = hyperfarm_shared::human::parse_size, value_name = "SIZE")]
    pub max_disk_size: Option<u64>,
    /// qemu-img program for direct mode [default: qemu-img from PATH]
    #[arg(long, value_name = "PATH")]
    pub qemu_img: Option<PathBuf>,
    /// Direct mode: when <vm>.qcow2 already exists, fail (default) or archive the old file
    #[arg(long, value_parser = parse_on_existing, value_name = "fail|archive")]
    pub on_existing: Option<OnExisting>,
    /// Define the converted VM in libvirt: domain XML <vm>.xml beside the qcow2 files, from the
    /// VM's CPUs, memory, firmware, disks and NICs, validated, then `virsh define`. Direct mode:
    /// here. Daemon mode: by the agent on the conversion host (see --libvirt-side)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub libvirt: Option<bool>,
    /// Where --libvirt defines the domain when hyperexport defines it (direct mode, or
    /// --libvirt-side exporter); an agent defines at its own libvirt_uri
    #[arg(long, default_value = "qemu:///system", value_name = "URI")]
    pub libvirt_uri: String,
    /// Daemon mode: which side defines the domain, exactly one of them: the agent on the
    /// conversion host (where the qcow2 files are), or hyperexport after the result arrives
    /// (with the output as this host mounts it)
    #[arg(long, default_value = "agent", value_parser = ["agent", "exporter"], value_name = "agent|exporter")]
    pub libvirt_side: String,
    /// Disk bus of the domain: virtio (fast; Linux guests), sata (any guest boots), or auto
    /// (sata for Windows guests, virtio for the rest, from what the source says of its guest)
    #[arg(long, default_value = "auto", value_parser = ["auto", "virtio", "sata"], value_name = "auto|virtio|sata")]
    pub libvirt_bus: String,
    /// The libvirt network the domain's network interface joins
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub libvirt_network: String,
    /// Daemon mode: publish the job and exit without waiting for its result
    #[arg(long)]
    pub detach: bool,
    /// Daemon mode: Ctrl-C/SIGTERM while waiting also cancels a job an agent has claimed
    /// (default: only a job no agent has claimed yet is withdrawn; a claimed one goes on)
    #[arg(long)]
    pub cancel_on_interrupt: bool,
    /// Daemon mode: first check that an agent is there (gRPC, else the local systemd unit) and
    /// convert on this host when none is; `false` always submits to the queue [default: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub hyper2kvm_detect: Option<bool>,
    /// The agent's gRPC address, for detection and live progress [default: http://127.0.0.1:50071]
    #[arg(long, env = "HYPEREXPORT_AGENT", value_name = "URL")]
    pub agent: Option<String>,
    /// PEM CA that signed the agent's certificate (https:// agents)
    #[arg(long, value_name = "FILE")]
    pub agent_ca: Option<PathBuf>,
    /// PEM client certificate for agents that require mutual TLS
    #[arg(long, value_name = "FILE")]
    pub agent_cert: Option<PathBuf>,
    /// PEM key of the client certificate
    #[arg(long, value_name = "FILE")]
    pub agent_key: Option<PathBuf>,
    /// The agent's TLS name when it differs from the URL's host
    #[arg(long, value_name = "NAME")]
    pub agent_domain: Option<String>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Idempotent submission: the queue job's id (a UUID). When the queue already holds a job of
    /// this id it is followed (or, without --pipeline, reported), never submitted a second time
    #[arg(long, value_name = "UUID")]
    pub job_id: Option<hyperfarm_shared::JobId>,
    /// Progress for programs: `json` prints one JSON object per line on stdout (events
    /// `progress` and `published`), the result object last (`hyperexport serve` runs exports so)
    #[arg(long, value_parser = ["text", "json"], default_value = "text", value_name = "text|json")]
    pub progress: String,
    /// No progress output
    #[arg(long, short)]
    pub quiet: bool,
}

/// hyperexport's subcommands (without one, hyperexport exports the VM given by --vm).
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The export host's daemon: HTTP job API, web dashboard, live updates and /metrics
    Serve(crate::serve::ServeArgs),
    /// List the VMs of a vCenter or ESXi (--vsphere-url, GOVC_* environment), with their
    /// inventory paths, power states and sizes
    Vms(crate::vsphere::VmsArgs),
}

fn parse_engine(s: &str) -> Result<EngineChoice, String> {
    EngineChoice::parse(s).ok_or_else(|| format!("{s:?} is not auto, qemu-img or hyper2kvm"))
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    duration::parse(s)
}

fn parse_minutes(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 && m < 1e7 => Ok(Duration::from_secs_f64(m * 60.0)),
        Ok(_) => Err(format!("{s:?} is not a usable number of minutes")),
        Err(_) => duration::parse(s),
    }
}

fn parse_on_existing(s: &str) -> Result<OnExisting, String> {
    match s {
        "fail" => Ok(OnExisting::Fail),
        "archive" => Ok(OnExisting::Archive),
        _ => Err(format!("{s:?} is not fail or archive")),
    }
}

/// `/etc/hyper2kvm/hyperexport.toml`. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub instance: Option<String>,
    pub watch_dir: Option<PathBuf>,
    pub output_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub poll_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub daemon_timeout: Option<Duration>,
    pub qemu_img: Option<PathBuf>,
    pub hyper2kvm_path: Option<PathBuf>,
    pub agent_url: Option<String>,
    pub agent_ca: Option<PathBuf>,
    pub agent_cert: Option<PathBuf>,
    pub agent_key: Option<PathBuf>,
    pub agent_domain: Option<String>,
    pub detect: Option<bool>,
    #[serde(default, deserialize_with = "hyperfarm_shared::human::de_size_opt")]
    pub max_disk_size: Option<u64>,
}

pub const DEFAULT_CONFIG: &str = "/etc/hyper2kvm/hyperexport.toml";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_flag_forms() {
        let c = Cli::parse_from([
            "hyperexport",
            "--vm",
            "x.ova",
            "--pipeline",
            "--hyper2kvm-daemon",
            "--hyper2kvm-poll-interval",
            "2",
            "--hyper2kvm-daemon-timeout",
            "90",
        ]);
        assert_eq!(c.pipeline, Some(true));
        assert_eq!(c.hyper2kvm_daemon, Some(true));
        assert_eq!(c.hyper2kvm_poll_interval, Some(Duration::from_secs(2)));
        assert_eq!(c.hyper2kvm_daemon_timeout, Some(Duration::from_secs(5400)));
        let c = Cli::parse_from([
            "hyperexport",
            "--vm",
            "x",
            "--pipeline=false",
            "--manifest",
            "--output",
            "/q",
            "--hyper2kvm-daemon-timeout",
            "30s",
        ]);
        assert_eq!(c.pipeline, Some(false));
        assert_eq!(c.hyper2kvm_daemon_timeout, Some(Duration::from_secs(30)));
    }
}
