//! Simulated kubelets and the node lifecycle controller.
//!
//! Each simulated node has a Node object with `nvidia.com/gpu` capacity and a Lease in
//! `kube-node-lease` that its kubelet renews. Pods bound to a running node move through their
//! phases with the container statuses and events a real kubelet produces; per-pod annotations
//! choose the run time, the exit code and a failure class. A stopped node stops renewing its
//! lease; after the grace period the lifecycle controller marks it `Unknown`, marks its pods not
//! ready and, after the eviction timeout, deletes them (they stay `Terminating` until the node
//! returns, as on a real cluster).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{self, TimeScale};
use crate::recorder::{EVENT_API, Occurrence, Recorder};
use crate::resources::{GroupResource, ResourceType};
use crate::store::{DeleteOptions, EventType, Store, StoreError, WriteMode};

/// Seconds of cluster time the annotation `sim.agentd.io/run-seconds` says a container runs.
pub const RUN_SECONDS: &str = "sim.agentd.io/run-seconds";
/// Exit code of every container when it finishes (default 0).
pub const EXIT_CODE: &str = "sim.agentd.io/exit-code";
/// A failure class to produce, one of [`Failure`]'s names.
pub const FAIL: &str = "sim.agentd.io/fail";
/// Text the containers write to their log.
pub const LOG: &str = "sim.agentd.io/log";

/// How long a node may go without renewing its lease before it is `Unknown` (cluster time).
const NODE_GRACE: Duration = Duration::from_secs(40);
const HEARTBEAT: Duration = Duration::from_secs(10);
/// The longest the kubelet waits before it retries a volume mount that failed.
const MOUNT_BACKOFF_MAX: Duration = Duration::from_secs(122);
/// How often a pod whose container's configuration is missing is tried again (its pod
/// worker's resync).
const CONFIG_RETRY: Duration = Duration::from_secs(10);

/// The failure classes a pod can be told to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    FailedMount,
    ImagePullBackOff,
    OomKilled,
    Evicted,
    UnexpectedAdmissionError,
}

impl Failure {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "FailedMount" => Self::FailedMount,
            "ImagePullBackOff" => Self::ImagePullBackOff,
            "OOMKilled" => Self::OomKilled,
            "Evicted" => Self::Evicted,
            "UnexpectedAdmissionError" => Self::UnexpectedAdmissionError,
            _ => return None,
        })
    }
}

/// Container logs the simulated kubelets wrote, by (namespace, pod, container).
#[derive(Default)]
pub struct PodLogs(Mutex<HashMap<(String, String, String), String>>);

impl PodLogs {
    pub fn get(&self, ns: &str, pod: &str, container: &str) -> Option<String> {
        self.lock()
            .get(&(ns.into(), pod.into(), container.into()))
            .cloned()
    }

    fn append(&self, ns: &str, pod: &str, container: &str, text: &str) {
        let mut logs = self.lock();
        let entry = logs
            .entry((ns.into(), pod.into(), container.into()))
            .or_default();
        entry.push_str(text);
        if !text.ends_with('\n') {
            entry.push('\n');
        }
    }

    fn forget(&self, ns: &str, pod: &str) {
        self.lock().retain(|(n, p, _), _| !(n == ns && p == pod));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String, String), String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct SimNode {
    index: usize,
    running: bool,
    /// When the node was last seen alive, in real time, for the lifecycle controller.
    unknown_since: Option<tokio::time::Instant>,
}

struct PodTask {
    node: String,
    kill: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

/// All simulated kubelets of one simulator.
pub struct Kubelets {
    store: Arc<Store>,
    logs: Arc<PodLogs>,
    scale: TimeScale,
    eviction_timeout: Duration,
    nodes: Mutex<HashMap<String, SimNode>>,
    pods: Mutex<HashMap<String, PodTask>>,
    /// Whether kubelets refuse pods whose requests exceed what is free on their node.
    admission: std::sync::atomic::AtomicBool,
    /// Held while a pod is admitted, so two pods cannot both take the last free GPU.
    admitting: Mutex<()>,
    /// The pods bound to each node, by (namespace, name), from the pod events: admission
    /// looks at a node's pods, not at every pod of the cluster.
    bound: Mutex<HashMap<String, HashSet<(String, String)>>>,
    pod_type: ResourceType,
    node_type: ResourceType,
    lease_type: ResourceType,
    /// Records the events of pods annotated [`EVENT_API`] `events.k8s.io/v1`.
    recorder: Recorder,
}

/// What pods request, in the units the kubelet compares.
mod admission {
    use serde_json::Value;

    pub const RESOURCES: [&str; 3] = ["nvidia.com/gpu", "cpu", "memory"];

    /// Requests per resource: GPUs as a count, cpu in millicores, memory in bytes.
    #[derive(Default)]
    pub struct Requests([i128; 3]);

    impl Requests {
        pub fn get(&self, resource: &str) -> i128 {
            RESOURCES
                .iter()
                .position(|r| *r == resource)
                .map_or(0, |i| self.0[i])
        }
    }

    /// A quantity (`2`, `500m`, `1Gi`, `1.5G`, `528280384Ki`) in the unit of `resource`:
    /// millicores for cpu, bytes for memory, a count otherwise. `None` when it does not parse.
    pub fn quantity(resource: &str, v: &Value) -> Option<i128> {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            _ => return None,
        };
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (num, suffix) = text.split_at(split);
        let num: f64 = num.parse().ok()?;
        let mult: f64 = match suffix {
            "" => 1.0,
            "m" => 0.001,
            "k" => 1e3,
            "M" => 1e6,
            "G" => 1e9,
            "T" => 1e12,
            "P" => 1e15,
            "Ki" => 1024.0,
            "Mi" => 1024f64.powi(2),
            "Gi" => 1024f64.powi(3),
            "Ti" => 1024f64.powi(4),
            "Pi" => 1024f64.powi(5),
            _ => return None,
        };
        let base = num * mult;
        let unit = if resource == "cpu" {
            base * 1000.0
        } else {
            base
        };
        Some(unit.ceil() as i128)
    }

