//! OVF descriptors (DMTF DSP0243): the VM's name, CPUs, memory, firmware and disks in order.

use std::path::Path;

use hyperfarm_shared::text::Esc;

use super::{
    Firmware, MAX_OVF, NicFact, Opened, SourceError, VmDir, VmSource, bad, dedupe_ids, disk_id, load_disk_file,
    read_text,
};

/// A disk as the OVF describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    pub disk_id: String,
    pub href: String,
    pub size: Option<u64>,
}

/// What we read from an OVF.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfInfo {
    pub name: String,
    pub cpu: Option<u32>,
    pub memory_mib: Option<u64>,
    pub firmware: Firmware,
    /// In boot order (the order of the disk items in the hardware section).
    pub disks: Vec<OvfDisk>,
    /// Ethernet adapters (items of resource type 10).
    pub nics: Vec<NicFact>,
    /// The operating system section's `vmw:osType`, else its description.
    pub guest: Option<String>,
}

fn attr<'a>(n: &roxmltree::Node<'a, '_>, local: &str) -> Option<&'a str> {
    n.attributes().find(|a| a.name() == local).map(|a| a.value())
}

fn child_text<'a>(n: &roxmltree::Node<'a, '_>, local: &str) -> Option<&'a str> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == local).and_then(|c| c.text()).map(str::trim)
}

