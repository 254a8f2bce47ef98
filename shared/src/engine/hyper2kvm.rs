//! The hyper2kvm engine: one job, one `hyper2kvm --manifest` run in a private work directory.
//!
//! Measured facts behind this code are in `docs/research/hyper2kvm-0.2.1-findings.md`:
//! - only the one-shot manifest mode converts reliably (its daemon deadlocks, deduplicates inputs
//!   forever and never writes `<vm>.qcow2`), so the agent is the daemon and hyper2kvm runs one job
//!   at a time;
//! - relative paths resolve against its working directory, `output.filename` is ignored and
//!   outputs are `<output.directory>/<disk id>.qcow2` (written as `.part`, then renamed);
//! - its exit code, log text and even its VALIDATE stage cannot be trusted alone: the agent reads
//!   `report.json`, checks every expected output exists, runs `qemu-img check` and compares virtual
//!   sizes before publishing;
//! - SIGTERM to its process alone orphans qemu-img: the whole process group is stopped (SIGTERM,
//!   then SIGKILL), and the work directory (`.part` files, its `~/.cache/hyper2kvm/conversions`
//!   under a private `HOME`, `report.json`) is removed whatever happened;
//! - the fix stage needs root and the nbd module (or libguestfs): refused up front elsewhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::EngineError;
use super::process;
use crate::manifest::Stages;
use crate::progress::Phase;

/// What this host offers hyper2kvm's guest-fix stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCaps {
    pub root: bool,
    pub nbd: bool,
    pub qemu_nbd: bool,
}

impl HostCaps {
    pub fn detect() -> HostCaps {
        HostCaps {
            root: rustix::process::geteuid().is_root(),
            nbd: Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists(),
            qemu_nbd: on_path("qemu-nbd"),
        }
    }

    /// Whether the fix stage can run here, else why not.
    pub fn can_fix(&self) -> Result<(), String> {
        let mut missing = Vec::new();
        if !self.root {
            missing.push("root privileges");
        }
        if !self.nbd {
            missing.push("the nbd kernel module (/dev/nbd*)");
        }
        if !self.qemu_nbd {
            missing.push("qemu-nbd");
        }
        if missing.is_empty() { Ok(()) } else { Err(format!("this host lacks {}", missing.join(", "))) }
    }
}

fn on_path(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(name).is_file())
}

/// A usable hyper2kvm program.
#[derive(Debug, Clone)]
pub struct Hyper2kvm {
    pub program: PathBuf,
    /// What `hyper2kvm --version` printed (0.2.1 prints "0.2.0").
    pub version: String,
    /// Longest run of one job.
    pub timeout: Option<Duration>,
    pub caps: HostCaps,
}

/// The versions this wrapper was measured against.
pub const TESTED_VERSIONS: &[&str] = &["0.2.0", "0.2.1"];

impl Hyper2kvm {
    /// Find and check hyper2kvm: `program` may be a path or a name looked up in PATH.
    pub async fn probe(program: &Path, timeout: Option<Duration>) -> Result<Hyper2kvm, String> {
        let resolved =
            resolve(program).ok_or_else(|| format!("{} was not found (set hyper2kvm_path)", program.display()))?;
        let mut c = Command::new(&resolved);
        c.arg("--version").env("PYTHONDONTWRITEBYTECODE", "1");
        let mut out = Vec::new();
        let fin = process::run(
            c,
            &resolved,
            process::Spawn::default(),
            Some(Duration::from_secs(60)),
            &CancellationToken::new(),
            |b| out.extend_from_slice(b),
            |_| {},
        )
        .await
        .map_err(|e| format!("{} --version: {e}", resolved.display()))?;
        let text = format!("{} {}", String::from_utf8_lossy(&out), fin.stderr);
        if !fin.status.success() {
            return Err(format!(
                "{} --version failed ({}): {}",
                resolved.display(),
                process::describe(&fin.status),
                text.trim()
            ));
        }
        let version = text
            .split_whitespace()
            .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
            .map(|w| w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '.').to_string())
            .ok_or_else(|| format!("{} --version printed no version: {:?}", resolved.display(), text.trim()))?;
        if !TESTED_VERSIONS.contains(&version.as_str()) {
            tracing::warn!(version = %version, "hyper2kvm {version} has not been tested with this agent (tested: 0.2.1, which prints 0.2.0)");
        }
        Ok(Hyper2kvm { program: resolved, version, timeout, caps: HostCaps::detect() })
    }

    /// The pipeline stages this host can run with hyper2kvm.
    pub fn stages(&self) -> Vec<&'static str> {
        let mut s = vec!["inspect"];
        if self.caps.can_fix().is_ok() {
            s.push("fix");
        }
        s.extend(["convert", "validate"]);
        s
    }
}

