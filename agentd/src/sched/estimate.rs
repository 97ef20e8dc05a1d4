//! Run-time estimates learned from finished jobs, for planning reservations when a job declares
//! no run time (`activeDeadlineSeconds`). Pure: the caller records finished jobs' run times
//! under keys of its choosing (most specific first, e.g. queue and size, then queue) and asks
//! for an estimate under the same keys; the answer is a high quantile of the most specific key
//! with enough history, and says where it came from.

use std::collections::{HashMap, VecDeque};

/// The quantile of finished run times taken as the estimate: conservative, so that a
/// reservation is rarely planned on an end that comes too early.
pub const ESTIMATE_QUANTILE: f64 = 0.9;
/// Finished jobs a key needs before its estimate is used.
pub const ESTIMATE_MIN_SAMPLES: usize = 5;
/// Finished jobs kept per key.
pub const ESTIMATE_WINDOW: usize = 200;

/// Errors from configuring the estimator.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EstimateError {
    #[error("run-time estimate quantile {value} is out of range; allowed: above 0 and at most 1")]
    Quantile { value: f64 },
    #[error(
        "run-time estimates need at least {min_samples} finished jobs but keep only {window}; allowed: 1 <= min_samples <= window"
    )]
    Window { min_samples: usize, window: usize },
}

/// An estimated run time and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub seconds: f64,
    /// How many finished jobs it was drawn from.
    pub samples: usize,
    /// The key those jobs shared.
    pub key: String,
    pub quantile: f64,
}

impl Estimate {
    /// "p90 of the last 40 finished jobs with queue=fast,gpus=8".
    pub fn source(&self) -> String {
        format!(
            "p{:.0} of the last {} finished jobs with {}",
            self.quantile * 100.0,
            self.samples,
            self.key
        )
    }
}

/// When a gang that started at `start`, with its run time estimated at `estimate`, is to be
/// planned to end, seen at `now`: at `start + estimate` while that is ahead, and not at all once
/// it has passed. A gang that runs past its estimate is planned as one that declared no run
/// time: the reservations waiting on it have no start time, so nothing is let onto their
/// resources on the strength of an estimate that already proved too short (planning it at some
/// later guess instead lets more in, and the gangs waiting on it pay for each miss).
pub fn planned_end(start: f64, estimate: f64, now: f64) -> Option<f64> {
    let end = start + estimate;
    (end > now).then_some(end)
}

/// Finished jobs' run times per key, the last `window` of each, for at most `max_keys` keys.
#[derive(Debug, Clone)]
pub struct RuntimeEstimator {
    quantile: f64,
    min_samples: usize,
    window: usize,
    max_keys: usize,
    /// Each key's run times and the record count when it was last recorded under.
    by_key: HashMap<String, (VecDeque<f64>, u64)>,
    records: u64,
}

impl RuntimeEstimator {
    pub fn new(quantile: f64, min_samples: usize, window: usize) -> Result<Self, EstimateError> {
        if !(quantile > 0.0 && quantile <= 1.0) {
            return Err(EstimateError::Quantile { value: quantile });
        }
        if min_samples == 0 || min_samples > window {
            return Err(EstimateError::Window {
                min_samples,
                window,
            });
        }
        Ok(RuntimeEstimator {
            quantile,
            min_samples,
            window,
            max_keys: usize::MAX,
            by_key: HashMap::new(),
            records: 0,
        })
    }

    /// Keeps at most `max_keys` keys: a new key beyond them replaces the one recorded under
    /// longest ago, so that jobs of ever new names cannot grow the estimator without bound.
    #[must_use]
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// How many keys it holds run times for.
    pub fn keys(&self) -> usize {
        self.by_key.len()
    }

