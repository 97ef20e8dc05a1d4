//! Sentences for gangs that wait: what they need, what is free, what to change.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::free::{FreeState, Need, SelectorTable, Taken};
use super::{Fit, Gang, NodeCapacity, ReplicaRequest};

/// "2 replicas x 8", "1 replica x 4", or "1 x 0 + 4 x 2" for mixed gangs.
pub(crate) fn describe_replicas(gpus: &[u32]) -> String {
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for &g in gpus {
        *counts.entry(g).or_default() += 1;
    }
    if counts.len() == 1 {
        let (g, n) = counts.iter().next().map_or((0, 0), |(g, n)| (*g, *n));
        let plural = if n == 1 { "replica" } else { "replicas" };
        return format!("{n} {plural} x {g}");
    }
    let parts: Vec<String> = counts
        .iter()
        .rev()
        .map(|(g, n)| format!("{n} x {g}"))
        .collect();
    parts.join(" + ")
}

pub(crate) fn describe_selector(selector: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(",")
}

fn matches(node: &NodeCapacity, selector: &BTreeMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(k, v)| node.labels.get(k).is_some_and(|have| have == v))
}

fn cpu(milli: u64) -> String {
    if milli % 1000 == 0 {
        format!("{} CPUs", milli / 1000)
    } else {
        format!("{milli}m CPU")
    }
}

/// Why one replica fits no node, even an empty one; `None` if some node could hold it.
fn replica_never_fits(replica: &ReplicaRequest, nodes: &[NodeCapacity]) -> Option<String> {
    let r = &replica.resources;
    let on = if replica.node_selector.is_empty() {
        String::new()
    } else {
        format!(" with label {}", describe_selector(&replica.node_selector))
    };
    let matching: Vec<&NodeCapacity> = nodes
        .iter()
        .filter(|n| matches(n, &replica.node_selector))
        .collect();
    if matching.is_empty() {
        if nodes.is_empty() {
            return Some("the cluster has no nodes".to_owned());
        }
        // Name the first label no node carries, so the fix is obvious.
        for (k, v) in &replica.node_selector {
            if !nodes
                .iter()
                .any(|n| n.labels.get(k).is_some_and(|have| have == v))
            {
                return Some(format!(
                    "replica {} asks for label {k}={v} and no node has it",
                    replica.name
                ));
            }
        }
        return Some(format!(
            "replica {} asks for labels {} and no node has all of them",
            replica.name,
            describe_selector(&replica.node_selector)
        ));
    }
    if matching.iter().any(|n| {
        n.gpus.len().min(super::MAX_GPUS_PER_NODE) >= r.gpus as usize
            && n.cpu_milli >= r.cpu_milli
            && n.memory_mib >= r.memory_mib
    }) {
        return None;
    }
    let most_gpus = matching.iter().map(|n| n.gpus.len()).max().unwrap_or(0);
    if most_gpus < r.gpus as usize {
        return Some(format!(
            "replica {} needs {} GPUs on one node but the largest node{on} has {most_gpus}",
            replica.name, r.gpus
        ));
    }
    let most_cpu = matching.iter().map(|n| n.cpu_milli).max().unwrap_or(0);
    if most_cpu < r.cpu_milli {
        return Some(format!(
            "replica {} needs {} but the largest node{on} has {}",
            replica.name,
            cpu(r.cpu_milli),
            cpu(most_cpu)
        ));
    }
    let most_mem = matching.iter().map(|n| n.memory_mib).max().unwrap_or(0);
    if most_mem < r.memory_mib {
        return Some(format!(
            "replica {} needs {} MiB of memory but the largest node{on} has {most_mem} MiB",
            replica.name, r.memory_mib
        ));
    }
    Some(format!(
        "replica {} needs {} GPUs, {} and {} MiB together and no node{on} has all three",
        replica.name,
        r.gpus,
        cpu(r.cpu_milli),
        r.memory_mib
    ))
}

