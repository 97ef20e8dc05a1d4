//! Serves the agent's /metrics for a node with N fake GPUs and a few queues, exactly as the
//! daemon builds them (the same `Metrics`, collector and HTTP server), without NVML or a core
//! loop. Used by `bench/metrics` to measure the exporter on its own.
//!
//!     cargo run --release -p agentd --example metrics_server -- 127.0.0.1:9400 8

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use agentd::metrics::{Metrics, NodeAllocation, serve_metrics};
use agentd::sched::Resources;
use agentd_api::inventory::{EccErrors, XidCount};
use agentd_api::{GpuDriver, GpuInfo, NodeInventory};
use prometheus_client::registry::Registry;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9400".into())
        .parse()?;
    let gpus: u32 = args.next().unwrap_or_else(|| "8".into()).parse()?;

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    metrics.observe_inventory(&inventory(gpus));
    metrics.set_up(true);
    for queue in ["fast", "slow"] {
        metrics.set_queue_depth(queue, 2);
        metrics.set_queue_overdue(queue, 0);
    }
    metrics.set_jobs([
        ("fast", "Running", 3),
        ("fast", "Queued", 2),
        ("slow", "Queued", 2),
    ]);
    metrics.set_node_allocations([(
        "bench-node",
        NodeAllocation {
            capacity: Resources {
                gpus,
                cpu_milli: 64_000,
                memory_mib: 512 * 1024,
            },
            allocated: Resources {
                gpus: gpus / 2,
                cpu_milli: 16_000,
                memory_mib: 128 * 1024,
            },
            schedulable: true,
        },
    )]);
    for (from, to) in [
        ("Queued", "Placed"),
        ("Placed", "Starting"),
        ("Starting", "Running"),
    ] {
        metrics.job_state_changed("fast", from, to);
    }
    metrics.gang_restarted("OOMKilled");
    for route in ["/v1/status", "/v1/jobs", "/v1/jobs/{name}"] {
        metrics.api_request(route, 200);
    }
    for micros in [80, 120, 450, 2_000] {
        metrics.scheduling_pass(Duration::from_micros(micros));
    }
    metrics.submit_to_running(Duration::from_secs(3));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve_metrics(addr, Arc::new(registry), async {
        let _ = tokio::signal::ctrl_c().await;
    }))?;
    Ok(())
}

fn inventory(n: u32) -> NodeInventory {
    NodeInventory {
        name: "bench-node".into(),
        gpu_driver: Some(GpuDriver {
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
            nvml_library: "fake".into(),
        }),
        gpus: (0..n)
            .map(|i| GpuInfo {
                index: i,
                uuid: format!("GPU-be4c0000-0000-4000-8000-{i:012}"),
                name: "NVIDIA H200".into(),
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + i),
                minor_number: Some(i),
                memory_total_bytes: 150_754_820_096,
                memory_used_bytes: 70_000_000_000,
                utilization_gpu_percent: 87,
                utilization_memory_percent: 41,
                temperature_celsius: Some(61),
                power_usage_watts: Some(512.25),
                power_limit_watts: Some(700.0),
                energy_joules: Some(123_456_789.5),
                ecc_errors: Some(EccErrors {
                    corrected: 0,
                    uncorrected: 0,
                }),
                xid_errors: if i == 0 {
                    vec![XidCount { xid: 13, count: 1 }]
                } else {
                    Vec::new()
                },
                healthy: true,
                health_reason: None,
            })
            .collect(),
        sampled_at: 1_764_000_000.0,
        ..NodeInventory::default()
    }
}
