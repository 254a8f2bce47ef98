//! The exporter's hostile-input corpus (`tests/data/hostile/exporter.json`): VMs whose files try to
//! reach outside the VM (absolute and `..` names, symlinks, symlinked directories, FIFOs, devices),
//! images the agent would refuse after a full copy (encrypted, differencing, compressed), broken
//! archives, and names full of control characters. Each must be refused at once with exit code 3
//! and a message that says what is wrong; nothing may be published, nothing may block, no file
//! outside the VM may be opened (watched with inotify), and no raw control character may reach the
//! terminal.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::Watcher;

use hyperfarm_tests::images;
use hyperfarm_tests::{Farm, Run, bin, wait_for};

fn mknod(path: &Path, kind: rustix::fs::FileType, dev: rustix::fs::Dev) {
    rustix::fs::mknodat(rustix::fs::CWD, path, kind, rustix::fs::Mode::from_raw_mode(0o600), dev)
        .expect("mknod (CI runs the tests as root)");
}

fn sh(cmd: &mut Command) {
    let st = cmd.status().expect("run");
    assert!(st.success(), "{cmd:?} failed");
}

/// An OVA of one raw disk member with the given OVF descriptors, optionally the disk twice,
/// `dirs` directory entries and cut to a percentage of its size.
fn ova(dir: &Path, path: &Path, f: &serde_json::Value) {
    let work = dir.join(".ova-work");
    fs::create_dir_all(&work).unwrap();
    let disk = work.join("disk1.raw");
    fs::write(&disk, images::pattern(5, 1 << 20)).unwrap();
    let mut members: Vec<String> = Vec::new();
    for o in f["ovfs"].as_array().unwrap() {
        let o = o.as_str().unwrap();
        let text = images::ovf_text("ova-vm", 1, 512, "bios", &[("disk1.raw".into(), "vmdisk1".into(), 1 << 20)]);
        fs::write(work.join(o), text).unwrap();
        members.push(o.to_string());
    }
    for i in 0..f["dirs"].as_u64().unwrap_or(0) {
        let d = format!("d{i:05}");
        fs::create_dir(work.join(&d)).unwrap();
        members.push(d);
    }
    members.push("disk1.raw".into());
    if f["duplicate_disk"].as_bool().unwrap_or(false) {
        members.push("disk1.raw".into());
    }
    let list = work.join(".members");
    fs::write(&list, members.join("\n") + "\n").unwrap();
    sh(Command::new("tar")
        .arg("--format=ustar")
        .arg("--no-recursion")
        .arg("-cf")
        .arg(path)
        .arg("-C")
        .arg(&work)
        .arg("-T")
        .arg(&list));
    if let Some(p) = f["truncate_percent"].as_u64() {
        let len = fs::metadata(path).unwrap().len();
        fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len * p / 100).unwrap();
    }
    fs::remove_dir_all(&work).unwrap();
}

