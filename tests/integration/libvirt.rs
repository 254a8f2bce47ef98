//! `hyperexport --libvirt` (direct mode): the converted VM defined in libvirt — the XML checked
//! by libvirt's own `virt-xml-validate` and defined by the real `virsh` against libvirt's test
//! driver (`test:///default`, no daemon needed).

use std::process::Command;

use hyperfarm_tests::images::{assert_identical, convert, sample_disk, vmx};
use hyperfarm_tests::{Farm, Run, bin};

fn direct(farm: &Farm, vm: &std::path::Path, extra: &[&str]) -> hyperfarm_tests::Ran {
    let mut args: Vec<String> = vec![
        "--vm".into(),
        vm.display().to_string(),
        "--pipeline".into(),
        "--output".into(),
        farm.output.display().to_string(),
        "--engine".into(),
        "qemu-img".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Run::new(&bin("hyperexport"), &args).timeout(std::time::Duration::from_secs(120)).run()
}

#[test]
fn a_converted_uefi_vm_with_two_disks_is_defined_with_its_facts() {
    let farm = Farm::new();
    let a = sample_disk(farm.path(), "a.raw", 16, 1);
    let b = sample_disk(farm.path(), "b.raw", 8, 2);
    convert(&a, &farm.src.join("app-1.vmdk"), "vmdk", None);
    convert(&b, &farm.src.join("app-2.vmdk"), "vmdk", None);
    let vm = vmx(&farm.src, "app", &[("scsi0:0", "app-1.vmdk"), ("scsi0:1", "app-2.vmdk")]);
    let ran = direct(&farm, &vm, &["--libvirt", "--libvirt-uri", "test:///default", "--json"]);
    ran.expect_code(0);
    let out: serde_json::Value = serde_json::from_str(ran.stdout().trim()).unwrap();
    assert_eq!(out["libvirt"]["domain"], "app", "{out:#}");
    assert_eq!(out["libvirt"]["validated"], true, "virt-xml-validate ran: {out:#}");
    let xml_path = farm.output.join("app.xml");
    assert_eq!(out["libvirt"]["xml"].as_str(), Some(xml_path.display().to_string().as_str()));
    let xml = std::fs::read_to_string(&xml_path).unwrap();
    let boot = farm.output.join("app.qcow2");
    let data = std::path::PathBuf::from(out["files"][1].as_str().unwrap());
    for want in [
        "<vcpu>4</vcpu>".to_string(),
        "<memory unit='MiB'>3072</memory>".to_string(),
        "<os firmware='efi'>".to_string(),
        format!("<source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n      <boot order='1'/>", boot.display()),
        format!("<source file='{}'/>\n      <target dev='vdb' bus='virtio'/>\n      <boot order='2'/>", data.display()),
        "<source network='default'/>".to_string(),
    ] {
        assert!(xml.contains(&want), "{want} missing from\n{xml}");
    }
    assert_identical(&a, &boot);
    assert_identical(&b, &data);
    // libvirt's own tools agree, run by the test itself.
    let v = Command::new("virt-xml-validate").arg(&xml_path).arg("domain").output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let d = Command::new("virsh").args(["-c", "test:///default", "define"]).arg(&xml_path).output().unwrap();
    assert!(d.status.success() && String::from_utf8_lossy(&d.stdout).contains("Domain 'app' defined"), "{d:?}");
}

#[test]
fn sata_and_bios_are_what_was_asked_for() {
    let farm = Farm::new();
    let raw = sample_disk(&farm.src, "legacy.raw", 8, 3);
    let ran = direct(&farm, &raw, &["--libvirt", "--libvirt-uri", "test:///default", "--libvirt-bus", "sata"]);
    ran.expect_code(0);
    assert!(ran.stderr().contains("libvirt domain legacy defined at test:///default"), "{}", ran.stderr());
    assert!(
        ran.stderr().contains("1 CPU / 2048 MiB where unknown"),
        "a raw disk says nothing of its CPUs: {}",
        ran.stderr()
    );
    let xml = std::fs::read_to_string(farm.output.join("legacy.xml")).unwrap();
    assert!(
        xml.contains("  <os>\n") && xml.contains("<target dev='sda' bus='sata'/>") && xml.contains("<vcpu>1</vcpu>"),
        "{xml}"
    );
}

#[test]
fn a_failed_definition_keeps_the_conversion_and_says_how_to_finish() {
    let farm = Farm::new();
    let raw = sample_disk(&farm.src, "kept.raw", 8, 4);
    let ran = direct(&farm, &raw, &["--libvirt", "--libvirt-uri", "nosuchdriver:///x"]);
    ran.expect_code(9);
    let err = ran.stderr();
    assert!(err.contains("defining libvirt domain kept") && err.contains("virsh -c nosuchdriver:///x define"), "{err}");
    assert_identical(&raw, &farm.output.join("kept.qcow2"));
    assert!(farm.output.join("kept.xml").is_file());
    // Only where the VM was converted: daemon mode refuses it up front, nothing published.
    let ran = farm.export(&raw, &["--libvirt"]);
    ran.expect_code(2);
    assert!(ran.stderr().contains("only in direct mode"), "{}", ran.stderr());
    assert!(farm.jobs_in("queued").is_empty());
}
