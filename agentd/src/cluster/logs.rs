//! A replica's log in cluster mode: its pod's `tensorflow` container, through the API server's
//! `pods/log` (as `kubectl logs` reads it), on any agent whose role may read pod logs.

use futures::{AsyncReadExt, Stream, TryStreamExt};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, LogParams};

use super::{Cluster, ClusterError, RequestError};
use crate::exec::pods::{GENERATION_LABEL, JOB_LABEL, REPLICA_INDEX_LABEL, REPLICA_TYPE_LABEL};
use crate::job::TRAINING_CONTAINER;

/// A replica's log: whole, or a stream that follows it until its container ends.
pub enum PodLog {
    Whole(Bytes),
    Follow(std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>),
}

impl Cluster {
    /// The log of replica `replica_type`-`index` of `job`, whose gang is at `generation`: from
    /// the pod of the latest generation up to it that still has one, among the pods the job's
    /// `TrainingJob` owns. `follow` streams it until the container ends.
    pub async fn replica_log(
        &self,
        job: &str,
        replica_type: &str,
        index: u32,
        generation: u32,
        follow: bool,
    ) -> Result<PodLog, ClusterError> {
        let selector = format!(
            "{JOB_LABEL}={job},{REPLICA_TYPE_LABEL}={replica_type},{REPLICA_INDEX_LABEL}={index}"
        );
        // The object the leader runs: of two with one name, the older.
        let object = crate::store::kube::list_training_jobs(self.client().clone(), Some(job))
            .await
            .map_err(|e| ClusterError::Request(format!("cannot list trainingjobs: {e}")))?
            .into_iter()
            .next()
            .ok_or_else(|| ClusterError::NotFound(format!("no TrainingJob named {job}")))?;
        let namespace = object.metadata.namespace.unwrap_or_default();
        let owner = object.metadata.uid.unwrap_or_default();
        if !self.may_read_pod_logs(&namespace).await {
            return Err(ClusterError::Forbidden(format!(
                "this agent's role may not read pod logs: run `agentctl logs` on the leader{}, \
                 or `kubectl logs -n {namespace} -l {selector} -c {TRAINING_CONTAINER}`",
                self.status_with_leader()
                    .await
                    .leader
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default(),
            )));
        }
        let pods: Api<Pod> = Api::namespaced(self.client().clone(), &namespace);
        let listed = self
            .call(
                "list",
                "pods",
                pods.list(&ListParams::default().labels(&selector)),
            )
            .await?;
        let Some(pod) = latest(&listed.items, &owner, generation) else {
            return Err(ClusterError::NotFound(format!(
                "replica {replica_type}-{index} of job {job} has no pod: it has not started yet, \
                 or its pods were removed (runPolicy.cleanPodPolicy All removes them when the \
                 job ends)"
            )));
        };
        // A followed log is long-lived, like a watch: on the client without a read timeout.
        let client = if follow {
            self.watch_client()
        } else {
            self.client()
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let params = LogParams {
            container: Some(TRAINING_CONTAINER.to_owned()),
            follow,
            ..LogParams::default()
        };
        let what = format!("pods/{pod}/log");
        let reader = match self.call("get", &what, api.log_stream(&pod, &params)).await {
            Ok(reader) => reader,
            // The server's own words: the container is waiting to start, say.
            Err(RequestError {
                code: Some(400),
                message,
                ..
            }) => {
                return Err(ClusterError::NotFound(format!(
                    "replica {replica_type}-{index} of job {job} has no log yet: {message}"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        // Bytes as they come (a log need not be UTF-8, nor end its lines).
        let chunks = futures::stream::unfold(Box::pin(reader), |mut reader| async move {
            let mut buffer = vec![0u8; 64 * 1024];
            match reader.read(&mut buffer).await {
                Ok(0) => None,
                Ok(n) => {
                    buffer.truncate(n);
                    Some((Ok(Bytes::from(buffer)), reader))
                }
                Err(e) => Some((Err(e), reader)),
            }
        });
        if follow {
            return Ok(PodLog::Follow(Box::pin(chunks)));
        }
        let parts: Vec<Bytes> = chunks
            .try_collect()
            .await
            .map_err(|e| ClusterError::Request(format!("reading {what}: {e}")))?;
        Ok(PodLog::Whole(Bytes::from(parts.concat())))
    }

    /// Whether this agent may list pods and get their logs in `namespace` (one
    /// SelfSubjectAccessReview each; a review not answered counts as allowed, and the request
    /// itself then says).
    async fn may_read_pod_logs(&self, namespace: &str) -> bool {
        for (subresource, verb) in [(None, "list"), (Some("log"), "get")] {
            if self
                .may(verb, "pods", subresource, Some(namespace), None)
                .await
                == Some(false)
            {
                return false;
            }
        }
        true
    }
}

/// The name of the pod of the highest generation up to `generation` among `pods` that the
/// object with uid `owner` owns.
fn latest(pods: &[Pod], owner: &str, generation: u32) -> Option<String> {
    pods.iter()
        .filter(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| r.uid == owner)
        })
        .filter_map(|p| {
            let of: u32 = p
                .metadata
                .labels
                .as_ref()?
                .get(GENERATION_LABEL)?
                .parse()
                .ok()?;
            Some((of, p.metadata.name.clone()?))
        })
        .filter(|(of, _)| *of <= generation)
        .max_by_key(|(of, _)| *of)
        .map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    fn pod(name: &str, generation: &str, owner: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("team".to_owned()),
                labels: Some(BTreeMap::from([(
                    GENERATION_LABEL.to_owned(),
                    generation.to_owned(),
                )])),
                owner_references: Some(vec![OwnerReference {
                    uid: owner.to_owned(),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn the_latest_generation_the_job_owns_is_read() {
        let pods = [
            pod("j-worker-0-g2", "2", "job"),
            pod("j-worker-0-g3", "3", "job"),
            pod("j-worker-0-g9", "9", "an-earlier-job"),
            pod("j-worker-0-g10", "10", "job"),
            pod("stray", "x", "job"),
        ];
        assert_eq!(latest(&pods, "job", 3).as_deref(), Some("j-worker-0-g3"));
        assert_eq!(latest(&pods, "job", 99).as_deref(), Some("j-worker-0-g10"));
        assert_eq!(latest(&pods, "job", 1), None);
        assert_eq!(latest(&pods, "someone", 99), None);
    }
}
