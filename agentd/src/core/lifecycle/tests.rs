//! Every state and transition of the job lifecycle, fed inputs at times the test chooses: no
//! process, no database, no clock.

use std::sync::Arc;
use std::time::Duration;

use agentd_api::jobs::{JobState, JobStatus, Owner, ReplicaState};
use agentd_api::{GpuInfo, NodeInventory};

use super::*;

/// A job of `Worker` replicas (and whatever else `spec` adds) that runs `true`.
fn manifest(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    )
}

/// `n` workers under `restart` (a restartPolicy), with `run_policy` (a YAML flow mapping).
fn workers(name: &str, n: u32, restart: &str, run_policy: &str) -> String {
    manifest(
        name,
        &format!(
            "  runPolicy: {run_policy}\n  replicaSpecs:\n    Worker:\n      replicas: {n}\n      restartPolicy: {restart}\n      template: {{spec: {{containers: [{{name: tensorflow, command: [\"true\"]}}]}}}}\n"
        ),
    )
}

const HOUR: f64 = 3600.0;

/// One turn: what it asked to persist and the effects that followed.
#[derive(Debug)]
struct Turn {
    persist: Persist,
    effects: Vec<Effect>,
}

impl Turn {
    fn starts(&self) -> Vec<LaunchSpec> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::StartReplica(spec) => Some((**spec).clone()),
                _ => None,
            })
            .collect()
    }

    fn stops(&self) -> Vec<GangStop> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::StopGang(stop) => Some(stop.clone()),
                _ => None,
            })
            .collect()
    }

    fn reasons(&self) -> Vec<&str> {
        self.persist
            .events
            .iter()
            .map(|e| e.reason.as_str())
            .collect()
    }

    fn metrics(&self) -> Vec<&MetricUpdate> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Metric(m) => Some(m),
                _ => None,
            })
            .collect()
    }
}

struct Harness {
    life: Lifecycle,
    now: Now,
    requests: u64,
    inventory: Arc<NodeInventory>,
}

fn gpu(index: u32, healthy: bool) -> GpuInfo {
    GpuInfo {
        index,
        uuid: format!("GPU-{index}"),
        healthy,
        health_reason: (!healthy).then(|| "XID 79".to_owned()),
        ..GpuInfo::default()
    }
}

fn root() -> Owner {
    Owner {
        uid: 0,
        gid: 0,
        user: "root".to_owned(),
    }
}

impl Harness {
    fn new() -> Self {
        Self::with_limit(64)
    }

    fn with_limit(max_replicas_per_agent: u32) -> Self {
        let settings = Settings {
            node: "node-a".to_owned(),
            default_queue: "slow".to_owned(),
            max_replicas_per_agent,
            backoff: (Duration::from_secs(10), Duration::from_mins(5)),
            logs: PathBuf::from("/state/logs"),
            finished_in_memory: None,
            history_retention: Duration::from_hours(24),
            node_refusal_cooldown: Duration::from_mins(5),
        };
        Self {
            life: Lifecycle::new(settings, false),
            now: Now {
                wall: 1_000_000.0,
                mono: 0.0,
            },
            requests: 0,
            inventory: Arc::new(NodeInventory {
                name: "node-a".to_owned(),
                gpus: vec![gpu(0, true), gpu(1, true), gpu(2, true), gpu(3, true)],
                ..NodeInventory::default()
            }),
        }
    }

    fn advance(&mut self, seconds: f64) {
        self.now.wall += seconds;
        self.now.mono += seconds;
    }

    fn step(&mut self, input: Input) {
        self.life.step(input, self.now);
    }

    fn turn(&mut self) -> Turn {
        let persist = self.life.ready(self.now);
        let effects = self.life.persisted();
        Turn { persist, effects }
    }

    fn request(&mut self) -> RequestId {
        self.requests += 1;
        RequestId(self.requests)
    }

    fn submit_input(&mut self, text: &str) -> Input {
        let job = job::parse(text.as_bytes()).expect("a valid manifest");
        Input::Submit {
            request: self.request(),
            job: Box::new(job),
            manifest: text.to_owned(),
            owner: root(),
        }
    }

    /// Submits and writes; the answer.
    fn submit(&mut self, text: &str) -> Result<JobStatus, CoreError> {
        let input = self.submit_input(text);
        self.step(input);
        let turn = self.turn();
        let mut replies = turn.effects.into_iter().filter_map(|e| match e {
            Effect::Reply { result, .. } => Some(*result),
            _ => None,
        });
        replies.next().expect("one answer")
    }

    fn cancel(&mut self, name: &str) -> (Result<JobStatus, CoreError>, Turn) {
        let request = self.request();
        self.step(Input::Cancel {
            request,
            name: name.to_owned(),
            by: "alice".to_owned(),
        });
        let mut turn = self.turn();
        let reply = turn
            .effects
            .iter()
            .position(|e| matches!(e, Effect::Reply { .. }))
            .map(|i| turn.effects.remove(i))
            .and_then(|e| match e {
                Effect::Reply { result, .. } => Some(*result),
                _ => None,
            })
            .expect("one answer");
        (reply, turn)
    }

