//! The hyper2kvm engine against the real hyper2kvm 0.2.1 from PyPI.

use std::fs;
use std::time::Duration;

use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, Proc, find_files, hyper2kvm, hyperctl, publish, script, wait_for};

fn h2k_agent(farm: &Farm, extra: &[&str]) -> Proc {
    let path = hyper2kvm();
    let mut args = vec!["--engine", "hyper2kvm", "--hyper2kvm-path", path.to_str().unwrap()];
    args.extend(extra);
    farm.agent(&args)
}

#[test]
fn converts_identically_through_hyper2kvm_with_its_stages() {
    let farm = Farm::new();
    let _agent = h2k_agent(&farm, &[]);
    let raw = images::sample_disk(&farm.src, "h.raw", 48, 80);
    let vmdk = images::convert(&raw, &farm.src.join("h.vmdk"), "vmdk", None);
    let ran = farm.export(&vmdk, &["--name", "h2k-vm", "--hyper2kvm-stages", "inspect,validate"]);
    ran.expect_code(0);
    assert_identical(&raw, &farm.output.join("h2k-vm.qcow2"));
    let rec = &farm.records()[0];
    assert_eq!(rec["engine"], "hyper2kvm");
    // Nothing of hyper2kvm's is left behind.
    assert!(find_files(&farm.output, ".part").is_empty());
    assert!(find_files(&farm.output, "report.json").is_empty());
    assert_eq!(fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count(), 0);
    // The agent reports the engine and what this host can run with it.
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let r = hyperctl(&["--agent", &url, "--json", "daemon", "status"]);
    assert_eq!(r.json()[0]["engines"], serde_json::json!(["qemu-img", "hyper2kvm"]));
}

#[test]
fn a_multi_disk_vm_through_hyper2kvm() {
    let farm = Farm::new();
    let _agent = h2k_agent(&farm, &[]);
    let a = images::sample_disk(&farm.src, "a.raw", 32, 81);
    let b = images::sample_disk(&farm.src, "b.raw", 16, 82);
    let ova = images::ova(&farm.src, "pair", &[&a, &b]);
    farm.export(&ova, &[]).expect_code(0);
    assert_identical(&a, &farm.output.join("pair.qcow2"));
    assert_identical(&b, &farm.output.join("pair~vmdisk2.qcow2"));
    assert_eq!(farm.records()[0]["engine"], "hyper2kvm");
}

#[test]
fn a_failing_hyper2kvm_run_gives_its_own_message() {
    let farm = Farm::new();
    let _agent = h2k_agent(&farm, &[]);
    let raw = images::raw_disk(&farm.src.join("r.raw"), 16 << 20, &[(0, 16 << 20)], 83);
    let vmdk = images::convert(&raw, &farm.src.join("bad.vmdk"), "vmdk", Some("subformat=streamOptimized"));
    // Zero a stretch of compressed grain data: the metadata stays consistent (qemu-img check
    // passes), the data does not decompress.
    let f = fs::OpenOptions::new().write(true).open(&vmdk).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0u8; 256 << 10], 2 << 20).unwrap();
    drop(f);
    let ran = farm.export(&vmdk, &["--name", "broken"]);
    ran.expect_code(4);
    let err = fs::read_to_string(farm.output.join("broken.error")).unwrap();
    assert!(err.starts_with("converting with hyper2kvm") || err.starts_with("hyper2kvm failed"), "{err}");
    assert!(err.contains("hyper2kvm failed"), "{err}");
    assert!(err.contains("error while reading"), "qemu-img's words through hyper2kvm's log: {err}");
    assert!(find_files(&farm.output, ".part").is_empty());
}

#[test]
fn a_fix_stage_this_host_cannot_run_is_refused_before_any_work() {
    let farm = Farm::new();
    let calls = farm.path().join("calls.log");
    let wrapper = script(
        &farm.path().join("hyper2kvm-wrapper"),
        &format!("echo \"$*\" >> {}\nexec {} \"$@\"", calls.display(), hyper2kvm().display()),
    );
    let _agent = farm.agent(&["--engine", "hyper2kvm", "--hyper2kvm-path", wrapper.to_str().unwrap()]);
    let raw = images::sample_disk(&farm.src, "f.raw", 8, 84);
    let ran = farm.export(&raw, &["--name", "needs-fix", "--hyper2kvm-stages", "fix"]);
    ran.expect_code(4);
    let err = fs::read_to_string(farm.output.join("needs-fix.error")).unwrap();
    assert!(err.contains("fix stage") && err.contains("nbd") && err.contains("Nothing was started"), "{err}");
    let log = fs::read_to_string(&calls).unwrap();
    assert!(!log.contains("--manifest"), "hyper2kvm must not have been run for the job: {log}");
}

