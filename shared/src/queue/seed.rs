//! Seed compatibility: the original HyperSDK drops one manifest file (e.g.
//! `artifact-manifest.json`) straight into the watch directory with a plain, non-atomic write, and
//! its disks stay where `local_path` points.
//!
//! A drop is ingested once its content has stayed the same for the settle time (and it parses; a
//! manifest that never parses is ingested after ten settle times so that it fails with a clear
//! error instead of waiting forever). Ingestion renames the drop out of the watch directory first —
//! the rename is the "exactly once" — then publishes a normal job whose `origin.json` says where it
//! came from. Files that are not `*.json`, hidden files and non-regular files are left alone.
//!
//! A `*.json` file that is not a manifest at all — larger than a manifest may be, not JSON, or
//! JSON without `manifest_version` or `disks` — is not a job: once stable for ten settle times (at
//! once when it is too large) it is moved to `rejected/` with a warning, and no `.error` is written
//! (its name says nothing about a VM). Only a file that tries to be a manifest becomes a failed job
//! whose `<name>.error` tells the exporter waiting for it what is wrong.

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
    /// Not a manifest: moved to `rejected/` (why).
    Rejected { name: String, why: String },
}

/// Where drops that are not manifests are moved.
pub const REJECTED: &str = "rejected";

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
        let bytes = match crate::fsx::read_bounded(&path, MAX_MANIFEST_BYTES) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                // No manifest is that large; do not wait for it to settle.
                tracker.seen.remove(&name);
                let why = format!("it is larger than a manifest may be ({MAX_MANIFEST_BYTES} bytes)");
                out.extend(reject(queue, &name, &why)?);
                continue;
            }
            Err(_) => continue,
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
        if !parses && let Some(why) = not_a_manifest(&bytes) {
            out.extend(reject(queue, &name, &why)?);
            continue;
        }
        out.push(ingest_one(queue, &name, hash)?);
    }
    tracker.seen.retain(|k, _| present.contains(k));
    tracker.warned.retain(|k| present.contains(k));
    Ok(out)
}

/// Why bytes that do not parse as a manifest are not even an attempt at one (`None`: they are, and
/// become a failed job with an explanation).
fn not_a_manifest(bytes: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Err(_) => Some("it is not JSON".into()),
        Ok(serde_json::Value::Object(o)) if o.contains_key("manifest_version") || o.contains_key("disks") => None,
        Ok(_) => Some("it is JSON without manifest_version or disks, so not an Artifact Manifest".into()),
    }
}

/// Move a drop that is not a manifest to `rejected/` (exactly one agent wins the rename).
fn reject(queue: &Queue, name: &str, why: &str) -> io::Result<Option<IngestOutcome>> {
    let dir = queue.root().join(REJECTED);
    make_dir(&dir)?;
    let mut target = dir.join(name);
    if fs::symlink_metadata(&target).is_ok() {
        target = dir.join(format!("{name}.{}", now_ms()));
    }
    match fsx::rename_noreplace(&queue.root().join(name), &target)? {
        Moved::Yes => {
            fsx::fsync_dir(queue.root())?;
            fsx::fsync_dir(&dir)?;
            tracing::warn!(
                file = %crate::text::Esc(name),
                moved_to = %target.display(),
                "a *.json file in the watch directory is not a manifest ({why}); moved aside, no job was made"
            );
            Ok(Some(IngestOutcome::Rejected { name: name.to_string(), why: why.to_string() }))
        }
        _ => Ok(None),
    }
}

/// `tmp/<id>.<host>.<pid>.seed.json`: a drop taken out of the watch directory, not yet published.
fn taken_name(id: &JobId, host: &str, pid: u32) -> String {
    format!("{id}.{host}.{pid}.seed.json")
}

