//! Cluster mode's edge to Kubernetes. A node agent keeps two namespaced objects in the cluster
//! namespace and nothing else: its heartbeat Lease `agentd-node-<node>` (one update per
//! renewal) and its `AgentNode` (written only when what it publishes changes). Agents started
//! with `cluster.leader_eligible` elect a leader over the Lease `agentd-leader`; the leader
//! projects every `AgentNode` onto its Node's `agentd.io/` labels and annotation. This module
//! also answers the API's node list and drain/resume, within what the agent's role allows (an
//! agent that may not read or label Nodes lists the agents' `AgentNode`s and Leases instead,
//! and records a drain in the node's `AgentNode` for the leader to project), and computes each
//! node's free capacity for placement.
//!
//! It must not schedule: the scheduler core stays pure, and placing gangs onto Kubernetes (the
//! elected leader's work) builds on [`Cluster`] as a client, not inside these loops.
//!
//! The API server is allowed to be down, slow or failing: every loop retries with a capped,
//! jittered backoff, the link state is logged once per change, and the local socket never waits
//! on the cluster except for the requests that are about the cluster.

pub mod backoff;
pub mod capacity;
pub mod election;
pub mod feed;
pub mod inventory;
pub mod jobs;
mod logs;
mod loops;
pub mod queues;

pub use logs::PodLog;
pub mod view;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use agentd_api::{ClusterStatus, NodeList, NodeSummary};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use tokio::sync::watch;

use self::backoff::{Link, Outcome, Transition};
use self::election::{ElectionConfig, Leadership};
use self::inventory::{AgentNodeStatus, LABEL_DRAIN, SPEC_DRAIN, drain_request};
use self::view::AgentRecord;
use crate::config::Config;
use crate::metrics::Metrics;

pub use loops::spawn;

/// Requests that one stream of work (the pods a leader creates and deletes, the jobs it takes
/// in) keeps in flight to the API server at once. Without a bound, a burst of a thousand gangs
/// is eight thousand requests at once, each on a connection of its own (the client speaks
/// HTTP/1.1), each with a TLS handshake: the API server and the agent spend the burst on
/// handshakes, and the agent's Lease renewal waits behind them until it loses the Lease. With
/// it, the requests share a few kept-alive connections.
pub const REQUESTS_IN_FLIGHT: usize = 64;

/// Turns to send requests, [`REQUESTS_IN_FLIGHT`] at a time.
pub struct RequestTurns(tokio::sync::Semaphore);

impl Default for RequestTurns {
    fn default() -> Self {
        Self(tokio::sync::Semaphore::new(REQUESTS_IN_FLIGHT))
    }
}

impl RequestTurns {
    /// Sends `request` in its turn and waits for its answer.
    pub async fn send<F: Future>(&self, request: F) -> F::Output {
        let _turn = self
            .0
            .acquire()
            .await
            .expect("the semaphore is never closed");
        request.await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot read kubeconfig {}: {message}", path.display())]
    Kubeconfig { path: PathBuf, message: String },
    #[error(
        "no kubeconfig found ({0}); give one with --kubeconfig FILE or [cluster] kubeconfig, or set KUBECONFIG"
    )]
    NoKubeconfig(String),
    #[error("cannot build a client for the API server {server}: {message}")]
    Client { server: String, message: String },
    #[error("no node named {0:?} in the cluster")]
    NoSuchNode(String),
    #[error(
        "no agent has registered node {node:?} (there is no AgentNode {node} in {namespace}), and this agent's role may not label Nodes: drain it from an agent with the agentd-leader role, or with `kubectl label node {node} agentd.io/drain=true`"
    )]
    Unregistered { node: String, namespace: String },
    /// The API server could not be reached, refused, or answered with an error.
    #[error("{0}")]
    Request(String),
    /// What was asked for does not exist (the sentence says what and why).
    #[error("{0}")]
    NotFound(String),
    /// This agent's role may not do it (the sentence says where it can be done).
    #[error("{0}")]
    Forbidden(String),
}

