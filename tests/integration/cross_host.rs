//! The farm across hosts, on real shared storage (`hyperfarm_tests::bed`: GlusterFS served from a
//! storage network namespace, mounted in an exporter host and two agent hosts, each with its own
//! hostname; gRPC between the namespaces). Every scenario runs under the strict cache settings the
//! docs require and under gluster's defaults.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyperfarm_tests::bed::{Bed, Cache};
use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::vcsim::Vcsim;
use hyperfarm_tests::{Proc, bin, wait_for};

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
    p.wait_log("INFO ready", Duration::from_secs(60));
    p
}

/// Records in the volume's output directory.
fn records(bed: &Bed) -> Vec<serde_json::Value> {
    let dir = bed.hosts[0].output().join(".hyperfarm/results");
    let mut v: Vec<serde_json::Value> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice(&b).ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|r| r["job_id"].as_str().unwrap_or_default().to_string());
    v
}

/// The README's export-host command (daemon mode, the queue named, its paths the export host's
/// mount), plus `extra`.
fn farm_export(bed: &Bed, disk: &Path, extra: &[&str]) -> hyperfarm_tests::Run {
    let ex = bed.host("ex");
    let mut args: Vec<String> = vec![
        "--vm".into(),
        s(disk),
        "--pipeline".into(),
        "--hyper2kvm-daemon".into(),
        "--hyper2kvm-watch-dir".into(),
        s(&ex.queue()),
        "--hyper2kvm-output-dir".into(),
        s(&ex.output()),
    ];
    args.extend(extra.iter().map(|x| x.to_string()));
    bed.run("ex", &bin("hyperexport"), &args).timeout(Duration::from_secs(180))
}

fn readme_quick_start(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    eprintln!("bed ({}) up in {:?}", cache.name(), bed.setup);
    let src = bed.dir.path().join("export-host-disks");
    std::fs::create_dir_all(&src).unwrap();
    let raw = images::sample_disk(&src, "web01.raw", 32, 201);
    let a1 = agent(&bed, "a1", &[]);
    // The agent tells what it can see of the mount: gluster's client timeouts.
    let log = a1.log_text();
    assert!(log.contains("storage=fuse.glusterfs at"), "{log}");
    let warned = log.contains("GlusterFS mount without attribute-timeout=0,entry-timeout=0,negative-timeout=0:");
    assert_eq!(warned, cache == Cache::Default, "warned about the default caches only:\n{log}");
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

    // The output not mounted on the export host (an empty directory of its own): the result comes
    // from the agent's answer over gRPC alone.
    let unmounted = bed.dir.path().join("export-host-local-output");
    std::fs::create_dir_all(&unmounted).unwrap();
    let raw2 = images::sample_disk(&src, "web02.raw", 16, 202);
    let args: Vec<String> = vec![
        "--vm".into(),
        s(&raw2),
        "--pipeline".into(),
        "--hyper2kvm-daemon".into(),
        "--hyper2kvm-watch-dir".into(),
        s(&ex.queue()),
        "--hyper2kvm-output-dir".into(),
        s(&unmounted),
        "--json".into(),
    ];
    let ran = bed.run("ex", &bin("hyperexport"), &args).timeout(Duration::from_secs(180)).run();
    ran.expect_code(0);
    assert!(ran.stderr().contains("taking the agent's answer"), "{}", ran.stderr());
    let out = ran.json();
    assert_eq!(out["files"][0], s(&unmounted.join("web02.qcow2")), "{out:#}");
    let rec = record_of(&bed, out["job_id"].as_str().unwrap()).unwrap();
    assert_eq!(out["engine"], rec["engine"], "{out:#}");
    assert_identical(&raw2, &ex.output().join("web02.qcow2"));
}

#[test]
fn readme_two_host_quick_start_strict() {
    readme_quick_start(Cache::Strict);
}

#[test]
fn readme_two_host_quick_start_default_caches() {
    readme_quick_start(Cache::Default);
}

/// Publish a VM from a host into the queue (export only: no waiting); its job id.
fn publish_from(bed: &Bed, host: &str, vm: &Path, name: &str) -> String {
    let q = bed.host(host).queue();
    let ran = bed
        .run(
            host,
            &bin("hyperexport"),
            &["--vm".into(), s(vm), "--name".into(), name.into(), "--output".into(), s(&q), "--json".into()],
        )
        .timeout(Duration::from_secs(120))
        .run();
    ran.expect_code(0);
    ran.json()["job_id"].as_str().unwrap().to_string()
}

/// A job's directory in whatever state, as the first host sees the volume.
fn job_dir(bed: &Bed, id: &str) -> Option<PathBuf> {
    let q = bed.hosts[0].queue();
    for st in ["queued", "done", "failed", "cancelled"] {
        let d = q.join(st).join(id);
        if d.is_dir() {
            return Some(d);
        }
    }
    fs::read_dir(q.join("converting"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(id)))
}

/// The lease of a converting job, if it has one now.
fn lease(bed: &Bed, id: &str) -> Option<serde_json::Value> {
    let d = job_dir(bed, id)?;
    let b = fs::read(d.join("lease.json")).ok()?;
    serde_json::from_slice(b.trim_ascii()).ok()
}

