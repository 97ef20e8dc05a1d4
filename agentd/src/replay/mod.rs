//! `agentd replay`: replays a job trace against a cluster in virtual time, through the same
//! scheduler core the running agent uses, and reports how long jobs waited, how the GPUs were
//! used and what the scheduler cost, for each policy. It reads files and writes reports; the
//! simulation itself ([`sim`]) is deterministic.

pub mod plot;
pub mod report;
pub mod sim;
#[cfg(test)]
mod tests;
pub mod trace;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::sched::{NodeCapacity, Policy, QueueConfig};
pub use sim::{Engine, JobOutcome, SimOptions, SimResult, simulate};
pub use trace::TraceJob;

/// The format of a job trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// `id,submit_s,duration_s,limit_s,queue,replicas,gpus_per_replica,cpu_milli_per_replica,memory_mib_per_replica`
    Generic,
    /// Alibaba openb pods; `--nodes` is then the openb node list.
    Openb,
    /// The Philly VC trace (Gavel); run times drawn from `philly_runtime.csv`.
    Philly,
    /// The Tiresias 60-job trace.
    Tiresias,
}

/// Arguments of `agentd replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// Cluster description: generic `name,gpus,cpu_milli,memory_mib,gpu_model`, or the openb
    /// node list with `--format openb`.
    #[arg(long, value_name = "NODES.csv", required_unless_present = "cluster")]
    pub nodes: Option<PathBuf>,
    /// A uniform cluster instead of a nodes file: `N`x`G`, N nodes of G GPUs (e.g. 250x8).
    #[arg(long, value_name = "NxG", conflicts_with = "nodes")]
    pub cluster: Option<String>,
    /// The job trace.
    #[arg(long, value_name = "JOBS.csv")]
    pub jobs: PathBuf,
    #[arg(long, value_enum, default_value = "generic")]
    pub format: Format,
    /// Policies to compare (fifo, first-fit, best-fit, default); all four if not given.
    #[arg(long = "policy", value_name = "P")]
    pub policies: Vec<String>,
    /// Compress arrival times by this factor (2 = twice the arrival rate).
    #[arg(long, default_value_t = 1.0)]
    pub load: f64,
    /// Seed for everything drawn at random (Philly run times).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Philly run-time distribution; default `philly_runtime.csv` beside the jobs file.
    #[arg(long, value_name = "FILE")]
    pub runtimes: Option<PathBuf>,
    /// Queues as `name=priority[:jobs=N][:gpus=N]`, comma separated. Default: the queues the
    /// trace names, all priority 0 (`fast=10,slow=1` with `--route limit:S`).
    #[arg(long, value_name = "SPEC")]
    pub queues: Option<String>,
    /// Which queue a job goes to: `trace` (the trace's queue column, the VC for Philly), `one`
    /// (all in queue `default`), or `limit:S` (`fast` if the declared limit is at most S
    /// seconds, else `slow`).
    #[arg(long, default_value = "trace")]
    pub route: String,
    /// For traces without declared run times: declare each job's limit as its true duration
    /// times this factor (a user's estimate that is never too short).
    #[arg(long, value_name = "F")]
    pub limit_factor: Option<f64>,
    /// Print the tables as CSV.
    #[arg(long)]
    pub csv: bool,
    /// Decide with the full pass (every pass worked out from scratch, the scheduler's test
    /// oracle) instead of the incremental scheduler the agent runs; for comparing the two.
    #[arg(long)]
    pub full_pass: bool,
    /// Give jobs that declare no run time an estimate for planning reservations: the 90th
    /// percentile of the last 200 finished jobs of the same queue and GPU count (at least 5;
    /// else of the same queue). Off: every schedule is as without estimates.
    #[arg(long)]
    pub estimate_runtimes: bool,
    /// Write `policy,id,submit_s,start_s,end_s,nodes` per job and policy.
    #[arg(long, value_name = "FILE")]
    pub schedule: Option<PathBuf>,
    /// Draw queue length and GPU allocation over time for each policy.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Trace(#[from] trace::TraceError),
    #[error(transparent)]
    Policy(#[from] crate::sched::SchedError),
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("--{flag}: {message}")]
    Flag { flag: &'static str, message: String },
}

