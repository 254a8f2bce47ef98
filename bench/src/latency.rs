//! Latencies: publication → claim (file-system events), and result → exporter over the gRPC
//! watch stream, against following by polling (the fallback) in the same run.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_stream::StreamExt;

use hyperfarm_proto::client::AgentEndpoint;
use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::queue::{Queue, State};
use hyperfarm_shared::results::OutputDir;

use crate::engines::stage;
use crate::util::{self, Agent, Ctx, Report};

fn now_ms_f() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0)
}

pub fn run(ctx: &Ctx, report: &mut Report) {
    let jobs = if ctx.quick { 20 } else { 100 };
    let polled_jobs = 5;
    println!(
        "\n== latency: {jobs} small jobs, agent with its default 5 s poll interval (so claims come from file-system events)"
    );
    let d = ctx.sub("latency");
    let disk = d.join("small.raw");
    util::make_file(&disk, 1 << 20, &[(0, 1 << 20)]);
    let mut h = blake3::Hasher::new();
    h.update(&std::fs::read(&disk).expect("read"));
    let b3 = h.finalize().to_hex().to_string();
    let (qd, od) = (d.join("queue"), d.join("output"));
    std::fs::create_dir_all(&qd).expect("mkdir");
    std::fs::create_dir_all(&od).expect("mkdir");
    let queue = Queue::new(&qd);
    queue.init().expect("init");
    let out = OutputDir::new(&od);
    let agent = Agent::start(ctx, &qd, &od, &[]);
    let ep = AgentEndpoint::new(agent.url.clone().expect("gRPC url"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut claims = Vec::new();
    let mut results = Vec::new();
    rt.block_on(async {
        let mut client = ep.connect().await.expect("connect");
        for i in 0..jobs {
            let (id, st, m) = stage(&queue, &disk, &b3, &format!("lat-{i}"));
            let t0 = Instant::now();
            st.publish(&m).expect("publish");
            // The watch starts right away, as hyperexport's does.
            let mut stream = client
                .watch_job(pb::WatchJobRequest { id: id.to_string(), heartbeat_seconds: 5 })
                .await
                .expect("watch")
                .into_inner();
            let queued = queue.job_dir(State::Queued, &id);
            let claimed = util::until(Duration::from_secs(30), Duration::from_micros(200), || !queued.exists());
            assert!(claimed, "job {id} was not claimed");
            claims.push(t0.elapsed());
            let mut got_final = None;
            while let Some(u) = stream.next().await {
                let u = u.expect("stream");
                if u.is_final {
                    got_final = Some(now_ms_f());
                    break;
                }
            }
            let at = got_final.expect("final state over the stream");
            let rec = out.read_record(&id).expect("record").expect("some");
            // The agent stamps finished_at_ms just before it links the record; same host, same clock.
            results.push(Duration::from_secs_f64(((at - rec.finished_at_ms as f64).max(0.0)) / 1000.0));
        }
    });
    // Baseline: the polling fallback (first check at once, then every second).
    let mut polled = Vec::new();
    for i in 0..polled_jobs {
        let (id, st, m) = stage(&queue, &disk, &b3, &format!("poll-{i}"));
        st.publish(&m).expect("publish");
        let seen_at = loop {
            if out.record_path(&id).exists() {
                break now_ms_f();
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        let rec = out.read_record(&id).expect("record").expect("some");
        polled.push(Duration::from_secs_f64(((seen_at - rec.finished_at_ms as f64).max(0.0)) / 1000.0));
    }
    drop(agent);
    let claim_med = util::median(&mut claims.clone());
    let claim_p99 = util::percentile(&mut claims, 0.99);
    let res_med = util::median(&mut results.clone());
    let res_p99 = util::percentile(&mut results, 0.99);
    let poll_med = util::median(&mut polled);
    report.add(
        "submit -> claim (median)",
        util::ms(claim_med),
        "poll interval 5000 ms".into(),
        Some(claim_med.as_secs_f64() / 5.0),
        "<= 100 ms",
        Some(claim_med <= Duration::from_millis(100)),
    );
    report.add("submit -> claim (p99)", util::ms(claim_p99), "poll interval 5000 ms".into(), None, "(info)", None);
    report.add(
        "result -> exporter, gRPC (median)",
        util::ms(res_med),
        format!("polling 1 s: {}", util::ms(poll_med)),
        Some(res_med.as_secs_f64() / poll_med.as_secs_f64().max(1e-6)),
        "<= 100 ms",
        Some(res_med <= Duration::from_millis(100)),
    );
    report.add(
        "result -> exporter, gRPC (p99)",
        util::ms(res_p99),
        format!("polling 1 s: {}", util::ms(poll_med)),
        None,
        "(info)",
        None,
    );
    let _ = std::fs::remove_dir_all(&d);
}
