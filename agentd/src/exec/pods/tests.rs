//! The pod executor against an in-process kube-sim: HTTPS, tokens and RBAC on, the executor
//! running as the `agentd-leader` ServiceAccount with the roles of packaging/kubernetes/.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube_sim::{
    AuthorizationMode, EVENT_API, EXIT_CODE, FAIL, KubeSim, RUN_SECONDS, SimConfig, SimHandle,
    TimeScale,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::*;

/// What a local replica is told of its GPUs; a pod never is.
const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";
use crate::job::{RestartDecision, RestartPolicy, restart_decision};

/// Cluster time runs this much faster: an image pull (1 s) takes 50 ms.
const TIME_SCALE: f64 = 20.0;
/// How long a pod may wait for its image or volumes here.
const WAIT_LIMIT: Duration = Duration::from_secs(2);
/// How long a test waits for something the cluster does before it fails.
const PATIENCE: Duration = Duration::from_mins(1);

/// A pod as the executor decodes it from the watch: through its JSON.
fn watched(pod: &Pod) -> WatchedPod {
    serde_json::to_value(pod)
        .and_then(serde_json::from_value)
        .expect("a pod decodes as watched")
}

struct Sim {
    handle: SimHandle,
    dir: tempfile::TempDir,
    admin: kube::Client,
}

async fn client(path: &Path) -> kube::Client {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig parses");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    // As the agent builds its clients: a failing server is its own to retry, not kube-rs's.
    config.default_retry = false;
    kube::Client::try_from(config).expect("client")
}

/// A simulator with `nodes` nodes of 8 GPUs, HTTPS, tokens and RBAC, with agentd's namespace,
/// CRDs and roles applied as packaging/kubernetes/ has them.
async fn start_sim(nodes: usize) -> Sim {
    start_sim_scaled(nodes, TIME_SCALE).await
}

