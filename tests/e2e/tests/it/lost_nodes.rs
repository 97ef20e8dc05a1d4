//! Nodes lost at scale: of 200 simulated nodes, twenty hosting running gangs lose their
//! kubelets at once. Every gang with a replica there runs again elsewhere (`NodeLost`), every
//! other gang runs on untouched, and the leader's idea of each node's allocation matches the
//! pods that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use e2e::cluster::{KubeSim, NodeAgent};

use crate::placement::{JOB_LABEL, SETTINGS, WAIT, agents_on, gang, jobs_by_name, leads};

const NODES: usize = 200;
const GANGS: usize = 150;
const LOST: usize = 20;

/// Each agentd pod that has not ended, by name: (job, node).
fn live_pods(sim: &KubeSim) -> BTreeMap<String, (String, String)> {
    sim.live_pods(JOB_LABEL)
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                (
                    p["metadata"]["labels"][JOB_LABEL]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    p["spec"]["nodeName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ),
            )
        })
        .collect()
}

/// The value of `series{node="NODE"}` for every node in the agent's metrics (whole numbers).
fn by_node(metrics: &str, series: &str) -> BTreeMap<String, u64> {
    let prefix = format!("{series}{{node=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (node, value) = l.split_once("\"} ")?;
            Some((node.to_owned(), value.parse::<f64>().ok()?.round() as u64))
        })
        .collect()
}

