//! Jobs on the cluster (`cluster.place_jobs`), against kube-sim with HTTPS, tokens and RBAC on:
//! the elected leader keeps each job as a `TrainingJob` object, places its gang whole onto nodes
//! with free GPUs as pods bound to them (kube-sim's kubelets admit only what fits), follows the
//! pods to the end; the other agents take jobs in, list and cancel them through the objects, and
//! the leader admits what `kubectl apply` creates.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use e2e::cluster::{Identity, KubeSim, NodeAgent, NodeAgentOptions, PodEvent};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

pub(crate) const WAIT: Duration = Duration::from_mins(1);

/// The label of every pod and Service of a job: its name.
pub(crate) const JOB_LABEL: &str = "agentd.io/job";

/// Quick election timings (lease 4 s, renew 3 s, retry 500 ms) and jobs on the cluster.
pub(crate) const SETTINGS: &str = "lease_duration = \"4s\"\nrenew_deadline = \"3s\"\nretry_period = \"500ms\"\nplace_jobs = true\n";

/// kube-sim with `nodes` nodes of 2 healthy GPUs each; the agents of the first `candidates`
/// may lead.
pub(crate) fn cluster(nodes: usize, candidates: usize) -> (KubeSim, Vec<NodeAgent>) {
    cluster_with(nodes, candidates, SETTINGS, false)
}

/// As [`cluster`], with these `[cluster]` settings and, if `metrics`, a metrics port.
pub(crate) fn cluster_with(
    nodes: usize,
    candidates: usize,
    settings: &str,
    metrics: bool,
) -> (KubeSim, Vec<NodeAgent>) {
    let sim = KubeSim::start(nodes, true);
    let agents = agents_on(&sim, nodes, candidates, settings, metrics);
    (sim, agents)
}

/// One agent per node of `sim`, as [`cluster_with`] starts them.
pub(crate) fn agents_on(
    sim: &KubeSim,
    nodes: usize,
    candidates: usize,
    settings: &str,
    metrics: bool,
) -> Vec<NodeAgent> {
    let leader = sim.dir.path().join("leader.kubeconfig");
    sim.kubeconfig_for(Identity::Leader, sim.addr(), &leader);
    let worker = sim.dir.path().join("node.kubeconfig");
    sim.kubeconfig_for(Identity::Node, sim.addr(), &worker);
    (0..nodes)
        .map(|i| {
            NodeAgent::start_with(
                &NodeAgentOptions {
                    node: format!("node-{i}"),
                    gpus: 2,
                    leader_eligible: i < candidates,
                    kubeconfig: if i < candidates {
                        leader.clone()
                    } else {
                        worker.clone()
                    },
                    interval: "1s",
                    metrics,
                },
                settings,
            )
        })
        .collect()
}

/// A Kubeflow TFJob: a chief, a parameter server and two workers of one GPU each; its pods run
/// 3 s in kube-sim.
const MNIST: &str = r#"apiVersion: kubeflow.org/v1
kind: TFJob
metadata: {name: mnist}
spec:
  tfReplicaSpecs:
    Chief:
      replicas: 1
      template:
        metadata: {annotations: {sim.agentd.io/run-seconds: "3"}}
        spec:
          containers:
            - {name: tensorflow, image: "tf:2.16", command: [python, train.py]}
    PS:
      replicas: 1
      template:
        metadata: {annotations: {sim.agentd.io/run-seconds: "3"}}
        spec:
          containers:
            - {name: tensorflow, image: "tf:2.16", command: [python, train.py]}
    Worker:
      replicas: 2
      template:
        metadata: {annotations: {sim.agentd.io/run-seconds: "3"}}
        spec:
          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]
              resources: {limits: {nvidia.com/gpu: 1}}
"#;

/// Four workers of two GPUs: 8 GPUs, on a cluster of 6.
const TOO_WIDE: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: too-wide}
spec:
  runPolicy: {scheduleTimeoutSeconds: 600}
  replicaSpecs:
    Worker:
      replicas: 4
      template:
        spec:
          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]
              resources: {limits: {nvidia.com/gpu: 2}}
"#;

/// Two workers of one GPU whose pods run 20 s.
const LONG: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: long}
spec:
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        metadata: {annotations: {sim.agentd.io/run-seconds: "20"}}
        spec:
          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]
              resources: {limits: {nvidia.com/gpu: 1}}
"#;

/// Whether `agent` is the elected leader and its core answers. (A follower answers
/// `agentctl queues` too, from the objects, so leading is read from `agentctl status`.)
pub(crate) fn leads(agent: &NodeAgent) -> bool {
    let status = agent.agent.ctl(&["status", "-o", "json"]);
    status.status.success()
        && serde_json::from_slice::<serde_json::Value>(&status.stdout)
            .is_ok_and(|s| s["cluster"]["leading"] == true)
        && agent.agent.ctl(&["queues"]).status.success()
}

