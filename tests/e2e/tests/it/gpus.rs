//! Fake GPUs through the real NVML code path: inventory, health from XIDs and lost GPUs, and
//! recovery after the quiet time.

use std::time::Duration;

use e2e::{Agent, AgentOptions, fake_gpu, write_fake_gpus};

fn gpu_agent(count: u32) -> Agent {
    Agent::start(AgentOptions {
        gpus: Some((0..count).map(fake_gpu).collect()),
        config: "[inventory]\ninterval = \"200ms\"\ngpu_recovery_quiet = \"2s\"\n".into(),
        ..AgentOptions::default()
    })
}

fn healthy(status: &serde_json::Value, index: usize) -> bool {
    status["node"]["gpus"][index]["healthy"].as_bool().unwrap()
}

#[test]
fn eight_gpus_with_models_memory_and_health() {
    let agent = gpu_agent(8);
    let status = agent.ctl_json(&["status"]);
    let gpus = status["node"]["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 8);
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g["index"], i);
        assert_eq!(g["name"], "NVIDIA H200");
        assert_eq!(g["uuid"], format!("GPU-00000000-0000-0000-0000-{i:012}"));
        assert_eq!(g["memory_total_bytes"], 150_754_820_096_u64);
        assert_eq!(g["healthy"], true);
    }
    assert_eq!(status["node"]["gpu_driver"]["driver_version"], "550.54.15");
    let text = String::from_utf8(agent.ctl(&["status"]).stdout).unwrap();
    assert!(
        text.contains("GPUs     8 (8 healthy), driver 550.54.15, CUDA 12.4"),
        "{text}"
    );
    assert_eq!(text.matches("NVIDIA H200").count(), 8, "{text}");
}

#[test]
fn lost_gpu_and_xid_79_turn_unhealthy_then_recover() {
    let agent = gpu_agent(8);
    let mut gpus: Vec<_> = (0..8).map(fake_gpu).collect();
    gpus[3]["lost"] = true.into();
    gpus[5]["xid_events"] = serde_json::json!([79]);
    gpus[6]["xid_events"] = serde_json::json!([13]);
    write_fake_gpus(&agent.gpu_config, &gpus);
    // Two refresh intervals (200 ms each) and the time agentctl takes.
    let status = agent.wait_for(&["status"], Duration::from_secs(3), |s| {
        !healthy(s, 3) && !healthy(s, 5)
    });
    assert!(
        healthy(&status, 6),
        "XID 13 is the application's fault, not the GPU's"
    );
    let reason = status["node"]["gpus"][5]["health_reason"].as_str().unwrap();
    assert!(reason.contains("79"), "{reason}");
    let text = String::from_utf8(agent.ctl(&["status"]).stdout).unwrap();
    assert!(text.contains("UNHEALTHY"), "{text}");

    gpus[3]["lost"] = false.into();
    write_fake_gpus(&agent.gpu_config, &gpus);
    let recovered = agent.wait_for(&["status"], Duration::from_secs(10), |s| {
        healthy(s, 3) && healthy(s, 5)
    });
    assert_eq!(
        recovered["node"]["gpus"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["healthy"] == true)
            .count(),
        8
    );
    let events = agent.ctl_json(&["status"]);
    assert!(events["node"]["gpus"][5]["health_reason"].is_null());
}
