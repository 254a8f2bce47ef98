//! `hyperexport --interactive` through a real pseudo-terminal: tmux runs the wizard, the test
//! types with `send-keys` and reads the screen with `capture-pane`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hyperfarm_tests::images::{assert_identical, convert, raw_disk, sample_disk};
use hyperfarm_tests::vcsim::Vcsim;
use hyperfarm_tests::{Farm, bin};

/// One tmux server (own socket) running one command in a 160×50 pane.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(dir: &Path, command: &str) -> Tmux {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let socket =
            format!("hyperfarm-test-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        // The command's exit code is printed, then the pane stays for the test to read.
        let wrapped = format!("{command}; echo \"EXIT=$?\"; sleep 600");
        let st = Command::new("tmux")
            .args(["-L", &socket, "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", "160", "-y", "50", "-c"])
            .arg(dir)
            .args(["sh", "-c", &wrapped])
            .env_remove("TMUX")
            .status()
            .expect("tmux (apt install tmux)");
        assert!(st.success(), "tmux new-session failed");
        Tmux { socket }
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "capture-pane", "-p", "-t", "t", "-S", "-200"])
            .output()
            .expect("capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait(&self, needle: &str, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if s.contains(needle) {
                return s;
            }
            assert!(start.elapsed() < limit, "the screen never showed {needle:?} within {limit:?}:\n{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Type literal text.
    fn text(&self, s: &str) {
        let st = Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", "t", "-l", s])
            .status()
            .expect("send-keys");
        assert!(st.success());
        std::thread::sleep(Duration::from_millis(150));
    }

    /// Press keys by name (Enter, BSpace, C-c, …).
    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let st =
                Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "t", k]).status().expect("send-keys");
            assert!(st.success());
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// Answer the prompt showing `prompt` with `text` (may be empty) and Enter.
    fn answer(&self, prompt: &str, text: &str) {
        self.wait(prompt, Duration::from_secs(20));
        if !text.is_empty() {
            self.text(text);
        }
        self.keys(&["Enter"]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- screen ---\n{}", self.screen());
        }
        let _ = Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

fn exe() -> String {
    bin("hyperexport").display().to_string()
}

#[test]
fn the_wizard_runs_an_export_to_its_qcow2_with_the_daemon_settings_it_was_given() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let vm = sample_disk(&farm.src, "web01.raw", 24, 7);
    let t = Tmux::start(&farm.src, &format!("{} --interactive", exe()));
    // The file browser starts in the working directory; typing filters, Enter picks the VM.
    let s = t.wait("web01.raw", Duration::from_secs(20));
    assert!(s.contains("[type a path]") && s.contains("../"), "{s}");
    t.text("web01");
    t.keys(&["Enter"]);
    t.answer("Convert to qcow2?", "");
    t.answer("stages besides convert", "");
    t.answer("Engine:", "");
    // The daemon phase is asked for only now.
    let before = t.screen();
    assert!(!before.contains("Poll interval"), "the daemon settings were shown before the opt-in:\n{before}");
    t.answer("Convert on the conversion farm", "");
    t.answer("Agent instance", "");
    t.answer("Watch (queue) directory:", &farm.queue.display().to_string());
    t.answer("Output directory:", &farm.output.display().to_string());
    // A value out of range is refused with the range, then corrected.
    t.answer("Poll interval (seconds):", "99");
    t.wait("give 1 to 60 seconds", Duration::from_secs(10));
    t.keys(&["BSpace", "BSpace"]);
    t.text("1");
    t.keys(&["Enter"]);
    t.answer("Timeout (minutes):", "3");
    let s = t.wait("Start?", Duration::from_secs(10));
    assert!(s.contains("convert on the farm (daemon)") && s.contains("every 1 s, time-out 3 min"), "{s}");
    assert!(s.contains(&farm.queue.display().to_string()), "{s}");
    t.keys(&["Enter"]);
    let s = t.wait("EXIT=", Duration::from_secs(120));
    assert!(s.contains("EXIT=0"), "{s}");
    let qcow2 = farm.output.join("web01.qcow2");
    assert!(s.contains(&qcow2.display().to_string()), "{s}");
    assert_identical(&vm, &qcow2);
    // The settings were used: the job went through the queue it was given.
    assert_eq!(farm.jobs_in("done").len(), 1, "{}", farm.listing());
}

