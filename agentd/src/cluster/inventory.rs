//! What a node publishes about itself: the `AgentNode` status (the inventory without anything
//! that moves on every sample, so that an idle node writes nothing), the drain recorded in its
//! `spec` by `agentctl drain`, and the Node labels and annotation a leader-eligible agent
//! projects from them. Pure: no I/O.

use std::collections::BTreeMap;

use agentd_api::NodeInventory;
use serde::{Deserialize, Serialize};

/// The prefix of every label and annotation agentd owns on a Node; nothing else is touched.
pub const PREFIX: &str = "agentd.io/";
pub const LABEL_GPU_COUNT: &str = "agentd.io/gpu.count";
pub const LABEL_GPU_PRODUCT: &str = "agentd.io/gpu.product";
pub const LABEL_GPU_MEMORY: &str = "agentd.io/gpu.memory";
pub const LABEL_GPU_HEALTHY: &str = "agentd.io/gpu.healthy";
pub const LABEL_CPU_CORES: &str = "agentd.io/cpu.cores";
pub const LABEL_MEMORY: &str = "agentd.io/memory";
/// Set by `agentctl drain`; the scheduler places nothing new on such a node.
pub const LABEL_DRAIN: &str = "agentd.io/drain";
/// The `AgentNode` `spec` field where `agentctl drain`/`resume` record the request (`true` or
/// `false`), which any agent's role may write; the labeller projects it onto [`LABEL_DRAIN`].
pub const SPEC_DRAIN: &str = "drain";
pub const ANNOTATION_INVENTORY: &str = "agentd.io/inventory";

/// The `status` of an `AgentNode` object. Field names are camelCase, as Kubernetes objects are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentNodeStatus {
    /// Totals for `kubectl get agentnodes`' printer columns.
    pub gpu_count: u32,
    pub healthy_gpu_count: u32,
    pub gpu_product: String,
    pub agent_version: String,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub disks: Vec<AgentDisk>,
    pub driver_version: Option<String>,
    pub cuda_version: Option<String>,
    pub gpus: Vec<AgentGpu>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentDisk {
    pub mount_point: String,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentGpu {
    pub index: u32,
    pub uuid: String,
    pub product: String,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// The GPU's device file is `/dev/nvidia<minorNumber>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor_number: Option<u32>,
    pub healthy: bool,
    /// Why the GPU is unhealthy, e.g. `XID 79`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl AgentNodeStatus {
    /// The publishable part of an inventory sample: totals and health, never utilization,
    /// temperatures, free memory or error counters, which change on every sample.
    pub fn from_inventory(inventory: &NodeInventory, agent_version: &str) -> Self {
        Self {
            gpu_count: inventory.gpus.len() as u32,
            healthy_gpu_count: inventory.healthy_gpus(),
            gpu_product: inventory.gpu_product(),
            agent_version: agent_version.to_owned(),
            cpu_cores: inventory.cpu.logical_cores,
            memory_bytes: inventory.memory.total_bytes,
            disks: inventory
                .disks
                .iter()
                .map(|d| AgentDisk {
                    mount_point: d.mount_point.clone(),
                    total_bytes: d.total_bytes,
                })
                .collect(),
            driver_version: inventory
                .gpu_driver
                .as_ref()
                .map(|d| d.driver_version.clone()),
            cuda_version: inventory
                .gpu_driver
                .as_ref()
                .map(|d| d.cuda_version.clone()),
            gpus: inventory
                .gpus
                .iter()
                .map(|g| AgentGpu {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    product: g.name.clone(),
                    memory_mib: g.memory_total_bytes / (1024 * 1024),
                    minor_number: g.minor_number,
                    healthy: g.healthy,
                    reason: if g.healthy {
                        None
                    } else {
                        g.health_reason.clone()
                    },
                })
                .collect(),
        }
    }

    /// The Node labels this status stands for (all under `agentd.io/`, drain excepted).
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        let mib = |bytes: u64| (bytes / (1024 * 1024)).to_string();
        let mut labels = BTreeMap::from([
            (LABEL_GPU_COUNT.to_owned(), self.gpus.len().to_string()),
            (
                LABEL_GPU_HEALTHY.to_owned(),
                self.healthy_gpu_count.to_string(),
            ),
            (LABEL_CPU_CORES.to_owned(), self.cpu_cores.to_string()),
            (LABEL_MEMORY.to_owned(), mib(self.memory_bytes)),
        ]);
        if let Some(first) = self.gpus.first() {
            labels.insert(LABEL_GPU_PRODUCT.to_owned(), label_value(&first.product));
            labels.insert(LABEL_GPU_MEMORY.to_owned(), first.memory_mib.to_string());
        }
        labels
    }

    /// The `agentd.io/inventory` annotation: compact JSON of this status.
    pub fn annotation(&self) -> String {
        serde_json::to_string(self).expect("plain data always serializes")
    }
}

