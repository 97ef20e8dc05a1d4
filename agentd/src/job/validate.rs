//! Checking what a parsed job means: names, replica groups, containers, resources, gang size.
//! Every problem is reported at once, each with its field path and what is allowed there, so a
//! person fixes a manifest in one round.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::quantity::{GPU_RESOURCE, check_quantity};
use super::{
    FieldError, ReplicaSpec, ReplicaType, SpecError, SuccessPolicy, TRAINING_CONTAINER,
    TrainingJob, parse_cpu_milli, parse_gpu_count, parse_memory_bytes, replica_name,
};

/// Where a job is going to run, which decides what it must declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Replicas run as local processes: the training container needs a `command`, since no
    /// image (and so no image entrypoint) is used.
    Standalone,
    /// Replicas run as pods: the image's entrypoint may stand in for `command`.
    Cluster,
}

/// The longest Kubernetes object name derived from a job (Services are DNS labels).
const MAX_NAME_LEN: usize = 63;

/// Checks a job for any target: everything except what only standalone mode needs.
pub fn validate(job: &TrainingJob) -> Result<(), SpecError> {
    validate_for(job, Target::Cluster)
}

/// Checks a job for standalone mode: [`validate`] plus a `command` for every replica group.
pub fn validate_for_standalone(job: &TrainingJob) -> Result<(), SpecError> {
    validate_for(job, Target::Standalone)
}

/// Checks a job for `target`, returning every problem found.
pub fn validate_for(job: &TrainingJob, target: Target) -> Result<(), SpecError> {
    let mut errors = Vec::new();
    validate_into(job, target, true, &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SpecError::Invalid(errors))
    }
}

/// Checks a job for `target`, adding what it finds to `errors`. `groups_complete` is false when
/// some replica groups could not be read: the rules about the groups as a whole (a worker or
/// chief is needed, minAvailable fits) are then left until they can be judged.
pub(super) fn validate_into(
    job: &TrainingJob,
    target: Target,
    groups_complete: bool,
    errors: &mut Vec<FieldError>,
) {
    check_names(job, errors);
    if groups_complete {
        check_replica_groups(job, errors);
    } else {
        check_replica_counts(job, errors);
    }
    for (t, spec) in &job.spec.replica_specs {
        check_pod(
            spec,
            &format!("{}.template.spec", job.replica_group_path(*t)),
            target,
            errors,
        );
    }
}

/// A DNS-1035 label: the rule for Kubernetes Service names, which replicas' names derive from.
pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME_LEN
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn check_names(job: &TrainingJob, errors: &mut Vec<FieldError>) {
    if !is_dns_label(&job.name) {
        errors.push(FieldError::new(
            "metadata.name",
            format!(
                "{:?} is not a valid job name: use at most {MAX_NAME_LEN} characters of lower-case \
                 letters, digits and '-', starting with a letter and ending with a letter or digit",
                job.name
            ),
        ));
    } else if let Some(longest) = job
        .spec
        .replica_specs
        .iter()
        .filter(|(_, s)| s.replicas > 0)
        .map(|(&t, s)| format!("{}-{}", job.name, replica_name(t, s.replicas - 1)))
        .max_by_key(String::len)
        .filter(|n| n.len() > MAX_NAME_LEN)
    {
        errors.push(FieldError::new(
            "metadata.name",
            format!(
                "is too long: replica name {longest:?} has {} characters and names derived from \
                 the job may have at most {MAX_NAME_LEN}; shorten the job name",
                longest.len()
            ),
        ));
    }
    if let Some(ns) = &job.namespace {
        let b = ns.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_NAME_LEN
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if !ok {
            errors.push(FieldError::new(
                "metadata.namespace",
                format!(
                    "{ns:?} is not a valid namespace: use at most {MAX_NAME_LEN} characters of \
                     lower-case letters, digits and '-', starting and ending with a letter or digit"
                ),
            ));
        }
    }
    if job.spec.queue.as_deref() == Some("") {
        errors.push(FieldError::new(
            job.written.queue.as_deref().unwrap_or("spec.queue"),
            "must not be empty; leave it out to use the default queue",
        ));
    }
}

