//! Everything the agent says to and takes from systemd: readiness, status and stopping
//! notifications, the watchdog, the API socket systemd may have bound for it (socket activation),
//! the `systemd-run` command that starts one job replica's supervisor as its own transient
//! unit, and what `systemctl show` says of how such a unit ended.
//!
//! Every call here is a no-op that returns `Ok` when systemd did not start the agent, so the core
//! can call them unconditionally. This module decides nothing about jobs: the executor asks it for
//! an argv and runs it.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Variables systemd sets for the agent that a job process must not inherit: a replica that saw
/// `NOTIFY_SOCKET` or `LISTEN_FDS` could confuse systemd about the agent, or close its socket.
pub const AGENT_ONLY_ENV: [&str; 8] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
];

/// NVIDIA character devices every CUDA process needs besides its own `/dev/nvidiaN`.
pub const NVIDIA_CONTROL_DEVICES: [&str; 4] = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot send {what} to systemd (NOTIFY_SOCKET): {source}")]
    Notify {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{var}={value:?} is not valid: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "file descriptor {fd} passed by systemd is not a listening Unix stream socket; \
         check ListenStream= in agentd.socket: {reason}"
    )]
    NotAUnixListener { fd: RawFd, reason: String },
    #[error("the inherited API socket was already taken")]
    AlreadyTaken,
    #[error("replica unit: {field} {reason}")]
    Replica { field: &'static str, reason: String },
}

/// True when systemd started this process (as a service, or a unit `systemd-run` made).
pub fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() || std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// True when systemd is the running init system, so `systemd-run` can start transient units.
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn notify(what: &'static str, states: &[NotifyState<'_>]) -> Result<(), SystemdError> {
    sd_notify::notify(states).map_err(|source| SystemdError::Notify { what, source })
}

/// Tells systemd the agent is ready: send only once the API socket is bound and the first
/// inventory is in, because `Type=notify` makes `systemctl start` (and `agentctl` in a unit
/// ordered after it) wait for exactly this.
pub fn notify_ready() -> Result<(), SystemdError> {
    notify("READY=1", &[NotifyState::Ready])
}

/// Tells systemd the agent is shutting down, so a slow drain is not mistaken for a hang.
pub fn notify_stopping() -> Result<(), SystemdError> {
    notify("STOPPING=1", &[NotifyState::Stopping])
}

/// Sets the one-line status `systemctl status agentd` shows.
pub fn notify_status(status: &str) -> Result<(), SystemdError> {
    // A newline would end the field and start an unrelated assignment.
    let line = status.replace('\n', " ");
    notify("STATUS=", &[NotifyState::Status(&line)])
}

/// Tells systemd the core loop is alive. Call it from the core loop itself, not from a timer of
/// its own: a hung core then stops pinging and systemd restarts the agent.
pub fn watchdog_ping() -> Result<(), SystemdError> {
    notify("WATCHDOG=1", &[NotifyState::Watchdog])
}

/// How often to call [`watchdog_ping`]: half of `WatchdogSec=` (as sd_watchdog_enabled(3)
/// advises), or `None` when no watchdog is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
}

/// Pings the watchdog when half of `WatchdogSec=` has passed since the last ping; otherwise, and
/// when there is no watchdog, does nothing. Call it on every turn of the core loop: the pings
/// then stop exactly when the core stops turning, which is what the watchdog is for.
pub fn watchdog_tick() {
    static INTERVAL: OnceLock<Option<Duration>> = OnceLock::new();
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    /// Milliseconds after EPOCH of the last ping, plus one (0: never pinged).
    static LAST_PING: AtomicU64 = AtomicU64::new(0);
    let Some(interval) = *INTERVAL.get_or_init(watchdog_interval) else {
        return;
    };
    let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1;
    let last = LAST_PING.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < interval.as_millis() as u64 {
        return;
    }
    LAST_PING.store(now, Ordering::Relaxed);
    if let Err(error) = watchdog_ping() {
        tracing::warn!(%error, "cannot ping the systemd watchdog");
    }
}

