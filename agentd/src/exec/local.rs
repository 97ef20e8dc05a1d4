//! Replicas on this machine. Each replica is a child in its own process group (so a stop
//! reaches everything it started), with its output in a size-bounded log file, and dies with
//! the agent (`PR_SET_PDEATHSIG`); under systemd the child is the `systemd-run` client of a
//! transient unit that holds the replica and its cgroup limits. Process group ids are recorded
//! by the core so that an agent that was killed can, on its next start, stop whatever its
//! replicas left behind. Nothing here decides what runs: the core does.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, Interest};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use super::spawn;
use crate::job::ExitOutcome;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start replica {replica} of job {job}: {program:?}: {source}")]
    Spawn {
        job: String,
        replica: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no free local port: {0}")]
    Port(std::io::Error),
}

impl ExecError {
    /// Whether the failure says the machine was short of a resource for a moment, rather
    /// than that the replica can never start (no such program, no permission).
    pub fn is_transient(&self) -> bool {
        let source = match self {
            Self::Spawn { source, .. } | Self::Port(source) => source,
        };
        matches!(
            source.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM | libc::EINTR)
        )
    }
}

/// Everything needed to start one replica.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub job: String,
    pub replica: String,
    pub generation: u32,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<PathBuf>,
    pub log_path: PathBuf,
    /// What the scheduler gave the replica, the limits of its unit when replicas run as
    /// systemd units: GPU indices, millicores and bytes (0 for no limit).
    pub gpu_indices: Vec<u32>,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
}

/// What became of one replica of a generation.
#[derive(Debug, Clone)]
pub struct ReplicaReport {
    pub job: String,
    pub replica: String,
    pub generation: u32,
    pub event: ReplicaEvent,
}

#[derive(Debug, Clone)]
pub enum ReplicaEvent {
    /// Running as `pid`, which is also its process group id. Always reported before its end.
    Started {
        pid: u32,
    },
    /// It could not be started; nothing of it runs.
    StartFailed {
        message: String,
        /// The machine was short of something for a moment (file descriptors, processes,
        /// memory): starting again later may work.
        transient: bool,
    },
    Exited {
        outcome: ExitOutcome,
    },
}

/// How replicas are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// Child processes of the agent.
    Processes,
    /// Transient systemd units (`systemd-run --wait --pipe`, whose client process is the
    /// agent's child and carries the unit's output and exit status), each with the cgroup
    /// limits of what the replica was given. Stopped with `systemctl stop`.
    Units {
        /// The agent's own unit: replicas are `PartOf=` it.
        part_of: Option<String>,
        /// The unit's `TimeoutStopSec`: SIGTERM, then SIGKILL after this.
        kill_grace: Duration,
    },
}

/// Starts replicas and reports what becomes of them on a channel. Starting happens on one
/// thread of its own, so the core never waits for a process to be created, and so the
/// replicas' parent-death signal is tied to a thread that lives as long as the executor
/// (the signal follows the thread that created a process, not the process).
#[derive(Clone)]
pub struct LocalExecutor {
    launches: std::sync::mpsc::Sender<LaunchSpec>,
    runner: Runner,
    /// Process group of each live replica that is a unit, and the unit's name.
    units: Arc<Mutex<HashMap<u32, String>>>,
}

impl LocalExecutor {
    /// Must be called on the runtime: replicas are watched by tasks on it.
    pub fn new(
        reports: mpsc::UnboundedSender<ReplicaReport>,
        log_max_bytes: u64,
        runner: Runner,
    ) -> Self {
        let (launches, queue) = std::sync::mpsc::channel::<LaunchSpec>();
        let units = Arc::new(Mutex::new(HashMap::new()));
        let starter = Starter {
            reports,
            log_max_bytes,
            runner: runner.clone(),
            units: Arc::clone(&units),
        };
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("replica-starter".to_owned())
            .spawn(move || {
                let _runtime = runtime.enter();
                for spec in queue {
                    starter.start(spec);
                }
            })
            .expect("a thread can be started at agent start-up");
        Self {
            launches,
            runner,
            units,
        }
    }

