//! Results in the output directory: the seed's contract plus a record per job.
//!
//! ```text
//! <output-dir>/
//!   <vm>.qcow2                 the boot disk (success)
//!   <vm>~<disk-id>.qcow2       every other disk, in place before <vm>.qcow2 appears
//!   <vm>.error                 a readable message, first line a summary (failure, cancel)
//!   .hyperfarm/results/<job-id>.json   the result record: which job, which files, what error
//!   .hyperfarm/tmp/<job-id>@<token>/   an agent's work area for one attempt
//! ```
//!
//! Publication order: outputs complete and checked in the work area → final names linked (never
//! replacing a disk image; data disks first, boot disk last) → the record linked last. A waiting
//! exporter looks only for its job's record, so an older `<vm>.qcow2` or `<vm>.error` is never
//! taken for its result. Every step is idempotent, so a publication interrupted by a crash is
//! completed by whoever recovers the job.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsx;
use crate::jobid::JobId;

/// Our area inside the output directory.
pub const AREA: &str = ".hyperfarm";
/// Largest result record we read (records carry the full error text, which is bounded).
pub const MAX_RECORD: u64 = 1 << 20;
/// The record's name inside a work area while it is being published.
const RECORD: &str = "record.json";

/// The final state of a job, as its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultState {
    Done,
    Failed,
    Cancelled,
}

/// One published file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultFile {
    pub disk_id: String,
    /// File name inside the output directory.
    pub name: String,
    pub boot: bool,
    /// Size of the qcow2 file.
    pub bytes: u64,
    /// The disk's virtual size.
    pub virtual_size: u64,
    /// The published file's inode number (as the file server numbers it: the same on every NFS or
    /// GlusterFS client). With `on_existing = "archive"` a later job of the same VM moves this
    /// file aside; readers find it again by this number ([`OutputDir::locate`]). 0: unknown.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ino: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `<output>/.hyperfarm/results/<job-id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    pub job_id: JobId,
    pub state: ResultState,
    pub vm_name: String,
    #[serde(default)]
    pub files: Vec<ResultFile>,
    /// The name of the `.error` file (failure, cancel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_file: Option<String>,
    /// The full error text, first line a summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Names moved aside to make room (policy `archive`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archived: Vec<String>,
    pub engine: String,
    pub agent: String,
    pub host: String,
    pub token: String,
    pub attempts: usize,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// The job asked its agent to define the VM in libvirt: what came of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<crate::libvirt::Outcome>,
}

impl ResultRecord {
    /// The first line of the error, for one-line displays.
    pub fn summary(&self) -> String {
        match &self.error {
            Some(e) => e.lines().next().unwrap_or_default().to_string(),
            None => format!("{} disk(s) converted", self.files.len()),
        }
    }
}

/// What to do when `<vm>.qcow2` (or a data disk's name) already holds an earlier job's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExisting {
    /// Fail the new job with an error that names the existing file (the default: nothing is ever
    /// replaced without the operator saying so).
    #[default]
    Fail,
    /// Move the existing file aside to `<stem>~superseded~<UTC time>.qcow2`, then publish. Only
    /// ever the same VM's earlier file: names cannot collide across VMs (see [`disk_file_name`]).
    Archive,
}

