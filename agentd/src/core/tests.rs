//! The core driven turn by turn on a clock the test moves.

use super::*;
use std::collections::BTreeSet;

/// A job that never fits (it asks for a GPU on a node that has none) and gives up after 60 s.
const WAITS_FOR_A_GPU: &[u8] = b"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: waits}
spec:
  runPolicy: {scheduleTimeoutSeconds: 60}
  replicaSpecs:
    Worker:
      replicas: 1
      template:
        spec:
          containers:
            - name: tensorflow
              command: [\"true\"]
              resources: {limits: {nvidia.com/gpu: 1}}
";

pub(super) fn config(state_dir: &std::path::Path) -> Config {
    Config {
        state_dir: state_dir.to_owned(),
        queues: crate::config::default_queues(),
        jobs: crate::config::JobsConfig {
            replica_units: ReplicaUnits::Off,
            ..Default::default()
        },
        ..Config::default()
    }
}

fn parts(store: Box<dyn JobStore>, inventory: NodeInventory, clock: &ManualClock) -> CoreParts {
    let (_, inventory) = watch::channel(Arc::new(inventory));
    let (_, health) = mpsc::unbounded_channel();
    CoreParts {
        node: "node-a".to_owned(),
        store,
        inventory,
        nodes: Nodes::Local,
        health,
        metrics: None,
        clock: Arc::new(clock.clone()),
    }
}

fn open(state_dir: &std::path::Path, clock: &ManualClock) -> Core {
    open_configured(&config(state_dir), clock)
}

/// Opens a core with `config`, its SQLite store in the state directory and replicas as local
/// processes.
pub(super) fn open_configured(config: &Config, clock: &ManualClock) -> Core {
    let state_dir = config.state_dir.as_path();
    let store = crate::store::Store::open(state_dir).expect("a store in a temporary directory");
    let parts = parts(Box::new(store), NodeInventory::default(), clock);
    let (core, _, _) = Core::open_with(config, parts, |reports| {
        Box::new(LocalExecutor::new(
            reports,
            config.jobs.log_max_bytes,
            local::Runner::Processes,
            state_dir.join("replicas"),
            crate::exec::ShimCommand::agentd(),
        ))
    })
    .expect("the core opens");
    core
}

/// Opens a core on `parts` whose replicas go to an in-memory executor, handed back with it.
fn open_in_memory(
    config: &Config,
    parts: CoreParts,
) -> (Core, crate::exec::memory::MemoryExecutor, CoreInputs) {
    let mut executor = None;
    let (core, _, inputs) = Core::open_with(config, parts, |reports| {
        let memory = crate::exec::memory::MemoryExecutor::new(reports);
        executor = Some(memory.clone());
        Box::new(memory)
    })
    .expect("the core opens");
    (core, executor.expect("built"), inputs)
}

/// Submits `manifest` as root, admitted as the API admits it; the answer comes once the turn
/// is written.
fn submit(core: &mut Core, manifest: &[u8]) -> oneshot::Receiver<Result<JobStatus, CoreError>> {
    let rules = job::Admission::new(
        crate::config::default_queues().into_keys(),
        crate::config::DEFAULT_QUEUE,
        crate::config::DEFAULT_MAX_REPLICAS_PER_JOB,
    );
    submit_admitted(core, manifest, &rules)
}

/// [`submit`], admitted by `rules`.
fn submit_admitted(
    core: &mut Core,
    manifest: &[u8],
    rules: &job::Admission,
) -> oneshot::Receiver<Result<JobStatus, CoreError>> {
    let job = job::admit(manifest, rules).expect("a valid manifest");
    let text = String::from_utf8_lossy(manifest).into_owned();
    let root = agentd_api::Owner {
        uid: 0,
        gid: 0,
        user: "root".to_owned(),
    };
    let (reply, answer) = oneshot::channel();
    core.command(Command::Submit {
        job: Box::new(job),
        manifest: text,
        owner: root,
        reply,
    });
    answer
}

/// Submits [`WAITS_FOR_A_GPU`] and writes it.
fn submit_waiting(core: &mut Core) {
    let mut answer = submit(core, WAITS_FOR_A_GPU);
    core.commit().expect("written");
    answer
        .try_recv()
        .expect("answered once written")
        .expect("accepted");
}

fn state(core: &Core) -> (JobState, String) {
    let status = core.get("waits").expect("the job exists");
    (status.state, status.reason)
}

#[tokio::test]
async fn a_wall_clock_step_moves_no_time_limit_of_the_core() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let mut core = open(dir.path(), &clock);
    submit_waiting(&mut core);

    clock.step_wall(2.0 * 3600.0);
    clock.advance(59.0);
    core.tick();
    core.commit().expect("written");
    assert_eq!(state(&core).0, JobState::Queued);

    clock.advance(1.0);
    core.tick();
    core.commit().expect("written");
    assert_eq!(
        state(&core),
        (JobState::Failed, "ScheduleTimeout".to_owned())
    );
}

/// A restarted agent counts what is left of the time-out from the stored submit time.
#[tokio::test]
async fn a_restarted_core_keeps_what_was_left_of_a_time_limit() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let before = ManualClock::new(1_000_000.0);
    {
        let mut core = open(dir.path(), &before);
        submit_waiting(&mut core);
        before.advance(30.0);
        core.tick();
        core.commit().expect("written");
    }
    // A new process: the monotonic clock starts again, 10 s of wall time later.
    let after = ManualClock::new(before.now().wall + 10.0);
    let mut core = open(dir.path(), &after);
    after.step_wall(-3600.0);
    after.advance(19.0);
    core.tick();
    assert_eq!(state(&core).0, JobState::Queued);
    after.advance(1.0);
    core.tick();
    assert_eq!(
        state(&core),
        (JobState::Failed, "ScheduleTimeout".to_owned())
    );
}

