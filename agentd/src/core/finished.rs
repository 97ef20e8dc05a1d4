//! Finished jobs and the history on disk. The lifecycle holds the active jobs and only the
//! `jobs.finished_in_memory` that finished last (`Lifecycle::let_finished_go`, after each
//! written turn); every other finished job lives in the store alone, where
//! `GET /v1/jobs/{name}`, `agentctl logs` and `agentctl cancel` (which removes it) still find it
//! ([`stored`]), and from where the history is pruned once `jobs.history_retention` has passed.
//!
//! The pruning runs on a blocking thread with [`History`]'s own connection, in batches of
//! [`crate::store::history::PRUNE_BATCH`], never on the core's thread.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentd_api::jobs::JobStatus;

use super::{CoreError, Now};
use crate::store::{History, JobStore};

/// Ticks between two rounds of pruning (one minute).
pub(super) const PRUNE_TICKS: u64 = 240;

/// The history on disk and its pruning.
pub struct Pruning {
    /// `jobs.history_retention`.
    retention: Duration,
    history: History,
    /// A round of pruning is running: the next waits for it to end.
    running: Arc<AtomicBool>,
}

impl Pruning {
    pub fn new(retention: Duration, history: History) -> Self {
        Self {
            retention,
            history,
            running: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn history(&self) -> &History {
        &self.history
    }

    /// Starts a round of pruning in the background unless one is running. `held`: the finished
    /// jobs the core holds, which it removes itself.
    pub fn start(&self, now: Now, held: BTreeSet<String>) {
        if self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let cutoff = now.wall - self.retention.as_secs_f64();
        let history = self.history.clone();
        let running = Arc::clone(&self.running);
        let retention = crate::config::format_duration(self.retention);
        tokio::task::spawn_blocking(move || {
            match history.prune(cutoff, now.wall, &held) {
                Ok(pruned) if !pruned.jobs.is_empty() || pruned.history_rows > 0 => {
                    tracing::info!(
                        jobs = pruned.jobs.len(),
                        history_rows = pruned.history_rows,
                        "pruned finished jobs past jobs.history_retention ({retention}) or their ttlSecondsAfterFinished"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot prune the job history: {e}"),
            }
            running.store(false, Ordering::Release);
        });
    }
}

/// A job that is not in memory, read from the store with its events.
pub fn stored(store: &dyn JobStore, name: &str) -> Result<JobStatus, CoreError> {
    let (_, _, text) = store
        .job(name)?
        .ok_or_else(|| CoreError::NotFound(name.to_owned()))?;
    let mut status: JobStatus = serde_json::from_str(&text).map_err(|e| {
        CoreError::Conflict(format!(
            "job {name:?} is stored with an unreadable status: {e}"
        ))
    })?;
    status.events = store
        .events(Some("job"), Some(name), 0, 10_000)?
        .into_iter()
        .map(|e| agentd_api::jobs::JobEvent {
            time: e.time,
            reason: e.reason,
            message: e.message,
        })
        .collect();
    Ok(status)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use agentd_api::jobs::JobState;
    use tokio::sync::oneshot;

    use super::super::{Clock, Command, Core, CoreError, ManualClock};
    use crate::job;
    use crate::store::HistoryFilter;

    /// A job that never fits (it asks for a GPU on a node that has none) and fails after 60 s.
    fn manifest(name: &str) -> String {
        format!(
            "apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  runPolicy: {{scheduleTimeoutSeconds: 60}}
  replicaSpecs:
    Worker:
      replicas: 1
      template:
        spec:
          containers:
            - name: tensorflow
              command: [\"true\"]
              resources: {{limits: {{nvidia.com/gpu: 1}}}}
"
        )
    }

    fn open(dir: &Path, clock: &ManualClock, in_memory: u32) -> Core {
        let mut config = super::super::tests::config(dir);
        config.jobs.finished_in_memory = in_memory;
        config.jobs.history_retention = std::time::Duration::from_hours(24);
        super::super::tests::open_configured(&config, clock)
    }

    /// Sends a command and writes the turn; the answer.
    fn ask<T>(
        core: &mut Core,
        build: impl FnOnce(super::super::Reply<T>) -> Command,
    ) -> Result<T, CoreError> {
        let (reply, mut answer) = oneshot::channel();
        core.command(build(reply));
        core.commit().expect("written");
        answer.try_recv().expect("answered once written")
    }

    fn submit(core: &mut Core, name: &str) -> Result<(), CoreError> {
        let rules = job::Admission::new(
            crate::config::default_queues().into_keys(),
            crate::config::DEFAULT_QUEUE,
            crate::config::DEFAULT_MAX_REPLICAS_PER_JOB,
        );
        let text = manifest(name);
        let parsed = job::admit(text.as_bytes(), &rules).expect("a valid manifest");
        let owner = agentd_api::Owner {
            uid: 1000,
            gid: 1000,
            user: "alice".to_owned(),
        };
        ask(core, |reply| Command::Submit {
            job: Box::new(parsed),
            manifest: text,
            owner,
            reply,
        })
        .map(|_| ())
    }

    fn cancel(core: &mut Core, name: &str) -> Result<agentd_api::jobs::JobStatus, CoreError> {
        ask(core, |reply| Command::Cancel {
            name: name.to_owned(),
            by: "alice".to_owned(),
            object: None,
            reply,
        })
    }

    /// Submits `names` one after the other, each failing its schedule time-out.
    fn finish_all(core: &mut Core, clock: &ManualClock, names: &[&str]) {
        for name in names {
            submit(core, name).expect("accepted");
            clock.advance(61.0);
            core.tick();
            core.commit().expect("written");
        }
    }

    fn in_memory(core: &Core) -> Vec<&str> {
        core.lifecycle.jobs().keys().map(String::as_str).collect()
    }

    fn history(core: &Core) -> crate::store::History {
        core.pruning
            .as_ref()
            .expect("SQLite keeps a history")
            .history()
            .clone()
    }

    #[tokio::test]
    async fn finished_jobs_leave_memory_and_are_read_from_disk() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let clock = ManualClock::new(1_000_000.0);
        let mut core = open(dir.path(), &clock, 2);
        finish_all(&mut core, &clock, &["j1", "j2", "j3", "j4"]);
        submit(&mut core, "active").expect("accepted");
        // The two that finished last stay, and the active one.
        assert_eq!(in_memory(&core), ["active", "j3", "j4"]);

        let on_disk = core.get("j1").expect("read from the store");
        assert_eq!(on_disk.state, JobState::Failed);
        assert_eq!(on_disk.reason, "ScheduleTimeout");
        assert_eq!(
            on_disk.events.first().map(|e| e.reason.as_str()),
            Some("Submitted"),
            "its events come with it"
        );
        let logs = core.logs("j1", None).expect("its logs are found");
        assert!(logs.complete);

        // The name is taken while the job is in the history, and free once it is removed.
        let taken = submit(&mut core, "j1").expect_err("the name is in use");
        assert!(taken.to_string().contains("already exists"), "{taken}");
        let removed = cancel(&mut core, "j1").expect("removed from disk");
        assert_eq!(removed.reason, "Removed");
        assert!(matches!(core.get("j1"), Err(CoreError::NotFound(_))));
        assert!(matches!(
            cancel(&mut core, "j1"),
            Err(CoreError::NotFound(_))
        ));
        submit(&mut core, "j1").expect("the name is free again");

        // The removed job's accounting stays in the history.
        let page = history(&core)
            .page(&HistoryFilter::default(), None, 10)
            .unwrap();
        let names: Vec<&str> = page.jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["j4", "j3", "j2", "j1"]);
    }

    #[tokio::test]
    async fn a_removal_that_cannot_be_written_leaves_the_job_on_disk() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let clock = ManualClock::new(1_000_000.0);
        let mut core = open(dir.path(), &clock, 0);
        finish_all(&mut core, &clock, &["j1"]);
        assert!(in_memory(&core).is_empty());
        let (reply, mut answer) = oneshot::channel();
        core.command(Command::Cancel {
            name: "j1".to_owned(),
            by: "alice".to_owned(),
            object: None,
            reply,
        });
        let effects = core.lifecycle.not_persisted("disk full");
        core.perform(effects);
        let refused = answer
            .try_recv()
            .expect("answered")
            .expect_err("not written");
        assert!(matches!(refused, CoreError::NotWritten(_)), "{refused}");
        core.commit().expect("written");
        assert!(core.store.job("j1").unwrap().is_some(), "still stored");
        assert_eq!(
            core.get("j1").expect("still readable").state,
            JobState::Failed
        );
    }

    #[tokio::test]
    async fn a_restarted_agent_holds_only_the_recent_finished_jobs() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let clock = ManualClock::new(1_000_000.0);
        {
            let mut core = open(dir.path(), &clock, 10);
            finish_all(&mut core, &clock, &["j1", "j2", "j3"]);
            submit(&mut core, "active").expect("accepted");
            assert_eq!(in_memory(&core), ["active", "j1", "j2", "j3"]);
        }
        let clock = ManualClock::new(clock.now().wall + 5.0);
        let core = open(dir.path(), &clock, 1);
        assert_eq!(in_memory(&core), ["active", "j3"]);
        let status = core.get("j1").expect("read from the store after a restart");
        assert_eq!(status.state, JobState::Failed);
        assert!(!status.events.is_empty());
    }

    #[tokio::test]
    async fn history_past_its_retention_is_pruned_with_its_logs() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let clock = ManualClock::new(1_000_000.0);
        let mut core = open(dir.path(), &clock, 1);
        finish_all(&mut core, &clock, &["old-1", "old-2"]);
        for name in ["old-1", "old-2"] {
            std::fs::create_dir_all(dir.path().join("logs").join(name)).unwrap();
        }
        clock.step_wall(20.0 * 3600.0);
        finish_all(&mut core, &clock, &["new"]);
        // A day after the first two finished, they are past the retention (24 h).
        clock.step_wall(5.0 * 3600.0);
        let history = history(&core);
        let mut waited = 0;
        loop {
            // A round starts unless the one before is still running.
            core.prune_history();
            let names: Vec<String> = history
                .page(&HistoryFilter::default(), None, 10)
                .unwrap()
                .jobs
                .into_iter()
                .map(|j| j.name)
                .collect();
            if names == ["new"] {
                break;
            }
            waited += 1;
            assert!(waited < 500, "still in the history: {names:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The pruning round is one transaction per batch: once the history is pruned, so are
        // the jobs of that batch.
        for name in ["old-1", "old-2"] {
            assert!(core.store.job(name).unwrap().is_none(), "{name}");
            assert!(!dir.path().join("logs").join(name).exists(), "{name}");
        }
        assert_eq!(in_memory(&core), ["new"]);
        submit(&mut core, "old-1").expect("a pruned job's name is free");
    }
}
