//! What the core's scheduler is told. The core keeps one [`Scheduler`] for its life and, before
//! each pass, tells it what changed among the jobs since the last one: gangs that entered the
//! queue (submitted, requeued after a restart, a placement undone), left it (cancelled, timed
//! out, removed), started holding resources or stopped (placed, adopted, stopped, finished),
//! and the nodes (GPU health, drain, the cluster's nodes). The lifecycle notes every job it
//! changes; the feed compares only those with what it last told the scheduler, and builds a
//! gang only for a job whose place changed: a pass over a deep queue costs what the
//! scheduler's pass costs, not a look at every job.
//!
//! It also tells the scheduler each job's run time: the declared one, else the estimate it
//! gave the job ([`Estimates`]), when the configuration turns estimates on.
//!
//! It owns no job and decides nothing: the pass's decision is the scheduler's, and in debug
//! builds the core checks it against the full pass ([`crate::sched::schedule`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use agentd_api::jobs::JobState;

use super::clock::Now;
use super::estimates::Estimates;
use super::record::JobRecord;
use crate::sched::{Estimate, NodeCapacity, Policy, QueueConfig, Scheduler};

/// Which record was queued, and since when: a job that leaves the queue and comes back (a
/// restart, an undone placement) or a new job of the same name is queued again.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QueuedAs {
    serial: u64,
    generation: u32,
    since: u64,
}

impl QueuedAs {
    fn of(record: &JobRecord) -> Self {
        Self {
            serial: record.serial,
            generation: record.status.generation,
            since: record.queued_since.to_bits(),
        }
    }
}

/// The scheduler and what it has been told.
pub(super) struct Feed {
    scheduler: Scheduler,
    /// The queued gangs it holds, by job.
    queued: HashMap<String, QueuedAs>,
    /// The running gangs it holds, by job.
    running: HashSet<String>,
    /// The cluster's node list it was given, and whether writes were failing then.
    cluster_nodes: Option<(Arc<Vec<NodeCapacity>>, bool)>,
    /// Whether this machine was drained at the last pass.
    drained: bool,
    /// Run-time estimates, when on.
    estimates: Option<Estimates>,
}

impl Feed {
    pub fn new(policy: Policy, queues: Vec<QueueConfig>, estimates: Option<Estimates>) -> Self {
        Self {
            scheduler: Scheduler::new(policy, Vec::new(), queues),
            queued: HashMap::new(),
            running: HashSet::new(),
            cluster_nodes: None,
            drained: false,
            estimates,
        }
    }

    /// The run-time estimates, when on: to learn from finished jobs.
    pub fn estimates_mut(&mut self) -> Option<&mut Estimates> {
        self.estimates.as_mut()
    }

    /// How many keys the estimates learned run times under.
    #[cfg(test)]
    pub fn learned_keys(&self) -> Option<usize> {
        self.estimates.as_ref().map(Estimates::learned_keys)
    }

    /// The estimate a job's run time was planned on, if it declared none and got one, and
    /// whether it has run past it by `now`.
    pub fn estimate_of(&self, record: &JobRecord, now: f64) -> Option<(&Estimate, bool)> {
        let estimates = self.estimates.as_ref()?;
        let estimate = estimates.given(record)?;
        let overran = record.status.started_at.is_some()
            && estimates.planned_end_given(record, now).is_none();
        Some((estimate, overran))
    }

    /// The core adds the drain to every waiting gang's message, so when it changes every
    /// waiting gang is listed again.
    pub fn drained(&mut self, drained: bool) {
        if self.drained != drained {
            self.drained = drained;
            self.scheduler.relist();
        }
    }

    /// For the debug builds' check against the full pass.
    #[cfg(debug_assertions)]
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// The nodes the scheduler places on.
    pub fn nodes(&self) -> &[NodeCapacity] {
        self.scheduler.nodes()
    }

    pub fn scheduler_mut(&mut self) -> &mut Scheduler {
        &mut self.scheduler
    }

    /// Standalone: this machine's node, as the core sees it now.
    pub fn local_node(&mut self, node: NodeCapacity) {
        if self.scheduler.nodes() != std::slice::from_ref(&node) {
            self.scheduler.set_nodes(vec![node]);
        }
    }

