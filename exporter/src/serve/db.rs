//! The job history of `hyperexport serve`: one SQLite database in the state directory
//! (`jobs.sqlite`, WAL, `synchronous=FULL`), so that what was submitted survives restarts.
//!
//! Every statement is short; the connection sits behind a mutex and callers hold it for one
//! statement (or one small transaction) only.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// Lines of child output kept per job (the oldest are dropped).
pub const LOG_LINES_KEPT: i64 = 1000;

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub name: String,
    pub state: String,
    pub mode: String,
    pub phase: String,
    pub percent: f64,
    /// Per-disk export progress (percent), in disk order.
    pub disks: serde_json::Value,
    /// The queue job's id (daemon and export-only modes).
    pub queue_job_id: Option<String>,
    /// The queue the job was published into, once it was.
    pub queue: Option<String>,
    pub job_dir: Option<String>,
    /// Result paths (the qcow2 files) once done.
    pub files: serde_json::Value,
    pub error: Option<String>,
    pub exit_code: Option<i64>,
    pub attempts: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
    /// The request as submitted (the seed's shape).
    pub request: serde_json::Value,
    #[serde(skip)]
    pub pid: Option<i64>,
}

/// Run database work (and waiting for the connection) off the async worker threads: on a
/// multi-threaded runtime's worker, tokio hands that worker's other tasks to another thread
/// meanwhile; elsewhere (a blocking thread, a test) it just runs.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl JobRow {
    /// A job just submitted: `pending`, first attempt, nothing run yet.
    pub fn pending(
        id: String,
        name: String,
        mode: &str,
        queue_job_id: Option<String>,
        request: serde_json::Value,
        now_ms: i64,
    ) -> JobRow {
        JobRow {
            id,
            name,
            state: super::jobs::PENDING.into(),
            mode: mode.into(),
            phase: "waiting for a slot".into(),
            percent: 0.0,
            disks: serde_json::json!({}),
            queue_job_id,
            queue: None,
            job_dir: None,
            files: serde_json::json!([]),
            error: None,
            exit_code: None,
            attempts: 1,
            created_ms: now_ms,
            updated_ms: now_ms,
            finished_ms: None,
            request,
            pid: None,
        }
    }
}

