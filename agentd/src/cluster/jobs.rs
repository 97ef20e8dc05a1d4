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
//! with every problem at its field path. A cancel annotation becomes the same cancel a local one
//! is.
//!
//! It must not run jobs (that is the leader's core); it only carries requests between the API,
//! the objects and the core.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agentd_api::jobs::{JobList, JobState, JobStatus, Owner};
use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::sync::watch;

use super::election::Leadership;
use crate::core::{Command, CoreError, CoreHandle, JobRecord, Now};
use crate::job::{self, Admission, SpecError};
use crate::store::kube::{
    DEFAULT_NAMESPACE, PendingObjects, SOURCE_KIND_ANNOTATION, agentd_status, api_error,
    list_training_jobs, manifest_of, object_from_manifest, training_job_resource,
};
pub use crate::store::kube::{OWNER_ANNOTATION, SUBMITTED_ON_ANNOTATION, submitter_annotations};

/// A cancel asked for on a follower: the user who asked. The leader cancels the job if it is
/// still active.
pub const CANCEL_ANNOTATION: &str = "agentd.io/cancel";

/// The removal of a finished job asked for on a follower: the user who asked.
pub const REMOVE_ANNOTATION: &str = "agentd.io/remove";

/// The owner name of a job applied with `kubectl` (or any other Kubernetes client) is this
/// prefix and the field manager that created it. A Unix user name cannot hold a `:`, so no
/// local user owns such a job: admins cancel it with `agentctl`, anyone else with
/// `kubectl delete`, as Kubernetes RBAC allows.
pub const KUBERNETES_OWNER_PREFIX: &str = "kubernetes:";

/// The uid and gid recorded for a Kubernetes submitter (`nobody`).
const NOBODY: u32 = 65534;

/// Who submitted `object`: the owner an agent recorded, or else the Kubernetes field manager
/// that created it (`kubectl-client-side-apply`), as `kubernetes:<manager>`.
pub fn owner_of(object: &DynamicObject) -> Option<Owner> {
    let annotations = object.metadata.annotations.as_ref();
    if let Some(owner) = annotations
        .and_then(|a| a.get(OWNER_ANNOTATION))
        .and_then(|text| serde_json::from_str::<Owner>(text).ok())
    {
        return Some(owner);
    }
    let manager = object
        .metadata
        .managed_fields
        .as_ref()?
        .iter()
        .find_map(|entry| entry.manager.clone().filter(|m| !m.is_empty()))?;
    Some(kubernetes_owner(&manager))
}

fn kubernetes_owner(manager: &str) -> Owner {
    Owner {
        uid: NOBODY,
        gid: NOBODY,
        user: format!("{KUBERNETES_OWNER_PREFIX}{manager}"),
    }
}

/// The job an object holds, as `agentctl` shows it: the status an agent wrote, or, for one
/// not admitted yet, a queued status made from its manifest.
pub fn status_of(object: &DynamicObject) -> Option<JobStatus> {
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
            JobRecord::new(
                parsed,
                String::new(),
                Now {
                    wall: submitted_at,
                    mono: 0.0,
                },
            )
            .status
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
    status.owner = owner_of(object);
    Some(status)
}

/// Every `TrainingJob` in the cluster, one per name (the older of two with one name, as the
/// leader runs it).
async fn list_jobs(client: &kube::Client) -> Result<Vec<DynamicObject>, CoreError> {
    let mut objects = list_training_jobs(client.clone())
        .await
        .map_err(|e| api_error("list trainingjobs", "(all namespaces)", &e))?;
    let mut seen = BTreeSet::new();
    objects.retain(|o| o.metadata.name.clone().is_some_and(|n| seen.insert(n)));
    Ok(objects)
}

/// What a follower answers job requests with: the `TrainingJob` objects.
pub struct FollowerJobs {
    client: kube::Client,
    node: String,
}

