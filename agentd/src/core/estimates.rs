//! Run-time estimates in the agent. A job that declares no `activeDeadlineSeconds` gives the
//! scheduler no end to plan on, so the blocked head's reservation cannot say when it starts and
//! backfill cannot take what would end before then. The agent learns what succeeded jobs took,
//! per user and job, queue and size, and gives such a job the estimate of the most specific of
//! those with enough history ([`RuntimeEstimator`]). An estimate plans; it never stops a job,
//! and once one proves too short the job is planned as one with no known end ([`planned_end`]).
//!
//! A job gets its estimate when it enters the queue (or, found holding resources after a
//! restart of the agent, when first seen) and keeps it while it runs, so the scheduler is told
//! one run time per start and the reason a person reads names where it came from.

use std::collections::HashMap;
use std::fmt::Write as _;

use agentd_api::history::HistoryEntry;
use agentd_api::jobs::{JobState, JobStatus};

use super::record::JobRecord;
use crate::config::SchedulerConfig;
use crate::sched;
use crate::sched::{Estimate, RuntimeEstimator, planned_end};
use crate::store::{Cursor, History, HistoryFilter, MAX_PAGE};

/// The most keys (users and jobs) run times are kept for; beyond, the key recorded under
/// longest ago is forgotten first.
const MAX_KEYS: usize = 10_000;

/// Succeeded jobs read back from the history when the agent starts.
pub(super) const FROM_HISTORY: usize = 5_000;

/// What the estimator learned, and the estimate each queued or running job was given.
pub(super) struct Estimates {
    estimator: RuntimeEstimator,
    /// By job: the record it was given to (its serial) and the estimate, or none if its keys
    /// had too little history then.
    given: HashMap<String, (u64, Option<Estimate>)>,
}

impl Estimates {
    /// `None` when the configuration turns estimates off.
    pub fn new(config: &SchedulerConfig) -> Option<Self> {
        if !config.estimate_runtimes {
            return None;
        }
        // The configuration was checked when it was read.
        let estimator = RuntimeEstimator::new(
            config.estimate_quantile,
            config.estimate_min_samples as usize,
            config.estimate_window as usize,
        )
        .ok()?
        .with_max_keys(MAX_KEYS);
        Some(Self {
            estimator,
            given: HashMap::new(),
        })
    }

    /// Learns a finished job's run time, if it succeeded: a failed job's time says little of
    /// how long the next run holds its GPUs.
    pub fn learn(&mut self, status: &JobStatus) {
        let (Some(started), Some(finished)) = (status.started_at, status.finished_at) else {
            return;
        };
        if status.state != JobState::Succeeded {
            return;
        }
        let gpus: usize = status.replicas.iter().map(|r| r.gpu_indices.len()).sum();
        let keys = keys(
            status.owner.as_ref().map(|o| o.user.as_str()),
            status.template.as_ref().map(|t| t.name.as_str()),
            &status.name,
            &status.queue,
            u32::try_from(gpus).unwrap_or(u32::MAX),
        );
        self.estimator.record(&keys, finished - started);
    }

    /// Learns from a job of the history (the agent starting again).
    pub fn learn_entry(&mut self, entry: &HistoryEntry) {
        if entry.state != JobState::Succeeded || entry.started_at.is_none() {
            return;
        }
        let keys = keys(
            entry.user.as_deref(),
            entry.template.as_ref().map(|t| t.name.as_str()),
            &entry.name,
            &entry.queue,
            entry.gpus,
        );
        self.estimator.record(&keys, entry.run_seconds);
    }

