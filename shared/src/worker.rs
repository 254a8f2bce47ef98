//! The conversion of one job, shared by the agent and hyperexport's direct mode:
//! load and validate → verify digests → inspect images → convert → check.
//! Publishing the result is the caller's (see [`crate::results::Publication`]).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::digest;
use crate::engine::hyper2kvm::{self, Hyper2kvm};
use crate::engine::{self, ConvertOptions, EngineChoice, EngineError, EngineKind, ImageInfo, QemuImg};
use crate::format::{DiskFormat, Sniffed};
use crate::fsx;
use crate::jobid::JobId;
use crate::manifest::{CheckedManifest, Expected, Manifest, Stages};
use crate::progress::{Phase, Progress};
use crate::queue::MANIFEST;
use crate::results::{ResultFile, disk_file_name};

/// How the worker converts.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub qemu: QemuImg,
    pub convert: ConvertOptions,
    /// Canonical directories that seed-style manifests may point into.
    pub allowed_source_dirs: Vec<PathBuf>,
    /// How absolute paths in seed-style manifests written on other hosts map to this host's
    /// mounts: (prefix as the writer sees it, the same directory here).
    pub path_map: Vec<(PathBuf, PathBuf)>,
    /// The engine jobs get unless they choose.
    pub engine: EngineChoice,
    /// A usable hyper2kvm, or why there is none.
    pub hyper2kvm: Result<Hyper2kvm, String>,
    /// Chaining values of all-zero subtrees, for verifying sparse disks quickly.
    pub zero_cache: Arc<crate::tree_hash::ZeroCache>,
    /// When the digests are checked relative to the conversion.
    pub verify: VerifyMode,
    /// Largest virtual disk accepted.
    pub max_virtual_size: u64,
}

/// When a job's digests are checked (docs/performance.md measures both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// While the disks convert: the source is read from the disk once (the second reader finds it
    /// in the page cache). A failed check stops the conversion, whose output is never published.
    #[default]
    Alongside,
    /// Before the conversion starts: a damaged job never starts the engine, at the price of a
    /// second pass over the data when it does not fit in the page cache.
    Before,
}

impl VerifyMode {
    pub fn parse(s: &str) -> Option<VerifyMode> {
        match s {
            "alongside" => Some(VerifyMode::Alongside),
            "before" => Some(VerifyMode::Before),
            _ => None,
        }
    }
}

/// One disk of a loaded job, open for reading.
#[derive(Debug)]
pub struct SourceDisk {
    pub id: String,
    pub format: DiskFormat,
    pub bytes: u64,
    /// Where it really is.
    pub path: PathBuf,
    /// Open, verified regular file. qemu-img reads it through `/proc/<pid>/fd/<n>`, so a file
    /// swapped after our checks is never what gets converted.
    pub file: File,
    pub expected: Option<Expected>,
    pub boot: bool,
    /// What the file looked like when it was opened (a write since shows here).
    pub stamp: crate::fsx::Stamp,
}

/// A job ready to convert.
#[derive(Debug)]
pub struct LoadedJob {
    pub id: JobId,
    pub vm_name: String,
    pub disks: Vec<SourceDisk>,
    pub stages: Stages,
    pub engine: Option<String>,
    /// The manifest (absent for hyperexport's direct mode, which has none).
    pub manifest: Option<Manifest>,
    pub seed_drop: bool,
}

impl LoadedJob {
    pub fn total_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.bytes).sum()
    }
    /// The names this job will publish, boot disk first.
    pub fn output_names(&self) -> Vec<String> {
        self.disks.iter().map(|d| disk_file_name(&self.vm_name, &d.id, d.boot)).collect()
    }
}

/// A job that cannot be converted: the text an operator reads in `<vm>.error`.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFailure {
    /// The VM name if the manifest gave a valid one.
    pub vm_name: Option<String>,
    pub cancelled: bool,
    /// First line a summary, then details and what to do.
    pub message: String,
}

impl JobFailure {
    pub fn new(vm_name: Option<&str>, message: impl Into<String>) -> Self {
        JobFailure { vm_name: vm_name.map(str::to_string), cancelled: false, message: message.into() }
    }
    pub fn cancelled(vm_name: Option<&str>, reason: &str) -> Self {
        JobFailure { vm_name: vm_name.map(str::to_string), cancelled: true, message: format!("cancelled: {reason}") }
    }
}

