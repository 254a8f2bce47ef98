//! `--provider vsphere` against a real vSphere API simulator on loopback (govmomi's, with the
//! export half added: `tests/vcsim/hfvcsim.go`), with pyvmomi checking the simulator's side
//! independently. The disks it serves are real streamOptimized VMDKs made by qemu-img.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperfarm_tests::images::{assert_identical, convert, raw_disk};
use hyperfarm_tests::vcsim::{PASSWORD, USER, Vcsim};
use hyperfarm_tests::{Farm, Run, bin, python};

/// Two disks: a boot disk with 6 MiB of incompressible data (so a transfer can be cut mid-disk)
/// and a small data disk. Returns the raw images and their streamOptimized VMDKs.
fn disks(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let a = raw_disk(&dir.join("boot.raw"), 32 << 20, &[(0, 6 << 20), (20 << 20, 64 << 10)], 11);
    let b = raw_disk(&dir.join("data.raw"), 8 << 20, &[(1 << 20, 512 << 10)], 12);
    let va = convert(&a, &dir.join("boot.vmdk"), "vmdk", Some("subformat=streamOptimized"));
    let vb = convert(&b, &dir.join("data.vmdk"), "vmdk", Some("subformat=streamOptimized"));
    (vec![a, b], vec![va, vb])
}

fn export(farm: &Farm, vc: &Vcsim, vm: &str, extra: &[&str]) -> hyperfarm_tests::Ran {
    let mut args = vc.flags();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    farm.export(Path::new(vm), &args)
}

/// No file at all in the queue (agents' registrations aside): nothing staged, nothing published.
fn queue_is_empty(farm: &Farm) {
    assert!(farm.queue.is_dir());
    let left: Vec<PathBuf> = hyperfarm_tests::find_files(&farm.queue, "")
        .into_iter()
        .filter(|p| !p.strip_prefix(&farm.queue).is_ok_and(|r| r.starts_with(".agents")))
        .collect();
    assert!(left.is_empty(), "the queue holds {left:?}:\n{}", farm.listing());
}