    /// Learns what the agent knew before it started: the succeeded jobs of the history, the
    /// latest [`FROM_HISTORY`] of them, where the store keeps one; else the finished jobs it
    /// restored. A history that cannot be read leaves the estimates to learn from new jobs.
    pub fn learn_past<'a>(
        &mut self,
        history: Option<&History>,
        finished: impl Iterator<Item = &'a JobRecord>,
    ) {
        let Some(history) = history else {
            let mut done: Vec<&JobStatus> = finished.map(|r| &r.status).collect();
            done.sort_by(|a, b| {
                let at = |s: &JobStatus| s.finished_at.unwrap_or(0.0);
                at(a).total_cmp(&at(b))
            });
            for status in done {
                self.learn(status);
            }
            return;
        };
        let filter = HistoryFilter {
            state: Some(JobState::Succeeded),
            ..HistoryFilter::default()
        };
        let mut entries = Vec::new();
        let mut cursor = None;
        while entries.len() < FROM_HISTORY {
            let page = match history.page(&filter, cursor, MAX_PAGE) {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!("run-time estimates start without the history: {e}");
                    return;
                }
            };
            entries.extend(page.jobs);
            cursor = page.next_cursor.as_deref().and_then(Cursor::parse);
            if cursor.is_none() {
                break;
            }
        }
        entries.truncate(FROM_HISTORY);
        // Newest first there; learned oldest first, as they finished.
        for entry in entries.iter().rev() {
            self.learn_entry(entry);
        }
    }

    /// Gives a job that enters the queue its estimate, now; `None` when none of its keys has
    /// enough history, and the job then keeps none until it enters the queue again.
    pub fn give(&mut self, record: &JobRecord) -> Option<f64> {
        let status = &record.status;
        let keys = keys(
            status.owner.as_ref().map(|o| o.user.as_str()),
            status.template.as_ref().map(|t| t.name.as_str()),
            &status.name,
            &status.queue,
            crate::job::total_gpus(&record.job),
        );
        let estimate = self.estimator.estimate(&keys);
        let seconds = estimate.as_ref().map(|e| e.seconds);
        self.given
            .insert(status.name.clone(), (record.serial, estimate));
        seconds
    }

    /// What this record was given (`None`: it got no estimate), if it was asked for one.
    fn entry(&self, record: &JobRecord) -> Option<&(u64, Option<Estimate>)> {
        self.given
            .get(&record.status.name)
            .filter(|(serial, _)| *serial == record.serial)
    }

    /// The estimate this record was given, if any.
    pub fn given(&self, record: &JobRecord) -> Option<&Estimate> {
        self.entry(record)?.1.as_ref()
    }

    /// When a running job that declared no run time is planned to end: from its estimate (given
    /// now if it was never asked for one, as for a job found running when the agent started,
    /// so that a job without one is not looked up again at every pass); `None` once it has run
    /// past it.
    pub fn planned_end(&mut self, record: &JobRecord, now: f64) -> Option<f64> {
        if self.entry(record).is_none() {
            self.give(record);
        }
        self.planned_end_given(record, now)
    }

    /// [`Self::planned_end`] without giving an estimate: what the scheduler was told.
    pub fn planned_end_given(&self, record: &JobRecord, now: f64) -> Option<f64> {
        let seconds = self.given(record)?.seconds;
        planned_end(record.status.started_at?, seconds, now)
    }

    /// Forgets the estimate of a job that is neither queued nor running any more.
    pub fn forget(&mut self, name: &str) {
        self.given.remove(name);
    }

    #[cfg(test)]
    pub fn learned_keys(&self) -> usize {
        self.estimator.keys()
    }
}

/// The most jobs whose estimated end a reason names; the rest are counted.
const NAMED_IN_REASON: usize = 3;

