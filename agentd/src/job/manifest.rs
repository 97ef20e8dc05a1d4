//! Reading manifests: YAML or JSON bytes to a [`TrainingJob`], for both the native
//! `agentd.io/v1alpha1 TrainingJob` and Kubeflow's `kubeflow.org/v1 TFJob`.
//!
//! The wire structs here mirror the manifest forms field for field and refuse unknown fields, so a
//! typo is an error naming its path rather than a setting silently ignored. The pod template and
//! the metadata are Kubernetes' own types (k8s-openapi), which accept anything Kubernetes accepts.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

use super::{
    CleanPodPolicy, FieldError, JobSpec, ReplicaSpec, ReplicaType, RestartPolicy, RunPolicy,
    SourceKind, SpecError, SuccessPolicy, TrainingJob,
};

pub(super) const NATIVE_API_VERSION: &str = "agentd.io/v1alpha1";
pub(super) const NATIVE_KIND: &str = "TrainingJob";
pub(super) const KUBEFLOW_API_VERSION: &str = "kubeflow.org/v1";
pub(super) const KUBEFLOW_KIND: &str = "TFJob";

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NativeManifest {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: NativeSpec,
    /// Present when a manifest is read back from a cluster; agentd keeps its own status.
    #[serde(default, skip_serializing)]
    #[expect(dead_code, reason = "accepted and ignored")]
    status: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NativeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run_policy: Option<RunPolicyWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    success_policy: Option<SuccessPolicy>,
    /// Missing or empty is reported by validation, which says what the groups may be.
    #[serde(default)]
    replica_specs: Option<BTreeMap<String, ReplicaSpecWire>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KubeflowManifest {
    #[expect(dead_code, reason = "checked before this struct is read")]
    api_version: String,
    #[expect(dead_code, reason = "checked before this struct is read")]
    kind: String,
    metadata: ObjectMeta,
    spec: KubeflowSpec,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted and ignored")]
    status: Option<IgnoredAny>,
}

/// Kubeflow's `TFJobSpec`. Older `kubeflow.org/v1` manifests carried the run policy fields inline
/// in `spec` rather than under `spec.runPolicy`; both are accepted.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KubeflowSpec {
    #[serde(default)]
    run_policy: Option<RunPolicyWire>,
    #[serde(default)]
    success_policy: Option<SuccessPolicy>,
    #[serde(default)]
    tf_replica_specs: Option<BTreeMap<String, ReplicaSpecWire>>,
    #[serde(default)]
    enable_dynamic_worker: Option<bool>,
    #[serde(default)]
    clean_pod_policy: Option<CleanPodPolicy>,
    #[serde(default)]
    ttl_seconds_after_finished: Option<i64>,
    #[serde(default)]
    active_deadline_seconds: Option<i64>,
    #[serde(default)]
    backoff_limit: Option<i64>,
    #[serde(default)]
    scheduling_policy: Option<SchedulingPolicyWire>,
}

/// Kubeflow's `RunPolicy`, plus `scheduleTimeoutSeconds` directly in it (agentd's form).
/// Counts are read as signed integers so that a negative value gets a message about its range
/// rather than a type error.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunPolicyWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clean_pod_policy: Option<CleanPodPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ttl_seconds_after_finished: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active_deadline_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    backoff_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule_timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scheduling_policy: Option<SchedulingPolicyWire>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    suspend: Option<bool>,
    /// Which controller reconciles the job in Kubeflow (defaulted by newer operators, so it is
    /// in exported manifests). agentd runs the job itself, so the value does not matter.
    #[serde(default, skip_serializing)]
    #[expect(dead_code, reason = "accepted and ignored")]
    managed_by: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SchedulingPolicyWire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_available: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    queue: Option<String>,
    /// Volcano's PodGroup hint. agentd computes a gang's needs from its replicas, so this is
    /// accepted for compatibility and not used.
    #[serde(default, skip_serializing)]
    #[expect(dead_code, reason = "accepted and ignored")]
    min_resources: Option<BTreeMap<String, Quantity>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schedule_timeout_seconds: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReplicaSpecWire {
    /// Kubeflow's default is 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replicas: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restart_policy: Option<RestartPolicy>,
    /// Missing templates are reported by validation, with the containers they lack.
    #[serde(default)]
    template: PodTemplateSpec,
}

