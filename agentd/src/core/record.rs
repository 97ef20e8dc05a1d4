//! One job as the core keeps it: the parsed spec, the manifest as submitted, the status the API
//! shows, and what the job holds now (its allocation and its process groups). The transitions
//! are methods here; the lifecycle (`super::lifecycle`) decides when to call them.

use std::collections::BTreeMap;
use std::path::Path;

use agentd_api::NodeInventory;
use agentd_api::jobs::{JobState, JobStatus, ReplicaState, ReplicaStatus};

use crate::exec::{
    AGENTD_GENERATION, AGENTD_JOB, AGENTD_REPLICA, LaunchSpec, PodLaunch, TF_CONFIG,
};
use crate::job::{
    self, ClusterHosts, ExitOutcome, ReplicaType, RestartDecision, RestartPolicy, SourceKind,
    TrainingJob,
};
use crate::sched::{self, Assignment};

use super::clock::Now;

/// Resources a generation of the gang holds until all its processes are gone.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub generation: u32,
    pub assignments: Vec<Assignment>,
}

#[derive(Debug, Clone)]
pub struct JobRecord {
    /// Tells this record from an earlier one of the same name (removed, then submitted again):
    /// unique in the process, kept by clones.
    pub serial: u64,
    pub job: TrainingJob,
    pub manifest: String,
    pub status: JobStatus,
    /// When the job last entered the queue (submit or requeue), on the monotonic clock: the
    /// schedule time-out counts from here. Marks on the monotonic clock (`clock::Now::mono`)
    /// are kept in memory only; a restarted agent derives them from the stored wall-clock
    /// times (see `restore`).
    pub queued_since: f64,
    /// When the job was first placed, on the monotonic clock: `activeDeadlineSeconds` counts
    /// from here (`status.started_at` is the same moment on the wall clock).
    pub started_mono: Option<f64>,
    /// When the job finished, on the monotonic clock: `ttlSecondsAfterFinished` counts from
    /// here.
    pub finished_mono: Option<f64>,
    /// When a restarting gang may be queued again, on the monotonic clock.
    pub restart_at: Option<f64>,
    pub allocation: Option<Allocation>,
    /// Replicas of the current generation handed to the executor and not yet reported
    /// started or failed.
    pub launching: u32,
    /// Process groups to stop once `launching` is back to zero: the gang was stopped while
    /// some of its replicas were still being started, and those must be stopped too.
    pub pending_stop: Option<Vec<u32>>,
    /// States entered since the metrics last saw this job, in order: a turn can take a job
    /// through several (Starting, Running, Succeeded), and each transition counts.
    pub entered: Vec<JobState>,
    /// Ends of replicas reported while others of their gang were still being started.
    pub early_exits: Vec<ReplicaExit>,
    /// Process groups of replicas the job left running when it finished
    /// (`cleanPodPolicy: None`): they keep the allocation until they end.
    pub kept: Vec<u32>,
    /// Removal was asked for while the gang was still being stopped: the job goes once its
    /// allocation is released.
    pub remove_when_released: bool,
}

/// How a replica of a generation ended.
#[derive(Debug, Clone)]
pub struct ReplicaExit {
    pub job: String,
    pub replica: String,
    pub generation: u32,
    pub outcome: ExitOutcome,
    /// The platform ended it (evicted, ...): its handling, not the restart policy's, applies.
    pub platform: Option<job::PlatformEnd>,
}

/// What a job's clock says is to be done now (`JobRecord::due`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// Fail the job: a time limit passed.
    Expire {
        reason: &'static str,
        message: String,
    },
    /// The restart back-off is over: queue the gang again.
    Requeue,
    /// `ttlSecondsAfterFinished` passed: remove the job.
    Remove,
}

/// What one replica's end means for its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaVerdict {
    /// The job is not running this generation any more (stopping, restarting, finished).
    Ignored,
    Succeeded {
        job_done: bool,
    },
    Restart {
        policy: RestartPolicy,
    },
    Fail {
        policy: RestartPolicy,
    },
}

