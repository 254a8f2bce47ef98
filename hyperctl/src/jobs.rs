//! `hyperctl jobs list|show|watch|cancel`, through an agent's gRPC API.

use serde::Serialize;
use tokio_stream::StreamExt;

use hyperfarm_proto::client::AgentEndpoint;
use hyperfarm_proto::v1 as pb;

use crate::{
    Cli, CtlError, EXIT_ERROR, EXIT_JOB_CANCELLED, EXIT_JOB_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, JobsOp, endpoints,
    err, from_status, print_json, table,
};

/// A job as `--json` prints it (stable: fields are only ever added).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobJson {
    pub id: String,
    pub vm: String,
    /// queued, converting, done, failed, cancelled
    pub state: String,
    /// queued, verifying, converting, checking, publishing, done, failed, cancelled
    pub phase: String,
    pub percent: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate_bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub disk: String,
    pub agent: String,
    pub engine: String,
    pub attempts: u32,
    pub created_at_ms: u64,
    pub started_at_ms: u64,
    pub updated_at_ms: u64,
    pub finished_at_ms: u64,
    pub error_summary: String,
    /// Full text (`show` only).
    pub error: String,
    pub files: Vec<String>,
    pub seed_drop: bool,
    /// The libvirt domain the agent defined (or tried to) for this job (`show`, finished jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt: Option<LibvirtJson>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LibvirtJson {
    pub domain: String,
    pub uri: String,
    pub host: String,
    pub xml: String,
    pub validated: bool,
    pub defined: bool,
    pub error: String,
}

pub fn state_name(s: pb::JobState) -> &'static str {
    match s {
        pb::JobState::Queued => "queued",
        pb::JobState::Converting => "converting",
        pb::JobState::Done => "done",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "unknown",
    }
}

pub fn phase_name(p: pb::Phase) -> &'static str {
    match p {
        pb::Phase::Queued => "queued",
        pb::Phase::Verifying => "verifying",
        pb::Phase::Converting => "converting",
        pb::Phase::Checking => "checking",
        pb::Phase::Publishing => "publishing",
        pb::Phase::Done => "done",
        pb::Phase::Failed => "failed",
        pb::Phase::Cancelled => "cancelled",
        pb::Phase::Unspecified => "unknown",
    }
}

impl From<&pb::Job> for JobJson {
    fn from(j: &pb::Job) -> Self {
        let p = j.progress.clone().unwrap_or_default();
        JobJson {
            id: j.id.clone(),
            vm: j.vm_name.clone(),
            state: state_name(j.state()).into(),
            phase: phase_name(j.phase()).into(),
            percent: p.percent,
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            rate_bytes_per_second: p.rate_bytes_per_second,
            eta_seconds: p.eta_seconds,
            disk: p.disk_id,
            agent: j.agent.clone(),
            engine: j.engine.clone(),
            attempts: j.attempts,
            created_at_ms: j.created_at_ms,
            started_at_ms: j.started_at_ms,
            updated_at_ms: j.updated_at_ms,
            finished_at_ms: j.finished_at_ms,
            error_summary: j.error_summary.clone(),
            error: j.error.clone(),
            files: j.files.clone(),
            seed_drop: j.seed_drop,
            libvirt: j.libvirt.as_ref().map(|d| LibvirtJson {
                domain: d.domain.clone(),
                uri: d.uri.clone(),
                host: d.host.clone(),
                xml: d.xml.clone(),
                validated: d.validated,
                defined: d.defined,
                error: d.error.clone(),
            }),
        }
    }
}

fn parse_state(s: &str) -> Result<pb::JobState, CtlError> {
    Ok(match s {
        "queued" => pb::JobState::Queued,
        "converting" => pb::JobState::Converting,
        "done" => pb::JobState::Done,
        "failed" => pb::JobState::Failed,
        "cancelled" => pb::JobState::Cancelled,
        other => {
            return Err(err(
                EXIT_USAGE,
                format!("{other:?} is not a state (queued, converting, done, failed, cancelled)"),
            ));
        }
    })
}

fn progress_cell(j: &JobJson) -> String {
    match j.state.as_str() {
        "converting" => {
            let mut s = format!("{} {:.0}%", j.phase, j.percent);
            if j.rate_bytes_per_second > 0.0 {
                s.push_str(&format!(" {}/s", table::bytes(j.rate_bytes_per_second as u64)));
            }
            if let Some(eta) = j.eta_seconds {
                s.push_str(&format!(" eta {}", table::duration(eta as u64)));
            }
            s
        }
        "failed" | "cancelled" => j.error_summary.chars().take(60).collect(),
        "done" => j.files.join(" "),
        _ => String::new(),
    }
}

async fn agent(cli: &Cli) -> Result<AgentEndpoint, CtlError> {
    endpoints(cli)?.into_iter().next().map(|(_, e)| e).ok_or_else(|| err(EXIT_USAGE, "no agent configured"))
}