    pub fn show(resource: &str, v: i128) -> String {
        if resource == "cpu" {
            format!("{v}m")
        } else {
            v.to_string()
        }
    }

    /// The sum over a pod's containers of each resource's request (its limit where no request
    /// is given, as the API server defaults it).
    pub fn requests(pod: &Value) -> Requests {
        let mut out = Requests::default();
        let containers = pod
            .get("spec")
            .and_then(|s| s.get("containers"))
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for c in containers {
            let resources = c.get("resources");
            let list = |which: &str| resources.and_then(|r| r.get(which));
            let (requests, limits) = (list("requests"), list("limits"));
            for (i, r) in RESOURCES.iter().enumerate() {
                let v = requests
                    .and_then(|l| l.get(r))
                    .or_else(|| limits.and_then(|l| l.get(r)));
                if let Some(q) = v.and_then(|v| quantity(r, v)) {
                    out.0[i] += q;
                }
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use serde_json::json;

        use super::*;

        #[test]
        fn quantities() {
            assert_eq!(quantity("cpu", &json!("500m")), Some(500));
            assert_eq!(quantity("cpu", &json!("2")), Some(2000));
            assert_eq!(quantity("cpu", &json!(1.5)), Some(1500));
            assert_eq!(quantity("memory", &json!("1Gi")), Some(1 << 30));
            assert_eq!(
                quantity("memory", &json!("528280384Ki")),
                Some(528_280_384 * 1024)
            );
            assert_eq!(quantity("memory", &json!("1G")), Some(1_000_000_000));
            assert_eq!(quantity("nvidia.com/gpu", &json!("8")), Some(8));
            assert_eq!(quantity("memory", &json!("1Qi")), None);
            let pod = json!({"spec": {"containers": [
                {"resources": {"limits": {"nvidia.com/gpu": "2"}, "requests": {"cpu": "250m"}}},
                {"resources": {"requests": {"nvidia.com/gpu": 1, "memory": "1Mi"}}}]}});
            let r = requests(&pod);
            assert_eq!(
                (r.get("nvidia.com/gpu"), r.get("cpu"), r.get("memory")),
                (3, 250, 1 << 20)
            );
        }
    }
}

/// The string at `path` (object keys), or "".
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .try_fold(v, |v, key| v.get(key))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn s<'a>(v: &'a Value, p: &str) -> &'a str {
    v.pointer(p).and_then(Value::as_str).unwrap_or("")
}

impl Kubelets {
    pub fn new(
        store: Arc<Store>,
        logs: Arc<PodLogs>,
        scale: TimeScale,
        eviction_timeout: Duration,
    ) -> Arc<Self> {
        let ty = |g: &str, p: &str| store.resource_type(g, "v1", p).expect("built-in type");
        Arc::new(Self {
            pod_type: ty("", "pods"),
            node_type: ty("", "nodes"),
            lease_type: ty("coordination.k8s.io", "leases"),
            recorder: Recorder::new(store.clone(), scale),
            store,
            logs,
            scale,
            eviction_timeout,
            nodes: Mutex::new(HashMap::new()),
            pods: Mutex::new(HashMap::new()),
            admission: std::sync::atomic::AtomicBool::new(false),
            admitting: Mutex::new(()),
            bound: Mutex::new(HashMap::new()),
        })
    }

