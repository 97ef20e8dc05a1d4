//! One scheduling pass: order the queue, place what fits, hold reservations for the blocked
//! head (and, if the policy says so, the next blocked gangs), backfill behind them, and say why
//! everything else waits.

use std::borrow::Cow;
use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use super::explain::{never_fits_message, unschedulable_message};
use super::free::{FreeState, GpuMask, Hold, Mode, Need, NodeFree, SelectorTable, Taken};
use super::{
    Assignment, Backfill, Decision, Gang, NodeCapacity, NodeRule, Order, Placement, Policy,
    QueueConfig, ReleaseOrder, Reservation, Resources, Snapshot, Waiting, reason,
};

/// FNV-1a: node and queue names are short, and SipHash dominated a pass with many running
/// gangs. Not exposed to untrusted keys in a way that matters: the map lives for one pass.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    // Whole words at a time: shapes hash as runs of integers.
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x0100_0000_01b3).rotate_left(23);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// Resources one gang holds on one node.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Alloc {
    pub node: u32,
    pub gpus: GpuMask,
    pub cpu: u64,
    pub mem: u64,
}

/// A gang that holds resources and may release them: running, or placed earlier in this pass.
#[derive(Debug, Clone)]
pub(crate) struct Holder<'a> {
    pub id: &'a str,
    pub end: Option<f64>,
    pub allocs: Cow<'a, [Alloc]>,
}

/// A queued gang in the form the pass works with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared<'a> {
    pub gang: &'a Gang,
    /// How many replicas must go together (all, or `minAvailable`).
    pub required: usize,
    /// Index into the cache's shapes: the required replicas' needs, largest first.
    pub shape: usize,
    pub gpus: u64,
    pub score: f64,
    /// The interned selector of its largest replica, which an Unschedulable sentence names.
    pub named: u32,
}

impl Prepared<'_> {
    /// The policy order: highest score first, then submit time, then id.
    pub fn order(&self, other: &Self) -> std::cmp::Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.gang.submitted_at.total_cmp(&other.gang.submitted_at))
            .then_with(|| self.gang.id.cmp(&other.gang.id))
    }
}

/// What passes may share while the nodes stay the same: interned selectors and shapes, how
/// each shape fits the empty cluster, and (for the incremental scheduler) which shapes are
/// known not to fit the current free capacity.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cache {
    pub selectors: SelectorTable,
    selector_ids: HashMap<NodeRule, u32>,
    shapes: FastMap<Vec<Need>, usize>,
    pub shape_needs: Vec<Vec<Need>>,
    ideal: Option<FreeState>,
    /// Per shape: how it fits the empty cluster.
    ideal_nodes: Vec<Ideal>,
    /// Every schedulable node empty (only healthy GPUs): what is left once every holder ends.
    empty: Option<FreeState>,
    /// Per shape and fit (first, best): whether it fits `empty`.
    fits_empty: Vec<[Option<bool>; 2]>,
    /// Per shape, when certificates are kept: one of its needs that no node could hold alone
    /// when last checked. Valid until some node's free capacity grows (the owner clears it).
    pub certs: Vec<Option<Need>>,
    pub keep_certs: bool,
}

impl Cache {
    pub fn new() -> Self {
        let mut selectors = SelectorTable::default();
        selectors.matches.push(Vec::new());
        Cache {
            selectors,
            ..Cache::default()
        }
    }

    /// The interned id of a node rule: 0 for a rule that admits every node of this cluster.
    pub fn selector_id(&mut self, nodes: &[NodeCapacity], rule: &NodeRule) -> u32 {
        if let Some(&id) = self.selector_ids.get(rule) {
            return id;
        }
        let table: Vec<bool> = nodes.iter().map(|n| rule.admits(n)).collect();
        let id = if table.iter().all(|&m| m) {
            0
        } else {
            self.selectors.matches.push(table);
            (self.selectors.matches.len() - 1) as u32
        };
        self.selector_ids.insert(rule.clone(), id);
        id
    }

    fn need(&mut self, nodes: &[NodeCapacity], replica: &super::ReplicaRequest) -> Need {
        Need {
            gpus: replica.resources.gpus,
            cpu: replica.resources.cpu_milli,
            mem: replica.resources.memory_mib,
            selector: self.selector_id(nodes, &replica.rule),
        }
    }

