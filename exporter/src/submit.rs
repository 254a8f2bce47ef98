//! Publishing a VM into a queue: copy each disk into a staged job (digest in the same pass),
//! write the manifest last, publish with one rename.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyperfarm_shared::JobId;
use hyperfarm_shared::digest::to_hex;
use hyperfarm_shared::format::DiskFormat;
use hyperfarm_shared::fsx;
use hyperfarm_shared::manifest::{self, Disk, HyperfarmInfo, Manifest, Pipeline, Source, Stage, Submitter, VmInfo};
use hyperfarm_shared::queue::{self, PublishError, Queue, Staging};

use hyperfarm_shared::text::Esc;

use crate::ExportError;
use crate::copy::{self, Control};
use crate::source::VmSource;
use crate::ui::Meter;

/// A published job.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub id: JobId,
    pub job_dir: PathBuf,
    pub vm_name: String,
    pub bytes: u64,
    /// The queue already held a job of the requested id (`--job-id`), in this state: nothing
    /// was copied or published this time.
    pub already: Option<queue::State>,
}

/// What the job asks of its agent: hyper2kvm pipeline stages besides convert (none by default:
/// every engine converts and `qemu-img check`s), and an engine to override the agent's.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub inspect: bool,
    pub fix: bool,
    pub validate: bool,
    pub engine: Option<hyperfarm_shared::engine::EngineChoice>,
    /// The job's id (`--job-id`, idempotent submission); a new one when unset.
    pub id: Option<JobId>,
    /// Ask the agent to define the converted VM in libvirt (`--libvirt` in daemon mode).
    pub libvirt: Option<hyperfarm_shared::libvirt::DefineRequest>,
}

/// The start of a submission: the job already in the queue (`--job-id`), or a new staged job.
pub enum Begun {
    Already(Submitted),
    Staged(Staging, JobId),
}

/// Prepare the queue and stage a new job (or find the one `--job-id` names).
pub async fn begin(queue: &Queue, vm_name: &str, stages: &Options) -> Result<Begun, ExportError> {
    let q = queue.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if let Ok(n) = queue::cleanup_own_staging(&q)
            && n > 0
        {
            tracing::info!(count = n, "removed staging leftovers of earlier hyperexport runs on this host");
        }
        q.init()
    })
    .await
    .map_err(|e| ExportError::Internal(e.to_string()))?
    .map_err(|e| ExportError::Unreachable(format!(
        "cannot use the queue directory {}: {e}; check that it exists (and the share is mounted) and that this user may write to it (group of the agent, see docs/production.md)",
        queue.root().display()
    )))?;

    let id = stages.id.unwrap_or_default();
    if stages.id.is_some() {
        let q = queue.clone();
        let found = tokio::task::spawn_blocking(move || q.locate(&id))
            .await
            .map_err(|e| ExportError::Internal(e.to_string()))?
            .map_err(|e| {
                ExportError::Unreachable(format!("looking for job {id} in {}: {e}", queue.root().display()))
            })?;
        if let Some((state, job_dir)) = found {
            tracing::info!(job = %id, %state, "the queue already holds this job: not submitting it again");
            crate::ui::event(
                &serde_json::json!({"event": "published", "job_id": id, "queue": queue.root(), "job_dir": job_dir, "already": true}),
            );
            return Ok(Begun::Already(Submitted {
                id,
                job_dir,
                vm_name: vm_name.to_string(),
                bytes: 0,
                already: Some(state),
            }));
        }
    }
    let staging = Staging::create(queue, id).map_err(|e| ExportError::Unreachable(format!("{e:#}")))?;
    tracing::info!(job = %id, vm = %vm_name, staging = %staging.dir().display(), "staging the job");
    Ok(Begun::Staged(staging, id))
}

