//! The job model: what a training job is, how it is read from a manifest and checked, and the
//! rules that follow from it (replica names, `TF_CONFIG`, restart and success policies, the gang
//! the scheduler is asked to place).
//!
//! A job arrives as a native `TrainingJob` (`agentd.io/v1alpha1`) or as a Kubeflow `TFJob`
//! (`kubeflow.org/v1`, accepted unchanged) in YAML or JSON. Both become the same [`TrainingJob`];
//! only [`SourceKind`] remembers which form it came in, so error paths can use the user's own
//! field names (`replicaSpecs` or `tfReplicaSpecs`).
//!
//! Reading is bounded: a manifest is one YAML or JSON document of limited depth, node count and
//! aliases ([`manifest::MAX_DEPTH`] and its neighbours), so a hostile file is refused in
//! milliseconds. The API runs [`admit`] on a blocking thread and hands the core a checked job.
//!
//! This module is pure (no clock, no processes), except that [`admit`] looks at the file system
//! to refuse at submission a program or working directory that cannot exist when the job starts.

mod admit;
mod expand;
mod manifest;
mod policy;
mod quantity;
pub mod template;
mod tf_config;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};

pub(crate) use admit::is_executable_file;
pub use admit::{Admission, admit};
pub use expand::expand;
pub use manifest::{MAX_ALIASES, MAX_DEPTH, MAX_NODES, parse, to_manifest};
pub use policy::{
    BACKOFF_BASE, BACKOFF_CAP, ExitOutcome, PlatformEnd, PlatformFailure, RestartDecision,
    backoff_delay, job_succeeded, restart_decision, success_message,
};
pub use quantity::{
    QuantityError, parse_cpu_milli, parse_gpu_count, parse_memory_bytes, replica_resources,
};
pub use tf_config::{CLUSTER_PORT, ClusterHosts, TFJOB_PORT_NAME, tf_config, tfjob_port};
pub use validate::{Target, validate, validate_for, validate_for_standalone};

/// The name of the container that runs the training code, as in Kubeflow.
pub const TRAINING_CONTAINER: &str = "tensorflow";

/// The number of whole-gang restarts allowed when `runPolicy.backoffLimit` is not set.
///
/// Kubeflow treats a missing limit as "no limit"; a gang that fails forever would then hold its
/// GPUs forever, so agentd bounds it. Set `backoffLimit` explicitly for more.
pub const DEFAULT_BACKOFF_LIMIT: u32 = 3;

/// A training job: a gang of replica groups, all placed and started together.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingJob {
    pub name: String,
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The form the manifest came in; decides the field names used in error paths.
    pub source: SourceKind,
    /// The keys as the manifest wrote them, so that errors found after reading name the
    /// user's own paths (`spec.tfReplicaSpecs.Ps`, not `.PS`).
    pub written: WrittenKeys,
    pub spec: JobSpec,
}

/// Where the manifest put what agentd reads under one name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WrittenKeys {
    /// The key of each replica group as written (`Ps`, `worker`); missing means the canonical
    /// name.
    pub replica_types: BTreeMap<ReplicaType, String>,
    /// The path where the queue was named (`spec.queue` or
    /// `spec.runPolicy.schedulingPolicy.queue`); `None` when no queue was named.
    pub queue: Option<String>,
}

/// Which manifest form a job was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SourceKind {
    /// `apiVersion: agentd.io/v1alpha1`, `kind: TrainingJob`.
    #[default]
    TrainingJob,
    /// `apiVersion: kubeflow.org/v1`, `kind: TFJob`.
    TfJob,
}

impl SourceKind {
    /// The key that holds the replica specs in this form.
    pub fn replica_specs_key(self) -> &'static str {
        match self {
            Self::TrainingJob => "replicaSpecs",
            Self::TfJob => "tfReplicaSpecs",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct JobSpec {
    /// The queue named by the job; `None` means the configured default queue.
    pub queue: Option<String>,
    pub priority: i32,
    pub run_policy: RunPolicy,
    pub success_policy: SuccessPolicy,
    pub replica_specs: BTreeMap<ReplicaType, ReplicaSpec>,
}

/// How the job as a whole is run: restarts, deadlines, clean-up and gang size.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunPolicy {
    /// Whole-gang restarts allowed; `None` means [`DEFAULT_BACKOFF_LIMIT`].
    pub backoff_limit: Option<u32>,
    /// The longest the job may run, counted from its first start.
    pub active_deadline_seconds: Option<u64>,
    /// The longest the job may wait to be placed before it fails.
    pub schedule_timeout_seconds: Option<u64>,
    /// How long a finished job is kept before it is deleted.
    pub ttl_seconds_after_finished: Option<u64>,
    /// Which replicas to stop when the job ends; `None` means Kubeflow's default, `Running`.
    pub clean_pod_policy: Option<CleanPodPolicy>,
    /// How many replicas must be placed together; `None` means all of them.
    pub min_available: Option<u32>,
    /// A Kubernetes PriorityClass name, passed on to pods in cluster mode.
    pub priority_class: Option<String>,
}

impl RunPolicy {
    /// The restart budget in force: the declared `backoffLimit` or [`DEFAULT_BACKOFF_LIMIT`].
    pub fn effective_backoff_limit(&self) -> u32 {
        self.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT)
    }
}

