//! The lifecycle's jobs, with a note of each one changed since the scheduler's feed last
//! asked. Every change goes through [`Jobs::get_mut`], [`Jobs::insert`] or [`Jobs::remove`],
//! which note the name, so the feed looks only at those jobs instead of every job each pass.
//! The same notes keep the sums the lifecycle asks of every job (replicas held by unfinished
//! jobs, finished jobs by age) up to date, each changed job counted again when one is asked.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Index;

use super::JobRecord;

#[derive(Debug, Default)]
pub struct Jobs {
    map: BTreeMap<String, JobRecord>,
    /// Inserted, removed, or handed out to be changed since [`Jobs::take_changed`].
    changed: HashSet<String>,
    /// What each job counts for in the sums, as of the last count.
    tallied: HashMap<String, Tally>,
    /// Changed since the last count.
    untallied: HashSet<String>,
    /// Replicas of the unfinished jobs.
    held: u64,
    /// The finished jobs, oldest first, those that finished at the same time by name from
    /// last to first (so that newest first is by name).
    finished: BTreeSet<(At, Reverse<String>)>,
}

/// What one job counts for.
#[derive(Debug, Clone, Copy)]
struct Tally {
    /// Its replicas, while it is unfinished.
    replicas: u64,
    /// When it finished (0 if not recorded), once it has.
    finished_at: Option<At>,
}

impl Tally {
    fn of(record: &JobRecord) -> Self {
        if record.is_active() {
            Tally {
                replicas: u64::from(record.job.total_replicas()),
                finished_at: None,
            }
        } else {
            Tally {
                replicas: 0,
                finished_at: Some(At(record.status.finished_at.unwrap_or(0.0))),
            }
        }
    }
}

/// A finish time, ordered as `f64::total_cmp` orders it.
#[derive(Debug, Clone, Copy)]
struct At(f64);

impl Ord for At {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl PartialOrd for At {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for At {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for At {}

impl Jobs {
    pub fn map(&self) -> &BTreeMap<String, JobRecord> {
        &self.map
    }

    pub fn get(&self, name: &str) -> Option<&JobRecord> {
        self.map.get(name)
    }

    pub fn contains_key(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &JobRecord)> {
        self.map.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &JobRecord> {
        self.map.values()
    }

    /// The record to change; noted as changed whether or not it then is.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut JobRecord> {
        let record = self.map.get_mut(name)?;
        note(&mut self.changed, &mut self.untallied, name);
        Some(record)
    }

    pub fn insert(&mut self, name: String, record: JobRecord) -> Option<JobRecord> {
        note(&mut self.changed, &mut self.untallied, &name);
        self.map.insert(name, record)
    }

    pub fn remove(&mut self, name: &str) -> Option<JobRecord> {
        let record = self.map.remove(name)?;
        note(&mut self.changed, &mut self.untallied, name);
        Some(record)
    }

    /// The replicas the unfinished jobs hold between them.
    pub fn held_replicas(&mut self) -> u64 {
        self.tally();
        self.held
    }

    /// How many jobs have finished, and when the one that finished first did.
    pub fn finished(&mut self) -> (usize, Option<f64>) {
        self.tally();
        (
            self.finished.len(),
            self.finished.first().map(|(at, _)| at.0),
        )
    }

    /// The finished jobs, newest first (those that finished at the same time by name), with
    /// when each finished.
    pub fn finished_newest_first(&mut self) -> impl Iterator<Item = (f64, &str)> {
        self.tally();
        self.finished
            .iter()
            .rev()
            .map(|(at, Reverse(name))| (at.0, name.as_str()))
    }

    /// Counts the changed jobs again.
    fn tally(&mut self) {
        for name in self.untallied.drain() {
            if let Some(was) = self.tallied.remove(&name) {
                self.held -= was.replicas;
                if let Some(at) = was.finished_at {
                    self.finished.remove(&(at, Reverse(name.clone())));
                }
            }
            let Some(record) = self.map.get(&name) else {
                continue;
            };
            let now = Tally::of(record);
            self.held += now.replicas;
            if let Some(at) = now.finished_at {
                self.finished.insert((at, Reverse(name.clone())));
            }
            self.tallied.insert(name, now);
        }
    }

