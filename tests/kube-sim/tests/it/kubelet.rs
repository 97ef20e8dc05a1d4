//! The simulated kubelets: pod phases, container statuses, events and node outages.

use serde_json::{Value, json};

use crate::common::{self, eventually, get, post, request};

fn fast() -> kube_sim::SimConfig {
    kube_sim::SimConfig {
        nodes: 2,
        gpus_per_node: 4,
        time_scale: kube_sim::TimeScale::new(20.0).unwrap(),
        pod_eviction_timeout: std::time::Duration::from_secs(20),
        ..kube_sim::SimConfig::default()
    }
}

async fn bind(sim: &common::Sim, pod: &str, node: &str) {
    let (code, _) = post(sim, &format!("/api/v1/namespaces/default/pods/{pod}/binding"),
        &json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod}, "target": {"kind": "Node", "name": node}})).await;
    assert_eq!(code, 201);
}

async fn phase_is(sim: &common::Sim, pod: &str, phase: &str) -> Value {
    eventually(20, &format!("{pod} to be {phase}"), || async {
        let (_, p) = get(sim, &format!("/api/v1/namespaces/default/pods/{pod}")).await;
        (p["status"]["phase"] == phase).then_some(p)
    })
    .await
}

async fn reasons(sim: &common::Sim, pod: &str) -> Vec<String> {
    let (_, evs) = get(
        sim,
        &format!("/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3D{pod}"),
    )
    .await;
    evs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn nodes_have_gpus_and_leases() {
    let sim = common::start(fast()).await;
    let (_, n) = get(&sim, "/api/v1/nodes/node-1").await;
    assert_eq!(n["status"]["capacity"]["nvidia.com/gpu"], "4");
    let ready = n["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "True");
    let (code, lease) = get(
        &sim,
        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-0",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(lease["spec"]["holderIdentity"], "node-0");
    assert_eq!(sim.handle.add_nodes(1).unwrap(), ["node-2"]);
}

#[tokio::test]
async fn a_bound_pod_runs_and_succeeds_with_kubelet_events() {
    let sim = common::start(fast()).await;
    post(
        &sim,
        "/api/v1/namespaces/default/pods",
        &common::pod(
            "ok",
            &json!({"sim.agentd.io/run-seconds": "2", "sim.agentd.io/log": "hello from ok"}),
        ),
    )
    .await;
    bind(&sim, "ok", "node-0").await;
    let running = phase_is(&sim, "ok", "Running").await;
    assert_eq!(running["status"]["containerStatuses"][0]["ready"], true);
    assert!(
        running["status"]["podIP"]
            .as_str()
            .unwrap()
            .starts_with("10.244.")
    );
    let done = phase_is(&sim, "ok", "Succeeded").await;
    let term = &done["status"]["containerStatuses"][0]["state"]["terminated"];
    assert_eq!(
        (term["exitCode"].as_i64(), term["reason"].as_str()),
        (Some(0), Some("Completed"))
    );
    let r = reasons(&sim, "ok").await;
    for want in ["Scheduled", "Pulling", "Pulled", "Created", "Started"] {
        assert!(r.iter().any(|x| x == want), "{want} missing from {r:?}");
    }
    let (code, log) = request(
        &sim,
        "GET",
        "/api/v1/namespaces/default/pods/ok/log",
        "",
        "",
    )
    .await;
    assert_eq!(code, 200);
    assert!(
        log.as_str().unwrap().starts_with("hello from ok\n"),
        "{log}"
    );
}

#[tokio::test]
async fn failure_annotations_produce_each_failure_class() {
    let sim = common::start(fast()).await;
    let cases = [
        (
            "exit3",
            json!({"sim.agentd.io/run-seconds": "1", "sim.agentd.io/exit-code": "3"}),
        ),
        ("oom", json!({"sim.agentd.io/fail": "OOMKilled"})),
        ("evicted", json!({"sim.agentd.io/fail": "Evicted"})),
        (
            "admission",
            json!({"sim.agentd.io/fail": "UnexpectedAdmissionError"}),
        ),
        ("pull", json!({"sim.agentd.io/fail": "ImagePullBackOff"})),
        ("mount", json!({"sim.agentd.io/fail": "FailedMount"})),
    ];
    for (name, ann) in &cases {
        post(
            &sim,
            "/api/v1/namespaces/default/pods",
            &common::pod(name, ann),
        )
        .await;
        bind(&sim, name, "node-1").await;
    }
    let p = phase_is(&sim, "exit3", "Failed").await;
    assert_eq!(
        p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"],
        3
    );
    assert_eq!(
        p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"],
        "Error"
    );
    let p = phase_is(&sim, "oom", "Failed").await;
    assert_eq!(
        p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"],
        "OOMKilled"
    );
    let p = phase_is(&sim, "evicted", "Failed").await;
    assert_eq!(p["status"]["reason"], "Evicted");
    let p = phase_is(&sim, "admission", "Failed").await;
    assert_eq!(p["status"]["reason"], "UnexpectedAdmissionError");
    eventually(20, "ImagePullBackOff", || async {
        let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/pull").await;
        (p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff")
            .then_some(())
    })
    .await;
    assert!(reasons(&sim, "pull").await.iter().any(|r| r == "BackOff"));
    assert!(
        reasons(&sim, "mount")
            .await
            .iter()
            .any(|r| r == "FailedMount")
    );
    let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/mount").await;
    assert_eq!(p["status"]["phase"], "Pending");
}

/// A container whose environment names a Secret that does not exist, or a key a ConfigMap
/// lacks, waits with `CreateContainerConfigError` and the kubelet's words, warned at each try;
/// once the Secret exists and the key is there, it runs. An optional reference never waits.
#[tokio::test]
async fn a_missing_secret_or_key_holds_the_container_until_it_is_there() {
    let sim = common::start(fast()).await;
    let with_env = |name: &str, env: Value, env_from: Value| {
        let mut pod = common::pod(name, &json!({"sim.agentd.io/run-seconds": "1"}));
        pod["spec"]["containers"][0]["env"] = env;
        pod["spec"]["containers"][0]["envFrom"] = env_from;
        pod
    };
    post(&sim, "/api/v1/namespaces/default/configmaps",
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"lr": "0.1"}})).await;
    let cases = [
        (
            "secret",
            json!([{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}}]),
            json!([]),
        ),
        (
            "key",
            json!([{"name": "BATCH", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "batch"}}}]),
            json!([]),
        ),
        (
            "optional",
            json!([{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "none", "key": "k", "optional": true}}}]),
            json!([{"configMapRef": {"name": "settings"}}]),
        ),
    ];
    for (name, env, env_from) in cases {
        post(
            &sim,
            "/api/v1/namespaces/default/pods",
            &with_env(name, env, env_from),
        )
        .await;
        bind(&sim, name, "node-1").await;
    }
    let waiting = |pod: &'static str| {
        let sim = &sim;
        async move {
            eventually(20, &format!("{pod} waits"), || async {
                let (_, p) = get(sim, &format!("/api/v1/namespaces/default/pods/{pod}")).await;
                let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
                (w["reason"] == "CreateContainerConfigError").then(|| w["message"].clone())
            })
            .await
        }
    };
    assert_eq!(waiting("secret").await, json!("secret \"wandb\" not found"));
    assert_eq!(
        waiting("key").await,
        json!("couldn't find key batch in ConfigMap default/settings")
    );
    phase_is(&sim, "optional", "Succeeded").await;
    assert!(reasons(&sim, "secret").await.iter().any(|r| r == "Failed"));
    let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/secret").await;
    assert_eq!(p["status"]["phase"], "Pending");

    post(&sim, "/api/v1/namespaces/default/secrets",
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wandb"}, "data": {"key": "c2VjcmV0"}})).await;
    phase_is(&sim, "secret", "Succeeded").await;
    let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/key").await;
    assert_eq!(p["status"]["phase"], "Pending", "the key is still missing");
}

