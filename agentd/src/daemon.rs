//! Start-up and shutdown of the agent: each part is built from the configuration in its own
//! span, in order (store, socket, inventory, API), and taken down in reverse on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::api::{self, AgentIdentity, ApiState};
use crate::config::{Config, MetricsAddr};
use crate::core::Core;
use crate::inventory::{self, Sampler};
use crate::store::{JobStore, Store};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Socket(#[from] api::socket::SocketError),
    #[error(transparent)]
    Host(#[from] inventory::HostError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Systemd(#[from] crate::systemd::SystemdError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Remote(#[from] api::remote::RemoteError),
    #[error("{0}")]
    Runtime(String),
}

/// Runs the agent until SIGTERM or SIGINT, then shuts down cleanly.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("stop requested; finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    let result = run_until(config, stop_rx).await;
    signals.abort();
    result
}

/// Runs the agent until `stop` turns true, or until its core loop dies (then with an error,
/// so that the process ends and its supervisor starts it again). Tests drive this directly.
pub async fn run_until(
    config: Config,
    outer_stop: watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    // Every part stops on `stop`: turned by the caller's stop, or by the core loop dying.
    let (halt, stop) = watch::channel(false);
    let forward = {
        let mut outer_stop = outer_stop;
        let halt = halt.clone();
        tokio::spawn(async move {
            if outer_stop.wait_for(|s| *s).await.is_ok() {
                halt.send_replace(true);
            }
        })
    };
    let result = run_parts(config, stop, halt).await;
    forward.abort();
    result
}

/// The API socket, bound (or inherited from systemd) first, so that clients can connect
/// while the rest starts.
struct ApiSocket {
    path: std::path::PathBuf,
    /// Under agentd.socket systemd has bound the socket (and keeps it across restarts).
    activated: bool,
}

impl ApiSocket {
    fn open(config: &Config) -> Result<(Self, tokio::net::UnixListener), DaemonError> {
        let _span = tracing::info_span!("api", socket = %config.socket.display()).entered();
        let (listener, activated) = match crate::systemd::inherited_unix_listener()? {
            Some(listener) => {
                tracing::info!("using the API socket systemd passed in");
                (listener, true)
            }
            None => (api::socket::bind(&config.socket)?, false),
        };
        let socket = Self {
            path: config.socket.clone(),
            activated,
        };
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(listener));
        match listener {
            Ok(listener) => Ok((socket, listener)),
            Err(e) => {
                socket.close();
                Err(DaemonError::Runtime(e.to_string()))
            }
        }
    }

    /// Removes the socket file, unless it is systemd's: agentd.socket keeps it for the next
    /// start.
    fn close(self) {
        if self.activated {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove the socket");
        }
    }
}

