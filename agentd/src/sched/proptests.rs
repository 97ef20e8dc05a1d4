//! Invariants of every pass over generated clusters and queues: no over-commit, no partial gang,
//! no unhealthy GPU or drained node used, no reservation delayed by a backfilled gang or sharing
//! a GPU with another, and the same decision whatever the order of the queue.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
struct Case {
    nodes: Vec<NodeCapacity>,
    /// Gangs placed first (on an empty cluster) to make the running set, with their ends.
    seed_gangs: Vec<(Gang, Option<f64>)>,
    queued: Vec<Gang>,
    queues: Vec<QueueConfig>,
    now: f64,
}

pub(crate) fn arb_node(i: usize) -> impl Strategy<Value = NodeCapacity> {
    (
        0u32..=8,
        proptest::collection::vec(prop::bool::weighted(0.9), 8),
        prop::bool::weighted(0.9),
        prop::option::of(prop_oneof![Just("H100"), Just("A100")]),
        1u64..=16,
        1u64..=16,
        prop::bool::weighted(0.1),
    )
        .prop_map(
            move |(gpus, healthy, schedulable, label, cpu, mem, tainted)| {
                let name = format!("n{i}");
                NodeCapacity {
                    labels: label
                        .map(|l| BTreeMap::from([("gpu".to_owned(), l.to_owned())]))
                        .unwrap_or_default(),
                    gpus: (0..gpus)
                        .map(|g| GpuSlot {
                            index: g,
                            uuid: format!("GPU-{name}-{g}"),
                            product: "X".to_owned(),
                            memory_mib: 1,
                            healthy: healthy[g as usize],
                        })
                        .collect(),
                    name,
                    cpu_milli: cpu * 1000,
                    memory_mib: mem * 1024,
                    schedulable,
                    taints: if tainted {
                        vec![Taint {
                            key: "dedicated".to_owned(),
                            value: "ml".to_owned(),
                            effect: TaintEffect::NoSchedule,
                        }]
                    } else {
                        Vec::new()
                    },
                }
            },
        )
}

pub(crate) fn arb_gang(id: String) -> impl Strategy<Value = Gang> {
    (
        1usize..=4,
        0u32..=8,
        1u64..=4,
        1u64..=4,
        prop::option::of(prop_oneof![Just("H100"), Just("A100")]),
        prop_oneof![Just("fast"), Just("slow")],
        -2i32..=2,
        0u32..1000,
        prop::option::of(1u32..2000),
        prop::option::of(1u32..=3),
        (prop::bool::weighted(0.5), prop::bool::weighted(0.1)),
    )
        .prop_map(
            move |(
                replicas,
                gpus,
                cpu,
                mem,
                label,
                queue,
                priority,
                submit,
                runtime,
                min,
                (tolerates, affine),
            )| Gang {
                id: id.clone(),
                queue: queue.to_owned(),
                priority,
                submitted_at: f64::from(submit),
                replicas: (0..replicas)
                    .map(|r| ReplicaRequest {
                        name: format!("worker-{r}"),
                        resources: Resources {
                            gpus: if r == 0 { gpus } else { gpus.min(4) },
                            cpu_milli: cpu * 1000,
                            memory_mib: mem * 1024,
                        },
                        rule: NodeRule {
                            selector: label
                                .map(|l| BTreeMap::from([("gpu".to_owned(), l.to_owned())]))
                                .unwrap_or_default(),
                            // Not on A100 nodes (unlabelled ones are fine).
                            affinity: if affine {
                                vec![vec![Requirement {
                                    key: "gpu".to_owned(),
                                    field: false,
                                    operator: Operator::NotIn,
                                    values: vec!["A100".to_owned()],
                                }]]
                            } else {
                                Vec::new()
                            },
                            tolerations: if tolerates {
                                vec![Toleration {
                                    key: "dedicated".to_owned(),
                                    exists: true,
                                    value: String::new(),
                                    effect: None,
                                }]
                            } else {
                                Vec::new()
                            },
                        },
                    })
                    .collect(),
                min_available: min.filter(|&m| (m as usize) < replicas),
                declared_runtime_s: runtime.map(f64::from),
            },
        )
}

fn arb_case() -> impl Strategy<Value = Case> {
    (1usize..=6, 0usize..=6, 1usize..=10, 0usize..4)
        .prop_flat_map(|(n, s, q, limits)| {
            let nodes: Vec<_> = (0..n).map(arb_node).collect();
            let seeds: Vec<_> = (0..s)
                .map(|i| {
                    (
                        arb_gang(format!("run{i}")),
                        prop::option::of(1000u32..3000).prop_map(|e| e.map(f64::from)),
                    )
                })
                .collect();
            let queued: Vec<_> = (0..q).map(|i| arb_gang(format!("job{i}"))).collect();
            (nodes, seeds, queued, Just(limits))
        })
        .prop_map(|(nodes, seed_gangs, queued, limits)| Case {
            nodes,
            seed_gangs,
            queued,
            queues: vec![
                QueueConfig {
                    name: "fast".to_owned(),
                    priority: 10,
                    max_running_jobs: (limits & 1 == 1).then_some(3),
                    max_gpus: (limits & 2 == 2).then_some(12),
                },
                QueueConfig {
                    name: "slow".to_owned(),
                    priority: 1,
                    max_running_jobs: None,
                    max_gpus: None,
                },
            ],
            now: 1000.0,
        })
}

