//! Promises of the job lifecycle: GPUs are never given twice, one fault is one restart, a
//! failed write starts nothing, and what a person is told is what happened.

use std::time::Duration;

use e2e::{fake_gpu, write_fake_gpus};
use serde_json::Value;

use crate::jobs::{agent, manifest, pid_alive, submit_ok, wait_state};

fn replica<'a>(job: &'a Value, name: &str) -> &'a Value {
    job["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap()
}

/// Waits until the scheduler has looked at a queued job (it carries a reason of its own).
fn wait_considered(agent: &e2e::Agent, name: &str) -> Value {
    agent.wait_for(&["job", name], Duration::from_secs(20), |j| {
        j["state"] == "Queued" && j["reason"] != "Queued" && j["reason"] != "Requeued"
    })
}

#[test]
fn a_replica_left_running_keeps_its_gpus_and_can_be_stopped() {
    let agent = agent(2);
    submit_ok(
        &agent,
        &manifest(
            "keep",
            "cleanPodPolicy: None",
            &[
                ("PS", 1, "Never", 2, "sleep 300"),
                ("Worker", 1, "Never", 0, "sleep 0.5"),
            ],
        ),
    );
    let job = wait_state(&agent, "keep", "Succeeded", Duration::from_secs(20));
    let ps = replica(&job, "ps-0");
    assert_eq!(ps["state"], "Running", "{job}");
    let pid = ps["pid"].as_u64().unwrap();
    assert!(pid_alive(pid));

    // The PS still holds both GPUs: a job that needs one waits.
    submit_ok(
        &agent,
        &manifest("next", "", &[("Worker", 1, "Never", 1, "sleep 300")]),
    );
    let next = wait_considered(&agent, "next");
    assert!(
        next["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("gpu"),
        "{next}"
    );

    // Cancel stops what was left running; the job stays until it is gone.
    let out = agent.ctl(&["cancel", "keep"]);
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("stopping 1 replica left running"), "{said}");
    wait_state(&agent, "next", "Running", Duration::from_secs(20));
    assert!(!pid_alive(pid), "the PS was not stopped");

    let out = agent.ctl(&["cancel", "keep"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("job keep (Succeeded) removed"), "{said}");
    assert!(!agent.ctl(&["job", "keep"]).status.success());
}

#[test]
fn a_replica_left_running_frees_its_gpus_when_it_ends() {
    let agent = agent(1);
    let dir = agent.dir.path().display().to_string();
    // The PS runs until the test lets it end.
    let ps = format!("while [ ! -e {dir}/end ]; do sleep 0.05; done");
    submit_ok(
        &agent,
        &manifest(
            "keep",
            "cleanPodPolicy: None",
            &[
                ("PS", 1, "Never", 1, &ps),
                ("Worker", 1, "Never", 0, "true"),
            ],
        ),
    );
    wait_state(&agent, "keep", "Succeeded", Duration::from_secs(20));
    submit_ok(
        &agent,
        &manifest("next", "", &[("Worker", 1, "Never", 1, "sleep 300")]),
    );
    wait_considered(&agent, "next");
    std::fs::write(format!("{dir}/end"), "").unwrap();
    wait_state(&agent, "next", "Running", Duration::from_secs(20));
    let keep = agent.ctl_json(&["job", "keep"]);
    assert_eq!(replica(&keep, "ps-0")["state"], "Succeeded", "{keep}");
}

#[test]
fn one_bad_gpu_is_one_restart_for_a_job_that_then_waits() {
    let agent = agent(4);
    submit_ok(
        &agent,
        &manifest("big", "", &[("Worker", 1, "Never", 3, "sleep 300")]),
    );
    wait_state(&agent, "big", "Running", Duration::from_secs(20));
    submit_ok(
        &agent,
        &manifest(
            "small",
            "backoffLimit: 3",
            &[("Worker", 1, "OnFailure", 1, "sleep 300")],
        ),
    );
    let job = wait_state(&agent, "small", "Running", Duration::from_secs(20));
    let used = job["replicas"][0]["gpu_indices"][0].as_u64().unwrap() as usize;
    let mut gpus: Vec<_> = (0..4).map(fake_gpu).collect();
    gpus[used]["xid_events"] = serde_json::json!([79]);
    write_fake_gpus(&agent.gpu_config, &gpus);

    let job = wait_considered(&agent, "small");
    assert_eq!(job["restarts"], 1, "{job}");
    // Many inventory refreshes later (every 200 ms), it still waits, charged once.
    let seen = agent.ctl_json(&["status"])["node"]["sampled_at"]
        .as_f64()
        .unwrap();
    agent.wait_for(&["status"], Duration::from_secs(20), |s| {
        s["node"]["sampled_at"].as_f64().unwrap() > seen + 2.0
    });
    let job = agent.ctl_json(&["job", "small"]);
    assert_eq!(job["state"], "Queued", "{job}");
    assert_eq!(job["restarts"], 1, "{job}");
}

#[test]
fn cancel_twice_says_what_the_second_one_did() {
    let agent = agent(0);
    submit_ok(
        &agent,
        &manifest("twice", "", &[("Worker", 1, "Never", 0, "sleep 300")]),
    );
    wait_state(&agent, "twice", "Running", Duration::from_secs(20));
    // Logs are the replica's own output: a structured format is a usage error, not ignored.
    let out = agent.ctl(&["logs", "twice", "-o", "json"]);
    assert_eq!(out.status.code(), Some(2));
    let first = agent.ctl(&["cancel", "twice"]);
    assert!(first.status.success());
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(said.contains("job twice cancelled"), "{said}");
    let second = agent.ctl(&["cancel", "twice"]);
    assert!(second.status.success());
    let said = String::from_utf8_lossy(&second.stdout);
    assert!(!said.contains("cancelled;"), "{said}");
    assert!(
        said.contains("removed") || said.contains("as soon as its replicas have stopped"),
        "{said}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while agent.ctl(&["job", "twice"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "never removed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A small tmpfs, unmounted when dropped (after the agent that uses it).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test needs root to mount a small tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    /// Fills the disk with one file until it is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write as _;
        let path = self.dir.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "{e}");
                    break;
                }
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_disk_refuses_with_the_cause_and_starts_nothing() {
    let disk = SmallDisk::mount("8m");
    let state = disk.dir.path().join("state");
    let port = e2e::free_port();
    let agent = e2e::Agent::start(e2e::AgentOptions {
        config: crate::jobs::FAST.into(),
        state_dir: Some(state.clone()),
        env: vec![("AGENTD_METRICS_ADDR".into(), format!("127.0.0.1:{port}"))],
        ..e2e::AgentOptions::default()
    });
    let schedulable = || {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text.lines()
            .find(|l| l.starts_with("agentd_node_schedulable{"))
            .map(|l| l.ends_with(" 1"))
    };
    submit_ok(
        &agent,
        &manifest("before", "", &[("Worker", 1, "Never", 0, "sleep 300")]),
    );
    wait_state(&agent, "before", "Running", Duration::from_secs(20));

    let filler = disk.fill();
    // A name of this run only: processes are looked for machine-wide.
    let during = format!("during-{}", std::process::id());
    let job = manifest(&during, "", &[("Worker", 1, "Never", 0, "sleep 300")]);
    let out = crate::jobs::submit(&agent, &job);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("full"), "{said}");
    assert!(
        said.contains(&state.join("agentd.db").display().to_string()),
        "{said}"
    );
    assert!(!agent.ctl(&["job", &during]).status.success());
    assert!(crate::jobs::processes_of(&during).is_empty());
    assert_eq!(
        schedulable(),
        Some(false),
        "nothing can be placed meanwhile"
    );

    // Space again: the same submission is taken (not "already exists") and runs.
    std::fs::remove_file(filler).unwrap();
    submit_ok(&agent, &job);
    wait_state(&agent, &during, "Running", Duration::from_secs(20));
    assert_eq!(schedulable(), Some(true));
    drop(agent);
}

