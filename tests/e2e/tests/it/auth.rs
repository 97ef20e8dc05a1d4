//! Identities and authorization on the Unix socket: every request has a caller (the peer's
//! uid/gid and user name), jobs record their owner, users act on their own jobs only, members of
//! the admin group and root act on all, and a refusal is a 403 naming the rule.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::sync::Once;
use std::time::Duration;

use e2e::{Agent, AgentOptions, agentctl_bin};
use serde_json::Value;

/// The group whose members may connect to the socket (the agent gives the socket this group).
const SOCKET_GROUP: &str = "agentd";
/// The admin group these tests configure, so that the machine's real `agentd-admin` is untouched.
pub(crate) const ADMIN_GROUP: &str = "agentd-test-admin";
pub(crate) const ALICE: &str = "agentd-test-alice";
pub(crate) const BOB: &str = "agentd-test-bob";
pub(crate) const CAROL: &str = "agentd-test-carol";

/// Creates the test users and groups once (the tests run as root; `useradd` is idempotent here
/// because an existing user or group is accepted).
pub(crate) fn users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for group in [SOCKET_GROUP, ADMIN_GROUP] {
            let status = Command::new("groupadd")
                .args(["-f", group])
                .status()
                .unwrap();
            assert!(status.success(), "groupadd {group}");
        }
        for (user, groups) in [
            (ALICE, SOCKET_GROUP.to_owned()),
            (BOB, SOCKET_GROUP.to_owned()),
            (CAROL, format!("{SOCKET_GROUP},{ADMIN_GROUP}")),
        ] {
            if Command::new("id")
                .arg(user)
                .output()
                .unwrap()
                .status
                .success()
            {
                continue;
            }
            let out = Command::new("useradd")
                .args(["-M", "-s", "/usr/sbin/nologin", "-G", &groups, user])
                .output()
                .unwrap();
            // 9: the user exists (another test created it in the meantime).
            assert!(
                out.status.success() || out.status.code() == Some(9),
                "useradd {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}

pub(crate) fn agent() -> Agent {
    users();
    let agent = Agent::start(AgentOptions {
        config: format!("[api]\nadmin_group = \"{ADMIN_GROUP}\"\n[jobs]\nkill_grace = \"2s\"\n"),
        ..AgentOptions::default()
    });
    // The test's directory is private; other users need to reach the socket inside it.
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    agent
}

/// Runs agentctl as `user` (with that user's groups), feeding `stdin`.
pub(crate) fn ctl_as(agent: &Agent, user: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups"])
        .arg(agentctl_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub(crate) fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The raw HTTP answer (status line and JSON body) to `method path`, sent as `user`.
pub(crate) fn http_as(agent: &Agent, user: &str, method: &str, path: &str) -> (u16, Value) {
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups"])
        .arg("curl")
        .args(["-s", "-w", "\n%{http_code}", "-X", method, "--unix-socket"])
        .arg(&agent.socket)
        .arg(format!("http://agentd{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl printed the status");
    (
        code.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn sleeper(name: &str) -> String {
    format!(
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 1\n      template:\n        spec:\n          containers:\n          - name: tensorflow\n            command: [sh, -c, 'echo hello from {name}; sleep 600']\n"
    )
}

pub(crate) fn uid_of(user: &str) -> u64 {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn jobs_record_their_owner_and_list_by_user() {
    let agent = agent();
    let submitted = ctl_as(
        &agent,
        ALICE,
        &["submit", "-", "-o", "json"],
        &sleeper("a1"),
    );
    let job: Value = serde_json::from_str(&ok(&submitted, "alice submits")).unwrap();
    assert_eq!(job["owner"]["user"], ALICE);
    assert_eq!(job["owner"]["uid"], uid_of(ALICE));
    ok(
        &ctl_as(&agent, BOB, &["submit", "-"], &sleeper("b1")),
        "bob submits",
    );
    ok(
        &agent.ctl_with_stdin(&["submit", "-"], &sleeper("r1")),
        "root submits",
    );

    let mine = agent.ctl_json(&["jobs", "--user", ALICE]);
    let names: Vec<&str> = mine["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a1"]);
    let all = agent.ctl_json(&["jobs"]);
    assert_eq!(all["jobs"].as_array().unwrap().len(), 3);

    let table = ok(&agent.ctl(&["jobs"]), "jobs");
    assert!(table.lines().next().unwrap().contains("OWNER"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("r1") && l.contains("root")),
        "{table}"
    );
    let shown = ok(&agent.ctl(&["job", "b1"]), "job b1");
    assert!(shown.contains(&format!("Owner     {BOB}")), "{shown}");
    let events = agent.ctl_json(&["job", "a1"]);
    assert!(
        has_event(&events, &format!("submitted by {ALICE}")),
        "{events}"
    );
}

#[test]
fn users_act_on_their_own_jobs_admins_on_all() {
    let agent = agent();
    ok(
        &ctl_as(&agent, ALICE, &["submit", "-"], &sleeper("alices")),
        "alice submits",
    );
    ok(
        &ctl_as(&agent, ALICE, &["submit", "-"], &sleeper("alices-2")),
        "alice submits",
    );
    agent.wait_for(&["job", "alices"], Duration::from_secs(30), |j| {
        j["state"] == "Running"
    });

    // Everyone who may connect reads.
    for args in [&["status"][..], &["jobs"], &["job", "alices"], &["queues"]] {
        ok(&ctl_as(&agent, BOB, args, ""), &format!("bob {args:?}"));
    }

    // Bob may not cancel or read the logs of alice's job: 403 naming the rule.
    let denied = ctl_as(&agent, BOB, &["cancel", "alices"], "");
    assert_eq!(denied.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("own-jobs") && stderr.contains(ALICE),
        "{stderr}"
    );
    for (method, path) in [
        ("DELETE", "/v1/jobs/alices"),
        ("GET", "/v1/jobs/alices/logs"),
    ] {
        let (status, body) = http_as(&agent, BOB, method, path);
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        assert_eq!(body["error"]["rule"], "own-jobs", "{body}");
    }
    assert_eq!(agent.ctl_json(&["job", "alices"])["state"], "Running");

    // Alice reads her logs and cancels her own job.
    agent.wait_for(&["job", "alices"], Duration::from_secs(30), |_| {
        let out = ctl_as(&agent, ALICE, &["logs", "alices"], "");
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hello")
    });
    ok(
        &ctl_as(&agent, ALICE, &["cancel", "alices"], ""),
        "alice cancels her job",
    );
    let job = agent.ctl_json(&["job", "alices"]);
    assert_eq!(job["state"], "Cancelled");
    assert!(
        has_event_exactly(&job, &format!("cancelled by {ALICE}")),
        "{job}"
    );

    // A member of the admin group acts on anyone's job.
    let (status, body) = http_as(&agent, CAROL, "GET", "/v1/jobs/alices-2/logs");
    assert_eq!(status, 200, "{body}");
    ok(
        &ctl_as(&agent, CAROL, &["cancel", "alices-2"], ""),
        "the admin cancels alice's job",
    );
    let job = agent.ctl_json(&["job", "alices-2"]);
    assert!(
        has_event_exactly(&job, &format!("cancelled by {CAROL}")),
        "{job}"
    );
    // And root does too (removing the finished job).
    ok(&agent.ctl(&["cancel", "alices-2"]), "root removes it");
}

/// Whether one of the job's events has a message containing `text`.
pub(crate) fn has_event(job: &Value, text: &str) -> bool {
    events(job).any(|m| m.contains(text))
}

/// Whether one of the job's events has exactly `message`.
pub(crate) fn has_event_exactly(job: &Value, message: &str) -> bool {
    events(job).any(|m| m == message)
}

fn events(job: &Value) -> impl Iterator<Item = &str> {
    job["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
}
