//! The core's two clocks. The wall clock dates what people read (timestamps in status and
//! events); it can step (NTP, an operator). Every duration the core waits on
//! (`activeDeadlineSeconds`, `scheduleTimeoutSeconds`, restart back-off,
//! `ttlSecondsAfterFinished`) runs on the monotonic clock, which only moves forward at a steady
//! rate. The clock is injected, so that tests step either one.
//!
//! Monotonic readings mean nothing across a restart of the agent (the clock's origin is this
//! process), so the store keeps wall-clock times only. At recovery each stored start is turned
//! into a monotonic mark once, from how long ago the wall clock says it was
//! ([`Now::mono_of`]); from then on only the monotonic clock counts. A wall-clock step while
//! the agent is stopped therefore moves what is left of a duration; one while it runs does not.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::inventory::unix_now;

/// Where the core reads the time.
pub trait Clock: Send + Sync {
    /// Both clocks, read together.
    fn now(&self) -> Now;
}

/// One reading of both clocks, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Now {
    /// Seconds since the Unix epoch: for timestamps people read.
    pub wall: f64,
    /// Seconds since an arbitrary origin, never stepping: for every duration waited on.
    pub mono: f64,
}

impl Now {
    /// The monotonic mark of a stored wall-clock time, from how long ago the wall clock says
    /// it was (never in the future: a wall clock stepped back counts as no time passed).
    pub fn mono_of(&self, wall: f64) -> f64 {
        self.mono - (self.wall - wall).max(0.0)
    }

    /// The wall-clock time of a monotonic mark, as the wall clock reads now.
    pub fn wall_of(&self, mono: f64) -> f64 {
        self.wall + (mono - self.mono)
    }
}

/// The system's clocks: `SystemTime` for the wall, `Instant` for the monotonic one.
#[derive(Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Now {
        Now {
            wall: unix_now(),
            mono: self.origin.elapsed().as_secs_f64(),
        }
    }
}

/// A clock that moves only when told: `advance` moves both clocks, `step_wall` the wall clock
/// alone (an NTP step).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<Now>>);

impl ManualClock {
    pub fn new(wall: f64) -> Self {
        Self(Arc::new(Mutex::new(Now { wall, mono: 0.0 })))
    }

    pub fn advance(&self, seconds: f64) {
        let mut now = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        now.wall += seconds;
        now.mono += seconds;
    }

    pub fn step_wall(&self, seconds: f64) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .wall += seconds;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Now {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_time_becomes_a_mark_from_how_long_ago_it_was() {
        let now = Now {
            wall: 1000.0,
            mono: 5.0,
        };
        let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(near(now.mono_of(900.0), -95.0));
        // A wall clock stepped back below the stored time: no time has passed.
        assert!(near(now.mono_of(1100.0), 5.0));
        assert!(near(now.wall_of(15.0), 1010.0));
    }

    #[test]
    fn the_manual_clock_steps_the_wall_alone() {
        let clock = ManualClock::new(1000.0);
        clock.step_wall(-3600.0);
        clock.advance(2.0);
        assert_eq!(
            clock.now(),
            Now {
                wall: 1000.0 - 3600.0 + 2.0,
                mono: 2.0
            }
        );
    }
}