/// A job that fits anywhere: one worker, no GPU.
const FITS: &[u8] = b"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: fits}
spec:
  replicaSpecs:
    Worker:
      replicas: 1
      template: {spec: {containers: [{name: tensorflow, command: [\"true\"]}]}}
";

/// A node with 4 CPUs, 8 GiB and no GPU: room for small CPU jobs.
fn small_node() -> NodeInventory {
    NodeInventory {
        name: "node-a".to_owned(),
        cpu: agentd_api::CpuInfo {
            logical_cores: 4,
            ..Default::default()
        },
        memory: agentd_api::MemoryInfo {
            total_bytes: 8 << 30,
            ..Default::default()
        },
        ..NodeInventory::default()
    }
}

/// The loop with the in-memory store and executor: a turn is written before its request is
/// answered or its replicas started; one that cannot be written answers with the cause and
/// starts nothing.
#[tokio::test]
async fn the_loop_writes_a_turn_before_it_answers_or_starts_anything() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let store = crate::store::memory::MemoryStore::default();
    let node = small_node();
    let (mut core, executor, mut inputs) = open_in_memory(
        &config(dir.path()),
        parts(Box::new(store.clone()), node, &clock),
    );

    store.fail_writes(true);
    let mut answer = submit(&mut core, FITS);
    assert!(answer.try_recv().is_err(), "not answered before the write");
    core.schedule();
    assert!(core.commit().is_err());
    let refused = answer.try_recv().expect("answered").unwrap_err();
    assert!(matches!(refused, CoreError::NotWritten(_)), "{refused}");
    assert!(
        refused
            .to_string()
            .ends_with("; free space there (or fix the state directory) and try again"),
        "the local store's remedy: {refused}"
    );
    assert!(executor.take().started.is_empty(), "nothing starts");
    assert!(store.jobs().expect("readable").is_empty());

    store.fail_writes(false);
    core.tick();
    let mut answer = submit(&mut core, FITS);
    core.schedule();
    core.commit().expect("written");
    assert_eq!(
        answer.try_recv().expect("answered").expect("accepted").name,
        "fits"
    );
    let started = executor.take().started;
    assert_eq!(started.len(), 1);
    let stored = store.jobs().expect("readable");
    assert!(stored[0].2.contains("\"Starting\""), "{stored:?}");

    executor.report(&started[0], ReplicaEvent::Started { pid: 7 });
    core.replica_report(inputs.replicas.try_recv().expect("reported"));
    core.commit().expect("written");
    assert_eq!(core.get("fits").expect("exists").state, JobState::Running);
    executor.exited(&started[0], 0);
    core.replica_report(inputs.replicas.try_recv().expect("reported"));
    core.commit().expect("written");
    assert_eq!(core.get("fits").expect("exists").state, JobState::Succeeded);
    assert_eq!(
        executor.take().stopped,
        [("fits".to_owned(), 1, Vec::new())],
        "the gang's stop is asked for"
    );
}

/// The cluster's nodes as the feed publishes them, none lost.
fn capacity(nodes: Vec<NodeCapacity>) -> Arc<ClusterNodes> {
    Arc::new(ClusterNodes {
        listed: true,
        capacity: Arc::new(nodes),
        lost: Vec::new(),
    })
}

/// A cluster node as the capacity feed gives it: `gpus` free GPUs, open or closed.
fn cluster_node(name: &str, gpus: u32, schedulable: bool) -> NodeCapacity {
    NodeCapacity {
        name: name.to_owned(),
        labels: BTreeMap::from([("kubernetes.io/hostname".to_owned(), name.to_owned())]),
        gpus: (0..gpus)
            .map(|index| sched::GpuSlot {
                index,
                uuid: String::new(),
                product: "H200".to_owned(),
                memory_mib: 141_000,
                healthy: true,
            })
            .collect(),
        cpu_milli: 64_000,
        memory_mib: 512 * 1024,
        schedulable,
        taints: Vec::new(),
    }
}

/// Two workers of four GPUs each, in a namespace of their own.
const TWO_BY_FOUR: &[u8] = b"apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: wide, namespace: team-a}
spec:
  replicaSpecs:
    Worker:
      replicas: 2
      template:
        spec:
          containers:
            - name: tensorflow
              image: tf:2.16
              command: [python, train.py]
              resources: {limits: {nvidia.com/gpu: 4}}
";

/// In cluster mode the same lifecycle places a gang across the cluster's open nodes, and each
/// launch names its node, namespace, place in the gang and GPUs for the pod executor; a node
/// the feed closes gets nothing, and a change of the nodes brings a new pass.
#[tokio::test]
async fn in_cluster_mode_a_gang_is_placed_across_the_open_nodes_of_the_cluster() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let (feed, nodes) = watch::channel(capacity(vec![
        cluster_node("gpu-1", 4, true),
        cluster_node("gpu-2", 2, true),
        cluster_node("gpu-3", 8, false),
    ]));
    let (mut core, executor, _inputs) = open_cluster(
        &config(dir.path()),
        &clock,
        Box::new(crate::store::memory::MemoryStore::default()),
        nodes,
    );

    let mut answer = submit(&mut core, TWO_BY_FOUR);
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    let status = core.get("wide").expect("exists");
    assert_eq!(status.state, JobState::Queued, "4 + 2 open GPUs are not 8");
    assert!(
        status.message.contains("GPU"),
        "the reason names what binds: {}",
        status.message
    );
    assert!(executor.take().started.is_empty());

    feed.send_replace(capacity(vec![
        cluster_node("gpu-1", 4, true),
        cluster_node("gpu-2", 4, true),
        cluster_node("gpu-3", 8, false),
    ]));
    core.step(Input::NodesChanged);
    assert!(core.lifecycle.needs_pass());
    core.schedule();
    core.commit().expect("written");
    let started = executor.take().started;
    let mut pods: Vec<(String, String, String, u32, u32)> = started
        .iter()
        .map(|spec| {
            let pod = spec
                .pod
                .as_ref()
                .expect("a launch in cluster mode names its pod");
            assert!(spec.env.contains_key("TF_CONFIG"), "{spec:?}");
            (
                spec.replica.clone(),
                pod.node.clone(),
                pod.namespace.clone(),
                pod.index,
                pod.gpus,
            )
        })
        .collect();
    pods.sort();
    let nodes: BTreeSet<&str> = pods.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from(["gpu-1", "gpu-2"]), "{pods:?}");
    for (i, (replica, _, namespace, index, gpus)) in pods.iter().enumerate() {
        assert_eq!(replica, &format!("worker-{i}"));
        assert_eq!((namespace.as_str(), *index, *gpus), ("team-a", i as u32, 4));
    }
    assert_eq!(core.get("wide").expect("exists").state, JobState::Starting);
}

/// A new leader whose feed has not listed the cluster's nodes yet takes no submission and runs
/// no pass: an empty list is not a cluster without nodes, and a job taken in before its pass
/// can place it costs a status write more. The nodes listed, the job goes in and is placed in
/// the same turn. A leader that cannot list them takes submissions after a while all the same,
/// and its queued jobs say why they wait.
#[tokio::test]
async fn in_cluster_mode_nothing_is_taken_in_or_placed_before_the_nodes_are_listed() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let (feed, nodes) = watch::channel(Arc::<ClusterNodes>::default());
    let store = crate::store::memory::MemoryStore::default();
    let (mut core, executor, _inputs) =
        open_cluster(&config(dir.path()), &clock, Box::new(store.clone()), nodes);
    assert!(!core.taking_submits(), "the nodes are not listed");

    // Listed: the submission is taken in and placed in one turn, with one write of the job.
    feed.send_replace(capacity(vec![
        cluster_node("gpu-1", 4, true),
        cluster_node("gpu-2", 4, true),
    ]));
    core.nodes_changed();
    assert!(core.taking_submits());
    let mut answer = submit(&mut core, TWO_BY_FOUR);
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    let status = core.get("wide").expect("exists");
    assert_eq!(status.state, JobState::Starting, "{}", status.message);
    assert_eq!(executor.take().started.len(), 2);
    assert_eq!(
        store.writes_of("wide"),
        1,
        "taken in and placed in one write"
    );

    // A leader that cannot list the nodes: submissions wait, then go in and say why.
    let (_feed, nodes) = watch::channel(Arc::<ClusterNodes>::default());
    let (mut core, executor, _inputs) = open_cluster(
        &config(dir.path()),
        &clock,
        Box::new(crate::store::memory::MemoryStore::default()),
        nodes,
    );
    clock.advance(NODES_LISTED_WAIT.as_secs_f64() - 0.5);
    assert!(!core.taking_submits());
    clock.advance(0.5);
    assert!(core.taking_submits(), "not forever");
    let mut answer = submit(&mut core, TWO_BY_FOUR);
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    let status = core.get("wide").expect("exists");
    assert_eq!(
        (status.state, status.reason.as_str()),
        (JobState::Queued, NODES_NOT_LISTED),
        "not NeverFits: {}",
        status.message
    );
    assert!(status.message.contains("not listed"), "{}", status.message);
    assert!(executor.take().started.is_empty());
}

/// A node whose kubelet refused a replica's pod gets no new replicas for
/// `cluster.node_refusal_cooldown`: the gang's restart goes to another node.
#[tokio::test]
async fn in_cluster_mode_a_gang_a_node_refused_restarts_on_another_node() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let (_feed, nodes) = watch::channel(capacity(vec![
        cluster_node("gpu-1", 8, true),
        cluster_node("gpu-2", 8, true),
    ]));
    let (mut core, executor, mut inputs) = open_cluster(
        &config(dir.path()),
        &clock,
        Box::new(crate::store::memory::MemoryStore::default()),
        nodes,
    );
    let mut answer = submit(&mut core, TWO_BY_FOUR);
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    let first = executor.take().started;
    let node_of = |spec: &crate::exec::LaunchSpec| spec.pod.as_ref().expect("a pod").node.clone();
    // Both workers fit on one node: best fit puts them together.
    let refusing = node_of(&first[0]);
    assert!(first.iter().all(|s| node_of(s) == refusing), "{first:?}");
    executor.report(&first[1], ReplicaEvent::Started { pid: 1 });
    executor.report(
        &first[0],
        ReplicaEvent::Ended(job::PlatformEnd {
            failure: job::PlatformFailure::NodeRefused,
            message: "pod team-a/wide-worker-0-g1 failed: UnexpectedAdmissionError".to_owned(),
            ran: false,
        }),
    );
    while let Ok(report) = inputs.replicas.try_recv() {
        core.replica_report(report);
    }
    core.commit().expect("written");
    let status = core.get("wide").expect("exists");
    assert_eq!(status.state, JobState::Restarting, "{}", status.message);
    assert_eq!(status.reason, "NodeRefused");
    for (job, generation, _) in executor.take().stopped {
        core.step(Input::GangStopped { job, generation });
    }
    clock.advance(60.0);
    core.step(Input::Tick);
    core.schedule();
    core.commit().expect("written");
    let second = executor.take().started;
    assert_eq!(second.len(), 2, "the gang is placed again");
    assert!(
        second.iter().all(|s| node_of(s) != refusing),
        "not on {refusing} again: {second:?}"
    );
}