    /// After a crash: stops the units of `job` a previous agent left running (their clients
    /// died with it, the units did not). Nothing to do when replicas are processes:
    /// [`kill_leftovers`] finds those.
    pub fn stop_leftover_units(&self, job: &str) {
        if self.runner == Runner::Processes {
            return;
        }
        let pattern = format!("agentd-{job}-*.service");
        match std::process::Command::new("systemctl")
            .args(["stop", &pattern])
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::warn!(job, "systemctl stop {pattern} ended with {s}"),
            Err(e) => tracing::warn!(job, "cannot run systemctl stop {pattern}: {e}"),
        }
    }

    /// Starts one replica in the background; a report follows.
    pub fn launch(&self, spec: LaunchSpec) {
        // The thread ends only when every executor handle is gone, so this cannot fail while
        // `self` exists.
        let _ = self.launches.send(spec);
    }

    /// Stops replicas by process group: SIGTERM now, SIGKILL to whatever is left after
    /// `grace`. A replica that is a unit is stopped through systemd instead, which applies the
    /// same grace inside the unit; its client process then ends by itself.
    pub fn stop(
        &self,
        pgids: Vec<u32>,
        grace: Duration,
    ) -> impl Future<Output = ()> + Send + use<> {
        let units: HashMap<u32, String> = {
            let map = self.units.lock().expect("not poisoned");
            pgids
                .iter()
                .filter_map(|p| map.get(p).map(|u| (*p, u.clone())))
                .collect()
        };
        async move {
            for unit in units.values() {
                let argv = crate::systemd::stop_unit_argv(unit);
                let status = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .status()
                    .await;
                if !status.is_ok_and(|s| s.success()) {
                    tracing::warn!(unit, "systemctl stop failed; the unit's client is killed");
                }
            }
            let processes = pgids
                .iter()
                .copied()
                .filter(|p| !units.contains_key(p))
                .collect();
            // systemd kills a unit at the end of its own grace; its client ends a moment
            // later, so it gets that moment before it is killed too.
            let wait = if units.is_empty() {
                grace
            } else {
                grace + Duration::from_secs(5)
            };
            stop_groups_after(processes, pgids, wait).await;
        }
    }
}

/// What the starter thread needs.
struct Starter {
    reports: mpsc::UnboundedSender<ReplicaReport>,
    log_max_bytes: u64,
    runner: Runner,
    units: Arc<Mutex<HashMap<u32, String>>>,
}

impl Starter {
    /// Starts one replica and reports `Started` (then, from its watcher, `Exited`) or
    /// `StartFailed`.
    fn start(&self, spec: LaunchSpec) {
        let report = |spec: &LaunchSpec, event| {
            let _ = self.reports.send(ReplicaReport {
                job: spec.job.clone(),
                replica: spec.replica.clone(),
                generation: spec.generation,
                event,
            });
        };
        match spawn_watched(&spec, &self.runner) {
            Ok((pid, watch, unit)) => {
                report(&spec, ReplicaEvent::Started { pid });
                if let Some(unit) = unit {
                    self.units.lock().expect("not poisoned").insert(pid, unit);
                }
                let log = LogFile::new(
                    &spec.log_path,
                    self.log_max_bytes,
                    format!(
                        "agentd: {} generation {} starting: {}",
                        spec.replica,
                        spec.generation,
                        spec.argv.join(" ")
                    ),
                );
                let reports = self.reports.clone();
                let units = Arc::clone(&self.units);
                tokio::spawn(async move {
                    let (outcome, mut log) = watch.run(log).await;
                    units.lock().expect("not poisoned").remove(&pid);
                    log.finish(&format!(
                        "agentd: {} generation {} ended: {}",
                        spec.replica,
                        spec.generation,
                        describe(outcome)
                    ));
                    let _ = reports.send(ReplicaReport {
                        job: spec.job,
                        replica: spec.replica,
                        generation: spec.generation,
                        event: ReplicaEvent::Exited { outcome },
                    });
                });
            }
            Err(e) => report(
                &spec,
                ReplicaEvent::StartFailed {
                    message: e.to_string(),
                    transient: e.is_transient(),
                },
            ),
        }
    }
}

