//! Sentences for gangs that wait: what they need, what is free, what to change.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::free::{FreeState, Need, SelectorTable, Taken};
use super::{Fit, Gang, NodeCapacity, NodeRule, ReplicaRequest};

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

/// " with label gpu=H100", " with node affinity zone=a", " without a taint it does not
/// tolerate" (where only taints set nodes apart), or nothing: which nodes a replica may use,
/// for sentences about them.
fn scope(rule: &NodeRule, nodes: &[NodeCapacity]) -> String {
    let described = rule.describe();
    if !described.is_empty() {
        format!(" with {described}")
    } else if nodes.iter().any(|n| rule.untolerated(n).is_some()) {
        " without a taint it does not tolerate".to_owned()
    } else {
        String::new()
    }
}

fn cpu(milli: u64) -> String {
    if milli == 1000 {
        "1 CPU".to_owned()
    } else if milli.is_multiple_of(1000) {
        format!("{} CPUs", milli / 1000)
    } else {
        format!("{milli}m CPU")
    }
}

/// Why no node admits a replica: the first part of its rule that no node meets, in the
/// order selector, affinity, taints.
fn no_node_admits(replica: &ReplicaRequest, nodes: &[NodeCapacity]) -> String {
    let rule = &replica.rule;
    let name = &replica.name;
    if nodes.is_empty() {
        return "the cluster has no nodes".to_owned();
    }
    let labelled: Vec<&NodeCapacity> = nodes.iter().filter(|n| rule.labels_match(n)).collect();
    if labelled.is_empty() {
        // Name the first label no node carries, so the fix is obvious.
        for (k, v) in &rule.selector {
            if !nodes
                .iter()
                .any(|n| n.labels.get(k).is_some_and(|have| have == v))
            {
                return format!("replica {name} asks for label {k}={v} and no node has it");
            }
        }
        let labels: Vec<String> = rule
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return format!(
            "replica {name} asks for labels {} and no node has all of them",
            labels.join(",")
        );
    }
    let of = |count: usize| {
        let word = if count == 1 { "node" } else { "nodes" };
        if rule.selector.is_empty() {
            format!("the cluster's {count} {word}")
        } else {
            let labels: Vec<String> = rule
                .selector
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("the {count} {word} with label {}", labels.join(","))
        }
    };
    let affine: Vec<&NodeCapacity> = labelled
        .iter()
        .copied()
        .filter(|n| rule.affinity_holds(n))
        .collect();
    if affine.is_empty() {
        let only = NodeRule {
            affinity: rule.affinity.clone(),
            ..NodeRule::default()
        };
        return format!(
            "replica {name} requires {} and none of {} meets it",
            only.describe(),
            of(labelled.len())
        );
    }
    // Every node left has a taint the replica does not tolerate: name a few.
    let mut seen: Vec<String> = Vec::new();
    for node in &affine {
        if let Some(taint) = rule.untolerated(node) {
            let t = taint.to_string();
            if !seen.contains(&t) {
                seen.push(t);
            }
        }
    }
    let shown: Vec<&str> = seen.iter().take(3).map(String::as_str).collect();
    let more = if seen.len() > 3 {
        format!(" and {} more", seen.len() - 3)
    } else {
        String::new()
    };
    let whose = if affine.len() == labelled.len() {
        of(affine.len())
    } else {
        format!(
            "the {} of {} that meet its node affinity",
            affine.len(),
            of(labelled.len())
        )
    };
    format!(
        "{whose} {} taints the template does not tolerate ({}{more}); add a toleration to \
         the replica's template to use them",
        if affine.len() == 1 { "has" } else { "all have" },
        shown.join(", ")
    )
}