    /// Places the whole gang of `name`, each replica on one GPU of its own from `first_gpu`.
    fn place(&mut self, name: &str, first_gpu: u32) -> Turn {
        let assignments = self
            .life
            .job(name)
            .expect("the job exists")
            .status
            .replicas
            .iter()
            .zip(first_gpu..)
            .map(|(r, gpu)| sched::Assignment {
                replica: r.name.clone(),
                node: "node-a".to_owned(),
                gpu_indices: vec![gpu],
                resources: sched::Resources {
                    gpus: 1,
                    cpu_milli: 1000,
                    memory_mib: 1024,
                },
            })
            .collect();
        let hosts = addresses(&self.life.job(name).expect("exists").job);
        self.step(Input::Scheduled {
            inventory: Arc::clone(&self.inventory),
            waiting: Vec::new(),
            placements: vec![(
                sched::Placement {
                    gang: name.to_owned(),
                    assignments,
                },
                Ok(hosts),
            )],
        });
        self.turn()
    }

    /// Reports every replica of `specs` started (pid 100, 101, ...).
    fn start(&mut self, specs: &[LaunchSpec]) -> Turn {
        for (spec, pid) in specs.iter().zip(100..) {
            self.step(Input::ReplicaStarted {
                job: spec.job.clone(),
                replica: spec.replica.clone(),
                generation: spec.generation,
                pid,
            });
        }
        self.turn()
    }

    /// Submits, places and starts `text`: the job is Running.
    fn running(&mut self, text: &str) -> Vec<LaunchSpec> {
        let status = self.submit(text).expect("accepted");
        let specs = self.place(&status.name, 0).starts();
        self.start(&specs);
        assert_eq!(self.state(&status.name).0, JobState::Running);
        specs
    }

    fn exit(&mut self, job: &str, replica: &str, code: i32) -> Turn {
        let generation = self.life.job(job).expect("exists").status.generation;
        self.step(Input::ReplicaExited {
            job: job.to_owned(),
            replica: replica.to_owned(),
            generation,
            outcome: ExitOutcome {
                code: Some(code),
                ..ExitOutcome::default()
            },
        });
        self.turn()
    }

    fn stopped(&mut self, stop: &GangStop) -> Turn {
        self.step(Input::GangStopped {
            job: stop.job.clone(),
            generation: stop.generation,
        });
        self.turn()
    }

    fn tick(&mut self) -> Turn {
        self.step(Input::Tick);
        self.turn()
    }

    fn state(&self, name: &str) -> (JobState, String) {
        let status = &self.life.job(name).expect("the job exists").status;
        (status.state, status.reason.clone())
    }
}

/// Addresses as an executor hands them out: one port per replica.
fn addresses(job: &job::TrainingJob) -> ClusterHosts {
    ClusterHosts::standalone(
        job::replica_names(job)
            .into_iter()
            .zip(30_000u16..)
            .collect::<Vec<_>>(),
    )
}

// Pending / Queued

#[test]
fn a_submitted_job_is_queued_and_answered_once_written() {
    let mut h = Harness::new();
    let input = h.submit_input(&workers("a", 2, "Never", "{}"));
    h.step(input);
    let persist = h.life.ready(h.now);
    assert!(
        matches!(&persist.jobs[..], [JobWrite::Upsert { name, .. }] if name == "a"),
        "{persist:?}"
    );
    assert_eq!(persist.events[0].reason, "Submitted");
    let effects = h.life.persisted();
    let answered = effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply { result, .. } => Some(result.as_ref().as_ref().expect("accepted")),
            _ => None,
        })
        .expect("answered");
    assert_eq!(answered.state, JobState::Queued);
    assert!(h.life.needs_pass());
    assert_eq!(h.life.queued_gangs().len(), 1);
    // The first state counts as a transition from none.
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Metric(MetricUpdate::StateChanged {
            from: "None",
            to: "Queued",
            ..
        })
    )));
}

#[test]
fn a_second_job_of_the_same_name_is_a_conflict() {
    let mut h = Harness::new();
    h.submit(&workers("a", 1, "Never", "{}")).expect("accepted");
    let err = h.submit(&workers("a", 1, "Never", "{}")).unwrap_err();
    assert!(
        matches!(err, CoreError::Conflict(ref m) if m.contains("twice")),
        "{err}"
    );
}

