//! Faults of the environment: a full output file system, directories removed or replaced under a
//! running agent, and a flood of jobs against the agent's resource bounds.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperfarm_shared::JobId;
use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, campaign_full, hyperctl, publish, wait_for};

/// A tmpfs mounted on a directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs needs root (CI runs the tests as root)");
        Tmpfs(dir.to_path_buf())
    }
    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_output_file_system_fails_the_job_cleanly_and_it_can_be_retried() {
    let farm = Farm::new();
    let tmpfs = Tmpfs::mount(&farm.output, "24m");
    let _agent = farm.agent(&[]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let big = images::raw_disk(&farm.src.join("big.raw"), 64 << 20, &[(0, 48 << 20)], 100);
    let id = publish(&farm, &big, "too-big");
    wait_for("the failure", Duration::from_secs(60), || {
        farm.records().into_iter().find(|r| r["job_id"] == id.as_str())
    });
    let err = fs::read_to_string(farm.output.join("too-big.error")).unwrap();
    assert!(err.contains("output file system is full"), "{err}");
    assert!(err.contains("partial output was removed"), "{err}");
    assert!(!farm.output.join("too-big.qcow2").exists());
    assert_eq!(fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count(), 0, "the partial output is gone");
    // The agent keeps serving.
    let small = images::sample_disk(&farm.src, "small.raw", 4, 101);
    let ok = publish(&farm, &small, "small");
    wait_for("the small job", Duration::from_secs(60), || {
        farm.records().into_iter().find(|r| r["job_id"] == ok.as_str())
    });
    assert_identical(&small, &farm.output.join("small.qcow2"));
    // Space returns; the failed job is retried (a new job with the same disks) and succeeds.
    tmpfs.resize("256m");
    wait_for("the failed job to reach failed/", Duration::from_secs(10), || {
        farm.jobs_in("failed").contains(&id).then_some(())
    });
    let _ = fs::remove_file(farm.output.join("too-big.error"));
    let r = hyperctl(&["--agent", &url, "--json", "jobs", "retry", &id]);
    r.expect_code(0);
    let new = r.json()["new_id"].as_str().unwrap().to_string();
    wait_for("the retry", Duration::from_secs(60), || farm.records().into_iter().find(|r| r["job_id"] == new.as_str()));
    assert_identical(&big, &farm.output.join("too-big.qcow2"));
    hyperctl(&["--agent", &url, "jobs", "retry", &ok]).expect_code(8);
}

#[test]
fn a_removed_or_replaced_queue_stops_claims_until_it_returns() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let serving = || hyperctl(&["--agent", &url, "--json", "daemon", "status"]).json()[0]["serving"].as_bool();
    let raw = images::sample_disk(&farm.src, "q.raw", 8, 102);
    let aside = farm.path().join("queue-aside");
    // Replaced by an empty directory (a share that did not mount): unhealthy, says why.
    fs::rename(&farm.queue, &aside).unwrap();
    fs::create_dir(&farm.queue).unwrap();
    wait_for("NOT_SERVING", Duration::from_secs(15), || (serving() == Some(false)).then_some(()));
    let st = hyperctl(&["--agent", &url, "daemon", "status"]);
    assert!(st.stdout().contains("NOT serving"), "{}", st.stdout());
    // A job waiting in the real queue meanwhile.
    fs::remove_dir(&farm.queue).unwrap();
    fs::rename(&aside, &farm.queue).unwrap();
    let id = publish(&farm, &raw, "waits");
    fs::rename(&farm.queue, &aside).unwrap();
    wait_for("NOT_SERVING while removed", Duration::from_secs(15), || (serving() == Some(false)).then_some(()));
    std::thread::sleep(Duration::from_secs(1));
    assert!(aside.join("queued").join(&id).is_dir(), "nothing claimed while the queue is away");
    // It returns: the agent recovers and converts the job.
    fs::rename(&aside, &farm.queue).unwrap();
    wait_for("SERVING again", Duration::from_secs(15), || (serving() == Some(true)).then_some(()));
    wait_for("the waiting job", Duration::from_secs(60), || {
        farm.records().into_iter().find(|r| r["job_id"] == id.as_str())
    });
    assert_identical(&raw, &farm.output.join("waits.qcow2"));
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|r| r.count()).unwrap_or(0)
}

fn rss_mib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

#[test]
fn a_flood_of_jobs_respects_max_concurrent_memory_and_file_descriptors() {
    let farm = Farm::new();
    let n = if campaign_full() { 2000 } else { 300 };
    let disk = vec![3u8; 64 << 10];
    let b3 = blake3::hash(&disk).to_hex().to_string();
    fs::create_dir_all(farm.queue.join("queued")).unwrap();
    for i in 0..n {
        let id = JobId::new();
        let dir = farm.queue.join("queued").join(id.to_string());
        fs::create_dir_all(dir.join("disks")).unwrap();
        fs::write(dir.join("disks/d0.raw"), &disk).unwrap();
        let m = serde_json::json!({"manifest_version": "1.0", "source": {"vm_name": format!("flood-{i:05}")},
            "disks": [{"id": "d0", "source_format": "raw", "bytes": disk.len(), "local_path": "disks/d0.raw", "blake3": b3}],
            "hyperfarm": {"schema_version": 1, "job_id": id}});
        fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    }
    let agent = farm.agent(&["--max-concurrent", "2", "--poll-interval", "100ms"]);
    let pid = agent.pid();
    let (mut max_converting, mut max_fds, mut max_rss) = (0usize, 0usize, 0f64);
    let start = Instant::now();
    while farm.jobs_in("done").len() < n {
        assert!(start.elapsed() < Duration::from_secs(600), "the flood did not drain");
        max_converting = max_converting.max(farm.jobs_in("converting").len());
        max_fds = max_fds.max(fd_count(pid));
        max_rss = max_rss.max(rss_mib(pid));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(max_converting <= 2, "max_concurrent = 2 but {max_converting} jobs were converting at once");
    assert!(max_fds <= 256, "{max_fds} open file descriptors");
    assert!(max_rss <= 150.0, "{max_rss:.1} MiB resident");
    assert_eq!(farm.records().len(), n);
    eprintln!(
        "flood: {n} jobs in {:?}; at most {max_converting} converting, {max_fds} fds, {max_rss:.1} MiB RSS",
        start.elapsed()
    );
}