/// A path, or a name found in PATH.
pub fn resolve(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// One disk for a run.
#[derive(Debug, Clone)]
pub struct RunDisk {
    pub id: String,
    pub source_format: &'static str,
    pub bytes: u64,
    pub path: PathBuf,
    pub boot: bool,
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub vm_name: String,
    pub disks: Vec<RunDisk>,
    pub stages: Stages,
    /// `vm` facts to pass on (cpu, mem_gb, firmware), already validated.
    pub vm: serde_json::Value,
    /// The private directory (created and removed by the caller).
    pub dir: PathBuf,
}

impl RunSpec {
    pub fn out_dir(&self) -> PathBuf {
        self.dir.join("out")
    }
    pub fn report_path(&self) -> PathBuf {
        self.dir.join("report.json")
    }
    /// Where hyper2kvm writes a disk: `<out>/<disk id>.qcow2`.
    pub fn output_of(&self, disk_id: &str) -> PathBuf {
        self.out_dir().join(format!("{disk_id}.qcow2"))
    }

    /// The manifest hyper2kvm gets: written from validated values only, with absolute paths; none
    /// of the keys that make hyper2kvm do more (profiles, hooks, libvirt, configuration) can
    /// reach it from a job.
    pub fn manifest(&self) -> serde_json::Value {
        let disks: Vec<serde_json::Value> = self
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                serde_json::json!({
                    "id": d.id, "source_format": d.source_format, "bytes": d.bytes,
                    "local_path": d.path, "boot_order_hint": i,
                    "disk_type": if d.boot { "boot" } else { "data" },
                })
            })
            .collect();
        let on = |b: bool| serde_json::json!({ "enabled": b });
        serde_json::json!({
            "manifest_version": "1.0",
            "source": {"provider": "hyperfarm", "vm_name": self.vm_name},
            "vm": self.vm,
            "disks": disks,
            "pipeline": {
                "inspect": on(self.stages.inspect), "fix": on(self.stages.fix),
                "convert": on(true), "validate": on(self.stages.validate),
            },
            "output": {"directory": self.out_dir(), "format": "qcow2"},
            "options": {"report": {"path": self.report_path()}},
        })
    }
}

/// Why a run failed: the text for `<vm>.error` (hyper2kvm's own words first).
#[derive(Debug)]
pub enum RunError {
    Engine(EngineError),
    Failed(String),
}