/// Runs every part in order; whatever happens, the socket goes with the agent.
async fn run_parts(
    config: Config,
    stop: watch::Receiver<bool>,
    halt: watch::Sender<bool>,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    let (socket, listener) = ApiSocket::open(&config)?;
    let result = run_with_socket(&config, listener, started, stop, halt).await;
    socket.close();
    if let Some(store) = result? {
        store.close()?;
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// The parts behind the socket, started in order; returns the store to close once the
/// socket is gone (none when each term of leadership closed its own).
async fn run_with_socket(
    config: &Config,
    listener: tokio::net::UnixListener,
    started: Instant,
    stop: watch::Receiver<bool>,
    halt: watch::Sender<bool>,
) -> Result<Option<Box<dyn JobStore>>, DaemonError> {
    let node_name = config.node_name();
    keep_state_private(&config.state_dir);
    let store = open_store(config)?;
    // Templates are a standalone feature in this release: in cluster mode the jobs live in the
    // cluster, where a template kept by one agent would be missing on the next leader.
    let templates = match config.mode {
        crate::config::Mode::Standalone => Some(crate::store::Templates::open(store.path())?),
        crate::config::Mode::Cluster => None,
    };
    let InventoryFeed {
        watch: inventory,
        health,
        task: refresh,
    } = start_inventory(config, &node_name, stop.clone()).await?;
    let exporter = start_metrics(config, inventory.clone(), stop.clone()).await?;
    let metrics = exporter.as_ref().map(|e| e.metrics.clone());
    // What can fail on its configuration comes before the core, which restores the jobs and
    // starts their replicas: a failure after it would leave it running.
    let (cluster, mut cluster_tasks) = start_cluster(
        config,
        &node_name,
        metrics.clone(),
        inventory.clone(),
        stop.clone(),
    )
    .await?;
    // The queues in force: the configured ones, which the cluster's ConfigMap may replace.
    let (queues_tx, queues) =
        watch::channel(Arc::new(crate::core::QueuesInForce::configured(config)));
    if let Some(cluster) = &cluster {
        cluster_tasks.push(crate::cluster::queues::spawn(
            cluster,
            crate::config::QueueDefinitions::configured(config),
            queues_tx,
            stop.clone(),
        ));
    }
    let admission = admission_rules(config, queues.clone(), stop.clone());
    let remote = open_remote(config).await?;
    let (core, core_handle) = match &cluster {
        Some(cluster) if config.cluster.place_jobs => start_cluster_core(
            config,
            node_name.clone(),
            cluster.clone(),
            store,
            (inventory.clone(), health),
            (queues, admission.clone()),
            metrics.clone(),
            stop.clone(),
            halt,
        ),
        _ => {
            start_core(
                config,
                node_name.clone(),
                store,
                (inventory.clone(), health),
                queues,
                metrics.clone(),
                stop.clone(),
                halt,
            )
            .await?
        }
    };
    let (ready_tx, ready_rx) = watch::channel(false);
    let state = ApiState {
        agent: Arc::new(AgentIdentity {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            mode: config.mode.as_str().to_owned(),
            pid: std::process::id(),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            started,
            state_dir: config.state_dir.display().to_string(),
            socket: config.socket.display().to_string(),
        }),
        inventory,
        ready: ready_rx,
        core: core_handle,
        admission,
        metrics: metrics.clone(),
        admin_group: Arc::from(config.api.admin_group.as_str()),
        limits: Arc::new(api::ApiLimits::new("socket", &config.api, metrics.clone())),
        cluster,
        templates,
    };
    let remote = remote.map(|door| serve_remote(door, config, &state, stop.clone()));
    let server = tokio::spawn(
        api::serve(listener, state, stop.clone())
            .instrument(tracing::info_span!("api", socket = %config.socket.display())),
    );
    ready_tx.send_replace(true);
    let stopping = announce_ready(started, metrics.as_ref(), stop.clone());
    let trim = return_free_memory(stop.clone());

    let _ = server.await;
    if let Some(remote) = remote {
        let _ = remote.await;
    }
    trim.abort();
    if *stop.borrow() {
        // Woken by the same stop that ended the server; let it finish saying so.
        let _ = stopping.await;
    } else {
        // The server ended on its own: the agent is going down all the same.
        stopping.abort();
        let _ = crate::systemd::notify_stopping();
    }
    if let Some(exporter) = exporter {
        let _ = exporter.task.await;
    }
    let _ = refresh.await;
    for task in cluster_tasks {
        let _ = task.await;
    }
    core.await
        .map_err(|e| DaemonError::Runtime(format!("core loop failed: {e}")))?
        .map_err(DaemonError::Runtime)
}

/// What a submission must pass, following the queues in force: a task renews the rules each
/// time the queues change, until the agent stops.
fn admission_rules(
    config: &Config,
    mut queues: watch::Receiver<Arc<crate::core::QueuesInForce>>,
    mut stop: watch::Receiver<bool>,
) -> watch::Receiver<Arc<crate::job::Admission>> {
    let mut base = crate::job::Admission::new(
        config.queues.keys().cloned(),
        &config.jobs.default_queue,
        config.jobs.max_replicas_per_job,
    );
    if config.mode == crate::config::Mode::Cluster {
        base = base.for_cluster(&config.cluster.cluster_domain);
    }
    let first = base.with_queues(&queues.borrow_and_update().definitions);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = queues.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            let rules = base.with_queues(&queues.borrow_and_update().definitions);
            tx.send_if_modified(|held| {
                let changed = **held != rules;
                if changed {
                    *held = Arc::new(rules);
                }
                changed
            });
        }
    });
    rx
}

/// How long a new leader waits for the list of agentd pods before it gives up the attempt.
const POD_LIST_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// The core's task: it hands back the store to close, if it still holds one.
type CoreTask = tokio::task::JoinHandle<Result<Option<Box<dyn JobStore>>, String>>;

