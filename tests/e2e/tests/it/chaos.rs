//! Leader kills during a stream of jobs: `kill -9` of whichever agent leads, at random moments,
//! while jobs of every gang size arrive, some failing and some cancelled. Every job ends as it
//! would have without the kills, no pod is created twice, no gang is left partly created, no
//! takeover adds to a job's restart count; each takeover is timed.
//!
//! The stream test runs `AGENTD_CHAOS_JOBS` jobs (60) and `AGENTD_CHAOS_KILLS` kills (4), at
//! moments drawn from `AGENTD_CHAOS_SEED` (printed). `bench/cluster-chaos` runs it longer and
//! prints the figures from the line this test writes, `chaos figures: {json}`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use e2e::cluster::{Fault, FaultProxy, Identity, KubeSim, NodeAgent, NodeAgentOptions};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::placement::{
    JOB_LABEL, LEASE_DURATION, REQUEST_ALLOWANCE, RETRY_PERIOD, SETTINGS, WAIT, agents_on,
    gang_ending, jobs_by_name, leader_lease, leads,
};

/// Nodes of 2 GPUs; the first [`CANDIDATES`] may lead, the others take the jobs in.
const NODES: usize = 6;
const CANDIDATES: usize = 3;
/// Between two submissions.
const SUBMIT_EVERY: Duration = Duration::from_millis(400);

/// What a job of the stream is made to do, and so how it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Runs 1.5 to 4.5 s and succeeds: `Succeeded`, no restart.
    Succeeds,
    /// Its workers exit 3 under `restartPolicy: OnFailure` and `backoffLimit: 1`: `Failed`
    /// after exactly one restart. (No chief: a chief that completes completes the job.)
    Fails,
    /// Runs a minute, cancelled 0.5 to 6 s after it was submitted: `Cancelled`, or gone if
    /// the cancel came before a leader took it in (the cancel deletes such an object).
    Cancelled,
}

impl Fate {
    fn state(self) -> &'static str {
        match self {
            Fate::Succeeds => "Succeeded",
            Fate::Fails => "Failed",
            Fate::Cancelled => "Cancelled",
        }
    }

    fn restarts(self) -> u64 {
        u64::from(self == Fate::Fails)
    }
}

struct StreamJob {
    name: String,
    manifest: String,
    replicas: Vec<String>,
    fate: Fate,
    /// For [`Fate::Cancelled`]: how long after its submission the cancel comes.
    cancel_after: Duration,
}

/// xorshift64*: the same moments and jobs for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

fn stream(count: u64, rng: &mut Rng) -> Vec<StreamJob> {
    (0..count)
        .map(|i| {
            let name = format!("c-{i:04}");
            let fate = match i % 10 {
                3 => Fate::Fails,
                7 => Fate::Cancelled,
                _ => Fate::Succeeds,
            };
            let seconds = match fate {
                Fate::Cancelled => 600,
                _ => 15 + rng.below(31) as u32,
            };
            let workers = 1 + rng.below(4) as u32;
            let (chief, ps) = (rng.below(3) == 0 && fate != Fate::Fails, rng.below(4) == 0);
            let exit_code = if fate == Fate::Fails { 3 } else { 0 };
            let (manifest, replicas) = gang_ending(&name, workers, chief, ps, seconds, exit_code);
            StreamJob {
                name,
                manifest,
                replicas,
                fate,
                cancel_after: rng.millis(500, 6_000),
            }
        })
        .collect()
}

