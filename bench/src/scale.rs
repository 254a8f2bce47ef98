//! A 10,000-job queue: the agent's start-up scan, its memory, and `hyperctl jobs list --json`.

use std::process::Command;
use std::time::{Duration, Instant};

use hyperfarm_shared::JobId;
use hyperfarm_shared::queue::{Queue, State};

use crate::util::{self, Agent, Ctx, Report};

pub fn run(ctx: &Ctx, report: &mut Report) {
    let n = if ctx.quick { 2_000 } else { 10_000 };
    println!("\n== scale: a queue of {n} queued jobs (each a manifest and a 64 KiB disk)");
    let d = ctx.sub("scale");
    let (qd, od) = (d.join("queue"), d.join("output"));
    std::fs::create_dir_all(&qd).expect("mkdir");
    std::fs::create_dir_all(&od).expect("mkdir");
    let queue = Queue::new(&qd);
    queue.init().expect("init");
    let disk = vec![7u8; 64 << 10];
    let b3 = blake3::hash(&disk).to_hex().to_string();
    let t = Instant::now();
    for i in 0..n {
        let id = JobId::new();
        let dir = queue.job_dir(State::Queued, &id);
        std::fs::create_dir_all(dir.join("disks")).expect("mkdir");
        std::fs::write(dir.join("disks/d0.raw"), &disk).expect("disk");
        let m = serde_json::json!({
            "manifest_version": "1.0", "source": {"vm_name": format!("scale-{i:05}")},
            "disks": [{"id": "d0", "source_format": "raw", "bytes": disk.len(), "local_path": "disks/d0.raw", "blake3": b3}],
            "hyperfarm": {"schema_version": 1, "job_id": id},
        });
        std::fs::write(dir.join("manifest.json"), m.to_string()).expect("manifest");
    }
    println!("  (made in {})", util::secs(t.elapsed()));
    // The agent converts one job at a time meanwhile; that is part of real life. It is started
    // `runs` times (each start scans the whole queue; the killed ones' claims are recovered by the
    // next); the last one stays for the listing.
    let mut scans = Vec::new();
    for _ in 1..ctx.runs.max(1) {
        scans.push(Agent::start(ctx, &qd, &od, &["--max-concurrent", "1"]).ready_after);
    }
    let agent = Agent::start(ctx, &qd, &od, &["--max-concurrent", "1"]);
    scans.push(agent.ready_after);
    let scan = util::median(&mut scans);
    let url = agent.url.clone().expect("url");
    let mut list_times = Vec::new();
    let mut listed = 0;
    for _ in 0..ctx.runs.max(3) {
        let t = Instant::now();
        let out = Command::new(ctx.bin("hyperctl"))
            .args(["--agent", &url, "--json", "jobs", "list"])
            .output()
            .expect("hyperctl");
        list_times.push(t.elapsed());
        assert!(out.status.success(), "hyperctl: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        listed = v["total"].as_u64().unwrap_or(0);
    }
    // A job that just finished leaves converting/ at once but reaches the listing of done/ at its
    // next refresh (every 10 s): the total can be one short meanwhile. Count again until whole.
    let deadline = Instant::now() + std::time::Duration::from_secs(15);
    while (listed as usize) < n && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let out = Command::new(ctx.bin("hyperctl"))
            .args(["--agent", &url, "--json", "jobs", "list"])
            .output()
            .expect("hyperctl");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        listed = v["total"].as_u64().unwrap_or(0);
    }
    let rss_mib = util::peak_rss_kib(agent.pid()) as f64 / 1024.0;
    drop(agent);
    let first = list_times[0];
    let list = util::median(&mut list_times);
    assert!(listed as usize >= n, "hyperctl listed {listed} jobs of {n}");
    // Baseline for the scan: listing the same directory tree with `find`.
    let find = util::time(
        ctx.runs,
        || {},
        || util::run(Command::new("find").arg(&qd).args(["-maxdepth", "2"]).stdout(std::process::Stdio::null())),
    );
    report.add(
        &format!("agent start-up scan, {n} jobs"),
        util::secs(scan),
        format!("find -maxdepth 2 {}", util::secs(find)),
        Some(scan.as_secs_f64() / find.as_secs_f64()),
        "<= 1 s",
        Some(scan <= Duration::from_secs(1)),
    );
    report.add(
        &format!("agent peak RSS, {n} jobs"),
        format!("{rss_mib:.1} MiB"),
        "-".into(),
        None,
        "<= 100 MiB",
        Some(rss_mib <= 100.0),
    );
    report.add(
        &format!("hyperctl jobs list --json, {n} jobs"),
        util::secs(list),
        format!("first call {}", util::secs(first)),
        None,
        "<= 0.5 s",
        Some(list <= Duration::from_millis(500)),
    );
    let _ = std::fs::remove_dir_all(&d);
}
