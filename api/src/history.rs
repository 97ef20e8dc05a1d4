//! Finished jobs on the wire: `GET /v1/history`, one entry per finished job with its accounting,
//! a page of them with a cursor to the next, and the summary by user or queue.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::jobs::JobState;

/// How a replica of a finished job ended (its last generation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaEnd {
    /// `worker-1`.
    pub replica: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// One finished job, as `agentctl history` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub name: String,
    /// The owner's user name; `null` for jobs submitted before owners were recorded.
    pub user: Option<String>,
    pub queue: String,
    pub state: JobState,
    /// The final reason (`Succeeded`, `ReplicaFailed`, `BackoffLimitExceeded`, ...).
    pub reason: String,
    pub message: String,
    pub submitted_at: f64,
    pub started_at: Option<f64>,
    pub finished_at: f64,
    /// From submission until the gang first started (until it finished, if it never did).
    pub wait_seconds: f64,
    /// From the first start until the end; 0 for a job that never started.
    pub run_seconds: f64,
    pub replicas: u32,
    /// GPUs the gang held.
    pub gpus: u32,
    /// `gpus` × `run_seconds`.
    pub gpu_seconds: f64,
    pub restarts: u32,
    /// The reason of each restart, in order.
    pub restart_reasons: Vec<String>,
    pub exit_codes: Vec<ReplicaEnd>,
    /// The template the job was made from and the values it was made with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<crate::templates::TemplateUse>,
}

/// `GET /v1/history`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryPage {
    pub jobs: Vec<HistoryEntry>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// What a summary groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SummaryBy {
    User,
    Queue,
}

impl SummaryBy {
    pub fn as_str(self) -> &'static str {
        match self {
            SummaryBy::User => "user",
            SummaryBy::Queue => "queue",
        }
    }

    pub fn parse(text: &str) -> Option<SummaryBy> {
        match text {
            "user" => Some(SummaryBy::User),
            "queue" => Some(SummaryBy::Queue),
            _ => None,
        }
    }
}

/// One user's or queue's finished jobs, added up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    /// The user or queue name (`-` for jobs with no recorded owner).
    pub key: String,
    pub jobs: u64,
    pub gpu_hours: f64,
    pub mean_wait_seconds: f64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Jobs that did not succeed, by their final reason.
    pub failures: BTreeMap<String, u64>,
}

/// `GET /v1/history?summary=user|queue`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistorySummary {
    pub by: SummaryBy,
    pub rows: Vec<SummaryRow>,
}
