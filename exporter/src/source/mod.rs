//! Reading a local VM: an OVA, an OVF with its disks, a VMX with its VMDKs, or a single disk
//! image. Formats are detected from content. VM facts come from the OVF/VMX where present.
//!
//! One rule for every input kind: a VM's files are regular files inside the VM's directory (or
//! members of its archive). `--vm` itself is the operator's choice and is resolved once; every
//! file it names (OVF hrefs, VMX disk names, VMDK extents) is opened below the VM's directory with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, without blocking on a FIFO, and refused unless
//! it is a regular file — before a byte is read. The descriptors opened here are the ones the copy
//! reads, and each one's size and timestamps are checked again after the copy, so a source that
//! changes while it is exported is refused instead of published.

pub mod ova;
pub mod ovf;
pub mod vmx;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use hyperfarm_shared::format::{self, DiskFormat, Sniffed};
use hyperfarm_shared::fsx;
use hyperfarm_shared::names;
use hyperfarm_shared::text::Esc;
use hyperfarm_shared::vmdk;

/// A file of the VM, open for reading: every read of it goes through this descriptor.
#[derive(Debug, Clone)]
pub struct Opened {
    /// Where it is, for messages.
    pub path: PathBuf,
    pub file: Arc<File>,
    pub stamp: fsx::Stamp,
}

impl Opened {
    fn new(path: PathBuf, file: File) -> io::Result<Opened> {
        let stamp = fsx::Stamp::of_file(&file)?;
        Ok(Opened { path, file: Arc::new(file), stamp })
    }
    pub fn len(&self) -> u64 {
        self.stamp.len
    }
    pub fn is_empty(&self) -> bool {
        self.stamp.len == 0
    }
    /// How the file changed since it was opened, if it did (written to, truncated or grown).
    pub fn changed(&self) -> Option<String> {
        self.stamp.changed(&self.file).map(|why| format!("{}: {why}", Esc(&self.path)))
    }
}

/// The directory a VM's files must be in.
#[derive(Debug, Clone)]
pub struct VmDir {
    root: PathBuf,
}

