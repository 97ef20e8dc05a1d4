//! Free capacity of every node during one pass, and gang placement on it.
//!
//! Nodes are indexed by how many GPUs they have free (one bucket per count), so finding the
//! best-fitting node for a replica looks at a handful of buckets instead of every node. A
//! reservation is an overlay on a few nodes ("held" nodes): the GPUs it needs at its start time
//! and the CPU and memory that must be left for it. Gangs that could still be running at that
//! start time place in [`Mode::OutsideReservation`] and see only what the overlay leaves.

use std::collections::BTreeSet;

use super::{Fit, NodeCapacity};

/// One bit per GPU slot of a node (the position in [`NodeCapacity::gpus`], not the index).
pub(crate) type GpuMask = u128;

/// GPU slots beyond this many on one node are not used; no real node has that many.
pub const MAX_GPUS_PER_NODE: usize = 128;

/// What one replica needs, in the form the placement compares. Ordered so that sorting a gang's
/// needs descending puts the largest replicas first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Need {
    pub gpus: u32,
    pub cpu: u64,
    pub mem: u64,
    /// Interned node selector; 0 is the empty selector that every node matches.
    pub selector: u32,
}

/// Which resources a placement may use while a reservation is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Mode {
    /// Everything free now: the gang is known to end before the reservation starts.
    Any,
    /// Only what the reservation does not need.
    OutsideReservation,
}

/// What a reservation keeps on one node.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Hold {
    pub gpus: GpuMask,
    /// CPU and memory that may still be given to gangs that outlast the reservation's start.
    pub slack_cpu: u64,
    pub slack_mem: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeFree {
    pub gpus: GpuMask,
    pub cpu: u64,
    pub mem: u64,
    pub hold: Option<Hold>,
}

/// Resources taken from one node for one replica; enough to give them back.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Taken {
    pub node: u32,
    pub gpus: GpuMask,
    pub cpu: u64,
    pub mem: u64,
    pub slack_cpu: u64,
    pub slack_mem: u64,
}

/// Which nodes match each interned selector (index 0: the empty selector, matches all).
#[derive(Debug, Clone, Default)]
pub(crate) struct SelectorTable {
    pub matches: Vec<Vec<bool>>,
}