impl FollowerJobs {
    pub fn new(client: kube::Client, node: String) -> Arc<Self> {
        Arc::new(Self { client, node })
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
                    let found = this.find(&name).await.and_then(|object| {
                        status_of(&object).ok_or_else(|| CoreError::NotFound(name.clone()))
                    });
                    let _ = reply.send(found);
                });
            }
            Command::Cancel { name, by, reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(this.cancel(&name, &by, leader.as_deref()).await);
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
            let state = status_of(&existing).map_or(JobState::Queued, |s| s.state);
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
        object
            .metadata
            .annotations
            .get_or_insert_default()
            .extend(submitter_annotations(owner, Some(&self.node)));
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
        status_of(&created).ok_or_else(|| CoreError::NotFound(job.name.clone()))
    }

    async fn list(
        &self,
        queue: Option<String>,
        state: Option<JobState>,
        user: Option<String>,
    ) -> Result<JobList, CoreError> {
        let mut jobs: Vec<JobStatus> = list_jobs(&self.client)
            .await?
            .iter()
            .filter_map(status_of)
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

    async fn find_opt(&self, name: &str) -> Result<Option<DynamicObject>, CoreError> {
        Ok(list_jobs(&self.client)
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
    /// removal of a finished one. A job the leader has not admitted yet is deleted at once.
    async fn cancel(
        &self,
        name: &str,
        by: &str,
        leader: Option<&str>,
    ) -> Result<JobStatus, CoreError> {
        const API: &str = "patch trainingjobs";
        let object = self.find(name).await?;
        let mut status = status_of(&object).ok_or_else(|| CoreError::NotFound(name.to_owned()))?;
        let namespace = object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
        let at = format!("{namespace}/{name}");
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &namespace, &training_job_resource());
        if agentd_status(&object).is_none() {
            let mut params = DeleteParams::default();
            if let Some(uid) = object.metadata.uid.clone() {
                params = params.preconditions(kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                });
            }
            match api.delete(name, &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(api_error("delete trainingjobs", &at, &e).into()),
            }
            status.state = JobState::Cancelled;
            "Cancelled".clone_into(&mut status.reason);
            status.message = format!(
                "cancelled by {by} before the leader admitted it; its TrainingJob is deleted"
            );
            return Ok(status);
        }
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
/// carrying a cancel or removal request is cancelled as a local request is. Watches, never
/// polls; each term starts from a fresh list.
pub async fn run_admission(
    client: kube::Client,
    core: CoreHandle,
    rules: Arc<Admission>,
    pending: PendingObjects,
    mut leadership: watch::Receiver<Leadership>,
    retry: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            led = leadership.wait_for(|l| l.term.is_some()) => if led.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let mut desk = Admissions {
            client: client.clone(),
            core: core.clone(),
            rules: Arc::clone(&rules),
            pending: pending.clone(),
            leadership: leadership.clone(),
            retry,
            handled: BTreeSet::new(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &training_job_resource());
        let mut objects = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .boxed();
        loop {
            let next = tokio::select! {
                next = objects.next() => next,
                _ = leadership.wait_for(|l| l.term.is_none()) => break,
                _ = stop.wait_for(|s| *s) => return,
            };
            match next {
                Some(Ok(object)) => desk.take(object).await,
                Some(Err(e)) => tracing::warn!("watching TrainingJobs: {e}"),
                None => break,
            }
        }
    }
}

/// What one term's admission has done, so an object is taken in once.
struct Admissions {
    client: kube::Client,
    core: CoreHandle,
    rules: Arc<Admission>,
    pending: PendingObjects,
    leadership: watch::Receiver<Leadership>,
    retry: Duration,
    /// (uid, what was done): `submit`, `cancel`, `remove`.
    handled: BTreeSet<(String, &'static str)>,
}

impl Admissions {
    async fn take(&mut self, object: DynamicObject) {
        let (Some(name), Some(uid)) = (object.metadata.name.clone(), object.metadata.uid.clone())
        else {
            return;
        };
        if object.metadata.deletion_timestamp.is_some() {
            return;
        }
        let Some(status) = agentd_status(&object) else {
            if self.handled.insert((uid, "submit")) {
                self.submit(name, object).await;
            }
            return;
        };
        let finished = status
            .get("state")
            .and_then(|s| serde_json::from_value::<JobState>(s.clone()).ok())
            .is_some_and(JobState::is_finished);
        let annotations = object.metadata.annotations.clone().unwrap_or_default();
        let request = if finished {
            annotations.get(REMOVE_ANNOTATION).map(|by| ("remove", by))
        } else {
            annotations.get(CANCEL_ANNOTATION).map(|by| ("cancel", by))
        };
        if let Some((what, by)) = request
            && self.handled.insert((uid, what))
        {
            let by = by.clone();
            let result = self
                .ask_while_leading(|| {
                    let (name, by) = (name.clone(), by.clone());
                    move |reply| Command::Cancel { name, by, reply }
                })
                .await;
            match result {
                Ok(status) => tracing::info!(
                    job = name,
                    by,
                    reason = status.reason,
                    "{what} asked on another node, done"
                ),
                Err(e) => tracing::warn!(job = name, by, "{what} asked on another node: {e}"),
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
                Err(CoreError::NotLeader { .. } | CoreError::NotWritten(_))
                    if self.leadership.borrow().term.is_some() =>
                {
                    tokio::time::sleep(self.retry).await;
                }
                answer => return answer,
            }
        }
    }

    async fn submit(&mut self, name: String, object: DynamicObject) {
        let manifest = manifest_of(&object);
        let owner = owner_of(&object).unwrap_or_else(|| kubernetes_owner("unknown"));
        let rules = Arc::clone(&self.rules);
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
                return;
            }
        };
        self.pending.insert(name.clone(), object.clone());
        let result = self
            .ask_while_leading(|| {
                let (job, manifest, owner) = (job.clone(), manifest.clone(), owner.clone());
                move |reply| Command::Submit {
                    job: Box::new(job),
                    manifest,
                    owner,
                    reply,
                }
            })
            .await;
        self.pending.remove(&name);
        match result {
            Ok(status) => tracing::info!(
                job = name,
                owner = owner.user,
                queue = status.queue,
                "TrainingJob admitted"
            ),
            Err(CoreError::ShuttingDown | CoreError::NotLeader { .. }) => {}
            Err(e) => {
                // The core answers only after its batch is written, so a job it took in itself
                // (a local submission: create, then status) has its status by now.
                if self
                    .current(&object)
                    .await
                    .is_some_and(|o| agentd_status(&o).is_some())
                {
                    return;
                }
                let problems = match &e {
                    CoreError::Spec(spec) => spec.to_string(),
                    CoreError::BadField { field, message } => format!("{field}: {message}"),
                    other => format!("metadata.name: {other}"),
                };
                self.invalid(&object, &problems).await;
            }
        }
    }

    async fn current(&self, object: &DynamicObject) -> Option<DynamicObject> {
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            object
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE),
            &training_job_resource(),
        );
        api.get_opt(object.metadata.name.as_deref()?).await.ok()?
    }

    /// Sets status Failed, reason `Invalid`, on the version of the object that was read: a
    /// change since (someone fixed it, or another leader took it) wins.
    async fn invalid(&self, object: &DynamicObject, problems: &str) {
        let Some(mut status) = status_of(object) else {
            return;
        };
        if !self.leadership.borrow().leads(std::time::Instant::now()) {
            return;
        }
        status.state = JobState::Failed;
        "Invalid".clone_into(&mut status.reason);
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
