//! hyperctl: agents (`daemon status|list`), jobs (`jobs list|show|watch|cancel`) and the queue read
//! straight from shared storage (`queue`). Every command takes `--json` (a documented, stable
//! shape: docs/grpc.md); otherwise readable tables.
//!
//! Exit codes: 0 success · 1 error · 2 usage · 3 no such job · 4 the watched job failed ·
//! 5 no agent answered · 7 the watched job was cancelled · 8 the request cannot be carried out (a
//! job in the wrong state) · 9 permission denied.

pub mod daemon;
pub mod jobs;
pub mod queue;
pub mod systemd;
pub mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;

use hyperfarm_proto::client::{AgentEndpoint, DEFAULT_AGENT_URL};

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_JOB_FAILED: u8 = 4;
pub const EXIT_UNREACHABLE: u8 = 5;
pub const EXIT_JOB_CANCELLED: u8 = 7;
pub const EXIT_REFUSED: u8 = 8;
pub const EXIT_DENIED: u8 = 9;

/// A failure with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CtlError {
    pub code: u8,
    pub message: String,
}

pub fn err(code: u8, message: impl Into<String>) -> CtlError {
    CtlError { code, message: message.into() }
}

/// Map a gRPC status to an exit code and message.
pub fn from_status(url: &str, s: tonic::Status) -> CtlError {
    let code = match s.code() {
        tonic::Code::NotFound => EXIT_NOT_FOUND,
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => EXIT_DENIED,
        tonic::Code::Unavailable => EXIT_UNREACHABLE,
        tonic::Code::InvalidArgument => EXIT_USAGE,
        tonic::Code::FailedPrecondition => EXIT_REFUSED,
        _ => EXIT_ERROR,
    };
    err(code, format!("{url}: {}: {}", s.code(), s.message()))
}

/// hyperctl: show hyperfarm agents, jobs and the queue; cancel jobs.
#[derive(Debug, Parser)]
#[command(name = "hyperctl", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// Agent gRPC URL (repeatable for `daemon list`) [default: from the config, else http://127.0.0.1:50071]
    #[arg(long, global = true, env = "HYPERCTL_AGENT", value_name = "URL")]
    pub agent: Vec<String>,
    /// PEM CA of the agent's certificate
    #[arg(long, global = true, value_name = "FILE")]
    pub agent_ca: Option<PathBuf>,
    /// PEM client certificate (mutual TLS)
    #[arg(long, global = true, value_name = "FILE")]
    pub agent_cert: Option<PathBuf>,
    /// PEM client key (mutual TLS)
    #[arg(long, global = true, value_name = "FILE")]
    pub agent_key: Option<PathBuf>,
    /// The agent's TLS name when it differs from the URL's host
    #[arg(long, global = true, value_name = "NAME")]
    pub agent_domain: Option<String>,
    /// File holding the agent's control token (for `jobs cancel`)
    #[arg(long, global = true, env = "HYPERCTL_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Configuration file [default: /etc/hyper2kvm/hyperctl.toml, if present]
    #[arg(long, global = true, env = "HYPERCTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Machine-readable JSON on stdout (see docs/grpc.md for the shapes)
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Conversion agents (hyper2kvm-agent instances)
    Daemon {
        #[command(subcommand)]
        op: DaemonOp,
    },
    /// Jobs, through an agent
    Jobs {
        #[command(subcommand)]
        op: JobsOp,
    },
    /// The queue, read directly from shared storage (works without any agent)
    Queue {
        /// The queue (watch) directory [default: the instance's]
        #[arg(long, value_name = "DIR")]
        watch_dir: Option<PathBuf>,
        /// Instance whose default directories to use
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
        /// Claims whose lease is older than this are reported stale
        #[arg(long, value_parser = hyperfarm_shared::duration::parse, default_value = "60s", value_name = "DURATION")]
        lease_timeout: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonOp {
    /// Status of the agents (or one instance)
    Status {
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
    },
    /// Every known agent, one line each
    List,
}

#[derive(Debug, Subcommand)]
pub enum JobsOp {
    /// Jobs of the agent's queue, oldest first
    List {
        /// Only these states (repeatable): queued, converting, done, failed, cancelled
        #[arg(long, value_name = "STATE")]
        state: Vec<String>,
        /// At most this many
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// One job in full
    Show { id: String },
    /// Follow one job until it ends (exit 0 done, 4 failed, 7 cancelled)
    Watch { id: String },
    /// Submit a failed or cancelled job again, as a new job with the same disks (needs control
    /// permission)
    Retry { id: String },
    /// Cancel a job (needs control permission: loopback, a client certificate, or --token-file)
    Cancel {
        id: String,
        #[arg(long, default_value = "cancelled with hyperctl")]
        reason: String,
    },
}

/// `/etc/hyper2kvm/hyperctl.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
}

/// A configured agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// Instance name (informational; the agent reports its own).
    pub name: Option<String>,
    pub url: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub domain: Option<String>,
    pub token_file: Option<PathBuf>,
}

