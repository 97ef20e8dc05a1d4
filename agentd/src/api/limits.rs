//! What keeps one caller from exhausting the agent: a cap on open connections per listener,
//! read timeouts (headers, body, and the idle wait between requests on a kept-alive
//! connection), and a request rate per user. Every refusal is counted in metrics, by listener and
//! reason, so an operator sees an attack or a misbehaving client before users do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;

/// Connections one listener keeps open at most; more are closed as soon as they are accepted.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// How long a client has to send a request's headers, and how long a kept-alive connection may
/// sit idle between requests (hyper runs one timer for both).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's whole body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests per second each non-root user may make, on average.
pub const DEFAULT_REQUESTS_PER_SECOND: u32 = 50;
/// Requests a user may make in a burst above the average rate.
pub const DEFAULT_REQUEST_BURST: u32 = 200;

/// A cap on the connections a listener holds open.
#[derive(Clone)]
pub struct ConnectionCap {
    listener: &'static str,
    permits: Arc<Semaphore>,
    metrics: Option<Metrics>,
}

impl ConnectionCap {
    pub fn new(listener: &'static str, max: u32, metrics: Option<Metrics>) -> Self {
        Self {
            listener,
            permits: Arc::new(Semaphore::new(max as usize)),
            metrics,
        }
    }

    /// A permit to serve one more connection, held until it closes; `None` (and the refusal
    /// counted) when the listener is full.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok();
        if permit.is_none() {
            tracing::warn!(
                listener = self.listener,
                "connection refused: too many open connections"
            );
            self.refused("connection_limit");
        }
        permit
    }

    /// Counts a refusal on this listener.
    pub fn refused(&self, reason: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.refused(self.listener, reason);
        }
    }
}

/// A token bucket per user: `rate` requests a second on average, up to `burst` at once.
pub struct RequestRate {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RequestRate {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `user`'s bucket at `now`; false when it is empty.
    pub fn allow(&self, user: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        // Buckets that have refilled carry no information: drop them so the map stays small.
        if buckets.len() > 10_000 {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        let bucket = buckets.entry(user.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cap_refuses_until_a_connection_closes() {
        let cap = ConnectionCap::new("socket", 2, None);
        let a = cap.admit().unwrap();
        let _b = cap.admit().unwrap();
        assert!(cap.admit().is_none());
        drop(a);
        assert!(cap.admit().is_some());
    }

    #[test]
    fn rates_are_per_user_and_refill() {
        let rate = RequestRate::new(2, 3);
        let start = Instant::now();
        assert!((0..3).all(|_| rate.allow("alice", start)));
        assert!(!rate.allow("alice", start), "the burst is spent");
        assert!(rate.allow("bob", start), "bob has a bucket of his own");
        assert!(rate.allow("alice", start + Duration::from_millis(500)));
        assert!(!rate.allow("alice", start + Duration::from_millis(500)));
    }
}
