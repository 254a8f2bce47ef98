//! The farm across hosts, on real shared storage (`hyperfarm_tests::bed`: GlusterFS served from a
//! storage network namespace, mounted in an exporter host and two agent hosts, each with its own
//! hostname; gRPC between the namespaces). Every scenario runs under the strict cache settings the
//! docs require and under gluster's defaults.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperfarm_tests::bed::{Bed, Cache};
use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Proc, bin};

const HOSTS: &[(&str, &str)] = &[("ex", "export01"), ("a1", "conv01"), ("a2", "conv02")];

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// An agent on a bed host, as the README starts it (addresses adapted), plus `extra`.
fn agent(bed: &Bed, host: &str, extra: &[&str]) -> Proc {
    let h = bed.host(host);
    let mut args: Vec<String> = vec![
        "--watch-dir".into(),
        s(&h.queue()),
        "--output-dir".into(),
        s(&h.output()),
        "--listen".into(),
        "0.0.0.0:50071".into(),
        "--advertise-url".into(),
        format!("http://{}:50071", h.addr),
        "--insecure-listen".into(),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    let mut p = bed.spawn(host, &bin("hyper2kvm-agent"), &args, &[]);
    p.wait_log("ready", Duration::from_secs(60));
    p
}

/// Records in the volume's output directory.
fn records(bed: &Bed) -> Vec<serde_json::Value> {
    let dir = bed.hosts[0].output().join(".hyperfarm/results");
    let mut v: Vec<serde_json::Value> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice(&b).ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|r| r["job_id"].as_str().unwrap_or_default().to_string());
    v
}

fn readme_quick_start(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    eprintln!("bed ({}) up in {:?}", cache.name(), bed.setup);
    let src = bed.dir.path().join("export-host-disks");
    std::fs::create_dir_all(&src).unwrap();
    let raw = images::sample_disk(&src, "web01.raw", 32, 201);
    let _a1 = agent(&bed, "a1", &[]);
    let ex = bed.host("ex");
    // The README's export-host command, as written (its paths are the export host's mount).
    let t0 = Instant::now();
    let ran = bed
        .run(
            "ex",
            &bin("hyperexport"),
            &[
                "--vm".into(),
                s(&raw),
                "--pipeline".into(),
                "--hyper2kvm-daemon".into(),
                "--hyper2kvm-watch-dir".into(),
                s(&ex.queue()),
                "--hyper2kvm-output-dir".into(),
                s(&ex.output()),
            ],
        )
        .timeout(Duration::from_secs(180))
        .run();
    ran.expect_code(0);
    let secs = t0.elapsed().as_secs_f64();
    let err = ran.stderr();
    assert!(err.contains("the agent answers over gRPC"), "found the agent through the queue:\n{err}");
    assert!(!err.contains("converting on this host"), "never converts on the export host:\n{err}");
    let out = PathBuf::from(ran.stdout().trim());
    assert_eq!(out, ex.output().join("web01.qcow2"));
    assert_identical(&raw, &out);
    let recs = records(&bed);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["agent"], "default@conv01", "converted by the agent on the conversion host");
    eprintln!("README quick start ({}): exported and converted across hosts in {secs:.1}s", cache.name());
}

#[test]
fn readme_two_host_quick_start_strict() {
    readme_quick_start(Cache::Strict);
}

#[test]
fn readme_two_host_quick_start_default_caches() {
    readme_quick_start(Cache::Default);
}
