//! The agent as a process: crashes (kill -9) and restarts, two agents on one queue, SIGTERM,
//! start-up errors, corrupted jobs.

use std::fs;
use std::path::Path;
use std::time::Duration;

use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, Proc, Run, bin, lease_phase, publish, slow_config, slow_disk, wait_for};

#[test]
fn kill_9_mid_conversion_then_restart_ends_the_job_exactly_once() {
    let farm = Farm::new();
    let raw = slow_disk(&farm, "big.raw", 50);
    let cfg = slow_config(&farm);
    let mut agent = farm.agent(&["--config", &cfg]);
    let id = publish(&farm, &raw, "crashy");
    wait_for("the conversion to start", Duration::from_secs(60), || {
        (lease_phase(&farm).as_deref() == Some("converting")).then_some(())
    });
    agent.kill9();
    assert!(!farm.output.join("crashy.qcow2").exists(), "no half-written output under the final name");
    assert_eq!(farm.jobs_in("converting").len(), 1, "the dead agent's claim is still there");

    let _agent2 = farm.agent(&["--config", &cfg]);
    wait_for("the result after restart", Duration::from_secs(120), || farm.records().first().cloned());
    assert_identical(&raw, &farm.output.join("crashy.qcow2"));
    assert_eq!(farm.records().len(), 1);
    assert_eq!(farm.jobs_in("done"), vec![id.clone()]);
    assert!(farm.jobs_in("converting").is_empty() && farm.jobs_in("queued").is_empty());
    let events: Vec<String> = fs::read_dir(farm.queue.join("done").join(&id).join("events"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(events.iter().filter(|e| e.contains("-claim-")).count(), 2, "{events:?}");
    assert_eq!(events.iter().filter(|e| e.contains("-expired-")).count(), 1, "{events:?}");
    wait_for("the dead attempt's work area to be removed", Duration::from_secs(10), || {
        (fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count() == 0).then_some(())
    });
}

#[test]
fn two_agents_on_one_queue_convert_every_job_exactly_once() {
    let farm = Farm::new();
    let _a = farm.agent(&["--max-concurrent", "2"]);
    let _b = farm.agent(&["--max-concurrent", "2"]);
    let raw = images::sample_disk(&farm.src, "shared.raw", 8, 51);
    let n = 12;
    let ids: Vec<String> = (0..n).map(|i| publish(&farm, &raw, &format!("vm-{i:02}"))).collect();
    wait_for("every result", Duration::from_secs(120), || (farm.jobs_in("done").len() == n).then_some(()));

    let records = farm.records();
    let mut seen: Vec<&str> = records.iter().map(|r| r["job_id"].as_str().unwrap()).collect();
    seen.sort();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort();
    assert_eq!(seen, want);
    for id in &ids {
        let events: Vec<String> = fs::read_dir(farm.queue.join("done").join(id).join("events"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            events.iter().filter(|e| e.contains("-claim-")).count(),
            1,
            "job {id} claimed more than once: {events:?}"
        );
    }
    for i in 0..n {
        assert_identical(&raw, &farm.output.join(format!("vm-{i:02}.qcow2")));
    }
}

#[test]
fn sigterm_returns_a_running_job_to_the_queue_after_the_grace_period() {
    let farm = Farm::new();
    let raw = slow_disk(&farm, "big.raw", 52);
    let cfg = slow_config(&farm);
    let mut agent = farm.agent(&["--config", &cfg, "--shutdown-grace", "100ms"]);
    let id = publish(&farm, &raw, "graceful");
    wait_for("the conversion to start", Duration::from_secs(60), || {
        (lease_phase(&farm).as_deref() == Some("converting")).then_some(())
    });
    agent.signal(rustix::process::Signal::TERM);
    let st = agent.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "exit status {st}");
    assert!(agent.log_text().contains("returned to the queue"), "{}", agent.log_text());
    assert_eq!(farm.jobs_in("queued"), vec![id.clone()]);
    assert!(farm.records().is_empty() && !farm.output.join("graceful.qcow2").exists());
    assert_eq!(fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count(), 0, "partial output removed");
    // The next agent finishes it.
    let _b = farm.agent(&[]);
    wait_for("the result", Duration::from_secs(120), || farm.records().first().cloned());
    assert_identical(&raw, &farm.output.join("graceful.qcow2"));
}

#[test]
fn sigterm_when_idle_exits_cleanly() {
    let farm = Farm::new();
    let mut agent = farm.agent(&[]);
    agent.signal(rustix::process::Signal::TERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).success());
    assert!(agent.log_text().contains("stopped"));
}

#[test]
fn start_up_errors_have_documented_exit_codes() {
    let farm = Farm::new();
    let run = |args: &[&str]| {
        Run::new(&bin("hyper2kvm-agent"), &args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .timeout(Duration::from_secs(30))
            .run()
    };
    let out = farm.output.to_str().unwrap();
    let r = run(&["--watch-dir", "/nonexistent/q", "--output-dir", out]);
    r.expect_code(6);
    assert!(r.stderr().contains("/nonexistent/q"), "{}", r.stderr());
    let bad = farm.path().join("bad.toml");
    fs::write(&bad, "max_concurent = 3\n").unwrap();
    let r = run(&["--config", bad.to_str().unwrap()]);
    r.expect_code(3);
    assert!(r.stderr().contains("max_concurent"), "{}", r.stderr());
    let r =
        run(&["--watch-dir", farm.queue.to_str().unwrap(), "--output-dir", out, "--qemu-img", "/nonexistent/qemu-img"]);
    r.expect_code(4);
    assert!(r.stderr().contains("qemu-img"), "{}", r.stderr());
}

#[test]
fn a_corrupted_disk_fails_its_job_naming_the_disk_and_the_agent_keeps_serving() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "c.raw", 8, 53);
    let id = publish(&farm, &raw, "corrupt");
    images::corrupt(&farm.queue.join("queued").join(&id).join("disks/disk0.raw"), 100);
    let good = publish(&farm, &raw, "fine");
    let _agent: Proc = farm.agent(&[]);
    wait_for("both results", Duration::from_secs(60), || (farm.records().len() == 2).then_some(()));
    let err = fs::read_to_string(farm.output.join("corrupt.error")).unwrap();
    let first = err.lines().next().unwrap();
    assert!(first.contains("disk disk0") && first.contains("blake3 digest mismatch"), "{err}");
    assert!(err.contains(&id), "the error names the job: {err}");
    wait_for("both jobs to reach their final directory", Duration::from_secs(10), || {
        (farm.jobs_in("done") == vec![good.clone()] && farm.jobs_in("failed") == vec![id.clone()]).then_some(())
    });
    assert!(farm.queue.join("failed").join(&id).join("disks/disk0.raw").is_file(), "a failed job keeps its disks");
    assert_identical(&raw, &farm.output.join("fine.qcow2"));
}

