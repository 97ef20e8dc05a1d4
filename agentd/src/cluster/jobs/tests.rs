//! Jobs from any node against an in-process kube-sim with HTTPS, tokens and RBAC on: the
//! follower acts as the `agentd-node` ServiceAccount, the leader as `agentd-leader`, each with
//! only the packaged roles.

use std::time::{Duration, Instant};

use agentd_api::jobs::{JobState, Owner};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

use super::*;
use crate::cluster::election::Term;
use crate::core::{Command, CoreError};
use crate::store::kube::tests::{Cluster, with_core};

const LEADER: &str = "node-a";

/// A job any node accepts: no GPUs, a program that exists everywhere.
fn manifest(name: &str) -> String {
    format!(
        "apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  queue: slow
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        spec:
          containers:
            - name: tensorflow
              command: [sleep, '600']
              resources: {{limits: {{nvidia.com/gpu: 1}}}}
"
    )
}

fn ada() -> Owner {
    Owner {
        uid: 1000,
        gid: 1000,
        user: "ada".to_owned(),
    }
}

fn rules() -> watch::Receiver<Arc<Admission>> {
    watch::channel(Arc::new(
        Admission::new(
            crate::config::default_queues().into_keys(),
            crate::config::DEFAULT_QUEUE,
            crate::config::DEFAULT_MAX_REPLICAS_PER_JOB,
        )
        .for_cluster("cluster.local"),
    ))
    .1
}

/// The default queues, as an agent without a queue ConfigMap has them.
fn queues() -> watch::Receiver<Arc<QueuesInForce>> {
    let mut config = crate::config::Config::default();
    config.queues = crate::config::default_queues();
    watch::channel(Arc::new(QueuesInForce::configured(&config))).1
}

/// What a leader admits with: the objects being admitted, the signing key, its client.
struct Admitting {
    client: kube::Client,
    pending: PendingObjects,
    keys: Arc<SubmitterKeys>,
}

/// Admission running for a core, leading until stopped.
struct Running {
    _leadership: watch::Sender<Leadership>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A leader's store that writes admitted jobs onto their objects, and its admission.
fn leader_admitting(cluster: &Cluster) -> (crate::store::kube::KubeStore, Admitting) {
    let admitting = Admitting {
        client: cluster.leader.clone(),
        pending: PendingObjects::default(),
        keys: leader_keys(cluster),
    };
    let store = cluster
        .store()
        .admitting(admitting.pending.clone())
        .signing(Arc::clone(&admitting.keys));
    (store, admitting)
}

impl Admitting {
    /// Starts admission into `core`, leading for an hour, once the key is made.
    async fn start(&self, core: CoreHandle) -> Running {
        let (leadership_tx, leadership) = watch::channel(leading());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run_admission(
            self.client.clone(),
            core,
            rules(),
            self.pending.clone(),
            Arc::clone(&self.keys),
            leadership,
            Duration::from_millis(20),
            stopped,
        ));
        self.keys
            .load(true)
            .await
            .expect("the leader makes the key");
        Running {
            _leadership: leadership_tx,
            stop,
            task,
        }
    }
}

impl Running {
    async fn stop(self) {
        self.stop.send_replace(true);
        self.task.await.expect("admission stops");
    }
}

/// The signing key as the leader sees it (it makes it) and as a node agent does.
fn leader_keys(cluster: &Cluster) -> Arc<SubmitterKeys> {
    SubmitterKeys::new(cluster.leader.clone(), "agentd-system".to_owned())
}

fn node_keys(cluster: &Cluster) -> Arc<SubmitterKeys> {
    SubmitterKeys::new(cluster.node.clone(), "agentd-system".to_owned())
}

fn leading() -> Leadership {
    Leadership {
        leader: Some(LEADER.to_owned()),
        term: Some(Term {
            transitions: 1,
            resource_version: "1".to_owned(),
            valid_until: Instant::now() + Duration::from_hours(1),
        }),
    }
}

/// The job desk of the agent on node-b, a follower.
fn follower_desk(cluster: &Cluster) -> Arc<FollowerJobs> {
    FollowerJobs::new(
        cluster.node.clone(),
        "node-b".to_owned(),
        node_keys(cluster),
        queues(),
    )
}

/// Asks the follower's desk, as the API's handle would.
async fn ask<T>(
    desk: &Arc<FollowerJobs>,
    build: impl FnOnce(oneshot::Sender<Result<T, CoreError>>) -> Command,
) -> Result<T, CoreError> {
    let (reply, answer) = oneshot::channel();
    assert!(
        desk.answer(build(reply), Some(LEADER.to_owned())).is_none(),
        "a follower answers job requests"
    );
    answer.await.expect("answered")
}

