//! The job lifecycle as a step function: `step(input, now)` takes one thing that happened
//! (a submission, a cancel, a replica started or ended, a GPU turned unhealthy, a clock tick, a
//! scheduling decision) and changes the jobs; the changes and what must follow from them
//! collect in the turn. `ready` ends the turn and hands the caller what to persist; the
//! caller writes it, then calls `persisted` (or `not_persisted` with the cause) and gets the
//! effects to perform, in order: replies, replica starts, gang stops, metrics.
//!
//! It owns the jobs and nothing else: no process, no database, no clock read, no channel.
//! As in raft-rs, the caller persists before it acts: a job acknowledged with 201 is on disk,
//! and no replica runs for a placement that is not. A turn that cannot be written is undone
//! (see `undo`), so that memory says what the database says.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentd_api::NodeInventory;
use agentd_api::jobs::{JobState, JobStatus, Owner, ReplicaState};

use super::CoreError;
use super::clock::Now;
use super::record::{self, Allocation, Due, JobRecord, ReplicaVerdict};
use crate::exec::LaunchSpec;
use crate::inventory::GpuHealthEvent;
use crate::job::{self, ClusterHosts, ExitOutcome, SpecError};
use crate::sched;
use crate::store::{JobWrite, NewEvent};

mod jobs;
use jobs::Jobs;

/// How many removed jobs' last statuses are kept in memory for clients still waiting on them.
const REMEMBER_REMOVED: usize = 256;
/// The reason of a job whose replica the OOM killer ended.
const OOM_KILLED: &str = "OOMKilled";

/// Names the request a reply answers; the caller keeps the way back to whoever asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// What the lifecycle is built with: the parts of the configuration it decides by.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name, for node events and drain messages.
    pub node: String,
    /// The queue a job falls back to when its stored form cannot be read.
    pub default_queue: String,
    /// `jobs.max_replicas_per_agent`: the most replicas unfinished jobs may hold together.
    pub max_replicas_per_agent: u32,
    /// `jobs.restart_backoff` and `jobs.restart_backoff_max`.
    pub backoff: (Duration, Duration),
    /// Where each job's replica logs go (`<logs>/<job>/<replica>.log`).
    pub logs: PathBuf,
    /// `jobs.finished_in_memory`: the finished jobs held after a written turn, where the store
    /// reads the others back; `None` where it cannot (they stay until their time-to-live).
    pub finished_in_memory: Option<usize>,
    /// `jobs.history_retention`: a finished job older than this leaves memory whatever the
    /// count (the store prunes it).
    pub history_retention: Duration,
    /// `cluster.node_refusal_cooldown`: how long a node whose kubelet refused a replica's pod
    /// gets no new replicas (zero: it is not kept out).
    pub node_refusal_cooldown: Duration,
}

/// One thing that happened, fed to [`Lifecycle::step`].
#[derive(Debug)]
pub enum Input {
    /// An admitted job and the manifest as submitted; `owner` becomes the job's owner.
    Submit {
        request: RequestId,
        job: Box<job::TrainingJob>,
        manifest: String,
        owner: Owner,
    },
    /// Cancels an active job; removes a finished one.
    Cancel {
        request: RequestId,
        name: String,
        by: String,
    },
    /// Removes a finished job that is no longer held in memory: the caller read it from the
    /// store (its `agentctl cancel`).
    RemoveStored {
        request: RequestId,
        status: Box<JobStatus>,
    },
    /// `agentctl drain` (true) or `agentctl resume` (false).
    Drain(bool),
    ReplicaStarted {
        job: String,
        replica: String,
        generation: u32,
        pid: u32,
    },
    /// A replica not started yet waits for something that may never come (its executor ends
    /// it if the wait lasts): what, to be said while the gang starts.
    ReplicaWaiting {
        job: String,
        replica: String,
        generation: u32,
        message: String,
    },
    ReplicaStartFailed {
        job: String,
        replica: String,
        generation: u32,
        message: String,
        /// The machine was short of something for a moment: starting again may work.
        transient: bool,
    },
    ReplicaExited {
        job: String,
        replica: String,
        generation: u32,
        outcome: ExitOutcome,
    },
    /// The platform ended a replica, or never ran it (cluster mode).
    ReplicaEnded {
        job: String,
        replica: String,
        generation: u32,
        end: job::PlatformEnd,
    },
    /// Every process of a gang's generation is gone: its allocation is free.
    GangStopped { job: String, generation: u32 },
    /// A GPU's health changed: a node event, and a new pass.
    GpuHealthChanged(GpuHealthEvent),
    /// A new inventory: gangs on GPUs that turned unhealthy restart.
    InventoryChanged(Arc<NodeInventory>),
    /// The cluster's nodes or their free capacity changed (cluster mode): a new pass.
    NodesChanged,
    /// The queues' priorities or limits changed: a new pass.
    QueuesChanged,
    /// The cluster's lost nodes, as the feed sees them now (cluster mode): every gang with a
    /// live replica on one restarts elsewhere. Fed after each change of the nodes; a gang
    /// restarted once is not running there any more, so a node still listed costs nothing.
    NodesLost(Vec<LostNode>),
    /// A scheduling pass's decision, taken on `inventory`, with the addresses the executor
    /// gave each placed gang's replicas (or why it could not).
    Scheduled {
        inventory: Arc<NodeInventory>,
        waiting: Vec<sched::Waiting>,
        placements: Vec<(sched::Placement, Result<ClusterHosts, String>)>,
    },
    /// Time passed: deadlines, schedule time-outs, back-offs, time-to-live.
    Tick,
    /// The store takes writes again (after they failed).
    StoreWritable,
    /// At start-up: a stored job read back. `adopted` says how many of its running replicas
    /// the executor watches again, or why the gang could not be adopted (its leftovers are
    /// already stopped then).
    Restored {
        record: Box<JobRecord>,
        adopted: Result<usize, String>,
    },
    /// At start-up: a stored job that cannot be read (its leftovers are already stopped).
    Unreadable {
        name: String,
        manifest: String,
        status: Option<Box<JobStatus>>,
        parsed: Option<Box<job::TrainingJob>>,
        /// What is wrong with it, for its message.
        problems: String,
    },
}

