//! The job store of cluster mode: every job is an `agentd.io/v1alpha1` `TrainingJob` object,
//! so that whichever agent leads next rebuilds from the cluster, not from a disk it cannot see.
//! Events and inventory samples stay in the node's own SQLite database ([`Store`]): they are
//! the node's history, not the job's definition.
//!
//! An object is created from its manifest the first time the core writes a job the cluster does
//! not have (a Kubeflow `TFJob` becomes a `TrainingJob` with the same spec and the annotation
//! [`SOURCE_KIND_ANNOTATION`]); after that only its status is written, through the status
//! subresource, carrying the resourceVersion last read or written. A write that finds the
//! object changed is checked: if the status on the server is still the one this store wrote
//! (someone edited labels, say), the write is repeated on the new version; if another writer
//! changed the status (a new leader), the batch fails with [`StoreError::KubeConflict`] and
//! nothing is overwritten. That is the fencing of a deposed leader.
//!
//! The core calls the store on its own thread, inside `Handle::block_on`, where blocking on
//! another future would panic. Each request therefore runs as a task on the runtime and the
//! core's thread waits for it on a channel, for at most [`REQUEST_BOUND`].
//!
//! It must not decide anything about a job: what to write is the core's; this module only
//! maps it to objects.

mod kubeflow;
pub mod signing;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use agentd_api::jobs::{JobStatus, Owner};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{Event, JobStore, JobWrite, NewEvent, Store, StoreError, StoredJob};
use crate::cluster::election::Leadership;
use crate::job;
use signing::{SIGNATURE_ANNOTATION, SubmitterKey, SubmitterKeys};

/// The submitter of a job submitted through an agent: its [`Owner`] as JSON.
pub const OWNER_ANNOTATION: &str = "agentd.io/owner";

/// The node whose agent took the submission.
pub const SUBMITTED_ON_ANNOTATION: &str = "agentd.io/submitted-on";

/// The owner name of a job applied with `kubectl` (or any other Kubernetes client) is this
/// prefix and the field manager that created it. A Unix user name cannot hold a `:`, so no
/// local user owns such a job: admins cancel it with `agentctl`, anyone else with
/// `kubectl delete`, as Kubernetes RBAC allows.
pub const KUBERNETES_OWNER_PREFIX: &str = "kubernetes:";

/// The uid and gid recorded for a Kubernetes submitter (`nobody`).
const NOBODY: u32 = 65534;

/// Where a job goes when its manifest names no namespace, as `kubectl` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Set on a `TrainingJob` made from a Kubeflow `TFJob`: the kind it was submitted as.
pub const SOURCE_KIND_ANNOTATION: &str = "agentd.io/source-kind";

/// The longest the core's thread waits for one API request.
pub const REQUEST_BOUND: Duration = Duration::from_secs(10);

/// Status writes of one turn in flight at once: a turn that places 300 gangs writes their
/// placements in a few round trips rather than 300 (each write is small; the API server's
/// own limits, and the leader's, hold the rest).
const WRITERS: usize = 16;

/// Objects per list page: a leader with 10,000 jobs reads them in 20 requests.
const LIST_PAGE: u32 = 500;

/// The group, version and names of the `TrainingJob` custom resource.
pub fn training_job_resource() -> ApiResource {
    ApiResource {
        group: "agentd.io".into(),
        version: "v1alpha1".into(),
        api_version: "agentd.io/v1alpha1".into(),
        kind: "TrainingJob".into(),
        plural: "trainingjobs".into(),
    }
}

/// What the store knows of one object: where it is and the version it last saw.
#[derive(Debug, Clone)]
struct Known {
    namespace: String,
    uid: Option<String>,
    resource_version: String,
    /// The status this store last wrote (or read at start-up), to tell a change by someone
    /// else from an edit that left the status alone.
    written: Option<JobStatus>,
    /// The statuses sent since the last confirmed write without a definite answer (a
    /// timeout, a connection that broke after the request went out): any of them may have
    /// been written. The latest [`UNCONFIRMED_KEPT`], each once.
    unconfirmed: Vec<JobStatus>,
    /// The GPUs the gang asks for, shown by `kubectl get trainingjobs`.
    gpus: Option<u32>,
    /// Deleted by someone else (`kubectl delete trainingjob`): not written again, and not
    /// created again, until the core forgets the job.
    gone: bool,
}

