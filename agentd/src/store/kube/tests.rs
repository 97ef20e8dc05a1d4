//! The store against an in-process kube-sim with HTTPS, tokens and RBAC on, the packaged CRDs
//! and roles applied, and the store acting as the leader's ServiceAccount with only its roles.

use std::path::{Path, PathBuf};

use agentd_api::jobs::{JobState, JobStatus, Owner, ReplicaState, ReplicaStatus};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use serde_json::{Value, json};

use super::*;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/kubernetes")
}

/// A running kube-sim with agentd's CRDs and roles, and clients for an admin, the leader and a
/// node agent (each ServiceAccount with only its roles).
pub(crate) struct Cluster {
    // Declared first so it stops before the runtime its tasks run on.
    _sim: kube_sim::SimHandle,
    pub(crate) admin: kube::Client,
    pub(crate) leader: kube::Client,
    pub(crate) node: kube::Client,
    dir: tempfile::TempDir,
    pub(crate) rt: tokio::runtime::Runtime,
}

async fn client_from(path: &Path) -> kube::Client {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

/// Creates every object of the packaged manifests, as `kubectl apply -f packaging/kubernetes`.
async fn apply_packaging(client: &kube::Client) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(packaging())
        .expect("packaging/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
        for doc in docs.into_iter().filter(Value::is_object) {
            let (group, version) = match doc["apiVersion"].as_str().expect("apiVersion") {
                v if v.contains('/') => v.split_once('/').expect("group/version"),
                v => ("", v),
            };
            let gvk = GroupVersionKind::gvk(group, version, doc["kind"].as_str().expect("kind"));
            let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
                .await
                .unwrap_or_else(|e| panic!("{gvk:?} in {}: {e}", file.display()));
            let api: Api<DynamicObject> = match caps.scope {
                Scope::Namespaced => Api::namespaced_with(
                    client.clone(),
                    doc["metadata"]["namespace"].as_str().unwrap_or("default"),
                    &resource,
                ),
                Scope::Cluster => Api::all_with(client.clone(), &resource),
            };
            let object: DynamicObject = serde_json::from_value(doc).expect("object");
            api.create(&PostParams::default(), &object)
                .await
                .unwrap_or_else(|e| panic!("creating {object:?}: {e}"));
        }
    }
}

impl Cluster {
    pub(crate) fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let (sim, admin, leader, node) = rt.block_on(async {
            let sim = kube_sim::KubeSim::start(kube_sim::SimConfig {
                kubeconfig: Some(dir.path().join("admin.kubeconfig")),
                tls: true,
                tokens: Some(Vec::new()),
                authorization: kube_sim::AuthorizationMode::Rbac,
                ..kube_sim::SimConfig::default()
            })
            .await
            .expect("kube-sim starts");
            let admin = client_from(&dir.path().join("admin.kubeconfig")).await;
            apply_packaging(&admin).await;
            let token = sim
                .service_account_token("agentd-system", "agentd-leader")
                .expect("tokens are on");
            let path = dir.path().join("leader.kubeconfig");
            sim.write_kubeconfig_for(&path, Some(&token.token))
                .expect("kubeconfig");
            let leader = client_from(&path).await;
            let token = sim
                .service_account_token("agentd-system", "agentd-node")
                .expect("tokens are on");
            let path = dir.path().join("node.kubeconfig");
            sim.write_kubeconfig_for(&path, Some(&token.token))
                .expect("kubeconfig");
            let node = client_from(&path).await;
            (sim, admin, leader, node)
        });
        Self {
            _sim: sim,
            admin,
            leader,
            node,
            dir,
            rt,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The store as the leader: the leader's client, a fresh local database.
    pub(crate) fn store(&self) -> KubeStore {
        let local = Store::open(&self.state_dir()).expect("local database");
        KubeStore::new(self.leader.clone(), self.rt.handle().clone(), local).expect("store")
    }

    fn admin_api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.admin.clone(), namespace, &training_job_resource())
    }

    /// Writes a job's status as another writer would (a leader before or after this one).
    fn write_status_as_admin(&self, name: &str, status: &JobStatus) {
        let api = self.admin_api("default");
        self.rt
            .block_on(api.patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            ))
            .expect("status written");
    }

    pub(crate) fn get(&self, namespace: &str, name: &str) -> Option<DynamicObject> {
        let api = self.admin_api(namespace);
        self.rt.block_on(api.get_opt(name)).expect("get")
    }

    /// Creates the namespace `name`.
    pub(crate) fn create_namespace(&self, name: &str) {
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.admin.clone());
        self.rt
            .block_on(namespaces.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace"),
            ))
            .expect("namespace created");
    }

    /// Creates an object as a person would with `kubectl apply` (no status).
    fn apply(&self, manifest: &str) {
        let doc: Value = serde_saphyr::from_str(manifest).expect("YAML");
        let namespace = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let object: DynamicObject = serde_json::from_value(doc).expect("object");
        let api = self.admin_api(&namespace);
        self.rt
            .block_on(api.create(&PostParams::default(), &object))
            .expect("created");
    }
}

fn native(name: &str, gpus: u32, priority: i32) -> String {
    format!(
        "apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata:
  name: {name}
  labels: {{team: vision}}
spec:
  queue: default
  priority: {priority}
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        spec:
          containers:
            - name: tensorflow
              image: busybox:1.36
              resources: {{limits: {{nvidia.com/gpu: {gpus}}}}}
"
    )
}

