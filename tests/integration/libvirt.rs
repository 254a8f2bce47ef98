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
    // Export only converts nothing: refused up front, nothing published.
    let queue = farm.queue.display().to_string();
    let ran = Run::new(
        &bin("hyperexport"),
        &["--vm".into(), raw.display().to_string(), "--output".into(), queue, "--libvirt".into()],
    )
    .run();
    ran.expect_code(2);
    assert!(ran.stderr().contains("needs --pipeline"), "{}", ran.stderr());
    assert!(farm.jobs_in("queued").is_empty());
}

/// A VMX with two disks and two NICs (one static MAC, one generated).
fn vm_with_nics(farm: &Farm) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let a = sample_disk(farm.path(), "a.raw", 16, 5);
    let b = sample_disk(farm.path(), "b.raw", 8, 6);
    convert(&a, &farm.src.join("db-1.vmdk"), "vmdk", None);
    convert(&b, &farm.src.join("db-2.vmdk"), "vmdk", None);
    let vm = vmx(&farm.src, "db", &[("scsi0:0", "db-1.vmdk"), ("scsi0:1", "db-2.vmdk")]);
    let mut text = std::fs::read_to_string(&vm).unwrap();
    text.push_str(
        "ethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"vmxnet3\"\nethernet0.address = \"00:50:56:3f:10:01\"\n",
    );
    text.push_str("ethernet1.present = \"TRUE\"\nethernet1.virtualDev = \"e1000e\"\nethernet1.generatedAddress = \"00:0C:29:AB:CD:02\"\n");
    std::fs::write(&vm, text).unwrap();
    (vm, a, b)
}

#[test]
fn in_daemon_mode_the_agent_defines_the_domain_with_the_source_nics() {
    let farm = Farm::new();
    let (vm, a, b) = vm_with_nics(&farm);
    let _agent = farm.agent(&["--engine", "qemu-img", "--libvirt-uri", "test:///default"]);
    let ran = farm.export(&vm, &["--libvirt", "--libvirt-network", "prod", "--json"]);
    ran.expect_code(0);
    let out = ran.json();
    let rec = farm.records().into_iter().next().unwrap();
    assert_eq!(rec["libvirt"]["defined"], true, "{rec:#}");
    assert_eq!(rec["libvirt"]["uri"], "test:///default");
    assert_eq!(out["libvirt"]["defined_by"], rec["agent"], "{out:#}");
    assert!(ran.stderr().contains("libvirt domain db defined at test:///default by agent"), "{}", ran.stderr());
    let xml = std::fs::read_to_string(farm.output.join("db.xml")).unwrap();
    for want in [
        "<mac address='00:50:56:3f:10:01'/>",
        "<mac address='00:0c:29:ab:cd:02'/>",
        "<source network='prod'/>",
        "<vcpu>4</vcpu>",
        "<memory unit='MiB'>3072</memory>",
        "<os firmware='efi'>",
    ] {
        assert!(xml.contains(want), "{want} missing from\n{xml}");
    }
    let boot = farm.output.join("db.qcow2");
    assert!(xml.contains(&format!("<source file='{}'/>", boot.display())), "{xml}");
    assert_identical(&a, &boot);
    assert_identical(&b, std::path::Path::new(out["files"][1].as_str().unwrap()));
    let v = Command::new("virt-xml-validate").arg(farm.output.join("db.xml")).arg("domain").output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
}

#[test]
fn an_agent_that_does_not_define_says_so_and_only_one_side_ever_defines() {
    let farm = Farm::new();
    let (vm, a, _) = vm_with_nics(&farm);
    let mut agent = farm.agent(&["--engine", "qemu-img", "--libvirt-define=false"]);
    let ran = farm.export(&vm, &["--libvirt"]);
    ran.expect_code(9);
    assert!(
        ran.stderr().contains("does not define libvirt domains") && ran.stderr().contains("--libvirt-side exporter"),
        "{}",
        ran.stderr()
    );
    assert_identical(&a, &farm.output.join("db.qcow2"));
    assert!(!farm.output.join("db.xml").exists(), "nothing was written for a domain not defined");

    // The exporter's side: the agent (which would define) is not asked; hyperexport defines.
    agent.kill9();
    std::fs::remove_file(farm.output.join("db.qcow2")).unwrap();
    for f in hyperfarm_tests::find_files(&farm.output, ".qcow2") {
        std::fs::remove_file(f).unwrap();
    }
    let _agent = farm.agent(&["--engine", "qemu-img", "--libvirt-uri", "test:///default", "--on-existing", "archive"]);
    let ran =
        farm.export(&vm, &["--libvirt", "--libvirt-side", "exporter", "--libvirt-uri", "test:///default", "--json"]);
    ran.expect_code(0);
    assert_eq!(ran.json()["libvirt"]["defined_by"], "hyperexport", "{}", ran.stdout());
    let recs = farm.records();
    let last = recs.iter().find(|r| r["state"] == "done" && r["libvirt"].is_null());
    assert!(last.is_some(), "the agent's record of the second job has no libvirt outcome: {recs:#?}");
    assert!(recs.iter().all(|r| r["libvirt"]["defined"] != true), "the agent defined nothing: {recs:#?}");
    assert!(farm.output.join("db.xml").is_file());
}

