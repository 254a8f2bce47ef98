//! Every supported input format travels exporter → queue → agent → qcow2 identical to its source.

use std::path::{Path, PathBuf};

use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, file_exists};

/// Export `vm` in daemon mode and return the printed qcow2 paths.
fn export_ok(farm: &Farm, vm: &Path, extra: &[&str]) -> Vec<PathBuf> {
    let ran = farm.export(vm, extra);
    ran.expect_code(0);
    ran.stdout().lines().map(PathBuf::from).collect()
}

#[test]
fn every_single_disk_format_converts_identically() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let raw = images::sample_disk(&farm.src, "base.raw", 48, 1);
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("qcow2", "qcow2", None),
        ("vmdk-sparse.vmdk", "vmdk", Some("subformat=monolithicSparse")),
        ("vmdk-stream.vmdk", "vmdk", Some("subformat=streamOptimized")),
        ("vmdk-flat.vmdk", "vmdk", Some("subformat=monolithicFlat")),
        ("vmdk-2gflat.vmdk", "vmdk", Some("subformat=twoGbMaxExtentFlat")),
        ("disk.vhd", "vpc", None),
        ("disk-fixed.vhd", "vpc", Some("subformat=fixed")),
        ("disk.vhdx", "vhdx", None),
        ("disk.vdi", "vdi", None),
    ];
    for (i, (file, fmt, opts)) in cases.iter().enumerate() {
        let src = images::convert(&raw, &farm.src.join(file), fmt, *opts);
        // VHD rounds sizes to its geometry; compare against what qemu reads from the source.
        let reference = farm.src.join(format!("ref-{i}.raw"));
        images::qemu_img(&[
            "convert",
            "-q",
            "-f",
            fmt,
            "-O",
            "raw",
            &src.display().to_string(),
            &reference.display().to_string(),
        ]);
        let name = format!("vm-{i}");
        let out = export_ok(&farm, &src, &["--name", &name]);
        assert_eq!(out, vec![farm.output.join(format!("{name}.qcow2"))], "{file}");
        assert_identical(&reference, &out[0]);
    }
    // The raw disk itself (no magic: detected as raw by content and size).
    let out = export_ok(&farm, &raw, &["--name", "vm-raw"]);
    assert_identical(&raw, &out[0]);
    assert_eq!(farm.records().len(), cases.len() + 1);
    assert!(farm.jobs_in("converting").is_empty() && farm.jobs_in("queued").is_empty());
}

#[test]
fn ova_with_two_disks_keeps_boot_order_and_names() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let boot = images::sample_disk(&farm.src, "boot.raw", 32, 10);
    let data = images::sample_disk(&farm.src, "data.raw", 16, 20);
    let ova = images::ova(&farm.src, "web01", &[&boot, &data]);
    let out = export_ok(&farm, &ova, &[]);
    assert_eq!(out, vec![farm.output.join("web01.qcow2"), farm.output.join("web01~vmdisk2.qcow2")]);
    assert_identical(&boot, &farm.output.join("web01.qcow2"));
    assert_identical(&data, &farm.output.join("web01~vmdisk2.qcow2"));
    // VM facts from the OVF reached the manifest.
    let done = farm.jobs_in("done");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(farm.queue.join("done").join(&done[0]).join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["vm"]["cpu"], 2);
    assert_eq!(m["vm"]["mem_gb"], 2);
    assert_eq!(m["vm"]["firmware"], "uefi");
    assert_eq!(m["hyperfarm"]["memory_mib"], 2048);
    assert_eq!(m["disks"][0]["disk_type"], "boot");
    assert!(!farm.queue.join("done").join(&done[0]).join("disks").exists(), "converted jobs' disk copies are removed");
}

#[test]
fn ova_whose_disk_does_not_match_its_manifest_is_refused() {
    let farm = Farm::new();
    let boot = images::sample_disk(&farm.src, "boot.raw", 8, 11);
    let ova = images::ova(&farm.src, "bad", &[&boot]);
    // Flip a byte inside the disk member's data (after its KDMV header).
    let bytes = std::fs::read(&ova).unwrap();
    let at = bytes.windows(4).position(|w| w == b"KDMV").expect("the VMDK member") + 70_000;
    images::corrupt(&ova, at as u64);
    let ran = farm.export(&ova, &["--hyper2kvm-daemon-timeout", "5s"]);
    ran.expect_code(3);
    assert!(ran.stderr().contains("does not match the OVA's manifest"), "{}", ran.stderr());
    assert!(farm.jobs_in("queued").is_empty(), "nothing is published");
    assert!(farm.jobs_in("tmp").is_empty(), "the staged job is removed");
}

