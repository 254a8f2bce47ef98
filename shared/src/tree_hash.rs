//! BLAKE3 of a whole file through its tree, identical to `b3sum`, made fast for disk images:
//!
//! - the tree is cut into subtrees near its root, one per core (2 to 8), each hashed on its own
//!   thread;
//! - data is read only where the file has data (SEEK_DATA/SEEK_HOLE); holes are hashed as zeros;
//! - a subtree that lies entirely inside a hole has a chaining value that depends only on its
//!   position and size, so it is computed once and kept in a [`ZeroCache`] (in memory, and in a
//!   file under a cache directory): disks with holes in the same places — VMs made from the same
//!   template — no longer pay for hashing gigabytes of zeros.
//!
//! Built on `blake3::hazmat` (subtree chaining values and merging). The result is checked against
//! `blake3::hash` in the tests below and against `b3sum` by the benchmark.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};

use crate::digest::data_extents;

/// Largest node hashed in one piece (read into one buffer).
const LEAF: u64 = 4 << 20;
/// Smallest all-zero subtree worth remembering.
const ZERO_MIN: u64 = 1 << 20;
/// One cache record: offset, length, chaining value.
const RECORD: usize = 8 + 8 + 32;
/// Records kept in a cache file at most (6 MiB).
const MAX_RECORDS: usize = 131_072;

static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

/// Chaining values of all-zero subtrees, by (offset, length).
#[derive(Debug, Default)]
pub struct ZeroCache {
    map: Mutex<HashMap<(u64, u64), ChainingValue>>,
    file: Option<PathBuf>,
    new: Mutex<Vec<(u64, u64, ChainingValue)>>,
}

impl ZeroCache {
    /// A cache that lives only in memory.
    pub fn memory() -> ZeroCache {
        ZeroCache::default()
    }

    /// A cache backed by `dir/blake3-zero-subtrees.bin` (created if missing). A directory that
    /// cannot be used gives a memory-only cache.
    pub fn open(dir: &Path) -> ZeroCache {
        let path = dir.join("blake3-zero-subtrees.bin");
        let mut map = HashMap::new();
        if let Ok(mut f) = File::open(&path) {
            let mut buf = Vec::new();
            if f.read_to_end(&mut buf).is_ok() {
                // Whole records only: a torn last record (a crash while appending) is ignored.
                for r in buf.chunks_exact(RECORD).take(MAX_RECORDS) {
                    let off = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                    let len = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
                    let mut cv = [0u8; 32];
                    cv.copy_from_slice(&r[16..48]);
                    map.insert((off, len), cv);
                }
            }
        }
        let usable = std::fs::create_dir_all(dir).is_ok();
        ZeroCache { map: Mutex::new(map), file: usable.then_some(path), new: Mutex::default() }
    }