impl Known {
    fn from_object(object: &DynamicObject) -> Self {
        Self {
            namespace: object
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            uid: object.metadata.uid.clone(),
            resource_version: object.metadata.resource_version.clone().unwrap_or_default(),
            written: agentd_status(object).and_then(|s| serde_json::from_value(s.clone()).ok()),
            unconfirmed: Vec::new(),
            gpus: None,
            gone: false,
        }
    }

    /// Whether `status`, found on the server, is one this store wrote (or nobody's yet).
    fn wrote(&self, status: Option<&JobStatus>) -> bool {
        match status {
            None => true,
            Some(s) => self.written.as_ref() == Some(s) || self.unconfirmed.contains(s),
        }
    }

    /// Remembers a status whose write may or may not have landed.
    fn sent_unanswered(&mut self, status: Option<&JobStatus>) {
        let Some(status) = status else { return };
        if !self.unconfirmed.contains(status) {
            if self.unconfirmed.len() == UNCONFIRMED_KEPT {
                self.unconfirmed.remove(0);
            }
            self.unconfirmed.push(status.clone());
        }
    }
}

/// How many unanswered statuses of one job a store remembers (see [`Known::unconfirmed`]): a
/// job's status changes little while its writes go unanswered, so a few cover an outage.
const UNCONFIRMED_KEPT: usize = 16;

/// Whether a request that failed this way may still have been carried out: anything but an
/// answer from the API server (a connection refused before anything was sent is taken as
/// possibly sent too; treating a write that never left as unconfirmed costs nothing).
fn outcome_unknown(e: &kube::Error) -> bool {
    !matches!(e, kube::Error::Api(_))
}

/// What of a job's status is written to its object as soon as it changes: the state and why,
/// the generation and where its replicas are placed, restarts, the job's times, its queue and
/// priority, and, once the job has finished, whether replicas are still being ended. Replica
/// progress within a state (one pod of eight running, one worker done while the others work)
/// is not: the leader keeps it (`agentctl job` on the leader shows it) and it reaches the
/// object with the job's next milestone, so that a gang costs the API server a few status
/// writes rather than one per pod event. A new leader rebuilds replica progress from the pods.
#[derive(Debug, PartialEq)]
struct Milestone<'a> {
    state: agentd_api::jobs::JobState,
    reason: &'a str,
    message: &'a str,
    generation: u32,
    restarts: u32,
    queue: &'a str,
    priority: i32,
    times: (Option<f64>, Option<f64>),
    placement: Vec<(&'a str, Option<&'a str>)>,
    settling: bool,
}

impl<'a> Milestone<'a> {
    fn of(status: &'a JobStatus) -> Self {
        use agentd_api::jobs::ReplicaState;
        Self {
            state: status.state,
            reason: &status.reason,
            message: &status.message,
            generation: status.generation,
            restarts: status.restarts,
            queue: &status.queue,
            priority: status.priority,
            times: (status.started_at, status.finished_at),
            placement: status
                .replicas
                .iter()
                .map(|r| (r.name.as_str(), r.node.as_deref()))
                .collect(),
            settling: status.state.is_finished()
                && status
                    .replicas
                    .iter()
                    .any(|r| r.state == ReplicaState::Running),
        }
    }
}

/// Objects without an agentd status that the leader is admitting (submitted on another node,
/// or with `kubectl apply`), by job name: the store's first write of such a job goes onto the
/// object as it was read, instead of creating one.
#[derive(Debug, Clone, Default)]
pub struct PendingObjects(Arc<Mutex<BTreeMap<String, DynamicObject>>>);

impl PendingObjects {
    pub fn insert(&self, name: String, object: DynamicObject) {
        self.lock().insert(name, object);
    }