fn open_store(config: &Config) -> Result<Store, DaemonError> {
    let _span = tracing::info_span!("store", path = %config.database_path().display()).entered();
    let store = Store::open(&config.state_dir)?;
    tracing::info!("database open");
    Ok(store)
}

/// The node's inventory as it is kept fresh, and its GPUs' health changes.
struct InventoryFeed {
    watch: watch::Receiver<Arc<agentd_api::NodeInventory>>,
    health: mpsc::UnboundedReceiver<crate::inventory::GpuHealthEvent>,
    task: tokio::task::JoinHandle<()>,
}

/// Takes the first inventory reading (off the async workers: NVML and /proc are slow) and
/// starts refreshing it.
async fn start_inventory(
    config: &Config,
    node_name: &str,
    stop: watch::Receiver<bool>,
) -> Result<InventoryFeed, DaemonError> {
    let (inventory_tx, inventory_rx) = watch::channel(Arc::default());
    let (health_tx, health_rx) = mpsc::unbounded_channel();
    let span = tracing::info_span!("inventory", interval = ?config.inventory.interval);
    let nvml_library = Some(config.inventory.nvml_library.as_str())
        .filter(|l| !l.is_empty())
        .map(std::path::PathBuf::from);
    let mut sampler = span.in_scope(|| {
        Sampler::open(
            node_name.to_owned(),
            nvml_library.as_deref(),
            config.inventory.gpu_recovery_quiet,
        )
    })?;
    let (sampler, (first, first_changes)) = tokio::task::spawn_blocking(move || {
        let first = sampler.sample();
        (sampler, first)
    })
    .await
    .map_err(|e| DaemonError::Runtime(format!("first inventory reading failed: {e}")))?;
    span.in_scope(|| {
        tracing::info!(
            node = %first.name,
            cores = first.cpu.logical_cores,
            memory_bytes = first.memory.total_bytes,
            gpus = first.gpus.len(),
            "first inventory"
        );
    });
    inventory_tx.send_replace(Arc::new(first));
    for change in first_changes {
        let _ = health_tx.send(change);
    }
    let task = tokio::spawn(
        inventory::refresh(
            sampler,
            config.inventory.interval,
            inventory_tx,
            health_tx,
            stop,
        )
        .instrument(span),
    );
    Ok(InventoryFeed {
        watch: inventory_rx,
        health: health_rx,
        task,
    })
}

/// The Prometheus exporter, where `metrics_addr` is not `off`.
async fn start_metrics(
    config: &Config,
    inventory: watch::Receiver<Arc<agentd_api::NodeInventory>>,
    stop: watch::Receiver<bool>,
) -> Result<Option<crate::metrics::Exporter>, DaemonError> {
    let MetricsAddr::On(addr) = config.metrics_addr else {
        return Ok(None);
    };
    let exporter =
        crate::metrics::start_exporter(addr, config.api.max_connections, inventory, stop)
            .instrument(tracing::info_span!("metrics", %addr))
            .await?;
    Ok(Some(exporter))
}

/// Opens the core (restoring the stored jobs) and runs its loop on a thread of its own: the
/// loop writes to the database and walks /proc, which must not hold up an async worker.
#[allow(clippy::too_many_arguments)]
async fn start_core(
    config: &Config,
    node_name: String,
    store: Store,
    (inventory, health): (
        watch::Receiver<Arc<agentd_api::NodeInventory>>,
        mpsc::UnboundedReceiver<crate::inventory::GpuHealthEvent>,
    ),
    queues: watch::Receiver<Arc<crate::core::QueuesInForce>>,
    metrics: Option<crate::metrics::Metrics>,
    stop: watch::Receiver<bool>,
    halt: watch::Sender<bool>,
) -> Result<(CoreTask, crate::core::CoreHandle), DaemonError> {
    let span = tracing::info_span!("core");
    let opened = {
        let config = config.clone();
        let span = span.clone();
        tokio::task::spawn_blocking(move || {
            span.in_scope(|| {
                Core::open(
                    &config,
                    node_name,
                    Box::new(store),
                    inventory,
                    health,
                    metrics,
                )
            })
        })
        .await
        .map_err(|e| DaemonError::Runtime(format!("cannot restore jobs: {e}")))?
    };
    let (mut core, core_handle, core_inputs) =
        opened.map_err(|e| DaemonError::Runtime(format!("cannot restore jobs: {e}")))?;
    core.follow_queues(queues);
    let runtime = tokio::runtime::Handle::current();
    let core = supervise_core(
        tokio::task::spawn_blocking(move || {
            let mut inputs = core_inputs;
            Some(runtime.block_on(core.run(&mut inputs, stop).instrument(span)))
        }),
        halt,
    );
    Ok((core, core_handle))
}