/// As [`start_sim`], with cluster time `scale` times as fast as real time.
async fn start_sim_scaled(nodes: usize, scale: f64) -> Sim {
    let dir = tempfile::tempdir().expect("tempdir");
    let handle = KubeSim::start(SimConfig {
        nodes,
        gpus_per_node: 8,
        time_scale: TimeScale::new(scale).expect("a valid scale"),
        kubeconfig: Some(dir.path().join("admin.kubeconfig")),
        tls: true,
        tokens: Some(Vec::new()),
        authorization: AuthorizationMode::Rbac,
        audit_log: Some(dir.path().join("audit.jsonl")),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let admin = client(&dir.path().join("admin.kubeconfig")).await;
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes");
    for file in [
        "00-namespace.yaml",
        "11-crd-trainingjob.yaml",
        "20-rbac.yaml",
    ] {
        let text = fs_err::read_to_string(manifests.join(file)).expect("manifest reads");
        for object in serde_saphyr::from_multiple::<Value>(&text).expect("manifest parses") {
            apply(&admin, object).await;
        }
    }
    Sim { handle, dir, admin }
}

/// Creates one object of any kind the simulator serves.
async fn apply(client: &kube::Client, object: Value) {
    let api_version = object["apiVersion"]
        .as_str()
        .expect("apiVersion")
        .to_owned();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let kind = object["kind"].as_str().expect("kind").to_owned();
    let gvk = GroupVersionKind::gvk(group, version, &kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", kind.to_lowercase()));
    let object: DynamicObject = serde_json::from_value(object).expect("an object");
    let api: Api<DynamicObject> = match &object.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    api.create(&kube::api::PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating {kind}: {e}"));
}

impl Sim {
    /// A client that authenticates as ServiceAccount `agentd-system/<account>`.
    async fn client_as(&self, account: &str) -> kube::Client {
        let token = self
            .handle
            .service_account_token("agentd-system", account)
            .expect("tokens are on");
        let path: PathBuf = self.dir.path().join(format!("{account}.kubeconfig"));
        self.handle
            .write_kubeconfig_for(&path, Some(&token.token))
            .expect("kubeconfig written");
        client(&path).await
    }

    async fn executor_as(
        &self,
        account: &str,
    ) -> (PodExecutor, mpsc::UnboundedReceiver<ReplicaReport>) {
        let client = self.client_as(account).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let executor = PodExecutor::new(
            client.clone(),
            &client,
            "cluster.local".into(),
            PodTimeouts {
                mount: WAIT_LIMIT,
                image_pull: WAIT_LIMIT,
            },
            tx,
        );
        tokio::time::timeout(PATIENCE, executor.ready())
            .await
            .expect("the pod watch lists the pods");
        (executor, rx)
    }

    /// The uid of TrainingJob `name` in namespace `default`.
    async fn training_job_uid(&self, name: &str) -> String {
        Api::<DynamicObject>::namespaced_with(
            self.admin.clone(),
            "default",
            &training_job_resource(),
        )
        .get(name)
        .await
        .expect("the TrainingJob exists")
        .metadata
        .uid
        .expect("a uid")
    }

    /// The requests served so far, as the audit log has them.
    fn audit(&self) -> Vec<Value> {
        fs_err::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn pods(&self, job: &str) -> Vec<Pod> {
        let api: Api<Pod> = Api::all(self.admin.clone());
        api.list(&ListParams::default().labels(&format!("{JOB_LABEL}={job}")))
            .await
            .expect("pods list")
            .items
    }
}

fn annotations(pairs: &[(&str, &str)]) -> Value {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A TFJob of one PS (declaring `tfjob-port` 3333) and two GPU workers; `annotations` go on
/// both templates (the simulated kubelets read them).
fn tf_job(name: &str, annotations: &Value) -> TrainingJob {
    job::parse(tf_job_manifest(name, annotations).as_bytes()).expect("the manifest is valid")
}

/// The manifest of [`tf_job`].
fn tf_job_manifest(name: &str, annotations: &Value) -> String {
    let template = |port: &str| {
        json!({
            "metadata": {"labels": {"app": "mnist"}, "annotations": annotations},
            "spec": {
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{
                    "name": "tensorflow",
                    "image": "tensorflow/tensorflow:2.16.1",
                    "command": ["python", "/train.py"],
                    "env": [{"name": "MODEL_DIR", "value": "/models"}, {"name": "TF_CONFIG", "value": "stale"},
                            {"name": "OUT", "value": "$(MODEL_DIR)/out"},
                            {"name": "WANDB_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key", "optional": true}}}],
                    "ports": if port.is_empty() { json!([]) } else { json!([{"name": "tfjob-port", "containerPort": 3333}]) },
                }],
            },
        })
    };
    let manifest = json!({
        "apiVersion": "kubeflow.org/v1",
        "kind": "TFJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"tfReplicaSpecs": {
            "PS": {"replicas": 1, "template": template("3333")},
            "Worker": {"replicas": 2, "template": template("")},
        }},
    });
    manifest.to_string()
}

/// The launch of every replica of `job`, one per node (`node-0`, `node-1`, ...), each worker
/// with 2 GPUs, with the environment the lifecycle gives it (`TF_CONFIG` from the executor's
/// addresses).
fn launches(executor: &PodExecutor, job: &TrainingJob, generation: u32) -> Vec<LaunchSpec> {
    let hosts = executor.addresses(job).expect("addresses");
    let mut record = crate::core::JobRecord::new(
        job.clone(),
        String::new(),
        crate::core::Now {
            wall: 0.0,
            mono: 0.0,
        },
    );
    record.status.generation = generation;
    let mut envs: BTreeMap<String, BTreeMap<String, String>> = record
        .launch_specs(
            Path::new("/"),
            &agentd_api::NodeInventory::default(),
            &hosts,
        )
        .expect("launch specs")
        .into_iter()
        .map(|spec| (spec.replica, spec.env))
        .collect();
    job::replica_names(job)
        .into_iter()
        .enumerate()
        .map(|(n, (t, index))| {
            let mut env = envs
                .remove(&job::replica_name(t, index))
                .expect("the replica's environment");
            env.insert(CUDA_VISIBLE_DEVICES.to_owned(), "0,1".to_owned());
            let gpus = if t == ReplicaType::Worker { 2 } else { 0 };
            LaunchSpec {
                job: job.name.clone(),
                replica: job::replica_name(t, index),
                generation,
                argv: Vec::new(),
                env,
                working_dir: None,
                log_path: PathBuf::new(),
                gpu_devices: Vec::new(),
                cpu_milli: 0,
                memory_bytes: 0,
                user: None,
                pod: Some(Box::new(PodLaunch {
                    node: format!("node-{n}"),
                    namespace: "default".to_owned(),
                    replica_type: t,
                    index,
                    gpus,
                    template: (*job.spec.replica_specs[&t].template).clone(),
                })),
            }
        })
        .collect()
}

async fn next_report(rx: &mut mpsc::UnboundedReceiver<ReplicaReport>) -> ReplicaReport {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("a report comes")
        .expect("the executor exists")
}

/// Reports until every replica in `replicas` has ended; each replica's events in order.
async fn reports_until_ended(
    rx: &mut mpsc::UnboundedReceiver<ReplicaReport>,
    replicas: &[&str],
) -> BTreeMap<String, Vec<ReplicaEvent>> {
    let mut seen: BTreeMap<String, Vec<ReplicaEvent>> = BTreeMap::new();
    let ended = |events: &Vec<ReplicaEvent>| {
        events.iter().any(|e| {
            !matches!(
                e,
                ReplicaEvent::Started { .. } | ReplicaEvent::Waiting { .. }
            )
        })
    };
    while !replicas.iter().all(|r| seen.get(*r).is_some_and(&ended)) {
        let report = next_report(rx).await;
        seen.entry(report.replica).or_default().push(report.event);
    }
    seen
}

fn exited(events: &[ReplicaEvent]) -> Vec<Option<ExitOutcome>> {
    events
        .iter()
        .map(|e| match e {
            ReplicaEvent::Started { .. } => None,
            ReplicaEvent::Exited { outcome } => Some(*outcome),
            ReplicaEvent::StartFailed { message, .. } => panic!("start failed: {message}"),
            ReplicaEvent::Ended(end) => panic!("ended by the platform: {end:?}"),
            ReplicaEvent::Waiting { message } => panic!("waited: {message}"),
        })
        .collect()
}

fn env_of(pod: &Pod) -> BTreeMap<String, String> {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_runs_as_pods_on_its_nodes_behind_a_headless_service() {
    let sim = start_sim(3).await;
    apply(
        &sim.admin,
        json!({"apiVersion": "agentd.io/v1alpha1", "kind": "TrainingJob",
               "metadata": {"name": "mnist", "namespace": "default"}, "spec": {}}),
    )
    .await;
    let owner_uid = sim.training_job_uid("mnist").await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job(
        "mnist",
        &annotations(&[(RUN_SECONDS, "3"), ("team", "vision")]),
    );
    for spec in launches(&executor, &job, 1) {
        executor.start(spec);
    }
    let reports = reports_until_ended(&mut rx, &["ps-0", "worker-0", "worker-1"]).await;
    for (replica, events) in &reports {
        assert_eq!(
            exited(events),
            [None, Some(ExitOutcome::exited(0))],
            "{replica}: started, then exited 0"
        );
        assert!(matches!(events[0], ReplicaEvent::Started { pid: 1 }));
    }

    let mut pods = sim.pods("mnist").await;
    pods.sort_by_key(|p| p.metadata.name.clone());
    let names: Vec<_> = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        ["mnist-ps-0-g1", "mnist-worker-0-g1", "mnist-worker-1-g1"]
    );
    let ps_host = "mnist-ps-0.mnist.default.svc.cluster.local:3333";
    let worker_host = |i: u32| format!("mnist-worker-{i}.mnist.default.svc.cluster.local:2222");
    for (n, (pod, (t, index))) in pods
        .iter()
        .zip([("ps", 0), ("worker", 0), ("worker", 1)])
        .enumerate()
    {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.node_name.as_deref(),
            Some(format!("node-{n}").as_str())
        );
        assert_eq!(
            spec.hostname.as_deref(),
            Some(format!("mnist-{t}-{index}").as_str())
        );
        assert_eq!(spec.subdomain.as_deref(), Some("mnist"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            spec.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("gpu")
        );
        let labels = pod.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[JOB_LABEL], "mnist");
        assert_eq!(labels[REPLICA_TYPE_LABEL], t);
        assert_eq!(labels[REPLICA_INDEX_LABEL], index.to_string());
        assert_eq!(labels[GENERATION_LABEL], "1");
        assert_eq!(labels["app"], "mnist", "the template's labels are kept");
        assert_eq!(pod.metadata.annotations.as_ref().unwrap()["team"], "vision");
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("TrainingJob", owner_uid.as_str())
        );

        let container = &spec.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("tensorflow/tensorflow:2.16.1")
        );
        let env = env_of(pod);
        assert_eq!(env["MODEL_DIR"], "/models");
        assert_eq!(env["OUT"], "$(MODEL_DIR)/out", "the cluster expands it");
        let secret = container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "WANDB_KEY")
            .expect("the template's variable");
        assert_eq!(
            (secret.value.as_deref(), secret.value_from.is_some()),
            (None, true),
            "the cluster resolves it"
        );
        assert_eq!(env["AGENTD_JOB"], "mnist");
        assert!(
            !env.contains_key(CUDA_VISIBLE_DEVICES),
            "the device plugin owns GPUs"
        );
        let tf_config: Value = serde_json::from_str(&env["TF_CONFIG"]).unwrap();
        assert_eq!(
            tf_config,
            json!({"cluster": {"ps": [ps_host], "worker": [worker_host(0), worker_host(1)]},
                   "task": {"type": t, "index": index}, "environment": "cloud"})
        );
        let ports: Vec<_> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.container_port))
            .collect();
        let port = if t == "ps" { 3333 } else { 2222 };
        assert_eq!(ports, [(TFJOB_PORT_NAME.to_owned(), port)]);
        let gpus = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(GPU_RESOURCE));
        if t == "worker" {
            assert_eq!(gpus, Some(&Quantity("2".into())));
        } else {
            assert_eq!(gpus, None);
        }
    }

    let service = Api::<Service>::namespaced(sim.admin.clone(), "default")
        .get("mnist")
        .await
        .expect("the job's Service exists");
    let spec = service.spec.unwrap();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(spec.selector.unwrap()[JOB_LABEL], "mnist");
    assert_eq!(service.metadata.owner_references.unwrap()[0].uid, owner_uid);
    sim.handle.shutdown();
}

