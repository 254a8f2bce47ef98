//! The vSphere provider (`--provider vsphere`): a VM of a vCenter or ESXi, found by name or
//! inventory path, exported through the vSphere API (`ExportVm` → `HttpNfcLease` → HTTPS
//! downloads), into the same queue job as a local VM — or converted on this host in direct mode.
//!
//! Credentials never go on the command line: the password comes from `GOVC_PASSWORD` or a file
//! (`--vsphere-password-file`); a password inside `--vsphere-url` is refused (it would be in the
//! process list), inside `GOVC_URL` it is accepted.

pub mod export;
pub mod inventory;
pub mod soap;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyperfarm_shared::format::{self, DiskFormat, Sniffed};
use hyperfarm_shared::names;
use hyperfarm_shared::text::Esc;

use crate::ExportError;
use crate::copy::Control;
use crate::source::{self, Firmware, NicFact, VmDir, VmSource};
use crate::ui::Meter;
use export::{Downloaded, ExportFailure, Tuning};
use inventory::{ServiceContent, VmEntry, VmFacts};
use soap::{Endpoint, Soap, Trust, VsError};

/// How to reach vSphere (shared by the export and `hyperexport vms`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct VsphereArgs {
    /// vSphere: the vCenter or ESXi, https://HOST[:PORT][/sdk] [env: GOVC_URL, which may also
    /// hold user:password@]
    #[arg(long, value_name = "URL")]
    pub vsphere_url: Option<String>,
    /// vSphere: the user name [env: GOVC_USERNAME]
    #[arg(long, value_name = "USER")]
    pub vsphere_user: Option<String>,
    /// vSphere: a file whose first line is the password (else GOVC_PASSWORD; never a flag)
    #[arg(long, value_name = "FILE")]
    pub vsphere_password_file: Option<PathBuf>,
    /// vSphere: do not check the server's certificate [env: GOVC_INSECURE=1]
    #[arg(long)]
    pub insecure: bool,
    /// vSphere: PEM file of the CA that signed the server's certificate [env: GOVC_TLS_CA_CERTS]
    /// [default: the system's CAs]
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// vSphere: only VMs below this inventory folder, e.g. /DC1/vm/prod
    #[arg(long, value_name = "PATH")]
    pub folder: Option<String>,
}

/// `hyperexport vms`: list the VMs of a vCenter or ESXi.
#[derive(Debug, clap::Args)]
pub struct VmsArgs {
    #[command(flatten)]
    pub vsphere: VsphereArgs,
    /// One JSON object per VM, in an array
    #[arg(long)]
    pub json: bool,
}

