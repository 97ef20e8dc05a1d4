//! The overall bound on job logs (`jobs.logs_max_total_bytes`). Each replica's log is bounded
//! by rotation; this bounds them together, which matters because they share the state
//! directory's disk with the database: past the budget, the logs of the jobs that finished
//! first are deleted, whole. Logs of jobs still running are never touched. It walks the
//! file system, so the core runs it off its own task.

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

/// Deletes the log directories of `finished` jobs (oldest first) under `logs_root` until all
/// job logs there fit in `budget` bytes. Returns the jobs whose logs went.
pub fn enforce(logs_root: &Path, finished_oldest_first: &[String], budget: u64) -> Vec<String> {
    let mut total = size_of(logs_root);
    let mut removed = Vec::new();
    for name in finished_oldest_first {
        if total <= budget {
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
    removed
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
        assert_eq!(enforce(root, &finished, 16_000), Vec::<String>::new());
        assert_eq!(enforce(root, &finished, 9_000), ["old", "newer"]);
        assert!(!root.join("old").exists() && !root.join("newer").exists());
        assert!(root.join("newest").exists() && root.join("running").exists());
        // Only running logs left over the budget: they stay.
        assert_eq!(enforce(root, &finished[2..], 1_000), ["newest"]);
        assert!(root.join("running/worker-0.log").exists());
    }
}
