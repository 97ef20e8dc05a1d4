//! GPU health as a pure state machine: observations in, healthy or not (and why) out.
//!
//! Owns the rules only: which XIDs are critical, what a lost or unreadable GPU means, and when a
//! GPU that had trouble is trusted again. It does no I/O and reads no clock; time is an argument,
//! so every transition is tested without waiting. The NVML side that produces observations is in
//! `gpu.rs`.
//!
//! Unlike NVIDIA's device plugin, which marks a GPU unhealthy until the node restarts, a GPU that
//! is readable and quiet (no critical XID, not lost) for `recovery_quiet` becomes healthy again:
//! many XIDs (e.g. 94, contained ECC errors) leave the GPU usable, and a node should not lose a
//! GPU for good over one event.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// XIDs caused by the application, not the GPU (illegal address, MMU fault from user code,
/// reset channel, preemptive cleanup, video processor exception): they do not affect health.
pub const APPLICATION_XIDS: [u64; 5] = [13, 31, 43, 45, 68];

/// How long a GPU must be readable and quiet before it is healthy again, unless configured.
pub const DEFAULT_RECOVERY_QUIET: Duration = Duration::from_mins(5);

/// Whether an XID says something is wrong with the GPU itself.
pub fn is_critical_xid(xid: u64) -> bool {
    !APPLICATION_XIDS.contains(&xid)
}

/// What one inventory pass saw of a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readability {
    /// Its identity and memory could be read.
    Readable,
    /// NVML said "GPU is lost": it fell off the bus or is otherwise inaccessible.
    Lost,
    /// Reading it failed for another reason, given here.
    Unreadable(String),
}

/// One observation of one GPU: whether it could be read, and the XIDs delivered since the
/// previous observation (critical or not, in arrival order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation<'a> {
    pub readability: Readability,
    pub xids: &'a [u64],
}

/// A change of a GPU's health, for the log and the node's event list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthChange {
    BecameUnhealthy {
        reason: String,
    },
    /// `was` is the reason it had been unhealthy.
    BecameHealthy {
        was: String,
    },
}

impl fmt::Display for HealthChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthChange::BecameUnhealthy { reason } => write!(f, "unhealthy: {reason}"),
            HealthChange::BecameHealthy { was } => write!(f, "healthy again (was: {was})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Healthy,
    Unhealthy {
        /// The latest trouble seen.
        reason: String,
        /// Since when the GPU has been readable with no critical XID; `None` while trouble lasts.
        quiet_since: Option<Instant>,
    },
}

/// The health of one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuHealth {
    recovery_quiet: Duration,
    state: State,
}

impl GpuHealth {
    /// A GPU starts healthy: the first observation decides otherwise.
    pub fn new(recovery_quiet: Duration) -> Self {
        GpuHealth {
            recovery_quiet,
            state: State::Healthy,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.state == State::Healthy
    }

    /// Why the GPU is unhealthy; `None` when healthy.
    pub fn reason(&self) -> Option<&str> {
        match &self.state {
            State::Healthy => None,
            State::Unhealthy { reason, .. } => Some(reason),
        }
    }

    /// Takes one observation made at `now` and returns the change it caused, if any.
    pub fn step(&mut self, observation: &Observation<'_>, now: Instant) -> Option<HealthChange> {
        let trouble = match &observation.readability {
            Readability::Lost => {
                Some("GPU is lost (fell off the bus or is inaccessible)".to_owned())
            }
            Readability::Unreadable(why) => Some(format!("GPU cannot be read: {why}")),
            Readability::Readable => critical_xid_reason(observation.xids),
        };
        // A readable GPU with a critical XID starts its quiet time now: the XID is the last
        // trouble seen. A lost or unreadable one starts it only once it reads again.
        let quiet_since = match observation.readability {
            Readability::Readable => Some(now),
            Readability::Lost | Readability::Unreadable(_) => None,
        };
        match (&mut self.state, trouble) {
            (State::Healthy, Some(reason)) => {
                self.state = State::Unhealthy {
                    reason: reason.clone(),
                    quiet_since,
                };
                Some(HealthChange::BecameUnhealthy { reason })
            }
            (
                State::Unhealthy {
                    reason,
                    quiet_since: since,
                },
                Some(new_reason),
            ) => {
                *reason = new_reason;
                *since = quiet_since;
                None
            }
            (State::Healthy, None) => None,
            (
                State::Unhealthy {
                    reason,
                    quiet_since: since,
                },
                None,
            ) => {
                let start = *since.get_or_insert(now);
                if now.saturating_duration_since(start) >= self.recovery_quiet {
                    let was = std::mem::take(reason);
                    self.state = State::Healthy;
                    Some(HealthChange::BecameHealthy { was })
                } else {
                    None
                }
            }
        }
    }
}

fn critical_xid_reason(xids: &[u64]) -> Option<String> {
    let mut critical: Vec<u64> = xids
        .iter()
        .copied()
        .filter(|&x| is_critical_xid(x))
        .collect();
    critical.sort_unstable();
    critical.dedup();
    match critical.as_slice() {
        [] => None,
        [xid] => Some(format!("XID {xid}")),
        many => {
            let list: Vec<String> = many.iter().map(u64::to_string).collect();
            Some(format!("XIDs {}", list.join(", ")))
        }
    }
}

/// The health of every GPU of a node, keyed by GPU UUID so that a GPU keeps its history when
/// the driver renumbers the indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGpuHealth {
    recovery_quiet: Duration,
    gpus: BTreeMap<String, GpuHealth>,
}

