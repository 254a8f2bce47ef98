//! The same conversion through bare `qemu-img convert`, the agent's qemu-img engine, bare
//! `hyper2kvm --manifest` and the agent's hyper2kvm engine.

use std::cell::RefCell;
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

/// A running agent with its own queue, and a way to time one job through it.
struct Farm {
    queue: Queue,
    out: OutputDir,
    out_dir: PathBuf,
    _agent: Agent,
    n: usize,
}

impl Farm {
    fn start(ctx: &Ctx, dir: &Path, engine_args: &[&str]) -> Farm {
        let queue_dir = dir.join("queue");
        let out_dir = dir.join("output");
        for d in [&queue_dir, &out_dir] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let queue = Queue::new(&queue_dir);
        queue.init().expect("init");
        let agent = Agent::start(ctx, &queue_dir, &out_dir, engine_args);
        Farm { queue, out: OutputDir::new(&out_dir), out_dir, _agent: agent, n: 0 }
    }

    /// Stage (untimed) the next job of this farm, holding a copy of `disk`.
    fn stage_next(&self, disk: &Path, blake3: &str, prefix: &str) -> (JobId, Staging, Manifest) {
        stage(&self.queue, disk, blake3, &format!("{prefix}{}", self.n))
    }

    /// Publish a staged job and wait for its record: the time from publication to result.
    fn run(&mut self, staged: (JobId, Staging, Manifest)) -> Duration {
        let (id, st, m) = staged;
        let t = Instant::now();
        st.publish(&m).expect("publish");
        let done =
            util::until(Duration::from_secs(600), Duration::from_millis(2), || self.out.record_path(&id).exists());
        let took = t.elapsed();
        assert!(done, "no result for job {id}");
        let rec = self.out.read_record(&id).expect("record").expect("some");
        assert_eq!(rec.state, hyperfarm_shared::results::ResultState::Done, "{:?}", rec.error);
        // Untimed: let the agent finish the job (move it to done/, remove its disk copies) so that
        // its clean-up does not land in the next measurement.
        let done_dir = self.queue.job_dir(hyperfarm_shared::queue::State::Done, &id);
        util::until(Duration::from_secs(60), Duration::from_millis(5), || {
            done_dir.is_dir() && !done_dir.join("disks").exists()
        });
        for f in rec.files {
            let _ = std::fs::remove_file(self.out_dir.join(f.name));
        }
        self.n += 1;
        took
    }
}

