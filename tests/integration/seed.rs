//! Seed compatibility: HyperSDK's single manifest file dropped with a plain, non-atomic write.

use std::fs;
use std::io::Write;
use std::time::Duration;

use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, wait_for};

fn seed_manifest(vm: &str, disk: &std::path::Path) -> String {
    let bytes = fs::metadata(disk).unwrap().len();
    format!(
        r#"{{
  "manifest_version": "1.0",
  "source": {{"provider": "vsphere", "vm_name": "{vm}", "datacenter": "DC1"}},
  "vm": {{"cpu": 2, "mem_gb": 4, "firmware": "bios"}},
  "disks": [{{"id": "disk-0", "source_format": "raw", "bytes": {bytes}, "local_path": "{}", "boot_order_hint": 0}}],
  "pipeline": {{"convert": {{"enabled": true}}}}
}}
"#,
        disk.display()
    )
}

#[test]
fn a_half_written_drop_is_waited_for_then_converted_exactly_once() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    // The seed exporter leaves its export files in the watch directory too.
    let disk = images::sample_disk(&farm.queue, "legacy-vm-disk1.raw", 16, 5);
    fs::write(farm.queue.join("legacy-vm.ovf"), "<Envelope/>").unwrap();
    let text = seed_manifest("legacy-vm", &disk);
    let drop_path = farm.queue.join("artifact-manifest.json");
    let mut f = fs::File::create(&drop_path).unwrap();
    f.write_all(&text.as_bytes()[..text.len() / 2]).unwrap();
    f.flush().unwrap();
    // A slow writer: the half file stays unchanged for several settle times (300 ms) and poll
    // intervals (200 ms). It must neither be ingested nor fail.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(drop_path.exists(), "a half-written drop must not be taken");
    assert!(farm.records().is_empty() && farm.jobs_in("queued").is_empty() && farm.jobs_in("failed").is_empty());
    f.write_all(&text.as_bytes()[text.len() / 2..]).unwrap();
    drop(f);

    let out = farm.output.join("legacy-vm.qcow2");
    wait_for("the seed drop's result", Duration::from_secs(60), || farm.records().first().cloned());
    assert_identical(&disk, &out);
    assert!(!drop_path.exists(), "the drop was taken out of the watch directory");
    assert!(disk.exists() && farm.queue.join("legacy-vm.ovf").exists(), "other files are left alone");
    let done = wait_for("the job in done/", Duration::from_secs(10), || {
        let d = farm.jobs_in("done");
        (d.len() == 1).then_some(d)
    });

    assert!(farm.queue.join("done").join(&done[0]).join("origin.json").is_file());
    // Exactly once: no second job appears later.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(farm.records().len(), 1);
}

#[test]
fn a_drop_pointing_outside_the_allowed_directories_fails_with_the_setting_to_change() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let disk = images::sample_disk(&farm.src, "elsewhere.raw", 8, 6);
    fs::write(farm.queue.join("artifact-manifest.json"), seed_manifest("outside", &disk)).unwrap();
    wait_for("the error", Duration::from_secs(30), || farm.output.join("outside.error").exists().then_some(()));
    let err = fs::read_to_string(farm.output.join("outside.error")).unwrap();
    assert!(err.contains("allowed_source_dirs"), "{err}");
    assert!(err.lines().next().unwrap().contains("outside the allowed source directories"), "{err}");
    assert!(!farm.output.join("outside.qcow2").exists());
    wait_for("the job in failed/", Duration::from_secs(10), || (farm.jobs_in("failed").len() == 1).then_some(()));
}

#[test]
fn allowed_source_directories_admit_disks_elsewhere() {
    let farm = Farm::new();
    let src = farm.src.display().to_string();
    let _agent = farm.agent(&["--allowed-source-dir", &src]);
    let disk = images::sample_disk(&farm.src, "ok.raw", 8, 7);
    fs::write(farm.queue.join("drop.json"), seed_manifest("allowed", &disk)).unwrap();
    wait_for("the result", Duration::from_secs(30), || farm.records().first().cloned());
    assert_identical(&disk, &farm.output.join("allowed.qcow2"));
    assert!(disk.exists(), "a seed drop's disks are never removed");
}
