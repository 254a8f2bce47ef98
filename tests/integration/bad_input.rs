//! Hostile and broken jobs placed straight into the queue: each gets a clear error, nothing is
//! read or written outside the queue and output directories, and the agent keeps serving.

use std::fs;
use std::time::Duration;

use hyperfarm_shared::JobId;
use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, wait_for};

/// Publish a hand-made job: `files` are (relative path, bytes) inside the job directory.
fn plant(farm: &Farm, manifest: &str, files: &[(&str, Vec<u8>)]) -> String {
    let id = JobId::new().to_string();
    let tmp = farm.queue.join("tmp").join(&id);
    fs::create_dir_all(tmp.join("disks")).unwrap();
    for (p, b) in files {
        fs::write(tmp.join(p), b).unwrap();
    }
    fs::write(tmp.join("manifest.json"), manifest.replace("JOBID", &id)).unwrap();
    fs::create_dir_all(farm.queue.join("queued")).unwrap();
    fs::rename(&tmp, farm.queue.join("queued").join(&id)).unwrap();
    id
}

fn manifest(vm: &str, disk: &str) -> String {
    format!(
        r#"{{"manifest_version":"1.0","source":{{"vm_name":"{vm}"}},"disks":[{disk}],"hyperfarm":{{"schema_version":1,"job_id":"JOBID"}}}}"#
    )
}

#[test]
fn hostile_jobs_fail_clearly_and_the_agent_keeps_serving() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "r.raw", 4, 60);
    let data = fs::read(&raw).unwrap();
    let n = data.len();
    let secret = farm.path().join("secret.raw");
    fs::write(&secret, &data).unwrap();
    type Files<'a> = Vec<(&'a str, Vec<u8>)>;
    let cases: Vec<(&str, String, Files, &str)> = vec![
        (
            "dotdot",
            manifest(
                "dotdot",
                &format!(r#"{{"id":"d0","source_format":"raw","bytes":{n},"local_path":"../../../secret.raw"}}"#),
            ),
            vec![],
            "inside the job directory",
        ),
        (
            "absolute",
            manifest(
                "absolute",
                &format!(r#"{{"id":"d0","source_format":"raw","bytes":{n},"local_path":"{}"}}"#, secret.display()),
            ),
            vec![],
            "inside the job directory",
        ),
        ("badjson", "{ this is not json".to_string(), vec![], "not valid JSON"),
        (
            "size-lie",
            manifest(
                "size-lie",
                &format!(r#"{{"id":"d0","source_format":"raw","bytes":{},"local_path":"disks/d0.raw"}}"#, n + 512),
            ),
            vec![("disks/d0.raw", data.clone())],
            "the manifest says",
        ),
        (
            "format-lie",
            manifest(
                "format-lie",
                &format!(r#"{{"id":"d0","source_format":"qcow2","bytes":{n},"local_path":"disks/d0.raw"}}"#),
            ),
            vec![("disks/d0.raw", data.clone())],
            "declared format is qcow2",
        ),
        (
            "missing",
            manifest("missing", r#"{"id":"d0","source_format":"raw","bytes":512,"local_path":"disks/nope.raw"}"#),
            vec![],
            "disk d0",
        ),
        (
            "bad-id",
            manifest("bad-id", r#"{"id":"-rf","source_format":"raw","bytes":512,"local_path":"disks/x"}"#),
            vec![],
            "disk id",
        ),
    ];
    let mut ids = Vec::new();
    for (name, m, files, _) in &cases {
        ids.push((plant(&farm, m, files), *name));
    }
    // A symlink to a file outside.
    let link_id = plant(
        &farm,
        &manifest(
            "symlink",
            &format!(r#"{{"id":"d0","source_format":"raw","bytes":{n},"local_path":"disks/d0.raw"}}"#),
        ),
        &[],
    );
    std::os::unix::fs::symlink(&secret, farm.queue.join("queued").join(&link_id).join("disks/d0.raw")).unwrap();
    // A VM name that would escape the output directory.
    let esc = plant(
        &farm,
        &manifest(
            "../../escape",
            &format!(r#"{{"id":"d0","source_format":"raw","bytes":{n},"local_path":"disks/d0.raw"}}"#),
        ),
        &[("disks/d0.raw", data.clone())],
    );
    // And one good job after them all.
    let good = plant(
        &farm,
        &manifest("good", &format!(r#"{{"id":"d0","source_format":"raw","bytes":{n},"local_path":"disks/d0.raw"}}"#)),
        &[("disks/d0.raw", data.clone())],
    );

    let _agent = farm.agent(&[]);
    let total = cases.len() + 3;
    wait_for("every result", Duration::from_secs(120), || (farm.records().len() == total).then_some(()));
    let records = farm.records();
    let by_id = |id: &str| records.iter().find(|r| r["job_id"] == id).cloned().unwrap();
    for ((id, name), (_, _, _, needle)) in ids.iter().zip(&cases) {
        let r = by_id(id);
        assert_eq!(r["state"], "failed", "{name}");
        let e = r["error"].as_str().unwrap();
        assert!(e.contains(needle), "{name}: {e}");
        assert!(e.contains(id.as_str()), "{name}: the error names the job: {e}");
    }
    let r = by_id(&link_id);
    assert!(r["error"].as_str().unwrap().contains("symbolic link"), "{r}");
    let r = by_id(&esc);
    assert!(r["error"].as_str().unwrap().contains("VM name"), "{r}");
    assert_eq!(r["vm_name"], format!("job-{esc}"), "an unusable name falls back to job-<id>");
    assert!(!farm.path().join("escape.error").exists() && !farm.path().join("escape.qcow2").exists());
    assert_eq!(by_id(&good)["state"], "done");
    assert_identical(&raw, &farm.output.join("good.qcow2"));
    // Nothing was converted from outside the job.
    assert_eq!(
        fs::read_dir(&farm.output)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".qcow2"))
            .count(),
        1
    );
}