    pub fn remove(&self, name: &str) -> Option<DynamicObject> {
        self.lock().remove(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DynamicObject>> {
        // A map of plain values is whole even if a holder panicked.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a store knows of each job's object, shared with the pod executor: the owner reference
/// of a job's pods names the object's uid, which the store has read or written already.
#[derive(Debug, Clone, Default)]
pub struct KnownObjects(Arc<Mutex<BTreeMap<String, Known>>>);

impl KnownObjects {
    /// The uid of the object of job `name` in `namespace`, if the store knows it (and nobody
    /// else deleted it).
    pub fn uid(&self, namespace: &str, name: &str) -> Option<String> {
        let known = self.lock();
        let object = known.get(name)?;
        if object.gone || object.namespace != namespace {
            return None;
        }
        object.uid.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Known>> {
        // Plain values, whole even if a holder panicked.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Jobs as `TrainingJob` objects, events and inventory samples in the local database.
pub struct KubeStore {
    objects: Objects,
    local: Store,
}

/// The store's side of the API server: what it knows of each object, and how it writes them.
/// Shared by the threads that write one turn's objects at once.
struct Objects {
    client: kube::Client,
    runtime: Handle,
    bound: Duration,
    /// By job name (the core's key), every object this store has read or written.
    known: KnownObjects,
    /// The election's view, when jobs may be written only while this agent leads.
    fence: Option<tokio::sync::watch::Receiver<Leadership>>,
    /// Objects being admitted, which the first write of their job finds.
    pending: PendingObjects,
    /// The key the submitters of the objects this store makes are signed with.
    keys: Option<Arc<SubmitterKeys>>,
}

impl KubeStore {
    /// A store writing jobs through `client`, running its requests on `runtime` (which must be
    /// multi-threaded: the calling thread waits while a worker runs the request), and keeping
    /// events and samples in `local`.
    pub fn new(client: kube::Client, runtime: Handle, local: Store) -> Result<Self, StoreError> {
        if runtime.runtime_flavor() == RuntimeFlavor::CurrentThread {
            return Err(StoreError::SingleThreadedRuntime);
        }
        Ok(Self {
            objects: Objects {
                client,
                runtime,
                bound: REQUEST_BOUND,
                known: KnownObjects::default(),
                fence: None,
                pending: PendingObjects::default(),
                keys: None,
            },
            local,
        })
    }

    /// Writes jobs only while `leadership` says this agent leads, and its term has not run out
    /// (`Leadership::leads`): a leader that could not renew in time stops writing at once,
    /// even before its core hears that it lost, and writes nothing as it stops.
    #[must_use]
    pub fn fenced_by(mut self, leadership: tokio::sync::watch::Receiver<Leadership>) -> Self {
        self.objects.fence = Some(leadership);
        self
    }

    /// Writes a job being admitted onto the object `pending` holds for it.
    #[must_use]
    pub fn admitting(mut self, pending: PendingObjects) -> Self {
        self.objects.pending = pending;
        self
    }

    /// Signs the submitters of the objects it makes with the key of `keys` (made if there is
    /// none: only a leader writes jobs), and believes only owners signed with it.
    #[must_use]
    pub fn signing(mut self, keys: Arc<SubmitterKeys>) -> Self {
        self.objects.keys = Some(keys);
        self
    }

    /// What the store knows of the jobs' objects, as it learns it.
    pub fn known_objects(&self) -> KnownObjects {
        self.objects.known.clone()
    }

    /// Changes how long one request may take (tests, slow API servers).
    #[must_use]
    pub fn with_request_bound(mut self, bound: Duration) -> Self {
        self.objects.bound = bound;
        self
    }
}

impl Objects {
    /// What the store knows of each object.
    fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Known>> {
        self.known.lock()
    }

    /// The signing key, read (or made) on first use.
    fn key(&self) -> Result<Option<SubmitterKey>, StoreError> {
        const API: &str = "get secrets";
        let Some(keys) = self.keys.clone() else {
            return Ok(None);
        };
        if let Some(key) = keys.cached() {
            return Ok(Some(key));
        }
        self.call(API, signing::KEY_SECRET, async move {
            Ok::<_, kube::Error>(keys.load(true).await)
        })?
        .unwrap_or_else(|e| Err(e.to_string()))
        .map_err(|message| StoreError::Kube {
            api: API,
            object: signing::KEY_SECRET.to_owned(),
            message,
        })
    }

    fn check_fence(&self) -> Result<(), StoreError> {
        match &self.fence {
            Some(leadership) if !leadership.borrow().leads(std::time::Instant::now()) => {
                Err(StoreError::NotLeading)
            }
            _ => Ok(()),
        }
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &training_job_resource())
    }

    /// Runs `request` on the runtime and waits for it, at most the bound. The outer error is
    /// the store's (no answer); the inner one is the API server's, for the caller to read.
    fn call<T, F>(
        &self,
        api: &'static str,
        object: &str,
        request: F,
    ) -> Result<Result<T, kube::Error>, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, kube::Error>> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let task = self.runtime.spawn(async move {
            let _ = tx.send(request.await);
        });
        match rx.recv_timeout(self.bound) {
            Ok(answer) => Ok(answer),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                task.abort();
                Err(StoreError::KubeTimeout {
                    api,
                    object: object.to_owned(),
                    after: self.bound,
                })
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(StoreError::Kube {
                api,
                object: object.to_owned(),
                message: "the request was dropped: the agent's runtime is shutting down".into(),
            }),
        }
    }

    /// Every `TrainingJob` in the cluster, oldest first, under one request bound.
    fn list_all(&self) -> Result<Vec<DynamicObject>, StoreError> {
        const API: &str = "list trainingjobs";
        self.call(
            API,
            "(all namespaces)",
            list_training_jobs(self.client.clone(), None),
        )?
        .map_err(|e| api_error(API, "(all namespaces)", &e))
    }

    fn get(&self, name: &str, namespace: &str) -> Result<Option<DynamicObject>, StoreError> {
        let api = self.api(namespace);
        let owned = name.to_owned();
        let object = format!("{namespace}/{name}");
        self.call("get trainingjobs", &object, async move {
            api.get_opt(&owned).await
        })?
        .map_err(|e| api_error("get trainingjobs", &object, &e))
    }

    /// Writes these jobs (each named once), [`WRITERS`] at a time; the first error in their
    /// order, once every write has had its answer.
    fn write_all(&self, writes: &[JobWrite]) -> Result<(), StoreError> {
        let write = |write: &JobWrite| match write {
            JobWrite::Upsert {
                name,
                manifest,
                status,
                ..
            } => self.upsert(name, manifest, status),
            JobWrite::Delete { name } => self.delete(name),
        };
        if writes.len() < 2 {
            return writes.iter().try_for_each(write);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Mutex<Option<Result<(), StoreError>>>> =
            writes.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..writes.len().min(WRITERS) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = writes.get(i) else {
                            break;
                        };
                        let result = write(job);
                        *results[i].lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
                    }
                });
            }
        });
        results.into_iter().try_for_each(|r| {
            r.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .unwrap_or(Ok(()))
        })
    }

