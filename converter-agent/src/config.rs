//! The agent's configuration: defaults < config file (TOML) < environment < flags, parsed and
//! validated once, before any work starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use serde::Deserialize;

use hyperfarm_shared::duration;
use hyperfarm_shared::engine::{ConvertOptions, EngineChoice};

use hyperfarm_shared::instance;
use hyperfarm_shared::results::OnExisting;
use hyperfarm_shared::worker::VerifyMode;

/// hyper2kvm-agent: claims VM conversion jobs from a queue on shared storage, verifies their
/// digests, converts their disks to qcow2 and publishes `<output>/<vm>.qcow2` or `<vm>.error`.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// TOML configuration file [default: /etc/hyper2kvm/agent.toml or agent-<instance>.toml, if present]
    #[arg(long, short = 'c', env = "HYPER2KVM_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Instance name: selects the default directories and config file [default: default]
    #[arg(long, env = "HYPER2KVM_AGENT_INSTANCE")]
    pub instance: Option<String>,
    /// Queue directory on shared storage [default: /var/lib/hyper2kvm/queue, or /var/lib/hyper2kvm/<instance>/queue]
    #[arg(long, env = "HYPER2KVM_AGENT_WATCH_DIR", value_name = "DIR")]
    pub watch_dir: Option<PathBuf>,
    /// Where results are published [default: /var/lib/hyper2kvm/output, or /var/lib/hyper2kvm/<instance>/output]
    #[arg(long, env = "HYPER2KVM_AGENT_OUTPUT_DIR", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Jobs converted at once [default: 2]
    #[arg(long, env = "HYPER2KVM_AGENT_MAX_CONCURRENT", value_name = "N")]
    pub max_concurrent: Option<usize>,
    /// Rescan the queue at least this often (file-system events only wake the agent early for
    /// local writers; NFS never delivers events from other hosts) [default: 5s]
    #[arg(long, env = "HYPER2KVM_AGENT_POLL_INTERVAL", value_parser = duration::parse, value_name = "DURATION")]
    pub poll_interval: Option<Duration>,
    /// A claim whose lease does not change for this long is recovered by another agent [default: 60s]
    #[arg(long, env = "HYPER2KVM_AGENT_LEASE_TIMEOUT", value_parser = duration::parse, value_name = "DURATION")]
    pub lease_timeout: Option<Duration>,
    /// A seed-style manifest drop must stay unchanged this long before it is ingested [default: 5s]
    #[arg(long, env = "HYPER2KVM_AGENT_SETTLE_TIME", value_parser = duration::parse, value_name = "DURATION")]
    pub settle_time: Option<Duration>,
    /// Directories that seed-style manifests may point into (repeatable) [default: the watch directory]
    #[arg(
        long = "allowed-source-dir",
        env = "HYPER2KVM_AGENT_ALLOWED_SOURCE_DIRS",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    pub allowed_source_dirs: Vec<PathBuf>,
    /// Seed-style manifests written on a host that mounts the share elsewhere: `THEIR_PATH=OUR_PATH`
    /// (repeatable; absolute local_paths under THEIR_PATH are read under OUR_PATH)
    #[arg(long = "path-map", env = "HYPER2KVM_AGENT_PATH_MAP", value_delimiter = ',', value_parser = parse_path_map, value_name = "FROM=TO")]
    pub path_map: Vec<(PathBuf, PathBuf)>,
    /// When <vm>.qcow2 already exists from an earlier job: fail the new job, or archive the old file [default: fail]
    #[arg(long, env = "HYPER2KVM_AGENT_ON_EXISTING", value_parser = parse_on_existing, value_name = "fail|archive")]
    pub on_existing: Option<OnExisting>,
    /// When digests are checked: alongside the conversion, or before it starts [default: alongside]
    #[arg(long, env = "HYPER2KVM_AGENT_VERIFY", value_parser = parse_verify, value_name = "alongside|before")]
    pub verify: Option<VerifyMode>,
    /// The qemu-img program [default: qemu-img from PATH]
    #[arg(long, env = "HYPER2KVM_AGENT_QEMU_IMG", value_name = "PATH")]
    pub qemu_img: Option<PathBuf>,
    /// On SIGTERM, running conversions may finish within this time; then they are stopped and
    /// returned to the queue [default: 30s]
    #[arg(long, env = "HYPER2KVM_AGENT_SHUTDOWN_GRACE", value_parser = duration::parse, value_name = "DURATION")]
    pub shutdown_grace: Option<Duration>,
    /// A job whose agent died this many times is failed instead of retried [default: 3]
    #[arg(long, env = "HYPER2KVM_AGENT_MAX_ATTEMPTS", value_name = "N")]
    pub max_attempts: Option<usize>,
    /// A single job may convert for at most this long [default: 24h]
    #[arg(long, env = "HYPER2KVM_AGENT_JOB_TIMEOUT", value_parser = duration::parse, value_name = "DURATION")]
    pub job_timeout: Option<Duration>,
    /// Keep the disks of finished jobs in the queue's done/ directory [default: false]
    #[arg(long, env = "HYPER2KVM_AGENT_KEEP_DONE_DISKS")]
    pub keep_done_disks: Option<bool>,
    /// Define converted VMs in libvirt when their job asks for it (`hyperexport --libvirt` in
    /// daemon mode); false: such jobs convert, and their result says the domain was not defined
    /// [default: true]
    #[arg(long, env = "HYPER2KVM_AGENT_LIBVIRT_DEFINE", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub libvirt_define: Option<bool>,
    /// Where this agent defines domains (jobs cannot choose) [default: qemu:///system]
    #[arg(long, env = "HYPER2KVM_AGENT_LIBVIRT_URI", value_name = "URI")]
    pub libvirt_uri: Option<String>,
    /// Staging leftovers of crashed exporters on other hosts are removed after this age [default: 24h]
    #[arg(long, env = "HYPER2KVM_AGENT_STAGING_MAX_AGE", value_parser = duration::parse, value_name = "DURATION")]
    pub staging_max_age: Option<Duration>,
    /// Conversion engine: auto (hyper2kvm when usable, else qemu-img), qemu-img, or hyper2kvm
    /// [default: auto]. A job's pipeline.engine overrides it
    #[arg(long, env = "HYPER2KVM_AGENT_ENGINE", value_parser = parse_engine, value_name = "auto|qemu-img|hyper2kvm")]
    pub engine: Option<EngineChoice>,
    /// The hyper2kvm program [default: hyper2kvm from PATH]
    #[arg(long, env = "HYPER2KVM_AGENT_HYPER2KVM_PATH", value_name = "PATH")]
    pub hyper2kvm_path: Option<PathBuf>,
    /// One hyper2kvm run may take at most this long; it is then stopped (SIGTERM, then SIGKILL)
    /// [default: the job timeout]
    #[arg(long, env = "HYPER2KVM_AGENT_HYPER2KVM_TIMEOUT", value_parser = duration::parse, value_name = "DURATION")]
    pub hyper2kvm_timeout: Option<Duration>,
    /// gRPC listen address (`host:port`), or `off` [default: 127.0.0.1:50071]. Beyond loopback
    /// it needs --tls-cert/--tls-key, or --insecure-listen
    #[arg(long, env = "HYPER2KVM_AGENT_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Prometheus metrics listen address (`host:port`, GET /metrics), or `off` [default:
    /// 127.0.0.1:9471 for the default instance, off for named ones]. Served with the gRPC API
    /// (off when gRPC is off); an address in use is logged and the agent runs without metrics
    #[arg(long, env = "HYPER2KVM_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Where exporters on other hosts reach this agent's gRPC API (`http[s]://HOST:PORT`); it is
    /// written into the queue (`.agents/`) for them to find [default: derived from --listen: the
    /// host name (for 0.0.0.0/[::]) or the address itself; nothing for loopback]
    #[arg(long, env = "HYPER2KVM_AGENT_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,
    /// PEM certificate (chain) for gRPC over TLS
    #[arg(long, env = "HYPER2KVM_AGENT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for gRPC over TLS
    #[arg(long, env = "HYPER2KVM_AGENT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: clients must present a certificate it signed (mutual TLS)
    #[arg(long, env = "HYPER2KVM_AGENT_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// Allow plaintext gRPC on a non-loopback address (logged as a warning)
    #[arg(long, env = "HYPER2KVM_AGENT_INSECURE_LISTEN")]
    pub insecure_listen: bool,
    /// A file holding the bearer token that allows control calls (CancelJob)
    #[arg(long, env = "HYPER2KVM_AGENT_CONTROL_TOKEN_FILE", value_name = "FILE")]
    pub control_token_file: Option<PathBuf>,
    /// Client certificate names (CN or DNS SAN) allowed to make control calls (repeatable)
    #[arg(
        long = "control-client",
        env = "HYPER2KVM_AGENT_CONTROL_CLIENTS",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub control_clients: Vec<String>,
    /// Whether clients connecting over loopback may make control calls [default: true]
    #[arg(long, env = "HYPER2KVM_AGENT_CONTROL_FROM_LOOPBACK", value_name = "BOOL")]
    pub control_from_loopback: Option<bool>,
    /// Most gRPC connections open at once; more are closed at once (a flood of idle connections
    /// must never take the descriptors the queue needs) [default: 256]
    #[arg(long, env = "HYPER2KVM_AGENT_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// A new gRPC connection must complete its TLS/HTTP/2 handshake within this time [default: 10s]
    #[arg(long, env = "HYPER2KVM_AGENT_HANDSHAKE_TIMEOUT", value_parser = duration::parse, value_name = "DURATION")]
    pub handshake_timeout: Option<Duration>,
    /// A gRPC connection that sends nothing for this long is closed (live clients answer the
    /// agent's keep-alive pings every 20 s) [default: 60s]
    #[arg(long, env = "HYPER2KVM_AGENT_IDLE_TIMEOUT", value_parser = duration::parse, value_name = "DURATION")]
    pub idle_timeout: Option<Duration>,
    /// Most watch streams (WatchJob, WatchJobs) open at once [default: 256]
    #[arg(long, env = "HYPER2KVM_AGENT_MAX_WATCHERS", value_name = "N")]
    pub max_watchers: Option<usize>,
    /// Most jobs the agent keeps in its in-memory listing (the oldest finished ones are left out
    /// beyond it; they stay on disk) [default: 100000]
    #[arg(long, env = "HYPER2KVM_AGENT_MAX_LISTED_JOBS", value_name = "N")]
    pub max_listed_jobs: Option<usize>,
    /// Refuse to start when engines cannot be confined to their job's files with Landlock (Linux
    /// 5.13+); `false` runs them unconfined with a warning [default: true]
    #[arg(long, env = "HYPER2KVM_AGENT_REQUIRE_CONFINEMENT", value_name = "BOOL")]
    pub require_confinement: Option<bool>,
    /// Largest virtual disk size accepted (e.g. 16T) [default: 64T]
    #[arg(long, env = "HYPER2KVM_AGENT_MAX_VIRTUAL_SIZE", value_parser = hyperfarm_shared::human::parse_size, value_name = "SIZE")]
    pub max_virtual_size: Option<u64>,
    /// Where to keep the cache of all-zero BLAKE3 subtrees (fast verification of sparse disks)
    /// [default: $CACHE_DIRECTORY (systemd), else ~/.cache/hyperfarm]
    #[arg(long, env = "HYPER2KVM_AGENT_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Log format on stderr
    #[arg(long, env = "HYPER2KVM_AGENT_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
    /// Check the configuration, print it as JSON and exit
    #[arg(long)]
    pub check_config: bool,
}

