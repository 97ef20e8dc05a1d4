//! Time as the simulator shows it: RFC 3339 timestamps for object metadata and a time scale that
//! lets simulated kubelets run long jobs faster than real time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`, the form Kubernetes uses for
/// `metav1.Time`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format_secs(secs, None)
}

/// The same with microseconds, the form of `metav1.MicroTime` (`eventTime`, lease renew times).
pub fn rfc3339_micros(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    format_secs(d.as_secs(), Some(d.subsec_micros()))
}

pub fn now() -> String {
    rfc3339(SystemTime::now())
}

pub fn now_micros() -> String {
    rfc3339_micros(SystemTime::now())
}

fn format_secs(secs: u64, micros: Option<u32>) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    match micros {
        Some(us) => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{us:06}Z"),
        None => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
    }
}

/// Howard Hinnant's days-to-civil algorithm: exact for the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// How fast simulated time runs: a scale of 60 makes a one-hour job finish in a minute.
#[derive(Debug, Clone, Copy)]
pub struct TimeScale(f64);

impl TimeScale {
    /// A scale must be a finite number above zero.
    pub fn new(scale: f64) -> Option<Self> {
        (scale.is_finite() && scale > 0.0).then_some(Self(scale))
    }

    /// The real duration that `simulated` seconds of cluster time take.
    pub fn real(self, simulated: Duration) -> Duration {
        simulated.div_f64(self.0)
    }
}

impl Default for TimeScale {
    fn default() -> Self {
        Self(1.0)
    }
}

/// A random lowercase hex string of `len` characters, for uids and generated names.
pub fn random_hex(len: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// A version-4 style UUID string.
pub fn uuid() -> String {
    let h = random_hex(32);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The five-character suffix `generateName` appends, from the alphabet the API server uses
/// (consonants and digits without look-alikes).
pub fn name_suffix() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_hours(264_384)),
            "2000-02-29T00:00:00Z"
        );
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_000_123);
        assert_eq!(rfc3339_micros(t), "2023-11-14T22:13:20.000123Z");
    }

    #[test]
    fn time_scale_divides_durations() {
        let s = TimeScale::new(10.0).unwrap();
        assert_eq!(s.real(Duration::from_mins(1)), Duration::from_secs(6));
        assert!(TimeScale::new(0.0).is_none());
        assert!(TimeScale::new(f64::NAN).is_none());
    }
}

/// Parses the `YYYY-MM-DDTHH:MM:SS[.frac]Z` timestamps this server writes into seconds since
/// the epoch; `None` for anything else.
#[allow(clippy::many_single_char_names)]
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// `kubectl`'s short age form (`45s`, `3m20s`, `5h`, `2d3h`), as the server's table printer
/// writes it.
pub fn human_duration(secs: u64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86_400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        if secs.is_multiple_of(60) {
            format!("{m}m")
        } else {
            format!("{m}m{}s", secs % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 192 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 730 {
        format!("{d}d")
    } else {
        format!("{}y{}d", d / 365, d % 365)
    }
}

/// The age of an object created at `timestamp`, or `<unknown>`.
pub fn age(timestamp: Option<&str>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match timestamp.and_then(parse_rfc3339) {
        Some(t) => human_duration(now.saturating_sub(t)),
        None => "<unknown>".into(),
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn parse_inverts_format() {
        for secs in [0, 951_782_400, 1_700_000_000, 4_102_444_799] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(secs));
            assert_eq!(parse_rfc3339(&rfc3339_micros(t)), Some(secs));
        }
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn human_durations_match_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3600 * 5), "5h");
        assert_eq!(human_duration(86_400 * 2 + 3600 * 3), "2d3h");
    }
}