async fn submit(desk: &Arc<FollowerJobs>, text: &str) -> Result<JobStatus, CoreError> {
    let job = job::admit(text.as_bytes(), &rules().borrow()).expect("valid");
    ask(desk, |reply| Command::Submit {
        job: Box::new(job),
        manifest: text.to_owned(),
        owner: ada(),
        reply,
    })
    .await
}

async fn get(desk: &Arc<FollowerJobs>, name: &str) -> Result<JobStatus, CoreError> {
    ask(desk, |reply| Command::Get {
        name: name.to_owned(),
        removed: false,
        reply,
    })
    .await
}

/// The job `name` as the leader's core holds it.
async fn leaders_job(core: &CoreHandle, name: &str) -> Result<JobStatus, CoreError> {
    core.ask(|reply| Command::Get {
        name: name.to_owned(),
        removed: false,
        reply,
    })
    .await
}

/// Creates an object as `kubectl apply` does: no status, its field manager named.
async fn kubectl_apply(client: &kube::Client, text: &str) -> DynamicObject {
    let doc: Value = serde_saphyr::from_str(text).expect("YAML");
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned();
    let object: DynamicObject = serde_json::from_value(doc).expect("object");
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &training_job_resource());
    let params = PostParams {
        field_manager: Some("kubectl-client-side-apply".to_owned()),
        ..PostParams::default()
    };
    api.create(&params, &object).await.expect("applied")
}

/// Waits until `check` holds of the job's object, for at most a minute.
async fn object_until(
    client: &kube::Client,
    name: &str,
    check: impl Fn(&DynamicObject) -> bool,
) -> DynamicObject {
    object_in_until(client, DEFAULT_NAMESPACE, name, |o| o.is_some_and(&check))
        .await
        .expect("there")
}

/// Waits until `check` holds of the object `namespace/name` (`None`: there is none), for at
/// most a minute.
async fn object_in_until(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    check: impl Fn(Option<&DynamicObject>) -> bool,
) -> Option<DynamicObject> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), namespace, &training_job_resource());
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let object = api.get_opt(name).await.expect("get");
        if check(object.as_ref()) {
            return object;
        }
        assert!(Instant::now() < deadline, "{name} never got there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn state(object: &DynamicObject) -> Option<&str> {
    object.data.pointer("/status/state").and_then(Value::as_str)
}

/// A follower creates the object with its submitter and no status, reads and lists it back as
/// the leader would show it, refuses a second job of the name, and deletes one the leader has
/// not taken in when it is cancelled.
#[test]
fn a_follower_submits_reads_lists_and_cancels_from_the_objects() {
    let cluster = Cluster::start();
    let desk = follower_desk(&cluster);
    cluster.rt.block_on(async {
        let early = submit(&desk, &manifest("mnist"))
            .await
            .expect_err("no leader has made the signing key yet");
        assert!(early.to_string().contains("agentd-submitters"), "{early}");
        assert!(early.to_string().contains("no leader has made"), "{early}");
        leader_keys(&cluster)
            .load(true)
            .await
            .expect("the leader makes the key");
        let submitted = submit(&desk, &manifest("mnist")).await.expect("created");
        assert_eq!(submitted.state, JobState::Queued);
        assert_eq!(submitted.reason, "NotAdmitted");
        assert_eq!(submitted.owner, Some(ada()));
        assert_eq!(submitted.replicas.len(), 2);
    });
    let object = cluster.get("default", "mnist").expect("the object");
    assert!(
        object
            .data
            .get("status")
            .is_none_or(|s| s.get("state").is_none()),
        "no agentd status"
    );
    let annotations = object.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations[SUBMITTED_ON_ANNOTATION], "node-b");
    assert_eq!(
        serde_json::from_str::<Owner>(&annotations[OWNER_ANNOTATION]).expect("JSON"),
        ada()
    );
    cluster.rt.block_on(async {
        let read = get(&desk, "mnist").await.expect("read");
        assert_eq!((read.name.as_str(), read.queue.as_str()), ("mnist", "slow"));
        let listed = ask(&desk, |reply| Command::List {
            queue: None,
            state: Some(JobState::Queued),
            user: Some("ada".to_owned()),
            reply,
        })
        .await
        .expect("listed");
        assert_eq!(listed.jobs.len(), 1);
        let other = ask(&desk, |reply| Command::List {
            queue: None,
            state: None,
            user: Some("bob".to_owned()),
            reply,
        })
        .await
        .expect("listed");
        assert!(other.jobs.is_empty(), "filtered by user");

        let twice = submit(&desk, &manifest("mnist"))
            .await
            .expect_err("one job a name");
        assert!(
            matches!(&twice, CoreError::Conflict(m) if m.contains("already exists")),
            "{twice}"
        );
        let missing = get(&desk, "nosuch").await.expect_err("no such job");
        assert!(matches!(missing, CoreError::NotFound(_)), "{missing}");

        let cancelled = ask(&desk, |reply| Command::Cancel {
            name: "mnist".to_owned(),
            by: "ada".to_owned(),
            object: None,
            reply,
        })
        .await
        .expect("cancelled");
        assert_eq!(cancelled.state, JobState::Cancelled);
    });
    assert!(
        cluster.get("default", "mnist").is_none(),
        "not taken in: deleted"
    );
}

