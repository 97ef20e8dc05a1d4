//! Where the leader may place replicas: the cluster's nodes as the scheduler sees them, kept up
//! to date from watches on Nodes, Pods, `AgentNode`s, the agents' heartbeat Leases and the
//! kubelets' Leases (never from polling lists), and recomputed whenever one of them changes, and
//! when a node that has gone silent reaches `cluster.node_lost_grace` (nothing changes then: it
//! is the silence that counts). Lost nodes are published with the capacity, for the core to
//! restart their gangs.
//!
//! The scheduler subtracts what agentd's own gangs hold (the core knows their placements,
//! including those whose pods are not created yet), so a node's capacity here is what every
//! other pod leaves of it: agentd's pods (label `agentd.io/job`) are not counted twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::Cluster;
use super::capacity::{ClusterObjects, NodeFree, free_capacity};
use super::inventory::{AgentNodeStatus, LABEL_GPU_PRODUCT};
use crate::core::{ClusterNodes, LostNode};
use crate::sched::{GpuSlot, NodeCapacity};

/// Where the kubelets keep their Leases.
const KUBELET_LEASE_NAMESPACE: &str = "kube-node-lease";

/// The label on every pod agentd creates, naming its job.
pub const LABEL_JOB: &str = "agentd.io/job";

/// How long changes are gathered before the nodes are recomputed: a burst of pod updates
/// (a gang starting) costs one computation, not one per pod.
const SETTLE: Duration = Duration::from_millis(50);

/// The least time between two computations for kubelets' Lease renewals alone.
const KUBELET_SETTLE: Duration = Duration::from_secs(1);

/// The scheduler's nodes: each node's free capacity, computed from `objects` (whose pods are
/// everyone's but agentd's: see [`others`]), as free GPU slots, free CPU and memory, open or
/// closed, with the taints each replica's template must tolerate.
pub fn placement_nodes(objects: &ClusterObjects<'_>) -> Vec<NodeCapacity> {
    let free = free_capacity(objects);
    placement_nodes_of(&free, objects.agents)
}

/// The cluster's nodes for the core: their capacity and which are lost; and how long until
/// the next silent node is lost, if one will be.
pub fn cluster_nodes(objects: &ClusterObjects<'_>) -> (ClusterNodes, Option<Duration>) {
    let free = free_capacity(objects);
    let lost = free
        .iter()
        .filter_map(|n| {
            Some(LostNode {
                name: n.name.clone(),
                message: n.lost.clone()?,
            })
        })
        .collect();
    let next = free.iter().filter_map(|n| n.lost_in).min();
    let nodes = ClusterNodes {
        listed: true,
        capacity: Arc::new(placement_nodes_of(&free, objects.agents)),
        lost,
    };
    (nodes, next)
}

/// The pods that are not agentd's.
pub fn others<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> Vec<Pod> {
    pods.into_iter()
        .filter(|p| !is_agentd_pod(p))
        .cloned()
        .collect()
}

/// The scheduler's nodes from each node's free capacity.
pub(crate) fn placement_nodes_of(
    free: &[NodeFree],
    agents: &BTreeMap<String, AgentNodeStatus>,
) -> Vec<NodeCapacity> {
    free.iter()
        .map(|node| {
            let product = node
                .labels
                .get(LABEL_GPU_PRODUCT)
                .cloned()
                .or_else(|| agents.get(&node.name).map(|a| a.gpu_product.clone()))
                .unwrap_or_default();
            let memory_mib = agents
                .get(&node.name)
                .and_then(|a| a.gpus.first())
                .map_or(0, |g| g.memory_mib);
            let mut labels = node.labels.clone();
            labels
                .entry("kubernetes.io/hostname".to_owned())
                .or_insert_with(|| node.name.clone());
            NodeCapacity {
                name: node.name.clone(),
                labels,
                gpus: (0..node.free.gpus)
                    .map(|index| GpuSlot {
                        index,
                        uuid: String::new(),
                        product: product.clone(),
                        memory_mib,
                        healthy: true,
                    })
                    .collect(),
                cpu_milli: node.free.cpu_milli,
                memory_mib: node.free.memory_bytes / (1024 * 1024),
                schedulable: node.open(),
                taints: node.taints.clone(),
            }
        })
        .collect()
}

/// Whether agentd created the pod (for one of its gangs).
fn is_agentd_pod(pod: &Pod) -> bool {
    pod.meta()
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LABEL_JOB))
}

/// Watches the cluster until `stop` turns true, and publishes its nodes on the returned channel
/// after each change. Starts unlisted ([`ClusterNodes::listed`]): the core places nothing
/// before the first lists are in.
/// `node_lost_grace`: `cluster.node_lost_grace`.
pub fn spawn(
    cluster: &Cluster,
    node_lost_grace: Duration,
    stop: watch::Receiver<bool>,
) -> watch::Receiver<Arc<ClusterNodes>> {
    let (tx, rx) = watch::channel(Arc::default());
    let cluster = cluster.clone();
    tokio::spawn(async move { follow(cluster, node_lost_grace, tx, stop).await });
    rx
}

