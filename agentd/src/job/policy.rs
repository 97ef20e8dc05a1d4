//! The rules that decide what happens when replicas end: restart or fail (per restart policy),
//! whether the job has succeeded (per success policy), and how long to wait before a restart.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{ReplicaType, RestartPolicy, SuccessPolicy, TrainingJob};

/// How a replica's process (or container) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitOutcome {
    /// The exit status, when it exited on its own.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// The kernel's (or kubelet's) OOM killer ended it.
    pub oom_killed: bool,
}

impl ExitOutcome {
    pub fn exited(code: i32) -> Self {
        Self {
            code: Some(code),
            ..Self::default()
        }
    }

    pub fn signalled(signal: i32) -> Self {
        Self {
            signal: Some(signal),
            ..Self::default()
        }
    }

    pub fn oom() -> Self {
        Self {
            signal: Some(9),
            oom_killed: true,
            ..Self::default()
        }
    }

    /// The exit code as a shell reports it: a signal `s` is `128 + s`.
    pub fn effective_code(&self) -> Option<i32> {
        self.code.or(self.signal.map(|s| 128 + s))
    }
}

/// Why the platform, not the program, ended a replica (cluster mode: what the pod's status and
/// the kubelet's events say). Each has its handling ([`PlatformFailure::fails_job`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PlatformFailure {
    /// Its pod's volumes did not mount within `cluster.mount_timeout`: a missing claim or
    /// secret, which another node or a restart rarely fixes.
    VolumeMountFailed,
    /// Its image could not be pulled within `cluster.image_pull_timeout`.
    ImagePullFailed,
    /// A container of its pod was not created within `cluster.mount_timeout` because its
    /// environment names a Secret or ConfigMap, or a key of one, that does not exist (the
    /// kubelet's `CreateContainerConfigError`): another node or a restart does not make it.
    ContainerConfigFailed,
    /// Its pod was evicted or preempted by the node.
    Evicted,
    /// The node's kubelet refused the pod at admission (`UnexpectedAdmissionError`,
    /// `OutOf<resource>`): the node could not give what it had said it had.
    NodeRefused,
    /// Its node stopped answering: not Ready, or its kubelet's Lease expired, for longer than
    /// `cluster.node_lost_grace`. Counted like an eviction: a job can take its own node down
    /// (memory pressure that kills the kubelet, a driver fault), and the count stops it from
    /// doing that to every node in turn.
    NodeLost,
}

impl PlatformFailure {
    pub const ALL: [Self; 6] = [
        Self::VolumeMountFailed,
        Self::ImagePullFailed,
        Self::ContainerConfigFailed,
        Self::Evicted,
        Self::NodeRefused,
        Self::NodeLost,
    ];

    /// The job's reason code, and the metric's `reason` label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::VolumeMountFailed => "VolumeMountFailed",
            Self::ContainerConfigFailed => "ContainerConfigFailed",
            Self::ImagePullFailed => "ImagePullFailed",
            Self::Evicted => "Evicted",
            Self::NodeRefused => "NodeRefused",
            Self::NodeLost => "NodeLost",
        }
    }

    /// Whether the job fails at once (whatever its restart policy): what retrying cannot fix.
    /// Otherwise the gang restarts, counted against `backoffLimit`, under every restart policy
    /// (an eviction or a refusal is not the program's verdict, so `Never` does not apply).
    pub fn fails_job(self) -> bool {
        matches!(
            self,
            Self::VolumeMountFailed | Self::ImagePullFailed | Self::ContainerConfigFailed
        )
    }

    /// The class of a pod that failed as a whole (`status.reason`), if it is one of these.
    pub fn of_pod_reason(reason: &str) -> Option<Self> {
        match reason {
            "Evicted" | "Preempting" | "Preempted" | "Terminated" | "Shutdown" | "NodeShutdown" => {
                Some(Self::Evicted)
            }
            // Not `NodeAffinity`: a template whose required affinity no node meets is the
            // job's doing, and must not close the nodes it was bound to.
            "UnexpectedAdmissionError" => Some(Self::NodeRefused),
            // The node controller's word for a pod whose node stopped answering.
            "NodeLost" => Some(Self::NodeLost),
            r if r.starts_with("OutOf") => Some(Self::NodeRefused),
            _ => None,
        }
    }
}