fn status(name: &str, state: JobState, reason: &str) -> JobStatus {
    JobStatus {
        name: name.to_owned(),
        kind: "TrainingJob".to_owned(),
        queue: "default".to_owned(),
        priority: 0,
        state,
        reason: reason.to_owned(),
        message: format!("{reason} for a test"),
        submitted_at: 1_700_000_000.25,
        started_at: None,
        finished_at: None,
        restarts: 0,
        backoff_limit: 3,
        generation: 0,
        owner: Some(Owner {
            uid: 1000,
            gid: 1000,
            user: "ada".to_owned(),
        }),
        template: None,
        replicas: vec![ReplicaStatus {
            name: "worker-0".to_owned(),
            replica_type: "worker".to_owned(),
            index: 0,
            state: ReplicaState::Pending,
            node: None,
            gpus: Vec::new(),
            gpu_indices: Vec::new(),
            address: None,
            pid: None,
            exit_code: None,
            signal: None,
            started_at: None,
            finished_at: None,
        }],
        events: Vec::new(),
    }
}

fn upsert(name: &str, manifest: &str, status: &JobStatus) -> JobWrite {
    JobWrite::Upsert {
        name: name.to_owned(),
        manifest: manifest.to_owned(),
        status: serde_json::to_string(status).expect("status serializes"),
        time: 1.0,
        finished: None,
        expires: None,
    }
}

fn event(object: &str, reason: &str) -> NewEvent {
    NewEvent {
        time: 2.0,
        kind: "job",
        object: object.to_owned(),
        reason: reason.to_owned(),
        message: format!("{reason} happened"),
    }
}

fn stored_status(object: &DynamicObject) -> JobStatus {
    serde_json::from_value(object.data["status"].clone()).expect("an agentd status")
}

#[test]
fn an_upsert_creates_the_object_and_the_next_writes_only_its_status() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    let queued = status("a", JobState::Queued, "Queued");
    store
        .write_batch(&[upsert("a", &native("a", 2, 5), &queued)], &[])
        .expect("created");
    let object = cluster.get("default", "a").expect("the object exists");
    assert_eq!(object.data["spec"]["priority"], json!(5));
    assert_eq!(
        object.data["spec"]["replicaSpecs"]["Worker"]["replicas"],
        json!(2)
    );
    assert_eq!(
        object.metadata.labels.as_ref().expect("labels")["team"],
        "vision"
    );
    assert_eq!(stored_status(&object), queued);
    assert_eq!(object.data["status"]["state"], "Queued");
    assert_eq!(
        object.data["status"]["gpus"],
        json!(4),
        "2 workers x 2 GPUs"
    );
    // What `kubectl get trainingjobs` prints.
    let request = http::Request::get("/apis/agentd.io/v1alpha1/namespaces/default/trainingjobs")
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .expect("request");
    let table: Value = cluster
        .rt
        .block_on(cluster.admin.request(request))
        .expect("table");
    let shown: Vec<(&str, &Value)> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .zip(table["rows"][0]["cells"].as_array().expect("cells"))
        .filter(|(c, _)| c["priority"].as_i64().unwrap_or(0) == 0)
        .map(|(c, v)| (c["name"].as_str().expect("name"), v))
        .collect();
    assert_eq!(
        shown.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        ["Name", "State", "Reason", "GPUs", "Age"]
    );
    assert_eq!(shown[1].1, "Queued");
    assert_eq!(shown[2].1, "Queued");
    assert_eq!(*shown[3].1, json!(4));

    // A second upsert, with a manifest that differs, changes the status and nothing else.
    let running = status("a", JobState::Running, "Running");
    store
        .write_batch(&[upsert("a", &native("a", 2, 9), &running)], &[])
        .expect("written");
    let after = cluster.get("default", "a").expect("the object exists");
    assert_eq!(stored_status(&after), running);
    assert_eq!(after.data["spec"], object.data["spec"], "spec unchanged");
    assert_eq!(after.metadata.uid, object.metadata.uid, "the same object");
    assert_ne!(
        after.metadata.resource_version,
        object.metadata.resource_version
    );
}