    /// Turns resource admission on or off: with it on, a kubelet refuses a pod whose requests
    /// (`nvidia.com/gpu`, cpu, memory) exceed its node's allocatable minus what the pods it
    /// already admitted request, failing it with `OutOf<resource>` as a real kubelet does.
    pub fn set_admission(&self, on: bool) {
        self.admission
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// The resource a pod does not fit in on `node`, with the kubelet's message; `None` when it
    /// fits. The caller holds `admitting`.
    fn does_not_fit(&self, pod: &Value, node: &str) -> Option<(String, String)> {
        let node_obj = self.store.get(&self.node_type, "", node).ok()?;
        let uid = pod.pointer("/metadata/uid").cloned();
        let uid = uid.as_ref().and_then(Value::as_str).unwrap_or_default();
        let on_node: Vec<(String, String)> = self
            .bound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .map(|pods| pods.iter().cloned().collect())
            .unwrap_or_default();
        let admitted: Vec<Arc<Value>> = on_node
            .iter()
            .filter_map(|(ns, name)| self.store.get(&self.pod_type, ns, name).ok())
            .filter(|p| {
                at(p, &["spec", "nodeName"]) == node
                    && at(p, &["metadata", "uid"]) != uid
                    && !at(p, &["status", "startTime"]).is_empty()
                    && !matches!(at(p, &["status", "phase"]), "Succeeded" | "Failed")
            })
            .collect();
        let want = admission::requests(pod);
        for resource in admission::RESOURCES {
            let requested = want.get(resource);
            if requested == 0 {
                continue;
            }
            let capacity = admission::quantity(
                resource,
                node_obj
                    .pointer(&format!(
                        "/status/allocatable/{}",
                        resource.replace('/', "~1")
                    ))
                    .unwrap_or(&Value::Null),
            )
            .unwrap_or(0);
            let used: i128 = admitted
                .iter()
                .map(|p| admission::requests(p).get(resource))
                .sum();
            if used + requested > capacity {
                let show = |v: i128| admission::show(resource, v);
                return Some((
                    format!("OutOf{resource}"),
                    format!(
                        "Node didn't have enough resource: {resource}, requested: {}, used: {}, capacity: {}",
                        show(requested),
                        show(used),
                        show(capacity)
                    ),
                ));
            }
        }
        None
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, SimNode>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, PodTask>> {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn real(&self, simulated: Duration) -> Duration {
        self.scale.real(simulated)
    }

    /// Starts the pod dispatcher, the heartbeat loop and the node lifecycle controller.
    pub fn start(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut pods = self.store.subscribe(GroupResource::new("", "pods"));
        let me = self.clone();
        let dispatcher = tokio::spawn(async move {
            while let Some(ev) = pods.recv().await {
                me.on_pod_event(ev.kind, &ev.object);
            }
        });
        let me = self.clone();
        let heartbeat = tokio::spawn(async move {
            let period = me.real(HEARTBEAT).max(Duration::from_millis(200));
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                me.heartbeat();
            }
        });
        let me = self.clone();
        let lifecycle = tokio::spawn(async move {
            let period = me
                .real(Duration::from_secs(5))
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                me.check_nodes();
            }
        });
        let me = self.clone();
        let series = tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.recorder.tick_period());
            loop {
                tick.tick().await;
                me.recorder.tick();
            }
        });
        vec![dispatcher, heartbeat, lifecycle, series]
    }

    /// Creates simulated nodes `node-<first>`.. with `gpus` GPUs each and their leases.
    pub fn add_nodes(
        &self,
        first: usize,
        count: usize,
        gpus: u32,
    ) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::with_capacity(count);
        for index in first..first + count {
            let name = format!("node-{index}");
            let now = clock::now();
            let cond = |t: &str, status: &str, reason: &str, msg: &str| json!({"type": t, "status": status, "reason": reason, "message": msg, "lastHeartbeatTime": now, "lastTransitionTime": now});
            let capacity = json!({"cpu": "64", "memory": "528280384Ki", "pods": "110", "ephemeral-storage": "1921724676Ki", "nvidia.com/gpu": gpus.to_string()});
            let node = json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": "amd64",
                    "nvidia.com/gpu.count": gpus.to_string(), "sim.agentd.io/simulated": "true"}},
                "spec": {"podCIDR": format!("10.244.{}.0/24", index % 256)},
                "status": {
                    "capacity": capacity, "allocatable": capacity,
                    "conditions": [
                        cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                        cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                        cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                    ],
                    "addresses": [{"type": "InternalIP", "address": format!("10.0.{}.{}", index / 250, index % 250 + 1)},
                                  {"type": "Hostname", "address": name}],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                    "nodeInfo": {"machineID": clock::random_hex(32), "systemUUID": clock::uuid(), "bootID": clock::uuid(),
                        "kernelVersion": "6.1.0-28-amd64", "osImage": "Debian GNU/Linux 12 (bookworm)",
                        "containerRuntimeVersion": "containerd://1.7.24", "kubeletVersion": "v1.33.0", "kubeProxyVersion": "",
                        "operatingSystem": "linux", "architecture": "amd64"}
                }
            });
            let created = self.store.create(&self.node_type, "", node)?;
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": s(&created, "/metadata/uid")}]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": clock::now_micros()}
            });
            self.store
                .create(&self.lease_type, "kube-node-lease", lease)?;
            self.store.set_kubelet_node(&name, true);
            self.nodes().insert(
                name.clone(),
                SimNode {
                    index,
                    running: true,
                    unknown_since: None,
                },
            );
            names.push(name);
        }
        Ok(names)
    }

    pub fn node_count(&self) -> usize {
        self.nodes().len()
    }

    /// Stops a node's kubelet: its lease goes stale and its pods freeze where they are.
    pub fn stop_node(&self, name: &str) -> bool {
        let Some(n) = self.nodes().get_mut(name).map(|n| {
            n.running = false;
        }) else {
            return false;
        };
        let () = n;
        let mut pods = self.pods();
        pods.retain(|_, t| {
            if t.node == name {
                t.handle.abort();
                false
            } else {
                true
            }
        });
        true
    }

    /// Starts a stopped node's kubelet again: it renews its lease, reports Ready, kills pods
    /// deleted while it was away and restarts the containers of the others.
    pub fn restart_node(self: &Arc<Self>, name: &str) -> bool {
        {
            let mut nodes = self.nodes();
            let Some(n) = nodes.get_mut(name) else {
                return false;
            };
            n.running = true;
            n.unknown_since = None;
        }
        self.renew_lease(name);
        let _ = self
            .store
            .update_with(&self.node_type, "", name, WriteMode::Whole, |cur| {
                let mut n = cur.clone();
                let now = clock::now();
                if let Some(conds) = n
                    .pointer_mut("/status/conditions")
                    .and_then(Value::as_array_mut)
                {
                    for c in conds {
                        let ready = c["type"] == "Ready";
                        c["status"] = json!(if ready { "True" } else { "False" });
                        c["reason"] = json!(if ready {
                            "KubeletReady"
                        } else {
                            "KubeletHasSufficientResources"
                        });
                        c["message"] = json!(if ready {
                            "kubelet is posting ready status"
                        } else {
                            "kubelet is healthy"
                        });
                        c["lastHeartbeatTime"] = json!(now);
                        c["lastTransitionTime"] = json!(now);
                    }
                }
                if let Some(spec) = n.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.remove("taints");
                }
                Ok(n)
            });
        let node_pods = self.store.list(
            &self.pod_type,
            None,
            &|p| s(p, "/spec/nodeName") == name,
            None,
            None,
        );
        for p in node_pods.items {
            self.on_pod_event(EventType::Modified, &p);
        }
        true
    }

    fn renew_lease(&self, name: &str) {
        let _ = self.store.update_with(
            &self.lease_type,
            "kube-node-lease",
            name,
            WriteMode::Whole,
            |cur| {
                let mut l = cur.clone();
                l["spec"]["renewTime"] = json!(clock::now_micros());
                Ok(l)
            },
        );
    }

    fn heartbeat(&self) {
        let running: Vec<String> = self
            .nodes()
            .iter()
            .filter(|(_, n)| n.running)
            .map(|(k, _)| k.clone())
            .collect();
        for name in running {
            self.renew_lease(&name);
        }
    }

    /// The node lifecycle controller: stale leases make nodes `Unknown`, their pods not ready,
    /// and, after the eviction timeout, deleted.
    fn check_nodes(&self) {
        let grace = self
            .real(NODE_GRACE)
            .max(self.real(HEARTBEAT).max(Duration::from_millis(200)) * 3);
        let now = tokio::time::Instant::now();
        let stale: Vec<(String, bool, Option<tokio::time::Instant>)> = {
            let nodes = self.nodes();
            nodes
                .iter()
                .filter(|(_, n)| !n.running)
                .map(|(k, n)| (k.clone(), n.running, n.unknown_since))
                .collect()
        };
        for (name, _, since) in stale {
            let Ok(lease) = self.store.get(&self.lease_type, "kube-node-lease", &name) else {
                continue;
            };
            let renewed = clock::parse_rfc3339(&format!(
                "{}Z",
                s(&lease, "/spec/renewTime").split('.').next().unwrap_or("")
            ))
            .unwrap_or(0);
            let age = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .saturating_sub(renewed);
            match since {
                None if Duration::from_secs(age) >= grace => {
                    self.mark_unknown(&name);
                    if let Some(n) = self.nodes().get_mut(&name) {
                        n.unknown_since = Some(now);
                    }
                }
                Some(t) if now.duration_since(t) >= self.real(self.eviction_timeout) => {
                    self.evict_pods(&name);
                    if let Some(n) = self.nodes().get_mut(&name) {
                        // Far in the future: eviction happens once per outage.
                        n.unknown_since = Some(now + Duration::from_hours(8760));
                    }
                }
                _ => {}
            }
        }
    }

    fn mark_unknown(&self, name: &str) {
        let now = clock::now();
        let _ = self.store.update_with(&self.node_type, "", name, WriteMode::Whole, |cur| {
            let mut n = cur.clone();
            if let Some(conds) = n.pointer_mut("/status/conditions").and_then(Value::as_array_mut) {
                for c in conds {
                    c["status"] = json!("Unknown");
                    c["reason"] = json!("NodeStatusUnknown");
                    c["message"] = json!("Kubelet stopped posting node status.");
                    c["lastTransitionTime"] = json!(now);
                }
            }
            n["spec"]["taints"] = json!([
                {"key": "node.kubernetes.io/unreachable", "effect": "NoSchedule", "timeAdded": now},
                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute", "timeAdded": now}
            ]);
            Ok(n)
        });
        if let Ok(node) = self.store.get(&self.node_type, "", name) {
            self.store.record_event(
                &node,
                "Normal",
                "NodeNotReady",
                &format!("Node {name} status is now: NodeNotReady"),
                "node-controller",
                "",
            );
        }
        let pods = self.store.list(
            &self.pod_type,
            None,
            &|p| s(p, "/spec/nodeName") == name,
            None,
            None,
        );
        for p in pods.items {
            let (ns, pname) = (
                s(&p, "/metadata/namespace").to_string(),
                s(&p, "/metadata/name").to_string(),
            );
            if matches!(s(&p, "/status/phase"), "Succeeded" | "Failed") {
                continue;
            }
            let _ = self
                .store
                .update_with(&self.pod_type, &ns, &pname, WriteMode::Whole, |cur| {
                    let mut p = cur.clone();
                    set_condition(
                        &mut p,
                        "Ready",
                        "False",
                        "NodeLost",
                        &format!("Node {name} which was running pod {pname} is unresponsive"),
                    );
                    set_condition(&mut p, "ContainersReady", "False", "NodeLost", "");
                    Ok(p)
                });
            if let Ok(pod) = self.store.get(&self.pod_type, &ns, &pname) {
                self.store.record_event(
                    &pod,
                    "Warning",
                    "NodeNotReady",
                    "Node is not ready",
                    "node-controller",
                    "",
                );
            }
        }
    }

    fn evict_pods(&self, name: &str) {
        let pods = self.store.list(
            &self.pod_type,
            None,
            &|p| s(p, "/spec/nodeName") == name,
            None,
            None,
        );
        for p in pods.items {
            let (ns, pname) = (
                s(&p, "/metadata/namespace").to_string(),
                s(&p, "/metadata/name").to_string(),
            );
            if matches!(s(&p, "/status/phase"), "Succeeded" | "Failed") {
                continue;
            }
            let _ = self
                .store
                .update_with(&self.pod_type, &ns, &pname, WriteMode::Whole, |cur| {
                    let mut p = cur.clone();
                    p["status"]["reason"] = json!("NodeLost");
                    p["status"]["message"] = json!(format!(
                        "Node {name} which was running pod {pname} is unresponsive"
                    ));
                    Ok(p)
                });
            if let Ok(pod) = self.store.get(&self.pod_type, &ns, &pname) {
                self.store.record_event(
                    &pod,
                    "Normal",
                    "TaintManagerEviction",
                    &format!("Marking for deletion Pod {ns}/{pname}"),
                    "taint-eviction-controller",
                    "",
                );
            }
            let _ = self
                .store
                .delete(&self.pod_type, &ns, &pname, &DeleteOptions::default());
        }
    }

    fn on_pod_event(self: &Arc<Self>, kind: EventType, pod: &Value) {
        let uid = s(pod, "/metadata/uid").to_string();
        let node = s(pod, "/spec/nodeName").to_string();
        let (ns, name) = (
            s(pod, "/metadata/namespace").to_string(),
            s(pod, "/metadata/name").to_string(),
        );
        {
            let mut bound = self
                .bound
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (ns.clone(), name.clone());
            if kind == EventType::Deleted {
                if let Some(pods) = bound.get_mut(&node) {
                    pods.remove(&key);
                }
            } else if !node.is_empty() {
                bound.entry(node.clone()).or_default().insert(key);
            }
        }
        if kind == EventType::Deleted {
            if let Some(t) = self.pods().remove(&uid) {
                t.handle.abort();
            }
            self.logs.forget(&ns, &name);
            return;
        }
        if node.is_empty() || !self.nodes().get(&node).is_some_and(|n| n.running) {
            return;
        }
        let deleting = pod.pointer("/metadata/deletionTimestamp").is_some();
        let mut pods = self.pods();
        if let Some(t) = pods.get(&uid) {
            if deleting {
                let _ = t.kill.send(true);
            }
            return;
        }
        let terminal = matches!(s(pod, "/status/phase"), "Succeeded" | "Failed");
        if terminal && !deleting {
            return;
        }
        let (kill, kill_rx) = watch::channel(deleting);
        let me = self.clone();
        let handle = tokio::spawn(async move {
            let _ = me.run_pod(&ns, &name, &node, kill_rx).await;
        });
        pods.insert(
            uid,
            PodTask {
                node: s(pod, "/spec/nodeName").to_string(),
                kill,
                handle,
            },
        );
    }

    /// Sleeps `simulated` cluster time; true when the pod was deleted meanwhile.
    async fn sleep_or_killed(&self, simulated: Duration, kill: &mut watch::Receiver<bool>) -> bool {
        if *kill.borrow() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(self.real(simulated)) => false,
            r = kill.wait_for(|k| *k) => r.is_ok(),
        }
    }

    fn event(&self, pod: &Value, type_: &str, reason: &str, message: &str, node: &str) {
        let api = pod
            .pointer(&format!(
                "/metadata/annotations/{}",
                EVENT_API.replace('/', "~1")
            ))
            .and_then(Value::as_str);
        if api == Some("events.k8s.io/v1") {
            self.recorder.record(&Occurrence {
                regarding: pod,
                type_,
                reason,
                action: reason,
                note: message,
                controller: "kubelet",
                instance: node,
            });
        } else {
            self.store
                .record_event(pod, type_, reason, message, "kubelet", node);
        }
    }

    fn write_status(
        &self,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<Arc<Value>, StoreError> {
        self.store
            .update_with(&self.pod_type, ns, name, WriteMode::Whole, |cur| {
                let mut p = cur.clone();
                f(&mut p);
                Ok(p)
            })
    }

    #[allow(clippy::too_many_lines)]
    async fn run_pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        mut kill: watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        let pod = self.store.get(&self.pod_type, ns, name)?;
        let ann = |k: &str| {
            pod.pointer(&format!("/metadata/annotations/{}", k.replace('/', "~1")))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let mut run_seconds = None;
        if let Some(v) = ann(RUN_SECONDS) {
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => run_seconds = Some(Duration::from_secs_f64(x)),
                _ => self.event(&pod, "Warning", "InvalidAnnotation", &format!("annotation {RUN_SECONDS}={v:?} is not a non-negative number of seconds; running until deleted"), node),
            }
        }
        let mut exit_code = 0i64;
        if let Some(v) = ann(EXIT_CODE) {
            match v.parse::<i64>() {
                Ok(x) if (0..=255).contains(&x) => exit_code = x,
                _ => self.event(
                    &pod,
                    "Warning",
                    "InvalidAnnotation",
                    &format!(
                        "annotation {EXIT_CODE}={v:?} is not an integer from 0 to 255; using 0"
                    ),
                    node,
                ),
            }
        }
        let mut failure = None;
        if let Some(v) = ann(FAIL) {
            failure = Failure::parse(&v);
            if failure.is_none() {
                self.event(&pod, "Warning", "InvalidAnnotation", &format!("annotation {FAIL}={v:?} is not one of FailedMount, ImagePullBackOff, OOMKilled, Evicted, UnexpectedAdmissionError; ignoring it"), node);
            }
        }
        let log_text = ann(LOG);
        let containers: Vec<(String, String)> = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .map(|c| (s(c, "/name").to_string(), s(c, "/image").to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let restart_policy = match s(&pod, "/spec/restartPolicy") {
            "" => "Always".to_string(),
            p => p.to_string(),
        };
        let node_index = self.nodes().get(node).map_or(0, |n| n.index);
        let pod_ip = format!(
            "10.244.{}.{}",
            node_index % 256,
            2 + rand::random_range(0..250u32)
        );
        let host_ip = format!("10.0.{}.{}", node_index / 250, node_index % 250 + 1);
        let deleting_at_start = *kill.borrow();

        // The first status of a pod that starts: the sandbox and containers being made.
        let pending = |p: &mut Value| {
            p["status"]["phase"] = json!("Pending");
            p["status"]["hostIP"] = json!(host_ip);
            p["status"]["hostIPs"] = json!([{"ip": host_ip}]);
            p["status"]["startTime"] = json!(clock::now());
            set_condition(p, "PodReadyToStartContainers", "False", "", "");
            set_condition(p, "Initialized", "True", "", "");
            set_condition(
                p,
                "Ready",
                "False",
                "ContainersNotReady",
                &format!("containers with unready status: [{}]", names(&containers)),
            );
            set_condition(
                p,
                "ContainersReady",
                "False",
                "ContainersNotReady",
                &format!("containers with unready status: [{}]", names(&containers)),
            );
            set_condition(p, "PodScheduled", "True", "", "");
            p["status"]["containerStatuses"] = container_statuses(
                &containers,
                &json!({"waiting": {"reason": "ContainerCreating"}}),
                false,
                0,
                None,
            );
        };
        let starts = failure != Some(Failure::UnexpectedAdmissionError);
        // Written under the admission lock when admission is on: its start time marks the pod
        // as holding its requests, as the kubelet's first status after admitting it does. A pod
        // the device plugin then refuses holds nothing: its first status is its failure.
        let mut admitted = None;
        if !deleting_at_start && self.admission.load(std::sync::atomic::Ordering::SeqCst) {
            let refused = {
                let _admitting = self
                    .admitting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let pod = self.store.get(&self.pod_type, ns, name)?;
                let refused = self.does_not_fit(&pod, node);
                if refused.is_none() && starts {
                    admitted = Some(self.write_status(ns, name, pending)?);
                }
                refused
            };
            if let Some((reason, msg)) = refused {
                let p = self.write_status(ns, name, |p| {
                    p["status"] = json!({"phase": "Failed", "reason": reason, "message": format!("Pod was rejected: {msg}"),
                        "startTime": clock::now(), "qosClass": p["status"]["qosClass"].clone()});
                })?;
                self.event(&p, "Warning", &reason, &msg, node);
                return Ok(());
            }
        }
        if !deleting_at_start && !starts {
            let gpus = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find_map(|c| c.pointer("/resources/limits/nvidia.com~1gpu").cloned())
                })
                .map_or_else(
                    || "1".to_string(),
                    |v| v.as_str().map_or_else(|| v.to_string(), str::to_string),
                );
            let msg = format!(
                "Allocate failed due to requested number of devices unavailable for nvidia.com/gpu. Requested: {gpus}, Available: 0, which is unexpected"
            );
            let p = self.write_status(ns, name, |p| {
                p["status"] = json!({"phase": "Failed", "reason": "UnexpectedAdmissionError", "message": format!("Pod was rejected: {msg}"),
                    "startTime": clock::now(), "qosClass": p["status"]["qosClass"].clone()});
            })?;
            self.event(&p, "Warning", "UnexpectedAdmissionError", &msg, node);
            return Ok(());
        }
        if !deleting_at_start {
            let p = match admitted {
                Some(p) => p,
                None => self.write_status(ns, name, pending)?,
            };
            if failure == Some(Failure::FailedMount) {
                // As the kubelet's volume manager: it retries with a back-off that doubles from
                // half a second to 2m2s, and warns at each failure (one event, counted).
                let mut backoff = Duration::from_millis(500);
                loop {
                    self.event(&p, "Warning", "FailedMount", "MountVolume.SetUp failed for volume \"data\" : simulated mount failure (sim.agentd.io/fail=FailedMount)", node);
                    if self.sleep_or_killed(backoff, &mut kill).await {
                        return self.kill_pod(ns, name, node, &containers).await;
                    }
                    backoff = (backoff * 2).min(MOUNT_BACKOFF_MAX);
                }
            }
            if self
                .sleep_or_killed(Duration::from_millis(300), &mut kill)
                .await
            {
                return self.kill_pod(ns, name, node, &containers).await;
            }
            let _ = self.write_status(ns, name, |p| {
                set_condition(p, "PodReadyToStartContainers", "True", "", "");
                p["status"]["podIP"] = json!(pod_ip);
                p["status"]["podIPs"] = json!([{"ip": pod_ip}]);
            });
            for (_, image) in &containers {
                self.event(
                    &p,
                    "Normal",
                    "Pulling",
                    &format!("Pulling image \"{image}\""),
                    node,
                );
            }
            if self
                .sleep_or_killed(Duration::from_secs(1), &mut kill)
                .await
            {
                return self.kill_pod(ns, name, node, &containers).await;
            }
            if failure == Some(Failure::ImagePullBackOff) {
                for (_, image) in &containers {
                    self.event(&p, "Warning", "Failed", &format!("Failed to pull image \"{image}\": rpc error: code = NotFound desc = failed to pull and unpack image \"{image}\": not found"), node);
                    self.event(&p, "Warning", "Failed", "Error: ErrImagePull", node);
                }
                let _ = self.write_status(ns, name, |p| {
                    p["status"]["containerStatuses"] = container_statuses(&containers, &json!({"waiting": {"reason": "ErrImagePull", "message": "simulated image pull failure"}}), false, 0, None);
                });
                let mut backoff = Duration::from_secs(10);
                loop {
                    if self.sleep_or_killed(backoff, &mut kill).await {
                        return self.kill_pod(ns, name, node, &containers).await;
                    }
                    for (_, image) in &containers {
                        self.event(
                            &p,
                            "Normal",
                            "BackOff",
                            &format!("Back-off pulling image \"{image}\""),
                            node,
                        );
                        self.event(&p, "Warning", "Failed", "Error: ImagePullBackOff", node);
                    }
                    let _ = self.write_status(ns, name, |p| {
                        p["status"]["containerStatuses"] = container_statuses(&containers, &json!({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}), false, 0, None);
                    });
                    backoff = (backoff * 2).min(Duration::from_mins(5));
                }
            }
            for (_, image) in &containers {
                self.event(&p, "Normal", "Pulled", &format!("Successfully pulled image \"{image}\" in 1s (1s including waiting). Image size: 4269990 bytes."), node);
            }
            // As the kubelet's pod worker: a container whose environment names a Secret or
            // ConfigMap (or a key of one) that does not exist is not created; the pod waits,
            // retried at each sync, until it appears.
            let mut said = None;
            while let Some(message) = self.missing_config(&p) {
                self.event(&p, "Warning", "Failed", &format!("Error: {message}"), node);
                if said.as_ref() != Some(&message) {
                    let _ = self.write_status(ns, name, |p| {
                        p["status"]["containerStatuses"] = container_statuses(&containers, &json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}), false, 0, None);
                    });
                    said = Some(message);
                }
                if self.sleep_or_killed(CONFIG_RETRY, &mut kill).await {
                    return self.kill_pod(ns, name, node, &containers).await;
                }
            }
            for (c, _) in &containers {
                self.event(
                    &p,
                    "Normal",
                    "Created",
                    &format!("Created container: {c}"),
                    node,
                );
                self.event(
                    &p,
                    "Normal",
                    "Started",
                    &format!("Started container {c}"),
                    node,
                );
            }
        }
        let mut restarts = 0i64;
        let mut last_state: Option<Value> = None;
        let mut backoff = Duration::from_secs(10);
        loop {
            if *kill.borrow() {
                return self.kill_pod(ns, name, node, &containers).await;
            }
            let started = clock::now();
            let p = self.write_status(ns, name, |p| {
                p["status"]["phase"] = json!("Running");
                set_condition(p, "Ready", "True", "", "");
                set_condition(p, "ContainersReady", "True", "", "");
                p["status"]["containerStatuses"] = container_statuses(
                    &containers,
                    &json!({"running": {"startedAt": started}}),
                    true,
                    restarts,
                    last_state.as_ref(),
                );
            })?;
            for (c, _) in &containers {
                let text = log_text.clone().unwrap_or_else(|| {
                    format!("kube-sim: container {c} of pod {ns}/{name} started on {node}")
                });
                self.logs.append(ns, name, c, &text);
            }
            let run_for = match (run_seconds, failure) {
                (Some(d), _) => d,
                (None, Some(Failure::OomKilled | Failure::Evicted)) => Duration::from_secs(1),
                (None, _) => {
                    // No run time: the containers run until the pod is deleted, like a server.
                    let _ = kill.wait_for(|k| *k).await;
                    return self.kill_pod(ns, name, node, &containers).await;
                }
            };
            if self.sleep_or_killed(run_for, &mut kill).await {
                return self.kill_pod(ns, name, node, &containers).await;
            }
            let finished = clock::now();
            if failure == Some(Failure::Evicted) {
                let msg = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 51200Ki. ";
                for (c, _) in &containers {
                    self.event(
                        &p,
                        "Normal",
                        "Killing",
                        &format!("Stopping container {c}"),
                        node,
                    );
                }
                let p = self.write_status(ns, name, |p| {
                    p["status"]["phase"] = json!("Failed");
                    p["status"]["reason"] = json!("Evicted");
                    p["status"]["message"] = json!(msg);
                    set_condition(p, "Ready", "False", "PodFailed", "");
                    set_condition(p, "ContainersReady", "False", "PodFailed", "");
                    set_condition(p, "DisruptionTarget", "True", "TerminationByKubelet", msg);
                    p["status"]["containerStatuses"] = container_statuses(&containers, &json!({"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown", "message": "The container could not be located when the pod was terminated", "startedAt": started, "finishedAt": finished}}), false, restarts, last_state.as_ref());
                })?;
                self.event(&p, "Warning", "Evicted", msg, node);
                return Ok(());
            }
            let (code, reason) = match failure {
                Some(Failure::OomKilled) => (137, "OOMKilled"),
                _ if exit_code == 0 => (0, "Completed"),
                _ => (exit_code, "Error"),
            };
            for (c, _) in &containers {
                self.logs.append(
                    ns,
                    name,
                    c,
                    &format!("kube-sim: container {c} exited with code {code}"),
                );
            }
            let terminated = json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished,
                                                   "containerID": format!("containerd://{}", clock::random_hex(64))}});
            let restart = match restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
            if !restart {
                let phase = if code == 0 { "Succeeded" } else { "Failed" };
                let cond_reason = if code == 0 {
                    "PodCompleted"
                } else {
                    "PodFailed"
                };
                self.write_status(ns, name, |p| {
                    p["status"]["phase"] = json!(phase);
                    set_condition(p, "Ready", "False", cond_reason, "");
                    set_condition(p, "ContainersReady", "False", cond_reason, "");
                    set_condition(p, "PodReadyToStartContainers", "False", "", "");
                    p["status"]["containerStatuses"] = container_statuses(
                        &containers,
                        &terminated,
                        false,
                        restarts,
                        last_state.as_ref(),
                    );
                })?;
                return Ok(());
            }
            last_state = Some(terminated.clone());
            let p = self.write_status(ns, name, |p| {
                set_condition(p, "Ready", "False", "ContainersNotReady", &format!("containers with unready status: [{}]", names(&containers)));
                set_condition(p, "ContainersReady", "False", "ContainersNotReady", &format!("containers with unready status: [{}]", names(&containers)));
                let waiting = json!({"waiting": {"reason": "CrashLoopBackOff",
                    "message": format!("back-off {}s restarting failed container pod={name}_{ns}", backoff.as_secs())}});
                p["status"]["containerStatuses"] = container_statuses(&containers, &waiting, false, restarts, last_state.as_ref());
            })?;
            for (c, _) in &containers {
                self.event(
                    &p,
                    "Warning",
                    "BackOff",
                    &format!(
                        "Back-off restarting failed container {c} in pod {name}_{ns}({})",
                        s(&p, "/metadata/uid")
                    ),
                    node,
                );
            }
            if self.sleep_or_killed(backoff, &mut kill).await {
                return self.kill_pod(ns, name, node, &containers).await;
            }
            backoff = (backoff * 2).min(Duration::from_mins(5));
            restarts += 1;
            for (c, image) in &containers {
                self.event(
                    &p,
                    "Normal",
                    "Pulled",
                    &format!("Container image \"{image}\" already present on machine"),
                    node,
                );
                self.event(
                    &p,
                    "Normal",
                    "Created",
                    &format!("Created container: {c}"),
                    node,
                );
                self.event(
                    &p,
                    "Normal",
                    "Started",
                    &format!("Started container {c}"),
                    node,
                );
            }
        }
    }

    /// Graceful termination: Killing events, terminated container states, then the kubelet's
    /// final delete with grace period zero.
    async fn kill_pod(
        &self,
        ns: &str,
        name: &str,
        node: &str,
        containers: &[(String, String)],
    ) -> Result<(), StoreError> {
        let pod = self.store.get(&self.pod_type, ns, name)?;
        let grace = pod
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let running = pod
            .pointer("/status/containerStatuses")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c.pointer("/state/running").is_some()));
        if running {
            for (c, _) in containers {
                self.event(
                    &pod,
                    "Normal",
                    "Killing",
                    &format!("Stopping container {c}"),
                    node,
                );
            }
        }
        // Containers in the simulation stop promptly on SIGTERM, well inside the grace period.
        tokio::time::sleep(
            self.real(Duration::from_millis(500).min(Duration::from_secs(grace.max(0) as u64))),
        )
        .await;
        let finished = clock::now();
        let _ = self.write_status(ns, name, |p| {
            if running {
                let started = p.pointer("/status/containerStatuses/0/state/running/startedAt").cloned().unwrap_or(Value::Null);
                p["status"]["containerStatuses"] = container_statuses(containers, &json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": finished}}), false,
                    p.pointer("/status/containerStatuses/0/restartCount").and_then(Value::as_i64).unwrap_or(0), None);
            }
            set_condition(p, "Ready", "False", "PodCompleted", "");
        });
        let opts = DeleteOptions {
            grace_period_seconds: Some(0),
            ..DeleteOptions::default()
        };
        self.store.delete(&self.pod_type, ns, name, &opts)?;
        Ok(())
    }
}