/// A replica the platform ended, with the platform's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformEnd {
    pub failure: PlatformFailure,
    /// What Kubernetes said, quoted, with the pod (and the volume or image) named.
    pub message: String,
    /// Whether its program had started: an end after it ran, else a launch that never ran.
    pub ran: bool,
}

/// What to do about one replica that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// It finished its work (exit 0).
    Success,
    /// Restart the whole gang (counted against `backoffLimit`).
    Restart,
    /// A permanent failure: the job fails.
    Fail,
}

/// Decides what one replica's end means under its group's restart policy.
///
/// - Exit 0 is success under every policy: a replica that finished is not run again.
/// - `Never`: any failure fails the job.
/// - `OnFailure`: failures restart, except OOM, which would recur with the same memory.
/// - `Always`: every failure restarts, OOM included.
/// - `ExitCode` (Kubeflow's rule): codes 1–127 are the program's own verdict and permanent;
///   128–255 (killed by a signal, e.g. preempted or SIGKILLed) are retryable; OOM is permanent.
///
/// An end with neither code nor signal (the process was lost) counts as retryable, since nothing
/// says the program itself failed.
pub fn restart_decision(policy: RestartPolicy, exit: ExitOutcome) -> RestartDecision {
    let code = exit.effective_code();
    if code == Some(0) && !exit.oom_killed {
        return RestartDecision::Success;
    }
    let retry_if = |retryable: bool| {
        if retryable {
            RestartDecision::Restart
        } else {
            RestartDecision::Fail
        }
    };
    match policy {
        RestartPolicy::Never => RestartDecision::Fail,
        RestartPolicy::Always => RestartDecision::Restart,
        RestartPolicy::OnFailure => retry_if(!exit.oom_killed),
        RestartPolicy::ExitCode => {
            retry_if(!exit.oom_killed && code.is_none_or(|c| !(1..=127).contains(&c)))
        }
    }
}

/// Has the job succeeded, given the replicas that have succeeded so far?
///
/// Kubeflow's rule: with a chief (or master), the job succeeds when it does, whatever the success
/// policy; without one, `""` needs worker 0 and `AllWorkers` needs every worker.
pub fn job_succeeded(job: &TrainingJob, succeeded: &BTreeSet<(ReplicaType, u32)>) -> bool {
    let specs = &job.spec.replica_specs;
    let all_of = |t: ReplicaType| {
        specs
            .get(&t)
            .is_some_and(|s| s.replicas > 0 && (0..s.replicas).all(|i| succeeded.contains(&(t, i))))
    };
    if let Some(chief) = [ReplicaType::Chief, ReplicaType::Master]
        .into_iter()
        .find(|t| specs.contains_key(t))
    {
        return all_of(chief);
    }
    match job.spec.success_policy {
        SuccessPolicy::AllWorkers => all_of(ReplicaType::Worker),
        SuccessPolicy::Default => {
            specs.contains_key(&ReplicaType::Worker)
                && succeeded.contains(&(ReplicaType::Worker, 0))
        }
    }
}