    /// The default cache directory: `$HYPERFARM_CACHE_DIR`, else systemd's `$CACHE_DIRECTORY`, else
    /// `$XDG_CACHE_HOME/hyperfarm`, else `~/.cache/hyperfarm`.
    pub fn default_dir() -> Option<PathBuf> {
        // systemd's CacheDirectory= sets $CACHE_DIRECTORY.
        for var in ["HYPERFARM_CACHE_DIR", "CACHE_DIRECTORY"] {
            if let Some(d) = std::env::var_os(var) {
                let first = d.to_string_lossy().split(':').next().unwrap_or_default().to_string();
                return Some(PathBuf::from(first));
            }
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
            return Some(PathBuf::from(d).join("hyperfarm"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hyperfarm"))
    }

    /// Open the default cache directory, or memory only.
    pub fn open_default() -> ZeroCache {
        match Self::default_dir() {
            Some(d) => Self::open(&d),
            None => Self::memory(),
        }
    }

    fn get(&self, off: u64, len: u64) -> Option<ChainingValue> {
        self.map.lock().expect("zero cache").get(&(off, len)).copied()
    }

    /// Remember a chaining value; a full cache (MAX_RECORDS) learns nothing more, so a
    /// long-running agent's memory stays bounded (at most about 10 MiB).
    fn put(&self, off: u64, len: u64, cv: ChainingValue) {
        {
            let mut map = self.map.lock().expect("zero cache");
            if map.len() >= MAX_RECORDS {
                return;
            }
            map.insert((off, len), cv);
        }
        self.new.lock().expect("zero cache").push((off, len, cv));
    }

    /// Append what was learnt to the cache file (best effort: a cache is never required).
    pub fn save(&self) {
        let Some(path) = &self.file else { return };
        let new = std::mem::take(&mut *self.new.lock().expect("zero cache"));
        if new.is_empty() {
            return;
        }
        let existing = std::fs::metadata(path).map(|m| m.len() as usize / RECORD).unwrap_or(0);
        if existing + new.len() > MAX_RECORDS {
            let _ = std::fs::remove_file(path);
        }
        let mut buf = Vec::with_capacity(new.len() * RECORD);
        for (off, len, cv) in new {
            buf.extend_from_slice(&off.to_le_bytes());
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&cv);
        }
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = f.write_all(&buf);
        }
    }

    /// How many subtrees are known.
    pub fn len(&self) -> usize {
        self.map.lock().expect("zero cache").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Job<'a> {
    file: &'a File,
    extents: Vec<(u64, u64)>,
    cache: &'a ZeroCache,
    done: AtomicU64,
    stop: &'a AtomicBool,
}

impl Job<'_> {
    /// Whether `[off, off + len)` holds no data extent.
    fn is_hole(&self, off: u64, len: u64) -> bool {
        let end = off + len;
        // Extents are sorted; find the first that ends after `off`.
        let i = self.extents.partition_point(|(s, l)| s + l <= off);
        self.extents.get(i).is_none_or(|(s, _)| *s >= end)
    }

    fn check(&self) -> io::Result<()> {
        if self.stop.load(Ordering::Relaxed) {
            Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"))
        } else {
            Ok(())
        }
    }

    /// The chaining value of the (valid) subtree `[off, off + len)`.
    fn cv(&self, off: u64, len: u64, buf: &mut Vec<u8>) -> io::Result<ChainingValue> {
        self.check()?;
        if len >= ZERO_MIN && self.is_hole(off, len) {
            if let Some(cv) = self.cache.get(off, len) {
                self.done.fetch_add(len, Ordering::Relaxed);
                return Ok(cv);
            }
            let mut h = blake3::Hasher::new();
            h.set_input_offset(off);
            let mut left = len;
            while left > 0 {
                let k = left.min(ZEROS.len() as u64) as usize;
                h.update(&ZEROS[..k]);
                left -= k as u64;
            }
            let cv = h.finalize_non_root();
            self.cache.put(off, len, cv);
            self.done.fetch_add(len, Ordering::Relaxed);
            return Ok(cv);
        }
        if len <= LEAF {
            buf.resize(len as usize, 0);
            self.read(off, buf)?;
            self.done.fetch_add(len, Ordering::Relaxed);
            return Ok(blake3::Hasher::new().set_input_offset(off).update(buf).finalize_non_root());
        }
        let l = left_subtree_len(len);
        let a = self.cv(off, l, buf)?;
        let b = self.cv(off + l, len - l, buf)?;
        Ok(merge_subtrees_non_root(&a, &b, Mode::Hash))
    }

    /// Read `[off, off + buf.len())`, zeros in holes (only data extents are read).
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = off + buf.len() as u64;
        buf.fill(0);
        let i = self.extents.partition_point(|(s, l)| s + l <= off);
        for (s, l) in &self.extents[i..] {
            if *s >= end {
                break;
            }
            let (a, b) = ((*s).max(off), (s + l).min(end));
            self.file.read_exact_at(&mut buf[(a - off) as usize..(b - off) as usize], a)?;
        }
        Ok(())
    }
}