/// With the job store's knowledge of the objects, the pods' owner reference names the uid of
/// the object the store wrote, and the executor reads no TrainingJob to learn it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pods_owner_is_the_object_the_job_store_wrote_with_no_read_of_it() {
    let sim = start_sim(3).await;
    let local = crate::store::Store::open(&sim.dir.path().join("state")).expect("a database");
    let mut store = crate::store::kube::KubeStore::new(
        sim.client_as("agentd-leader").await,
        tokio::runtime::Handle::current(),
        local,
    )
    .expect("a store");
    let known = store.known_objects();
    let manifest = tf_job_manifest("mnist", &annotations(&[(RUN_SECONDS, "1")]));
    let write = crate::store::JobWrite::Upsert {
        name: "mnist".to_owned(),
        manifest: manifest.clone(),
        status: "{}".to_owned(),
        time: 1.0,
        finished: None,
        expires: None,
    };
    // As the core calls it: from a thread of its own, blocking.
    tokio::task::spawn_blocking(move || {
        crate::store::JobStore::write_batch(&mut store, &[write], &[])
    })
    .await
    .expect("the write ran")
    .expect("the object is made");
    let object_uid = sim.training_job_uid("mnist").await;
    assert_eq!(
        known.uid("default", "mnist").as_deref(),
        Some(object_uid.as_str())
    );
    assert_eq!(known.uid("other", "mnist"), None, "another namespace's job");

    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let executor = executor.with_owners(Arc::new(move |namespace, job| known.uid(namespace, job)));
    let job = job::parse(manifest.as_bytes()).expect("valid");
    for spec in launches(&executor, &job, 1) {
        executor.start(spec);
    }
    reports_until_ended(&mut rx, &["ps-0", "worker-0", "worker-1"]).await;
    for pod in sim.pods("mnist").await {
        let owner = &pod.metadata.owner_references.as_ref().expect("an owner")[0];
        assert_eq!(owner.uid, object_uid, "{:?}", pod.metadata.name);
    }
    let reads: Vec<Value> = sim
        .audit()
        .into_iter()
        .filter(|r| {
            r["resource"] == "trainingjobs"
                && r["verb"] == "get"
                && r["user"] == "system:serviceaccount:agentd-system:agentd-leader"
        })
        .collect();
    assert!(reads.is_empty(), "the object was read: {reads:?}");
    sim.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_ends_become_the_outcomes_a_local_process_gives() {
    let sim = start_sim(1).await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job("ends", &json!({}));
    let cases = [
        (annotations(&[(RUN_SECONDS, "1")]), ExitOutcome::exited(0)),
        (
            annotations(&[(RUN_SECONDS, "1"), (EXIT_CODE, "3")]),
            ExitOutcome::exited(3),
        ),
        (annotations(&[(FAIL, "OOMKilled")]), ExitOutcome::oom()),
        (
            annotations(&[(RUN_SECONDS, "1"), (EXIT_CODE, "143")]),
            ExitOutcome::signalled(15),
        ),
    ];
    let template = launches(&executor, &job, 1).remove(1);
    let mut replicas = Vec::new();
    for (index, (annotations, _)) in cases.iter().enumerate() {
        let mut spec = template.clone();
        let index = u32::try_from(index).unwrap();
        spec.replica = job::replica_name(ReplicaType::Worker, index);
        let pod = spec.pod.as_mut().unwrap();
        pod.node = "node-0".into();
        pod.index = index;
        pod.gpus = 0;
        let meta = pod.template.metadata.get_or_insert_default();
        meta.annotations = Some(serde_json::from_value(annotations.clone()).unwrap());
        replicas.push(spec.replica.clone());
        executor.start(spec);
    }
    let names: Vec<&str> = replicas.iter().map(String::as_str).collect();
    let reports = reports_until_ended(&mut rx, &names).await;
    for (replica, (annotations, outcome)) in replicas.iter().zip(&cases) {
        assert_eq!(
            exited(&reports[replica]),
            [None, Some(*outcome)],
            "{replica} ({annotations})"
        );
    }
    sim.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_when_the_generations_pods_are_gone() {
    let sim = start_sim(3).await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    // No run time: the containers run until their pods are deleted.
    let job = tf_job("serve", &json!({}));
    for spec in launches(&executor, &job, 1) {
        executor.start(spec);
    }
    for _ in 0..3 {
        let report = next_report(&mut rx).await;
        assert!(
            matches!(report.event, ReplicaEvent::Started { pid: 1 }),
            "{report:?}"
        );
    }
    assert_eq!(sim.pods("serve").await.len(), 3);
    tokio::time::timeout(
        PATIENCE,
        executor.stop("serve", 1, vec![1, 1, 1], Duration::from_secs(30), false),
    )
    .await
    .expect("the stop ends");
    assert!(
        sim.pods("serve").await.is_empty(),
        "the stop ended before its pods were gone"
    );
    let ends = reports_until_ended(&mut rx, &["ps-0", "worker-0", "worker-1"]).await;
    for (replica, events) in &ends {
        assert_eq!(exited(events), [Some(ExitOutcome::default())], "{replica}");
    }

    sim.handle.shutdown();
}

/// The stop of a job that ended keeps the pods that ended (and their logs), unless its
/// cleanPodPolicy is All; a restart's stop takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_after_the_job_ended_keeps_the_pods_that_ended() {
    let sim = start_sim(3).await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job("done", &json!({"sim.agentd.io/run-seconds": "1"}));
    for spec in launches(&executor, &job, 1) {
        executor.start(spec);
    }
    reports_until_ended(&mut rx, &["ps-0", "worker-0", "worker-1"]).await;
    tokio::time::timeout(
        PATIENCE,
        executor.stop("done", 1, Vec::new(), Duration::from_secs(30), true),
    )
    .await
    .expect("the stop ends");
    assert_eq!(sim.pods("done").await.len(), 3, "the ended pods are kept");
    tokio::time::timeout(
        PATIENCE,
        executor.stop("done", 1, Vec::new(), Duration::from_secs(30), false),
    )
    .await
    .expect("the stop ends");
    assert!(sim.pods("done").await.is_empty());
    sim.handle.shutdown();
}