#[test]
fn a_job_over_the_agents_replica_limit_is_refused_naming_the_field() {
    let mut h = Harness::with_limit(3);
    h.submit(&workers("a", 2, "Never", "{}")).expect("accepted");
    let err = h.submit(&workers("b", 2, "Never", "{}")).unwrap_err();
    match err {
        CoreError::BadField { field, message } => {
            assert_eq!(field, "spec.replicaSpecs");
            assert!(message.contains("jobs.max_replicas_per_agent"), "{message}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_waiting_job_carries_the_schedulers_reason_and_the_drain() {
    let mut h = Harness::new();
    h.submit(&workers("a", 1, "Never", "{}")).expect("accepted");
    h.step(Input::Drain(true));
    assert!(!h.life.schedulable());
    let waiting = || sched::Waiting {
        gang: "a".to_owned(),
        reason: "Unschedulable",
        message: "needs 1 GPU; 0 free".into(),
    };
    h.step(Input::Scheduled {
        inventory: Arc::clone(&h.inventory),
        waiting: vec![waiting()],
        placements: Vec::new(),
    });
    let turn = h.turn();
    assert_eq!(turn.reasons(), ["Unschedulable"]);
    let status = &h.life.job("a").expect("exists").status;
    assert_eq!(status.state, JobState::Queued);
    assert!(
        status.message.contains("node node-a is drained"),
        "{}",
        status.message
    );
    // The same reason again is no new event.
    h.step(Input::Scheduled {
        inventory: Arc::clone(&h.inventory),
        waiting: vec![waiting()],
        placements: Vec::new(),
    });
    assert!(h.turn().persist.events.is_empty());
    h.step(Input::Drain(false));
    assert!(h.life.schedulable());
}

// Placed, Starting, Running

#[test]
fn a_placed_gang_starts_its_replicas_only_once_written() {
    let mut h = Harness::new();
    h.submit(&workers("a", 2, "Never", "{}")).expect("accepted");
    let turn = h.place("a", 1);
    assert_eq!(turn.reasons(), ["Placed"]);
    let starts = turn.starts();
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0].env["CUDA_VISIBLE_DEVICES"], "GPU-1");
    assert_eq!(starts[1].env["AGENTD_GENERATION"], "1");
    assert!(starts[0].env["TF_CONFIG"].contains("localhost:30000"));
    assert_eq!(
        starts[0].log_path,
        PathBuf::from("/state/logs/a/worker-0.log")
    );
    assert_eq!(h.state("a"), (JobState::Starting, "Starting".to_owned()));
    assert_eq!(h.life.in_flight(), 2);
    let status = &h.life.job("a").expect("exists").status;
    assert_eq!(
        status.replicas[1].address.as_deref(),
        Some("localhost:30001")
    );
}

#[test]
fn a_gang_is_running_once_every_replica_started() {
    let mut h = Harness::new();
    h.submit(&workers("a", 2, "Never", "{}")).expect("accepted");
    let specs = h.place("a", 0).starts();
    h.advance(3.0);
    h.step(Input::ReplicaStarted {
        job: "a".to_owned(),
        replica: "worker-0".to_owned(),
        generation: 1,
        pid: 100,
    });
    assert_eq!(h.state("a").0, JobState::Starting);
    let turn = h.start(&specs[1..]);
    assert_eq!(h.state("a"), (JobState::Running, "Running".to_owned()));
    assert_eq!(turn.reasons(), ["Running"]);
    assert_eq!(h.life.in_flight(), 0);
    assert!(
        turn.metrics()
            .contains(&&MetricUpdate::SubmitToRunning(Duration::from_secs(3)))
    );
    let replicas = &h.life.job("a").expect("exists").status.replicas;
    assert!(replicas.iter().all(|r| r.state == ReplicaState::Running));
}

#[test]
fn a_gang_without_addresses_fails_to_start() {
    let mut h = Harness::new();
    h.submit(&workers("a", 1, "OnFailure", "{}"))
        .expect("accepted");
    h.step(Input::Scheduled {
        inventory: Arc::clone(&h.inventory),
        waiting: Vec::new(),
        placements: vec![(
            sched::Placement {
                gang: "a".to_owned(),
                assignments: Vec::new(),
            },
            Err("no free local port: too many open files".to_owned()),
        )],
    });
    let turn = h.turn();
    assert!(turn.starts().is_empty());
    assert_eq!(h.state("a"), (JobState::Failed, "StartFailed".to_owned()));
    assert!(
        h.life
            .job("a")
            .expect("exists")
            .status
            .message
            .contains("no free local port")
    );
}

// Succeeded, with each success policy

#[test]
fn worker_0_succeeding_completes_the_job_and_stops_the_rest() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "Never", "{}"));
    let turn = h.exit("a", "worker-1", 0);
    assert_eq!(turn.reasons(), ["ReplicaSucceeded"]);
    assert_eq!(h.state("a").0, JobState::Running);
    let turn = h.exit("a", "worker-0", 0);
    assert_eq!(h.state("a"), (JobState::Succeeded, "Succeeded".to_owned()));
    assert_eq!(turn.stops().len(), 1);
    // The gang holds its GPUs until it is gone.
    assert_eq!(h.life.running_gangs().len(), 1);
    h.stopped(&turn.stops()[0]);
    assert!(h.life.running_gangs().is_empty());
}

#[test]
fn all_workers_success_policy_waits_for_every_worker() {
    let mut h = Harness::new();
    let text = workers("a", 2, "Never", "{}").replace(
        "  replicaSpecs:",
        "  successPolicy: AllWorkers\n  replicaSpecs:",
    );
    h.running(&text);
    h.exit("a", "worker-0", 0);
    assert_eq!(h.state("a").0, JobState::Running);
    h.exit("a", "worker-1", 0);
    assert_eq!(h.state("a").0, JobState::Succeeded);
}

// Restarting, with back-off

#[test]
fn a_failed_replica_restarts_the_gang_after_its_back_off() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "OnFailure", "{backoffLimit: 3}"));
    let turn = h.exit("a", "worker-1", 1);
    assert_eq!(
        h.state("a"),
        (JobState::Restarting, "ReplicaFailed".to_owned())
    );
    let stops = turn.stops();
    assert_eq!(stops.len(), 1);
    assert_eq!(stops[0].pgids, [100]);
    assert!(
        turn.persist.events[0]
            .message
            .contains("restart 1 of 3 in 10.0 s")
    );
    assert!(turn.metrics().contains(&&MetricUpdate::GangRestarted {
        reason: "ReplicaFailed".to_owned()
    }));
    // Not before the back-off is over, nor before the gang is gone.
    h.advance(9.0);
    h.tick();
    assert_eq!(h.state("a").0, JobState::Restarting);
    h.advance(1.0);
    h.tick();
    assert_eq!(h.state("a").0, JobState::Restarting);
    h.stopped(&stops[0]);
    let turn = h.tick();
    assert_eq!(h.state("a"), (JobState::Queued, "Requeued".to_owned()));
    assert_eq!(turn.reasons(), ["Requeued"]);
    let specs = h.place("a", 0).starts();
    assert_eq!(specs[0].generation, 2);
    h.start(&specs);
    assert_eq!(h.life.job("a").expect("exists").status.restarts, 1);
}