/// Starts the replica's process (the replica itself, or the `systemd-run` client of its
/// unit) and sets up its watcher. Returns its pid, the watcher and the unit's name.
fn spawn_watched(
    spec: &LaunchSpec,
    runner: &Runner,
) -> Result<(u32, Replica, Option<String>), ExecError> {
    let spawn_err = |source| ExecError::Spawn {
        job: spec.job.clone(),
        replica: spec.replica.clone(),
        program: spec.argv.first().cloned().unwrap_or_default(),
        source,
    };
    let env: Vec<(String, String)> = inherited_env()
        .filter(|(k, _)| !spec.env.contains_key(k))
        .chain(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())))
        .collect();
    let (argv, env, working_dir, unit) = match runner {
        Runner::Processes => (spec.argv.clone(), env, spec.working_dir.as_deref(), None),
        Runner::Units {
            part_of,
            kill_grace,
        } => {
            let unit = crate::systemd::ReplicaUnit {
                job: spec.job.clone(),
                replica: spec.replica.clone(),
                generation: spec.generation,
                gpus: spec.gpu_indices.clone(),
                cpu_milli: spec.cpu_milli,
                memory_bytes: spec.memory_bytes,
                working_directory: spec.working_dir.clone(),
                env,
                command: spec.argv.clone(),
                part_of: part_of.clone(),
                kill_grace: *kill_grace,
            };
            let to_io = |e: crate::systemd::SystemdError| std::io::Error::other(e.to_string());
            let name = unit.unit_name().map_err(|e| spawn_err(to_io(e)))?;
            let argv = unit
                .systemd_run_argv()
                .map_err(|e| spawn_err(to_io(e)))?
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            // The client needs only to find systemd-run; the unit gets the replica's env.
            let env = inherited_env().filter(|(k, _)| k == "PATH").collect();
            (argv, env, None, Some(name))
        }
    };
    // One pipe for both streams: they end up in one log, and one pipe keeps their lines in
    // the order the replica wrote them.
    let (output, output_write) = pipe().map_err(spawn_err)?;
    let spawned = spawn::spawn(&spawn::Command {
        argv: &argv,
        env: &env,
        working_dir,
        stdout: &output_write,
        stderr: &output_write,
    })
    .map_err(spawn_err)?;
    // Only the replica holds the write ends now: end of file means it (and everything it
    // started) closed its output.
    drop(output_write);
    let pid = spawned.pid;
    match Replica::new(spawned, output) {
        Ok(watch) => Ok((pid, watch, unit)),
        Err(e) => {
            // Unwatched, it could not be stopped or reported: it must not run at all.
            signal_group(pid, Signal::SIGKILL);
            spawn::reap(pid.cast_signed());
            Err(spawn_err(e))
        }
    }
}

/// A started replica as the runtime sees it: its pidfd and the read end of its output.
struct Replica {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    output: pipe::Receiver,
}

impl Replica {
    fn new(spawned: spawn::Spawned, output: OwnedFd) -> std::io::Result<Self> {
        Ok(Self {
            pid: spawned.pid,
            // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it is dropped,
            // which is when the AsyncFd is.
            pidfd: unsafe { AsyncFd::register_with_interest(spawned.pidfd, Interest::READABLE) }?,
            output: pipe::Receiver::from_owned_fd(output)?,
        })
    }

    /// Copies the replica's output into its log until the pipe closes, and collects its exit
    /// status once its pidfd turns readable. Log writes go straight to the file: a local log
    /// file takes a small write into the page cache without waiting on the disk.
    async fn run(self, mut log: LogFile) -> (ExitOutcome, LogFile) {
        let Self {
            pid,
            pidfd,
            mut output,
        } = self;
        let copy = async {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = output.read(&mut buf).await
                && n > 0
            {
                log.write(&buf[..n]);
            }
        };
        let exit = async {
            // A pidfd only ever turns readable, when the process has exited.
            let _ = pidfd.readable().await;
            spawn::reap(pid.cast_signed())
        };
        let ((), status) = tokio::join!(copy, exit);
        let outcome = match status {
            Some(status) if libc::WIFEXITED(status) => ExitOutcome {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
                oom_killed: false,
            },
            Some(status) if libc::WIFSIGNALED(status) => ExitOutcome {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
                oom_killed: false,
            },
            _ => ExitOutcome::default(),
        };
        (outcome, log)
    }
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
}

/// A short human description of how a process ended.
pub fn describe(outcome: ExitOutcome) -> String {
    match (outcome.code, outcome.signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => {
            let name =
                Signal::try_from(signal).map_or_else(|_| signal.to_string(), |s| s.to_string());
            format!("killed by {name}")
        }
        (None, None) => "lost".to_owned(),
    }
}

/// The agent's own environment that replicas keep: what a login shell would give them.
fn inherited_env() -> impl Iterator<Item = (String, String)> {
    const KEEP: &[&str] = &[
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_ALL",
        "TZ",
        "TMPDIR",
        "VIRTUAL_ENV",
    ];
    std::env::vars().filter(|(k, _)| KEEP.contains(&k.as_str()))
}

