//! The agent's typed configuration: a TOML file in which every key is optional, overridden by
//! environment variables, overridden by flags. Defaults are the documented constants below.
//! Unknown keys are rejected by name so that a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/agentd/agentd.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agentd";
pub const DEFAULT_SOCKET: &str = agentd_api::DEFAULT_SOCKET;
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9400";
pub const DEFAULT_INVENTORY_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_GPU_RECOVERY_QUIET: Duration = Duration::from_mins(5);
pub const DEFAULT_SAMPLE_RETENTION: Duration = Duration::from_hours(24);
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// All job logs together; beyond it the logs of the jobs that finished first are deleted.
pub const DEFAULT_LOGS_MAX_TOTAL_BYTES: u64 = 8 * 1024 * 1024 * 1024;
/// The most replicas one job may have: more than a large machine runs at once, far fewer than
/// would make a job's status a burden.
pub const DEFAULT_MAX_REPLICAS_PER_JOB: u32 = 1024;
/// The most replicas the unfinished jobs of an agent may have together, queued or running.
pub const DEFAULT_MAX_REPLICAS_PER_AGENT: u32 = 10_000;
/// Finished jobs the agent keeps in memory (for `agentctl jobs`); older ones are read from the
/// database when asked for.
pub const DEFAULT_FINISHED_IN_MEMORY: u32 = 200;
/// How long a finished job stays in the history (and its logs on disk) before it is pruned.
pub const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_hours(30 * 24);
pub const DEFAULT_QUEUE: &str = "fast";
pub const DEFAULT_CLUSTER_NAMESPACE: &str = "agentd-system";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_NODE_LEASE_INTERVAL: Duration = Duration::from_secs(10);
/// Leader election, with client-go's defaults.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// `cluster.mount_timeout`'s default: a volume that has not mounted in this long is missing.
pub const DEFAULT_MOUNT_TIMEOUT: Duration = Duration::from_mins(2);
/// `cluster.image_pull_timeout`'s default: long enough for a large image on a slow registry.
pub const DEFAULT_IMAGE_PULL_TIMEOUT: Duration = Duration::from_mins(5);
/// `cluster.node_refusal_cooldown`'s default.
pub const DEFAULT_NODE_REFUSAL_COOLDOWN: Duration = Duration::from_mins(5);
/// `cluster.node_lost_grace`'s default: as long as Kubernetes' own node monitor grace period.
pub const DEFAULT_NODE_LOST_GRACE: Duration = Duration::from_secs(40);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// Text that is not TOML at all (the message says where).
    #[error("{0}")]
    Syntax(String),
}

/// The whole configuration, as `agentd --print-config` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The node's name; empty means the hostname.
    pub node_name: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// `host:port` for the Prometheus endpoint, or `off`.
    pub metrics_addr: MetricsAddr,
    /// A `RUST_LOG`-style filter such as `info` or `agentd=debug,hyper=warn`.
    pub log: String,
    pub log_format: LogFormat,
    pub inventory: InventoryConfig,
    pub jobs: JobsConfig,
    pub api: ApiConfig,
    /// Queues by name. When the file names none, `fast` and `slow` exist.
    pub queues: BTreeMap<String, QueueSettings>,
    /// Labels of this node, matched against a job's `nodeSelector` (as Kubernetes node labels).
    pub labels: BTreeMap<String, String>,
    /// `standalone` (this machine is the whole cluster) or `cluster` (join a Kubernetes cluster).
    pub mode: Mode,
    pub cluster: ClusterConfig,
    pub scheduler: SchedulerConfig,
}

/// How the scheduler plans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Plan reservations with run times learned from finished jobs for the jobs that declare
    /// no `activeDeadlineSeconds`: the blocked head then knows when it starts, and backfill
    /// takes what ends before then. An estimate never stops a job.
    pub estimate_runtimes: bool,
    /// The quantile of the finished run times taken as the estimate (above 0, at most 1):
    /// high, so that a reservation is rarely planned on an end that comes too early.
    pub estimate_quantile: f64,
    /// Finished jobs a key (user and job, then queue and size, then queue) needs before its
    /// estimate is used.
    pub estimate_min_samples: u32,
    /// Finished jobs kept per key: the estimate follows the latest of them.
    pub estimate_window: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            estimate_runtimes: true,
            estimate_quantile: crate::sched::ESTIMATE_QUANTILE,
            estimate_min_samples: crate::sched::ESTIMATE_MIN_SAMPLES as u32,
            estimate_window: crate::sched::ESTIMATE_WINDOW as u32,
        }
    }
}

/// Whether the agent runs alone or as one node of a Kubernetes cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Standalone,
    Cluster,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Standalone => "standalone",
            Mode::Cluster => "cluster",
        }
    }
}