static LISTENER_TAKEN: AtomicBool = AtomicBool::new(false);

/// The API socket systemd bound for the agent (`agentd.socket`), or `None` when the agent was not
/// socket-activated and must bind its own. The listener is non-blocking, ready for
/// `tokio::net::UnixListener::from_std`. Taken at most once: the descriptor has one owner.
pub fn inherited_unix_listener() -> Result<Option<UnixListener>, SystemdError> {
    let listen_pid = std::env::var("LISTEN_PID").ok();
    let listen_fds = std::env::var("LISTEN_FDS").ok();
    let Some(fd) = inherited_fd(
        listen_pid.as_deref(),
        listen_fds.as_deref(),
        std::process::id(),
    )?
    else {
        return Ok(None);
    };
    if LISTENER_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(SystemdError::AlreadyTaken);
    }
    check_unix_listener(fd)?;
    // SAFETY: systemd passed `fd` to this process for it to own (LISTEN_PID is our pid), it was
    // checked to be an open listening socket, and LISTENER_TAKEN ensures one owner.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    listener
        .set_nonblocking(true)
        .map_err(|e| SystemdError::NotAUnixListener {
            fd,
            reason: e.to_string(),
        })?;
    // systemd passes descriptors without close-on-exec; a job must not inherit the API socket.
    nix::fcntl::fcntl(
        std::os::fd::AsFd::as_fd(&listener),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| SystemdError::NotAUnixListener {
        fd,
        reason: e.to_string(),
    })?;
    Ok(Some(listener))
}

/// Which descriptor to take, from `LISTEN_PID` and `LISTEN_FDS` (sd_listen_fds(3)): none unless
/// the variables are meant for `my_pid`; the first one when several are passed.
fn inherited_fd(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    my_pid: u32,
) -> Result<Option<RawFd>, SystemdError> {
    let (Some(pid), Some(fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    let pid: u32 = pid.trim().parse().map_err(|_| SystemdError::Env {
        var: "LISTEN_PID",
        value: pid.to_owned(),
        reason: "expected a process id",
    })?;
    if pid != my_pid {
        // Meant for the process that exec'd us (inherited by accident); not ours to take.
        return Ok(None);
    }
    let count: u32 = fds.trim().parse().map_err(|_| SystemdError::Env {
        var: "LISTEN_FDS",
        value: fds.to_owned(),
        reason: "expected a count of file descriptors",
    })?;
    Ok((count > 0).then_some(LISTEN_FDS_START))
}

fn check_unix_listener(fd: RawFd) -> Result<(), SystemdError> {
    use nix::sys::socket::{
        AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
    };
    let fail = |reason: String| SystemdError::NotAUnixListener { fd, reason };
    // SAFETY: borrowed only for the duration of these queries; ownership is not taken here.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let kind = getsockopt(&borrowed, sockopt::SockType).map_err(|e| fail(e.to_string()))?;
    if kind != SockType::Stream {
        return Err(fail(format!("it is a {kind:?} socket")));
    }
    if !getsockopt(&borrowed, sockopt::AcceptConn).map_err(|e| fail(e.to_string()))? {
        return Err(fail("it is not listening".into()));
    }
    let addr: SockaddrStorage = getsockname(fd).map_err(|e| fail(e.to_string()))?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(fail(format!("its address family is {:?}", addr.family())));
    }
    Ok(())
}

/// One replica to start as its own transient service unit, whose main process is the
/// replica's supervisor (`agentd-shim DIR`, see [`crate::exec::shim`]).
///
/// The unit outlives the agent: it is not `PartOf=` the agent's unit, and `systemd-run` neither
/// waits for it nor carries its output, so stopping, restarting or killing the agent leaves it
/// running and the next agent adopts it through its run directory.
///
/// The supervisor runs as root, with no `User=`, no environment and no working directory from
/// the job: the job's owner controls nothing that runs as root. It drops to the owner's
/// credentials (`spawn`) before it executes the replica, exactly as without systemd, and it
/// reads the replica's environment from its root-only run directory. Putting the job's
/// environment on the unit (`EnvironmentFile=`) would hand a root process the owner's
/// `LD_PRELOAD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaUnit {
    pub job: String,
    /// `worker-3`, `ps-0`, `chief-0`.
    pub replica: String,
    /// The gang's restart generation; a restarted gang gets fresh unit names.
    pub generation: u32,
    /// Minor numbers of the GPUs this replica may open (`/dev/nvidia<minor>`); no others are
    /// reachable.
    pub gpus: Vec<u32>,
    /// CPU limit in millicores; 0 means no limit.
    pub cpu_milli: u64,
    /// Memory limit in bytes; 0 means no limit.
    pub memory_bytes: u64,
    /// The supervisor: an absolute program path (systemd resolves nothing against the agent's
    /// `PATH` or `/proc/self`) and its arguments, the run directory last.
    pub supervisor: Vec<String>,
    /// The supervisor's own environment (the agent's settings, never the job's).
    pub supervisor_env: Vec<(String, String)>,
    /// Between SIGTERM and SIGKILL when the unit is stopped (`jobs.kill_grace`).
    pub kill_grace: Duration,
}

