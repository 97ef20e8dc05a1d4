//! The Kubeflow training operator's part of a `TrainingJob`'s status, derived from agentd's
//! own (`state`, `reason`, times, replicas), so that tools that read TFJob statuses
//! (`conditions`, `replicaStatuses`, `startTime`, `completionTime`) read these objects too.
//! Written with every status; never read back (agentd's own fields are the truth).

use agentd_api::jobs::{JobState, JobStatus, ReplicaState};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Map, Value, json};

use crate::job::ReplicaType;

/// RFC 3339, as Kubernetes writes times; `None` for a time out of range.
fn time(seconds: f64) -> Option<Value> {
    #[allow(clippy::cast_possible_truncation)]
    let micros = (seconds * 1e6).round() as i64;
    let at = k8s_openapi::jiff::Timestamp::from_microsecond(micros).ok()?;
    // Whole seconds, as the API server's own times are.
    let at = at.round(k8s_openapi::jiff::Unit::Second).ok()?;
    serde_json::to_value(Time(at)).ok()
}

fn condition(kind: &str, on: bool, reason: &str, message: &str, at: f64) -> Value {
    let mut c = json!({
        "type": kind,
        "status": if on { "True" } else { "False" },
        "reason": reason,
        "message": message,
    });
    if let Some(t) = time(at) {
        c["lastUpdateTime"] = t.clone();
        c["lastTransitionTime"] = t;
    }
    c
}

/// `conditions`, `replicaStatuses`, `startTime` and `completionTime` for `status`.
///
/// Conditions as the training operator keeps them: `Created` once submitted; `Running` true
/// while the gang runs and false once it has ended or is restarting; `Restarting` while a gang
/// restart is under way; `Succeeded` or `Failed` at the end. A cancelled job ends `Failed`
/// with reason `Cancelled` (the operator has no condition for it; agentd's `state` says
/// `Cancelled`). Replica counts are by Kubeflow replica type (`Worker`, `PS`, ...): active
/// (running), succeeded and failed replicas of the current generation.
pub(super) fn kubeflow_fields(status: &JobStatus) -> Map<String, Value> {
    let mut fields = Map::new();
    let ended_at = status.finished_at.unwrap_or(status.submitted_at);
    let mut conditions = vec![condition(
        "Created",
        true,
        "JobCreated",
        &format!("TrainingJob {} is created.", status.name),
        status.submitted_at,
    )];
    if let Some(started) = status.started_at {
        let running = status.state == JobState::Running;
        let (reason, message, at) = if running {
            (status.reason.as_str(), status.message.as_str(), started)
        } else {
            (
                "JobNotRunning",
                "the gang is not running",
                ended_at.max(started),
            )
        };
        conditions.push(condition("Running", running, reason, message, at));
    }
    if status.state == JobState::Restarting {
        conditions.push(condition(
            "Restarting",
            true,
            &status.reason,
            &status.message,
            ended_at,
        ));
    }
    let end = match status.state {
        JobState::Succeeded => Some(("Succeeded", status.reason.as_str())),
        JobState::Failed => Some(("Failed", status.reason.as_str())),
        JobState::Cancelled => Some(("Failed", "Cancelled")),
        _ => None,
    };
    if let Some((kind, reason)) = end {
        conditions.push(condition(kind, true, reason, &status.message, ended_at));
        if let Some(t) = status.finished_at.and_then(time) {
            fields.insert("completionTime".into(), t);
        }
    }
    fields.insert("conditions".into(), Value::Array(conditions));
    if let Some(t) = status.started_at.and_then(time) {
        fields.insert("startTime".into(), t);
    }
    let mut replicas = Map::new();
    for r in &status.replicas {
        let Some(kind) = ReplicaType::from_key(&r.replica_type) else {
            continue;
        };
        let counts = replicas
            .entry(kind.as_str())
            .or_insert_with(|| json!({"active": 0, "succeeded": 0, "failed": 0}));
        let key = match r.state {
            ReplicaState::Running => "active",
            ReplicaState::Succeeded => "succeeded",
            ReplicaState::Failed => "failed",
            ReplicaState::Pending | ReplicaState::Terminated => continue,
        };
        counts[key] = json!(counts[key].as_u64().unwrap_or(0) + 1);
    }
    fields.insert("replicaStatuses".into(), Value::Object(replicas));
    fields
}