/// Resolved connection settings.
#[derive(Clone)]
pub struct Connection {
    pub ep: Endpoint,
    pub user: String,
    password: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Whether a vCenter or ESXi is configured (`--vsphere-url`, else govc's `GOVC_URL`).
pub fn configured(a: &VsphereArgs) -> bool {
    a.vsphere_url.is_some() || env("GOVC_URL").is_some()
}

/// Settings from flags and govc's environment.
pub fn connection(a: &VsphereArgs) -> Result<Connection, ExportError> {
    let usage = ExportError::Usage;
    let (raw, from_flag) = match (&a.vsphere_url, env("GOVC_URL")) {
        (Some(u), _) => (u.clone(), true),
        (None, Some(u)) => (u, false),
        (None, None) => {
            return Err(usage(
                "--provider vsphere: give the vCenter or ESXi with --vsphere-url https://HOST (or GOVC_URL)".into(),
            ));
        }
    };
    let source = if from_flag { "--vsphere-url" } else { "GOVC_URL" };
    // The URL as it may be printed: without the user:password@ part.
    let shown = match raw.split_once("://") {
        Some((scheme, r)) => format!("{scheme}://{}", r.rsplit_once('@').map(|(_, h)| h).unwrap_or(r)),
        None => raw.rsplit_once('@').map(|(_, h)| h.to_string()).unwrap_or_else(|| raw.clone()),
    };
    let rest = if let Some(r) = raw.strip_prefix("https://") {
        r
    } else if raw.contains("://") {
        return Err(usage(format!(
            "{source} {}: only https:// is supported (vSphere serves its API over HTTPS)",
            Esc(&shown)
        )));
    } else {
        raw.as_str()
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (url_user, url_password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((n, p)) => (Some(percent_decode(n)), Some(percent_decode(p))),
            None => (Some(percent_decode(u)), None),
        },
        None => (None, None),
    };
    if url_password.is_some() && from_flag {
        return Err(usage(
            "--vsphere-url holds a password, which every user of this host can read in the process list; put it in GOVC_PASSWORD or a file given with --vsphere-password-file".into(),
        ));
    }
    let (host, port) = split_host_port(hostport)
        .ok_or_else(|| usage(format!("{source} {}: no usable host[:port] in it", Esc(&shown))))?;
    let path = if path.is_empty() || path == "/" { "/sdk".to_string() } else { path.to_string() };
    let user =
        a.vsphere_user.clone().or(url_user).or_else(|| env("GOVC_USERNAME")).ok_or_else(|| {
            usage("--provider vsphere: give the user name with --vsphere-user (or GOVC_USERNAME)".into())
        })?;
    let password = match &a.vsphere_password_file {
        Some(f) => {
            let bytes = hyperfarm_shared::fsx::read_bounded(f, 64 * 1024)
                .map_err(|e| usage(format!("--vsphere-password-file {}: {e}", Esc(f))))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| usage(format!("--vsphere-password-file {}: not UTF-8 text", Esc(f))))?;
            text.lines().next().unwrap_or("").to_string()
        }
        None => env("GOVC_PASSWORD").or(url_password).ok_or_else(|| {
            usage(
                "--provider vsphere: give the password in GOVC_PASSWORD or a file with --vsphere-password-file".into(),
            )
        })?,
    };
    if password.is_empty() {
        return Err(usage("the vSphere password is empty".into()));
    }
    let insecure = a.insecure
        || env("GOVC_INSECURE").is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes"));
    let ca = a.ca_file.clone().or_else(|| env("GOVC_TLS_CA_CERTS").map(PathBuf::from));
    let trust = match (insecure, ca) {
        (true, Some(_)) => {
            return Err(usage(
                "give either --ca-file (GOVC_TLS_CA_CERTS) or --insecure (GOVC_INSECURE), not both".into(),
            ));
        }
        (true, None) => Trust::Insecure,
        (false, Some(f)) => Trust::CaFile(f),
        (false, None) => Trust::System,
    };
    let tls = soap::tls_config(&trust).map_err(|e| ExportError::Usage(e.to_string()))?;
    Ok(Connection { ep: Endpoint { host, port, path, tls }, user, password })
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(r) = s.strip_prefix('[') {
        let (h, rest) = r.split_once(']')?;
        (h, rest.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().ok().filter(|p| *p > 0)?,
        None => 443,
    };
    let ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:_".contains(&b));
    ok.then(|| (host.to_string(), port))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len() + 1
            && let Some(v) = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A logged-in session.
pub struct Session {
    pub soap: Arc<Soap>,
    pub sc: ServiceContent,
    pub user: String,
}

fn vs_error(e: VsError, user: &str, ep: &Endpoint) -> ExportError {
    match e {
        VsError::Login(m) => ExportError::Usage(format!(
            "vSphere at {} refused the login of {}: {}; check the user name and password (GOVC_USERNAME, GOVC_PASSWORD or --vsphere-password-file)",
            ep.authority(),
            Esc(user),
            Esc(&m)
        )),
        VsError::Connect(m) | VsError::Tls(m) => ExportError::Unreachable(format!("vSphere: {m}")),
        other => ExportError::Unreachable(format!("vSphere at {}: {}", ep.authority(), Esc(&other.to_string()))),
    }
}

impl Session {
    pub async fn open(c: &Connection) -> Result<Session, ExportError> {
        let soap = Arc::new(Soap::new(c.ep.clone()));
        let err = |e| vs_error(e, &c.user, &c.ep);
        let sc = inventory::service_content(&soap).await.map_err(err)?;
        inventory::login(&soap, &sc, &c.user, &c.password).await.map_err(err)?;
        tracing::info!(server = %Esc(&sc.full_name), api = %Esc(&sc.api_version), user = %Esc(&c.user), "logged into vSphere");
        Ok(Session { soap, sc, user: c.user.clone() })
    }

    pub async fn close(&self) {
        inventory::logout(&self.soap, &self.sc).await;
    }

    fn err(&self, e: VsError) -> ExportError {
        vs_error(e, &self.user, &self.soap.ep)
    }

    pub async fn list(&self, folder: Option<&str>) -> Result<Vec<VmEntry>, ExportError> {
        let all = inventory::list_vms(&self.soap, &self.sc).await.map_err(|e| self.err(e))?;
        Ok(match folder {
            Some(f) => {
                let f = f.trim_end_matches('/');
                all.into_iter().filter(|v| v.path.starts_with(&format!("{f}/"))).collect()
            }
            None => all,
        })
    }

    /// The VM named `spec` (a name, or an inventory path starting with `/`).
    pub async fn find(&self, spec: &str, folder: Option<&str>) -> Result<VmFacts, ExportError> {
        let all = self.list(folder).await?;
        let within = folder.map(|f| format!(" below {}", Esc(f))).unwrap_or_default();
        let found: Vec<&VmEntry> = if spec.starts_with('/') {
            all.iter().filter(|v| v.path == spec.trim_end_matches('/')).collect()
        } else {
            all.iter().filter(|v| v.name == spec).collect()
        };
        let entry = match found.as_slice() {
            [one] => *one,
            [] => {
                return Err(ExportError::BadInput(format!(
                    "vSphere at {}: no VM {}{within} ({} VMs seen); `hyperexport vms` lists them, with their inventory paths",
                    self.soap.ep.authority(),
                    Esc(spec),
                    all.len()
                )));
            }
            many => {
                return Err(ExportError::BadInput(format!(
                    "vSphere at {}: {} VMs are named {}: give its inventory path instead: {}",
                    self.soap.ep.authority(),
                    many.len(),
                    Esc(spec),
                    many.iter().map(|v| Esc(&v.path).to_string()).collect::<Vec<_>>().join(", ")
                )));
            }
        };
        if entry.template {
            tracing::info!("{} is a template", Esc(&entry.path));
        }
        let mut facts = inventory::vm_facts(&self.soap, &self.sc, &entry.moref).await.map_err(|e| self.err(e))?;
        facts.name = entry.name.clone();
        facts.path = entry.path.clone();
        Ok(facts)
    }
}

/// Log in, list the VMs (below `--folder`), log out: the server's host name and the VMs.
pub async fn inventory_of(a: &VsphereArgs) -> Result<(String, Vec<VmEntry>), ExportError> {
    let c = connection(a)?;
    let s = Session::open(&c).await?;
    let vms = s.list(a.folder.as_deref()).await;
    s.close().await;
    Ok((c.ep.host.clone(), vms?))
}

/// `hyperexport vms`.
pub fn vms_main(args: VmsArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyperexport: cannot start the runtime: {e}");
            return ExitCode::from(crate::EXIT_INTERNAL);
        }
    };
    match rt.block_on(inventory_of(&args.vsphere)) {
        Ok((_, vms)) => {
            if vms.is_empty() {
                eprintln!(
                    "hyperexport: no VM{}",
                    args.vsphere.folder.as_deref().map(|f| format!(" below {}", Esc(f))).unwrap_or_default()
                );
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&vms).unwrap_or_default());
            } else {
                println!("{:<50} {:<11} {:>4} {:>9}  GUEST", "PATH", "POWER", "CPUS", "MEMORY");
                for v in &vms {
                    println!(
                        "{:<50} {:<11} {:>4} {:>9}  {}",
                        Esc(&v.path).to_string(),
                        Esc(&v.power).to_string(),
                        v.cpus.map(|c| c.to_string()).unwrap_or_default(),
                        v.memory_mib.map(|m| format!("{m} MiB")).unwrap_or_default(),
                        Esc(v.guest.as_deref().unwrap_or("")),
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hyperexport: {}", hyperfarm_shared::text::escape_lines(&e.to_string()));
            ExitCode::from(e.code())
        }
    }
}

/// A disk downloaded from vSphere.
pub struct Got {
    /// `disk<N>`, in boot order.
    pub id: String,
    pub format: DiskFormat,
    pub data: Downloaded,
    /// The VM's name for it (`Hard disk 1 ([ds1] web/web.vmdk)`), escaped.
    pub label: String,
}

/// A VM found on vSphere, ready to export.
pub struct Prepared {
    pub session: Session,
    pub facts: VmFacts,
    /// The name its files get.
    pub name: String,
    pub tuning: Tuning,
    pub allow_powered_on: bool,
}

/// Log in, find the VM, check that it can be exported.
pub async fn prepare(cli: &crate::cli::Cli, max_disk: u64) -> Result<Prepared, ExportError> {
    let spec = cli
        .vm
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned())
        .ok_or_else(|| ExportError::Usage("--provider vsphere: give --vm NAME or --vm /DC/vm/PATH".into()))?;
    if cli.vsphere_keepalive < Duration::from_millis(100) {
        return Err(ExportError::Usage("--vsphere-keepalive must be at least 100ms".into()));
    }
    let c = connection(&cli.vsphere)?;
    let session = Session::open(&c).await?;
    let found = session.find(&spec, cli.vsphere.folder.as_deref()).await;
    let facts = match found {
        Ok(f) => f,
        Err(e) => {
            session.close().await;
            return Err(e);
        }
    };
    let name = match &cli.name {
        Some(n) => {
            names::check_vm_name(n).map_err(|e| ExportError::Usage(format!("--name: {e}")))?;
            n.clone()
        }
        None => names::sanitize_vm_name(&facts.name).ok_or_else(|| {
            ExportError::BadInput(format!(
                "the VM name {} has no usable characters; give one with --name",
                Esc(&facts.name)
            ))
        })?,
    };
    let refuse = |msg: String| async {
        session.close().await;
        Err(ExportError::BadInput(msg))
    };
    if facts.disks.is_empty() {
        return refuse(format!("vSphere VM {}: it has no disks to export", Esc(&facts.name))).await;
    }
    if facts.power != "poweredOff" && !cli.allow_powered_on {
        return refuse(format!(
            "vSphere VM {} is {}: a running VM's disks change while they are copied. Shut it down first, or give --allow-powered-on to export a snapshot of its disks (crash-consistent: as after a power cut)",
            Esc(&facts.name),
            Esc(&facts.power)
        ))
        .await;
    }
    tracing::info!(
        vm = %Esc(&facts.name), power = %Esc(&facts.power), disks = facts.disks.len(), nics = facts.nics.len(),
        cpu = facts.cpus.unwrap_or(0), memory_mib = facts.memory_mib.unwrap_or(0),
        firmware = %Esc(facts.firmware.as_deref().unwrap_or("unknown")), "found the VM on vSphere"
    );
    Ok(Prepared {
        session,
        facts,
        name,
        tuning: Tuning {
            keepalive: cli.vsphere_keepalive,
            retries: cli.vsphere_retries,
            max_disk,
            stall: Duration::from_secs(120),
        },
        allow_powered_on: cli.allow_powered_on,
    })
}

impl Prepared {
    /// The VM's facts as a source without disks (the manifest's `vm` and `source`).
    pub fn source(&self) -> VmSource {
        let f = &self.facts;
        VmSource {
            name: self.name.clone(),
            cpu: f.cpus,
            memory_mib: f.memory_mib,
            firmware: match f.firmware.as_deref() {
                Some("efi") => Firmware::Uefi,
                Some("bios") => Firmware::Bios,
                _ => Firmware::Unknown,
            },
            disks: vec![],
            kind: "vsphere",
            path: PathBuf::from(format!("vsphere://{}{}", self.session.soap.ep.authority(), f.path)),
            expected_member_digests: vec![],
            nics: f
                .nics
                .iter()
                .take(32)
                .map(|n| NicFact { mac: n.mac.clone(), network: n.network.clone(), model: Some(n.model.clone()) })
                .collect(),
            vm_id: f.instance_uuid.clone().or_else(|| Some(f.moref.value.clone())),
            guest: f.guest.clone(),
        }
    }

