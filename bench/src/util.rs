//! Timing, inputs, binaries and the final table.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Ctx {
    pub dir: PathBuf,
    pub quick: bool,
    pub runs: usize,
    pub bin: PathBuf,
    pub hyper2kvm: Option<PathBuf>,
}

impl Ctx {
    pub fn new(dir: &Path, quick: bool, runs: usize, hyper2kvm: Option<PathBuf>) -> Ctx {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).expect("bench dir");
        let dir = dir.canonicalize().expect("canonical bench dir");
        let bin = std::env::current_exe().expect("exe").parent().expect("bin dir").to_path_buf();
        let hyper2kvm = hyper2kvm.or_else(|| {
            let p = bin.join("../hyper2kvm-venv/bin/hyper2kvm");
            p.is_file().then(|| p.canonicalize().expect("canonical"))
        });
        Ctx { dir, quick, runs: if quick { runs.min(2) } else { runs }, bin, hyper2kvm }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        let p = self.bin.join(name);
        assert!(p.is_file(), "{} is missing: build the release binaries (scripts/bench does)", p.display());
        p
    }

    /// A fresh subdirectory.
    pub fn sub(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("mkdir");
        p
    }
}

/// Print the machine, once.
pub fn header(ctx: &Ctx) {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0)))
        .unwrap_or(0);
    let qemu = run_out("qemu-img", &["--version"]).lines().next().unwrap_or_default().to_string();
    println!(
        "machine: {cpu}, {cores} cores, {} GiB; {qemu}; work dir {}{}",
        mem >> 20,
        ctx.dir.display(),
        if ctx.quick { " (quick)" } else { "" }
    );
    println!(
        "each figure is the median of {} runs unless noted; files are in the page cache (just written)\n",
        ctx.runs
    );
}

/// Run a command to completion; panic with its stderr on failure.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn run_out(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Median wall time of `runs` runs of `f`; `setup` runs before each, untimed, followed by a
/// `sync` so that write-back left by earlier runs does not land in this one.
pub fn time(runs: usize, mut setup: impl FnMut(), mut f: impl FnMut()) -> Duration {
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        setup();
        sync_all();

        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    median(&mut v)
}

pub fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Deterministic pseudo-random bytes.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A sparse file of `size` bytes with random data written at `regions` (offset, length).
pub fn make_file(path: &Path, size: u64, regions: &[(u64, u64)]) {
    use std::io::{Seek, SeekFrom};
    let mut f = fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
    let mut buf = vec![0u8; 8 << 20];
    for (i, (off, len)) in regions.iter().enumerate() {
        f.seek(SeekFrom::Start(*off)).expect("seek");
        let mut left = *len;
        let mut n = 0u64;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            fill(&mut buf[..k], (i as u64) << 32 | n);
            f.write_all(&buf[..k]).expect("write");
            left -= k as u64;
            n += 1;
        }
    }
    f.sync_all().expect("sync");
}

pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// One line of the final table.
pub struct Row {
    pub what: String,
    pub figure: String,
    pub baseline: String,
    pub ratio: Option<f64>,
    pub target: String,
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    pub fn add(
        &mut self,
        what: &str,
        figure: String,
        baseline: String,
        ratio: Option<f64>,
        target: &str,
        met: Option<bool>,
    ) {
        println!(
            "  {what}: {figure} | baseline {baseline}{} | target {target}{}",
            ratio.map(|r| format!(" | ratio {r:.2}")).unwrap_or_default(),
            match met {
                Some(true) => " | met",
                Some(false) => " | MISSED",
                None => "",
            }
        );
        self.rows.push(Row { what: what.into(), figure, baseline, ratio, target: target.into(), met });
    }

    /// A time beside a baseline time, with their ratio; `limit`: the target is `ratio <= limit`.
    pub fn versus(
        &mut self,
        what: &str,
        ours: Duration,
        base: &str,
        base_time: Duration,
        target: &str,
        limit: Option<f64>,
    ) {
        let r = ours.as_secs_f64() / base_time.as_secs_f64();
        self.add(what, secs(ours), format!("{base} {}", secs(base_time)), Some(r), target, limit.map(|l| r <= l));
    }

    pub fn print(&self) {
        println!("\n== summary");
        let w = self.rows.iter().map(|r| r.what.len()).max().unwrap_or(10);
        for r in &self.rows {
            println!(
                "{:<w$}  {:>12}  vs {:<28} {:>7}  {:<22} {}",
                r.what,
                r.figure,
                r.baseline,
                r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_default(),
                r.target,
                match r.met {
                    Some(true) => "met",
                    Some(false) => "MISSED",
                    None => "",
                }
            );
        }
    }
}

/// Wait until `f` is true, polling every `every`.
pub fn until(limit: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(every);
    }
    false
}

/// Peak resident memory of a process so far (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A started agent, killed on drop.
pub struct Agent {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub url: Option<String>,
    pub ready_after: Duration,
}

impl Agent {
    pub fn start(ctx: &Ctx, queue: &Path, output: &Path, extra: &[&str]) -> Agent {
        // HYPERFARM_BENCH_LOGS=DIR keeps every agent's log there (with HYPER2KVM_AGENT_LOG=debug,
        // the per-phase timings of each job).
        let log = match std::env::var_os("HYPERFARM_BENCH_LOGS") {
            Some(dir) => {
                fs::create_dir_all(&dir).expect("log dir");
                let n = fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
                Path::new(&dir).join(format!("agent-{n}.log"))
            }
            None => queue.parent().expect("parent").join(format!("agent-{}.log", std::process::id())),
        };
        let f = fs::File::create(&log).expect("log");
        let t = Instant::now();
        let mut args: Vec<String> = vec![
            "--watch-dir".into(),
            queue.display().to_string(),
            "--output-dir".into(),
            output.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(ctx.bin("hyper2kvm-agent"))
            .args(&args)
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .spawn()
            .expect("agent");
        let ok = until(Duration::from_secs(120), Duration::from_millis(2), || {
            fs::read_to_string(&log).unwrap_or_default().contains(" ready")
        });
        assert!(ok, "the agent did not become ready: {}", fs::read_to_string(&log).unwrap_or_default());
        let ready_after = t.elapsed();
        let text = fs::read_to_string(&log).unwrap_or_default();
        let url = text.find("gRPC listening addr=").map(|i| {
            let a: String = text[i + 20..].chars().take_while(|c| !c.is_whitespace()).collect();
            format!("http://{a}")
        });
        Agent { child, log, url, ready_after }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- agent log {} ---\n{}",
                self.log.display(),
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Flush dirty pages, then drop the clean ones from the page cache, so that the next reader finds
/// its input on the disk, as an agent finds a disk on NFS that it has never read. Needs root;
/// false when the kernel refused.
pub fn drop_caches() -> bool {
    sync_all();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Flush every dirty page of the machine (untimed), like `sync`.
pub fn sync_all() {
    let _ = Command::new("sync").status();
}

/// An untimed set-up step and the timed run that follows it.
pub type Case<'a> = (&'a mut dyn FnMut(), &'a mut dyn FnMut());

/// Run every `(setup, run)` pair once per round, `rounds` times, interleaved so that slow drift
/// of the machine (write-back, other load) touches all of them alike; a `sync` precedes every
/// timed run. Returns the median of each, in order.
pub fn interleave(rounds: usize, cases: &mut [Case<'_>]) -> Vec<Duration> {
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (setup, run)) in cases.iter_mut().enumerate() {
            setup();
            sync_all();
            let t = Instant::now();
            run();
            times[i].push(t.elapsed());
        }
    }
    times.iter_mut().map(|v| median(v)).collect()
}
