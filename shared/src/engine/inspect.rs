//! Before converting, make sure an image is what it claims to be and reads nothing else.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{EngineError, QemuImg};
use crate::format::{self, DiskFormat, Sniffed};

/// Largest virtual disk we accept: 64 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// How much of an image's head is kept at inspection and compared after the conversion: the
/// qcow2 header and its extensions (backing and data file names) live in its first cluster.
pub const HEAD_CHECKED: usize = 64 * 1024;

/// What `qemu-img info` told us about a source image that passed inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: DiskFormat,
    pub virtual_size: u64,
    /// Extent files a VMDK descriptor refers to (empty for single-file images).
    pub extents: Vec<PathBuf>,
    /// The image's first [`HEAD_CHECKED`] bytes as inspected: a header rewritten afterwards is
    /// found by comparing them again after the conversion.
    pub head: Vec<u8>,
}

impl ImageInfo {
    /// What an engine reading this image may read: the image (as `real_path` names it) and its
    /// extents.
    pub fn confinement(&self, real_path: &Path) -> super::sandbox::Confinement {
        let mut c = super::sandbox::Confinement::new().read(real_path);
        for e in &self.extents {
            c = c.read(e);
        }
        c
    }
}

/// Read an image's head as [`ImageInfo::head`] keeps it.
pub fn read_head(file: &File) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0u8; HEAD_CHECKED];
    let mut n = 0;
    while n < head.len() {
        match std::os::unix::fs::FileExt::read_at(file, &mut head[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    Ok(head)
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "its declared format is {declared} but its content is {actual}; fix source_format in the manifest or re-export the VM"
    )]
    FormatMismatch { declared: DiskFormat, actual: String },
    #[error("it refers to a backing file {0:?}; flatten it first (qemu-img convert) so that it is self-contained")]
    BackingFile(String),
    #[error("it uses an external data file {0:?}; flatten it first (qemu-img convert) so that it is self-contained")]
    DataFile(String),
    #[error("it is encrypted; decrypt it before exporting")]
    Encrypted,
    #[error("its extent {0:?} is outside the allowed source directories (agent setting allowed_source_dirs)")]
    ExtentOutside(PathBuf),
    #[error("its extent {0:?} is missing or not a regular file")]
    ExtentMissing(PathBuf),
    #[error(
        "its virtual size of {0} bytes is larger than the limit of {1} bytes (max_virtual_size in the agent's configuration)"
    )]
    TooLarge(u64, u64),
    #[error("it is damaged ({0}); export the VM again")]
    Damaged(String),
    #[error("it {0}")]
    NotSelfContained(String),
    #[error(
        "it is a VMDK descriptor (a text file pointing at other files); a job must carry its disks' data (hyperexport turns flat VMDKs into raw disks)"
    )]
    Descriptor,
    #[error("qemu-img cannot read it: {0}")]
    Unreadable(#[source] EngineError),
    #[error("cannot read it: {0}")]
    Io(#[from] std::io::Error),
}

fn sniffed_name(s: &Sniffed) -> String {
    match s {
        Sniffed::Disk(f) => f.manifest_name().to_string(),
        Sniffed::VmdkDescriptor => "a VMDK descriptor".into(),
        Sniffed::Unknown => "raw data".into(),
    }
}

/// Inspect the image open as `file` (whose real location is `real_path`; qemu-img opens it as
/// `source`). VMDK descriptors are accepted only with `allow_descriptor` (seed-style drops),
/// and their extents must resolve below one of `allowed_roots`. Everything that can be judged
/// from the image's own bytes is judged before qemu-img opens it, so that no tool is ever made
/// to open a file outside; qemu-img then runs confined to the image (and its checked extents).
#[allow(clippy::too_many_arguments)]
pub async fn inspect_image(
    qemu: &QemuImg,
    file: &File,
    source: super::qemu_img::Source<'_>,
    real_path: &Path,
    declared: DiskFormat,
    allowed_roots: &[PathBuf],
    allow_descriptor: bool,
    max_virtual_size: u64,
) -> Result<ImageInfo, InspectError> {
    let sniffed = format::sniff(file)?;
    let matches = match (declared, &sniffed) {
        (DiskFormat::Raw, Sniffed::Unknown) => true,
        (DiskFormat::Vmdk, Sniffed::VmdkDescriptor) => true,
        (d, Sniffed::Disk(actual)) => d == *actual,
        _ => false,
    };
    if !matches {
        return Err(InspectError::FormatMismatch { declared, actual: sniffed_name(&sniffed) });
    }
    let head = read_head(file)?;
    format::self_contained(file, 0, declared, &head).map_err(InspectError::NotSelfContained)?;
    let mut checked_extents = Vec::new();
    if sniffed == Sniffed::VmdkDescriptor {
        if !allow_descriptor {
            return Err(InspectError::Descriptor);
        }
        // Check every extent the descriptor names before qemu-img follows them.
        // From offset 0 whatever the descriptor's file position (other readers share it).
        let mut text = vec![0u8; file.metadata()?.len().min(64 * 1024) as usize];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut text, 0)?;
        let d = crate::vmdk::parse(&String::from_utf8_lossy(&text));
        if d.is_delta() {
            return Err(InspectError::NotSelfContained(
                "is a VMDK snapshot (delta) descriptor; consolidate or delete the VM's snapshots first".into(),
            ));
        }
        let base = real_path.parent().unwrap_or(Path::new("/"));
        for e in d.extents.iter().filter_map(|e| e.file.as_deref()) {
            checked_extents.extend(check_extent(base, e, allowed_roots, None)?);
        }
    }
    let mut confine = super::sandbox::Confinement::new().read(real_path);
    for e in &checked_extents {
        confine = confine.read(e);
    }
    let info = qemu.info(source, declared, &confine).await.map_err(InspectError::Unreadable)?;
    if let Some(b) = info.get("backing-filename").and_then(|v| v.as_str()) {
        return Err(InspectError::BackingFile(b.to_string()));
    }
    if info.get("encrypted").and_then(|v| v.as_bool()) == Some(true) {
        return Err(InspectError::Encrypted);
    }
    let data = info.pointer("/format-specific/data");
    if let Some(df) = data.and_then(|d| d.get("data-file")).and_then(|v| v.as_str()) {
        return Err(InspectError::DataFile(df.to_string()));
    }
    let virtual_size = info.get("virtual-size").and_then(|v| v.as_u64()).unwrap_or(0);
    let limit = max_virtual_size.min(MAX_VIRTUAL_SIZE);
    if virtual_size > limit {
        return Err(InspectError::TooLarge(virtual_size, limit));
    }
    let mut extents = Vec::new();
    if declared == DiskFormat::Vmdk
        && let Some(list) = data.and_then(|d| d.get("extents")).and_then(|e| e.as_array())
    {
        let base = real_path.parent().unwrap_or(Path::new("/"));
        for e in list {
            let Some(name) = e.get("filename").and_then(|f| f.as_str()) else {
                continue;
            };
            if base.join(name) == real_path || name == source.name() {
                continue;
            }
            if let Some(canon) = check_extent(base, name, allowed_roots, Some(real_path))? {
                extents.push(canon);
            }
        }
    }
    // A damaged image can convert "successfully" with missing data (a truncated sparse VMDK reads
    // its lost grains as zeros): check its metadata first, where the format has a check.
    // (raw and VHD have no check in qemu-img: no process started for nothing.)
    let checkable = !matches!(declared, DiskFormat::Raw | DiskFormat::Vhd);
    match if checkable { qemu.check_source(source, declared, &confine).await } else { Ok(false) } {
        Ok(_) => {}
        Err(EngineError::Failed { stderr, .. }) => {
            return Err(InspectError::Damaged(stderr.lines().next().unwrap_or("qemu-img check failed").to_string()));
        }
        Err(e) => return Err(InspectError::Unreadable(e)),
    }
    Ok(ImageInfo { format: declared, virtual_size, extents, head })
}

/// Check an extent a VMDK descriptor names (relative to `base`): it must exist, be a regular file
/// and lie under one of `allowed_roots`. Returns its canonical path, or `None` when it is `skip`
/// (the descriptor's own file).
fn check_extent(
    base: &Path,
    name: &str,
    allowed_roots: &[PathBuf],
    skip: Option<&Path>,
) -> Result<Option<PathBuf>, InspectError> {
    // `join` of an absolute name gives the name itself.
    let p = base.join(name);
    let canon = std::fs::canonicalize(&p).map_err(|_| InspectError::ExtentMissing(p.clone()))?;
    if !std::fs::metadata(&canon).map(|m| m.is_file()).unwrap_or(false) {
        return Err(InspectError::ExtentMissing(p));
    }
    if Some(canon.as_path()) == skip {
        return Ok(None);
    }
    if !allowed_roots.iter().any(|r| canon.starts_with(r)) {
        return Err(InspectError::ExtentOutside(p));
    }
    Ok(Some(canon))
}