/// Parse OVF XML.
pub fn parse(xml: &str) -> Result<OvfInfo, String> {
    let opts = roxmltree::ParsingOptions { allow_dtd: false, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(xml, opts).map_err(|e| format!("is not valid OVF XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err("is XML but not an OVF envelope".into());
    }
    let elements = || root.descendants().filter(|n| n.is_element());

    // References: file id -> (href, size, compression).
    let mut files = std::collections::HashMap::new();
    for f in elements().filter(|n| n.tag_name().name() == "File") {
        let (Some(id), Some(href)) = (attr(&f, "id"), attr(&f, "href")) else {
            continue;
        };
        if let Some(c) = attr(&f, "compression")
            && !c.is_empty()
            && c != "identity"
        {
            return Err(format!(
                "references {} compressed with {}, which is not supported; re-export the OVF without compression",
                Esc(href),
                Esc(c)
            ));
        }
        files.insert(id.to_string(), (href.to_string(), attr(&f, "size").and_then(|s| s.parse().ok())));
    }
    // DiskSection: disk id -> file ref.
    let mut disk_files = Vec::new();
    for d in elements().filter(|n| n.tag_name().name() == "Disk") {
        let Some(id) = attr(&d, "diskId") else {
            continue;
        };
        let Some(file_ref) = attr(&d, "fileRef") else {
            return Err(format!(
                "disk {} has no file (an empty disk); remove it from the VM or export it with its data",
                Esc(id)
            ));
        };
        let (href, size) = files.get(file_ref).cloned().ok_or_else(|| {
            format!("disk {} refers to file {}, which is not in the References section", Esc(id), Esc(file_ref))
        })?;
        disk_files.push(OvfDisk { disk_id: id.to_string(), href, size });
    }

    let vs = elements().find(|n| n.tag_name().name() == "VirtualSystem");
    let name = vs
        .as_ref()
        .and_then(|v| child_text(v, "Name").map(str::to_string).or_else(|| attr(v, "id").map(str::to_string)))
        .unwrap_or_default();

    let mut cpu = None;
    let mut memory_mib = None;
    let mut order = Vec::new();
    let mut nics = Vec::new();
    for item in elements().filter(|n| matches!(n.tag_name().name(), "Item" | "StorageItem")) {
        let rt: u32 = child_text(&item, "ResourceType").and_then(|s| s.parse().ok()).unwrap_or(0);
        let qty: Option<u64> = child_text(&item, "VirtualQuantity").and_then(|s| s.parse().ok());
        match rt {
            3 => cpu = qty.and_then(|q| u32::try_from(q).ok()),
            4 => {
                let units = child_text(&item, "AllocationUnits").unwrap_or("byte * 2^20");
                memory_mib = qty.and_then(|q| to_mib(q, units));
            }
            10 => nics.push(NicFact {
                mac: child_text(&item, "Address").filter(|a| super::vmx::is_mac(a)).map(str::to_ascii_lowercase),
                network: child_text(&item, "Connection").map(str::to_string),
                model: child_text(&item, "ResourceSubType").map(str::to_ascii_lowercase),
            }),
            17 => {
                if let Some(host) = child_text(&item, "HostResource") {
                    let id = host.rsplit('/').next().unwrap_or_default().to_string();
                    order.push(id);
                }
            }
            _ => {}
        }
    }
    let firmware = match elements()
        .find(|n| n.tag_name().name() == "Config" && attr(n, "key") == Some("firmware"))
        .and_then(|n| attr(&n, "value"))
    {
        Some("efi") => Firmware::Uefi,
        Some("bios") => Firmware::Bios,
        _ if xml.contains("vmx-") => Firmware::Bios,
        _ => Firmware::Unknown,
    };
    // Boot order: disks in hardware-item order, then any disk no item mentions.
    let mut disks = Vec::new();
    for id in &order {
        if let Some(pos) = disk_files.iter().position(|d| &d.disk_id == id) {
            disks.push(disk_files.remove(pos));
        }
    }
    disks.extend(disk_files);
    let guest = elements().find(|n| n.tag_name().name() == "OperatingSystemSection").and_then(|os| {
        attr(&os, "osType").map(str::to_string).or_else(|| child_text(&os, "Description").map(str::to_string))
    });
    Ok(OvfInfo { name, cpu, memory_mib, firmware, disks, nics, guest })
}

/// `byte * 2^20`, `MegaBytes`, `byte * 1024 * 1024`… to MiB.
fn to_mib(qty: u64, units: &str) -> Option<u64> {
    let u = units.to_ascii_lowercase().replace(' ', "");
    let bytes_per_unit: u64 = match u.as_str() {
        "megabytes" | "mb" | "mib" => 1 << 20,
        "gigabytes" | "gb" | "gib" => 1 << 30,
        "kilobytes" | "kb" | "kib" => 1 << 10,
        "byte" | "bytes" => 1,
        _ => {
            let rest = u.strip_prefix("byte*")?;
            if let Some(exp) = rest.strip_prefix("2^") {
                1u64.checked_shl(exp.parse().ok()?)?
            } else {
                rest.split('*').try_fold(1u64, |acc, f| acc.checked_mul(f.parse().ok()?))?
            }
        }
    };
    qty.checked_mul(bytes_per_unit).map(|b| b.div_ceil(1 << 20))
}

/// An href must stay inside the OVF's directory (or the OVA).
pub fn check_href(href: &str) -> Result<(), String> {
    let p = Path::new(href);
    if href.is_empty()
        || href.contains("://")
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "refers to {}, which is not a file beside the OVF; only relative names without '..' are accepted",
            Esc(href)
        ));
    }
    Ok(())
}