/// Places the seed gangs on the empty cluster (with the scheduler itself) to get a valid
/// running set.
fn running_of(case: &Case) -> Vec<RunningGang> {
    let gangs: Vec<Gang> = case.seed_gangs.iter().map(|(g, _)| g.clone()).collect();
    let ends: HashMap<&str, Option<f64>> = case
        .seed_gangs
        .iter()
        .map(|(g, e)| (g.id.as_str(), *e))
        .collect();
    let d = schedule(
        &Snapshot {
            now: 0.0,
            nodes: &case.nodes,
            running: &[],
            queued: &gangs,
            queues: &[],
        },
        &Policy::best_fit(),
    );
    d.placements
        .into_iter()
        .map(|p| RunningGang {
            queue: "fast".to_owned(),
            expected_end: ends[p.gang.as_str()],
            id: p.gang,
            assignments: p.assignments,
        })
        .collect()
}

type Usage = HashMap<String, (BTreeSet<u32>, u64, u64)>;

/// Per node: GPU indices in use, CPU and memory used; fails on a GPU used twice.
fn usage<'a>(
    nodes: &[NodeCapacity],
    holders: impl Iterator<Item = &'a [Assignment]>,
) -> Result<Usage, TestCaseError> {
    let mut used: Usage = HashMap::new();
    for assignments in holders {
        for a in assignments {
            let node = nodes.iter().find(|n| n.name == a.node);
            prop_assert!(node.is_some(), "unknown node {}", a.node);
            let u = used.entry(a.node.clone()).or_default();
            for &g in &a.gpu_indices {
                prop_assert!(u.0.insert(g), "GPU {}:{} used twice", a.node, g);
            }
            u.1 += a.resources.cpu_milli;
            u.2 += a.resources.memory_mib;
        }
    }
    for n in nodes {
        if let Some(u) = used.get(&n.name) {
            prop_assert!(u.1 <= n.cpu_milli, "CPU over capacity on {}", n.name);
            prop_assert!(u.2 <= n.memory_mib, "memory over capacity on {}", n.name);
            for g in &u.0 {
                prop_assert!(
                    n.gpus.iter().any(|s| s.index == *g),
                    "no GPU {g} on {}",
                    n.name
                );
            }
        }
    }
    Ok(used)
}

fn check(case: &Case, policy: &Policy) -> Result<(), TestCaseError> {
    let running = running_of(case);
    let snap = Snapshot {
        now: case.now,
        nodes: &case.nodes,
        running: &running,
        queued: &case.queued,
        queues: &case.queues,
    };
    let d = schedule(&snap, policy);

    // Every queued gang is answered exactly once.
    let mut answered: Vec<&str> = d
        .placements
        .iter()
        .map(|p| p.gang.as_str())
        .chain(d.waiting.iter().map(|w| w.gang.as_str()))
        .collect();
    answered.sort_unstable();
    let mut ids: Vec<&str> = case.queued.iter().map(|g| g.id.as_str()).collect();
    ids.sort_unstable();
    prop_assert_eq!(answered, ids);

    // No over-commit, counting what runs and what was placed.
    usage(
        &case.nodes,
        running
            .iter()
            .map(|r| r.assignments.as_slice())
            .chain(d.placements.iter().map(|p| p.assignments.as_slice())),
    )?;

    for p in &d.placements {
        let gang = case.queued.iter().find(|g| g.id == p.gang).expect("queued");
        // No partial gang: every replica, or at least minAvailable, each once.
        let need = gang
            .min_available
            .map_or(gang.replicas.len(), |m| m as usize);
        prop_assert!(p.assignments.len() >= need, "partial gang {}", p.gang);
        let names: BTreeSet<&str> = p.assignments.iter().map(|a| a.replica.as_str()).collect();
        prop_assert_eq!(names.len(), p.assignments.len());
        for a in &p.assignments {
            let replica = gang
                .replicas
                .iter()
                .find(|r| r.name == a.replica)
                .expect("replica");
            let node = case.nodes.iter().find(|n| n.name == a.node).expect("node");
            prop_assert!(node.schedulable, "placed on drained node {}", node.name);
            prop_assert_eq!(a.gpu_indices.len() as u32, replica.resources.gpus);
            prop_assert_eq!(a.resources, replica.resources);
            prop_assert!(
                replica.rule.admits(node),
                "node rule broken on {}",
                node.name
            );
            for g in &a.gpu_indices {
                let slot = node.gpus.iter().find(|s| s.index == *g).expect("slot");
                prop_assert!(slot.healthy, "unhealthy GPU {}:{} used", node.name, g);
            }
        }
    }

    // Each reservation still fits at its start, once what it waits for has ended and gangs
    // that declared an earlier end are gone: nothing placed now delays it.
    prop_assert!(d.reservations.len() <= policy.reservations.max(1));
    for r in &d.reservations {
        prop_assert_eq!(policy.backfill, Backfill::Reservation);
        let after: BTreeSet<&str> = r.after.iter().map(String::as_str).collect();
        let still_running = running
            .iter()
            .filter(|g| {
                let gone = match (r.start_at, g.expected_end) {
                    (Some(t), Some(e)) => e <= t,
                    _ => false,
                };
                !gone && !after.contains(g.id.as_str())
            })
            .map(|g| g.assignments.as_slice());
        let still_placed = d
            .placements
            .iter()
            .filter(|p| !after.contains(p.gang.as_str()))
            .filter(|p| {
                let gang = case.queued.iter().find(|g| g.id == p.gang).expect("queued");
                match (r.start_at, gang.declared_runtime_s) {
                    (Some(t), Some(rt)) => case.now + rt > t,
                    _ => true,
                }
            })
            .map(|p| p.assignments.as_slice());
        usage(
            &case.nodes,
            still_running
                .chain(still_placed)
                .chain(std::iter::once(r.assignments.as_slice())),
        )?;
        let waiting = d.waiting.iter().find(|w| w.gang == r.gang);
        prop_assert!(
            waiting.is_some(),
            "the reserved gang {} is not waiting",
            r.gang
        );
    }
    // Reservations never share a GPU, and together they fit the nodes.
    usage(
        &case.nodes,
        d.reservations.iter().map(|r| r.assignments.as_slice()),
    )?;
    Ok(())
}

