//! The HTTP/1.1 + JSON API on the Unix socket and, where configured, on an HTTPS listener
//! (`remote`). This is the only module that knows about HTTP: `routes` turns a method and path
//! into a `Route`, handlers parse and validate bodies and ask the core for what they need, and
//! `error` gives every failure its status. Every request has a caller (`auth`): the socket
//! peer's credentials (SO_PEERCRED), or the remote caller's token or client certificate; each
//! request is logged with it and checked against the same authorization rules on every door,
//! through the one router below.

pub mod auth;
pub mod error;
mod history;
pub mod limits;
mod logs;
pub mod remote;
mod routes;
pub mod socket;
mod templates;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_api::{
    AgentInfo, AgentPresence, AgentState, NodeGpus, NodeInventory, NodeList, NodeSummary, Status,
};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::watch;

pub use auth::Caller;
pub use error::ApiError;

use crate::core::{Command, CoreError, CoreHandle};
pub use routes::Route;

/// Bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How long in-flight requests get to finish once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub type Body = BoxBody<Bytes, std::io::Error>;

/// What the handlers can see: nothing mutable; changes go to the core as commands.
#[derive(Clone)]
pub struct ApiState {
    pub agent: Arc<AgentIdentity>,
    pub inventory: watch::Receiver<Arc<NodeInventory>>,
    /// True once the agent is ready to take work (first inventory in, core running).
    pub ready: watch::Receiver<bool>,
    pub core: CoreHandle,
    /// What a submitted manifest must pass before it reaches the core: the rules of the
    /// moment (the queues change while the agent runs, in cluster mode).
    pub admission: watch::Receiver<Arc<crate::job::Admission>>,
    pub metrics: Option<crate::metrics::Metrics>,
    /// Members of this group act on every job (`api.admin_group`).
    pub admin_group: Arc<str>,
    pub limits: Arc<ApiLimits>,
    /// Cluster mode: the Kubernetes edge, for the node list, drain and status.
    pub cluster: Option<crate::cluster::Cluster>,
    /// The job templates, where the agent keeps them (standalone mode).
    pub templates: Option<crate::store::Templates>,
}

/// The limits one listener of the API enforces (see [`limits`]).
pub struct ApiLimits {
    pub connections: limits::ConnectionCap,
    /// Shared by every listener: a user's rate is theirs whichever door they use.
    pub rate: Arc<limits::RequestRate>,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

impl ApiLimits {
    pub fn new(
        listener: &'static str,
        config: &crate::config::ApiConfig,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            connections: limits::ConnectionCap::new(listener, config.max_connections, metrics),
            rate: Arc::new(limits::RequestRate::new(
                config.requests_per_second,
                config.request_burst,
            )),
            header_timeout: config.header_timeout,
            body_timeout: config.body_timeout,
        }
    }

    /// The same limits for another listener: a cap of its own, the users' rates shared.
    #[must_use]
    pub fn for_listener(
        &self,
        listener: &'static str,
        config: &crate::config::ApiConfig,
        metrics: Option<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            connections: limits::ConnectionCap::new(listener, config.max_connections, metrics),
            rate: Arc::clone(&self.rate),
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
        }
    }
}

/// How the requests on one connection learn their caller.
#[derive(Clone)]
pub enum Identify {
    /// The socket: the peer's credentials, read once when it connected (`None`: unreadable).
    Peer(Option<Arc<Caller>>),
    /// The HTTPS listener: each request's bearer token, else the connection's client
    /// certificate's common name.
    Remote {
        auth: Arc<remote::RemoteAuth>,
        certificate: Option<remote::CertificateCaller>,
    },
}

impl Identify {
    fn caller(&self, req: &Request<Incoming>) -> Result<Arc<Caller>, ApiError> {
        match self {
            Identify::Peer(Some(caller)) => Ok(Arc::clone(caller)),
            Identify::Peer(None) => Err(ApiError::Unauthorized(
                "the caller's identity is unknown".to_owned(),
            )),
            Identify::Remote { auth, certificate } => auth.caller(
                req.headers().get(header::AUTHORIZATION),
                certificate.as_ref(),
                remote::unix_now(),
            ),
        }
    }
}

/// The fixed facts about this agent that `status` reports.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    pub version: String,
    pub mode: String,
    pub pid: u32,
    pub started_at: u64,
    pub started: Instant,
    pub state_dir: String,
    pub socket: String,
}

