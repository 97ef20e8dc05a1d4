//! kube-sim: a Kubernetes API server simulator that `kubectl`, the Python `kubernetes` client and
//! kube-rs accept, with simulated kubelets for any number of GPU nodes.
//!
//! It is a test double for agentd's cluster mode and its benchmarks, not a product: see the
//! README for what differs from a real API server. Start it in-process with [`KubeSim::start`]
//! or run the `kube-sim` binary.

pub mod access;
pub mod audit;
pub mod auth;
pub mod client;
pub mod clock;
pub mod defaults;
pub mod fault;
pub mod kubelet;
pub mod patch;
pub mod rbac;
pub mod recorder;
pub mod resources;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use auth::{StaticToken, UserInfo};
pub use clock::TimeScale;
pub use kubelet::{EXIT_CODE, FAIL, Failure, LOG, RUN_SECONDS};
pub use rbac::AuthorizationMode;
pub use recorder::EVENT_API;
pub use store::Store;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("writing the kubeconfig: {0}")]
    Kubeconfig(#[source] std::io::Error),
    #[error("creating simulated nodes: {0}")]
    Nodes(#[source] store::StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("opening the audit log {path}: {source}")]
    AuditLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("creating the bootstrap RBAC roles: {0}")]
    Rbac(#[source] store::StoreError),
}

/// What a simulator starts with.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where to write a kubeconfig for this server, if anywhere.
    pub kubeconfig: Option<PathBuf>,
    /// Simulated nodes to create at start, `node-0`..
    pub nodes: usize,
    pub gpus_per_node: u32,
    pub time_scale: TimeScale,
    /// Events kept per resource for watches that resume from a resourceVersion.
    pub watch_history: usize,
    /// Events a watcher may have undelivered before it is dropped with 410.
    pub watch_buffer: usize,
    /// How often watches with `allowWatchBookmarks` get a bookmark (real time).
    pub bookmark_interval: Duration,
    /// Cluster time after a node goes `Unknown` before its pods are deleted.
    pub pod_eviction_timeout: Duration,
    /// Serve HTTPS with a certificate signed by a CA generated at start; the CA certificate goes
    /// into the kubeconfig (`certificate-authority-data`). Off: plain HTTP.
    pub tls: bool,
    /// Bearer tokens (kube-apiserver's static token file). `None`: no authentication, every
    /// request runs as `system:unsecured` in `system:masters`. `Some`: requests without a known
    /// token get 401, and a generated admin token (group `system:masters`) is added and written
    /// into the kubeconfig.
    pub tokens: Option<Vec<StaticToken>>,
    /// `AlwaysAllow` (default) or `Rbac`: Roles, ClusterRoles and their bindings decide, and a
    /// denied request gets a 403 `Forbidden` Status.
    pub authorization: AuthorizationMode,
    /// Write one JSON line per request served to this file (created or truncated at start).
    pub audit_log: Option<PathBuf>,
    /// Kubelets refuse pods whose requests (`nvidia.com/gpu`, cpu, memory) exceed what is free
    /// on their node: the pod fails with reason `OutOf<resource>`, as on a real kubelet. Off:
    /// nodes run whatever is bound to them.
    pub kubelet_admission: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            kubeconfig: None,
            nodes: 0,
            gpus_per_node: 8,
            time_scale: TimeScale::default(),
            watch_history: 10_000,
            watch_buffer: 4096,
            bookmark_interval: Duration::from_secs(1),
            pod_eviction_timeout: Duration::from_mins(5),
            tls: false,
            tokens: None,
            authorization: AuthorizationMode::AlwaysAllow,
            audit_log: None,
            kubelet_admission: false,
        }
    }
}

/// Entry point.
pub struct KubeSim;

impl KubeSim {
    /// Binds, writes the kubeconfig, creates the nodes and starts serving. Needs a Tokio
    /// runtime.
    pub async fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| SimError::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: config.listen,
            source,
        })?;
        let store = Arc::new(Store::new(config.watch_history, config.watch_buffer));
        rbac::bootstrap(&store).map_err(SimError::Rbac)?;
        let tls = if config.tls {
            Some(tls::generate(addr)?)
        } else {
            None
        };
        let admin = config
            .tokens
            .as_ref()
            .map(|_| StaticToken::generate(ADMIN_USER, &[auth::MASTERS]));
        let tokens = config.tokens.as_ref().map(|ts| {
            let mut all = ts.clone();
            all.extend(admin.clone());
            all
        });
        let audit = match &config.audit_log {
            Some(path) => {
                Some(
                    audit::AuditLog::create(path).map_err(|source| SimError::AuditLog {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let logs = Arc::new(kubelet::PodLogs::default());
        let kubelets = kubelet::Kubelets::new(
            store.clone(),
            logs.clone(),
            config.time_scale,
            config.pod_eviction_timeout,
        );
        kubelets.set_admission(config.kubelet_admission);
        let mut tasks = kubelets.start();
        kubelets
            .add_nodes(0, config.nodes, config.gpus_per_node)
            .map_err(SimError::Nodes)?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{addr}");
        let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
        let admin_token = admin.map(|a| a.token);
        if let Some(path) = &config.kubeconfig {
            write_kubeconfig_for(path, &url, ca_pem.as_deref(), admin_token.as_deref())?;
        }
        let state = Arc::new(server::ApiState {
            store: store.clone(),
            logs,
            addr,
            bookmark_interval: config.bookmark_interval,
            auth: auth::Authenticator::new(tokens.as_deref()),
            authorization: config.authorization,
            audit,
            kubelets: Some(kubelets.clone()),
            fault: fault::FaultSwitch::default(),
        });
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.server));
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let accept_state = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = stop_rx.changed() => return,
                };
                let Ok((stream, _)) = conn else { continue };
                let _ = stream.set_nodelay(true);
                let state = accept_state.clone();
                let stop = stop_rx.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => serve_connection(stream, state, stop).await,
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => serve_connection(tls, state, stop).await,
                            Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                        },
                    }
                });
            }
        }));
        tracing::info!(%addr, nodes = config.nodes, "kube-sim serving");
        Ok(SimHandle {
            addr,
            url,
            ca_pem,
            admin_token,
            state,
            kubeconfig: config.kubeconfig,
            store,
            kubelets,
            gpus: config.gpus_per_node,
            stop: stop_tx,
            tasks,
        })
    }
}