#[test]
fn the_back_off_doubles_and_a_spent_backoff_limit_fails_the_job() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "OnFailure", "{backoffLimit: 2}"));
    for (restart, delay) in [(1, "10.0 s"), (2, "20.0 s")] {
        let turn = h.exit("a", "worker-0", 1);
        assert!(
            turn.persist.events[0]
                .message
                .contains(&format!("restart {restart} of 2 in {delay}")),
            "{:?}",
            turn.persist.events
        );
        h.stopped(&turn.stops()[0]);
        h.advance(60.0);
        h.tick();
        let specs = h.place("a", 0).starts();
        h.start(&specs);
    }
    h.exit("a", "worker-0", 1);
    assert_eq!(
        h.state("a"),
        (JobState::Failed, "BackoffLimitExceeded".to_owned())
    );
}

// Failed, with each reason

#[test]
fn a_permanent_failure_fails_the_job() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "Never", "{backoffLimit: 3}"));
    let turn = h.exit("a", "worker-1", 1);
    assert_eq!(h.state("a"), (JobState::Failed, "ReplicaFailed".to_owned()));
    assert_eq!(turn.stops()[0].pgids, [100]);
    let status = &h.life.job("a").expect("exists").status;
    assert_eq!(status.restarts, 0);
    assert!(status.finished_at.is_some());
}

#[test]
fn exit_code_policy_retries_128_and_up_only() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "ExitCode", "{backoffLimit: 3}"));
    h.exit("a", "worker-0", 137);
    assert_eq!(h.state("a").0, JobState::Restarting);
    let mut h = Harness::new();
    h.running(&workers("a", 1, "ExitCode", "{backoffLimit: 3}"));
    h.exit("a", "worker-0", 2);
    assert_eq!(h.state("a"), (JobState::Failed, "ReplicaFailed".to_owned()));
}

#[test]
fn a_transient_start_failure_restarts_and_a_permanent_one_fails() {
    for (transient, policy, state) in [
        (true, "OnFailure", JobState::Restarting),
        (true, "Never", JobState::Failed),
        (false, "OnFailure", JobState::Failed),
    ] {
        let mut h = Harness::new();
        h.submit(&workers("a", 2, policy, "{}")).expect("accepted");
        let specs = h.place("a", 0).starts();
        h.step(Input::ReplicaStartFailed {
            job: "a".to_owned(),
            replica: "worker-0".to_owned(),
            generation: 1,
            message: "cannot start: EMFILE".to_owned(),
            transient,
        });
        assert_eq!(h.state("a").0, state, "transient {transient}, {policy}");
        assert_eq!(h.state("a").1, "StartFailed");
        // The stop waits for the replica still being started, then takes it too.
        let turn = h.turn();
        assert!(turn.stops().is_empty());
        let turn = h.start(&specs[1..]);
        assert_eq!(
            turn.stops()[0].pgids,
            [100],
            "transient {transient}, {policy}"
        );
        assert_eq!(h.life.in_flight(), 0);
    }
}

/// A replica that waits for something that may never come is said in the starting gang's
/// message and an event, once per wait; a wait of another generation, or once the gang runs,
/// changes nothing.
#[test]
fn a_replica_waiting_while_its_gang_starts_is_said_once() {
    let waiting = |generation: u32, message: &str| Input::ReplicaWaiting {
        job: "a".to_owned(),
        replica: "worker-1".to_owned(),
        generation,
        message: message.to_owned(),
    };
    let mut h = Harness::new();
    h.submit(&workers("a", 2, "Never", "{}")).expect("accepted");
    let specs = h.place("a", 0).starts();
    let said = "pod default/a-worker-1-g1: CreateContainerConfigError: secret \"k\" not found";
    h.step(waiting(1, said));
    assert_eq!(h.state("a").0, JobState::Starting);
    let message = h.life.job("a").expect("known").status.message.clone();
    assert_eq!(message, format!("worker-1 waits: {said}"));
    let turn = h.turn();
    assert_eq!(turn.reasons(), ["ReplicaWaiting"]);
    h.step(waiting(1, said));
    assert!(h.turn().reasons().is_empty(), "said once");
    h.step(waiting(2, "another generation's"));
    assert_eq!(h.life.job("a").expect("known").status.message, message);
    h.start(&specs);
    assert_eq!(h.state("a").0, JobState::Running);
    h.step(waiting(1, "late"));
    assert!(h.turn().reasons().is_empty(), "the gang runs");
    assert_ne!(
        h.life.job("a").expect("known").status.message,
        "worker-1 waits: late"
    );
}

fn platform_end(failure: job::PlatformFailure, ran: bool) -> job::PlatformEnd {
    job::PlatformEnd {
        failure,
        message: format!("pod default/a-worker-0-g1 failed: {}", failure.reason()),
        ran,
    }
}

