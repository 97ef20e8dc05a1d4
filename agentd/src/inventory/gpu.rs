//! The GPU probe: reads driver, GPUs and XID events through NVML (nvml-wrapper, loaded at run
//! time) and turns them into the wire types of `agentd_api::inventory`, with health from
//! [`super::health`].
//!
//! Every call here blocks on the driver (an NVML query can take tens of milliseconds, longer when
//! a GPU is failing), so async callers run [`GpuProbe::open`] and [`GpuProbe::sample`] inside
//! `tokio::task::spawn_blocking`. A failure on one GPU never hides the others: a lost or
//! unreadable GPU is still reported, with what was last known of it, as unhealthy with a reason.
//! XID events are drained without waiting (timeout 0) on each sample.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use agentd_api::inventory::{EccErrors, GpuDriver, GpuInfo, XidCount};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};
use serde::Serialize;

use super::health::{
    DEFAULT_RECOVERY_QUIET, HealthChange, NodeGpuHealth, Observation, Readability,
};

/// The library loaded when neither `inventory.nvml_library` nor `AGENTD_NVML_LIBRARY` names one.
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// NVML reports an XID it cannot name as 999.
const UNKNOWN_XID: u64 = 999;

/// A bound on events read per sample, so a GPU spewing XIDs cannot stall the inventory.
const MAX_EVENTS_PER_SAMPLE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "cannot load the NVML library {library}: {source}; install the NVIDIA driver, or set \
         inventory.nvml_library or AGENTD_NVML_LIBRARY to the path of libnvidia-ml.so.1"
    )]
    Load {
        library: String,
        #[source]
        source: NvmlError,
    },
    #[error("{library} is not an NVML library (a required function is missing): {source}")]
    NotNvml {
        library: String,
        #[source]
        source: NvmlError,
    },
    #[error(
        "NVML in {library} failed to initialise: {source}; check that the NVIDIA kernel \
         module is loaded (nvidia-smi) and that agentd may open /dev/nvidia*"
    )]
    Init {
        library: String,
        #[source]
        source: NvmlError,
    },
}

/// One pass over the GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSample {
    pub driver: GpuDriver,
    pub gpus: Vec<GpuInfo>,
    /// Health changes this pass caused, for the node's event list.
    pub changes: Vec<GpuHealthEvent>,
}

/// A GPU became unhealthy or healthy again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuHealthEvent {
    pub index: u32,
    pub uuid: String,
    pub healthy: bool,
    /// Why it became unhealthy, or why it had been unhealthy when it recovered.
    pub reason: String,
}

impl fmt::Display for GpuHealthEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.healthy {
            write!(
                f,
                "GPU {} ({}) healthy again (was: {})",
                self.index, self.uuid, self.reason
            )
        } else {
            write!(
                f,
                "GPU {} ({}) unhealthy: {}",
                self.index, self.uuid, self.reason
            )
        }
    }
}

/// What stays true of a GPU while it is unreadable, so a lost GPU is still reported by name.
#[derive(Debug, Clone)]
struct Identity {
    uuid: String,
    name: String,
    pci_bus_id: String,
    /// `None` where the driver does not say (it is then not needed: no device files).
    minor_number: Option<u32>,
    memory_total_bytes: u64,
}

/// Values that change from one sample to the next; `None` where unsupported.
#[derive(Debug, Clone, Default)]
struct Readings {
    memory_used_bytes: u64,
    utilization_gpu_percent: u32,
    utilization_memory_percent: u32,
    temperature_celsius: Option<u32>,
    power_usage_mw: Option<u32>,
    power_limit_mw: Option<u32>,
    energy_mj: Option<u64>,
    ecc_errors: Option<EccErrors>,
}

/// NVML handles loaded in this process, by library path.
///
/// An [`EventSet`] borrows the [`Nvml`] it came from and a probe owns both, so the `Nvml` must
/// outlive every probe: it is kept for the life of the process (the driver library is never
/// worth unloading), and a second probe of the same library reuses it.
static LOADED: Mutex<Vec<(PathBuf, &'static Nvml)>> = Mutex::new(Vec::new());

fn load(library: &Path) -> Result<&'static Nvml, GpuError> {
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, nvml)) = loaded.iter().find(|(path, _)| path == library) {
        return Ok(nvml);
    }
    let name = library.display().to_string();
    let nvml = Nvml::builder()
        .lib_path(library.as_os_str())
        .init()
        .map_err(|source| match source {
            NvmlError::LibloadingError(_) => GpuError::Load {
                library: name.clone(),
                source,
            },
            NvmlError::FailedToLoadSymbol(_) => GpuError::NotNvml {
                library: name.clone(),
                source,
            },
            _ => GpuError::Init {
                library: name.clone(),
                source,
            },
        })?;
    let nvml: &'static Nvml = Box::leak(Box::new(nvml));
    loaded.push((library.to_owned(), nvml));
    Ok(nvml)
}