/// Waits until `check` holds for every job of `names` the leader lists; panics with what each
/// job that it does not hold for shows.
fn wait_for_states(
    leader: &NodeAgent,
    names: &[String],
    what: &str,
    check: impl Fn(&str, &serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        let jobs = jobs_by_name(leader).unwrap_or_default();
        let off: Vec<String> = names
            .iter()
            .filter(|n| !jobs.get(*n).is_some_and(|j| check(n, j)))
            .map(|n| {
                let j = jobs.get(n).cloned().unwrap_or_default();
                format!("{n}: {} {} {}", j["state"], j["reason"], j["message"])
            })
            .collect();
        if off.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not within {:?}: {what}; {} jobs not so, the first: {:#?}",
            3 * WAIT,
            off.len(),
            &off[..off.len().min(5)]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn twenty_of_two_hundred_nodes_lost_at_once_move_only_their_gangs() {
    // Cluster time 10 times faster: a stopped kubelet's node goes Unknown 4 s later.
    let sim = KubeSim::start_scaled(NODES, true, 10.0);
    let settings = format!("{SETTINGS}node_lost_grace = \"2s\"\n");
    let agents = agents_on(&sim, 1, 1, &settings, true);
    let leader = &agents[0];
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));

    let dir = tempfile::tempdir().unwrap();
    // The other nodes' agents, as their heartbeat Leases (fresh for an hour): nothing is
    // placed where no agent runs.
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ");
    let leases: Vec<serde_json::Value> = (1..NODES)
        .map(|i| {
            serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": format!("agentd-node-node-{i}"), "namespace": "agentd-system"},
                "spec": {
                    "holderIdentity": format!("node-{i}"),
                    "leaseDurationSeconds": 3600,
                    "renewTime": now.to_string(),
                },
            })
        })
        .collect();
    let file = dir.path().join("leases.json");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": leases});
    std::fs::write(&file, list.to_string()).unwrap();
    let out = sim.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.path().join("gangs.yaml");
    let names: Vec<String> = (0..GANGS).map(|i| format!("g-{i:03}")).collect();
    // Two workers of one GPU each whose pods run 3,000 s of cluster time (5 minutes here).
    let text: Vec<String> = names
        .iter()
        .map(|n| gang(n, 2, false, false, 3000).0)
        .collect();
    std::fs::write(&file, text.join("---\n")).unwrap();
    let out = sim.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_states(leader, &names, "every gang runs", |_, j| {
        j["state"] == "Running"
    });

    // The twenty nodes that hold the most replicas (node-0, the leader's own, aside).
    let before = live_pods(&sim);
    let mut load: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, node) in before.values() {
        *load.entry(node.as_str()).or_default() += 1;
    }
    let mut busiest: Vec<(&str, usize)> = load
        .iter()
        .filter(|(n, _)| **n != "node-0")
        .map(|(n, c)| (*n, *c))
        .collect();
    busiest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let lost: BTreeSet<String> = busiest
        .iter()
        .take(LOST)
        .map(|(n, _)| (*n).to_owned())
        .collect();
    assert_eq!(lost.len(), LOST, "gangs on enough nodes: {load:?}");
    let affected: BTreeSet<String> = before
        .values()
        .filter(|(_, node)| lost.contains(node))
        .map(|(job, _)| job.clone())
        .collect();
    eprintln!(
        "{} pods on {} nodes; stopping {lost:?}: {} of {GANGS} gangs have a replica there",
        before.len(),
        load.len(),
        affected.len()
    );
    for node in &lost {
        sim.stop_node(node);
    }

    wait_for_states(leader, &names, "every affected gang runs again", |n, j| {
        j["state"] == "Running" && (!affected.contains(n) || j["generation"] == 2)
    });
    let jobs = jobs_by_name(leader).unwrap();
    for name in &names {
        let job = &jobs[name];
        if affected.contains(name) {
            assert_eq!(job["restarts"], 1, "{job}");
            let status = leader.agent.ctl_json(&["job", name]);
            let said = status["events"].as_array().unwrap().iter().any(|e| {
                e["reason"] == "NodeLost"
                    && lost.iter().any(|n| {
                        e["message"]
                            .as_str()
                            .unwrap()
                            .contains(&format!("node {n} "))
                    })
            });
            assert!(said, "a NodeLost event naming the node: {status}");
        } else {
            assert_eq!(
                (&job["state"], &job["generation"], &job["restarts"]),
                (&"Running".into(), &1.into(), &0.into()),
                "untouched: {job}"
            );
        }
    }
    // The unaffected gangs' pods were never deleted.
    let deleted: BTreeSet<String> = sim
        .audit()
        .iter()
        .filter(|r| r["verb"] == "delete" && r["resource"] == "pods")
        .map(|r| r["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    for (pod, (job, _)) in &before {
        if !affected.contains(job) {
            assert!(
                !deleted.contains(pod),
                "{pod} of untouched {job} was deleted"
            );
        }
    }
    let metrics = leader.metrics();
    let line = format!(
        "agentd_job_failures_total{{reason=\"NodeLost\"}} {}",
        affected.len()
    );
    assert!(metrics.contains(&line), "{line} in:\n{metrics}");

    // What the leader holds on each node is what the pods there hold: no replica on a lost
    // node (its pods deleted, none left Terminating as if running), every gang's two GPUs
    // counted once, and the lost nodes closed to new gangs.
    let deadline = Instant::now() + WAIT;
    loop {
        let pods = live_pods(&sim);
        let mut held: BTreeMap<String, u64> = BTreeMap::new();
        for (_, node) in pods.values() {
            *held.entry(node.clone()).or_default() += 1;
        }
        let metrics = leader.metrics();
        let allocated = by_node(&metrics, "agentd_node_allocated_gpus");
        let schedulable = by_node(&metrics, "agentd_node_schedulable");
        let on_lost = pods.values().filter(|(_, n)| lost.contains(n)).count();
        let differ: Vec<String> = allocated
            .keys()
            .chain(held.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|n| {
                allocated.get(*n).copied().unwrap_or(0) != held.get(*n).copied().unwrap_or(0)
            })
            .map(|n| format!("{n}: leader {:?}, pods {:?}", allocated.get(n), held.get(n)))
            .collect();
        let open: Vec<&String> = lost
            .iter()
            .filter(|n| schedulable.get(*n) != Some(&0))
            .collect();
        if differ.is_empty() && open.is_empty() && on_lost == 0 && pods.len() == 2 * GANGS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader's allocations do not match the pods: {differ:?}; lost nodes still \
             schedulable: {open:?}; pods on lost nodes: {on_lost}; live pods: {}",
            pods.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
