//! Replicas as pods, for cluster mode: each placed replica becomes one pod bound to the node the
//! scheduler chose (`spec.nodeName`: no scheduler pass, no binding call), behind one headless
//! Service per job that gives every replica a stable DNS name before it is ready. One watch on
//! every agentd pod (label `agentd.io/job`, all namespaces) turns pod phases into
//! [`ReplicaReport`]s, each transition once. Kubernetes runs the containers and restarts
//! nothing (`restartPolicy: Never`): restarts are the gang's, decided by the core.
//!
//! The handle reported in `Started` (the `pid` the core keeps and hands back to stop a replica)
//! is the replica's generation: a pod is found by its job, replica and generation labels, so
//! the generation is all the core needs to give back, and it is the same after a restart.
//!
//! This module decides nothing about placement or restarts, and never lists pods to follow them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    ContainerPort, ContainerStatus, EnvVar, Pod, PodSpec, Service, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{OnceCell, mpsc, watch};

use super::local::{LaunchSpec, PodLaunch, ReplicaEvent, ReplicaReport};
use super::{AGENTD_VARIABLES, Executor, Stopping, StoredReplica};
use crate::job::{
    self, CLUSTER_PORT, ClusterHosts, ExitOutcome, PlatformEnd, PlatformFailure, ReplicaType,
    TFJOB_PORT_NAME, TRAINING_CONTAINER, TrainingJob,
};

mod stuck;
mod watched;

pub use stuck::PodTimeouts;
use stuck::Stuck;
use watched::WatchedPod;

/// The label every agentd pod and Service carries: the job's name.
pub const JOB_LABEL: &str = "agentd.io/job";
/// The replica type of a pod, as `TF_CONFIG` names it (`chief`, `ps`, `worker`, ...).
pub const REPLICA_TYPE_LABEL: &str = "agentd.io/replica-type";
pub const REPLICA_INDEX_LABEL: &str = "agentd.io/replica-index";
/// The gang generation a pod belongs to: a restart places generation + 1.
pub const GENERATION_LABEL: &str = "agentd.io/generation";

/// The device plugin's GPU resource.
const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// How long after a stop's grace the pods that are still there are deleted at once (grace
/// period 0): long enough for a kubelet that stopped its containers in time to remove the pod
/// itself, short enough that a pod on a lost node does not hold its gang's restart for long.
const FORCE_AFTER_GRACE: Duration = Duration::from_secs(5);

/// The group, version and names of the `TrainingJob` custom resource, the pods' owner.
fn training_job_resource() -> ApiResource {
    ApiResource {
        group: "agentd.io".into(),
        version: "v1alpha1".into(),
        api_version: "agentd.io/v1alpha1".into(),
        kind: "TrainingJob".into(),
        plural: "trainingjobs".into(),
    }
}

/// `<job>-<type>-<index>`: the pod's hostname, stable across generations.
pub fn replica_host(job: &str, replica_type: ReplicaType, index: u32) -> String {
    format!("{job}-{}-{index}", replica_type.as_tf_key())
}

/// `<job>-<type>-<index>-g<generation>`: one name per replica and generation, so a restart's
/// pods never collide with the previous generation's while those terminate.
pub fn pod_name(job: &str, replica_type: ReplicaType, index: u32, generation: u32) -> String {
    format!("{}-g{generation}", replica_host(job, replica_type, index))
}

/// Runs replicas as pods through the Kubernetes API and reports what becomes of them.
///
/// Built with [`PodExecutor::new`] inside a Tokio runtime; its pod watch starts at once, and
/// [`PodExecutor::ready`] ends when the watch has listed every agentd pod, which `adopt`,
/// `stop_leftovers` and `discard_all_but` need (before it, `adopt` refuses and the other two
/// find nothing). Job names are taken as unique across namespaces, as the core keys jobs by
/// name alone.
pub struct PodExecutor {
    shared: Arc<Shared>,
    /// The pod watch, the `FailedMount` watch and the clock that times waiting pods.
    tasks: Vec<tokio::task::AbortHandle>,
}

/// How often waiting pods are checked against their time limits.
const STUCK_CHECK: Duration = Duration::from_secs(1);

struct Shared {
    client: kube::Client,
    cluster_domain: String,
    timeouts: PodTimeouts,
    reports: mpsc::UnboundedSender<ReplicaReport>,
    state: Mutex<State>,
    /// Bumped on every change of `State::pods`, for stops waiting until pods are gone.
    changed: watch::Sender<()>,
    /// True once the watch has listed every agentd pod.
    synced: watch::Sender<bool>,
    /// The pods' creates and deletes, a bounded number at a time.
    requests: crate::cluster::RequestTurns,
    /// Where the jobs' objects' uids are known without reading the objects, if anywhere.
    owners: std::sync::OnceLock<OwnerUids>,
}

#[derive(Default)]
struct State {
    /// Every agentd pod known to exist: seen by the watch, or created and not yet seen.
    pods: HashMap<PodRef, KnownPod>,
    /// The replicas whose fate is reported, by (job, generation, replica name).
    followed: HashMap<ReplicaKey, Progress>,
    /// The job's owner reference and Service, made once per job generation before its pods.
    prepared: HashMap<GenerationKey, Arc<OnceCell<Option<OwnerReference>>>>,
    /// Followed replicas whose pod waits for an image or volumes, timed.
    stuck: HashMap<ReplicaKey, Stuck>,
    /// The `FailedMount` warnings of each pod that had one lately, by pod uid.
    mount_failures: stuck::MountWarnings,
    /// The nodes lost, as the core last said: their kubelets will not confirm a stop.
    lost_nodes: BTreeSet<String>,
    /// Ended jobs whose ended pods a restart's recovery keeps (see `keep_ended_of`).
    ended_kept: BTreeSet<String>,
}