/// Whether this process has run out of file descriptors (or the system has).
fn out_of_descriptors() -> bool {
    std::fs::File::open("/dev/null")
        .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
}

fn readability_of(error: &NvmlError) -> Readability {
    match error {
        NvmlError::GpuLost => Readability::Lost,
        other => Readability::Unreadable(other.to_string()),
    }
}

/// Reads the GPUs of this machine through NVML and keeps their health.
pub struct GpuProbe {
    nvml: &'static Nvml,
    library: String,
    /// The event set XIDs arrive on; `None` until one could be created.
    events: Option<EventSet<'static>>,
    /// GPU indices registered for XID events in `events`.
    watched: BTreeSet<u32>,
    /// GPU indices whose XID events NVML cannot deliver; not asked again.
    unwatchable: BTreeSet<u32>,
    /// The last identity read of each GPU index.
    known: BTreeMap<u32, Identity>,
    health: NodeGpuHealth,
    /// XIDs seen since the probe opened: by GPU UUID, then XID, a count.
    xid_counts: BTreeMap<String, BTreeMap<u64, u64>>,
}

impl fmt::Debug for GpuProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuProbe")
            .field("library", &self.library)
            .field("watched", &self.watched)
            .field("known_gpus", &self.known.len())
            .finish_non_exhaustive()
    }
}

impl GpuProbe {
    /// Loads and initialises NVML from `library` (`None`: [`DEFAULT_NVML_LIBRARY`], found by the
    /// dynamic loader) and starts watching every readable GPU for XID events. Blocking.
    pub fn open(library: Option<&Path>) -> Result<GpuProbe, GpuError> {
        let library = library.unwrap_or(Path::new(DEFAULT_NVML_LIBRARY));
        let nvml = load(library)?;
        let mut probe = GpuProbe {
            nvml,
            library: library.display().to_string(),
            events: None,
            watched: BTreeSet::new(),
            unwatchable: BTreeSet::new(),
            known: BTreeMap::new(),
            health: NodeGpuHealth::new(DEFAULT_RECOVERY_QUIET),
            xid_counts: BTreeMap::new(),
        };
        // Watch before the first sample: NVML only delivers events that happen after a GPU is
        // registered.
        if let Ok(count) = nvml.device_count() {
            for index in 0..count {
                if let Ok(device) = nvml.device_by_index(index) {
                    probe.watch(index, &device);
                }
            }
        }
        Ok(probe)
    }

    /// How long a GPU must be readable and quiet to be healthy again (default 5 minutes).
    #[must_use]
    pub fn with_recovery_quiet(mut self, quiet: Duration) -> GpuProbe {
        self.health = NodeGpuHealth::new(quiet);
        self
    }

    /// The library this probe loaded, as given.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// Reads the driver and every GPU now. Blocking.
    pub fn sample(&mut self) -> GpuSample {
        self.sample_at(Instant::now())
    }