/// A node the feed reports lost restarts the gang that runs there on the other node, with the
/// reason and what was seen, and the executor is told so that the stop does not wait for the
/// node's kubelet. A node that is only closed (its agent stale, its kubelet fine) leaves the
/// gang running there.
#[tokio::test]
async fn in_cluster_mode_a_gang_on_a_lost_node_restarts_on_another_node() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let (feed, nodes) = watch::channel(capacity(vec![
        cluster_node("gpu-1", 8, true),
        cluster_node("gpu-2", 8, true),
    ]));
    let (mut core, executor, mut inputs) = open_cluster(
        &config(dir.path()),
        &clock,
        Box::new(crate::store::memory::MemoryStore::default()),
        nodes,
    );
    let mut answer = submit(&mut core, TWO_BY_FOUR);
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    let first = executor.take().started;
    let node_of = |spec: &crate::exec::LaunchSpec| spec.pod.as_ref().expect("a pod").node.clone();
    let lost = node_of(&first[0]);
    assert!(first.iter().all(|s| node_of(s) == lost), "{first:?}");
    let other = if lost == "gpu-1" { "gpu-2" } else { "gpu-1" };
    for spec in &first {
        executor.report(spec, ReplicaEvent::Started { pid: 1 });
    }
    while let Ok(report) = inputs.replicas.try_recv() {
        core.replica_report(report);
    }
    core.commit().expect("written");
    assert_eq!(core.get("wide").expect("exists").state, JobState::Running);

    // Its agent stale: closed, not lost. The gang runs on.
    let closed = |name: &str| cluster_node(name, 0, false);
    feed.send_replace(capacity(vec![closed(&lost), cluster_node(other, 8, true)]));
    core.nodes_changed();
    core.schedule();
    core.commit().expect("written");
    assert_eq!(core.get("wide").expect("exists").state, JobState::Running);
    assert!(executor.take().stopped.is_empty());

    // Lost: the gang restarts, and the restart goes to the other node.
    let seen = format!("node {lost} not Ready for 41s (NodeStatusUnknown)");
    feed.send_replace(Arc::new(ClusterNodes {
        listed: true,
        capacity: Arc::new(vec![closed(&lost), cluster_node(other, 8, true)]),
        lost: vec![LostNode {
            name: lost.clone(),
            message: seen.clone(),
        }],
    }));
    core.nodes_changed();
    core.schedule();
    core.commit().expect("written");
    let status = core.get("wide").expect("exists");
    assert_eq!(
        (status.state, status.reason.as_str()),
        (JobState::Restarting, "NodeLost"),
        "{}",
        status.message
    );
    assert!(status.message.contains(&seen), "{}", status.message);
    assert_eq!(status.restarts, 1);
    let asked = executor.take();
    assert_eq!(asked.lost_nodes, BTreeSet::from([lost.clone()]));
    for (job, generation, _) in asked.stopped {
        core.step(Input::GangStopped { job, generation });
    }
    clock.advance(60.0);
    core.step(Input::Tick);
    core.schedule();
    core.commit().expect("written");
    let second = executor.take().started;
    assert_eq!(second.len(), 2, "the gang is placed again");
    assert!(
        second.iter().all(|s| node_of(s) == other),
        "on {other}, not on {lost}: {second:?}"
    );
}