pub(crate) fn state(agent: &NodeAgent, job: &str) -> String {
    let status = agent.agent.ctl_json(&["job", job]);
    status["state"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_tfjob_is_placed_whole_onto_the_cluster_as_pods_and_succeeds() {
    let (sim, agents) = cluster(3, 1);
    let leader = &agents[0];
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));

    assert!(!leads(&agents[1]), "node-1 may not lead");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mnist.yaml");
    std::fs::write(&file, MNIST).unwrap();
    leader.agent.ctl_json(&["submit", file.to_str().unwrap()]);
    let wide = dir.path().join("too-wide.yaml");
    std::fs::write(&wide, TOO_WIDE).unwrap();
    leader.agent.ctl_json(&["submit", wide.to_str().unwrap()]);

    // The whole gang's pods, each bound to a node by the leader, with the Kubeflow TF_CONFIG.
    sim.wait_until("the gang's four pods exist", WAIT, || {
        sim.get_json(&["pods", "-l", "agentd.io/job=mnist"])["items"]
            .as_array()
            .is_some_and(|p| p.len() == 4)
    });
    let pods = sim.get_json(&["pods", "-l", "agentd.io/job=mnist"]);
    let mut gpus_by_node = std::collections::BTreeMap::<String, u64>::new();
    for pod in pods["items"].as_array().unwrap() {
        let spec = &pod["spec"];
        let node = spec["nodeName"].as_str().expect("bound by the leader");
        assert!(["node-0", "node-1", "node-2"].contains(&node), "{node}");
        assert_eq!(spec["restartPolicy"], "Never");
        assert_eq!(spec["subdomain"], "mnist");
        let container = &spec["containers"][0];
        assert_eq!(container["image"], "tf:2.16");
        let tf_config = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "TF_CONFIG")
            .expect("TF_CONFIG is set")["value"]
            .as_str()
            .unwrap()
            .to_owned();
        let tf_config: serde_json::Value = serde_json::from_str(&tf_config).unwrap();
        assert_eq!(
            tf_config["cluster"]["worker"][1],
            "mnist-worker-1.mnist.default.svc.cluster.local:2222",
            "{tf_config}"
        );
        let gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            .as_str()
            .map_or(0, |g| g.parse().unwrap());
        *gpus_by_node.entry(node.to_owned()).or_default() += gpus;
    }
    assert_eq!(gpus_by_node.values().sum::<u64>(), 2, "{gpus_by_node:?}");
    assert!(
        gpus_by_node.values().all(|g| *g <= 2),
        "no node gets more GPUs than its agent reports healthy: {gpus_by_node:?}"
    );
    let service = sim.get_json(&["service", "mnist"]);
    assert_eq!(service["spec"]["clusterIP"], "None");

    sim.wait_until("the gang succeeds", WAIT, || {
        state(leader, "mnist") == "Succeeded"
    });
    // The TrainingJob object says so too, for kubectl and a next leader.
    let object = sim.get_json(&["trainingjob", "mnist"]);
    assert_eq!(object["status"]["state"], "Succeeded", "{object}");

    // What cannot fit waits, and says what binds.
    let waiting = leader.agent.ctl_json(&["job", "too-wide"]);
    assert_eq!(waiting["state"], "Queued", "{waiting}");
    let message = waiting["message"].as_str().unwrap_or_default();
    assert!(message.contains("GPU"), "{message}");
    assert!(
        sim.get_json(&["pods", "-l", "agentd.io/job=too-wide"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "no pod of a gang that does not fit"
    );
}

/// kill -9 of the leader while its gang runs: the other candidate takes the Lease, rebuilds from
/// the TrainingJob and the pods, adopts the running gang, and follows it to success; no pod is
/// created twice and no second generation is started.
#[test]
fn a_killed_leaders_running_gang_is_adopted_by_the_next_leader_and_succeeds() {
    let (sim, mut agents) = cluster(3, 2);
    sim.wait_until("one of the two candidates leads", WAIT, || {
        agents.iter().take(2).any(leads)
    });
    let l = usize::from(!leads(&agents[0]));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("long.yaml");
    std::fs::write(&file, LONG).unwrap();
    agents[l]
        .agent
        .ctl_json(&["submit", file.to_str().unwrap()]);
    sim.wait_until("the gang runs", WAIT, || {
        state(&agents[l], "long") == "Running"
    });

    agents[l].agent.signal_and_wait(9, WAIT);
    let next = 1 - l;
    sim.wait_until("the other candidate leads and knows the job", WAIT, || {
        leads(&agents[next]) && agents[next].agent.ctl(&["job", "long"]).status.success()
    });
    sim.wait_until("the adopted gang succeeds", WAIT, || {
        state(&agents[next], "long") == "Succeeded"
    });
    let status = agents[next].agent.ctl_json(&["job", "long"]);
    assert_eq!(
        status["generation"], 1,
        "the gang was not restarted: {status}"
    );
    let created = sim.pod_creates().len();
    assert_eq!(created, 2, "each pod created once, by the first leader");
}

/// Two workers of one GPU whose pods run until they are deleted.
const STAYS: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: stays}
spec:
  runPolicy: {backoffLimit: 2}
  replicaSpecs:
    Worker:
      replicas: 2
      restartPolicy: Never
      template:
        spec:
          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]
              resources: {limits: {nvidia.com/gpu: 1}}
"#;

/// Two workers of two GPUs: two whole nodes of this cluster.
const TWO_NODES: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: two-nodes}
spec:
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        spec:
          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]
              resources: {limits: {nvidia.com/gpu: 2}}
"#;