impl ReplicaUnit {
    /// The unit name, `agentd-<job>-<replica>-<generation>.service`.
    pub fn unit_name(&self) -> Result<String, SystemdError> {
        unit_name(&self.job, &self.replica, self.generation)
    }

    /// The `systemd-run` argv (after `program`, the `systemd-run` to run) that starts the
    /// replica's unit and returns once its supervisor runs (`--service-type=exec`).
    pub fn systemd_run_argv(&self, program: &Path) -> Result<Vec<OsString>, SystemdError> {
        let unit = self.unit_name()?;
        if !self.supervisor.first().is_some_and(|p| p.starts_with('/')) {
            return Err(SystemdError::Replica {
                field: "supervisor",
                reason: format!(
                    "{:?} does not start with an absolute program path, which systemd needs",
                    self.supervisor
                ),
            });
        }
        let mut argv: Vec<OsString> = vec![
            program.into(),
            format!("--unit={unit}").into(),
            format!(
                "--description=agentd replica {} of job {} generation {}",
                self.replica, self.job, self.generation
            )
            .into(),
            "--slice=agentd.slice".into(),
            "--quiet".into(),
            "--service-type=exec".into(),
        ];
        let mut property = |p: String| argv.push(format!("--property={p}").into());
        // The sandbox is the agent's, not the job's: nothing here restricts the file system, so
        // a job still reads its datasets and writes its checkpoints where its user may.
        property("DevicePolicy=closed".into());
        for gpu in &self.gpus {
            property(format!("DeviceAllow=/dev/nvidia{gpu} rw"));
        }
        if !self.gpus.is_empty() {
            for device in NVIDIA_CONTROL_DEVICES {
                property(format!("DeviceAllow={device} rw"));
            }
        }
        if self.memory_bytes > 0 {
            property(format!("MemoryMax={}", self.memory_bytes));
            // Swapping a training job only hides that it does not fit; fail it as OOM instead.
            property("MemorySwapMax=0".into());
        }
        if self.cpu_milli > 0 {
            // CPUQuota is a percentage of one CPU: 1500 millicores = 150%.
            property(format!("CPUQuota={}%", self.cpu_milli.div_ceil(10)));
        }
        // An OOM kill in the unit ends the process it chose; the supervisor records it and
        // the job's restart policy decides, as without systemd. systemd's default would stop
        // the whole unit at the first kill of any helper process.
        property("OOMPolicy=continue".into());
        // A stop sends SIGTERM to the supervisor, which passes it to the replica and waits;
        // whatever still runs after the grace is killed, the whole cgroup. The grace is time
        // for TensorFlow to write a checkpoint.
        property("KillMode=mixed".into());
        property(format!(
            "TimeoutStopSec={}ms",
            self.kill_grace.as_millis().max(1)
        ));
        for (key, value) in &self.supervisor_env {
            argv.push(format!("--setenv={key}={value}").into());
        }
        argv.push("--".into());
        argv.extend(self.supervisor.iter().map(OsString::from));
        Ok(argv)
    }
}