/// Accepts connections until `shutdown` turns true, then lets in-flight requests finish (up to
/// [`SHUTDOWN_GRACE`]) and returns.
pub async fn serve(listener: UnixListener, state: ApiState, mut shutdown: watch::Receiver<bool>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = state.limits.connections.admit() else {
            drop(stream);
            continue;
        };
        let pid = stream.peer_cred().ok().and_then(|c| c.pid());
        let caller = match stream.peer_cred() {
            Ok(cred) => Some(Arc::new(Caller::from_peer(
                cred.uid(),
                cred.gid(),
                &state.admin_group,
            ))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peer's credentials; refusing");
                None
            }
        };
        let peer = pid.map_or_else(|| "unknown".to_owned(), |p| format!("pid {p}"));
        tokio::spawn(serve_connection(
            state.clone(),
            stream,
            Identify::Peer(caller),
            peer,
            graceful.watcher(),
            permit,
        ));
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; closing them");
    }
}

/// Serves the requests of one connection, on any door, until it closes; `permit` holds its
/// place under the listener's connection cap.
pub(crate) async fn serve_connection<I>(
    state: ApiState,
    io: I,
    identify: Identify,
    peer: String,
    watcher: hyper_util::server::graceful::Watcher,
    permit: tokio::sync::OwnedSemaphorePermit,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = state.limits.header_timeout;
    let peer: Arc<str> = Arc::from(peer);
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let identify = identify.clone();
        let peer = Arc::clone(&peer);
        async move { Ok::<_, Infallible>(handle(&state, &identify, &peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // A client that shuts down its writing side after the request (as `curl` and
        // `nc -N` may) still gets the answer; without this the request is acted on and
        // the answer never sent.
        .half_close(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    let _permit = permit;
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

async fn handle(
    state: &ApiState,
    identify: &Identify,
    peer: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let parsed =
        declared_too_large(&req).and_then(|()| Route::parse(&method, &path, query.as_deref()));
    let route_name = parsed.as_ref().map_or("unknown", Route::name);
    let caller = identify.caller(&req);
    let response = match (parsed, &caller) {
        // Who is asking comes first: a caller who cannot say learns nothing else.
        (_, Err(e)) => {
            state.limits.connections.refused("unauthenticated");
            error_response(e)
        }
        (Ok(_), Ok(caller))
            if caller.owner.uid != 0 && !state.limits.rate.allow(caller.name(), Instant::now()) =>
        {
            state.limits.connections.refused("rate_limit");
            error_response(&ApiError::TooManyRequests(format!(
                "{} sent too many requests; slow down (api.requests_per_second)",
                caller.name()
            )))
        }
        (Ok(route), Ok(caller)) => dispatch(state, caller, route, req)
            .await
            .unwrap_or_else(|e| {
                if matches!(e, ApiError::RequestTimeout { .. }) {
                    state.limits.connections.refused("body_timeout");
                }
                error_response(&e)
            }),
        (Err(e), Ok(_)) => error_response(&e),
    };
    let caller = caller.ok();
    let caller = caller.as_deref();
    if let Some(metrics) = &state.metrics {
        metrics.api_request(route_name, response.status().as_u16());
    }
    tracing::info!(
        uid = caller.map_or_else(|| "unknown".to_owned(), |c| c.owner.uid.to_string()),
        user = caller.map_or("unknown", Caller::name),
        peer,
        %method,
        path,
        status = response.status().as_u16(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

async fn dispatch(
    state: &ApiState,
    caller: &Caller,
    route: Route,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    // Every route reads its body through the limit, even those that expect none, so that an
    // oversized request is always a 413 and never a half-read connection.
    let body = tokio::time::timeout(state.limits.body_timeout, read_body(req))
        .await
        .map_err(|_| ApiError::RequestTimeout {
            after: state.limits.body_timeout,
        })??;
    let core = &state.core;
    match route {
        Route::Healthz => Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
        Route::Readyz => {
            if *state.ready.borrow() {
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "ready"}),
                ))
            } else {
                Err(ApiError::Unavailable(
                    "the agent is starting: the first inventory is not in yet".into(),
                ))
            }
        }
        Route::Status => Ok(json(StatusCode::OK, &status(state).await)),
        Route::Node => Ok(json(StatusCode::OK, &*state.inventory.borrow().clone())),
        Route::SubmitJob => {
            caller.may_submit()?;
            check_manifest_type(content_type.as_deref())?;
            if body.is_empty() {
                return Err(ApiError::bad_request(
                    "the request body is empty: send a TrainingJob or TFJob manifest in YAML or JSON",
                ));
            }
            // Reading and checking a manifest is work in proportion to the manifest: it runs on
            // a blocking thread so that no request waits behind it, and the core receives a job.
            let admission = Arc::clone(&state.admission.borrow());
            let job = tokio::task::spawn_blocking(move || {
                crate::job::admit(&body, &admission).map(|job| {
                    let manifest = String::from_utf8_lossy(&body).into_owned();
                    (job, manifest)
                })
            })
            .await
            .map_err(|e| ApiError::Internal(format!("reading the manifest failed: {e}")))?
            .map_err(CoreError::from)?;
            let (job, manifest) = job;
            let status = core
                .ask(|reply| Command::Submit {
                    job: Box::new(job),
                    manifest,
                    owner: caller.owner.clone(),
                    reply,
                })
                .await?;
            Ok(json(StatusCode::CREATED, &status))
        }
        Route::ListJobs { queue, state, user } => {
            let list = core
                .ask(|reply| Command::List {
                    queue,
                    state,
                    user,
                    reply,
                })
                .await?;
            Ok(json(StatusCode::OK, &list))
        }
        Route::GetJob { name, removed } => Ok(json(
            StatusCode::OK,
            &core
                .ask(|reply| Command::Get {
                    name,
                    removed,
                    reply,
                })
                .await?,
        )),
        Route::CancelJob { name } => {
            authorize_job(core, caller, &name).await?;
            let by = caller.name().to_owned();
            Ok(json(
                StatusCode::OK,
                &core
                    .ask(|reply| Command::Cancel {
                        name,
                        by,
                        object: None,
                        reply,
                    })
                    .await?,
            ))
        }
        Route::Queues => Ok(json(
            StatusCode::OK,
            &core.ask(|reply| Command::Queues { reply }).await?,
        )),
        Route::Nodes => Ok(json(StatusCode::OK, &nodes(state).await?)),
        Route::DrainNode { name, drain } => {
            caller.may_manage_nodes(&name)?;
            Ok(json(
                StatusCode::OK,
                &drain_node(state, &name, drain).await?,
            ))
        }
        Route::Events { after, limit, job } => {
            let list = core
                .ask(|reply| Command::Events {
                    after,
                    limit,
                    job,
                    reply,
                })
                .await?;
            Ok(json(StatusCode::OK, &list))
        }
        Route::History(request) => history::respond(core, request).await,
        Route::Template(request) => {
            templates::respond(state, caller, request, body, content_type.as_deref()).await
        }
        Route::JobLogs {
            name,
            replica,
            follow,
        } => {
            authorize_job(core, caller, &name).await?;
            match &state.cluster {
                Some(cluster) => logs::respond_cluster(core, cluster, name, replica, follow).await,
                None => logs::respond(core, name, replica, follow).await,
            }
        }
    }
}

/// Checks that `caller` may act on job `name` (a missing job is a 404 for everyone: it is in
/// the job list all callers may read anyway).
async fn authorize_job(core: &CoreHandle, caller: &Caller, name: &str) -> Result<(), ApiError> {
    if caller.admin {
        return Ok(());
    }
    let job = core
        .ask(|reply| Command::Get {
            name: name.to_owned(),
            removed: false,
            reply,
        })
        .await?;
    caller.may_act_on(name, job.owner.as_ref())
}

/// Manifests come as YAML or JSON; a form or a binary upload is a mistake worth naming.
fn check_manifest_type(content_type: Option<&str>) -> Result<(), ApiError> {
    match content_type {
        None
        | Some(
            "" | "application/json" | "application/yaml" | "application/x-yaml" | "text/yaml"
            | "text/x-yaml" | "text/plain",
        ) => Ok(()),
        Some(other) => Err(ApiError::UnsupportedMediaType(format!(
            "content type {other:?} is not a manifest; send application/yaml or application/json"
        ))),
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        use agentd_api::error::FieldProblem;
        match e {
            CoreError::NotFound(_) => ApiError::NotFound(e.to_string()),
            CoreError::Spec(crate::job::SpecError::Syntax { .. }) => {
                ApiError::bad_request(e.to_string())
            }
            CoreError::Spec(crate::job::SpecError::Invalid(errors)) => ApiError::Invalid(
                errors
                    .into_iter()
                    .map(|f| FieldProblem {
                        field: f.field,
                        message: f.message,
                    })
                    .collect(),
            ),
            CoreError::BadField { field, message } => ApiError::BadRequest {
                message,
                field: Some(field),
            },
            CoreError::Conflict(message) => ApiError::Conflict(message),
            CoreError::ShuttingDown
            | CoreError::NotWritten(_)
            | CoreError::NotLeader { .. }
            | CoreError::Executor(_) => ApiError::Unavailable(e.to_string()),
            CoreError::Store(e) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Every node: the cluster's in cluster mode, this machine alone in standalone mode.
async fn nodes(state: &ApiState) -> Result<NodeList, ApiError> {
    if let Some(cluster) = &state.cluster {
        return Ok(cluster.nodes().await?);
    }
    let drained = state
        .core
        .ask(|reply| Command::Drain {
            drained: None,
            reply,
        })
        .await?;
    Ok(NodeList {
        nodes: vec![standalone_node(&state.inventory.borrow(), drained)],
        partial: None,
    })
}

async fn drain_node(state: &ApiState, name: &str, drain: bool) -> Result<NodeSummary, ApiError> {
    if let Some(cluster) = &state.cluster {
        return Ok(cluster.set_drain(name, drain).await?);
    }
    let inventory = state.inventory.borrow().clone();
    if name != inventory.name {
        return Err(ApiError::NotFound(format!(
            "no node named {name:?}: this agent runs standalone, and its one node is {:?}",
            inventory.name
        )));
    }
    let drained = state
        .core
        .ask(|reply| Command::Drain {
            drained: Some(drain),
            reply,
        })
        .await?;
    Ok(standalone_node(&inventory, drained))
}

fn standalone_node(inventory: &NodeInventory, drained: bool) -> NodeSummary {
    let started = inventory.sampled_at.max(0.0);
    NodeSummary {
        name: inventory.name.clone(),
        gpus: NodeGpus {
            total: inventory.gpus.len() as u32,
            healthy: inventory.healthy_gpus(),
            product: inventory.gpu_product(),
        },
        cpu_cores: inventory.cpu.logical_cores,
        memory_bytes: inventory.memory.total_bytes,
        ready: "True".to_owned(),
        schedulable: Some(!drained),
        drained,
        agent: AgentPresence {
            state: AgentState::Fresh,
            age_seconds: Some((crate::inventory::unix_now() - started).max(0.0) as u64),
        },
        taints: Vec::new(),
    }
}

impl From<crate::cluster::ClusterError> for ApiError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        use crate::cluster::ClusterError as C;
        match e {
            C::NoSuchNode(_) | C::Unregistered { .. } | C::NotFound(_) => {
                ApiError::NotFound(e.to_string())
            }
            C::Forbidden(message) => ApiError::Forbidden {
                rule: "cluster-role",
                message,
            },
            C::Kubeconfig { .. } | C::NoKubeconfig(_) | C::Client { .. } | C::Request(_) => {
                ApiError::Unavailable(format!("the cluster did not answer: {e}"))
            }
        }
    }
}

async fn status(state: &ApiState) -> Status {
    let cluster = match &state.cluster {
        Some(cluster) => Some(cluster.status_with_leader().await),
        None => None,
    };
    let a = &state.agent;
    Status {
        agent: AgentInfo {
            version: a.version.clone(),
            mode: a.mode.clone(),
            pid: a.pid,
            started_at: a.started_at,
            uptime_seconds: a.started.elapsed().as_secs(),
            state_dir: a.state_dir.clone(),
            socket: a.socket.clone(),
        },
        node: (*state.inventory.borrow().clone()).clone(),
        cluster,
    }
}

/// Refuses a request whose declared length is over the limit before anything else is looked at.
fn declared_too_large(req: &Request<Incoming>) -> Result<(), ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        });
    }
    Ok(())
}

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`] (also when no length was
/// declared, as with chunked bodies).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge {
            limit: MAX_BODY_BYTES,
        }),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("wire types always serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(bytes))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static headers are valid")
}

pub fn error_response(error: &ApiError) -> Response<Body> {
    let (status, body) = error.to_response_parts();
    let mut response = json(status, &body);
    // RFC 9110: a 405 says which methods the resource has; RFC 6750: a 401 names the scheme.
    if let ApiError::MethodNotAllowed { allowed, .. } = error {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
    }
    if let ApiError::Unauthorized(_) = error {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"agentd\""),
        );
    }
    response
}
