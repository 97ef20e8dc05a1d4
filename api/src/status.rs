//! `GET /v1/status`: the one-screen summary of an agent and its node.

use serde::{Deserialize, Serialize};

use crate::inventory::NodeInventory;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent: AgentInfo,
    pub node: NodeInventory,
    /// Cluster mode only: the API server and whether the agent reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::nodes::ClusterStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    /// `standalone` or `cluster`.
    pub mode: String,
    pub pid: u32,
    /// Start time, seconds since the Unix epoch.
    pub started_at: u64,
    pub uptime_seconds: u64,
    pub state_dir: String,
    pub socket: String,
}
