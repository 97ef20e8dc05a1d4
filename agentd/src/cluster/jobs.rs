//! Cluster jobs from any node: what an agent that does not lead answers from the `TrainingJob`
//! objects, and how the leader takes in objects it did not create.
//!
//! A follower creates the object of a job submitted to it (checked by the API exactly as the
//! leader checks one) with its submitter in annotations and no status; it lists and reads jobs
//! from the objects, converting them back as the leader's store restores them; and it records a
//! cancel as an annotation ([`CANCEL_ANNOTATION`], or [`REMOVE_ANNOTATION`] for a finished job).
//! The leader watches the objects ([`run_admission`]): each one without an agentd status goes
//! through the core's submit path (validation, queue, name check), and the core's first write
//! of the job lands on that object; one that is not valid gets status Failed, reason `Invalid`,
//! with every problem at its field path. A cancel annotation becomes a cancel by its
//! annotation's user for the job stored in that object, and in no other: the follower that
//! wrote it checked the user against the job's owner; whoever may patch the object with
//! `kubectl` may delete it as well.
//!
//! It must not run jobs (that is the leader's core); it only carries requests between the API,
//! the objects and the core.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_api::jobs::{JobList, JobState, JobStatus, Owner};
use futures::{FutureExt, StreamExt};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

use super::election::Leadership;
use crate::core::{Command, CoreError, CoreHandle, JobRecord, Now, QueuesInForce};
use crate::job::{self, Admission, SpecError};
use crate::store::StoreError;
use crate::store::kube::signing::KEY_SECRET;
pub use crate::store::kube::signing::{SubmitterKey, SubmitterKeys};
use crate::store::kube::{
    DEFAULT_NAMESPACE, PendingObjects, SOURCE_KIND_ANNOTATION, agentd_status, api_error,
    list_training_jobs, manifest_of, object_from_manifest, training_job_resource,
};
pub use crate::store::kube::{
    KUBERNETES_OWNER_PREFIX, OWNER_ANNOTATION, SUBMITTED_ON_ANNOTATION, owner_of, sign_submitter,
};

/// A cancel asked for on a follower: the user who asked. The leader cancels the job if it is
/// still active.
pub const CANCEL_ANNOTATION: &str = "agentd.io/cancel";

/// The removal of a finished job asked for on a follower: the user who asked.
pub const REMOVE_ANNOTATION: &str = "agentd.io/remove";

/// The job an object holds, as `agentctl` shows it: the status an agent wrote, or, for one
/// not admitted yet, a queued status made from its manifest, its owner as `key` vouches. That
/// one lists the replicas as pending only while no type has more than the CRD allows: the
/// object was checked by no agent, and a row per replica of `replicas: 4294967295` would take
/// more memory than the machine has.
pub fn status_of(object: &DynamicObject, key: Option<&SubmitterKey>) -> Option<JobStatus> {
    let name = object.metadata.name.clone()?;
    if let Some(status) =
        agentd_status(object).and_then(|s| serde_json::from_value::<JobStatus>(s.clone()).ok())
    {
        return Some(status);
    }
    let submitted_at = object
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0.0, |t| t.0.as_millisecond() as f64 / 1000.0);
    let mut status = match job::parse(manifest_of(object).as_bytes()) {
        Ok(parsed) => {
            let listed = parsed
                .spec
                .replica_specs
                .values()
                .all(|s| s.replicas <= job::MOST_REPLICAS_OF_A_TYPE);
            let mut record = JobRecord::without_replicas(
                parsed,
                String::new(),
                Now {
                    wall: submitted_at,
                    mono: 0.0,
                },
            );
            if listed {
                record.status.replicas = crate::core::pending_replicas(&record.job);
            }
            record.status
        }
        Err(_) => JobStatus {
            name,
            kind: "TrainingJob".to_owned(),
            queue: String::new(),
            priority: 0,
            state: JobState::Queued,
            reason: String::new(),
            message: String::new(),
            submitted_at,
            started_at: None,
            finished_at: None,
            restarts: 0,
            backoff_limit: 0,
            generation: 0,
            owner: None,
            template: None,
            replicas: Vec::new(),
            events: Vec::new(),
        },
    };
    if object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOURCE_KIND_ANNOTATION))
        .is_some_and(|k| k == "TFJob")
    {
        "TFJob".clone_into(&mut status.kind);
    }
    "NotAdmitted".clone_into(&mut status.reason);
    "waiting for the leader to admit it".clone_into(&mut status.message);
    status.owner = Some(owner_of(object, key));
    Some(status)
}

