//! The history of finished jobs on disk: one accounting row per finished job (`job_history`),
//! read by `GET /v1/history` and its summary, and pruned once `jobs.history_retention` has
//! passed, together with the finished jobs' rows, events and logs.
//!
//! [`History`] has a database connection of its own, so that reading a page of history or
//! pruning a batch runs on a blocking thread and never on the core's: the core only writes the
//! rows (in its own transaction, see [`record_finished`]). Pruning goes in bounded batches, each
//! its own short transaction, so the core's writes interleave with it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agentd_api::history::{
    HistoryEntry, HistoryPage, HistorySummary, ReplicaEnd, SummaryBy, SummaryRow,
};
use agentd_api::jobs::{JobState, JobStatus};
use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, Transaction, params, params_from_iter};

use super::StoreError;

/// Rows pruned in one transaction: small enough that a write of the core waits a few
/// milliseconds at most behind it.
pub const PRUNE_BATCH: usize = 200;

/// The most entries one page of history holds.
pub const MAX_PAGE: u32 = 1000;

/// Copies (or refreshes) the accounting row of a finished job from its row in `jobs`, in the
/// caller's transaction. The same expressions upgraded the rows of an older database (migration
/// 3; the template came with migration 4), so that a row reads the same whichever wrote it.
pub(super) const RECORD_FINISHED: &str = "
    INSERT INTO job_history (name, user, queue, state, reason, message, submitted, started,
        finished, replicas, gpus, gpu_seconds, restarts, restart_reasons, exit_codes, template)
    SELECT name,
        json_extract(status, '$.owner.user'),
        json_extract(status, '$.queue'),
        json_extract(status, '$.state'),
        json_extract(status, '$.reason'),
        json_extract(status, '$.message'),
        json_extract(status, '$.submitted_at'),
        json_extract(status, '$.started_at'),
        finished,
        json_array_length(status, '$.replicas'),
        (SELECT COALESCE(SUM(json_array_length(r.value, '$.gpu_indices')), 0)
           FROM json_each(status, '$.replicas') AS r),
        (SELECT COALESCE(SUM(json_array_length(r.value, '$.gpu_indices')), 0)
           FROM json_each(status, '$.replicas') AS r)
          * MAX(0.0, finished - COALESCE(json_extract(status, '$.started_at'), finished)),
        json_extract(status, '$.restarts'),
        (SELECT json_group_array(e.reason) FROM
           (SELECT reason FROM events WHERE kind = 'job' AND object = jobs.name
              AND message LIKE '%; restart % of % in %' ORDER BY id) AS e),
        (SELECT json_group_array(json_object(
            'replica', json_extract(r.value, '$.name'),
            'exit_code', json_extract(r.value, '$.exit_code'),
            'signal', json_extract(r.value, '$.signal')))
           FROM json_each(status, '$.replicas') AS r),
        json_extract(status, '$.template')
    FROM jobs WHERE name = ?1 AND finished IS NOT NULL AND json_valid(status)
    ON CONFLICT (name, submitted) DO UPDATE SET
        user = excluded.user, queue = excluded.queue, state = excluded.state,
        reason = excluded.reason, message = excluded.message, started = excluded.started,
        finished = excluded.finished, replicas = excluded.replicas, gpus = excluded.gpus,
        gpu_seconds = excluded.gpu_seconds, restarts = excluded.restarts,
        restart_reasons = excluded.restart_reasons, exit_codes = excluded.exit_codes,
        template = excluded.template";

/// Writes the history row of a job whose `jobs` row says it is finished.
pub(super) fn record_finished(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(RECORD_FINISHED)?.execute(params![name])?;
    Ok(())
}

/// When a stored job counts as finished (`jobs.finished`), and when its
/// `ttlSecondsAfterFinished` removes it (`jobs.expires`), both wall-clock times.
pub fn lifetime(status: &JobStatus, ttl_seconds: Option<u64>) -> (Option<f64>, Option<f64>) {
    let finished = status.finished_at.filter(|_| status.state.is_finished());
    let expires = finished.zip(ttl_seconds).map(|(f, ttl)| f + ttl as f64);
    (finished, expires)
}