/// The group, version and names of the `AgentNode` custom resource.
pub fn agent_node_resource() -> ApiResource {
    ApiResource {
        group: "agentd.io".into(),
        version: "v1alpha1".into(),
        api_version: "agentd.io/v1alpha1".into(),
        kind: "AgentNode".into(),
        plural: "agentnodes".into(),
    }
}

/// What the cluster loops and the API share: the client, who this node is, and the link state.
#[derive(Clone)]
pub struct Cluster {
    client: kube::Client,
    /// The same server without the per-request read bound, for watches.
    watch_client: kube::Client,
    pub node: String,
    pub namespace: String,
    pub interval: Duration,
    pub leader_eligible: bool,
    server: String,
    link: Arc<Mutex<Link>>,
    /// Bumped each time the API server is back after an outage, so writers catch up.
    reconnects: watch::Sender<u64>,
    /// The election's timings; `None` on a worker-only agent, which never tries to lead.
    election: Option<ElectionConfig>,
    /// Who leads, as the election loop last saw it.
    leadership: watch::Sender<Leadership>,
    metrics: Option<Metrics>,
}

impl Cluster {
    /// Reads the kubeconfig (the configured file, else what kube-rs infers) and builds a client.
    /// Nothing is sent yet: an unreachable server is not a start-up error.
    pub async fn connect(
        config: &Config,
        node: String,
        metrics: Option<Metrics>,
    ) -> Result<Self, ClusterError> {
        let path = &config.cluster.kubeconfig;
        let mut kube_config = if path.as_os_str().is_empty() {
            kube::Config::infer()
                .await
                .map_err(|e| ClusterError::NoKubeconfig(e.to_string()))?
        } else {
            let bad = |message: String| ClusterError::Kubeconfig {
                path: path.clone(),
                message,
            };
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| bad(error_chain(&e)))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(error_chain(&e)))?
        };
        // A blackholed server must not hold a renewal for minutes: every request gets a bound
        // of its own, about one lease interval. (Watches use their own client.)
        let bound = config
            .cluster
            .node_lease_interval
            .clamp(Duration::from_secs(2), Duration::from_secs(10));
        kube_config.connect_timeout = Some(bound);
        // kube-rs would otherwise retry 429/503/504 inside one call, up to 15 times and for
        // minutes, out of sight of the agent's own backoff, link state and request counts.
        kube_config.default_retry = false;
        // Which agent sent a request, in the API server's audit log: `agentd/0.9.0 (node-3)`.
        let agent = format!("agentd/{} ({node})", env!("CARGO_PKG_VERSION"));
        if let Ok(value) = http::HeaderValue::from_str(&agent) {
            kube_config.headers.push((http::header::USER_AGENT, value));
        }
        let mut watch_config = kube_config.clone();
        watch_config.read_timeout = None;
        kube_config.read_timeout = Some(bound);
        kube_config.write_timeout = Some(bound);
        let server = kube_config.cluster_url.to_string();
        let server = server.trim_end_matches('/').to_owned();
        let build = |config: kube::Config| {
            kube::Client::try_from(config).map_err(|e| ClusterError::Client {
                server: server.clone(),
                message: error_chain(&e),
            })
        };
        let client = build(kube_config)?;
        let watch_client = build(watch_config)?;
        if let Some(metrics) = &metrics {
            metrics.set_cluster_connected(false);
        }
        let election = config.cluster.leader_eligible.then(|| ElectionConfig {
            identity: node.clone(),
            lease_duration: config.cluster.lease_duration,
            renew_deadline: config.cluster.renew_deadline,
            retry_period: config.cluster.retry_period,
        });
        Ok(Self {
            client,
            watch_client,
            node,
            namespace: config.cluster.namespace.clone(),
            interval: config.cluster.node_lease_interval,
            leader_eligible: config.cluster.leader_eligible,
            server,
            link: Arc::new(Mutex::new(Link::Unknown)),
            reconnects: watch::channel(0).0,
            election,
            leadership: watch::channel(Leadership::default()).0,
            metrics,
        })
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The client meant for long-lived watches (no per-request read bound).
    pub fn watch_client(&self) -> &kube::Client {
        &self.watch_client
    }

    pub fn nodes_api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub fn leases_api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn agent_nodes_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &agent_node_resource())
    }

    /// `AgentNode`s through the client meant for long-lived watches.
    pub fn agent_nodes_watch_api(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.watch_client.clone(),
            &self.namespace,
            &agent_node_resource(),
        )
    }

    /// Runs one request, counts it in `agentd_cluster_requests_total{verb,code}` and moves the
    /// link state; a change of state is logged once.
    pub async fn call<T>(
        &self,
        verb: &'static str,
        what: &str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, RequestError> {
        let result = request.await;
        let (code, outcome) = match &result {
            // kube-rs does not hand back the status of a success; a create's is 201.
            Ok(_) if verb == "create" => (201, Outcome::Answered),
            Ok(_) => (200, Outcome::Answered),
            Err(e) => {
                let error = RequestError::new(verb, what, e);
                let outcome = match error.code {
                    Some(401 | 403) => Outcome::Refused(error.message.clone()),
                    Some(429 | 500..) | None => Outcome::Unreachable(error.message.clone()),
                    Some(_) => Outcome::Answered,
                };
                (error.code.unwrap_or(0), outcome)
            }
        };
        if let Some(metrics) = &self.metrics {
            let code = if code == 0 {
                "<error>".to_owned()
            } else {
                code.to_string()
            };
            metrics.cluster_request(verb, &code);
        }
        self.observe(outcome);
        result.map_err(|e| RequestError::new(verb, what, &e))
    }

    fn observe(&self, outcome: Outcome) {
        let (transition, reachable) = {
            let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
            (link.observe(outcome), link.reachable())
        };
        if let Some(metrics) = &self.metrics {
            metrics.set_cluster_connected(reachable);
        }
        match transition {
            None => {}
            Some(Transition::Connected { was_down }) => {
                if was_down {
                    tracing::info!(server = %self.server, "API server reachable again; catching up");
                    self.reconnects.send_modify(|n| *n += 1);
                } else {
                    tracing::info!(server = %self.server, "connected to the API server");
                }
            }
            Some(Transition::Unreachable(why)) => tracing::warn!(
                server = %self.server,
                "API server unreachable ({why}); the agent keeps running and retries with backoff"
            ),
            Some(Transition::Refused(why)) => tracing::error!(
                server = %self.server,
                "the API server refused the agent ({why}); check the credentials in the kubeconfig and the agent's RBAC role"
            ),
        }
    }

    /// Counts a failed watch request (successful watches are long-lived and not counted).
    pub(crate) fn count_watch_error(&self, e: &kube::runtime::watcher::Error) {
        use kube::runtime::watcher::Error as W;
        let inner = match e {
            W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => Some(e),
            _ => None,
        };
        let code = match (e, inner) {
            (_, Some(kube::Error::Api(s))) | (W::WatchError(s), _) => s.code.to_string(),
            _ => "<error>".to_owned(),
        };
        if let Some(metrics) = &self.metrics {
            metrics.cluster_request("watch", &code);
        }
    }

    /// A receiver that changes each time the API server is back after an outage.
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        self.reconnects.subscribe()
    }

    /// Who leads: changes when the leader changes, when this agent starts or stops leading,
    /// and on each of its renewals. Leader-only work checks [`Leadership::leads`] on it before
    /// each write.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    /// Whether this agent may act as the leader now.
    pub fn leads(&self) -> bool {
        self.leadership.borrow().leads(Instant::now())
    }

    /// `agentctl status`'s cluster part.
    pub fn status(&self) -> ClusterStatus {
        let link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        let leadership = self.leadership.borrow();
        ClusterStatus {
            server: self.server.clone(),
            namespace: self.namespace.clone(),
            reachable: link.reachable(),
            last_error: link.last_error(),
            leader: leadership.leader.clone(),
            leading: leadership.leads(Instant::now()),
        }
    }

    /// `agentctl status`'s cluster part, the leader included on an agent that does not take
    /// part in the election: it reads the Lease `agentd-leader` (which its role may get) and
    /// names the holder while the Lease runs, as this machine's clock tells. A failed or slow
    /// read leaves the leader unnamed.
    pub async fn status_with_leader(&self) -> ClusterStatus {
        let mut status = self.status();
        if self.leader_eligible {
            return status;
        }
        // A read for a person: bounded, and kept out of the link state the loops keep.
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            self.leases_api().get_opt(election::LEADER_LEASE),
        )
        .await;
        if let Ok(Ok(Some(lease))) = read {
            status.leader = running_holder(&lease, k8s_openapi::jiff::Timestamp::now());
        }
        status
    }

    /// Asks the API server whether this agent may `verb` Nodes (one SelfSubjectAccessReview,
    /// which every authenticated user may create), so that a role without the right is never
    /// refused with a 403. `None` when the server did not answer the question.
    async fn may_on_nodes(&self, verb: &str, name: Option<&str>) -> Option<bool> {
        self.may(verb, "nodes", None, None, name).await
    }

    /// Whether this agent may `verb` a core `resource` (and `subresource`), in `namespace` (or
    /// cluster-wide): one SelfSubjectAccessReview. `None` when the server did not answer.
    async fn may(
        &self,
        verb: &str,
        resource: &str,
        subresource: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Option<bool> {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource: subresource.map(str::to_owned),
                    namespace: namespace.map(str::to_owned),
                    name: name.map(str::to_owned),
                    ..ResourceAttributes::default()
                }),
                ..SelfSubjectAccessReviewSpec::default()
            },
            ..SelfSubjectAccessReview::default()
        };
        let api: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let answer = self
            .call(
                "create",
                "selfsubjectaccessreviews",
                api.create(&PostParams::default(), &review),
            )
            .await
            .ok()?;
        answer.status.map(|s| s.allowed)
    }

    /// Every Node with its agent's inventory and heartbeat; where this agent may not list Nodes,
    /// every node whose agent registered (see [`view::agent_list`]).
    pub async fn nodes(&self) -> Result<NodeList, ClusterError> {
        let lp = ListParams::default();
        let nodes = if self.may_on_nodes("list", None).await == Some(false) {
            None
        } else {
            match self.call("list", "nodes", self.nodes_api().list(&lp)).await {
                Ok(nodes) => Some(nodes.items),
                // The review was not answered and the list was refused: the agent view.
                Err(RequestError {
                    code: Some(403), ..
                }) => None,
                Err(e) => return Err(e.into()),
            }
        };
        let leases = self
            .call("list", "leases", self.leases_api().list(&lp))
            .await?;
        let agents = self
            .call("list", "agentnodes", self.agent_nodes_api().list(&lp))
            .await?;
        let records: BTreeMap<String, AgentRecord> = agents
            .items
            .into_iter()
            .filter_map(|o| {
                let name = o.metadata.name?;
                let status = o
                    .data
                    .get("status")
                    .and_then(|s| serde_json::from_value(s.clone()).ok());
                let drain = drain_request(&o.data);
                Some((name, AgentRecord { status, drain }))
            })
            .collect();
        let now = k8s_openapi::jiff::Timestamp::now();
        Ok(match nodes {
            Some(nodes) => {
                let published: BTreeMap<String, AgentNodeStatus> = records
                    .into_iter()
                    .filter_map(|(name, r)| Some((name, r.status?)))
                    .collect();
                view::node_list(&nodes, &leases.items, &published, now, self.interval)
            }
            None => view::agent_list(&leases.items, &records, now, self.interval),
        })
    }

    /// Drains (`drain`) or resumes a node. The request is recorded in the node's `AgentNode`
    /// `spec` (every agent's role may write it), and a leader-eligible agent projects it onto the
    /// Node's `agentd.io/drain=true` label; where this agent may label Nodes itself it also
    /// does so at once, which is the only way for a node without an agent. Both are merge
    /// patches that name one key.
    pub async fn set_drain(&self, name: &str, drain: bool) -> Result<NodeSummary, ClusterError> {
        let record = serde_json::json!({"spec": {SPEC_DRAIN: drain}});
        let recorded = match self
            .call(
                "patch",
                &format!("agentnodes/{name}"),
                self.agent_nodes_api()
                    .patch(name, &PatchParams::default(), &Patch::Merge(&record)),
            )
            .await
        {
            Ok(_) => true,
            Err(RequestError {
                code: Some(404), ..
            }) => false,
            Err(e) => return Err(e.into()),
        };
        if self.may_on_nodes("patch", Some(name)).await == Some(false) {
            if !recorded {
                return Err(ClusterError::Unregistered {
                    node: name.to_owned(),
                    namespace: self.namespace.clone(),
                });
            }
        } else {
            let value = if drain {
                serde_json::Value::from("true")
            } else {
                serde_json::Value::Null
            };
            let patch = serde_json::json!({"metadata": {"labels": {LABEL_DRAIN: value}}});
            let labelled = self
                .call(
                    "patch",
                    &format!("nodes/{name}"),
                    self.nodes_api()
                        .patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await;
            match labelled {
                Err(RequestError {
                    code: Some(404), ..
                }) => return Err(ClusterError::NoSuchNode(name.to_owned())),
                Err(RequestError {
                    code: Some(403), ..
                }) if !recorded => {
                    return Err(ClusterError::Unregistered {
                        node: name.to_owned(),
                        namespace: self.namespace.clone(),
                    });
                }
                Err(e) if e.code != Some(403) => return Err(e.into()),
                // Refused although the review was not answered: the labeller projects the
                // recorded request.
                Ok(_) | Err(_) => {}
            }
        }
        self.nodes()
            .await?
            .nodes
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ClusterError::NoSuchNode(name.to_owned()))
    }
}