/// Why one replica fits no node, even an empty one; `None` if some node could hold it.
fn replica_never_fits(replica: &ReplicaRequest, nodes: &[NodeCapacity]) -> Option<String> {
    let r = &replica.resources;
    let rule = &replica.rule;
    let on = scope(rule, nodes);
    let matching: Vec<&NodeCapacity> = nodes.iter().filter(|n| rule.admits(n)).collect();
    if matching.is_empty() {
        return Some(no_node_admits(replica, nodes));
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

/// One resource of a replica, for sentences that name what binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gpus,
    Cpu,
    Memory,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Gpus, Kind::Cpu, Kind::Memory];

    fn of_request(self, r: &super::Resources) -> u64 {
        match self {
            Kind::Gpus => u64::from(r.gpus),
            Kind::Cpu => r.cpu_milli,
            Kind::Memory => r.memory_mib,
        }
    }

    fn of_node(self, n: &NodeCapacity) -> u64 {
        match self {
            Kind::Gpus => n.gpus.len().min(super::MAX_GPUS_PER_NODE) as u64,
            Kind::Cpu => n.cpu_milli,
            Kind::Memory => n.memory_mib,
        }
    }

    /// Keeps only this resource of a need, so a packing can be tried on it alone.
    fn only(self, need: Need) -> Need {
        Need {
            gpus: if self == Kind::Gpus { need.gpus } else { 0 },
            cpu: if self == Kind::Cpu { need.cpu } else { 0 },
            mem: if self == Kind::Memory { need.mem } else { 0 },
            selector: need.selector,
        }
    }

    fn amount(self, v: u64) -> String {
        match self {
            Kind::Gpus if v == 1 => "1 GPU".to_owned(),
            Kind::Gpus => format!("{v} GPUs"),
            Kind::Cpu => cpu(v),
            Kind::Memory => format!("{v} MiB of memory"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Gpus => "GPUs",
            Kind::Cpu => "CPU",
            Kind::Memory => "memory",
        }
    }
}

/// "3 replicas x 1 CPU", or "1 x 4 GPUs + 2 x 1 GPU" for mixed gangs.
fn describe_amounts(kind: Kind, values: &[u64]) -> String {
    let mut counts: BTreeMap<u64, u32> = BTreeMap::new();
    for &v in values {
        *counts.entry(v).or_default() += 1;
    }
    if let [(v, n)] = counts.iter().collect::<Vec<_>>()[..] {
        let plural = if *n == 1 { "replica" } else { "replicas" };
        return format!("{n} {plural} x {}", kind.amount(*v));
    }
    let parts: Vec<String> = counts
        .iter()
        .rev()
        .map(|(v, n)| format!("{n} x {}", kind.amount(*v)))
        .collect();
    parts.join(" + ")
}

/// "the cluster's 2 nodes have" or "the 1 node with label gpu=H100 has".
fn nodes_phrase(count: usize, scope: &str) -> String {
    let (word, verb) = if count == 1 {
        ("node", "has")
    } else {
        ("nodes", "have")
    };
    if scope.is_empty() {
        format!("the cluster's {count} {word} {verb}")
    } else {
        format!("the {count} {word}{scope} {verb}")
    }
}

/// The replicas that must be placed together: all, or the first `minAvailable`.
fn required_replicas(gang: &Gang) -> &[ReplicaRequest] {
    let n = gang.replicas.len();
    let required = gang
        .min_available
        .map_or(n, |m| (m as usize).clamp(1, n.max(1)));
    &gang.replicas[..required.min(n)]
}

/// The replicas' needs (largest first) against a table of their selectors.
fn needs_of(replicas: &[ReplicaRequest], nodes: &[NodeCapacity]) -> (Vec<Need>, SelectorTable) {
    let mut table = SelectorTable::default();
    table.matches.push(Vec::new());
    let mut ids: Vec<&NodeRule> = Vec::new();
    let mut needs: Vec<Need> = Vec::with_capacity(replicas.len());
    for replica in replicas {
        let selector = if let Some(i) = ids.iter().position(|s| **s == replica.rule) {
            (i + 1) as u32
        } else {
            ids.push(&replica.rule);
            table
                .matches
                .push(nodes.iter().map(|n| replica.rule.admits(n)).collect());
            ids.len() as u32
        };
        needs.push(Need {
            gpus: replica.resources.gpus,
            cpu: replica.resources.cpu_milli,
            mem: replica.resources.memory_mib,
            selector,
        });
    }
    needs.sort_unstable_by(|a, b| b.cmp(a));
    (needs, table)
}

/// How many of `needs` (largest first) can be placed one after another on the empty cluster.
fn how_many_fit(needs: &[Need], nodes: &[NodeCapacity], table: &SelectorTable) -> usize {
    let mut state = FreeState::empty(nodes, true);
    state.rebuild_index();
    let mut one: Vec<Taken> = Vec::new();
    needs
        .iter()
        .filter(|need| {
            state.place(
                std::slice::from_ref(*need),
                super::free::Mode::Any,
                Fit::BestFit,
                table,
                &mut one,
            )
        })
        .count()
}

/// Why a gang that failed to place on the empty cluster can never fit it, naming the resource
/// that binds (GPUs, CPU, memory or a node selector) with the numbers.
pub(crate) fn never_fits_message(gang: &Gang, nodes: &[NodeCapacity]) -> String {
    let replicas = required_replicas(gang);
    let why = never_fits_reason(replicas, nodes);
    let of = if replicas.len() < gang.replicas.len() {
        format!(" (minAvailable: {} replicas together)", replicas.len())
    } else {
        String::new()
    };
    format!("can never run on this cluster{of}: {why}")
}

fn never_fits_reason(replicas: &[ReplicaRequest], nodes: &[NodeCapacity]) -> String {
    for replica in replicas {
        if let Some(why) = replica_never_fits(replica, nodes) {
            return why;
        }
    }
    // Replicas that share a selector compete for the same nodes: too little of one resource
    // in all of those nodes together.
    let mut groups: Vec<(&NodeRule, Vec<&ReplicaRequest>)> = Vec::new();
    for replica in replicas {
        match groups.iter_mut().find(|(s, _)| **s == replica.rule) {
            Some((_, members)) => members.push(replica),
            None => groups.push((&replica.rule, vec![replica])),
        }
    }
    for (rule, members) in &groups {
        let matching: Vec<&NodeCapacity> = nodes.iter().filter(|n| rule.admits(n)).collect();
        for kind in Kind::ALL {
            let values: Vec<u64> = members
                .iter()
                .map(|r| kind.of_request(&r.resources))
                .collect();
            let demand: u64 = values.iter().sum();
            let capacity: u64 = matching.iter().map(|n| kind.of_node(n)).sum();
            if demand > capacity {
                return format!(
                    "needs {} in all ({}) but {} {} in all",
                    kind.amount(demand),
                    describe_amounts(kind, &values),
                    nodes_phrase(matching.len(), &scope(rule, nodes)),
                    kind.amount(capacity)
                );
            }
        }
    }
    // Enough of each resource in total, but not in pieces the replicas fit: try each resource
    // on its own, then all together.
    let (needs, table) = needs_of(replicas, nodes);
    for kind in Kind::ALL {
        let only: Vec<Need> = needs.iter().map(|n| kind.only(*n)).collect();
        let fit = how_many_fit(&only, nodes, &table);
        if fit < needs.len() {
            let values: Vec<u64> = replicas
                .iter()
                .map(|r| kind.of_request(&r.resources))
                .collect();
            let largest: Vec<String> = largest_nodes(nodes, kind, 3)
                .into_iter()
                .map(|v| kind.amount(v))
                .collect();
            return format!(
                "by {} alone only {fit} of its {} replicas ({}) fit on the nodes at once, even when they are empty (the largest nodes have {})",
                kind.name(),
                needs.len(),
                describe_amounts(kind, &values),
                largest.join(", ")
            );
        }
    }
    let fit = how_many_fit(&needs, nodes, &table);
    let gpus: Vec<u64> = replicas
        .iter()
        .map(|r| u64::from(r.resources.gpus))
        .collect();
    let cpus: Vec<u64> = replicas.iter().map(|r| r.resources.cpu_milli).collect();
    let mems: Vec<u64> = replicas.iter().map(|r| r.resources.memory_mib).collect();
    format!(
        "GPUs, CPU and memory each suffice on their own, but only {fit} of its {} replicas fit at once with all three together ({}; {}; {}), even when the nodes are empty",
        replicas.len(),
        describe_amounts(Kind::Gpus, &gpus),
        describe_amounts(Kind::Cpu, &cpus),
        describe_amounts(Kind::Memory, &mems)
    )
}

/// The `k` largest amounts of one resource over all nodes, largest first.
fn largest_nodes(nodes: &[NodeCapacity], kind: Kind, k: usize) -> Vec<u64> {
    let mut all: Vec<u64> = nodes.iter().map(|n| kind.of_node(n)).collect();
    all.sort_unstable_by(|a, b| b.cmp(a));
    all.truncate(k);
    all
}

/// Explains a gang that can never fit the cluster at all, even with every node empty, every
/// node schedulable and every GPU healthy; `None` if it could fit. The agent uses it to fail
/// such a gang at once, or after its schedule timeout.
pub fn never_fits(gang: &Gang, nodes: &[NodeCapacity]) -> Option<String> {
    if gang.replicas.is_empty() {
        return Some("has no replicas".to_owned());
    }
    let (needs, table) = needs_of(required_replicas(gang), nodes);
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
    let with = gang
        .replicas
        .iter()
        .max_by_key(|r| r.resources.gpus)
        .map(|r| r.rule.describe())
        .filter(|d| !d.is_empty())
        .map(|d| format!(" with {d}"))
        .unwrap_or_default();
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