/// Reads a `TrainingJob` or a Kubeflow `TFJob` from YAML or JSON.
///
/// Errors name the field path (`spec.tfReplicaSpecs.Worker.replicas`) and what is allowed there.
/// This checks the shape of the document; [`super::validate`] checks what the values mean.
pub fn parse(bytes: &[u8]) -> Result<TrainingJob, SpecError> {
    let document = read_document(bytes)?;
    let Some(top) = document.as_object() else {
        return Err(invalid(
            ".",
            "expected a mapping with apiVersion, kind, metadata and spec",
        ));
    };
    let api_version = top.get("apiVersion").and_then(serde_json::Value::as_str);
    let kind = top.get("kind").and_then(serde_json::Value::as_str);
    let accepted = format!(
        "accepted: apiVersion {NATIVE_API_VERSION} with kind {NATIVE_KIND}, or apiVersion \
         {KUBEFLOW_API_VERSION} with kind {KUBEFLOW_KIND}"
    );
    match (api_version, kind) {
        (Some(NATIVE_API_VERSION), Some(NATIVE_KIND)) => {
            let manifest: NativeManifest = decode(document)?;
            from_native(manifest)
        }
        (Some(KUBEFLOW_API_VERSION), Some(KUBEFLOW_KIND)) => {
            let manifest: KubeflowManifest = decode(document)?;
            from_kubeflow(manifest)
        }
        (None, _) => Err(invalid("apiVersion", format!("required; {accepted}"))),
        (_, None) => Err(invalid("kind", format!("required; {accepted}"))),
        (Some(v), Some(k @ (NATIVE_KIND | KUBEFLOW_KIND))) => Err(invalid(
            "apiVersion",
            format!("{v:?} is not a supported version of {k}; {accepted}"),
        )),
        (Some(_), Some(k)) => Err(invalid(
            "kind",
            format!("{k:?} is not a job kind agentd runs; {accepted}"),
        )),
    }
}

/// The job in the native `agentd.io/v1alpha1` form, whatever form it came in; [`parse`] reads it
/// back to an equal job (apart from [`TrainingJob::source`]). Used to store jobs and to create
/// `TrainingJob` resources in cluster mode.
pub fn to_manifest(job: &TrainingJob) -> serde_json::Value {
    let rp = &job.spec.run_policy;
    let scheduling = SchedulingPolicyWire {
        min_available: rp.min_available.map(i64::from),
        priority_class: rp.priority_class.clone(),
        ..SchedulingPolicyWire::default()
    };
    let has_scheduling = scheduling.min_available.is_some() || scheduling.priority_class.is_some();
    let run_policy = RunPolicyWire {
        clean_pod_policy: rp.clean_pod_policy,
        ttl_seconds_after_finished: rp.ttl_seconds_after_finished.map(clamp_i64),
        active_deadline_seconds: rp.active_deadline_seconds.map(clamp_i64),
        backoff_limit: rp.backoff_limit.map(i64::from),
        schedule_timeout_seconds: rp.schedule_timeout_seconds.map(clamp_i64),
        scheduling_policy: has_scheduling.then_some(scheduling),
        suspend: None,
        managed_by: None,
    };
    let manifest = NativeManifest {
        api_version: NATIVE_API_VERSION.to_owned(),
        kind: NATIVE_KIND.to_owned(),
        metadata: ObjectMeta {
            name: Some(job.name.clone()),
            namespace: job.namespace.clone(),
            labels: (!job.labels.is_empty()).then(|| job.labels.clone()),
            annotations: (!job.annotations.is_empty()).then(|| job.annotations.clone()),
            ..ObjectMeta::default()
        },
        spec: NativeSpec {
            queue: job.spec.queue.clone(),
            priority: Some(job.spec.priority),
            run_policy: Some(run_policy),
            success_policy: Some(job.spec.success_policy),
            replica_specs: Some(
                job.spec
                    .replica_specs
                    .iter()
                    .map(|(t, s)| {
                        let wire = ReplicaSpecWire {
                            replicas: Some(i64::from(s.replicas)),
                            restart_policy: Some(s.restart_policy),
                            template: s.template.clone(),
                        };
                        (t.as_str().to_owned(), wire)
                    })
                    .collect(),
            ),
        },
        status: None,
    };
    // Serializing plain data into a JSON value cannot fail: every map key is a string.
    serde_json::to_value(manifest).unwrap_or(serde_json::Value::Null)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Invalid(vec![FieldError::new(field, message)])
}