/// Write the manifest of the staged job (its disks complete and fsynced) and publish it.
pub async fn finish(
    queue: &Queue,
    staging: Staging,
    vm: &VmSource,
    disks: Vec<Disk>,
    stages: Options,
    ctl: &Control,
) -> Result<Submitted, ExportError> {
    let id = staging.id();
    let total = disks.iter().map(|d| d.bytes).sum::<u64>();
    let m = build_manifest(vm, id, disks, stages);
    let cancel = ctl.cancel.clone();
    let job_dir = tokio::task::spawn_blocking(move || staging.publish_unless(&m, &cancel))
        .await
        .map_err(|e| ExportError::Internal(e.to_string()))?
        .map_err(|e| match e {
            PublishError::Cancelled { .. } => ExportError::Interrupted(false),
            e => ExportError::Unreachable(format!("{e:#}")),
        })?;
    if ctl.cancel.load(Ordering::SeqCst) {
        // The signal came while the job was being renamed into place: take it back (withdrawn if
        // no agent has claimed it, else its agent is asked to cancel it). serve's cancel and
        // Ctrl-C mean "not this job".
        let q = queue.clone();
        let asked = tokio::task::spawn_blocking(move || {
            q.request_cancel(&id, "interrupted in hyperexport as it was published")
        })
        .await
        .map_err(|e| ExportError::Internal(e.to_string()))?;
        return match asked {
            Ok(Some(queue::State::Cancelled)) => Err(ExportError::Interrupted(true)),
            Ok(Some(state)) if !state.is_final() => {
                eprintln!("hyperexport: job {id} was claimed as it was published; its agent is asked to cancel it");
                Err(ExportError::Interrupted(true))
            }
            Ok(state) => {
                eprintln!(
                    "hyperexport: job {id} was published as the interrupt arrived and is {}; nothing was cancelled",
                    state.map(|s| s.to_string()).unwrap_or_else(|| "no longer in the queue".into())
                );
                Err(ExportError::Interrupted(false))
            }
            Err(e) => Err(ExportError::Unreachable(format!(
                "interrupted as job {id} was published; cancelling it in {} failed: {e}; cancel it with: hyperctl jobs cancel {id}",
                queue.root().display()
            ))),
        };
    }
    crate::ui::event(
        &serde_json::json!({"event": "published", "job_id": id, "queue": queue.root(), "job_dir": job_dir, "already": false, "bytes": total}),
    );
    Ok(Submitted { id, job_dir, vm_name: vm.name.clone(), bytes: total, already: None })
}

/// A disk entry of the manifest.
fn disk_entry(
    i: usize,
    id: &str,
    format: DiskFormat,
    file_name: &str,
    bytes: u64,
    blake3: &[u8; 32],
    label: String,
) -> Disk {
    Disk {
        id: id.to_string(),
        source_format: format.manifest_name().to_string(),
        bytes,
        local_path: format!("{}/{file_name}", queue::DISKS),
        checksum: None,
        boot_order_hint: Some(i as u32),
        disk_type: Some(if i == 0 { "boot" } else { "data" }.to_string()),
        label: Some(label),
        blake3: Some(to_hex(blake3)),
        extra: Default::default(),
    }
}

/// Copy the VM's disks into a new job in `queue` and publish it.
pub async fn submit(
    queue: &Queue,
    vm: &VmSource,
    stages: Options,
    ctl: Arc<Control>,
    quiet: bool,
) -> Result<Submitted, ExportError> {
    let staging = match begin(queue, &vm.name, &stages).await? {
        Begun::Already(s) => return Ok(s),
        Begun::Staged(staging, _) => staging,
    };
    let mut disks = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let file_name = format!("{}.{}", d.id, d.format.extension());
        let dst = staging.disk_path(&file_name);
        let member = d
            .member
            .as_ref()
            .and_then(|m| vm.expected_member_digests.iter().find(|(name, _)| name == m))
            .map(|(name, dg)| (name.clone(), dg.clone()));
        let copied = copy_with_meter(d, &dst, member.as_ref().map(|(_, dg)| dg.hasher()), &ctl, quiet).await?;
        if let Some((name, dg)) = &member
            && copied.member_hex.as_deref() != Some(dg.hex())
        {
            return Err(ExportError::BadInput(format!(
                "{}: member {}: its {} digest does not match the OVA's manifest (.mf): the OVA is corrupt; download or export it again",
                Esc(&vm.path),
                Esc(name),
                dg.algorithm()
            )));
        }
        hyperfarm_shared::failpoint::hit("export.disk-copied");
        disks.push(disk_entry(i, &d.id, d.format, &file_name, copied.bytes, &copied.blake3, d.label.clone()));
    }
    finish(queue, staging, vm, disks, stages, &ctl).await
}

/// Download a vSphere VM's disks straight into a new job in `queue` (hashed as they arrive) and
/// publish it.
pub async fn submit_vsphere(
    queue: &Queue,
    p: &crate::vsphere::Prepared,
    stages: Options,
    ctl: Arc<Control>,
    quiet: bool,
) -> Result<Submitted, ExportError> {
    let vm = p.source();
    let begun = begin(queue, &vm.name, &stages).await;
    let staging = match begun {
        Err(e) => {
            p.session.close().await;
            return Err(e);
        }
        Ok(Begun::Already(s)) => {
            p.session.close().await;
            return Ok(s);
        }
        Ok(Begun::Staged(staging, _)) => staging,
    };
    let dir = staging.disk_path("");
    let got = p.download(&dir, &staging.id().to_string(), &ctl, quiet).await?;
    let disks = got
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let file_name = g.data.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            disk_entry(i, &g.id, g.format, &file_name, g.data.bytes, &g.data.blake3, g.label.clone())
        })
        .collect();
    finish(queue, staging, &vm, disks, stages, &ctl).await
}

/// This process's cache of all-zero BLAKE3 subtrees (see `hyperfarm_shared::tree_hash`).
pub fn zero_cache() -> std::sync::Arc<hyperfarm_shared::tree_hash::ZeroCache> {
    static CACHE: std::sync::OnceLock<std::sync::Arc<hyperfarm_shared::tree_hash::ZeroCache>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(|| std::sync::Arc::new(hyperfarm_shared::tree_hash::ZeroCache::open_default())).clone()
}

