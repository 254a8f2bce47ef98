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
    /// The domain's UUID ([`domain_uuid`]).
    pub uuid: Option<String>,
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
        if let Some(u) = &self.uuid
            && (u.len() != 36 || !u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        {
            return bad(format!("{u:?} is not a UUID"));
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
        if let Some(u) = &self.uuid {
            let _ = writeln!(x, "  <uuid>{}</uuid>", xml_escape(u));
        }
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

/// How long `virsh` or `virt-xml-validate` may take (a libvirt daemon that does not answer).
pub const TOOL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn run(program: &str, args: &[&str]) -> Result<String, LibvirtError> {
    use std::io::Read;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| LibvirtError::Tool {
            program: program.into(),
            message: format!("cannot run it: {e} (Debian: apt install libvirt-clients)"),
        })?;
    // Both pipes are read on threads of their own (a full pipe would block the tool), while this
    // one waits for the exit and kills the tool at the deadline.
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.by_ref().take(1 << 20).read_to_end(&mut buf);
                // Past the bound, keep draining: a tool blocked on a full pipe would look hung.
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            }
            buf
        })
    };
    let out_t = pipe(child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>));
    let err_t = pipe(child.stderr.take().map(|o| Box::new(o) as Box<dyn Read + Send>));
    let deadline = std::time::Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let out = std::process::Output {
        status: match status {
            Some(st) => st,
            None => {
                return Err(LibvirtError::Tool {
                    program: program.into(),
                    message: format!("did not finish within {}s and was stopped", TOOL_TIMEOUT.as_secs()),
                });
            }
        },
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    };
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

/// `virsh -c <uri> undefine <domain>` (a name or UUID).
pub fn undefine(uri: &str, domain: &str) -> Result<String, LibvirtError> {
    run("virsh", &["-q", "-c", uri, "undefine", domain]).map(|s| s.trim().to_string())
}

/// `virsh -c <uri> define <xml>`: the domain is defined (not started). Returns virsh's words.
pub fn define(uri: &str, xml: &Path) -> Result<String, LibvirtError> {
    if uri.is_empty() || uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(LibvirtError::Invalid(format!("{uri:?} is not a libvirt URI")));
    }
    let path = xml.to_str().ok_or_else(|| LibvirtError::Invalid("the XML path is not UTF-8".into()))?;
    run("virsh", &["-q", "-c", uri, "define", path]).map(|s| s.trim().to_string())
}

/// The bus a guest boots from when `auto` is asked: SATA for Windows (whose installations have no
/// virtio drivers unless someone added them), virtio for the rest (Linux and BSD guests carry it).
/// `guest` is what the source says: VMX `guestOS` (`windows9-64`), OVF `vmw:osType` or vSphere's
/// `guestId` (`windows2019srv_64Guest`), or a full name (`Microsoft Windows Server 2019`).
pub fn bus_for_guest(guest: Option<&str>) -> Bus {
    let g = guest.unwrap_or("").to_ascii_lowercase();
    // VMware names Windows Server 2008 `longhorn`.
    if g.contains("windows") || g.starts_with("win") || g.starts_with("longhorn") { Bus::Sata } else { Bus::Virtio }
}

/// The domain's UUID: the source VM's own (vSphere's instance UUID) when it has one, so that
/// exporting the same VM again, or retrying its job, redefines the same domain, and another VM of
/// the same name is refused by libvirt. Without one libvirt keeps the name's UUID or makes one.
pub fn domain_uuid(vm_id: Option<&str>) -> Option<String> {
    vm_id
        .filter(|u| u.len() == 36 && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .map(|u| u.to_ascii_lowercase())
}

/// The manifest key (inside the `hyperfarm` object) of a job asking its agent to define the
/// converted VM in libvirt: `{"bus": "virtio", "network": "default"}`.
pub const REQUEST_KEY: &str = "libvirt";

/// What a job asks of the conversion host. The libvirt URI is the agent's own setting, never the
/// job's: a job from the shared queue does not choose where the agent connects.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DefineRequest {
    pub bus: String,
    pub network: String,
}

