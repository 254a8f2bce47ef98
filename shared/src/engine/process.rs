//! Running an engine's child process: its own process group, output read as it comes, a
//! timeout, and cancellation by SIGTERM then SIGKILL of the whole group.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::EngineError;

/// Grace between SIGTERM and SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(5);
/// At most this much of a child's stderr is kept (the end of it).
const STDERR_KEEP: usize = 64 * 1024;

/// What a finished child left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stderr: String,
}

/// Spawn `cmd` (confined to the files `confine` names, when given) in a new process group with
/// stdout and stderr piped. `on_stdout` sees stdout in
/// chunks as they arrive, `on_stderr` stderr likewise. Ends with the exit status, or an error on
/// timeout or cancellation (after the group was stopped).
/// How a child is started: confined or not, and with what as its standard input (nothing, or a
/// file it reads as `/proc/self/fd/0`).
#[derive(Debug, Default)]
pub struct Spawn<'a> {
    pub confine: Option<&'a super::sandbox::Confinement>,
    pub stdin: Option<std::fs::File>,
    /// Where to note the child (pid, process group, start time, host, boot), so that if the agent
    /// dies (kill -9) the agent that recovers the job on this host can end the orphan before
    /// anything else touches the job ([`kill_leftovers`]).
    pub pidfile: Option<std::path::PathBuf>,
}

/// What [`Spawn::pidfile`] holds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct EngineNote {
    pid: i32,
    start: u64,
    host_id: String,
    boot_id: String,
    /// The agent that started it: an engine is a leftover only once that agent is gone (another
    /// agent on this host, with the same cache directory, is not a predecessor).
    #[serde(default)]
    agent_pid: i32,
    #[serde(default)]
    agent_start: u64,
}

static LOCAL_NOTES: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Keep a second note of every engine in this host's own directory `dir` (the agent's cache
/// directory): another host that recovers a job removes the job's work area, note and all, but a
/// restarted agent still finds — and ends — what its predecessor left running
/// ([`kill_local_leftovers`]).
pub fn set_local_notes(dir: &Path) {
    let d = dir.join("engines");
    if std::fs::create_dir_all(&d).is_ok() {
        let _ = LOCAL_NOTES.set(d);
    }
}

/// A note in the local directory, removed when the engine is done.
struct LocalNote(std::path::PathBuf);

impl LocalNote {
    fn write(pid: i32, bytes: &[u8]) -> Option<LocalNote> {
        let p = LOCAL_NOTES.get()?.join(format!(".engine-{pid}.json"));
        std::fs::write(&p, bytes).ok()?;
        Some(LocalNote(p))
    }
}

impl Drop for LocalNote {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// At start-up: end every engine an earlier incarnation of this agent (this host, this boot) left
/// running, as its local notes say, and forget the notes. Returns how many were killed.
pub fn kill_local_leftovers() -> usize {
    let Some(d) = LOCAL_NOTES.get() else { return 0 };
    let n = kill_leftovers(d);
    // Forget the notes of engines that are gone (or were just ended); those of live agents stay.
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let gone = crate::fsx::read_bounded(&e.path(), 4096)
                .ok()
                .and_then(|b| serde_json::from_slice::<EngineNote>(&b).ok())
                .is_none_or(|n| start_time(n.pid) != Some(n.start));
            if gone {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    n
}

/// A process's start time (clock ticks since boot), to tell it from a later one with its pid.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// End (SIGKILL, its whole process group) every engine a dead agent left running, as the notes in
/// `work_dir` say (written at spawn; only this host's and this boot's, only when the agent that
/// started it is gone, and only a process that is still the one recorded). Waits up to 5 s for
/// them to be gone. Returns how many were killed.
pub fn kill_leftovers(work_dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(work_dir) else { return 0 };
    let (host, boot) = (crate::fsx::host_id(), crate::fsx::boot_id());
    let mut killed = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".engine") && name.ends_with(".json")) {
            continue;
        }
        let Some(note) =
            crate::fsx::read_bounded(&e.path(), 4096).ok().and_then(|b| serde_json::from_slice::<EngineNote>(&b).ok())
        else {
            continue;
        };
        let agent_alive = note.agent_pid > 0 && start_time(note.agent_pid) == Some(note.agent_start);
        if note.host_id != host
            || note.boot_id != boot
            || note.pid <= 1
            || agent_alive
            || start_time(note.pid) != Some(note.start)
        {
            continue;
        }
        if let Some(p) = rustix::process::Pid::from_raw(note.pid) {
            let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            killed.push(note.pid);
        }
    }
    let t0 = std::time::Instant::now();
    while killed.iter().any(|&p| start_time(p).is_some()) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.len()
}