/// The uid of the object of a job (namespace, name), where it is known without reading the
/// object (the job store wrote or read it).
pub type OwnerUids = Arc<dyn Fn(&str, &str) -> Option<String> + Send + Sync>;

/// A gang generation: namespace, job, generation.
type GenerationKey = (String, String, u32);

/// A pod's namespace and name.
type PodRef = (String, String);
/// A replica: job, generation, replica name (`worker-0`).
type ReplicaKey = (String, u32, String);

#[derive(Debug, Clone)]
struct KnownPod {
    job: String,
    generation: u32,
    replica: String,
    /// The node it is bound to.
    node: String,
    /// Its uid, once the watch has seen it.
    uid: Option<String>,
    /// Whether the watch has seen it (a pod only created may not have reached it yet).
    seen: bool,
    phase: Option<String>,
    deleting: bool,
    /// Whether its volumes are mounted (its sandbox is ready): a mount warning that comes
    /// after is stale.
    mounted: bool,
    /// Once it has ended: what a replica that was running learns of its end. A leader that
    /// adopts the gang reports it, as the watch would have to the leader that created it.
    ended: Option<Vec<ReplicaEvent>>,
}

/// What has been reported of a followed replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Its pod was asked for; nothing reported yet.
    Created,
    /// `Started` reported.
    Started,
    /// Its end (`Exited` or `StartFailed`) reported: nothing more will be.
    Ended,
}

/// The replica a pod runs, from its labels; `None` for a pod without agentd's labels.
fn replica_of(pod: &WatchedPod) -> Option<(String, u32, String)> {
    let labels = pod.metadata.labels.as_ref()?;
    let job = labels.get(JOB_LABEL)?.clone();
    let generation = labels.get(GENERATION_LABEL)?.parse().ok()?;
    let replica_type = ReplicaType::from_key(labels.get(REPLICA_TYPE_LABEL)?)?;
    let index = labels.get(REPLICA_INDEX_LABEL)?.parse().ok()?;
    Some((job, generation, job::replica_name(replica_type, index)))
}

fn pod_ref(pod: &WatchedPod) -> PodRef {
    (
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

fn phase(pod: &WatchedPod) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

fn is_terminal(phase: Option<&str>) -> bool {
    matches!(phase, Some("Succeeded" | "Failed"))
}

impl PodExecutor {
    /// `client` serves single requests (with their time bounds); `watch_client` the
    /// long-lived watches (without a read bound). `cluster_domain` ends the replicas' DNS
    /// names (`cluster.cluster_domain`); `timeouts` bound how long a pod may wait for its
    /// image or volumes. Must be called inside a Tokio runtime.
    pub fn new(
        client: kube::Client,
        watch_client: &kube::Client,
        cluster_domain: String,
        timeouts: PodTimeouts,
        reports: mpsc::UnboundedSender<ReplicaReport>,
    ) -> Self {
        let shared = Arc::new(Shared {
            client,
            cluster_domain,
            timeouts,
            reports,
            state: Mutex::new(State::default()),
            changed: watch::channel(()).0,
            synced: watch::channel(false).0,
            requests: crate::cluster::RequestTurns::default(),
            owners: std::sync::OnceLock::new(),
        });
        let pods = tokio::spawn(follow(shared.clone(), Api::all(watch_client.clone())));
        let on_mount = shared.clone();
        let mounts = tokio::spawn(stuck::follow_mount_failures(
            Api::all(watch_client.clone()),
            move |warning| on_mount.mount_failed(warning),
        ));
        let on_tick = shared.clone();
        let clock = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(STUCK_CHECK);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                on_tick.expire_stuck(tokio::time::Instant::now());
            }
        });
        let tasks = vec![
            pods.abort_handle(),
            mounts.abort_handle(),
            clock.abort_handle(),
        ];
        Self { shared, tasks }
    }

    /// Takes the uids of the jobs' objects, for their pods' owner references, from `uids`
    /// (what the job store knows): a read of each job's object less per gang. A job it does
    /// not know is read.
    #[must_use]
    pub fn with_owners(self, uids: OwnerUids) -> Self {
        // Set once, before any launch; a second call changes nothing.
        let _ = self.shared.owners.set(uids);
        self
    }

    /// Whether the pod watch has listed every agentd pod.
    pub fn is_ready(&self) -> bool {
        *self.shared.synced.borrow()
    }

    /// Ends once the pod watch has listed every agentd pod, so that what exists is known.
    pub async fn ready(&self) {
        let mut synced = self.shared.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }
}

