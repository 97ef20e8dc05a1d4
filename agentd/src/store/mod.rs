//! The embedded database: one SQLite file in the state directory, in WAL mode, with versioned
//! migrations. It holds what must survive a restart: jobs and their transitions, events, a
//! bounded window of inventory samples, and the job templates (`templates`, on a connection of
//! their own). It is synchronous; the core loop owns the one connection.
//!
//! The core sees a store through [`JobStore`] only: SQLite here, `TrainingJob` objects in
//! cluster mode, an in-memory one (`memory`) in tests.

pub mod history;
pub mod kube;
#[cfg(test)]
pub mod memory;
mod migrations;
pub mod templates;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

pub use history::{Cursor, History, HistoryFilter, MAX_PAGE, Pruned};
pub use templates::{TemplateError, Templates};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open database {}: {source}; check that the state directory is writable by the agent and the file is an agentd database (move it away to start afresh)", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database {} is empty (0 bytes): an agent that used it left more than that, so it was truncated or replaced; restore it from a backup, or move it away to start afresh with no jobs", path.display())]
    Empty { path: PathBuf },
    #[error("another agent is using the state directory {}; stop it first or give this one another --state-dir", path.display())]
    Locked { path: PathBuf },
    #[error("database {} was written by a newer agentd (schema version {found}, this agent knows up to {known}); upgrade agentd or move the file away", path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database {}: {source}", path.display())]
    Sql {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// `api` is the request (`update trainingjobs/status`), `object` its `namespace/name`.
    #[error("{api} {object}: {message}")]
    Kube {
        api: &'static str,
        object: String,
        message: String,
    },
    #[error("{api} {object}: no answer from the API server within {}s; the write may or may not have happened, and is checked on the next one", after.as_secs_f64())]
    KubeTimeout {
        api: &'static str,
        object: String,
        after: Duration,
    },
    #[error(
        "{api} {object}: another agent wrote its status since this one last read or wrote it (at resourceVersion {resource_version}); another leader runs the job now, so this agent does not overwrite it"
    )]
    KubeConflict {
        api: &'static str,
        object: String,
        resource_version: String,
    },
    #[error(
        "the Kubernetes job store needs a multi-threaded Tokio runtime: its requests run on a worker while the core's thread waits"
    )]
    SingleThreadedRuntime,
    #[error(
        "this agent no longer leads (its Lease was not renewed in time), so it writes no job: the next leader keeps them"
    )]
    NotLeading,
}

impl StoreError {
    /// What a person does about a write that failed with this error: the state directory's,
    /// for the local database; the API server's own words say it for the cluster's.
    pub fn remedy(&self) -> Option<&'static str> {
        match self {
            Self::StateDir { .. }
            | Self::Open { .. }
            | Self::Empty { .. }
            | Self::Locked { .. }
            | Self::TooNew { .. }
            | Self::Sql { .. } => {
                Some("free space there (or fix the state directory) and try again")
            }
            Self::Kube { .. }
            | Self::KubeTimeout { .. }
            | Self::KubeConflict { .. }
            | Self::SingleThreadedRuntime
            | Self::NotLeading => None,
        }
    }
}

/// Something that happened to a node or a job: stored as the API shows it.
pub use agentd_api::jobs::Event;

/// One change to the jobs table.
#[derive(Debug, Clone)]
pub enum JobWrite {
    Upsert {
        name: String,
        manifest: String,
        status: String,
        time: f64,
        /// When the job finished (wall clock), while it is finished: it then has a row in the
        /// history too.
        finished: Option<f64>,
        /// When its `ttlSecondsAfterFinished` removes it (wall clock).
        expires: Option<f64>,
    },
    /// Removes the job and its events.
    Delete { name: String },
}

/// An event to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub time: f64,
    pub kind: &'static str,
    pub object: String,
    pub reason: String,
    pub message: String,
}

/// One stored job as written: its name, the manifest as submitted and its status (JSON).
pub type StoredJob = (String, String, String);

/// Where the core keeps what must survive a restart. Every method may block (a write waits
/// for the disk), so the core calls them off the async workers.
pub trait JobStore: Send {
    /// Every stored job, by name.
    fn jobs(&self) -> Result<Vec<StoredJob>, StoreError>;

    /// The stored jobs a core holds in memory from its start: every unfinished one and the
    /// `finished_in_memory` that finished last. A store without a [`JobStore::history`] gives
    /// every job: it cannot read one back later.
    fn jobs_to_restore(&self, finished_in_memory: u32) -> Result<Vec<StoredJob>, StoreError> {
        let _ = finished_in_memory;
        self.jobs()
    }