/// A replica's log: `NAME.log`, and when it passes half the limit it moves to `NAME.log.1`
/// (replacing the older one), so a replica never uses more than the limit on disk. The file
/// (and its directory) is made on the first output, headed by a line saying which generation
/// started with what command: a replica that prints nothing leaves no file behind, and
/// starting one costs no file system work.
pub struct LogFile {
    path: PathBuf,
    file: Option<std::fs::File>,
    header: Option<String>,
    written: u64,
    half: u64,
}

impl LogFile {
    pub fn new(path: &Path, max_bytes: u64, header: String) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
            header: Some(header),
            written: 0,
            half: (max_bytes / 2).max(1),
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        if self.file.is_none() && !self.create() {
            return;
        }
        if let Some(header) = self.header.take() {
            self.append(format!("--- {header} ---\n").as_bytes());
        }
        self.append(bytes);
    }

    /// Ends the log with `line`, if the replica wrote one.
    fn finish(&mut self, line: &str) {
        if self.file.is_some() {
            self.append(format!("--- {line} ---\n").as_bytes());
        }
    }

    fn create(&mut self) -> bool {
        let opened = self
            .path
            .parent()
            .map_or(Ok(()), fs_err::create_dir_all)
            .and_then(|()| {
                fs_err::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
            });
        match opened {
            Ok(file) => {
                self.written = file.metadata().map_or(0, |m| m.len());
                self.file = Some(file.into_parts().0);
                true
            }
            Err(e) => {
                // Once per replica: its output is dropped, the replica goes on.
                if self.header.take().is_some() {
                    tracing::warn!("replica output is lost: {e}");
                }
                false
            }
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.written + bytes.len() as u64 > self.half && self.written > 0 {
            self.rotate();
        }
        // A full disk loses log lines, never the replica.
        if let Some(file) = &mut self.file
            && file.write_all(bytes).is_ok()
        {
            self.written += bytes.len() as u64;
        }
    }

    fn rotate(&mut self) {
        let old = rotated_path(&self.path);
        if std::fs::rename(&self.path, &old).is_err() {
            return;
        }
        if let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
        {
            self.file = Some(file);
            self.written = 0;
        }
    }
}

/// Where the older half of a log lives.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Sends `signal` to a replica's whole process group. A group that is already gone is fine.
pub fn signal_group(pgid: u32, signal: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid as i32), signal);
    }
}

/// Whether any process of the group exists, zombies included.
fn group_exists(pgid: u32) -> bool {
    pgid > 1 && killpg(Pid::from_raw(pgid as i32), None).is_ok()
}

/// Whether any process of the group is still alive. Zombies do not count: a grandchild whose
/// parent died is reparented, and its new parent may be slow to reap it.
pub fn group_alive(pgid: u32) -> bool {
    if !group_exists(pgid) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // The command name may hold spaces and parentheses; the fields after its last ')' do not.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let _ppid = fields.next();
        let pgrp = fields.next().and_then(|f| f.parse::<u32>().ok());
        pgrp == Some(pgid) && state != Some("Z")
    })
}