impl std::fmt::Display for JobFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Load and validate the job in `job_dir` (native: disks inside the job; seed drop: disks under
/// the allowed source directories).
pub fn load_job(
    job_dir: &Path,
    id: JobId,
    allowed_source_dirs: &[PathBuf],
    path_map: &[(PathBuf, PathBuf)],
) -> Result<LoadedJob, JobFailure> {
    let manifest_path = job_dir.join(MANIFEST);
    let fail = |vm: Option<&str>, msg: String| JobFailure::new(vm, msg);
    let bytes = crate::queue::read_manifest(job_dir)
        .map_err(|e| fail(None, format!("cannot read the manifest {}: {e}", manifest_path.display())))?;
    let manifest = Manifest::parse(&bytes)
        .map_err(|e| fail(None, format!("invalid manifest {}: {e}", manifest_path.display())))?;
    let vm_hint = manifest.vm_name().filter(|n| crate::names::check_vm_name(n).is_ok()).map(str::to_string);
    let checked: CheckedManifest = manifest
        .check()
        .map_err(|e| fail(vm_hint.as_deref(), format!("invalid manifest {}: {e}", manifest_path.display())))?;
    let vm = Some(checked.vm_name.as_str());
    // A seed drop is a job the agent ingested (origin.json) from a manifest that is not ours (no
    // `hyperfarm` section): a native job that carries a forged origin.json stays native.
    let seed_drop = crate::queue::has_origin(job_dir) && manifest.hyperfarm.is_none();
    if !seed_drop
        && let Some(declared) = checked.job_id
        && declared != id
    {
        return Err(fail(
            vm,
            format!(
                "the manifest's job id {declared} does not match its job directory {}; the job was copied or altered",
                job_dir.display()
            ),
        ));
    }
    let mut disks = Vec::with_capacity(checked.disks.len());
    for d in &checked.disks {
        let (path, file) = if seed_drop {
            let mapped = map_path(&d.local_path, path_map);
            open_seed_disk(job_dir, &mapped, allowed_source_dirs).map_err(|e| {
                if mapped == d.local_path {
                    e
                } else {
                    format!("{e} (path_map turned {} into it)", crate::text::Esc(&d.local_path))
                }
            })
        } else {
            fsx::open_beneath(job_dir, Path::new(&d.local_path)).map(|f| (job_dir.join(&d.local_path), f)).map_err(
                |e| format!("local_path {:?} must name a regular file inside the job directory ({e})", d.local_path),
            )
        }
        .map_err(|e| fail(vm, format!("disk {}: {e}", d.id)))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size != d.bytes {
            return Err(fail(
                vm,
                format!(
                    "disk {}: the manifest says {} bytes but {} has {size} bytes; the export is incomplete or the manifest is wrong — re-export the VM",
                    d.id,
                    d.bytes,
                    path.display()
                ),
            ));
        }
        let stamp = crate::fsx::Stamp::of_file(&file).map_err(|e| fail(vm, format!("disk {}: {e}", d.id)))?;
        disks.push(SourceDisk {
            id: d.id.clone(),
            format: d.format,
            bytes: d.bytes,
            path,
            file,
            expected: d.expected,
            boot: d.boot,
            stamp,
        });
    }
    Ok(LoadedJob {
        id,
        vm_name: checked.vm_name,
        disks,
        stages: checked.stages,
        engine: checked.engine,
        manifest: Some(manifest),
        seed_drop,
    })
}

/// An absolute `local_path` written on a host that mounts the share elsewhere, as this host sees
/// it: the longest matching prefix of `path_map` replaced (whole path components only).
pub fn map_path(local_path: &str, path_map: &[(PathBuf, PathBuf)]) -> String {
    let p = Path::new(local_path);
    let best = path_map.iter().filter(|(from, _)| p.starts_with(from)).max_by_key(|(from, _)| from.as_os_str().len());
    match best {
        Some((from, to)) => to.join(p.strip_prefix(from).expect("it starts with it")).display().to_string(),
        None => local_path.to_string(),
    }
}

/// A seed-style drop's disk: absolute, or relative to the watch directory (where the drop was),
/// and below one of the allowed source directories, opened without crossing a symlink. The
/// queue's own directories (jobs, staging, rejected drops) are never a seed drop's: a drop must not
/// make the agent convert another job's disks under a name of its choosing.
fn open_seed_disk(job_dir: &Path, local_path: &str, allowed: &[PathBuf]) -> Result<(PathBuf, File), String> {
    let watch_dir = job_dir.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
    let p = Path::new(local_path);
    let full = if p.is_absolute() { p.to_path_buf() } else { watch_dir.join(p) };
    let protocol: Vec<&str> = crate::queue::State::ALL
        .iter()
        .map(|s| s.dir_name())
        .chain([crate::queue::TMP, crate::queue::REJECTED])
        .collect();
    let inside_jobs = |d: &str| {
        format!(
            "local_path {} is inside the queue's {d}/ directory; a seed-style manifest may only point at disks it exported itself (a directory of its own under the watch directory, or one of allowed_source_dirs), never into the queue's job directories",
            crate::text::Esc(&full)
        )
    };
    // By name first (the job it names may have moved on since), then by where it really is.
    let lexical: PathBuf = full.components().collect();
    if let Some(d) = protocol.iter().find(|d| lexical.starts_with(watch_dir.join(d))) {
        return Err(inside_jobs(d));
    }
    let canon = std::fs::canonicalize(&full).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "local_path {} does not exist on this host; if the manifest was written on a host that mounts the share elsewhere, map that mount point with path_map = [\"<its path>=<this host's path>\"] (--path-map)",
                crate::text::Esc(&full)
            )
        } else {
            format!("local_path {}: {e}", crate::text::Esc(&full))
        }
    })?;
    if let Ok(watch) = std::fs::canonicalize(watch_dir)
        && let Some(d) = protocol.iter().find(|d| canon.starts_with(watch.join(d)))
    {
        return Err(inside_jobs(d));
    }
    let Some(root) = allowed.iter().find(|r| canon.starts_with(r)) else {
        return Err(format!(
            "local_path {} is outside the allowed source directories ({}); add its directory to allowed_source_dirs in the agent's configuration (or, if it was written on a host that mounts the share elsewhere, map that mount point with path_map = [\"<its path>=<this host's path>\"])",
            crate::text::Esc(&full),
            allowed.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
    };
    let rel = canon.strip_prefix(root).map_err(|e| e.to_string())?;
    let file = fsx::open_beneath(root, rel).map_err(|e| format!("local_path {}: {e}", full.display()))?;
    Ok((canon, file))
}

/// Report progress to a watch channel (the latest value wins; readers never block the worker).
pub type ProgressTx = watch::Sender<Progress>;

fn send(tx: &ProgressTx, p: Progress) {
    tx.send_replace(p);
}

/// What an engine produced, ready to publish.
#[derive(Debug, Clone)]
pub struct Converted {
    pub files: Vec<ResultFile>,
    pub engine: EngineKind,
}

impl WorkerSettings {
    /// The engine a job gets when it does not choose.
    pub fn default_engine(&self) -> EngineKind {
        match (self.engine, &self.hyper2kvm) {
            (EngineChoice::QemuImg, _) => EngineKind::QemuImg,
            (_, Ok(_)) => EngineKind::Hyper2kvm,
            _ => EngineKind::QemuImg,
        }
    }
}

/// Choose the engine for `job` (its `pipeline.engine`, else the agent's choice) and check that this
/// host can run every stage it asks for — before any work starts.
pub fn choose_engine(settings: &WorkerSettings, job: &LoadedJob) -> Result<EngineKind, JobFailure> {
    let vm = Some(job.vm_name.as_str());
    let (choice, whose) = match job.engine.as_deref().and_then(EngineChoice::parse) {
        Some(c) => (c, "the job's pipeline.engine"),
        None => (settings.engine, "the agent's engine setting"),
    };
    let needs = |stage: &str| {
        format!("the job asks for the {stage} stage (pipeline.{stage}.enabled), which only the hyper2kvm engine runs")
    };
    let kind = match choice {
        EngineChoice::QemuImg => {
            for (on, stage) in [(job.stages.inspect, "inspect"), (job.stages.fix, "fix")] {
                if on {
                    return Err(JobFailure::new(
                        vm,
                        format!(
                            "{}, but {whose} is qemu-img; remove the stage or choose the hyper2kvm engine",
                            needs(stage)
                        ),
                    ));
                }
            }
            EngineKind::QemuImg
        }
        EngineChoice::Hyper2kvm => match &settings.hyper2kvm {
            Ok(_) => EngineKind::Hyper2kvm,
            Err(why) => {
                return Err(JobFailure::new(
                    vm,
                    format!(
                        "{whose} is hyper2kvm, which is not usable on this host ({why}); install it (pip install 'hyper2kvm[ui,daemon]==0.2.1' requests) and set hyper2kvm_path, or choose qemu-img"
                    ),
                ));
            }
        },
        EngineChoice::Auto => match &settings.hyper2kvm {
            Ok(_) => EngineKind::Hyper2kvm,
            Err(why) if job.stages.inspect || job.stages.fix => {
                let stage = if job.stages.fix { "fix" } else { "inspect" };
                return Err(JobFailure::new(
                    vm,
                    format!("{}, and hyper2kvm is not usable on this host ({why})", needs(stage)),
                ));
            }
            Err(_) => EngineKind::QemuImg,
        },
    };
    if kind == EngineKind::Hyper2kvm
        && job.stages.fix
        && let Ok(h) = &settings.hyper2kvm
        && let Err(why) = h.caps.can_fix()
    {
        return Err(JobFailure::new(
            vm,
            format!(
                "the job asks for hyper2kvm's fix stage (pipeline.fix.enabled), which needs root, the nbd kernel module and qemu-nbd (or libguestfs); {why}. Nothing was started: disable the fix stage, or run the job on a conversion host that can fix guests"
            ),
        ));
    }
    Ok(kind)
}

/// Verify, inspect, convert and check every disk of `job` into `work_dir` (named with their
/// final names), with the engine [`choose_engine`] picks.
pub async fn convert_job(
    settings: &WorkerSettings,
    job: &LoadedJob,
    work_dir: &Path,
    progress: &ProgressTx,
    cancel: &CancellationToken,
) -> Result<Converted, JobFailure> {
    let vm = Some(job.vm_name.as_str());
    let engine = choose_engine(settings, job)?;
    let t0 = std::time::Instant::now();
    let ms = || t0.elapsed().as_millis() as u64;
    send(progress, Progress::phase(Phase::Verifying, job.total_bytes()));
    let infos = inspect_all(settings, job, cancel).await?;
    tracing::debug!(ms = ms(), "inspected");
    let total_virtual: u64 = infos.iter().map(|i| i.virtual_size).sum::<u64>().max(1);
    // By default verification and conversion run together (reading the source once from the
    // disk, the second time from the page cache); a failed verification stops the conversion, and
    // its output is never published.
    if settings.verify == VerifyMode::Before {
        let r = verify_all(settings, job, cancel).await;
        tracing::debug!(ms = ms(), ok = r.is_ok(), "verified");
        r?;
    }
    // The moment between the checks and the engine opening the sources (races are tested here).
    crate::failpoint::hit("agent.inspected");
    // Each stops the other: a failed verification the conversion, a failed conversion the
    // verification (whose result no longer matters).
    let (convert_cancel, verify_cancel) = (cancel.child_token(), cancel.child_token());
    let verify = async {
        if settings.verify == VerifyMode::Before {
            return Ok(());
        }
        let r = verify_all(settings, job, &verify_cancel).await;
        tracing::debug!(ms = ms(), ok = r.is_ok(), "verified");
        if r.is_err() {
            convert_cancel.cancel();
        }
        r
    };
    let convert = async {
        let r = match engine {
            EngineKind::QemuImg => convert_qemu_img(settings, job, &infos, work_dir, progress, &convert_cancel).await,
            EngineKind::Hyper2kvm => match settings.hyper2kvm.as_ref() {
                Ok(h) => convert_hyper2kvm(h, job, work_dir, progress, &convert_cancel).await,
                Err(why) => Err(JobFailure::new(vm, why.clone())),
            },
        };
        tracing::debug!(ms = ms(), ok = r.is_ok(), %engine, "converted");
        if r.is_err() && !convert_cancel.is_cancelled() {
            verify_cancel.cancel();
        }
        r
    };
    let (verified, converted) = tokio::join!(verify, convert);
    let converted = match converted {
        // The conversion failed on its own and stopped the verification: its error is the job's.
        Err(e) if verify_cancel.is_cancelled() && !cancel.is_cancelled() => return Err(e),
        c => c,
    };
    verified?;
    crate::failpoint::hit("agent.verified");
    let outputs = converted?;
    // Nothing may have changed a source while it was read: its timestamps and size (any write
    // moves them) and its head (where a qcow2 keeps its backing and data file names) are what
    // was inspected, or the output, read at no defined moment, is discarded.
    for (disk, info) in job.disks.iter().zip(&infos) {
        let now_head = crate::engine::inspect::read_head(&disk.file);
        let changed = disk.stamp.changed(&disk.file).or_else(|| match &now_head {
            Ok(h) if *h == info.head => None,
            Ok(_) => Some("its header was rewritten".to_string()),
            Err(e) => Some(format!("it can no longer be read ({e})")),
        });
        if let Some(why) = changed {
            return Err(JobFailure::new(
                vm,
                format!(
                    "disk {}: the source changed while it was converted ({why}); the output was discarded. A job's files must not change once it is published: export the VM again\nfile: {}",
                    disk.id,
                    crate::text::Esc(&disk.path)
                ),
            ));
        }
    }

    crate::failpoint::hit("agent.converted");
    // Check every output, whatever produced it.
    let mut files = Vec::new();
    for (i, ((disk, info), (name, dst))) in job.disks.iter().zip(&infos).zip(&outputs).enumerate() {
        send(
            progress,
            Progress {
                phase: Phase::Checking,
                percent: i as f64 * 100.0 / outputs.len() as f64,
                bytes_total: total_virtual,
                disk: Some(disk.id.clone()),
                ..Default::default()
            },
        );
        if cancel.is_cancelled() {
            return Err(JobFailure::cancelled(vm, "stopped while checking"));
        }
        settings.qemu.check(dst).await.map_err(|e| {
            engine_failure(vm, &format!("checking the converted disk {}", disk.id), &disk.path, work_dir, e)
        })?;
        // The qcow2 header holds the virtual size (big-endian u64 at byte 24); `qemu-img check`
        // above has just vouched for that header.
        let out_virtual = qcow2_virtual_size(dst)
            .map_err(|e| JobFailure::new(vm, format!("reading the converted disk {}: {e}", disk.id)))?;
        if out_virtual != info.virtual_size {
            return Err(JobFailure::new(
                vm,
                format!(
                    "disk {}: the {engine} engine produced a qcow2 of {out_virtual} bytes (virtual) from a source of {} bytes; not publishing it",
                    disk.id, info.virtual_size
                ),
            ));
        }
        let bytes = std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0);
        files.push(ResultFile {
            disk_id: disk.id.clone(),
            name: name.clone(),
            boot: disk.boot,
            bytes,
            virtual_size: info.virtual_size,
            ino: 0,
        });
    }
    crate::failpoint::hit("agent.checked");
    tracing::debug!(ms = ms(), "checked");
    Ok(Converted { files, engine })
}

