//! `hyperctl queue`: the queue read straight from shared storage, with or without an agent.

use std::path::PathBuf;
use std::time::Duration;

use hyperfarm_shared::instance;
use hyperfarm_shared::queue::{Queue, State, summarize};

use crate::{CtlError, EXIT_UNREACHABLE, err, print_json, table};

pub async fn run(
    watch_dir: Option<PathBuf>,
    inst: Option<&str>,
    lease_timeout: Duration,
    json: bool,
) -> Result<(), CtlError> {
    let dir = watch_dir.unwrap_or_else(|| instance::watch_dir(inst));
    if !dir.is_dir() {
        return Err(err(
            EXIT_UNREACHABLE,
            format!("the queue directory {} does not exist (is the share mounted?)", dir.display()),
        ));
    }
    let q = Queue::new(&dir);
    let s = tokio::task::spawn_blocking(move || summarize(&q, lease_timeout))
        .await
        .map_err(|e| err(crate::EXIT_ERROR, e.to_string()))?
        .map_err(|e| err(EXIT_UNREACHABLE, format!("reading the queue {}: {e}", dir.display())))?;
    if json {
        print_json(&s);
        return Ok(());
    }
    println!("queue {}", s.watch_dir.display());
    table::print(
        &["STATE", "JOBS"],
        &State::ALL
            .iter()
            .map(|st| vec![st.to_string(), s.counts.get(st).copied().unwrap_or(0).to_string()])
            .collect::<Vec<_>>(),
    );
    match (s.oldest_queued, s.oldest_queued_age_secs) {
        (Some(id), Some(age)) => println!("oldest queued: {id} ({} old)", table::duration(age)),
        _ => println!("oldest queued: -"),
    }
    println!("in staging (tmp/): {}", s.staging_entries);
    println!("manifest drops waiting: {}", s.pending_drops);
    if !s.unknown.is_empty() {
        println!("entries no agent will take (not the protocol's; move them away or back by hand):");
        for u in &s.unknown {
            println!("  {}", hyperfarm_shared::text::escape(u));
        }
    }
    if s.stale_claims.is_empty() {
        println!("stale claims: none");
    } else {
        println!("stale claims (lease older than {}):", hyperfarm_shared::duration::show(lease_timeout));
        for c in &s.stale_claims {
            println!(
                "  {} by {} on {}: lease {} old",
                c.id,
                c.agent.as_deref().unwrap_or("?"),
                c.host.as_deref().unwrap_or("?"),
                table::duration(c.lease_age_secs)
            );
        }
    }
    Ok(())
}
