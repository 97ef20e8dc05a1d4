//! Worked examples of single passes, with the exact placement or reason expected.

use std::collections::BTreeMap;

use super::*;

pub(crate) fn node(name: &str, gpus: u32) -> NodeCapacity {
    NodeCapacity {
        name: name.to_owned(),
        labels: BTreeMap::new(),
        gpus: (0..gpus)
            .map(|i| GpuSlot {
                index: i,
                uuid: format!("GPU-{name}-{i}"),
                product: "H100".to_owned(),
                memory_mib: 81_920,
                healthy: true,
            })
            .collect(),
        cpu_milli: 64_000,
        memory_mib: 512_000,
        schedulable: true,
        taints: Vec::new(),
    }
}

pub(crate) fn gang(id: &str, submitted_at: f64, replicas: u32, gpus: u32) -> Gang {
    Gang {
        id: id.to_owned(),
        queue: "fast".to_owned(),
        priority: 0,
        submitted_at,
        replicas: (0..replicas)
            .map(|i| ReplicaRequest {
                name: format!("worker-{i}"),
                resources: Resources {
                    gpus,
                    cpu_milli: 1000,
                    memory_mib: 1024,
                },
                rule: NodeRule::default(),
            })
            .collect(),
        min_available: None,
        declared_runtime_s: None,
    }
}

fn running(id: &str, node: &str, gpus: &[u32], end: Option<f64>) -> RunningGang {
    RunningGang {
        id: id.to_owned(),
        queue: "fast".to_owned(),
        assignments: vec![Assignment {
            replica: "worker-0".to_owned(),
            node: node.to_owned(),
            gpu_indices: gpus.to_vec(),
            resources: Resources {
                gpus: gpus.len() as u32,
                cpu_milli: 1000,
                memory_mib: 1024,
            },
        }],
        expected_end: end,
    }
}

fn queues() -> Vec<QueueConfig> {
    vec![
        QueueConfig {
            name: "fast".to_owned(),
            priority: 10,
            max_running_jobs: None,
            max_gpus: None,
        },
        QueueConfig {
            name: "slow".to_owned(),
            priority: 1,
            max_running_jobs: None,
            max_gpus: None,
        },
    ]
}

fn run(
    nodes: &[NodeCapacity],
    running: &[RunningGang],
    queued: &[Gang],
    policy: &Policy,
) -> Decision {
    let queues = queues();
    schedule(
        &Snapshot {
            now: 100.0,
            nodes,
            running,
            queued,
            queues: &queues,
        },
        policy,
    )
}

fn placed<'d>(d: &'d Decision, gang: &str) -> Option<&'d Placement> {
    d.placements.iter().find(|p| p.gang == gang)
}

fn waiting<'d>(d: &'d Decision, gang: &str) -> &'d Waiting {
    d.waiting
        .iter()
        .find(|w| w.gang == gang)
        .unwrap_or_else(|| panic!("{gang} is not waiting: {d:#?}"))
}

fn nodes_of(p: &Placement) -> Vec<&str> {
    p.assignments.iter().map(|a| a.node.as_str()).collect()
}

#[test]
fn two_by_eight_goes_on_the_two_whole_nodes() {
    let nodes = [node("a", 8), node("b", 8), node("c", 8)];
    let run_c = [running("r", "c", &[0, 1, 2, 3], None)];
    let d = run(&nodes, &run_c, &[gang("j", 1.0, 2, 8)], &Policy::agentd());
    let p = placed(&d, "j").expect("placed");
    assert_eq!(nodes_of(p), ["a", "b"]);
    assert_eq!(p.assignments[0].gpu_indices, (0..8).collect::<Vec<_>>());
}