/// The built-in engine: `qemu-img convert` per disk with its `-p` progress.
async fn convert_qemu_img(
    settings: &WorkerSettings,
    job: &LoadedJob,
    infos: &[ImageInfo],
    work_dir: &Path,
    progress: &ProgressTx,
    cancel: &CancellationToken,
) -> Result<Vec<(String, PathBuf)>, JobFailure> {
    let vm = Some(job.vm_name.as_str());
    let total_virtual: u64 = infos.iter().map(|i| i.virtual_size).sum::<u64>().max(1);
    let mut done_virtual = 0u64;
    let mut outputs = Vec::new();
    for (disk, info) in job.disks.iter().zip(infos) {
        let name = disk_file_name(&job.vm_name, &disk.id, disk.boot);
        let dst = work_dir.join(&name);
        let real = disk.path.display().to_string();
        let src = qemu_source(disk, &real);
        let base = done_virtual;
        let mut last = Progress::phase(Phase::Converting, total_virtual);
        last.disk = Some(disk.id.clone());
        send(progress, last.clone());
        let _flusher = crate::fsx::Flusher::start(dst.clone());
        let confine = info.confinement(&disk.path).write(work_dir);
        let res = settings
            .qemu
            .convert(
                src,
                disk.format,
                &dst,
                &settings.convert,
                &confine,
                Some(&work_dir.join(".engine-qemu-img.json")),
                cancel,
                |pct| {
                    let done = base + (info.virtual_size as f64 * pct / 100.0) as u64;
                    last.bytes_done = done;
                    last.percent = done as f64 * 100.0 / total_virtual as f64;
                    send(progress, last.clone());
                },
            )
            .await;
        if let Err(e) = res {
            let _ = std::fs::remove_file(&dst);
            return Err(engine_failure(vm, &format!("converting disk {}", disk.id), &disk.path, work_dir, e));
        }
        done_virtual += info.virtual_size;
        outputs.push((name, dst));
    }
    Ok(outputs)
}