/// A job of `replicas` workers of `gpus` GPUs each, in `queue`, with a declared run time or
/// none.
fn sized_job(name: &str, queue: &str, replicas: u32, gpus: u32, deadline: Option<u32>) -> String {
    let run_policy = deadline.map_or_else(String::new, |d| {
        format!("\n  runPolicy: {{activeDeadlineSeconds: {d}}}")
    });
    format!(
        "apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  queue: {queue}{run_policy}
  replicaSpecs:
    Worker:
      replicas: {replicas}
      template:
        spec:
          containers:
            - name: tensorflow
              image: tf:2.16
              command: [python, train.py]
              resources: {{limits: {{nvidia.com/gpu: {gpus}}}}}
"
    )
}

/// The core's scheduler is told what changes between passes (submits, cancels, gangs placed,
/// finished and stopped, nodes closed, opened and resized, a write that fails and is undone)
/// and hands back only the waiting gangs whose answer changed; after every pass each job must
/// say exactly what the full pass, run on the same jobs and nodes, says of it.
#[tokio::test]
async fn the_incremental_scheduler_leaves_every_job_as_the_full_pass_would() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let mut nodes = vec![
        cluster_node("gpu-1", 8, true),
        cluster_node("gpu-2", 8, true),
        cluster_node("gpu-3", 4, true),
    ];
    let (feed, receiver) = watch::channel(capacity(nodes.clone()));
    let store = crate::store::memory::MemoryStore::default();
    let mut config = config(dir.path());
    config
        .queues
        .get_mut("slow")
        .expect("a default queue")
        .max_running_jobs = Some(2);
    // The full pass here is told the declared run times only; with estimates on, the debug
    // builds' check inside every pass compares the two passes on the estimated ones.
    config.scheduler.estimate_runtimes = false;
    let (mut core, executor, mut inputs) =
        open_cluster(&config, &clock, Box::new(store.clone()), receiver);
    let rules = job::Admission::new(
        config.queues.keys().cloned(),
        crate::config::DEFAULT_QUEUE,
        crate::config::DEFAULT_MAX_REPLICAS_PER_JOB,
    );
    let root = agentd_api::Owner {
        uid: 0,
        gid: 0,
        user: "root".to_owned(),
    };
    let mut launched: Vec<crate::exec::LaunchSpec> = Vec::new();
    let (mut checked, mut placed, mut failed) = (0, 0, 0);
    let mut seed: u64 = 7;
    let mut random = move |n: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % n
    };
    for turn in 0..160u32 {
        let queued: Vec<String> = core
            .lifecycle
            .jobs()
            .values()
            .filter(|r| r.status.state == JobState::Queued)
            .map(|r| r.status.name.clone())
            .collect();
        let failing = random(25) == 0;
        store.fail_writes(failing);
        match random(10) {
            0..=3 => {
                let gpus = [1, 2, 4, 8][random(4) as usize];
                let text = sized_job(
                    &format!("job-{turn:03}"),
                    if random(3) == 0 { "slow" } else { "fast" },
                    1 + random(2) as u32,
                    gpus,
                    (random(2) == 0).then(|| 600 + 60 * random(20) as u32),
                );
                let job = job::admit(text.as_bytes(), &rules).expect("a valid manifest");
                let (reply, _answer) = oneshot::channel();
                core.command(Command::Submit {
                    job: Box::new(job),
                    manifest: text,
                    owner: root.clone(),
                    reply,
                });
            }
            4 | 5 if !launched.is_empty() => {
                // A gang ends: its replicas start and exit, then its stop completes.
                let job = launched[random(launched.len() as u64) as usize].job.clone();
                for spec in launched.iter().filter(|s| s.job == job) {
                    executor.report(spec, ReplicaEvent::Started { pid: 7 });
                    executor.exited(spec, 0);
                }
                launched.retain(|s| s.job != job);
                while let Ok(report) = inputs.replicas.try_recv() {
                    core.replica_report(report);
                }
            }
            6 if !queued.is_empty() => {
                let name = queued[random(queued.len() as u64) as usize].clone();
                let (reply, _answer) = oneshot::channel();
                core.command(Command::Cancel {
                    name,
                    by: "root".to_owned(),
                    object: None,
                    reply,
                });
            }
            7 => {
                let n = random(nodes.len() as u64) as usize;
                if random(2) == 0 {
                    nodes[n].schedulable = !nodes[n].schedulable;
                } else {
                    let gpus = [2, 4, 8][random(3) as usize];
                    nodes[n] = cluster_node(&nodes[n].name.clone(), gpus, nodes[n].schedulable);
                }
                feed.send_replace(capacity(nodes.clone()));
                core.step(Input::NodesChanged);
            }
            _ => clock.advance(30.0 + random(300) as f64),
        }
        for (job, generation, _) in executor.take().stopped {
            launched.retain(|s| s.job != job);
            core.step(Input::GangStopped { job, generation });
        }
        let now = clock.now();
        let open: Vec<NodeCapacity> = nodes
            .iter()
            .map(|n| NodeCapacity {
                schedulable: n.schedulable && core.lifecycle.write_failure().is_none(),
                ..n.clone()
            })
            .collect();
        let full = sched::schedule(
            &sched::Snapshot {
                now: now.wall,
                nodes: &open,
                running: &core.lifecycle.running_gangs(),
                queued: &core.lifecycle.queued_gangs(),
                queues: &QueuesInForce::configured(&config).scheduler_queues(),
            },
            &Policy::agentd(),
        );
        core.schedule();
        if core.commit().is_err() {
            failed += 1;
            continue;
        }
        launched.extend(executor.take().started);
        for w in &full.waiting {
            let status = &core.lifecycle.job(&w.gang).expect("a waiting job").status;
            assert_eq!(
                (
                    status.state,
                    status.reason.as_str(),
                    status.message.as_str()
                ),
                (JobState::Queued, w.reason, &*w.message),
                "turn {turn}: {}",
                w.gang
            );
            checked += 1;
        }
        for p in &full.placements {
            let status = &core.lifecycle.job(&p.gang).expect("a placed job").status;
            assert_ne!(status.state, JobState::Queued, "turn {turn}: {}", p.gang);
            placed += 1;
        }
    }
    // The story must have exercised what it claims to.
    assert!(checked > 200, "{checked} waiting answers checked");
    assert!(placed > 4, "{placed} placements");
    assert!(failed > 0, "no write failed");
    eprintln!("{checked} waiting answers checked, {placed} placements, {failed} failed writes");
}

