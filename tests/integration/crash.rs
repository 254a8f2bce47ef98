//! Crash consistency: kill -9 of the exporter and of the agent at many points (named failpoints
//! and random instants); afterwards every job is complete or absent, ends exactly once, and no
//! half-written file is ever visible under a final name.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use hyperfarm_shared::failpoint::{AGENT_POINTS, EXPORTER_POINTS};
use hyperfarm_shared::manifest::Manifest;
use hyperfarm_tests::images::{self, identical};
use hyperfarm_tests::{Farm, Proc, Rng, bin, campaign_full, wait_for};

/// Every job in `queued/` must be whole: a valid manifest, disks of the declared size and digest.
/// The agent runs meanwhile and may claim a job (rename out of `queued/`) while it is read: a
/// file that vanished together with its job directory was claimed, not missing; the agent's own
/// checks and the final "every job done" cover it.
fn assert_queue_whole(farm: &Farm) {
    for id in farm.jobs_in("queued") {
        let dir = farm.queue.join("queued").join(&id);
        let claimed = || !dir.exists();
        let Ok(manifest) = fs::read(dir.join("manifest.json")) else {
            assert!(claimed(), "job {id} is visible without a readable manifest");
            continue;
        };
        let m =
            Manifest::parse(&manifest).unwrap_or_else(|e| panic!("job {id} is visible with an invalid manifest: {e}"));
        let c = m.check().unwrap_or_else(|e| panic!("job {id}: {e}"));
        for d in c.disks {
            let p = dir.join(&d.local_path);
            let bytes = match fs::read(&p) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && claimed() => break,
                Err(e) => panic!("job {id}: {}: {e}", p.display()),
            };
            assert_eq!(bytes.len() as u64, d.bytes, "job {id} is visible with a short disk");
            let Some(hyperfarm_shared::manifest::Expected::Blake3(want)) = d.expected else { panic!("no digest") };
            assert_eq!(
                *blake3::hash(&bytes).as_bytes(),
                want,
                "job {id} is visible with a disk that does not match its digest"
            );
        }
    }
}

fn export_args(farm: &Farm, vm: &Path, name: &str) -> Vec<String> {
    ["--quiet", "--vm", vm.to_str().unwrap(), "--name", name, "--output", farm.queue.to_str().unwrap()]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[test]
fn kill_9_of_the_exporter_never_exposes_a_partial_job() {
    let farm = Farm::new();
    let raw = images::raw_disk(&farm.src.join("e.raw"), 96 << 20, &[(0, 24 << 20), (48 << 20, 24 << 20)], 90);
    let ova = images::ova(&farm.src, "crashova", &[&raw, &raw]);
    let random = if campaign_full() { 50 } else { 12 };
    let mut rng = Rng::from_env("exporter crash campaign");
    // An agent converts whatever gets published meanwhile: a partial job would fail its checks.
    let _agent = farm.agent(&[]);
    let t = Instant::now();
    let whole = hyperfarm_tests::Run::new(&bin("hyperexport"), &export_args(&farm, &ova, "calibration")).run();
    whole.expect_code(0);
    let full_time = t.elapsed();
    let mut points = 0;
    let mut killed = 0;
    for (i, point) in EXPORTER_POINTS.iter().enumerate() {
        let mut p = Proc::spawn(
            &bin("hyperexport"),
            &export_args(&farm, &ova, &format!("fp-{i}")),
            farm.path(),
            &[("HYPERFARM_FAILPOINT", point)],
        );
        let st = p.wait_exit(Duration::from_secs(60));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(9), "failpoint {point} did not fire: {}", p.log_text());
        killed += 1;
        points += 1;
        assert_queue_whole(&farm);
    }
    for i in 0..random {
        let delay = Duration::from_micros(rng.below(full_time.as_micros() as u64 * 11 / 10));
        let mut p = Proc::spawn(&bin("hyperexport"), &export_args(&farm, &ova, &format!("rand-{i}")), farm.path(), &[]);
        std::thread::sleep(delay);
        p.kill9();
        points += 1;
        killed += 1;
        assert_queue_whole(&farm);
    }
    eprintln!(
        "exporter crash campaign: {points} kill points ({} failpoints, {random} random instants up to {full_time:?})",
        EXPORTER_POINTS.len()
    );
    // Whatever was published converts; nothing fails for being partial.
    wait_for("the agent to finish every published job", Duration::from_secs(180), || {
        (farm.jobs_in("queued").is_empty() && farm.jobs_in("converting").is_empty()).then_some(())
    });
    let records = farm.records();
    assert!(records.iter().all(|r| r["state"] == "done"), "a published job failed: {records:?}");
    assert!(farm.jobs_in("failed").is_empty());
    // Leftovers of the killed exporters are removed by the documented rule (same host, process gone).
    wait_for("tmp/ to be cleaned", Duration::from_secs(30), || {
        farm.jobs_in("tmp").iter().all(|n| n.starts_with(".clock.")).then_some(())
    });
    assert!(killed >= EXPORTER_POINTS.len());
}

