//! A replica's log in cluster mode: its pod's `tensorflow` container, through the API server's
//! `pods/log` (as `kubectl logs` reads it), on any agent whose role may read pod logs.

use futures::{AsyncBufReadExt, Stream, TryStreamExt};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};

use super::{Cluster, ClusterError};
use crate::exec::pods::{GENERATION_LABEL, JOB_LABEL, REPLICA_INDEX_LABEL, REPLICA_TYPE_LABEL};
use crate::job::TRAINING_CONTAINER;

/// Where a replica's log is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPod {
    pub namespace: String,
    pub name: String,
}

/// A replica's log: whole, or a stream that follows it until its container ends.
pub enum PodLog {
    Whole(Bytes),
    Follow(std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>),
}

impl Cluster {
    /// The log of replica `replica_type`-`index` of `job`: of the latest generation that still
    /// has a pod. `follow` streams it until the container ends.
    pub async fn replica_log(
        &self,
        job: &str,
        replica_type: &str,
        index: u32,
        follow: bool,
    ) -> Result<PodLog, ClusterError> {
        let selector = format!(
            "{JOB_LABEL}={job},{REPLICA_TYPE_LABEL}={replica_type},{REPLICA_INDEX_LABEL}={index}"
        );
        if !self.may_read_pod_logs().await {
            return Err(ClusterError::Forbidden(format!(
                "this agent's role may not read pod logs: run `agentctl logs` on the leader{}, \
                 or `kubectl logs -n {} -l {selector} -c {TRAINING_CONTAINER}`",
                self.status_with_leader()
                    .await
                    .leader
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default(),
                self.job_namespace(job)
                    .await
                    .unwrap_or_else(|| "NAMESPACE".to_owned()),
            )));
        }
        let pods: Api<Pod> = Api::all(self.client().clone());
        let listed = self
            .call(
                "list",
                "pods",
                pods.list(&ListParams::default().labels(&selector)),
            )
            .await?;
        let Some(pod) = latest(&listed.items) else {
            return Err(ClusterError::NotFound(format!(
                "replica {replica_type}-{index} of job {job} has no pod: it has not started yet, \
                 or its pods were removed when the job ended (runPolicy.cleanPodPolicy None \
                 keeps them)"
            )));
        };
        // A followed log is long-lived, like a watch: on the client without a read timeout.
        let client = if follow {
            self.watch_client()
        } else {
            self.client()
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
        let params = LogParams {
            container: Some(TRAINING_CONTAINER.to_owned()),
            follow,
            ..LogParams::default()
        };
        let what = format!("pods/{}/log", pod.name);
        if follow {
            let reader = self
                .call("get", &what, api.log_stream(&pod.name, &params))
                .await?;
            // Line by line, each sent as it comes.
            let lines = reader.lines().map_ok(|mut line| {
                line.push('\n');
                Bytes::from(line)
            });
            Ok(PodLog::Follow(Box::pin(lines)))
        } else {
            let text = self
                .call("get", &what, api.logs(&pod.name, &params))
                .await?;
            Ok(PodLog::Whole(Bytes::from(text)))
        }
    }

    /// Whether this agent may list pods and get their logs (one SelfSubjectAccessReview each;
    /// a review not answered counts as allowed, and the request itself then says).
    async fn may_read_pod_logs(&self) -> bool {
        for (resource, subresource, verb) in [("pods", None, "list"), ("pods", Some("log"), "get")]
        {
            if self.may(verb, resource, subresource, None).await == Some(false) {
                return false;
            }
        }
        true
    }

    /// The namespace of job `name`'s `TrainingJob`, if this agent can read it.
    async fn job_namespace(&self, name: &str) -> Option<String> {
        let objects = crate::store::kube::list_training_jobs(self.client().clone(), Some(name))
            .await
            .ok()?;
        objects.into_iter().next()?.metadata.namespace
    }
}

/// The pod of the highest generation among `pods`.
fn latest(pods: &[Pod]) -> Option<ReplicaPod> {
    pods.iter()
        .filter_map(|p| {
            let generation: u32 = p
                .metadata
                .labels
                .as_ref()?
                .get(GENERATION_LABEL)?
                .parse()
                .ok()?;
            Some((
                generation,
                ReplicaPod {
                    namespace: p.metadata.namespace.clone()?,
                    name: p.metadata.name.clone()?,
                },
            ))
        })
        .max_by_key(|(generation, _)| *generation)
        .map(|(_, pod)| pod)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn pod(name: &str, generation: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("team".to_owned()),
                labels: Some(BTreeMap::from([(
                    GENERATION_LABEL.to_owned(),
                    generation.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn the_latest_generation_is_read() {
        let pods = [
            pod("j-worker-0-g2", "2"),
            pod("j-worker-0-g10", "10"),
            pod("stray", "x"),
        ];
        assert_eq!(
            latest(&pods),
            Some(ReplicaPod {
                namespace: "team".to_owned(),
                name: "j-worker-0-g10".to_owned(),
            })
        );
        assert_eq!(latest(&[pod("stray", "x")]), None);
    }
}
