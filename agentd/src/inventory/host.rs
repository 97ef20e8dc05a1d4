//! The host half of the inventory: CPU, memory, swap and real filesystems, read through sysinfo.
//! Pseudo filesystems (proc, tmpfs, cgroup, ...) and repeated mounts of one device are left out,
//! so the disks listed are the ones a person would call disks.

use std::collections::BTreeMap;

use agentd_api::{CpuInfo, DiskInfo, MemoryInfo};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// Filesystem types that hold no user data.
const PSEUDO_FILESYSTEMS: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "squashfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot read host information: {0}")]
    Sysinfo(String),
}

/// Static facts about the host, read once.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub hostname: String,
    pub kernel: String,
    pub os: String,
    pub boot_time: u64,
    pub cpu_model: String,
    pub physical_cores: u32,
    pub logical_cores: u32,
}

/// Keeps sysinfo's state between samples: CPU utilization is a difference of two readings.
pub struct HostProbe {
    system: System,
    disks: Disks,
    facts: HostFacts,
}

/// One reading of what changes.
#[derive(Debug, Clone, Default)]
pub struct HostSample {
    pub cpu: CpuInfo,
    pub memory: MemoryInfo,
    pub disks: Vec<DiskInfo>,
}

impl HostProbe {
    pub fn open() -> Result<Self, HostError> {
        let err = |e: sysinfo::Error| HostError::Sysinfo(e.to_string());
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_usage())
                .with_memory(MemoryRefreshKind::everything()),
        )
        .map_err(err)?;
        let disks = Disks::new_with_refreshed_list().map_err(err)?;
        let cpu_model = system
            .cpus()
            .first()
            .map(|c| c.brand().trim().to_owned())
            .unwrap_or_default();
        let logical_cores = system.cpus().len() as u32;
        let facts = HostFacts {
            hostname: System::host_name().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            boot_time: System::boot_time().unwrap_or_default(),
            cpu_model,
            physical_cores: System::physical_core_count().map_or(logical_cores, |n| n as u32),
            logical_cores,
        };
        Ok(Self {
            system,
            disks,
            facts,
        })
    }

    pub fn facts(&self) -> &HostFacts {
        &self.facts
    }

    /// Reads CPU use, memory and disks. Blocking (it reads /proc and calls statvfs).
    pub fn sample(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        let memory = MemoryInfo {
            total_bytes: self.system.total_memory(),
            available_bytes: self.system.available_memory(),
            swap_total_bytes: self.system.total_swap(),
            swap_free_bytes: self.system.free_swap(),
        };
        let cpu = CpuInfo {
            model: self.facts.cpu_model.clone(),
            physical_cores: self.facts.physical_cores,
            logical_cores: self.facts.logical_cores,
            utilization: f64::from(self.system.global_cpu_usage() / 100.0).clamp(0.0, 1.0),
        };
        let disks = real_disks(self.disks.iter().map(|d| DiskInfo {
            mount_point: d.mount_point().display().to_string(),
            device: d.name().to_string_lossy().into_owned(),
            filesystem: d.file_system().to_string_lossy().into_owned(),
            total_bytes: d.total_space(),
            available_bytes: d.available_space(),
        }));
        HostSample { cpu, memory, disks }
    }
}

/// Drops pseudo filesystems and keeps one mount point per device (the shortest: `/` rather than
/// a bind mount of `/etc/hosts` from the same disk).
fn real_disks(all: impl Iterator<Item = DiskInfo>) -> Vec<DiskInfo> {
    let mut by_device: BTreeMap<String, DiskInfo> = BTreeMap::new();
    for disk in all {
        if PSEUDO_FILESYSTEMS.contains(&disk.filesystem.as_str()) || disk.total_bytes == 0 {
            continue;
        }
        match by_device.get(&disk.device) {
            Some(kept) if kept.mount_point.len() <= disk.mount_point.len() => {}
            _ => {
                by_device.insert(disk.device.clone(), disk);
            }
        }
    }
    let mut disks: Vec<DiskInfo> = by_device.into_values().collect();
    disks.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    disks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(mount: &str, device: &str, fs: &str) -> DiskInfo {
        DiskInfo {
            mount_point: mount.into(),
            device: device.into(),
            filesystem: fs.into(),
            total_bytes: 100,
            available_bytes: 50,
        }
    }

    #[test]
    fn pseudo_filesystems_and_bind_mounts_are_left_out() {
        let disks = real_disks(
            [
                disk("/etc/hosts", "/dev/vda", "ext4"),
                disk("/", "/dev/vda", "ext4"),
                disk("/dev/shm", "shm", "tmpfs"),
                disk("/data", "/dev/nvme0n1", "xfs"),
                disk("/proc", "proc", "proc"),
            ]
            .into_iter(),
        );
        let mounts: Vec<&str> = disks.iter().map(|d| d.mount_point.as_str()).collect();
        assert_eq!(mounts, ["/", "/data"]);
    }

    /// The probe agrees with what the kernel says in /proc.
    #[test]
    fn matches_proc() {
        let mut probe = HostProbe::open().unwrap();
        let sample = probe.sample();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(sample.memory.total_bytes, total_kib * 1024);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let processors = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count() as u32;
        assert_eq!(sample.cpu.logical_cores, processors);
        assert!(sample.cpu.physical_cores >= 1 && sample.cpu.physical_cores <= processors);
        assert!(
            sample.disks.iter().any(|d| d.mount_point == "/"),
            "{:?}",
            sample.disks
        );
        assert!((0.0..=1.0).contains(&sample.cpu.utilization));
    }
}