/// Sends raw bytes to the agent's socket, shuts down the writing side, reads the answer.
fn raw_request(agent: &e2e::Agent, request: &[u8]) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn a_client_that_half_closes_gets_its_answer() {
    let agent = agent(0);
    let job = manifest("half", "", &[("Worker", 1, "Never", 0, "true")]);
    let request = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: agentd\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\n\r\n{job}",
        job.len()
    );
    let answer = raw_request(&agent, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer:?}");
    assert!(agent.ctl(&["job", "half"]).status.success());
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("request") && l.contains("peer") && l.contains("pid ")),
        "every request is logged with its caller:\n{log}"
    );

    let answer = raw_request(&agent, b"PUT /v1/jobs HTTP/1.1\r\nHost: agentd\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer:?}");
    assert!(
        answer.to_lowercase().contains("\r\nallow: get, post\r\n"),
        "{answer:?}"
    );
}

#[test]
fn following_a_log_across_rotation_loses_nothing() {
    let agent = e2e::Agent::start(e2e::AgentOptions {
        config: format!("{}log_max_bytes = 16384\n", crate::jobs::FAST),
        ..e2e::AgentOptions::default()
    });
    // Bursts of 1000 numbered lines (about 5 KB), each rotating the log about once.
    let script =
        "for b in 0 1 2 3 4 5 6 7 8 9; do seq $((b*1000+1)) $((b*1000+1000)); sleep 0.4; done";
    submit_ok(
        &agent,
        &manifest("chatty", "", &[("Worker", 1, "Never", 0, script)]),
    );
    let follow = agent.ctl(&["logs", "chatty", "--follow"]);
    assert!(follow.status.success());
    let text = String::from_utf8_lossy(&follow.stdout);
    let numbers: Vec<u32> = text
        .lines()
        .filter(|l| !l.starts_with("---"))
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("a spliced line: {l:?}"))
        })
        .collect();
    assert_eq!(numbers, (1..=10_000).collect::<Vec<u32>>());
}