/// The conditions of a status, by type: (status, reason).
fn conditions(object: &DynamicObject) -> BTreeMap<String, (String, String)> {
    object.data["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().expect("type").to_owned(),
                (
                    c["status"].as_str().expect("status").to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect()
}

/// Tools that read a Kubeflow TFJob's status read these objects too: conditions, replica
/// counts by type, start and completion times, kept by the CRD's schema.
#[test]
fn the_status_carries_kubeflows_conditions_and_replica_counts() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    let manifest = native("k", 1, 0);
    let mut running = status("k", JobState::Running, "Running");
    running.started_at = Some(1_700_000_010.0);
    running.replicas[0].state = ReplicaState::Running;
    let mut second = running.replicas[0].clone();
    second.name = "worker-1".to_owned();
    second.index = 1;
    running.replicas.push(second);
    store
        .write_batch(&[upsert("k", &manifest, &running)], &[])
        .expect("written");
    let object = cluster.get("default", "k").expect("the object exists");
    let shown = conditions(&object);
    assert_eq!(shown["Created"].0, "True");
    assert_eq!(shown["Running"], ("True".to_owned(), "Running".to_owned()));
    assert!(!shown.contains_key("Succeeded"));
    assert_eq!(
        object.data["status"]["replicaStatuses"],
        json!({"Worker": {"active": 2, "succeeded": 0, "failed": 0}})
    );
    assert_eq!(object.data["status"]["startTime"], "2023-11-14T22:13:30Z");
    assert!(object.data["status"].get("completionTime").is_none());

    let mut done = running.clone();
    done.state = JobState::Succeeded;
    done.reason = "Succeeded".to_owned();
    done.finished_at = Some(1_700_000_070.4);
    done.replicas[0].state = ReplicaState::Succeeded;
    done.replicas[1].state = ReplicaState::Succeeded;
    store
        .write_batch(&[upsert("k", &manifest, &done)], &[])
        .expect("written");
    let object = cluster.get("default", "k").expect("the object exists");
    let shown = conditions(&object);
    assert_eq!(shown["Running"].0, "False", "{shown:?}");
    assert_eq!(
        shown["Succeeded"],
        ("True".to_owned(), "Succeeded".to_owned())
    );
    assert_eq!(
        object.data["status"]["replicaStatuses"]["Worker"],
        json!({"active": 0, "succeeded": 2, "failed": 0})
    );
    assert_eq!(
        object.data["status"]["completionTime"],
        "2023-11-14T22:14:30Z"
    );
    // agentd's own status reads back unchanged beside them.
    assert_eq!(stored_status(&object), done);

    let mut cancelled = done;
    cancelled.state = JobState::Cancelled;
    cancelled.reason = "Cancelled".to_owned();
    store
        .write_batch(&[upsert("k", &manifest, &cancelled)], &[])
        .expect("written");
    let object = cluster.get("default", "k").expect("the object exists");
    assert_eq!(
        conditions(&object)["Failed"],
        ("True".to_owned(), "Cancelled".to_owned())
    );
}

/// Replica progress within a state is not written on its own: a gang of eight pods costs a
/// status write at each milestone (placed, running, finished, its last replicas ended), not one
/// per pod event; the progress goes with the next milestone.
#[test]
fn replica_progress_waits_for_the_next_milestone() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    let manifest = native("m", 1, 0);
    let version = || {
        cluster
            .get("default", "m")
            .expect("the object exists")
            .metadata
            .resource_version
    };
    let mut status = status("m", JobState::Starting, "Starting");
    status.generation = 1;
    status.replicas[0].node = Some("node-1".to_owned());
    let mut second = status.replicas[0].clone();
    second.name = "worker-1".to_owned();
    second.index = 1;
    status.replicas.push(second);
    let mut write = |status: &JobStatus| {
        store
            .write_batch(&[upsert("m", &manifest, status)], &[])
            .expect("written");
    };
    write(&status);
    let placed = version();

    // One replica of two runs: progress only.
    status.replicas[0].state = ReplicaState::Running;
    status.replicas[0].pid = Some(7);
    write(&status);
    assert_eq!(version(), placed, "progress alone is not written");

    // Both run: the job runs, a milestone, written with the progress before it.
    status.state = JobState::Running;
    status.reason = "Running".to_owned();
    status.replicas[1].state = ReplicaState::Running;
    write(&status);
    let running = cluster.get("default", "m").expect("the object exists");
    assert_ne!(running.metadata.resource_version, placed);
    assert_eq!(stored_status(&running), status);

    // worker-1 done while the job runs on: progress; then worker-0 completes the job while
    // worker-1's stop is still under way, then worker-1 is ended: two milestones.
    status.replicas[1].state = ReplicaState::Succeeded;
    write(&status);
    assert_eq!(version(), running.metadata.resource_version);
    status.replicas[1].state = ReplicaState::Running;
    status.state = JobState::Succeeded;
    status.reason = "Succeeded".to_owned();
    status.replicas[0].state = ReplicaState::Succeeded;
    write(&status);
    let finished = version();
    assert_ne!(finished, running.metadata.resource_version);
    status.replicas[1].state = ReplicaState::Terminated;
    write(&status);
    let settled = cluster.get("default", "m").expect("the object exists");
    assert_ne!(settled.metadata.resource_version, finished);
    assert_eq!(stored_status(&settled), status);

    // A new placement is a milestone whatever else stays.
    status.replicas[1].node = Some("node-2".to_owned());
    write(&status);
    assert_ne!(version(), settled.metadata.resource_version);
}

