//! The core loop: the one task that owns the jobs. Handlers send it `Command`s; the executor
//! reports replicas started, failed to start and exited; the inventory tells it about GPUs.
//! Each turn it applies what arrived, runs a scheduling pass if anything changed, and writes
//! every change in one transaction before it answers the requests that caused them (so a job
//! acknowledged with 201 is on disk) and before it hands placed replicas to the executor (so
//! no replica runs for a placement that is not on disk). It never waits for a process.

pub mod clock;
mod log_budget;
mod record;
mod recovery;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentd_api::NodeInventory;
use agentd_api::jobs::{
    EventList, JobList, JobState, JobStatus, Owner, QueueList, QueueStatus, ReplicaState,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, QueueSettings, ReplicaUnits};
use crate::exec::local::{self, LaunchSpec, LocalExecutor, ReplicaEvent, ReplicaReport};
use crate::inventory::GpuHealthEvent;
use crate::job::{self, SpecError};
use crate::metrics::{Metrics, NodeAllocation};
use crate::sched::{self, NodeCapacity, Policy, QueueConfig, Snapshot};
use crate::store::{JobWrite, NewEvent, Store, StoreError};

pub use clock::{Clock, ManualClock, Now, SystemClock};
pub use record::JobRecord;
use record::{Due, ReplicaExit};

/// How many removed jobs' last statuses are kept in memory for clients still waiting on them.
const REMEMBER_REMOVED: usize = 256;

/// Ticks between two checks of the job logs' overall size (10 s).
const LOG_BUDGET_TICKS: u64 = 40;

/// How often deadlines, time-outs and back-offs are checked.
const TICK: Duration = Duration::from_millis(250);

/// Most rounds of messages (a command, a replica exit, an internal note, a health change) taken
/// in one turn before the batch is written, so a flood shares a transaction without starving
/// replies.
const MAX_BATCH: usize = 256;

/// Replicas being started at once beyond which new submissions wait. Starting a process
/// takes the machine a fraction of a millisecond; taking jobs in faster than that only moves
/// the wait from the submission to the queue, where it is longer and nobody sees it.
const MAX_IN_FLIGHT: u32 = 8;