    /// Download every disk into `dir` as `<file_names[i]>`; each is checked to be a disk image.
    pub async fn download(
        &self,
        dir: &Path,
        job: &str,
        ctl: &Arc<Control>,
        quiet: bool,
    ) -> Result<Vec<Got>, ExportError> {
        let s = &self.session;
        let snapshot_name = format!("hyperexport-{job}");
        let (entity, snapshot) = match export::entity_for(
            &s.soap,
            &s.sc,
            &self.facts,
            self.allow_powered_on,
            &snapshot_name,
            ctl,
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                s.close().await;
                if e.fault_kind() == Some("Cancelled") {
                    tracing::warn!(
                        "interrupted while vSphere took the snapshot {snapshot_name} of {}: if it was taken, remove it in vSphere",
                        Esc(&self.facts.name)
                    );
                    return Err(ExportError::Interrupted(false));
                }
                tracing::warn!(
                    "taking the snapshot {snapshot_name} of running VM {} failed; if vSphere took it anyway, remove it there",
                    Esc(&self.facts.name)
                );
                return Err(self.failure(ExportFailure::Vs(e)));
            }
        };
        if snapshot.is_some() {
            tracing::info!("the VM is running: exporting a snapshot of its disks taken now");
        }
        let r = self.download_entity(&entity, dir, ctl, quiet).await;
        if let Some(snap) = snapshot {
            match inventory::remove_snapshot(&s.soap, &s.sc, &snap).await {
                Ok(()) => tracing::info!("removed the export snapshot"),
                Err(e) => tracing::warn!(
                    "removing the snapshot hyperexport-{job} of {} failed: {}; remove it in vSphere",
                    Esc(&self.facts.name),
                    Esc(&e.to_string())
                ),
            }
        }
        s.close().await;
        r
    }