#[test]
fn ctrl_c_in_the_wizard_leaves_nothing_behind() {
    let farm = Farm::new();
    sample_disk(&farm.src, "web01.raw", 8, 7);
    let t =
        Tmux::start(&farm.src, &format!("{} --interactive --vm web01.raw --output {}", exe(), farm.queue.display()));
    t.answer("Export web01.raw?", "");
    t.answer("Convert to qcow2?", "n");
    t.wait("Queue directory to publish into:", Duration::from_secs(20));
    t.keys(&["C-c"]);
    let s = t.wait("EXIT=", Duration::from_secs(20));
    assert!(s.contains("EXIT=130") && s.contains("cancelled; nothing was written"), "{s}");
    let left: Vec<_> = std::fs::read_dir(&farm.queue).unwrap().collect();
    assert!(left.is_empty(), "the wizard wrote into the queue: {}", farm.listing());
}

#[test]
fn the_wizard_needs_a_terminal() {
    let out =
        Command::new(bin("hyperexport")).arg("--interactive").stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a terminal"));
}

/// `--provider vsphere`: the wizard lists the vCenter's VMs (govmomi's simulator with the export
/// half, `tests/vcsim`), takes a running VM only with a snapshot export, and exports the VM picked.
#[test]
fn the_wizard_picks_a_vm_from_the_vcenter_and_converts_it_here() {
    let farm = Farm::new();
    let raw = raw_disk(&farm.src.join("boot.raw"), 16 << 20, &[(0, 2 << 20), (9 << 20, 64 << 10)], 21);
    let vmdk = convert(&raw, &farm.src.join("boot.vmdk"), "vmdk", Some("subformat=streamOptimized"));
    let vc = Vcsim::start(&farm.path().join("vcsim"), &[vmdk], &[]);
    let out = farm.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let t = Tmux::start(&farm.src, &format!("{} --interactive {}", exe(), vc.flags().join(" ")));
    let s = t.wait("type to filter", Duration::from_secs(30));
    assert!(s.contains("VM on 127.0.0.1:"), "{s}");
    assert!(s.contains("/DC0/vm/ubuntu-server") && s.contains("poweredOff"), "{s}");
    assert!(s.contains("/DC0/vm/running-vm") && s.contains("poweredOn"), "{s}");
    // The running VM: declining the snapshot goes back to the list.
    t.text("running-vm");
    t.keys(&["Enter"]);
    t.answer("is running: export it from a snapshot", "");
    t.wait("type to filter", Duration::from_secs(20));
    t.text("ubuntu-server");
    t.keys(&["Enter"]);
    t.answer("Convert to qcow2?", "");
    t.answer("stages besides convert", "");
    t.answer("Engine:", "");
    t.answer("Convert on the conversion farm", "n");
    t.answer("Directory for the qcow2:", &out.display().to_string());
    let s = t.wait("Start?", Duration::from_secs(10));
    assert!(s.contains("/DC0/vm/ubuntu-server") && s.contains("Source:    vSphere"), "{s}");
    assert!(!s.contains("from a snapshot if it runs"), "no snapshot was agreed to: {s}");
    t.keys(&["Enter"]);
    let s = t.wait("EXIT=", Duration::from_secs(120));
    assert!(s.contains("EXIT=0"), "{s}");
    assert_identical(&raw, &out.join("ubuntu-server.qcow2"));
    assert_eq!(vc.count("HttpNfcLeaseComplete"), 1, "{:#?}", vc.events());
    assert_eq!(vc.count("lease"), 1, "one export, of the VM picked: {:#?}", vc.events());

    // A wrong password: the vCenter's refusal and its exit code (2), before any question.
    let wrong = farm.path().join("wrong-password");
    std::fs::write(&wrong, "not-it\n").unwrap();
    let flags = vc.flags().join(" ").replace(&vc.password_file.display().to_string(), &wrong.display().to_string());
    let t = Tmux::start(&farm.src, &format!("{} --interactive {flags}", exe()));
    let s = t.wait("EXIT=", Duration::from_secs(30));
    assert!(s.contains("EXIT=2") && s.contains("vSphere"), "{s}");
    // A vCenter configured but no --provider: the wizard asks for the source. A folder without
    // VMs: said, exit 3.
    let flags = vc.flags()[2..].join(" ");
    let t = Tmux::start(&farm.src, &format!("{} --interactive {flags} --folder /DC0/vm/nothing-here", exe()));
    t.wait("Source:", Duration::from_secs(20));
    t.text("vSphere");
    t.keys(&["Enter"]);
    let s = t.wait("EXIT=", Duration::from_secs(30));
    assert!(s.contains("EXIT=3") && s.contains("has no VM below /DC0/vm/nothing-here"), "{s}");
}
