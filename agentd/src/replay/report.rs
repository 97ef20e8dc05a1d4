//! Tables of a replay: per policy and queue (waits and completion times), and per policy (how
//! the cluster was used and what the scheduler cost).

use std::fmt::Write as _;

use super::sim::SimResult;

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Waiting and completion statistics of a set of jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueStats {
    pub jobs: usize,
    pub started: usize,
    pub mean_wait_s: f64,
    pub p50_wait_s: f64,
    pub p95_wait_s: f64,
    pub p99_wait_s: f64,
    pub max_wait_s: f64,
    pub mean_jct_s: f64,
    pub p95_jct_s: f64,
}

/// Statistics of the jobs of `result` in `queue` (all jobs if `None`). Jobs that never started
/// count in `jobs` but not in the waits.
pub fn queue_stats(result: &SimResult, queue: Option<&str>) -> QueueStats {
    let jobs: Vec<_> = result
        .jobs
        .iter()
        .filter(|j| queue.is_none_or(|q| j.queue == q))
        .collect();
    let mut waits: Vec<f64> = jobs
        .iter()
        .filter_map(|j| j.start_s.map(|s| s - j.submit_s))
        .collect();
    let mut jcts: Vec<f64> = jobs
        .iter()
        .filter_map(|j| j.end_s.map(|e| e - j.submit_s))
        .collect();
    waits.sort_by(f64::total_cmp);
    jcts.sort_by(f64::total_cmp);
    QueueStats {
        jobs: jobs.len(),
        started: waits.len(),
        mean_wait_s: mean(&waits),
        p50_wait_s: percentile(&waits, 50.0),
        p95_wait_s: percentile(&waits, 95.0),
        p99_wait_s: percentile(&waits, 99.0),
        max_wait_s: waits.last().copied().unwrap_or(0.0),
        mean_jct_s: mean(&jcts),
        p95_jct_s: percentile(&jcts, 95.0),
    }
}

/// Whole-cluster figures of one policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStats {
    pub makespan_s: f64,
    pub alloc_mean: f64,
    pub alloc_at_first_wait: Option<f64>,
    pub idle_while_waiting_gpu_h: f64,
    pub idle_while_fit_waited_gpu_h: f64,
    pub idle_under_reservation_gpu_h: f64,
    pub passes: u64,
    pub sched_ms: f64,
}

pub fn cluster_stats(r: &SimResult) -> ClusterStats {
    let first = r
        .jobs
        .iter()
        .map(|j| j.submit_s)
        .fold(f64::INFINITY, f64::min);
    let last = r.jobs.iter().filter_map(|j| j.end_s).fold(0.0, f64::max);
    ClusterStats {
        makespan_s: if first.is_finite() {
            (last - first).max(0.0)
        } else {
            0.0
        },
        alloc_mean: r.alloc_mean,
        alloc_at_first_wait: r.alloc_at_first_wait,
        idle_while_waiting_gpu_h: r.idle_while_waiting_gpu_s / 3600.0,
        idle_while_fit_waited_gpu_h: r.idle_while_fit_waited_gpu_s / 3600.0,
        idle_under_reservation_gpu_h: r.idle_under_reservation_gpu_s / 3600.0,
        passes: r.passes,
        sched_ms: r.sched_time.as_secs_f64() * 1000.0,
    }
}

/// The queues of a result, sorted, then `None` for all jobs.
fn queues_of(r: &SimResult) -> Vec<Option<String>> {
    let mut names: Vec<String> = r.jobs.iter().map(|j| j.queue.clone()).collect();
    names.sort();
    names.dedup();
    let mut out: Vec<Option<String>> = if names.len() > 1 {
        names.into_iter().map(Some).collect()
    } else {
        Vec::new()
    };
    out.push(None);
    out
}