/// BLAKE3 of the first `len` bytes of `file` (its whole length, normally), on as many threads as
/// the machine has cores (at least two, at most eight). `progress` is called from time to time with
/// the bytes covered; setting `stop` interrupts.
pub fn blake3_file(
    file: &File,
    len: u64,
    cache: &ZeroCache,
    stop: &AtomicBool,
    progress: impl FnMut(u64),
) -> io::Result<[u8; 32]> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(2, 8);
    blake3_file_split(file, len, cache, stop, cores.next_power_of_two().trailing_zeros(), progress)
}

/// [`blake3_file`] with the tree cut `depth` levels below its root (into at most `2^depth`
/// subtrees, one thread each; `depth` at least 1).
fn blake3_file_split(
    file: &File,
    len: u64,
    cache: &ZeroCache,
    stop: &AtomicBool,
    depth: u32,
    mut progress: impl FnMut(u64),
) -> io::Result<[u8; 32]> {
    if len <= blake3::CHUNK_LEN as u64 {
        let mut buf = vec![0u8; len as usize];
        file.read_exact_at(&mut buf, 0)?;
        return Ok(*blake3::hash(&buf).as_bytes());
    }
    let job = Job { file, extents: data_extents(file, len)?, cache, done: AtomicU64::new(0), stop };
    let mut pieces = Vec::new();
    cut(0, len, depth.max(1), &mut pieces);
    let cvs = std::thread::scope(|s| -> io::Result<Vec<ChainingValue>> {
        let (tx, rx) = std::sync::mpsc::channel();
        for (i, &(off, n)) in pieces.iter().enumerate() {
            let (tx, job) = (tx.clone(), &job);
            s.spawn(move || tx.send((i, job.cv(off, n, &mut Vec::new()))));
        }
        drop(tx);
        let mut cvs: Vec<Option<ChainingValue>> = vec![None; pieces.len()];
        let mut received = 0;
        while received < pieces.len() {
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok((i, r)) => {
                    cvs[i] = Some(r?);
                    received += 1;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => progress(job.done.load(Ordering::Relaxed)),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("a hashing thread died"));
                }
            }
        }
        Ok(cvs.into_iter().map(|c| c.expect("every piece was received")).collect())
    })?;
    progress(len);
    cache.save();
    let mut next = cvs.iter();
    let l = left_subtree_len(len);
    let a = join(l, depth.max(1) - 1, &mut next);
    let b = join(len - l, depth.max(1) - 1, &mut next);
    Ok(*merge_subtrees_root(&a, &b, Mode::Hash).as_bytes())
}

/// The subtrees `depth` levels below `[off, off + len)`, in order (a single chunk is not cut).
fn cut(off: u64, len: u64, depth: u32, out: &mut Vec<(u64, u64)>) {
    if depth == 0 || len <= blake3::CHUNK_LEN as u64 {
        out.push((off, len));
        return;
    }
    let l = left_subtree_len(len);
    cut(off, l, depth - 1, out);
    cut(off + l, len - l, depth - 1, out);
}