fn flag(flag: &'static str, message: impl Into<String>) -> ReplayError {
    ReplayError::Flag {
        flag,
        message: message.into(),
    }
}

/// Parses `fast=10:jobs=4:gpus=64,slow=1`.
pub fn parse_queues(spec: &str) -> Result<Vec<QueueConfig>, ReplayError> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut fields = part.split(':');
        let head = fields.next().unwrap_or_default();
        let (name, priority) = head
            .split_once('=')
            .ok_or_else(|| flag("queues", format!("`{head}`: expected name=priority")))?;
        let priority: i32 = priority.parse().map_err(|_| {
            flag(
                "queues",
                format!("`{head}`: priority must be a whole number"),
            )
        })?;
        let mut q = QueueConfig {
            name: name.to_owned(),
            priority,
            max_running_jobs: None,
            max_gpus: None,
        };
        for f in fields {
            let parsed = f
                .split_once('=')
                .and_then(|(k, v)| Some((k, v.parse::<u32>().ok()?)));
            match parsed {
                Some(("jobs", n)) => q.max_running_jobs = Some(n),
                Some(("gpus", n)) => q.max_gpus = Some(n),
                _ => {
                    return Err(flag(
                        "queues",
                        format!("`{f}` in `{part}`: allowed limits are jobs=N and gpus=N"),
                    ));
                }
            }
        }
        out.push(q);
    }
    if out.is_empty() {
        return Err(flag("queues", "no queue given"));
    }
    Ok(out)
}

/// Loads the cluster and the trace named by `args`, with load, routing and limits applied.
pub fn load(args: &ReplayArgs) -> Result<(Vec<NodeCapacity>, Vec<TraceJob>), ReplayError> {
    if !(args.load.is_finite() && args.load > 0.0) {
        return Err(flag("load", "must be a number > 0"));
    }
    let nodes = match (&args.nodes, &args.cluster) {
        (_, Some(spec)) => trace::uniform_nodes(spec).ok_or_else(|| {
            flag(
                "cluster",
                format!("`{spec}`: expected NxG, e.g. 250x8 (G at most 128)"),
            )
        })?,
        (Some(path), None) if args.format == Format::Openb => trace::read_openb_nodes(path)?,
        (Some(path), None) => trace::read_generic_nodes(path)?,
        (None, None) => return Err(flag("nodes", "give --nodes FILE or --cluster NxG")),
    };
    let mut jobs = match args.format {
        Format::Generic => trace::read_generic_jobs(&args.jobs)?,
        Format::Openb => trace::read_openb_pods(&args.jobs)?,
        Format::Tiresias => trace::read_tiresias(&args.jobs)?,
        Format::Philly => {
            let runtimes = args.runtimes.clone().unwrap_or_else(|| {
                args.jobs
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join("philly_runtime.csv")
            });
            trace::read_philly(&args.jobs, &runtimes, args.seed)?
        }
    };
    let mut seen = BTreeSet::new();
    for j in &jobs {
        if !seen.insert(j.id.as_str()) {
            return Err(flag(
                "jobs",
                format!("job id `{}` appears more than once", j.id),
            ));
        }
    }
    if let Some(f) = args.limit_factor {
        if !(f.is_finite() && f >= 1.0) {
            return Err(flag("limit-factor", "must be a number >= 1"));
        }
        for j in &mut jobs {
            j.limit_s.get_or_insert((j.duration_s * f).ceil());
        }
    }
    for j in &mut jobs {
        j.submit_s /= args.load;
    }
    route(&args.route, &mut jobs)?;
    Ok((nodes, jobs))
}

fn route(rule: &str, jobs: &mut [TraceJob]) -> Result<(), ReplayError> {
    match rule {
        "trace" => {
            for j in jobs.iter_mut().filter(|j| j.queue.is_empty()) {
                "default".clone_into(&mut j.queue);
            }
        }
        "one" => {
            for j in jobs.iter_mut() {
                "default".clone_into(&mut j.queue);
            }
        }
        _ => {
            let limit = rule
                .strip_prefix("limit:")
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or_else(|| {
                    flag(
                        "route",
                        format!("`{rule}`: allowed: trace, one, limit:SECONDS"),
                    )
                })?;
            for j in jobs.iter_mut() {
                let fast = j.limit_s.is_some_and(|l| l <= limit);
                if fast { "fast" } else { "slow" }.clone_into(&mut j.queue);
            }
        }
    }
    Ok(())
}

