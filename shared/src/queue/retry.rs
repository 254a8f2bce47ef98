//! Submitting a failed or cancelled job again.
//!
//! A retry is a **new job** (new id, so that it ends exactly once with its own result record)
//! whose disks are hard links to the old job's (no copy, same file system) and whose manifest
//! names the old job in `hyperfarm.retry_of`. The old job stays where it is, with an event saying
//! which job retried it.

use std::fs;
use std::io;
use std::path::Path;

use super::claim::record_event;
use super::publish::{PublishError, Staging};
use super::{DISKS, ORIGIN, Queue, State, read_names};
use crate::fsx;
use crate::jobid::JobId;
use crate::manifest::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("no job {0} in the queue")]
    NotFound(JobId),
    #[error("job {id} is {state}; only failed or cancelled jobs can be retried")]
    WrongState { id: JobId, state: State },
    #[error("job {id} cannot be retried: {why}; submit the VM again")]
    Unusable { id: JobId, why: String },
    #[error("retrying job {id}: {source}")]
    Io {
        id: JobId,
        #[source]
        source: io::Error,
    },
    #[error("retrying job {id}: {source}")]
    Publish {
        id: JobId,
        #[source]
        source: PublishError,
    },
}

/// Retry job `id`; returns the new job's id.
pub fn retry(queue: &Queue, id: &JobId) -> Result<JobId, RetryError> {
    let io = |source| RetryError::Io { id: *id, source };
    let (state, dir) = queue.locate(id).map_err(io)?.ok_or(RetryError::NotFound(*id))?;
    if !matches!(state, State::Failed | State::Cancelled) {
        return Err(RetryError::WrongState { id: *id, state });
    }
    let bytes = super::read_manifest(&dir).map_err(io)?;
    let mut manifest = Manifest::parse(&bytes)
        .map_err(|e| RetryError::Unusable { id: *id, why: format!("its manifest is invalid ({e})") })?;
    let seed = super::has_origin(&dir);
    let disk_names = match read_names(&dir.join(DISKS)) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(e)),
    };
    if !seed {
        for d in &manifest.disks {
            let rel = d.local_path.strip_prefix("disks/").unwrap_or(&d.local_path);
            if !disk_names.iter().any(|n| n == rel) {
                return Err(RetryError::Unusable {
                    id: *id,
                    why: format!("its disk {} is no longer in {}", d.id, dir.display()),
                });
            }
        }
    }
    let new = JobId::new();
    if let Some(h) = manifest.hyperfarm.as_mut() {
        h.job_id = new;
        h.extra.insert("retry_of".into(), serde_json::Value::String(id.to_string()));
    }
    // Staged and published like any job; the disks are links to the old job's.
    let publish = |source| RetryError::Publish { id: *id, source };
    let staging = Staging::create(queue, new).map_err(publish)?;
    for n in &disk_names {
        link_or_copy(&dir.join(DISKS).join(n), &staging.disk_path(n)).map_err(io)?;
    }
    if seed {
        fsx::write_new_file(&staging.dir().join(ORIGIN), &super::read_small(&dir.join(ORIGIN)).map_err(io)?)
            .map_err(io)?;
    }
    staging.publish(&manifest).map_err(publish)?;
    record_event(&dir, "retried", "-", serde_json::json!({ "as": new }));
    Ok(new)
}

fn link_or_copy(from: &Path, to: &Path) -> io::Result<()> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) || e.raw_os_error() == Some(libc::EPERM) => {
            fs::copy(from, to)?;
            fs::File::open(to)?.sync_all()
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::MANIFEST;

    #[test]
    fn a_failed_job_is_retried_as_a_new_job_with_the_same_disks() {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        let id = JobId::new();
        let dir = q.job_dir(State::Failed, &id);
        fs::create_dir_all(dir.join(DISKS)).expect("mkdir");
        fs::write(dir.join("disks/d0.raw"), vec![1u8; 4096]).expect("disk");
        let m = serde_json::json!({"manifest_version": "1.0", "source": {"vm_name": "vm"},
            "disks": [{"id": "d0", "source_format": "raw", "bytes": 4096, "local_path": "disks/d0.raw"}],
            "hyperfarm": {"schema_version": 1, "job_id": id}});
        fs::write(dir.join(MANIFEST), m.to_string()).expect("manifest");
        let new = retry(&q, &id).expect("retry");
        let nd = q.job_dir(State::Queued, &new);
        let nm = Manifest::parse(&fs::read(nd.join(MANIFEST)).expect("read")).expect("parse");
        assert_eq!(nm.job_id(), Some(new));
        assert_eq!(nm.hyperfarm.expect("ext").extra["retry_of"], id.to_string());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(nd.join("disks/d0.raw")).expect("md").ino(),
            fs::metadata(dir.join("disks/d0.raw")).expect("md").ino()
        );
        assert!(matches!(retry(&q, &new), Err(RetryError::WrongState { .. })));
        fs::remove_file(dir.join("disks/d0.raw")).expect("rm");
        assert!(matches!(retry(&q, &id), Err(RetryError::Unusable { .. })));
        assert!(matches!(retry(&q, &JobId::new()), Err(RetryError::NotFound(_))));
    }
}