async fn follow(
    cluster: Cluster,
    node_lost_grace: Duration,
    tx: watch::Sender<Arc<ClusterNodes>>,
    mut stop: watch::Receiver<bool>,
) {
    let client = cluster.watch_client().clone();
    let (nodes, nodes_w) = reflector::store::<Node>();
    let (pods, pods_w) = reflector::store::<Pod>();
    let (leases, leases_w) = reflector::store::<Lease>();
    let (kubelet_leases, kubelet_leases_w) = reflector::store::<Lease>();
    let agents_w = reflector::store::Writer::<DynamicObject>::new(super::agent_node_resource());
    let agents = agents_w.as_reader();
    let config = watcher::Config::default;
    let node_events =
        reflector::reflector(nodes_w, watcher(Api::<Node>::all(client.clone()), config()))
            .default_backoff()
            .map(|e| (false, e.map(|_| ())));
    // Only the pods that are not agentd's: the core counts its own from their placements, and
    // a burst of gangs must not be held here twice nor recount every node per pod event.
    let others_only = config().labels(&format!("!{LABEL_JOB}"));
    let pod_events = reflector::reflector(
        pods_w,
        watcher(Api::<Pod>::all(client.clone()), others_only),
    )
    .default_backoff()
    .map(|e| (false, e.map(|_| ())));
    let lease_events = reflector::reflector(
        leases_w,
        watcher(
            Api::<Lease>::namespaced(client.clone(), &cluster.namespace),
            config(),
        ),
    )
    .default_backoff()
    .map(|e| (false, e.map(|_| ())));
    let kubelet_lease_events = reflector::reflector(
        kubelet_leases_w,
        watcher(
            Api::<Lease>::namespaced(client.clone(), KUBELET_LEASE_NAMESPACE),
            config(),
        ),
    )
    .default_backoff()
    .map(|e| (true, e.map(|_| ())));
    let agent_events =
        reflector::reflector(agents_w, watcher(cluster.agent_nodes_watch_api(), config()))
            .default_backoff()
            .map(|e| (false, e.map(|_| ())));
    let mut events = std::pin::pin!(futures::stream::select_all([
        node_events.boxed(),
        pod_events.boxed(),
        lease_events.boxed(),
        kubelet_lease_events.boxed(),
        agent_events.boxed(),
    ]));
    let mut failures = Failures::default();
    let mut kubelets = KubeletWatch::default();
    // When the next silent node reaches the grace, if one will.
    let mut recheck: Option<tokio::time::Instant> = None;
    let mut last_computed: Option<tokio::time::Instant> = None;
    loop {
        let at = recheck;
        let at_recheck = async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            next = events.next() => next,
            () = at_recheck => Some((false, Ok(()))),
            _ = stop.wait_for(|s| *s) => return,
        };
        // A kubelet's renewal changes no node's capacity: it counts only once a node nears its
        // lost grace (tens of seconds), so batches of nothing else are computed at most once
        // per KUBELET_SETTLE. A thousand kubelets renew 100 Leases a second.
        let mut only_kubelets = matches!(next, Some((true, _)));
        let next = next.map(|(kubelet, event)| {
            if kubelet {
                kubelets.heard(event.is_ok());
            }
            event
        });
        match next {
            None => return,
            Some(Err(e)) => {
                failures.failed(&cluster, &e);
                continue;
            }
            Some(Ok(())) => failures.heard(),
        }
        // Let the rest of a burst arrive, then compute once.
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                () = &mut settle => break,
                more = events.next() => match more {
                    None => return,
                    Some((true, event)) => kubelets.heard(event.is_ok()),
                    // A watch that fails while the others deliver is said too.
                    Some((false, Err(e))) => failures.failed(&cluster, &e),
                    Some((false, Ok(()))) => {
                        only_kubelets = false;
                        failures.heard();
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
        // Not the kubelets' Leases: without them (a role that may not read kube-node-lease)
        // a node is judged by its Ready condition alone.
        if !(ready(&nodes) && ready(&pods) && ready(&leases) && ready(&agents)) {
            continue;
        }
        if let Some(due) = last_computed.map(|at| at + KUBELET_SETTLE)
            && only_kubelets
            && tokio::time::Instant::now() < due
        {
            recheck = Some(recheck.map_or(due, |at| at.min(due)));
            continue;
        }
        last_computed = Some(tokio::time::Instant::now());
        let kubelet_leases = kubelets.judged(&kubelet_leases);
        let leases = Leases {
            agents: &leases,
            kubelets: kubelet_leases,
        };
        let (mut computed, next) =
            compute(&cluster, node_lost_grace, &nodes, &pods, &leases, &agents);
        recheck = next.map(|d| tokio::time::Instant::now() + d + RECHECK_MARGIN);
        tx.send_if_modified(|published| {
            // A node stays lost with the words it was lost with (its age would change them
            // every time).
            for lost in &mut computed.lost {
                if let Some(was) = published.lost.iter().find(|l| l.name == lost.name) {
                    lost.message.clone_from(&was.message);
                }
            }
            if **published == computed {
                return false;
            }
            *published = Arc::new(computed);
            true
        });
    }
}

/// The feed's watches failing: said once until one of them delivers again (each retry is
/// logged by the watcher itself), and every error counted.
#[derive(Default)]
struct Failures {
    said: bool,
}

impl Failures {
    fn failed(&mut self, cluster: &Cluster, e: &watcher::Error) {
        if !self.said {
            tracing::warn!(
                "watching the cluster's nodes and pods failed ({e}); retrying with backoff"
            );
            self.said = true;
        }
        cluster.count_watch_error(e);
    }

    fn heard(&mut self) {
        self.said = false;
    }
}

/// Past a silent node's grace before it is judged again: the timestamps are whole seconds.
const RECHECK_MARGIN: Duration = Duration::from_millis(200);

/// The Leases the nodes are judged by.
struct Leases<'a> {
    agents: &'a Store<Lease>,
    /// As [`KubeletWatch::judged`] gives them.
    kubelets: Vec<Lease>,
}