    /// The gang's required replica count, its interned shape and the selector its sentences
    /// name. Gangs with the same requests share one shape, so a pass works out each shape's fit
    /// once per state.
    pub fn shape_of(&mut self, nodes: &[NodeCapacity], gang: &Gang) -> ShapeOf {
        let n = gang.replicas.len();
        let required = gang
            .min_available
            .map_or(n, |m| (m as usize).clamp(1, n.max(1)));
        let mut key: Vec<Need> = Vec::with_capacity(required + 1);
        for replica in gang.replicas.iter().take(required) {
            let need = self.need(nodes, replica);
            key.push(need);
        }
        // The largest replica (the last of the most GPUs): its selector is the one just
        // interned when it is a required replica, as it almost always is.
        let named = match gang
            .replicas
            .iter()
            .enumerate()
            .max_by_key(|(_, r)| r.resources.gpus)
        {
            Some((i, _)) if i < key.len() => key[i].selector,
            Some((_, r)) => self.selector_id(nodes, &r.rule),
            None => 0,
        };
        key.sort_unstable_by(|a, b| b.cmp(a));
        // The count of optional replicas is part of the shape.
        key.push(Need {
            gpus: u32::MAX,
            cpu: (n - required.min(n)) as u64,
            mem: 0,
            selector: u32::MAX,
        });
        let shape = if let Some(&shape) = self.shapes.get(key.as_slice()) {
            shape
        } else {
            let shape = self.shape_needs.len();
            self.shape_needs.push(key[..key.len() - 1].to_vec());
            self.shapes.insert(key, shape);
            self.ideal_nodes.push(Ideal::NotTried);
            self.fits_empty.push([None; 2]);
            self.certs.push(None);
            shape
        };
        ShapeOf {
            required,
            shape,
            named,
        }
    }
}

/// What [`Cache::shape_of`] works out for a gang.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShapeOf {
    pub required: usize,
    pub shape: usize,
    pub named: u32,
}

/// How a shape fits the empty cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ideal {
    NotTried,
    /// On this many nodes at the fewest.
    Nodes(usize),
    Never,
}

/// The gang's place in the policy order at `now`.
pub(crate) fn score(policy: &Policy, queue_priority: Option<i32>, now: f64, gang: &Gang) -> f64 {
    match policy.order {
        Order::Submit => 0.0,
        Order::Priority { aging_s } => {
            let queue = queue_priority.unwrap_or(0);
            let waited = (now - gang.submitted_at).max(0.0);
            let aging = if aging_s > 0.0 { waited / aging_s } else { 0.0 };
            f64::from(queue) + f64::from(gang.priority) + aging
        }
    }
}

/// A running gang's allocations on known nodes, and the GPUs it holds in all.
pub(crate) fn allocs_of(
    nodes: &[NodeCapacity],
    node_of: impl Fn(&str) -> Option<u32>,
    gang: &super::RunningGang,
) -> (Vec<Alloc>, u64) {
    let mut allocs = Vec::with_capacity(gang.assignments.len());
    let mut gpus = 0u64;
    for a in &gang.assignments {
        gpus += a.gpu_indices.len() as u64;
        let Some(node) = node_of(a.node.as_str()) else {
            continue;
        };
        allocs.push(Alloc {
            node,
            gpus: mask_of_indices(&nodes[node as usize], &a.gpu_indices),
            cpu: a.resources.cpu_milli,
            mem: a.resources.memory_mib,
        });
    }
    (allocs, gpus)
}

#[derive(Default, Clone)]
struct ShapeMemo {
    failed_any: bool,
    failed_outside: bool,
    /// The pass version at which a trial placement last succeeded, per mode.
    fits_any_at: Option<u64>,
    fits_outside_at: Option<u64>,
    /// A reservation could not be planned for the shape, as the head or after another: during
    /// a pass holders and holds only grow, so it cannot be planned later in the pass either.
    unreservable: [bool; 2],
}

/// A gang's reservation, as later gangs are judged against it.
struct Head<'a> {
    id: &'a str,
    start_at: Option<f64>,
    after: Vec<String>,
}

pub(crate) struct Pass<'a> {
    now: f64,
    nodes: &'a [NodeCapacity],
    policy: &'a Policy,
    queues: FastMap<&'a str, &'a QueueConfig>,
    limited: bool,
    pub cache: Cache,
    pub state: FreeState,
    pub holders: Vec<Holder<'a>>,
    /// How many of the first holders are in ascending id order (and ids are unique): among
    /// them, comparing positions is comparing ids.
    pub holders_by_id: usize,
    memo: Vec<ShapeMemo>,
    version: u64,
    usage: FastMap<&'a str, (u32, u64)>,
    scratch: Vec<Taken>,
    /// Unschedulable sentences by shape, version and the selector they name.
    messages: FastMap<(usize, u64, u32), Arc<str>>,
    /// QueueLimit sentences by queue, its running jobs and GPUs, and the GPUs the gang asks.
    limit_messages: FastMap<(&'a str, u32, u64, u64), Arc<str>>,
    /// The order reservations release holders in, while no placement comes between them (it
    /// changes only when a placement adds a holder and takes GPUs).
    release_order: Option<Releases<'a>>,
    /// The Reserved sentence of this pass, with how many gangs held reservations when it was
    /// written.
    reserved: Option<(usize, Arc<str>)>,
    /// The Blocked sentence of this pass's strict-FIFO head.
    blocked: Option<Arc<str>>,
    empty: Arc<str>,
    /// What the previous pass said for each gang of the order, by position (kept by the
    /// incremental scheduler): when set, a gang whose reason and message are unchanged is left
    /// out of `decision.waiting`, and the entry is updated for the next pass.
    pub said: Option<Vec<Said>>,
    /// The position in the order of the gang being decided.
    at: usize,
    /// The positions in the order of the gangs placed, ascending (one per placement).
    pub placed_at: Vec<usize>,
    pub decision: Decision,
}

