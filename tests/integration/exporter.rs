//! hyperexport's modes, results and exit codes.

use std::fs;
use std::time::Duration;

use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, Run, bin, wait_for};

fn hyperexport(args: &[&str]) -> Run {
    Run::new(&bin("hyperexport"), &args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

#[test]
fn direct_mode_converts_here_with_the_same_engine() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "d.raw", 24, 40);
    let ova = images::ova(&farm.src, "direct", &[&raw, &raw]);
    let out = farm.path().join("out");
    fs::create_dir(&out).unwrap();
    let ran =
        hyperexport(&["--vm", ova.to_str().unwrap(), "--pipeline", "--output", out.to_str().unwrap(), "--json"]).run();
    ran.expect_code(0);
    let j = ran.json();
    assert_eq!(j["state"], "done");
    assert_identical(&raw, &out.join("direct.qcow2"));
    assert_identical(&raw, &out.join("direct~vmdisk2.qcow2"));
    assert_eq!(fs::read_dir(out.join(".hyperfarm/tmp")).unwrap().count(), 0, "no work area left");
    // A second run for the same VM name does not overwrite: exit 8 naming the file.
    let ran = hyperexport(&["--vm", ova.to_str().unwrap(), "--pipeline", "--output", out.to_str().unwrap()]).run();
    ran.expect_code(8);
    assert!(ran.stderr().contains("direct.qcow2") && ran.stderr().contains("already exists"), "{}", ran.stderr());
    // With --on-existing archive the old one is moved aside, never lost.
    hyperexport(&[
        "--vm",
        ova.to_str().unwrap(),
        "--pipeline",
        "--output",
        out.to_str().unwrap(),
        "--on-existing",
        "archive",
    ])
    .run()
    .expect_code(0);
    let archived: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("superseded"))
        .collect();
    assert_eq!(archived.len(), 2);
}

#[test]
fn export_only_publishes_a_job_that_an_agent_later_converts() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "e.raw", 16, 41);
    let ran = hyperexport(&[
        "--vm",
        raw.to_str().unwrap(),
        "--output",
        farm.queue.to_str().unwrap(),
        "--name",
        "later",
        "--json",
    ])
    .run();
    ran.expect_code(0);
    let id = ran.json()["job_id"].as_str().unwrap().to_string();
    assert_eq!(farm.jobs_in("queued"), vec![id.clone()]);
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(farm.queue.join("queued").join(&id).join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["hyperfarm"]["job_id"], id.as_str());
    assert_eq!(m["disks"][0]["local_path"], "disks/disk0.raw");
    assert_eq!(m["disks"][0]["blake3"].as_str().unwrap().len(), 64);
    let _agent = farm.agent(&[]);
    wait_for("the result", Duration::from_secs(30), || farm.records().first().cloned());
    assert_identical(&raw, &farm.output.join("later.qcow2"));
}

/// Run hyperexport (export only) until it stops at `point`, send `signal`, let it go on.
fn signalled_at(
    farm: &Farm,
    raw: &std::path::Path,
    point: &str,
    signal: rustix::process::Signal,
) -> hyperfarm_tests::Ran {
    let (child, desc) = hyperexport(&["--vm", raw.to_str().unwrap(), "--output", farm.queue.to_str().unwrap()])
        .env("HYPERFARM_FAILPOINT", &format!("stop:{point}"))
        .spawn();
    let pid = child.id();
    hyperfarm_tests::wait_stopped(pid, Duration::from_secs(30));
    let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), signal);
    hyperfarm_tests::cont(pid);
    hyperfarm_tests::collect(child, desc, Duration::from_secs(60))
}

