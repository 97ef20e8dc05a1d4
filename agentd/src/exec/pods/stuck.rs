//! Pods that wait for something that may never come: an image that cannot be pulled, volumes
//! that do not mount, a Secret or ConfigMap that a container's environment names and that does
//! not exist. Kubernetes retries all three for ever; a gang whose pod waits so holds its nodes
//! and never runs. Each such wait is timed from when it was first seen, and a pod still waiting
//! past its time (`cluster.image_pull_timeout`; `cluster.mount_timeout` for volumes and for
//! Secrets and ConfigMaps) ends its replica as a [`PlatformFailure`], quoting what Kubernetes
//! said.
//!
//! An image pull shows in the pod's status (one of its containers, init containers included,
//! waits with `ErrImagePull` or `ImagePullBackOff`), and so does a missing Secret or ConfigMap
//! (`CreateContainerConfigError`); both are timed from the pod's start. A mount does not show
//! there (the container waits with `ContainerCreating`, as every starting container does), so
//! mount failures come from the kubelet's `FailedMount` events, watched with a field selector.
//!
//! Only warnings seen lately count. The kubelet retries a mount that fails with a back-off
//! that doubles from half a second to about two minutes, and warns at each failure (one event,
//! its count and last time moving on), so a mount that keeps failing keeps warning. A pod with
//! no new warning for half of `cluster.mount_timeout` ([`PodTimeouts::mount_window`]) no longer
//! waits for its volumes (a transient failure followed by a long image pull or init container
//! is not a missing volume); if a warning comes again the wait resumes, still timed from the
//! first, so a mount that fails on and on fails its job at its next warning past the timeout.
//!
//! A component that records through `events.k8s.io/v1` (client-go's `tools/events`) warns
//! differently: its first failure is an event, its second makes the event a series, and the
//! failures after only count in its memory until the series is written again, every
//! [`SERIES_REFRESH`] while it goes on and once when it has ended ([`SERIES_FINISH`] after its
//! last failure). Silence then says nothing, so a warning whose series went on when it was written
//! (its last failure less than [`SERIES_FINISH`] before) counts until the next write was due. A pod
//! whose sandbox is ready (condition `PodReadyToStartContainers`, `PodHasNetwork` before
//! Kubernetes 1.29) has its volumes: the kubelet mounts them before it makes the sandbox, so no
//! warning counts for it whatever its form.
//!
//! Warnings are kept per pod uid (the event's `involvedObject.uid`: a stale warning of a deleted
//! pod never counts for a new pod of the same name), for as long as the pod exists, and for
//! [`UNKNOWN_POD_KEPT`] for a pod agentd does not know (the kubelet's first warning can come
//! before the pod's create is answered), so the map is bounded by agentd's own pods.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Event};
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;

use super::WatchedPod;
use crate::job::{PlatformFailure, TRAINING_CONTAINER};

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
    /// How long a pod's mount wait lasts without a new `FailedMount` warning: half of
    /// `cluster.mount_timeout`.
    pub fn mount_window(&self) -> Duration {
        self.mount / 2
    }

    fn of(&self, failure: PlatformFailure) -> Duration {
        match failure {
            PlatformFailure::VolumeMountFailed | PlatformFailure::ContainerConfigFailed => {
                self.mount
            }
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
    /// The pod's uid, where known: its mount warnings are kept by it.
    pub uid: Option<String>,
    pub message: String,
}

impl Stuck {
    /// Whether it has waited past its time at `now`.
    pub fn expired(&self, timeouts: &PodTimeouts, now: Instant) -> bool {
        now.duration_since(self.since) >= timeouts.of(self.failure)
    }

    /// What the replica waits for, while it waits: the pod, what Kubernetes said, and when the
    /// wait fails the job.
    pub fn waiting(&self, timeouts: &PodTimeouts) -> String {
        let from = match self.failure {
            PlatformFailure::VolumeMountFailed => "the first warning",
            _ => "the pod's start",
        };
        format!(
            "pod {}: {}; the job fails if this lasts {} from {from} ({})",
            self.pod,
            self.message,
            crate::config::format_duration(timeouts.of(self.failure)),
            self.limit()
        )
    }

    /// The setting that bounds the wait.
    fn limit(&self) -> &'static str {
        match self.failure {
            PlatformFailure::VolumeMountFailed | PlatformFailure::ContainerConfigFailed => {
                "cluster.mount_timeout"
            }
            _ => "cluster.image_pull_timeout",
        }
    }

    /// The replica's end message: the pod, how long it waited, and what Kubernetes said.
    pub fn message(&self, timeouts: &PodTimeouts) -> String {
        let what = match self.failure {
            PlatformFailure::VolumeMountFailed => "its volumes did not mount",
            PlatformFailure::ContainerConfigFailed => {
                "its container could not be made from its Secrets and ConfigMaps"
            }
            _ => "its image was not pulled",
        };
        format!(
            "pod {}: {what} in {} ({}): {}",
            self.pod,
            crate::config::format_duration(timeouts.of(self.failure)),
            self.limit(),
            self.message
        )
    }
}

