//! hyperexport: read a local VM, publish it into a hyperfarm queue (or convert it here), and
//! follow it to its result.
//!
//! Exit codes (also in the README):
//! 0 success · 1 internal error · 2 usage · 3 bad input (the VM cannot be read or is not
//! supported) · 4 conversion failed (the `.error` text is printed) · 5 timeout · 6 a directory is
//! unreachable or unwritable · 7 the job was cancelled · 8 the output name is taken by an earlier
//! result · 9 converted, but defining it in libvirt failed · 130 interrupted.

pub mod cli;
pub mod copy;
pub mod detect;
pub mod direct;
pub mod interactive;
pub mod serve;
pub mod source;
pub mod submit;
pub mod ui;
pub mod vsphere;
pub mod wait;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use hyperfarm_shared::instance;
use hyperfarm_shared::queue::{Queue, State};
use hyperfarm_shared::results::{OutputDir, ResultRecord, ResultState};

use crate::cli::{Cli, FileConfig};
use crate::copy::Control;
use crate::wait::{WaitParams, Waited};
use hyperfarm_proto::client::AgentEndpoint;

pub const EXIT_INTERNAL: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_BAD_INPUT: u8 = 3;
pub const EXIT_CONVERSION: u8 = 4;
pub const EXIT_TIMEOUT: u8 = 5;
pub const EXIT_UNREACHABLE: u8 = 6;
pub const EXIT_CANCELLED: u8 = 7;
pub const EXIT_CONFLICT: u8 = 8;
pub const EXIT_LIBVIRT: u8 = 9;
pub const EXIT_INTERRUPTED: u8 = 130;

/// Everything that ends hyperexport unsuccessfully, each with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Copy(String),
    #[error("conversion failed:\n{0}")]
    Conversion(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Libvirt(String),
    #[error("interrupted{}", if *.0 { "; the job was withdrawn from the queue" } else { "" })]
    Interrupted(bool),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ExportError {
    pub fn code(&self) -> u8 {
        match self {
            ExportError::Usage(_) => EXIT_USAGE,
            ExportError::BadInput(_) => EXIT_BAD_INPUT,
            ExportError::Copy(_) => EXIT_UNREACHABLE,
            ExportError::Conversion(_) => EXIT_CONVERSION,
            ExportError::Timeout(_) => EXIT_TIMEOUT,
            ExportError::Unreachable(_) => EXIT_UNREACHABLE,
            ExportError::Cancelled(_) => EXIT_CANCELLED,
            ExportError::Conflict(_) => EXIT_CONFLICT,
            ExportError::Libvirt(_) => EXIT_LIBVIRT,
            ExportError::Interrupted(_) => EXIT_INTERRUPTED,
            ExportError::Internal(_) => EXIT_INTERNAL,
        }
    }
}

pub fn main_entry() -> ExitCode {
    let mut cli = Cli::parse();
    match cli.command.take() {
        Some(cli::Command::Serve(args)) => {
            init_logging(false);
            return serve::main(args);
        }
        Some(cli::Command::Vms(args)) => {
            init_logging(true);
            return vsphere::vms_main(args);
        }
        None => {}
    }
    if cli.interactive {
        return interactive::main(cli);
    }
    init_logging(cli.quiet);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyperexport: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Messages quote file names, member names and agents' error texts: escaped.
            eprintln!("hyperexport: {}", hyperfarm_shared::text::escape_lines(&e.to_string()));
            ExitCode::from(e.code())
        }
    }
}

