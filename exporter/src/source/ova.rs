//! OVA archives: a tar holding the OVF first, optionally a manifest (`.mf`) of digests, and the
//! disks. Disks are copied straight out of the archive (no extraction to a temporary place) and
//! the `.mf` digests are checked in the same pass.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use sha2::Digest as _;

use super::{DiskData, Opened, SourceDisk, SourceError, VmSource, bad, dedupe_ids, disk_id, ovf};
use hyperfarm_shared::format::{self, Sniffed};
use hyperfarm_shared::text::Esc;

/// Most entries (of any type) an OVA may have.
pub const MAX_MEMBERS: usize = 10_000;

/// A digest from the OVA's `.mf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberDigest {
    Sha1(String),
    Sha256(String),
    Sha512(String),
}

impl MemberDigest {
    pub fn algorithm(&self) -> &'static str {
        match self {
            MemberDigest::Sha1(_) => "SHA1",
            MemberDigest::Sha256(_) => "SHA256",
            MemberDigest::Sha512(_) => "SHA512",
        }
    }
    pub fn hex(&self) -> &str {
        match self {
            MemberDigest::Sha1(h) | MemberDigest::Sha256(h) | MemberDigest::Sha512(h) => h,
        }
    }
    /// A hasher for this algorithm.
    pub fn hasher(&self) -> MemberHasher {
        match self {
            MemberDigest::Sha1(_) => MemberHasher::Sha1(sha1::Sha1::new()),
            MemberDigest::Sha256(_) => MemberHasher::Sha256(sha2::Sha256::new()),
            MemberDigest::Sha512(_) => MemberHasher::Sha512(sha2::Sha512::new()),
        }
    }
}