fn check_replica_groups(job: &TrainingJob, errors: &mut Vec<FieldError>) {
    let specs = &job.spec.replica_specs;
    let specs_at = format!("spec.{}", job.source.replica_specs_key());
    if specs.is_empty() {
        errors.push(FieldError::new(
            specs_at,
            "at least one replica group is required; replica types: Chief, Master, PS, Worker, \
             Evaluator",
        ));
        return;
    }
    if specs.contains_key(&ReplicaType::Chief) && specs.contains_key(&ReplicaType::Master) {
        errors.push(FieldError::new(
            job.replica_group_path(ReplicaType::Master),
            "a job has at most one Chief or Master (they are the same role); keep one of them",
        ));
    }
    check_replica_counts(job, errors);
    check_group_roles(job, errors);
}

/// The count of each group, on its own.
fn check_replica_counts(job: &TrainingJob, errors: &mut Vec<FieldError>) {
    for (t, spec) in &job.spec.replica_specs {
        let at = format!("{}.replicas", job.replica_group_path(*t));
        if spec.replicas == 0 {
            errors.push(FieldError::new(
                at,
                format!("must be at least 1; remove {t} from the replica groups to have none"),
            ));
        } else if t.is_chief_or_master() && spec.replicas != 1 {
            errors.push(FieldError::new(
                at,
                format!("must be 1: a job has a single {t}; got {}", spec.replicas),
            ));
        } else if *t == ReplicaType::Evaluator && spec.replicas > 1 {
            errors.push(FieldError::new(
                at,
                format!(
                    "must be 1: TensorFlow runs at most one evaluator; got {}",
                    spec.replicas
                ),
            ));
        }
    }
}

fn check_group_roles(job: &TrainingJob, errors: &mut Vec<FieldError>) {
    let specs = &job.spec.replica_specs;
    let specs_at = format!("spec.{}", job.source.replica_specs_key());
    let has_worker = specs.contains_key(&ReplicaType::Worker);
    if !has_worker && !specs.keys().any(|t| t.is_chief_or_master()) {
        errors.push(FieldError::new(
            specs_at,
            "needs a Chief, Master or Worker: the job succeeds when its chief (or, without one, \
             worker 0) succeeds",
        ));
    } else if job.spec.success_policy == SuccessPolicy::AllWorkers && !has_worker {
        errors.push(FieldError::new(
            "spec.successPolicy",
            "AllWorkers needs a Worker replica group; use \"\" (the chief decides) or add workers",
        ));
    }
    if let Some(min) = job.spec.run_policy.min_available {
        let total = job.total_replicas();
        if min > total {
            errors.push(FieldError::new(
                "spec.runPolicy.schedulingPolicy.minAvailable",
                format!("{min} is more than the job's {total} replicas; use 1 to {total}"),
            ));
        }
    }
}

fn check_pod(spec: &ReplicaSpec, at: &str, target: Target, errors: &mut Vec<FieldError>) {
    let containers_at = format!("{at}.containers");
    let containers = spec
        .template
        .spec
        .as_ref()
        .map_or(&[][..], |p| p.containers.as_slice());
    if containers.is_empty() {
        errors.push(FieldError::new(
            containers_at,
            format!("at least one container is required; name the training container {TRAINING_CONTAINER:?}"),
        ));
        return;
    }
    match spec.training_container() {
        None => errors.push(FieldError::new(
            containers_at.clone(),
            format!(
                "{} containers and none is named {TRAINING_CONTAINER:?}; name the container that \
                 runs the training code {TRAINING_CONTAINER:?}",
                containers.len()
            ),
        )),
        Some(training) if target == Target::Standalone => {
            let command_empty = training.command.as_ref().is_none_or(Vec::is_empty);
            if command_empty {
                let i = containers
                    .iter()
                    .position(|c| std::ptr::eq(c, training))
                    .unwrap_or(0);
                errors.push(FieldError::new(
                    format!("{containers_at}[{i}].command"),
                    "required in standalone mode, which runs the command as a local process \
                     (the image and its entrypoint are not used); e.g. [python3, train.py]",
                ));
            }
        }
        Some(_) => {}
    }
    for (i, c) in containers.iter().enumerate() {
        if c.name.is_empty() {
            errors.push(FieldError::new(
                format!("{containers_at}[{i}].name"),
                format!("required; name the training container {TRAINING_CONTAINER:?}"),
            ));
        }
        check_resources(c, &format!("{containers_at}[{i}].resources"), errors);
    }
    let init = spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.init_containers.as_deref())
        .unwrap_or_default();
    for (i, c) in init.iter().enumerate() {
        check_resources(c, &format!("{at}.initContainers[{i}].resources"), errors);
    }
    if let Some(pod) = spec.template.spec.as_ref() {
        check_node_affinity(pod, at, errors);
        check_tolerations(pod, at, errors);
    }
}