#[test]
fn a_vm_with_two_disks_is_exported_through_the_api_and_converted_by_an_agent() {
    let farm = Farm::new();
    let (raws, vmdks) = disks(&farm.src);
    // The lease lists the disks in reverse order (vSphere does not promise the device order):
    // they must still be matched to the VM's devices by controller and unit.
    let vc = Vcsim::start(&farm.path().join("vcsim"), &vmdks, &["-reverse-lease", "-rate", "4000000"]);

    // pyvmomi, an independent client, sees the VM's facts and downloads the same bytes.
    let mut cross = vec![
        Path::new(env!("CARGO_MANIFEST_DIR")).join("vcsim/crosscheck.py").display().to_string(),
        vc.url.clone(),
        vc.ca.display().to_string(),
        USER.into(),
        PASSWORD.into(),
        "ubuntu-server".into(),
    ];
    cross.extend(vmdks.iter().map(|p| p.display().to_string()));
    let seen = Run::new(&python(), &cross).timeout(Duration::from_secs(120)).run();
    seen.expect_code(0);
    let seen: serde_json::Value = serde_json::from_str(seen.stdout().trim()).unwrap();
    assert_eq!((seen["cpus"].as_u64(), seen["memory_mb"].as_u64()), (Some(2), Some(2048)), "{seen}");
    assert_eq!(seen["firmware"], "efi");
    assert_eq!(seen["disks"], 2);
    assert_eq!(seen["powered_on_refused"], true, "{seen}");
    assert_eq!(seen["nics"].as_array().map(Vec::len), Some(2), "{seen}");

    // The listing shows it by inventory path.
    let list = Run::new(&bin("hyperexport"), &{
        let mut a = vec!["vms".to_string(), "--json".into()];
        a.extend(vc.flags().into_iter().skip(2));
        a
    })
    .run();
    list.expect_code(0);
    let vms: serde_json::Value = serde_json::from_str(list.stdout().trim()).unwrap();
    let ours = vms.as_array().unwrap().iter().find(|v| v["name"] == "ubuntu-server").cloned().unwrap();
    assert_eq!(ours["path"], "/DC0/vm/ubuntu-server", "{vms:#}");
    assert_eq!(ours["power"], "poweredOff");

    let _agent = farm.agent(&["--engine", "qemu-img"]);
    let ran = export(&farm, &vc, "/DC0/vm/ubuntu-server", &["--json", "--vsphere-keepalive", "200ms"]);
    ran.expect_code(0);
    let out: serde_json::Value = ran.json();
    let files: Vec<PathBuf> =
        out["files"].as_array().unwrap().iter().map(|f| PathBuf::from(f.as_str().unwrap())).collect();
    assert_eq!(files.len(), 2, "{out:#}");
    assert_identical(&raws[0], &files[0]);
    assert_identical(&raws[1], &files[1]);
    // The job carried the VM's facts from the API, its NICs among them.
    let rec = farm.records().into_iter().next().unwrap();
    let job_dir = farm.queue.join("done").join(rec["job_id"].as_str().unwrap());
    let manifest: serde_json::Value = std::fs::read(job_dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| {
            // Agents may remove finished jobs' disks but keep their manifests; find it anyway.
            let found = hyperfarm_tests::find_files(&farm.queue, "manifest.json");
            serde_json::from_slice(&std::fs::read(&found[0]).unwrap()).unwrap()
        });
    assert_eq!(manifest["source"]["provider"], "vsphere", "{manifest:#}");
    assert_eq!(manifest["vm"]["cpu"], 2);
    assert_eq!(manifest["vm"]["firmware"], "uefi");
    assert_eq!(manifest["hyperfarm"]["memory_mib"], 2048);
    assert_eq!(manifest["hyperfarm"]["nics"][1]["mac"], "00:50:56:a1:0d:02", "{manifest:#}");
    assert!(manifest["disks"][0]["label"].as_str().unwrap().contains("ubuntu-server_0.vmdk"), "{manifest:#}");
    // Our lease (the second; pyvmomi's was the first) was renewed with its progress while the
    // disks downloaded (at 4 MB/s, renewals every 200 ms), and completed.
    let events = vc.events();
    let leases: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "lease").map(|e| &e["lease"]).collect();
    assert_eq!(leases.len(), 2, "{events:#?}");
    let renewals = events
        .iter()
        .filter(|e| e["event"] == "HttpNfcLeaseProgress" && &e["lease"] == leases[1])
        .filter(|e| e["percent"].as_u64().is_some_and(|p| p < 100))
        .count();
    assert!(renewals >= 2, "renewed during the download: {events:#?}");
    assert_eq!(vc.count("HttpNfcLeaseComplete"), 2, "pyvmomi's lease and ours: {events:#?}");
}

#[test]
fn wrong_password_unknown_vm_running_vm_and_untrusted_server_are_refused_clearly() {
    let farm = Farm::new();
    let (_, vmdks) = disks(&farm.src);
    let vc = Vcsim::start(&farm.path().join("vcsim"), &vmdks, &[]);
    let wrong = farm.path().join("wrong");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let mut flags = vc.flags();
    flags[7] = wrong.display().to_string();
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ran = farm.export(Path::new("ubuntu-server"), &args);
    ran.expect_code(2);
    assert!(
        ran.stderr().contains("refused the login of hf-user") && ran.stderr().contains("GOVC_PASSWORD"),
        "{}",
        ran.stderr()
    );

    let ran = export(&farm, &vc, "no-such-vm", &[]);
    ran.expect_code(3);
    assert!(ran.stderr().contains("no VM no-such-vm") && ran.stderr().contains("hyperexport vms"), "{}", ran.stderr());

    let ran = export(&farm, &vc, "running-vm", &[]);
    ran.expect_code(3);
    assert!(
        ran.stderr().contains("running-vm is poweredOn") && ran.stderr().contains("--allow-powered-on"),
        "{}",
        ran.stderr()
    );

    // Without the CA, the certificate is not trusted: the message says what to give.
    let mut flags = vc.flags();
    flags.truncate(8);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ran = farm.export(Path::new("ubuntu-server"), &args);
    ran.expect_code(6);
    assert!(ran.stderr().contains("--ca-file") && ran.stderr().contains("--insecure"), "{}", ran.stderr());

    // A password on the command line is refused before anything is sent.
    let bad_url = vc.url.replace("https://", "https://hf-user:hf-secret@");
    let ran =
        Run::new(&bin("hyperexport"), &["vms".into(), "--vsphere-url".into(), bad_url, "--insecure".into()]).run();
    ran.expect_code(2);
    assert!(ran.stderr().contains("process list"), "{}", ran.stderr());
    queue_is_empty(&farm);
    assert_eq!(vc.count("lease"), 0, "no export was started: {:#?}", vc.events());
}

