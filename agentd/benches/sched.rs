//! One scheduling pass on 5,000 nodes of 8 GPUs with 1,000 queued gangs of mixed sizes, for
//! each policy; strict FIFO is the baseline. Two clusters: empty (every gang is placed: the
//! placement rate) and 85% busy (most gangs wait, the default policy plans a reservation).
//!
//! Then the deep queue: 10,000 queued gangs on the full cluster, and the pass that follows one
//! job's finish, by the full pass (the baseline), by the incremental scheduler listing every
//! waiting gang (as it did before it handed back changes only), and by the incremental
//! scheduler handing back only the waiting entries that changed, each policy and the default
//! policy as run on estimated run times (`default+est`: several reservations).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use agentd::sched::{
    Assignment, Decision, Gang, GpuSlot, NodeCapacity, NodeRule, Policy, QueueConfig,
    ReplicaRequest, Resources, RunningGang, Scheduler, Snapshot, schedule,
};
use criterion::{BatchSize, BenchmarkId, Criterion};

const NODES: usize = 5_000;
const GPUS: u32 = 8;
const GANGS: usize = 1_000;
const DEEP: usize = 10_000;

fn nodes() -> Vec<NodeCapacity> {
    (0..NODES)
        .map(|i| NodeCapacity {
            name: format!("node-{i:05}"),
            labels: BTreeMap::from([("zone".to_owned(), format!("z{}", i % 4))]),
            gpus: (0..GPUS)
                .map(|g| GpuSlot {
                    index: g,
                    uuid: format!("GPU-{i}-{g}"),
                    product: "H100".to_owned(),
                    memory_mib: 81_920,
                    // One GPU in 97 is unhealthy.
                    healthy: !(i * 8 + g as usize).is_multiple_of(97),
                })
                .collect(),
            cpu_milli: 128_000,
            memory_mib: 1_024_000,
            schedulable: !i.is_multiple_of(250),
            taints: Vec::new(),
        })
        .collect()
}

/// Mixed sizes as in the Philly trace: mostly 1 GPU, some 2/4/8, a few 16/32/64.
fn gang(i: usize) -> Gang {
    let (replicas, gpus) = match i % 20 {
        0..=9 => (1, 1),
        10 | 11 => (1, 2),
        12 | 13 => (1, 4),
        14..=16 => (1, 8),
        17 => (2, 8),
        18 => (4, 8),
        _ => (8, 8),
    };
    Gang {
        id: format!("job-{i:05}"),
        queue: if i.is_multiple_of(3) { "slow" } else { "fast" }.to_owned(),
        priority: (i % 5) as i32,
        submitted_at: i as f64,
        replicas: (0..replicas)
            .map(|r| ReplicaRequest {
                name: format!("worker-{r}"),
                resources: Resources {
                    gpus,
                    cpu_milli: 4_000 * u64::from(gpus),
                    memory_mib: 32_000 * u64::from(gpus),
                },
                rule: NodeRule::default(),
            })
            .collect(),
        min_available: None,
        declared_runtime_s: i
            .is_multiple_of(2)
            .then_some(3_600.0 + (i % 7) as f64 * 600.0),
    }
}

fn queues() -> Vec<QueueConfig> {
    ["fast", "slow"]
        .iter()
        .zip([10, 1])
        .map(|(n, p)| QueueConfig {
            name: (*n).to_owned(),
            priority: p,
            max_running_jobs: None,
            max_gpus: None,
        })
        .collect()
}

/// Fills `fraction` of the cluster with running 4-GPU gangs with declared ends.
fn busy(nodes: &[NodeCapacity], fraction: f64) -> Vec<RunningGang> {
    let mut out = Vec::new();
    let mut k = 0u32;
    for n in nodes.iter().take((nodes.len() as f64 * fraction) as usize) {
        for half in 0..2u32 {
            out.push(RunningGang {
                id: format!("run-{k:06}"),
                queue: "fast".to_owned(),
                assignments: vec![Assignment {
                    replica: "worker-0".to_owned(),
                    node: n.name.clone(),
                    gpu_indices: (half * 4..half * 4 + 4).collect(),
                    resources: Resources {
                        gpus: 4,
                        cpu_milli: 16_000,
                        memory_mib: 128_000,
                    },
                }],
                expected_end: (!k.is_multiple_of(3)).then_some(1_000.0 + f64::from(k)),
            });
            k += 1;
        }
    }
    out
}

fn policies() -> Vec<Policy> {
    Policy::NAMES
        .iter()
        .map(|n| Policy::by_name(n).expect("known policy"))
        .collect()
}

/// Each policy by name, and the default policy as the agent runs it on estimated run times
/// (several reservations), as `default+est`.
fn deep_policies() -> Vec<(&'static str, Policy)> {
    policies()
        .into_iter()
        .map(|p| (p.name, p))
        .chain([("default+est", Policy::agentd().with_runtime_estimates())])
        .collect()
}

