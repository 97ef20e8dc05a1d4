//! Reading manifests: YAML or JSON bytes to a [`TrainingJob`], for both the native
//! `agentd.io/v1alpha1 TrainingJob` and Kubeflow's `kubeflow.org/v1 TFJob`.
//!
//! The wire structs here mirror the manifest forms field for field and refuse unknown fields, so a
//! typo is an error naming its path rather than a setting silently ignored. The pod template and
//! the metadata are Kubernetes' own types (k8s-openapi), which accept anything Kubernetes accepts
//! and silently skip what it does not; what they skipped is found by comparing the input with
//! what was read, and reported the same way.
//!
//! YAML is read with serde-saphyr under a budget (depth, nodes, aliases, documents), so reading
//! is linear in the input and a hostile document is refused quickly.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

use super::{
    CleanPodPolicy, FieldError, JobSpec, ReplicaSpec, ReplicaType, RestartPolicy, RunPolicy,
    SourceKind, SpecError, SuccessPolicy, TrainingJob, WrittenKeys,
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
    /// Read on its own, before this struct; here for writing.
    #[serde(default)]
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
    /// Read on its own, before this struct (missing or empty is reported by validation, which
    /// says what the groups may be); here for writing.
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
/// Errors name the field path as the manifest wrote it (`spec.tfReplicaSpecs.Ps.replicas`) and
/// what is allowed there; every problem found is reported, not only the first. This checks the
/// shape of the document; [`super::validate`] checks what the values mean.
pub fn parse(bytes: &[u8]) -> Result<TrainingJob, SpecError> {
    let read = read(bytes)?;
    if read.problems.is_empty() {
        Ok(read.job)
    } else {
        Err(SpecError::Invalid(read.problems))
    }
}

/// A job as far as it could be read, with the problems found on the way. Parts that could not
/// be read are left at their defaults; `groups_complete` says whether every replica group was
/// read, so that checks of the groups as a whole are not run on a part of them.
pub(super) struct Read {
    pub job: TrainingJob,
    pub problems: Vec<FieldError>,
    pub groups_complete: bool,
}

/// Reads as much of the manifest as can be read, collecting every problem.
pub(super) fn read(bytes: &[u8]) -> Result<Read, SpecError> {
    let document = read_document(bytes)?;
    let serde_json::Value::Object(mut top) = document else {
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
    let source = match (api_version, kind) {
        (Some(NATIVE_API_VERSION), Some(NATIVE_KIND)) => SourceKind::TrainingJob,
        (Some(KUBEFLOW_API_VERSION), Some(KUBEFLOW_KIND)) => SourceKind::TfJob,
        (None, _) => return Err(invalid("apiVersion", format!("required; {accepted}"))),
        (_, None) => return Err(invalid("kind", format!("required; {accepted}"))),
        (Some(v), Some(k @ (NATIVE_KIND | KUBEFLOW_KIND))) => {
            return Err(invalid(
                "apiVersion",
                format!("{v:?} is not a supported version of {k}; {accepted}"),
            ));
        }
        (Some(_), Some(k)) => {
            return Err(invalid(
                "kind",
                format!("{k:?} is not a job kind agentd runs; {accepted}"),
            ));
        }
    };
    let mut problems = Problems::default();
    // The metadata and each replica group are read on their own, so that a problem in one does
    // not hide the problems in the others.
    let metadata = match top.remove("metadata") {
        None | Some(serde_json::Value::Null) => Some(ObjectMeta::default()),
        Some(value) => decode_kubernetes::<ObjectMeta>(&value, "metadata", &mut problems),
    };
    let groups = match top.get_mut("spec") {
        Some(serde_json::Value::Object(spec)) => spec.remove(source.replica_specs_key()),
        _ => None,
    };
    let (spec, queue_at) = match source {
        SourceKind::TrainingJob => {
            decode_part::<NativeManifest>(serde_json::Value::Object(top), "", &mut problems)
                .map(|m| from_native(m.spec, &mut problems))
        }
        SourceKind::TfJob => {
            decode_part::<KubeflowManifest>(serde_json::Value::Object(top), "", &mut problems)
                .map(|m| from_kubeflow(m.spec, &mut problems))
        }
    }
    .unwrap_or_default();
    let (replica_specs, written, groups_complete) =
        replica_specs_from_value(groups, source, &mut problems);
    let name = match &metadata {
        Some(m) => {
            if m.generate_name.is_some() {
                problems.push(
                    "metadata.generateName",
                    "not supported: jobs are addressed by name; set metadata.name",
                );
            }
            let name = m.name.clone().unwrap_or_default();
            if name.is_empty() {
                problems.push("metadata.name", "required: the job's name");
            }
            name
        }
        None => String::new(),
    };
    let metadata = metadata.unwrap_or_default();
    let job = TrainingJob {
        name,
        namespace: metadata.namespace,
        labels: metadata.labels.unwrap_or_default(),
        annotations: metadata.annotations.unwrap_or_default(),
        source,
        written: WrittenKeys {
            replica_types: written,
            queue: spec.queue.is_some().then_some(queue_at).flatten(),
        },
        spec: JobSpec {
            replica_specs,
            ..spec
        },
    };
    Ok(Read {
        job,
        problems: problems.0,
        groups_complete,
    })
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
                            template: (*s.template).clone(),
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

/// The deepest nesting of mappings and lists a manifest may have. A Kubernetes pod template
/// needs about a dozen levels; the limit keeps a hostile document from costing more than a
/// moment to refuse.
pub const MAX_DEPTH: usize = 48;
/// The most mappings, lists and scalars a manifest may hold (a 1 MiB request body of real
/// manifests holds far fewer).
pub const MAX_NODES: usize = 200_000;
/// The most YAML aliases (`*name`) a manifest may use: enough for shared container templates,
/// too few for an alias bomb.
pub const MAX_ALIASES: usize = 1_000;

/// Reads the bytes as exactly one JSON or YAML document. A UTF-8 byte order mark and empty
/// documents (a leading or trailing `---`) are ignored. JSON goes through the JSON parser so its
/// syntax errors read as JSON errors; everything else is YAML (with `<<` merge keys applied).
pub(super) fn read_document(bytes: &[u8]) -> Result<serde_json::Value, SpecError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let syntax = |message: String| SpecError::Syntax { message };
    let documents = match first {
        None => return Err(syntax("the manifest is empty".to_owned())),
        Some(b'{') => {
            let value: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| syntax(e.to_string()))?;
            if depth(&value) > MAX_DEPTH {
                return Err(syntax(format!(
                    "the document nests deeper than {MAX_DEPTH} levels"
                )));
            }
            vec![value]
        }
        Some(_) => {
            let mut budget = serde_saphyr::Budget::default();
            budget.max_depth = MAX_DEPTH;
            budget.flow_nesting_limit = MAX_DEPTH;
            budget.max_nodes = MAX_NODES;
            budget.max_aliases = MAX_ALIASES;
            budget.max_anchors = MAX_ALIASES;
            budget.max_documents = 16;
            let mut options = serde_saphyr::Options::default();
            options.budget = Some(budget);
            options.with_snippet = false;
            // YAML 1.2's booleans only (`true`, `false`), as before: `y` and `on` are strings.
            options.strict_booleans = true;
            serde_saphyr::from_slice_multiple_with_options::<serde_json::Value>(bytes, options)
                .map_err(|e| syntax(e.to_string()))?
                .into_iter()
                .filter(|d| !d.is_null())
                .collect()
        }
    };
    match <[_; 1]>::try_from(documents) {
        Ok([document]) => Ok(document),
        Err(documents) if documents.is_empty() => Err(syntax(
            "the manifest holds no document, only separators or comments".to_owned(),
        )),
        Err(documents) => {
            let kinds: Vec<String> = documents.iter().map(describe_document).collect();
            Err(syntax(format!(
                "the manifest holds {} documents ({}); submit one job per request",
                documents.len(),
                kinds.join(", ")
            )))
        }
    }
}

/// `TFJob mnist`, `Service (no name)`, `a list`: what one document of a stream is.
fn describe_document(document: &serde_json::Value) -> String {
    let text = |key: &str| document.get(key).and_then(serde_json::Value::as_str);
    match (
        text("kind"),
        document
            .pointer("/metadata/name")
            .and_then(serde_json::Value::as_str),
    ) {
        (Some(kind), Some(name)) => format!("{kind} {name}"),
        (Some(kind), None) => format!("{kind} without a name"),
        (None, _) => format!("{} without a kind", kind_of(document)),
    }
}

/// How deeply mappings and lists nest in a value.
fn depth(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `at` and a path inside it, joined.
fn join(at: &str, inner: &str) -> String {
    match (at, inner) {
        ("", inner) => inner.to_owned(),
        (at, "." | "") => at.to_owned(),
        (at, inner) if inner.starts_with('[') => format!("{at}{inner}"),
        (at, inner) => format!("{at}.{inner}"),
    }
}

/// Deserializes one part of the manifest, recording the path of a failing field.
fn decode_part<T: DeserializeOwned>(
    value: serde_json::Value,
    at: &str,
    problems: &mut Problems,
) -> Option<T> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| {
            let field = join(at, &e.path().to_string());
            problems.push(field, e.into_inner().to_string());
        })
        .ok()
}

