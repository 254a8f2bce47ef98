//! Reading a local VM: an OVA, an OVF with its disks, a VMX with its VMDKs, or a single disk
//! image. Formats are detected from content. VM facts come from the OVF/VMX where present.

pub mod ova;
pub mod ovf;
pub mod vmx;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hyperfarm_shared::format::{self, DiskFormat, Sniffed};
use hyperfarm_shared::names;
use hyperfarm_shared::vmdk;

/// Where a disk's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskData {
    /// A whole file (holes are found with SEEK_DATA/SEEK_HOLE and not copied).
    File { path: PathBuf, len: u64 },
    /// A byte range of a file (a member of an OVA).
    Region { path: PathBuf, offset: u64, len: u64 },
    /// Extents laid end to end (a flat VMDK: descriptor + extent files) copied as one raw disk;
    /// a part without a path is zeros.
    Concat { parts: Vec<Part>, len: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub path: Option<PathBuf>,
    pub offset: u64,
    pub len: u64,
}

impl DiskData {
    pub fn len(&self) -> u64 {
        match self {
            DiskData::File { len, .. } | DiskData::Region { len, .. } | DiskData::Concat { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A file to show in messages.
    pub fn describe(&self) -> String {
        match self {
            DiskData::File { path, .. } => path.display().to_string(),
            DiskData::Region { path, offset, .. } => {
                format!("{} (at byte {offset})", path.display())
            }
            DiskData::Concat { parts, .. } => parts
                .iter()
                .filter_map(|p| p.path.as_ref().map(|x| x.display().to_string()))
                .collect::<Vec<_>>()
                .join(" + "),
        }
    }
}

/// One disk of the VM, in boot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDisk {
    /// The manifest disk id (`disk0`, `scsi0-1`, the OVF's diskId…).
    pub id: String,
    pub format: DiskFormat,
    pub data: DiskData,
    /// Where it came from, for messages.
    pub label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    Uefi,
    Unknown,
}

impl Firmware {
    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::Unknown => "unknown",
        }
    }
}

/// A VM ready to export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSource {
    pub name: String,
    pub cpu: Option<u32>,
    pub memory_mib: Option<u64>,
    pub firmware: Firmware,
    pub disks: Vec<SourceDisk>,
    /// `ova`, `ovf`, `vmx` or `disk`.
    pub kind: &'static str,
    pub path: PathBuf,
    /// OVA manifest (`.mf`) digests by member name, verified while copying.
    pub expected_member_digests: Vec<(String, ova::MemberDigest)>,
}

/// Bad input: exit code 3.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SourceError {
    pub path: PathBuf,
    pub message: String,
}

pub fn bad(path: &Path, message: impl Into<String>) -> SourceError {
    SourceError { path: path.to_path_buf(), message: message.into() }
}

fn io_bad(path: &Path, e: io::Error) -> SourceError {
    bad(path, format!("cannot read it: {e}"))
}

/// What kind of input a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Ova,
    Ovf,
    Vmx,
    Disk,
}

/// Detect and load the VM at `path`. `name` overrides the VM name.
pub fn load(path: &Path, name: Option<&str>) -> Result<VmSource, SourceError> {
    let path = if path.is_dir() { find_descriptor_in(path)? } else { path.to_path_buf() };
    let file = File::open(&path).map_err(|e| io_bad(&path, e))?;
    let kind = detect(&file).map_err(|e| io_bad(&path, e))?;
    let mut vm = match kind {
        InputKind::Ova => ova::load(&path, &file)?,
        InputKind::Ovf => ovf::load_file(&path)?,
        InputKind::Vmx => vmx::load(&path)?,
        InputKind::Disk => {
            let disk = load_disk_file(&path, "disk0")?;
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let stem = stem.trim_end_matches("-flat").to_string();
            VmSource {
                name: stem,
                cpu: None,
                memory_mib: None,
                firmware: Firmware::Unknown,
                disks: vec![disk],
                kind: "disk",
                path: path.clone(),
                expected_member_digests: vec![],
            }
        }
    };
    vm.name = match name {
        Some(n) => {
            names::check_vm_name(n).map_err(|e| bad(&path, format!("--name: {e}")))?;
            n.to_string()
        }
        None => names::sanitize_vm_name(&vm.name).ok_or_else(|| {
            bad(&path, format!("the VM name {:?} has no usable characters; give one with --name", vm.name))
        })?,
    };
    if vm.disks.is_empty() {
        return Err(bad(&path, "the VM has no disks to export"));
    }
    Ok(vm)
}