pub const DEFAULT_CONFIG: &str = "/etc/hyper2kvm/hyperctl.toml";

/// The agents to talk to: `--agent` flags, else the config file, else the local default.
pub fn endpoints(cli: &Cli) -> Result<Vec<(Option<String>, AgentEndpoint)>, CtlError> {
    let file = match &cli.config {
        Some(p) => read_config(p)?,
        None if std::path::Path::new(DEFAULT_CONFIG).is_file() => read_config(std::path::Path::new(DEFAULT_CONFIG))?,
        None => FileConfig::default(),
    };
    let token = match &cli.token_file {
        Some(p) => Some(read_token(p)?),
        None => None,
    };
    let from_flags = |url: &str| AgentEndpoint {
        url: url.to_string(),
        ca: cli.agent_ca.clone(),
        cert: cli.agent_cert.clone(),
        key: cli.agent_key.clone(),
        domain: cli.agent_domain.clone(),
        connect_timeout: Duration::from_secs(3),
        token: token.clone(),
    };
    if !cli.agent.is_empty() {
        return Ok(cli.agent.iter().map(|u| (None, from_flags(u))).collect());
    }
    if !file.agents.is_empty() {
        let mut out = Vec::new();
        for a in file.agents {
            let token = match (&token, &a.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(p)) => Some(read_token(p)?),
                (None, None) => None,
            };
            out.push((
                a.name.clone(),
                AgentEndpoint {
                    url: a.url,
                    ca: a.ca.or(cli.agent_ca.clone()),
                    cert: a.cert.or(cli.agent_cert.clone()),
                    key: a.key.or(cli.agent_key.clone()),
                    domain: a.domain.or(cli.agent_domain.clone()),
                    connect_timeout: Duration::from_secs(3),
                    token,
                },
            ));
        }
        return Ok(out);
    }
    Ok(vec![(None, from_flags(DEFAULT_AGENT_URL))])
}

fn read_config(p: &std::path::Path) -> Result<FileConfig, CtlError> {
    let text =
        std::fs::read_to_string(p).map_err(|e| err(EXIT_USAGE, format!("configuration file {}: {e}", p.display())))?;
    toml::from_str(&text).map_err(|e| err(EXIT_USAGE, format!("configuration file {}: {e}", p.display())))
}

fn read_token(p: &std::path::Path) -> Result<String, CtlError> {
    std::fs::read_to_string(p)
        .map(|t| t.trim().to_string())
        .map_err(|e| err(EXIT_USAGE, format!("token file {}: {e}", p.display())))
}

pub fn main_entry() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyperctl: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyperctl: {}", hyperfarm_shared::text::escape_lines(&e.to_string()));
            ExitCode::from(e.code)
        }
    }
}

pub async fn run(cli: Cli) -> Result<(), CtlError> {
    match &cli.command {
        Command::Daemon { op } => daemon::run(&cli, op).await,
        Command::Jobs { op } => jobs::run(&cli, op).await,
        Command::Queue { watch_dir, instance, lease_timeout } => {
            queue::run(watch_dir.clone(), instance.as_deref(), *lease_timeout, cli.json).await
        }
    }
}

/// Print a value as one line of JSON.
pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).expect("JSON values serialise"));
}
