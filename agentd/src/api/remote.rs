//! The HTTPS listener (`api.listen`, off by default): the same routes and rules as the socket,
//! behind TLS 1.2 or 1.3 (rustls has nothing older). A caller is known by a bearer token, whose
//! hash is in `api.tokens_file`, or by a client certificate signed by `api.client_ca`, whose
//! common name (CN) names the user. The certificate, key, client CA and tokens are read on start
//! and again on SIGHUP; a file that cannot be used then is logged and the old one kept.
//!
//! This module owns TLS and credentials only: routing, authorization and limits are the
//! socket's, in `super`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_api::tokens::{self, TokenEntry};
use hyper::header::HeaderValue;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{ApiError, ApiState, Caller, Identify};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A file of the listener cannot be used; `field` is the setting that names it.
    #[error("{field} = {path:?}: {message}")]
    File {
        field: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("api.tokens_file: {0}")]
    Tokens(#[from] tokens::TokenError),
    #[error("cannot listen on {addr} (api.listen): {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the listener's files are.
#[derive(Debug, Clone)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    tokens: Option<PathBuf>,
}

/// The listener's TLS settings and credentials, as last read.
pub struct Remote {
    files: Files,
    tls: RwLock<Arc<rustls::ServerConfig>>,
    pub(super) auth: Arc<RemoteAuth>,
}

/// What tells a remote caller who they are.
pub struct RemoteAuth {
    tokens: RwLock<Arc<Vec<Credential>>>,
    admin_group: Arc<str>,
}

/// A token's line and the caller it stands for, looked up in the user database once, when the
/// tokens file is read: a request only hashes its token and finds it.
struct Credential {
    entry: TokenEntry,
    caller: Arc<Caller>,
}

/// The caller a connection's client certificate stands for, or why it stands for nobody.
pub type CertificateCaller = Result<Arc<Caller>, String>;

impl Remote {
    /// Reads the listener's files; any that cannot be used is an error naming its setting.
    pub fn load(config: &crate::config::ApiConfig) -> Result<Self, RemoteError> {
        let optional = |s: &str| Some(PathBuf::from(s)).filter(|_| !s.is_empty());
        let files = Files {
            cert: PathBuf::from(&config.tls_cert),
            key: PathBuf::from(&config.tls_key),
            client_ca: optional(&config.client_ca),
            tokens: optional(&config.tokens_file),
        };
        let admin_group: Arc<str> = Arc::from(config.admin_group.as_str());
        let tls = server_config(&files)?;
        let tokens = read_tokens(&files, &admin_group)?;
        Ok(Self {
            files,
            tls: RwLock::new(Arc::new(tls)),
            auth: Arc::new(RemoteAuth {
                tokens: RwLock::new(Arc::new(tokens)),
                admin_group,
            }),
        })
    }

    /// Reads the files again (on SIGHUP). Each part that reads cleanly replaces the old; one that
    /// does not is logged and the old kept, so a half-written certificate never stops the door.
    pub fn reload(&self) {
        match server_config(&self.files) {
            Ok(config) => {
                *self.tls.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
                tracing::info!(cert = %self.files.cert.display(), "certificate and key reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the current certificate: the files on disk cannot be used");
            }
        }
        match read_tokens(&self.files, &self.auth.admin_group) {
            Ok(tokens) => {
                let count = tokens.len();
                *self
                    .auth
                    .tokens
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(tokens);
                tracing::info!(tokens = count, "tokens reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "keeping the current tokens: the tokens file cannot be used");
            }
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(
            &self.tls.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

impl RemoteAuth {
    /// The caller of one request: its bearer token if it sends one, else the connection's
    /// client certificate; neither, or a token that is unknown or expired, is a 401.
    pub fn caller(
        &self,
        authorization: Option<&HeaderValue>,
        certificate: Option<&CertificateCaller>,
        now: u64,
    ) -> Result<Arc<Caller>, ApiError> {
        let Some(authorization) = authorization else {
            return match certificate {
                Some(Ok(caller)) => Ok(Arc::clone(caller)),
                Some(Err(why)) => Err(ApiError::Unauthorized(why.clone())),
                None => Err(ApiError::Unauthorized(
                    "no credentials: send the header `Authorization: Bearer <token>` \
                     (agentctl --token-file FILE; an admin makes tokens with `agentctl token \
                     create`), or a client certificate"
                        .to_owned(),
                )),
            };
        };
        let token = authorization
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "the Authorization header is not `Bearer <token>`".to_owned(),
                )
            })?;
        let hash = tokens::hash_token(token);
        let tokens = Arc::clone(&self.tokens.read().unwrap_or_else(PoisonError::into_inner));
        let Credential { entry, caller } = tokens
            .iter()
            .find(|c| tokens::same_hash(&c.entry.hash, &hash))
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "the bearer token is not valid: it is not in the agent's tokens file \
                     (mistyped, or revoked); ask an admin for a new one"
                        .to_owned(),
                )
            })?;
        if entry.expired(now) {
            let at = entry.expires.unwrap_or_default();
            return Err(ApiError::Unauthorized(format!(
                "the bearer token of {} expired {}s ago (at Unix time {at}); ask an admin for \
                 a new one",
                entry.user,
                now.saturating_sub(at)
            )));
        }
        Ok(Arc::clone(caller))
    }

    /// The caller a client certificate's common name stands for. Not root: a client CA is often
    /// an organisation's, not this machine's admin's, so a certificate may not act as uid 0
    /// (a token, which only an admin of this machine can make, may).
    pub fn certificate_caller(&self, common_name: &str) -> CertificateCaller {
        let caller = Caller::from_remote(common_name, &[], &self.admin_group);
        if caller.owner.uid == 0 {
            return Err(format!(
                "the client certificate names {common_name:?}, which is root here; a client \
                 certificate may not act as root: use a bearer token"
            ));
        }
        Ok(Arc::new(caller))
    }
}