#[test]
fn best_fit_fills_the_partly_used_node_and_keeps_whole_nodes_whole() {
    let nodes = [node("a", 8), node("b", 8)];
    let run_b = [running("r", "b", &[0, 1, 2, 3, 4, 5], None)];
    let d = run(&nodes, &run_b, &[gang("j", 1.0, 1, 2)], &Policy::best_fit());
    let p = placed(&d, "j").expect("placed");
    assert_eq!(nodes_of(p), ["b"]);
    assert_eq!(p.assignments[0].gpu_indices, [6, 7]);
    // First-fit takes the lowest-numbered node instead.
    let d = run(
        &nodes,
        &run_b,
        &[gang("j", 1.0, 1, 2)],
        &Policy::first_fit(),
    );
    assert_eq!(nodes_of(placed(&d, "j").expect("placed")), ["a"]);
}

#[test]
fn gang_packs_onto_fewest_nodes() {
    let nodes = [node("a", 4), node("b", 8), node("c", 4)];
    let d = run(&nodes, &[], &[gang("j", 1.0, 3, 4)], &Policy::agentd());
    let mut got = nodes_of(placed(&d, "j").expect("placed"));
    got.sort_unstable();
    assert_eq!(got, ["a", "b", "b"]);
}

#[test]
fn unhealthy_gpus_are_never_used() {
    let mut n = node("a", 4);
    n.gpus[0].healthy = false;
    n.gpus[2].healthy = false;
    let d = run(
        &[n.clone()],
        &[],
        &[gang("j", 1.0, 1, 2)],
        &Policy::agentd(),
    );
    assert_eq!(
        placed(&d, "j").expect("placed").assignments[0].gpu_indices,
        [1, 3]
    );
    let d = run(&[n], &[], &[gang("k", 1.0, 1, 3)], &Policy::agentd());
    let w = waiting(&d, "k");
    assert_eq!(w.reason, reason::UNSCHEDULABLE);
    assert_eq!(
        &*w.message,
        "needs 3 GPUs (1 replica x 3) on at most 1 node; the best node has 2 free"
    );
}

#[test]
fn message_says_what_the_best_nodes_have() {
    let nodes = [node("a", 8), node("b", 8), node("c", 8)];
    let run = [
        running("r1", "a", &[0, 1], None),
        running("r2", "b", &[0, 1], None),
        running("r3", "c", &[0, 1, 2, 3], None),
    ];
    let queues = queues();
    let d = schedule(
        &Snapshot {
            now: 0.0,
            nodes: &nodes,
            running: &run,
            queued: &[gang("j", 1.0, 2, 8)],
            queues: &queues,
        },
        &Policy::best_fit(),
    );
    assert_eq!(
        &*waiting(&d, "j").message,
        "needs 16 GPUs (2 replicas x 8) on at most 2 nodes; the best 2 nodes have 12 free"
    );
}

#[test]
fn selector_that_no_node_has_never_fits() {
    let mut nodes = [node("a", 8), node("b", 8)];
    nodes[1].labels.insert("gpu".to_owned(), "H100".to_owned());
    let mut g = gang("j", 1.0, 1, 1);
    g.replicas[0]
        .rule
        .selector
        .insert("gpu".to_owned(), "H200".to_owned());
    let d = run(&nodes, &[], &[g.clone()], &Policy::agentd());
    let w = waiting(&d, "j");
    assert_eq!(w.reason, reason::NEVER_FITS);
    assert!(
        w.message.contains("label gpu=H200 and no node has it"),
        "{}",
        w.message
    );
    assert_eq!(never_fits(&g, &nodes).as_deref(), Some(&*w.message));
    g.replicas[0]
        .rule
        .selector
        .insert("gpu".to_owned(), "H100".to_owned());
    let d = run(&nodes, &[], &[g.clone()], &Policy::agentd());
    assert_eq!(nodes_of(placed(&d, "j").expect("placed")), ["b"]);
    assert_eq!(never_fits(&g, &nodes), None);
}