/// Kubeflow's `cleanPodPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CleanPodPolicy {
    All,
    Running,
    None,
}

/// When the job counts as succeeded.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum SuccessPolicy {
    /// The chief (or master) succeeds; without one, worker 0 succeeds. Written `""`.
    #[default]
    #[serde(rename = "")]
    Default,
    /// Every worker succeeds (only when there is no chief or master, as in Kubeflow).
    AllWorkers,
}

/// The role of a replica group. The order is the order replicas are listed, named and placed in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum ReplicaType {
    Chief,
    Master,
    #[serde(rename = "PS")]
    Ps,
    Worker,
    Evaluator,
}

impl ReplicaType {
    pub const ALL: [ReplicaType; 5] = [
        ReplicaType::Chief,
        ReplicaType::Master,
        ReplicaType::Ps,
        ReplicaType::Worker,
        ReplicaType::Evaluator,
    ];

    /// The name used in manifests: `Chief`, `Master`, `PS`, `Worker`, `Evaluator`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chief => "Chief",
            Self::Master => "Master",
            Self::Ps => "PS",
            Self::Worker => "Worker",
            Self::Evaluator => "Evaluator",
        }
    }

    /// The lower-case name TensorFlow uses in `TF_CONFIG` and agentd uses in replica names.
    pub fn as_tf_key(self) -> &'static str {
        match self {
            Self::Chief => "chief",
            Self::Master => "master",
            Self::Ps => "ps",
            Self::Worker => "worker",
            Self::Evaluator => "evaluator",
        }
    }

    /// Reads a manifest key in any letter case (`worker`, `WORKER`, `Worker`), as Kubeflow does.
    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(key))
    }

    /// Chief and Master are the same role under two names.
    pub fn is_chief_or_master(self) -> bool {
        matches!(self, Self::Chief | Self::Master)
    }
}

impl fmt::Display for ReplicaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Restart policy of a replica group.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum RestartPolicy {
    /// Kubeflow's default for TFJob replicas.
    #[default]
    Never,
    OnFailure,
    Always,
    /// Exit codes 1–127 are permanent failures, 128–255 are retryable.
    ExitCode,
}

/// One replica group: how many, how they restart, and the pod template they run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReplicaSpec {
    pub replicas: u32,
    pub restart_policy: RestartPolicy,
    /// Boxed: a pod template is some 1.7 KB inline, and the map that holds the groups
    /// allocates room for eleven entries at once, so inline it cost every job ~20 KB.
    pub template: Box<PodTemplateSpec>,
}

impl ReplicaSpec {
    /// The container that runs the training code: the one named `tensorflow`, or the only one.
    pub fn training_container(&self) -> Option<&Container> {
        let containers = &self.template.spec.as_ref()?.containers;
        containers
            .iter()
            .find(|c| c.name == TRAINING_CONTAINER)
            .or(match containers.as_slice() {
                [only] => Some(only),
                _ => None,
            })
    }
}

impl TrainingJob {
    /// The path of a replica group as the manifest wrote it: `spec.tfReplicaSpecs.Ps`.
    pub fn replica_group_path(&self, t: ReplicaType) -> String {
        let key = self
            .written
            .replica_types
            .get(&t)
            .map_or(t.as_str(), String::as_str);
        format!("spec.{}.{key}", self.source.replica_specs_key())
    }

    /// Total number of replicas over all groups.
    pub fn total_replicas(&self) -> u32 {
        self.spec
            .replica_specs
            .values()
            .fold(0u32, |n, s| n.saturating_add(s.replicas))
    }
}

/// The most replicas of one type a TrainingJob object may have: the CRD's `maximum`
/// (`packaging/kubernetes/11-crd-trainingjob.yaml`), which the API server enforces. An agent
/// reading objects does not count on that.
pub const MOST_REPLICAS_OF_A_TYPE: u32 = 1024;