fn init_logging(quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if quiet { "warn" } else { "info" };
    let filter = EnvFilter::try_from_env("HYPEREXPORT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

/// The mode chosen by the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Daemon,
    Direct,
    ExportOnly,
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub watch_dir: PathBuf,
    pub output_dir: PathBuf,
    pub export_dir: Option<PathBuf>,
    pub poll: Duration,
    pub timeout: Duration,
    pub qemu_img: PathBuf,
    pub hyper2kvm_path: PathBuf,
    pub instance: Option<String>,
    pub agent: AgentEndpoint,
    /// Whether `--agent` (or `agent_url`) was given explicitly.
    pub agent_explicit: bool,
    /// Whether the queue was named (`--hyper2kvm-watch-dir` or `watch_dir`): a farm was asked for,
    /// so the job never falls back to converting here.
    pub queue_named: bool,
    pub detect: bool,
    /// Largest disk exported (file size).
    pub max_disk_size: u64,
}

pub fn settings(cli: &Cli) -> Result<Settings, ExportError> {
    let file = match &cli.config {
        Some(p) => read_config(p)?,
        None if std::path::Path::new(cli::DEFAULT_CONFIG).is_file() => {
            read_config(std::path::Path::new(cli::DEFAULT_CONFIG))?
        }
        None => FileConfig::default(),
    };
    let instance_name = cli.hyper2kvm_instance.clone().or(file.instance.clone());
    if let Some(n) = &instance_name {
        instance::check_name(n).map_err(ExportError::Usage)?;
    }
    let inst = instance_name.as_deref();
    let pipeline = cli.pipeline.unwrap_or(false);
    let daemon = cli.hyper2kvm_daemon.unwrap_or(false);
    let mode = match (pipeline, daemon) {
        (_, true) => Mode::Daemon,
        (true, false) => Mode::Direct,
        (false, false) => Mode::ExportOnly,
    };
    if mode != Mode::Daemon && cli.output.is_none() {
        return Err(ExportError::Usage(match mode {
            Mode::Direct => "--pipeline without --hyper2kvm-daemon converts on this host: give --output DIR for <vm>.qcow2".into(),
            _ => "export only (no --pipeline): give --output DIR, the queue directory a conversion agent watches (or add --pipeline)".into(),
        }));
    }
    let poll = cli.hyper2kvm_poll_interval.or(file.poll_interval).unwrap_or(Duration::from_secs(5));
    if poll < Duration::from_millis(10) {
        return Err(ExportError::Usage("--hyper2kvm-poll-interval must be at least 10ms".into()));
    }
    let agent_url = cli.agent.clone().or(file.agent_url.clone());
    let agent = AgentEndpoint {
        url: agent_url.clone().unwrap_or_else(|| hyperfarm_proto::client::DEFAULT_AGENT_URL.to_string()),
        ca: cli.agent_ca.clone().or(file.agent_ca.clone()),
        cert: cli.agent_cert.clone().or(file.agent_cert.clone()),
        key: cli.agent_key.clone().or(file.agent_key.clone()),
        domain: cli.agent_domain.clone().or(file.agent_domain.clone()),
        connect_timeout: Duration::from_secs(2),
        token: None,
    };
    if agent.cert.is_some() != agent.key.is_some() {
        return Err(ExportError::Usage("--agent-cert and --agent-key go together".into()));
    }
    Ok(Settings {
        instance: instance_name.clone(),
        hyper2kvm_path: cli
            .hyper2kvm_path
            .clone()
            .or(file.hyper2kvm_path.clone())
            .unwrap_or_else(|| PathBuf::from("hyper2kvm")),
        agent,
        agent_explicit: agent_url.is_some(),
        queue_named: cli.hyper2kvm_watch_dir.is_some() || file.watch_dir.is_some(),
        detect: cli.hyper2kvm_detect.or(file.detect).unwrap_or(true) && !cli.detach,
        mode,
        watch_dir: cli.hyper2kvm_watch_dir.clone().or(file.watch_dir).unwrap_or_else(|| instance::watch_dir(inst)),
        output_dir: cli.hyper2kvm_output_dir.clone().or(file.output_dir).unwrap_or_else(|| instance::output_dir(inst)),
        export_dir: cli.output.clone(),
        poll,
        timeout: cli.hyper2kvm_daemon_timeout.or(file.daemon_timeout).unwrap_or(Duration::from_secs(3600)),
        qemu_img: cli.qemu_img.clone().or(file.qemu_img).unwrap_or_else(|| PathBuf::from("qemu-img")),
        max_disk_size: cli
            .max_disk_size
            .or(file.max_disk_size)
            .unwrap_or(hyperfarm_shared::engine::inspect::MAX_VIRTUAL_SIZE),
    })
}

fn read_config(p: &std::path::Path) -> Result<FileConfig, ExportError> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| ExportError::Usage(format!("configuration file {}: {e}", p.display())))?;
    toml::from_str(&text).map_err(|e| ExportError::Usage(format!("configuration file {}: {e}", p.display())))
}

/// What the job asks of its agent.
fn submit_options(cli: &Cli) -> submit::Options {
    let st = stages(cli);
    submit::Options {
        inspect: st.inspect,
        fix: st.fix,
        validate: st.validate,
        engine: cli.engine,
        id: cli.job_id,
        libvirt: (libvirt_side(cli) == LibvirtSide::Agent).then(|| hyperfarm_shared::libvirt::DefineRequest {
            bus: cli.libvirt_bus.clone(),
            network: cli.libvirt_network.clone(),
        }),
    }
}

