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
fn a_drop_naming_a_path_this_host_does_not_have_points_at_path_map() {
    let farm = Farm::new();
    let _agent = farm.agent(&["--path-map", "/mnt/elsewhere=/mnt/nowhere-either"]);
    let disk = images::sample_disk(&farm.src, "gone.raw", 8, 8);
    let text = seed_manifest("gone", &disk).replace(&disk.display().to_string(), "/mnt/elsewhere/queue/gone.raw");
    fs::write(farm.queue.join("artifact-manifest.json"), text).unwrap();
    wait_for("the error", Duration::from_secs(30), || farm.output.join("gone.error").exists().then_some(()));
    let err = fs::read_to_string(farm.output.join("gone.error")).unwrap();
    let first = err.lines().next().unwrap();
    assert!(first.contains("/mnt/nowhere-either/queue/gone.raw does not exist on this host"), "{err}");
    assert!(first.contains("path_map") && first.contains("--path-map"), "{err}");
    assert!(first.contains("path_map turned /mnt/elsewhere/queue/gone.raw into it"), "{err}");
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

/// A seed drop (or a native job with a forged origin.json) must not point into the queue's own
/// job directories: it would have another job's disks converted under a name of its choosing.
#[test]
fn drops_cannot_reach_into_other_jobs_and_a_forged_origin_gives_no_latitude() {
    let farm = Farm::new();
    // A victim: another owner's job that failed earlier (failed jobs keep their disks).
    let raw = images::sample_disk(&farm.src, "victim.raw", 8, 8);
    let victim = hyperfarm_tests::publish(&farm, &raw, "victim");
    fs::create_dir_all(farm.queue.join("failed")).unwrap();
    fs::rename(farm.queue.join("queued").join(&victim), farm.queue.join("failed").join(&victim)).unwrap();
    let victim_disk = farm.queue.join("failed").join(&victim).join("disks/disk0.raw");
    assert!(victim_disk.is_file());
    // A seed drop naming the victim's disk.
    fs::write(farm.queue.join("thief.json"), seed_manifest("thief", &victim_disk)).unwrap();
    // A native job claiming to be an ingested drop, naming the same disk by absolute path.
    let forged = hyperfarm_shared::JobId::new().to_string();
    let dir = farm.queue.join("tmp").join(&forged);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("origin.json"), r#"{"kind":"seed-drop","original_name":"forged.json"}"#).unwrap();
    let bytes = fs::metadata(&victim_disk).unwrap().len();
    fs::write(
        dir.join("manifest.json"),
        format!(
            r#"{{"manifest_version":"1.0","source":{{"vm_name":"forged"}},"disks":[{{"id":"d0","source_format":"raw","bytes":{bytes},"local_path":"{}"}}],"hyperfarm":{{"schema_version":1,"job_id":"{forged}"}}}}"#,
            victim_disk.display()
        ),
    )
    .unwrap();
    fs::rename(&dir, farm.queue.join("queued").join(&forged)).unwrap();

    let _agent = farm.agent(&[]);
    wait_for("two results", Duration::from_secs(60), || (farm.records().len() == 2).then_some(()));
    let thief = fs::read_to_string(farm.output.join("thief.error")).unwrap();
    assert!(thief.contains("inside the queue's"), "{thief}");
    let forged_err = fs::read_to_string(farm.output.join("forged.error")).unwrap();
    assert!(forged_err.contains("inside the job directory"), "{forged_err}");
    assert!(!farm.output.join("thief.qcow2").exists() && !farm.output.join("forged.qcow2").exists());
    assert!(victim_disk.is_file(), "the victim's disk is untouched");
}
