//! Scheduling policies: each is a configuration of the one scheduler core (queue order, what
//! may go past a blocked head, how replicas are packed), never a separate implementation.

/// How queued gangs are ordered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Order {
    /// Submit order only; queues and priorities are ignored.
    Submit,
    /// Queue priority plus job priority, plus one point per `aging_s` seconds of waiting so a
    /// low-priority gang eventually overtakes newer high-priority ones; then submit order.
    Priority { aging_s: f64 },
}

/// What may start while the head of the order is blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backfill {
    /// Nothing: the head blocks everyone behind it.
    None,
    /// Any later gang that fits now (the head may starve).
    Greedy,
    /// The head gets a reservation; later gangs start only where they do not delay it.
    Reservation,
}

/// In what order a reservation counts running gangs as ended, to find the fewest it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOrder {
    /// Declared ends first, soonest first; then the gangs that declared none, on the least busy
    /// nodes first.
    SoonestEnd,
    /// The gangs on the least busy nodes first, whatever their ends. For ends that are only
    /// estimates: in a heavy-tailed run-time distribution the soonest estimated end is the gang
    /// that started longest ago, which is the one least likely to end soon.
    LeastBusy,
}

/// How replicas are packed onto nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Each replica on the lowest-numbered node it fits.
    FirstFit,
    /// As few nodes as possible, each the one left with fewest free GPUs, so free nodes stay
    /// whole.
    BestFit,
}

/// A scheduling policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: &'static str,
    pub order: Order,
    pub backfill: Backfill,
    pub fit: Fit,
    /// How many blocked gangs hold a reservation at once ([`Backfill::Reservation`] only): the
    /// head of the order and then the next blocked gangs, each planned around those before it.
    pub reservations: usize,
    /// Whether gangs after the head get a reservation only when they need more than one node
    /// (a gang that fits one node finds one free soon enough without).
    pub later_reservations_multi_node: bool,
    /// In what order reservations count running gangs as ended.
    pub release: ReleaseOrder,
    /// Write a human message for every waiting gang. Replay turns it off: it only counts reasons.
    pub explain: bool,
    /// List every waiting gang in [`super::Decision::waiting`]; when false only
    /// [`super::Decision::waiting_counts`] is filled (replay, where queues run to thousands).
    pub list_waiting: bool,
}

/// Errors from choosing a policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedError {
    #[error("unknown scheduling policy `{name}`; allowed: fifo, first-fit, best-fit, default")]
    UnknownPolicy { name: String },
}

/// Seconds of waiting that raise a gang's priority by one point in the default policy: with the
/// default queues (`fast` 10, `slow` 1) a `slow` gang overtakes new `fast` ones after 2¼ hours.
pub const DEFAULT_AGING_S: f64 = 900.0;

/// How many blocked gangs hold a reservation at once when run times are estimated
/// ([`Policy::with_runtime_estimates`]).
pub const ESTIMATED_RESERVATIONS: usize = 8;

impl Policy {
    /// The policy names, in the order replay runs them.
    pub const NAMES: [&'static str; 4] = ["fifo", "first-fit", "best-fit", "default"];

    /// Strict FIFO without backfill: the baseline.
    pub fn fifo() -> Self {
        Policy {
            name: "fifo",
            order: Order::Submit,
            backfill: Backfill::None,
            fit: Fit::FirstFit,
            reservations: 1,
            later_reservations_multi_node: false,
            release: ReleaseOrder::SoonestEnd,
            explain: true,
            list_waiting: true,
        }
    }

    /// FIFO order, first-fit packing, any later gang may start when the head does not fit.
    pub fn first_fit() -> Self {
        Policy {
            name: "first-fit",
            order: Order::Submit,
            backfill: Backfill::Greedy,
            fit: Fit::FirstFit,
            reservations: 1,
            later_reservations_multi_node: false,
            release: ReleaseOrder::SoonestEnd,
            explain: true,
            list_waiting: true,
        }
    }

    /// FIFO order, best-fit packing, any later gang may start when the head does not fit.
    pub fn best_fit() -> Self {
        Policy {
            name: "best-fit",
            order: Order::Submit,
            backfill: Backfill::Greedy,
            fit: Fit::BestFit,
            reservations: 1,
            later_reservations_multi_node: false,
            release: ReleaseOrder::SoonestEnd,
            explain: true,
            list_waiting: true,
        }
    }

    /// agentd's policy: priority queues with aging, a reservation for the blocked head and
    /// backfill that does not delay it, best-fit packing.
    pub fn agentd() -> Self {
        Policy {
            name: "default",
            order: Order::Priority {
                aging_s: DEFAULT_AGING_S,
            },
            backfill: Backfill::Reservation,
            fit: Fit::BestFit,
            reservations: 1,
            later_reservations_multi_node: false,
            release: ReleaseOrder::SoonestEnd,
            explain: true,
            list_waiting: true,
        }
    }

    /// The policy as run when running jobs' ends are estimated rather than declared: a
    /// reservation for each of the first [`ESTIMATED_RESERVATIONS`] blocked gangs (after the
    /// head only those wider than one node), each waiting on the least busy nodes. One
    /// reservation protects only the head, and gangs of several nodes behind it can be passed
    /// by one-node gangs for ever; with estimates, backfill is frequent enough for that to be
    /// the long tail of the waits. Policies without reservations are returned unchanged.
    #[must_use]
    pub fn with_runtime_estimates(mut self) -> Self {
        if self.backfill == Backfill::Reservation {
            self.reservations = ESTIMATED_RESERVATIONS;
            self.later_reservations_multi_node = true;
            self.release = ReleaseOrder::LeastBusy;
        }
        self
    }

    /// The policy with this name (see [`Policy::NAMES`]).
    pub fn by_name(name: &str) -> Result<Self, SchedError> {
        match name {
            "fifo" => Ok(Self::fifo()),
            "first-fit" => Ok(Self::first_fit()),
            "best-fit" => Ok(Self::best_fit()),
            "default" => Ok(Self::agentd()),
            _ => Err(SchedError::UnknownPolicy {
                name: name.to_owned(),
            }),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::agentd()
    }
}
