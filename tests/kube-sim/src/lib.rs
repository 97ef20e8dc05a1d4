//! kube-sim: a Kubernetes API server simulator that `kubectl`, the Python `kubernetes` client and
//! kube-rs accept, with simulated kubelets for any number of GPU nodes.
//!
//! It is a test double for agentd's cluster mode and its benchmarks, not a product: see the
//! README for what differs from a real API server. Start it in-process with [`KubeSim::start`]
//! or run the `kube-sim` binary.

pub mod clock;
pub mod defaults;
pub mod kubelet;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod server;
pub mod store;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use clock::TimeScale;
pub use kubelet::{EXIT_CODE, FAIL, Failure, LOG, RUN_SECONDS};
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
        let logs = Arc::new(kubelet::PodLogs::default());
        let kubelets = kubelet::Kubelets::new(
            store.clone(),
            logs.clone(),
            config.time_scale,
            config.pod_eviction_timeout,
        );
        let mut tasks = kubelets.start();
        kubelets
            .add_nodes(0, config.nodes, config.gpus_per_node)
            .map_err(SimError::Nodes)?;
        if let Some(path) = &config.kubeconfig {
            write_kubeconfig(path, addr)?;
        }
        let state = Arc::new(server::ApiState {
            store: store.clone(),
            logs,
            addr,
            bookmark_interval: config.bookmark_interval,
        });
        let (stop_tx, mut stop_rx) = watch::channel(false);
        tasks.push(tokio::spawn(async move {
            loop {
                let conn = tokio::select! {
                    c = listener.accept() => c,
                    _ = stop_rx.changed() => return,
                };
                let Ok((stream, _)) = conn else { continue };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                let mut stop = stop_rx.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req| server::handle(state.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.changed() => {}
                    }
                });
            }
        }));
        tracing::info!(%addr, nodes = config.nodes, "kube-sim serving");
        Ok(SimHandle {
            addr,
            kubeconfig: config.kubeconfig,
            store,
            kubelets,
            gpus: config.gpus_per_node,
            stop: stop_tx,
            tasks,
        })
    }
}

/// A running simulator. Dropping it stops it.
pub struct SimHandle {
    addr: SocketAddr,
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

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\nusers:\n- name: kube-sim\n  user: {{}}\npreferences: {{}}\n"
    );
    fs_err::write(path, text).map_err(SimError::Kubeconfig)
}
