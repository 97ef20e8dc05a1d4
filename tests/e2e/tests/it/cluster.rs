//! Cluster mode on one machine: kube-sim and several agents, each with its own fake GPUs,
//! state directory and socket, reaching kube-sim through a fault proxy.

use std::time::{Duration, Instant};

use e2e::cluster::{
    Fault, FaultProxy, Identity, KubeSim, NODE_USER, NodeAgent, NodeAgentOptions, metric_value,
};
use e2e::{fake_gpu, write_fake_gpus};

/// Inventory and lease interval of the agents under test.
const INTERVAL: &str = "1s";

struct Cluster {
    sim: KubeSim,
    proxy: FaultProxy,
    agents: Vec<NodeAgent>,
}

/// kube-sim (HTTPS, tokens and RBAC) with `nodes` nodes; agent 0 is leader-eligible with the
/// `agentd-leader` ServiceAccount (it labels the Nodes), the others are worker-only on
/// `agentd-node`. All of them reach kube-sim through the fault proxy (delay, blackhole).
fn cluster(nodes: usize, gpus: u32) -> Cluster {
    let sim = KubeSim::start(nodes, true);
    let proxy = FaultProxy::start(sim.addr());
    let leader = sim.dir.path().join("leader.kubeconfig");
    sim.kubeconfig_for(Identity::Leader, &proxy.addr, &leader);
    let worker = sim.dir.path().join("node.kubeconfig");
    sim.kubeconfig_for(Identity::Node, &proxy.addr, &worker);
    let agents = (0..nodes)
        .map(|i| {
            NodeAgent::start(&NodeAgentOptions {
                node: format!("node-{i}"),
                gpus,
                leader_eligible: i == 0,
                kubeconfig: if i == 0 {
                    leader.clone()
                } else {
                    worker.clone()
                },
                interval: INTERVAL,
                metrics: true,
            })
        })
        .collect();
    Cluster { sim, proxy, agents }
}

fn healthy_label(sim: &KubeSim, node: &str) -> Option<String> {
    sim.node_labels(node)
        .get("agentd.io/gpu.healthy")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
}