/// A stop does not wait for the kubelet of a lost node: the pod there is deleted at once, the
/// others with the stop's grace (longer than any test waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_does_not_wait_for_the_kubelet_of_a_lost_node() {
    let sim = start_sim(3).await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job("cut", &json!({}));
    for spec in launches(&executor, &job, 1) {
        executor.start(spec);
    }
    for _ in 0..3 {
        let report = next_report(&mut rx).await;
        assert!(
            matches!(report.event, ReplicaEvent::Started { pid: 1 }),
            "{report:?}"
        );
    }
    assert!(sim.handle.stop_node("node-1"), "a simulated node");
    executor.nodes_lost(&BTreeSet::from(["node-1".to_owned()]));
    tokio::time::timeout(
        PATIENCE,
        executor.stop("cut", 1, vec![1, 1, 1], Duration::from_hours(1), false),
    )
    .await
    .expect("the stop ends without the lost node's kubelet");
    assert!(sim.pods("cut").await.is_empty());
    sim.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_deleted_under_a_running_replica_is_a_failure_to_retry() {
    let sim = start_sim(3).await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job("lost", &json!({}));
    for spec in launches(&executor, &job, 1) {
        executor.start(spec);
    }
    for _ in 0..3 {
        next_report(&mut rx).await;
    }
    Api::<Pod>::namespaced(sim.admin.clone(), "default")
        .delete("lost-worker-1-g1", &DeleteParams::default())
        .await
        .expect("the pod is deleted");
    let report = next_report(&mut rx).await;
    assert_eq!(report.replica, "worker-1");
    let ReplicaEvent::Exited { outcome } = report.event else {
        panic!("expected an exit, got {report:?}");
    };
    assert_eq!(
        restart_decision(RestartPolicy::OnFailure, outcome),
        RestartDecision::Restart
    );

    // Another agent adopts the generation's pods that still run, and only those.
    let (adopter, mut adopted_rx) = sim.executor_as("agentd-leader").await;
    let stored = |name: &str| StoredReplica {
        name: name.to_owned(),
        pid: Some(1),
    };
    assert_eq!(
        adopter.adopt("lost", 1, &[stored("ps-0"), stored("worker-0")]),
        Ok(2)
    );
    let refused = adopter
        .adopt("lost", 1, &[stored("ps-0"), stored("worker-1")])
        .unwrap_err();
    assert!(refused.contains("worker-1"), "{refused}");
    assert!(adopter.adopt("lost", 2, &[stored("ps-0")]).is_err());
    drop(executor);
    Api::<Pod>::namespaced(sim.admin.clone(), "default")
        .delete("lost-ps-0-g1", &DeleteParams::default())
        .await
        .expect("the pod is deleted");
    let report = next_report(&mut adopted_rx).await;
    assert_eq!(report.replica, "ps-0");
    assert!(
        matches!(report.event, ReplicaEvent::Exited { .. }),
        "{report:?}"
    );

    // What is not kept is deleted.
    adopter.discard_all_but(&BTreeSet::new());
    let remaining = async {
        while !sim.pods("lost").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, remaining)
        .await
        .expect("every pod of a job not kept is deleted");
    sim.handle.shutdown();
}

