//! Jobs, queues and events on the wire.

use serde::{Deserialize, Serialize};

/// Where a job is in its life. `Restarting` is a gang that is being stopped, or waiting out its
/// back-off, before it is placed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Placed,
    Starting,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Placed,
        JobState::Starting,
        JobState::Running,
        JobState::Restarting,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "Queued",
            JobState::Placed => "Placed",
            JobState::Starting => "Starting",
            JobState::Running => "Running",
            JobState::Restarting => "Restarting",
            JobState::Succeeded => "Succeeded",
            JobState::Failed => "Failed",
            JobState::Cancelled => "Cancelled",
        }
    }

    /// Reads a state name in any letter case.
    pub fn parse(text: &str) -> Option<JobState> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Not started in the current generation.
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Stopped by the agent (cancel, restart of the gang, end of the job).
    Terminated,
}

/// One replica of a job, in the job's current generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// `worker-1`.
    pub name: String,
    /// Lower case: `chief`, `ps`, `worker`, `evaluator`, `master`.
    #[serde(rename = "type")]
    pub replica_type: String,
    pub index: u32,
    pub state: ReplicaState,
    pub node: Option<String>,
    /// GPU UUIDs given to the replica (its `CUDA_VISIBLE_DEVICES`).
    pub gpus: Vec<String>,
    pub gpu_indices: Vec<u32>,
    /// The `host:port` peers reach it on.
    pub address: Option<String>,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
}

/// A state change or other happening of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub time: f64,
    pub reason: String,
    pub message: String,
}

/// A job as `GET /v1/jobs/{name}` returns it (`events` only there; lists leave it empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    /// `TrainingJob` or `TFJob`: the form it was submitted in.
    pub kind: String,
    pub queue: String,
    pub priority: i32,
    pub state: JobState,
    /// Why it is in this state, as a short class (`Unschedulable`, `BackoffLimitExceeded`, ...).
    pub reason: String,
    /// The same, for a person.
    pub message: String,
    pub submitted_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// Whole-gang restarts so far, and how many are allowed.
    pub restarts: u32,
    pub backoff_limit: u32,
    /// Increments with every start of the gang.
    pub generation: u32,
    /// Who submitted the job; `null` for jobs submitted before owners were recorded.
    #[serde(default)]
    pub owner: Option<Owner>,
    /// The template the job was made from and the values it was made with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<crate::templates::TemplateUse>,
    pub replicas: Vec<ReplicaStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<JobEvent>,
}

/// The user a job belongs to: who submitted it, as the agent saw them (the socket peer's
/// credentials, or the user of a remote token). Replicas run as this user.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// The user name; the uid in decimal where the system knows no name for it.
    pub user: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.user)
    }
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobStatus>,
}

/// One queue as `GET /v1/queues` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub name: String,
    pub priority: i32,
    pub max_running_jobs: Option<u32>,
    pub max_gpus: Option<u32>,
    pub default: bool,
    pub queued: u32,
    pub running: u32,
    pub gpus_in_use: u32,
    /// The queue is no longer defined: it serves the unfinished jobs it still holds, with its
    /// last settings, and takes no new job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueList {
    pub queues: Vec<QueueStatus>,
    /// Cluster mode: where the queues come from when it is not the agent's configuration
    /// (`ConfigMap agentd-system/agentd-queues`), or while that ConfigMap is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Why the cluster's queue ConfigMap is not in force (it is not valid); the queues listed
    /// are those that stay in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One entry of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: i64,
    pub time: f64,
    /// `node` or `job`.
    pub kind: String,
    pub object: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<Event>,
}
