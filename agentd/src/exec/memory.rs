//! An executor that runs nothing: it keeps what it was asked to start and stop, and reports
//! only what its owner tells it to. For tests of the core that need no processes.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Executor, LaunchSpec, ReplicaEvent, ReplicaReport, Stopping, StoredReplica};
use crate::job::{self, ClusterHosts, ExitOutcome, TrainingJob};

/// What a [`MemoryExecutor`] was asked to do, in order.
#[derive(Debug, Default)]
pub struct Requests {
    pub started: Vec<LaunchSpec>,
    /// `(job, generation, pids)` of each stop.
    pub stopped: Vec<(String, u32, Vec<u32>)>,
    /// The lost nodes it was last told of.
    pub lost_nodes: BTreeSet<String>,
}

/// A shared handle: the core holds one, the test another.
#[derive(Debug, Clone)]
pub struct MemoryExecutor {
    requests: Arc<Mutex<Requests>>,
    reports: mpsc::UnboundedSender<ReplicaReport>,
}

impl MemoryExecutor {
    pub fn new(reports: mpsc::UnboundedSender<ReplicaReport>) -> Self {
        Self {
            requests: Arc::default(),
            reports,
        }
    }

    /// Takes what was asked since the last call.
    pub fn take(&self) -> Requests {
        std::mem::take(&mut *self.lock())
    }

    /// Reports a started replica as the core would hear it from a real executor.
    pub fn report(&self, spec: &LaunchSpec, event: ReplicaEvent) {
        let _ = self.reports.send(ReplicaReport {
            job: spec.job.clone(),
            replica: spec.replica.clone(),
            generation: spec.generation,
            event,
        });
    }

    /// Reports that a replica exited with `code`.
    pub fn exited(&self, spec: &LaunchSpec, code: i32) {
        self.report(
            spec,
            ReplicaEvent::Exited {
                outcome: ExitOutcome {
                    code: Some(code),
                    ..ExitOutcome::default()
                },
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Requests> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Executor for MemoryExecutor {
    fn addresses(&self, job: &TrainingJob) -> Result<ClusterHosts, String> {
        Ok(ClusterHosts::standalone(
            job::replica_names(job)
                .into_iter()
                .zip(20_000u16..)
                .collect::<Vec<_>>(),
        ))
    }

    fn start(&self, spec: LaunchSpec) {
        self.lock().started.push(spec);
    }

    fn stop(
        &self,
        job: &str,
        generation: u32,
        pids: Vec<u32>,
        _grace: Duration,
        _keep_ended: bool,
    ) -> Stopping {
        self.lock().stopped.push((job.to_owned(), generation, pids));
        Box::pin(std::future::ready(()))
    }

    fn kill_stray(&self, _job: &str, _replica: &str, _pid: u32) {}

    fn replicas_outlive_agent(&self) -> bool {
        true
    }

    fn adopt(
        &self,
        _job: &str,
        _generation: u32,
        running: &[StoredReplica],
    ) -> Result<usize, String> {
        Ok(running.len())
    }

    fn stop_leftovers(
        &self,
        _job: &str,
        _generation: Option<u32>,
        _replicas: &[StoredReplica],
    ) -> usize {
        0
    }

    fn discard_all_but(&self, _keep: &BTreeSet<String>) {}

    fn nodes_lost(&self, nodes: &BTreeSet<String>) {
        self.lock().lost_nodes.clone_from(nodes);
    }
}