/// A gang whose pods ended while no leader followed them (the leader was killed, the next
/// one not yet elected) is adopted all the same: each replica's end is reported as its pod
/// tells it, and nothing is started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_ended_while_nobody_followed_them_are_adopted_with_their_ends() {
    let sim = start_sim(3).await;
    let job = tf_job(
        "done",
        &annotations(&[(RUN_SECONDS, "1"), (EXIT_CODE, "3")]),
    );
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    for spec in launches(&executor, &job, 1) {
        executor.start(spec);
    }
    reports_until_ended(&mut rx, &["ps-0", "worker-0", "worker-1"]).await;
    drop(executor);
    let ended = async {
        while !sim
            .pods("done")
            .await
            .iter()
            .all(|p| phase(&watched(p)) == Some("Failed"))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, ended)
        .await
        .expect("the pods end");

    let (adopter, mut adopted_rx) = sim.executor_as("agentd-leader").await;
    let stored = |name: &str| StoredReplica {
        name: name.to_owned(),
        pid: Some(1),
    };
    let running = [stored("ps-0"), stored("worker-0"), stored("worker-1")];
    assert_eq!(adopter.adopt("done", 1, &running), Ok(3));
    let reports = reports_until_ended(&mut adopted_rx, &["ps-0", "worker-0", "worker-1"]).await;
    for (replica, events) in &reports {
        assert_eq!(
            exited(events),
            [Some(ExitOutcome::exited(3))],
            "{replica}: its end, and no second start"
        );
    }
    assert_eq!(sim.pods("done").await.len(), 3, "no pod made again");
    sim.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_the_role_refuses_is_a_permanent_start_failure() {
    let sim = start_sim(1).await;
    // A role with everything the executor does but creating pods.
    apply(
        &sim.admin,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "no-pods"},
               "rules": [
                   {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
                   {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
                   {"apiGroups": ["agentd.io"], "resources": ["trainingjobs"], "verbs": ["get"]}]}),
    )
    .await;
    apply(
        &sim.admin,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "no-pods"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "no-pods"},
               "subjects": [{"kind": "ServiceAccount", "name": "no-pods", "namespace": "agentd-system"}]}),
    )
    .await;
    let (executor, mut rx) = sim.executor_as("no-pods").await;
    let job = tf_job("denied", &json!({}));
    executor.start(launches(&executor, &job, 1).remove(0));
    let report = next_report(&mut rx).await;
    let ReplicaEvent::StartFailed { message, transient } = report.event else {
        panic!("expected a start failure, got {report:?}");
    };
    assert!(!transient, "a refusal does not go away by itself");
    assert!(
        message.contains("cannot create pod denied-ps-0-g1"),
        "{message}"
    );
    assert!(
        message.contains("forbidden") && message.contains("403"),
        "{message}"
    );

    // A server that fails for a while is a transient failure.
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    sim.handle
        .set_fault(kube_sim::fault::FaultSpec::new(503, None).expect("a fault kube-sim can give"));
    executor.start(launches(&executor, &job, 2).remove(0));
    let report = next_report(&mut rx).await;
    sim.handle.clear_fault();
    let ReplicaEvent::StartFailed { message, transient } = report.event else {
        panic!("expected a start failure, got {report:?}");
    };
    assert!(transient, "{message}");
    sim.handle.shutdown();
}