/// An OVF file (open as `top`, `rel` below the VM's directory `dir`) with its disks beside it.
pub fn load_file(path: &Path, dir: &VmDir, rel: &Path, top: &Opened) -> Result<VmSource, SourceError> {
    let text = read_text(top, MAX_OVF, "an OVF descriptor")?;
    let info = parse(&text).map_err(|m| bad(path, m))?;
    let base = rel.parent().unwrap_or(Path::new(""));
    let mut disks = Vec::new();
    for (i, d) in info.disks.iter().enumerate() {
        check_href(&d.href).map_err(|m| bad(path, m))?;
        let mut disk = load_disk_file(dir, &base.join(&d.href), &disk_id(&d.disk_id, i))?;
        if let Some(size) = d.size
            && disk.data.len() != size
        {
            return Err(bad(
                &dir.root().join(base).join(&d.href),
                format!("is {} bytes but the OVF says {size}; the export is incomplete", disk.data.len()),
            ));
        }
        disk.label = format!("{} ({})", Esc(&d.disk_id), Esc(&d.href));
        disks.push(disk);
    }
    dedupe_ids(&mut disks);
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
        kind: "ovf",
        path: path.to_path_buf(),
        expected_member_digests: vec![],
        nics: info.nics,
        vm_id: None,
        guest: info.guest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:id="file1" ovf:href="web-disk1.vmdk" ovf:size="1024"/>
    <File ovf:id="file2" ovf:href="web-disk2.vmdk"/>
  </References>
  <DiskSection>
    <Disk ovf:diskId="vmdisk2" ovf:fileRef="file2" ovf:capacity="1"/>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="1"/>
  </DiskSection>
  <VirtualSystem ovf:id="web01-id">
    <Name>web01</Name>
    <OperatingSystemSection ovf:id="94" vmw:osType="windows2019srv_64Guest"><Description>Microsoft Windows Server 2019</Description></OperatingSystemSection>
    <VirtualHardwareSection>
      <System><vssd:VirtualSystemType xmlns:vssd="x">vmx-13</vssd:VirtualSystemType></System>
      <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>6144</rasd:VirtualQuantity></Item>
      <Item><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:HostResource>ovf:/disk/vmdisk2</rasd:HostResource><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>7</rasd:AddressOnParent><rasd:Connection>VM Network</rasd:Connection><rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:AA:00:01</rasd:Address><rasd:Connection>DMZ</rasd:Connection><rasd:ResourceSubType>E1000</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn reads_facts_and_disk_order() {
        let i = parse(SAMPLE).expect("parse");
        assert_eq!(i.name, "web01");
        assert_eq!(i.cpu, Some(4));
        assert_eq!(i.memory_mib, Some(6144));
        assert_eq!(i.firmware, Firmware::Uefi);
        assert_eq!(i.guest.as_deref(), Some("windows2019srv_64Guest"));
        let ids: Vec<_> = i.disks.iter().map(|d| d.disk_id.as_str()).collect();
        assert_eq!(ids, ["vmdisk1", "vmdisk2"]);
        assert_eq!(i.disks[0].size, Some(1024));
        assert_eq!(
            i.nics,
            vec![
                NicFact { mac: None, network: Some("VM Network".into()), model: Some("vmxnet3".into()) },
                NicFact {
                    mac: Some("00:50:56:aa:00:01".into()),
                    network: Some("DMZ".into()),
                    model: Some("e1000".into())
                },
            ]
        );
    }

    #[test]
    fn memory_units() {
        assert_eq!(to_mib(4, "byte * 2^30"), Some(4096));
        assert_eq!(to_mib(512, "MegaBytes"), Some(512));
        assert_eq!(to_mib(1, "byte * 1024 * 1024"), Some(1));
        assert_eq!(to_mib(1, "furlongs"), None);
    }

    #[test]
    fn refuses_bad_ovfs() {
        assert!(parse("<notovf/>").is_err());
        assert!(
            parse("<Envelope><References><File id=\"f\" href=\"x\" compression=\"gzip\"/></References></Envelope>")
                .is_err()
        );
        assert!(
            parse("<Envelope><DiskSection><Disk diskId=\"d\" fileRef=\"nope\"/></DiskSection></Envelope>").is_err()
        );
        assert!(parse("<!DOCTYPE x [<!ENTITY a \"b\">]><Envelope/>").is_err(), "no DTDs (entity expansion)");
        for href in ["../etc/shadow", "/etc/shadow", "http://x/y.vmdk", "a/../../b"] {
            assert!(check_href(href).is_err(), "{href}");
        }
        assert!(check_href("disk1.vmdk").is_ok());
    }
}
