//! Executors: how a placed gang's replicas are started and stopped. Standalone mode runs them as
//! local processes or transient systemd units (`local`, with process creation in `spawn`);
//! cluster mode runs them as pods bound to the nodes the scheduler chose (`pods`). The core
//! decides what to run; an executor only does it and reports each replica started, failed to
//! start, or ended ([`ReplicaReport`]).
//!
//! The core sees an executor through [`Executor`] only. A replica is named by its job,
//! generation and replica name; the `pid` an executor reports in `Started` is its own handle
//! for the replica (a process group here, the generation for a pod), handed back when the
//! replica is to be stopped.

pub mod cgroup;
pub mod local;
#[cfg(test)]
pub mod memory;
pub mod pods;
pub mod replica_log;
pub mod shim;
pub mod spawn;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

pub use local::{
    AGENTD_GENERATION, AGENTD_JOB, AGENTD_REPLICA, AGENTD_VARIABLES, AskedId, LaunchSpec,
    LocalExecutor, PodLaunch, ReplicaEvent, ReplicaReport, RunAs, ShimCommand, TF_CONFIG,
};

use crate::job::{self, ClusterHosts, TrainingJob};

/// A stop in progress: it ends when every replica it stops is gone.
pub type Stopping = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One stored replica a previous agent started: its name and the handle it was reported with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReplica {
    pub name: String,
    pub pid: Option<u32>,
}

/// Starts and stops replicas; reports what becomes of them on the channel it was built with.
pub trait Executor: Send {
    /// Where each replica of `job` listens, for its `TF_CONFIG`.
    fn addresses(&self, job: &TrainingJob) -> Result<ClusterHosts, String>;

    /// Starts one replica in the background; a [`ReplicaReport`] follows.
    fn start(&self, spec: LaunchSpec);

    /// Stops the replicas of a gang's generation (`pids`: their handles from `Started`): asks
    /// them to end, and forces them after `grace`. With `keep_ended` (the job has ended and its
    /// `cleanPodPolicy` is not `All`) replicas that have already ended are left as they are,
    /// with their logs; otherwise every trace of the generation goes.
    fn stop(
        &self,
        job: &str,
        generation: u32,
        pids: Vec<u32>,
        grace: Duration,
        keep_ended: bool,
    ) -> Stopping;

    /// Ends at once a replica nobody waits for (started for a launch that was dropped).
    fn kill_stray(&self, job: &str, replica: &str, pid: u32);

    /// Whether replicas keep running when the agent stops, for the next agent to adopt.
    fn replicas_outlive_agent(&self) -> bool;

    /// Replicas being started at once (launched, not yet reported started or failed) beyond
    /// which the core takes in no new submission. Starting a process takes the machine a
    /// fraction of a millisecond; taking jobs in faster than that only moves the wait from the
    /// submission to the queue, where it is longer and nobody sees it.
    fn max_starting(&self) -> u32 {
        8
    }

    /// After an agent restart: watches the running replicas of a gang again, all of them or
    /// none (then says why); one that ended meanwhile, in a way that can still be told, is
    /// reported ended. Returns how many it adopted.
    fn adopt(&self, job: &str, generation: u32, running: &[StoredReplica])
    -> Result<usize, String>;

    /// After an agent restart: stops what the named replicas of a gang that is not adopted
    /// left running (`generation`: when known). Returns how many processes it stopped.
    fn stop_leftovers(
        &self,
        job: &str,
        generation: Option<u32>,
        replicas: &[StoredReplica],
    ) -> usize;

    /// After an agent restart: stops what a previous agent left of every job not in `keep`
    /// (gangs that were not adopted, jobs no longer stored) and forgets it.
    fn discard_all_but(&self, keep: &std::collections::BTreeSet<String>);

    /// During a restart's recovery, before its replicas are stopped: `job` has ended and keeps
    /// the replicas that ended (its `cleanPodPolicy` is not `All`), so what recovery stops of
    /// it spares those, until [`Executor::discard_all_but`] ends the recovery. Nothing to keep
    /// where an ended replica leaves nothing but its log.
    fn keep_ended_of(&self, _job: &str) {}