#[test]
fn too_big_for_the_cluster_never_fits() {
    let nodes = [node("a", 8), node("b", 8)];
    let g = gang("big", 1.0, 4, 8);
    assert_eq!(
        never_fits(&g, &nodes).as_deref(),
        Some(
            "can never run on this cluster: needs 32 GPUs in all (4 replicas x 8 GPUs) but the cluster's 2 nodes have 16 GPUs in all"
        )
    );
    let g = gang("wide", 1.0, 1, 16);
    assert_eq!(
        never_fits(&g, &nodes).as_deref(),
        Some(
            "can never run on this cluster: replica worker-0 needs 16 GPUs on one node but the largest node has 8"
        )
    );
}

fn sized(name: &str, gpus: u32, cpu_milli: u64, memory_mib: u64) -> NodeCapacity {
    NodeCapacity {
        cpu_milli,
        memory_mib,
        ..node(name, gpus)
    }
}

fn shaped(id: &str, replicas: &[(u32, u64, u64)]) -> Gang {
    let mut g = gang(id, 1.0, replicas.len() as u32, 0);
    for (r, &(gpus, cpu_milli, memory_mib)) in g.replicas.iter_mut().zip(replicas) {
        r.resources = Resources {
            gpus,
            cpu_milli,
            memory_mib,
        };
    }
    g
}

/// The message a pass gives, checked to be the one `never_fits` gives.
fn never_fits_reason(nodes: &[NodeCapacity], g: &Gang) -> String {
    let d = run(nodes, &[], std::slice::from_ref(g), &Policy::agentd());
    let w = waiting(&d, &g.id);
    assert_eq!(w.reason, reason::NEVER_FITS, "{}", w.message);
    assert_eq!(never_fits(g, nodes).as_deref(), Some(&*w.message));
    w.message.to_string()
}

fn taint(key: &str, value: &str, effect: TaintEffect) -> Taint {
    Taint {
        key: key.to_owned(),
        value: value.to_owned(),
        effect,
    }
}

fn tolerate(key: &str) -> Toleration {
    Toleration {
        key: key.to_owned(),
        exists: true,
        value: String::new(),
        effect: None,
    }
}

fn requirement(key: &str, operator: Operator, values: &[&str]) -> Requirement {
    Requirement {
        key: key.to_owned(),
        field: false,
        operator,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    }
}

#[test]
fn a_tainted_node_takes_only_replicas_that_tolerate_its_taints() {
    let mut nodes = [node("a", 8), node("b", 4)];
    nodes[0].taints = vec![
        taint("dedicated", "ml", TaintEffect::NoSchedule),
        taint("maintenance", "", TaintEffect::NoExecute),
    ];
    let mut g = gang("wide", 1.0, 1, 8);
    let message = never_fits_reason(&nodes, &g);
    assert_eq!(
        message,
        "can never run on this cluster: replica worker-0 needs 8 GPUs on one node but the \
         largest node without a taint it does not tolerate has 4"
    );
    // Tolerating one of two taints is not enough: the message names the one left.
    g.replicas[0].rule.tolerations = vec![tolerate("dedicated")];
    let message = never_fits_reason(&nodes, &g);
    assert!(message.contains("has 4"), "{message}");
    g.replicas[0].rule.tolerations.push(Toleration {
        key: "maintenance".to_owned(),
        exists: false,
        value: String::new(),
        effect: Some(TaintEffect::NoExecute),
    });
    let d = run(&nodes, &[], &[g.clone()], &Policy::agentd());
    assert_eq!(nodes_of(placed(&d, "wide").expect("placed")), ["a"]);
    // A small gang that tolerates nothing still goes to the untainted node.
    let small = gang("small", 2.0, 1, 2);
    let d = run(&nodes, &[], &[small], &Policy::agentd());
    assert_eq!(nodes_of(placed(&d, "small").expect("placed")), ["b"]);
}