/// The required node affinity, as the API server checks it: placement honours it, so a term it
/// would misread must be refused, not ignored.
fn check_node_affinity(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    at: &str,
    errors: &mut Vec<FieldError>,
) {
    use crate::sched::Operator;
    let Some(required) = super::required_node_affinity(pod) else {
        return;
    };
    let terms_at = format!(
        "{at}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
    );
    if required.node_selector_terms.is_empty() {
        errors.push(FieldError::new(
            terms_at.clone(),
            "must have at least one term (a node must meet every requirement of one of them)",
        ));
    }
    for (i, term) in required.node_selector_terms.iter().enumerate() {
        let exprs = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        if exprs.is_empty() && fields.is_empty() {
            errors.push(FieldError::new(
                format!("{terms_at}[{i}]"),
                "is empty and would match no node; give matchExpressions or matchFields",
            ));
        }
        for (list, is_field, items) in [
            ("matchExpressions", false, exprs),
            ("matchFields", true, fields),
        ] {
            for (j, e) in items.iter().enumerate() {
                let here = format!("{terms_at}[{i}].{list}[{j}]");
                if is_field && e.key != "metadata.name" {
                    errors.push(FieldError::new(
                        format!("{here}.key"),
                        format!("{:?} is not a node field that can be matched; the only one is \"metadata.name\"", e.key),
                    ));
                } else if e.key.is_empty() {
                    errors.push(FieldError::new(
                        format!("{here}.key"),
                        "required: a node label's key",
                    ));
                }
                let values = e.values.as_deref().unwrap_or_default();
                match Operator::parse(&e.operator) {
                    None => errors.push(FieldError::new(
                        format!("{here}.operator"),
                        format!(
                            "{:?} is not an operator; use one of {}",
                            e.operator,
                            Operator::NAMES.join(", ")
                        ),
                    )),
                    Some(op) if is_field && !matches!(op, Operator::In | Operator::NotIn) => {
                        errors.push(FieldError::new(
                            format!("{here}.operator"),
                            format!("{:?} cannot match a field; use In or NotIn", e.operator),
                        ));
                    }
                    Some(Operator::In | Operator::NotIn) if is_field && values.len() != 1 => {
                        errors.push(FieldError::new(
                            format!("{here}.values"),
                            format!(
                                "must hold exactly one node name with operator {} on a field",
                                e.operator
                            ),
                        ));
                    }
                    Some(Operator::In | Operator::NotIn) if values.is_empty() => {
                        errors.push(FieldError::new(
                            format!("{here}.values"),
                            format!("must not be empty with operator {}", e.operator),
                        ));
                    }
                    Some(Operator::Exists | Operator::DoesNotExist) if !values.is_empty() => {
                        errors.push(FieldError::new(
                            format!("{here}.values"),
                            format!("must be empty with operator {}", e.operator),
                        ));
                    }
                    Some(Operator::Gt | Operator::Lt)
                        if values.len() != 1 || values[0].parse::<i64>().is_err() =>
                    {
                        errors.push(FieldError::new(
                            format!("{here}.values"),
                            format!(
                                "must be one whole number with operator {} (got {values:?})",
                                e.operator
                            ),
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

/// Tolerations, as the API server checks them: placement honours them.
fn check_tolerations(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    at: &str,
    errors: &mut Vec<FieldError>,
) {
    for (i, t) in pod.tolerations.iter().flatten().enumerate() {
        let here = format!("{at}.tolerations[{i}]");
        let operator = t.operator.as_deref().unwrap_or("");
        let key = t.key.as_deref().unwrap_or("");
        let value = t.value.as_deref().unwrap_or("");
        match operator {
            "" | "Equal" if key.is_empty() => errors.push(FieldError::new(
                format!("{here}.operator"),
                "must be Exists when the key is empty (which tolerates every taint); give a key to tolerate one",
            )),
            "Exists" if !value.is_empty() => errors.push(FieldError::new(
                format!("{here}.value"),
                "must be empty with operator Exists (it tolerates every value)",
            )),
            "" | "Equal" | "Exists" => {}
            other => errors.push(FieldError::new(
                format!("{here}.operator"),
                format!("{other:?} is not an operator; use Equal (the default) or Exists"),
            )),
        }
        let effect = t.effect.as_deref().unwrap_or("");
        if t.toleration_seconds.is_some() && effect != "NoExecute" {
            errors.push(FieldError::new(
                format!("{here}.tolerationSeconds"),
                "applies only to effect NoExecute (how long the pod stays once the taint comes)",
            ));
        }
        if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            errors.push(FieldError::new(
                format!("{here}.effect"),
                format!(
                    "{effect:?} is not a taint effect; use NoSchedule, PreferNoSchedule or NoExecute, or leave it out for all"
                ),
            ));
        }
    }
}

/// One resource amount in the unit the scheduler counts it in.
fn amount(name: &str, q: &Quantity) -> Result<u64, String> {
    let parsed = match name {
        "cpu" => parse_cpu_milli(&q.0),
        "memory" => parse_memory_bytes(&q.0),
        GPU_RESOURCE => parse_gpu_count(&q.0).map(u64::from),
        _ => check_quantity(&q.0).map(|()| 0),
    };
    parsed.map_err(|e| e.to_string())
}

fn check_resources(c: &Container, at: &str, errors: &mut Vec<FieldError>) {
    let Some(resources) = &c.resources else {
        return;
    };
    let empty = BTreeMap::new();
    let limits = resources.limits.as_ref().unwrap_or(&empty);
    let requests = resources.requests.as_ref().unwrap_or(&empty);
    let mut read = |kind: &str, map: &BTreeMap<String, Quantity>| -> BTreeMap<String, u64> {
        let mut ok = BTreeMap::new();
        for (name, q) in map {
            match amount(name, q) {
                Ok(v) => {
                    ok.insert(name.clone(), v);
                }
                Err(message) => {
                    errors.push(FieldError::new(format!("{at}.{kind}[{name}]"), message));
                }
            }
        }
        ok
    };
    let limit_values = read("limits", limits);
    let request_values = read("requests", requests);
    for name in ["cpu", "memory"] {
        if let (Some(req), Some(lim)) = (request_values.get(name), limit_values.get(name))
            && req > lim
        {
            errors.push(FieldError::new(
                format!("{at}.requests[{name}]"),
                format!(
                    "{} is more than the limit {}; a request may not exceed its limit",
                    requests[name].0, limits[name].0
                ),
            ));
        }
    }
    if let (Some(req), Some(lim)) = (
        request_values.get(GPU_RESOURCE),
        limit_values.get(GPU_RESOURCE),
    ) && req != lim
    {
        errors.push(FieldError::new(
            format!("{at}.requests[{GPU_RESOURCE}]"),
            format!(
                "{} differs from the limit {}; GPUs are not overcommitted, so set them equal \
                 (or set only the limit)",
                requests[GPU_RESOURCE].0, limits[GPU_RESOURCE].0
            ),
        ));
    }
}