#[test]
fn an_image_or_volumes_that_never_come_fail_the_job_whatever_its_restart_policy() {
    for failure in [
        job::PlatformFailure::ImagePullFailed,
        job::PlatformFailure::VolumeMountFailed,
    ] {
        let mut h = Harness::new();
        h.submit(&workers("a", 2, "Always", "{backoffLimit: 5}"))
            .expect("accepted");
        let specs = h.place("a", 0).starts();
        h.step(Input::ReplicaEnded {
            job: "a".to_owned(),
            replica: "worker-0".to_owned(),
            generation: 1,
            end: platform_end(failure, false),
        });
        assert_eq!(
            h.state("a"),
            (JobState::Failed, failure.reason().to_owned())
        );
        let status = &h.life.job("a").expect("exists").status;
        assert!(
            status
                .message
                .starts_with("worker-0: pod default/a-worker-0-g1 failed"),
            "{}",
            status.message
        );
        assert_eq!(status.restarts, 0);
        let turn = h.turn();
        assert!(turn.metrics().iter().any(|m| matches!(
            m,
            MetricUpdate::JobFailure { reason } if *reason == failure.reason()
        )));
        // The stop waits for the replica still being started, then takes it too.
        let turn = h.start(&specs[1..]);
        assert_eq!(turn.stops()[0].pgids, [100], "{failure:?}");
        assert_eq!(h.life.in_flight(), 0);
    }
}

#[test]
fn an_eviction_restarts_the_gang_counted_even_under_restart_policy_never() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "Never", "{backoffLimit: 1}"));
    h.step(Input::ReplicaEnded {
        job: "a".to_owned(),
        replica: "worker-0".to_owned(),
        generation: 1,
        end: platform_end(job::PlatformFailure::Evicted, true),
    });
    let turn = h.turn();
    assert_eq!(h.state("a"), (JobState::Restarting, "Evicted".to_owned()));
    assert_eq!(h.life.job("a").expect("exists").status.restarts, 1);
    assert_eq!(turn.reasons(), ["Evicted"]);
    assert!(
        turn.metrics()
            .iter()
            .any(|m| matches!(m, MetricUpdate::JobFailure { reason: "Evicted" }))
    );
}

#[test]
fn a_node_that_refuses_a_pod_gets_no_new_replicas_for_a_while() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "OnFailure", "{backoffLimit: 3}"));
    let node = h.life.job("a").expect("exists").status.replicas[0]
        .node
        .clone()
        .expect("placed on a node");
    h.step(Input::ReplicaEnded {
        job: "a".to_owned(),
        replica: "worker-0".to_owned(),
        generation: 1,
        end: platform_end(job::PlatformFailure::NodeRefused, true),
    });
    h.turn();
    assert_eq!(
        h.state("a"),
        (JobState::Restarting, "NodeRefused".to_owned())
    );
    let message = &h.life.job("a").expect("exists").status.message;
    assert!(
        message.contains(&format!("node {node} gets no new replicas for 5m")),
        "{message}"
    );
    assert_eq!(
        h.life.refused_nodes(h.now).collect::<Vec<_>>(),
        [node.as_str()]
    );
    h.advance(299.0);
    h.tick();
    assert_eq!(h.life.refused_nodes(h.now).count(), 1);
    h.advance(1.0);
    h.step(Input::Tick);
    assert!(h.life.needs_pass(), "a node open again is a new pass");
    assert_eq!(h.life.refused_nodes(h.now).count(), 0);
}

/// A lost node restarts every gang with a live replica there, once, counted and named; a
/// node still listed as lost afterwards, or another node, costs nothing more.
#[test]
fn a_lost_node_restarts_its_gangs_once_counted_with_what_was_seen() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "Never", "{backoffLimit: 3}"));
    let node = h.life.job("a").expect("exists").status.replicas[0]
        .node
        .clone()
        .expect("placed on a node");
    h.step(Input::NodesLost(vec![LostNode {
        name: "elsewhere".to_owned(),
        message: "node elsewhere not Ready for 41s".to_owned(),
    }]));
    let turn = h.turn();
    assert_eq!(h.state("a").0, JobState::Running, "not its node");
    assert!(turn.stops().is_empty());
    let lost = vec![LostNode {
        name: node.clone(),
        message: format!("node {node} not Ready for 41s (NodeStatusUnknown)"),
    }];
    h.step(Input::NodesLost(lost.clone()));
    let turn = h.turn();
    assert_eq!(h.state("a"), (JobState::Restarting, "NodeLost".to_owned()));
    let status = &h.life.job("a").expect("exists").status;
    assert_eq!(status.restarts, 1, "counted against backoffLimit");
    assert!(
        status.message.starts_with(&format!(
            "worker-0: node {node} not Ready for 41s (NodeStatusUnknown); the gang restarts on other nodes"
        )),
        "{}",
        status.message
    );
    assert_eq!(turn.reasons(), ["NodeLost"]);
    assert_eq!(turn.stops().len(), 1);
    let failures: Vec<_> = turn
        .metrics()
        .into_iter()
        .filter(|m| matches!(m, MetricUpdate::JobFailure { reason: "NodeLost" }))
        .collect();
    assert_eq!(failures.len(), 1, "one failure per gang");
    h.step(Input::NodesLost(lost));
    let turn = h.turn();
    assert!(turn.stops().is_empty() && turn.reasons().is_empty());
    assert_eq!(h.life.job("a").expect("exists").status.restarts, 1);
}