#[tokio::test]
async fn restart_policy_always_goes_into_crash_loop_backoff() {
    let sim = common::start(fast()).await;
    let mut pod = common::pod(
        "loop",
        &json!({"sim.agentd.io/run-seconds": "1", "sim.agentd.io/exit-code": "1"}),
    );
    pod["spec"]["restartPolicy"] = json!("Always");
    post(&sim, "/api/v1/namespaces/default/pods", &pod).await;
    bind(&sim, "loop", "node-0").await;
    eventually(20, "a restart", || async {
        let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/loop").await;
        (p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(1)).then_some(())
    })
    .await;
    assert!(reasons(&sim, "loop").await.iter().any(|r| r == "BackOff"));
}

#[tokio::test]
async fn deleting_a_running_pod_kills_it_gracefully() {
    let sim = common::start(fast()).await;
    post(
        &sim,
        "/api/v1/namespaces/default/pods",
        &common::pod("k", &json!({})),
    )
    .await;
    bind(&sim, "k", "node-0").await;
    phase_is(&sim, "k", "Running").await;
    let (code, p) = request(
        &sim,
        "DELETE",
        "/api/v1/namespaces/default/pods/k",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 202);
    assert!(p["metadata"]["deletionTimestamp"].is_string());
    eventually(20, "the pod to go", || async {
        (get(&sim, "/api/v1/namespaces/default/pods/k").await.0 == 404).then_some(())
    })
    .await;
    assert!(reasons(&sim, "k").await.iter().any(|r| r == "Killing"));
}

