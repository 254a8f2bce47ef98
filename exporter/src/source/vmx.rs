//! VMware VMX files: `key = "value"` lines naming the VM, its CPUs, memory, firmware and disks.

use std::collections::HashMap;
use std::path::Path;

use hyperfarm_shared::text::Esc;

use super::{
    Firmware, MAX_VMX, NicFact, Opened, SourceError, VmDir, VmSource, bad, dedupe_ids, disk_id, load_disk_file,
    read_text,
};

/// Parse VMX text into lowercase keys and unquoted values.
pub fn parse(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(v);
            out.insert(k.trim().to_ascii_lowercase(), v.to_string());
        }
    }
    out
}

/// A hard disk device of the VMX (`scsi0:1`), with its file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmxDisk {
    pub device: String,
    pub file_name: String,
}

fn bus_rank(bus: &str) -> u8 {
    // VMware's BIOS looks at IDE, then SCSI, then SATA, then NVMe.
    match bus {
        "ide" => 0,
        "scsi" => 1,
        "sata" => 2,
        "nvme" => 3,
        _ => 4,
    }
}

/// The VM's hard disks in boot order: `bios.hddOrder` first, then by bus type, bus and unit.
pub fn disks(keys: &HashMap<String, String>) -> Vec<VmxDisk> {
    let mut found = Vec::new();
    for (k, v) in keys {
        let Some(dev) = k.strip_suffix(".filename") else {
            continue;
        };
        let Some((bus_n, unit)) = dev.split_once(':') else {
            continue;
        };
        let bus: String = bus_n.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
        if !matches!(bus.as_str(), "ide" | "scsi" | "sata" | "nvme") {
            continue;
        }
        let (Ok(n), Ok(u)) = (bus_n[bus.len()..].parse::<u32>(), unit.parse::<u32>()) else {
            continue;
        };
        if keys.get(&format!("{dev}.present")).is_some_and(|p| p.eq_ignore_ascii_case("false")) {
            continue;
        }
        let dtype = keys.get(&format!("{dev}.devicetype")).map(|s| s.to_ascii_lowercase()).unwrap_or_default();
        if dtype.contains("cdrom") || dtype.contains("floppy") || v.to_ascii_lowercase().ends_with(".iso") {
            continue;
        }
        found.push(((bus_rank(&bus), n, u), VmxDisk { device: dev.to_string(), file_name: v.clone() }));
    }
    found.sort_by_key(|(k, _)| *k);
    let mut disks: Vec<VmxDisk> = found.into_iter().map(|(_, d)| d).collect();
    if let Some(order) = keys.get("bios.hddorder") {
        for (pos, dev) in
            order.split(',').map(|s| s.trim().to_ascii_lowercase()).enumerate().collect::<Vec<_>>().into_iter().rev()
        {
            let _ = pos;
            if let Some(i) = disks.iter().position(|d| d.device == dev) {
                let d = disks.remove(i);
                disks.insert(0, d);
            }
        }
    }
    disks
}