/// The unit name of one replica of one generation, `agentd-<job>-<replica>-<generation>.service`:
/// an exact name, never a pattern, so that job `mnist` never reaches job `mnist-2`'s units.
pub fn unit_name(job: &str, replica: &str, generation: u32) -> Result<String, SystemdError> {
    check_unit_part("job", job)?;
    check_unit_part("replica", replica)?;
    Ok(format!("agentd-{job}-{replica}-{generation}.service"))
}

/// The `systemctl` argv (after `program`, the `systemctl` to run) that stops a replica's unit,
/// every process in its cgroup (what cancelling a job runs).
pub fn stop_unit_argv(program: &Path, unit: &str) -> Vec<OsString> {
    vec![
        program.into(),
        "stop".into(),
        "--no-block".into(),
        unit.into(),
    ]
}

/// The `systemctl` argv that prints what [`UnitStatus::parse`] reads about a unit.
pub fn show_unit_argv(program: &Path, unit: &str) -> Vec<OsString> {
    vec![
        program.into(),
        "show".into(),
        "--property=LoadState,ActiveState,Result,ExecMainCode,ExecMainStatus".into(),
        unit.into(),
    ]
}

/// The `systemctl` argv that unloads a unit that ended in failure (a replica unit is not
/// `--collect`ed, so that its result can be read; this forgets it once it has been).
pub fn reset_failed_argv(program: &Path, unit: &str) -> Vec<OsString> {
    vec![program.into(), "reset-failed".into(), unit.into()]
}

/// `ExecMainCode` of a main process that was killed (`CLD_KILLED`) or dumped core
/// (`CLD_DUMPED`); one that exited is `CLD_EXITED`, 1.
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

/// What `systemctl show` says about a replica's unit: whether systemd knows it, whether it
/// still runs, and how its main process (the replica's supervisor) ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitStatus {
    /// `loaded`; `not-found` once a unit that ended has been unloaded (or was never there).
    pub load_state: String,
    /// `active`, `activating`, `deactivating`, `inactive`, `failed`.
    pub active_state: String,
    /// `success`, `exit-code`, `signal`, `core-dump`, `timeout`, `oom-kill`, ...
    pub result: String,
    /// How the main process ended (`CLD_*`); 0 while it runs.
    pub main_code: i32,
    /// Its exit code, or the signal that killed it.
    pub main_status: i32,
}

impl UnitStatus {
    /// Reads `KEY=VALUE` lines of `systemctl show` (in whatever order systemd prints them);
    /// other properties are ignored.
    pub fn parse(text: &str) -> Result<Self, SystemdError> {
        let mut status = Self::default();
        let number = |field: &'static str, value: &str| {
            value
                .trim()
                .parse::<i32>()
                .map_err(|_| SystemdError::Replica {
                    field,
                    reason: format!("is {value:?} in systemctl show, not a number"),
                })
        };
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "LoadState" => value.clone_into(&mut status.load_state),
                "ActiveState" => value.clone_into(&mut status.active_state),
                "Result" => value.clone_into(&mut status.result),
                "ExecMainCode" => status.main_code = number("ExecMainCode", value)?,
                "ExecMainStatus" => status.main_status = number("ExecMainStatus", value)?,
                _ => {}
            }
        }
        Ok(status)
    }

    /// Whether systemd still knows the unit: one that ended well is unloaded at once.
    pub fn known(&self) -> bool {
        self.load_state != "not-found"
    }

    /// Whether the unit's main process has ended, so that the rest of what it says is final.
    pub fn main_ended(&self) -> bool {
        !self.known()
            || self.main_code != 0
            || matches!(self.active_state.as_str(), "inactive" | "failed")
    }

    /// How the replica ended, for a supervisor that left no record of it: killed with its
    /// supervisor when a signal killed the unit's main process (`systemctl kill`, the stop
    /// timeout's SIGKILL, the OOM killer; the replica dies with its supervisor), otherwise
    /// unknown. `None` when systemd no longer knows the unit.
    pub fn replica_outcome(&self) -> Option<crate::job::ExitOutcome> {
        if !self.known() {
            return None;
        }
        let signal = matches!(self.main_code, CLD_KILLED | CLD_DUMPED).then_some(self.main_status);
        // A supervisor that exited by itself says nothing about the replica's exit code.
        Some(crate::job::ExitOutcome {
            code: None,
            signal,
            oom_killed: self.result == "oom-kill",
        })
    }
}