#[test]
fn a_template_with_no_training_container_is_refused_by_name() {
    let job = tf_job("two", &json!({}));
    let (tx, _rx) = mpsc::unbounded_channel::<ReplicaReport>();
    drop(tx);
    let mut launch = PodLaunch {
        node: "node-0".into(),
        namespace: "default".into(),
        replica_type: ReplicaType::Worker,
        index: 0,
        gpus: 1,
        template: (*job.spec.replica_specs[&ReplicaType::Worker].template).clone(),
    };
    let containers = &mut launch.template.spec.as_mut().unwrap().containers;
    containers[0].name = "main".into();
    containers.push(containers[0].clone());
    containers[1].name = "sidecar".into();
    let spec = LaunchSpec {
        job: "two".into(),
        replica: "worker-0".into(),
        generation: 1,
        argv: Vec::new(),
        env: BTreeMap::new(),
        working_dir: None,
        log_path: PathBuf::new(),
        gpu_devices: Vec::new(),
        cpu_milli: 0,
        memory_bytes: 0,
        user: None,
        pod: None,
    };
    let err = replica_pod(&spec, &launch, None).unwrap_err();
    assert!(err.contains("no container named tensorflow"), "{err}");
    // With one named tensorflow it is that one, whatever its place.
    launch.template.spec.as_mut().unwrap().containers[1].name = TRAINING_CONTAINER.into();
    let pod = replica_pod(&spec, &launch, None).unwrap();
    let containers = pod.spec.unwrap().containers;
    assert!(containers[0].ports.as_ref().is_none_or(Vec::is_empty));
    assert_eq!(
        containers[1].ports.as_ref().unwrap()[0].container_port,
        2222
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_whose_pod_exists_follows_that_pod() {
    let sim = start_sim(1).await;
    let (first, mut first_rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job(
        "again",
        &annotations(&[(RUN_SECONDS, "1"), (EXIT_CODE, "7")]),
    );
    let mut spec = launches(&first, &job, 1).remove(0);
    first.start(spec.clone());
    let ends = reports_until_ended(&mut first_rx, &["ps-0"]).await;
    assert_eq!(exited(&ends["ps-0"]), [None, Some(ExitOutcome::exited(7))]);
    drop(first);

    // The same launch again (its first answer lost): the pod that ended is reported as it is.
    let (second, mut rx) = sim.executor_as("agentd-leader").await;
    spec.pod.as_mut().unwrap().template.metadata = None;
    second.start(spec);
    let ends = reports_until_ended(&mut rx, &["ps-0"]).await;
    assert_eq!(exited(&ends["ps-0"]), [None, Some(ExitOutcome::exited(7))]);
    assert_eq!(sim.pods("again").await.len(), 1);
    sim.handle.shutdown();
}

/// Each failure of the platform's is reported as its class, with what Kubernetes said: an
/// eviction after the replica ran, a refusal at admission, and an image, volumes and a Secret
/// that never come, once the pod has waited past its limit; volumes whose kubelet warns through
/// `events.k8s.io/v1` (two writes, then silence while the failures go on) as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_platform_does_to_a_pod_is_classified_in_its_own_words() {
    let sim = start_sim(1).await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job("plat", &json!({}));
    let mount_failed = "its volumes did not mount in 2s (cluster.mount_timeout): FailedMount: MountVolume.SetUp failed for volume \"data\"";
    let series = Some((EVENT_API, "events.k8s.io/v1"));
    let cases = [
        (
            "Evicted",
            None,
            PlatformFailure::Evicted,
            true,
            "failed: Evicted",
        ),
        (
            "UnexpectedAdmissionError",
            None,
            PlatformFailure::NodeRefused,
            false,
            "failed: UnexpectedAdmissionError",
        ),
        (
            "ImagePullBackOff",
            None,
            PlatformFailure::ImagePullFailed,
            false,
            "its image was not pulled in 2s (cluster.image_pull_timeout): image \"tensorflow/tensorflow:2.16.1\"",
        ),
        (
            "FailedMount",
            None,
            PlatformFailure::VolumeMountFailed,
            false,
            mount_failed,
        ),
        (
            "FailedMount",
            series,
            PlatformFailure::VolumeMountFailed,
            false,
            mount_failed,
        ),
        // No failure asked of the simulator: the container's environment names a Secret that
        // does not exist.
        (
            "",
            None,
            PlatformFailure::ContainerConfigFailed,
            false,
            "its container could not be made from its Secrets and ConfigMaps in 2s (cluster.mount_timeout): CreateContainerConfigError: secret \"absent\" not found",
        ),
    ];
    let template = launches(&executor, &job, 1).remove(1);
    let mut replicas = Vec::new();
    for (index, (fail, form, ..)) in cases.iter().enumerate() {
        let mut spec = template.clone();
        let index = u32::try_from(index).unwrap();
        spec.replica = job::replica_name(ReplicaType::Worker, index);
        let pod = spec.pod.as_mut().unwrap();
        pod.node = "node-0".into();
        pod.index = index;
        pod.gpus = 0;
        let meta = pod.template.metadata.get_or_insert_default();
        let mut said = vec![(FAIL, *fail)];
        said.extend(*form);
        said.retain(|(_, v)| !v.is_empty());
        meta.annotations = Some(serde_json::from_value(annotations(&said)).unwrap());
        if fail.is_empty() {
            let container = &mut pod.template.spec.as_mut().unwrap().containers[0];
            container.env.get_or_insert_default().push(serde_json::from_value(
                json!({"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}),
            ).unwrap());
        }
        replicas.push(spec.replica.clone());
        executor.start(spec);
    }
    let names: Vec<&str> = replicas.iter().map(String::as_str).collect();
    let reports = reports_until_ended(&mut rx, &names).await;
    for (replica, (fail, _, failure, ran, words)) in replicas.iter().zip(&cases) {
        let events = &reports[replica];
        let Some(ReplicaEvent::Ended(end)) = events.last() else {
            panic!("{fail}: expected an end of the platform's, got {events:?}");
        };
        assert_eq!((end.failure, end.ran), (*failure, *ran), "{fail}: {end:?}");
        let started = events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::Started { .. }));
        assert_eq!(started, *ran, "{fail}: started only if it ran: {events:?}");
        let pod = format!(
            "pod default/plat-worker-{}-g1",
            replicas.iter().position(|r| r == replica).unwrap()
        );
        assert!(end.message.contains(&pod), "{fail}: {}", end.message);
        assert!(end.message.contains(words), "{fail}: {}", end.message);
        // A wait that may never come is said while it lasts, before it ends the replica (again
        // when it resumes: a mount wait pauses while the kubelet's back-off outlasts its window).
        let waits: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                ReplicaEvent::Waiting { message } => Some(message.as_str()),
                _ => None,
            })
            .collect();
        if end.failure.fails_job() {
            assert!(!waits.is_empty(), "{fail}: {events:?}");
            for wait in waits {
                assert!(
                    wait.starts_with(&pod) && wait.contains("; the job fails if this lasts 2s"),
                    "{fail}: {wait}"
                );
            }
        } else {
            assert!(waits.is_empty(), "{fail}: {events:?}");
        }
    }
    sim.handle.shutdown();
}