#[test]
fn submit_wait_reports_the_end_of_a_job_removed_at_once() {
    let agent = agent(0);
    for (i, (script, code)) in [("sleep 0.3", 0), ("sleep 0.3; exit 3", 1)]
        .into_iter()
        .enumerate()
    {
        let name = format!("gone-{i}");
        let job = manifest(
            &name,
            "ttlSecondsAfterFinished: 0",
            &[("Worker", 1, "Never", 0, script)],
        );
        let path = agent.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, job).unwrap();
        let out = agent.ctl(&["submit", path.to_str().unwrap(), "--wait"]);
        let said = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(code), "{said}");
        let state = if code == 0 { "Succeeded" } else { "Failed" };
        assert!(said.contains(&format!("job {name}: {state}")), "{said}");
    }
}

#[test]
fn an_unreadable_stored_job_is_kept_failed_and_its_replicas_stopped() {
    let mut agent = agent(0);
    submit_ok(
        &agent,
        &manifest("broken", "", &[("Worker", 1, "Never", 0, "sleep 300")]),
    );
    let job = wait_state(&agent, "broken", "Running", Duration::from_secs(20));
    let pid = job["replicas"][0]["pid"].as_u64().unwrap();
    agent.signal_and_wait(9, Duration::from_secs(5));
    // The status is still JSON, but no longer a status this agent can read.
    let db = rusqlite::Connection::open(agent.state_dir.join("agentd.db")).unwrap();
    db.execute(
        "UPDATE jobs SET status = json_set(status, '$.state', 'Exploded') WHERE name = 'broken'",
        [],
    )
    .unwrap();
    drop(db);
    agent.spawn();
    let job = agent.ctl_json(&["job", "broken"]);
    assert_eq!(job["state"], "Failed", "{job}");
    assert_eq!(job["reason"], "Unreadable", "{job}");
    assert!(
        job["message"].as_str().unwrap().contains("unreadable"),
        "{job}"
    );
    assert!(
        !pid_alive(pid),
        "the replica of the unreadable job still runs"
    );
}