#[test]
fn when_only_tainted_nodes_carry_the_label_the_reason_names_the_taints() {
    let mut nodes = [node("a", 8), node("b", 8), node("c", 8)];
    for n in &mut nodes[..2] {
        n.labels.insert("gpu".to_owned(), "H200".to_owned());
        n.taints = vec![taint("dedicated", "ml", TaintEffect::NoSchedule)];
    }
    let mut g = gang("j", 1.0, 1, 1);
    g.replicas[0]
        .rule
        .selector
        .insert("gpu".to_owned(), "H200".to_owned());
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: the 2 nodes with label gpu=H200 all have taints the \
         template does not tolerate (dedicated=ml:NoSchedule); add a toleration to the \
         replica's template to use them"
    );
    g.replicas[0].rule.tolerations = vec![tolerate("dedicated")];
    let d = run(&nodes, &[], &[g], &Policy::agentd());
    assert_eq!(nodes_of(placed(&d, "j").expect("placed")), ["a"]);
}

#[test]
fn required_node_affinity_admits_nodes_that_meet_one_term() {
    let mut nodes = [node("a", 8), node("b", 8), node("c", 8)];
    for (n, zone) in nodes.iter_mut().zip(["z1", "z2", "z3"]) {
        n.labels.insert("zone".to_owned(), zone.to_owned());
    }
    nodes[2]
        .labels
        .insert("generation".to_owned(), "5".to_owned());
    let mut g = gang("j", 1.0, 2, 8);
    // zone z2, or a generation above 4: nodes b and c.
    g.replicas.iter_mut().for_each(|r| {
        r.rule.affinity = vec![
            vec![requirement("zone", Operator::In, &["z2"])],
            vec![requirement("generation", Operator::Gt, &["4"])],
        ];
    });
    let d = run(&nodes, &[], &[g.clone()], &Policy::agentd());
    let mut on = nodes_of(placed(&d, "j").expect("placed"));
    on.sort_unstable();
    assert_eq!(on, ["b", "c"]);

    // Every requirement of a term must hold.
    g.replicas.iter_mut().for_each(|r| {
        r.rule.affinity = vec![vec![
            requirement("zone", Operator::NotIn, &["z1", "z2"]),
            requirement("generation", Operator::Lt, &["5"]),
        ]];
    });
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: replica worker-0 requires node affinity zone not in \
         (z1,z2), generation < 5 and none of the cluster's 3 nodes meets it"
    );
    // DoesNotExist matches the nodes without the label; a node's name by matchFields.
    let rule = |affinity| NodeRule {
        affinity,
        ..NodeRule::default()
    };
    let admitted = |r: &NodeRule| -> Vec<&str> {
        nodes
            .iter()
            .filter(|n| r.admits(n))
            .map(|n| n.name.as_str())
            .collect()
    };
    let without = rule(vec![vec![requirement(
        "generation",
        Operator::DoesNotExist,
        &[],
    )]]);
    assert_eq!(admitted(&without), ["a", "b"]);
    let by_name = rule(vec![vec![Requirement {
        field: true,
        ..requirement("metadata.name", Operator::In, &["c"])
    }]]);
    assert_eq!(admitted(&by_name), ["c"]);
    let empty_term = rule(vec![Vec::new()]);
    assert!(
        admitted(&empty_term).is_empty(),
        "an empty term matches nothing"
    );
    let not_a_number = rule(vec![vec![requirement("zone", Operator::Gt, &["1"])]]);
    assert!(admitted(&not_a_number).is_empty());
}

#[test]
fn never_fits_names_cpu_when_replicas_together_need_more_than_the_node() {
    let nodes = [sized("a", 0, 2000, 8192)];
    let g = shaped("cpu", &[(0, 1000, 1024); 3]);
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: needs 3 CPUs in all (3 replicas x 1 CPU) but the cluster's 1 node has 2 CPUs in all"
    );
}

#[test]
fn never_fits_names_memory_with_numbers() {
    let nodes = [sized("a", 0, 8000, 4096), sized("b", 0, 8000, 2048)];
    let g = shaped("mem", &[(0, 1000, 3000), (0, 1000, 3000), (0, 500, 1000)]);
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: needs 7000 MiB of memory in all (2 x 3000 MiB of memory + 1 x 1000 MiB of memory) but the cluster's 2 nodes have 6144 MiB of memory in all"
    );
}