#[test]
fn a_tfjob_round_trips_as_a_training_job() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mnist-tfjob.yaml"),
    )
    .expect("example");
    let submitted = job::parse(manifest.as_bytes()).expect("the example parses");
    let mut queued = status("mnist-tfjob", JobState::Queued, "Queued");
    queued.kind = "TFJob".to_owned();
    store
        .write_batch(&[upsert("mnist-tfjob", &manifest, &queued)], &[])
        .expect("created");

    let object = cluster.get("default", "mnist-tfjob").expect("created");
    assert_eq!(
        object.types.as_ref().map(|t| t.kind.as_str()),
        Some("TrainingJob")
    );
    assert_eq!(
        object.metadata.annotations.as_ref().expect("annotations")[SOURCE_KIND_ANNOTATION],
        "TFJob"
    );
    assert!(object.data["spec"].get("tfReplicaSpecs").is_none());
    assert_eq!(
        object.data["spec"]["replicaSpecs"]["Worker"]["replicas"],
        json!(2)
    );

    // A new leader reads it back: the manifest parses into the same spec, the status as written.
    drop(store);
    let _ = std::fs::remove_dir_all(cluster.state_dir());
    let store = cluster.store();
    let jobs = store.jobs().expect("listed");
    assert_eq!(jobs.len(), 1);
    let (name, manifest, status_json) = &jobs[0];
    assert_eq!(name, "mnist-tfjob");
    let read = job::parse(manifest.as_bytes()).expect("the stored manifest parses");
    assert_eq!(read.spec, submitted.spec);
    assert_eq!(read.name, "mnist-tfjob");
    assert_eq!(read.namespace.as_deref(), Some("default"));
    let read_status: JobStatus = serde_json::from_str(status_json).expect("status");
    assert_eq!(read_status, queued);
    let metadata = &serde_json::from_str::<Value>(manifest).expect("JSON")["metadata"];
    for server_set in [
        "uid",
        "resourceVersion",
        "managedFields",
        "creationTimestamp",
    ] {
        assert!(
            metadata.get(server_set).is_none(),
            "{server_set} in {manifest}"
        );
    }
    // The submitter, recorded on the object as a follower records it.
    let owner = &metadata["annotations"][crate::cluster::jobs::OWNER_ANNOTATION];
    assert_eq!(
        serde_json::from_str::<Owner>(owner.as_str().expect("a string")).expect("JSON"),
        queued.owner.clone().expect("an owner")
    );
}

#[test]
fn delete_removes_the_object_and_its_events() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    let queued = status("a", JobState::Queued, "Queued");
    store
        .write_batch(
            &[
                upsert("a", &native("a", 1, 0), &queued),
                upsert(
                    "b",
                    &native("b", 1, 0),
                    &status("b", JobState::Queued, "Queued"),
                ),
            ],
            &[event("a", "Submitted"), event("b", "Submitted")],
        )
        .expect("created");
    store
        .write_batch(&[JobWrite::Delete { name: "a".into() }], &[])
        .expect("deleted");
    assert!(cluster.get("default", "a").is_none(), "the object is gone");
    assert!(cluster.get("default", "b").is_some());
    assert!(
        store
            .events(Some("job"), Some("a"), 0, 10)
            .expect("events")
            .is_empty()
    );
    assert_eq!(
        store
            .events(Some("job"), Some("b"), 0, 10)
            .expect("events")
            .len(),
        1
    );

    // Deleted by a person first: the core's delete still succeeds.
    let api = cluster.admin_api("default");
    cluster
        .rt
        .block_on(api.delete("b", &kube::api::DeleteParams::default()))
        .expect("deleted by hand");
    store
        .write_batch(&[JobWrite::Delete { name: "b".into() }], &[])
        .expect("a 404 is fine");
}

#[test]
fn a_job_deleted_in_the_cluster_is_not_made_again_until_the_core_forgets_it() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    let queued = status("a", JobState::Queued, "Queued");
    store
        .write_batch(&[upsert("a", &native("a", 1, 0), &queued)], &[])
        .expect("created");
    let api = cluster.admin_api("default");
    cluster
        .rt
        .block_on(api.delete("a", &kube::api::DeleteParams::default()))
        .expect("`kubectl delete trainingjob a`");
    store
        .write_batch(
            &[upsert(
                "a",
                &native("a", 1, 0),
                &status("a", JobState::Cancelled, "Cancelled"),
            )],
            &[],
        )
        .expect("nothing to write to");
    assert!(cluster.get("default", "a").is_none(), "not made again");
    store
        .write_batch(&[JobWrite::Delete { name: "a".into() }], &[])
        .expect("forgotten");
    // A new job of the same name, later, is a new object.
    store
        .write_batch(&[upsert("a", &native("a", 1, 0), &queued)], &[])
        .expect("created");
    assert_eq!(
        stored_status(&cluster.get("default", "a").expect("exists")),
        queued
    );
}

#[test]
fn a_write_that_went_through_unanswered_is_not_taken_for_another_leaders() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    store
        .write_batch(
            &[upsert(
                "a",
                &native("a", 1, 0),
                &status("a", JobState::Queued, "Queued"),
            )],
            &[],
        )
        .expect("created");
    // Writes in a row without an answer (a time-out, a broken connection), of which the
    // server applied the first only (the next, on the old version, would have been refused).
    let placed = status("a", JobState::Placed, "Placed");
    let waiting = status("a", JobState::Queued, "Unschedulable");
    {
        let mut known = store.objects.known();
        let known = known.get_mut("a").expect("known");
        known.sent_unanswered(Some(&placed));
        known.sent_unanswered(Some(&waiting));
        known.sent_unanswered(Some(&placed));
        assert_eq!(known.unconfirmed.len(), 2, "each status once");
    }
    cluster.write_status_as_admin("a", &placed);
    let running = status("a", JobState::Running, "Running");
    store
        .write_batch(&[upsert("a", &native("a", 1, 0), &running)], &[])
        .expect("its own write is no conflict");
    assert_eq!(
        stored_status(&cluster.get("default", "a").expect("exists")),
        running
    );
    assert!(store.objects.known()["a"].unconfirmed.is_empty());
}

#[test]
fn only_an_answer_from_the_server_says_a_write_did_not_land() {
    let refused = kube::Error::Api(Box::new(
        kube::core::Status::failure("conflict", "Conflict").with_code(409),
    ));
    assert!(!outcome_unknown(&refused));
    let broken = kube::Error::Service("connection error: timed out".into());
    assert!(outcome_unknown(&broken));
}