    async fn download_entity(
        &self,
        entity: &soap::MoRef,
        dir: &Path,
        ctl: &Arc<Control>,
        quiet: bool,
    ) -> Result<Vec<Got>, ExportError> {
        let s = &self.session;
        let mut lease = export::open_lease(&s.soap, &s.sc, entity, ctl).await.map_err(|f| self.failure(f))?;
        if let Some(t) = lease.timeout
            && t > Duration::ZERO
            && self.tuning.keepalive * 2 > t
        {
            tracing::warn!(
                "--vsphere-keepalive {} is more than half the lease's timeout ({}s): the lease may expire between renewals",
                hyperfarm_shared::duration::show(self.tuning.keepalive),
                t.as_secs()
            );
        }
        if lease.urls.len() > hyperfarm_shared::manifest::MAX_DISKS {
            export::abort(&s.soap, &lease.moref).await;
            return Err(ExportError::BadInput(format!(
                "vSphere VM {} has {} disks; a job holds at most {}",
                Esc(&self.facts.name),
                lease.urls.len(),
                hyperfarm_shared::manifest::MAX_DISKS
            )));
        }
        if lease.urls.is_empty() {
            export::abort(&s.soap, &lease.moref).await;
            return Err(ExportError::Unreachable(format!(
                "vSphere gave an export lease of VM {} without disk URLs",
                Esc(&self.facts.name)
            )));
        }
        // The lease's disks in the VM's order (boot disk first): its device keys end with the
        // disk's controller and unit. Unmatched: the lease's own order.
        // Which of the VM's disks each URL is (an index into facts.disks), when all are matched.
        let which: Vec<Option<usize>> = match order_by_slots(&lease.urls, &self.facts.disks) {
            Some(pairs) => {
                lease.urls = pairs.iter().map(|(u, _)| u.clone()).collect();
                pairs.into_iter().map(|(_, i)| Some(i)).collect()
            }
            None => {
                tracing::warn!(
                    "the lease's disks could not be matched to the VM's devices: taking them in the lease's order (the first is the boot disk)"
                );
                vec![None; lease.urls.len()]
            }
        };
        let sizes: Vec<u64> = lease
            .urls
            .iter()
            .enumerate()
            .map(|(i, u)| u.size.or_else(|| which[i].map(|d| self.facts.disks[d].capacity_bytes)).unwrap_or(0))
            .collect();
        let total: u64 = sizes.iter().sum();
        let done = Arc::new(AtomicU64::new(0));
        let (keeper, mut lease_end) =
            export::keep_alive(s.soap.clone(), lease.moref.clone(), self.tuning.keepalive, done.clone(), total);
        let mut out = Vec::new();
        let mut result = Ok(());
        let mut before = 0u64;
        for (i, url) in lease.urls.iter().enumerate() {
            let id = format!("disk{i}");
            let dst = dir.join(format!("{id}.vmdk"));
            ctl.done.store(0, Ordering::Relaxed);
            let mut meter = Meter::new(format!("downloading {id}"), sizes[i], quiet).stage("export", &id);
            let dl = export::download(&s.soap, url, &dst, &self.tuning, ctl, before, &done, &mut lease_end);
            let r = meter.follow(dl, &ctl.done).await;
            match r.and_then(|d| check_disk(&d.path).map(|f| (f, d))) {
                Ok((format, d)) => {
                    tracing::info!(disk = %id, bytes = d.bytes, resumed = d.resumed, "downloaded");
                    before += d.bytes;
                    let label = match which[i].and_then(|d| self.facts.disks.get(d)) {
                        Some(v) => format!("{} ({})", v.label, v.file),
                        None => url.target.clone(),
                    };
                    out.push(Got { id, format, data: d, label: Esc(&label).to_string() });
                }
                Err(f) => {
                    result = Err(f);
                    break;
                }
            }
        }
        keeper.abort();
        match result {
            Ok(()) => {
                export::progress(&s.soap, &lease.moref, 100).await.ok();
                if let Err(e) = export::complete(&s.soap, &lease.moref).await {
                    export::abort(&s.soap, &lease.moref).await;
                    return Err(s.err(e));
                }
                Ok(out)
            }
            Err(f) => {
                export::abort(&s.soap, &lease.moref).await;
                Err(self.failure(f))
            }
        }
    }