fn render(rows: &[Vec<String>], csv: bool) -> String {
    let mut out = String::new();
    if csv {
        for row in rows {
            out.push_str(&row.join(","));
            out.push('\n');
        }
        return out;
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for (i, row) in rows.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c < 2 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("  "));
            out.push('\n');
        }
    }
    out
}

fn secs(v: f64) -> String {
    format!("{v:.0}")
}

/// The waiting table: one row per policy and queue, plus one for all of a policy's jobs.
pub fn waits_table(results: &[SimResult], csv: bool) -> String {
    let mut rows = vec![
        [
            "policy",
            "queue",
            "jobs",
            "started",
            "mean_wait_s",
            "p50_wait_s",
            "p95_wait_s",
            "p99_wait_s",
            "max_wait_s",
            "mean_jct_s",
            "p95_jct_s",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in results {
        for q in queues_of(r) {
            let s = queue_stats(r, q.as_deref());
            rows.push(vec![
                r.policy.clone(),
                q.unwrap_or_else(|| "(all)".to_owned()),
                s.jobs.to_string(),
                s.started.to_string(),
                secs(s.mean_wait_s),
                secs(s.p50_wait_s),
                secs(s.p95_wait_s),
                secs(s.p99_wait_s),
                secs(s.max_wait_s),
                secs(s.mean_jct_s),
                secs(s.p95_jct_s),
            ]);
        }
    }
    render(&rows, csv)
}

/// The cluster table: one row per policy.
pub fn cluster_table(results: &[SimResult], csv: bool) -> String {
    let mut rows = vec![
        [
            "policy",
            "gpus",
            "makespan_s",
            "alloc_mean",
            "alloc_at_first_wait",
            "idle_gpu_h_while_waiting",
            "idle_gpu_h_fit_waited",
            "idle_gpu_h_reserved",
            "passes",
            "sched_ms",
            "us_per_pass",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in results {
        let c = cluster_stats(r);
        let mut row = vec![
            r.policy.clone(),
            r.total_gpus.to_string(),
            secs(c.makespan_s),
            format!("{:.3}", c.alloc_mean),
            c.alloc_at_first_wait
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.3}")),
            format!("{:.0}", c.idle_while_waiting_gpu_h),
            format!("{:.0}", c.idle_while_fit_waited_gpu_h),
            format!("{:.0}", c.idle_under_reservation_gpu_h),
            c.passes.to_string(),
            format!("{:.0}", c.sched_ms),
            String::new(),
        ];
        let per = if c.passes == 0 {
            0.0
        } else {
            c.sched_ms * 1000.0 / c.passes as f64
        };
        let _ = write!(row[10], "{per:.0}");
        rows.push(row);
    }
    render(&rows, csv)
}

/// How good the run-time estimates were: how many jobs got one, how many ran longer than their
/// estimate, and the median and 90th percentile of true run time over estimate.
pub fn estimates_table(results: &[SimResult], csv: bool) -> String {
    let mut rows = vec![
        [
            "policy",
            "estimated_jobs",
            "too_short",
            "too_short_pct",
            "p50_true_over_estimate",
            "p90_true_over_estimate",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in results {
        let mut ratios: Vec<f64> = r
            .estimates
            .iter()
            .filter(|(e, _)| *e > 0.0)
            .map(|(e, t)| t / e)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let at = |q: f64| -> String {
            if ratios.is_empty() {
                return "-".to_owned();
            }
            let i = ((q * ratios.len() as f64).ceil() as usize).clamp(1, ratios.len()) - 1;
            format!("{:.2}", ratios[i])
        };
        let short = r.estimates.iter().filter(|(e, t)| t > e).count();
        let pct = if r.estimates.is_empty() {
            0.0
        } else {
            100.0 * short as f64 / r.estimates.len() as f64
        };
        rows.push(vec![
            r.policy.clone(),
            r.estimates.len().to_string(),
            short.to_string(),
            format!("{pct:.1}"),
            at(0.5),
            at(0.9),
        ]);
    }
    render(&rows, csv)
}
