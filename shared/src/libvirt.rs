//! A libvirt domain for a converted VM: the XML written from the VM's facts (CPUs, memory,
//! firmware, disks in boot order, NICs), checked with `virt-xml-validate` when it is installed,
//! and defined with `virsh define` at a libvirt URI.
//!
//! UEFI guests get `<os firmware='efi'>`: libvirt picks the OVMF loader and NVRAM template that
//! its firmware descriptors name on the host that runs the VM, so no host's loader path is baked
//! into the XML. BIOS guests use SeaBIOS (the default). The machine type is q35.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// virtio-blk: fast; the guest needs virtio drivers (Linux has them; Windows needs them installed).
    Virtio,
    /// SATA (AHCI): every guest boots from it.
    Sata,
}

impl Bus {
    pub fn parse(s: &str) -> Option<Bus> {
        match s {
            "virtio" => Some(Bus::Virtio),
            "sata" => Some(Bus::Sata),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Bus::Virtio => "virtio",
            Bus::Sata => "sata",
        }
    }

    fn device(self, index: usize) -> String {
        let prefix = match self {
            Bus::Virtio => "vd",
            Bus::Sata => "sd",
        };
        format!("{prefix}{}", disk_letters(index))
    }
}

/// `a`, `b`, …, `z`, `aa`, `ab`, … (as the kernel names disks).
fn disk_letters(mut i: usize) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).unwrap_or_default()
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// `aa:bb:cc:dd:ee:ff`, kept from the source VM (None: libvirt makes one).
    pub mac: Option<String>,
    /// The libvirt network it joins.
    pub network: String,
}

/// What the domain is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub uefi: bool,
    /// The converted disks, boot disk first.
    pub disks: Vec<PathBuf>,
    pub bus: Bus,
    pub nics: Vec<Nic>,
}

/// Why a domain cannot be written or defined.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("{0}")]
    Invalid(String),
    #[error("{program}: {message}")]
    Tool { program: String, message: String },
}