impl Kubelets {
    /// What the kubelet cannot make a container's environment from, as it says it (the
    /// message of `CreateContainerConfigError`): a Secret or ConfigMap that a container's
    /// `env[].valueFrom` or `envFrom` names and that does not exist, or a key it names that the
    /// object lacks, unless the reference is `optional`.
    fn missing_config(&self, pod: &Value) -> Option<String> {
        let ns = s(pod, "/metadata/namespace");
        let spec = pod.get("spec")?;
        let containers = ["initContainers", "containers"]
            .iter()
            .filter_map(|k| spec.get(*k).and_then(Value::as_array))
            .flatten();
        for c in containers {
            let refs = c
                .get("env")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let from = e.get("valueFrom")?;
                    [
                        ("secretKeyRef", "secrets"),
                        ("configMapKeyRef", "configmaps"),
                    ]
                    .iter()
                    .find_map(|(k, plural)| Some((*plural, from.get(*k)?, true)))
                })
                .chain(
                    c.get("envFrom")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|f| {
                            [("secretRef", "secrets"), ("configMapRef", "configmaps")]
                                .iter()
                                .find_map(|(k, plural)| Some((*plural, f.get(*k)?, false)))
                        }),
                );
            for (plural, r, keyed) in refs {
                if r.get("optional").and_then(Value::as_bool) == Some(true) {
                    continue;
                }
                let (kind, short) = if plural == "secrets" {
                    ("Secret", "secret")
                } else {
                    ("ConfigMap", "configmap")
                };
                let object = s(r, "/name");
                let found = self
                    .store
                    .resource_type("", "v1", plural)
                    .and_then(|t| self.store.get(&t, ns, object).ok());
                let Some(found) = found else {
                    return Some(format!("{short} {object:?} not found"));
                };
                let key = s(r, "/key");
                let has = |field: &str| found.get(field).and_then(|d| d.get(key)).is_some();
                if keyed && !has("data") && !has("stringData") && !has("binaryData") {
                    return Some(format!("couldn't find key {key} in {kind} {ns}/{object}"));
                }
            }
        }
        None
    }
}

