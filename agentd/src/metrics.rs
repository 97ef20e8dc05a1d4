//! The agent's Prometheus metrics and the `/metrics` HTTP endpoint.
//!
//! [`Metrics`] owns every metric family the agent exports and registers them into a registry the
//! caller passes in. Two kinds of series live here:
//!
//! - **Events** the core loop reports as they happen (job transitions, gang restarts, scheduling
//!   passes, API requests) are ordinary counters and histograms.
//! - **State** (GPUs, node capacity and allocation, jobs by state, queue depth) is *set* by the
//!   core loop and the inventory refresh loop into one [`MetricsState`] behind a lock, and a
//!   [`Collector`] turns that state into series when Prometheus scrapes. A scrape therefore never
//!   calls NVML or touches the scheduler: it reads what the agent already holds, and it sees one
//!   consistent snapshot (a GPU's series never mix two inventory samples).
//!
//! Names follow the Prometheus exporter rules: an `agentd_` prefix, base units (bytes, seconds,
//! celsius, watts, joules, ratios 0..1), `_total` only on counters, versions only in
//! `agentd_build_info`, and no hostname label (Prometheus adds `instance`). Nothing here exports
//! what node_exporter already does about the machine (CPU, memory, disks).
//!
//! This module must not decide anything: it records what the core tells it.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use agentd_api::NodeInventory;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::sched::Resources;

/// The content type of the Prometheus text format, served unless the scraper asks for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics text, served when the `Accept` header asks for it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The job states a queue is reported in, so that a state with no jobs reads 0 rather than
/// vanishing (a vanished series breaks `rate()` and alert `for:` clauses).
pub const JOB_STATES: [&str; 8] = [
    "Queued",
    "Placed",
    "Starting",
    "Running",
    "Restarting",
    "Succeeded",
    "Failed",
    "Cancelled",
];

/// Upper bounds of the scheduling-pass histogram, seconds: a pass over a few jobs takes tens of
/// microseconds, a pass over thousands of queued gangs on a large cluster up to seconds.
const SCHEDULING_PASS_BUCKETS: [f64; 14] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upper bounds of the submit-to-running histogram, seconds: from an idle node (about a second)
/// to a job that waited hours for a full gang.
const SUBMIT_TO_RUNNING_BUCKETS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen for metrics on {addr}: {source} (set --metrics-addr to a free address, or `off`)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the metrics listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// What the agent holds that the scrape-time collector reads. Set through [`Metrics`]; never
/// exposed, so the only way to change it is one of the `set_*`/`observe_*` calls.
#[derive(Debug, Default)]
struct MetricsState {
    /// The latest inventory; `None` until the first refresh.
    inventory: Option<NodeInventory>,
    /// Jobs per (queue, state).
    jobs: BTreeMap<(String, String), u64>,
    queue_depth: BTreeMap<String, u64>,
    queue_overdue: BTreeMap<String, u64>,
    /// When each queued job's `scheduleTimeoutSeconds` runs out, by queue: counted overdue at
    /// scrape time, so the count rises even when the loop that should fail them is stuck.
    queue_deadlines: BTreeMap<String, Vec<std::time::Instant>>,
    nodes: BTreeMap<String, NodeAllocation>,
    up: bool,
}

/// What the scheduler sees of one node: its capacity and what running gangs hold of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeAllocation {
    pub capacity: Resources,
    pub allocated: Resources,
    /// False when the node is drained, not ready or lost.
    pub schedulable: bool,
}

