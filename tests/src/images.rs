//! Disk images made with the real qemu-img, and VM descriptors (OVF, OVA, VMX) around them.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Deterministic pseudo-random bytes (xorshift64*), so that data does not compress away.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse raw disk of `size` bytes with pseudo-random data in `regions` (offset, length).
pub fn raw_disk(path: &Path, size: u64, regions: &[(u64, usize)], seed: u64) -> PathBuf {
    let mut f = fs::File::create(path).expect("create raw");
    f.set_len(size).expect("set_len");
    for (i, (off, len)) in regions.iter().enumerate() {
        f.seek(SeekFrom::Start(*off)).expect("seek");
        f.write_all(&pattern(seed + i as u64, *len)).expect("write");
    }
    f.sync_all().expect("sync");
    path.to_path_buf()
}

/// A small sample disk: `size_mib` virtual, data at a few places.
pub fn sample_disk(dir: &Path, name: &str, size_mib: u64, seed: u64) -> PathBuf {
    let size = size_mib << 20;
    raw_disk(&dir.join(name), size, &[(0, 64 << 10), (size / 3, 1 << 20), (size - (256 << 10), 256 << 10)], seed)
}

/// Run qemu-img and require success.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Convert a raw disk to `fmt` (qemu driver name) with extra `-o` options.
pub fn convert(raw: &Path, dst: &Path, fmt: &str, opts: Option<&str>) -> PathBuf {
    let (r, d) = (raw.display().to_string(), dst.display().to_string());
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    if let Some(o) = opts {
        args.extend(["-o", o]);
    }
    args.extend([r.as_str(), d.as_str()]);
    qemu_img(&args);
    dst.to_path_buf()
}

/// Whether `qemu-img compare` finds the qcow2 identical to the raw source.
pub fn identical(raw: &Path, qcow2: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .output()
        .expect("qemu-img compare runs");
    out.status.code() == Some(0)
}

/// Assert identity with a useful message.
pub fn assert_identical(raw: &Path, qcow2: &Path) {
    assert!(qcow2.is_file(), "{} does not exist", qcow2.display());
    assert!(identical(raw, qcow2), "{} differs from {}", qcow2.display(), raw.display());
}

/// An OVF descriptor for disks (file name, disk id) in boot order.
pub fn ovf_text(name: &str, cpu: u32, mem_mib: u64, firmware: &str, disks: &[(String, String, u64)]) -> String {
    let mut refs = String::new();
    let mut section = String::new();
    let mut items = String::new();
    for (i, (file, id, size)) in disks.iter().enumerate() {
        refs.push_str(&format!("    <File ovf:id=\"file{i}\" ovf:href=\"{file}\" ovf:size=\"{size}\"/>\n"));
        section.push_str(&format!("    <Disk ovf:diskId=\"{id}\" ovf:fileRef=\"file{i}\" ovf:capacity=\"1\" ovf:format=\"http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized\"/>\n"));
        items.push_str(&format!(
            "      <Item><rasd:HostResource>ovf:/disk/{id}</rasd:HostResource><rasd:InstanceID>{}</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType></Item>\n",
            10 + i
        ));
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
{refs}  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
{section}  </DiskSection>
  <VirtualSystem ovf:id="{name}">
    <Name>{name}</Name>
    <VirtualHardwareSection>
      <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>{cpu}</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>{mem_mib}</rasd:VirtualQuantity></Item>
{items}      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="{firmware}"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

/// An OVA (ustar, OVF first, then a SHA256 .mf, then the disks) of stream-optimized VMDKs made
/// from the given raw disks. Returns the OVA path.
pub fn ova(dir: &Path, name: &str, raws: &[&Path]) -> PathBuf {
    let work = dir.join(format!("{name}-ova"));
    fs::create_dir_all(&work).expect("mkdir");
    let mut disks = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        let file = format!("{name}-disk{}.vmdk", i + 1);
        convert(raw, &work.join(&file), "vmdk", Some("subformat=streamOptimized"));
        let size = fs::metadata(work.join(&file)).expect("md").len();
        disks.push((file, format!("vmdisk{}", i + 1), size));
    }
    let ovf = format!("{name}.ovf");
    fs::write(work.join(&ovf), ovf_text(name, 2, 2048, "efi", &disks)).expect("write ovf");
    let mut mf = String::new();
    for f in std::iter::once(&ovf).chain(disks.iter().map(|d| &d.0)) {
        let out = Command::new("sha256sum").arg(work.join(f)).output().expect("sha256sum");
        let hex = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string();
        mf.push_str(&format!("SHA256({f})= {hex}\n"));
    }
    let mf_name = format!("{name}.mf");
    fs::write(work.join(&mf_name), mf).expect("write mf");
    let ova = dir.join(format!("{name}.ova"));
    let mut cmd = Command::new("tar");
    cmd.arg("--format=ustar").arg("-cf").arg(&ova).arg("-C").arg(&work).arg(&ovf).arg(&mf_name);
    for d in &disks {
        cmd.arg(&d.0);
    }
    assert!(cmd.status().expect("tar").success(), "tar failed");
    ova
}

/// A VMX naming the given (device, vmdk file) pairs, the files beside it.
pub fn vmx(dir: &Path, name: &str, disks: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"{name}\"\nnumvcpus = \"4\"\nmemsize = \"3072\"\nfirmware = \"efi\"\n"
    );
    for (dev, file) in disks {
        text.push_str(&format!("{dev}.present = \"TRUE\"\n{dev}.fileName = \"{file}\"\n"));
    }
    text.push_str("sata0:0.fileName = \"installer.iso\"\nsata0:0.deviceType = \"cdrom-image\"\n");
    let p = dir.join(format!("{name}.vmx"));
    fs::write(&p, text).expect("write vmx");
    p
}

/// Flip one byte of a file in place (a corrupted disk).
pub fn corrupt(path: &Path, offset: u64) {
    let f = fs::OpenOptions::new().read(true).write(true).open(path).expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).expect("write");
    f.sync_all().expect("sync");
}

/// Set the HasParent flag in a VHDX's file parameters (what a differencing disk has; qemu-img
/// cannot create one).
pub fn vhdx_set_has_parent(path: &Path) {
    const METADATA: [u8; 16] =
        [0x06, 0xa2, 0x7c, 0x8b, 0x90, 0x47, 0x9a, 0x4b, 0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e];
    const PARAMS: [u8; 16] =
        [0x37, 0x67, 0xa1, 0xca, 0x36, 0xfa, 0x43, 0x4d, 0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b];
    let f = fs::OpenOptions::new().read(true).write(true).open(path).expect("open");
    let mut regions = vec![0u8; 4096];
    f.read_exact_at(&mut regions, 192 << 10).expect("regions");
    let meta = (0..16)
        .map(|i| 16 + i * 32)
        .find(|&e| regions[e..e + 16] == METADATA)
        .map(|e| u64::from_le_bytes(regions[e + 16..e + 24].try_into().expect("8")))
        .expect("metadata region");
    let mut table = vec![0u8; 4096];
    f.read_exact_at(&mut table, meta).expect("table");
    let item = (0..16).map(|i| 32 + i * 32).find(|&e| table[e..e + 16] == PARAMS).expect("file parameters");
    let off = meta + u64::from(u32::from_le_bytes(table[item + 16..item + 20].try_into().expect("4")));
    let mut flags = [0u8; 4];
    f.read_exact_at(&mut flags, off + 4).expect("flags");
    flags[0] |= 0b10;
    f.write_all_at(&flags, off + 4).expect("patch");
}