#[test]
fn an_oom_kill_is_named_as_such() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "OnFailure", "{backoffLimit: 3}"));
    h.step(Input::ReplicaExited {
        job: "a".to_owned(),
        replica: "worker-0".to_owned(),
        generation: 1,
        outcome: ExitOutcome::oom(),
    });
    let turn = h.turn();
    // OnFailure does not retry an OOM kill: it would recur with the same memory.
    assert_eq!(h.state("a"), (JobState::Failed, "OOMKilled".to_owned()));
    assert!(turn.metrics().iter().any(|m| matches!(
        m,
        MetricUpdate::JobFailure {
            reason: "OOMKilled"
        }
    )));
}

#[test]
fn an_active_deadline_fails_a_running_job() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "Never", "{activeDeadlineSeconds: 60}"));
    // A wall-clock step moves no time limit: they run on the monotonic clock.
    h.now.wall += HOUR;
    h.advance(59.0);
    h.tick();
    assert_eq!(h.state("a").0, JobState::Running);
    h.advance(1.0);
    let turn = h.tick();
    assert_eq!(
        h.state("a"),
        (JobState::Failed, "DeadlineExceeded".to_owned())
    );
    assert_eq!(turn.stops().len(), 1);
}

#[test]
fn a_schedule_timeout_fails_a_queued_job_with_why_it_waited() {
    let mut h = Harness::new();
    h.submit(&workers("a", 1, "Never", "{scheduleTimeoutSeconds: 30}"))
        .expect("accepted");
    h.step(Input::Scheduled {
        inventory: Arc::clone(&h.inventory),
        waiting: vec![sched::Waiting {
            gang: "a".to_owned(),
            reason: "Unschedulable",
            message: "needs 8 GPUs".into(),
        }],
        placements: Vec::new(),
    });
    h.advance(29.0);
    h.tick();
    assert_eq!(h.state("a").0, JobState::Queued);
    h.advance(1.0);
    let turn = h.tick();
    assert_eq!(
        h.state("a"),
        (JobState::Failed, "ScheduleTimeout".to_owned())
    );
    assert!(turn.persist.events[0].message.contains("needs 8 GPUs"));
    assert!(turn.stops().iter().all(|s| s.pgids.is_empty()));
}

// Cancelled, and removal

#[test]
fn cancelling_an_active_job_stops_its_gang() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "OnFailure", "{}"));
    let (reply, turn) = h.cancel("a");
    let status = reply.expect("cancelled");
    assert_eq!(status.state, JobState::Cancelled);
    assert_eq!(status.message, "cancelled by alice");
    assert_eq!(turn.stops()[0].pgids, [100, 101]);
    let err = h.cancel("nothing").0.unwrap_err();
    assert!(matches!(err, CoreError::NotFound(_)));
}

#[test]
fn cancelling_a_finished_job_removes_it_once_its_gang_is_gone() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "Never", "{}"));
    let stop = h.cancel("a").1.stops()[0].clone();
    // Still stopping: removed as soon as the stop is over.
    let (reply, turn) = h.cancel("a");
    assert_eq!(reply.expect("answered").reason, "Removing");
    assert!(turn.persist.jobs.is_empty());
    let turn = h.stopped(&stop);
    assert_removed(&h, &turn, JobState::Cancelled);
}

/// Job `a` is gone from memory and store, with its logs; its last status is kept.
fn assert_removed(h: &Harness, turn: &Turn, state: JobState) {
    assert!(matches!(&turn.persist.jobs[..], [JobWrite::Delete { name }] if name == "a"));
    assert!(
        turn.effects
            .iter()
            .any(|e| matches!(e, Effect::RemoveLogs { job } if job == "a"))
    );
    assert!(h.life.job("a").is_none());
    assert_eq!(h.life.removed("a").map(|s| s.state), Some(state));
}

#[test]
fn cancelling_a_finished_job_without_replicas_removes_it_at_once() {
    let mut h = Harness::new();
    h.submit(&workers("a", 1, "Never", "{}")).expect("accepted");
    h.cancel("a").0.expect("cancelled");
    let (reply, turn) = h.cancel("a");
    let status = reply.expect("removed");
    assert_eq!(status.reason, "Removed");
    assert_eq!(status.message, "removed (Cancelled before)");
    assert!(matches!(&turn.persist.jobs[..], [JobWrite::Delete { .. }]));
}

#[test]
fn a_finished_job_is_removed_after_its_ttl() {
    let mut h = Harness::new();
    let specs = h.running(&workers("a", 1, "Never", "{ttlSecondsAfterFinished: 100}"));
    let turn = h.exit("a", &specs[0].replica, 0);
    h.stopped(&turn.stops()[0]);
    h.advance(99.0);
    h.tick();
    assert!(h.life.job("a").is_some());
    h.advance(1.0);
    let turn = h.tick();
    assert_removed(&h, &turn, JobState::Succeeded);
}

// Clean-pod policy: replicas left running keep their GPUs

