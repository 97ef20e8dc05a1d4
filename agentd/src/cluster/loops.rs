//! The long-lived loops of a node agent in cluster mode: the heartbeat Lease, the `AgentNode`
//! publisher and, on a leader-eligible agent, the leader election and the Node labeller that
//! runs while this agent leads. Each one retries on its own backoff and ends when `stop` turns
//! true.

use std::sync::Arc;
use std::time::Duration;

use agentd_api::NodeInventory;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::backoff::Backoff;
use super::election::{Election, ElectionConfig, Event, Input, LEADER_LEASE, Next, Now, Request};
use super::inventory::{AgentNodeStatus, drain_request, node_patch};
use super::view::{STALE_INTERVALS, lease_name};
use super::{Cluster, RequestError, agent_node_resource};

/// The first retry waits about this long; later ones double up to one lease interval.
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Starts the node agent's loops, and on a leader-eligible agent the election and the labeller.
pub fn spawn(
    cluster: Cluster,
    inventory: watch::Receiver<Arc<NodeInventory>>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let span = tracing::info_span!("cluster", node = %cluster.node, namespace = %cluster.namespace);
    let node_agent = {
        let (cluster, mut stop) = (cluster.clone(), stop.clone());
        async move {
            if wait_for_node(&cluster, &mut stop).await {
                tokio::join!(
                    heartbeat(cluster.clone(), stop.clone()),
                    publish(cluster.clone(), inventory, stop)
                );
            }
        }
    };
    let mut tasks = vec![tokio::spawn(node_agent.instrument(span.clone()))];
    if let Some(election) = cluster.election.clone() {
        tasks.push(tokio::spawn(
            elect(cluster.clone(), election, stop.clone()).instrument(span.clone()),
        ));
        tasks.push(tokio::spawn(label_nodes(cluster, stop).instrument(span)));
    }
    tasks
}

/// Runs the election over the Lease `agentd-leader` until `stop`, publishing who leads after
/// every step; on stop, releases the Lease if this agent holds it. The state machine decides;
/// this loop only sends what it asks for, sleeps as long as it asks, and gives up on a request
/// still out when the term runs out.
async fn elect(cluster: Cluster, config: ElectionConfig, mut stop: watch::Receiver<bool>) {
    tracing::info!(
        lease = LEADER_LEASE,
        lease_duration = ?config.lease_duration,
        renew_deadline = ?config.renew_deadline,
        retry_period = ?config.retry_period,
        "taking part in the leader election"
    );
    let mut election = Election::new(config);
    let mut input = Input::Tick;
    let mut stopping = false;
    loop {
        let now = Now::current();
        let next = election.step(input, now);
        let leadership = election.leadership(now.instant);
        cluster.leadership.send_if_modified(|current| {
            let changed = *current != leadership;
            *current = leadership;
            changed
        });
        for event in election.take_events() {
            report(&cluster, &event);
        }
        input = match next {
            Next::Done => return,
            // After a stop only the release is left to send.
            Next::Wait(_) if stopping => return,
            Next::Wait(wait) => tokio::select! {
                () = tokio::time::sleep(wait) => Input::Tick,
                _ = stop.wait_for(|s| *s) => {
                    stopping = true;
                    Input::Stop
                }
            },
            Next::Send(request) => {
                let answer = send_lease_request(&cluster, request);
                match election.deadline() {
                    Some(deadline) => tokio::select! {
                        input = answer => input,
                        () = tokio::time::sleep_until(deadline.into()) => {
                            Input::Failed("no answer before the renew deadline".into())
                        }
                    },
                    None => answer.await,
                }
            }
        };
    }
}

async fn send_lease_request(cluster: &Cluster, request: Request) -> Input {
    let api = cluster.leases_api();
    let what = format!("leases/{LEADER_LEASE}");
    let params = PostParams::default();
    let answer = match request {
        Request::Get => cluster
            .call("get", &what, api.get_opt(LEADER_LEASE))
            .await
            .map(Input::Read),
        Request::Create(mut lease) => {
            lease.metadata.namespace = Some(cluster.namespace.clone());
            cluster
                .call("create", "leases", api.create(&params, &lease))
                .await
                .map(Input::Wrote)
        }
        Request::Update(lease) => cluster
            .call("update", &what, api.replace(LEADER_LEASE, &params, &lease))
            .await
            .map(Input::Wrote),
    };
    match answer {
        Ok(input) => input,
        Err(RequestError {
            code: Some(409), ..
        }) => Input::Conflict,
        Err(e) => Input::Failed(e.message),
    }
}

/// One log line per change of leadership, and the metrics.
fn report(cluster: &Cluster, event: &Event) {
    match event {
        Event::StartedLeading { transitions } => {
            tracing::info!(term = transitions, "this agent is the leader now");
            if let Some(metrics) = &cluster.metrics {
                metrics.set_leader(true);
            }
        }
        Event::StoppedLeading(why) => {
            tracing::warn!("this agent stopped leading: {}", why.as_str());
            if let Some(metrics) = &cluster.metrics {
                metrics.set_leader(false);
            }
        }
        Event::NewLeader(holder) if holder.is_empty() => {
            tracing::info!("the leader lease is free");
        }
        Event::NewLeader(holder) => tracing::info!(leader = %holder, "leader observed"),
        Event::Released(Ok(())) => {
            tracing::info!("leader lease released for the next leader");
        }
        Event::Released(Err(why)) => tracing::warn!("{why}"),
    }
}

