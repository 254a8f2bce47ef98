//! A vSphere API on loopback for the vSphere provider's tests: `tests/vcsim/hfvcsim.go`, govmomi's
//! simulator (Debian's `golang-github-vmware-govmomi-dev`) with ExportVm/ExportSnapshot and NFC
//! downloads added, built offline with Debian's Go in GOPATH mode on first use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, wait_for};

/// The simulator's only user and password.
pub const USER: &str = "hf-user";
pub const PASSWORD: &str = "hf-secret";

fn source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vcsim/hfvcsim.go")
}

/// The simulator binary, built once per version of its source (tests in other processes wait for
/// the same build through a lock file).
pub fn binary() -> PathBuf {
    let src = std::fs::read(source()).expect("tests/vcsim/hfvcsim.go");
    let hash = blake3::hash(&src).to_hex().to_string();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/hfvcsim");
    std::fs::create_dir_all(&dir).expect("mkdir target/hfvcsim");
    let bin = dir.join(format!("hfvcsim-{}", &hash[..16]));
    if bin.is_file() {
        return bin;
    }
    let lock = std::fs::File::create(dir.join("build.lock")).expect("lock file");
    lock.lock().expect("lock");
    if !bin.is_file() {
        let tmp = dir.join(format!("hfvcsim.tmp.{}", std::process::id()));
        let out = Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("vcsim/build.sh"))
            .arg(&tmp)
            .arg(&dir)
            .output()
            .expect("bash runs tests/vcsim/build.sh");
        assert!(
            out.status.success(),
            "building hfvcsim failed (needs Debian's golang-go and golang-github-vmware-govmomi-dev):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &bin).expect("rename hfvcsim");
    }
    bin
}

/// A running simulator.
pub struct Vcsim {
    pub proc: Proc,
    /// `https://127.0.0.1:<port>/sdk`
    pub url: String,
    pub ca: PathBuf,
    pub dir: PathBuf,
    /// A file holding the password, for `--vsphere-password-file`.
    pub password_file: PathBuf,
}

impl Vcsim {
    /// Start one in `dir` (created) with the VM `ubuntu-server` made of `disks` (and the running
    /// `running-vm` with the same disks), plus extra flags (`-rate`, `-cut-after`…).
    pub fn start(dir: &Path, disks: &[PathBuf], extra: &[&str]) -> Vcsim {
        Vcsim::start_via(dir, disks, extra, |program, args| Proc::spawn(program, args, dir, &[]))
    }

    /// Start one through `spawn` (on a bed host: `-listen 0.0.0.0:0 -cert-ip <its address>`).
    pub fn start_via(
        dir: &Path,
        disks: &[PathBuf],
        extra: &[&str],
        spawn: impl FnOnce(&Path, &[String]) -> Proc,
    ) -> Vcsim {
        std::fs::create_dir_all(dir).expect("mkdir");
        let list: Vec<String> = disks.iter().map(|d| d.display().to_string()).collect();
        let mut args = vec!["-dir".to_string(), dir.display().to_string(), "-disks".into(), list.join(",")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = spawn(&binary(), &args);
        let url_file = dir.join("url");
        let url = wait_for("hfvcsim's url", Duration::from_secs(60), || {
            std::fs::read_to_string(&url_file).ok().map(|s| s.trim().to_string())
        });
        let password_file = dir.join("password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
        Vcsim { proc, url, ca: dir.join("ca.pem"), dir: dir.to_path_buf(), password_file }
    }

    /// The flags that reach it with the right credentials and CA.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--provider".into(),
            "vsphere".into(),
            "--vsphere-url".into(),
            self.url.clone(),
            "--vsphere-user".into(),
            USER.into(),
            "--vsphere-password-file".into(),
            self.password_file.display().to_string(),
            "--ca-file".into(),
            self.ca.display().to_string(),
        ]
    }

    /// The lease events it recorded (`lease`, `get`, `cut`, `expired`, `HttpNfcLease*`).
    pub fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// How many events of this kind.
    pub fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }
}