/// Every `TrainingJob` in the cluster (or every one called `name`), one per name (the older of
/// two with one name, as the leader runs it).
async fn list_jobs(
    client: &kube::Client,
    name: Option<&str>,
) -> Result<Vec<DynamicObject>, CoreError> {
    let mut objects = list_training_jobs(client.clone(), name)
        .await
        .map_err(|e| api_error("list trainingjobs", "(all namespaces)", &e))?;
    let mut seen = BTreeSet::new();
    objects.retain(|o| o.metadata.name.clone().is_some_and(|n| seen.insert(n)));
    Ok(objects)
}

/// Objects being taken in at once by a leader's admission. Each sends one request at a time,
/// so this bounds their reads of the API server too.
const ADMISSIONS_IN_FLIGHT: usize = super::REQUESTS_IN_FLIGHT;

/// How often, and how long apart, a follower looks for the signing key before it refuses a
/// submission for want of it.
const KEY_WAITS: u32 = 10;
const KEY_WAIT: Duration = Duration::from_millis(500);

/// What a follower answers job requests with: the `TrainingJob` objects, and the queues in
/// force (the leader's, as every agent watches the same ConfigMap).
pub struct FollowerJobs {
    client: kube::Client,
    node: String,
    keys: Arc<SubmitterKeys>,
    queues: watch::Receiver<Arc<QueuesInForce>>,
}