/// Which side defines the domain in daemon mode: exactly one, never both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LibvirtSide {
    None,
    /// The agent, on the conversion host (asked through the job's manifest).
    Agent,
    /// hyperexport, after the result arrives, with the paths as this host sees the output.
    Exporter,
}

fn libvirt_side(cli: &Cli) -> LibvirtSide {
    match (cli.libvirt == Some(true), cli.libvirt_side.as_str()) {
        (false, _) => LibvirtSide::None,
        (true, "exporter") => LibvirtSide::Exporter,
        (true, _) => LibvirtSide::Agent,
    }
}

/// The stages the job asks for besides convert.
fn stages(cli: &Cli) -> hyperfarm_shared::manifest::Stages {
    let has = |s: &str| cli.hyper2kvm_stages.iter().any(|x| x == s);
    hyperfarm_shared::manifest::Stages {
        inspect: has("inspect"),
        fix: has("fix"),
        convert: true,
        validate: has("validate"),
    }
}

fn direct_params(cli: &Cli, s: &Settings, out: PathBuf) -> direct::DirectParams {
    direct::DirectParams {
        output: OutputDir::new(out),
        qemu_img: s.qemu_img.clone(),
        on_existing: cli.on_existing.unwrap_or_default(),
        quiet: cli.quiet,
        engine: cli.engine.unwrap_or_default(),
        hyper2kvm_path: s.hyper2kvm_path.clone(),
        stages: stages(cli),
    }
}

/// Run hyperexport.
pub async fn run(mut cli: Cli) -> Result<(), ExportError> {
    if cli.progress == "json" {
        ui::set_json(true);
        cli.json = true;
    }
    let s = settings(&cli)?;
    if cli.libvirt == Some(true) && s.mode == Mode::ExportOnly {
        return Err(ExportError::Usage(
            "--libvirt defines the converted VM: it needs --pipeline (with --hyper2kvm-daemon: the agent defines it, or hyperexport with --libvirt-side exporter)".into(),
        ));
    }
    let vm_path = cli.vm.clone().ok_or_else(|| ExportError::Usage("give --vm PATH (or --interactive)".into()))?;
    // Idempotent submission: a job of this id already in the queue is followed (daemon mode) or
    // reported (export only) before anything else — without reading the VM again (it may be gone)
    // and without detection (which could decide to convert here).
    if let Some(id) = cli.job_id
        && s.mode != Mode::Direct
        && let Some(done) = already_submitted(&cli, &s, id).await?
    {
        return done;
    }
    let input = if cli.provider == "vsphere" {
        Input::Vsphere(Box::new(vsphere::prepare(&cli, s.max_disk_size).await?))
    } else {
        Input::Local(Box::new(load_local(&cli, vm_path, s.max_disk_size).await?))
    };

    // Ctrl-C / SIGTERM: stop copying (the staged job is removed), or stop waiting.
    let ctl = Arc::new(Control::default());
    // The flag is set inside the signal handler itself, so a SIGTERM that arrives just before the
    // job is published (serve's cancel) keeps it out of the queue: a task would see it too late.
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, ctl.cancel.clone())
            .map_err(|e| ExportError::Internal(format!("cannot handle signal {sig}: {e}")))?;
    }
    let interrupt = Arc::new(Notify::new());
    let cancel = CancellationToken::new();
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Both streams exist before anything is exported (a signal that came first is seen).
        let (mut term, mut int) = signal(SignalKind::terminate())
            .and_then(|t| Ok((t, signal(SignalKind::interrupt())?)))
            .map_err(|e| ExportError::Internal(format!("cannot handle SIGTERM/SIGINT: {e}")))?;
        let (ctl, interrupt, cancel) = (ctl.clone(), interrupt.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            ctl.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            cancel.cancel();
            interrupt.notify_one();
        });
    }

    match s.mode {
        Mode::ExportOnly => {
            let dir = s.export_dir.clone().expect("checked in settings");
            let queue = Queue::new(&dir);
            let sub = submit_input(&queue, &input, submit_options(&cli), ctl, cli.quiet).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"job_id": sub.id, "vm": sub.vm_name, "job_dir": sub.job_dir, "state": "queued", "bytes": sub.bytes})
                );
            } else {
                println!("{}", sub.job_dir.display());
                eprintln!(
                    "published job {} for VM {} into {}; a conversion agent watching it will convert it",
                    sub.id,
                    sub.vm_name,
                    dir.display()
                );
            }
            Ok(())
        }
        Mode::Direct => {
            let params = direct_params(&cli, &s, s.export_dir.clone().expect("checked in settings"));
            let (vm, _scratch) = local_vm(input, &params, &ctl, cli.quiet).await?;
            let rec = direct::convert(&vm, &params, ctl, cancel).await?;
            let domain = libvirt_define(&cli, &vm, &params.output, &rec).await?;
            print_success_with(&params.output, &rec, cli.json, domain);
            Ok(())
        }
        Mode::Daemon => {
            // Detection (detect.rs): an agent over gRPC (named, registered in the queue, or
            // local), else the queue followed by polling when a farm was asked for, else here.
            let mut agent = s.agent_explicit.then(|| s.agent.clone());
            if s.detect {
                let lookup = detect::Lookup {
                    agent: &s.agent,
                    agent_explicit: s.agent_explicit,
                    instance: s.instance.as_deref(),
                    watch_dir: &s.watch_dir,
                    queue_named: s.queue_named,
                };
                match detect::detect(&lookup).await {
                    detect::Detected::Grpc(ep, status) => {
                        tracing::info!(agent = %format!("{}@{}", status.instance, status.host), url = %ep.url, "the agent answers over gRPC: daemon mode with live progress");
                        if status.watch_dir != s.watch_dir.display().to_string() {
                            tracing::warn!(
                                "the agent watches {} while this job goes to {}; they must be the same share (mounted at different paths is fine)",
                                status.watch_dir,
                                s.watch_dir.display()
                            );
                        }
                        agent = Some(ep);
                    }
                    detect::Detected::Poll { why } => {
                        tracing::warn!(
                            "{why}: daemon mode, following the result by polling {} (back to gRPC if the agent answers)",
                            s.output_dir.display()
                        );
                    }
                    detect::Detected::Nothing { why } => {
                        let out = s.export_dir.clone().unwrap_or_else(|| s.output_dir.clone());
                        tracing::warn!("{why}: converting on this host instead (direct mode) into {}", out.display());
                        let params = direct_params(&cli, &s, out);
                        let (vm, _scratch) = local_vm(input, &params, &ctl, cli.quiet).await?;
                        let rec = direct::convert(&vm, &params, ctl, cancel).await?;
                        let domain = libvirt_define(&cli, &vm, &params.output, &rec).await?;
                        print_success_with(&params.output, &rec, cli.json, domain);
                        return Ok(());
                    }
                }
            }
            daemon(&cli, &s, &input, ctl, interrupt, agent).await
        }
    }
}

