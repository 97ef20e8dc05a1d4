//! Training jobs on one machine: validation, TF_CONFIG and GPUs, restart policies, deadlines,
//! cancel, gang restarts, jobs that cannot fit, GPUs failing under a job, and agent crashes.

use std::fmt::Write as _;
use std::time::Duration;

use e2e::{Agent, AgentOptions, fake_gpu, write_fake_gpus};
use serde_json::Value;

pub(crate) const FAST: &str = "[inventory]\ninterval = \"200ms\"\ngpu_recovery_quiet = \"60s\"\n\
                    [jobs]\nrestart_backoff = \"200ms\"\nkill_grace = \"2s\"\n";

pub(crate) fn agent(gpus: u32) -> Agent {
    Agent::start(AgentOptions {
        gpus: (gpus > 0).then(|| (0..gpus).map(fake_gpu).collect()),
        config: FAST.into(),
        ..AgentOptions::default()
    })
}

/// A TrainingJob with the given replica groups, each `(type, replicas, restartPolicy, gpus, script)`.
pub(crate) fn manifest(
    name: &str,
    run_policy: &str,
    groups: &[(&str, u32, &str, u32, &str)],
) -> String {
    let mut text = format!(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  runPolicy: {{{run_policy}}}\n  replicaSpecs:\n"
    );
    for (t, n, policy, gpus, script) in groups {
        let _ = write!(
            text,
            "    {t}:\n      replicas: {n}\n      restartPolicy: {policy}\n      template:\n        spec:\n          containers:\n          - name: tensorflow\n            command: [sh, -c, {script:?}]\n            resources: {{limits: {{nvidia.com/gpu: {gpus}}}}}\n"
        );
    }
    text
}

pub(crate) fn submit(agent: &Agent, manifest: &str) -> std::process::Output {
    let path = agent.dir.path().join(format!("job-{}.yaml", rand_suffix()));
    std::fs::write(&path, manifest).unwrap();
    agent.ctl(&["submit", path.to_str().unwrap()])
}

