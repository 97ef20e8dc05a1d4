//! How the agent lives with an API server that is down, slow or refusing: a capped exponential
//! backoff with jitter for retries, and the link state machine that decides when a change of
//! state is worth one log line (never one per retry).

use std::time::Duration;

/// Capped exponential backoff with "equal jitter": each wait is half the current step plus a
/// random share of the other half, so that a hundred agents cut off together do not come back
/// in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The wait before the next retry; `unit` in 0..1 is the random draw (a parameter, so tests
    /// can pin it).
    pub fn wait_with(&mut self, unit: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The wait before the next retry, with a fresh random draw.
    pub fn wait(&mut self) -> Duration {
        self.wait_with(rand::random::<f64>())
    }

    /// A success: the next failure starts again from the base.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What one request to the API server came to, as far as reachability goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server answered (any 2xx, or a 4xx that is about the request, such as 404 or 409).
    Answered,
    /// The server answered but refused the agent's credentials (401/403): reachable, and wrong.
    Refused(String),
    /// No usable answer: connection refused or timed out, 5xx, 429.
    Unreachable(String),
}

/// The agent's link to the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Nothing has been asked yet.
    Unknown,
    Connected,
    Refused(String),
    Unreachable(String),
}

/// A change of link state worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Connected { was_down: bool },
    Refused(String),
    Unreachable(String),
}

impl Link {
    /// Moves to the state `outcome` shows; returns the transition when the state changed.
    /// A second failure of the same kind is no news, so it returns `None`.
    pub fn observe(&mut self, outcome: Outcome) -> Option<Transition> {
        let next = match outcome {
            Outcome::Answered => Link::Connected,
            Outcome::Refused(why) => Link::Refused(why),
            Outcome::Unreachable(why) => Link::Unreachable(why),
        };
        let transition = match (&*self, &next) {
            (Link::Connected, Link::Connected) | (Link::Unreachable(_), Link::Unreachable(_)) => {
                None
            }
            (Link::Refused(a), Link::Refused(b)) if a == b => None,
            (was, Link::Connected) => Some(Transition::Connected {
                was_down: matches!(was, Link::Unreachable(_)),
            }),
            (_, Link::Refused(why)) => Some(Transition::Refused(why.clone())),
            (_, Link::Unreachable(why)) => Some(Transition::Unreachable(why.clone())),
            (_, Link::Unknown) => None,
        };
        if let Link::Unreachable(why) = &next
            && let Link::Unreachable(old) = self
        {
            // Same state; keep the latest reason for `agentctl status`.
            old.clone_from(why);
            return transition;
        }
        *self = next;
        transition
    }

    pub fn reachable(&self) -> bool {
        matches!(self, Link::Connected | Link::Refused(_))
    }

    pub fn last_error(&self) -> Option<String> {
        match self {
            Link::Refused(why) | Link::Unreachable(why) => Some(why.clone()),
            Link::Unknown | Link::Connected => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u128> = (0..6).map(|_| b.wait_with(1.0).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.wait_with(0.0), Duration::from_millis(50), "half the base");
    }

    #[test]
    fn jitter_stays_within_half_and_whole_step() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        for _ in 0..100 {
            let wait = b.wait();
            assert!(wait >= Duration::from_millis(500) && wait <= Duration::from_secs(1));
        }
    }

    #[test]
    fn many_retries_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..10_000 {
            assert!(b.wait_with(1.0) <= Duration::from_secs(30));
        }
    }

    #[test]
    fn first_answer_is_a_transition_then_quiet() {
        let mut link = Link::Unknown;
        assert_eq!(
            link.observe(Outcome::Answered),
            Some(Transition::Connected { was_down: false })
        );
        assert_eq!(link.observe(Outcome::Answered), None);
        assert!(link.reachable());
    }

    #[test]
    fn an_outage_is_one_line_down_and_one_line_up() {
        let mut link = Link::Connected;
        let down = link.observe(Outcome::Unreachable("connection refused".into()));
        assert_eq!(
            down,
            Some(Transition::Unreachable("connection refused".into()))
        );
        for _ in 0..50 {
            assert_eq!(link.observe(Outcome::Unreachable("timed out".into())), None);
        }
        assert!(!link.reachable());
        assert_eq!(link.last_error().as_deref(), Some("timed out"));
        assert_eq!(
            link.observe(Outcome::Answered),
            Some(Transition::Connected { was_down: true })
        );
        assert_eq!(link.last_error(), None);
    }

    #[test]
    fn refusals_are_reachable_and_logged_once_per_reason() {
        let mut link = Link::Connected;
        let why = "forbidden: update leases".to_owned();
        assert_eq!(
            link.observe(Outcome::Refused(why.clone())),
            Some(Transition::Refused(why.clone()))
        );
        assert_eq!(link.observe(Outcome::Refused(why.clone())), None);
        assert!(link.reachable());
        assert!(
            link.observe(Outcome::Refused("forbidden: patch nodes".into()))
                .is_some()
        );
    }
}
