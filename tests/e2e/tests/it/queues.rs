//! The cluster's queues from the ConfigMap `agentd-queues`, against kube-sim with HTTPS,
//! tokens and RBAC on: applied with kubectl, its queues are in force on the leader and on a
//! follower alike; refused while it is not valid; the configured ones come back when it is
//! deleted, a removed queue serving its running job until it ends.

use e2e::cluster::NodeAgent;
use serde_json::Value;

use crate::placement::{WAIT, cluster, leads, state};

/// The ConfigMap with `toml` (indented under its key) as `queues.toml`.
fn configmap(toml: &str) -> String {
    let mut body = String::new();
    for line in toml.lines() {
        body.push_str("    ");
        body.push_str(line);
        body.push('\n');
    }
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: agentd-queues, namespace: agentd-system}}\ndata:\n  queues.toml: |\n{body}"
    )
}

const QUEUES: &str = "[queues.fast]\npriority = 10\n[queues.slow]\npriority = 1\n[queues.gpu]\npriority = 5\nmax_gpus = 2\n";

/// Two workers of one GPU in queue `gpu`, whose pods run 15 s.
const ON_GPU: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: on-gpu}
spec:
  queue: gpu
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        metadata: {annotations: {sim.agentd.io/run-seconds: "15"}}
        spec:
          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]
              resources: {limits: {nvidia.com/gpu: 1}}
"#;

fn queues(agent: &NodeAgent) -> Value {
    agent.agent.ctl_json(&["queues"])
}

fn queue<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["queues"]
        .as_array()?
        .iter()
        .find(|q| q["name"] == name)
}

fn names(list: &Value) -> Vec<String> {
    list["queues"]
        .as_array()
        .map(|qs| {
            qs.iter()
                .map(|q| q["name"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn queues_from_the_configmap_are_in_force_on_every_agent_and_live() {
    let (sim, agents) = cluster(2, 1);
    let (leader, follower) = (&agents[0], &agents[1]);
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        file.to_str().unwrap().to_owned()
    };
    let apply = |file: &str| {
        let out = sim.kubectl(&["apply", "-f", file]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Before: the configured queues, and nowhere a queue named gpu.
    assert_eq!(names(&queues(leader)), ["fast", "slow"]);
    let refused = follower.agent.ctl(&[
        "submit",
        &write("early.yaml", &ON_GPU.replace("on-gpu", "early")),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no queue named \"gpu\""));

    apply(&write("queues.yaml", &configmap(QUEUES)));
    for agent in [leader, follower] {
        sim.wait_until(&format!("{} has queue gpu", agent.node), WAIT, || {
            queue(&queues(agent), "gpu").is_some()
        });
        let list = queues(agent);
        assert_eq!(
            list["source"], "ConfigMap agentd-system/agentd-queues",
            "{list}"
        );
        assert_eq!(queue(&list, "gpu").unwrap()["max_gpus"], 2, "{list}");
        let table = agent.agent.ctl(&["queues"]);
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table.contains("2 GPUs") && table.contains("queues from ConfigMap"),
            "{table}"
        );
    }

    // A job submitted on the follower to the new queue is taken in and runs.
    let submitted = follower
        .agent
        .ctl_json(&["submit", &write("on-gpu.yaml", ON_GPU)]);
    assert_eq!(submitted["queue"], "gpu", "{submitted}");
    sim.wait_until("the job in gpu runs", WAIT, || {
        state(follower, "on-gpu") == "Running"
    });
    // Counted alike on both: the follower from the objects, the leader from its jobs.
    sim.wait_until("both count it", WAIT, || {
        [leader, follower].iter().all(|a| {
            queue(&queues(a), "gpu").is_some_and(|q| q["running"] == 1 && q["gpus_in_use"] == 2)
        })
    });
    assert_eq!(queues(leader), queues(follower));

    // Not valid: said by both, every problem named, and the queues before stay in force.
    apply(&write(
        "bad.yaml",
        &configmap("[queues.gpu]\npriority = 5\nmax_gpus = -1\n[scheduler]\nx = 1\n"),
    ));
    for agent in [leader, follower] {
        sim.wait_until(
            &format!("{} says the ConfigMap is refused", agent.node),
            WAIT,
            || queues(agent)["problem"].is_string(),
        );
        let list = queues(agent);
        let problem = list["problem"].as_str().unwrap();
        assert!(
            problem.contains("queues.toml: queues.gpu.max_gpus: ")
                && problem.contains("queues.toml: scheduler: "),
            "{problem}"
        );
        assert_eq!(names(&list), ["fast", "gpu", "slow"], "{list}");
        let table = agent.agent.ctl(&["queues"]);
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(table.contains("is not valid"), "{table}");
    }

    // Deleted: the configured queues again; gpu serves its running job, marked, and takes no
    // new one.
    assert!(
        sim.kubectl(&[
            "delete",
            "configmap",
            "-n",
            "agentd-system",
            "agentd-queues"
        ])
        .status
        .success()
    );
    for agent in [leader, follower] {
        sim.wait_until(
            &format!("{} has the configured queues", agent.node),
            WAIT,
            || queues(agent)["source"].is_null(),
        );
        let list = queues(agent);
        assert!(list["problem"].is_null(), "{list}");
        let gpu = queue(&list, "gpu").expect("listed while its job runs");
        assert_eq!(
            (&gpu["removed"], &gpu["running"], &gpu["max_gpus"]),
            (&Value::Bool(true), &Value::from(1), &Value::from(2)),
            "{list}"
        );
    }
    let refused = follower.agent.ctl(&[
        "submit",
        &write("late.yaml", &ON_GPU.replace("on-gpu", "late")),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    sim.wait_until("the job in the removed queue succeeds", WAIT, || {
        state(leader, "on-gpu") == "Succeeded"
    });
    for agent in [leader, follower] {
        sim.wait_until(&format!("{} lists gpu no more", agent.node), WAIT, || {
            names(&queues(agent)) == ["fast", "slow"]
        });
    }
}