/// A node that is gone as far as its replicas are concerned (cluster mode): not Ready, or its
/// kubelet silent, for longer than `cluster.node_lost_grace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostNode {
    pub name: String,
    /// What was seen, naming the node: "node gpu-7 not Ready for 52s (...)".
    pub message: String,
}

/// One gang (generation) to stop: these process groups, then report it gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GangStop {
    pub job: String,
    pub generation: u32,
    pub pgids: Vec<u32>,
    /// The job has ended and its `cleanPodPolicy` is not `All`: replicas that have ended are
    /// kept (pods, with their logs), as the Kubeflow training operator keeps them.
    pub keep_ended: bool,
}

/// A metric the turn moved.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricUpdate {
    StateChanged {
        queue: String,
        from: &'static str,
        to: &'static str,
    },
    GangRestarted {
        reason: String,
    },
    SubmitToRunning(Duration),
    /// A replica failure of a class operators watch (`agentd_job_failures_total`).
    JobFailure {
        reason: &'static str,
    },
    /// A job finished: counted by queue and reason, its GPU-seconds by queue and user.
    JobFinished(Box<JobStatus>),
}

/// What the caller does once the turn is written (or its write failed), in this order.
#[derive(Debug)]
pub enum Effect {
    Reply {
        request: RequestId,
        result: Box<Result<JobStatus, CoreError>>,
    },
    StartReplica(Box<LaunchSpec>),
    StopGang(GangStop),
    /// A replica started for no launch anyone waits for: kill its process group.
    KillStray {
        job: String,
        replica: String,
        pid: u32,
    },
    /// A removed job's replica logs, and what is left of its replicas (pods kept when it
    /// ended).
    RemoveLogs {
        job: String,
    },
    Metric(MetricUpdate),
}

/// What a turn asks the caller to write, in one transaction, before any effect.
#[derive(Debug, Default)]
pub struct Persist {
    pub jobs: Vec<JobWrite>,
    pub events: Vec<NewEvent>,
}

impl Persist {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.events.is_empty()
    }
}

/// The jobs and the turn in progress.
pub struct Lifecycle {
    settings: Settings,
    jobs: Jobs,
    /// `agentctl drain`: nothing new is placed here until `agentctl resume`.
    drained: bool,
    /// Why the last write failed, while writes fail: nothing new is placed meanwhile.
    write_failure: Option<String>,
    /// The last statuses of the jobs removed most recently, for a client that waited on one
    /// (`agentctl submit --wait` on a job with `ttlSecondsAfterFinished: 0`).
    removed: VecDeque<JobStatus>,
    /// Replicas handed to the executor and not yet reported started or failed.
    in_flight: u32,
    needs_pass: bool,
    /// The state each job was last reported in, for the transition counters.
    reported: BTreeMap<String, JobState>,
    /// What the current turn has changed, written before any effect.
    dirty: BTreeSet<String>,
    deleted: BTreeSet<String>,
    events: Vec<NewEvent>,
    /// Each job a request or a placement changed this turn, as it was before (`None`: it did
    /// not exist). A turn that cannot be written is undone with it; facts (a replica ended)
    /// stay, to be written by a later turn.
    undo: BTreeMap<String, Option<JobRecord>>,
    /// Answers to requests of this turn, sent once it is written (or its write failed).
    replies: Vec<(RequestId, Result<JobStatus, CoreError>)>,
    /// Replicas placed this turn, started once the turn is written.
    starts: Vec<LaunchSpec>,
    /// Gangs to stop once the turn is written.
    stops: Vec<GangStop>,
    /// Effects that wait for the write but are not undone with a job: metrics, strays.
    other: Vec<Effect>,
    /// Nodes kept out of placement after refusing a pod, until this monotonic time.
    refused_nodes: BTreeMap<String, f64>,
}

impl Lifecycle {
    pub fn new(settings: Settings, drained: bool) -> Self {
        Self {
            settings,
            jobs: Jobs::default(),
            drained,
            write_failure: None,
            removed: VecDeque::new(),
            in_flight: 0,
            needs_pass: true,
            reported: BTreeMap::new(),
            dirty: BTreeSet::new(),
            deleted: BTreeSet::new(),
            events: Vec::new(),
            undo: BTreeMap::new(),
            replies: Vec::new(),
            starts: Vec::new(),
            stops: Vec::new(),
            other: Vec::new(),
            refused_nodes: BTreeMap::new(),
        }
    }

    /// The nodes that refused a pod lately and get no new replicas yet.
    pub fn refused_nodes(&self, now: Now) -> impl Iterator<Item = &str> {
        self.refused_nodes
            .iter()
            .filter(move |(_, until)| **until > now.mono)
            .map(|(node, _)| node.as_str())
    }

