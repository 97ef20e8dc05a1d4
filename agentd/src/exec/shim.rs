//! The replica supervisor (`agentd-shim DIR`, or `agentd shim DIR` where that small executable
//! is not installed beside the agent's), one per replica, which lets replicas outlive the
//! agent as a container outlives containerd through its shim. The agent writes what to run
//! into the replica's run directory and starts the shim in a session of its own; the shim
//! starts the replica, copies its output into its log, waits for it, and writes how it ended
//! into the same directory. An agent that stops or is killed leaves the shim and its replica
//! running; the next agent finds both through the run directory and adopts them.
//!
//! The shim is a subreaper: whatever the replica starts is reparented to it rather than to
//! init, so when the replica ends the shim stops the rest of its process tree, and nothing of
//! a replica outlives it. The shim decides nothing about jobs and never talks to the agent
//! after it has said the replica started: everything else goes through files.
//!
//! Run directory (`<state_dir>/replicas/<job>/<replica>.<generation>/`, mode 0700):
//! `spec.json` (what to run, written by the agent, mode 0600: it holds the environment),
//! `shim.json` (the shim's and the replica's pids, written once the replica runs),
//! `exit.json` (how it ended, written last), or `failed.json` (why the replica could not start).
//!
//! Under systemd the shim is the main process of the replica's transient unit, started by
//! systemd rather than by the agent: its standard output then goes to the journal, so the
//! agent reads `shim.json` or `failed.json` instead. A stop of the unit sends SIGTERM to the shim,
//! which passes it to the replica's process group and goes on supervising, so the replica gets
//! its grace to write a checkpoint and its end is recorded as always.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::cgroup::{CgroupParent, ReplicaCgroup};
use super::replica_log::LogFile;
use super::spawn;
use super::{describe, signal_group};
use crate::job::ExitOutcome;

/// What the shim runs, written by the agent.
pub const SPEC_FILE: &str = "spec.json";
/// Where the replica runs, written by the shim once it does.
pub const STATE_FILE: &str = "shim.json";
/// How the replica ended, written by the shim last.
pub const EXIT_FILE: &str = "exit.json";
/// Why the replica could not be started (a JSON string), written by the shim instead of
/// [`STATE_FILE`].
pub const FAILED_FILE: &str = "failed.json";
/// The line the shim prints on its standard output once the replica runs (then the pid).
pub const STARTED: &str = "agentd-shim: started ";
/// The line it prints instead when the replica could not be started (then the reason).
pub const FAILED: &str = "agentd-shim: failed ";

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid replica record: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One replica to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimSpec {
    pub argv: Vec<String>,
    /// The replica's whole environment.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<PathBuf>,
    pub log_path: PathBuf,
    pub log_max_bytes: u64,
    /// `worker-0 generation 3`, for the first and last line of the log.
    pub title: String,
    /// Whom the replica runs as (and who owns its log); `None`: as the shim.
    #[serde(default)]
    pub user: Option<spawn::Credentials>,
    /// The memory cgroup the replica gets; `None`: none (the agent could not make one here).
    #[serde(default)]
    pub cgroup: Option<ShimCgroup>,
    /// The replica shares the shim's own cgroup, its unit's, which holds its memory limit:
    /// OOM kills are counted there.
    #[serde(default)]
    pub oom_in_own_cgroup: bool,
}

/// A replica's memory cgroup, made by the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimCgroup {
    pub parent: CgroupParent,
    /// The start of its name; the shim's pid follows.
    pub name: String,
    /// Its memory limit in bytes; 0: none of its own.
    pub memory_max: u64,
}

/// Where the replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub shim_pid: u32,
    /// The shim's start time (clock ticks after boot, `/proc/PID/stat` field 22): with the
    /// pid, it tells the shim from a later process that got the same pid.
    pub shim_start: u64,
    /// The replica's pid, also its process group id.
    pub pid: u32,
}

/// How the replica ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
}

impl From<ShimExit> for ExitOutcome {
    fn from(e: ShimExit) -> Self {
        Self {
            code: e.code,
            signal: e.signal,
            oom_killed: e.oom_killed,
        }
    }
}

