//! A memory cgroup of its own for each replica that runs under a supervisor, so that the OOM
//! killer's work is seen (`oom_kill` in the cgroup's `memory.events`, or `memory.oom_control`
//! on a cgroup v1 memory hierarchy) and a `resources.limits.memory` is enforced. The agent
//! finds, once, where it may make such cgroups ([`find_parent`]): beside itself in the memory
//! hierarchy it runs in. The supervisor makes the replica's cgroup, puts the replica into it
//! before it executes anything, reads the OOM count when it ends and removes the cgroup.
//!
//! Where no memory cgroup can be made (no memory controller, a cgroup v2 tree whose memory
//! controller is not delegated to the agent's cgroup, an agent that is not allowed to write
//! there), replicas run without one: OOM kills are then seen as plain SIGKILLs.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where replicas' cgroups are made: a directory of a cgroup file system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupParent {
    pub path: PathBuf,
    /// A cgroup v2 (unified) directory; otherwise one of the cgroup v1 memory hierarchy.
    pub v2: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct CgroupError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError {
        path: path.to_owned(),
        source,
    }
}

/// Finds where this process may make memory cgroups for its replicas: its own cgroup v2
/// directory when the memory controller is enabled for its children (or can be), else its
/// own directory in a cgroup v1 memory hierarchy. Says why not otherwise.
pub fn find_parent() -> Result<CgroupParent, String> {
    let membership = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    find_parent_in(&membership, &mounts, Path::new("/"))
}

/// [`find_parent`] on given `/proc/self/cgroup` and `/proc/self/mountinfo` texts, with the
/// file system under `root` (a test's directory, or `/`).
fn find_parent_in(membership: &str, mounts: &str, root: &Path) -> Result<CgroupParent, String> {
    let mut why_not = Vec::new();
    // cgroup v2: "0::/path"; v1: "N:controller,controller:/path".
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "memory") {
            continue;
        }
        let Some(dir) = mounted_dir(mounts, v2, path) else {
            continue;
        };
        let dir = root.join(dir.strip_prefix("/").unwrap_or(&dir));
        if v2 {
            match memory_delegated(&dir) {
                Ok(()) => return Ok(CgroupParent { path: dir, v2 }),
                Err(e) => why_not.push(e),
            }
        } else if dir.join("memory.oom_control").exists() {
            return Ok(CgroupParent { path: dir, v2 });
        } else {
            why_not.push(format!("{} has no memory.oom_control", dir.display()));
        }
    }
    if why_not.is_empty() {
        why_not.push("this process is in no memory cgroup hierarchy that is mounted".to_owned());
    }
    Err(why_not.join("; "))
}

/// The directory of cgroup `path` in the mounted hierarchy (`cgroup2`, or the `cgroup` one
/// with the memory controller), from mountinfo lines: "ID PARENT DEV ROOT MOUNTPOINT OPTIONS
/// [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS".
fn mounted_dir(mounts: &str, v2: bool, path: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let before: Vec<&str> = before.split(' ').collect();
        let after: Vec<&str> = after.split(' ').collect();
        let (mount_root, mount_point) = (before.get(3)?, before.get(4)?);
        let fits = match (v2, after.first()) {
            (true, Some(&"cgroup2")) => true,
            (false, Some(&"cgroup")) => after
                .get(2)
                .is_some_and(|o| o.split(',').any(|o| o == "memory")),
            _ => false,
        };
        if !fits {
            return None;
        }
        // A container may see only a subtree of the hierarchy mounted.
        let relative = Path::new(path).strip_prefix(mount_root).ok()?;
        Some(Path::new(mount_point).join(relative))
    })
}

/// Whether the memory controller reaches the children of cgroup v2 directory `dir`, enabling
/// it when it is offered but not enabled (which the kernel refuses while `dir` itself holds
/// processes, unless it is the root).
fn memory_delegated(dir: &Path) -> Result<(), String> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let has_memory = |text: String| text.split_whitespace().any(|c| c == "memory");
    if has_memory(read("cgroup.subtree_control")) {
        return Ok(());
    }
    if !has_memory(read("cgroup.controllers")) {
        return Err(format!(
            "the cgroup v2 memory controller is not available in {} (not in its \
             cgroup.controllers)",
            dir.display()
        ));
    }
    let control = dir.join("cgroup.subtree_control");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&control)
        .and_then(|mut f| f.write_all(b"+memory"))
        .map_err(|e| {
            format!(
                "cannot enable the memory controller for the children of {}: {e} (a cgroup \
                 that holds processes cannot; run the agent in a cgroup of its own with \
                 memory delegated, e.g. systemd's Delegate=yes)",
                dir.display()
            )
        })
}

/// One replica's memory cgroup.
#[derive(Debug)]
pub struct ReplicaCgroup {
    dir: PathBuf,
    v2: bool,
}