fn parse_path_map(s: &str) -> Result<(PathBuf, PathBuf), String> {
    let (from, to) = s.split_once('=').ok_or_else(|| format!("{s:?} is not FROM=TO"))?;
    let (from, to) = (PathBuf::from(from.trim()), PathBuf::from(to.trim()));
    if !from.is_absolute() || !to.is_absolute() {
        return Err(format!("{s:?}: both sides of a path map must be absolute paths"));
    }
    Ok((from, to))
}

fn parse_engine(s: &str) -> Result<EngineChoice, String> {
    EngineChoice::parse(s).ok_or_else(|| format!("{s:?} is not auto, qemu-img or hyper2kvm"))
}

fn parse_verify(s: &str) -> Result<VerifyMode, String> {
    VerifyMode::parse(s).ok_or_else(|| format!("{s:?} is not alongside or before"))
}

fn parse_on_existing(s: &str) -> Result<OnExisting, String> {
    match s {
        "fail" => Ok(OnExisting::Fail),
        "archive" => Ok(OnExisting::Archive),
        _ => Err(format!("{s:?} is not fail or archive")),
    }
}

/// The configuration file. Unknown keys are errors: a typo must not silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub instance: Option<String>,
    pub watch_dir: Option<PathBuf>,
    pub output_dir: Option<PathBuf>,
    pub max_concurrent: Option<usize>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub poll_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub lease_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub settle_time: Option<Duration>,
    pub allowed_source_dirs: Option<Vec<PathBuf>>,
    pub path_map: Option<Vec<String>>,
    pub on_existing: Option<OnExisting>,
    pub verify: Option<VerifyMode>,
    pub qemu_img: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub shutdown_grace: Option<Duration>,
    pub max_attempts: Option<usize>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub job_timeout: Option<Duration>,
    pub keep_done_disks: Option<bool>,
    pub libvirt_define: Option<bool>,
    pub libvirt_uri: Option<String>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub staging_max_age: Option<Duration>,
    pub convert: Option<ConvertOptions>,
    pub engine: Option<EngineChoice>,
    pub hyper2kvm_path: Option<PathBuf>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub hyper2kvm_timeout: Option<Duration>,
    pub cache_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub metrics_listen: Option<String>,
    pub advertise_url: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub insecure_listen: Option<bool>,
    pub control_token_file: Option<PathBuf>,
    pub control_clients: Option<Vec<String>>,
    pub control_from_loopback: Option<bool>,
    pub max_connections: Option<usize>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub handshake_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::de_opt")]
    pub idle_timeout: Option<Duration>,
    pub max_watchers: Option<usize>,
    pub max_listed_jobs: Option<usize>,
    pub require_confinement: Option<bool>,
    #[serde(default, deserialize_with = "hyperfarm_shared::human::de_size_opt")]
    pub max_virtual_size: Option<u64>,
}