/// GPUs a finished job held times the time it ran: the figure `job_history.gpu_seconds` and
/// `agentd_job_gpu_seconds_total` count.
pub fn gpu_seconds(status: &JobStatus) -> f64 {
    let gpus: usize = status.replicas.iter().map(|r| r.gpu_indices.len()).sum();
    match (status.started_at, status.finished_at) {
        (Some(started), Some(finished)) => gpus as f64 * (finished - started).max(0.0),
        _ => 0.0,
    }
}

/// What to list: every filter is optional; `cursor` continues a previous page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryFilter {
    pub user: Option<String>,
    pub state: Option<JobState>,
    pub queue: Option<String>,
    /// Finished at or after (Unix seconds).
    pub since: Option<f64>,
    /// Finished before (Unix seconds).
    pub until: Option<f64>,
    pub name_prefix: Option<String>,
}

/// Where the next page starts: the last entry of this one, `finished:id`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    pub finished: f64,
    pub id: i64,
}

impl Cursor {
    /// Reads a cursor a page handed out; `None` if it is not one.
    pub fn parse(text: &str) -> Option<Cursor> {
        let (finished, id) = text.split_once(':')?;
        let finished: f64 = finished.parse().ok().filter(|f: &f64| f.is_finite())?;
        Some(Cursor {
            finished,
            id: id.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `f64`'s Display is the shortest text that reads back as the same number.
        write!(f, "{}:{}", self.finished, self.id)
    }
}

/// What one round of pruning removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Finished jobs removed from the store, with their events and logs.
    pub jobs: Vec<String>,
    /// History rows removed.
    pub history_rows: u64,
}

/// The read side of the history and its pruning, on a connection of its own.
#[derive(Clone)]
pub struct History {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    logs: PathBuf,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl History {
    /// Opens a second connection to the database at `path` (already migrated by [`super::Store`]);
    /// `logs` is the directory that holds one directory of logs per job.
    pub fn open(path: &Path, logs: &Path) -> Result<Self, StoreError> {
        let sql = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
            logs: logs.to_owned(),
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The names of the stored finished jobs, the one that finished first first.
    pub fn finished_oldest_first(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached("SELECT name FROM jobs WHERE finished IS NOT NULL ORDER BY finished")
            .map_err(self.sql())?;
        let names = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        Ok(names)
    }

    /// Finished jobs matching `filter`, newest first, at most `limit`, after `cursor`.
    pub fn page(
        &self,
        filter: &HistoryFilter,
        cursor: Option<Cursor>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        let (mut clauses, mut values) = where_clauses(filter);
        if let Some(c) = cursor {
            clauses.push("(finished, id) < (?, ?)".to_owned());
            values.push(Value::Real(c.finished));
            values.push(Value::Integer(c.id));
        }
        let limit = limit.clamp(1, MAX_PAGE);
        values.push(Value::Integer(i64::from(limit)));
        let sql = format!(
            "SELECT id, name, user, queue, state, reason, message, submitted, started, finished,
                    replicas, gpus, gpu_seconds, restarts, restart_reasons, exit_codes, template
             FROM job_history {} ORDER BY finished DESC, id DESC LIMIT ?",
            join_where(&clauses)
        );
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(&sql).map_err(self.sql())?;
        let rows = stmt
            .query_map(params_from_iter(values), |r| {
                Ok((
                    Cursor {
                        finished: r.get(9)?,
                        id: r.get(0)?,
                    },
                    entry(r)?,
                ))
            })
            .map_err(self.sql())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql())?;
        let next_cursor = (rows.len() == limit as usize)
            .then(|| rows.last().map(|(c, _)| c.to_string()))
            .flatten();
        Ok(HistoryPage {
            jobs: rows.into_iter().map(|(_, e)| e).collect(),
            next_cursor,
        })
    }