/// Runs `agentctl args` (with `stdin`) on one of `agents` after another until it succeeds or
/// says `done_if`; panics after [`WAIT`].
fn until_done(agents: &[NodeAgent], args: &[&str], stdin: &str, done_if: &str) {
    let deadline = Instant::now() + WAIT;
    for agent in agents.iter().cycle() {
        let out = agent.agent.ctl_with_stdin(args, stdin);
        let said = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || said.contains(done_if) {
            return;
        }
        assert!(Instant::now() < deadline, "agentctl {args:?}: {said}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One kill: when, and when the next leader took the Lease.
struct Takeover {
    killed_at: Timestamp,
    acquired: Timestamp,
}

fn quantiles(mut values: Vec<f64>) -> serde_json::Value {
    if values.is_empty() {
        return serde_json::Value::Null;
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    serde_json::json!({"n": values.len(), "p50": at(0.5), "p99": at(0.99), "max": at(1.0)})
}

#[test]
fn a_stream_of_jobs_ends_as_without_kills_across_repeated_leader_kills() {
    let started = Instant::now();
    let count = env_number("AGENTD_CHAOS_JOBS", 60);
    let kills = env_number("AGENTD_CHAOS_KILLS", 4);
    let seed = env_number(
        "AGENTD_CHAOS_SEED",
        Timestamp::now().subsec_nanosecond().unsigned_abs().into(),
    )
    .max(1);
    eprintln!("chaos: {count} jobs, {kills} leader kills, AGENTD_CHAOS_SEED={seed}");
    let mut rng = Rng(seed);
    let jobs = stream(count, &mut rng);

    // Cluster time 10 times faster: a job's 15 to 45 s run 1.5 to 4.5 s here.
    let sim = KubeSim::start_scaled(NODES, true, 10.0);
    let mut agents = agents_on(&sim, NODES, CANDIDATES, SETTINGS, false);
    let (candidates, takers) = agents.split_at_mut(CANDIDATES);
    sim.wait_until("one of the candidates leads", WAIT, || {
        candidates.iter().any(leads)
    });

    // Jobs go in through the agents that never lead (so never through a killed one); each
    // cancel is asked as soon as it is due.
    let submitted = AtomicBool::new(false);
    let takeovers = std::thread::scope(|s| {
        let takers = &*takers;
        let (jobs, submitted) = (&jobs, &submitted);
        s.spawn(move || {
            let start = Instant::now();
            let mut cancels: Vec<(Instant, &str)> = Vec::new();
            let cancel_due = |cancels: &mut Vec<(Instant, &str)>| {
                let now = Instant::now();
                for (_, name) in cancels.extract_if(.., |(due, _)| *due <= now) {
                    until_done(takers, &["cancel", name], "", "already");
                }
            };
            for (i, job) in jobs.iter().enumerate() {
                let due = start + SUBMIT_EVERY * i as u32;
                while Instant::now() < due {
                    cancel_due(&mut cancels);
                    std::thread::sleep(Duration::from_millis(20));
                }
                until_done(takers, &["submit", "-"], &job.manifest, "already exists");
                if job.fate == Fate::Cancelled {
                    cancels.push((Instant::now() + job.cancel_after, &job.name));
                }
            }
            submitted.store(true, Ordering::SeqCst);
            while !cancels.is_empty() {
                cancel_due(&mut cancels);
                std::thread::sleep(Duration::from_millis(20));
            }
        });

        let mut takeovers = Vec::new();
        for kill in 0..kills {
            std::thread::sleep(rng.millis(500, 3_000));
            let (holder, _) = leader_lease(&sim);
            let victim = candidates
                .iter()
                .position(|a| a.node == holder)
                .unwrap_or_else(|| panic!("the Lease is held by {holder:?}"));
            let killed_at = Timestamp::now();
            candidates[victim].agent.signal_and_wait(9, WAIT);
            let mut lease = serde_json::Value::Null;
            sim.wait_until("another candidate holds the Lease", WAIT, || {
                let (now, object) = leader_lease(&sim);
                lease = object;
                now != holder && candidates.iter().any(|a| a.node == now)
            });
            let acquired: Timestamp = lease["spec"]["acquireTime"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            eprintln!(
                "kill {}: {holder} killed{}; {} took over after {:?}",
                kill + 1,
                if submitted.load(Ordering::SeqCst) {
                    " (every job submitted)"
                } else {
                    ""
                },
                lease["spec"]["holderIdentity"],
                acquired.duration_since(killed_at)
            );
            takeovers.push(Takeover {
                killed_at,
                acquired,
            });
            // Back as a candidate, as systemd would restart it.
            candidates[victim].agent.spawn();
        }
        takeovers
    });

    // Every job ends.
    let deadline = Instant::now() + 5 * WAIT;
    let terminal = |j: &serde_json::Value| {
        matches!(
            j["state"].as_str(),
            Some("Succeeded" | "Failed" | "Cancelled")
        )
    };
    let last = loop {
        let last = jobs_by_name(&takers[0]).unwrap_or_default();
        let open: Vec<&str> = jobs
            .iter()
            .filter(|j| match last.get(&j.name) {
                Some(status) => !terminal(status),
                // A cancel before admission deletes the object.
                None => j.fate != Fate::Cancelled,
            })
            .map(|j| j.name.as_str())
            .collect();
        if open.is_empty() || Instant::now() > deadline {
            break last;
        }
        std::thread::sleep(Duration::from_millis(500));
    };

    // Against what each job was made to do.
    let audit = sim.audit();
    let deleted_by_cancel = |name: &str| {
        audit.iter().any(|r| {
            r["verb"] == "delete"
                && r["resource"] == "trainingjobs"
                && r["name"] == name
                && r["code"] == 200
                && r["user"] == "system:serviceaccount:agentd-system:agentd-node"
        })
    };
    let mut lost = Vec::new();
    let mut inflated = Vec::new();
    let mut never_admitted = 0;
    for job in &jobs {
        let Some(status) = last.get(&job.name) else {
            if job.fate == Fate::Cancelled && deleted_by_cancel(&job.name) {
                never_admitted += 1;
            } else {
                lost.push(format!("{}: no status", job.name));
            }
            continue;
        };
        if status["state"] != job.fate.state() {
            lost.push(format!("{}: {status}", job.name));
        }
        if status["restarts"].as_u64() != Some(job.fate.restarts()) {
            inflated.push(format!("{}: {status}", job.name));
        }
    }

    // Each pod name (job, replica, generation) was created once, and the last generation of
    // every job that was not cancelled had all of its replicas.
    let creates = sim.pod_create_counts();
    let mut create_times: Vec<Timestamp> = sim
        .pod_creates()
        .iter()
        .filter_map(|r| r["timestamp"].as_str()?.parse().ok())
        .collect();
    create_times.sort();
    let duplicates: Vec<_> = creates.iter().filter(|(_, n)| **n > 1).collect();
    let mut partial = Vec::new();
    for job in jobs.iter().filter(|j| j.fate != Fate::Cancelled) {
        // Generation 0: never started.
        let Some(generation) = last
            .get(&job.name)
            .and_then(|s| s["generation"].as_u64())
            .filter(|g| *g > 0)
        else {
            continue;
        };
        let missing: Vec<&String> = job
            .replicas
            .iter()
            .filter(|r| !creates.contains_key(&format!("{}-{r}-g{generation}", job.name)))
            .collect();
        if !missing.is_empty() {
            partial.push(format!(
                "{} generation {generation} lacks {missing:?}",
                job.name
            ));
        }
    }
    let left: Vec<String> = sim
        .live_pods(JOB_LABEL)
        .iter()
        .map(|p| {
            p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();

    // Each takeover: kill to the next leader's acquireTime, and kill to the first pod it
    // created (where it created one before the next kill).
    let millis = |d: SignedDuration| d.as_secs_f64() * 1000.0;
    let lease_ms: Vec<f64> = takeovers
        .iter()
        .map(|t| millis(t.acquired.duration_since(t.killed_at)))
        .collect();
    let placing_ms: Vec<f64> = takeovers
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let next_kill = takeovers.get(i + 1).map(|n| n.killed_at);
            create_times
                .iter()
                .find(|at| **at >= t.acquired)
                .filter(|at| next_kill.is_none_or(|k| **at < k))
                .map(|at| millis(at.duration_since(t.killed_at)))
        })
        .collect();
    let figures = serde_json::json!({
        "jobs": count,
        "kills": takeovers.len(),
        "seed": seed,
        "takeover_lease_ms": quantiles(lease_ms.clone()),
        "takeover_first_pod_ms": quantiles(placing_ms),
        "jobs_lost": lost.len(),
        "cancelled_before_admission": never_admitted,
        "duplicate_pods": duplicates.len(),
        "partial_gangs": partial.len() + left.len(),
        "inflated_restarts": inflated.len(),
        "pods_created": creates.len(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    eprintln!("chaos figures: {figures}");

    if !lost.is_empty() {
        // What the cluster holds, and what the leader did last.
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in sim.live_pods(JOB_LABEL) {
            by_node
                .entry(p["spec"]["nodeName"].as_str().unwrap_or("-").to_owned())
                .or_default()
                .push(format!(
                    "{} {}",
                    p["metadata"]["name"].as_str().unwrap_or(""),
                    p["status"]["phase"].as_str().unwrap_or("")
                ));
        }
        eprintln!("live pods by node: {by_node:#?}");
        let (holder, _) = leader_lease(&sim);
        if let Some(leader) = candidates.iter().find(|a| a.node == holder) {
            let log = leader.agent.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!(
                "the leader {holder}'s log, last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            let out = leader.agent.ctl(&["jobs"]);
            eprintln!(
                "the leader's jobs:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    assert!(
        lost.is_empty(),
        "jobs that did not end as made to:\n{}",
        lost.join("\n")
    );
    assert!(
        inflated.is_empty(),
        "restart counts off:\n{}",
        inflated.join("\n")
    );
    assert!(duplicates.is_empty(), "pods created twice: {duplicates:?}");
    assert!(partial.is_empty(), "gangs partly created: {partial:?}");
    assert!(left.is_empty(), "pods left running or pending: {left:?}");
    let bound = LEASE_DURATION + RETRY_PERIOD + REQUEST_ALLOWANCE;
    for (i, ms) in lease_ms.iter().enumerate() {
        assert!(
            *ms <= millis(bound),
            "takeover {} took {ms} ms; bound: lease + retry + {REQUEST_ALLOWANCE:?}",
            i + 1
        );
    }
}

/// A leader cut off from the API server (the network between it and the server drops, and
/// what it sent meanwhile arrives once the network heals) stops leading within its renew
/// deadline; the other candidate takes over and its decisions stand; once healed, the old
/// leader follows them without one successful write of its own from its stale view.
#[test]
fn a_leader_cut_off_from_the_api_server_stops_and_follows_the_new_leader_when_healed() {
    let sim = KubeSim::start_scaled(4, true, 10.0);
    let proxy = FaultProxy::start(sim.addr());
    let (cut, direct) = (
        sim.dir.path().join("cut.kubeconfig"),
        sim.dir.path().join("leader.kubeconfig"),
    );
    sim.kubeconfig_for(Identity::Leader, &proxy.addr, &cut);
    sim.kubeconfig_for(Identity::Leader, sim.addr(), &direct);
    let worker = sim.dir.path().join("node.kubeconfig");
    sim.kubeconfig_for(Identity::Node, sim.addr(), &worker);
    let start = |i: usize, kubeconfig: &std::path::Path| {
        NodeAgent::start_with(
            &NodeAgentOptions {
                node: format!("node-{i}"),
                gpus: 2,
                leader_eligible: i < 2,
                kubeconfig: kubeconfig.to_owned(),
                interval: "1s",
                metrics: false,
            },
            SETTINGS,
        )
    };
    // node-0, behind the proxy, leads first.
    let old = start(0, &cut);
    sim.wait_until("node-0 leads", WAIT, || leads(&old));
    let next = start(1, &direct);
    let takers = [start(2, &worker), start(3, &worker)];
    let (before, _) = gang_ending("before", 2, false, false, 600, 0);
    let (stays, _) = gang_ending("stays", 1, false, false, 600, 0);
    until_done(&takers, &["submit", "-"], &before, "already exists");
    until_done(&takers, &["submit", "-"], &stays, "already exists");
    sim.wait_until("both gangs run", WAIT, || {
        jobs_by_name(&old).is_some_and(|j| {
            ["before", "stays"]
                .iter()
                .all(|n| j.get(*n).is_some_and(|s| s["state"] == "Running"))
        })
    });

    // Cut off: it stops leading within the renew deadline, and node-1 takes over.
    let cut_at = Instant::now();
    let cut_time = Timestamp::now();
    proxy.set(Fault::Blackhole);
    let leading = |a: &NodeAgent| {
        a.agent
            .ctl_json(&["status"])
            .get("cluster")
            .is_some_and(|c| c["leading"] == true)
    };
    sim.wait_until("node-0 stops leading", WAIT, || !leading(&old));
    let stopped = cut_at.elapsed();
    eprintln!("node-0 stopped leading {stopped:?} after it was cut off");
    let renew_deadline = Duration::from_secs(3);
    assert!(
        stopped <= renew_deadline + Duration::from_secs(2),
        "stopped leading {stopped:?} after the cut; renew deadline {renew_deadline:?}"
    );
    sim.wait_until("node-1 leads", WAIT, || leads(&next));

    // The new leader decides: one gang cancelled, one new gang started.
    until_done(&takers, &["cancel", "before"], "", "already");
    let (during, _) = gang_ending("during", 2, false, false, 600, 0);
    until_done(&takers, &["submit", "-"], &during, "already exists");
    sim.wait_until("node-1 cancels one and starts the other", WAIT, || {
        jobs_by_name(&next).is_some_and(|j| {
            j.get("before").is_some_and(|s| s["state"] == "Cancelled")
                && j.get("during").is_some_and(|s| s["state"] == "Running")
        })
    });
    std::thread::sleep(Duration::from_secs(2));

    // Healed: what node-0 sent meanwhile arrives; it follows.
    proxy.set(Fault::Pass);
    sim.wait_until("node-0 follows node-1", WAIT, || {
        let status = old.agent.ctl_json(&["status"]);
        status["cluster"]["leader"] == "node-1" && status["cluster"]["leading"] == false
    });
    std::thread::sleep(Duration::from_secs(5));
    let jobs = jobs_by_name(&old).expect("node-0 lists the jobs");
    let states: Vec<(&str, &serde_json::Value, &serde_json::Value)> = ["before", "stays", "during"]
        .iter()
        .map(|n| (*n, &jobs[*n]["state"], &jobs[*n]["generation"]))
        .collect();
    assert_eq!(
        states,
        [
            ("before", &"Cancelled".into(), &1.into()),
            ("stays", &"Running".into(), &1.into()),
            ("during", &"Running".into(), &1.into()),
        ],
        "node-1's decisions stand, as node-0 lists them"
    );
    assert!(leads(&next), "node-1 still leads");

    // Not one write of the leader's kind from node-0 succeeded after the cut: its requests are
    // in the audit log by its User-Agent.
    let leaders_write = |r: &serde_json::Value| {
        r["userAgent"]
            .as_str()
            .is_some_and(|a| a.starts_with("agentd/") && a.ends_with("(node-0)"))
            && matches!(
                r["verb"].as_str(),
                Some("create" | "update" | "patch" | "delete" | "deletecollection")
            )
            && r["code"].as_u64().is_some_and(|c| (200..300).contains(&c))
            && (matches!(
                r["resource"].as_str(),
                Some("trainingjobs" | "pods" | "services" | "events")
            ) || r["name"] == "agentd-leader")
    };
    let after_cut = |r: &serde_json::Value| {
        r["timestamp"]
            .as_str()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .is_some_and(|t| t >= cut_time)
    };
    let (stale, leading_writes): (Vec<serde_json::Value>, Vec<serde_json::Value>) = sim
        .audit()
        .into_iter()
        .filter(leaders_write)
        .partition(after_cut);
    assert!(
        stale.is_empty(),
        "node-0 wrote after it was cut off: {stale:#?}"
    );
    assert!(
        leading_writes.iter().any(|r| r["resource"] == "pods"),
        "node-0's writes while it led are in the audit log by its User-Agent: {leading_writes:?}"
    );
}

/// The API server away, then failing, then slow, under running gangs: unreachable for
/// `AGENTD_OUTAGE_SECONDS` (20), then answering 503 for 10 s, then 2 s a request (1 s each
/// way) for 10 s. No job is lost, no pod created twice, no gang restarted for it (the pods ran
/// on, and a gang that ended meanwhile is seen to have succeeded), and once the server is well
/// a leader schedules again within a retry period.
#[test]
fn an_api_server_away_then_failing_then_slow_loses_no_job_and_restarts_no_gang() {
    let outage = Duration::from_secs(env_number("AGENTD_OUTAGE_SECONDS", 20));
    let sim = KubeSim::start_scaled(3, true, 10.0);
    let proxy = FaultProxy::start(sim.addr());
    let leader = sim.dir.path().join("leader.kubeconfig");
    sim.kubeconfig_for(Identity::Leader, &proxy.addr, &leader);
    let worker = sim.dir.path().join("node.kubeconfig");
    sim.kubeconfig_for(Identity::Node, &proxy.addr, &worker);
    // Slower election timings than SETTINGS, so that a renewal fits in the renew deadline at
    // 2 s a request.
    let settings = "lease_duration = \"8s\"\nrenew_deadline = \"6s\"\nretry_period = \"1s\"\nplace_jobs = true\n";
    let retry_period = Duration::from_secs(1);
    let agents: Vec<NodeAgent> = (0..3)
        .map(|i| {
            NodeAgent::start_with(
                &NodeAgentOptions {
                    node: format!("node-{i}"),
                    gpus: 2,
                    leader_eligible: i < 2,
                    kubeconfig: if i < 2 {
                        leader.clone()
                    } else {
                        worker.clone()
                    },
                    interval: "1s",
                    metrics: false,
                },
                settings,
            )
        })
        .collect();
    let (candidates, taker) = (&agents[..2], &agents[2..]);
    sim.wait_until("a candidate leads", WAIT, || candidates.iter().any(leads));
    // Two gangs that outlast the test, one that ends during the outage.
    let (long_a, _) = gang_ending("long-a", 2, true, false, 1800, 0);
    let (long_b, _) = gang_ending("long-b", 1, false, true, 1800, 0);
    let (short, _) = gang_ending("short", 1, false, false, 100, 0);
    for manifest in [&long_a, &long_b, &short] {
        until_done(taker, &["submit", "-"], manifest, "already exists");
    }
    let states = || {
        let leading = candidates.iter().find(|a| leads(a))?;
        jobs_by_name(leading)
    };
    sim.wait_until("the three gangs run", WAIT, || {
        states().is_some_and(|j| {
            ["long-a", "long-b", "short"]
                .iter()
                .all(|n| j.get(*n).is_some_and(|s| s["state"] == "Running"))
        })
    });
    let pods_before: BTreeMap<String, u32> = sim.pod_create_counts();

    eprintln!("unreachable for {outage:?}");
    proxy.set(Fault::Blackhole);
    std::thread::sleep(outage);
    eprintln!("503 for 10 s");
    sim.fault(503, "10s");
    proxy.set(Fault::Pass);
    std::thread::sleep(Duration::from_secs(10));
    eprintln!("2 s a request for 10 s");
    proxy.set(Fault::Delay(Duration::from_secs(1)));
    std::thread::sleep(Duration::from_secs(10));
    proxy.set(Fault::Pass);
    let well = Instant::now();
    sim.wait_until("a candidate leads again", WAIT, || {
        candidates.iter().any(leads)
    });
    let leading_after = well.elapsed();
    // What it knows comes from the objects and the pods: the short gang's end included.
    sim.wait_until("the short gang is seen to have succeeded", WAIT, || {
        states().is_some_and(|j| j.get("short").is_some_and(|s| s["state"] == "Succeeded"))
    });
    let submitted = Instant::now();
    let (after, _) = gang_ending("after", 1, false, false, 20, 0);
    until_done(taker, &["submit", "-"], &after, "already exists");
    sim.wait_until("a gang submitted after it runs", WAIT, || {
        sim.pod_create_counts().contains_key("after-worker-0-g1")
    });
    eprintln!(
        "the server well to a leader: {leading_after:?}; a new gang's pod created {:?} after \
         its submission",
        submitted.elapsed()
    );

    let jobs = states().expect("a leader lists the jobs");
    for (name, state) in [
        ("long-a", "Running"),
        ("long-b", "Running"),
        ("short", "Succeeded"),
    ] {
        let job = &jobs[name];
        assert_eq!(
            (&job["state"], &job["generation"], &job["restarts"]),
            (&state.into(), &1.into(), &0.into()),
            "{name}: {job}"
        );
    }
    let creates = sim.pod_create_counts();
    let twice: Vec<_> = creates.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "pods created twice: {twice:?}");
    let deleted: Vec<String> = sim
        .audit()
        .iter()
        .filter(|r| r["verb"] == "delete" && r["resource"] == "pods")
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .filter(|p| pods_before.contains_key(p))
        .collect();
    assert!(
        deleted.is_empty(),
        "pods that ran before deleted: {deleted:?}"
    );
    assert!(
        leading_after <= retry_period + REQUEST_ALLOWANCE.unsigned_abs(),
        "a leader {leading_after:?} after the server was well; retry period {retry_period:?}"
    );
}
