//! A small HTTP/1.1 client for the agent's Unix socket. One connection per request: the socket is
//! local, so a connection costs microseconds, and nothing has to be kept alive between commands.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

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
    #[error("the agent's answer could not be read: {0}")]
    Protocol(String),
}

/// A client bound to one socket path.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A response whose body is read as a stream of chunks (for `logs --follow`).
pub type StreamingResponse = Response<Incoming>;

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the response with its body still unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Bytes,
    ) -> Result<StreamingResponse, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            // The connection ends when the response body is dropped; its error, if any, has
            // already reached the caller through the response.
            let _ = conn.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "agentd");
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
