//! Start-up after a stop or a crash: every stored job comes back. A running gang whose
//! replicas all still run under their supervisors (or have recorded how they ended) is adopted
//! as it is: same processes, same GPUs, same restart count. A gang that cannot be adopted (its
//! replicas were transient units, or the gang was still starting) has whatever is left of it
//! stopped and is restarted without charging its `backoffLimit`: the agent, not the job, is
//! why it stopped.

use std::collections::{BTreeMap, BTreeSet};

use agentd_api::jobs::{JobState, JobStatus, ReplicaState};

use super::record::Allocation;
use super::{Core, CoreError, JobRecord};
use crate::exec::local;
use crate::{job, sched};

impl Core {
    pub(super) fn recover(&mut self) -> Result<(), CoreError> {
        let now = self.clock.now();
        let mut adopted = BTreeSet::new();
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
            let state = record.status.state;
            let why_not = if state == JobState::Running {
                match self.adopt(&mut record) {
                    Ok(replicas) => {
                        tracing::info!(job = name, replicas, "adopted the running gang");
                        self.jobs.insert(name.clone(), record);
                        self.event(
                            &name,
                            "Adopted",
                            format!(
                                "the agent restarted; {replicas} running replicas adopted as they are"
                            ),
                        );
                        adopted.insert(name);
                        continue;
                    }
                    Err(why) => why,
                }
            } else {
                "the gang was still starting".to_owned()
            };
            self.stop_leftovers(&name, &record);
            for r in &mut record.status.replicas {
                if r.state == ReplicaState::Running {
                    r.state = ReplicaState::Terminated;
                }
            }
            self.jobs.insert(name.clone(), record);
            match state {
                JobState::Placed | JobState::Starting | JobState::Running => {
                    self.recover_running(&name, &why_not, now);
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
        // Replicas of gangs that were not adopted, and of jobs no longer stored.
        for job in self.executor.jobs_with_replicas() {
            if !adopted.contains(&job) {
                let killed = self.executor.discard(&job);
                if killed > 0 {
                    tracing::warn!(
                        job,
                        killed,
                        "stopped replica processes left by the previous agent"
                    );
                }
            }
        }
        tracing::info!(jobs = self.jobs.len(), "jobs restored");
        Ok(())
    }

    /// Watches every running replica of a running gang again and gives the gang back its
    /// allocation, or says why the gang cannot be adopted (then nothing is adopted).
    fn adopt(&self, record: &mut JobRecord) -> Result<usize, String> {
        let name = record.status.name.clone();
        let generation = record.status.generation;
        let mut adoptable = Vec::new();
        for r in &record.status.replicas {
            if r.state != ReplicaState::Running {
                continue;
            }
            let Some(pid) = r.pid else {
                return Err(format!("replica {} has no recorded process", r.name));
            };
            let a = self
                .executor
                .adoptable(&name, &r.name, generation, pid)
                .map_err(|why| format!("replica {}: {why}", r.name))?;
            adoptable.push(a);
        }
        let requests: BTreeMap<String, sched::Resources> = job::gang_request(&record.job, 0.0)
            .replicas
            .into_iter()
            .map(|r| (r.name, r.resources))
            .collect();
        let assignments = record
            .status
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::Pending)
            .filter_map(|r| {
                Some(sched::Assignment {
                    replica: r.name.clone(),
                    node: r.node.clone()?,
                    gpu_indices: r.gpu_indices.clone(),
                    resources: requests.get(&r.name).copied().unwrap_or_default(),
                })
            })
            .collect();
        record.allocation = Some(Allocation {
            generation,
            assignments,
        });
        let count = adoptable.len();
        for a in adoptable {
            self.executor.adopt(a)?;
        }
        Ok(count)
    }

    /// Stops what a previous agent's replicas of a gang that is not adopted left running.
    fn stop_leftovers(&self, name: &str, record: &JobRecord) {
        let generation = record.status.generation;
        let running: Vec<_> = record
            .status
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
            .collect();
        let units: Vec<String> = running
            .iter()
            .filter_map(|r| crate::systemd::unit_name(name, &r.name, generation).ok())
            .collect();
        self.executor.stop_leftover_units(&units);
        for pgid in running.iter().filter_map(|r| r.pid) {
            let killed = local::kill_leftovers(pgid, name);
            if killed > 0 {
                tracing::warn!(
                    job = name,
                    pgid,
                    killed,
                    "stopped replica processes left by the previous agent"
                );
            }
        }
    }

    /// Restarts a gang the agent could not adopt. Not counted against `backoffLimit`: the
    /// agent stopped, the job did not fail.
    fn recover_running(&mut self, name: &str, why_not: &str, now: super::Now) {
        let record = self.jobs.get_mut(name).expect("present");
        let message = format!(
            "the agent restarted and could not adopt the gang ({why_not}); \
             restarting it, not counted against backoffLimit"
        );
        if let Some(metrics) = &self.metrics {
            metrics.gang_restarted("AgentRestarted");
        }
        record.requeue(now);
        record.set_state(JobState::Queued, "AgentRestarted", &message);
        self.dirty.insert(name.to_owned());
        self.event(name, "AgentRestarted", message);
    }
}