fn make(dir: &Path, outside: &Path, f: &serde_json::Value) {
    let path = dir.join(f["path"].as_str().unwrap());
    let secret = outside.join("secret.raw");
    let subst = |t: &str| t.replace("@SECRET", secret.to_str().unwrap()).replace("@OUTSIDE", outside.to_str().unwrap());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    match f["kind"].as_str().unwrap() {
        "vmx" => {
            let mut text = ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"hostile\"\n".to_string();
            for d in f["disks"].as_array().unwrap() {
                let (dev, file) = (d[0].as_str().unwrap(), subst(d[1].as_str().unwrap()));
                text.push_str(&format!("{dev}.present = \"TRUE\"\n{dev}.fileName = \"{file}\"\n"));
            }
            fs::write(&path, text).unwrap();
        }
        "ovf" => {
            let disks: Vec<(String, String, u64)> = f["disks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| (subst(d[1].as_str().unwrap()), d[0].as_str().unwrap().to_string(), 1 << 20))
                .collect();
            fs::write(&path, images::ovf_text("hostile", 1, 512, "bios", &disks)).unwrap();
        }
        "vmdk-descriptor" => {
            let extent = subst(f["extent"].as_str().unwrap());
            fs::write(&path, format!("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 2048 FLAT \"{extent}\" 0\n")).unwrap();
        }
        "symlink" => std::os::unix::fs::symlink(subst(f["target"].as_str().unwrap()), &path).unwrap(),
        "fifo" => mknod(&path, rustix::fs::FileType::Fifo, 0),
        "chardev" => mknod(&path, rustix::fs::FileType::CharacterDevice, rustix::fs::makedev(1, 3)),
        "text-512" => {
            // Text, 1 MiB long (a multiple of 512 bytes, like a raw disk).
            let mut t = f["text"].as_str().unwrap().repeat((1 << 20) / f["text"].as_str().unwrap().len() + 1);
            t.truncate(1 << 20);
            fs::write(&path, t).unwrap();
        }
        "gzip-ova" => {
            let raw = dir.join("g.raw");
            fs::write(&raw, images::pattern(3, 1 << 20)).unwrap();
            let made = images::ova(dir, "g", &[&raw]);
            let out = Command::new("gzip").arg("-c").arg(&made).output().expect("gzip");
            assert!(out.status.success());
            fs::write(&path, out.stdout).unwrap();
        }
        "qcow2-luks" => {
            images::qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                "secret,id=s0,data=passphrase",
                "-o",
                "encrypt.format=luks,encrypt.key-secret=s0",
                &s(&path),
                "1M",
            ]);
        }
        "vhdx-parent" => {
            images::qemu_img(&["create", "-q", "-f", "vhdx", &s(&path), "8M"]);
            images::vhdx_set_has_parent(&path);
        }
        "vmdk-parent-hint" => {
            let base = dir.join("base.vmdk");
            images::qemu_img(&["create", "-q", "-f", "vmdk", &s(&base), "1M"]);
            images::qemu_img(&["create", "-q", "-f", "vmdk", "-b", &s(&base), "-F", "vmdk", &s(&path)]);
            // Keep the parent's file name but claim no parent CID: qemu would still open the parent.
            let mut bytes = fs::read(&path).unwrap();
            let at = bytes.windows(10).position(|w| w == b"parentCID=").expect("parentCID in the descriptor") + 10;
            bytes[at..at + 8].copy_from_slice(b"ffffffff");
            fs::write(&path, bytes).unwrap();
        }
        "ova" => ova(dir, &path, f),
        other => panic!("unknown file kind {other}"),
    }
}