pub(crate) fn submit_ok(agent: &Agent, manifest: &str) {
    let out = submit(agent, manifest);
    assert!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

pub(crate) fn wait_state(agent: &Agent, name: &str, state: &str, timeout: Duration) -> Value {
    agent.wait_for(&["job", name], timeout, |j| j["state"] == state)
}

pub(crate) fn pid_alive(pid: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// Processes anywhere on the machine whose environment names this job.
pub(crate) fn processes_of(job: &str) -> Vec<u32> {
    let marker = format!("AGENTD_JOB={job}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            (pid_alive(u64::from(pid))
                && environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
            .then_some(pid)
        })
        .collect()
}

pub(crate) fn reasons(job: &Value) -> Vec<String> {
    job["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn validation_errors_name_every_field() {
    let agent = agent(0);
    let bad = "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: Bad_Name}\nspec:\n  replicaSpecs:\n    Worker: {replicas: -1, restartPolicy: Sometimes, template: {spec: {containers: [{name: tensorflow}]}}}\n    Boss: {replicas: 1}\n";
    let out = submit(&agent, bad);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.replicaSpecs.Worker.re"), "{stderr}");

    // Unknown queue: a 400 naming the queues that exist.
    let job = manifest("q", "", &[("Worker", 1, "Never", 0, "true")]).replacen(
        "\nspec:\n",
        "\nspec:\n  queue: gpu\n",
        1,
    );
    let out = submit(&agent, &job);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.queue") && stderr.contains("fast") && stderr.contains("slow"),
        "{stderr}"
    );

    // Every problem at once, through the API's JSON.
    let job = "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: Three_Problems}\nspec:\n  replicaSpecs:\n    Chief: {replicas: 2, template: {spec: {containers: [{name: tensorflow, command: [x]}]}}}\n    Worker: {replicas: 2, template: {spec: {containers: [{name: tensorflow, command: [x], resources: {limits: {cpu: lots}}}]}}}\n";
    let out = submit(&agent, job);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("metadata.name"), "{stderr}");
    assert!(
        stderr.contains("spec.replicaSpecs.Chief.replicas"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.replicaSpecs.Worker.template.spec.containers[0].resources"),
        "{stderr}"
    );

    // A type error is found while reading, and named too.
    let job = manifest("typo", "", &[("Worker", 1, "Sometimes", 0, "true")]);
    let stderr = String::from_utf8_lossy(&submit(&agent, &job).stderr).into_owned();
    assert!(
        stderr.contains("spec.replicaSpecs.Worker.restartPolicy") && stderr.contains("OnFailure"),
        "{stderr}"
    );

    let ok = manifest("dup", "", &[("Worker", 1, "Never", 0, "sleep 5")]);
    submit_ok(&agent, &ok);
    let out = submit(&agent, &ok);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
}

#[test]
fn gang_starts_with_tf_config_gpus_and_identity() {
    let agent = agent(8);
    let dir = agent.dir.path().display().to_string();
    let script = format!("env > {dir}/env-$AGENTD_REPLICA; sleep 1");
    submit_ok(
        &agent,
        &manifest(
            "tf",
            "",
            &[
                ("PS", 1, "Never", 0, &script),
                ("Worker", 2, "Never", 2, &script),
            ],
        ),
    );
    let job = wait_state(&agent, "tf", "Succeeded", Duration::from_secs(20));
    let env = |replica: &str| -> std::collections::BTreeMap<String, String> {
        std::fs::read_to_string(format!("{dir}/env-{replica}"))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect()
    };
    let w1 = env("worker-1");
    let tf: Value = serde_json::from_str(&w1["TF_CONFIG"]).unwrap();
    assert_eq!(
        tf["task"],
        serde_json::json!({"type": "worker", "index": 1})
    );
    assert_eq!(tf["environment"], "cloud");
    assert_eq!(tf["cluster"]["worker"].as_array().unwrap().len(), 2);
    assert_eq!(tf["cluster"]["ps"].as_array().unwrap().len(), 1);
    let ports: std::collections::BTreeSet<&str> = ["ps", "worker"]
        .iter()
        .flat_map(|k| {
            tf["cluster"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
        })
        .collect();
    assert_eq!(ports.len(), 3, "a port each: {ports:?}");
    assert!(ports.iter().all(|p| p.starts_with("localhost:")));
    assert_eq!(w1["AGENTD_JOB"], "tf");
    assert_eq!(w1["AGENTD_REPLICA"], "worker-1");
    let gpus: Vec<&str> = w1["CUDA_VISIBLE_DEVICES"].split(',').collect();
    assert_eq!(gpus.len(), 2);
    assert!(gpus.iter().all(|g| g.starts_with("GPU-")), "{gpus:?}");
    assert_eq!(
        env("ps-0")["CUDA_VISIBLE_DEVICES"],
        "",
        "the PS asked for no GPU and sees none"
    );
    let w0_gpus: Vec<String> = env("worker-0")["CUDA_VISIBLE_DEVICES"]
        .split(',')
        .map(str::to_owned)
        .collect();
    assert!(
        w0_gpus.iter().all(|g| !gpus.contains(&g.as_str())),
        "no GPU shared"
    );
    let replicas = job["replicas"].as_array().unwrap();
    assert_eq!(replicas[1]["name"], "worker-0");
    assert_eq!(replicas[1]["gpus"].as_array().unwrap().len(), 2);
    assert_eq!(replicas[1]["exit_code"], 0);
    assert_eq!(reasons(&job)[..3], ["Submitted", "Placed", "Running"]);

    // The replicas print nothing, so they left no log; agentctl says so.
    let logs = agent.ctl(&["logs", "tf", "--replica", "worker-0"]);
    assert!(logs.status.success());
    assert!(logs.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&logs.stderr).trim(),
        "job tf: no output from worker-0"
    );
    assert!(!agent.state_dir.join("logs/tf").exists());
}

#[test]
fn restart_policies_and_backoff_limit() {
    let agent = agent(0);
    let dir = agent.dir.path().display().to_string();
    // OnFailure: worker-1 fails once, then succeeds; the whole gang restarts once. worker-0
    // takes its time, so that its success never comes before worker-1's first failure.
    let flaky = format!(
        "if [ $AGENTD_REPLICA = worker-1 ] && [ ! -e {dir}/flaky ]; then \
         touch {dir}/flaky; exit 3; fi; sleep 2; exit 0"
    );
    submit_ok(
        &agent,
        &manifest(
            "flaky",
            "backoffLimit: 2",
            &[("Worker", 2, "OnFailure", 0, &flaky)],
        ),
    );
    let job = wait_state(&agent, "flaky", "Succeeded", Duration::from_secs(20));
    assert_eq!(job["restarts"], 1);
    assert_eq!(job["generation"], 2);
    assert!(reasons(&job).contains(&"ReplicaFailed".to_owned()));

    // ExitCode: 1-127 is permanent.
    submit_ok(
        &agent,
        &manifest("perm", "", &[("Worker", 1, "ExitCode", 0, "exit 2")]),
    );
    let job = wait_state(&agent, "perm", "Failed", Duration::from_secs(10));
    assert_eq!(job["restarts"], 0);
    assert!(
        job["message"].as_str().unwrap().contains("exit code 2"),
        "{job}"
    );

    // ExitCode: killed by a signal is retryable, until the backoff limit is spent.
    submit_ok(
        &agent,
        &manifest(
            "sig",
            "backoffLimit: 2",
            // `$$` is Kubernetes' escape for `$`: the shell sees `kill -9 $$`.
            &[("Worker", 1, "ExitCode", 0, "kill -9 $$$$")],
        ),
    );
    let job = wait_state(&agent, "sig", "Failed", Duration::from_secs(20));
    assert_eq!(job["restarts"], 2);
    assert_eq!(job["reason"], "BackoffLimitExceeded");

    // Never: the first failure fails the job.
    submit_ok(
        &agent,
        &manifest(
            "never",
            "backoffLimit: 5",
            &[("Worker", 1, "Never", 0, "exit 130")],
        ),
    );
    let job = wait_state(&agent, "never", "Failed", Duration::from_secs(10));
    assert_eq!(job["restarts"], 0);

    // Always restarts even a clean failure code.
    submit_ok(
        &agent,
        &manifest(
            "always",
            "backoffLimit: 1",
            &[("Worker", 1, "Always", 0, "exit 1")],
        ),
    );
    let job = wait_state(&agent, "always", "Failed", Duration::from_secs(10));
    assert_eq!(job["restarts"], 1);
}

#[test]
fn one_failing_replica_restarts_the_whole_gang() {
    let agent = agent(0);
    let dir = agent.dir.path().display().to_string();
    let script = format!(
        "if [ \"$AGENTD_REPLICA\" = worker-1 ] && [ ! -e {dir}/failed ]; then touch {dir}/failed; sleep 0.5; exit 1; fi; echo $$$$ >> {dir}/pids-$AGENTD_REPLICA; sleep 300"
    );
    submit_ok(
        &agent,
        &manifest(
            "gang",
            "backoffLimit: 3",
            &[("Worker", 2, "OnFailure", 0, &script)],
        ),
    );
    let job = agent.wait_for(&["job", "gang"], Duration::from_secs(20), |j| {
        j["generation"] == 2 && j["state"] == "Running"
    });
    assert_eq!(job["restarts"], 1);
    // Running means started, not that the script has written its pid yet.
    let pids = || -> Vec<u64> {
        std::fs::read_to_string(format!("{dir}/pids-worker-0"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "generation 2 of worker-0 never wrote its pid: {:?}",
            pids()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = pids();
    assert_eq!(first.len(), 2, "worker-0 ran in both generations");
    assert!(
        !pid_alive(first[0]),
        "generation 1 of worker-0 was stopped with the gang"
    );
    assert!(pid_alive(first[1]));

    // Cancel: nothing of the job is left running.
    let out = agent.ctl(&["cancel", "gang"]);
    assert!(out.status.success());
    let job = wait_state(&agent, "gang", "Cancelled", Duration::from_secs(5));
    assert_eq!(job["reason"], "Cancelled");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !processes_of("gang").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "left behind: {:?}",
            processes_of("gang")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A second cancel removes the finished job.
    assert!(agent.ctl(&["cancel", "gang"]).status.success());
    assert_eq!(agent.ctl(&["job", "gang"]).status.code(), Some(1));
}

#[test]
fn deadline_and_schedule_timeout() {
    let agent = agent(8);
    submit_ok(
        &agent,
        &manifest(
            "slow",
            "activeDeadlineSeconds: 1",
            &[("Worker", 1, "OnFailure", 0, "sleep 60")],
        ),
    );
    let job = wait_state(&agent, "slow", "Failed", Duration::from_secs(10));
    assert_eq!(job["reason"], "DeadlineExceeded");

    // 16 GPUs on an 8-GPU machine: it waits with a reason a person can act on, then fails.
    submit_ok(
        &agent,
        &manifest(
            "huge",
            "scheduleTimeoutSeconds: 3",
            &[
                ("Worker", 2, "Never", 8, "true"),
                ("PS", 1, "Never", 1, "true"),
            ],
        ),
    );
    let waiting = agent.wait_for(&["job", "huge"], Duration::from_secs(5), |j| {
        j["reason"] != "Queued"
    });
    assert_eq!(waiting["state"], "Queued");
    let message = waiting["message"].as_str().unwrap();
    assert!(
        message.contains("17") || message.contains("16") || message.contains('8'),
        "{message}"
    );
    let job = wait_state(&agent, "huge", "Failed", Duration::from_secs(10));
    assert_eq!(job["reason"], "ScheduleTimeout");
    assert!(
        job["message"]
            .as_str()
            .unwrap()
            .contains("scheduleTimeoutSeconds (3 s)")
    );
}

#[test]
fn a_gpu_going_bad_restarts_the_gang_on_healthy_gpus() {
    let agent = agent(2);
    submit_ok(
        &agent,
        &manifest(
            "g",
            "backoffLimit: 3",
            &[("Worker", 1, "OnFailure", 1, "sleep 300")],
        ),
    );
    let job = wait_state(&agent, "g", "Running", Duration::from_secs(30));
    let used = job["replicas"][0]["gpu_indices"][0].as_u64().unwrap() as usize;
    let mut gpus: Vec<_> = (0..2).map(fake_gpu).collect();
    gpus[used]["xid_events"] = serde_json::json!([79]);
    write_fake_gpus(&agent.gpu_config, &gpus);
    let job = agent.wait_for(&["job", "g"], Duration::from_secs(30), |j| {
        j["generation"] == 2 && j["state"] == "Running"
    });
    assert_eq!(job["restarts"], 1);
    assert_ne!(
        job["replicas"][0]["gpu_indices"][0].as_u64().unwrap() as usize,
        used
    );
    assert!(reasons(&job).contains(&"GpuUnhealthy".to_owned()), "{job}");

    // The other GPU goes bad too: nothing healthy fits, so the job waits with that reason.
    let other = 1 - used;
    gpus[other]["xid_events"] = serde_json::json!([79]);
    write_fake_gpus(&agent.gpu_config, &gpus);
    let job = agent.wait_for(&["job", "g"], Duration::from_secs(30), |j| {
        j["state"] == "Queued" && j["restarts"] == 2 && j["reason"] != "Requeued"
    });
    assert!(
        job["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("gpu"),
        "{job}"
    );
}

/// The supervisor of the replica `pid` (its parent): the file it runs and its arguments.
fn supervisor_of(pid: u64) -> (std::path::PathBuf, Vec<String>) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The parent is the second field after the command name, which ends with the last ')'.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let parent = after_name.split(' ').nth(1).unwrap();
    let exe = std::fs::read_link(format!("/proc/{parent}/exe")).unwrap();
    let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).unwrap();
    let args = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    (exe, args)
}

/// The pids of a job's replicas, in order.
fn replica_pids(job: &Value) -> Vec<u64> {
    job["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect()
}

#[test]
fn replicas_survive_agent_restarts_and_are_adopted() {
    let mut agent = agent(0);
    let go = agent.dir.path().join("go");
    let script = format!(
        "echo started; while [ ! -e {} ]; do sleep 0.1; done; echo finished",
        go.display()
    );
    submit_ok(
        &agent,
        &manifest(
            "survivor",
            "backoffLimit: 0",
            &[("Worker", 2, "Never", 0, &script)],
        ),
    );
    let job = wait_state(&agent, "survivor", "Running", Duration::from_secs(15));
    let pids = replica_pids(&job);
    assert_eq!(pids.len(), 2);
    // Each replica's supervisor is the small `agentd-shim` installed beside the agent.
    let shim = std::fs::canonicalize(e2e::agentd_bin().with_file_name("agentd-shim")).unwrap();
    for &pid in &pids {
        let (exe, args) = supervisor_of(pid);
        assert_eq!(exe, shim, "{args:?}");
        assert_eq!(args.len(), 2, "{args:?}");
    }
    // A graceful stop (systemctl restart, a package upgrade), then a crash.
    for signal in [15, 9] {
        agent.signal_and_wait(signal, Duration::from_secs(15));
        for &pid in &pids {
            assert!(
                pid_alive(pid),
                "replica {pid} died with the agent (signal {signal})"
            );
        }
        agent.spawn();
        let job = agent.ctl_json(&["job", "survivor"]);
        assert_eq!(job["state"], "Running", "after signal {signal}: {job}");
        assert_eq!(job["restarts"], 0, "{job}");
        assert_eq!(job["generation"], 1, "{job}");
        assert_eq!(replica_pids(&job), pids, "{job}");
        assert!(reasons(&job).contains(&"Adopted".to_owned()), "{job}");
        assert!(
            !reasons(&job).contains(&"AgentRestarted".to_owned()),
            "{job}"
        );
    }
    std::fs::write(&go, "").unwrap();
    // worker-0's real end, seen by the supervisor while two agents came and went, completes
    // the job (worker-1 is then stopped).
    let job = wait_state(&agent, "survivor", "Succeeded", Duration::from_secs(15));
    assert_eq!(job["replicas"][0]["exit_code"], 0, "{job}");
    assert_eq!(job["replicas"][0]["state"], "Succeeded", "{job}");
    for pid in pids {
        for _ in 0..100 {
            if !pid_alive(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!pid_alive(pid), "replica {pid} still runs");
    }
    let logs = agent.ctl(&["logs", "survivor", "--replica", "worker-0"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("started") && text.contains("finished"),
        "{text}"
    );
    assert!(text.contains("ended: exit code 0"), "{text}");
}

#[test]
fn an_agent_with_no_shim_beside_it_supervises_replicas_itself() {
    // A lone agent binary (copied somewhere without `agentd-shim`) runs `agentd shim DIR`.
    let lone = tempfile::tempdir().unwrap();
    let binary = lone.path().join("agentd");
    if std::fs::hard_link(e2e::agentd_bin(), &binary).is_err() {
        std::fs::copy(e2e::agentd_bin(), &binary).unwrap();
    }
    let agent = Agent::start(AgentOptions {
        config: FAST.into(),
        binary: Some(binary.clone()),
        ..AgentOptions::default()
    });
    let go = agent.dir.path().join("go");
    let script = format!("while [ ! -e {} ]; do sleep 0.1; done", go.display());
    submit_ok(
        &agent,
        &manifest(
            "lone",
            "backoffLimit: 0",
            &[("Worker", 1, "Never", 0, &script)],
        ),
    );
    let job = wait_state(&agent, "lone", "Running", Duration::from_secs(15));
    let (exe, args) = supervisor_of(replica_pids(&job)[0]);
    assert_eq!(exe, std::fs::canonicalize(&binary).unwrap(), "{args:?}");
    assert_eq!(args.get(1).map(String::as_str), Some("shim"), "{args:?}");
    std::fs::write(&go, "").unwrap();
    let job = wait_state(&agent, "lone", "Succeeded", Duration::from_secs(15));
    assert_eq!(job["replicas"][0]["exit_code"], 0, "{job}");
}

#[test]
fn a_gang_that_cannot_be_adopted_restarts_uncharged_and_leaves_no_orphans() {
    let mut agent = agent(0);
    submit_ok(
        &agent,
        &manifest(
            "runner",
            "backoffLimit: 0",
            &[("Worker", 2, "OnFailure", 0, "sleep 300 & sleep 300")],
        ),
    );
    // Queued behind a job that can never fit on this machine's CPUs.
    let hog = manifest("waiter", "", &[("Worker", 1, "Never", 0, "true")])
        .replace("nvidia.com/gpu: 0", "cpu: 100000");
    submit_ok(&agent, &hog);
    let job = wait_state(&agent, "runner", "Running", Duration::from_secs(15));
    let old_pids = replica_pids(&job);
    agent.signal_and_wait(9, Duration::from_secs(5));
    // worker-1's supervisor is killed too (the replica dies with it), so nothing says how
    // worker-1 ended: the gang cannot be adopted.
    let record = agent.state_dir.join("replicas/runner/worker-1.1/shim.json");
    let record: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    let shim = record["shim_pid"].as_u64().unwrap();
    std::process::Command::new("kill")
        .args(["-9", &shim.to_string()])
        .status()
        .unwrap();
    // A signal takes a moment to land: the supervisor must be gone before the agent looks.
    for _ in 0..200 {
        if !pid_alive(shim) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!pid_alive(shim), "supervisor {shim} survived kill -9");
    agent.spawn();
    let job = wait_state(&agent, "runner", "Running", Duration::from_secs(15));
    assert_eq!(
        job["restarts"], 0,
        "not charged against backoffLimit 0: {job}"
    );
    assert_eq!(job["generation"], 2, "{job}");
    assert!(
        reasons(&job).contains(&"AgentRestarted".to_owned()),
        "{job}"
    );
    for &pid in &old_pids {
        assert!(
            !pid_alive(pid),
            "replica {pid} of the killed agent is still running"
        );
    }
    // Nothing is left of the old gang's process groups (a replica's children included).
    for pid in processes_of("runner") {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let pgrp: u64 = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or_default();
        assert!(
            !old_pids.contains(&pgrp),
            "process {pid} of the old gang (group {pgrp}) is still running"
        );
    }
    let waiter = agent.ctl_json(&["job", "waiter"]);
    assert_eq!(waiter["state"], "Queued");
}

#[test]
fn stdin_submit_follow_logs_and_ttl_cleanup() {
    let agent = agent(0);
    let job = manifest(
        "chatty",
        "ttlSecondsAfterFinished: 2",
        &[(
            "Worker",
            1,
            "Never",
            0,
            "for i in 1 2 3; do echo line $i; sleep 0.3; done",
        )],
    );
    let mut child = std::process::Command::new(e2e::agentctl_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .args(["submit", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), job.as_bytes()).unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    // Follow returns by itself once the job is over, with every line.
    let follow = agent.ctl(&["logs", "chatty", "--follow"]);
    assert!(follow.status.success());
    let text = String::from_utf8_lossy(&follow.stdout);
    for i in 1..=3 {
        assert!(text.contains(&format!("line {i}")), "{text}");
    }
    assert!(text.contains("ended: exit code 0"), "{text}");
    assert_eq!(agent.ctl_json(&["job", "chatty"])["state"], "Succeeded");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agent.ctl(&["job", "chatty"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the finished job outlived its TTL"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let jobs = agent.ctl_json(&["jobs"]);
    assert_eq!(jobs["jobs"], serde_json::json!([]));
}

#[test]
fn job_metrics_are_exported() {
    let port = e2e::free_port();
    let agent = Agent::start(AgentOptions {
        config: FAST.into(),
        env: vec![("AGENTD_METRICS_ADDR".into(), format!("127.0.0.1:{port}"))],
        ..AgentOptions::default()
    });
    submit_ok(
        &agent,
        &manifest("counted", "", &[("Worker", 2, "Never", 0, "true")]),
    );
    wait_state(&agent, "counted", "Succeeded", Duration::from_secs(10));
    let scrape = || {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text
    };
    let expected = [
        "agentd_job_transitions_total{queue=\"fast\",from=\"None\",to=\"Queued\"} 1",
        "agentd_job_transitions_total{queue=\"fast\",from=\"Queued\",to=\"Placed\"} 1",
        "agentd_job_transitions_total{queue=\"fast\",from=\"Placed\",to=\"Starting\"} 1",
        "agentd_job_transitions_total{queue=\"fast\",from=\"Starting\",to=\"Running\"} 1",
        "agentd_job_transitions_total{queue=\"fast\",from=\"Running\",to=\"Succeeded\"} 1",
        "agentd_api_requests_total{route=\"submit_job\",status=\"201\"} 1",
        "agentd_job_submit_to_running_seconds_count 1",
    ];
    // The job's state is answered at once; the metrics follow when the core's turn is
    // written, a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut text = scrape();
    while expected.iter().any(|l| !text.contains(l)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        text = scrape();
    }
    for line in expected {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains("agentd_scheduling_pass_duration_seconds_count"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("agentd_jobs{") && l.contains("Succeeded")),
        "{text}"
    );
}

#[test]
fn kubernetes_variable_references_expand_in_command_args_and_env() {
    let agent = agent(0);
    let out = agent.dir.path().join("expanded.txt");
    // `$(NAME)` expands from the container's env (a value sees the ones before it), `$$` escapes,
    // an unknown reference stays as written.
    let job = format!(
        r#"apiVersion: kubeflow.org/v1
kind: TFJob
metadata: {{name: expand}}
spec:
  tfReplicaSpecs:
    Worker:
      template:
        spec:
          containers:
          - name: tensorflow
            command: [sh, -c, 'printf "%s|%s|%s|%s\n" "$1" "$2" "$3" "$GREETING_ALL" > "$4"', sh]
            args: ["$(GREETING)", "$$(GREETING)", "$(NOT_SET)", "{}"]
            env:
            - {{name: GREETING, value: hello}}
            - {{name: GREETING_ALL, value: "$(GREETING) world, $$(GREETING)"}}
"#,
        out.display()
    );
    submit_ok(&agent, &job);
    wait_state(&agent, "expand", "Succeeded", Duration::from_secs(30));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "hello|$(GREETING)|$(NOT_SET)|hello world, $(GREETING)\n"
    );
}

#[test]
fn what_can_never_start_is_refused_at_submit() {
    let agent = agent(0);
    for (container, expected) in [
        (
            "{name: tensorflow, command: [no-such-trainer-here]}",
            "is not an executable file in PATH=",
        ),
        (
            "{name: tensorflow, command: [/bin/true], workingDir: /no/such/dir}",
            "the directory /no/such/dir",
        ),
        (
            "{name: tensorflow, command: [/bin/true], envFrom: [{configMapRef: {name: cfg}}]}",
            "envFrom[0]",
        ),
    ] {
        let job = format!(
            "apiVersion: kubeflow.org/v1\nkind: TFJob\nmetadata: {{name: never}}\nspec:\n  tfReplicaSpecs:\n    Worker:\n      template:\n        spec:\n          containers:\n          - {container}\n"
        );
        let out = submit(&agent, &job);
        assert_eq!(out.status.code(), Some(1), "{container}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{container}: {stderr}");
    }
    assert_eq!(agent.ctl_json(&["jobs"])["jobs"], serde_json::json!([]));
}

#[test]
fn hostile_manifests_are_refused_without_holding_up_other_requests() {
    let agent = Agent::start(AgentOptions {
        config: format!("{FAST}max_replicas_per_job = 2\nmax_replicas_per_agent = 3\n"),
        ..AgentOptions::default()
    });
    // Deep nesting: refused by the reader's depth limit, on a thread of its own; a request
    // that the core answers is answered meanwhile.
    let deep = format!("a: {}", "[".repeat(120_000));
    let path = agent.dir.path().join("deep.yaml");
    std::fs::write(&path, &deep).unwrap();
    let socket = agent.socket.clone();
    let submitting = std::thread::spawn(move || {
        std::process::Command::new(e2e::agentctl_bin())
            .arg("--socket")
            .arg(socket)
            .args(["submit", path.to_str().unwrap()])
            .output()
            .unwrap()
    });
    assert_eq!(agent.ctl_json(&["jobs"])["jobs"], serde_json::json!([]));
    let out = submitting.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not valid YAML"), "{stderr}");

    // A billion replicas, and more replicas than the agent holds: refused, naming the setting.
    let huge = manifest("huge", "", &[("Worker", 1_000_000_000, "Never", 0, "true")]);
    let stderr = String::from_utf8_lossy(&submit(&agent, &huge).stderr).into_owned();
    assert!(
        stderr.contains("spec.replicaSpecs.Worker.replicas")
            && stderr.contains("jobs.max_replicas_per_job"),
        "{stderr}"
    );
    submit_ok(
        &agent,
        &manifest("first", "", &[("Worker", 2, "Never", 0, "sleep 30")]),
    );
    let second = manifest("second", "", &[("Worker", 2, "Never", 0, "true")]);
    let stderr = String::from_utf8_lossy(&submit(&agent, &second).stderr).into_owned();
    assert!(stderr.contains("jobs.max_replicas_per_agent"), "{stderr}");
    agent.ctl(&["cancel", "first"]);
    wait_state(&agent, "first", "Cancelled", Duration::from_secs(30));
    submit_ok(&agent, &second);
}