fn check_unit_part(field: &'static str, value: &str) -> Result<(), SystemdError> {
    let ok = !value.is_empty()
        && value.len() <= 100
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(SystemdError::Replica {
            field,
            reason: format!(
                "{value:?} cannot be part of a unit name; use at most 100 letters, digits, '-', '_' or '.'"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica() -> ReplicaUnit {
        ReplicaUnit {
            job: "mnist".into(),
            replica: "worker-1".into(),
            generation: 2,
            gpus: vec![2, 5],
            cpu_milli: 1500,
            memory_bytes: 8 * 1024 * 1024 * 1024,
            supervisor: vec![
                "/usr/bin/agentd-shim".into(),
                "/var/lib/agentd/replicas/mnist/worker-1.2".into(),
            ],
            supervisor_env: Vec::new(),
            kill_grace: Duration::from_secs(30),
        }
    }

    fn strings(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    fn systemd_run() -> &'static Path {
        Path::new("systemd-run")
    }

    #[test]
    fn the_replica_unit_gets_its_limits_and_exactly_its_gpus() {
        let argv = strings(replica().systemd_run_argv(systemd_run()).unwrap());
        assert_eq!(argv[0], "systemd-run");
        assert!(argv.contains(&"--unit=agentd-mnist-worker-1-2.service".into()));
        assert!(argv.contains(&"--service-type=exec".into()));
        assert!(argv.contains(&"--property=MemoryMax=8589934592".into()));
        assert!(argv.contains(&"--property=MemorySwapMax=0".into()));
        assert!(argv.contains(&"--property=CPUQuota=150%".into()));
        assert!(argv.contains(&"--property=DevicePolicy=closed".into()));
        let gpus: Vec<&String> = argv
            .iter()
            .filter(|a| a.starts_with("--property=DeviceAllow=/dev/nvidia") && a.ends_with("rw"))
            .collect();
        assert!(gpus.contains(&&"--property=DeviceAllow=/dev/nvidia2 rw".to_owned()));
        assert!(gpus.contains(&&"--property=DeviceAllow=/dev/nvidia5 rw".to_owned()));
        assert!(
            !argv
                .iter()
                .any(|a| a == "--property=DeviceAllow=/dev/nvidia0 rw")
        );
        assert!(argv.contains(&"--property=KillMode=mixed".into()));
        assert!(argv.contains(&"--property=TimeoutStopSec=30000ms".into()));
        assert!(argv.contains(&"--property=OOMPolicy=continue".into()));
        let dashdash = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            &argv[dashdash + 1..],
            [
                "/usr/bin/agentd-shim",
                "/var/lib/agentd/replicas/mnist/worker-1.2"
            ]
        );
    }

    #[test]
    fn the_replica_unit_outlives_the_agent_and_runs_nothing_of_the_owners_as_root() {
        let argv = strings(replica().systemd_run_argv(systemd_run()).unwrap());
        // The client neither waits for the unit nor carries its output, and the unit is bound
        // to nothing of the agent's: stopping or killing the agent leaves it running.
        for gone in [
            "--wait",
            "--pipe",
            "--collect",
            "--scope",
            "PartOf=",
            "BindsTo=",
        ] {
            assert!(!argv.iter().any(|a| a.contains(gone)), "{gone} in {argv:?}");
        }
        // The supervisor is root's; nothing the job's owner controls reaches it: no user, no
        // environment file (an LD_PRELOAD there would run as root), no working directory.
        for owners in [
            "User=",
            "Group=",
            "EnvironmentFile=",
            "--working-directory",
            "--setenv",
            "--uid",
        ] {
            assert!(
                !argv.iter().any(|a| a.contains(owners)),
                "{owners} in {argv:?}"
            );
        }
        let mut relative = replica();
        relative.supervisor[0] = "agentd".into();
        let error = relative
            .systemd_run_argv(systemd_run())
            .unwrap_err()
            .to_string();
        assert!(error.contains("supervisor"), "{error}");
    }

    /// `systemctl show --property=LoadState,ActiveState,Result,ExecMainCode,ExecMainStatus`
    /// as systemd 252 prints it (in its own order, not the order asked for).
    const SHOW_KILLED: &str = "Result=signal\nExecMainCode=2\nExecMainStatus=9\n\
                               LoadState=loaded\nActiveState=failed\n";
    const SHOW_OOM: &str = "Result=oom-kill\nExecMainCode=2\nExecMainStatus=9\n\
                            LoadState=loaded\nActiveState=failed\n";
    const SHOW_STOP_TIMEOUT: &str = "Result=timeout\nExecMainCode=2\nExecMainStatus=9\n\
                                     LoadState=loaded\nActiveState=failed\n";
    const SHOW_RUNNING: &str = "Result=success\nExecMainCode=0\nExecMainStatus=0\n\
                                LoadState=loaded\nActiveState=active\n";
    const SHOW_GONE: &str = "Result=success\nExecMainCode=0\nExecMainStatus=0\n\
                             LoadState=not-found\nActiveState=inactive\n";
    const SHOW_SUPERVISOR_EXITED: &str = "Result=exit-code\nExecMainCode=1\n\
                                          ExecMainStatus=1\nLoadState=loaded\n\
                                          ActiveState=failed\n";

    #[test]
    fn systemctl_show_says_how_a_unit_without_an_exit_record_ended() {
        let outcome = |text| UnitStatus::parse(text).unwrap().replica_outcome();
        let killed = outcome(SHOW_KILLED).unwrap();
        assert_eq!(
            (killed.code, killed.signal, killed.oom_killed),
            (None, Some(9), false)
        );
        let oom = outcome(SHOW_OOM).unwrap();
        assert_eq!((oom.signal, oom.oom_killed), (Some(9), true));
        let timeout = outcome(SHOW_STOP_TIMEOUT).unwrap();
        assert_eq!((timeout.signal, timeout.oom_killed), (Some(9), false));
        // A supervisor that exited by itself tells nothing of the replica's exit code.
        let exited = outcome(SHOW_SUPERVISOR_EXITED).unwrap();
        assert_eq!((exited.code, exited.signal), (None, None));
        assert_eq!(outcome(SHOW_GONE), None, "systemd no longer knows it");

        let running = UnitStatus::parse(SHOW_RUNNING).unwrap();
        assert!(running.known() && !running.main_ended(), "{running:?}");
        for ended in [SHOW_KILLED, SHOW_GONE, SHOW_SUPERVISOR_EXITED] {
            assert!(UnitStatus::parse(ended).unwrap().main_ended(), "{ended}");
        }
        let error = UnitStatus::parse("ExecMainCode=killed\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("ExecMainCode") && error.contains("killed"),
            "{error}"
        );
    }

    #[test]
    fn unit_names_are_exact_and_never_reach_another_job() {
        let name = unit_name("mnist", "worker-0", 1).unwrap();
        assert_eq!(name, "agentd-mnist-worker-0-1.service");
        assert!(!name.contains(['*', '?', '[']), "a name, not a pattern");
        // What job mnist-2's units are called: no name of job mnist's is one of them.
        let other = unit_name("mnist-2", "worker-0", 1).unwrap();
        assert_ne!(name, other);
        assert!(unit_name("mnist*", "worker-0", 1).is_err());
    }

    #[test]
    fn a_replica_without_gpus_can_open_no_nvidia_device() {
        let mut r = replica();
        r.gpus.clear();
        r.cpu_milli = 0;
        r.memory_bytes = 0;
        let argv = strings(r.systemd_run_argv(systemd_run()).unwrap());
        assert!(argv.contains(&"--property=DevicePolicy=closed".into()));
        assert!(!argv.iter().any(|a| a.contains("DeviceAllow")), "{argv:?}");
        assert!(
            !argv
                .iter()
                .any(|a| a.contains("MemoryMax") || a.contains("CPUQuota"))
        );
    }

    #[test]
    fn bad_names_and_empty_supervisors_are_refused_with_the_field() {
        let mut r = replica();
        r.job = "my job/../x".into();
        let error = r.systemd_run_argv(systemd_run()).unwrap_err().to_string();
        assert!(error.contains("job") && error.contains("my job"), "{error}");
        let mut r = replica();
        r.supervisor.clear();
        let error = r.systemd_run_argv(systemd_run()).unwrap_err().to_string();
        assert!(error.contains("supervisor"), "{error}");
    }

    #[test]
    fn listen_fds_are_taken_only_when_meant_for_this_process() {
        assert_eq!(inherited_fd(None, None, 42).unwrap(), None);
        assert_eq!(inherited_fd(Some("42"), Some("1"), 42).unwrap(), Some(3));
        assert_eq!(inherited_fd(Some("41"), Some("1"), 42).unwrap(), None);
        assert_eq!(inherited_fd(Some("42"), Some("0"), 42).unwrap(), None);
        let error = inherited_fd(Some("42"), Some("many"), 42)
            .unwrap_err()
            .to_string();
        assert!(error.contains("LISTEN_FDS"), "{error}");
        assert!(
            inherited_fd(Some("x"), Some("1"), 42)
                .unwrap_err()
                .to_string()
                .contains("LISTEN_PID")
        );
    }

    #[test]
    fn a_descriptor_that_is_not_a_unix_listener_is_refused() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let error = check_unix_listener(std::os::fd::AsRawFd::as_raw_fd(&tcp)).unwrap_err();
        assert!(error.to_string().contains("Inet"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let unix = UnixListener::bind(dir.path().join("s")).unwrap();
        check_unix_listener(std::os::fd::AsRawFd::as_raw_fd(&unix)).unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_unix_listener(std::os::fd::AsRawFd::as_raw_fd(&a)).is_err());
    }

    /// Runs in a child process (see below) with NOTIFY_SOCKET pointing at the parent's socket;
    /// ignored so that it never counts as a test of its own.
    #[test]
    #[ignore = "the child process of notifications_reach_the_notify_socket, run by it"]
    fn notify_child() {
        if std::env::var_os("AGENTD_NOTIFY_CHILD").is_none() {
            return;
        }
        notify_status("loading\ninventory").unwrap();
        notify_ready().unwrap();
        watchdog_ping().unwrap();
        notify_stopping().unwrap();
    }

    #[test]
    fn notifications_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "systemd::tests::notify_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env("AGENTD_NOTIFY_CHILD", "1")
            .env("NOTIFY_SOCKET", &path)
            .status()
            .unwrap();
        assert!(status.success());
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..4 {
            let n = socket.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "STATUS=loading inventory\n",
                "READY=1\n",
                "WATCHDOG=1\n",
                "STOPPING=1\n"
            ]
        );
    }

    #[test]
    fn without_systemd_every_notification_is_a_quiet_no_op() {
        // The test runner is not a systemd service unless NOTIFY_SOCKET says so.
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            return;
        }
        notify_ready().unwrap();
        notify_status("x").unwrap();
        watchdog_ping().unwrap();
        notify_stopping().unwrap();
    }
}