    fn upsert(&self, name: &str, manifest: &str, status: &str) -> Result<(), StoreError> {
        let status: Value = serde_json::from_str(status).map_err(|e| StoreError::Kube {
            api: "update trainingjobs/status",
            object: name.to_owned(),
            message: format!("the status to write is not JSON: {e}"),
        })?;
        let parsed = serde_json::from_value::<JobStatus>(status.clone()).ok();
        let known = self.known().get(name).cloned();
        let owner = parsed.as_ref().and_then(|s| s.owner.as_ref());
        let (mut known, made) = match known {
            Some(known) if known.gone => return Ok(()),
            Some(known) => (known, false),
            None => match self.pending.remove(name) {
                // The object being admitted, if this is its job: a job of the same name
                // submitted here meanwhile is another, and must not take that object over.
                Some(object)
                    if agentd_status(&object).is_none()
                        && holds(&object, manifest, owner, self.key()?.as_ref()) =>
                {
                    (Known::from_object(&object), false)
                }
                other => {
                    if let Some(object) = other {
                        self.pending.insert(name.to_owned(), object);
                    }
                    (self.create(name, manifest, parsed.as_ref())?, true)
                }
            },
        };
        if known.gpus.is_none() {
            known.gpus = job::parse(manifest.as_bytes())
                .ok()
                .map(|j| requested_gpus(&j));
        }
        if known.unconfirmed.is_empty()
            && let (Some(written), Some(now)) = (&known.written, &parsed)
            && Milestone::of(written) == Milestone::of(now)
        {
            // Only replica progress changed: it goes with the job's next milestone.
            self.known().insert(name.to_owned(), known);
            return Ok(());
        }
        let mut body = status;
        if let Some(fields) = body.as_object_mut() {
            if let Some(gpus) = known.gpus {
                fields.insert("gpus".into(), json!(gpus));
            }
            if let Some(parsed) = &parsed {
                fields.extend(kubeflow::kubeflow_fields(parsed));
            }
        }
        let result = self.write_status(name, &mut known, &body, parsed);
        if result.is_err() && known.written.is_none() && known.unconfirmed.is_empty() {
            // The job's first status did not land, so the turn that made the job is undone:
            // an object created for it must not stay behind for admission to run later.
            if made && let Err(e) = self.delete_object(name, &known) {
                tracing::warn!(
                    job = name,
                    "the job was not taken in, but its TrainingJob stays: {e}"
                );
            }
            return result;
        }
        self.known().insert(name.to_owned(), known);
        result
    }

