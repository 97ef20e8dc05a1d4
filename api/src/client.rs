//! A small HTTP/1.1 client for the agent: over its Unix socket, over HTTPS with a bearer token,
//! or over ssh to another machine's socket (`ssh host agentctl __dial-stdio`, as `docker -H
//! ssh://` does). One connection per request: nothing has to be kept alive between commands.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::error::{ErrorBody, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket: the agent is not running, or the path is wrong.
    #[error("cannot reach the agent at {}: {source}", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error.
    #[error("{body}")]
    Api { status: StatusCode, body: ErrorBody },
    /// A remote agent cannot be reached (connection, TLS or ssh failed).
    #[error("cannot reach the agent at {server}: {message}")]
    RemoteUnreachable { server: String, message: String },
    /// The client was given settings it cannot use (a bad URL, an unreadable CA file).
    #[error("{0}")]
    Settings(String),
    #[error("the agent's answer could not be read: {0}")]
    Protocol(String),
}

/// A client of one agent.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
}

#[derive(Clone)]
enum Endpoint {
    Socket(PathBuf),
    Https {
        /// As given, for messages.
        server: String,
        host: String,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        token: Option<String>,
    },
    Ssh {
        server: String,
        /// `user@host` or `host`.
        destination: String,
        port: Option<u16>,
        /// The socket on the far machine; its agentctl's default where `None`.
        socket: Option<String>,
    },
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Client")
            .field("server", &self.describe())
            .finish()
    }
}

/// The program the ssh transport runs on the far machine.
pub const REMOTE_AGENTCTL: &str = "agentctl";
/// The hidden agentctl command that joins its standard input and output to the agent's socket.
pub const DIAL_STDIO: &str = "__dial-stdio";

/// A client certificate and its private key, as PEM files, for an agent that takes client
/// certificates (`api.client_ca`): the certificate's common name is the user.
#[derive(Debug, Clone, Copy)]
pub struct ClientCertificate<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// A response whose body is read as a stream of chunks (for `logs --follow`).
pub type StreamingResponse = Response<Incoming>;

