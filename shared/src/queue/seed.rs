//! Seed compatibility: the original HyperSDK drops one manifest file (e.g.
//! `artifact-manifest.json`) straight into the watch directory with a plain, non-atomic write, and
//! its disks stay where `local_path` points.
//!
//! A drop is ingested once its content has stayed the same for the settle time (and it parses; a
//! file that never parses is ingested after ten settle times so that it fails with a clear error
//! instead of waiting forever). Ingestion renames the drop out of the watch directory first — the
//! rename is the "exactly once" — then publishes a normal job whose `origin.json` says where it
//! came from. Files that are not `*.json`, hidden files and non-regular files are left alone.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{MANIFEST, ORIGIN, Queue, State, make_dir, now_ms, read_names};
use crate::fsx::{self, Moved};
use crate::jobid::JobId;
use crate::manifest::{MAX_MANIFEST_BYTES, Manifest};

/// What happened to one drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Published as this job.
    Ingested { name: String, id: JobId },
    /// Another agent took it first.
    TakenByOther { name: String },
}

/// Remembers what each drop looked like and since when.
#[derive(Debug, Default)]
pub struct SeedTracker {
    seen: HashMap<String, (blake3::Hash, Instant)>,
    warned: HashSet<String>,
}

impl SeedTracker {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Look at the watch directory's top level and ingest every drop that is complete and stable.
pub fn ingest_seed_drops(queue: &Queue, tracker: &mut SeedTracker, settle: Duration) -> io::Result<Vec<IngestOutcome>> {
    ingest_seed_drops_at(queue, tracker, settle, Instant::now())
}

/// [`ingest_seed_drops`] with the observer's clock given (for tests).
pub fn ingest_seed_drops_at(
    queue: &Queue,
    tracker: &mut SeedTracker,
    settle: Duration,
    now: Instant,
) -> io::Result<Vec<IngestOutcome>> {
    let mut out = resume_interrupted(queue)?;
    let mut present = HashSet::new();
    for name in read_names(queue.root())? {
        if name.starts_with('.') || !name.to_ascii_lowercase().ends_with(".json") {
            continue;
        }
        let path = queue.root().join(&name);
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(_) => continue,
        };
        if !md.file_type().is_file() {
            if tracker.warned.insert(name.clone()) {
                tracing::warn!(file = %path.display(), "ignoring a manifest drop that is not a regular file (symlink, FIFO, directory)");
            }
            continue;
        }
        present.insert(name.clone());
        let Ok(bytes) = read_bounded(&path) else {
            continue;
        };
        let hash = blake3::hash(&bytes);
        let since = match tracker.seen.get(&name) {
            Some((h, since)) if *h == hash => *since,
            _ => {
                tracker.seen.insert(name.clone(), (hash, now));
                continue;
            }
        };
        let stable_for = now.duration_since(since);
        let parses = Manifest::parse(&bytes).is_ok();
        if stable_for < settle || (!parses && stable_for < settle * 10) {
            continue;
        }
        tracker.seen.remove(&name);
        out.push(ingest_one(queue, &name, hash)?);
    }
    tracker.seen.retain(|k, _| present.contains(k));
    tracker.warned.retain(|k| present.contains(k));
    Ok(out)
}

fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let f = fsx::open_regular(path)?;
    let mut buf = Vec::new();
    f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

/// `tmp/<id>.<host>.<pid>.seed.json`: a drop taken out of the watch directory, not yet published.
fn taken_name(id: &JobId, host: &str, pid: u32) -> String {
    format!("{id}.{host}.{pid}.seed.json")
}

fn ingest_one(queue: &Queue, name: &str, stable: blake3::Hash) -> io::Result<IngestOutcome> {
    let id = JobId::new();
    make_dir(&queue.tmp_dir())?;
    let taken = queue.tmp_dir().join(taken_name(&id, &fsx::hostname(), std::process::id()));
    match fsx::rename_noreplace(&queue.root().join(name), &taken)? {
        Moved::Yes => {}
        _ => {
            return Ok(IngestOutcome::TakenByOther { name: name.to_string() });
        }
    }
    fsx::fsync_dir(queue.root())?;
    fsx::fsync_dir(&queue.tmp_dir())?;
    // A writer still holding the file open would keep writing to the renamed file: make sure the
    // content is still what was judged stable.
    let bytes = fs::read(&taken)?;
    if blake3::hash(&bytes) != stable {
        tracing::warn!(file = name, job = %id, "the drop changed while it was being ingested; using its latest content");
    }
    publish_taken(queue, id, name, &taken, &bytes)?;
    Ok(IngestOutcome::Ingested { name: name.to_string(), id })
}

fn publish_taken(queue: &Queue, id: JobId, original: &str, taken: &Path, bytes: &[u8]) -> io::Result<()> {
    let staging = queue.tmp_dir().join(format!("{id}.{}.{}", fsx::hostname(), std::process::id()));
    let _ = fsx::remove_tree(&staging);
    make_dir(&staging)?;
    fsx::write_new_file(&staging.join(MANIFEST), bytes)?;
    let origin = serde_json::json!({
        "kind": "seed-drop",
        "original_name": original,
        "watch_dir": queue.root(),
        "ingested_by": fsx::hostname(),
        "pid": std::process::id(),
        "at_ms": now_ms(),
    });
    fsx::write_new_file(&staging.join(ORIGIN), format!("{origin:#}\n").as_bytes())?;
    fsx::fsync_dir(&staging)?;
    let queued = queue.state_dir(State::Queued);
    make_dir(&queued)?;
    match fsx::rename_noreplace(&staging, &queued.join(id.to_string()))? {
        Moved::Yes => {
            fsx::fsync_dir(&queued)?;
        }
        other => {
            return Err(io::Error::other(format!("publishing ingested drop {original} as job {id}: {other:?}")));
        }
    }
    fsx::remove_file(taken)?;
    fsx::fsync_dir(&queue.tmp_dir())
}