/// Load a VMX (open as `top`, `rel` below the VM's directory `dir`) with its disks, which must be
/// files inside the VM's directory.
pub fn load(path: &Path, dir: &VmDir, rel: &Path, top: &Opened) -> Result<VmSource, SourceError> {
    let text = read_text(top, MAX_VMX, "a VMX file")?;
    let keys = parse(&text);
    let base = rel.parent().unwrap_or(Path::new(""));
    let mut disks = Vec::new();
    for (i, d) in disks_of(&keys).iter().enumerate() {
        let name = dir.check_name(&format!("its disk {}", Esc(&d.device)), &d.file_name).map_err(|m| bad(path, m))?;
        let mut disk = load_disk_file(dir, &base.join(name), &disk_id(&d.device.replace(':', "-"), i))?;
        disk.label = format!("{} ({})", Esc(&d.device), Esc(&d.file_name));
        disks.push(disk);
    }
    dedupe_ids(&mut disks);
    let name = keys
        .get("displayname")
        .cloned()
        .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    let firmware = match keys.get("firmware").map(|s| s.to_ascii_lowercase()).as_deref() {
        Some("efi") => Firmware::Uefi,
        _ => Firmware::Bios,
    };
    Ok(VmSource {
        name,
        cpu: Some(keys.get("numvcpus").and_then(|v| v.parse().ok()).unwrap_or(1)),
        memory_mib: keys.get("memsize").and_then(|v| v.parse().ok()),
        firmware,
        disks,
        kind: "vmx",
        path: path.to_path_buf(),
        expected_member_digests: vec![],
        nics: nics(&keys),
        vm_id: None,
        guest: keys.get("guestos").cloned(),
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn is_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The present `ethernetN` adapters, in N order: model, MAC (static `address`, else the
/// `generatedAddress`), network name.
pub fn nics(keys: &HashMap<String, String>) -> Vec<NicFact> {
    let mut found: Vec<(u32, NicFact)> = Vec::new();
    for (k, v) in keys {
        let Some(n) = k.strip_prefix("ethernet").and_then(|r| r.strip_suffix(".present")) else { continue };
        let Ok(idx) = n.parse::<u32>() else { continue };
        if !v.eq_ignore_ascii_case("true") {
            continue;
        }
        let get = |key: &str| keys.get(&format!("ethernet{idx}.{key}")).cloned();
        let mac =
            get("address").or_else(|| get("generatedaddress")).filter(|m| is_mac(m)).map(|m| m.to_ascii_lowercase());
        found.push((
            idx,
            NicFact { mac, network: get("networkname"), model: get("virtualdev").map(|m| m.to_ascii_lowercase()) },
        ));
    }
    found.sort_by_key(|(i, _)| *i);
    found.into_iter().map(|(_, n)| n).collect()
}

fn disks_of(keys: &HashMap<String, String>) -> Vec<VmxDisk> {
    disks(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = r#".encoding = "UTF-8"
config.version = "8"
virtualHW.version = "19"
displayName = "db server"
numvcpus = "2"
memsize = "3072"
firmware = "efi"
scsi0.present = "TRUE"
scsi0:1.fileName = "db_1.vmdk"
scsi0:0.fileName = "db.vmdk"
sata0:0.fileName = "ubuntu.iso"
sata0:0.deviceType = "cdrom-image"
ide1:0.fileName = "old.vmdk"
ide1:0.present = "FALSE"
nvme0:0.fileName = "fast.vmdk"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000e"
ethernet1.networkName = "Backup"
ethernet1.address = "00:50:56:3F:00:02"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.networkName = "VM Network"
ethernet0.generatedAddress = "00:0c:29:aa:bb:cc"
ethernet2.present = "FALSE"
ethernet2.address = "00:50:56:3f:00:09"
"#;

    #[test]
    fn reads_nics_in_order() {
        let n = nics(&parse(VMX));
        assert_eq!(
            n,
            vec![
                NicFact {
                    mac: Some("00:0c:29:aa:bb:cc".into()),
                    network: Some("VM Network".into()),
                    model: Some("vmxnet3".into())
                },
                NicFact {
                    mac: Some("00:50:56:3f:00:02".into()),
                    network: Some("Backup".into()),
                    model: Some("e1000e".into())
                },
            ]
        );
    }

    #[test]
    fn reads_disks_in_boot_order() {
        let keys = parse(VMX);
        let d = disks(&keys);
        let devs: Vec<_> = d.iter().map(|x| x.device.as_str()).collect();
        assert_eq!(devs, ["scsi0:0", "scsi0:1", "nvme0:0"]);
        let mut keys = keys;
        keys.insert("bios.hddorder".into(), "nvme0:0".into());
        assert_eq!(disks(&keys)[0].device, "nvme0:0");
    }
}