impl Drop for PodExecutor {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The pod watch: one `watcher` over every pod labelled `agentd.io/job`, in every namespace,
/// for as long as the executor exists (it backs off and resumes after errors).
async fn follow(shared: Arc<Shared>, api: Api<WatchedPod>) {
    let config = watcher::Config::default().labels(JOB_LABEL);
    let events = watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut relisted: Option<HashSet<PodRef>> = None;
    let mut said_failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(listed) = &mut relisted {
                    listed.insert(pod_ref(&pod));
                }
                shared.applied(&pod);
            }
            Ok(watcher::Event::InitDone) => {
                shared.relisted(&relisted.take().unwrap_or_default());
                shared.synced.send_replace(true);
            }
            Ok(watcher::Event::Apply(pod)) => shared.applied(&pod),
            Ok(watcher::Event::Delete(pod)) => shared.deleted(&pod),
            Err(e) => {
                if !said_failing {
                    tracing::warn!("watching agentd pods failed ({e}); retrying with backoff");
                    said_failing = true;
                }
                continue;
            }
        }
        said_failing = false;
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("not poisoned")
    }

    fn report(&self, (job, generation, replica): &ReplicaKey, events: Vec<ReplicaEvent>) {
        for event in events {
            let _ = self.reports.send(ReplicaReport {
                job: job.clone(),
                replica: replica.clone(),
                generation: *generation,
                event,
            });
        }
    }

    /// A pod was added or changed.
    fn applied(&self, pod: &WatchedPod) {
        let Some((job, generation, replica)) = replica_of(pod) else {
            return;
        };
        let key = (job.clone(), generation, replica.clone());
        {
            let mut state = self.lock();
            if superseded(&state, pod, &job, generation) {
                return;
            }
            state.pods.insert(
                pod_ref(pod),
                KnownPod {
                    job,
                    generation,
                    replica,
                    node: pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_name.clone())
                        .unwrap_or_default(),
                    uid: pod.metadata.uid.clone(),
                    seen: true,
                    phase: phase(pod).map(str::to_owned),
                    deleting: pod.metadata.deletion_timestamp.is_some(),
                    mounted: stuck::volumes_mounted(pod),
                    ended: is_terminal(phase(pod))
                        .then(|| observe(Progress::Started, pod, generation).1),
                },
            );
            if let Some(progress) = state.followed.get(&key).copied() {
                let (next, events) = observe(progress, pod, generation);
                settle(&mut state, &key, next);
                if next == Progress::Created {
                    let now = tokio::time::Instant::now();
                    let uid = pod.metadata.uid.clone();
                    let mount = uid.as_deref().and_then(|uid| {
                        state
                            .mount_failures
                            .recent(uid, now, self.timeouts.mount_window())
                    });
                    let waiting = stuck::waiting_on(pod, mount.map(|(message, _)| message));
                    let since = match (&waiting, mount) {
                        (
                            Some((
                                PlatformFailure::ImagePullFailed
                                | PlatformFailure::ContainerConfigFailed,
                                _,
                            )),
                            _,
                        ) => stuck::started(pod, k8s_openapi::jiff::Timestamp::now(), now),
                        (_, Some((_, first))) => first,
                        _ => now,
                    };
                    let at = Waiting {
                        pod: pod_ref(pod),
                        uid,
                        since,
                    };
                    if let Some(stuck) = wait(&mut state, &key, at, waiting) {
                        let message = stuck.waiting(&self.timeouts);
                        self.report(&key, vec![ReplicaEvent::Waiting { message }]);
                    }
                }
                self.report(&key, events);
            }
        }
        self.changed.send_replace(());
    }

    /// The kubelet could not mount a pod's volumes (it will keep trying).
    fn mount_failed(&self, warning: stuck::MountWarning) {
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        let pod = (warning.namespace.clone(), warning.name.clone());
        let uid = warning.uid.clone();
        if !state.mount_failures.seen(warning, now) {
            return;
        }
        let Some((message, first)) =
            state
                .mount_failures
                .recent(&uid, now, self.timeouts.mount_window())
        else {
            return;
        };
        let waiting = Some((
            PlatformFailure::VolumeMountFailed,
            format!("FailedMount: {message}"),
        ));
        // Only the pod the warning is about: a pod of the same name made later is another.
        let Some(known) = state
            .pods
            .get(&pod)
            .filter(|p| p.uid.as_deref() == Some(uid.as_str()) && !p.mounted)
        else {
            return;
        };
        let key = (known.job.clone(), known.generation, known.replica.clone());
        if state.followed.get(&key) != Some(&Progress::Created) {
            return;
        }
        // An image that cannot be pulled says more than a mount that has not happened.
        if state
            .stuck
            .get(&key)
            .is_some_and(|s| s.failure == PlatformFailure::ImagePullFailed)
        {
            return;
        }
        let at = Waiting {
            pod,
            uid: Some(uid),
            since: first,
        };
        if let Some(stuck) = wait(&mut state, &key, at, waiting) {
            let message = stuck.waiting(&self.timeouts);
            self.report(&key, vec![ReplicaEvent::Waiting { message }]);
        }
    }

    /// Ends the replicas whose pod has waited past its time. A pod whose volumes had no new
    /// warning lately no longer waits for them; warnings of pods no longer known are dropped.
    fn expire_stuck(&self, now: tokio::time::Instant) {
        let mut state = self.lock();
        let state = &mut *state;
        let window = self.timeouts.mount_window();
        let warnings = &state.mount_failures;
        state.stuck.retain(|_, s| {
            s.failure != PlatformFailure::VolumeMountFailed
                || s.uid
                    .as_deref()
                    .is_some_and(|uid| warnings.recent(uid, now, window).is_some())
        });
        let known: HashSet<&str> = state
            .pods
            .values()
            .filter_map(|p| p.uid.as_deref())
            .collect();
        state.mount_failures.prune(|uid| known.contains(uid), now);
        let expired: Vec<(ReplicaKey, Stuck)> = state
            .stuck
            .iter()
            .filter(|(_, s)| s.expired(&self.timeouts, now))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (key, stuck) in expired {
            settle(state, &key, Progress::Ended);
            let end = PlatformEnd {
                failure: stuck.failure,
                message: stuck.message(&self.timeouts),
                ran: false,
            };
            self.report(&key, vec![ReplicaEvent::Ended(end)]);
        }
    }

    /// A pod is gone.
    fn deleted(&self, pod: &WatchedPod) {
        let (namespace, name) = pod_ref(pod);
        {
            let mut state = self.lock();
            if let Some(uid) = pod.metadata.uid.as_deref() {
                state.mount_failures.forget(uid);
            }
            // The pod of an earlier job of this name: what is known under its name now may be
            // the new job's pod.
            if let Some((job, generation, _)) = replica_of(pod)
                && superseded(&state, pod, &job, generation)
            {
                let same = |known: &KnownPod| known.uid == pod.metadata.uid;
                if state
                    .pods
                    .get(&(namespace.clone(), name.clone()))
                    .is_some_and(same)
                {
                    state.pods.remove(&(namespace, name));
                }
                return;
            }
            state.pods.remove(&(namespace.clone(), name.clone()));
            if let Some((job, generation, replica)) = replica_of(pod) {
                let key = (job, generation, replica);
                if let Some(progress) = state.followed.get(&key).copied() {
                    let (next, events) = observe(progress, pod, generation);
                    let (next, more) = if next == Progress::Ended {
                        (next, Vec::new())
                    } else {
                        vanished(next, &namespace, &name)
                    };
                    settle(&mut state, &key, next);
                    self.report(&key, events.into_iter().chain(more).collect());
                }
            }
        }
        self.changed.send_replace(());
    }

    /// After a (re)list: pods the watch had seen that the list no longer has were deleted
    /// while it was not watching.
    fn relisted(&self, listed: &HashSet<PodRef>) {
        let gone: Vec<(PodRef, KnownPod)> = {
            let state = self.lock();
            state
                .pods
                .iter()
                .filter(|(r, p)| p.seen && !listed.contains(*r))
                .map(|(r, p)| (r.clone(), p.clone()))
                .collect()
        };
        for ((namespace, name), known) in gone {
            let mut state = self.lock();
            state.pods.remove(&(namespace.clone(), name.clone()));
            let key = (known.job, known.generation, known.replica);
            if let Some(progress) = state.followed.get(&key).copied() {
                let (next, events) = vanished(progress, &namespace, &name);
                settle(&mut state, &key, next);
                self.report(&key, events);
            }
        }
        self.changed.send_replace(());
    }

    /// The known pods that match.
    fn pods_where(&self, matches: impl Fn(&KnownPod) -> bool) -> Vec<PodRef> {
        self.lock()
            .pods
            .iter()
            .filter(|(_, p)| matches(p))
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Deletes pods with the given grace (seconds); a pod already gone is forgotten.
    async fn delete_pods(&self, pods: &[PodRef], grace_seconds: u32) {
        let params = DeleteParams {
            grace_period_seconds: Some(grace_seconds),
            ..DeleteParams::default()
        };
        let deletes = pods.iter().map(|(namespace, name)| {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let params = &params;
            async move {
                match self.requests.send(api.delete(name, params)).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {
                        self.lock().pods.remove(&(namespace.clone(), name.clone()));
                        self.changed.send_replace(());
                    }
                    Err(e) => {
                        tracing::warn!(namespace, pod = name, "cannot delete the pod: {e}");
                    }
                }
            }
        });
        futures::future::join_all(deletes).await;
    }

    /// Ends when none of `pods` exists any more, as the watch sees it.
    async fn gone(&self, pods: &[PodRef]) {
        let mut changed = self.changed.subscribe();
        loop {
            if !self.any_exists(pods) {
                return;
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    fn any_exists(&self, pods: &[PodRef]) -> bool {
        let state = self.lock();
        pods.iter().any(|p| state.pods.contains_key(p))
    }

    /// Deletes the pods of one gang generation with `grace`, and ends when they are gone;
    /// those still there after the grace (and [`FORCE_AFTER_GRACE`]) are deleted at once.
    /// Those on a lost node are deleted at once from the start: its kubelet will never confirm
    /// a graceful stop, and the gang's restart must not wait for it. Should the node come
    /// back, its kubelet finds the pod gone and kills what is left of it.
    /// Deletes the generation's pods (with `keep_ended`, only those that have not ended) and
    /// waits until they are gone.
    async fn stop_generation(&self, job: &str, generation: u32, grace: Duration, keep_ended: bool) {
        self.lock()
            .prepared
            .retain(|(_, j, g), _| !(j == job && *g == generation));
        // Each pod of the generation, and whether its node is lost.
        let pods: Vec<(PodRef, bool)> = {
            let state = self.lock();
            state
                .pods
                .iter()
                .filter(|(_, p)| p.job == job && p.generation == generation)
                .filter(|(_, p)| !(keep_ended && is_terminal(p.phase.as_deref())))
                .map(|(r, p)| (r.clone(), state.lost_nodes.contains(&p.node)))
                .collect()
        };
        if pods.is_empty() {
            return;
        }
        let (on_lost, graceful): (Vec<_>, Vec<_>) = pods.into_iter().partition(|(_, lost)| *lost);
        let on_lost: Vec<PodRef> = on_lost.into_iter().map(|(r, _)| r).collect();
        let graceful: Vec<PodRef> = graceful.into_iter().map(|(r, _)| r).collect();
        if !on_lost.is_empty() {
            tracing::warn!(
                job,
                generation,
                pods = on_lost.len(),
                "deleting the pods on lost nodes at once: their kubelets will not confirm a stop"
            );
        }
        let seconds = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
        futures::future::join(
            self.delete_pods(&on_lost, 0),
            self.delete_pods(&graceful, seconds),
        )
        .await;
        let pods: Vec<PodRef> = graceful.into_iter().chain(on_lost).collect();
        let deadline = tokio::time::Instant::now() + grace + FORCE_AFTER_GRACE;
        if tokio::time::timeout_at(deadline, self.gone(&pods))
            .await
            .is_ok()
        {
            return;
        }
        let left: Vec<PodRef> = {
            let state = self.lock();
            pods.into_iter()
                .filter(|p| state.pods.contains_key(p))
                .collect()
        };
        tracing::warn!(
            job,
            generation,
            pods = left.len(),
            "pods still exist after the stop's grace period; deleting them at once"
        );
        self.delete_pods(&left, 0).await;
        self.gone(&left).await;
    }

    /// Deletes the pods now, in the background; returns how many.
    fn delete_now(self: &Arc<Self>, pods: Vec<PodRef>) -> usize {
        let count = pods.len();
        if count > 0 {
            let shared = self.clone();
            tokio::spawn(async move { shared.delete_pods(&pods, 0).await });
        }
        count
    }

    /// The job's owner reference and headless Service, once per job generation: the
    /// replicas of a gang start together and need both only once.
    async fn prepare(
        &self,
        namespace: &str,
        job: &str,
        generation: u32,
    ) -> Result<Option<OwnerReference>, kube::Error> {
        let cell = self
            .lock()
            .prepared
            .entry((namespace.to_owned(), job.to_owned(), generation))
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let owner = self.owner(namespace, job).await?;
            let services: Api<Service> = Api::namespaced(self.client.clone(), namespace);
            let service = headless_service(namespace, job, owner.clone());
            let params = PostParams::default();
            let created =
                again_while_transient(|| self.requests.send(services.create(&params, &service)))
                    .await;
            match created {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e),
            }
            Ok(owner)
        })
        .await
        .cloned()
    }

    /// An owner reference to the job's `TrainingJob`; `None` when there is no such object.
    async fn owner(
        &self,
        namespace: &str,
        job: &str,
    ) -> Result<Option<OwnerReference>, kube::Error> {
        // What the job store knows, or else the object as it is.
        let mut uid = self.owners.get().and_then(|uids| uids(namespace, job));
        if uid.is_none() {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), namespace, &training_job_resource());
            let Some(object) =
                again_while_transient(|| self.requests.send(api.get_opt(job))).await?
            else {
                return Ok(None);
            };
            uid = object.metadata.uid;
        }
        let resource = training_job_resource();
        Ok(uid.map(|uid| OwnerReference {
            api_version: resource.api_version,
            kind: resource.kind,
            name: job.to_owned(),
            uid,
            controller: Some(true),
            // Setting it needs `update` on trainingjobs/finalizers, which the leader lacks.
            block_owner_deletion: None,
        }))
    }

    /// Creates one replica's pod; what becomes of it comes from the watch.
    async fn create(&self, spec: &LaunchSpec, launch: &PodLaunch) -> Result<(), ReplicaEvent> {
        let owner = self
            .prepare(&launch.namespace, &spec.job, spec.generation)
            .await
            .map_err(|e| start_failure("cannot prepare the job's Service", &e))?;
        let owner_uid = owner.as_ref().map(|o| o.uid.clone());
        let pod =
            replica_pod(spec, launch, owner).map_err(|message| ReplicaEvent::StartFailed {
                message,
                transient: false,
            })?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &launch.namespace);
        let read: Api<WatchedPod> = Api::namespaced(self.client.clone(), &launch.namespace);
        let created = || async {
            // As `Api::create`, but the answer, which the watch brings again, is not decoded.
            let body = serde_json::to_vec(&pod).map_err(kube::Error::SerdeError)?;
            let mut request = kube::core::Request::new(read.resource_url())
                .create(&PostParams::default(), body)
                .map_err(kube::Error::BuildRequest)?;
            request.extensions_mut().insert("create");
            self.client.request::<serde::de::IgnoredAny>(request).await
        };
        match again_while_transient(|| self.requests.send(created())).await {
            Ok(_) => {}
            // The pod's name carries its generation: one that exists is this launch's, made
            // by an earlier try whose answer was lost. It is followed from what it is now,
            // since the watch may have shown all of it before the replica was followed.
            Err(kube::Error::Api(s)) if s.code == 409 => match read.get(&name).await {
                // A pod of an earlier job of this name, kept when that job ended and not yet
                // gone with it: it goes first.
                Ok(existing) if foreign(&existing, owner_uid.as_deref()) => {
                    replace(&api, &name, &pod).await?;
                }
                Ok(existing) => self.applied(&existing),
                Err(e) => return Err(start_failure(&format!("cannot read pod {name}"), &e)),
            },
            Err(e) => return Err(start_failure(&format!("cannot create pod {name}"), &e)),
        }
        let mut state = self.lock();
        state
            .pods
            .entry((launch.namespace.clone(), name))
            .or_insert_with(|| KnownPod {
                job: spec.job.clone(),
                generation: spec.generation,
                replica: spec.replica.clone(),
                node: launch.node.clone(),
                uid: None,
                seen: false,
                phase: None,
                deleting: false,
                mounted: false,
                ended: None,
            });
        Ok(())
    }
}

