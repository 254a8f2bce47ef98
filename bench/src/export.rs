//! Export: one pass that copies and hashes, against `cp` and `cp` + `b3sum`; a sparse disk
//! against a dense one holding the same data.

use std::path::Path;
use std::process::Command;

use crate::util::{self, Ctx, Report};

fn export(ctx: &Ctx, vm: &Path, queue: &Path) -> String {
    let out = Command::new(ctx.bin("hyperexport"))
        .args(["--quiet", "--json", "--vm"])
        .arg(vm)
        .arg("--output")
        .arg(queue)
        .output()
        .expect("hyperexport");
    assert!(out.status.success(), "hyperexport failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["job_id"].as_str().expect("id").to_string()
}

fn blake3_of_job(queue: &Path, id: &str) -> String {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(queue.join("queued").join(id).join("manifest.json")).expect("manifest"))
            .expect("json");
    m["disks"][0]["blake3"].as_str().expect("blake3").to_string()
}

pub fn run(ctx: &Ctx, report: &mut Report) {
    let gib: u64 = 1 << 30;
    let (dense_size, sparse_size) = if ctx.quick { (gib / 4, 4 * gib) } else { (gib, 16 * gib) };
    println!(
        "== export: {} dense disk; {} sparse disk holding {} (hyperexport --output QUEUE: copy + blake3 + fsync + publish)",
        hyperfarm_shared::human::bytes(dense_size),
        hyperfarm_shared::human::bytes(sparse_size),
        hyperfarm_shared::human::bytes(dense_size)
    );
    let d = ctx.sub("export");
    let dense = d.join("dense.raw");
    let sparse = d.join("sparse.raw");
    util::make_file(&dense, dense_size, &[(0, dense_size)]);
    let pieces = 16u64;
    let piece = dense_size / pieces;
    let stride = sparse_size / pieces;
    let regions: Vec<(u64, u64)> = (0..pieces).map(|i| (i * stride, piece)).collect();
    util::make_file(&sparse, sparse_size, &regions);
    let copy = d.join("copy.raw");
    let queue = d.join("queue");
    let rm = || {
        let _ = std::fs::remove_file(&copy);
    };
    let clear_queue = || {
        let _ = std::fs::remove_dir_all(&queue);
        std::fs::create_dir_all(&queue).expect("queue");
    };

    let cp = util::time(ctx.runs, rm, || util::run(Command::new("cp").arg(&dense).arg(&copy)));
    let cp_sync = util::time(ctx.runs, rm, || {
        util::run(Command::new("cp").arg(&dense).arg(&copy));
        util::run(Command::new("sync").arg(&copy));
    });
    let have_b3sum = Command::new("b3sum").arg("--version").output().is_ok_and(|o| o.status.success());
    let cp_b3 = have_b3sum.then(|| {
        util::time(ctx.runs, rm, || {
            util::run(Command::new("cp").arg(&dense).arg(&copy));
            util::run(Command::new("b3sum").arg(&copy));
        })
    });
    let mut id = String::new();
    let ours = util::time(ctx.runs, clear_queue, || id = export(ctx, &dense, &queue));
    let dense_digest = blake3_of_job(&queue, &id);
    let sparse_time = util::time(ctx.runs, clear_queue, || id = export(ctx, &sparse, &queue));
    let sparse_digest = blake3_of_job(&queue, &id);
    if have_b3sum {
        for (file, ours) in [(&dense, &dense_digest), (&sparse, &sparse_digest)] {
            let b3 = util::run_out("b3sum", &[file.to_str().expect("utf8")]);
            let theirs = b3.split_whitespace().next().unwrap_or_default();
            assert_eq!(theirs, ours, "hyperexport's digest of {} differs from b3sum's", file.display());
        }
        println!("  digests: identical to b3sum for the dense and the sparse disk");
    }
    let r = ours.as_secs_f64() / cp.as_secs_f64();
    report.add(
        "export dense",
        util::secs(ours),
        format!("cp {}", util::secs(cp)),
        Some(r),
        "<= 1.10x cp",
        Some(r <= 1.10),
    );
    report.add(
        "export dense",
        util::secs(ours),
        format!("cp+sync {}", util::secs(cp_sync)),
        Some(ours.as_secs_f64() / cp_sync.as_secs_f64()),
        "(durable baseline)",
        None,
    );
    match cp_b3 {
        Some(t) => report.add(
            "export dense",
            util::secs(ours),
            format!("cp+b3sum {}", util::secs(t)),
            Some(ours.as_secs_f64() / t.as_secs_f64()),
            "(info)",
            None,
        ),
        None => println!("  (b3sum is not installed: the cp + b3sum baseline is skipped; apt-get install b3sum)"),
    }
    let rs = sparse_time.as_secs_f64() / ours.as_secs_f64();
    report.add(
        "export sparse",
        util::secs(sparse_time),
        format!("dense export {}", util::secs(ours)),
        Some(rs),
        "<= 1.5x dense",
        Some(rs <= 1.5),
    );
    let _ = std::fs::remove_dir_all(&d);
}
