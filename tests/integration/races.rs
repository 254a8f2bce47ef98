//! Races: several agents and exporters at once; an agent that stops heartbeating loses its job.

use std::fs;
use std::time::Duration;

use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, Proc, Run, bin, campaign_full, lease_phase, slow_config, slow_disk, wait_for};

#[test]
fn three_agents_two_exporters_every_job_exactly_once() {
    let farm = Farm::new();
    let n: usize = if campaign_full() { 300 } else { 60 };
    let raw = images::raw_disk(&farm.src.join("r.raw"), 1 << 20, &[(0, 256 << 10)], 95);
    let _agents: Vec<Proc> =
        (0..3).map(|_| farm.agent(&["--max-concurrent", "2", "--poll-interval", "100ms"])).collect();
    let submit = |first: usize| {
        let (queue, raw) = (farm.queue.clone(), raw.clone());
        std::thread::spawn(move || {
            for i in (first..n).step_by(2) {
                let args: Vec<String> = [
                    "--quiet",
                    "--vm",
                    raw.to_str().unwrap(),
                    "--name",
                    &format!("vm-{i:04}"),
                    "--output",
                    queue.to_str().unwrap(),
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                Run::new(&bin("hyperexport"), &args).run().expect_code(0);
            }
        })
    };
    let (a, b) = (submit(0), submit(1));
    a.join().unwrap();
    b.join().unwrap();
    wait_for("every job to end", Duration::from_secs(600), || (farm.jobs_in("done").len() == n).then_some(()));
    let records = farm.records();
    assert_eq!(records.len(), n, "one record per job");
    assert!(records.iter().all(|r| r["state"] == "done"));
    let mut vms: Vec<&str> = records.iter().map(|r| r["vm_name"].as_str().unwrap()).collect();
    vms.sort();
    vms.dedup();
    assert_eq!(vms.len(), n, "no job lost, none twice");
    for id in farm.jobs_in("done") {
        let claims = fs::read_dir(farm.queue.join("done").join(&id).join("events"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("-claim-"))
            .count();
        assert_eq!(claims, 1, "job {id} was claimed {claims} times");
    }
    let agents_used: std::collections::HashSet<String> =
        records.iter().map(|r| r["token"].as_str().unwrap().to_string()).collect();
    assert_eq!(agents_used.len(), n);
    for i in (0..n).step_by(n / 10) {
        assert_identical(&raw, &farm.output.join(format!("vm-{i:04}.qcow2")));
    }
    let outputs = fs::read_dir(&farm.output)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".qcow2"))
        .count();
    assert_eq!(outputs, n, "no result overwritten or doubled");
    eprintln!("races: {n} jobs from 2 exporters through 3 agents: {n} results, none twice, none lost");
}

#[test]
fn a_stopped_agent_loses_its_job_and_does_not_publish_when_it_wakes() {
    let farm = Farm::new();
    let raw = slow_disk(&farm, "s.raw", 96);
    let cfg = slow_config(&farm);
    let a = farm.agent(&["--config", &cfg]);
    let id = hyperfarm_tests::publish(&farm, &raw, "paused");
    wait_for("the conversion to start", Duration::from_secs(60), || {
        (lease_phase(&farm).as_deref() == Some("converting")).then_some(())
    });
    let first_claim = fs::read_dir(farm.queue.join("converting")).unwrap().next().unwrap().unwrap().file_name();
    a.signal(rustix::process::Signal::STOP);
    // Another agent (fast, lease timeout 3 s) takes the job over once the lease goes stale.
    let b = farm.agent(&[]);
    wait_for("the job's result from the second agent", Duration::from_secs(120), || {
        farm.records().iter().find(|r| r["job_id"] == id.as_str()).cloned()
    });
    let rec = farm.records().into_iter().find(|r| r["job_id"] == id.as_str()).unwrap();
    let b_token = rec["token"].as_str().unwrap().to_string();
    assert!(!first_claim.to_string_lossy().ends_with(&b_token), "the second agent published it");
    assert!(b.log_text().contains("stale claim"), "{}", b.log_text());
    // The first agent wakes: it must notice and publish nothing.
    a.signal(rustix::process::Signal::CONT);
    let mut a = a;
    a.wait_log("lost", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let recs: Vec<_> = farm.records().into_iter().filter(|r| r["job_id"] == id.as_str()).collect();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["token"].as_str().unwrap(), b_token, "the result stands as the second agent published it");
    assert_identical(&raw, &farm.output.join("paused.qcow2"));
    assert!(!farm.output.join("paused.error").exists());
    assert_eq!(farm.jobs_in("done"), vec![id]);
    wait_for("work areas cleaned", Duration::from_secs(30), || {
        (fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count() == 0).then_some(())
    });
}