#[test]
fn a_status_written_by_another_agent_fails_the_batch() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    store
        .write_batch(
            &[upsert(
                "a",
                &native("a", 1, 0),
                &status("a", JobState::Queued, "Queued"),
            )],
            &[],
        )
        .expect("created");
    // Another leader places the job in between.
    let theirs = status("a", JobState::Placed, "Placed");
    cluster.write_status_as_admin("a", &theirs);

    let late = status("a", JobState::Failed, "Unschedulable");
    let err = store
        .write_batch(
            &[upsert("a", &native("a", 1, 0), &late)],
            &[event("a", "Failed")],
        )
        .expect_err("a late write of a deposed leader is refused");
    assert!(matches!(err, StoreError::KubeConflict { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("default/a"), "{text}");
    assert!(text.contains("another agent wrote its status"), "{text}");
    let object = cluster.get("default", "a").expect("exists");
    assert_eq!(stored_status(&object), theirs, "nothing overwritten");
    assert!(
        store.events(None, None, 0, 10).expect("events").is_empty(),
        "a failed batch writes no event"
    );
}

#[test]
fn a_turns_writes_go_out_together_and_a_delete_stays_between_its_neighbours() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    let names: Vec<String> = (0..40).map(|i| format!("j{i:02}")).collect();
    let queued: Vec<JobWrite> = names
        .iter()
        .map(|n| upsert(n, &native(n, 1, 0), &status(n, JobState::Queued, "Queued")))
        .collect();
    store.write_batch(&queued, &[]).expect("all made");
    for n in &names {
        let object = cluster.get("default", n).expect("made");
        assert_eq!(stored_status(&object).state, JobState::Queued, "{n}");
    }

    // Placed, then one removed mid-batch and made again after it; and one job whose status
    // another agent wrote meanwhile.
    let theirs = status("j30", JobState::Failed, "Theirs");
    cluster.write_status_as_admin("j30", &theirs);
    let mut writes: Vec<JobWrite> = names
        .iter()
        .map(|n| upsert(n, &native(n, 1, 0), &status(n, JobState::Placed, "Placed")))
        .collect();
    writes.insert(20, JobWrite::Delete { name: "j05".into() });
    writes.insert(
        21,
        upsert(
            "j05",
            &native("j05", 1, 0),
            &status("j05", JobState::Queued, "Again"),
        ),
    );
    writes.remove(5); // j05's Placed write: the delete comes after the writes before it.
    let err = store
        .write_batch(&writes, &[event("j01", "Placed")])
        .expect_err("j30's status is another agent's");
    assert!(matches!(err, StoreError::KubeConflict { .. }), "{err:?}");
    assert!(err.to_string().contains("default/j30"), "{err}");
    let j05 = cluster.get("default", "j05").expect("made again");
    assert_eq!(
        stored_status(&j05).reason,
        "Again",
        "the write after the delete"
    );
    // Every other write went out: those before the delete, and those of the run that failed
    // (they were sent together with the one that failed).
    for n in names
        .iter()
        .filter(|n| !["j05", "j30"].contains(&n.as_str()))
    {
        let object = cluster.get("default", n).expect("exists");
        assert_eq!(stored_status(&object).state, JobState::Placed, "{n}");
    }
    assert_eq!(
        stored_status(&cluster.get("default", "j30").expect("exists")),
        theirs,
        "nothing overwritten"
    );
    assert!(
        store.events(None, None, 0, 10).expect("events").is_empty(),
        "a failed batch writes no event"
    );
}

#[test]
fn an_edit_that_leaves_the_status_alone_is_no_conflict() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    store
        .write_batch(
            &[upsert(
                "a",
                &native("a", 1, 0),
                &status("a", JobState::Queued, "Queued"),
            )],
            &[],
        )
        .expect("created");
    let api = cluster.admin_api("default");
    cluster
        .rt
        .block_on(api.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"owner": "grace"}}})),
        ))
        .expect("labelled");
    let running = status("a", JobState::Running, "Running");
    store
        .write_batch(&[upsert("a", &native("a", 1, 0), &running)], &[])
        .expect("the status is still this store's: written on the new version");
    let object = cluster.get("default", "a").expect("exists");
    assert_eq!(stored_status(&object), running);
    assert_eq!(
        object.metadata.labels.as_ref().expect("labels")["owner"],
        "grace"
    );
}

#[test]
fn an_applied_job_without_status_is_left_to_admission_then_written() {
    let cluster = Cluster::start();
    cluster.apply(&native("applied", 1, 0));
    let mut store = cluster.store();
    assert!(
        store.jobs().expect("listed").is_empty(),
        "not admitted yet: not a stored job"
    );
    // Admitted later: the first write finds the object and writes its status.
    let queued = status("applied", JobState::Queued, "Queued");
    store
        .write_batch(&[upsert("applied", &native("applied", 1, 0), &queued)], &[])
        .expect("written");
    assert_eq!(
        stored_status(&cluster.get("default", "applied").expect("exists")),
        queued
    );
    // One applied after the list, by someone else, waiting for admission: a job of the same
    // name submitted here must not take it over; its write fails, naming why, and leaves it.
    cluster.apply(&native("later", 1, 0));
    let later = status("later", JobState::Queued, "Queued");
    let refused = store
        .write_batch(&[upsert("later", &native("later", 1, 0), &later)], &[])
        .expect_err("another submitter's object is not taken over");
    assert!(
        refused.to_string().contains("waiting to be admitted"),
        "{refused}"
    );
    assert_eq!(
        agentd_status(&cluster.get("default", "later").expect("still there")),
        None
    );
    // This job's own object, made by a create whose answer was lost (the submitter's
    // annotation on it): taken over.
    let owner = later.owner.clone().expect("the test status has an owner");
    let keys = signing::SubmitterKeys::new(cluster.leader.clone(), "agentd-system".to_owned());
    let key = cluster.rt.block_on(keys.load(true)).expect("key made");
    drop(store);
    let mut store = cluster.store().signing(keys);
    let (_, mut object, _) = object_from_manifest(&native("lost", 1, 0)).expect("object");
    sign_submitter(&mut object, &owner, None, key.as_ref());
    cluster
        .rt
        .block_on(
            cluster
                .admin_api("default")
                .create(&PostParams::default(), &object),
        )
        .expect("created");
    let lost = status("lost", JobState::Queued, "Queued");
    store
        .write_batch(&[upsert("lost", &native("lost", 1, 0), &lost)], &[])
        .expect("taken over");
    assert_eq!(
        stored_status(&cluster.get("default", "lost").expect("exists")),
        lost
    );
}