/// Says in waiting jobs' reasons where the run times their wait was planned on came from, when
/// they are estimates: the ends each reservation waits for, and the run time of a job kept back
/// so as not to delay one. `estimate_of` answers for a job by name.
pub(super) fn explain<'a>(
    waiting: &mut [sched::Waiting],
    reservations: &[sched::Reservation],
    estimate_of: impl Fn(&str) -> Option<(&'a Estimate, Overran)>,
) {
    for w in waiting {
        let mut message = String::new();
        if let Some(r) = reservations.iter().find(|r| r.gang == w.gang) {
            let estimated: Vec<(&str, &Estimate, Overran)> = r
                .after
                .iter()
                .filter_map(|job| {
                    let (e, overran) = estimate_of(job)?;
                    Some((job.as_str(), e, overran))
                })
                .collect();
            for (job, e, overran) in estimated.iter().take(NAMED_IN_REASON) {
                if *overran {
                    let _ = write!(
                        message,
                        "; {job} has run past its estimate ({}, from the {}), so when it ends is not known",
                        human(e.seconds),
                        e.source()
                    );
                } else {
                    let _ = write!(
                        message,
                        "; {job}'s end is estimated from the {}",
                        e.source()
                    );
                }
            }
            if estimated.len() > NAMED_IN_REASON {
                let _ = write!(
                    message,
                    "; and the ends of {} more are estimated",
                    estimated.len() - NAMED_IN_REASON
                );
            }
        } else if w.reason == sched::reason::RESERVED
            && let Some((e, _)) = estimate_of(&w.gang)
        {
            let _ = write!(
                message,
                "; its run time is estimated at {} from the {}",
                human(e.seconds),
                e.source()
            );
        }
        if !message.is_empty() {
            w.message = format!("{}{message}", w.message).into();
        }
    }
}

/// Whether a running job has run past its estimate.
pub(super) type Overran = bool;

/// A run time as a person reads it: `1h23m`, `10m00s`, `40s`.
fn human(seconds: f64) -> String {
    let s = seconds.round().max(0.0) as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// The keys a job's run time is learned and looked up under, most specific first: its user
/// and job (the template it was made from, else its name without trailing run numbers) with
/// its queue and GPUs; then the queue and GPUs; then the queue.
fn keys(
    user: Option<&str>,
    template: Option<&str>,
    name: &str,
    queue: &str,
    gpus: u32,
) -> Vec<String> {
    let mut keys = Vec::with_capacity(3);
    if let Some(user) = user {
        let job = match template {
            Some(t) => format!("template={t}"),
            None => format!("job={}", name_stem(name)),
        };
        keys.push(format!("user={user},{job},queue={queue},gpus={gpus}"));
    }
    keys.push(format!("queue={queue},gpus={gpus}"));
    keys.push(format!("queue={queue}"));
    keys
}

/// A job name without the run numbers users append: `bert-large-17` and `bert-large-2026-12-01`
/// are `bert-large`; `resnet50` stays `resnet50`.
fn name_stem(name: &str) -> &str {
    let mut stem = name;
    while let Some(at) = stem.rfind(['-', '_', '.'])
        && at > 0
        && stem[at + 1..].bytes().all(|b| b.is_ascii_digit())
        && at + 1 < stem.len()
    {
        stem = &stem[..at];
    }
    stem
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_numbers_are_not_part_of_the_job() {
        assert_eq!(name_stem("bert-large-17"), "bert-large");
        assert_eq!(name_stem("bert-large-2026-12-01"), "bert-large");
        assert_eq!(name_stem("resnet50"), "resnet50");
        assert_eq!(name_stem("run_3.1"), "run");
        assert_eq!(name_stem("-17"), "-17");
        assert_eq!(name_stem("a-"), "a-");
    }

    #[test]
    fn run_times_read_as_hours_minutes_or_seconds() {
        assert_eq!(human(5000.0), "1h23m");
        assert_eq!(human(600.0), "10m00s");
        assert_eq!(human(39.6), "40s");
    }

    #[test]
    fn keys_go_from_the_user_and_job_to_the_queue() {
        assert_eq!(
            keys(Some("alice"), None, "bert-3", "fast", 8),
            [
                "user=alice,job=bert,queue=fast,gpus=8",
                "queue=fast,gpus=8",
                "queue=fast"
            ]
        );
        assert_eq!(
            keys(Some("alice"), Some("bert"), "bert-x7k2p", "slow", 0)[0],
            "user=alice,template=bert,queue=slow,gpus=0"
        );
        assert_eq!(keys(None, None, "a", "fast", 1).len(), 2);
    }
}