/// The bound listener, and SIGHUP already caught: a reload sent as soon as the agent is ready
/// must never find the signal's default action (ending the process) still in place.
pub struct Bound {
    listener: TcpListener,
    hangups: Option<tokio::signal::unix::Signal>,
}

/// Binds `api.listen` and starts catching SIGHUP.
pub async fn bind(addr: std::net::SocketAddr) -> Result<Bound, RemoteError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RemoteError::Bind { addr, source })?;
    let hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; certificates and tokens are read on start only");
            None
        }
    };
    Ok(Bound { listener, hangups })
}

/// Accepts TLS connections until `shutdown` turns true, reloading the files on SIGHUP; then lets
/// in-flight requests finish, as the socket does.
pub async fn serve(
    bound: Bound,
    remote: Arc<Remote>,
    state: ApiState,
    mut shutdown: watch::Receiver<bool>,
) {
    let Bound { listener, hangups } = bound;
    let reloads = hangups.map(|hangups| {
        tokio::spawn(reload_on_hangup(
            hangups,
            Arc::clone(&remote),
            shutdown.clone(),
        ))
    });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = state.limits.connections.admit() else {
            drop(tcp);
            continue;
        };
        let acceptor = remote.acceptor();
        let auth = Arc::clone(&remote.auth);
        let state = state.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // The handshake counts against the header timeout: a client that opens a
            // connection and says nothing is closed like one that sends no request.
            let handshake =
                tokio::time::timeout(state.limits.header_timeout, acceptor.accept(tcp)).await;
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    state.limits.connections.refused("tls_handshake");
                    return;
                }
                Err(_) => {
                    state.limits.connections.refused("header_timeout");
                    return;
                }
            };
            let client_cn = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| common_name(cert));
            // Once per connection, off the async workers: the user database may be remote.
            let certificate = match client_cn {
                Some(cn) => {
                    let auth = Arc::clone(&auth);
                    tokio::task::spawn_blocking(move || auth.certificate_caller(&cn))
                        .await
                        .ok()
                }
                None => None,
            };
            let identify = Identify::Remote { auth, certificate };
            super::serve_connection(state, stream, identify, peer.to_string(), watcher, permit)
                .await;
        });
    }
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    drop(listener);
    if tokio::time::timeout(super::SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTPS requests still running; closing them");
    }
}

async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    remote: Arc<Remote>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = hangups.recv() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        tracing::info!("SIGHUP: reading the certificate, key and tokens again");
        // Off the async workers: files, and the user database for each token.
        let remote = Arc::clone(&remote);
        let _ = tokio::task::spawn_blocking(move || remote.reload()).await;
    }
}

