//! Replays of small hand-written traces whose schedule is worked out by hand.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Parser;

use super::*;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    fs_err::write(&path, text).expect("write");
    path
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: ReplayArgs,
}

fn args(argv: &[&str]) -> ReplayArgs {
    Cli::try_parse_from(std::iter::once("replay").chain(argv.iter().copied()))
        .expect("valid flags")
        .args
}

/// One node of 4 GPUs.
/// a: t=0, 2 GPUs, runs 100 s, declares 150 s.
/// b: t=10, 4 GPUs, runs 100 s: cannot start until a ends.
/// c: t=20, 2 GPUs, runs 50 s, declares 60 s: ends by t=80, before a's declared end.
/// d: t=30, 1 GPU, runs 500 s, declares nothing.
const NODES: &str = "name,gpus,cpu_milli,memory_mib,gpu_model\nn0,4,64000,262144,T4\n";
const JOBS: &str = "\
id,submit_s,duration_s,limit_s,queue,replicas,gpus_per_replica,cpu_milli_per_replica,memory_mib_per_replica
a,0,100,150,q,1,2,1000,1024
b,10,100,,q,1,4,1000,1024
c,20,50,60,q,1,2,1000,1024
d,30,500,,q,1,1,1000,1024
";

fn starts(results: &[SimResult]) -> HashMap<(String, String), Option<f64>> {
    results
        .iter()
        .flat_map(|r| {
            r.jobs
                .iter()
                .map(|j| ((r.policy.clone(), j.id.clone()), j.start_s))
        })
        .collect()
}

#[test]
fn hand_worked_schedule_for_each_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = write(&dir, "nodes.csv", NODES);
    let jobs = write(&dir, "jobs.csv", JOBS);
    let a = args(&[
        "--nodes",
        nodes.to_str().expect("utf-8"),
        "--jobs",
        jobs.to_str().expect("utf-8"),
    ]);
    let (nodes, jobs) = load(&a).expect("load");
    let queues = queues(&a, &jobs).expect("queues");
    let policies: Vec<Policy> = Policy::NAMES
        .iter()
        .map(|n| Policy::by_name(n).expect("policy"))
        .collect();
    let got = starts(&replay_all(
        &nodes,
        &jobs,
        &policies,
        &queues,
        SimOptions::default(),
    ));
    assert_eq!(
        got,
        starts(&replay_all(
            &nodes,
            &jobs,
            &policies,
            &queues,
            SimOptions {
                engine: Engine::Full,
                estimate_runtimes: false,
            }
        ))
    );
    let want = [
        // Strict FIFO: b blocks c and d until it has run.
        ("fifo", [0.0, 100.0, 200.0, 200.0]),
        // Greedy: c and then d jump ahead; b waits for d, 570.
        ("first-fit", [0.0, 570.0, 20.0, 70.0]),
        ("best-fit", [0.0, 570.0, 20.0, 70.0]),
        // Reservation for b at a's declared end (150): c backfills because it declared it
        // ends by 80; d declared nothing and waits until b is done.
        ("default", [0.0, 100.0, 20.0, 200.0]),
    ];
    for (policy, times) in want {
        for (id, t) in ["a", "b", "c", "d"].iter().zip(times) {
            assert_eq!(
                got[&(policy.to_owned(), (*id).to_owned())],
                Some(t),
                "{policy} {id}"
            );
        }
    }
}

