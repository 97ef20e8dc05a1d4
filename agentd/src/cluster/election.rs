//! Leader election over the Lease `agentd-leader`, with client-go's leaderelection semantics:
//! a candidate reads the Lease and takes it when nobody holds it or when its content has not
//! changed for `leaseDurationSeconds` as measured on the candidate's own clock from the moment
//! it first saw that content (client-go's `observedTime`; clocks of other machines are never
//! compared); the holder renews every retry period and stops leading at once when no renewal
//! went through within the renew deadline; every write is an update carrying the
//! resourceVersion last read or written, so two candidates racing for the Lease end in one
//! success and one 409, never a lost update. On a graceful stop the holder releases the Lease
//! (an empty holder, as client-go's `ReleaseOnCancel`), so another agent takes over at its next
//! retry instead of waiting for the Lease to expire.
//!
//! Pure: [`Election::step`] takes an input and the time and says what to send or how long to
//! wait; the loop in `loops.rs` performs it. Leader-only work checks the [`Leadership`] the loop
//! publishes before each write: it names the term and when the term runs out.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

/// The Lease the leader-eligible agents compete for, in the cluster namespace.
pub const LEADER_LEASE: &str = "agentd-leader";

/// The election's timings, as client-go's `LeaderElectionConfig` has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// Who this agent is in the Lease's `holderIdentity`: its node name.
    pub identity: String,
    /// How long a Lease whose content does not change stays held; written to the Lease in
    /// whole seconds.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal.
    pub renew_deadline: Duration,
    /// How often a candidate tries to acquire, and the leader renews.
    pub retry_period: Duration,
}

/// The time, on both clocks: the monotonic one judges expiry and deadlines; the wall clock is
/// only written into the Lease (`acquireTime`, `renewTime`) for people and tools to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub instant: Instant,
    pub wall: Timestamp,
}

impl Now {
    pub fn current() -> Self {
        Self {
            instant: Instant::now(),
            wall: Timestamp::now(),
        }
    }
}

/// What happened since the last step.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The wait asked for is over (or the loop starts).
    Tick,
    /// The answer to [`Request::Get`]: the Lease, or `None` when there is none.
    Read(Option<Lease>),
    /// A create or update went through; the Lease as the server returned it.
    Wrote(Lease),
    /// A write lost a race: 409, the Lease changed (or was created) since it was read.
    Conflict,
    /// No answer, or an error answer; or the renew deadline passed while a request was out.
    Failed(String),
    /// The agent is stopping: release the Lease if this agent holds it, then end.
    Stop,
}

/// A request to the API server about the leader Lease.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Get,
    Create(Lease),
    /// Carries the resourceVersion of the Lease as last read or written.
    Update(Lease),
}

/// What the loop does next.
// Lives for one turn of the loop, on its stack: boxing the request would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Send this and feed the outcome back.
    Send(Request),
    /// Send nothing; tick again after this long.
    Wait(Duration),
    /// The election is over (stopped, the Lease released if it was held).
    Done,
}

/// Why this agent stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// No renewal went through within the renew deadline.
    RenewDeadline,
    /// The Lease was read with another holder.
    Deposed,
    /// The agent is stopping.
    Shutdown,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::RenewDeadline => "no renewal within the renew deadline",
            StopReason::Deposed => "another agent holds the lease",
            StopReason::Shutdown => "the agent is stopping",
        }
    }
}

/// Something the loop logs and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This agent leads from now on, in the term with this many `leaseTransitions`.
    StartedLeading {
        transitions: i32,
    },
    StoppedLeading(StopReason),
    /// The Lease names a different holder than before (empty: released).
    NewLeader(String),
    /// The Lease was released on stop (or the release failed, with why).
    Released(Result<(), String>),
}

/// One term of this agent's leadership: the fencing token leader-only work checks before each
/// write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// The Lease's `leaseTransitions` when this agent took it: different in every term.
    pub transitions: i32,
    /// The Lease's resourceVersion as this agent last wrote it.
    pub resource_version: String,
    /// This agent leads until this instant unless a renewal goes through first.
    pub valid_until: Instant,
}