impl NodeGpuHealth {
    pub fn new(recovery_quiet: Duration) -> Self {
        NodeGpuHealth {
            recovery_quiet,
            gpus: BTreeMap::new(),
        }
    }

    pub fn recovery_quiet(&self) -> Duration {
        self.recovery_quiet
    }

    /// Steps the GPU with this UUID, creating it (healthy) on first sight.
    pub fn step(
        &mut self,
        uuid: &str,
        observation: &Observation<'_>,
        now: Instant,
    ) -> Option<HealthChange> {
        let recovery_quiet = self.recovery_quiet;
        self.gpus
            .entry(uuid.to_owned())
            .or_insert_with(|| GpuHealth::new(recovery_quiet))
            .step(observation, now)
    }

    pub fn get(&self, uuid: &str) -> Option<&GpuHealth> {
        self.gpus.get(uuid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_mins(5);

    fn readable(xids: &[u64]) -> Observation<'_> {
        Observation {
            readability: Readability::Readable,
            xids,
        }
    }

    fn lost() -> Observation<'static> {
        Observation {
            readability: Readability::Lost,
            xids: &[],
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn healthy_and_quiet_stays_healthy() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        assert_eq!(h.step(&readable(&[]), t0), None);
        assert_eq!(h.step(&readable(&[]), secs(t0, 10)), None);
        assert!(h.is_healthy());
        assert_eq!(h.reason(), None);
    }

    #[test]
    fn application_xids_leave_the_gpu_healthy() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        for xid in APPLICATION_XIDS {
            assert_eq!(h.step(&readable(&[xid]), t0), None, "XID {xid}");
        }
        assert!(h.is_healthy());
    }