/// `[cluster]`: how the agent reaches the Kubernetes API server and what it keeps there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The kubeconfig file; empty means what kube-rs infers (`KUBECONFIG`, `~/.kube/config`,
    /// then the in-cluster service account).
    pub kubeconfig: PathBuf,
    /// Where the agent's Leases and `AgentNode` objects live.
    pub namespace: String,
    /// The cluster's DNS domain, for the replicas' host names.
    pub cluster_domain: String,
    /// How often the agent renews its heartbeat Lease; it counts as stale after four of these.
    #[serde(with = "duration_text")]
    pub node_lease_interval: Duration,
    /// Whether this agent takes part in the leader election; the elected leader projects
    /// every `AgentNode` onto its Node's labels.
    pub leader_eligible: bool,
    /// How long the `agentd-leader` Lease stays held without a renewal before another agent
    /// may take it.
    #[serde(with = "duration_text")]
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    #[serde(with = "duration_text")]
    pub renew_deadline: Duration,
    /// How often a candidate tries to take the Lease and the leader renews it.
    #[serde(with = "duration_text")]
    pub retry_period: Duration,
    /// Whether the cluster's jobs are placed onto its nodes as pods by the elected leader, kept
    /// as `TrainingJob` objects (true), or each agent runs jobs on its own machine as in
    /// standalone mode (false).
    pub place_jobs: bool,
    /// How long a replica's pod may wait for its volumes to mount before the job fails with
    /// `VolumeMountFailed`, or for a Secret or ConfigMap its environment names before it fails
    /// with `ContainerConfigFailed`.
    #[serde(with = "duration_text")]
    pub mount_timeout: Duration,
    /// How long a replica's pod may fail to pull its image before the job fails with
    /// `ImagePullFailed`.
    #[serde(with = "duration_text")]
    pub image_pull_timeout: Duration,
    /// How long a node whose kubelet refused a replica's pod at admission gets no new
    /// replicas; `0s` keeps no node out.
    #[serde(with = "duration_text")]
    pub node_refusal_cooldown: Duration,
    /// How long a node may be not Ready, or its kubelet's Lease (`kube-node-lease`) expired,
    /// before it is lost: its gangs restart on other nodes with reason `NodeLost`.
    #[serde(with = "duration_text")]
    pub node_lost_grace: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            kubeconfig: PathBuf::new(),
            namespace: DEFAULT_CLUSTER_NAMESPACE.to_owned(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
            node_lease_interval: DEFAULT_NODE_LEASE_INTERVAL,
            leader_eligible: false,
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
            place_jobs: false,
            mount_timeout: DEFAULT_MOUNT_TIMEOUT,
            image_pull_timeout: DEFAULT_IMAGE_PULL_TIMEOUT,
            node_refusal_cooldown: DEFAULT_NODE_REFUSAL_COOLDOWN,
            node_lost_grace: DEFAULT_NODE_LOST_GRACE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InventoryConfig {
    #[serde(with = "duration_text")]
    pub interval: Duration,
    /// Path of the NVML library; empty means `libnvidia-ml.so.1` from the loader's path.
    pub nvml_library: String,
    /// How long a GPU must be readable and free of critical XIDs before it is healthy again.
    #[serde(with = "duration_text")]
    pub gpu_recovery_quiet: Duration,
    /// How long inventory samples are kept in the database.
    #[serde(with = "duration_text")]
    pub sample_retention: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// The queue of a job that names none.
    pub default_queue: String,
    /// Time between SIGTERM and SIGKILL when a gang is stopped.
    #[serde(with = "duration_text")]
    pub kill_grace: Duration,
    /// Each replica's log file is cut to its last half when it grows past this size.
    pub log_max_bytes: u64,
    /// The job logs together: beyond this, the logs of the jobs that finished first are
    /// deleted (those of running jobs never are; each is bounded by `log_max_bytes`).
    pub logs_max_total_bytes: u64,
    /// The wait before a gang's first restart; doubled with each further restart.
    #[serde(with = "duration_text")]
    pub restart_backoff: Duration,
    /// The longest wait between restarts.
    #[serde(with = "duration_text")]
    pub restart_backoff_max: Duration,
    /// Whether each replica runs as a transient systemd unit with its own cgroup limits.
    pub replica_units: ReplicaUnits,
    /// A job with more replicas than this is refused at submission.
    pub max_replicas_per_job: u32,
    /// A job is refused at submission when the agent's unfinished jobs would then have more
    /// replicas than this together.
    pub max_replicas_per_agent: u32,
    /// The most finished jobs held in memory; the rest are read from the database on demand.
    pub finished_in_memory: u32,
    /// Finished jobs, their events and logs are pruned this long after they finished.
    #[serde(with = "duration_text")]
    pub history_retention: Duration,
}

/// Who may do what through the API, and its optional remote listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Members of this group (and root) act on every job, not only their own.
    pub admin_group: String,
    /// Connections each listener (socket, metrics) holds open at most.
    pub max_connections: u32,
    /// How long a client has to send a request's headers, and how long a kept-alive connection
    /// may sit idle between requests.
    #[serde(with = "duration_text")]
    pub header_timeout: Duration,
    /// How long a client has to send a request's body.
    #[serde(with = "duration_text")]
    pub body_timeout: Duration,
    /// Requests a second each user other than root may make, on average (429 above it).
    pub requests_per_second: u32,
    /// Requests a user may make at once above that average.
    pub request_burst: u32,
    /// The HTTPS listener's address (`0.0.0.0:9443`); empty: no listener, the socket only.
    pub listen: String,
    /// The listener's certificate chain (PEM), read on start and on SIGHUP.
    pub tls_cert: String,
    /// The listener's private key (PEM), read on start and on SIGHUP.
    pub tls_key: String,
    /// Hashes of the bearer tokens the listener accepts (`agentctl token create`), read on
    /// start and on SIGHUP; empty: no tokens.
    pub tokens_file: String,
    /// CA certificates (PEM) for client certificates: a client certificate signed by one acts
    /// as the user named by its common name (CN); empty: no client certificates.
    pub client_ca: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            admin_group: crate::api::auth::DEFAULT_ADMIN_GROUP.to_owned(),
            max_connections: crate::api::limits::DEFAULT_MAX_CONNECTIONS,
            header_timeout: crate::api::limits::DEFAULT_HEADER_TIMEOUT,
            body_timeout: crate::api::limits::DEFAULT_BODY_TIMEOUT,
            requests_per_second: crate::api::limits::DEFAULT_REQUESTS_PER_SECOND,
            request_burst: crate::api::limits::DEFAULT_REQUEST_BURST,
            listen: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            tokens_file: String::new(),
            client_ca: String::new(),
        }
    }
}

