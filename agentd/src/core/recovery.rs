//! Start-up after a stop or a crash: every stored job comes back. A running gang whose
//! replicas all still run under their supervisors (processes, or transient units under
//! systemd), or have recorded how they ended (or, for a unit that was killed, systemd knows
//! how), is adopted as it is: same processes, same GPUs, same restart count. A gang that
//! cannot be adopted (it was still starting, or a supervisor was killed and nothing says how
//! its replica ended) has whatever is left of it stopped and is restarted without charging
//! its `backoffLimit`: the agent, not the job, is why it stopped. What that means for each job is the lifecycle's to decide
//! ([`Input::Restored`], [`Input::Unreadable`]); this part reads the store and asks the
//! executor.

use std::collections::BTreeSet;

use agentd_api::jobs::{JobState, JobStatus, ReplicaState};

use super::lifecycle::{self, Input};
use super::{Core, CoreError, JobRecord};
use crate::exec::StoredReplica;
use crate::job;

impl Core {
    pub(super) fn recover(&mut self) -> Result<(), CoreError> {
        let now = self.clock.now();
        let mut adopted = BTreeSet::new();
        let in_memory = self
            .lifecycle
            .settings()
            .finished_in_memory
            .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX));
        for (name, manifest, status_json) in self.store.jobs_to_restore(in_memory)? {
            let (status, parsed) = match (
                serde_json::from_str::<JobStatus>(&status_json),
                job::parse(manifest.as_bytes()),
            ) {
                (Ok(status), Ok(mut parsed)) => {
                    parsed.spec.queue = Some(status.queue.clone());
                    (status, parsed)
                }
                (status, parsed) => {
                    self.stop_unreadable(&name, &status_json);
                    let problems = lifecycle::unreadable_problems(
                        status.as_ref().err(),
                        parsed.as_ref().err(),
                    );
                    self.lifecycle.step(
                        Input::Unreadable {
                            name,
                            manifest,
                            status: status.ok().map(Box::new),
                            parsed: parsed.ok().map(Box::new),
                            problems,
                        },
                        now,
                    );
                    continue;
                }
            };
            let record = JobRecord::restore(parsed, manifest, status, now);
            let generation = record.status.generation;
            if record.status.state.is_finished()
                && record.job.spec.run_policy.clean_pod_policy != Some(job::CleanPodPolicy::All)
            {
                self.executor.keep_ended_of(&name);
            }
            let running: Vec<StoredReplica> = record
                .status
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Running)
                .map(|r| StoredReplica {
                    name: r.name.clone(),
                    pid: r.pid,
                })
                .collect();
            let adoption = if record.status.state == JobState::Running {
                self.executor.adopt(&name, generation, &running)
            } else {
                Err("the gang was still starting".to_owned())
            };
            if adoption.is_ok() {
                adopted.insert(name.clone());
            } else {
                let killed = self
                    .executor
                    .stop_leftovers(&name, Some(generation), &running);
                if killed > 0 {
                    tracing::warn!(
                        job = name,
                        killed,
                        "stopped replica processes left by the previous agent"
                    );
                }
            }
            self.lifecycle.step(
                Input::Restored {
                    record: Box::new(record),
                    adopted: adoption,
                },
                now,
            );
        }
        // Replicas of gangs that were not adopted, and of jobs no longer stored.
        self.executor.discard_all_but(&adopted);
        tracing::info!(jobs = self.lifecycle.jobs().len(), "jobs restored");
        Ok(())
    }

    /// Stops the processes of a stored job that cannot be read, found from what of its status
    /// can be read (a corrupt status may still be JSON): its units by their exact names, its
    /// running replicas' process groups.
    fn stop_unreadable(&self, name: &str, status_json: &str) {
        let stored = serde_json::from_str::<serde_json::Value>(status_json).ok();
        let generation = stored
            .as_ref()
            .and_then(|v| v.get("generation")?.as_u64())
            .and_then(|g| u32::try_from(g).ok());
        let replicas: Vec<StoredReplica> = stored
            .as_ref()
            .and_then(|v| v.get("replicas")?.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                let running = r.get("state").and_then(|s| s.as_str()) == Some("Running");
                Some(StoredReplica {
                    name: r.get("name")?.as_str()?.to_owned(),
                    pid: r
                        .get("pid")
                        .and_then(serde_json::Value::as_u64)
                        .and_then(|p| u32::try_from(p).ok())
                        .filter(|_| running),
                })
            })
            .collect();
        let killed = self.executor.stop_leftovers(name, generation, &replicas);
        if killed > 0 {
            tracing::warn!(
                job = name,
                killed,
                "stopped the replicas of an unreadable job"
            );
        }
    }
}
