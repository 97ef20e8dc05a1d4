//! Kubernetes resource quantities (`500m`, `2`, `1.5Gi`, `4e9`) read exactly, as whole CPU
//! millicores, bytes and GPUs, and the resources one replica asks for.
//!
//! The arithmetic is integer only: a quantity is `digits × 10^exp10 × 1024^pow1024`, so `0.1`
//! CPU is exactly 100 millicores and never 99.999.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::ReplicaSpec;
use crate::sched::Resources;

/// The resource name of NVIDIA GPUs in pod templates.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "{0:?} is not a quantity; write a number with an optional suffix: n, u, m, k, M, G, T, P, E, \
         Ki, Mi, Gi, Ti, Pi, Ei or an exponent (e.g. 500m, 2, 1.5Gi)"
    )]
    Syntax(String),
    #[error("{0:?} is negative; resources must be 0 or more")]
    Negative(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
    #[error("{0:?} is not a whole number of GPUs; GPUs are not shared between replicas")]
    FractionalGpu(String),
}

/// A parsed quantity: `digits × 10^exp10 × 1024^pow1024`, with its sign.
#[derive(Debug, Clone, Copy)]
struct Exact {
    negative: bool,
    digits: u128,
    exp10: i32,
    pow1024: u32,
}

impl Exact {
    fn parse(text: &str) -> Result<Self, QuantityError> {
        let syntax = || QuantityError::Syntax(text.to_owned());
        let s = text.trim();
        let (negative, s) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let number_len = s
            .bytes()
            .position(|b| !(b.is_ascii_digit() || b == b'.'))
            .unwrap_or(s.len());
        let (number, suffix) = s.split_at(number_len);
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(syntax());
        }
        let mut digits: u128 = 0;
        for b in whole.bytes().chain(frac.bytes()) {
            digits = digits
                .checked_mul(10)
                .and_then(|d| d.checked_add(u128::from(b - b'0')))
                .ok_or_else(|| QuantityError::TooLarge(text.to_owned()))?;
        }
        let frac_len = i32::try_from(frac.len()).map_err(|_| syntax())?;
        let (exp10, pow1024) = match suffix {
            "" => (0, 0),
            "n" => (-9, 0),
            "u" => (-6, 0),
            "m" => (-3, 0),
            "k" => (3, 0),
            "M" => (6, 0),
            "G" => (9, 0),
            "T" => (12, 0),
            "P" => (15, 0),
            "E" => (18, 0),
            "Ki" => (0, 1),
            "Mi" => (0, 2),
            "Gi" => (0, 3),
            "Ti" => (0, 4),
            "Pi" => (0, 5),
            "Ei" => (0, 6),
            _ => {
                let exponent = suffix
                    .strip_prefix(['e', 'E'])
                    .filter(|e| {
                        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
                        !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
                    })
                    .ok_or_else(syntax)?;
                let exponent: i32 = exponent
                    .parse()
                    .map_err(|_| QuantityError::TooLarge(text.to_owned()))?;
                (exponent, 0)
            }
        };
        Ok(Self {
            negative,
            digits,
            // Saturating: `1.5e-2147483648` is merely tiny (it rounds up to one unit).
            exp10: exp10.saturating_sub(frac_len),
            pow1024,
        })
    }

    /// `self × unit` as `numerator / denominator`, for a non-negative quantity.
    fn scaled(self, unit: u128, text: &str) -> Result<(u128, u128), QuantityError> {
        let too_large = || QuantityError::TooLarge(text.to_owned());
        if self.negative && self.digits != 0 {
            return Err(QuantityError::Negative(text.to_owned()));
        }
        if self.digits == 0 {
            return Ok((0, 1));
        }
        let mut num = self
            .digits
            .checked_mul(unit)
            .and_then(|n| n.checked_mul(1024u128.checked_pow(self.pow1024)?))
            .ok_or_else(too_large)?;
        let mut den: u128 = 1;
        if self.exp10 >= 0 {
            num = 10u128
                .checked_pow(self.exp10.unsigned_abs())
                .and_then(|p| num.checked_mul(p))
                .ok_or_else(too_large)?;
        } else {
            // A tiny quantity (a huge negative exponent) rounds up to one unit, as Kubernetes does.
            den = 10u128
                .checked_pow(self.exp10.unsigned_abs())
                .unwrap_or(u128::MAX);
        }
        Ok((num, den))
    }

    /// `self × unit`, rounded up to a whole number as Kubernetes rounds (`0.1m` CPU is `1m`).
    fn ceil(self, unit: u128, text: &str) -> Result<u64, QuantityError> {
        let (num, den) = self.scaled(unit, text)?;
        u64::try_from(num.div_ceil(den)).map_err(|_| QuantityError::TooLarge(text.to_owned()))
    }
}

/// CPU in millicores: `"500m"` → 500, `"2"` → 2000, `"0.25"` → 250.
pub fn parse_cpu_milli(text: &str) -> Result<u64, QuantityError> {
    Exact::parse(text)?.ceil(1000, text)
}

/// Memory in bytes: `"1Gi"` → 1073741824, `"1G"` → 1000000000, `"128974848"` → 128974848.
pub fn parse_memory_bytes(text: &str) -> Result<u64, QuantityError> {
    Exact::parse(text)?.ceil(1, text)
}

/// A GPU count, which must be a whole number: `"2"` → 2, `"0.5"` is an error.
pub fn parse_gpu_count(text: &str) -> Result<u32, QuantityError> {
    let (num, den) = Exact::parse(text)?.scaled(1, text)?;
    if num % den != 0 {
        return Err(QuantityError::FractionalGpu(text.to_owned()));
    }
    u32::try_from(num / den).map_err(|_| QuantityError::TooLarge(text.to_owned()))
}