/// The VM to export: local files, or a VM on vSphere (downloaded when it is exported).
pub enum Input {
    Local(Box<source::VmSource>),
    Vsphere(Box<vsphere::Prepared>),
}

/// Read a local VM.
async fn load_local(cli: &Cli, vm_path: PathBuf, max_disk_size: u64) -> Result<source::VmSource, ExportError> {
    let name = cli.name.clone();
    let vm = tokio::task::spawn_blocking(move || source::load(&vm_path, name.as_deref()))
        .await
        .map_err(|e| ExportError::Internal(e.to_string()))?
        .map_err(|e| ExportError::BadInput(e.to_string()))?;
    // Every byte of a disk is hashed, holes included (BLAKE3 chains each 1 KiB chunk to its
    // position, so a hole costs as much as data the first time its place is seen): a huge sparse
    // file is bounded here, before anything is copied.
    if let Some(d) = vm.disks.iter().find(|d| d.data.len() > max_disk_size) {
        return Err(ExportError::BadInput(format!(
            "{}: disk {} is {} ({} bytes, holes included), more than --max-disk-size {}; exporting hashes every byte, which for this disk takes long. Raise --max-disk-size (or max_disk_size in hyperexport.toml) if this is intended",
            hyperfarm_shared::text::Esc(&vm.path),
            d.id,
            hyperfarm_shared::human::bytes(d.data.len()),
            d.data.len(),
            hyperfarm_shared::human::bytes(max_disk_size)
        )));
    }
    tracing::info!(
        vm = %vm.name, kind = vm.kind, disks = vm.disks.len(),
        cpu = vm.cpu.unwrap_or(0), memory_mib = vm.memory_mib.unwrap_or(0), firmware = vm.firmware.as_str(),
        "read the VM"
    );
    Ok(vm)
}

/// A directory removed when dropped: where a vSphere VM's disks wait to be converted here.
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = &self.0
            && let Err(e) = hyperfarm_shared::fsx::remove_tree(d)
        {
            tracing::warn!("removing {}: {e}", d.display());
        }
    }
}