/// The message of a job's success, naming the replica (or replicas) whose success decided it by
/// [`job_succeeded`]'s rule, given the replica whose end was the last one needed (`last`).
pub fn success_message(job: &TrainingJob, last: &str) -> String {
    let specs = &job.spec.replica_specs;
    let decider = [ReplicaType::Chief, ReplicaType::Master]
        .into_iter()
        .find(|t| specs.contains_key(t));
    let decided_by = match (decider, job.spec.success_policy) {
        (Some(chief), _) => format!("{} completed", super::replica_name(chief, 0)),
        (None, SuccessPolicy::Default) => {
            format!("{} completed", super::replica_name(ReplicaType::Worker, 0))
        }
        (None, SuccessPolicy::AllWorkers) => {
            let n = specs.get(&ReplicaType::Worker).map_or(0, |s| s.replicas);
            return format!(
                "all {n} workers completed (successPolicy AllWorkers; the last was {last}), which \
                 completes the job"
            );
        }
    };
    let deciding = decided_by.trim_end_matches(" completed");
    if deciding == last {
        format!("{decided_by}, which completes the job")
    } else {
        format!("{last} completed; {decided_by}, which completes the job")
    }
}

/// The wait before the first restart.
pub const BACKOFF_BASE: Duration = Duration::from_secs(10);
/// The longest wait between restarts.
pub const BACKOFF_CAP: Duration = Duration::from_mins(5);

/// How long to wait before the next restart of a gang that has restarted `restarts` times so far:
/// 10 s, doubled with each restart, at most 5 minutes (the kubelet's crash-loop back-off).
pub fn backoff_delay(restarts: u32) -> Duration {
    let factor = 1u32.checked_shl(restarts).unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use RestartDecision::{Fail, Restart, Success};
    use RestartPolicy::{Always, ExitCode, Never, OnFailure};

    #[test]
    fn exit_zero_is_success_under_every_policy() {
        for p in [Never, OnFailure, Always, ExitCode] {
            assert_eq!(
                restart_decision(p, ExitOutcome::exited(0)),
                Success,
                "{p:?}"
            );
        }
    }

    #[test]
    fn never_fails_on_any_failure() {
        for exit in [
            ExitOutcome::exited(1),
            ExitOutcome::exited(137),
            ExitOutcome::signalled(15),
            ExitOutcome::oom(),
            ExitOutcome::default(),
        ] {
            assert_eq!(restart_decision(Never, exit), Fail, "{exit:?}");
        }
    }

    #[test]
    fn on_failure_restarts_except_after_oom() {
        assert_eq!(restart_decision(OnFailure, ExitOutcome::exited(1)), Restart);
        assert_eq!(
            restart_decision(OnFailure, ExitOutcome::signalled(9)),
            Restart
        );
        assert_eq!(restart_decision(OnFailure, ExitOutcome::oom()), Fail);
    }

    #[test]
    fn always_restarts_even_after_oom() {
        assert_eq!(restart_decision(Always, ExitOutcome::exited(2)), Restart);
        assert_eq!(restart_decision(Always, ExitOutcome::oom()), Restart);
    }

    #[test]
    fn exit_code_rule_splits_at_128() {
        for code in [1, 2, 126, 127] {
            assert_eq!(
                restart_decision(ExitCode, ExitOutcome::exited(code)),
                Fail,
                "{code}"
            );
        }
        for code in [128, 130, 137, 143, 255] {
            assert_eq!(
                restart_decision(ExitCode, ExitOutcome::exited(code)),
                Restart,
                "{code}"
            );
        }
        // Killed by SIGTERM: 143, retryable.
        assert_eq!(
            restart_decision(ExitCode, ExitOutcome::signalled(15)),
            Restart
        );
        // OOM is permanent even though its code (137) is in the retryable range.
        let oom_137 = ExitOutcome {
            code: Some(137),
            signal: None,
            oom_killed: true,
        };
        assert_eq!(restart_decision(ExitCode, oom_137), Fail);
        assert_eq!(restart_decision(ExitCode, ExitOutcome::default()), Restart);
    }

    #[test]
    fn backoff_doubles_from_ten_seconds_to_five_minutes() {
        let secs: Vec<u64> = (0..8).map(|r| backoff_delay(r).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_CAP);
        assert_eq!(backoff_delay(40), BACKOFF_CAP);
    }
}