pub async fn run(cli: &Cli, op: &JobsOp) -> Result<(), CtlError> {
    let ep = agent(cli).await?;
    let mut client = ep.connect().await.map_err(|e| {
        err(
            EXIT_UNREACHABLE,
            format!("{e}\n(`hyperctl queue` reads the queue directly from shared storage without an agent)"),
        )
    })?;
    let now = hyperfarm_shared::queue::now_ms();
    match op {
        JobsOp::List { state, limit } => {
            let mut states = Vec::new();
            for s in state {
                states.push(parse_state(s)? as i32);
            }
            // Page through the agent's listing (at most 1000 a page) up to `limit` (0: all).
            let want = if *limit == 0 { usize::MAX } else { *limit as usize };
            let mut jobs: Vec<JobJson> = Vec::new();
            let mut token = String::new();
            let mut total;
            loop {
                let page = (want - jobs.len()).min(1000) as u32;
                let req = pb::ListJobsRequest { states: states.clone(), limit: page, page_token: token.clone() };
                let resp = client.list_jobs(ep.request(req)).await.map_err(|s| from_status(&ep.url, s))?.into_inner();
                total = resp.total;
                jobs.extend(resp.jobs.iter().map(JobJson::from));
                token = resp.next_page_token;
                if token.is_empty() || jobs.len() >= want {
                    break;
                }
            }
            let resp = pb::ListJobsResponse { total, ..Default::default() };
            if cli.json {
                print_json(&serde_json::json!({"total": resp.total, "jobs": jobs}));
            } else {
                table::print(
                    &["ID", "STATE", "VM", "AGE", "PROGRESS"],
                    &jobs
                        .iter()
                        .map(|j| {
                            vec![
                                j.id.clone(),
                                j.state.clone(),
                                j.vm.clone(),
                                table::duration(now.saturating_sub(j.created_at_ms) / 1000),
                                progress_cell(j),
                            ]
                        })
                        .collect::<Vec<_>>(),
                );
                if resp.total as usize > jobs.len() {
                    println!("({} of {} shown)", jobs.len(), resp.total);
                }
            }
        }
        JobsOp::Show { id } => {
            let j = client
                .get_job(ep.request(pb::GetJobRequest { id: id.clone() }))
                .await
                .map_err(|s| from_status(&ep.url, s))?;
            let j = JobJson::from(&j.into_inner());
            if cli.json {
                print_json(&j);
            } else {
                // Everything here comes from an agent or the queue: escaped before it is printed.
                use hyperfarm_shared::text::{escape, escape_lines};
                println!("job {}", escape(&j.id));
                println!("  vm:        {}", escape(&j.vm));
                println!("  state:     {} ({})", j.state, j.phase);
                if j.state == "converting" {
                    println!("  progress:  {}", escape(&progress_cell(&j)));
                }
                println!("  agent:     {}", if j.agent.is_empty() { "-".into() } else { escape(&j.agent) });
                println!("  engine:    {}", if j.engine.is_empty() { "-".into() } else { escape(&j.engine) });
                println!("  attempts:  {}", j.attempts);
                println!("  age:       {}", table::duration(now.saturating_sub(j.created_at_ms) / 1000));
                if !j.files.is_empty() {
                    println!("  files:     {}", escape(&j.files.join(", ")));
                }
                if let Some(l) = &j.libvirt {
                    if l.defined {
                        println!(
                            "  libvirt:   domain {} defined at {} on {} ({})",
                            escape(&l.domain),
                            escape(&l.uri),
                            escape(&l.host),
                            escape(&l.xml)
                        );
                    } else {
                        println!(
                            "  libvirt:   domain {} NOT defined at {} on {}: {}",
                            escape(&l.domain),
                            escape(&l.uri),
                            escape(&l.host),
                            escape(&l.error)
                        );
                    }
                }
                if !j.error.is_empty() {
                    println!("  error:\n    {}", escape_lines(j.error.trim_end()).replace('\n', "\n    "));
                } else if !j.error_summary.is_empty() {
                    println!("  error:     {}", escape(&j.error_summary));
                }
            }
        }
        JobsOp::Watch { id } => {
            let mut stream = client
                .watch_job(ep.request(pb::WatchJobRequest { id: id.clone(), heartbeat_seconds: 0 }))
                .await
                .map_err(|s| from_status(&ep.url, s))?
                .into_inner();
            let mut last: Option<JobJson> = None;
            while let Some(u) = stream.next().await {
                let u = u.map_err(|s| from_status(&ep.url, s))?;
                let Some(job) = u.job else { continue };
                let j = JobJson::from(&job);
                if cli.json {
                    print_json(
                        &serde_json::json!({"seq": u.seq, "heartbeat": u.heartbeat, "final": u.is_final, "job": j}),
                    );
                } else if !u.heartbeat {
                    let line = format!("{} {} {}", j.state, j.vm, progress_cell(&j));
                    println!("{}", hyperfarm_shared::text::escape(&line));
                }
                last = Some(j);
                if u.is_final {
                    break;
                }
            }
            match last.as_ref().map(|j| j.state.as_str()) {
                Some("done") => {}
                Some("failed") => {
                    return Err(err(
                        EXIT_JOB_FAILED,
                        format!("job {id} failed: {}", last.map(|j| j.error_summary).unwrap_or_default()),
                    ));
                }
                Some("cancelled") => return Err(err(EXIT_JOB_CANCELLED, format!("job {id} was cancelled"))),
                _ => return Err(err(EXIT_ERROR, format!("the stream of job {id} ended before the job did"))),
            }
        }
        JobsOp::Retry { id } => {
            let r = client
                .retry_job(ep.request(pb::RetryJobRequest { id: id.clone() }))
                .await
                .map_err(|s| from_status(&ep.url, s))?
                .into_inner();
            if cli.json {
                print_json(&serde_json::json!({"id": id, "new_id": r.new_id}));
            } else {
                println!("job {id} retried as {}", r.new_id);
            }
        }
        JobsOp::Cancel { id, reason } => {
            let r = client
                .cancel_job(ep.request(pb::CancelJobRequest { id: id.clone(), reason: reason.clone() }))
                .await
                .map_err(|s| from_status(&ep.url, s))?
                .into_inner();
            if cli.json {
                print_json(&serde_json::json!({"id": id, "state": state_name(r.state()), "message": r.message}));
            } else {
                println!("job {id} ({}): {}", state_name(r.state()), hyperfarm_shared::text::escape(&r.message));
            }
        }
    }
    Ok(())
}
