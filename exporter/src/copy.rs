//! Copy a disk into a job in one pass that also computes its blake3 digest.
//!
//! - Holes in sparse sources (SEEK_DATA/SEEK_HOLE) are not read and not written: the copy stays
//!   sparse and its digest covers the zeros exactly as `b3sum` would.
//! - Data moves with `copy_file_range` (in-kernel, server-side on NFS 4.2) while a second thread
//!   reads the same range and hashes it; where the kernel refuses (across file systems), a
//!   read/write loop hands each chunk to the hashing thread, so hashing overlaps the I/O.
//! - All-zero chunks of dense sources are skipped in the read/write loop (the copy gets holes).
//! - Large sequential I/O (8 MiB chunks); the copy is fsynced before it counts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

use hyperfarm_shared::digest::{self, absorb_zeros};
use hyperfarm_shared::tree_hash::{self, ZeroCache};

use crate::source::ova::MemberHasher;
use crate::source::{DiskData, Part};

/// Chunk size of the copy.
pub const CHUNK: usize = 8 << 20;

/// What a copy produced.
#[derive(Debug)]
pub struct Copied {
    pub bytes: u64,
    pub blake3: [u8; 32],
    /// The `.mf` digest of the source member, when one was asked for.
    pub member_hex: Option<String>,
    /// Whether the in-kernel copy was used.
    pub kernel_copy: bool,
}

/// Shared progress and cancellation. `cancel` is an `Arc` so that a signal handler can set it
/// the instant SIGTERM/SIGINT arrives (see `lib.rs::run`), not when a task gets to run.
#[derive(Debug, Default)]
pub struct Control {
    pub done: AtomicU64,
    pub cancel: Arc<AtomicBool>,
}

/// One contiguous piece of the output: `len` bytes at `dst_off`, from `src` at `src_off`, or zeros.
#[derive(Debug)]
struct Segment {
    src: Option<Arc<File>>,
    src_off: u64,
    dst_off: u64,
    len: u64,
}

/// Plan the segments of a disk: data extents of the source, holes as zero segments.
fn plan(data: &DiskData) -> io::Result<(Vec<Segment>, u64)> {
    let mut segs = Vec::new();
    let push_file =
        |file: Arc<File>, base: u64, len: u64, dst: u64, sparse: bool, segs: &mut Vec<Segment>| -> io::Result<()> {
            let extents = if sparse { digest::data_extents(&file, len)? } else { vec![(0, len)] };
            let mut pos = 0u64;
            for (start, elen) in extents {
                if start > pos {
                    segs.push(Segment { src: None, src_off: 0, dst_off: dst + pos, len: start - pos });
                }
                segs.push(Segment { src: Some(file.clone()), src_off: base + start, dst_off: dst + start, len: elen });
                pos = start + elen;
            }
            if pos < len {
                segs.push(Segment { src: None, src_off: 0, dst_off: dst + pos, len: len - pos });
            }
            Ok(())
        };
    let total = data.len();
    match data {
        DiskData::File { src, len } => push_file(src.file.clone(), 0, *len, 0, true, &mut segs)?,
        DiskData::Region { src, offset, len } => push_file(src.file.clone(), *offset, *len, 0, false, &mut segs)?,
        DiskData::Concat { parts, .. } => {
            let mut dst = 0u64;
            for Part { src, offset, len } in parts {
                match src {
                    Some(s) => {
                        // A whole-file extent can use the file's own holes.
                        let whole = *offset == 0 && s.len() == *len;
                        push_file(s.file.clone(), *offset, *len, dst, whole, &mut segs)?;
                    }
                    None => segs.push(Segment { src: None, src_off: 0, dst_off: dst, len: *len }),
                }
                dst += len;
            }
        }
    }
    Ok((segs, total))
}

enum ToHasher {
    /// Hash this buffer's first `n` bytes, then give it back.
    Buf(Vec<u8>, usize),
    /// Read `len` bytes at `off` of this file and hash them.
    Range(Arc<File>, u64, u64),
    Zeros(u64),
}

