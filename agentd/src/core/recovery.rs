//! Start-up after a stop or a crash: every stored job comes back; replicas a killed agent left
//! behind are stopped; gangs that were running are restarted (reason `AgentRestarted`, counted
//! like any restart).

use agentd_api::jobs::{JobState, JobStatus, ReplicaState};

use super::{Core, CoreError, JobRecord};
use crate::exec::local;
use crate::job;

impl Core {
    pub(super) fn recover(&mut self) -> Result<(), CoreError> {
        let now = self.clock.now();
        for (name, manifest, status_json) in self.store.jobs()? {
            let (status, parsed) = match (
                serde_json::from_str::<JobStatus>(&status_json),
                job::parse(manifest.as_bytes()),
            ) {
                (Ok(status), Ok(mut parsed)) => {
                    parsed.spec.queue = Some(status.queue.clone());
                    (status, parsed)
                }
                (status, parsed) => {
                    self.keep_unreadable(&name, manifest, &status_json, status, parsed, now);
                    continue;
                }
            };
            let mut record = JobRecord::restore(parsed, manifest, status, now);
            let leftovers: Vec<u32> = record
                .status
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Running)
                .filter_map(|r| r.pid)
                .collect();
            if !leftovers.is_empty() {
                self.executor.stop_leftover_units(&name);
            }
            for pgid in leftovers {
                let killed = local::kill_leftovers(pgid, &name);
                if killed > 0 {
                    tracing::warn!(
                        job = name,
                        pgid,
                        killed,
                        "stopped replica processes left by the previous agent"
                    );
                }
            }
            for r in &mut record.status.replicas {
                if r.state == ReplicaState::Running {
                    r.state = ReplicaState::Terminated;
                }
            }
            let state = record.status.state;
            self.jobs.insert(name.clone(), record);
            match state {
                JobState::Placed | JobState::Starting | JobState::Running => {
                    self.recover_running(&name, now);
                }
                JobState::Restarting => {
                    let record = self.jobs.get_mut(&name).expect("inserted");
                    record.requeue(now);
                    self.dirty.insert(name);
                }
                JobState::Queued | JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                }
            }
        }
        tracing::info!(jobs = self.jobs.len(), "jobs restored");
        Ok(())
    }

    fn recover_running(&mut self, name: &str, now: super::Now) {
        let record = self.jobs.get_mut(name).expect("present");
        let limit = record.status.backoff_limit;
        let message = "the agent restarted while the gang was running";
        if record.status.restarts >= limit {
            record.finish(
                JobState::Failed,
                "BackoffLimitExceeded",
                &format!("{message}; no restarts left (backoffLimit {limit})"),
                now,
            );
            self.dirty.insert(name.to_owned());
            self.event(
                name,
                "BackoffLimitExceeded",
                format!("{message}; no restarts left (backoffLimit {limit})"),
            );
            return;
        }
        record.status.restarts += 1;
        let restarts = record.status.restarts;
        if let Some(metrics) = &self.metrics {
            metrics.gang_restarted("AgentRestarted");
        }
        record.requeue(now);
        record.set_state(JobState::Queued, "AgentRestarted", message);
        self.dirty.insert(name.to_owned());
        self.event(
            name,
            "AgentRestarted",
            format!("{message}; restarting the gang (restart {restarts} of {limit})"),
        );
    }
}