/// The VM as local files, for conversion on this host: a vSphere VM is downloaded into a
/// scratch directory in the output first (removed afterwards), once its output names are known
/// free.
async fn local_vm(
    input: Input,
    params: &direct::DirectParams,
    ctl: &Arc<Control>,
    quiet: bool,
) -> Result<(source::VmSource, Scratch), ExportError> {
    let out = params.output.path();
    match input {
        Input::Local(vm) => Ok((*vm, Scratch(None))),
        Input::Vsphere(p) => {
            let name = p.name.clone();
            let names: Vec<String> = (0..p.facts.disks.len())
                .map(|i| hyperfarm_shared::results::disk_file_name(&name, &format!("disk{i}"), i == 0))
                .collect();
            let dir = out.join(format!(".hyperexport-vsphere-{}", uuid::Uuid::new_v4()));
            let ready = params
                .output
                .check_free(&name, &names, params.on_existing)
                .map_err(|e| ExportError::Conflict(e.to_string()))
                .and_then(|()| {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| ExportError::Unreachable(format!("cannot create {}: {e}", dir.display())))
                });
            if let Err(e) = ready {
                p.session.close().await;
                return Err(e);
            }
            let scratch = Scratch(Some(dir.clone()));
            let vm = vsphere::materialize(&p, &dir, ctl, quiet).await?;
            Ok((vm, scratch))
        }
    }
}

/// Publish the VM into `queue`.
async fn submit_input(
    queue: &Queue,
    input: &Input,
    opts: submit::Options,
    ctl: Arc<Control>,
    quiet: bool,
) -> Result<submit::Submitted, ExportError> {
    match input {
        Input::Local(vm) => submit::submit(queue, vm, opts, ctl, quiet).await,
        Input::Vsphere(p) => submit::submit_vsphere(queue, p, opts, ctl, quiet).await,
    }
}

async fn daemon(
    cli: &Cli,
    s: &Settings,
    input: &Input,
    ctl: Arc<Control>,
    interrupt: Arc<Notify>,
    agent: Option<AgentEndpoint>,
) -> Result<(), ExportError> {
    for (what, dir) in [("watch", &s.watch_dir), ("output", &s.output_dir)] {
        if !dir.is_dir() {
            if let Input::Vsphere(p) = input {
                p.session.close().await;
            }
            return Err(ExportError::Unreachable(format!(
                "the agent's {what} directory {} does not exist; is the share mounted and the agent installed? (--hyper2kvm-{what}-dir, --hyper2kvm-instance)",
                dir.display()
            )));
        }
    }
    let queue = Queue::new(&s.watch_dir);
    let sub = submit_input(&queue, input, submit_options(cli), ctl, cli.quiet).await?;
    tracing::info!(job = %sub.id, "published; waiting for the result");
    let vm = match input {
        Input::Local(vm) => (**vm).clone(),
        Input::Vsphere(p) => p.source(),
    };
    follow_submitted(cli, s, sub, interrupt, agent, Some(vm)).await
}