/// The reasons a container waits with when its image does not come.
fn image_not_coming(reason: &str) -> bool {
    matches!(
        reason,
        "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull"
    )
}

/// What a pod that has not run waits for, if it is a wait that may never end: an image (of any
/// of its containers, init containers and sidecars included: one image that never comes holds
/// the whole gang) or its volumes (`mount`: the latest `FailedMount` message seen for it lately).
pub(super) fn waiting_on(
    pod: &WatchedPod,
    mount: Option<&str>,
) -> Option<(PlatformFailure, String)> {
    let status = pod.status.as_ref();
    let init = status
        .and_then(|s| s.init_container_statuses.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| (c, true));
    let app = status
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| (c, false));
    let pulling = init.chain(app).find_map(|(c, is_init)| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.as_deref().filter(|r| image_not_coming(r))?;
        Some((c, is_init, reason, waiting.message.as_deref().unwrap_or("")))
    });
    if let Some((c, is_init, reason, said)) = pulling {
        let image = image_of(pod, c, is_init);
        let whose = if c.name == TRAINING_CONTAINER {
            String::new()
        } else if is_init {
            format!(" (init container {})", c.name)
        } else {
            format!(" (container {})", c.name)
        };
        let message = format!("image {image:?}{whose}: {reason}: {said}")
            .trim_end_matches([' ', ':'])
            .to_owned();
        return Some((PlatformFailure::ImagePullFailed, message));
    }
    if let Some((c, said)) = config_missing(pod) {
        let whose = if c == TRAINING_CONTAINER {
            String::new()
        } else {
            format!("container {c}: ")
        };
        return Some((
            PlatformFailure::ContainerConfigFailed,
            format!("{whose}CreateContainerConfigError: {said}"),
        ));
    }
    let mount = mount.filter(|_| !volumes_mounted(pod))?;
    Some((
        PlatformFailure::VolumeMountFailed,
        format!("FailedMount: {mount}"),
    ))
}

/// A container that waits because its environment names a Secret or ConfigMap (or a key of
/// one) that does not exist: its name and the kubelet's words (`secret "x" not found`).
fn config_missing(pod: &WatchedPod) -> Option<(&str, &str)> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .chain(&status.container_statuses)
        .flatten()
        .find_map(|c| {
            let waiting = c.state.as_ref()?.waiting.as_ref()?;
            (waiting.reason.as_deref() == Some("CreateContainerConfigError"))
                .then(|| (c.name.as_str(), waiting.message.as_deref().unwrap_or("")))
        })
}

/// When `pod` started, on the local clock: its `status.startTime` (the kubelet took it up),
/// else its creation, as the API server recorded them. An image wait is timed from it, so that a
/// leader that sees the pod for the first time (a new term) does not give it a new full wait.
/// `wall` and `now` are the same moment on the two clocks.
pub(super) fn started(pod: &WatchedPod, wall: Timestamp, now: Instant) -> Instant {
    let at = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .or(pod.metadata.creation_timestamp.as_ref())
        .map(|t| t.0);
    let age = at
        .and_then(|t| Duration::try_from(wall.duration_since(t)).ok())
        .unwrap_or_default();
    // Only a pod older than this machine's monotonic clock fails the subtraction.
    now.checked_sub(age).unwrap_or(now)
}

