//! The core loop: the one task that owns the jobs. Handlers send it `Command`s; the executor
//! reports replicas started, failed to start and exited; the inventory tells it about GPUs.
//! The loop is thin: it turns each of these into an input of the job lifecycle
//! ([`lifecycle::Lifecycle::step`], pure), runs a scheduling pass if anything changed, writes
//! the turn's changes in one transaction, and only then performs the turn's effects: it answers
//! the requests that caused them (so a job acknowledged with 201 is on disk) and hands placed
//! replicas to the executor (so no replica runs for a placement that is not on disk). It never
//! waits for a process. The store and the executor are behind traits
//! ([`crate::store::JobStore`], [`crate::exec::Executor`]).

pub mod clock;
mod estimates;
mod feed;
mod finished;
pub mod lifecycle;
mod log_budget;
pub mod queues;
mod record;
mod recovery;
pub mod terms;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agentd_api::NodeInventory;
use agentd_api::jobs::{EventList, JobList, JobState, JobStatus, Owner, QueueList};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, ReplicaUnits};
use crate::exec::Executor;
use crate::exec::local::{self, LocalExecutor, ReplicaEvent, ReplicaReport};
use crate::inventory::GpuHealthEvent;
use crate::job::{self, SpecError};
use crate::metrics::{Metrics, NodeAllocation};
use crate::sched::{self, NodeCapacity, Policy};
use crate::store::{History, JobStore, StoreError};

pub use clock::{Clock, ManualClock, Now, SystemClock};
pub use lifecycle::LostNode;
use lifecycle::{Effect, Input, Lifecycle, MetricUpdate, RequestId};
pub use queues::QueuesInForce;
pub use record::{JobRecord, pending_replicas};

/// The most finished jobs named to the next check of the logs' budget; past it, the check
/// counts every log again.
const MAX_FINISHED_BETWEEN_CHECKS: usize = 50_000;

/// Ticks between two checks of the job logs' overall size (10 s).
const LOG_BUDGET_TICKS: u64 = 40;

/// How often deadlines, time-outs and back-offs are checked.
const TICK: Duration = Duration::from_millis(250);

/// Most rounds of messages (a command, a replica exit, an internal note, a health change) taken
/// in one turn before the batch is written, so a flood shares a transaction without starving
/// replies.
const MAX_BATCH: usize = 256;

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
    /// The executor cannot tell what runs (cluster mode: the pods could not be listed).
    #[error("{0}")]
    Executor(String),
    /// Cluster mode: the cluster's jobs are kept by the elected leader, and this agent is not
    /// it (`leader`: who is, when known).
    #[error("this agent does not lead the cluster's jobs; {}", match leader {
        Some(l) => format!("the leader is {l}: run agentctl there"),
        None => "run agentctl on the leader (agentctl status names it)".to_owned(),
    })]
    NotLeader { leader: Option<String> },
    /// The change could not be written, so it was not made: why, and what to do about it.
    #[error("nothing was done: {0}")]
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
        /// Cluster mode: the uid of the `TrainingJob` the request was read from. The job is
        /// cancelled only if that object is the one it is stored in; another object of the
        /// same name (in another namespace) is not this job.
        object: Option<String>,
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