/// Whether `pod` is of an earlier job with this job's name (a pod kept when that job ended):
/// the job's generation is prepared with an owner the pod does not name. Its events are not
/// the new job's replicas'.
fn superseded(state: &State, pod: &WatchedPod, job: &str, generation: u32) -> bool {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let owner = state
        .prepared
        .get(&(namespace, job.to_owned(), generation))
        .and_then(|cell| cell.get().cloned().flatten());
    owner.is_some_and(|o| foreign(pod, Some(&o.uid)))
}

/// Whether `pod` belongs to another job than the one whose owner uid is `owner_uid`.
fn foreign(pod: &WatchedPod, owner_uid: Option<&str>) -> bool {
    owner_uid.is_some_and(|uid| {
        !pod.metadata
            .owner_references
            .iter()
            .flatten()
            .any(|r| r.uid == uid)
    })
}

/// Deletes the pod `name` (at once), waits until it is gone, and creates `pod` in its place.
async fn replace(api: &Api<Pod>, name: &str, pod: &Pod) -> Result<(), ReplicaEvent> {
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    match api.delete(name, &now).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(start_failure(&format!("cannot delete pod {name}"), &e)),
    }
    for _ in 0..100 {
        match api.get_opt(name).await {
            Ok(None) => break,
            Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return Err(start_failure(&format!("cannot read pod {name}"), &e)),
        }
    }
    api.create(&PostParams::default(), pod)
        .await
        .map(drop)
        .map_err(|e| start_failure(&format!("cannot create pod {name}"), &e))
}