/// The hyper2kvm engine: one `hyper2kvm --manifest` run in a private directory inside the work
/// area (same file system, so its outputs move into place by rename), removed afterwards.
async fn convert_hyper2kvm(
    h: &Hyper2kvm,
    job: &LoadedJob,
    work_dir: &Path,
    progress: &ProgressTx,
    cancel: &CancellationToken,
) -> Result<Vec<(String, PathBuf)>, JobFailure> {
    let vm = Some(job.vm_name.as_str());
    let vm_facts = job
        .manifest
        .as_ref()
        .and_then(|m| m.vm.as_ref())
        .map(|v| {
            let mut o = serde_json::Map::new();
            if let Some(c) = v.cpu {
                o.insert("cpu".into(), c.into());
            }
            if let Some(m) = v.mem_gb {
                o.insert("mem_gb".into(), m.into());
            }
            if let Some(f) = &v.firmware {
                o.insert("firmware".into(), f.clone().into());
            }
            serde_json::Value::Object(o)
        })
        .unwrap_or_else(|| serde_json::json!({}));
    let spec = hyper2kvm::RunSpec {
        vm_name: job.vm_name.clone(),
        disks: job
            .disks
            .iter()
            .map(|d| hyper2kvm::RunDisk {
                id: d.id.clone(),
                source_format: d.format.manifest_name(),
                bytes: d.bytes,
                // hyper2kvm resolves relative paths against its own working directory.
                path: std::path::absolute(&d.path).unwrap_or_else(|_| d.path.clone()),
                boot: d.boot,
            })
            .collect(),

        stages: job.stages,
        vm: vm_facts,
        dir: work_dir.join(".hyper2kvm"),
    };
    send(progress, Progress::phase(Phase::Converting, 0));
    let result = hyper2kvm::run(h, &spec, cancel, progress).await;
    let outcome = match result {
        Ok(()) => {
            let mut outputs = Vec::new();
            for d in &job.disks {
                let name = disk_file_name(&job.vm_name, &d.id, d.boot);
                let dst = work_dir.join(&name);
                if let Err(e) = std::fs::rename(spec.output_of(&d.id), &dst) {
                    hyper2kvm::clean(&spec);
                    return Err(JobFailure::new(vm, format!("moving hyper2kvm's output for disk {}: {e}", d.id)));
                }
                outputs.push((name, dst));
            }
            Ok(outputs)
        }
        Err(hyper2kvm::RunError::Failed(text)) => Err(JobFailure::new(vm, text)),
        Err(hyper2kvm::RunError::Engine(e)) => {
            let source = job.disks.first().map(|d| d.path.clone()).unwrap_or_default();
            Err(engine_failure(vm, "converting with hyper2kvm", &source, work_dir, e))
        }
    };
    hyper2kvm::clean(&spec);
    outcome
}

