//! Starting one replica process the way `posix_spawn` does (a `vfork`-style clone that shares
//! the agent's memory until `execve`, so nothing of the agent is copied), plus the two things
//! `posix_spawn` cannot do: `PR_SET_PDEATHSIG`, so the replica dies with the agent, and a pidfd,
//! so its end is a readable file descriptor on the async runtime rather than a `SIGCHLD`.
//!
//! A plain `fork` copies the page tables of the whole agent for every replica; with a few
//! thousand replicas a minute that copying was most of the agent's CPU time. Everything the
//! child needs (path, argv, environment, directory, descriptors) is prepared here, in the
//! parent: between the clone and `execve` the child makes system calls only, never allocates,
//! never takes a lock, and reports a failure through one shared integer.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// What to run: argv[0] is looked up in the `PATH` of `env` when it has no `/`.
pub struct Command<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub working_dir: Option<&'a Path>,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    /// How the process stands to its parent.
    pub detach: Detach,
    /// Whom it runs as; `None`: as the caller.
    pub user: Option<&'a Credentials>,
    /// A cgroup's `cgroup.procs`, open for writing: the process moves itself into that
    /// cgroup before anything else, so nothing it runs is ever outside it.
    pub cgroup_procs: Option<&'a OwnedFd>,
}

/// A user to run as: uid, primary gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// How a new process stands to the one that starts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// Leader of a new process group, killed (SIGKILL) when its parent dies: a replica.
    DiesWithParent,
    /// Leader of a new session, which outlives its parent: a replica's supervisor, which must
    /// outlive the agent that started it.
    Outlives,
}

/// A started process: its pid (also its process group id) and a pidfd that turns readable when
/// it exits.
pub struct Spawned {
    pub pid: u32,
    pub pidfd: OwnedFd,
}

/// Which step of starting failed, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    None = 0,
    Cgroup,
    Signals,
    ProcessGroup,
    Session,
    DeathSignal,
    Groups,
    Group,
    User,
    Stdio,
    WorkingDir,
    Exec,
}

impl Step {
    fn from_code(code: i32) -> Self {
        [
            Self::Cgroup,
            Self::Signals,
            Self::ProcessGroup,
            Self::Session,
            Self::DeathSignal,
            Self::Groups,
            Self::Group,
            Self::User,
            Self::Stdio,
            Self::WorkingDir,
            Self::Exec,
        ]
        .into_iter()
        .find(|s| *s as i32 == code)
        .unwrap_or(Self::None)
    }

    fn describe(self) -> &'static str {
        match self {
            Self::None => "starting",
            Self::Cgroup => "moving it into its cgroup",
            Self::Signals => "resetting signal handlers",
            Self::ProcessGroup => "creating its process group",
            Self::Session => "creating its session",
            Self::DeathSignal => "setting its parent-death signal",
            Self::Groups => "setting its supplementary groups",
            Self::Group => "setting its group id",
            Self::User => "setting its user id",
            Self::Stdio => "connecting its output",
            Self::WorkingDir => "changing to its working directory",
            Self::Exec => "executing",
        }
    }
}

/// Everything the child reads, laid out before the clone.
struct ChildArgs {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    working_dir: Option<CString>,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// `cgroup.procs` of the cgroup to join, or -1.
    cgroup_procs: RawFd,
    parent: libc::pid_t,
    detach: Detach,
    /// uid, gid and supplementary groups to take, when not the caller's.
    user: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// `Step` that failed, written by the child before it exits.
    failed_step: AtomicI32,
    /// Its errno.
    failed_errno: AtomicI32,
}

const CHILD_STACK_BYTES: usize = 64 * 1024;

