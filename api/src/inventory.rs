//! What a node is made of, as the agent measured it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeInventory {
    /// The node's name in the cluster (the hostname unless configured).
    pub name: String,
    pub hostname: String,
    pub kernel: String,
    pub os: String,
    /// Boot time, seconds since the Unix epoch.
    pub boot_time: u64,
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    pub disks: Vec<DiskInfo>,
    /// `None` when no NVML library could be loaded.
    pub gpu_driver: Option<GpuDriver>,
    pub gpus: Vec<GpuInfo>,
    /// When this inventory was sampled, seconds since the Unix epoch.
    pub sampled_at: f64,
}

impl NodeInventory {
    /// How many of the node's GPUs are healthy.
    pub fn healthy_gpus(&self) -> u32 {
        self.gpus.iter().filter(|g| g.healthy).count() as u32
    }

    /// The node's GPU product (its first GPU's name; a node's GPUs are one model), or "" when
    /// it has none.
    pub fn gpu_product(&self) -> String {
        self.gpus
            .first()
            .map(|g| g.name.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuInfo {
    pub model: String,
    pub physical_cores: u32,
    pub logical_cores: u32,
    /// Busy share of all logical cores since the previous sample, 0..1.
    pub utilization: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub mount_point: String,
    pub device: String,
    pub filesystem: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDriver {
    pub driver_version: String,
    /// CUDA driver API version as "major.minor", e.g. "12.4".
    pub cuda_version: String,
    pub nvml_library: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub pci_bus_id: String,
    /// The minor number of the GPU's device file, `/dev/nvidia<minor>`; it can differ from
    /// `index`, which is NVML's enumeration order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_number: Option<u32>,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// Percent of time a kernel ran over the last sample period, 0..100.
    pub utilization_gpu_percent: u32,
    /// Percent of time device memory was read or written, 0..100.
    pub utilization_memory_percent: u32,
    pub temperature_celsius: Option<u32>,
    pub power_usage_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    /// Energy consumed since the driver loaded, joules, where the GPU reports it.
    pub energy_joules: Option<f64>,
    /// Volatile ECC error counts; `None` where ECC is unsupported or disabled.
    pub ecc_errors: Option<EccErrors>,
    /// XID errors seen since the agent started, as (xid, count) pairs in ascending xid order.
    pub xid_errors: Vec<XidCount>,
    pub healthy: bool,
    /// Why the GPU is unhealthy (or was, until recently); empty when healthy and quiet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EccErrors {
    pub corrected: u64,
    pub uncorrected: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidCount {
    pub xid: u64,
    pub count: u64,
}