    /// What an export failure means for the operator.
    fn failure(&self, f: ExportFailure) -> ExportError {
        let s = &self.session;
        let vm = Esc(&self.facts.name);
        match f {
            ExportFailure::Cancelled => ExportError::Interrupted(false),
            ExportFailure::Io(m) => ExportError::Copy(format!("downloading VM {vm}: {m}")),
            ExportFailure::TooLarge(m) => ExportError::BadInput(format!("vSphere VM {vm}: {m}; nothing was published")),
            ExportFailure::Lease(m) => ExportError::Unreachable(format!(
                "exporting VM {vm} from vSphere: {}; nothing was published. If the network or the server was slow, try again (the lease is renewed every {}; --vsphere-keepalive)",
                Esc(&m),
                hyperfarm_shared::duration::show(self.tuning.keepalive)
            )),
            ExportFailure::Vs(e) => match e.fault_kind() {
                Some("InvalidPowerState") | Some("InvalidState") => ExportError::BadInput(format!(
                    "vSphere refused to export VM {vm}: {}; {}",
                    Esc(&e.to_string()),
                    if self.allow_powered_on {
                        "it may be busy (another export, a snapshot or a migration running): try again later"
                    } else {
                        "shut it down, or give --allow-powered-on"
                    }
                )),
                Some("NoPermission") => ExportError::Usage(format!(
                    "vSphere user {} may not export VM {vm}: {}; it needs the privilege to export (VApp.Export){}",
                    Esc(&s.user),
                    Esc(&e.to_string()),
                    if self.allow_powered_on {
                        " and to take snapshots (VirtualMachine.State.CreateSnapshot)"
                    } else {
                        ""
                    }
                )),
                _ => s.err(e),
            },
        }
    }
}