    /// Cluster mode: the watched node list, closed while job changes cannot be written.
    pub fn cluster_nodes(&mut self, nodes: &Arc<Vec<NodeCapacity>>, write_failing: bool) {
        if let Some((had, failing)) = &self.cluster_nodes
            && Arc::ptr_eq(had, nodes)
            && *failing == write_failing
        {
            return;
        }
        self.cluster_nodes = Some((nodes.clone(), write_failing));
        let nodes = nodes
            .iter()
            .map(|node| NodeCapacity {
                schedulable: node.schedulable && !write_failing,
                ..node.clone()
            })
            .collect();
        self.scheduler.set_nodes(nodes);
    }

    /// Tells the scheduler what changed among the jobs since the last call: every job that
    /// waits to be placed is queued there, every job that holds resources is running there
    /// with its current expected end, and nothing else is. `changed` names every job inserted,
    /// changed or removed since the last call; with estimates on, the running gangs' expected
    /// ends move with time, so each of them is looked at again too.
    pub fn jobs(&mut self, jobs: &BTreeMap<String, JobRecord>, changed: HashSet<String>, now: Now) {
        for name in changed {
            self.job(jobs.get(&name), name, now);
        }
        if self.estimates.is_some() {
            let running: Vec<String> = self.running.iter().cloned().collect();
            for name in running {
                self.job(jobs.get(&name), name, now);
            }
        }
    }

    /// Tells the scheduler where one job stands now (`None`: it is gone). A job that leaves
    /// the scheduler leaves the estimates too.
    fn job(&mut self, record: Option<&JobRecord>, name: String, now: Now) {
        match record {
            Some(record) if record.allocation.is_some() => {
                let allocation = record.allocation.as_ref().expect("matched");
                if self.queued.remove(&name).is_some() {
                    self.scheduler.cancel(&name);
                }
                let end = match (record.expected_end(), &mut self.estimates) {
                    (None, Some(estimates)) => estimates.planned_end(record, now.wall),
                    (end, _) => end,
                };
                let same = self.scheduler.running_gang(&name).is_some_and(|g| {
                    g.expected_end == end
                        && g.queue == record.status.queue
                        && g.assignments == allocation.assignments
                });
                if !same && let Some(mut gang) = record.running_gang() {
                    gang.expected_end = end;
                    self.scheduler.start(gang);
                }
                self.running.insert(name);
            }
            Some(record) if record.status.state == JobState::Queued => {
                if self.running.remove(&name) {
                    self.scheduler.finish(&name);
                }
                let is = QueuedAs::of(record);
                if self.queued.get(&name) != Some(&is) {
                    if let Some(mut gang) = record.queued_gang() {
                        if gang.declared_runtime_s.is_none()
                            && let Some(estimates) = &mut self.estimates
                        {
                            gang.declared_runtime_s = estimates.give(record);
                        }
                        self.scheduler.submit(gang);
                    }
                    self.queued.insert(name, is);
                }
            }
            _ => {
                if self.queued.remove(&name).is_some() {
                    self.scheduler.cancel(&name);
                }
                if self.running.remove(&name) {
                    self.scheduler.finish(&name);
                }
                if let Some(estimates) = &mut self.estimates {
                    estimates.forget(&name);
                }
            }
        }
    }

    /// The gangs as the scheduler was told them, worked out again from the jobs: for the debug
    /// builds' check against the full pass.
    #[cfg(debug_assertions)]
    pub fn gangs(
        &self,
        jobs: &BTreeMap<String, JobRecord>,
        now: Now,
    ) -> (Vec<crate::sched::Gang>, Vec<crate::sched::RunningGang>) {
        let estimates = self.estimates.as_ref();
        let queued = jobs
            .values()
            .filter_map(|record| {
                let mut gang = record.queued_gang()?;
                if gang.declared_runtime_s.is_none() {
                    gang.declared_runtime_s =
                        estimates.and_then(|e| e.given(record)).map(|e| e.seconds);
                }
                Some(gang)
            })
            .collect();
        let running = jobs
            .values()
            .filter_map(|record| {
                let mut gang = record.running_gang()?;
                if gang.expected_end.is_none() {
                    gang.expected_end =
                        estimates.and_then(|e| e.planned_end_given(record, now.wall));
                }
                Some(gang)
            })
            .collect();
        (queued, running)
    }

    /// A pass placed these gangs: they left the queue and hold their resources.
    pub fn placed<'a>(&mut self, gangs: impl IntoIterator<Item = &'a str>) {
        for name in gangs {
            self.queued.remove(name);
            self.running.insert(name.to_owned());
        }
    }
}