    /// Reads the driver and every GPU, with `now` as the time health is judged at.
    pub fn sample_at(&mut self, now: Instant) -> GpuSample {
        let driver = self.driver();
        let mut xids = self.drain_events();
        let indices: Vec<u32> = match self.nvml.device_count() {
            Ok(count) => (0..count).collect(),
            Err(e) => {
                // The GPUs did not go away because NVML cannot count them: report the known ones.
                tracing::debug!(error = %e, "NVML cannot count GPUs");
                self.known.keys().copied().collect()
            }
        };
        let mut gpus = Vec::with_capacity(indices.len());
        let mut changes = Vec::new();
        for index in indices {
            let (readability, readings) = self.read(index);
            let identity = self.known.get(&index).cloned().unwrap_or_else(|| Identity {
                uuid: String::new(),
                name: String::new(),
                pci_bus_id: String::new(),
                minor_number: None,
                memory_total_bytes: 0,
            });
            // A GPU never read has no UUID; its index keeps its health apart from the others.
            let key = if identity.uuid.is_empty() {
                format!("index:{index}")
            } else {
                identity.uuid.clone()
            };
            let seen = xids.remove(&identity.uuid).unwrap_or_default();
            let counts = self.xid_counts.entry(key.clone()).or_default();
            for &xid in &seen {
                *counts.entry(xid).or_default() += 1;
            }
            let xid_errors = counts
                .iter()
                .map(|(&xid, &count)| XidCount { xid, count })
                .collect();
            // With the agent out of file descriptors every read fails, whatever the GPU's state:
            // such a failure is not judged, so that a flood of connections cannot make every
            // GPU unhealthy and restart or fail the jobs on them.
            let judged =
                !matches!(readability, Readability::Unreadable(_)) || !out_of_descriptors();
            if !judged {
                tracing::warn!(
                    gpu = index,
                    "GPU not read: the agent is out of file descriptors; its health is unchanged"
                );
            }
            let observation = Observation {
                readability,
                xids: &seen,
            };
            let change = if judged {
                self.health.step(&key, &observation, now)
            } else {
                None
            };
            if let Some(change) = change {
                let event = health_event(index, &identity.uuid, change);
                if event.healthy {
                    tracing::info!(gpu = index, uuid = %event.uuid, "{event}");
                } else {
                    tracing::warn!(gpu = index, uuid = %event.uuid, "{event}");
                }
                changes.push(event);
            }
            let health = self.health.get(&key);
            gpus.push(GpuInfo {
                index,
                uuid: identity.uuid,
                name: identity.name,
                pci_bus_id: identity.pci_bus_id,
                minor_number: identity.minor_number,
                memory_total_bytes: identity.memory_total_bytes,
                memory_used_bytes: readings.memory_used_bytes,
                utilization_gpu_percent: readings.utilization_gpu_percent,
                utilization_memory_percent: readings.utilization_memory_percent,
                temperature_celsius: readings.temperature_celsius,
                power_usage_watts: readings.power_usage_mw.map(|mw| f64::from(mw) / 1000.0),
                power_limit_watts: readings.power_limit_mw.map(|mw| f64::from(mw) / 1000.0),
                energy_joules: readings.energy_mj.map(|mj| mj as f64 / 1000.0),
                ecc_errors: readings.ecc_errors,
                xid_errors,
                healthy: health.is_none_or(super::health::GpuHealth::is_healthy),
                health_reason: health.and_then(|h| h.reason()).map(str::to_owned),
            });
        }
        for (uuid, lost) in xids {
            tracing::debug!(%uuid, xids = ?lost, "XID events for a GPU not in this sample");
        }
        GpuSample {
            driver,
            gpus,
            changes,
        }
    }