impl ApiConfig {
    /// The HTTPS listener's address; `None` when it is off.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    /// The listener needs an address, a certificate and key, and a way to know its callers.
    fn check_listener(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: field.to_owned(),
            message,
        };
        if self.listen.is_empty() {
            return Ok(());
        }
        if self.listen_addr().is_none() {
            return Err(invalid(
                "api.listen",
                format!(
                    "{:?} is not an address and port, such as 0.0.0.0:9443 or [::]:9443 \
                     (empty turns the HTTPS listener off)",
                    self.listen
                ),
            ));
        }
        for (field, value) in [
            ("api.tls_cert", &self.tls_cert),
            ("api.tls_key", &self.tls_key),
        ] {
            if value.is_empty() {
                return Err(invalid(
                    field,
                    "must name a PEM file when api.listen is set".to_owned(),
                ));
            }
        }
        if self.tokens_file.is_empty() && self.client_ca.is_empty() {
            return Err(invalid(
                "api.tokens_file",
                "the HTTPS listener needs a way to know its callers: set api.tokens_file \
                 (bearer tokens), api.client_ca (client certificates), or both"
                    .to_owned(),
            ));
        }
        Ok(())
    }
}

/// How replicas are started: `auto` makes each one a transient systemd unit (`systemd-run`)
/// when the agent itself runs under a running systemd, and a plain child process otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaUnits {
    #[default]
    Auto,
    /// Always units; the agent refuses to start where systemd cannot make them.
    On,
    /// Always plain child processes.
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub priority: i32,
    /// No longer a setting: read only to refuse it with the reason (see `check`).
    #[serde(default, skip_serializing, deserialize_with = "present")]
    pub weight: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running_jobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
}

/// True for any value: a key that is read only to be refused.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The metrics listen address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    On(SocketAddr),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            socket: PathBuf::from(DEFAULT_SOCKET),
            metrics_addr: MetricsAddr::On(DEFAULT_METRICS_ADDR.parse().expect("valid constant")),
            log: "info".to_owned(),
            log_format: LogFormat::Text,
            inventory: InventoryConfig::default(),
            jobs: JobsConfig::default(),
            api: ApiConfig::default(),
            queues: BTreeMap::new(),
            labels: BTreeMap::new(),
            mode: Mode::Standalone,
            cluster: ClusterConfig::default(),
            scheduler: SchedulerConfig::default(),
        }
    }
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            interval: DEFAULT_INVENTORY_INTERVAL,
            nvml_library: String::new(),
            gpu_recovery_quiet: DEFAULT_GPU_RECOVERY_QUIET,
            sample_retention: DEFAULT_SAMPLE_RETENTION,
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            default_queue: DEFAULT_QUEUE.to_owned(),
            kill_grace: DEFAULT_KILL_GRACE,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            logs_max_total_bytes: DEFAULT_LOGS_MAX_TOTAL_BYTES,
            restart_backoff: crate::job::BACKOFF_BASE,
            restart_backoff_max: crate::job::BACKOFF_CAP,
            replica_units: ReplicaUnits::Auto,
            max_replicas_per_job: DEFAULT_MAX_REPLICAS_PER_JOB,
            max_replicas_per_agent: DEFAULT_MAX_REPLICAS_PER_AGENT,
            finished_in_memory: DEFAULT_FINISHED_IN_MEMORY,
            history_retention: DEFAULT_HISTORY_RETENTION,
        }
    }
}

/// The queues that exist when the configuration names none.
pub fn default_queues() -> BTreeMap<String, QueueSettings> {
    BTreeMap::from([
        (
            "fast".to_owned(),
            QueueSettings {
                priority: 10,
                weight: false,
                max_running_jobs: None,
                max_gpus: None,
            },
        ),
        (
            "slow".to_owned(),
            QueueSettings {
                priority: 1,
                weight: false,
                max_running_jobs: None,
                max_gpus: None,
            },
        ),
    ])
}

