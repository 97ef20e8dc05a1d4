//! Fuzz harnesses that run on stable Rust: a small mutation fuzzer (byte flips, inserts,
//! deletions, splices between corpus entries, and tokens from a per-harness dictionary) drives
//! each input parser the agent exposes to callers. A harness fails when its target panics or when
//! one input takes longer than [`HANG`]. The bounded tests below run each harness from a fixed
//! seed and corpus; `bench/fuzz` runs them for longer and reports inputs per second.
//!
//! This module only calls the parsers; it must not change what they accept.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One input taking longer than this is a hang.
pub const HANG: Duration = Duration::from_secs(1);

/// An input parser under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Harness {
    /// `job::parse` then `job::validate_for_standalone`, on YAML and JSON manifests.
    Manifest,
    /// `api::Route::parse` on a method, path and query string.
    Router,
    /// The CPU, memory and GPU quantity parsers.
    Quantity,
}

impl Harness {
    pub const ALL: [Harness; 3] = [Harness::Manifest, Harness::Router, Harness::Quantity];

    pub fn name(self) -> &'static str {
        match self {
            Harness::Manifest => "manifest",
            Harness::Router => "router",
            Harness::Quantity => "quantity",
        }
    }

    pub fn from_name(name: &str) -> Option<Harness> {
        Self::ALL.into_iter().find(|h| h.name() == name)
    }

    /// The seed inputs: valid examples and near misses.
    pub fn corpus(self) -> Vec<Vec<u8>> {
        let texts: &[&str] = match self {
            Harness::Manifest => &[
                include_str!("../../examples/mnist-trainingjob.yaml"),
                include_str!("../../examples/mnist-tfjob.yaml"),
                "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: a}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 2\n      restartPolicy: ExitCode\n      template:\n        spec:\n          containers:\n          - name: tensorflow\n            command: [sh, -c, 'true']\n            resources: {limits: {nvidia.com/gpu: 1, cpu: 500m, memory: 1Gi}}\n",
                r#"{"apiVersion":"agentd.io/v1alpha1","kind":"TrainingJob","metadata":{"name":"j"},"spec":{"runPolicy":{"backoffLimit":3},"replicaSpecs":{"PS":{"replicas":1,"template":{"spec":{"containers":[{"name":"tensorflow","command":["x"],"env":[{"name":"A","value":"b"}]}]}}}}}}"#,
                "a: &a [*a, *a]\nb: *a\n",
                "- - - - - - - - - - []\n",
            ],
            Harness::Router => &[
                "GET /v1/status",
                "GET /v1/jobs?state=running&queue=fast&user=alice",
                "DELETE /v1/jobs/mnist",
                "GET /v1/jobs/mnist/logs?replica=worker-0&follow=true",
                "GET /v1/events?after=10&limit=100&job=mnist",
                "POST /v1/jobs",
                "GET /healthz",
                "PUT /v1/jobs/%41%zz",
            ],
            Harness::Quantity => &[
                "500m",
                "1",
                "2.5",
                "1Gi",
                "128974848",
                "129e6",
                "129M",
                "123Mi",
                "1e3",
                "0.1",
                "1Ki",
                "-1",
                "1E",
                "9223372036854775807",
                "1.5e-3",
            ],
        };
        texts.iter().map(|t| t.as_bytes().to_vec()).collect()
    }

    /// Tokens worth inserting whole: the words the parser looks for.
    fn dictionary(self) -> &'static [&'static str] {
        match self {
            Harness::Manifest => &[
                "replicas: ",
                "Worker",
                "Chief",
                "PS",
                "Evaluator",
                "nvidia.com/gpu",
                "restartPolicy",
                "backoffLimit: ",
                "-1",
                "18446744073709551616",
                "{",
                "}",
                "[",
                "]",
                "&x ",
                "*x",
                "!!binary ",
                "\"",
                "\\u0000",
                ": ",
                "\n  ",
                "1e400",
            ],
            Harness::Router => &[
                "/",
                "%",
                "%2F",
                "%00",
                "?",
                "&",
                "=",
                "+",
                "..",
                "state=",
                "limit=",
                "after=",
                "follow=",
                "-1",
                "99999999999999999999",
                "logs",
            ],
            Harness::Quantity => &[
                "m",
                "k",
                "Ki",
                "M",
                "Mi",
                "G",
                "Gi",
                "T",
                "Ti",
                "P",
                "E",
                "Ei",
                "e",
                "e-",
                ".",
                "-",
                "+",
                "9999999999999999999",
            ],
        }
    }

    /// Runs the target on one input; only a panic or a hang is a failure.
    pub fn run_one(self, input: &[u8]) {
        match self {
            Harness::Manifest => {
                if let Ok(job) = crate::job::parse(input) {
                    let _ = crate::job::validate_for_standalone(&job);
                }
            }
            Harness::Router => {
                let text = String::from_utf8_lossy(input);
                let (method, rest) = text.split_once(' ').unwrap_or(("GET", &text));
                let (path, query) = match rest.split_once('?') {
                    Some((path, query)) => (path, Some(query)),
                    None => (rest, None),
                };
                if let Ok(method) = hyper::Method::from_bytes(method.as_bytes()) {
                    let _ = crate::api::Route::parse(&method, path, query);
                }
            }
            Harness::Quantity => {
                let text = String::from_utf8_lossy(input);
                let _ = crate::job::parse_cpu_milli(&text);
                let _ = crate::job::parse_memory_bytes(&text);
                let _ = crate::job::parse_gpu_count(&text);
            }
        }
    }
}