/// The image a container status names, else the one its spec names.
fn image_of<'a>(pod: &'a WatchedPod, status: &'a ContainerStatus, is_init: bool) -> &'a str {
    if !status.image.is_empty() {
        return &status.image;
    }
    let spec = pod.spec.as_ref();
    let containers = if is_init {
        spec.and_then(|s| s.init_containers.as_deref())
    } else {
        spec.map(|s| s.containers.as_slice())
    };
    containers
        .unwrap_or_default()
        .iter()
        .find(|c| c.name == status.name)
        .and_then(|c| c.image.as_deref())
        .unwrap_or("?")
}

/// How long the warnings of a pod agentd does not know are kept: its create's answer may come
/// after the kubelet's first warning, but not this much later.
pub(super) const UNKNOWN_POD_KEPT: Duration = Duration::from_mins(1);

/// How often an `events.k8s.io/v1` recorder writes a series that goes on.
pub(super) const SERIES_REFRESH: Duration = Duration::from_mins(30);

/// How long after its last failure such a recorder takes a series to have ended; the write that
/// ends it comes at most as long again after.
pub(super) const SERIES_FINISH: Duration = Duration::from_mins(6);

/// Whether `pod`'s volumes are mounted: its sandbox is ready, which the kubelet makes only after.
pub(super) fn volumes_mounted(pod: &WatchedPod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_deref());
    conditions.unwrap_or_default().iter().any(|c| {
        matches!(
            c.type_.as_str(),
            "PodReadyToStartContainers" | "PodHasNetwork"
        ) && c.status == "True"
    })
}

/// One `FailedMount` warning as the watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountWarning {
    /// The pod's uid (`involvedObject.uid`).
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub message: String,
    /// What tells a new warning from one already seen (a relist delivers every event again):
    /// the event's name, count and latest time, and its series'.
    stamp: (String, i32, Option<Timestamp>),
    /// How long ago the event's first and latest warnings were, by its own times.
    first_age: Duration,
    last_age: Duration,
    /// Whether it is a series that went on when it was written (see the module's words).
    series_goes_on: bool,
}

impl MountWarning {
    /// The warning an event is, if it is a pod's `FailedMount` with its uid; ages from `now`.
    pub fn of(event: &Event, now: Timestamp) -> Option<Self> {
        let object = &event.involved_object;
        if object.kind.as_deref() != Some("Pod") {
            return None;
        }
        let uid = object.uid.clone().filter(|u| !u.is_empty())?;
        let series = event.series.as_ref();
        let last = series
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| t.0)
            .or(event.last_timestamp.as_ref().map(|t| t.0))
            .or(event.event_time.as_ref().map(|t| t.0));
        let first = event
            .first_timestamp
            .as_ref()
            .map(|t| t.0)
            .or(event.event_time.as_ref().map(|t| t.0))
            .or(last);
        let count = series.and_then(|s| s.count).or(event.count).unwrap_or(1);
        let age = |t: Option<Timestamp>| {
            t.and_then(|t| Duration::try_from(now.duration_since(t)).ok())
                .unwrap_or_default()
        };
        let last_age = age(last);
        Some(Self {
            uid,
            namespace: object.namespace.clone()?,
            name: object.name.clone()?,
            message: event.message.clone().unwrap_or_default(),
            stamp: (event.metadata.name.clone().unwrap_or_default(), count, last),
            first_age: age(first),
            last_age,
            series_goes_on: series.is_some() && last_age < SERIES_FINISH,
        })
    }
}

/// The `FailedMount` warnings of one pod, on the local clock.
#[derive(Debug, Clone)]
struct PodWarnings {
    message: String,
    first: Instant,
    last: Instant,
    stamp: (String, i32, Option<Timestamp>),
    series_goes_on: bool,
}