/// Forgets a replica that has ended; records its progress otherwise.
fn settle(state: &mut State, key: &ReplicaKey, progress: Progress) {
    if progress == Progress::Ended {
        state.followed.remove(key);
    } else {
        state.followed.insert(key.clone(), progress);
    }
    if progress != Progress::Created {
        state.stuck.remove(key);
    }
}

/// A pod that may be waiting, and since when it would be (its first mount warning, or now).
struct Waiting {
    pod: PodRef,
    uid: Option<String>,
    since: tokio::time::Instant,
}

/// Records what a replica's pod, not yet running, waits for (`None`: nothing that may never
/// come), timed from when it was first seen waiting for that. Returns the wait when it has
/// just begun (or now waits for something else), to be said.
fn wait<'a>(
    state: &'a mut State,
    key: &ReplicaKey,
    at: Waiting,
    waiting: Option<(PlatformFailure, String)>,
) -> Option<&'a Stuck> {
    let (namespace, name) = at.pod;
    let Some((failure, message)) = waiting else {
        state.stuck.remove(key);
        return None;
    };
    match state.stuck.get_mut(key) {
        Some(stuck) if stuck.failure == failure => {
            stuck.message = message;
            None
        }
        _ => {
            state.stuck.insert(
                key.clone(),
                Stuck {
                    failure,
                    since: at.since,
                    pod: format!("{namespace}/{name}"),
                    uid: at.uid,
                    message,
                },
            );
            state.stuck.get(key)
        }
    }
}

