//! A server-side fault switch: for a while, every API request is answered with one error status,
//! as an overloaded or failing kube-apiserver answers (a `Status` object, and `Retry-After` on
//! 429 and 503). Tests turn it on through the control endpoint (`kube-sim fault`) or
//! [`crate::SimHandle::set_fault`]. It lives in the server because a TCP proxy in front of an
//! HTTPS server cannot answer inside the TLS session.
//!
//! It must not touch the store: a fault answers before anything is served.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The statuses a fault may answer with, and what kube-apiserver says with each.
pub const STATUSES: &[u16] = &[429, 500, 503, 504];

/// What a fault answers with and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    /// The HTTP status: one of [`STATUSES`].
    pub status: u16,
    /// How long it lasts, in milliseconds; `None` until cleared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_millis: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("fault status {0} is not one kube-sim answers with: use 429, 500, 503 or 504")]
    Status(u16),
    #[error("fault duration {0:?} is not a duration: use e.g. 10s, 500ms or 2m")]
    Duration(String),
}

impl FaultSpec {
    pub fn new(status: u16, duration: Option<Duration>) -> Result<Self, FaultError> {
        if !STATUSES.contains(&status) {
            return Err(FaultError::Status(status));
        }
        Ok(Self {
            status,
            for_millis: duration.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        })
    }

    /// The `Status` object and the `Retry-After` seconds a request gets while this fault holds.
    pub fn answer(&self) -> (Value, Option<u64>) {
        let (reason, message, retry_after) = match self.status {
            429 => (
                "TooManyRequests",
                "Too many requests, please try again later.",
                Some(1),
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
                Some(1),
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted, but may still be processing the request",
                None,
            ),
            _ => (
                "InternalError",
                "Internal error occurred: kube-sim fault",
                None,
            ),
        };
        let mut status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": self.status});
        if let Some(seconds) = retry_after {
            status["details"] = json!({"retryAfterSeconds": seconds});
        }
        (status, retry_after)
    }
}

/// Reads `10s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, FaultError> {
    let bad = || FaultError::Duration(text.to_owned());
    let t = text.trim();
    let (number, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map_or((t, ""), |at| t.split_at(at));
    let n: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?)),
        _ => Err(bad()),
    }
}

/// The switch the server consults on every request.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    current: Mutex<Option<(FaultSpec, Option<Instant>)>>,
}

impl FaultSwitch {
    /// Turns `spec` on from `now` (replacing any fault in force).
    pub fn set(&self, spec: FaultSpec, now: Instant) {
        let until = spec.for_millis.map(|ms| now + Duration::from_millis(ms));
        *self.lock() = Some((spec, until));
    }

    /// Turns the fault off; true if one was in force.
    pub fn clear(&self, now: Instant) -> bool {
        self.lock()
            .take()
            .is_some_and(|(_, until)| until.is_none_or(|u| now < u))
    }

    /// The fault in force at `now`, if any.
    pub fn active(&self, now: Instant) -> Option<FaultSpec> {
        let mut current = self.lock();
        match *current {
            Some((spec, until)) if until.is_none_or(|u| now < u) => Some(spec),
            Some(_) => {
                *current = None;
                None
            }
            None => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(FaultSpec, Option<Instant>)>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_mins(2)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "10h", "-1s", "1.5s"] {
            assert_eq!(
                parse_duration(bad),
                Err(FaultError::Duration(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_server_error_statuses_are_faults() {
        assert_eq!(FaultSpec::new(404, None), Err(FaultError::Status(404)));
        assert!(FaultSpec::new(503, None).is_ok());
    }

    #[test]
    fn a_503_is_a_status_with_retry_after_as_kube_apiserver_sends_it() {
        let (status, retry) = FaultSpec::new(503, None).unwrap().answer();
        assert_eq!(retry, Some(1));
        assert_eq!(status["code"], 503);
        assert_eq!(status["reason"], "ServiceUnavailable");
        assert_eq!(status["details"]["retryAfterSeconds"], 1);
        let (status, retry) = FaultSpec::new(500, None).unwrap().answer();
        assert_eq!((retry, &status["reason"]), (None, &json!("InternalError")));
    }

    #[test]
    fn a_fault_ends_by_itself_or_when_cleared() {
        let switch = FaultSwitch::default();
        let t0 = Instant::now();
        let spec = FaultSpec::new(503, Some(Duration::from_secs(10))).unwrap();
        switch.set(spec, t0);
        assert_eq!(switch.active(t0 + Duration::from_secs(9)), Some(spec));
        assert_eq!(switch.active(t0 + Duration::from_secs(10)), None);
        assert!(!switch.clear(t0 + Duration::from_secs(11)));
        switch.set(FaultSpec::new(429, None).unwrap(), t0);
        assert!(switch.active(t0 + Duration::from_hours(1)).is_some());
        assert!(switch.clear(t0));
        assert_eq!(switch.active(t0), None);
    }
}
