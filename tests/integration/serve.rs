//! `hyperexport serve`: the HTTP API over real sockets, jobs run by the real hyperexport and
//! converted by a real agent with real qemu-img, the SQLite history across a SIGKILL of serve.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyperfarm_tests::http::{self, follow_events, get, post_json, request};
use hyperfarm_tests::images::{assert_identical, sample_disk};
use hyperfarm_tests::{Farm, Proc, Run, bin, wait_for};

/// Start serve for `farm` (its queue and output as the defaults) with a state directory.
fn serve(farm: &Farm, state: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Proc, SocketAddr) {
    let cfg = farm.path().join("hyperexport.toml");
    std::fs::write(
        &cfg,
        format!(
            "watch_dir = {:?}\noutput_dir = {:?}\npoll_interval = \"200ms\"\n",
            farm.queue.display().to_string(),
            farm.output.display().to_string()
        ),
    )
    .unwrap();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--state-dir".into(),
        state.display().to_string(),
        "--config".into(),
        cfg.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut p = Proc::spawn(&bin("hyperexport"), &args, farm.path(), env);
    p.wait_log("listening on http://", Duration::from_secs(30));
    let log = p.log_text();
    let at = log.find("listening on http://").unwrap() + "listening on http://".len();
    let addr: SocketAddr = log[at..].split('/').next().unwrap().parse().unwrap();
    (p, addr)
}

fn daemon_request(vm: &Path, name: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name, "vm_path": vm, "format": "qcow2",
        "options": {"enable_pipeline": true, "hyper2kvm_daemon": true, "hyper2kvm_poll_interval": 1,
                    "hyper2kvm_daemon_timeout": 5, "libvirt_integration": false},
    })
}

fn job(addr: SocketAddr, id: &str) -> serde_json::Value {
    let r = get(addr, &format!("/api/v1/jobs/{id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn wait_state(addr: SocketAddr, id: &str, state: &str, limit: Duration) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(&format!("job {id} {state}"), limit, || {
            last = job(addr, id);
            (last["state"] == state).then(|| last.clone())
        })
    }));
    found.unwrap_or_else(|_| panic!("job {id} never reached {state}; last seen:\n{last:#}"))
}

