//! Direct mode: convert on this host with the same worker code the agent runs, publishing into
//! `--output` exactly as an agent publishes into its output directory.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use hyperfarm_shared::JobId;
use hyperfarm_shared::engine::hyper2kvm::Hyper2kvm;
use hyperfarm_shared::engine::{ConvertOptions, EngineChoice, QemuImg};

use hyperfarm_shared::format::DiskFormat;
use hyperfarm_shared::fsx;
use hyperfarm_shared::manifest::Stages;
use hyperfarm_shared::progress::{Phase, Progress};
use hyperfarm_shared::results::{OnExisting, OutputDir, Publication, ResultError, ResultRecord, ResultState};
use hyperfarm_shared::worker::{self, LoadedJob, WorkerSettings};

use crate::ExportError;
use crate::copy::Control;
use crate::source::{DiskData, VmSource};
use crate::submit::copy_with_meter;
use crate::ui::Meter;

pub struct DirectParams {
    pub output: OutputDir,
    pub qemu_img: std::path::PathBuf,
    pub on_existing: OnExisting,
    pub quiet: bool,
    pub engine: EngineChoice,
    pub hyper2kvm_path: std::path::PathBuf,
    pub stages: Stages,
}

/// Convert `vm` into `params.output`. Whole-file disks are read in place; disks inside an OVA or
/// spread over VMDK extents are first copied into the work area.
pub async fn convert(
    vm: &VmSource,
    params: &DirectParams,
    ctl: Arc<Control>,
    cancel: CancellationToken,
) -> Result<ResultRecord, ExportError> {
    let out = params.output.clone();
    let unreachable = |e: std::io::Error| {
        ExportError::Unreachable(format!(
            "cannot use the output directory {}: {e}; create it and make it writable",
            params.output.path().display()
        ))
    };
    tokio::task::spawn_blocking({
        let out = out.clone();
        move || out.init()
    })
    .await
    .map_err(|e| ExportError::Internal(e.to_string()))?
    .map_err(unreachable)?;

    let id = JobId::new();
    let token = format!("direct-{}", hyperfarm_shared::queue::claim_token());
    let names: Vec<String> = vm
        .disks
        .iter()
        .enumerate()
        .map(|(i, d)| hyperfarm_shared::results::disk_file_name(&vm.name, &d.id, i == 0))
        .collect();
    out.check_free(&vm.name, &names, params.on_existing).map_err(|e| ExportError::Conflict(e.to_string()))?;
    let publication = Publication::begin(&out, id, &token).map_err(unreachable)?;
    let staged = publication.work_dir().join("sources");
    std::fs::create_dir_all(&staged).map_err(unreachable)?;

    let mut disks = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        // Read in place where possible; disks inside an OVA or spread over VMDK extents are copied
        // into the work area first. Nothing crossed a queue, so there is no digest to verify.
        let (path, format, file) = match &d.data {
            // The descriptor opened (and checked) when the VM was read: never re-opened by name.
            DiskData::File { src, .. } => {
                let file = src.file.try_clone().map_err(|e| ExportError::Internal(e.to_string()))?;
                (src.path.clone(), d.format, file)
            }
            _ => {
                let dst = staged.join(format!("{}.{}", d.id, d.format.extension()));
                copy_with_meter(d, &dst, None, &ctl, params.quiet).await?;
                let fmt = if matches!(d.data, DiskData::Concat { .. }) { DiskFormat::Raw } else { d.format };
                let file = fsx::open_regular(&dst).map_err(unreachable)?;
                (dst, fmt, file)
            }
        };
        let expected = None;
        let bytes = file.metadata().map(|m| m.len()).unwrap_or(0);
        let stamp = fsx::Stamp::of_file(&file).map_err(unreachable)?;
        disks.push(worker::SourceDisk { id: d.id.clone(), format, bytes, path, file, expected, boot: i == 0, stamp });
    }
    let job = LoadedJob {
        id,
        vm_name: vm.name.clone(),
        disks,
        stages: params.stages,
        engine: None,
        manifest: None,
        seed_drop: false,
    };
    let hyper2kvm = match params.engine {
        EngineChoice::QemuImg => Err("the engine is qemu-img".to_string()),
        _ => Hyper2kvm::probe(&params.hyper2kvm_path, None).await,
    };
    if let (EngineChoice::Hyper2kvm, Err(e)) = (params.engine, &hyper2kvm) {
        publication.discard();
        return Err(ExportError::Unreachable(format!("--engine hyper2kvm: {e} (give --hyper2kvm-path)")));
    }
    // The operator's own VM on the operator's own host: confined where Landlock works, else run
    // with a warning.
    hyperfarm_shared::engine::sandbox::set_required(false);
    let settings = WorkerSettings {
        qemu: QemuImg::new(&params.qemu_img),
        convert: ConvertOptions::default(),
        allowed_source_dirs: vm.path.parent().map(|p| vec![p.to_path_buf()]).unwrap_or_default(),
        path_map: Vec::new(),
        engine: params.engine,
        hyper2kvm,
        zero_cache: crate::submit::zero_cache(),
        verify: Default::default(),
        max_virtual_size: hyperfarm_shared::engine::inspect::MAX_VIRTUAL_SIZE,
    };
    tracing::info!(engine = %settings.default_engine(), "converting on this host");
    let (tx, mut rx) = watch::channel(Progress::phase(Phase::Verifying, 0));
    let quiet = params.quiet;
    let label = format!("converting {}", vm.name);
    let ui = tokio::spawn(async move {
        let mut meter = Meter::new(label, 1000, quiet).stage("convert", "local");
        while rx.changed().await.is_ok() {
            let p = rx.borrow_and_update().clone();
            meter.set_percent(p.phase.as_str(), p.percent);
        }
    });
    let started_at_ms = hyperfarm_shared::queue::now_ms();
    let converted = worker::convert_job(&settings, &job, publication.work_dir(), &tx, &cancel).await;
    drop(tx);
    let _ = ui.await;
    let _ = std::fs::remove_dir_all(&staged);
    // Read in place: a source written to during the conversion gave an output of no defined moment.
    if let Some((id, why)) = vm.disks.iter().find_map(|d| d.data.changed().map(|w| (&d.id, w))) {
        publication.discard();
        return Err(ExportError::BadInput(format!(
            "disk {id} changed while it was being converted: {why}. The VM (or something else) is still writing to it; shut the VM down, or convert a snapshot of it, then run hyperexport again. Nothing was published"
        )));
    }
    let converted = match converted {
        Ok(c) => c,
        Err(f) => {
            publication.discard();
            return Err(if f.cancelled { ExportError::Interrupted(false) } else { ExportError::Conversion(f.message) });
        }
    };
    let record = ResultRecord {
        job_id: id,
        state: ResultState::Done,
        vm_name: vm.name.clone(),
        files: converted.files,
        error_file: None,
        error: None,
        archived: vec![],
        engine: converted.engine.to_string(),
        agent: format!("hyperexport-direct@{}", fsx::hostname()),
        host: fsx::hostname(),
        token,
        attempts: 1,
        started_at_ms,
        finished_at_ms: hyperfarm_shared::queue::now_ms(),
        libvirt: None,
    };
    let policy = params.on_existing;
    tokio::task::spawn_blocking(move || publication.publish(record, None, policy, || true))
        .await
        .map_err(|e| ExportError::Internal(e.to_string()))?
        .map_err(|e| match e {
            ResultError::Conflict { .. } => ExportError::Conflict(e.to_string()),
            other => ExportError::Unreachable(other.to_string()),
        })
}
