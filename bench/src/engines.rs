//! The same conversion through bare `qemu-img convert`, the agent's qemu-img engine, bare
//! `hyper2kvm --manifest` and the agent's hyper2kvm engine.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyperfarm_shared::JobId;
use hyperfarm_shared::digest;
use hyperfarm_shared::manifest::{Disk, HyperfarmInfo, Manifest, Source};
use hyperfarm_shared::queue::{Queue, Staging};
use hyperfarm_shared::results::OutputDir;

use crate::util::{self, Agent, Ctx, Report};

/// Stage a job holding a copy of `disk` (untimed) and return it ready to publish.
pub fn stage(queue: &Queue, disk: &Path, blake3: &str, vm: &str) -> (JobId, Staging, Manifest) {
    let id = JobId::new();
    let st = Staging::create(queue, id).expect("staging");
    let bytes = std::fs::metadata(disk).expect("disk").len();
    util::run(Command::new("cp").arg("--sparse=always").arg(disk).arg(st.disk_path("d0.raw")));
    std::fs::File::open(st.disk_path("d0.raw")).expect("open").sync_all().expect("sync");
    let m = Manifest {
        manifest_version: "1.0".into(),
        source: Some(Source {
            provider: Some("bench".into()),
            vm_id: None,
            vm_name: Some(vm.into()),
            extra: Default::default(),
        }),
        vm: None,
        disks: vec![Disk {
            id: "d0".into(),
            source_format: "raw".into(),
            bytes,
            local_path: "disks/d0.raw".into(),
            checksum: None,
            boot_order_hint: Some(0),
            disk_type: Some("boot".into()),
            label: None,
            blake3: Some(blake3.into()),
            extra: Default::default(),
        }],
        pipeline: None,
        output: None,
        metadata: None,
        hyperfarm: Some(HyperfarmInfo {
            schema_version: 1,
            job_id: id,
            created_at: None,
            submitted_by: None,
            memory_mib: None,
            extra: Default::default(),
        }),
        extra: Default::default(),
    };
    (id, st, m)
}

/// Time from publication to the result record, through a running agent.
fn agent_runs(ctx: &Ctx, dir: &Path, disk: &Path, b3: &str, engine_args: &[&str]) -> Duration {
    let queue_dir = dir.join("queue");
    let out_dir = dir.join("output");
    for d in [&queue_dir, &out_dir] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let queue = Queue::new(&queue_dir);
    queue.init().expect("init");
    let out = OutputDir::new(&out_dir);
    let _agent = Agent::start(ctx, &queue_dir, &out_dir, engine_args);
    let mut times = Vec::new();
    for i in 0..ctx.runs {
        let (id, st, m) = stage(&queue, disk, b3, &format!("bench-{i}"));
        util::sync_all();
        let t = Instant::now();

        st.publish(&m).expect("publish");
        let done = util::until(Duration::from_secs(600), Duration::from_millis(2), || out.record_path(&id).exists());
        assert!(done, "no result for job {id}");
        times.push(t.elapsed());
        let rec = out.read_record(&id).expect("record").expect("some");
        assert_eq!(rec.state, hyperfarm_shared::results::ResultState::Done, "{:?}", rec.error);
        let _ = std::fs::remove_file(out_dir.join(format!("bench-{i}.qcow2")));
    }
    util::median(&mut times)
}

fn h2k_manifest(dir: &Path, disk: &Path, bytes: u64) -> PathBuf {
    let m = serde_json::json!({
        "manifest_version": "1.0",
        "source": {"provider": "bench", "vm_name": "bare"},
        "disks": [{"id": "d0", "source_format": "raw", "bytes": bytes, "local_path": disk}],
        "pipeline": {"convert": {"enabled": true}},
        "output": {"directory": dir.join("h2k-out"), "format": "qcow2"},
    });
    let p = dir.join("h2k-manifest.json");
    std::fs::write(&p, m.to_string()).expect("manifest");
    p
}

pub fn run(ctx: &Ctx, report: &mut Report) {
    let gib: u64 = 1 << 30;
    let (size, data) = if ctx.quick { (gib / 4, gib / 8) } else { (gib, gib / 2) };
    println!(
        "\n== engines: a raw disk of {} with {} of data, converted to qcow2",
        hyperfarm_shared::human::bytes(size),
        hyperfarm_shared::human::bytes(data)
    );
    let d = ctx.sub("engines");
    let disk = d.join("src.raw");
    util::make_file(&disk, size, &[(0, data / 2), (size / 2, data / 2)]);
    let mut h = blake3::Hasher::new();
    digest::hash_file(&std::fs::File::open(&disk).expect("open"), &mut h, |_| true).expect("hash");
    let b3 = h.finalize().to_hex().to_string();
    let out = d.join("bare.qcow2");
    let rm = || {
        let _ = std::fs::remove_file(&out);
    };
    let bare = util::time(ctx.runs, rm, || {
        util::run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&disk).arg(&out));
    });
    let bare_sync = util::time(ctx.runs, rm, || {
        util::run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&disk).arg(&out));
        util::run(Command::new("sync").arg(&out));
    });
    let agent_q = agent_runs(ctx, &d, &disk, &b3, &["--engine", "qemu-img"]);
    let r = agent_q.as_secs_f64() / bare.as_secs_f64();
    report.add(
        "agent (qemu-img)",
        util::secs(agent_q),
        format!("qemu-img convert {}", util::secs(bare)),
        Some(r),
        "<= 1.05x qemu-img",
        Some(r <= 1.05),
    );
    report.add(
        "agent (qemu-img)",
        util::secs(agent_q),
        format!("convert+sync {}", util::secs(bare_sync)),
        Some(agent_q.as_secs_f64() / bare_sync.as_secs_f64()),
        "(durable baseline)",
        None,
    );
    match &ctx.hyper2kvm {
        Some(h2k) => {
            let bytes = std::fs::metadata(&disk).expect("disk").len();
            let manifest = h2k_manifest(&d, &disk, bytes);
            let bare_h2k = util::time(
                ctx.runs,
                || {
                    let _ = std::fs::remove_dir_all(d.join("h2k-out"));
                },
                || util::run(Command::new(h2k).arg("--manifest").arg(&manifest).current_dir(&d)),
            );
            let h2k_path = h2k.display().to_string();
            let agent_h = agent_runs(ctx, &d, &disk, &b3, &["--engine", "hyper2kvm", "--hyper2kvm-path", &h2k_path]);
            report.add(
                "hyper2kvm one-shot",
                util::secs(bare_h2k),
                format!("qemu-img convert {}", util::secs(bare)),
                Some(bare_h2k.as_secs_f64() / bare.as_secs_f64()),
                "(info)",
                None,
            );
            report.add(
                "agent (hyper2kvm)",
                util::secs(agent_h),
                format!("hyper2kvm one-shot {}", util::secs(bare_h2k)),
                Some(agent_h.as_secs_f64() / bare_h2k.as_secs_f64()),
                "(info)",
                None,
            );
            report.add(
                "agent (hyper2kvm)",
                util::secs(agent_h),
                format!("qemu-img convert {}", util::secs(bare)),
                Some(agent_h.as_secs_f64() / bare.as_secs_f64()),
                "(info)",
                None,
            );
        }
        None => println!("  (hyper2kvm not found: run scripts/setup-python or pass --hyper2kvm; its rows are skipped)"),
    }
    let _ = std::fs::remove_dir_all(&d);
}