/// A failed request as a start failure: transient when the server was overloaded, failing or
/// slow (5xx, 429, 408) or could not be reached; permanent when it refused (403, 422, ...).
fn start_failure(what: &str, e: &kube::Error) -> ReplicaEvent {
    match e {
        kube::Error::Api(s) => ReplicaEvent::StartFailed {
            message: format!("{what}: {} ({} {})", s.message, s.code, s.reason),
            transient: transient(e),
        },
        other => ReplicaEvent::StartFailed {
            message: format!("{what}: {other}"),
            transient: true,
        },
    }
}

/// Whether a request failed for a reason of the moment: no answer (a broken connection, a
/// time-out), or an answer that says to come back (5xx, 429, 408).
fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429 || s.code == 408,
        _ => true,
    }
}

/// Tries to send a request; how many times while it fails for a reason of the moment.
const SEND_ATTEMPTS: u32 = 5;
/// The first step of the backoff between tries; it doubles, with jitter (at most 3 s in all).
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Sends a request again, up to [`SEND_ATTEMPTS`] times with the cluster's jittered backoff,
/// while it fails [`transient`]ly: a create or read made here is safe to send twice (a pod or
/// Service made by a try whose answer was lost answers the next with 409, which the caller
/// takes as made). A platform that drops one connection does not fail a gang's start.
async fn again_while_transient<T, F, Fut>(mut send: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut backoff = crate::cluster::backoff::Backoff::new(
        FIRST_RETRY_PAUSE,
        FIRST_RETRY_PAUSE * 2u32.pow(SEND_ATTEMPTS - 2),
    );
    for _ in 1..SEND_ATTEMPTS {
        match send().await {
            Err(e) if transient(&e) => {
                let pause = backoff.wait();
                tracing::debug!("a request failed ({e}); trying again in {pause:?}");
                tokio::time::sleep(pause).await;
            }
            answered => return answered,
        }
    }
    send().await
}

/// The next progress of a followed replica and what to report, given its pod as it is now.
fn observe(progress: Progress, pod: &WatchedPod, generation: u32) -> (Progress, Vec<ReplicaEvent>) {
    if progress == Progress::Ended {
        return (progress, Vec::new());
    }
    let started = ReplicaEvent::Started { pid: generation };
    let phase = phase(pod);
    if is_terminal(phase) {
        let events = match ending(pod, progress) {
            Ending::Ran(outcome) => {
                let exited = ReplicaEvent::Exited { outcome };
                if progress == Progress::Created {
                    vec![started, exited]
                } else {
                    vec![exited]
                }
            }
            Ending::NeverRan(message) => vec![ReplicaEvent::StartFailed {
                message,
                transient: true,
            }],
            Ending::Platform(end) => {
                if end.ran && progress == Progress::Created {
                    vec![started, ReplicaEvent::Ended(end)]
                } else {
                    vec![ReplicaEvent::Ended(end)]
                }
            }
        };
        return (Progress::Ended, events);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        let (namespace, name) = pod_ref(pod);
        return vanished(progress, &namespace, &name);
    }
    if phase == Some("Running") && progress == Progress::Created {
        return (Progress::Started, vec![started]);
    }
    (progress, Vec::new())
}

/// A replica whose pod is deleted (or being deleted) before it ended: evicted, its node lost,
/// or stopped. It ended without a verdict of its own, which the restart policy may retry.
fn vanished(progress: Progress, namespace: &str, name: &str) -> (Progress, Vec<ReplicaEvent>) {
    let events = match progress {
        Progress::Ended => Vec::new(),
        Progress::Created => vec![ReplicaEvent::StartFailed {
            message: format!("pod {namespace}/{name} was deleted before it ran"),
            transient: true,
        }],
        Progress::Started => vec![ReplicaEvent::Exited {
            outcome: ExitOutcome::default(),
        }],
    };
    (Progress::Ended, events)
}

enum Ending {
    Ran(ExitOutcome),
    /// The pod failed before its training container ran, for a reason of no known class.
    NeverRan(String),
    /// The node failed the pod (evicted it, refused it at admission).
    Platform(PlatformEnd),
}

