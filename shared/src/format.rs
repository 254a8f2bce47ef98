//! Disk image formats, detected from their content, never guessed from file names.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

/// A disk image format that hyper2kvm's manifest and qemu-img both understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhd,
    Vhdx,
    Vdi,
}

impl DiskFormat {
    pub const ALL: [DiskFormat; 6] =
        [DiskFormat::Raw, DiskFormat::Qcow2, DiskFormat::Vmdk, DiskFormat::Vhd, DiskFormat::Vhdx, DiskFormat::Vdi];

    /// The name in the manifest's `source_format` (hyper2kvm's vocabulary).
    pub fn manifest_name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Vhdx => "vhdx",
            DiskFormat::Vdi => "vdi",
        }
    }

    /// The driver name qemu-img takes with `-f`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            DiskFormat::Vhd => "vpc",
            other => other.manifest_name(),
        }
    }

    /// Parse a manifest `source_format` (case-insensitive; `vpc` accepted for VHD).
    pub fn from_manifest_name(s: &str) -> Option<DiskFormat> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            "vmdk" => Some(DiskFormat::Vmdk),
            "vhd" | "vpc" => Some(DiskFormat::Vhd),
            "vhdx" => Some(DiskFormat::Vhdx),
            "vdi" => Some(DiskFormat::Vdi),
            _ => None,
        }
    }

    /// The usual file extension for a copy of a disk in this format.
    pub fn extension(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            other => other.manifest_name(),
        }
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.manifest_name())
    }
}

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// A binary disk image of this format.
    Disk(DiskFormat),
    /// A VMDK text descriptor (`# Disk DescriptorFile`), whose data lives in extent files.
    VmdkDescriptor,
    /// No known magic: raw data, or something that is not a disk at all.
    Unknown,
}

/// The magic numbers we recognise.
pub const VMDK_SPARSE_MAGIC: &[u8; 4] = b"KDMV";
pub const VMDK_COWD_MAGIC: &[u8; 4] = b"COWD";
pub const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
pub const VHDX_MAGIC: &[u8; 8] = b"vhdxfile";
pub const VHD_MAGIC: &[u8; 8] = b"conectix";
pub const VDI_SIGNATURE: u32 = 0xbeda_107f;

/// Look at the head (and, for fixed VHD, the tail) of a file.
pub fn sniff(file: &File) -> io::Result<Sniffed> {
    let len = file.metadata()?.len();
    let mut head = vec![0u8; 4096.min(len as usize)];
    file.read_exact_at(&mut head, 0)?;
    let mut tail = [0u8; 512];
    let tail = if len >= 512 {
        file.read_exact_at(&mut tail, len - 512)?;
        Some(tail)
    } else {
        None
    };
    Ok(sniff_bytes(&head, tail.as_ref().map(|t| &t[..])))
}

/// [`sniff`] on bytes already read: `head` from offset 0, `tail` the last 512 bytes if the file has
/// that many.
pub fn sniff_bytes(head: &[u8], tail: Option<&[u8]>) -> Sniffed {
    if head.starts_with(QCOW2_MAGIC) {
        return Sniffed::Disk(DiskFormat::Qcow2);
    }
    if head.starts_with(VMDK_SPARSE_MAGIC) || head.starts_with(VMDK_COWD_MAGIC) {
        return Sniffed::Disk(DiskFormat::Vmdk);
    }
    if head.starts_with(VHDX_MAGIC) {
        return Sniffed::Disk(DiskFormat::Vhdx);
    }
    if head.starts_with(VHD_MAGIC) {
        return Sniffed::Disk(DiskFormat::Vhd);
    }
    if head.len() >= 0x44 && u32::from_le_bytes([head[0x40], head[0x41], head[0x42], head[0x43]]) == VDI_SIGNATURE {
        return Sniffed::Disk(DiskFormat::Vdi);
    }
    if is_vmdk_descriptor(head) {
        return Sniffed::VmdkDescriptor;
    }
    if let Some(tail) = tail
        && tail.starts_with(VHD_MAGIC)
    {
        return Sniffed::Disk(DiskFormat::Vhd);
    }
    Sniffed::Unknown
}

