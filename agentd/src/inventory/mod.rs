//! The node's inventory: what the machine is made of and how its GPUs are doing. `Sampler` takes
//! one blocking reading (host through sysinfo, GPUs through NVML); `refresh` runs it every
//! interval on the blocking pool and publishes the result, so readers never call into the
//! hardware themselves.

pub mod host;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentd_api::NodeInventory;
use tokio::sync::watch;

pub use host::{HostError, HostProbe};

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Takes inventory readings.
pub struct Sampler {
    node_name: String,
    host: HostProbe,
}

impl Sampler {
    pub fn open(node_name: String) -> Result<Self, HostError> {
        Ok(Self { node_name, host: HostProbe::open()? })
    }

    /// One full reading. Blocking: call it from the blocking pool.
    pub fn sample(&mut self) -> NodeInventory {
        let host = self.host.sample();
        let facts = self.host.facts();
        NodeInventory {
            name: self.node_name.clone(),
            hostname: facts.hostname.clone(),
            kernel: facts.kernel.clone(),
            os: facts.os.clone(),
            boot_time: facts.boot_time,
            cpu: host.cpu,
            memory: host.memory,
            disks: host.disks,
            gpu_driver: None,
            gpus: Vec::new(),
            sampled_at: unix_now(),
        }
    }
}

/// Samples every `interval` and publishes each reading, until `shutdown` resolves.
pub async fn refresh(
    sampler: Sampler,
    interval: Duration,
    tx: watch::Sender<Arc<NodeInventory>>,
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
        let mut s = sampler.take().expect("sampler is returned after every reading");
        let Ok((s, inventory)) = tokio::task::spawn_blocking(move || {
            let inventory = s.sample();
            (s, inventory)
        })
        .await
        else {
            tracing::error!("inventory reading panicked; inventory refresh stops");
            return;
        };
        sampler = Some(s);
        tx.send_replace(Arc::new(inventory));
    }
}