/// Cluster mode with `cluster.place_jobs`: the cluster's jobs are kept by the elected leader.
/// Each term of leadership opens a core on the same channels, with the jobs in `TrainingJob`
/// objects (the node's database keeps events and samples), replicas as pods, and the cluster's
/// nodes to place on; between terms, and on agents that never lead, requests are answered with
/// who leads. `store`: the node's database, for the first term (later terms open it again).
#[allow(clippy::too_many_arguments)]
fn start_cluster_core(
    config: &Config,
    node_name: String,
    cluster: crate::cluster::Cluster,
    store: Store,
    (inventory, health): (
        watch::Receiver<Arc<agentd_api::NodeInventory>>,
        mpsc::UnboundedReceiver<crate::inventory::GpuHealthEvent>,
    ),
    (queues, admission): (
        watch::Receiver<Arc<crate::core::QueuesInForce>>,
        watch::Receiver<Arc<crate::job::Admission>>,
    ),
    metrics: Option<crate::metrics::Metrics>,
    stop: watch::Receiver<bool>,
    halt: watch::Sender<bool>,
) -> (CoreTask, crate::core::CoreHandle) {
    use crate::core::{CoreWiring, Nodes, SystemClock, TermParts, terms};
    let (wiring, mut inputs) = CoreWiring::new(health);
    let handle = wiring.handle.clone();
    let runtime = tokio::runtime::Handle::current();
    // Jobs submitted on followers or applied with kubectl: the leader takes them in from a
    // watch, and its store writes their status onto the objects they are.
    let pending = crate::store::kube::PendingObjects::default();
    // The key that vouches for who submitted a job, shared by every agent through a Secret.
    let keys = crate::cluster::jobs::SubmitterKeys::new(
        cluster.client().clone(),
        config.cluster.namespace.clone(),
    );
    if cluster.leader_eligible {
        tokio::spawn(crate::cluster::jobs::run_admission(
            cluster.watch_client().clone(),
            handle.clone(),
            admission,
            pending.clone(),
            Arc::clone(&keys),
            cluster.leadership(),
            config.cluster.retry_period,
            stop.clone(),
        ));
    }
    let desk = crate::cluster::jobs::FollowerJobs::new(
        cluster.client().clone(),
        node_name.clone(),
        Arc::clone(&keys),
        queues.clone(),
    );
    // Only an agent that may lead places, and only its role may watch every pod and Node.
    let nodes = if cluster.leader_eligible {
        crate::cluster::feed::spawn(&cluster, config.cluster.node_lost_grace, stop.clone())
    } else {
        watch::channel(Arc::default()).1
    };
    let mut leadership = cluster.leadership();
    let config = config.clone();
    let span = tracing::info_span!("core", mode = "cluster");
    let task = tokio::task::spawn_blocking(move || {
        let mut first = Some(store);
        let open = || {
            let local = match first.take() {
                Some(store) => store,
                None => Store::open(&config.state_dir)?,
            };
            let store = crate::store::kube::KubeStore::new(
                cluster.client().clone(),
                runtime.clone(),
                local,
            )?
            .fenced_by(cluster.leadership())
            .admitting(pending.clone())
            .signing(Arc::clone(&keys));
            let known = store.known_objects();
            let executor = crate::exec::pods::PodExecutor::new(
                cluster.client().clone(),
                cluster.watch_client(),
                config.cluster.cluster_domain.clone(),
                crate::exec::pods::PodTimeouts {
                    mount: config.cluster.mount_timeout,
                    image_pull: config.cluster.image_pull_timeout,
                },
                wiring.reports(),
            )
            .with_owners(Arc::new(move |namespace, job| known.uid(namespace, job)));
            // The term adopts what runs: it must know every agentd pod first. (Waited for
            // here, on the core's own thread, while the runtime's workers run the watch.)
            let deadline = Instant::now() + POD_LIST_BOUND;
            while !executor.is_ready() {
                if Instant::now() > deadline {
                    return Err(crate::core::CoreError::Executor(format!(
                        "the agentd pods could not be listed within {}s",
                        POD_LIST_BOUND.as_secs()
                    )));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let mut core = Core::open_in(
                &config,
                TermParts {
                    node: node_name.clone(),
                    store: Box::new(store),
                    inventory: inventory.clone(),
                    nodes: Nodes::Cluster(nodes.clone()),
                    metrics: metrics.clone(),
                    clock: Arc::new(SystemClock::new()),
                },
                &wiring,
                Box::new(executor),
            )?;
            core.follow_queues(queues.clone());
            Ok(core)
        };
        let mut stop = stop;
        runtime.block_on(
            terms::run_terms(
                &mut inputs,
                Some(&desk),
                &mut leadership,
                open,
                config.cluster.retry_period,
                &mut stop,
            )
            .instrument(span),
        );
        None
    });
    (supervise_core(task, halt), handle)
}

/// How often the allocator is asked to give back the memory it holds free.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the C allocator, every [`TRIM_EVERY`] until `stop`, to hand back to the system the
/// pages it holds free. A burst (a leader decoding thousands of pods, a relist of 10,000 jobs)
/// leaves the freed memory scattered between live allocations in glibc's per-thread arenas,
/// which return only what lies at their top: a leader holding 10,000 jobs in some 55 MiB of
/// live heap kept an RSS of 200 MiB, 53 MiB of it free pages this gives back. A trim takes
/// the arenas' locks for a few milliseconds; the pages are faulted in again when used.
fn return_free_memory(mut stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        let mut ticks = tokio::time::interval(TRIM_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let trimmed = tokio::task::spawn_blocking(|| {
                let started = Instant::now();
                (trim_heap(), started.elapsed())
            })
            .await;
            if let Ok((released, took)) = trimmed {
                tracing::trace!(released, ?took, "asked the allocator to return free pages");
            }
        }
    })
}