/// Checks that any other resource quantity (e.g. `ephemeral-storage`) is well formed and not
/// negative.
pub(super) fn check_quantity(text: &str) -> Result<(), QuantityError> {
    Exact::parse(text)?.scaled(1, text).map(|_| ())
}

/// What one replica of a group asks for, as the scheduler counts it.
///
/// Each resource comes from the container's limit, or its request when there is no limit, since
/// the limit is what a replica may really use. Containers add up; an init container runs alone
/// before them, so the pod needs the larger of the two (Kubernetes' rule).
pub fn replica_resources(spec: &ReplicaSpec) -> Result<Resources, QuantityError> {
    let Some(pod) = spec.template.spec.as_ref() else {
        return Ok(Resources::default());
    };
    let mut total = Resources::default();
    for c in &pod.containers {
        let r = container_resources(c)?;
        total.gpus = total.gpus.saturating_add(r.gpus);
        total.cpu_milli = total.cpu_milli.saturating_add(r.cpu_milli);
        total.memory_mib = total.memory_mib.saturating_add(r.memory_mib);
    }
    for c in pod.init_containers.iter().flatten() {
        let r = container_resources(c)?;
        total.gpus = total.gpus.max(r.gpus);
        total.cpu_milli = total.cpu_milli.max(r.cpu_milli);
        total.memory_mib = total.memory_mib.max(r.memory_mib);
    }
    Ok(total)
}

fn container_resources(c: &Container) -> Result<Resources, QuantityError> {
    let resources = c.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    let pick = |name: &str| -> Option<&str> {
        fn get<'a>(m: Option<&'a BTreeMap<String, Quantity>>, name: &str) -> Option<&'a str> {
            m?.get(name).map(|q| q.0.as_str())
        }
        get(limits, name).or_else(|| get(requests, name))
    };
    Ok(Resources {
        gpus: pick(GPU_RESOURCE).map_or(Ok(0), parse_gpu_count)?,
        cpu_milli: pick("cpu").map_or(Ok(0), parse_cpu_milli)?,
        memory_mib: pick("memory")
            .map_or(Ok(0), parse_memory_bytes)?
            .div_ceil(MIB),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quantities_are_exact_millicores() {
        for (text, milli) in [
            ("500m", 500),
            ("2", 2000),
            ("0.25", 250),
            ("1.5", 1500),
            ("0.1", 100),
            (".5", 500),
            ("1k", 1_000_000),
            ("2e3", 2_000_000),
            ("2E-3", 2),
            ("0", 0),
            ("+3", 3000),
            ("1500000u", 1500),
            ("250000000n", 250),
            // Below a millicore rounds up, as Kubernetes does.
            ("0.0001", 1),
        ] {
            assert_eq!(parse_cpu_milli(text), Ok(milli), "{text}");
        }
    }

    #[test]
    fn memory_quantities_are_exact_bytes() {
        for (text, bytes) in [
            ("1Gi", 1u64 << 30),
            ("1G", 1_000_000_000),
            ("128974848", 128_974_848),
            ("129e6", 129_000_000),
            ("129M", 129_000_000),
            ("123Mi", 123 * 1024 * 1024),
            ("1.5Gi", 3 << 29),
            ("1Ki", 1024),
            ("1Ei", 1 << 60),
        ] {
            assert_eq!(parse_memory_bytes(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn gpu_counts_must_be_whole() {
        assert_eq!(parse_gpu_count("2"), Ok(2));
        assert_eq!(parse_gpu_count("1.0"), Ok(1));
        assert_eq!(parse_gpu_count("0"), Ok(0));
        assert_eq!(
            parse_gpu_count("0.5"),
            Err(QuantityError::FractionalGpu("0.5".into()))
        );
        assert_eq!(
            parse_gpu_count("500m"),
            Err(QuantityError::FractionalGpu("500m".into()))
        );
    }

    #[test]
    fn bad_quantities_are_refused_with_the_reason() {
        for text in [
            "", "abc", "1.2.3", "1Gb", "1 Gi", "e3", "1e", "1e+", "Gi", ".",
        ] {
            assert_eq!(
                parse_memory_bytes(text),
                Err(QuantityError::Syntax(text.into())),
                "{text:?}"
            );
        }
        assert_eq!(
            parse_cpu_milli("-1"),
            Err(QuantityError::Negative("-1".into()))
        );
        assert_eq!(parse_cpu_milli("-0"), Ok(0));
        assert_eq!(
            parse_memory_bytes("100Ei"),
            Err(QuantityError::TooLarge("100Ei".into()))
        );
        assert_eq!(
            parse_memory_bytes("1e400"),
            Err(QuantityError::TooLarge("1e400".into()))
        );
        assert_eq!(
            parse_memory_bytes("99999999999999999999999999999999999999999999"),
            Err(QuantityError::TooLarge(
                "99999999999999999999999999999999999999999999".into()
            ))
        );
    }

    #[test]
    fn a_tiny_exponent_rounds_up_without_overflow() {
        assert_eq!(parse_cpu_milli("1e-400"), Ok(1));
        assert_eq!(parse_memory_bytes("1e-3"), Ok(1));
        assert_eq!(parse_cpu_milli("1.5e-2147483648"), Ok(1));
        assert_eq!(parse_memory_bytes("1.5e-2147483648"), Ok(1));
        assert!(parse_cpu_milli("1.5e2147483647").is_err());
    }
}