type Labels = Vec<(&'static str, String)>;

/// How long past its schedule time-out a waiting job is before it counts as overdue: the core
/// fails such a job within a tick (250 ms), so this much later it has stopped doing so.
pub const OVERDUE_GRACE: Duration = Duration::from_secs(5);

/// Every metric the agent exports. Cheap to clone: all fields are shared handles, so the core
/// loop, the API server and the inventory refresh loop can each hold one.
#[derive(Debug, Clone)]
pub struct Metrics {
    state: Arc<RwLock<MetricsState>>,
    job_transitions: Family<Labels, Counter>,
    gang_restarts: Family<Labels, Counter>,
    job_failures: Family<Labels, Counter>,
    api_requests: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    scheduling_pass: Histogram,
    submit_to_running: Histogram,
    cluster_connected: Gauge,
    cluster_requests: Family<Labels, Counter>,
    leader: Gauge,
    leader_transitions: Counter,
    jobs_finished: Family<Labels, Counter>,
    job_gpu_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// The users with a `user` label of their own (see [`MAX_USER_LABELS`]).
    gpu_users: Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

/// Users who get a `user` label of their own on `agentd_job_gpu_seconds_total`: the first this
/// many to finish a job since the agent started; everyone after them is counted as `other`, so
/// that the series stay bounded however many users a node serves.
pub const MAX_USER_LABELS: usize = 50;

impl Metrics {
    /// Creates the metrics and registers them, and the scrape-time collector, into `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let state = Arc::new(RwLock::new(MetricsState::default()));
        let job_transitions = Family::<Labels, Counter>::default();
        let gang_restarts = Family::<Labels, Counter>::default();
        let job_failures = Family::<Labels, Counter>::default();
        let api_requests = Family::<Labels, Counter>::default();
        let refusals = Family::<Labels, Counter>::default();
        let scheduling_pass = Histogram::new(SCHEDULING_PASS_BUCKETS);
        let submit_to_running = Histogram::new(SUBMIT_TO_RUNNING_BUCKETS);

        registry.register(
            "agentd_job_transitions",
            "Job state transitions, by queue and the states left and entered",
            job_transitions.clone(),
        );
        registry.register(
            "agentd_gang_restarts",
            "Whole-gang restarts, by the failure class that caused them",
            gang_restarts.clone(),
        );
        registry.register(
            "agentd_job_failures",
            "Replica failures by class: OOMKilled, and in cluster mode what the platform did \
             (VolumeMountFailed, ImagePullFailed, ContainerConfigFailed, Evicted, NodeRefused, NodeLost)",
            job_failures.clone(),
        );
        registry.register(
            "agentd_api_requests",
            "Requests served on the agent's API, by route and HTTP status",
            api_requests.clone(),
        );
        registry.register(
            "agentd_refusals",
            "Connections and requests refused to protect the agent, by listener and reason \
             (connection_limit, rate_limit, body_timeout)",
            refusals.clone(),
        );
        registry.register(
            "agentd_scheduling_pass_duration_seconds",
            "Time one scheduling pass took",
            scheduling_pass.clone(),
        );
        registry.register(
            "agentd_job_submit_to_running_seconds",
            "Time from a job's submission until all of its gang was running",
            submit_to_running.clone(),
        );
        let cluster_connected = Gauge::default();
        let cluster_requests = Family::<Labels, Counter>::default();
        registry.register(
            "agentd_cluster_connected",
            "Cluster mode: 1 while the Kubernetes API server answers the agent, 0 while it is unreachable or failing",
            cluster_connected.clone(),
        );
        registry.register(
            "agentd_cluster_requests",
            "Cluster mode: requests to the Kubernetes API server, by verb and HTTP status (<error> where none came back)",
            cluster_requests.clone(),
        );
        let leader = Gauge::default();
        let leader_transitions = Counter::default();
        registry.register(
            "agentd_leader",
            "Cluster mode: 1 while this agent is the elected leader, else 0",
            leader.clone(),
        );
        registry.register(
            "agentd_leader_transitions",
            "Cluster mode: times this agent started or stopped leading",
            leader_transitions.clone(),
        );
        let jobs_finished = Family::<Labels, Counter>::default();
        registry.register(
            "agentd_jobs_finished",
            "Jobs that finished, by queue and final reason (Succeeded, ReplicaFailed, \
             BackoffLimitExceeded, Cancelled, ...)",
            jobs_finished.clone(),
        );
        let job_gpu_seconds =
            Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "agentd_job_gpu_seconds",
            "GPU-seconds of finished jobs (GPUs held times run time), by queue and user; users \
             beyond the first 50 to finish a job since the agent started are counted as user=\"other\"",
            job_gpu_seconds.clone(),
        );
        registry.register_collector(Box::new(StateCollector {
            state: Arc::clone(&state),
            version: env!("CARGO_PKG_VERSION"),
        }));

        Self {
            state,
            job_transitions,
            gang_restarts,
            job_failures,
            api_requests,
            refusals,
            scheduling_pass,
            submit_to_running,
            cluster_connected,
            cluster_requests,
            leader,
            leader_transitions,
            jobs_finished,
            job_gpu_seconds,
            gpu_users: Arc::default(),
        }
    }

    /// Sets `agentd_leader`; a change counts in `agentd_leader_transitions_total`.
    pub fn set_leader(&self, leading: bool) {
        let was = self.leader.set(i64::from(leading));
        if was != i64::from(leading) {
            self.leader_transitions.inc();
        }
    }

    /// Counts a job that finished, and the GPU-seconds it used under its user (or `other`).
    pub fn job_finished(&self, status: &agentd_api::jobs::JobStatus) {
        self.jobs_finished
            .get_or_create(&vec![
                ("queue", status.queue.clone()),
                ("reason", status.reason.clone()),
            ])
            .inc();
        let user = status.owner.as_ref().map_or("-", |o| o.user.as_str());
        let user = {
            let mut users = self
                .gpu_users
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if users.contains(user) || users.len() < MAX_USER_LABELS {
                users.insert(user.to_owned());
                user.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.job_gpu_seconds
            .get_or_create(&vec![("queue", status.queue.clone()), ("user", user)])
            .inc_by(crate::store::history::gpu_seconds(status));
    }

    /// Sets `agentd_cluster_connected`.
    pub fn set_cluster_connected(&self, connected: bool) {
        self.cluster_connected.set(i64::from(connected));
    }

    /// Counts one request to the Kubernetes API server.
    pub fn cluster_request(&self, verb: &str, code: &str) {
        self.cluster_requests
            .get_or_create(&vec![("verb", verb.to_owned()), ("code", code.to_owned())])
            .inc();
    }

    /// Records the inventory the refresh loop just sampled; GPU series are read from it on scrape.
    pub fn observe_inventory(&self, inventory: &NodeInventory) {
        self.write().inventory = Some(inventory.clone());
    }

    /// Sets `agentd_up`: 1 once the agent serves its API with an inventory and a live core loop,
    /// 0 while starting, stopping or when the core loop has stalled.
    pub fn set_up(&self, up: bool) {
        self.write().up = up;
    }

    /// Counts one job state transition.
    pub fn job_state_changed(&self, queue: &str, from: &str, to: &str) {
        self.job_transitions
            .get_or_create(&vec![
                ("queue", queue.to_owned()),
                ("from", from.to_owned()),
                ("to", to.to_owned()),
            ])
            .inc();
    }

    /// Counts one whole-gang restart; `reason` is the failure class (`OOMKilled`, `NodeLost`, ...).
    pub fn gang_restarted(&self, reason: &str) {
        self.gang_restarts
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// Counts one classified replica failure (`OOMKilled`, `Evicted`, ...).
    pub fn job_failure(&self, reason: &str) {
        self.job_failures
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    /// Records how long one scheduling pass took.
    pub fn scheduling_pass(&self, duration: Duration) {
        self.scheduling_pass.observe(duration.as_secs_f64());
    }

    /// Records how long a job took from submission until its whole gang was running.
    pub fn submit_to_running(&self, duration: Duration) {
        self.submit_to_running.observe(duration.as_secs_f64());
    }

    /// Counts one API request. `route` is the route pattern (`/v1/jobs/{name}`), never the raw
    /// path, so that job names do not become series.
    pub fn api_request(&self, route: &str, status: u16) {
        self.api_requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// Counts a connection or request refused on `listener` (`socket`, `metrics`) for `reason`.
    pub fn refused(&self, listener: &str, reason: &str) {
        self.refusals
            .get_or_create(&vec![
                ("listener", listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    /// Replaces the job counts. Every queue named here is reported in all [`JOB_STATES`], 0 where
    /// absent; a queue no longer named disappears.
    pub fn set_jobs<'a>(&self, counts: impl IntoIterator<Item = (&'a str, &'a str, u64)>) {
        let jobs = counts
            .into_iter()
            .map(|(queue, state, n)| ((queue.to_owned(), state.to_owned()), n))
            .collect();
        self.write().jobs = jobs;
    }

    /// Sets how many jobs wait in `queue`.
    pub fn set_queue_depth(&self, queue: &str, n: u64) {
        self.write().queue_depth.insert(queue.to_owned(), n);
    }

    /// Sets how many jobs of `queue` have waited longer than their `scheduleTimeoutSeconds`.
    /// The scheduler fails such jobs, so a value above 0 that persists means it is not running.
    pub fn set_queue_overdue(&self, queue: &str, n: u64) {
        self.write().queue_overdue.insert(queue.to_owned(), n);
    }

    /// Sets when the schedule time-outs of the jobs waiting in `queue` run out. A job still
    /// waiting [`OVERDUE_GRACE`] past its time-out is counted in `agentd_queue_overdue_jobs`:
    /// the core fails such jobs within a tick, so one counted means the core is not running.
    pub fn set_queue_deadlines(&self, queue: &str, deadlines: Vec<std::time::Instant>) {
        self.write()
            .queue_deadlines
            .insert(queue.to_owned(), deadlines);
    }

    /// Forgets a queue that was removed from the configuration.
    pub fn remove_queue(&self, queue: &str) {
        let mut state = self.write();
        state.queue_depth.remove(queue);
        state.queue_overdue.remove(queue);
        state.queue_deadlines.remove(queue);
        state.jobs.retain(|(q, _), _| q != queue);
    }

    /// Sets the capacity and allocation of every node the scheduler places on, as it sees
    /// them (one node standalone, the cluster's nodes on the leader); a node not among them
    /// (one that left the cluster) is forgotten.
    pub fn set_node_allocations<'a>(
        &self,
        nodes: impl IntoIterator<Item = (&'a str, NodeAllocation)>,
    ) {
        let mut now: HashMap<&str, NodeAllocation> = nodes.into_iter().collect();
        let mut state = self.write();
        state
            .nodes
            .retain(|name, allocation| match now.remove(name.as_str()) {
                Some(new) => {
                    *allocation = new;
                    true
                }
                None => false,
            });
        for (name, allocation) in now {
            state.nodes.insert(name.to_owned(), allocation);
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MetricsState> {
        // A panic while holding this lock cannot leave the state half-written in a way that
        // matters (every write replaces whole values), so a poisoned lock is still usable.
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Encodes [`MetricsState`] at scrape time.
#[derive(Debug)]
struct StateCollector {
    state: Arc<RwLock<MetricsState>>,
    version: &'static str,
}

/// One metric family being written: a descriptor followed by its samples.
struct FamilyWriter<'a> {
    encoder: prometheus_client::encoding::MetricEncoder<'a>,
}

impl FamilyWriter<'_> {
    fn gauge(&mut self, labels: &Labels, value: f64) -> Result<(), std::fmt::Error> {
        let encoder = self.encoder.encode_family(labels)?;
        match whole(value) {
            Some(n) => ConstGauge::new(n).encode(encoder),
            None => ConstGauge::new(value).encode(encoder),
        }
    }

    fn counter(&mut self, labels: &Labels, value: f64) -> Result<(), std::fmt::Error> {
        let encoder = self.encoder.encode_family(labels)?;
        match whole(value) {
            Some(n) if n >= 0 => ConstCounter::new(n as u64).encode(encoder),
            _ => ConstCounter::new(value).encode(encoder),
        }
    }
}

/// `value` as an integer when it is one, so counts and bytes read `2`, not `2.0`.
fn whole(value: f64) -> Option<i64> {
    // 2^53: beyond it not every integer is an f64, so the float is the honest form.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    (value.fract() == 0.0 && value.abs() <= EXACT).then_some(value as i64)
}

fn family<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    metric_type: MetricType,
) -> Result<FamilyWriter<'a>, std::fmt::Error> {
    Ok(FamilyWriter {
        encoder: encoder.encode_descriptor(name, help, None, metric_type)?,
    })
}

/// The labels that say which GPU a series is about.
fn gpu_labels(gpu: &agentd_api::GpuInfo) -> Labels {
    vec![
        ("gpu", gpu.index.to_string()),
        ("uuid", gpu.uuid.clone()),
        ("model", gpu.name.clone()),
        ("pci_bus_id", gpu.pci_bus_id.clone()),
    ]
}

fn with(mut labels: Labels, key: &'static str, value: String) -> Labels {
    labels.push((key, value));
    labels
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let none = Labels::new();

        family(
            &mut encoder,
            "agentd_build_info",
            "The agent's version; always 1",
            MetricType::Gauge,
        )?
        .gauge(&vec![("version", self.version.to_owned())], 1.0)?;
        family(
            &mut encoder,
            "agentd_up",
            "1 when the agent has an inventory and its core loop is live, else 0",
            MetricType::Gauge,
        )?
        .gauge(&none, f64::from(u8::from(state.up)))?;

        encode_inventory(&mut encoder, state.inventory.as_ref())?;
        encode_jobs(&mut encoder, &state)?;
        encode_nodes(&mut encoder, &state.nodes)?;
        Ok(())
    }
}

/// A GPU gauge: how to read it from one GPU, `None` where that GPU does not report it.
type GpuGauge = (
    &'static str,
    &'static str,
    fn(&agentd_api::GpuInfo) -> Option<f64>,
);

const GPU_GAUGES: [GpuGauge; 8] = [
    (
        "agentd_gpu_utilization_ratio",
        "Share of the last sample period in which a kernel ran on the GPU, 0..1",
        |g| Some(f64::from(g.utilization_gpu_percent) / 100.0),
    ),
    (
        "agentd_gpu_memory_utilization_ratio",
        "Share of the last sample period in which device memory was read or written, 0..1",
        |g| Some(f64::from(g.utilization_memory_percent) / 100.0),
    ),
    (
        "agentd_gpu_memory_used_bytes",
        "Device memory in use",
        |g| Some(g.memory_used_bytes as f64),
    ),
    (
        "agentd_gpu_memory_total_bytes",
        "Device memory in total",
        |g| Some(g.memory_total_bytes as f64),
    ),
    (
        "agentd_gpu_temperature_celsius",
        "GPU core temperature",
        |g| g.temperature_celsius.map(f64::from),
    ),
    ("agentd_gpu_power_watts", "Power the GPU draws", |g| {
        g.power_usage_watts
    }),
    (
        "agentd_gpu_power_limit_watts",
        "The GPU's enforced power limit",
        |g| g.power_limit_watts,
    ),
    (
        "agentd_gpu_healthy",
        "1 when the GPU passes the agent's health checks, else 0",
        |g| Some(f64::from(u8::from(g.healthy))),
    ),
];

fn encode_inventory(
    encoder: &mut DescriptorEncoder<'_>,
    inventory: Option<&NodeInventory>,
) -> Result<(), std::fmt::Error> {
    let Some(inventory) = inventory else {
        // Before the first refresh there is nothing true to say about GPUs; agentd_up is 0.
        return Ok(());
    };
    let none = Labels::new();
    family(
        encoder,
        "agentd_gpus",
        "GPUs the agent can see on this node",
        MetricType::Gauge,
    )?
    .gauge(&none, inventory.gpus.len() as f64)?;
    family(
        encoder,
        "agentd_inventory_sampled_timestamp_seconds",
        "When the inventory these series come from was sampled, seconds since the Unix epoch",
        MetricType::Gauge,
    )?
    .gauge(&none, inventory.sampled_at)?;
    if let Some(driver) = &inventory.gpu_driver {
        family(
            encoder,
            "agentd_gpu_driver_info",
            "The NVIDIA driver and CUDA versions; always 1",
            MetricType::Gauge,
        )?
        .gauge(
            &vec![
                ("driver_version", driver.driver_version.clone()),
                ("cuda_version", driver.cuda_version.clone()),
            ],
            1.0,
        )?;
    }
    if inventory.gpus.is_empty() {
        return Ok(());
    }

    let labels: Vec<Labels> = inventory.gpus.iter().map(gpu_labels).collect();
    for (name, help, read) in GPU_GAUGES {
        let values: Vec<(usize, f64)> = inventory
            .gpus
            .iter()
            .enumerate()
            .filter_map(|(i, g)| read(g).map(|v| (i, v)))
            .collect();
        if values.is_empty() {
            continue;
        }
        let mut writer = family(encoder, name, help, MetricType::Gauge)?;
        for (i, value) in values {
            writer.gauge(&labels[i], value)?;
        }
    }

    if inventory.gpus.iter().any(|g| g.energy_joules.is_some()) {
        let mut writer = family(
            encoder,
            "agentd_gpu_energy_joules",
            "Energy the GPU consumed since the driver loaded",
            MetricType::Counter,
        )?;
        for (gpu, labels) in inventory.gpus.iter().zip(&labels) {
            if let Some(joules) = gpu.energy_joules {
                writer.counter(labels, joules)?;
            }
        }
    }
    if inventory.gpus.iter().any(|g| g.ecc_errors.is_some()) {
        let mut writer = family(
            encoder,
            "agentd_gpu_ecc_errors",
            "Volatile ECC errors since the driver loaded, by type (corrected, uncorrected)",
            MetricType::Counter,
        )?;
        for (gpu, labels) in inventory.gpus.iter().zip(&labels) {
            if let Some(ecc) = gpu.ecc_errors {
                writer.counter(
                    &with(labels.clone(), "type", "corrected".into()),
                    ecc.corrected as f64,
                )?;
                writer.counter(
                    &with(labels.clone(), "type", "uncorrected".into()),
                    ecc.uncorrected as f64,
                )?;
            }
        }
    }
    if inventory.gpus.iter().any(|g| !g.xid_errors.is_empty()) {
        let mut writer = family(
            encoder,
            "agentd_gpu_xid_errors",
            "XID errors the driver reported since the agent started, by XID",
            MetricType::Counter,
        )?;
        for (gpu, labels) in inventory.gpus.iter().zip(&labels) {
            for xid in &gpu.xid_errors {
                writer.counter(
                    &with(labels.clone(), "xid", xid.xid.to_string()),
                    xid.count as f64,
                )?;
            }
        }
    }
    Ok(())
}

fn encode_jobs(
    encoder: &mut DescriptorEncoder<'_>,
    state: &MetricsState,
) -> Result<(), std::fmt::Error> {
    let mut queues: Vec<&String> = state.jobs.keys().map(|(q, _)| q).collect();
    queues.extend(state.queue_depth.keys());
    queues.sort();
    queues.dedup();
    if !queues.is_empty() {
        let mut writer = family(
            encoder,
            "agentd_jobs",
            "Jobs by queue and state",
            MetricType::Gauge,
        )?;
        for queue in &queues {
            let extra = state
                .jobs
                .keys()
                .filter(|(q, s)| q == *queue && !JOB_STATES.contains(&s.as_str()))
                .map(|(_, s)| s.as_str());
            for job_state in JOB_STATES.into_iter().chain(extra) {
                let n = state
                    .jobs
                    .get(&((*queue).clone(), job_state.to_owned()))
                    .copied()
                    .unwrap_or(0);
                writer.gauge(
                    &vec![("queue", (*queue).clone()), ("state", job_state.to_owned())],
                    n as f64,
                )?;
            }
        }
    }
    let mut overdue = state.queue_overdue.clone();
    let now = std::time::Instant::now();
    for (queue, deadlines) in &state.queue_deadlines {
        let late = deadlines
            .iter()
            .filter(|d| now > **d + OVERDUE_GRACE)
            .count() as u64;
        *overdue.entry(queue.clone()).or_default() += late;
    }
    for (name, help, values) in [
        (
            "agentd_queue_depth",
            "Jobs waiting to be placed, by queue",
            &state.queue_depth,
        ),
        (
            "agentd_queue_overdue_jobs",
            "Jobs that have waited longer than their scheduleTimeoutSeconds, by queue",
            &overdue,
        ),
    ] {
        if values.is_empty() {
            continue;
        }
        let mut writer = family(encoder, name, help, MetricType::Gauge)?;
        for (queue, n) in values {
            writer.gauge(&vec![("queue", queue.clone())], *n as f64)?;
        }
    }
    Ok(())
}

/// A node-resource gauge: how to read it from one node's allocation.
type NodeGauge = (&'static str, &'static str, fn(&NodeAllocation) -> f64);

const MIB: f64 = 1024.0 * 1024.0;

const NODE_GAUGES: [NodeGauge; 7] = [
    (
        "agentd_node_capacity_gpus",
        "GPUs the scheduler may place on the node",
        |n| f64::from(n.capacity.gpus),
    ),
    (
        "agentd_node_allocated_gpus",
        "GPUs running gangs hold on the node",
        |n| f64::from(n.allocated.gpus),
    ),
    (
        "agentd_node_capacity_cpu_cores",
        "CPU cores the scheduler may place on the node",
        |n| n.capacity.cpu_milli as f64 / 1000.0,
    ),
    (
        "agentd_node_allocated_cpu_cores",
        "CPU cores running gangs hold on the node",
        |n| n.allocated.cpu_milli as f64 / 1000.0,
    ),
    (
        "agentd_node_capacity_memory_bytes",
        "Memory the scheduler may place on the node",
        |n| n.capacity.memory_mib as f64 * MIB,
    ),
    (
        "agentd_node_allocated_memory_bytes",
        "Memory running gangs hold on the node",
        |n| n.allocated.memory_mib as f64 * MIB,
    ),
    (
        "agentd_node_schedulable",
        "1 when new gangs may be placed on the node, 0 when drained or lost",
        |n| f64::from(u8::from(n.schedulable)),
    ),
];

fn encode_nodes(
    encoder: &mut DescriptorEncoder<'_>,
    nodes: &BTreeMap<String, NodeAllocation>,
) -> Result<(), std::fmt::Error> {
    if nodes.is_empty() {
        return Ok(());
    }
    for (name, help, read) in NODE_GAUGES {
        let mut writer = family(encoder, name, help, MetricType::Gauge)?;
        for (node, allocation) in nodes {
            writer.gauge(&vec![("node", node.clone())], read(allocation))?;
        }
    }
    Ok(())
}

/// Which exposition format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: what `curl` and `promtool check metrics` read.
    Text,
    /// OpenMetrics 1.0 text: what Prometheus asks for first.
    OpenMetrics,
}

impl Format {
    /// Picks the format from an `Accept` header: OpenMetrics only when asked for by name.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => TEXT_CONTENT_TYPE,
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// Encodes the registry in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut body = String::with_capacity(16 * 1024);
    match format {
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut body, registry)?,
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut body, registry)?,
    }
    Ok(body)
}

/// The daemon's metrics endpoint, bound and running.
#[derive(Debug)]
pub struct Exporter {
    /// The handle the core loop and API server report through.
    pub metrics: Metrics,
    /// Where it listens (the configured address, with the real port if that was 0).
    pub addr: SocketAddr,
    /// Ends after `stop` turns true and the scrapes in flight are answered.
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `addr` (so a taken port fails start-up, not some later scrape), registers the metrics,
/// and serves them until `stop` turns true. Every inventory the refresh loop publishes on
/// `inventory` is observed, so scrapes read the latest one and never call NVML.
pub async fn start_exporter(
    addr: SocketAddr,
    max_connections: u32,
    mut inventory: tokio::sync::watch::Receiver<Arc<NodeInventory>>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Exporter, MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(MetricsError::LocalAddr)?;
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.observe_inventory(&inventory.borrow_and_update());

    let observer = metrics.clone();
    let observer_metrics = metrics.clone();
    let mut observer_stop = stop.clone();
    let task = tokio::spawn(async move {
        let observe = async move {
            loop {
                tokio::select! {
                    changed = inventory.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let latest = Arc::clone(&inventory.borrow_and_update());
                        observer.observe_inventory(&latest);
                    }
                    _ = observer_stop.wait_for(|stop| *stop) => break,
                }
            }
        };
        let cap = crate::api::limits::ConnectionCap::new(
            "metrics",
            max_connections,
            Some(observer_metrics),
        );
        let serve = serve_metrics_capped(listener, Arc::new(registry), cap, wait_for_stop(stop));
        let ((), served) = tokio::join!(observe, serve);
        if let Err(error) = served {
            tracing::error!(%error, "metrics endpoint failed");
        }
    });
    Ok(Exporter {
        metrics,
        addr,
        task,
    })
}

async fn wait_for_stop(mut stop: tokio::sync::watch::Receiver<bool>) {
    // A dropped sender means the agent is going away: stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Serves `GET /metrics` on `addr` until `shutdown` completes, then finishes the scrapes in
/// flight and returns.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: impl Future,
) -> Result<(), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    serve_metrics_on(listener, registry, shutdown).await
}

/// [`serve_metrics`] on a listener the caller bound (port 0 in tests, to learn the port first).
pub async fn serve_metrics_on(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl Future,
) -> Result<(), MetricsError> {
    let cap = crate::api::limits::ConnectionCap::new(
        "metrics",
        crate::api::limits::DEFAULT_MAX_CONNECTIONS,
        None,
    );
    serve_metrics_capped(listener, registry, cap, shutdown).await
}

/// Serves metrics holding at most `cap` connections open; a client gets
/// [`DEFAULT_HEADER_TIMEOUT`](crate::api::limits::DEFAULT_HEADER_TIMEOUT) to send a request and
/// no longer to sit idle between requests, so idle connections cannot pile up.
pub async fn serve_metrics_capped(
    listener: TcpListener,
    registry: Arc<Registry>,
    cap: crate::api::limits::ConnectionCap,
    shutdown: impl Future,
) -> Result<(), MetricsError> {
    let addr = listener.local_addr().map_err(MetricsError::LocalAddr)?;
    tracing::info!(%addr, "serving metrics on http://{addr}/metrics");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = async { shutdown.as_mut().await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors or a connection reset before accept: the listener
                    // itself is fine, so wait a moment instead of spinning, and keep serving.
                    tracing::warn!(%error, "cannot accept a metrics connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(permit) = cap.admit() else {
            drop(stream);
            continue;
        };
        let registry = Arc::clone(&registry);
        let service = hyper::service::service_fn(move |request| {
            let registry = Arc::clone(&registry);
            async move { Ok::<_, Infallible>(respond(&registry, &request)) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(crate::api::limits::DEFAULT_HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        });
    }
    // A scrape takes milliseconds; do not let a stuck client hold up the agent's shutdown.
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("metrics connections still open after 5s; closing them");
    }
    Ok(())
}

fn respond(registry: &Registry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are served at /metrics\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are allowed\n",
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let format = Format::negotiate(request.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    match encode(registry, format) {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            response
        }
        Err(error) => {
            tracing::error!(%error, "cannot encode metrics");
            plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n")
        }
    }
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use agentd_api::inventory::{EccErrors, XidCount};
    use agentd_api::{GpuDriver, GpuInfo};

    use super::*;

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            uuid: format!("GPU-00000000-0000-0000-0000-00000000000{index}"),
            name: "NVIDIA H200".into(),
            pci_bus_id: format!("00000000:0{index}:00.0"),
            minor_number: Some(index),
            memory_total_bytes: 150_754_820_096,
            memory_used_bytes: 1_073_741_824,
            utilization_gpu_percent: 37,
            utilization_memory_percent: 5,
            temperature_celsius: Some(41),
            power_usage_watts: Some(123.5),
            power_limit_watts: Some(700.0),
            energy_joules: Some(98_765.25),
            ecc_errors: Some(EccErrors {
                corrected: 2,
                uncorrected: 0,
            }),
            xid_errors: vec![XidCount { xid: 79, count: 1 }],
            healthy: index != 1,
            health_reason: None,
        }
    }

    fn inventory() -> NodeInventory {
        NodeInventory {
            name: "node-a".into(),
            gpu_driver: Some(GpuDriver {
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                nvml_library: "libnvidia-ml.so.1".into(),
            }),
            gpus: vec![gpu(0), gpu(1)],
            sampled_at: 1_700_000_000.5,
            ..NodeInventory::default()
        }
    }

    fn scrape(metrics_setup: impl FnOnce(&Metrics)) -> String {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics_setup(&metrics);
        encode(&registry, Format::Text).unwrap()
    }

    #[test]
    fn leadership_is_a_gauge_and_each_change_of_it_counts_once() {
        let text = scrape(|m| {
            m.set_leader(false);
            m.set_leader(true);
            m.set_leader(true);
            m.set_leader(false);
            m.set_leader(true);
        });
        assert!(text.contains("\nagentd_leader 1\n"), "{text}");
        assert!(
            text.contains("\nagentd_leader_transitions_total 3\n"),
            "{text}"
        );
        let text = scrape(|_| {});
        assert!(text.contains("\nagentd_leader 0\n"), "{text}");
        assert!(
            text.contains("\nagentd_leader_transitions_total 0\n"),
            "{text}"
        );
    }

    #[test]
    fn gpu_series_are_in_base_units_with_identifying_labels() {
        let text = scrape(|m| m.observe_inventory(&inventory()));
        let labels = r#"gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",model="NVIDIA H200",pci_bus_id="00000000:00:00.0""#;
        for line in [
            format!("agentd_gpu_utilization_ratio{{{labels}}} 0.37"),
            format!("agentd_gpu_memory_utilization_ratio{{{labels}}} 0.05"),
            format!("agentd_gpu_memory_used_bytes{{{labels}}} 1073741824"),
            format!("agentd_gpu_memory_total_bytes{{{labels}}} 150754820096"),
            format!("agentd_gpu_temperature_celsius{{{labels}}} 41"),
            format!("agentd_gpu_power_watts{{{labels}}} 123.5"),
            format!("agentd_gpu_energy_joules_total{{{labels}}} 98765.25"),
            format!("agentd_gpu_ecc_errors_total{{{labels},type=\"corrected\"}} 2"),
            format!("agentd_gpu_xid_errors_total{{{labels},xid=\"79\"}} 1"),
            format!("agentd_gpu_healthy{{{labels}}} 1"),
            "agentd_gpus 2".to_owned(),
            "agentd_build_info{version=\"0.1.0\"} 1".to_owned(),
            "agentd_up 0".to_owned(),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.contains(r#"agentd_gpu_healthy{gpu="1","#));
        assert!(
            text.lines()
                .any(|l| l.starts_with(r#"agentd_gpu_healthy{gpu="1""#) && l.ends_with(" 0"))
        );
    }

    #[test]
    fn a_new_inventory_replaces_the_old_one_and_lost_gpus_vanish() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.observe_inventory(&inventory());
        let mut smaller = inventory();
        smaller.gpus.truncate(1);
        smaller.gpus[0].utilization_gpu_percent = 100;
        metrics.observe_inventory(&smaller);
        let text = encode(&registry, Format::Text).unwrap();
        assert!(!text.contains(r#"gpu="1""#), "{text}");
        assert!(text.contains("agentd_gpus 1\n"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("agentd_gpu_utilization_ratio{") && l.ends_with(" 1"))
        );
    }

    #[test]
    fn finished_jobs_are_counted_with_a_bounded_set_of_users() {
        let text = scrape(|m| {
            for i in 0..MAX_USER_LABELS + 10 {
                let status: agentd_api::jobs::JobStatus =
                    serde_json::from_value(serde_json::json!({
                        "name": format!("j{i}"), "kind": "TrainingJob", "queue": "fast",
                        "priority": 0, "state": "Succeeded", "reason": "Succeeded",
                        "message": "", "submitted_at": 0.0, "started_at": 10.0,
                        "finished_at": 20.0, "restarts": 0, "backoff_limit": 3,
                        "generation": 1,
                        "owner": {"uid": i, "gid": 0, "user": format!("user{i}")},
                        "replicas": [{"name": "worker-0", "type": "worker", "index": 0,
                            "state": "Succeeded", "node": "n", "gpus": [], "gpu_indices": [0],
                            "address": null, "pid": null, "exit_code": 0, "signal": null,
                            "started_at": 10.0, "finished_at": 20.0}]
                    }))
                    .unwrap();
                m.job_finished(&status);
            }
        });
        assert!(
            text.contains("agentd_jobs_finished_total{queue=\"fast\",reason=\"Succeeded\"} 60"),
            "{text}"
        );
        assert!(
            text.contains("agentd_job_gpu_seconds_total{queue=\"fast\",user=\"user0\"} 10"),
            "{text}"
        );
        // Ten users past the first fifty share one series.
        assert!(
            text.contains("agentd_job_gpu_seconds_total{queue=\"fast\",user=\"other\"} 100"),
            "{text}"
        );
        let series = text
            .lines()
            .filter(|l| l.starts_with("agentd_job_gpu_seconds_total{"))
            .count();
        assert_eq!(series, MAX_USER_LABELS + 1);
    }

    #[test]
    fn no_gpu_series_before_the_first_inventory() {
        let text = scrape(|_| {});
        assert!(!text.contains("agentd_gpu"), "{text}");
        assert!(text.contains("agentd_up 0\n"));
    }

    #[test]
    fn jobs_are_reported_in_every_state_of_every_known_queue() {
        let text = scrape(|m| {
            m.set_jobs([("fast", "Running", 3), ("fast", "Queued", 1)]);
            m.set_queue_depth("slow", 0);
            m.set_up(true);
        });
        assert!(
            text.contains("agentd_jobs{queue=\"fast\",state=\"Running\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("agentd_jobs{queue=\"fast\",state=\"Failed\"} 0\n"));
        assert!(text.contains("agentd_jobs{queue=\"slow\",state=\"Queued\"} 0\n"));
        assert!(text.contains("agentd_queue_depth{queue=\"slow\"} 0\n"));
        assert!(text.contains("agentd_up 1\n"));
    }

    #[test]
    fn events_are_counted_and_histograms_are_in_seconds() {
        let text = scrape(|m| {
            m.job_state_changed("fast", "Queued", "Placed");
            m.job_state_changed("fast", "Queued", "Placed");
            m.gang_restarted("OOMKilled");
            m.job_failure("ImagePullFailed");
            m.api_request("/v1/jobs/{name}", 404);
            m.scheduling_pass(Duration::from_micros(300));
            m.submit_to_running(Duration::from_secs(3));
        });
        assert!(
            text.contains(
                "agentd_job_transitions_total{queue=\"fast\",from=\"Queued\",to=\"Placed\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("agentd_gang_restarts_total{reason=\"OOMKilled\"} 1\n"));
        assert!(text.contains("agentd_job_failures_total{reason=\"ImagePullFailed\"} 1\n"));
        assert!(
            text.contains(
                "agentd_api_requests_total{route=\"/v1/jobs/{name}\",status=\"404\"} 1\n"
            )
        );
        assert!(text.contains("agentd_scheduling_pass_duration_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(
            text.contains("agentd_scheduling_pass_duration_seconds_bucket{le=\"0.00025\"} 0\n")
        );
        assert!(text.contains("agentd_job_submit_to_running_seconds_sum 3.0\n"));
    }

    #[test]
    fn jobs_past_their_schedule_timeout_count_at_scrape_time() {
        let now = std::time::Instant::now();
        let text = scrape(|m| {
            m.set_queue_deadlines(
                "fast",
                vec![
                    now.checked_sub(OVERDUE_GRACE + Duration::from_secs(1))
                        .unwrap(),
                    now + Duration::from_hours(1),
                ],
            );
            m.set_queue_deadlines("slow", vec![now + Duration::from_mins(1)]);
        });
        assert!(
            text.contains("agentd_queue_overdue_jobs{queue=\"fast\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("agentd_queue_overdue_jobs{queue=\"slow\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn node_allocation_is_in_cores_and_bytes() {
        let text = scrape(|m| {
            m.set_node_allocations([(
                "node-a",
                NodeAllocation {
                    capacity: Resources {
                        gpus: 8,
                        cpu_milli: 64_000,
                        memory_mib: 1024,
                    },
                    allocated: Resources {
                        gpus: 2,
                        cpu_milli: 1_500,
                        memory_mib: 512,
                    },
                    schedulable: true,
                },
            )]);
        });
        assert!(
            text.contains("agentd_node_capacity_gpus{node=\"node-a\"} 8\n"),
            "{text}"
        );
        assert!(text.contains("agentd_node_allocated_cpu_cores{node=\"node-a\"} 1.5\n"));
        assert!(text.contains("agentd_node_capacity_memory_bytes{node=\"node-a\"} 1073741824\n"));
        assert!(text.contains("agentd_node_schedulable{node=\"node-a\"} 1\n"));
    }

    #[test]
    fn a_node_left_out_of_the_next_allocations_is_forgotten() {
        let text = scrape(|m| {
            let with = |gpus| NodeAllocation {
                allocated: Resources {
                    gpus,
                    ..Resources::default()
                },
                ..NodeAllocation::default()
            };
            m.set_node_allocations([("node-a", with(1)), ("node-b", with(2))]);
            m.set_node_allocations([("node-b", with(3)), ("node-c", with(4))]);
        });
        assert!(!text.contains("node=\"node-a\""), "{text}");
        assert!(
            text.contains("agentd_node_allocated_gpus{node=\"node-b\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("agentd_node_allocated_gpus{node=\"node-c\"} 4\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_from_hardware_are_escaped() {
        let text = scrape(|m| {
            let mut inv = inventory();
            inv.gpus[0].name = "odd \"model\"\\x".into();
            m.observe_inventory(&inv);
        });
        assert!(text.contains(r#"model="odd \"model\"\\x""#), "{text}");
    }

    #[test]
    fn openmetrics_is_served_only_when_asked_for() {
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            )),
            Format::OpenMetrics
        );
        let mut registry = Registry::default();
        let _metrics = Metrics::new(&mut registry);
        assert!(
            encode(&registry, Format::OpenMetrics)
                .unwrap()
                .ends_with("# EOF\n")
        );
    }

    #[tokio::test]
    async fn the_server_answers_scrapes_and_stops_on_shutdown() {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        metrics.observe_inventory(&inventory());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics_on(listener, Arc::new(registry), async move {
            let _ = stopped.await;
        }));

        let get = |path: &'static str, accept: Option<&'static str>| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let accept = accept
                .map(|a| format!("Accept: {a}\r\n"))
                .unwrap_or_default();
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        let text = get("/metrics", None).await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("content-type: text/plain; version=0.0.4; charset=utf-8"));
        assert!(text.contains("agentd_gpu_temperature_celsius{gpu=\"0\""));
        let om = get(
            "/metrics",
            Some("application/openmetrics-text; version=1.0.0"),
        )
        .await;
        assert!(
            om.contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
            "{om}"
        );
        assert!(om.trim_end().ends_with("# EOF"));
        assert!(get("/", None).await.starts_with("HTTP/1.1 404"));

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_taken_address_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let error = serve_metrics(
            addr,
            Arc::new(Registry::default()),
            std::future::pending::<()>(),
        )
        .await
        .unwrap_err();
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
        assert!(error.to_string().contains("--metrics-addr"), "{error}");
    }
}