impl ReplicaCgroup {
    /// Makes cgroup `name` under `parent`, with its memory limited to `memory_max` bytes (0:
    /// no limit of its own). One left by an earlier supervisor of the same name is reused.
    pub fn create(parent: &CgroupParent, name: &str, memory_max: u64) -> Result<Self, CgroupError> {
        let dir = parent.path.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&dir)(e)),
        }
        let cgroup = Self { dir, v2: parent.v2 };
        if memory_max > 0 {
            let limit = memory_max.to_string();
            if cgroup.v2 {
                cgroup.write("memory.max", &limit)?;
                // Swapping a training job only hides that it does not fit; fail it as OOM.
                // Without swap accounting the file is absent, and there is no swap to limit.
                let _ = cgroup.write("memory.swap.max", "0");
            } else {
                cgroup.write("memory.limit_in_bytes", &limit)?;
                let _ = cgroup.write("memory.memsw.limit_in_bytes", &limit);
            }
        }
        Ok(cgroup)
    }

    fn write(&self, name: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()))
            .map_err(io(&path))
    }

    /// Its `cgroup.procs`, open for writing: a process that writes "0" into it moves itself
    /// into the cgroup (as a replica does before it executes its program).
    pub fn procs(&self) -> Result<OwnedFd, CgroupError> {
        let path = self.dir.join("cgroup.procs");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(io(&path))
    }

    /// How many of its processes the OOM killer has killed.
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let name = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let path = self.dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        Ok(oom_kill_count(&text))
    }

    /// Removes the cgroup, which its last process has just left: the kernel may need a
    /// moment to let it go, so a busy one is tried again for up to a second.
    pub fn remove(self) {
        for _ in 0..100 {
            match std::fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                _ => return,
            }
        }
    }
}

/// How many processes the OOM killer has killed in the memory cgroup this process runs in,
/// its descendants included: for a supervisor that is the main process of a replica's unit,
/// the unit's whole cgroup. `None` where this process is in no mounted memory hierarchy.
pub fn own_oom_kills() -> Option<u64> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    own_oom_kills_in(&membership, &mounts, Path::new("/"))
}

/// [`own_oom_kills`] on given `/proc/self/cgroup` and `/proc/self/mountinfo` texts, with the
/// file system under `root`.
fn own_oom_kills_in(membership: &str, mounts: &str, root: &Path) -> Option<u64> {
    membership.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "memory") {
            return None;
        }
        let dir = mounted_dir(mounts, v2, path)?;
        let dir = root.join(dir.strip_prefix("/").unwrap_or(&dir));
        let name = if v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(dir.join(name))
            .ok()
            .map(|text| oom_kill_count(&text))
    })
}

/// The `oom_kill N` line of `memory.events` or `memory.oom_control`; 0 when there is none.
fn oom_kill_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The name of a replica's cgroup: `agentd-<job>.<replica>.<generation>` (job names hold
/// neither `/` nor anything a cgroup name may not).
pub fn name(job: &str, replica: &str, generation: u32) -> String {
    format!("agentd-{job}.{replica}.{generation}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oom_kill_count_is_read_from_either_version() {
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(oom_kill_count(v2), 1);
        assert_eq!(oom_kill_count(v1), 3);
        assert_eq!(oom_kill_count("oom_kill_disable 0\nunder_oom 0\n"), 0);
    }

    const V1_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn a_v1_memory_hierarchy_is_used_when_v2_has_no_memory_controller() {
        let root = tempfile::tempdir().unwrap();
        let v1 = root.path().join("sys/fs/cgroup/memory/box/7");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.oom_control"), "oom_kill 0\n").unwrap();
        let v2 = root.path().join("sys/fs/cgroup/unified");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), "").unwrap();
        std::fs::write(v2.join("cgroup.subtree_control"), "").unwrap();
        let membership = "4:memory:/box/7\n1:cpu:/\n0::/\n";
        let parent = find_parent_in(membership, V1_MOUNTS, root.path()).unwrap();
        assert_eq!(
            parent,
            CgroupParent {
                path: v1,
                v2: false
            }
        );
    }

    #[test]
    fn a_v2_cgroup_with_memory_delegated_is_used() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sys/fs/cgroup/agentd.service");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "memory pids\n").unwrap();
        let mounts = "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let parent = find_parent_in("0::/agentd.service\n", mounts, root.path()).unwrap();
        assert_eq!(
            parent,
            CgroupParent {
                path: dir,
                v2: true
            }
        );
    }

    #[test]
    fn no_memory_controller_says_where_it_looked() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("sys/fs/cgroup");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.controllers"), "cpu pids\n").unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "").unwrap();
        let mounts = "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let e = find_parent_in("0::/\n", mounts, root.path()).unwrap_err();
        assert!(e.contains("memory controller is not available"), "{e}");
        assert!(e.contains(&dir.display().to_string()), "{e}");
        let e = find_parent_in("", mounts, root.path()).unwrap_err();
        assert!(e.contains("no memory cgroup hierarchy"), "{e}");
    }

    #[test]
    fn the_oom_kills_of_the_own_cgroup_are_read_where_it_is_mounted() {
        let root = tempfile::tempdir().unwrap();
        let unit = root
            .path()
            .join("sys/fs/cgroup/agentd.slice/agentd-mnist-worker-0-1.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(unit.join("memory.events"), "low 0\noom 2\noom_kill 2\n").unwrap();
        let mounts = "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let membership = "0::/agentd.slice/agentd-mnist-worker-0-1.service\n";
        assert_eq!(own_oom_kills_in(membership, mounts, root.path()), Some(2));
        // cgroup v1: the memory hierarchy's line, not the unified one.
        let v1 = root.path().join("sys/fs/cgroup/memory/box/7");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.oom_control"), "under_oom 0\noom_kill 1\n").unwrap();
        let membership = "4:memory:/box/7\n1:cpu:/\n0::/\n";
        assert_eq!(
            own_oom_kills_in(membership, V1_MOUNTS, root.path()),
            Some(1)
        );
        assert_eq!(own_oom_kills_in("1:cpu:/\n", V1_MOUNTS, root.path()), None);
    }

    #[test]
    fn a_container_sees_its_subtree_mounted_as_the_root() {
        let mounts = "30 23 0:27 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mounted_dir(mounts, true, "/docker/abc/agentd"),
            Some(PathBuf::from("/sys/fs/cgroup/agentd"))
        );
        assert_eq!(mounted_dir(mounts, false, "/docker/abc"), None);
    }
}