    /// The finished jobs matching `filter`, added up by user or queue.
    pub fn summary(
        &self,
        filter: &HistoryFilter,
        by: SummaryBy,
    ) -> Result<HistorySummary, StoreError> {
        let key = match by {
            SummaryBy::User => "COALESCE(user, '-')",
            SummaryBy::Queue => "queue",
        };
        let (clauses, values) = where_clauses(filter);
        let conn = self.lock();
        let sql = format!(
            "SELECT {key} AS k, COUNT(*), TOTAL(gpu_seconds) / 3600.0,
                    AVG(COALESCE(started, finished) - submitted),
                    TOTAL(state = 'Succeeded'), TOTAL(state = 'Failed'), TOTAL(state = 'Cancelled')
             FROM job_history {} GROUP BY k ORDER BY k",
            join_where(&clauses)
        );
        let mut rows: BTreeMap<String, SummaryRow> = conn
            .prepare_cached(&sql)
            .map_err(self.sql())?
            .query_map(params_from_iter(values.iter()), |r| {
                Ok(SummaryRow {
                    key: r.get(0)?,
                    jobs: r.get::<_, i64>(1)? as u64,
                    gpu_hours: r.get(2)?,
                    mean_wait_seconds: r.get::<_, Option<f64>>(3)?.unwrap_or(0.0).max(0.0),
                    succeeded: r.get::<_, f64>(4)? as u64,
                    failed: r.get::<_, f64>(5)? as u64,
                    cancelled: r.get::<_, f64>(6)? as u64,
                    failures: BTreeMap::new(),
                })
            })
            .map_err(self.sql())?
            .map(|row| row.map(|row| (row.key.clone(), row)))
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        let mut failed_clauses = clauses;
        failed_clauses.push("state != 'Succeeded'".to_owned());
        let sql = format!(
            "SELECT {key} AS k, reason, COUNT(*) FROM job_history {} GROUP BY k, reason",
            join_where(&failed_clauses)
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(self.sql())?;
        let failures = stmt
            .query_map(params_from_iter(values.iter()), |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(self.sql())?;
        for failure in failures {
            let (key, reason, n) = failure.map_err(self.sql())?;
            if let Some(row) = rows.get_mut(&key) {
                row.failures.insert(reason, n as u64);
            }
        }
        Ok(HistorySummary {
            by,
            rows: rows.into_values().collect(),
        })
    }

    /// Removes one batch of what is past its time: finished jobs that finished before `cutoff`
    /// or whose `ttlSecondsAfterFinished` ran out before `now` (their rows, events and logs),
    /// and history rows of jobs that finished before `cutoff`. Jobs named in `held` are the
    /// core's, which removes them itself. Returns what went; a batch smaller than
    /// [`PRUNE_BATCH`] of both means nothing is left to prune.
    pub fn prune_batch(
        &self,
        cutoff: f64,
        now: f64,
        held: &BTreeSet<String>,
    ) -> Result<Pruned, StoreError> {
        let batch = PRUNE_BATCH as i64;
        let mut conn = self.lock();
        let candidates: Vec<String> = conn
            .prepare_cached(
                "SELECT name FROM jobs WHERE finished IS NOT NULL AND finished < ?1
                 UNION SELECT name FROM jobs WHERE expires IS NOT NULL AND expires <= ?2
                 LIMIT ?3",
            )
            .map_err(self.sql())?
            .query_map(params![cutoff, now, batch + held.len() as i64], |r| {
                r.get(0)
            })
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        let candidates: Vec<String> = candidates
            .into_iter()
            .filter(|n| !held.contains(n))
            .take(PRUNE_BATCH)
            .collect();
        // Logs first: while its row is still there, no new job can take the name (and start
        // writing logs of the same name).
        for name in &candidates {
            let dir = self.logs.join(name);
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(
                    job = name,
                    "cannot delete the logs in {}: {e}",
                    dir.display()
                );
            }
        }
        let path = self.path.clone();
        let sql = |source| StoreError::Sql {
            path: path.clone(),
            source,
        };
        let tx = conn.transaction().map_err(sql)?;
        let mut pruned = Pruned::default();
        {
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM jobs WHERE name = ?1 AND finished IS NOT NULL
                       AND (finished < ?2 OR (expires IS NOT NULL AND expires <= ?3))",
                )
                .map_err(sql)?;
            let mut delete_events = tx
                .prepare_cached("DELETE FROM events WHERE kind = 'job' AND object = ?1")
                .map_err(sql)?;
            for name in candidates {
                // Only a row still past its time goes: the core may have removed the job and
                // taken a new one of the same name meanwhile.
                if delete.execute(params![name, cutoff, now]).map_err(sql)? == 1 {
                    delete_events.execute(params![name]).map_err(sql)?;
                    pruned.jobs.push(name);
                }
            }
            pruned.history_rows = tx
                .prepare_cached(
                    "DELETE FROM job_history WHERE id IN
                       (SELECT id FROM job_history WHERE finished < ?1 ORDER BY finished LIMIT ?2)",
                )
                .map_err(sql)?
                .execute(params![cutoff, batch])
                .map_err(sql)? as u64;
        }
        tx.commit().map_err(sql)?;
        Ok(pruned)
    }