/// Finish ingestions that a crashed agent of this host left in `tmp/` (`*.seed.json` whose process
/// is gone): publish them, or just drop the leftover if the job was already published.
fn resume_interrupted(queue: &Queue) -> io::Result<Vec<IngestOutcome>> {
    let mut out = Vec::new();
    let names = match read_names(&queue.tmp_dir()) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let host = fsx::hostname();
    for name in names {
        let Some(stem) = name.strip_suffix(".seed.json") else {
            continue;
        };
        let Some((id, h, pid)) = super::publish::parse_staging_name(stem) else {
            continue;
        };
        if h != host || fsx::pid_alive(pid) {
            continue;
        }
        let taken: PathBuf = queue.tmp_dir().join(&name);
        if queue.locate(&id)?.is_some() {
            fsx::remove_file(&taken)?;
            continue;
        }
        let bytes = fs::read(&taken)?;
        tracing::info!(job = %id, "resuming the ingestion of a manifest drop interrupted by a crash");
        publish_taken(queue, id, &name, &taken, &bytes)?;
        out.push(IngestOutcome::Ingested { name, id });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GOOD: &str = r#"{"manifest_version": "1.0", "source": {"vm_name": "vm1"},
        "disks": [{"id": "d0", "source_format": "raw", "bytes": 512, "local_path": "vm1.raw"}]}"#;

    fn setup() -> (tempfile::TempDir, Queue) {
        let d = tempfile::tempdir().expect("tempdir");
        let q = Queue::new(d.path());
        q.init().expect("init");
        (d, q)
    }

    #[test]
    fn a_half_written_drop_waits_and_a_complete_one_is_ingested_once() {
        let (_d, q) = setup();
        let path = q.root().join("artifact-manifest.json");
        let mut f = fs::File::create(&path).expect("create");
        f.write_all(&GOOD.as_bytes()[..40]).expect("write half");
        f.flush().expect("flush");
        let mut t = SeedTracker::new();
        let settle = Duration::from_secs(2);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(ingest_seed_drops_at(&q, &mut t, settle, at(0)).expect("scan").is_empty());
        // Stable but unparsable: still waits (up to ten settle times).
        assert!(ingest_seed_drops_at(&q, &mut t, settle, at(5000)).expect("scan").is_empty());
        f.write_all(&GOOD.as_bytes()[40..]).expect("write rest");
        drop(f);
        assert!(ingest_seed_drops_at(&q, &mut t, settle, at(6000)).expect("scan").is_empty(), "changed: restart");
        assert!(ingest_seed_drops_at(&q, &mut t, settle, at(7000)).expect("scan").is_empty(), "not settled");
        let out = ingest_seed_drops_at(&q, &mut t, settle, at(8100)).expect("scan");
        let [IngestOutcome::Ingested { id, .. }] = out.as_slice() else { panic!("{out:?}") };
        assert!(!path.exists());
        let job = q.job_dir(State::Queued, id);
        assert_eq!(fs::read_to_string(job.join(MANIFEST)).expect("manifest"), GOOD);
        assert!(job.join(ORIGIN).is_file());
        assert!(read_names(&q.tmp_dir()).expect("tmp").is_empty(), "nothing left in tmp");
        assert!(ingest_seed_drops_at(&q, &mut t, settle, at(20000)).expect("scan").is_empty());
    }

    #[test]
    fn garbage_is_ingested_after_ten_settle_times_and_other_files_are_left_alone() {
        let (_d, q) = setup();
        fs::write(q.root().join("broken.json"), b"{ not json").expect("write");
        fs::write(q.root().join("vm.ovf"), b"<Envelope/>").expect("write");
        fs::write(q.root().join(".hidden.json"), GOOD).expect("write");
        std::os::unix::fs::symlink("/etc/passwd", q.root().join("link.json")).expect("symlink");
        let mut t = SeedTracker::new();
        let settle = Duration::from_secs(1);
        let t0 = Instant::now();
        assert!(ingest_seed_drops_at(&q, &mut t, settle, t0).expect("scan").is_empty());
        assert!(ingest_seed_drops_at(&q, &mut t, settle, t0 + Duration::from_secs(5)).expect("scan").is_empty());
        let out = ingest_seed_drops_at(&q, &mut t, settle, t0 + Duration::from_secs(11)).expect("scan");
        assert_eq!(out.len(), 1, "{out:?}");
        for kept in ["vm.ovf", ".hidden.json", "link.json"] {
            assert!(fs::symlink_metadata(q.root().join(kept)).is_ok(), "{kept} must be left alone");
        }
    }

    #[test]
    fn an_interrupted_ingestion_is_resumed() {
        let (_d, q) = setup();
        let id = JobId::new();
        let taken = q.tmp_dir().join(taken_name(&id, &fsx::hostname(), 999_999_999));
        fs::write(&taken, GOOD).expect("write");
        let out = ingest_seed_drops(&q, &mut SeedTracker::new(), Duration::from_secs(1)).expect("scan");
        assert_eq!(out.len(), 1);
        assert!(q.job_dir(State::Queued, &id).join(MANIFEST).is_file());
        assert!(!taken.exists());
    }
}