/// The chaining value of a subtree of `len` bytes from its pieces' values, cut as [`cut`] cut
/// them (where a subtree is cut depends only on its length).
fn join<'a>(len: u64, depth: u32, next: &mut impl Iterator<Item = &'a ChainingValue>) -> ChainingValue {
    if depth == 0 || len <= blake3::CHUNK_LEN as u64 {
        return *next.next().expect("one value per piece");
    }
    let l = left_subtree_len(len);
    let a = join(l, depth - 1, next);
    let b = join(len - l, depth - 1, next);
    merge_subtrees_non_root(&a, &b, Mode::Hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};

    fn file_with(dir: &Path, name: &str, len: u64, regions: &[(u64, &[u8])]) -> (File, Vec<u8>) {
        let p = dir.join(name);
        let mut f = File::create(&p).expect("create");
        f.set_len(len).expect("len");
        for (off, data) in regions {
            f.seek(SeekFrom::Start(*off)).expect("seek");
            f.write_all(data).expect("write");
        }
        f.sync_all().expect("sync");
        let all = std::fs::read(&p).expect("read");
        (File::open(&p).expect("open"), all)
    }

    #[test]
    fn equals_plain_blake3_for_many_shapes() {
        let d = tempfile::tempdir().expect("tempdir");
        let stop = AtomicBool::new(false);
        let cache = ZeroCache::memory();
        let noise: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        type Regions<'a> = Vec<(u64, &'a [u8])>;
        let shapes: Vec<(u64, Regions)> = vec![
            (0, vec![]),
            (1, vec![(0, &noise[..1])]),
            (1024, vec![(0, &noise[..1024])]),
            (1025, vec![(0, &noise[..1025])]),
            (5 << 20, vec![]),
            (3_000_000, vec![(0, &noise[..])]),
            (24 << 20, vec![(5 << 20, &noise[..100_000]), (20 << 20, &noise[..7])]),
            ((40 << 20) + 12_345, vec![(0, &noise[..4096]), ((40 << 20) + 10_000, &noise[..2345])]),
        ];
        for (i, (len, regions)) in shapes.iter().enumerate() {
            let (f, all) = file_with(d.path(), &format!("f{i}"), *len, regions);
            let want = *blake3::hash(&all).as_bytes();
            assert_eq!(blake3_file(&f, *len, &cache, &stop, |_| {}).expect("hash"), want, "shape {i} (len {len})");
            // Cut into 2, 4, 8 and 16 pieces (one thread each), as on machines with more cores.
            for depth in 1..=4 {
                let got = blake3_file_split(&f, *len, &cache, &stop, depth, |_| {}).expect("hash");
                assert_eq!(got, want, "shape {i} (len {len}) in up to {} pieces", 1 << depth);
            }
        }
        assert!(!cache.is_empty(), "zero subtrees were remembered");
        // Same again with a warm cache: same answers.
        let (f, all) = file_with(d.path(), "again", 24 << 20, &[(5 << 20, &noise[..100_000])]);
        assert_eq!(blake3_file(&f, 24 << 20, &cache, &stop, |_| {}).expect("hash"), *blake3::hash(&all).as_bytes());
    }

    #[test]
    fn the_cache_file_survives_and_torn_records_are_ignored() {
        let d = tempfile::tempdir().expect("tempdir");
        let stop = AtomicBool::new(false);
        let (f, all) = file_with(d.path(), "s", 64 << 20, &[(1 << 20, b"data")]);
        let cache = ZeroCache::open(&d.path().join("cache"));
        assert_eq!(blake3_file(&f, 64 << 20, &cache, &stop, |_| {}).expect("hash"), *blake3::hash(&all).as_bytes());
        let n = cache.len();
        drop(cache);
        let file = d.path().join("cache/blake3-zero-subtrees.bin");
        std::fs::OpenOptions::new().append(true).open(&file).expect("open").write_all(&[1, 2, 3]).expect("torn");
        let cache = ZeroCache::open(&d.path().join("cache"));
        assert_eq!(cache.len(), n);
        assert_eq!(blake3_file(&f, 64 << 20, &cache, &stop, |_| {}).expect("hash"), *blake3::hash(&all).as_bytes());
    }

    #[test]
    fn a_full_cache_learns_nothing_more() {
        let cache = ZeroCache::memory();
        for i in 0..(MAX_RECORDS as u64 + 10) {
            cache.put(i << 20, 1 << 20, [0u8; 32]);
        }
        assert_eq!(cache.len(), MAX_RECORDS);
        assert_eq!(cache.new.lock().expect("lock").len(), MAX_RECORDS);
        assert!(cache.get(0, 1 << 20).is_some());
        assert!(cache.get((MAX_RECORDS as u64) << 20, 1 << 20).is_none());
    }

    #[test]
    fn can_be_stopped() {
        let d = tempfile::tempdir().expect("tempdir");
        let (f, _) = file_with(d.path(), "s", 64 << 20, &[(0, &[1u8; 1 << 20])]);
        let stop = AtomicBool::new(true);
        let e = blake3_file(&f, 64 << 20, &ZeroCache::memory(), &stop, |_| {}).expect_err("stopped");
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
    }
}