    pub fn jobs(&self) -> &BTreeMap<String, JobRecord> {
        self.jobs.map()
    }

    /// The names of the jobs inserted, changed or removed since the last call (some may be
    /// gone): what the scheduler's feed must look at again.
    pub fn changed_jobs(&mut self) -> HashSet<String> {
        self.jobs.take_changed()
    }

    pub fn job(&self, name: &str) -> Option<&JobRecord> {
        self.jobs.get(name)
    }

    /// The last status of a job removed a moment ago.
    pub fn removed(&self, name: &str) -> Option<&JobStatus> {
        self.removed.iter().rev().find(|s| s.name == name)
    }

    /// Events of this turn, not yet written.
    pub fn pending_events(&self) -> &[NewEvent] {
        &self.events
    }

    pub fn drained(&self) -> bool {
        self.drained
    }

    pub fn write_failure(&self) -> Option<&str> {
        self.write_failure.as_deref()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The queue a job falls back to when its stored form cannot be read, from now on.
    pub fn set_default_queue(&mut self, queue: &str) {
        queue.clone_into(&mut self.settings.default_queue);
    }

    /// Whether something changed that a scheduling pass should see.
    pub fn needs_pass(&self) -> bool {
        self.needs_pass
    }

    /// The gangs waiting to be placed, for the scheduler.
    pub fn queued_gangs(&self) -> Vec<sched::Gang> {
        self.jobs
            .values()
            .filter_map(JobRecord::queued_gang)
            .collect()
    }

    /// The gangs holding resources, for the scheduler.
    pub fn running_gangs(&self) -> Vec<sched::RunningGang> {
        self.jobs
            .values()
            .filter_map(JobRecord::running_gang)
            .collect()
    }

    /// Whether new work may be placed: not while placements cannot be written, nor on a
    /// drained machine.
    pub fn schedulable(&self) -> bool {
        self.write_failure.is_none() && !self.drained
    }

    /// Takes one input.
    pub fn step(&mut self, input: Input, now: Now) {
        match input {
            Input::Submit {
                request,
                job,
                manifest,
                owner,
            } => {
                let result = self.submit(*job, manifest, owner, now);
                self.replies.push((request, result));
            }
            Input::Cancel { request, name, by } => {
                let result = self.cancel(&name, &by, now);
                self.replies.push((request, result));
            }
            Input::RemoveStored { request, status } => {
                let result = self.remove_stored(*status);
                self.replies.push((request, result));
            }
            Input::Drain(drained) => {
                if drained != self.drained {
                    self.drained = drained;
                    self.needs_pass = true;
                }
            }
            Input::ReplicaStarted {
                job,
                replica,
                generation,
                pid,
            } => self.replica_started(&job, &replica, generation, pid, now),
            Input::ReplicaWaiting {
                job,
                replica,
                generation,
                message,
            } => self.replica_waiting(&job, &replica, generation, &message, now),
            Input::ReplicaStartFailed {
                job,
                replica,
                generation,
                message,
                transient,
            } => self.replica_start_failed(&job, &replica, generation, message, transient, now),
            Input::ReplicaExited {
                job,
                replica,
                generation,
                outcome,
            } => self.replica_exit(
                record::ReplicaExit {
                    job,
                    replica,
                    generation,
                    outcome,
                    platform: None,
                },
                now,
            ),
            Input::ReplicaEnded {
                job,
                replica,
                generation,
                end,
            } => {
                if end.ran {
                    self.replica_exit(
                        record::ReplicaExit {
                            job,
                            replica,
                            generation,
                            outcome: ExitOutcome::default(),
                            platform: Some(end),
                        },
                        now,
                    );
                } else {
                    self.replica_never_ran(&job, &replica, generation, &end, now);
                }
            }
            Input::GangStopped { job, generation } => {
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
            Input::GpuHealthChanged(change) => {
                let reason = if change.healthy {
                    "GpuHealthy"
                } else {
                    "GpuUnhealthy"
                };
                self.events.push(NewEvent {
                    time: now.wall,
                    kind: "node",
                    object: self.settings.node.clone(),
                    reason: reason.to_owned(),
                    message: change.to_string(),
                });
                self.needs_pass = true;
            }
            Input::InventoryChanged(inventory) => self.inventory_changed(&inventory, now),
            Input::NodesChanged | Input::QueuesChanged => self.needs_pass = true,
            Input::NodesLost(lost) => self.nodes_lost(&lost, now),
            Input::Scheduled {
                inventory,
                waiting,
                placements,
            } => {
                self.needs_pass = false;
                self.waiting(waiting, now);
                for (placement, hosts) in placements {
                    self.start(&placement, &inventory, hosts, now);
                }
            }
            Input::Tick => self.tick(now),
            Input::StoreWritable => {
                if self.write_failure.take().is_some() {
                    self.needs_pass = true;
                }
            }
            Input::Restored { record, adopted } => self.restored(*record, adopted, now),
            Input::Unreadable {
                name,
                manifest,
                status,
                parsed,
                problems,
            } => self.unreadable(&name, manifest, status, parsed, &problems, now),
        }
    }

    /// Ends the turn: what to write before anything of it may happen.
    pub fn ready(&self, now: Now) -> Persist {
        let mut jobs: Vec<JobWrite> = self
            .deleted
            .iter()
            .map(|name| JobWrite::Delete { name: name.clone() })
            .collect();
        for name in &self.dirty {
            if let Some(record) = self.jobs.get(name) {
                let ttl = record.job.spec.run_policy.ttl_seconds_after_finished;
                let (finished, expires) = crate::store::history::lifetime(&record.status, ttl);
                jobs.push(JobWrite::Upsert {
                    name: name.clone(),
                    manifest: record.manifest.clone(),
                    status: serde_json::to_string(&record.status).expect("status serializes"),
                    time: now.wall,
                    finished,
                    expires,
                });
            }
        }
        Persist {
            jobs,
            events: self.events.clone(),
        }
    }

    /// The turn is written (or had nothing to write): every effect of it goes ahead. Only a
    /// real write ends a write failure ([`Input::StoreWritable`]): an empty turn proves nothing.
    pub fn persisted(&mut self) -> Vec<Effect> {
        let mut effects = self.transitions();
        self.dirty.clear();
        self.deleted.clear();
        self.events.clear();
        self.undo.clear();
        self.drain_effects(&mut effects);
        effects
    }

    /// The turn could not be written: every job a request or a placement changed is put back,
    /// what they would have started or stopped is dropped, and their requests are answered
    /// with `cause`. What else changed (replicas that ended, stops that are facts) is kept,
    /// to be written by a later turn; nothing new is placed until a write succeeds.
    pub fn not_persisted(&mut self, cause: &str) -> Vec<Effect> {
        self.write_failure = Some(cause.to_owned());
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
            self.stops.retain(|stop| stop.job != name);
            self.starts.retain(|spec| spec.job != name);
            self.other
                .retain(|e| !matches!(e, Effect::RemoveLogs { job } if *job == name));
        }
        // Every start of the turn came from a placement, and every placement was undone.
        debug_assert!(self.starts.is_empty());
        self.starts.clear();
        for (_, result) in &mut self.replies {
            if result.is_ok() {
                *result = Err(CoreError::NotWritten(cause.to_owned()));
            }
        }
        self.needs_pass = true;
        let mut effects = self.transitions();
        self.drain_effects(&mut effects);
        effects
    }

    /// The turn's effects, in the order they are performed.
    fn drain_effects(&mut self, effects: &mut Vec<Effect>) {
        effects.extend(
            self.replies
                .drain(..)
                .map(|(request, result)| Effect::Reply {
                    request,
                    result: Box::new(result),
                }),
        );
        effects.extend(
            self.starts
                .drain(..)
                .map(|spec| Effect::StartReplica(Box::new(spec))),
        );
        effects.extend(self.stops.drain(..).map(Effect::StopGang));
        effects.append(&mut self.other);
    }

    /// The state transitions of the jobs this turn changed, for the counters.
    fn transitions(&mut self) -> Vec<Effect> {
        let mut effects = Vec::new();
        for name in &self.dirty {
            let Some(record) = self.jobs.get_mut(name) else {
                continue;
            };
            for state in record.entered.drain(..) {
                let before = self.reported.insert(name.clone(), state);
                if before != Some(state) {
                    effects.push(Effect::Metric(MetricUpdate::StateChanged {
                        queue: record.status.queue.clone(),
                        from: before.map_or("None", JobState::as_str),
                        to: state.as_str(),
                    }));
                    // A job read back finished at start-up was counted by the agent it
                    // finished under.
                    if state.is_finished() && before.is_some() {
                        effects.push(Effect::Metric(MetricUpdate::JobFinished(Box::new(
                            record.status.clone(),
                        ))));
                    }
                }
            }
        }
        for name in &self.deleted {
            self.reported.remove(name);
        }
        effects
    }

    fn submit(
        &mut self,
        parsed: job::TrainingJob,
        text: String,
        owner: Owner,
        now: Now,
    ) -> Result<JobStatus, CoreError> {
        let held = self.jobs.held_replicas();
        let wanted = held + u64::from(parsed.total_replicas());
        let most = self.settings.max_replicas_per_agent;
        if wanted > u64::from(most) {
            return Err(CoreError::BadField {
                field: format!("spec.{}", parsed.source.replica_specs_key()),
                message: format!(
                    "the agent's unfinished jobs hold {held} replicas and this job has {}; it \
                     takes at most {most} in all (jobs.max_replicas_per_agent); submit it when \
                     others have finished",
                    parsed.total_replicas(),
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
            now,
        );
        self.dirty.insert(name);
        self.needs_pass = true;
        Ok(status)
    }

    fn cancel(&mut self, name: &str, by: &str, now: Now) -> Result<JobStatus, CoreError> {
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
                self.stop_kept_replicas(name, now);
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
            now,
        );
        Ok(self.jobs[name].status.clone())
    }

    /// Removes a finished job the store holds and memory does not: its row, events and logs
    /// go with the turn.
    fn remove_stored(&mut self, mut status: JobStatus) -> Result<JobStatus, CoreError> {
        let name = status.name.clone();
        if self.jobs.contains_key(&name) || !status.state.is_finished() {
            // The caller reads the store only for jobs it does not hold, and only finished
            // jobs leave memory: anything else is a stored job this agent does not know.
            return Err(CoreError::Conflict(format!(
                "job {name:?} is stored as {} but not held by the agent; restart the agent to \
                 read it back",
                status.state
            )));
        }
        status.events.clear();
        self.undo.entry(name.clone()).or_insert(None);
        self.deleted.insert(name.clone());
        self.other.push(Effect::RemoveLogs { job: name });
        "Removed".clone_into(&mut status.reason);
        status.message = format!("removed ({} before)", status.state);
        Ok(status)
    }

    /// After a written turn: the finished jobs beyond `finished_in_memory` (the oldest first)
    /// and those past `history_retention` leave memory; they are on disk already. Only a job
    /// that holds nothing any more (no allocation, no process, no launch or stop under way)
    /// goes; one that still does is looked at again after the next turn. Returns how many went.
    pub fn let_finished_go(&mut self, now: Now) -> usize {
        let Some(keep) = self.settings.finished_in_memory else {
            return 0;
        };
        // Nothing of this turn is written yet: let go only after it is.
        if !self.dirty.is_empty() || !self.deleted.is_empty() {
            return 0;
        }
        let cutoff = now.wall - self.settings.history_retention.as_secs_f64();
        let (count, first) = self.jobs.finished();
        if count <= keep && first.is_none_or(|at| at >= cutoff) {
            return 0;
        }
        // Newest first: the first `keep` stay unless past the retention.
        let mut leaving: Vec<String> = self
            .jobs
            .finished_newest_first()
            .enumerate()
            .filter(|(i, (at, _))| *i >= keep || *at < cutoff)
            .map(|(_, (_, name))| name.to_owned())
            .collect();
        leaving.retain(|name| holds_nothing(&self.jobs[name.as_str()]));
        for name in &leaving {
            self.jobs.remove(name);
            self.reported.remove(name);
        }
        leaving.len()
    }

    /// Stops the replicas a finished job left running; its allocation is freed once they
    /// are gone.
    fn stop_kept_replicas(&mut self, name: &str, now: Now) {
        let Some(record) = self.jobs.get_mut(name) else {
            return;
        };
        let groups = std::mem::take(&mut record.kept);
        record.mark_running_terminated();
        let generation = record.status.generation;
        self.dirty.insert(name.to_owned());
        self.event(
            name,
            "Stopping",
            format!("stopping {} replica(s) left running", groups.len()),
            now,
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
            self.other.push(Effect::RemoveLogs {
                job: name.to_owned(),
            });
        }
    }

    /// Records an event of a job, written with the turn.
    fn event(&mut self, name: &str, reason: &str, message: String, now: Now) {
        tracing::info!(job = name, reason, "{message}");
        self.events.push(NewEvent {
            time: now.wall,
            kind: "job",
            object: name.to_owned(),
            reason: reason.to_owned(),
            message,
        });
    }

    /// Gangs on GPUs that turned unhealthy restart elsewhere: one fault, one restart.
    fn inventory_changed(&mut self, inventory: &NodeInventory, now: Now) {
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
            self.restart_gang(&name, "GpuUnhealthy", &message, now);
        }
        self.needs_pass = true;
    }

    /// Gangs with a live replica on a lost node restart elsewhere (the feed closes the node):
    /// one restart per gang however many of its replicas were there, counted as a failure of
    /// the platform's (`NodeLost`).
    fn nodes_lost(&mut self, lost: &[LostNode], now: Now) {
        if lost.is_empty() {
            return;
        }
        let hit: Vec<(String, String)> = self
            .jobs
            .values()
            .filter(|r| {
                matches!(
                    r.status.state,
                    JobState::Placed | JobState::Starting | JobState::Running
                )
            })
            .filter_map(|r| {
                r.status
                    .replicas
                    .iter()
                    .filter(|replica| {
                        matches!(replica.state, ReplicaState::Pending | ReplicaState::Running)
                    })
                    .find_map(|replica| {
                        let node = replica.node.as_deref()?;
                        let lost = lost.iter().find(|l| l.name == node)?;
                        Some((r.status.name.clone(), replica.name.clone(), lost))
                    })
                    .map(|(job, replica, lost)| (job, format!("{replica}: {}", lost.message)))
            })
            .collect();
        for (name, message) in hit {
            let reason = job::PlatformFailure::NodeLost.reason();
            self.other
                .push(Effect::Metric(MetricUpdate::JobFailure { reason }));
            self.restart_gang(
                &name,
                reason,
                &format!("{message}; the gang restarts on other nodes"),
                now,
            );
        }
        self.needs_pass = true;
    }

    fn tick(&mut self, now: Now) {
        let refused = self.refused_nodes.len();
        self.refused_nodes.retain(|_, until| *until > now.mono);
        if self.refused_nodes.len() < refused {
            self.needs_pass = true;
        }
        let mut expired = Vec::new();
        let mut requeue = Vec::new();
        let mut remove = Vec::new();
        for (name, r) in self.jobs.iter() {
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
            self.finish(&name, JobState::Failed, reason, message, now);
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
                now,
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

    /// Why each gang that was not placed waits, as the scheduler said (and the drain).
    fn waiting(&mut self, waiting: Vec<sched::Waiting>, now: Now) {
        for waiting in waiting {
            let Some(record) = self.jobs.get_mut(&waiting.gang) else {
                continue;
            };
            let message: Cow<'_, str> = if self.drained {
                let node = &self.settings.node;
                Cow::Owned(format!(
                    "{}; node {node} is drained (agentctl resume {node} lets new work in)",
                    waiting.message
                ))
            } else {
                Cow::Borrowed(&waiting.message)
            };
            if record.status.reason != waiting.reason || record.status.message != *message {
                waiting.reason.clone_into(&mut record.status.reason);
                message.as_ref().clone_into(&mut record.status.message);
                self.dirty.insert(waiting.gang.clone());
                self.event(&waiting.gang, waiting.reason, message.into_owned(), now);
            }
        }
    }

    /// Takes a placement: a new generation, one replica start per replica once written.
    fn start(
        &mut self,
        placement: &sched::Placement,
        inventory: &NodeInventory,
        hosts: Result<ClusterHosts, String>,
        now: Now,
    ) {
        let name = placement.gang.clone();
        let log_dir = self.settings.logs.join(&name);
        let Some(record) = self.jobs.get_mut(&name) else {
            return;
        };
        self.undo
            .entry(name.clone())
            .or_insert_with(|| Some(record.clone()));
        let summary = record.place(placement, inventory, now);
        self.dirty.insert(name.clone());
        self.event(&name, "Placed", summary, now);
        let record = self.jobs.get_mut(&name).expect("present");
        let launches = hosts.and_then(|hosts| record.launch_specs(&log_dir, inventory, &hosts));
        let launches = match launches {
            Ok(launches) => launches,
            Err(message) => {
                self.finish(&name, JobState::Failed, "StartFailed", message, now);
                return;
            }
        };
        record.set_state(JobState::Starting, "Starting", "starting replicas");
        record.launching = launches.len() as u32;
        self.in_flight += record.launching;
        self.starts.extend(launches);
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

    fn replica_started(&mut self, job: &str, replica: &str, generation: u32, pid: u32, now: Now) {
        let Some(record) = self.launch_reported(job, generation) else {
            // Every launch is counted until reported, so this is a process nobody waits for.
            tracing::warn!(job, replica, pid, "stopping a replica of no current launch");
            self.other.push(Effect::KillStray {
                job: job.to_owned(),
                replica: replica.to_owned(),
                pid,
            });
            return;
        };
        record.replica_started(replica, pid, now.wall);
        if let Some(stop) = &mut record.pending_stop {
            stop.push(pid);
        }
        self.dirty.insert(job.to_owned());
        self.launch_settled(job, now);
    }

    /// The gang, still starting, says which replica waits and for what, in its message and
    /// an event (one status write per wait).
    fn replica_waiting(
        &mut self,
        job: &str,
        replica: &str,
        generation: u32,
        message: &str,
        now: Now,
    ) {
        let Some(record) = self.jobs.get_mut(job).filter(|r| {
            r.status.generation == generation
                && r.status.state == JobState::Starting
                && r.pending_stop.is_none()
        }) else {
            return;
        };
        let said = format!("{replica} waits: {message}");
        if record.status.message == said {
            return;
        }
        record.status.message.clone_from(&said);
        self.dirty.insert(job.to_owned());
        self.event(job, "ReplicaWaiting", said, now);
    }

    fn replica_start_failed(
        &mut self,
        job: &str,
        replica: &str,
        generation: u32,
        message: String,
        transient: bool,
        now: Now,
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
                self.restart_gang(job, "StartFailed", &message, now);
            } else {
                self.finish(job, JobState::Failed, "StartFailed", message, now);
            }
        }
        self.launch_settled(job, now);
    }

    /// A launch the platform never ran (its volumes or image never ready, refused or evicted
    /// before it ran): a launch report, handled as its class says.
    fn replica_never_ran(
        &mut self,
        job: &str,
        replica: &str,
        generation: u32,
        end: &job::PlatformEnd,
        now: Now,
    ) {
        let Some(record) = self.launch_reported(job, generation) else {
            return;
        };
        if record.status.state == JobState::Starting && record.pending_stop.is_none() {
            self.platform_failed(job, replica, end, now);
        }
        self.launch_settled(job, now);
    }

    /// A replica the platform ended: the job fails at once, or the gang restarts (counted),
    /// whatever the restart policy says (it judges the program's ends, and this is not one).
    fn platform_failed(&mut self, job: &str, replica: &str, end: &job::PlatformEnd, now: Now) {
        let reason = end.failure.reason();
        self.other
            .push(Effect::Metric(MetricUpdate::JobFailure { reason }));
        if end.failure.fails_job() {
            let message = format!("{replica}: {}", end.message);
            self.finish(job, JobState::Failed, reason, message, now);
            return;
        }
        let cooldown = self.settings.node_refusal_cooldown;
        let refusing = (end.failure == job::PlatformFailure::NodeRefused && !cooldown.is_zero())
            .then(|| self.jobs.get(job))
            .flatten()
            .and_then(|r| r.status.replicas.iter().find(|r| r.name == replica))
            .and_then(|r| r.node.clone());
        let mut message = format!("{replica}: {}; the gang restarts", end.message);
        if let Some(node) = refusing {
            message.push_str(&format!(
                ", and node {node} gets no new replicas for {} (cluster.node_refusal_cooldown)",
                crate::config::format_duration(cooldown)
            ));
            self.refused_nodes
                .insert(node, now.mono + cooldown.as_secs_f64());
        }
        self.restart_gang(job, reason, &message, now);
    }

    /// A replica that ends before the rest of its gang has started is taken once the gang is
    /// complete: a gang is Running before any of its ends counts.
    fn replica_exit(&mut self, exit: record::ReplicaExit, now: Now) {
        if let Some(record) = self.jobs.get_mut(&exit.job)
            && record.status.generation == exit.generation
            && record.launching > 0
        {
            record.early_exits.push(exit);
            return;
        }
        self.replica_exited(&exit, now);
    }

    /// After a launch report: once every replica of the generation is accounted for, the
    /// gang is running, or (stopped meanwhile) its stop goes ahead.
    fn launch_settled(&mut self, name: &str, now: Now) {
        let Some(record) = self.jobs.get_mut(name).filter(|r| r.launching == 0) else {
            return;
        };
        let generation = record.status.generation;
        let early_exits = std::mem::take(&mut record.early_exits);
        if let Some(pgids) = record.pending_stop.take() {
            self.stop_gang(name, generation, pgids);
        } else if record.status.state == JobState::Starting {
            self.gang_running(name, now);
        }
        for exit in &early_exits {
            self.replica_exited(exit, now);
        }
    }

    fn gang_running(&mut self, name: &str, now: Now) {
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
        if generation == 1 {
            let waited = (now.wall - record.status.submitted_at).max(0.0);
            self.other
                .push(Effect::Metric(MetricUpdate::SubmitToRunning(
                    Duration::from_secs_f64(waited),
                )));
        }
        self.dirty.insert(name.to_owned());
        self.event(
            name,
            "Running",
            format!("{replicas} started (generation {generation})"),
            now,
        );
    }

    fn replica_exited(&mut self, exit: &record::ReplicaExit, now: Now) {
        let Some(record) = self.jobs.get_mut(&exit.job) else {
            return;
        };
        if exit.generation != record.status.generation {
            return;
        }
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
        if let Some(end) = &exit.platform
            && !matches!(outcome, ReplicaVerdict::Ignored)
        {
            self.platform_failed(&exit.job, &exit.replica, end, now);
            return;
        }
        let described = crate::exec::describe(exit.outcome);
        // An OOM kill is named as such, as Kubernetes names it.
        let failed = if exit.outcome.oom_killed {
            if !matches!(outcome, ReplicaVerdict::Ignored) {
                self.other.push(Effect::Metric(MetricUpdate::JobFailure {
                    reason: OOM_KILLED,
                }));
            }
            OOM_KILLED
        } else {
            "ReplicaFailed"
        };
        match outcome {
            ReplicaVerdict::Ignored => {
                if let Some((generation, groups)) = last_kept {
                    self.event(
                        &exit.job,
                        "ReplicasEnded",
                        format!(
                            "{} ended ({described}); no replica is left running",
                            exit.replica
                        ),
                        now,
                    );
                    self.stop_gang(&exit.job, generation, groups);
                }
            }
            ReplicaVerdict::Succeeded { job_done: false } => {
                self.event(
                    &exit.job,
                    "ReplicaSucceeded",
                    format!("{} completed", exit.replica),
                    now,
                );
            }
            ReplicaVerdict::Succeeded { job_done: true } => {
                self.finish(
                    &exit.job,
                    JobState::Succeeded,
                    "Succeeded",
                    job::success_message(&self.jobs[&exit.job].job, &exit.replica),
                    now,
                );
            }
            ReplicaVerdict::Restart { policy } => {
                self.restart_gang(
                    &exit.job,
                    failed,
                    &format!(
                        "{} ended ({described}); restartPolicy {policy:?} restarts the gang",
                        exit.replica
                    ),
                    now,
                );
            }
            ReplicaVerdict::Fail { policy } => {
                self.finish(
                    &exit.job,
                    JobState::Failed,
                    failed,
                    format!("{} ended ({described}), a permanent failure under restartPolicy {policy:?}", exit.replica),
                    now,
                );
            }
        }
    }

    /// Restarts a gang, or fails the job when its backoffLimit is spent.
    fn restart_gang(&mut self, name: &str, reason: &str, message: &str, now: Now) {
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
                now,
            );
            return;
        }
        // The job module's rule (doubling, capped), scaled to the configured base and cap.
        let (base, cap) = self.settings.backoff;
        let factor = job::backoff_delay(record.status.restarts).as_secs_f64()
            / job::BACKOFF_BASE.as_secs_f64();
        let delay = base.mul_f64(factor).min(cap);
        let restart_at = now.mono + delay.as_secs_f64();
        let pgids = record.begin_restart(reason, message, restart_at);
        self.other.push(Effect::Metric(MetricUpdate::GangRestarted {
            reason: reason.to_owned(),
        }));
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
            now,
        );
    }

    /// Ends a job and stops what is left of its gang.
    fn finish(&mut self, name: &str, state: JobState, reason: &str, message: String, now: Now) {
        let Some(record) = self.jobs.get_mut(name) else {
            return;
        };
        let pgids = record.finish(state, reason, &message, now);
        let generation = record.status.generation;
        // Replicas left running (cleanPodPolicy None) keep the gang's allocation until the
        // last of them ends; see `replica_exited`.
        if record.live_pgids().is_empty() {
            self.stop_gang(name, generation, pgids);
        }
        self.dirty.insert(name.to_owned());
        self.needs_pass = true;
        self.event(name, reason, message, now);
    }

    /// Stops a gang once the turn is written. While replicas of the gang are still being
    /// started, the stop waits for them (see `launch_settled`), so that none is left running
    /// outside the gang's allocation.
    fn stop_gang(&mut self, name: &str, generation: u32, pgids: Vec<u32>) {
        if let Some(record) = self.jobs.get_mut(name)
            && record.launching > 0
        {
            record.pending_stop.get_or_insert_default().extend(pgids);
            return;
        }
        let keep_ended = self.jobs.get(name).is_some_and(|r| {
            r.status.state.is_finished()
                && r.job.spec.run_policy.clean_pod_policy != Some(crate::job::CleanPodPolicy::All)
        });
        self.stops.push(GangStop {
            job: name.to_owned(),
            generation,
            pgids,
            keep_ended,
        });
    }

    /// A stored job read back at start-up: an adopted running gang keeps its replicas and
    /// allocation; any other gang that was placed is restarted, not counted against
    /// `backoffLimit` (the agent, not the job, is why it stopped).
    fn restored(&mut self, mut record: JobRecord, adopted: Result<usize, String>, now: Now) {
        let name = record.status.name.clone();
        let state = record.status.state;
        let why_not = match adopted {
            Ok(replicas) if state == JobState::Running => {
                tracing::info!(job = name, replicas, "adopted the running gang");
                record.allocation = Some(adopted_allocation(&record));
                self.jobs.insert(name.clone(), record);
                self.event(
                    &name,
                    "Adopted",
                    format!("the agent restarted; {replicas} running replicas adopted as they are"),
                    now,
                );
                return;
            }
            Ok(_) => "the gang was still starting".to_owned(),
            Err(why) => why,
        };
        record.mark_running_terminated();
        self.jobs.insert(name.clone(), record);
        match state {
            JobState::Placed | JobState::Starting | JobState::Running => {
                let message = format!(
                    "the agent restarted and could not adopt the gang ({why_not}); \
                     restarting it, not counted against backoffLimit"
                );
                self.other.push(Effect::Metric(MetricUpdate::GangRestarted {
                    reason: "AgentRestarted".to_owned(),
                }));
                let record = self.jobs.get_mut(&name).expect("inserted");
                record.requeue(now);
                record.set_state(JobState::Queued, "AgentRestarted", &message);
                self.dirty.insert(name.clone());
                self.event(&name, "AgentRestarted", message, now);
            }
            JobState::Restarting => {
                let record = self.jobs.get_mut(&name).expect("inserted");
                record.requeue(now);
                self.dirty.insert(name);
            }
            JobState::Queued | JobState::Succeeded | JobState::Failed | JobState::Cancelled => {}
        }
    }

    /// A stored job that cannot be read: its row is kept, and it is shown failed with the
    /// reason. Its GPUs are free only because its processes are gone.
    fn unreadable(
        &mut self,
        name: &str,
        manifest: String,
        status: Option<Box<JobStatus>>,
        parsed: Option<Box<job::TrainingJob>>,
        problems: &str,
        now: Now,
    ) {
        // A job refused at admission (a TrainingJob someone applied) was never valid: its
        // manifest not parsing is what its status already says, nothing to raise again.
        let refused = status
            .as_ref()
            .is_some_and(|s| s.state == JobState::Failed && s.reason == REFUSED_REASON);
        let job = parsed.map_or_else(
            || job::TrainingJob {
                name: name.to_owned(),
                namespace: None,
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
                source: job::SourceKind::default(),
                written: job::WrittenKeys::default(),
                spec: job::JobSpec {
                    queue: Some(self.settings.default_queue.clone()),
                    ..job::JobSpec::default()
                },
            },
            |parsed| *parsed,
        );
        let mut record = match status {
            Some(status) => JobRecord::restore(job, manifest, *status, now),
            // Its count was never checked against this agent's limits.
            None => JobRecord::without_replicas(job, manifest, now),
        };
        if refused {
            self.jobs.insert(name.to_owned(), record);
            return;
        }
        let message = format!(
            "{problems}; it is kept as failed: read it with `agentctl job {name}`, remove it with `agentctl cancel {name}`"
        );
        tracing::error!(job = name, "{message}");
        record.mark_running_terminated();
        if !record.status.state.is_finished() {
            record.finish(JobState::Failed, "Unreadable", &message, now);
        }
        self.jobs.insert(name.to_owned(), record);
        self.dirty.insert(name.to_owned());
        self.event(name, "Unreadable", message, now);
    }
}

