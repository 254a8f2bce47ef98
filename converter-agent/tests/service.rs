//! The gRPC service driven in-process: a real server on a loopback socket, the agent's core
//! without its scan loop, and the generated client.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_stream::StreamExt;

use hyper2kvm_agent::agent::{self, Core};
use hyper2kvm_agent::board::JobView;
use hyper2kvm_agent::config::{self, Cli};
use hyper2kvm_agent::grpc;
use hyperfarm_proto::client::AgentEndpoint;
use hyperfarm_proto::v1 as pb;
use hyperfarm_shared::JobId;
use hyperfarm_shared::progress::{Phase, Progress};

struct Harness {
    _dir: tempfile::TempDir,
    core: Arc<Core>,
    ep: AgentEndpoint,
}

async fn harness(extra: &[&str]) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (q, o) = (dir.path().join("q"), dir.path().join("o"));
    std::fs::create_dir_all(&q).unwrap();
    std::fs::create_dir_all(&o).unwrap();
    let mut args = vec![
        "hyper2kvm-agent",
        "--watch-dir",
        q.to_str().unwrap(),
        "--output-dir",
        o.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    let cfg = config::load(&Cli::parse_from(args)).unwrap();
    let core = agent::prepare(cfg).await.unwrap();
    let server = grpc::start(core.clone(), core.health.clone()).await.unwrap().unwrap();
    let ep = AgentEndpoint::new(format!("http://{}", server.addr));
    std::mem::forget(server);
    Harness { _dir: dir, core, ep }
}

fn view(id: JobId, phase: Phase, percent: f64) -> JobView {
    JobView {
        id,
        vm_name: Some("vm".into()),
        progress: Progress { phase, percent, ..Default::default() },
        started_at_ms: 1,
        updated_at_ms: 1,
        summary: None,
        files: vec![],
        engine: Some("qemu-img".into()),
        agent: "test@host".into(),
        finished_at_ms: 0,
        attempts: 1,
        seed_drop: false,
    }
}