/// Kills, after an agent crash, the processes of process group `pgid` that belong to `job`
/// (their environment names it): a recycled group id of someone else's is left alone.
/// Returns how many processes were killed.
pub fn kill_leftovers(pgid: u32, job: &str) -> usize {
    let marker = format!("AGENTD_JOB={job}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let pgrp = rest
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse::<u32>().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
        {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

/// Sends SIGTERM to `term`, waits up to `grace` for every group of `wait` to be gone, then
/// sends SIGKILL to what is left of them.
async fn stop_groups_after(term: Vec<u32>, wait: Vec<u32>, grace: Duration) {
    for &pgid in &term {
        signal_group(pgid, Signal::SIGTERM);
    }
    // Whether a group is alive takes a walk over /proc, which is not cheap on a busy machine:
    // skip it while the group plainly exists (a signal takes a moment to land) or plainly
    // does not, and look again soon, then less often.
    let deadline = tokio::time::Instant::now() + grace;
    let mut pause = Duration::from_millis(5);
    while wait.iter().any(|&g| group_exists(g)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        if !wait.iter().any(|&g| group_alive(g)) {
            break;
        }
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    for &pgid in &wait {
        if group_alive(pgid) {
            signal_group(pgid, Signal::SIGKILL);
        }
    }
}

/// Picks a free TCP port on localhost for a replica to listen on. The port is checked free by
/// binding it, and released just before the replica starts.
pub fn free_port() -> Result<u16, ExecError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(ExecError::Port)?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(ExecError::Port)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replica `replica` of job `j`, generation 1, running `argv`, logging under `dir`.
    fn spec(dir: &Path, replica: &str, argv: &[&str]) -> LaunchSpec {
        LaunchSpec {
            job: "j".into(),
            replica: replica.into(),
            generation: 1,
            argv: argv.iter().map(|&a| a.to_owned()).collect(),
            env: BTreeMap::new(),
            working_dir: None,
            log_path: dir.join(format!("logs/j/{replica}.log")),
            gpu_indices: Vec::new(),
            cpu_milli: 0,
            memory_bytes: 0,
        }
    }

    #[test]
    fn log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker-0.log");
        let mut log = LogFile::new(&path, 8192, "header".to_owned());
        for _ in 0..1000 {
            log.write(&[b'x'; 100]);
        }
        let total = std::fs::metadata(&path).unwrap().len()
            + std::fs::metadata(rotated_path(&path)).unwrap().len();
        assert!(total <= 8192, "{total}");
        assert!(total >= 4096, "{total}");
    }

    #[tokio::test]
    async fn runs_a_replica_and_reports_its_exit() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = LocalExecutor::new(tx, 1 << 20, Runner::Processes);
        let mut replica = spec(
            dir.path(),
            "worker-0",
            &["sh", "-c", "echo hello $GREETING >&2; exit 3"],
        );
        replica.env.insert("GREETING".into(), "world".into());
        let log_path = replica.log_path.clone();
        executor.launch(replica);
        assert!(matches!(rx.recv().await.unwrap().event, ReplicaEvent::Started { pid } if pid > 1));
        let exit = rx.recv().await.unwrap();
        assert!(matches!(exit.event, ReplicaEvent::Exited { outcome } if outcome.code == Some(3)));
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(log.contains("hello world"), "{log}");
        assert!(log.contains("ended: exit code 3"), "{log}");
    }

    #[tokio::test]
    async fn a_silent_replica_leaves_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = LocalExecutor::new(tx, 1 << 20, Runner::Processes);
        executor.launch(spec(dir.path(), "worker-0", &["true"]));
        assert!(matches!(
            rx.recv().await.unwrap().event,
            ReplicaEvent::Started { .. }
        ));
        let exit = rx.recv().await.unwrap().event;
        assert!(matches!(exit, ReplicaEvent::Exited { outcome } if outcome.code == Some(0)));
        assert!(!dir.path().join("logs").exists());
    }

    #[tokio::test]
    async fn a_replica_that_cannot_start_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = LocalExecutor::new(tx, 1 << 20, Runner::Processes);
        let mut replica = spec(dir.path(), "chief-0", &["no-such-trainer"]);
        replica.generation = 2;
        replica.env.insert("PATH".into(), "/usr/bin".into());
        executor.launch(replica);
        let report = rx.recv().await.unwrap();
        assert_eq!((report.replica.as_str(), report.generation), ("chief-0", 2));
        let ReplicaEvent::StartFailed { message, .. } = report.event else {
            panic!("{report:?}");
        };
        assert_eq!(
            message,
            "cannot start replica chief-0 of job j: \"no-such-trainer\": \
             \"no-such-trainer\" is not an executable file in PATH=/usr/bin"
        );
    }

    #[tokio::test]
    async fn stopping_a_group_reaches_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = LocalExecutor::new(tx, 1 << 20, Runner::Processes);
        // The shell ignores SIGTERM; its child sleeps. Only SIGKILL ends both.
        executor.launch(spec(
            dir.path(),
            "ps-0",
            &["sh", "-c", "trap '' TERM; sleep 300 & wait"],
        ));
        let ReplicaEvent::Started { pid } = rx.recv().await.unwrap().event else {
            panic!("not started");
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        executor.stop(vec![pid], Duration::from_millis(300)).await;
        let exit = rx.recv().await.unwrap().event;
        assert!(matches!(exit, ReplicaEvent::Exited { outcome } if outcome.signal == Some(9)));
        assert!(!group_alive(pid), "nothing of the group is left");
    }

    #[test]
    fn a_moments_shortage_is_transient_a_missing_program_is_not() {
        let spawn = |errno| ExecError::Spawn {
            job: "j".into(),
            replica: "worker-0".into(),
            program: "python".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert!(spawn(libc::EMFILE).is_transient());
        assert!(spawn(libc::EAGAIN).is_transient());
        assert!(!spawn(libc::ENOENT).is_transient());
        assert!(!spawn(libc::EACCES).is_transient());
    }
}