    /// Records a finished job's run time under each of its keys.
    pub fn record(&mut self, keys: &[String], seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        self.records += 1;
        for key in keys {
            if !self.by_key.contains_key(key) && self.by_key.len() >= self.max_keys {
                // Rare (a key not seen before with the bound reached), so a scan will do.
                if let Some(oldest) = self
                    .by_key
                    .iter()
                    .min_by_key(|(_, (_, last))| *last)
                    .map(|(k, _)| k.clone())
                {
                    self.by_key.remove(&oldest);
                }
            }
            let (runs, last) = self.by_key.entry(key.clone()).or_default();
            if runs.len() == self.window {
                runs.pop_front();
            }
            runs.push_back(seconds);
            *last = self.records;
        }
    }

    /// The estimate under the first key (most specific) with enough finished jobs.
    pub fn estimate(&self, keys: &[String]) -> Option<Estimate> {
        keys.iter().find_map(|key| {
            let (runs, _) = self.by_key.get(key)?;
            if runs.len() < self.min_samples {
                return None;
            }
            let mut sorted: Vec<f64> = runs.iter().copied().collect();
            sorted.sort_by(f64::total_cmp);
            // The smallest value at or above the quantile: conservative.
            let rank =
                ((self.quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            Some(Estimate {
                seconds: sorted[rank - 1],
                samples: sorted.len(),
                key: key.clone(),
                quantile: self.quantile,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn quantile_of_the_most_specific_key_with_enough_history() {
        let mut e = RuntimeEstimator::new(0.9, 3, 10).expect("valid");
        let both = keys(&["queue=fast,gpus=8", "queue=fast"]);
        assert_eq!(e.estimate(&both), None);
        for s in [10.0, 20.0, 30.0] {
            e.record(&keys(&["queue=fast,gpus=1", "queue=fast"]), s);
        }
        let est = e.estimate(&both).expect("queue has history");
        assert_eq!((est.seconds, est.samples), (30.0, 3));
        assert_eq!(
            est.source(),
            "p90 of the last 3 finished jobs with queue=fast"
        );
        for s in [
            100.0, 200.0, 300.0, 400.0, 500.0, 600.0, 700.0, 800.0, 900.0, 1000.0, 1100.0,
        ] {
            e.record(&both, s);
        }
        let est = e.estimate(&both).expect("size has history");
        // The window keeps the last 10: 200..=1100; p90 is the 9th of them.
        assert_eq!((est.seconds, est.samples), (1000.0, 10));
        assert_eq!(est.key, "queue=fast,gpus=8");
    }

    #[test]
    fn the_key_recorded_under_longest_ago_goes_first_beyond_the_bound() {
        let mut e = RuntimeEstimator::new(0.5, 1, 10)
            .expect("valid")
            .with_max_keys(2);
        e.record(&keys(&["a"]), 1.0);
        e.record(&keys(&["b"]), 2.0);
        e.record(&keys(&["a"]), 3.0);
        e.record(&keys(&["c"]), 4.0);
        assert_eq!(e.keys(), 2);
        assert!(
            e.estimate(&keys(&["b"])).is_none(),
            "b was recorded under longest ago"
        );
        assert_eq!(e.estimate(&keys(&["a"])).map(|e| e.samples), Some(2));
        assert_eq!(e.estimate(&keys(&["c"])).map(|e| e.seconds), Some(4.0));
    }

    #[test]
    #[allow(clippy::float_cmp)] // whole numbers, exact in f64
    fn an_estimate_that_proved_too_short_plans_no_end() {
        assert_eq!(planned_end(100.0, 50.0, 120.0), Some(150.0));
        assert_eq!(planned_end(100.0, 50.0, 150.0), None);
        assert_eq!(planned_end(100.0, 50.0, 260.0), None);
        assert_eq!(planned_end(100.0, 0.0, 100.0), None);
    }

    #[test]
    fn bad_settings_name_the_field_and_the_range() {
        assert_eq!(
            RuntimeEstimator::new(0.0, 3, 10)
                .err()
                .map(|e| e.to_string()),
            Some(
                "run-time estimate quantile 0 is out of range; allowed: above 0 and at most 1"
                    .to_owned()
            )
        );
        assert!(RuntimeEstimator::new(f64::NAN, 3, 10).is_err());
        assert!(matches!(
            RuntimeEstimator::new(0.9, 11, 10),
            Err(EstimateError::Window { .. })
        ));
    }
}