    /// Prunes batch after batch until nothing is left, letting other writers in between.
    pub fn prune(
        &self,
        cutoff: f64,
        now: f64,
        held: &BTreeSet<String>,
    ) -> Result<Pruned, StoreError> {
        let mut all = Pruned::default();
        loop {
            let batch = self.prune_batch(cutoff, now, held)?;
            let more = batch.jobs.len() == PRUNE_BATCH || batch.history_rows == PRUNE_BATCH as u64;
            all.jobs.extend(batch.jobs);
            all.history_rows += batch.history_rows;
            if !more {
                return Ok(all);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn join_where(clauses: &[String]) -> String {
    if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    }
}

/// The filter as SQL conditions and their values, in order.
fn where_clauses(filter: &HistoryFilter) -> (Vec<String>, Vec<Value>) {
    let mut clauses = Vec::new();
    let mut values = Vec::new();
    if let Some(user) = &filter.user {
        clauses.push("user = ?".to_owned());
        values.push(Value::Text(user.clone()));
    }
    if let Some(state) = filter.state {
        clauses.push("state = ?".to_owned());
        values.push(Value::Text(state.as_str().to_owned()));
    }
    if let Some(queue) = &filter.queue {
        clauses.push("queue = ?".to_owned());
        values.push(Value::Text(queue.clone()));
    }
    if let Some(since) = filter.since {
        clauses.push("finished >= ?".to_owned());
        values.push(Value::Real(since));
    }
    if let Some(until) = filter.until {
        clauses.push("finished < ?".to_owned());
        values.push(Value::Real(until));
    }
    if let Some(prefix) = &filter.name_prefix {
        clauses.push("substr(name, 1, length(?)) = ?".to_owned());
        values.push(Value::Text(prefix.clone()));
        values.push(Value::Text(prefix.clone()));
    }
    (clauses, values)
}

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<HistoryEntry> {
    let state: String = r.get(4)?;
    let submitted: f64 = r.get(7)?;
    let started: Option<f64> = r.get(8)?;
    let finished: f64 = r.get(9)?;
    let json_column = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let restart_reasons: Vec<String> = serde_json::from_str(&json_column(14)?).unwrap_or_default();
    let exit_codes: Vec<ReplicaEnd> = serde_json::from_str(&json_column(15)?).unwrap_or_default();
    Ok(HistoryEntry {
        name: r.get(1)?,
        user: r.get(2)?,
        queue: r.get(3)?,
        // Only finished states are written here.
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        reason: r.get(5)?,
        message: r.get(6)?,
        submitted_at: submitted,
        started_at: started,
        finished_at: finished,
        wait_seconds: (started.unwrap_or(finished) - submitted).max(0.0),
        run_seconds: started.map_or(0.0, |s| (finished - s).max(0.0)),
        replicas: r.get(10)?,
        gpus: r.get(11)?,
        gpu_seconds: r.get(12)?,
        restarts: r.get(13)?,
        restart_reasons,
        exit_codes,
        template: r
            .get::<_, Option<String>>(16)?
            .and_then(|t| serde_json::from_str(&t).ok()),
    })
}

#[cfg(test)]
mod tests {
    use agentd_api::jobs::{Owner, ReplicaState, ReplicaStatus};

    use super::*;
    use crate::store::{JobWrite, NewEvent, Store};

    /// A finished job: `gpus` GPUs on each of two workers, started 10 s after submission.
    fn finished(
        name: &str,
        user: &str,
        queue: &str,
        state: JobState,
        reason: &str,
        finished_at: f64,
        gpus: u32,
    ) -> JobStatus {
        let replica = |i: u32| ReplicaStatus {
            name: format!("worker-{i}"),
            replica_type: "worker".into(),
            index: i,
            state: ReplicaState::Succeeded,
            node: Some("n".into()),
            gpus: Vec::new(),
            gpu_indices: (0..gpus).map(|g| i * gpus + g).collect(),
            address: None,
            pid: None,
            exit_code: Some(if state == JobState::Succeeded { 0 } else { 3 }),
            signal: None,
            started_at: None,
            finished_at: None,
        };
        JobStatus {
            name: name.into(),
            kind: "TrainingJob".into(),
            queue: queue.into(),
            priority: 0,
            state,
            reason: reason.into(),
            message: format!("{reason} message"),
            submitted_at: finished_at - 110.0,
            started_at: Some(finished_at - 100.0),
            finished_at: Some(finished_at),
            restarts: 0,
            backoff_limit: 3,
            generation: 1,
            owner: Some(Owner {
                uid: 1000,
                gid: 1000,
                user: user.into(),
            }),
            template: None,
            replicas: vec![replica(0), replica(1)],
            events: Vec::new(),
        }
    }

    fn write(store: &mut Store, status: &JobStatus, expires: Option<f64>, events: &[NewEvent]) {
        store
            .write_batch(
                &[JobWrite::Upsert {
                    name: status.name.clone(),
                    manifest: "kind: TrainingJob".into(),
                    status: serde_json::to_string(status).unwrap(),
                    time: status.finished_at.unwrap_or(0.0),
                    finished: status.finished_at.filter(|_| status.state.is_finished()),
                    expires,
                }],
                events,
            )
            .unwrap();
    }

    fn open(dir: &Path) -> (Store, History) {
        let store = Store::open(dir).unwrap();
        let history = History::open(store.path(), &dir.join("logs")).unwrap();
        (store, history)
    }

    fn names(page: &HistoryPage) -> Vec<&str> {
        page.jobs.iter().map(|j| j.name.as_str()).collect()
    }

    /// Six jobs of two users in two queues, finished at 1000, 2000, ... 6000.
    fn six_jobs(store: &mut Store) {
        let jobs = [
            ("a-1", "alice", "fast", JobState::Succeeded, "Succeeded", 1),
            ("a-2", "alice", "slow", JobState::Failed, "ReplicaFailed", 2),
            ("b-1", "bob", "fast", JobState::Succeeded, "Succeeded", 0),
            ("a-3", "alice", "fast", JobState::Cancelled, "Cancelled", 1),
            (
                "b-2",
                "bob",
                "fast",
                JobState::Failed,
                "BackoffLimitExceeded",
                4,
            ),
            ("b-3", "bob", "slow", JobState::Failed, "ReplicaFailed", 1),
        ];
        for (i, (name, user, queue, state, reason, gpus)) in jobs.into_iter().enumerate() {
            let at = 1000.0 * (i + 1) as f64;
            write(
                store,
                &finished(name, user, queue, state, reason, at, gpus),
                None,
                &[],
            );
        }
    }

    #[test]
    fn a_job_made_from_a_template_keeps_it_in_its_history_row() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, history) = open(dir.path());
        let used = agentd_api::templates::TemplateUse {
            name: "tf2".into(),
            values: vec![agentd_api::templates::TemplateValue {
                path: "spec.tfReplicaSpecs.Worker.replicas".into(),
                value: serde_json::json!(8),
            }],
        };
        let mut made = finished(
            "run-1",
            "alice",
            "fast",
            JobState::Succeeded,
            "Succeeded",
            10.0,
            1,
        );
        made.template = Some(used.clone());
        write(&mut store, &made, None, &[]);
        write(
            &mut store,
            &finished(
                "plain",
                "alice",
                "fast",
                JobState::Succeeded,
                "Succeeded",
                20.0,
                1,
            ),
            None,
            &[],
        );
        let page = history.page(&HistoryFilter::default(), None, 10).unwrap();
        assert_eq!(names(&page), ["plain", "run-1"]);
        assert_eq!(page.jobs[0].template, None);
        assert_eq!(page.jobs[1].template, Some(used));
    }

    #[test]
    fn every_filter_and_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, history) = open(dir.path());
        six_jobs(&mut store);
        let all = HistoryFilter::default();
        let page = history.page(&all, None, 100).unwrap();
        assert_eq!(names(&page), ["b-3", "b-2", "a-3", "b-1", "a-2", "a-1"]);
        assert_eq!(page.next_cursor, None);
        let by = |filter: HistoryFilter| {
            names(&history.page(&filter, None, 100).unwrap())
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let user = HistoryFilter {
            user: Some("alice".into()),
            ..HistoryFilter::default()
        };
        assert_eq!(by(user), ["a-3", "a-2", "a-1"]);
        let state = HistoryFilter {
            state: Some(JobState::Failed),
            ..HistoryFilter::default()
        };
        assert_eq!(by(state), ["b-3", "b-2", "a-2"]);
        let queue = HistoryFilter {
            queue: Some("slow".into()),
            ..HistoryFilter::default()
        };
        assert_eq!(by(queue), ["b-3", "a-2"]);
        let window = HistoryFilter {
            since: Some(2000.0),
            until: Some(4000.0),
            ..HistoryFilter::default()
        };
        assert_eq!(
            by(window),
            ["b-1", "a-2"],
            "since is inclusive, until is not"
        );
        let prefix = HistoryFilter {
            name_prefix: Some("b-".into()),
            ..HistoryFilter::default()
        };
        assert_eq!(by(prefix), ["b-3", "b-2", "b-1"]);
        let several = HistoryFilter {
            user: Some("bob".into()),
            state: Some(JobState::Failed),
            queue: Some("fast".into()),
            ..HistoryFilter::default()
        };
        assert_eq!(by(several), ["b-2"]);

        // Pages of two, each continuing where the last stopped.
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = history.page(&all, cursor, 2).unwrap();
            seen.extend(names(&page).into_iter().map(str::to_owned));
            match page.next_cursor {
                Some(next) => cursor = Some(Cursor::parse(&next).expect("a cursor reads back")),
                None => break,
            }
        }
        assert_eq!(seen, ["b-3", "b-2", "a-3", "b-1", "a-2", "a-1"]);
    }