/// Every policy, and the default one as run on estimated run times (several reservations),
/// also with three reservations and the soonest-end release.
pub(crate) fn policies() -> [Policy; 6] {
    let mut three = Policy::agentd().with_runtime_estimates();
    three.reservations = 3;
    three.later_reservations_multi_node = false;
    three.release = ReleaseOrder::SoonestEnd;
    [
        Policy::fifo(),
        Policy::first_fit(),
        Policy::best_fit(),
        Policy::agentd(),
        Policy::agentd().with_runtime_estimates(),
        three,
    ]
}

/// The full pass's decision on a generated case.
fn decide(case: &Case, policy: &Policy) -> Decision {
    let running = running_of(case);
    schedule(
        &Snapshot {
            now: case.now,
            nodes: &case.nodes,
            running: &running,
            queued: &case.queued,
            queues: &case.queues,
        },
        policy,
    )
}

/// The generated cases reach what the checks are for: passes where several gangs hold
/// reservations at once.
#[test]
fn generated_cases_hold_several_reservations() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let policy = Policy::agentd().with_runtime_estimates();
    let mut several = 0;
    for _ in 0..1000 {
        let case = arb_case().new_tree(&mut runner).expect("a case").current();
        let d = decide(&case, &policy);
        several += usize::from(d.reservations.len() > 1);
    }
    assert!(
        several >= 10,
        "only {several} of 1000 cases held several reservations"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn invariants_hold(case in arb_case()) {
        for policy in policies() {
            check(&case, &policy)?;
        }
    }

    #[test]
    fn deterministic_and_queue_order_irrelevant(case in arb_case(), rot in 0usize..10) {
        let running = running_of(&case);
        let mut shuffled = case.queued.clone();
        shuffled.reverse();
        let by = rot % shuffled.len().max(1);
        shuffled.rotate_left(by);
        let mut running_rev = running.clone();
        running_rev.reverse();
        for policy in policies() {
            let snap = |queued: &[Gang], running: &[RunningGang]| {
                schedule(
                    &Snapshot {
                        now: case.now,
                        nodes: &case.nodes,
                        running,
                        queued,
                        queues: &case.queues,
                    },
                    &policy,
                )
            };
            let a = snap(&case.queued, &running);
            prop_assert_eq!(&a, &snap(&case.queued, &running));
            prop_assert_eq!(&a, &snap(&shuffled, &running_rev));
        }
    }
}

/// The generated cases reach tainted nodes: replicas that tolerate the taint placed there
/// (the invariants check that only those are).
#[test]
fn generated_cases_place_tolerating_replicas_on_tainted_nodes() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut on_tainted = 0;
    for _ in 0..400 {
        let case = arb_case().new_tree(&mut runner).expect("a case").current();
        let d = decide(&case, &Policy::agentd());
        on_tainted += d
            .placements
            .iter()
            .flat_map(|p| &p.assignments)
            .filter(|a| {
                case.nodes
                    .iter()
                    .any(|n| n.name == a.node && !n.taints.is_empty())
            })
            .count();
    }
    assert!(
        on_tainted >= 10,
        "only {on_tainted} replicas of 400 cases went to tainted nodes"
    );
}
