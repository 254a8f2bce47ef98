//! VMDK descriptors: the text that says what kind of VMDK this is and where its data lives.

use std::path::{Path, PathBuf};

/// One `RW <sectors> <TYPE> "<file>" [offset]` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub sectors: u64,
    pub kind: String,
    pub file: Option<String>,
    pub offset_sectors: u64,
}

/// The parts of a descriptor we act on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub create_type: String,
    pub parent_cid: Option<String>,
    /// `parentFileNameHint`: the parent's file name (qemu opens it as a backing file whatever
    /// `parentCID` says).
    pub parent_hint: Option<String>,
    pub extents: Vec<Extent>,
}

impl Descriptor {
    /// A snapshot (delta) disk refers to a parent: a parent CID, or a parent file name.
    pub fn is_delta(&self) -> bool {
        self.parent_cid.as_deref().is_some_and(|p| !p.eq_ignore_ascii_case("ffffffff"))
            || self.parent_hint.as_deref().is_some_and(|h| !h.trim().is_empty())
    }
}

/// Parse descriptor text (tolerant of comments, blank lines and unknown keys).
pub fn parse(text: &str) -> Descriptor {
    let mut d = Descriptor::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let key = k.trim().to_ascii_lowercase();
            let val = v.trim().trim_matches('"').to_string();
            match key.as_str() {
                "createtype" => d.create_type = val,
                "parentcid" => d.parent_cid = Some(val),
                "parentfilenamehint" => d.parent_hint = Some(val),
                _ => {}
            }
            continue;
        }
        if let Some(e) = parse_extent(line) {
            d.extents.push(e);
        }
    }
    d
}

fn parse_extent(line: &str) -> Option<Extent> {
    let mut it = line.splitn(3, char::is_whitespace);
    let access = it.next()?;
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return None;
    }
    let rest = line[access.len()..].trim_start();
    let (sectors, rest) = rest.split_once(char::is_whitespace)?;
    let sectors: u64 = sectors.parse().ok()?;
    let rest = rest.trim_start();
    let (kind, rest) = match rest.split_once(char::is_whitespace) {
        Some((k, r)) => (k, r.trim_start()),
        None => (rest, ""),
    };
    let (file, rest) = if let Some(r) = rest.strip_prefix('"') {
        let end = r.find('"')?;
        (Some(r[..end].to_string()), r[end + 1..].trim())
    } else {
        (None, rest)
    };
    let offset_sectors = rest.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some(Extent { sectors, kind: kind.to_ascii_uppercase(), file, offset_sectors })
}

/// The descriptor embedded in a monolithic sparse or stream-optimized VMDK (`KDMV` header) that
/// starts at byte `base` of `file` (0 for a file; a member's offset inside an OVA). `head` is the
/// image's first bytes.
pub fn embedded_descriptor_at(file: &std::fs::File, base: u64, head: &[u8]) -> Option<Descriptor> {
    use std::os::unix::fs::FileExt;
    if head.len() < 44 || &head[..4] != b"KDMV" {
        return None;
    }
    let le64 = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    let (offset, size) = (le64(28), le64(36));
    if offset == 0 || size == 0 || size > 2048 {
        return None;
    }
    let mut buf = vec![0u8; (size * 512) as usize];
    file.read_exact_at(&mut buf, base + offset * 512).ok()?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(parse(&String::from_utf8_lossy(&buf[..end])))
}

/// [`embedded_descriptor_at`] for a whole file.
pub fn embedded_descriptor(head: &[u8], file: &std::fs::File) -> Option<Descriptor> {
    embedded_descriptor_at(file, 0, head)
}

/// Resolve an extent file name relative to the descriptor's directory, refusing absolute paths
/// and `..` (a descriptor must not make us read elsewhere).
pub fn extent_path(descriptor: &Path, name: &str) -> Result<PathBuf, String> {
    let p = Path::new(name);
    if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("extent {name:?} is outside the descriptor's directory"));
    }
    Ok(descriptor.parent().unwrap_or(Path::new(".")).join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_descriptor() {
        let d = parse(
            "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n\
             # Extent description\nRW 2097152 VMFS \"web-flat.vmdk\"\nRW 100 ZERO\nRW 20 FLAT \"b.img\" 8\n\nddb.adapterType = \"lsilogic\"\n",
        );
        assert_eq!(d.create_type, "vmfs");
        assert!(!d.is_delta());
        assert_eq!(d.extents.len(), 3);
        assert_eq!(
            d.extents[0],
            Extent { sectors: 2097152, kind: "VMFS".into(), file: Some("web-flat.vmdk".into()), offset_sectors: 0 }
        );
        assert_eq!(d.extents[1].kind, "ZERO");
        assert_eq!(d.extents[2].offset_sectors, 8);
    }

    #[test]
    fn detects_snapshot_deltas_and_escaping_extents() {
        assert!(parse("parentCID=1234abcd\n").is_delta());
        assert!(parse("parentCID=ffffffff\nparentFileNameHint=\"base.vmdk\"\n").is_delta());
        assert!(!parse("parentCID=ffffffff\n").is_delta());
        assert!(extent_path(Path::new("/vm/a.vmdk"), "../etc/shadow").is_err());
        assert!(extent_path(Path::new("/vm/a.vmdk"), "/dev/sda").is_err());
        assert_eq!(extent_path(Path::new("/vm/a.vmdk"), "a-flat.vmdk").expect("ok"), PathBuf::from("/vm/a-flat.vmdk"));
    }
}