/// Reads the bytes as one JSON or YAML document. JSON goes through the JSON parser so its
/// syntax errors read as JSON errors; everything else is YAML (with `<<` merge keys applied).
fn read_document(bytes: &[u8]) -> Result<serde_json::Value, SpecError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    match first {
        None => Err(SpecError::Syntax {
            message: "the manifest is empty".to_owned(),
        }),
        Some(b'{') => serde_json::from_slice(bytes).map_err(|e| SpecError::Syntax {
            message: e.to_string(),
        }),
        Some(_) => {
            let mut yaml: serde_yaml::Value =
                serde_yaml::from_slice(bytes).map_err(|e| SpecError::Syntax {
                    message: e.to_string(),
                })?;
            yaml.apply_merge().map_err(|e| SpecError::Syntax {
                message: e.to_string(),
            })?;
            serde_yaml::from_value(yaml).map_err(|e| SpecError::Syntax {
                message: e.to_string(),
            })
        }
    }
}

/// Deserializes with the path of the failing field recorded.
fn decode<T: DeserializeOwned>(document: serde_json::Value) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(document).map_err(|e| {
        let field = e.path().to_string();
        invalid(field, e.into_inner().to_string())
    })
}

/// Collects conversion problems so that one pass reports all of them.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    /// A count that must be `min` or more and fit in `T`.
    fn count<T: TryFrom<i64>>(&mut self, field: &str, value: Option<i64>, min: i64) -> Option<T> {
        let v = value?;
        if v < min {
            self.push(field, format!("must be at least {min}; got {v}"));
            return None;
        }
        T::try_from(v).ok().or_else(|| {
            self.push(field, format!("{v} is too large"));
            None
        })
    }

    /// A value that may be given in two places; both given and different is an error.
    fn one_of<T: PartialEq + std::fmt::Debug>(
        &mut self,
        (a_field, a): (&str, Option<T>),
        (b_field, b): (&str, Option<T>),
    ) -> Option<T> {
        match (a, b) {
            (Some(a), Some(b)) if a != b => {
                self.push(
                    b_field,
                    format!("{b:?} conflicts with {a_field} = {a:?}; set only one of them"),
                );
                Some(a)
            }
            (Some(a), _) => Some(a),
            (None, b) => b,
        }
    }
}

fn from_native(m: NativeManifest) -> Result<TrainingJob, SpecError> {
    let mut problems = Problems::default();
    let run_policy_wire = m.spec.run_policy.unwrap_or_default();
    let (run_policy, scheduling_queue) = run_policy_from_wire(
        run_policy_wire,
        "spec.runPolicy",
        "spec.runPolicy.schedulingPolicy",
        &mut problems,
    );
    let queue = problems.one_of(
        ("spec.queue", m.spec.queue),
        ("spec.runPolicy.schedulingPolicy.queue", scheduling_queue),
    );
    let replica_specs =
        replica_specs_from_wire(m.spec.replica_specs, SourceKind::TrainingJob, &mut problems);
    finish(
        m.metadata,
        SourceKind::TrainingJob,
        JobSpec {
            queue,
            priority: m.spec.priority.unwrap_or(0),
            run_policy,
            success_policy: m.spec.success_policy.unwrap_or_default(),
            replica_specs,
        },
        problems,
    )
}