/// The reason and message last given for a waiting gang.
pub(crate) type Said = Option<(&'static str, Arc<str>)>;

/// Runs one scheduling pass. Pure and deterministic: the same snapshot gives the same decision,
/// whatever the order of `snapshot.queued` or `snapshot.running`. This is the full pass, which
/// works everything out from the snapshot; [`super::Scheduler`] keeps state between passes and
/// must decide exactly as this does.
pub fn schedule(snapshot: &Snapshot<'_>, policy: &Policy) -> Decision {
    let mut pass = Pass::new(snapshot, policy);
    let order = pass.prepare(snapshot.queued);
    pass.run(&order);
    pass.decision
}

/// Whether any queue has a limit, so usage must be counted.
pub(crate) fn limited(queues: &[QueueConfig]) -> bool {
    queues
        .iter()
        .any(|q| q.max_running_jobs.is_some() || q.max_gpus.is_some())
}

fn gang_gpus(gang: &Gang) -> u64 {
    gang.replicas
        .iter()
        .map(|r| u64::from(r.resources.gpus))
        .sum()
}

fn mask_of_indices(node: &NodeCapacity, indices: &[u32]) -> GpuMask {
    let mut mask: GpuMask = 0;
    for &index in indices {
        if let Some(pos) = node.gpus.iter().position(|g| g.index == index)
            && pos < super::MAX_GPUS_PER_NODE
        {
            mask |= 1 << pos;
        }
    }
    mask
}

impl<'a> Pass<'a> {
    fn new(snap: &Snapshot<'a>, policy: &'a Policy) -> Self {
        let by_name: FastMap<&str, u32> = snap
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i as u32))
            .collect();
        let mut state = FreeState::empty(snap.nodes, false);
        let mut holders = Vec::with_capacity(snap.running.len());
        let mut usage: FastMap<&str, (u32, u64)> = FastMap::default();
        let limited = limited(snap.queues);
        // Occupying is order-independent; the reservation sorts holders itself.
        for gang in snap.running {
            let (allocs, gpus) = allocs_of(snap.nodes, |n| by_name.get(n).copied(), gang);
            for a in &allocs {
                state.occupy(a.node, a.gpus, a.cpu, a.mem);
            }
            if limited {
                let used = usage.entry(gang.queue.as_str()).or_default();
                used.0 += 1;
                used.1 += gpus;
            }
            holders.push(Holder {
                id: &gang.id,
                end: gang.expected_end,
                allocs: Cow::Owned(allocs),
            });
        }
        state.rebuild_index();
        Self::from_parts(
            snap.now,
            snap.nodes,
            policy,
            snap.queues,
            Cache::new(),
            state,
            holders,
            usage,
        )
    }

    /// A pass over state kept elsewhere: `state` has every holder's resources taken and no
    /// reservation overlay; `usage` counts running jobs and GPUs per queue when any is limited.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        now: f64,
        nodes: &'a [NodeCapacity],
        policy: &'a Policy,
        queues: &'a [QueueConfig],
        cache: Cache,
        state: FreeState,
        holders: Vec<Holder<'a>>,
        usage: FastMap<&'a str, (u32, u64)>,
    ) -> Self {
        let memo = vec![ShapeMemo::default(); cache.shape_needs.len()];
        Pass {
            now,
            nodes,
            policy,
            queues: queues.iter().map(|q| (q.name.as_str(), q)).collect(),
            limited: limited(queues),
            cache,
            state,
            holders,
            holders_by_id: 0,
            memo,
            version: 0,
            usage,
            scratch: Vec::new(),
            messages: FastMap::default(),
            limit_messages: FastMap::default(),
            release_order: None,
            reserved: None,
            blocked: None,
            empty: Arc::from(""),
            said: None,
            at: 0,
            placed_at: Vec::new(),
            decision: Decision::default(),
        }
    }

    fn need(&mut self, replica: &'a super::ReplicaRequest) -> Need {
        self.cache.need(self.nodes, replica)
    }

    /// The gang's required replicas, largest first, each with its replica index; and the
    /// replicas above `minAvailable`, in declared order.
    fn split(
        &mut self,
        gang: &'a Gang,
        required: usize,
    ) -> (Vec<Need>, Vec<usize>, Vec<(Need, usize)>) {
        let mut pairs: Vec<(Need, usize)> = gang
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| (self.need(r), i))
            .collect();
        let optional = pairs.split_off(required.min(pairs.len()));
        pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let needs = pairs.iter().map(|p| p.0).collect();
        let replica_of = pairs.iter().map(|p| p.1).collect();
        (needs, replica_of, optional)
    }

    /// Turns queued gangs into shapes and sorts them in policy order.
    fn prepare(&mut self, queued: &'a [Gang]) -> Vec<Prepared<'a>> {
        let mut out = Vec::with_capacity(queued.len());
        for gang in queued {
            let of = self.cache.shape_of(self.nodes, gang);
            let queue = self.queues.get(gang.queue.as_str()).map(|q| q.priority);
            out.push(Prepared {
                gang,
                required: of.required,
                shape: of.shape,
                gpus: gang_gpus(gang),
                score: score(self.policy, queue, self.now, gang),
                named: of.named,
            });
        }
        self.memo
            .resize(self.cache.shape_needs.len(), ShapeMemo::default());
        out.sort_by(Prepared::order);
        out
    }

    pub fn run(&mut self, order: &[Prepared<'a>]) {
        let mut fifo_head: Option<&'a str> = None;
        // The gangs holding reservations, the head of the order first, and the earliest start
        // among them (`None` when any has none): only a gang that ends before it may use what
        // they hold.
        let mut heads: Vec<Head<'a>> = Vec::new();
        let mut start_by: Option<f64> = None;
        for (at, p) in order.iter().enumerate() {
            self.at = at;
            if p.gang.replicas.is_empty() {
                self.wait_settled(p, reason::NEVER_FITS, || "has no replicas".to_owned());
                continue;
            }
            if let Some(why) = self.queue_limit(p) {
                self.wait(p, reason::QUEUE_LIMIT, || why);
                continue;
            }
            if let Some(blocker) = fifo_head {
                if self.fits(p, Mode::Any) {
                    let msg = self.blocked_message(blocker);
                    self.wait(p, reason::BLOCKED, || msg);
                } else if self.never_fits(p) {
                    continue;
                } else {
                    let msg = self.unschedulable(p);
                    self.wait(p, reason::UNSCHEDULABLE, || msg);
                }
                continue;
            }
            let mode = if !heads.is_empty() && !Self::ends_before(p.gang, self.now, start_by) {
                Mode::OutsideReservation
            } else {
                Mode::Any
            };
            if self.place(p, mode) || self.never_fits(p) {
                continue;
            }
            let (why, mut msg) = if heads.is_empty() {
                if self.policy.backfill == Backfill::None {
                    fifo_head = Some(&p.gang.id);
                }
                (reason::UNSCHEDULABLE, self.unschedulable(p))
            } else if mode == Mode::OutsideReservation && self.fits(p, Mode::Any) {
                (reason::RESERVED, self.reserved_message(&heads, start_by))
            } else {
                (reason::UNSCHEDULABLE, self.unschedulable(p))
            };
            if self.policy.backfill == Backfill::Reservation
                && heads.len() < self.policy.reservations
                && (heads.is_empty()
                    || !self.policy.later_reservations_multi_node
                    || self.ideal_nodes(p).is_some_and(|n| n > 1))
                && let Some(r) = self.reserve(p, !heads.is_empty())
            {
                if self.policy.explain {
                    msg = format!("{msg}; {}", Self::reservation_clause(&r, self.now)).into();
                }
                start_by = match (heads.is_empty(), start_by, r.start_at) {
                    (true, _, t) => t,
                    (false, Some(a), Some(b)) => Some(a.min(b)),
                    _ => None,
                };
                heads.push(Head {
                    id: &p.gang.id,
                    start_at: r.start_at,
                    after: r.after.clone(),
                });
                self.decision.reservations.push(r);
            }
            self.wait(p, why, || msg);
        }
    }

    /// Answers a gang that cannot fit even the empty cluster (it must not block or reserve).
    fn never_fits(&mut self, p: &Prepared<'a>) -> bool {
        if self.ideal_nodes(p).is_some() {
            return false;
        }
        let (gang, nodes) = (p.gang, self.nodes);
        self.wait_settled(p, reason::NEVER_FITS, || never_fits_message(gang, nodes));
        true
    }

    fn ends_before(gang: &Gang, now: f64, start_at: Option<f64>) -> bool {
        match (gang.declared_runtime_s, start_at) {
            (Some(d), Some(t)) => now + d <= t,
            _ => false,
        }
    }

    fn wait(&mut self, p: &Prepared<'a>, reason: &'static str, message: impl FnOnce() -> Arc<str>) {
        *self.decision.waiting_counts.entry(reason).or_default() += 1;
        if !self.policy.list_waiting {
            return;
        }
        let message = if self.policy.explain {
            message()
        } else {
            self.empty.clone()
        };
        if let Some(said) = &mut self.said {
            let slot = &mut said[self.at];
            if let Some((r, m)) = slot
                && *r == reason
                && (Arc::ptr_eq(m, &message) || **m == *message)
            {
                return;
            }
            *slot = Some((reason, message.clone()));
        }
        self.decision.waiting.push(Waiting {
            gang: p.gang.id.clone(),
            reason,
            message,
        });
    }

    /// [`Self::wait`] for a reason whose message depends only on the gang and the nodes: when
    /// the previous pass gave the same reason, the message is not worked out again (the
    /// incremental scheduler forgets such answers when the nodes change).
    fn wait_settled(
        &mut self,
        p: &Prepared<'a>,
        reason: &'static str,
        message: impl FnOnce() -> String,
    ) {
        if self.policy.list_waiting
            && let Some(said) = &self.said
            && let Some((r, _)) = &said[self.at]
            && *r == reason
        {
            *self.decision.waiting_counts.entry(reason).or_default() += 1;
            return;
        }
        self.wait(p, reason, || message().into());
    }

    fn unschedulable(&mut self, p: &Prepared<'a>) -> Arc<str> {
        if !self.policy.explain {
            return self.empty.clone();
        }
        // The sentence depends on the shape, the free capacity (the version) and the selector
        // it names; gangs alike in those share it.
        let key = (p.shape, self.version, p.named);
        if let Some(msg) = self.messages.get(&key) {
            return msg.clone();
        }
        let min_nodes = self.ideal_nodes(p).unwrap_or(1);
        let msg: Arc<str> = unschedulable_message(
            p.gang,
            &self.cache.shape_needs[p.shape],
            min_nodes,
            &self.state,
            &self.cache.selectors,
        )
        .into();
        self.messages.insert(key, msg.clone());
        msg
    }

    fn reserved_message(&mut self, heads: &[Head<'_>], start_by: Option<f64>) -> Arc<str> {
        if !self.policy.explain {
            return self.empty.clone();
        }
        // The sentence changes only when another gang takes a reservation.
        if let Some((n, msg)) = &self.reserved
            && *n == heads.len()
        {
            return msg.clone();
        }
        let msg: Arc<str> = Self::reserved_sentence(heads, start_by, self.now).into();
        self.reserved = Some((heads.len(), msg.clone()));
        msg
    }

    fn blocked_message(&mut self, blocker: &str) -> Arc<str> {
        if !self.policy.explain {
            return self.empty.clone();
        }
        // One strict-FIFO head per pass, so one sentence.
        self.blocked
            .get_or_insert_with(|| {
                format!(
                    "fits now, but strict FIFO keeps it behind {blocker}, which was submitted earlier and does not fit"
                )
                .into()
            })
            .clone()
    }

    fn reserved_sentence(heads: &[Head<'_>], start_by: Option<f64>, now: f64) -> String {
        if let [head] = heads {
            return match head.start_at {
                Some(t) => format!(
                    "fits now, but would delay {}, which holds a reservation to start by t={t:.0}s (in {:.0} s); a declared run time (activeDeadlineSeconds) under {:.0} s would let it start now",
                    head.id,
                    t - now,
                    t - now
                ),
                None => format!(
                    "fits now, but would delay {}, which holds a reservation for the resources it needs until {} {}",
                    head.id,
                    list(&head.after),
                    end_verb(head.after.len())
                ),
            };
        }
        let ids: Vec<&str> = heads.iter().map(|h| h.id).collect();
        match start_by {
            Some(t) => format!(
                "fits now, but would delay {}, which hold reservations, the first to start by t={t:.0}s (in {:.0} s); a declared run time (activeDeadlineSeconds) under {:.0} s would let it start now",
                list_str(&ids),
                t - now,
                t - now
            ),
            None => format!(
                "fits now, but would delay {}, which hold reservations for the resources they need until the gangs they wait for end",
                list_str(&ids)
            ),
        }
    }

    fn reservation_clause(r: &Reservation, now: f64) -> String {
        let mut nodes: Vec<&str> = r.assignments.iter().map(|a| a.node.as_str()).collect();
        nodes.dedup();
        match r.start_at {
            Some(t) => format!(
                "holds a reservation on {} to start by t={t:.0}s (in {:.0} s), when {} {}",
                list_str(&nodes),
                t - now,
                list(&r.after),
                end_verb(r.after.len())
            ),
            None => format!(
                "holds a reservation on {}, to start when {} {} (no declared run time, so no start time is known)",
                list_str(&nodes),
                list(&r.after),
                end_verb(r.after.len())
            ),
        }
    }

    /// The fewest nodes the gang takes on the empty cluster, or `None` if it can never fit.
    fn ideal_nodes(&mut self, p: &Prepared<'a>) -> Option<usize> {
        match self.cache.ideal_nodes[p.shape] {
            Ideal::Nodes(n) => return Some(n),
            Ideal::Never => return None,
            Ideal::NotTried => {}
        }
        let cache = &mut self.cache;
        let ideal = cache.ideal.get_or_insert_with(|| {
            let mut s = FreeState::empty(self.nodes, true);
            s.rebuild_index();
            s
        });
        let mut taken = std::mem::take(&mut self.scratch);
        let result = if ideal.place(
            &cache.shape_needs[p.shape],
            Mode::Any,
            super::Fit::BestFit,
            &cache.selectors,
            &mut taken,
        ) {
            let mut nodes: Vec<u32> = taken.iter().map(|t| t.node).collect();
            nodes.sort_unstable();
            nodes.dedup();
            ideal.undo(&mut taken);
            Some(nodes.len())
        } else {
            None
        };
        self.scratch = taken;
        self.cache.ideal_nodes[p.shape] = result.map_or(Ideal::Never, Ideal::Nodes);
        result
    }

    fn queue_limit(&mut self, p: &Prepared<'a>) -> Option<Arc<str>> {
        if !self.limited {
            return None;
        }
        let q = self.queues.get(p.gang.queue.as_str())?;
        let (jobs, gpus) = self
            .usage
            .get(p.gang.queue.as_str())
            .copied()
            .unwrap_or_default();
        let over_jobs = q.max_running_jobs.filter(|&max| jobs >= max);
        let over_gpus = q.max_gpus.filter(|&max| gpus + p.gpus > u64::from(max));
        if over_jobs.is_none() && over_gpus.is_none() {
            return None;
        }
        // Gangs of one queue asking alike get the same sentence until the queue's use changes.
        let key = (q.name.as_str(), jobs, gpus, p.gpus);
        if let Some(msg) = self.limit_messages.get(&key) {
            return Some(msg.clone());
        }
        let msg: Arc<str> = match (over_jobs, over_gpus) {
            (Some(max), _) => format!(
                "queue {} runs {jobs} jobs and its limit (max_running_jobs) is {max}",
                q.name
            ),
            (None, Some(max)) => format!(
                "queue {} uses {gpus} GPUs, this job needs {} more and the queue's limit (max_gpus) is {max}",
                q.name, p.gpus
            ),
            (None, None) => return None,
        }
        .into();
        self.limit_messages.insert(key, msg.clone());
        Some(msg)
    }

    /// Whether the gang would fit now, without placing it.
    fn fits(&mut self, p: &Prepared<'a>, mode: Mode) -> bool {
        let memo = &self.memo[p.shape];
        let (failed, fits_at) = match mode {
            Mode::Any => (memo.failed_any, memo.fits_any_at),
            Mode::OutsideReservation => (memo.failed_outside, memo.fits_outside_at),
        };
        if failed {
            return false;
        }
        if fits_at == Some(self.version) {
            return true;
        }
        if self.cache.certs[p.shape].is_some() {
            self.remember(p.shape, mode, false);
            return false;
        }
        let mut taken = std::mem::take(&mut self.scratch);
        let ok = self.state.place(
            &self.cache.shape_needs[p.shape],
            mode,
            self.policy.fit,
            &self.cache.selectors,
            &mut taken,
        );
        self.state.undo(&mut taken);
        self.scratch = taken;
        self.remember(p.shape, mode, ok);
        ok
    }

    fn remember(&mut self, shape: usize, mode: Mode, ok: bool) {
        if !ok && self.cache.keep_certs && self.cache.certs[shape].is_none() {
            // Free capacity only shrinks during a pass and until the owner reports a release,
            // so a need that no node could hold alone keeps the whole shape out until then.
            self.cache.certs[shape] = self.cache.shape_needs[shape]
                .iter()
                .find(|need| self.state.fits_nowhere(need, &self.cache.selectors))
                .copied();
        }
        let memo = &mut self.memo[shape];
        match (mode, ok) {
            (Mode::Any, true) => memo.fits_any_at = Some(self.version),
            (Mode::Any, false) => memo.failed_any = true,
            (Mode::OutsideReservation, true) => memo.fits_outside_at = Some(self.version),
            (Mode::OutsideReservation, false) => memo.failed_outside = true,
        }
    }

    /// Places the gang and records the placement, or leaves everything as it was.
    fn place(&mut self, p: &Prepared<'a>, mode: Mode) -> bool {
        let memo = &self.memo[p.shape];
        let failed = match mode {
            Mode::Any => memo.failed_any,
            Mode::OutsideReservation => memo.failed_outside,
        };
        if failed {
            return false;
        }
        if self.cache.certs[p.shape].is_some() {
            self.remember(p.shape, mode, false);
            return false;
        }
        let mut taken = std::mem::take(&mut self.scratch);
        let ok = self.state.place(
            &self.cache.shape_needs[p.shape],
            mode,
            self.policy.fit,
            &self.cache.selectors,
            &mut taken,
        );
        if !ok {
            self.scratch = taken;
            self.remember(p.shape, mode, false);
            return false;
        }
        let (_, replica_of, optional) = self.split(p.gang, p.required);
        let mut placed: Vec<(usize, Taken)> = replica_of
            .iter()
            .copied()
            .zip(taken.iter().copied())
            .collect();
        // Replicas above minAvailable go one by one, where they fit.
        for &(need, replica) in &optional {
            let mut one = Vec::with_capacity(1);
            if self.state.place(
                &[need],
                mode,
                self.policy.fit,
                &self.cache.selectors,
                &mut one,
            ) {
                placed.push((replica, one[0]));
            }
        }
        placed.sort_by_key(|(replica, _)| *replica);
        self.version += 1;
        let mut assignments = Vec::with_capacity(placed.len());
        let mut allocs = Vec::with_capacity(placed.len());
        for (replica, t) in &placed {
            let request = &p.gang.replicas[*replica];
            assignments.push(self.assignment(&request.name, t, request.resources));
            allocs.push(Alloc {
                node: t.node,
                gpus: t.gpus,
                cpu: t.cpu,
                mem: t.mem,
            });
        }
        self.holders.push(Holder {
            id: &p.gang.id,
            end: p.gang.declared_runtime_s.map(|d| self.now + d),
            allocs: Cow::Owned(allocs),
        });
        let used = self.usage.entry(p.gang.queue.as_str()).or_default();
        used.0 += 1;
        used.1 += p.gpus;
        self.decision.placements.push(Placement {
            gang: p.gang.id.clone(),
            assignments,
        });
        self.placed_at.push(self.at);
        taken.clear();
        self.scratch = taken;
        true
    }

    fn assignment(&self, replica: &str, t: &Taken, resources: Resources) -> Assignment {
        let node = &self.nodes[t.node as usize];
        let gpu_indices = node
            .gpus
            .iter()
            .take(super::MAX_GPUS_PER_NODE)
            .enumerate()
            .filter(|(pos, _)| t.gpus & (1 << pos) != 0)
            .map(|(_, g)| g.index)
            .collect();
        Assignment {
            replica: replica.to_owned(),
            node: node.name.clone(),
            gpu_indices,
            resources,
        }
    }

    /// Whether the shape fits once every holder has ended: on every schedulable node's healthy
    /// GPUs and whole CPU and memory. Releasing is clamped to capacity, so that state is the
    /// empty cluster whatever runs now, and the answer holds while the nodes do.
    fn fits_when_all_end(&mut self, shape: usize) -> bool {
        let fit = match self.policy.fit {
            super::Fit::FirstFit => 0,
            super::Fit::BestFit => 1,
        };
        if let Some(ok) = self.cache.fits_empty[shape][fit] {
            return ok;
        }
        let cache = &mut self.cache;
        let empty = cache.empty.get_or_insert_with(|| {
            let mut s = FreeState::empty(self.nodes, false);
            s.rebuild_index();
            s
        });
        let mut taken = std::mem::take(&mut self.scratch);
        let ok = empty.place(
            &cache.shape_needs[shape],
            Mode::Any,
            self.policy.fit,
            &cache.selectors,
            &mut taken,
        );
        empty.undo(&mut taken);
        self.scratch = taken;
        cache.fits_empty[shape][fit] = Some(ok);
        ok
    }

    /// Plans a blocked gang's reservation: the fewest holders (in the policy's release order)
    /// that must end before it fits, where it then goes, and installs the overlay that keeps
    /// those resources from gangs that would still be running then. A `later` reservation (not
    /// the head's) is planned around the ones before it: it takes none of their GPUs, and the
    /// CPU and memory they leave is shared. `None` if it would not fit even with every holder
    /// gone (drained nodes, unhealthy GPUs, earlier reservations).
    fn reserve(&mut self, p: &Prepared<'a>, later: bool) -> Option<Reservation> {
        // Give up at once if it would not fit even with every holder gone, or if a gang of the
        // same shape found that already (each try releases every holder).
        if self.memo[p.shape].unreservable[usize::from(later)] || !self.fits_when_all_end(p.shape) {
            return None;
        }
        let mode = if later {
            Mode::OutsideReservation
        } else {
            Mode::Any
        };
        // Gangs with a declared end release in end order. For the others there is no end to go
        // by, so bet on the nodes closest to free: release first the gangs on nodes with the
        // fewest busy GPUs, so the gang waits on as few gangs as possible.
        // Under `LeastBusy` a GPU that is not healthy counts as busy: it never frees, so a node
        // with one is further from whole than its running gangs say.
        let by_end = self.policy.release == ReleaseOrder::SoonestEnd;
        let busy = |h: &Holder<'_>| -> u32 {
            h.allocs
                .iter()
                .map(|a| {
                    let i = a.node as usize;
                    let free = self.state.nodes[i].gpus.count_ones();
                    if by_end {
                        self.state.healthy[i].count_ones().saturating_sub(free)
                    } else {
                        (self.nodes[i].gpus.len().min(super::MAX_GPUS_PER_NODE) as u32)
                            .saturating_sub(free)
                    }
                })
                .max()
                .unwrap_or(0)
        };
        // Only the first few holders in that order are ever released, so they come off a heap
        // (linear to build) rather than out of a sort of them all; the ones popped are kept, and
        // the next reservation of the pass reads them before it pops more, until a placement
        // adds a holder.
        let mut order = match self.release_order.take() {
            Some(order) if order.holders == self.holders.len() => order,
            _ => {
                let by_id = self.holders_by_id;
                let heap = self
                    .holders
                    .iter()
                    .enumerate()
                    .map(|(at, h)| {
                        let end = h.end.filter(|_| by_end);
                        Reverse(Release {
                            end,
                            busy: if end.is_none() { busy(h) } else { 0 },
                            id: h.id,
                            at,
                            by_id: at < by_id,
                        })
                    })
                    .collect();
                Releases {
                    holders: self.holders.len(),
                    heap,
                    popped: Vec::new(),
                }
            }
        };
        let mut released = Vec::new();
        let mut taken = Vec::new();
        // Release holders one by one, in that order, until it fits: the fewest it waits for.
        // They are released on the pass's own state and given back after; the nodes they free
        // are saved first, so giving back restores them exactly.
        let needs = &self.cache.shape_needs[p.shape];
        let total: u64 = needs.iter().map(|n| u64::from(n.gpus)).sum();
        let mut saved: BTreeMap<u32, NodeFree> = BTreeMap::new();
        let mut fits = false;
        while let Some(next) = order.get(released.len()) {
            released.push(next.at);
            for a in self.holders[next.at].allocs.iter() {
                saved
                    .entry(a.node)
                    .or_insert(self.state.nodes[a.node as usize]);
                self.state.release_indexed(a.node, a.gpus, a.cpu, a.mem);
            }
            // It did not fit before this release, so it fits after only if a node this release
            // freed room on can now hold one of its replicas: otherwise every node it could use
            // is as it was, and trying again would fail again.
            let helps = self.holders[next.at].allocs.iter().any(|a| {
                needs
                    .iter()
                    .any(|n| self.state.fits_in(a.node, n, mode, &self.cache.selectors))
            });
            #[cfg(test)]
            if !helps {
                let mut trial = Vec::new();
                let placed = self.state.place(
                    needs,
                    mode,
                    self.policy.fit,
                    &self.cache.selectors,
                    &mut trial,
                );
                self.state.undo(&mut trial);
                assert!(
                    !placed,
                    "a release that frees no usable room made the gang fit"
                );
            }
            if helps
                && self.state.free_gpus >= total
                && self.state.place(
                    needs,
                    mode,
                    self.policy.fit,
                    &self.cache.selectors,
                    &mut taken,
                )
            {
                fits = true;
                break;
            }
        }
        // What the reservation's nodes would have left once it started (and the reservations
        // before it, where they share a node): the slack it lends.
        let slack: BTreeMap<u32, (u64, u64)> = taken
            .iter()
            .map(|t| {
                let (_, cpu, mem) = self.state.effective(t.node, Mode::OutsideReservation);
                (t.node, (cpu, mem))
            })
            .collect();
        for t in taken.iter().rev() {
            self.state.untake(t);
        }
        for (node, free) in saved {
            self.state.restore(node, free);
        }
        self.release_order = Some(order);
        if !fits {
            self.memo[p.shape].unreservable[usize::from(later)] = true;
            return None;
        }
        // It starts when the last of them ends.
        let start_at = released
            .iter()
            .map(|&h| self.holders[h].end)
            .try_fold(None::<f64>, |latest, end| {
                let end = end?;
                Some(Some(latest.map_or(end, |l: f64| l.max(end))))
            })
            .flatten();
        let after: Vec<String> = released
            .iter()
            .map(|&h| self.holders[h].id.to_owned())
            .collect();
        let mut holds: BTreeMap<u32, Hold> = BTreeMap::new();
        for t in &taken {
            let h = holds.entry(t.node).or_insert_with(|| Hold {
                gpus: self.state.nodes[t.node as usize].hold.map_or(0, |h| h.gpus),
                ..Hold::default()
            });
            h.gpus |= t.gpus;
        }
        for (node, h) in &mut holds {
            (h.slack_cpu, h.slack_mem) = slack[node];
        }
        let holds: Vec<(u32, Hold)> = holds.into_iter().collect();
        self.state.hold(&holds);
        self.version += 1;
        let (_, replica_of, _) = self.split(p.gang, p.required);
        let mut assignments: Vec<(usize, Assignment)> = replica_of
            .iter()
            .zip(&taken)
            .map(|(&replica, t)| {
                let request = &p.gang.replicas[replica];
                (
                    replica,
                    self.assignment(&request.name, t, request.resources),
                )
            })
            .collect();
        assignments.sort_by_key(|(replica, _)| *replica);
        Some(Reservation {
            gang: p.gang.id.clone(),
            start_at,
            after,
            assignments: assignments.into_iter().map(|(_, a)| a).collect(),
        })
    }
}

/// The order reservations release holders in: the first ones, worked out so far, then the heap
/// of the rest.
struct Releases<'a> {
    /// How many holders there were when it was built.
    holders: usize,
    heap: BinaryHeap<Reverse<Release<'a>>>,
    popped: Vec<Release<'a>>,
}

impl<'a> Releases<'a> {
    /// The `k`th holder to release, if there are that many.
    fn get(&mut self, k: usize) -> Option<Release<'a>> {
        while self.popped.len() <= k {
            let Reverse(next) = self.heap.pop()?;
            self.popped.push(next);
        }
        Some(self.popped[k])
    }
}

