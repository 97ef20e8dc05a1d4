//! Pods that wait for something that may never come: an image that cannot be pulled, volumes
//! that do not mount. Kubernetes retries both for ever; a gang whose pod waits so holds its
//! nodes and never runs. Each such wait is timed from when it was first seen, and a pod still
//! waiting past its time (`cluster.image_pull_timeout`, `cluster.mount_timeout`) ends its
//! replica as a [`PlatformFailure`], quoting what Kubernetes said.
//!
//! An image pull shows in the pod's status (the container waits with `ErrImagePull` or
//! `ImagePullBackOff`); a mount does not (the container waits with `ContainerCreating`, as
//! every starting container does), so mount failures come from the kubelet's `FailedMount`
//! events, watched with a field selector.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;

use crate::job::PlatformFailure;

/// How long a pod may wait for each thing before its replica fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodTimeouts {
    pub mount: Duration,
    pub image_pull: Duration,
}

impl Default for PodTimeouts {
    fn default() -> Self {
        Self {
            mount: crate::config::DEFAULT_MOUNT_TIMEOUT,
            image_pull: crate::config::DEFAULT_IMAGE_PULL_TIMEOUT,
        }
    }
}

impl PodTimeouts {
    fn of(&self, failure: PlatformFailure) -> Duration {
        match failure {
            PlatformFailure::VolumeMountFailed => self.mount,
            _ => self.image_pull,
        }
    }
}

/// A followed replica whose pod waits: on what, since when, and Kubernetes' latest words.
#[derive(Debug, Clone)]
pub(super) struct Stuck {
    pub failure: PlatformFailure,
    pub since: Instant,
    /// `<namespace>/<name>`.
    pub pod: String,
    pub message: String,
}

impl Stuck {
    /// Whether it has waited past its time at `now`.
    pub fn expired(&self, timeouts: &PodTimeouts, now: Instant) -> bool {
        now.duration_since(self.since) >= timeouts.of(self.failure)
    }

    /// The replica's end message: the pod, how long it waited, and what Kubernetes said.
    pub fn message(&self, timeouts: &PodTimeouts) -> String {
        let (what, limit) = match self.failure {
            PlatformFailure::VolumeMountFailed => {
                ("its volumes did not mount", "cluster.mount_timeout")
            }
            _ => ("its image was not pulled", "cluster.image_pull_timeout"),
        };
        format!(
            "pod {}: {what} in {} ({limit}): {}",
            self.pod,
            crate::config::format_duration(timeouts.of(self.failure)),
            self.message
        )
    }
}

/// What a pod that has not run waits for, if it is a wait that may never end: an image
/// (from its training container's status) or its volumes (`mount`: the latest `FailedMount`
/// message seen for it).
pub(super) fn waiting_on(
    pod: &Pod,
    training: Option<&k8s_openapi::api::core::v1::ContainerStatus>,
    mount: Option<&str>,
) -> Option<(PlatformFailure, String)> {
    let waiting = training
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.waiting.as_ref());
    if let Some(w) = waiting
        && let Some(reason) = w.reason.as_deref()
        && matches!(
            reason,
            "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull"
        )
    {
        let image = training
            .map(|c| c.image.as_str())
            .filter(|i| !i.is_empty())
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .and_then(|c| c.image.as_deref())
            })
            .unwrap_or("?");
        let said = w.message.as_deref().unwrap_or("");
        let message = format!("image {image:?}: {reason}: {said}")
            .trim_end_matches([' ', ':'])
            .to_owned();
        return Some((PlatformFailure::ImagePullFailed, message));
    }
    let mount = mount?;
    Some((
        PlatformFailure::VolumeMountFailed,
        format!("FailedMount: {mount}"),
    ))
}

/// Follows the kubelets' `FailedMount` warnings, in every namespace, calling `seen` with the
/// pod's namespace, name and the warning's message. Runs until aborted; backs off on errors.
pub(super) async fn follow_mount_failures(api: Api<Event>, seen: impl Fn(String, String, String)) {
    let config = watcher::Config::default().fields("reason=FailedMount");
    let events = watcher(api, config).default_backoff().applied_objects();
    let mut events = std::pin::pin!(events);
    let mut said_failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                said_failing = false;
                let object = &event.involved_object;
                if object.kind.as_deref() != Some("Pod") {
                    continue;
                }
                let (Some(namespace), Some(name)) = (&object.namespace, &object.name) else {
                    continue;
                };
                seen(
                    namespace.clone(),
                    name.clone(),
                    event.message.unwrap_or_default(),
                );
            }
            Err(e) => {
                if !said_failing {
                    tracing::warn!(
                        "watching FailedMount events failed ({e}); retrying with backoff"
                    );
                    said_failing = true;
                }
            }
        }
    }
}
