//! Wire types shared by `agentd`, `agentctl` and the tests, and the client that speaks to the
//! agent's Unix socket. Everything that crosses the socket is defined here once; nothing here
//! knows how the daemon computes it.

pub mod client;
pub mod error;
pub mod history;
pub mod inventory;
pub mod jobs;
pub mod nodes;
pub mod status;
pub mod templates;
pub mod tokens;

pub use client::{Client, ClientCertificate, ClientError};
pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use inventory::{CpuInfo, DiskInfo, GpuDriver, GpuInfo, MemoryInfo, NodeInventory};
pub use jobs::Owner;
pub use nodes::{AgentPresence, AgentState, ClusterStatus, NodeGpus, NodeList, NodeSummary};
pub use status::{AgentInfo, Status};

/// The API version prefix every route lives under.
pub const API_PREFIX: &str = "/v1";

/// Where the daemon listens and `agentctl` looks unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/agentd/agentd.sock";

/// The environment variable both binaries read for the socket path.
pub const SOCKET_ENV: &str = "AGENTD_SOCKET";
