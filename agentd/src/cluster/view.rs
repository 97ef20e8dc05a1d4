//! `GET /v1/nodes` in cluster mode: every Node with what its agent published and how fresh its
//! heartbeat Lease is, or, for an agent whose role may not read Nodes, every node whose agent
//! registered. Pure: the caller lists the objects and passes the time.

use std::collections::BTreeMap;
use std::time::Duration;

use agentd_api::{AgentPresence, AgentState, NodeGpus, NodeList, NodeSummary};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;

use super::inventory::{AgentNodeStatus, LABEL_DRAIN};

const LEASE_PREFIX: &str = "agentd-node-";

/// A node agent's heartbeat Lease is named after its node.
pub fn lease_name(node: &str) -> String {
    format!("{LEASE_PREFIX}{node}")
}

/// How many lease intervals without a renewal make an agent stale.
pub const STALE_INTERVALS: u32 = 4;

/// Builds the node list. `agents` maps node names to their `AgentNode` status; `interval` is
/// the lease interval used where a Lease does not say its own duration.
pub fn node_list(
    nodes: &[Node],
    leases: &[Lease],
    agents: &BTreeMap<String, AgentNodeStatus>,
    now: Timestamp,
    interval: Duration,
) -> NodeList {
    let leases: BTreeMap<&str, &Lease> = leases
        .iter()
        .filter_map(|l| l.metadata.name.as_deref().map(|n| (n, l)))
        .collect();
    let mut list: Vec<NodeSummary> = nodes
        .iter()
        .filter_map(|node| {
            let name = node.metadata.name.clone()?;
            let lease = leases.get(lease_name(&name).as_str()).copied();
            Some(summary(
                node,
                name.clone(),
                agents.get(&name),
                lease,
                now,
                interval,
            ))
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    NodeList {
        nodes: list,
        partial: None,
    }
}

/// What an agent recorded about its node in its `AgentNode`: the published status (absent until
/// the first write) and a drain asked for with `agentctl drain` (absent when never asked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentRecord {
    pub status: Option<AgentNodeStatus>,
    pub drain: Option<bool>,
}

/// The sentence an agent-only list carries (see [`NodeList::partial`]).
pub const PARTIAL: &str = "this agent's role may not read Nodes: listed from the agents' AgentNodes and Leases, so READY and SCHEDULABLE are unknown (a drain shows) and nodes without an agent are not listed";

/// The node list of an agent that may not read Nodes: every node with an `AgentNode` or an
/// agent Lease, what its agent published, its heartbeat, and its recorded drain. Readiness and
/// cordons live on the Node, so `ready` is `Unknown` and `schedulable` is unknown unless drained.
pub fn agent_list(
    leases: &[Lease],
    agents: &BTreeMap<String, AgentRecord>,
    now: Timestamp,
    interval: Duration,
) -> NodeList {
    let mut by_node: BTreeMap<&str, (Option<&AgentRecord>, Option<&Lease>)> = BTreeMap::new();
    for (name, record) in agents {
        by_node.entry(name).or_default().0 = Some(record);
    }
    for lease in leases {
        let node = lease
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.strip_prefix(LEASE_PREFIX));
        if let Some(node) = node.filter(|n| !n.is_empty()) {
            by_node.entry(node).or_default().1 = Some(lease);
        }
    }
    let nodes = by_node
        .into_iter()
        .map(|(name, (record, lease))| {
            let status = record.and_then(|r| r.status.as_ref());
            let drained = record.and_then(|r| r.drain) == Some(true);
            NodeSummary {
                name: name.to_owned(),
                gpus: NodeGpus {
                    total: status.map_or(0, |s| s.gpu_count),
                    healthy: status.map_or(0, |s| s.healthy_gpu_count),
                    product: status.map(|s| s.gpu_product.clone()).unwrap_or_default(),
                },
                cpu_cores: status.map_or(0, |s| s.cpu_cores),
                memory_bytes: status.map_or(0, |s| s.memory_bytes),
                ready: "Unknown".to_owned(),
                schedulable: drained.then_some(false),
                drained,
                agent: presence(lease, now, interval),
                taints: Vec::new(),
            }
        })
        .collect();
    NodeList {
        nodes,
        partial: Some(PARTIAL.to_owned()),
    }
}