#[test]
fn gang_waits_for_two_whole_nodes_and_schedule_file_lists_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = write(
        &dir,
        "nodes.csv",
        "name,gpus,cpu_milli,memory_mib,gpu_model\nn0,8,64000,262144,A100\nn1,8,64000,262144,A100\n",
    );
    // s holds 1 GPU of n0 until t=40; the 2x8 gang g must wait for it. Under best-fit, t (1 GPU)
    // jumps ahead onto n0 beside s and delays g to 65; under the default it waits for g.
    let jobs = write(
        &dir,
        "jobs.csv",
        "id,submit_s,duration_s,limit_s,queue,replicas,gpus_per_replica,cpu_milli_per_replica,memory_mib_per_replica\n\
         s,0,40,,q,1,1,0,0\n\
         g,5,10,,q,2,8,0,0\n\
         t,6,59,,q,1,1,0,0\n",
    );
    let sched = dir.path().join("schedule.csv");
    let a = args(&[
        "--nodes",
        nodes.to_str().expect("utf-8"),
        "--jobs",
        jobs.to_str().expect("utf-8"),
        "--policy",
        "default",
        "--policy",
        "best-fit",
        "--schedule",
        sched.to_str().expect("utf-8"),
    ]);
    run(&a).expect("replay");
    let text = fs_err::read_to_string(&sched).expect("schedule");
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(
        rows,
        [
            "policy,id,submit_s,start_s,end_s,nodes",
            "default,s,0,0,40,n0",
            "default,g,5,40,50,n0;n1",
            "default,t,6,50,109,n0",
            "best-fit,s,0,0,40,n0",
            "best-fit,g,5,65,75,n0;n1",
            "best-fit,t,6,6,65,n0",
        ]
    );
}

#[test]
fn load_factor_compresses_arrivals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = write(&dir, "nodes.csv", NODES);
    let jobs = write(&dir, "jobs.csv", JOBS);
    let a = args(&[
        "--nodes",
        nodes.to_str().expect("utf-8"),
        "--jobs",
        jobs.to_str().expect("utf-8"),
        "--load",
        "2",
    ]);
    let (_, jobs) = load(&a).expect("load");
    let submits: Vec<f64> = jobs.iter().map(|j| j.submit_s).collect();
    assert_eq!(submits, [0.0, 5.0, 10.0, 15.0]);
}

#[test]
fn bad_input_names_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = write(&dir, "nodes.csv", NODES);
    let jobs = write(
        &dir,
        "jobs.csv",
        &JOBS.replace("c,20,50,60,q,1,2", "c,20,fifty,60,q,1,2"),
    );
    let a = args(&[
        "--nodes",
        nodes.to_str().expect("utf-8"),
        "--jobs",
        jobs.to_str().expect("utf-8"),
    ]);
    let err = load(&a).expect_err("bad duration").to_string();
    assert!(
        err.ends_with(
            "jobs.csv:4: column `duration_s`: expected seconds, a number >= 0 (got `fifty`)"
        ),
        "{err}"
    );
    let missing = write(&dir, "nodes2.csv", "name,gpus\nn0,4\n");
    let a = args(&[
        "--nodes",
        missing.to_str().expect("utf-8"),
        "--jobs",
        jobs.to_str().expect("utf-8"),
    ]);
    let err = load(&a).expect_err("missing column").to_string();
    assert!(err.contains("missing column `cpu_milli`"), "{err}");
    let a = args(&["--cluster", "4x8", "--jobs", "x", "--route", "sjf"]);
    assert!(parse_queues("fast").is_err());
    assert_eq!(
        route(&a.route, &mut []).expect_err("bad route").to_string(),
        "--route: `sjf`: allowed: trace, one, limit:SECONDS"
    );
}

#[test]
fn philly_durations_are_drawn_reproducibly_and_big_jobs_are_whole_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let jobs = write(
        &dir,
        "philly.csv",
        "job_id,vc,arrival_time_s,num_gpu,job_type,total_steps\n\
         v-1,v,0,1,ResNet,100\nv-2,v,5,16,LM,100\nv-3,w,9,4,LM,100\n",
    );
    write(
        &dir,
        "philly_runtime.csv",
        "runtime\n0.0\n10.0\n20.0\n30.0\n40.0\n",
    );
    let draw = |seed: u64| {
        trace::read_philly(&jobs, &dir.path().join("philly_runtime.csv"), seed).expect("philly")
    };
    let first = draw(7);
    assert_eq!(first, draw(7));
    assert!(
        first
            .iter()
            .all(|j| [10.0, 20.0, 30.0, 40.0].contains(&j.duration_s))
    );
    assert_eq!((first[1].replicas, first[1].gpus_per_replica), (2, 8));
    assert_eq!((first[2].replicas, first[2].gpus_per_replica), (1, 4));
    assert_eq!(first[2].queue, "w");
}