/// The one check of a set of queues, wherever they come from (agentd.toml, or the
/// `queues.toml` of the cluster's ConfigMap): every problem, each naming its field.
pub fn check_queues(
    queues: &BTreeMap<String, QueueSettings>,
    default_queue: &str,
) -> Vec<ConfigError> {
    let mut problems = Vec::new();
    for (name, q) in queues {
        if q.weight {
            problems.push(ConfigError::Invalid {
                field: format!("queues.{name}.weight"),
                message: "is not a setting (it never had an effect): queues are served by priority, and within one priority by job priority, then submit time; remove the key".to_owned(),
            });
        }
        if !is_queue_name(name) {
            problems.push(ConfigError::Invalid {
                field: format!("queues.{name}"),
                message:
                    "a queue name must be lower-case letters, digits and '-', at most 63 characters"
                        .to_owned(),
            });
        }
    }
    if !queues.contains_key(default_queue) {
        problems.push(ConfigError::Invalid {
            field: "jobs.default_queue".to_owned(),
            message: format!(
                "names queue {default_queue:?}, which is not configured; configured queues: {}",
                queues.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    problems
}

/// The name of the file of queue definitions in the cluster's ConfigMap (its one data key).
pub const QUEUES_FILE: &str = "queues.toml";

/// A set of queues and the default one: what agentd.toml configures, or what the cluster's
/// ConfigMap defines in its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueDefinitions {
    pub queues: BTreeMap<String, QueueSettings>,
    pub default_queue: String,
}

impl QueueDefinitions {
    /// The queues of a checked configuration.
    pub fn configured(config: &Config) -> Self {
        Self {
            queues: config.queues.clone(),
            default_queue: config.jobs.default_queue.clone(),
        }
    }

    /// Reads `queues.toml`: `[queues.NAME]` tables exactly as in agentd.toml, and optionally
    /// `[jobs] default_queue` (else `configured_default`, agentd.toml's, which must then be
    /// one of them). Every problem is returned at once, each naming its field.
    pub fn from_queues_toml(
        text: &str,
        configured_default: &str,
    ) -> Result<Self, Vec<ConfigError>> {
        let file: toml::Table = toml::from_str(text)
            .map_err(|e| vec![ConfigError::Syntax(one_line(&e.to_string()))])?;
        let invalid = |field: String, message: &str| ConfigError::Invalid {
            field,
            message: message.to_owned(),
        };
        let mut problems = Vec::new();
        let mut queues = BTreeMap::new();
        let mut default_queue = None;
        for (key, value) in &file {
            match (key.as_str(), value) {
                ("queues", toml::Value::Table(tables)) => {
                    for (name, table) in tables {
                        match read_queue(name, table) {
                            Ok(settings) => {
                                queues.insert(name.clone(), settings);
                            }
                            Err(mut found) => problems.append(&mut found),
                        }
                    }
                }
                ("jobs", toml::Value::Table(jobs)) => {
                    for (key, value) in jobs {
                        match (key.as_str(), value) {
                            ("default_queue", toml::Value::String(name)) => {
                                default_queue = Some(name.clone());
                            }
                            ("default_queue", _) => problems.push(invalid(
                                "jobs.default_queue".to_owned(),
                                "must be a string: the name of one of the queues defined here",
                            )),
                            _ => problems.push(invalid(
                                format!("jobs.{key}"),
                                "is not read from this file, which takes only [jobs] default_queue; set it in agentd.toml",
                            )),
                        }
                    }
                }
                ("queues" | "jobs", _) => problems.push(invalid(
                    key.clone(),
                    "must be a table: [queues.NAME] tables, or [jobs] with default_queue",
                )),
                _ => problems.push(invalid(
                    key.clone(),
                    "is not read from this file, which takes only [queues.NAME] tables and [jobs] default_queue; set it in agentd.toml",
                )),
            }
        }
        if problems.is_empty() && queues.is_empty() {
            problems.push(invalid(
                "queues".to_owned(),
                "defines no queue: define at least one [queues.NAME], or delete the ConfigMap to use the queues in agentd.toml",
            ));
        }
        let set_here = default_queue.is_some();
        let default_queue = default_queue.unwrap_or_else(|| configured_default.to_owned());
        if !queues.is_empty() {
            for problem in check_queues(&queues, &default_queue) {
                problems.push(match problem {
                    ConfigError::Invalid { field, .. }
                        if field == "jobs.default_queue" && !set_here =>
                    {
                        ConfigError::Invalid {
                            field,
                            message: format!(
                                "is not set here, and agentd.toml's default queue {default_queue:?} is not one of the queues defined here ({}); set [jobs] default_queue",
                                queues.keys().cloned().collect::<Vec<_>>().join(", ")
                            ),
                        }
                    }
                    other => other,
                });
            }
        }
        if problems.is_empty() {
            Ok(Self {
                queues,
                default_queue,
            })
        } else {
            Err(problems)
        }
    }
}

/// One `[queues.NAME]` table, read as agentd.toml reads it ([`QueueSettings`]'s own reading).
/// Where that fails, each key is read again on its own, so that every key at fault is named.
fn read_queue(name: &str, value: &toml::Value) -> Result<QueueSettings, Vec<ConfigError>> {
    let at = |key: &str| {
        if key.is_empty() {
            format!("queues.{name}")
        } else {
            format!("queues.{name}.{key}")
        }
    };
    let whole = match value.clone().try_into::<QueueSettings>() {
        Ok(settings) => return Ok(settings),
        Err(e) => e,
    };
    let mut problems = Vec::new();
    if let toml::Value::Table(table) = value {
        for (key, value) in table {
            // `priority` is required: a placeholder stands in for it while another key is read.
            let mut alone =
                toml::Table::from_iter([("priority".to_owned(), toml::Value::Integer(0))]);
            alone.insert(key.clone(), value.clone());
            if let Err(e) = toml::Value::Table(alone).try_into::<QueueSettings>() {
                problems.push(ConfigError::Invalid {
                    field: at(key),
                    message: e.message().to_owned(),
                });
            }
        }
    }
    if problems.is_empty() {
        problems.push(ConfigError::Invalid {
            field: at(""),
            message: match value {
                toml::Value::Table(_) => one_line(whole.message()),
                _ => "must be a table: priority, and optionally max_running_jobs and max_gpus"
                    .to_owned(),
            },
        });
    }
    Err(problems)
}

/// A toml error on one line: its message carries the key and a caret under it.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Values given on the command line or in the environment; each one set wins over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub metrics_addr: Option<String>,
    pub nvml_library: Option<String>,
    pub log: Option<String>,
    pub log_format: Option<LogFormat>,
    pub node_name: Option<String>,
    pub mode: Option<Mode>,
    pub kubeconfig: Option<PathBuf>,
}

impl Config {
    /// Loads the file (when `path` is `None`, the default file if it exists), then applies
    /// overrides and checks the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_FILE))?
            }
            None => Self::default(),
        };
        config.apply(overrides)?;
        config.check()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = fs_err::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error names the offending key and says what is allowed.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| one_line(&e.to_string()))
    }

    fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(v) = &o.state_dir {
            self.state_dir.clone_from(v);
        }
        if let Some(v) = &o.socket {
            self.socket.clone_from(v);
        }
        if let Some(v) = &o.metrics_addr {
            self.metrics_addr = v.parse().map_err(|message| ConfigError::Invalid {
                field: "metrics_addr".to_owned(),
                message,
            })?;
        }
        if let Some(v) = &o.nvml_library {
            self.inventory.nvml_library.clone_from(v);
        }
        if let Some(v) = &o.log {
            self.log.clone_from(v);
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        if let Some(v) = &o.node_name {
            self.node_name.clone_from(v);
        }
        if let Some(v) = o.mode {
            self.mode = v;
        }
        if let Some(v) = &o.kubeconfig {
            self.cluster.kubeconfig.clone_from(v);
        }
        Ok(())
    }

    /// client-go's rules: the lease outlasts the renew deadline, which outlasts 1.2 retry
    /// periods; the Lease holds its duration in whole seconds.
    fn check_election(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: field.to_owned(),
            message,
        };
        if c.lease_duration < Duration::from_secs(1) || c.lease_duration.subsec_nanos() != 0 {
            return Err(invalid(
                "cluster.lease_duration",
                "must be a whole number of seconds, at least 1s (the Lease holds it in seconds)"
                    .into(),
            ));
        }
        if c.place_jobs && self.mode != Mode::Cluster {
            return Err(invalid(
                "cluster.place_jobs",
                "needs mode = \"cluster\": a standalone agent runs jobs on its own machine".into(),
            ));
        }
        if c.node_lost_grace < Duration::from_secs(1) {
            return Err(invalid(
                "cluster.node_lost_grace",
                "must be at least 1s (a kubelet that misses one status update is not lost)".into(),
            ));
        }
        for (field, timeout) in [
            ("cluster.mount_timeout", c.mount_timeout),
            ("cluster.image_pull_timeout", c.image_pull_timeout),
        ] {
            if timeout < Duration::from_secs(1) {
                return Err(invalid(
                    field,
                    "must be at least 1s (Kubernetes retries for seconds before it says more)"
                        .into(),
                ));
            }
        }
        if c.retry_period.is_zero() {
            return Err(invalid(
                "cluster.retry_period",
                "must be more than 0".into(),
            ));
        }
        if c.renew_deadline >= c.lease_duration {
            return Err(invalid(
                "cluster.renew_deadline",
                format!(
                    "must be shorter than cluster.lease_duration ({}), so that a leader stops before another may take over",
                    format_duration(c.lease_duration)
                ),
            ));
        }
        if c.renew_deadline <= c.retry_period.mul_f64(1.2) {
            return Err(invalid(
                "cluster.renew_deadline",
                format!(
                    "must be longer than 1.2 times cluster.retry_period ({}), so that a leader gets to retry a failed renewal",
                    format_duration(c.retry_period)
                ),
            ));
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: &str| ConfigError::Invalid {
            field: field.to_owned(),
            message: message.to_owned(),
        };
        if self.inventory.interval < Duration::from_millis(100) {
            return Err(invalid("inventory.interval", "must be at least 100ms"));
        }
        if self.jobs.log_max_bytes < 4096 {
            return Err(invalid("jobs.log_max_bytes", "must be at least 4096"));
        }
        if self.jobs.logs_max_total_bytes < self.jobs.log_max_bytes {
            return Err(invalid(
                "jobs.logs_max_total_bytes",
                "must be at least jobs.log_max_bytes (one replica's log)",
            ));
        }
        if self.jobs.max_replicas_per_job == 0 {
            return Err(invalid("jobs.max_replicas_per_job", "must be at least 1"));
        }
        if self.jobs.max_replicas_per_agent < self.jobs.max_replicas_per_job {
            return Err(invalid(
                "jobs.max_replicas_per_agent",
                "must be at least jobs.max_replicas_per_job",
            ));
        }
        if self.jobs.history_retention < Duration::from_mins(1) {
            return Err(invalid(
                "jobs.history_retention",
                "must be at least 1m (finished jobs are kept at least that long)",
            ));
        }
        let s = &self.scheduler;
        if !(s.estimate_quantile > 0.0 && s.estimate_quantile <= 1.0) {
            return Err(invalid(
                "scheduler.estimate_quantile",
                "must be above 0 and at most 1 (0.9 plans on the 90th percentile)",
            ));
        }
        if s.estimate_min_samples == 0 {
            return Err(invalid(
                "scheduler.estimate_min_samples",
                "must be at least 1",
            ));
        }
        if s.estimate_window < s.estimate_min_samples || s.estimate_window > 100_000 {
            return Err(invalid(
                "scheduler.estimate_window",
                "must be at least scheduler.estimate_min_samples and at most 100000",
            ));
        }
        if self.api.max_connections == 0 {
            return Err(invalid("api.max_connections", "must be at least 1"));
        }
        for (field, value) in [
            ("api.header_timeout", self.api.header_timeout),
            ("api.body_timeout", self.api.body_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err(invalid(field, "must be at least 100ms"));
            }
        }
        if self.api.requests_per_second == 0 || self.api.request_burst == 0 {
            return Err(invalid(
                "api.requests_per_second",
                "must be at least 1, as must api.request_burst",
            ));
        }
        self.api.check_listener()?;
        if self.cluster.node_lease_interval < Duration::from_secs(1) {
            return Err(invalid(
                "cluster.node_lease_interval",
                "must be at least 1s",
            ));
        }
        self.check_election()?;
        if !is_dns_label(&self.cluster.namespace) {
            return Err(invalid(
                "cluster.namespace",
                "must be a DNS label: lower-case letters, digits and '-', at most 63 characters",
            ));
        }
        if self.cluster.cluster_domain.is_empty()
            || !self.cluster.cluster_domain.split('.').all(is_dns_label)
        {
            return Err(invalid(
                "cluster.cluster_domain",
                "must be a DNS name such as cluster.local",
            ));
        }
        if self.queues.is_empty() {
            self.queues = default_queues();
        }
        match check_queues(&self.queues, &self.jobs.default_queue)
            .into_iter()
            .next()
        {
            Some(first) => Err(first),
            None => Ok(()),
        }
    }

    /// The node name: configured, else the hostname.
    pub fn node_name(&self) -> String {
        if self.node_name.is_empty() {
            sysinfo::System::host_name().unwrap_or_else(|_| "localhost".to_owned())
        } else {
            self.node_name.clone()
        }
    }

    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join("agentd.db")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config always serializes")
    }
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse().map(Self::On).map_err(|_| {
            format!("{s:?} is not an address: give host:port such as 127.0.0.1:9400, or off")
        })
    }
}