#[test]
fn a_hung_hyper2kvm_is_killed_at_its_timeout() {
    let farm = Farm::new();
    // The engine runs confined (it may write only its work area), so the hung process is found by
    // its unusual command line instead of a pid file.
    let marker = format!("{}.5", 3000 + std::process::id() % 500);
    let wrapper = script(
        &farm.path().join("hung-hyper2kvm"),
        &format!("if [ \"$1\" = --version ]; then echo 0.2.0; exit 0; fi\nexec sleep {marker}"),
    );
    let find = move || -> Option<i32> {
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            (cmd == format!("sleep\0{marker}\0").into_bytes()).then_some(pid)
        })
    };
    let _agent = farm.agent(&[
        "--engine",
        "hyper2kvm",
        "--hyper2kvm-path",
        wrapper.to_str().unwrap(),
        "--hyper2kvm-timeout",
        "2s",
    ]);
    let raw = images::sample_disk(&farm.src, "g.raw", 8, 85);
    let started = std::time::Instant::now();
    let (ran, pid) = std::thread::scope(|s| {
        let h = s.spawn(|| farm.export(&raw, &["--name", "hung"]));
        let pid = wait_for("the hung engine to run", Duration::from_secs(30), &find);
        (h.join().unwrap(), pid)
    });
    ran.expect_code(4);
    assert!(started.elapsed() < Duration::from_secs(60));
    let err = fs::read_to_string(farm.output.join("hung.error")).unwrap();
    assert!(err.contains("did not finish within 2s"), "{err}");
    wait_for("the hung process to be gone", Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    assert_eq!(fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count(), 0);
}

#[test]
fn cancel_mid_run_leaves_nothing_behind() {
    let farm = Farm::new();
    // hyper2kvm runs the real qemu-img, rate-limited through a qemu-img earlier on PATH so that
    // the run lasts long enough to be caught in the middle.
    let bin = farm.path().join("slowbin");
    fs::create_dir(&bin).unwrap();
    script(
        &bin.join("qemu-img"),
        "if [ \"$1\" = convert ]; then shift; exec /usr/bin/qemu-img convert -r 16M \"$@\"; fi\nexec /usr/bin/qemu-img \"$@\"",
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let h2k = hyper2kvm();
    let mut args = farm.agent_args();
    args.extend(["--engine", "hyper2kvm", "--hyper2kvm-path", h2k.to_str().unwrap()].map(String::from));
    let mut agent = Proc::spawn(&hyperfarm_tests::bin("hyper2kvm-agent"), &args, farm.path(), &[("PATH", &path)]);
    agent.wait_log("INFO ready", Duration::from_secs(60));
    let url = agent.grpc_url().unwrap();
    let raw = hyperfarm_tests::slow_disk(&farm, "c.raw", 86);
    let id = publish(&farm, &raw, "cancel-me");
    wait_for("hyper2kvm's .part file", Duration::from_secs(60), || {
        (!find_files(&farm.output.join(".hyperfarm/tmp"), ".part").is_empty()).then_some(())
    });
    hyperctl(&["--agent", &url, "jobs", "cancel", &id, "--reason", "stop it"]).expect_code(0);
    wait_for("the cancelled result", Duration::from_secs(30), || farm.records().first().cloned());
    assert_eq!(farm.records()[0]["state"], "cancelled");
    assert!(fs::read_to_string(farm.output.join("cancel-me.error")).unwrap().starts_with("cancelled: stop it"));
    assert!(find_files(farm.path(), ".part").is_empty(), "no .part file anywhere");
    assert!(find_files(&farm.output, "report.json").is_empty());
    assert_eq!(fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count(), 0);
    let ps = std::process::Command::new("pgrep").args(["-f", &farm.path().display().to_string()]).output().unwrap();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .map(str::to_string)
        .filter(|p| *p != agent.pid().to_string())
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn direct_mode_uses_the_same_hyper2kvm_engine_code() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "d.raw", 24, 87);
    images::convert(&raw, &farm.src.join("d.vhdx"), "vhdx", None);
    let h2k = hyper2kvm();
    let out = farm.path().join("direct");
    fs::create_dir(&out).unwrap();
    // A relative --vm path: hyper2kvm must still get absolute paths.
    let args: Vec<String> = [
        "--vm",
        "d.vhdx",
        "--pipeline",
        "--output",
        out.to_str().unwrap(),
        "--engine",
        "hyper2kvm",
        "--hyper2kvm-path",
        h2k.to_str().unwrap(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ran = hyperfarm_tests::Run::new(&hyperfarm_tests::bin("hyperexport"), &args).cwd(&farm.src).run();
    ran.expect_code(0);
    assert_eq!(ran.json()["engine"], "hyper2kvm");
    assert_identical(&raw, &out.join("d.qcow2"));
}
