//! Real TensorFlow: the shipped examples (a TrainingJob and a Kubeflow TFJob) train a Keras
//! model on two workers with MultiWorkerMirroredStrategy, which only works when both start
//! together and each has the right TF_CONFIG.

use std::path::Path;
use std::process::Command;

use e2e::{Agent, AgentOptions};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The Python environment with tensorflow-cpu, created by the project's script on first use.
fn python_env() -> String {
    let out = Command::new(repo().join("scripts/python-env"))
        .output()
        .expect("scripts/python-env runs");
    assert!(
        out.status.success(),
        "cannot set up TensorFlow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn run_example(agent: &Agent, file: &str, name: &str) {
    let script = repo()
        .join("examples/mnist_multiworker.py")
        .canonicalize()
        .unwrap();
    let manifest = std::fs::read_to_string(repo().join(file))
        .unwrap()
        .replace("examples/mnist_multiworker.py", script.to_str().unwrap());
    let path = agent.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, &manifest).unwrap();
    let out = agent.ctl(&["submit", path.to_str().unwrap(), "--wait"]);
    let logs = |replica: &str| {
        String::from_utf8(agent.ctl(&["logs", name, "--replica", replica]).stdout).unwrap()
    };
    assert!(
        out.status.success(),
        "{file} did not succeed: {}\nworker-0:\n{}\nworker-1:\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs("worker-0"),
        logs("worker-1")
    );
    // Without `successPolicy: AllWorkers` the job succeeds when worker 0 does, and worker 1 may
    // be stopped (cleanPodPolicy) before its last lines: only worker 0 is sure to have finished.
    let all_workers = manifest.contains("successPolicy: AllWorkers");
    for replica in ["worker-0", "worker-1"] {
        let log = logs(replica);
        assert!(
            log.contains(&format!(
                "{replica}: joined a cluster of 2 replica(s) on 2 worker(s)"
            )),
            "{replica} did not train with its peer:\n{log}"
        );
        if replica == "worker-0" || all_workers {
            assert!(log.contains(&format!("{replica}: epoch 3/3")), "{log}");
            assert!(log.contains(&format!("{replica}: done")), "{log}");
        }
    }
    let job = agent.ctl_json(&["job", name]);
    assert_eq!(job["state"], "Succeeded");
    assert_eq!(job["restarts"], 0);
}

#[test]
fn two_worker_mnist_trains_together() {
    let env = python_env();
    let path = format!("{env}/bin:{}", std::env::var("PATH").unwrap_or_default());
    let agent = Agent::start(AgentOptions {
        env: vec![("PATH".into(), path)],
        ..AgentOptions::default()
    });
    run_example(&agent, "examples/mnist-trainingjob.yaml", "mnist");
    run_example(&agent, "examples/mnist-tfjob.yaml", "mnist-tfjob");
}
