//! The hostile-input corpus (`tests/data/hostile/cases.json`): malformed and hostile jobs planted
//! straight into the queue. Each must end with a clear `.error` naming the job; the agent must
//! keep serving; nothing outside the queue and output directories may be opened (watched with
//! inotify) or written.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::Watcher;

use hyperfarm_shared::JobId;
use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, wait_for};

struct Env {
    data: Vec<u8>,
    outside: PathBuf,
    secret: PathBuf,
    secret_json: PathBuf,
    secret_data: PathBuf,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn make_file(env: &Env, dir: &Path, f: &serde_json::Value) -> Option<u64> {
    let path = dir.join(f["path"].as_str().unwrap());
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let subst = |t: &str| {
        t.replace("@SECRET_JSON", &s(&env.secret_json))
            .replace("@SECRET", &s(&env.secret))
            .replace("@OUTSIDE", &s(&env.outside))
    };
    let raw = dir.join(".src.raw");
    match f["kind"].as_str().unwrap() {
        "data" => fs::write(&path, &env.data).unwrap(),
        "qcow2" => {
            fs::write(&raw, &env.data).unwrap();
            images::convert(&raw, &path, "qcow2", None);
        }
        "truncated-vmdk" => {
            fs::write(&raw, &env.data).unwrap();
            images::convert(&raw, &path, "vmdk", None);
            let len = fs::metadata(&path).unwrap().len();
            fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len * 6 / 10).unwrap();
        }
        "qcow2-backing" => {
            images::qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                &s(&env.secret),
                "-F",
                "raw",
                &s(&path),
                "4M",
            ]);
        }
        "qcow2-datafile" => {
            images::qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file={},data_file_raw=on", s(&env.secret_data)),
                &s(&path),
                "4M",
            ]);
        }
        "vmdk-descriptor" => {
            let extent = f["extent"].as_str().unwrap();
            fs::write(&path, format!("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8192 FLAT \"{extent}\" 0\n")).unwrap();
        }
        "text" => fs::write(&path, subst(f["text"].as_str().unwrap())).unwrap(),
        "symlink" => std::os::unix::fs::symlink(subst(f["target"].as_str().unwrap()), &path).unwrap(),
        "fifo" => rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap(),
        "chardev" => rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o600),
            rustix::fs::makedev(1, 3),
        )
        .expect("mknod needs root (CI runs the tests as root)"),
        "dir" => fs::create_dir_all(&path).unwrap(),
        other => panic!("unknown file kind {other}"),
    }
    let _ = fs::remove_file(&raw);
    fs::symlink_metadata(&path).ok().map(|m| m.len())
}

/// Plant one case as a queued job; returns its id.
fn plant(farm: &Farm, env: &Env, case: &serde_json::Value) -> String {
    let id = JobId::new().to_string();
    let tmp = farm.queue.join("tmp").join(&id);
    fs::create_dir_all(tmp.join("disks")).unwrap();
    let mut first_size = None;
    let mut qcow2_size = None;
    for f in case["files"].as_array().unwrap() {
        let size = make_file(env, &tmp, f);
        first_size = first_size.or(size);
        if f["kind"] == "qcow2" {
            qcow2_size = size;
        }
    }
    let size = env.data.len() as u64;
    let text: Option<Vec<u8>> = if let Some(t) = case.get("manifest_text").and_then(|t| t.as_str()) {
        Some(t.as_bytes().to_vec())
    } else if let Some(h) = case.get("manifest_hex").and_then(|t| t.as_str()) {
        Some(unhex(h))
    } else if case["manifest"].is_null() {
        None
    } else {
        let mut m = case["manifest"].clone();
        if let Some(n) = case.get("pad_manifest_bytes").and_then(|n| n.as_u64()) {
            m["metadata"] = serde_json::json!({ "pad": "x".repeat(n as usize) });
        }
        let s = serde_json::to_string(&m).unwrap();
        let s = s
            .replace("\"@SIZE+512\"", &(size + 512).to_string())
            .replace("\"@SIZE\"", &size.to_string())
            .replace("\"@QCOW2SIZE\"", &qcow2_size.unwrap_or(0).to_string())
            .replace("\"@FILESIZE\"", &first_size.unwrap_or(0).to_string())
            .replace("@JOBID", &id)
            .replace("@SECRET_JSON", env.secret_json.to_str().unwrap())
            .replace("@SECRET", env.secret.to_str().unwrap())
            .replace("@OUTSIDE", env.outside.to_str().unwrap());
        Some(s.into_bytes())
    };
    if let Some(t) = text {
        fs::write(tmp.join("manifest.json"), t).unwrap();
    }
    fs::rename(&tmp, farm.queue.join("queued").join(&id)).unwrap();
    id
}