/// An object deleted while it was being admitted (cancelled on another node before the
/// leader wrote it) fails the job's first write: the job is not taken in, and the name is free
/// for the next job, whose object is made anew.
#[test]
fn an_object_deleted_before_its_first_write_fails_that_write_and_is_forgotten() {
    let cluster = Cluster::start();
    cluster.apply(&native("gone", 1, 0));
    let object = cluster.get("default", "gone").expect("applied");
    let pending = PendingObjects::default();
    let mut store = cluster.store().admitting(pending.clone());
    let mut queued = status("gone", JobState::Queued, "Queued");
    queued.owner = Some(owner_of(&object, None));
    pending.insert("gone".to_owned(), object);
    cluster
        .rt
        .block_on(
            cluster
                .admin_api("default")
                .delete("gone", &DeleteParams::default()),
        )
        .expect("deleted");
    let refused = store
        .write_batch(&[upsert("gone", &native("gone", 1, 0), &queued)], &[])
        .expect_err("the object is gone: the job must not be taken in");
    assert!(refused.to_string().contains("deleted before"), "{refused}");
    assert!(!store.holds_object("gone", "any"));
    let again = status("gone", JobState::Queued, "Queued");
    store
        .write_batch(&[upsert("gone", &native("gone", 1, 0), &again)], &[])
        .expect("a new job of the name gets an object of its own");
    assert_eq!(
        stored_status(&cluster.get("default", "gone").expect("made anew")),
        again
    );
}

#[test]
fn of_two_jobs_with_one_name_the_older_is_kept() {
    let cluster = Cluster::start();
    cluster.create_namespace("other");
    let mut first = cluster.store();
    first
        .write_batch(
            &[upsert(
                "a",
                &native("a", 1, 0).replace("name: a", "name: a\n  namespace: other"),
                &status("a", JobState::Queued, "Queued"),
            )],
            &[],
        )
        .expect("created in other");
    assert!(cluster.get("other", "a").is_some());
    drop(first);
    // Creation times have a resolution of one second: the second object must be younger.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    cluster.apply(&native("a", 1, 0));
    let api = cluster.admin_api("default");
    cluster
        .rt
        .block_on(api.patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status("a", JobState::Running, "Running")})),
        ))
        .expect("a status of its own");

    let mut store = cluster.store();
    let jobs = store.jobs().expect("listed");
    assert_eq!(jobs.len(), 1, "one job per name");
    let read = job::parse(jobs[0].1.as_bytes()).expect("manifest");
    assert_eq!(read.namespace.as_deref(), Some("other"), "the older one");
    let placed = status("a", JobState::Placed, "Placed");
    store
        .write_batch(&[upsert("a", &native("a", 1, 0), &placed)], &[])
        .expect("written");
    assert_eq!(
        stored_status(&cluster.get("other", "a").expect("exists")),
        placed
    );
    assert_eq!(
        stored_status(&cluster.get("default", "a").expect("exists")).state,
        JobState::Running,
        "the other one is left alone"
    );
}

#[test]
fn events_and_samples_go_to_the_local_database() {
    let cluster = Cluster::start();
    let mut store = cluster.store();
    store
        .write_batch(&[], &[event("a", "Submitted"), event("a", "Placed")])
        .expect("events written");
    store
        .add_inventory_sample(10.0, "{}", std::time::Duration::from_mins(1))
        .expect("sample kept");
    let reasons: Vec<String> = store
        .events(Some("job"), Some("a"), 0, 10)
        .expect("events")
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(reasons, ["Submitted", "Placed"]);
    store.check_writable().expect("the API answers");
    Box::new(store).close().expect("closed");
    let local = Store::open(&cluster.state_dir()).expect("reopened");
    assert_eq!(local.events(None, None, 0, 10).expect("events").len(), 2);
    assert_eq!(local.inventory_window().expect("window").0, 1);
    assert!(
        local.jobs().expect("jobs").is_empty(),
        "jobs are not kept locally"
    );
}