impl Command {
    /// Answers the command with an error instead of doing it.
    pub fn refuse(self, error: impl Fn() -> CoreError) {
        match self {
            Command::Submit { reply, .. }
            | Command::Get { reply, .. }
            | Command::Cancel { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::List { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::Queues { reply } => {
                let _ = reply.send(Err(error()));
            }
            Command::Events { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::Logs { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::Drain { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
        }
    }
}

/// The replica whose log is asked for: `replica`, which the job must have, or its first
/// (`None` when it has none yet).
pub fn log_replica<'a>(
    job: &'a JobStatus,
    replica: Option<&str>,
) -> Result<Option<&'a agentd_api::jobs::ReplicaStatus>, CoreError> {
    let Some(r) = replica else {
        return Ok(job.replicas.first());
    };
    match job.replicas.iter().find(|s| s.name == r) {
        Some(found) => Ok(Some(found)),
        None => Err(CoreError::BadField {
            field: "replica".to_owned(),
            message: format!(
                "job {} has no replica {r:?}; replicas: {}",
                job.name,
                job.replicas
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
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
    /// The finished jobs' history, where the core's store keeps one: read on the caller's
    /// side, on a connection of its own, never through the core.
    history: Arc<Mutex<Option<History>>>,
}

impl CoreHandle {
    /// The history of finished jobs, where the store keeps one (standalone mode).
    pub fn history(&self) -> Option<History> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

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

/// The cluster's nodes as the leader sees them (cluster mode).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterNodes {
    /// Whether the first lists of the cluster's objects are in: until then the capacity is
    /// not known (rather than none), and nothing is placed.
    pub listed: bool,
    /// Each node's capacity less what everything but agentd's own pods requests (the core
    /// counts its gangs itself), closed where it takes no new replicas.
    pub capacity: Arc<Vec<NodeCapacity>>,
    /// The nodes lost (closed too): their gangs restart elsewhere.
    pub lost: Vec<LostNode>,
}

/// Where the scheduler's nodes come from.
pub enum Nodes {
    /// Standalone: this machine, from its inventory, with its configured labels.
    Local,
    /// Cluster mode: the cluster's nodes. Replicas go wherever the scheduler puts them, as
    /// pods.
    Cluster(watch::Receiver<Arc<ClusterNodes>>),
}

impl Nodes {
    /// Ends when the cluster's nodes change; never for the local node, whose changes come
    /// with the inventory.
    async fn changed(rx: &mut Option<watch::Receiver<Arc<ClusterNodes>>>) -> bool {
        match rx {
            Some(rx) => rx.changed().await.is_ok(),
            None => std::future::pending().await,
        }
    }

    fn receiver(&self) -> Option<watch::Receiver<Arc<ClusterNodes>>> {
        match self {
            Self::Local => None,
            Self::Cluster(rx) => Some(rx.clone()),
        }
    }

    /// Whether the nodes are known: always for the local node; for the cluster's, once the
    /// feed's first lists are in.
    fn known(&self) -> bool {
        match self {
            Self::Local => true,
            Self::Cluster(rx) => rx.borrow().listed,
        }
    }
}

/// How long a new term's submissions wait for the cluster's nodes to be listed (a fraction of
/// a second, normally) before they are taken in all the same, to wait in the queue with the
/// reason: a job taken in before its pass can place it costs a status write more, and a
/// leader that cannot list the nodes must not leave its submitters without an answer.
const NODES_LISTED_WAIT: Duration = Duration::from_secs(5);

/// The reason of the jobs that wait because the leader has not listed the cluster's nodes.
const NODES_NOT_LISTED: &str = "NodesNotListed";

/// Something that happened inside the agent that the core must hear about.
#[derive(Debug)]
enum Internal {
    /// Every process of a gang's generation is gone.
    GangStopped { job: String, generation: u32 },
}

pub struct Core {
    /// The jobs and what happens to them.
    lifecycle: Lifecycle,
    labels: BTreeMap<String, String>,
    state_dir: PathBuf,
    /// The queues that take jobs, and those removed that still serve theirs.
    queues: Arc<QueuesInForce>,
    /// Where changes of the queues come from (cluster mode: the ConfigMap), if anywhere.
    queue_changes: Option<watch::Receiver<Arc<QueuesInForce>>>,
    kill_grace: Duration,
    sample_retention: Duration,
    /// Wall clock for what people read, monotonic clock for every duration waited on.
    clock: Arc<dyn Clock>,
    store: Box<dyn JobStore>,
    executor: Box<dyn Executor>,
    /// The scheduler, fed with what changes between passes.
    feed: feed::Feed,
    inventory: watch::Receiver<Arc<NodeInventory>>,
    nodes: Nodes,
    internal_tx: mpsc::UnboundedSender<Internal>,
    /// Requests of this turn waiting for their answer, by the id the lifecycle knows them by.
    waiting: BTreeMap<RequestId, Reply<JobStatus>>,
    next_request: u64,
    /// `jobs.logs_max_total_bytes`, checked off the core's task (a check that comes due while
    /// the last one still runs is skipped).
    logs_budget: Arc<Mutex<log_budget::LogBudget>>,
    /// The jobs that finished since the last check of the logs' budget; `None` once there were
    /// more than [`MAX_FINISHED_BETWEEN_CHECKS`] (the check then counts everything).
    logs_finished: Option<Vec<String>>,
    ticks: u64,
    metrics: Option<Metrics>,
    /// Where the store keeps a history of finished jobs: its pruning.
    pruning: Option<finished::Pruning>,
    /// When the core opened, on the monotonic clock.
    opened: f64,
}

/// The channels a core is reached by: the API's handle, and the senders executors and stops
/// report on. They outlive any one core (see [`Core::open_in`]).
pub struct CoreWiring {
    pub handle: CoreHandle,
    reports: mpsc::UnboundedSender<ReplicaReport>,
    internal_tx: mpsc::UnboundedSender<Internal>,
}

impl CoreWiring {
    /// New channels, with the GPU health changes the core will hear; the receiving ends go to
    /// whoever runs the core.
    pub fn new(health: mpsc::UnboundedReceiver<GpuHealthEvent>) -> (Self, CoreInputs) {
        let (tx, commands) = mpsc::channel(1024);
        let (submits_tx, submits) = mpsc::channel(1024);
        let (reports, replicas) = mpsc::unbounded_channel();
        let (internal_tx, internal) = mpsc::unbounded_channel();
        (
            Self {
                handle: CoreHandle {
                    tx,
                    submits: submits_tx,
                    history: Arc::default(),
                },
                reports,
                internal_tx,
            },
            CoreInputs {
                commands,
                submits,
                replicas,
                health,
                internal,
            },
        )
    }

    /// Where an executor sends its replica reports.
    pub fn reports(&self) -> mpsc::UnboundedSender<ReplicaReport> {
        self.reports.clone()
    }
}

/// Channels the core listens on, apart from commands.
pub struct CoreInputs {
    pub commands: mpsc::Receiver<Command>,
    pub submits: mpsc::Receiver<Command>,
    pub replicas: mpsc::UnboundedReceiver<ReplicaReport>,
    pub health: mpsc::UnboundedReceiver<GpuHealthEvent>,
    internal: mpsc::UnboundedReceiver<Internal>,
}

/// What one core is built around, on channels it does not own ([`Core::open_in`]).
pub struct TermParts {
    pub node: String,
    pub store: Box<dyn JobStore>,
    pub inventory: watch::Receiver<Arc<NodeInventory>>,
    pub nodes: Nodes,
    pub metrics: Option<Metrics>,
    pub clock: Arc<dyn Clock>,
}

/// What the core is built around: its store, its view of the node and where it places, its
/// clock and metrics.
pub struct CoreParts {
    pub node: String,
    pub store: Box<dyn JobStore>,
    pub inventory: watch::Receiver<Arc<NodeInventory>>,
    pub nodes: Nodes,
    pub health: mpsc::UnboundedReceiver<GpuHealthEvent>,
    pub metrics: Option<Metrics>,
    pub clock: Arc<dyn Clock>,
}

impl Core {
    /// Builds the core from the configuration, with the local executor, loads the stored jobs,
    /// and stops whatever a previous agent's replicas left running.
    pub fn open(
        config: &Config,
        node: String,
        store: Box<dyn JobStore>,
        inventory: watch::Receiver<Arc<NodeInventory>>,
        health: mpsc::UnboundedReceiver<GpuHealthEvent>,
        metrics: Option<Metrics>,
    ) -> Result<(Core, CoreHandle, CoreInputs), CoreError> {
        let runner = runner(config)?;
        Self::open_with(
            config,
            CoreParts {
                node,
                store,
                inventory,
                nodes: Nodes::Local,
                health,
                metrics,
                clock: Arc::new(SystemClock::new()),
            },
            |reports| {
                Box::new(LocalExecutor::new(
                    reports,
                    config.jobs.log_max_bytes,
                    runner,
                    config.state_dir.join("replicas"),
                    crate::exec::ShimCommand::agentd(),
                ))
            },
        )
    }

    /// `open` with the given parts and the executor `executor` builds around the channel its
    /// reports go to.
    pub fn open_with(
        config: &Config,
        parts: CoreParts,
        executor: impl FnOnce(mpsc::UnboundedSender<ReplicaReport>) -> Box<dyn Executor>,
    ) -> Result<(Core, CoreHandle, CoreInputs), CoreError> {
        let (wiring, inputs) = CoreWiring::new(parts.health);
        let core = Self::open_in(
            config,
            TermParts {
                node: parts.node,
                store: parts.store,
                inventory: parts.inventory,
                nodes: parts.nodes,
                metrics: parts.metrics,
                clock: parts.clock,
            },
            &wiring,
            executor(wiring.reports.clone()),
        )?;
        Ok((core, wiring.handle, inputs))
    }

    /// A core on channels that outlive it (`wiring`): restores the jobs from the store, has
    /// the executor adopt or stop what their replicas left, and writes the result. In cluster
    /// mode each term of leadership opens one this way, so the API keeps one handle.
    pub fn open_in(
        config: &Config,
        parts: TermParts,
        wiring: &CoreWiring,
        executor: Box<dyn Executor>,
    ) -> Result<Core, CoreError> {
        let TermParts {
            node,
            store,
            inventory,
            nodes,
            metrics,
            clock,
        } = parts;
        let logs = config.state_dir.join("logs");
        let history = store.history(&logs)?;
        (*wiring
            .handle
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
        .clone_from(&history);
        let settings = lifecycle::Settings {
            node,
            default_queue: config.jobs.default_queue.clone(),
            max_replicas_per_agent: config.jobs.max_replicas_per_agent,
            backoff: (config.jobs.restart_backoff, config.jobs.restart_backoff_max),
            logs,
            finished_in_memory: history
                .as_ref()
                .map(|_| config.jobs.finished_in_memory as usize),
            history_retention: config.jobs.history_retention,
            node_refusal_cooldown: config.cluster.node_refusal_cooldown,
        };
        let drained = config.state_dir.join(DRAINED_MARKER).exists();
        let queues = Arc::new(QueuesInForce::configured(config));
        let mut core = Core {
            lifecycle: Lifecycle::new(settings, drained),
            labels: config.labels.clone(),
            state_dir: config.state_dir.clone(),
            queues: Arc::clone(&queues),
            queue_changes: None,
            kill_grace: config.jobs.kill_grace,
            sample_retention: config.inventory.sample_retention,
            opened: clock.now().mono,
            clock,
            store,
            executor,
            feed: feed::Feed::new(
                if config.scheduler.estimate_runtimes {
                    Policy::agentd().with_runtime_estimates()
                } else {
                    Policy::agentd()
                },
                queues.scheduler_queues(),
                estimates::Estimates::new(&config.scheduler),
            ),
            inventory,
            nodes,
            internal_tx: wiring.internal_tx.clone(),
            waiting: BTreeMap::new(),
            next_request: 0,
            logs_finished: Some(Vec::new()),
            logs_budget: Arc::new(Mutex::new(log_budget::LogBudget::new(
                config.state_dir.join("logs"),
                config.jobs.logs_max_total_bytes,
            ))),
            ticks: 0,
            metrics,
            pruning: history
                .clone()
                .map(|history| finished::Pruning::new(config.jobs.history_retention, history)),
        };
        core.recover()?;
        if let Some(estimates) = core.feed.estimates_mut() {
            let finished = core
                .lifecycle
                .jobs()
                .values()
                .filter(|r| r.status.state.is_finished());
            estimates.learn_past(history.as_ref(), finished);
        }
        core.commit()?;
        Ok(core)
    }

    /// Takes the queues `changes` holds now, and each change of them while the core runs.
    pub fn follow_queues(&mut self, changes: watch::Receiver<Arc<QueuesInForce>>) {
        let now = changes.borrow().clone();
        self.set_queues(now);
        self.queue_changes = Some(changes);
    }

    /// Puts other queues in force at once: new ones take jobs, a removed one keeps serving
    /// the jobs it holds with its last settings and takes no new job, the default queue is
    /// the new one's. The scheduler gets the new priorities and limits on its next pass.
    fn set_queues(&mut self, queues: Arc<QueuesInForce>) {
        if queues.definitions == self.queues.definitions && queues.removed == self.queues.removed {
            self.queues = queues;
            return;
        }
        tracing::info!(
            queues = %queues.definitions.queues.keys().cloned().collect::<Vec<_>>().join(","),
            default = %queues.definitions.default_queue,
            source = %queues.source,
            "queues in force"
        );
        self.feed
            .scheduler_mut()
            .set_queues(queues.scheduler_queues());
        self.lifecycle
            .set_default_queue(&queues.definitions.default_queue);
        self.queues = queues;
        self.step(Input::QueuesChanged);
        self.report_gauges();
    }

    /// Runs until `stop` turns true; then stops every gang and writes the last changes.
    pub async fn run(
        mut self,
        inputs: &mut CoreInputs,
        mut stop: watch::Receiver<bool>,
    ) -> Box<dyn JobStore> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut inventory = self.inventory.clone();
        let mut cluster_nodes = self.nodes.receiver();
        let mut queue_changes = self.queue_changes.take();
        loop {
            let taking_submits = self.taking_submits();
            tokio::select! {
                Some(command) = inputs.commands.recv() => self.command(command),
                Some(command) = inputs.submits.recv(), if taking_submits => {
                    self.command(command);
                }
                Some(report) = inputs.replicas.recv() => self.replica_report(report),
                Some(change) = inputs.health.recv() => self.gpu_health_changed(change),
                Some(internal) = inputs.internal.recv() => self.internal(internal),
                Ok(()) = inventory.changed() => self.inventory_changed(),
                true = Nodes::changed(&mut cluster_nodes) => self.nodes_changed(),
                Some(queues) = queues_changed(&mut queue_changes) => self.set_queues(queues),
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
                    self.gpu_health_changed(change);
                    took = true;
                }
                if let Ok(command) = inputs.commands.try_recv() {
                    self.command(command);
                    took = true;
                }
                if self.taking_submits()
                    && let Ok(command) = inputs.submits.try_recv()
                {
                    self.command(command);
                    took = true;
                }
                if !took {
                    break;
                }
            }
            if self.lifecycle.needs_pass() {
                self.schedule();
            }
            // A failed write is logged, and undone, where it happens.
            let _ = self.commit();
        }
        self.shutdown().await;
        // The cluster's nodes are the leader's to report; the next term's leader reports them.
        if let (Nodes::Cluster(_), Some(metrics)) = (&self.nodes, &self.metrics) {
            metrics.set_node_allocations([]);
        }
        self.store
    }

    /// Whether this turn takes new submissions: not while the executor has as many replicas
    /// starting as it takes at once, nor, for a while, before the nodes are known, so that a
    /// new leader's first submissions are placed in the turn that takes them in.
    fn taking_submits(&self) -> bool {
        self.lifecycle.in_flight() < self.executor.max_starting()
            && (self.nodes.known() || self.waited_for_nodes())
    }

    /// Whether this term has waited [`NODES_LISTED_WAIT`] for the nodes to be listed.
    fn waited_for_nodes(&self) -> bool {
        self.clock.now().mono - self.opened >= NODES_LISTED_WAIT.as_secs_f64()
    }

    /// Feeds one input to the lifecycle at the clock's time.
    fn step(&mut self, input: Input) {
        let now = self.clock.now();
        self.lifecycle.step(input, now);
    }

    /// Writes the final state. Replicas under their own supervisors (processes, or transient
    /// units under systemd) and pods run on, for the next agent to adopt; an executor whose
    /// replicas would not has its gangs stopped here (restarted when the agent comes back).
    async fn shutdown(&mut self) {
        let mut stops = Vec::new();
        if !self.executor.replicas_outlive_agent() {
            for record in self.lifecycle.jobs().values() {
                let groups = record.live_pgids();
                if !groups.is_empty() {
                    stops.push(self.executor.stop(
                        &record.status.name,
                        record.status.generation,
                        groups,
                        self.kill_grace,
                        false,
                    ));
                }
            }
        }
        if !stops.is_empty() {
            tracing::info!(gangs = stops.len(), "stopping replicas");
            futures::future::join_all(stops).await;
        }
        if let Err(e) = self.commit() {
            tracing::error!("cannot write job changes: {e}");
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Drain { drained, reply } => {
                if let Some(drained) = drained
                    && drained != self.lifecycle.drained()
                {
                    self.set_drained(drained);
                }
                let _ = reply.send(Ok(self.lifecycle.drained()));
            }
            Command::Submit {
                job,
                manifest,
                owner,
                reply,
            } => {
                // Admission checked the queue against the queues of its moment; one removed
                // since takes no new job.
                let queue = job.spec.queue.as_deref().unwrap_or_default();
                if !self.queues.takes(queue) {
                    let _ = reply.send(Err(CoreError::BadField {
                        field: "spec.queue".to_owned(),
                        message: format!(
                            "no queue named {queue:?} takes jobs (it was removed); queues: {}",
                            self.queues
                                .definitions
                                .queues
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }));
                    return;
                }
                // A finished job that left memory still holds its name, until it is removed
                // or pruned.
                if self.lifecycle.job(&job.name).is_none() {
                    match self.store.job(&job.name) {
                        Ok(None) => {}
                        Ok(Some(_)) => {
                            let name = &job.name;
                            let _ = reply.send(Err(CoreError::Conflict(format!(
                                "a job named {name:?} already exists (finished, in the history); \
                                 remove it with `agentctl cancel {name}` or choose another name"
                            ))));
                            return;
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                            return;
                        }
                    }
                }
                let request = self.request(reply);
                self.step(Input::Submit {
                    request,
                    job,
                    manifest,
                    owner,
                });
            }
            Command::List {
                queue,
                state,
                user,
                reply,
            } => {
                let jobs = self
                    .lifecycle
                    .jobs()
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
                        .lifecycle
                        .removed(&name)
                        .cloned()
                        .ok_or(CoreError::NotFound(name)),
                    other => other,
                };
                let _ = reply.send(found);
            }
            Command::Cancel {
                name,
                by,
                object,
                reply,
            } => {
                if object.is_some_and(|uid| !self.store.holds_object(&name, &uid)) {
                    let _ = reply.send(Err(CoreError::NotFound(name)));
                    return;
                }
                if self.lifecycle.job(&name).is_some() {
                    let request = self.request(reply);
                    self.step(Input::Cancel { request, name, by });
                    return;
                }
                // Only finished jobs leave memory: one in the store alone is removed.
                match finished::stored(self.store.as_ref(), &name) {
                    Ok(status) => {
                        let request = self.request(reply);
                        self.step(Input::RemoveStored {
                            request,
                            status: Box::new(status),
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
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

    /// Keeps a request's reply channel until its turn is written; the lifecycle knows it by
    /// the id returned.
    fn request(&mut self, reply: Reply<JobStatus>) -> RequestId {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.waiting.insert(id, reply);
        id
    }

    fn get(&self, name: &str) -> Result<JobStatus, CoreError> {
        let Some(record) = self.lifecycle.job(name) else {
            return finished::stored(self.store.as_ref(), name);
        };
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
                self.lifecycle
                    .pending_events()
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

    fn queue_list(&self) -> QueueList {
        queues::queue_list(
            &self.queues,
            self.lifecycle.jobs().values().map(|r| &r.status),
        )
    }

    fn logs(&self, name: &str, replica: Option<&str>) -> Result<LogFiles, CoreError> {
        let (record, live) = match self.lifecycle.job(name) {
            Some(record) => (record.status.clone(), !record.live_pgids().is_empty()),
            None => (finished::stored(self.store.as_ref(), name)?, false),
        };
        let replica = log_replica(&record, replica)?.map_or_else(String::new, |s| s.name.clone());
        let current = self.log_dir(name).join(format!("{replica}.log"));
        Ok(LogFiles {
            replica,
            files: vec![crate::exec::replica_log::rotated_path(&current), current],
            complete: record.state.is_finished() && !live,
        })
    }

    fn log_dir(&self, name: &str) -> PathBuf {
        self.lifecycle.settings().logs.join(name)
    }

    fn internal(&mut self, internal: Internal) {
        match internal {
            Internal::GangStopped { job, generation } => {
                self.step(Input::GangStopped { job, generation });
            }
        }
    }

    fn gpu_health_changed(&mut self, change: GpuHealthEvent) {
        let level = if change.healthy { "info" } else { "warn" };
        tracing::debug!(level, "{change}");
        self.step(Input::GpuHealthChanged(change));
    }

    /// A new inventory: kept as a sample, and handed to the lifecycle (gangs on GPUs that
    /// turned unhealthy restart elsewhere).
    fn inventory_changed(&mut self) {
        let inventory = self.inventory.borrow_and_update().clone();
        self.keep_sample(&inventory);
        self.step(Input::InventoryChanged(inventory));
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

    /// Keeps the job logs within their overall budget, off the core's task: the logs of the
    /// jobs that finished first go first; those of jobs with processes left never do.
    fn keep_logs_in_budget(&mut self) {
        if matches!(
            self.logs_budget.try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        ) {
            return; // The last check is still running.
        }
        let finished_since = self.logs_finished.replace(Vec::new());
        // Active jobs, and finished ones with processes left, keep their logs.
        let busy: BTreeSet<String> = self
            .lifecycle
            .jobs()
            .values()
            .filter(|r| !r.status.state.is_finished() || !r.live_pgids().is_empty())
            .map(|r| r.status.name.clone())
            .collect();
        let mut in_memory: Vec<(f64, String)> = self
            .lifecycle
            .jobs()
            .values()
            .filter(|r| r.status.state.is_finished() && r.live_pgids().is_empty())
            .map(|r| (r.status.finished_at.unwrap_or(0.0), r.status.name.clone()))
            .collect();
        let history = self.pruning.as_ref().map(|p| p.history().clone());
        let budget = Arc::clone(&self.logs_budget);
        tokio::task::spawn_blocking(move || {
            let mut budget = budget.lock().unwrap_or_else(PoisonError::into_inner);
            // Every finished job on disk, whether or not it is still in memory.
            let finished = || {
                if let Some(history) = &history {
                    return history.finished_oldest_first();
                }
                in_memory.sort_by(|a, b| a.0.total_cmp(&b.0));
                Ok(in_memory.into_iter().map(|(_, name)| name).collect())
            };
            match budget.check(busy, finished_since, finished) {
                Ok(removed) if !removed.is_empty() => tracing::info!(
                    jobs = removed.join(", "),
                    "deleted the logs of finished jobs: job logs were over jobs.logs_max_total_bytes ({} bytes)",
                    budget.budget()
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot list the finished jobs to bound their logs: {e}"),
            }
        });
    }

    /// Time passed: the log budget now and then, whether a failing store takes writes again,
    /// and the jobs' time limits.
    fn tick(&mut self) {
        self.ticks += 1;
        if self.ticks.is_multiple_of(LOG_BUDGET_TICKS) {
            self.keep_logs_in_budget();
        }
        if self.ticks % finished::PRUNE_TICKS == 1 {
            self.prune_history();
        }
        if self.lifecycle.write_failure().is_some() && self.store.check_writable().is_ok() {
            tracing::info!("the database takes writes again");
            self.step(Input::StoreWritable);
            self.report_gauges();
        }
        self.step(Input::Tick);
    }

    /// Prunes the history past `jobs.history_retention` or its TTL, on disk, in the
    /// background; the finished jobs held in memory are the lifecycle's to let go.
    fn prune_history(&mut self) {
        let Some(pruning) = &self.pruning else {
            return;
        };
        let held = self
            .lifecycle
            .jobs()
            .values()
            .filter(|r| r.status.state.is_finished())
            .map(|r| r.status.name.clone())
            .collect();
        pruning.start(self.clock.now(), held);
    }

    fn replica_report(&mut self, report: ReplicaReport) {
        let ReplicaReport {
            job,
            replica,
            generation,
            event,
        } = report;
        self.step(match event {
            ReplicaEvent::Started { pid } => Input::ReplicaStarted {
                job,
                replica,
                generation,
                pid,
            },
            ReplicaEvent::StartFailed { message, transient } => Input::ReplicaStartFailed {
                job,
                replica,
                generation,
                message,
                transient,
            },
            ReplicaEvent::Exited { outcome } => Input::ReplicaExited {
                job,
                replica,
                generation,
                outcome,
            },
            ReplicaEvent::Ended(end) => Input::ReplicaEnded {
                job,
                replica,
                generation,
                end,
            },
            ReplicaEvent::Waiting { message } => Input::ReplicaWaiting {
                job,
                replica,
                generation,
                message,
            },
        });
    }

    /// The cluster's nodes changed: the executor learns which are lost (a stop does not wait
    /// for their kubelets), gangs on them restart, and a pass follows.
    fn nodes_changed(&mut self) {
        let lost = match &self.nodes {
            Nodes::Local => Vec::new(),
            Nodes::Cluster(nodes) => nodes.borrow().lost.clone(),
        };
        self.executor
            .nodes_lost(&lost.iter().map(|l| l.name.clone()).collect());
        if !lost.is_empty() {
            self.step(Input::NodesLost(lost));
        }
        self.step(Input::NodesChanged);
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
        self.step(Input::Drain(drained));
        tracing::info!(node = %self.lifecycle.settings().node, drained, "node drain changed");
    }

    /// One scheduling pass over the queued gangs, its decision handed to the lifecycle with
    /// the addresses of each placed gang's replicas. The one place the scheduler is called: it
    /// is told what changed since the last pass ([`feed::Feed`]), and hands back the placements
    /// and the waiting gangs whose reason or message changed.
    fn schedule(&mut self) {
        let pass_started = std::time::Instant::now();
        let inventory = match &self.nodes {
            Nodes::Local => {
                let inventory = self.inventory.borrow().clone();
                let mut node = node_capacity(&inventory);
                node.labels.extend(self.labels.clone());
                node.schedulable = self.lifecycle.schedulable();
                self.feed.local_node(node);
                inventory
            }
            // A cluster node is drained through its labels (the feed closes it); this
            // machine's own drain does not stop the cluster.
            Nodes::Cluster(_) if !self.nodes.known() => return self.wait_for_nodes(),
            Nodes::Cluster(nodes) => {
                let mut nodes = nodes.borrow().capacity.clone();
                // A node that refused a pod lately is closed for a while.
                let refused: BTreeSet<&str> =
                    self.lifecycle.refused_nodes(self.clock.now()).collect();
                if nodes
                    .iter()
                    .any(|n| n.schedulable && refused.contains(n.name.as_str()))
                {
                    let mut open = (*nodes).clone();
                    for n in &mut open {
                        n.schedulable &= !refused.contains(n.name.as_str());
                    }
                    nodes = Arc::new(open);
                }
                self.feed
                    .cluster_nodes(&nodes, self.lifecycle.write_failure().is_some());
                // GPUs elsewhere are counted, not named: no local GPU stands for them.
                Arc::new(NodeInventory::default())
            }
        };
        let now = self.clock.now();
        self.feed.drained(self.lifecycle.drained());
        let changed = self.lifecycle.changed_jobs();
        self.feed.jobs(self.lifecycle.jobs(), changed, now);
        let decision = self.feed.scheduler_mut().pass(now.wall);
        if let Some(metrics) = &self.metrics {
            metrics.scheduling_pass(pass_started.elapsed());
        }
        self.feed
            .placed(decision.placements.iter().map(|p| p.gang.as_str()));
        #[cfg(debug_assertions)]
        self.check_against_full_pass(&decision, now);
        let mut waiting = decision.waiting;
        estimates::explain(&mut waiting, &decision.reservations, |name| {
            self.feed.estimate_of(self.lifecycle.job(name)?, now.wall)
        });
        let placements = decision
            .placements
            .into_iter()
            .map(|placement| {
                let hosts = self.lifecycle.job(&placement.gang).map_or_else(
                    || Err("no such job".to_owned()),
                    |r| self.executor.addresses(&r.job),
                );
                (placement, hosts)
            })
            .collect();
        self.step(Input::Scheduled {
            inventory,
            waiting,
            placements,
        });
    }

    /// No pass while the cluster's nodes are not listed (they are not known to be none); once
    /// submissions are taken in regardless, the queued jobs say why they wait. The pass comes
    /// with the nodes.
    fn wait_for_nodes(&mut self) {
        if !self.waited_for_nodes() {
            return;
        }
        let message: Arc<str> = Arc::from(
            "the leader has not listed the cluster's nodes yet (see the agent's log for why); \
             nothing is placed until it has",
        );
        let waiting = self
            .lifecycle
            .jobs()
            .iter()
            .filter(|(_, r)| r.status.state == JobState::Queued)
            .map(|(name, _)| sched::Waiting {
                gang: name.clone(),
                reason: NODES_NOT_LISTED,
                message: Arc::clone(&message),
            })
            .collect();
        self.step(Input::Scheduled {
            inventory: Arc::new(NodeInventory::default()),
            waiting,
            placements: Vec::new(),
        });
    }

    /// Debug builds: the full pass, over the jobs as the lifecycle holds them, must decide
    /// exactly what the incremental pass decided (its changes applied: the whole list).
    #[cfg(debug_assertions)]
    fn check_against_full_pass(&self, decision: &sched::Decision, now: Now) {
        let scheduler = self.feed.scheduler();
        let (queued, running) = self.feed.gangs(self.lifecycle.jobs(), now);
        let full = sched::schedule(
            &sched::Snapshot {
                now: now.wall,
                nodes: scheduler.nodes(),
                running: &running,
                queued: &queued,
                queues: scheduler.queues(),
            },
            scheduler.policy(),
        );
        let whole = sched::Decision {
            waiting: scheduler.waiting(),
            ..decision.clone()
        };
        assert!(
            whole == full,
            "the incremental pass decided otherwise than the full pass:\nincremental: {whole:?}\nfull: {full:?}"
        );
    }

    /// Writes the turn's changes in one transaction; then performs what waited on it: replies,
    /// replica starts, gang stops. A turn that cannot be written is undone instead (see
    /// [`Lifecycle::not_persisted`]): its requests are answered with the cause, nothing it
    /// placed is started, and nothing new is placed until writes succeed again.
    fn commit(&mut self) -> Result<(), CoreError> {
        let persist = self.lifecycle.ready(self.clock.now());
        if persist.is_empty() {
            let effects = self.lifecycle.persisted();
            self.perform(effects);
            self.let_finished_go();
            return Ok(());
        }
        let changed = !persist.jobs.is_empty();
        match self.store.write_batch(&persist.jobs, &persist.events) {
            Ok(()) => {
                if let Some(failure) = self.lifecycle.write_failure() {
                    tracing::info!("job changes are written again (they failed: {failure})");
                    self.step(Input::StoreWritable);
                }
                let effects = self.lifecycle.persisted();
                if changed {
                    self.report_gauges();
                }
                self.perform(effects);
                self.let_finished_go();
                Ok(())
            }
            Err(e) => {
                let cause = e.to_string();
                // The undone turn may have put back what waiting gangs said before the pass.
                self.feed.scheduler_mut().relist();
                if self.lifecycle.write_failure().is_none() {
                    tracing::error!(
                        "cannot write job changes: {cause}; nothing new starts until writes succeed"
                    );
                }
                let said = match e.remedy() {
                    Some(remedy) => format!("{cause}; {remedy}"),
                    None => cause,
                };
                let effects = self.lifecycle.not_persisted(&said);
                self.report_gauges();
                self.perform(effects);
                Err(e.into())
            }
        }
    }

    /// Finished jobs beyond `jobs.finished_in_memory`, or past the retention, leave memory
    /// once what changed them is written.
    fn let_finished_go(&mut self) {
        let gone = self.lifecycle.let_finished_go(self.clock.now());
        if gone > 0 {
            tracing::debug!(
                jobs = gone,
                "finished jobs left memory: they are read from disk"
            );
        }
    }

    /// Performs a written turn's effects, in order.
    fn perform(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Reply { request, result } => {
                    if let Some(reply) = self.waiting.remove(&request) {
                        let _ = reply.send(*result);
                    }
                }
                Effect::StartReplica(spec) => self.executor.start(*spec),
                Effect::StopGang(stop) => {
                    let done = self.internal_tx.clone();
                    let stopping = self.executor.stop(
                        &stop.job,
                        stop.generation,
                        stop.pgids,
                        self.kill_grace,
                        stop.keep_ended,
                    );
                    let (job, generation) = (stop.job, stop.generation);
                    tokio::spawn(async move {
                        stopping.await;
                        let _ = done.send(Internal::GangStopped { job, generation });
                    });
                }
                Effect::KillStray { job, replica, pid } => {
                    self.executor.kill_stray(&job, &replica, pid);
                }
                Effect::RemoveLogs { job } => {
                    let _ = std::fs::remove_dir_all(self.log_dir(&job));
                    self.executor.forget_job(&job);
                }
                Effect::Metric(update) => {
                    // Every job's end passes here once, metrics or not: the log bound's next
                    // check counts the logs of the jobs named.
                    if let MetricUpdate::JobFinished(status) = &update {
                        if let Some(estimates) = self.feed.estimates_mut() {
                            estimates.learn(status);
                        }
                        self.logs_finished = self.logs_finished.take().and_then(|mut names| {
                            names.push(status.name.clone());
                            (names.len() <= MAX_FINISHED_BETWEEN_CHECKS).then_some(names)
                        });
                    }
                    let Some(metrics) = &self.metrics else {
                        continue;
                    };
                    match update {
                        MetricUpdate::StateChanged { queue, from, to } => {
                            metrics.job_state_changed(&queue, from, to);
                        }
                        MetricUpdate::GangRestarted { reason } => metrics.gang_restarted(&reason),
                        MetricUpdate::JobFailure { reason } => metrics.job_failure(reason),
                        MetricUpdate::SubmitToRunning(waited) => metrics.submit_to_running(waited),
                        MetricUpdate::JobFinished(status) => metrics.job_finished(&status),
                    }
                }
            }
        }
    }

    /// Brings the gauges up to date with the jobs: counts by queue and state, queue depths and
    /// deadlines, and the node's allocation.
    fn report_gauges(&self) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let defined = &self.queues.definitions.queues;
        let mut depth: BTreeMap<&str, u64> = defined.keys().map(|q| (q.as_str(), 0)).collect();
        let mut allocated: BTreeMap<&str, sched::Resources> = BTreeMap::new();
        let mut deadlines: BTreeMap<&str, Vec<std::time::Instant>> =
            defined.keys().map(|q| (q.as_str(), Vec::new())).collect();
        let (now, mono) = (self.clock.now(), std::time::Instant::now());
        for record in self.lifecycle.jobs().values() {
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
                let node = allocated.entry(a.node.as_str()).or_default();
                node.gpus += a.gpu_indices.len() as u32;
                node.cpu_milli += a.resources.cpu_milli;
                node.memory_mib += a.resources.memory_mib;
            }
        }
        metrics.set_jobs(counts.iter().map(|(&(q, s), &n)| (q, s, n)));
        for (queue, n) in depth {
            metrics.set_queue_depth(queue, n);
        }
        for (queue, d) in deadlines {
            metrics.set_queue_deadlines(queue, d);
        }
        let of = |node: &NodeCapacity| sched::Resources {
            gpus: node.gpus.iter().filter(|g| g.healthy).count() as u32,
            cpu_milli: node.cpu_milli,
            memory_mib: node.memory_mib,
        };
        match &self.nodes {
            Nodes::Local => {
                let node = node_capacity(&self.inventory.borrow());
                let name = self.lifecycle.settings().node.as_str();
                metrics.set_node_allocations([(
                    name,
                    NodeAllocation {
                        capacity: of(&node),
                        allocated: allocated.get(name).copied().unwrap_or_default(),
                        schedulable: node.schedulable && self.lifecycle.schedulable(),
                    },
                )]);
            }
            // The leader: every node of the cluster it places on, as the scheduler has it.
            Nodes::Cluster(_) => {
                metrics.set_node_allocations(self.feed.nodes().iter().map(|node| {
                    (
                        node.name.as_str(),
                        NodeAllocation {
                            capacity: of(node),
                            allocated: allocated
                                .get(node.name.as_str())
                                .copied()
                                .unwrap_or_default(),
                            schedulable: node.schedulable,
                        },
                    )
                }));
            }
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
        local::Runner::units(config.jobs.kill_grace)
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

/// The next queues `rx` holds, once they change; never without a receiver.
async fn queues_changed(
    rx: &mut Option<watch::Receiver<Arc<QueuesInForce>>>,
) -> Option<Arc<QueuesInForce>> {
    if let Some(r) = rx {
        if r.changed().await.is_ok() {
            return Some(r.borrow_and_update().clone());
        }
        // The sender is gone: the queues stay as they are.
        *rx = None;
    }
    std::future::pending().await
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
        taints: Vec::new(),
    }
}