#[tokio::test]
async fn a_stopped_node_goes_unknown_and_its_pods_are_evicted_then_it_recovers() {
    let sim = common::start(fast()).await;
    post(
        &sim,
        "/api/v1/namespaces/default/pods",
        &common::pod("on1", &json!({})),
    )
    .await;
    bind(&sim, "on1", "node-1").await;
    phase_is(&sim, "on1", "Running").await;
    assert!(sim.handle.stop_node("node-1"));
    eventually(30, "node-1 Unknown", || async {
        let (_, n) = get(&sim, "/api/v1/nodes/node-1").await;
        let ready = n["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")?
            .clone();
        (ready["status"] == "Unknown").then_some(())
    })
    .await;
    let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/on1").await;
    let ready = p["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "False");
    eventually(30, "on1 marked for deletion", || async {
        let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/on1").await;
        p["metadata"]["deletionTimestamp"].is_string().then_some(())
    })
    .await;
    assert!(sim.handle.restart_node("node-1"));
    eventually(20, "on1 gone after the node returns", || async {
        (get(&sim, "/api/v1/namespaces/default/pods/on1").await.0 == 404).then_some(())
    })
    .await;
    let (_, n) = get(&sim, "/api/v1/nodes/node-1").await;
    let ready = n["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["status"], "True");
}

fn gpu_pod(name: &str, gpus: u32, cpu: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "tf", "image": "tf",
            "resources": {"limits": {"nvidia.com/gpu": gpus.to_string()}, "requests": {"cpu": cpu}}}]}})
}

async fn create_bound(sim: &common::Sim, pod: &Value, node: &str) {
    let (code, body) = post(sim, "/api/v1/namespaces/default/pods", pod).await;
    assert_eq!(code, 201, "{body}");
    bind(sim, pod["metadata"]["name"].as_str().unwrap(), node).await;
}

/// With admission on, a kubelet refuses what does not fit in what its node has free, as a real
/// kubelet does; an over-committing scheduler is caught by the cluster.
#[tokio::test]
async fn kubelet_admission_refuses_pods_that_exceed_free_capacity() {
    let sim = common::start(kube_sim::SimConfig {
        kubelet_admission: true,
        ..fast()
    })
    .await;
    create_bound(&sim, &gpu_pod("a", 3, "1"), "node-0").await;
    phase_is(&sim, "a", "Running").await;
    create_bound(&sim, &gpu_pod("b", 2, "1"), "node-0").await;
    let b = phase_is(&sim, "b", "Failed").await;
    assert_eq!(b["status"]["reason"], "OutOfnvidia.com/gpu");
    assert_eq!(
        b["status"]["message"],
        "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu, requested: 2, used: 3, capacity: 4"
    );
    assert!(
        reasons(&sim, "b")
            .await
            .contains(&"OutOfnvidia.com/gpu".to_string())
    );
    // The last GPU fits; so does anything once a pod holding GPUs has gone.
    create_bound(&sim, &gpu_pod("c", 1, "1"), "node-0").await;
    phase_is(&sim, "c", "Running").await;
    create_bound(&sim, &gpu_pod("d", 2, "1"), "node-1").await;
    phase_is(&sim, "d", "Running").await;
    let (code, _) = request(
        &sim,
        "DELETE",
        "/api/v1/namespaces/default/pods/a?gracePeriodSeconds=0",
        "application/json",
        "",
    )
    .await;
    assert!(code == 200 || code == 202);
    eventually(20, "pod a to be gone", || async {
        (get(&sim, "/api/v1/namespaces/default/pods/a").await.0 == 404).then_some(())
    })
    .await;
    create_bound(&sim, &gpu_pod("e", 3, "1"), "node-0").await;
    phase_is(&sim, "e", "Running").await;
    // cpu is checked too (each node has 64 cores).
    create_bound(&sim, &gpu_pod("f", 0, "100"), "node-1").await;
    let f = phase_is(&sim, "f", "Failed").await;
    assert_eq!(f["status"]["reason"], "OutOfcpu");
    assert!(
        f["status"]["message"]
            .as_str()
            .unwrap()
            .contains("cpu, requested: 100000m, used: 1000m, capacity: 64000m")
    );
}