/// Copy one disk on a blocking thread, showing progress.
pub async fn copy_with_meter(
    d: &crate::source::SourceDisk,
    dst: &std::path::Path,
    member: Option<crate::source::ova::MemberHasher>,
    ctl: &Arc<Control>,
    quiet: bool,
) -> Result<copy::Copied, ExportError> {
    ctl.done.store(0, Ordering::Relaxed);
    let mut meter = Meter::new(format!("copying {}", d.id), d.data.len(), quiet).stage("export", &d.id);
    let (data, dst2, ctl2) = (d.data.clone(), dst.to_path_buf(), ctl.clone());
    let cache = zero_cache();
    let task = tokio::task::spawn_blocking(move || copy::copy_disk(&data, &dst2, member, &ctl2, &cache));
    let copied = meter.follow(task, &ctl.done).await;
    let copied = copied.map_err(|e| ExportError::Internal(e.to_string()))?;
    // Copy and digest read the source at different moments: a source written to meanwhile would
    // give a disk that does not match its own digest. Whether the copy worked or failed (a source
    // that shrank ends it early), a changed source is refused.
    if !matches!(&copied, Err(e) if e.kind() == std::io::ErrorKind::Interrupted)
        && let Some(why) = d.data.changed()
    {
        return Err(ExportError::BadInput(format!(
            "disk {} changed while it was being exported: {why}. The VM (or something else) is still writing to it; shut the VM down, or export a snapshot of it, then run hyperexport again. Nothing was published",
            d.id
        )));
    }
    match copied {
        Ok(c) => Ok(c),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Err(ExportError::Interrupted(false)),
        Err(e) => {
            let hint = if e.raw_os_error() == Some(libc::ENOSPC) { " (the queue's file system is full)" } else { "" };
            Err(ExportError::Copy(format!(
                "copying disk {} from {} to {}: {e}{hint}",
                d.id,
                d.data.describe(),
                dst.display()
            )))
        }
    }
}

fn build_manifest(vm: &VmSource, id: JobId, disks: Vec<Disk>, stages: Options) -> Manifest {
    let on = |enabled| Some(Stage { enabled, extra: Default::default() });
    Manifest {
        manifest_version: manifest::MANIFEST_VERSION.to_string(),
        source: Some(Source {
            provider: Some(if vm.kind == "vsphere" { "vsphere" } else { "local" }.into()),
            vm_id: vm.vm_id.clone(),
            vm_name: Some(vm.name.clone()),
            extra: [
                ("path".to_string(), serde_json::Value::String(vm.path.display().to_string())),
                ("kind".to_string(), serde_json::Value::String(vm.kind.to_string())),
            ]
            .into_iter()
            .collect(),
        }),
        vm: Some(VmInfo {
            name: None,
            cpu: vm.cpu.filter(|c| *c >= 1),
            mem_gb: vm.memory_mib.map(|m| m.div_ceil(1024).max(1)),
            firmware: Some(vm.firmware.as_str().to_string()),
            extra: Default::default(),
        }),
        disks,
        pipeline: Some(Pipeline {
            inspect: on(stages.inspect),
            fix: on(stages.fix),
            convert: on(true),
            validate: on(stages.validate),
            engine: stages.engine.map(|e| e.as_str().to_string()),
            extra: Default::default(),
        }),
        output: Some(manifest::Output {
            directory: None,
            format: Some("qcow2".into()),
            filename: None,
            extra: Default::default(),
        }),
        metadata: None,
        hyperfarm: Some(HyperfarmInfo {
            schema_version: manifest::HYPERFARM_SCHEMA_VERSION,
            job_id: id,
            created_at: Some(rfc3339_now()),
            submitted_by: Some(Submitter {
                host: fsx::hostname(),
                pid: std::process::id(),
                user: std::env::var("USER").ok(),
                tool: Some(format!("hyperexport {}", env!("CARGO_PKG_VERSION"))),
            }),
            memory_mib: vm.memory_mib,
            // The source VM's network interfaces (hyper2kvm ignores this object): what a libvirt
            // domain defined from the job gets.
            extra: {
                let mut extra = serde_json::Map::new();
                if !vm.nics.is_empty() {
                    extra.insert("nics".into(), serde_json::to_value(&vm.nics).unwrap_or_default());
                }
                if let Some(g) = &vm.guest {
                    extra.insert("guest".into(), serde_json::Value::String(hyperfarm_shared::text::bounded(g, 128)));
                }
                if let Some(req) = &stages.libvirt {
                    extra.insert(
                        hyperfarm_shared::libvirt::REQUEST_KEY.into(),
                        serde_json::to_value(req).unwrap_or_default(),
                    );
                }
                extra
            },
        }),
        extra: Default::default(),
    }
}

fn rfc3339_now() -> String {
    hyperfarm_shared::timefmt::rfc3339_ms(queue::now_ms())
}
