//! The lifecycle's jobs, with a note of each one changed since the scheduler's feed last
//! asked. Every change goes through [`Jobs::get_mut`], [`Jobs::insert`] or [`Jobs::remove`],
//! which note the name, so the feed looks only at those jobs instead of every job each pass.

use std::collections::{BTreeMap, HashSet};
use std::ops::Index;

use super::JobRecord;

#[derive(Debug, Default)]
pub struct Jobs {
    map: BTreeMap<String, JobRecord>,
    /// Inserted, removed, or handed out to be changed since [`Jobs::take_changed`].
    changed: HashSet<String>,
}

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
        if !self.changed.contains(name) {
            self.changed.insert(name.to_owned());
        }
        Some(record)
    }

    pub fn insert(&mut self, name: String, record: JobRecord) -> Option<JobRecord> {
        self.changed.insert(name.clone());
        self.map.insert(name, record)
    }

    pub fn remove(&mut self, name: &str) -> Option<JobRecord> {
        let record = self.map.remove(name)?;
        if !self.changed.contains(name) {
            self.changed.insert(name.to_owned());
        }
        Some(record)
    }

    /// The names of the jobs changed since the last call (some may be gone).
    pub fn take_changed(&mut self) -> HashSet<String> {
        std::mem::take(&mut self.changed)
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
}