/// A holder's place in the order a reservation releases holders in: ends first, soonest first;
/// then the rest (all of them under [`ReleaseOrder::LeastBusy`]), on the least busy nodes
/// first; ties by id.
#[derive(Clone, Copy)]
struct Release<'a> {
    end: Option<f64>,
    busy: u32,
    id: &'a str,
    at: usize,
    /// Among the first holders, which are in id order: comparing positions is comparing ids.
    by_id: bool,
}

impl Ord for Release<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.end, other.end) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => self.busy.cmp(&other.busy),
        }
        .then_with(|| {
            if self.by_id && other.by_id {
                self.at.cmp(&other.at)
            } else {
                self.id.cmp(other.id)
            }
        })
    }
}

impl PartialOrd for Release<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Release<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Release<'_> {}

fn end_verb(n: usize) -> &'static str {
    if n == 1 { "ends" } else { "end" }
}

fn list(ids: &[String]) -> String {
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    list_str(&refs)
}

/// "a", "a and b", "a, b and 3 more".
fn list_str(ids: &[&str]) -> String {
    match ids {
        [] => "nothing".to_owned(),
        [one] => (*one).to_owned(),
        [a, b] => format!("{a} and {b}"),
        [a, b, rest @ ..] => format!("{a}, {b} and {} more", rest.len()),
    }
}