/// The leader takes in what it did not create: a job submitted on a follower (its status
/// written onto that object, the submitter kept), one applied with kubectl (owned by its field
/// manager), and an invalid one (Failed, `Invalid`, every problem at its path); a cancel asked
/// on a follower is the leader's cancel, by the user who asked.
#[test]
fn the_leader_admits_objects_it_did_not_create_and_cancels_on_request() {
    let cluster = Cluster::start();
    let (store, admission) = leader_admitting(&cluster);
    let desk = follower_desk(&cluster);
    let admin = cluster.admin.clone();
    let follower_uid = with_core(&cluster, store, async |core| {
        let admitting = admission.start(core.clone()).await;
        submit(&desk, &manifest("from-node-b"))
            .await
            .expect("created");
        kubectl_apply(&admin, &manifest("applied")).await;
        let invalid = manifest("invalid")
            .replace("queue: slow", "queue: nosuch")
            .replace("replicas: 2", "replicas: -1");
        kubectl_apply(&admin, &invalid).await;
        // Anyone who may create TrainingJobs can write an owner annotation; unsigned (or
        // signed for another object), it is not believed.
        let signed = object_until(&admin, "from-node-b", |_| true).await;
        let annotations = signed.metadata.annotations.clone().unwrap_or_default();
        let root = r#"{"uid":0,"gid":0,"user":"root"}"#;
        let forged = manifest("forged").replace(
            "metadata: {name: forged}",
            &format!(
                "metadata:\n  name: forged\n  annotations: {{{OWNER_ANNOTATION:?}: {root:?}, {:?}: {:?}}}",
                crate::store::kube::signing::SIGNATURE_ANNOTATION,
                annotations[crate::store::kube::signing::SIGNATURE_ANNOTATION]
            ),
        );
        kubectl_apply(&admin, &forged).await;

        let from_node = object_until(&admin, "from-node-b", |o| state(o) == Some("Queued")).await;
        let admitted = leaders_job(core, "from-node-b")
            .await
            .expect("the leader's core has it");
        assert_eq!(admitted.owner, Some(ada()), "the submitter on the follower");
        assert!(
            admitted
                .events
                .iter()
                .any(|e| e.message.contains("submitted by ada")),
            "{:?}",
            admitted.events
        );

        let applied = object_until(&admin, "applied", |o| state(o) == Some("Queued")).await;
        assert_eq!(
            applied.data["status"]["owner"]["user"],
            json!("kubernetes:kubectl-client-side-apply")
        );

        let forged = object_until(&admin, "forged", |o| state(o) == Some("Queued")).await;
        assert_eq!(
            forged.data["status"]["owner"]["user"],
            json!("kubernetes:kubectl-client-side-apply"),
            "an owner nobody vouches for is not believed"
        );

        let refused = object_until(&admin, "invalid", |o| state(o).is_some()).await;
        assert_eq!(state(&refused), Some("Failed"));
        assert_eq!(refused.data["status"]["reason"], json!("Invalid"));
        let message = refused.data["status"]["message"]
            .as_str()
            .expect("a message");
        assert!(message.contains("spec.queue"), "{message}");
        assert!(
            message.contains("spec.replicaSpecs.Worker.replicas"),
            "{message}"
        );

        // A follower reads the leader's status back, and asks for a cancel.
        let read = get(&desk, "applied").await.expect("read");
        assert_eq!(read.state, JobState::Queued);
        let asked = ask(&desk, |reply| Command::Cancel {
            name: "from-node-b".to_owned(),
            by: "ada".to_owned(),
            object: None,
            reply,
        })
        .await
        .expect("asked");
        assert_eq!(asked.reason, "CancelRequested");
        object_until(&admin, "from-node-b", |o| state(o) == Some("Cancelled")).await;
        let cancelled = leaders_job(core, "from-node-b").await.expect("still known");
        assert_eq!(cancelled.message, "cancelled by ada");
        admitting.stop().await;
        from_node.metadata.uid
    });
    let object = cluster
        .get("default", "from-node-b")
        .expect("the same object");
    assert_eq!(
        object.metadata.uid, follower_uid,
        "written onto, never made again"
    );
}