/// The file in the state directory that says the machine is drained.
const DRAINED_MARKER: &str = "drained";

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("no job named {0:?}")]
    NotFound(String),
    #[error("{0}")]
    Spec(#[from] SpecError),
    #[error("{field}: {message}")]
    BadField { field: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// The change could not be written, so it was not made.
    #[error("nothing was done: {0}; free space there (or fix the state directory) and try again")]
    NotWritten(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// A request to the core, from the API.
#[derive(Debug)]
pub enum Command {
    /// An admitted job ([`job::admit`]: read, checked, its queue resolved) and the manifest as
    /// submitted.
    Submit {
        job: Box<job::TrainingJob>,
        manifest: String,
        /// The caller, who becomes the job's owner.
        owner: Owner,
        reply: Reply<JobStatus>,
    },
    List {
        queue: Option<String>,
        state: Option<JobState>,
        /// Only the jobs of this user (by name).
        user: Option<String>,
        reply: Reply<JobList>,
    },
    Get {
        name: String,
        /// Also a job removed a moment ago: its last status, without events.
        removed: bool,
        reply: Reply<JobStatus>,
    },
    /// Cancels an active job; removes a finished one.
    Cancel {
        name: String,
        /// Who asked, for the job's events.
        by: String,
        reply: Reply<JobStatus>,
    },
    Queues {
        reply: Reply<QueueList>,
    },
    Events {
        after: i64,
        limit: u32,
        job: Option<String>,
        reply: Reply<EventList>,
    },
    Logs {
        name: String,
        replica: Option<String>,
        reply: Reply<LogFiles>,
    },
    /// Drains (`Some(true)`) or resumes (`Some(false)`) this machine, or only asks (`None`);
    /// answers whether it is drained. A drained machine takes no new placements.
    Drain {
        drained: Option<bool>,
        reply: Reply<bool>,
    },
}

/// Where a replica's log is, and whether more can come.
#[derive(Debug, Clone)]
pub struct LogFiles {
    pub replica: String,
    /// Older part first, then the current file.
    pub files: Vec<PathBuf>,
    /// The job has finished and its replicas are gone: the log will not grow.
    pub complete: bool,
}

/// The handle the API holds.
#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Command>,
    /// Submissions have a channel of their own, which the core stops reading while the
    /// executor is behind: new work waits at the door, reads never do.
    submits: mpsc::Sender<Command>,
}

impl CoreHandle {
    /// Sends a command built around a reply channel and waits for the answer.
    pub async fn ask<T>(&self, build: impl FnOnce(Reply<T>) -> Command) -> Result<T, CoreError> {
        let (reply, rx) = oneshot::channel();
        let command = build(reply);
        let tx = if matches!(command, Command::Submit { .. }) {
            &self.submits
        } else {
            &self.tx
        };
        tx.send(command)
            .await
            .map_err(|_| CoreError::ShuttingDown)?;
        rx.await.map_err(|_| CoreError::ShuttingDown)?
    }
}

/// Something that happened inside the agent that the core must hear about.
#[derive(Debug)]
enum Internal {
    /// Every process of a gang's generation is gone.
    GangStopped { job: String, generation: u32 },
}

pub struct Core {
    node: String,
    labels: BTreeMap<String, String>,
    state_dir: PathBuf,
    queues: BTreeMap<String, QueueSettings>,
    default_queue: String,
    /// `jobs.max_replicas_per_agent`: the most replicas unfinished jobs may hold together.
    max_replicas_per_agent: u32,
    kill_grace: Duration,
    backoff: (Duration, Duration),
    sample_retention: Duration,
    /// Wall clock for what people read, monotonic clock for every duration waited on.
    clock: Arc<dyn Clock>,
    store: Store,
    executor: LocalExecutor,
    policy: Policy,
    jobs: BTreeMap<String, JobRecord>,
    inventory: watch::Receiver<Arc<NodeInventory>>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    /// What the current turn has changed, written before any reply is sent.
    dirty: BTreeSet<String>,
    deleted: BTreeSet<String>,
    events: Vec<NewEvent>,
    /// Answers to requests of this turn, sent once it is written (or its write failed).
    replies: Vec<(Reply<JobStatus>, Result<JobStatus, CoreError>)>,
    /// Each job a request or a placement changed this turn, as it was before (`None`: it did
    /// not exist). A turn that cannot be written is undone with it, so that memory says what
    /// the database says; facts (a replica ended) stay, to be written by a later turn.
    undo: BTreeMap<String, Option<JobRecord>>,
    /// Gangs to stop once the turn is written: `(job, generation, process groups)`.
    stops: Vec<(String, u32, Vec<u32>)>,
    /// Why the last write failed, while writes fail: nothing new is placed meanwhile.
    write_failure: Option<String>,
    /// The last statuses of the jobs removed most recently, for a client that waited on one
    /// (`agentctl submit --wait` on a job with `ttlSecondsAfterFinished: 0`).
    removed: std::collections::VecDeque<JobStatus>,
    /// `jobs.logs_max_total_bytes`.
    logs_budget: u64,
    ticks: u64,
    /// Replicas placed this turn, handed to the executor once the turn is written.
    launches: Vec<LaunchSpec>,
    /// Replicas handed to the executor and not yet reported started or failed.
    in_flight: u32,
    needs_pass: bool,
    metrics: Option<Metrics>,
    /// The state each job was last reported in, for the transition counters.
    reported: BTreeMap<String, JobState>,
    /// `agentctl drain`: nothing new is placed here until `agentctl resume`.
    drained: bool,
}

/// Channels the core listens on, apart from commands.
pub struct CoreInputs {
    pub commands: mpsc::Receiver<Command>,
    pub submits: mpsc::Receiver<Command>,
    pub replicas: mpsc::UnboundedReceiver<ReplicaReport>,
    pub health: mpsc::UnboundedReceiver<GpuHealthEvent>,
    internal: mpsc::UnboundedReceiver<Internal>,
}

impl Core {
    /// Builds the core from the configuration, loads the stored jobs, and stops whatever a
    /// previous agent's replicas left running.
    pub fn open(
        config: &Config,
        node: String,
        store: Store,
        inventory: watch::Receiver<Arc<NodeInventory>>,
        health: mpsc::UnboundedReceiver<GpuHealthEvent>,
        metrics: Option<Metrics>,
    ) -> Result<(Core, CoreHandle, CoreInputs), CoreError> {
        Self::open_with_clock(
            config,
            node,
            store,
            inventory,
            health,
            metrics,
            Arc::new(SystemClock::new()),
        )
    }

    /// `open`, reading the time from `clock`.
    pub fn open_with_clock(
        config: &Config,
        node: String,
        store: Store,
        inventory: watch::Receiver<Arc<NodeInventory>>,
        health: mpsc::UnboundedReceiver<GpuHealthEvent>,
        metrics: Option<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Result<(Core, CoreHandle, CoreInputs), CoreError> {
        let (tx, commands) = mpsc::channel(1024);
        let (submits_tx, submits) = mpsc::channel(1024);
        let (reports, replicas) = mpsc::unbounded_channel();
        let (internal_tx, internal) = mpsc::unbounded_channel();
        let mut core = Core {
            node,
            labels: config.labels.clone(),
            state_dir: config.state_dir.clone(),
            queues: config.queues.clone(),
            default_queue: config.jobs.default_queue.clone(),
            max_replicas_per_agent: config.jobs.max_replicas_per_agent,
            kill_grace: config.jobs.kill_grace,
            backoff: (config.jobs.restart_backoff, config.jobs.restart_backoff_max),
            sample_retention: config.inventory.sample_retention,
            clock,
            store,
            executor: LocalExecutor::new(
                reports,
                config.jobs.log_max_bytes,
                runner(config)?,
                config.state_dir.join("replicas"),
                crate::exec::ShimCommand::agentd(),
            ),
            launches: Vec::new(),
            in_flight: 0,
            policy: Policy::agentd(),
            jobs: BTreeMap::new(),
            inventory,
            internal_tx,
            dirty: BTreeSet::new(),
            deleted: BTreeSet::new(),
            events: Vec::new(),
            replies: Vec::new(),
            undo: BTreeMap::new(),
            stops: Vec::new(),
            write_failure: None,
            removed: std::collections::VecDeque::new(),
            logs_budget: config.jobs.logs_max_total_bytes,
            ticks: 0,
            needs_pass: true,
            metrics,
            reported: BTreeMap::new(),
            drained: config.state_dir.join(DRAINED_MARKER).exists(),
        };
        core.recover()?;
        core.commit()?;
        Ok((
            core,
            CoreHandle {
                tx,
                submits: submits_tx,
            },
            CoreInputs {
                commands,
                submits,
                replicas,
                health,
                internal,
            },
        ))
    }

    /// Runs until `stop` turns true; then stops every gang and writes the last changes.
    pub async fn run(mut self, mut inputs: CoreInputs, mut stop: watch::Receiver<bool>) -> Store {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inventory = self.inventory.clone();
        loop {
            tokio::select! {
                Some(command) = inputs.commands.recv() => self.command(command),
                Some(command) = inputs.submits.recv(), if self.in_flight < MAX_IN_FLIGHT => {
                    self.command(command);
                }
                Some(report) = inputs.replicas.recv() => self.replica_report(report),
                Some(change) = inputs.health.recv() => self.gpu_health_changed(&change),
                Some(internal) = inputs.internal.recv() => self.internal(internal),
                Ok(()) = inventory.changed() => self.inventory_changed(),
                _ = tick.tick() => {
                    // The watchdog hears from the core loop itself: a hung core stops pinging.
                    crate::systemd::watchdog_tick();
                    self.tick();
                }
                _ = stop.wait_for(|s| *s) => break,
            }
            // Whatever else is already waiting joins this turn, so that one scheduling pass and
            // one transaction serve all of it: under load a turn costs one fsync, not one per
            // message.
            for _ in 1..MAX_BATCH {
                let mut took = false;
                if let Ok(report) = inputs.replicas.try_recv() {
                    self.replica_report(report);
                    took = true;
                }
                if let Ok(internal) = inputs.internal.try_recv() {
                    self.internal(internal);
                    took = true;
                }
                if let Ok(change) = inputs.health.try_recv() {
                    self.gpu_health_changed(&change);
                    took = true;
                }
                if let Ok(command) = inputs.commands.try_recv() {
                    self.command(command);
                    took = true;
                }
                if self.in_flight < MAX_IN_FLIGHT
                    && let Ok(command) = inputs.submits.try_recv()
                {
                    self.command(command);
                    took = true;
                }
                if !took {
                    break;
                }
            }
            if self.needs_pass {
                self.schedule();
            }
            // A failed write is logged, and undone, where it happens.
            let _ = self.commit();
        }
        self.shutdown().await;
        self.store
    }

    /// Writes the final state. Replicas under their own supervisors run on, for the next agent
    /// to adopt; transient units stop with the agent's unit, so their gangs are stopped here
    /// (and restarted when the agent comes back).
    async fn shutdown(&mut self) {
        let mut groups = Vec::new();
        if !self.executor.replicas_outlive_agent() {
            for record in self.jobs.values() {
                groups.extend(record.live_pgids());
            }
        }
        if !groups.is_empty() {
            tracing::info!(groups = groups.len(), "stopping replicas");
            self.executor.stop(groups, self.kill_grace).await;
        }
        if let Err(e) = self.commit() {
            tracing::error!("cannot write job changes: {e}");
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Drain { drained, reply } => {
                if let Some(drained) = drained
                    && drained != self.drained
                {
                    self.set_drained(drained);
                }
                let _ = reply.send(Ok(self.drained));
            }
            Command::Submit {
                job,
                manifest,
                owner,
                reply,
            } => {
                let result = self.submit(*job, manifest, owner);
                self.replies.push((reply, result));
            }
            Command::List {
                queue,
                state,
                user,
                reply,
            } => {
                let jobs = self
                    .jobs
                    .values()
                    .filter(|r| queue.as_ref().is_none_or(|q| &r.status.queue == q))
                    .filter(|r| state.is_none_or(|s| r.status.state == s))
                    .filter(|r| {
                        user.as_ref()
                            .is_none_or(|u| r.status.owner.as_ref().is_some_and(|o| &o.user == u))
                    })
                    .map(|r| r.status.clone())
                    .collect();
                let _ = reply.send(Ok(JobList { jobs }));
            }
            Command::Get {
                name,
                removed,
                reply,
            } => {
                let found = match self.get(&name) {
                    Err(CoreError::NotFound(_)) if removed => self
                        .removed
                        .iter()
                        .rev()
                        .find(|s| s.name == name)
                        .cloned()
                        .ok_or(CoreError::NotFound(name)),
                    other => other,
                };
                let _ = reply.send(found);
            }
            Command::Cancel { name, by, reply } => {
                let result = self.cancel(&name, &by);
                self.replies.push((reply, result));
            }
            Command::Queues { reply } => {
                let _ = reply.send(Ok(self.queue_list()));
            }
            Command::Events {
                after,
                limit,
                job,
                reply,
            } => {
                let result = self
                    .store
                    .events(job.as_ref().map(|_| "job"), job.as_deref(), after, limit)
                    .map(|events| EventList { events })
                    .map_err(CoreError::from);
                let _ = reply.send(result);
            }
            Command::Logs {
                name,
                replica,
                reply,
            } => {
                let _ = reply.send(self.logs(&name, replica.as_deref()));
            }
        }
    }

    fn submit(
        &mut self,
        parsed: job::TrainingJob,
        text: String,
        owner: Owner,
    ) -> Result<JobStatus, CoreError> {
        let held: u64 = self
            .jobs
            .values()
            .filter(|r| r.is_active())
            .map(|r| u64::from(r.job.total_replicas()))
            .sum();
        let wanted = held + u64::from(parsed.total_replicas());
        if wanted > u64::from(self.max_replicas_per_agent) {
            return Err(CoreError::BadField {
                field: format!("spec.{}", parsed.source.replica_specs_key()),
                message: format!(
                    "the agent's unfinished jobs hold {held} replicas and this job has {}; it \
                     takes at most {} in all (jobs.max_replicas_per_agent); submit it when \
                     others have finished",
                    parsed.total_replicas(),
                    self.max_replicas_per_agent
                ),
            });
        }
        if let Some(existing) = self.jobs.get(&parsed.name) {
            return Err(CoreError::Conflict(format!(
                "a job named {:?} already exists ({}); remove it with `agentctl cancel {}`{} or choose another name",
                parsed.name,
                existing.status.state,
                parsed.name,
                if existing.status.state.is_finished() {
                    ""
                } else {
                    " (twice: once to cancel, once to remove)"
                },
            )));
        }
        let now = self.clock.now();
        let mut record = JobRecord::new(parsed, text, now);
        let by = owner.user.clone();
        record.status.owner = Some(owner);
        let name = record.status.name.clone();
        let status = record.status.clone();
        self.undo.entry(name.clone()).or_insert(None);
        self.jobs.insert(name.clone(), record);
        self.event(
            &name,
            "Submitted",
            format!("submitted by {by}, accepted into queue {}", status.queue),
        );
        self.dirty.insert(name);
        self.needs_pass = true;
        Ok(status)
    }

    fn get(&self, name: &str) -> Result<JobStatus, CoreError> {
        let record = self
            .jobs
            .get(name)
            .ok_or_else(|| CoreError::NotFound(name.to_owned()))?;
        let mut status = record.status.clone();
        status.events = self
            .store
            .events(Some("job"), Some(name), 0, 10_000)?
            .into_iter()
            .map(|e| agentd_api::jobs::JobEvent {
                time: e.time,
                reason: e.reason,
                message: e.message,
            })
            // This turn's events are written with it; the state above already includes them.
            .chain(
                self.events
                    .iter()
                    .filter(|e| e.kind == "job" && e.object == name)
                    .map(|e| agentd_api::jobs::JobEvent {
                        time: e.time,
                        reason: e.reason.clone(),
                        message: e.message.clone(),
                    }),
            )
            .collect();
        Ok(status)
    }

    fn cancel(&mut self, name: &str, by: &str) -> Result<JobStatus, CoreError> {
        let record = self
            .jobs
            .get(name)
            .ok_or_else(|| CoreError::NotFound(name.to_owned()))?;
        self.undo
            .entry(name.to_owned())
            .or_insert_with(|| Some(record.clone()));
        if record.status.state.is_finished() {
            let live = record.live_pgids().len();
            if live > 0 {
                // Replicas a finished job left running (cleanPodPolicy None) are stopped
                // first; the job is removed by the next cancel, once they are gone.
                self.stop_kept_replicas(name);
                let mut status = self.jobs[name].status.clone();
                "Stopping".clone_into(&mut status.reason);
                status.message = format!(
                    "stopping {live} replica{} left running; cancel again to remove the job",
                    if live == 1 { "" } else { "s" }
                );
                return Ok(status);
            }
            if record.allocation.is_some() {
                // Its gang is still being stopped: it holds its GPUs until the stop is over,
                // and goes then.
                let record = self.jobs.get_mut(name).expect("present");
                record.remove_when_released = true;
                let mut status = record.status.clone();
                "Removing".clone_into(&mut status.reason);
                "removed as soon as its replicas have stopped".clone_into(&mut status.message);
                return Ok(status);
            }
            let mut status = record.status.clone();
            "Removed".clone_into(&mut status.reason);
            status.message = format!("removed ({} before)", status.state);
            self.remove(name);
            return Ok(status);
        }
        self.finish(
            name,
            JobState::Cancelled,
            "Cancelled",
            format!("cancelled by {by}"),
        );
        Ok(self.jobs[name].status.clone())
    }

    /// At start-up, a stored job that cannot be read (its status is corrupt, or its manifest no
    /// longer parses): its row is kept, its processes are stopped (their groups are taken from
    /// what of the status can be read), and it is shown failed with the reason. Its GPUs are
    /// free only because its processes are gone.
    fn keep_unreadable(
        &mut self,
        name: &str,
        manifest: String,
        status_json: &str,
        status: Result<JobStatus, serde_json::Error>,
        parsed: Result<job::TrainingJob, SpecError>,
        now: Now,
    ) {
        let mut problems = Vec::new();
        if let Err(e) = &status {
            problems.push(format!("its stored status is unreadable ({e})"));
        }
        if let Err(e) = &parsed {
            problems.push(format!("its manifest no longer parses ({e})"));
        }
        let message = format!(
            "{}; it is kept as failed: read it with `agentctl job {name}`, remove it with `agentctl cancel {name}`",
            problems.join(" and ")
        );
        tracing::error!(job = name, "{message}");
        let groups: Vec<u32> = match &status {
            Ok(s) => s
                .replicas
                .iter()
                .filter(|r| r.state == ReplicaState::Running)
                .filter_map(|r| r.pid)
                .collect(),
            // What can be read of it: a corrupt status may still be JSON.
            Err(_) => serde_json::from_str::<serde_json::Value>(status_json)
                .ok()
                .and_then(|v| v.get("replicas").and_then(|r| r.as_array()).cloned())
                .unwrap_or_default()
                .iter()
                .filter(|r| r.get("state").and_then(|s| s.as_str()) == Some("Running"))
                .filter_map(|r| r.get("pid").and_then(serde_json::Value::as_u64))
                .filter_map(|p| u32::try_from(p).ok())
                .collect(),
        };
        // Its units by their exact names, from what of the status can be read.
        let stored = serde_json::from_str::<serde_json::Value>(status_json).ok();
        let generation = stored
            .as_ref()
            .and_then(|v| v.get("generation")?.as_u64())
            .and_then(|g| u32::try_from(g).ok());
        let units: Vec<String> = stored
            .as_ref()
            .and_then(|v| v.get("replicas")?.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.get("name")?.as_str().map(str::to_owned))
            .filter_map(|replica| crate::systemd::unit_name(name, &replica, generation?).ok())
            .collect();
        self.executor.stop_leftover_units(&units);
        for pgid in groups {
            let killed = local::kill_leftovers(pgid, name);
            if killed > 0 {
                tracing::warn!(
                    job = name,
                    pgid,
                    killed,
                    "stopped the replicas of an unreadable job"
                );
            }
        }
        let job = parsed.unwrap_or_else(|_| job::TrainingJob {
            name: name.to_owned(),
            namespace: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            source: job::SourceKind::default(),
            written: job::WrittenKeys::default(),
            spec: job::JobSpec {
                queue: Some(self.default_queue.clone()),
                ..job::JobSpec::default()
            },
        });
        let mut record = match status {
            Ok(status) => JobRecord::restore(job, manifest, status, now),
            Err(_) => JobRecord::new(job, manifest, now),
        };
        for r in &mut record.status.replicas {
            if r.state == ReplicaState::Running {
                r.state = ReplicaState::Terminated;
            }
        }
        if !record.status.state.is_finished() {
            record.finish(JobState::Failed, "Unreadable", &message, now);
        }
        self.jobs.insert(name.to_owned(), record);
        self.dirty.insert(name.to_owned());
        self.event(name, "Unreadable", message);
    }

    /// Stops the replicas a finished job left running; its allocation is freed once they
    /// are gone.
    fn stop_kept_replicas(&mut self, name: &str) {
        let Some(record) = self.jobs.get_mut(name) else {
            return;
        };
        let groups = std::mem::take(&mut record.kept);
        for r in &mut record.status.replicas {
            if r.state == ReplicaState::Running {
                r.state = ReplicaState::Terminated;
            }
        }
        let generation = record.status.generation;
        self.dirty.insert(name.to_owned());
        self.event(
            name,
            "Stopping",
            format!("stopping {} replica(s) left running", groups.len()),
        );
        self.stop_gang(name, generation, groups);
    }

    fn remove(&mut self, name: &str) {
        if let Some(record) = self.jobs.remove(name) {
            if self.removed.len() >= REMEMBER_REMOVED {
                self.removed.pop_front();
            }
            self.removed.push_back(record.status.clone());
            // Its replicas still being started are stopped as their reports come in.
            self.in_flight = self.in_flight.saturating_sub(record.launching);
            self.dirty.remove(name);
            self.deleted.insert(name.to_owned());
            let _ = std::fs::remove_dir_all(self.log_dir(name));
        }
    }

    fn queue_list(&self) -> QueueList {
        let queues = self
            .queues
            .iter()
            .map(|(name, q)| {
                let in_queue = self.jobs.values().filter(|r| &r.status.queue == name);
                let (mut queued, mut running, mut gpus) = (0, 0, 0);
                for r in in_queue {
                    match r.status.state {
                        JobState::Queued | JobState::Restarting => queued += 1,
                        JobState::Placed | JobState::Starting | JobState::Running => {
                            running += 1;
                            gpus += r.allocated_gpus();
                        }
                        _ => {}
                    }
                }
                QueueStatus {
                    name: name.clone(),
                    priority: q.priority,
                    max_running_jobs: q.max_running_jobs,
                    max_gpus: q.max_gpus,
                    default: *name == self.default_queue,
                    queued,
                    running,
                    gpus_in_use: gpus,
                }
            })
            .collect();
        QueueList { queues }
    }

    fn logs(&self, name: &str, replica: Option<&str>) -> Result<LogFiles, CoreError> {
        let record = self
            .jobs
            .get(name)
            .ok_or_else(|| CoreError::NotFound(name.to_owned()))?;
        let replica = match replica {
            Some(r) => {
                if !record.status.replicas.iter().any(|s| s.name == r) {
                    return Err(CoreError::BadField {
                        field: "replica".to_owned(),
                        message: format!(
                            "job {name} has no replica {r:?}; replicas: {}",
                            record
                                .status
                                .replicas
                                .iter()
                                .map(|s| s.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
                r.to_owned()
            }
            None => record
                .status
                .replicas
                .first()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
        };
        let current = self.log_dir(name).join(format!("{replica}.log"));
        Ok(LogFiles {
            replica,
            files: vec![local::rotated_path(&current), current],
            complete: record.status.state.is_finished() && record.live_pgids().is_empty(),
        })
    }

    fn log_dir(&self, name: &str) -> PathBuf {
        self.state_dir.join("logs").join(name)
    }

    /// Records an event of a job, written with the turn's batch.
    fn event(&mut self, name: &str, reason: &str, message: String) {
        tracing::info!(job = name, reason, "{message}");
        self.events.push(NewEvent {
            time: self.clock.now().wall,
            kind: "job",
            object: name.to_owned(),
            reason: reason.to_owned(),
            message,
        });
    }

    fn internal(&mut self, internal: Internal) {
        match internal {
            Internal::GangStopped { job, generation } => {
                if let Some(record) = self.jobs.get_mut(&job)
                    && record.release(generation)
                {
                    if record.remove_when_released {
                        self.remove(&job);
                    } else {
                        self.dirty.insert(job);
                    }
                    self.needs_pass = true;
                }
            }
        }
    }

    fn gpu_health_changed(&mut self, change: &GpuHealthEvent) {
        let (reason, level) = if change.healthy {
            ("GpuHealthy", "info")
        } else {
            ("GpuUnhealthy", "warn")
        };
        tracing::debug!(level, "{change}");
        self.events.push(NewEvent {
            time: self.clock.now().wall,
            kind: "node",
            object: self.node.clone(),
            reason: reason.to_owned(),
            message: change.to_string(),
        });
        self.needs_pass = true;
    }

    /// A new inventory: gangs on GPUs that turned unhealthy restart elsewhere.
    fn inventory_changed(&mut self) {
        let inventory = self.inventory.borrow_and_update().clone();
        self.keep_sample(&inventory);
        let unhealthy: BTreeMap<&str, &agentd_api::GpuInfo> = inventory
            .gpus
            .iter()
            .filter(|g| !g.healthy)
            .map(|g| (g.uuid.as_str(), g))
            .collect();
        let hit: Vec<(String, String)> = self
            .jobs
            .values()
            // Only a gang that holds its GPUs now is hit: a queued job still lists the GPUs of
            // its last placement, and one fault is one restart, not one per refresh.
            .filter(|r| {
                matches!(
                    r.status.state,
                    JobState::Placed | JobState::Starting | JobState::Running
                )
            })
            .filter_map(|r| {
                r.status.replicas.iter().find_map(|replica| {
                    replica
                        .gpus
                        .iter()
                        .find_map(|uuid| unhealthy.get(uuid.as_str()))
                        .map(|gpu| {
                            (
                                r.status.name.clone(),
                                format!(
                                    "GPU {} ({}) of {} became unhealthy: {}",
                                    gpu.index,
                                    gpu.uuid,
                                    replica.name,
                                    gpu.health_reason.as_deref().unwrap_or("unknown reason")
                                ),
                            )
                        })
                })
            })
            .collect();
        for (name, message) in hit {
            self.restart_gang(&name, "GpuUnhealthy", &message);
        }
        self.needs_pass = true;
    }

    /// Keeps a compact reading (CPU, memory, each GPU's use and health) in the bounded window
    /// of samples, for looking back at what a node was doing when something went wrong.
    fn keep_sample(&self, inventory: &NodeInventory) {
        let sample = serde_json::json!({
            "cpu_utilization": inventory.cpu.utilization,
            "memory_available_bytes": inventory.memory.available_bytes,
            "gpus": inventory.gpus.iter().map(|g| serde_json::json!({
                "index": g.index,
                "utilization_gpu_percent": g.utilization_gpu_percent,
                "memory_used_bytes": g.memory_used_bytes,
                "temperature_celsius": g.temperature_celsius,
                "power_usage_watts": g.power_usage_watts,
                "healthy": g.healthy,
            })).collect::<Vec<_>>(),
        });
        if let Err(e) = self.store.add_inventory_sample(
            inventory.sampled_at,
            &sample.to_string(),
            self.sample_retention,
        ) {
            tracing::warn!("cannot keep the inventory sample: {e}");
        }
    }

    /// Checks deadlines, schedule time-outs, back-offs and the time-to-live of finished jobs.
    /// Keeps the job logs within their overall budget, off the core's task: the logs of the
    /// jobs that finished first go first; those of jobs with processes left never do.
    fn keep_logs_in_budget(&self) {
        let mut finished: Vec<(f64, String)> = self
            .jobs
            .values()
            .filter(|r| r.status.state.is_finished() && r.live_pgids().is_empty())
            .map(|r| (r.status.finished_at.unwrap_or(0.0), r.status.name.clone()))
            .collect();
        finished.sort_by(|a, b| a.0.total_cmp(&b.0));
        let names: Vec<String> = finished.into_iter().map(|(_, n)| n).collect();
        let root = self.state_dir.join("logs");
        let budget = self.logs_budget;
        tokio::task::spawn_blocking(move || {
            let removed = log_budget::enforce(&root, &names, budget);
            if !removed.is_empty() {
                tracing::info!(
                    jobs = removed.join(", "),
                    "deleted the logs of finished jobs: job logs were over jobs.logs_max_total_bytes ({budget} bytes)"
                );
            }
        });
    }

    fn tick(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(LOG_BUDGET_TICKS) {
            self.keep_logs_in_budget();
        }
        if self.write_failure.is_some() && self.store.check_writable().is_ok() {
            tracing::info!("the database takes writes again");
            self.write_failure = None;
            self.needs_pass = true;
            self.report_metrics();
        }
        let now = self.clock.now();
        let mut expired = Vec::new();
        let mut requeue = Vec::new();
        let mut remove = Vec::new();
        for (name, r) in &self.jobs {
            match r.due(now) {
                Some(Due::Expire { reason, message }) => {
                    expired.push((name.clone(), reason, message));
                }
                Some(Due::Requeue) => requeue.push(name.clone()),
                Some(Due::Remove) => remove.push(name.clone()),
                None => {}
            }
        }
        for (name, reason, message) in expired {
            self.finish(&name, JobState::Failed, reason, message);
        }
        for name in requeue {
            let record = self.jobs.get_mut(&name).expect("listed above");
            record.requeue(now);
            self.dirty.insert(name.clone());
            self.needs_pass = true;
            self.event(
                &name,
                "Requeued",
                "back-off over; waiting to be placed again".to_owned(),
            );
        }
        for name in remove {
            tracing::info!(
                job = name,
                "removing finished job: ttlSecondsAfterFinished passed"
            );
            self.remove(&name);
        }
    }

    fn replica_report(&mut self, report: ReplicaReport) {
        let ReplicaReport {
            job,
            replica,
            generation,
            event,
        } = report;
        match event {
            ReplicaEvent::Started { pid } => self.replica_started(&job, &replica, generation, pid),
            ReplicaEvent::StartFailed { message, transient } => {
                self.replica_start_failed(&job, &replica, generation, message, transient);
            }
            ReplicaEvent::Exited { outcome } => {
                let exit = ReplicaExit {
                    job,
                    replica,
                    generation,
                    outcome,
                };
                // A replica that ends before the rest of its gang has started is taken once
                // the gang is complete: a gang is Running before any of its ends counts.
                if let Some(record) = self.jobs.get_mut(&exit.job)
                    && record.status.generation == exit.generation
                    && record.launching > 0
                {
                    record.early_exits.push(exit);
                    return;
                }
                self.replica_exited(&exit);
            }
        }
    }

    /// The record whose current generation is waiting for this launch report, counted.
    fn launch_reported(&mut self, job: &str, generation: u32) -> Option<&mut JobRecord> {
        let record = self
            .jobs
            .get_mut(job)
            .filter(|r| r.status.generation == generation && r.launching > 0)?;
        record.launching -= 1;
        self.in_flight = self.in_flight.saturating_sub(1);
        Some(record)
    }

    fn replica_started(&mut self, job: &str, replica: &str, generation: u32, pid: u32) {
        let now = self.clock.now();
        let Some(record) = self.launch_reported(job, generation) else {
            // Every launch is counted until reported, so this is a process nobody waits for.
            tracing::warn!(job, replica, pid, "stopping a replica of no current launch");
            local::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            return;
        };
        record.replica_started(replica, pid, now.wall);
        if let Some(stop) = &mut record.pending_stop {
            stop.push(pid);
        }
        self.dirty.insert(job.to_owned());
        self.launch_settled(job);
    }

    fn replica_start_failed(
        &mut self,
        job: &str,
        replica: &str,
        generation: u32,
        message: String,
        transient: bool,
    ) {
        let Some(record) = self.launch_reported(job, generation) else {
            return;
        };
        if record.status.state == JobState::Starting && record.pending_stop.is_none() {
            // A moment's shortage (EMFILE, EAGAIN) is retryable: a gang restart, counted, where
            // the replica's restartPolicy restarts anything.
            let retries = record::parse_replica_name(replica)
                .and_then(|(t, _)| record.job.spec.replica_specs.get(&t))
                .is_some_and(|s| s.restart_policy != job::RestartPolicy::Never);
            if transient && retries {
                self.restart_gang(job, "StartFailed", &message);
            } else {
                self.finish(job, JobState::Failed, "StartFailed", message);
            }
        }
        self.launch_settled(job);
    }

    /// After a launch report: once every replica of the generation is accounted for, the
    /// gang is running, or (stopped meanwhile) its stop goes ahead.
    fn launch_settled(&mut self, name: &str) {
        let Some(record) = self.jobs.get_mut(name).filter(|r| r.launching == 0) else {
            return;
        };
        let generation = record.status.generation;
        let early_exits = std::mem::take(&mut record.early_exits);
        if let Some(pgids) = record.pending_stop.take() {
            self.stop_gang(name, generation, pgids);
        } else if record.status.state == JobState::Starting {
            self.gang_running(name);
        }
        for exit in &early_exits {
            self.replica_exited(exit);
        }
    }

    fn gang_running(&mut self, name: &str) {
        let Some(record) = self.jobs.get_mut(name) else {
            return;
        };
        let generation = record.status.generation;
        let count = record.status.replicas.len();
        let replicas = if count == 1 {
            "1 replica".to_owned()
        } else {
            format!("all {count} replicas")
        };
        record.set_state(JobState::Running, "Running", &format!("{replicas} running"));
        if let (1, Some(metrics)) = (generation, &self.metrics) {
            let waited = (self.clock.now().wall - record.status.submitted_at).max(0.0);
            metrics.submit_to_running(Duration::from_secs_f64(waited));
        }
        self.dirty.insert(name.to_owned());
        self.event(
            name,
            "Running",
            format!("{replicas} started (generation {generation})"),
        );
    }

    fn replica_exited(&mut self, exit: &ReplicaExit) {
        let Some(record) = self.jobs.get_mut(&exit.job) else {
            return;
        };
        if exit.generation != record.status.generation {
            return;
        }
        let now = self.clock.now();
        let Some(outcome) = record.replica_ended(&exit.replica, exit.outcome, now.wall) else {
            return;
        };
        // The last replica a finished job left running has ended: what is left of its process
        // groups is swept, and then the allocation is free.
        let last_kept = (record.status.state.is_finished()
            && !record.kept.is_empty()
            && record.allocation.is_some()
            && record.live_pgids().is_empty())
        .then(|| (record.status.generation, std::mem::take(&mut record.kept)));
        self.dirty.insert(exit.job.clone());
        let described = local::describe(exit.outcome);
        match outcome {
            record::ReplicaVerdict::Ignored => {
                if let Some((generation, groups)) = last_kept {
                    self.event(
                        &exit.job,
                        "ReplicasEnded",
                        format!(
                            "{} ended ({described}); no replica is left running",
                            exit.replica
                        ),
                    );
                    self.stop_gang(&exit.job, generation, groups);
                }
            }
            record::ReplicaVerdict::Succeeded { job_done: false } => {
                self.event(
                    &exit.job,
                    "ReplicaSucceeded",
                    format!("{} completed", exit.replica),
                );
            }
            record::ReplicaVerdict::Succeeded { job_done: true } => {
                self.finish(
                    &exit.job,
                    JobState::Succeeded,
                    "Succeeded",
                    job::success_message(&self.jobs[&exit.job].job, &exit.replica),
                );
            }
            record::ReplicaVerdict::Restart { policy } => {
                self.restart_gang(
                    &exit.job,
                    "ReplicaFailed",
                    &format!(
                        "{} ended ({described}); restartPolicy {policy:?} restarts the gang",
                        exit.replica
                    ),
                );
            }
            record::ReplicaVerdict::Fail { policy } => {
                self.finish(
                    &exit.job,
                    JobState::Failed,
                    "ReplicaFailed",
                    format!("{} ended ({described}), a permanent failure under restartPolicy {policy:?}", exit.replica),
                );
            }
        }
    }

    /// Restarts a gang, or fails the job when its backoffLimit is spent.
    fn restart_gang(&mut self, name: &str, reason: &str, message: &str) {
        let Some(record) = self.jobs.get_mut(name) else {
            return;
        };
        let limit = record.status.backoff_limit;
        if record.status.restarts >= limit {
            self.finish(
                name,
                JobState::Failed,
                "BackoffLimitExceeded",
                format!("{message}; no restarts left (backoffLimit {limit})"),
            );
            return;
        }
        // The job module's rule (doubling, capped), scaled to the configured base and cap.
        let (base, cap) = self.backoff;
        let factor = job::backoff_delay(record.status.restarts).as_secs_f64()
            / job::BACKOFF_BASE.as_secs_f64();
        let delay = base.mul_f64(factor).min(cap);
        let restart_at = self.clock.now().mono + delay.as_secs_f64();
        let pgids = record.begin_restart(reason, message, restart_at);
        if let Some(metrics) = &self.metrics {
            metrics.gang_restarted(reason);
        }
        let generation = record.status.generation;
        let restarts = record.status.restarts;
        self.stop_gang(name, generation, pgids);
        self.dirty.insert(name.to_owned());
        self.event(
            name,
            reason,
            format!(
                "{message}; restart {restarts} of {limit} in {:.1} s",
                delay.as_secs_f64()
            ),
        );
    }

    /// Ends a job and stops what is left of its gang.
    fn finish(&mut self, name: &str, state: JobState, reason: &str, message: String) {
        let Some(record) = self.jobs.get_mut(name) else {
            return;
        };
        let pgids = record.finish(state, reason, &message, self.clock.now());
        let generation = record.status.generation;
        // Replicas left running (cleanPodPolicy None) keep the gang's allocation until the
        // last of them ends; see `replica_exited`.
        if record.live_pgids().is_empty() {
            self.stop_gang(name, generation, pgids);
        }
        self.dirty.insert(name.to_owned());
        self.needs_pass = true;
        self.event(name, reason, message);
    }

    /// Stops process groups in the background and tells the core when they are all gone. While
    /// replicas of the gang are still being started, the stop waits for them (see
    /// `launch_settled`), so that none is left running outside the gang's allocation.
    fn stop_gang(&mut self, name: &str, generation: u32, pgids: Vec<u32>) {
        if let Some(record) = self.jobs.get_mut(name)
            && record.launching > 0
        {
            record.pending_stop.get_or_insert_default().extend(pgids);
            return;
        }
        self.stops.push((name.to_owned(), generation, pgids));
    }

    /// Starts the stops of the written turn in the background.
    fn run_stops(&mut self) {
        for (job, generation, pgids) in self.stops.drain(..) {
            let done = self.internal_tx.clone();
            let stop = self.executor.stop(pgids, self.kill_grace);
            tokio::spawn(async move {
                stop.await;
                let _ = done.send(Internal::GangStopped { job, generation });
            });
        }
    }

    /// Drains or resumes the machine; the marker file keeps a drain across agent restarts.
    fn set_drained(&mut self, drained: bool) {
        let marker = self.state_dir.join(DRAINED_MARKER);
        let written = if drained {
            fs_err::write(&marker, b"drained by agentctl drain\n")
        } else {
            fs_err::remove_file(&marker)
        };
        if let Err(e) = written {
            tracing::warn!("the drain holds until the agent stops, not across a restart: {e}");
        }
        self.drained = drained;
        self.needs_pass = true;
        tracing::info!(node = %self.node, drained, "node drain changed");
    }

    /// One scheduling pass over the queued gangs; places and starts what fits.
    fn schedule(&mut self) {
        self.needs_pass = false;
        let queued: Vec<sched::Gang> = self
            .jobs
            .values()
            .filter_map(JobRecord::queued_gang)
            .collect();
        if queued.is_empty() {
            return;
        }
        let inventory = self.inventory.borrow().clone();
        let mut node = node_capacity(&inventory);
        node.labels.extend(self.labels.clone());
        // Nothing is placed while placements cannot be written, nor on a drained machine.
        node.schedulable = self.write_failure.is_none() && !self.drained;
        let nodes = [node];
        let now = self.clock.now();
        let running: Vec<sched::RunningGang> = self
            .jobs
            .values()
            .filter_map(|r| r.running_gang(now))
            .collect();
        let queues: Vec<QueueConfig> = self
            .queues
            .iter()
            .map(|(name, q)| QueueConfig {
                name: name.clone(),
                priority: q.priority,
                max_running_jobs: q.max_running_jobs,
                max_gpus: q.max_gpus,
            })
            .collect();
        let pass_started = std::time::Instant::now();
        let decision = sched::schedule(
            &Snapshot {
                now: now.wall,
                nodes: &nodes,
                running: &running,
                queued: &queued,
                queues: &queues,
            },
            &self.policy,
        );
        if let Some(metrics) = &self.metrics {
            metrics.scheduling_pass(pass_started.elapsed());
        }
        for mut waiting in decision.waiting {
            let Some(record) = self.jobs.get_mut(&waiting.gang) else {
                continue;
            };
            if self.drained {
                waiting.message = format!(
                    "{}; node {} is drained (agentctl resume {} lets new work in)",
                    waiting.message, self.node, self.node
                );
            }
            if record.status.reason != waiting.reason || record.status.message != waiting.message {
                record.status.reason.clone_from(&waiting.reason);
                record.status.message.clone_from(&waiting.message);
                self.dirty.insert(waiting.gang.clone());
                self.event(&waiting.gang, &waiting.reason, waiting.message);
            }
        }
        for placement in decision.placements {
            self.start(&placement, &inventory);
        }
    }

    /// Starts a placed gang: ports, environment, one process per replica.
    fn start(&mut self, placement: &sched::Placement, inventory: &NodeInventory) {
        let name = placement.gang.clone();
        let log_dir = self.log_dir(&name);
        let Some(record) = self.jobs.get_mut(&name) else {
            return;
        };
        self.undo
            .entry(name.clone())
            .or_insert_with(|| Some(record.clone()));
        let summary = record.place(placement, inventory, self.clock.now());
        self.dirty.insert(name.clone());
        self.event(&name, "Placed", summary);
        let record = self.jobs.get_mut(&name).expect("present");
        let launches = match record.launch_specs(&log_dir, inventory) {
            Ok(launches) => launches,
            Err(message) => {
                self.finish(&name, JobState::Failed, "StartFailed", message);
                return;
            }
        };
        record.set_state(JobState::Starting, "Starting", "starting replicas");
        record.launching = launches.len() as u32;
        self.in_flight += record.launching;
        self.launches.extend(launches);
    }

    /// Brings the metrics up to date with the jobs: transitions of the jobs this turn changed,
    /// and the counts by queue and state, queue depths and the node's allocation.
    fn report_metrics(&mut self) {
        let Some(metrics) = &self.metrics else {
            for name in &self.dirty {
                if let Some(record) = self.jobs.get_mut(name) {
                    record.entered.clear();
                }
            }
            return;
        };
        for name in &self.dirty {
            let Some(record) = self.jobs.get_mut(name) else {
                continue;
            };
            for state in record.entered.drain(..) {
                let before = self.reported.insert(name.clone(), state);
                if before != Some(state) {
                    let from = before.map_or("None", JobState::as_str);
                    metrics.job_state_changed(&record.status.queue, from, state.as_str());
                }
            }
        }
        for name in &self.deleted {
            self.reported.remove(name);
        }
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let mut depth: BTreeMap<&str, u64> = self.queues.keys().map(|q| (q.as_str(), 0)).collect();
        let mut allocated = sched::Resources::default();
        let mut deadlines: BTreeMap<&str, Vec<std::time::Instant>> = self
            .queues
            .keys()
            .map(|q| (q.as_str(), Vec::new()))
            .collect();
        let (now, mono) = (self.clock.now(), std::time::Instant::now());
        for record in self.jobs.values() {
            let queue = record.status.queue.as_str();
            if record.status.state == JobState::Queued
                && let Some(limit) = record.job.spec.run_policy.schedule_timeout_seconds
            {
                let left = record.queued_since + limit as f64 - now.mono;
                let deadline = if left >= 0.0 {
                    mono.checked_add(Duration::from_secs_f64(left.min(1e12)))
                } else {
                    mono.checked_sub(Duration::from_secs_f64((-left).min(1e12)))
                };
                if let Some(deadline) = deadline {
                    deadlines.entry(queue).or_default().push(deadline);
                }
            }
            *counts
                .entry((queue, record.status.state.as_str()))
                .or_default() += 1;
            if record.status.state == JobState::Queued {
                *depth.entry(queue).or_default() += 1;
            }
            for a in record.allocation.iter().flat_map(|a| &a.assignments) {
                allocated.gpus += a.gpu_indices.len() as u32;
                allocated.cpu_milli += a.resources.cpu_milli;
                allocated.memory_mib += a.resources.memory_mib;
            }
        }
        metrics.set_jobs(counts.iter().map(|(&(q, s), &n)| (q, s, n)));
        for (queue, n) in depth {
            metrics.set_queue_depth(queue, n);
        }
        for (queue, d) in deadlines {
            metrics.set_queue_deadlines(queue, d);
        }
        let node = node_capacity(&self.inventory.borrow());
        let capacity = sched::Resources {
            gpus: node.gpus.iter().filter(|g| g.healthy).count() as u32,
            cpu_milli: node.cpu_milli,
            memory_mib: node.memory_mib,
        };
        metrics.set_node_allocation(
            &self.node,
            NodeAllocation {
                capacity,
                allocated,
                schedulable: node.schedulable && self.write_failure.is_none() && !self.drained,
            },
        );
    }

    /// Writes the turn's changes in one transaction; then sends the replies that waited on it,
    /// starts the placed replicas and stops what was stopped. A turn that cannot be written is
    /// undone instead (see `undo`): its requests are answered with the cause, nothing it
    /// placed is started, and nothing new is placed until writes succeed again.
    fn commit(&mut self) -> Result<(), CoreError> {
        if self.dirty.is_empty() && self.deleted.is_empty() && self.events.is_empty() {
            self.turn_written();
            return Ok(());
        }
        let now = self.clock.now().wall;
        let mut writes: Vec<JobWrite> = self
            .deleted
            .iter()
            .map(|name| JobWrite::Delete { name: name.clone() })
            .collect();
        for name in &self.dirty {
            if let Some(record) = self.jobs.get(name) {
                writes.push(JobWrite::Upsert {
                    name: name.clone(),
                    manifest: record.manifest.clone(),
                    status: serde_json::to_string(&record.status).expect("status serializes"),
                    time: now,
                });
            }
        }
        match self.store.write_batch(&writes, &self.events) {
            Ok(()) => {
                if let Some(failure) = self.write_failure.take() {
                    tracing::info!("job changes are written again (they failed: {failure})");
                    self.needs_pass = true;
                }
                if !self.dirty.is_empty() || !self.deleted.is_empty() {
                    self.report_metrics();
                }
                self.dirty.clear();
                self.deleted.clear();
                self.events.clear();
                self.turn_written();
                Ok(())
            }
            Err(e) => {
                let cause = e.to_string();
                if self.write_failure.is_none() {
                    tracing::error!(
                        "cannot write job changes: {cause}; nothing new starts until writes succeed"
                    );
                }
                self.write_failure = Some(cause.clone());
                self.undo_turn(&cause);
                self.report_metrics();
                Err(e.into())
            }
        }
    }

    /// The turn is on disk: its effects may happen.
    fn turn_written(&mut self) {
        self.undo.clear();
        for (reply, result) in self.replies.drain(..) {
            let _ = reply.send(result);
        }
        self.launch();
        self.run_stops();
    }

    /// Puts back every job a request or a placement changed this turn, drops what they would
    /// have started or stopped, and answers their requests with `cause`. What else changed
    /// (replicas that ended, stops that are facts) is kept, to be written by a later turn.
    fn undo_turn(&mut self, cause: &str) {
        let undone: BTreeMap<String, Option<JobRecord>> = std::mem::take(&mut self.undo);
        for (name, before) in undone {
            let launching_now = self.jobs.get(&name).map_or(0, |r| r.launching);
            let launching_before = before.as_ref().map_or(0, |r| r.launching);
            self.in_flight = self
                .in_flight
                .saturating_sub(launching_now)
                .saturating_add(launching_before);
            match before {
                Some(record) => {
                    self.jobs.insert(name.clone(), record);
                }
                None => {
                    self.jobs.remove(&name);
                }
            }
            self.dirty.remove(&name);
            self.deleted.remove(&name);
            self.events
                .retain(|e| !(e.kind == "job" && e.object == name));
            self.stops.retain(|(job, _, _)| *job != name);
            self.launches.retain(|spec| spec.job != name);
        }
        // Every launch of the turn came from a placement, and every placement was undone.
        debug_assert!(self.launches.is_empty());
        self.launches.clear();
        for (reply, result) in self.replies.drain(..) {
            let answer = result.and(Err(CoreError::NotWritten(cause.to_owned())));
            let _ = reply.send(answer);
        }
        // Stops that are facts go ahead: a replica that ended or a gang that failed is stopped
        // whether or not the disk took the news.
        self.run_stops();
        self.needs_pass = true;
    }

    fn launch(&mut self) {
        for spec in self.launches.drain(..) {
            self.executor.launch(spec);
        }
    }
}

/// How replicas are started, from `jobs.replica_units` and whether systemd runs the agent.
fn runner(config: &Config) -> Result<local::Runner, CoreError> {
    let available = crate::systemd::under_systemd() && crate::systemd::systemd_running();
    let units = match config.jobs.replica_units {
        ReplicaUnits::Off => false,
        ReplicaUnits::Auto => available,
        ReplicaUnits::On if available => true,
        ReplicaUnits::On => {
            return Err(CoreError::BadField {
                field: "jobs.replica_units".to_owned(),
                message: "is \"on\", but the agent does not run under a running systemd \
                          (no /run/systemd/system, or no INVOCATION_ID); use \"auto\" or \"off\""
                    .to_owned(),
            });
        }
    };
    let runner = if units {
        local::Runner::Units {
            part_of: crate::systemd::own_unit(),
            kill_grace: config.jobs.kill_grace,
        }
    } else {
        local::Runner::Processes
    };
    tracing::info!(
        ?runner,
        "replicas start as {}",
        if units {
            "transient systemd units"
        } else {
            "child processes"
        }
    );
    Ok(runner)
}

/// The node as the scheduler sees it: every GPU with its health, all CPUs and memory.
pub fn node_capacity(inventory: &NodeInventory) -> NodeCapacity {
    let product = inventory.gpu_product();
    let mut labels =
        BTreeMap::from([("kubernetes.io/hostname".to_owned(), inventory.name.clone())]);
    if !product.is_empty() {
        labels.insert("agentd.io/gpu.product".to_owned(), product);
    }
    NodeCapacity {
        name: inventory.name.clone(),
        labels,
        gpus: inventory
            .gpus
            .iter()
            .map(|g| sched::GpuSlot {
                index: g.index,
                uuid: g.uuid.clone(),
                product: g.name.clone(),
                memory_mib: g.memory_total_bytes / (1024 * 1024),
                healthy: g.healthy,
            })
            .collect(),
        cpu_milli: u64::from(inventory.cpu.logical_cores) * 1000,
        memory_mib: inventory.memory.total_bytes / (1024 * 1024),
        schedulable: true,
    }
}
