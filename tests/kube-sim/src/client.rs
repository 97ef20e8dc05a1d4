//! A minimal client for a simulator described by a kubeconfig: the server, the CA it trusts and
//! the bearer token, for the control commands (`kube-sim stop-node`) and for tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading the kubeconfig {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("connecting to {server}: {message}")]
    Connect { server: String, message: String },
}

/// Where and how to reach a server.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https://127.0.0.1:6443`
    pub server: String,
    pub ca_pem: Option<String>,
    pub token: Option<String>,
}

fn kubeconfig_err(path: &Path, message: impl Into<String>) -> ClientError {
    ClientError::Kubeconfig {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The named entry of a kubeconfig list (`clusters`, `users`, `contexts`).
fn entry<'a>(doc: &'a serde_yaml::Value, list: &str, name: &str) -> Option<&'a serde_yaml::Value> {
    doc.get(list)?
        .as_sequence()?
        .iter()
        .find(|e| e.get("name").and_then(serde_yaml::Value::as_str) == Some(name))
}

impl Endpoint {
    /// The current context's server, CA (`certificate-authority-data` or
    /// `certificate-authority`) and token (`token` or `tokenFile`).
    pub fn from_kubeconfig(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClientError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)
            .map_err(|e| kubeconfig_err(path, format!("not valid YAML: {e}")))?;
        let s = |v: Option<&serde_yaml::Value>, k: &str| {
            v.and_then(|v| v.get(k))
                .and_then(serde_yaml::Value::as_str)
                .map(str::to_string)
        };
        let current = s(Some(&doc), "current-context")
            .ok_or_else(|| kubeconfig_err(path, "current-context is not set"))?;
        let context = entry(&doc, "contexts", &current)
            .and_then(|c| c.get("context"))
            .ok_or_else(|| kubeconfig_err(path, format!("context {current:?} is not defined")))?;
        let cluster_name = s(Some(context), "cluster")
            .ok_or_else(|| kubeconfig_err(path, format!("context {current:?} names no cluster")))?;
        let cluster = entry(&doc, "clusters", &cluster_name)
            .and_then(|c| c.get("cluster"))
            .ok_or_else(|| {
                kubeconfig_err(path, format!("cluster {cluster_name:?} is not defined"))
            })?;
        let server = s(Some(cluster), "server").ok_or_else(|| {
            kubeconfig_err(path, format!("cluster {cluster_name:?} has no server"))
        })?;
        let ca_pem = match (
            s(Some(cluster), "certificate-authority-data"),
            s(Some(cluster), "certificate-authority"),
        ) {
            (Some(data), _) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| {
                        kubeconfig_err(
                            path,
                            format!("certificate-authority-data is not base64: {e}"),
                        )
                    })?;
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            (None, Some(file)) => {
                Some(
                    std::fs::read_to_string(&file).map_err(|source| ClientError::Read {
                        path: PathBuf::from(file),
                        source,
                    })?,
                )
            }
            (None, None) => None,
        };
        let user = s(Some(context), "user").and_then(|u| {
            entry(&doc, "users", &u)
                .and_then(|e| e.get("user"))
                .cloned()
        });
        let token = match (s(user.as_ref(), "token"), s(user.as_ref(), "tokenFile")) {
            (Some(t), _) => Some(t),
            (None, Some(file)) => Some(
                std::fs::read_to_string(&file)
                    .map_err(|source| ClientError::Read {
                        path: PathBuf::from(file),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(Self {
            server,
            ca_pem,
            token,
        })
    }

    /// One request on a fresh connection; the body is parsed as JSON when it is JSON, and kept
    /// as a string otherwise.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> Result<(u16, Value), ClientError> {
        let connect_err = |message: String| ClientError::Connect {
            server: self.server.clone(),
            message,
        };
        let (tls, hostport) = if let Some(rest) = self.server.strip_prefix("https://") {
            (true, rest.trim_end_matches('/'))
        } else if let Some(rest) = self.server.strip_prefix("http://") {
            (false, rest.trim_end_matches('/'))
        } else {
            return Err(connect_err(
                "the server must be an http:// or https:// URL".into(),
            ));
        };
        let stream = tokio::net::TcpStream::connect(hostport)
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", hostport)
            .header("content-type", content_type)
            .header("accept", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| connect_err(e.to_string()))?;
        let resp = if tls {
            let ca = self.ca_pem.as_deref().ok_or_else(|| {
                connect_err("an https server needs a CA certificate in the kubeconfig".into())
            })?;
            let config = crate::tls::client_config(ca).map_err(|e| connect_err(e.to_string()))?;
            let host = hostport
                .rsplit_once(':')
                .map_or(hostport, |(h, _)| h)
                .trim_matches(['[', ']']);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| connect_err(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&config))
                .connect(name, stream)
                .await
                .map_err(|e| connect_err(format!("TLS: {e}")))?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(stream), req).await
        }
        .map_err(connect_err)?;
        Ok(resp)
    }
}

async fn send<I>(io: I, req: http::Request<Full<Bytes>>) -> Result<(u16, Value), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, v))
}