#[test]
fn replicas_left_running_keep_their_gpus_until_they_end() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "Never", "{cleanPodPolicy: None}"));
    let turn = h.exit("a", "worker-0", 0);
    assert_eq!(h.state("a").0, JobState::Succeeded);
    assert!(turn.stops().is_empty(), "worker-1 is left running");
    assert_eq!(h.life.running_gangs().len(), 1, "and keeps its GPU");
    let turn = h.exit("a", "worker-1", 0);
    assert_eq!(turn.reasons(), ["ReplicasEnded"]);
    let stops = turn.stops();
    assert_eq!(stops[0].pgids, [101]);
    h.stopped(&stops[0]);
    assert!(h.life.running_gangs().is_empty());
}

#[test]
fn cancelling_a_finished_job_first_stops_the_replicas_it_left_running() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "Never", "{cleanPodPolicy: None}"));
    h.exit("a", "worker-0", 0);
    let (reply, turn) = h.cancel("a");
    let status = reply.expect("answered");
    assert_eq!(status.reason, "Stopping");
    assert!(status.message.contains("stopping 1 replica left running"));
    assert_eq!(turn.stops()[0].pgids, [101]);
    assert_eq!(h.state("a").0, JobState::Succeeded);
}

// GPU health

#[test]
fn an_unhealthy_gpu_restarts_its_gang_once() {
    let mut h = Harness::new();
    h.running(&workers("a", 2, "Never", "{backoffLimit: 3}"));
    let mut inventory = (*h.inventory).clone();
    inventory.gpus[1] = gpu(1, false);
    let inventory = Arc::new(inventory);
    h.step(Input::InventoryChanged(Arc::clone(&inventory)));
    let turn = h.turn();
    assert_eq!(
        h.state("a"),
        (JobState::Restarting, "GpuUnhealthy".to_owned())
    );
    assert!(
        turn.persist.events[0]
            .message
            .contains("GPU 1 (GPU-1) of worker-1 became unhealthy: XID 79"),
        "{:?}",
        turn.persist.events
    );
    // The next refresh sees the same fault: no second restart.
    h.step(Input::InventoryChanged(inventory));
    h.turn();
    assert_eq!(h.life.job("a").expect("exists").status.restarts, 1);
}

#[test]
fn a_gpu_health_change_is_a_node_event() {
    let mut h = Harness::new();
    h.step(Input::GpuHealthChanged(GpuHealthEvent {
        index: 2,
        uuid: "GPU-2".to_owned(),
        healthy: false,
        reason: "XID 79".to_owned(),
    }));
    let turn = h.turn();
    assert_eq!(turn.persist.events[0].kind, "node");
    assert_eq!(turn.persist.events[0].object, "node-a");
    assert_eq!(turn.reasons(), ["GpuUnhealthy"]);
}

// An agent restart

/// The stored form of a running job, as a new agent reads it back.
fn stored_running(text: &str) -> JobRecord {
    let mut h = Harness::new();
    let specs = h.running(text);
    let record = h.life.job(&specs[0].job).expect("exists").clone();
    JobRecord::restore(
        record.job.clone(),
        record.manifest.clone(),
        record.status,
        h.now,
    )
}

#[test]
fn an_adopted_gang_runs_on_with_its_gpus_and_restarts() {
    let mut h = Harness::new();
    let record = stored_running(&workers("a", 2, "OnFailure", "{}"));
    h.step(Input::Restored {
        record: Box::new(record),
        adopted: Ok(2),
    });
    let turn = h.turn();
    assert_eq!(turn.reasons(), ["Adopted"]);
    assert_eq!(h.state("a").0, JobState::Running);
    let gangs = h.life.running_gangs();
    assert_eq!(gangs[0].assignments.len(), 2);
    assert_eq!(gangs[0].assignments[1].gpu_indices, [1]);
    // Its replicas' ends count as before.
    h.exit("a", "worker-0", 0);
    assert_eq!(h.state("a").0, JobState::Succeeded);
}

#[test]
fn a_gang_that_cannot_be_adopted_restarts_uncharged() {
    let mut h = Harness::new();
    let record = stored_running(&workers("a", 2, "Never", "{backoffLimit: 0}"));
    h.step(Input::Restored {
        record: Box::new(record),
        adopted: Err("its supervisor is gone".to_owned()),
    });
    let turn = h.turn();
    assert_eq!(
        h.state("a"),
        (JobState::Queued, "AgentRestarted".to_owned())
    );
    assert!(
        turn.persist.events[0]
            .message
            .contains("its supervisor is gone")
    );
    let status = &h.life.job("a").expect("exists").status;
    assert_eq!(status.restarts, 0);
    assert!(
        status
            .replicas
            .iter()
            .all(|r| r.state != ReplicaState::Running)
    );
    assert_eq!(h.life.queued_gangs().len(), 1);
}

#[test]
fn a_stored_restarting_gang_is_queued_again() {
    let mut h = Harness::new();
    let mut record = stored_running(&workers("a", 1, "OnFailure", "{}"));
    record.set_state(JobState::Restarting, "ReplicaFailed", "worker-0 exited 1");
    h.step(Input::Restored {
        record: Box::new(record),
        adopted: Err("the gang was still starting".to_owned()),
    });
    h.turn();
    assert_eq!(h.state("a"), (JobState::Queued, "Requeued".to_owned()));
}

#[test]
fn an_unreadable_job_is_kept_as_failed() {
    let mut h = Harness::new();
    h.step(Input::Unreadable {
        name: "broken".to_owned(),
        manifest: "not yaml: [".to_owned(),
        status: None,
        parsed: None,
        problems: "its manifest no longer parses (bad)".to_owned(),
    });
    let turn = h.turn();
    assert_eq!(turn.reasons(), ["Unreadable"]);
    assert_eq!(
        h.state("broken"),
        (JobState::Failed, "Unreadable".to_owned())
    );
    assert_eq!(h.life.job("broken").expect("kept").status.queue, "slow");
}

