//! The multi-node harness: one kube-sim process and N agents in cluster mode on this machine,
//! each with its own fake GPUs, state directory and socket, reaching kube-sim through a fault
//! proxy that can pass, delay or blackhole (on the TLS bytes); error statuses such as 503 come
//! from kube-sim's own fault switch (`kube-sim fault`), inside TLS as a real server sends them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{Agent, AgentOptions, fake_gpu};

/// The namespace, CRDs and RBAC roles of a cluster that runs agentd.
pub const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../packaging/kubernetes");

/// The identities the tests give agents, as kube-apiserver's static token file has them.
pub const NODE_USER: &str = "system:serviceaccount:agentd-system:agentd-node";
pub const LEADER_USER: &str = "system:serviceaccount:agentd-system:agentd-leader";
const TOKENS: &str = "\
node-token,system:serviceaccount:agentd-system:agentd-node,sa-node,\"system:serviceaccounts,system:serviceaccounts:agentd-system\"
leader-token,system:serviceaccount:agentd-system:agentd-leader,sa-leader,\"system:serviceaccounts,system:serviceaccounts:agentd-system\"
nobody-token,nobody,nobody-uid
";

/// Who an agent is in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// ServiceAccount `agentd-system/agentd-node`: the worker-only role.
    Node,
    /// ServiceAccount `agentd-system/agentd-leader`: both roles.
    Leader,
    /// An authenticated user bound to no role.
    Nobody,
}

impl Identity {
    fn token(self) -> &'static str {
        match self {
            Identity::Node => "node-token",
            Identity::Leader => "leader-token",
            Identity::Nobody => "nobody-token",
        }
    }
}

/// Builds the kube-sim binary once per test run.
pub fn kube_sim_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.current_dir(&root)
                .args(["build", "-p", "kube-sim", "--bin", "kube-sim"]);
            crate::no_test_env(&mut cmd);
            if !cfg!(debug_assertions) {
                cmd.arg("--release");
            }
            assert!(
                cmd.status().expect("cargo runs").success(),
                "building kube-sim failed"
            );
            crate::target_dir().join("kube-sim")
        })
        .clone()
}

/// A kube-sim process with simulated nodes `node-0`.., killed when dropped.
pub struct KubeSim {
    pub dir: tempfile::TempDir,
    /// The admin kubeconfig kube-sim wrote.
    pub kubeconfig: PathBuf,
    pub url: String,
    child: Child,
}

impl KubeSim {
    /// kube-sim with an audit log and `packaging/kubernetes/` applied; when `secure`, with
    /// HTTPS, bearer tokens and RBAC as a real API server. Plain HTTP carries no tokens
    /// (kubectl will not send them there), so without `secure` everyone may do everything.
    pub fn start(nodes: usize, secure: bool) -> KubeSim {
        Self::start_scaled(nodes, secure, 1.0)
    }