#[test]
fn kill_9_of_the_agent_at_every_step_ends_each_job_exactly_once() {
    let farm = Farm::new();
    let raw = images::raw_disk(&farm.src.join("a.raw"), 64 << 20, &[(0, 16 << 20), (40 << 20, 16 << 20)], 91);
    let random = if campaign_full() { 50 } else { 10 };
    let mut rng = Rng::from_env("agent crash campaign");
    // Calibrate: how long one job takes from agent start to its record.
    let t = Instant::now();
    let id = hyperfarm_tests::publish(&farm, &raw, "calibration");
    {
        let _a = farm.agent(&[]);
        wait_for("calibration", Duration::from_secs(60), || {
            farm.records().iter().any(|r| r["job_id"] == id.as_str()).then_some(())
        });
    }
    let full_time = t.elapsed();
    let mut iterations: Vec<(String, Option<&str>)> =
        AGENT_POINTS.iter().map(|p| (format!("fp-{p}"), Some(*p))).collect();
    iterations.extend((0..random).map(|i| (format!("rand-{i}"), None)));
    let mut fired = 0;
    for (name, point) in &iterations {
        let vm = name.replace('.', "-");
        let id = hyperfarm_tests::publish(&farm, &raw, &vm);
        let mut args = farm.agent_args();
        if point.is_none() {
            args.push("--poll-interval".into());
            args.push("50ms".into());
        }
        let env: Vec<(&str, &str)> = point.map(|p| vec![("HYPERFARM_FAILPOINT", p)]).unwrap_or_default();
        let mut a = Proc::spawn(&bin("hyper2kvm-agent"), &args, farm.path(), &env);
        match point {
            Some(p) => {
                let st = a.wait_exit(Duration::from_secs(60));
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(st.signal(), Some(9), "failpoint {p} did not fire:\n{}", a.log_text());
                fired += 1;
            }
            None => {
                std::thread::sleep(Duration::from_micros(rng.below(full_time.as_micros() as u64)));
                a.kill9();
            }
        }
        // Right after the crash: a final name holds either nothing or the complete result.
        let out = farm.output.join(format!("{vm}.qcow2"));
        if out.exists() {
            assert!(identical(&raw, &out), "{name}: {} is visible but incomplete", out.display());
        }
        // Restart: the job ends exactly once.
        let _b = farm.agent(&[]);
        wait_for(&format!("{name}: the job's result"), Duration::from_secs(60), || {
            (farm.records().iter().any(|r| r["job_id"] == id.as_str()) && farm.jobs_in("done").contains(&id))
                .then_some(())
        });
        let mine: Vec<serde_json::Value> = farm.records().into_iter().filter(|r| r["job_id"] == id.as_str()).collect();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0]["state"], "done", "{name}: {:?}", mine[0]["error"]);
        assert!(identical(&raw, &out), "{name}: the published result differs from the source");
        assert!(farm.jobs_in("converting").is_empty() && farm.jobs_in("queued").is_empty(), "{name}");
        wait_for(&format!("{name}: work areas cleaned"), Duration::from_secs(10), || {
            (fs::read_dir(farm.output.join(".hyperfarm/tmp")).map(|r| r.count()).unwrap_or(0) == 0).then_some(())
        });
    }
    let outputs = fs::read_dir(&farm.output)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
        .count();
    assert_eq!(outputs, iterations.len() + 1, "one result per job, nothing else");
    eprintln!(
        "agent crash campaign: {} kill points ({fired} failpoints, {random} random instants up to {full_time:?}); every job ended exactly once, done and identical",
        iterations.len()
    );
}
