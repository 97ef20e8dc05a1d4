//! The incremental scheduler: the same pass as [`super::schedule`], over state kept between
//! passes instead of rebuilt from a snapshot each time.
//!
//! What it keeps: the free capacity with every running gang's resources taken (changed only by
//! [`Scheduler::start`], [`Scheduler::finish`] and the placements of a pass), each queued gang's
//! interned shape and its place in the policy order, and for each shape whether one of its
//! replicas fits no node at all. That last answer is what makes a deep queue cheap: free
//! capacity only shrinks until a gang finishes, so a shape with such a replica is skipped
//! without a placement attempt until a finish frees a node that could hold the replica (or the
//! nodes change). Everything else a pass decides is decided by the same code as the full pass,
//! which stays the oracle: the property tests and replays check that both decide exactly alike.
//!
//! A pass also remembers what it said for each waiting gang, and hands back only the waiting
//! entries that changed: a deep queue whose answers stay the same costs a visit per gang, not
//! a sentence per gang. The caller keeps the last entry of each gang ([`Scheduler::waiting`]
//! gives the whole list, for checks).
//!
//! Like the full pass it is pure: no I/O, no clock; time is an argument of [`Scheduler::pass`].

use std::borrow::Cow;
use std::collections::VecDeque;

use super::free::{FreeState, Mode};
use super::pass::{Alloc, Cache, FastMap, Holder, Pass, Prepared, Said, allocs_of, limited, score};
use super::{Decision, Gang, NodeCapacity, Policy, QueueConfig, RunningGang, Waiting, reason};

/// A running gang as the scheduler keeps it.
#[derive(Debug, Clone)]
struct Running {
    gang: RunningGang,
    allocs: Vec<Alloc>,
    gpus: u64,
}

/// A queued gang with what the pass needs, worked out once.
#[derive(Debug, Clone)]
struct Queued {
    gang: Gang,
    required: usize,
    shape: usize,
    gpus: u64,
    score: f64,
    /// The selector of its largest replica (see [`Prepared::named`]).
    named: u32,
    /// Its queue's priority, looked up when it is submitted or the queues change: ordering the
    /// queue then reads nothing outside this struct.
    queue_priority: Option<i32>,
    /// What the last pass said about it, if it waited.
    said: Said,
}

/// The priority of the queue named `name`; the last of that name wins, as in the full pass's
/// lookup.
fn queue_priority(queues: &[QueueConfig], name: &str) -> Option<i32> {
    queues
        .iter()
        .rev()
        .find(|q| q.name == name)
        .map(|q| q.priority)
}

impl Queued {
    fn prepared(&self) -> Prepared<'_> {
        Prepared {
            gang: &self.gang,
            required: self.required,
            shape: self.shape,
            gpus: self.gpus,
            score: self.score,
            named: self.named,
        }
    }
}

/// A scheduler that keeps its state between passes. Feed it what changes (gangs submitted,
/// cancelled, started, finished; nodes; queues) and call [`Scheduler::pass`]; a pass's
/// placements start at once (they hold their resources from then on, until
/// [`Scheduler::finish`]).
#[derive(Debug, Clone)]
pub struct Scheduler {
    policy: Policy,
    nodes: Vec<NodeCapacity>,
    queues: Vec<QueueConfig>,
    by_name: FastMap<String, u32>,
    cache: Cache,
    state: FreeState,
    /// Sorted by id, so the pass gets its holders in id order and need not compare ids to
    /// break ties when it orders them for the reservation.
    running: Vec<Running>,
    /// In policy order after [`Scheduler::order`]. A deque, because the gangs a pass places
    /// are mostly near the head: taking them out moves the few before them, not the queue.
    queued: VecDeque<Queued>,
    /// Whether `queued` is in policy order for `sorted_at`.
    sorted_at: Option<f64>,
}

