use clap::{Parser, Subcommand};

/// GPU node agent and gang scheduler for distributed TensorFlow training.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replay a job trace against a cluster in virtual time and compare scheduling policies.
    Replay(agentd::replay::ReplayArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Some(Command::Replay(args)) => agentd::replay::run(&args)?,
        None => {}
    }
    Ok(())
}