/// Runs the job `name` (one worker, in memory) to success; its worker writes `log_bytes` of log.
fn run_to_success(
    core: &mut Core,
    executor: &crate::exec::memory::MemoryExecutor,
    inputs: &mut CoreInputs,
    name: &str,
    log_bytes: usize,
) {
    let manifest = String::from_utf8_lossy(FITS).replace("name: fits", &format!("name: {name}"));
    let mut answer = submit(core, manifest.as_bytes());
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    let started = executor.take().started;
    executor.report(&started[0], ReplicaEvent::Started { pid: 7 });
    core.replica_report(inputs.replicas.try_recv().expect("reported"));
    core.commit().expect("written");
    let logs = core.log_dir(name);
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("worker-0.log"), vec![b'x'; log_bytes]).unwrap();
    executor.exited(&started[0], 0);
    core.replica_report(inputs.replicas.try_recv().expect("reported"));
    core.commit().expect("written");
    assert_eq!(core.get(name).expect("exists").state, JobState::Succeeded);
}

/// Waits for the log budget's check running off the core's task to have counted every log
/// `counts` times.
async fn whole_counts_reach(core: &Core, counts: u64) {
    for _ in 0..500 {
        if core
            .logs_budget
            .try_lock()
            .is_ok_and(|budget| budget.whole_counts() >= counts)
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the log budget was not counted {counts} times");
}

/// Jobs that start and finish between two checks of `jobs.logs_max_total_bytes` count towards
/// it: the check after them finds the logs over the bound and deletes the oldest.
#[tokio::test]
async fn logs_of_jobs_that_ran_between_two_checks_count_towards_the_bound() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let mut config = config(dir.path());
    config.jobs.logs_max_total_bytes = 10_000;
    let node = small_node();
    let store = crate::store::memory::MemoryStore::default();
    let (mut core, executor, mut inputs) =
        open_in_memory(&config, parts(Box::new(store), node, &clock));
    // The first check counts everything there is: nothing yet.
    core.keep_logs_in_budget();
    whole_counts_reach(&core, 1).await;
    // Two jobs of 6,000 bytes of log each run and finish before the next check.
    run_to_success(&mut core, &executor, &mut inputs, "first", 6_000);
    clock.advance(1.0);
    run_to_success(&mut core, &executor, &mut inputs, "second", 6_000);
    core.keep_logs_in_budget();
    whole_counts_reach(&core, 2).await;
    assert!(
        !core.log_dir("first").exists(),
        "the oldest job's logs go: 12,000 bytes are over the bound"
    );
    assert!(core.log_dir("second").join("worker-0.log").exists());
}