    #[test]
    fn accounting_of_one_job() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, history) = open(dir.path());
        let status = finished(
            "restarted",
            "alice",
            "fast",
            JobState::Failed,
            "BackoffLimitExceeded",
            5000.0,
            2,
        );
        let event = |reason: &str, message: &str| NewEvent {
            time: 4950.0,
            kind: "job",
            object: "restarted".into(),
            reason: reason.into(),
            message: message.into(),
        };
        write(
            &mut store,
            &status,
            None,
            &[
                event("Running", "all 2 replicas started (generation 1)"),
                event(
                    "ReplicaFailed",
                    "worker-1 ended (exit code 137); restartPolicy OnFailure restarts the gang; restart 1 of 3 in 10.0 s",
                ),
                event(
                    "GpuUnhealthy",
                    "GPU 0 became unhealthy: XID 79; restart 2 of 3 in 20.0 s",
                ),
                event("BackoffLimitExceeded", "no restarts left (backoffLimit 3)"),
            ],
        );
        let page = history.page(&HistoryFilter::default(), None, 10).unwrap();
        let job = &page.jobs[0];
        assert_eq!(job.user.as_deref(), Some("alice"));
        assert_eq!((job.wait_seconds, job.run_seconds), (10.0, 100.0));
        assert_eq!((job.replicas, job.gpus), (2, 4));
        assert!(
            (job.gpu_seconds - 400.0).abs() < 1e-9,
            "{}",
            job.gpu_seconds
        );
        assert_eq!(job.restart_reasons, ["ReplicaFailed", "GpuUnhealthy"]);
        assert_eq!(
            job.exit_codes,
            [
                ReplicaEnd {
                    replica: "worker-0".into(),
                    exit_code: Some(3),
                    signal: None
                },
                ReplicaEnd {
                    replica: "worker-1".into(),
                    exit_code: Some(3),
                    signal: None
                },
            ]
        );
        assert_eq!(job.reason, "BackoffLimitExceeded");
        assert!((gpu_seconds(&status) - job.gpu_seconds).abs() < 1e-9);
    }

    #[test]
    fn summary_matches_a_hand_count() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, history) = open(dir.path());
        six_jobs(&mut store);
        let summary = history
            .summary(&HistoryFilter::default(), SummaryBy::User)
            .unwrap();
        // Every job: two workers, 100 s of run time, 10 s of wait.
        // alice: a-1 (1 GPU each), a-2 (2), a-3 (1) -> 2*100*(1+2+1) = 800 GPU-s.
        // bob: b-1 (0), b-2 (4), b-3 (1) -> 2*100*(0+4+1) = 1000 GPU-s.
        let alice = &summary.rows[0];
        assert_eq!(alice.key, "alice");
        assert_eq!(alice.jobs, 3);
        assert!((alice.gpu_hours - 800.0 / 3600.0).abs() < 1e-9);
        assert!((alice.mean_wait_seconds - 10.0).abs() < 1e-9);
        assert_eq!((alice.succeeded, alice.failed, alice.cancelled), (1, 1, 1));
        assert_eq!(
            alice.failures,
            BTreeMap::from([("Cancelled".into(), 1), ("ReplicaFailed".into(), 1)])
        );
        let bob = &summary.rows[1];
        assert_eq!(bob.key, "bob");
        assert_eq!(bob.jobs, 3);
        assert!((bob.gpu_hours - 1000.0 / 3600.0).abs() < 1e-9);
        assert_eq!((bob.succeeded, bob.failed, bob.cancelled), (1, 2, 0));
        assert_eq!(
            bob.failures,
            BTreeMap::from([
                ("BackoffLimitExceeded".into(), 1),
                ("ReplicaFailed".into(), 1)
            ])
        );
        let by_queue = history
            .summary(
                &HistoryFilter {
                    state: Some(JobState::Failed),
                    ..HistoryFilter::default()
                },
                SummaryBy::Queue,
            )
            .unwrap();
        let keys: Vec<(&str, u64)> = by_queue
            .rows
            .iter()
            .map(|r| (r.key.as_str(), r.jobs))
            .collect();
        assert_eq!(keys, [("fast", 1), ("slow", 2)]);
    }

    #[test]
    fn pruning_takes_what_is_past_its_time_with_events_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, history) = open(dir.path());
        six_jobs(&mut store);
        // b-3 (finished at 6000) is removed by its TTL at 6500.
        write(
            &mut store,
            &finished(
                "b-3",
                "bob",
                "slow",
                JobState::Failed,
                "ReplicaFailed",
                6000.0,
                1,
            ),
            Some(6500.0),
            &[NewEvent {
                time: 6000.0,
                kind: "job",
                object: "b-3".into(),
                reason: "ReplicaFailed".into(),
                message: "m".into(),
            }],
        );
        for name in ["a-1", "a-2", "b-3"] {
            std::fs::create_dir_all(dir.path().join("logs").join(name)).unwrap();
        }
        // Retention cuts at 3000: a-1 and a-2 go; a-2 is the core's, which removes it itself.
        let held = BTreeSet::from(["a-2".to_owned()]);
        let pruned = history.prune(3000.0, 6000.0, &held).unwrap();
        assert_eq!(pruned.jobs, ["a-1"]);
        assert_eq!(pruned.history_rows, 2);
        assert!(store.job("a-1").unwrap().is_none());
        assert!(store.job("a-2").unwrap().is_some());
        assert!(!dir.path().join("logs/a-1").exists());
        assert!(dir.path().join("logs/a-2").exists());
        let left = history.page(&HistoryFilter::default(), None, 10).unwrap();
        assert_eq!(names(&left), ["b-3", "b-2", "a-3", "b-1"]);

        // At 6500 b-3's TTL has run out: the job goes, its history stays.
        let pruned = history.prune(3000.0, 6500.0, &held).unwrap();
        assert_eq!(pruned.jobs, ["b-3"]);
        assert!(store.job("b-3").unwrap().is_none());
        assert!(
            store
                .events(Some("job"), Some("b-3"), 0, 10)
                .unwrap()
                .is_empty()
        );
        assert!(!dir.path().join("logs/b-3").exists());
        let left = history.page(&HistoryFilter::default(), None, 10).unwrap();
        assert_eq!(names(&left), ["b-3", "b-2", "a-3", "b-1"]);
    }

    #[test]
    fn pruning_goes_in_bounded_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, history) = open(dir.path());
        let count = PRUNE_BATCH * 2 + 5;
        for i in 0..count {
            let status = finished(
                &format!("j{i}"),
                "u",
                "fast",
                JobState::Succeeded,
                "Succeeded",
                1000.0 + i as f64,
                0,
            );
            write(&mut store, &status, None, &[]);
        }
        let first = history.prune_batch(1e9, 1e9, &BTreeSet::new()).unwrap();
        assert_eq!(first.jobs.len(), PRUNE_BATCH);
        assert_eq!(first.history_rows, PRUNE_BATCH as u64);
        let rest = history.prune(1e9, 1e9, &BTreeSet::new()).unwrap();
        assert_eq!(rest.jobs.len(), count - PRUNE_BATCH);
        assert!(store.jobs().unwrap().is_empty());
    }

    #[test]
    fn history_queries_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, history) = open(dir.path());
        let conn = history.lock();
        let plan = |sql: &str| -> String {
            conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let newest = plan("SELECT id FROM job_history ORDER BY finished DESC, id DESC LIMIT 100");
        assert!(newest.contains("job_history_finished"), "{newest}");
        assert!(!newest.contains("TEMP B-TREE"), "{newest}");
        let of_user = plan(
            "SELECT id FROM job_history WHERE user = 'a' AND (finished, id) < (5.0, 3)
             ORDER BY finished DESC, id DESC LIMIT 100",
        );
        assert!(of_user.contains("job_history_user"), "{of_user}");
        assert!(!of_user.contains("TEMP B-TREE"), "{of_user}");
    }

    #[test]
    fn an_old_database_upgrades_in_place_with_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let old = finished(
            "old",
            "carol",
            "slow",
            JobState::Succeeded,
            "Succeeded",
            9000.0,
            1,
        );
        let mut running = finished(
            "running",
            "carol",
            "fast",
            JobState::Running,
            "Running",
            0.0,
            1,
        );
        running.finished_at = None;
        {
            // A database as schema version 2 left it.
            let mut conn = Connection::open(dir.path().join("agentd.db")).unwrap();
            let tx = conn.transaction().unwrap();
            for sql in &super::super::migrations::ALL[..2] {
                tx.execute_batch(sql).unwrap();
            }
            tx.pragma_update(None, "user_version", 2).unwrap();
            for status in [&old, &running] {
                tx.execute(
                    "INSERT INTO jobs (name, manifest, status, updated) VALUES (?1, 'kind: TrainingJob', ?2, 1.0)",
                    params![status.name, serde_json::to_string(status).unwrap()],
                )
                .unwrap();
            }
            tx.execute(
                "INSERT INTO events (time, kind, object, reason, message) VALUES
                   (1, 'job', 'old', 'ReplicaFailed', 'worker-0 ended; restart 1 of 3 in 10.0 s')",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
        }
        let (store, history) = open(dir.path());
        assert_eq!(
            store.schema_version().unwrap(),
            super::super::migrations::ALL.len() as i64
        );
        let page = history.page(&HistoryFilter::default(), None, 10).unwrap();
        assert_eq!(names(&page), ["old"]);
        let job = &page.jobs[0];
        assert_eq!(job.user.as_deref(), Some("carol"));
        assert_eq!((job.gpus, job.gpu_seconds), (2, 200.0));
        assert_eq!(job.restart_reasons, ["ReplicaFailed"]);
        // Both come back at start-up; only the finished one counts against the memory bound.
        let restored: Vec<String> = store
            .jobs_to_restore(0)
            .unwrap()
            .into_iter()
            .map(|(name, ..)| name)
            .collect();
        assert_eq!(restored, ["running"]);
        assert_eq!(store.jobs_to_restore(1).unwrap().len(), 2);
    }
}