impl DefineRequest {
    /// The request in a manifest, checked: `Ok(None)` when the job asks for nothing.
    pub fn of(m: &crate::manifest::Manifest) -> Result<Option<DefineRequest>, String> {
        let Some(v) = m.hyperfarm.as_ref().and_then(|h| h.extra.get(REQUEST_KEY)) else {
            return Ok(None);
        };
        let r: DefineRequest = serde_json::from_value(v.clone()).map_err(|e| {
            format!(
                "hyperfarm.{REQUEST_KEY}: {e} (expected {{\"bus\": \"auto\"|\"virtio\"|\"sata\", \"network\": NAME}})"
            )
        })?;
        if r.bus != "auto" && Bus::parse(&r.bus).is_none() {
            return Err(format!(
                "hyperfarm.{REQUEST_KEY}.bus: {:?} is not auto, virtio or sata",
                crate::text::bounded(&r.bus, 40)
            ));
        }
        let ok = !r.network.is_empty()
            && r.network.len() <= 64
            && r.network.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(format!(
                "hyperfarm.{REQUEST_KEY}.network: {:?} is not a libvirt network name (letters, digits, '.', '_', '-')",
                crate::text::bounded(&r.network, 80)
            ));
        }
        Ok(Some(r))
    }
}

/// The domain of a converted job, from its manifest's facts: CPUs, memory (`hyperfarm.memory_mib`,
/// else `vm.mem_gb`), firmware, the source's NICs (`hyperfarm.nics`; their MACs kept, all on the
/// requested network), and the converted disks (boot disk first). Unknown CPUs or memory become 1
/// and 2048 MiB.
pub fn spec_from_manifest(
    m: &crate::manifest::Manifest,
    name: &str,
    disks: Vec<PathBuf>,
    req: &DefineRequest,
) -> DomainSpec {
    let vm = m.vm.as_ref();
    let memory = m
        .hyperfarm
        .as_ref()
        .and_then(|h| h.memory_mib)
        .or_else(|| vm.and_then(|v| v.mem_gb).map(|g| g.saturating_mul(1024)))
        .filter(|m| *m >= 1)
        .unwrap_or(2048);
    let macs: Vec<Option<String>> = m
        .hyperfarm
        .as_ref()
        .and_then(|h| h.extra.get("nics"))
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .take(32)
                .map(|n| n.get("mac").and_then(|m| m.as_str()).filter(|m| valid_mac(m)).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let nics = if macs.is_empty() {
        vec![Nic { mac: None, network: req.network.clone() }]
    } else {
        macs.into_iter().map(|mac| Nic { mac, network: req.network.clone() }).collect()
    };
    DomainSpec {
        name: name.to_string(),
        uuid: domain_uuid(m.source.as_ref().and_then(|s| s.vm_id.as_deref())),
        vcpus: vm.and_then(|v| v.cpu).filter(|c| *c >= 1).unwrap_or(1),
        memory_mib: memory,
        uefi: vm.and_then(|v| v.firmware.as_deref()) == Some("uefi"),
        disks,
        bus: Bus::parse(&req.bus).unwrap_or_else(|| {
            bus_for_guest(m.hyperfarm.as_ref().and_then(|h| h.extra.get("guest")).and_then(|g| g.as_str()))
        }),
        nics,
    }
}

/// What defining a domain came to; carried in the result record of the job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub domain: String,
    pub uri: String,
    /// The domain XML written beside the qcow2 files.
    pub xml: String,
    /// Whether `virt-xml-validate` checked it (false: not installed).
    #[serde(default)]
    pub validated: bool,
    pub defined: bool,
    /// Where it was defined (host name).
    #[serde(default)]
    pub host: String,
    /// Why it was not defined, and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Write `spec` as `xml_path`, validate it, define it at `uri`. Every failure is in the outcome.
pub fn define_domain(spec: &DomainSpec, xml_path: &Path, uri: &str) -> Outcome {
    let mut out = Outcome {
        domain: spec.name.clone(),
        uri: uri.to_string(),
        xml: xml_path.display().to_string(),
        validated: false,
        defined: false,
        host: crate::fsx::hostname(),
        error: None,
    };
    let r = (|| -> Result<(), LibvirtError> {
        let xml = spec.xml()?;
        crate::fsx::replace_file(xml_path, xml.as_bytes()).map_err(|e| LibvirtError::Tool {
            program: "writing the domain XML".into(),
            message: format!("{}: {e}", xml_path.display()),
        })?;
        out.validated = validate(xml_path)?;
        define(uri, xml_path)?;
        Ok(())
    })();
    match r {
        Ok(()) => out.defined = true,
        Err(e) => {
            out.error = Some(format!(
                "defining libvirt domain {} at {uri}: {e}; the VM was converted: define it by hand when fixed: virsh -c {uri} define {}",
                spec.name,
                xml_path.display()
            ))
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "web01".into(),
            uuid: Some("01a231bc-c6c6-71a3-8f2e-1fa6cdce39a9".into()),
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
            "<uuid>01a231bc-c6c6-71a3-8f2e-1fa6cdce39a9</uuid>",
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

    fn manifest(hyperfarm_extra: &str) -> crate::manifest::Manifest {
        let text = format!(
            r#"{{"manifest_version": "1.0", "source": {{"provider": "vsphere", "vm_id": "5003A1B2-0000-4000-8000-00000000C0DE"}}, "vm": {{"cpu": 2, "firmware": "uefi"}},
                "disks": [{{"id": "d0", "source_format": "raw", "bytes": 512, "local_path": "disks/d0.raw"}}],
                "hyperfarm": {{"schema_version": 1, "job_id": "01a231bc-c6c6-71a3-8f2e-1fa6cdce39a9", "memory_mib": 3072{hyperfarm_extra}}}}}"#
        );
        crate::manifest::Manifest::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn a_jobs_request_is_checked_and_its_domain_made_from_the_manifest() {
        assert_eq!(DefineRequest::of(&manifest("")).unwrap(), None);
        for bad in [
            r#""libvirt": {"bus": "ide", "network": "default"}"#,
            r#""libvirt": {"bus": "auto", "network": "a b"}"#,
            r#""libvirt": 7"#,
        ] {
            assert!(DefineRequest::of(&manifest(&format!(", {bad}"))).is_err(), "{bad}");
        }
        let m = manifest(
            r#", "libvirt": {"bus": "auto", "network": "prod"}, "guest": "windows2019srv_64Guest",
               "nics": [{"mac": "00:50:56:AA:00:01"}, {"mac": "junk"}]"#,
        );
        let req = DefineRequest::of(&m).unwrap().unwrap();
        let spec = spec_from_manifest(&m, "db", vec![PathBuf::from("/out/db.qcow2")], &req);
        assert_eq!(spec.uuid.as_deref(), Some("5003a1b2-0000-4000-8000-00000000c0de"));
        assert_eq!(domain_uuid(Some("vm-42")), None);
        assert_eq!((spec.vcpus, spec.memory_mib, spec.uefi, spec.bus), (2, 3072, true, Bus::Sata));
        assert_eq!(
            spec.nics,
            vec![
                Nic { mac: Some("00:50:56:AA:00:01".into()), network: "prod".into() },
                Nic { mac: None, network: "prod".into() }
            ]
        );
        spec.xml().unwrap();
    }

    #[test]
    fn windows_guests_get_sata_when_the_bus_is_auto() {
        for g in ["windows9-64", "windows2019srv_64Guest", "Microsoft Windows Server 2019 (64-bit)", "winNetEnterprise"]
        {
            assert_eq!(bus_for_guest(Some(g)), Bus::Sata, "{g}");
        }
        for g in ["ubuntu-64", "rhel9_64Guest", "Debian GNU/Linux 12 (64-bit)", "otherGuest"] {
            assert_eq!(bus_for_guest(Some(g)), Bus::Virtio, "{g}");
        }
        assert_eq!(bus_for_guest(None), Bus::Virtio);
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