fn listing_outside(farm: &Farm) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for line in farm.listing().lines() {
        let (path, size) = line.rsplit_once(' ').unwrap();
        if path.starts_with("queue") || path.starts_with("output") || path.ends_with(".log") {
            continue;
        }
        out.push((path.to_string(), size.parse().unwrap_or(0)));
    }
    out
}

#[test]
fn every_hostile_job_fails_clearly_and_nothing_outside_is_touched() {
    let corpus: Vec<serde_json::Value> = serde_json::from_slice(
        &fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/hostile/cases.json")).unwrap(),
    )
    .unwrap();
    assert!(corpus.len() >= 30, "the corpus must hold at least 30 cases");
    let farm = Farm::new();
    fs::create_dir_all(farm.queue.join("queued")).unwrap();
    fs::create_dir_all(farm.queue.join("tmp")).unwrap();
    let outside = farm.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    let data = images::pattern(97, 4 << 20);
    let env = Env {
        secret: outside.join("secret.raw"),
        secret_json: outside.join("secret.json"),
        secret_data: outside.join("secret-data.raw"),
        outside: outside.clone(),
        data: data.clone(),
    };
    fs::write(&env.secret, &data).unwrap();
    fs::write(&env.secret_json, format!(r#"{{"manifest_version":"1.0","source":{{"vm_name":"stolen"}},"disks":[{{"id":"d0","source_format":"raw","bytes":{},"local_path":"{}"}}]}}"#, data.len(), env.secret.display())).unwrap();
    let mut planted = Vec::new();
    for case in &corpus {
        planted.push((plant(&farm, &env, case), case.clone()));
    }
    let good = plant(
        &farm,
        &env,
        &serde_json::json!({"name": "good", "manifest": {"manifest_version": "1.0", "source": {"vm_name": "good"},
        "disks": [{"id": "d0", "source_format": "raw", "bytes": "@SIZE", "local_path": "disks/d0.raw"}],
        "hyperfarm": {"schema_version": 1, "job_id": "@JOBID"}}, "files": [{"path": "disks/d0.raw", "kind": "data"}]}),
    );
    let before = listing_outside(&farm);

    // Watch the files outside for any open or access while the agent works.
    let touched: Arc<Mutex<Vec<String>>> = Arc::default();
    let t2 = touched.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(e) = res
            && matches!(
                e.kind,
                notify::EventKind::Access(_)
                    | notify::EventKind::Modify(_)
                    | notify::EventKind::Create(_)
                    | notify::EventKind::Remove(_)
            )
        {
            t2.lock().unwrap().push(format!("{:?} {:?}", e.kind, e.paths));
        }
    })
    .unwrap();
    watcher.watch(&outside, notify::RecursiveMode::NonRecursive).unwrap();
    // Positive control: the watch does see an open.
    drop(fs::File::open(&env.secret).unwrap());
    wait_for("the watch to see a control open", Duration::from_secs(5), || {
        (!touched.lock().unwrap().is_empty()).then_some(())
    });
    touched.lock().unwrap().clear();

    let agent = farm.agent(&[]);
    let total = corpus.len() + 1;
    wait_for("every result", Duration::from_secs(300), || (farm.records().len() == total).then_some(()));
    std::thread::sleep(Duration::from_millis(200));
    drop(watcher);
    let records = farm.records();
    let by_id = |id: &str| records.iter().find(|r| r["job_id"] == id).cloned().unwrap();
    let mut problems = Vec::new();
    for (id, case) in &planted {
        let r = by_id(id);
        let name = case["name"].as_str().unwrap();
        let expect = case["expect"].as_str().unwrap();
        let err = r["error"].as_str().unwrap_or_default();
        if r["state"] != "failed" {
            problems.push(format!("{name}: state {}", r["state"]));
        } else if !err.contains(expect) {
            problems.push(format!("{name}: error does not mention {expect:?}: {err}"));
        } else if !err.contains(id.as_str()) {
            problems.push(format!("{name}: error does not name the job: {err}"));
        }
    }
    assert!(problems.is_empty(), "{} case(s) wrong:\n{}", problems.len(), problems.join("\n"));
    assert_eq!(by_id(&good)["state"], "done", "the agent kept serving");
    assert_identical(&env.secret, &farm.output.join("good.qcow2"));
    let qcow2s = fs::read_dir(&farm.output)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".qcow2"))
        .count();
    assert_eq!(qcow2s, 1, "only the good job produced a disk");
    let touched = touched.lock().unwrap().clone();
    assert!(touched.is_empty(), "files outside the queue were opened or changed: {touched:?}");
    assert_eq!(listing_outside(&farm), before, "nothing was written outside the queue and output directories");
    assert!(agent.log_text().contains("ready"));
    eprintln!("hostile corpus: {} cases, each failed with its expected message; nothing outside touched", corpus.len());
}