/// How a pod in a terminal phase ended. A pod-level failure (`status.reason`: `Evicted`,
/// `OutOfnvidia.com/gpu`, `UnexpectedAdmissionError`, ...) is the node's doing, not the
/// program's: it ends with no code, which the restart policy may retry. Otherwise the training
/// container's terminated state gives the outcome a local process would: `OOMKilled` is an
/// OOM kill (SIGKILL), a signal is that signal, and the runtime's `128 + n` for a process
/// killed by signal `n` is signal `n`.
fn ending(pod: &WatchedPod, progress: Progress) -> Ending {
    let status = pod.status.as_ref();
    let container = training_container_status(pod);
    let terminated = container
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref());
    let failed = phase(pod) == Some("Failed");
    if failed && let Some(reason) = status.and_then(|s| s.reason.as_deref()) {
        let ran =
            progress == Progress::Started || terminated.is_some_and(|t| t.started_at.is_some());
        let (namespace, name) = pod_ref(pod);
        let message = status.and_then(|s| s.message.as_deref()).unwrap_or("");
        if let Some(failure) = PlatformFailure::of_pod_reason(reason) {
            return Ending::Platform(PlatformEnd {
                failure,
                message: format!("pod {namespace}/{name} failed: {reason}: {message}")
                    .trim_end_matches([' ', ':'])
                    .to_owned(),
                ran,
            });
        }
        if ran {
            return Ending::Ran(ExitOutcome::default());
        }
        return Ending::NeverRan(
            format!("pod {namespace}/{name} failed before it ran: {reason}: {message}")
                .trim_end_matches([' ', ':'])
                .to_owned(),
        );
    }
    let Some(terminated) = terminated else {
        return Ending::Ran(if failed {
            ExitOutcome::default()
        } else {
            ExitOutcome::exited(0)
        });
    };
    let outcome = if terminated.reason.as_deref() == Some("OOMKilled") {
        ExitOutcome::oom()
    } else if let Some(signal) = terminated.signal.filter(|s| *s > 0) {
        ExitOutcome::signalled(signal)
    } else if (129..=192).contains(&terminated.exit_code) {
        ExitOutcome::signalled(terminated.exit_code - 128)
    } else {
        ExitOutcome::exited(terminated.exit_code)
    };
    // A failed pod is not a success, whatever its training container said (a sidecar or
    // the kubelet failed it).
    if failed && outcome.effective_code() == Some(0) {
        return Ending::Ran(ExitOutcome::default());
    }
    Ending::Ran(outcome)
}

/// The status of the container that runs the training code: the one named `tensorflow`, or
/// the only one.
fn training_container_status(pod: &WatchedPod) -> Option<&ContainerStatus> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses
        .iter()
        .find(|c| c.name == TRAINING_CONTAINER)
        .or(match statuses.as_slice() {
            [only] => Some(only),
            _ => None,
        })
}