fn summary(
    node: &Node,
    name: String,
    agent: Option<&AgentNodeStatus>,
    lease: Option<&Lease>,
    now: Timestamp,
    interval: Duration,
) -> NodeSummary {
    let status = node.status.as_ref();
    let capacity = |key: &str| {
        status
            .and_then(|s| s.capacity.as_ref())
            .and_then(|c| c.get(key))
            .map(|q| q.0.clone())
    };
    let gpus = if let Some(a) = agent {
        NodeGpus {
            total: a.gpu_count,
            healthy: a.healthy_gpu_count,
            product: a.gpu_product.clone(),
        }
    } else {
        let total = capacity("nvidia.com/gpu")
            .and_then(|q| crate::job::parse_gpu_count(&q).ok())
            .unwrap_or(0);
        NodeGpus {
            total,
            healthy: total,
            product: String::new(),
        }
    };
    let cpu_cores = agent.map_or_else(
        || {
            capacity("cpu")
                .and_then(|q| crate::job::parse_cpu_milli(&q).ok())
                .map_or(0, |m| (m / 1000) as u32)
        },
        |a| a.cpu_cores,
    );
    let memory_bytes = agent.map_or_else(
        || {
            capacity("memory")
                .and_then(|q| crate::job::parse_memory_bytes(&q).ok())
                .unwrap_or(0)
        },
        |a| a.memory_bytes,
    );
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map_or_else(|| "Unknown".to_owned(), |c| c.status.clone());
    let drained = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_DRAIN))
        .is_some_and(|v| v == "true");
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    NodeSummary {
        name,
        gpus,
        cpu_cores,
        memory_bytes,
        ready,
        schedulable: Some(!cordoned && !drained),
        drained,
        agent: presence(lease, now, interval),
        taints: node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .into_iter()
            .flatten()
            .filter(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute"))
            .map(|t| match t.value.as_deref().filter(|v| !v.is_empty()) {
                Some(v) => format!("{}={v}:{}", t.key, t.effect),
                None => format!("{}:{}", t.key, t.effect),
            })
            .collect(),
    }
}