/// Makes `text` a valid label value: at most 63 characters of `[A-Za-z0-9._-]`, starting and
/// ending with an alphanumeric; anything else becomes `-` (`NVIDIA H200` → `NVIDIA-H200`).
pub fn label_value(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut value: String = trimmed.chars().take(63).collect();
    while value.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        value.pop();
    }
    value
}

/// The drain recorded in an `AgentNode` object's `spec`: `Some(true)` drained, `Some(false)`
/// resumed, `None` never asked (or not a boolean).
pub fn drain_request(object: &serde_json::Value) -> Option<bool> {
    object.get("spec")?.get(SPEC_DRAIN)?.as_bool()
}

/// The merge patch that brings a Node's `agentd.io/` labels and annotation to `status` and to
/// the recorded `drain` request, or `None` when they already match. Keys outside `agentd.io/`
/// are never named, so the kubelet's and everyone else's stay as they are. With no recorded
/// request (`drain` is `None`) `agentd.io/drain` is left as it is: it may have been set on the
/// Node directly.
pub fn node_patch(
    status: &AgentNodeStatus,
    drain: Option<bool>,
    current_labels: &BTreeMap<String, String>,
    current_annotations: &BTreeMap<String, String>,
) -> Option<serde_json::Value> {
    let desired = status.node_labels();
    let mut labels = serde_json::Map::new();
    for (key, value) in &desired {
        if current_labels.get(key) != Some(value) {
            labels.insert(key.clone(), value.clone().into());
        }
    }
    match (drain, current_labels.get(LABEL_DRAIN).map(String::as_str)) {
        (Some(true), Some("true")) | (Some(false) | None, None) | (None, Some(_)) => {}
        (Some(true), _) => {
            labels.insert(LABEL_DRAIN.to_owned(), "true".into());
        }
        (Some(false), Some(_)) => {
            labels.insert(LABEL_DRAIN.to_owned(), serde_json::Value::Null);
        }
    }
    for key in current_labels.keys() {
        if key.starts_with(PREFIX) && key != LABEL_DRAIN && !desired.contains_key(key) {
            labels.insert(key.clone(), serde_json::Value::Null);
        }
    }
    let annotation = status.annotation();
    let annotation_differs = current_annotations.get(ANNOTATION_INVENTORY) != Some(&annotation);
    if labels.is_empty() && !annotation_differs {
        return None;
    }
    let mut metadata = serde_json::Map::new();
    if !labels.is_empty() {
        metadata.insert("labels".into(), labels.into());
    }
    if annotation_differs {
        metadata.insert(
            "annotations".into(),
            serde_json::json!({ ANNOTATION_INVENTORY: annotation }),
        );
    }
    Some(serde_json::json!({ "metadata": metadata }))
}

#[cfg(test)]
mod tests {
    use agentd_api::{CpuInfo, GpuDriver, GpuInfo, MemoryInfo};

    use super::*;

    fn inventory(gpus: u32) -> NodeInventory {
        NodeInventory {
            name: "node-0".into(),
            cpu: CpuInfo {
                logical_cores: 16,
                utilization: 0.25,
                ..CpuInfo::default()
            },
            memory: MemoryInfo {
                total_bytes: 64 << 30,
                available_bytes: 10 << 30,
                ..MemoryInfo::default()
            },
            gpu_driver: Some(GpuDriver {
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                nvml_library: "libnvidia-ml.so.1".into(),
            }),
            gpus: (0..gpus)
                .map(|i| GpuInfo {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    name: "NVIDIA H200".into(),
                    memory_total_bytes: 141 << 30,
                    pci_bus_id: format!("00000000:{i:02X}:00.0"),
                    utilization_gpu_percent: 7 * i,
                    healthy: true,
                    ..GpuInfo::default()
                })
                .collect(),
            sampled_at: 1.0,
            ..NodeInventory::default()
        }
    }