#[test]
fn it_works_inside_block_on_on_a_blocking_thread_as_the_core_calls_it() {
    let cluster = Cluster::start();
    let mut store: Box<dyn JobStore> = Box::new(cluster.store());
    let handle = cluster.rt.handle().clone();
    let queued = status("a", JobState::Queued, "Queued");
    let written = queued.clone();
    let jobs = cluster
        .rt
        .block_on(cluster.rt.spawn_blocking(move || {
            handle.block_on(async move {
                store.write_batch(
                    &[upsert("a", &native("a", 1, 0), &written)],
                    &[event("a", "Submitted")],
                )?;
                store.check_writable()?;
                store.jobs()
            })
        }))
        .expect("no panic")
        .expect("written and read");
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        serde_json::from_str::<JobStatus>(&jobs[0].2).expect("status"),
        queued
    );
}

#[test]
fn a_silent_api_server_is_a_timeout_naming_the_request() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bound");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    let client = rt.block_on(async {
        let config = kube::Config::new(url.parse().expect("url"));
        kube::Client::try_from(config).expect("client")
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Store::open(dir.path()).expect("local database");
    let mut store = KubeStore::new(client, rt.handle().clone(), local)
        .expect("store")
        .with_request_bound(std::time::Duration::from_millis(300));
    let err = store
        .write_batch(
            &[upsert(
                "a",
                &native("a", 1, 0),
                &status("a", JobState::Queued, "Queued"),
            )],
            &[],
        )
        .expect_err("no answer");
    assert!(matches!(err, StoreError::KubeTimeout { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("create trainingjobs default/a"), "{text}");
    assert!(store.check_writable().is_err());
    drop(listener);
}

#[test]
fn a_single_threaded_runtime_is_refused() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt.block_on(async {
        kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:1".parse().expect("url"),
        ))
        .expect("client")
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Store::open(dir.path()).expect("local database");
    let err = KubeStore::new(client, rt.handle().clone(), local)
        .err()
        .expect("refused");
    assert!(matches!(err, StoreError::SingleThreadedRuntime), "{err:?}");
}

/// The CRD keeps every field of the status the store writes: a real API server prunes fields
/// its schema does not name, and the job would come back unreadable.
#[test]
fn the_crd_schema_keeps_the_status_and_its_printer_columns_read_it() {
    let text = std::fs::read_to_string(packaging().join("11-crd-trainingjob.yaml")).expect("CRD");
    let crd: Value = serde_saphyr::from_str(&text).expect("YAML");
    let version = &crd["spec"]["versions"][0];
    let schema = &version["schema"]["openAPIV3Schema"]["properties"]["status"];
    let properties = schema["properties"].as_object().expect("status properties");

    let mut full = status("a", JobState::Running, "Running");
    full.started_at = Some(1.5);
    full.finished_at = Some(2.5);
    full.events = vec![agentd_api::jobs::JobEvent {
        time: 1.0,
        reason: "Placed".into(),
        message: "m".into(),
    }];
    let mut written = serde_json::to_value(&full).expect("status");
    written["gpus"] = json!(4);
    for (key, value) in written.as_object().expect("object") {
        let declared = properties
            .get(key)
            .unwrap_or_else(|| panic!("status.{key} is not in the CRD's schema"));
        if value.is_null() {
            assert_eq!(
                declared["nullable"],
                json!(true),
                "status.{key} may be null"
            );
        }
    }
    let replica = &properties["replicas"]["items"];
    let replica_properties = replica["properties"]
        .as_object()
        .expect("replica properties");
    for (key, value) in written["replicas"][0].as_object().expect("replica") {
        let declared = replica_properties
            .get(key)
            .unwrap_or_else(|| panic!("status.replicas[].{key} is not in the CRD's schema"));
        if value.is_null() {
            assert_eq!(declared["nullable"], json!(true), "status.replicas[].{key}");
        }
    }
    let states: Vec<&str> = properties["state"]["enum"]
        .as_array()
        .expect("state enum")
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect();
    let ours: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    assert_eq!(states, ours);

    let columns: Vec<(String, String, i64)> = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().expect("name").to_owned(),
                c["jsonPath"].as_str().expect("path").to_owned(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    for (name, path) in [
        ("State", ".status.state"),
        ("Reason", ".status.reason"),
        ("GPUs", ".status.gpus"),
        ("Age", ".metadata.creationTimestamp"),
    ] {
        assert!(
            columns
                .iter()
                .any(|(n, p, priority)| n == name && p == path && *priority == 0),
            "column {name} ({path}) shown by default: {columns:?}"
        );
    }
    for (_, path, _) in &columns {
        if let Some(field) = path.strip_prefix(".status.") {
            assert!(properties.contains_key(field), "{path} is in the schema");
            assert!(written.get(field).is_some(), "{path} is written");
        }
    }
}

/// A job that waits: it asks for a GPU and the node has none.
const WAITS_AS_A_TFJOB: &str = "apiVersion: kubeflow.org/v1
kind: TFJob
metadata: {name: waits, namespace: team-a}
spec:
  runPolicy: {backoffLimit: 1, schedulingPolicy: {queue: slow}}
  tfReplicaSpecs:
    Worker:
      replicas: 2
      template:
        spec:
          containers:
            - name: tensorflow
              command: [python3, train.py]
              resources: {limits: {nvidia.com/gpu: 1}}
";

/// Runs a core on `store` as the daemon does (its loop in `block_on` on a blocking thread),
/// asks it `ask`, stops it and closes its store.
pub(crate) fn with_core<T: Send + 'static>(
    cluster: &Cluster,
    store: KubeStore,
    ask: impl AsyncFnOnce(&crate::core::CoreHandle) -> T,
) -> T {
    use crate::core::{Core, CoreParts, ManualClock};
    let config = crate::config::Config {
        state_dir: cluster.state_dir(),
        queues: crate::config::default_queues(),
        jobs: crate::config::JobsConfig {
            replica_units: crate::config::ReplicaUnits::Off,
            ..Default::default()
        },
        ..crate::config::Config::default()
    };
    let (_inventory_tx, inventory) =
        tokio::sync::watch::channel(std::sync::Arc::new(agentd_api::NodeInventory::default()));
    let (_health_tx, health) = tokio::sync::mpsc::unbounded_channel();
    let parts = CoreParts {
        node: "node-a".to_owned(),
        store: Box::new(store),
        inventory,
        nodes: crate::core::Nodes::Local,
        health,
        metrics: None,
        clock: std::sync::Arc::new(ManualClock::new(1_000_000.0)),
    };
    let _guard = cluster.rt.enter();
    let (core, handle, inputs) = Core::open_with(&config, parts, |reports| {
        Box::new(crate::exec::memory::MemoryExecutor::new(reports))
    })
    .expect("the core opens and restores");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let runtime = cluster.rt.handle().clone();
    let running = cluster.rt.spawn_blocking(move || {
        let mut inputs = inputs;
        runtime.block_on(core.run(&mut inputs, stop))
    });
    let answer = cluster.rt.block_on(ask(&handle));
    stop_tx.send(true).expect("the core listens");
    let store = cluster.rt.block_on(running).expect("the core stops");
    store.close().expect("closed");
    answer
}