/// The lease's disk URLs in the order of `disks` (boot disk first), each with the index of the disk
/// it is, matched by the controller and unit at the end of its device key
/// (`/vm-42/ParaVirtualSCSIController0:1`). A disk the lease leaves out is skipped. `None` unless
/// every URL matches exactly one disk.
fn order_by_slots(urls: &[export::DeviceUrl], disks: &[inventory::VmDisk]) -> Option<Vec<(export::DeviceUrl, usize)>> {
    let mut left: Vec<Option<&export::DeviceUrl>> = urls.iter().map(Some).collect();
    let mut out = Vec::with_capacity(urls.len());
    for (d, disk) in disks.iter().enumerate() {
        let Some(slot) = disk.slot.as_deref() else { continue };
        let tail = format!("/{slot}");
        if let Some(i) = left.iter().position(|u| u.is_some_and(|u| u.key.ends_with(&tail))) {
            out.push((left[i].take()?.clone(), d));
        }
    }
    (out.len() == urls.len()).then_some(out)
}

/// A downloaded disk must be a disk image the agent can convert (a streamOptimized VMDK from
/// vSphere), not an error page.
fn check_disk(path: &Path) -> Result<DiskFormat, ExportFailure> {
    let file =
        hyperfarm_shared::fsx::open_regular(path).map_err(|e| ExportFailure::Io(format!("{}: {e}", path.display())))?;
    match format::sniff(&file) {
        Ok(Sniffed::Disk(f)) => Ok(f),
        Ok(_) => Err(ExportFailure::Vs(VsError::Protocol(format!(
            "the server sent {} bytes that are not a disk image for {}",
            file.metadata().map(|m| m.len()).unwrap_or(0),
            path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        )))),
        Err(e) => Err(ExportFailure::Io(format!("{}: {e}", path.display()))),
    }
}