/// A SIGTERM (serve's cancel, systemd's stop) that arrives after the disks are copied but before
/// the job is published keeps it out of the queue: the flag is set by the signal handler itself,
/// and publication looks at it just before its rename.
#[test]
fn a_sigterm_after_the_copy_keeps_the_job_out_of_the_queue() {
    for (point, signal) in [
        ("export.disk-copied", rustix::process::Signal::TERM),
        ("export.manifest-written", rustix::process::Signal::INT),
    ] {
        let farm = Farm::new();
        let raw = images::sample_disk(&farm.src, "t.raw", 8, 42);
        let ran = signalled_at(&farm, &raw, point, signal);
        ran.expect_code(130);
        assert!(ran.stderr().contains("interrupted"), "{point}: {}", ran.stderr());
        // Kept out of the queue, or (the signal handled only as the rename happened) withdrawn.
        assert!(farm.jobs_in("queued").is_empty(), "{point}: nothing published\n{}", farm.listing());
        assert_eq!(
            farm.jobs_in("cancelled").len(),
            usize::from(ran.stderr().contains("withdrawn")),
            "{point}: {}\n{}",
            ran.stderr(),
            farm.listing()
        );
        let staged: Vec<_> = fs::read_dir(farm.queue.join("tmp"))
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            staged.iter().all(|n| n.to_string_lossy().starts_with('.')),
            "{point}: staged copy removed: {staged:?}"
        );
    }
}

/// A SIGTERM that arrives as the job is renamed into place (stopped just after the rename): the
/// job is withdrawn again (no agent claimed it), exit 130. Had the signal been handled only after
/// the last look at the flag, the export would have ended normally with the job queued: never a
/// queued job with exit 130, never a withdrawn one with exit 0.
#[test]
fn a_sigterm_as_the_job_is_published_withdraws_it() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "p.raw", 8, 43);
    let ran = signalled_at(&farm, &raw, "export.published", rustix::process::Signal::TERM);
    let (queued, cancelled) = (farm.jobs_in("queued"), farm.jobs_in("cancelled"));
    match ran.code() {
        Some(130) => {
            assert!(ran.stderr().contains("the job was withdrawn from the queue"), "{}", ran.stderr());
            assert!(queued.is_empty() && cancelled.len() == 1, "{}", farm.listing());
            let note =
                fs::read_to_string(farm.queue.join("cancelled").join(&cancelled[0]).join("cancel.json")).unwrap();
            assert!(note.contains("interrupted in hyperexport as it was published"), "{note}");
        }
        Some(0) => {
            eprintln!("the signal was handled after the last look at the flag: the job stays published");
            assert!(queued.len() == 1 && cancelled.is_empty(), "{}", farm.listing());
        }
        other => panic!("exit {other:?}: {}", ran.stderr()),
    }
}

