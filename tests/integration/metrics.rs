//! The agent's Prometheus endpoint, scraped over a real socket and parsed as the text exposition
//! format: what it counts after a converted job and a job that fails its digest check.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::Duration;

use hyperfarm_tests::images;
use hyperfarm_tests::{Farm, free_port, publish, wait_for};

/// GET /metrics with a plain HTTP/1.1 request: (status line, content type, body).
fn scrape(port: u16) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.lines().next().unwrap_or_default().to_string();
    let ctype = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    (status, ctype, body.to_string())
}

/// Parse the exposition format strictly: `# HELP`/`# TYPE` lines, `# EOF` last, and samples
/// `name{label="value",...} number`. Returns sample → value; panics on anything else.
fn parse(body: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(["counter", "gauge", "histogram", "info", "unknown"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name = key.split('{').next().unwrap();
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && name.starts_with("hyperfarm_"),
            "metric name {name:?}"
        );
        if let Some(labels) = key.strip_prefix(name) {
            assert!(labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')), "labels of {line:?}");
        }
        assert!(types.keys().any(|t| name.starts_with(t.as_str())), "sample {name} has no # TYPE line before it");
        let v: f64 = value.parse().unwrap_or_else(|e| panic!("value of {line:?}: {e}"));
        samples.insert(key.to_string(), v);
    }
    samples
}

#[test]
fn the_agent_serves_prometheus_metrics_that_count_its_work() {
    let farm = Farm::new();
    let port = free_port();
    let good = images::sample_disk(&farm.src, "m.raw", 8, 61);
    let bad = images::sample_disk(&farm.src, "b.raw", 8, 62);
    // Published before the agent starts: the corruption is in place before any claim.
    publish(&farm, &good, "metricsvm");
    let bad_id = publish(&farm, &bad, "corruptvm");
    images::corrupt(&farm.queue.join("queued").join(&bad_id).join("disks/disk0.raw"), 100);
    let agent = farm.agent(&["--metrics-listen", &format!("127.0.0.1:{port}"), "--verify", "before"]);
    assert!(
        agent.log_text().contains(&format!("metrics listening (GET /metrics) addr=127.0.0.1:{port}")),
        "{}",
        agent.log_text()
    );
    wait_for("both results", Duration::from_secs(60), || (farm.records().len() == 2).then_some(()));
    // Finished jobs reach the in-memory listing within its refresh period (10 s).
    let m = wait_for("the listing to count both jobs", Duration::from_secs(30), || {
        let (status, ctype, body) = scrape(port);
        assert!(status.contains(" 200 "), "{status}");
        assert!(ctype.starts_with("text/plain"), "{ctype}");
        let m = parse(&body);
        (m.get("hyperfarm_jobs{state=\"done\"}") == Some(&1.0)).then_some(m)
    });
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in {m:?}"));
    assert_eq!(get("hyperfarm_jobs{state=\"failed\"}"), 1.0);
    assert_eq!(get("hyperfarm_jobs{state=\"queued\"}"), 0.0);
    assert_eq!(get("hyperfarm_jobs_finished_total{result=\"done\"}"), 1.0);
    assert_eq!(get("hyperfarm_jobs_finished_total{result=\"failed\"}"), 1.0);
    assert_eq!(get("hyperfarm_verification_failures_total"), 1.0);
    assert_eq!(get("hyperfarm_converted_bytes_total"), (8u64 << 20) as f64, "the good disk's virtual size");
    assert_eq!(get("hyperfarm_conversions_in_progress"), 0.0);
    assert_eq!(get("hyperfarm_conversion_duration_seconds_count"), 1.0);
    assert_eq!(get("hyperfarm_queue_wait_seconds_count"), 2.0);
    assert_eq!(get("hyperfarm_lease_recoveries_total"), 0.0);
    assert_eq!(get("hyperfarm_storage_ok{dir=\"queue\"}"), 1.0);
    assert_eq!(get("hyperfarm_storage_ok{dir=\"output\"}"), 1.0);
    assert_eq!(get("hyperfarm_max_concurrent"), 2.0);
    assert!(m.keys().any(|k| k.starts_with("hyperfarm_agent_info{")), "{m:?}");
    // The example Grafana dashboard only queries metrics the agent serves.
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana-hyperfarm-agents.json")).unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut used = 0;
    for (i, _) in dashboard.match_indices("hyperfarm_") {
        let name: String = dashboard[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if name == "hyperfarm_" {
            continue;
        }
        used += 1;
        assert!(m.keys().any(|k| k.starts_with(&name)), "the dashboard queries {name}, which the agent does not serve");
    }
    assert!(used >= 10, "the dashboard queries {used} metrics");
    // Only /metrics is served.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET /jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
}

#[test]
fn a_metrics_address_in_use_leaves_the_agent_converting() {
    let farm = Farm::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let agent = farm.agent(&["--metrics-listen", &format!("127.0.0.1:{port}")]);
    assert!(
        agent.log_text().contains(&format!("metrics are off: cannot listen on 127.0.0.1:{port}")),
        "{}",
        agent.log_text()
    );
    let disk = images::sample_disk(&farm.src, "k.raw", 4, 63);
    publish(&farm, &disk, "stillworks");
    wait_for("the result", Duration::from_secs(60), || (farm.records().len() == 1).then_some(()));
    assert_eq!(farm.records()[0]["state"], "done");
}

/// 100 connections to the metrics port that never send a byte hold at most
/// `MAX_CONNECTIONS` (16) of the agent's descriptors, are closed after the header timeout (5 s),
/// and conversions go on meanwhile; a scrape answers again once they are gone.
#[test]
fn idle_connections_to_the_metrics_port_are_bounded() {
    let farm = Farm::new();
    let port = free_port();
    let agent = farm.agent(&["--metrics-listen", &format!("127.0.0.1:{port}")]);
    let before = hyperfarm_tests::open_fds(agent.pid());
    let idle: Vec<std::net::TcpStream> =
        (0..100).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = hyperfarm_tests::open_fds(agent.pid());
    assert!(during <= before + 16 + 4, "100 idle connections took {} descriptors (before {before})", during - before);
    let disk = images::sample_disk(&farm.src, "f.raw", 4, 64);
    publish(&farm, &disk, "duringflood");
    wait_for("the job converted during the flood", Duration::from_secs(60), || {
        (farm.records().len() == 1).then_some(())
    });
    let t = std::time::Instant::now();
    let (status, _, body) = wait_for("a scrape after the idle ones timed out", Duration::from_secs(20), || {
        std::panic::catch_unwind(|| scrape(port)).ok().filter(|(s, _, _)| s.contains(" 200 "))
    });
    assert!(status.contains(" 200 ") && body.contains("hyperfarm_jobs_finished_total{result=\"done\"} 1"), "{body}");
    eprintln!(
        "metrics flood: 100 idle connections took {} descriptors; a scrape answered {:?} after the conversion",
        during.saturating_sub(before),
        t.elapsed()
    );
    drop(idle);
}