/// A failed request, described for a person: what was asked and what came back.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// The HTTP status, where the server answered.
    pub code: Option<u16>,
    pub message: String,
}

impl RequestError {
    fn new(verb: &str, what: &str, e: &kube::Error) -> Self {
        match e {
            kube::Error::Api(status) => {
                let code = status.code;
                let detail = if status.message.is_empty() {
                    status.reason.clone()
                } else {
                    status.message.clone()
                };
                let reason = match code {
                    401 => "Unauthorized (the token or certificate is not accepted)",
                    403 => "Forbidden (the agent's role does not allow it)",
                    429 => "TooManyRequests",
                    500..=599 => "server error",
                    _ => "",
                };
                Self {
                    code: Some(code),
                    message: format!("{verb} {what}: HTTP {code} {reason}: {detail}"),
                }
            }
            other => Self {
                code: None,
                message: format!("{verb} {what}: {}", error_chain(other)),
            },
        }
    }
}

impl From<RequestError> for ClusterError {
    fn from(e: RequestError) -> Self {
        ClusterError::Request(e.message)
    }
}

/// An error and its causes on one line, so that "connection refused" is not lost behind
/// "client error (Connect)".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The holder of a Lease that has not run out at `now` (see [`view::presence`]). A released
/// Lease (empty holder) names nobody.
fn running_holder(lease: &Lease, now: k8s_openapi::jiff::Timestamp) -> Option<String> {
    let holder = lease.spec.as_ref()?.holder_identity.as_deref()?;
    let runs =
        view::presence(Some(lease), now, Duration::ZERO).state == agentd_api::AgentState::Fresh;
    (runs && !holder.is_empty()).then(|| holder.to_owned())
}

#[cfg(test)]
mod leader_tests {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};

    use super::*;

    fn lease(holder: &str, renewed: Timestamp) -> Lease {
        crate::cluster::view::tests::lease(holder, renewed, 15)
    }

    #[test]
    fn a_lease_names_its_holder_only_while_it_runs() {
        let now = Timestamp::now();
        let ago = |s| now.checked_sub(SignedDuration::from_secs(s)).unwrap();
        assert_eq!(
            running_holder(&lease("node-1", ago(3)), now).as_deref(),
            Some("node-1")
        );
        assert_eq!(running_holder(&lease("node-1", ago(16)), now), None);
        assert_eq!(running_holder(&lease("", ago(0)), now), None);
        assert_eq!(running_holder(&Lease::default(), now), None);
    }
}