fn agent_state(nodes: &serde_json::Value, node: &str) -> String {
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .map(|n| n["agent"]["state"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[test]
fn every_node_gets_labels_and_annotation_and_the_agents_list_the_cluster() {
    let c = cluster(3, 2);
    for agent in &c.agents {
        c.sim.wait_until(
            &format!("labels on {}", agent.node),
            Duration::from_secs(30),
            || healthy_label(&c.sim, &agent.node).as_deref() == Some("2"),
        );
        let node = c.sim.get_json(&["node", &agent.node]);
        let labels = &node["metadata"]["labels"];
        assert_eq!(labels["agentd.io/gpu.count"], "2");
        assert_eq!(labels["agentd.io/gpu.product"], "NVIDIA-H200");
        assert_eq!(labels["agentd.io/gpu.memory"], "143771");
        assert!(
            labels["agentd.io/cpu.cores"]
                .as_str()
                .unwrap()
                .parse::<u32>()
                .unwrap()
                > 0
        );
        assert!(
            labels["agentd.io/memory"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                > 0
        );
        assert_eq!(
            labels["kubernetes.io/hostname"], agent.node,
            "the kubelet's labels stay"
        );
        let inventory: serde_json::Value = serde_json::from_str(
            node["metadata"]["annotations"]["agentd.io/inventory"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(inventory["gpus"][1]["uuid"], fake_gpu(1)["uuid"]);
        assert_eq!(inventory["gpuCount"], 2);
        assert_eq!(inventory["driverVersion"], "550.54.15");
    }
    let leases = c.sim.get_json(&["leases", "-n", "agentd-system"]);
    let heartbeats = leases["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("agentd-node-"))
        })
        .count();
    assert_eq!(heartbeats, 3, "{leases}");

    let nodes = c.agents[0].agent.ctl_json(&["nodes"]);
    let list = nodes["nodes"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    for n in list {
        assert_eq!(n["agent"]["state"], "fresh", "{nodes}");
        assert_eq!(n["gpus"]["total"], 2);
        assert_eq!(n["gpus"]["healthy"], 2);
        assert_eq!(n["gpus"]["product"], "NVIDIA H200");
        assert_eq!(n["ready"], "True");
        assert_eq!(n["schedulable"], true);
    }
    let text = String::from_utf8(c.agents[0].agent.ctl(&["nodes"]).stdout).unwrap();
    assert!(text.starts_with("NAME"), "{text}");
    assert!(text.contains("2/2") && text.contains("Ready"), "{text}");

    let status = c.agents[1].agent.ctl_json(&["status"]);
    assert_eq!(status["agent"]["mode"], "cluster");
    assert_eq!(status["cluster"]["reachable"], true, "{status}");
    assert_eq!(
        status["cluster"]["server"],
        format!("https://{}", c.proxy.addr)
    );
    c.sim.wait_until(
        "lease renewals are counted",
        Duration::from_secs(30),
        || {
            let metrics = c.agents[1].metrics();
            metric_value(&metrics, "agentd_cluster_connected") == Some(1.0)
                && metric_value(
                    &metrics,
                    "agentd_cluster_requests_total{verb=\"update\",code=\"200\"}",
                )
                .is_some_and(|n| n >= 1.0)
        },
    );

    // Drain and resume label the Node and show in the list.
    let drained = c.agents[0].agent.ctl_json(&["drain", "node-2"]);
    assert_eq!(drained["schedulable"], false);
    assert_eq!(c.sim.node_labels("node-2")["agentd.io/drain"], "true");
    c.agents[0].agent.ctl_json(&["resume", "node-2"]);
    // node-2's own agent projects the request onto its Node too, and may still be applying the
    // drain it saw first when the reply is read: the resume holds once that has settled.
    c.sim
        .wait_until("node-2 resumed", Duration::from_secs(30), || {
            let nodes = c.agents[0].agent.ctl_json(&["nodes"]);
            !c.sim.node_labels("node-2").contains_key("agentd.io/drain")
                && nodes["nodes"].as_array().is_some_and(|l| {
                    l.iter()
                        .any(|n| n["name"] == "node-2" && n["schedulable"] == true)
                })
        });

    // A worker-only agent may not read Nodes: it lists the agents' AgentNodes and Leases and
    // says what it cannot know.
    let worker = &c.agents[1].agent;
    let nodes = worker.ctl_json(&["nodes"]);
    let list = nodes["nodes"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{nodes}");
    for n in list {
        assert_eq!(n["agent"]["state"], "fresh", "{nodes}");
        assert_eq!(n["gpus"]["healthy"], 2, "{nodes}");
        assert_eq!(n["ready"], "Unknown", "{nodes}");
        assert!(n["schedulable"].is_null(), "{nodes}");
    }
    assert!(nodes["partial"].as_str().is_some(), "{nodes}");
    let text = String::from_utf8(worker.ctl(&["nodes"]).stdout).unwrap();
    assert!(
        text.lines().last().is_some_and(|l| l
            .starts_with("READY and SCHEDULABLE unknown: this agent's role may not read Nodes")),
        "{text}"
    );
    // Its drain is recorded in the AgentNode, and the leader-eligible agent labels the Node.
    let drained = worker.ctl_json(&["drain", "node-2"]);
    assert_eq!(
        (&drained["drained"], &drained["schedulable"]),
        (&true.into(), &false.into())
    );
    let agent_node = c
        .sim
        .get_json(&["agentnodes.agentd.io", "node-2", "-n", "agentd-system"]);
    assert_eq!(agent_node["spec"]["drain"], true, "{agent_node}");
    c.sim
        .wait_until("node-2 labelled drained", Duration::from_secs(30), || {
            c.sim.node_labels("node-2").get("agentd.io/drain") == Some(&"true".into())
        });
    c.agents[0]
        .agent
        .wait_for(&["nodes"], Duration::from_secs(30), |nodes| {
            nodes["nodes"][2]["schedulable"] == false
        });
    let resumed = worker.ctl_json(&["resume", "node-2"]);
    assert_eq!(resumed["drained"], false);
    c.sim
        .wait_until("node-2 label removed", Duration::from_secs(30), || {
            !c.sim.node_labels("node-2").contains_key("agentd.io/drain")
        });
    // A node without an agent cannot be recorded, and the worker may not label it: it says so.
    let missing = worker.ctl(&["drain", "node-9"]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("no agent has registered node \"node-9\"")
            && stderr.contains("agentd-leader"),
        "{stderr}"
    );

    // The worker-only agents did their work without a single refusal.
    let audit = c.sim.audit();
    let workers: Vec<&serde_json::Value> =
        audit.iter().filter(|r| r["user"] == NODE_USER).collect();
    let writes = workers
        .iter()
        .filter(|r| ["create", "update", "patch"].contains(&r["verb"].as_str().unwrap_or("")))
        .count();
    assert!(
        writes >= 4,
        "the workers wrote their Leases and AgentNodes: {workers:?}"
    );
    let refused: Vec<_> = workers.iter().filter(|r| r["code"] == 403).collect();
    assert!(
        refused.is_empty(),
        "403s for the agentd-node role: {refused:?}"
    );

    let missing = c.agents[0].agent.ctl(&["drain", "node-9"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("node-9"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[test]
fn xid_79_turns_the_healthy_label_down_and_a_killed_agent_goes_stale() {
    let mut c = cluster(2, 4);
    c.sim
        .wait_until("labels on node-1", Duration::from_secs(30), || {
            healthy_label(&c.sim, "node-1").as_deref() == Some("4")
        });
    let mut gpus: Vec<_> = (0..4).map(fake_gpu).collect();
    gpus[2]["xid_events"] = serde_json::json!([79]);
    let started = Instant::now();
    write_fake_gpus(&c.agents[1].agent.gpu_config, &gpus);
    c.sim
        .wait_until("gpu.healthy=3 on node-1", Duration::from_secs(30), || {
            healthy_label(&c.sim, "node-1").as_deref() == Some("3")
        });
    eprintln!(
        "XID 79 to label: {:?} (bound: two inventory intervals plus one second; see bench/cluster-agents)",
        started.elapsed()
    );
    let agent_node = c
        .sim
        .get_json(&["agentnodes.agentd.io", "node-1", "-n", "agentd-system"]);
    assert_eq!(agent_node["status"]["gpus"][2]["healthy"], false);
    assert!(
        agent_node["status"]["gpus"][2]["reason"]
            .as_str()
            .unwrap()
            .contains("79"),
        "{agent_node}"
    );

    let killed = c.agents.remove(1);
    drop(killed);
    let leader = &c.agents[0].agent;
    leader.wait_for(&["nodes"], Duration::from_secs(30), |nodes| {
        agent_state(nodes, "node-1") == "stale"
    });
    let text = String::from_utf8(leader.ctl(&["nodes"]).stdout).unwrap();
    let row = text.lines().find(|l| l.starts_with("node-1")).unwrap();
    assert!(row.contains("stale"), "{text}");
    assert_eq!(agent_state(&leader.ctl_json(&["nodes"]), "node-0"), "fresh");
}

fn log_lines(agent: &NodeAgent, needle: &str) -> usize {
    agent.agent.log().matches(needle).count()
}

#[test]
fn agents_survive_an_unreachable_slow_and_failing_api_server_and_catch_up() {
    let c = cluster(2, 2);
    for agent in &c.agents {
        c.sim.wait_until(
            &format!("labels on {}", agent.node),
            Duration::from_secs(30),
            || healthy_label(&c.sim, &agent.node).as_deref() == Some("2"),
        );
    }

    // Slow: every chunk waits 300 ms; the agents keep up.
    c.proxy.set(Fault::Delay(Duration::from_millis(300)));
    std::thread::sleep(Duration::from_secs(3));
    c.proxy.set(Fault::Pass);
    // Failing: kube-sim answers 503 with Retry-After, as an overloaded API server, until every
    // agent has seen one (the bound is a backstop; the test clears it).
    c.sim.fault(503, "2m");
    for agent in &c.agents {
        c.sim.wait_until(
            &format!("{} counts a 503", agent.node),
            Duration::from_secs(30),
            || agent.metrics().contains("code=\"503\""),
        );
    }
    c.sim.clear_fault();
    for agent in &c.agents {
        agent
            .agent
            .wait_for(&["status"], Duration::from_secs(30), |s| {
                s["cluster"]["reachable"] == true
            });
    }

    // Unreachable for 30 s; meanwhile a GPU turns unhealthy on node-1.
    c.proxy.set(Fault::Blackhole);
    let mut gpus: Vec<_> = (0..2).map(fake_gpu).collect();
    gpus[0]["xid_events"] = serde_json::json!([79]);
    write_fake_gpus(&c.agents[1].agent.gpu_config, &gpus);
    let outage = Instant::now();
    for agent in &c.agents {
        // The local socket answers all along, and says the cluster is not reachable.
        agent
            .agent
            .wait_for(&["status"], Duration::from_secs(30), |s| {
                s["cluster"]["reachable"] == false
            });
        assert_eq!(
            metric_value(&agent.metrics(), "agentd_cluster_connected"),
            Some(0.0)
        );
    }
    let text = String::from_utf8(c.agents[1].agent.ctl(&["status"]).stdout).unwrap();
    assert!(text.contains("UNREACHABLE"), "{text}");
    while outage.elapsed() < Duration::from_secs(30) {
        assert!(c.agents[0].agent.ctl(&["status"]).status.success());
        std::thread::sleep(Duration::from_secs(1));
    }

    c.proxy.set(Fault::Pass);

    c.sim.wait_until(
        "node-1 catches up: gpu.healthy=1",
        Duration::from_secs(30),
        || healthy_label(&c.sim, "node-1").as_deref() == Some("1"),
    );
    for agent in &c.agents {
        agent
            .agent
            .wait_for(&["status"], Duration::from_secs(30), |s| {
                s["cluster"]["reachable"] == true
            });
        c.agents[0]
            .agent
            .wait_for(&["nodes"], Duration::from_secs(30), |nodes| {
                agent_state(nodes, &agent.node) == "fresh"
            });
        // One line when the server went away and one when it came back, not one per retry:
        // twice, for the 503s and for the blackhole.
        let down = log_lines(agent, "API server unreachable");
        let up = log_lines(agent, "API server reachable again");
        assert!(
            down == 2 && up == 2,
            "{}: {down} unreachable and {up} reachable-again lines:\n{}",
            agent.node,
            agent.agent.log()
        );
        let metrics = agent.metrics();
        assert_eq!(
            metric_value(&metrics, "agentd_cluster_connected"),
            Some(1.0)
        );
        assert!(
            metrics.contains("code=\"<error>\""),
            "timeouts are counted:\n{metrics}"
        );
        assert!(
            !agent.agent.log().contains("kube_client"),
            "no line per failed request:\n{}",
            agent.agent.log()
        );
    }
}

#[test]
fn a_missing_node_is_named_and_retried_until_it_exists() {
    let sim = KubeSim::start(1, true);
    let kubeconfig = sim.dir.path().join("leader.kubeconfig");
    sim.kubeconfig_for(Identity::Leader, sim.addr(), &kubeconfig);
    let agent = NodeAgent::start(&NodeAgentOptions {
        node: "gpu-new".into(),
        gpus: 1,
        leader_eligible: true,
        kubeconfig,
        interval: INTERVAL,
        metrics: false,
    });
    sim.wait_until(
        "the agent names the missing Node",
        Duration::from_secs(30),
        || agent.agent.log().contains("no Node named \"gpu-new\""),
    );
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "gpu-new", "labels": {"kubernetes.io/hostname": "gpu-new"}}
    });
    let file = sim.dir.path().join("node.json");
    std::fs::write(&file, node.to_string()).unwrap();
    let out = sim.kubectl(&["create", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sim.wait_until("gpu-new labelled", Duration::from_secs(30), || {
        sim.node_labels("gpu-new")
            .contains_key("agentd.io/gpu.count")
    });
    assert_eq!(
        agent.agent.log().matches("no Node named").count(),
        1,
        "said once, not per retry:\n{}",
        agent.agent.log()
    );
}

#[test]
fn a_token_without_rights_is_named_and_the_agent_keeps_serving() {
    let sim = KubeSim::start(1, true);
    let kubeconfig = sim.dir.path().join("nobody.kubeconfig");
    sim.kubeconfig_for(Identity::Nobody, sim.addr(), &kubeconfig);
    let agent = NodeAgent::start(&NodeAgentOptions {
        node: "node-0".into(),
        gpus: 1,
        leader_eligible: false,
        kubeconfig,
        interval: INTERVAL,
        metrics: true,
    });
    let status = agent
        .agent
        .wait_for(&["status"], Duration::from_secs(30), |s| {
            s["cluster"]["last_error"].as_str().is_some()
        });
    let error = status["cluster"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("403") && error.contains("Forbidden"),
        "{error}"
    );
    assert_eq!(
        status["cluster"]["reachable"], true,
        "reachable, and refused"
    );
    let log = agent.agent.log();
    assert!(
        log.contains("the API server refused the agent") && log.contains("RBAC role"),
        "{log}"
    );
    let text = String::from_utf8(agent.agent.ctl(&["status"]).stdout).unwrap();
    assert!(text.contains("refused"), "{text}");
}

#[test]
fn a_bad_kubeconfig_stops_the_agent_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("broken.kubeconfig");
    std::fs::write(&kubeconfig, "apiVersion: v1\nclusters: [oops\n").unwrap();
    let out = std::process::Command::new(e2e::agentd_bin())
        .args([
            "--mode",
            "cluster",
            "--metrics-addr",
            "off",
            "--node-name",
            "n",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("agentd.sock"))
        .env("AGENTD_NVML_LIBRARY", dir.path().join("none.so"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read kubeconfig") && stderr.contains("broken.kubeconfig"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("agentd.sock").exists(),
        "the socket is cleaned up"
    );
}

#[test]
fn standalone_drain_keeps_new_jobs_waiting_and_says_why() {
    let agent = e2e::Agent::start(e2e::AgentOptions::default());
    let node = agent.ctl_json(&["nodes"])["nodes"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let drained = agent.ctl_json(&["drain", &node]);
    assert_eq!(drained["schedulable"], false);
    let manifest = agent.dir.path().join("job.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: waits}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 1\n      template: {spec: {containers: [{name: tensorflow, command: [\"true\"]}]}}\n",
    )
    .unwrap();
    agent.ctl_json(&["submit", manifest.to_str().unwrap()]);
    let job = agent.wait_for(&["job", "waits"], Duration::from_secs(10), |j| {
        j["message"].as_str().is_some_and(|m| m.contains("drained"))
    });
    assert_eq!(job["state"], "Queued", "{job}");
    agent.ctl_json(&["resume", &node]);
    agent.wait_for(&["job", "waits"], Duration::from_secs(30), |j| {
        j["state"] == "Succeeded"
    });
    let other = agent.ctl(&["drain", "not-this-node"]);
    assert_eq!(other.status.code(), Some(1));
}