/// A cluster of one node with `gpus` GPUs, on `store` and the in-memory executor.
/// Opens a core in cluster mode on `store`, the cluster's nodes from `nodes`, whose replicas go
/// to an in-memory executor.
fn open_cluster(
    config: &Config,
    clock: &ManualClock,
    store: Box<dyn JobStore>,
    nodes: watch::Receiver<Arc<ClusterNodes>>,
) -> (Core, crate::exec::memory::MemoryExecutor, CoreInputs) {
    open_in_memory(
        config,
        CoreParts {
            nodes: Nodes::Cluster(nodes),
            ..parts(store, NodeInventory::default(), clock)
        },
    )
}

fn one_node_cluster(
    config: &Config,
    clock: &ManualClock,
    store: Box<dyn JobStore>,
    gpus: u32,
) -> (Core, crate::exec::memory::MemoryExecutor, CoreInputs) {
    let (_feed, nodes) = watch::channel(capacity(vec![cluster_node("gpu-1", gpus, true)]));
    open_cluster(config, clock, store, nodes)
}

/// Submits `manifest` and runs a pass; returns the replicas it started.
fn submit_and_pass(
    core: &mut Core,
    executor: &crate::exec::memory::MemoryExecutor,
    manifest: &str,
) -> Vec<crate::exec::LaunchSpec> {
    let mut answer = submit(core, manifest.as_bytes());
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    executor.take().started
}

/// Reports the replicas started and, `seconds` later, succeeded.
fn run_for(
    core: &mut Core,
    executor: &crate::exec::memory::MemoryExecutor,
    inputs: &mut CoreInputs,
    clock: &ManualClock,
    started: &[crate::exec::LaunchSpec],
    seconds: f64,
) {
    for spec in started {
        executor.report(spec, ReplicaEvent::Started { pid: 7 });
        core.replica_report(inputs.replicas.try_recv().expect("reported"));
    }
    core.commit().expect("written");
    clock.advance(seconds);
    for spec in started {
        executor.exited(spec, 0);
        core.replica_report(inputs.replicas.try_recv().expect("reported"));
    }
    core.commit().expect("written");
    for (job, generation, _) in executor.take().stopped {
        core.step(Input::GangStopped { job, generation });
    }
    core.commit().expect("written");
}

fn message(core: &Core, name: &str) -> (JobState, String, String) {
    let status = core.get(name).expect("the job exists");
    (status.state, status.reason, status.message)
}

