//! The GPU probe and GPU health through the real nvml-wrapper code path, against `fake-nvml`.
//!
//! The fake reads its GPUs from the file named by `FAKE_NVML_CONFIG`, a process-wide variable,
//! and keeps its state (XIDs delivered) per process. So each test runs its body in a child copy
//! of this test binary, started with its own config file in the environment; the parent only
//! builds the library, writes the first config and checks that the child's test passed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use agentd::inventory::gpu::{GpuError, GpuProbe, GpuSample};
use agentd_api::inventory::{EccErrors, XidCount};
use serde_json::{Value, json};

/// Set in a child: the body runs instead of spawning.
const CHILD_ENV: &str = "AGENTD_IT_GPU_CHILD";
const CONFIG_ENV: &str = "FAKE_NVML_CONFIG";
/// Overrides where the fake library is; otherwise it is built into this target directory.
const LIBRARY_ENV: &str = "FAKE_NVML_LIBRARY";

const BUS_NUMBERS: [u32; 8] = [0x19, 0x3b, 0x4c, 0x5d, 0x9b, 0xbb, 0xcb, 0xdb];

fn uuid(index: usize) -> String {
    format!("GPU-5f0e6b1c-2a3d-4e5f-8a9b-0c1d2e3f40{index:02}")
}

/// Eight H200s, each with slightly different live values so a mix-up between GPUs shows.
fn eight_gpus() -> Value {
    let gpus: Vec<Value> = (0..8usize)
        .map(|i| {
            json!({
                "name": "NVIDIA H200",
                "uuid": uuid(i),
                "pci_bus_id": format!("00000000:{:02X}:00.0", BUS_NUMBERS[i]),
                "memory_total_bytes": 150_754_820_096_u64,
                "memory_used_bytes": (i as u64) << 30,
                "utilization_gpu": i * 10,
                "utilization_memory": i * 5,
                "temperature_c": 30 + i,
                "power_usage_mw": 72_000 + i * 1000,
                "power_limit_mw": 700_000,
                "xid_events": [],
                "lost": false
            })
        })
        .collect();
    json!({"driver_version": "550.54.15", "cuda_version": 12040, "gpus": gpus})
}

/// Where `cargo build -p fake-nvml` puts the library for the profile this test was built with.
/// Building every run is a no-op when it is fresh, and never tests a stale fake.
fn fake_library() -> PathBuf {
    static LIBRARY: OnceLock<PathBuf> = OnceLock::new();
    LIBRARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os(LIBRARY_ENV) {
                return PathBuf::from(path);
            }
            // This binary is <target>/<profile>/deps/it-<hash>.
            let exe = std::env::current_exe().expect("test binary path");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>");
            let target_dir = profile_dir.parent().expect("target directory");
            let profile = profile_dir
                .file_name()
                .and_then(|n| n.to_str())
                .expect("profile");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args(["build", "--quiet", "-p", "fake-nvml", "--target-dir"])
                .arg(target_dir);
            match profile {
                "debug" => {}
                "release" => {
                    build.arg("--release");
                }
                other => {
                    build.args(["--profile", other]);
                }
            }
            let status = build.status().expect("run cargo build -p fake-nvml");
            assert!(
                status.success(),
                "cargo build -p fake-nvml failed: {status}"
            );
            let library = profile_dir.join("libfake_nvml.so");
            assert!(library.exists(), "{} was not built", library.display());
            library
        })
        .clone()
}

/// The child's view: the fake library and the config file it serves.
struct Fake {
    library: PathBuf,
    config: PathBuf,
}

impl Fake {
    /// Replaces the GPUs the fake serves, by rename so a reader never sees half a file.
    fn write(&self, config: &Value) {
        let tmp = self.config.with_extension("tmp");
        fs_err::write(&tmp, serde_json::to_vec_pretty(config).unwrap()).unwrap();
        fs_err::rename(&tmp, &self.config).unwrap();
    }

    fn open(&self) -> GpuProbe {
        GpuProbe::open(Some(&self.library)).expect("open the fake NVML")
    }
}

