//! Helpers shared by the end-to-end tests: where the built binaries are, an agent running in a
//! temporary directory, and fake GPUs described in a JSON file.

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace's target directory for the profile the tests were built with.
pub fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let base =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    base.join(profile)
}

/// Builds agentd, agentctl and the fake NVML library once per test run.
pub fn build_binaries() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(&root)
            .args(["build", "-p", "agentd", "-p", "agentctl", "-p", "fake-nvml"]);
        no_test_env(&mut cmd);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        target_dir()
    })
}

/// Leaves out of a cargo command the variables `cargo test` sets for the package under test
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, ...): `ring`'s build script reruns when they
/// change, so a build that saw them would rebuild `ring` and all that depends on it, and the
/// next `cargo test` would rebuild them back.
pub fn no_test_env(cmd: &mut Command) {
    const SET_FOR_THE_PACKAGE: [&str; 7] = [
        "CARGO_MANIFEST_",
        "CARGO_PKG_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str()
            && SET_FOR_THE_PACKAGE.iter().any(|p| name.starts_with(p))
        {
            cmd.env_remove(name);
        }
    }
}

pub fn agentd_bin() -> PathBuf {
    build_binaries().join("agentd")
}

pub fn agentctl_bin() -> PathBuf {
    build_binaries().join("agentctl")
}

pub fn fake_nvml_lib() -> PathBuf {
    build_binaries().join("libfake_nvml.so")
}

/// A TCP port on 127.0.0.1 that was free a moment ago, for a listener the test gives the agent.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fake GPU in the fake NVML library's JSON format.
pub fn fake_gpu(index: u32) -> serde_json::Value {
    serde_json::json!({
        "name": "NVIDIA H200",
        "uuid": format!("GPU-00000000-0000-0000-0000-{index:012}"),
        "pci_bus_id": format!("00000000:{:02X}:00.0", 0x19 + index),
        "memory_total_bytes": 150_754_820_096_u64,
        "memory_used_bytes": 1_048_576 * u64::from(index),
        "utilization_gpu": 10 * index,
        "utilization_memory": 5 * index,
        "temperature_c": 30 + index,
        "power_usage_mw": 72_000 + 1000 * index,
        "power_limit_mw": 700_000,
        "xid_events": [],
        "lost": false
    })
}

/// Writes a fake NVML configuration with `gpus` GPUs.
pub fn write_fake_gpus(path: &Path, gpus: &[serde_json::Value]) {
    let config = serde_json::json!({
        "driver_version": "550.54.15",
        "cuda_version": 12040,
        "gpus": gpus,
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    // Renamed into place so the library never reads a half-written file.
    std::fs::rename(&tmp, path).unwrap();
}

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Fake GPUs; `None` starts the agent with no NVML library at all.
    pub gpus: Option<Vec<serde_json::Value>>,
    /// Extra TOML appended to the config file.
    pub config: String,
    pub env: Vec<(String, String)>,
    /// The state directory; a fresh one in the agent's temporary directory if `None`.
    pub state_dir: Option<PathBuf>,
    /// The agent's executable; the built one if `None`.
    pub binary: Option<PathBuf>,
}

/// An agent running in its own temporary directory; killed when dropped.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    pub gpu_config: PathBuf,
    pub options: AgentOptions,
    child: Option<Child>,
}

impl Agent {
    pub fn start(options: AgentOptions) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/agentd.sock");
        let state_dir = options
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let config_path = dir.path().join("agentd.toml");
        let gpu_config = dir.path().join("gpus.json");
        let mut agent = Agent {
            dir,
            socket,
            state_dir,
            config_path,
            gpu_config,
            options,
            child: None,
        };
        if let Some(gpus) = &agent.options.gpus {
            write_fake_gpus(&agent.gpu_config, gpus);
        }
        std::fs::write(
            &agent.config_path,
            format!("metrics_addr = \"off\"\n{}", agent.options.config),
        )
        .unwrap();
        agent.spawn();
        agent
    }

    /// Starts (or starts again) the agent process and waits until it answers /readyz.
    pub fn spawn(&mut self) {
        let mut cmd = Command::new(self.options.binary.clone().unwrap_or_else(agentd_bin));
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .env_remove("AGENTD_SOCKET")
            .env("AGENTD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("agentd.log")).unwrap());
        match &self.options.gpus {
            Some(_) => {
                cmd.env("AGENTD_NVML_LIBRARY", fake_nvml_lib())
                    .env("FAKE_NVML_CONFIG", &self.gpu_config);
            }
            None => {
                cmd.env(
                    "AGENTD_NVML_LIBRARY",
                    self.dir.path().join("no-such-libnvidia-ml.so"),
                );
            }
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("agentd starts"));
        self.wait_ready(Duration::from_secs(30));
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "agentd exited with {status} before it was ready:\n{}",
                    self.log()
                );
            }
            let out = self.ctl(&["status", "-o", "json"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agentd not ready in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agentd.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Runs agentctl against this agent.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(agentctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("agentctl runs")
    }

    /// Runs agentctl against this agent, feeding `stdin`.
    pub fn ctl_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write as _;
        let mut child = Command::new(agentctl_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("agentctl runs");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(stdin.as_bytes())
            .expect("agentctl reads its input");
        child.wait_with_output().expect("agentctl runs")
    }

    /// Runs agentctl and parses its JSON output; panics with stderr if it failed.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ctl(&all);
        assert!(
            out.status.success(),
            "agentctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).expect("agentctl prints JSON")
    }

    /// Sends a signal to the agent and waits for it to exit; returns its exit status.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(&pid)
            .status()
            .unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agentd did not exit in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `check` holds for the output of `agentctl args -o json`.
    pub fn wait_for(
        &self,
        args: &[&str],
        timeout: Duration,
        mut check: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.ctl_json(args);
            if check(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "condition not met in {timeout:?}; last value:\n{}\nlog:\n{}",
                serde_json::to_string_pretty(&value).unwrap(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Replicas outlive the agent under their supervisors (`agentd-shim DIR`); a test's
        // end takes them too: first each replica's process group (recorded in its run
        // directory), then the supervisors.
        let runs = std::fs::read_dir(self.state_dir.join("replicas"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|job| {
                std::fs::read_dir(job.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            });
        for run in runs {
            let record = std::fs::read(run.path().join("shim.json")).unwrap_or_default();
            if let Ok(record) = serde_json::from_slice::<serde_json::Value>(&record)
                && let Some(pid) = record["pid"].as_u64()
            {
                let _ = Command::new("kill")
                    .args(["-9", "--", &format!("-{pid}")])
                    .status();
            }
        }
        let mine = self.state_dir.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            // `agentd-shim DIR`, or `agentd shim DIR` where the small binary is missing.
            let dir = if args.get(1) == Some(&&b"shim"[..]) {
                args.get(2)
            } else if args.first().is_some_and(|a| a.ends_with(b"agentd-shim")) {
                args.get(1)
            } else {
                None
            };
            if dir.is_some_and(|dir| dir.starts_with(mine.as_bytes())) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}