impl fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::On(addr) => write!(f, "{addr}"),
        }
    }
}

impl Serialize for MetricsAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MetricsAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn is_dns_label(name: &str) -> bool {
    is_queue_name(name)
}

fn is_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Parses durations written as `500ms`, `10s`, `5m`, `2h` or `1d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!(
            "{text:?} is not a duration: write a whole number and a unit, such as 500ms, 10s, 5m, 2h or 1d"
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(bad)
}

/// Formats a duration in the largest unit that divides it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms > 0 && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_weight_is_refused_with_the_reason() {
        let mut config = Config::from_toml("[queues.batch]\npriority = 1\nweight = 2\n").unwrap();
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("queues.batch.weight"), "{err}");
        assert!(err.contains("remove the key"), "{err}");
    }

    /// queues.toml: agentd.toml's `[queues.NAME]` tables and `[jobs] default_queue`, read
    /// by the same code; the default queue is agentd.toml's when the file names none.
    #[test]
    fn queue_definitions_are_read_as_agentd_toml_reads_queues() {
        let defs = QueueDefinitions::from_queues_toml(
            "[queues.gpu]\npriority = 5\nmax_gpus = 8\nmax_running_jobs = 2\n[queues.cpu]\npriority = -1\n[jobs]\ndefault_queue = \"cpu\"\n",
            "fast",
        )
        .unwrap();
        assert_eq!(defs.default_queue, "cpu");
        let gpu = &defs.queues["gpu"];
        assert_eq!(
            (gpu.priority, gpu.max_gpus, gpu.max_running_jobs),
            (5, Some(8), Some(2))
        );
        assert_eq!(defs.queues["cpu"].priority, -1);
        let defs =
            QueueDefinitions::from_queues_toml("[queues.fast]\npriority = 3\n", "fast").unwrap();
        assert_eq!(defs.default_queue, "fast");
        // The same tables in agentd.toml read the same.
        let mut config = Config::from_toml(
            "[queues.gpu]\npriority = 5\nmax_gpus = 8\nmax_running_jobs = 2\n[queues.cpu]\npriority = -1\n[jobs]\ndefault_queue = \"cpu\"\n",
        )
        .unwrap();
        config.check().unwrap();
        let again = QueueDefinitions::from_queues_toml(
            "[queues.gpu]\npriority = 5\nmax_gpus = 8\nmax_running_jobs = 2\n[queues.cpu]\npriority = -1\n[jobs]\ndefault_queue = \"cpu\"\n",
            "fast",
        )
        .unwrap();
        assert_eq!(QueueDefinitions::configured(&config), again);
    }

    /// Every problem at once, each naming its field and what is allowed.
    #[test]
    fn every_problem_of_queue_definitions_is_named_at_once() {
        let text = "\
scheduler = 1
[jobs]
default_queue = \"nosuch\"
kill_grace = \"5s\"
[queues.gpu]
priority = 5
max_gpus = -1
prio = 3
[queues.big]
priority = \"high\"
[queues.empty]
[queues.old]
priority = 1
weight = 2
[queues.Bad_Name]
priority = 1
[queues.flat]
priority = 1
";
        let problems: Vec<String> = QueueDefinitions::from_queues_toml(text, "fast")
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        let has = |field: &str, words: &str| {
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{field}: ")) && p.contains(words))
        };
        assert!(has("scheduler", "set it in agentd.toml"), "{problems:#?}");
        assert!(
            has("jobs.kill_grace", "only [jobs] default_queue"),
            "{problems:#?}"
        );
        assert!(has("queues.gpu.max_gpus", "u32"), "{problems:#?}");
        assert!(has("queues.gpu.prio", "priority"), "{problems:#?}");
        assert!(has("queues.big.priority", "string"), "{problems:#?}");
        assert!(has("queues.empty", "priority"), "{problems:#?}");
        assert!(has("queues.old.weight", "remove the key"), "{problems:#?}");
        assert!(has("queues.Bad_Name", "lower-case"), "{problems:#?}");
        assert!(has("jobs.default_queue", "\"nosuch\""), "{problems:#?}");
        assert_eq!(problems.len(), 9, "{problems:#?}");

        let err = |text: &str| {
            QueueDefinitions::from_queues_toml(text, "fast")
                .unwrap_err()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let said = err("[queues.gpu]\npriority = 1\n");
        assert!(
            said.starts_with("jobs.default_queue: is not set here")
                && said.contains("\"fast\"")
                && said.contains("gpu"),
            "{said}"
        );
        assert!(err("").starts_with("queues: defines no queue"));
        assert!(err("queues = 3\n").starts_with("queues: must be a table"));
        assert!(err("[queues]\ngpu = 1\n").starts_with("queues.gpu: must be a table"));
        assert!(
            err("[jobs]\ndefault_queue = 1\n[queues.fast]\npriority = 1\n")
                .starts_with("jobs.default_queue: must be a string")
        );
        let syntax = err("[queues.gpu\npriority = 1\n");
        assert!(syntax.contains("line 1"), "{syntax}");
    }

    #[test]
    fn empty_file_is_all_defaults() {
        let mut config = Config::from_toml("").unwrap();
        config.check().unwrap();
        assert_eq!(config.inventory.interval, Duration::from_secs(10));
        assert_eq!(config.socket, Path::new("/run/agentd/agentd.sock"));
        assert_eq!(config.queues["fast"].priority, 10);
        assert_eq!(config.queues["slow"].priority, 1);
    }

    #[test]
    fn api_limits_are_checked_by_name() {
        for (text, field) in [
            ("[api]\nmax_connections = 0\n", "api.max_connections"),
            ("[api]\nheader_timeout = \"1ms\"\n", "api.header_timeout"),
            (
                "[api]\nrequests_per_second = 0\n",
                "api.requests_per_second",
            ),
        ] {
            let mut config = Config::from_toml(text).unwrap();
            let err = config.check().unwrap_err().to_string();
            assert!(err.starts_with(field), "{text}: {err}");
        }
        let config = Config::from_toml("[api]\nadmin_group = \"ml-admins\"\n").unwrap();
        assert_eq!(config.api.admin_group, "ml-admins");
        assert_eq!(Config::default().api.admin_group, "agentd-admin");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[inventory]\nintervall = \"5s\"\n").unwrap_err();
        assert!(err.contains("intervall"), "{err}");
        assert!(
            err.contains("interval"),
            "the allowed keys are listed: {err}"
        );
    }

    #[test]
    fn bad_duration_says_what_is_allowed() {
        let err = Config::from_toml("[inventory]\ninterval = \"ten\"\n").unwrap_err();
        assert!(err.contains("500ms, 10s, 5m"), "{err}");
    }

    #[test]
    fn overrides_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agentd.toml");
        std::fs::write(&file, "socket = \"/a.sock\"\nmetrics_addr = \"off\"\n").unwrap();
        let config = Config::load(
            Some(&file),
            &Overrides {
                socket: Some("/b.sock".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(config.socket, Path::new("/b.sock"));
        assert_eq!(config.metrics_addr, MetricsAddr::Off);
    }

    #[test]
    fn missing_explicit_file_names_the_path() {
        let err = Config::load(
            Some(Path::new("/nonexistent/agentd.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/agentd.toml"),
            "{err}"
        );
    }

    #[test]
    fn default_queue_must_exist() {
        let mut config =
            Config::from_toml("[jobs]\ndefault_queue = \"gpu\"\n[queues.batch]\npriority = 1\n")
                .unwrap();
        let err = config.check().unwrap_err().to_string();
        assert!(
            err.contains("jobs.default_queue") && err.contains("batch"),
            "{err}"
        );
    }

    #[test]
    fn print_config_round_trips() {
        let mut config = Config::default();
        config.check().unwrap();
        let again = Config::from_toml(&config.to_toml()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn cluster_keys_have_documented_defaults_and_are_checked() {
        let mut config = Config::from_toml("mode = \"cluster\"\n").unwrap();
        config.check().unwrap();
        assert_eq!(config.mode, Mode::Cluster);
        assert_eq!(config.cluster.namespace, "agentd-system");
        assert_eq!(config.cluster.cluster_domain, "cluster.local");
        assert_eq!(config.cluster.node_lease_interval, Duration::from_secs(10));
        assert!(!config.cluster.leader_eligible);
        assert_eq!(config.cluster.lease_duration, Duration::from_secs(15));
        assert_eq!(config.cluster.renew_deadline, Duration::from_secs(10));
        assert_eq!(config.cluster.retry_period, Duration::from_secs(2));
        assert_eq!(Config::default().mode, Mode::Standalone);
        let mut standalone = Config::from_toml("[cluster]\nplace_jobs = true\n").unwrap();
        let err = standalone.check().unwrap_err().to_string();
        assert!(
            err.contains("cluster.place_jobs") && err.contains("mode = \"cluster\""),
            "{err}"
        );

        assert_eq!(config.cluster.node_lost_grace, Duration::from_secs(40));
        for key in ["mount_timeout", "image_pull_timeout", "node_lost_grace"] {
            let mut config =
                Config::from_toml(&format!("mode = \"cluster\"\n[cluster]\n{key} = \"0s\"\n"))
                    .unwrap();
            let err = config.check().unwrap_err().to_string();
            assert!(
                err.contains(&format!("cluster.{key}")) && err.contains("at least 1s"),
                "{err}"
            );
        }

        let err = Config::from_toml("mode = \"swarm\"\n").unwrap_err();
        assert!(
            err.contains("standalone") && err.contains("cluster"),
            "{err}"
        );
        let mut config = Config::from_toml("[cluster]\nnode_lease_interval = \"500ms\"\n").unwrap();
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("cluster.node_lease_interval"), "{err}");
        let mut config = Config::from_toml("[cluster]\nnamespace = \"Agentd\"\n").unwrap();
        let err = config.check().unwrap_err().to_string();
        assert!(err.contains("cluster.namespace"), "{err}");
    }

    #[test]
    fn the_https_listener_is_off_by_default_and_checked_when_on() {
        let mut config = Config::default();
        config.check().unwrap();
        assert_eq!(config.api.listen_addr(), None);
        for (toml, field) in [
            ("[api]\nlisten = \"9443\"\n", "api.listen"),
            ("[api]\nlisten = \"0.0.0.0:9443\"\n", "api.tls_cert"),
            (
                "[api]\nlisten = \"0.0.0.0:9443\"\ntls_cert = \"c\"\n",
                "api.tls_key",
            ),
            (
                "[api]\nlisten = \"0.0.0.0:9443\"\ntls_cert = \"c\"\ntls_key = \"k\"\n",
                "api.tokens_file",
            ),
        ] {
            let mut config = Config::from_toml(toml).unwrap();
            let err = config.check().unwrap_err().to_string();
            assert!(err.contains(field), "{toml}: {err}");
        }
        let mut config = Config::from_toml(
            "[api]\nlisten = \"[::1]:9443\"\ntls_cert = \"c\"\ntls_key = \"k\"\nclient_ca = \"ca\"\n",
        )
        .unwrap();
        config.check().unwrap();
        assert_eq!(config.api.listen_addr().unwrap().port(), 9443);
    }

    #[test]
    fn the_packaged_config_file_shows_every_default() {
        let text = include_str!("../../packaging/agentd.toml");
        // Uncomment every commented-out key and section, as the file says one may.
        let mut uncommented = String::new();
        for line in text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| !l.is_empty() && !l.starts_with([' ', '#']))
        {
            uncommented.push_str(line);
            uncommented.push('\n');
        }
        assert!(uncommented.contains("lease_duration"), "{uncommented}");
        let mut config = Config::from_toml(&uncommented).unwrap();
        config.check().unwrap();
        let mut default = Config::default();
        default.check().unwrap();
        assert_eq!(config, default);
    }

    #[test]
    fn election_timings_are_checked_as_client_go_checks_them() {
        let check = |text: &str| {
            let mut config = Config::from_toml(&format!("[cluster]\n{text}")).unwrap();
            config.check().map_err(|e| e.to_string())
        };
        check("lease_duration = \"4s\"\nrenew_deadline = \"3s\"\nretry_period = \"500ms\"\n")
            .unwrap();
        let err = check("lease_duration = \"1500ms\"\n").unwrap_err();
        assert!(
            err.contains("cluster.lease_duration") && err.contains("whole number of seconds"),
            "{err}"
        );
        let err = check("lease_duration = \"10s\"\n").unwrap_err();
        assert!(
            err.contains("cluster.renew_deadline") && err.contains("shorter than"),
            "{err}"
        );
        let err = check("renew_deadline = \"2s\"\n").unwrap_err();
        assert!(
            err.contains("cluster.renew_deadline") && err.contains("1.2 times"),
            "{err}"
        );
        let err = check("retry_period = \"0s\"\n").unwrap_err();
        assert!(err.contains("cluster.retry_period"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_mins(5));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-5s").is_err());
        assert_eq!(format_duration(Duration::from_mins(5)), "5m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
