//! The HTTP/1.1 + JSON API on the Unix socket. This is the only module that knows about HTTP:
//! `routes` turns a method and path into a `Route`, handlers parse and validate bodies and ask
//! the core for what they need, and `error` gives every failure its status. Each request is
//! logged with the caller's uid, taken from the socket (SO_PEERCRED).

pub mod error;
mod logs;
mod routes;
pub mod socket;

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
    pub metrics: Option<crate::metrics::Metrics>,
    /// Cluster mode: the Kubernetes edge, for the node list, drain and status.
    pub cluster: Option<crate::cluster::Cluster>,
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
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(&state, uid, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after {SHUTDOWN_GRACE:?}; closing them");
    }
}

async fn handle(state: &ApiState, uid: Option<u32>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let parsed =
        declared_too_large(&req).and_then(|()| Route::parse(&method, &path, query.as_deref()));
    let route_name = parsed.as_ref().map_or("unknown", Route::name);
    let response = match parsed {
        Ok(route) => dispatch(state, route, req)
            .await
            .unwrap_or_else(|e| error_response(&e)),
        Err(e) => error_response(&e),
    };
    if let Some(metrics) = &state.metrics {
        metrics.api_request(route_name, response.status().as_u16());
    }
    tracing::info!(
        uid = uid.map_or_else(|| "unknown".to_owned(), |u| u.to_string()),
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
    let body = read_body(req).await?;
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
        Route::Status => Ok(json(StatusCode::OK, &status(state))),
        Route::Node => Ok(json(StatusCode::OK, &*state.inventory.borrow().clone())),
        Route::SubmitJob => {
            check_manifest_type(content_type.as_deref())?;
            if body.is_empty() {
                return Err(ApiError::bad_request(
                    "the request body is empty: send a TrainingJob or TFJob manifest in YAML or JSON",
                ));
            }
            let manifest = body.to_vec();
            let status = core
                .ask(|reply| Command::Submit { manifest, reply })
                .await?;
            Ok(json(StatusCode::CREATED, &status))
        }
        Route::ListJobs { queue, state } => {
            let list = core
                .ask(|reply| Command::List {
                    queue,
                    state,
                    reply,
                })
                .await?;
            Ok(json(StatusCode::OK, &list))
        }
        Route::GetJob { name } => Ok(json(
            StatusCode::OK,
            &core.ask(|reply| Command::Get { name, reply }).await?,
        )),
        Route::CancelJob { name } => Ok(json(
            StatusCode::OK,
            &core.ask(|reply| Command::Cancel { name, reply }).await?,
        )),
        Route::Queues => Ok(json(
            StatusCode::OK,
            &core.ask(|reply| Command::Queues { reply }).await?,
        )),
        Route::Nodes => Ok(json(StatusCode::OK, &nodes(state).await?)),
        Route::DrainNode { name, drain } => Ok(json(
            StatusCode::OK,
            &drain_node(state, &name, drain).await?,
        )),
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
        Route::JobLogs {
            name,
            replica,
            follow,
        } => logs::respond(core, name, replica, follow).await,
    }
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
            CoreError::ShuttingDown => ApiError::Unavailable(e.to_string()),
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
            healthy: inventory.gpus.iter().filter(|g| g.healthy).count() as u32,
            product: inventory
                .gpus
                .first()
                .map(|g| g.name.clone())
                .unwrap_or_default(),
        },
        cpu_cores: inventory.cpu.logical_cores,
        memory_bytes: inventory.memory.total_bytes,
        ready: "True".to_owned(),
        schedulable: !drained,
        drained,
        agent: AgentPresence {
            state: AgentState::Fresh,
            age_seconds: Some((crate::inventory::unix_now() - started).max(0.0) as u64),
        },
    }
}

impl From<crate::cluster::ClusterError> for ApiError {
    fn from(e: crate::cluster::ClusterError) -> Self {
        use crate::cluster::ClusterError as C;
        match e {
            C::NoSuchNode(_) => ApiError::NotFound(e.to_string()),
            C::Kubeconfig { .. } | C::NoKubeconfig(_) | C::Client { .. } | C::Request(_) => {
                ApiError::Unavailable(format!("the cluster did not answer: {e}"))
            }
        }
    }
}

fn status(state: &ApiState) -> Status {
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
        cluster: state.cluster.as_ref().map(crate::cluster::Cluster::status),
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
    json(status, &body)
}
