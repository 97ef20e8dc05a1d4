//! The incremental scheduler against the full pass, its oracle: over generated clusters,
//! queues and sequences of events (submits, cancels, finishes, nodes drained, healed or
//! losing a GPU, queue priorities changed, passes at later times), both must make exactly the
//! same placements, reservations and reasons at every pass. The incremental pass hands back only the waiting
//! entries that changed; applied to the entries held from earlier passes they must give the
//! full pass's list.

use std::collections::HashMap;

use proptest::prelude::*;

use super::proptests::{arb_gang, arb_node};
use super::*;

#[derive(Debug, Clone)]
enum Event {
    Submit(Gang),
    /// Cancel the queued gang at this position (modulo the queue's length).
    Cancel(usize),
    /// Finish the running gang at this position.
    Finish(usize),
    /// Flip a node's schedulable flag (drain or resume).
    Drain(usize),
    /// Flip the health of one GPU of a node.
    Health(usize, usize),
    /// Swap the two queues' priorities (a queue configuration reloaded).
    Requeue,
    /// A pass this many seconds after the previous one.
    Pass(u32),
}

fn arb_event(i: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => arb_gang(format!("g{i}")).prop_map(Event::Submit),
        1 => any::<usize>().prop_map(Event::Cancel),
        3 => any::<usize>().prop_map(Event::Finish),
        1 => any::<usize>().prop_map(Event::Drain),
        1 => (any::<usize>(), 0usize..8).prop_map(|(n, g)| Event::Health(n, g)),
        1 => Just(Event::Requeue),
        4 => (0u32..3000).prop_map(Event::Pass),
    ]
}

#[derive(Debug, Clone)]
struct Story {
    nodes: Vec<NodeCapacity>,
    limits: u8,
    events: Vec<Event>,
}

fn arb_story() -> impl Strategy<Value = Story> {
    (1usize..=6, 1usize..=40, 0u8..4)
        .prop_flat_map(|(n, e, limits)| {
            let nodes: Vec<_> = (0..n).map(arb_node).collect();
            let events: Vec<_> = (0..e).map(arb_event).collect();
            (nodes, Just(limits), events)
        })
        .prop_map(|(nodes, limits, events)| Story {
            nodes,
            limits,
            events,
        })
}

fn queues(limits: u8) -> Vec<QueueConfig> {
    vec![
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
    ]
}

