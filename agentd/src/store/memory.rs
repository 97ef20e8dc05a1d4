//! A store in memory, for tests of the core that need no database. Its writes can be made to
//! fail, as a full disk makes SQLite's fail.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::{Event, JobStore, JobWrite, NewEvent, StoreError, StoredJob};

#[derive(Debug, Default)]
struct Tables {
    /// name -> (manifest, status)
    jobs: BTreeMap<String, (String, String)>,
    events: Vec<Event>,
    /// The last event id given: ids are never reused, as SQLite's AUTOINCREMENT.
    last_event_id: i64,
    /// How many times each job was written.
    writes: BTreeMap<String, usize>,
}

/// A shared handle: the core holds one, the test another.
#[derive(Debug, Clone, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
    failing: Arc<AtomicBool>,
}

impl MemoryStore {
    /// Makes every write fail (`true`) or succeed again.
    pub fn fail_writes(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// How many writes of the job `name` the store took.
    pub fn writes_of(&self, name: &str) -> usize {
        self.lock().writes.get(name).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(StoreError::StateDir {
                path: "memory".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        Ok(())
    }
}

impl JobStore for MemoryStore {
    fn jobs(&self) -> Result<Vec<StoredJob>, StoreError> {
        Ok(self
            .lock()
            .jobs
            .iter()
            .map(|(name, (manifest, status))| (name.clone(), manifest.clone(), status.clone()))
            .collect())
    }

    fn write_batch(&mut self, jobs: &[JobWrite], events: &[NewEvent]) -> Result<(), StoreError> {
        self.refuse()?;
        let mut tables = self.lock();
        for write in jobs {
            match write {
                JobWrite::Upsert {
                    name,
                    manifest,
                    status,
                    ..
                } => {
                    let row = tables
                        .jobs
                        .entry(name.clone())
                        .or_insert_with(|| (manifest.clone(), String::new()));
                    row.1.clone_from(status);
                    *tables.writes.entry(name.clone()).or_default() += 1;
                }
                JobWrite::Delete { name } => {
                    tables.jobs.remove(name);
                    tables
                        .events
                        .retain(|e| !(e.kind == "job" && e.object == *name));
                }
            }
        }
        for e in events {
            tables.last_event_id += 1;
            let id = tables.last_event_id;
            tables.events.push(Event {
                id,
                time: e.time,
                kind: e.kind.to_owned(),
                object: e.object.clone(),
                reason: e.reason.clone(),
                message: e.message.clone(),
            });
        }
        Ok(())
    }

    fn events(
        &self,
        kind: Option<&str>,
        object: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        Ok(self
            .lock()
            .events
            .iter()
            .filter(|e| e.id > after_id)
            .filter(|e| kind.is_none_or(|k| e.kind == k))
            .filter(|e| object.is_none_or(|o| e.object == o))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    fn check_writable(&mut self) -> Result<(), StoreError> {
        self.refuse()
    }

    fn add_inventory_sample(
        &self,
        _time: f64,
        _sample_json: &str,
        _retention: Duration,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}