#[tokio::test]
async fn without_admission_nodes_run_whatever_is_bound() {
    let sim = common::start(fast()).await;
    create_bound(&sim, &gpu_pod("a", 4, "1"), "node-0").await;
    create_bound(&sim, &gpu_pod("b", 4, "1"), "node-0").await;
    phase_is(&sim, "a", "Running").await;
    phase_is(&sim, "b", "Running").await;
}

/// The events of a pod annotated `sim.agentd.io/event-api: events.k8s.io/v1`, as
/// `events.k8s.io/v1` shows them.
async fn events_v1(sim: &common::Sim, pod: &str) -> Vec<Value> {
    let (_, evs) = get(
        sim,
        &format!(
            "/apis/events.k8s.io/v1/namespaces/default/events?fieldSelector=regarding.name%3D{pod}"
        ),
    )
    .await;
    evs["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_pod_can_have_its_events_recorded_as_an_events_k8s_io_recorder_records_them() {
    let sim = common::start(kube_sim::SimConfig {
        time_scale: kube_sim::TimeScale::new(60.0).unwrap(),
        ..fast()
    })
    .await;
    let ann =
        json!({"sim.agentd.io/fail": "FailedMount", "sim.agentd.io/event-api": "events.k8s.io/v1"});
    post(
        &sim,
        "/api/v1/namespaces/default/pods",
        &common::pod("m", &ann),
    )
    .await;
    bind(&sim, "m", "node-0").await;
    let mount = |evs: Vec<Value>| evs.into_iter().find(|e| e["reason"] == "FailedMount");
    // The first failure is created, the second makes it a series; none has the deprecated
    // count and timestamps.
    let event = eventually(20, "a FailedMount series", || async {
        mount(events_v1(&sim, "m").await).filter(|e| e["series"]["count"] == 2)
    })
    .await;
    assert_eq!(event["reportingController"], "kubelet");
    assert_eq!(event["reportingInstance"], "node-0");
    assert!(event["eventTime"].as_str().is_some(), "{event}");
    for deprecated in [
        "deprecatedCount",
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
    ] {
        assert!(event.get(deprecated).is_none(), "{deprecated} in {event}");
    }
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("MountVolume.SetUp failed")
    );
    // The kubelet fails on (its back-off reaches about two seconds here), but the series is
    // not written again until it is refreshed or has ended.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let still = mount(events_v1(&sim, "m").await).unwrap();
    assert_eq!(still["series"]["count"], 2, "{still}");
    assert_eq!(
        still["metadata"]["resourceVersion"],
        event["metadata"]["resourceVersion"]
    );
    // The pod goes; six minutes of cluster time later the series has ended and is written
    // with every failure counted.
    let (code, _) = request(&sim, "DELETE", "/api/v1/namespaces/default/pods/m", "", "").await;
    assert!(code == 200 || code == 202, "{code}");
    let ended = eventually(20, "the ended series", || async {
        mount(events_v1(&sim, "m").await).filter(|e| e["series"]["count"].as_i64() > Some(2))
    })
    .await;
    assert!(ended["series"]["count"].as_i64().unwrap() >= 5, "{ended}");
    // In its core/v1 form it is one event without a count.
    let (_, core) = get(
        &sim,
        "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dm,reason%3DFailedMount",
    )
    .await;
    let items = core["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{core}");
    assert!(items[0].get("count").is_none(), "{}", items[0]);
}