/// How the kubelets' Leases are read: renewed when this agent saw `renewTime` change, by its own
/// clock (so a node whose clock lags is not taken for silent, as the node lifecycle controller
/// does it), and only while their watch is sound: a watch that fails (a role that may not read
/// `kube-node-lease`, say) or has heard nothing for a Lease's length leaves the store as it was
/// last, which would make every node look silent. Nodes are then judged by `Ready` alone.
#[derive(Default)]
struct KubeletWatch {
    /// Whether the last event of the watch was not an error.
    sound: bool,
    /// When the watch last delivered anything.
    heard: Option<tokio::time::Instant>,
    /// By Lease name: the `renewTime` last seen, and when this agent saw it first.
    renewals: BTreeMap<String, (String, Timestamp)>,
}

impl KubeletWatch {
    fn heard(&mut self, ok: bool) {
        self.sound = ok;
        if ok {
            self.heard = Some(tokio::time::Instant::now());
        }
    }

    /// The Leases to judge nodes by, each renewed when it was seen renewed; none while the
    /// watch is not sound.
    fn judged(&mut self, store: &Store<Lease>) -> Vec<Lease> {
        let fresh = self
            .heard
            .is_some_and(|at| at.elapsed() <= super::capacity::KUBELET_LEASE);
        if !self.sound || !fresh || !ready(store) {
            return Vec::new();
        }
        let now = Timestamp::now();
        let mut renewals = BTreeMap::new();
        let leases = store
            .state()
            .iter()
            .filter_map(|lease| {
                let name = lease.metadata.name.clone()?;
                let renewed = lease.spec.as_ref()?.renew_time.as_ref()?;
                let text = renewed.0.to_string();
                let seen = match self.renewals.remove(&name) {
                    Some((was, seen)) if was == text => seen,
                    _ => now,
                };
                renewals.insert(name, (text, seen));
                let mut lease = Lease::clone(lease);
                if let Some(spec) = lease.spec.as_mut() {
                    spec.renew_time = Some(
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(seen),
                    );
                }
                Some(lease)
            })
            .collect();
        self.renewals = renewals;
        leases
    }
}

/// Whether a store has had its first list.
fn ready<K>(store: &Store<K>) -> bool
where
    K: reflector::Lookup + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    futures::FutureExt::now_or_never(store.wait_until_ready()).is_some_and(|r| r.is_ok())
}

