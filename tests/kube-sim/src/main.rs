//! The `kube-sim` binary: flags in, a running simulator out.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kube_sim::{AuthorizationMode, KubeSim, SimConfig, TimeScale};

/// A Kubernetes API server simulator with simulated GPU nodes, for tests and benchmarks.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Write a kubeconfig for this server to FILE.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Simulated nodes to create: node-0 .. node-<N-1>.
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// nvidia.com/gpu capacity of each simulated node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    /// How much faster than real time cluster time runs (e.g. 60: a minute per second).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Events kept per resource for watches that resume from a resourceVersion.
    #[arg(long, default_value_t = 10_000)]
    watch_history: usize,
    /// Serve HTTPS with a CA generated at start; its certificate goes into the kubeconfig.
    #[arg(long)]
    tls: bool,
    /// Bearer tokens in kube-apiserver's format, one per line: token,user,uid,"group1,group2".
    /// Turns authentication on: requests without a known token get 401, and the kubeconfig
    /// written carries a generated admin token (group system:masters).
    #[arg(long, value_name = "FILE")]
    token_auth_file: Option<PathBuf>,
    /// RBAC: Roles, ClusterRoles and their bindings decide; AlwaysAllow: everything is allowed.
    #[arg(long, default_value = "AlwaysAllow", value_name = "MODE")]
    authorization_mode: AuthorizationMode,
    /// Write one JSON line per request served to FILE.
    #[arg(long, value_name = "FILE")]
    audit_log: Option<PathBuf>,
    /// Kubelets refuse pods whose nvidia.com/gpu, cpu or memory requests exceed what is free on
    /// their node (the pod fails with reason OutOf<resource>).
    #[arg(long)]
    kubelet_admission: bool,
}

/// Commands for a simulator already running as its own process, reached through its control
/// endpoint with the kubeconfig it wrote (only its admin may use them).
#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Stop a simulated node's kubelet: its lease goes stale and the node goes NotReady.
    StopNode(Control),
    /// Bring a stopped node's kubelet back.
    RestartNode(Control),
    /// Answer every API request with an error status, as an overloaded or failing API server
    /// does (`Retry-After` on 429 and 503), for a while or until `--clear`.
    Fault(FaultArgs),
    /// Compact the history and end every watch: every open watch ends with 410 Expired
    /// and no watch can resume from before now (its client must list again).
    Compact(Server),
}

#[derive(clap::Args, Debug)]
struct Server {
    /// The kubeconfig the simulator wrote (its admin token and CA).
    #[arg(long, value_name = "FILE")]
    kubeconfig: PathBuf,
}

#[derive(clap::Args, Debug)]
struct FaultArgs {
    /// The kubeconfig the simulator wrote (its admin token and CA).
    #[arg(long, value_name = "FILE")]
    kubeconfig: PathBuf,
    /// The status every request gets: 429, 500, 503 or 504.
    #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
    status: Option<u16>,
    /// How long, e.g. 10s, 500ms or 2m; without it, until `--clear`.
    #[arg(long = "for", value_name = "DURATION", value_parser = kube_sim::fault::parse_duration, conflicts_with = "clear")]
    duration: Option<std::time::Duration>,
    /// End the fault in force.
    #[arg(long)]
    clear: bool,
}

#[derive(clap::Args, Debug)]
struct Control {
    /// The kubeconfig the simulator wrote (its admin token and CA).
    #[arg(long, value_name = "FILE")]
    kubeconfig: PathBuf,
    /// The node, e.g. node-3.
    node: String,
}

fn control(action: &str, c: &Control) -> anyhow::Result<()> {
    let path = format!("/kube-sim/v1/nodes/{}/{action}", c.node);
    control_request(&c.kubeconfig, "POST", &path, "")
        .map_err(|e| anyhow::anyhow!("{action} {}: {e}", c.node))
}

fn fault(f: &FaultArgs) -> anyhow::Result<()> {
    const PATH: &str = "/kube-sim/v1/fault";
    if f.clear {
        return control_request(&f.kubeconfig, "DELETE", PATH, "")
            .map_err(|e| anyhow::anyhow!("fault --clear: {e}"));
    }
    let status = f.status.context("--status is required without --clear")?;
    let spec = kube_sim::fault::FaultSpec::new(status, f.duration).context("--status")?;
    let body = serde_json::to_string(&spec).context("encoding the fault")?;
    control_request(&f.kubeconfig, "POST", PATH, &body)
        .map_err(|e| anyhow::anyhow!("fault --status {status}: {e}"))
}

/// Sends one request to the control endpoint and prints the answer's message.
fn control_request(
    kubeconfig: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<()> {
    let endpoint = kube_sim::client::Endpoint::from_kubeconfig(kubeconfig)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    let (code, body) =
        runtime.block_on(endpoint.request(method, path, "application/json", body))?;
    let message = body
        .get("message")
        .and_then(serde_json::Value::as_str)
        .map_or_else(|| body.to_string(), str::to_string);
    if code == 200 {
        println!("{message}");
        Ok(())
    } else {
        anyhow::bail!("{code}: {message}")
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.command {
        Some(Command::StopNode(c)) => return control("stop", c),
        Some(Command::RestartNode(c)) => return control("restart", c),
        Some(Command::Fault(f)) => return fault(f),
        Some(Command::Compact(c)) => {
            return control_request(&c.kubeconfig, "POST", "/kube-sim/v1/compact", "")
                .map_err(|e| anyhow::anyhow!("compact: {e}"));
        }
        None => {}
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let time_scale = TimeScale::new(args.time_scale).with_context(|| {
        format!(
            "--time-scale {} must be a number above zero",
            args.time_scale
        )
    })?;
    let tokens = args
        .token_auth_file
        .as_deref()
        .map(kube_sim::auth::read_token_file)
        .transpose()
        .context("--token-auth-file")?;
    let config = SimConfig {
        tls: args.tls,
        tokens,
        authorization: args.authorization_mode,
        audit_log: args.audit_log,
        kubelet_admission: args.kubelet_admission,
        listen: args.listen,
        kubeconfig: args.kubeconfig,
        nodes: args.nodes,
        gpus_per_node: args.gpus_per_node,
        time_scale,
        watch_history: args.watch_history,
        ..SimConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    runtime.block_on(async {
        let sim = KubeSim::start(config).await?;
        println!("kube-sim listening on {}", sim.url());
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        sim.shutdown();
        Ok(())
    })
}