/// `hyper2kvm --manifest <manifest>` as the agent runs it: in `dir`, with a cleared environment
/// and a private `HOME` and `TMPDIR` (`dir/home`, `dir/tmp`, which must exist).
pub fn command(program: &Path, manifest: &Path, dir: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(program);
    c.arg("--manifest")
        .arg(manifest)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()))
        .env("HOME", dir.join("home"))
        .env("TMPDIR", dir.join("tmp"))
        .env("LC_ALL", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// What a hyper2kvm run may touch: the job's source disks (read), its private directory in the
/// work area (read and write), and what a Python program needs to run — its installation and
/// interpreter, the system's libraries, `/proc`, `/sys`, `/dev` and `/etc` except the agent's own
/// configuration and keys (`/etc/hyper2kvm`). Not the queue's other jobs, not the output directory's
/// other results.
fn confinement(program: &Path, spec: &RunSpec) -> super::sandbox::Confinement {
    let mut c = super::sandbox::Confinement::new().write(&spec.dir);
    for d in &spec.disks {
        c = c.read(&d.path);
    }
    // The program (a venv's script), its installation, and the interpreter its first line names.
    let real = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    if let Some(prefix) = real.parent().and_then(Path::parent) {
        c = c.system(prefix);
    }
    if let Some(prefix) = program.parent().and_then(Path::parent) {
        c = c.system(prefix);
    }
    let shebang = std::fs::read(&real).ok().and_then(|b| {
        let first = b.split(|&x| x == b'\n').next()?.strip_prefix(b"#!")?.to_vec();
        Some(PathBuf::from(String::from_utf8_lossy(&first).split_whitespace().next()?.to_string()))
    });
    if let Some(interp) = shebang.and_then(|i| std::fs::canonicalize(i).ok())
        && let Some(prefix) = interp.parent().and_then(Path::parent)
    {
        c = c.system(prefix);
    }
    for p in ["/proc", "/sys", "/dev", "/run"] {
        c = c.system(p);
    }
    if let Ok(rd) = std::fs::read_dir("/etc") {
        for e in rd.flatten() {
            if e.file_name() != "hyper2kvm" {
                c = c.system(e.path());
            }
        }
    }
    c
}

/// Run hyper2kvm once. On success every disk's output is at [`RunSpec::output_of`] and
/// `report.json` says so; the caller still checks the images.
pub async fn run(
    h: &Hyper2kvm,
    spec: &RunSpec,
    cancel: &CancellationToken,
    progress: &crate::worker::ProgressTx,
) -> Result<(), RunError> {
    let dir = &spec.dir;
    for d in [dir.join("home"), dir.join("tmp"), spec.out_dir()] {
        std::fs::create_dir_all(&d).map_err(|e| RunError::Engine(EngineError::Io(e)))?;
    }
    let manifest_path = dir.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&spec.manifest()).expect("JSON serialises"))
        .map_err(|e| RunError::Engine(EngineError::Io(e)))?;

    let c = Command::from(command(&h.program, &manifest_path, dir));
    let confine = confinement(&h.program, spec);

    // Progress: hyper2kvm's own stage and percentage lines, and the bytes its outputs have grown to.
    let n = spec.disks.len().max(1) as f64;
    let mut state = LogState::default();
    let out_dir = spec.out_dir();
    let tx = progress.clone();
    let sizes = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let written = dir_bytes(&out_dir);
            tx.send_modify(|p| p.bytes_done = written);
        }
    });
    let mut tail: Vec<String> = Vec::new();
    let result = process::run(
        c,
        &h.program,
        process::Spawn {
            confine: Some(&confine),
            stdin: None,
            pidfile: spec.dir.parent().map(|w| w.join(".engine-hyper2kvm.json")),
        },
        h.timeout,
        cancel,
        |_| {},
        |chunk| {
            for line in String::from_utf8_lossy(chunk).lines() {
                if let Some(update) = state.feed(line) {
                    progress.send_modify(|p| {
                        p.phase = update.phase;
                        p.percent = ((update.disk_index as f64 + update.disk_percent / 100.0) / n * 100.0).min(100.0);
                        p.disk = update.disk.clone();
                        p.bytes_total = 0;
                    });
                }
                if !line.trim().is_empty() {
                    tail.push(line.to_string());
                    if tail.len() > 40 {
                        tail.remove(0);
                    }
                }
            }
        },
    )
    .await;
    sizes.abort();
    let finished = result.map_err(RunError::Engine)?;
    let tail_text = tail.iter().rev().take(15).rev().cloned().collect::<Vec<_>>().join("\n");
    let report: Option<serde_json::Value> =
        std::fs::read(spec.report_path()).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let Some(report) = report else {
        return Err(RunError::Failed(format!(
            "hyper2kvm exited ({}) without writing report.json\nhyper2kvm's log (last lines):\n{tail_text}",
            process::describe(&finished.status)
        )));
    };
    let success = report.pointer("/pipeline/success").and_then(|v| v.as_bool()) == Some(true);
    let mut errors: Vec<String> = report
        .get("errors")
        .and_then(|e| e.as_array())
        .map(|a| a.iter().filter_map(|e| e.get("message").and_then(|m| m.as_str()).map(str::to_string)).collect())
        .unwrap_or_default();
    if let Some(stages) = report.pointer("/pipeline/stages").and_then(|s| s.as_object()) {
        for (name, s) in stages {
            if let Some(e) = s.get("error").and_then(|e| e.as_str())
                && !errors.iter().any(|x| x.contains(e))
            {
                errors.push(format!("{name}: {e}"));
            }
        }
    }
    if !finished.status.success() || !success || !errors.is_empty() {
        let first = errors
            .first()
            .cloned()
            .unwrap_or_else(|| format!("hyper2kvm failed ({})", process::describe(&finished.status)));
        return Err(RunError::Failed(format!(
            "hyper2kvm failed: {first}\nexit: {}\nerrors reported: {}\nhyper2kvm's log (last lines):\n{tail_text}",
            process::describe(&finished.status),
            if errors.is_empty() { "none".to_string() } else { errors.join("; ") }
        )));
    }
    // Every disk's artifact must be reported and present (and not a leftover .part).
    let artifacts: Vec<(String, String)> = report
        .get("artifacts")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| Some((x.get("disk_id")?.as_str()?.to_string(), x.get("path")?.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    for d in &spec.disks {
        let want = spec.output_of(&d.id);
        let reported = artifacts.iter().any(|(id, p)| id == &d.id && Path::new(p) == want);
        if !reported {
            return Err(RunError::Failed(format!(
                "hyper2kvm reported success but no artifact {} for disk {}; not trusting it\nhyper2kvm's log (last lines):\n{tail_text}",
                want.display(),
                d.id
            )));
        }
        if !want.is_file() {
            return Err(RunError::Failed(format!(
                "hyper2kvm reported {} for disk {} but the file is missing",
                want.display(),
                d.id
            )));
        }
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// What a log line told us.
#[derive(Debug, Clone, PartialEq)]
pub struct LogUpdate {
    pub phase: Phase,
    pub disk: Option<String>,
    pub disk_index: usize,
    pub disk_percent: f64,
}

/// Follows hyper2kvm's log: `➡️  Stage: CONVERT`, `💾 Converting disk: <id>`, `⏳ Progress: 40.1%`.
#[derive(Debug, Default)]
pub struct LogState {
    phase: Option<Phase>,
    disk: Option<String>,
    disks_seen: usize,
    percent: f64,
}

impl LogState {
    pub fn feed(&mut self, line: &str) -> Option<LogUpdate> {
        if let Some(stage) = after(line, "Stage: ") {
            let s = stage.split_whitespace().next().unwrap_or_default().to_ascii_uppercase();
            self.phase = Some(match s.as_str() {
                "VALIDATE" => Phase::Checking,
                _ => Phase::Converting,
            });
            self.percent = 0.0;
        } else if let Some(id) = after(line, "Converting disk: ") {
            self.disk = Some(id.trim().to_string());
            self.disks_seen += 1;
            self.percent = 0.0;
            self.phase = Some(Phase::Converting);
        } else if let Some(p) = after(line, "Progress: ") {
            let v: f64 = p.trim().trim_end_matches('%').parse().ok()?;
            self.percent = v.clamp(0.0, 100.0);
        } else {
            return None;
        }
        Some(LogUpdate {
            phase: self.phase.unwrap_or(Phase::Converting),
            disk: self.disk.clone(),
            disk_index: self.disks_seen.saturating_sub(1),
            disk_percent: self.percent,
        })
    }
}

fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// Remove a run's private directory (outputs must have been moved out first).
pub fn clean(spec: &RunSpec) {
    let _ = crate::fsx::remove_tree(&spec.dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_its_log() {
        let mut s = LogState::default();
        assert_eq!(s.feed("05:31:56 ℹ️ INFO [proc=MainProcess] hello"), None);
        let u = s.feed("05:31:56 ℹ️ INFO [proc=MainProcess] ➡️  Stage: CONVERT").expect("stage");
        assert_eq!(u.phase, Phase::Converting);
        let u = s.feed("💾 Converting disk: disk-0").expect("disk");
        assert_eq!((u.disk.as_deref(), u.disk_index), (Some("disk-0"), 0));
        let u = s.feed("05:31:57 ⏳ INFO [proc=MainProcess] ⏳ Progress: 40.1%").expect("progress");
        assert_eq!(u.disk_percent, 40.1);
        let u = s.feed("💾 Converting disk: data_1").expect("disk");
        assert_eq!((u.disk_index, u.disk_percent), (1, 0.0));
        let u = s.feed("➡️  Stage: VALIDATE").expect("stage");
        assert_eq!(u.phase, Phase::Checking);
    }

    #[test]
    fn the_manifest_carries_only_validated_values_and_absolute_paths() {
        let spec = RunSpec {
            vm_name: "vm".into(),
            disks: vec![RunDisk {
                id: "d0".into(),
                source_format: "vmdk",
                bytes: 5,
                path: "/q/d0.vmdk".into(),
                boot: true,
            }],
            stages: Stages { inspect: true, fix: false, convert: true, validate: true },
            vm: serde_json::json!({"cpu": 2}),
            dir: "/work/h2k".into(),
        };
        let m = spec.manifest();
        assert_eq!(m["disks"][0]["local_path"], "/q/d0.vmdk");
        assert_eq!(m["output"]["directory"], "/work/h2k/out");
        assert_eq!(m["options"]["report"]["path"], "/work/h2k/report.json");
        assert_eq!(m["pipeline"]["fix"]["enabled"], false);
        let keys: Vec<&String> = m.as_object().expect("object").keys().collect();
        for k in ["profile", "profiles_directory", "hooks", "libvirt_integration", "configuration"] {
            assert!(!keys.iter().any(|x| *x == k), "{k} must never reach hyper2kvm");
        }
        assert_eq!(spec.output_of("d0"), PathBuf::from("/work/h2k/out/d0.qcow2"));
    }

    #[test]
    fn fix_needs_root_nbd_and_qemu_nbd() {
        let all = HostCaps { root: true, nbd: true, qemu_nbd: true };
        assert!(all.can_fix().is_ok());
        let e = HostCaps { root: false, nbd: false, qemu_nbd: true }.can_fix().expect_err("cannot");
        assert!(e.contains("root") && e.contains("nbd"), "{e}");
    }
}
