//! The standalone agent: status, the API's error cases, sockets, config errors, shutdown.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use e2e::{Agent, AgentOptions, agentctl_bin, agentd_bin};

/// Sends raw bytes to the socket and returns the status code and the body.
fn raw(agent: &Agent, request: &[u8]) -> (u16, String) {
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may answer and close before it has read everything (413, 405).
    let _ = stream.write_all(request);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

fn error_code(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body}"));
    value["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned()
}

#[test]
fn status_reports_the_host_as_proc_sees_it() {
    let agent = Agent::start(AgentOptions::default());
    let status = agent.ctl_json(&["status"]);
    let node = &status["node"];
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    assert_eq!(node["cpu"]["logical_cores"], cpus);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert_eq!(node["memory"]["total_bytes"], total_kib * 1024);
    assert!(
        node["disks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["mount_point"] == "/")
    );
    assert_eq!(
        node["gpus"],
        serde_json::json!([]),
        "no NVML library means zero GPUs"
    );
    assert_eq!(status["agent"]["mode"], "standalone");
    assert!(
        agent.log().contains("NVML"),
        "one clear log line about NVML:\n{}",
        agent.log()
    );

    let table = agent.ctl(&["status"]);
    assert!(table.status.success());
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(text.starts_with("Node "), "{text}");
    assert!(text.contains("GPUs     none"), "{text}");

    let yaml = agent.ctl(&["node", "-o", "yaml"]);
    assert!(
        String::from_utf8(yaml.stdout)
            .unwrap()
            .contains("logical_cores:")
    );
}

#[test]
fn api_errors_are_json_with_the_right_status() {
    let agent = Agent::start(AgentOptions::default());
    let (code, body) = raw(
        &agent,
        b"GET /v1/nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((code, error_code(&body).as_str()), (404, "not_found"));

    let (code, body) = raw(
        &agent,
        b"DELETE /v1/status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        (code, error_code(&body).as_str()),
        (405, "method_not_allowed")
    );

    let big = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    let (code, body) = raw(&agent, big.as_bytes());
    assert_eq!(
        (code, error_code(&body).as_str()),
        (413, "payload_too_large")
    );

    // A chunked body that grows past the limit without declaring a length.
    let mut chunked =
        b"POST /v1/status HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(&chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (code, _) = raw(&agent, &chunked);
    assert!(code == 413 || code == 405, "oversized chunked body: {code}");

    let (code, body) = raw(
        &agent,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200, "{body}");
    let (code, _) = raw(
        &agent,
        b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(code, 200);

    let (code, _) = raw(&agent, b"BROKEN\r\n\r\n");
    assert_eq!(code, 400, "malformed requests get 400");
    assert!(
        agent.log().contains("uid="),
        "requests are attributed to a uid:\n{}",
        agent.log()
    );
}

#[test]
fn unreachable_agent_exits_3_and_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let out = Command::new(agentctl_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&*socket.to_string_lossy()), "{stderr}");
    assert!(stderr.contains("systemctl start agentd"), "{stderr}");

    let out = Command::new(agentctl_bin())
        .env("AGENTD_SOCKET", &socket)
        .arg("node")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "AGENTD_SOCKET is honoured");

    let out = Command::new(agentctl_bin())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn a_second_agent_on_a_live_socket_exits_with_a_clear_message() {
    let agent = Agent::start(AgentOptions::default());
    let other_state = agent.dir.path().join("other-state");
    let out = Command::new(agentd_bin())
        .arg("--socket")
        .arg(&agent.socket)
        .arg("--state-dir")
        .arg(&other_state)
        .arg("--metrics-addr")
        .arg("off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another agent is already running"),
        "{stderr}"
    );
    // The first agent is unharmed.
    assert!(agent.ctl(&["status"]).status.success());
}

#[test]
fn a_stale_socket_is_replaced_and_sigterm_shuts_down_cleanly() {
    let mut agent = Agent::start(AgentOptions::default());
    // kill -9 leaves the socket file behind.
    let status = agent.signal_and_wait(9, Duration::from_secs(10));
    assert!(!status.success());
    assert!(agent.socket.exists());
    agent.spawn();
    assert!(agent.ctl(&["status"]).status.success());

    let status = agent.signal_and_wait(15, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0:\n{}", agent.log());
    assert!(!agent.socket.exists(), "the socket is removed on shutdown");
    assert!(agent.log().contains("agent stopped"));
}

/// `agentd --config FILE --print-config`.
fn print_config(config: &std::path::Path) -> std::process::Output {
    Command::new(agentd_bin())
        .arg("--config")
        .arg(config)
        .arg("--print-config")
        .output()
        .unwrap()
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, "[inventory]\nintervall = \"5s\"\n").unwrap();
    let out = print_config(&config);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("intervall") && stderr.contains(&*config.to_string_lossy()),
        "{stderr}"
    );

    let out = Command::new(agentd_bin())
        .args(["--metrics-addr", "nowhere", "--print-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics_addr"));

    std::fs::write(&config, "[inventory]\ninterval = \"2s\"\n").unwrap();
    let out = Command::new(agentd_bin())
        .arg("--config")
        .arg(&config)
        .args(["--socket", "/tmp/x.sock", "--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("interval = \"2s\""), "{printed}");
    assert!(printed.contains("socket = \"/tmp/x.sock\""), "{printed}");
}

#[test]
fn unwritable_state_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let out = Command::new(agentd_bin())
        .arg("--state-dir")
        .arg(file.join("state"))
        .arg("--socket")
        .arg(dir.path().join("a.sock"))
        .args(["--metrics-addr", "off"])
        .env("AGENTD_NVML_LIBRARY", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not-a-dir/state"), "{stderr}");
    assert!(
        !dir.path().join("a.sock").exists(),
        "no socket is left behind"
    );
}

#[test]
fn replica_units_on_without_systemd_is_refused() {
    // This machine runs no systemd: "on" cannot be honoured, and silently running replicas
    // without their cgroup limits would be worse than not starting.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentd.toml");
    std::fs::write(&config, "[jobs]\nreplica_units = \"on\"\n").unwrap();
    let out = Command::new(agentd_bin())
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("a.sock"))
        .args(["--metrics-addr", "off"])
        .env("AGENTD_NVML_LIBRARY", "/nonexistent")
        .env_remove("INVOCATION_ID")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("jobs.replica_units") && stderr.contains("\"auto\" or \"off\""),
        "{stderr}"
    );

    std::fs::write(&config, "[jobs]\nreplica_units = \"sometimes\"\n").unwrap();
    let out = print_config(&config);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sometimes") && stderr.contains("auto"),
        "{stderr}"
    );
}
