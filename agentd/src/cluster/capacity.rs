//! Each node's free capacity for placement in cluster mode, and whether it takes new replicas.
//!
//! A node's free capacity is its allocatable `cpu`, `memory` and `nvidia.com/gpu` minus the
//! requests of every pod bound to it that has not terminated, agentd's and everyone else's,
//! counted as the kube-scheduler and the kubelet count them (requests default to limits; an
//! init container runs alone, sidecars alongside; pod overhead on top). GPUs its agent reports
//! unhealthy are taken out: the usable GPUs are the fewer of allocatable and healthy, since a
//! device plugin may already leave an unhealthy GPU out of allocatable and it must not count
//! twice. A node that is cordoned, not Ready, drained (`agentd.io/drain`), whose kubelet's
//! Lease (`kube-node-lease`) has expired, or whose agent's heartbeat Lease is stale or missing,
//! takes no new replicas, and says why. Its NoSchedule and NoExecute taints are kept for
//! placement, which admits a replica only where its template tolerates each of them.
//!
//! A node not Ready, or whose kubelet's Lease expired, for longer than `cluster.node_lost_grace`
//! is lost: its gangs restart elsewhere. A node whose agent alone is stale is closed, not lost:
//! its kubelet still runs what it runs.
//!
//! Pure: the caller lists the objects and passes the time.

use std::collections::BTreeMap;
use std::time::Duration;

use agentd_api::AgentState;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Node, NodeCondition, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::jiff::Timestamp;

use super::inventory::{AgentNodeStatus, LABEL_DRAIN};
use super::view::{lease_name, presence};

/// The extended resource a GPU device plugin advertises.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The resources placement counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    pub gpus: u32,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
}

impl Amount {
    fn plus(self, other: Amount) -> Amount {
        Amount {
            gpus: self.gpus.saturating_add(other.gpus),
            cpu_milli: self.cpu_milli.saturating_add(other.cpu_milli),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }

    fn minus(self, other: Amount) -> Amount {
        Amount {
            gpus: self.gpus.saturating_sub(other.gpus),
            cpu_milli: self.cpu_milli.saturating_sub(other.cpu_milli),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }

    /// The larger of each resource.
    fn max(self, other: Amount) -> Amount {
        Amount {
            gpus: self.gpus.max(other.gpus),
            cpu_milli: self.cpu_milli.max(other.cpu_milli),
            memory_bytes: self.memory_bytes.max(other.memory_bytes),
        }
    }

    /// Reads `cpu`, `memory` and `nvidia.com/gpu` from a resource list; `fallback` (a
    /// container's limits) supplies what the list lacks. A quantity that does not parse counts
    /// as `unreadable`.
    fn from_list(
        list: Option<&BTreeMap<String, Quantity>>,
        fallback: Option<&BTreeMap<String, Quantity>>,
        unreadable: Amount,
    ) -> Amount {
        let get = |key: &str| {
            list.and_then(|l| l.get(key))
                .or_else(|| fallback.and_then(|l| l.get(key)))
                .map(|q| q.0.as_str())
        };
        Amount {
            gpus: get(GPU_RESOURCE).map_or(0, |q| {
                // A GPU count is whole; anything else rounds up, as more is the safe side.
                crate::job::parse_cpu_milli(q).map_or(unreadable.gpus, |m| {
                    u32::try_from(m.div_ceil(1000)).unwrap_or(u32::MAX)
                })
            }),
            cpu_milli: get("cpu").map_or(0, |q| {
                crate::job::parse_cpu_milli(q).unwrap_or(unreadable.cpu_milli)
            }),
            memory_bytes: get("memory").map_or(0, |q| {
                crate::job::parse_memory_bytes(q).unwrap_or(unreadable.memory_bytes)
            }),
        }
    }
}

/// Why a node takes no new replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClosedReason {
    /// `spec.unschedulable` (`kubectl cordon`).
    Cordoned,
    /// Its `Ready` condition is not `True`.
    NotReady,
    /// Its kubelet has not renewed its Lease in `kube-node-lease` within the Lease's duration.
    KubeletStale,
    /// Labelled `agentd.io/drain=true` (`agentctl drain`).
    Drained,
    /// Its agent's heartbeat Lease has not been renewed for four intervals.
    AgentStale,
    /// No agent has ever renewed a heartbeat Lease for it.
    NoAgent,
}

/// One reason, with a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub reason: ClosedReason,
    pub message: String,
}