fn xml_escape(s: &str) -> String {
    crate::text::markup_escape(s)
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl DomainSpec {
    /// Check what would make an invalid or dangerous domain.
    pub fn check(&self) -> Result<(), LibvirtError> {
        let bad = |m: String| Err(LibvirtError::Invalid(m));
        if self.name.is_empty() || self.name.len() > 200 || self.name.chars().any(|c| c.is_control() || c == '/') {
            return bad(format!("{:?} cannot name a libvirt domain", self.name));
        }
        if self.vcpus == 0 || self.vcpus > 4096 {
            return bad(format!("{} virtual CPUs is not a usable count", self.vcpus));
        }
        if self.memory_mib == 0 || self.memory_mib > 64 << 20 {
            return bad(format!("{} MiB of memory is not a usable size", self.memory_mib));
        }
        if self.disks.is_empty() {
            return bad("a domain needs at least one disk".into());
        }
        for d in &self.disks {
            if !d.is_absolute() || d.to_str().is_none_or(|s| s.chars().any(char::is_control)) {
                return bad(format!("disk path {} must be absolute and printable", d.display()));
            }
        }
        for n in &self.nics {
            if let Some(m) = &n.mac
                && !valid_mac(m)
            {
                return bad(format!("{m:?} is not a MAC address"));
            }
            if n.network.is_empty() || n.network.chars().any(|c| c.is_control()) {
                return bad(format!("{:?} cannot name a libvirt network", n.network));
            }
        }
        Ok(())
    }

    /// The domain XML.
    pub fn xml(&self) -> Result<String, LibvirtError> {
        self.check()?;
        let mut x = String::new();
        let _ = writeln!(x, "<domain type='kvm'>");
        let _ = writeln!(x, "  <name>{}</name>", xml_escape(&self.name));
        let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", self.memory_mib);
        let _ = writeln!(x, "  <vcpu>{}</vcpu>", self.vcpus);
        if self.uefi {
            let _ = writeln!(x, "  <os firmware='efi'>");
        } else {
            let _ = writeln!(x, "  <os>");
        }
        let _ = writeln!(x, "    <type arch='x86_64' machine='q35'>hvm</type>");
        let _ = writeln!(x, "  </os>");
        let _ = writeln!(x, "  <features>\n    <acpi/>\n    <apic/>\n  </features>");
        let _ = writeln!(x, "  <cpu mode='host-model'/>");
        let _ = writeln!(x, "  <clock offset='utc'/>");
        let _ = writeln!(
            x,
            "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>"
        );
        let _ = writeln!(x, "  <devices>");
        for (i, d) in self.disks.iter().enumerate() {
            let _ = writeln!(x, "    <disk type='file' device='disk'>");
            let _ = writeln!(x, "      <driver name='qemu' type='qcow2'/>");
            let _ = writeln!(x, "      <source file='{}'/>", xml_escape(&d.display().to_string()));
            let _ = writeln!(x, "      <target dev='{}' bus='{}'/>", self.bus.device(i), self.bus.name());
            let _ = writeln!(x, "      <boot order='{}'/>", i + 1);
            let _ = writeln!(x, "    </disk>");
        }
        for n in &self.nics {
            let _ = writeln!(x, "    <interface type='network'>");
            if let Some(m) = &n.mac {
                let _ = writeln!(x, "      <mac address='{}'/>", m.to_ascii_lowercase());
            }
            let _ = writeln!(x, "      <source network='{}'/>", xml_escape(&n.network));
            let _ = writeln!(x, "      <model type='{}'/>", if self.bus == Bus::Virtio { "virtio" } else { "e1000e" });
            let _ = writeln!(x, "    </interface>");
        }
        let _ = writeln!(x, "    <console type='pty'/>");
        let _ = writeln!(x, "  </devices>");
        let _ = writeln!(x, "</domain>");
        Ok(x)
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, LibvirtError> {
    let out = Command::new(program).args(args).output().map_err(|e| LibvirtError::Tool {
        program: program.into(),
        message: format!("cannot run it: {e} (Debian: apt install libvirt-clients)"),
    })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(LibvirtError::Tool { program: program.into(), message: crate::text::Esc(text.trim()).to_string() })
    }
}

/// Validate the XML file against libvirt's schema with `virt-xml-validate`. `Ok(false)`: the
/// tool is not installed (nothing checked).
pub fn validate(xml: &Path) -> Result<bool, LibvirtError> {
    let path = xml.to_str().ok_or_else(|| LibvirtError::Invalid("the XML path is not UTF-8".into()))?;
    match run("virt-xml-validate", &[path, "domain"]) {
        Ok(_) => Ok(true),
        Err(LibvirtError::Tool { message, .. }) if message.starts_with("cannot run it") => Ok(false),
        Err(e) => Err(e),
    }
}

/// `virsh -c <uri> define <xml>`: the domain is defined (not started). Returns virsh's words.
pub fn define(uri: &str, xml: &Path) -> Result<String, LibvirtError> {
    if uri.is_empty() || uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(LibvirtError::Invalid(format!("{uri:?} is not a libvirt URI")));
    }
    let path = xml.to_str().ok_or_else(|| LibvirtError::Invalid("the XML path is not UTF-8".into()))?;
    run("virsh", &["-q", "-c", uri, "define", path]).map(|s| s.trim().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "web01".into(),
            vcpus: 2,
            memory_mib: 2048,
            uefi: true,
            disks: vec![PathBuf::from("/srv/out/web01.qcow2"), PathBuf::from("/srv/out/web01~disk1.qcow2")],
            bus: Bus::Virtio,
            nics: vec![Nic { mac: Some("00:50:56:AA:bb:01".into()), network: "default".into() }],
        }
    }

    #[test]
    fn the_xml_says_what_the_vm_is() {
        let x = spec().xml().unwrap();
        for want in [
            "<name>web01</name>",
            "<memory unit='MiB'>2048</memory>",
            "<vcpu>2</vcpu>",
            "<os firmware='efi'>",
            "<source file='/srv/out/web01.qcow2'/>",
            "<target dev='vda' bus='virtio'/>",
            "<boot order='1'/>",
            "<target dev='vdb' bus='virtio'/>",
            "<boot order='2'/>",
            "<mac address='00:50:56:aa:bb:01'/>",
        ] {
            assert!(x.contains(want), "{want} missing:\n{x}");
        }
        let mut s = spec();
        s.uefi = false;
        s.bus = Bus::Sata;
        let x = s.xml().unwrap();
        assert!(x.contains("  <os>\n") && x.contains("<target dev='sdb' bus='sata'/>") && x.contains("e1000e"), "{x}");
    }

    #[test]
    fn names_and_paths_are_escaped_or_refused() {
        let mut s = spec();
        s.name = "a'b<c>&".into();
        let x = s.xml().unwrap();
        assert!(x.contains("<name>a&#39;b&lt;c&gt;&amp;</name>"), "{x}");
        s.disks = vec![PathBuf::from("/srv/o'ne.qcow2")];
        assert!(s.xml().unwrap().contains("<source file='/srv/o&#39;ne.qcow2'/>"));
        for bad in [
            DomainSpec { name: "x\ny".into(), ..spec() },
            DomainSpec { vcpus: 0, ..spec() },
            DomainSpec { memory_mib: 0, ..spec() },
            DomainSpec { disks: vec![], ..spec() },
            DomainSpec { disks: vec![PathBuf::from("relative.qcow2")], ..spec() },
            DomainSpec { nics: vec![Nic { mac: Some("00:50:56".into()), network: "default".into() }], ..spec() },
        ] {
            assert!(bad.xml().is_err(), "{bad:?}");
        }
        assert!(define("qemu:///system --readonly", Path::new("/x.xml")).is_err());
    }

    #[test]
    fn disk_names_go_past_z() {
        assert_eq!(disk_letters(0), "a");
        assert_eq!(disk_letters(25), "z");
        assert_eq!(disk_letters(26), "aa");
        assert_eq!(disk_letters(27), "ab");
    }
}
