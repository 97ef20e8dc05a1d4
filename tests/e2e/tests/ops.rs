//! Operating agentd with the real tools an operator uses: Prometheus and promtool scrape and
//! query the metrics, systemd-analyze checks the units, dpkg installs and removes the package,
//! lintian judges it.
//!
//! Each tool comes from its Debian package, installed here when missing. A test is skipped (with
//! the reason printed) only when that package cannot be installed at all, and never under CI
//! (`CI` set), where a missing tool fails the test.

// The values compared are small integers and exact decimal fractions set by the test itself,
// which survive the trip through Prometheus exactly.
#![allow(clippy::float_cmp)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd::metrics::{Metrics, NodeAllocation, serve_metrics_on};
use agentd::sched::Resources;
use agentd_api::inventory::{EccErrors, XidCount};
use agentd_api::{GpuDriver, GpuInfo, NodeInventory};
use prometheus_client::registry::Registry;

// ---------------------------------------------------------------------------------------------
// Helpers.

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Makes sure `program` exists, installing Debian package `package` if it does not. Returns
/// false (after saying why) only when the package cannot be installed.
fn ensure_tool(program: &str, package: &str) -> bool {
    let found = |p: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {p}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found(program) {
        return true;
    }
    eprintln!("{program} is missing; installing Debian package {package}");
    let install = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "(apt-get install -y --no-install-recommends {package} || \
              (apt-get update -qq && apt-get install -y --no-install-recommends {package})) >/dev/null 2>&1"
        ))
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if install.is_ok_and(|s| s.success()) && found(program) {
        return true;
    }
    // CI installs every tool first (scripts/test-deps): there, a tool missing is a broken
    // install step, not a reason to skip.
    assert!(
        std::env::var_os("CI").is_none(),
        "Debian package {package} (for {program}) cannot be installed, and CI needs it"
    );
    eprintln!("SKIP: Debian package {package} (for {program}) cannot be installed on this machine");
    false
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A plain HTTP/1.1 GET; returns (status, body). Enough for /metrics and Prometheus's API.
fn http_get(addr: SocketAddr, path_and_query: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Kills a child process when dropped, so a failing assertion leaves nothing running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node with `n` fake H200s whose values are easy to recognise in a query.
fn fake_inventory(n: u32) -> NodeInventory {
    let gpus = (0..n)
        .map(|i| GpuInfo {
            index: i,
            uuid: format!("GPU-fa4e0000-0000-4000-8000-{i:012}"),
            name: "NVIDIA H200".into(),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i),
            minor_number: Some(i),
            memory_total_bytes: 150_754_820_096,
            memory_used_bytes: 1_048_576 * u64::from(100 + i),
            utilization_gpu_percent: 10 * (i % 10),
            utilization_memory_percent: 5,
            temperature_celsius: Some(40 + i),
            power_usage_watts: Some(100.0 + f64::from(i)),
            power_limit_watts: Some(700.0),
            energy_joules: Some(1_000_000.0 + f64::from(i)),
            ecc_errors: Some(EccErrors {
                corrected: u64::from(i),
                uncorrected: 0,
            }),
            xid_errors: if i == 5 {
                vec![XidCount { xid: 79, count: 2 }]
            } else {
                Vec::new()
            },
            healthy: i != 5,
            health_reason: (i == 5).then(|| "XID 79: GPU has fallen off the bus".into()),
        })
        .collect();
    NodeInventory {
        name: "e2e-node".into(),
        hostname: "e2e-node".into(),
        gpu_driver: Some(GpuDriver {
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
            nvml_library: "fake".into(),
        }),
        gpus,
        sampled_at: 1_764_000_000.0,
        ..NodeInventory::default()
    }
}

/// A metrics server fed a fake inventory and some core-loop events, on a free port; it runs on
/// its own runtime until the returned guard is dropped.
struct FakeAgentMetrics {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
    _thread: std::thread::JoinHandle<()>,
}