/// Every pod's `FailedMount` warnings, by pod uid; bounded (see the module's words).
#[derive(Debug, Default)]
pub(super) struct MountWarnings {
    pods: HashMap<String, PodWarnings>,
}

/// The most pods whose warnings are kept: a cluster whose other workloads fail to mount
/// volumes by the thousand must not grow the agent without bound. Past it, the pod whose
/// latest warning is oldest is forgotten first.
pub(super) const MAX_PODS_WARNED: usize = 10_000;

/// The longest warning message kept; the kubelet's run to a few hundred bytes.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Event times are whole seconds: a warning this fresh by them is taken as of now.
const EVENT_TIME_GRAIN: Duration = Duration::from_secs(1);

impl MountWarnings {
    /// Records a warning the watch delivered at `now`; true if it is a new one (not one seen
    /// before, delivered again).
    pub fn seen(&mut self, warning: MountWarning, now: Instant) -> bool {
        let at = |age: Duration| {
            if age <= EVENT_TIME_GRAIN {
                now
            } else {
                now.checked_sub(age).unwrap_or(now)
            }
        };
        let last = at(warning.last_age);
        let mut warning = warning;
        if warning.message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !warning.message.is_char_boundary(end) {
                end -= 1;
            }
            warning.message.truncate(end);
            warning.message.push('…');
            warning.message.shrink_to_fit();
        }
        if self.pods.len() >= MAX_PODS_WARNED && !self.pods.contains_key(&warning.uid) {
            let oldest = self
                .pods
                .iter()
                .min_by_key(|(_, w)| w.last)
                .map(|(uid, _)| uid.clone());
            if let Some(uid) = oldest {
                self.pods.remove(&uid);
            }
        }
        match self.pods.get_mut(&warning.uid) {
            Some(known) if known.stamp == warning.stamp => false,
            Some(known) => {
                known.stamp = warning.stamp;
                known.message = warning.message;
                known.last = known.last.max(last);
                known.series_goes_on = warning.series_goes_on;
                true
            }
            None => {
                self.pods.insert(
                    warning.uid,
                    PodWarnings {
                        message: warning.message,
                        first: at(warning.first_age).min(last),
                        last,
                        stamp: warning.stamp,
                        series_goes_on: warning.series_goes_on,
                    },
                );
                true
            }
        }
    }

    /// The pod's latest warning and when its warnings began, if one came within `window` of
    /// `now`, or it is a series that went on and is not yet due to be written again.
    pub fn recent(&self, uid: &str, now: Instant, window: Duration) -> Option<(&str, Instant)> {
        let w = self.pods.get(uid)?;
        let window = if w.series_goes_on {
            window.max(SERIES_REFRESH + SERIES_FINISH)
        } else {
            window
        };
        (now.saturating_duration_since(w.last) <= window).then_some((w.message.as_str(), w.first))
    }

    pub fn forget(&mut self, uid: &str) {
        self.pods.remove(uid);
    }

    /// Drops the warnings of pods not `known` whose latest came over [`UNKNOWN_POD_KEPT`]
    /// before `now`.
    pub fn prune(&mut self, known: impl Fn(&str) -> bool, now: Instant) {
        self.pods.retain(|uid, w| {
            known(uid) || now.saturating_duration_since(w.last) <= UNKNOWN_POD_KEPT
        });
    }
}

/// Follows the kubelets' `FailedMount` warnings, in every namespace, calling `seen` with each
/// pod's warning. Runs until aborted; backs off on errors.
pub(super) async fn follow_mount_failures(api: Api<Event>, seen: impl Fn(MountWarning)) {
    let config = watcher::Config::default().fields("reason=FailedMount");
    let events = watcher(api, config).default_backoff().applied_objects();
    let mut events = std::pin::pin!(events);
    let mut said_failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                said_failing = false;
                if let Some(warning) = MountWarning::of(&event, Timestamp::now()) {
                    seen(warning);
                }
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
