//! Replicas run as the user who submitted their job: uid, primary gid, supplementary groups,
//! home and user name, with log files that user owns; no manifest field gets a user's replica
//! another identity, root least of all.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Command, Output};
use std::time::Duration;

use e2e::{Agent, AgentOptions};
use serde_json::Value;

use crate::auth::{BOB, ctl_as, users};

fn agent() -> Agent {
    users();
    let agent = Agent::start(AgentOptions {
        config: "[jobs]\nkill_grace = \"2s\"\n".to_owned(),
        ..AgentOptions::default()
    });
    // The test's directory is private; the user needs to reach the socket inside it.
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    agent
}

/// `agentctl submit -` as `user`, with the manifest on stdin.
fn submit_as(agent: &Agent, user: &str, manifest: &str) -> Output {
    ctl_as(agent, user, &["submit", "-"], manifest)
}

fn id(args: &[&str]) -> u32 {
    let out = Command::new("id").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// A one-worker job running `script`, with `extra` YAML lines in its pod spec and container.
fn manifest(name: &str, pod_extra: &str, container_extra: &str, script: &str) -> String {
    format!(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 1\n      restartPolicy: Never\n      template:\n        spec:\n{pod_extra}          containers:\n          - name: tensorflow\n{container_extra}            command: [sh, -c, {script:?}]\n"
    )
}

/// The (real, effective, saved, filesystem) ids on a `Uid:` or `Gid:` line of /proc/PID/status.
fn ids(pid: u64, line: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .unwrap()
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect()
}

#[test]
fn a_users_replica_runs_as_that_user_and_cannot_read_roots_files() {
    let agent = agent();
    let secret = agent.dir.path().join("secret");
    std::fs::write(&secret, "root only").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let script = format!(
        "echo user=$USER logname=$LOGNAME home=$HOME; \
         if cat {} >/dev/null 2>&1; then echo secret=read; else echo secret=denied; fi; sleep 600",
        secret.display()
    );
    let out = submit_as(&agent, BOB, &manifest("bobs", "", "", &script));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = agent.wait_for(&["job", "bobs"], Duration::from_secs(15), |j| {
        j["state"] == "Running"
    });
    let pid = job["replicas"][0]["pid"].as_u64().unwrap();
    let (uid, gid) = (id(&["-u", BOB]), id(&["-g", BOB]));
    assert_eq!(ids(pid, "Uid:"), [uid; 4], "the replica runs as {BOB}");
    assert_eq!(ids(pid, "Gid:"), [gid; 4]);
    let groups = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let groups = groups.lines().find(|l| l.starts_with("Groups:")).unwrap();
    assert!(!groups.split_whitespace().any(|g| g == "0"), "{groups}");
    agent.wait_for(&["job", "bobs"], Duration::from_secs(10), |_| {
        let out = agent.ctl(&["logs", "bobs"]);
        String::from_utf8_lossy(&out.stdout).contains("secret=")
    });
    let text = String::from_utf8_lossy(&agent.ctl(&["logs", "bobs"]).stdout).into_owned();
    assert!(text.contains("secret=denied"), "{text}");
    assert!(
        text.contains(&format!("user={BOB} logname={BOB} home=/home/{BOB}")),
        "{text}"
    );
    let log_file = agent.state_dir.join("logs/bobs/worker-0.log");
    assert_eq!(
        std::fs::metadata(&log_file).unwrap().uid(),
        uid,
        "{BOB} owns the log"
    );
    agent.ctl(&["cancel", "bobs"]);
}

#[test]
fn no_manifest_field_gets_a_users_replica_another_identity() {
    let agent = agent();
    let cases = [
        (
            "as-root",
            "",
            "            securityContext: {runAsUser: 0}\n",
            "containers[0].securityContext.runAsUser",
        ),
        (
            "root-group",
            "          securityContext: {runAsGroup: 0}\n",
            "",
            "template.spec.securityContext.runAsGroup",
        ),
        (
            "someone-else",
            "          securityContext: {runAsUser: 1}\n",
            "",
            "template.spec.securityContext.runAsUser",
        ),
    ];
    for (name, pod, container, field) in cases {
        let out = submit_as(
            &agent,
            BOB,
            &manifest(name, pod, container, "id; sleep 600"),
        );
        if !out.status.success() {
            // Refused at the door is as good, if it names the field.
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("securityContext"), "{name}: {stderr}");
            continue;
        }
        let job: Value = agent.wait_for(&["job", name], Duration::from_secs(15), |j| {
            j["state"] == "Failed" || j["state"] == "Running"
        });
        assert_eq!(job["state"], "Failed", "{name}: {job}");
        assert_eq!(job["reason"], "StartFailed", "{name}: {job}");
        let message = job["message"].as_str().unwrap();
        assert!(message.contains(field), "{name}: {message}");
        assert!(message.contains("only root may"), "{name}: {message}");
    }
}