impl FollowerJobs {
    pub fn new(
        client: kube::Client,
        node: String,
        keys: Arc<SubmitterKeys>,
        queues: watch::Receiver<Arc<QueuesInForce>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            node,
            keys,
            queues,
        })
    }

    /// The key that vouches for submitters, once a leader has made it.
    async fn key(&self) -> Option<SubmitterKey> {
        match self.keys.load(false).await {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        }
    }

    /// Answers `command` from the objects, on a task of its own, if it is one a follower can
    /// answer; gives it back otherwise.
    pub fn answer(self: &Arc<Self>, command: Command, leader: Option<String>) -> Option<Command> {
        let this = Arc::clone(self);
        match command {
            Command::Submit {
                job,
                manifest,
                owner,
                reply,
            } => {
                tokio::spawn(async move {
                    let _ = reply.send(this.submit(&job, &manifest, &owner).await);
                });
            }
            Command::List {
                queue,
                state,
                user,
                reply,
            } => {
                tokio::spawn(async move {
                    let _ = reply.send(this.list(queue, state, user).await);
                });
            }
            Command::Get { name, reply, .. } => {
                tokio::spawn(async move {
                    let key = this.key().await;
                    let found = this.find(&name).await.and_then(|object| {
                        status_of(&object, key.as_ref())
                            .ok_or_else(|| CoreError::NotFound(name.clone()))
                    });
                    let _ = reply.send(found);
                });
            }
            Command::Cancel {
                name, by, reply, ..
            } => {
                tokio::spawn(async move {
                    let _ = reply.send(this.cancel(&name, &by, leader.as_deref()).await);
                });
            }
            Command::Queues { reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(this.queue_list().await);
                });
            }
            other => return Some(other),
        }
        None
    }

    /// Creates the job's object with its submitter and no status, for the leader to admit.
    async fn submit(
        &self,
        job: &job::TrainingJob,
        manifest: &str,
        owner: &Owner,
    ) -> Result<JobStatus, CoreError> {
        const API: &str = "create trainingjobs";
        if let Some(existing) = self.find_opt(&job.name).await? {
            let state = status_of(&existing, None).map_or(JobState::Queued, |s| s.state);
            return Err(CoreError::Conflict(format!(
                "a job named {:?} already exists ({state}, in namespace {}); remove it with \
                 `agentctl cancel {}`{} or choose another name",
                job.name,
                existing
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(DEFAULT_NAMESPACE),
                job.name,
                if state.is_finished() {
                    ""
                } else {
                    " (twice: once to cancel, once to remove)"
                },
            )));
        }
        let (namespace, mut object, _) =
            object_from_manifest(manifest).map_err(|e| CoreError::Conflict(e.clone()))?;
        let no_key = |message: String| {
            CoreError::Store(StoreError::Kube {
                api: "get secrets",
                object: KEY_SECRET.to_owned(),
                message,
            })
        };
        // A leader makes the key as its term starts: give one just elected a moment.
        let mut key = None;
        for _ in 0..KEY_WAITS {
            key = self.keys.load(false).await.map_err(no_key)?;
            if key.is_some() {
                break;
            }
            tokio::time::sleep(KEY_WAIT).await;
        }
        let key = key.ok_or_else(|| {
            no_key(
                "no leader has made the key that vouches for submitters yet; try again once a \
                 leader runs (agentctl status names it)"
                    .to_owned(),
            )
        })?;
        sign_submitter(&mut object, owner, Some(&self.node), Some(&key));
        let at = format!("{namespace}/{}", job.name);
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &namespace, &training_job_resource());
        let created = api
            .create(&PostParams::default(), &object)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 409 => CoreError::Conflict(format!(
                    "a job named {:?} already exists in namespace {namespace}; choose another name",
                    job.name
                )),
                _ => CoreError::Store(api_error(API, &at, &e)),
            })?;
        status_of(&created, Some(&key)).ok_or_else(|| CoreError::NotFound(job.name.clone()))
    }

    async fn list(
        &self,
        queue: Option<String>,
        state: Option<JobState>,
        user: Option<String>,
    ) -> Result<JobList, CoreError> {
        let key = self.key().await;
        let mut jobs: Vec<JobStatus> = list_jobs(&self.client, None)
            .await?
            .iter()
            .filter_map(|o| status_of(o, key.as_ref()))
            .filter(|s| queue.as_ref().is_none_or(|q| &s.queue == q))
            .filter(|s| state.is_none_or(|st| s.state == st))
            .filter(|s| {
                user.as_ref()
                    .is_none_or(|u| s.owner.as_ref().is_some_and(|o| &o.user == u))
            })
            .collect();
        for job in &mut jobs {
            job.events.clear();
        }
        jobs.sort_by(|a, b| {
            a.submitted_at
                .total_cmp(&b.submitted_at)
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(JobList { jobs })
    }

    /// The queues in force with what the objects hold, counted as the leader counts its jobs.
    async fn queue_list(&self) -> Result<agentd_api::jobs::QueueList, CoreError> {
        let key = self.key().await;
        let jobs: Vec<JobStatus> = list_jobs(&self.client, None)
            .await?
            .iter()
            .filter_map(|o| status_of(o, key.as_ref()))
            .collect();
        let queues = Arc::clone(&self.queues.borrow());
        Ok(crate::core::queues::queue_list(&queues, &jobs))
    }

    async fn find_opt(&self, name: &str) -> Result<Option<DynamicObject>, CoreError> {
        Ok(list_jobs(&self.client, Some(name))
            .await?
            .into_iter()
            .find(|o| o.metadata.name.as_deref() == Some(name)))
    }

    async fn find(&self, name: &str) -> Result<DynamicObject, CoreError> {
        self.find_opt(name)
            .await?
            .ok_or_else(|| CoreError::NotFound(name.to_owned()))
    }

    /// Records the request on the object for the leader: a cancel of an active job, the
    /// removal of a finished one. A job the leader has not admitted yet is deleted at once, on
    /// the version read: if the leader admits it meanwhile, the delete fails and the request is
    /// recorded instead.
    async fn cancel(
        &self,
        name: &str,
        by: &str,
        leader: Option<&str>,
    ) -> Result<JobStatus, CoreError> {
        const API: &str = "patch trainingjobs";
        let key = self.key().await;
        let mut tries = 0;
        let (mut status, api, at) = loop {
            tries += 1;
            let object = self.find(name).await?;
            let status = status_of(&object, key.as_ref())
                .ok_or_else(|| CoreError::NotFound(name.to_owned()))?;
            let namespace = object
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let at = format!("{namespace}/{name}");
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &namespace, &training_job_resource());
            if agentd_status(&object).is_some() {
                break (status, api, at);
            }
            let params = DeleteParams::default().preconditions(kube::api::Preconditions {
                uid: object.metadata.uid.clone(),
                resource_version: object.metadata.resource_version.clone(),
            });
            match api.delete(name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                // Changed since it was read: admitted, most likely. Read it again.
                Err(kube::Error::Api(s)) if s.code == 409 && tries < 3 => continue,
                Err(e) => return Err(api_error("delete trainingjobs", &at, &e).into()),
            }
            let mut status = status;
            status.state = JobState::Cancelled;
            "Cancelled".clone_into(&mut status.reason);
            status.message = format!(
                "cancelled by {by} before the leader admitted it; its TrainingJob is deleted"
            );
            return Ok(status);
        };
        let (annotation, asked, reason) = if status.state.is_finished() {
            (REMOVE_ANNOTATION, "removal", "RemoveRequested")
        } else {
            (CANCEL_ANNOTATION, "cancel", "CancelRequested")
        };
        let patch = json!({"metadata": {"annotations": {annotation: by}}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| CoreError::Store(api_error(API, &at, &e)))?;
        reason.clone_into(&mut status.reason);
        status.message = format!(
            "{asked} requested by {by}; the leader{} carries it out",
            leader.map(|l| format!(" ({l})")).unwrap_or_default()
        );
        Ok(status)
    }
}

/// While this agent leads, takes in the `TrainingJob` objects the core did not write: each
/// without an agentd status is submitted to the core as a local submission is (its first
/// status write goes onto that object, through `pending`), or marked Failed/`Invalid`; each
/// carrying a cancel or removal request is cancelled as a local request is, if the object is
/// the one the job is stored in. Each object is taken in on a task of its own, so one that
/// cannot be written yet holds up no other. Watches, never polls; each term starts from a
/// fresh list.
#[allow(clippy::too_many_arguments)]
pub async fn run_admission(
    client: kube::Client,
    core: CoreHandle,
    rules: watch::Receiver<Arc<Admission>>,
    pending: PendingObjects,
    keys: Arc<SubmitterKeys>,
    mut leadership: watch::Receiver<Leadership>,
    retry: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            led = leadership.wait_for(|l| l.term.is_some()) => if led.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        // Owners are believed only as the key vouches for them: without it, admitting would
        // take every job submitted on another node for its Kubernetes client's.
        let key = loop {
            match keys.load(true).await {
                Ok(Some(key)) => break Some(key),
                Ok(None) => tracing::warn!("jobs are not admitted until the key is made"),
                Err(e) => tracing::warn!("jobs are not admitted until the key is read: {e}"),
            }
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                _ = leadership.wait_for(|l| l.term.is_none()) => break None,
                _ = stop.wait_for(|s| *s) => return,
            }
        };
        let Some(key) = key else { continue };
        let desk = Arc::new(Admissions {
            key,
            client: client.clone(),
            core: core.clone(),
            rules: rules.clone(),
            pending: pending.clone(),
            leadership: leadership.clone(),
            retry,
            handled: Mutex::new(BTreeSet::new()),
        });
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &training_job_resource());
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut tasks = tokio::task::JoinSet::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(ADMISSIONS_IN_FLIGHT));
        // The uids a relist found, to forget what was handled of objects deleted meanwhile.
        let mut listed = BTreeSet::new();
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                _ = leadership.wait_for(|l| l.term.is_none()) => break,
                _ = stop.wait_for(|s| *s) => return,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            };
            let object = match next {
                Some(Ok(watcher::Event::Apply(object))) => object,
                Some(Ok(watcher::Event::InitApply(object))) => {
                    listed.extend(object.metadata.uid.clone());
                    object
                }
                Some(Ok(watcher::Event::Delete(object))) => {
                    if let Some(uid) = object.metadata.uid {
                        desk.forget(&uid);
                    }
                    continue;
                }
                Some(Ok(watcher::Event::Init)) => {
                    listed.clear();
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    desk.keep_only(&std::mem::take(&mut listed));
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!("watching TrainingJobs: {e}");
                    continue;
                }
                None => break,
            };
            if let Some(work) = Arc::clone(&desk).take(object) {
                // A bounded number at a time: each holds its object, its manifest and the
                // job read from it, and 10,000 objects applied at once must not all be held
                // in memory together (the watch waits meanwhile; nothing is lost).
                let turn = tokio::select! {
                    turn = Arc::clone(&slots).acquire_owned() => turn,
                    _ = leadership.wait_for(|l| l.term.is_none()) => break,
                    _ = stop.wait_for(|s| *s) => return,
                };
                let Ok(turn) = turn else { break };
                tasks.spawn(async move {
                    work.await;
                    drop(turn);
                });
            }
        }
        tasks.abort_all();
    }
}

