//! The core driven turn by turn on a clock the test moves.

use super::*;

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

fn open(state_dir: &std::path::Path, clock: &ManualClock) -> Core {
    let config = Config {
        state_dir: state_dir.to_owned(),
        queues: crate::config::default_queues(),
        jobs: crate::config::JobsConfig {
            replica_units: ReplicaUnits::Off,
            ..Default::default()
        },
        ..Config::default()
    };
    let store = crate::store::Store::open(state_dir).expect("a store in a temporary directory");
    let (_, inventory) = watch::channel(Arc::new(NodeInventory::default()));
    let (_, health) = mpsc::unbounded_channel();
    let parts = CoreParts {
        node: "node-a".to_owned(),
        store: Box::new(store),
        inventory,
        health,
        metrics: None,
        clock: Arc::new(clock.clone()),
    };
    let (core, _, _) = Core::open_with(&config, parts, |reports| {
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

/// Submits [`WAITS_FOR_A_GPU`] as root, admitted as the API admits it.
fn submit_waiting(core: &mut Core) {
    let rules = job::Admission::new(
        crate::config::default_queues().into_keys(),
        crate::config::DEFAULT_QUEUE,
        crate::config::DEFAULT_MAX_REPLICAS_PER_JOB,
    );
    let job = job::admit(WAITS_FOR_A_GPU, &rules).expect("a valid manifest");
    let text = String::from_utf8_lossy(WAITS_FOR_A_GPU).into_owned();
    let root = agentd_api::Owner {
        uid: 0,
        gid: 0,
        user: "root".to_owned(),
    };
    let (reply, mut answer) = oneshot::channel();
    core.command(Command::Submit {
        job: Box::new(job),
        manifest: text,
        owner: root,
        reply,
    });
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