#[test]
fn never_fits_counts_only_nodes_the_selector_allows() {
    let mut nodes = [sized("a", 4, 64_000, 8192), sized("b", 4, 64_000, 8192)];
    nodes[0].labels.insert("gpu".to_owned(), "H100".to_owned());
    let mut g = shaped("sel", &[(3, 1000, 1024), (3, 1000, 1024)]);
    for r in &mut g.replicas {
        r.rule.selector.insert("gpu".to_owned(), "H100".to_owned());
    }
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: needs 6 GPUs in all (2 replicas x 3 GPUs) but the 1 node with label gpu=H100 has 4 GPUs in all"
    );
}

#[test]
fn never_fits_names_the_resource_that_does_not_pack() {
    // Enough GPUs in all, but no node holds two of these replicas.
    let nodes = [node("a", 8), node("b", 4)];
    let g = shaped("gpus", &[(6, 1000, 1024), (6, 1000, 1024)]);
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: by GPUs alone only 1 of its 2 replicas (2 replicas x 6 GPUs) fit on the nodes at once, even when they are empty (the largest nodes have 8 GPUs, 4 GPUs)"
    );
    // Enough CPU in all, but 1.5 CPUs do not go twice into 2 + 1.
    let nodes = [sized("a", 0, 2000, 8192), sized("b", 0, 1000, 8192)];
    let g = shaped("cpu", &[(0, 1500, 1024), (0, 1500, 1024)]);
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: by CPU alone only 1 of its 2 replicas (2 replicas x 1500m CPU) fit on the nodes at once, even when they are empty (the largest nodes have 2 CPUs, 1 CPU)"
    );
}

#[test]
fn never_fits_says_when_only_the_combination_binds() {
    // Each resource packs on its own; the 2-GPU replica takes a node's GPUs and the two 2-CPU
    // replicas need a node each.
    let nodes = [sized("a", 2, 2000, 8192), sized("b", 2, 2000, 8192)];
    let g = shaped("mix", &[(1, 2000, 1), (1, 2000, 1), (2, 0, 1)]);
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster: GPUs, CPU and memory each suffice on their own, but only 2 of its 3 replicas fit at once with all three together (1 x 2 GPUs + 2 x 1 GPU; 2 x 2 CPUs + 1 x 0 CPUs; 3 replicas x 1 MiB of memory), even when the nodes are empty"
    );
}

#[test]
fn never_fits_speaks_of_the_min_available_replicas_only() {
    let nodes = [sized("a", 0, 2000, 8192)];
    let mut g = shaped(
        "min",
        &[
            (0, 1000, 1024),
            (0, 1000, 1024),
            (0, 1000, 1024),
            (0, 64_000, 1),
        ],
    );
    g.min_available = Some(3);
    assert_eq!(
        never_fits_reason(&nodes, &g),
        "can never run on this cluster (minAvailable: 3 replicas together): needs 3 CPUs in all (3 replicas x 1 CPU) but the cluster's 1 node has 2 CPUs in all"
    );
}

#[test]
fn fifo_head_blocks_everyone_behind_it() {
    let nodes = [node("a", 8)];
    let run_a = [running("r", "a", &[0, 1, 2, 3], Some(500.0))];
    let queued = [gang("head", 1.0, 1, 8), gang("small", 2.0, 1, 1)];
    let d = run(&nodes, &run_a, &queued, &Policy::fifo());
    assert!(d.placements.is_empty());
    assert_eq!(waiting(&d, "small").reason, reason::BLOCKED);
    // Greedy backfill lets the small one go.
    let d = run(&nodes, &run_a, &queued, &Policy::first_fit());
    assert!(placed(&d, "small").is_some());
}

