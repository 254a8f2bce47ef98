//! Digests of whole disk files: blake3 (ours) and sha256 (hyper2kvm's `checksum`).
//!
//! Holes in sparse files are hashed from a zero buffer instead of being read, so hashing follows
//! the allocated data; the digest is the same as `b3sum` / `sha256sum` over the whole file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use sha2::Digest as _;

use crate::manifest::Expected;

/// Read size for hashing and copying: large sequential I/O.
pub const IO_CHUNK: usize = 4 << 20;

/// Lowercase hex of 32 bytes.
pub fn to_hex(bytes: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Parse exactly 64 lowercase hex digits.
pub fn from_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nib(b[2 * i])? << 4) | nib(b[2 * i + 1])?;
    }
    Some(out)
}

/// The data extents of a file as (offset, length), from `SEEK_DATA`/`SEEK_HOLE`. A file system
/// without support reports the whole file as data, which is correct, only slower.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::SeekFrom;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(e) if e == rustix::io::Errno::NXIO => break,
            Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::OPNOTSUPP => {
                return Ok(vec![(0, len)]);
            }
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = match rustix::fs::seek(file, SeekFrom::Hole(start)) {
            Ok(p) => p.min(len),
            Err(e) => return Err(e.into()),
        };
        out.push((start, end - start));
        pos = end;
    }
    Ok(out)
}

/// Something that absorbs bytes in order: a hasher.
pub trait Absorb {
    fn absorb(&mut self, data: &[u8]);
}

impl Absorb for blake3::Hasher {
    fn absorb(&mut self, data: &[u8]) {
        self.update(data);
    }
}

impl Absorb for sha2::Sha256 {
    fn absorb(&mut self, data: &[u8]) {
        self.update(data);
    }
}

static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

/// Feed `n` zero bytes to a hasher without reading anything.
pub fn absorb_zeros(h: &mut impl Absorb, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.absorb(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Hash a whole file, reading only its data extents. `progress` is called with the bytes covered
/// so far; returning `false` stops the work with an `Interrupted` error.
pub fn hash_file(file: &File, h: &mut impl Absorb, mut progress: impl FnMut(u64) -> bool) -> io::Result<u64> {
    let mut report = |pos| {
        if progress(pos) { Ok(()) } else { Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled")) }
    };
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; IO_CHUNK];
    let mut pos = 0u64;
    for (start, elen) in data_extents(file, len)? {
        absorb_zeros(h, start - pos);
        pos = start;
        report(pos)?;
        let end = start + elen;
        while pos < end {
            let k = ((end - pos) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..k], pos)?;
            h.absorb(&buf[..k]);
            pos += k as u64;
            report(pos)?;
        }
    }
    absorb_zeros(h, len - pos);
    report(len)?;
    Ok(len)
}

/// Compute the digest of `file` in the algorithm of `expected` and compare.
/// Returns the actual digest in hex on mismatch. blake3 goes through the file's tree on two
/// threads, reading only its data and taking all-zero subtrees from `cache`
/// ([`crate::tree_hash`]); `progress` returning `false` stops the work.
pub fn verify(
    file: &File,
    expected: &Expected,
    cache: &crate::tree_hash::ZeroCache,
    mut progress: impl FnMut(u64) -> bool,
) -> io::Result<Result<(), String>> {
    let actual = match expected {
        Expected::Blake3(_) => {
            let len = file.metadata()?.len();
            let stop = std::sync::atomic::AtomicBool::new(false);
            crate::tree_hash::blake3_file(file, len, cache, &stop, |done| {
                if !progress(done) {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            })?
        }
        Expected::Sha256(_) => {
            let mut h = sha2::Sha256::new();
            hash_file(file, &mut h, progress)?;
            let out = h.finalize();
            let mut a = [0u8; 32];
            a.copy_from_slice(&out);
            a
        }
    };
    let want = match expected {
        Expected::Blake3(d) | Expected::Sha256(d) => d,
    };
    Ok(if &actual == want { Ok(()) } else { Err(to_hex(&actual)) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn hex_round_trip() {
        let b: [u8; 32] = std::array::from_fn(|i| (i * 7) as u8);
        assert_eq!(from_hex(&to_hex(&b)), Some(b));
        assert_eq!(from_hex(&"A".repeat(64)), None);
        assert_eq!(from_hex("00"), None);
    }

    #[test]
    fn sparse_hash_equals_plain_hash() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("sparse");
        let mut f = File::create(&p).expect("create");
        f.set_len(64 << 20).expect("set_len");
        f.seek(SeekFrom::Start(5 << 20)).expect("seek");
        f.write_all(&[7u8; 100_000]).expect("write");
        f.seek(SeekFrom::Start(40 << 20)).expect("seek");
        f.write_all(b"tail data").expect("write");
        f.sync_all().expect("sync");
        let f = File::open(&p).expect("open");
        let extents = data_extents(&f, 64 << 20).expect("extents");
        assert!(extents.iter().map(|e| e.1).sum::<u64>() < 64 << 20, "holes are found: {extents:?}");

        let mut h = blake3::Hasher::new();
        hash_file(&f, &mut h, |_| true).expect("hash");
        let plain = blake3::hash(&std::fs::read(&p).expect("read"));
        assert_eq!(h.finalize(), plain);

        let cache = crate::tree_hash::ZeroCache::memory();
        let ok = verify(&f, &Expected::Blake3(*plain.as_bytes()), &cache, |_| true).expect("verify");
        assert!(ok.is_ok());
        let bad = verify(&f, &Expected::Blake3([0; 32]), &cache, |_| true).expect("verify");
        assert_eq!(bad, Err(plain.to_hex().to_string()));
        let sha = sha2::Sha256::digest(std::fs::read(&p).expect("read"));
        let mut want = [0u8; 32];
        want.copy_from_slice(&sha);
        assert!(verify(&f, &Expected::Sha256(want), &cache, |_| true).expect("verify").is_ok());
    }
}