/// How the gRPC server listens and whom it lets control jobs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrpcConfig {
    /// `None`: gRPC is off.
    pub listen: Option<std::net::SocketAddr>,
    /// Prometheus metrics (`None`: off).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Set explicitly; else derived from the bound address at start-up.
    pub advertise_url: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub insecure_listen: bool,
    pub control_token_file: Option<PathBuf>,
    pub control_clients: Vec<String>,
    pub control_from_loopback: bool,
    pub max_connections: usize,
    #[serde(serialize_with = "ser_dur")]
    pub handshake_timeout: Duration,
    #[serde(serialize_with = "ser_dur")]
    pub idle_timeout: Duration,
    pub max_watchers: usize,
}

/// The default gRPC address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50071";
/// The default metrics address of the default instance (named instances: off).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9471";

/// The validated configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub instance: String,
    pub config_file: Option<PathBuf>,
    pub watch_dir: PathBuf,
    pub output_dir: PathBuf,
    pub max_concurrent: usize,
    #[serde(serialize_with = "ser_dur")]
    pub poll_interval: Duration,
    #[serde(serialize_with = "ser_dur")]
    pub lease_timeout: Duration,
    #[serde(serialize_with = "ser_dur")]
    pub settle_time: Duration,
    pub allowed_source_dirs: Vec<PathBuf>,
    pub path_map: Vec<(PathBuf, PathBuf)>,
    pub on_existing: OnExisting,
    pub verify: VerifyMode,
    pub qemu_img: PathBuf,
    #[serde(serialize_with = "ser_dur")]
    pub shutdown_grace: Duration,
    pub max_attempts: usize,
    #[serde(serialize_with = "ser_dur")]
    pub job_timeout: Duration,
    pub keep_done_disks: bool,
    pub libvirt_define: bool,
    pub libvirt_uri: String,
    #[serde(serialize_with = "ser_dur")]
    pub staging_max_age: Duration,
    pub convert: ConvertOptions,
    pub engine: EngineChoice,
    pub hyper2kvm_path: PathBuf,
    #[serde(serialize_with = "ser_dur")]
    pub hyper2kvm_timeout: Duration,
    pub cache_dir: Option<PathBuf>,
    pub grpc: GrpcConfig,
    pub max_listed_jobs: usize,
    pub require_confinement: bool,
    pub max_virtual_size: u64,
    pub log_format: String,
}