/// Copy `data` into the new file `dst` (which must not exist) and return its digest.
pub fn copy_disk(
    data: &DiskData,
    dst: &Path,
    member: Option<MemberHasher>,
    ctl: &Control,
    cache: &ZeroCache,
) -> io::Result<Copied> {
    if let (DiskData::File { src, len }, None) = (data, &member) {
        return copy_file(&src.file, *len, dst, ctl, cache);
    }
    let (segs, total) = plan(data)?;
    let out = OpenOptions::new().write(true).create_new(true).mode(0o644).open(dst)?;
    out.set_len(total)?;

    let (to_hasher, hasher_rx) = mpsc::sync_channel::<ToHasher>(3);
    let (pool_tx, pool_rx) = mpsc::sync_channel::<Vec<u8>>(4);
    for _ in 0..3 {
        pool_tx.send(vec![0u8; CHUNK]).expect("the pool is empty");
    }
    let hasher = std::thread::Builder::new().name("hash".into()).spawn(
        move || -> io::Result<(blake3::Hasher, Option<String>)> {
            let mut h = blake3::Hasher::new();
            let mut member = member;
            let mut scratch = vec![0u8; CHUNK];
            for msg in hasher_rx {
                match msg {
                    ToHasher::Buf(buf, n) => {
                        h.update(&buf[..n]);
                        if let Some(m) = member.as_mut() {
                            m.update(&buf[..n]);
                        }
                        let _ = pool_tx.send(buf);
                    }
                    ToHasher::Range(file, off, len) => {
                        let mut pos = 0u64;
                        while pos < len {
                            let k = ((len - pos) as usize).min(scratch.len());
                            file.read_exact_at(&mut scratch[..k], off + pos)?;
                            h.update(&scratch[..k]);
                            if let Some(m) = member.as_mut() {
                                m.update(&scratch[..k]);
                            }
                            pos += k as u64;
                        }
                    }
                    ToHasher::Zeros(n) => {
                        absorb_zeros(&mut h, n);
                        if let Some(m) = member.as_mut() {
                            let z = vec![0u8; (n.min(CHUNK as u64)) as usize];
                            let mut left = n;
                            while left > 0 {
                                let k = left.min(z.len() as u64) as usize;
                                m.update(&z[..k]);
                                left -= k as u64;
                            }
                        }
                    }
                }
            }
            Ok((h, member.map(|m| m.finish_hex())))
        },
    )?;

    let result = (|| -> io::Result<bool> {
        let mut kernel = true;
        for seg in &segs {
            let Some(src) = &seg.src else {
                to_hasher.send(ToHasher::Zeros(seg.len)).map_err(|_| hasher_gone())?;
                ctl.done.fetch_add(seg.len, Ordering::Relaxed);
                continue;
            };
            let mut pos = 0u64;
            while pos < seg.len {
                if ctl.cancel.load(Ordering::Relaxed) {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
                }
                let k = (seg.len - pos).min(CHUNK as u64);
                let (so, d) = (seg.src_off + pos, seg.dst_off + pos);
                if kernel {
                    match kernel_copy(src, so, &out, d, k) {
                        Ok(()) => {
                            to_hasher.send(ToHasher::Range(src.clone(), so, k)).map_err(|_| hasher_gone())?;
                            pos += k;
                            ctl.done.fetch_add(k, Ordering::Relaxed);
                            continue;
                        }
                        Err(e) if is_unsupported(&e) => kernel = false,
                        Err(e) => return Err(e),
                    }
                }
                let mut buf = pool_rx.recv().map_err(|_| hasher_gone())?;
                let n = k as usize;
                src.read_exact_at(&mut buf[..n], so)?;
                if !is_zero(&buf[..n]) {
                    out.write_all_at(&buf[..n], d)?;
                }
                to_hasher.send(ToHasher::Buf(buf, n)).map_err(|_| hasher_gone())?;
                pos += k;
                ctl.done.fetch_add(k, Ordering::Relaxed);
            }
        }
        Ok(kernel)
    })();
    drop(to_hasher);
    let hashed = hasher.join().map_err(|_| io::Error::other("the hashing thread panicked"))?;
    let kernel_copy = result?;
    let (h, member_hex) = hashed?;
    out.sync_all()?;
    Ok(Copied {
        bytes: total,
        blake3: *h.finalize().as_bytes(),
        member_hex,
        kernel_copy: kernel_copy && segs.iter().any(|s| s.src.is_some()),
    })
}

