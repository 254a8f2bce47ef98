//! What unauthenticated network clients can do to the agent, and what they must not achieve:
//! a flood of idle connections (plaintext and TLS) must not take the descriptors the queue needs,
//! and read-only listing load over a large queue must not delay heartbeats until another agent
//! takes a running job (a job converted twice).

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use hyperfarm_tests::certs::Ca;
use hyperfarm_tests::images;
use hyperfarm_tests::{Farm, Run, hyperctl, open_fds, proc_status_bytes, publish, python, raise_nofile, wait_for};

/// Hold `n` TCP connections that never send a byte.
fn idle_connections(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n).filter_map(|_| TcpStream::connect(addr).ok()).collect()
}

/// Every held connection is closed by the agent (EOF or reset) within `limit`.
fn all_closed(held: Vec<TcpStream>, limit: Duration) -> usize {
    let start = Instant::now();
    let mut closed = 0;
    for mut s in held {
        let left = limit.saturating_sub(start.elapsed()).max(Duration::from_millis(10));
        s.set_read_timeout(Some(left)).unwrap();
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue, // TLS alerts or HTTP/2 GOAWAY before the close
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    closed
}

fn idle_flood(tls: bool) {
    let own = raise_nofile();
    assert!(own > 2000, "the test needs more than 2000 descriptors (hard limit {own})");
    let farm = Farm::new();
    let ca = Ca::new(farm.path(), "farm");
    let server = ca.server(farm.path(), "server");
    let mut extra = vec!["--max-connections", "64", "--handshake-timeout", "2s", "--idle-timeout", "3s"];
    let (cert, key) = (server.cert.to_str().unwrap().to_string(), server.key.to_str().unwrap().to_string());
    if tls {
        extra.extend(["--tls-cert", &cert, "--tls-key", &key]);
    }
    // As under systemd without LimitNOFILE: a soft and hard limit of 1024.
    let agent = farm.agent_via(&["prlimit", "--nofile=1024:1024"], &extra);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let addr = url.rsplit("//").next().unwrap().to_string();

    let t0 = Instant::now();
    let held = idle_connections(&addr, 1100);
    assert!(held.len() >= 1000, "the flood opened {} connections", held.len());
    std::thread::sleep(Duration::from_millis(300));
    let fds_during = open_fds(agent.pid());

    // The queue keeps working: a job is claimed, converted and published during the flood.
    let raw = images::sample_disk(&farm.src, "flood.raw", 8, 91);
    let id = publish(&farm, &raw, "during-flood");
    wait_for("the job to convert during the flood", Duration::from_secs(60), || {
        farm.records().iter().any(|r| r["job_id"] == id.as_str() && r["state"] == "done").then_some(())
    });
    let closed = all_closed(held, Duration::from_secs(15));
    let secs = t0.elapsed().as_secs_f64();
    // The flood gone, the API answers again at once (this flood came from loopback, so it also took
    // the slots kept for loopback; a flood from the network leaves those to the operator).
    let mut args = vec!["--agent".to_string(), url.clone()];
    if tls {
        args.extend([
            "--agent-ca".into(),
            ca.cert_pem.display().to_string(),
            "--agent-domain".into(),
            "localhost".into(),
        ]);
    }
    args.extend(["--json".into(), "daemon".into(), "status".into()]);
    let st = Run::new(&hyperfarm_tests::bin("hyperctl"), &args).run();
    st.expect_code(0);
    assert_eq!(st.json()[0]["status"], "running", "{}", st.stdout());
    assert!(closed >= 1000, "the agent closed only {closed} of the idle connections");
    assert!(fds_during < 400, "the agent held {fds_during} descriptors during the flood (limit 1024)");
    let log = agent.log_text();
    assert!(log.contains("too many gRPC connections"), "the refusal is logged:\n{log}");
    assert!(!log.contains("Too many open files"), "no EMFILE anywhere:\n{log}");
    assert!(!log.contains("NOT_SERVING"), "health stayed SERVING:\n{log}");
    eprintln!(
        "idle flood ({}): 1100 connections, agent at {fds_during} descriptors (limit 1024), job converted, {closed} closed within {secs:.1}s",
        if tls { "TLS" } else { "plaintext" }
    );
}

#[test]
fn idle_connections_never_take_the_queues_descriptors_plaintext() {
    idle_flood(false);
}

#[test]
fn idle_connections_never_take_the_queues_descriptors_tls() {
    idle_flood(true);
}

/// Plant `n` finished jobs (manifest + result record) quickly.
fn plant_finished(farm: &Farm, n: usize) {
    let results = farm.output.join(".hyperfarm/results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::create_dir_all(farm.queue.join("done")).unwrap();
    for i in 0..n {
        let id = hyperfarm_shared::JobId::new().to_string();
        let dir = farm.queue.join("done").join(&id);
        std::fs::create_dir(&dir).unwrap();
        let vm = format!("old-vm-{i}");
        std::fs::write(
            dir.join("manifest.json"),
            format!(r#"{{"manifest_version":"1.0","source":{{"vm_name":"{vm}"}},"disks":[]}}"#),
        )
        .unwrap();
        let rec = serde_json::json!({
            "job_id": id, "state": "done", "vm_name": vm,
            "files": [{"disk_id": "d0", "name": format!("{vm}.qcow2"), "boot": true, "bytes": 1, "virtual_size": 1}],
            "engine": "qemu-img", "agent": "old@host", "host": "host", "token": "t", "attempts": 1,
            "started_at_ms": 1, "finished_at_ms": 2
        });
        std::fs::write(results.join(format!("{id}.json")), rec.to_string()).unwrap();
    }
}

/// The lease's heartbeat counter and this test's time of its last change, sampled until `stop`.
fn sample_heartbeats(lease_dir: &Path, stop: &std::sync::atomic::AtomicBool) -> Duration {
    let mut last: Option<(u64, Instant)> = None;
    let mut worst = Duration::ZERO;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let beat = std::fs::read(lease_dir.join("lease.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b.trim_ascii()).ok())
            .and_then(|v| v["heartbeat"].as_u64());
        if let Some(b) = beat {
            match last {
                Some((prev, at)) if prev == b => worst = worst.max(at.elapsed()),
                _ => last = Some((b, Instant::now())),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    worst
}

#[test]
fn listing_load_over_a_large_queue_never_delays_heartbeats() {
    let jobs = if hyperfarm_tests::campaign_full() { 20_000 } else { 5_000 };
    let farm = Farm::new();
    plant_finished(&farm, jobs);
    let cfg = hyperfarm_tests::slow_config(&farm);
    // A lease timeout of 8 s: a heartbeat late by 8 s would let the second agent take the job.
    let a = farm.agent(&["--config", &cfg, "--lease-timeout", "8s", "--max-concurrent", "1"]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let addr = url.trim_start_matches("http://").to_string();
    wait_for("the listing to know the old jobs", Duration::from_secs(60), || {
        let r = hyperctl(&["--agent", &url, "--json", "jobs", "list", "--limit", "1"]);
        (r.code() == Some(0) && r.json()["total"].as_u64() == Some(jobs as u64)).then_some(())
    });
    let raw = hyperfarm_tests::slow_disk(&farm, "slow.raw", 92);
    let id = publish(&farm, &raw, "under-load");
    let claim = wait_for("agent A to claim the job", Duration::from_secs(30), || {
        std::fs::read_dir(farm.queue.join("converting")).ok()?.filter_map(|e| e.ok()).next().map(|e| e.path())
    });
    let b = farm.agent(&["--lease-timeout", "8s", "--listen", "off"]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (claim, stop) = (claim.clone(), stop.clone());
        std::thread::spawn(move || sample_heartbeats(&claim, &stop))
    };
    // 200 clients listing the whole queue as fast as they can for the conversion's length.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/load.py");
    let load = Run::new(
        &python(),
        &[script.display().to_string(), addr, "ListJobs".into(), "200".into(), "10".into(), "{}".into()],
    )
    .timeout(Duration::from_secs(180))
    .run();
    load.expect_code(0);
    let figures = load.json();
    wait_for("the job's result", Duration::from_secs(120), || {
        farm.records().iter().find(|r| r["job_id"] == id.as_str()).cloned()
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst_gap = sampler.join().unwrap();
    let rss = proc_status_bytes(a.pid(), "VmHWM:");

    let rec = farm.records().into_iter().find(|r| r["job_id"] == id.as_str()).unwrap();
    assert_eq!(rec["state"], "done", "{rec}");
    let events: Vec<String> = std::fs::read_dir(farm.queue.join("done").join(&id).join("events"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(events.iter().filter(|e| e.contains("-claim-")).count(), 1, "converted exactly once: {events:?}");
    assert!(!events.iter().any(|e| e.contains("-expired-")), "never judged stale: {events:?}");
    assert!(!b.log_text().contains("stale claim"), "agent B never took the job:\n{}", b.log_text());
    assert!(worst_gap < Duration::from_secs(4), "a heartbeat was {worst_gap:?} late (lease timeout 8 s)");
    assert!(figures["calls"].as_u64().unwrap_or(0) > 0, "the load made calls: {figures}");
    assert!(rss < 400 << 20, "agent A peaked at {} MiB", rss >> 20);
    eprintln!(
        "listing load: {jobs} finished jobs, 200 clients for 10 s: {figures}; longest heartbeat gap {worst_gap:?} (lease 8 s); agent peak RSS {} MiB",
        rss >> 20
    );
}

/// A flood of watch streams is bounded (max_watchers): the excess is refused at once, and the
/// agent's memory stays where it was.
#[test]
fn a_watch_stream_flood_is_bounded() {
    let farm = Farm::new();
    let agent = farm.agent(&["--max-watchers", "8"]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let before = proc_status_bytes(agent.pid(), "VmRSS:");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/load.py");
    let ran = Run::new(
        &python(),
        &[
            script.display().to_string(),
            url.trim_start_matches("http://").into(),
            "WatchJobs".into(),
            "40".into(),
            "3".into(),
            r#"{"fromSeq":"0"}"#.into(),
        ],
    )
    .timeout(Duration::from_secs(120))
    .run();
    ran.expect_code(0);
    let v = ran.json();
    let refused = v["errors"]["RESOURCE_EXHAUSTED"].as_u64().unwrap_or(0);
    assert!(refused >= 32, "at most 8 streams at once, the rest refused: {v}");
    assert!(v["calls"].as_u64().unwrap_or(0) >= 1, "streams within the bound are served: {v}");
    let peak = proc_status_bytes(agent.pid(), "VmHWM:");
    let after = proc_status_bytes(agent.pid(), "VmRSS:");
    assert!(peak < 100 << 20, "peak RSS {} MiB", peak >> 20);
    eprintln!(
        "watch flood: 40 streams against max_watchers 8: {v}; RSS {} MiB before, peak {} MiB, {} MiB after",
        before >> 20,
        peak >> 20,
        after >> 20
    );
}