/// A node whose kubelet stops (kube-sim marks it `Unknown`) is lost once
/// `cluster.node_lost_grace` has passed: the gang that ran there runs again on another node,
/// with reason `NodeLost` naming the node, counted; its pod on the lost node is deleted rather
/// than left Terminating. Once the node is back, it takes replicas again.
#[test]
fn a_gang_on_a_lost_node_runs_again_on_another_node_and_the_node_comes_back() {
    // Cluster time 20 times faster: a stopped node is Unknown after 2 s.
    let sim = KubeSim::start_scaled(3, true, 20.0);
    let settings =
        format!("{SETTINGS}node_lost_grace = \"2s\"\n[jobs]\nrestart_backoff = \"1s\"\n");
    let agents = agents_on(&sim, 3, 1, &settings, true);
    let leader = &agents[0];
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stays.yaml");
    std::fs::write(&file, STAYS).unwrap();
    leader.agent.ctl_json(&["submit", file.to_str().unwrap()]);
    sim.wait_until("the gang runs", WAIT, || {
        state(leader, "stays") == "Running"
    });
    let nodes_of = |status: &serde_json::Value| -> std::collections::BTreeSet<String> {
        status["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["node"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let first = nodes_of(&leader.agent.ctl_json(&["job", "stays"]));
    assert_eq!(first.len(), 1, "packed onto one node: {first:?}");
    let lost = first.first().unwrap().clone();

    sim.stop_node(&lost);
    sim.wait_until("the gang runs again", WAIT, || {
        let status = leader.agent.ctl_json(&["job", "stays"]);
        status["generation"] == 2 && status["state"] == "Running"
    });
    let status = leader.agent.ctl_json(&["job", "stays"]);
    assert_eq!(status["restarts"], 1, "{status}");
    let again = nodes_of(&status);
    assert!(!again.contains(&lost), "not on {lost} again: {again:?}");
    let event = status["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "NodeLost")
        .unwrap_or_else(|| panic!("a NodeLost event: {status}"));
    let message = event["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("node {lost} not Ready for"))
            && message.contains("NodeStatusUnknown"),
        "{message}"
    );
    let metrics = leader.metrics();
    let line = "agentd_job_failures_total{reason=\"NodeLost\"} 1";
    assert!(metrics.contains(line), "{line} in:\n{metrics}");
    // Its pod on the lost node is not left Terminating there.
    let first_generation =
        sim.get_json(&["pods", "-l", "agentd.io/job=stays,agentd.io/generation=1"]);
    assert_eq!(
        first_generation["items"].as_array().map(Vec::len),
        Some(0),
        "{first_generation}"
    );

    // Back: a gang that needs two whole nodes fits only with it.
    sim.restart_node(&lost);
    let file = dir.path().join("two-nodes.yaml");
    std::fs::write(&file, TWO_NODES).unwrap();
    leader.agent.ctl_json(&["submit", file.to_str().unwrap()]);
    sim.wait_until("the gang that needs the node back runs", WAIT, || {
        state(leader, "two-nodes") == "Running"
    });
    let placed = nodes_of(&leader.agent.ctl_json(&["job", "two-nodes"]));
    assert!(placed.contains(&lost), "{placed:?}");
    assert_eq!(state(leader, "stays"), "Running");
}

/// One worker that runs no GPU, with this `sim.agentd.io/fail` and image.
fn failing(name: &str, fail: &str, image: &str) -> String {
    format!(
        r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  runPolicy: {{backoffLimit: 1}}
  replicaSpecs:
    Worker:
      replicas: 1
      restartPolicy: Never
      template:
        metadata: {{annotations: {{sim.agentd.io/fail: {fail}}}}}
        spec:
          containers:
            - {{name: tensorflow, image: "{image}", command: [python, train.py]}}
"#
    )
}

/// What the platform does to a pod decides the job: an image that keeps failing to pull,
/// volumes that never mount and a Secret that does not exist fail it once the pod has waited
/// past its limit, with Kubernetes' words, and the wait is said while it lasts; an eviction
/// restarts the gang, counted, even under restartPolicy Never. Each is counted by reason in
/// `agentd_job_failures_total`.
#[test]
fn what_the_platform_does_to_a_pod_fails_or_restarts_its_gang_with_the_reason() {
    let settings = format!("{SETTINGS}mount_timeout = \"3s\"\nimage_pull_timeout = \"3s\"\n");
    let (sim, agents) = cluster_with(2, 1, &settings, true);
    let leader = &agents[0];
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));
    let dir = tempfile::tempdir().unwrap();
    // Nothing asked of the simulator: the Secret the environment names does not exist.
    let secret = failing("secret", "none", "tf:2.16")
        .replace("sim.agentd.io/fail: none", "sim.agentd.io/run-seconds: \"60\"")
        .replace(
            "command: [python, train.py]}",
            "command: [python, train.py], env: [{name: KEY, valueFrom: {secretKeyRef: {name: absent, key: k}}}]}",
        );
    for (name, manifest) in [
        (
            "pull",
            failing("pull", "ImagePullBackOff", "registry.example/missing:1"),
        ),
        ("mount", failing("mount", "FailedMount", "tf:2.16")),
        ("evicted", failing("evicted", "Evicted", "tf:2.16")),
        ("secret", secret),
    ] {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, manifest).unwrap();
        leader.agent.ctl_json(&["submit", file.to_str().unwrap()]);
    }
    for job in ["pull", "mount", "evicted", "secret"] {
        sim.wait_until(&format!("{job} fails"), WAIT, || {
            state(leader, job) == "Failed"
        });
    }
    let pull = leader.agent.ctl_json(&["job", "pull"]);
    assert_eq!(pull["reason"], "ImagePullFailed", "{pull}");
    let message = pull["message"].as_str().unwrap();
    assert!(
        message.contains("pod default/pull-worker-0-g1")
            && message.contains("\"registry.example/missing:1\"")
            && message.contains("cluster.image_pull_timeout"),
        "{message}"
    );
    let said = pull["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "ReplicaWaiting")
        .unwrap_or_else(|| panic!("the wait was said: {pull}"));
    assert!(
        said["message"].as_str().unwrap().starts_with(
            "worker-0 waits: pod default/pull-worker-0-g1: image \"registry.example/missing:1\""
        ) && said["message"].as_str().unwrap().ends_with(
            "; the job fails if this lasts 3s from the pod's start (cluster.image_pull_timeout)"
        ),
        "{said}"
    );
    let secret = leader.agent.ctl_json(&["job", "secret"]);
    assert_eq!(secret["reason"], "ContainerConfigFailed", "{secret}");
    assert!(
        secret["message"]
            .as_str()
            .unwrap()
            .ends_with("CreateContainerConfigError: secret \"absent\" not found"),
        "{secret}"
    );
    let mount = leader.agent.ctl_json(&["job", "mount"]);
    assert_eq!(mount["reason"], "VolumeMountFailed", "{mount}");
    let message = mount["message"].as_str().unwrap();
    assert!(
        message.contains("volume \"data\"") && message.contains("cluster.mount_timeout"),
        "{message}"
    );
    assert_eq!(
        mount["restarts"], 0,
        "retrying cannot mount what is missing"
    );
    let evicted = leader.agent.ctl_json(&["job", "evicted"]);
    assert_eq!(evicted["reason"], "BackoffLimitExceeded", "{evicted}");
    assert_eq!(evicted["restarts"], 1, "{evicted}");
    assert!(
        evicted["message"].as_str().unwrap().contains("Evicted"),
        "{evicted}"
    );
    let metrics = leader.metrics();
    for line in [
        "agentd_job_failures_total{reason=\"ImagePullFailed\"} 1",
        "agentd_job_failures_total{reason=\"VolumeMountFailed\"} 1",
        "agentd_job_failures_total{reason=\"ContainerConfigFailed\"} 1",
        "agentd_job_failures_total{reason=\"Evicted\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    // Nothing of a failed job is left holding the nodes: the pods that never ran (waiting on
    // an image or volumes) are deleted; those that ended (evicted) stay, with their logs, as
    // cleanPodPolicy Running (the default) keeps them.
    sim.wait_until(
        "the failed gangs' unfinished pods are deleted",
        WAIT,
        || {
            sim.get_json(&["pods", "-l", "agentd.io/job"])["items"]
                .as_array()
                .is_some_and(|pods| {
                    pods.iter().all(|p| {
                        matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
                    })
                })
        },
    );
}

/// Applied with kubectl: one worker without GPUs whose pod runs 60 s.
const APPLIED: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: applied}
spec:
  replicaSpecs:
    Worker:
      replicas: 1
      template:
        metadata: {annotations: {sim.agentd.io/run-seconds: "60"}}
        spec:
          containers:
            - {name: tensorflow, image: "tf:2.16", command: [python, train.py]}
"#;

/// [`LONG`] as people write it for a cluster: the image's entrypoint and working directory,
/// and a key of a Secret in the environment. None of it is on the machine that admits it.
fn long_from_image() -> String {
    let from_image = r#"image: "registry.example.com/team/trainer:1.4"
              workingDir: /opt/trainer
              env:
                - {name: WANDB_API_KEY, valueFrom: {secretKeyRef: {name: wandb, key: key}}}"#;
    let long = LONG.replace(
        "image: \"tf:2.16\"\n              command: [python, train.py]",
        from_image,
    );
    assert_ne!(long, LONG, "LONG names an image and a command");
    long
}

/// Applied with kubectl, with two mistakes.
const INVALID: &str = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: invalid}
spec:
  queue: nosuch
  replicaSpecs:
    Worker:
      replicas: -1
      template:
        spec:
          containers:
            - {name: tensorflow, image: "tf:2.16", command: [python, train.py]}