    /// Creates the object for a job the cluster does not have yet. One that exists already
    /// (submitted on another node, or with `kubectl apply`) is taken over if no agent has
    /// written its status; otherwise another leader runs it.
    fn create(
        &self,
        name: &str,
        manifest: &str,
        status: Option<&JobStatus>,
    ) -> Result<Known, StoreError> {
        const API: &str = "create trainingjobs";
        let (namespace, mut object, gpus) =
            object_from_manifest(manifest).map_err(|e| StoreError::Kube {
                api: API,
                object: name.to_owned(),
                message: format!(
                    "the job's manifest does not parse, so no TrainingJob can be made of it: {e}"
                ),
            })?;
        // Unsigned, the owner is still the status's once it is written; only an object left
        // without one (a leader gone between the two writes) is then taken for its client's.
        let key = self.key().unwrap_or_else(|e| {
            tracing::warn!(
                job = name,
                "the job's submitter is recorded unsigned: {e} (apply packaging/kubernetes/20-rbac.yaml)"
            );
            None
        });
        if let Some(owner) = status.and_then(|s| s.owner.as_ref()) {
            sign_submitter(&mut object, owner, None, key.as_ref());
        }
        let at = format!("{namespace}/{name}");
        let api = self.api(&namespace);
        let created = self.call(API, &at, async move {
            api.create(&PostParams::default(), &object).await
        })?;
        let known = match created {
            Ok(created) => Known::from_object(&created),
            Err(e) if api_code(&e) == Some(409) => {
                let existing = self
                    .get(name, &namespace)?
                    .ok_or_else(|| StoreError::Kube {
                        api: API,
                        object: at.clone(),
                        message: "it exists and was deleted at once; try again".into(),
                    })?;
                let known = Known::from_object(&existing);
                if known.written.is_some() {
                    return Err(StoreError::KubeConflict {
                        api: API,
                        object: at,
                        resource_version: known.resource_version,
                    });
                }
                // Without a status it is either this job's own object, made by a write whose
                // answer was lost, or another job waiting for admission under the same name.
                let owner = status.and_then(|s| s.owner.as_ref());
                if !holds(&existing, manifest, owner, key.as_ref()) {
                    return Err(StoreError::Kube {
                        api: API,
                        object: at,
                        message: "a TrainingJob of this name, another job, is waiting to be \
                                  admitted (applied with kubectl or submitted on another node); \
                                  choose another name"
                            .into(),
                    });
                }
                known
            }
            Err(e) => return Err(api_error(API, &at, &e)),
        };
        Ok(Known {
            gpus: Some(gpus),
            ..known
        })
    }