/// Daemon mode once the job is in the queue: print it (--detach) or follow it to its result.
async fn follow_submitted(
    cli: &Cli,
    s: &Settings,
    sub: submit::Submitted,
    interrupt: Arc<Notify>,
    agent: Option<AgentEndpoint>,
    vm: Option<source::VmSource>,
) -> Result<(), ExportError> {
    let queue = Queue::new(&s.watch_dir);
    let output = OutputDir::new(&s.output_dir);
    if cli.detach {
        if cli.json {
            println!("{}", serde_json::json!({"job_id": sub.id, "vm": sub.vm_name, "state": "queued"}));
        } else {
            println!("{}", sub.id);
        }
        return Ok(());
    }
    let params = WaitParams {
        queue,
        output: output.clone(),
        id: sub.id,
        poll: s.poll,
        timeout: s.timeout,
        quiet: cli.quiet,
        vm_name: sub.vm_name.clone(),
        rediscover: (s.detect && !s.agent_explicit).then(|| s.agent.clone()),
        agent,
    };
    match wait::follow(&params, interrupt).await {
        Waited::Result(rec) if rec.state == ResultState::Done && libvirt_side(cli) != LibvirtSide::None => {
            let libvirt = match libvirt_side(cli) {
                LibvirtSide::Agent => match &rec.libvirt {
                    Some(o) => libvirt_report(o, Some(&rec.agent))?,
                    None => {
                        return Err(ExportError::Libvirt(format!(
                            "job {} was converted by {}, which did not define it in libvirt (an agent older than this hyperexport); define it on the conversion host by hand, or use --libvirt-side exporter",
                            rec.job_id, rec.agent
                        )));
                    }
                },
                _ => match &vm {
                    Some(vm) => libvirt_define(cli, vm, &output, &rec).await?.unwrap_or_default(),
                    None => {
                        return Err(ExportError::Libvirt(format!(
                            "job {} was converted; this run did not read the VM (it followed a job already in the queue), so it cannot write its domain: run again without --job-id, or define it by hand",
                            rec.job_id
                        )));
                    }
                },
            };
            print_success_with(&output, &rec, cli.json, Some(libvirt));
            Ok(())
        }
        Waited::Result(rec) => finish(&output, rec, cli.json),
        Waited::Remote(job) => {
            let (side, done) = (libvirt_side(cli), job.state() == hyperfarm_proto::v1::JobState::Done);
            let id = job.id.clone();
            match side {
                LibvirtSide::None => remote_finish(&output, job, cli.json, None),
                _ if !done => remote_finish(&output, job, cli.json, None),
                LibvirtSide::Agent => match &job.libvirt {
                    // The agent's answer to GetJob carries the outcome of its record.
                    Some(d) => {
                        let outcome = hyperfarm_shared::libvirt::Outcome {
                            domain: d.domain.clone(),
                            uri: d.uri.clone(),
                            xml: d.xml.clone(),
                            validated: d.validated,
                            defined: d.defined,
                            host: d.host.clone(),
                            error: (!d.error.is_empty()).then(|| d.error.clone()),
                        };
                        let libvirt = libvirt_report(&outcome, Some(&job.agent))?;
                        remote_finish(&output, job, cli.json, Some(libvirt))
                    }
                    None => {
                        remote_finish(&output, job, cli.json, None)?;
                        Err(ExportError::Libvirt(format!(
                            "job {id} was converted, but its result record is not readable from this host ({}) and the agent did not say whether it defined the domain (an agent older than this hyperexport, or its API stopped answering): see hyperctl jobs show {id} on the conversion host",
                            s.output_dir.display()
                        )))
                    }
                },
                LibvirtSide::Exporter => {
                    remote_finish(&output, job, cli.json, None)?;
                    Err(ExportError::Libvirt(format!(
                        "job {id} was converted, but its result is not readable from this host ({}), so its domain was not defined here; define it where the output is mounted",
                        s.output_dir.display()
                    )))
                }
            }
        }
        Waited::EndedWithoutRecord { state, reason } => match state {
            State::Cancelled => Err(ExportError::Cancelled(format!("job {} was cancelled: {reason}", sub.id))),
            _ => Err(ExportError::Conversion(format!("job {} ended as {state}: {reason}", sub.id))),
        },
        Waited::TimedOut { withdrawn, state, lease } => Err(ExportError::Timeout(if withdrawn {
            format!(
                "timed out after {}: no agent claimed job {} in {}; it was withdrawn from the queue (is an agent running and watching that directory?)",
                hyperfarm_shared::duration::show(s.timeout),
                sub.id,
                s.watch_dir.display()
            )
        } else {
            let who = lease.map(|l| format!(" by {} ({} {:.0}%)", l.agent, l.phase, l.percent)).unwrap_or_default();
            format!(
                "timed out after {}: job {} is {}{who} and was left to finish; its result will appear in {} (hyperctl jobs show {})",
                hyperfarm_shared::duration::show(s.timeout),
                sub.id,
                state.map(|s| s.to_string()).unwrap_or_else(|| "in an unknown state".into()),
                s.output_dir.display(),
                sub.id
            )
        })),
        Waited::Interrupted { withdrawn: false } if cli.cancel_on_interrupt => {
            let (q, id) = (params.queue.clone(), sub.id);
            let asked = tokio::task::spawn_blocking(move || {
                q.request_cancel(&id, "interrupted in hyperexport (--cancel-on-interrupt)")
            })
            .await
            .map_err(|e| ExportError::Internal(e.to_string()))?;
            match asked {
                Ok(Some(state)) if !state.is_final() || state == State::Cancelled => {
                    eprintln!("hyperexport: job {} is being cancelled at its agent", sub.id);
                    Err(ExportError::Interrupted(true))
                }
                Ok(_) => Err(ExportError::Interrupted(false)),
                Err(e) => Err(ExportError::Unreachable(format!("interrupted; cancelling job {} failed: {e}", sub.id))),
            }
        }
        Waited::Interrupted { withdrawn } => Err(ExportError::Interrupted(withdrawn)),
    }
}