/// The reason of a job refused at admission: a TrainingJob object whose manifest is not valid.
pub const REFUSED_REASON: &str = "Invalid";

/// Whether a finished job holds nothing the lifecycle must still see to: it can live on disk
/// alone.
fn holds_nothing(r: &JobRecord) -> bool {
    r.allocation.is_none()
        && r.launching == 0
        && r.pending_stop.is_none()
        && r.kept.is_empty()
        && r.early_exits.is_empty()
        && !r.remove_when_released
        && r.live_pgids().is_empty()
}

/// What an adopted gang holds: each placed replica's node, GPUs and requests.
fn adopted_allocation(record: &JobRecord) -> Allocation {
    let requests: BTreeMap<String, sched::Resources> = job::gang_request(&record.job, 0.0)
        .replicas
        .into_iter()
        .map(|r| (r.name, r.resources))
        .collect();
    let assignments = record
        .status
        .replicas
        .iter()
        .filter(|r| r.state != ReplicaState::Pending)
        .filter_map(|r| {
            Some(sched::Assignment {
                replica: r.name.clone(),
                node: r.node.clone()?,
                gpu_indices: r.gpu_indices.clone(),
                resources: requests.get(&r.name).copied().unwrap_or_default(),
            })
        })
        .collect();
    Allocation {
        generation: record.status.generation,
        assignments,
    }
}

/// What of a stored job can be read, and what cannot (for [`Input::Unreadable`]).
pub fn unreadable_problems(
    status: Option<&serde_json::Error>,
    parsed: Option<&SpecError>,
) -> String {
    let mut problems = Vec::new();
    if let Some(e) = status {
        problems.push(format!("its stored status is unreadable ({e})"));
    }
    if let Some(e) = parsed {
        problems.push(format!("its manifest no longer parses ({e})"));
    }
    problems.join(" and ")
}

#[cfg(test)]
mod tests;
