//! What a queue writer can plant (FIFOs, devices, symlinks to /dev/zero, directories where files
//! go) and what it must not achieve: stop or freeze the agent, make it allocate without bound, or
//! make a job go round for ever.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use hyperfarm_shared::JobId;
use hyperfarm_tests::images;
use hyperfarm_tests::{Farm, Run, hyperctl, proc_status_bytes, publish, python, wait_for};

fn mkfifo(p: &Path) {
    rustix::fs::mknodat(rustix::fs::CWD, p, rustix::fs::FileType::Fifo, rustix::fs::Mode::from_raw_mode(0o600), 0)
        .unwrap();
}

/// A claim of a dead agent on another host, with whatever `lease.json` the test plants.
fn foreign_claim(farm: &Farm, lease: impl FnOnce(&Path)) -> String {
    let id = JobId::new().to_string();
    let dir = farm.queue.join("converting").join(format!("{id}@feedfacefeedface"));
    fs::create_dir_all(dir.join("events")).unwrap();
    lease(&dir.join("lease.json"));
    id
}

#[test]
fn planted_fifos_and_devices_never_freeze_the_agent_or_exhaust_its_memory() {
    let farm = Farm::new();
    for d in ["queued", "converting", "done", "failed", "cancelled", "tmp"] {
        fs::create_dir_all(farm.queue.join(d)).unwrap();
    }
    let fifo_lease = foreign_claim(&farm, mkfifo);
    let zero_lease = foreign_claim(&farm, |p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
    let cancel_fifo = foreign_claim(&farm, |p| fs::write(p, b"{}").unwrap());
    let cdir = farm.queue.join("converting").join(format!("{cancel_fifo}@feedfacefeedface"));
    mkfifo(&cdir.join("cancel.json"));
    mkfifo(&cdir.join("events/0000000000001-claim-feedfacefeedface.json"));
    let fifo_manifest = JobId::new().to_string();
    fs::create_dir_all(farm.queue.join("queued").join(&fifo_manifest)).unwrap();
    mkfifo(&farm.queue.join("queued").join(&fifo_manifest).join("manifest.json"));
    mkfifo(&farm.queue.join("drop.json"));

    let mut agent = farm.agent(&[]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    // Read-only API load at the same time, on the jobs whose files are FIFOs among others.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/load.py");
    let load = Run::new(
        &python(),
        &[
            script.display().to_string(),
            url.trim_start_matches("http://").into(),
            "ListJobs".into(),
            "64".into(),
            "3".into(),
        ],
    )
    .timeout(Duration::from_secs(90))
    .spawn();
    for id in [&fifo_manifest, &cancel_fifo] {
        hyperctl(&["--agent", &url, "jobs", "show", id]).expect_code(0);
    }
    let raw = images::sample_disk(&farm.src, "good.raw", 8, 93);
    let good = publish(&farm, &raw, "good");
    wait_for("the good job", Duration::from_secs(60), || {
        farm.records().iter().any(|r| r["job_id"] == good.as_str() && r["state"] == "done").then_some(())
    });
    let load = hyperfarm_tests::collect(load.0, load.1, Duration::from_secs(90));
    load.expect_code(0);
    // The planted claims are recovered like any dead claim and end failed (they have no job).
    wait_for("the planted claims to end", Duration::from_secs(60), || {
        let failed = farm.jobs_in("failed");
        [&fifo_lease, &zero_lease, &cancel_fifo, &fifo_manifest]
            .iter()
            .all(|id| failed.contains(id) || farm.jobs_in("cancelled").contains(id))
            .then_some(())
    });
    let peak = proc_status_bytes(agent.pid(), "VmHWM:");
    assert!(peak < 200 << 20, "the agent peaked at {} MiB (a /dev/zero lease must never be read whole)", peak >> 20);
    assert!(farm.queue.join("drop.json").exists(), "a FIFO drop is left alone");
    // SIGTERM still works: nothing is stuck on a FIFO.
    let t0 = Instant::now();
    agent.signal(rustix::process::Signal::TERM);
    let st = agent.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "{st:?}\n{}", agent.log_text());
    eprintln!(
        "planted FIFOs and /dev/zero: good job done, planted claims failed, peak RSS {} MiB, SIGTERM exit in {:?}; load {}",
        peak >> 20,
        t0.elapsed(),
        load.stdout().trim()
    );
}

fn plant_broken_job(farm: &Farm, vm: &str) -> String {
    let id = JobId::new().to_string();
    let dir = farm.queue.join("tmp").join(&id);
    fs::create_dir_all(&dir).unwrap();
    // A disk that is missing: the job fails at once, and its failure must be published.
    fs::write(
        dir.join("manifest.json"),
        format!(
            r#"{{"manifest_version":"1.0","source":{{"vm_name":"{vm}"}},"disks":[{{"id":"d0","source_format":"raw","bytes":512,"local_path":"disks/d0.raw"}}],"hyperfarm":{{"schema_version":1,"job_id":"{id}"}}}}"#
        ),
    )
    .unwrap();
    fs::rename(&dir, farm.queue.join("queued").join(&id)).unwrap();
    id
}

fn claims(farm: &Farm, state: &str, id: &str) -> usize {
    fs::read_dir(farm.queue.join(state).join(id).join("events"))
        .map(|rd| rd.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("-claim-")).count())
        .unwrap_or(0)
}