/// Starts the process. The new process is the leader of a new process group, has SIGKILL as
/// its parent-death signal, default signal handlers and an empty signal mask, stdin from
/// `/dev/null`, and only the descriptors 0, 1 and 2 open.
pub fn spawn(command: &Command<'_>) -> std::io::Result<Spawned> {
    let Some(program) = command.argv.first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the command is empty",
        ));
    };
    let path = resolve(program, command.env, command.working_dir)?;
    let argv: Vec<CString> = command
        .argv
        .iter()
        .map(|a| c_string(a.as_bytes(), "an argument"))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = command
        .env
        .iter()
        .map(|(k, v)| c_string(format!("{k}={v}").as_bytes(), "an environment variable"))
        .collect::<Result<_, _>>()?;
    let working_dir = command
        .working_dir
        .map(|d| c_string(d.as_os_str().as_bytes(), "the working directory"))
        .transpose()?;
    let stdin = fs_err::File::open("/dev/null")?;
    // Descriptors 0-2 of the agent may be closed (so a new one may be 0, 1 or 2); the child's
    // dup2 calls need sources that are not among their own targets.
    let stdin = above_stdio(stdin.into())?;
    let stdout = above_stdio(command.stdout.try_clone()?)?;
    let stderr = above_stdio(command.stderr.try_clone()?)?;

    let args = ChildArgs {
        program: c_string(path.as_os_str().as_bytes(), "the program path")?,
        argv: argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect(),
        envp: envp
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect(),
        working_dir,
        stdin: stdin.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stderr.as_raw_fd(),
        cgroup_procs: command.cgroup_procs.map_or(-1, AsRawFd::as_raw_fd),
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        detach: command.detach,
        user: command.user.map(|c| (c.uid, c.gid, c.groups.clone())),
        failed_step: AtomicI32::new(Step::None as i32),
        failed_errno: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; CHILD_STACK_BYTES];
    // The stack grows down on every architecture Linux runs agentd on; keep it 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK_BYTES) & !15;

    // Block every signal while the child shares our memory: a handler of the agent's must not
    // run on the child's stack. The child unblocks them after resetting the handlers.
    // SAFETY: sigset_t is plain data; both sets are filled in before they are read.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid, owned sigset_t values.
    unsafe {
        libc::sigfillset(&raw mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &raw const all, &raw mut old);
    }
    // SAFETY: `child` touches only `args` (alive until the clone returns, which with
    // CLONE_VFORK is after the child has called execve or _exit) and makes system calls only.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw const args).cast_mut().cast(),
        )
    };
    let clone_error = std::io::Error::last_os_error();
    // SAFETY: `old` is the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &raw const old, std::ptr::null_mut());
    }
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    let step = Step::from_code(args.failed_step.load(Ordering::Acquire));
    if step != Step::None {
        let errno = args.failed_errno.load(Ordering::Acquire);
        reap(pid);
        let cause = std::io::Error::from_raw_os_error(errno);
        return Err(std::io::Error::new(
            cause.kind(),
            format!("{} {}: {cause}", step.describe(), path.display()),
        ));
    }
    // SAFETY: pidfd_open takes a pid and flags; the child is ours and not reaped, so the pid
    // cannot have been reused.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: plain signal and wait on our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        reap(pid);
        return Err(e);
    }
    Ok(Spawned {
        pid: pid.cast_unsigned(),
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
    })
}