/// Why a gang that failed to place on the empty cluster can never fit it.
pub(crate) fn never_fits_message(gang: &Gang, nodes: &[NodeCapacity]) -> String {
    for replica in &gang.replicas {
        if let Some(why) = replica_never_fits(replica, nodes) {
            return format!("can never run on this cluster: {why}");
        }
    }
    let gpus: Vec<u32> = gang.replicas.iter().map(|r| r.resources.gpus).collect();
    let total: u64 = gpus.iter().map(|&g| u64::from(g)).sum();
    let selector = gang
        .replicas
        .iter()
        .max_by_key(|r| r.resources.gpus)
        .map(|r| r.node_selector.clone())
        .unwrap_or_default();
    let capacity: usize = nodes
        .iter()
        .filter(|n| matches(n, &selector))
        .map(|n| n.gpus.len())
        .sum();
    let on = if selector.is_empty() {
        String::new()
    } else {
        format!(" on nodes with label {}", describe_selector(&selector))
    };
    if (capacity as u64) < total {
        format!(
            "can never run on this cluster: needs {total} GPUs ({}) but the cluster has {capacity} GPUs{on}",
            describe_replicas(&gpus)
        )
    } else {
        format!(
            "can never run on this cluster: its {} replicas ({}) cannot be packed onto the nodes{on} even when they are empty",
            gang.replicas.len(),
            describe_replicas(&gpus)
        )
    }
}

/// Explains a gang that can never fit the cluster at all, even with every node empty, every
/// node schedulable and every GPU healthy; `None` if it could fit. The agent uses it to fail
/// such a gang at once, or after its schedule timeout.
pub fn never_fits(gang: &Gang, nodes: &[NodeCapacity]) -> Option<String> {
    if gang.replicas.is_empty() {
        return Some("has no replicas".to_owned());
    }
    let mut table = SelectorTable::default();
    table.matches.push(Vec::new());
    let mut needs: Vec<Need> = Vec::with_capacity(gang.replicas.len());
    let required = gang.min_available.map_or(gang.replicas.len(), |m| {
        (m as usize).clamp(1, gang.replicas.len())
    });
    for replica in gang.replicas.iter().take(required) {
        let selector = if replica.node_selector.is_empty() {
            0
        } else {
            table.matches.push(
                nodes
                    .iter()
                    .map(|n| matches(n, &replica.node_selector))
                    .collect(),
            );
            (table.matches.len() - 1) as u32
        };
        needs.push(Need {
            gpus: replica.resources.gpus,
            cpu: replica.resources.cpu_milli,
            mem: replica.resources.memory_mib,
            selector,
        });
    }
    needs.sort_unstable_by(|a, b| b.cmp(a));
    let mut state = FreeState::empty(nodes, true);
    state.rebuild_index();
    let mut taken: Vec<Taken> = Vec::new();
    if state.place(
        &needs,
        super::free::Mode::Any,
        Fit::BestFit,
        &table,
        &mut taken,
    ) {
        None
    } else {
        Some(never_fits_message(gang, nodes))
    }
}

/// "needs 16 GPUs (2 replicas x 8) on at most 2 nodes; the best 2 nodes have 12 free".
pub(crate) fn unschedulable_message(
    gang: &Gang,
    needs: &[Need],
    min_nodes: usize,
    state: &FreeState,
    selectors: &SelectorTable,
) -> String {
    let gpus: Vec<u32> = needs.iter().map(|n| n.gpus).collect();
    let total: u64 = gpus.iter().map(|&g| u64::from(g)).sum();
    let largest = needs.first().copied();
    let selector = gang
        .replicas
        .iter()
        .max_by_key(|r| r.resources.gpus)
        .map(|r| describe_selector(&r.node_selector))
        .unwrap_or_default();
    let with = if selector.is_empty() {
        String::new()
    } else {
        format!(" with label {selector}")
    };
    let mut msg = String::new();
    if total == 0 {
        let (c, m) = largest.map_or((0, 0), |n| (n.cpu, n.mem));
        let _ = write!(
            msg,
            "needs {} and {m} MiB of memory per replica for {} replicas; no schedulable node{with} has that free now",
            cpu(c),
            needs.len()
        );
        return msg;
    }
    let k = min_nodes.max(1);
    let top = state.top_free(largest.map_or(0, |n| n.selector), selectors, k);
    let free: u64 = top.iter().map(|&g| u64::from(g)).sum();
    let nodes_word = if k == 1 { "node" } else { "nodes" };
    let _ = write!(
        msg,
        "needs {total} GPUs ({}) on at most {k} {nodes_word}{with}; ",
        describe_replicas(&gpus)
    );
    if k == 1 {
        let _ = write!(msg, "the best node has {free} free");
    } else {
        let _ = write!(msg, "the best {k} nodes have {free} free");
    }
    if free >= total {
        msg.push_str(", but not with enough CPU or memory beside them");
    }
    msg
}
