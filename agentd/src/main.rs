//! The `agentd` binary: parses flags, loads the configuration, sets up logging and runs the
//! agent. Everything else is library code.

use std::path::PathBuf;
use std::process::ExitCode;

use agentd::config::{Config, LogFormat, Mode, Overrides};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "agentd",
    version,
    about = "GPU node agent and gang scheduler for distributed TensorFlow training"
)]
struct Args {
    /// Configuration file (TOML). Default: /etc/agentd/agentd.toml if it exists.
    #[arg(long, env = "AGENTD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for the database and job logs. Default: /var/lib/agentd.
    #[arg(long, env = "AGENTD_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The API's Unix socket. Default: /run/agentd/agentd.sock.
    #[arg(long, env = agentd_api::SOCKET_ENV, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Prometheus endpoint address, or `off`. Default: 127.0.0.1:9400.
    #[arg(long, env = "AGENTD_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<String>,
    /// NVML library to load. Default: libnvidia-ml.so.1.
    #[arg(long, env = "AGENTD_NVML_LIBRARY", value_name = "PATH")]
    nvml_library: Option<String>,
    /// The node's name. Default: the hostname.
    #[arg(long, env = "AGENTD_NODE_NAME")]
    node_name: Option<String>,
    /// `standalone` (this machine is the whole cluster) or `cluster` (join a Kubernetes cluster).
    #[arg(long, env = "AGENTD_MODE", value_enum)]
    mode: Option<Mode>,
    /// Cluster mode: the kubeconfig to reach the API server with. Default: `[cluster] kubeconfig`,
    /// else KUBECONFIG, ~/.kube/config or the in-cluster service account.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Log filter, RUST_LOG syntax (e.g. `info`, `agentd=debug`).
    #[arg(long, env = "AGENTD_LOG", value_name = "FILTER")]
    log: Option<String>,
    /// Log format when not running under journald.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Print the effective configuration (file, environment and flags merged) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a job trace against a cluster in virtual time and compare scheduling policies.
    Replay(Box<agentd::replay::ReplayArgs>),
    /// Write agentd's man pages (agentd.1, agentd-replay.1) into DIR, for the package build.
    #[command(name = "__generate-man", hide = true)]
    GenerateMan { dir: PathBuf },
    /// Supervise one replica described in its run directory DIR (started by the agent).
    #[command(hide = true)]
    Shim { dir: PathBuf },
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Shim { dir }) = &args.command {
        let code = agentd::exec::shim::main(dir);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    if let Some(Command::GenerateMan { dir }) = &args.command {
        let command = <Args as clap::CommandFactory>::command();
        let written =
            fs_err::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(command, dir));
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentd: cannot write man pages into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Replay(replay)) = &args.command {
        return match agentd::replay::run(replay) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentd replay: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let overrides = Overrides {
        state_dir: args.state_dir,
        socket: args.socket,
        metrics_addr: args.metrics_addr,
        nvml_library: args.nvml_library,
        log: args.log,
        log_format: args.log_format,
        node_name: args.node_name,
        mode: args.mode,
        kubeconfig: args.kubeconfig,
    };
    let config = match Config::load(args.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("agentd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    limit_malloc_arenas();
    if let Err(e) = init_logging(&config) {
        eprintln!("agentd: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("agentd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agentd::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("agentd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// journald under systemd, else text; or JSON when asked. `RUST_LOG` overrides `log`.
fn init_logging(config: &Config) -> Result<(), agentd::logging::LoggingError> {
    let format = match config.log_format {
        LogFormat::Text => agentd::logging::LogFormat::Auto,
        LogFormat::Json => agentd::logging::LogFormat::Json,
    };
    agentd::logging::init(format, Some(&config.log)).map(drop)
}

/// glibc's allocator gives each thread that meets contention an arena of its own (up to eight
/// per core) and keeps what is freed in each for that arena's next use, so an agent's memory
/// crept up job after job although it holds no more jobs (`bench/history`: 2.6 MiB more between
/// the 10,000th and the 20,000th job with the default, 0.2 MiB with two arenas). Two arenas
/// serve the runtime's two worker threads. A `MALLOC_ARENA_MAX` in the environment wins.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets one of the allocator's tunables; it takes the allocator's lock.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