fn next_serial() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Every replica of the job, pending. Call it on a job whose count was checked: it makes one row
/// per replica, and a manifest may ask for billions.
pub fn pending_replicas(job: &TrainingJob) -> Vec<ReplicaStatus> {
    job::replica_names(job)
        .into_iter()
        .map(|(t, i)| ReplicaStatus {
            name: job::replica_name(t, i),
            replica_type: t.as_tf_key().to_owned(),
            index: i,
            state: ReplicaState::Pending,
            node: None,
            gpus: Vec::new(),
            gpu_indices: Vec::new(),
            address: None,
            pid: None,
            exit_code: None,
            signal: None,
            started_at: None,
            finished_at: None,
        })
        .collect()
}

impl JobRecord {
    /// The record of a job just taken in (validated), its replicas pending.
    pub fn new(job: TrainingJob, manifest: String, now: Now) -> Self {
        let mut record = Self::without_replicas(job, manifest, now);
        record.status.replicas = pending_replicas(&record.job);
        record
    }

    /// The record of a job that was never taken in, so its status lists no replicas: a
    /// job kept only to say why it cannot run, or one the leader has not admitted yet.
    pub fn without_replicas(job: TrainingJob, manifest: String, now: Now) -> Self {
        let status = JobStatus {
            name: job.name.clone(),
            kind: match job.source {
                SourceKind::TrainingJob => "TrainingJob",
                SourceKind::TfJob => "TFJob",
            }
            .to_owned(),
            queue: job.spec.queue.clone().unwrap_or_default(),
            priority: job.spec.priority,
            state: JobState::Queued,
            reason: "Queued".to_owned(),
            message: "waiting for the first scheduling pass".to_owned(),
            submitted_at: now.wall,
            started_at: None,
            finished_at: None,
            restarts: 0,
            backoff_limit: job.spec.run_policy.effective_backoff_limit(),
            generation: 0,
            owner: None,
            template: agentd_api::templates::TemplateUse::from_annotations(|key| {
                job.annotations.get(key).map(String::as_str)
            }),
            replicas: Vec::new(),
            events: Vec::new(),
        };
        Self {
            serial: next_serial(),
            job,
            manifest,
            status,
            queued_since: now.mono,
            started_mono: None,
            finished_mono: None,
            restart_at: None,
            allocation: None,
            launching: 0,
            pending_stop: None,
            entered: vec![JobState::Queued],
            early_exits: Vec::new(),
            kept: Vec::new(),
            remove_when_released: false,
        }
    }

    /// Rebuilds a record from what the store kept. The store keeps wall-clock times only;
    /// each becomes a monotonic mark here, once, from how long ago the wall clock says it was.
    pub fn restore(job: TrainingJob, manifest: String, status: JobStatus, now: Now) -> Self {
        let queued_since = now.mono_of(status.submitted_at);
        let started_mono = status.started_at.map(|t| now.mono_of(t));
        let finished_mono = status.finished_at.map(|t| now.mono_of(t));
        let status_state = status.state;
        Self {
            serial: next_serial(),
            job,
            manifest,
            status,
            queued_since,
            started_mono,
            finished_mono,
            restart_at: None,
            allocation: None,
            launching: 0,
            pending_stop: None,
            entered: vec![status_state],
            early_exits: Vec::new(),
            kept: Vec::new(),
            remove_when_released: false,
        }
    }

    pub fn is_active(&self) -> bool {
        !self.status.state.is_finished()
    }