#[test]
fn a_windows_guest_gets_sata_and_a_linux_guest_virtio_when_the_bus_is_left_to_auto() {
    let farm = Farm::new();
    for (name, guest, bus) in [("win", "windows9srv-64", "sata"), ("lin", "ubuntu-64", "virtio")] {
        let raw = sample_disk(farm.path(), &format!("{name}.raw"), 8, 7);
        convert(&raw, &farm.src.join(format!("{name}-1.vmdk")), "vmdk", None);
        let vm = vmx(&farm.src, name, &[("scsi0:0", &format!("{name}-1.vmdk"))]);
        let mut text = std::fs::read_to_string(&vm).unwrap();
        text.push_str(&format!("guestOS = \"{guest}\"\n"));
        std::fs::write(&vm, text).unwrap();
        direct(&farm, &vm, &["--libvirt", "--libvirt-uri", "test:///default"]).expect_code(0);
        let xml = std::fs::read_to_string(farm.output.join(format!("{name}.xml"))).unwrap();
        assert!(xml.contains(&format!("bus='{bus}'/>")), "{guest}: {xml}");
    }
}

/// The output directory is not mounted on the export host (here: an empty directory of its own):
/// the result record cannot be read there, and the agent's `GetJob` answer says whether it defined
/// the domain, or why not.
#[test]
fn without_the_output_mounted_the_agents_answer_carries_the_libvirt_outcome() {
    let farm = Farm::new();
    let (vm, a, _) = vm_with_nics(&farm);
    let elsewhere = farm.path().join("not-the-share");
    std::fs::create_dir(&elsewhere).unwrap();
    let export = |farm: &Farm| farm.export_to(&vm, &elsewhere, &["--libvirt", "--json"]);
    let mut agent = farm.agent(&["--engine", "qemu-img", "--libvirt-uri", "test:///default"]);
    let ran = export(&farm);
    ran.expect_code(0);
    assert!(ran.stderr().contains("taking the agent's answer"), "the remote path was taken: {}", ran.stderr());
    let out = ran.json();
    let rec = farm.records().into_iter().next().unwrap();
    assert_eq!(out["libvirt"]["defined_by"], rec["agent"], "{out:#}");
    assert_eq!(out["libvirt"]["uri"], "test:///default", "{out:#}");
    assert_eq!(out["libvirt"]["domain"], "db", "{out:#}");
    assert_eq!(out["libvirt"]["xml"], farm.output.join("db.xml").display().to_string(), "{out:#}");
    assert_eq!(out["libvirt"]["host"], rec["libvirt"]["host"], "{out:#}");
    assert_eq!(out["files"][0], elsewhere.join("db.qcow2").display().to_string(), "{out:#}");
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none(), "nothing was written on this side");
    assert_identical(&a, &farm.output.join("db.qcow2"));
    // hyperctl shows the same outcome.
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let id = rec["job_id"].as_str().unwrap().to_string();
    let show =
        Run::new(&bin("hyperctl"), &["--agent".into(), url.clone(), "jobs".into(), "show".into(), id.clone()]).run();
    show.expect_code(0);
    assert!(show.stdout().contains("libvirt:   domain db defined at test:///default"), "{}", show.stdout());
    let show =
        Run::new(&bin("hyperctl"), &["--agent".into(), url, "--json".into(), "jobs".into(), "show".into(), id]).run();
    assert_eq!(show.json()["libvirt"]["defined"], true, "{}", show.stdout());

    // An agent that does not define: exit 9 with its reason, over gRPC alone.
    agent.kill9();
    for f in hyperfarm_tests::find_files(&farm.output, ".qcow2") {
        std::fs::remove_file(f).unwrap();
    }
    std::fs::remove_file(farm.output.join("db.xml")).unwrap();
    let _agent = farm.agent(&["--engine", "qemu-img", "--libvirt-define=false"]);
    let ran = export(&farm);
    ran.expect_code(9);
    assert!(ran.stderr().contains("taking the agent's answer"), "{}", ran.stderr());
    assert!(ran.stderr().contains("does not define libvirt domains"), "{}", ran.stderr());
    assert_identical(&a, &farm.output.join("db.qcow2"));

    // A failed conversion (its output name is taken): the agent's full error text, not a pointer
    // to a file this host cannot read.
    let ran = export(&farm);
    ran.expect_code(4);
    assert!(ran.stderr().contains("taking the agent's answer"), "{}", ran.stderr());
    assert!(ran.stderr().contains("already exists") && ran.stderr().contains("on_existing"), "{}", ran.stderr());
    assert!(!ran.stderr().contains("the full text is in"), "{}", ran.stderr());
}