fn ids(r: &http::Response) -> Vec<String> {
    r.json()["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_seed_shaped_submission_is_converted_and_followed_live() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let state = farm.path().join("state");
    let (_serve, addr) = serve(&farm, &state, &[], &[]);
    let a = sample_disk(&farm.src, "alpha.raw", 24, 1);
    let b = sample_disk(&farm.src, "beta.raw", 16, 2);

    // Live updates, followed from before the submission.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<String>>();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        follow_events(addr, "/api/v1/events", "job", Duration::from_secs(90), |d| {
            let j: serde_json::Value = serde_json::from_str(d).unwrap();
            if j["name"] == "alpha" {
                seen.push(j["state"].as_str().unwrap().to_string());
            }
            j["name"] == "alpha" && j["state"] == "done"
        });
        tx.send(seen).unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));

    let r = post_json(
        addr,
        "/api/v1/jobs",
        &serde_json::json!({"jobs": [daemon_request(&a, "alpha"), daemon_request(&b, "beta")]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let ids = ids(&r);
    assert_eq!(ids.len(), 2);
    for (id, raw, name) in [(&ids[0], &a, "alpha"), (&ids[1], &b, "beta")] {
        let j = wait_state(addr, id, "done", Duration::from_secs(90));
        let files = j["files"].as_array().unwrap();
        assert_eq!(files.len(), 1, "{j:#}");
        let qcow2 = PathBuf::from(files[0].as_str().unwrap());
        assert_eq!(qcow2, farm.output.join(format!("{name}.qcow2")));
        assert_identical(raw, &qcow2);
        assert_eq!(j["queue_job_id"], j["id"], "the queue job carries serve's id");
        assert_eq!(j["exit_code"], 0);
        let log = get(addr, &format!("/api/v1/jobs/{id}/log?lines=50")).json();
        assert!(
            log["lines"].as_array().unwrap().iter().any(|l| l["line"].as_str().unwrap().contains("published")),
            "{log:#}"
        );
    }
    let seen = rx.recv_timeout(Duration::from_secs(90)).unwrap();
    watcher.join().unwrap();
    assert!(seen.iter().any(|s| s == "exporting"), "the browser saw the export: {seen:?}");
    assert!(seen.iter().any(|s| s == "queued" || s == "converting"), "and the farm's part: {seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("done"));

    // Lists, the dashboard (readable without JavaScript) and the metrics agree.
    let list = get(addr, "/api/v1/jobs?state=done").json();
    assert_eq!(list["total"], 2);
    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("alpha") && page.body.contains("s-done"), "{}", page.body);
    let detail = get(addr, &format!("/jobs/{}", ids[0]));
    assert!(detail.body.contains(&farm.output.join("alpha.qcow2").display().to_string()), "{}", detail.body);
    let m = get(addr, "/metrics").body;
    assert!(m.lines().any(|l| l == "hyperexport_jobs{state=\"done\"} 2"), "{m}");
    assert!(m.contains("hyperexport_jobs_finished_total{result=\"done\"} 2"), "{m}");
    assert!(m.lines().any(|l| l == format!("hyperexport_exported_bytes_total {}", (24 + 16) << 20)), "{m}");
    let agents = get(addr, "/api/v1/agents").json();
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1, "{agents:#}");
    assert_eq!(agents["agents"][0]["fresh"], true);
    let q = get(addr, "/api/v1/queue").json();
    assert_eq!(q["reachable"], true, "{q:#}");
    assert_eq!(q["summary"]["counts"]["done"], 2, "{q:#}");
}

#[test]
fn bad_requests_get_a_4xx_naming_the_field_and_nothing_runs() {
    let farm = Farm::new();
    let (_serve, addr) = serve(&farm, &farm.path().join("state"), &[], &[]);
    let vm = sample_disk(&farm.src, "vm.raw", 4, 1);
    let good = daemon_request(&vm, "good");
    let mut bad_poll = good.clone();
    bad_poll["options"]["hyper2kvm_poll_interval"] = 61.into();
    let mut bad_timeout = good.clone();
    bad_timeout["options"]["hyper2kvm_daemon_timeout"] = 241.into();
    let mut missing = good.clone();
    missing["vm_path"] = "/nonexistent/vm.ova".into();
    let mut unknown = good.clone();
    unknown["options"]["surprise"] = true.into();
    for (body, status, field) in [
        (serde_json::json!([good.clone(), bad_poll]), 422, Some("jobs[1].options.hyper2kvm_poll_interval")),
        (bad_timeout, 422, Some("options.hyper2kvm_daemon_timeout")),
        (missing, 422, Some("vm_path")),
        (unknown, 422, Some("options.surprise")),
        (serde_json::json!({"jobs": []}), 422, Some("jobs")),
        (serde_json::json!("text"), 400, None),
    ] {
        let r = post_json(addr, "/api/v1/jobs", &body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let j = r.json();
        assert!(!j["error"].as_str().unwrap().is_empty());
        assert_eq!(j["field"].as_str(), field, "{body}: {}", r.body);
    }
    let r = request(addr, "POST", "/api/v1/jobs", &[("Content-Type", "text/plain")], Some(&good.to_string()));
    assert_eq!(r.status, 415, "{}", r.body);
    // A page elsewhere cannot make a browser here submit or cancel.
    let r = request(
        addr,
        "POST",
        "/api/v1/jobs",
        &[("Content-Type", "application/json"), ("Origin", "http://evil.example")],
        Some(&good.to_string()),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = request(
        addr,
        "POST",
        "/submit",
        &[("Content-Type", "application/x-www-form-urlencoded"), ("Sec-Fetch-Site", "cross-site")],
        Some("vm_path=/x"),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // A page that rebinds its own name to 127.0.0.1 (DNS rebinding) gets nothing.
    let r = request(addr, "GET", "/api/v1/jobs", &[("Host", "evil.example:8470")], None);
    assert_eq!(r.status, 421, "{}", r.body);
    assert_eq!(get(addr, "/api/v1/jobs?state=sideways").status, 400);
    assert_eq!(get(addr, "/api/v1/jobs?limit=0").json()["field"], "limit");
    assert_eq!(get(addr, "/api/v1/jobs/nope").status, 404);
    assert_eq!(request(addr, "POST", "/api/v1/jobs/nope/cancel", &[], None).status, 404);
    // The batch with one bad job accepted none.
    assert_eq!(get(addr, "/api/v1/jobs").json()["total"], 0);
    assert!(farm.jobs_in("queued").is_empty());
    // The form shows its error, naming the field, and keeps what was typed.
    let form = format!("vm_path={}&enable_pipeline=on&hyper2kvm_daemon=on&hyper2kvm_poll_interval=99", vm.display());
    let r = request(addr, "POST", "/submit", &[("Content-Type", "application/x-www-form-urlencoded")], Some(&form));
    assert_eq!(r.status, 422);
    assert!(r.body.contains("options.hyper2kvm_poll_interval") && r.body.contains("give 1 to 60"), "{}", r.body);
    assert!(r.body.contains(&format!("value=\"{}\"", vm.display())), "{}", r.body);
    // The OpenAPI document is served.
    let doc = get(addr, "/openapi.json").json();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/api/v1/jobs"]["post"].is_object());
}

#[test]
fn a_cancel_stops_an_export_and_withdraws_a_queued_job() {
    let farm = Farm::new();
    let state = farm.path().join("state");
    // No agent: a published job stays queued. The first export stops at the failpoint (SIGSTOP)
    // right after staging, so the cancel reaches it mid-export.
    let (serve_proc, addr) =
        serve(&farm, &state, &["--max-concurrent", "2"], &[("HYPERFARM_FAILPOINT", "stop:export.staged")]);
    let vm = sample_disk(&farm.src, "vm.raw", 8, 1);
    let r = post_json(addr, "/api/v1/jobs", &daemon_request(&vm, "mid-export"));
    let id = ids(&r)[0].clone();
    let pid = wait_for("the export child stopped at the failpoint", Duration::from_secs(30), || {
        let j = job(addr, &id);
        let _ = j;
        child_of(serve_proc.pid(), &id).filter(|p| proc_state(*p) == Some('T'))
    });
    let r = request(addr, "POST", &format!("/api/v1/jobs/{id}/cancel"), &[], None);
    assert_eq!(r.status, 202, "{}", r.body);
    // The SIGTERM is delivered when the child goes on.
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::CONT,
    );
    let j = wait_state(addr, &id, "cancelled", Duration::from_secs(30));
    assert!(j["files"].as_array().unwrap().is_empty());
    let first = id.clone();
    wait_for("the staged copy removed", Duration::from_secs(10), || {
        std::fs::read_dir(farm.queue.join("tmp"))
            .map(|d| d.filter_map(Result::ok).all(|e| e.file_name().to_string_lossy().starts_with('.')))
            .unwrap_or(true)
            .then_some(())
    });
    assert!(farm.jobs_in("queued").is_empty(), "{}", farm.listing());
    assert_eq!(request(addr, "POST", &format!("/api/v1/jobs/{id}/cancel"), &[], None).status, 409);
    drop(serve_proc);

    // A job in the queue: withdrawn at once (no agent claimed it).
    let (_serve, addr) = serve(&farm, &state, &[], &[]);
    let r = post_json(addr, "/api/v1/jobs", &daemon_request(&vm, "queued"));
    let id = ids(&r)[0].clone();
    wait_state(addr, &id, "queued", Duration::from_secs(30));
    let r = request(
        addr,
        "POST",
        &format!("/jobs/{id}/cancel"),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(""),
    );
    assert_eq!(r.status, 303, "the page's cancel button redirects back: {}", r.body);
    let j = wait_state(addr, &id, "cancelled", Duration::from_secs(30));
    assert_eq!(j["exit_code"], 7, "{j:#}");
    // The first job is not queued either way: its export stopped while it copied (or, had the
    // SIGTERM been handled only as the job was renamed into place, withdrew it).
    let cancelled = farm.jobs_in("cancelled");
    assert!(cancelled.contains(&id) && cancelled.iter().all(|j| *j == id || *j == first), "{cancelled:?}");
    // A retry of a cancelled job submits it anew, under a new queue id.
    let r = request(addr, "POST", &format!("/api/v1/jobs/{id}/retry"), &[], None);
    assert_eq!(r.status, 202, "{}", r.body);
    let j = wait_state(addr, &id, "queued", Duration::from_secs(30));
    assert_ne!(j["queue_job_id"].as_str().unwrap(), id);
    assert_eq!(j["attempts"], 2);
}

/// The pid of serve's child running queue job `id`.
fn child_of(parent: u32, id: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid =
            stat.rsplit(')').next().and_then(|s| s.split_whitespace().nth(1)).and_then(|s| s.parse::<u32>().ok());
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent) && String::from_utf8_lossy(&cmd).contains(id) {
            return Some(pid);
        }
    }
    None
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().next()?.chars().next()
}

fn alive(pid: u32) -> bool {
    proc_state(pid).is_some_and(|s| s != 'Z')
}

#[test]
fn a_restart_of_serve_interrupts_an_export_and_the_retry_submits_it_once() {
    let farm = Farm::new();
    let _agent = farm.agent(&[]);
    let state = farm.path().join("state");
    let vm = sample_disk(&farm.src, "vm.raw", 8, 3);
    // The child stops just before its publishing rename.
    let (mut s1, addr) = serve(&farm, &state, &[], &[("HYPERFARM_FAILPOINT", "stop:export.before-rename")]);
    let id = ids(&post_json(addr, "/api/v1/jobs", &daemon_request(&vm, "restart")))[0].clone();
    let child = wait_for("the export stopped before publishing", Duration::from_secs(30), || {
        child_of(s1.pid(), &id).filter(|p| proc_state(*p) == Some('T'))
    });
    assert_eq!(job(addr, &id)["state"], "exporting");
    s1.kill9();
    // (A stopped child in a process group orphaned by serve's death gets SIGHUP from the kernel;
    // a running one lives on: see the published-job test.)

    let (_s2, addr) = serve(&farm, &state, &[], &[]);
    // Two outcomes, both correct. The orphaned export, continued by the kernel (SIGCONT to an
    // orphaned stopped group), dies of the SIGHUP that comes with it — unless SIGHUP is ignored
    // (a harness started under nohup), in which case it publishes before the new serve looks.
    let j = wait_for("interrupted, or followed after being published meanwhile", Duration::from_secs(30), || {
        let j = job(addr, &id);
        matches!(j["state"].as_str(), Some("interrupted" | "queued" | "converting" | "done")).then_some(j)
    });
    wait_for("the export gone", Duration::from_secs(10), || (!alive(child)).then_some(()));
    let attempts = if j["state"] == "interrupted" {
        assert!(j["error"].as_str().unwrap().contains("Retry it"), "{j:#}");
        assert!(farm.jobs_in("queued").is_empty() && farm.jobs_in("done").is_empty(), "{}", farm.listing());
        let r = request(addr, "POST", &format!("/api/v1/jobs/{id}/retry"), &[], None);
        assert_eq!(r.status, 202, "{}", r.body);
        2
    } else {
        let log = get(addr, &format!("/api/v1/jobs/{id}/log?lines=200")).body;
        assert!(log.contains("the job is in the queue, following it"), "{log}");
        1
    };
    let j = wait_state(addr, &id, "done", Duration::from_secs(60));
    assert_eq!(j["attempts"], attempts);
    assert_eq!(j["queue_job_id"], id.as_str(), "an interrupted job keeps its queue id");
    assert_eq!(farm.jobs_in("done"), vec![id.clone()], "submitted once: {}", farm.listing());
    assert_identical(&vm, &farm.output.join("vm.qcow2"));
}

#[test]
fn a_restart_of_serve_follows_a_published_job_again_without_resubmitting() {
    let farm = Farm::new();
    let state = farm.path().join("state");
    let vm = sample_disk(&farm.src, "vm.raw", 8, 4);
    // No agent yet: the job is published and waits in the queue.
    let (mut s1, addr) = serve(&farm, &state, &[], &[]);
    let id = ids(&post_json(addr, "/api/v1/jobs", &daemon_request(&vm, "published")))[0].clone();
    wait_state(addr, &id, "queued", Duration::from_secs(30));
    let follower = child_of(s1.pid(), &id).expect("the child following the job");
    s1.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(follower), "the follower outlived serve (no systemd here to end its group)");
    let (_s2, addr) = serve(&farm, &state, &[], &[]);
    wait_for("the old follower killed by the new serve", Duration::from_secs(10), || (!alive(follower)).then_some(()));
    let _agent = farm.agent(&[]);
    let j = wait_state(addr, &id, "done", Duration::from_secs(60));
    assert_eq!(j["attempts"], 1);
    assert_eq!(farm.jobs_in("done"), vec![id.clone()], "{}", farm.listing());
    let log = get(addr, &format!("/api/v1/jobs/{id}/log?lines=200")).body;
    assert!(log.contains("following this job again") && log.contains("not submitting it again"), "{log}");
}

