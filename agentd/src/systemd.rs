//! Everything the agent says to and takes from systemd: readiness, status and stopping
//! notifications, the watchdog, the API socket systemd may have bound for it (socket activation),
//! and the `systemd-run` command that starts one job replica as its own transient unit.
//!
//! Every call here is a no-op that returns `Ok` when systemd did not start the agent, so the core
//! can call them unconditionally. This module decides nothing about jobs: the executor asks it for
//! an argv and runs it.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
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

/// The unit this process runs in (`agentd.service`), read from `/proc/self/cgroup`; `None`
/// outside a systemd service (a shell, a container without systemd).
pub fn own_unit() -> Option<String> {
    let cgroup = fs_err::read_to_string("/proc/self/cgroup").ok()?;
    unit_from_cgroup(&cgroup)
}

fn unit_from_cgroup(cgroup: &str) -> Option<String> {
    // cgroup v2: a single line "0::/system.slice/agentd.service".
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.rsplit('/')
        .find(|part| part.ends_with(".service"))
        .map(str::to_owned)
}

/// One replica to start as its own transient service unit.
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
    pub working_directory: Option<PathBuf>,
    /// The replica's whole environment, as a file for `EnvironmentFile=` (see
    /// [`environment_file`]): the unit inherits nothing from the agent, and nothing of the
    /// environment is put on a command line, where every user could read it.
    pub environment_file: Option<PathBuf>,
    /// Whom the replica runs as (`User=`, `Group=`, `SupplementaryGroups=`); `None`: root.
    pub user: Option<crate::exec::spawn::Credentials>,
    /// Program and arguments.
    pub command: Vec<String>,
    /// The agent's own unit (see [`own_unit`]). The replica is made `PartOf=` it, so
    /// `systemctl stop agentd` (or restart) stops the replica too.
    pub part_of: Option<String>,
    /// Between SIGTERM and SIGKILL when the unit is stopped (`jobs.kill_grace`).
    pub kill_grace: Duration,
}

impl ReplicaUnit {
    /// The unit name, `agentd-<job>-<replica>-<generation>.service`.
    pub fn unit_name(&self) -> Result<String, SystemdError> {
        unit_name(&self.job, &self.replica, self.generation)
    }

