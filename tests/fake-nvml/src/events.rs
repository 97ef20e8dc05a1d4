//! Which XID events have been delivered, so each one listed in the config reaches the process
//! exactly once.
//!
//! Owns the delivery bookkeeping only; reading the config and the C structs live in `lib.rs`.
//! Progress is kept per GPU UUID for the whole process (not per event set), so an agent that
//! recreates its event set does not see old XIDs again. When a GPU's list becomes shorter than
//! what was delivered (a test cleared it), the count drops to the new length, so listing an XID
//! again later delivers it again.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::FakeConfig;

#[derive(Debug, Default)]
pub struct Deliveries {
    /// How many entries of each GPU's `xid_events` have been delivered, by UUID.
    delivered: BTreeMap<String, usize>,
}

impl Deliveries {
    pub const fn new() -> Self {
        Deliveries {
            delivered: BTreeMap::new(),
        }
    }

    /// The next undelivered XID on one of the `registered` GPU indices, as (index, xid), marked
    /// delivered. GPUs are visited in index order.
    pub fn next(
        &mut self,
        config: &FakeConfig,
        registered: &BTreeSet<usize>,
    ) -> Option<(usize, u64)> {
        for &index in registered {
            let Some(gpu) = config.gpus.get(index) else {
                continue;
            };
            let done = self.delivered.entry(gpu.uuid.clone()).or_default();
            if *done > gpu.xid_events.len() {
                *done = gpu.xid_events.len();
            }
            if let Some(&xid) = gpu.xid_events.get(*done) {
                *done += 1;
                return Some((index, xid));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FakeGpu;

    fn gpu(uuid: &str, xids: &[u64]) -> FakeGpu {
        FakeGpu {
            name: "NVIDIA H200".into(),
            uuid: uuid.into(),
            pci_bus_id: "00000000:19:00.0".into(),
            memory_total_bytes: 1 << 30,
            memory_used_bytes: 0,
            utilization_gpu: 0,
            utilization_memory: 0,
            temperature_c: None,
            power_usage_mw: None,
            power_limit_mw: None,
            energy_mj: None,
            ecc_corrected: None,
            ecc_uncorrected: None,
            xid_events: xids.to_vec(),
            lost: false,
            minor_number: None,
        }
    }

    fn config(gpus: Vec<FakeGpu>) -> FakeConfig {
        FakeConfig {
            driver_version: "550.54.15".into(),
            cuda_version: 12040,
            gpus,
        }
    }

    #[test]
    fn each_listed_xid_is_delivered_once_in_order() {
        let config = config(vec![gpu("a", &[79, 13]), gpu("b", &[48])]);
        let all = BTreeSet::from([0, 1]);
        let mut d = Deliveries::default();
        assert_eq!(d.next(&config, &all), Some((0, 79)));
        assert_eq!(d.next(&config, &all), Some((0, 13)));
        assert_eq!(d.next(&config, &all), Some((1, 48)));
        assert_eq!(d.next(&config, &all), None);
        assert_eq!(d.next(&config, &all), None);
    }

    #[test]
    fn unregistered_gpus_keep_their_events() {
        let config = config(vec![gpu("a", &[79]), gpu("b", &[48])]);
        let mut d = Deliveries::default();
        assert_eq!(d.next(&config, &BTreeSet::from([1])), Some((1, 48)));
        assert_eq!(d.next(&config, &BTreeSet::from([1])), None);
        assert_eq!(d.next(&config, &BTreeSet::from([0, 1])), Some((0, 79)));
    }

    #[test]
    fn appended_xids_are_delivered_and_cleared_lists_rearm() {
        let all = BTreeSet::from([0]);
        let mut d = Deliveries::default();
        assert_eq!(d.next(&config(vec![gpu("a", &[79])]), &all), Some((0, 79)));
        assert_eq!(
            d.next(&config(vec![gpu("a", &[79, 94])]), &all),
            Some((0, 94))
        );
        assert_eq!(d.next(&config(vec![gpu("a", &[])]), &all), None);
        assert_eq!(d.next(&config(vec![gpu("a", &[79])]), &all), Some((0, 79)));
    }

    #[test]
    fn progress_follows_the_uuid_not_the_index() {
        let mut d = Deliveries::default();
        let all = BTreeSet::from([0, 1]);
        assert_eq!(
            d.next(&config(vec![gpu("a", &[79]), gpu("b", &[])]), &all),
            Some((0, 79))
        );
        // The same GPU listed second now: already delivered.
        assert_eq!(
            d.next(&config(vec![gpu("b", &[]), gpu("a", &[79])]), &all),
            None
        );
    }
}