/// The run directory of one replica of one generation.
pub fn run_dir(root: &Path, job: &str, replica: &str, generation: u32) -> PathBuf {
    root.join(job).join(format!("{replica}.{generation}"))
}

/// Reads one of the run directory's JSON files; `Ok(None)` when it is not there.
pub fn read<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<Option<T>, ShimError> {
    let path = dir.join(name);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ShimError::Io { path, source }),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| ShimError::Format { path, source })
}

/// Writes one of the run directory's files whole or not at all (a temporary file renamed
/// over it), readable by root only.
pub fn write<T: Serialize>(dir: &Path, name: &str, value: &T) -> Result<(), ShimError> {
    let path = dir.join(name);
    let temporary = dir.join(format!(".{name}.tmp"));
    let io = |source| ShimError::Io {
        path: path.clone(),
        source,
    };
    let text = serde_json::to_vec(value).expect("plain data serializes");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(io)?;
    std::io::Write::write_all(&mut file, &text).map_err(io)?;
    drop(file);
    std::fs::rename(&temporary, &path).map_err(io)
}

/// Makes a replica's run directory (mode 0700, with its parents) and writes its spec.
pub fn prepare(dir: &Path, spec: &ShimSpec) -> Result<(), ShimError> {
    prepare_dir(dir)?;
    write(dir, SPEC_FILE, spec)
}

/// Makes a replica's run directory (mode 0700, with its parents), empty of anything an earlier
/// agent left there for the same generation.
pub fn prepare_dir(dir: &Path) -> Result<(), ShimError> {
    let io = |source| ShimError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    for stale in [STATE_FILE, EXIT_FILE, FAILED_FILE] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    Ok(())
}

/// A process's start time (clock ticks after boot), or `None` when it is gone (a zombie, which
/// has ended but not been reaped, counts as gone).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the fields after its last ')' do not.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // Field 3 (state) is the first after the name; start time is field 22.
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The shim itself: runs the replica described in `dir` and returns the shim's exit code.
/// Its standard output is the agent's pipe, closed once the replica runs.
pub fn main(dir: &Path) -> i32 {
    match start(dir) {
        Ok(started) => {
            // An agent that died meanwhile reads nothing; the replica runs on regardless.
            let _ = writeln!(std::io::stdout(), "{STARTED}{}", started.state.pid);
            quiet_stdio();
            supervise(dir, started);
            0
        }
        Err(message) => {
            let _ = writeln!(std::io::stdout(), "{FAILED}{}", message.replace('\n', " "));
            // Where nobody reads the output (a unit's goes to the journal), the agent reads
            // the reason here.
            let _ = write(dir, FAILED_FILE, &message);
            1
        }
    }
}

/// A replica the shim has started.
struct Started {
    state: ShimState,
    spec: ShimSpec,
    /// The read end of its output.
    output: OwnedFd,
    cgroup: Option<ReplicaCgroup>,
}