/// What one term's admission has done, so an object is taken in once.
struct Admissions {
    key: SubmitterKey,
    client: kube::Client,
    core: CoreHandle,
    /// The rules of the moment: the queues change while the agent runs.
    rules: watch::Receiver<Arc<Admission>>,
    pending: PendingObjects,
    leadership: watch::Receiver<Leadership>,
    retry: Duration,
    /// (uid, what is being done or was done): `submit`, `cancel`, `remove`. An entry whose
    /// work failed is dropped, so the object's next change asks again.
    handled: Mutex<BTreeSet<(String, &'static str)>>,
}

/// Errors of the core that say nothing of the job: asked again while this agent leads.
fn passing(e: &CoreError) -> bool {
    matches!(
        e,
        CoreError::NotLeader { .. }
            | CoreError::NotWritten(_)
            | CoreError::Store(_)
            | CoreError::Executor(_)
    )
}

impl Admissions {
    fn handled(&self) -> std::sync::MutexGuard<'_, BTreeSet<(String, &'static str)>> {
        // A set of plain values is whole even if a holder panicked.
        self.handled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn forget(&self, uid: &str) {
        self.handled().retain(|(u, _)| u != uid);
    }

    fn keep_only(&self, uids: &BTreeSet<String>) {
        self.handled().retain(|(u, _)| uids.contains(u));
    }

    /// The work `object` needs, if any and not already under way.
    fn take(
        self: Arc<Self>,
        object: DynamicObject,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let (Some(name), Some(uid)) = (object.metadata.name.clone(), object.metadata.uid.clone())
        else {
            return None;
        };
        if object.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let Some(status) = agentd_status(&object) else {
            if !self.handled().insert((uid.clone(), "submit")) {
                return None;
            }
            return Some(
                async move {
                    if !self.submit(name, object).await {
                        self.handled().remove(&(uid, "submit"));
                    }
                }
                .boxed(),
            );
        };
        let finished = status
            .get("state")
            .and_then(|s| serde_json::from_value::<JobState>(s.clone()).ok())
            .is_some_and(JobState::is_finished);
        let annotations = object.metadata.annotations.clone().unwrap_or_default();
        let (what, by) = if finished {
            ("remove", annotations.get(REMOVE_ANNOTATION)?.clone())
        } else {
            ("cancel", annotations.get(CANCEL_ANNOTATION)?.clone())
        };
        if !self.handled().insert((uid.clone(), what)) {
            return None;
        }
        Some(
            async move {
                if !self.cancel(&object, name, uid.clone(), what, by).await {
                    self.handled().remove(&(uid, what));
                }
            }
            .boxed(),
        )
    }

    /// Cancels or removes the job `object` holds; one of the same name stored in another object
    /// is not touched, and an object holding no job the core runs (refused as `Invalid`, say)
    /// is deleted on a removal request. Whether it is done.
    async fn cancel(
        &self,
        object: &DynamicObject,
        name: String,
        uid: String,
        what: &'static str,
        by: String,
    ) -> bool {
        let result = self
            .ask_while_leading(|| {
                let (name, by, object) = (name.clone(), by.clone(), Some(uid.clone()));
                move |reply| Command::Cancel {
                    name,
                    by,
                    object,
                    reply,
                }
            })
            .await;
        match result {
            Ok(status) => {
                tracing::info!(
                    job = name,
                    by,
                    reason = status.reason,
                    "{what} asked on another node, done"
                );
                true
            }
            Err(CoreError::NotFound(_)) if what == "remove" => {
                let namespace = object
                    .metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(DEFAULT_NAMESPACE);
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), namespace, &training_job_resource());
                let params = DeleteParams::default().preconditions(kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                });
                match api.delete(&name, &params).await {
                    Ok(_) => {
                        tracing::info!(
                            job = name,
                            namespace,
                            by,
                            "TrainingJob that holds no job removed on request"
                        );
                        true
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => true,
                    Err(e) => {
                        tracing::warn!(job = name, namespace, by, "removal asked: {e}");
                        false
                    }
                }
            }
            Err(CoreError::NotFound(_)) => {
                tracing::info!(
                    job = name,
                    by,
                    "cancel asked on a TrainingJob that holds no job this leader runs; nothing done"
                );
                true
            }
            Err(e) => {
                tracing::warn!(job = name, by, "{what} asked on another node: {e}");
                false
            }
        }
    }

    /// Sends the command the closure builds until an answer comes that is not "not leading
    /// yet" (the term's core is still opening) or "could not write", while this agent leads.
    async fn ask_while_leading<T, B>(&self, build: impl Fn() -> B) -> Result<T, CoreError>
    where
        B: FnOnce(tokio::sync::oneshot::Sender<Result<T, CoreError>>) -> Command,
    {
        loop {
            match self.core.ask(build()).await {
                Err(e) if passing(&e) && self.leadership.borrow().term.is_some() => {
                    tokio::time::sleep(self.retry).await;
                }
                answer => return answer,
            }
        }
    }

    /// Submits the job `object` holds, or marks the object `Invalid`. Whether it is done (a
    /// job taken in or refused, or the object gone or taken by another).
    async fn submit(&self, name: String, object: DynamicObject) -> bool {
        let manifest = manifest_of(&object);
        let owner = owner_of(&object, Some(&self.key));
        let rules = Arc::clone(&self.rules.borrow());
        let text = manifest.clone();
        let admitted = tokio::task::spawn_blocking(move || job::admit(text.as_bytes(), &rules))
            .await
            .unwrap_or_else(|e| {
                Err(SpecError::Invalid(vec![job::FieldError::new(
                    "",
                    format!("checking the manifest failed: {e}"),
                )]))
            });
        let job = match admitted {
            Ok(job) => job,
            Err(e) => {
                self.invalid(&object, &e.to_string()).await;
                return true;
            }
        };
        let result = loop {
            // The object as it is now: deleted meanwhile (a cancel on another node), or taken
            // in by a write that was not answered, it is not submitted (again).
            match self.read(&object).await {
                Ok(Some(now))
                    if now.metadata.uid == object.metadata.uid && agentd_status(&now).is_none() => {
                }
                Ok(_) => return true,
                // Not known: asked again while leading, or left for the object's next change.
                Err(e) => {
                    tracing::debug!(job = name, "TrainingJob not read: {e}");
                    if self.leadership.borrow().term.is_none() {
                        return false;
                    }
                    tokio::time::sleep(self.retry).await;
                    continue;
                }
            }
            self.pending.insert(name.clone(), object.clone());
            let answer = self
                .core
                .ask(|reply| Command::Submit {
                    job: Box::new(job.clone()),
                    manifest: manifest.clone(),
                    owner: owner.clone(),
                    reply,
                })
                .await;
            self.pending.remove(&name);
            match answer {
                Err(e) if passing(&e) && self.leadership.borrow().term.is_some() => {
                    tracing::debug!(job = name, "TrainingJob not taken in yet: {e}");
                    tokio::time::sleep(self.retry).await;
                }
                answer => break answer,
            }
        };
        match result {
            Ok(status) => {
                tracing::info!(
                    job = name,
                    owner = owner.user,
                    queue = status.queue,
                    "TrainingJob admitted"
                );
                true
            }
            Err(e @ (CoreError::Spec(_) | CoreError::BadField { .. } | CoreError::Conflict(_))) => {
                // The core answers only after its batch is written, so a job it took in itself
                // (a local submission: create, then status) has its status by now.
                if self
                    .current(&object)
                    .await
                    .is_some_and(|o| agentd_status(&o).is_some())
                {
                    return true;
                }
                let problems = match &e {
                    CoreError::Spec(spec) => spec.to_string(),
                    CoreError::BadField { field, message } => format!("{field}: {message}"),
                    other => format!("metadata.name: {other}"),
                };
                self.invalid(&object, &problems).await;
                true
            }
            Err(e) => {
                tracing::warn!(job = name, "TrainingJob not taken in: {e}");
                false
            }
        }
    }

    async fn current(&self, object: &DynamicObject) -> Option<DynamicObject> {
        self.read(object).await.ok()?
    }

    /// The object as the API server has it now (`None`: deleted).
    async fn read(&self, object: &DynamicObject) -> Result<Option<DynamicObject>, kube::Error> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            object
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE),
            &training_job_resource(),
        );
        let Some(name) = object.metadata.name.as_deref() else {
            return Ok(None);
        };
        api.get_opt(name).await
    }

    /// Sets status Failed, reason `Invalid`, on the version of the object that was read: a
    /// change since (someone fixed it, or another leader took it) wins.
    async fn invalid(&self, object: &DynamicObject, problems: &str) {
        let Some(mut status) = status_of(object, Some(&self.key)) else {
            return;
        };
        if !self.leadership.borrow().leads(std::time::Instant::now()) {
            return;
        }
        status.state = JobState::Failed;
        // It was never taken in, so it has no replicas to show.
        status.replicas.clear();
        crate::core::lifecycle::REFUSED_REASON.clone_into(&mut status.reason);
        status.message = format!("the manifest is not valid: {problems}");
        status.finished_at = Some(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let name = status.name.clone();
        let namespace = object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let body = json!({
            "apiVersion": "agentd.io/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "resourceVersion": object.metadata.resource_version,
            },
            "status": status,
        });
        let Ok(body) = serde_json::from_value::<DynamicObject>(body) else {
            return;
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &namespace, &training_job_resource());
        match api
            .replace_status(&name, &PostParams::default(), &body)
            .await
        {
            Ok(_) => tracing::info!(job = name, namespace, "TrainingJob refused: {problems}"),
            Err(e) => tracing::warn!(
                job = name,
                namespace,
                "TrainingJob refused ({problems}), but the refusal could not be written: {}",
                api_error("update trainingjobs/status", &name, &e)
            ),
        }
    }
}

#[cfg(test)]
mod tests;