/// Errors while publishing.
#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error(
        "{path} already exists (an earlier result for VM {vm:?}); nothing was overwritten. Move or delete it, convert under another name (hyperexport --name), or set on_existing = \"archive\" in the agent's configuration"
    )]
    Conflict { vm: String, path: PathBuf },
    #[error("this agent lost job {id} to another agent (its lease expired); its result stands and ours was discarded")]
    Lost { id: JobId },
    #[error("cannot publish the result of job {id} in {dir}: {source}")]
    Io {
        id: JobId,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ResultError {
    /// Map an I/O error of job `id` in `dir`.
    pub fn from_io(id: JobId, dir: PathBuf) -> impl FnOnce(io::Error) -> ResultError {
        move |source| ResultError::Io { id, dir, source }
    }
}

/// The character between a VM name and a disk id in a data disk's file name. Neither VM names nor
/// disk ids may contain it ([`crate::names`]), so no name can stand for two (VM, disk) pairs: VM
/// `web`'s disk `scsi0-1` (`web~scsi0-1.qcow2`) is never VM `web-scsi0-1`'s boot disk
/// (`web-scsi0-1.qcow2`), nor VM `web-scsi0`'s disk `1`.
pub const DISK_SEPARATOR: char = '~';

/// File name of a disk's result: the boot disk is `<vm>.qcow2` (the seed's contract), the others
/// `<vm>~<disk>.qcow2`.
pub fn disk_file_name(vm: &str, disk_id: &str, boot: bool) -> String {
    if boot { format!("{vm}.qcow2") } else { format!("{vm}{DISK_SEPARATOR}{disk_id}.qcow2") }
}

/// The output directory and our area in it.
#[derive(Debug, Clone)]
pub struct OutputDir {
    dir: PathBuf,
}

impl OutputDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        OutputDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Create our area (the output directory itself must exist).
    pub fn init(&self) -> io::Result<()> {
        let md = fs::metadata(&self.dir)?;
        if !md.is_dir() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "is not a directory"));
        }
        for d in [self.area(), self.results_dir(), self.tmp_dir()] {
            crate::queue::make_dir(&d)?;
        }
        Ok(())
    }

    pub fn area(&self) -> PathBuf {
        self.dir.join(AREA)
    }
    pub fn results_dir(&self) -> PathBuf {
        self.area().join("results")
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.area().join("tmp")
    }
    pub fn record_path(&self, id: &JobId) -> PathBuf {
        self.results_dir().join(format!("{id}.json"))
    }
    pub fn work_dir(&self, id: &JobId, token: &str) -> PathBuf {
        self.tmp_dir().join(format!("{id}@{token}"))
    }

    /// The record of a job, if it has one. A record that does not parse is reported as an error.
    pub fn read_record(&self, id: &JobId) -> io::Result<Option<ResultRecord>> {
        match fsx::read_bounded(&self.record_path(id), MAX_RECORD) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Move a finished job's record aside (`<id>.json` → `<id>.json.earlier-<ms>`), when an operator
    /// put the failed or cancelled job back into the queue by hand: its next attempt commits anew.
    pub fn set_aside_record(&self, id: &JobId) -> io::Result<PathBuf> {
        let to = self.results_dir().join(format!("{id}.json.earlier-{}", crate::queue::now_ms()));
        fs::rename(self.record_path(id), &to)?;
        fsx::fsync_dir(&self.results_dir())?;
        Ok(to)
    }

    /// Where a published file is now: under its own name if that still is the file the job
    /// published, else under the archived name a later job of the same VM moved it to (found by its
    /// inode number). `None`: it is gone (moved or removed by hand).
    pub fn locate(&self, f: &ResultFile) -> Option<PathBuf> {
        let path = self.dir.join(&f.name);
        let same = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| f.ino == 0 || m.ino() == f.ino);
        if same(&path) {
            return Some(path);
        }
        let stem = f.name.strip_suffix(".qcow2").unwrap_or(&f.name);
        let prefix = format!("{stem}{DISK_SEPARATOR}superseded{DISK_SEPARATOR}");
        fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
            .find(|p| same(p))
    }

    /// Before any work: would publishing these names collide with an earlier result?
    pub fn check_free(&self, vm: &str, names: &[String], policy: OnExisting) -> Result<(), ResultError> {
        if policy == OnExisting::Archive {
            return Ok(());
        }
        for name in names {
            let path = self.dir.join(name);
            if fs::symlink_metadata(&path).is_ok() {
                return Err(ResultError::Conflict { vm: vm.to_string(), path });
            }
        }
        Ok(())
    }

    /// Remove work areas whose attempt is over: every `<id>@<token>` that `is_live` rejects.
    pub fn cleanup_work(&self, is_live: impl Fn(&JobId, &str) -> bool) -> io::Result<usize> {
        let mut n = 0;
        let rd = match fs::read_dir(self.tmp_dir()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        for e in rd {
            let name = e?.file_name().to_string_lossy().into_owned();
            let Some((id, token)) = name.split_once('@') else {
                continue;
            };
            let Ok(id) = id.parse::<JobId>() else {
                continue;
            };
            if !is_live(&id, token) {
                fsx::remove_tree(&self.tmp_dir().join(&name))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// One attempt's publication: a work area `<output>/.hyperfarm/tmp/<id>@<token>/` where the
/// engine writes the final file names, then [`Publication::publish`].
#[derive(Debug)]
pub struct Publication {
    out: OutputDir,
    id: JobId,
    work: PathBuf,
}

impl Publication {
    /// Create the work area (removing a leftover of the same attempt).
    pub fn begin(out: &OutputDir, id: JobId, token: &str) -> io::Result<Publication> {
        out.init()?;
        let work = out.work_dir(&id, token);
        fsx::remove_tree(&work)?;
        crate::queue::make_dir(&work)?;
        Ok(Publication { out: out.clone(), id, work })
    }

    /// Re-open the work area of an attempt whose agent died after it began publishing (its
    /// record is in the work area). `None` if that attempt never got that far.
    pub fn resume(out: &OutputDir, id: JobId, token: &str) -> Option<(Publication, ResultRecord)> {
        let work = out.work_dir(&id, token);
        let record: ResultRecord =
            serde_json::from_slice(&fsx::read_bounded(&work.join(RECORD), MAX_RECORD).ok()?).ok()?;
        Some((Publication { out: out.clone(), id, work }, record))
    }

    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// Publish. `record.files` (for success) must name files present in the work area;
    /// `error_text` (for failure/cancel) is written as `<vm>.error`. `still_owned` is asked
    /// right before the first visible change.
    pub fn publish(
        &self,
        mut record: ResultRecord,
        error_text: Option<&str>,
        policy: OnExisting,
        still_owned: impl Fn() -> bool,
    ) -> Result<ResultRecord, ResultError> {
        let id = self.id;
        let io_err = |dir: &Path| {
            let dir = dir.to_path_buf();
            move |source| ResultError::Io { id, dir, source }
        };
        let out_dir = self.out.path().to_path_buf();
        if let Some(text) = error_text {
            let name = format!("{}.error", record.vm_name);
            let tmp = self.work.join(&name);
            if fs::symlink_metadata(&tmp).is_err() {
                fsx::write_new_file(&tmp, text.as_bytes()).map_err(io_err(&self.work))?;
            }
            record.error_file = Some(name);
            record.error = Some(text.to_string());
        }
        // The record in the work area marks "outputs complete; publication may be completed by
        // a recoverer". It is written once per attempt.
        let record_tmp = self.work.join(RECORD);
        if fs::symlink_metadata(&record_tmp).is_err() {
            let bytes = serde_json::to_vec_pretty(&record).expect("records serialise");
            fsx::write_new_file(&record_tmp, &bytes).map_err(io_err(&self.work))?;
            fsx::fsync_dir(&self.work).map_err(io_err(&self.work))?;
            crate::failpoint::hit("agent.publish-started");
        }
        if !still_owned() {
            return Err(ResultError::Lost { id });
        }
        // Whatever a queue writer planted under the record's name (a directory, a FIFO) is not
        // another attempt's record: an error to surface, not a race to concede.
        if let Ok(md) = fs::symlink_metadata(self.out.record_path(&id))
            && !md.file_type().is_file()
        {
            return Err(ResultError::Io {
                id,
                dir: self.out.results_dir(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is not a regular file; move it away so that the job's result can be recorded",
                        self.out.record_path(&id).display()
                    ),
                ),
            });
        }
        if self.out.record_path(&id).exists() {
            return self.finish_lost_or_done(&record_tmp);
        }

        // The engines write through the page cache: make every output durable before any name
        // points at it (write, fsync, then link).
        for f in &record.files {
            let p = self.work.join(&f.name);
            if let Ok(file) = fs::File::open(&p) {
                file.sync_all().map_err(io_err(&self.work))?;
            }
        }
        let mut linked: Vec<PathBuf> = Vec::new();

        let undo = |linked: &[PathBuf]| {
            for p in linked {
                let _ = fs::remove_file(p);
            }
        };
        // Data disks first, the boot disk last.
        let mut files = record.files.clone();
        files.sort_by_key(|f| f.boot);
        for f in &files {
            let src = self.work.join(&f.name);
            let dst = out_dir.join(&f.name);
            match link_or_resolve(&src, &dst, &record.vm_name, policy, &mut record.archived) {
                Ok(true) => linked.push(dst),
                Ok(false) => {}
                Err(e) => {
                    undo(&linked);
                    return Err(match e {
                        LinkError::Conflict(path) => ResultError::Conflict { vm: record.vm_name.clone(), path },
                        LinkError::Io(source) => ResultError::Io { id, dir: out_dir.clone(), source },
                    });
                }
            }
        }
        let boot_name = format!("{}.qcow2", record.vm_name);
        if let Some(name) = record.error_file.clone()
            && fs::symlink_metadata(out_dir.join(&boot_name)).is_ok()
        {
            // The seed's contract reads `<vm>.qcow2` as success and `<vm>.error` as failure, so the
            // two never stand side by side: an earlier job's result holds the name, and this
            // failure is told only by this job's record (and to the exporter waiting for it).
            record.error_file = None;
            if let Some(text) = record.error.as_mut() {
                text.push_str(&format!(
                    "(no {name} was written: {boot_name} holds an earlier job's result, which the seed's contract shows)\n"
                ));
            }
        } else if let Some(name) = record.error_file.clone() {
            // An `.error` is a message whose full text also lives in its job's record, so an
            // earlier job's `<vm>.error` is replaced (atomically, by rename). If its name cannot
            // take it (a directory there, say), the record alone carries the failure: the commit
            // must not depend on the seed's convenience file.
            let src = self.work.join(&name);
            if src.exists()
                && let Err(e) = fs::rename(&src, out_dir.join(&name))
            {
                tracing::warn!(job = %id, "cannot write {}: {e}; the result record holds the error", out_dir.join(&name).display());
                record.error_file = None;
                if let Some(text) = record.error.as_mut() {
                    text.push_str(&format!(
                        "(note: {name} could not be written in the output directory: {e}; move whatever is there away)\n"
                    ));
                }
            }
        } else {
            // Success: an earlier job's `<vm>.error` would contradict `<vm>.qcow2`; its text
            // stays in that job's record.
            let stale = out_dir.join(format!("{}.error", record.vm_name));
            let _ = fsx::remove_file(&stale);
        }
        // A libvirt domain the agent defined for this job: its XML goes beside the disks before the
        // record says so (replacing an earlier one of the VM's name, as `<vm>.error` is).
        if record.libvirt.is_some() {
            let name = format!("{}.xml", record.vm_name);
            let src = self.work.join(&name);
            if src.exists()
                && let Err(e) = fs::rename(&src, out_dir.join(&name))
            {
                tracing::warn!(job = %id, "cannot write {}: {e}; the domain stays defined", out_dir.join(&name).display());
            }
        }
        fsx::fsync_dir(&out_dir).map_err(io_err(&out_dir))?;
        for f in record.files.iter_mut() {
            f.ino = fs::symlink_metadata(out_dir.join(&f.name)).map(|m| m.ino()).unwrap_or(0);
        }
        crate::failpoint::hit("agent.files-linked");

        // The commit: link the record. Never replaces a record.
        fs::write(&record_tmp, serde_json::to_vec_pretty(&record).expect("records serialise"))
            .and_then(|()| fs::File::open(&record_tmp)?.sync_all())
            .map_err(io_err(&self.work))?;
        match fsx::link_noreplace(&record_tmp, &self.out.record_path(&id)) {
            Ok(true) => {}
            Ok(false) => {
                undo(&linked);
                return self.finish_lost_or_done(&record_tmp);
            }
            Err(e) => return Err(io_err(&self.out.results_dir())(e)),
        }
        fsx::fsync_dir(&self.out.results_dir()).map_err(io_err(&self.out.results_dir()))?;
        crate::failpoint::hit("agent.record-linked");
        self.discard();
        Ok(record)
    }

    /// The job already has a record: ours (an interrupted publication of this very attempt) or
    /// another attempt's.
    fn finish_lost_or_done(&self, record_tmp: &Path) -> Result<ResultRecord, ResultError> {
        let final_path = self.out.record_path(&self.id);
        let ours = match (fs::metadata(record_tmp), fs::metadata(&final_path)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if ours {
            let rec = self.out.read_record(&self.id).ok().flatten();
            self.discard();
            if let Some(rec) = rec {
                return Ok(rec);
            }
        }
        self.discard();
        Err(ResultError::Lost { id: self.id })
    }

    /// Remove the work area.
    pub fn discard(&self) {
        let _ = fsx::remove_tree(&self.work);
    }
}

enum LinkError {
    Conflict(PathBuf),
    Io(io::Error),
}

/// Link `src` to `dst`. `Ok(true)`: linked now; `Ok(false)`: it already was (a resumed attempt).
fn link_or_resolve(
    src: &Path,
    dst: &Path,
    _vm: &str,
    policy: OnExisting,
    archived: &mut Vec<String>,
) -> Result<bool, LinkError> {
    let src_md = fs::metadata(src).map_err(LinkError::Io)?;
    match fs::symlink_metadata(dst) {
        Ok(md) if md.ino() == src_md.ino() && md.dev() == src_md.dev() => return Ok(false),
        Ok(_) => match policy {
            OnExisting::Fail => return Err(LinkError::Conflict(dst.to_path_buf())),
            OnExisting::Archive => {
                let aside = archive_name(dst);
                fs::rename(dst, &aside).map_err(LinkError::Io)?;
                archived.push(aside.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            }
        },
        Err(_) => {}
    }
    match fsx::link_noreplace(src, dst) {
        Ok(true) => Ok(true),
        Ok(false) => Err(LinkError::Conflict(dst.to_path_buf())),
        Err(e) => Err(LinkError::Io(e)),
    }
}

fn archive_name(dst: &Path) -> PathBuf {
    let stamp = humantime_stamp();
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (stem, ext) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
    let mut n = 0;
    loop {
        let candidate = if n == 0 {
            format!("{stem}{DISK_SEPARATOR}superseded{DISK_SEPARATOR}{stamp}.{ext}")
        } else {
            format!("{stem}{DISK_SEPARATOR}superseded{DISK_SEPARATOR}{stamp}-{n}.{ext}")
        };
        let p = dst.with_file_name(candidate);
        if fs::symlink_metadata(&p).is_err() {
            return p;
        }
        n += 1;
    }
}

fn humantime_stamp() -> String {
    crate::timefmt::compact(crate::queue::now_ms() / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: JobId, vm: &str, files: Vec<ResultFile>, state: ResultState) -> ResultRecord {
        ResultRecord {
            job_id: id,
            state,
            vm_name: vm.into(),
            files,
            error_file: None,
            error: None,
            archived: vec![],
            engine: "qemu-img".into(),
            agent: "test".into(),
            host: "h".into(),
            token: "t".into(),
            attempts: 1,
            started_at_ms: 0,
            finished_at_ms: 0,
            libvirt: None,
        }
    }

    fn file(disk: &str, name: &str, boot: bool) -> ResultFile {
        ResultFile { disk_id: disk.into(), name: name.into(), boot, bytes: 3, virtual_size: 3, ino: 0 }
    }

    fn publish_ok(out: &OutputDir, vm: &str, content: &[u8], policy: OnExisting) -> Result<ResultRecord, ResultError> {
        let id = JobId::new();
        let p = Publication::begin(out, id, "tok").expect("begin");
        fs::write(p.work_dir().join(format!("{vm}.qcow2")), content).expect("write");
        fs::write(p.work_dir().join(format!("{vm}~d1.qcow2")), content).expect("write");
        let rec = record(
            id,
            vm,
            vec![file("d0", &format!("{vm}.qcow2"), true), file("d1", &format!("{vm}~d1.qcow2"), false)],
            ResultState::Done,
        );
        p.publish(rec, None, policy, || true)
    }

    #[test]
    fn success_publishes_files_then_record_and_cleans_up() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = OutputDir::new(d.path());
        fs::write(d.path().join("vm.error"), "old failure").expect("write");
        let rec = publish_ok(&out, "vm", b"new", OnExisting::Fail).expect("publish");
        assert_eq!(fs::read(d.path().join("vm.qcow2")).expect("read"), b"new");
        assert!(d.path().join("vm~d1.qcow2").is_file());
        assert!(!d.path().join("vm.error").exists(), "a stale error must not contradict the result");
        assert_eq!(out.read_record(&rec.job_id).expect("read").expect("some"), rec);
        assert_eq!(fs::read_dir(out.tmp_dir()).expect("ls").count(), 0);
    }

    #[test]
    fn an_existing_result_is_never_overwritten() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = OutputDir::new(d.path());
        let first = publish_ok(&out, "vm", b"first", OnExisting::Fail).expect("first");
        let err = publish_ok(&out, "vm", b"second", OnExisting::Fail).expect_err("conflict");
        assert!(matches!(err, ResultError::Conflict { .. }), "{err}");
        assert_eq!(fs::read(d.path().join("vm.qcow2")).expect("read"), b"first");
        assert_eq!(fs::read(d.path().join("vm~d1.qcow2")).expect("read"), b"first");
        assert!(out.check_free("vm", &["vm.qcow2".into()], OnExisting::Fail).is_err());

        let rec = publish_ok(&out, "vm", b"third", OnExisting::Archive).expect("archive");
        assert_eq!(fs::read(d.path().join("vm.qcow2")).expect("read"), b"third");
        assert_eq!(rec.archived.len(), 2);
        for a in &rec.archived {
            assert_eq!(fs::read(d.path().join(a)).expect("archived"), b"first");
        }
        // The first job's files are found where the archive moved them; the third's where it put them.
        for f in &rec.files {
            assert_eq!(out.locate(f), Some(d.path().join(&f.name)));
        }
        for f in &first.files {
            let now = out.locate(f).expect("found");
            assert!(rec.archived.iter().any(|a| now.ends_with(a)), "{} is where the archive moved it", now.display());
            assert_eq!(fs::read(&now).expect("read"), b"first");
        }
    }

    #[test]
    fn failure_writes_error_and_record() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = OutputDir::new(d.path());
        let id = JobId::new();
        let p = Publication::begin(&out, id, "tok").expect("begin");
        let rec = record(id, "vm", vec![], ResultState::Failed);
        let rec =
            p.publish(rec, Some("disk d0: digest mismatch\ndetails"), OnExisting::Fail, || true).expect("publish");
        assert_eq!(fs::read_to_string(d.path().join("vm.error")).expect("read"), "disk d0: digest mismatch\ndetails");
        assert_eq!(rec.summary(), "disk d0: digest mismatch");
        assert_eq!(out.read_record(&id).expect("read").expect("some").state, ResultState::Failed);
    }

    #[test]
    fn a_failure_never_puts_an_error_beside_an_earlier_success() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = OutputDir::new(d.path());
        publish_ok(&out, "vm", b"good", OnExisting::Fail).expect("first");
        let id = JobId::new();
        let p = Publication::begin(&out, id, "tok").expect("begin");
        let rec = p
            .publish(record(id, "vm", vec![], ResultState::Failed), Some("already exists\n"), OnExisting::Fail, || true)
            .expect("recorded");
        assert!(!d.path().join("vm.error").exists(), "vm.qcow2 and vm.error never stand side by side");
        assert_eq!(rec.error_file, None);
        assert!(rec.error.as_deref().expect("text").contains("no vm.error was written"));
        assert_eq!(fs::read(d.path().join("vm.qcow2")).expect("read"), b"good");
    }

    #[test]
    fn an_error_file_name_that_cannot_be_taken_does_not_stop_the_commit() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = OutputDir::new(d.path());
        fs::create_dir(d.path().join("vm.error")).expect("a directory where vm.error goes");
        let id = JobId::new();
        let p = Publication::begin(&out, id, "tok").expect("begin");
        let rec = p
            .publish(record(id, "vm", vec![], ResultState::Failed), Some("it broke\n"), OnExisting::Fail, || true)
            .expect("the record is committed");
        assert_eq!(rec.error_file, None);
        assert!(rec.error.as_deref().expect("text").contains("vm.error could not be written"));
        assert!(d.path().join("vm.error").is_dir(), "left alone");
        assert_eq!(out.read_record(&id).expect("read").expect("some").state, ResultState::Failed);

        // A directory planted where the record goes: an error, not a lost race.
        let id = JobId::new();
        fs::create_dir_all(out.record_path(&id)).expect("planted");
        let p = Publication::begin(&out, id, "tok").expect("begin");
        let e = p
            .publish(record(id, "other", vec![], ResultState::Failed), Some("x\n"), OnExisting::Fail, || true)
            .expect_err("cannot commit");
        assert!(matches!(e, ResultError::Io { .. }), "{e}");
    }

    #[test]
    fn a_lost_owner_publishes_nothing_and_a_second_publisher_loses() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = OutputDir::new(d.path());
        let id = JobId::new();
        let p = Publication::begin(&out, id, "a").expect("begin");
        fs::write(p.work_dir().join("vm.qcow2"), b"x").expect("write");
        let rec = record(id, "vm", vec![file("d0", "vm.qcow2", true)], ResultState::Done);
        assert!(matches!(p.publish(rec.clone(), None, OnExisting::Fail, || false), Err(ResultError::Lost { .. })));
        assert!(!d.path().join("vm.qcow2").exists());

        // Two attempts of one job: the first to link the record wins; the second takes nothing.
        let p1 = Publication::begin(&out, id, "b").expect("begin");
        fs::write(p1.work_dir().join("vm.qcow2"), b"x").expect("write");
        p1.publish(rec.clone(), None, OnExisting::Fail, || true).expect("first");
        let p2 = Publication::begin(&out, id, "c").expect("begin");
        fs::write(p2.work_dir().join("vm.qcow2"), b"y").expect("write");
        assert!(matches!(p2.publish(rec, None, OnExisting::Archive, || true), Err(ResultError::Lost { .. })));
        assert_eq!(fs::read(d.path().join("vm.qcow2")).expect("read"), b"x");
    }

    #[test]
    fn an_interrupted_publication_is_completed_by_resume() {
        let d = tempfile::tempdir().expect("tempdir");
        let out = OutputDir::new(d.path());
        let id = JobId::new();
        let p = Publication::begin(&out, id, "a").expect("begin");
        fs::write(p.work_dir().join("vm.qcow2"), b"x").expect("write");
        let rec = record(id, "vm", vec![file("d0", "vm.qcow2", true)], ResultState::Done);
        // Simulate a crash right after the visible link: record in the work area, file linked.
        fs::write(p.work_dir().join(RECORD), serde_json::to_vec(&rec).expect("json")).expect("write");
        fs::hard_link(p.work_dir().join("vm.qcow2"), d.path().join("vm.qcow2")).expect("link");
        drop(p);
        let (p, rec) = Publication::resume(&out, id, "a").expect("resumable");
        p.publish(rec, None, OnExisting::Fail, || true).expect("completed");
        assert!(out.read_record(&id).expect("read").is_some());
        assert!(Publication::resume(&out, id, "a").is_none());
    }

    #[test]
    fn stamps_look_right() {
        let s = humantime_stamp();
        assert_eq!(s.len(), 16);
        assert!(s.starts_with("20") && s.ends_with('Z'));
    }
}