#[test]
fn reservation_lets_only_gangs_that_do_not_delay_the_head_backfill() {
    // a: 4 of 8 busy until t=500; b: all 8 busy, no declared end.
    let nodes = [node("a", 8), node("b", 8)];
    let busy = [
        running("r1", "a", &[0, 1, 2, 3], Some(500.0)),
        running("r2", "b", &[0, 1, 2, 3, 4, 5, 6, 7], None),
    ];
    let mut short = gang("short", 3.0, 1, 2);
    short.declared_runtime_s = Some(300.0); // ends at 400 < 500
    let mut long = gang("long", 4.0, 1, 2);
    long.declared_runtime_s = Some(1000.0);
    let queued = [gang("head", 1.0, 1, 8), long, short];
    let d = run(&nodes, &busy, &queued, &Policy::agentd());
    let r = d.reservations.first().expect("reservation");
    assert_eq!(r.gang, "head");
    assert_eq!(r.start_at, Some(500.0));
    assert_eq!(r.after, ["r1"]);
    assert_eq!(r.assignments[0].node, "a");
    assert_eq!(waiting(&d, "head").reason, reason::UNSCHEDULABLE);
    assert!(
        waiting(&d, "head")
            .message
            .ends_with("holds a reservation on a to start by t=500s (in 400 s), when r1 ends"),
        "{}",
        waiting(&d, "head").message
    );
    let w = waiting(&d, "long");
    assert_eq!(w.reason, reason::RESERVED);
    assert!(w.message.contains("would delay head"), "{}", w.message);
    assert_eq!(
        nodes_of(placed(&d, "short").expect("short backfills")),
        ["a"]
    );
}

#[test]
fn backfill_may_use_what_the_reservation_does_not_need() {
    // The head needs 6 GPUs; node a has 8, 4 busy until 500. After that, 2 are spare.
    let nodes = [node("a", 8)];
    let busy = [running("r1", "a", &[0, 1, 2, 3], Some(500.0))];
    let queued = [
        gang("head", 1.0, 1, 6),
        gang("two", 2.0, 1, 2),
        gang("one", 3.0, 1, 1),
    ];
    let d = run(&nodes, &busy, &queued, &Policy::agentd());
    let r = d.reservations.first().expect("reservation");
    assert_eq!(r.assignments[0].gpu_indices, [0, 1, 2, 3, 4, 5]);
    assert_eq!(
        placed(&d, "two")
            .expect("fits outside the reservation")
            .assignments[0]
            .gpu_indices,
        [6, 7]
    );
    assert_eq!(waiting(&d, "one").reason, reason::RESERVED);
}

#[test]
fn with_estimates_the_next_blocked_gangs_wider_than_a_node_hold_reservations_too() {
    // Four nodes of 8, every GPU busy: a and b until t=500 and t=600, c and d until t=2000.
    let nodes = [node("a", 8), node("b", 8), node("c", 8), node("d", 8)];
    let all = [0, 1, 2, 3, 4, 5, 6, 7];
    let busy = [
        running("ra", "a", &all, Some(500.0)),
        running("rb", "b", &all, Some(600.0)),
        running("rc", "c", &all, Some(2000.0)),
        running("rd", "d", &all, Some(2000.0)),
    ];
    let mut short = gang("short", 4.0, 1, 8);
    short.declared_runtime_s = Some(100.0);
    let queued = [
        gang("head", 1.0, 1, 8),
        gang("wide", 2.0, 2, 8),
        gang("narrow", 3.0, 1, 8),
        short,
    ];
    let one = run(&nodes, &busy, &queued, &Policy::agentd());
    assert_eq!(one.reservations.len(), 1);
    let policy = Policy::agentd().with_runtime_estimates();
    let d = run(&nodes, &busy, &queued, &policy);
    let held: Vec<(&str, Vec<&str>)> = d
        .reservations
        .iter()
        .map(|r| (r.gang.as_str(), nodes_of_reservation(r)))
        .collect();
    // The head waits on one node; the two-node gang behind it on two others, not the head's;
    // the one-node gang gets none.
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(held[0].0, "head");
    assert_eq!(held[1].0, "wide");
    assert_eq!(held[0].1.len(), 1);
    assert_eq!(held[1].1.len(), 2);
    assert!(!held[1].1.contains(&held[0].1[0]), "{held:?}");
    assert_eq!(waiting(&d, "narrow").reason, reason::UNSCHEDULABLE);
    assert!(
        waiting(&d, "wide")
            .message
            .contains("holds a reservation on"),
        "{}",
        waiting(&d, "wide").message
    );
    // Nothing is free now, so the short gang waits too, and says nothing of reservations it
    // cannot take part in.
    assert_eq!(waiting(&d, "short").reason, reason::UNSCHEDULABLE);
}

