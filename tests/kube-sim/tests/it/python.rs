//! Fidelity with the official Python `kubernetes` client: list, watch, patch, logs and custom
//! objects, asserting what the script printed.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::common;

fn venv() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    );
    target.join("kube-sim-venv")
}

#[tokio::test]
async fn python_client_lists_watches_and_patches() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let venv = venv();
    let setup = Command::new(here.join("setup.sh"))
        .arg(&venv)
        .output()
        .expect("setup.sh runs");
    assert!(
        setup.status.success(),
        "installing the Python kubernetes client failed:\n{}",
        String::from_utf8_lossy(&setup.stderr)
    );

    let config = kube_sim::SimConfig {
        nodes: 1,
        time_scale: kube_sim::TimeScale::new(10.0).unwrap(),
        ..kube_sim::SimConfig::default()
    };
    let sim = common::start(config).await;
    common::post(
        &sim,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        &crate::kubectl::gang_crd(),
    )
    .await;
    common::post(&sim, "/apis/agentd.io/v1/namespaces/default/gangs", &json!({"apiVersion": "agentd.io/v1", "kind": "Gang", "metadata": {"name": "g"}, "spec": {"size": 4}})).await;

    let kubeconfig = sim.kubeconfig();
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .arg(here.join("client_check.py"))
        .arg(&kubeconfig)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client_check.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "namespaces default,kube-node-lease,kube-public,kube-system",
        "created py-0 Pending",
        "selected py-1",
        "patched py-0 image=busybox:1.37 env=A,B",
        "watch ADDED py-0",
        "watch MODIFIED py-0",
        "phase py-0 Running",
        "log py-0 hello from python",
        "gangs g size=4",
        "gang status Ready",
        "not found 404 NotFound",
        "conflict 409 Conflict",
        "deleted py-1",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{stdout}");
    }
}

/// The Python client over HTTPS with the CA and tokens from kubeconfigs kube-sim writes: the
/// admin lists nodes, a ServiceAccount without rights gets the 403 Forbidden Status.
#[tokio::test]
async fn python_client_over_https_with_tokens_and_rbac() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let venv = venv();
    let setup = Command::new(here.join("setup.sh"))
        .arg(&venv)
        .output()
        .expect("setup.sh runs");
    assert!(
        setup.status.success(),
        "installing the Python kubernetes client failed:\n{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let sim = crate::auth::start_secure(kube_sim::SimConfig {
        nodes: 2,
        ..kube_sim::SimConfig::default()
    })
    .await;
    let sa = sim.handle.service_account_token("default", "py").unwrap();
    let restricted = crate::auth::kubeconfig_for(&sim, "py", &sa.token);
    let out = tokio::process::Command::new(venv.join("bin/python"))
        .arg(here.join("auth_check.py"))
        .arg(sim.kubeconfig())
        .arg(&restricted)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "auth_check.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    for want in [
        "scheme https",
        "admin nodes node-0,node-1",
        "restricted nodes 403 Forbidden",
        "status Forbidden: nodes is forbidden: User \"system:serviceaccount:default:py\" cannot list resource \"nodes\" in API group \"\" at the cluster scope",
        "can list pods False",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{stdout}");
    }
}