/// A whole file: copy its data extents while other threads (one per core) hash the source through
/// its BLAKE3 tree (zeros of holes taken from `cache` where known) and one more writes the copy
/// back to disk as it grows. Holes are neither read nor written.
fn copy_file(src: &File, len: u64, dst: &Path, ctl: &Control, cache: &ZeroCache) -> io::Result<Copied> {
    let out = OpenOptions::new().write(true).create_new(true).mode(0o644).open(dst)?;
    out.set_len(len)?;
    let extents = digest::data_extents(src, len)?;
    let stop = AtomicBool::new(false);
    let flusher = hyperfarm_shared::fsx::Flusher::start(dst.to_path_buf());
    let (digest, copied) = std::thread::scope(|s| {
        let hasher = s.spawn(|| tree_hash::blake3_file(src, len, cache, &stop, |_| {}));
        let copied = (|| -> io::Result<bool> {
            let mut kernel = true;
            let mut buf = Vec::new();
            let mut hole_end = 0u64;
            for (start, elen) in &extents {
                ctl.done.fetch_add(start - hole_end, Ordering::Relaxed);
                let mut pos = *start;
                let end = start + elen;
                while pos < end {
                    if ctl.cancel.load(Ordering::Relaxed) {
                        return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
                    }
                    let k = (end - pos).min(CHUNK as u64);
                    if kernel {
                        match kernel_copy(src, pos, &out, pos, k) {
                            Ok(()) => {
                                pos += k;
                                ctl.done.fetch_add(k, Ordering::Relaxed);
                                continue;
                            }
                            Err(e) if is_unsupported(&e) => kernel = false,
                            Err(e) => return Err(e),
                        }
                    }
                    buf.resize(k as usize, 0);
                    src.read_exact_at(&mut buf, pos)?;
                    if !is_zero(&buf) {
                        out.write_all_at(&buf, pos)?;
                    }
                    pos += k;
                    ctl.done.fetch_add(k, Ordering::Relaxed);
                }
                hole_end = end;
            }
            ctl.done.fetch_add(len - hole_end, Ordering::Relaxed);
            Ok(kernel)
        })();
        if copied.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let digest = hasher.join().map_err(|_| io::Error::other("the hashing thread panicked"));
        (digest, copied)
    });
    drop(flusher);
    let kernel_copy = copied?;
    let blake3 = digest??;
    out.sync_all()?;
    Ok(Copied { bytes: len, blake3, member_hex: None, kernel_copy: kernel_copy && !extents.is_empty() })
}

fn hasher_gone() -> io::Error {
    io::Error::other("the hashing thread stopped early")
}

/// `copy_file_range` of exactly `len` bytes.
fn kernel_copy(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<()> {
    let (mut so, mut d, mut left) = (src_off, dst_off, len);
    while left > 0 {
        let n = rustix::fs::copy_file_range(src, Some(&mut so), dst, Some(&mut d), left as usize)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the source ended early"));
        }
        left -= n as u64;
    }
    Ok(())
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) | Some(libc::EBADF)
    )
}

