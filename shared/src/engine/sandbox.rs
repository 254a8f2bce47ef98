//! Confining an engine's process to the files of its job, with Landlock.
//!
//! Every check of a source image happens before qemu-img opens it, and qemu-img reads the very
//! inode that was checked (`/proc/<pid>/fd/<n>`). But the job's owner can still rewrite the image
//! *in place* between the check and the open: a qcow2 header that gains a backing file or an
//! external data file would make qemu-img read that file into the published disk. Two locks close
//! that door: the image is opened through a `json:` spec that pins the driver and forbids backing
//! files (`"backing": null`, see `qemu_img.rs`), and the process itself is confined here — it may
//! read only the job's own source files (and the system files a program needs to start), write
//! only its work area, and nothing else. An external data file named after the checks then fails
//! to open instead of leaking.
//!
//! Landlock (Linux 5.13+) confines without privileges. It is applied by a short-lived thread that
//! restricts itself and spawns the child, which inherits the restriction; the agent itself is never
//! restricted. On a kernel without Landlock the child runs unconfined: the `json:` spec and the
//! header check after the conversion still apply, and the agent says so once at start-up.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus,
};

/// The Landlock ABI we ask for (best effort: older kernels enforce what they know).
const ABI_WANTED: ABI = ABI::V5;

/// Directories a dynamically linked program needs to start (libraries, loader cache, locale data).
const SYSTEM_READ: &[&str] =
    &["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/localtime", "/sys/devices/system"];
/// Devices a program may use.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"];

/// What a confined process may touch.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    read: Vec<PathBuf>,
    write: Vec<PathBuf>,
    /// Extra directories needed to run the program (its installation, e.g. a venv).
    system: Vec<PathBuf>,
}

/// Whether Landlock confines processes here: `Ok(())`, or why not (checked once). Not available
/// on kernels before 5.13 or without Landlock in their `lsm=` list, or when a seccomp filter
/// refuses its system calls (a unit's SystemCallFilter must allow them).
pub fn available() -> Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE
        .get_or_init(|| {
            // A throwaway thread restricts itself and reports what the kernel enforced.
            std::thread::spawn(|| {
                match Ruleset::default()
                    .handle_access(AccessFs::Execute)
                    .and_then(|r| r.create())
                    .and_then(|r| r.restrict_self())
                {
                    Ok(s) if s.ruleset != RulesetStatus::NotEnforced => Ok(()),
                    Ok(_) => {
                        Err("this kernel does not enforce Landlock (Linux 5.13+ with landlock in lsm=)".to_string())
                    }
                    Err(e) => Err(format!("Landlock cannot be used here: {e}")),
                }
            })
            .join()
            .unwrap_or_else(|_| Err("the Landlock probe panicked".into()))
        })
        .clone()
}

static REQUIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether an engine that cannot be confined must not run (the agent's `require_confinement`,
/// true by default), or may run unconfined with a warning (hyperexport's direct mode, which
/// converts the operator's own VM on the operator's own host).
pub fn set_required(required: bool) {
    REQUIRED.store(required, std::sync::atomic::Ordering::Relaxed);
}

impl Confinement {
    pub fn new() -> Confinement {
        Confinement::default()
    }
    /// May read `path` (a file, or a directory and everything below it).
    pub fn read(mut self, path: impl Into<PathBuf>) -> Self {
        self.read.push(path.into());
        self
    }
    /// May read, create, write and remove below `dir`.
    pub fn write(mut self, dir: impl Into<PathBuf>) -> Self {
        self.write.push(dir.into());
        self
    }
    /// May read and execute below `path` (a program's own installation).
    pub fn system(mut self, path: impl Into<PathBuf>) -> Self {
        self.system.push(path.into());
        self
    }

    /// May run `program` (a path, or a name looked up in PATH) and whatever it finds on PATH (the
    /// operator's choice of programs, e.g. a wrapper around qemu-img).
    pub fn with_program(mut self, program: &Path) -> Self {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).filter(|d| d.is_absolute()).collect();
        let found = if program.components().count() > 1 {
            Some(program.to_path_buf())
        } else {
            dirs.iter().map(|d| d.join(program)).find(|p| p.is_file())
        };
        if let Some(p) = found {
            if let Ok(real) = std::fs::canonicalize(&p) {
                self.system.push(real);
            }
            self.system.push(p);
        }
        self.system.extend(dirs);
        self
    }

    /// The paths as a log line.
    pub fn describe(&self) -> String {
        let show = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        format!("read {}; write {}", show(&self.read), show(&self.write))
    }

    /// Restrict the calling thread (and everything it spawns from now on). Paths that do not exist
    /// are skipped. Returns whether the kernel enforced it.
    fn restrict_this_thread(&self) -> Result<bool, String> {
        let abi = ABI_WANTED;
        let all = AccessFs::from_all(abi);
        let read = AccessFs::from_read(abi);
        let mut rules: Vec<(PathBuf, BitFlags<AccessFs>)> = Vec::new();
        let mut add = |p: &Path, access: BitFlags<AccessFs>| {
            if let Ok(md) = std::fs::metadata(p) {
                // A rule on a file may only carry the rights that apply to files.
                let access = if md.is_dir() { access } else { access & AccessFs::from_file(abi) };
                rules.push((p.to_path_buf(), access));
            }
        };
        for p in SYSTEM_READ {
            add(Path::new(p), read);
        }
        for p in DEVICES {
            add(Path::new(p), read | AccessFs::WriteFile);
        }
        for p in &self.system {
            add(p, read);
        }
        for p in &self.read {
            add(p, read & !AccessFs::Execute);
        }
        for p in &self.write {
            add(p, all & !AccessFs::Execute);
        }
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(all)
            .map_err(|e| e.to_string())?
            .create()
            .map_err(|e| e.to_string())?;
        for (path, access) in rules {
            let fd = PathFd::new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            ruleset = ruleset.add_rule(PathBeneath::new(fd, access)).map_err(|e| e.to_string())?;
        }
        let status = ruleset.restrict_self().map_err(|e| e.to_string())?;
        Ok(status.ruleset != RulesetStatus::NotEnforced)
    }

    /// Spawn `cmd` confined: a thread of its own restricts itself, spawns, and ends; the child
    /// keeps the restriction for its whole life (and passes it on to its own children).
    pub fn spawn(&self, cmd: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
        let handle = tokio::runtime::Handle::current();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _rt = handle.enter();
                let why = match self.restrict_this_thread() {
                    Ok(true) => None,
                    Ok(false) => Some("this kernel does not enforce Landlock".to_string()),
                    Err(e) => Some(e),
                };
                if let Some(why) = why {
                    if REQUIRED.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(std::io::Error::other(format!(
                            "cannot confine the engine to its job's files ({why}); refusing to run it unconfined (require_confinement)"
                        )));
                    }
                    warn_once(&why);
                }
                cmd.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
        })
    }
}

