//! The queues in force and what is in them: the definitions (agentd.toml's, or the cluster's
//! ConfigMap in their place), the last settings of queues that were removed, and the one
//! counting of jobs per queue that `agentctl queues` shows, on the leader (from its jobs) as on
//! a follower (from the `TrainingJob` objects). Pure: no I/O, no clock.
//!
//! A queue removed while it holds unfinished jobs keeps serving them with its last settings
//! and takes no new job; it is listed as removed until it is empty.

use std::collections::BTreeMap;

use agentd_api::jobs::{JobState, JobStatus, QueueList, QueueStatus};

use crate::config::{Config, QueueDefinitions, QueueSettings};
use crate::sched::QueueConfig;

/// Where the queues come from when no ConfigMap replaces them.
pub const CONFIGURED_SOURCE: &str = "agentd.toml";

/// The queues an agent works with now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuesInForce {
    /// The queues that take jobs, and the default one.
    pub definitions: QueueDefinitions,
    /// The last settings of every queue that was defined earlier and is not now: the jobs
    /// such a queue still holds keep them.
    pub removed: BTreeMap<String, QueueSettings>,
    /// Where the definitions come from, for people: `agentd.toml`, or the ConfigMap.
    pub source: String,
    /// Why the ConfigMap is not in force, while it is not valid.
    pub problem: Option<String>,
}

impl QueuesInForce {
    /// The configured queues.
    pub fn configured(config: &Config) -> Self {
        Self {
            definitions: QueueDefinitions::configured(config),
            removed: BTreeMap::new(),
            source: CONFIGURED_SOURCE.to_owned(),
            problem: None,
        }
    }

    /// These definitions in force instead: a queue that goes keeps its last settings in
    /// `removed`, one that comes back leaves it.
    #[must_use]
    pub fn replaced_by(&self, definitions: QueueDefinitions, source: &str) -> Self {
        let mut removed = self.removed.clone();
        for (name, settings) in &self.definitions.queues {
            removed.insert(name.clone(), settings.clone());
        }
        removed.retain(|name, _| !definitions.queues.contains_key(name));
        Self {
            definitions,
            removed,
            source: source.to_owned(),
            problem: None,
        }
    }

    /// The same queues, with the reason a replacement was refused.
    #[must_use]
    pub fn refusing(&self, problem: String) -> Self {
        Self {
            problem: Some(problem),
            ..self.clone()
        }
    }

    /// Whether a new job may enter `queue`.
    pub fn takes(&self, queue: &str) -> bool {
        self.definitions.queues.contains_key(queue)
    }

    /// The queues as the scheduler sees them: the defined ones, and the removed ones with
    /// their last settings (only their remaining jobs are in them).
    pub fn scheduler_queues(&self) -> Vec<QueueConfig> {
        self.removed
            .iter()
            .filter(|(name, _)| !self.definitions.queues.contains_key(*name))
            .chain(&self.definitions.queues)
            .map(|(name, q)| QueueConfig {
                name: name.clone(),
                priority: q.priority,
                max_running_jobs: q.max_running_jobs,
                max_gpus: q.max_gpus,
            })
            .collect()
    }
}

/// Jobs waiting, jobs holding their gang, and the GPUs those hold, in one queue.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    queued: u32,
    running: u32,
    gpus: u32,
}

