//! vSphere calls: the session (service content, login, logout), the inventory (every VM with its
//! inventory path, power state and size), one VM's facts (CPUs, memory, firmware, disks, NICs),
//! snapshots and tasks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hyperfarm_shared::text::markup_escape;

use super::soap::{self, MoRef, Soap, VsError, child, child_text, returnvals, xsi_type};

/// The service's entry points.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub view_manager: MoRef,
    pub session_manager: MoRef,
    /// "VMware vCenter Server 8.0.2 build-…"
    pub full_name: String,
    pub api_version: String,
}

pub async fn service_content(s: &Soap) -> Result<ServiceContent, VsError> {
    let text = s
        .call(r#"<RetrieveServiceContent xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></RetrieveServiceContent>"#)
        .await?;
    let doc = soap::parse(&text)?;
    let rv = returnvals(&doc).next().ok_or_else(|| not_vsphere("RetrieveServiceContent"))?;
    let get = |name: &str| child(rv, name).and_then(MoRef::of).ok_or_else(|| not_vsphere(name));
    let about = child(rv, "about");
    Ok(ServiceContent {
        root_folder: get("rootFolder")?,
        property_collector: get("propertyCollector")?,
        view_manager: get("viewManager")?,
        session_manager: get("sessionManager")?,
        full_name: about.and_then(|a| child_text(a, "fullName")).unwrap_or("").to_string(),
        api_version: about.and_then(|a| child_text(a, "apiVersion")).unwrap_or("").to_string(),
    })
}

fn not_vsphere(what: &str) -> VsError {
    VsError::Protocol(format!("the server's answer lacks {what}: is this a vCenter or ESXi SDK endpoint?"))
}

pub async fn login(s: &Soap, sc: &ServiceContent, user: &str, password: &str) -> Result<(), VsError> {
    s.call(&format!(
        r#"<Login xmlns="urn:vim25">{}<userName>{}</userName><password>{}</password></Login>"#,
        sc.session_manager.xml("_this"),
        markup_escape(user),
        markup_escape(password)
    ))
    .await
    .map(|_| ())
}

pub async fn logout(s: &Soap, sc: &ServiceContent) {
    if let Err(e) = s.call(&format!(r#"<Logout xmlns="urn:vim25">{}</Logout>"#, sc.session_manager.xml("_this"))).await
    {
        tracing::debug!("vSphere logout: {}", hyperfarm_shared::text::Esc(&e.to_string()));
    }
}

/// One object's properties, as the property collector returned them.
#[derive(Debug, Default)]
pub struct Props<'a, 'i> {
    pub obj: Option<MoRef>,
    pub vals: HashMap<String, roxmltree::Node<'a, 'i>>,
}

impl<'a, 'i> Props<'a, 'i> {
    pub fn text(&self, name: &str) -> Option<&'a str> {
        self.vals.get(name).and_then(|n| n.text())
    }
    pub fn num<T: std::str::FromStr>(&self, name: &str) -> Option<T> {
        self.text(name).and_then(|t| t.trim().parse().ok())
    }
    pub fn moref(&self, name: &str) -> Option<MoRef> {
        self.vals.get(name).and_then(|n| MoRef::of(*n))
    }
}

/// The `objects` of a RetrievePropertiesEx/ContinueRetrievePropertiesEx answer, and its token.
fn objects<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> (Vec<Props<'a, 'i>>, Option<String>) {
    let mut out = Vec::new();
    let mut token = None;
    for rv in returnvals(doc) {
        for n in rv.children().filter(|n| n.is_element()) {
            match n.tag_name().name() {
                "objects" => {
                    let mut p = Props { obj: child(n, "obj").and_then(MoRef::of), vals: HashMap::new() };
                    for ps in n.children().filter(|c| c.is_element() && c.tag_name().name() == "propSet") {
                        if let (Some(name), Some(val)) = (child_text(ps, "name"), child(ps, "val")) {
                            p.vals.insert(name.to_string(), val);
                        }
                    }
                    out.push(p);
                }
                "token" => token = n.text().map(str::to_string),
                _ => {}
            }
        }
    }
    (out, token)
}

/// Most bytes of one property answer, all its pages together.
pub const MAX_ANSWER: usize = 256 << 20;

/// Properties of objects: the answers' texts (each page of a long answer is one text).
pub async fn retrieve(s: &Soap, sc: &ServiceContent, spec: &str) -> Result<Vec<String>, VsError> {
    let mut pages = Vec::new();
    let mut bytes = 0usize;
    let text = s
        .call(&format!(
            r#"<RetrievePropertiesEx xmlns="urn:vim25">{}<specSet>{spec}</specSet><options><maxObjects>500</maxObjects></options></RetrievePropertiesEx>"#,
            sc.property_collector.xml("_this")
        ))
        .await?;
    let mut token = objects(&soap::parse(&text)?).1;
    bytes += text.len();
    pages.push(text);
    while let Some(t) = token {
        if bytes > MAX_ANSWER {
            return Err(VsError::Protocol(format!(
                "the inventory answer is larger than {} MiB; list a part of it with --folder",
                MAX_ANSWER >> 20
            )));
        }
        let text = s
            .call(&format!(
                r#"<ContinueRetrievePropertiesEx xmlns="urn:vim25">{}<token>{}</token></ContinueRetrievePropertiesEx>"#,
                sc.property_collector.xml("_this"),
                markup_escape(&t)
            ))
            .await?;
        token = objects(&soap::parse(&text)?).1;
        bytes += text.len();
        pages.push(text);
    }
    Ok(pages)
}

/// The property spec of `kind` objects with `paths`.
fn prop_spec(kind: &str, paths: &[&str]) -> String {
    let mut s = format!("<propSet><type>{kind}</type>");
    for p in paths {
        s.push_str(&format!("<pathSet>{p}</pathSet>"));
    }
    s.push_str("</propSet>");
    s
}

/// A VM in the inventory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmEntry {
    /// `/DC0/vm/folder/name`.
    pub path: String,
    pub name: String,
    #[serde(skip)]
    pub moref: MoRef,
    pub id: String,
    pub power: String,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub guest: Option<String>,
    pub template: bool,
}

/// Every VM of the inventory, with its path.
pub async fn list_vms(s: &Soap, sc: &ServiceContent) -> Result<Vec<VmEntry>, VsError> {
    let text = s
        .call(&format!(
            r#"<CreateContainerView xmlns="urn:vim25">{}{}<type>Folder</type><type>Datacenter</type><type>VirtualMachine</type><type>VirtualApp</type><recursive>true</recursive></CreateContainerView>"#,
            sc.view_manager.xml("_this"),
            sc.root_folder.xml("container")
        ))
        .await?;
    let view = returnvals(&soap::parse(&text)?).next().and_then(MoRef::of).ok_or_else(|| not_vsphere("a view"))?;
    let spec = format!(
        r#"{}{}{}{}<objectSet>{}<skip>true</skip><selectSet xsi:type="TraversalSpec"><name>view</name><type>ContainerView</type><path>view</path><skip>false</skip></selectSet></objectSet>"#,
        prop_spec("Folder", &["name", "parent"]),
        prop_spec("Datacenter", &["name", "parent"]),
        prop_spec("VirtualApp", &["name", "parent", "parentFolder"]),
        prop_spec(
            "VirtualMachine",
            &[
                "name",
                "parent",
                "parentVApp",
                "runtime.powerState",
                "config.hardware.numCPU",
                "config.hardware.memoryMB",
                "config.guestFullName",
                "config.template",
            ]
        ),
        view.xml("obj")
    );
    let pages = retrieve(s, sc, &spec).await;
    let _ = s.call(&format!(r#"<DestroyView xmlns="urn:vim25">{}</DestroyView>"#, view.xml("_this"))).await;
    let pages = pages?;
    let mut names: HashMap<MoRef, (String, Option<MoRef>)> = HashMap::new();
    let mut vms = Vec::new();
    for page in &pages {
        let doc = soap::parse(page)?;
        for p in objects(&doc).0 {
            let Some(obj) = p.obj.clone() else { continue };
            let name = p.text("name").unwrap_or("").to_string();
            let parent = p.moref("parent").or_else(|| p.moref("parentVApp")).or_else(|| p.moref("parentFolder"));
            names.insert(obj.clone(), (name.clone(), parent));
            if obj.kind == "VirtualMachine" {
                vms.push(VmEntry {
                    path: String::new(),
                    name,
                    id: obj.value.clone(),
                    moref: obj,
                    power: p.text("runtime.powerState").unwrap_or("unknown").to_string(),
                    cpus: p.num("config.hardware.numCPU"),
                    memory_mib: p.num("config.hardware.memoryMB"),
                    guest: p.text("config.guestFullName").map(str::to_string),
                    template: p.text("config.template") == Some("true"),
                });
            }
        }
    }
    tracing::debug!(objects = names.len(), vms = vms.len(), pages = pages.len(), "read the inventory");
    for vm in &mut vms {
        vm.path = path_of(&vm.moref, &names, &sc.root_folder);
    }
    vms.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(vms)
}

/// `/DC/vm/…/name`: the names up to (not including) the root folder. Names are escaped the way
/// vSphere escapes them in inventory paths (`/` as `%2f`).
fn path_of(obj: &MoRef, names: &HashMap<MoRef, (String, Option<MoRef>)>, root: &MoRef) -> String {
    let mut parts = Vec::new();
    let mut cur = Some(obj.clone());
    while let Some(o) = cur {
        if &o == root || parts.len() > 256 {
            break;
        }
        match names.get(&o) {
            Some((name, parent)) => {
                parts.push(name.replace('%', "%25").replace('/', "%2f"));
                cur = parent.clone();
            }
            None => break,
        }
    }
    parts.reverse();
    format!("/{}", parts.join("/"))
}

/// A disk of a VM, in the order of its devices.
#[derive(Debug, Clone, PartialEq)]
pub struct VmDisk {
    pub key: i64,
    /// `<controller type><bus number>:<unit>` (`ParaVirtualSCSIController0:1`): how an export
    /// lease's device keys name the disk.
    pub slot: Option<String>,
    pub label: String,
    /// `[datastore] folder/name.vmdk`
    pub file: String,
    pub capacity_bytes: u64,
}

/// A network interface of a VM.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VmNic {
    /// `vmxnet3`, `e1000e`…
    pub model: String,
    pub mac: Option<String>,
    /// The port group (or network) it is connected to.
    pub network: Option<String>,
}

/// What is known of a VM.
#[derive(Debug, Clone)]
pub struct VmFacts {
    pub moref: MoRef,
    pub name: String,
    /// Its inventory path (`/DC1/vm/web`).
    pub path: String,
    pub power: String,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    /// `bios` or `efi`.
    pub firmware: Option<String>,
    pub instance_uuid: Option<String>,
    pub guest: Option<String>,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
}

/// Ethernet card types of the vSphere API, and what they are called here.
const NIC_TYPES: [(&str, &str); 9] = [
    ("VirtualVmxnet3", "vmxnet3"),
    ("VirtualVmxnet3Vrdma", "vmxnet3"),
    ("VirtualVmxnet2", "vmxnet2"),
    ("VirtualVmxnet", "vmxnet"),
    ("VirtualE1000e", "e1000e"),
    ("VirtualE1000", "e1000"),
    ("VirtualPCNet32", "pcnet32"),
    ("VirtualSriovEthernetCard", "sriov"),
    ("VirtualEthernetCard", "ethernet"),
];

pub async fn vm_facts(s: &Soap, sc: &ServiceContent, vm: &MoRef) -> Result<VmFacts, VsError> {
    let spec = format!(
        "{}<objectSet>{}<skip>false</skip></objectSet>",
        prop_spec(
            "VirtualMachine",
            &[
                "name",
                "runtime.powerState",
                "config.hardware.numCPU",
                "config.hardware.memoryMB",
                "config.firmware",
                "config.instanceUuid",
                "config.guestFullName",
                "config.guestId",
                "config.hardware.device",
                "config.bootOptions.bootOrder",
            ]
        ),
        vm.xml("obj")
    );
    let pages = retrieve(s, sc, &spec).await?;
    let page = pages.first().ok_or_else(|| not_vsphere("the VM's properties"))?;
    let doc = soap::parse(page)?;
    let (objs, _) = objects(&doc);
    let p = objs.into_iter().next().ok_or_else(|| VsError::Fault {
        kind: "ManagedObjectNotFound".into(),
        message: format!("the VM {vm} is gone"),
    })?;
    let mut facts = VmFacts {
        moref: vm.clone(),
        name: p.text("name").unwrap_or("").to_string(),
        path: String::new(),
        power: p.text("runtime.powerState").unwrap_or("unknown").to_string(),
        cpus: p.num("config.hardware.numCPU"),
        memory_mib: p.num("config.hardware.memoryMB"),
        firmware: p.text("config.firmware").map(str::to_string),
        instance_uuid: p.text("config.instanceUuid").map(str::to_string),
        guest: p.text("config.guestId").or(p.text("config.guestFullName")).map(str::to_string),
        disks: vec![],
        nics: vec![],
    };
    if let Some(devs) = p.vals.get("config.hardware.device") {
        (facts.disks, facts.nics) = devices(*devs);
    }
    // The boot disk first, when the VM's boot order names one.
    let boot_key = p.vals.get("config.bootOptions.bootOrder").and_then(|order| {
        order
            .children()
            .filter(|n| n.is_element())
            .find(|n| xsi_type(*n) == Some("VirtualMachineBootOptionsBootableDiskDevice"))
            .and_then(|n| child_text(n, "deviceKey"))
            .and_then(|k| k.trim().parse::<i64>().ok())
    });
    if let Some(k) = boot_key
        && let Some(pos) = facts.disks.iter().position(|d| d.key == k)
    {
        let boot = facts.disks.remove(pos);
        facts.disks.insert(0, boot);
    }
    Ok(facts)
}

/// Disks and NICs from `config.hardware.device`.
fn devices(list: roxmltree::Node<'_, '_>) -> (Vec<VmDisk>, Vec<VmNic>) {
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    // Controllers: key -> type and bus number.
    let controllers: HashMap<i64, (String, i64)> = list
        .children()
        .filter(|n| n.is_element() && child(*n, "busNumber").is_some())
        .filter_map(|n| {
            let key = child_text(n, "key")?.trim().parse().ok()?;
            let bus = child_text(n, "busNumber")?.trim().parse().ok()?;
            Some((key, (xsi_type(n)?.to_string(), bus)))
        })
        .collect();
    for d in list.children().filter(|n| n.is_element()) {
        let ty = xsi_type(d).unwrap_or("");
        let label = child(d, "deviceInfo").and_then(|i| child_text(i, "label")).unwrap_or("").to_string();
        if ty == "VirtualDisk" {
            let capacity = child_text(d, "capacityInBytes")
                .and_then(|t| t.trim().parse::<u64>().ok())
                .or_else(|| child_text(d, "capacityInKB").and_then(|t| t.trim().parse::<u64>().ok()).map(|k| k * 1024))
                .unwrap_or(0);
            let controller = child_text(d, "controllerKey").and_then(|k| k.trim().parse::<i64>().ok());
            let unit = child_text(d, "unitNumber").and_then(|k| k.trim().parse::<i64>().ok());
            let slot = match (controller.and_then(|c| controllers.get(&c)), unit) {
                (Some((kind, bus)), Some(unit)) => Some(format!("{kind}{bus}:{unit}")),
                _ => None,
            };
            disks.push(VmDisk {
                key: child_text(d, "key").and_then(|k| k.trim().parse().ok()).unwrap_or(0),
                slot,
                label,
                file: child(d, "backing").and_then(|b| child_text(b, "fileName")).unwrap_or("").to_string(),
                capacity_bytes: capacity,
            });
        } else if let Some((_, model)) =
            NIC_TYPES.iter().find(|(t, _)| *t == ty).or_else(|| child(d, "macAddress").map(|_| &NIC_TYPES[8]))
        {
            let backing = child(d, "backing");
            let network = backing
                .and_then(|b| child_text(b, "deviceName"))
                .or_else(|| backing.and_then(|b| child(b, "port")).and_then(|p| child_text(p, "portgroupKey")))
                .map(str::to_string);
            if nics.len() < 32 {
                nics.push(VmNic {
                    model: model.to_string(),
                    mac: child_text(d, "macAddress")
                        .filter(|m| crate::source::vmx::is_mac(m))
                        .map(|m| m.to_ascii_lowercase()),
                    network,
                });
            }
        }
    }
    (disks, nics)
}

/// Wait for a task to end; its result element's text (a snapshot's reference) on success.
pub async fn wait_task(
    s: &Soap,
    sc: &ServiceContent,
    task: &MoRef,
    limit: Duration,
    cancel: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Option<MoRef>, VsError> {
    let began = Instant::now();
    let spec = format!("{}<objectSet>{}<skip>false</skip></objectSet>", prop_spec("Task", &["info"]), task.xml("obj"));
    loop {
        let pages = retrieve(s, sc, &spec).await?;
        let doc = soap::parse(pages.first().map(String::as_str).unwrap_or(""))?;
        let (objs, _) = objects(&doc);
        if let Some(info) = objs.first().and_then(|p| p.vals.get("info")) {
            match child_text(*info, "state") {
                Some("success") => return Ok(child(*info, "result").and_then(MoRef::of)),
                Some("error") => {
                    let err = child(*info, "error");
                    let message = err.and_then(|e| child_text(e, "localizedMessage")).unwrap_or("failed").to_string();
                    let kind =
                        err.and_then(|e| child(e, "fault")).and_then(xsi_type).unwrap_or("TaskError").to_string();
                    return Err(VsError::Fault { kind, message });
                }
                _ => {}
            }
        }
        if began.elapsed() > limit {
            return Err(VsError::Protocol(format!("the vSphere task {task} did not end in {}s", limit.as_secs())));
        }
        if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            let _ = s.call(&format!(r#"<CancelTask xmlns="urn:vim25">{}</CancelTask>"#, task.xml("_this"))).await;
            return Err(VsError::Fault { kind: "Cancelled".into(), message: "interrupted".into() });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Take a snapshot of the VM's disks (no memory, not quiesced): what a running VM is exported from.
pub async fn create_snapshot(
    s: &Soap,
    sc: &ServiceContent,
    vm: &MoRef,
    name: &str,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<MoRef, VsError> {
    let text = s
        .call(&format!(
            r#"<CreateSnapshot_Task xmlns="urn:vim25">{}<name>{}</name><description>taken by hyperexport to export the running VM; removed after the export</description><memory>false</memory><quiesce>false</quiesce></CreateSnapshot_Task>"#,
            vm.xml("_this"),
            markup_escape(name)
        ))
        .await?;
    let task = returnvals(&soap::parse(&text)?).next().and_then(MoRef::of).ok_or_else(|| not_vsphere("a task"))?;
    wait_task(s, sc, &task, Duration::from_secs(1800), Some(cancel))
        .await?
        .ok_or_else(|| VsError::Protocol("the snapshot task gave no snapshot".into()))
}

pub async fn remove_snapshot(s: &Soap, sc: &ServiceContent, snapshot: &MoRef) -> Result<(), VsError> {
    let text = s
        .call(&format!(
            r#"<RemoveSnapshot_Task xmlns="urn:vim25">{}<removeChildren>false</removeChildren><consolidate>true</consolidate></RemoveSnapshot_Task>"#,
            snapshot.xml("_this")
        ))
        .await?;
    let task = returnvals(&soap::parse(&text)?).next().and_then(MoRef::of).ok_or_else(|| not_vsphere("a task"))?;
    wait_task(s, sc, &task, Duration::from_secs(3600), None).await.map(|_| ())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn devices_give_disks_and_nics_in_order() {
        let xml = r#"<val xmlns="urn:vim25" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="ArrayOfVirtualDevice">
<VirtualDevice xsi:type="ParaVirtualSCSIController"><key>1000</key><deviceInfo><label>SCSI controller 0</label></deviceInfo><busNumber>0</busNumber></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2000</key><deviceInfo><label>Hard disk 1</label></deviceInfo><controllerKey>1000</controllerKey><unitNumber>1</unitNumber><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web/web.vmdk</fileName></backing><capacityInKB>16777216</capacityInKB></VirtualDevice>
<VirtualDevice xsi:type="VirtualVmxnet3"><key>4000</key><deviceInfo><label>Network adapter 1</label></deviceInfo><backing xsi:type="VirtualEthernetCardNetworkBackingInfo"><deviceName>VM Network</deviceName></backing><macAddress>00:50:56:AB:CD:01</macAddress></VirtualDevice>
<VirtualDevice xsi:type="VirtualDisk"><key>2001</key><deviceInfo><label>Hard disk 2</label></deviceInfo><backing xsi:type="VirtualDiskFlatVer2BackingInfo"><fileName>[ds1] web/web_1.vmdk</fileName></backing><capacityInKB>1024</capacityInKB><capacityInBytes>1048576</capacityInBytes></VirtualDevice>
<VirtualDevice xsi:type="VirtualE1000"><key>4002</key><macAddress>not-a-mac</macAddress></VirtualDevice>
<VirtualDevice xsi:type="VirtualE1000e"><key>4001</key><backing xsi:type="VirtualEthernetCardDistributedVirtualPortBackingInfo"><port><portgroupKey>dvportgroup-12</portgroupKey></port></backing><macAddress>00:50:56:ab:cd:02</macAddress></VirtualDevice>
</val>"#;
        let doc = roxmltree::Document::parse(xml).unwrap();
        let (disks, nics) = devices(doc.root_element());
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0].file, "[ds1] web/web.vmdk");
        assert_eq!(disks[0].capacity_bytes, 16 << 30);
        assert_eq!(disks[0].slot.as_deref(), Some("ParaVirtualSCSIController0:1"));
        assert_eq!(disks[1].slot, None);
        assert_eq!(disks[1].capacity_bytes, 1 << 20);
        assert_eq!(
            nics,
            vec![
                VmNic {
                    model: "vmxnet3".into(),
                    mac: Some("00:50:56:ab:cd:01".into()),
                    network: Some("VM Network".into())
                },
                VmNic { model: "e1000".into(), mac: None, network: None },
                VmNic {
                    model: "e1000e".into(),
                    mac: Some("00:50:56:ab:cd:02".into()),
                    network: Some("dvportgroup-12".into())
                },
            ]
        );
    }

    #[test]
    fn inventory_paths_escape_slashes() {
        let root = MoRef::new("Folder", "group-d1");
        let mut names = HashMap::new();
        names.insert(MoRef::new("Datacenter", "dc1"), ("DC1".to_string(), Some(root.clone())));
        names.insert(MoRef::new("Folder", "f1"), ("vm".to_string(), Some(MoRef::new("Datacenter", "dc1"))));
        names.insert(MoRef::new("VirtualMachine", "vm-1"), ("a/b".to_string(), Some(MoRef::new("Folder", "f1"))));
        assert_eq!(path_of(&MoRef::new("VirtualMachine", "vm-1"), &names, &root), "/DC1/vm/a%2fb");
    }
}