#[test]
fn with_verify_before_a_corrupted_disk_never_starts_the_engine() {
    let farm = Farm::new();
    // A real qemu-img behind a wrapper (the configured program is run, confined like qemu-img);
    // the agent's debug log records every engine command line.
    let wrapper = farm.dir.path().join("qemu-img-wrapper");
    fs::write(&wrapper, "#!/bin/sh\nexec qemu-img \"$@\"\n").unwrap();
    fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let raw = images::sample_disk(&farm.src, "c.raw", 8, 54);
    let id = publish(&farm, &raw, "corrupt");
    images::corrupt(&farm.queue.join("queued").join(&id).join("disks/disk0.raw"), 100);
    let agent: Proc = farm.agent_env(
        &[("HYPER2KVM_AGENT_LOG", "info,hyperfarm_shared::engine=debug")],
        &["--verify", "before", "--qemu-img", wrapper.to_str().unwrap()],
    );
    wait_for("the failed result", Duration::from_secs(60), || (farm.records().len() == 1).then_some(()));
    let err = fs::read_to_string(farm.output.join("corrupt.error")).unwrap();
    assert!(err.contains("blake3 digest mismatch") && err.contains(&id), "{err}");
    let converts = || {
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains("starting an engine process") && l.contains("\"convert\""))
            .count()
    };
    assert!(agent.log_text().contains("\"info\""), "the debug log shows engine commands:\n{}", agent.log_text());
    assert_eq!(converts(), 0, "qemu-img convert ran for a job that failed its check");
    // The same agent does convert a sound job through the wrapper.
    let good = publish(&farm, &raw, "fine");
    wait_for("the good result", Duration::from_secs(60), || (farm.records().len() == 2).then_some(()));
    assert_identical(&raw, &farm.output.join("fine.qcow2"));
    assert_eq!(converts(), 1, "the wrapper saw the good job's conversion ({good})");
}