fn events(bed: &Bed, id: &str, kind: &str) -> usize {
    let Some(d) = job_dir(bed, id) else { return 0 };
    fs::read_dir(d.join("events"))
        .map(|rd| rd.flatten().filter(|e| e.file_name().to_string_lossy().contains(&format!("-{kind}-"))).count())
        .unwrap_or(0)
}

/// Deaths of a job's agents that its history counts against it (the poison rule).
fn counted_deaths(bed: &Bed, id: &str) -> usize {
    let Some(d) = job_dir(bed, id) else { return 0 };
    fs::read_dir(d.join("events"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("-expired-"))
                .filter_map(|e| serde_json::from_slice::<serde_json::Value>(&fs::read(e.path()).ok()?).ok())
                .filter(|v| v.pointer("/detail/counted") != Some(&serde_json::Value::Bool(false)))
                .count()
        })
        .unwrap_or(0)
}

/// qemu-img processes working on this job (their command lines name its work area).
fn engines_of(id: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let cmd = fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if cmd.contains("qemu-img") && cmd.contains(id) && !stat.contains(") Z ") {
            out.push(pid);
        }
    }
    out
}

fn record_of(bed: &Bed, id: &str) -> Option<serde_json::Value> {
    records(bed).into_iter().find(|r| r["job_id"] == id)
}

/// A slow job's disk: 64 MiB of data, converted in about 4 s at the 16M rate limit.
fn slow_disk(bed: &Bed, name: &str, seed: u64) -> PathBuf {
    let src = bed.dir.path().join("export-host-disks");
    fs::create_dir_all(&src).unwrap();
    images::raw_disk(&src.join(name), 128 << 20, &[(0, 32 << 20), (64 << 20, 32 << 20)], seed)
}

fn slow_config(bed: &Bed) -> String {
    let p = bed.dir.path().join("slow.toml");
    fs::write(&p, "[convert]\nrate_limit = \"16M\"\n").unwrap();
    s(&p)
}

/// 20 jobs, two agent hosts that (by mistake) share a hostname — each converted exactly once.
fn twenty_jobs_two_hosts_same_hostname(cache: Cache) {
    let mut bed = Bed::up(cache, HOSTS);
    bed.set_hostname("a2", "conv01");
    let src = bed.dir.path().join("export-host-disks");
    fs::create_dir_all(&src).unwrap();
    let raw = images::sample_disk(&src, "many.raw", 8, 211);
    let fast = ["--poll-interval", "1s", "--lease-timeout", "5s"];
    let a1 = agent(&bed, "a1", &fast);
    let a2 = agent(&bed, "a2", &fast);
    let t0 = Instant::now();
    let ids: Vec<String> = (0..20).map(|i| publish_from(&bed, "ex", &raw, &format!("many-{i:02}"))).collect();
    wait_for("20 results", Duration::from_secs(180), || (records(&bed).len() == 20).then_some(()));
    let secs = t0.elapsed().as_secs_f64();
    let recs = records(&bed);
    assert!(recs.iter().all(|r| r["state"] == "done"), "{recs:?}");
    for id in &ids {
        assert_eq!(events(&bed, id, "claim"), 1, "job {id} was claimed exactly once");
        assert_eq!(events(&bed, id, "expired"), 0, "job {id} was never taken from a live agent");
    }
    for (name, a) in [("a1", &a1), ("a2", &a2)] {
        assert!(!a.log_text().contains("stale claim"), "{name} judged a live claim dead:\n{}", a.log_text());
    }
    let by_a2 = recs.iter().filter(|r| r["host"] == "conv01" && r["agent"] == "default@conv01").count();
    assert_eq!(by_a2, 20, "both hosts call themselves conv01");
    for i in [0, 9, 19] {
        assert_identical(&raw, &bed.hosts[0].output().join(format!("many-{i:02}.qcow2")));
    }
    eprintln!("20 jobs across 2 agent hosts sharing a hostname ({}): exactly once each, {secs:.1}s", cache.name());
}

#[test]
fn twenty_jobs_two_agent_hosts_sharing_a_hostname_strict() {
    twenty_jobs_two_hosts_same_hostname(Cache::Strict);
}

#[test]
fn twenty_jobs_two_agent_hosts_sharing_a_hostname_default_caches() {
    twenty_jobs_two_hosts_same_hostname(Cache::Default);
}