fn main() {
    let nodes = nodes();
    let queued: Vec<Gang> = (0..GANGS).map(gang).collect();
    let queues = queues();
    let scenarios = [("empty", Vec::new()), ("busy85", busy(&nodes, 0.85))];
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    let mut group = c.benchmark_group("sched");
    for (name, running) in &scenarios {
        for policy in policies() {
            let snap = Snapshot {
                now: 500.0,
                nodes: &nodes,
                running,
                queued: &queued,
                queues: &queues,
            };
            group.bench_with_input(BenchmarkId::new(*name, policy.name), &snap, |b, snap| {
                b.iter(|| schedule(black_box(snap), &policy));
            });
        }
    }
    group.finish();
    let deep = deep_queue(&nodes, &queues, &mut c);

    // The figures the targets are stated in, measured here with a plain clock.
    println!();
    println!(
        "{NODES} nodes x {GPUS} GPUs, {GANGS} queued gangs; one pass (mean of 20), fifo is the baseline"
    );
    println!(
        "{:<8} {:<10} {:>9} {:>9} {:>9} {:>14} {:>10}",
        "cluster", "policy", "pass_ms", "vs_fifo", "placed", "replicas/s", "waiting"
    );
    for (name, running) in &scenarios {
        let mut base = None;
        for policy in policies() {
            let snap = Snapshot {
                now: 500.0,
                nodes: &nodes,
                running,
                queued: &queued,
                queues: &queues,
            };
            let d = schedule(&snap, &policy);
            let started = Instant::now();
            for _ in 0..20 {
                black_box(schedule(black_box(&snap), &policy));
            }
            let pass = started.elapsed().as_secs_f64() / 20.0;
            let base = *base.get_or_insert(pass);
            let replicas: usize = d.placements.iter().map(|p| p.assignments.len()).sum();
            println!(
                "{:<8} {:<10} {:>9.2} {:>8.2}x {:>9} {:>14.0} {:>10}",
                name,
                policy.name,
                pass * 1e3,
                pass / base,
                d.placements.len(),
                replicas as f64 / pass,
                d.waiting.len()
            );
        }
    }
    println!();
    println!(
        "{NODES} nodes x {GPUS} GPUs all busy, {DEEP} queued gangs; the pass after one job finishes (median of 30); the full pass is the baseline"
    );
    println!(
        "{:<12} {:>12} {:>14} {:>14} {:>9} {:>8} {:>8}",
        "policy", "full_pass_ms", "listing_all_ms", "changes_ms", "speedup", "placed", "changed"
    );
    for row in deep {
        println!(
            "{:<12} {:>12.2} {:>14.3} {:>14.3} {:>8.0}x {:>8} {:>8}",
            row.policy,
            row.full_s * 1e3,
            row.listing_s * 1e3,
            row.incremental_s * 1e3,
            row.full_s / row.incremental_s,
            row.placed,
            row.changed
        );
    }
}

struct DeepRow {
    policy: &'static str,
    full_s: f64,
    listing_s: f64,
    incremental_s: f64,
    placed: usize,
    changed: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// 10,000 queued gangs on a full cluster; one running gang finishes and a pass follows.
fn deep_queue(nodes: &[NodeCapacity], queues: &[QueueConfig], c: &mut Criterion) -> Vec<DeepRow> {
    let running = busy(nodes, 1.0);
    let queued: Vec<Gang> = (0..DEEP).map(gang).collect();
    let finished = "run-000002";
    let after: Vec<RunningGang> = running
        .iter()
        .filter(|r| r.id != finished)
        .cloned()
        .collect();
    let mut rows = Vec::new();
    let mut group = c.benchmark_group("deep");
    for (name, policy) in deep_policies() {
        let mut warm = Scheduler::new(policy.clone(), nodes.to_vec(), queues.to_vec());
        for r in &running {
            warm.start(r.clone());
        }
        for g in &queued {
            warm.submit(g.clone());
        }
        let first = warm.pass(500.0);
        assert!(first.placements.is_empty(), "the cluster should be full");
        let snap = Snapshot {
            now: 501.0,
            nodes,
            running: &after,
            queued: &queued,
            queues,
        };
        let full = schedule(&snap, &policy);
        let mut check = warm.clone();
        check.finish(finished);
        let changes = check.pass(501.0);
        let changed = changes.waiting.len();
        let whole = Decision {
            waiting: check.waiting(),
            ..changes
        };
        assert_eq!(whole, full, "the two passes disagree");
        group.bench_function(BenchmarkId::new("full_pass", name), |b| {
            b.iter(|| schedule(black_box(&snap), &policy));
        });
        group.bench_function(BenchmarkId::new("listing_all", name), |b| {
            b.iter_batched_ref(
                || warm.clone(),
                |s| {
                    s.relist();
                    s.finish(finished);
                    s.pass(501.0)
                },
                BatchSize::LargeInput,
            );
        });
        group.bench_function(BenchmarkId::new("incremental", name), |b| {
            // By reference, so dropping the clone is not timed.
            b.iter_batched_ref(
                || warm.clone(),
                |s| {
                    s.finish(finished);
                    s.pass(501.0)
                },
                BatchSize::LargeInput,
            );
        });
        let (mut full_times, mut listing_times, mut changes_times) =
            (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..30 {
            let started = Instant::now();
            black_box(schedule(black_box(&snap), &policy));
            full_times.push(started.elapsed().as_secs_f64());
            let mut s = warm.clone();
            let started = Instant::now();
            s.relist();
            s.finish(finished);
            black_box(s.pass(501.0));
            listing_times.push(started.elapsed().as_secs_f64());
            let mut s = warm.clone();
            let started = Instant::now();
            s.finish(finished);
            black_box(s.pass(501.0));
            changes_times.push(started.elapsed().as_secs_f64());
        }
        rows.push(DeepRow {
            policy: name,
            full_s: median(full_times),
            listing_s: median(listing_times),
            incremental_s: median(changes_times),
            placed: full.placements.len(),
            changed,
        });
    }
    group.finish();
    rows
}
