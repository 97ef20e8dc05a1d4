//! The virtual-time simulator: arrivals and completions are events, and after each distinct
//! event time one pass of the real scheduler core decides what starts. Nothing here reads the
//! clock except to measure how long the scheduler itself takes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::trace::TraceJob;
use crate::sched::{
    Decision, ESTIMATE_MIN_SAMPLES, ESTIMATE_QUANTILE, ESTIMATE_WINDOW, Gang, NodeCapacity, Policy,
    QueueConfig, ReplicaRequest, Resources, RunningGang, RuntimeEstimator, Scheduler, Snapshot,
    planned_end, reason, schedule,
};

/// How a replay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimOptions {
    pub engine: Engine,
    /// Give jobs that declare no run time an estimate learned from finished jobs of the same
    /// queue and size (then the same queue).
    pub estimate_runtimes: bool,
}

/// The keys a job's run time is learned and estimated under, most specific first.
fn estimate_keys(job: &TraceJob) -> [String; 2] {
    [
        format!(
            "queue={},gpus={}",
            job.queue,
            job.replicas * job.gpus_per_replica
        ),
        format!("queue={}", job.queue),
    ]
}

/// Which implementation of the scheduler core decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Engine {
    /// [`Scheduler`]: state kept between passes (what the agent runs).
    #[default]
    Incremental,
    /// [`schedule`]: every pass worked out from a snapshot (the oracle and the baseline).
    Full,
}

/// The scheduler of one replay: the incremental one, or the full pass over a snapshot kept
/// here.
enum Core {
    Incremental(Box<Scheduler>),
    Full {
        queued: Vec<Gang>,
        running: Vec<RunningGang>,
    },
}

/// What happened to one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub id: String,
    pub queue: String,
    pub submit_s: f64,
    pub start_s: Option<f64>,
    pub end_s: Option<f64>,
    pub nodes: Vec<String>,
}

/// The cluster after one pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t: f64,
    pub queued: usize,
    pub allocated_gpus: u64,
}

/// A whole replay under one policy.
#[derive(Debug, Clone)]
pub struct SimResult {
    pub policy: String,
    pub jobs: Vec<JobOutcome>,
    pub samples: Vec<Sample>,
    pub total_gpus: u64,
    pub passes: u64,
    pub sched_time: Duration,
    /// GPU allocation ratio at the first pass that left a gang waiting for room.
    pub alloc_at_first_wait: Option<f64>,
    /// GPU-seconds free while at least one gang waited.
    pub idle_while_waiting_gpu_s: f64,
    /// GPU-seconds free while a gang that fitted was held back, other than by a reservation.
    pub idle_while_fit_waited_gpu_s: f64,
    /// GPU-seconds free while a gang that fitted was held back by the reservation.
    pub idle_under_reservation_gpu_s: f64,
    /// Time-weighted mean GPU allocation ratio from the first submit to the last end.
    pub alloc_mean: f64,
    /// For each job that was given a run-time estimate: (estimate, true run time), seconds.
    pub estimates: Vec<(f64, f64)>,
}

fn gang_of(job: &TraceJob) -> Gang {
    Gang {
        id: job.id.clone(),
        queue: job.queue.clone(),
        priority: 0,
        submitted_at: job.submit_s,
        replicas: (0..job.replicas)
            .map(|i| ReplicaRequest {
                name: format!("worker-{i}"),
                resources: Resources {
                    gpus: job.gpus_per_replica,
                    cpu_milli: job.cpu_milli_per_replica,
                    memory_mib: job.memory_mib_per_replica,
                },
                rule: crate::sched::NodeRule::default(),
            })
            .collect(),
        min_available: None,
        declared_runtime_s: job.limit_s,
    }
}

/// Event times are non-negative, so their bit patterns order like the numbers.
fn key(t: f64) -> u64 {
    t.max(0.0).to_bits()
}

