//! Events as a component that records through `events.k8s.io/v1` writes them (client-go's
//! `tools/events` recorder), for pods annotated `sim.agentd.io/event-api: events.k8s.io/v1`.
//!
//! Such a recorder aggregates on the client, not with `count` and `lastTimestamp`: the first
//! occurrence is created with `eventTime`; the second turns it into a series (`series.count` 2,
//! `series.lastObservedTime`) with one write; later occurrences only count in the recorder's
//! memory, and the series is written again when it is refreshed ([`REFRESH`], 30 minutes) or
//! when it has ended ([`FINISH`] after its last occurrence, checked as often). So a failure that
//! goes on and on shows two writes and then silence for half an hour: a reader that takes
//! silence for the end of a failure is misled. Durations are cluster time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::clock::{self, TimeScale};
use crate::resources::ResourceType;
use crate::store::{Store, WriteMode};

/// The annotation that makes a pod's kubelet record its events through `events.k8s.io/v1`.
pub const EVENT_API: &str = "sim.agentd.io/event-api";

/// How often a series that goes on is written again.
pub const REFRESH: Duration = Duration::from_mins(30);
/// How long after its last occurrence a series has ended, and how often that is checked.
pub const FINISH: Duration = Duration::from_mins(6);

/// What makes two events the same series: the recorder's key (type, action, reason, reporting
/// controller and instance, the object regarded); the note is not part of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    type_: String,
    action: String,
    reason: String,
    controller: String,
    instance: String,
    regarding: String,
}

#[derive(Debug)]
struct Series {
    namespace: String,
    name: String,
    count: u64,
    last_observed: SystemTime,
    written: SystemTime,
}

pub struct Recorder {
    store: Arc<Store>,
    event_type: ResourceType,
    scale: TimeScale,
    series: Mutex<HashMap<Key, Series>>,
}

/// One occurrence to record.
pub struct Occurrence<'a> {
    pub regarding: &'a Value,
    pub type_: &'a str,
    pub reason: &'a str,
    pub action: &'a str,
    pub note: &'a str,
    pub controller: &'a str,
    pub instance: &'a str,
}

impl Recorder {
    pub fn new(store: Arc<Store>, scale: TimeScale) -> Self {
        Self {
            // Written through `events.k8s.io/v1`, which stores the core/v1 form without the
            // defaults a core/v1 create gives an event.
            event_type: store
                .resource_type("events.k8s.io", "v1", "events")
                .expect("built-in type"),
            store,
            scale,
            series: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Series>> {
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How often [`Recorder::tick`] should run, in real time.
    pub fn tick_period(&self) -> Duration {
        self.scale
            .real(FINISH / 60)
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    pub fn record(&self, o: &Occurrence<'_>) {
        let meta = |k: &str| {
            o.regarding
                .pointer(&format!("/metadata/{k}"))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        let key = Key {
            type_: o.type_.into(),
            action: o.action.into(),
            reason: o.reason.into(),
            controller: o.controller.into(),
            instance: o.instance.into(),
            regarding: meta("uid").into(),
        };
        let now = SystemTime::now();
        let mut series = self.lock();
        if let Some(s) = series.get_mut(&key) {
            s.count += 1;
            s.last_observed = now;
            if s.count == 2 {
                s.written = now;
                self.write_series(s);
            }
            return;
        }
        let namespace = match meta("namespace") {
            "" => "default",
            ns => ns,
        };
        let name = format!("{}.{}", meta("name"), clock::random_hex(16));
        // Stored as the API server stores an `events.k8s.io/v1` event: in its core/v1 form,
        // with none of the deprecated count and timestamps.
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {
                "apiVersion": o.regarding.get("apiVersion").cloned().unwrap_or(Value::Null),
                "kind": o.regarding.get("kind").cloned().unwrap_or(Value::Null),
                "name": meta("name"), "namespace": meta("namespace"), "uid": meta("uid"),
                "resourceVersion": meta("resourceVersion"),
            },
            "eventTime": clock::rfc3339_micros(now),
            "type": o.type_, "reason": o.reason, "action": o.action, "message": o.note,
            "reportingComponent": o.controller, "reportingInstance": o.instance,
        });
        if self
            .store
            .create(&self.event_type, namespace, event)
            .is_ok()
        {
            series.insert(
                key,
                Series {
                    namespace: namespace.into(),
                    name,
                    count: 1,
                    last_observed: now,
                    written: now,
                },
            );
        }
    }

    /// Writes the series that are due: refreshed ones, and ended ones (forgotten after).
    pub fn tick(&self) {
        let now = SystemTime::now();
        let since = |t: SystemTime| now.duration_since(t).unwrap_or_default();
        let (refresh, finish) = (self.scale.real(REFRESH), self.scale.real(FINISH));
        self.lock().retain(|_, s| {
            let ended = since(s.last_observed) >= finish;
            if s.count >= 2 && (ended || since(s.written) >= refresh) {
                s.written = now;
                self.write_series(s);
            }
            !ended
        });
    }

    fn write_series(&self, s: &Series) {
        let series = json!({
            "count": s.count,
            "lastObservedTime": clock::rfc3339_micros(s.last_observed),
        });
        let _ = self.store.update_with(
            &self.event_type,
            &s.namespace,
            &s.name,
            WriteMode::Whole,
            |current| {
                let mut e = current.clone();
                e["series"] = series;
                Ok(e)
            },
        );
    }
}