/// Who leads, as this agent knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leadership {
    /// The Lease's holder while its Lease is valid; `None` when nobody holds it or not known.
    pub leader: Option<String>,
    /// Set while this agent leads.
    pub term: Option<Term>,
}

impl Leadership {
    /// Whether this agent may act as the leader at `now`: it leads, and its term has not run
    /// out (a stalled election loop cannot stretch a term).
    pub fn leads(&self, now: Instant) -> bool {
        self.term.as_ref().is_some_and(|t| now < t.valid_until)
    }
}

/// The Lease content as this agent last saw it, and when that content first appeared to it.
#[derive(Debug, Clone)]
struct Observed {
    lease: Lease,
    at: Instant,
}

impl Observed {
    fn spec(&self) -> LeaseSpec {
        self.lease.spec.clone().unwrap_or_default()
    }

    fn holder(&self) -> &str {
        self.lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .unwrap_or("")
    }

    /// When the Lease expires unless its content changes: `leaseDurationSeconds` after this
    /// agent first saw the content.
    fn expires(&self) -> Instant {
        let seconds = self
            .lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0);
        self.at + Duration::from_secs(seconds)
    }

    fn valid(&self, now: Instant) -> bool {
        now < self.expires()
    }
}

/// The request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// The leader's optimistic renewal with the Lease it last wrote.
    Renew,
    Get,
    Create,
    /// Acquire, or renew after a read.
    Update,
    Release,
}

#[derive(Debug, Clone, Copy)]
struct Leading {
    transitions: i32,
    /// When the last write that went through was sent: the renew deadline counts from it.
    renewed: Instant,
}

/// The election state machine.
#[derive(Debug, Clone)]
pub struct Election {
    config: ElectionConfig,
    observed: Option<Observed>,
    leading: Option<Leading>,
    /// The request in flight and when it was sent.
    pending: Option<(Pending, Instant)>,
    /// The holder last reported in a [`Event::NewLeader`].
    reported_leader: Option<String>,
    events: Vec<Event>,
}

impl Election {
    pub fn new(config: ElectionConfig) -> Self {
        Self {
            config,
            observed: None,
            leading: None,
            pending: None,
            reported_leader: None,
            events: Vec::new(),
        }
    }

    /// Whether this agent leads (its term may still run out before the next step: see
    /// [`Leadership::leads`]).
    #[cfg(test)]
    pub fn is_leading(&self) -> bool {
        self.leading.is_some()
    }

    /// When the current term runs out unless renewed; `None` when not leading. The loop gives
    /// up on a request still out at this instant and feeds [`Input::Failed`].
    pub fn deadline(&self) -> Option<Instant> {
        self.leading.map(|l| l.renewed + self.config.renew_deadline)
    }

    /// What leader-only work may rely on, at `now`.
    pub fn leadership(&self, now: Instant) -> Leadership {
        let leader = self
            .observed
            .as_ref()
            .filter(|o| !o.holder().is_empty() && o.valid(now))
            .map(|o| o.holder().to_owned());
        let term = self.leading.map(|l| Term {
            transitions: l.transitions,
            resource_version: self
                .observed
                .as_ref()
                .and_then(|o| o.lease.metadata.resource_version.clone())
                .unwrap_or_default(),
            valid_until: l.renewed + self.config.renew_deadline,
        });
        Leadership { leader, term }
    }

    /// The events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// One transition: `input` arrived at `now`; returns what to do next.
    pub fn step(&mut self, input: Input, now: Now) -> Next {
        let pending = self.pending.take();
        if input == Input::Stop {
            return self.stop(now);
        }
        self.check_deadline(now.instant);
        match (input, pending) {
            (Input::Tick, _) => self.attempt(now),
            (Input::Read(None), Some((Pending::Get, _))) => {
                let lease = self.record(None, now);
                self.send(Pending::Create, Request::Create(lease), now.instant)
            }
            (Input::Read(Some(lease)), Some((Pending::Get, _))) => {
                self.observe(lease, now.instant);
                self.after_read(now)
            }
            (Input::Wrote(lease), Some((Pending::Release, _))) => {
                self.observe(lease, now.instant);
                self.events.push(Event::Released(Ok(())));
                Next::Done
            }
            (Input::Conflict | Input::Failed(_), Some((Pending::Release, _))) => {
                self.events.push(Event::Released(Err(
                    "the release did not go through; the lease expires instead".into(),
                )));
                Next::Done
            }
            (
                Input::Wrote(lease),
                Some((Pending::Renew | Pending::Create | Pending::Update, sent)),
            ) => self.wrote(lease, sent, now),
            // The optimistic renewal failed: read the Lease and try again, as client-go's slow
            // path does.
            (Input::Conflict | Input::Failed(_), Some((Pending::Renew, _))) => {
                self.send(Pending::Get, Request::Get, now.instant)
            }
            // A failed attempt waits for the next; so does an answer to nothing asked (a bug in
            // the loop), after which the next attempt starts over from a read.
            (Input::Read(_) | Input::Wrote(_) | Input::Conflict | Input::Failed(_), _) => {
                self.wait(now.instant)
            }
            (Input::Stop, _) => unreachable!("handled above"),
        }
    }

