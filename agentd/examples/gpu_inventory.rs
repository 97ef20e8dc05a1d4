//! Prints this machine's GPUs as agentd reads them through NVML, once, and exits.
//!
//! `gpu_inventory [--csv] [LIBRARY]`: LIBRARY (or `AGENTD_NVML_LIBRARY`) names the NVML library,
//! default `libnvidia-ml.so.1`. The default output is the JSON of the sample; `--csv` prints the
//! columns of `nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,memory.used,
//! utilization.gpu,temperature.gpu,power.draw,power.limit --format=csv,noheader,nounits`, in
//! nvidia-smi's units (MiB, %, °C, W), so `bench/gpu-check` can compare the two line by line.

use std::path::PathBuf;

use std::process::ExitCode;

use agentd::inventory::gpu::{GpuProbe, GpuSample};

fn main() -> ExitCode {
    let mut csv = false;
    let mut library = None;
    for arg in std::env::args_os().skip(1) {
        match arg.to_str() {
            Some("--csv") => csv = true,
            Some("-h" | "--help") => {
                println!("usage: gpu_inventory [--csv] [NVML_LIBRARY]");
                return ExitCode::SUCCESS;
            }
            _ => library = Some(PathBuf::from(arg)),
        }
    }
    let library = library.or_else(|| std::env::var_os("AGENTD_NVML_LIBRARY").map(PathBuf::from));
    let mut probe = match GpuProbe::open(library.as_deref()) {
        Ok(probe) => probe,
        Err(e) => {
            eprintln!("gpu_inventory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sample = probe.sample();
    if csv {
        print_csv(&sample);
    } else {
        match serde_json::to_string_pretty(&sample) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("gpu_inventory: cannot write the sample as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}

fn print_csv(sample: &GpuSample) {
    const MIB: u64 = 1024 * 1024;
    let or_na = |value: Option<String>| value.unwrap_or_else(|| "[N/A]".to_owned());
    for gpu in &sample.gpus {
        println!(
            "{}, {}, {}, {}, {}, {}, {}, {}, {}, {}",
            gpu.index,
            gpu.uuid,
            gpu.name,
            gpu.pci_bus_id,
            gpu.memory_total_bytes / MIB,
            gpu.memory_used_bytes / MIB,
            gpu.utilization_gpu_percent,
            or_na(gpu.temperature_celsius.map(|t| t.to_string())),
            or_na(gpu.power_usage_watts.map(|w| format!("{w:.2}"))),
            or_na(gpu.power_limit_watts.map(|w| format!("{w:.2}"))),
        );
    }
}