    /// The `systemd-run` argv that starts the replica, waits for it and returns its exit status
    /// (so the executor treats `systemd-run` like the replica's own process). `--pipe` hands the
    /// replica the executor's stdout and stderr, so log capture is the same on both paths.
    pub fn systemd_run_argv(&self) -> Result<Vec<OsString>, SystemdError> {
        let unit = self.unit_name()?;
        if self.command.is_empty() {
            return Err(SystemdError::Replica {
                field: "command",
                reason: "is empty; a replica needs a program to run".into(),
            });
        }
        let mut argv: Vec<OsString> = vec![
            "systemd-run".into(),
            format!("--unit={unit}").into(),
            "--description=agentd replica".into(),
            "--slice=agentd.slice".into(),
            "--collect".into(),
            "--wait".into(),
            "--pipe".into(),
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
        // SIGTERM first, and time for TensorFlow to write a checkpoint before SIGKILL.
        property("KillMode=mixed".into());
        property(format!(
            "TimeoutStopSec={}ms",
            self.kill_grace.as_millis().max(1)
        ));
        if let Some(agent) = &self.part_of {
            property(format!("PartOf={agent}"));
        }
        if let Some(dir) = &self.working_directory {
            let mut arg = OsString::from("--working-directory=");
            arg.push(dir);
            argv.push(arg);
        }
        if let Some(user) = &self.user {
            argv.push(format!("--property=User={}", user.uid).into());
            argv.push(format!("--property=Group={}", user.gid).into());
            let groups: Vec<String> = user.groups.iter().map(u32::to_string).collect();
            if !groups.is_empty() {
                argv.push(format!("--property=SupplementaryGroups={}", groups.join(" ")).into());
            }
        }
        if let Some(file) = &self.environment_file {
            let mut arg = OsString::from("--property=EnvironmentFile=");
            arg.push(file);
            argv.push(arg);
        }
        argv.push("--".into());
        argv.extend(self.command.iter().map(OsString::from));
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

/// The text of an environment file (`EnvironmentFile=`, systemd.exec(5)) that sets exactly
/// these variables: each value in double quotes, with `"`, `\`, `` ` `` and `$` escaped, so
/// that JSON, newlines and shell characters arrive unchanged.
pub fn environment_file<'a>(
    env: impl Iterator<Item = (&'a String, &'a String)>,
) -> Result<String, SystemdError> {
    let mut text = String::new();
    for (key, value) in env {
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(SystemdError::Replica {
                field: "env",
                reason: format!(
                    "name {key:?} is not a valid variable name; use letters, digits and '_', \
                     not starting with a digit"
                ),
            });
        }
        text.push_str(key);
        text.push_str("=\"");
        for c in value.chars() {
            if matches!(c, '"' | '\\' | '`' | '$') {
                text.push('\\');
            }
            text.push(c);
        }
        text.push_str("\"\n");
    }
    Ok(text)
}

/// The `systemctl` argv that stops a replica's unit (what cancelling a job runs).
pub fn stop_unit_argv(unit: &str) -> Vec<OsString> {
    vec![
        "systemctl".into(),
        "stop".into(),
        "--no-block".into(),
        unit.into(),
    ]
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
            working_directory: Some("/data/mnist".into()),
            environment_file: Some("/var/lib/agentd/replicas/mnist/worker-1.2/env".into()),
            user: Some(crate::exec::spawn::Credentials {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 44],
            }),
            command: vec!["python3".into(), "train.py".into(), "--epochs=3".into()],
            part_of: Some("agentd.service".into()),
            kill_grace: Duration::from_secs(30),
        }
    }

    fn strings(argv: Vec<OsString>) -> Vec<String> {
        argv.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn the_replica_unit_gets_its_limits_and_exactly_its_gpus() {
        let argv = strings(replica().systemd_run_argv().unwrap());
        assert_eq!(argv[0], "systemd-run");
        assert!(argv.contains(&"--unit=agentd-mnist-worker-1-2.service".into()));
        for flag in ["--collect", "--wait", "--pipe"] {
            assert!(argv.contains(&flag.into()), "{flag} missing from {argv:?}");
        }
        assert!(argv.contains(&"--property=MemoryMax=8589934592".into()));
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
        assert!(argv.contains(&"--property=PartOf=agentd.service".into()));
        assert!(argv.contains(&"--working-directory=/data/mnist".into()));
        assert!(argv.contains(
            &"--property=EnvironmentFile=/var/lib/agentd/replicas/mnist/worker-1.2/env".into()
        ));
        assert!(!argv.iter().any(|a| a.starts_with("--setenv")), "{argv:?}");
        assert!(argv.contains(&"--property=User=1000".into()));
        assert!(argv.contains(&"--property=Group=1000".into()));
        assert!(argv.contains(&"--property=SupplementaryGroups=1000 44".into()));
        let dashdash = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(&argv[dashdash + 1..], ["python3", "train.py", "--epochs=3"]);
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
        let argv = strings(r.systemd_run_argv().unwrap());
        assert!(argv.contains(&"--property=DevicePolicy=closed".into()));
        assert!(!argv.iter().any(|a| a.contains("DeviceAllow")), "{argv:?}");
        assert!(
            !argv
                .iter()
                .any(|a| a.contains("MemoryMax") || a.contains("CPUQuota"))
        );
    }

    #[test]
    fn bad_names_and_empty_commands_are_refused_with_the_field() {
        let mut r = replica();
        r.job = "my job/../x".into();
        let error = r.systemd_run_argv().unwrap_err().to_string();
        assert!(error.contains("job") && error.contains("my job"), "{error}");
        let mut r = replica();
        r.command.clear();
        assert!(
            r.systemd_run_argv()
                .unwrap_err()
                .to_string()
                .contains("command")
        );
        let bad = ("A=B".to_owned(), "c".to_owned());
        let error = environment_file(std::iter::once((&bad.0, &bad.1)))
            .unwrap_err()
            .to_string();
        assert!(error.contains("env") && error.contains("A=B"), "{error}");
    }

    #[test]
    fn the_environment_file_carries_every_value_unchanged() {
        let env: Vec<(String, String)> = vec![
            (
                "TF_CONFIG".into(),
                r#"{"cluster":{"worker":["localhost:1"]},"task":{"type":"worker"}}"#.into(),
            ),
            (
                "TRICKY".into(),
                "a \"b\" \\c `d` $HOME ${X} 'e'\nline two".into(),
            ),
            ("EMPTY".into(), String::new()),
        ];
        let text = environment_file(env.iter().map(|(k, v)| (k, v))).unwrap();
        // systemd reads double-quoted values as sh does: source it and print each back.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("env");
        std::fs::write(&path, &text).unwrap();
        for (key, value) in &env {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(". \"$0\"; printf %s \"${key}\""))
                .arg(&path)
                .env_clear()
                .output()
                .unwrap();
            assert_eq!(&String::from_utf8(out.stdout).unwrap(), value, "{text}");
        }
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

    #[test]
    fn the_own_unit_is_read_from_the_cgroup_path() {
        assert_eq!(
            unit_from_cgroup("0::/system.slice/agentd.service\n").as_deref(),
            Some("agentd.service")
        );
        assert_eq!(
            unit_from_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(unit_from_cgroup("0::/\n"), None);
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