#[test]
fn a_gang_that_would_delay_several_reservations_names_them() {
    // a is free but for 2 GPUs until t=300; b, c busy until t=1000 and t=1200.
    let nodes = [node("a", 8), node("b", 8), node("c", 8)];
    let all = [0, 1, 2, 3, 4, 5, 6, 7];
    let busy = [
        running("ra", "a", &[0, 1], Some(300.0)),
        running("rb", "b", &all, Some(1000.0)),
        running("rc", "c", &all, Some(1200.0)),
    ];
    let mut long = gang("long", 3.0, 1, 6);
    long.declared_runtime_s = Some(5000.0);
    let queued = [gang("head", 1.0, 1, 8), gang("wide", 2.0, 2, 8), long];
    let mut policy = Policy::agentd().with_runtime_estimates();
    policy.release = ReleaseOrder::SoonestEnd;
    let d = run(&nodes, &busy, &queued, &policy);
    assert_eq!(d.reservations.len(), 2);
    assert_eq!(d.reservations[0].start_at, Some(300.0));
    assert_eq!(d.reservations[1].start_at, Some(1200.0));
    let w = waiting(&d, "long");
    assert_eq!(w.reason, reason::RESERVED);
    assert!(
        w.message.starts_with(
            "fits now, but would delay head and wide, which hold reservations, the first to start by t=300s (in 200 s)"
        ),
        "{}",
        w.message
    );
}

