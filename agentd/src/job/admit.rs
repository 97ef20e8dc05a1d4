//! Admission: everything a submitted manifest must pass before the core sees it, in one pass
//! that reports every problem at once. Reading and the checks of [`super::validate`] for where
//! the replicas run, what only standalone mode needs (literal environment values, a program
//! and a working directory that exist here), an environment the kernel can pass to a program
//! (`TF_CONFIG` included), the agent's bounds, and the queue. The API runs it on a blocking
//! thread; the core receives the admitted job.
//!
//! In standalone mode it reads the file system (the program and the working directory), and
//! nothing else in either mode.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

use agentd_api::templates::{TEMPLATE_ANNOTATION, TEMPLATE_VALUES_ANNOTATION};

use super::manifest;
use super::validate::{Target, validate_into};
use super::{
    CLUSTER_PORT, ClusterHosts, FieldError, SpecError, TrainingJob, expand, replica_names,
    tf_config,
};

/// The longest single argument or environment entry Linux passes to a program
/// (`MAX_ARG_STRLEN`, 32 pages).
const MAX_ARG_STRLEN: usize = 32 * 4096;

/// Room kept in the exec budget for what agentd adds to every replica's environment besides
/// `TF_CONFIG` (`CUDA_VISIBLE_DEVICES`, `AGENTD_*`, the inherited `PATH`, `HOME` and locale).
const ADDED_ENV_BYTES: usize = 8 * 1024;

/// What the agent admits: its queues and its bounds, and where it finds programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The queues that exist.
    pub queues: BTreeSet<String>,
    /// The queue of a job that names none.
    pub default_queue: String,
    /// The most replicas one job may have (`jobs.max_replicas_per_job`).
    pub max_replicas_per_job: u32,
    /// The `PATH` a replica gets when its environment sets none: the agent's own.
    pub path: String,
    /// Where the replicas run. Standalone: as processes on this machine, so the program and
    /// working directory a manifest names must be here, and every value must be literal.
    /// Cluster: as pods, whose image holds the program and whose cluster resolves `valueFrom`.
    pub target: Target,
    /// Cluster mode: the DNS domain of the cluster's Services (`cluster.cluster_domain`), part
    /// of every address in `TF_CONFIG`.
    pub cluster_domain: String,
}

impl Admission {
    /// The agent's rules, with `PATH` taken from the agent's environment as replicas inherit it.
    pub fn new(
        queues: impl IntoIterator<Item = String>,
        default_queue: &str,
        max_replicas_per_job: u32,
    ) -> Self {
        Self {
            queues: queues.into_iter().collect(),
            default_queue: default_queue.to_owned(),
            max_replicas_per_job,
            path: std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            target: Target::Standalone,
            cluster_domain: String::new(),
        }
    }

    /// The same rules for cluster mode, whose Services are named under `cluster_domain`.
    #[must_use]
    pub fn for_cluster(self, cluster_domain: &str) -> Self {
        Self {
            target: Target::Cluster,
            cluster_domain: cluster_domain.to_owned(),
            ..self
        }
    }
}

impl Admission {
    /// The same rules with other queues (the queues in force changed).
    #[must_use]
    pub fn with_queues(&self, definitions: &crate::config::QueueDefinitions) -> Self {
        Self {
            queues: definitions.queues.keys().cloned().collect(),
            default_queue: definitions.default_queue.clone(),
            ..self.clone()
        }
    }
}

/// Reads and checks a manifest for where `rules` run replicas. Returns the job with its queue
/// resolved, or every problem found, each at the path the manifest wrote.
pub fn admit(bytes: &[u8], rules: &Admission) -> Result<TrainingJob, SpecError> {
    admit_as(bytes, rules, Origin::Manifest)
}

/// [`admit`] for the manifest agentd made from a template: it alone may carry the annotations
/// that record the template.
pub(super) fn admit_made_from_template(
    bytes: &[u8],
    rules: &Admission,
) -> Result<TrainingJob, SpecError> {
    admit_as(bytes, rules, Origin::Template)
}

/// Who wrote the manifest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Manifest,
    Template,
}