/// `--job-id` given and found in the queue: the outcome of following (or reporting) it.
async fn already_submitted(
    cli: &Cli,
    s: &Settings,
    id: hyperfarm_shared::JobId,
) -> Result<Option<Result<(), ExportError>>, ExportError> {
    let root = match s.mode {
        Mode::ExportOnly => s.export_dir.clone().expect("checked in settings"),
        _ => s.watch_dir.clone(),
    };
    let q = Queue::new(&root);
    let found = tokio::task::spawn_blocking(move || {
        // A queue not made yet (no state directories) holds no job.
        let found = match q.locate(&id) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            other => other?,
        };
        let name = found.as_ref().and_then(|(_, dir)| {
            let bytes = hyperfarm_shared::queue::read_manifest(dir).ok()?;
            hyperfarm_shared::manifest::Manifest::parse(&bytes).ok()?.vm_name().map(str::to_string)
        });
        Ok::<_, std::io::Error>(found.map(|(state, dir)| (state, dir, name)))
    })
    .await
    .map_err(|e| ExportError::Internal(e.to_string()))?
    .map_err(|e| ExportError::Unreachable(format!("looking for job {id} in {}: {e}", root.display())))?;
    let Some((state, job_dir, name)) = found else { return Ok(None) };
    tracing::info!(job = %id, %state, "the queue already holds this job: not submitting it again");
    ui::event(
        &serde_json::json!({"event": "published", "job_id": id, "queue": root, "job_dir": job_dir, "already": true}),
    );
    let sub = submit::Submitted {
        id,
        job_dir: job_dir.clone(),
        vm_name: name.unwrap_or_else(|| id.short()),
        bytes: 0,
        already: Some(state),
    };
    if s.mode == Mode::ExportOnly {
        if cli.json {
            println!(
                "{}",
                serde_json::json!({"job_id": id, "vm": sub.vm_name, "job_dir": job_dir, "state": state.dir_name(), "bytes": 0})
            );
        } else {
            println!("{}", job_dir.display());
        }
        return Ok(Some(Ok(())));
    }
    let interrupt = Arc::new(Notify::new());
    {
        let interrupt = interrupt.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
                return;
            };
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            interrupt.notify_one();
        });
    }
    let agent = s.agent_explicit.then(|| s.agent.clone());
    Ok(Some(follow_submitted(cli, s, sub, interrupt, agent, None).await))
}

fn finish(output: &OutputDir, rec: ResultRecord, json: bool) -> Result<(), ExportError> {
    // The moment between reading the result and printing where it is (races are tested here).
    hyperfarm_shared::failpoint::hit("export.result-read");
    match rec.state {
        ResultState::Done => {
            print_success(output, &rec, json);
            Ok(())
        }
        ResultState::Failed | ResultState::Cancelled => {
            if json {
                println!("{}", serde_json::to_string(&rec).expect("records serialise"));
            }
            let text = rec.error.clone().unwrap_or_else(|| rec.summary());
            if rec.state == ResultState::Cancelled {
                Err(ExportError::Cancelled(text))
            } else {
                Err(ExportError::Conversion(text))
            }
        }
    }
}

/// The agent said the job ended, but its record is not readable from this host.
fn remote_finish(
    output: &OutputDir,
    job: hyperfarm_proto::v1::Job,
    json: bool,
    libvirt: Option<serde_json::Value>,
) -> Result<(), ExportError> {
    use hyperfarm_proto::v1::JobState;
    let paths: Vec<PathBuf> = job.files.iter().map(|f| output.path().join(f)).collect();
    match job.state() {
        JobState::Done => {
            if json {
                let mut v = serde_json::json!({"job_id": job.id, "vm": job.vm_name, "state": "done", "files": paths, "engine": job.engine});
                if let Some(l) = libvirt {
                    v["libvirt"] = l;
                }
                println!("{v}");
            } else {
                for p in paths {
                    println!("{}", p.display());
                }
            }
            Ok(())
        }
        JobState::Cancelled => Err(ExportError::Cancelled(job.error_summary)),
        // GetJob's answer carries the full text; a streamed job only its first line.
        _ if !job.error.is_empty() => Err(ExportError::Conversion(job.error)),
        _ => Err(ExportError::Conversion(format!(
            "{}\n(the full text is in {} on the conversion host)",
            job.error_summary,
            output.path().join(format!("{}.error", job.vm_name)).display()
        ))),
    }
}