    /// Stops leading once the renew deadline has passed without a renewal.
    fn check_deadline(&mut self, now: Instant) {
        if self.deadline().is_some_and(|d| now >= d) {
            self.stop_leading(StopReason::RenewDeadline);
        }
    }

    fn stop_leading(&mut self, why: StopReason) {
        if self.leading.take().is_some() {
            self.events.push(Event::StoppedLeading(why));
        }
    }

    /// client-go's `tryAcquireOrRenew`, first half: the leader renews with the Lease it last
    /// wrote while that is still valid; anyone else reads first.
    fn attempt(&mut self, now: Now) -> Next {
        if self.leading.is_some()
            && let Some(observed) = self.observed.clone().filter(|o| o.valid(now.instant))
        {
            let lease = self.record(Some(&observed), now);
            return self.send(Pending::Renew, Request::Update(lease), now.instant);
        }
        self.send(Pending::Get, Request::Get, now.instant)
    }

    /// Second half, with the Lease just read: held by someone else and not expired means
    /// wait; otherwise write this agent in, with the resourceVersion read.
    fn after_read(&mut self, now: Now) -> Next {
        let observed = self.observed.clone().expect("observed on read");
        let holder = observed.holder();
        if !holder.is_empty() && holder != self.config.identity && observed.valid(now.instant) {
            self.stop_leading(StopReason::Deposed);
            return self.wait(now.instant);
        }
        // Our name, but a term that is not ours: another process with this identity (a
        // restarted agent, a duplicate node name) took the Lease. This term is over; two
        // processes never both lead.
        let transitions = observed.spec().lease_transitions.unwrap_or(0);
        if self
            .leading
            .as_ref()
            .is_some_and(|l| l.transitions != transitions)
        {
            self.stop_leading(StopReason::Deposed);
            return self.wait(now.instant);
        }
        let lease = self.record(Some(&observed), now);
        self.send(Pending::Update, Request::Update(lease), now.instant)
    }

    fn wrote(&mut self, lease: Lease, sent: Instant, now: Now) -> Next {
        self.observe(lease, now.instant);
        let transitions = self
            .observed
            .as_ref()
            .and_then(|o| o.lease.spec.as_ref())
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        if let Some(leading) = &mut self.leading {
            leading.renewed = leading.renewed.max(sent);
        } else {
            self.leading = Some(Leading {
                transitions,
                renewed: sent,
            });
            self.events.push(Event::StartedLeading { transitions });
        }
        // A write sent long ago may come back after the deadline it was meant to beat.
        self.check_deadline(now.instant);
        self.wait(now.instant)
    }

    fn stop(&mut self, now: Now) -> Next {
        let held = self
            .observed
            .as_ref()
            .is_some_and(|o| o.holder() == self.config.identity);
        // Nothing leader-only may happen from here on, whether or not the release goes through.
        self.stop_leading(StopReason::Shutdown);
        let Some(observed) = self.observed.clone().filter(|_| held) else {
            return Next::Done;
        };
        let mut lease = observed.lease;
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(String::new());
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(MicroTime(now.wall));
        spec.renew_time = Some(MicroTime(now.wall));
        self.send(Pending::Release, Request::Update(lease), now.instant)
    }