fn admit_as(bytes: &[u8], rules: &Admission, origin: Origin) -> Result<TrainingJob, SpecError> {
    let read = manifest::read(bytes)?;
    let mut job = read.job;
    let mut errors = read.problems;
    validate_into(&job, rules.target, read.groups_complete, &mut errors);
    if origin == Origin::Manifest {
        // A job records the template it was made from; written by hand, the record would
        // claim a template the job never came from.
        for key in [TEMPLATE_ANNOTATION, TEMPLATE_VALUES_ANNOTATION] {
            if job.annotations.contains_key(key) {
                errors.push(FieldError::new(
                    format!("metadata.annotations[\"{key}\"]"),
                    "is written by agentd on a job made from a template; remove it, or make the job with `agentctl submit --template NAME`",
                ));
            }
        }
    }
    // Past the bound, TF_CONFIG is not built (a manifest may ask for billions of replicas);
    // the job is refused already, and the other checks still say what else is wrong.
    let tf_config = if check_replica_bound(&job, rules, &mut errors) {
        check_tf_config(&job, rules, &mut errors)
    } else {
        0
    };
    for (t, spec) in &job.spec.replica_specs {
        let Some(pod) = spec.template.spec.as_ref() else {
            continue;
        };
        let containers_at = format!("{}.template.spec.containers", job.replica_group_path(*t));
        let training = spec.training_container();
        for (i, container) in pod.containers.iter().enumerate() {
            let at = format!("{containers_at}[{i}]");
            if rules.target == Target::Standalone {
                check_literal_env(container, &at, &mut errors);
            }
            if training.is_some_and(|c| std::ptr::eq(c, container)) {
                check_startable(container, &at, tf_config, rules, &mut errors);
            }
        }
    }
    let queue = job
        .spec
        .queue
        .clone()
        .unwrap_or_else(|| rules.default_queue.clone());
    if !queue.is_empty() && !rules.queues.contains(&queue) {
        errors.push(FieldError::new(
            job.written.queue.as_deref().unwrap_or("spec.queue"),
            format!(
                "no queue named {queue:?}; queues: {}",
                rules.queues.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    if !errors.is_empty() {
        return Err(SpecError::Invalid(errors));
    }
    job.spec.queue = Some(queue);
    Ok(job)
}

/// Whether the job has no more replicas than the agent runs in one job.
fn check_replica_bound(job: &TrainingJob, rules: &Admission, errors: &mut Vec<FieldError>) -> bool {
    let max = rules.max_replicas_per_job;
    let total = job.total_replicas();
    if total <= max {
        return true;
    }
    let largest = job
        .spec
        .replica_specs
        .iter()
        .max_by_key(|(_, s)| s.replicas)
        .map(|(t, _)| *t);
    let at = match largest {
        Some(t) if job.spec.replica_specs[&t].replicas > max => {
            format!("{}.replicas", job.replica_group_path(t))
        }
        _ => format!("spec.{}", job.source.replica_specs_key()),
    };
    errors.push(FieldError::new(
        at,
        format!(
            "the job has {total} replicas in all; this agent runs at most {max} per job \
             (jobs.max_replicas_per_job in its configuration)"
        ),
    ));
    false
}

/// `TF_CONFIG` lists every replica's address, so it grows with the gang (and, in cluster
/// mode, with the job's name and namespace): it must fit in one environment variable. Returns
/// the longest value any replica gets, measured on the addresses the job will have (the
/// highest port in standalone mode, where ports are chosen at start).
fn check_tf_config(job: &TrainingJob, rules: &Admission, errors: &mut Vec<FieldError>) -> usize {
    let hosts = match rules.target {
        Target::Standalone => ClusterHosts::standalone(
            replica_names(job)
                .into_iter()
                .map(|replica| (replica, u16::MAX)),
        ),
        Target::Cluster => ClusterHosts::cluster(job, &rules.cluster_domain, CLUSTER_PORT),
    };
    // Replicas differ only in their own index; the highest is the longest.
    let longest = job
        .spec
        .replica_specs
        .iter()
        .filter_map(|(&t, spec)| tf_config(job, &hosts, (t, spec.replicas.checked_sub(1)?)))
        .map(|value| value.len())
        .max()
        .unwrap_or(0);
    let entry = "TF_CONFIG=".len() + longest;
    if entry >= MAX_ARG_STRLEN {
        errors.push(FieldError::new(
            format!("spec.{}", job.source.replica_specs_key()),
            format!(
                "TF_CONFIG, which lists the address of each of the job's {} replicas, would be \
                 {entry} bytes; a program can be given at most {} bytes in one environment \
                 variable; use fewer replicas{}",
                job.total_replicas(),
                MAX_ARG_STRLEN - 1,
                match rules.target {
                    Target::Standalone => "",
                    Target::Cluster => ", or a shorter job name or namespace",
                }
            ),
        ));
    }
    longest
}

/// Standalone mode has no cluster to resolve a value from a Secret, a ConfigMap or a field.
fn check_literal_env(container: &Container, at: &str, errors: &mut Vec<FieldError>) {
    for (i, env) in container.env.iter().flatten().enumerate() {
        if env.value_from.is_some() {
            errors.push(FieldError::new(
                format!("{at}.env[{i}].valueFrom"),
                "not supported in standalone mode, which has no cluster to resolve it; give a \
                 literal value",
            ));
        }
    }
    for (i, _) in container.env_from.iter().flatten().enumerate() {
        errors.push(FieldError::new(
            format!("{at}.envFrom[{i}]"),
            "not supported in standalone mode, which has no cluster to read a ConfigMap or \
             Secret from; list the variables under env with literal values",
        ));
    }
}

/// What would make the replica fail to start every time: refused now rather than after the gang
/// has been placed.
fn check_startable(
    container: &Container,
    at: &str,
    tf_config: usize,
    rules: &Admission,
    errors: &mut Vec<FieldError>,
) {
    let before = errors.len();
    let nul = |text: &str, field: String, errors: &mut Vec<FieldError>| {
        if text.contains('\0') {
            errors.push(FieldError::new(
                field,
                "contains a NUL byte, which cannot be passed to a program; remove it",
            ));
        }
    };
    let command = container.command.as_deref().unwrap_or_default();
    let args = container.args.as_deref().unwrap_or_default();
    for (i, a) in command.iter().enumerate() {
        nul(a, format!("{at}.command[{i}]"), errors);
    }
    for (i, a) in args.iter().enumerate() {
        nul(a, format!("{at}.args[{i}]"), errors);
    }
    // The environment as Kubernetes builds it: each value may refer to the ones before it.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (i, e) in container.env.iter().flatten().enumerate() {
        if e.name.is_empty() {
            errors.push(FieldError::new(
                format!("{at}.env[{i}].name"),
                "required: a variable needs a name",
            ));
        } else if e.name.contains('=') {
            errors.push(FieldError::new(
                format!("{at}.env[{i}].name"),
                format!(
                    "{:?} contains '=', which ends a variable's name; rename it",
                    e.name
                ),
            ));
        }
        nul(&e.name, format!("{at}.env[{i}].name"), errors);
        let value = e.value.as_deref().unwrap_or_default();
        nul(value, format!("{at}.env[{i}].value"), errors);
        let value = expand(value, |name| env.get(name).map(String::as_str));
        env.insert(e.name.clone(), value);
    }
    // In cluster mode the directory and program are the image's, not this machine's.
    let local = rules.target == Target::Standalone;
    let working_dir = container.working_dir.as_deref().filter(|_| local);
    let mut usable_dir = None;
    if let Some(dir) = working_dir {
        let field = format!("{at}.workingDir");
        if dir.contains('\0') {
            nul(dir, field, errors);
        } else if !dir.starts_with('/') {
            errors.push(FieldError::new(
                field,
                format!(
                    "{dir:?} is relative; give an absolute path to a directory on this machine"
                ),
            ));
        } else {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => usable_dir = Some(PathBuf::from(dir)),
                Ok(_) => errors.push(FieldError::new(field, format!("{dir} is not a directory"))),
                Err(e) => errors.push(FieldError::new(
                    field,
                    format!("the directory {dir} cannot be used on this machine: {e}"),
                )),
            }
        }
    }
    if errors.len() > before {
        return;
    }
    let lookup = |name: &str| env.get(name).map(String::as_str);
    let argv: Vec<String> = command
        .iter()
        .chain(args)
        .map(|a| expand(a, lookup))
        .collect();
    if let Some(program) = argv.first().filter(|_| local) {
        check_program(program, &env, usable_dir.as_deref(), rules, at, errors);
    }
    check_exec_size(&argv, &env, tf_config, at, errors);
}

/// The program exists here and can be run, found as the executor finds it: a name with a `/`
/// as it is (relative to the working directory), a bare name in the replica's `PATH`.
fn check_program(
    program: &str,
    env: &BTreeMap<String, String>,
    usable_dir: Option<&Path>,
    rules: &Admission,
    at: &str,
    errors: &mut Vec<FieldError>,
) {
    let field = format!("{at}.command[0]");
    if program.is_empty() {
        errors.push(FieldError::new(
            field,
            "is empty; give the program to run, e.g. python3",
        ));
        return;
    }
    let candidate = if program.contains('/') {
        let path = Path::new(program);
        if path.is_absolute() {
            path.to_owned()
        } else if let Some(dir) = usable_dir {
            dir.join(path)
        } else {
            // Relative to the agent's own directory, which is no promise about later.
            return;
        }
    } else {
        let path = env.get("PATH").map_or(rules.path.as_str(), String::as_str);
        let found = path.split(':').find_map(|dir| {
            let dir = if dir.is_empty() {
                usable_dir?.to_owned()
            } else {
                PathBuf::from(dir)
            };
            let candidate = dir.join(program);
            is_executable_file(&candidate).then_some(candidate)
        });
        let Some(found) = found else {
            errors.push(FieldError::new(
                field,
                format!(
                    "{program:?} is not an executable file in PATH={path}; install it, give \
                     its absolute path, or set PATH under env"
                ),
            ));
            return;
        };
        found
    };
    let problem = match std::fs::metadata(&candidate) {
        Err(e) => Some(format!("{} cannot be run: {e}", candidate.display())),
        Ok(m) if m.is_dir() => Some(format!(
            "{} is a directory; give the program inside it to run",
            candidate.display()
        )),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Some(format!(
            "{} is not executable (mode {:o}); make it executable or run it through its \
             interpreter, e.g. [python3, {}]",
            candidate.display(),
            m.permissions().mode() & 0o7777,
            candidate.display()
        )),
        Ok(_) => None,
    };
    if let Some(message) = problem {
        errors.push(FieldError::new(field, message));
    }
}

/// A regular file with an execute bit set.
pub(crate) fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The kernel refuses to start a program whose arguments and environment are too large
/// (`E2BIG`): any one entry over `MAX_ARG_STRLEN`, or all of them over `ARG_MAX`.
fn check_exec_size(
    argv: &[String],
    env: &BTreeMap<String, String>,
    tf_config: usize,
    at: &str,
    errors: &mut Vec<FieldError>,
) {
    let entry = |len: usize| len + 1 + std::mem::size_of::<usize>();
    let mut total = 0;
    for (i, a) in argv.iter().enumerate() {
        if a.len() >= MAX_ARG_STRLEN {
            errors.push(FieldError::new(
                format!("{at}.args"),
                format!(
                    "argument {i} of the command line is {} bytes; a program can be given at \
                     most {} bytes in one argument",
                    a.len(),
                    MAX_ARG_STRLEN - 1
                ),
            ));
        }
        total += entry(a.len());
    }
    for (name, value) in env {
        let len = name.len() + 1 + value.len();
        if len >= MAX_ARG_STRLEN {
            errors.push(FieldError::new(
                format!("{at}.env"),
                format!(
                    "{name}={{...}} is {len} bytes; a program can be given at most {} bytes in \
                     one environment variable",
                    MAX_ARG_STRLEN - 1
                ),
            ));
        }
        total += entry(len);
    }
    total += ADDED_ENV_BYTES + entry("TF_CONFIG=".len() + tf_config);
    let arg_max = arg_max();
    if total > arg_max {
        errors.push(FieldError::new(
            at,
            format!(
                "the command line and environment come to about {total} bytes with what agentd \
                 adds (TF_CONFIG included); a program is started with at most {arg_max} \
                 (ARG_MAX on this machine); pass large values in a file"
            ),
        ));
    }
}

/// `ARG_MAX`: the room for arguments and environment when a program starts.
fn arg_max() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .unwrap_or(128 * 1024)
}
