//! Run-time estimates learned from finished jobs, for planning reservations when a job declares
//! no run time (`activeDeadlineSeconds`). Pure: the caller records finished jobs' run times
//! under keys of its choosing (most specific first, e.g. queue and size, then queue) and asks
//! for an estimate under the same keys; the answer is a high quantile of the most specific key
//! with enough history, and says where it came from.

use std::collections::{HashMap, VecDeque};

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

/// Finished jobs' run times per key, the last `window` of each.
#[derive(Debug, Clone)]
pub struct RuntimeEstimator {
    quantile: f64,
    min_samples: usize,
    window: usize,
    by_key: HashMap<String, VecDeque<f64>>,
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
            by_key: HashMap::new(),
        })
    }

    /// Records a finished job's run time under each of its keys.
    pub fn record(&mut self, keys: &[String], seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        for key in keys {
            let runs = self.by_key.entry(key.clone()).or_default();
            if runs.len() == self.window {
                runs.pop_front();
            }
            runs.push_back(seconds);
        }
    }

    /// The estimate under the first key (most specific) with enough finished jobs.
    pub fn estimate(&self, keys: &[String]) -> Option<Estimate> {
        keys.iter().find_map(|key| {
            let runs = self.by_key.get(key)?;
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