#[tokio::test]
async fn get_job_answers_not_found_and_invalid_argument() {
    let h = harness(&[]).await;
    let mut c = h.ep.connect().await.unwrap();
    let e = c.get_job(pb::GetJobRequest { id: JobId::new().to_string() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c.get_job(pb::GetJobRequest { id: "../etc/passwd".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = c.list_jobs(pb::ListJobsRequest { states: vec![0], ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // An unknown enum value is not silently ignored.
    let e = c.list_jobs(pb::ListJobsRequest { states: vec![99], ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let e = c.list_jobs(pb::ListJobsRequest { page_token: "junk".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
}

#[tokio::test]
async fn watch_jobs_gives_a_snapshot_then_changes_and_out_of_range_when_too_old() {
    let h = harness(&[]).await;
    let mut c = h.ep.connect().await.unwrap();
    let id = JobId::new();
    h.core.board.update(view(id, Phase::Converting, 10.0));
    let mut s = c.watch_jobs(pb::WatchJobsRequest { from_seq: 0 }).await.unwrap().into_inner();
    let first = s.next().await.unwrap().unwrap();
    let Some(pb::jobs_update::Update::Snapshot(snap)) = first.update else { panic!("{first:?}") };
    assert_eq!(snap.jobs.len(), 1);
    assert_eq!(snap.jobs[0].id, id.to_string());
    let seq0 = first.seq;
    h.core.board.update(view(id, Phase::Converting, 50.0));
    let next = s.next().await.unwrap().unwrap();
    assert_eq!(next.seq, seq0 + 1);
    let Some(pb::jobs_update::Update::Change(job)) = next.update else { panic!("{next:?}") };
    assert_eq!(job.progress.unwrap().percent, 50.0);

    // Resuming replays exactly the missed changes.
    h.core.board.update(view(id, Phase::Checking, 0.0));
    let mut r = c.watch_jobs(pb::WatchJobsRequest { from_seq: seq0 }).await.unwrap().into_inner();
    let a = r.next().await.unwrap().unwrap();
    let b = r.next().await.unwrap().unwrap();
    assert_eq!((a.seq, b.seq), (seq0 + 1, seq0 + 2));

    // Far past history: OUT_OF_RANGE.
    for i in 0..5000 {
        h.core.board.update(view(id, Phase::Converting, f64::from(i % 100)));
    }
    let e = c.watch_jobs(pb::WatchJobsRequest { from_seq: seq0 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    let e = c.watch_jobs(pb::WatchJobsRequest { from_seq: u64::MAX - 1 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "a number from the future");
}

#[tokio::test]
async fn a_client_that_does_not_read_is_dropped_and_never_slows_the_board() {
    let h = harness(&[]).await;
    let mut c = h.ep.connect().await.unwrap();
    let id = JobId::new();
    let mut slow = c.watch_jobs(pb::WatchJobsRequest { from_seq: 0 }).await.unwrap().into_inner();
    let started = std::time::Instant::now();
    let n = 20_000;
    for i in 0..n {
        let mut v = view(id, Phase::Converting, f64::from(i % 100));
        v.vm_name = Some("x".repeat(200));
        h.core.board.update(v);
        if i % 1000 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let publishing = started.elapsed();
    // The slow client now reads what it was given: far fewer than all the changes, then an end.
    let mut got = 0;
    let mut ended_with = None;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), slow.next()).await {
        match m {
            Ok(_) => got += 1,
            Err(e) => {
                ended_with = Some(e.code());
                break;
            }
        }
    }
    assert!(got < n, "a slow client was buffered without bound ({got} messages)");
    assert!(ended_with.is_none() || ended_with == Some(tonic::Code::OutOfRange), "{ended_with:?}");
    assert!(publishing < Duration::from_secs(5), "board updates were slowed down: {publishing:?}");
}

#[tokio::test]
async fn watch_job_follows_a_job_on_disk_to_its_end() {
    let h = harness(&[]).await;
    let id = JobId::new();
    let dir = h.core.queue.job_dir(hyperfarm_shared::queue::State::Queued, &id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.json"), r#"{"manifest_version":"1.0","source":{"vm_name":"ondisk"},"disks":[]}"#)
        .unwrap();
    let mut c = h.ep.connect().await.unwrap();
    let mut s =
        c.watch_job(pb::WatchJobRequest { id: id.to_string(), heartbeat_seconds: 1 }).await.unwrap().into_inner();
    let first = s.next().await.unwrap().unwrap();
    let job = first.job.unwrap();
    assert_eq!(job.state(), pb::JobState::Queued);
    assert_eq!(job.vm_name, "ondisk");
    assert!(!first.is_final);
    let hb = s.next().await.unwrap().unwrap();
    assert!(hb.heartbeat, "a heartbeat while nothing changes");
    assert!(h.core.queue.withdraw(&id, "test").unwrap());
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let u = s.next().await.unwrap().unwrap();
            if u.is_final {
                return u;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(last.job.unwrap().state(), pb::JobState::Cancelled);
    assert!(s.next().await.is_none(), "the stream ends after the final state");
}

#[tokio::test]
async fn cancel_is_refused_without_control_permission() {
    let h = harness(&["--control-from-loopback", "false"]).await;
    let mut c = h.ep.connect().await.unwrap();
    let e =
        c.cancel_job(pb::CancelJobRequest { id: JobId::new().to_string(), reason: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let st = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(!st.caller_may_control);
    let h = harness(&[]).await;
    let mut c = h.ep.connect().await.unwrap();
    let st = c.get_status(pb::GetStatusRequest {}).await.unwrap().into_inner();
    assert!(st.caller_may_control, "loopback callers may control by default");
    let e =
        c.cancel_job(pb::CancelJobRequest { id: JobId::new().to_string(), reason: String::new() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}
