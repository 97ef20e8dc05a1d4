//! A pod as the executor reads it: of its metadata the names, labels, owners and times (no
//! managed fields, no annotations), of its spec the node and the containers' names and images,
//! and its status. A leader placing a burst of gangs decodes every pod each time the watch
//! brings a change; the rest of the spec (environment, volumes, resources, probes) and the
//! managed fields were half of that work and are never read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use serde::Deserialize;

/// A pod, decoded with only what the executor reads. Watched and read as `Pod` is: the
/// resource is the same.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedPod {
    #[serde(default, deserialize_with = "read_metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<WatchedSpec>,
    pub status: Option<PodStatus>,
}

/// The part of a pod's spec the executor reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedSpec {
    pub node_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<WatchedContainer>,
    pub init_containers: Option<Vec<WatchedContainer>>,
}

/// A container's name and image.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct WatchedContainer {
    pub name: String,
    pub image: Option<String>,
}

/// The metadata fields the executor and the watch read (the watch resumes from
/// `resourceVersion`); `managedFields`, a pod's largest part, is skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetadataRead {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    owner_references: Option<Vec<OwnerReference>>,
}

fn read_metadata<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let read = MetadataRead::deserialize(d)?;
    Ok(ObjectMeta {
        name: read.name,
        namespace: read.namespace,
        uid: read.uid,
        resource_version: read.resource_version,
        labels: read.labels,
        creation_timestamp: read.creation_timestamp,
        deletion_timestamp: read.deletion_timestamp,
        owner_references: read.owner_references,
        ..ObjectMeta::default()
    })
}

impl k8s_openapi::Resource for WatchedPod {
    const API_VERSION: &'static str = <Pod as k8s_openapi::Resource>::API_VERSION;
    const GROUP: &'static str = <Pod as k8s_openapi::Resource>::GROUP;
    const KIND: &'static str = <Pod as k8s_openapi::Resource>::KIND;
    const VERSION: &'static str = <Pod as k8s_openapi::Resource>::VERSION;
    const URL_PATH_SEGMENT: &'static str = <Pod as k8s_openapi::Resource>::URL_PATH_SEGMENT;
    type Scope = <Pod as k8s_openapi::Resource>::Scope;
}

impl k8s_openapi::Metadata for WatchedPod {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod decoded whole and decoded as watched give the executor the same fields, and the
    /// watched one leaves out the annotations and managed fields.
    #[test]
    fn a_watched_pod_reads_what_the_whole_pod_says() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "mnist-worker-0-g1",
                "namespace": "default",
                "uid": "u-1",
                "resourceVersion": "42",
                "labels": {"agentd.io/job": "mnist"},
                "annotations": {"a": "b"},
                "creationTimestamp": "2026-12-02T07:00:00Z",
                "deletionTimestamp": "2026-12-02T07:01:00Z",
                "ownerReferences": [{"apiVersion": "agentd.io/v1alpha1", "kind": "TrainingJob",
                                     "name": "mnist", "uid": "j-1", "controller": true}],
                "managedFields": [{"manager": "agentd", "operation": "Update",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
            },
            "spec": {
                "nodeName": "gpu-3",
                "initContainers": [{"name": "fetch", "image": "busybox"}],
                "containers": [{"name": "tensorflow", "image": "tf:2.16",
                                "env": [{"name": "TF_CONFIG", "value": "{}"}]}]
            },
            "status": {"phase": "Running", "startTime": "2026-12-02T07:00:05Z",
                       "containerStatuses": [{"name": "tensorflow", "image": "tf:2.16",
                                              "imageID": "", "ready": true, "restartCount": 0,
                                              "state": {"running": {}}}]}
        });
        let pod: WatchedPod = serde_json::from_value(json.clone()).unwrap();
        let whole: Pod = serde_json::from_value(json).unwrap();
        assert_eq!(pod.metadata.annotations, None);
        assert_eq!(pod.metadata.managed_fields, None);
        assert_eq!(pod.metadata.name, whole.metadata.name);
        assert_eq!(pod.metadata.namespace, whole.metadata.namespace);
        assert_eq!(pod.metadata.uid, whole.metadata.uid);
        assert_eq!(
            pod.metadata.resource_version,
            whole.metadata.resource_version
        );
        assert_eq!(pod.metadata.labels, whole.metadata.labels);
        assert_eq!(
            pod.metadata.creation_timestamp,
            whole.metadata.creation_timestamp
        );
        assert_eq!(
            pod.metadata.deletion_timestamp,
            whole.metadata.deletion_timestamp
        );
        assert_eq!(
            pod.metadata.owner_references,
            whole.metadata.owner_references
        );
        assert_eq!(pod.status, whole.status);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("gpu-3"));
        assert_eq!(spec.containers[0].name, "tensorflow");
        assert_eq!(spec.containers[0].image.as_deref(), Some("tf:2.16"));
        let init = spec.init_containers.as_ref().unwrap();
        assert_eq!(init[0].image.as_deref(), Some("busybox"));
    }
}