    /// One stored job by name: how the core reads a finished job it no longer holds. A store
    /// without a [`JobStore::history`] finds none (the core holds all of its jobs).
    fn job(&self, name: &str) -> Result<Option<StoredJob>, StoreError> {
        let _ = name;
        Ok(None)
    }

    /// The history of finished jobs on a connection of its own, where this store keeps one;
    /// `logs` holds each job's logs, pruned with it. Only then may finished jobs leave the
    /// core's memory. The `TrainingJob` objects of cluster mode have none: there the objects
    /// are the history (`kubectl get trainingjobs`), and finished jobs stay in memory until
    /// their `ttlSecondsAfterFinished`.
    fn history(&self, logs: &Path) -> Result<Option<History>, StoreError> {
        let _ = logs;
        Ok(None)
    }

    /// Whether the job `name` is stored in the cluster object with this `uid` (cluster mode:
    /// a request read from an object acts on the job only if that object is the job's). A
    /// store without objects holds every job it has.
    fn holds_object(&self, name: &str, uid: &str) -> bool {
        let _ = (name, uid);
        true
    }

    /// Writes job changes and new events together: all of them are durable when this
    /// returns, or none are.
    fn write_batch(&mut self, jobs: &[JobWrite], events: &[NewEvent]) -> Result<(), StoreError>;

    /// Events in order, optionally only those of one object (`object` needs `kind`), only
    /// those after `after_id`, at most `limit`.
    fn events(
        &self,
        kind: Option<&str>,
        object: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError>;

    /// Whether the store takes a write now (after one failed, say for a full disk).
    fn check_writable(&mut self) -> Result<(), StoreError>;

    /// Keeps one inventory sample (JSON) and forgets samples older than `retention`.
    fn add_inventory_sample(
        &self,
        time: f64,
        sample_json: &str,
        retention: Duration,
    ) -> Result<(), StoreError>;

    /// Puts everything away on a clean shutdown.
    fn close(self: Box<Self>) -> Result<(), StoreError>;
}

impl JobStore for Store {
    fn jobs(&self) -> Result<Vec<StoredJob>, StoreError> {
        Store::jobs(self)
    }

    fn jobs_to_restore(&self, finished_in_memory: u32) -> Result<Vec<StoredJob>, StoreError> {
        Store::jobs_to_restore(self, finished_in_memory)
    }

    fn job(&self, name: &str) -> Result<Option<StoredJob>, StoreError> {
        Store::job(self, name)
    }

    fn history(&self, logs: &Path) -> Result<Option<History>, StoreError> {
        History::open(&self.path, logs).map(Some)
    }

    fn write_batch(&mut self, jobs: &[JobWrite], events: &[NewEvent]) -> Result<(), StoreError> {
        Store::write_batch(self, jobs, events)
    }

    fn events(
        &self,
        kind: Option<&str>,
        object: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        Store::events(self, kind, object, after_id, limit)
    }

    fn check_writable(&mut self) -> Result<(), StoreError> {
        Store::check_writable(self)
    }

    fn add_inventory_sample(
        &self,
        time: f64,
        sample_json: &str,
        retention: Duration,
    ) -> Result<(), StoreError> {
        Store::add_inventory_sample(self, time, sample_json, retention)
    }

    fn close(self: Box<Self>) -> Result<(), StoreError> {
        Store::close(*self)
    }
}

/// The SQLite store of standalone mode.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Held for the life of the store: one agent per state directory.
    _lock: std::fs::File,
}

fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = state_dir.join("agentd.lock");
    let io = |source: std::io::Error| StoreError::StateDir {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: state_dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

/// A database file that exists with nothing in it (and nothing in its write-ahead log) is not
/// a new database: SQLite would take it as one and every job would be gone without a word.
fn refuse_empty(path: &Path) -> Result<(), StoreError> {
    let len = |p: &Path| std::fs::metadata(p).ok().map(|m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if len(path) == Some(0) && len(Path::new(&wal)).unwrap_or(0) == 0 {
        return Err(StoreError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database in `state_dir` and brings its schema up to date.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fs_err::create_dir_all(state_dir).map_err(|source| StoreError::StateDir {
            path: state_dir.to_owned(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        })?;
        let lock = lock_state_dir(state_dir)?;
        let path = state_dir.join("agentd.db");
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        refuse_empty(&path)?;
        let conn = Connection::open(&path).map_err(open_err)?;
        // A corrupt or foreign file fails here, on the first read, rather than later.
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // FULL: an acknowledged job survives power loss too, not only a crash of the agent.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        let mut store = Self {
            conn,
            path,
            _lock: lock,
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        let known = migrations::ALL.len() as i64;
        if version > known {
            return Err(StoreError::TooNew {
                path,
                found: version,
                known,
            });
        }
        for (i, sql) in migrations::ALL.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction().map_err(open_err)?;
            tx.execute_batch(sql).map_err(open_err)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)
                .map_err(open_err)?;
            tx.commit().map_err(open_err)?;
        }
        Ok(())
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.sql())
    }

    pub fn add_event(
        &self,
        time: f64,
        kind: &str,
        object: &str,
        reason: &str,
        message: &str,
    ) -> Result<i64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO events (time, kind, object, reason, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![time, kind, object, reason, message],
            )
            .map_err(self.sql())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Events in order, optionally only those of one object, only those after `after_id`.
    /// `object` needs `kind`: objects are named within their kind.
    pub fn events(
        &self,
        kind: Option<&str>,
        object: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        // One object's events come through the (kind, object, id) index; an `OR` in the query
        // would make SQLite scan every event ever written instead.
        let sql = if object.is_some() {
            "SELECT id, time, kind, object, reason, message FROM events
             WHERE kind = ?2 AND object = ?3 AND id > ?1 ORDER BY id LIMIT ?4"
        } else {
            "SELECT id, time, kind, object, reason, message FROM events
             WHERE id > ?1 AND (?2 IS NULL OR kind = ?2) ORDER BY id LIMIT ?4"
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(self.sql())?;
        let rows = stmt
            .query_map(params![after_id, kind, object, limit], |r| {
                Ok(Event {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    kind: r.get(2)?,
                    object: r.get(3)?,
                    reason: r.get(4)?,
                    message: r.get(5)?,
                })
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Keeps one inventory sample (JSON) and forgets samples older than `retention`.
    pub fn add_inventory_sample(
        &self,
        time: f64,
        sample_json: &str,
        retention: Duration,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO inventory_samples (time, sample) VALUES (?1, ?2)",
                params![time, sample_json],
            )
            .map_err(self.sql())?;
        self.conn
            .execute(
                "DELETE FROM inventory_samples WHERE time < ?1",
                params![time - retention.as_secs_f64()],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// The number of inventory samples kept and the time of the oldest.
    pub fn inventory_window(&self) -> Result<(u64, Option<f64>), StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*), MIN(time) FROM inventory_samples",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .map_err(self.sql())
    }

    /// Writes job changes and new events in one transaction: all of them are durable when this
    /// returns, or none are.
    pub fn write_batch(
        &mut self,
        jobs: &[JobWrite],
        events: &[NewEvent],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM jobs WHERE name = ?1")
                .map_err(sql)?;
            let mut delete_events = tx
                .prepare_cached("DELETE FROM events WHERE kind = 'job' AND object = ?1")
                .map_err(sql)?;
            for write in jobs {
                if let JobWrite::Delete { name } = write {
                    delete.execute(params![name]).map_err(sql)?;
                    delete_events.execute(params![name]).map_err(sql)?;
                }
            }
            // Events before the jobs: a finished job's history row counts its restarts from them.
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO events (time, kind, object, reason, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(sql)?;
            for e in events {
                insert
                    .execute(params![e.time, e.kind, e.object, e.reason, e.message])
                    .map_err(sql)?;
            }
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO jobs (name, manifest, status, updated, finished, expires)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(name) DO UPDATE SET status = excluded.status,
                        updated = excluded.updated, finished = excluded.finished,
                        expires = excluded.expires",
                )
                .map_err(sql)?;
            for write in jobs {
                if let JobWrite::Upsert {
                    name,
                    manifest,
                    status,
                    time,
                    finished,
                    expires,
                } = write
                {
                    upsert
                        .execute(params![name, manifest, status, time, finished, expires])
                        .map_err(sql)?;
                    if finished.is_some() {
                        history::record_finished(&tx, name).map_err(sql)?;
                    }
                }
            }
        }
        tx.commit().map_err(sql)
    }

    /// Whether the database takes a write now (after one failed, say for a full disk).
    pub fn check_writable(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let sql = |source| StoreError::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ('write_check', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![crate::inventory::unix_now().to_string()],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// The stored jobs an agent holds in memory: every unfinished one and the
    /// `finished_in_memory` that finished last: (name, manifest, status JSON).
    pub fn jobs_to_restore(&self, finished_in_memory: u32) -> Result<Vec<StoredJob>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, manifest, status FROM jobs WHERE finished IS NULL
                 UNION ALL
                 SELECT * FROM (SELECT name, manifest, status FROM jobs WHERE finished IS NOT NULL
                                ORDER BY finished DESC LIMIT ?1)",
            )
            .map_err(self.sql())?;
        let rows = stmt
            .query_map(params![finished_in_memory], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// Every stored job: (name, manifest, status JSON).
    pub fn jobs(&self) -> Result<Vec<StoredJob>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, manifest, status FROM jobs ORDER BY name")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.sql())?;
        rows.collect::<Result<_, _>>().map_err(self.sql())
    }

    /// One stored job: (name, manifest, status JSON), if there is such a job.
    pub fn job(&self, name: &str) -> Result<Option<StoredJob>, StoreError> {
        self.conn
            .prepare_cached("SELECT name, manifest, status FROM jobs WHERE name = ?1")
            .map_err(self.sql())?
            .query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(self.sql())
    }

    /// Checkpoints the WAL into the main file; called on a clean shutdown.
    pub fn close(self) -> Result<(), StoreError> {
        let path = self.path.clone();
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(|source| StoreError::Sql {
                path: path.clone(),
                source,
            })?;
        self.conn
            .close()
            .map_err(|(_, source)| StoreError::Sql { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write the API server refused is told in its words alone: the state directory has
    /// nothing to do with a namespace that does not exist.
    #[test]
    fn only_the_local_stores_failures_send_a_person_to_the_state_directory() {
        let kube = StoreError::Kube {
            api: "create trainingjobs",
            object: "nosuch/lost".to_owned(),
            message: "404 NotFound: namespaces \"nosuch\" not found".to_owned(),
        };
        assert_eq!(kube.remedy(), None);
        let local = StoreError::Locked {
            path: PathBuf::from("/var/lib/agentd"),
        };
        assert!(
            local
                .remedy()
                .is_some_and(|r| r.contains("state directory"))
        );
    }

    #[test]
    fn reopening_keeps_events_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .add_event(1.0, "node", "n1", "GpuUnhealthy", "GPU 3 unhealthy: XID 79")
            .unwrap();
        store.close().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            migrations::ALL.len() as i64
        );
        let events = store.events(Some("node"), None, 0, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message, "GPU 3 unhealthy: XID 79");
    }

    #[test]
    fn one_objects_events_use_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let plan: String = store
            .conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT id FROM events
                 WHERE kind = 'job' AND object = 'x' AND id > 0 ORDER BY id LIMIT 10",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("events_object"), "{plan}");
    }

    #[test]
    fn inventory_samples_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for t in 0..100 {
            store
                .add_inventory_sample(f64::from(t), "{}", Duration::from_secs(10))
                .unwrap();
        }
        let (count, oldest) = store.inventory_window().unwrap();
        assert_eq!(count, 11);
        assert_eq!(oldest, Some(89.0));
    }

    #[test]
    fn corrupt_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agentd.db"), vec![b'x'; 8192]).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("corrupt file must not open")
            .to_string();
        assert!(err.contains("agentd.db"), "{err}");
        assert!(err.contains("move it away"), "{err}");
    }

    #[test]
    fn an_empty_database_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("agentd.db"), b"").unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("an empty file is not a new database")
            .to_string();
        assert!(err.contains("agentd.db"), "{err}");
        assert!(err.contains("move it away"), "{err}");
    }

    #[test]
    fn job_batches_are_atomic_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        let upsert = |name: &str, status: &str| JobWrite::Upsert {
            name: name.into(),
            manifest: "kind: TrainingJob".into(),
            status: status.into(),
            time: 1.0,
            finished: None,
            expires: None,
        };
        let event = |object: &str| NewEvent {
            time: 1.0,
            kind: "job",
            object: object.into(),
            reason: "Submitted".into(),
            message: "m".into(),
        };
        store
            .write_batch(
                &[upsert("a", "{}"), upsert("b", "{}")],
                &[event("a"), event("b")],
            )
            .unwrap();
        store
            .write_batch(
                &[
                    upsert("a", "{\"x\":1}"),
                    JobWrite::Delete { name: "b".into() },
                ],
                &[],
            )
            .unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let jobs = store.jobs().unwrap();
        assert_eq!(
            jobs,
            vec![("a".into(), "kind: TrainingJob".into(), "{\"x\":1}".into())]
        );
        assert_eq!(
            store.events(Some("job"), Some("b"), 0, 10).unwrap(),
            vec![],
            "events go with the job"
        );
        assert_eq!(
            store.events(Some("job"), Some("a"), 0, 10).unwrap().len(),
            1
        );
    }

    #[test]
    fn one_agent_per_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("another agent is using the state directory"),
            "{err}"
        );
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("agentd.db")).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("newer agentd"), "{err}");
    }

    #[test]
    fn unwritable_state_dir_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "").unwrap();
        let err = Store::open(&file.join("state")).err().unwrap().to_string();
        assert!(err.contains("plain-file/state"), "{err}");
    }
}