    /// Writes `status` on the version `known` last saw; on a conflict, once more on the current
    /// version if the status there is still this store's.
    fn write_status(
        &self,
        name: &str,
        known: &mut Known,
        status: &Value,
        parsed: Option<JobStatus>,
    ) -> Result<(), StoreError> {
        const API: &str = "update trainingjobs/status";
        let at = format!("{}/{name}", known.namespace);
        for attempt in 0..2 {
            let object: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "agentd.io/v1alpha1",
                "kind": "TrainingJob",
                "metadata": {
                    "name": name,
                    "namespace": known.namespace,
                    "resourceVersion": known.resource_version,
                },
                "status": status,
            }))
            .map_err(|e| StoreError::Kube {
                api: API,
                object: at.clone(),
                message: e.to_string(),
            })?;
            let api = self.api(&known.namespace);
            let owned = name.to_owned();
            let written = self.call(API, &at, async move {
                api.replace_status(&owned, &PostParams::default(), &object)
                    .await
            });
            let written = match written {
                Ok(written) => written,
                Err(timeout) => {
                    known.sent_unanswered(parsed.as_ref());
                    return Err(timeout);
                }
            };
            match written {
                Ok(object) => {
                    known.resource_version = object.metadata.resource_version.unwrap_or_default();
                    known.written = parsed;
                    known.unconfirmed.clear();
                    return Ok(());
                }
                Err(e) if api_code(&e) == Some(404) && known.written.is_none() => {
                    // Deleted before its job was ever written (a cancel on another node):
                    // the job must not be taken in.
                    known.gone = true;
                    return Err(StoreError::Kube {
                        api: API,
                        object: at,
                        message: "the TrainingJob was deleted before its first status was written"
                            .into(),
                    });
                }
                Err(e) if api_code(&e) == Some(404) => {
                    tracing::warn!(
                        job = name,
                        namespace = known.namespace,
                        "TrainingJob was deleted in the cluster; its status is no longer written"
                    );
                    known.gone = true;
                    return Ok(());
                }
                Err(e) if api_code(&e) == Some(409) && attempt == 0 => {
                    let Some(current) = self.get(name, &known.namespace)? else {
                        known.gone = true;
                        return Ok(());
                    };
                    let theirs = agentd_status(&current)
                        .and_then(|s| serde_json::from_value::<JobStatus>(s.clone()).ok());
                    if !known.wrote(theirs.as_ref()) {
                        return Err(StoreError::KubeConflict {
                            api: API,
                            object: at,
                            resource_version: known.resource_version.clone(),
                        });
                    }
                    known.resource_version = current.metadata.resource_version.unwrap_or_default();
                }
                Err(e) => {
                    if outcome_unknown(&e) {
                        known.sent_unanswered(parsed.as_ref());
                    }
                    return Err(api_error(API, &at, &e));
                }
            }
        }
        Err(StoreError::KubeConflict {
            api: API,
            object: at,
            resource_version: known.resource_version.clone(),
        })
    }

    /// Deletes the object this store knows by `name`. Gone already is fine; one of the same
    /// name made since (another uid) is someone's new job and is left alone.
    fn delete(&self, name: &str) -> Result<(), StoreError> {
        let Some(known) = self.known().remove(name) else {
            return Ok(());
        };
        self.delete_object(name, &known)
    }

    fn delete_object(&self, name: &str, known: &Known) -> Result<(), StoreError> {
        const API: &str = "delete trainingjobs";
        let at = format!("{}/{name}", known.namespace);
        let api = self.api(&known.namespace);
        let mut params = DeleteParams::default();
        if let Some(uid) = known.uid.clone() {
            params = params.preconditions(kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            });
        }
        let owned = name.to_owned();
        let deleted = self.call(API, &at, async move { api.delete(&owned, &params).await })?;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) if api_code(&e) == Some(404) => Ok(()),
            Err(e) if api_code(&e) == Some(409) => {
                tracing::info!(
                    job = name,
                    namespace = known.namespace,
                    "not deleting TrainingJob: it was made again since; the new one is another job"
                );
                Ok(())
            }
            Err(e) => Err(api_error(API, &at, &e)),
        }
    }
}

impl JobStore for KubeStore {
    /// Every `TrainingJob` whose status an agent has written, with its manifest as the object
    /// reads without status and server-set metadata. An object with no agentd status yet
    /// (`kubectl apply`, or `agentctl submit` on another node) is not a stored job: it has not
    /// been validated nor given a queue, so it goes through admission as a new submission
    /// (`cluster::jobs::run_admission`); it is remembered, so that the first write of it finds
    /// it. Two objects of
    /// one name (in two namespaces) are one job to the core: the older is kept, the other is
    /// left alone with a warning.
    fn jobs(&self) -> Result<Vec<StoredJob>, StoreError> {
        let objects = self.objects.list_all()?;
        let mut known: BTreeMap<String, Known> = BTreeMap::new();
        let mut stored = Vec::new();
        let mut unadmitted = 0_usize;
        for object in objects {
            let Some(name) = object.metadata.name.clone() else {
                continue;
            };
            let entry = Known::from_object(&object);
            if let Some(first) = known.get(&name) {
                tracing::warn!(
                    job = name,
                    kept = first.namespace,
                    ignored = entry.namespace,
                    "two TrainingJobs have one name; jobs are known by name, so only the older is run: rename or delete the other"
                );
                continue;
            }
            match agentd_status(&object) {
                Some(status) => {
                    stored.push((name.clone(), manifest_of(&object), status.to_string()));
                }
                None => unadmitted += 1,
            }
            known.insert(name, entry);
        }
        if unadmitted > 0 {
            tracing::info!(
                count = unadmitted,
                "TrainingJobs not yet admitted (no status): they are taken as new submissions"
            );
        }
        *self.objects.known() = known;
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(stored)
    }

