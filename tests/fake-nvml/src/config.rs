//! The JSON file that describes the fake GPUs, and its validation.
//!
//! Owns parsing and checking only; it never touches the C interface. A file that does not parse or
//! validate is an error naming the file and the field, which the exports turn into
//! `NVML_ERROR_UNKNOWN`.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// Environment variable naming the JSON file.
pub const CONFIG_ENV: &str = "FAKE_NVML_CONFIG";

/// The whole file: driver, CUDA version and the GPUs in index order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    pub driver_version: String,
    /// CUDA driver API version as NVML reports it: 1000 * major + 10 * minor (12040 is 12.4).
    pub cuda_version: i32,
    pub gpus: Vec<FakeGpu>,
}

/// One GPU. Optional fields that are absent make the matching NVML call return
/// `NVML_ERROR_NOT_SUPPORTED`, as a real GPU does for a sensor it lacks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGpu {
    pub name: String,
    pub uuid: String,
    /// "DDDDDDDD:BB:DD.F" (domain, bus, device, function in hex), as `nvidia-smi` prints it.
    pub pci_bus_id: String,
    pub memory_total_bytes: u64,
    #[serde(default)]
    pub memory_used_bytes: u64,
    #[serde(default)]
    pub utilization_gpu: u32,
    #[serde(default)]
    pub utilization_memory: u32,
    #[serde(default)]
    pub temperature_c: Option<u32>,
    #[serde(default)]
    pub power_usage_mw: Option<u32>,
    #[serde(default)]
    pub power_limit_mw: Option<u32>,
    /// Energy since the driver loaded, millijoules.
    #[serde(default)]
    pub energy_mj: Option<u64>,
    /// Volatile corrected ECC errors; absent means ECC is not supported.
    #[serde(default)]
    pub ecc_corrected: Option<u64>,
    /// Volatile uncorrected ECC errors; absent means ECC is not supported.
    #[serde(default)]
    pub ecc_uncorrected: Option<u64>,
    /// XIDs delivered once each, in order, through the event API.
    #[serde(default)]
    pub xid_events: Vec<u64>,
    /// When true every call on this GPU returns `NVML_ERROR_GPU_IS_LOST`.
    #[serde(default)]
    pub lost: bool,
    /// The minor number of its device file (`/dev/nvidia<minor>`); absent means the GPU's
    /// position in the file, as on most real machines.
    #[serde(default)]
    pub minor_number: Option<u32>,
}

/// A PCI address split into the numbers `nvmlPciInfo_t` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u32,
    pub device: u32,
    pub function: u32,
}

/// Why the config file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FakeConfig {
    /// Reads and validates the file named by `FAKE_NVML_CONFIG`.
    pub fn load_from_env() -> Result<Self, ConfigError> {
        let path = std::env::var_os(CONFIG_ENV)
            .ok_or_else(|| ConfigError(format!("{CONFIG_ENV} is not set")))?;
        Self::load(Path::new(&path))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: FakeConfig =
            serde_json::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_c_string("driver_version", &self.driver_version, 80)?;
        if self.cuda_version < 1000 {
            return Err(ConfigError(format!(
                "cuda_version {} is not 1000 * major + 10 * minor (12040 is CUDA 12.4)",
                self.cuda_version
            )));
        }
        for (i, gpu) in self.gpus.iter().enumerate() {
            let field = |name: &str| format!("gpus[{i}].{name}");
            check_c_string(&field("name"), &gpu.name, 96)?;
            check_c_string(&field("uuid"), &gpu.uuid, 96)?;
            check_c_string(&field("pci_bus_id"), &gpu.pci_bus_id, 32)?;
            parse_pci_bus_id(&gpu.pci_bus_id).ok_or_else(|| {
                ConfigError(format!(
                    "{} is {:?}; expected DDDDDDDD:BB:DD.F in hex, e.g. 00000000:19:00.0",
                    field("pci_bus_id"),
                    gpu.pci_bus_id
                ))
            })?;
            if gpu.memory_used_bytes > gpu.memory_total_bytes {
                return Err(ConfigError(format!(
                    "{} ({}) is larger than memory_total_bytes ({})",
                    field("memory_used_bytes"),
                    gpu.memory_used_bytes,
                    gpu.memory_total_bytes
                )));
            }
            for (name, value) in [
                ("utilization_gpu", gpu.utilization_gpu),
                ("utilization_memory", gpu.utilization_memory),
            ] {
                if value > 100 {
                    return Err(ConfigError(format!(
                        "{} is {value}; allowed is 0..=100",
                        field(name)
                    )));
                }
            }
            if let Some(other) = self.gpus[..i].iter().position(|g| g.uuid == gpu.uuid) {
                return Err(ConfigError(format!(
                    "{} {:?} is also the uuid of gpus[{other}]",
                    field("uuid"),
                    gpu.uuid
                )));
            }
        }
        Ok(())
    }
}