    #[test]
    fn each_gpu_is_published_with_its_device_minor_number() {
        let mut inv = inventory(2);
        inv.gpus[1].minor_number = Some(7);
        let status = AgentNodeStatus::from_inventory(&inv, "0.1.0");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["gpus"][1]["minorNumber"], 7);
        assert!(json["gpus"][0].get("minorNumber").is_none(), "{json}");
    }

    #[test]
    fn utilization_and_free_memory_do_not_change_the_status() {
        let a = inventory(2);
        let mut b = a.clone();
        b.cpu.utilization = 0.9;
        b.memory.available_bytes = 1;
        b.gpus[0].utilization_gpu_percent = 99;
        b.gpus[1].memory_used_bytes = 1 << 30;
        b.gpus[1].temperature_celsius = Some(80);
        b.sampled_at = 2.0;
        assert_eq!(
            AgentNodeStatus::from_inventory(&a, "0.1.0"),
            AgentNodeStatus::from_inventory(&b, "0.1.0")
        );
    }

    #[test]
    fn an_unhealthy_gpu_changes_the_status_with_its_reason() {
        let a = inventory(2);
        let mut b = a.clone();
        b.gpus[1].healthy = false;
        b.gpus[1].health_reason = Some("XID 79".into());
        let status = AgentNodeStatus::from_inventory(&b, "0.1.0");
        assert_ne!(AgentNodeStatus::from_inventory(&a, "0.1.0"), status);
        assert_eq!(status.gpus[1].reason.as_deref(), Some("XID 79"));
        assert_eq!(status.node_labels()[LABEL_GPU_HEALTHY], "1");
    }

    #[test]
    fn labels_are_label_safe_and_in_mib() {
        let labels = AgentNodeStatus::from_inventory(&inventory(8), "0.1.0").node_labels();
        assert_eq!(labels[LABEL_GPU_COUNT], "8");
        assert_eq!(labels[LABEL_GPU_PRODUCT], "NVIDIA-H200");
        assert_eq!(labels[LABEL_GPU_MEMORY], (141 * 1024).to_string());
        assert_eq!(labels[LABEL_GPU_HEALTHY], "8");
        assert_eq!(labels[LABEL_CPU_CORES], "16");
        assert_eq!(labels[LABEL_MEMORY], (64 * 1024).to_string());
        let none = AgentNodeStatus::from_inventory(&inventory(0), "0.1.0").node_labels();
        assert_eq!(none[LABEL_GPU_COUNT], "0");
        assert!(!none.contains_key(LABEL_GPU_PRODUCT));
    }

    #[test]
    fn label_values() {
        assert_eq!(label_value("NVIDIA H200"), "NVIDIA-H200");
        assert_eq!(label_value("Tesla V100-SXM2-16GB"), "Tesla-V100-SXM2-16GB");
        assert_eq!(label_value(" (A100) "), "A100");
        assert_eq!(label_value(&"x".repeat(100)).len(), 63);
        assert_eq!(label_value("é"), "");
    }

    #[test]
    fn patch_names_only_agentd_keys_and_only_what_differs() {
        let status = AgentNodeStatus::from_inventory(&inventory(2), "0.1.0");
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_owned(), "node-0".to_owned()),
            ("agentd.io/gpu.count".to_owned(), "2".to_owned()),
            ("agentd.io/obsolete".to_owned(), "x".to_owned()),
            (LABEL_DRAIN.to_owned(), "true".to_owned()),
        ]);
        let patch = node_patch(&status, None, &labels, &BTreeMap::new()).unwrap();
        let set = patch["metadata"]["labels"].as_object().unwrap();
        assert!(set.keys().all(|k| k.starts_with(PREFIX)), "{patch}");
        assert!(
            !set.contains_key("agentd.io/gpu.count"),
            "unchanged: {patch}"
        );
        assert!(!set.contains_key(LABEL_DRAIN), "drain is not ours: {patch}");
        assert_eq!(set["agentd.io/obsolete"], serde_json::Value::Null);
        assert_eq!(set[LABEL_GPU_PRODUCT], "NVIDIA-H200");
        let annotation = patch["metadata"]["annotations"][ANNOTATION_INVENTORY]
            .as_str()
            .unwrap();
        let back: AgentNodeStatus = serde_json::from_str(annotation).unwrap();
        assert_eq!(back, status);

        labels.extend(status.node_labels());
        labels.remove("agentd.io/obsolete");
        let annotations = BTreeMap::from([(ANNOTATION_INVENTORY.to_owned(), status.annotation())]);
        assert_eq!(node_patch(&status, None, &labels, &annotations), None);
    }

    #[test]
    fn a_recorded_drain_is_projected_onto_the_drain_label() {
        let status = AgentNodeStatus::from_inventory(&inventory(1), "0.1.0");
        let annotations = BTreeMap::from([(ANNOTATION_INVENTORY.to_owned(), status.annotation())]);
        let in_line = status.node_labels();
        let drained = {
            let mut l = in_line.clone();
            l.insert(LABEL_DRAIN.to_owned(), "true".to_owned());
            l
        };
        let patch = |drain, labels: &BTreeMap<String, String>| {
            node_patch(&status, drain, labels, &annotations)
                .map(|p| p["metadata"]["labels"][LABEL_DRAIN].clone())
        };
        assert_eq!(patch(Some(true), &in_line), Some("true".into()));
        assert_eq!(patch(Some(true), &drained), None);
        assert_eq!(patch(Some(false), &drained), Some(serde_json::Value::Null));
        assert_eq!(patch(Some(false), &in_line), None);
        assert_eq!(
            patch(None, &drained),
            None,
            "set on the Node directly: kept"
        );
        assert_eq!(
            drain_request(&serde_json::json!({"spec": {"nodeName": "n", "drain": true}})),
            Some(true)
        );
        assert_eq!(drain_request(&serde_json::json!({"spec": {}})), None);
    }
}
