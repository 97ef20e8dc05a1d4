//! Benchmark of the simulator over HTTP: pod creates per second from one client, watch events
//! delivered per second to 10 watchers, and list latency at 5,000 nodes and 50,000 pods. Each
//! figure is printed next to a baseline measured in the same run (GET /version over the same
//! kind of connection), so machines of different speed can be compared by the ratio.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use kube_sim::{KubeSim, SimConfig};

struct Conn(SendRequest<Full<Bytes>>);

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .context("connecting")?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self(sender))
    }

    async fn call(&mut self, method: &str, path: &str, body: Bytes) -> Result<(u16, Bytes)> {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        self.0.ready().await?;
        let resp = self.0.send_request(req).await?;
        let code = resp.status().as_u16();
        Ok((code, resp.into_body().collect().await?.to_bytes()))
    }
}

fn pod_body(i: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("bench-{i}"), "labels": {"app": "bench", "shard": (i % 100).to_string()}},
            "spec": {"containers": [{"name": "main", "image": "busybox:1.36",
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}})
        .to_string(),
    )
}

async fn create_pods(
    addr: std::net::SocketAddr,
    range: std::ops::Range<usize>,
    conns: usize,
) -> Result<f64> {
    let n = range.len();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conns {
        let mut conn = Conn::open(addr).await?;
        let ids: Vec<usize> = range.clone().filter(|i| i % conns == c).collect();
        tasks.push(tokio::spawn(async move {
            for i in ids {
                let (code, body) = conn
                    .call("POST", "/api/v1/namespaces/default/pods", pod_body(i))
                    .await?;
                anyhow::ensure!(
                    code == 201,
                    "create bench-{i}: HTTP {code}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn baseline(addr: std::net::SocketAddr, n: usize) -> Result<f64> {
    let mut conn = Conn::open(addr).await?;
    let start = Instant::now();
    for _ in 0..n {
        conn.call("GET", "/version", Bytes::new()).await?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Opens a watch and counts event lines until `want` have arrived.
async fn watcher(addr: std::net::SocketAddr, rv: String, want: usize) -> Result<Instant> {
    let mut conn = Conn::open(addr).await?;
    let req = http::Request::builder()
        .uri(format!("/api/v1/pods?watch=true&resourceVersion={rv}"))
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))?;
    conn.0.ready().await?;
    let resp = conn.0.send_request(req).await?;
    let mut body = resp.into_body();
    let mut seen = 0;
    while seen < want {
        let frame = body.frame().await.context("watch ended early")??;
        if let Ok(data) = frame.into_data() {
            // One event per line; lines are short enough that a plain count is no bottleneck.
            #[allow(clippy::naive_bytecount)]
            let lines = data.iter().filter(|b| **b == b'\n').count();
            seen += lines;
        }
    }
    Ok(Instant::now())
}

async fn time_get(
    addr: std::net::SocketAddr,
    path: &str,
    reps: usize,
) -> Result<(Duration, usize)> {
    let mut conn = Conn::open(addr).await?;
    let mut best = Duration::MAX;
    let mut size = 0;
    for _ in 0..reps {
        let t = Instant::now();
        let (code, body) = conn.call("GET", path, Bytes::new()).await?;
        anyhow::ensure!(code == 200, "GET {path}: HTTP {code}");
        best = best.min(t.elapsed());
        size = body.len();
    }
    Ok((best, size))
}

fn main() -> Result<()> {
    let nodes: usize = std::env::var("BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let pods: usize = std::env::var("BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let t = Instant::now();
        let sim = KubeSim::start(SimConfig {
            nodes,
            watch_history: pods,
            watch_buffer: pods,
            ..SimConfig::default()
        })
        .await?;
        let addr = sim.addr();
        println!(
            "kube-sim benchmark: {nodes} simulated nodes (created in {:.2}s), {pods} pods",
            t.elapsed().as_secs_f64()
        );
        let base = baseline(addr, 20_000).await?;
        let half = pods / 2;
        let seq = create_pods(addr, 0..half / 2, 1).await?;
        let par = create_pods(addr, half / 2..half, 4).await?;

        let mut conn = Conn::open(addr).await?;
        let (_, v) = conn
            .call(
                "GET",
                "/api/v1/namespaces/default/pods?limit=1",
                Bytes::new(),
            )
            .await?;
        let rv = serde_json::from_slice::<serde_json::Value>(&v)?["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("0")
            .to_string();
        let want = pods - half;
        let watchers: Vec<_> = (0..10)
            .map(|_| tokio::spawn(watcher(addr, rv.clone(), want)))
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let start = Instant::now();
        let with_watch = create_pods(addr, half..pods, 1).await?;
        let mut last = start;
        for w in watchers {
            last = last.max(w.await??);
        }
        let delivered = (10 * want) as f64 / (last - start).as_secs_f64();

        let (all_pods, all_size) = time_get(addr, "/api/v1/pods", 3).await?;
        let (all_nodes, nodes_size) = time_get(addr, "/api/v1/nodes", 3).await?;
        let (selected, _) = time_get(addr, "/api/v1/pods?labelSelector=shard%3D7", 5).await?;
        let (page, _) = time_get(addr, "/api/v1/pods?limit=500", 5).await?;

        println!();
        println!("{:<58} {:>14} {:>10}", "metric", "value", "vs base");
        println!(
            "{:<58} {:>10.0} /s {:>10}",
            "baseline: GET /version, 1 connection", base, "1.00"
        );
        let row = |name: &str, v: f64| println!("{name:<58} {v:>10.0} /s {:>10.2}", v / base);
        row("pod creates, 1 connection", seq);
        row("pod creates, 1 client with 4 connections", par);
        row(
            "pod creates, 1 connection, 10 watchers attached",
            with_watch,
        );
        row("watch events delivered, sum over 10 watchers", delivered);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let lat = |name: &str, d: Duration, extra: String| {
            println!(
                "{name:<58} {:>10.1} ms {:>10.0} {extra}",
                ms(d),
                ms(d) * base / 1000.0
            );
        };
        println!(
            "{:<58} {:>14} {:>10}",
            "list latency (best of runs)", "", "x base req"
        );
        lat(
            &format!("list all {pods} pods"),
            all_pods,
            format!("({:.1} MB)", all_size as f64 / 1e6),
        );
        lat(
            &format!("list all {nodes} nodes"),
            all_nodes,
            format!("({:.1} MB)", nodes_size as f64 / 1e6),
        );
        lat(
            "list pods, labelSelector shard=7 (1% of pods)",
            selected,
            String::new(),
        );
        lat("list pods, limit=500", page, String::new());
        sim.shutdown();
        Ok(())
    })
}