fn names(containers: &[(String, String)]) -> String {
    containers
        .iter()
        .map(|(c, _)| c.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

fn container_statuses(
    containers: &[(String, String)],
    state: &Value,
    ready: bool,
    restarts: i64,
    last: Option<&Value>,
) -> Value {
    Value::Array(
        containers
            .iter()
            .map(|(c, image)| {
                json!({"name": c, "image": image, "imageID": format!("{image}@sha256:{}", "0".repeat(64)),
                       "containerID": format!("containerd://{:0>64}", c), "ready": ready, "started": state.get("running").is_some(),
                       "restartCount": restarts, "state": state, "lastState": last.cloned().unwrap_or(json!({}))})
            })
            .collect(),
    )
}

fn set_condition(p: &mut Value, type_: &str, status: &str, reason: &str, message: &str) {
    let now = clock::now();
    if !p["status"]["conditions"].is_array() {
        p["status"]["conditions"] = json!([]);
    }
    let conds = p["status"]["conditions"].as_array_mut().expect("set above");
    let mut c =
        json!({"type": type_, "status": status, "lastProbeTime": null, "lastTransitionTime": now});
    if !reason.is_empty() {
        c["reason"] = json!(reason);
    }
    if !message.is_empty() {
        c["message"] = json!(message);
    }
    match conds.iter_mut().find(|x| x["type"] == type_) {
        Some(existing) => {
            if existing["status"] == status {
                c["lastTransitionTime"] = existing["lastTransitionTime"].clone();
            }
            *existing = c;
        }
        None => conds.push(c),
    }
}
