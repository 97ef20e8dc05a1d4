//! `agentctl`: talks to the local agent over its Unix socket, or to a remote one over HTTPS or
//! ssh (`--server`). One module per subcommand; `output` prints. Exit codes: 0 ok, 1 the request
//! failed, 2 usage error, 3 agent unreachable.

mod docs;
mod history;
mod jobs;
mod nodes;
mod output;
mod remote;
mod status;
mod templates;

use std::path::PathBuf;
use std::process::ExitCode;

use agentd_api::{Client, ClientError};
use clap::{Parser, Subcommand};

pub use output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "agentctl",
    version,
    about = "Control the local agentd GPU node agent"
)]
struct Cli {
    /// The agent's socket.
    #[arg(long, global = true, env = agentd_api::SOCKET_ENV, default_value = agentd_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A remote agent instead of the socket: https://HOST[:PORT] (with --token-file), or
    /// ssh://[USER@]HOST[:PORT][/SOCKET] (runs agentctl there over ssh).
    #[arg(long, global = true, env = agentd_api::tokens::SERVER_ENV)]
    server: Option<String>,
    /// The CA certificates (PEM) that signed the HTTPS server's certificate; the system's
    /// roots if not given.
    #[arg(long, global = true, env = agentd_api::tokens::CA_FILE_ENV)]
    ca_file: Option<PathBuf>,
    /// A file holding the bearer token for --server https://... (made by `agentctl token create`).
    #[arg(long, global = true, env = agentd_api::tokens::TOKEN_FILE_ENV)]
    token_file: Option<PathBuf>,
    /// A client certificate (PEM) for --server https://..., for an agent that takes them
    /// (api.client_ca): its common name is the user you act as. Needs --key-file.
    #[arg(long, global = true, env = agentd_api::tokens::CERT_FILE_ENV)]
    cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long, global = true, env = agentd_api::tokens::KEY_FILE_ENV)]
    key_file: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One screen about this node: agent, CPU, memory, disks and every GPU.
    Status,
    /// The node's full inventory.
    Node,
    /// Every node: GPUs (healthy/total), CPU, memory, readiness, agent heartbeat, schedulable.
    Nodes,
    /// Place nothing new on NODE (standalone: this machine; cluster: label agentd.io/drain=true).
    Drain { node: String },
    /// Undo `drain`: NODE takes new placements again.
    Resume { node: String },
    /// Submit a TrainingJob or Kubeflow TFJob manifest (YAML or JSON; `-` reads standard input),
    /// or a job made from a template (--template NAME --name NEW [--set PATH=VALUE]...).
    Submit {
        #[arg(required_unless_present = "template", conflicts_with = "template")]
        file: Option<PathBuf>,
        /// Make the job from this template (agentctl template list) instead of a file.
        #[arg(long, requires = "name")]
        template: Option<String>,
        /// The name of the job made from the template.
        #[arg(long, requires = "template")]
        name: Option<String>,
        /// PATH=VALUE: set a field of the template's manifest, PATH as validation errors print
        /// it (spec.tfReplicaSpecs.Worker.replicas=8, metadata.labels.team=ads), VALUE a YAML
        /// scalar (8 a number, true a boolean, '"8"' text). Repeat for more.
        #[arg(long = "set", value_name = "PATH=VALUE", requires = "template")]
        set: Vec<String>,
        /// Wait for the job to finish, showing its progress; exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs.
    Jobs {
        #[arg(long)]
        queue: Option<String>,
        /// Queued, Placed, Starting, Running, Restarting, Succeeded, Failed or Cancelled.
        #[arg(long)]
        state: Option<String>,
        /// Only the jobs of this user.
        #[arg(long)]
        user: Option<String>,
    },
    /// One job: state, reason, replicas and events.
    Job { name: String },
    /// A replica's output (the first replica unless --replica says which).
    Logs {
        name: String,
        /// For example worker-0.
        #[arg(long)]
        replica: Option<String>,
        /// Keep printing until the job ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Cancel an active job (its gang is stopped); remove a finished one.
    Cancel { name: String },
    /// The queues, their limits and what is in them.
    Queues,
    /// Bearer tokens for the agent's HTTPS listener.
    Token {
        #[command(subcommand)]
        command: remote::TokenCommand,
    },
    /// Job templates: saved manifests that jobs are made from (submit --template).
    Template {
        #[command(subcommand)]
        command: templates::TemplateCommand,
    },
    /// Finished jobs with their accounting, newest first (-o csv too), or --summary by user or
    /// queue.
    History(history::HistoryArgs),
    /// Write the man pages and bash/zsh/fish completions under DIR (for the package build).
    #[command(name = "__generate-docs", hide = true)]
    GenerateDocs { dir: PathBuf },
    /// Join standard input and output to the agent's socket (what `--server ssh://` runs on the
    /// far machine).
    #[command(name = "__dial-stdio", hide = true)]
    DialStdio,
}

/// The group that may use the agent's socket (`SocketGroup=` in agentd.socket).
const SOCKET_GROUP: &str = "agentd";

/// How a command failed, which decides the exit code.
pub enum Failure {
    Request(String),
    Unreachable(String),
    Usage(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Unreachable { socket, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Failure::Unreachable(format!(
                    "cannot reach the agent at {}: {source}\n\
                     The socket is open to the members of its group ({}); join it with \
                     `sudo usermod -aG {} $USER` and log in again, or run agentctl with sudo.",
                    socket.display(),
                    SOCKET_GROUP,
                    SOCKET_GROUP,
                ))
            }
            ClientError::Unreachable { socket, source } => Failure::Unreachable(format!(
                "cannot reach the agent at {}: {source}\n\
                 Is agentd running? Start it with `systemctl start agentd`, or run \
                 `agentd --socket {}` yourself; point agentctl at another agent with --socket or {}.",
                socket.display(),
                socket.display(),
                agentd_api::SOCKET_ENV
            )),
            ClientError::RemoteUnreachable { .. } => Failure::Unreachable(e.to_string()),
            ClientError::Settings(message) => Failure::Usage(message),
            other => Failure::Request(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Request(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("agentctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let client = match &cli.command {
            // These act here, with no agent.
            Command::Token { .. } | Command::GenerateDocs { .. } | Command::DialStdio => {
                Client::new(&cli.socket)
            }
            _ => remote::client(
                &cli.socket,
                cli.server.as_deref(),
                &remote::CredentialFiles {
                    ca: cli.ca_file.as_deref(),
                    token: cli.token_file.as_deref(),
                    cert: cli.cert_file.as_deref(),
                    key: cli.key_file.as_deref(),
                },
            )?,
        };
        match cli.command {
            Command::History(args) => history::history(&client, &args, cli.output).await,
            _ if cli.output == Format::Csv => Err(Failure::Usage(
                "-o csv is for agentctl history; use -o json or yaml here".to_owned(),
            )),
            Command::Status => status::status(&client, cli.output).await,
            Command::Node => status::node(&client, cli.output).await,
            Command::Nodes => nodes::list(&client, cli.output).await,
            Command::Drain { node } => nodes::drain(&client, &node, true, cli.output).await,
            Command::Resume { node } => nodes::drain(&client, &node, false, cli.output).await,
            Command::Submit {
                file,
                template,
                name,
                set,
                wait,
            } => {
                // clap lets `--name` through beside a FILE (a requirement that conflicts with
                // a given argument counts as met), so the combinations are checked here.
                let submission = match (file, template, name) {
                    (None, Some(template), Some(name)) => jobs::Submission::Template(
                        agentd_api::templates::TemplateSubmit { name, set },
                        template,
                    ),
                    (Some(file), None, None) if set.is_empty() => jobs::Submission::File(file),
                    _ => {
                        return Err(Failure::Usage(
                            "submit takes a manifest FILE, or --template NAME --name NEW \
                             [--set PATH=VALUE]... (not both)"
                                .to_owned(),
                        ));
                    }
                };
                jobs::submit(&client, submission, wait, cli.output).await
            }
            Command::Template { command } => {
                templates::template(&client, command, cli.output).await
            }
            Command::Jobs { queue, state, user } => {
                jobs::list(
                    &client,
                    queue.as_deref(),
                    state.as_deref(),
                    user.as_deref(),
                    cli.output,
                )
                .await
            }
            Command::Job { name } => jobs::show(&client, &name, cli.output).await,
            Command::Logs { .. } if cli.output != Format::Table => Err(Failure::Usage(
                "logs prints the replica's output as it was written; -o json|yaml does not apply"
                    .to_owned(),
            )),
            Command::Logs {
                name,
                replica,
                follow,
            } => jobs::logs(&client, &name, replica.as_deref(), follow).await,
            Command::Cancel { name } => jobs::cancel(&client, &name, cli.output).await,
            Command::Queues => jobs::queues(&client, cli.output).await,
            Command::Token { command } => remote::token(command),
            Command::GenerateDocs { dir } => {
                docs::generate(&<Cli as clap::CommandFactory>::command(), &dir)
                    .map(drop)
                    .map_err(|e| Failure::Request(e.to_string()))
            }
            Command::DialStdio => remote::dial_stdio(&cli.socket).await,
        }
    });
    // `__dial-stdio` may leave a read of standard input behind on a blocking thread: the
    // answer is complete, so nothing waits for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Request(message)) => {
            eprintln!("agentctl: {message}");
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(message)) => {
            eprintln!("agentctl: {message}");
            ExitCode::from(3)
        }
        Err(Failure::Usage(message)) => {
            eprintln!("agentctl: {message}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable(kind: std::io::ErrorKind) -> String {
        let failure = Failure::from(ClientError::Unreachable {
            socket: PathBuf::from("/run/agentd/agentd.sock"),
            source: std::io::Error::from(kind),
        });
        match failure {
            Failure::Unreachable(message) => message,
            Failure::Request(m) | Failure::Usage(m) => panic!("not an unreachable agent: {m}"),
        }
    }

    #[test]
    fn a_socket_refused_by_permission_says_to_join_the_group() {
        let message = unreachable(std::io::ErrorKind::PermissionDenied);
        assert!(message.contains("usermod -aG agentd"), "{message}");
        assert!(!message.contains("Is agentd running?"), "{message}");
        let message = unreachable(std::io::ErrorKind::NotFound);
        assert!(message.contains("Is agentd running?"), "{message}");
    }
}