    fn holds_object(&self, name: &str, uid: &str) -> bool {
        self.objects
            .known()
            .get(name)
            .is_some_and(|k| !k.gone && k.uid.as_deref() == Some(uid))
    }

    /// Writes the objects, then the events locally. The status writes of one turn go out
    /// together (each job's own requests stay in order; a delete waits for the writes before
    /// it, and the writes after it wait for the delete). A failure fails the batch, naming the
    /// first failed write in the batch's order: the objects written keep their new status,
    /// and no event is written.
    fn write_batch(&mut self, jobs: &[JobWrite], events: &[NewEvent]) -> Result<(), StoreError> {
        if !jobs.is_empty() {
            self.objects.check_fence()?;
        }
        let mut deleted = Vec::new();
        for run in jobs.split_inclusive(|w| matches!(w, JobWrite::Delete { .. })) {
            let (upserts, delete) = match run.split_last() {
                Some((last @ JobWrite::Delete { .. }, upserts)) => (upserts, Some(last)),
                _ => (run, None),
            };
            self.objects.write_all(upserts)?;
            if let Some(delete) = delete {
                self.objects.write_all(std::slice::from_ref(delete))?;
                deleted.push(delete.clone());
            }
        }
        // The local database holds no jobs here: a delete there removes the job's events.
        self.local.write_batch(&deleted, events)
    }

    fn events(
        &self,
        kind: Option<&str>,
        object: Option<&str>,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        self.local.events(kind, object, after_id, limit)
    }

    /// The API server answers a list of one `TrainingJob`, and the local database takes a write.
    fn check_writable(&mut self) -> Result<(), StoreError> {
        let all: Api<DynamicObject> =
            Api::all_with(self.objects.client.clone(), &training_job_resource());
        self.objects
            .call("list trainingjobs", "(all namespaces)", async move {
                all.list(&ListParams::default().limit(1)).await
            })?
            .map_err(|e| api_error("list trainingjobs", "(all namespaces)", &e))?;
        self.local.check_writable()
    }

    fn add_inventory_sample(
        &self,
        time: f64,
        sample_json: &str,
        retention: Duration,
    ) -> Result<(), StoreError> {
        self.local
            .add_inventory_sample(time, sample_json, retention)
    }

    fn close(self: Box<Self>) -> Result<(), StoreError> {
        self.local.close()
    }
}

/// The object for a job: its manifest in the native form, in its namespace (default
/// `default`), a `TFJob` marked with [`SOURCE_KIND_ANNOTATION`]; and the GPUs it asks for.
pub(crate) fn object_from_manifest(manifest: &str) -> Result<(String, DynamicObject, u32), String> {
    let job = job::parse(manifest.as_bytes()).map_err(|e| e.to_string())?;
    let namespace = job
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    let mut object = job::to_manifest(&job);
    object["metadata"]["namespace"] = json!(namespace);
    if job.source == job::SourceKind::TfJob {
        let metadata = &mut object["metadata"];
        if !metadata["annotations"].is_object() {
            metadata["annotations"] = json!({});
        }
        metadata["annotations"][SOURCE_KIND_ANNOTATION] = json!("TFJob");
    }
    let object = serde_json::from_value(object).map_err(|e| e.to_string())?;
    Ok((namespace, object, requested_gpus(&job)))
}

/// The manifest of a stored object: what a person would submit to make it again, without the
/// status and what the server sets (uid, resourceVersion, managedFields, ...).
pub(crate) fn manifest_of(object: &DynamicObject) -> String {
    let m = &object.metadata;
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), json!(m.name));
    metadata.insert(
        "namespace".into(),
        json!(m.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)),
    );
    if let Some(labels) = m.labels.as_ref().filter(|l| !l.is_empty()) {
        metadata.insert("labels".into(), json!(labels));
    }
    if let Some(annotations) = m.annotations.as_ref().filter(|a| !a.is_empty()) {
        metadata.insert("annotations".into(), json!(annotations));
    }
    let manifest = json!({
        "apiVersion": "agentd.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": metadata,
        "spec": object.data.get("spec").cloned().unwrap_or(Value::Null),
    });
    manifest.to_string()
}

/// The status an agent wrote, if any: one with a `state` (a status of `{}`, or one written by
/// another tool, is not agentd's).
pub(crate) fn agentd_status(object: &DynamicObject) -> Option<&Value> {
    object
        .data
        .get("status")
        .filter(|s| s.get("state").is_some_and(Value::is_string))
}

