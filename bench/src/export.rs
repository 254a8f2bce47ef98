//! Export: one pass that copies and hashes, against `cp` and `cp` + `b3sum`; a sparse disk
//! against a dense one holding the same data.

use std::path::Path;
use std::process::Command;

use crate::util::{self, Ctx, Report};

fn export(ctx: &Ctx, vm: &Path, queue: &Path, cache: &Path) -> String {
    let out = Command::new(ctx.bin("hyperexport"))
        .env("HYPERFARM_CACHE_DIR", cache)
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

    let have_b3sum = Command::new("b3sum").arg("--version").output().is_ok_and(|o| o.status.success());
    let warm_cache = d.join("cache-warm");
    let mut dense_digests = Vec::new();
    let (mut rm1, mut rm2, mut rm3, mut clear) = (rm, rm, rm, clear_queue);
    let (mut cp_run, mut cp_sync_run, mut cp_b3_run) = (
        || util::run(Command::new("cp").arg(&dense).arg(&copy)),
        || {
            util::run(Command::new("cp").arg(&dense).arg(&copy));
            util::run(Command::new("sync").arg(&copy));
        },
        || {
            util::run(Command::new("cp").arg(&dense).arg(&copy));
            if have_b3sum {
                util::run(Command::new("b3sum").arg(&copy));
            }
        },
    );
    let mut ours_run = || {
        let id = export(ctx, &dense, &queue, &warm_cache);
        dense_digests.push(blake3_of_job(&queue, &id));
    };
    // Cold page cache: the source is read from the disk, as a VM's files are in production.
    let cold_pages = util::drop_caches();
    let mut dense_cold_digests = Vec::new();
    let mut cold_setup_cp = || {
        rm();
        util::drop_caches();
    };
    let mut cold_setup_ours = || {
        clear_queue();
        util::drop_caches();
    };
    let mut cp_cold_run = || {
        if cold_pages {
            util::run(Command::new("cp").arg(&dense).arg(&copy));
        }
    };
    let mut ours_cold_run = || {
        if cold_pages {
            let id = export(ctx, &dense, &queue, &warm_cache);
            dense_cold_digests.push(blake3_of_job(&queue, &id));
        }
    };
    let t = util::interleave(
        ctx.runs,
        &mut [
            (&mut rm1, &mut cp_run),
            (&mut rm2, &mut cp_sync_run),
            (&mut rm3, &mut cp_b3_run),
            (&mut clear, &mut ours_run),
            (&mut cold_setup_cp, &mut cp_cold_run),
            (&mut cold_setup_ours, &mut ours_cold_run),
        ],
    );
    let (cp, cp_sync, cp_b3, ours, cp_cold, ours_cold) = (t[0], t[1], t[2], t[3], t[4], t[5]);
    let cp_b3 = have_b3sum.then_some(cp_b3);
    // Sparse: with a cold cache of zero subtrees (a fresh one each run), and warm (the same one,
    // filled by a first untimed run: a farm exporting VMs of the same layout).
    let (mut sparse_digests, mut sparse_cold_digests) = (Vec::new(), Vec::new());
    let cold_dirs: Vec<_> = (0..ctx.runs).map(|i| d.join(format!("cache-cold-{i}"))).collect();
    let mut cold_i = 0;
    let mut clear2 = clear_queue;
    let mut cold_run = || {
        let id = export(ctx, &sparse, &queue, &cold_dirs[cold_i % cold_dirs.len()]);
        sparse_cold_digests.push(blake3_of_job(&queue, &id));
        cold_i += 1;
    };
    clear_queue();
    export(ctx, &sparse, &queue, &warm_cache);
    let mut clear3 = clear_queue;
    let mut warm_run = || {
        let id = export(ctx, &sparse, &queue, &warm_cache);
        sparse_digests.push(blake3_of_job(&queue, &id));
    };
    // The floor for a first layout: b3sum of the whole sparse file (it must hash every zero too).
    let mut nothing = || {};
    let mut b3_sparse_run = || {
        if have_b3sum {
            util::run(Command::new("b3sum").arg(&sparse));
        }
    };
    let t = util::interleave(
        ctx.runs,
        &mut [(&mut clear2, &mut cold_run), (&mut clear3, &mut warm_run), (&mut nothing, &mut b3_sparse_run)],
    );
    let (sparse_cold, sparse_time, b3_sparse) = (t[0], t[1], t[2]);
    // Untimed: one more export of each disk, and its copy in the queue checked byte for byte.
    for (file, data) in [(&dense, dense_size), (&sparse, dense_size)] {
        clear_queue();
        let id = export(ctx, file, &queue, &warm_cache);
        let disks = queue.join("queued").join(&id).join("disks");
        let copy = std::fs::read_dir(&disks).expect("disks").next().expect("one disk").expect("entry").path();
        let (src, dst) = (std::fs::metadata(file).expect("source"), std::fs::metadata(&copy).expect("copy"));
        assert_eq!(src.len(), dst.len(), "the copy of {} has another length", file.display());
        use std::os::unix::fs::MetadataExt;
        let allocated = dst.blocks() * 512;
        assert!(
            allocated <= data + (16 << 20),
            "the copy of {} holding {data} bytes of data allocates {allocated} bytes: holes were written",
            file.display()
        );
        if have_b3sum {
            let b3 = util::run_out("b3sum", &[copy.to_str().expect("utf8")]);
            let theirs = b3.split_whitespace().next().unwrap_or_default();
            assert_eq!(theirs, blake3_of_job(&queue, &id), "the copy of {} differs from its digest", file.display());
        }
    }
    if have_b3sum {
        for (file, ours) in [
            (&dense, &dense_digests),
            (&sparse, &sparse_digests),
            (&dense, &dense_cold_digests),
            (&sparse, &sparse_cold_digests),
        ] {
            let b3 = util::run_out("b3sum", &[file.to_str().expect("utf8")]);
            let theirs = b3.split_whitespace().next().unwrap_or_default();
            for d in ours.iter() {
                assert_eq!(theirs, d, "hyperexport's digest of {} differs from b3sum's", file.display());
            }
        }
        println!(
            "  digests: every run's identical to b3sum of the source; the queued copies hash the same, have the source's length and keep its holes"
        );
    } else {
        println!(
            "  (b3sum is not installed: the cp + b3sum baseline and the digest cross-check are skipped; apt-get install b3sum)"
        );
    }
    report.versus("export dense", ours, "cp", cp, "<= 1.10x cp", Some(1.10));
    report.versus("export dense", ours, "cp+sync", cp_sync, "(durable baseline)", None);
    if let Some(t) = cp_b3 {
        report.versus("export dense", ours, "cp+b3sum", t, "(info)", None);
    }
    if cold_pages {
        report.versus("export dense, cold page cache", ours_cold, "cp", cp_cold, "<= 1.10x cp", Some(1.10));
    } else {
        println!("  (cannot drop the page cache (not root): the cold-page-cache rows are skipped)");
    }
    let cold = "export sparse, cold zero cache";
    report.versus(cold, sparse_cold, "dense export", ours, "<= 1.5x dense", Some(1.5));
    if have_b3sum {
        report.versus(cold, sparse_cold, "b3sum of it", b3_sparse, "(floor: hash every zero)", None);
    }
    report.versus("export sparse, warm zero cache", sparse_time, "dense export", ours, "<= 1.5x dense", Some(1.5));
    let _ = std::fs::remove_dir_all(&d);
}