/// One problem with a manifest: where it is and what is allowed there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// A path such as `spec.replicaSpecs.Worker.replicas`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a manifest was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The bytes are not a YAML or JSON document at all.
    #[error("the manifest is not valid YAML or JSON: {message}")]
    Syntax { message: String },
    /// The document is readable but wrong; every problem found, each with its field path.
    #[error("{}", join_field_errors(.0))]
    Invalid(Vec<FieldError>),
}

impl SpecError {
    /// The field problems, empty for a syntax error.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            Self::Syntax { .. } => &[],
            Self::Invalid(errors) => errors,
        }
    }
}

fn join_field_errors(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The name of one replica: `worker-0`, `ps-1`, `chief-0`.
pub fn replica_name(replica_type: ReplicaType, index: u32) -> String {
    format!("{}-{index}", replica_type.as_tf_key())
}

/// Every replica of the job, in order: chief/master, ps, worker, evaluator; by index within each.
pub fn replica_names(job: &TrainingJob) -> Vec<(ReplicaType, u32)> {
    job.spec
        .replica_specs
        .iter()
        .flat_map(|(&t, spec)| (0..spec.replicas).map(move |i| (t, i)))
        .collect()
}

/// The GPUs the whole gang asks for.
pub fn total_gpus(job: &TrainingJob) -> u32 {
    job.spec
        .replica_specs
        .values()
        .map(|spec| {
            let gpus = replica_resources(spec).map_or(0, |r| r.gpus);
            spec.replicas.saturating_mul(gpus)
        })
        .fold(0, u32::saturating_add)
}

/// Where a pod template lets its replicas go: its `nodeSelector`, its required node affinity
/// and its tolerations of NoSchedule and NoExecute taints (PreferNoSchedule is a preference,
/// which placement does not weigh). Call it on a validated template: an operator or effect
/// [`validate`] would refuse is left out here.
pub fn node_rule(spec: &k8s_openapi::api::core::v1::PodSpec) -> crate::sched::NodeRule {
    use crate::sched::{Operator, Requirement, TaintEffect, Toleration};
    let affinity = required_node_affinity(spec)
        .map(|required| {
            required
                .node_selector_terms
                .iter()
                .map(|term| {
                    let labels = term.match_expressions.iter().flatten().map(|e| (e, false));
                    let fields = term.match_fields.iter().flatten().map(|e| (e, true));
                    labels
                        .chain(fields)
                        .filter_map(|(e, field)| {
                            Some(Requirement {
                                key: e.key.clone(),
                                field,
                                operator: Operator::parse(&e.operator)?,
                                values: e.values.clone().unwrap_or_default(),
                            })
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let tolerations = spec
        .tolerations
        .iter()
        .flatten()
        .filter_map(|t| {
            let effect = match t.effect.as_deref().unwrap_or("") {
                "" => None,
                "NoSchedule" => Some(TaintEffect::NoSchedule),
                "NoExecute" => Some(TaintEffect::NoExecute),
                _ => return None,
            };
            Some(Toleration {
                key: t.key.clone().unwrap_or_default(),
                exists: t.operator.as_deref() == Some("Exists"),
                value: t.value.clone().unwrap_or_default(),
                effect,
            })
        })
        .collect();
    crate::sched::NodeRule {
        selector: spec.node_selector.clone().unwrap_or_default(),
        affinity,
        tolerations,
    }
}

/// A pod template's required node affinity, if it has one.
pub(crate) fn required_node_affinity(
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> Option<&k8s_openapi::api::core::v1::NodeSelector> {
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()
}

/// What the scheduler is asked to place for this job. Call it on a validated job: a resource
/// quantity that does not parse counts as zero here, and [`validate`] reports it.
///
/// The gang's queue is the job's `spec.queue`, empty when the job names none; the agent is
/// expected to resolve the configured default queue into `spec.queue` when it admits the job.
pub fn gang_request(job: &TrainingJob, submitted_at: f64) -> crate::sched::Gang {
    let replicas = job
        .spec
        .replica_specs
        .iter()
        .flat_map(|(&t, spec)| {
            let resources = replica_resources(spec).unwrap_or_default();
            let rule = spec
                .template
                .spec
                .as_ref()
                .map(node_rule)
                .unwrap_or_default();
            (0..spec.replicas).map(move |i| crate::sched::ReplicaRequest {
                name: replica_name(t, i),
                resources,
                rule: rule.clone(),
            })
        })
        .collect();
    crate::sched::Gang {
        id: job.name.clone(),
        queue: job.spec.queue.clone().unwrap_or_default(),
        priority: job.spec.priority,
        submitted_at,
        replicas,
        min_available: job.spec.run_policy.min_available,
        declared_runtime_s: job
            .spec
            .run_policy
            .active_deadline_seconds
            .map(|s| s as f64),
    }
}
