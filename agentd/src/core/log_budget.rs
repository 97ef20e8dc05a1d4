//! The overall bound on job logs (`jobs.logs_max_total_bytes`). Each replica's log is bounded
//! by rotation; this bounds them together, which matters because they share the state
//! directory's disk with the database: past the budget, the logs of the jobs that finished
//! first are deleted, whole, down to nine tenths of the budget (so that the next check does not
//! find it full again at once). Logs of jobs still running are never touched.
//!
//! A check costs what the running jobs' logs cost to measure, not the whole history: the logs
//! of all finished jobs are counted once, then each job's once, at the first check after it
//! finished (the core tells it which jobs finished since the last check, so a job that started
//! and ended between two checks is counted too), and the whole count is made again only when
//! that sum and the running logs together reach the budget. The sum only ever overstates
//! (pruning and removals delete logs behind its back), so the budget is never exceeded
//! unnoticed; at worst a whole count comes early. It walks the file system, so the core runs it
//! off its own task.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bytes under `dir`, files only, not following links.
fn size_of(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size_of(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The logs under one root, kept within a budget check after check.
#[derive(Debug)]
pub struct LogBudget {
    root: PathBuf,
    budget: u64,
    /// Bytes of finished jobs' logs, at most: the last whole count's, plus each job that
    /// finished since. `None` until the first whole count.
    finished: Option<u64>,
    /// The jobs whose logs could still grow at the last check.
    busy: BTreeSet<String>,
    /// Whole counts made, for tests.
    whole_counts: u64,
}

impl LogBudget {
    pub fn new(root: PathBuf, budget: u64) -> Self {
        Self {
            root,
            budget,
            finished: None,
            busy: BTreeSet::new(),
            whole_counts: 0,
        }
    }

    /// The bound, in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// How many checks counted every log.
    #[cfg(test)]
    pub fn whole_counts(&self) -> u64 {
        self.whole_counts
    }

    /// One check. `busy`: the jobs whose logs may still grow (active, or finished with processes
    /// left). `finished_since`: the jobs that finished since the last check, or `None` when
    /// there were too many to name (everything is counted again). `finished_oldest_first` lists
    /// every finished job whose logs may be on disk; it is called only for a whole count.
    /// Returns the jobs whose logs were deleted.
    pub fn check<E>(
        &mut self,
        busy: BTreeSet<String>,
        finished_since: Option<Vec<String>>,
        finished_oldest_first: impl FnOnce() -> Result<Vec<String>, E>,
    ) -> Result<Vec<String>, E> {
        let running: u64 = busy.iter().map(|job| size_of(&self.root.join(job))).sum();
        match (finished_since, &mut self.finished) {
            (None, _) => self.finished = None,
            (Some(names), Some(finished)) => {
                // Once each: a job may have been busy at the last check and be named here too.
                let mut done: BTreeSet<&String> = self.busy.difference(&busy).collect();
                done.extend(names.iter().filter(|name| !busy.contains(*name)));
                *finished += done
                    .iter()
                    .map(|job| size_of(&self.root.join(job)))
                    .sum::<u64>();
            }
            // Not counted yet: this check counts everything.
            (Some(_), None) => {}
        }
        self.busy = busy;
        if self
            .finished
            .is_some_and(|finished| finished + running <= self.budget)
        {
            return Ok(Vec::new());
        }
        let mut names = finished_oldest_first()?;
        names.retain(|name| !self.busy.contains(name));
        self.whole_counts += 1;
        let (removed, total) = enforce(&self.root, &names, self.budget);
        self.finished = Some(total.saturating_sub(running));
        Ok(removed)
    }
}

/// Deletes the log directories of `finished` jobs (oldest first) under `logs_root` while all
/// job logs there are over `budget` bytes, until they fit in nine tenths of it. Returns the
/// jobs whose logs went and the bytes left.
pub fn enforce(
    logs_root: &Path,
    finished_oldest_first: &[String],
    budget: u64,
) -> (Vec<String>, u64) {
    let mut total = size_of(logs_root);
    let mut removed = Vec::new();
    if total <= budget {
        return (removed, total);
    }
    let low_water = budget / 10 * 9;
    for name in finished_oldest_first {
        if total <= low_water {
            break;
        }
        let dir: PathBuf = logs_root.join(name);
        let size = size_of(&dir);
        if size == 0 {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                total = total.saturating_sub(size);
                removed.push(name.clone());
            }
            Err(e) => tracing::warn!(dir = %dir.display(), "cannot delete an old job log: {e}"),
        }
    }
    if total > budget {
        tracing::warn!(
            total,
            budget,
            "job logs are over jobs.logs_max_total_bytes with only running jobs' logs left"
        );
    }
    (removed, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(root: &Path, job: &str, bytes: usize) {
        std::fs::create_dir_all(root.join(job)).unwrap();
        std::fs::write(root.join(job).join("worker-0.log"), vec![b'x'; bytes]).unwrap();
    }

    #[test]
    fn the_oldest_finished_logs_go_first_and_running_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        log(root, "old", 4000);
        log(root, "newer", 4000);
        log(root, "newest", 4000);
        log(root, "running", 4000);
        let finished = ["old", "newer", "newest"].map(String::from);
        assert_eq!(enforce(root, &finished, 16_000), (Vec::new(), 16_000));
        assert_eq!(
            enforce(root, &finished, 9_000),
            (vec!["old".to_owned(), "newer".to_owned()], 8_000)
        );
        assert!(!root.join("old").exists() && !root.join("newer").exists());
        assert!(root.join("newest").exists() && root.join("running").exists());
        // Only running logs left over the budget: they stay.
        assert_eq!(
            enforce(root, &finished[2..], 1_000),
            (vec!["newest".to_owned()], 4_000)
        );
        assert!(root.join("running/worker-0.log").exists());
    }

    #[test]
    fn past_the_budget_logs_go_down_to_nine_tenths_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for job in ["a", "b", "c", "d"] {
            log(root, job, 4000);
        }
        let finished = ["a", "b", "c", "d"].map(String::from);
        // 16,000 over 12,000: deleting `a` would just fit (12,000), but not 10,800.
        let (removed, left) = enforce(root, &finished, 12_000);
        assert_eq!(
            (removed, left),
            (vec!["a".to_owned(), "b".to_owned()], 8_000)
        );
    }

    #[test]
    fn a_check_measures_running_logs_and_counts_everything_only_near_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        log(root, "a", 4000);
        log(root, "b", 4000);
        log(root, "r", 1000);
        let mut budget = LogBudget::new(root.to_owned(), 20_000);
        let busy = |jobs: &[&str]| {
            jobs.iter()
                .map(|j| (*j).to_owned())
                .collect::<BTreeSet<_>>()
        };
        let listed = |jobs: &[&str]| Ok::<_, ()>(jobs.iter().map(|j| (*j).to_owned()).collect());
        let unlisted = || -> Result<Vec<String>, ()> { panic!("a whole count under the budget") };

        let none = || Some(Vec::new());
        // The first check counts everything.
        assert_eq!(
            budget.check(busy(&["r"]), none(), || listed(&["a", "b"])),
            Ok(vec![])
        );
        assert_eq!(budget.whole_counts, 1);
        // Then running logs are measured, finished ones not listed again.
        assert_eq!(budget.check(busy(&["r"]), none(), unlisted), Ok(vec![]));
        log(root, "r", 9000);
        assert_eq!(budget.check(busy(&["r"]), none(), unlisted), Ok(vec![]));
        // `r` finishes (and is named as finished too): its 9,000 bytes join the finished sum
        // once (17,000).
        assert_eq!(
            budget.check(busy(&[]), Some(vec!["r".to_owned()]), unlisted),
            Ok(vec![])
        );
        // A job that ran and finished between two checks is counted from its name: 1,000 more
        // make 18,000, still within the budget.
        log(root, "q", 1000);
        assert_eq!(
            budget.check(busy(&[]), Some(vec!["q".to_owned()]), unlisted),
            Ok(vec![])
        );
        // A new job's 4,000 bytes make 22,000: a whole count deletes the oldest, down to 18,000.
        log(root, "s", 4000);
        assert_eq!(
            budget.check(busy(&["s"]), none(), || listed(&["a", "b", "r", "q"])),
            Ok(vec!["a".to_owned()])
        );
        assert_eq!(budget.whole_counts, 2);
        assert!(!root.join("a").exists() && root.join("b").exists());
        // Logs deleted behind its back (the history's pruning) only make the sum an overstatement.
        std::fs::remove_dir_all(root.join("b")).unwrap();
        assert_eq!(budget.check(busy(&["s"]), none(), unlisted), Ok(vec![]));
        // A failed listing is passed on, and the next check counts again.
        log(root, "s", 8000);
        assert_eq!(budget.check(busy(&["s"]), none(), || Err(())), Err(()));
        assert_eq!(
            budget.check(busy(&["s"]), none(), || listed(&["r", "q"])),
            Ok(vec![])
        );
        assert_eq!(budget.whole_counts, 3);
        // Too many finished to name: everything is counted again.
        assert_eq!(
            budget.check(busy(&["s"]), None, || listed(&["r", "q"])),
            Ok(vec![])
        );
        assert_eq!(budget.whole_counts, 4);
    }
}
