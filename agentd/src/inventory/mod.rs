//! The node's inventory: what the machine is made of and how its GPUs are doing. `Sampler` takes
//! one blocking reading (host through sysinfo, GPUs through NVML); `refresh` runs it every
//! interval on the blocking pool and publishes the result, so readers never call into the
//! hardware themselves.

pub mod gpu;
pub mod health;
pub mod host;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_api::NodeInventory;
use tokio::sync::{mpsc, watch};

pub use gpu::{GpuHealthEvent, GpuProbe};
pub use host::{HostError, HostProbe};

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Takes inventory readings.
pub struct Sampler {
    node_name: String,
    host: HostProbe,
    /// `None` when no NVML library could be loaded: the node has zero GPUs.
    gpu: Option<GpuProbe>,
}

impl Sampler {
    /// Opens the host probe and, if the library loads, NVML. No NVML is not an error: it is a
    /// machine without GPUs, said once in the log.
    pub fn open(
        node_name: String,
        nvml_library: Option<&std::path::Path>,
        recovery_quiet: Duration,
    ) -> Result<Self, HostError> {
        let gpu = match GpuProbe::open(nvml_library) {
            Ok(probe) => {
                tracing::info!(library = probe.library(), "NVML loaded");
                Some(probe.with_recovery_quiet(recovery_quiet))
            }
            Err(e) => {
                tracing::warn!("no GPUs: NVML is not available ({e})");
                None
            }
        };
        Ok(Self {
            node_name,
            host: HostProbe::open()?,
            gpu,
        })
    }

    /// One full reading, and the GPU health changes it saw. Blocking: call it from the
    /// blocking pool.
    pub fn sample(&mut self) -> (NodeInventory, Vec<GpuHealthEvent>) {
        let (gpu_driver, gpus, changes) = match self.gpu.as_mut().map(GpuProbe::sample) {
            Some(sample) => (Some(sample.driver), sample.gpus, sample.changes),
            None => (None, Vec::new(), Vec::new()),
        };
        let host = self.host.sample();
        let facts = self.host.facts();
        let inventory = NodeInventory {
            name: self.node_name.clone(),
            hostname: facts.hostname.clone(),
            kernel: facts.kernel.clone(),
            os: facts.os.clone(),
            boot_time: facts.boot_time,
            cpu: host.cpu,
            memory: host.memory,
            disks: host.disks,
            gpu_driver,
            gpus,
            sampled_at: unix_now(),
        };
        (inventory, changes)
    }
}

/// Samples every `interval` and publishes each reading (and each GPU health change), until
/// `shutdown` turns true.
pub async fn refresh(
    sampler: Sampler,
    interval: Duration,
    tx: watch::Sender<Arc<NodeInventory>>,
    health: mpsc::UnboundedSender<GpuHealthEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut sampler = Some(sampler);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let mut s = sampler
            .take()
            .expect("sampler is returned after every reading");
        let Ok((s, (inventory, changes))) = tokio::task::spawn_blocking(move || {
            let reading = s.sample();
            (s, reading)
        })
        .await
        else {
            tracing::error!("inventory reading panicked; inventory refresh stops");
            return;
        };
        sampler = Some(s);
        tx.send_replace(Arc::new(inventory));
        for change in changes {
            let _ = health.send(change);
        }
    }
}
