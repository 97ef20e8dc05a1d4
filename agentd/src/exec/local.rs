//! Replicas on this machine. Each replica runs under a supervisor of its own (`agentd-shim`,
//! see [`shim`]) in its own process group (so a stop reaches everything it started), with its
//! output in a size-bounded log file. The supervisor is started by the agent in a session of
//! its own, or, under systemd, by systemd as the main process of a transient unit that holds
//! the replica's cgroup limits; either way it outlives the agent, and the next agent adopts it
//! through its run directory. Process group ids are recorded by the core so that an agent can,
//! on its next start, stop whatever a gang it does not adopt left behind. Nothing here decides
//! what runs: the core does.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
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

use super::{cgroup, shim, signal_group, spawn};
use crate::job::{ExitOutcome, PlatformEnd};

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

/// The variables agentd sets in every replica's environment, over any of the same name the
/// manifest sets: the training cluster, and which job, replica and gang generation it is.
pub const TF_CONFIG: &str = "TF_CONFIG";
pub const AGENTD_JOB: &str = "AGENTD_JOB";
pub const AGENTD_REPLICA: &str = "AGENTD_REPLICA";
pub const AGENTD_GENERATION: &str = "AGENTD_GENERATION";
pub const AGENTD_VARIABLES: [&str; 4] = [TF_CONFIG, AGENTD_JOB, AGENTD_REPLICA, AGENTD_GENERATION];

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
    /// systemd units: its GPUs' device minor numbers (`/dev/nvidia<minor>`, which need not be
    /// the NVML indices), millicores and bytes (0 for no limit).
    pub gpu_devices: Vec<u32>,
    pub cpu_milli: u64,
    pub memory_bytes: u64,
    /// Whom the replica runs as; `None`: as the agent.
    pub user: Option<RunAs>,
    /// Where the scheduler put the replica and the pod it is made from, for an executor that
    /// runs replicas as pods; the local executor runs `argv` here and ignores it.
    pub pod: Option<Box<PodLaunch>>,
}

/// A replica as a pod: its node, its place in the gang, and its group's pod template. `env`
/// of the [`LaunchSpec`] (with `TF_CONFIG`) goes into the training container.
#[derive(Debug, Clone)]
pub struct PodLaunch {
    /// The node the scheduler chose (`spec.nodeName`).
    pub node: String,
    /// The job's namespace (`default` when the manifest names none).
    pub namespace: String,
    pub replica_type: crate::job::ReplicaType,
    pub index: u32,
    /// GPUs the replica was given on the node (`nvidia.com/gpu`).
    pub gpus: u32,
    pub template: k8s_openapi::api::core::v1::PodTemplateSpec,
}

/// A user a replica runs as: its uid and primary gid. Its name, home and supplementary groups
/// come from the user database when the replica starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// A `securityContext` id a template asks for, with where it was asked (for errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AskedId<'a> {
    pub id: i64,
    pub field: &'a str,
}

impl RunAs {
    /// Whom a replica of a job owned by `owner` (uid, gid) runs as: its owner, never root on
    /// someone else's behalf. A template's `securityContext.runAsUser`/`runAsGroup` is
    /// honoured only for a root owner, who could become anyone anyway; a non-root owner may
    /// name only their own uid and primary gid. `None`: as the agent (a root owner asking for
    /// nothing else, or a job stored before owners were recorded).
    pub fn for_owner(
        owner: Option<(u32, u32)>,
        run_as_user: Option<AskedId<'_>>,
        run_as_group: Option<AskedId<'_>>,
    ) -> Result<Option<RunAs>, String> {
        let Some((owner_uid, owner_gid)) = owner else {
            return Ok(None);
        };
        let id = |asked: AskedId<'_>| {
            u32::try_from(asked.id).map_err(|_| {
                format!(
                    "{} is {}; an id is between 0 and {}",
                    asked.field,
                    asked.id,
                    u32::MAX
                )
            })
        };
        let uid = run_as_user.map(id).transpose()?;
        let gid = run_as_group.map(id).transpose()?;
        if owner_uid != 0 {
            for (asked, value, own) in [
                (run_as_user, uid, owner_uid),
                (run_as_group, gid, owner_gid),
            ] {
                if let (Some(asked), Some(value)) = (asked, value)
                    && value != own
                {
                    return Err(format!(
                        "{} is {value}, but the job's owner (uid {owner_uid}) may run replicas \
                         only as themselves ({own}); only root may name another id",
                        asked.field
                    ));
                }
            }
            return Ok(Some(RunAs {
                uid: owner_uid,
                gid: owner_gid,
            }));
        }
        let Some(uid) = uid else {
            return Ok(gid.map(|gid| RunAs { uid: 0, gid }));
        };
        // Without runAsGroup, the user's own primary group, as a login would give.
        let gid = gid.unwrap_or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map_or(uid, |u| u.gid.as_raw())
        });
        Ok(Some(RunAs { uid, gid }))
    }

    /// The credentials, name and home directory of the user: from the user database, or, for
    /// a uid it does not know, the uid alone with its primary group and `/` as its home.
    fn resolve(self) -> (spawn::Credentials, String, String) {
        let uid = nix::unistd::Uid::from_raw(self.uid);
        let gid = nix::unistd::Gid::from_raw(self.gid);
        let entry = nix::unistd::User::from_uid(uid).ok().flatten();
        let (name, home) = entry.as_ref().map_or_else(
            || (self.uid.to_string(), "/".to_owned()),
            |u| (u.name.clone(), u.dir.to_string_lossy().into_owned()),
        );
        let mut groups: Vec<u32> = entry
            .and_then(|u| std::ffi::CString::new(u.name).ok())
            .and_then(|name| nix::unistd::getgrouplist(&name, gid).ok())
            .map(|gs| gs.into_iter().map(nix::unistd::Gid::as_raw).collect())
            .unwrap_or_default();
        if !groups.contains(&self.gid) {
            groups.push(self.gid);
        }
        (
            spawn::Credentials {
                uid: self.uid,
                gid: self.gid,
                groups,
            },
            name,
            home,
        )
    }
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
    /// The platform ended it, or never ran it (cluster mode): evicted, refused by the node,
    /// its volumes or image never ready. After `Started` when it had run.
    Ended(PlatformEnd),
    /// It has not started and waits for something that may never come (cluster mode: its
    /// image, its volumes, a Secret its environment names): what, in Kubernetes' words, and
    /// when the wait ends it. Said when the wait begins, and again if it comes to wait for
    /// something else.
    Waiting {
        message: String,
    },
}

/// How replicas are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    /// Supervisors started by the agent, each in a session of its own.
    Processes,
    /// Transient systemd units whose main process is the supervisor, each with the cgroup
    /// limits of what the replica was given (see [`crate::systemd::ReplicaUnit`]). Stopped
    /// with `systemctl stop`, which stops everything in the unit's cgroup.
    Units {
        /// The unit's `TimeoutStopSec`: SIGTERM, then SIGKILL after this.
        kill_grace: Duration,
        /// The `systemd-run` and `systemctl` to run: found on `PATH`, or stand-ins in tests.
        systemd_run: PathBuf,
        systemctl: PathBuf,
    },
}

impl Runner {
    /// Transient units, made and stopped with the `systemd-run` and `systemctl` on `PATH`.
    pub fn units(kill_grace: Duration) -> Self {
        Self::Units {
            kill_grace,
            systemd_run: "systemd-run".into(),
            systemctl: "systemctl".into(),
        }
    }

    /// The `systemctl` to run, when replicas are units.
    fn systemctl(&self) -> Option<&Path> {
        match self {
            Self::Processes => None,
            Self::Units { systemctl, .. } => Some(systemctl),
        }
    }
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
    reports: mpsc::UnboundedSender<ReplicaReport>,
    /// Where replicas' run directories are (see [`shim`]).
    run_root: PathBuf,
}