#[test]
fn a_transfer_cut_mid_disk_resumes_where_it_broke_and_the_vm_is_defined_in_libvirt() {
    let farm = Farm::new();
    let (raws, vmdks) = disks(&farm.src);
    // As through a vCenter: the API at https://localhost, the disks at a host the lease names
    // (127.0.0.1, another port) whose self-signed certificate only the lease's SHA-1 thumbprint
    // vouches for (the CA given with --ca-file did not sign it).
    let vc = Vcsim::start(
        &farm.path().join("vcsim"),
        &vmdks,
        &["-cut-after", "2000000", "-cut-times", "2", "-url-host", "localhost", "-nfc-host", "127.0.0.1"],
    );
    assert!(vc.url.starts_with("https://localhost:"), "{}", vc.url);
    let _agent = farm.agent(&["--engine", "qemu-img"]);
    // Daemon mode: the agent checks the blake3 digests computed while the transfers broke and
    // resumed; hyperexport defines the domain (--libvirt-side exporter).
    let ran = export(
        &farm,
        &vc,
        "ubuntu-server",
        &["--libvirt", "--libvirt-side", "exporter", "--libvirt-uri", "test:///default", "--json"],
    );
    ran.expect_code(0);
    let gets: Vec<u64> = vc
        .events()
        .iter()
        .filter(|e| e["event"] == "get" && e["file"] == "ubuntu-server-disk-0.vmdk")
        .map(|e| e["from"].as_u64().unwrap())
        .collect();
    assert_eq!(gets, [0, 2_000_000, 4_000_000], "resumed with Range from where each transfer broke");
    assert!(ran.stderr().contains("resuming from there"), "{}", ran.stderr());
    let out = ran.json();
    assert_identical(&raws[0], Path::new(out["files"][0].as_str().unwrap()));
    assert_identical(&raws[1], Path::new(out["files"][1].as_str().unwrap()));
    let xml = std::fs::read_to_string(farm.output.join("ubuntu-server.xml")).unwrap();
    for want in [
        "<mac address='00:50:56:a1:0d:01'/>",
        "<mac address='00:50:56:a1:0d:02'/>",
        "<os firmware='efi'>",
        "<vcpu>2</vcpu>",
    ] {
        assert!(xml.contains(want), "{want} missing from\n{xml}");
    }
    assert_eq!(out["libvirt"]["defined_by"], "hyperexport", "{out:#}");
    assert!(farm.records()[0]["libvirt"].is_null(), "the agent was not asked");

    // A lease naming a host whose certificate is neither the one its thumbprint says nor signed
    // by a trusted CA: refused at once (no retry can change a certificate) before a byte is
    // read, the lease released, nothing published.
    let other = Vcsim::start(
        &farm.path().join("vcsim2"),
        &vmdks,
        &["-url-host", "localhost", "-nfc-host", "127.0.0.1", "-bad-thumbprint"],
    );
    let before = farm.jobs_in("done").len();
    let ran = export(&farm, &other, "ubuntu-server", &[]);
    ran.expect_code(6);
    assert!(ran.stderr().contains("sslThumbprint"), "{}", ran.stderr());
    assert!(!ran.stderr().contains("resuming"), "not retried: {}", ran.stderr());
    assert_eq!(other.count("get"), 0, "{:#?}", other.events());
    assert_eq!(other.count("HttpNfcLeaseAbort"), 1, "{:#?}", other.events());
    assert_eq!(farm.jobs_in("done").len(), before);
    assert!(farm.jobs_in("queued").is_empty());
}