    /// Remembers what was read or written; the observed time moves only when the content
    /// (not just the resourceVersion) changed.
    fn observe(&mut self, lease: Lease, now: Instant) {
        let at = match &self.observed {
            Some(o) if o.spec() == lease.spec.clone().unwrap_or_default() => o.at,
            _ => now,
        };
        let observed = Observed { lease, at };
        let holder = observed.holder().to_owned();
        self.observed = Some(observed);
        if self.reported_leader.as_deref() != Some(holder.as_str()) {
            self.reported_leader = Some(holder.clone());
            self.events.push(Event::NewLeader(holder));
        }
    }

    /// The Lease with this agent as holder: renewing keeps the acquire time and the transition
    /// count; taking it counts one more transition. Metadata (with the resourceVersion) is
    /// the observed Lease's, so the write is refused if the Lease changed since.
    fn record(&self, observed: Option<&Observed>, now: Now) -> Lease {
        let mut lease = observed.map_or_else(
            || Lease {
                metadata: ObjectMeta {
                    name: Some(LEADER_LEASE.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: None,
            },
            |o| o.lease.clone(),
        );
        let old = lease.spec.take().unwrap_or_default();
        // Only a term this process holds is renewed. A Lease that names this agent from before
        // a restart starts a new term (client-go would renew it), so that no two terms share a
        // transition count.
        let renewing = self.leading.is_some()
            && old.holder_identity.as_deref() == Some(self.config.identity.as_str());
        let transitions = old.lease_transitions.unwrap_or(0);
        let seconds = i32::try_from(self.config.lease_duration.as_secs())
            .unwrap_or(i32::MAX)
            .max(1);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if renewing {
                old.acquire_time.clone()
            } else {
                Some(MicroTime(now.wall))
            },
            renew_time: Some(MicroTime(now.wall)),
            lease_transitions: Some(match (observed, renewing) {
                (None, _) => 0,
                (Some(_), true) => transitions,
                (Some(_), false) => transitions.saturating_add(1),
            }),
            ..old
        });
        lease
    }

    fn send(&mut self, pending: Pending, request: Request, now: Instant) -> Next {
        self.pending = Some((pending, now));
        Next::Send(request)
    }