fn print_success(output: &OutputDir, rec: &ResultRecord, json: bool) {
    print_success_with(output, rec, json, None)
}

/// `--libvirt` after a conversion here: the domain XML beside the qcow2, validated, defined.
async fn libvirt_define(
    cli: &Cli,
    vm: &source::VmSource,
    output: &OutputDir,
    rec: &ResultRecord,
) -> Result<Option<serde_json::Value>, ExportError> {
    if cli.libvirt != Some(true) {
        return Ok(None);
    }
    use hyperfarm_shared::libvirt::{Bus, DomainSpec, Nic};
    let disks: Vec<PathBuf> =
        wait::result_paths(output, rec).into_iter().map(|p| std::path::absolute(&p).unwrap_or(p)).collect();
    let cpu = vm.cpu.filter(|c| *c >= 1);
    let memory = vm.memory_mib.filter(|m| *m >= 1);
    if cpu.is_none() || memory.is_none() {
        tracing::warn!(
            "the VM does not say its {}: the domain gets {} (change it with virsh edit)",
            if cpu.is_none() && memory.is_none() {
                "CPUs and memory"
            } else if cpu.is_none() {
                "CPUs"
            } else {
                "memory"
            },
            "1 CPU / 2048 MiB where unknown"
        );
    }
    let spec = DomainSpec {
        name: rec.vm_name.clone(),
        uuid: hyperfarm_shared::libvirt::domain_uuid(vm.vm_id.as_deref()),
        vcpus: cpu.unwrap_or(1),
        memory_mib: memory.unwrap_or(2048),
        uefi: vm.firmware == source::Firmware::Uefi,
        disks: disks.clone(),
        bus: Bus::parse(&cli.libvirt_bus)
            .unwrap_or_else(|| hyperfarm_shared::libvirt::bus_for_guest(vm.guest.as_deref())),
        // The source's interfaces keep their MACs (guests bind their configuration to them); all
        // join --libvirt-network, since the source's networks do not exist in libvirt.
        nics: if vm.nics.is_empty() {
            vec![Nic { mac: None, network: cli.libvirt_network.clone() }]
        } else {
            vm.nics.iter().take(32).map(|n| Nic { mac: n.mac.clone(), network: cli.libvirt_network.clone() }).collect()
        },
    };
    let xml_path = std::path::absolute(output.path().join(format!("{}.xml", rec.vm_name)))
        .unwrap_or_else(|_| output.path().join(format!("{}.xml", rec.vm_name)));
    let uri = cli.libvirt_uri.clone();
    let outcome = tokio::task::spawn_blocking(move || hyperfarm_shared::libvirt::define_domain(&spec, &xml_path, &uri))
        .await
        .map_err(|e| ExportError::Internal(e.to_string()))?;
    libvirt_report(&outcome, None).map(Some)
}

/// Report what defining the domain came to (here or by the agent `by`): the JSON for `--json`,
/// or exit 9 with the reason and what to do.
fn libvirt_report(o: &hyperfarm_shared::libvirt::Outcome, by: Option<&str>) -> Result<serde_json::Value, ExportError> {
    use hyperfarm_shared::text::Esc;
    if !o.defined {
        return Err(ExportError::Libvirt(Esc(o.error.as_deref().unwrap_or("the domain was not defined")).to_string()));
    }
    if !o.validated {
        tracing::warn!("virt-xml-validate is not installed: the domain XML was not checked against libvirt's schema");
    }
    let by_text = by.map(|a| format!(" by agent {}", Esc(a))).unwrap_or_default();
    eprintln!("hyperexport: libvirt domain {} defined at {}{by_text} ({})", Esc(&o.domain), Esc(&o.uri), Esc(&o.xml));
    Ok(
        serde_json::json!({"domain": o.domain, "uri": o.uri, "xml": o.xml, "validated": o.validated, "host": o.host, "defined_by": by.unwrap_or("hyperexport")}),
    )
}

fn print_success_with(output: &OutputDir, rec: &ResultRecord, json: bool, libvirt: Option<serde_json::Value>) {
    let paths = wait::result_paths(output, rec);
    if json {
        let mut v = serde_json::json!({"job_id": rec.job_id, "vm": rec.vm_name, "state": "done", "files": paths, "engine": rec.engine});
        if let Some(l) = libvirt {
            v["libvirt"] = l;
        }
        println!("{v}");
    } else {
        for p in paths {
            println!("{}", p.display());
        }
    }
}