fn ingest_one(queue: &Queue, name: &str, stable: blake3::Hash) -> io::Result<IngestOutcome> {
    let id = JobId::new();
    make_dir(&queue.tmp_dir())?;
    let taken = queue.tmp_dir().join(taken_name(&id, &fsx::host_id(), std::process::id()));
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
    let bytes = read_taken(&taken)?;
    if blake3::hash(&bytes) != stable {
        tracing::warn!(file = name, job = %id, "the drop changed while it was being ingested; using its latest content");
    }
    publish_taken(queue, id, name, &taken, &bytes)?;
    Ok(IngestOutcome::Ingested { name: name.to_string(), id })
}

/// A taken drop, re-read after the rename: still at most a manifest's size (a writer holding it open
/// may have grown it since it was judged), never following a symlink or blocking.
fn read_taken(taken: &Path) -> io::Result<Vec<u8>> {
    match crate::fsx::read_bounded(taken, MAX_MANIFEST_BYTES) {
        // Too large now: publish its first bytes, which fail as an invalid manifest with a clear error.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            let f = crate::fsx::open_regular(taken)?;
            let mut buf = Vec::new();
            f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut buf)?;
            Ok(buf)
        }
        other => other,
    }
}

fn publish_taken(queue: &Queue, id: JobId, original: &str, taken: &Path, bytes: &[u8]) -> io::Result<()> {
    let staging = queue.tmp_dir().join(format!("{id}.{}.{}", fsx::host_id(), std::process::id()));
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
    let host = fsx::host_id();
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
        let bytes = read_taken(&taken)?;
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
    fn a_broken_manifest_is_ingested_after_ten_settle_times_and_other_files_are_left_alone() {
        let (_d, q) = setup();
        fs::write(q.root().join("broken.json"), br#"{"manifest_version": "1.0", "disks": 5}"#).expect("write");
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
    fn files_that_are_not_manifests_are_moved_aside_without_a_job() {
        let (_d, q) = setup();
        fs::write(q.root().join("notes.json"), b"{ not json").expect("write");
        fs::write(q.root().join("other-tool.json"), br#"{"name": "x", "items": [1, 2]}"#).expect("write");
        // A 4 GiB sparse drop: judged from its first MiB, never read whole.
        let big = fs::File::create(q.root().join("huge.json")).expect("create");
        big.set_len(4 << 30).expect("sparse");
        let mut t = SeedTracker::new();
        let settle = Duration::from_secs(1);
        let t0 = Instant::now();
        let out = ingest_seed_drops_at(&q, &mut t, settle, t0).expect("scan");
        assert!(
            matches!(out.as_slice(), [IngestOutcome::Rejected { name, .. }] if name == "huge.json"),
            "too large: rejected at once: {out:?}"
        );
        assert!(ingest_seed_drops_at(&q, &mut t, settle, t0 + Duration::from_secs(5)).expect("scan").is_empty());
        let out = ingest_seed_drops_at(&q, &mut t, settle, t0 + Duration::from_secs(11)).expect("scan");
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out.iter().all(|o| matches!(o, IngestOutcome::Rejected { .. })), "{out:?}");
        for n in ["notes.json", "other-tool.json", "huge.json"] {
            assert!(q.root().join(REJECTED).join(n).is_file(), "{n} moved aside");
            assert!(!q.root().join(n).exists());
        }
        assert!(read_names(&q.state_dir(State::Queued)).expect("ls").is_empty(), "no job was made");
    }

    #[test]
    fn an_interrupted_ingestion_is_resumed() {
        let (_d, q) = setup();
        let id = JobId::new();
        let taken = q.tmp_dir().join(taken_name(&id, &fsx::host_id(), 999_999_999));
        fs::write(&taken, GOOD).expect("write");
        let out = ingest_seed_drops(&q, &mut SeedTracker::new(), Duration::from_secs(1)).expect("scan");
        assert_eq!(out.len(), 1);
        assert!(q.job_dir(State::Queued, &id).join(MANIFEST).is_file());
        assert!(!taken.exists());
    }
}