#[test]
fn plot_is_a_png_drawn_without_system_fonts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = write(&dir, "nodes.csv", NODES);
    let jobs = write(&dir, "jobs.csv", JOBS);
    let png = dir.path().join("out.png");
    let a = args(&[
        "--nodes",
        nodes.to_str().expect("utf-8"),
        "--jobs",
        jobs.to_str().expect("utf-8"),
        "--plot",
        png.to_str().expect("utf-8"),
        "--csv",
    ]);
    run(&a).expect("replay");
    let bytes = fs_err::read(&png).expect("png");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

/// A busy generated trace (queues of hundreds, gangs of up to 4 x 8 GPUs, some declared run
/// times too short, some too long, some none): the incremental scheduler and the full pass give
/// the same start time and nodes for every job, under every policy.
#[test]
fn incremental_and_full_pass_replay_identically() {
    let nodes: Vec<NodeCapacity> = (0..6)
        .map(|i| NodeCapacity {
            name: format!("n{i}"),
            labels: std::collections::BTreeMap::new(),
            gpus: (0..8)
                .map(|g| crate::sched::GpuSlot {
                    index: g,
                    uuid: format!("GPU-{i}-{g}"),
                    product: "A100".to_owned(),
                    memory_mib: 40_960,
                    healthy: true,
                })
                .collect(),
            cpu_milli: 32_000,
            memory_mib: 256_000,
            schedulable: true,
            taints: Vec::new(),
        })
        .collect();
    // A small linear congruential generator: the trace is the same on every run.
    let mut x: u64 = 42;
    let mut next = |n: u64| {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (x >> 33) % n
    };
    let jobs: Vec<TraceJob> = (0..600)
        .map(|i| {
            let (replicas, gpus) = match next(10) {
                0..=4 => (1, 1),
                5 => (1, 2),
                6 => (1, 4),
                7 => (1, 8),
                8 => (2, 8),
                _ => (4, 4),
            };
            let duration = 50.0 + next(2000) as f64;
            TraceJob {
                id: format!("j{i:04}"),
                submit_s: f64::from(i * 7),
                duration_s: duration,
                limit_s: match next(3) {
                    0 => None,
                    1 => Some(duration * 1.5),
                    _ => Some(duration * 0.5),
                },
                queue: if next(3) == 0 { "slow" } else { "fast" }.to_owned(),
                replicas,
                gpus_per_replica: gpus,
                cpu_milli_per_replica: 1000 + 500 * next(8),
                memory_mib_per_replica: 1024 * (1 + next(64)),
            }
        })
        .collect();
    let queues = parse_queues("fast=10,slow=1").expect("queues");
    for name in Policy::NAMES {
        let mut policy = Policy::by_name(name).expect("policy");
        policy.explain = false;
        policy.list_waiting = false;
        for estimate_runtimes in [false, true] {
            let run = |engine| {
                let opts = SimOptions {
                    engine,
                    estimate_runtimes,
                };
                simulate(&nodes, &jobs, &policy, &queues, opts)
            };
            let (full, inc) = (run(Engine::Full), run(Engine::Incremental));
            assert!(
                full.samples.iter().any(|s| s.queued > 100),
                "{name}: the queue never got deep"
            );
            assert_eq!(inc.jobs, full.jobs, "{name}, estimates {estimate_runtimes}");
            assert_eq!(inc.passes, full.passes, "{name}");
            assert_eq!(!inc.estimates.is_empty(), estimate_runtimes);
        }
    }
}