impl Client {
    /// A client of the agent on the Unix socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            endpoint: Endpoint::Socket(socket.into()),
        }
    }

    /// A client of a remote agent: `https://host[:port]` (port 443 if none) with the bearer
    /// `token` and the CA certificates in `ca_file` (the system's roots if `None`), or
    /// `ssh://[user@]host[:port][/path/to/socket]`, which runs `agentctl __dial-stdio` there.
    pub fn remote(
        server: &str,
        ca_file: Option<&Path>,
        token: Option<String>,
    ) -> Result<Self, ClientError> {
        Self::remote_with_certificate(server, ca_file, token, None)
    }

    /// As [`Client::remote`], showing `certificate` to an HTTPS server that asks for one.
    pub fn remote_with_certificate(
        server: &str,
        ca_file: Option<&Path>,
        token: Option<String>,
        certificate: Option<ClientCertificate<'_>>,
    ) -> Result<Self, ClientError> {
        let bad = |why: &str| {
            ClientError::Settings(format!(
                "--server {server:?} {why}; use https://HOST[:PORT] or ssh://[USER@]HOST[:PORT]"
            ))
        };
        let (scheme, rest) = server
            .split_once("://")
            .ok_or_else(|| bad("has no scheme"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("has a bad port"))?;
        if host.is_empty() || host.starts_with('-') || userinfo.is_some_and(str::is_empty) {
            return Err(bad("names no host"));
        }
        let endpoint = match scheme {
            "https" => {
                if userinfo.is_some() {
                    return Err(bad("carries a user name; the token says who you are"));
                }
                if path.is_some_and(|p| p != "/") {
                    return Err(bad("has a path; the API's paths are the agent's own"));
                }
                Endpoint::Https {
                    server: server.to_owned(),
                    host: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port: port.unwrap_or(443),
                    tls: tls_config(ca_file, certificate)?,
                    token,
                }
            }
            "ssh" => {
                if userinfo.is_some_and(|u| u.starts_with('-') || u.contains(char::is_whitespace)) {
                    return Err(bad("has a bad user name"));
                }
                Endpoint::Ssh {
                    server: server.to_owned(),
                    destination: userinfo
                        .map_or_else(|| host.to_owned(), |u| format!("{u}@{host}")),
                    port,
                    socket: path.filter(|p| *p != "/").map(str::to_owned),
                }
            }
            other => return Err(bad(&format!("has the scheme {other:?}"))),
        };
        Ok(Self { endpoint })
    }

    /// The socket path or the server URL, for messages.
    pub fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Socket(path) => path.display().to_string(),
            Endpoint::Https { server, .. } | Endpoint::Ssh { server, .. } => server.clone(),
        }
    }

    /// The command line the ssh transport runs (program first); `None` for other transports.
    pub fn ssh_command(&self) -> Option<Vec<String>> {
        let Endpoint::Ssh {
            destination,
            port,
            socket,
            ..
        } = &self.endpoint
        else {
            return None;
        };
        let mut args = vec!["ssh".to_owned()];
        if let Some(port) = port {
            args.extend(["-p".to_owned(), port.to_string()]);
        }
        // `--` ends ssh's options: a destination can never be read as one.
        args.extend(["--".to_owned(), destination.clone()]);
        // ssh hands the far shell one line: each word is quoted for it.
        args.push(REMOTE_AGENTCTL.to_owned());
        if let Some(socket) = socket {
            args.extend(["--socket".to_owned(), shell_quote(socket)]);
        }
        args.push(DIAL_STDIO.to_owned());
        Some(args)
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        match &self.endpoint {
            Endpoint::Socket(socket) => UnixStream::connect(socket)
                .await
                .map(|s| Box::new(s) as Box<dyn Io>)
                .map_err(|source| ClientError::Unreachable {
                    socket: socket.clone(),
                    source,
                }),
            Endpoint::Https {
                server,
                host,
                port,
                tls,
                ..
            } => {
                let unreachable = |message: String| ClientError::RemoteUnreachable {
                    server: server.clone(),
                    message,
                };
                let tcp = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| unreachable(e.to_string()))?;
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS: {e}")))?;
                Ok(Box::new(stream))
            }
            Endpoint::Ssh { server, .. } => {
                let args = self.ssh_command().expect("an ssh endpoint");
                let mut child = tokio::process::Command::new(&args[0])
                    .args(&args[1..])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| ClientError::RemoteUnreachable {
                        server: server.clone(),
                        message: format!("cannot run ssh: {e}"),
                    })?;
                let stdin = child.stdin.take().expect("piped");
                let stdout = child.stdout.take().expect("piped");
                Ok(Box::new(ChildStream {
                    _child: child,
                    stdin,
                    stdout,
                }))
            }
        }
    }

    /// Sends one request and returns the response with its body still unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<StreamingResponse, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            // The connection ends when the response body is dropped; its error, if any, has
            // already reached the caller through the response.
            let _ = conn.await;
        });
        let mut request = Request::builder().method(method).uri(path);
        request = match &self.endpoint {
            Endpoint::Https {
                host, port, token, ..
            } => {
                let request = request.header("host", format!("{host}:{port}"));
                match token {
                    Some(token) => request.header("authorization", format!("Bearer {token}")),
                    None => request,
                }
            }
            Endpoint::Socket(_) | Endpoint::Ssh { .. } => request.header("host", "agentd"),
        };
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = read_body(response).await?;
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| {
            ErrorBody::new(
                ErrorCode::Internal,
                format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
            )
        });
        Err(ClientError::Api { status, body })
    }

    /// Sends a request and returns the whole body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<Bytes, ClientError> {
        let response = self.send(method, path, content_type, body).await?;
        read_body(response).await
    }

    /// `GET path`, decoded from JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let bytes = self.request(Method::GET, path, None, Bytes::new()).await?;
        decode(&bytes)
    }

    /// `GET path`, the raw JSON value (what `-o json` prints, unchanged).
    pub async fn get_value(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.get(path).await
    }
}

pub async fn read_body(response: Response<Incoming>) -> Result<Bytes, ClientError> {
    response
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// What a request travels over: a Unix socket, TLS over TCP, or an ssh process's pipes.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The ssh process's standard output and input as one stream; the process is killed when the
/// stream is dropped.
struct ChildStream {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
}

impl AsyncRead for ChildStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdout).poll_read(cx, buf)
    }
}

impl AsyncWrite for ChildStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stdin).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stdin).poll_shutdown(cx)
    }
}