/// What placement knows of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFree {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The Node's `status.allocatable`.
    pub allocatable: Amount,
    /// What the non-terminal pods bound to it request together.
    pub requested: Amount,
    /// GPUs its agent reports unhealthy.
    pub unhealthy_gpus: u32,
    /// What a new replica may still have: allocatable (GPUs: the fewer of allocatable and
    /// healthy) less what is requested, never below zero.
    pub free: Amount,
    /// Why it takes no new replicas; empty when it does.
    pub closed: Vec<Closed>,
    /// Its NoSchedule and NoExecute taints: only replicas whose templates tolerate them go
    /// here (placement judges that per replica).
    pub taints: Vec<crate::sched::Taint>,
    /// What was seen, when the node is lost: not Ready, or its kubelet silent, past
    /// `cluster.node_lost_grace`.
    pub lost: Option<String>,
    /// How long until it is lost, if nothing changes: for a node not Ready, or whose
    /// kubelet's Lease expired, that is not lost yet.
    pub lost_in: Option<Duration>,
}

impl NodeFree {
    /// Whether new replicas may go here.
    pub fn open(&self) -> bool {
        self.closed.is_empty()
    }
}

/// The objects the free capacity is computed from.
#[derive(Debug, Clone, Copy)]
pub struct ClusterObjects<'a> {
    pub nodes: &'a [Node],
    /// Every pod in the cluster (those not bound to a listed node are ignored).
    pub pods: &'a [Pod],
    /// `AgentNode` statuses by node name.
    pub agents: &'a BTreeMap<String, AgentNodeStatus>,
    /// The agents' heartbeat Leases `agentd-node-<node>` (others are ignored).
    pub leases: &'a [Lease],
    /// The kubelets' Leases in `kube-node-lease`, named after their nodes.
    pub kubelet_leases: &'a [Lease],
    pub now: Timestamp,
    /// The heartbeat interval, for a Lease that does not state its duration.
    pub lease_interval: Duration,
    /// `cluster.node_lost_grace`.
    pub node_lost_grace: Duration,
}