/// A `FailedMount` warning about pod `name` with `uid`, as a kubelet records it.
async fn warn_failed_mount(sim: &Sim, name: &str, uid: &str) {
    use k8s_openapi::api::core::v1::{Event, ObjectReference};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let event = Event {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{name}.{uid}")),
            namespace: Some("default".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        reason: Some("FailedMount".into()),
        type_: Some("Warning".into()),
        message: Some(
            "MountVolume.SetUp failed for volume \"cfg\" : configmap \"cfg\" not found".into(),
        ),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::Event>::namespaced(sim.admin.clone(), "default")
        .create(&kube::api::PostParams::default(), &event)
        .await
        .expect("the event is recorded");
}

/// Only warnings seen lately count, and only for the pod they are about: a pod whose volumes
/// failed to mount once (then mounted) and that then waits longer than `cluster.mount_timeout`
/// for its image runs; so does a pod that shares its name with a deleted pod that had a
/// warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_or_stale_mount_warning_does_not_fail_a_pod_that_waits_for_its_image() {
    // Cluster time at a tenth of real time: each pod waits 3 s to start, then 10 s for its
    // image, past the 2 s mount limit.
    let sim = start_sim_scaled(2, 0.1).await;
    let (executor, mut rx) = sim.executor_as("agentd-leader").await;
    let job = tf_job("slow", &json!({}));
    let mut specs = launches(&executor, &job, 1);
    specs.truncate(2);
    for spec in specs {
        executor.start(spec);
    }
    let api: Api<Pod> = Api::namespaced(sim.admin.clone(), "default");
    let uid = |pod: Pod| pod.metadata.uid.expect("a uid");
    let transient = loop {
        if let Some(pod) = api.get_opt("slow-ps-0-g1").await.expect("pods read") {
            break uid(pod);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    warn_failed_mount(&sim, "slow-ps-0-g1", &transient).await;
    warn_failed_mount(&sim, "slow-worker-0-g1", "uid-of-a-deleted-pod").await;
    // The transient warning is said while it lasts; what counts is that the replica starts.
    let mut seen: BTreeMap<String, ReplicaEvent> = BTreeMap::new();
    while seen.len() < 2 {
        let report = next_report(&mut rx).await;
        if !matches!(report.event, ReplicaEvent::Waiting { .. }) {
            seen.entry(report.replica).or_insert(report.event);
        }
    }
    for (replica, first) in &seen {
        assert!(
            matches!(first, ReplicaEvent::Started { .. }),
            "{replica}: {first:?}"
        );
    }
    sim.handle.shutdown();
}

fn waiting(name: &str, image: &str, reason: &str) -> k8s_openapi::api::core::v1::ContainerStatus {
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus};
    ContainerStatus {
        name: name.into(),
        image: image.into(),
        state: Some(ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(format!("{reason} for {image}")),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An image that never comes holds the gang whichever container it is for: an init container,
/// a sidecar, as much as the training container.
#[test]
fn an_image_that_never_comes_is_seen_in_every_container_and_init_container() {
    use k8s_openapi::api::core::v1::PodStatus;
    let pod = |init: Vec<_>, app: Vec<_>| Pod {
        status: Some(PodStatus {
            init_container_statuses: Some(init),
            container_statuses: Some(app),
            ..PodStatus::default()
        }),
        ..Pod::default()
    };
    let creating = waiting(TRAINING_CONTAINER, "tf:2.16", "ContainerCreating");
    let cases = [
        (
            pod(
                vec![waiting("setup", "busybox:nope", "ErrImagePull")],
                vec![creating.clone()],
            ),
            "image \"busybox:nope\" (init container setup): ErrImagePull",
        ),
        (
            pod(
                Vec::new(),
                vec![
                    creating.clone(),
                    waiting("proxy", "envoy:nope", "ImagePullBackOff"),
                ],
            ),
            "image \"envoy:nope\" (container proxy): ImagePullBackOff",
        ),
        (
            pod(
                Vec::new(),
                vec![waiting(TRAINING_CONTAINER, "tf:nope", "InvalidImageName")],
            ),
            "image \"tf:nope\": InvalidImageName",
        ),
    ];
    for (pod, words) in cases {
        let (failure, message) =
            stuck::waiting_on(&watched(&pod), None).expect("a wait that never ends");
        assert_eq!(failure, PlatformFailure::ImagePullFailed, "{message}");
        assert!(message.starts_with(words), "{message}");
    }
    assert_eq!(
        stuck::waiting_on(&watched(&pod(Vec::new(), vec![creating])), None),
        None
    );
}

/// An image wait is timed from the pod's start as the API server recorded it, not from when
/// this leader first saw the pod: a new term does not give a pod that has waited for its image
/// a new full wait.
#[test]
fn an_image_wait_is_timed_from_the_pods_start_whoever_sees_it_first() {
    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    // Whole seconds, as the API server writes times.
    let wall = Timestamp::from_second(Timestamp::now().as_second()).unwrap();
    let now = tokio::time::Instant::now();
    let ago = |minutes: i64| Time(wall - SignedDuration::from_mins(minutes));
    let mut pod = Pod::default();
    pod.metadata.creation_timestamp = Some(ago(9));
    assert_eq!(
        stuck::started(&watched(&pod), wall, now),
        now - Duration::from_mins(9)
    );
    pod.status = Some(PodStatus {
        start_time: Some(ago(7)),
        ..PodStatus::default()
    });
    assert_eq!(
        stuck::started(&watched(&pod), wall, now),
        now - Duration::from_mins(7)
    );
    let timeouts = PodTimeouts {
        image_pull: Duration::from_mins(5),
        ..PodTimeouts::default()
    };
    let stuck = Stuck {
        failure: PlatformFailure::ImagePullFailed,
        since: stuck::started(&watched(&pod), wall, now),
        pod: "default/p".into(),
        uid: None,
        message: String::new(),
    };
    assert!(
        stuck.expired(&timeouts, now),
        "7 minutes of a 5-minute wait"
    );
    // A start in the future (clocks apart) counts as now; no start at all too.
    pod.status.as_mut().unwrap().start_time = Some(ago(-1));
    assert_eq!(stuck::started(&watched(&pod), wall, now), now);
    assert_eq!(stuck::started(&WatchedPod::default(), wall, now), now);
}

/// A `FailedMount` warning about pod `pod-<uid>`, without its times and counts.
fn mount_event(uid: &str) -> k8s_openapi::api::core::v1::Event {
    k8s_openapi::api::core::v1::Event {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("e-{uid}")),
            ..Default::default()
        },
        involved_object: k8s_openapi::api::core::v1::ObjectReference {
            kind: Some("Pod".into()),
            namespace: Some("default".into()),
            name: Some(format!("pod-{uid}")),
            uid: Some(uid.into()),
            ..Default::default()
        },
        message: Some("MountVolume.SetUp failed".into()),
        ..Default::default()
    }
}

/// Warnings are kept by pod uid and bounded: a pod agentd does not know loses its warnings a
/// while after the last; a known pod's stay; one seen again is not new.
#[test]
fn mount_warnings_of_unknown_pods_are_dropped_and_replays_are_not_new() {
    use k8s_openapi::api::core::v1::Event;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let at = k8s_openapi::jiff::Timestamp::now();
    let event = |uid: &str, count: i32| Event {
        first_timestamp: Some(Time(at)),
        last_timestamp: Some(Time(at)),
        count: Some(count),
        ..mount_event(uid)
    };
    let warning = |uid, count| stuck::MountWarning::of(&event(uid, count), at).expect("a pod's");
    let now = tokio::time::Instant::now();
    let window = Duration::from_mins(1);
    let mut warnings = stuck::MountWarnings::default();
    assert!(warnings.seen(warning("known", 1), now));
    assert!(warnings.seen(warning("unknown", 1), now));
    assert!(!warnings.seen(warning("known", 1), now), "a replay");
    let later = now + stuck::UNKNOWN_POD_KEPT + Duration::from_secs(1);
    warnings.prune(|uid| uid == "known", later);
    assert!(warnings.recent("unknown", now, window).is_none(), "dropped");
    assert!(warnings.recent("known", now, window).is_some(), "kept");
    assert!(
        warnings.recent("known", later, window).is_none(),
        "not lately"
    );
    assert!(warnings.seen(warning("known", 2), later), "a new warning");
    let (_, first) = warnings.recent("known", later, window).expect("lately");
    assert_eq!(first, now, "still timed from the first");

    // A flood of other pods' warnings is bounded in count and size: the pod warned longest ago
    // goes first.
    let mut flood = stuck::MountWarnings::default();
    let start = tokio::time::Instant::now();
    for i in 0..=stuck::MAX_PODS_WARNED {
        let mut w = warning("x", 1);
        w.uid = format!("pod-{i}");
        w.message = "m".repeat(4 * 1024);
        assert!(flood.seen(w, start + Duration::from_millis(i as u64)));
    }
    let late = start + Duration::from_secs(30);
    assert!(
        flood.recent("pod-0", late, window).is_none(),
        "the oldest went"
    );
    let (message, _) = flood.recent("pod-1", late, window).expect("kept");
    assert!(message.len() <= 1024 + '…'.len_utf8(), "{}", message.len());
    let last = format!("pod-{}", stuck::MAX_PODS_WARNED);
    assert!(flood.recent(&last, late, window).is_some());
}

/// A warning of an `events.k8s.io/v1` series that went on when written counts until the series
/// was due to be written again; one written when the series had ended does not; and a pod whose
/// sandbox is ready waits for no volume whatever was said.
#[test]
fn a_mount_warning_series_counts_until_it_is_due_again_and_a_ready_sandbox_ends_it() {
    use k8s_openapi::api::core::v1::{Event, EventSeries, PodCondition};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let at = k8s_openapi::jiff::Timestamp::now();
    let minutes = |m: i64| at - k8s_openapi::jiff::SignedDuration::from_mins(m);
    // As the API server shows an `events.k8s.io/v1` series in core/v1: no count, no
    // first or last timestamp.
    let series = |uid: &str, first: i64, last: i64, count: i32| Event {
        event_time: Some(MicroTime(minutes(first))),
        series: Some(EventSeries {
            count: Some(count),
            last_observed_time: Some(MicroTime(minutes(last))),
        }),
        ..mount_event(uid)
    };
    let warning = |e: &Event| stuck::MountWarning::of(e, at).expect("a pod's");
    let now = tokio::time::Instant::now();
    let window = Duration::from_mins(1);
    let mut warnings = stuck::MountWarnings::default();
    assert!(warnings.seen(warning(&series("on", 0, 0, 2)), now));
    let (_, first) = warnings.recent("on", now, window).expect("now");
    assert_eq!(first, now);
    let quiet = now + Duration::from_mins(20);
    assert!(
        warnings.recent("on", quiet, window).is_some(),
        "twenty quiet minutes do not end a series"
    );
    let due = now + stuck::SERIES_REFRESH + stuck::SERIES_FINISH + Duration::from_secs(1);
    assert!(
        warnings.recent("on", due, window).is_none(),
        "a series not written again when due has ended"
    );
    // The write that ends a series: its last failure seven minutes before.
    assert!(warnings.seen(warning(&series("ended", 9, 7, 5)), now));
    assert!(warnings.recent("ended", now, window).is_none());
    // A series that ends after going on is no longer counted from its earlier write.
    let later = now + Duration::from_mins(8);
    assert!(warnings.seen(warning(&series("on", 0, 7, 9)), later));
    assert!(warnings.recent("on", later, window).is_none());

    let mut pod = Pod::default();
    assert!(stuck::waiting_on(&watched(&pod), Some("MountVolume.SetUp failed")).is_some());
    pod.status.get_or_insert_default().conditions = Some(vec![PodCondition {
        type_: "PodReadyToStartContainers".into(),
        status: "True".into(),
        ..Default::default()
    }]);
    assert!(stuck::volumes_mounted(&watched(&pod)));
    assert_eq!(
        stuck::waiting_on(&watched(&pod), Some("MountVolume.SetUp failed")),
        None
    );
}

#[tokio::test]
async fn a_request_is_sent_again_while_it_fails_for_a_reason_of_the_moment() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let tries = AtomicU32::new(0);
    // A broken connection, then a 503, then the answer.
    let answer = again_while_transient(|| async {
        match tries.fetch_add(1, Ordering::SeqCst) {
            0 => Err(kube::Error::Service("connection error: timed out".into())),
            1 => Err(kube::Error::Api(Box::new(
                kube::core::Status::failure("overloaded", "ServiceUnavailable").with_code(503),
            ))),
            _ => Ok("made"),
        }
    })
    .await;
    assert_eq!(answer.unwrap(), "made");
    assert_eq!(tries.load(Ordering::SeqCst), 3);

    // An answer that says no is final at once.
    tries.store(0, Ordering::SeqCst);
    let answer: Result<(), _> = again_while_transient(|| async {
        tries.fetch_add(1, Ordering::SeqCst);
        Err(kube::Error::Api(Box::new(
            kube::core::Status::failure("exists", "AlreadyExists").with_code(409),
        )))
    })
    .await;
    assert!(answer.is_err());
    assert_eq!(tries.load(Ordering::SeqCst), 1);

    // A failure that lasts ends the tries after SEND_ATTEMPTS.
    tries.store(0, Ordering::SeqCst);
    let answer: Result<(), _> = again_while_transient(|| async {
        tries.fetch_add(1, Ordering::SeqCst);
        Err(kube::Error::Service("connection refused".into()))
    })
    .await;
    assert!(answer.is_err());
    assert_eq!(tries.load(Ordering::SeqCst), SEND_ATTEMPTS);
}