/// How the agent starts a replica's supervisor: the program and leading arguments (the run
/// directory follows), and its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl ShimCommand {
    /// The supervisor's executable, installed beside the agent's.
    pub const BINARY: &'static str = "agentd-shim";

    /// `agentd-shim DIR`, the small executable installed beside the agent's: a supervisor
    /// starts for every replica and lives as long as it, so it costs a fraction of the agent's
    /// exec time and memory. An agent with no such file beside it (a lone binary copied
    /// somewhere) runs `agentd shim DIR` from its own executable instead: `/proc/self/exe`
    /// names the file the agent was started from even after a package upgrade replaced it.
    pub fn agentd() -> Self {
        let beside = std::fs::read_link("/proc/self/exe")
            .ok()
            .and_then(|exe| Some(exe.parent()?.join(Self::BINARY)))
            .filter(|shim| crate::job::is_executable_file(shim));
        if let Some(shim) = beside {
            return Self {
                argv: vec![shim.to_string_lossy().into_owned()],
                env: Vec::new(),
            };
        }
        tracing::info!(
            "no {} beside the agent's executable: replicas are supervised by `agentd shim`",
            Self::BINARY
        );
        Self {
            argv: vec!["/proc/self/exe".to_owned(), "shim".to_owned()],
            env: Vec::new(),
        }
    }

    /// The same command for systemd to run as a unit's main process: systemd would read
    /// `/proc/self/exe` as its own, so the agent's executable is named by its path. A file
    /// that an upgrade has replaced since the agent started reads `... (deleted)`; the path
    /// then names the new binary, which reads the same run directories.
    fn for_unit(&self) -> Self {
        let mut command = self.clone();
        if command.argv.first().is_some_and(|p| p == "/proc/self/exe")
            && let Ok(exe) = std::fs::read_link("/proc/self/exe")
        {
            let exe = exe.to_string_lossy();
            exe.strip_suffix(" (deleted)")
                .unwrap_or(&exe)
                .clone_into(&mut command.argv[0]);
        }
        command
    }
}

/// A replica a previous agent left running (or ended while no agent was there), checked and
/// ready to be watched again.
#[derive(Debug)]
pub struct Adoptable {
    job: String,
    replica: String,
    generation: u32,
    /// The replica's pid, also its process group id.
    pid: u32,
    dir: PathBuf,
    /// The supervisor's pidfd; `None` when it has already ended (and left an exit status, or
    /// its unit's end is known to systemd).
    pidfd: Option<OwnedFd>,
    /// The unit the supervisor is the main process of, when replicas are units.
    unit: Option<String>,
}

impl LocalExecutor {
    /// Must be called on the runtime: replicas are watched by tasks on it. `run_root` holds the
    /// replicas' run directories; `shim` starts a replica's supervisor.
    pub fn new(
        reports: mpsc::UnboundedSender<ReplicaReport>,
        log_max_bytes: u64,
        runner: Runner,
        run_root: PathBuf,
        shim: ShimCommand,
    ) -> Self {
        let (launches, queue) = std::sync::mpsc::channel::<LaunchSpec>();
        let units = Arc::new(Mutex::new(HashMap::new()));
        let cgroups = (runner == Runner::Processes)
            .then(replica_cgroups)
            .flatten();
        let shim = match runner {
            Runner::Processes => shim,
            Runner::Units { .. } => shim.for_unit(),
        };
        let starter = Starter {
            reports: reports.clone(),
            log_max_bytes,
            runner: runner.clone(),
            units: Arc::clone(&units),
            run_root: run_root.clone(),
            shim,
            cgroups,
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
            reports,
            run_root,
        }
    }

    /// Whether replicas keep running when the agent stops, to be adopted by the next agent:
    /// they always do, each under its own supervisor, a unit of its own under systemd.
    pub fn replicas_outlive_agent(&self) -> bool {
        true
    }