    /// The names of the jobs changed since the last call (some may be gone).
    pub fn take_changed(&mut self) -> HashSet<String> {
        std::mem::take(&mut self.changed)
    }
}

fn note(changed: &mut HashSet<String>, untallied: &mut HashSet<String>, name: &str) {
    if !changed.contains(name) {
        changed.insert(name.to_owned());
    }
    if !untallied.contains(name) {
        untallied.insert(name.to_owned());
    }
}

impl Index<&str> for Jobs {
    type Output = JobRecord;

    fn index(&self, name: &str) -> &JobRecord {
        &self.map[name]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::{Clock, ManualClock};

    fn record(name: &str) -> JobRecord {
        let manifest = format!(
            "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 1\n      template: {{spec: {{containers: [{{name: tensorflow, command: [\"true\"]}}]}}}}\n"
        );
        let job = crate::job::parse(manifest.as_bytes()).expect("a valid manifest");
        JobRecord::new(job, String::new(), ManualClock::new(0.0).now())
    }

    fn taken(jobs: &mut Jobs) -> Vec<String> {
        let mut names: Vec<String> = jobs.take_changed().into_iter().collect();
        names.sort();
        names
    }

    #[test]
    fn every_way_to_change_a_job_notes_it_and_reading_does_not() {
        let mut jobs = Jobs::default();
        jobs.insert("a".to_owned(), record("a"));
        jobs.insert("b".to_owned(), record("b"));
        jobs.insert("c".to_owned(), record("c"));
        assert_eq!(taken(&mut jobs), ["a", "b", "c"]);
        assert!(taken(&mut jobs).is_empty(), "taking clears the note");

        assert!(jobs.get("a").is_some() && jobs.contains_key("b"));
        assert_eq!(jobs.iter().count() + jobs.values().count(), 6);
        let _ = &jobs["c"];
        assert!(taken(&mut jobs).is_empty(), "reading changes nothing");

        jobs.get_mut("a").expect("present").launching = 1;
        jobs.remove("b");
        assert!(jobs.get_mut("missing").is_none());
        assert!(jobs.remove("missing").is_none());
        assert_eq!(
            taken(&mut jobs),
            ["a", "b"],
            "nothing is noted for a missing job"
        );
    }

    #[test]
    fn the_sums_follow_every_change() {
        let mut jobs = Jobs::default();
        assert_eq!((jobs.held_replicas(), jobs.finished()), (0, (0, None)));
        for name in ["a", "b", "c"] {
            jobs.insert(name.to_owned(), record(name));
        }
        assert_eq!((jobs.held_replicas(), jobs.finished()), (3, (0, None)));

        let finish = |jobs: &mut Jobs, name: &str, at: f64| {
            let r = jobs.get_mut(name).expect("present");
            r.status.state = agentd_api::jobs::JobState::Succeeded;
            r.status.finished_at = Some(at);
        };
        finish(&mut jobs, "b", 20.0);
        finish(&mut jobs, "c", 10.0);
        assert_eq!(
            (jobs.held_replicas(), jobs.finished()),
            (1, (2, Some(10.0)))
        );

        finish(&mut jobs, "a", 20.0);
        let newest: Vec<(f64, &str)> = jobs.finished_newest_first().collect();
        assert_eq!(newest, [(20.0, "a"), (20.0, "b"), (10.0, "c")]);
        jobs.get_mut("a").expect("present").status.state = agentd_api::jobs::JobState::Running;
        assert_eq!((jobs.held_replicas(), jobs.finished().0), (1, 2));

        jobs.remove("c");
        assert_eq!(jobs.finished(), (1, Some(20.0)));
        // Put back as it was (an undone turn): counted again.
        jobs.insert("b".to_owned(), record("b"));
        assert_eq!((jobs.held_replicas(), jobs.finished()), (2, (0, None)));
        jobs.remove("a");
        jobs.remove("b");
        assert_eq!((jobs.held_replicas(), jobs.finished()), (0, (0, None)));
    }
}