/// Replays `jobs` (ids must be unique) on `nodes` under `policy`.
pub fn simulate(
    nodes: &[NodeCapacity],
    jobs: &[TraceJob],
    policy: &Policy,
    queues: &[QueueConfig],
    opts: SimOptions,
) -> SimResult {
    // With estimated run times the policy plans as the agent does with them.
    let estimated;
    let policy = if opts.estimate_runtimes {
        estimated = policy.clone().with_runtime_estimates();
        &estimated
    } else {
        policy
    };
    let total_gpus: u64 = nodes.iter().map(|n| n.gpus.len() as u64).sum();
    let by_id: HashMap<&str, usize> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.id.as_str(), i))
        .collect();
    let mut arrivals: Vec<usize> = (0..jobs.len()).collect();
    arrivals.sort_by(|&a, &b| {
        jobs[a]
            .submit_s
            .total_cmp(&jobs[b].submit_s)
            .then(a.cmp(&b))
    });
    let mut outcomes: Vec<JobOutcome> = jobs
        .iter()
        .map(|j| JobOutcome {
            id: j.id.clone(),
            queue: j.queue.clone(),
            submit_s: j.submit_s,
            start_s: None,
            end_s: None,
            nodes: Vec::new(),
        })
        .collect();
    let mut completions: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut estimator = opts
        .estimate_runtimes
        .then(|| {
            RuntimeEstimator::new(ESTIMATE_QUANTILE, ESTIMATE_MIN_SAMPLES, ESTIMATE_WINDOW).ok()
        })
        .flatten();
    // What the scheduler is told of each job's run time: declared, else estimated.
    let mut planned: Vec<Option<f64>> = jobs.iter().map(|j| j.limit_s).collect();
    let mut estimates = Vec::new();
    // Running jobs planned on an estimate, by the end they are planned to reach: one that
    // proves too short is planned as the agent plans it (`planned_end`: no end known).
    let mut estimated_ends: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut core = match opts.engine {
        Engine::Incremental => Core::Incremental(Box::new(Scheduler::new(
            policy.clone(),
            nodes.to_vec(),
            queues.to_vec(),
        ))),
        Engine::Full => Core::Full {
            queued: Vec::new(),
            running: Vec::new(),
        },
    };
    let mut queued_len = 0usize;
    let mut samples = Vec::new();
    let mut next_arrival = 0usize;
    let (mut passes, mut sched_time) = (0u64, Duration::ZERO);
    let mut allocated = 0u64;
    let mut alloc_at_first_wait = None;
    let (mut idle_wait, mut idle_fit, mut idle_res, mut alloc_area) = (0.0, 0.0, 0.0, 0.0);
    // What held between the previous event and this one.
    let mut prev: Option<(f64, bool, bool, bool)> = None;
    let mut first_t: Option<f64> = None;
    let mut last_t = 0.0;
    loop {
        let t_arr = arrivals.get(next_arrival).map(|&j| jobs[j].submit_s);
        let t_done = completions.peek().map(|Reverse((t, _))| f64::from_bits(*t));
        let t = match (t_arr, t_done) {
            (None, None) => break,
            (Some(a), None) => a,
            (None, Some(d)) => d,
            (Some(a), Some(d)) => a.min(d),
        };
        if let Some((pt, waiting, fit, res)) = prev {
            let dt = t - pt;
            let free = (total_gpus - allocated) as f64;
            alloc_area += allocated as f64 * dt;
            if waiting {
                idle_wait += free * dt;
            }
            if fit {
                idle_fit += free * dt;
            }
            if res {
                idle_res += free * dt;
            }
        }
        first_t.get_or_insert(t);
        last_t = t;
        let mut done: HashSet<&str> = HashSet::new();
        while let Some(Reverse((tk, j))) = completions.peek().copied() {
            if tk > key(t) {
                break;
            }
            completions.pop();
            done.insert(jobs[j].id.as_str());
            allocated -= u64::from(jobs[j].replicas * jobs[j].gpus_per_replica);
            if let Some(e) = estimator.as_mut() {
                e.record(&estimate_keys(&jobs[j]), jobs[j].duration_s);
            }
        }
        match &mut core {
            Core::Incremental(s) => {
                for id in &done {
                    s.finish(id);
                }
            }
            Core::Full { running, .. } => {
                if !done.is_empty() {
                    running.retain(|r| !done.contains(r.id.as_str()));
                }
            }
        }
        while let Some(&j) = arrivals.get(next_arrival) {
            if jobs[j].submit_s > t {
                break;
            }
            let mut gang = gang_of(&jobs[j]);
            if gang.declared_runtime_s.is_none()
                && let Some(e) = estimator
                    .as_ref()
                    .and_then(|e| e.estimate(&estimate_keys(&jobs[j])))
            {
                gang.declared_runtime_s = Some(e.seconds);
                planned[j] = Some(e.seconds);
                estimates.push((e.seconds, jobs[j].duration_s));
            }
            match &mut core {
                Core::Incremental(s) => s.submit(gang),
                Core::Full { queued, .. } => queued.push(gang),
            }
            queued_len += 1;
            next_arrival += 1;
        }
        while let Some(Reverse((end, j))) = estimated_ends.peek().copied() {
            if end > key(t) {
                break;
            }
            estimated_ends.pop();
            let (Some(start), Some(estimate)) = (outcomes[j].start_s, planned[j]) else {
                continue;
            };
            if outcomes[j].end_s.is_some_and(|e| e <= t) {
                continue;
            }
            let end = planned_end(start, estimate, t);
            match &mut core {
                Core::Incremental(s) => {
                    if let Some(gang) = s.running_gang(&jobs[j].id) {
                        let gang = RunningGang {
                            expected_end: end,
                            ..gang.clone()
                        };
                        s.start(gang);
                    }
                }
                Core::Full { running, .. } => {
                    if let Some(gang) = running.iter_mut().find(|r| r.id == jobs[j].id) {
                        gang.expected_end = end;
                    }
                }
            }
            if let Some(end) = end {
                estimated_ends.push(Reverse((key(end), j)));
            }
        }
        let (mut any_wait, mut any_fit, mut any_res) = (false, false, false);
        if queued_len > 0 {
            let started = Instant::now();
            let decision: Decision = match &mut core {
                Core::Incremental(s) => s.pass(t),
                Core::Full { queued, running } => schedule(
                    &Snapshot {
                        now: t,
                        nodes,
                        running,
                        queued,
                        queues,
                    },
                    policy,
                ),
            };
            sched_time += started.elapsed();
            passes += 1;
            let mut placed: HashSet<String> = HashSet::new();
            for p in decision.placements {
                let j = by_id[p.gang.as_str()];
                let job = &jobs[j];
                let end = t + job.duration_s;
                let o = &mut outcomes[j];
                o.start_s = Some(t);
                o.end_s = Some(end);
                let mut on: Vec<String> = p.assignments.iter().map(|a| a.node.clone()).collect();
                on.dedup();
                o.nodes = on;
                allocated += p
                    .assignments
                    .iter()
                    .map(|a| a.gpu_indices.len() as u64)
                    .sum::<u64>();
                completions.push(Reverse((key(end), j)));
                if job.limit_s.is_none()
                    && let Some(estimate) = planned[j]
                {
                    estimated_ends.push(Reverse((key(t + estimate), j)));
                }
                if let Core::Full { running, .. } = &mut core {
                    running.push(RunningGang {
                        id: job.id.clone(),
                        queue: job.queue.clone(),
                        assignments: p.assignments,
                        expected_end: planned[j].map(|l| t + l),
                    });
                }
                placed.insert(p.gang);
            }
            queued_len -= placed.len();
            if let Core::Full { queued, .. } = &mut core
                && !placed.is_empty()
            {
                queued.retain(|g| !placed.contains(&g.id));
            }
            let count = |r: &str| decision.waiting_counts.get(r).copied().unwrap_or(0);
            any_fit = count(reason::BLOCKED) > 0;
            any_res = count(reason::RESERVED) > 0;
            if alloc_at_first_wait.is_none()
                && count(reason::UNSCHEDULABLE) + count(reason::BLOCKED) > 0
            {
                alloc_at_first_wait = Some(allocated as f64 / total_gpus.max(1) as f64);
            }
            any_wait = queued_len > 0;
        }
        prev = Some((t, any_wait, any_fit, any_res));
        samples.push(Sample {
            t,
            queued: queued_len,
            allocated_gpus: allocated,
        });
    }
    let span = last_t - first_t.unwrap_or(0.0);
    SimResult {
        policy: policy.name.to_owned(),
        jobs: outcomes,
        samples,
        total_gpus,
        passes,
        sched_time,
        alloc_at_first_wait,
        idle_while_waiting_gpu_s: idle_wait,
        idle_while_fit_waited_gpu_s: idle_fit,
        idle_under_reservation_gpu_s: idle_res,
        alloc_mean: if span > 0.0 && total_gpus > 0 {
            alloc_area / span / total_gpus as f64
        } else {
            0.0
        },
        estimates,
    }
}