/// Inspect every image (its own headers, then `qemu-img info` and `check`). Returns each disk's
/// image info, in order.
pub async fn inspect_all(
    settings: &WorkerSettings,
    job: &LoadedJob,
    cancel: &CancellationToken,
) -> Result<Vec<ImageInfo>, JobFailure> {
    let vm = Some(job.vm_name.as_str());
    let mut infos = Vec::new();
    for disk in &job.disks {
        if cancel.is_cancelled() {
            return Err(JobFailure::cancelled(vm, "stopped while inspecting"));
        }
        let allowed: Vec<PathBuf> = if job.seed_drop {
            settings.allowed_source_dirs.clone()
        } else {
            disk.path.parent().map(|p| vec![p.to_path_buf()]).unwrap_or_default()
        };
        let real = disk.path.display().to_string();
        let info = engine::inspect_image(
            &settings.qemu,
            &disk.file,
            qemu_source(disk, &real),
            &disk.path,
            disk.format,
            &allowed,
            job.seed_drop,
            settings.max_virtual_size,
        )
        .await
        .map_err(|e| JobFailure::new(vm, format!("disk {} ({}): {e}", disk.id, disk.path.display())))?;
        infos.push(info);
    }
    Ok(infos)
}

/// Verify every disk's digest (blake3 through the tree, a thread per core, sha256 for seed-style
/// manifests). The conversion runs at the same time; a mismatch discards its output.
pub async fn verify_all(
    settings: &WorkerSettings,
    job: &LoadedJob,
    cancel: &CancellationToken,
) -> Result<(), JobFailure> {
    let vm = Some(job.vm_name.as_str());
    for disk in &job.disks {
        let Some(expected) = disk.expected else { continue };
        let file = disk.file.try_clone().map_err(|e| JobFailure::new(vm, format!("disk {}: {e}", disk.id)))?;
        let (cancel2, cache) = (cancel.clone(), settings.zero_cache.clone());
        let verdict =
            tokio::task::spawn_blocking(move || digest::verify(&file, &expected, &cache, |_| !cancel2.is_cancelled()))
                .await
                .map_err(|e| JobFailure::new(vm, format!("disk {}: verification crashed: {e}", disk.id)))?;
        match verdict {
            Ok(Ok(())) => {}
            Ok(Err(actual)) => {
                return Err(JobFailure::new(
                    vm,
                    format!(
                        "disk {}: {} digest mismatch: the disk in the queue is corrupt or was changed after export\n\
                         file: {}\nexpected: {}\nactual:   {}\nwhat to do: export the VM again",
                        disk.id,
                        expected.algorithm(),
                        disk.path.display(),
                        expected.hex(),
                        actual
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                return Err(JobFailure::cancelled(vm, "stopped while verifying"));
            }
            Err(e) => {
                return Err(JobFailure::new(vm, format!("disk {}: cannot read {}: {e}", disk.id, disk.path.display())));
            }
        }
    }
    Ok(())
}

/// How qemu-img gets a source disk: our own open, verified descriptor (as its standard input, so
/// the file we verified is the file converted), except for VMDK text descriptors, whose extents
/// qemu-img resolves relative to the descriptor's real directory.
pub fn qemu_source<'a>(disk: &'a SourceDisk, real_path: &'a str) -> crate::engine::qemu_img::Source<'a> {
    let descriptor =
        disk.format == DiskFormat::Vmdk && matches!(crate::format::sniff(&disk.file), Ok(Sniffed::VmdkDescriptor));
    if descriptor {
        crate::engine::qemu_img::Source::Path(real_path)
    } else {
        crate::engine::qemu_img::Source::Fd(&disk.file)
    }
}

/// Turn an engine error into the text of `<vm>.error`.
pub fn engine_failure(vm: Option<&str>, doing: &str, source: &Path, work_dir: &Path, e: EngineError) -> JobFailure {
    match e {
        EngineError::Cancelled => JobFailure::cancelled(vm, &format!("stopped while {doing}")),
        EngineError::Failed { ref stderr, .. } if stderr.contains("No space left on device") => {
            let free = fsx::free_bytes(work_dir).map(|b| format!("{b} bytes free")).unwrap_or_default();
            JobFailure::new(
                vm,
                format!(
                    "{doing}: the output file system is full ({free} in {}); the partial output was removed. Free space, then submit the job again\n{e}",
                    work_dir.display()
                ),
            )
        }
        other => JobFailure::new(vm, format!("{doing} ({}): {other}", source.display())),
    }
}

/// The virtual size recorded in a qcow2 file's header.
fn qcow2_virtual_size(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 32];
    File::open(path)?.read_exact_at(&mut head, 0)?;
    if &head[..4] != crate::format::QCOW2_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a qcow2 file"));
    }
    Ok(u64::from_be_bytes(head[24..32].try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_paths_from_another_mount_point_are_mapped() {
        let map = vec![
            (PathBuf::from("/mnt/A"), PathBuf::from("/srv/share")),
            (PathBuf::from("/mnt/A/queue/special"), PathBuf::from("/data/special")),
        ];
        assert_eq!(map_path("/mnt/A/queue/exports/d.raw", &map), "/srv/share/queue/exports/d.raw");
        assert_eq!(map_path("/mnt/A/queue/special/d.raw", &map), "/data/special/d.raw", "the longest prefix wins");
        assert_eq!(map_path("/mnt/AB/d.raw", &map), "/mnt/AB/d.raw", "whole components only");
        assert_eq!(map_path("exports/d.raw", &map), "exports/d.raw");
    }
}
