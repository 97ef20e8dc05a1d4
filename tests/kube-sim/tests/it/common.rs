//! Starting a simulator and talking to it over raw HTTP.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use kube_sim::{KubeSim, SimConfig, SimHandle};
use serde_json::Value;

pub struct Sim {
    pub handle: SimHandle,
    pub dir: tempfile::TempDir,
}

impl Sim {
    pub fn kubeconfig(&self) -> PathBuf {
        self.handle
            .kubeconfig_path()
            .expect("kubeconfig written")
            .to_path_buf()
    }
}

pub async fn start(config: SimConfig) -> Sim {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SimConfig {
        kubeconfig: Some(dir.path().join("kubeconfig")),
        ..config
    };
    let handle = KubeSim::start(config).await.expect("simulator starts");
    Sim { handle, dir }
}

pub async fn start_default() -> Sim {
    start(SimConfig::default()).await
}

/// One request on a fresh connection; the body is parsed as JSON when it is JSON.
pub async fn request(
    sim: &Sim,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(sim.handle.addr())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", content_type)
        .header("accept", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

pub async fn get(sim: &Sim, path: &str) -> (u16, Value) {
    request(sim, "GET", path, "application/json", "").await
}

pub async fn post(sim: &Sim, path: &str, body: &Value) -> (u16, Value) {
    request(sim, "POST", path, "application/json", &body.to_string()).await
}

/// Opens a watch and returns a receiver of its event lines.
pub async fn watch_lines(sim: &Sim, path: &str) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
    let stream = tokio::net::TcpStream::connect(sim.handle.addr())
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if let Ok(v) = serde_json::from_slice(&line)
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    rx
}

pub async fn next_event(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Value {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("watch event within 10s")
        .expect("watch open")
}

/// Polls `check` until it returns `Some`, for up to `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn pod(name: &str, annotations: &Value) -> Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "test"}, "annotations": annotations},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox:1.36"}]}})
}
