//! Leader election among leader-eligible agents, against kube-sim with HTTPS, tokens and RBAC
//! on: exactly one leads, a killed leader is replaced once its Lease expires, a stopped leader
//! hands over at once, and neither role is ever refused.

use std::time::Duration;

use e2e::cluster::{
    Identity, KubeSim, LEADER_USER, NODE_USER, NodeAgent, NodeAgentOptions, metric_value,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Short election timings, so that the tests take seconds: lease 4 s, renew deadline 3 s,
/// retry 500 ms.
const LEASE_SECONDS: i64 = 4;
const RETRY_MS: i64 = 500;
const FAST: &str = "lease_duration = \"4s\"\nrenew_deadline = \"3s\"\nretry_period = \"500ms\"\n";

/// The time one read and one write of the Lease may take on a loaded test machine, on top of
/// what the election itself allows.
const REQUEST_ALLOWANCE: SignedDuration = SignedDuration::from_secs(2);

/// How long the tests wait for a condition before they fail.
const WAIT: Duration = Duration::from_secs(30);

/// kube-sim with `candidates` leader-eligible agents (`node-0`..) on the `agentd-leader`
/// ServiceAccount, and `workers` worker-only agents after them on `agentd-node`.
fn cluster(candidates: usize, workers: usize, settings: &str) -> (KubeSim, Vec<NodeAgent>) {
    let sim = KubeSim::start(candidates + workers, true);
    let leader = sim.dir.path().join("leader.kubeconfig");
    sim.kubeconfig_for(Identity::Leader, sim.addr(), &leader);
    let worker = sim.dir.path().join("node.kubeconfig");
    sim.kubeconfig_for(Identity::Node, sim.addr(), &worker);
    let agents = (0..candidates + workers)
        .map(|i| {
            let eligible = i < candidates;
            NodeAgent::start_with(
                &NodeAgentOptions {
                    node: format!("node-{i}"),
                    gpus: 1,
                    leader_eligible: eligible,
                    kubeconfig: if eligible {
                        leader.clone()
                    } else {
                        worker.clone()
                    },
                    interval: "1s",
                    metrics: true,
                },
                settings,
            )
        })
        .collect();
    (sim, agents)
}

/// The Lease `agentd-leader`, if there is one.
fn leader_lease(sim: &KubeSim) -> Option<serde_json::Value> {
    let out = sim.kubectl(&[
        "get",
        "lease",
        "agentd-leader",
        "-n",
        "agentd-system",
        "-o",
        "json",
    ]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn holder(lease: &serde_json::Value) -> &str {
    lease["spec"]["holderIdentity"].as_str().unwrap_or("")
}

fn time(lease: &serde_json::Value, field: &str) -> Timestamp {
    lease["spec"][field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {lease}"))
        .parse()
        .unwrap()
}

/// Waits until the Lease names a holder among `among`; returns the Lease.
fn wait_for_holder(sim: &KubeSim, among: &[&str]) -> serde_json::Value {
    let mut found = None;
    sim.wait_until(
        &format!("the Lease agentd-leader held by one of {among:?}"),
        WAIT,
        || {
            found = leader_lease(sim).filter(|l| among.contains(&holder(l)));
            found.is_some()
        },
    );
    found.unwrap()
}

fn index_of(agents: &[NodeAgent], node: &str) -> usize {
    agents.iter().position(|a| a.node == node).unwrap()
}

/// Waits until the agent's status names `leader` and says whether this agent leads.
fn wait_for_status(agent: &NodeAgent, leader: &str, leading: bool) -> serde_json::Value {
    agent.agent.wait_for(&["status"], WAIT, |s| {
        s["cluster"]["leader"] == leader && s["cluster"]["leading"] == leading
    })
}

fn metric(agent: &NodeAgent, series: &str) -> Option<f64> {
    metric_value(&agent.metrics(), series)
}

/// No request of either role was refused, and worker-only agents never wrote the leader's
/// Lease (they read it to name the leader in `agentctl status`).
fn assert_no_refusals(sim: &KubeSim) {
    let audit = sim.audit();
    let refused: Vec<_> = audit
        .iter()
        .filter(|r| (r["user"] == LEADER_USER || r["user"] == NODE_USER) && r["code"] == 403)
        .collect();
    assert!(refused.is_empty(), "403s: {refused:?}");
    let by_workers: Vec<_> = audit
        .iter()
        .filter(|r| r["user"] == NODE_USER && r["name"] == "agentd-leader" && r["verb"] != "get")
        .collect();
    assert!(
        by_workers.is_empty(),
        "a worker-only agent tried to lead: {by_workers:?}"
    );
}

#[test]
fn two_leader_eligible_agents_elect_exactly_one_and_every_agent_says_which() {
    let (sim, agents) = cluster(2, 1, FAST);
    let lease = wait_for_holder(&sim, &["node-0", "node-1"]);
    let leader = holder(&lease).to_owned();
    let l = index_of(&agents, &leader);
    let f = 1 - l;
    assert_eq!(lease["spec"]["leaseDurationSeconds"], LEASE_SECONDS);
    assert_eq!(lease["spec"]["leaseTransitions"], 0, "{lease}");

    wait_for_status(&agents[l], &leader, true);
    wait_for_status(&agents[f], &leader, false);
    let text = String::from_utf8(agents[l].agent.ctl(&["status"]).stdout).unwrap();
    assert!(
        text.contains(&format!("Leader   {leader} (this agent)")),
        "{text}"
    );
    let text = String::from_utf8(agents[f].agent.ctl(&["status"]).stdout).unwrap();
    assert!(text.contains(&format!("Leader   {leader}\n")), "{text}");
    // A worker-only agent takes no part, but reads the Lease to name the leader.
    let worker = agents[2].agent.ctl_json(&["status"]);
    assert_eq!(worker["cluster"]["leading"], false, "{worker}");
    assert_eq!(worker["cluster"]["leader"], leader.as_str(), "{worker}");

    assert_eq!(metric(&agents[l], "agentd_leader"), Some(1.0));
    assert_eq!(
        metric(&agents[l], "agentd_leader_transitions_total"),
        Some(1.0)
    );
    assert_eq!(metric(&agents[f], "agentd_leader"), Some(0.0));
    assert_eq!(
        metric(&agents[f], "agentd_leader_transitions_total"),
        Some(0.0)
    );
    assert_eq!(metric(&agents[2], "agentd_leader"), Some(0.0));

    // The leader keeps renewing and nobody else takes over, for several lease durations.
    let first_renewal = time(&lease, "renewTime");
    let watch_until = std::time::Instant::now() + Duration::from_secs(3 * LEASE_SECONDS as u64);
    let mut renewals = std::collections::BTreeSet::new();
    while std::time::Instant::now() < watch_until {
        let now = leader_lease(&sim).unwrap();
        assert_eq!(holder(&now), leader, "{now}");
        assert_eq!(now["spec"]["leaseTransitions"], 0, "{now}");
        renewals.insert(time(&now, "renewTime"));
        let leading: Vec<bool> = agents[..2]
            .iter()
            .map(|a| a.agent.ctl_json(&["status"])["cluster"]["leading"] == true)
            .collect();
        assert_eq!(leading.iter().filter(|l| **l).count(), 1, "{leading:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        renewals.len() >= 3 && renewals.iter().all(|r| *r >= first_renewal),
        "renewed: {renewals:?}"
    );

    // Only the leader labels the Nodes.
    sim.wait_until("labels on every node", WAIT, || {
        (0..3).all(|i| {
            sim.node_labels(&format!("node-{i}"))
                .contains_key("agentd.io/gpu.count")
        })
    });
    assert!(
        agents[l]
            .agent
            .log()
            .contains("labelling Nodes from their AgentNodes"),
        "{}",
        agents[l].agent.log()
    );
    assert!(
        !agents[f]
            .agent
            .log()
            .contains("labelling Nodes from their AgentNodes"),
        "the follower labels too:\n{}",
        agents[f].agent.log()
    );
    assert_no_refusals(&sim);
}

#[test]
fn a_killed_leader_is_replaced_once_its_lease_expires() {
    let (sim, mut agents) = cluster(2, 0, FAST);
    let lease = wait_for_holder(&sim, &["node-0", "node-1"]);
    let leader = holder(&lease).to_owned();
    let l = index_of(&agents, &leader);
    let f = 1 - l;
    let other = agents[f].node.clone();
    wait_for_status(&agents[f], &leader, false);

    let renewed_before = time(&leader_lease(&sim).unwrap(), "renewTime");
    let killed_at = Timestamp::now();
    agents[l].agent.signal_and_wait(9, WAIT);

    let lease = wait_for_holder(&sim, &[&other]);
    let acquired = time(&lease, "acquireTime");
    let after_kill = acquired.duration_since(killed_at);
    let bound = SignedDuration::from_secs(LEASE_SECONDS)
        + SignedDuration::from_millis(RETRY_MS)
        + REQUEST_ALLOWANCE;
    eprintln!("kill -9 of the leader to the new leader's acquireTime: {after_kill:?}");
    assert!(
        after_kill <= bound,
        "taken over {after_kill:?} after the kill; bound: lease + retry + {REQUEST_ALLOWANCE:?}"
    );
    assert!(
        acquired.duration_since(renewed_before) >= SignedDuration::from_secs(LEASE_SECONDS),
        "taken over before the lease expired: renewed {renewed_before}, acquired {acquired}"
    );
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");

    wait_for_status(&agents[f], &other, true);
    assert_eq!(metric(&agents[f], "agentd_leader"), Some(1.0));
    assert_eq!(
        metric(&agents[f], "agentd_leader_transitions_total"),
        Some(1.0)
    );
    assert_no_refusals(&sim);
}

#[test]
fn a_gracefully_stopped_leader_releases_its_lease_and_the_other_takes_over_at_once() {
    // A long lease, so that taking over "at once" cannot be mistaken for waiting it out.
    let (sim, mut agents) = cluster(
        2,
        0,
        "lease_duration = \"15s\"\nrenew_deadline = \"10s\"\nretry_period = \"500ms\"\n",
    );
    let lease = wait_for_holder(&sim, &["node-0", "node-1"]);
    let leader = holder(&lease).to_owned();
    let l = index_of(&agents, &leader);
    let f = 1 - l;
    let other = agents[f].node.clone();
    wait_for_status(&agents[f], &leader, false);

    let stopped_at = Timestamp::now();
    let status = agents[l].agent.signal_and_wait(15, WAIT);
    assert!(status.success(), "{status:?}");
    let log = agents[l].agent.log();
    assert!(log.contains("leader lease released"), "{log}");

    let lease = wait_for_holder(&sim, &[&other]);
    let after_stop = time(&lease, "acquireTime").duration_since(stopped_at);
    eprintln!("SIGTERM of the leader to the new leader's acquireTime: {after_stop:?}");
    let bound = SignedDuration::from_millis(RETRY_MS) + REQUEST_ALLOWANCE;
    assert!(
        after_stop <= bound,
        "taken over {after_stop:?} after the stop: the lease was not released (bound {bound:?}, lease 15 s)"
    );
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    wait_for_status(&agents[f], &other, true);
    assert_no_refusals(&sim);
}