fn find_descriptor_in(dir: &Path) -> Result<PathBuf, SourceError> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_bad(dir, e))? {
        let p = e.map_err(|e| io_bad(dir, e))?.path();
        let ext = p.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if matches!(ext.as_str(), "ovf" | "vmx" | "ova") {
            found.push(p);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(bad(
            dir,
            "is a directory without an .ova, .ovf or .vmx file; point --vm at the VM's descriptor or disk",
        )),
        _ => Err(bad(
            dir,
            format!(
                "holds several VM descriptors ({}); point --vm at one of them",
                found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Look at the content: tar (OVA), OVF XML, VMX text, or a disk image.
pub fn detect(file: &File) -> io::Result<InputKind> {
    let len = file.metadata()?.len();
    let mut head = vec![0u8; 4096.min(len as usize)];
    file.read_exact_at(&mut head, 0)?;
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        return Ok(InputKind::Ova);
    }
    if matches!(format::sniff(file)?, Sniffed::Disk(_) | Sniffed::VmdkDescriptor) {
        return Ok(InputKind::Disk);
    }
    let text = String::from_utf8_lossy(&head);
    if text.contains("<Envelope") || text.contains(":Envelope") {
        return Ok(InputKind::Ovf);
    }
    if looks_like_vmx(&text) {
        return Ok(InputKind::Vmx);
    }
    Ok(InputKind::Disk)
}

fn looks_like_vmx(text: &str) -> bool {
    text.lines().any(|l| {
        let k = l.split('=').next().unwrap_or_default().trim().to_ascii_lowercase();
        matches!(k.as_str(), "config.version" | "virtualhw.version" | ".encoding")
    })
}

fn looks_like_text(head: &[u8]) -> bool {
    !head.is_empty()
        && head.iter().all(|&b| b == b'\n' || b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80)
}

/// Load one disk image file (any supported format, or a VMDK descriptor with flat extents).
pub fn load_disk_file(path: &Path, id: &str) -> Result<SourceDisk, SourceError> {
    let file = File::open(path).map_err(|e| io_bad(path, e))?;
    let md = file.metadata().map_err(|e| io_bad(path, e))?;
    if !md.is_file() {
        return Err(bad(path, "is not a regular file"));
    }
    let len = md.len();
    let mut head = vec![0u8; 4096.min(len as usize)];
    file.read_exact_at(&mut head, 0).map_err(|e| io_bad(path, e))?;
    let sniffed = format::sniff(&file).map_err(|e| io_bad(path, e))?;
    let label = path.display().to_string();
    let whole = |format| SourceDisk {
        id: id.to_string(),
        format,
        data: DiskData::File { path: path.to_path_buf(), len },
        label: label.clone(),
    };
    match sniffed {
        Sniffed::Disk(f) => {
            check_self_contained(path, f, &head, &file)?;
            Ok(whole(f))
        }
        Sniffed::VmdkDescriptor => {
            let text = String::from_utf8_lossy(
                &format::read_head(&mut file.try_clone().map_err(|e| io_bad(path, e))?, 64 * 1024)
                    .map_err(|e| io_bad(path, e))?,
            )
            .into_owned();
            flat_vmdk(path, id, &vmdk::parse(&text))
        }
        Sniffed::Unknown => {
            if len == 0 {
                return Err(bad(path, "is empty"));
            }
            if len % 512 != 0 || looks_like_text(&head) {
                return Err(bad(
                    path,
                    "is not a recognised VM or disk image (OVA, OVF, VMX, VMDK, VHD, VHDX, qcow2, VDI, or raw with a size that is a multiple of 512 bytes)",
                ));
            }
            Ok(whole(DiskFormat::Raw))
        }
    }
}

/// Refuse images that depend on other files (snapshots, backing files): they would not be
/// complete on the conversion host.
pub fn check_self_contained(path: &Path, f: DiskFormat, head: &[u8], file: &File) -> Result<(), SourceError> {
    format::self_contained(file, 0, f, head).map_err(|m| bad(path, m))
}

/// A descriptor whose extents are flat files (monolithicFlat, vmfs, twoGbMaxExtentFlat): the disk
/// is their concatenation, exported as raw.
fn flat_vmdk(path: &Path, id: &str, d: &vmdk::Descriptor) -> Result<SourceDisk, SourceError> {
    if d.is_delta() {
        return Err(bad(path, "is a VMDK snapshot (delta) descriptor; consolidate or delete the VM's snapshots first"));
    }
    if d.extents.is_empty() {
        return Err(bad(path, "is a VMDK descriptor without extents"));
    }
    let mut parts = Vec::new();
    let mut total = 0u64;
    for e in &d.extents {
        let len = e.sectors.checked_mul(512).ok_or_else(|| bad(path, "has an absurd extent size"))?;
        match e.kind.as_str() {
            "FLAT" | "VMFS" => {
                let name = e.file.as_deref().ok_or_else(|| bad(path, "has a flat extent without a file name"))?;
                let p = vmdk::extent_path(path, name).map_err(|m| bad(path, m))?;
                let md = std::fs::metadata(&p)
                    .map_err(|err| bad(path, format!("its extent {} is unreadable: {err}", p.display())))?;
                let start = e.offset_sectors * 512;
                if md.len() < start + len {
                    return Err(bad(
                        &p,
                        format!(
                            "is {} bytes but the descriptor {} needs {} bytes; the extent is truncated",
                            md.len(),
                            path.display(),
                            start + len
                        ),
                    ));
                }
                parts.push(Part { path: Some(p), offset: start, len });
            }
            "ZERO" => parts.push(Part { path: None, offset: 0, len }),
            other => {
                return Err(bad(
                    path,
                    format!(
                        "is a VMDK of type {:?} with {other} extents, which is not supported; convert it to a single file first (qemu-img convert -O vmdk -o subformat=streamOptimized, or vmware-vdiskmanager -r)",
                        d.create_type
                    ),
                ));
            }
        }
        total += len;
    }
    // A single flat extent from offset 0 that is exactly the disk: copy the file itself, so its
    // holes are detected.
    if let [Part { path: Some(p), offset: 0, len }] = parts.as_slice()
        && std::fs::metadata(p).map(|m| m.len()).ok() == Some(*len)
    {
        return Ok(SourceDisk {
            id: id.into(),
            format: DiskFormat::Raw,
            data: DiskData::File { path: p.clone(), len: *len },
            label: path.display().to_string(),
        });
    }
    Ok(SourceDisk {
        id: id.into(),
        format: DiskFormat::Raw,
        data: DiskData::Concat { parts, len: total },
        label: path.display().to_string(),
    })
}

/// A disk id usable in the manifest: `preferred` if valid, else `disk<N>`.
pub fn disk_id(preferred: &str, index: usize) -> String {
    let cleaned: String =
        preferred.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '-' }).collect();
    let cleaned = cleaned.trim_start_matches('-').to_string();
    if names::check_disk_id(&cleaned).is_ok() { cleaned } else { format!("disk{index}") }
}

/// Make ids unique (append `-2`, `-3` …).
pub fn dedupe_ids(disks: &mut [SourceDisk]) {
    let mut seen = std::collections::HashSet::new();
    for d in disks.iter_mut() {
        let base = d.id.clone();
        let mut n = 2;
        while !seen.insert(d.id.clone()) {
            d.id = format!("{base}-{n}");
            n += 1;
        }
    }
}