/// Direct mode: the disks downloaded into `dir`, as a local VM to convert here.
pub async fn materialize(p: &Prepared, dir: &Path, ctl: &Arc<Control>, quiet: bool) -> Result<VmSource, ExportError> {
    let job = uuid::Uuid::new_v4().to_string();
    let got = p.download(dir, &job, ctl, quiet).await?;
    let vmdir = VmDir::new(dir);
    let mut vm = p.source();
    for g in got {
        let rel = PathBuf::from(g.data.path.file_name().unwrap_or_default());
        let mut disk = source::load_disk_file(&vmdir, &rel, &g.id).map_err(|e| ExportError::BadInput(e.to_string()))?;
        disk.label = g.label;
        vm.disks.push(disk);
    }
    Ok(vm)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lease_disks_are_matched_by_controller_and_unit() {
        let url = |key: &str| export::DeviceUrl {
            key: key.into(),
            url: format!("https://*/nfc/x{key}"),
            target: key.into(),
            size: None,
            thumbprint: None,
        };
        let disk = |slot: Option<&str>| inventory::VmDisk {
            key: 0,
            slot: slot.map(str::to_string),
            label: String::new(),
            file: String::new(),
            capacity_bytes: 0,
        };
        let disks = [
            disk(Some("ParaVirtualSCSIController0:0")),
            disk(Some("ParaVirtualSCSIController0:1")),
            disk(Some("SATAController0:0")),
        ];
        // In reverse, and the lease leaves the SATA disk out.
        let urls = [url("/vm-1/ParaVirtualSCSIController0:1"), url("/vm-1/ParaVirtualSCSIController0:0")];
        let got = order_by_slots(&urls, &disks).unwrap();
        let got: Vec<(&str, usize)> = got.iter().map(|(u, d)| (u.key.as_str(), *d)).collect();
        assert_eq!(got, [("/vm-1/ParaVirtualSCSIController0:0", 0), ("/vm-1/ParaVirtualSCSIController0:1", 1)]);
        // A URL that names no disk: no matching at all.
        let urls = [url("/vm-1/ParaVirtualSCSIController0:0"), url("/vm-1/Other9:9")];
        assert!(order_by_slots(&urls, &disks).is_none());
        // "…0:1" must not match "…10:1".
        let urls = [url("/vm-1/ParaVirtualSCSIController10:1")];
        assert!(order_by_slots(&urls, &[disk(Some("ParaVirtualSCSIController0:1"))]).is_none());
    }

    #[test]
    fn urls_and_credentials() {
        let a = VsphereArgs {
            vsphere_url: Some("vc.example.com".into()),
            vsphere_user: Some("admin".into()),
            insecure: true,
            ..Default::default()
        };
        let p = std::env::temp_dir().join(format!("hf-pw-{}", std::process::id()));
        std::fs::write(&p, "s3cret\nignored\n").unwrap();
        let a = VsphereArgs { vsphere_password_file: Some(p.clone()), ..a };
        let c = connection(&a).unwrap();
        assert_eq!((c.ep.host.as_str(), c.ep.port, c.ep.path.as_str()), ("vc.example.com", 443, "/sdk"));
        assert_eq!(c.password, "s3cret");
        let b = VsphereArgs { vsphere_url: Some("https://u:pw@vc:8443/sdk".into()), ..a.clone() };
        assert!(matches!(connection(&b), Err(ExportError::Usage(m)) if m.contains("process list")));
        let b = VsphereArgs { vsphere_url: Some("http://vc/sdk".into()), ..a.clone() };
        assert!(matches!(connection(&b), Err(ExportError::Usage(m)) if m.contains("https")));
        let b = VsphereArgs { ca_file: Some(p.clone()), ..a.clone() };
        assert!(matches!(connection(&b), Err(ExportError::Usage(m)) if m.contains("not both")));
        let b = VsphereArgs { vsphere_url: Some("https://[::1]:9443".into()), ..a };
        let c = connection(&b).unwrap();
        assert_eq!((c.ep.host.as_str(), c.ep.port), ("::1", 9443));
        assert_eq!(c.ep.authority(), "[::1]:9443");
        std::fs::remove_file(p).unwrap();
        assert_eq!(percent_decode("a%40b%zz"), "a@b%zz");
    }
}