/// Collects the exit status of our child `pid` once its pidfd is readable (or to clean up).
/// Returns the raw wait status.
pub fn reap(pid: libc::pid_t) -> Option<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: waiting on our own child with a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if r == pid {
            return Some(status);
        }
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// The child, between clone and execve. System calls only: the parent's memory is shared.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's `ChildArgs`, alive until this process execs or exits.
    let args = unsafe { &*arg.cast::<ChildArgs>() };
    let fail = |step: Step| -> libc::c_int {
        // SAFETY: __errno_location is always valid for the calling thread.
        let errno = unsafe { *libc::__errno_location() };
        args.failed_errno.store(errno, Ordering::Release);
        args.failed_step.store(step as i32, Ordering::Release);
        // SAFETY: _exit ends this process without running anything of the parent's.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: every call below is a plain system call on values prepared by the parent.
    unsafe {
        // First, and while still privileged: "0" is the writing process itself.
        if args.cgroup_procs >= 0 && libc::write(args.cgroup_procs, c"0".as_ptr().cast(), 1) != 1 {
            return fail(Step::Cgroup);
        }
        // Handlers of the agent's (tokio's signal handling) are not the replica's; ignored
        // signals (Rust ignores SIGPIPE) would stay ignored across execve, so reset those too.
        // The raw system call, because the C library refuses to touch the two signals it
        // keeps for itself; an all-zero kernel sigaction is SIG_DFL with no flags and no mask.
        let default = [0u64; 4];
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    signal,
                    default.as_ptr(),
                    0usize,
                    8usize,
                );
            }
        }
        // The raw system calls: the C library's wrappers would change the credentials of
        // every thread of the agent, whose memory this child shares.
        if let Some((uid, gid, groups)) = &args.user {
            if libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) != 0 {
                return fail(Step::Groups);
            }
            if libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid) != 0 {
                return fail(Step::Group);
            }
            if libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid) != 0 {
                return fail(Step::User);
            }
        }
        match args.detach {
            Detach::DiesWithParent => {
                if libc::setpgid(0, 0) != 0 {
                    return fail(Step::ProcessGroup);
                }
                // After the change of user, which clears the parent-death signal.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return fail(Step::DeathSignal);
                }
                // The parent died between the clone and the prctl: nothing will send the
                // signal now.
                if libc::getppid() != args.parent {
                    libc::_exit(127);
                }
            }
            Detach::Outlives => {
                if libc::setsid() < 0 {
                    return fail(Step::Session);
                }
            }
        }
        for (from, to) in [(args.stdin, 0), (args.stdout, 1), (args.stderr, 2)] {
            if libc::dup2(from, to) < 0 {
                return fail(Step::Stdio);
            }
        }
        // Whatever the agent itself inherited without close-on-exec (a socket from systemd, a
        // descriptor of the shell that started it) is not the replica's. Kernels before 5.9
        // lack close_range; there the replica inherits what the agent did.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        if let Some(dir) = &args.working_dir
            && libc::chdir(dir.as_ptr()) != 0
        {
            return fail(Step::WorkingDir);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &raw const empty, std::ptr::null_mut()) != 0 {
            return fail(Step::Signals);
        }
        libc::execve(
            args.program.as_ptr(),
            args.argv.as_ptr(),
            args.envp.as_ptr(),
        );
        fail(Step::Exec)
    }
}

/// Finds the program: a name with a `/` is taken as it is (relative to the working directory);
/// a bare name is searched in the `PATH` the replica will have, as a shell would.
fn resolve(
    program: &str,
    env: &[(String, String)],
    working_dir: Option<&Path>,
) -> std::io::Result<PathBuf> {
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/local/bin:/usr/bin:/bin", |(_, v)| v.as_str());
    for dir in path.split(':') {
        // An empty PATH entry means the current directory, which is the replica's.
        let dir = if dir.is_empty() {
            working_dir.map_or_else(|| PathBuf::from("."), Path::to_owned)
        } else {
            PathBuf::from(dir)
        };
        let candidate = dir.join(program);
        if executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{program:?} is not an executable file in PATH={path}"),
    ))
}

fn executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path.
    let ok = unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0;
    ok && path.is_file()
}

fn c_string(bytes: &[u8], what: &str) -> std::io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{what} contains a NUL byte: {:?}",
                OsStr::from_bytes(bytes).to_string_lossy()
            ),
        )
    })
}