    /// Process groups that may still be running.
    pub fn live_pgids(&self) -> Vec<u32> {
        self.status
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Running)
            .filter_map(|r| r.pid)
            .collect()
    }

    pub fn allocated_gpus(&self) -> u32 {
        self.allocation.as_ref().map_or(0, |a| {
            a.assignments
                .iter()
                .map(|x| x.gpu_indices.len() as u32)
                .sum()
        })
    }

    /// The gang as the scheduler sees it; its expected end is on the wall clock, as the
    /// scheduler's `now` is.
    pub fn running_gang(&self) -> Option<sched::RunningGang> {
        let allocation = self.allocation.as_ref()?;
        Some(sched::RunningGang {
            id: self.status.name.clone(),
            queue: self.status.queue.clone(),
            assignments: allocation.assignments.clone(),
            expected_end: self.expected_end(),
        })
    }

    /// When the gang is expected to end at the latest, on the wall clock: its start plus its
    /// `activeDeadlineSeconds`, if it declared one. Worked out from the recorded start, so it
    /// is the same at every pass (the deadline itself is enforced on the monotonic clock).
    pub fn expected_end(&self) -> Option<f64> {
        let deadline = self.job.spec.run_policy.active_deadline_seconds?;
        Some(self.status.started_at? + deadline as f64)
    }

    /// What the job's time limits say is to be done at `now`, all of them measured on the
    /// monotonic clock.
    pub fn due(&self, now: Now) -> Option<Due> {
        let policy = &self.job.spec.run_policy;
        let passed = |since: f64, limit: u64| now.mono - since >= limit as f64;
        match self.status.state {
            JobState::Queued => {
                let limit = policy.schedule_timeout_seconds?;
                passed(self.queued_since, limit).then(|| Due::Expire {
                    reason: "ScheduleTimeout",
                    message: format!(
                        "not placed within scheduleTimeoutSeconds ({limit} s): {}",
                        self.status.message
                    ),
                })
            }
            JobState::Placed | JobState::Starting | JobState::Running => {
                let limit = policy.active_deadline_seconds?;
                passed(self.started_mono?, limit).then(|| Due::Expire {
                    reason: "DeadlineExceeded",
                    message: format!("ran longer than activeDeadlineSeconds ({limit} s)"),
                })
            }
            JobState::Restarting => (self.restart_at.is_some_and(|t| now.mono >= t)
                && self.allocation.is_none())
            .then_some(Due::Requeue),
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                let ttl = policy.ttl_seconds_after_finished?;
                (passed(self.finished_mono?, ttl) && self.allocation.is_none())
                    .then_some(Due::Remove)
            }
        }
    }

    pub fn queued_gang(&self) -> Option<sched::Gang> {
        (self.status.state == JobState::Queued && self.allocation.is_none())
            .then(|| job::gang_request(&self.job, self.status.submitted_at))
    }

    pub fn set_state(&mut self, state: JobState, reason: &str, message: &str) {
        if self.status.state != state {
            self.entered.push(state);
        }
        self.status.state = state;
        reason.clone_into(&mut self.status.reason);
        message.clone_into(&mut self.status.message);
    }

    /// Takes the placement: a new generation, every replica pending on its node and GPUs.
    /// Returns a one-line summary for the event.
    pub fn place(
        &mut self,
        placement: &sched::Placement,
        inventory: &NodeInventory,
        now: Now,
    ) -> String {
        self.status.generation += 1;
        self.restart_at = None;
        self.allocation = Some(Allocation {
            generation: self.status.generation,
            assignments: placement.assignments.clone(),
        });
        let mut parts = Vec::new();
        for a in &placement.assignments {
            let Some(r) = self
                .status
                .replicas
                .iter_mut()
                .find(|r| r.name == a.replica)
            else {
                continue;
            };
            r.state = ReplicaState::Pending;
            r.node = Some(a.node.clone());
            r.gpu_indices.clone_from(&a.gpu_indices);
            r.gpus = a
                .gpu_indices
                .iter()
                .filter_map(|i| {
                    inventory
                        .gpus
                        .iter()
                        .find(|g| g.index == *i)
                        .map(|g| g.uuid.clone())
                })
                .collect();
            r.pid = None;
            r.exit_code = None;
            r.signal = None;
            r.started_at = None;
            r.finished_at = None;
            parts.push(if a.gpu_indices.is_empty() {
                format!("{} on {}", a.replica, a.node)
            } else {
                let gpus: Vec<String> = a.gpu_indices.iter().map(ToString::to_string).collect();
                format!("{} on {} GPUs {}", a.replica, a.node, gpus.join(","))
            });
        }
        if self.status.started_at.is_none() {
            self.status.started_at = Some(now.wall);
            self.started_mono = Some(now.mono);
        }
        self.set_state(JobState::Placed, "Placed", "placed; starting replicas");
        format!(
            "generation {}: {}",
            self.status.generation,
            parts.join("; ")
        )
    }

    /// Whom replicas of group `t` run as (see [`crate::exec::RunAs::for_owner`]): the
    /// container's `securityContext` wins over the pod's, as in Kubernetes.
    fn run_as(
        &self,
        t: job::ReplicaType,
        container: &k8s_openapi::api::core::v1::Container,
    ) -> Result<Option<crate::exec::RunAs>, String> {
        let spec = &self.job.spec.replica_specs[&t];
        let at = format!(
            "spec.{}.{t}.template.spec",
            self.job.source.replica_specs_key()
        );
        let index = spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.containers.iter().position(|c| c.name == container.name))
            .unwrap_or_default();
        let pod = spec
            .template
            .spec
            .as_ref()
            .and_then(|p| p.security_context.as_ref());
        let own = container.security_context.as_ref();
        let user_field = format!("{at}.containers[{index}].securityContext.runAsUser");
        let group_field = format!("{at}.containers[{index}].securityContext.runAsGroup");
        let pod_user_field = format!("{at}.securityContext.runAsUser");
        let pod_group_field = format!("{at}.securityContext.runAsGroup");
        let asked = |own: Option<i64>, own_field, pod: Option<i64>, pod_field| {
            own.map(|id| crate::exec::AskedId {
                id,
                field: own_field,
            })
            .or(pod.map(|id| crate::exec::AskedId {
                id,
                field: pod_field,
            }))
        };
        crate::exec::RunAs::for_owner(
            self.status.owner.as_ref().map(|o| (o.uid, o.gid)),
            asked(
                own.and_then(|c| c.run_as_user),
                &user_field,
                pod.and_then(|p| p.run_as_user),
                &pod_user_field,
            ),
            asked(
                own.and_then(|c| c.run_as_group),
                &group_field,
                pod.and_then(|p| p.run_as_group),
                &pod_group_field,
            ),
        )
    }

    /// The processes to start for the placed generation, each with its `TF_CONFIG` and GPUs.
    pub fn launch_specs(
        &mut self,
        log_dir: &Path,
        inventory: &NodeInventory,
        hosts: &ClusterHosts,
    ) -> Result<Vec<LaunchSpec>, String> {
        let names = job::replica_names(&self.job);
        let mut specs = Vec::with_capacity(names.len());
        for (t, i) in names {
            let name = job::replica_name(t, i);
            let spec = &self.job.spec.replica_specs[&t];
            let container = spec
                .training_container()
                .ok_or_else(|| format!("{name}: no training container"))?;
            let user = self.run_as(t, container)?;
            // `$(NAME)` is expanded as Kubernetes does: an env value sees the variables listed
            // before it, the command line sees the whole environment.
            let mut env: BTreeMap<String, String> = BTreeMap::new();
            for e in container.env.iter().flatten() {
                let value = job::expand(e.value.as_deref().unwrap_or_default(), |n| {
                    env.get(n).map(String::as_str)
                });
                env.insert(e.name.clone(), value);
            }
            let status = self
                .status
                .replicas
                .iter_mut()
                .find(|r| r.name == name)
                .ok_or_else(|| format!("{name}: not in the job's status"))?;
            status.address = hosts.get(t, i).map(str::to_owned);
            if let Some(tf_config) = job::tf_config(&self.job, hosts, (t, i)) {
                env.insert(TF_CONFIG.to_owned(), tf_config);
            }
            env.insert("CUDA_VISIBLE_DEVICES".to_owned(), status.gpus.join(","));
            env.insert(AGENTD_JOB.to_owned(), self.status.name.clone());
            env.insert(AGENTD_REPLICA.to_owned(), name.clone());
            env.insert(
                AGENTD_GENERATION.to_owned(),
                self.status.generation.to_string(),
            );
            let argv: Vec<String> = container
                .command
                .iter()
                .chain(&container.args)
                .flatten()
                .map(|a| job::expand(a, |n| env.get(n).map(String::as_str)))
                .collect();
            let given = self
                .allocation
                .iter()
                .flat_map(|a| &a.assignments)
                .find(|a| a.replica == name);
            specs.push(LaunchSpec {
                job: self.status.name.clone(),
                replica: name.clone(),
                generation: self.status.generation,
                argv,
                env,
                working_dir: container.working_dir.clone().map(Into::into),
                log_path: log_dir.join(format!("{name}.log")),
                gpu_devices: given
                    .map(|a| gpu_devices(&a.gpu_indices, inventory))
                    .unwrap_or_default(),
                cpu_milli: given.map_or(0, |a| a.resources.cpu_milli),
                memory_bytes: given.map_or(0, |a| a.resources.memory_mib * 1024 * 1024),
                user,
                pod: given.map(|a| {
                    Box::new(PodLaunch {
                        node: a.node.clone(),
                        namespace: self
                            .job
                            .namespace
                            .clone()
                            .unwrap_or_else(|| "default".into()),
                        replica_type: t,
                        index: i,
                        gpus: u32::try_from(a.gpu_indices.len()).unwrap_or(u32::MAX),
                        template: (*spec.template).clone(),
                    })
                }),
            });
        }
        Ok(specs)
    }

    /// Records a replica's pid. One that started after its gang was told to stop is recorded
    /// as terminated: it is stopped with the others.
    pub fn replica_started(&mut self, name: &str, pid: u32, now: f64) {
        let state = if self.pending_stop.is_some() {
            ReplicaState::Terminated
        } else {
            ReplicaState::Running
        };
        if let Some(r) = self.status.replicas.iter_mut().find(|r| r.name == name) {
            r.state = state;
            r.pid = Some(pid);
            r.started_at = Some(now);
        }
    }

    /// Records a replica's end and says what it means for the job.
    pub fn replica_ended(
        &mut self,
        name: &str,
        exit: ExitOutcome,
        now: f64,
    ) -> Option<ReplicaVerdict> {
        let running = matches!(self.status.state, JobState::Running | JobState::Starting);
        let (t, _) = parse_replica_name(name)?;
        let policy = self.job.spec.replica_specs.get(&t)?.restart_policy;
        let decision = job::restart_decision(policy, exit);
        let r = self.status.replicas.iter_mut().find(|r| r.name == name)?;
        r.exit_code = exit.code;
        r.signal = exit.signal;
        r.finished_at = Some(now);
        r.state = if decision == RestartDecision::Success {
            ReplicaState::Succeeded
        } else if running {
            ReplicaState::Failed
        } else {
            ReplicaState::Terminated
        };
        if !running {
            return Some(ReplicaVerdict::Ignored);
        }
        Some(match decision {
            RestartDecision::Success => {
                let succeeded = self
                    .status
                    .replicas
                    .iter()
                    .filter(|r| r.state == ReplicaState::Succeeded)
                    .filter_map(|r| parse_replica_name(&r.name))
                    .collect();
                ReplicaVerdict::Succeeded {
                    job_done: job::job_succeeded(&self.job, &succeeded),
                }
            }
            RestartDecision::Restart => ReplicaVerdict::Restart { policy },
            RestartDecision::Fail => ReplicaVerdict::Fail { policy },
        })
    }

    /// Starts a restart: counts it and returns the process groups to stop. `restart_at` is on
    /// the monotonic clock.
    pub fn begin_restart(&mut self, reason: &str, message: &str, restart_at: f64) -> Vec<u32> {
        self.status.restarts += 1;
        self.restart_at = Some(restart_at);
        self.set_state(JobState::Restarting, reason, message);
        self.stop_replicas()
    }

    /// Ends the job; returns the process groups to stop.
    pub fn finish(&mut self, state: JobState, reason: &str, message: &str, now: Now) -> Vec<u32> {
        self.set_state(state, reason, message);
        self.status.finished_at = Some(now.wall);
        self.finished_mono = Some(now.mono);
        self.restart_at = None;
        let keep_running = self.job.spec.run_policy.clean_pod_policy
            == Some(job::CleanPodPolicy::None)
            && state == JobState::Succeeded;
        if keep_running {
            self.kept = self.live_pgids();
            Vec::new()
        } else {
            self.stop_replicas()
        }
    }

    /// Marks running replicas terminated and returns their process groups.
    fn stop_replicas(&mut self) -> Vec<u32> {
        let pgids = self.live_pgids();
        self.mark_running_terminated();
        pgids
    }

    /// Marks the replicas shown running as terminated (they are being stopped, or are gone).
    pub(crate) fn mark_running_terminated(&mut self) {
        for r in &mut self.status.replicas {
            if r.state == ReplicaState::Running {
                r.state = ReplicaState::Terminated;
            }
        }
    }

    /// Frees the allocation once a generation's processes are all gone; true if it did.
    pub fn release(&mut self, generation: u32) -> bool {
        match &self.allocation {
            Some(a) if a.generation == generation => {
                self.allocation = None;
                true
            }
            _ => false,
        }
    }

    /// Puts a restarting gang back in the queue.
    pub fn requeue(&mut self, now: Now) {
        self.queued_since = now.mono;
        self.restart_at = None;
        self.set_state(JobState::Queued, "Requeued", "waiting to be placed again");
    }
}