fn h2k_manifest(dir: &Path, disk: &Path, bytes: u64) -> PathBuf {
    let m = serde_json::json!({
        "manifest_version": "1.0",
        "source": {"provider": "bench", "vm_name": "bare"},
        "disks": [{"id": "d0", "source_format": "raw", "bytes": bytes, "local_path": disk}],
        // The stages the agent asks for on the benchmark's jobs, spelt out as the agent does
        // (hyper2kvm's defaults for stages left out differ).
        "pipeline": {"inspect": {"enabled": false}, "fix": {"enabled": false},
                     "convert": {"enabled": true}, "validate": {"enabled": false}},
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
    // Before each bare run: remove the last output and read the source into the page cache (the
    // cold-cache cases below drop it), as the agent's staged copy is, having just been written.
    let rm = || {
        let _ = std::fs::remove_file(&out);
        let _ = std::io::copy(&mut std::fs::File::open(&disk).expect("open"), &mut std::io::sink());
    };
    let convert =
        || util::run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&disk).arg(&out));
    let farm_q = RefCell::new(Farm::start(ctx, &d.join("q"), &["--engine", "qemu-img", "--verify", "alongside"]));
    let farm_b = RefCell::new(Farm::start(ctx, &d.join("b"), &["--engine", "qemu-img", "--verify", "before"]));
    let h2k = ctx.hyper2kvm.clone();
    let h2k_path = h2k.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    let farm_h = RefCell::new(
        h2k.as_ref().map(|_| Farm::start(ctx, &d.join("h"), &["--engine", "hyper2kvm", "--hyper2kvm-path", &h2k_path])),
    );
    let bytes = std::fs::metadata(&disk).expect("disk").len();
    let manifest = h2k_manifest(&d, &disk, bytes);
    // The staging copy of each agent job is made (untimed) in the setup of its case.
    let staged_q = RefCell::new(None);
    let staged_h = RefCell::new(None);
    let staged_b = RefCell::new(None);
    // Cold: the same two agents, with the page cache dropped after staging (the source is read
    // from the disk, as from NFS in production). Only where the kernel lets us drop caches.
    let cold = util::drop_caches();
    let (staged_qc, staged_bc) = (RefCell::new(None), RefCell::new(None));
    let (mut t_qc, mut t_bc) = (Vec::new(), Vec::new());
    let mut setup_qc = || {
        if cold {
            *staged_qc.borrow_mut() = Some(farm_q.borrow().stage_next(&disk, &b3, "bench-q"));
            util::drop_caches();
        }
    };
    let mut setup_bc = || {
        if cold {
            *staged_bc.borrow_mut() = Some(farm_b.borrow().stage_next(&disk, &b3, "bench-b"));
            util::drop_caches();
        }
    };
    let mut run_qc = || {
        if let Some(s) = staged_qc.borrow_mut().take() {
            t_qc.push(farm_q.borrow_mut().run(s));
        }
    };
    let mut run_bc = || {
        if let Some(s) = staged_bc.borrow_mut().take() {
            t_bc.push(farm_b.borrow_mut().run(s));
        }
    };
    let mut setup_b = || {
        *staged_b.borrow_mut() = Some(farm_b.borrow().stage_next(&disk, &b3, "bench-b"));
    };
    let (mut rm1, mut rm2, mut rm3) = (rm, rm, rm);
    let mut setup_q = || {
        *staged_q.borrow_mut() = Some(farm_q.borrow().stage_next(&disk, &b3, "bench-q"));
    };
    let mut setup_h = || {
        if let Some(f) = farm_h.borrow().as_ref() {
            *staged_h.borrow_mut() = Some(f.stage_next(&disk, &b3, "bench-h"));
        }
    };
    let (mut t_q, mut t_h, mut t_b) = (Vec::new(), Vec::new(), Vec::new());
    let mut run_bare = || convert();
    let mut run_bare_sync = || {
        convert();
        util::run(Command::new("sync").arg(&out));
    };
    // What an engineer would do by hand for the same work: check the digest, convert, flush.
    let have_b3sum = Command::new("b3sum").arg("--version").output().is_ok_and(|o| o.status.success());
    let mut rm4 = rm;
    let mut run_by_hand = || {
        if have_b3sum {
            util::run(Command::new("b3sum").arg(&disk));
            convert();
            util::run(Command::new("sync").arg(&out));
        }
    };
    // The command the agent runs (same environment), so that the two runs differ only by the agent.
    let mut run_bare_h2k = || {
        if let Some(h) = &h2k {
            let _ = std::fs::remove_dir_all(d.join("h2k-out"));
            for dir in ["home", "tmp"] {
                std::fs::create_dir_all(d.join(dir)).expect("mkdir");
            }
            util::run(&mut hyperfarm_shared::engine::hyper2kvm::command(h, &manifest, &d));
        }
    };
    let mut run_q = || t_q.push(farm_q.borrow_mut().run(staged_q.borrow_mut().take().expect("staged")));
    let mut run_b = || t_b.push(farm_b.borrow_mut().run(staged_b.borrow_mut().take().expect("staged")));
    let mut run_h = || {
        if let (Some(f), Some(s)) = (farm_h.borrow_mut().as_mut(), staged_h.borrow_mut().take()) {
            t_h.push(f.run(s));
        }
    };
    let t = util::interleave(
        ctx.runs,
        &mut [
            (&mut rm1, &mut run_bare),
            (&mut rm2, &mut run_bare_sync),
            (&mut rm4, &mut run_by_hand),
            (&mut setup_q, &mut run_q),
            (&mut setup_b, &mut run_b),
            (&mut rm3, &mut run_bare_h2k),
            (&mut setup_h, &mut run_h),
            (&mut setup_qc, &mut run_qc),
            (&mut setup_bc, &mut run_bc),
        ],
    );
    let (bare, bare_sync, by_hand, bare_h2k) = (t[0], t[1], t[2], t[5]);
    let agent_q = util::median(&mut t_q);
    let agent_b = util::median(&mut t_b);
    let agent = "agent (qemu-img)";
    report.versus(agent, agent_q, "qemu-img convert", bare, "<= 1.05x qemu-img", Some(1.05));
    report.versus(agent, agent_q, "convert+sync", bare_sync, "(durable baseline)", None);
    if have_b3sum {
        report.versus(agent, agent_q, "b3sum+convert+sync", by_hand, "(same work by hand)", None);
    }
    // Met when the default (alongside) is not slower: before / alongside >= 1.
    report.add(
        "agent (qemu-img, verify before)",
        util::secs(agent_b),
        format!("verify alongside {}", util::secs(agent_q)),
        Some(agent_b.as_secs_f64() / agent_q.as_secs_f64()),
        "alongside <= before",
        Some(agent_q <= agent_b),
    );
    if cold {
        let (qc, bc) = (util::median(&mut t_qc), util::median(&mut t_bc));
        report.versus(
            "agent cold cache (verify before)",
            bc,
            "verify alongside",
            qc,
            "(info: source read from disk)",
            None,
        );
    } else {
        println!("  (cannot drop the page cache (not root): the cold-cache rows are skipped)");
    }
    if h2k.is_some() {
        let agent_h = util::median(&mut t_h);
        report.versus("hyper2kvm one-shot", bare_h2k, "qemu-img convert", bare, "(info)", None);
        report.versus("agent (hyper2kvm)", agent_h, "hyper2kvm one-shot", bare_h2k, "(info)", None);
    } else {
        println!("  (hyper2kvm not found: run scripts/setup-python or pass --hyper2kvm; its rows are skipped)");
    }
    let _ = std::fs::remove_dir_all(&d);
}