/// Deserializes a Kubernetes type, which ignores fields it does not know; every field that did
/// not survive the reading is reported by its path, so that a typo (`resource:` for
/// `resources:`) is an error rather than a setting silently dropped.
fn decode_kubernetes<T: DeserializeOwned + Serialize>(
    value: &serde_json::Value,
    at: &str,
    problems: &mut Problems,
) -> Option<T> {
    let read: T = decode_part(value.clone(), at, problems)?;
    let understood = serde_json::to_value(&read).unwrap_or(serde_json::Value::Null);
    report_dropped(value, &understood, at, problems);
    Some(read)
}

/// Reports every key of `input` that `understood` lacks. Nulls are "not set" in Kubernetes, so a
/// key whose value is null is never reported.
fn report_dropped(
    input: &serde_json::Value,
    understood: &serde_json::Value,
    at: &str,
    problems: &mut Problems,
) {
    match (input, understood) {
        (serde_json::Value::Object(input), serde_json::Value::Object(understood)) => {
            for (key, value) in input {
                let key_at = join(at, key);
                match understood.get(key) {
                    _ if value.is_null() => {}
                    None => problems.push(
                        key_at,
                        "unknown field: Kubernetes has no such field here, so it would be \
                         ignored; check its spelling and indentation",
                    ),
                    Some(read) => report_dropped(value, read, &key_at, problems),
                }
            }
        }
        (serde_json::Value::Array(input), serde_json::Value::Array(understood)) => {
            for (i, (value, read)) in input.iter().zip(understood).enumerate() {
                report_dropped(value, read, &format!("{at}[{i}]"), problems);
            }
        }
        _ => {}
    }
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

/// The native spec, less its replica groups (read on their own), and where the queue was named.
fn from_native(spec: NativeSpec, problems: &mut Problems) -> (JobSpec, Option<String>) {
    let run_policy_wire = spec.run_policy.unwrap_or_default();
    let scheduling_at = "spec.runPolicy.schedulingPolicy";
    let (run_policy, scheduling_queue) =
        run_policy_from_wire(run_policy_wire, "spec.runPolicy", scheduling_at, problems);
    let queue_at = if spec.queue.is_some() {
        "spec.queue".to_owned()
    } else {
        format!("{scheduling_at}.queue")
    };
    let queue = problems.one_of(
        ("spec.queue", spec.queue),
        ("spec.runPolicy.schedulingPolicy.queue", scheduling_queue),
    );
    let spec = JobSpec {
        queue,
        priority: spec.priority.unwrap_or(0),
        run_policy,
        success_policy: spec.success_policy.unwrap_or_default(),
        replica_specs: BTreeMap::new(),
    };
    (spec, Some(queue_at))
}

/// The TFJob spec, less its replica groups (read on their own), and where the queue was named.
fn from_kubeflow(spec: KubeflowSpec, problems: &mut Problems) -> (JobSpec, Option<String>) {
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
    let (run_policy, queue) = run_policy_from_wire(wire, "spec.runPolicy", scheduling_at, problems);
    let spec = JobSpec {
        queue,
        priority: 0,
        run_policy,
        success_policy: spec.success_policy.unwrap_or_default(),
        replica_specs: BTreeMap::new(),
    };
    (spec, Some(format!("{scheduling_at}.queue")))
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

/// Reads the replica groups one by one; returns them, the keys as written, and whether every
/// group was read.
fn replica_specs_from_value(
    value: Option<serde_json::Value>,
    source: SourceKind,
    problems: &mut Problems,
) -> (
    BTreeMap<ReplicaType, ReplicaSpec>,
    BTreeMap<ReplicaType, String>,
    bool,
) {
    let at = format!("spec.{}", source.replica_specs_key());
    let mut specs = BTreeMap::new();
    let mut written = BTreeMap::new();
    let groups = match value {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(groups)) => groups,
        Some(other) => {
            problems.push(
                at,
                format!(
                    "expected a mapping of replica type to replica spec, got {}",
                    kind_of(&other)
                ),
            );
            return (specs, written, false);
        }
    };
    let mut complete = true;
    for (key, value) in groups {
        let group_at = format!("{at}.{key}");
        let Some(t) = ReplicaType::from_key(&key) else {
            problems.push(
                group_at,
                "unknown replica type; allowed: Chief, Master, PS, Worker, Evaluator",
            );
            complete = false;
            continue;
        };
        if let Some(first) = written.get(&t) {
            problems.push(
                group_at,
                format!(
                    "{t} is given twice, as {first} and {key} (replica types are matched \
                     ignoring case)"
                ),
            );
            complete = false;
            continue;
        }
        written.insert(t, key);
        let serde_json::Value::Object(mut group) = value else {
            problems.push(
                group_at,
                format!(
                    "expected a replica spec (replicas, restartPolicy, template), got {}",
                    kind_of(&value)
                ),
            );
            complete = false;
            continue;
        };
        let template = group.remove("template");
        let wire =
            decode_part::<ReplicaSpecWire>(serde_json::Value::Object(group), &group_at, problems);
        let template = match template {
            None | Some(serde_json::Value::Null) => Some(PodTemplateSpec::default()),
            Some(value) => decode_template(value, &format!("{group_at}.template"), problems),
        };
        let (Some(wire), Some(template)) = (wire, template) else {
            complete = false;
            continue;
        };
        // Kubeflow defaults a missing count to 1.
        let Ok(replicas) = u32::try_from(wire.replicas.unwrap_or(1)) else {
            problems.push(
                format!("{group_at}.replicas"),
                format!(
                    "must be between 1 and {}; got {}",
                    u32::MAX,
                    wire.replicas.unwrap_or_default()
                ),
            );
            complete = false;
            continue;
        };
        specs.insert(
            t,
            ReplicaSpec {
                replicas,
                restart_policy: wire.restart_policy.unwrap_or_default(),
                template: Box::new(template),
            },
        );
    }
    (specs, written, complete)
}

/// Reads a pod template, each of its containers on its own so that a problem in one container
/// does not hide those in the others.
fn decode_template(
    value: serde_json::Value,
    at: &str,
    problems: &mut Problems,
) -> Option<PodTemplateSpec> {
    let serde_json::Value::Object(mut template) = value else {
        problems.push(
            at,
            format!(
                "expected a pod template (metadata, spec), got {}",
                kind_of(&value)
            ),
        );
        return None;
    };
    let mut lists = Vec::new();
    if let Some(serde_json::Value::Object(spec)) = template.get_mut("spec") {
        for key in ["containers", "initContainers"] {
            if let Some(list) = spec.remove(key) {
                lists.push((key, list));
            }
        }
        spec.insert(
            "containers".to_owned(),
            serde_json::Value::Array(Vec::new()),
        );
    }
    let pod =
        decode_kubernetes::<PodTemplateSpec>(&serde_json::Value::Object(template), at, problems);
    let mut read = BTreeMap::new();
    let mut ok = true;
    for (key, list) in lists {
        let list_at = format!("{at}.spec.{key}");
        let items = match list {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Array(items) => items,
            other => {
                problems.push(
                    list_at,
                    format!("expected a list of containers, got {}", kind_of(&other)),
                );
                ok = false;
                continue;
            }
        };
        let mut containers = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match decode_kubernetes::<Container>(&item, &format!("{list_at}[{i}]"), problems) {
                Some(c) => containers.push(c),
                None => ok = false,
            }
        }
        read.insert(key, containers);
    }
    let mut pod = pod?;
    if !ok {
        return None;
    }
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers = read.remove("containers").unwrap_or_default();
        spec.init_containers = read.remove("initContainers");
    }
    Some(pod)
}

/// `a mapping`, `a list`, `a string`...: what a value is, for messages.
fn kind_of(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "nothing",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a mapping",
    }
}