#[test]
fn every_hostile_vm_is_refused_up_front_and_nothing_outside_is_opened() {
    let corpus: Vec<serde_json::Value> = serde_json::from_slice(
        &fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/hostile/exporter.json")).unwrap(),
    )
    .unwrap();
    assert!(corpus.len() >= 20, "the exporter corpus must hold at least 20 cases");
    let farm = Farm::new();
    let outside = farm.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret.raw");
    fs::write(&secret, images::pattern(99, 1 << 20)).unwrap();
    let mut cases: Vec<(PathBuf, serde_json::Value)> = Vec::new();
    for case in &corpus {
        let dir = farm.src.join(case["name"].as_str().unwrap());
        fs::create_dir_all(&dir).unwrap();
        for f in case["files"].as_array().unwrap() {
            make(&dir, &outside, f);
        }
        cases.push((dir, case.clone()));
    }

    let touched: Arc<Mutex<Vec<String>>> = Arc::default();
    let t2 = touched.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(e) = res {
            t2.lock().unwrap().push(format!("{:?} {:?}", e.kind, e.paths));
        }
    })
    .unwrap();
    watcher.watch(&outside, notify::RecursiveMode::NonRecursive).unwrap();
    drop(fs::File::open(&secret).unwrap());
    wait_for("the watch to see a control open", Duration::from_secs(5), || {
        (!touched.lock().unwrap().is_empty()).then_some(())
    });
    touched.lock().unwrap().clear();

    let mut problems = Vec::new();
    for (dir, case) in &cases {
        let name = case["name"].as_str().unwrap();
        let vm = dir.join(case["vm"].as_str().unwrap());
        let args: Vec<String> = vec![
            "--vm".into(),
            vm.to_str().unwrap().into(),
            "--output".into(),
            farm.queue.display().to_string(),
            "--quiet".into(),
        ];
        // A FIFO that blocked the exporter would end here with "ran longer than".
        let ran = Run::new(&bin("hyperexport"), &args).timeout(Duration::from_secs(30)).run();
        let err = ran.stderr();
        let expect = case["expect"].as_str().unwrap();
        if ran.code() != Some(3) {
            problems.push(format!("{name}: exit {:?}, expected 3: {err}", ran.code()));
        } else if !err.contains(expect) {
            problems.push(format!("{name}: the message does not say {expect:?}: {err}"));
        }
        if let Some(b) = ran.output.stderr.iter().find(|&&b| b == 0x1b || b == 0x07) {
            problems.push(format!("{name}: a raw control byte {b:#x} reached the terminal: {err:?}"));
        }
        if err.contains('\u{9b}') {
            problems.push(format!("{name}: a raw C1 control reached the terminal: {err:?}"));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(watcher);
    assert!(problems.is_empty(), "{} case(s) wrong:\n{}", problems.len(), problems.join("\n"));
    let touched = touched.lock().unwrap().clone();
    assert!(touched.is_empty(), "files outside the VMs were opened or changed: {touched:?}");
    assert!(farm.jobs_in("queued").is_empty(), "nothing was published: {:?}", farm.jobs_in("queued"));
    assert!(farm.jobs_in("tmp").is_empty(), "no staging left behind: {:?}", farm.jobs_in("tmp"));
    eprintln!("exporter corpus: {} hostile VMs, each refused with exit 3 and its message", corpus.len());
}

/// A disk written to while it is exported: the copy and its digest would disagree, so the export is
/// refused (exit 3) instead of publishing a job the agent would call corrupt.
#[test]
fn a_disk_written_during_the_export_is_refused() {
    let farm = Farm::new();
    let disk = images::raw_disk(&farm.src.join("busy.raw"), 256 << 20, &[(0, 128 << 20)], 8);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all_at(&n.to_le_bytes(), (n % 1000) * 4096).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let args: Vec<String> =
        vec!["--vm".into(), disk.display().to_string(), "--output".into(), farm.queue.display().to_string()];
    let ran = Run::new(&bin("hyperexport"), &args).run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    ran.expect_code(3);
    assert!(ran.stderr().contains("changed while it was being exported"), "{}", ran.stderr());
    assert!(farm.jobs_in("queued").is_empty(), "nothing was published");

    // A disk that shrinks under the copy: the same refusal, not an I/O error (exit 6). The exporter
    // stops itself once the job is staged, the disk is truncated, and it goes on.
    let disk = images::raw_disk(&farm.src.join("shrinking.raw"), 64 << 20, &[(0, 64 << 20)], 9);
    let (child, desc) = Run::new(
        &bin("hyperexport"),
        &["--vm".into(), disk.display().to_string(), "--output".into(), farm.queue.display().to_string()],
    )
    .env("HYPERFARM_FAILPOINT", "stop:export.staged")
    .spawn();
    let pid = child.id();
    hyperfarm_tests::wait_stopped(pid, Duration::from_secs(20));
    fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 << 20).unwrap();
    hyperfarm_tests::cont(pid);
    let ran = hyperfarm_tests::collect(child, desc, Duration::from_secs(60));
    ran.expect_code(3);
    assert!(ran.stderr().contains("size changed"), "{}", ran.stderr());
    assert!(farm.jobs_in("queued").is_empty(), "nothing was published");
}

/// A huge sparse disk is bounded by --max-disk-size before a byte is copied.
#[test]
fn a_disk_larger_than_the_configured_bound_is_refused_up_front() {
    let farm = Farm::new();
    let disk = farm.src.join("huge.raw");
    fs::File::create(&disk).unwrap().set_len(2 << 30).unwrap();
    let args: Vec<String> = vec![
        "--vm".into(),
        disk.display().to_string(),
        "--output".into(),
        farm.queue.display().to_string(),
        "--max-disk-size".into(),
        "1G".into(),
    ];
    let ran = Run::new(&bin("hyperexport"), &args).run();
    ran.expect_code(3);
    assert!(ran.stderr().contains("more than --max-disk-size"), "{}", ran.stderr());
    assert!(farm.jobs_in("queued").is_empty() && farm.jobs_in("tmp").is_empty());
}