/// Runs `body` in a child process whose `FAKE_NVML_CONFIG` names a file holding `config`
/// (unset when `config` is `None`). `test` is this test's name, for the child to run.
fn with_fake_nvml(test: &str, config: Option<&Value>, body: impl FnOnce(&Fake)) {
    if std::env::var_os(CHILD_ENV).is_some() {
        let fake = Fake {
            library: PathBuf::from(std::env::var_os(LIBRARY_ENV).expect("library in child")),
            config: std::env::var_os(CONFIG_ENV)
                .map(PathBuf::from)
                .unwrap_or_default(),
        };
        body(&fake);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gpus.json");
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([
            &format!("gpu::{test}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env(LIBRARY_ENV, fake_library());
    match config {
        Some(config) => {
            fs_err::write(&config_path, serde_json::to_vec_pretty(config).unwrap()).unwrap();
            child.env(CONFIG_ENV, &config_path);
        }
        None => {
            child.env_remove(CONFIG_ENV);
        }
    }
    let out = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child run of {test} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

fn healthy_count(sample: &GpuSample) -> usize {
    sample.gpus.iter().filter(|g| g.healthy).count()
}

#[test]
fn eight_gpus_are_read_as_configured() {
    let mut config = eight_gpus();
    config["gpus"][2]["ecc_corrected"] = json!(7);
    config["gpus"][2]["ecc_uncorrected"] = json!(1);
    config["gpus"][2]["energy_mj"] = json!(123_456_789);
    config["gpus"][6]["temperature_c"] = Value::Null;
    // Device files need not follow NVML's order.
    config["gpus"][5]["minor_number"] = json!(9);
    with_fake_nvml("eight_gpus_are_read_as_configured", Some(&config), |fake| {
        let mut probe = fake.open();
        let sample = probe.sample();
        assert_eq!(sample.driver.driver_version, "550.54.15");
        assert_eq!(sample.driver.cuda_version, "12.4");
        assert_eq!(
            sample.driver.nvml_library,
            fake.library.display().to_string()
        );
        assert_eq!(sample.gpus.len(), 8);
        for (i, gpu) in sample.gpus.iter().enumerate() {
            assert_eq!(gpu.index as usize, i);
            assert_eq!(gpu.uuid, uuid(i));
            assert_eq!(gpu.name, "NVIDIA H200");
            assert_eq!(
                gpu.pci_bus_id,
                format!("00000000:{:02X}:00.0", BUS_NUMBERS[i])
            );
            assert_eq!(gpu.memory_total_bytes, 150_754_820_096);
            assert_eq!(gpu.minor_number, Some(if i == 5 { 9 } else { i as u32 }));
            assert_eq!(gpu.memory_used_bytes, (i as u64) << 30);
            assert_eq!(gpu.utilization_gpu_percent as usize, i * 10);
            assert_eq!(gpu.utilization_memory_percent as usize, i * 5);
            assert_eq!(gpu.power_usage_watts, Some(72.0 + i as f64));
            assert_eq!(gpu.power_limit_watts, Some(700.0));
            assert!(gpu.healthy, "GPU {i}: {:?}", gpu.health_reason);
            assert_eq!(gpu.health_reason, None);
            assert!(gpu.xid_errors.is_empty());
            if i != 2 {
                assert_eq!(gpu.ecc_errors, None, "ECC is unsupported unless configured");
                assert_eq!(gpu.energy_joules, None);
            }
        }
        assert_eq!(sample.gpus[0].temperature_celsius, Some(30));
        assert_eq!(sample.gpus[6].temperature_celsius, None);
        assert_eq!(
            sample.gpus[2].ecc_errors,
            Some(EccErrors {
                corrected: 7,
                uncorrected: 1
            })
        );
        assert_eq!(sample.gpus[2].energy_joules, Some(123_456.789));
        assert!(sample.changes.is_empty());
    });
}

#[test]
fn a_changed_config_is_seen_on_the_next_sample() {
    with_fake_nvml(
        "a_changed_config_is_seen_on_the_next_sample",
        Some(&eight_gpus()),
        |fake| {
            let mut probe = fake.open();
            assert_eq!(probe.sample().gpus[1].utilization_gpu_percent, 10);
            let mut config = eight_gpus();
            config["gpus"][1]["utilization_gpu"] = json!(97);
            config["gpus"][1]["memory_used_bytes"] = json!(80_u64 << 30);
            fake.write(&config);
            let gpu = &probe.sample().gpus[1];
            assert_eq!(gpu.utilization_gpu_percent, 97);
            assert_eq!(gpu.memory_used_bytes, 80 << 30);
        },
    );
}

#[test]
fn a_lost_gpu_is_unhealthy_and_the_others_are_still_read() {
    let test = "a_lost_gpu_is_unhealthy_and_the_others_are_still_read";
    with_fake_nvml(test, Some(&eight_gpus()), |fake| {
        let mut probe = fake.open();
        assert_eq!(healthy_count(&probe.sample()), 8);
        let mut config = eight_gpus();
        config["gpus"][3]["lost"] = json!(true);
        fake.write(&config);
        let sample = probe.sample();
        assert_eq!(sample.gpus.len(), 8);
        let lost = &sample.gpus[3];
        assert!(!lost.healthy);
        assert!(
            lost.health_reason.as_deref().unwrap().contains("lost"),
            "{lost:?}"
        );
        // What was known of it stays, so a person can tell which GPU fell off the bus.
        assert_eq!(lost.uuid, uuid(3));
        assert_eq!(lost.name, "NVIDIA H200");
        assert_eq!(lost.pci_bus_id, "00000000:5D:00.0");
        assert_eq!(healthy_count(&sample), 7);
        assert_eq!(sample.gpus[4].utilization_gpu_percent, 40);
        assert_eq!(sample.changes.len(), 1);
        assert_eq!(sample.changes[0].index, 3);
        assert!(!sample.changes[0].healthy);
        assert!(
            sample.changes[0].to_string().starts_with("GPU 3 ("),
            "{}",
            sample.changes[0]
        );
    });
}

#[test]
fn a_gpu_lost_before_the_first_sample_is_reported_by_index() {
    let mut config = eight_gpus();
    config["gpus"][7]["lost"] = json!(true);
    let test = "a_gpu_lost_before_the_first_sample_is_reported_by_index";
    with_fake_nvml(test, Some(&config), |fake| {
        let sample = fake.open().sample();
        assert_eq!(sample.gpus.len(), 8);
        assert_eq!(sample.gpus[7].index, 7);
        assert!(!sample.gpus[7].healthy);
        assert_eq!(healthy_count(&sample), 7);
    });
}

#[test]
fn xid_79_makes_a_gpu_unhealthy() {
    with_fake_nvml(
        "xid_79_makes_a_gpu_unhealthy",
        Some(&eight_gpus()),
        |fake| {
            let mut probe = fake.open();
            assert_eq!(healthy_count(&probe.sample()), 8);
            let mut config = eight_gpus();
            config["gpus"][5]["xid_events"] = json!([79]);
            fake.write(&config);
            let sample = probe.sample();
            let gpu = &sample.gpus[5];
            assert!(!gpu.healthy);
            assert_eq!(gpu.health_reason.as_deref(), Some("XID 79"));
            assert_eq!(gpu.xid_errors, vec![XidCount { xid: 79, count: 1 }]);
            assert_eq!(healthy_count(&sample), 7);
            assert_eq!(
                sample.changes[0].to_string(),
                format!("GPU 5 ({}) unhealthy: XID 79", uuid(5))
            );
            // Delivered once: the next sample counts it once still, and stays unhealthy.
            let sample = probe.sample();
            assert_eq!(
                sample.gpus[5].xid_errors,
                vec![XidCount { xid: 79, count: 1 }]
            );
            assert!(!sample.gpus[5].healthy);
            assert!(sample.changes.is_empty());
        },
    );
}

#[test]
fn xids_in_the_config_at_start_are_delivered() {
    let mut config = eight_gpus();
    config["gpus"][0]["xid_events"] = json!([48, 13]);
    with_fake_nvml(
        "xids_in_the_config_at_start_are_delivered",
        Some(&config),
        |fake| {
            let sample = fake.open().sample();
            assert!(!sample.gpus[0].healthy);
            assert_eq!(
                sample.gpus[0].xid_errors,
                vec![
                    XidCount { xid: 13, count: 1 },
                    XidCount { xid: 48, count: 1 }
                ]
            );
        },
    );
}

#[test]
fn xid_13_leaves_a_gpu_healthy() {
    with_fake_nvml("xid_13_leaves_a_gpu_healthy", Some(&eight_gpus()), |fake| {
        let mut probe = fake.open();
        let mut config = eight_gpus();
        config["gpus"][2]["xid_events"] = json!([13, 31, 43, 45, 68]);
        fake.write(&config);
        let sample = probe.sample();
        assert!(sample.gpus[2].healthy, "{:?}", sample.gpus[2].health_reason);
        assert_eq!(
            sample.gpus[2].xid_errors.len(),
            5,
            "application XIDs are still counted"
        );
        assert_eq!(healthy_count(&sample), 8);
        assert!(sample.changes.is_empty());
    });
}

#[test]
fn a_gpu_recovers_after_the_quiet_time() {
    with_fake_nvml(
        "a_gpu_recovers_after_the_quiet_time",
        Some(&eight_gpus()),
        |fake| {
            let quiet = Duration::from_secs(30);
            let mut probe = fake.open().with_recovery_quiet(quiet);
            let t0 = Instant::now();
            probe.sample_at(t0);

            // XID 79, then quiet: healthy again once it has been quiet for the whole quiet time.
            let mut config = eight_gpus();
            config["gpus"][1]["xid_events"] = json!([79]);
            fake.write(&config);
            assert!(!probe.sample_at(t0 + Duration::from_secs(10)).gpus[1].healthy);
            assert!(!probe.sample_at(t0 + Duration::from_secs(39)).gpus[1].healthy);
            let sample = probe.sample_at(t0 + Duration::from_secs(40));
            assert!(sample.gpus[1].healthy);
            assert_eq!(sample.gpus[1].health_reason, None);
            assert_eq!(sample.changes.len(), 1);
            assert!(sample.changes[0].healthy);
            assert_eq!(sample.changes[0].reason, "XID 79");

            // Lost, then readable again: the quiet time starts when it reads again.
            config["gpus"][1]["lost"] = json!(true);
            fake.write(&config);
            assert!(!probe.sample_at(t0 + Duration::from_secs(50)).gpus[1].healthy);
            assert!(!probe.sample_at(t0 + Duration::from_secs(100)).gpus[1].healthy);
            config["gpus"][1]["lost"] = json!(false);
            fake.write(&config);
            assert!(!probe.sample_at(t0 + Duration::from_secs(110)).gpus[1].healthy);
            assert!(!probe.sample_at(t0 + Duration::from_secs(139)).gpus[1].healthy);
            let sample = probe.sample_at(t0 + Duration::from_secs(140));
            assert!(sample.gpus[1].healthy);
            assert_eq!(healthy_count(&sample), 8);
        },
    );
}

#[test]
fn a_cleared_xid_list_can_fire_again() {
    with_fake_nvml(
        "a_cleared_xid_list_can_fire_again",
        Some(&eight_gpus()),
        |fake| {
            let mut probe = fake.open().with_recovery_quiet(Duration::ZERO);
            let mut config = eight_gpus();
            config["gpus"][4]["xid_events"] = json!([79]);
            fake.write(&config);
            assert!(!probe.sample().gpus[4].healthy);
            config["gpus"][4]["xid_events"] = json!([]);
            fake.write(&config);
            assert!(probe.sample().gpus[4].healthy);
            config["gpus"][4]["xid_events"] = json!([79]);
            fake.write(&config);
            let sample = probe.sample();
            assert!(!sample.gpus[4].healthy);
            assert_eq!(
                sample.gpus[4].xid_errors,
                vec![XidCount { xid: 79, count: 2 }]
            );
        },
    );
}

#[test]
fn a_broken_config_makes_known_gpus_unreadable_not_gone() {
    let test = "a_broken_config_makes_known_gpus_unreadable_not_gone";
    with_fake_nvml(test, Some(&eight_gpus()), |fake| {
        let mut probe = fake.open().with_recovery_quiet(Duration::ZERO);
        assert_eq!(healthy_count(&probe.sample()), 8);
        fs_err::write(&fake.config, "{\"driver_version\": ").unwrap();
        let sample = probe.sample();
        assert_eq!(sample.gpus.len(), 8);
        assert_eq!(healthy_count(&sample), 0);
        assert_eq!(sample.driver.driver_version, "unknown");
        let reason = sample.gpus[0].health_reason.as_deref().unwrap();
        assert!(reason.starts_with("GPU cannot be read"), "{reason}");
        fake.write(&eight_gpus());
        assert_eq!(healthy_count(&probe.sample()), 8);
    });
}

#[test]
fn no_driver_is_an_init_error_naming_the_library() {
    with_fake_nvml(
        "no_driver_is_an_init_error_naming_the_library",
        None,
        |fake| {
            let err = GpuProbe::open(Some(&fake.library)).unwrap_err();
            assert!(matches!(err, GpuError::Init { .. }), "{err:?}");
            let message = err.to_string();
            assert!(
                message.contains(&fake.library.display().to_string()),
                "{message}"
            );
            assert!(message.contains("kernel module"), "{message}");
        },
    );
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let missing = Path::new("/nonexistent/libnvidia-ml.so.1");
    let err = GpuProbe::open(Some(missing)).unwrap_err();
    assert!(matches!(err, GpuError::Load { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("/nonexistent/libnvidia-ml.so.1"),
        "{message}"
    );
    assert!(message.contains("AGENTD_NVML_LIBRARY"), "{message}");
}

#[test]
fn a_library_that_is_not_nvml_is_a_clear_error() {
    // Any shared library without NVML's functions: the fake's own build output is not one of
    // them, so use the C maths library every Linux system has.
    let err = GpuProbe::open(Some(Path::new("libm.so.6"))).unwrap_err();
    assert!(matches!(err, GpuError::NotNvml { .. }), "{err:?}");
    assert!(
        err.to_string().contains("libm.so.6 is not an NVML library"),
        "{err}"
    );
}