fn ser_dur<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&duration::show(*d))
}

impl Config {
    /// How often the lease is refreshed: a quarter of its timeout, at least every 100 ms.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.lease_timeout / 4).max(Duration::from_millis(100))
    }
}

/// A configuration problem: exit code 3.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Merge flags/environment (already merged by clap), the file and the defaults.
pub fn load(cli: &Cli) -> anyhow::Result<Config> {
    let instance_hint = cli.instance.clone();
    let (file, config_file) = match &cli.config {
        Some(path) => (read_file(path)?, Some(path.clone())),
        None => {
            let implicit = instance::config_file(instance_hint.as_deref());
            if implicit.is_file() { (read_file(&implicit)?, Some(implicit)) } else { (FileConfig::default(), None) }
        }
    };
    let instance = cli.instance.clone().or(file.instance).unwrap_or_else(|| instance::DEFAULT.to_string());
    instance::check_name(&instance).map_err(ConfigError)?;
    let name = Some(instance.as_str());
    let watch_dir = cli.watch_dir.clone().or(file.watch_dir).unwrap_or_else(|| instance::watch_dir(name));
    let output_dir = cli.output_dir.clone().or(file.output_dir).unwrap_or_else(|| instance::output_dir(name));
    let allowed_source_dirs = if cli.allowed_source_dirs.is_empty() {
        file.allowed_source_dirs.unwrap_or_else(|| vec![watch_dir.clone()])
    } else {
        cli.allowed_source_dirs.clone()
    };
    let path_map = if cli.path_map.is_empty() {
        file.path_map
            .unwrap_or_default()
            .iter()
            .map(|s| parse_path_map(s).map_err(|e| ConfigError(format!("path_map: {e}"))))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        cli.path_map.clone()
    };
    let metrics_default = if instance == instance::DEFAULT { DEFAULT_METRICS_LISTEN } else { "off" };
    let cfg = Config {
        path_map,
        instance,
        config_file,
        watch_dir,
        output_dir,
        max_concurrent: cli.max_concurrent.or(file.max_concurrent).unwrap_or(2),
        poll_interval: cli.poll_interval.or(file.poll_interval).unwrap_or(Duration::from_secs(5)),
        lease_timeout: cli.lease_timeout.or(file.lease_timeout).unwrap_or(Duration::from_secs(60)),
        settle_time: cli.settle_time.or(file.settle_time).unwrap_or(Duration::from_secs(5)),
        allowed_source_dirs,
        on_existing: cli.on_existing.or(file.on_existing).unwrap_or_default(),
        verify: cli.verify.or(file.verify).unwrap_or_default(),
        qemu_img: cli.qemu_img.clone().or(file.qemu_img).unwrap_or_else(|| PathBuf::from("qemu-img")),
        shutdown_grace: cli.shutdown_grace.or(file.shutdown_grace).unwrap_or(Duration::from_secs(30)),
        max_attempts: cli.max_attempts.or(file.max_attempts).unwrap_or(3),
        job_timeout: cli.job_timeout.or(file.job_timeout).unwrap_or(Duration::from_secs(24 * 3600)),
        keep_done_disks: cli.keep_done_disks.or(file.keep_done_disks).unwrap_or(false),
        libvirt_define: cli.libvirt_define.or(file.libvirt_define).unwrap_or(true),
        libvirt_uri: cli.libvirt_uri.clone().or(file.libvirt_uri).unwrap_or_else(|| "qemu:///system".into()),
        staging_max_age: cli.staging_max_age.or(file.staging_max_age).unwrap_or(Duration::from_secs(24 * 3600)),
        convert: file.convert.unwrap_or_default(),
        engine: cli.engine.or(file.engine).unwrap_or_default(),
        hyper2kvm_path: cli
            .hyper2kvm_path
            .clone()
            .or(file.hyper2kvm_path)
            .unwrap_or_else(|| PathBuf::from("hyper2kvm")),
        hyper2kvm_timeout: cli
            .hyper2kvm_timeout
            .or(file.hyper2kvm_timeout)
            .or(cli.job_timeout)
            .or(file.job_timeout)
            .unwrap_or(Duration::from_secs(24 * 3600)),
        cache_dir: cli
            .cache_dir
            .clone()
            .or(file.cache_dir)
            .or_else(hyperfarm_shared::tree_hash::ZeroCache::default_dir),
        grpc: GrpcConfig {
            listen: parse_listen(cli.listen.as_deref().or(file.listen.as_deref()).unwrap_or(DEFAULT_LISTEN))?,
            metrics_listen: parse_listen(
                cli.metrics_listen.as_deref().or(file.metrics_listen.as_deref()).unwrap_or(metrics_default),
            )?,
            advertise_url: cli.advertise_url.clone().or(file.advertise_url),
            tls_cert: cli.tls_cert.clone().or(file.tls_cert),
            tls_key: cli.tls_key.clone().or(file.tls_key),
            tls_client_ca: cli.tls_client_ca.clone().or(file.tls_client_ca),
            insecure_listen: cli.insecure_listen || file.insecure_listen.unwrap_or(false),
            control_token_file: cli.control_token_file.clone().or(file.control_token_file),
            control_clients: if cli.control_clients.is_empty() {
                file.control_clients.unwrap_or_default()
            } else {
                cli.control_clients.clone()
            },
            control_from_loopback: cli.control_from_loopback.or(file.control_from_loopback).unwrap_or(true),
            max_connections: cli.max_connections.or(file.max_connections).unwrap_or(256),
            handshake_timeout: cli.handshake_timeout.or(file.handshake_timeout).unwrap_or(Duration::from_secs(10)),
            idle_timeout: cli.idle_timeout.or(file.idle_timeout).unwrap_or(Duration::from_secs(60)),
            max_watchers: cli.max_watchers.or(file.max_watchers).unwrap_or(256),
        },
        max_listed_jobs: cli.max_listed_jobs.or(file.max_listed_jobs).unwrap_or(100_000),
        require_confinement: cli.require_confinement.or(file.require_confinement).unwrap_or(true),
        max_virtual_size: cli
            .max_virtual_size
            .or(file.max_virtual_size)
            .unwrap_or(hyperfarm_shared::engine::inspect::MAX_VIRTUAL_SIZE),
        log_format: cli.log_format.clone(),
    };
    validate(&cfg)?;
    Ok(cfg)
}