/// Reads the spec, becomes a subreaper, makes the replica's cgroup and starts the replica in
/// it; records where it runs.
fn start(dir: &Path) -> Result<Started, String> {
    let spec: ShimSpec = read(dir, SPEC_FILE)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{} is missing", dir.join(SPEC_FILE).display()))?;
    pass_stops_to_the_replica()?;
    // SAFETY: prctl with an integer argument only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        return Err(format!(
            "cannot become a subreaper: {}",
            std::io::Error::last_os_error()
        ));
    }
    // One pipe for both streams: they end up in one log, and one pipe keeps their lines in
    // the order the replica wrote them.
    let (output, output_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot make a pipe: {e}"))?;
    let cgroup = spec
        .cgroup
        .as_ref()
        // The shim's pid makes the name unique among the replicas of every agent on the
        // machine (two agents may run jobs of the same name).
        .map(|c| {
            let name = format!("{}.{}", c.name, std::process::id());
            ReplicaCgroup::create(&c.parent, &name, c.memory_max)
        })
        .transpose()
        .map_err(|e| format!("cannot make the replica's memory cgroup: {e}"))?;
    let procs = match cgroup.as_ref().map(ReplicaCgroup::procs).transpose() {
        Ok(procs) => procs,
        Err(e) => {
            if let Some(cgroup) = cgroup {
                cgroup.remove();
            }
            return Err(format!("cannot make the replica's memory cgroup: {e}"));
        }
    };
    let spawned = spawn::spawn(&spawn::Command {
        argv: &spec.argv,
        env: &spec.env,
        working_dir: spec.working_dir.as_deref(),
        stdout: &output_write,
        stderr: &output_write,
        detach: spawn::Detach::DiesWithParent,
        user: spec.user.as_ref(),
        cgroup_procs: procs.as_ref(),
    });
    drop(procs);
    let spawned = match spawned {
        Ok(spawned) => spawned,
        Err(e) => {
            if let Some(cgroup) = cgroup {
                cgroup.remove();
            }
            return Err(e.to_string());
        }
    };
    drop(output_write);
    replica_started(spawned.pid);
    let shim_pid = std::process::id();
    let state = ShimState {
        shim_pid,
        shim_start: start_time(shim_pid).unwrap_or_default(),
        pid: spawned.pid,
    };
    if let Err(e) = write(dir, STATE_FILE, &state) {
        // Unrecorded, the replica could be neither adopted nor found: it must not run.
        signal_group(spawned.pid, Signal::SIGKILL);
        spawn::reap(spawned.pid.cast_signed());
        if let Some(cgroup) = cgroup {
            cgroup.remove();
        }
        return Err(e.to_string());
    }
    Ok(Started {
        state,
        spec,
        output,
        cgroup,
    })
}

/// The replica's process group, once it runs (0 before).
static REPLICA_GROUP: AtomicI32 = AtomicI32::new(0);
/// Whether a stop (SIGTERM) came before the replica ran.
static STOP_ASKED: AtomicBool = AtomicBool::new(false);

/// The SIGTERM handler: the stop is the replica's, and the shim stays to record its end.
extern "C" fn pass_stop(_: libc::c_int) {
    STOP_ASKED.store(true, Ordering::SeqCst);
    let group = REPLICA_GROUP.load(Ordering::SeqCst);
    if group > 1 {
        // SAFETY: kill is async-signal-safe; a group that is gone is fine.
        unsafe { libc::kill(-group, libc::SIGTERM) };
    }
}

/// Makes SIGTERM to the shim (what `systemctl stop` sends to a unit's main process) a
/// SIGTERM to the replica's process group. The replica starts with default handlers.
fn pass_stops_to_the_replica() -> Result<(), String> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(pass_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only touches atomics and calls kill, both async-signal-safe.
    unsafe { sigaction(Signal::SIGTERM, &action) }
        .map(drop)
        .map_err(|e| format!("cannot handle SIGTERM: {e}"))
}

/// Records the replica's process group for [`pass_stop`], and passes on a stop that came
/// while it was being started.
fn replica_started(pgid: u32) {
    REPLICA_GROUP.store(pgid.cast_signed(), Ordering::SeqCst);
    if STOP_ASKED.load(Ordering::SeqCst) {
        signal_group(pgid, Signal::SIGTERM);
    }
}

/// Standard input, output and error to /dev/null: the agent's pipe closes, and the shim never
/// writes into a terminal or pipe that someone else is reading.
fn quiet_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let null = std::os::fd::AsRawFd::as_raw_fd(&null);
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns.
            unsafe { libc::dup2(null, fd) };
        }
    }
}