pub async fn run(
    mut cmd: Command,
    program: &Path,
    spawn: Spawn<'_>,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
    mut on_stdout: impl FnMut(&[u8]),
    mut on_stderr: impl FnMut(&[u8]),
) -> Result<Finished, EngineError> {
    let stdin = match spawn.stdin {
        Some(f) => Stdio::from(f),
        None => Stdio::null(),
    };
    cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).kill_on_drop(true);
    tracing::debug!(
        program = %program.display(),
        args = ?cmd.as_std().get_args().collect::<Vec<_>>(),
        confined = spawn.confine.is_some(),
        "starting an engine process"
    );
    let spawned = match spawn.confine {
        Some(c) => c.clone().with_program(program).spawn(&mut cmd),
        None => cmd.spawn(),
    };
    let mut child = spawned.map_err(|source| EngineError::Spawn { program: program.to_path_buf(), source })?;
    let _local_note = match (&spawn.pidfile, child.id()) {
        (Some(file), Some(pid)) => {
            let pid = pid as i32;
            let me = std::process::id() as i32;
            let note = EngineNote {
                pid,
                start: start_time(pid).unwrap_or(0),
                host_id: crate::fsx::host_id(),
                boot_id: crate::fsx::boot_id(),
                agent_pid: me,
                agent_start: start_time(me).unwrap_or(0),
            };
            let bytes = serde_json::to_vec(&note).expect("notes serialise");
            if let Err(e) = crate::fsx::replace_file(file, &bytes) {
                tracing::warn!("cannot note the engine's pid in {}: {e}", file.display());
            }
            LocalNote::write(pid, &bytes)
        }
        _ => None,
    };
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();

    let mut err_buf: Vec<u8> = Vec::new();
    let mut out_chunk = vec![0u8; 8192];
    let mut err_chunk = vec![0u8; 8192];
    let (mut out_open, mut err_open) = (true, true);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(far_future));
    tokio::pin!(sleep);

    let status = loop {
        tokio::select! {
            n = stdout.read(&mut out_chunk), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => on_stdout(&out_chunk[..n]),
            },
            n = stderr.read(&mut err_chunk), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    on_stderr(&err_chunk[..n]);
                    err_buf.extend_from_slice(&err_chunk[..n]);
                    if err_buf.len() > 2 * STDERR_KEEP {
                        err_buf.drain(..err_buf.len() - STDERR_KEEP);
                    }
                }
            },
            status = child.wait(), if !out_open && !err_open => break status?,
            () = &mut sleep, if deadline.is_some() => {
                stop(&mut child).await;
                return Err(EngineError::Timeout { program: name, timeout: timeout.unwrap_or_default() });
            }
            () = cancel.cancelled() => {
                stop(&mut child).await;
                return Err(EngineError::Cancelled);
            }
        }
    };
    let stderr = String::from_utf8_lossy(&err_buf).trim().to_string();
    Ok(Finished { status, stderr })
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// SIGTERM to the child's process group, then SIGKILL after [`KILL_GRACE`]; always reaped.
pub async fn stop(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
        if tokio::time::timeout(KILL_GRACE, child.wait()).await.is_ok() {
            // The leader is gone; make sure nothing of its group survives.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            return;
        }
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.kill().await;
}

/// "exit status 1" / "killed by signal 9", for error messages.
pub fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}