/// The user name of the admin token kube-sim generates when tokens are on.
pub const ADMIN_USER: &str = "kube-sim-admin";

async fn serve_connection<I>(io: I, state: Arc<server::ApiState>, mut stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| server::handle(state.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        _ = conn => {}
        _ = stop.changed() => {}
    }
}

/// A running simulator. Dropping it stops it.
pub struct SimHandle {
    addr: SocketAddr,
    url: String,
    ca_pem: Option<String>,
    admin_token: Option<String>,
    state: Arc<server::ApiState>,
    kubeconfig: Option<PathBuf>,
    store: Arc<Store>,
    kubelets: Arc<kubelet::Kubelets>,
    gpus: u32,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://…` with TLS on.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The CA certificate (PEM) clients must trust, with TLS on.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The generated admin token (user `kube-sim-admin`, group `system:masters`), with tokens
    /// on.
    pub fn admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// Adds a bearer token while running; false when authentication is off.
    pub fn add_token(&self, token: &StaticToken) -> bool {
        self.state.auth.add(token)
    }

    /// Makes and adds a token for ServiceAccount `namespace/name` (user
    /// `system:serviceaccount:<namespace>:<name>`); `None` when authentication is off.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Option<StaticToken> {
        let t = StaticToken::service_account(namespace, name);
        self.add_token(&t).then_some(t)
    }

    /// Writes a kubeconfig for this server that authenticates with `token` (none: anonymous,
    /// or no credentials when authentication is off), trusting the CA with TLS on.
    pub fn write_kubeconfig_for(&self, path: &Path, token: Option<&str>) -> Result<(), SimError> {
        write_kubeconfig_for(path, &self.url, self.ca_pem.as_deref(), token)
    }

    pub fn kubeconfig_path(&self) -> Option<&Path> {
        self.kubeconfig.as_deref()
    }

    /// The store, for tests that inspect or seed objects without HTTP.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Adds `count` simulated nodes after the existing ones, each with the configured GPUs.
    pub fn add_nodes(&self, count: usize) -> Result<Vec<String>, SimError> {
        let first = self.kubelets.node_count();
        self.kubelets
            .add_nodes(first, count, self.gpus)
            .map_err(SimError::Nodes)
    }

    /// Stops a node's kubelet; false if there is no such simulated node.
    pub fn stop_node(&self, name: &str) -> bool {
        self.kubelets.stop_node(name)
    }

    /// Restarts a stopped node's kubelet; false if there is no such simulated node.
    pub fn restart_node(&self, name: &str) -> bool {
        self.kubelets.restart_node(name)
    }

    /// Compacts the history: every open watch ends with 410 `Expired` and its client must list
    /// again.
    pub fn compact(&self) {
        self.store.compact();
    }

    /// From now on every API request is answered with `spec`'s status (for its duration, or
    /// until [`SimHandle::clear_fault`]).
    pub fn set_fault(&self, spec: fault::FaultSpec) {
        self.state.fault.set(spec, std::time::Instant::now());
    }

    /// Ends the fault in force; false if none was.
    pub fn clear_fault(&self) -> bool {
        self.state.fault.clear(std::time::Instant::now())
    }

    /// Stops serving and every simulated kubelet.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Writes a kubeconfig whose current context points at `addr` over plain HTTP with no
/// credentials.
pub fn write_kubeconfig(path: &Path, addr: SocketAddr) -> Result<(), SimError> {
    write_kubeconfig_for(path, &format!("http://{addr}"), None, None)
}

/// Writes a kubeconfig for `server`, trusting `ca_pem` and sending `token` when given.
pub fn write_kubeconfig_for(
    path: &Path,
    server: &str,
    ca_pem: Option<&str>,
    token: Option<&str>,
) -> Result<(), SimError> {
    let ca = ca_pem
        .map(|pem| {
            format!(
                "\n    certificate-authority-data: {}",
                base64::engine::general_purpose::STANDARD.encode(pem)
            )
        })
        .unwrap_or_default();
    let user = token.map_or_else(|| "{}".to_string(), |t| format!("\n    token: {t}"));
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {server}{ca}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\nusers:\n- name: kube-sim\n  user: {user}\npreferences: {{}}\n"
    );
    fs_err::write(path, text).map_err(SimError::Kubeconfig)
}
