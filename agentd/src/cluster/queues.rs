//! The cluster's queues: the ConfigMap `agentd-queues` in the cluster namespace, key
//! `queues.toml`, holds queue definitions in agentd.toml's syntax. Every cluster-mode agent
//! watches it (never polls): while it is present and valid its queues replace the configured
//! ones; when it is deleted the configured ones come back; while it is not valid the agent
//! keeps the queues it had and says why (once per change in the log, and in `agentctl queues`).
//!
//! It only reads the ConfigMap and publishes the queues in force; what uses them (the core,
//! admission, a follower's answers) follows the published value.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::watch;

use super::Cluster;
use crate::config::{QUEUES_FILE, QueueDefinitions};
use crate::core::QueuesInForce;

/// The ConfigMap's name, in `cluster.namespace`.
pub const QUEUES_CONFIGMAP: &str = "agentd-queues";

/// The queues in force once the ConfigMap is as `seen` (`None`: there is none), from the
/// queues in force now and the configured ones. The second value: the problems, when the
/// ConfigMap is refused.
pub fn step(
    now: &QueuesInForce,
    configured: &QueueDefinitions,
    namespace: &str,
    seen: Option<&ConfigMap>,
) -> (QueuesInForce, Option<String>) {
    let Some(object) = seen else {
        return (
            now.replaced_by(configured.clone(), crate::core::queues::CONFIGURED_SOURCE),
            None,
        );
    };
    let source = format!("ConfigMap {namespace}/{QUEUES_CONFIGMAP}");
    match definitions(object, &configured.default_queue) {
        Ok(definitions) => (now.replaced_by(definitions, &source), None),
        Err(problems) => {
            let problems = problems.join("; ");
            let kept = now.refusing(format!(
                "{source} is not valid, so the queues from {} stay in force: {problems}",
                now.source
            ));
            (kept, Some(problems))
        }
    }
}

/// The definitions the ConfigMap holds, or every problem with it, each naming its key.
fn definitions(
    object: &ConfigMap,
    configured_default: &str,
) -> Result<QueueDefinitions, Vec<String>> {
    let mut problems = Vec::new();
    let data = object.data.clone().unwrap_or_default();
    for key in data.keys().filter(|k| *k != QUEUES_FILE) {
        problems.push(format!(
            "data.{key}: not read: the ConfigMap holds one key, {QUEUES_FILE}"
        ));
    }
    for key in object.binary_data.iter().flat_map(|b| b.keys()) {
        problems.push(format!(
            "binaryData.{key}: not read: the ConfigMap holds one key, {QUEUES_FILE}, under data"
        ));
    }
    let read = match data.get(QUEUES_FILE) {
        None => {
            problems.push(format!(
                "data.{QUEUES_FILE}: missing: it holds the queue definitions, as [queues.NAME] tables"
            ));
            None
        }
        Some(text) => match QueueDefinitions::from_queues_toml(text, configured_default) {
            Ok(definitions) => Some(definitions),
            Err(found) => {
                problems.extend(found.iter().map(|e| format!("{QUEUES_FILE}: {e}")));
                None
            }
        },
    };
    match read {
        Some(definitions) if problems.is_empty() => Ok(definitions),
        _ => Err(problems),
    }
}

/// Watches the ConfigMap and publishes the queues in force on `tx` until `stop` turns true.
pub fn spawn(
    cluster: &Cluster,
    configured: QueueDefinitions,
    tx: watch::Sender<Arc<QueuesInForce>>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let cluster = cluster.clone();
    tokio::spawn(async move { follow(cluster, configured, tx, stop).await })
}