#[test]
fn bad_input_and_unreachable_paths_have_their_own_exit_codes() {
    let farm = Farm::new();
    let out = farm.output.to_str().unwrap().to_string();
    // Missing file.
    let r = hyperexport(&["--vm", "/nonexistent/vm.ova", "--pipeline", "--output", &out]).run();
    r.expect_code(3);
    assert!(r.stderr().contains("/nonexistent/vm.ova"), "{}", r.stderr());
    // A text file is not a VM.
    let txt = farm.src.join("notes.txt");
    fs::write(&txt, "just some text\n".repeat(100)).unwrap();
    hyperexport(&["--vm", txt.to_str().unwrap(), "--pipeline", "--output", &out]).run().expect_code(3);
    // A qcow2 with a backing file.
    let base = images::sample_disk(&farm.src, "base.raw", 8, 1);
    let overlay = farm.src.join("overlay.qcow2");
    images::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        overlay.to_str().unwrap(),
    ]);
    let r = hyperexport(&["--vm", overlay.to_str().unwrap(), "--pipeline", "--output", &out]).run();
    r.expect_code(3);
    assert!(r.stderr().contains("backing file"), "{}", r.stderr());
    // A name that would escape the output directory.
    let r = hyperexport(&["--vm", base.to_str().unwrap(), "--pipeline", "--output", &out, "--name", "../escape"]).run();
    r.expect_code(3);
    // Daemon mode without detection, with a watch directory that does not exist: unreachable.
    let r = hyperexport(&[
        "--hyper2kvm-detect=false",
        "--vm",
        base.to_str().unwrap(),
        "--pipeline",
        "--hyper2kvm-daemon",
        "--hyper2kvm-watch-dir",
        "/nonexistent/queue",
        "--hyper2kvm-output-dir",
        &out,
    ])
    .run();
    r.expect_code(6);
    assert!(r.stderr().contains("/nonexistent/queue"), "{}", r.stderr());
    // A queue was named: the user asked for the farm. No agent answering is no reason to convert
    // here; a queue that does not exist is an unreachable directory (exit 6).
    let r = hyperexport(&[
        "--vm",
        base.to_str().unwrap(),
        "--name",
        "fallback",
        "--pipeline",
        "--hyper2kvm-daemon",
        "--agent",
        "http://127.0.0.1:1",
        "--hyper2kvm-watch-dir",
        "/nonexistent/queue",
        "--hyper2kvm-output-dir",
        &out,
    ])
    .run();
    r.expect_code(6);
    assert!(r.stderr().contains("the queue was named"), "{}", r.stderr());
    assert!(!r.stderr().contains("converting on this host"), "{}", r.stderr());
    assert!(!farm.output.join("fallback.qcow2").exists());
    // No queue named and no agent anywhere (the seed's rule): direct mode, with a warning saying why.
    let r = hyperexport(&[
        "--vm",
        base.to_str().unwrap(),
        "--name",
        "fallback",
        "--pipeline",
        "--hyper2kvm-daemon",
        "--agent",
        "http://127.0.0.1:1",
        "--hyper2kvm-instance",
        "hf-test-nowhere",
        "--hyper2kvm-output-dir",
        &out,
    ])
    .run();
    r.expect_code(0);
    assert!(r.stderr().contains("no queue was named"), "{}", r.stderr());
    assert!(r.stderr().contains("converting on this host"), "{}", r.stderr());
    assert_identical(&base, &farm.output.join("fallback.qcow2"));

    // Usage: direct mode needs --output.
    hyperexport(&["--vm", base.to_str().unwrap(), "--pipeline"]).run().expect_code(2);
}

#[test]
fn timeout_without_an_agent_withdraws_the_job() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "t.raw", 8, 42);
    let ran = farm.export(&raw, &["--hyper2kvm-daemon-timeout", "1s"]);
    ran.expect_code(5);
    assert!(ran.stderr().contains("withdrawn"), "{}", ran.stderr());
    assert!(farm.jobs_in("queued").is_empty());
    let cancelled = farm.jobs_in("cancelled");
    assert_eq!(cancelled.len(), 1);
    let note = fs::read_to_string(farm.queue.join("cancelled").join(&cancelled[0]).join("cancel.json")).unwrap();
    assert!(note.contains("timed out"), "{note}");
}

#[test]
fn a_stale_result_of_an_earlier_job_is_never_taken() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let raw = images::sample_disk(&farm.src, "s.raw", 8, 43);
    // An earlier job's error for the same VM name: the new job must not report it.
    fs::write(farm.output.join("stale.error"), "an old failure\n").unwrap();
    let ran = farm.export(&raw, &["--name", "stale"]);
    ran.expect_code(0);
    assert!(!ran.stderr().contains("an old failure"));
    assert_identical(&raw, &farm.output.join("stale.qcow2"));
    assert!(!farm.output.join("stale.error").exists(), "the contradicting old error is removed");
    // An earlier job's qcow2 for the same name: the new job fails (nothing overwritten) and its
    // exporter reports its own failure, not the old success.
    let before = fs::read(farm.output.join("stale.qcow2")).unwrap();
    let other = images::sample_disk(&farm.src, "other.raw", 8, 44);
    let ran = farm.export(&other, &["--name", "stale"]);
    ran.expect_code(4);
    assert!(ran.stderr().contains("already exists"), "{}", ran.stderr());
    assert_eq!(fs::read(farm.output.join("stale.qcow2")).unwrap(), before);
    assert!(ran.stderr().contains("on_existing"), "{}", ran.stderr());
    // The seed's contract shows the earlier success only: no stale.error beside stale.qcow2 (this
    // failure is in its own record, which its exporter read).
    assert!(!farm.output.join("stale.error").exists(), "stale.qcow2 and stale.error never stand side by side");
}
