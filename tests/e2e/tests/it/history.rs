//! `agentctl history` and finished jobs that live on disk only: the real agent and CLI.

use std::time::Duration;

use e2e::{Agent, AgentOptions};

use crate::jobs::{FAST, manifest, submit, submit_ok, wait_state};

fn agent_keeping(finished_in_memory: u32) -> Agent {
    Agent::start(AgentOptions {
        config: format!("{FAST}finished_in_memory = {finished_in_memory}\n"),
        ..AgentOptions::default()
    })
}

#[test]
fn history_lists_filters_and_sums_up_finished_jobs_read_from_disk() {
    let mut agent = agent_keeping(1);
    for (name, script) in [("ok-1", "true"), ("bad-1", "exit 3"), ("ok-2", "true")] {
        submit_ok(
            &agent,
            &manifest(
                name,
                "backoffLimit: 0",
                &[("Worker", 2, "Never", 0, script)],
            ),
        );
        let state = if name.starts_with("ok") {
            "Succeeded"
        } else {
            "Failed"
        };
        wait_state(&agent, name, state, Duration::from_secs(30));
    }

    let page = agent.ctl_json(&["history"]);
    let names: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ok-2", "bad-1", "ok-1"], "{page}");
    let bad = &page["jobs"][1];
    assert_eq!(bad["reason"], "ReplicaFailed", "{bad}");
    assert_eq!(bad["replicas"], 2, "{bad}");
    assert!(
        bad["exit_codes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["exit_code"] == 3),
        "{bad}"
    );

    let failed = agent.ctl_json(&["history", "--state", "failed"]);
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 1, "{failed}");
    let prefix = agent.ctl_json(&["history", "--name", "ok-", "--limit", "1"]);
    assert_eq!(prefix["jobs"][0]["name"], "ok-2", "{prefix}");
    let cursor = prefix["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let next = agent.ctl_json(&["history", "--name", "ok-", "--cursor", &cursor]);
    assert_eq!(next["jobs"][0]["name"], "ok-1", "{next}");

    let summary = agent.ctl_json(&["history", "--summary", "queue"]);
    assert_eq!(summary["rows"][0]["key"], "fast", "{summary}");
    assert_eq!(summary["rows"][0]["jobs"], 3, "{summary}");
    assert_eq!(
        summary["rows"][0]["failures"]["ReplicaFailed"], 1,
        "{summary}"
    );

    let csv = agent.ctl(&["history", "-o", "csv"]);
    assert!(csv.status.success());
    let csv = String::from_utf8_lossy(&csv.stdout).into_owned();
    assert!(csv.starts_with("name,user,queue,state,"), "{csv}");
    assert_eq!(csv.lines().count(), 4, "{csv}");
    let bad_time = agent.ctl(&["history", "--since", "yesterday"]);
    assert_eq!(bad_time.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad_time.stderr).contains("--since"),
        "{bad_time:?}"
    );

    // Only the last one finished is in memory; the others answer from disk, after a restart too.
    let listed = agent.ctl_json(&["jobs"]);
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1, "{listed}");
    agent.signal_and_wait(15, Duration::from_secs(10));
    agent.spawn();
    let old = agent.ctl_json(&["job", "ok-1"]);
    assert_eq!(old["state"], "Succeeded", "{old}");
    assert!(!old["events"].as_array().unwrap().is_empty(), "{old}");
    let logs = agent.ctl(&["logs", "bad-1"]);
    assert!(logs.status.success(), "{logs:?}");

    // The name is taken until the job is removed; then it can be used again.
    let again = manifest("ok-1", "", &[("Worker", 1, "Never", 0, "true")]);
    let out = submit(&agent, &again);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    assert!(agent.ctl(&["cancel", "ok-1"]).status.success());
    submit_ok(&agent, &again);
    wait_state(&agent, "ok-1", "Succeeded", Duration::from_secs(30));
    let history = agent.ctl_json(&["history", "--name", "ok-1"]);
    assert_eq!(
        history["jobs"].as_array().unwrap().len(),
        2,
        "both runs of ok-1 are in the history: {history}"
    );
}