#[test]
fn a_core_keeps_its_jobs_in_training_jobs_and_a_new_one_restores_them() {
    let cluster = Cluster::start();
    cluster.create_namespace("team-a");
    let rules = job::Admission::new(
        crate::config::default_queues().into_keys(),
        crate::config::DEFAULT_QUEUE,
        crate::config::DEFAULT_MAX_REPLICAS_PER_JOB,
    );
    let admitted = job::admit(WAITS_AS_A_TFJOB.as_bytes(), &rules).expect("valid");
    let owner = Owner {
        uid: 1000,
        gid: 1000,
        user: "ada".to_owned(),
    };
    let submitted = with_core(&cluster, cluster.store(), async |core| {
        core.ask(|reply| crate::core::Command::Submit {
            job: Box::new(admitted),
            manifest: WAITS_AS_A_TFJOB.to_owned(),
            owner,
            reply,
        })
        .await
        .expect("accepted")
    });
    let object = cluster.get("team-a", "waits").expect("the job's object");
    assert_eq!(stored_status(&object).name, "waits");
    assert_eq!(object.data["status"]["gpus"], json!(2));

    // The next core (a new leader) reads it back from the cluster alone.
    std::fs::remove_dir_all(cluster.state_dir()).expect("the local database goes");
    let restored = with_core(&cluster, cluster.store(), async |core| {
        core.ask(|reply| crate::core::Command::Get {
            name: "waits".to_owned(),
            removed: false,
            reply,
        })
        .await
        .expect("restored")
    });
    assert_eq!(restored.state, JobState::Queued, "{restored:?}");
    assert_eq!(restored.kind, "TFJob");
    assert_eq!(restored.queue, "slow");
    assert_eq!(restored.queue, submitted.queue);
    assert_eq!(restored.owner, submitted.owner);
    assert_eq!(
        restored.submitted_at.to_bits(),
        submitted.submitted_at.to_bits(),
        "the submit time, exactly"
    );
    assert_eq!(restored.replicas.len(), 2);
}

/// A store fenced by the election writes jobs only while this agent leads and its term runs;
/// events alone still go to the local database.
#[test]
fn a_fenced_store_writes_no_job_once_its_agent_does_not_lead() {
    use std::time::Duration;

    use crate::cluster::election::Term;
    let cluster = Cluster::start();
    let leading = |valid_for: Option<Duration>| Leadership {
        leader: Some("node-a".to_owned()),
        term: valid_for.map(|d| Term {
            transitions: 1,
            resource_version: "1".to_owned(),
            valid_until: std::time::Instant::now() + d,
        }),
    };
    let (leadership, fence) = tokio::sync::watch::channel(leading(Some(Duration::from_mins(1))));
    let mut store = cluster.store().fenced_by(fence);
    let queued = status("a", JobState::Queued, "Queued");
    store
        .write_batch(&[upsert("a", &native("a", 1, 0), &queued)], &[])
        .expect("written while leading");

    // A term that ran out without a renewal, before the election loop says so.
    leadership.send_replace(leading(Some(Duration::ZERO)));
    let running = status("a", JobState::Running, "Running");
    let refused = store
        .write_batch(&[upsert("a", &native("a", 1, 0), &running)], &[])
        .expect_err("a leader out of its term writes nothing");
    assert!(matches!(refused, StoreError::NotLeading), "{refused}");
    leadership.send_replace(leading(None));
    assert!(matches!(
        store.write_batch(&[JobWrite::Delete { name: "a".into() }], &[]),
        Err(StoreError::NotLeading)
    ));
    assert_eq!(
        stored_status(&cluster.get("default", "a").expect("still there")),
        queued,
        "nothing was overwritten"
    );
    store
        .write_batch(
            &[],
            &[NewEvent {
                time: 1.0,
                kind: "node",
                object: "node-a".to_owned(),
                reason: "Drained".to_owned(),
                message: "drained".to_owned(),
            }],
        )
        .expect("events are the node's own");
}
