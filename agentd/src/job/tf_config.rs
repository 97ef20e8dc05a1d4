//! `TF_CONFIG`: the environment variable that tells each TensorFlow process who its peers are
//! and which one it is, in the form the Kubeflow TFJob operator writes it but for one choice:
//! the evaluator is not listed in `cluster` (the operator lists it).
//!
//! That choice was made by running TensorFlow 2 (tensorflow-cpu, `scripts/check-tf-config-evaluator`)
//! with a side-car evaluator that waits for a checkpoint and reads it, both ways:
//! - ParameterServerStrategy: with the evaluator in `cluster` the coordinator never finishes (it
//!   connects to every task of the cluster, and the evaluator runs no server); without it, the
//!   chief trains and the evaluator reads the checkpoint.
//! - MultiWorkerMirroredStrategy: the workers train and exit and the evaluator reads the
//!   checkpoint either way. An evaluator that builds the strategy itself hangs every worker at
//!   exit when it is in `cluster`, and fails at once (`KeyError: 'evaluator'`) when it is not;
//!   a side-car evaluator reads checkpoints and must not build the training strategy.
//!
//! The rules:
//! - `{"cluster":{...},"task":{"type":...,"index":...},"environment":"cloud"}`, in that key
//!   order, compact, with the cluster's replica types sorted by name (the operator marshals a Go
//!   map, and Go sorts map keys).
//! - Replica types in lower case (`chief`, `master`, `ps`, `worker`); each lists one `host:port`
//!   per replica, by index.
//! - The evaluator is not part of the training cluster (see above): it is left out of `cluster`,
//!   but its own task type is `evaluator`.
//! - A job of a single replica in total gets no `TF_CONFIG`: it is local training, and
//!   TensorFlow would otherwise try to start a one-task cluster server.
//! - In a cluster, a replica's host is its pod's name under the job's headless Service,
//!   `<job>-<type>-<index>.<job>.<namespace>.svc[.<cluster domain>]` (the operator makes one
//!   Service per replica, `<job>-<type>-<index>.<namespace>.svc`; one per job is one write per
//!   gang instead of one per replica), on the port its training container names `tfjob-port`
//!   (each replica type may differ), 2222 when it names none.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{ReplicaSpec, ReplicaType, TrainingJob, replica_names};

/// The port replicas listen on in cluster mode when their container declares no `tfjob-port`
/// (Kubeflow's default).
pub const CLUSTER_PORT: u16 = 2222;

/// The name of the container port that carries TensorFlow's traffic, as the operator reads it.
pub const TFJOB_PORT_NAME: &str = "tfjob-port";

/// The port of a replica group in cluster mode: the training container's port named
/// `tfjob-port`, or `default` when it declares none, as the Kubeflow operator reads it (each
/// replica type may use its own).
pub fn tfjob_port(spec: &ReplicaSpec, default: u16) -> u16 {
    spec.training_container()
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(TFJOB_PORT_NAME))
        })
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(default)
}

/// Where each replica of a job can be reached: `host:port` by (type, index).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterHosts {
    hosts: BTreeMap<(ReplicaType, u32), String>,
}

impl ClusterHosts {
    /// Standalone mode: every replica on this machine, `localhost:<port>`, one port each.
    pub fn standalone(ports: impl IntoIterator<Item = ((ReplicaType, u32), u16)>) -> Self {
        Self {
            hosts: ports
                .into_iter()
                .map(|(replica, port)| (replica, format!("localhost:{port}")))
                .collect(),
        }
    }

    /// Cluster mode: each replica is a pod with hostname `<job>-<type>-<index>` under the job's
    /// headless Service `<job>` (the pod's subdomain), so its name is
    /// `<job>-<type>-<index>.<job>.<namespace>.svc[.<cluster_domain>]:<port>`. The namespace is
    /// the job's, or `default`; an empty `cluster_domain` leaves the name ending in `.svc`, which
    /// the cluster's DNS search path completes. The port is each replica type's `tfjob-port`
    /// ([`tfjob_port`]), `default_port` where it declares none.
    pub fn cluster(job: &TrainingJob, cluster_domain: &str, default_port: u16) -> Self {
        let namespace = job.namespace.as_deref().unwrap_or("default");
        let domain = if cluster_domain.is_empty() {
            String::new()
        } else {
            format!(".{cluster_domain}")
        };
        Self {
            hosts: replica_names(job)
                .into_iter()
                .map(|(t, i)| {
                    let port = tfjob_port(&job.spec.replica_specs[&t], default_port);
                    let host = format!(
                        "{job}-{}-{i}.{job}.{namespace}.svc{domain}:{port}",
                        t.as_tf_key(),
                        job = job.name,
                    );
                    ((t, i), host)
                })
                .collect(),
        }
    }

    /// The `host:port` of one replica.
    pub fn get(&self, replica_type: ReplicaType, index: u32) -> Option<&str> {
        self.hosts.get(&(replica_type, index)).map(String::as_str)
    }
}

#[derive(Serialize)]
struct TfConfig<'a> {
    cluster: BTreeMap<&'static str, Vec<&'a str>>,
    task: Task,
    environment: &'static str,
}

#[derive(Serialize)]
struct Task {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
}

/// The `TF_CONFIG` value for one replica, or `None` when it gets none: the job has a single
/// replica in total, the replica is not part of the job, or `hosts` lacks a replica of the
/// training cluster (which [`ClusterHosts::cluster`] never does).
pub fn tf_config(
    job: &TrainingJob,
    hosts: &ClusterHosts,
    replica: (ReplicaType, u32),
) -> Option<String> {
    if job.total_replicas() == 1 {
        return None;
    }
    let (task_type, task_index) = replica;
    if task_index >= job.spec.replica_specs.get(&task_type)?.replicas {
        return None;
    }
    let mut cluster: BTreeMap<&'static str, Vec<&str>> = BTreeMap::new();
    for (t, spec) in &job.spec.replica_specs {
        if *t == ReplicaType::Evaluator {
            continue;
        }
        let members = (0..spec.replicas)
            .map(|i| hosts.get(*t, i))
            .collect::<Option<Vec<_>>>()?;
        cluster.insert(t.as_tf_key(), members);
    }
    let config = TfConfig {
        cluster,
        task: Task {
            kind: task_type.as_tf_key(),
            index: task_index,
        },
        environment: "cloud",
    };
    serde_json::to_string(&config).ok()
}