/// Whether a buffer is all zeros (word at a time).
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(16);
    words.remainder().iter().all(|&b| b == 0)
        && words.into_iter().all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    fn opened(p: &Path) -> crate::source::Opened {
        crate::source::VmDir::new(p.parent().expect("dir")).open(Path::new(p.file_name().expect("name"))).expect("open")
    }

    fn sparse_file(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("src.raw");
        let mut f = File::create(&p).expect("create");
        f.set_len(40 << 20).expect("len");
        f.seek(SeekFrom::Start(3 << 20)).expect("seek");
        f.write_all(&vec![0xa5u8; 5 << 20]).expect("write");
        f.seek(SeekFrom::Start(30 << 20)).expect("seek");
        f.write_all(b"end of data").expect("write");
        f.sync_all().expect("sync");
        p
    }

    #[test]
    fn copies_sparse_files_exactly_and_sparsely() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = sparse_file(d.path());
        let dst = d.path().join("dst.raw");
        let ctl = Control::default();
        let c = copy_disk(&DiskData::File { src: opened(&src), len: 40 << 20 }, &dst, None, &ctl, &ZeroCache::memory())
            .expect("copy");
        let (a, b) = (std::fs::read(&src).expect("read"), std::fs::read(&dst).expect("read"));
        assert!(a == b, "content differs");
        assert_eq!(c.blake3, *blake3::hash(&a).as_bytes());
        assert_eq!(ctl.done.load(Ordering::Relaxed), 40 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&dst).expect("md").blocks() * 512 < 20 << 20, "the copy stayed sparse");
    }

    #[test]
    fn copies_regions_and_concatenations_with_member_digest() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = sparse_file(d.path());
        let all = std::fs::read(&src).expect("read");
        let dst = d.path().join("region");
        let member = crate::source::ova::MemberDigest::Sha256(String::new()).hasher();
        let c = copy_disk(
            &DiskData::Region { src: opened(&src), offset: 1 << 20, len: 10 << 20 },
            &dst,
            Some(member),
            &Control::default(),
            &ZeroCache::memory(),
        )
        .expect("copy");
        let want = &all[1 << 20..11 << 20];
        assert!(std::fs::read(&dst).expect("read") == want);
        let mut h = crate::source::ova::MemberDigest::Sha256(String::new()).hasher();
        h.update(want);
        assert_eq!(c.member_hex, Some(h.finish_hex()));

        let dst2 = d.path().join("concat");
        let parts = vec![
            Part { src: Some(opened(&src)), offset: 3 << 20, len: 2 << 20 },
            Part { src: None, offset: 0, len: 1 << 20 },
            Part { src: Some(opened(&src)), offset: 0, len: 40 << 20 },
        ];
        let c = copy_disk(
            &DiskData::Concat { parts, len: 43 << 20 },
            &dst2,
            None,
            &Control::default(),
            &ZeroCache::memory(),
        )
        .expect("copy");
        let mut expect = all[3 << 20..5 << 20].to_vec();
        expect.extend(vec![0u8; 1 << 20]);
        expect.extend(&all);
        assert!(std::fs::read(&dst2).expect("read") == expect);
        assert_eq!(c.blake3, *blake3::hash(&expect).as_bytes());
    }

    #[test]
    fn refuses_to_overwrite_and_can_be_cancelled() {
        let d = tempfile::tempdir().expect("tempdir");
        let src = sparse_file(d.path());
        let dst = d.path().join("dst");
        std::fs::write(&dst, b"x").expect("write");
        assert!(
            copy_disk(
                &DiskData::File { src: opened(&src), len: 40 << 20 },
                &dst,
                None,
                &Control::default(),
                &ZeroCache::memory()
            )
            .is_err()
        );
        let ctl = Control::default();
        ctl.cancel.store(true, Ordering::Relaxed);
        let e = copy_disk(
            &DiskData::File { src: opened(&src), len: 40 << 20 },
            &d.path().join("dst2"),
            None,
            &ctl,
            &ZeroCache::memory(),
        )
        .expect_err("cancelled");
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 100]));
        let mut b = vec![0u8; 100];
        b[99] = 1;
        assert!(!is_zero(&b));
        b[99] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
    }
}