/// Copies the replica's output into its log, waits for it, stops what is left of its tree,
/// and writes how it ended (and whether the OOM killer ended any of it).
fn supervise(dir: &Path, started: Started) {
    let Started {
        state,
        spec,
        output,
        cgroup,
    } = started;
    let mut log = LogFile::new(
        &spec.log_path,
        spec.log_max_bytes,
        format!("agentd: {} starting: {}", spec.title, spec.argv.join(" ")),
    );
    if let Some(user) = &spec.user {
        log = log.owned_by(user.uid, user.gid);
    }
    let copier = std::thread::spawn(move || {
        let mut output = std::fs::File::from(output);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match output.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => log.write(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        log
    });
    let status = wait_for(state.pid);
    // The replica is gone; whatever it started goes with it. Each process killed here hands
    // its own children to the shim, so this ends when the whole tree is reaped.
    stop_tree(state.pid);
    // Its group id is free now, for any process to take: a stop from here on is no longer
    // the replica's to pass on.
    REPLICA_GROUP.store(0, Ordering::SeqCst);
    let mut outcome = match status {
        Some(status) if libc::WIFEXITED(status) => ShimExit {
            code: Some(libc::WEXITSTATUS(status)),
            ..ShimExit::default()
        },
        Some(status) if libc::WIFSIGNALED(status) => ShimExit {
            signal: Some(libc::WTERMSIG(status)),
            ..ShimExit::default()
        },
        _ => ShimExit::default(),
    };
    // Any process of the replica killed by the OOM killer, the replica itself or not: a
    // trainer whose data loader was killed fails for the same reason. A replica that still
    // exited 0 succeeded all the same (it retried what was killed).
    let oom_kills = match cgroup {
        Some(cgroup) => {
            let kills = cgroup.oom_kills().unwrap_or(0);
            cgroup.remove();
            kills
        }
        None if spec.oom_in_own_cgroup => super::cgroup::own_oom_kills().unwrap_or(0),
        None => 0,
    };
    outcome.oom_killed = oom_kills > 0 && outcome.code != Some(0);
    if let Ok(mut log) = copier.join() {
        log.finish(&format!(
            "agentd: {} ended: {}",
            spec.title,
            describe(outcome.into())
        ));
    }
    // Nobody to tell if this fails: the next agent finds no exit and calls the replica lost.
    let _ = write(dir, EXIT_FILE, &outcome);
}

/// Reaps children until `pid` is among them; returns its wait status.
fn wait_for(pid: u32) -> Option<libc::c_int> {
    loop {
        let mut status = 0;
        // SAFETY: waiting on any child of ours with a valid out pointer.
        let r = unsafe { libc::waitpid(-1, &raw mut status, 0) };
        if r == pid.cast_signed() {
            return Some(status);
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// Kills the replica's process group and every process left under the shim, until none is.
fn stop_tree(pgid: u32) {
    signal_group(pgid, Signal::SIGKILL);
    loop {
        let mut status = 0;
        // SAFETY: as in wait_for, without blocking.
        let r = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
        if r > 0 {
            continue;
        }
        if r < 0 {
            // ECHILD: nothing is left.
            return;
        }
        for child in children() {
            // SAFETY: a plain signal to a child of ours, which cannot be reaped (and its pid
            // reused) by anyone but us.
            unsafe { libc::kill(child.cast_signed(), libc::SIGKILL) };
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The shim's children, from every one of its threads.
fn children() -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ShimSpec {
            argv: vec!["python3".into(), "train.py".into()],
            env: vec![("TF_CONFIG".into(), "{}".into())],
            working_dir: None,
            log_path: dir.path().join("w.log"),
            log_max_bytes: 1024,
            title: "worker-0 generation 1".into(),
            user: None,
            cgroup: None,
            oom_in_own_cgroup: false,
        };
        let run = run_dir(dir.path(), "mnist", "worker-0", 1);
        prepare(&run, &spec).unwrap();
        assert_eq!(read::<ShimSpec>(&run, SPEC_FILE).unwrap(), Some(spec));
        assert_eq!(read::<ShimExit>(&run, EXIT_FILE).unwrap(), None);
        let mode = std::fs::metadata(run.join(SPEC_FILE))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600, "the spec holds secrets");
        std::fs::write(run.join(EXIT_FILE), "{").unwrap();
        let e = read::<ShimExit>(&run, EXIT_FILE).unwrap_err().to_string();
        assert!(e.contains("exit.json"), "{e}");
    }

    #[test]
    fn start_time_tells_a_live_process_from_a_gone_one() {
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
        assert_eq!(start_time(u32::MAX), None);
    }
}