/// Whether glibc's allocator gave pages back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() -> bool {
    // SAFETY: `malloc_trim` only walks the allocator's own free lists, under its locks; it is
    // safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() -> bool {
    false
}

/// Tells systemd and the metrics that the agent is ready, and starts the task that tells
/// them when it stops.
fn announce_ready(
    started: Instant,
    metrics: Option<&crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "agent ready"
    );
    if let Some(metrics) = metrics {
        metrics.set_up(true);
    }
    // The socket is bound and the first inventory is in: only now may `systemctl start` return.
    if let Err(e) = crate::systemd::notify_ready() {
        tracing::warn!("{e}");
    }
    let _ = crate::systemd::notify_status("ready");
    let metrics = metrics.cloned();
    tokio::spawn(async move {
        if stop.wait_for(|s| *s).await.is_ok() {
            if let Some(metrics) = metrics {
                metrics.set_up(false);
            }
            let _ = crate::systemd::notify_stopping();
            let _ = crate::systemd::notify_status("stopping; running jobs keep running");
        }
    })
}

/// The HTTPS listener's files and port, where `api.listen` asks for one: read and bound
/// before the core starts, so that a bad certificate or a port in use stops the agent before
/// any job is restored.
struct RemoteDoor {
    remote: api::remote::Remote,
    bound: api::remote::Bound,
    span: tracing::Span,
}

async fn open_remote(config: &Config) -> Result<Option<RemoteDoor>, DaemonError> {
    let Some(addr) = config.api.listen_addr() else {
        return Ok(None);
    };
    let span = tracing::info_span!("https", %addr);
    let remote = span.in_scope(|| api::remote::Remote::load(&config.api))?;
    let bound = api::remote::bind(addr).instrument(span.clone()).await?;
    Ok(Some(RemoteDoor {
        remote,
        bound,
        span,
    }))
}

/// Serves the socket's routes and rules behind TLS, with limits of its own under the same
/// settings and the users' rates shared.
fn serve_remote(
    door: RemoteDoor,
    config: &Config,
    state: &ApiState,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let RemoteDoor {
        remote,
        bound,
        span,
    } = door;
    let state = ApiState {
        limits: Arc::new(
            state
                .limits
                .for_listener("https", &config.api, state.metrics.clone()),
        ),
        ..state.clone()
    };
    span.in_scope(|| {
        tracing::info!(
            client_ca = !config.api.client_ca.is_empty(),
            "HTTPS listener on"
        );
    });
    tokio::spawn(api::remote::serve(bound, Arc::new(remote), state, stop).instrument(span))
}