/// `worker-3` → (Worker, 3).
pub fn parse_replica_name(name: &str) -> Option<(ReplicaType, u32)> {
    let (t, i) = name.rsplit_once('-')?;
    Some((ReplicaType::from_key(t)?, i.parse().ok()?))
}

/// The device minor numbers (`/dev/nvidia<minor>`) of the GPUs with these NVML indices; a GPU
/// whose driver does not say has the usual minor, its index.
fn gpu_devices(indices: &[u32], inventory: &NodeInventory) -> Vec<u32> {
    indices
        .iter()
        .map(|&index| {
            inventory
                .gpus
                .iter()
                .find(|g| g.index == index)
                .and_then(|g| g.minor_number)
                .unwrap_or(index)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::{Clock, ManualClock};

    /// An hour: the size of the wall-clock steps below.
    const HOUR: f64 = 3600.0;

    fn job(run_policy: &str) -> TrainingJob {
        let manifest = format!(
            "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: clocked}}\nspec:\n  runPolicy: {run_policy}\n  replicaSpecs:\n    Worker:\n      replicas: 1\n      template: {{spec: {{containers: [{{name: tensorflow, command: [\"true\"]}}]}}}}\n"
        );
        crate::job::parse(manifest.as_bytes()).expect("a valid manifest")
    }

    fn placed(clock: &ManualClock, run_policy: &str) -> JobRecord {
        let mut record = JobRecord::new(job(run_policy), String::new(), clock.now());
        let placement = sched::Placement {
            gang: "clocked".to_owned(),
            assignments: Vec::new(),
        };
        record.place(&placement, &NodeInventory::default(), clock.now());
        record.set_state(JobState::Running, "Running", "1 replica running");
        record
    }

    fn expired_reason(due: Option<Due>) -> Option<&'static str> {
        due.and_then(|due| match due {
            Due::Expire { reason, .. } => Some(reason),
            Due::Requeue | Due::Remove => None,
        })
    }

    #[test]
    fn an_active_deadline_does_not_move_with_a_wall_clock_step() {
        for step in [HOUR, -HOUR] {
            let clock = ManualClock::new(1_000_000.0);
            let record = placed(&clock, "{activeDeadlineSeconds: 60}");
            clock.advance(30.0);
            clock.step_wall(step);
            assert_eq!(record.due(clock.now()), None, "wall clock stepped {step} s");
            clock.advance(29.0);
            assert_eq!(record.due(clock.now()), None, "wall clock stepped {step} s");
            clock.advance(1.0);
            assert_eq!(
                expired_reason(record.due(clock.now())),
                Some("DeadlineExceeded"),
                "wall clock stepped {step} s"
            );
        }
    }

    #[test]
    fn a_schedule_timeout_does_not_move_with_a_wall_clock_step() {
        let clock = ManualClock::new(1_000_000.0);
        let record = JobRecord::new(
            job("{scheduleTimeoutSeconds: 10}"),
            String::new(),
            clock.now(),
        );
        clock.step_wall(HOUR);
        assert_eq!(record.due(clock.now()), None);
        clock.step_wall(-2.0 * HOUR);
        clock.advance(9.5);
        assert_eq!(record.due(clock.now()), None);
        clock.advance(0.5);
        assert_eq!(
            expired_reason(record.due(clock.now())),
            Some("ScheduleTimeout")
        );
    }

    #[test]
    fn a_restart_back_off_does_not_move_with_a_wall_clock_step() {
        let clock = ManualClock::new(1_000_000.0);
        let mut record = placed(&clock, "{backoffLimit: 3}");
        record.begin_restart("ReplicaFailed", "worker-0 exited 1", clock.now().mono + 5.0);
        record.allocation = None;
        clock.step_wall(HOUR);
        assert_eq!(record.due(clock.now()), None);
        clock.advance(5.0);
        clock.step_wall(-2.0 * HOUR);
        assert_eq!(record.due(clock.now()), Some(Due::Requeue));
    }

    #[test]
    fn a_ttl_after_finished_does_not_move_with_a_wall_clock_step() {
        let clock = ManualClock::new(1_000_000.0);
        let mut record = placed(&clock, "{ttlSecondsAfterFinished: 100}");
        record.finish(JobState::Succeeded, "Succeeded", "done", clock.now());
        record.allocation = None;
        clock.step_wall(HOUR);
        assert_eq!(record.due(clock.now()), None);
        clock.advance(99.0);
        clock.step_wall(-2.0 * HOUR);
        assert_eq!(record.due(clock.now()), None);
        clock.advance(1.0);
        assert_eq!(record.due(clock.now()), Some(Due::Remove));
    }

    /// A restarted agent has a new monotonic clock: what is left of a deadline comes from the
    /// stored wall-clock start, once, and from then on the monotonic clock counts.
    #[test]
    fn a_restored_job_keeps_what_was_left_of_its_deadline() {
        let before = ManualClock::new(1_000_000.0);
        let record = placed(&before, "{activeDeadlineSeconds: 100}");
        before.advance(40.0);
        let stored = record.status.clone();

        // The new agent's monotonic clock starts again at zero, 20 s of wall time later.
        let after = ManualClock::new(before.now().wall + 20.0);
        let restored = JobRecord::restore(record.job.clone(), String::new(), stored, after.now());
        assert_eq!(restored.due(after.now()), None);
        after.step_wall(-HOUR);
        after.advance(39.0);
        assert_eq!(restored.due(after.now()), None);
        after.advance(1.0);
        assert_eq!(
            expired_reason(restored.due(after.now())),
            Some("DeadlineExceeded")
        );
    }

    /// A wall clock stepped back while the agent was stopped reads as no time passed, never
    /// as a start in the future.
    #[test]
    fn a_restored_start_in_the_future_counts_from_recovery() {
        let before = ManualClock::new(1_000_000.0);
        let record = placed(&before, "{activeDeadlineSeconds: 100}");
        let stored = record.status.clone();
        let after = ManualClock::new(before.now().wall - HOUR);
        let restored = JobRecord::restore(record.job.clone(), String::new(), stored, after.now());
        after.advance(99.0);
        assert_eq!(restored.due(after.now()), None);
        after.advance(1.0);
        assert_eq!(
            expired_reason(restored.due(after.now())),
            Some("DeadlineExceeded")
        );
    }

    /// A unit's device rules name `/dev/nvidia<minor>`, which need not be the NVML index.
    #[test]
    fn gpu_devices_are_minor_numbers_not_indices() {
        let gpu = |index, minor_number| agentd_api::GpuInfo {
            index,
            minor_number,
            ..agentd_api::GpuInfo::default()
        };
        let inventory = NodeInventory {
            gpus: vec![gpu(0, Some(4)), gpu(1, None), gpu(2, Some(0))],
            ..NodeInventory::default()
        };
        assert_eq!(gpu_devices(&[2, 0, 1], &inventory), [0, 4, 1]);
    }
}