fn from_kubeflow(m: KubeflowManifest) -> Result<TrainingJob, SpecError> {
    let mut problems = Problems::default();
    let spec = m.spec;
    if spec.enable_dynamic_worker == Some(true) {
        problems.push(
            "spec.enableDynamicWorker",
            "dynamic workers are not supported: agentd starts a gang with a fixed cluster in \
             TF_CONFIG; remove the field or set it to false",
        );
    }
    // Fold the older inline run policy fields into runPolicy, refusing conflicting duplicates;
    // inline values are range-checked first so that errors name the field the user wrote.
    let inline_ttl_seconds_after_finished = problems.count(
        "spec.ttlSecondsAfterFinished",
        spec.ttl_seconds_after_finished,
        0,
    );
    let inline_active_deadline_seconds = problems.count(
        "spec.activeDeadlineSeconds",
        spec.active_deadline_seconds,
        1,
    );
    let inline_backoff_limit = problems.count("spec.backoffLimit", spec.backoff_limit, 0);
    let mut wire = spec.run_policy.unwrap_or_default();
    wire.clean_pod_policy = problems.one_of(
        ("spec.runPolicy.cleanPodPolicy", wire.clean_pod_policy),
        ("spec.cleanPodPolicy", spec.clean_pod_policy),
    );
    wire.ttl_seconds_after_finished = problems.one_of(
        (
            "spec.runPolicy.ttlSecondsAfterFinished",
            wire.ttl_seconds_after_finished,
        ),
        (
            "spec.ttlSecondsAfterFinished",
            inline_ttl_seconds_after_finished,
        ),
    );
    wire.active_deadline_seconds = problems.one_of(
        (
            "spec.runPolicy.activeDeadlineSeconds",
            wire.active_deadline_seconds,
        ),
        ("spec.activeDeadlineSeconds", inline_active_deadline_seconds),
    );
    wire.backoff_limit = problems.one_of(
        ("spec.runPolicy.backoffLimit", wire.backoff_limit),
        ("spec.backoffLimit", inline_backoff_limit),
    );
    let scheduling_at = if spec.scheduling_policy.is_some() && wire.scheduling_policy.is_none() {
        "spec.schedulingPolicy"
    } else {
        "spec.runPolicy.schedulingPolicy"
    };
    if spec.scheduling_policy.is_some() && wire.scheduling_policy.is_some() {
        problems.push(
            "spec.schedulingPolicy",
            "conflicts with spec.runPolicy.schedulingPolicy; set only one of them",
        );
    }
    wire.scheduling_policy = wire.scheduling_policy.or(spec.scheduling_policy);
    let (run_policy, queue) =
        run_policy_from_wire(wire, "spec.runPolicy", scheduling_at, &mut problems);
    let replica_specs =
        replica_specs_from_wire(spec.tf_replica_specs, SourceKind::TfJob, &mut problems);
    finish(
        m.metadata,
        SourceKind::TfJob,
        JobSpec {
            queue,
            priority: 0,
            run_policy,
            success_policy: spec.success_policy.unwrap_or_default(),
            replica_specs,
        },
        problems,
    )
}

fn finish(
    metadata: ObjectMeta,
    source: SourceKind,
    spec: JobSpec,
    mut problems: Problems,
) -> Result<TrainingJob, SpecError> {
    if metadata.generate_name.is_some() {
        problems.push(
            "metadata.generateName",
            "not supported: jobs are addressed by name; set metadata.name",
        );
    }
    let name = metadata.name.unwrap_or_default();
    if name.is_empty() {
        problems.push("metadata.name", "required: the job's name");
    }
    if !problems.0.is_empty() {
        return Err(SpecError::Invalid(problems.0));
    }
    Ok(TrainingJob {
        name,
        namespace: metadata.namespace,
        labels: metadata.labels.unwrap_or_default(),
        annotations: metadata.annotations.unwrap_or_default(),
        source,
        spec,
    })
}