/// kill -9 of an agent host mid-job: its qemu-img lives on; restarted, the agent ends it before
/// touching the job; killed again and left dead, the other host recovers the job. Exactly once.
fn kill_9_mid_job(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let slow = slow_config(&bed);
    let timing = ["--lease-timeout", "4s", "--poll-interval", "500ms"];
    let mut a1 = agent(&bed, "a1", &[&["--config", &slow][..], &timing[..]].concat());
    let raw = slow_disk(&bed, "victim.raw", 212);
    let id = publish_from(&bed, "ex", &raw, "victim");
    wait_for("conv01 converting", Duration::from_secs(60), || {
        lease(&bed, &id).filter(|l| l["phase"] == "converting" && l["agent"] == "default@conv01").map(|_| ())
    });
    // Live progress from the export host, over gRPC between the namespaces.
    let a1_url = format!("http://{}:50071", bed.host("a1").addr);
    let shown = wait_for("progress over gRPC", Duration::from_secs(30), || {
        let r = bed
            .run(
                "ex",
                &bin("hyperctl"),
                &["--agent".into(), a1_url.clone(), "--json".into(), "jobs".into(), "show".into(), id.clone()],
            )
            .run();
        (r.code() == Some(0) && r.json()["percent"].as_f64().unwrap_or(0.0) > 0.0).then(|| r.json())
    });
    assert_eq!(shown["state"], "converting");
    a1.kill9();
    let orphans = engines_of(&id);
    assert!(!orphans.is_empty(), "positive control: kill -9 leaves the agent's qemu-img running");
    // Restarted on the same host: the leftover is ended before the job is touched again.
    let t0 = Instant::now();
    let mut a1 = agent(&bed, "a1", &[&["--config", &slow][..], &timing[..]].concat());
    wait_for("the leftover qemu-img to be gone", Duration::from_secs(10), || {
        orphans
            .iter()
            .all(|p| {
                !Path::new(&format!("/proc/{p}")).exists()
                    || fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default().contains(") Z ")
            })
            .then_some(())
    });
    let ended_in = t0.elapsed();
    wait_for("conv01 converting again", Duration::from_secs(60), || {
        lease(&bed, &id).filter(|l| l["phase"] == "converting").map(|_| ())
    });
    assert_eq!(engines_of(&id).len(), 1, "never two conversions of one job at once");
    // Killed again, for good this time: the other host takes over after the lease timeout.
    a1.kill9();
    let _a2 = agent(&bed, "a2", &[&["--config", &slow][..], &timing[..]].concat());
    let rec = wait_for("the result", Duration::from_secs(120), || record_of(&bed, &id));
    assert_eq!(rec["state"], "done", "{rec}");
    assert_eq!(rec["agent"], "default@conv02", "{rec}");
    assert_eq!(records(&bed).len(), 1, "exactly one result");
    assert_identical(&raw, &bed.hosts[0].output().join("victim.qcow2"));
    // Clean up the second orphan (no agent restarts on conv01 in this story).
    for p in engines_of(&id) {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_raw(p).unwrap(), rustix::process::Signal::KILL);
    }
    eprintln!(
        "kill -9 mid-job ({}): leftover ended {ended_in:?} after the restart; recovered by the other host",
        cache.name()
    );
}

#[test]
fn kill_9_of_an_agent_host_mid_job_strict() {
    kill_9_mid_job(Cache::Strict);
}

#[test]
fn kill_9_of_an_agent_host_mid_job_default_caches() {
    kill_9_mid_job(Cache::Default);
}

/// Ask an agent over loopback inside its own host; the time it took and the answer.
fn ask_locally(bed: &Bed, host: &str, args: &[&str]) -> (Duration, hyperfarm_tests::Ran) {
    let mut a: Vec<String> = vec!["--agent".into(), "http://127.0.0.1:50071".into(), "--json".into()];
    a.extend(args.iter().map(|x| x.to_string()));
    let t0 = Instant::now();
    let r = bed.run(host, &bin("hyperctl"), &a).timeout(Duration::from_secs(30)).run();
    (t0.elapsed(), r)
}

/// A 25 s cut of an agent host's link mid-job (longer than the lease and than gluster's ping
/// timeout): status and job lists still answer on that host from memory; the other host recovers the
/// job; the cut-off agent learns it lost the job and publishes nothing. Exactly one, identical result.
fn cut_link_mid_job(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let slow = slow_config(&bed);
    let timing = ["--config", &slow, "--lease-timeout", "6s", "--poll-interval", "500ms"];
    let mut a1 = agent(&bed, "a1", &timing);
    let raw = slow_disk(&bed, "cut.raw", 213);
    let id = publish_from(&bed, "ex", &raw, "cut");
    wait_for("conv01 converting", Duration::from_secs(60), || {
        lease(&bed, &id).filter(|l| l["phase"] == "converting" && l["agent"] == "default@conv01").map(|_| ())
    });
    let _a2 = agent(&bed, "a2", &timing);
    bed.link("a1", false);
    let cut = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    let mut saw_not_serving = false;
    while cut.elapsed() < Duration::from_secs(25) {
        let (took, st) = ask_locally(&bed, "a1", &["daemon", "status"]);
        st.expect_code(0);
        let (took2, jobs) = ask_locally(&bed, "a1", &["jobs", "list"]);
        jobs.expect_code(0);
        assert!(jobs.stdout().contains(&id), "the job list still shows the job:\n{}", jobs.stdout());
        slowest = slowest.max(took).max(took2);
        let row = &st.json()[0];
        assert_eq!(row["status"], "running", "status answers over loopback during the cut: {row}");
        saw_not_serving |= row["serving"] == false;
        answers += 2;
        std::thread::sleep(Duration::from_secs(1));
    }
    bed.link("a1", true);
    let rec = wait_for("the result", Duration::from_secs(180), || record_of(&bed, &id));
    assert_eq!(rec["state"], "done", "{rec}");
    assert_eq!(rec["agent"], "default@conv02", "recovered by the other host: {rec}");
    assert_identical(&raw, &bed.hosts[0].output().join("cut.qcow2"));
    a1.wait_log("lost the job", Duration::from_secs(90));
    // Give the cut-off agent time to do anything it still might, then check nothing else appeared.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(records(&bed).len(), 1, "exactly one result");
    let out = bed.hosts[0].output();
    assert!(!out.join("cut.error").exists(), "no .error from the agent that lost the job");
    let names: Vec<String> =
        fs::read_dir(&out).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| n == "cut.qcow2" || n.starts_with('.')), "{names:?}");
    assert!(engines_of(&id).is_empty(), "the cut-off agent ended its engine");
    eprintln!(
        "cut link 25 s ({}): {answers} status/list answers on the cut host, slowest {slowest:?}; not-serving seen: {saw_not_serving}; one result by conv02",
        cache.name()
    );
}

