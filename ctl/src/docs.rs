//! The man page and shell completions of `agentctl`, generated from its clap definition so they
//! can never describe flags that do not exist. The package build runs the hidden
//! `agentctl __generate-docs DIR` and installs what it writes:
//!
//! - `DIR/man/agentctl.1` and one `agentctl-<command>.1` per subcommand
//! - `DIR/completions/agentctl.bash`, `DIR/completions/_agentctl` (zsh), `DIR/completions/agentctl.fish`

use std::path::{Path, PathBuf};

use clap_complete::Shell;

#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the man pages and the bash, zsh and fish completions of `command` under `dir`.
pub fn generate(command: &clap::Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let mut command = command.clone().disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();

    let man = dir.join("man");
    create_dir(&man)?;
    clap_mangen::generate_to(command.clone(), &man).map_err(|source| DocsError::Write {
        path: man.clone(),
        source,
    })?;
    let mut pages: Vec<PathBuf> = fs_err::read_dir(&man)
        .map_err(|source| DocsError::Write {
            path: man.clone(),
            source,
        })?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .collect();
    pages.sort();
    written.extend(pages);

    let completions = dir.join("completions");
    create_dir(&completions)?;
    let name = command.get_name().to_owned();
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut buffer = Vec::new();
        clap_complete::generate(shell, &mut command, &name, &mut buffer);
        let path = completions.join(file);
        write(&path, &buffer)?;
        written.push(path);
    }
    Ok(written)
}

fn create_dir(path: &Path) -> Result<(), DocsError> {
    fs_err::create_dir_all(path).map_err(|source| DocsError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, contents: &[u8]) -> Result<(), DocsError> {
    fs_err::write(path, contents).map_err(|source| DocsError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("agentctl")
            .version("0.1.0")
            .about("Talk to the local agentd")
            .arg(
                clap::Arg::new("socket")
                    .long("socket")
                    .help("The agent's API socket"),
            )
            .subcommand(clap::Command::new("status").about("Show the agent and its node"))
            .subcommand(
                clap::Command::new("submit")
                    .about("Submit a training job")
                    .arg(clap::Arg::new("file").required(true)),
            )
            .subcommand(clap::Command::new("__generate-docs").hide(true))
    }

    #[test]
    fn man_pages_and_completions_describe_the_real_commands() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(&command(), dir.path()).unwrap();
        let man = fs_err::read_to_string(dir.path().join("man/agentctl.1")).unwrap();
        assert!(
            man.contains(".TH agentctl 1") && man.contains("\\-\\-socket"),
            "{man}"
        );
        assert!(dir.path().join("man/agentctl-submit.1").exists());
        assert!(
            !dir.path().join("man/agentctl-__generate-docs.1").exists(),
            "hidden commands stay hidden"
        );
        let bash = fs_err::read_to_string(dir.path().join("completions/agentctl.bash")).unwrap();
        assert!(bash.contains("submit") && bash.contains("--socket"));
        assert!(
            fs_err::read_to_string(dir.path().join("completions/_agentctl"))
                .unwrap()
                .contains("#compdef agentctl")
        );
        assert!(
            fs_err::read_to_string(dir.path().join("completions/agentctl.fish"))
                .unwrap()
                .contains("complete -c agentctl")
        );
        assert_eq!(written.len(), 6);
    }
}