fn nodes_of_reservation(r: &Reservation) -> Vec<&str> {
    let mut nodes: Vec<&str> = r.assignments.iter().map(|a| a.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

#[test]
fn queue_priority_orders_and_aging_lifts_old_gangs() {
    let nodes = [node("a", 1)];
    let mut slow = gang("slow", 0.0, 1, 1);
    slow.queue = "slow".to_owned();
    let fast = gang("fast", 90.0, 1, 1);
    let queued = [slow.clone(), fast.clone()];
    // At t=100 slow has aged 100 s: 1 + 0.1 < 10 + 0.01.
    let d = run(&nodes, &[], &queued, &Policy::agentd());
    assert!(placed(&d, "fast").is_some());
    // Submitted 3 hours before: 1 + 12 > 10.
    slow.submitted_at = 100.0 - 3.0 * 3600.0;
    let d = run(&nodes, &[], &[slow, fast], &Policy::agentd());
    assert!(placed(&d, "slow").is_some());
    // FIFO ignores queues.
    let d = run(&nodes, &[], &queued, &Policy::fifo());
    assert!(placed(&d, "slow").is_some());
}

#[test]
fn queue_limits_hold_gangs_back() {
    let nodes = [node("a", 8)];
    let mut qs = queues();
    qs[0].max_gpus = Some(4);
    qs[1].max_running_jobs = Some(1);
    let mut s1 = gang("s1", 1.0, 1, 1);
    s1.queue = "slow".to_owned();
    let mut s2 = gang("s2", 2.0, 1, 1);
    s2.queue = "slow".to_owned();
    let queued = [gang("f1", 0.0, 1, 3), gang("f2", 0.5, 1, 2), s1, s2];
    let d = schedule(
        &Snapshot {
            now: 10.0,
            nodes: &nodes,
            running: &[],
            queued: &queued,
            queues: &qs,
        },
        &Policy::agentd(),
    );
    assert!(placed(&d, "f1").is_some());
    assert!(placed(&d, "s1").is_some());
    assert_eq!(waiting(&d, "f2").reason, reason::QUEUE_LIMIT);
    assert!(waiting(&d, "f2").message.contains("max_gpus"));
    assert_eq!(waiting(&d, "s2").reason, reason::QUEUE_LIMIT);
    assert!(waiting(&d, "s2").message.contains("max_running_jobs"));
}

#[test]
fn min_available_places_the_required_part() {
    let nodes = [node("a", 4)];
    let mut g = gang("j", 1.0, 6, 1);
    g.min_available = Some(3);
    let d = run(
        &nodes,
        &[running("r", "a", &[0], None)],
        &[g],
        &Policy::agentd(),
    );
    let p = placed(&d, "j").expect("placed");
    let names: Vec<&str> = p.assignments.iter().map(|a| a.replica.as_str()).collect();
    assert_eq!(names, ["worker-0", "worker-1", "worker-2"]);
}

#[test]
fn unschedulable_nodes_get_nothing() {
    let mut nodes = [node("a", 8), node("b", 8)];
    nodes[0].schedulable = false;
    let d = run(
        &nodes,
        &[],
        &[gang("j", 1.0, 1, 8), gang("k", 2.0, 1, 8)],
        &Policy::agentd(),
    );
    assert_eq!(nodes_of(placed(&d, "j").expect("placed")), ["b"]);
    assert_eq!(waiting(&d, "k").reason, reason::UNSCHEDULABLE);
}

#[test]
fn unknown_policy_names_the_allowed_ones() {
    let err = Policy::by_name("sjf").expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown scheduling policy `sjf`; allowed: fifo, first-fit, best-fit, default"
    );
    for name in Policy::NAMES {
        assert_eq!(Policy::by_name(name).map(|p| p.name), Ok(name));
    }
}

#[test]
fn counts_without_listing_match_the_listing() {
    let nodes = [node("a", 8)];
    let busy = [running("r1", "a", &[0, 1, 2, 3], Some(500.0))];
    let queued = [
        gang("head", 1.0, 1, 8),
        gang("two", 2.0, 1, 2),
        gang("big", 3.0, 2, 8),
    ];
    let listed = run(&nodes, &busy, &queued, &Policy::agentd());
    let mut quiet = Policy::agentd();
    quiet.list_waiting = false;
    quiet.explain = false;
    let counted = run(&nodes, &busy, &queued, &quiet);
    assert!(counted.waiting.is_empty());
    assert_eq!(counted.placements, listed.placements);
    let mut by_reason = std::collections::BTreeMap::new();
    for w in &listed.waiting {
        *by_reason.entry(w.reason).or_insert(0) += 1;
    }
    assert_eq!(counted.waiting_counts, by_reason);
    assert_eq!(counted.waiting_counts.get(reason::NEVER_FITS), Some(&1));
    assert_eq!(counted.waiting_counts.get(reason::RESERVED), Some(&1));
}

/// Nodes that gain taints while the scheduler runs: its interned node rules are worked out
/// again, so a gang that tolerates nothing no longer goes there.
#[test]
fn taints_that_come_with_new_nodes_keep_gangs_off_at_once() {
    let mut nodes = vec![node("node-0", 2), node("node-1", 2), node("node-2", 2)];
    let mut s = Scheduler::new(
        Policy::agentd().with_runtime_estimates(),
        nodes.clone(),
        queues(),
    );
    let d = s.pass(1.0);
    assert!(d.placements.is_empty());
    for n in &mut nodes[1..] {
        n.taints = vec![taint("dedicated", "ml", TaintEffect::NoSchedule)];
    }
    s.set_nodes(nodes);
    s.submit(gang("plain", 2.0, 2, 2));
    let d = s.pass(3.0);
    assert!(d.placements.is_empty(), "{d:#?}");
}