/// Seconds since the epoch, for token expiry.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn file_error(field: &'static str, path: &Path, message: impl std::fmt::Display) -> RemoteError {
    RemoteError::File {
        field,
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn read_certs(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(field, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(field, path, e))?;
    if certs.is_empty() {
        return Err(file_error(field, path, "the file holds no PEM certificate"));
    }
    Ok(certs)
}

/// The rustls settings: the certificate chain and key, TLS 1.2 and 1.3, and client
/// certificates from `client_ca` where set (optional: a client may use a token instead).
fn server_config(files: &Files) -> Result<rustls::ServerConfig, RemoteError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("api.tls_cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_error("api.tls_key", &files.key, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| file_error("api.tls_cert", &files.cert, e))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("api.client_ca", path)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error("api.client_ca", path, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| file_error("api.client_ca", path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        file_error(
            "api.tls_key",
            &files.key,
            format!("does not fit the certificate: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read_tokens(files: &Files, admin_group: &str) -> Result<Vec<Credential>, RemoteError> {
    let Some(path) = &files.tokens else {
        return Ok(Vec::new());
    };
    Ok(tokens::read_file(path)?
        .into_iter()
        .map(|entry| {
            let caller = Arc::new(Caller::from_remote(&entry.user, &entry.groups, admin_group));
            Credential { entry, caller }
        })
        .collect())
}

/// The subject's common name (OID 2.5.4.3) of a DER certificate that rustls has already
/// verified against the client CA.
pub fn common_name(cert: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let (_, certificate, _) = der(cert, 0x30)?;
    let (_, tbs, _) = der(certificate, 0x30)?;
    let mut rest = tbs;
    // [0] version, if present; then serial, signature algorithm, issuer, validity, subject.
    if rest.first() == Some(&0xa0) {
        rest = der_any(rest)?.2;
    }
    for _ in 0..4 {
        rest = der_any(rest)?.2;
    }
    let (_, mut subject, _) = der(rest, 0x30)?;
    while !subject.is_empty() {
        let (_, set, next) = der(subject, 0x31)?;
        subject = next;
        let mut attributes = set;
        while !attributes.is_empty() {
            let (_, attribute, next) = der(attributes, 0x30)?;
            attributes = next;
            let (_, oid, value) = der(attribute, 0x06)?;
            if oid == CN {
                let (tag, text, _) = der_any(value)?;
                // UTF8String, PrintableString, IA5String.
                if matches!(tag, 0x0c | 0x13 | 0x16) {
                    return String::from_utf8(text.to_vec()).ok();
                }
                return None;
            }
        }
    }
    None
}

/// One DER element with tag `tag`: (tag, contents, what follows).
fn der(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    der_any(input).filter(|(t, _, _)| *t == tag)
}

fn der_any(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token_auth(entries: Vec<TokenEntry>) -> RemoteAuth {
        let admin_group = "agentd-admin";
        let credentials = entries
            .into_iter()
            .map(|entry| Credential {
                caller: Arc::new(Caller::from_remote(&entry.user, &entry.groups, admin_group)),
                entry,
            })
            .collect();
        RemoteAuth {
            tokens: RwLock::new(Arc::new(credentials)),
            admin_group: Arc::from(admin_group),
        }
    }

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn tokens_are_known_unknown_or_expired() {
        let entry = |token: &str, user: &str, expires| TokenEntry {
            hash: tokens::hash_token(token),
            user: user.to_owned(),
            groups: vec!["agentd-admin".to_owned()],
            expires,
        };
        let auth = token_auth(vec![
            entry("agentd_good", "root", None),
            entry("agentd_old", "root", Some(100)),
        ]);
        let caller = auth
            .caller(Some(&bearer("agentd_good")), None, 1000)
            .unwrap();
        assert_eq!(caller.name(), "root");
        assert!(caller.admin);
        let unauthorized = |r: Result<Arc<Caller>, ApiError>| match r {
            Err(ApiError::Unauthorized(message)) => message,
            other => panic!("not a 401: {other:?}"),
        };
        let message = unauthorized(auth.caller(Some(&bearer("agentd_bad")), None, 1000));
        assert!(message.contains("not valid"), "{message}");
        let message = unauthorized(auth.caller(Some(&bearer("agentd_old")), None, 1000));
        assert!(message.contains("expired 900s ago"), "{message}");
        assert!(auth.caller(Some(&bearer("agentd_old")), None, 99).is_ok());
        let message = unauthorized(auth.caller(None, None, 1000));
        assert!(message.contains("Authorization: Bearer"), "{message}");
        let basic = HeaderValue::from_static("Basic YWxpY2U6c2VjcmV0");
        let message = unauthorized(auth.caller(Some(&basic), None, 1000));
        assert!(message.contains("Bearer <token>"), "{message}");
        // A token, when sent, decides even over a client certificate.
        let nobody = auth.certificate_caller("nobody");
        assert!(
            auth.caller(Some(&bearer("agentd_bad")), Some(&nobody), 1000)
                .is_err()
        );
        assert_eq!(
            auth.caller(None, Some(&nobody), 1000).unwrap().name(),
            "nobody"
        );
        // A certificate may not act as root; a token may.
        let root = auth.certificate_caller("root");
        let message = unauthorized(auth.caller(None, Some(&root), 1000));
        assert!(message.contains("may not act as root"), "{message}");
    }

    #[test]
    fn the_common_name_is_read_from_a_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["client".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "ML team");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
        let params = rcgen::CertificateParams::new(vec!["client".to_owned()]).unwrap();
        let mut params = params;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(common_name(cert.der()), None);
        assert_eq!(common_name(&[0x30, 0x82, 0xff]), None, "truncated input");
    }
}
