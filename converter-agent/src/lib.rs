//! The conversion agent.
//!
//! - [`config`]: flags, environment and TOML merged into one validated [`config::Config`].
//! - [`agent`]: start-up checks and recovery, the scan/claim loop, shutdown.
//! - [`job`]: one claimed job from lease to result.
//! - [`board`]: the in-memory view of jobs this agent runs (progress, recent results).
//! - [`index`]: the in-memory listing of the whole queue that the API serves.
//! - [`sdnotify`]: readiness and watchdog for systemd `Type=notify`.
//!
//! Exit codes: 0 clean shutdown, 1 runtime error, 2 usage, 3 configuration error,
//! 4 qemu-img unusable, 5 the gRPC listen address is unusable, 6 watch or output directory
//! unusable.

pub mod agent;
pub mod board;
pub mod config;
pub mod grpc;
pub mod index;
pub mod job;
pub mod metrics;
pub mod registration;
pub mod sdnotify;

use std::process::ExitCode;

use clap::Parser;

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_CONFIG: u8 = 3;
pub const EXIT_ENGINE: u8 = 4;
pub const EXIT_LISTEN: u8 = 5;
pub const EXIT_DIRS: u8 = 6;

/// A start-up failure with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Fatal {
    pub code: u8,
    pub message: String,
}

pub fn main_entry() -> ExitCode {
    let cli = config::Cli::parse();
    init_logging(&cli.log_format);
    let cfg = match config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("hyper2kvm-agent: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.check_config {
        println!("{}", serde_json::to_string_pretty(&cfg).expect("config serialises"));
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(64).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyper2kvm-agent: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match rt.block_on(agent::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<Fatal>().map(|f| f.code).unwrap_or(EXIT_RUNTIME);
            tracing::error!("{e:#}");
            eprintln!("hyper2kvm-agent: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HYPER2KVM_AGENT_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}