/// A TrainingJob refused at admission is stored with a manifest that does not parse; a new
/// leader restores it as it is, with no second failure, event or write.
#[test]
fn a_job_refused_at_admission_is_restored_quietly() {
    let mut h = Harness::new();
    let mut status = stored_running(&workers("refused", 1, "Never", "{}")).status;
    status.state = JobState::Failed;
    REFUSED_REASON.clone_into(&mut status.reason);
    "the manifest is not valid: spec.replicaSpecs.Worker.replicas: must be between 1 and \
     4294967295; got -3"
        .clone_into(&mut status.message);
    status.replicas.clear();
    let before = status.clone();
    h.step(Input::Unreadable {
        name: "refused".to_owned(),
        manifest: "spec: {replicaSpecs: {Worker: {replicas: -3}}}".to_owned(),
        status: Some(Box::new(status)),
        parsed: None,
        problems: "its manifest no longer parses (bad)".to_owned(),
    });
    let turn = h.turn();
    assert!(turn.reasons().is_empty(), "{:?}", turn.reasons());
    assert!(h.life.ready(h.now).is_empty(), "nothing to write");
    assert_eq!(h.life.job("refused").expect("kept").status, before);
}

// Writes that fail

#[test]
fn a_submission_that_cannot_be_written_is_undone_and_answered_with_why() {
    let mut h = Harness::new();
    let input = h.submit_input(&workers("a", 1, "Never", "{}"));
    h.step(input);
    let _ = h.life.ready(h.now);
    let effects = h.life.not_persisted("disk full");
    let reply = effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply { result, .. } => Some(result),
            _ => None,
        })
        .expect("answered");
    assert!(matches!(reply.as_ref(), Err(CoreError::NotWritten(m)) if m == "disk full"));
    assert!(h.life.job("a").is_none());
    assert!(
        h.life.ready(h.now).is_empty(),
        "nothing of it is left to write"
    );
    assert!(!h.life.schedulable(), "nothing is placed while writes fail");
    // The next turn has nothing to write: that proves nothing about the disk.
    let _ = h.life.persisted();
    assert!(
        !h.life.schedulable(),
        "an empty turn does not end the write failure"
    );
    h.step(Input::StoreWritable);
    assert!(h.life.schedulable());
}

#[test]
fn a_placement_that_cannot_be_written_starts_nothing_but_facts_stand() {
    let mut h = Harness::new();
    h.running(&workers("a", 1, "Never", "{}"));
    h.submit(&workers("b", 1, "Never", "{}")).expect("accepted");
    // One turn: a replica of `a` fails (a fact), and `b` is placed.
    h.step(Input::ReplicaExited {
        job: "a".to_owned(),
        replica: "worker-0".to_owned(),
        generation: 1,
        outcome: ExitOutcome {
            code: Some(1),
            ..ExitOutcome::default()
        },
    });
    let turn = {
        let assignments = vec![sched::Assignment {
            replica: "worker-0".to_owned(),
            node: "node-a".to_owned(),
            gpu_indices: vec![3],
            resources: sched::Resources::default(),
        }];
        let hosts = addresses(&h.life.job("b").expect("exists").job);
        h.step(Input::Scheduled {
            inventory: Arc::clone(&h.inventory),
            waiting: Vec::new(),
            placements: vec![(
                sched::Placement {
                    gang: "b".to_owned(),
                    assignments,
                },
                Ok(hosts),
            )],
        });
        let _ = h.life.ready(h.now);
        h.life.not_persisted("disk full")
    };
    assert!(!turn.iter().any(|e| matches!(e, Effect::StartReplica(_))));
    assert!(
        turn.iter()
            .any(|e| matches!(e, Effect::StopGang(s) if s.job == "a"))
    );
    assert_eq!(h.state("b").0, JobState::Queued, "the placement is undone");
    assert_eq!(h.life.in_flight(), 0);
    assert_eq!(h.state("a").0, JobState::Failed, "the fact stays");
    // ...and is written by the next turn.
    let persist = h.life.ready(h.now);
    assert!(matches!(&persist.jobs[..], [JobWrite::Upsert { name, .. }] if name == "a"));
}

// Reports out of order

#[test]
fn a_replica_that_ends_before_its_gang_started_counts_once_the_gang_runs() {
    let mut h = Harness::new();
    h.submit(&workers("a", 2, "Never", "{}")).expect("accepted");
    let specs = h.place("a", 0).starts();
    h.start(&specs[..1]);
    h.exit("a", "worker-0", 0);
    assert_eq!(h.state("a").0, JobState::Starting);
    h.start(&specs[1..]);
    assert_eq!(h.state("a").0, JobState::Succeeded);
}

#[test]
fn a_replica_started_for_no_launch_is_killed() {
    let mut h = Harness::new();
    h.step(Input::ReplicaStarted {
        job: "gone".to_owned(),
        replica: "worker-0".to_owned(),
        generation: 1,
        pid: 4242,
    });
    let turn = h.turn();
    assert!(
        turn.effects
            .iter()
            .any(|e| matches!(e, Effect::KillStray { pid: 4242, job, .. } if job == "gone"))
    );
}