/// The README's first command works on a machine where an agent already listens on the default
/// 127.0.0.1:50071 (an installed one): the demo's agent takes a port of its own, and the demo's
/// exporter talks to it, not to the other one.
#[test]
fn the_demo_runs_beside_an_installed_agent() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:50071");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo");
    let farm = Farm::new();
    let bin_dir = hyperfarm_tests::bin("hyper2kvm-agent").parent().unwrap().to_path_buf();
    let ran = hyperfarm_tests::Run::new(&demo, &[farm.path().join("demo").display().to_string()])
        .env("HYPERFARM_DEMO_BIN", bin_dir.to_str().unwrap())
        .timeout(Duration::from_secs(120))
        .run();
    ran.expect_code(0);
    assert!(ran.stdout().contains("demo-vm.qcow2"), "{}", ran.stdout());
    drop(squatter);
}

/// No file of the repository names a package registry or mirror host: installs take them from the
/// machine's own apt/pip/cargo configuration (`scripts/lib/apt-mirror.sh`).
#[test]
fn the_repository_names_no_package_registry_host() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("git").arg("-C").arg(&root).args(["ls-files", "-z"]).output().unwrap();
    assert!(out.status.success(), "git ls-files");
    let hosts = [
        ["deb", "debian", "org"].join("."),
        ["security", "debian", "org"].join("."),
        ["snapshot", "debian", "org"].join("."),
        ["pypi", "org"].join("."),
        ["files", "pythonhosted", "org"].join("."),
        ["registry", "npmjs", "org"].join("."),
        ["index", "crates", "io"].join("."),
        ["static", "crates", "io"].join("."),
    ];
    let mut found = Vec::new();
    for f in out.stdout.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let name = String::from_utf8_lossy(f).into_owned();
        if name == "Cargo.lock" {
            continue;
        }
        let text = String::from_utf8_lossy(&fs::read(root.join(&name)).unwrap_or_default()).into_owned();
        for h in &hosts {
            if text.contains(h.as_str()) {
                found.push(format!("{name}: {h}"));
            }
        }
    }
    assert!(found.is_empty(), "registry hosts named in the repository: {found:?}");
}

/// Under systemd (`Type=notify`) the agent says READY=1 after its first scan, keeps a STATUS=
/// line that `systemctl status` shows (what runs, what waits, why it does not claim), and
/// STOPPING=1 on SIGTERM: read here from a real `$NOTIFY_SOCKET` datagram socket.
#[test]
fn systemd_sees_ready_a_status_line_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let farm = Farm::new();
    let sock_path = farm.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut got: Vec<String> = Vec::new();
    let recv_until = |want: &dyn Fn(&str) -> bool, got: &mut Vec<String>| {
        let t = std::time::Instant::now();
        let mut buf = [0u8; 4096];
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(n) = sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                got.push(m.clone());
                if want(&m) {
                    return;
                }
            }
        }
        panic!("no such notification in 30 s; got {got:?}");
    };
    let cfg = slow_config(&farm);
    let mut agent = farm.agent_env(&[("NOTIFY_SOCKET", sock_path.to_str().unwrap())], &["--config", &cfg]);
    recv_until(&|m| m == "READY=1", &mut got);
    recv_until(&|m| m == "STATUS=serving: 0/2 converting, 0 queued", &mut got);
    // The line follows what the agent does: a slow job running.
    publish(&farm, &slow_disk(&farm, "s.raw", 40), "statusvm");
    recv_until(&|m| m == "STATUS=serving: 1/2 converting, 0 queued", &mut got);
    agent.signal(rustix::process::Signal::TERM);
    recv_until(&|m| m == "STOPPING=1", &mut got);
    agent.wait_exit(Duration::from_secs(30));
}