/// An object past the CRD's `maximum` (which an API server enforcing an older or edited CRD,
/// or none, lets through) costs an agent no row per replica: a follower reads and lists the
/// job asking for 4,294,967,295 replicas before the leader has seen it, and the leader refuses
/// it, and one of 100,000 replicas, with a status that fits in a request (a row per replica
/// did not: 413).
#[test]
fn objects_asking_for_billions_of_replicas_are_read_and_refused_without_a_row_each() {
    let cluster = Cluster::start();
    let (store, admission) = leader_admitting(&cluster);
    let desk = follower_desk(&cluster);
    let admin = cluster.admin.clone();
    with_core(&cluster, store, async |core| {
        let most = manifest("most").replace("replicas: 2", "replicas: 4294967295");
        kubectl_apply(&admin, &most).await;
        let many = manifest("many").replace("replicas: 2", "replicas: 100000");
        kubectl_apply(&admin, &many).await;
        let read = get(&desk, "most").await.expect("read");
        assert_eq!(
            (read.state, read.reason.as_str()),
            (JobState::Queued, "NotAdmitted")
        );
        assert!(read.replicas.is_empty(), "{} rows", read.replicas.len());
        let listed = ask(&desk, |reply| Command::List {
            queue: None,
            state: None,
            user: None,
            reply,
        })
        .await
        .expect("listed");
        assert_eq!(listed.jobs.len(), 2, "{listed:?}");

        let admitting = admission.start(core.clone()).await;
        for name in ["most", "many"] {
            let refused = object_until(&admin, name, |o| state(o).is_some()).await;
            assert_eq!(state(&refused), Some("Failed"), "{name}");
            assert_eq!(refused.data["status"]["reason"], json!("Invalid"), "{name}");
            let message = refused.data["status"]["message"].as_str().expect("message");
            assert!(
                message.contains("spec.replicaSpecs.Worker.replicas"),
                "{name}: {message}"
            );
            assert_eq!(refused.data["status"]["replicas"], json!([]), "{name}");
        }
        admitting.stop().await;
    });
}

/// A cancel or removal request is carried out on the job stored in the object that asks,
/// and no other: anyone who may create TrainingJobs in one namespace makes one of a running
/// job's name there (refused, Invalid) and asks for its removal; the running job is untouched
/// and the refused object is deleted.
#[test]
fn a_request_on_another_namespaces_object_of_the_same_name_touches_only_that_object() {
    let cluster = Cluster::start();
    cluster.create_namespace("other");
    let (store, admission) = leader_admitting(&cluster);
    let desk = follower_desk(&cluster);
    let admin = cluster.admin.clone();
    with_core(&cluster, store, async |core| {
        let admitting = admission.start(core.clone()).await;
        submit(&desk, &manifest("shared")).await.expect("created");
        object_until(&admin, "shared", |o| state(o) == Some("Queued")).await;
        kubectl_apply(
            &admin,
            &manifest("shared").replace("{name: shared}", "{name: shared, namespace: other}"),
        )
        .await;
        let refused = object_in_until(&admin, "other", "shared", |o| {
            o.is_some_and(|o| state(o).is_some())
        })
        .await
        .expect("there");
        assert_eq!(refused.data["status"]["reason"], json!("Invalid"));
        for (annotation, by) in [
            (CANCEL_ANNOTATION, "mallory"),
            (REMOVE_ANNOTATION, "mallory"),
        ] {
            let api: Api<DynamicObject> =
                Api::namespaced_with(admin.clone(), "other", &training_job_resource());
            let patch = json!({"metadata": {"annotations": {annotation: by}}});
            api.patch("shared", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("annotated");
        }
        object_in_until(&admin, "other", "shared", |o| o.is_none()).await;
        let running = leaders_job(core, "shared")
            .await
            .expect("the leader's job is still there");
        assert_eq!(running.state, JobState::Queued, "{}", running.message);
        assert_eq!(
            state(&object_until(&admin, "shared", |_| true).await),
            Some("Queued")
        );
        admitting.stop().await;
    });
}