fn start_metrics_server(gpus: u32) -> FakeAgentMetrics {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.observe_inventory(&fake_inventory(gpus));
    metrics.set_up(true);
    metrics.set_jobs([
        ("fast", "Running", 2),
        ("fast", "Queued", 1),
        ("slow", "Succeeded", 4),
    ]);
    metrics.set_queue_depth("fast", 1);
    metrics.set_queue_depth("slow", 0);
    metrics.set_queue_overdue("fast", 0);
    metrics.set_node_allocations([(
        "e2e-node",
        NodeAllocation {
            capacity: Resources {
                gpus,
                cpu_milli: 64_000,
                memory_mib: 512 * 1024,
            },
            allocated: Resources {
                gpus: 2,
                cpu_milli: 8_000,
                memory_mib: 64 * 1024,
            },
            schedulable: true,
        },
    )]);
    metrics.job_state_changed("fast", "Queued", "Placed");
    let finished: agentd_api::jobs::JobStatus = serde_json::from_value(serde_json::json!({
        "name": "done", "kind": "TrainingJob", "queue": "fast", "priority": 0,
        "state": "Failed", "reason": "BackoffLimitExceeded", "message": "m",
        "submitted_at": 1.0, "started_at": 2.0, "finished_at": 12.5, "restarts": 3,
        "backoff_limit": 3, "generation": 4,
        "owner": {"uid": 1000, "gid": 1000, "user": "alice"},
        "replicas": [{"name": "worker-0", "type": "worker", "index": 0, "state": "Failed",
                      "node": "e2e-node", "gpus": [], "gpu_indices": [0, 1], "address": null,
                      "pid": null, "exit_code": 1, "signal": null, "started_at": 2.0,
                      "finished_at": 12.5}]
    }))
    .unwrap();
    metrics.job_finished(&finished);
    metrics.gang_restarted("OOMKilled");
    metrics.scheduling_pass(Duration::from_micros(420));
    metrics.submit_to_running(Duration::from_secs(2));
    metrics.api_request("/v1/jobs", 201);
    let registry = Arc::new(registry);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            serve_metrics_on(listener, registry, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    FakeAgentMetrics {
        addr,
        _stop: stop,
        _thread: thread,
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics.

#[test]
fn a_scrape_passes_promtool_check_metrics_with_no_findings() {
    if !ensure_tool("promtool", "prometheus") {
        return;
    }
    let server = start_metrics_server(8);
    let (status, body) = http_get(server.addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("agentd_gpu_utilization_ratio{gpu=\"7\""),
        "{body}"
    );
    assert!(
        body.contains(
            "agentd_jobs_finished_total{queue=\"fast\",reason=\"BackoffLimitExceeded\"} 1"
        ),
        "{body}"
    );
    assert!(
        body.contains("agentd_job_gpu_seconds_total{queue=\"fast\",user=\"alice\"} 21"),
        "{body}"
    );

    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let findings = text(&out);
    println!(
        "promtool check metrics: {} bytes, {} lines; findings: {findings:?}",
        body.len(),
        body.lines().count()
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{findings}"
    );
    assert!(
        findings.trim().is_empty(),
        "promtool check metrics has findings:\n{findings}"
    );
}

/// Starts Debian's Prometheus scraping `target` every second, with the agent's alert rules
/// loaded; returns it with its address once it is ready.
fn start_prometheus(target: SocketAddr, dir: &Path) -> (Running, SocketAddr) {
    let rules = repo_root().join("packaging/prometheus/agentd-alerts.yml");
    let config = dir.join("prometheus.yml");
    fs_write(
        &config,
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: agentd\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
             static_configs:\n      - targets: ['{target}']\n",
            rules.display()
        ),
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", e2e::free_port()).parse().unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start prometheus");
    let mut prometheus = Running(child);
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        if let Ok((200, _)) = http_get(addr, "/-/ready") {
            break;
        }
        if let Ok(Some(status)) = prometheus.0.try_wait() {
            let mut stderr = String::new();
            prometheus
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            panic!("prometheus exited with {status}:\n{stderr}");
        }
        assert!(
            Instant::now() < deadline,
            "prometheus not ready on {addr} after 60s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (prometheus, addr)
}

fn fs_write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Queries Prometheus until `query` returns exactly one sample, and returns its value.
fn query_value(prometheus: SocketAddr, query: &str, deadline: Instant) -> f64 {
    let path = format!("/api/v1/query?query={}", percent_encode(query));
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok((200, body)) = http_get(prometheus, &path) {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            let result = &json["data"]["result"];
            if let Some([sample]) = result.as_array().map(Vec::as_slice) {
                return sample["value"][1].as_str().unwrap().parse().unwrap();
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("no single sample for {query} in time; last answer: {last}");
}

#[test]
fn real_prometheus_scrapes_the_metrics_and_answers_queries_about_gpus() {
    if !ensure_tool("prometheus", "prometheus") {
        return;
    }
    let started = Instant::now();
    let server = start_metrics_server(8);
    let dir = tempfile::tempdir().unwrap();
    let (_prometheus, prometheus) = start_prometheus(server.addr, dir.path());
    let deadline = Instant::now() + Duration::from_mins(1);

    assert_eq!(
        query_value(prometheus, r#"up{job="agentd"}"#, deadline),
        1.0
    );
    assert_eq!(query_value(prometheus, "agentd_up", deadline), 1.0);
    let uuid = "GPU-fa4e0000-0000-4000-8000-000000000003";
    assert_eq!(
        query_value(
            prometheus,
            &format!(r#"agentd_gpu_temperature_celsius{{uuid="{uuid}"}}"#),
            deadline
        ),
        43.0
    );
    assert!(
        (query_value(
            prometheus,
            r#"agentd_gpu_utilization_ratio{gpu="3"}"#,
            deadline
        ) - 0.3)
            .abs()
            < 1e-9
    );
    assert_eq!(
        query_value(
            prometheus,
            r#"agentd_gpu_xid_errors_total{gpu="5",xid="79"}"#,
            deadline
        ),
        2.0
    );
    assert_eq!(
        query_value(prometheus, "sum(agentd_gpu_healthy)", deadline),
        7.0
    );
    assert_eq!(
        query_value(
            prometheus,
            r#"agentd_jobs{queue="fast",state="Running"}"#,
            deadline
        ),
        2.0
    );
    // The scrape came in the OpenMetrics form (Prometheus asks for it first): the histogram
    // and counters were understood, not taken as untyped samples.
    assert_eq!(
        query_value(
            prometheus,
            "agentd_job_submit_to_running_seconds_count",
            deadline
        ),
        1.0
    );
    // The GPU-unhealthy alert rule sees GPU 5 (pending: its `for:` has not passed yet).
    assert_eq!(
        query_value(
            prometheus,
            r#"count(ALERTS{alertname="AgentdGpuUnhealthy",gpu="5"})"#,
            deadline
        ),
        1.0
    );
    println!(
        "prometheus scrape and queries took {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Alert rules.

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    if !ensure_tool("promtool", "prometheus") {
        return;
    }
    let dir = repo_root().join("packaging/prometheus");
    for args in [
        vec![
            "check",
            "rules",
            "--lint=all",
            "--lint-fatal",
            "agentd-alerts.yml",
        ],
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "tests/agentd-alerts.test.yml"],
    ] {
        let out = run(Command::new("promtool").args(&args).current_dir(&dir));
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}",
            text(&out)
        );
    }
    // The scrape snippet is the config above minus the wrapper; it must stay valid on its own.
    let snippet = std::fs::read_to_string(dir.join("agentd-scrape.yml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let wrapped = format!("scrape_configs:\n{}", indent(&snippet, "  "));
    fs_write(&tmp.path().join("p.yml"), &wrapped);
    let out = run(Command::new("promtool")
        .args(["check", "config", "p.yml"])
        .current_dir(tmp.path()));
    assert!(
        out.status.success(),
        "agentd-scrape.yml is not a valid scrape config:\n{}",
        text(&out)
    );
}

fn indent(s: &str, prefix: &str) -> String {
    let mut out = String::new();
    for line in s.lines() {
        out.push_str(prefix);
        out.push_str(line);
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// systemd units.

/// Copies the units into `dir`, with ExecStart pointing at `binary` (verify insists that the
/// program exists, and /usr/bin/agentd exists only once the package is installed).
fn units_for_verify(dir: &Path, binary: &Path) -> (PathBuf, PathBuf) {
    let units = repo_root().join("systemd");
    let service = std::fs::read_to_string(units.join("agentd.service")).unwrap();
    assert!(
        service.contains("ExecStart=/usr/bin/agentd "),
        "ExecStart moved; update this test"
    );
    let service = service.replace(
        "ExecStart=/usr/bin/agentd ",
        &format!("ExecStart={} ", binary.display()),
    );
    let (s, k) = (dir.join("agentd.service"), dir.join("agentd.socket"));
    fs_write(&s, &service);
    std::fs::copy(units.join("agentd.socket"), &k).unwrap();
    (s, k)
}

#[test]
fn systemd_units_pass_verify() {
    if !ensure_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (service, socket) = units_for_verify(dir.path(), &e2e::agentd_bin());
    // The man page exists only once the package is installed; the package test checks it.
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .arg(&service)
        .arg(&socket));
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        text(&out)
    );
}

#[test]
fn the_service_sandbox_rates_exposure_at_4_or_lower() {
    if !ensure_tool("systemd-analyze", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (service, _) = units_for_verify(dir.path(), &e2e::agentd_bin());
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&service));
    let report = text(&out);
    let exposure: f64 = report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for agentd.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    println!("systemd-analyze security --offline=true: exposure {exposure}");
    assert!(exposure <= 4.0, "exposure {exposure} > 4.0:\n{report}");
    // The settings the issue names are in force, not merely written.
    for line in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DevicePolicy=closed",
        "Type=notify",
        "KillMode=control-group",
    ] {
        assert!(
            std::fs::read_to_string(&service).unwrap().contains(line),
            "{line} missing from agentd.service"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The Debian package.

/// An exclusive lock on a machine-wide file, held until the returned file is dropped: installing
/// the package changes /usr/bin and /etc, so two test runs on one machine must take turns.
fn machine_lock(name: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("agentd-e2e-{name}.lock"));
    let file = std::fs::File::create(&path).unwrap();
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    file
}

/// Purges the package when dropped, so a failed assertion leaves the machine as it was.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "agentd"]).output();
    }
}

fn dpkg_status(package: &str) -> String {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", package]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn the_deb_installs_runs_and_removes_cleanly_and_lintian_finds_no_errors() {
    if !ensure_tool("dpkg-deb", "dpkg") || !ensure_tool("lintian", "lintian") {
        return;
    }
    let _lock = machine_lock("deb");
    let started = Instant::now();
    // The package is made from the binaries this test run already built: a second, release,
    // build would take longer than every other test together on a small machine.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    e2e::build_binaries();
    let build = run(Command::new(repo_root().join("packaging/build-deb"))
        .arg("--no-build")
        .env("AGENTD_DEB_PROFILE", profile));
    assert!(
        build.status.success(),
        "packaging/build-deb failed:\n{}",
        text(&build)
    );
    let deb = PathBuf::from(
        String::from_utf8_lossy(&build.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    );
    assert!(
        deb.exists(),
        "no package at {}:\n{}",
        deb.display(),
        text(&build)
    );
    let built = started.elapsed();

    let lint = run(Command::new("lintian")
        .args(["--fail-on", "error", "--tag-display-limit", "0"])
        .arg(&deb));
    let findings = text(&lint);
    println!("lintian findings:\n{findings}");
    assert!(
        lint.status.success() && !findings.lines().any(|l| l.starts_with("E: ")),
        "lintian errors:\n{findings}"
    );

    let _ = Command::new("dpkg").args(["--purge", "agentd"]).output();
    let installed = Installed;
    let install = run(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(
        install.status.success(),
        "dpkg -i failed:\n{}",
        text(&install)
    );
    assert_eq!(dpkg_status("agentd"), "ii");

    for path in [
        "/usr/bin/agentd",
        "/usr/bin/agentctl",
        "/lib/systemd/system/agentd.service",
        "/lib/systemd/system/agentd.socket",
        "/usr/lib/sysusers.d/agentd.conf",
        "/usr/lib/tmpfiles.d/agentd.conf",
        "/etc/agentd/agentd.toml",
        "/usr/share/man/man1/agentctl.1.gz",
        "/usr/share/man/man1/agentd.1.gz",
        "/usr/share/bash-completion/completions/agentctl",
        "/usr/share/zsh/vendor-completions/_agentctl",
        "/usr/share/fish/vendor_completions.d/agentctl.fish",
        "/usr/share/doc/agentd/copyright",
        "/usr/share/doc/agentd/operations.md",
        // postinst: the group, the directories, and the units enabled though systemd is not running.
        "/var/lib/agentd",
        "/etc/systemd/system/multi-user.target.wants/agentd.service",
        "/etc/systemd/system/sockets.target.wants/agentd.socket",
    ] {
        assert!(Path::new(path).exists(), "{path} missing after dpkg -i");
    }
    assert!(
        run(Command::new("getent").args(["group", "agentd"]))
            .status
            .success(),
        "no agentd group"
    );
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "agentd"]));
    assert!(
        String::from_utf8_lossy(&conffiles.stdout).contains("/etc/agentd/agentd.toml"),
        "agentd.toml is not a conffile"
    );

    // The replica supervisor the agent finds beside itself.
    let shim = run(&mut Command::new("/usr/bin/agentd-shim"));
    assert!(
        shim.status.code() == Some(2) && text(&shim).contains("usage: agentd-shim DIR"),
        "agentd-shim without arguments:\n{}",
        text(&shim)
    );
    for binary in ["/usr/bin/agentd", "/usr/bin/agentctl"] {
        let version = run(Command::new(binary).arg("--version"));
        assert!(
            version.status.success() && text(&version).contains(env!("CARGO_PKG_VERSION")),
            "{binary} --version:\n{}",
            text(&version)
        );
    }
    // The installed units verify against the installed binary, man page included where man exists.
    let man = if Path::new("/usr/bin/man").exists() {
        "--man=yes"
    } else {
        "--man=no"
    };
    let verify = run(Command::new("systemd-analyze").args([
        "verify",
        man,
        "/lib/systemd/system/agentd.service",
        "/lib/systemd/system/agentd.socket",
    ]));
    assert!(
        verify.status.success() && text(&verify).trim().is_empty(),
        "verify installed units:\n{}",
        text(&verify)
    );

    let remove = run(Command::new("dpkg").args(["-r", "agentd"]));
    assert!(
        remove.status.success(),
        "dpkg -r failed:\n{}",
        text(&remove)
    );
    assert!(
        !Path::new("/usr/bin/agentd").exists()
            && !Path::new("/lib/systemd/system/agentd.service").exists()
    );
    assert!(
        Path::new("/etc/agentd/agentd.toml").exists(),
        "dpkg -r keeps the conffile"
    );
    let purge = run(Command::new("dpkg").args(["--purge", "agentd"]));
    assert!(
        purge.status.success(),
        "dpkg --purge failed:\n{}",
        text(&purge)
    );
    assert!(
        !Path::new("/etc/agentd/agentd.toml").exists() && !Path::new("/var/lib/agentd").exists()
    );
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/agentd.service").exists());
    assert_eq!(dpkg_status("agentd"), "");
    drop(installed);
    println!(
        "deb: built in {:.0}s, whole test {:.0}s",
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// The running agent.

fn eight_fake_gpus() -> Vec<serde_json::Value> {
    (0..8).map(e2e::fake_gpu).collect()
}

#[test]
fn prometheus_scrapes_a_running_agent_with_fake_gpus() {
    if !ensure_tool("prometheus", "prometheus") {
        return;
    }
    let started = Instant::now();
    let metrics: SocketAddr = format!("127.0.0.1:{}", e2e::free_port()).parse().unwrap();
    let agent = e2e::Agent::start(e2e::AgentOptions {
        gpus: Some(eight_fake_gpus()),
        env: vec![("AGENTD_METRICS_ADDR".into(), metrics.to_string())],
        ..e2e::AgentOptions::default()
    });

    // What promtool thinks of the real agent's exposition.
    let (status, body) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}\n{}", agent.log());
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "promtool check metrics:\n{}\n{body}",
        text(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let (_prometheus, prometheus) = start_prometheus(metrics, dir.path());
    let deadline = Instant::now() + Duration::from_mins(1);
    assert_eq!(
        query_value(prometheus, r#"up{job="agentd"}"#, deadline),
        1.0
    );
    assert_eq!(query_value(prometheus, "agentd_up", deadline), 1.0);
    assert_eq!(query_value(prometheus, "agentd_gpus", deadline), 8.0);
    // Fake GPU 3: 33 °C, 75 W, 30% busy, as tests/e2e's fake_gpu(3) describes it.
    let gpu3 = r#"gpu="3",uuid="GPU-00000000-0000-0000-0000-000000000003",model="NVIDIA H200""#;
    assert_eq!(
        query_value(
            prometheus,
            &format!("agentd_gpu_temperature_celsius{{{gpu3}}}"),
            deadline
        ),
        33.0
    );
    assert_eq!(
        query_value(
            prometheus,
            &format!("agentd_gpu_power_watts{{{gpu3}}}"),
            deadline
        ),
        75.0
    );
    assert!(
        (query_value(
            prometheus,
            &format!("agentd_gpu_utilization_ratio{{{gpu3}}}"),
            deadline
        ) - 0.3)
            .abs()
            < 1e-9
    );
    assert_eq!(
        query_value(prometheus, "sum(agentd_gpu_healthy)", deadline),
        8.0
    );
    assert_eq!(
        query_value(
            prometheus,
            r#"agentd_build_info{version="0.1.0"}"#,
            deadline
        ),
        1.0,
        "the version is in agentd_build_info"
    );
    println!(
        "agent + prometheus: {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Collects what the agent sends to NOTIFY_SOCKET.
struct NotifySocket {
    path: PathBuf,
    received: Arc<std::sync::Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends when the test process does; a read timeout just loops.
            loop {
                if let Ok(n) = socket.recv(&mut buf) {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock()
                        .unwrap()
                        .extend(message.lines().map(str::to_owned));
                }
            }
        });
        NotifySocket { path, received }
    }

    fn lines(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }

    fn wait_for(&self, line: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.lines().iter().any(|l| l == line) {
            assert!(Instant::now() < deadline, "no {line} in {:?}", self.lines());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The agent as systemd runs it: the API socket bound by systemd and passed as fd 3
/// (`systemd-socket-activate` does exactly what agentd.socket does), READY=1 on
/// NOTIFY_SOCKET once it serves, watchdog pings from the core loop, STOPPING=1 on SIGTERM.
#[test]
fn socket_activation_readiness_watchdog_and_stopping_reach_systemd() {
    if !ensure_tool("systemd-socket-activate", "systemd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentd.sock");
    let notify = NotifySocket::bind(dir.path());
    let gpus = dir.path().join("gpus.json");
    e2e::write_fake_gpus(&gpus, &eight_fake_gpus());
    let config = dir.path().join("agentd.toml");
    fs_write(&config, "metrics_addr = \"off\"\n");
    let log = std::fs::File::create(dir.path().join("agentd.log")).unwrap();
    // systemd-socket-activate passes on only the variables named with -E, as systemd does.
    let mut activate = Command::new("systemd-socket-activate");
    activate.arg("--listen").arg(&socket);
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "AGENTD_NVML_LIBRARY",
        "FAKE_NVML_CONFIG",
    ] {
        activate.args(["-E", var]);
    }
    let child = activate
        .arg(e2e::agentd_bin())
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .env("AGENTD_NVML_LIBRARY", e2e::fake_nvml_lib())
        .env("FAKE_NVML_CONFIG", &gpus)
        .env_remove("AGENTD_SOCKET")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut activator = Running(child);
    let agent_log = || std::fs::read_to_string(dir.path().join("agentd.log")).unwrap_or_default();

    // The socket exists before the agent runs; the first connection starts it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate did not bind {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = run(Command::new(e2e::agentctl_bin())
        .arg("--socket")
        .arg(&socket)
        .args(["status", "-o", "json"]));
    assert!(
        status.status.success(),
        "agentctl status over the inherited socket:\n{}\n{}",
        text(&status),
        agent_log()
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["node"]["gpus"].as_array().map(Vec::len), Some(8));
    assert!(
        agent_log().contains("using the API socket systemd passed in"),
        "{}",
        agent_log()
    );

    notify.wait_for("READY=1", Duration::from_secs(10));
    // WatchdogSec=1s: the core loop pings every half second, so pings keep coming after READY.
    let ready_at = Instant::now();
    let pings = || notify.lines().iter().filter(|l| *l == "WATCHDOG=1").count();
    let before = pings();
    while pings() < before + 3 {
        assert!(
            ready_at.elapsed() < Duration::from_secs(10),
            "only {} watchdog pings in 10 s after READY: {:?}",
            pings() - before,
            notify.lines()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // systemd-socket-activate execs the agent in place, so its pid is the agent's.
    let pid = activator.0.id().to_string();
    assert!(
        run(Command::new("kill").args(["-TERM", &pid]))
            .status
            .success()
    );
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(exit) = activator.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not stop:\n{}",
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "agent exited with {exit}:\n{}", agent_log());
    let lines = notify.lines();
    let ready = lines.iter().position(|l| l == "READY=1").unwrap();
    let stopping = lines.iter().position(|l| l == "STOPPING=1").unwrap();
    assert!(ready < stopping, "{lines:?}");
    // The inherited socket belongs to systemd; the agent leaves it in place.
    assert!(socket.exists(), "the agent removed the socket systemd owns");
}

/// The shipped /etc/agentd/agentd.toml is accepted as it is, and uncommenting every key in it
/// changes nothing: the defaults it documents are the real ones.
#[test]
fn the_default_config_file_documents_the_real_defaults() {
    let shipped = repo_root().join("packaging/agentd.toml");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    fs_write(&empty, "");
    let uncommented = dir.path().join("uncommented.toml");
    let shipped_text = std::fs::read_to_string(&shipped).unwrap();
    let keys: String = shipped_text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase() || c == '['))
        .flat_map(|l| [l, "\n"])
        .collect();
    assert!(
        keys.lines().count() >= 20,
        "expected every key commented out in {}:\n{keys}",
        shipped.display()
    );
    fs_write(&uncommented, &keys);

    let print = |config: &Path| {
        let mut command = Command::new(e2e::agentd_bin());
        command.arg("--config").arg(config).arg("--print-config");
        for (key, _) in std::env::vars() {
            if key.starts_with("AGENTD_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        let out = run(&mut command);
        assert!(
            out.status.success(),
            "agentd --config {} --print-config:\n{}",
            config.display(),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let defaults = print(&empty);
    assert_eq!(print(&shipped), defaults);
    assert_eq!(
        print(&uncommented),
        defaults,
        "a commented default in agentd.toml is not the real default:\n{keys}"
    );
}
