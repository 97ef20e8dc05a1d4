//! Runs the fuzz harnesses of `agentd::fuzz` for a while and prints, per harness, the inputs
//! tried, inputs per second, the slowest input, crashes and hangs. `bench/fuzz/run` builds and
//! runs it; exit status 1 if anything crashed or hung (the inputs are written under --out).
//!
//!     fuzz [--seconds N] [--inputs N] [--seed N] [--out DIR] [HARNESS...]

use std::time::{Duration, Instant};

use agentd::fuzz::{self, Harness};

fn main() -> std::process::ExitCode {
    let mut seconds = 60u64;
    let mut inputs = u64::MAX;
    let mut seed = 1u64;
    let mut out = std::path::PathBuf::from("target/fuzz-findings");
    let mut harnesses = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| usage(&format!("{name} needs a whole number")))
        };
        match arg.as_str() {
            "--seconds" => seconds = value("--seconds"),
            "--inputs" => inputs = value("--inputs"),
            "--seed" => seed = value("--seed"),
            "--out" => {
                out = args
                    .next()
                    .unwrap_or_else(|| usage("--out needs a directory"))
                    .into();
            }
            name => harnesses.push(Harness::from_name(name).unwrap_or_else(|| {
                usage(&format!(
                    "unknown harness {name:?}; harnesses: manifest, router, quantity"
                ))
            })),
        }
    }
    if harnesses.is_empty() {
        harnesses = Harness::ALL.to_vec();
    }
    // Caught panics are reported below, with their inputs; the default message per panic would
    // only flood the terminal.
    std::panic::set_hook(Box::new(|_| {}));
    println!(
        "| harness  | inputs tried | inputs/s | slowest input, ms | crashes | hangs (> {}s) |",
        fuzz::HANG.as_secs()
    );
    println!("|----------|--------------|----------|-------------------|---------|--------------|");
    let mut failed = false;
    for harness in harnesses {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let report = fuzz::run(harness, seed, inputs, Some(deadline));
        println!(
            "| {:<8} | {:>12} | {:>8.0} | {:>17.3} | {:>7} | {:>12} |",
            harness.name(),
            report.inputs,
            report.per_second(),
            report.slowest.as_secs_f64() * 1000.0,
            report.crashes.len(),
            report.hangs.len()
        );
        for (i, (input, message)) in report.crashes.iter().enumerate() {
            failed = true;
            save(&out, harness, "crash", i, input);
            eprintln!("{} crash {i}: {message}", harness.name());
        }
        for (i, input) in report.hangs.iter().enumerate() {
            failed = true;
            save(&out, harness, "hang", i, input);
        }
    }
    if failed {
        eprintln!("findings written under {}", out.display());
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

fn save(dir: &std::path::Path, harness: Harness, kind: &str, i: usize, input: &[u8]) {
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join(format!("{}-{kind}-{i}", harness.name())), input);
}

fn usage(message: &str) -> ! {
    eprintln!(
        "fuzz: {message}\nusage: fuzz [--seconds N] [--inputs N] [--seed N] [--out DIR] [manifest|router|quantity]..."
    );
    std::process::exit(2)
}