/// Strings are copied into fixed C buffers, so they must fit with their terminating NUL and
/// contain no NUL of their own.
fn check_c_string(field: &str, value: &str, buffer: usize) -> Result<(), ConfigError> {
    if value.contains('\0') {
        return Err(ConfigError(format!("{field} contains a NUL byte")));
    }
    if value.len() >= buffer {
        return Err(ConfigError(format!(
            "{field} is {} bytes; NVML allows at most {}",
            value.len(),
            buffer - 1
        )));
    }
    Ok(())
}

/// Parses "DDDDDDDD:BB:DD.F" (a 4-digit domain is accepted too).
pub fn parse_pci_bus_id(id: &str) -> Option<PciAddress> {
    let (domain, rest) = id.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    let hex = |s: &str, max_len: usize| {
        if s.is_empty() || s.len() > max_len || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            None
        } else {
            u32::from_str_radix(s, 16).ok()
        }
    };
    Some(PciAddress {
        domain: hex(domain, 8)?,
        bus: hex(bus, 2)?,
        device: hex(device, 2)?,
        function: hex(function, 1)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_GPU: &str = r#"{"driver_version": "550.54.15", "cuda_version": 12040,
        "gpus": [{"name": "NVIDIA H200", "uuid": "GPU-0", "pci_bus_id": "00000000:19:00.0",
                  "memory_total_bytes": 150754820096, "memory_used_bytes": 0,
                  "utilization_gpu": 0, "utilization_memory": 0, "temperature_c": 31,
                  "power_usage_mw": 72000, "power_limit_mw": 700000,
                  "xid_events": [], "lost": false}]}"#;

    #[test]
    fn the_documented_format_parses() {
        let config = FakeConfig::parse(ONE_GPU).unwrap();
        assert_eq!(config.driver_version, "550.54.15");
        assert_eq!(config.gpus[0].memory_total_bytes, 150_754_820_096);
        assert_eq!(config.gpus[0].temperature_c, Some(31));
        assert_eq!(config.gpus[0].ecc_corrected, None);
    }

    #[test]
    fn unknown_fields_are_named() {
        let text = ONE_GPU.replace("\"lost\"", "\"lots\"");
        let err = FakeConfig::parse(&text).unwrap_err();
        assert!(err.0.contains("lots"), "{err}");
    }

    #[test]
    fn a_bad_bus_id_names_the_field() {
        let text = ONE_GPU.replace("00000000:19:00.0", "19:00.0");
        let err = FakeConfig::parse(&text).unwrap_err();
        assert!(err.0.contains("gpus[0].pci_bus_id"), "{err}");
    }

    #[test]
    fn used_memory_over_total_is_rejected() {
        let text = ONE_GPU.replace(
            "\"memory_used_bytes\": 0",
            "\"memory_used_bytes\": 150754820097",
        );
        let err = FakeConfig::parse(&text).unwrap_err();
        assert!(err.0.contains("memory_used_bytes"), "{err}");
    }

    #[test]
    fn bus_ids_parse_in_hex() {
        assert_eq!(
            parse_pci_bus_id("00000001:9b:1f.3"),
            Some(PciAddress {
                domain: 1,
                bus: 0x9b,
                device: 0x1f,
                function: 3
            })
        );
        assert_eq!(parse_pci_bus_id("0000:19:00.0").map(|a| a.bus), Some(0x19));
        assert_eq!(parse_pci_bus_id("0000:19:00"), None);
        assert_eq!(parse_pci_bus_id("0000:1g:00.0"), None);
    }
}