/// Watches the core loop: if it ends while the agent is not stopping (a panic), the agent
/// stops too, rather than answer 503 for ever while it looks alive; the error it ends with
/// makes the process exit non-zero, and systemd starts it again.
fn supervise_core<T: Send + 'static>(
    core: tokio::task::JoinHandle<T>,
    halt: watch::Sender<bool>,
) -> tokio::task::JoinHandle<Result<T, String>> {
    tokio::spawn(async move {
        let ended = core.await;
        let stopping = *halt.borrow();
        match ended {
            Ok(value) if stopping => Ok(value),
            Ok(_) => {
                halt.send_replace(true);
                Err("the core loop ended while the agent was running; stopping".to_owned())
            }
            Err(e) => {
                tracing::error!(
                    "the core loop died ({e}); the agent stops so that it is restarted"
                );
                halt.send_replace(true);
                Err(format!("the core loop died: {e}"))
            }
        }
    })
}

/// Cluster mode: reads the kubeconfig and starts the heartbeat, the `AgentNode` publisher and,
/// where leader-eligible, the labeller. Standalone: nothing.
async fn start_cluster(
    config: &Config,
    node_name: &str,
    metrics: Option<crate::metrics::Metrics>,
    inventory: watch::Receiver<Arc<agentd_api::NodeInventory>>,
    stop: watch::Receiver<bool>,
) -> Result<
    (
        Option<crate::cluster::Cluster>,
        Vec<tokio::task::JoinHandle<()>>,
    ),
    crate::cluster::ClusterError,
> {
    if config.mode != crate::config::Mode::Cluster {
        return Ok((None, Vec::new()));
    }
    let span = tracing::info_span!("cluster", node = node_name);
    let cluster = crate::cluster::Cluster::connect(config, node_name.to_owned(), metrics)
        .instrument(span.clone())
        .await?;
    span.in_scope(|| {
        tracing::info!(
            server = %cluster.status().server,
            namespace = %cluster.namespace,
            leader_eligible = cluster.leader_eligible,
            "cluster mode"
        );
    });
    let tasks = crate::cluster::spawn(cluster.clone(), inventory, stop);
    Ok((Some(cluster), tasks))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The database, its WAL and job logs hold secrets (a manifest's environment): nobody but the
/// agent's user and group may read them. Under systemd the unit does this (`UMask=0027`,
/// `StateDirectoryMode=0750`); outside it the agent applies the same mask to itself, and to what
/// it starts, and takes other users' access off the state directory.
fn keep_state_private(state_dir: &std::path::Path) {
    use nix::sys::stat::{Mode, umask};
    use std::os::unix::fs::PermissionsExt;
    let old = umask(Mode::empty());
    umask(old | Mode::from_bits_truncate(0o027));
    if std::fs::create_dir_all(state_dir).is_err() {
        // Opening the store reports this, naming the directory.
        return;
    }
    if let Ok(meta) = std::fs::metadata(state_dir) {
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o007 != 0 {
            let restricted = std::fs::Permissions::from_mode(mode & !0o007);
            if let Err(e) = std::fs::set_permissions(state_dir, restricted) {
                tracing::warn!(dir = %state_dir.display(), error = %e, "cannot make the state directory private");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_core_stops_the_agent_with_an_error() {
        let (halt, stop) = watch::channel(false);
        let core = tokio::spawn(async {
            tokio::task::yield_now().await;
            panic!("core bug");
        });
        let ended = supervise_core::<()>(core, halt).await.unwrap();
        let message = ended.unwrap_err();
        assert!(message.contains("core loop died"), "{message}");
        assert!(*stop.borrow(), "every other part is told to stop");
    }

    #[tokio::test]
    async fn a_core_that_ends_on_stop_is_not_an_error() {
        let (halt, mut stop) = watch::channel(false);
        let core = tokio::spawn(async move {
            stop.wait_for(|s| *s).await.unwrap();
            7
        });
        let supervised = supervise_core(core, halt.clone());
        halt.send_replace(true);
        assert_eq!(supervised.await.unwrap(), Ok(7));
    }
}