/// The queue configuration: `--queues`, or one priority-0 queue per queue the trace names.
pub fn queues(args: &ReplayArgs, jobs: &[TraceJob]) -> Result<Vec<QueueConfig>, ReplayError> {
    let configured = match &args.queues {
        Some(spec) => parse_queues(spec)?,
        None if args.route.starts_with("limit:") => parse_queues("fast=10,slow=1")?,
        None => {
            let names: BTreeSet<&str> = jobs.iter().map(|j| j.queue.as_str()).collect();
            names
                .into_iter()
                .map(|n| QueueConfig {
                    name: n.to_owned(),
                    priority: 0,
                    max_running_jobs: None,
                    max_gpus: None,
                })
                .collect()
        }
    };
    let known: BTreeSet<&str> = configured.iter().map(|q| q.name.as_str()).collect();
    if let Some(j) = jobs.iter().find(|j| !known.contains(j.queue.as_str())) {
        let names: Vec<&str> = known.into_iter().collect();
        return Err(flag(
            "queues",
            format!(
                "job {} goes to queue `{}`, which is not configured; queues: {}",
                j.id,
                j.queue,
                names.join(", ")
            ),
        ));
    }
    Ok(configured)
}

/// Replays under every policy, in parallel, in the order given.
pub fn replay_all(
    nodes: &[NodeCapacity],
    jobs: &[TraceJob],
    policies: &[Policy],
    queues: &[QueueConfig],
    opts: SimOptions,
) -> Vec<SimResult> {
    std::thread::scope(|s| {
        let handles: Vec<_> = policies
            .iter()
            .map(|p| s.spawn(move || simulate(nodes, jobs, p, queues, opts)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// The `--schedule` file.
pub fn schedule_csv(results: &[SimResult]) -> String {
    let mut out = String::from("policy,id,submit_s,start_s,end_s,nodes\n");
    let opt = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v}"));
    for r in results {
        for j in &r.jobs {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{}",
                r.policy,
                j.id,
                j.submit_s,
                opt(j.start_s),
                opt(j.end_s),
                j.nodes.join(";")
            );
        }
    }
    out
}

/// Runs `agentd replay` and prints its tables on stdout.
pub fn run(args: &ReplayArgs) -> Result<(), ReplayError> {
    let started = std::time::Instant::now();
    let names: Vec<&str> = if args.policies.is_empty() {
        Policy::NAMES.to_vec()
    } else {
        args.policies.iter().map(String::as_str).collect()
    };
    let policies = names
        .iter()
        .map(|n| {
            Policy::by_name(n).map(|mut p| {
                p.explain = false;
                p.list_waiting = false;
                p
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (nodes, jobs) = load(args)?;
    let queues = queues(args, &jobs)?;
    let engine = if args.full_pass {
        Engine::Full
    } else {
        Engine::Incremental
    };
    let opts = SimOptions {
        engine,
        estimate_runtimes: args.estimate_runtimes,
    };
    let results = replay_all(&nodes, &jobs, &policies, &queues, opts);
    let gpus: usize = nodes.iter().map(|n| n.gpus.len()).sum();
    if !args.csv {
        println!(
            "{} jobs on {} nodes ({gpus} GPUs), load {}, seed {}; replayed in {:.2} s",
            jobs.len(),
            nodes.len(),
            args.load,
            args.seed,
            started.elapsed().as_secs_f64()
        );
        println!();
    }
    print!("{}", report::waits_table(&results, args.csv));
    println!();
    print!("{}", report::cluster_table(&results, args.csv));
    if args.estimate_runtimes {
        println!();
        print!("{}", report::estimates_table(&results, args.csv));
    }
    if let Some(path) = &args.schedule {
        fs_err::write(path, schedule_csv(&results))?;
    }
    if let Some(path) = &args.plot {
        let title = args
            .jobs
            .file_stem()
            .map_or_else(|| "replay".to_owned(), |s| s.to_string_lossy().into_owned());
        plot::draw(path, &results, &title)?;
    }
    Ok(())
}
