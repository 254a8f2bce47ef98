//! Publishing a job: stage everything in `tmp/`, fsync, then one rename into `queued/`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{DISKS, MANIFEST, Queue, State, make_dir, read_names};
use crate::fsx;
use crate::jobid::JobId;
use crate::manifest::Manifest;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot stage job {id} in {dir}: {source}")]
    Stage {
        id: JobId,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot publish job {id} into {dir}: {source}")]
    Publish {
        id: JobId,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("job {id} already exists in {dir}; job ids are unique, so this is a bug or a copied queue")]
    Exists { id: JobId, dir: PathBuf },
    #[error("job {id} was cancelled before it was published; nothing was published and the staged copy is removed")]
    Cancelled { id: JobId },
}

/// A job being assembled in the staging area. Dropping it unpublished removes what was staged.
#[derive(Debug)]
pub struct Staging {
    queue: Queue,
    id: JobId,
    dir: PathBuf,
    done: bool,
}

impl Staging {
    /// Create `tmp/<id>.<host>.<pid>/disks/` in the queue (on the same file system as `queued/`, so
    /// that the publishing rename cannot cross mounts).
    pub fn create(queue: &Queue, id: JobId) -> Result<Staging, PublishError> {
        let dir = queue.tmp_dir().join(format!("{id}.{}.{}", fsx::host_id(), std::process::id()));
        let err = |source| PublishError::Stage { id, dir: dir.clone(), source };
        make_dir(&queue.tmp_dir()).map_err(err)?;
        make_dir(&dir).map_err(err)?;
        make_dir(&dir.join(DISKS)).map_err(err)?;
        crate::failpoint::hit("export.staged");
        Ok(Staging { queue: queue.clone(), id, dir, done: false })
    }

    pub fn id(&self) -> JobId {
        self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a disk file named `file_name` goes; its manifest `local_path` is `disks/<file_name>`.
    pub fn disk_path(&self, file_name: &str) -> PathBuf {
        self.dir.join(DISKS).join(file_name)
    }

    /// Write the manifest last, fsync the directories, and make the job visible with one rename.
    /// The disk files must already be complete and fsynced by the caller.
    pub fn publish(self, manifest: &Manifest) -> Result<PathBuf, PublishError> {
        self.publish_unless(manifest, &AtomicBool::new(false))
    }

    /// [`Staging::publish`], unless `cancel` is set by the time of the publishing rename (the last
    /// moment a cancel can still keep the job out of the queue): then the staged copy is removed
    /// and the result is [`PublishError::Cancelled`].
    pub fn publish_unless(mut self, manifest: &Manifest, cancel: &AtomicBool) -> Result<PathBuf, PublishError> {
        let id = self.id;
        let stage_err = |source| PublishError::Stage { id, dir: self.dir.clone(), source };
        fsx::write_new_file(&self.dir.join(MANIFEST), &manifest.to_json()).map_err(stage_err)?;
        fsx::fsync_dir(&self.dir.join(DISKS)).map_err(stage_err)?;
        fsx::fsync_dir(&self.dir).map_err(stage_err)?;
        crate::failpoint::hit("export.manifest-written");

        let queued = self.queue.state_dir(State::Queued);
        let target = queued.join(id.to_string());
        let pub_err = |source| PublishError::Publish { id, dir: queued.clone(), source };
        make_dir(&queued).map_err(pub_err)?;
        crate::failpoint::hit("export.before-rename");
        if cancel.load(Ordering::SeqCst) {
            return Err(PublishError::Cancelled { id });
        }
        match fsx::rename_noreplace(&self.dir, &target).map_err(pub_err)? {
            fsx::Moved::Yes => {}
            fsx::Moved::DestinationExists => {
                return Err(PublishError::Exists { id, dir: queued });
            }
            fsx::Moved::SourceGone => {
                return Err(pub_err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "the staged job vanished before it was published (was tmp/ cleaned by someone?)",
                )));
            }
        }
        self.done = true;
        crate::failpoint::hit("export.published");
        fsx::fsync_dir(&queued).map_err(pub_err)?;
        fsx::fsync_dir(&self.queue.tmp_dir()).map_err(pub_err)?;
        Ok(target)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fsx::remove_tree(&self.dir);
        }
    }
}

/// Remove staging directories this host left behind: `tmp/<id>.<this host>.<pid>` whose process is
/// gone (an exporter killed mid-submission). Other hosts' leftovers are removed by agents once
/// they are older than the staging age limit (see `recover::cleanup_tmp`). Returns how many.
pub fn cleanup_own_staging(queue: &Queue) -> io::Result<usize> {
    let tmp = queue.tmp_dir();
    let names = match read_names(&tmp) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let host = fsx::host_id();
    let mut removed = 0;
    for name in names {
        if let Some((_, owner_host, pid)) = parse_staging_name(&name)
            && owner_host == host
            && pid != std::process::id()
            && !fsx::pid_alive(pid)
        {
            fsx::remove_tree(&tmp.join(&name))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// `<job-id>.<host>.<pid>` → its parts.
pub(crate) fn parse_staging_name(name: &str) -> Option<(JobId, &str, u32)> {
    let (id, rest) = name.split_once('.')?;
    let (host, pid) = rest.rsplit_once('.')?;
    Some((id.parse().ok()?, host, pid.parse().ok()?))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn manifest(id: JobId) -> Manifest {
        Manifest::parse(
            format!(
                r#"{{"manifest_version":"1.0","source":{{"vm_name":"m"}},"disks":[{{"id":"d0","source_format":"raw","bytes":512,"local_path":"disks/d0.raw"}}],"hyperfarm":{{"schema_version":1,"job_id":"{id}"}}}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_cancel_seen_at_the_rename_publishes_nothing_and_removes_the_staged_copy() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path());
        q.init().unwrap();
        let id = JobId::new();
        let st = Staging::create(&q, id).unwrap();
        std::fs::write(st.disk_path("d0.raw"), [0u8; 512]).unwrap();
        let staged = st.dir().to_path_buf();
        let e = st.publish_unless(&manifest(id), &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(e, PublishError::Cancelled { id: got } if got == id), "{e}");
        assert!(e.to_string().contains(&id.to_string()), "{e}");
        assert!(!staged.exists(), "the staged copy is removed");
        assert!(q.locate(&id).unwrap().is_none(), "nothing is in the queue");
        // Not cancelled: published as by `publish`.
        let id = JobId::new();
        let st = Staging::create(&q, id).unwrap();
        std::fs::write(st.disk_path("d0.raw"), [0u8; 512]).unwrap();
        let job = st.publish_unless(&manifest(id), &AtomicBool::new(false)).unwrap();
        assert_eq!(q.locate(&id).unwrap().map(|(s, _)| s), Some(State::Queued));
        assert!(job.join(MANIFEST).is_file());
    }
}