#[test]
fn serve_needs_tls_and_a_token_beyond_loopback_and_checks_the_token() {
    let farm = Farm::new();
    let state = farm.path().join("state");
    let out = Run::new(
        &bin("hyperexport"),
        &["serve".into(), "--listen".into(), "0.0.0.0:0".into(), "--state-dir".into(), state.display().to_string()],
    )
    .timeout(Duration::from_secs(20))
    .run();
    out.expect_code(2);
    assert!(out.stderr().contains("--tls-cert, --tls-key and --token-file"), "{}", out.stderr());
    let token_file = farm.path().join("token");
    std::fs::write(&token_file, "short").unwrap();
    let out = Run::new(
        &bin("hyperexport"),
        &[
            "serve".into(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
        ],
    )
    .timeout(Duration::from_secs(20))
    .run();
    out.expect_code(2);
    assert!(out.stderr().contains("at least 16 visible ASCII characters"), "{}", out.stderr());

    // vSphere settings are checked at start: a vSphere default without a vCenter, and a password
    // file that cannot be read, stop serve with exit 2 and what to give.
    let serve_with = |extra: &[&str]| {
        let mut a: Vec<String> = vec!["serve".into(), "--state-dir".into(), state.display().to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        Run::new(&bin("hyperexport"), &a).env("GOVC_URL", "").timeout(Duration::from_secs(20)).run()
    };
    let out = serve_with(&["--provider", "vsphere"]);
    out.expect_code(2);
    assert!(out.stderr().contains("--vsphere-url"), "{}", out.stderr());
    let missing = farm.path().join("no-such-password-file");
    let out = serve_with(&[
        "--vsphere-url",
        "https://vcenter.invalid/sdk",
        "--vsphere-user",
        "svc-export@vsphere.local",
        "--vsphere-password-file",
        &missing.display().to_string(),
    ]);
    out.expect_code(2);
    assert!(
        out.stderr().contains("--vsphere-password-file") && out.stderr().contains("no-such-password-file"),
        "{}",
        out.stderr()
    );

    let token = "0123456789abcdef-serve-token";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let (_serve, addr) = serve(&farm, &state, &["--token-file", &token_file.display().to_string()], &[]);
    let r = get(addr, "/api/v1/jobs");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(get(addr, "/metrics").status, 401);
    assert_eq!(get(addr, "/").status, 303, "the dashboard sends browsers to /login");
    assert_eq!(
        request(addr, "GET", "/api/v1/jobs", &[("Authorization", "Bearer wrong-token-0123456789")], None).status,
        401
    );
    assert_eq!(
        request(addr, "GET", "/api/v1/jobs", &[("Authorization", &format!("bearer {token}"))], None).status,
        200
    );
    assert_eq!(get(addr, "/api/v1/health").status, 200);
    let r = request(
        addr,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        Some(&format!("token={token}")),
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let cookie = r.header("set-cookie").unwrap().split(';').next().unwrap().to_string();
    assert!(r.header("set-cookie").unwrap().contains("HttpOnly"));
    assert_eq!(request(addr, "GET", "/", &[("Cookie", &cookie)], None).status, 200);
    let r =
        request(addr, "POST", "/login", &[("Content-Type", "application/x-www-form-urlencoded")], Some("token=nope"));
    assert_eq!(r.status, 401);
}

#[test]
fn serve_beyond_loopback_speaks_https_and_wants_the_token() {
    let farm = Farm::new();
    let state = farm.path().join("state");
    let ca = hyperfarm_tests::certs::Ca::new(farm.path(), "serve-ca");
    let pair = ca.server(farm.path(), "serve");
    let token_file = farm.path().join("token");
    let token = "abcdefghijklmnop-0123456789";
    std::fs::write(&token_file, token).unwrap();
    let args: Vec<String> = [
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--state-dir",
        &state.display().to_string(),
        "--tls-cert",
        &pair.cert.display().to_string(),
        "--tls-key",
        &pair.key.display().to_string(),
        "--token-file",
        &token_file.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Proc::spawn(&bin("hyperexport"), &args, farm.path(), &[]);
    p.wait_log("listening on https://", Duration::from_secs(30));
    let log = p.log_text();
    let at = log.find("listening on https://").unwrap() + "listening on https://".len();
    let port = log[at..].split('/').next().unwrap().rsplit(':').next().unwrap().to_string();
    // Over loopback (the listener is on every address): curl checks the certificate against the CA.
    let curl = |extra: &[&str]| {
        let mut a: Vec<String> = vec![
            "-sS".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--cacert".into(),
            ca.cert_pem.display().to_string(),
            "--resolve".into(),
            format!("localhost:{port}:127.0.0.1"),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(format!("https://localhost:{port}/api/v1/jobs"));
        Run::new(std::path::Path::new("curl"), &a).timeout(Duration::from_secs(20)).run()
    };
    let r = curl(&[]);
    assert_eq!(r.stdout(), "401", "{}", r.stderr());
    let auth = format!("Authorization: Bearer {token}");
    let r = curl(&["-H", &auth]);
    assert_eq!(r.stdout(), "200", "{}", r.stderr());
    // Plain HTTP on the TLS port gets nowhere.
    let plain = Run::new(
        std::path::Path::new("curl"),
        &["-sS".into(), "-m".into(), "5".into(), format!("http://127.0.0.1:{port}/api/v1/health")],
    )
    .timeout(Duration::from_secs(20))
    .run();
    assert_ne!(plain.code(), Some(0), "{}", plain.stdout());
}

#[test]
fn a_second_run_with_the_same_job_id_follows_the_job_even_when_the_vm_is_gone() {
    let farm = Farm::new();
    let vm = sample_disk(&farm.src, "gone.raw", 8, 9);
    let id = "01900000-0000-7000-8000-0000000000a1";
    // Published without an agent, not waited for.
    farm.export(&vm, &["--detach", "--job-id", id]).expect_code(0);
    assert_eq!(farm.jobs_in("queued"), vec![id.to_string()]);
    let copy = farm.path().join("kept.raw");
    std::fs::rename(&vm, &copy).unwrap();
    let _agent = farm.agent(&[]);
    // The same command again: the VM is gone, the job is in the queue — followed, not refused,
    // not submitted again, not converted here.
    let ran = farm.export(&vm, &["--job-id", id]);
    ran.expect_code(0);
    assert!(ran.stderr().contains("the queue already holds this job"), "{}", ran.stderr());
    assert_eq!(PathBuf::from(ran.stdout().trim()), farm.output.join("gone.qcow2"));
    assert_eq!(farm.jobs_in("done"), vec![id.to_string()], "{}", farm.listing());
    assert_identical(&copy, &farm.output.join("gone.qcow2"));
}

#[test]
fn two_retries_at_once_start_the_job_once() {
    let farm = Farm::new();
    let (_serve, addr) = serve(&farm, &farm.path().join("state"), &[], &[]);
    let vm = sample_disk(&farm.src, "vm.raw", 4, 1);
    let id = ids(&post_json(addr, "/api/v1/jobs", &daemon_request(&vm, "twice")))[0].clone();
    wait_state(addr, &id, "queued", Duration::from_secs(30));
    assert_eq!(request(addr, "POST", &format!("/api/v1/jobs/{id}/cancel"), &[], None).status, 202);
    wait_state(addr, &id, "cancelled", Duration::from_secs(30));
    let path = format!("/api/v1/jobs/{id}/retry");
    let both: Vec<u16> = std::thread::scope(|s| {
        let a = s.spawn(|| request(addr, "POST", &path, &[], None).status);
        let b = s.spawn(|| request(addr, "POST", &path, &[], None).status);
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    let mut sorted = both.clone();
    sorted.sort();
    assert_eq!(sorted, vec![202, 409], "one retry starts it, the other is refused: {both:?}");
    let j = wait_state(addr, &id, "queued", Duration::from_secs(30));
    assert_eq!(j["attempts"], 2);
    // One new queue job (the cancelled one stays cancelled).
    wait_for("one job queued", Duration::from_secs(10), || (farm.jobs_in("queued").len() == 1).then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(farm.jobs_in("queued").len(), 1, "{}", farm.listing());
}

#[test]
fn a_submission_sent_twice_with_its_idempotency_key_makes_one_job() {
    let farm = Farm::new();
    let (_serve, addr) = serve(&farm, &farm.path().join("state"), &[], &[]);
    let vm = sample_disk(&farm.src, "vm.raw", 4, 1);
    let body = daemon_request(&vm, "once").to_string();
    let send = |key: &str, body: &str| {
        request(
            addr,
            "POST",
            "/api/v1/jobs",
            &[("Content-Type", "application/json"), ("Idempotency-Key", key)],
            Some(body),
        )
    };
    let first = send("client-7f3a-0001", &body);
    assert_eq!(first.status, 201, "{}", first.body);
    let again = send("client-7f3a-0001", &body);
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(ids(&first), ids(&again), "the same job, not a second one");
    let other = daemon_request(&vm, "another").to_string();
    let r = send("client-7f3a-0001", &other);
    assert_eq!((r.status, r.json()["field"].as_str()), (422, Some("Idempotency-Key")), "{}", r.body);
    let r = send(&"k".repeat(129), &body);
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("Idempotency-Key")), "{}", r.body);
    assert_eq!(get(addr, "/api/v1/jobs").json()["total"], 1);
    // The form carries a key of its own: pressing Submit twice makes one job.
    let page = get(addr, "/submit").body;
    let at = page.find("name=\"idempotency_key\" value=\"").unwrap() + "name=\"idempotency_key\" value=\"".len();
    let key: String = page[at..].chars().take_while(|c| *c != '"').collect();
    let form = format!("vm_path={}&enable_pipeline=on&hyper2kvm_daemon=on&idempotency_key={key}", vm.display());
    let post =
        || request(addr, "POST", "/submit", &[("Content-Type", "application/x-www-form-urlencoded")], Some(&form));
    let (a, b) = (post(), post());
    assert_eq!((a.status, b.status), (303, 303));
    assert_eq!(a.header("location"), b.header("location"), "both presses lead to the one job");
    assert_eq!(get(addr, "/api/v1/jobs").json()["total"], 2);
}

#[test]
fn the_seeds_vsphere_request_is_exported_from_the_vcenter_converted_and_defined_by_the_agent() {
    let farm = Farm::new();
    let raw = hyperfarm_tests::images::raw_disk(&farm.src.join("u.raw"), 16 << 20, &[(0, 2 << 20)], 41);
    let vmdk =
        hyperfarm_tests::images::convert(&raw, &farm.src.join("u.vmdk"), "vmdk", Some("subformat=streamOptimized"));
    let vc = hyperfarm_tests::vcsim::Vcsim::start(&farm.path().join("vcsim"), &[vmdk], &[]);
    let _agent = farm.agent(&["--engine", "qemu-img", "--libvirt-uri", "test:///default"]);
    let state = farm.path().join("state");
    // serve's vCenter: the same flags as the CLI's (the password in a file), vSphere by default.
    let flags: Vec<String> = vc.flags().into_iter().skip(2).collect();
    let mut extra: Vec<&str> = vec!["--provider", "vsphere"];
    extra.extend(flags.iter().map(String::as_str));
    let (_serve, addr) = serve(&farm, &state, &extra, &[]);
    // The seed's request, as its README shows it (format qcow2: the only one produced).
    let r = post_json(
        addr,
        "/api/v1/jobs",
        &serde_json::json!({
            "name": "Ubuntu Server Migration", "vm_path": "/DC0/vm/ubuntu-server", "format": "qcow2",
            "options": {"enable_pipeline": true, "hyper2kvm_daemon": true, "hyper2kvm_poll_interval": 1,
                        "libvirt_integration": true}
        }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = ids(&r).remove(0);
    let j = wait_state(addr, &id, "done", Duration::from_secs(90));
    assert_identical(&raw, &farm.output.join("ubuntu-server.qcow2"));
    let rec = farm.records().into_iter().next().unwrap();
    assert_eq!(rec["libvirt"]["defined"], true, "{rec:#} {j:#}");
    assert!(farm.output.join("ubuntu-server.xml").is_file());
    // An unknown provider names the field; a VM the vCenter does not have fails with its error.
    let r = post_json(
        addr,
        "/api/v1/jobs",
        &serde_json::json!({"vm_path": "/x", "provider": "aws", "options": {"hyper2kvm_daemon": true}}),
    );
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("\"provider\""), "{}", r.body);
    let r = post_json(
        addr,
        "/api/v1/jobs",
        &serde_json::json!({"vm_path": "no-such-vm", "options": {"enable_pipeline": true, "hyper2kvm_daemon": true}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = ids(&r).remove(0);
    let j = wait_state(addr, &id, "failed", Duration::from_secs(60));
    assert!(j["error"].as_str().unwrap_or_default().contains("no VM no-such-vm"), "{j:#}");
}