    #[test]
    fn a_critical_xid_makes_it_unhealthy() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        assert_eq!(
            h.step(&readable(&[13, 79]), t0),
            Some(HealthChange::BecameUnhealthy {
                reason: "XID 79".into()
            })
        );
        assert!(!h.is_healthy());
        assert_eq!(h.reason(), Some("XID 79"));
    }

    #[test]
    fn several_critical_xids_are_all_named() {
        let mut h = GpuHealth::new(QUIET);
        let change = h.step(&readable(&[94, 48, 94]), Instant::now());
        assert_eq!(
            change,
            Some(HealthChange::BecameUnhealthy {
                reason: "XIDs 48, 94".into()
            })
        );
    }

    #[test]
    fn lost_makes_it_unhealthy() {
        let mut h = GpuHealth::new(QUIET);
        let change = h.step(&lost(), Instant::now());
        assert!(
            matches!(change, Some(HealthChange::BecameUnhealthy { reason }) if reason.contains("lost"))
        );
        assert!(!h.is_healthy());
    }

    #[test]
    fn unreadable_makes_it_unhealthy_with_the_cause() {
        let mut h = GpuHealth::new(QUIET);
        let obs = Observation {
            readability: Readability::Unreadable("Unknown Error".into()),
            xids: &[],
        };
        h.step(&obs, Instant::now());
        assert_eq!(h.reason(), Some("GPU cannot be read: Unknown Error"));
    }

    #[test]
    fn readable_and_quiet_for_the_quiet_time_recovers() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        h.step(&readable(&[79]), t0);
        assert_eq!(h.step(&readable(&[]), secs(t0, 299)), None);
        assert!(!h.is_healthy());
        assert_eq!(
            h.step(&readable(&[]), secs(t0, 300)),
            Some(HealthChange::BecameHealthy {
                was: "XID 79".into()
            })
        );
        assert!(h.is_healthy());
        assert_eq!(h.reason(), None);
    }

    #[test]
    fn another_critical_xid_restarts_the_quiet_time() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        h.step(&readable(&[79]), t0);
        assert_eq!(h.step(&readable(&[48]), secs(t0, 200)), None);
        assert_eq!(h.reason(), Some("XID 48"));
        assert_eq!(h.step(&readable(&[]), secs(t0, 350)), None);
        assert!(!h.is_healthy());
        assert!(h.step(&readable(&[]), secs(t0, 500)).is_some());
        assert!(h.is_healthy());
    }

    #[test]
    fn an_application_xid_does_not_restart_the_quiet_time() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        h.step(&readable(&[79]), t0);
        assert_eq!(h.step(&readable(&[13]), secs(t0, 200)), None);
        assert!(h.step(&readable(&[]), secs(t0, 300)).is_some());
    }

    #[test]
    fn quiet_time_of_a_lost_gpu_starts_when_it_reads_again() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        h.step(&lost(), t0);
        assert_eq!(h.step(&lost(), secs(t0, 600)), None);
        // Readable from t=610: the lost time before does not count as quiet.
        assert_eq!(h.step(&readable(&[]), secs(t0, 610)), None);
        assert_eq!(h.step(&readable(&[]), secs(t0, 909)), None);
        assert!(!h.is_healthy());
        assert!(h.step(&readable(&[]), secs(t0, 910)).is_some());
        assert!(h.is_healthy());
    }

    #[test]
    fn lost_again_while_recovering_stops_the_recovery() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        h.step(&readable(&[79]), t0);
        h.step(&lost(), secs(t0, 100));
        assert!(h.reason().unwrap().contains("lost"));
        assert_eq!(h.step(&readable(&[]), secs(t0, 300)), None);
        assert_eq!(h.step(&readable(&[]), secs(t0, 599)), None);
        assert!(h.step(&readable(&[]), secs(t0, 600)).is_some());
    }

    #[test]
    fn zero_quiet_time_recovers_on_the_first_quiet_observation() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(Duration::ZERO);
        h.step(&lost(), t0);
        assert!(h.step(&readable(&[]), secs(t0, 1)).is_some());
        assert!(h.is_healthy());
    }

    #[test]
    fn unhealthy_again_after_recovering() {
        let t0 = Instant::now();
        let mut h = GpuHealth::new(QUIET);
        h.step(&readable(&[79]), t0);
        h.step(&readable(&[]), secs(t0, 300));
        assert!(h.is_healthy());
        assert_eq!(
            h.step(&readable(&[79]), secs(t0, 310)),
            Some(HealthChange::BecameUnhealthy {
                reason: "XID 79".into()
            })
        );
    }

    #[test]
    fn the_node_keeps_gpus_apart_by_uuid() {
        let t0 = Instant::now();
        let mut node = NodeGpuHealth::new(QUIET);
        assert!(node.step("GPU-a", &readable(&[79]), t0).is_some());
        assert_eq!(node.step("GPU-b", &readable(&[]), t0), None);
        assert!(!node.get("GPU-a").unwrap().is_healthy());
        assert!(node.get("GPU-b").unwrap().is_healthy());
        assert!(node.get("GPU-c").is_none());
    }

    #[test]
    fn changes_read_as_sentences() {
        let change = HealthChange::BecameUnhealthy {
            reason: "XID 79".into(),
        };
        assert_eq!(change.to_string(), "unhealthy: XID 79");
        let change = HealthChange::BecameHealthy {
            was: "XID 79".into(),
        };
        assert_eq!(change.to_string(), "healthy again (was: XID 79)");
    }
}
