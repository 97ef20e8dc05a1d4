//! The remote door: which agent a command talks to (`--server`, `--ca-file`, `--token-file`,
//! `--cert-file` and `--key-file`), `token create`, and `__dial-stdio`, which `--server ssh://` runs on the far machine.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use agentd_api::tokens;
use agentd_api::{Client, ClientCertificate};
use clap::Subcommand;

use crate::Failure;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token for USER: its hash is appended to FILE (created with mode 0600 if missing),
    /// the token itself is printed, alone, and kept nowhere else. The agent reads FILE on start
    /// and on SIGHUP.
    Create {
        /// The user the token acts as; replicas of the jobs it submits run as this local user.
        #[arg(long)]
        user: String,
        /// A group the token's user is in (repeat for more); the admin group (api.admin_group)
        /// makes the token an admin's.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// How long the token is valid, such as 12h, 90d or 2w; for ever if not given.
        #[arg(long)]
        expires: Option<String>,
        /// The tokens file the agent reads (api.tokens_file).
        #[arg(long)]
        tokens_file: std::path::PathBuf,
    },
}

/// What `--server https://...` trusts and shows: files named by flags or the environment.
pub struct CredentialFiles<'a> {
    pub ca: Option<&'a Path>,
    pub token: Option<&'a Path>,
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
}

/// The client for this command: the socket, or `--server` with its credentials. Credentials
/// apply to `https://` only, as the environment may hold them for every command.
pub fn client(
    socket: &Path,
    server: Option<&str>,
    files: &CredentialFiles<'_>,
) -> Result<Client, Failure> {
    let Some(server) = server.filter(|s| !s.is_empty()) else {
        return Ok(Client::new(socket));
    };
    let https = server.starts_with("https://");
    let token = match files.token {
        Some(path) if https => Some(read_token(path)?),
        _ => None,
    };
    let certificate = match (files.cert, files.key) {
        _ if !https => None,
        (Some(cert_file), Some(key_file)) => Some(ClientCertificate {
            cert_file,
            key_file,
        }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(Failure::Usage(
                "--cert-file needs --key-file (or AGENTD_KEY_FILE): the certificate's private key"
                    .to_owned(),
            ));
        }
        (None, Some(_)) => {
            return Err(Failure::Usage(
                "--key-file needs --cert-file (or AGENTD_CERT_FILE): the client certificate"
                    .to_owned(),
            ));
        }
    };
    Ok(Client::remote_with_certificate(
        server,
        files.ca,
        token,
        certificate,
    )?)
}

fn read_token(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::Usage(format!(
            "cannot read the token file {} (--token-file): {e}",
            path.display()
        ))
    })?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(Failure::Usage(format!(
            "the token file {} (--token-file) must hold one token and nothing else",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

pub fn token(command: TokenCommand) -> Result<(), Failure> {
    match command {
        TokenCommand::Create {
            user,
            groups,
            expires,
            tokens_file,
        } => {
            let expires = expires
                .as_deref()
                .map(tokens::parse_lifetime)
                .transpose()
                .map_err(|e| Failure::Usage(format!("--expires: {e}")))?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let token = tokens::create(&tokens_file, &user, &groups, expires, now).map_err(
                |e| match e {
                    tokens::TokenError::Invalid(message) => Failure::Usage(message),
                    other => Failure::Request(other.to_string()),
                },
            )?;
            println!("{token}");
            Ok(())
        }
    }
}

/// Copies standard input to the agent's socket and the socket's answers to standard output,
/// until the agent closes the connection.
pub async fn dial_stdio(socket: &Path) -> Result<(), Failure> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| {
            Failure::from(agentd_api::ClientError::Unreachable {
                socket: socket.to_owned(),
                source,
            })
        })?;
    let (mut from_agent, mut to_agent) = stream.into_split();
    let requests = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let _ = tokio::io::copy(&mut stdin, &mut to_agent).await;
        // The client has sent everything: the agent answers a half-closed connection.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to_agent).await;
    });
    let mut stdout = tokio::io::stdout();
    let copied = tokio::io::copy(&mut from_agent, &mut stdout).await;
    let _ = tokio::io::AsyncWriteExt::flush(&mut stdout).await;
    requests.abort();
    copied.map(drop).map_err(Failure::from)
}