    fn driver(&self) -> GpuDriver {
        let driver_version = self.nvml.sys_driver_version().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "NVML cannot read the driver version");
            "unknown".to_owned()
        });
        let cuda_version = match self.nvml.sys_cuda_driver_version() {
            Ok(v) => format!("{}.{}", v / 1000, (v % 1000) / 10),
            Err(e) => {
                tracing::debug!(error = %e, "NVML cannot read the CUDA driver version");
                "unknown".to_owned()
            }
        };
        GpuDriver {
            driver_version,
            cuda_version,
            nvml_library: self.library.clone(),
        }
    }

    /// Reads one GPU, updating its known identity and watching it for XIDs when it reads.
    fn read(&mut self, index: u32) -> (Readability, Readings) {
        let device = match self.nvml.device_by_index(index) {
            Ok(device) => device,
            Err(e) => return (readability_of(&e), Readings::default()),
        };
        let identity = (|| -> Result<(Identity, u64), NvmlError> {
            let memory = device.memory_info()?;
            let identity = Identity {
                uuid: device.uuid()?,
                name: device.name()?,
                pci_bus_id: device.pci_info()?.bus_id,
                minor_number: device.minor_number().ok(),
                memory_total_bytes: memory.total,
            };
            Ok((identity, memory.used))
        })();
        let (identity, memory_used_bytes) = match identity {
            Ok(read) => read,
            Err(e) => return (readability_of(&e), Readings::default()),
        };
        self.known.insert(index, identity);
        self.watch(index, &device);

        // Sensors a GPU lacks answer "not supported" and are left out; "lost" from any of them
        // means the GPU fell off the bus in the middle of this read.
        let mut lost = false;
        let utilization = supported(device.utilization_rates(), &mut lost);
        let temperature_celsius = supported(device.temperature(TemperatureSensor::Gpu), &mut lost);
        let power_usage_mw = supported(device.power_usage(), &mut lost);
        let power_limit_mw = supported(device.enforced_power_limit(), &mut lost);
        let energy_mj = supported(device.total_energy_consumption(), &mut lost);
        let corrected = supported(
            device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
            &mut lost,
        );
        let uncorrected = supported(
            device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            &mut lost,
        );
        let readings = Readings {
            memory_used_bytes,
            utilization_gpu_percent: utilization.as_ref().map_or(0, |u| u.gpu),
            utilization_memory_percent: utilization.as_ref().map_or(0, |u| u.memory),
            temperature_celsius,
            power_usage_mw,
            power_limit_mw,
            energy_mj,
            ecc_errors: corrected
                .zip(uncorrected)
                .map(|(corrected, uncorrected)| EccErrors {
                    corrected,
                    uncorrected,
                }),
        };
        let readability = if lost {
            Readability::Lost
        } else {
            Readability::Readable
        };
        (readability, readings)
    }

    /// Registers a GPU for critical XID events, once.
    fn watch(&mut self, index: u32, device: &Device<'static>) {
        if self.watched.contains(&index) || self.unwatchable.contains(&index) {
            return;
        }
        let set = match self.events.take() {
            Some(set) => set,
            None => match self.nvml.create_event_set() {
                Ok(set) => set,
                Err(e) => {
                    tracing::debug!(error = %e, "NVML cannot create an event set");
                    return;
                }
            },
        };
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => {
                self.events = Some(set);
                self.watched.insert(index);
            }
            Err(e) => {
                // nvml-wrapper frees the set when registration fails, so every GPU is registered
                // again in a new set on the next sample.
                self.watched.clear();
                if matches!(e.error, NvmlError::NotSupported) {
                    tracing::warn!(gpu = index, "NVML cannot deliver XID events for this GPU");
                    self.unwatchable.insert(index);
                } else {
                    tracing::debug!(gpu = index, error = %e.error, "cannot watch GPU for XIDs");
                }
            }
        }
    }

    /// The XIDs waiting in the event set, by GPU UUID, without blocking.
    fn drain_events(&mut self) -> BTreeMap<String, Vec<u64>> {
        let mut by_gpu: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let Some(set) = &self.events else {
            return by_gpu;
        };
        for _ in 0..MAX_EVENTS_PER_SAMPLE {
            let event = match set.wait(0) {
                Ok(event) => event,
                Err(NvmlError::Timeout) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "reading NVML events failed");
                    break;
                }
            };
            let xid = match event.event_data {
                Some(XidError::Value(xid)) => xid,
                Some(XidError::Unknown) => UNKNOWN_XID,
                None => continue,
            };
            // A lost GPU cannot tell its UUID; its index still names it among the known GPUs.
            let uuid = event.device.uuid().ok().or_else(|| {
                let index = event.device.index().ok()?;
                self.known.get(&index).map(|identity| identity.uuid.clone())
            });
            if let Some(uuid) = uuid {
                by_gpu.entry(uuid).or_default().push(xid);
            } else {
                tracing::warn!(xid, "XID event from a GPU NVML cannot identify");
            }
        }
        by_gpu
    }
}

/// A sensor reading, `None` when the GPU lacks it or it fails; sets `lost` on "GPU is lost".
fn supported<T>(result: Result<T, NvmlError>, lost: &mut bool) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(NvmlError::GpuLost) => {
            *lost = true;
            None
        }
        Err(_) => None,
    }
}

fn health_event(index: u32, uuid: &str, change: HealthChange) -> GpuHealthEvent {
    let (healthy, reason) = match change {
        HealthChange::BecameUnhealthy { reason } => (false, reason),
        HealthChange::BecameHealthy { was } => (true, was),
    };
    GpuHealthEvent {
        index,
        uuid: uuid.to_owned(),
        healthy,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_can_move_into_spawn_blocking() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<GpuProbe>();
        assert_send::<GpuSample>();
    }

    #[test]
    fn health_events_read_as_sentences() {
        let event = health_event(
            3,
            "GPU-x",
            HealthChange::BecameUnhealthy {
                reason: "XID 79".into(),
            },
        );
        assert_eq!(event.to_string(), "GPU 3 (GPU-x) unhealthy: XID 79");
        let event = health_event(
            3,
            "GPU-x",
            HealthChange::BecameHealthy {
                was: "XID 79".into(),
            },
        );
        assert_eq!(
            event.to_string(),
            "GPU 3 (GPU-x) healthy again (was: XID 79)"
        );
    }
}
