//! A cut network link (two network namespaces, one veth pair; the exporter in one "host", the
//! agent in the other, one directory standing for the NFS share): the exporter finishes by
//! polling with its own result, never a stale one, and returns to the gRPC stream once the link
//! is back. Only addresses inside the namespaces this test makes are used.

use std::fs;
use std::process::Command;
use std::time::Duration;

use hyperfarm_tests::images::assert_identical;
use hyperfarm_tests::{Farm, Proc, bin, lease_phase, slow_disk, wait_for};

struct Hosts {
    a: String,
    b: String,
    addr_b: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {} (network namespaces need root)",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Hosts {
    fn new() -> Hosts {
        let tag = std::process::id() % 100_000;
        let (a, b) = (format!("hfa{tag}"), format!("hfb{tag}"));
        let net = 1 + (std::process::id() % 250);
        let (addr_a, addr_b) = (format!("10.231.{net}.1"), format!("10.231.{net}.2"));
        let (va, vb) = (format!("hfva{tag}"), format!("hfvb{tag}"));
        let h = Hosts { a: a.clone(), b: b.clone(), addr_b: addr_b.clone() };
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        ip(&["-n", &a, "addr", "add", &format!("{addr_a}/24"), "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{addr_b}/24"), "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        h
    }

    fn link(&self, up: bool) {
        let tag = &self.b[3..];
        ip(&["-n", &self.b, "link", "set", &format!("hfvb{tag}"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

#[test]
fn a_cut_link_falls_back_to_polling_and_the_stream_returns_when_the_link_does() {
    let farm = Farm::new();
    let hosts = Hosts::new();
    let raw = slow_disk(&farm, "n.raw", 110);
    let cfg = farm.path().join("slow.toml");
    fs::write(&cfg, "[convert]\nrate_limit = \"4M\"\n").unwrap();
    // An earlier job's failure for the same VM name: never to be taken for this job's result.
    fs::write(farm.output.join("netvm.error"), "an earlier failure\n").unwrap();

    let listen = format!("{}:50071", hosts.addr_b);
    let mut agent_args: Vec<String> =
        vec!["netns".into(), "exec".into(), hosts.b.clone(), bin("hyper2kvm-agent").display().to_string()];
    agent_args.extend(farm.agent_args());
    agent_args.extend([
        "--listen".into(),
        listen.clone(),
        "--insecure-listen".into(),
        "--config".into(),
        cfg.display().to_string(),
    ]);
    let mut agent = Proc::spawn(std::path::Path::new("/usr/sbin/ip"), &agent_args, farm.path(), &[]);
    agent.wait_log("INFO ready", Duration::from_secs(30));

    let exporter_args: Vec<String> = [
        "netns",
        "exec",
        &hosts.a,
        bin("hyperexport").to_str().unwrap(),
        "--vm",
        raw.to_str().unwrap(),
        "--name",
        "netvm",
        "--pipeline",
        "--hyper2kvm-daemon",
        "--agent",
        &format!("http://{listen}"),
        "--hyper2kvm-watch-dir",
        farm.queue.to_str().unwrap(),
        "--hyper2kvm-output-dir",
        farm.output.to_str().unwrap(),
        "--hyper2kvm-poll-interval",
        "300ms",
        "--hyper2kvm-daemon-timeout",
        "5m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut exporter = Proc::spawn(std::path::Path::new("/usr/sbin/ip"), &exporter_args, farm.path(), &[]);
    exporter.wait_log("daemon mode with live progress", Duration::from_secs(60));
    wait_for("the conversion to start", Duration::from_secs(60), || {
        (lease_phase(&farm).as_deref() == Some("converting")).then_some(())
    });

    hosts.link(false);
    exporter.wait_log("falling back to polling", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    hosts.link(true);
    exporter.wait_log("back on the gRPC stream", Duration::from_secs(30));
    let st = exporter.wait_exit(Duration::from_secs(180));
    assert!(st.success(), "exporter: {st}\n{}", exporter.log_text());
    let log = exporter.log_text();
    assert!(!log.contains("an earlier failure"), "the stale .error was taken: {log}");
    assert!(log.contains(&farm.output.join("netvm.qcow2").display().to_string()), "{log}");
    assert_identical(&raw, &farm.output.join("netvm.qcow2"));
    assert!(!farm.output.join("netvm.error").exists(), "the contradicting old error is gone");
    agent.kill9();
}

/// On an export host the packaged agent's default instance listens on the default address but
/// watches its own local queue: an exporter that submits to the shared queue must not follow
/// it (it would never see the job), and goes on by polling the shared queue's output instead.
#[test]
fn a_local_agent_watching_another_queue_is_not_followed() {
    let farm = Farm::new();
    let local = Farm::new();
    let hosts = Hosts::new();
    let disk = hyperfarm_tests::images::raw_disk(&farm.src.join("o.raw"), 8 << 20, &[(1 << 20, 1 << 20)], 7);
    // The export host's own agent: default address 127.0.0.1:50071 inside namespace a.
    let wrapper = ["/usr/sbin/ip", "netns", "exec", hosts.a.as_str()];
    let mut local_agent = local.agent_via(&wrapper, &["--listen", "127.0.0.1:50071"]);
    // The conversion host's agent on the shared queue, unreachable over gRPC from here.
    let _farm_agent = farm.agent(&[]);
    let exporter = bin("hyperexport");
    let args: Vec<String> = [
        "netns",
        "exec",
        hosts.a.as_str(),
        exporter.to_str().unwrap(),
        "--vm",
        disk.to_str().unwrap(),
        "--name",
        "othervm",
        "--pipeline",
        "--hyper2kvm-daemon",
        "--hyper2kvm-watch-dir",
        farm.queue.to_str().unwrap(),
        "--hyper2kvm-output-dir",
        farm.output.to_str().unwrap(),
        "--hyper2kvm-poll-interval",
        "200ms",
        "--hyper2kvm-daemon-timeout",
        "2m",
    ]
    .map(String::from)
    .to_vec();
    let ran = hyperfarm_tests::Run::new(std::path::Path::new("/usr/sbin/ip"), &args).run();
    ran.expect_code(0);
    let err = ran.stderr();
    assert!(err.contains("127.0.0.1:50071 (watches another queue:"), "the local agent was not skipped:\n{err}");
    assert!(ran.stdout().contains(&farm.output.join("othervm.qcow2").display().to_string()), "{}", ran.stdout());
    assert_identical(&disk, &farm.output.join("othervm.qcow2"));
    assert!(local.jobs_in("queued").is_empty() && local.records().is_empty(), "nothing went to the local queue");
    local_agent.kill9();
}
