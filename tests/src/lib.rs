//! The integration-test harness: find the real binaries, run them in fresh directories, make
//! disk images with the real qemu-img, and print everything useful when a test fails.
//!
//! Binaries are built by `cargo build --workspace` (scripts/test does it first); they are looked
//! up beside the test executable's target directory.

#![allow(clippy::unwrap_used)]

pub mod bed;
pub mod certs;
pub mod http;
pub mod images;
pub mod vcsim;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The path of a workspace binary (`hyperexport`, `hyper2kvm-agent`, `hyperctl`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/integration-<hash> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace` (scripts/test does this)",
        p.display()
    );
    p
}

/// Wait until `f` returns `Some`, polling every 20 ms, up to `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh directory tree: `queue/`, `output/`, `src/`, with logs kept for failure reports.
pub struct Farm {
    pub dir: tempfile::TempDir,
    pub queue: PathBuf,
    pub output: PathBuf,
    pub src: PathBuf,
    /// The gRPC URL of the last agent started by [`Farm::agent`].
    pub agent_url: std::sync::Mutex<Option<String>>,
}

impl Default for Farm {
    fn default() -> Self {
        Self::new()
    }
}

impl Farm {
    pub fn new() -> Farm {
        let dir = tempfile::Builder::new().prefix("hyperfarm-test-").tempdir().expect("tempdir");
        let queue = dir.path().join("queue");
        let output = dir.path().join("output");
        let src = dir.path().join("src");
        for d in [&queue, &output, &src] {
            fs::create_dir_all(d).expect("mkdir");
        }
        Farm { dir, queue, output, src, agent_url: Default::default() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Arguments an agent needs for this farm, with quick timings for tests.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--watch-dir".into(),
            self.queue.display().to_string(),
            "--output-dir".into(),
            self.output.display().to_string(),
            "--poll-interval".into(),
            "200ms".into(),
            "--settle-time".into(),
            "300ms".into(),
            "--lease-timeout".into(),
            "3s".into(),
            "--shutdown-grace".into(),
            "5s".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ]
    }

    /// Start an agent with the farm's arguments plus `extra`, and wait until it is ready.
    pub fn agent(&self, extra: &[&str]) -> Proc {
        let mut args = self.agent_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = Proc::spawn(&bin("hyper2kvm-agent"), &args, self.path(), &[]);
        p.wait_log("INFO ready", Duration::from_secs(30));
        *self.agent_url.lock().expect("lock") = p.grpc_url();
        p
    }

    /// Start an agent like [`Farm::agent`] with these environment variables.
    pub fn agent_env(&self, env: &[(&str, &str)], extra: &[&str]) -> Proc {
        let mut args = self.agent_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = Proc::spawn(&bin("hyper2kvm-agent"), &args, self.path(), env);
        p.wait_log("INFO ready", Duration::from_secs(30));
        *self.agent_url.lock().expect("lock") = p.grpc_url();
        p
    }

    /// Start an agent like [`Farm::agent`] but through a wrapper command (e.g. `prlimit
    /// --nofile=1024:1024`, which then executes the agent with the same pid).
    pub fn agent_via(&self, wrapper: &[&str], extra: &[&str]) -> Proc {
        let mut args: Vec<String> = wrapper[1..].iter().map(|s| s.to_string()).collect();
        args.push(bin("hyper2kvm-agent").display().to_string());
        args.extend(self.agent_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = Proc::spawn(Path::new(wrapper[0]), &args, self.path(), &[]);
        p.wait_log("INFO ready", Duration::from_secs(30));
        *self.agent_url.lock().expect("lock") = p.grpc_url();
        p
    }

    /// Run hyperexport in daemon mode against this farm, to completion.
    pub fn export(&self, vm: &Path, extra: &[&str]) -> Ran {
        self.export_to(vm, &self.output, extra)
    }

    /// [`Farm::export`] with the export host seeing the agent's output at `output` (another
    /// directory: the output not mounted there).
    pub fn export_to(&self, vm: &Path, output: &Path, extra: &[&str]) -> Ran {
        let mut args: Vec<String> = vec![
            "--vm".into(),
            vm.display().to_string(),
            "--pipeline".into(),
            "--hyper2kvm-daemon".into(),
            "--hyper2kvm-watch-dir".into(),
            self.queue.display().to_string(),
            "--hyper2kvm-output-dir".into(),
            output.display().to_string(),
            "--hyper2kvm-poll-interval".into(),
            "100ms".into(),
            "--hyper2kvm-daemon-timeout".into(),
            "120s".into(),
        ];
        match self.agent_url.lock().expect("lock").clone() {
            Some(url) => args.extend(["--agent".to_string(), url]),
            None => args.push("--hyper2kvm-detect=false".into()),
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Run::new(&bin("hyperexport"), &args).timeout(Duration::from_secs(180)).run()
    }

    /// `ls -R` of the farm, for failure reports.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        walk(self.path(), self.path(), &mut out);
        out
    }

    /// The ids of jobs in a queue state directory.
    pub fn jobs_in(&self, state: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.queue.join(state))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Result records in the output directory.
    pub fn records(&self) -> Vec<serde_json::Value> {
        let dir = self.output.join(".hyperfarm/results");
        let mut v: Vec<_> = fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| fs::read(e.path()).ok())
                    .filter_map(|b| serde_json::from_slice(&b).ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by_key(|r: &serde_json::Value| r["job_id"].as_str().unwrap_or_default().to_string());
        v
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- farm {} ---\n{}", self.path().display(), self.listing());
            if std::env::var_os("HYPERFARM_KEEP_TEST_DIRS").is_some() {
                let kept = self.dir.path().to_path_buf();
                eprintln!("kept {}", kept.display());
                std::mem::forget(std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")));
            }
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut String) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let md = fs::symlink_metadata(&p).ok();
        let size = md.as_ref().map(|m| m.len()).unwrap_or(0);
        out.push_str(&format!("{} {}\n", p.strip_prefix(root).unwrap_or(&p).display(), size));
        if md.map(|m| m.is_dir()).unwrap_or(false) {
            walk(root, &p, out);
        }
    }
}

/// A long-running child (an agent) whose stderr goes to a log file. Killed (SIGKILL) and reaped
/// on drop; its log is printed if the test is failing.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub cmd: String,
}

impl Proc {
    pub fn spawn(program: &Path, args: &[String], dir: &Path, env: &[(&str, &str)]) -> Proc {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = program.file_name().and_then(OsStr::to_str).unwrap_or("proc");
        let log = dir.join(format!("{name}-{n}.log"));
        let f = fs::File::create(&log).expect("log file");
        let mut c = Command::new(program);
        c.args(args).stdin(Stdio::null()).stdout(f.try_clone().expect("dup")).stderr(f);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        Proc { child: Some(child), log, cmd: format!("{} {}", program.display(), args.join(" ")) }
    }

    /// The agent's gRPC URL, from its "gRPC listening addr=…" log line.
    pub fn grpc_url(&self) -> Option<String> {
        let log = self.log_text();
        let at = log.find("gRPC listening addr=")? + "gRPC listening addr=".len();
        let addr: String = log[at..].chars().take_while(|c| !c.is_whitespace()).collect();
        let tls = log[at..].lines().next().is_some_and(|l| l.contains("tls=true"));
        Some(format!("{}://{addr}", if tls { "https" } else { "http" }))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for a log line containing `needle`.
    pub fn wait_log(&mut self, needle: &str, limit: Duration) {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(status) = self.try_status() {
                panic!("{} exited ({status}) before logging {needle:?}:\n{}", self.cmd, self.log_text());
            }
            assert!(
                start.elapsed() < limit,
                "{} did not log {needle:?} within {limit:?}:\n{}",
                self.cmd,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Count of log lines containing `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(needle)).count()
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    /// Send a signal.
    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid() as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// Wait for exit (with a deadline) and return the status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return st;
            }
            assert!(start.elapsed() < limit, "{} did not exit within {limit:?}:\n{}", self.cmd, self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.cmd, self.log_text());
        }
        self.kill9();
    }
}

/// A command run to completion.
pub struct Run {
    cmd: Command,
    desc: String,
    limit: Duration,
    stdin: Option<Vec<u8>>,
}

/// The result of a [`Run`].
#[derive(Debug)]
pub struct Ran {
    pub desc: String,
    pub output: Output,
}

impl Ran {
    pub fn code(&self) -> Option<i32> {
        self.output.status.code()
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// Assert the exit code, printing everything on mismatch.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "{} exited {:?}, expected {code}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.output.status,
            self.stdout(),
            self.stderr()
        );
        self
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout().trim())
            .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}):\n{}", self.desc, self.stdout()))
    }
}

impl Run {
    pub fn new(program: &Path, args: &[String]) -> Run {
        let mut cmd = Command::new(program);
        cmd.args(args);
        Run {
            cmd,
            desc: format!("{} {}", program.display(), args.join(" ")),
            limit: Duration::from_secs(120),
            stdin: None,
        }
    }
    pub fn timeout(mut self, d: Duration) -> Run {
        self.limit = d;
        self
    }
    pub fn cwd(mut self, dir: &Path) -> Run {
        self.cmd.current_dir(dir);
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Run {
        self.cmd.env(k, v);
        self
    }
    pub fn stdin(mut self, data: Vec<u8>) -> Run {
        self.stdin = Some(data);
        self
    }
    /// Start without waiting (for tests that signal it).
    pub fn spawn(mut self) -> (Child, String) {
        self.cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        (self.cmd.spawn().expect("spawn"), self.desc)
    }
    pub fn run(mut self) -> Ran {
        self.cmd
            .stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.cmd.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", self.desc));
        if let Some(data) = self.stdin.take() {
            let mut si = child.stdin.take().expect("stdin");
            si.write_all(&data).expect("stdin write");
        }
        let start = Instant::now();
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if start.elapsed() > self.limit {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "{} ran longer than {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.desc,
                    self.limit,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let output = child.wait_with_output().expect("output");
        Ran { desc: self.desc, output }
    }
}

/// `(child, desc)` from [`Run::spawn`] collected after exit.
pub fn collect(child: Child, desc: String, limit: Duration) -> Ran {
    let start = Instant::now();
    let mut child = child;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("{desc} ran longer than {limit:?}\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ran { desc, output: child.wait_with_output().expect("output") }
}

/// Wait until process `pid` is stopped (it reached a `stop:` failpoint, see
/// `hyperfarm_shared::failpoint`).
pub fn wait_stopped(pid: u32, limit: Duration) {
    wait_for(&format!("process {pid} to stop at its failpoint"), limit, || {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().starts_with('T').then_some(())
    });
}

/// Let a stopped process go on.
pub fn cont(pid: u32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::CONT);
    }
}

/// Raise this process's soft descriptor limit to its hard limit (tests that open many sockets).
pub fn raise_nofile() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    lim.current = lim.maximum;
    let _ = setrlimit(Resource::Nofile, lim);
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Open descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|rd| rd.count()).unwrap_or(0)
}

/// A `VmRSS`/`VmHWM`-style field of `/proc/<pid>/status`, in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Read `output/<name>`.
pub fn file_exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// Run `hyperctl` with these arguments to completion.
pub fn hyperctl(args: &[&str]) -> Ran {
    Run::new(&bin("hyperctl"), &args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .timeout(Duration::from_secs(60))
        .run()
}

/// A TCP port on loopback that was free a moment ago (for a server that must keep its port
/// across a restart).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The lease phase of the (single) converting job, if any.
pub fn lease_phase(farm: &Farm) -> Option<String> {
    let dir = fs::read_dir(farm.queue.join("converting")).ok()?.filter_map(|e| e.ok()).next()?.path();
    let bytes = fs::read(dir.join("lease.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(bytes.trim_ascii()).ok()?;
    v["phase"].as_str().map(str::to_string)
}

/// A config file that makes conversions slow enough to be caught in the middle: qemu-img's own
/// rate limit (`-r 16M`), so a disk with 128 MiB of data converts in about 8 s.
pub fn slow_config(farm: &Farm) -> String {
    let p = farm.path().join("slow.toml");
    fs::write(&p, "[convert]\nrate_limit = \"16M\"\n").expect("write config");
    p.display().to_string()
}

/// A 256 MiB raw disk with 128 MiB of data (8 s to convert under [`slow_config`]).
pub fn slow_disk(farm: &Farm, name: &str, seed: u64) -> PathBuf {
    images::raw_disk(&farm.src.join(name), 256 << 20, &[(0, 64 << 20), (150 << 20, 64 << 20)], seed)
}

/// Publish a job with hyperexport (daemon mode, detached: no detection, no waiting); its id.
pub fn publish(farm: &Farm, vm: &Path, name: &str) -> String {
    let args: Vec<String> = [
        "--vm",
        &vm.display().to_string(),
        "--name",
        name,
        "--pipeline",
        "--hyper2kvm-daemon",
        "--detach",
        "--json",
        "--hyper2kvm-watch-dir",
        &farm.queue.display().to_string(),
        "--hyper2kvm-output-dir",
        &farm.output.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ran = Run::new(&bin("hyperexport"), &args).run();
    ran.expect_code(0);
    ran.json()["job_id"].as_str().expect("job id").to_string()
}

/// The Python of the test venv (grpcio and friends), made by `scripts/setup-python`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPERFARM_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/python");
    assert!(p.is_file(), "{} is missing: run scripts/setup-python (scripts/test does)", p.display());
    p
}

/// The real hyper2kvm 0.2.1 of the test venv, made by `scripts/setup-python`.
pub fn hyper2kvm() -> PathBuf {
    if let Some(p) = std::env::var_os("HYPERFARM_TEST_HYPER2KVM") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/hyper2kvm-venv/bin/hyper2kvm");
    assert!(p.is_file(), "{} is missing: run scripts/setup-python (scripts/test does)", p.display());
    p.canonicalize().expect("canonical path")
}

/// Write an executable shell script.
pub fn script(path: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
    path.to_path_buf()
}

/// All files below `dir` whose name ends with `suffix`.
pub fn find_files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(find_files(&p, suffix));
        } else if p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(suffix)) {
            out.push(p);
        }
    }
    out
}

/// How hard the reliability campaign runs: `HYPERFARM_CAMPAIGN=full` for the documented long run,
/// the quick size otherwise (CI).
pub fn campaign_full() -> bool {
    std::env::var("HYPERFARM_CAMPAIGN").is_ok_and(|v| v == "full")
}

/// A small deterministic PRNG for the campaigns (seed printed so a run can be repeated with
/// `HYPERFARM_SEED`).
pub struct Rng(u64);

impl Rng {
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("HYPERFARM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        eprintln!("{what}: seed {seed} (HYPERFARM_SEED={seed} repeats this run)");
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}
