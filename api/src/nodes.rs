//! `GET /v1/nodes` and `POST /v1/nodes/{name}/drain|resume`: the cluster as this agent sees it.
//! In standalone mode the list holds this one machine.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<NodeSummary>,
    /// Set when this agent may not read Nodes (the `agentd-node` role): the list then holds the
    /// nodes whose agents registered (their `AgentNode`s and Leases), `ready` is `Unknown` and
    /// `schedulable` is unknown unless the node is drained. The sentence says so for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<String>,
}

/// One node: what it has, whether Kubernetes and agentd think it can take work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub name: String,
    pub gpus: NodeGpus,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    /// The kubelet's `Ready` condition: `True`, `False` or `Unknown` (always `True` standalone).
    pub ready: String,
    /// False when the node is cordoned or drained: nothing new is placed on it. `None`
    /// (`null`) when this agent cannot see the Node's cordon (see [`NodeList::partial`]).
    pub schedulable: Option<bool>,
    /// True when `agentctl drain` drained it (`agentd.io/drain=true` in cluster mode; where the
    /// agent may not read Nodes, the drain recorded in the node's `AgentNode`).
    #[serde(default)]
    pub drained: bool,
    pub agent: AgentPresence,
    /// Its NoSchedule and NoExecute taints (`key=value:Effect`): only replicas whose templates
    /// tolerate them go there. Empty standalone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeGpus {
    pub total: u32,
    pub healthy: u32,
    /// The first GPU's product name, e.g. `NVIDIA H200`; empty without GPUs.
    pub product: String,
}

/// Whether an agent runs on the node, judged by the age of its heartbeat Lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPresence {
    pub state: AgentState,
    /// Seconds since the agent last renewed its Lease; `None` where no agent ever ran.
    pub age_seconds: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Renewed within the last four lease intervals.
    Fresh,
    /// Not renewed for four intervals or more: the agent is down, hung or cut off.
    Stale,
    /// No agent has ever registered on this node.
    None,
}

impl AgentState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Fresh => "fresh",
            AgentState::Stale => "stale",
            AgentState::None => "none",
        }
    }
}

/// `agentctl status`'s cluster part: where the API server is and whether the agent reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The API server's address, e.g. `https://10.0.0.1:6443`.
    pub server: String,
    pub namespace: String,
    pub reachable: bool,
    /// What went wrong with the last request, while not reachable or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The elected leader (the `agentd-leader` Lease's holder), once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Whether this agent is the elected leader.
    #[serde(default)]
    pub leading: bool,
}