    /// `job` was removed: what is left of it (replicas kept when it ended) goes.
    fn forget_job(&self, _job: &str) {}

    /// Cluster mode: the nodes lost now. Their kubelets will never confirm a stop, so a stop
    /// deletes what runs there at once rather than wait for them. Nothing to do elsewhere.
    fn nodes_lost(&self, _nodes: &std::collections::BTreeSet<String>) {}
}

impl Executor for LocalExecutor {
    fn addresses(&self, job: &TrainingJob) -> Result<ClusterHosts, String> {
        let names = job::replica_names(job);
        let mut ports = Vec::with_capacity(names.len());
        for replica in names {
            ports.push((replica, local::free_port().map_err(|e| e.to_string())?));
        }
        Ok(ClusterHosts::standalone(ports))
    }

    fn start(&self, spec: LaunchSpec) {
        self.launch(spec);
    }

    fn stop(
        &self,
        _job: &str,
        _generation: u32,
        pids: Vec<u32>,
        grace: Duration,
        _keep_ended: bool,
    ) -> Stopping {
        // An ended process leaves nothing behind but its log, which stays either way.
        Box::pin(LocalExecutor::stop(self, pids, grace))
    }

    fn kill_stray(&self, _job: &str, _replica: &str, pid: u32) {
        signal_group(pid, Signal::SIGKILL);
    }

    fn replicas_outlive_agent(&self) -> bool {
        LocalExecutor::replicas_outlive_agent(self)
    }

    fn adopt(
        &self,
        job: &str,
        generation: u32,
        running: &[StoredReplica],
    ) -> Result<usize, String> {
        let mut adoptable = Vec::with_capacity(running.len());
        for r in running {
            let Some(pid) = r.pid else {
                return Err(format!("replica {} has no recorded process", r.name));
            };
            let a = self
                .adoptable(job, &r.name, generation, pid)
                .map_err(|why| format!("replica {}: {why}", r.name))?;
            adoptable.push(a);
        }
        let count = adoptable.len();
        for a in adoptable {
            LocalExecutor::adopt(self, a)?;
        }
        Ok(count)
    }

    fn stop_leftovers(
        &self,
        job: &str,
        generation: Option<u32>,
        replicas: &[StoredReplica],
    ) -> usize {
        let units: Vec<String> = replicas
            .iter()
            .filter_map(|r| crate::systemd::unit_name(job, &r.name, generation?).ok())
            .collect();
        self.stop_leftover_units(&units);
        replicas
            .iter()
            .filter_map(|r| r.pid)
            .map(|pgid| local::kill_leftovers(pgid, job))
            .sum()
    }

    fn discard_all_but(&self, keep: &std::collections::BTreeSet<String>) {
        for job in self.jobs_with_replicas() {
            if !keep.contains(&job) {
                let killed = self.discard(&job);
                if killed > 0 {
                    tracing::warn!(
                        job,
                        killed,
                        "stopped replica processes left by the previous agent"
                    );
                }
            }
        }
    }
}

/// A short human description of how a process ended.
pub fn describe(outcome: crate::job::ExitOutcome) -> String {
    if outcome.oom_killed {
        let how = match (outcome.code, outcome.signal) {
            (Some(code), _) => format!("; it ended with exit code {code}"),
            (None, Some(signal)) => format!(
                "; it was killed by {}",
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string())
            ),
            (None, None) => String::new(),
        };
        return format!("OOMKilled: the OOM killer ended a process of it{how}");
    }
    match (outcome.code, outcome.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => {
            let name =
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
            format!("killed by {name}")
        }
        (None, None) => "lost".to_owned(),
    }
}

/// Sends `signal` to a replica's whole process group. A group that is already gone is fine.
pub fn signal_group(pgid: u32, signal: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid as i32), signal);
    }
}