/// `GET /v1/queues`: every defined queue with what is in it, then every removed queue that
/// still holds unfinished jobs (marked removed, with its last settings where this agent knew
/// them, else priority 0 and no limits). A restarting job counts as queued; a placed,
/// starting or running one as running, with the GPUs its replicas were given.
pub fn queue_list<'a>(
    in_force: &QueuesInForce,
    jobs: impl IntoIterator<Item = &'a JobStatus>,
) -> QueueList {
    let mut counts: BTreeMap<&str, Counts> = BTreeMap::new();
    for job in jobs {
        let c = counts.entry(job.queue.as_str()).or_default();
        match job.state {
            JobState::Queued | JobState::Restarting => c.queued += 1,
            JobState::Placed | JobState::Starting | JobState::Running => {
                c.running += 1;
                c.gpus += job
                    .replicas
                    .iter()
                    .map(|r| u32::try_from(r.gpu_indices.len()).unwrap_or(u32::MAX))
                    .fold(0, u32::saturating_add);
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => {}
        }
    }
    let defined = &in_force.definitions;
    let status = |name: &str, q: &QueueSettings, removed: bool| {
        let c = counts.get(name).copied().unwrap_or_default();
        QueueStatus {
            name: name.to_owned(),
            priority: q.priority,
            max_running_jobs: q.max_running_jobs,
            max_gpus: q.max_gpus,
            default: !removed && name == defined.default_queue,
            queued: c.queued,
            running: c.running,
            gpus_in_use: c.gpus,
            removed,
        }
    };
    let unknown = QueueSettings {
        priority: 0,
        weight: false,
        max_running_jobs: None,
        max_gpus: None,
    };
    let mut queues: Vec<QueueStatus> = defined
        .queues
        .iter()
        .map(|(name, q)| status(name, q, false))
        .collect();
    for (name, c) in &counts {
        if c.queued + c.running > 0 && !name.is_empty() && !defined.queues.contains_key(*name) {
            let settings = in_force.removed.get(*name).unwrap_or(&unknown);
            queues.push(status(name, settings, true));
        }
    }
    let configured = in_force.source == CONFIGURED_SOURCE && in_force.problem.is_none();
    QueueList {
        queues,
        source: (!configured).then(|| in_force.source.clone()),
        problem: in_force.problem.clone(),
    }
}

#[cfg(test)]
mod tests {
    use agentd_api::jobs::{ReplicaState, ReplicaStatus};

    use super::*;

    fn settings(priority: i32, max_gpus: Option<u32>) -> QueueSettings {
        QueueSettings {
            priority,
            weight: false,
            max_running_jobs: None,
            max_gpus,
        }
    }

    fn job(name: &str, queue: &str, state: JobState, gpus: &[usize]) -> JobStatus {
        let mut status: JobStatus = serde_json::from_value(serde_json::json!({
            "name": name, "kind": "TrainingJob", "queue": queue, "priority": 0,
            "state": state, "reason": "", "message": "", "submitted_at": 0.0,
            "restarts": 0, "backoff_limit": 0, "generation": 1, "replicas": [], "events": [],
        }))
        .expect("a job status");
        status.replicas = gpus
            .iter()
            .enumerate()
            .map(|(i, &n)| ReplicaStatus {
                name: format!("worker-{i}"),
                replica_type: "Worker".to_owned(),
                index: i as u32,
                state: ReplicaState::Running,
                node: None,
                gpus: Vec::new(),
                gpu_indices: (0..n as u32).collect(),
                address: None,
                pid: None,
                exit_code: None,
                signal: None,
                started_at: None,
                finished_at: None,
            })
            .collect();
        status
    }

    fn in_force() -> QueuesInForce {
        QueuesInForce {
            definitions: QueueDefinitions {
                queues: BTreeMap::from([
                    ("fast".to_owned(), settings(10, None)),
                    ("slow".to_owned(), settings(1, Some(4))),
                ]),
                default_queue: "fast".to_owned(),
            },
            removed: BTreeMap::new(),
            source: CONFIGURED_SOURCE.to_owned(),
            problem: None,
        }
    }

    /// Each queue counts its waiting jobs (restarting ones too), its jobs that hold a gang
    /// and their GPUs; finished jobs count nowhere.
    #[test]
    fn jobs_are_counted_per_queue_by_state_with_their_gpus() {
        let jobs = [
            job("a", "fast", JobState::Queued, &[]),
            job("b", "fast", JobState::Restarting, &[1]),
            job("c", "fast", JobState::Running, &[2, 2]),
            job("d", "slow", JobState::Starting, &[1]),
            job("e", "slow", JobState::Placed, &[0]),
            job("f", "slow", JobState::Succeeded, &[8]),
            job("g", "fast", JobState::Failed, &[8]),
        ];
        let list = queue_list(&in_force(), &jobs);
        let got: Vec<_> = list
            .queues
            .iter()
            .map(|q| {
                (
                    q.name.as_str(),
                    q.default,
                    q.queued,
                    q.running,
                    q.gpus_in_use,
                )
            })
            .collect();
        assert_eq!(
            got,
            [("fast", true, 2, 1, 4), ("slow", false, 0, 2, 1)],
            "{list:?}"
        );
        assert_eq!(list.queues[1].max_gpus, Some(4));
        assert_eq!((list.source, list.problem), (None, None));
    }

    /// A removed queue is listed, marked and with its last settings, while it holds
    /// unfinished jobs, and no longer once they finished; one this agent never knew gets
    /// priority 0 and no limits.
    #[test]
    fn a_removed_queue_is_listed_until_its_jobs_finish() {
        let before = in_force();
        let mut only_fast = before.definitions.clone();
        only_fast.queues.remove("slow");
        let after = before.replaced_by(only_fast, "ConfigMap agentd-system/agentd-queues");
        assert_eq!(after.removed["slow"], settings(1, Some(4)));
        assert!(!after.takes("slow") && after.takes("fast"));
        assert_eq!(
            after.scheduler_queues().len(),
            2,
            "the removed one still schedules"
        );

        let running = [
            job("d", "slow", JobState::Running, &[2]),
            job("x", "gone", JobState::Queued, &[]),
        ];
        let list = queue_list(&after, &running);
        let slow = list
            .queues
            .iter()
            .find(|q| q.name == "slow")
            .expect("listed");
        assert!(slow.removed && !slow.default, "{slow:?}");
        assert_eq!(
            (slow.max_gpus, slow.running, slow.gpus_in_use),
            (Some(4), 1, 2)
        );
        let gone = list
            .queues
            .iter()
            .find(|q| q.name == "gone")
            .expect("listed");
        assert!(gone.removed && gone.priority == 0 && gone.max_gpus.is_none());
        assert_eq!(
            list.source.as_deref(),
            Some("ConfigMap agentd-system/agentd-queues")
        );

        let finished = [job("d", "slow", JobState::Succeeded, &[2])];
        let names: Vec<_> = queue_list(&after, &finished)
            .queues
            .into_iter()
            .map(|q| q.name)
            .collect();
        assert_eq!(names, ["fast"]);

        // Defined again, it is no longer removed.
        let back = after.replaced_by(before.definitions.clone(), CONFIGURED_SOURCE);
        assert!(back.removed.is_empty() && back.takes("slow"));
        assert_eq!(
            queue_list(&back, &running).queues.len(),
            3,
            "gone stays listed"
        );
    }

    /// A refused replacement keeps the queues in force and says why.
    #[test]
    fn a_refused_replacement_keeps_the_queues_and_says_why() {
        let refused = in_force().refusing("not valid".to_owned());
        assert_eq!(refused.definitions, in_force().definitions);
        let list = queue_list(&refused, []);
        assert_eq!(list.problem.as_deref(), Some("not valid"));
        assert_eq!(list.source.as_deref(), Some(CONFIGURED_SOURCE));
    }
}