async fn follow(
    cluster: Cluster,
    configured: QueueDefinitions,
    tx: watch::Sender<Arc<QueuesInForce>>,
    mut stop: watch::Receiver<bool>,
) {
    // One object by name: the role may read this ConfigMap and no other.
    let api: Api<ConfigMap> = Api::namespaced(cluster.watch_client().clone(), &cluster.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={QUEUES_CONFIGMAP}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut said_failing = false;
    // What a relist found, applied once it is complete.
    let mut listed: Option<ConfigMap> = None;
    // The version last judged, so that a relist of the same object is not news.
    let mut judged: Option<Option<String>> = None;
    loop {
        let event = tokio::select! {
            next = events.next() => match next {
                Some(event) => event,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let seen = match event {
            Ok(watcher::Event::Init) => {
                listed = None;
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                listed = Some(object);
                continue;
            }
            Ok(watcher::Event::InitDone) => listed.take(),
            Ok(watcher::Event::Apply(object)) => Some(object),
            Ok(watcher::Event::Delete(_)) => None,
            Err(e) => {
                if !said_failing {
                    tracing::warn!(
                        "watching ConfigMap {}/{QUEUES_CONFIGMAP} failed ({e}); the queues in force stay; retrying with backoff",
                        cluster.namespace
                    );
                    said_failing = true;
                }
                cluster.count_watch_error(&e);
                continue;
            }
        };
        said_failing = false;
        let version = seen
            .as_ref()
            .map(|o| o.metadata.resource_version.clone().unwrap_or_default());
        if judged.as_ref() == Some(&version) {
            continue;
        }
        judged = Some(version);
        let now = tx.borrow().clone();
        let (next, problems) = step(&now, &configured, &cluster.namespace, seen.as_ref());
        if let Some(problems) = problems {
            tracing::warn!(
                "ConfigMap {}/{QUEUES_CONFIGMAP} is not valid; the queues from {} stay in force: {problems}",
                cluster.namespace,
                now.source
            );
        } else if next.definitions != now.definitions || next.source != now.source {
            tracing::info!(
                queues = %next.definitions.queues.keys().cloned().collect::<Vec<_>>().join(","),
                default = %next.definitions.default_queue,
                "queues from {}",
                next.source
            );
        }
        tx.send_if_modified(|held| {
            if **held == next {
                return false;
            }
            *held = Arc::new(next);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Config;

    fn configmap(data: &[(&str, &str)]) -> ConfigMap {
        ConfigMap {
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..ConfigMap::default()
        }
    }

    fn configured() -> QueuesInForce {
        let mut config = Config::default();
        config.queues = crate::config::default_queues();
        QueuesInForce::configured(&config)
    }

    /// Present and valid: its queues; invalid: the queues before, with every problem named;
    /// deleted: the configured ones again.
    #[test]
    fn the_configmap_replaces_the_configured_queues_until_it_is_refused_or_deleted() {
        let start = configured();
        let defs = start.definitions.clone();
        let good = configmap(&[(
            "queues.toml",
            "[queues.gpu]\npriority = 5\nmax_gpus = 8\n[jobs]\ndefault_queue = \"gpu\"\n",
        )]);
        let (applied, problems) = step(&start, &defs, "agentd-system", Some(&good));
        assert_eq!(problems, None);
        assert_eq!(applied.definitions.default_queue, "gpu");
        assert_eq!(applied.definitions.queues["gpu"].max_gpus, Some(8));
        assert_eq!(applied.source, "ConfigMap agentd-system/agentd-queues");
        assert!(applied.removed.contains_key("fast"), "{applied:?}");

        let bad = configmap(&[
            ("queues.toml", "[queues.gpu]\npriority = 5\nmax_gpus = -1\n"),
            ("extra", "x"),
        ]);
        let (kept, problems) = step(&applied, &defs, "agentd-system", Some(&bad));
        let problems = problems.expect("refused");
        assert!(
            problems.contains("queues.toml: queues.gpu.max_gpus: ")
                && problems.contains("data.extra: not read"),
            "{problems}"
        );
        assert_eq!(kept.definitions, applied.definitions);
        let said = kept.problem.clone().expect("says why");
        assert!(
            said.starts_with("ConfigMap agentd-system/agentd-queues is not valid")
                && said.contains("queues.gpu.max_gpus"),
            "{said}"
        );

        let missing = configmap(&[("queue.toml", "")]);
        let (_, problems) = step(&kept, &defs, "agentd-system", Some(&missing));
        assert!(
            problems.is_some_and(|p| p.contains("data.queues.toml: missing")
                && p.contains("data.queue.toml: not read")),
        );

        let (back, problems) = step(&kept, &defs, "agentd-system", None);
        assert_eq!(problems, None);
        assert_eq!(back.definitions, defs);
        assert_eq!((back.source.as_str(), back.problem), ("agentd.toml", None));
        assert!(back.removed.contains_key("gpu"));
    }
}