fn warn_once(why: &str) {
    static WARNED: OnceLock<()> = OnceLock::new();
    WARNED.get_or_init(|| {
        tracing::warn!(
            "{why}: engines run unconfined (qemu-img still opens sources with backing files forbidden, and headers are checked again after conversion)"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A confined `cat` reads what it may and nothing else.
    #[tokio::test]
    async fn a_confined_child_reads_only_what_it_was_given() {
        if let Err(why) = available() {
            eprintln!("{why}: nothing to test");
            return;
        }
        let d = tempfile::tempdir().expect("tempdir");
        let allowed = d.path().join("allowed.txt");
        let secret = d.path().join("secret.txt");
        std::fs::write(&allowed, "ok").expect("write");
        std::fs::write(&secret, "secret").expect("write");
        let c = Confinement::new().read(&allowed);
        for (path, ok) in [(&allowed, true), (&secret, false)] {
            let mut cmd = tokio::process::Command::new("cat");
            cmd.arg(path).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null());
            let out = c.spawn(&mut cmd).expect("spawn").wait_with_output().await.expect("wait");
            assert_eq!(out.status.success(), ok, "{}", path.display());
        }
        // The agent's own thread was never restricted.
        assert_eq!(std::fs::read_to_string(&secret).expect("read"), "secret");
    }

    /// A qcow2 whose header names an external data file outside the job: unconfined, qemu-img
    /// opens it (the leak); confined to the image, it cannot.
    #[tokio::test]
    async fn a_confined_qemu_img_cannot_open_a_data_file_the_header_names() {
        if let Err(why) = available() {
            eprintln!("{why}: nothing to test");
            return;
        }
        let d = tempfile::tempdir().expect("tempdir");
        let job = d.path().join("job");
        std::fs::create_dir(&job).expect("mkdir");
        let secret = d.path().join("secret.raw");
        std::fs::write(&secret, vec![0x5au8; 1 << 20]).expect("write");
        let image = job.join("evil.qcow2");
        let opt = format!("data_file={},data_file_raw=on", secret.display());
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", &opt])
            .arg(&image)
            .arg("1M")
            .status()
            .expect("qemu-img");
        assert!(st.success());
        // The data file stands for any file the agent's user can read (qemu-img create zeroed it).
        std::fs::write(&secret, vec![0x5au8; 1 << 20]).expect("write");
        let qemu = crate::engine::QemuImg::default();
        let src = crate::engine::qemu_img::Source::Path(image.to_str().expect("utf8"));
        let fmt = crate::format::DiskFormat::Qcow2;
        let opts = crate::engine::ConvertOptions::default();
        let cancel = tokio_util::sync::CancellationToken::new();
        // Positive control: with the secret readable, the conversion reads it.
        let out = d.path().join("leaked.qcow2");
        let open = Confinement::new().read(d.path()).write(d.path());
        qemu.convert(src, fmt, &out, &opts, &open, None, &cancel, |_| {}).await.expect("unconfined convert");
        let raw = d.path().join("leaked.raw");
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-O", "raw"])
            .arg(&out)
            .arg(&raw)
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let leaked = std::fs::read(&raw).expect("read").iter().filter(|&&b| b == 0x5a).count();
        assert!(leaked >= 64 << 10, "positive control: the header made qemu-img read the secret ({leaked} bytes)");
        // Confined to the job: the data file cannot be opened, nothing is produced.
        let out = job.join("out.qcow2");
        let job_only = Confinement::new().read(&image).write(&job);
        let e = qemu.convert(src, fmt, &out, &opts, &job_only, None, &cancel, |_| {}).await.expect_err("confined");
        assert!(e.to_string().contains("ermission denied"), "{e}");
    }
}
