//! Nobody can exhaust the agent: each listener caps its open connections, closes clients that
//! sit idle or send too slowly, users have a request rate, refusals are counted in metrics, and
//! the state the agent keeps is not readable by other users. The same rules hold on the HTTPS
//! listener, where a TLS handshake that never ends counts against the header timeout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{Agent, AgentOptions};
use rustls::pki_types::pem::PemObject as _;

use crate::auth::{ALICE, BOB, http_as, users};
use crate::remote::Remote;

/// Everything the peer sends until it closes (or 30 s pass, which fails the test).
fn read_to_close(stream: &mut impl Read) -> String {
    let mut text = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return String::from_utf8_lossy(&text).into_owned(),
            Ok(n) => text.extend_from_slice(&chunk[..n]),
            // A read with a timeout is not restarted after the test process is stopped and
            // continued (signal(7)); that is no answer from the agent.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset, or (TLS) a close without close_notify: closed all the same.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                return String::from_utf8_lossy(&text).into_owned();
            }
            Err(e) => panic!("the agent did not close the connection: {e}"),
        }
    }
}

fn unix(agent: &Agent) -> UnixStream {
    let stream = UnixStream::connect(&agent.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

fn tcp(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

fn scrape(port: u16) -> String {
    let mut stream = tcp(port);
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    read_to_close(&mut stream)
}

const GET_STATUS: &[u8] = b"GET /v1/status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";

#[test]
fn connections_are_capped_and_idle_or_slow_clients_closed() {
    let port = e2e::free_port();
    let agent = Agent::start(AgentOptions {
        config: "[api]\nmax_connections = 4\nheader_timeout = \"4s\"\nbody_timeout = \"4s\"\n"
            .into(),
        env: vec![("AGENTD_METRICS_ADDR".into(), format!("127.0.0.1:{port}"))],
        ..AgentOptions::default()
    });

    // Socket: four idle clients fill it; a fifth is closed without an answer.
    let mut idle: Vec<UnixStream> = (0..4).map(|_| unix(&agent)).collect();
    let mut fifth = unix(&agent);
    // The agent may have closed it already, so that the write fails: that is a refusal too.
    let _ = fifth.write_all(GET_STATUS);
    let answer = read_to_close(&mut fifth);
    assert!(answer.is_empty(), "a fifth connection was served: {answer}");
    // The idle ones are closed after the header timeout, and then the agent answers again.
    for stream in &mut idle {
        assert_eq!(read_to_close(stream), "", "an idle client got an answer");
    }
    let mut after = unix(&agent);
    after.write_all(GET_STATUS).unwrap();
    assert!(read_to_close(&mut after).starts_with("HTTP/1.1 200"));

    // A body that never arrives in full is a 408, not a connection held forever.
    let mut slow = unix(&agent);
    slow.write_all(
        b"POST /v1/jobs HTTP/1.1\r\nHost: a\r\nContent-Type: application/yaml\r\nContent-Length: 100\r\n\r\nkind: Tra",
    )
    .unwrap();
    let answer = read_to_close(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // Metrics: the same cap and idle timeout.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| tcp(port)).collect();
    let mut fifth = tcp(port);
    let _ = fifth.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    assert_eq!(read_to_close(&mut fifth), "", "a fifth scrape was served");
    for stream in &mut idle {
        assert_eq!(read_to_close(stream), "");
    }
    let metrics = scrape(port);
    for series in [
        "agentd_refusals_total{listener=\"socket\",reason=\"body_timeout\"} 1",
        "agentd_refusals_total{listener=\"metrics\",reason=\"connection_limit\"} 1",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
    // At least the fifth: the connection the harness made to see the agent ready may still hold
    // its place for a moment when the four idle ones arrive, and then one of them is refused too.
    let socket = "agentd_refusals_total{listener=\"socket\",reason=\"connection_limit\"} ";
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(socket))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        (1..=2).contains(&refused),
        "{socket}is {refused}, not 1 or 2, in:\n{metrics}"
    );
}

#[test]
fn each_user_has_a_request_rate() {
    users();
    let agent = Agent::start(AgentOptions {
        config: "[api]\nrequests_per_second = 1\nrequest_burst = 3\n".into(),
        ..AgentOptions::default()
    });
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Ten requests on one connection, as fast as curl sends them.
    let url = "http://agentd/v1/jobs";
    let out = Command::new("setpriv")
        .args(["--reuid", BOB, "--regid", BOB, "--init-groups"])
        .args(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}\n"])
        .arg("--unix-socket")
        .arg(&agent.socket)
        .args([url; 10])
        .output()
        .unwrap();
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    // Each line ends with the status code (the bodies, after the first, precede it).
    let refused = codes.lines().filter(|c| c.ends_with("429")).count();
    let served = codes.lines().filter(|c| c.ends_with("200")).count();
    assert!(served >= 3 && refused >= 1, "codes:\n{codes}");
    let (status, body) = http_as(&agent, BOB, "GET", "/v1/jobs");
    if status == 429 {
        assert_eq!(body["error"]["code"], "too_many_requests", "{body}");
    }
    // Root is not limited: the operator can always act.
    for _ in 0..10 {
        assert!(agent.ctl(&["jobs"]).status.success());
    }
}

#[test]
fn state_and_logs_are_not_world_readable() {
    let agent = Agent::start(AgentOptions::default());
    let manifest = "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: secret}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 1\n      template:\n        spec:\n          containers:\n          - name: tensorflow\n            command: [sh, -c, 'echo $DB_PASSWORD']\n            env: [{name: DB_PASSWORD, value: hunter2}]\n";
    let out = agent.ctl_with_stdin(&["submit", "-"], manifest);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_for(&["job", "secret"], Duration::from_secs(30), |j| {
        j["state"] == "Succeeded"
    });
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&agent.state_dir) & 0o007, 0, "state dir");
    let mut files = Vec::new();
    let mut dirs = vec![agent.state_dir.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(files.iter().any(|f| f.ends_with("agentd.db")), "{files:?}");
    assert!(
        files
            .iter()
            .any(|f| std::fs::read_to_string(f).is_ok_and(|t| t.contains("hunter2"))),
        "the replica's log holds its output: {files:?}"
    );
    for file in &files {
        assert_eq!(
            mode(file) & 0o004,
            0,
            "{} is world-readable",
            file.display()
        );
    }
}

#[test]
fn running_out_of_descriptors_is_not_a_gpu_fault() {
    let agent = Agent::start(AgentOptions {
        gpus: Some((0..2).map(e2e::fake_gpu).collect()),
        // A cap above the descriptor limit set below, so that the descriptors run out first.
        config: "[inventory]\ninterval = \"200ms\"\ngpu_recovery_quiet = \"60s\"\n\
                 [api]\nmax_connections = 1000\nheader_timeout = \"3s\"\n"
            .into(),
        ..AgentOptions::default()
    });
    let limited = Command::new("prlimit")
        .arg(format!("--pid={}", agent.pid()))
        .arg("--nofile=96:96")
        .status()
        .unwrap();
    assert!(limited.success());
    // Far more idle clients than the agent has descriptors for.
    let idle: Vec<UnixStream> = (0..200).map(|_| unix(&agent)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // The socket's accept fails with EMFILE ("Too many open files"); then wait for a few
    // inventory samples to be taken while the descriptors are still gone.
    while !agent.log().contains("Too many open files") {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never ran out of descriptors:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    drop(idle);
    // Once the idle clients are gone the agent answers again, with every GPU still healthy.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let node = loop {
        let out = agent.ctl(&["node", "-o", "json"]);
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    for gpu in node["gpus"].as_array().unwrap() {
        assert_eq!(gpu["healthy"], true, "{gpu}\n{}", agent.log());
    }
    assert!(!agent.log().contains("unhealthy"), "{}", agent.log());
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the HTTPS listener, handshake done, trusting the test's CA.
fn tls(remote: &Remote) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_file(remote.dir.join("ca.pem")).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut sock = tcp(remote.port);
    while conn.is_handshaking() {
        match conn.complete_io(&mut sock) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("TLS handshake with the agent failed: {e}"),
        }
    }
    rustls::StreamOwned::new(conn, sock)
}

fn token(remote: &Remote, user: &str) -> String {
    let path = remote.token(user, &[]);
    remote.reload();
    let token = std::fs::read_to_string(path).unwrap().trim().to_owned();
    remote.wait_until("the token is read", || {
        let mut stream = tls(remote);
        stream
            .write_all(
                format!(
                    "GET /v1/status HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
                     Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
        read_to_close(&mut stream).starts_with("HTTP/1.1 200")
    });
    token
}

fn metrics_port() -> (u16, Vec<(String, String)>) {
    let port = e2e::free_port();
    (
        port,
        vec![("AGENTD_METRICS_ADDR".into(), format!("127.0.0.1:{port}"))],
    )
}

#[test]
fn https_connections_are_capped_and_idle_silent_or_slow_clients_closed() {
    let (port, env) = metrics_port();
    let remote = Remote::start_with(
        None,
        "max_connections = 4\nheader_timeout = \"4s\"\nbody_timeout = \"4s\"\n",
        env,
    );
    let token = token(&remote, ALICE);
    let get_status = format!(
        "GET /v1/status HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );

    // Four TLS clients that say nothing after the handshake fill the listener; a fifth
    // connection is closed without an answer.
    let mut idle: Vec<Tls> = (0..4).map(|_| tls(&remote)).collect();
    let mut fifth = tcp(remote.port);
    let _ = fifth.write_all(b"\x16\x03\x01");
    assert_eq!(
        read_to_close(&mut fifth),
        "",
        "a fifth connection was served"
    );
    // The idle ones are closed after the header timeout, and then the listener answers again.
    for stream in &mut idle {
        assert_eq!(read_to_close(stream), "", "an idle client got an answer");
    }
    let mut after = tls(&remote);
    after.write_all(get_status.as_bytes()).unwrap();
    let answer = read_to_close(&mut after);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A TCP client that never starts the handshake holds no place for longer than the header
    // timeout.
    let mut silent = tcp(remote.port);
    assert_eq!(
        read_to_close(&mut silent),
        "",
        "a silent client got an answer"
    );

    // Headers trickled a byte at a time are cut off at the header timeout, not served once the
    // last byte arrives: the agent closes the connection while the client still sends.
    let mut trickle = tls(&remote);
    trickle
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let closed = loop {
        if trickle
            .write_all(b"a")
            .and_then(|()| trickle.flush())
            .is_err()
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(closed, "a client trickling headers was kept open for 30s");

    // A body that never arrives in full is a 408.
    let mut slow = tls(&remote);
    slow.write_all(
        format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/yaml\r\nContent-Length: 100\r\n\r\nkind: Tra"
        )
        .as_bytes(),
    )
    .unwrap();
    let answer = read_to_close(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    let metrics = scrape(port);
    for series in [
        "agentd_refusals_total{listener=\"https\",reason=\"connection_limit\"} 1",
        "agentd_refusals_total{listener=\"https\",reason=\"header_timeout\"} 1",
        "agentd_refusals_total{listener=\"https\",reason=\"body_timeout\"} 1",
    ] {
        assert!(
            metrics.contains(series),
            "{series} missing from:\n{metrics}"
        );
    }
}

/// `curl` sends `count` requests on one connection; the status codes, one a line.
fn burst(curl: &mut Command, url: &str, count: usize) -> Vec<u16> {
    curl.args(["-s", "-w", "%{http_code}\n"]);
    for _ in 0..count {
        // `-o` holds for one URL: each answer's body goes nowhere.
        curl.args(["-o", "/dev/null", url]);
    }
    let out = curl.output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

#[test]
fn a_users_request_rate_is_shared_by_both_doors() {
    const BURST: usize = 20;
    let (port, env) = metrics_port();
    let remote = Remote::start_with(
        None,
        &format!("requests_per_second = 1\nrequest_burst = {BURST}\n"),
        env,
    );
    let token = token(&remote, ALICE);
    // At most a full bucket here (the token check above spent some of it).
    let started = Instant::now();
    let on_socket = burst(
        Command::new("setpriv")
            .args(["--reuid", ALICE, "--regid", ALICE, "--init-groups"])
            .arg("curl")
            .arg("--unix-socket")
            .arg(&remote.agent.socket),
        "http://agentd/v1/jobs",
        BURST,
    );
    let over_https = burst(
        Command::new("curl")
            .arg("--cacert")
            .arg(remote.dir.join("ca.pem"))
            .args(["-H", &format!("Authorization: Bearer {token}")]),
        &format!("{}/v1/jobs", remote.url),
        BURST,
    );
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(on_socket.len() + over_https.len(), 2 * BURST);
    let served = on_socket
        .iter()
        .chain(&over_https)
        .filter(|c| **c == 200)
        .count();
    // One bucket for alice: what both doors served together fits in one burst plus what the
    // rate refilled meanwhile. Two buckets would have served about twice the burst.
    #[allow(clippy::cast_precision_loss)]
    let allowed = BURST as f64 + elapsed.ceil();
    #[allow(clippy::cast_precision_loss)]
    let served_f = served as f64;
    assert!(
        served_f <= allowed,
        "{served} served in {elapsed:.1}s, one bucket allows {allowed}\n\
         socket: {on_socket:?}\nhttps: {over_https:?}"
    );
    assert!(
        over_https.contains(&429),
        "the HTTPS door refused nothing: {over_https:?}"
    );
    assert!(
        over_https.iter().all(|c| *c == 200 || *c == 429),
        "{over_https:?}"
    );
    let metrics = scrape(port);
    assert!(
        metrics.contains("agentd_refusals_total{listener=\"https\",reason=\"rate_limit\"}"),
        "{metrics}"
    );
}