pub struct Db {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  state TEXT NOT NULL,
  mode TEXT NOT NULL,
  phase TEXT NOT NULL DEFAULT '',
  percent REAL NOT NULL DEFAULT 0,
  disks TEXT NOT NULL DEFAULT '{}',
  queue_job_id TEXT,
  queue TEXT,
  job_dir TEXT,
  files TEXT NOT NULL DEFAULT '[]',
  error TEXT,
  exit_code INTEGER,
  attempts INTEGER NOT NULL DEFAULT 1,
  created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL,
  finished_ms INTEGER,
  request TEXT NOT NULL,
  pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_ms DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs(state, created_ms DESC, id DESC);
CREATE TABLE IF NOT EXISTS log (
  job_id TEXT NOT NULL,
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  ts_ms INTEGER NOT NULL,
  line TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS log_job ON log(job_id, seq);
CREATE TABLE IF NOT EXISTS idempotency (
  key TEXT PRIMARY KEY,
  request_hash TEXT NOT NULL,
  job_ids TEXT NOT NULL,
  created_ms INTEGER NOT NULL
);
PRAGMA user_version = 1;
";

const COLUMNS: &str = "id, name, state, mode, phase, percent, disks, queue_job_id, queue, job_dir, files, error, exit_code, attempts, created_ms, updated_ms, finished_ms, request, pid";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let json = |s: String, default: serde_json::Value| serde_json::from_str(&s).unwrap_or(default);
    Ok(JobRow {
        id: r.get(0)?,
        name: r.get(1)?,
        state: r.get(2)?,
        mode: r.get(3)?,
        phase: r.get(4)?,
        percent: r.get(5)?,
        disks: json(r.get(6)?, serde_json::json!({})),
        queue_job_id: r.get(7)?,
        queue: r.get(8)?,
        job_dir: r.get(9)?,
        files: json(r.get(10)?, serde_json::json!([])),
        error: r.get(11)?,
        exit_code: r.get(12)?,
        attempts: r.get(13)?,
        created_ms: r.get(14)?,
        updated_ms: r.get(15)?,
        finished_ms: r.get(16)?,
        request: json(r.get(17)?, serde_json::Value::Null),
        pid: r.get(18)?,
    })
}

/// A change to a job's row; `None` leaves a column as it is.
#[derive(Debug, Default, Clone)]
pub struct Update {
    pub state: Option<String>,
    pub phase: Option<String>,
    pub percent: Option<f64>,
    pub disks: Option<serde_json::Value>,
    pub queue_job_id: Option<Option<String>>,
    pub queue: Option<Option<String>>,
    pub job_dir: Option<Option<String>>,
    pub files: Option<serde_json::Value>,
    pub error: Option<Option<String>>,
    pub exit_code: Option<Option<i64>>,
    pub attempts: Option<i64>,
    pub finished_ms: Option<Option<i64>>,
    pub pid: Option<Option<i64>>,
    /// Change the row only while the job has not ended (a late progress event never turns a
    /// cancelled job back into a running one).
    pub only_active: bool,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, String> {
        let conn = Connection::open(path).map_err(|e| format!("job database {}: {e}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
            .and_then(|()| conn.busy_timeout(std::time::Duration::from_secs(5)))
            .and_then(|()| conn.execute_batch(SCHEMA))
            .map_err(|e| format!("job database {}: {e}", path.display()))?;
        Ok(Db { conn: Mutex::new(conn) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves the connection usable (SQLite rolls back).
        blocking(|| self.conn.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn insert(&self, j: &JobRow) -> rusqlite::Result<()> {
        self.insert_all(std::slice::from_ref(j))
    }

    /// Insert several jobs in one transaction: all or none.
    pub fn insert_all(&self, jobs: &[JobRow]) -> rusqlite::Result<()> {
        self.insert_all_once(jobs, None).map(|_| ())
    }

    /// Insert the jobs, unless `key` (an `Idempotency-Key`: key and hash of the request) was
    /// used before: then nothing is inserted and the earlier submission is returned, as
    /// `Some((its request hash, its job ids))`. One transaction: two requests with one key
    /// cannot both insert.
    pub fn insert_all_once(
        &self,
        jobs: &[JobRow],
        key: Option<(&str, &str)>,
    ) -> rusqlite::Result<Option<(String, Vec<String>)>> {
        blocking(|| {
            let mut c = self.lock();
            let tx = c.transaction()?;
            if let Some((key, hash)) = key {
                let earlier: Option<(String, String)> = tx
                    .query_row("SELECT request_hash, job_ids FROM idempotency WHERE key = ?1", [key], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if let Some((h, ids)) = earlier {
                    return Ok(Some((h, serde_json::from_str(&ids).unwrap_or_default())));
                }
                let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
                tx.execute(
                    "INSERT INTO idempotency (key, request_hash, job_ids, created_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![
                        key,
                        hash,
                        serde_json::to_string(&ids).unwrap_or_default(),
                        jobs.first().map(|j| j.created_ms)
                    ],
                )?;
            }
            for j in jobs {
                tx.execute(
                    &format!("INSERT INTO jobs ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19)"),
                    params![
                        j.id,
                        j.name,
                        j.state,
                        j.mode,
                        j.phase,
                        j.percent,
                        j.disks.to_string(),
                        j.queue_job_id,
                        j.queue,
                        j.job_dir,
                        j.files.to_string(),
                        j.error,
                        j.exit_code,
                        j.attempts,
                        j.created_ms,
                        j.updated_ms,
                        j.finished_ms,
                        j.request.to_string(),
                        j.pid
                    ],
                )?;
            }
            tx.commit()?;
            Ok(None)
        })
    }

    pub fn get(&self, id: &str) -> rusqlite::Result<Option<JobRow>> {
        let c = self.lock();
        blocking(|| c.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"), [id], row).optional())
    }

    /// Newest first.
    pub fn list(&self, state: Option<&str>, limit: i64, offset: i64) -> rusqlite::Result<(Vec<JobRow>, i64)> {
        blocking(|| {
            let c = self.lock();
            let (rows, total) = match state {
                Some(s) => {
                    let mut st = c.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM jobs WHERE state = ?1 ORDER BY created_ms DESC, id DESC LIMIT ?2 OFFSET ?3"
                    ))?;
                    let rows = st.query_map(params![s, limit, offset], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
                    let total = c.query_row("SELECT COUNT(*) FROM jobs WHERE state = ?1", [s], |r| r.get(0))?;
                    (rows, total)
                }
                None => {
                    let mut st = c.prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM jobs ORDER BY created_ms DESC, id DESC LIMIT ?1 OFFSET ?2"
                    ))?;
                    let rows = st.query_map(params![limit, offset], row)?.collect::<rusqlite::Result<Vec<_>>>()?;
                    let total = c.query_row("SELECT COUNT(*) FROM jobs", [], |r| r.get(0))?;
                    (rows, total)
                }
            };
            Ok((rows, total))
        })
    }

    /// Jobs in any of these states, oldest first.
    pub fn in_states(&self, states: &[&str]) -> rusqlite::Result<Vec<JobRow>> {
        blocking(|| {
            let c = self.lock();
            let marks = vec!["?"; states.len()].join(",");
            let mut st =
                c.prepare(&format!("SELECT {COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY created_ms, id"))?;
            st.query_map(rusqlite::params_from_iter(states.iter()), row)?.collect()
        })
    }

    pub fn counts(&self) -> rusqlite::Result<Vec<(String, i64)>> {
        blocking(|| {
            let c = self.lock();
            let mut st = c.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
        })
    }

    /// Returns the number of rows changed (0: no such job, or ended and `only_active`).
    pub fn update(&self, id: &str, u: &Update, now_ms: i64) -> rusqlite::Result<usize> {
        let mut sets: Vec<&str> = vec!["updated_ms = :now"];
        let mut vals: Vec<(&str, Box<dyn rusqlite::ToSql>)> =
            vec![(":id", Box::new(id.to_string())), (":now", Box::new(now_ms))];
        macro_rules! set {
            ($field:ident, $col:literal, $conv:expr) => {
                if let Some(v) = &u.$field {
                    sets.push(concat!($col, " = :", $col));
                    vals.push((concat!(":", $col), Box::new($conv(v.clone()))));
                }
            };
        }
        set!(state, "state", |v: String| v);
        set!(phase, "phase", |v: String| v);
        set!(percent, "percent", |v: f64| v);
        set!(disks, "disks", |v: serde_json::Value| v.to_string());
        set!(queue_job_id, "queue_job_id", |v: Option<String>| v);
        set!(queue, "queue", |v: Option<String>| v);
        set!(job_dir, "job_dir", |v: Option<String>| v);
        set!(files, "files", |v: serde_json::Value| v.to_string());
        set!(error, "error", |v: Option<String>| v);
        set!(exit_code, "exit_code", |v: Option<i64>| v);
        set!(attempts, "attempts", |v: i64| v);
        set!(finished_ms, "finished_ms", |v: Option<i64>| v);
        set!(pid, "pid", |v: Option<i64>| v);
        let guard = if u.only_active { " AND state NOT IN ('done', 'failed', 'cancelled', 'interrupted')" } else { "" };
        let sql = format!("UPDATE jobs SET {} WHERE id = :id{guard}", sets.join(", "));
        let c = self.lock();
        let named: Vec<(&str, &dyn rusqlite::ToSql)> = vals.iter().map(|(k, v)| (*k, v.as_ref())).collect();
        blocking(|| c.execute(&sql, named.as_slice()))
    }

    /// Forget jobs that ended before `before_ms` (their log lines too) and idempotency keys
    /// older than that. Returns how many jobs were removed.
    pub fn prune(&self, before_ms: i64) -> rusqlite::Result<usize> {
        blocking(|| {
            let mut c = self.lock();
            let tx = c.transaction()?;
            let ended =
                "state IN ('done', 'failed', 'cancelled', 'interrupted') AND COALESCE(finished_ms, updated_ms) < ?1";
            tx.execute(&format!("DELETE FROM log WHERE job_id IN (SELECT id FROM jobs WHERE {ended})"), [before_ms])?;
            let n = tx.execute(&format!("DELETE FROM jobs WHERE {ended}"), [before_ms])?;
            tx.execute("DELETE FROM idempotency WHERE created_ms < ?1", [before_ms])?;
            tx.commit()?;
            Ok(n)
        })
    }

    /// Append lines of a job's output, keeping the last [`LOG_LINES_KEPT`].
    pub fn log(&self, id: &str, lines: &[String], now_ms: i64) -> rusqlite::Result<()> {
        blocking(|| {
            if lines.is_empty() {
                return Ok(());
            }
            let mut c = self.lock();
            let tx = c.transaction()?;
            for l in lines {
                tx.execute("INSERT INTO log (job_id, ts_ms, line) VALUES (?1, ?2, ?3)", params![id, now_ms, l])?;
            }
            tx.execute(
                "DELETE FROM log WHERE job_id = ?1 AND seq <= (SELECT seq FROM log WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                params![id, LOG_LINES_KEPT],
            )?;
            tx.commit()
        })
    }

    /// The last `n` lines of a job's output, oldest first.
    pub fn log_tail(&self, id: &str, n: i64) -> rusqlite::Result<Vec<(i64, String)>> {
        blocking(|| {
            let c = self.lock();
            let mut st =
                c.prepare_cached("SELECT ts_ms, line FROM log WHERE job_id = ?1 ORDER BY seq DESC LIMIT ?2")?;
            let mut v: Vec<(i64, String)> =
                st.query_map(params![id, n], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<rusqlite::Result<_>>()?;
            v.reverse();
            Ok(v)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(id: &str, state: &str, created: i64) -> JobRow {
        let mut j =
            JobRow::pending(id.into(), "n".into(), "daemon", None, serde_json::json!({"vm_path": "/x"}), created);
        j.state = state.into();
        j
    }

    #[test]
    fn rows_survive_reopening_and_updates_touch_only_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("jobs.sqlite");
        {
            let db = Db::open(&p).unwrap();
            db.insert_all(&[job("a", "pending", 1), job("b", "done", 2)]).unwrap();
            db.update("a", &Update { state: Some("converting".into()), percent: Some(40.0), ..Default::default() }, 5)
                .unwrap();
        }
        let db = Db::open(&p).unwrap();
        let a = db.get("a").unwrap().unwrap();
        assert_eq!((a.state.as_str(), a.percent, a.updated_ms, a.name.as_str()), ("converting", 40.0, 5, "n"));
        let (rows, total) = db.list(None, 10, 0).unwrap();
        assert_eq!(total, 2);
        assert_eq!(rows[0].id, "b", "newest first");
        assert_eq!(db.in_states(&["converting"]).unwrap().len(), 1);
        assert!(db.get("zzz").unwrap().is_none());
    }

    #[test]
    fn a_batch_with_a_duplicate_inserts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("j.sqlite")).unwrap();
        assert!(db.insert_all(&[job("a", "pending", 1), job("a", "pending", 1)]).is_err());
        assert_eq!(db.list(None, 10, 0).unwrap().1, 0);
    }

    #[test]
    fn pruning_forgets_only_jobs_that_ended_long_ago() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("j.sqlite")).unwrap();
        let mut old_done = job("old", "done", 1);
        old_done.finished_ms = Some(10);
        let mut new_done = job("new", "done", 1);
        new_done.finished_ms = Some(1000);
        db.insert_all(&[old_done, new_done, job("running", "converting", 1)]).unwrap();
        db.log("old", &["x".into()], 10).unwrap();
        assert_eq!(db.prune(500).unwrap(), 1);
        let (rows, total) = db.list(None, 10, 0).unwrap();
        assert_eq!(total, 2);
        assert!(rows.iter().all(|r| r.id != "old"));
        assert!(db.log_tail("old", 10).unwrap().is_empty());
        assert!(db.get("running").unwrap().is_some(), "a job still running is never pruned, however old");
    }

    #[test]
    fn the_log_keeps_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("j.sqlite")).unwrap();
        db.insert(&job("a", "pending", 1)).unwrap();
        let lines: Vec<String> = (0..LOG_LINES_KEPT + 50).map(|i| format!("line {i}")).collect();
        db.log("a", &lines, 1).unwrap();
        let tail = db.log_tail("a", 5000).unwrap();
        assert_eq!(tail.len() as i64, LOG_LINES_KEPT);
        assert_eq!(tail.last().unwrap().1, format!("line {}", LOG_LINES_KEPT + 49));
        assert_eq!(db.log_tail("a", 2).unwrap().len(), 2);
    }
}