/// Converts a run policy, returning the queue named in its scheduling policy.
fn run_policy_from_wire(
    wire: RunPolicyWire,
    at: &str,
    scheduling_at: &str,
    problems: &mut Problems,
) -> (RunPolicy, Option<String>) {
    if wire.suspend == Some(true) {
        problems.push(
            format!("{at}.suspend"),
            "suspended jobs are not supported; remove the field or set it to false",
        );
    }
    let mut rp = RunPolicy {
        backoff_limit: problems.count(&format!("{at}.backoffLimit"), wire.backoff_limit, 0),
        active_deadline_seconds: problems.count(
            &format!("{at}.activeDeadlineSeconds"),
            wire.active_deadline_seconds,
            1,
        ),
        schedule_timeout_seconds: problems.count(
            &format!("{at}.scheduleTimeoutSeconds"),
            wire.schedule_timeout_seconds,
            1,
        ),
        ttl_seconds_after_finished: problems.count(
            &format!("{at}.ttlSecondsAfterFinished"),
            wire.ttl_seconds_after_finished,
            0,
        ),
        clean_pod_policy: wire.clean_pod_policy,
        min_available: None,
        priority_class: None,
    };
    let queue = scheduling_from_wire(wire.scheduling_policy, at, scheduling_at, &mut rp, problems);
    (rp, queue)
}

/// Folds a scheduling policy into the run policy, returning the queue it names.
fn scheduling_from_wire(
    wire: Option<SchedulingPolicyWire>,
    run_policy_at: &str,
    at: &str,
    rp: &mut RunPolicy,
    problems: &mut Problems,
) -> Option<String> {
    let sp = wire?;
    rp.min_available = problems.count(&format!("{at}.minAvailable"), sp.min_available, 1);
    rp.priority_class = sp.priority_class.filter(|p| !p.is_empty());
    let timeout = problems.count(
        &format!("{at}.scheduleTimeoutSeconds"),
        sp.schedule_timeout_seconds,
        1,
    );
    rp.schedule_timeout_seconds = problems.one_of(
        (
            &format!("{run_policy_at}.scheduleTimeoutSeconds"),
            rp.schedule_timeout_seconds,
        ),
        (&format!("{at}.scheduleTimeoutSeconds"), timeout),
    );
    if sp.queue.as_deref() == Some("") {
        problems.push(
            format!("{at}.queue"),
            "must not be empty; leave it out to use the default queue",
        );
        return None;
    }
    sp.queue
}

fn replica_specs_from_wire(
    wire: Option<BTreeMap<String, ReplicaSpecWire>>,
    source: SourceKind,
    problems: &mut Problems,
) -> BTreeMap<ReplicaType, ReplicaSpec> {
    let at = format!("spec.{}", source.replica_specs_key());
    let mut specs = BTreeMap::new();
    for (key, spec) in wire.unwrap_or_default() {
        let Some(t) = ReplicaType::from_key(&key) else {
            problems.push(
                format!("{at}.{key}"),
                "unknown replica type; allowed: Chief, Master, PS, Worker, Evaluator",
            );
            continue;
        };
        if specs.contains_key(&t) {
            problems.push(
                format!("{at}.{key}"),
                format!("{t} is given twice (replica types are matched ignoring case)"),
            );
            continue;
        }
        // Kubeflow defaults a missing count to 1.
        let Ok(replicas) = u32::try_from(spec.replicas.unwrap_or(1)) else {
            problems.push(
                format!("{at}.{t}.replicas"),
                format!(
                    "must be between 1 and {}; got {}",
                    u32::MAX,
                    spec.replicas.unwrap_or_default()
                ),
            );
            continue;
        };
        specs.insert(
            t,
            ReplicaSpec {
                replicas,
                restart_policy: spec.restart_policy.unwrap_or_default(),
                template: spec.template,
            },
        );
    }
    specs
}