impl VmDir {
    pub fn new(root: impl Into<PathBuf>) -> VmDir {
        VmDir { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `rel` (as the VM's descriptor names it) below the VM's directory: relative, without `..`.
    pub fn check_name(&self, what: &str, name: &str) -> Result<PathBuf, String> {
        let p = Path::new(name);
        let inside = !name.is_empty()
            && !name.contains("://")
            && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside {
            return Err(format!(
                "{what} {} is not a file inside the VM's directory {}; only relative names without '..' are accepted (copy the file beside the descriptor and name it relatively)",
                Esc(name),
                Esc(&self.root)
            ));
        }
        Ok(p.to_path_buf())
    }
    /// Open `rel` below the VM's directory: no symlink anywhere on the way, no FIFO, no device, no
    /// directory — a regular file, or a clear error naming it.
    pub fn open(&self, rel: &Path) -> Result<Opened, SourceError> {
        let full = self.root.join(rel);
        let file = fsx::open_beneath(&self.root, rel).map_err(|e| {
            let why = match e.kind() {
                io::ErrorKind::NotFound => "does not exist".to_string(),
                io::ErrorKind::InvalidInput => format!(
                    "{e}; a VM's files must be regular files inside its directory {} (no symbolic links, FIFOs or devices)",
                    Esc(&self.root)
                ),
                _ => format!("cannot be opened ({e})"),
            };
            bad(&full, why)
        })?;
        Opened::new(full.clone(), file).map_err(|e| io_bad(&full, e))
    }
}

/// Where a disk's bytes come from.
#[derive(Debug, Clone)]
pub enum DiskData {
    /// A whole file (holes are found with SEEK_DATA/SEEK_HOLE and not copied).
    File { src: Opened, len: u64 },
    /// A byte range of a file (a member of an OVA).
    Region { src: Opened, offset: u64, len: u64 },
    /// Extents laid end to end (a flat VMDK: descriptor + extent files) copied as one raw disk;
    /// a part without a file is zeros.
    Concat { parts: Vec<Part>, len: u64 },
}

#[derive(Debug, Clone)]
pub struct Part {
    pub src: Option<Opened>,
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
    /// The files the disk is read from.
    pub fn sources(&self) -> Vec<&Opened> {
        match self {
            DiskData::File { src, .. } | DiskData::Region { src, .. } => vec![src],
            DiskData::Concat { parts, .. } => parts.iter().filter_map(|p| p.src.as_ref()).collect(),
        }
    }
    /// How a source file changed since it was opened, if one did.
    pub fn changed(&self) -> Option<String> {
        self.sources().into_iter().find_map(Opened::changed)
    }
    /// A file to show in messages.
    pub fn describe(&self) -> String {
        match self {
            DiskData::File { src, .. } => Esc(&src.path).to_string(),
            DiskData::Region { src, offset, .. } => format!("{} (at byte {offset})", Esc(&src.path)),
            DiskData::Concat { .. } => {
                self.sources().iter().map(|s| Esc(&s.path).to_string()).collect::<Vec<_>>().join(" + ")
            }
        }
    }
}

/// One disk of the VM, in boot order.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// The manifest disk id (`disk0`, `scsi0-1`, the OVF's diskId…).
    pub id: String,
    pub format: DiskFormat,
    pub data: DiskData,
    /// Where it came from, for messages (escaped).
    pub label: String,
    /// The member name in an OVA (for its `.mf` digest).
    pub member: Option<String>,
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
#[derive(Debug, Clone)]
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
    /// The VM's network interfaces, as its source describes them.
    pub nics: Vec<NicFact>,
    /// The VM's id at its source (vSphere: its instance UUID).
    pub vm_id: Option<String>,
    /// The guest OS as the source names it (VMX `guestOS`, OVF `vmw:osType`, vSphere `guestId`).
    pub guest: Option<String>,
}

/// A network interface of the source VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NicFact {
    /// `aa:bb:cc:dd:ee:ff` (lower case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The network (port group) it was connected to at the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The virtual device (`vmxnet3`, `e1000e`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Bad input: exit code 3. Its text is escaped (paths and names from the VM may hold anything).
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", Esc(path))]
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

/// Largest VMX file read.
pub const MAX_VMX: u64 = 4 << 20;
/// Largest OVF descriptor read.
pub const MAX_OVF: u64 = 16 << 20;

/// Detect and load the VM at `path`. `name` overrides the VM name.
pub fn load(path: &Path, name: Option<&str>) -> Result<VmSource, SourceError> {
    // `--vm` is the operator's own argument: a symlink there is followed, once. A directory holding
    // the VM is searched for its one descriptor, which must be a regular file in it.
    let (dir, rel, shown) = match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => {
            let real = std::fs::canonicalize(path).map_err(|e| io_bad(path, e))?;
            let rel = find_descriptor_in(&real)?;
            (VmDir::new(&real), rel.clone(), path.join(rel))
        }
        Ok(_) => {
            let real = std::fs::canonicalize(path).map_err(|e| io_bad(path, e))?;
            let parent = real.parent().unwrap_or(Path::new("/")).to_path_buf();
            let rel = PathBuf::from(real.file_name().unwrap_or_default());
            (VmDir::new(parent), rel, path.to_path_buf())
        }
        Err(e) => return Err(io_bad(path, e)),
    };
    let top = dir.open(&rel).map_err(|e| bad(&shown, e.message))?;
    let kind = detect(&top.file).map_err(|e| io_bad(&shown, e))?;
    let mut vm = match kind {
        InputKind::Ova => ova::load(&shown, &top)?,
        InputKind::Ovf => ovf::load_file(&shown, &dir, &rel, &top)?,
        InputKind::Vmx => vmx::load(&shown, &dir, &rel, &top)?,
        InputKind::Disk => {
            let disk = load_disk(&dir, &rel, top, "disk0")?;
            let stem = shown.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let stem = stem.trim_end_matches("-flat").to_string();
            VmSource {
                name: stem,
                cpu: None,
                memory_mib: None,
                firmware: Firmware::Unknown,
                disks: vec![disk],
                kind: "disk",
                path: shown.clone(),
                expected_member_digests: vec![],
                nics: vec![],
                vm_id: None,
                guest: None,
            }
        }
    };
    vm.name = match name {
        Some(n) => {
            names::check_vm_name(n).map_err(|e| bad(&shown, format!("--name: {e}")))?;
            n.to_string()
        }
        None => names::sanitize_vm_name(&vm.name).ok_or_else(|| {
            bad(&shown, format!("the VM name {} has no usable characters; give one with --name", Esc(&vm.name)))
        })?,
    };
    if vm.disks.is_empty() {
        return Err(bad(&shown, "the VM has no disks to export"));
    }
    Ok(vm)
}

fn find_descriptor_in(dir: &Path) -> Result<PathBuf, SourceError> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_bad(dir, e))? {
        let name = PathBuf::from(e.map_err(|e| io_bad(dir, e))?.file_name());
        let ext = name.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if matches!(ext.as_str(), "ovf" | "vmx" | "ova") {
            found.push(name);
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
                found.iter().map(|p| Esc(p).to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Magic numbers of compressed files, which are not VMs until decompressed.
const COMPRESSED: [(&[u8], &str, &str); 4] = [
    (b"\x1f\x8b", "gzip", "gunzip -k"),
    (b"\xfd7zXZ\x00", "xz", "unxz -k"),
    (b"BZh", "bzip2", "bunzip2 -k"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
];

/// Look at the content: tar (OVA), OVF XML, VMX text, or a disk image. A compressed file is an
/// error that says how to decompress it.
pub fn detect(file: &File) -> io::Result<InputKind> {
    let len = file.metadata()?.len();
    let mut head = vec![0u8; 4096.min(len as usize)];
    file.read_exact_at(&mut head, 0)?;
    if let Some((_, what, tool)) = COMPRESSED.iter().find(|(magic, _, _)| head.starts_with(magic)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "is {what}-compressed, not a VM or disk image; decompress it first ({tool} FILE) and export the result"
            ),
        ));
    }
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

/// Read a whole descriptor file (OVF, VMX) through its descriptor, at most `max` bytes.
pub fn read_text(src: &Opened, max: u64, what: &str) -> Result<String, SourceError> {
    if src.len() > max {
        return Err(bad(&src.path, format!("is larger than {} MiB; it cannot be {what}", max >> 20)));
    }
    let mut buf = vec![0u8; src.len() as usize];
    src.file.read_exact_at(&mut buf, 0).map_err(|e| io_bad(&src.path, e))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Open and load the disk `rel` below the VM's directory.
pub fn load_disk_file(dir: &VmDir, rel: &Path, id: &str) -> Result<SourceDisk, SourceError> {
    let src = dir.open(rel)?;
    load_disk(dir, rel, src, id)
}

/// Load one disk image (any supported format, or a VMDK descriptor with flat extents) from its
/// open file `src`, which is `rel` below the VM's directory.
fn load_disk(dir: &VmDir, rel: &Path, src: Opened, id: &str) -> Result<SourceDisk, SourceError> {
    let path = src.path.clone();
    let len = src.len();
    let mut head = vec![0u8; 4096.min(len as usize)];
    src.file.read_exact_at(&mut head, 0).map_err(|e| io_bad(&path, e))?;
    let sniffed = format::sniff(&src.file).map_err(|e| io_bad(&path, e))?;
    let label = Esc(&path).to_string();
    match sniffed {
        Sniffed::Disk(f) => {
            check_self_contained(&path, f, &head, &src.file)?;
            Ok(SourceDisk { id: id.to_string(), format: f, data: DiskData::File { src, len }, label, member: None })
        }
        Sniffed::VmdkDescriptor => {
            let text = read_text(&src, 64 * 1024, "a VMDK descriptor")?;
            flat_vmdk(dir, rel, &path, id, &vmdk::parse(&text))
        }
        Sniffed::Unknown => {
            if len == 0 {
                return Err(bad(&path, "is empty"));
            }
            if !len.is_multiple_of(512) || looks_like_text(&head) {
                return Err(bad(
                    &path,
                    "is not a recognised VM or disk image (OVA, OVF, VMX, VMDK, VHD, VHDX, qcow2, VDI, or raw with a size that is a multiple of 512 bytes)",
                ));
            }
            Ok(SourceDisk {
                id: id.to_string(),
                format: DiskFormat::Raw,
                data: DiskData::File { src, len },
                label,
                member: None,
            })
        }
    }
}

/// Refuse images that depend on other files (snapshots, backing files) or cannot be read without a
/// secret (encrypted): they would not convert on the conversion host.
pub fn check_self_contained(path: &Path, f: DiskFormat, head: &[u8], file: &File) -> Result<(), SourceError> {
    format::self_contained(file, 0, f, head).map_err(|m| bad(path, m))
}

/// A descriptor whose extents are flat files (monolithicFlat, vmfs, twoGbMaxExtentFlat): the disk
/// is their concatenation, exported as raw. Its extents are opened below the VM's directory like
/// any other file of the VM and must not be text.
fn flat_vmdk(dir: &VmDir, rel: &Path, path: &Path, id: &str, d: &vmdk::Descriptor) -> Result<SourceDisk, SourceError> {
    if d.is_delta() {
        return Err(bad(path, "is a VMDK snapshot (delta) descriptor; consolidate or delete the VM's snapshots first"));
    }
    if d.extents.is_empty() {
        return Err(bad(path, "is a VMDK descriptor without extents"));
    }
    let base = rel.parent().unwrap_or(Path::new(""));
    let mut parts = Vec::new();
    let mut total = 0u64;
    for e in &d.extents {
        let len = e.sectors.checked_mul(512).ok_or_else(|| bad(path, "has an absurd extent size"))?;
        match e.kind.as_str() {
            "FLAT" | "VMFS" => {
                let name = e.file.as_deref().ok_or_else(|| bad(path, "has a flat extent without a file name"))?;
                let name_rel = dir.check_name("its extent", name).map_err(|m| bad(path, m))?;
                let src = dir.open(&base.join(name_rel))?;
                let start =
                    e.offset_sectors.checked_mul(512).ok_or_else(|| bad(path, "has an absurd extent offset"))?;
                if src.len() < start.saturating_add(len) {
                    return Err(bad(
                        &src.path,
                        format!(
                            "is {} bytes but the descriptor {} needs {} bytes; the extent is truncated",
                            src.len(),
                            Esc(path),
                            start.saturating_add(len)
                        ),
                    ));
                }
                let mut head = vec![0u8; 4096.min(len) as usize];
                src.file.read_exact_at(&mut head, start).map_err(|err| io_bad(&src.path, err))?;
                if looks_like_text(&head) {
                    return Err(bad(
                        &src.path,
                        format!("is text, not the data of a flat disk extent (named by {})", Esc(path)),
                    ));
                }
                parts.push(Part { src: Some(src), offset: start, len });
            }
            "ZERO" => parts.push(Part { src: None, offset: 0, len }),
            other => {
                return Err(bad(
                    path,
                    format!(
                        "is a VMDK of type {} with {} extents, which is not supported; convert it to a single file first (qemu-img convert -O vmdk -o subformat=streamOptimized, or vmware-vdiskmanager -r)",
                        Esc(&d.create_type),
                        Esc(other)
                    ),
                ));
            }
        }
        total = total.checked_add(len).ok_or_else(|| bad(path, "has an absurd total size"))?;
    }
    let label = Esc(path).to_string();
    // A single flat extent from offset 0 that is exactly the disk: copy the file itself, so its
    // holes are detected.
    if let [Part { src: Some(src), offset: 0, len }] = parts.as_slice()
        && src.len() == *len
    {
        return Ok(SourceDisk {
            id: id.into(),
            format: DiskFormat::Raw,
            data: DiskData::File { src: src.clone(), len: *len },
            label,
            member: None,
        });
    }
    Ok(SourceDisk {
        id: id.into(),
        format: DiskFormat::Raw,
        data: DiskData::Concat { parts, len: total },
        label,
        member: None,
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