#[test]
fn ovf_and_vmx_with_several_disks() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let a = images::sample_disk(&farm.src, "a.raw", 24, 30);
    let b = images::sample_disk(&farm.src, "b.raw", 8, 31);
    // OVF with its disks beside it (one monolithic sparse, one stream-optimized).
    let d = farm.src.join("ovf");
    std::fs::create_dir_all(&d).unwrap();
    images::convert(&a, &d.join("app-1.vmdk"), "vmdk", None);
    images::convert(&b, &d.join("app-2.vmdk"), "vmdk", Some("subformat=streamOptimized"));
    let size = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
    let disks = vec![
        ("app-1.vmdk".to_string(), "system".to_string(), size("app-1.vmdk")),
        ("app-2.vmdk".to_string(), "logs".to_string(), size("app-2.vmdk")),
    ];
    std::fs::write(d.join("app.ovf"), images::ovf_text("app", 1, 512, "bios", &disks)).unwrap();
    let out = export_ok(&farm, &d.join("app.ovf"), &[]);
    assert_eq!(out, vec![farm.output.join("app.qcow2"), farm.output.join("app~logs.qcow2")]);
    assert_identical(&a, &out[0]);
    assert_identical(&b, &out[1]);

    // VMX: an ESXi-style flat descriptor as the boot disk, a sparse VMDK as the second.
    let v = farm.src.join("vmx");
    std::fs::create_dir_all(&v).unwrap();
    images::convert(&a, &v.join("db.vmdk"), "vmdk", Some("subformat=monolithicFlat"));
    images::convert(&b, &v.join("db_1.vmdk"), "vmdk", None);
    let vmx = images::vmx(&v, "db server", &[("scsi0:1", "db_1.vmdk"), ("scsi0:0", "db.vmdk")]);
    let out = export_ok(&farm, &vmx, &[]);
    assert_eq!(out, vec![farm.output.join("db server.qcow2"), farm.output.join("db server~scsi0-1.qcow2")]);
    assert_identical(&a, &out[0]);
    assert_identical(&b, &out[1]);
    assert!(file_exists(&farm.output.join("db server.qcow2")));
}

/// VM `web` with a data disk `scsi0-1` and VM `web-scsi0-1` used to want the same file
/// (`web-scsi0-1.qcow2`): with `archive`, the second moved the first VM's disk aside. Data disks
/// are `<vm>~<disk>.qcow2` now (`~` is in neither a VM name nor a disk id): both VMs keep theirs.
#[test]
fn output_names_of_different_vms_never_collide() {
    let farm = Farm::new();
    let _agent = farm.agent(&["--on-existing", "archive"]);
    let boot = images::sample_disk(&farm.src, "boot.raw", 16, 31);
    let data = images::sample_disk(&farm.src, "data.raw", 8, 32);
    let other = images::sample_disk(&farm.src, "other.raw", 8, 33);
    let vmx_dir = farm.src.join("web");
    std::fs::create_dir_all(&vmx_dir).unwrap();
    std::fs::copy(&boot, vmx_dir.join("web.raw")).unwrap();
    std::fs::copy(&data, vmx_dir.join("web_1.raw")).unwrap();
    let vmx = images::vmx(&vmx_dir, "web", &[("scsi0:0", "web.raw"), ("scsi0:1", "web_1.raw")]);
    let out = export_ok(&farm, &vmx, &[]);
    assert_eq!(out, vec![farm.output.join("web.qcow2"), farm.output.join("web~scsi0-1.qcow2")]);
    let out = export_ok(&farm, &other, &["--name", "web-scsi0-1"]);
    assert_eq!(out, vec![farm.output.join("web-scsi0-1.qcow2")]);
    assert_identical(&boot, &farm.output.join("web.qcow2"));
    assert_identical(&data, &farm.output.join("web~scsi0-1.qcow2"));
    assert_identical(&other, &farm.output.join("web-scsi0-1.qcow2"));
    let names: Vec<String> = std::fs::read_dir(&farm.output)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(!names.iter().any(|n| n.contains("superseded")), "nothing was moved aside: {names:?}");
    assert_eq!(names.len(), 3, "{names:?}");
}
