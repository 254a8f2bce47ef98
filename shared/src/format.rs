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

/// Refuse an image that depends on other files, or cannot be read without a secret, from its own
/// headers, before any tool opens it: a qcow2 backing file or external data file, an encrypted
/// qcow2 (AES or LUKS), a VMDK snapshot (delta: a parent CID or a parent file name), a
/// differencing VHD or VHDX. The image starts at byte `base` of `file` (0, or a member's offset in
/// an OVA); `head` is its first bytes. The message says what to do. Both sides run this: the
/// exporter before it copies a byte, the agent before qemu-img opens the image.
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
            if head.len() >= 36 && u32::from_be_bytes(head[32..36].try_into().expect("4 bytes")) != 0 {
                return Err("is an encrypted qcow2 image (AES or LUKS), which cannot be converted without its secret; decrypt it first (qemu-img convert --object secret,... --image-opts ... -O qcow2 out.qcow2)".into());
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
        DiskFormat::Vhdx if vhdx_has_parent(file, base) => {
            return Err("is a differencing VHDX (a checkpoint that depends on its parent); merge it into its parent first (Hyper-V: Edit Disk → Merge, or Merge-VHD), then export the merged disk".into());
        }
        _ => {}
    }
    Ok(())
}

/// VHDX metadata region (`8B7CA206-4790-4B9A-B8FE-575F050F886E`), as its GUID is stored.
const VHDX_METADATA_REGION: [u8; 16] =
    [0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e];
/// VHDX file parameters item (`CAA16737-FA36-4D43-B3B6-33F0AA44E76B`).
const VHDX_FILE_PARAMETERS: [u8; 16] =
    [0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b];
/// VHDX parent locator item (`A8D35F2D-B30B-454D-ABF7-D3D84834AB0C`).
const VHDX_PARENT_LOCATOR: [u8; 16] =
    [0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c];

/// Whether a VHDX says it has a parent: the file parameters' HasParent flag, or a parent locator.
/// Read from the region table at 192 KiB and the metadata table it points at (bounded reads; an
/// unreadable structure is left for qemu-img to judge).
pub fn vhdx_has_parent(file: &File, base: u64) -> bool {
    let read = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, base + off).ok().map(|()| b)
    };
    let Some(regions) = read(192 << 10, 64 << 10) else { return false };
    if &regions[..4] != b"regi" {
        return false;
    }
    let count = u32::from_le_bytes(regions[8..12].try_into().expect("4 bytes")).min(2047) as usize;
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let Some(meta_off) = (0..count)
        .map(|i| 16 + i * 32)
        .find_map(|e| (regions.get(e..e + 16) == Some(&VHDX_METADATA_REGION[..])).then(|| le64(&regions, e + 16)))
    else {
        return false;
    };
    let Some(table) = read(meta_off, 64 << 10) else { return false };
    if &table[..8] != b"metadata" {
        return false;
    }
    let entries = usize::from(u16::from_le_bytes([table[10], table[11]])).min(2047);
    for e in (0..entries).map(|i| 32 + i * 32) {
        let Some(item) = table.get(e..e + 32) else { break };
        if item[..16] == VHDX_PARENT_LOCATOR {
            return true;
        }
        if item[..16] == VHDX_FILE_PARAMETERS
            && let Some(params) = read(meta_off + u64::from(le32(item, 16)), 8)
            && le32(&params, 4) & 0b10 != 0
        {
            return true;
        }
    }
    false
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

    fn qemu_img(args: &[&str]) {
        let st = std::process::Command::new("qemu-img").args(args).status().expect("qemu-img");
        assert!(st.success(), "qemu-img {args:?}");
    }

    #[test]
    fn encrypted_qcow2_and_differencing_vhdx_are_refused_from_their_headers() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| d.path().join(n).display().to_string();
        let judge = |name: &str, f: DiskFormat| {
            let file = File::open(p(name)).expect("open");
            let mut head = vec![0u8; 4096];
            let n = file.read_at(&mut head, 0).expect("read");
            self_contained(&file, 0, f, &head[..n])
        };
        qemu_img(&["create", "-q", "-f", "qcow2", &p("plain.qcow2"), "1M"]);
        assert!(judge("plain.qcow2", DiskFormat::Qcow2).is_ok());
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=passphrase",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            &p("luks.qcow2"),
            "1M",
        ]);
        assert!(judge("luks.qcow2", DiskFormat::Qcow2).expect_err("luks").contains("encrypted"));

        qemu_img(&["create", "-q", "-f", "vhdx", &p("base.vhdx"), "8M"]);
        assert!(judge("base.vhdx", DiskFormat::Vhdx).is_ok());
        // Set HasParent in the file parameters, as a differencing disk has it.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(p("base.vhdx")).expect("open");
        let mut regions = vec![0u8; 64 << 10];
        f.read_exact_at(&mut regions, 192 << 10).expect("regions");
        let meta = (0..16)
            .map(|i| 16 + i * 32)
            .find(|&e| regions[e..e + 16] == VHDX_METADATA_REGION)
            .map(|e| u64::from_le_bytes(regions[e + 16..e + 24].try_into().expect("8")))
            .expect("metadata region");
        let mut table = vec![0u8; 4096];
        f.read_exact_at(&mut table, meta).expect("table");
        let item = (0..16).map(|i| 32 + i * 32).find(|&e| table[e..e + 16] == VHDX_FILE_PARAMETERS).expect("item");
        let off = meta + u64::from(u32::from_le_bytes(table[item + 16..item + 20].try_into().expect("4")));
        let mut flags = [0u8; 4];
        f.read_exact_at(&mut flags, off + 4).expect("flags");
        flags[0] |= 0b10;
        std::os::unix::fs::FileExt::write_all_at(&f, &flags, off + 4).expect("patch");
        assert!(judge("base.vhdx", DiskFormat::Vhdx).expect_err("parent").contains("differencing VHDX"));
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