/// Every listed node's free capacity, in name order.
pub fn free_capacity(objects: &ClusterObjects<'_>) -> Vec<NodeFree> {
    let mut requested: BTreeMap<&str, Amount> = BTreeMap::new();
    for pod in objects.pods {
        let Some(spec) = pod.spec.as_ref() else {
            continue;
        };
        let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) else {
            continue;
        };
        if terminated(pod) {
            continue;
        }
        let r = requested.entry(node).or_default();
        *r = r.plus(pod_requests(spec));
    }
    let leases: BTreeMap<&str, &Lease> = objects
        .leases
        .iter()
        .filter_map(|l| l.metadata.name.as_deref().map(|n| (n, l)))
        .collect();
    let kubelet_leases: BTreeMap<&str, &Lease> = objects
        .kubelet_leases
        .iter()
        .filter_map(|l| l.metadata.name.as_deref().map(|n| (n, l)))
        .collect();
    let mut list: Vec<NodeFree> = objects
        .nodes
        .iter()
        .filter_map(|node| {
            let name = node.metadata.name.clone()?;
            let requested = requested.get(name.as_str()).copied().unwrap_or_default();
            let lease = leases.get(lease_name(&name).as_str()).copied();
            let kubelet = kubelet_leases.get(name.as_str()).copied();
            Some(node_free(
                node,
                name.clone(),
                requested,
                objects.agents.get(&name),
                (lease, kubelet),
                objects,
            ))
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

fn terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// What a pod requests of its node, as Kubernetes counts it: the app containers and
/// sidecars (init containers with `restartPolicy: Always`) together, or the largest other init
/// container with the sidecars started before it, whichever is more, per resource; plus the
/// pod's overhead. A request not given is the limit (the API server's defaulting).
pub fn pod_requests(spec: &PodSpec) -> Amount {
    // A quantity that does not parse (the API server would have refused it) takes everything.
    let unreadable = Amount {
        gpus: u32::MAX,
        cpu_milli: u64::MAX,
        memory_bytes: u64::MAX,
    };
    let container = |c: &Container| {
        let r = c.resources.as_ref();
        Amount::from_list(
            r.and_then(|r| r.requests.as_ref()),
            r.and_then(|r| r.limits.as_ref()),
            unreadable,
        )
    };
    let mut total = spec
        .containers
        .iter()
        .map(container)
        .fold(Amount::default(), Amount::plus);
    let mut sidecars = Amount::default();
    let mut init = Amount::default();
    for c in spec.init_containers.iter().flatten() {
        let r = container(c);
        let alongside = if c.restart_policy.as_deref() == Some("Always") {
            total = total.plus(r);
            sidecars = sidecars.plus(r);
            sidecars
        } else {
            r.plus(sidecars)
        };
        init = init.max(alongside);
    }
    total
        .max(init)
        .plus(Amount::from_list(spec.overhead.as_ref(), None, unreadable))
}

/// A sign that a node no longer answers, and since when.
enum Silence {
    /// Its `Ready` condition is not `True` (since its last transition), with what it says.
    NotReady { since: Timestamp, said: String },
    /// Its kubelet's Lease expired: renewed last at `renewed`, lasting `lasts`.
    KubeletLease { renewed: Timestamp, lasts: Duration },
}

impl Silence {
    /// Since when it has been silent: a Lease counts from when it expired.
    fn since(&self) -> Option<Timestamp> {
        match self {
            Self::NotReady { since, .. } => Some(*since),
            Self::KubeletLease { renewed, lasts } => renewed.checked_add(*lasts).ok(),
        }
    }

    fn describe(&self, node: &str, now: Timestamp) -> String {
        let age =
            |t: Timestamp| Duration::try_from(now.duration_since(t)).map_or(0, |d| d.as_secs());
        match self {
            Self::NotReady { since, said } if said.is_empty() => {
                format!("node {node} not Ready for {}s", age(*since))
            }
            Self::NotReady { since, said } => {
                format!("node {node} not Ready for {}s ({said})", age(*since))
            }
            Self::KubeletLease { renewed, lasts } => format!(
                "node {node}: its kubelet has not renewed its Lease for {}s (it lasts {}s)",
                age(*renewed),
                lasts.as_secs()
            ),
        }
    }
}

/// The kubelet's own default Lease duration, for a Lease that does not state one.
pub(crate) const KUBELET_LEASE: Duration = Duration::from_secs(40);

/// The signs that a node no longer answers: a Ready condition not True (with a transition
/// time), a kubelet Lease past its duration (`now`).
fn silences(
    ready: Option<&NodeCondition>,
    kubelet: Option<&Lease>,
    now: Timestamp,
) -> Vec<Silence> {
    let mut silent = Vec::new();
    if let Some(c) = ready.filter(|c| c.status != "True")
        && let Some(since) = c.last_transition_time.as_ref()
    {
        let said = [c.reason.as_deref(), c.message.as_deref()]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        silent.push(Silence::NotReady {
            since: since.0,
            said,
        });
    }
    if let Some(spec) = kubelet.and_then(|l| l.spec.as_ref())
        && let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())
    {
        let lasts = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map_or(KUBELET_LEASE, Duration::from_secs);
        let lease = Silence::KubeletLease {
            renewed: renewed.0,
            lasts,
        };
        if lease.since().is_some_and(|expired| expired <= now) {
            silent.push(lease);
        }
    }
    silent
}

/// Whether a node is lost at `now` (what was seen, the first sign past the grace), and if
/// not, how long until it will be.
fn judge_lost(
    name: &str,
    silent: &[Silence],
    objects: &ClusterObjects<'_>,
) -> (Option<String>, Option<Duration>) {
    let mut lost_in: Option<Duration> = None;
    for sign in silent {
        let Some(age) = sign
            .since()
            .and_then(|since| Duration::try_from(objects.now.duration_since(since)).ok())
        else {
            continue;
        };
        let Some(left) = objects
            .node_lost_grace
            .checked_sub(age)
            .filter(|left| !left.is_zero())
        else {
            return (Some(sign.describe(name, objects.now)), None);
        };
        lost_in = Some(lost_in.map_or(left, |l| l.min(left)));
    }
    (None, lost_in)
}

fn node_free(
    node: &Node,
    name: String,
    requested: Amount,
    agent: Option<&AgentNodeStatus>,
    (lease, kubelet): (Option<&Lease>, Option<&Lease>),
    objects: &ClusterObjects<'_>,
) -> NodeFree {
    let status = node.status.as_ref();
    // An allocatable quantity that does not parse counts as nothing.
    let allocatable = Amount::from_list(
        status.and_then(|s| s.allocatable.as_ref()),
        None,
        Amount::default(),
    );
    let unhealthy_gpus = agent.map_or(0, |a| a.gpus.iter().filter(|g| !g.healthy).count() as u32);
    let mut usable = allocatable;
    if let Some(a) = agent {
        let healthy = a.gpus.iter().filter(|g| g.healthy).count() as u32;
        usable.gpus = usable.gpus.min(healthy);
    }
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let mut closed = Vec::new();
    let mut close = |reason, message: String| closed.push(Closed { reason, message });
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        close(
            ClosedReason::Cordoned,
            format!("node {name} is cordoned (unschedulable)"),
        );
    }
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"));
    match ready {
        Some(c) if c.status == "True" => {}
        Some(c) => close(
            ClosedReason::NotReady,
            format!(
                "node {name} is not Ready ({}{})",
                c.status,
                c.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ),
        ),
        None => close(
            ClosedReason::NotReady,
            format!("node {name} reports no Ready condition"),
        ),
    }
    if labels.get(LABEL_DRAIN).is_some_and(|v| v == "true") {
        close(
            ClosedReason::Drained,
            format!("node {name} is drained ({LABEL_DRAIN}=true)"),
        );
    }
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let effect = match t.effect.as_str() {
                "NoSchedule" => crate::sched::TaintEffect::NoSchedule,
                "NoExecute" => crate::sched::TaintEffect::NoExecute,
                // PreferNoSchedule is a preference, which placement does not weigh.
                _ => return None,
            };
            Some(crate::sched::Taint {
                key: t.key.clone(),
                value: t.value.clone().unwrap_or_default(),
                effect,
            })
        })
        .collect();
    let silent = silences(ready, kubelet, objects.now);
    if let Some(lease) = silent
        .iter()
        .find(|s| matches!(s, Silence::KubeletLease { .. }))
    {
        close(
            ClosedReason::KubeletStale,
            lease.describe(&name, objects.now),
        );
    }
    let (lost, lost_in) = judge_lost(&name, &silent, objects);
    let agent_presence = presence(lease, objects.now, objects.lease_interval);
    match agent_presence.state {
        AgentState::Fresh => {}
        AgentState::Stale => close(
            ClosedReason::AgentStale,
            format!(
                "the agent on node {name} has not renewed its Lease for {}s",
                agent_presence.age_seconds.unwrap_or(0)
            ),
        ),
        AgentState::None => close(
            ClosedReason::NoAgent,
            format!(
                "no agentd runs on node {name} (no Lease {})",
                lease_name(&name)
            ),
        ),
    }
    NodeFree {
        name,
        labels,
        allocatable,
        requested,
        unhealthy_gpus,
        free: usable.minus(requested),
        closed,
        taints,
        lost,
        lost_in,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::core::v1::{
        NodeCondition, NodeSpec, NodeStatus, PodStatus, ResourceRequirements, Taint, Toleration,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
    use proptest::prelude::*;

    use super::super::inventory::AgentGpu;
    use super::*;

    pub(crate) const NOW: &str = "2026-01-01T00:01:00Z";

    pub(crate) fn quantities(cpu: &str, memory: &str, gpus: &str) -> BTreeMap<String, Quantity> {
        [("cpu", cpu), ("memory", memory), (GPU_RESOURCE, gpus)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
            .collect()
    }

    pub(crate) fn node(name: &str, cpu: &str, memory: &str, gpus: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(quantities(cpu, memory, gpus)),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
        }
    }

    pub(crate) fn container(requests: (&str, &str, &str), limits: (&str, &str, &str)) -> Container {
        Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: Some(quantities(requests.0, requests.1, requests.2)),
                limits: Some(quantities(limits.0, limits.1, limits.2)),
                ..ResourceRequirements::default()
            }),
            ..Container::default()
        }
    }

    pub(crate) fn pod(node: &str, phase: &str, containers: Vec<Container>) -> Pod {
        Pod {
            metadata: ObjectMeta::default(),
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers,
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
        }
    }

    pub(crate) fn fresh_lease(node: &str) -> Lease {
        crate::cluster::view::tests::lease(node, "2026-01-01T00:00:55Z".parse().unwrap(), 40)
    }

    pub(crate) fn agent(healthy: &[bool]) -> AgentNodeStatus {
        AgentNodeStatus {
            gpu_count: healthy.len() as u32,
            healthy_gpu_count: healthy.iter().filter(|h| **h).count() as u32,
            gpu_product: "NVIDIA H200".into(),
            agent_version: "0.1.0".into(),
            cpu_cores: 8,
            memory_bytes: 1 << 30,
            disks: vec![],
            driver_version: None,
            cuda_version: None,
            gpus: healthy
                .iter()
                .enumerate()
                .map(|(i, h)| AgentGpu {
                    index: i as u32,
                    uuid: format!("GPU-{i}"),
                    product: "NVIDIA H200".into(),
                    memory_mib: 1024,
                    minor_number: None,
                    healthy: *h,
                    reason: (!h).then(|| "XID 79".to_owned()),
                })
                .collect(),
        }
    }

    fn compute(
        nodes: &[Node],
        pods: &[Pod],
        agents: &BTreeMap<String, AgentNodeStatus>,
    ) -> Vec<NodeFree> {
        let leases: Vec<Lease> = nodes
            .iter()
            .map(|n| fresh_lease(n.metadata.name.as_deref().unwrap()))
            .collect();
        free_capacity(&ClusterObjects {
            nodes,
            pods,
            agents,
            leases: &leases,
            kubelet_leases: &[],
            now: NOW.parse().unwrap(),
            lease_interval: Duration::from_secs(10),
            node_lost_grace: Duration::from_secs(40),
        })
    }

    fn amount(gpus: u32, cpu_milli: u64, memory_bytes: u64) -> Amount {
        Amount {
            gpus,
            cpu_milli,
            memory_bytes,
        }
    }

    #[test]
    fn requests_of_live_pods_bound_to_the_node_are_taken_off_allocatable() {
        let nodes = [node("a", "16", "64Gi", "8"), node("b", "16", "64Gi", "8")];
        let pods = [
            // agentd's and someone else's: both count.
            pod(
                "a",
                "Running",
                vec![container(("2", "4Gi", "2"), ("", "", "2"))],
            ),
            pod(
                "a",
                "Pending",
                vec![container(("500m", "1Gi", ""), ("", "", ""))],
            ),
            // Finished pods hold nothing.
            pod(
                "a",
                "Succeeded",
                vec![container(("8", "8Gi", "4"), ("", "", ""))],
            ),
            pod(
                "a",
                "Failed",
                vec![container(("8", "8Gi", "4"), ("", "", ""))],
            ),
            // Unbound pods and pods elsewhere do not count here.
            pod(
                "",
                "Pending",
                vec![container(("8", "8Gi", "4"), ("", "", ""))],
            ),
            pod(
                "b",
                "Running",
                vec![container(("1", "1Gi", "1"), ("", "", ""))],
            ),
        ];
        let free = compute(&nodes, &pods, &BTreeMap::new());
        assert_eq!(free[0].name, "a");
        assert_eq!(free[0].allocatable, amount(8, 16_000, 64 << 30));
        assert_eq!(free[0].requested, amount(2, 2500, 5 << 30));
        assert_eq!(free[0].free, amount(6, 13_500, 59 << 30));
        assert!(free[0].open(), "{:?}", free[0].closed);
        assert_eq!(free[1].free, amount(7, 15_000, 63 << 30));
    }

    #[test]
    fn a_request_not_given_is_the_limit() {
        let pods = [pod(
            "a",
            "Running",
            vec![container(("", "", ""), ("2", "2Gi", "1"))],
        )];
        let free = compute(&[node("a", "4", "4Gi", "2")], &pods, &BTreeMap::new());
        assert_eq!(free[0].requested, amount(1, 2000, 2 << 30));
    }

    #[test]
    fn init_containers_count_as_kubernetes_counts_them() {
        let app = |cpu: &str| container((cpu, "1Gi", ""), ("", "", ""));
        let mut spec = PodSpec {
            containers: vec![app("1"), app("1")],
            init_containers: Some(vec![
                container(("3", "1Gi", "1"), ("", "", "")),
                container(("1", "4Gi", ""), ("", "", "")),
            ]),
            ..PodSpec::default()
        };
        // max(largest init, sum of app) per resource: cpu max(3, 2), memory max(4, 2) GiB,
        // GPUs max(1, 0).
        assert_eq!(pod_requests(&spec), amount(1, 3000, 4 << 30));

        // A sidecar (restartPolicy Always) runs alongside everything after it.
        let mut sidecar = container(("1", "1Gi", ""), ("", "", ""));
        sidecar.restart_policy = Some("Always".into());
        spec.init_containers = Some(vec![sidecar, container(("3", "1Gi", ""), ("", "", ""))]);
        // app + sidecar: cpu 3, memory 3 GiB; the init after the sidecar: cpu 4, memory 2 GiB.
        assert_eq!(pod_requests(&spec), amount(0, 4000, 3 << 30));

        spec.overhead = Some(quantities("250m", "128Mi", ""));
        assert_eq!(
            pod_requests(&spec),
            amount(0, 4250, (3 << 30) + (128 << 20))
        );
    }

    #[test]
    fn unhealthy_gpus_are_taken_out_but_never_twice() {
        let pods = [pod(
            "a",
            "Running",
            vec![container(("", "", "2"), ("", "", ""))],
        )];
        let agents = BTreeMap::from([("a".to_owned(), agent(&[true, true, false, true]))]);
        // Allocatable still says 4: 3 healthy, 2 requested.
        let free = compute(&[node("a", "8", "8Gi", "4")], &pods, &agents);
        assert_eq!(free[0].unhealthy_gpus, 1);
        assert_eq!(free[0].free.gpus, 1);
        // The device plugin already dropped it from allocatable: still 1, not 0.
        let free = compute(&[node("a", "8", "8Gi", "3")], &pods, &agents);
        assert_eq!(free[0].free.gpus, 1);
    }

    #[test]
    fn over_committed_nodes_show_nothing_free_never_a_negative() {
        let pods = [pod(
            "a",
            "Running",
            vec![container(("8", "16Gi", "4"), ("", "", ""))],
        )];
        let free = compute(&[node("a", "4", "8Gi", "2")], &pods, &BTreeMap::new());
        assert_eq!(free[0].free, Amount::default());
    }

    #[test]
    fn a_node_without_gpus_in_allocatable_has_none_free_whatever_its_agent_says() {
        let agents = BTreeMap::from([("a".to_owned(), agent(&[true, true]))]);
        let free = compute(&[node("a", "8", "8Gi", "")], &[], &agents);
        assert_eq!(free[0].free.gpus, 0);
    }

    fn reasons(free: &NodeFree) -> Vec<ClosedReason> {
        free.closed.iter().map(|c| c.reason).collect()
    }

    #[test]
    fn cordoned_not_ready_and_drained_nodes_are_closed_with_a_reason() {
        let mut cordoned = node("a", "8", "8Gi", "1");
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        let mut not_ready = node("b", "8", "8Gi", "1");
        let condition = &mut not_ready
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0];
        condition.status = "Unknown".into();
        condition.reason = Some("NodeStatusUnknown".into());
        let mut drained = node("c", "8", "8Gi", "1");
        drained.metadata.labels = Some(BTreeMap::from([(LABEL_DRAIN.into(), "true".into())]));
        let mut no_condition = node("d", "8", "8Gi", "1");
        no_condition.status.as_mut().unwrap().conditions = None;
        let free = compute(
            &[cordoned, not_ready, drained, no_condition],
            &[],
            &BTreeMap::new(),
        );
        assert_eq!(reasons(&free[0]), [ClosedReason::Cordoned]);
        assert_eq!(reasons(&free[1]), [ClosedReason::NotReady]);
        assert!(
            free[1].closed[0]
                .message
                .contains("Unknown: NodeStatusUnknown"),
            "{:?}",
            free[1].closed
        );
        assert_eq!(reasons(&free[2]), [ClosedReason::Drained]);
        assert_eq!(reasons(&free[3]), [ClosedReason::NotReady]);
        assert!(free.iter().all(|f| !f.open()));
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: (!value.is_empty()).then(|| value.to_owned()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn toleration(key: &str, operator: &str, value: &str, effect: &str) -> Toleration {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Toleration {
            key: some(key),
            operator: some(operator),
            value: some(value),
            effect: some(effect),
            toleration_seconds: None,
        }
    }

    #[test]
    fn no_schedule_and_no_execute_taints_are_kept_for_placement_and_do_not_close_the_node() {
        let mut tainted = node("a", "8", "8Gi", "1");
        tainted.spec.as_mut().unwrap().taints = Some(vec![
            taint("gpu", "h200", "NoSchedule"),
            taint("maintenance", "", "NoExecute"),
            taint("soft", "", "PreferNoSchedule"),
        ]);
        let free = compute(&[tainted], &[], &BTreeMap::new());
        assert!(free[0].open(), "{:?}", free[0].closed);
        let shown: Vec<String> = free[0].taints.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["gpu=h200:NoSchedule", "maintenance:NoExecute"],
            "PreferNoSchedule is a preference, not kept"
        );
    }

    /// A template's tolerations, read as placement reads them, against one taint.
    fn template_tolerates(toleration: Toleration, taint: &Taint) -> bool {
        let spec = PodSpec {
            tolerations: Some(vec![toleration]),
            ..PodSpec::default()
        };
        let mut node = node("a", "8", "8Gi", "1");
        node.spec.as_mut().unwrap().taints = Some(vec![taint.clone()]);
        let free = compute(&[node], &[], &BTreeMap::new());
        let nodes = crate::cluster::feed::placement_nodes_of(&free, &BTreeMap::new());
        crate::job::node_rule(&spec).admits(&nodes[0])
    }

    #[test]
    fn toleration_matching_follows_kubernetes() {
        let t = taint("k", "v", "NoSchedule");
        let tol = toleration;
        assert!(template_tolerates(tol("k", "Equal", "v", "NoSchedule"), &t));
        assert!(template_tolerates(tol("k", "", "v", ""), &t), "any effect");
        assert!(!template_tolerates(tol("k", "Equal", "v", "NoExecute"), &t));
        assert!(!template_tolerates(tol("other", "Exists", "", ""), &t));
        assert!(template_tolerates(tol("k", "Exists", "", "NoSchedule"), &t));
        assert!(!template_tolerates(tol("k", "Equal", "", ""), &t));
        assert!(
            template_tolerates(tol("", "Exists", "", ""), &t),
            "everything"
        );
        let bare = taint("maintenance", "", "NoExecute");
        assert!(template_tolerates(
            tol("maintenance", "Exists", "", ""),
            &bare
        ));
        assert!(template_tolerates(
            tol("maintenance", "", "", "NoExecute"),
            &bare
        ));
        assert!(!template_tolerates(tol("maintenance", "", "x", ""), &bare));
    }

    #[test]
    fn a_stale_or_missing_agent_lease_closes_the_node() {
        let nodes = [node("a", "8", "8Gi", "1"), node("b", "8", "8Gi", "1")];
        let mut stale = fresh_lease("a");
        stale.spec.as_mut().unwrap().renew_time =
            Some(MicroTime("2026-01-01T00:00:00Z".parse().unwrap()));
        let free = free_capacity(&ClusterObjects {
            nodes: &nodes,
            pods: &[],
            agents: &BTreeMap::new(),
            leases: &[stale],
            kubelet_leases: &[],
            now: NOW.parse().unwrap(),
            lease_interval: Duration::from_secs(10),
            node_lost_grace: Duration::from_secs(40),
        });
        assert_eq!(reasons(&free[0]), [ClosedReason::AgentStale]);
        assert!(
            free[0].closed[0].message.contains("60s"),
            "{:?}",
            free[0].closed
        );
        assert_eq!(reasons(&free[1]), [ClosedReason::NoAgent]);
        assert!(free[1].closed[0].message.contains("agentd-node-b"));
        // The kubelet still runs what it runs: closed, not lost.
        assert!(free.iter().all(|f| f.lost.is_none() && f.lost_in.is_none()));
    }

    /// A node not Ready, or whose kubelet's Lease expired, is closed at once and lost once that
    /// has lasted past `cluster.node_lost_grace`; the message says what was seen, for how long.
    #[test]
    fn a_node_silent_past_the_grace_is_lost_and_says_what_was_seen() {
        let not_ready = |name: &str, since: &str| {
            let mut n = node(name, "8", "8Gi", "1");
            let c = &mut n.status.as_mut().unwrap().conditions.as_mut().unwrap()[0];
            c.status = "Unknown".into();
            c.reason = Some("NodeStatusUnknown".into());
            c.message = Some("Kubelet stopped posting node status.".into());
            c.last_transition_time = Some(Time(since.parse().unwrap()));
            n
        };
        let kubelet = |name: &str, renewed: &str| {
            let mut l = crate::cluster::view::tests::lease(name, renewed.parse().unwrap(), 40);
            l.metadata.name = Some(name.into());
            l
        };
        let nodes = [
            // Not Ready for 41 s (NOW is 00:01:00).
            not_ready("a", "2026-01-01T00:00:19Z"),
            // Not Ready for 30 s: closed, lost in 10 s.
            not_ready("b", "2026-01-01T00:00:30Z"),
            // Ready, but its kubelet renewed 85 s ago: expired 45 s ago.
            node("c", "8", "8Gi", "1"),
            // Renewed 50 s ago: expired 10 s ago; lost in 30 s.
            node("d", "8", "8Gi", "1"),
            // Renewed 5 s ago.
            node("e", "8", "8Gi", "1"),
        ];
        let agent_leases: Vec<Lease> = ["a", "b", "c", "d", "e"].map(fresh_lease).to_vec();
        let kubelet_leases = [
            kubelet("a", "2026-01-01T00:00:55Z"),
            kubelet("b", "2026-01-01T00:00:55Z"),
            kubelet("c", "2025-12-31T23:59:35Z"),
            kubelet("d", "2026-01-01T00:00:10Z"),
            kubelet("e", "2026-01-01T00:00:55Z"),
        ];
        let free = free_capacity(&ClusterObjects {
            nodes: &nodes,
            pods: &[],
            agents: &BTreeMap::new(),
            leases: &agent_leases,
            kubelet_leases: &kubelet_leases,
            now: NOW.parse().unwrap(),
            lease_interval: Duration::from_secs(10),
            node_lost_grace: Duration::from_secs(40),
        });
        let lost: Vec<Option<&str>> = free.iter().map(|f| f.lost.as_deref()).collect();
        assert_eq!(
            lost,
            [
                Some(
                    "node a not Ready for 41s (NodeStatusUnknown: Kubelet stopped posting node \
                     status.)"
                ),
                None,
                Some("node c: its kubelet has not renewed its Lease for 85s (it lasts 40s)"),
                None,
                None,
            ]
        );
        let lost_in: Vec<Option<u64>> = free
            .iter()
            .map(|f| f.lost_in.map(|d| d.as_secs()))
            .collect();
        assert_eq!(lost_in, [None, Some(10), None, Some(30), None]);
        assert_eq!(reasons(&free[1]), [ClosedReason::NotReady]);
        assert_eq!(reasons(&free[2]), [ClosedReason::KubeletStale]);
        assert_eq!(reasons(&free[3]), [ClosedReason::KubeletStale]);
        assert!(free[4].open(), "{:?}", free[4].closed);
    }

    #[test]
    fn a_quantity_that_does_not_parse_closes_nothing_and_takes_everything() {
        let pods = [pod(
            "a",
            "Running",
            vec![container(("lots", "", ""), ("", "", ""))],
        )];
        let free = compute(&[node("a", "8", "8Gi", "1")], &pods, &BTreeMap::new());
        assert_eq!(free[0].free.cpu_milli, 0, "the safe side");
        assert_eq!(free[0].free.gpus, 1);
        let free = compute(&[node("a", "many", "8Gi", "1")], &[], &BTreeMap::new());
        assert_eq!(free[0].allocatable.cpu_milli, 0);
    }

    /// Generated: pods with app and init containers on a few nodes, some finished.
    fn arb_pod() -> impl Strategy<Value = Pod> {
        let arb_container = (0u64..4000, 0u64..4096, 0u32..3).prop_map(|(cpu, mib, gpus)| {
            container(
                (&format!("{cpu}m"), &format!("{mib}Mi"), &gpus.to_string()),
                ("", "", ""),
            )
        });
        (
            0usize..4,
            prop_oneof![
                Just("Running"),
                Just("Pending"),
                Just("Succeeded"),
                Just("Failed")
            ],
            proptest::collection::vec(arb_container.clone(), 1..4),
            proptest::collection::vec(arb_container, 0..3),
        )
            .prop_map(|(node, phase, containers, init)| {
                let mut p = pod(&format!("n{node}"), phase, containers);
                p.spec.as_mut().unwrap().init_containers = Some(init);
                p
            })
    }

    /// The same rule written out directly, for pods without sidecars.
    fn reference_requests(pod: &Pod) -> Amount {
        let spec = pod.spec.as_ref().unwrap();
        let each = |c: &Container| {
            let q = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
            amount(
                q[GPU_RESOURCE].0.parse().unwrap(),
                q["cpu"].0.trim_end_matches('m').parse().unwrap(),
                q["memory"].0.trim_end_matches("Mi").parse::<u64>().unwrap() << 20,
            )
        };
        let sum = spec
            .containers
            .iter()
            .map(each)
            .fold(Amount::default(), Amount::plus);
        let init = spec
            .init_containers
            .iter()
            .flatten()
            .map(each)
            .fold(Amount::default(), Amount::max);
        amount(
            sum.gpus.max(init.gpus),
            sum.cpu_milli.max(init.cpu_milli),
            sum.memory_bytes.max(init.memory_bytes),
        )
    }

    proptest! {
        #[test]
        fn free_is_allocatable_less_the_live_pods_requests_never_below_zero(
            pods in proptest::collection::vec(arb_pod(), 0..12),
            healthy in proptest::collection::vec(prop::bool::weighted(0.8), 8),
        ) {
            let nodes: Vec<Node> = (0..3).map(|i| node(&format!("n{i}"), "8", "16Gi", "8")).collect();
            let agents = BTreeMap::from([("n0".to_owned(), agent(&healthy))]);
            let free = compute(&nodes, &pods, &agents);
            prop_assert_eq!(free.len(), 3);
            for f in &free {
                let want = pods
                    .iter()
                    .filter(|p| p.spec.as_ref().unwrap().node_name.as_deref() == Some(f.name.as_str()))
                    .filter(|p| !terminated(p))
                    .map(reference_requests)
                    .fold(Amount::default(), Amount::plus);
                prop_assert_eq!(f.requested, want);
                let usable_gpus = if f.name == "n0" {
                    healthy.iter().filter(|h| **h).count() as u32
                } else {
                    8
                };
                prop_assert_eq!(f.free.gpus, usable_gpus.saturating_sub(want.gpus));
                prop_assert_eq!(f.free.cpu_milli, 8000u64.saturating_sub(want.cpu_milli));
                prop_assert_eq!(f.free.memory_bytes, (16u64 << 30).saturating_sub(want.memory_bytes));
                prop_assert!(f.free.gpus <= f.allocatable.gpus);
                prop_assert!(f.open());
            }
            // The order the pods are listed in changes nothing.
            let mut reversed = pods.clone();
            reversed.reverse();
            prop_assert_eq!(compute(&nodes, &reversed, &agents), free.clone());
            // One more live pod never frees anything.
            let mut more = pods.clone();
            more.push(pod("n1", "Running", vec![container(("1", "1Gi", "1"), ("", "", ""))]));
            let after = compute(&nodes, &more, &agents);
            prop_assert!(after[1].free.cpu_milli <= free[1].free.cpu_milli);
            prop_assert!(after[1].free.gpus <= free[1].free.gpus);
        }
    }
}