#[test]
fn cut_link_on_an_agent_host_mid_job_strict() {
    cut_link_mid_job(Cache::Strict);
}

#[test]
fn cut_link_on_an_agent_host_mid_job_default_caches() {
    cut_link_mid_job(Cache::Default);
}

/// A firewall drops the agent host's gRPC port: the exporter still finds the queue, submits, and
/// follows by polling; when the port opens mid-job it goes back to the gRPC stream.
fn grpc_blocked(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let slow = slow_config(&bed);
    let _a1 = agent(&bed, "a1", &["--config", &slow, "--poll-interval", "500ms"]);
    bed.block_port("a1", 50071, true);
    let raw = slow_disk(&bed, "walled.raw", 214);
    let ex = bed.host("ex");
    let t0 = Instant::now();
    let (child, desc) = farm_export(&bed, &raw, &["--hyper2kvm-poll-interval", "1"]).spawn();
    let id = wait_for("the job converting", Duration::from_secs(60), || {
        fs::read_dir(bed.hosts[0].queue().join("converting")).ok()?.flatten().next().map(|e| e.file_name())
    });
    std::thread::sleep(Duration::from_secs(1));
    bed.block_port("a1", 50071, false);
    let ran = hyperfarm_tests::collect(child, desc, Duration::from_secs(180));
    ran.expect_code(0);
    let err = ran.stderr();
    assert!(err.contains("following the result by polling"), "polled while the port was blocked:\n{err}");
    assert!(!err.contains("converting on this host"), "never converts on the export host:\n{err}");
    assert!(err.contains("back on the gRPC stream"), "back on gRPC once the port opened ({id:?}):\n{err}");
    let out = PathBuf::from(ran.stdout().trim());
    assert_eq!(out, ex.output().join("walled.qcow2"));
    assert_identical(&raw, &out);
    let recs = records(&bed);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["agent"], "default@conv01");
    eprintln!(
        "gRPC port blocked ({}): polled, back on gRPC when it opened; done in {:.1}s",
        cache.name(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn grpc_port_blocked_strict() {
    grpc_blocked(Cache::Strict);
}

#[test]
fn grpc_port_blocked_default_caches() {
    grpc_blocked(Cache::Default);
}

/// A seed-style drop (one manifest, written non-atomically, absolute `local_path` as the export
/// host mounts the share) reaches an agent host that mounts the share elsewhere: refused with the
/// setting to change, then converted once `--path-map` maps the mount point.
fn seed_drop_from_another_host(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let (ex, a1) = (bed.host("ex"), bed.host("a1"));
    assert_ne!(ex.mount, a1.mount, "the hosts mount the share at different paths");
    let exports = ex.queue().join("exports");
    fs::create_dir_all(&exports).unwrap();
    let drop = |vm: &str, seed: u64| {
        let disk = images::sample_disk(&exports, &format!("{vm}-disk1.raw"), 8, seed);
        let bytes = fs::metadata(&disk).unwrap().len();
        let text = format!(
            r#"{{"manifest_version": "1.0", "source": {{"provider": "vsphere", "vm_name": "{vm}"}},
  "disks": [{{"id": "disk-0", "source_format": "raw", "bytes": {bytes}, "local_path": "{}"}}]}}"#,
            disk.display()
        );
        // Written from the export host, in two pieces a second apart (the seed's plain write).
        let path = ex.queue().join(format!("{vm}-manifest.json"));
        let (a, b) = text.split_at(text.len() / 2);
        let sh = "printf '%s' \"$1\" > \"$3\" && sleep 1 && printf '%s' \"$2\" >> \"$3\"".to_string();
        bed.run("ex", Path::new("/bin/sh"), &["-c".into(), sh, "sh".into(), a.into(), b.into(), s(&path)])
            .run()
            .expect_code(0);
        disk
    };
    let map = format!("{}={}", ex.mount.display(), a1.mount.display());
    let mut plain =
        agent(&bed, "a1", &["--poll-interval", "500ms", "--allowed-source-dir", &s(&a1.queue().join("exports"))]);
    drop("unmapped", 215);
    let err_file = a1.output().join("unmapped.error");
    wait_for("the refusal", Duration::from_secs(60), || err_file.exists().then_some(()));
    let err = fs::read_to_string(&err_file).unwrap();
    assert!(err.contains("path_map"), "names the setting to change: {err}");
    plain.signal(rustix::process::Signal::TERM);
    plain.wait_exit(Duration::from_secs(30));
    let _mapped = agent(
        &bed,
        "a1",
        &["--poll-interval", "500ms", "--allowed-source-dir", &s(&a1.queue().join("exports")), "--path-map", &map],
    );
    let disk = drop("mapped", 216);
    let rec = wait_for("the mapped drop's result", Duration::from_secs(60), || {
        records(&bed).into_iter().find(|r| r["vm_name"] == "mapped")
    });
    assert_eq!(rec["state"], "done", "{rec}");
    assert_identical(&disk, &a1.output().join("mapped.qcow2"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(records(&bed).iter().filter(|r| r["state"] == "done").count(), 1, "exactly once");
    eprintln!("seed drop from another host ({}): refused without path_map, converted with it", cache.name());
}

#[test]
fn seed_style_drop_from_another_host_strict() {
    seed_drop_from_another_host(Cache::Strict);
}

#[test]
fn seed_style_drop_from_another_host_default_caches() {
    seed_drop_from_another_host(Cache::Default);
}

/// `on_existing = "archive"`, two jobs for one VM name racing through two agent hosts: each
/// exporter prints the path that holds its own VM (the first one's result was archived between
/// the moment it read its record and the moment it printed).
fn archive_race(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let archive = ["--on-existing", "archive", "--poll-interval", "500ms"];
    let _a1 = agent(&bed, "a1", &archive);
    let _a2 = agent(&bed, "a2", &archive);
    let src = bed.dir.path().join("export-host-disks");
    fs::create_dir_all(src.join("one")).unwrap();
    fs::create_dir_all(src.join("two")).unwrap();
    let first = images::sample_disk(&src.join("one"), "dup.raw", 8, 217);
    let second = images::sample_disk(&src.join("two"), "dup.raw", 8, 218);
    let ex = bed.host("ex");
    let export = |disk: &Path| farm_export(&bed, disk, &[]);
    let (held, desc) = export(&first).env("HYPERFARM_FAILPOINT", "stop:export.result-read").spawn();
    hyperfarm_tests::wait_stopped(held.id(), Duration::from_secs(120));
    let ran = export(&second).run();
    ran.expect_code(0);
    let second_out = PathBuf::from(ran.stdout().trim());
    hyperfarm_tests::cont(held.id());
    let ran = hyperfarm_tests::collect(held, desc, Duration::from_secs(60));
    ran.expect_code(0);
    let first_out = PathBuf::from(ran.stdout().trim());
    assert_eq!(second_out, ex.output().join("dup.qcow2"));
    assert_ne!(first_out, second_out, "each exporter prints its own file");
    assert!(s(&first_out).contains("dup~superseded~"), "{first_out:?}");
    assert_identical(&first, &first_out);
    assert_identical(&second, &second_out);
    eprintln!("archive race ({}): {} and {}", cache.name(), first_out.display(), second_out.display());
}

#[test]
fn archive_race_between_agent_hosts_strict() {
    archive_race(Cache::Strict);
}

#[test]
fn archive_race_between_agent_hosts_default_caches() {
    archive_race(Cache::Default);
}

/// Queues edited by hand, across hosts: a same-name conflict shows only the earlier `.qcow2`
/// (never a `.error` beside it); the failed job, moved back to `queued/` by hand once the old
/// file is moved away, runs again and says so (attempts 2); entries that are not the protocol's are
/// reported by `hyperctl queue` and the agent, and gluster's `.fuse_hidden*` files are not staging.
fn hand_edited_queue(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let mut a1 = agent(&bed, "a1", &["--poll-interval", "500ms"]);
    let src = bed.dir.path().join("export-host-disks");
    fs::create_dir_all(src.join("old")).unwrap();
    fs::create_dir_all(src.join("new")).unwrap();
    let old = images::sample_disk(&src.join("old"), "same.raw", 8, 219);
    let new = images::sample_disk(&src.join("new"), "same.raw", 8, 220);
    let ex = bed.host("ex");
    farm_export(&bed, &old, &[]).run().expect_code(0);
    let refused = farm_export(&bed, &new, &["--json"]).run();
    assert_ne!(refused.code(), Some(0), "the second job for the name fails");
    let rec = refused.json();
    assert_eq!(rec["state"], "failed", "{rec}");
    let id = rec["job_id"].as_str().unwrap().to_string();
    assert!(refused.stderr().contains("already exists"), "{}", refused.stderr());
    // The seed's contract: success and failure are never shown at once.
    assert!(!ex.output().join("same.error").exists(), "no .error beside the earlier .qcow2");
    assert_identical(&old, &ex.output().join("same.qcow2"));

    // The operator moves the old disk away and the failed job back, by hand, on the export host.
    let q = ex.queue();
    // A host that did not make the move itself may get ESTALE from gluster's client for a while
    // (seen on most runs); an operator tries again, and so does this test (how long it lasted is
    // reported).
    let stale = std::cell::Cell::new(Duration::ZERO);
    let mv = |from: &Path, to: &Path| {
        let t0 = Instant::now();
        loop {
            let r = bed.run("ex", Path::new("/bin/mv"), &[s(from), s(to)]).run();
            if r.code() == Some(0) {
                break;
            }
            assert!(r.stderr().contains("Stale file handle"), "{}", r.stderr());
            assert!(t0.elapsed() < Duration::from_secs(20), "mv {} kept failing", from.display());
            stale.set(stale.get().max(t0.elapsed()));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    mv(&ex.output().join("same.qcow2"), &ex.output().join("same-old.qcow2"));
    if cache == Cache::Default {
        // gluster's default caches show another host's rename under the old name for about a
        // second (the issue's measurement): an agent that looks sooner still sees `same.qcow2` and
        // fails the job again, rightly. Operators take longer than that; so does this test.
        std::thread::sleep(Duration::from_millis(2500));
    }
    mv(&q.join("failed").join(&id), &q.join("queued").join(&id));
    let t0 = Instant::now();
    let rec = loop {
        if let Some(r) = record_of(&bed, &id).filter(|r| r["state"] == "done") {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the job did not run again:\n{}", a1.log_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(rec["state"], "done", "{rec}");
    assert_identical(&new, &ex.output().join("same.qcow2"));
    let a1_url = format!("http://{}:50071", bed.host("a1").addr);
    let shown = bed
        .run(
            "ex",
            &bin("hyperctl"),
            &["--agent".into(), a1_url, "--json".into(), "jobs".into(), "show".into(), id.clone()],
        )
        .run();
    shown.expect_code(0);
    assert_eq!(shown.json()["attempts"], 2, "{}\n{}", shown.stdout(), a1.log_text());
    assert_eq!(events(&bed, &id, "claim"), 2);

    // Entries no agent will take, and FUSE placeholders.
    fs::write(q.join("queued").join(format!("{id}.hold")), b"").unwrap();
    fs::create_dir_all(q.join("queued").join("not-a-job")).unwrap();
    fs::write(q.join("tmp").join(".fuse_hidden0000000100000001"), b"x").unwrap();
    let listed = bed.run("ex", &bin("hyperctl"), &["queue".into(), "--watch-dir".into(), s(&q), "--json".into()]).run();
    listed.expect_code(0);
    let v = listed.json();
    let unknown: Vec<String> =
        v["unknown"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_string()).collect();
    assert!(unknown.contains(&format!("queued/{id}.hold")) && unknown.contains(&"queued/not-a-job".to_string()), "{v}");
    assert_eq!(v["staging_entries"], 0, "a .fuse_hidden file is not staging: {v}");
    a1.wait_log("no agent will take", Duration::from_secs(60));
    assert!(a1.log_text().contains("not-a-job"), "{}", a1.log_text());
    eprintln!(
        "hand-edited queue ({}): conflict shows one file, requeued by hand ran again, unknown entries reported; mv got ESTALE for {:?}",
        cache.name(),
        stale.get()
    );
}

#[test]
fn hand_edited_queue_across_hosts_strict() {
    hand_edited_queue(Cache::Strict);
}

#[test]
fn hand_edited_queue_across_hosts_default_caches() {
    hand_edited_queue(Cache::Default);
}

/// Ten kill -9 rounds of an agent host with six slow jobs queued, two running at a time: the
/// deaths are the host's fault, not the jobs'; none fails, each converts once, right.
fn repeated_kills(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let slow = slow_config(&bed);
    let args = ["--config", &slow, "--poll-interval", "500ms", "--lease-timeout", "4s", "--max-concurrent", "2"];
    let disks: Vec<PathBuf> = (0..6).map(|i| slow_disk(&bed, &format!("k{i}.raw"), 230 + i)).collect();
    let ids: Vec<String> =
        disks.iter().enumerate().map(|(i, d)| publish_from(&bed, "ex", d, &format!("k{i}"))).collect();
    for round in 0..10 {
        let mut a = agent(&bed, "a1", &args);
        let pid = a.pid();
        wait_for(&format!("round {round}: two jobs converting"), Duration::from_secs(60), || {
            let mine = ids
                .iter()
                .filter_map(|id| lease(&bed, id))
                .filter(|l| l["pid"] == pid && l["phase"] == "converting")
                .count();
            (mine == 2).then_some(())
        });
        a.kill9();
    }
    let deaths: usize = ids.iter().map(|id| events(&bed, id, "expired")).sum();
    let counted: usize = ids.iter().map(|id| counted_deaths(&bed, id)).sum();
    let a = agent(&bed, "a1", &args);
    let recs = wait_for("six results", Duration::from_secs(240), || {
        let r = records(&bed);
        (r.len() == 6).then_some(r)
    });
    assert!(recs.iter().all(|r| r["state"] == "done"), "no job failed for the host's deaths: {recs:?}");
    for (i, d) in disks.iter().enumerate() {
        assert_identical(d, &bed.hosts[0].output().join(format!("k{i}.qcow2")));
    }
    assert!(deaths >= 10, "positive control: the kills hit jobs ({deaths} deaths recorded)");
    assert!(!a.log_text().contains("was not retried again"), "{}", a.log_text());
    eprintln!(
        "10 kill -9 rounds, 6 jobs ({}): {deaths} deaths recorded, {counted} counted against a job, all done",
        cache.name()
    );
}

#[test]
fn repeated_kill_9_of_an_agent_host_fails_no_job_strict() {
    repeated_kills(Cache::Strict);
}

#[test]
fn repeated_kill_9_of_an_agent_host_fails_no_job_default_caches() {
    repeated_kills(Cache::Default);
}

/// Submission → claim across hosts with the default poll interval (5 s): the change check (a
/// `stat` of `queued/` every 250 ms) wakes the agent, so a job submitted on the export host is
/// claimed well within the interval (across NFS the issue measured a 3.8 s median at 5 s).
fn claim_latency(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let _a1 = agent(&bed, "a1", &[]);
    let src = bed.dir.path().join("export-host-disks");
    fs::create_dir_all(&src).unwrap();
    let raw = images::sample_disk(&src, "lat.raw", 4, 240);
    let mut rng = hyperfarm_tests::Rng::from_env("claim latency");
    let mut lat: Vec<f64> = Vec::new();
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(rng.below(1000)));
        let id = publish_from(&bed, "ex", &raw, &format!("lat-{i}"));
        let published = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let claimed = wait_for("the claim", Duration::from_secs(30), || {
            let d = job_dir(&bed, &id)?;
            fs::read_dir(d.join("events")).ok()?.flatten().find_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.contains("-claim-").then(|| n[..13].parse::<i64>().ok()).flatten()
            })
        });
        lat.push((claimed - published).max(0) as f64 / 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let median = (lat[3] + lat[4]) / 2.0;
    eprintln!(
        "submission→claim across hosts ({}), poll interval 5 s: median {median:.2}s, max {:.2}s, all {lat:?}",
        cache.name(),
        lat[7]
    );
    assert!(median < 2.0, "the change check wakes the agent long before its 5 s poll: {lat:?}");
}

#[test]
fn submission_to_claim_latency_strict() {
    claim_latency(Cache::Strict);
}

#[test]
fn submission_to_claim_latency_default_caches() {
    claim_latency(Cache::Default);
}

/// A cloned VM (same host name, same machine id) started as a second agent host: it refuses to
/// start (exit 3) with the fix in its message, and the original keeps working.
fn clone_refused(cache: Cache) {
    let mut bed = Bed::up(cache, HOSTS);
    bed.make_clone("a2", "a1");
    let a1 = agent(&bed, "a1", &[]);
    let h = bed.host("a2");
    let ran = bed
        .run(
            "a2",
            &bin("hyper2kvm-agent"),
            &[
                "--watch-dir".into(),
                s(&h.queue()),
                "--output-dir".into(),
                s(&h.output()),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
        )
        .timeout(Duration::from_secs(60))
        .run();
    assert_eq!(ran.code(), Some(3), "a clone refuses to start:\n{}", ran.stderr());
    let err = ran.stderr();
    assert!(err.contains("a cloned VM?") && err.contains("systemd-machine-id-setup"), "{err}");
    // The original still converts.
    let src = bed.dir.path().join("export-host-disks");
    fs::create_dir_all(&src).unwrap();
    let raw = images::sample_disk(&src, "orig.raw", 8, 241);
    let id = publish_from(&bed, "ex", &raw, "orig");
    let rec = wait_for("the result", Duration::from_secs(60), || record_of(&bed, &id));
    assert_eq!(rec["state"], "done", "{rec}\n{}", a1.log_text());
    eprintln!("clone ({}): refused with exit 3; the original converted", cache.name());
}

#[test]
fn a_cloned_agent_host_refuses_to_start_strict() {
    clone_refused(Cache::Strict);
}

#[test]
fn a_cloned_agent_host_refuses_to_start_default_caches() {
    clone_refused(Cache::Default);
}

/// `hyperexport serve` on the export host, the agent on a conversion host, the queue on the
/// shared volume: a job submitted over HTTP (by a client on the export host) is converted on the
/// other host and followed live over gRPC; with the agent's port blocked, the job is still
/// followed to the end by polling the shared output directory.
fn serve_across_hosts(cache: Cache) {
    let bed = Bed::up(cache, HOSTS);
    let ex = bed.host("ex");
    let src = bed.dir.path().join("export-host-disks");
    std::fs::create_dir_all(&src).unwrap();
    let raws = [images::sample_disk(&src, "api01.raw", 16, 301), images::sample_disk(&src, "api02.raw", 16, 302)];
    let _a1 = agent(&bed, "a1", &[]);
    let cfg = bed.dir.path().join("hyperexport.toml");
    std::fs::write(
        &cfg,
        format!("watch_dir = {:?}\noutput_dir = {:?}\npoll_interval = \"1s\"\n", s(&ex.queue()), s(&ex.output())),
    )
    .unwrap();
    let state = bed.dir.path().join("serve-state");
    let args: Vec<String> = ["serve", "--listen", "127.0.0.1:8470", "--state-dir", &s(&state), "--config", &s(&cfg)]
        .iter()
        .map(|x| x.to_string())
        .collect();
    let mut serve = bed.spawn("ex", &bin("hyperexport"), &args, &[]);
    serve.wait_log("listening on http://127.0.0.1:8470/", Duration::from_secs(30));
    // The client runs on the export host (its own network namespace, its loopback).
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/serve-job.py");
    for (i, raw) in raws.iter().enumerate() {
        let blocked = i == 1;
        if blocked {
            bed.block_port("a1", 50071, true);
        }
        let name = format!("api0{}", i + 1);
        let ran = bed
            .run("ex", Path::new("python3"), &[s(&client), s(raw), name.clone(), String::new(), "3".into()])
            .timeout(Duration::from_secs(240))
            .run();
        ran.expect_code(0);
        let job: serde_json::Value = serde_json::from_str(ran.stdout().trim()).unwrap();
        assert_eq!(job["state"], "done", "{job:#}");
        let out = ex.output().join(format!("{name}.qcow2"));
        assert_eq!(job["files"][0].as_str(), Some(s(&out).as_str()), "{job:#}");
        assert_identical(raw, &out);
        let log = job["log"].as_str().unwrap();
        if blocked {
            assert!(log.contains("following the result by polling"), "followed by polling:\n{log}");
        } else {
            assert!(log.contains("the agent answers over gRPC"), "followed over gRPC:\n{log}");
        }
        assert!(!log.contains("converting on this host"), "{log}");
    }
    bed.block_port("a1", 50071, false);
    let recs = records(&bed);
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().all(|r| r["agent"] == "default@conv01"), "{recs:#?}");
    serve.signal(rustix::process::Signal::TERM);
    serve.wait_exit(Duration::from_secs(30));
}

#[test]
fn serve_on_the_export_host_converts_on_another_strict() {
    serve_across_hosts(Cache::Strict);
}

#[test]
fn serve_on_the_export_host_converts_on_another_default_caches() {
    serve_across_hosts(Cache::Default);
}

/// A VM of a vCenter (the simulator on a host of its own) exported through the vSphere API on the
/// export host, converted on a conversion host, which defines it in libvirt: the domain names the
/// disks where that host mounts the output, with the source's MACs.
fn vsphere_to_libvirt_across_hosts(cache: Cache) {
    let bed = Bed::up(cache, &[("ex", "export01"), ("a1", "conv01"), ("vc", "vcenter01")]);
    let src = bed.dir.path().join("vcenter-disks");
    fs::create_dir_all(&src).unwrap();
    let raw = images::raw_disk(&src.join("app.raw"), 32 << 20, &[(0, 4 << 20), (24 << 20, 256 << 10)], 301);
    let vmdk = images::convert(&raw, &src.join("app.vmdk"), "vmdk", Some("subformat=streamOptimized"));
    let vc_addr = bed.host("vc").addr.clone();
    let vc = Vcsim::start_via(
        &bed.dir.path().join("vcsim"),
        &[vmdk],
        &["-listen", "0.0.0.0:0", "-cert-ip", &vc_addr],
        |program, args| bed.spawn("vc", program, args, &[]),
    );
    assert!(vc.url.contains(&vc_addr), "{}", vc.url);
    let _a1 = agent(&bed, "a1", &["--engine", "qemu-img", "--libvirt-uri", "test:///default"]);
    let ex = bed.host("ex");
    let mut args = vc.flags();
    for a in ["--vm", "/DC0/vm/ubuntu-server", "--pipeline", "--hyper2kvm-daemon", "--libvirt", "--json"] {
        args.push(a.into());
    }
    args.extend(["--hyper2kvm-watch-dir".into(), s(&ex.queue()), "--hyper2kvm-output-dir".into(), s(&ex.output())]);
    let ran = bed.run("ex", &bin("hyperexport"), &args).timeout(Duration::from_secs(180)).run();
    ran.expect_code(0);
    let out = ran.json();
    assert_eq!(out["libvirt"]["host"], "conv01", "defined on the conversion host: {out:#}");
    let boot = ex.output().join("ubuntu-server.qcow2");
    assert_identical(&raw, &boot);
    let recs = records(&bed);
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["agent"], "default@conv01");
    assert_eq!(recs[0]["libvirt"]["defined"], true, "{recs:#?}");
    let xml = fs::read_to_string(ex.output().join("ubuntu-server.xml")).unwrap();
    let a1_boot = bed.host("a1").output().join("ubuntu-server.qcow2");
    assert!(xml.contains(&format!("<source file='{}'/>", a1_boot.display())), "the conversion host's paths:\n{xml}");
    assert!(xml.contains("<mac address='00:50:56:a1:0d:01'/>") && xml.contains("<os firmware='efi'>"), "{xml}");
    assert_eq!(vc.count("HttpNfcLeaseComplete"), 1, "{:#?}", vc.events());
}

#[test]
fn vsphere_export_on_one_host_converted_and_defined_in_libvirt_on_another_strict() {
    vsphere_to_libvirt_across_hosts(Cache::Strict);
}

#[test]
fn vsphere_export_on_one_host_converted_and_defined_in_libvirt_on_another_default_caches() {
    vsphere_to_libvirt_across_hosts(Cache::Default);
}