/// A VMDK text descriptor starts (after optional blank lines) with `# Disk DescriptorFile`.
pub fn is_vmdk_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&head[..head.len().min(1024)]);
    text.trim_start().to_ascii_lowercase().starts_with("# disk descriptorfile")
}

/// Refuse an image that depends on other files, from its own headers, before any tool opens it:
/// a qcow2 backing file or external data file, a VMDK snapshot (delta), a differencing VHD. The
/// image starts at byte `base` of `file` (0, or a member's offset in an OVA); `head` is its
/// first bytes. The message says what to do.
pub fn self_contained(file: &File, base: u64, format: DiskFormat, head: &[u8]) -> Result<(), String> {
    match format {
        DiskFormat::Vmdk => {
            if let Some(d) = crate::vmdk::embedded_descriptor_at(file, base, head)
                && d.is_delta()
            {
                return Err("is a VMDK snapshot (delta) disk; consolidate or delete the VM's snapshots first, then export its base disk".into());
            }
        }
        DiskFormat::Qcow2 if head.len() >= 20 => {
            let backing = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
            if backing != 0 {
                return Err(
                    "is a qcow2 image with a backing file; flatten it first (qemu-img convert -O qcow2 in out)".into(),
                );
            }
            if head.len() >= 80 && u32::from_be_bytes(head[4..8].try_into().expect("4 bytes")) >= 3 {
                let incompatible = u64::from_be_bytes(head[72..80].try_into().expect("8 bytes"));
                if incompatible & 0b100 != 0 {
                    return Err("is a qcow2 image with an external data file; flatten it first (qemu-img convert -O qcow2 in out)".into());
                }
            }
        }
        DiskFormat::Vhd => {
            // The footer's disk type (offset 60): 4 = differencing.
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let mut footer = [0u8; 512];
            if len >= base + 512 && file.read_exact_at(&mut footer, len - 512).is_ok() && &footer[..8] == VHD_MAGIC {
                let kind = u32::from_be_bytes(footer[60..64].try_into().expect("4 bytes"));
                if kind == 4 {
                    return Err("is a differencing VHD (a snapshot); merge it into its parent first".into());
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Read the whole file's first `max` bytes (for small text files such as descriptors).
pub fn read_head(file: &mut File, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    file.take(max as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_numbers() {
        assert_eq!(sniff_bytes(b"QFI\xfb\0\0\0\x03", None), Sniffed::Disk(DiskFormat::Qcow2));
        assert_eq!(sniff_bytes(b"KDMV\x01\0\0\0", None), Sniffed::Disk(DiskFormat::Vmdk));
        assert_eq!(sniff_bytes(b"vhdxfile", None), Sniffed::Disk(DiskFormat::Vhdx));
        assert_eq!(sniff_bytes(b"conectix", None), Sniffed::Disk(DiskFormat::Vhd));
        let mut tail = vec![0u8; 512];
        tail[..8].copy_from_slice(b"conectix");
        assert_eq!(sniff_bytes(&[0u8; 4096], Some(&tail)), Sniffed::Disk(DiskFormat::Vhd));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.to_le_bytes());
        assert_eq!(sniff_bytes(&vdi, None), Sniffed::Disk(DiskFormat::Vdi));
        assert_eq!(sniff_bytes(b"\n# Disk DescriptorFile\nversion=1\n", None), Sniffed::VmdkDescriptor);
        assert_eq!(sniff_bytes(&[0u8; 4096], Some(&[0u8; 512])), Sniffed::Unknown);
    }

    #[test]
    fn names_map_both_ways() {
        for f in DiskFormat::ALL {
            assert_eq!(DiskFormat::from_manifest_name(f.manifest_name()), Some(f));
        }
        assert_eq!(DiskFormat::Vhd.qemu_name(), "vpc");
        assert_eq!(DiskFormat::from_manifest_name("ISO"), None);
    }
}