/// Jobs that declare no run time get one learned from the user's earlier runs of the same job:
/// the blocked head's reservation then says when it starts and where that end came from, a
/// job estimated to end before then backfills, one estimated to end after is kept back and
/// told its estimate, and an estimate that proves too short leaves the reservation with no
/// start time (and nothing more backfills on it), never stops the running job. A core opened again on the same store learns the same from the finished jobs.
#[tokio::test]
async fn run_times_learned_from_finished_jobs_plan_the_reservation_and_backfill() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let store = crate::store::memory::MemoryStore::default();
    let (mut core, executor, mut inputs) =
        one_node_cluster(&config(dir.path()), &clock, Box::new(store.clone()), 8);
    // Five runs each of a 4-GPU job that takes 10 minutes, a 2-GPU one of 100 s and a 2-GPU
    // one of 5,000 s: none declares a run time.
    for i in 1..=5 {
        for (job, gpus, seconds) in [
            ("train", 4, 600.0),
            ("quick", 2, 100.0),
            ("slow", 2, 5000.0),
        ] {
            let name = format!("{job}-{i}");
            let started = submit_and_pass(
                &mut core,
                &executor,
                &sized_job(&name, "fast", 1, gpus, None),
            );
            assert_eq!(started.len(), 1, "{name} starts at once");
            run_for(&mut core, &executor, &mut inputs, &clock, &started, seconds);
            assert_eq!(core.get(&name).expect("exists").state, JobState::Succeeded);
        }
    }

    let train = submit_and_pass(
        &mut core,
        &executor,
        &sized_job("train-6", "fast", 1, 4, None),
    );
    assert_eq!(train.len(), 1);
    for spec in &train {
        executor.report(spec, ReplicaEvent::Started { pid: 8 });
        core.replica_report(inputs.replicas.try_recv().expect("reported"));
    }
    core.commit().expect("written");
    clock.advance(100.0);
    let wide = submit_and_pass(&mut core, &executor, &sized_job("wide", "fast", 1, 8, None));
    assert!(wide.is_empty(), "8 GPUs are not free while train-6 runs");
    let (state, reason, said) = message(&core, "wide");
    assert_eq!(
        (state, reason.as_str()),
        (JobState::Queued, "Unschedulable")
    );
    assert!(
        said.contains("(in 500 s)"),
        "train-6 is 100 s into 600: {said}"
    );
    assert!(
        said.contains(
            "train-6's end is estimated from the p90 of the last 5 finished jobs with user=root,job=train,queue=fast,gpus=4"
        ),
        "{said}"
    );

    // 100 s ends before the reservation's start: it backfills on the reserved GPUs.
    clock.advance(1.0);
    let quick = submit_and_pass(
        &mut core,
        &executor,
        &sized_job("quick-6", "fast", 1, 2, None),
    );
    assert_eq!(quick.len(), 1, "{:?}", message(&core, "quick-6"));
    // 5,000 s would delay the head: kept back, and told why.
    clock.advance(1.0);
    let slow = submit_and_pass(
        &mut core,
        &executor,
        &sized_job("slow-6", "fast", 1, 2, None),
    );
    assert!(slow.is_empty(), "{:?}", message(&core, "wide"));
    let (_, reason, said) = message(&core, "slow-6");
    assert_eq!(reason, "Reserved", "{said}");
    assert!(
        said.contains("its run time is estimated at 1h23m from the p90 of the last 5 finished jobs with user=root,job=slow,queue=fast,gpus=2"),
        "{said}"
    );

    // train-6 runs past its estimate: the reservation no longer has a start time, and says
    // why; the job runs on.
    clock.advance(600.0);
    core.tick();
    core.schedule();
    core.commit().expect("written");
    assert_eq!(
        core.get("train-6").expect("exists").state,
        JobState::Running
    );
    let (_, _, said) = message(&core, "wide");
    assert!(said.contains("no start time is known"), "{said}");
    assert!(
        said.contains("train-6 has run past its estimate (10m00s, from the p90 of the last 5 finished jobs with user=root,job=train,queue=fast,gpus=4), so when it ends is not known"),
        "{said}"
    );
    // Nothing estimated is let onto the reserved GPUs any more.
    clock.advance(1.0);
    let quick = submit_and_pass(
        &mut core,
        &executor,
        &sized_job("quick-7", "fast", 1, 2, None),
    );
    assert!(quick.is_empty(), "{:?}", message(&core, "quick-7"));

    // Opened again on the same store, the core learns from the finished jobs it restores.
    drop(core);
    let (core, _, _) = one_node_cluster(&config(dir.path()), &clock, Box::new(store), 8);
    assert_eq!(
        core.feed.learned_keys(),
        Some(6),
        "per job, per queue and size (two), per queue"
    );
}

/// With `scheduler.estimate_runtimes` off, a job that declares no run time gives its
/// reservation no start time, however many runs of it finished.
#[tokio::test]
async fn without_estimates_a_reservation_on_undeclared_run_times_has_no_start() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let mut config = config(dir.path());
    config.scheduler.estimate_runtimes = false;
    let store = Box::new(crate::store::memory::MemoryStore::default());
    let (mut core, executor, mut inputs) = one_node_cluster(&config, &clock, store, 8);
    for i in 1..=5 {
        let name = format!("train-{i}");
        let started = submit_and_pass(&mut core, &executor, &sized_job(&name, "fast", 1, 4, None));
        run_for(&mut core, &executor, &mut inputs, &clock, &started, 600.0);
    }
    let train = submit_and_pass(
        &mut core,
        &executor,
        &sized_job("train-6", "fast", 1, 4, None),
    );
    assert_eq!(train.len(), 1);
    submit_and_pass(&mut core, &executor, &sized_job("wide", "fast", 1, 8, None));
    let (_, _, said) = message(&core, "wide");
    assert!(said.contains("no start time is known"), "{said}");
    assert!(!said.contains("estimated"), "{said}");
}