/// Moves a descriptor to 3 or above (close-on-exec), so it is never one of the child's 0-2.
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new one that we own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// Runs `sh -c script` with stdout into a pipe; returns (raw wait status, output).
    fn run(script: &str, working_dir: Option<&Path>) -> std::io::Result<(i32, String)> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let argv = ["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let env = [("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
        let spawned = spawn(&Command {
            argv: &argv,
            env: &env,
            working_dir,
            stdout: &write,
            stderr: &write,
            detach: Detach::DiesWithParent,
            user: None,
            cgroup_procs: None,
        })?;
        drop(write);
        let mut out = String::new();
        std::fs::File::from(read).read_to_string(&mut out)?;
        let status = reap(spawned.pid.cast_signed()).expect("our child");
        Ok((status, out))
    }

    #[test]
    fn the_replica_gets_a_clean_process() {
        let dir = tempfile::tempdir().unwrap();
        let (status, out) = run(
            // grep reads its own status (a shell waiting for a child blocks signals for the
            // while), and exec keeps the mask and dispositions the shell was started with.
            "echo pgid=$(cut -d' ' -f5 /proc/$$/stat) pid=$$; \
             echo cwd=$(pwd); echo path=$PATH; \
             exec grep -E '^Sig(Ign|Blk)' /proc/self/status",
            Some(dir.path()),
        )
        .unwrap();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{out}"
        );
        let pid = out
            .split("pid=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap();
        assert!(
            out.contains(&format!("pgid={pid} ")),
            "its own process group: {out}"
        );
        // Rust ignores SIGPIPE and tokio handles others: none of that reaches the replica.
        assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        let cwd = dir.path().canonicalize().unwrap();
        assert!(out.contains(&format!("cwd={}\n", cwd.display())), "{out}");
        assert!(out.contains("path=/usr/bin:/bin\n"), "{out}");
    }

    #[test]
    fn only_stdio_is_inherited() {
        // A descriptor the agent holds without close-on-exec, as one inherited from its parent.
        // SAFETY: a duplicate of an open descriptor, numbered 100 or above so that it cannot
        // be mistaken for one the child opens itself; closed below.
        let leaked = unsafe { libc::fcntl(0, libc::F_DUPFD, 100) };
        assert!(leaked >= 100);
        let (status, out) = run("ls /proc/self/fd", None).unwrap();
        // SAFETY: ours, from dup above.
        unsafe { libc::close(leaked) };
        assert_eq!(libc::WEXITSTATUS(status), 0, "{out}");
        let fds: Vec<i32> = out.split_whitespace().map(|f| f.parse().unwrap()).collect();
        // 0-2, and perhaps the directory ls is reading.
        assert!(fds.starts_with(&[0, 1, 2]), "{out}");
        assert!(fds.iter().all(|&fd| fd <= 3), "{out}");
        assert!(!fds.contains(&leaked), "{out}");
    }

    #[test]
    fn exit_codes_and_signals_come_back() {
        let (status, _) = run("exit 7", None).unwrap();
        assert_eq!(libc::WEXITSTATUS(status), 7);
        let (status, _) = run("kill -TERM $$", None).unwrap();
        assert!(libc::WIFSIGNALED(status));
        assert_eq!(libc::WTERMSIG(status), libc::SIGTERM);
    }

    #[test]
    fn failures_to_start_say_which_step_and_what() {
        let (_, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let start = |argv: &[&str], dir: Option<&Path>| {
            let argv: Vec<String> = argv.iter().map(|&a| a.to_owned()).collect();
            let env = [("PATH".to_owned(), "/usr/bin:/bin".to_owned())];
            spawn(&Command {
                argv: &argv,
                env: &env,
                working_dir: dir,
                stdout: &write,
                stderr: &write,
                detach: Detach::DiesWithParent,
                user: None,
                cgroup_procs: None,
            })
            .err()
            .expect("fails")
            .to_string()
        };
        let e = start(&["no-such-trainer"], None);
        assert!(
            e.contains("\"no-such-trainer\" is not an executable file in PATH=/usr/bin:/bin"),
            "{e}"
        );
        let e = start(&["true"], Some(Path::new("/no/such/dir")));
        assert!(
            e.contains("changing to its working directory /usr/bin/true"),
            "{e}"
        );
        assert!(e.contains("No such file or directory"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("train.py");
        std::fs::write(&script, "print('no shebang, no x bit')\n").unwrap();
        let e = start(&[script.to_str().unwrap()], None);
        assert!(
            e.contains(&format!(
                "executing {}: Permission denied",
                script.display()
            )),
            "{e}"
        );
        let e = start(&[], None);
        assert!(e.contains("the command is empty"), "{e}");
    }
}