/// The job's headless Service: replicas resolve `<host>.<job>.<namespace>.svc.<domain>`
/// through it, before they are ready.
fn headless_service(namespace: &str, job: &str, owner: Option<OwnerReference>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(job.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(JOB_LABEL.to_owned(), job.to_owned())].into()),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some([(JOB_LABEL.to_owned(), job.to_owned())].into()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// One replica's pod: its group's template, bound to the chosen node, named and labelled for
/// its replica and generation, with the launch's environment (`TF_CONFIG`) in the training
/// container. Everything else of the template is kept.
fn replica_pod(
    spec: &LaunchSpec,
    launch: &PodLaunch,
    owner: Option<OwnerReference>,
) -> Result<Pod, String> {
    let job = &spec.job;
    let (t, index, generation) = (launch.replica_type, launch.index, spec.generation);
    let mut metadata = launch.template.metadata.clone().unwrap_or_default();
    let mut pod_spec: PodSpec = launch
        .template
        .spec
        .clone()
        .ok_or_else(|| format!("the pod template of replica {} has no spec", spec.replica))?;
    metadata.name = Some(pod_name(job, t, index, generation));
    metadata.generate_name = None;
    metadata.namespace = Some(launch.namespace.clone());
    let labels = metadata.labels.get_or_insert_with(Default::default);
    labels.insert(JOB_LABEL.to_owned(), job.clone());
    labels.insert(REPLICA_TYPE_LABEL.to_owned(), t.as_tf_key().to_owned());
    labels.insert(REPLICA_INDEX_LABEL.to_owned(), index.to_string());
    labels.insert(GENERATION_LABEL.to_owned(), generation.to_string());
    metadata.owner_references = owner.map(|o| vec![o]);

    pod_spec.node_name = Some(launch.node.clone());
    pod_spec.hostname = Some(replica_host(job, t, index));
    pod_spec.subdomain = Some(job.clone());
    pod_spec.restart_policy = Some("Never".to_owned());

    let training = pod_spec
        .containers
        .iter()
        .position(|c| c.name == TRAINING_CONTAINER)
        .or((pod_spec.containers.len() == 1).then_some(0))
        .ok_or_else(|| {
            format!(
                "the pod template of replica {} has no container named {TRAINING_CONTAINER} \
                 and more than one container: name the training container {TRAINING_CONTAINER}",
                spec.replica
            )
        })?;
    let container = &mut pod_spec.containers[training];
    // agentd's variables are set over the template's of the same name (as in standalone mode);
    // the template's own stay as written: the cluster resolves `valueFrom` and expands
    // `$(VAR)`. `CUDA_VISIBLE_DEVICES` is never passed on: the device plugin decides which GPUs
    // a container sees.
    let env = container.env.get_or_insert_with(Vec::new);
    for name in AGENTD_VARIABLES {
        let Some(value) = spec.env.get(name) else {
            continue;
        };
        let var = EnvVar {
            name: name.to_owned(),
            value: Some(value.clone()),
            value_from: None,
        };
        match env.iter_mut().find(|e| e.name == name) {
            Some(existing) => *existing = var,
            None => env.push(var),
        }
    }
    let ports = container.ports.get_or_insert_with(Vec::new);
    if !ports
        .iter()
        .any(|p| p.name.as_deref() == Some(TFJOB_PORT_NAME))
    {
        ports.push(ContainerPort {
            name: Some(TFJOB_PORT_NAME.to_owned()),
            container_port: i32::from(CLUSTER_PORT),
            ..ContainerPort::default()
        });
    }
    if launch.gpus > 0 {
        let limits = container
            .resources
            .get_or_insert_with(Default::default)
            .limits
            .get_or_insert_with(Default::default);
        limits
            .entry(GPU_RESOURCE.to_owned())
            .or_insert_with(|| Quantity(launch.gpus.to_string()));
    }
    Ok(Pod {
        metadata,
        spec: Some(pod_spec),
        status: None,
    })
}

/// Pods created and not yet running beyond which the leader takes in no new submission.
const MAX_STARTING_PODS: u32 = 10_000;

impl Executor for PodExecutor {
    fn addresses(&self, job: &TrainingJob) -> Result<ClusterHosts, String> {
        Ok(ClusterHosts::cluster(
            job,
            &self.shared.cluster_domain,
            CLUSTER_PORT,
        ))
    }

    fn start(&self, spec: LaunchSpec) {
        let key = (spec.job.clone(), spec.generation, spec.replica.clone());
        let Some(launch) = spec.pod.clone() else {
            self.shared.report(
                &key,
                vec![ReplicaEvent::StartFailed {
                    message: format!(
                        "replica {} of job {} has no node to run on: a launch in cluster mode \
                         needs its placement",
                        spec.replica, spec.job
                    ),
                    transient: false,
                }],
            );
            return;
        };
        // Followed before the pod exists, so that no event of it is missed.
        self.shared
            .lock()
            .followed
            .insert(key.clone(), Progress::Created);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if let Err(failure) = shared.create(&spec, &launch).await {
                let mut state = shared.lock();
                if state.followed.remove(&key).is_some() {
                    shared.report(&key, vec![failure]);
                }
            }
        });
    }

    fn stop(
        &self,
        job: &str,
        generation: u32,
        _pids: Vec<u32>,
        grace: Duration,
        keep_ended: bool,
    ) -> Stopping {
        let shared = self.shared.clone();
        let job = job.to_owned();
        Box::pin(async move {
            shared
                .stop_generation(&job, generation, grace, keep_ended)
                .await;
        })
    }

    fn kill_stray(&self, job: &str, replica: &str, pid: u32) {
        let pods = self
            .shared
            .pods_where(|p| p.job == job && p.replica == replica && p.generation == pid);
        self.shared.delete_now(pods);
    }

    fn replicas_outlive_agent(&self) -> bool {
        true
    }

    /// A pod counts as starting until it runs, which takes its kubelet seconds (the sandbox,
    /// the image) whatever the leader does: a bound as small as a machine's would hold every
    /// submission in the cluster behind one gang's kubelets. This one bounds only what the
    /// leader keeps in flight.
    fn max_starting(&self) -> u32 {
        MAX_STARTING_PODS
    }

    fn adopt(
        &self,
        job: &str,
        generation: u32,
        running: &[StoredReplica],
    ) -> Result<usize, String> {
        if !*self.shared.synced.borrow() {
            return Err("the agentd pods have not been listed yet".to_owned());
        }
        let mut state = self.shared.lock();
        // The replicas whose pod ended while no agent followed it, with how: the pod says,
        // so the gang is adopted all the same, and what ended is reported as ended.
        let mut ended = Vec::new();
        for r in running {
            let pod = state
                .pods
                .iter()
                .find(|(_, p)| p.job == job && p.generation == generation && p.replica == r.name);
            match pod {
                None => {
                    return Err(format!(
                        "replica {} has no pod of generation {generation}",
                        r.name
                    ));
                }
                Some(((namespace, name), p)) if p.deleting => {
                    return Err(format!(
                        "replica {}: pod {namespace}/{name} is being deleted",
                        r.name
                    ));
                }
                Some((_, p)) => {
                    if let Some(events) = &p.ended {
                        ended.push(((job.to_owned(), generation, r.name.clone()), events.clone()));
                    }
                }
            }
        }
        for r in running {
            let key = (job.to_owned(), generation, r.name.clone());
            if !ended.iter().any(|(k, _)| *k == key) {
                state.followed.insert(key, Progress::Started);
            }
        }
        drop(state);
        for (key, events) in ended {
            self.shared.report(&key, events);
        }
        Ok(running.len())
    }

    fn stop_leftovers(
        &self,
        job: &str,
        _generation: Option<u32>,
        _replicas: &[StoredReplica],
    ) -> usize {
        // Every generation of a gang that is not adopted goes: none of its pods is wanted,
        // but the ended pods of an ended job that keeps them.
        let keep_ended = {
            let mut state = self.shared.lock();
            state.prepared.retain(|(_, j, _), _| j != job);
            state.ended_kept.contains(job)
        };
        let pods = self
            .shared
            .pods_where(|p| p.job == job && !(keep_ended && is_terminal(p.phase.as_deref())));
        self.shared.delete_now(pods)
    }

    fn nodes_lost(&self, nodes: &BTreeSet<String>) {
        self.shared.lock().lost_nodes.clone_from(nodes);
    }

    fn forget_job(&self, job: &str) {
        let pods = self.shared.pods_where(|p| p.job == job);
        self.shared.delete_now(pods);
    }

    fn keep_ended_of(&self, job: &str) {
        self.shared.lock().ended_kept.insert(job.to_owned());
    }

    fn discard_all_but(&self, keep: &BTreeSet<String>) {
        let ended_kept = {
            let mut state = self.shared.lock();
            state.prepared.retain(|(_, job, _), _| keep.contains(job));
            std::mem::take(&mut state.ended_kept)
        };
        let kept = |p: &KnownPod| {
            keep.contains(&p.job)
                || (ended_kept.contains(&p.job) && is_terminal(p.phase.as_deref()))
        };
        let pods = self.shared.pods_where(|p| !kept(p));
        let count = self.shared.delete_now(pods);
        if count > 0 {
            tracing::warn!(
                count,
                "deleting agentd pods of jobs that are no longer kept"
            );
        }
    }
}

#[cfg(test)]
mod tests;
