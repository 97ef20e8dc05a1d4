//! The gang scheduler core. Pure: it takes a snapshot of nodes, running gangs and queued gangs
//! plus the time, and returns placements and, for every gang it does not place, a reason a person
//! can act on. It does no I/O and reads no clock, so the running agent, `agentd replay` and the
//! tests all drive exactly the same code. [`schedule`] is the full pass, which keeps no state
//! between passes; [`Scheduler`] runs the same pass over state it keeps between passes, so a
//! deep queue costs little, and must decide exactly as [`schedule`] does.

use std::collections::BTreeMap;

#[cfg(test)]
mod equivalence;
mod estimate;
mod explain;
mod free;
mod incremental;
mod pass;
mod policy;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use estimate::{
    ESTIMATE_MIN_SAMPLES, ESTIMATE_QUANTILE, ESTIMATE_WINDOW, Estimate, EstimateError,
    RuntimeEstimator, planned_end,
};
pub use explain::never_fits;
pub use free::MAX_GPUS_PER_NODE;
pub use incremental::Scheduler;
pub use pass::schedule;
pub use policy::{Backfill, ESTIMATED_RESERVATIONS, Fit, Order, Policy, ReleaseOrder, SchedError};

/// The `reason` classes of [`Waiting`].
pub mod reason {
    /// No room now; the message says what it needs and what is free.
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// The gang can never fit this cluster, even empty; the message says why.
    pub const NEVER_FITS: &str = "NeverFits";
    /// Its queue is at `max_running_jobs` or `max_gpus`.
    pub const QUEUE_LIMIT: &str = "QueueLimit";
    /// It fits now, but starting it would delay the gang that holds the reservation.
    pub const RESERVED: &str = "Reserved";
    /// It fits now, but a strict-FIFO policy keeps it behind the blocked head.
    pub const BLOCKED: &str = "Blocked";
}

/// What one replica asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    pub gpus: u32,
    pub cpu_milli: u64,
    pub memory_mib: u64,
}

/// One GPU of a node, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSlot {
    pub index: u32,
    pub uuid: String,
    pub product: String,
    pub memory_mib: u64,
    pub healthy: bool,
}

/// A node and its total capacity. What is already allocated comes separately, in
/// [`Snapshot::running`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub gpus: Vec<GpuSlot>,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    /// False when the node is drained, not ready or lost: nothing new is placed on it.
    pub schedulable: bool,
}

/// One replica of a gang: its name (`worker-3`), what it asks for, where it may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRequest {
    pub name: String,
    pub resources: Resources,
    /// Node labels that must match exactly (a pod template's `nodeSelector`).
    pub node_selector: BTreeMap<String, String>,
}

/// A job waiting to be placed: all of its replicas go at once or none do.
#[derive(Debug, Clone, PartialEq)]
pub struct Gang {
    pub id: String,
    pub queue: String,
    pub priority: i32,
    /// Submit time, seconds (wall clock in the agent, virtual in replay).
    pub submitted_at: f64,
    pub replicas: Vec<ReplicaRequest>,
    /// How many replicas must be placed together; `None` means all of them.
    pub min_available: Option<u32>,
    /// The run time the user declared (`activeDeadlineSeconds`), used only to plan reservations
    /// and backfill; never the true run time.
    pub declared_runtime_s: Option<f64>,
}

/// Where one replica goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub replica: String,
    pub node: String,
    pub gpu_indices: Vec<u32>,
    pub resources: Resources,
}

/// A gang that holds resources now (running, starting or restarting in place).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningGang {
    pub id: String,
    pub queue: String,
    pub assignments: Vec<Assignment>,
    /// When it is expected to end at the latest (start + declared run time), if declared.
    pub expected_end: Option<f64>,
}

/// A named queue and its limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub name: String,
    pub priority: i32,
    pub max_running_jobs: Option<u32>,
    pub max_gpus: Option<u32>,
}

/// A placement decided in this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub gang: String,
    pub assignments: Vec<Assignment>,
}

/// A gang left waiting, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub gang: String,
    /// Short machine-readable class, e.g. `Unschedulable`, `QueueLimit`, `Reserved`.
    pub reason: String,
    /// A sentence a person can act on.
    pub message: String,
}

/// Everything one pass looks at.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    pub now: f64,
    pub nodes: &'a [NodeCapacity],
    pub running: &'a [RunningGang],
    /// Queued gangs in any order; the scheduler orders them.
    pub queued: &'a [Gang],
    pub queues: &'a [QueueConfig],
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    pub placements: Vec<Placement>,
    pub waiting: Vec<Waiting>,
    /// How many gangs wait for each reason (see [`reason`]); filled even when the policy does
    /// not list them one by one.
    pub waiting_counts: BTreeMap<&'static str, usize>,
    /// The resources held for blocked gangs, the head of the order first, if the policy
    /// reserves and they could be planned (at most [`Policy::reservations`]).
    pub reservations: Vec<Reservation>,
}

/// Resources held for a blocked gang: where it will go, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub gang: String,
    /// When the gang can start at the latest, from the running gangs' declared ends; `None`
    /// when it waits on a gang that declared no run time.
    pub start_at: Option<f64>,
    /// Running gangs whose end it waits for.
    pub after: Vec<String>,
    pub assignments: Vec<Assignment>,
}
