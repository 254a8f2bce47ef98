//! gRPC over real sockets: live progress, fallback to polling and back, cancel, health,
//! TLS and mutual TLS, control permissions.

use std::fs;
use std::time::Duration;

use hyperfarm_tests::certs::Ca;
use hyperfarm_tests::images::{self, assert_identical};
use hyperfarm_tests::{Farm, Proc, bin, free_port, hyperctl, lease_phase, publish, slow_config, slow_disk, wait_for};

#[test]
fn the_watch_stream_carries_real_progress_to_the_final_state() {
    let farm = Farm::new();
    let raw = slow_disk(&farm, "p.raw", 70);
    let cfg = slow_config(&farm);
    let _agent = farm.agent(&["--config", &cfg]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let id = publish(&farm, &raw, "progress");
    let ran = hyperctl(&["--agent", &url, "--json", "jobs", "watch", &id]);
    ran.expect_code(0);
    let updates: Vec<serde_json::Value> = ran.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let converting: Vec<f64> = updates
        .iter()
        .filter(|u| u["job"]["phase"] == "converting" && u["heartbeat"] == false)
        .map(|u| u["job"]["percent"].as_f64().unwrap())
        .collect();
    assert!(converting.len() >= 5, "too few progress events: {converting:?}");
    assert!(converting.windows(2).all(|w| w[0] <= w[1]), "progress goes forward: {converting:?}");
    assert!(converting.iter().any(|p| *p > 10.0 && *p < 90.0), "progress in between: {converting:?}");
    assert!(
        updates.iter().any(|u| u["job"]["rate_bytes_per_second"].as_f64().unwrap_or(0.0) > 0.0),
        "a rate is reported"
    );
    let last = updates.last().unwrap();
    assert_eq!(last["final"], true);
    assert_eq!(last["job"]["state"], "done");
    assert_eq!(last["job"]["files"][0], "progress.qcow2");
    assert_identical(&raw, &farm.output.join("progress.qcow2"));
}

#[test]
fn the_exporter_falls_back_to_polling_when_the_agent_dies_and_returns_to_the_stream() {
    let farm = Farm::new();
    let raw = slow_disk(&farm, "f.raw", 71);
    let cfg = slow_config(&farm);
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let mut a = farm.agent(&["--config", &cfg, "--listen", &listen]);
    let exporter_args: Vec<String> = [
        "--vm",
        raw.to_str().unwrap(),
        "--name",
        "fallback",
        "--pipeline",
        "--hyper2kvm-daemon",
        "--agent",
        &url,
        "--hyper2kvm-watch-dir",
        farm.queue.to_str().unwrap(),
        "--hyper2kvm-output-dir",
        farm.output.to_str().unwrap(),
        "--hyper2kvm-poll-interval",
        "200ms",
        "--hyper2kvm-daemon-timeout",
        "5m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut exporter = Proc::spawn(&bin("hyperexport"), &exporter_args, farm.path(), &[]);
    exporter.wait_log("daemon mode with live progress", Duration::from_secs(60));
    wait_for("the conversion to start", Duration::from_secs(60), || {
        (lease_phase(&farm).as_deref() == Some("converting")).then_some(())
    });
    a.kill9();
    exporter.wait_log("falling back to polling", Duration::from_secs(30));
    // A new agent on the same address recovers the job (its owner is dead) and converts it.
    let _b = farm.agent(&["--config", &cfg, "--listen", &listen]);
    exporter.wait_log("back on the gRPC stream", Duration::from_secs(30));
    let st = exporter.wait_exit(Duration::from_secs(180));
    assert!(st.success(), "exporter exit {st}:\n{}", exporter.log_text());
    assert!(exporter.log_text().contains(&farm.output.join("fallback.qcow2").display().to_string()));
    assert_identical(&raw, &farm.output.join("fallback.qcow2"));
    assert_eq!(farm.records().len(), 1);
}

#[test]
fn cancel_withdraws_a_queued_job_and_stops_a_running_one() {
    let farm = Farm::new();
    let raw = slow_disk(&farm, "c.raw", 72);
    let cfg = slow_config(&farm);
    let _agent = farm.agent(&["--config", &cfg, "--max-concurrent", "1"]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let running = publish(&farm, &raw, "running");
    wait_for("the conversion to start", Duration::from_secs(60), || {
        (lease_phase(&farm).as_deref() == Some("converting")).then_some(())
    });
    let queued = publish(&farm, &raw, "waiting");
    assert_eq!(farm.jobs_in("queued"), vec![queued.clone()]);

    let r = hyperctl(&["--agent", &url, "--json", "jobs", "cancel", &queued, "--reason", "not needed"]);
    r.expect_code(0);
    assert_eq!(r.json()["state"], "cancelled");
    assert_eq!(farm.jobs_in("cancelled"), vec![queued.clone()]);

    let r = hyperctl(&["--agent", &url, "--json", "jobs", "cancel", &running, "--reason", "wrong VM"]);
    r.expect_code(0);
    assert_eq!(r.json()["state"], "converting");
    wait_for("the cancelled result", Duration::from_secs(30), || farm.records().first().cloned());
    let rec = &farm.records()[0];
    assert_eq!(rec["state"], "cancelled");
    let err = fs::read_to_string(farm.output.join("running.error")).unwrap();
    assert!(err.starts_with("cancelled: wrong VM"), "{err}");
    assert!(!farm.output.join("running.qcow2").exists());
    wait_for("both jobs in cancelled/", Duration::from_secs(10), || {
        (farm.jobs_in("cancelled").len() == 2).then_some(())
    });
    assert_eq!(fs::read_dir(farm.output.join(".hyperfarm/tmp")).unwrap().count(), 0, "partial output removed");
    let r = hyperctl(&["--agent", &url, "--json", "jobs", "show", &running]);
    r.expect_code(0);
    assert_eq!(r.json()["state"], "cancelled", "{}", r.stdout());
    assert!(r.json()["error"].as_str().unwrap().contains("wrong VM"));
    // Unknown job: exit 3.
    hyperctl(&["--agent", &url, "jobs", "cancel", "01a21bc3-01d4-71f7-a2c5-7811a189a250"]).expect_code(3);
}

/// A read-only bind mount of a directory, undone on drop.
struct ReadOnly(std::path::PathBuf);

impl ReadOnly {
    fn new(dir: &std::path::Path) -> ReadOnly {
        let run = |args: &[&str]| {
            let st = std::process::Command::new("mount").args(args).status().expect("mount runs");
            assert!(st.success(), "mount {args:?} failed: these tests need root (CI runs them as root)");
        };
        let d = dir.to_str().unwrap();
        run(&["--bind", d, d]);
        run(&["-o", "remount,bind,ro", d]);
        ReadOnly(dir.to_path_buf())
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn serving(url: &str) -> Option<bool> {
    let r = hyperctl(&["--agent", url, "--json", "daemon", "status"]);
    r.json()[0]["serving"].as_bool()
}

#[test]
fn health_follows_the_output_directory() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    wait_for("SERVING", Duration::from_secs(10), || (serving(&url) == Some(true)).then_some(()));
    {
        let _ro = ReadOnly::new(&farm.output);
        wait_for("NOT_SERVING while read-only", Duration::from_secs(15), || {
            (serving(&url) == Some(false)).then_some(())
        });
        let r = hyperctl(&["--agent", &url, "daemon", "status"]);
        assert!(r.stdout().contains("NOT serving"), "{}", r.stdout());
    }
    wait_for("SERVING again", Duration::from_secs(15), || (serving(&url) == Some(true)).then_some(()));
    // Removed (renamed away) and back.
    let aside = farm.path().join("output-aside");
    fs::rename(&farm.output, &aside).unwrap();
    wait_for("NOT_SERVING while missing", Duration::from_secs(15), || (serving(&url) == Some(false)).then_some(()));
    fs::rename(&aside, &farm.output).unwrap();
    wait_for("SERVING after it returns", Duration::from_secs(15), || (serving(&url) == Some(true)).then_some(()));
}

#[test]
fn a_python_grpcio_client_lists_services_and_gets_serving() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let target = url.trim_start_matches("http://");
    let python = hyperfarm_tests::python();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_client.py");
    let out = std::process::Command::new(&python).arg(&script).arg(target).output().expect("python runs");
    assert!(out.status.success(), "{}: {}", script.display(), String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from the Python client");
    let services: Vec<&str> = v["services"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for s in [
        "hyperfarm.v1.AgentService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "{s} missing from {services:?}");
    }
    assert_eq!(v["health"], "SERVING");
    assert_eq!(v["health_agent_service"], "SERVING");
    assert_eq!(v["status"]["watchDir"], farm.queue.display().to_string());
    assert_eq!(v["status"]["engines"][0]["name"], "qemu-img");
}

#[test]
fn tls_and_mutual_tls_with_control_by_client_identity() {
    let farm = Farm::new();
    let ca = Ca::new(farm.path(), "farm");
    let other = Ca::new(farm.path(), "other");
    let server = ca.server(farm.path(), "server");
    let operator = ca.client(farm.path(), "operator", "operator");
    let viewer = ca.client(farm.path(), "viewer", "viewer");
    let stranger = other.client(farm.path(), "stranger", "operator");
    let (cert, key, cafile) =
        (server.cert.to_str().unwrap(), server.key.to_str().unwrap(), ca.cert_pem.to_str().unwrap());

    // TLS only.
    {
        let _a = farm.agent(&["--tls-cert", cert, "--tls-key", key]);
        let url = farm.agent_url.lock().unwrap().clone().unwrap();
        assert!(url.starts_with("https://"), "{url}");
        let r = hyperctl(&[
            "--agent",
            &url,
            "--agent-ca",
            cafile,
            "--agent-domain",
            "localhost",
            "--json",
            "daemon",
            "status",
        ]);
        r.expect_code(0);
        assert_eq!(r.json()[0]["status"], "running");
        // Without the CA the server is not trusted; plaintext is refused.
        hyperctl(&["--agent", &url, "daemon", "status"]).expect_code(5);
        hyperctl(&["--agent", &url.replace("https://", "http://"), "daemon", "status"]).expect_code(5);
    }
    // Mutual TLS; only "operator" may control, not even loopback callers.
    let _a = farm.agent(&[
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-client-ca",
        cafile,
        "--control-client",
        "operator",
        "--control-from-loopback",
        "false",
    ]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let with = |pair: &hyperfarm_tests::certs::Pair, extra: &[&str]| {
        let mut args = vec!["--agent", url.as_str(), "--agent-ca", cafile, "--agent-domain", "localhost"];
        args.extend(["--agent-cert", pair.cert.to_str().unwrap(), "--agent-key", pair.key.to_str().unwrap()]);
        args.extend(extra);
        hyperctl(&args)
    };
    hyperctl(&["--agent", &url, "--agent-ca", cafile, "--agent-domain", "localhost", "daemon", "status"])
        .expect_code(5);
    with(&stranger, &["daemon", "status"]).expect_code(5);
    with(&viewer, &["daemon", "status"]).expect_code(0);
    let raw = images::sample_disk(&farm.src, "t.raw", 8, 73);
    // Publish while the agent converts quickly: use a job id that is queued by stopping claims?
    // Simpler: a finished job cannot be cancelled, but permission is checked first.
    let id = publish(&farm, &raw, "tls-vm");
    let denied = with(&viewer, &["jobs", "cancel", &id]);
    denied.expect_code(9);
    assert!(denied.stderr().contains("may not control"), "{}", denied.stderr());
    with(&operator, &["jobs", "cancel", &id]).expect_code(0);
}

#[test]
fn control_by_token_and_refusal_without_it() {
    let farm = Farm::new();
    let token = farm.path().join("token");
    fs::write(&token, "s3cr3t-token-for-tests-0123456789\n").unwrap();
    let wrong = farm.path().join("wrong");
    fs::write(&wrong, "not-the-token-0123456789abcdef").unwrap();
    let _a = farm.agent(&["--control-token-file", token.to_str().unwrap(), "--control-from-loopback", "false"]);
    let url = farm.agent_url.lock().unwrap().clone().unwrap();
    let raw = images::sample_disk(&farm.src, "k.raw", 8, 74);
    let id = publish(&farm, &raw, "token-vm");
    hyperctl(&["--agent", &url, "jobs", "cancel", &id]).expect_code(9);
    hyperctl(&["--agent", &url, "--token-file", wrong.to_str().unwrap(), "jobs", "cancel", &id]).expect_code(9);
    hyperctl(&["--agent", &url, "--token-file", token.to_str().unwrap(), "jobs", "cancel", &id]).expect_code(0);
    // Reading needs no permission.
    hyperctl(&["--agent", &url, "jobs", "list"]).expect_code(0);
}

#[test]
fn plaintext_beyond_loopback_is_refused_at_start() {
    let r = hyperfarm_tests::Run::new(&bin("hyper2kvm-agent"), &["--listen".into(), "0.0.0.0:0".into()]).run();
    r.expect_code(3);
    assert!(r.stderr().contains("tls_cert"), "{}", r.stderr());
}

#[test]
fn hyperctl_queue_reads_the_share_without_an_agent() {
    let farm = Farm::new();
    let raw = images::sample_disk(&farm.src, "q.raw", 8, 75);
    publish(&farm, &raw, "a");
    publish(&farm, &raw, "b");
    let r = hyperctl(&["--json", "queue", "--watch-dir", farm.queue.to_str().unwrap()]);
    r.expect_code(0);
    let v = r.json();
    assert_eq!(v["counts"]["queued"], 2);
    assert!(v["oldest_queued"].is_string());
    let r = hyperctl(&["queue", "--watch-dir", farm.queue.to_str().unwrap()]);
    assert!(r.stdout().contains("queued      2"), "{}", r.stdout());
    // Without an agent, the jobs commands say where to look instead.
    let r = hyperctl(&["--agent", "http://127.0.0.1:1", "jobs", "list"]);
    r.expect_code(5);
    assert!(r.stderr().contains("hyperctl queue"), "{}", r.stderr());
}