/// Computes a member digest while the member is copied.
pub enum MemberHasher {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl MemberHasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            MemberHasher::Sha1(h) => h.update(data),
            MemberHasher::Sha256(h) => h.update(data),
            MemberHasher::Sha512(h) => h.update(data),
        }
    }
    pub fn finish_hex(self) -> String {
        let bytes: Vec<u8> = match self {
            MemberHasher::Sha1(h) => h.finalize().to_vec(),
            MemberHasher::Sha256(h) => h.finalize().to_vec(),
            MemberHasher::Sha512(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Parse `SHA256(name)= hex` lines.
pub fn parse_mf(text: &str) -> Vec<(String, MemberDigest)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((lhs, hex)) = line.split_once('=') else {
            continue;
        };
        let hex = hex.trim().to_ascii_lowercase();
        let Some((alg, rest)) = lhs.trim().split_once('(') else {
            continue;
        };
        let Some(name) = rest.strip_suffix(')') else {
            continue;
        };
        let d = match alg.trim().to_ascii_uppercase().as_str() {
            "SHA1" => MemberDigest::Sha1(hex),
            "SHA256" => MemberDigest::Sha256(hex),
            "SHA512" => MemberDigest::Sha512(hex),
            _ => continue,
        };
        out.push((name.to_string(), d));
    }
    out
}

#[derive(Debug, Clone)]
struct Member {
    offset: u64,
    size: u64,
}

/// Load an OVA, open as `top`: every member is read through that one descriptor.
pub fn load(path: &Path, top: &Opened) -> Result<VmSource, SourceError> {
    let file: &File = &top.file;
    let archive_len = top.len();
    let truncated = |name: &str| {
        bad(
            path,
            format!(
                "is truncated: member {} ends beyond the archive's {archive_len} bytes; the OVA was cut short (an interrupted download or copy): download or export it again",
                Esc(name)
            ),
        )
    };
    let mut members: HashMap<String, Member> = HashMap::new();
    let mut order = Vec::new();
    let mut entries_seen = 0usize;
    let mut names_seen = std::collections::HashSet::new();
    let mut archive = tar::Archive::new(file.try_clone().map_err(|e| bad(path, e.to_string()))?);
    let entries = archive.entries_with_seek().map_err(|e| bad(path, format!("is not a readable OVA (tar): {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "is truncated: the archive ends in the middle of a member's header; download or export it again"
                    .to_string()
            } else {
                format!("is a damaged OVA (tar): {e}; download or export it again")
            };
            bad(path, why)
        })?;
        // Every entry counts, whatever its type: directories and links must not escape the cap.
        entries_seen += 1;
        if entries_seen > MAX_MEMBERS {
            return Err(bad(path, format!("has more than {MAX_MEMBERS} entries; it is not an OVA")));
        }
        let name =
            entry.path().map_err(|e| bad(path, format!("has a bad member name: {e}")))?.to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        if kind.is_gnu_sparse() {
            return Err(bad(
                path,
                format!(
                    "member {} is a GNU sparse tar entry, which OVA does not allow; re-create the OVA with a standard tar",
                    Esc(&name)
                ),
            ));
        }
        // A name seen twice (as a file, or as a file and a link to one) is ambiguous.
        if !names_seen.insert(name.clone()) {
            return Err(bad(
                path,
                format!(
                    "holds the member {} twice; which one is meant is ambiguous, so the OVA is refused: re-create it",
                    Esc(&name)
                ),
            ));
        }
        if !kind.is_file() {
            continue;
        }
        let m = Member { offset: entry.raw_file_position(), size: entry.size() };
        if m.offset.checked_add(m.size).is_none_or(|end| end > archive_len) {
            return Err(truncated(&name));
        }
        order.push(name.clone());
        members.insert(name, m);
    }
    let ovfs: Vec<&String> = order.iter().filter(|n| n.to_ascii_lowercase().ends_with(".ovf")).collect();
    let ovf_name = match ovfs.as_slice() {
        [one] => (*one).clone(),
        [] => return Err(bad(path, "is a tar archive without an .ovf descriptor, so not an OVA")),
        many => {
            return Err(bad(
                path,
                format!(
                    "holds {} OVF descriptors ({}); an OVA has exactly one, so which VM is meant is ambiguous: re-create it",
                    many.len(),
                    many.iter().map(|n| Esc(n.as_str()).to_string()).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    };
    let read_member = |name: &str, limit: u64| -> Result<Vec<u8>, SourceError> {
        let m = &members[name];
        if m.size > limit {
            return Err(bad(path, format!("member {} is {} bytes, too large for a descriptor", Esc(name), m.size)));
        }
        let mut buf = vec![0u8; m.size as usize];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, m.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                truncated(name)
            } else {
                bad(path, format!("reading member {}: {e}", Esc(name)))
            }
        })?;
        Ok(buf)
    };
    let ovf_bytes = read_member(&ovf_name, 16 << 20)?;
    let mf = order.iter().find(|n| n.to_ascii_lowercase().ends_with(".mf")).cloned();
    let digests = match &mf {
        Some(n) => parse_mf(&String::from_utf8_lossy(&read_member(n, 1 << 20)?)),
        None => vec![],
    };
    // The descriptor's own digest, if listed.
    if let Some((_, d)) = digests.iter().find(|(n, _)| *n == ovf_name) {
        let mut h = d.hasher();
        h.update(&ovf_bytes);
        if h.finish_hex() != d.hex() {
            return Err(bad(
                path,
                format!(
                    "the {} digest of {} does not match the OVA's manifest; the OVA is corrupt",
                    d.algorithm(),
                    Esc(&ovf_name)
                ),
            ));
        }
    }
    let ovf_shown = Esc(&ovf_name).to_string();
    let info = ovf::parse(&String::from_utf8_lossy(&ovf_bytes)).map_err(|m| bad(path, format!("{ovf_shown} {m}")))?;
    let mut disks = Vec::new();
    for (i, d) in info.disks.iter().enumerate() {
        ovf::check_href(&d.href).map_err(|m| bad(path, format!("{ovf_shown} {m}")))?;
        let m = members.get(&d.href).ok_or_else(|| {
            bad(
                path,
                format!("{ovf_shown} refers to {}, which is not in the archive; the OVA is incomplete", Esc(&d.href)),
            )
        })?;
        if let Some(size) = d.size
            && size != m.size
        {
            return Err(bad(
                path,
                format!("member {} is {} bytes but the OVF says {size}; the OVA is incomplete", Esc(&d.href), m.size),
            ));
        }
        let region = RegionFile { file, offset: m.offset, len: m.size };
        let head = region.head(4096).map_err(|e| bad(path, e.to_string()))?;
        let tail = region.tail(512).map_err(|e| bad(path, e.to_string()))?;
        let fmt = match format::sniff_bytes(&head, tail.as_deref()) {
            Sniffed::Disk(f) => f,
            Sniffed::VmdkDescriptor => {
                return Err(bad(
                    path,
                    format!(
                        "member {} is a VMDK descriptor without data; OVAs must carry stream-optimized or monolithic disks",
                        Esc(&d.href)
                    ),
                ));
            }
            Sniffed::Unknown => {
                if m.size % 512 != 0 {
                    return Err(bad(path, format!("member {} is not a recognised disk image", Esc(&d.href))));
                }
                hyperfarm_shared::format::DiskFormat::Raw
            }
        };
        format::self_contained(file, m.offset, fmt, &head)
            .map_err(|msg| bad(path, format!("member {} {msg}", Esc(&d.href))))?;
        disks.push(SourceDisk {
            id: disk_id(&d.disk_id, i),
            format: fmt,
            data: DiskData::Region { src: top.clone(), offset: m.offset, len: m.size },
            label: format!("{} ({})", Esc(&d.disk_id), Esc(&d.href)),
            member: Some(d.href.clone()),
        });
    }
    dedupe_ids(&mut disks);
    let expected_member_digests =
        digests.into_iter().filter(|(n, _)| info.disks.iter().any(|d| &d.href == n)).collect();
    Ok(VmSource {
        name: if info.name.is_empty() {
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            info.name
        },
        cpu: info.cpu,
        memory_mib: info.memory_mib,
        firmware: info.firmware,
        disks,
        kind: "ova",
        path: path.to_path_buf(),
        expected_member_digests,
        nics: info.nics,
        vm_id: None,
        guest: info.guest,
    })
}

struct RegionFile<'a> {
    file: &'a File,
    offset: u64,
    len: u64,
}

impl RegionFile<'_> {
    fn head(&self, n: u64) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; n.min(self.len) as usize];
        self.file.read_exact_at(&mut buf, self.offset)?;
        Ok(buf)
    }
    fn tail(&self, n: u64) -> std::io::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        if self.len < n {
            return Ok(None);
        }
        let mut buf = vec![0u8; n as usize];
        self.file.read_exact_at(&mut buf, self.offset + self.len - n)?;
        Ok(Some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_manifest_lines() {
        let mf = parse_mf("SHA256(web.ovf)= ABCDEF\nSHA1(disk1.vmdk)=0123\nMD5(x)= 00\ngarbage\n");
        assert_eq!(mf.len(), 2);
        assert_eq!(mf[0], ("web.ovf".into(), MemberDigest::Sha256("abcdef".into())));
        assert_eq!(mf[1].1.algorithm(), "SHA1");
        let mut h = MemberDigest::Sha256(String::new()).hasher();
        h.update(b"abc");
        assert_eq!(h.finish_hex(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