#[test]
fn a_result_that_cannot_be_published_is_bounded_and_surfaced() {
    let farm = Farm::new();
    for d in ["queued", "tmp"] {
        fs::create_dir_all(farm.queue.join(d)).unwrap();
    }
    // 1. `<vm>.error` is a directory: the failure is still recorded (the record carries it).
    fs::create_dir_all(farm.output.join("errdir.error")).unwrap();
    let a = plant_broken_job(&farm, "errdir");
    // 2. The record's own name is taken by a directory: the result cannot be committed at all.
    let b = plant_broken_job(&farm, "norecord");
    fs::create_dir_all(farm.output.join(".hyperfarm/results").join(format!("{b}.json"))).unwrap();
    let t0 = Instant::now();
    let agent = farm.agent(&["--max-attempts", "3"]);
    wait_for("job A's record", Duration::from_secs(30), || {
        farm.records().iter().find(|r| r["job_id"] == a.as_str()).cloned()
    });
    wait_for("job B in failed/", Duration::from_secs(60), || farm.jobs_in("failed").contains(&b).then_some(()));
    let secs = t0.elapsed().as_secs_f64();
    let rec = farm.records().into_iter().find(|r| r["job_id"] == a.as_str()).unwrap();
    assert_eq!(rec["state"], "failed");
    assert!(rec["error"].as_str().unwrap().contains("errdir.error could not be written"), "{rec}");
    assert!(farm.output.join("errdir.error").is_dir(), "left as it was");
    wait_for("job A in failed/", Duration::from_secs(10), || farm.jobs_in("failed").contains(&a).then_some(()));
    assert_eq!(claims(&farm, "failed", &a), 1, "job A was claimed once");
    assert_eq!(claims(&farm, "failed", &b), 3, "job B was tried max_attempts times, no more");
    let failure = fs::read_to_string(farm.queue.join("failed").join(&b).join("failure.json")).unwrap();
    assert!(failure.contains("is not a regular file"), "{failure}");
    // Surfaced: hyperctl shows why, and the log says it at error level.
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let show = hyperctl(&["--agent", &url, "--json", "jobs", "show", &b]);
    show.expect_code(0);
    assert_eq!(show.json()["state"], "failed");
    assert!(show.json()["error"].as_str().unwrap().contains("is not a regular file"), "{}", show.stdout());
    assert!(agent.log_text().contains("could not be published 3 times"), "{}", agent.log_text());
    eprintln!("unpublishable result: 3 claims in {secs:.1}s, then failed with failure.json");
}