/// Plays the story on both schedulers; the full pass gets a snapshot of the model each time.
fn play(story: &Story, policy: &Policy) -> Result<usize, TestCaseError> {
    let mut queues = queues(story.limits);
    let mut nodes = story.nodes.clone();
    let mut queued: Vec<Gang> = Vec::new();
    let mut running: Vec<RunningGang> = Vec::new();
    let mut inc = Scheduler::new(policy.clone(), nodes.clone(), queues.clone());
    let mut now = 0.0;
    let mut placed = 0;
    // The waiting entries as a caller holds them: each pass's changes applied in turn.
    let mut held: HashMap<String, Waiting> = HashMap::new();
    for event in &story.events {
        match event {
            Event::Submit(g) => {
                queued.push(g.clone());
                inc.submit(g.clone());
            }
            Event::Cancel(i) if !queued.is_empty() => {
                let g = queued.remove(i % queued.len());
                prop_assert!(inc.cancel(&g.id));
                held.remove(&g.id);
            }
            Event::Finish(i) if !running.is_empty() => {
                let r = running.swap_remove(i % running.len());
                prop_assert!(inc.finish(&r.id));
            }
            Event::Drain(i) => {
                let n = i % nodes.len();
                nodes[n].schedulable = !nodes[n].schedulable;
                inc.set_nodes(nodes.clone());
            }
            Event::Health(i, g) => {
                let n = i % nodes.len();
                if let Some(slot) = nodes[n].gpus.get_mut(*g) {
                    slot.healthy = !slot.healthy;
                    inc.set_nodes(nodes.clone());
                }
            }
            Event::Requeue => {
                let (a, b) = (queues[0].priority, queues[1].priority);
                (queues[0].priority, queues[1].priority) = (b, a);
                inc.set_queues(queues.clone());
            }
            Event::Pass(dt) => {
                now += f64::from(*dt);
                let full = schedule(
                    &Snapshot {
                        now,
                        nodes: &nodes,
                        running: &running,
                        queued: &queued,
                        queues: &queues,
                    },
                    policy,
                );
                let incremental = inc.pass(now);
                prop_assert!(
                    incremental.waiting.len() <= full.waiting.len(),
                    "more changes than waiting gangs"
                );
                for w in &incremental.waiting {
                    held.insert(w.gang.clone(), w.clone());
                }
                for p in &full.placements {
                    held.remove(&p.gang);
                }
                let mut rebuilt = Decision {
                    waiting: full
                        .waiting
                        .iter()
                        .filter_map(|w| held.get(&w.gang).cloned())
                        .collect(),
                    ..incremental
                };
                prop_assert_eq!(held.len(), full.waiting.len(), "pass at t={}", now);
                prop_assert_eq!(&rebuilt, &full, "pass at t={}", now);
                rebuilt.waiting = inc.waiting();
                prop_assert_eq!(&rebuilt, &full, "the whole list at t={}", now);
                for p in full.placements {
                    let i = queued.iter().position(|g| g.id == p.gang).expect("queued");
                    let g = queued.remove(i);
                    running.push(RunningGang {
                        id: g.id,
                        queue: g.queue,
                        assignments: p.assignments,
                        expected_end: g.declared_runtime_s.map(|d| now + d),
                    });
                    placed += 1;
                }
            }
            Event::Cancel(_) | Event::Finish(_) => {}
        }
    }
    Ok(placed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn incremental_decides_exactly_as_the_full_pass(story in arb_story()) {
        for policy in super::proptests::policies() {
            play(&story, &policy)?;
        }
    }
}

/// A deep queue of one shape that fits nowhere, then a finish that frees room: the shape's
/// answer is reused while nothing is freed and worked out again when something is.
#[test]
fn a_finish_reopens_a_shape_that_fitted_nowhere() {
    use super::tests::{gang, node};
    let nodes = vec![node("a", 8), node("b", 8)];
    let policy = Policy::agentd();
    let mut inc = Scheduler::new(policy.clone(), nodes, Vec::new());
    inc.submit(gang("big-a", 0.0, 1, 8));
    inc.submit(gang("big-b", 1.0, 1, 8));
    let d = inc.pass(2.0);
    assert_eq!(d.placements.len(), 2);
    for i in 0..100 {
        inc.submit(gang(&format!("w{i:03}"), 3.0 + f64::from(i), 1, 4));
    }
    for t in 0..5 {
        let d = inc.pass(200.0 + f64::from(t));
        assert!(d.placements.is_empty());
        assert_eq!(d.waiting_counts[reason::UNSCHEDULABLE], 100);
        // Listed once; after that nothing about them changes.
        assert_eq!(d.waiting.len(), if t == 0 { 100 } else { 0 });
        assert_eq!(inc.waiting().len(), 100);
    }
    assert!(inc.finish("big-a"));
    let d = inc.pass(300.0);
    let placed: Vec<&str> = d.placements.iter().map(|p| p.gang.as_str()).collect();
    assert_eq!(placed, ["w000", "w001"]);
    assert_eq!(inc.queued().count(), 98);
    assert_eq!(inc.running().count(), 3);
}

/// The reservation releases running gangs without a declared end in order of how busy their
/// nodes are, then by id; a gang placed earlier in the same pass must take its place by id
/// among the running ones, not after them.
#[test]
fn a_gang_placed_in_the_pass_is_ordered_by_id_for_the_reservation() {
    use super::tests::{gang, node};
    let nodes = vec![node("a", 2), node("b", 2)];
    let running = |id: &str, node: &str, gpus: Vec<u32>| RunningGang {
        id: id.to_owned(),
        queue: "fast".to_owned(),
        assignments: vec![Assignment {
            replica: "worker-0".to_owned(),
            node: node.to_owned(),
            resources: Resources {
                gpus: gpus.len() as u32,
                cpu_milli: 1000,
                memory_mib: 1024,
            },
            gpu_indices: gpus,
        }],
        expected_end: None,
    };
    let run = vec![
        running("y-run", "b", vec![0, 1]),
        running("z-run", "a", vec![0]),
    ];
    let queued = vec![gang("a-new", 0.0, 1, 1), gang("h", 1.0, 1, 2)];
    let policy = Policy::agentd();
    let full = schedule(
        &Snapshot {
            now: 10.0,
            nodes: &nodes,
            running: &run,
            queued: &queued,
            queues: &[],
        },
        &policy,
    );
    let mut inc = Scheduler::new(policy, nodes, Vec::new());
    for r in run {
        inc.start(r);
    }
    for g in queued {
        inc.submit(g);
    }
    let d = inc.pass(10.0);
    assert_eq!(d, full, "the first pass lists every waiting gang");
    let r = d
        .reservations
        .into_iter()
        .next()
        .expect("h holds a reservation");
    assert_eq!(r.after, ["a-new", "y-run"]);
}