    /// As [`KubeSim::start`], with cluster time running `time_scale` times faster than real
    /// time (`--time-scale`): a stopped node goes `Unknown` 40 s of cluster time later.
    pub fn start_scaled(nodes: usize, secure: bool, time_scale: f64) -> KubeSim {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("admin.kubeconfig");
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(&tokens, TOKENS).unwrap();
        let mut cmd = Command::new(kube_sim_bin());
        if secure {
            cmd.arg("--tls")
                .args(["--authorization-mode", "RBAC"])
                .arg("--token-auth-file")
                .arg(&tokens);
        }
        let mut child = cmd
            .args(["--listen", "127.0.0.1:0", "--nodes", &nodes.to_string()])
            .args(["--time-scale", &time_scale.to_string()])
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("kube-sim.log")).unwrap())
            .spawn()
            .expect("kube-sim starts");
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("kube-sim listening on ")
            .unwrap_or_else(|| panic!("kube-sim said {line:?}"))
            .to_owned();
        let sim = KubeSim {
            dir,
            kubeconfig,
            url,
            child,
        };
        let out = sim.kubectl(&["apply", "-f", MANIFESTS]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        sim
    }

    /// `host:port` of the API server.
    pub fn addr(&self) -> &str {
        self.url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend(args);
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all);
        assert!(
            out.status.success(),
            "kubectl {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A Node's labels.
    pub fn node_labels(&self, node: &str) -> serde_json::Map<String, serde_json::Value> {
        self.get_json(&["node", node])["metadata"]["labels"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    /// A kubeconfig like the admin one, for `who` (where kube-sim checks tokens), pointing at
    /// `addr` (a fault proxy, or [`KubeSim::addr`] itself).
    pub fn kubeconfig_for(&self, who: Identity, addr: &str, path: &Path) {
        let text = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let text: String = text
            .lines()
            .map(|line| match line.split_once("token:") {
                Some((indent, _)) => format!("{indent}token: {}\n", who.token()),
                None => format!("{line}\n"),
            })
            .collect();
        std::fs::write(path, text.replace(self.addr(), addr)).unwrap();
    }

    /// `kube-sim fault --status STATUS --for DURATION` (e.g. `"30s"`): every API request gets
    /// STATUS, as from an overloaded API server, until it ends or [`KubeSim::clear_fault`].
    pub fn fault(&self, status: u16, duration: &str) {
        self.control(&["fault", "--status", &status.to_string(), "--for", duration]);
    }

    /// `kube-sim stop-node NODE`: its kubelet stops, its Lease goes stale, and the node goes
    /// `Unknown`.
    pub fn stop_node(&self, node: &str) {
        self.control(&["stop-node", node]);
    }

    /// `kube-sim restart-node NODE`.
    pub fn restart_node(&self, node: &str) {
        self.control(&["restart-node", node]);
    }

    /// `kube-sim fault --clear`.
    pub fn clear_fault(&self) {
        self.control(&["fault", "--clear"]);
    }

    fn control(&self, args: &[&str]) {
        let out = Command::new(kube_sim_bin())
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .output()
            .expect("kube-sim runs");
        assert!(
            out.status.success(),
            "kube-sim {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The audit log's records (one JSON object per request served).
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The audit records of the pods created (answered 201), in the order served.
    pub fn pod_creates(&self) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["verb"] == "create" && r["resource"] == "pods" && r["code"] == 201)
            .collect()
    }

    /// How many times each pod name was created.
    pub fn pod_create_counts(&self) -> std::collections::BTreeMap<String, u32> {
        let mut counts = std::collections::BTreeMap::new();
        for r in self.pod_creates() {
            *counts
                .entry(r["name"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
        counts
    }

    /// The pods of a label selector, in every namespace, that have not ended (neither
    /// `Succeeded` nor `Failed`).
    pub fn live_pods(&self, selector: &str) -> Vec<serde_json::Value> {
        let mut pods = self.get_json(&["pods", "--all-namespaces", "-l", selector]);
        let items = pods["items"].take();
        let serde_json::Value::Array(items) = items else {
            return Vec::new();
        };
        items
            .into_iter()
            .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
            .collect()
    }

    /// Waits until `check` holds, polling; panics with `what` after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !check() {
            assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One event of a [`PodWatch`], with the moment it reached the test.
#[derive(Debug, Clone)]
pub struct PodEvent {
    pub at: Instant,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: String,
    pub pod: serde_json::Value,
}

impl PodEvent {
    /// One of the pod's labels, or `""`.
    pub fn label(&self, key: &str) -> &str {
        self.pod["metadata"]["labels"][key]
            .as_str()
            .unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.pod["metadata"]["name"].as_str().unwrap_or_default()
    }
}

/// `kubectl get pods --watch` on the pods of a label selector, in every namespace, each event
/// kept with the time it arrived; the kubectl process ends when this is dropped.
pub struct PodWatch {
    child: Child,
    events: Arc<Mutex<Vec<PodEvent>>>,
    /// Set when kubectl's output ended (the watch closed or kubectl exited).
    ended: Arc<AtomicBool>,
    /// What kubectl wrote to its standard error.
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

impl KubeSim {
    /// Starts a [`PodWatch`] and returns once kube-sim has the watch request (its audit line),
    /// so that every later change of those pods is seen.
    pub fn watch_pods(&self, selector: &str) -> PodWatch {
        let admin_watches = |sim: &KubeSim| {
            sim.audit()
                .iter()
                .filter(|r| {
                    r["user"] == "kube-sim-admin" && r["verb"] == "watch" && r["resource"] == "pods"
                })
                .count()
        };
        let before = admin_watches(self);
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["get", "pods", "--all-namespaces", "-l", selector])
            .args(["--watch", "--output-watch-events", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let started = Instant::now();
        let stdout = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err_sink = stderr.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text);
            err_sink.lock().unwrap().push_str(&text);
        });
        let events = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicBool::new(false));
        let (sink, end) = (events.clone(), ended.clone());
        std::thread::spawn(move || {
            let reader = std::io::BufReader::new(stdout);
            for event in serde_json::Deserializer::from_reader(reader)
                .into_iter::<serde_json::Value>()
                .map_while(Result::ok)
            {
                let at = Instant::now();
                sink.lock().unwrap().push(PodEvent {
                    at,
                    kind: event["type"].as_str().unwrap_or_default().to_owned(),
                    pod: event["object"].clone(),
                });
            }
            end.store(true, Ordering::SeqCst);
        });
        self.wait_until("kubectl watches the pods", Duration::from_secs(30), || {
            admin_watches(self) > before
        });
        PodWatch {
            child,
            events,
            ended,
            stderr,
            started,
        }
    }
}

impl PodWatch {
    /// Every event so far.
    pub fn events(&self) -> Vec<PodEvent> {
        self.events.lock().unwrap().clone()
    }

    /// Waits for the first event from the `from`th on that `check` accepts, looking at each
    /// within milliseconds of its arrival; returns its index and the event.
    pub fn next_where(
        &self,
        from: usize,
        timeout: Duration,
        mut check: impl FnMut(&PodEvent) -> bool,
    ) -> (usize, PodEvent) {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        loop {
            {
                let events = self.events.lock().unwrap();
                while next < events.len() {
                    if check(&events[next]) {
                        return (next, events[next].clone());
                    }
                    next += 1;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no such pod event within {timeout:?}; {}",
                self.account()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the watch saw, for a failure's message: whether it still runs (and what kubectl
    /// said if not) and, for each value of the `agentd.io/job` label, when its pods were
    /// added, first ran and last ended, in seconds since the watch began.
    fn account(&self) -> String {
        let events = self.events();
        let mut jobs: std::collections::BTreeMap<&str, [Option<f64>; 3]> =
            std::collections::BTreeMap::new();
        for e in &events {
            let at = e.at.duration_since(self.started).as_secs_f64();
            let seen = jobs.entry(e.label("agentd.io/job")).or_default();
            let phase = &e.pod["status"]["phase"];
            let slot = if e.kind == "ADDED" {
                0
            } else if phase == "Running" {
                1
            } else if phase == "Succeeded" || phase == "Failed" || e.kind == "DELETED" {
                2
            } else {
                continue;
            };
            if slot == 2 || seen[slot].is_none() {
                seen[slot] = Some(at);
            }
        }
        let show = |t: Option<f64>| t.map_or("-".to_owned(), |t| format!("{t:.1}"));
        let lines: Vec<String> = jobs
            .iter()
            .map(|(job, [added, ran, ended])| {
                format!(
                    "{job}: added {} ran {} ended {}",
                    show(*added),
                    show(*ran),
                    show(*ended)
                )
            })
            .collect();
        let state = if self.ended.load(Ordering::SeqCst) {
            format!(
                "the watch ENDED; kubectl said: {:?}",
                self.stderr.lock().unwrap()
            )
        } else {
            "the watch is still open".to_owned()
        };
        format!("{} events; {state}\n{}", events.len(), lines.join("\n"))
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the fault proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Accept connections and forward nothing: requests hang until the client gives up.
    Blackhole,
    /// Forward, but hold each chunk this long first.
    Delay(Duration),
}

/// A TCP proxy between the agents and kube-sim that can be told to fail.
pub struct FaultProxy {
    pub addr: String,
    fault: Arc<Mutex<Fault>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let fault = Arc::new(Mutex::new(Fault::Pass));
        let stop = Arc::new(AtomicBool::new(false));
        let upstream = upstream.to_owned();
        let (f, s) = (fault.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                let (f, s, upstream) = (f.clone(), s.clone(), upstream.clone());
                std::thread::spawn(move || proxy_connection(client, &upstream, &f, &s));
            }
        });
        FaultProxy { addr, fault, stop }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(&self.addr);
    }
}

fn current(fault: &Mutex<Fault>) -> Fault {
    *fault.lock().unwrap()
}

/// Holds the caller while the proxy blackholes; false once the proxy is stopping.
fn wait_out_blackhole(fault: &Mutex<Fault>, stop: &AtomicBool) -> bool {
    while current(fault) == Fault::Blackhole {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn proxy_connection(client: TcpStream, upstream: &str, fault: &Mutex<Fault>, stop: &AtomicBool) {
    if !wait_out_blackhole(fault, stop) {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::scope(|scope| {
        scope.spawn(|| pump(client, server, fault, stop));
        scope.spawn(|| pump(s2, c2, fault, stop));
    });
}

/// Copies `from` to `to` chunk by chunk, applying the fault in force to each chunk.
fn pump(mut from: TcpStream, mut to: TcpStream, fault: &Mutex<Fault>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !wait_out_blackhole(fault, stop) {
            break;
        }
        if let Fault::Delay(d) = current(fault) {
            std::thread::sleep(d);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// How to start one cluster-mode agent.
#[derive(Debug, Clone)]
pub struct NodeAgentOptions {
    pub node: String,
    pub gpus: u32,
    pub leader_eligible: bool,
    /// The kubeconfig the agent uses.
    pub kubeconfig: PathBuf,
    /// Inventory and lease interval.
    pub interval: &'static str,
    /// Serve metrics on a free local port.
    pub metrics: bool,
}

/// A cluster-mode agent (an [`Agent`] with its node name and metrics port).
pub struct NodeAgent {
    pub agent: Agent,
    pub node: String,
    pub metrics_port: Option<u16>,
}

impl NodeAgent {
    pub fn start(o: &NodeAgentOptions) -> NodeAgent {
        NodeAgent::start_with(o, "")
    }

    /// Starts an agent with more `[cluster]` settings (TOML lines), e.g. the election's timings.
    pub fn start_with(o: &NodeAgentOptions, cluster_settings: &str) -> NodeAgent {
        let metrics_port = o.metrics.then(crate::free_port);
        let mut env = vec![("AGENTD_NODE_NAME".to_owned(), o.node.clone())];
        if let Some(port) = metrics_port {
            env.push((
                "AGENTD_METRICS_ADDR".to_owned(),
                format!("127.0.0.1:{port}"),
            ));
        }
        let agent = Agent::start(AgentOptions {
            gpus: Some((0..o.gpus).map(fake_gpu).collect()),
            config: format!(
                "mode = \"cluster\"\n[inventory]\ninterval = \"{i}\"\n[cluster]\nkubeconfig = {k:?}\nnode_lease_interval = \"{i}\"\nleader_eligible = {l}\n{cluster_settings}",
                i = o.interval,
                k = o.kubeconfig.display().to_string(),
                l = o.leader_eligible,
            ),
            env,
            ..AgentOptions::default()
        });
        NodeAgent {
            agent,
            node: o.node.clone(),
            metrics_port,
        }
    }

    /// The agent's Prometheus text.
    pub fn metrics(&self) -> String {
        let port = self.metrics_port.expect("started with metrics");
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: agentd\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        text
    }
}

/// One metric sample's value from Prometheus text, e.g. `agentd_cluster_connected`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