fn parse_listen(s: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if matches!(s, "off" | "none" | "") {
        return Ok(None);
    }
    use std::net::ToSocketAddrs;
    let addr = s
        .to_socket_addrs()
        .map_err(|e| ConfigError(format!("listen = {s:?} is not an address such as 127.0.0.1:50071 ({e})")))?
        .next()
        .ok_or_else(|| ConfigError(format!("listen = {s:?} resolves to no address")))?;
    Ok(Some(addr))
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading the configuration file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("configuration file {}: {e}", path.display())).into())
}

fn validate(cfg: &Config) -> anyhow::Result<()> {
    let bad = |m: String| -> anyhow::Result<()> { Err(ConfigError(m).into()) };
    if !(1..=64).contains(&cfg.max_concurrent) {
        return bad(format!("max_concurrent = {} must be between 1 and 64", cfg.max_concurrent));
    }
    if cfg.poll_interval < Duration::from_millis(50) || cfg.poll_interval > Duration::from_secs(3600) {
        return bad(format!("poll_interval = {} must be between 50ms and 1h", duration::show(cfg.poll_interval)));
    }
    if cfg.lease_timeout < Duration::from_millis(500) {
        return bad(format!("lease_timeout = {} must be at least 500ms", duration::show(cfg.lease_timeout)));
    }
    if cfg.libvirt_uri.is_empty() || cfg.libvirt_uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad(format!("libvirt_uri {:?} is not a libvirt URI", cfg.libvirt_uri));
    }
    if cfg.max_attempts == 0 {
        return bad("max_attempts must be at least 1".into());
    }
    for (what, p) in [("watch_dir", &cfg.watch_dir), ("output_dir", &cfg.output_dir)] {
        if !p.is_absolute() {
            return bad(format!("{what} = {} must be an absolute path", p.display()));
        }
    }
    if let Err(e) = cfg.convert.validate() {
        return bad(e);
    }
    if cfg.convert.coroutines == 0 || cfg.convert.coroutines > 16 {
        return bad(format!("convert.coroutines = {} must be between 1 and 16", cfg.convert.coroutines));
    }
    let g = &cfg.grpc;
    if g.tls_cert.is_some() != g.tls_key.is_some() {
        return bad("tls_cert and tls_key must be given together".into());
    }
    if g.tls_client_ca.is_some() && g.tls_cert.is_none() {
        return bad("tls_client_ca (mutual TLS) needs tls_cert and tls_key".into());
    }
    if let Some(addr) = g.listen
        && !addr.ip().to_canonical().is_loopback()
        && g.tls_cert.is_none()
        && !g.insecure_listen
    {
        return bad(format!(
            "listen = {addr} is not a loopback address: give tls_cert and tls_key (and tls_client_ca for mutual TLS), or set insecure_listen = true to accept plaintext"
        ));
    }
    if let Some(u) = &g.advertise_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        return bad(format!("advertise_url = {u:?} must start with http:// or https://"));
    }
    if !(1..=65_536).contains(&g.max_connections) {
        return bad(format!("max_connections = {} must be between 1 and 65536", g.max_connections));
    }
    if !(1..=100_000).contains(&g.max_watchers) {
        return bad(format!("max_watchers = {} must be between 1 and 100000", g.max_watchers));
    }
    for (what, d) in [("handshake_timeout", g.handshake_timeout), ("idle_timeout", g.idle_timeout)] {
        if d < Duration::from_millis(100) {
            return bad(format!("{what} = {} must be at least 100ms", duration::show(d)));
        }
    }
    if g.idle_timeout < Duration::from_secs(25) && g.listen.is_some_and(|a| !a.ip().to_canonical().is_loopback()) {
        tracing::warn!(
            "idle_timeout = {} is shorter than the 20 s keep-alive: quiet remote clients will be disconnected",
            duration::show(g.idle_timeout)
        );
    }
    if cfg.max_listed_jobs < 100 {
        return bad(format!("max_listed_jobs = {} must be at least 100", cfg.max_listed_jobs));
    }
    if cfg.max_virtual_size < 1 << 20 || cfg.max_virtual_size > hyperfarm_shared::engine::inspect::MAX_VIRTUAL_SIZE {
        return bad(format!(
            "max_virtual_size = {} must be between 1 MiB and 64 TiB",
            hyperfarm_shared::human::bytes(cfg.max_virtual_size)
        ));
    }
    if cfg.watch_dir == cfg.output_dir {
        return bad("watch_dir and output_dir must be different directories".into());
    }
    Ok(())
}