"#;

/// Jobs from any node: a job submitted on a follower (with its image's entrypoint and a Secret
/// in its environment, which its pods keep for the cluster to resolve) is admitted by the
/// leader and placed; of
/// two applied with kubectl the valid one runs (owned by its field manager) and the invalid one
/// is Failed with every problem; a follower lists them all and cancels its job through the
/// leader; `kubectl delete trainingjob` takes a running gang's pods with it.
#[test]
fn jobs_come_from_any_node_and_from_kubectl_and_a_follower_reads_and_cancels_them() {
    let (sim, agents) = cluster(2, 1);
    let (leader, follower) = (&agents[0], &agents[1]);
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        file.to_str().unwrap().to_owned()
    };

    // Checked on the follower as on the leader: every problem at once, nothing created.
    let bad = follower.agent.ctl(&[
        "submit",
        &write("bad.yaml", &INVALID.replace("invalid", "bad")),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(
        said.contains("spec.queue") && said.contains("replicas"),
        "{said}"
    );
    assert!(!sim.kubectl(&["get", "trainingjob", "bad"]).status.success());

    let secret = sim.kubectl(&[
        "apply",
        "-f",
        &write(
            "secret.yaml",
            "{apiVersion: v1, kind: Secret, metadata: {name: wandb}, stringData: {key: s3cret}}",
        ),
    ]);
    assert!(
        secret.status.success(),
        "{}",
        String::from_utf8_lossy(&secret.stderr)
    );
    let submitted = follower
        .agent
        .ctl_json(&["submit", &write("long.yaml", &long_from_image())]);
    assert_eq!(submitted["state"], "Queued", "{submitted}");
    for (file, text) in [("applied.yaml", APPLIED), ("invalid.yaml", INVALID)] {
        let out = sim.kubectl(&["apply", "-f", &write(file, text)]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    sim.wait_until("the follower's job runs", WAIT, || {
        state(follower, "long") == "Running"
    });
    let pod = sim.get_json(&["pod", "long-worker-0-g1"]);
    let env = &pod["spec"]["containers"][0]["env"];
    let key = env
        .as_array()
        .and_then(|vars| vars.iter().find(|v| v["name"] == "WANDB_API_KEY"))
        .unwrap_or_else(|| panic!("the Secret's variable is in the pod: {env}"));
    assert_eq!(key["valueFrom"]["secretKeyRef"]["name"], "wandb", "{key}");
    assert!(
        pod["spec"]["containers"][0].get("command").is_none(),
        "{pod}"
    );
    sim.wait_until("the applied job runs", WAIT, || {
        state(follower, "applied") == "Running"
    });
    sim.wait_until("the invalid job is refused", WAIT, || {
        state(follower, "invalid") == "Failed"
    });
    let refused = follower.agent.ctl_json(&["job", "invalid"]);
    assert_eq!(refused["reason"], "Invalid", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("spec.queue") && message.contains("spec.replicaSpecs.Worker.replicas"),
        "{message}"
    );
    let applied = leader.agent.ctl_json(&["job", "applied"]);
    assert_eq!(
        applied["owner"]["user"], "kubernetes:kubectl-client-side-apply",
        "{applied}"
    );
    let object = sim.get_json(&["trainingjob", "long"]);
    assert_eq!(
        object["metadata"]["annotations"]["agentd.io/submitted-on"],
        "node-1"
    );

    // The follower lists what the leader keeps, in the same form.
    let listed = follower.agent.ctl_json(&["jobs"]);
    let mut names: Vec<&str> = listed["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["applied", "invalid", "long"], "{listed}");
    let table = follower.agent.ctl(&["jobs"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("long") && table.contains("Running"),
        "{table}"
    );

    // Cancelled on the follower, by the leader, as a local cancel is.
    let asked = follower.agent.ctl(&["cancel", "long"]);
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
    sim.wait_until("the leader cancels it", WAIT, || {
        state(leader, "long") == "Cancelled"
    });
    let cancelled = leader.agent.ctl_json(&["job", "long"]);
    assert!(
        cancelled["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("cancelled by ")),
        "{cancelled}"
    );
    sim.wait_until("its pods are gone", WAIT, || {
        sim.get_json(&["pods", "-l", "agentd.io/job=long"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });

    // kubectl delete stops a running gang: its pods go with the object.
    assert!(
        sim.kubectl(&["delete", "trainingjob", "applied"])
            .status
            .success()
    );
    sim.wait_until("the applied job's pods are gone", WAIT, || {
        sim.get_json(&["pods", "-l", "agentd.io/job=applied"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
}

/// Two workers of two GPUs whose pods run 3 s and are kept when they end, with `extra` at the
/// template spec's indent.
fn pair(name: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  runPolicy: {{scheduleTimeoutSeconds: 600, cleanPodPolicy: None}}
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        metadata: {{annotations: {{sim.agentd.io/run-seconds: "3"}}}}
        spec:
{extra}          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]
              resources: {{limits: {{nvidia.com/gpu: 2}}}}
"#
    )
}

/// Taints and required node affinity, judged per template: a gang that does not tolerate the
/// tainted nodes waits and is told which taint keeps it off; one that tolerates them runs there
/// (its pods keep the tolerations); a gang whose node affinity names one node runs only there.
#[test]
fn tainted_nodes_take_only_gangs_that_tolerate_them_and_affinity_chooses_nodes() {
    // Tainted before the agents start: the leader places nothing before its first lists,
    // so no gang can be placed on what it has not yet seen.
    let sim = KubeSim::start(3, true);
    for node in ["node-1", "node-2"] {
        let out = sim.kubectl(&["taint", "nodes", node, "dedicated=ml:NoSchedule"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let agents = agents_on(&sim, 3, 1, SETTINGS, false);
    let leader = &agents[0];
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));
    // `agentctl nodes` shows them, so a person sees why a node takes only some gangs.
    sim.wait_until("agentctl nodes shows both taints", WAIT, || {
        let out = leader.agent.ctl(&["nodes"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.ends_with("dedicated=ml:NoSchedule"))
            .count()
            == 2
    });
    let dir = tempfile::tempdir().unwrap();
    let submit = |name: &str, text: &str| {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).unwrap();
        leader.agent.ctl_json(&["submit", file.to_str().unwrap()]);
    };
    submit("plain", &pair("plain", ""));
    let mut last = serde_json::Value::Null;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        last = leader.agent.ctl_json(&["job", "plain"]);
        if last["message"]
            .as_str()
            .is_some_and(|m| m.contains("taint it does not tolerate"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last["state"], "Queued", "{last}");
    let message = last["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("without a taint it does not tolerate"),
        "the plain gang is told which nodes it may use: {last}"
    );

    // Three workers of two GPUs need every node, the tainted ones too.
    let tolerating =
        "          tolerations: [{key: dedicated, operator: Exists, effect: NoSchedule}]\n";
    submit(
        "tolerant",
        &pair("tolerant", tolerating).replace("replicas: 2", "replicas: 3"),
    );
    let mut nodes = Vec::new();
    sim.wait_until("the tolerating gang's three pods are bound", WAIT, || {
        let pods = sim.get_json(&["pods", "-l", "agentd.io/job=tolerant"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        for pod in &items {
            assert_eq!(pod["spec"]["tolerations"][0]["key"], "dedicated", "{pod}");
        }
        nodes = items
            .iter()
            .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_owned))
            .collect();
        nodes.sort();
        nodes.len() == 3
    });
    assert_eq!(nodes, ["node-0", "node-1", "node-2"]);
    sim.wait_until("the tolerating gang succeeds", WAIT, || {
        state(leader, "tolerant") == "Succeeded"
    });

    // Required node affinity on the node's name and label: node-2 only.
    let affine = "          tolerations: [{key: dedicated, operator: Exists}]
          affinity:
            nodeAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                nodeSelectorTerms:
                - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [node-2]}]
";
    submit(
        "affine",
        &pair("affine", affine).replace("replicas: 2", "replicas: 1"),
    );
    sim.wait_until("the affine gang succeeds", WAIT, || {
        state(leader, "affine") == "Succeeded"
    });
    let job = leader.agent.ctl_json(&["job", "affine"]);
    assert_eq!(job["replicas"][0]["node"], "node-2", "{job}");
    assert_eq!(state(leader, "plain"), "Queued");
}

/// `agentctl logs` in cluster mode reads the replica's pod log through the API server: whole on
/// the leader, followed until the container ends; a follower whose role may not read pod logs
/// says where they can be read, with the kubectl command.
#[test]
fn logs_come_from_the_replicas_pods() {
    let (sim, agents) = cluster(2, 1);
    let (leader, follower) = (&agents[0], &agents[1]);
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));
    let text = r#"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: talk, namespace: team}
spec:
  runPolicy: {cleanPodPolicy: None}
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        metadata:
          annotations: {sim.agentd.io/run-seconds: "4", sim.agentd.io/log: "epoch 1\nepoch 2\n"}
        spec:
          containers:
            - {name: tensorflow, image: "tf:2.16", command: [python, train.py]}
"#;
    let dir = tempfile::tempdir().unwrap();
    let namespace = dir.path().join("team.yaml");
    std::fs::write(
        &namespace,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team}\n",
    )
    .unwrap();
    let out = sim.kubectl(&["apply", "-f", namespace.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.path().join("talk.yaml");
    std::fs::write(&file, text).unwrap();
    leader.agent.ctl_json(&["submit", file.to_str().unwrap()]);
    sim.wait_until("the gang runs", WAIT, || state(leader, "talk") == "Running");

    // Followed: the stream ends when the container does, with the job's end.
    let followed = leader
        .agent
        .ctl(&["logs", "talk", "--replica", "worker-1", "--follow"]);
    assert!(
        followed.status.success(),
        "{}",
        String::from_utf8_lossy(&followed.stderr)
    );
    let ended = "epoch 1\nepoch 2\nkube-sim: container tensorflow exited with code 0\n";
    assert_eq!(String::from_utf8_lossy(&followed.stdout), ended);
    sim.wait_until("the gang succeeds", WAIT, || {
        state(leader, "talk") == "Succeeded"
    });
    // The pods stay when the job ends (cleanPodPolicy None; Running, the default, keeps them
    // too), and so do their logs.
    let whole = leader.agent.ctl(&["logs", "talk"]);
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&whole.stdout), ended);

    let unknown = leader.agent.ctl(&["logs", "talk", "--replica", "chief-0"]);
    assert_eq!(unknown.status.code(), Some(1));
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(said.contains("replicas: worker-0, worker-1"), "{said}");

    // The node role may not read pods: the follower says where the log is.
    let refused = follower.agent.ctl(&["logs", "talk"]);
    assert_eq!(refused.status.code(), Some(1));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("may not read pod logs")
            && said.contains("(node-0)")
            && said.contains(
                "kubectl logs -n team -l agentd.io/job=talk,agentd.io/replica-type=worker,agentd.io/replica-index=0 -c tensorflow"
            ),
        "{said}"
    );

    // Removed, then submitted again at once: the new job's pods are its own, never the kept
    // pods of the old one (same names, another owner).
    let removed = leader.agent.ctl(&["cancel", "talk"]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    leader.agent.ctl_json(&["submit", file.to_str().unwrap()]);
    sim.wait_until("the new job succeeds", WAIT, || {
        state(leader, "talk") == "Succeeded"
    });
    let uid = sim.get_json(&["trainingjob", "talk", "-n", "team"])["metadata"]["uid"].clone();
    let pods = sim.get_json(&["pods", "-n", "team", "-l", "agentd.io/job=talk"]);
    let pods = pods["items"].as_array().unwrap();
    assert_eq!(pods.len(), 2, "{pods:?}");
    for pod in pods {
        assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], uid, "{pod}");
    }
}

/// A TrainingJob of `workers` workers of one GPU each, with a chief and a parameter server
/// (no GPUs) if asked, whose pods run `seconds` of cluster time; and the replica names its
/// gang has.
pub(crate) fn gang(
    name: &str,
    workers: u32,
    chief: bool,
    ps: bool,
    seconds: u32,
) -> (String, Vec<String>) {
    gang_ending(name, workers, chief, ps, seconds, 0)
}

/// As [`gang`], with the workers exiting with `exit_code`; if not 0, the workers restart on
/// failure and the job allows one restart (`backoffLimit: 1`), so it fails after two runs.
pub(crate) fn gang_ending(
    name: &str,
    workers: u32,
    chief: bool,
    ps: bool,
    seconds: u32,
    exit_code: u8,
) -> (String, Vec<String>) {
    let group = |kind: &str, replicas: u32, gpus: u32| {
        let fails = gpus > 0 && exit_code != 0;
        let policy = if fails {
            "\n      restartPolicy: OnFailure"
        } else {
            ""
        };
        let exit = if fails {
            format!(", sim.agentd.io/exit-code: \"{exit_code}\"")
        } else {
            String::new()
        };
        let limits = if gpus > 0 {
            format!("\n              resources: {{limits: {{nvidia.com/gpu: {gpus}}}}}")
        } else {
            String::new()
        };
        format!(
            r#"    {kind}:
      replicas: {replicas}{policy}
      template:
        metadata: {{annotations: {{sim.agentd.io/run-seconds: "{seconds}"{exit}}}}}
        spec:
          containers:
            - name: tensorflow
              image: "tf:2.16"
              command: [python, train.py]{limits}
"#
        )
    };
    let run_policy = if exit_code != 0 {
        "  runPolicy: {backoffLimit: 1}\n"
    } else {
        ""
    };
    let mut text = format!(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n{run_policy}  replicaSpecs:\n"
    );
    let mut replicas = Vec::new();
    if chief {
        text.push_str(&group("Chief", 1, 0));
        replicas.push("chief-0".to_owned());
    }
    if ps {
        text.push_str(&group("PS", 1, 0));
        replicas.push("ps-0".to_owned());
    }
    text.push_str(&group("Worker", workers, 1));
    replicas.extend((0..workers).map(|i| format!("worker-{i}")));
    (text, replicas)
}

pub(crate) fn submit(agent: &NodeAgent, manifest: &str) {
    let out = agent.agent.ctl_with_stdin(&["submit", "-"], manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every job the agent keeps, by name; `None` while it cannot say (not leading yet).
pub(crate) fn jobs_by_name(agent: &NodeAgent) -> Option<BTreeMap<String, serde_json::Value>> {
    let out = agent.agent.ctl(&["jobs", "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        list["jobs"]
            .as_array()?
            .iter()
            .map(|j| (j["name"].as_str().unwrap_or_default().to_owned(), j.clone()))
            .collect(),
    )
}

/// The first ADDED event of each pod of each gang generation, by (job, generation), then by
/// replica (`worker-0`).
fn first_added(events: &[PodEvent]) -> BTreeMap<(String, u32), BTreeMap<String, Instant>> {
    let mut generations: BTreeMap<(String, u32), BTreeMap<String, Instant>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.kind == "ADDED") {
        let job = e.label(JOB_LABEL).to_owned();
        let generation = e.label("agentd.io/generation").parse().unwrap_or(0);
        let replica = format!(
            "{}-{}",
            e.label("agentd.io/replica-type"),
            e.label("agentd.io/replica-index")
        );
        generations
            .entry((job, generation))
            .or_default()
            .entry(replica)
            .or_insert(e.at);
    }
    generations
}

/// How far apart the first and the last pod of one gang generation may appear to a watcher.
/// The leader starts every replica of a placement in the same turn and creates their pods
/// concurrently: on the 2-core development machine, shared with compilers, the widest span
/// in eight runs was 41 ms, most were under 15 ms. One second is 25 times that, so that a
/// loaded machine does not fail the test, and still shorter than the 1.3 s a simulated
/// kubelet takes to start a pod here: a pod made only once another of its generation had
/// started, or after a retry, fails it, as does one never made (the test's other check).
const BURST: Duration = Duration::from_secs(1);

/// A watcher of the pod stream sees each gang generation whole: every replica's pod of every
/// generation is added, and all within one short burst, never part now and the rest later.
#[test]
fn each_gang_generations_pods_appear_together_in_one_burst() {
    let (sim, agents) = cluster(3, 1);
    let leader = &agents[0];
    sim.wait_until("node-0 leads and takes requests", WAIT, || {
        leader.agent.ctl(&["queues"]).status.success()
    });
    let watch = sim.watch_pods(JOB_LABEL);
    // Six gangs asking 11 GPUs in all of a cluster of 6, submitted at once: the first are
    // placed together, the others as earlier ones end.
    let gangs: Vec<(String, String, Vec<String>)> = [
        (2, true, true),
        (2, false, true),
        (2, true, false),
        (1, true, true),
        (2, true, true),
        (2, false, false),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (workers, chief, ps))| {
        let name = format!("burst-{i}");
        let (manifest, replicas) = gang(&name, workers, chief, ps, 2);
        (name, manifest, replicas)
    })
    .collect();
    std::thread::scope(|s| {
        for (_, manifest, _) in &gangs {
            s.spawn(|| submit(leader, manifest));
        }
    });
    let expected: BTreeMap<String, Vec<String>> = gangs
        .into_iter()
        .map(|(name, _, replicas)| (name, replicas))
        .collect();
    sim.wait_until("every gang succeeds", WAIT, || {
        jobs_by_name(leader).is_some_and(|jobs| {
            expected
                .keys()
                .all(|j| jobs.get(j).is_some_and(|s| s["state"] == "Succeeded"))
        })
    });

    let generations = first_added(&watch.events());
    let mut spans = Vec::new();
    for ((job, generation), pods) in &generations {
        let replicas: Vec<&String> = pods.keys().collect();
        let mut want: Vec<&String> = expected[job].iter().collect();
        want.sort();
        assert_eq!(
            replicas, want,
            "generation {generation} of {job}: every replica's pod"
        );
        let first = pods.values().min().unwrap();
        let last = pods.values().max().unwrap();
        spans.push((last.duration_since(*first), job.clone(), *generation));
    }
    let jobs: BTreeSet<&String> = generations.keys().map(|(j, _)| j).collect();
    assert_eq!(jobs.len(), expected.len(), "a pod of every gang: {jobs:?}");
    spans.sort();
    eprintln!("first to last pod ADDED of each gang generation: {spans:?}");
    let (widest, job, generation) = spans.last().unwrap();
    assert!(
        *widest <= BURST,
        "the pods of generation {generation} of {job} appeared over {widest:?} (bound {BURST:?})"
    );
}

/// The Lease `agentd-leader`: its holder, and the whole object.
pub(crate) fn leader_lease(sim: &KubeSim) -> (String, serde_json::Value) {
    let lease = sim.get_json(&["lease", "agentd-leader", "-n", "agentd-system"]);
    let holder = lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (holder, lease)
}

/// The election's timings in [`SETTINGS`].
pub(crate) const LEASE_DURATION: SignedDuration = SignedDuration::from_secs(4);
pub(crate) const RETRY_PERIOD: SignedDuration = SignedDuration::from_millis(500);
/// What the takeover may take beyond lease + retry: one read and one write of the Lease on a
/// loaded test machine, as leader.rs allows.
pub(crate) const REQUEST_ALLOWANCE: SignedDuration = SignedDuration::from_secs(2);

/// The jobs of the failover test that run long: 300 s of cluster time, 30 s here, so that
/// gangs start while both run however slowly the machine places them.
const LONG_JOBS: [&str; 2] = ["f-20", "f-21"];

/// Fifty jobs of 1 to 4 workers of one GPU, some with a chief, some with a parameter server,
/// whose pods run 15 to 35 s of cluster time (1.5 to 3.5 s here, less than the Lease takes
/// to run out), but for [`LONG_JOBS`]; and each one's replicas.
fn fifty_jobs() -> Vec<(String, String, Vec<String>)> {
    (0..50u32)
        .map(|i| {
            let name = format!("f-{i:02}");
            let long = LONG_JOBS.contains(&name.as_str());
            let seconds = if long { 300 } else { 15 + 10 * (i % 3) };
            let workers = if long { 1 } else { 1 + i % 4 };
            let (manifest, replicas) = gang(&name, workers, i % 3 == 0, i % 5 == 0, seconds);
            (name, manifest, replicas)
        })
        .collect()
}

/// kill -9 of the leader while fifty jobs go through a cluster that holds a few at a time: the
/// other candidate takes the Lease within lease + retry of the kill, rebuilds from the
/// TrainingJobs and the pods, and brings every job to success. No pod is created twice, and a
/// gang runs again (a generation 2) only if the kill caught it starting, which a new leader
/// cannot adopt.
#[test]
fn fifty_jobs_all_succeed_across_a_killed_leader_and_no_pod_is_created_twice() {
    let started = Instant::now();
    // Cluster time 10 times faster; four nodes of 2 GPUs, 8 GPUs for gangs of 1 to 4.
    let sim = KubeSim::start_scaled(4, true, 10.0);
    let mut agents = agents_on(&sim, 4, 2, SETTINGS, false);
    let leads = |a: &NodeAgent| a.agent.ctl(&["queues"]).status.success();
    sim.wait_until("one of the two candidates leads", WAIT, || {
        agents.iter().take(2).any(leads)
    });
    let l = usize::from(!leads(&agents[0]));
    let next = 1 - l;
    let watch = sim.watch_pods(JOB_LABEL);
    let jobs = fifty_jobs();
    for (_, manifest, _) in &jobs {
        submit(&agents[l], manifest);
    }

    // The kill comes at the first pod of a gang of several replicas (its status says
    // Starting, and some of its pods may not exist yet) while the two long gangs run (and
    // often a short one, whose pods end before the Lease runs out) and the queue still holds
    // jobs.
    let several: BTreeSet<&str> = jobs
        .iter()
        .filter(|(_, _, replicas)| replicas.len() > 1)
        .map(|(name, _, _)| name.as_str())
        .collect();
    let mut running: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (_, trigger) = watch.next_where(0, 3 * WAIT, |e| {
        let job = e.label(JOB_LABEL);
        let pods = running.entry(job.to_owned()).or_default();
        if e.kind != "DELETED" && e.pod["status"]["phase"] == "Running" {
            pods.insert(e.name().to_owned());
        } else {
            pods.remove(e.name());
        }
        e.kind == "ADDED"
            && several.contains(job)
            && LONG_JOBS
                .iter()
                .all(|long| running.get(*long).is_some_and(|p| !p.is_empty()))
    });
    let killed_at = Timestamp::now();
    agents[l].agent.signal_and_wait(9, WAIT);
    // What the next leader will rebuild from: nothing writes the statuses until it leads.
    let at_kill: BTreeMap<String, (String, u64)> = sim.get_json(&["trainingjobs"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap().to_owned(),
                (
                    o["status"]["state"].as_str().unwrap_or("Queued").to_owned(),
                    o["status"]["generation"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect();
    let count = |state: &str| at_kill.values().filter(|(s, _)| s == state).count();
    eprintln!(
        "at the kill (on the first pod of {}): {} succeeded, {} running, {} starting, {} queued",
        trigger.label(JOB_LABEL),
        count("Succeeded"),
        count("Running"),
        count("Starting") + count("Placed"),
        count("Queued")
    );
    assert_eq!(at_kill.len(), jobs.len(), "every job has its object");
    for long in LONG_JOBS {
        assert_eq!(at_kill[long].0, "Running", "{long}: {at_kill:?}");
    }
    assert!(count("Running") >= 2, "the long gangs run: {at_kill:?}");
    assert!(count("Queued") > 0, "jobs still queued: {at_kill:?}");

    // The other candidate takes over once the Lease has run out, not much later.
    let mut lease = serde_json::Value::Null;
    sim.wait_until("the other candidate holds the Lease", WAIT, || {
        let (holder, now) = leader_lease(&sim);
        lease = now;
        holder == agents[next].node
    });
    let acquired: Timestamp = lease["spec"]["acquireTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let takeover = acquired.duration_since(killed_at);
    eprintln!("kill -9 of the leader to the new leader's acquireTime: {takeover:?}");
    let bound = LEASE_DURATION + RETRY_PERIOD + REQUEST_ALLOWANCE;
    assert!(
        takeover <= bound,
        "taken over {takeover:?} after the kill; bound: lease + retry + {REQUEST_ALLOWANCE:?}"
    );

    let deadline = Instant::now() + 3 * WAIT;
    let last = loop {
        let last = jobs_by_name(&agents[next]).unwrap_or_default();
        let unfinished: Vec<String> = jobs
            .iter()
            .filter(|(name, _, _)| !last.get(name).is_some_and(|j| j["state"] == "Succeeded"))
            .map(|(name, _, _)| name.clone())
            .collect();
        if unfinished.is_empty() {
            break last;
        }
        if Instant::now() > deadline {
            let statuses: Vec<String> = unfinished
                .iter()
                .map(|name| {
                    let out = agents[next].agent.ctl(&["job", name, "-o", "json"]);
                    String::from_utf8_lossy(&out.stdout).into_owned()
                })
                .collect();
            panic!(
                "not every job succeeded under the new leader; at the kill: {at_kill:?}\n\
                 unfinished: {}\nthe new leader's log:\n{}",
                statuses.join("\n"),
                agents[next].agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    // Each pod name was created once: a second create of a name succeeds only after the first
    // pod is gone, which would be a replica run twice.
    let creates = sim.pod_create_counts();
    let twice: Vec<_> = creates.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "pods created more than once: {twice:?}");
    let cut = trigger.label(JOB_LABEL);
    let before_kill = creates
        .keys()
        .filter(|p| p.starts_with(&format!("{cut}-")) && p.ends_with("-g1"))
        .count();
    let replicas = jobs
        .iter()
        .find(|(name, _, _)| name == cut)
        .unwrap()
        .2
        .len();
    eprintln!("{cut}: {before_kill} of its {replicas} pods created before the kill");
    // Every pod the watcher saw was one of those creates, and every created pod was seen.
    let seen: BTreeSet<String> = watch.events().iter().map(|e| e.name().to_owned()).collect();
    let created: BTreeSet<String> = creates.keys().cloned().collect();
    assert_eq!(seen, created);

    // A gang runs again only where the kill caught it starting; the new leader says so.
    let mut restarted = Vec::new();
    for (name, _, _) in &jobs {
        let (state, _) = &at_kill[name];
        let generation = last[name]["generation"].as_u64().unwrap();
        if generation == 1 {
            continue;
        }
        let status = agents[next].agent.ctl_json(&["job", name]);
        assert!(
            matches!(state.as_str(), "Placed" | "Starting"),
            "{name} was {state} at the kill and ran {generation} times: {status}"
        );
        assert_eq!(generation, 2, "{status}");
        let said = status["events"].as_array().unwrap().iter().any(|e| {
            e["reason"] == "AgentRestarted"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("the gang was still starting"))
        });
        assert!(said, "{status}");
        restarted.push(name.clone());
    }
    // Every gang that ran at the kill was adopted, the long one still running and the others
    // with their pods ended meanwhile.
    for (name, (state, _)) in &at_kill {
        if state != "Running" {
            continue;
        }
        let status = agents[next].agent.ctl_json(&["job", name]);
        let events = status["events"].as_array().unwrap();
        assert!(events.iter().any(|e| e["reason"] == "Adopted"), "{status}");
    }
    eprintln!(
        "restarted as generation 2 (starting at the kill): {restarted:?}; {} pods created; test took {:?}",
        creates.len(),
        started.elapsed()
    );
}

/// A leader whose role may not list the cluster's Nodes cannot know where anything fits, and
/// says so rather than calling a job unplaceable: a submission waits the few seconds a new
/// leader gives its lists, is then taken in, and waits with reason `NodesNotListed`
/// (`agentctl` and `kubectl get trainingjobs` both say it); the leader's log names the refusal.
/// With the right given back, the job is placed and succeeds.
#[test]
fn a_leader_that_may_not_list_the_nodes_places_nothing_and_says_why() {
    let sim = KubeSim::start(2, true);
    let role_verbs = |verbs: &str| {
        let patch = format!(r#"[{{"op": "replace", "path": "/rules/0/verbs", "value": {verbs}}}]"#);
        let out = sim.kubectl(&[
            "patch",
            "clusterrole",
            "agentd-leader",
            "--type=json",
            "-p",
            &patch,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let rules = sim.get_json(&["clusterrole", "agentd-leader"]);
    assert_eq!(
        rules["rules"][0]["resources"][0], "nodes",
        "the first rule is the Nodes' one: {rules}"
    );
    role_verbs(r#"["get", "patch"]"#);
    let agents = agents_on(&sim, 1, 1, SETTINGS, false);
    let leader = &agents[0];
    sim.wait_until("node-0 leads and takes requests", WAIT, || leads(leader));

    let (manifest, _) = gang("blind", 1, false, false, 2);
    submit(leader, &manifest);
    let job = leader.agent.ctl_json(&["job", "blind"]);
    assert_eq!(
        (job["state"].as_str(), job["reason"].as_str()),
        (Some("Queued"), Some("NodesNotListed")),
        "{job}"
    );
    let message = job["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not listed the cluster's nodes"),
        "{message}"
    );
    let object = sim.get_json(&["trainingjob", "blind"]);
    assert_eq!(object["status"]["reason"], "NodesNotListed", "{object}");
    let log = leader.agent.log();
    assert!(
        log.contains("watching the cluster's nodes and pods failed") && log.contains("403"),
        "{log}"
    );
    assert!(
        sim.live_pods(&format!("{JOB_LABEL}=blind")).is_empty(),
        "nothing is placed"
    );

    role_verbs(r#"["get", "list", "watch", "patch"]"#);
    sim.wait_until("the job succeeds once the Nodes are listed", WAIT, || {
        state(leader, "blind") == "Succeeded"
    });
}