#[test]
fn a_lease_that_expires_fails_cleanly_and_keep_alive_prevents_it() {
    let farm = Farm::new();
    let (raws, vmdks) = disks(&farm.src);
    // 1 s lease timeout; the boot disk takes about 3 s at 2 MB/s.
    let vc = Vcsim::start(&farm.path().join("vcsim"), &vmdks, &["-lease-timeout", "1s", "-rate", "2000000"]);
    let mut args = vc.flags();
    for a in ["--vm", "ubuntu-server", "--output"] {
        args.push(a.into());
    }
    args.push(farm.queue.display().to_string());
    let slow = [args.clone(), vec!["--vsphere-keepalive".into(), "30s".into()]].concat();
    let ran = Run::new(&bin("hyperexport"), &slow).timeout(Duration::from_secs(120)).run();
    ran.expect_code(6);
    assert!(
        ran.stderr().contains("export lease") && ran.stderr().contains("nothing was published"),
        "{}",
        ran.stderr()
    );
    assert_eq!(vc.count("expired"), 1, "{:#?}", vc.events());
    queue_is_empty(&farm);

    let kept = [args, vec!["--vsphere-keepalive".into(), "250ms".into(), "--json".into()]].concat();
    let ran = Run::new(&bin("hyperexport"), &kept).timeout(Duration::from_secs(120)).run();
    ran.expect_code(0);
    assert_eq!(vc.count("expired"), 1, "the second lease did not expire: {:#?}", vc.events());
    assert!(vc.count("HttpNfcLeaseProgress") >= 8, "{:#?}", vc.events());
    // Export only: the job is in the queue; an agent converts it to the same disks.
    let _agent = farm.agent(&["--engine", "qemu-img"]);
    let rec = hyperfarm_tests::wait_for("the result", Duration::from_secs(60), || farm.records().into_iter().next());
    assert_eq!(rec["state"], "done", "{rec:#}");
    let done = hyperfarm_tests::find_files(&farm.output, ".qcow2");
    assert_eq!(done.len(), 2, "{done:?}");
    let boot = done.iter().find(|p| !p.display().to_string().contains('~')).unwrap();
    assert_identical(&raws[0], boot);
}

#[test]
fn a_running_vm_is_exported_from_a_snapshot_and_an_interrupted_export_releases_its_lease() {
    let farm = Farm::new();
    let (raws, vmdks) = disks(&farm.src);
    let vc = Vcsim::start(&farm.path().join("vcsim"), &vmdks, &["-rate", "3000000"]);
    let mut args = vc.flags();
    for a in ["--vm", "running-vm", "--allow-powered-on", "--pipeline", "--engine", "qemu-img", "--output"] {
        args.push(a.into());
    }
    args.push(farm.output.display().to_string());
    let ran = Run::new(&bin("hyperexport"), &args).timeout(Duration::from_secs(120)).run();
    ran.expect_code(0);
    assert!(
        ran.stderr().contains("exporting a snapshot") && ran.stderr().contains("removed the export snapshot"),
        "{}",
        ran.stderr()
    );
    let lease = vc.events().into_iter().find(|e| e["event"] == "lease").unwrap();
    assert!(lease["entity"].as_str().unwrap().starts_with("snapshot-"), "exported from a snapshot: {lease}");
    assert_identical(&raws[0], &farm.output.join("running-vm.qcow2"));
    // Direct mode downloaded into a scratch directory in the output: gone.
    let left: Vec<_> = std::fs::read_dir(&farm.output)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".hyperexport-vsphere"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Ctrl-C mid-download: the lease is aborted and nothing is left in the queue.
    let mut args = vc.flags();
    for a in ["--vm", "ubuntu-server", "--output"] {
        args.push(a.into());
    }
    args.push(farm.queue.display().to_string());
    let (child, desc) = Run::new(&bin("hyperexport"), &args).spawn();
    hyperfarm_tests::wait_for("the download to start", Duration::from_secs(30), || {
        (vc.events().iter().filter(|e| e["event"] == "get").count() >= 3).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let ran = hyperfarm_tests::collect(child, desc, Duration::from_secs(30));
    ran.expect_code(130);
    assert_eq!(vc.count("HttpNfcLeaseAbort"), 1, "{:#?}", vc.events());
    queue_is_empty(&farm);
}