impl Scheduler {
    pub fn new(policy: Policy, nodes: Vec<NodeCapacity>, queues: Vec<QueueConfig>) -> Self {
        let mut s = Scheduler {
            policy,
            nodes: Vec::new(),
            queues,
            by_name: FastMap::default(),
            cache: Cache::new(),
            state: FreeState::empty(&[], false),
            running: Vec::new(),
            queued: VecDeque::new(),
            sorted_at: None,
        };
        s.set_nodes(nodes);
        s
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn nodes(&self) -> &[NodeCapacity] {
        &self.nodes
    }

    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// Queued gangs, in no particular order.
    pub fn queued(&self) -> impl Iterator<Item = &Gang> {
        self.queued.iter().map(|q| &q.gang)
    }

    /// Running gangs, in no particular order.
    pub fn running(&self) -> impl Iterator<Item = &RunningGang> {
        self.running.iter().map(|r| &r.gang)
    }

    /// Replaces the nodes (added, removed, drained, healed, relabelled): everything that
    /// depends on them is worked out again.
    pub fn set_nodes(&mut self, nodes: Vec<NodeCapacity>) {
        self.nodes = nodes;
        self.cache = Cache::new();
        self.cache.keep_certs = true;
        // The last node of a name wins, as in the full pass's lookup.
        self.by_name = FastMap::default();
        for (i, n) in self.nodes.iter().enumerate() {
            self.by_name.insert(n.name.clone(), i as u32);
        }
        self.state = FreeState::empty(&self.nodes, false);
        for r in &mut self.running {
            (r.allocs, r.gpus) = allocs_of(&self.nodes, |n| self.by_name.get(n).copied(), &r.gang);
            for a in &r.allocs {
                self.state.occupy(a.node, a.gpus, a.cpu, a.mem);
            }
        }
        self.state.rebuild_index();
        for q in &mut self.queued {
            let of = self.cache.shape_of(&self.nodes, &q.gang);
            (q.required, q.shape, q.named) = (of.required, of.shape, of.named);
            // Why a gang can never fit is worked out from the nodes: say it again.
            if q.said
                .as_ref()
                .is_some_and(|(r, _)| *r == reason::NEVER_FITS)
            {
                q.said = None;
            }
        }
    }

    /// Forgets what was said about every waiting gang, so the next pass lists them all (for a
    /// caller that lost track of what it holds).
    pub fn relist(&mut self) {
        for q in &mut self.queued {
            q.said = None;
        }
    }

    /// Every waiting gang with its reason and message, in policy order, as the last pass said
    /// (gangs submitted since are not in it): the full list that [`super::schedule`] gives.
    pub fn waiting(&self) -> Vec<Waiting> {
        self.queued
            .iter()
            .filter_map(|q| {
                let (reason, message) = q.said.as_ref()?;
                Some(Waiting {
                    gang: q.gang.id.clone(),
                    reason,
                    message: message.clone(),
                })
            })
            .collect()
    }

    /// The running gang with this id, as the scheduler holds it.
    pub fn running_gang(&self, id: &str) -> Option<&RunningGang> {
        self.running_index(id).ok().map(|i| &self.running[i].gang)
    }

    /// Replaces the queue configuration.
    pub fn set_queues(&mut self, queues: Vec<QueueConfig>) {
        self.queues = queues;
        for q in &mut self.queued {
            q.queue_priority = queue_priority(&self.queues, &q.gang.queue);
        }
        self.sorted_at = None;
    }

    /// Adds a gang to the queue, replacing a queued gang of the same id.
    pub fn submit(&mut self, gang: Gang) {
        self.cancel(&gang.id);
        let of = self.cache.shape_of(&self.nodes, &gang);
        let gpus = gang
            .replicas
            .iter()
            .map(|r| u64::from(r.resources.gpus))
            .sum();
        let queue_priority = queue_priority(&self.queues, &gang.queue);
        self.queued.push_back(Queued {
            gang,
            required: of.required,
            shape: of.shape,
            gpus,
            score: 0.0,
            named: of.named,
            queue_priority,
            said: None,
        });
        self.sorted_at = None;
    }

    /// Takes a gang out of the queue; false if it was not queued.
    pub fn cancel(&mut self, id: &str) -> bool {
        let Some(i) = self.queued.iter().position(|q| q.gang.id == id) else {
            return false;
        };
        // Removing keeps the rest in order.
        self.queued.remove(i);
        true
    }

    /// Records a gang that holds resources without this scheduler having placed it (adopted
    /// after a restart, say), replacing a running gang of the same id.
    pub fn start(&mut self, gang: RunningGang) {
        if let Ok(i) = self.running_index(&gang.id)
            && self.running[i].gang.assignments == gang.assignments
        {
            // Same resources (a new expected end, say): nothing to take or give back.
            self.running[i].gang = gang;
            return;
        }
        self.finish(&gang.id);
        let (allocs, gpus) = allocs_of(&self.nodes, |n| self.by_name.get(n).copied(), &gang);
        for a in &allocs {
            self.state.occupy_indexed(a.node, a.gpus, a.cpu, a.mem);
        }
        let at = self.running_index(&gang.id).unwrap_or_else(|at| at);
        self.running.insert(at, Running { gang, allocs, gpus });
    }

    /// Gives back the resources of a running gang that ended; false if it was not running.
    pub fn finish(&mut self, id: &str) -> bool {
        let Ok(i) = self.running_index(id) else {
            return false;
        };
        let r = self.running.remove(i);
        for a in &r.allocs {
            self.state.release_indexed(a.node, a.gpus, a.cpu, a.mem);
        }
        // A node with more room may now hold a replica that fitted nowhere before.
        for cert in &mut self.cache.certs {
            if let Some(need) = cert
                && r.allocs.iter().any(|a| {
                    self.state
                        .fits_in(a.node, need, Mode::Any, &self.cache.selectors)
                })
            {
                *cert = None;
            }
        }
        true
    }

    /// One scheduling pass at `now`. Decides exactly what [`super::schedule`] decides for the
    /// same nodes, queues, running and queued gangs; the placements then hold their resources
    /// and leave the queue. Its `waiting` holds only the gangs whose reason or message differs
    /// from what the previous pass said of them (and every gang not yet said, or relisted);
    /// [`Scheduler::waiting`] gives the whole list.
    pub fn pass(&mut self, now: f64) -> Decision {
        self.order(now);
        // Only a policy that lists waiting gangs says anything to remember (replay lists none).
        let said: Option<Vec<Said>> = self
            .policy
            .list_waiting
            .then(|| self.queued.iter_mut().map(|q| q.said.take()).collect());
        let order: Vec<Prepared<'_>> = self.queued.iter().map(Queued::prepared).collect();
        let holders: Vec<Holder<'_>> = self
            .running
            .iter()
            .map(|r| Holder {
                id: &r.gang.id,
                end: r.gang.expected_end,
                allocs: Cow::Borrowed(&r.allocs),
            })
            .collect();
        let mut usage: FastMap<&str, (u32, u64)> = FastMap::default();
        if limited(&self.queues) {
            for r in &self.running {
                let used = usage.entry(r.gang.queue.as_str()).or_default();
                used.0 += 1;
                used.1 += r.gpus;
            }
        }
        let running = holders.len();
        let mut pass = Pass::from_parts(
            now,
            &self.nodes,
            &self.policy,
            &self.queues,
            std::mem::take(&mut self.cache),
            std::mem::take(&mut self.state),
            holders,
            usage,
        );
        pass.holders_by_id = running;
        pass.said = said;
        pass.run(&order);
        let Pass {
            cache,
            mut state,
            holders,
            decision,
            said,
            placed_at,
            ..
        } = pass;
        state.unhold();
        let placed: Vec<(Option<f64>, Vec<Alloc>)> = holders[running..]
            .iter()
            .map(|h| (h.end, h.allocs.to_vec()))
            .collect();
        drop(order);
        if let Some(said) = said {
            for (q, said) in self.queued.iter_mut().zip(said) {
                q.said = said;
            }
        }
        self.cache = cache;
        self.state = state;
        // Out of the queue by position, the last first so the earlier positions hold; the rest
        // keeps its order.
        let mut gangs: Vec<Gang> = placed_at
            .iter()
            .rev()
            .filter_map(|&at| self.queued.remove(at))
            .map(|q| q.gang)
            .collect();
        gangs.reverse();
        for ((p, (end, allocs)), gang) in decision.placements.iter().zip(placed).zip(gangs) {
            debug_assert_eq!(p.gang, gang.id);
            let at = self.running_index(&gang.id).unwrap_or_else(|at| at);
            self.running.insert(
                at,
                Running {
                    gpus: p
                        .assignments
                        .iter()
                        .map(|a| a.gpu_indices.len() as u64)
                        .sum(),
                    allocs,
                    gang: RunningGang {
                        id: gang.id,
                        queue: gang.queue,
                        assignments: p.assignments.clone(),
                        expected_end: end,
                    },
                },
            );
        }
        decision
    }

    /// Where the running gang with this id is, or where it would go.
    fn running_index(&self, id: &str) -> Result<usize, usize> {
        self.running
            .binary_search_by(|r| r.gang.id.as_str().cmp(id))
    }

    /// Puts the queue in policy order for `now`: scores move with time, but the order rarely
    /// does, so it is checked in one sweep and sorted only when some pair is out of place.
    fn order(&mut self, now: f64) {
        if self.sorted_at == Some(now) {
            return;
        }
        for q in &mut self.queued {
            q.score = score(&self.policy, q.queue_priority, now, &q.gang);
        }
        let queued = self.queued.make_contiguous();
        let sorted = queued
            .windows(2)
            .all(|w| w[0].prepared().order(&w[1].prepared()).is_le());
        if !sorted {
            queued.sort_by(|a, b| a.prepared().order(&b.prepared()));
        }
        self.sorted_at = Some(now);
    }
}