impl SelectorTable {
    fn matches(&self, selector: u32, node: u32) -> bool {
        selector == 0 || self.matches[selector as usize][node as usize]
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct FreeState {
    pub nodes: Vec<NodeFree>,
    /// GPUs that may ever be used: healthy slots of the first [`MAX_GPUS_PER_NODE`].
    pub healthy: Vec<GpuMask>,
    pub capacity_cpu: Vec<u64>,
    pub capacity_mem: Vec<u64>,
    pub usable: Vec<bool>,
    /// Usable nodes that are not held, by number of free GPUs.
    buckets: Vec<BTreeSet<u32>>,
    /// Usable nodes under the reservation overlay, ascending.
    held: Vec<u32>,
    /// Free GPUs on usable nodes.
    pub free_gpus: u64,
}

fn lowest_bits(mask: GpuMask, n: u32) -> GpuMask {
    let mut out = 0;
    let mut rest = mask;
    for _ in 0..n {
        let bit = rest & rest.wrapping_neg();
        out |= bit;
        rest &= !bit;
    }
    out
}

impl FreeState {
    /// Every node empty. `ideal` counts every GPU and node (for "could this ever fit");
    /// otherwise unhealthy GPUs and unschedulable nodes are left out. Call
    /// [`FreeState::rebuild_index`] before placing.
    pub fn empty(nodes: &[NodeCapacity], ideal: bool) -> Self {
        let mut state = FreeState {
            nodes: Vec::with_capacity(nodes.len()),
            healthy: Vec::with_capacity(nodes.len()),
            capacity_cpu: Vec::with_capacity(nodes.len()),
            capacity_mem: Vec::with_capacity(nodes.len()),
            usable: Vec::with_capacity(nodes.len()),
            buckets: Vec::new(),
            held: Vec::new(),
            free_gpus: 0,
        };
        for node in nodes {
            let mut healthy: GpuMask = 0;
            for (pos, gpu) in node.gpus.iter().take(MAX_GPUS_PER_NODE).enumerate() {
                if ideal || gpu.healthy {
                    healthy |= 1 << pos;
                }
            }
            state.healthy.push(healthy);
            state.capacity_cpu.push(node.cpu_milli);
            state.capacity_mem.push(node.memory_mib);
            state.usable.push(ideal || node.schedulable);
            state.nodes.push(NodeFree {
                gpus: healthy,
                cpu: node.cpu_milli,
                mem: node.memory_mib,
                hold: None,
            });
        }
        state
    }

    /// Recomputes buckets and totals from `nodes`, after bulk changes.
    pub fn rebuild_index(&mut self) {
        // Sized by what could ever be free, so releasing never outgrows it.
        let top = self
            .healthy
            .iter()
            .map(|h| h.count_ones() as usize)
            .max()
            .unwrap_or(0);
        self.buckets = vec![BTreeSet::new(); top + 1];
        self.held.clear();
        self.free_gpus = 0;
        for (i, node) in self.nodes.iter().enumerate() {
            if !self.usable[i] {
                continue;
            }
            self.free_gpus += u64::from(node.gpus.count_ones());
            if node.hold.is_some() {
                self.held.push(i as u32);
            } else {
                self.buckets[node.gpus.count_ones() as usize].insert(i as u32);
            }
        }
    }

    /// Marks resources as in use (a running gang's assignment). Over-commit in the input is
    /// clamped rather than trusted.
    pub fn occupy(&mut self, node: u32, gpus: GpuMask, cpu: u64, mem: u64) {
        let n = &mut self.nodes[node as usize];
        n.gpus &= !gpus;
        n.cpu = n.cpu.saturating_sub(cpu);
        n.mem = n.mem.saturating_sub(mem);
    }

    /// Gives resources back (a running gang that will have ended), bounded by capacity and health.
    pub fn release(&mut self, node: u32, gpus: GpuMask, cpu: u64, mem: u64) {
        let i = node as usize;
        let n = &mut self.nodes[i];
        n.gpus |= gpus & self.healthy[i];
        n.cpu = (n.cpu + cpu).min(self.capacity_cpu[i]);
        n.mem = (n.mem + mem).min(self.capacity_mem[i]);
    }

    /// Like [`FreeState::release`], keeping the index up to date.
    pub fn release_indexed(&mut self, node: u32, gpus: GpuMask, cpu: u64, mem: u64) {
        let before = self.nodes[node as usize].gpus.count_ones();
        self.release(node, gpus, cpu, mem);
        let after = self.nodes[node as usize].gpus.count_ones();
        if self.usable[node as usize] {
            self.free_gpus += u64::from(after - before);
        }
        self.reindex(node, before);
    }

    /// Marks resources as in use, keeping the index up to date.
    pub fn occupy_indexed(&mut self, node: u32, gpus: GpuMask, cpu: u64, mem: u64) {
        let before = self.nodes[node as usize].gpus.count_ones();
        self.occupy(node, gpus, cpu, mem);
        let after = self.nodes[node as usize].gpus.count_ones();
        if self.usable[node as usize] {
            self.free_gpus -= u64::from(before - after);
        }
        self.reindex(node, before);
    }

    /// Puts a node back as it was when `saved` was read from it, keeping the index up to date.
    pub fn restore(&mut self, node: u32, saved: NodeFree) {
        let i = node as usize;
        let before = self.nodes[i].gpus.count_ones();
        self.nodes[i] = saved;
        if self.usable[i] {
            self.free_gpus =
                self.free_gpus - u64::from(before) + u64::from(saved.gpus.count_ones());
        }
        self.reindex(node, before);
    }

    /// Removes the reservation overlay, leaving the free capacity as it is.
    pub fn unhold(&mut self) {
        for node in std::mem::take(&mut self.held) {
            let n = &mut self.nodes[node as usize];
            n.hold = None;
            self.buckets[n.gpus.count_ones() as usize].insert(node);
        }
    }

    /// Whether no usable node could hold this need alone, whatever else is placed.
    pub fn fits_nowhere(&self, need: &Need, selectors: &SelectorTable) -> bool {
        self.first_fit(need, Mode::Any, selectors).is_none()
    }

    /// Whether `node` could now hold `need` alone, placing in `mode`.
    pub fn fits_in(&self, node: u32, need: &Need, mode: Mode, selectors: &SelectorTable) -> bool {
        self.fits(node, need, mode, selectors)
    }

    /// Installs (or replaces) the reservation overlay on these nodes.
    pub fn hold(&mut self, holds: &[(u32, Hold)]) {
        for &(node, hold) in holds {
            let i = node as usize;
            let was_held = self.nodes[i].hold.replace(hold).is_some();
            if !was_held && self.usable[i] {
                self.buckets[self.nodes[i].gpus.count_ones() as usize].remove(&node);
                let at = self.held.binary_search(&node).unwrap_or_else(|at| at);
                self.held.insert(at, node);
            }
        }
    }

    /// What a placement in `mode` may use on a node: GPUs, CPU, memory.
    pub fn effective(&self, node: u32, mode: Mode) -> (GpuMask, u64, u64) {
        let n = &self.nodes[node as usize];
        match (mode, n.hold) {
            (Mode::OutsideReservation, Some(h)) => (
                n.gpus & !h.gpus,
                n.cpu.min(h.slack_cpu),
                n.mem.min(h.slack_mem),
            ),
            _ => (n.gpus, n.cpu, n.mem),
        }
    }

    /// Free GPUs a placement in `mode` could use, over all usable nodes.
    pub fn free_gpus_in(&self, mode: Mode) -> u64 {
        match mode {
            Mode::Any => self.free_gpus,
            Mode::OutsideReservation => {
                let mut total = self.free_gpus;
                for &node in &self.held {
                    let (gpus, _, _) = self.effective(node, mode);
                    total -= u64::from(self.nodes[node as usize].gpus.count_ones());
                    total += u64::from(gpus.count_ones());
                }
                total
            }
        }
    }

    fn effective_count(&self, node: u32, mode: Mode) -> u32 {
        self.effective(node, mode).0.count_ones()
    }

    fn fits(&self, node: u32, need: &Need, mode: Mode, selectors: &SelectorTable) -> bool {
        if !self.usable[node as usize] || !selectors.matches(need.selector, node) {
            return false;
        }
        let (gpus, cpu, mem) = self.effective(node, mode);
        gpus.count_ones() >= need.gpus && cpu >= need.cpu && mem >= need.mem
    }

    fn reindex(&mut self, node: u32, before: u32) {
        let n = &self.nodes[node as usize];
        if n.hold.is_some() || !self.usable[node as usize] {
            return;
        }
        let after = n.gpus.count_ones();
        if after != before {
            self.buckets[before as usize].remove(&node);
            self.buckets[after as usize].insert(node);
        }
    }

    fn take(&mut self, node: u32, need: &Need, mode: Mode) -> Taken {
        let before = self.nodes[node as usize].gpus.count_ones();
        let n = &mut self.nodes[node as usize];
        let reserved = n.hold.map_or(0, |h| h.gpus);
        // Unreserved GPUs first, so a short gang that may use reserved ones leaves them alone
        // when it can.
        let outside = lowest_bits(n.gpus & !reserved, need.gpus);
        let gpus = if outside.count_ones() == need.gpus || mode == Mode::OutsideReservation {
            outside
        } else {
            outside | lowest_bits(n.gpus & reserved, need.gpus - outside.count_ones())
        };
        n.gpus &= !gpus;
        n.cpu -= need.cpu;
        n.mem -= need.mem;
        let (mut slack_cpu, mut slack_mem) = (0, 0);
        if let (Mode::OutsideReservation, Some(h)) = (mode, n.hold.as_mut()) {
            slack_cpu = need.cpu;
            slack_mem = need.mem;
            h.slack_cpu -= need.cpu;
            h.slack_mem -= need.mem;
        }
        self.free_gpus -= u64::from(need.gpus);
        self.reindex(node, before);
        Taken {
            node,
            gpus,
            cpu: need.cpu,
            mem: need.mem,
            slack_cpu,
            slack_mem,
        }
    }

    pub fn untake(&mut self, t: &Taken) {
        let before = self.nodes[t.node as usize].gpus.count_ones();
        let n = &mut self.nodes[t.node as usize];
        n.gpus |= t.gpus;
        n.cpu += t.cpu;
        n.mem += t.mem;
        if let Some(h) = n.hold.as_mut() {
            h.slack_cpu += t.slack_cpu;
            h.slack_mem += t.slack_mem;
        }
        self.free_gpus += u64::from(t.gpus.count_ones());
        self.reindex(t.node, before);
    }

    /// The first node (lowest index) where the replica fits.
    fn first_fit(&self, need: &Need, mode: Mode, selectors: &SelectorTable) -> Option<u32> {
        let mut best: Option<u32> = None;
        for bucket in self.buckets.iter().skip(need.gpus as usize) {
            for &node in bucket {
                if best.is_some_and(|b| node > b) {
                    break;
                }
                if self.fits(node, need, mode, selectors) {
                    best = Some(node);
                    break;
                }
            }
        }
        for &node in &self.held {
            if best.is_some_and(|b| node > b) {
                break;
            }
            if self.fits(node, need, mode, selectors) {
                best = Some(node);
                break;
            }
        }
        best
    }

    /// The node that leaves least fragmentation: the one with the fewest free GPUs that still
    /// holds all `rest` GPUs the gang has left to place; failing that, the one with the most, so
    /// the gang spans as few nodes as possible.
    fn best_fit(
        &self,
        need: &Need,
        rest: u32,
        mode: Mode,
        selectors: &SelectorTable,
    ) -> Option<u32> {
        let target = rest.max(need.gpus) as usize;
        let first_in = |count: usize| -> Option<u32> {
            self.buckets
                .get(count)?
                .iter()
                .copied()
                .find(|&node| self.fits(node, need, mode, selectors))
        };
        let held: Vec<(u32, u32)> = self
            .held
            .iter()
            .filter(|&&n| self.fits(n, need, mode, selectors))
            .map(|&n| (self.effective_count(n, mode), n))
            .collect();
        let mut found: Option<(u32, u32)> = None;
        for count in target..self.buckets.len() {
            if let Some(node) = first_in(count) {
                found = Some((count as u32, node));
                break;
            }
        }
        for &(count, node) in &held {
            if count as usize >= target && found.is_none_or(|f| (count, node) < f) {
                found = Some((count, node));
            }
        }
        if let Some((_, node)) = found {
            return Some(node);
        }
        for count in (need.gpus as usize..target.min(self.buckets.len())).rev() {
            if let Some(node) = first_in(count) {
                found = Some((count as u32, node));
                break;
            }
        }
        for &(count, node) in &held {
            let better = match found {
                None => true,
                Some((c, n)) => count > c || (count == c && node < n),
            };
            if better {
                found = Some((count, node));
            }
        }
        found.map(|(_, node)| node)
    }

    /// Places every need, or none. `needs` must be sorted largest first. On success `out[i]` is
    /// where `needs[i]` went; on failure everything taken is given back.
    pub fn place(
        &mut self,
        needs: &[Need],
        mode: Mode,
        fit: Fit,
        selectors: &SelectorTable,
        out: &mut Vec<Taken>,
    ) -> bool {
        out.clear();
        let total: u64 = needs.iter().map(|n| u64::from(n.gpus)).sum();
        if total > self.free_gpus_in(mode) {
            return false;
        }
        let mut rest = total as u32;
        for need in needs {
            let node = match fit {
                Fit::FirstFit => self.first_fit(need, mode, selectors),
                Fit::BestFit => self
                    .best_on_used(need, mode, selectors, out)
                    .or_else(|| self.best_fit(need, rest, mode, selectors)),
            };
            let Some(node) = node else {
                self.undo(out);
                return false;
            };
            out.push(self.take(node, need, mode));
            rest -= need.gpus;
        }
        true
    }

    /// Among nodes this gang already uses, the one the replica fits on with least left over.
    fn best_on_used(
        &self,
        need: &Need,
        mode: Mode,
        selectors: &SelectorTable,
        used: &[Taken],
    ) -> Option<u32> {
        let mut best: Option<(u32, u32)> = None;
        for t in used {
            if best.is_some_and(|(_, n)| n == t.node) || !self.fits(t.node, need, mode, selectors) {
                continue;
            }
            let left = self.effective_count(t.node, mode) - need.gpus;
            if best.is_none_or(|b| (left, t.node) < b) {
                best = Some((left, t.node));
            }
        }
        best.map(|(_, n)| n)
    }

    pub fn undo(&mut self, taken: &mut Vec<Taken>) {
        while let Some(t) = taken.pop() {
            self.untake(&t);
        }
    }

    /// The largest free GPU counts of usable nodes matching `selector`, largest first.
    pub fn top_free(&self, selector: u32, selectors: &SelectorTable, k: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(k);
        let mut held: Vec<u32> = self
            .held
            .iter()
            .filter(|&&n| selectors.matches(selector, n))
            .map(|&n| self.effective_count(n, Mode::OutsideReservation))
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        let mut held = held.into_iter().peekable();
        for (count, bucket) in self.buckets.iter().enumerate().rev() {
            for &node in bucket {
                while held.peek().is_some_and(|&h| h as usize > count) && out.len() < k {
                    out.push(held.next().unwrap_or(0));
                }
                if out.len() >= k {
                    return out;
                }
                if selectors.matches(selector, node) {
                    out.push(count as u32);
                }
            }
        }
        out.extend(held.take(k.saturating_sub(out.len())));
        out
    }
}