fn compute(
    cluster: &Cluster,
    node_lost_grace: Duration,
    nodes: &Store<Node>,
    pods: &Store<Pod>,
    leases: &Leases<'_>,
    agents: &Store<DynamicObject>,
) -> (ClusterNodes, Option<Duration>) {
    let nodes: Vec<Node> = nodes.state().iter().map(|n| Node::clone(n)).collect();
    let pods = others(pods.state().iter().map(AsRef::as_ref));
    let kubelet_leases = &leases.kubelets;
    let leases: Vec<Lease> = leases
        .agents
        .state()
        .iter()
        .map(|l| Lease::clone(l))
        .collect();
    let agents: BTreeMap<String, AgentNodeStatus> = agents
        .state()
        .iter()
        .filter_map(|a| {
            let status = serde_json::from_value(a.data.get("status")?.clone()).ok()?;
            Some((a.metadata.name.clone()?, status))
        })
        .collect();
    cluster_nodes(&ClusterObjects {
        nodes: &nodes,
        pods: &pods,
        agents: &agents,
        leases: &leases,
        kubelet_leases,
        now: Timestamp::now(),
        lease_interval: cluster.interval,
        node_lost_grace,
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::cluster::capacity::tests::{NOW, agent, container, fresh_lease, node, pod};

    /// Three nodes of 8 GPUs: one with two GPUs taken by someone else's pod and one GPU
    /// unhealthy, one cordoned, one whose agentd pod (a gang the core counts itself) is not
    /// counted again.
    #[test]
    fn nodes_for_placement_count_what_others_hold_and_close_what_takes_nothing() {
        let mut cordoned = node("gpu-2", "64", "512Gi", "8");
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        let mut ours = pod(
            "gpu-3",
            "Running",
            vec![container(("", "", "8"), ("", "", "8"))],
        );
        ours.metadata = ObjectMeta {
            labels: Some(BTreeMap::from([(LABEL_JOB.to_owned(), "wide".to_owned())])),
            ..ObjectMeta::default()
        };
        let nodes = [
            node("gpu-1", "64", "512Gi", "8"),
            cordoned,
            node("gpu-3", "64", "512Gi", "8"),
        ];
        let pods = [
            pod(
                "gpu-1",
                "Running",
                vec![container(("4", "16Gi", "2"), ("", "", "2"))],
            ),
            ours,
        ];
        let mut health = vec![true; 8];
        health[7] = false;
        let agents = BTreeMap::from([
            ("gpu-1".to_owned(), agent(&health)),
            ("gpu-2".to_owned(), agent(&[true; 8])),
            ("gpu-3".to_owned(), agent(&[true; 8])),
        ]);
        let leases: Vec<Lease> = ["gpu-1", "gpu-2", "gpu-3"].map(fresh_lease).to_vec();
        let pods = others(&pods);
        let placed = placement_nodes(&ClusterObjects {
            nodes: &nodes,
            pods: &pods,
            agents: &agents,
            leases: &leases,
            kubelet_leases: &[],
            now: NOW.parse().unwrap(),
            lease_interval: Duration::from_secs(10),
            node_lost_grace: Duration::from_secs(40),
        });
        let seen: Vec<(&str, usize, u64, u64, bool)> = placed
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.gpus.len(),
                    n.cpu_milli,
                    n.memory_mib,
                    n.schedulable,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("gpu-1", 5, 60_000, 496 * 1024, true),
                ("gpu-2", 8, 64_000, 512 * 1024, false),
                ("gpu-3", 8, 64_000, 512 * 1024, true),
            ]
        );
        assert_eq!(placed[0].gpus[0].product, "NVIDIA H200");
        assert_eq!(placed[0].labels["kubernetes.io/hostname"], "gpu-1");
    }

    /// A kubelet Lease is renewed when this agent sees its `renewTime` change, by this agent's
    /// clock: a node whose clock lags by an hour is not silent; and a watch that failed, or
    /// has heard nothing for a Lease's length, judges no node by its Leases.
    #[tokio::test]
    async fn kubelet_leases_are_renewed_as_seen_and_not_judged_from_a_failed_watch() {
        let (store, mut writer) = reflector::store::<Lease>();
        writer.apply_watcher_event(&watcher::Event::Init);
        // Written by a node whose clock is an hour behind.
        writer.apply_watcher_event(&watcher::Event::InitApply(
            crate::cluster::view::tests::lease(
                "gpu-1",
                "2026-01-01T00:00:00Z".parse().unwrap(),
                40,
            ),
        ));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let renewed = |leases: &[Lease]| {
            leases[0]
                .spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .map(|t| t.0)
                .expect("renewed")
        };
        let mut watch = KubeletWatch::default();
        assert!(watch.judged(&store).is_empty(), "nothing heard yet");
        watch.heard(true);
        let before = Timestamp::now();
        let first = renewed(&watch.judged(&store));
        assert!(first >= before, "seen renewed now, not an hour ago");
        assert_eq!(renewed(&watch.judged(&store)), first, "unchanged: the same");
        writer.apply_watcher_event(&watcher::Event::Apply(crate::cluster::view::tests::lease(
            "gpu-1",
            "2026-01-01T00:00:10Z".parse().unwrap(),
            40,
        )));
        let second = renewed(&watch.judged(&store));
        assert!(second > first, "renewed again when renewTime changed");
        watch.heard(false);
        assert!(
            watch.judged(&store).is_empty(),
            "a failed watch judges nothing"
        );
        watch.heard(true);
        assert_eq!(watch.judged(&store).len(), 1);
    }
}