    /// How long until the next attempt: one retry period; sooner when the term runs out first
    /// (so that leading stops on time) or when the Lease another agent holds expires first (so
    /// that a dead leader is replaced within the lease duration plus one retry period of its
    /// last renewal).
    fn wait(&self, now: Instant) -> Next {
        let mut at = now + self.config.retry_period;
        if let Some(deadline) = self.deadline() {
            at = at.min(deadline);
        }
        if let Some(o) = &self.observed
            && o.holder() != self.config.identity
            && o.valid(now)
        {
            at = at.min(o.expires());
        }
        Next::Wait(at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "node-a";
    const OTHER: &str = "node-b";

    fn config() -> ElectionConfig {
        ElectionConfig {
            identity: ME.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// A clock the tests move by hand.
    struct Clock {
        start: Instant,
        wall: Timestamp,
        offset: Duration,
    }

    impl Clock {
        fn new() -> Self {
            Self {
                start: Instant::now(),
                wall: "2026-01-01T00:00:00Z".parse().unwrap(),
                offset: Duration::ZERO,
            }
        }
        fn now(&self) -> Now {
            Now {
                instant: self.start + self.offset,
                wall: self.wall + self.offset,
            }
        }
        fn advance(&mut self, by: Duration) -> Now {
            self.offset += by;
            self.now()
        }
    }

    fn lease(holder: &str, rv: &str, transitions: i32, renewed: &str) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(LEADER_LEASE.into()),
                namespace: Some("agentd-system".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                acquire_time: Some(MicroTime("2025-12-31T23:00:00Z".parse().unwrap())),
                renew_time: Some(MicroTime(renewed.parse().unwrap())),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    /// What the server would answer to a write: the same Lease at the next resourceVersion.
    fn applied(mut lease: Lease, rv: &str) -> Lease {
        lease.metadata.resource_version = Some(rv.into());
        lease
    }

    fn sent(next: Next) -> Request {
        match next {
            Next::Send(r) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn update(next: Next) -> Lease {
        match sent(next) {
            Request::Update(l) => l,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    fn spec(lease: &Lease) -> &LeaseSpec {
        lease.spec.as_ref().unwrap()
    }

    /// An election that has just taken a free Lease (rv "2").
    fn leading(clock: &Clock) -> Election {
        let mut e = Election::new(config());
        assert_eq!(sent(e.step(Input::Tick, clock.now())), Request::Get);
        let Request::Create(lease) = sent(e.step(Input::Read(None), clock.now())) else {
            panic!("create expected")
        };
        e.step(Input::Wrote(applied(lease, "2")), clock.now());
        assert!(e.is_leading());
        e.take_events();
        e
    }

    #[test]
    fn no_lease_is_created_with_this_agent_holding_it_and_it_leads() {
        let clock = Clock::new();
        let mut e = Election::new(config());
        assert_eq!(sent(e.step(Input::Tick, clock.now())), Request::Get);
        let Request::Create(lease) = sent(e.step(Input::Read(None), clock.now())) else {
            panic!("create expected")
        };
        assert_eq!(lease.metadata.name.as_deref(), Some(LEADER_LEASE));
        assert_eq!(lease.metadata.resource_version, None);
        let s = spec(&lease);
        assert_eq!(s.holder_identity.as_deref(), Some(ME));
        assert_eq!(s.lease_duration_seconds, Some(15));
        assert_eq!(s.lease_transitions, Some(0));
        assert_eq!(s.acquire_time, s.renew_time);
        assert!(!e.is_leading(), "not before the create went through");

        let next = e.step(Input::Wrote(applied(lease, "2")), clock.now());
        assert_eq!(next, Next::Wait(Duration::from_secs(2)));
        assert_eq!(
            e.take_events(),
            [
                Event::NewLeader(ME.into()),
                Event::StartedLeading { transitions: 0 }
            ]
        );
        let l = e.leadership(clock.now().instant);
        assert_eq!(l.leader.as_deref(), Some(ME));
        let term = l.term.unwrap();
        assert_eq!(term.resource_version, "2");
        assert_eq!(
            term.valid_until,
            clock.now().instant + Duration::from_secs(10)
        );
        assert!(e.leadership(clock.now().instant).leads(clock.now().instant));
    }

    #[test]
    fn losing_the_create_race_is_a_failed_attempt_retried_after_the_retry_period() {
        let clock = Clock::new();
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        e.step(Input::Read(None), clock.now());
        let next = e.step(Input::Conflict, clock.now());
        assert_eq!(next, Next::Wait(Duration::from_secs(2)));
        assert!(!e.is_leading());
        assert_eq!(sent(e.step(Input::Tick, clock.now())), Request::Get);
    }

    #[test]
    fn a_released_lease_is_taken_at_once_with_one_more_transition() {
        let clock = Clock::new();
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        let released = lease("", "7", 3, "2026-01-01T00:00:00Z");
        let lease = update(e.step(Input::Read(Some(released)), clock.now()));
        assert_eq!(
            lease.metadata.resource_version.as_deref(),
            Some("7"),
            "the write carries the resourceVersion read"
        );
        let s = spec(&lease);
        assert_eq!(s.holder_identity.as_deref(), Some(ME));
        assert_eq!(s.lease_transitions, Some(4));
        assert_eq!(s.acquire_time, Some(MicroTime(clock.now().wall)));
        e.step(Input::Wrote(applied(lease, "8")), clock.now());
        assert!(e.is_leading());
        assert!(
            e.take_events()
                .contains(&Event::StartedLeading { transitions: 4 })
        );
    }

    #[test]
    fn a_held_lease_is_left_alone_until_it_expires_on_this_agents_clock() {
        let mut clock = Clock::new();
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        // renewTime is far in the past by the wall clock: that does not matter, only how long
        // this agent has seen the same content.
        let held = lease(OTHER, "5", 1, "2020-01-01T00:00:00Z");
        let next = e.step(Input::Read(Some(held.clone())), clock.now());
        assert_eq!(next, Next::Wait(Duration::from_secs(2)));
        assert_eq!(e.take_events(), [Event::NewLeader(OTHER.into())]);
        assert_eq!(
            e.leadership(clock.now().instant).leader.as_deref(),
            Some(OTHER)
        );

        // The same content for 14 s: still held.
        clock.advance(Duration::from_secs(14));
        e.step(Input::Tick, clock.now());
        let next = e.step(Input::Read(Some(held.clone())), clock.now());
        assert_eq!(
            next,
            Next::Wait(Duration::from_secs(1)),
            "wakes when the lease expires, not a whole retry period later"
        );
        assert!(!e.is_leading());
    }

    #[test]
    fn a_renewed_lease_restarts_the_expiry() {
        let mut clock = Clock::new();
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        e.step(
            Input::Read(Some(lease(OTHER, "5", 1, "2026-01-01T00:00:00Z"))),
            clock.now(),
        );
        clock.advance(Duration::from_secs(14));
        e.step(Input::Tick, clock.now());
        e.step(
            Input::Read(Some(lease(OTHER, "6", 1, "2026-01-01T00:00:14Z"))),
            clock.now(),
        );
        clock.advance(Duration::from_secs(14));
        e.step(Input::Tick, clock.now());
        let next = e.step(
            Input::Read(Some(lease(OTHER, "6", 1, "2026-01-01T00:00:14Z"))),
            clock.now(),
        );
        assert!(matches!(next, Next::Wait(_)), "renewed 14 s ago: held");
    }

    #[test]
    fn an_expired_lease_is_taken_over_with_the_resource_version_read() {
        let mut clock = Clock::new();
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        let held = lease(OTHER, "5", 1, "2026-01-01T00:00:00Z");
        e.step(Input::Read(Some(held.clone())), clock.now());
        clock.advance(Duration::from_secs(15));
        e.step(Input::Tick, clock.now());
        let lease = update(e.step(Input::Read(Some(held)), clock.now()));
        assert_eq!(lease.metadata.resource_version.as_deref(), Some("5"));
        assert_eq!(spec(&lease).holder_identity.as_deref(), Some(ME));
        assert_eq!(spec(&lease).lease_transitions, Some(2));
        e.step(Input::Wrote(applied(lease, "9")), clock.now());
        assert!(e.is_leading());
        assert_eq!(
            e.leadership(clock.now().instant).term.unwrap().transitions,
            2
        );
    }

    #[test]
    fn a_409_on_the_takeover_is_observed_and_retried_never_forced() {
        let mut clock = Clock::new();
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        let held = lease(OTHER, "5", 1, "2026-01-01T00:00:00Z");
        e.step(Input::Read(Some(held.clone())), clock.now());
        clock.advance(Duration::from_secs(15));
        e.step(Input::Tick, clock.now());
        e.step(Input::Read(Some(held)), clock.now());
        // A third agent got there first.
        let next = e.step(Input::Conflict, clock.now());
        assert_eq!(next, Next::Wait(Duration::from_secs(2)));
        assert!(!e.is_leading());
        // The next attempt reads again and sees the winner, whose lease is fresh to it.
        assert_eq!(sent(e.step(Input::Tick, clock.now())), Request::Get);
        let winner = lease("node-c", "6", 2, "2026-01-01T00:00:15Z");
        let next = e.step(Input::Read(Some(winner)), clock.now());
        assert!(matches!(next, Next::Wait(_)));
        assert_eq!(
            e.leadership(clock.now().instant).leader.as_deref(),
            Some("node-c")
        );
    }

    #[test]
    fn the_leader_renews_with_the_lease_it_wrote_keeping_acquire_time_and_transitions() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        let first = e.leadership(clock.now().instant).term.unwrap();
        clock.advance(Duration::from_secs(2));
        let lease = update(e.step(Input::Tick, clock.now()));
        assert_eq!(
            lease.metadata.resource_version.as_deref(),
            Some("2"),
            "no read first: the resourceVersion of its own last write"
        );
        let s = spec(&lease);
        assert_eq!(s.lease_transitions, Some(0));
        assert_eq!(
            s.acquire_time,
            Some(MicroTime(
                "2026-01-01T00:00:00Z".parse::<Timestamp>().unwrap()
            ))
        );
        assert_eq!(s.renew_time, Some(MicroTime(clock.now().wall)));
        let next = e.step(Input::Wrote(applied(lease, "3")), clock.now());
        assert_eq!(next, Next::Wait(Duration::from_secs(2)));
        let term = e.leadership(clock.now().instant).term.unwrap();
        assert_eq!(term.transitions, first.transitions, "the same term");
        assert_eq!(term.resource_version, "3");
        assert_eq!(term.valid_until, first.valid_until + Duration::from_secs(2));
        assert_eq!(e.take_events(), [], "a renewal is no news");
    }

    #[test]
    fn the_renew_deadline_counts_from_when_the_renewal_was_sent() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        clock.advance(Duration::from_secs(2));
        let sent_at = clock.now().instant;
        let lease = update(e.step(Input::Tick, clock.now()));
        // The answer takes 3 s to come back.
        clock.advance(Duration::from_secs(3));
        e.step(Input::Wrote(applied(lease, "3")), clock.now());
        assert_eq!(
            e.deadline(),
            Some(sent_at + Duration::from_secs(10)),
            "not from when the answer came"
        );
    }

    #[test]
    fn a_failed_renewal_reads_the_lease_and_writes_with_what_it_read() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        clock.advance(Duration::from_secs(2));
        e.step(Input::Tick, clock.now());
        // Someone changed the Lease's labels: the content is ours still, the rv is not.
        assert_eq!(sent(e.step(Input::Conflict, clock.now())), Request::Get);
        let current = e.observed.as_ref().unwrap().lease.clone();
        let lease = update(e.step(Input::Read(Some(applied(current, "4"))), clock.now()));
        assert_eq!(lease.metadata.resource_version.as_deref(), Some("4"));
        assert_eq!(spec(&lease).lease_transitions, Some(0), "still our term");
        e.step(Input::Wrote(applied(lease, "5")), clock.now());
        assert!(e.is_leading());
        assert_eq!(e.take_events(), []);
    }

    #[test]
    fn renewals_failing_past_the_renew_deadline_stop_leading_at_once() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        let valid_until = e.deadline().unwrap();
        // Every request fails from now on; the loop wakes on time for each retry.
        let mut stopped_at = None;
        for _ in 0..20 {
            let next = match e.step(Input::Tick, clock.now()) {
                Next::Send(_) => {
                    let next = e.step(Input::Failed("timed out".into()), clock.now());
                    match next {
                        Next::Send(Request::Get) => {
                            e.step(Input::Failed("timed out".into()), clock.now())
                        }
                        other => other,
                    }
                }
                other => other,
            };
            if !e.is_leading() {
                stopped_at = Some(clock.now().instant);
                break;
            }
            let Next::Wait(d) = next else {
                panic!("{next:?}")
            };
            assert!(
                clock.now().instant + d <= valid_until,
                "never sleeps past the deadline"
            );
            clock.advance(d);
        }
        assert_eq!(stopped_at, Some(valid_until), "exactly at the deadline");
        assert_eq!(
            e.take_events(),
            [Event::StoppedLeading(StopReason::RenewDeadline)]
        );
        assert!(!e.leadership(valid_until).leads(valid_until));
        assert!(e.leadership(valid_until).term.is_none());
    }

    #[test]
    fn a_request_still_out_at_the_deadline_fails_and_ends_the_term() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        clock.advance(Duration::from_secs(2));
        e.step(Input::Tick, clock.now());
        // The loop gives up on the hanging request at the deadline.
        clock.advance(Duration::from_secs(8));
        let next = e.step(Input::Failed("renew deadline passed".into()), clock.now());
        assert!(!e.is_leading());
        assert_eq!(
            e.take_events(),
            [Event::StoppedLeading(StopReason::RenewDeadline)]
        );
        // It goes on as a candidate.
        assert_eq!(next, Next::Send(Request::Get));
    }

    #[test]
    fn a_term_runs_out_for_its_readers_even_without_a_step() {
        let clock = Clock::new();
        let e = leading(&clock);
        let l = e.leadership(clock.now().instant);
        let end = l.term.as_ref().unwrap().valid_until;
        assert!(l.leads(end.checked_sub(Duration::from_millis(1)).unwrap()));
        assert!(!l.leads(end));
    }

    #[test]
    fn a_leader_that_reads_another_holder_stops_leading_at_once() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        clock.advance(Duration::from_secs(2));
        e.step(Input::Tick, clock.now());
        e.step(Input::Conflict, clock.now());
        let next = e.step(
            Input::Read(Some(lease(OTHER, "9", 1, "2026-01-01T00:00:02Z"))),
            clock.now(),
        );
        assert!(matches!(next, Next::Wait(_)));
        assert!(!e.is_leading());
        assert_eq!(
            e.take_events(),
            [
                Event::NewLeader(OTHER.into()),
                Event::StoppedLeading(StopReason::Deposed)
            ]
        );
    }

    #[test]
    fn a_leader_that_reads_its_name_in_a_term_not_its_own_stops_leading() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        clock.advance(Duration::from_secs(2));
        e.step(Input::Tick, clock.now());
        e.step(Input::Conflict, clock.now());
        // Another process of the same name took the Lease as a new term (transitions 1).
        let next = e.step(
            Input::Read(Some(lease(ME, "9", 1, "2026-01-01T00:00:02Z"))),
            clock.now(),
        );
        assert!(matches!(next, Next::Wait(_)), "{next:?}");
        assert!(!e.is_leading());
        assert_eq!(
            e.take_events(),
            [Event::StoppedLeading(StopReason::Deposed)]
        );
    }

    #[test]
    fn a_restart_takes_its_own_unexpired_lease_at_once_in_a_new_term() {
        let clock = Clock::new();
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        let mine = lease(ME, "5", 3, "2026-01-01T00:00:00Z");
        let lease = update(e.step(Input::Read(Some(mine)), clock.now()));
        assert_eq!(lease.metadata.resource_version.as_deref(), Some("5"));
        assert_eq!(spec(&lease).lease_transitions, Some(4));
        assert_eq!(spec(&lease).acquire_time, Some(MicroTime(clock.now().wall)));
    }

    #[test]
    fn stop_releases_a_held_lease_with_an_empty_holder_and_ends() {
        let mut clock = Clock::new();
        let mut e = leading(&clock);
        clock.advance(Duration::from_secs(1));
        let lease = update(e.step(Input::Stop, clock.now()));
        assert!(!e.is_leading(), "leading ends before the release is sent");
        assert_eq!(lease.metadata.resource_version.as_deref(), Some("2"));
        let s = spec(&lease);
        assert_eq!(s.holder_identity.as_deref(), Some(""));
        assert_eq!(s.lease_duration_seconds, Some(1));
        assert_eq!(s.lease_transitions, Some(0), "kept");
        let next = e.step(Input::Wrote(applied(lease, "3")), clock.now());
        assert_eq!(next, Next::Done);
        assert_eq!(
            e.take_events(),
            [
                Event::StoppedLeading(StopReason::Shutdown),
                Event::NewLeader(String::new()),
                Event::Released(Ok(()))
            ]
        );
        assert_eq!(e.leadership(clock.now().instant), Leadership::default());
    }

    #[test]
    fn a_failed_release_still_ends() {
        let clock = Clock::new();
        let mut e = leading(&clock);
        e.step(Input::Stop, clock.now());
        assert_eq!(e.step(Input::Conflict, clock.now()), Next::Done);
        assert!(matches!(
            e.take_events().last(),
            Some(Event::Released(Err(_)))
        ));
    }

    #[test]
    fn stop_without_holding_the_lease_writes_nothing() {
        let clock = Clock::new();
        let mut e = Election::new(config());
        assert_eq!(e.step(Input::Stop, clock.now()), Next::Done);
        let mut e = Election::new(config());
        e.step(Input::Tick, clock.now());
        e.step(
            Input::Read(Some(lease(OTHER, "5", 1, "2026-01-01T00:00:00Z"))),
            clock.now(),
        );
        assert_eq!(e.step(Input::Stop, clock.now()), Next::Done);
    }

    #[test]
    fn an_answer_nobody_asked_for_is_ignored() {
        let clock = Clock::new();
        let mut e = Election::new(config());
        let next = e.step(
            Input::Wrote(lease(ME, "1", 0, "2026-01-01T00:00:00Z")),
            clock.now(),
        );
        assert!(matches!(next, Next::Wait(_)));
        assert!(!e.is_leading());
    }
}