/// Fresh, stale or none, from the Lease's last renewal.
pub fn presence(lease: Option<&Lease>, now: Timestamp, interval: Duration) -> AgentPresence {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return AgentPresence {
            state: AgentState::None,
            age_seconds: None,
        };
    };
    let Some(renewed) = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0)
    else {
        return AgentPresence {
            state: AgentState::None,
            age_seconds: None,
        };
    };
    let age = now
        .duration_since(renewed)
        .try_into()
        .unwrap_or(Duration::ZERO);
    let stale_after = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .filter(|s| *s > 0)
        .map_or(interval * STALE_INTERVALS, Duration::from_secs);
    AgentPresence {
        state: if age >= stale_after {
            AgentState::Stale
        } else {
            AgentState::Fresh
        },
        age_seconds: Some(age.as_secs()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

    use super::*;

    fn node(name: &str, ready: &str, labels: &[(&str, &str)], unschedulable: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(unschedulable),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                capacity: Some(BTreeMap::from([
                    ("cpu".to_owned(), Quantity("8".into())),
                    ("memory".to_owned(), Quantity("1Gi".into())),
                    ("nvidia.com/gpu".to_owned(), Quantity("4".into())),
                ])),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
        }
    }

    /// The heartbeat Lease of `node`'s agent, renewed at `renewed` for `seconds`.
    pub(crate) fn lease(node: &str, renewed: Timestamp, seconds: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(lease_name(node)),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.into()),
                lease_duration_seconds: Some(seconds),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn fresh_stale_and_none_by_lease_age() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let nodes = [
            node("a", "True", &[], false),
            node("b", "True", &[], false),
            node("c", "Unknown", &[], false),
        ];
        let leases = [
            lease("a", "2026-01-01T00:00:55Z".parse().unwrap(), 40),
            lease("b", "2026-01-01T00:00:20Z".parse().unwrap(), 40),
        ];
        let list = node_list(
            &nodes,
            &leases,
            &BTreeMap::new(),
            now,
            Duration::from_secs(10),
        );
        let by: Vec<(AgentState, Option<u64>)> = list
            .nodes
            .iter()
            .map(|n| (n.agent.state, n.agent.age_seconds))
            .collect();
        assert_eq!(
            by,
            [
                (AgentState::Fresh, Some(5)),
                (AgentState::Stale, Some(40)),
                (AgentState::None, None)
            ]
        );
        assert_eq!(list.nodes[2].ready, "Unknown");
    }

    #[test]
    fn capacity_from_the_node_when_no_agent_published() {
        let list = node_list(
            &[node("a", "True", &[], false)],
            &[],
            &BTreeMap::new(),
            Timestamp::UNIX_EPOCH,
            Duration::from_secs(10),
        );
        let a = &list.nodes[0];
        assert_eq!((a.gpus.total, a.cpu_cores, a.memory_bytes), (4, 8, 1 << 30));
    }

    #[test]
    fn cordon_and_drain_make_a_node_unschedulable() {
        let list = node_list(
            &[
                node("a", "True", &[], true),
                node("b", "True", &[(LABEL_DRAIN, "true")], false),
                node("c", "True", &[(LABEL_DRAIN, "false")], false),
            ],
            &[],
            &BTreeMap::new(),
            Timestamp::UNIX_EPOCH,
            Duration::from_secs(10),
        );
        let s: Vec<(Option<bool>, bool)> = list
            .nodes
            .iter()
            .map(|n| (n.schedulable, n.drained))
            .collect();
        assert_eq!(
            s,
            [
                (Some(false), false),
                (Some(false), true),
                (Some(true), false)
            ]
        );
        assert_eq!(list.partial, None);
    }

    fn status(gpus: u32, healthy: u32) -> AgentNodeStatus {
        AgentNodeStatus {
            gpu_count: gpus,
            healthy_gpu_count: healthy,
            gpu_product: "NVIDIA H200".into(),
            agent_version: "0.1.0".into(),
            cpu_cores: 16,
            memory_bytes: 1 << 30,
            disks: Vec::new(),
            driver_version: None,
            cuda_version: None,
            gpus: Vec::new(),
        }
    }

    #[test]
    fn without_nodes_the_agents_records_and_leases_make_the_list() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let agents = BTreeMap::from([
            (
                "a".to_owned(),
                AgentRecord {
                    status: Some(status(4, 3)),
                    drain: None,
                },
            ),
            (
                "b".to_owned(),
                AgentRecord {
                    status: Some(status(2, 2)),
                    drain: Some(true),
                },
            ),
            (
                "c".to_owned(),
                AgentRecord {
                    status: None,
                    drain: Some(false),
                },
            ),
        ]);
        let mut leader = lease("x", "2026-01-01T00:00:59Z".parse().unwrap(), 40);
        leader.metadata.name = Some("agentd-leader".into());
        let leases = [
            lease("a", "2026-01-01T00:00:55Z".parse().unwrap(), 40),
            lease("b", "2026-01-01T00:00:10Z".parse().unwrap(), 40),
            lease("d", "2026-01-01T00:00:58Z".parse().unwrap(), 40),
            leader,
        ];
        let list = agent_list(&leases, &agents, now, Duration::from_secs(10));
        let rows: Vec<_> = list
            .nodes
            .iter()
            .map(|n| {
                (
                    n.name.as_str(),
                    n.gpus.healthy,
                    n.gpus.total,
                    n.ready.as_str(),
                    n.schedulable,
                    n.drained,
                    n.agent.state,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("a", 3, 4, "Unknown", None, false, AgentState::Fresh),
                ("b", 2, 2, "Unknown", Some(false), true, AgentState::Stale),
                ("c", 0, 0, "Unknown", None, false, AgentState::None),
                ("d", 0, 0, "Unknown", None, false, AgentState::Fresh),
            ]
        );
        assert_eq!(list.partial.as_deref(), Some(PARTIAL));
    }
}