/// What a fuzzing run found.
#[derive(Debug, Default)]
pub struct Report {
    pub inputs: u64,
    pub elapsed: Duration,
    /// The slowest input's time.
    pub slowest: Duration,
    /// Inputs that panicked, with the panic message.
    pub crashes: Vec<(Vec<u8>, String)>,
    /// Inputs that took longer than [`HANG`].
    pub hangs: Vec<Vec<u8>>,
}

impl Report {
    pub fn per_second(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Fuzzes `harness` from `seed` until `inputs` inputs have run or `deadline` passes.
pub fn run(harness: Harness, seed: u64, inputs: u64, deadline: Option<Instant>) -> Report {
    let corpus = harness.corpus();
    let dictionary = harness.dictionary();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = Report::default();
    let started = Instant::now();
    for n in 0..inputs {
        if n % 256 == 0 && deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let input = if (n as usize) < corpus.len() {
            corpus[n as usize].clone()
        } else {
            mutate(&corpus, dictionary, &mut rng)
        };
        let one = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| harness.run_one(&input)));
        let took = one.elapsed();
        report.slowest = report.slowest.max(took);
        report.inputs += 1;
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            report.crashes.push((input, message));
        } else if took > HANG {
            report.hangs.push(input);
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// One new input: a corpus entry changed by one to eight mutations.
fn mutate(corpus: &[Vec<u8>], dictionary: &[&str], rng: &mut StdRng) -> Vec<u8> {
    let mut input = corpus[rng.random_range(0..corpus.len())].clone();
    for _ in 0..rng.random_range(1..=8) {
        let at = rng.random_range(0..=input.len());
        match rng.random_range(0..6) {
            0 if !input.is_empty() => {
                let i = at.min(input.len() - 1);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 => input.insert(at, rng.random()),
            2 if !input.is_empty() => {
                let end = (at + rng.random_range(1..16)).min(input.len());
                input.drain(at.min(end)..end);
            }
            3 => {
                let token = dictionary[rng.random_range(0..dictionary.len())];
                input.splice(at..at, token.bytes());
            }
            4 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                let from = rng.random_range(0..=other.len());
                let to = (from + rng.random_range(0..64)).min(other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            _ if !input.is_empty() => {
                // Repeat a slice: deep nesting and long runs are where parsers go wrong.
                let end = (at + rng.random_range(1..8)).min(input.len());
                let start = at.min(end);
                let piece = input[start..end].to_vec();
                for _ in 0..rng.random_range(1..32) {
                    input.splice(start..start, piece.iter().copied());
                }
            }
            _ => input.push(rng.random()),
        }
        input.truncate(64 * 1024);
    }
    input
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each harness from a fixed seed: no crash, no hang. A failure prints the input, which
    /// belongs in the harness's corpus once fixed.
    fn bounded(harness: Harness, inputs: u64) {
        let report = run(harness, SEED, inputs, None);
        assert_eq!(report.inputs, inputs);
        assert!(
            report.crashes.is_empty(),
            "{} crashed on {} inputs, first {:?}: {}",
            harness.name(),
            report.crashes.len(),
            String::from_utf8_lossy(&report.crashes[0].0),
            report.crashes[0].1
        );
        assert!(
            report.hangs.is_empty(),
            "{} took over {HANG:?} on {:?}",
            harness.name(),
            String::from_utf8_lossy(&report.hangs[0])
        );
    }

    const SEED: u64 = 0x00a9_e17d;

    #[test]
    fn fuzz_manifest_parser_and_validator() {
        bounded(Harness::Manifest, 10_000);
    }

    #[test]
    fn fuzz_api_router_and_query() {
        bounded(Harness::Router, 50_000);
    }

    #[test]
    fn fuzz_quantity_parser() {
        bounded(Harness::Quantity, 50_000);
    }
}
