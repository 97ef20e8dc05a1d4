//! The gang scheduler core. Pure: it takes a snapshot of nodes, running gangs and queued gangs
//! plus the time, and returns placements and, for every gang it does not place, a reason a person
//! can act on. It does no I/O and reads no clock, so the running agent, `agentd replay` and the
//! tests all drive exactly the same code. [`schedule`] is the full pass, which keeps no state
//! between passes; [`Scheduler`] runs the same pass over state it keeps between passes, so a
//! deep queue costs little, and must decide exactly as [`schedule`] does.

use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// Its taints that keep replicas off (NoSchedule, NoExecute): only a replica whose
    /// [`NodeRule`] tolerates each of them may go here.
    pub taints: Vec<Taint>,
}

/// A node's taint (`spec.taints`), of an effect that keeps new replicas off.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Taint {
    pub key: String,
    /// Empty when the taint has none.
    pub value: String,
    pub effect: TaintEffect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TaintEffect {
    NoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

impl std::fmt::Display for Taint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.key, self.effect.as_str())
        } else {
            write!(f, "{}={}:{}", self.key, self.value, self.effect.as_str())
        }
    }
}

/// Which taints a replica tolerates (a pod template's `tolerations`), with Kubernetes' rule:
/// an empty key with `Exists` matches every key, `Exists` any value, `Equal` the same value;
/// no effect matches every effect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Toleration {
    /// Empty: every key (only with `exists`).
    pub key: String,
    /// `operator: Exists`; otherwise `Equal`, which needs the same value.
    pub exists: bool,
    pub value: String,
    /// `None`: every effect.
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    pub fn tolerates(&self, taint: &Taint) -> bool {
        self.effect.is_none_or(|e| e == taint.effect)
            && (self.key.is_empty() || self.key == taint.key)
            && (self.exists || self.value == taint.value)
    }
}

/// One requirement of a required node-affinity term.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// A label's key, or with [`Requirement::field`] the node's `metadata.name`.
    pub key: String,
    /// From `matchFields` (the node's name) rather than `matchExpressions` (its labels).
    pub field: bool,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// Kubernetes' node selector operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

impl Operator {
    pub const NAMES: [&'static str; 6] = ["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "In" => Self::In,
            "NotIn" => Self::NotIn,
            "Exists" => Self::Exists,
            "DoesNotExist" => Self::DoesNotExist,
            "Gt" => Self::Gt,
            "Lt" => Self::Lt,
            _ => return None,
        })
    }
}

impl Requirement {
    fn holds(&self, node: &NodeCapacity) -> bool {
        let have = if self.field {
            (self.key == "metadata.name").then_some(node.name.as_str())
        } else {
            node.labels.get(&self.key).map(String::as_str)
        };
        let number = |v: &str| v.parse::<i64>().ok();
        match self.operator {
            Operator::In => have.is_some_and(|h| self.values.iter().any(|v| v == h)),
            Operator::NotIn => have.is_none_or(|h| self.values.iter().all(|v| v != h)),
            Operator::Exists => have.is_some(),
            Operator::DoesNotExist => have.is_none(),
            Operator::Gt | Operator::Lt => {
                let (Some(h), Some(v)) = (
                    have.and_then(number),
                    self.values.first().and_then(|v| number(v)),
                ) else {
                    return false;
                };
                if self.operator == Operator::Gt {
                    h > v
                } else {
                    h < v
                }
            }
        }
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = &self.key;
        match self.operator {
            Operator::Exists => write!(f, "{key} exists"),
            Operator::DoesNotExist => write!(f, "{key} does not exist"),
            Operator::Gt => write!(f, "{key} > {}", self.values.join(",")),
            Operator::Lt => write!(f, "{key} < {}", self.values.join(",")),
            Operator::In if self.values.len() == 1 => write!(f, "{key}={}", self.values[0]),
            Operator::In => write!(f, "{key} in ({})", self.values.join(",")),
            Operator::NotIn => write!(f, "{key} not in ({})", self.values.join(",")),
        }
    }
}

/// Where a replica may go besides what it needs: a pod template's `nodeSelector`, its
/// required node affinity and its tolerations. The default rule admits every untainted node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeRule {
    /// Node labels that must match exactly (`nodeSelector`).
    pub selector: BTreeMap<String, String>,
    /// Required node affinity: a node must meet every requirement of at least one term (an
    /// empty term, as in Kubernetes, matches no node). Empty: no affinity.
    pub affinity: Vec<Vec<Requirement>>,
    pub tolerations: Vec<Toleration>,
}

impl NodeRule {
    /// Whether a replica under this rule may go to `node` (its capacity aside).
    pub fn admits(&self, node: &NodeCapacity) -> bool {
        self.labels_match(node) && self.affinity_holds(node) && self.tolerates(node)
    }

    /// Whether the node carries every label of the selector.
    pub fn labels_match(&self, node: &NodeCapacity) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| node.labels.get(k).is_some_and(|have| have == v))
    }

    /// Whether the node meets the required node affinity (always, with none).
    pub fn affinity_holds(&self, node: &NodeCapacity) -> bool {
        self.affinity.is_empty()
            || self
                .affinity
                .iter()
                .any(|term| !term.is_empty() && term.iter().all(|r| r.holds(node)))
    }

    /// The first of the node's taints that this rule does not tolerate.
    pub fn untolerated<'n>(&self, node: &'n NodeCapacity) -> Option<&'n Taint> {
        node.taints
            .iter()
            .find(|t| !self.tolerations.iter().any(|tol| tol.tolerates(t)))
    }

    fn tolerates(&self, node: &NodeCapacity) -> bool {
        self.untolerated(node).is_none()
    }

    /// Whether it admits every node whatever it carries (no selector, affinity or
    /// toleration: only untainted nodes, but that is the nodes' doing).
    pub fn is_empty(&self) -> bool {
        self.selector.is_empty() && self.affinity.is_empty() && self.tolerations.is_empty()
    }

    /// "label gpu=H100", "node affinity zone in (a,b)", "label gpu=H100 and node affinity
    /// zone=a or zone=b"; empty for a rule with neither selector nor affinity.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.selector.is_empty() {
            let labels: Vec<String> = self
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            parts.push(format!("label {}", labels.join(",")));
        }
        if !self.affinity.is_empty() {
            let terms: Vec<String> = self
                .affinity
                .iter()
                .map(|term| {
                    let r: Vec<String> = term.iter().map(ToString::to_string).collect();
                    r.join(", ")
                })
                .collect();
            parts.push(format!("node affinity {}", terms.join(" or ")));
        }
        parts.join(" and ")
    }
}

/// One replica of a gang: its name (`worker-3`), what it asks for, where it may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRequest {
    pub name: String,
    pub resources: Resources,
    /// Which nodes it may go to.
    pub rule: NodeRule,
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
    /// Short machine-readable class, one of [`reason`]: `Unschedulable`, `QueueLimit`,
    /// `Reserved`, ...
    pub reason: &'static str,
    /// A sentence a person can act on; gangs a pass answers alike share one.
    pub message: Arc<str>,
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