/// TLS 1.2 and 1.3 (rustls has no older version), trusting `ca_file` or the system's roots,
/// showing `certificate` where given.
fn tls_config(
    ca_file: Option<&Path>,
    certificate: Option<ClientCertificate<'_>>,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| {
                ClientError::Settings(format!(
                    "cannot read the CA certificates in {} (--ca-file): {e}",
                    path.display()
                ))
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(&e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(&e))?;
            if certs.is_empty() {
                return Err(bad(&"the file holds no PEM certificate"));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(&e))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system certificate rustls cannot use is no reason to refuse the others.
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| ClientError::Settings(e.to_string()))?
    .with_root_certificates(roots);
    let config = match certificate {
        Some(certificate) => {
            let (chain, key) = read_client_certificate(certificate)?;
            config.with_client_auth_cert(chain, key).map_err(|e| {
                ClientError::Settings(format!(
                    "the key in {} (--key-file) cannot be used with the certificate in {} \
                     (--cert-file): {e}",
                    certificate.key_file.display(),
                    certificate.cert_file.display()
                ))
            })?
        }
        None => config.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The certificate chain and private key of a client certificate; an error names the flag of
/// the file that is missing, unreadable or holds no PEM certificate or key.
fn read_client_certificate(
    certificate: ClientCertificate<'_>,
) -> Result<
    (
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    ClientError,
> {
    use rustls::pki_types::pem::{Error as PemError, PemObject as _};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, flag: &str, path: &Path, e: &dyn std::fmt::Display| {
        ClientError::Settings(format!(
            "cannot read the client {what} in {} ({flag}): {e}",
            path.display()
        ))
    };
    let ClientCertificate {
        cert_file,
        key_file,
    } = certificate;
    let chain = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| bad("certificate", "--cert-file", cert_file, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("certificate", "--cert-file", cert_file, &e))?;
    if chain.is_empty() {
        return Err(bad(
            "certificate",
            "--cert-file",
            cert_file,
            &"the file holds no PEM certificate",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| match e {
        PemError::NoItemsFound => bad(
            "key",
            "--key-file",
            key_file,
            &"the file holds no PEM private key",
        ),
        other => bad("key", "--key-file", key_file, &other),
    })?;
    Ok((chain, key))
}

/// `host`, `host:port` or `[v6]:port`.
fn split_host_port(text: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if text.starts_with('[') {
        let end = text.find(']')?;
        let rest = &text[end + 1..];
        (&text[..=end], rest.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => None,
    };
    Some((host, port))
}

/// `text` quoted for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_servers_become_an_ssh_command_line() {
        let client =
            Client::remote("ssh://alice@gpu-7:2222/run/my agent.sock", None, None).unwrap();
        assert_eq!(
            client.ssh_command().unwrap(),
            [
                "ssh",
                "-p",
                "2222",
                "--",
                "alice@gpu-7",
                "agentctl",
                "--socket",
                "'/run/my agent.sock'",
                "__dial-stdio"
            ]
        );
        let client = Client::remote("ssh://gpu-7", None, None).unwrap();
        assert_eq!(
            client.ssh_command().unwrap(),
            ["ssh", "--", "gpu-7", "agentctl", "__dial-stdio"]
        );
    }

    #[test]
    fn bad_servers_are_refused_with_the_forms_allowed() {
        for bad in [
            "gpu-7:9443",
            "http://gpu-7",
            "ssh://-oProxyCommand=x",
            "ssh://-x@gpu-7",
            "https://gpu-7:0",
            "https://gpu-7:99999",
            "https://alice@gpu-7",
            "https://gpu-7/v1",
            "ssh://",
        ] {
            let err = Client::remote(bad, None, None).unwrap_err().to_string();
            assert!(err.contains("https://HOST[:PORT]"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let err = Client::remote("https://gpu-7:9443", Some(&path), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.pem") && err.contains("--ca-file"), "{err}");
    }

    #[test]
    fn client_certificate_files_that_cannot_be_used_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_file = dir.path().join("alice.pem");
        let key_file = dir.path().join("alice.key");
        let other_key_file = dir.path().join("other.key");
        let not_pem = dir.path().join("notes.txt");
        let missing = dir.path().join("missing.pem");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(&other_key_file, other.serialize_pem()).unwrap();
        std::fs::write(&not_pem, "not PEM at all").unwrap();
        let connect = |cert_file: &Path, key_file: &Path| {
            Client::remote_with_certificate(
                "https://gpu-7:9443",
                None,
                None,
                Some(ClientCertificate {
                    cert_file,
                    key_file,
                }),
            )
            .map(drop)
            .map_err(|e| e.to_string())
        };
        assert_eq!(connect(&cert_file, &key_file), Ok(()));
        for (cert, key, needles) in [
            (&missing, &key_file, ["missing.pem", "--cert-file"]),
            (&not_pem, &key_file, ["no PEM certificate", "--cert-file"]),
            (&key_file, &key_file, ["no PEM certificate", "--cert-file"]),
            (&cert_file, &missing, ["missing.pem", "--key-file"]),
            (&cert_file, &not_pem, ["no PEM private key", "--key-file"]),
            (&cert_file, &cert_file, ["no PEM private key", "--key-file"]),
        ] {
            let err = connect(cert, key).unwrap_err();
            for needle in needles {
                assert!(err.contains(needle), "{needle:?} not in {err:?}");
            }
        }
        let err = connect(&cert_file, &other_key_file).unwrap_err();
        assert!(
            err.contains("--key-file") && err.contains("--cert-file"),
            "{err}"
        );
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