/// The GPUs the whole gang asks for.
fn requested_gpus(job: &job::TrainingJob) -> u32 {
    job::gang_request(job, 0.0)
        .replicas
        .iter()
        .map(|r| r.resources.gpus)
        .fold(0, u32::saturating_add)
}

fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

pub(crate) fn api_error(api: &'static str, object: &str, e: &kube::Error) -> StoreError {
    let message = match e {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => crate::cluster::error_chain(other),
    };
    StoreError::Kube {
        api,
        object: object.to_owned(),
        message,
    }
}

/// Every `TrainingJob` in the cluster (or every one called `name`, in any namespace), page by
/// page, oldest first (by creation, then namespace): of two with one name, the first is the
/// one a leader runs.
pub(crate) async fn list_training_jobs(
    client: kube::Client,
    name: Option<&str>,
) -> Result<Vec<DynamicObject>, kube::Error> {
    let all: Api<DynamicObject> = Api::all_with(client, &training_job_resource());
    let first = || {
        let params = ListParams::default().limit(LIST_PAGE);
        match name {
            Some(name) => params.fields(&format!("metadata.name={name}")),
            None => params,
        }
    };
    let mut objects = Vec::new();
    let mut params = first();
    loop {
        let page = all.list(&params).await?;
        objects.extend(page.items);
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => {
                params = first().continue_token(&token);
            }
            _ => break,
        }
    }
    objects.sort_by_cached_key(|o| {
        (
            o.metadata.creation_timestamp.as_ref().map(|t| t.0),
            o.metadata.namespace.clone(),
        )
    });
    Ok(objects)
}

/// Who submitted `object`: the owner an agent recorded and signed with `key` (see
/// [`signing`]), or else the Kubernetes field manager that created it
/// (`kubectl-client-side-apply`), as `kubernetes:<manager>`, or else `kubernetes:unknown`.
pub fn owner_of(object: &DynamicObject, key: Option<&SubmitterKey>) -> Owner {
    let annotations = object.metadata.annotations.as_ref();
    if let Some(a) = annotations
        && let Some(text) = a.get(OWNER_ANNOTATION)
        && let Some(signature) = a.get(SIGNATURE_ANNOTATION)
        && key.is_some_and(|k| k.verify(object, text, signature))
        && let Ok(owner) = serde_json::from_str::<Owner>(text)
    {
        return owner;
    }
    let manager = object
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find_map(|entry| entry.manager.clone().filter(|m| !m.is_empty()));
    Owner {
        uid: NOBODY,
        gid: NOBODY,
        user: format!(
            "{KUBERNETES_OWNER_PREFIX}{}",
            manager.as_deref().unwrap_or("unknown")
        ),
    }
}

/// Whether `object` is the job `manifest` describes, submitted by `owner`: the same job once
/// both are read (the API server may reorder or default what it stores), the same submitter.
fn holds(
    object: &DynamicObject,
    manifest: &str,
    owner: Option<&Owner>,
    key: Option<&SubmitterKey>,
) -> bool {
    let spec = |text: &str| {
        job::parse(text.as_bytes())
            .ok()
            .map(|j| job::to_manifest(&j)["spec"].clone())
    };
    let theirs = spec(&manifest_of(object));
    theirs.is_some()
        && theirs == spec(manifest)
        && owner.is_none_or(|o| *o == owner_of(object, key))
}

/// Records on a job's `object` that `owner` submitted it on `node`, signed with `key` (an
/// object without a signature is believed to be its Kubernetes client's).
pub fn sign_submitter(
    object: &mut DynamicObject,
    owner: &Owner,
    node: Option<&str>,
    key: Option<&SubmitterKey>,
) {
    let text = serde_json::to_string(owner).unwrap_or_default();
    let signature = key.and_then(|k| k.sign(object, &text));
    let annotations = object.metadata.annotations.get_or_insert_default();
    annotations.insert(OWNER_ANNOTATION.to_owned(), text);
    if let Some(node) = node {
        annotations.insert(SUBMITTED_ON_ANNOTATION.to_owned(), node.to_owned());
    }
    if let Some(signature) = signature {
        annotations.insert(SIGNATURE_ANNOTATION.to_owned(), signature);
    }
}

#[cfg(test)]
pub(crate) mod tests;