/// Sleeps for `wait`; false if `stop` turned true meanwhile.
async fn pause(wait: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

fn backoff(cluster: &Cluster) -> Backoff {
    Backoff::new(BACKOFF_BASE, cluster.interval)
}

/// Checks that this agent's node is a Node object, retrying until it is. Only a
/// leader-eligible agent checks: a worker-only agent's role has no right to read Nodes, and
/// asking anyway would be a 403 on every start.
async fn wait_for_node(cluster: &Cluster, stop: &mut watch::Receiver<bool>) -> bool {
    if !cluster.leader_eligible {
        return true;
    }
    let mut retry = backoff(cluster);
    let mut said = false;
    loop {
        let what = format!("nodes/{}", cluster.node);
        match cluster
            .call("get", &what, cluster.nodes_api().get(&cluster.node))
            .await
        {
            Ok(_) => {
                if said {
                    tracing::info!("Node {:?} exists now; registering", cluster.node);
                }
                return true;
            }
            Err(RequestError {
                code: Some(403), ..
            }) => {
                tracing::info!(
                    "this agent's role may not read Nodes; not checking that Node {:?} exists",
                    cluster.node
                );
                return true;
            }
            Err(RequestError {
                code: Some(404), ..
            }) => {
                if !said {
                    tracing::error!(
                        "no Node named {:?} in the cluster: set node_name (or --node-name) to this machine's Node name as `kubectl get nodes` shows it; retrying",
                        cluster.node
                    );
                    said = true;
                }
            }
            Err(_) => {}
        }
        if !pause(retry.wait(), stop).await {
            return false;
        }
    }
}

/// Renews `agentd-node-<node>` every interval: one update per renewal, with the
/// resourceVersion of the agent's own last write; a get only when that write was refused as
/// stale (409) or the Lease is gone.
async fn heartbeat(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let api = cluster.leases_api();
    let name = lease_name(&cluster.node);
    let what = format!("leases/{name}");
    let duration =
        i32::try_from(cluster.interval.as_secs() * u64::from(STALE_INTERVALS)).unwrap_or(i32::MAX);
    let mut held: Option<Lease> = None;
    let mut retry = backoff(&cluster);
    loop {
        let now = MicroTime(Timestamp::now());
        let renewed = match held.take() {
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.renew_time = Some(now);
                spec.holder_identity = Some(cluster.node.clone());
                spec.lease_duration_seconds = Some(duration);
                cluster
                    .call(
                        "update",
                        &what,
                        api.replace(&name, &PostParams::default(), &lease),
                    )
                    .await
            }
            None => match cluster.call("get", &what, api.get_opt(&name)).await {
                Ok(Some(lease)) => {
                    // Read only to learn the resourceVersion; renewed on the next turn at once.
                    held = Some(lease);
                    continue;
                }
                Ok(None) => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(cluster.namespace.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(LeaseSpec {
                            holder_identity: Some(cluster.node.clone()),
                            lease_duration_seconds: Some(duration),
                            acquire_time: Some(now.clone()),
                            renew_time: Some(now),
                            ..LeaseSpec::default()
                        }),
                    };
                    cluster
                        .call(
                            "create",
                            "leases",
                            api.create(&PostParams::default(), &lease),
                        )
                        .await
                }
                Err(e) => Err(e),
            },
        };
        let wait = match renewed {
            Ok(lease) => {
                held = Some(lease);
                retry.reset();
                cluster.interval
            }
            Err(e) => {
                tracing::debug!("lease renewal failed: {e}");
                retry.wait()
            }
        };
        if !pause(wait, &mut stop).await {
            return;
        }
    }
}