/// Where the store keeps a history, a core opened again learns from it: every succeeded job,
/// not only the finished ones it holds in memory (none here).
#[tokio::test]
async fn run_times_are_learned_again_from_the_history() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let mut config = config(dir.path());
    config.jobs.finished_in_memory = 0;
    let open = |config: &Config| {
        let store = crate::store::Store::open(dir.path()).expect("a store");
        one_node_cluster(config, &clock, Box::new(store), 8)
    };
    {
        let (mut core, executor, mut inputs) = open(&config);
        for i in 1..=5 {
            let name = format!("train-{i}");
            let started =
                submit_and_pass(&mut core, &executor, &sized_job(&name, "fast", 1, 4, None));
            run_for(&mut core, &executor, &mut inputs, &clock, &started, 600.0);
        }
        // A failed run says nothing of how long the job takes.
        let started = submit_and_pass(
            &mut core,
            &executor,
            &sized_job("other", "slow", 1, 1, None),
        );
        executor.report(&started[0], ReplicaEvent::Started { pid: 9 });
        core.replica_report(inputs.replicas.try_recv().expect("reported"));
        executor.exited(&started[0], 1);
        core.replica_report(inputs.replicas.try_recv().expect("reported"));
        core.commit().expect("written");
        assert_eq!(core.get("other").expect("exists").state, JobState::Failed);
        assert_eq!(core.feed.learned_keys(), Some(3));
        core.store.close().expect("closed");
    }
    let (core, _, _) = open(&config);
    assert_eq!(core.feed.learned_keys(), Some(3), "from the history");
}

/// Other queues take effect in the running core: a new queue takes jobs at once and is the
/// new default; a removed queue that holds a running job keeps serving it with its last
/// settings, is listed as removed and takes no new job, then goes once the job ends; a removed
/// queue with no job is gone at once.
#[tokio::test]
async fn queues_changed_while_the_core_runs_take_effect_and_lose_no_job() {
    use crate::config::{QueueDefinitions, QueueSettings};
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_000_000.0);
    let store = crate::store::memory::MemoryStore::default();
    let (mut core, executor, mut inputs) =
        one_node_cluster(&config(dir.path()), &clock, Box::new(store), 8);
    let in_slow = submit_and_pass(
        &mut core,
        &executor,
        &sized_job("in-slow", "slow", 2, 1, None),
    );
    assert_eq!(in_slow.len(), 2);

    let settings = |priority, max_gpus| QueueSettings {
        priority,
        weight: false,
        max_running_jobs: None,
        max_gpus,
    };
    let definitions = QueueDefinitions {
        queues: std::collections::BTreeMap::from([("gpu".to_owned(), settings(5, Some(4)))]),
        default_queue: "gpu".to_owned(),
    };
    let replaced = core
        .queues
        .replaced_by(definitions.clone(), "ConfigMap ns/agentd-queues");
    core.set_queues(Arc::new(replaced.clone()));
    assert!(
        core.lifecycle.needs_pass(),
        "the scheduler sees the new limits"
    );
    assert_eq!(core.lifecycle.settings().default_queue, "gpu");
    let listed: Vec<_> = core
        .queue_list()
        .queues
        .into_iter()
        .map(|q| (q.name, q.default, q.removed, q.running, q.priority))
        .collect();
    assert_eq!(
        listed,
        [
            ("gpu".to_owned(), true, false, 0, 5),
            ("slow".to_owned(), false, true, 1, 1),
        ],
        "fast held nothing and is gone; slow serves its job"
    );

    // The new queue takes jobs, within its limit of 4 GPUs; a job without a queue goes to the
    // new default.
    let rules = job::Admission::new(["gpu".to_owned()], "gpu", 100);
    let mut answer = submit_admitted(
        &mut core,
        sized_job("in-gpu", "gpu", 2, 2, None).as_bytes(),
        &rules,
    );
    core.schedule();
    core.commit().expect("written");
    answer.try_recv().expect("answered").expect("accepted");
    assert_eq!(
        executor.take().started.len(),
        2,
        "4 GPUs are within gpu's limit"
    );
    let unnamed = sized_job("unnamed", "gpu", 1, 1, None).replace("  queue: gpu\n", "");
    let mut answer = submit_admitted(&mut core, unnamed.as_bytes(), &rules);
    core.schedule();
    core.commit().expect("written");
    let status = answer.try_recv().expect("answered").expect("accepted");
    assert_eq!(status.queue, "gpu");
    assert!(
        executor.take().started.is_empty(),
        "a fifth GPU exceeds gpu's limit"
    );
    assert_eq!(core.get("unnamed").expect("exists").reason, "QueueLimit");

    // The removed queue takes no new job, even one admitted before it went.
    let mut late = submit(&mut core, sized_job("late", "slow", 1, 0, None).as_bytes());
    core.commit().expect("written");
    match late.try_recv().expect("answered") {
        Err(CoreError::BadField { field, message }) => {
            assert_eq!(field, "spec.queue");
            assert!(message.contains("gpu"), "{message}");
        }
        other => panic!("a job for a removed queue: {other:?}"),
    }

    // Once its job ends, the removed queue is gone.
    run_for(&mut core, &executor, &mut inputs, &clock, &in_slow, 10.0);
    let names: Vec<_> = core
        .queue_list()
        .queues
        .into_iter()
        .map(|q| q.name)
        .collect();
    assert_eq!(names, ["gpu"]);
}