/// Resolve the allowed source directories to canonical paths (they must exist).
pub fn canonical_allowed(cfg: &Config) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in &cfg.allowed_source_dirs {
        match std::fs::canonicalize(d) {
            Ok(c) => out.push(c),
            Err(e) => bail!(ConfigError(format!("allowed source directory {}: {e}", d.display()))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("hyper2kvm-agent").chain(args.iter().copied()))
    }

    #[test]
    fn precedence_defaults_file_flags() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("agent.toml");
        std::fs::write(&f, "watch_dir = \"/q\"\noutput_dir = \"/o\"\nmax_concurrent = 4\npoll_interval = \"2s\"\n[convert]\ncoroutines = 4\n").expect("write");
        let c = load(&cli(&["--config", f.to_str().expect("utf8"), "--max-concurrent", "3"])).expect("load");
        assert_eq!(c.watch_dir, PathBuf::from("/q"));
        assert_eq!(c.max_concurrent, 3, "flags beat the file");
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.convert.coroutines, 4);
        assert_eq!(c.lease_timeout, Duration::from_secs(60), "default");
        assert_eq!(c.allowed_source_dirs, vec![PathBuf::from("/q")]);
    }

    #[test]
    fn instance_selects_directories() {
        let c = load(&cli(&["--instance", "vsphere"])).expect("load");
        assert_eq!(c.watch_dir, PathBuf::from("/var/lib/hyper2kvm/vsphere/queue"));
        assert_eq!(c.output_dir, PathBuf::from("/var/lib/hyper2kvm/vsphere/output"));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("agent.toml");
        std::fs::write(&f, "watch_dri = \"/q\"\n").expect("write");
        let e = load(&cli(&["--config", f.to_str().expect("utf8")])).expect_err("typo");
        assert!(format!("{e:#}").contains("watch_dri"), "{e:#}");
        let e = load(&cli(&["--max-concurrent", "0"])).expect_err("zero");
        assert!(format!("{e:#}").contains("max_concurrent"));
        let e = load(&cli(&["--watch-dir", "relative"])).expect_err("relative");
        assert!(format!("{e:#}").contains("absolute"));
        let e = load(&cli(&["--instance", "../x"])).expect_err("bad instance");
        assert!(format!("{e:#}").contains("instance name"));
        let e = load(&cli(&["--listen", "0.0.0.0:50071"])).expect_err("plaintext beyond loopback");
        assert!(format!("{e:#}").contains("tls_cert"), "{e:#}");
        assert!(load(&cli(&["--listen", "0.0.0.0:50071", "--insecure-listen"])).is_ok());
        let e = load(&cli(&["--tls-cert", "/x.pem"])).expect_err("cert without key");
        assert!(format!("{e:#}").contains("together"));
        assert!(load(&cli(&["--listen", "off"])).expect("off").grpc.listen.is_none());
    }
}