/// The job's owner rewrites the qcow2 header *in place* after the agent inspected it (and, with
/// `--verify before`, after the digest was checked), to name a backing file it cannot read itself.
/// The agent stops itself at exactly that moment (`stop:agent.inspected`), the header is rewritten,
/// and it goes on: qemu-img opens the source with backing files forbidden and confined to the job,
/// the rewrite is seen after the conversion, and nothing of the secret is ever published.
#[test]
fn a_qcow2_header_rewritten_after_inspection_never_reaches_the_output() {
    let farm = Farm::new();
    let secret = farm.path().join("secret.raw");
    fs::write(&secret, images::pattern(44, 1 << 20)).unwrap();
    // A sound-looking qcow2: the backing name is still in its header, but nothing points at it.
    let img = farm.src.join("vm.qcow2");
    images::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        secret.to_str().unwrap(),
        "-F",
        "raw",
        img.to_str().unwrap(),
        "1M",
    ]);
    let mut bytes = fs::read(&img).unwrap();
    let pointer: Vec<u8> = bytes[8..20].to_vec();
    bytes[8..20].fill(0);
    fs::write(&img, &bytes).unwrap();
    let id = publish(&farm, &img, "rewritten");

    let mut agent = farm.agent_env(&[("HYPERFARM_FAILPOINT", "stop:agent.inspected")], &["--verify", "before"]);
    hyperfarm_tests::wait_stopped(agent.pid(), Duration::from_secs(30));
    let disk = hyperfarm_tests::find_files(&farm.queue.join("converting"), ".qcow2").pop().expect("the job's disk");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(&pointer, 8).unwrap();
        f.sync_all().unwrap();
    }
    hyperfarm_tests::cont(agent.pid());
    let rec = wait_for("the job's result", Duration::from_secs(60), || {
        farm.records().into_iter().find(|r| r["job_id"] == id.as_str())
    });
    assert_eq!(rec["state"], "failed", "{rec}");
    let err = rec["error"].as_str().unwrap();
    assert!(err.contains("changed while it was converted"), "{err}");
    assert!(!farm.output.join("rewritten.qcow2").exists(), "nothing was published");
    // Not a byte of the secret anywhere in the output directory (published or left over).
    let needle = &images::pattern(44, 1 << 20)[4096..4096 + 64];
    for f in hyperfarm_tests::find_files(&farm.output, "") {
        if f.is_file() {
            let b = fs::read(&f).unwrap();
            assert!(!b.windows(needle.len()).any(|w| w == needle), "{} holds the secret", f.display());
        }
    }
    agent.signal(rustix::process::Signal::TERM);
    agent.wait_exit(Duration::from_secs(20));
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// A seed exporter writing a big disk into the watch directory produces thousands of write events;
/// the idle agent must not scan for each of them.
#[test]
fn a_big_file_written_into_the_watch_directory_costs_the_idle_agent_few_scans() {
    let farm = Farm::new();
    let agent = farm.agent(&["--poll-interval", "1s"]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let scans = || {
        let r = hyperctl(&["--agent", &url, "--json", "daemon", "status"]);
        r.expect_code(0);
        r.json()[0]["scans"].as_u64().unwrap()
    };
    let (before, cpu_before) = (scans(), cpu_seconds(agent.pid()));
    let t0 = Instant::now();
    {
        use std::io::Write;
        let mut f = fs::File::create(farm.queue.join("exported-disk1.vmdk")).unwrap();
        let chunk = vec![0x33u8; 1 << 20];
        for _ in 0..512 {
            f.write_all(&chunk).unwrap();
            f.flush().unwrap();
        }
        f.sync_all().unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    let (after, cpu_after) = (scans(), cpu_seconds(agent.pid()));
    let n = after - before;
    // One scan a second by the timer, plus a couple for the file's creation and close (each
    // debounced); nothing per write.
    let allowed = secs.ceil() as u64 + 6;
    assert!(n <= allowed, "{n} scans while 512 MiB were written in {secs:.1}s (at most {allowed})");
    eprintln!(
        "512 MiB written into the watch directory in {secs:.1}s: {n} scans, {:.2} CPU-seconds of the agent",
        cpu_after - cpu_before
    );
}

/// The agent bounds the virtual size it accepts (max_virtual_size): a small qcow2 that claims a
/// huge disk fails before any conversion.
#[test]
fn a_disk_larger_than_max_virtual_size_fails_before_conversion() {
    let farm = Farm::new();
    let img = farm.src.join("claims-2g.qcow2");
    images::qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "2G"]);
    let id = publish(&farm, &img, "too-big");
    let _agent = farm.agent(&["--max-virtual-size", "1G"]);
    let rec = wait_for("the result", Duration::from_secs(30), || {
        farm.records().into_iter().find(|r| r["job_id"] == id.as_str())
    });
    assert_eq!(rec["state"], "failed");
    let err = rec["error"].as_str().unwrap();
    assert!(err.contains("larger than the limit") && err.contains("max_virtual_size"), "{err}");
}
