//! The core loop: the one task that owns the jobs. Handlers send it `Command`s; the executor
//! reports replicas started, failed to start and exited; the inventory tells it about GPUs.
//! Each turn it applies what arrived, runs a scheduling pass if anything changed, and writes
//! every change in one transaction before it answers the requests that caused them (so a job
//! acknowledged with 201 is on disk) and before it hands placed replicas to the executor (so
//! no replica runs for a placement that is not on disk). It never waits for a process.

mod record;
mod recovery;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentd_api::NodeInventory;
use agentd_api::jobs::{EventList, JobList, JobState, JobStatus, QueueList, QueueStatus};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, QueueSettings, ReplicaUnits};
use crate::exec::local::{self, LaunchSpec, LocalExecutor, ReplicaEvent, ReplicaReport};
use crate::inventory::{GpuHealthEvent, unix_now};
use crate::job::{self, SpecError};
use crate::metrics::{Metrics, NodeAllocation};
use crate::sched::{self, NodeCapacity, Policy, QueueConfig, Snapshot};
use crate::store::{JobWrite, NewEvent, Store, StoreError};

pub use record::JobRecord;
use record::ReplicaExit;

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
    #[error(transparent)]
    Store(#[from] StoreError),
}

type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// A request to the core, from the API.
#[derive(Debug)]
pub enum Command {
    Submit {
        manifest: Vec<u8>,
        reply: Reply<JobStatus>,
    },
    List {
        queue: Option<String>,
        state: Option<JobState>,
        reply: Reply<JobList>,
    },
    Get {
        name: String,
        reply: Reply<JobStatus>,
    },
    /// Cancels an active job; removes a finished one.
    Cancel {
        name: String,
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
    kill_grace: Duration,
    backoff: (Duration, Duration),
    sample_retention: Duration,
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
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
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
            kill_grace: config.jobs.kill_grace,
            backoff: (config.jobs.restart_backoff, config.jobs.restart_backoff_max),
            sample_retention: config.inventory.sample_retention,
            store,
            executor: LocalExecutor::new(reports, config.jobs.log_max_bytes, runner(config)?),
            launches: Vec::new(),
            in_flight: 0,
            policy: Policy::agentd(),
            jobs: BTreeMap::new(),
            inventory,
            internal_tx,
            dirty: BTreeSet::new(),
            deleted: BTreeSet::new(),
            events: Vec::new(),
            after_commit: Vec::new(),
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
            if let Err(e) = self.commit() {
                tracing::error!("cannot write job changes: {e}");
            }
        }
        self.shutdown().await;
        self.store
    }

    /// Stops every running gang (the agent is going away; the jobs are restarted when it
    /// comes back) and writes the final state.
    async fn shutdown(&mut self) {
        let mut groups = Vec::new();
        for record in self.jobs.values() {
            groups.extend(record.live_pgids());
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
            Command::Submit { manifest, reply } => {
                let result = self.submit(&manifest);
                self.after_commit.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
            Command::List {
                queue,
                state,
                reply,
            } => {
                let jobs = self
                    .jobs
                    .values()
                    .filter(|r| queue.as_ref().is_none_or(|q| &r.status.queue == q))
                    .filter(|r| state.is_none_or(|s| r.status.state == s))
                    .map(|r| r.status.clone())
                    .collect();
                let _ = reply.send(Ok(JobList { jobs }));
            }
            Command::Get { name, reply } => {
                let _ = reply.send(self.get(&name));
            }
            Command::Cancel { name, reply } => {
                let result = self.cancel(&name);
                self.after_commit.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
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

    fn submit(&mut self, manifest: &[u8]) -> Result<JobStatus, CoreError> {
        let mut parsed = job::parse(manifest)?;
        job::validate_for_standalone(&parsed)?;
        record::check_standalone_env(&parsed)?;
        let queue = parsed
            .spec
            .queue
            .clone()
            .unwrap_or_else(|| self.default_queue.clone());
        if !self.queues.contains_key(&queue) {
            return Err(CoreError::BadField {
                field: "spec.queue".to_owned(),
                message: format!(
                    "no queue named {queue:?}; queues: {}",
                    self.queues.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        parsed.spec.queue = Some(queue);
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
        let now = unix_now();
        let text = String::from_utf8_lossy(manifest).into_owned();
        let record = JobRecord::new(parsed, text, now);
        let name = record.status.name.clone();
        let status = record.status.clone();
        self.jobs.insert(name.clone(), record);
        self.event(
            &name,
            "Submitted",
            format!("accepted into queue {}", status.queue),
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

    fn cancel(&mut self, name: &str) -> Result<JobStatus, CoreError> {
        let record = self
            .jobs
            .get(name)
            .ok_or_else(|| CoreError::NotFound(name.to_owned()))?;
        if record.status.state.is_finished() {
            let status = record.status.clone();
            self.remove(name);
            return Ok(status);
        }
        self.finish(
            name,
            JobState::Cancelled,
            "Cancelled",
            "cancelled by request".to_owned(),
        );
        Ok(self.jobs[name].status.clone())
    }

    fn remove(&mut self, name: &str) {
        if let Some(record) = self.jobs.remove(name) {
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
                    weight: q.weight,
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
            time: unix_now(),
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
                    self.dirty.insert(job);
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
            time: unix_now(),
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
            .filter(|r| r.is_active() && r.status.state != JobState::Restarting)
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
    fn tick(&mut self) {
        let now = unix_now();
        let mut expired = Vec::new();
        let mut requeue = Vec::new();
        let mut remove = Vec::new();
        for (name, r) in &self.jobs {
            let policy = &r.job.spec.run_policy;
            match r.status.state {
                JobState::Queued => {
                    if let Some(limit) = policy.schedule_timeout_seconds
                        && now - r.queued_since >= limit as f64
                    {
                        expired.push((
                            name.clone(),
                            "ScheduleTimeout",
                            format!(
                                "not placed within scheduleTimeoutSeconds ({limit} s): {}",
                                r.status.message
                            ),
                        ));
                    }
                }
                JobState::Placed | JobState::Starting | JobState::Running => {
                    if let (Some(limit), Some(started)) =
                        (policy.active_deadline_seconds, r.status.started_at)
                        && now - started >= limit as f64
                    {
                        expired.push((
                            name.clone(),
                            "DeadlineExceeded",
                            format!("ran longer than activeDeadlineSeconds ({limit} s)"),
                        ));
                    }
                }
                JobState::Restarting => {
                    if r.restart_at.is_some_and(|t| now >= t) && r.allocation.is_none() {
                        requeue.push(name.clone());
                    }
                }
                JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                    if let (Some(ttl), Some(finished)) =
                        (policy.ttl_seconds_after_finished, r.status.finished_at)
                        && now - finished >= ttl as f64
                        && r.allocation.is_none()
                    {
                        remove.push(name.clone());
                    }
                }
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
            ReplicaEvent::StartFailed { message } => {
                self.replica_start_failed(&job, generation, message);
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
        let Some(record) = self.launch_reported(job, generation) else {
            // Every launch is counted until reported, so this is a process nobody waits for.
            tracing::warn!(job, replica, pid, "stopping a replica of no current launch");
            local::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
            return;
        };
        record.replica_started(replica, pid, unix_now());
        if let Some(stop) = &mut record.pending_stop {
            stop.push(pid);
        }
        self.dirty.insert(job.to_owned());
        self.launch_settled(job);
    }

    fn replica_start_failed(&mut self, job: &str, generation: u32, message: String) {
        let Some(record) = self.launch_reported(job, generation) else {
            return;
        };
        if record.status.state == JobState::Starting && record.pending_stop.is_none() {
            self.finish(job, JobState::Failed, "StartFailed", message);
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
            let waited = (unix_now() - record.status.submitted_at).max(0.0);
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
        let now = unix_now();
        let Some(outcome) = record.replica_ended(&exit.replica, exit.outcome, now) else {
            return;
        };
        self.dirty.insert(exit.job.clone());
        let described = local::describe(exit.outcome);
        match outcome {
            record::ReplicaVerdict::Ignored => {}
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
                    format!("{} completed, which completes the job", exit.replica),
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
        let pgids = record.begin_restart(reason, message, unix_now() + delay.as_secs_f64());
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
        let pgids = record.finish(state, reason, &message, unix_now());
        let generation = record.status.generation;
        self.stop_gang(name, generation, pgids);
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
        let done = self.internal_tx.clone();
        let stop = self.executor.stop(pgids, self.kill_grace);
        let job = name.to_owned();
        tokio::spawn(async move {
            stop.await;
            let _ = done.send(Internal::GangStopped { job, generation });
        });
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
        node.schedulable = !self.drained;
        let nodes = [node];
        let running: Vec<sched::RunningGang> = self
            .jobs
            .values()
            .filter_map(JobRecord::running_gang)
            .collect();
        let queues: Vec<QueueConfig> = self
            .queues
            .iter()
            .map(|(name, q)| QueueConfig {
                name: name.clone(),
                priority: q.priority,
                weight: q.weight,
                max_running_jobs: q.max_running_jobs,
                max_gpus: q.max_gpus,
            })
            .collect();
        let now = unix_now();
        let pass_started = std::time::Instant::now();
        let decision = sched::schedule(
            &Snapshot {
                now,
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
        let summary = record.place(placement, inventory, unix_now());
        self.dirty.insert(name.clone());
        self.event(&name, "Placed", summary);
        let record = self.jobs.get_mut(&name).expect("present");
        let launches = match record.launch_specs(&log_dir) {
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
        for record in self.jobs.values() {
            let queue = record.status.queue.as_str();
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
                schedulable: node.schedulable,
            },
        );
    }

    /// Writes the turn's changes in one transaction, then sends the replies that waited on it.
    fn commit(&mut self) -> Result<(), CoreError> {
        if !self.dirty.is_empty() || !self.deleted.is_empty() {
            self.report_metrics();
        }
        if self.dirty.is_empty() && self.deleted.is_empty() && self.events.is_empty() {
            for reply in self.after_commit.drain(..) {
                reply();
            }
            self.launch();
            return Ok(());
        }
        let now = unix_now();
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
        let result = self.store.write_batch(&writes, &self.events);
        self.dirty.clear();
        self.deleted.clear();
        self.events.clear();
        // Replies go out either way: on failure the submissions in this batch answer with
        // the error instead of a 201 they could not keep.
        let replies: Vec<_> = self.after_commit.drain(..).collect();
        // The placements are the agent's state whether or not the disk took them: their
        // replicas start either way, and the next write carries them.
        self.launch();
        match result {
            Ok(()) => {
                for reply in replies {
                    reply();
                }
                Ok(())
            }
            Err(e) => {
                drop(replies);
                Err(e.into())
            }
        }
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
    let product = inventory
        .gpus
        .first()
        .map(|g| g.name.clone())
        .unwrap_or_default();
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
