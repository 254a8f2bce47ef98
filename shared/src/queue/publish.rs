//! Publishing a job: stage everything in `tmp/`, fsync, then one rename into `queued/`.

use std::io;
use std::path::{Path, PathBuf};

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
    pub fn publish(mut self, manifest: &Manifest) -> Result<PathBuf, PublishError> {
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