    /// Stops exactly the named units, of gangs the agent does not adopt (their names come
    /// from the job store or from run directories, never from a pattern). Nothing to do when
    /// replicas are processes: [`LocalExecutor::discard`] finds those.
    pub fn stop_leftover_units(&self, units: &[String]) {
        let Some(systemctl) = self.runner.systemctl() else {
            return;
        };
        if units.is_empty() {
            return;
        }
        match std::process::Command::new(systemctl)
            .arg("stop")
            .args(units)
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::warn!(?units, "systemctl stop ended with {s}"),
            Err(e) => tracing::warn!(?units, "cannot run systemctl stop: {e}"),
        }
    }

    /// Checks that replica `replica` (generation `generation`, process group `pid`) of `job`,
    /// started by a previous agent, can be watched again: its supervisor still runs, or has
    /// recorded how the replica ended, or (a unit) systemd knows how its unit ended. Says why
    /// not otherwise.
    pub fn adoptable(
        &self,
        job: &str,
        replica: &str,
        generation: u32,
        pid: u32,
    ) -> Result<Adoptable, String> {
        let dir = shim::run_dir(&self.run_root, job, replica, generation);
        let state: shim::ShimState = shim::read(&dir, shim::STATE_FILE)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} has no supervisor record", dir.display()))?;
        if state.pid != pid {
            return Err(format!(
                "{} names process {}, not {pid}",
                dir.join(shim::STATE_FILE).display(),
                state.pid
            ));
        }
        let unit = match self.runner {
            Runner::Processes => None,
            Runner::Units { .. } => Some(
                crate::systemd::unit_name(job, replica, generation).map_err(|e| e.to_string())?,
            ),
        };
        let pidfd = supervisor_pidfd(&state);
        if pidfd.is_none() && !dir.join(shim::EXIT_FILE).exists() {
            let gone = format!(
                "its supervisor (pid {}) is gone and left no exit status",
                state.shim_pid
            );
            let (Some(unit), Some(systemctl)) = (&unit, self.runner.systemctl()) else {
                return Err(gone);
            };
            // The unit was killed: systemd says how, once it has seen its main process end.
            match unit_end_blocking(systemctl, unit) {
                Some(status) if !status.known() => {
                    return Err(format!("{gone}, and systemd no longer knows {unit}"));
                }
                Some(status) if status.main_ended() => {}
                Some(status) => {
                    return Err(format!(
                        "{gone}, yet systemd says {unit} is {}",
                        status.active_state
                    ));
                }
                None => return Err(format!("{gone}, and systemd cannot tell how {unit} ended")),
            }
        }
        Ok(Adoptable {
            job: job.to_owned(),
            replica: replica.to_owned(),
            generation,
            pid,
            dir,
            pidfd,
            unit,
        })
    }

    /// Watches an adopted replica as if this agent had started it: its end is reported.
    pub fn adopt(&self, adoptable: Adoptable) -> Result<(), String> {
        let Adoptable {
            job,
            replica,
            generation,
            pid,
            dir,
            pidfd,
            unit,
        } = adoptable;
        let unit = unit.zip(self.runner.systemctl().map(Path::to_owned));
        let watch = ShimWatch::new(None, (pid, job.clone()), pidfd, dir, unit.clone())
            .map_err(|e| format!("cannot watch the supervisor of {replica}: {e}"))?;
        if let Some((name, _)) = &unit {
            // A cancel stops the whole unit, as for a replica this agent started.
            self.units
                .lock()
                .expect("not poisoned")
                .insert(pid, name.clone());
        }
        let reports = self.reports.clone();
        let units = Arc::clone(&self.units);
        tokio::spawn(async move {
            let outcome = watch.wait().await;
            units.lock().expect("not poisoned").remove(&pid);
            let _ = reports.send(ReplicaReport {
                job,
                replica,
                generation,
                event: ReplicaEvent::Exited { outcome },
            });
        });
        Ok(())
    }

    /// Stops whatever a previous agent's replicas of `job` left running (their units by their
    /// exact names, their processes by process group) and forgets their run directories: the
    /// gang could not be adopted. Returns how many processes were killed.
    pub fn discard(&self, job: &str) -> usize {
        let job_dir = self.run_root.join(job);
        let runs: Vec<PathBuf> = std::fs::read_dir(&job_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        if self.runner.systemctl().is_some() {
            // Run directories are `<replica>.<generation>`, one per unit.
            let units: Vec<String> = runs
                .iter()
                .filter_map(|run| {
                    let name = run.file_name()?.to_str()?;
                    let (replica, generation) = name.rsplit_once('.')?;
                    crate::systemd::unit_name(job, replica, generation.parse().ok()?).ok()
                })
                .collect();
            self.stop_leftover_units(&units);
        }
        let mut killed = 0;
        for run in &runs {
            if let Ok(Some(state)) = shim::read::<shim::ShimState>(run, shim::STATE_FILE) {
                killed += kill_leftovers(state.pid, job);
            }
        }
        remove_run_dirs(&job_dir);
        killed
    }

    /// Jobs that have run directories (replicas a previous agent started).
    pub fn jobs_with_replicas(&self) -> Vec<String> {
        std::fs::read_dir(&self.run_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    /// Starts one replica in the background; a report follows.
    pub fn launch(&self, spec: LaunchSpec) {
        // The thread ends only when every executor handle is gone, so this cannot fail while
        // `self` exists.
        let _ = self.launches.send(spec);
    }

    /// Stops replicas by process group: SIGTERM now, SIGKILL to whatever is left after
    /// `grace`. A replica that is a unit is stopped through systemd instead, which sends
    /// SIGTERM to its supervisor (passed on to the replica) and, after the same grace,
    /// SIGKILL to everything in the unit's cgroup.
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
        let systemctl = self.runner.systemctl().map(Path::to_owned);
        async move {
            let mut term: Vec<u32> = pgids
                .iter()
                .copied()
                .filter(|p| !units.contains_key(p))
                .collect();
            for (pgid, unit) in &units {
                let Some(systemctl) = &systemctl else { break };
                let argv = crate::systemd::stop_unit_argv(systemctl, unit);
                let status = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .status()
                    .await;
                if !status.is_ok_and(|s| s.success()) {
                    tracing::warn!(unit, "systemctl stop failed; the replica is signalled");
                    term.push(*pgid);
                }
            }
            // systemd kills a unit at the end of its own grace; the replica's group is given
            // a moment more before it is killed from here.
            let wait = if units.is_empty() {
                grace
            } else {
                grace + Duration::from_secs(5)
            };
            stop_groups_after(term, pgids, wait).await;
        }
    }
}

/// What the starter thread needs.
struct Starter {
    reports: mpsc::UnboundedSender<ReplicaReport>,
    log_max_bytes: u64,
    runner: Runner,
    units: Arc<Mutex<HashMap<u32, String>>>,
    run_root: PathBuf,
    shim: ShimCommand,
    /// Where replicas' memory cgroups are made; `None`: they get none.
    cgroups: Option<cgroup::CgroupParent>,
}

impl Starter {
    /// Starts one replica and reports `Started` (then, from its watcher, `Exited`) or
    /// `StartFailed`.
    fn start(&self, spec: LaunchSpec) {
        let start_failed = |spec: &LaunchSpec, source: std::io::Error| {
            let e = ExecError::Spawn {
                job: spec.job.clone(),
                replica: spec.replica.clone(),
                program: spec.argv.first().cloned().unwrap_or_default(),
                source,
            };
            ReplicaEvent::StartFailed {
                message: e.to_string(),
                transient: e.is_transient(),
            }
        };
        let reports = self.reports.clone();
        let report = move |spec: &LaunchSpec, event| {
            let _ = reports.send(ReplicaReport {
                job: spec.job.clone(),
                replica: spec.replica.clone(),
                generation: spec.generation,
                event,
            });
        };
        let dir = shim::run_dir(&self.run_root, &spec.job, &spec.replica, spec.generation);
        if let Err(e) = shim::prepare(&dir, &self.shim_spec(&spec)) {
            report(
                &spec,
                start_failed(&spec, std::io::Error::other(e.to_string())),
            );
            return;
        }
        match &self.runner {
            Runner::Processes => match self.start_shim(&spec, dir) {
                // The supervisor says on its pipe whether the replica runs; that is waited
                // for on the runtime, so this thread goes on to start the next supervisor.
                Ok(pending) => {
                    tokio::spawn(async move {
                        match pending.started().await {
                            Ok((pid, watch)) => {
                                report(&spec, ReplicaEvent::Started { pid });
                                let outcome = watch.wait().await;
                                report(&spec, ReplicaEvent::Exited { outcome });
                            }
                            Err(source) => report(&spec, start_failed(&spec, source)),
                        }
                    });
                }
                Err(e) => report(&spec, start_failed(&spec, e)),
            },
            Runner::Units {
                kill_grace,
                systemd_run,
                systemctl,
            } => {
                let unit = crate::systemd::ReplicaUnit {
                    job: spec.job.clone(),
                    replica: spec.replica.clone(),
                    generation: spec.generation,
                    gpus: spec.gpu_devices.clone(),
                    cpu_milli: spec.cpu_milli,
                    memory_bytes: spec.memory_bytes,
                    supervisor: self
                        .shim
                        .argv
                        .iter()
                        .cloned()
                        .chain([dir.to_string_lossy().into_owned()])
                        .collect(),
                    supervisor_env: self.shim.env.clone(),
                    kill_grace: *kill_grace,
                };
                let argv = match unit
                    .systemd_run_argv(systemd_run)
                    .and_then(|argv| unit.unit_name().map(|name| (name, argv)))
                {
                    Ok(argv) => argv,
                    Err(e) => {
                        forget_run_dir(&dir);
                        report(
                            &spec,
                            start_failed(&spec, std::io::Error::other(e.to_string())),
                        );
                        return;
                    }
                };
                let units = Arc::clone(&self.units);
                let systemctl = systemctl.clone();
                tokio::spawn(async move {
                    let (name, argv) = argv;
                    match start_unit(&argv, &spec.job, &dir, &systemctl, &name).await {
                        Ok((pid, watch)) => {
                            // Before `Started`: a stop that follows it reaches the unit.
                            units.lock().expect("not poisoned").insert(pid, name);
                            report(&spec, ReplicaEvent::Started { pid });
                            let outcome = watch.wait().await;
                            units.lock().expect("not poisoned").remove(&pid);
                            report(&spec, ReplicaEvent::Exited { outcome });
                        }
                        Err(source) => report(&spec, start_failed(&spec, source)),
                    }
                });
            }
        }
    }

    /// What the replica's supervisor runs: the replica's whole environment (the agent's
    /// login-like variables, the user's identity, then the job's own), its user, its log and,
    /// where the agent can make one and the replica is not a unit, its memory cgroup.
    fn shim_spec(&self, spec: &LaunchSpec) -> shim::ShimSpec {
        let user = spec.user.map(RunAs::resolve);
        // The user's own identity and home, unless the manifest says otherwise.
        let identity: Vec<(String, String)> = user
            .iter()
            .flat_map(|(_, name, home)| {
                [
                    ("HOME".to_owned(), home.clone()),
                    ("USER".to_owned(), name.clone()),
                    ("LOGNAME".to_owned(), name.clone()),
                ]
            })
            .filter(|(k, _)| !spec.env.contains_key(k))
            .collect();
        let env: Vec<(String, String)> = inherited_env()
            .filter(|(k, _)| !spec.env.contains_key(k))
            .filter(|(k, _)| !identity.iter().any(|(i, _)| i == k))
            .chain(identity.iter().cloned())
            .chain(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect();
        shim::ShimSpec {
            argv: spec.argv.clone(),
            env,
            working_dir: spec.working_dir.clone(),
            log_path: spec.log_path.clone(),
            log_max_bytes: self.log_max_bytes,
            title: format!("{} generation {}", spec.replica, spec.generation),
            user: user.map(|(credentials, _, _)| credentials),
            cgroup: self.cgroups.as_ref().map(|parent| shim::ShimCgroup {
                parent: parent.clone(),
                name: cgroup::name(&spec.job, &spec.replica, spec.generation),
                memory_max: spec.memory_bytes,
            }),
            oom_in_own_cgroup: matches!(self.runner, Runner::Units { .. }),
        }
    }

    /// Starts the supervisor of the replica whose run directory `dir` is prepared; it starts
    /// the replica and says so (or why it could not) on a pipe, read by
    /// [`PendingShim::started`].
    fn start_shim(&self, spec: &LaunchSpec, dir: PathBuf) -> std::io::Result<PendingShim> {
        let forget = |e: std::io::Error| {
            forget_run_dir(&dir);
            e
        };
        let (said, said_write) = pipe().map_err(forget)?;
        let mut argv = self.shim.argv.clone();
        argv.push(dir.to_string_lossy().into_owned());
        let spawned = spawn::spawn(&spawn::Command {
            argv: &argv,
            env: &self.shim.env,
            working_dir: None,
            stdout: &said_write,
            stderr: &said_write,
            detach: spawn::Detach::Outlives,
            user: None,
            cgroup_procs: None,
        })
        .map_err(forget)?;
        drop(said_write);
        let job = spec.job.clone();
        let said = match pipe::Receiver::from_owned_fd(said) {
            Ok(said) => said,
            Err(e) => {
                // Unheard, the supervisor could not be watched: it must not run at all.
                // SAFETY: a plain signal to our own child, not yet reaped.
                unsafe { libc::kill(spawned.pid.cast_signed(), libc::SIGKILL) };
                spawn::reap(spawned.pid.cast_signed());
                return Err(forget(e));
            }
        };
        Ok(PendingShim {
            spawned,
            said,
            job,
            dir,
        })
    }
}

/// Removes a replica's run directory, and its job's once that is empty (the job's other
/// replicas may still run).
fn forget_run_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    if let Some(job_dir) = dir.parent() {
        let _ = std::fs::remove_dir(job_dir);
    }
}

/// Starts the replica's unit (`argv`, the `systemd-run` command line) and waits until its
/// supervisor has recorded in `dir` that the replica runs. Returns the replica's pid and a
/// watcher of the supervisor; on failure nothing of it is left, unit and run directory
/// included.
async fn start_unit(
    argv: &[OsString],
    job: &str,
    dir: &Path,
    systemctl: &Path,
    unit: &str,
) -> std::io::Result<(u32, ShimWatch)> {
    let forget = |why: String| async move {
        // One that runs is stopped; one that ended in failure stays loaded until it is reset,
        // once systemd has seen it end.
        run_quietly(&crate::systemd::stop_unit_argv(systemctl, unit)).await;
        let _ = unit_outcome(systemctl, unit).await;
        forget_run_dir(dir);
        std::io::Error::other(why)
    };
    let output = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match output {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = format!(
                "{} failed ({}): {}",
                argv[0].to_string_lossy(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return Err(forget(why).await);
        }
        Err(e) => {
            let why = format!("cannot run {}: {e}", argv[0].to_string_lossy());
            let forgotten = forget(why).await;
            // A moment's shortage (EAGAIN, EMFILE) stays what it is: the start may be retried.
            return Err(if e.raw_os_error().is_some() {
                e
            } else {
                forgotten
            });
        }
    }
    let state = match recorded_start(dir, systemctl, unit, UNIT_START_TIMEOUT).await {
        Ok(state) => state,
        Err(why) => return Err(forget(why).await),
    };
    let unit = Some((unit.to_owned(), systemctl.to_owned()));
    let watch = ShimWatch::new(
        None,
        (state.pid, job.to_owned()),
        supervisor_pidfd(&state),
        dir.to_owned(),
        unit,
    );
    match watch {
        Ok(watch) => Ok((state.pid, watch)),
        Err(e) => {
            // Unwatched, it could not be reported: it must not run at all.
            Err(forget(format!("cannot watch its supervisor: {e}")).await)
        }
    }
}

/// How long a unit's supervisor may take to say that its replica runs, or why not: it reads a
/// small spec and starts one process, so only a supervisor that hangs (or a systemd that
/// cannot say what became of the unit) comes near it.
const UNIT_START_TIMEOUT: Duration = Duration::from_mins(1);

/// Waits until the supervisor in `dir` has recorded that the replica runs, or why it could not
/// start, or until its unit has ended without a word, or `timeout` has passed; says why in the
/// last three cases.
async fn recorded_start(
    dir: &Path,
    systemctl: &Path,
    unit: &str,
    timeout: Duration,
) -> Result<shim::ShimState, String> {
    let look = || -> Result<Option<shim::ShimState>, String> {
        if let Some(state) = shim::read(dir, shim::STATE_FILE).map_err(|e| e.to_string())? {
            return Ok(Some(state));
        }
        match shim::read::<String>(dir, shim::FAILED_FILE) {
            Ok(Some(why)) => Err(why),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    };
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(state) = look()? {
            return Ok(state);
        }
        if started.elapsed() >= timeout {
            let said = match unit_status(systemctl, unit).await {
                Some(status) => format!(
                    "unit {unit}: {}, result {}",
                    status.active_state, status.result
                ),
                None => format!("unit {unit}: systemd cannot say"),
            };
            return Err(format!(
                "its supervisor did not start the replica within {} s ({said})",
                timeout.as_secs_f64()
            ));
        }
        // Ask systemd only about a supervisor slow to say anything: was it ever run?
        if started.elapsed() >= Duration::from_millis(500)
            && let Some(status) = unit_status(systemctl, unit).await
            && status.main_ended()
        {
            // It may have written just before it ended.
            return look()?.ok_or_else(|| {
                format!(
                    "its supervisor ended before it started the replica (unit {unit}: {}, \
                     result {})",
                    status.active_state, status.result
                )
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// What systemd says about `unit` now; `None` when `systemctl` cannot be run or read.
async fn unit_status(systemctl: &Path, unit: &str) -> Option<crate::systemd::UnitStatus> {
    let argv = crate::systemd::show_unit_argv(systemctl, unit);
    let out = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    read_unit_status(unit, out)
}

/// [`unit_status`] for a caller that is not async (adoption at start-up), waiting (a few
/// seconds at most) until systemd has seen the unit's main process end.
fn unit_end_blocking(systemctl: &Path, unit: &str) -> Option<crate::systemd::UnitStatus> {
    let argv = crate::systemd::show_unit_argv(systemctl, unit);
    let mut status = None;
    for _ in 0..50 {
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .output();
        status = read_unit_status(unit, out);
        if status
            .as_ref()
            .is_none_or(crate::systemd::UnitStatus::main_ended)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    status
}

fn read_unit_status(
    unit: &str,
    out: std::io::Result<std::process::Output>,
) -> Option<crate::systemd::UnitStatus> {
    let text = match out {
        Ok(out) if out.status.success() => out.stdout,
        Ok(out) => {
            tracing::warn!(
                unit,
                "systemctl show ended with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(unit, "cannot run systemctl show: {e}");
            return None;
        }
    };
    crate::systemd::UnitStatus::parse(&String::from_utf8_lossy(&text))
        .inspect_err(|e| tracing::warn!(unit, "{e}"))
        .ok()
}

/// Runs a `systemctl` command whose failure changes nothing (the unit is already gone).
async fn run_quietly(argv: &[OsString]) {
    let _ = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

/// Where replicas' memory cgroups can be made on this machine, checked by making and removing
/// one; `None`, said once in the log, where they cannot.
fn replica_cgroups() -> Option<cgroup::CgroupParent> {
    let parent = cgroup::find_parent().and_then(|parent| {
        let probe = format!("agentd-probe-{}", std::process::id());
        cgroup::ReplicaCgroup::create(&parent, &probe, 0)
            .map(cgroup::ReplicaCgroup::remove)
            .map(|()| parent)
            .map_err(|e| e.to_string())
    });
    match parent {
        Ok(parent) => {
            tracing::info!(
                parent = %parent.path.display(),
                v2 = parent.v2,
                "replicas get memory cgroups of their own: memory limits are enforced and OOM \
                 kills are seen"
            );
            Some(parent)
        }
        Err(why) => {
            tracing::warn!(
                "replicas run without memory cgroups of their own, so memory limits are not \
                 enforced and an OOM kill is seen as a plain SIGKILL: {why}"
            );
            None
        }
    }
}

/// A supervisor that has been started and has not yet said whether its replica runs.
struct PendingShim {
    spawned: spawn::Spawned,
    /// The read end of the pipe it speaks on.
    said: pipe::Receiver,
    job: String,
    dir: PathBuf,
}

impl PendingShim {
    /// Waits for the supervisor to say that the replica runs (its pipe closes then, or when
    /// it ends having failed to start it). Returns the replica's pid and a watcher of the
    /// supervisor; on failure nothing of it is left, run directory included.
    async fn started(self) -> std::io::Result<(u32, ShimWatch)> {
        let Self {
            spawned,
            mut said,
            job,
            dir,
        } = self;
        let mut text = String::new();
        let _ = said.read_to_string(&mut text).await;
        let started = text
            .lines()
            .find_map(|l| l.split_once(shim::STARTED).map(|(_, pid)| pid))
            .and_then(|pid| pid.trim().parse::<u32>().ok());
        let forget = |e: std::io::Error| {
            forget_run_dir(&dir);
            e
        };
        let Some(pid) = started else {
            spawn::reap(spawned.pid.cast_signed());
            let message = text
                .lines()
                .find_map(|l| l.split_once(shim::FAILED).map(|(_, why)| why))
                .map_or_else(
                    || format!("its supervisor ended without starting it: {text:?}"),
                    str::to_owned,
                );
            return Err(forget(std::io::Error::other(message)));
        };
        match ShimWatch::new(
            Some(spawned.pid),
            (pid, job),
            Some(spawned.pidfd),
            dir.clone(),
            None,
        ) {
            Ok(watch) => Ok((pid, watch)),
            Err(e) => {
                // Unwatched, it could not be reported: it must not run at all.
                signal_group(pid, Signal::SIGKILL);
                Err(forget(e))
            }
        }
    }
}

/// A replica's supervisor as the agent watches it.
struct ShimWatch {
    /// Its pid when it is the agent's own child, to be reaped.
    pid: Option<u32>,
    /// The replica's process group and job, for what is left of it when the supervisor dies
    /// without recording the replica's end (it was killed).
    replica: (u32, String),
    /// `None` when it has already ended.
    pidfd: Option<AsyncFd<OwnedFd>>,
    dir: PathBuf,
    /// The unit the supervisor is the main process of, and the `systemctl` that asks about
    /// it; `None` when replicas are processes.
    unit: Option<(String, PathBuf)>,
}

impl ShimWatch {
    fn new(
        pid: Option<u32>,
        replica: (u32, String),
        pidfd: Option<OwnedFd>,
        dir: PathBuf,
        unit: Option<(String, PathBuf)>,
    ) -> std::io::Result<Self> {
        let pidfd = pidfd
            // SAFETY: an OwnedFd keeps its descriptor open and unchanged until it is dropped,
            // which is when the AsyncFd is.
            .map(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) })
            .transpose()?;
        Ok(Self {
            pid,
            replica,
            pidfd,
            dir,
            unit,
        })
    }

    /// Waits for the supervisor to end and returns how the replica ended (for a unit whose
    /// supervisor left no record, what systemd says of it; otherwise an unknown end when it
    /// left none), then forgets the run directory.
    async fn wait(self) -> ExitOutcome {
        if let Some(pidfd) = &self.pidfd {
            // A pidfd only ever turns readable, when the process has exited.
            let _ = pidfd.readable().await;
        }
        if let Some(pid) = self.pid {
            spawn::reap(pid.cast_signed());
        }
        let outcome = match shim::read::<shim::ShimExit>(&self.dir, shim::EXIT_FILE) {
            Ok(Some(exit)) => exit.into(),
            Ok(None) => {
                let (pgid, job) = &self.replica;
                let killed = kill_leftovers(*pgid, job);
                let outcome = match &self.unit {
                    Some((unit, systemctl)) => unit_outcome(systemctl, unit).await,
                    None => None,
                };
                tracing::warn!(
                    dir = %self.dir.display(),
                    killed,
                    "a replica's supervisor ended without recording its exit; \
                     stopped what was left of the replica"
                );
                outcome.unwrap_or_default()
            }
            Err(e) => {
                tracing::warn!("{e}");
                ExitOutcome::default()
            }
        };
        forget_run_dir(&self.dir);
        outcome
    }
}

/// How the replica of a unit whose supervisor left no record ended, from systemd, once it
/// has seen the supervisor end (a while at most); then the unit, which stays loaded when it
/// failed, is forgotten. `None` when systemd cannot say.
async fn unit_outcome(systemctl: &Path, unit: &str) -> Option<ExitOutcome> {
    let mut pause = Duration::from_millis(10);
    let mut status = None;
    for _ in 0..40 {
        status = unit_status(systemctl, unit).await;
        if status
            .as_ref()
            .is_none_or(crate::systemd::UnitStatus::main_ended)
        {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
    let status = status?;
    if !status.main_ended() {
        // The supervisor is gone but systemd has not said so: what is left of the unit goes.
        run_quietly(&crate::systemd::stop_unit_argv(systemctl, unit)).await;
    }
    run_quietly(&crate::systemd::reset_failed_argv(systemctl, unit)).await;
    tracing::info!(
        unit,
        result = status.result,
        main_code = status.main_code,
        main_status = status.main_status,
        "systemd says how the unit ended"
    );
    status.replica_outcome()
}

/// A pidfd for `pid`, which need not be a child; `None` when it is gone.
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a new descriptor that nothing else owns.
    (fd >= 0).then(|| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// A pidfd for the supervisor recorded in `state`; `None` when it has ended. The pidfd is
/// taken first, then the start time read: a pidfd taken on a pid that was reused would show a
/// different start time, so a match means this pidfd is the supervisor's.
fn supervisor_pidfd(state: &shim::ShimState) -> Option<OwnedFd> {
    pidfd_open(state.shim_pid)
        .filter(|_| shim::start_time(state.shim_pid) == Some(state.shim_start))
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)
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

/// Removes a discarded job's run directories. A replica's shim that outlives the replica it
/// was told to kill writes the replica's exit into its run directory as the removal walks it, and
/// a directory that gained a file since it was read is not empty when its turn comes: the removal
/// is tried again until nothing is left or a second has passed.
fn remove_run_dirs(job_dir: &Path) {
    for _ in 0..50 {
        match std::fs::remove_dir_all(job_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound && job_dir.exists() => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => return,
        }
    }
    tracing::warn!(dir = %job_dir.display(), "a discarded job's run directory could not be removed");
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
    use crate::exec::describe;

    /// The test binary itself stands in for `agentd shim`: run with only the test below
    /// selected (the run directory, a second filter, selects nothing), it supervises the
    /// replica and exits.
    fn test_shim() -> ShimCommand {
        ShimCommand {
            argv: vec![
                std::env::current_exe()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                "--exact".to_owned(),
                "exec::local::tests::shim_entry".to_owned(),
                "--nocapture".to_owned(),
                "--test-threads=1".to_owned(),
            ],
            env: vec![("AGENTD_TEST_SHIM".to_owned(), "1".to_owned())],
        }
    }

    #[test]
    fn shim_entry() {
        if std::env::var_os("AGENTD_TEST_SHIM").is_none() {
            return;
        }
        let dir = std::env::args().next_back().unwrap();
        std::process::exit(shim::main(Path::new(&dir)));
    }

    fn executor(dir: &Path, tx: mpsc::UnboundedSender<ReplicaReport>) -> LocalExecutor {
        executor_with(dir, tx, Runner::Processes)
    }

    fn executor_with(
        dir: &Path,
        tx: mpsc::UnboundedSender<ReplicaReport>,
        runner: Runner,
    ) -> LocalExecutor {
        LocalExecutor::new(tx, 1 << 20, runner, dir.join("replicas"), test_shim())
    }

    /// Replicas as units, made and stopped by stand-ins for `systemd-run` and `systemctl` in
    /// `dir/systemd` (these machines run without systemd). `systemd-run` starts the unit's
    /// main process outside the agent, in a session of its own, as systemd does, and records
    /// its pid; `systemctl stop` sends it SIGTERM (`KillMode=mixed`); `systemctl show` prints
    /// `<unit>.show` when a test recorded what systemd would say, else a running unit while
    /// the main process lives, else an unknown one. Every call is logged in `calls`.
    fn fake_units(dir: &Path) -> Runner {
        use std::os::unix::fs::PermissionsExt;
        let fake = dir.join("systemd");
        std::fs::create_dir_all(&fake).unwrap();
        let quoted = format!("'{}'", fake.display());
        let systemd_run = fake.join("systemd-run");
        std::fs::write(
            &systemd_run,
            format!(
                r#"#!/bin/sh
fake={quoted}
echo "systemd-run $*" >> "$fake/calls"
unit=
while [ $# -gt 0 ]; do
    case "$1" in
        --unit=*) unit=${{1#--unit=}} ;;
        --setenv=*) export "${{1#--setenv=}}" ;;
        --) shift; break ;;
    esac
    shift
done
setsid "$@" > "$fake/$unit.out" 2>&1 < /dev/null &
echo $! > "$fake/$unit.pid"
"#
            ),
        )
        .unwrap();
        let systemctl = fake.join("systemctl");
        std::fs::write(
            &systemctl,
            format!(
                r#"#!/bin/sh
fake={quoted}
echo "systemctl $*" >> "$fake/calls"
command=$1
shift
for unit in "$@"; do
    case "$unit" in --*) continue ;; esac
    pid=$(cat "$fake/$unit.pid" 2>/dev/null)
    case "$command" in
        stop) [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null ;;
        show)
            if [ -f "$fake/$unit.show" ]; then
                cat "$fake/$unit.show"
            elif [ -n "$pid" ] && [ -d "/proc/$pid" ] && ! grep -q '^State:.Z' "/proc/$pid/status"; then
                printf 'LoadState=loaded
ActiveState=active
Result=success
ExecMainCode=0
ExecMainStatus=0
'
            else
                printf 'LoadState=not-found
ActiveState=inactive
Result=success
ExecMainCode=0
ExecMainStatus=0
'
            fi ;;
    esac
done
exit 0
"#
            ),
        )
        .unwrap();
        for script in [&systemd_run, &systemctl] {
            std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Runner::Units {
            kill_grace: Duration::from_secs(10),
            systemd_run,
            systemctl,
        }
    }

    /// What the stand-ins were asked, one call a line.
    fn systemd_calls(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("systemd/calls")).unwrap_or_default()
    }

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
            gpu_devices: Vec::new(),
            cpu_milli: 0,
            memory_bytes: 0,
            user: None,
            pod: None,
        }
    }

    #[test]
    fn only_root_may_name_another_user_or_group() {
        let asked = |id| {
            Some(AskedId {
                id,
                field: "spec.x.securityContext.runAsUser",
            })
        };
        let group = |id| {
            Some(AskedId {
                id,
                field: "spec.x.securityContext.runAsGroup",
            })
        };
        let alice = Some((1000, 1000));
        // A user runs as themselves, whatever the manifest leaves out.
        assert_eq!(
            RunAs::for_owner(alice, None, None).unwrap(),
            Some(RunAs {
                uid: 1000,
                gid: 1000
            })
        );
        assert_eq!(
            RunAs::for_owner(alice, asked(1000), group(1000)).unwrap(),
            Some(RunAs {
                uid: 1000,
                gid: 1000
            })
        );
        // No field gets a user's replica root, or anyone else.
        for (user, grp) in [
            (asked(0), None),
            (None, group(0)),
            (asked(1001), None),
            (asked(-1), None),
        ] {
            let e = RunAs::for_owner(alice, user, grp).unwrap_err();
            assert!(e.contains("securityContext.runAs"), "{e}");
        }
        // Root may become anyone; asking nothing runs as the agent does.
        assert_eq!(RunAs::for_owner(Some((0, 0)), None, None).unwrap(), None);
        assert_eq!(
            RunAs::for_owner(Some((0, 0)), asked(1000), group(44)).unwrap(),
            Some(RunAs { uid: 1000, gid: 44 })
        );
        let e = RunAs::for_owner(Some((0, 0)), asked(1 << 40), None).unwrap_err();
        assert!(e.contains("runAsUser is 1099511627776"), "{e}");
    }

    #[tokio::test]
    async fn runs_a_replica_and_reports_its_exit() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = executor(dir.path(), tx);
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
    async fn a_replica_over_its_memory_limit_is_reported_oom_killed() {
        if let Err(why) = cgroup::find_parent() {
            eprintln!("SKIPPED: this machine cannot give replicas memory cgroups: {why}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = executor(dir.path(), tx);
        let mut hog = spec(
            dir.path(),
            "hog-0",
            &["python3", "-c", "b = b'x' * (256 << 20)"],
        );
        hog.memory_bytes = 32 << 20;
        let mut within = spec(dir.path(), "within-0", &["sh", "-c", "kill -9 $$"]);
        within.memory_bytes = 32 << 20;
        // A child killed for memory, and the replica goes on to exit 0: it succeeded.
        let mut survivor = spec(
            dir.path(),
            "survivor-0",
            &["sh", "-c", "python3 -c \"b = b'x' * (256 << 20)\"; exit 0"],
        );
        survivor.memory_bytes = 32 << 20;
        executor.launch(hog);
        executor.launch(within);
        executor.launch(survivor);
        let mut outcomes = BTreeMap::new();
        while outcomes.len() < 3 {
            let report = rx.recv().await.unwrap();
            if let ReplicaEvent::Exited { outcome } = report.event {
                outcomes.insert(report.replica, outcome);
            }
        }
        let hog = outcomes["hog-0"];
        assert!(hog.oom_killed, "{hog:?}");
        assert_eq!(hog.signal, Some(libc::SIGKILL), "{hog:?}");
        assert!(describe(hog).starts_with("OOMKilled"), "{}", describe(hog));
        // A SIGKILL from anyone else is not an OOM kill.
        let within = outcomes["within-0"];
        assert_eq!(within.signal, Some(libc::SIGKILL), "{within:?}");
        assert!(!within.oom_killed, "{within:?}");
        assert_eq!(describe(within), "killed by SIGKILL");
        let survivor = outcomes["survivor-0"];
        assert_eq!(survivor.code, Some(0), "{survivor:?}");
        assert!(!survivor.oom_killed, "{survivor:?}");
    }

    #[tokio::test]
    async fn a_silent_replica_leaves_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = executor(dir.path(), tx);
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
        let executor = executor(dir.path(), tx);
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

    /// Waits (a while at most) until `path` exists.
    async fn wait_for_file(path: &Path) {
        for _ in 0..600 {
            if path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} never appeared", path.display());
    }

    #[tokio::test]
    async fn a_replica_outlives_its_agent_and_is_adopted_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let mut replica = spec(
            dir.path(),
            "worker-0",
            &[
                "sh",
                "-c",
                "echo before; while [ ! -e \"$GO\" ]; do sleep 0.05; done; echo after; exit 4",
            ],
        );
        replica
            .env
            .insert("GO".into(), go.to_string_lossy().into_owned());
        let log_path = replica.log_path.clone();
        let first = start_with_an_agent_that_goes_away(dir.path(), replica);
        assert!(group_alive(first), "the replica runs on without its agent");

        let (tx, mut rx) = mpsc::unbounded_channel();
        let second = executor(dir.path(), tx);
        assert!(second.adoptable("j", "worker-0", 1, first + 1).is_err());
        assert!(second.adoptable("j", "worker-1", 1, first).is_err());
        let adoptable = second.adoptable("j", "worker-0", 1, first).unwrap();
        second.adopt(adoptable).unwrap();
        std::fs::write(&go, "").unwrap();
        let exit = rx.recv().await.unwrap();
        assert_eq!((exit.replica.as_str(), exit.generation), ("worker-0", 1));
        assert!(
            matches!(exit.event, ReplicaEvent::Exited { outcome } if outcome.code == Some(4)),
            "{exit:?}"
        );
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(log.contains("before\nafter\n"), "{log}");
        assert!(log.contains("ended: exit code 4"), "{log}");
        assert!(
            second.jobs_with_replicas().is_empty(),
            "the run directory is gone once the end is reported"
        );
    }

    /// Starts a replica with an executor whose runtime (and with it every task watching the
    /// replica) then ends, as when the agent is stopped or killed. Returns the replica's pid.
    fn start_with_an_agent_that_goes_away(dir: &Path, replica: LaunchSpec) -> u32 {
        start_with_an_agent_that_goes_away_as(dir, replica, Runner::Processes)
    }

    fn start_with_an_agent_that_goes_away_as(
        dir: &Path,
        replica: LaunchSpec,
        runner: Runner,
    ) -> u32 {
        let dir = dir.to_owned();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let executor = executor_with(&dir, tx, runner);
                executor.launch(replica);
                let report = rx.recv().await.unwrap();
                let ReplicaEvent::Started { pid } = report.event else {
                    panic!("not started: {report:?}");
                };
                pid
            })
        })
        .join()
        .unwrap()
    }

    #[tokio::test]
    async fn an_end_recorded_while_no_agent_ran_is_reported_on_adoption() {
        let dir = tempfile::tempdir().unwrap();
        let pid = start_with_an_agent_that_goes_away(
            dir.path(),
            spec(dir.path(), "ps-0", &["sh", "-c", "exit 7"]),
        );
        let run = shim::run_dir(&dir.path().join("replicas"), "j", "ps-0", 1);
        wait_for_file(&run.join(shim::EXIT_FILE)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let second = executor(dir.path(), tx);
        second
            .adopt(second.adoptable("j", "ps-0", 1, pid).unwrap())
            .unwrap();
        let exit = rx.recv().await.unwrap().event;
        assert!(
            matches!(exit, ReplicaEvent::Exited { outcome } if outcome.code == Some(7)),
            "{exit:?}"
        );
    }

    /// The supervisor's record of where a replica runs.
    fn shim_state(dir: &Path, job: &str, replica: &str) -> shim::ShimState {
        let run = shim::run_dir(&dir.join("replicas"), job, replica, 1);
        shim::read(&run, shim::STATE_FILE).unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_unit_replica_outlives_its_agent_and_is_adopted_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let mut replica = spec(
            dir.path(),
            "worker-0",
            &[
                "sh",
                "-c",
                "echo before; while [ ! -e \"$GO\" ]; do sleep 0.05; done; echo after; exit 4",
            ],
        );
        replica
            .env
            .insert("GO".into(), go.to_string_lossy().into_owned());
        let log_path = replica.log_path.clone();
        let runner = fake_units(dir.path());
        let first = start_with_an_agent_that_goes_away_as(dir.path(), replica, runner.clone());
        assert!(group_alive(first), "the replica runs on without its agent");
        let calls = systemd_calls(dir.path());
        assert!(
            calls.contains("--unit=agentd-j-worker-0-1.service") && !calls.contains("--wait"),
            "{calls}"
        );
        // The unit's main process is the supervisor, which runs the replica.
        let state = shim_state(dir.path(), "j", "worker-0");
        let main: u32 =
            std::fs::read_to_string(dir.path().join("systemd/agentd-j-worker-0-1.service.pid"))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        assert_eq!((state.shim_pid, state.pid), (main, first));

        let (tx, mut rx) = mpsc::unbounded_channel();
        let second = executor_with(dir.path(), tx, runner);
        let adoptable = second.adoptable("j", "worker-0", 1, first).unwrap();
        second.adopt(adoptable).unwrap();
        std::fs::write(&go, "").unwrap();
        let exit = rx.recv().await.unwrap();
        assert!(
            matches!(exit.event, ReplicaEvent::Exited { outcome } if outcome.code == Some(4)),
            "{exit:?}"
        );
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(log.contains("before\nafter\n"), "{log}");
        assert!(log.contains("ended: exit code 4"), "{log}");
        assert!(second.jobs_with_replicas().is_empty());
        assert!(
            !systemd_calls(dir.path()).contains("systemctl stop"),
            "an adopted unit is not stopped"
        );
    }

    #[tokio::test]
    async fn a_unit_killed_while_no_agent_ran_is_reported_as_systemd_saw_it() {
        let dir = tempfile::tempdir().unwrap();
        let runner = fake_units(dir.path());
        let pid = start_with_an_agent_that_goes_away_as(
            dir.path(),
            spec(dir.path(), "worker-0", &["sleep", "300"]),
            runner.clone(),
        );
        // The whole unit is killed (here its supervisor; the replica dies with it): no exit
        // record is left.
        let state = shim_state(dir.path(), "j", "worker-0");
        // SAFETY: a plain signal to the supervisor this test started.
        unsafe { libc::kill(state.shim_pid.cast_signed(), libc::SIGKILL) };
        for _ in 0..400 {
            if !group_alive(pid) && shim::start_time(state.shim_pid).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(!group_alive(pid));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let second = executor_with(dir.path(), tx, runner);
        // systemd no longer knows the unit: nothing says how the replica ended.
        let error = second.adoptable("j", "worker-0", 1, pid).unwrap_err();
        assert!(error.contains("no longer knows"), "{error}");
        // systemd saw the OOM killer end it.
        std::fs::write(
            dir.path().join("systemd/agentd-j-worker-0-1.service.show"),
            "Result=oom-kill\nExecMainCode=2\nExecMainStatus=9\nLoadState=loaded\n\
             ActiveState=failed\n",
        )
        .unwrap();
        second
            .adopt(second.adoptable("j", "worker-0", 1, pid).unwrap())
            .unwrap();
        let exit = rx.recv().await.unwrap().event;
        assert!(
            matches!(exit, ReplicaEvent::Exited { outcome }
                if outcome.signal == Some(9) && outcome.oom_killed),
            "{exit:?}"
        );
        let calls = systemd_calls(dir.path());
        assert!(
            calls.contains("systemctl reset-failed agentd-j-worker-0-1.service"),
            "the failed unit is forgotten once read: {calls}"
        );
    }

    #[tokio::test]
    async fn cancelling_a_unit_replica_stops_its_unit_and_gives_the_replica_its_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = executor_with(dir.path(), tx, fake_units(dir.path()));
        executor.launch(spec(dir.path(), "ps-0", &["sleep", "300"]));
        let report = rx.recv().await.unwrap();
        let ReplicaEvent::Started { pid } = report.event else {
            panic!("not started: {report:?}");
        };
        executor.stop(vec![pid], Duration::from_secs(10)).await;
        let calls = systemd_calls(dir.path());
        assert!(
            calls.contains("systemctl stop --no-block agentd-j-ps-0-1.service"),
            "{calls}"
        );
        // systemd's SIGTERM goes to the unit's main process, the supervisor, which passes it
        // to the replica and records how it ended.
        let exit = rx.recv().await.unwrap().event;
        assert!(
            matches!(exit, ReplicaEvent::Exited { outcome } if outcome.signal == Some(15)),
            "{exit:?}"
        );
    }

    #[tokio::test]
    async fn a_unit_replica_that_cannot_start_is_reported_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = executor_with(dir.path(), tx, fake_units(dir.path()));
        let mut replica = spec(dir.path(), "chief-0", &["no-such-trainer"]);
        replica.env.insert("PATH".into(), "/usr/bin".into());
        executor.launch(replica);
        let report = rx.recv().await.unwrap();
        let ReplicaEvent::StartFailed { message, .. } = report.event else {
            panic!("{report:?}");
        };
        assert!(
            message.contains("\"no-such-trainer\" is not an executable file in PATH=/usr/bin"),
            "{message}"
        );
        assert!(executor.jobs_with_replicas().is_empty());
        let calls = systemd_calls(dir.path());
        assert!(
            calls.contains("systemctl reset-failed agentd-j-chief-0-1.service"),
            "{calls}"
        );
    }

    #[tokio::test]
    async fn a_unit_whose_supervisor_never_says_a_word_is_given_up_with_what_systemd_says() {
        let dir = tempfile::tempdir().unwrap();
        let _runner = fake_units(dir.path());
        let systemctl = dir.path().join("systemd").join("systemctl");
        let run_dir = dir.path().join("run");
        std::fs::create_dir_all(&run_dir).unwrap();
        // The unit runs, its supervisor writes nothing: it hangs before it starts the replica.
        std::fs::write(
            dir.path().join("systemd").join("u.service.show"),
            "LoadState=loaded\nActiveState=active\nResult=success\nExecMainCode=0\nExecMainStatus=0\n",
        )
        .unwrap();
        let give_up = || async {
            recorded_start(
                &run_dir,
                &systemctl,
                "u.service",
                Duration::from_millis(700),
            )
            .await
            .unwrap_err()
        };
        assert_eq!(
            give_up().await,
            "its supervisor did not start the replica within 0.7 s (unit u.service: active, result success)"
        );
        // And when systemd cannot say anything about it either.
        std::fs::write(
            dir.path().join("systemd").join("systemctl"),
            "#!/bin/sh\nexit 1\n",
        )
        .unwrap();
        let why = give_up().await;
        assert!(
            why.ends_with("(unit u.service: systemd cannot say)"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn discarding_a_job_stops_exactly_its_units() {
        let dir = tempfile::tempdir().unwrap();
        let runner = fake_units(dir.path());
        let mut pids = BTreeMap::new();
        for job in ["mnist", "mnist-2"] {
            let mut replica = spec(dir.path(), "worker-0", &["sleep", "300"]);
            replica.job = job.into();
            replica.env.insert("AGENTD_JOB".into(), job.into());
            let pid = start_with_an_agent_that_goes_away_as(dir.path(), replica, runner.clone());
            pids.insert(job, pid);
        }
        let (tx, _rx) = mpsc::unbounded_channel();
        let second = executor_with(dir.path(), tx, runner);
        second.discard("mnist");
        let calls = systemd_calls(dir.path());
        assert!(
            calls.contains("systemctl stop agentd-mnist-worker-0-1.service\n"),
            "{calls}"
        );
        assert!(!calls.contains("stop agentd-mnist-2"), "{calls}");
        assert!(group_alive(pids["mnist-2"]));
        second.discard("mnist-2");
        for _ in 0..400 {
            if pids.values().all(|&p| !group_alive(p)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(pids.values().all(|&p| !group_alive(p)));
    }

    #[tokio::test]
    async fn a_gang_that_cannot_be_adopted_is_discarded_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut replica = spec(dir.path(), "worker-0", &["sleep", "300"]);
        replica.env.insert("AGENTD_JOB".into(), "j".into());
        let pid = start_with_an_agent_that_goes_away(dir.path(), replica);
        let (tx, _rx) = mpsc::unbounded_channel();
        let second = executor(dir.path(), tx);
        assert_eq!(second.jobs_with_replicas(), ["j"]);
        // The replica's environment names its job; another job's discard leaves it alone.
        assert_eq!(second.discard("other"), 0);
        assert!(group_alive(pid));
        assert_eq!(second.discard("j"), 1);
        for _ in 0..200 {
            if !group_alive(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!group_alive(pid));
        assert!(second.jobs_with_replicas().is_empty());
    }

    #[tokio::test]
    async fn nothing_a_replica_started_outlives_it() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = executor(dir.path(), tx);
        let pids = dir.path().join("pids");
        // A grandchild in a session of its own, out of the replica's process group, which a
        // signal to the group would miss.
        let mut replica = spec(
            dir.path(),
            "worker-0",
            &[
                "sh",
                "-c",
                "setsid sleep 300 & echo $! > \"$PIDS\"; sleep 0.2; exit 0",
            ],
        );
        replica
            .env
            .insert("PIDS".into(), pids.to_string_lossy().into_owned());
        executor.launch(replica);
        assert!(matches!(
            rx.recv().await.unwrap().event,
            ReplicaEvent::Started { .. }
        ));
        let exit = rx.recv().await.unwrap().event;
        assert!(matches!(exit, ReplicaEvent::Exited { outcome } if outcome.code == Some(0)));
        let grandchild: u32 = std::fs::read_to_string(&pids)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        assert!(
            !stat.contains("(sleep)"),
            "the grandchild {grandchild} outlived its replica: {stat}"
        );
    }

    #[tokio::test]
    async fn stopping_a_group_reaches_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let executor = executor(dir.path(), tx);
        // The shell ignores SIGTERM; its child sleeps. Only SIGKILL ends both.
        executor.launch(spec(
            dir.path(),
            "ps-0",
            &["sh", "-c", "trap '' TERM; sleep 300 & wait"],
        ));
        let ReplicaEvent::Started { pid } = rx.recv().await.unwrap().event else {
            panic!("not started");
        };
        // The shell starts its child only after the trap is in place: once the child is in
        // the group, SIGTERM is ignored there.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !group_runs(pid, "sleep") {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell's child never started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        executor.stop(vec![pid], Duration::from_millis(300)).await;
        let exit = rx.recv().await.unwrap().event;
        assert!(matches!(exit, ReplicaEvent::Exited { outcome } if outcome.signal == Some(9)));
        assert!(!group_alive(pid), "nothing of the group is left");
    }

    /// Whether a process named `comm` runs in process group `pgid`.
    fn group_runs(pgid: u32, comm: &str) -> bool {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return false;
        };
        entries.flatten().any(|e| {
            std::fs::read_to_string(e.path().join("stat")).is_ok_and(|stat| {
                // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it.
                let Some((head, tail)) = stat.rsplit_once(')') else {
                    return false;
                };
                let pgrp = tail.split_whitespace().nth(2);
                head.ends_with(&format!("({comm}")) && pgrp == Some(pgid.to_string().as_str())
            })
        })
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