/// Writes this node's `AgentNode` whenever what it publishes changes, and once more after an
/// outage (the catch-up write). An idle node writes nothing here.
async fn publish(
    cluster: Cluster,
    mut inventory: watch::Receiver<Arc<NodeInventory>>,
    mut stop: watch::Receiver<bool>,
) {
    let version = env!("CARGO_PKG_VERSION");
    let mut reconnects = cluster.reconnects();
    let mut written: Option<AgentNodeStatus> = None;
    let mut exists = false;
    let mut retry = backoff(&cluster);
    loop {
        let current = AgentNodeStatus::from_inventory(&inventory.borrow_and_update(), version);
        if written.as_ref() != Some(&current) {
            match write_agent_node(&cluster, &mut exists, &current).await {
                Ok(()) => {
                    tracing::debug!("AgentNode written");
                    written = Some(current);
                    retry.reset();
                }
                Err(e) => {
                    tracing::debug!("AgentNode write failed: {e}");
                    if !pause(retry.wait(), &mut stop).await {
                        return;
                    }
                    continue;
                }
            }
        }
        tokio::select! {
            changed = inventory.changed() => if changed.is_err() { return },
            changed = reconnects.changed() => {
                if changed.is_err() {
                    return;
                }
                // A write may have landed without the agent hearing back: write once more.
                written = None;
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Creates the object if it is not there yet, then sets its status (one merge patch).
async fn write_agent_node(
    cluster: &Cluster,
    exists: &mut bool,
    status: &AgentNodeStatus,
) -> Result<(), RequestError> {
    let api = cluster.agent_nodes_api();
    let what = format!("agentnodes/{}", cluster.node);
    if !*exists {
        let mut object = DynamicObject::new(&cluster.node, &agent_node_resource())
            .within(&cluster.namespace)
            .data(serde_json::json!({"spec": {"nodeName": cluster.node}}));
        object.metadata.labels = Some(
            [("agentd.io/node".to_owned(), cluster.node.clone())]
                .into_iter()
                .collect(),
        );
        match cluster
            .call(
                "create",
                "agentnodes",
                api.create(&PostParams::default(), &object),
            )
            .await
        {
            Ok(_)
            | Err(RequestError {
                code: Some(409), ..
            }) => *exists = true,
            Err(e) => return Err(e),
        }
    }
    let patch = serde_json::json!({ "status": status });
    match cluster
        .call(
            "patch",
            &format!("{what}/status"),
            api.patch_status(
                &cluster.node,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            ),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) => {
            if e.code == Some(404) {
                *exists = false;
            }
            Err(e)
        }
    }
}

/// While this agent leads: watches every `AgentNode` and brings its Node's `agentd.io/`
/// labels (the drain recorded in its `spec` included) and annotation in line, with a merge
/// patch only where they differ. Each new term starts a new watch, whose first list brings
/// every Node in line.
async fn label_nodes(cluster: Cluster, mut stop: watch::Receiver<bool>) {
    let mut leadership = cluster.leadership();
    loop {
        tokio::select! {
            led = leadership.wait_for(|l| l.term.is_some()) => if led.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        tracing::info!("labelling Nodes from their AgentNodes while this agent leads");
        if !label_while_leading(&cluster, &mut leadership, &mut stop).await {
            return;
        }
        tracing::info!("no longer labelling Nodes: this agent does not lead");
    }
}

/// The labeller of one term; false when the agent is stopping.
async fn label_while_leading(
    cluster: &Cluster,
    leadership: &mut watch::Receiver<crate::cluster::election::Leadership>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    // Watches are long requests: they get a client without the per-request time bound.
    let api = cluster.agent_nodes_watch_api();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut events = std::pin::pin!(events);
    let mut said_failing = false;
    loop {
        let next = tokio::select! {
            next = events.next() => next,
            changed = leadership.changed() => {
                if changed.is_err() || leadership.borrow().term.is_none() {
                    return changed.is_ok();
                }
                continue;
            }
            _ = stop.wait_for(|s| *s) => return false,
        };
        match next {
            None => return false,
            Some(Err(e)) => {
                if !said_failing {
                    tracing::warn!("watching AgentNodes failed ({e}); retrying with backoff");
                    said_failing = true;
                }
                cluster.count_watch_error(&e);
            }
            Some(Ok(object)) => {
                said_failing = false;
                label_node(cluster, &object, stop).await;
            }
        }
    }
}

async fn label_node(cluster: &Cluster, object: &DynamicObject, stop: &mut watch::Receiver<bool>) {
    let Some(name) = object.metadata.name.as_deref() else {
        return;
    };
    let Some(status) = object
        .data
        .get("status")
        .and_then(|s| serde_json::from_value::<AgentNodeStatus>(s.clone()).ok())
    else {
        return;
    };
    let nodes = cluster.nodes_api();
    let what = format!("nodes/{name}");
    let mut retry = backoff(cluster);
    // A few tries; a later AgentNode event (or the watch's re-list) brings the rest.
    for _ in 0..5 {
        let node = match cluster.call("get", &what, nodes.get_opt(name)).await {
            Ok(Some(node)) => node,
            Ok(None) => {
                tracing::warn!("AgentNode {name:?} has no Node of that name; not labelling");
                return;
            }
            Err(_) => {
                if !pause(retry.wait(), stop).await {
                    return;
                }
                continue;
            }
        };
        let labels = node.metadata.labels.unwrap_or_default();
        let annotations = node.metadata.annotations.unwrap_or_default();
        let drain = drain_request(&object.data);
        let Some(mut patch) = node_patch(&status, drain, &labels, &annotations) else {
            return;
        };
        // Written against the Node as read: a patch still in flight when the term ends (and
        // another leader has written since) is a 409, not a late overwrite.
        patch["metadata"]["resourceVersion"] = node.metadata.resource_version.into();
        // Fencing: a term that ran out (or a deposed leader) writes nothing.
        if !cluster.leads() {
            return;
        }
        match cluster
            .call(
                "patch",
                &what,
                nodes.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await
        {
            Ok(_) => {
                tracing::debug!(
                    node = name,
                    "Node labels brought in line with its AgentNode"
                );
                return;
            }
            Err(_) => {
                if !pause(retry.wait(), stop).await {
                    return;
                }
            }
        }
    }
}
