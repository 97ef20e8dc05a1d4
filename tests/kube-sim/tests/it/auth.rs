//! HTTPS, bearer tokens, RBAC, the audit log and the control endpoint, over HTTPS with the CA
//! and tokens from the kubeconfigs kube-sim writes.

use std::path::PathBuf;
use std::time::Duration;

use kube_sim::client::Endpoint;
use kube_sim::{AuthorizationMode, KubeSim, SimConfig, StaticToken};
use serde_json::{Value, json};

use crate::common::Sim;

/// A simulator with TLS, tokens (`alice`, plus the generated admin), RBAC and an audit log.
pub async fn start_secure(config: SimConfig) -> Sim {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = SimConfig {
        kubeconfig: Some(dir.path().join("kubeconfig")),
        tls: true,
        tokens: Some(vec![StaticToken::new("alice-token", "alice", &["devs"])]),
        authorization: AuthorizationMode::Rbac,
        audit_log: Some(dir.path().join("audit.log")),
        ..config
    };
    let handle = KubeSim::start(config).await.expect("simulator starts");
    Sim { handle, dir }
}

pub fn audit_lines(sim: &Sim) -> Vec<Value> {
    std::fs::read_to_string(sim.dir.path().join("audit.log"))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn endpoint(sim: &Sim, token: Option<&str>) -> Endpoint {
    Endpoint {
        server: sim.handle.url(),
        ca_pem: sim.handle.ca_pem().map(str::to_string),
        token: token.map(str::to_string),
    }
}

async fn call(e: &Endpoint, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    e.request(method, path, "application/json", &body)
        .await
        .expect("request")
}

/// A kubeconfig for `token`, written next to the simulator's.
pub fn kubeconfig_for(sim: &Sim, name: &str, token: &str) -> PathBuf {
    let path = sim.dir.path().join(format!("{name}.kubeconfig"));
    sim.handle
        .write_kubeconfig_for(&path, Some(token))
        .expect("kubeconfig written");
    path
}

#[tokio::test]
async fn https_with_the_written_ca_and_admin_token_and_401_without_a_token() {
    let sim = start_secure(SimConfig {
        nodes: 1,
        ..SimConfig::default()
    })
    .await;
    assert!(sim.handle.url().starts_with("https://127.0.0.1:"));
    let admin = Endpoint::from_kubeconfig(&sim.kubeconfig()).expect("kubeconfig reads");
    assert_eq!(admin.server, sim.handle.url());
    assert_eq!(admin.token.as_deref(), sim.handle.admin_token());
    assert!(
        admin
            .ca_pem
            .as_deref()
            .is_some_and(|p| p.contains("BEGIN CERTIFICATE"))
    );
    let (code, nodes) = call(&admin, "GET", "/api/v1/nodes", &Value::Null).await;
    assert_eq!(code, 200, "{nodes}");
    assert_eq!(nodes["items"][0]["metadata"]["name"], "node-0");

    for token in [None, Some("wrong-token")] {
        let (code, status) =
            call(&endpoint(&sim, token), "GET", "/api/v1/nodes", &Value::Null).await;
        assert_eq!(code, 401);
        assert_eq!(status["reason"], "Unauthorized");
        assert_eq!(status["kind"], "Status");
    }
    // A client that does not trust the CA cannot connect.
    let other_ca = kube_sim::tls::generate("127.0.0.1:1".parse().unwrap())
        .unwrap()
        .ca_pem;
    let untrusting = Endpoint {
        ca_pem: Some(other_ca),
        ..admin.clone()
    };
    let err = untrusting
        .request("GET", "/version", "application/json", "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // Plain HTTP to the HTTPS port gets no API answer.
    let plain = Endpoint {
        server: sim.handle.url().replace("https://", "http://"),
        ..admin
    };
    assert!(
        plain
            .request("GET", "/api/v1/nodes", "application/json", "")
            .await
            .map_or(true, |(code, _)| code != 200)
    );
}

#[tokio::test]
async fn rbac_roles_and_bindings_decide_and_denials_are_403_forbidden() {
    let sim = start_secure(SimConfig::default()).await;
    let admin = Endpoint::from_kubeconfig(&sim.kubeconfig()).unwrap();
    let alice = endpoint(&sim, Some("alice-token"));

    // Authenticated users may discover the API but nothing more.
    assert_eq!(call(&alice, "GET", "/apis", &Value::Null).await.0, 200);
    assert_eq!(call(&alice, "GET", "/version", &Value::Null).await.0, 200);
    let (code, status) = call(
        &alice,
        "GET",
        "/api/v1/namespaces/default/pods",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(
        status["message"],
        "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
    );
    assert_eq!(
        status["details"],
        json!({"name": "", "group": "", "kind": "pods"})
    );

    // A Role bound to alice's group: read pods and one named lease, in one namespace.
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "reader", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list", "watch"]},
                  {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "update", "watch", "list"],
                   "resourceNames": ["mine"]}]});
    let (code, body) = call(
        &admin,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/roles",
        &role,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "devs-read", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
        "subjects": [{"kind": "Group", "name": "devs", "apiGroup": "rbac.authorization.k8s.io"}]});
    let (code, body) = call(
        &admin,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
        &binding,
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let bad_binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "bad"}, "roleRef": {"kind": "Role", "name": "reader"}, "subjects": [{"kind": "Robot", "name": "r"}]});
    let (code, body) = call(
        &admin,
        "POST",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        &bad_binding,
    )
    .await;
    assert_eq!(code, 422, "{body}");
    let causes: Vec<&str> = body["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(causes, ["roleRef.kind", "subjects[0].kind"]);

    assert_eq!(
        call(
            &alice,
            "GET",
            "/api/v1/namespaces/default/pods",
            &Value::Null
        )
        .await
        .0,
        200
    );
    assert_eq!(
        call(
            &alice,
            "GET",
            "/api/v1/namespaces/kube-system/pods",
            &Value::Null
        )
        .await
        .0,
        403
    );
    let (code, status) = call(
        &alice,
        "DELETE",
        "/api/v1/namespaces/default/pods/x",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(
        status["message"],
        "pods \"x\" is forbidden: User \"alice\" cannot delete resource \"pods\" in API group \"\" in the namespace \"default\""
    );
    // Subresources are separate resources: pods/status is not granted.
    assert_eq!(
        call(
            &alice,
            "GET",
            "/api/v1/namespaces/default/pods/x/status",
            &Value::Null
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            &alice,
            "GET",
            "/api/v1/namespaces/default/pods/x/log",
            &Value::Null
        )
        .await
        .0,
        404
    );

    // resourceNames: the named lease only, also as a list or watch by metadata.name.
    let lease = |name: &str| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}});
    for name in ["mine", "theirs"] {
        let (code, _) = call(
            &admin,
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/default/leases",
            &lease(name),
        )
        .await;
        assert_eq!(code, 201);
    }
    let leases = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
    assert_eq!(
        call(&alice, "GET", &format!("{leases}/mine"), &Value::Null)
            .await
            .0,
        200
    );
    assert_eq!(
        call(&alice, "GET", &format!("{leases}/theirs"), &Value::Null)
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            &alice,
            "GET",
            &format!("{leases}?fieldSelector=metadata.name%3Dmine"),
            &Value::Null
        )
        .await
        .0,
        200
    );
    assert_eq!(call(&alice, "GET", leases, &Value::Null).await.0, 403);

    // A ServiceAccount's token matches ServiceAccount subjects, in the right namespace only.
    let sa = sim
        .handle
        .service_account_token("default", "bot")
        .expect("tokens are on");
    let other_sa = sim
        .handle
        .service_account_token("kube-system", "bot")
        .expect("tokens are on");
    let crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "bot-nodes"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "node-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "default"}]});
    let cr = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "node-reader"}, "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]});
    assert_eq!(
        call(
            &admin,
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            &cr
        )
        .await
        .0,
        201
    );
    assert_eq!(
        call(
            &admin,
            "POST",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            &crb
        )
        .await
        .0,
        201
    );
    assert_eq!(
        call(
            &endpoint(&sim, Some(&sa.token)),
            "GET",
            "/api/v1/nodes",
            &Value::Null
        )
        .await
        .0,
        200
    );
    let (code, status) = call(
        &endpoint(&sim, Some(&other_sa.token)),
        "GET",
        "/api/v1/nodes",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 403);
    assert_eq!(
        status["message"],
        "nodes is forbidden: User \"system:serviceaccount:kube-system:bot\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
    );

    // Access reviews answer from the same rules.
    let review = |verb: &str, ns: &str| {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"verb": verb, "resource": "pods", "namespace": ns}}})
    };
    let ssar = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";
    let (code, r) = call(&alice, "POST", ssar, &review("list", "default")).await;
    assert_eq!(
        (code, r["status"]["allowed"].clone()),
        (201, json!(true)),
        "{r}"
    );
    let (_, r) = call(&alice, "POST", ssar, &review("create", "default")).await;
    assert_eq!(r["status"]["allowed"], false);
    let sar = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": "bob", "groups": ["devs"], "resourceAttributes": {"verb": "list", "resource": "pods", "namespace": "default"}}});
    let sar_path = "/apis/authorization.k8s.io/v1/subjectaccessreviews";
    assert_eq!(
        call(&admin, "POST", sar_path, &sar).await.1["status"]["allowed"],
        true
    );
    // Only those granted subjectaccessreviews may ask about others.
    assert_eq!(call(&alice, "POST", sar_path, &sar).await.0, 403);

    // The audit log has every request, with who, what and the code.
    let lines = audit_lines(&sim);
    let denied: Vec<&Value> = lines
        .iter()
        .filter(|l| l["user"] == "alice" && l["code"] == 403)
        .collect();
    assert!(
        denied.iter().any(|l| l["verb"] == "delete"
            && l["resource"] == "pods"
            && l["name"] == "x"
            && l["namespace"] == "default"),
        "{denied:?}"
    );
    assert!(lines.iter().any(|l| l["user"] == "kube-sim-admin"
        && l["verb"] == "create"
        && l["resource"] == "roles"
        && l["code"] == 201));
    assert!(
        lines
            .iter()
            .any(|l| l["user"] == "alice" && l["verb"] == "list" && l["code"] == 200)
    );
}

#[tokio::test]
async fn audit_log_records_anonymous_401s_and_watch_verbs() {
    let sim = start_secure(SimConfig::default()).await;
    let admin = Endpoint::from_kubeconfig(&sim.kubeconfig()).unwrap();
    let (code, _) = call(
        &endpoint(&sim, None),
        "GET",
        "/api/v1/namespaces",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = call(
        &admin,
        "GET",
        "/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 200);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
    call(&admin, "POST", "/api/v1/namespaces/default/configmaps", &cm).await;
    let patch = "/api/v1/namespaces/default/configmaps/c";
    admin
        .request(
            "PATCH",
            patch,
            "application/merge-patch+json",
            "{\"data\":{\"a\":\"2\"}}",
        )
        .await
        .unwrap();
    call(&admin, "PUT", patch, &cm).await;
    call(&admin, "DELETE", patch, &Value::Null).await;
    let lines = audit_lines(&sim);
    // A create names the object it made, as kube-apiserver's audit events do.
    let verbs: Vec<(&str, &str, &str, u64)> = lines
        .iter()
        .filter(|l| l["resource"] == "configmaps" || l["user"] == "system:anonymous")
        .map(|l| {
            (
                l["user"].as_str().unwrap(),
                l["verb"].as_str().unwrap(),
                l["name"].as_str().unwrap(),
                l["code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verbs,
        [
            ("system:anonymous", "list", "", 401),
            ("kube-sim-admin", "watch", "", 200),
            ("kube-sim-admin", "create", "c", 201),
            ("kube-sim-admin", "patch", "c", 200),
            ("kube-sim-admin", "update", "c", 200),
            ("kube-sim-admin", "delete", "c", 200),
        ]
    );
}

async fn ready_status(admin: &Endpoint, node: &str) -> String {
    let (_, n) = call(admin, "GET", &format!("/api/v1/nodes/{node}"), &Value::Null).await;
    n["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

async fn wait_ready(admin: &Endpoint, node: &str, want: &str) {
    for _ in 0..600 {
        if ready_status(admin, node).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node {node} never became Ready={want}");
}

/// `kube-sim stop-node` / `restart-node` against a simulator running as its own process.
#[tokio::test]
async fn control_commands_stop_and_restart_nodes_of_a_separate_process() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "alice-token,alice,1001,\"devs\"\n").unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let bin = env!("CARGO_BIN_EXE_kube-sim");
    let mut sim = tokio::process::Command::new(bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--nodes",
            "2",
            "--time-scale",
            "100",
            "--tls",
            "--authorization-mode",
            "RBAC",
        ])
        .arg("--token-auth-file")
        .arg(&tokens)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kube-sim starts");
    let mut stdout = tokio::io::BufReader::new(sim.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_mins(1),
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
    )
    .await
    .expect("kube-sim prints its address")
    .unwrap();
    assert!(
        line.starts_with("kube-sim listening on https://127.0.0.1:"),
        "{line}"
    );
    let admin = Endpoint::from_kubeconfig(&kubeconfig).unwrap();
    wait_ready(&admin, "node-1", "True").await;

    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(bin)
            .args(&args)
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let kc = kubeconfig.display().to_string();
    let (ok, out, err) = run(vec![
        "stop-node".into(),
        "--kubeconfig".into(),
        kc.clone(),
        "node-1".into(),
    ])
    .await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "node node-1: stop done");
    wait_ready(&admin, "node-1", "Unknown").await;
    assert_eq!(ready_status(&admin, "node-0").await, "True");
    let (ok, out, err) = run(vec![
        "restart-node".into(),
        "--kubeconfig".into(),
        kc.clone(),
        "node-1".into(),
    ])
    .await;
    assert!(ok, "{out}{err}");
    wait_ready(&admin, "node-1", "True").await;

    // Unknown nodes and non-admin users are refused with the reason.
    let (ok, _, err) = run(vec![
        "stop-node".into(),
        "--kubeconfig".into(),
        kc.clone(),
        "node-9".into(),
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains("stop node-9: 404: node \"node-9\" is not a simulated node"),
        "{err}"
    );
    let alice = dir.path().join("alice.kubeconfig");
    kube_sim::write_kubeconfig_for(
        &alice,
        &admin.server,
        admin.ca_pem.as_deref(),
        Some("alice-token"),
    )
    .unwrap();
    let (ok, _, err) = run(vec![
        "stop-node".into(),
        "--kubeconfig".into(),
        alice.display().to_string(),
        "node-0".into(),
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains(
            "403: forbidden: User \"alice\" cannot post path \"/kube-sim/v1/nodes/node-0/stop\""
        ),
        "{err}"
    );
    assert_eq!(ready_status(&admin, "node-0").await, "True");
    let (ok, _, err) = run(vec![
        "stop-node".into(),
        "--kubeconfig".into(),
        dir.path().join("missing").display().to_string(),
        "node-0".into(),
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("reading the kubeconfig"), "{err}");

    // The fault switch: every API request answers 503 until cleared; only the admin may set it.
    let fault = |args: &[&str]| {
        let mut all: Vec<String> = vec!["fault".into(), "--kubeconfig".into(), kc.clone()];
        all.extend(args.iter().map(|a| (*a).to_string()));
        all
    };
    let (ok, out, err) = run(fault(&["--status", "503", "--for", "1m"])).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "every API request answers 503 for 60000 ms");
    let (code, body) = admin
        .request("GET", "/api/v1/nodes", "application/json", "")
        .await
        .unwrap();
    assert_eq!(
        (code, &body["reason"]),
        (503, &json!("ServiceUnavailable")),
        "{body}"
    );
    let (ok, _, err) = run(fault(&["--status", "404"])).await;
    assert!(!ok);
    assert!(
        err.contains("fault status 404 is not one kube-sim answers with"),
        "{err}"
    );
    let (ok, _, err) = run(vec![
        "fault".into(),
        "--kubeconfig".into(),
        alice.display().to_string(),
        "--clear".into(),
    ])
    .await;
    assert!(!ok);
    assert!(err.contains("403"), "{err}");
    let (ok, out, err) = run(fault(&["--clear"])).await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "fault cleared");
    let (code, _) = admin
        .request("GET", "/api/v1/nodes", "application/json", "")
        .await
        .unwrap();
    assert_eq!(code, 200);
    sim.kill().await.unwrap();
}

/// A fault answers every API request, authenticated first (the audit names the user), with the
/// Status and `Retry-After` an overloaded kube-apiserver sends; it ends by itself.
#[tokio::test]
async fn a_fault_answers_with_a_status_and_retry_after_until_it_ends() {
    let sim = start_secure(SimConfig {
        nodes: 1,
        ..SimConfig::default()
    })
    .await;
    let alice = endpoint(&sim, Some("alice-token"));
    sim.handle.set_fault(
        kube_sim::fault::FaultSpec::new(429, Some(Duration::from_millis(1500))).unwrap(),
    );
    let (code, body) = call(
        &alice,
        "GET",
        "/api/v1/namespaces/default/pods",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["reason"], "TooManyRequests");
    assert_eq!(body["details"]["retryAfterSeconds"], 1);
    let (code, _) = call(&endpoint(&sim, None), "GET", "/api/v1/nodes", &Value::Null).await;
    assert_eq!(code, 401, "no token is still refused first");
    let audit = audit_lines(&sim);
    assert!(
        audit
            .iter()
            .any(|l| l["user"] == "alice" && l["code"] == 429),
        "{audit:?}"
    );
    // Retry-After is a header, as clients read it.
    let raw = raw_get(&sim, "/version").await;
    assert!(
        raw.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{raw}"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (code, body) = call(
        &alice,
        "GET",
        "/api/v1/namespaces/default/pods",
        &Value::Null,
    )
    .await;
    assert_eq!(code, 403, "over, and RBAC decides again: {body}");
    assert!(!sim.handle.clear_fault(), "it had ended by itself");
}

/// The response head of one GET as the admin, over the simulator's TLS.
async fn raw_get(sim: &Sim, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = sim.handle.ca_pem().unwrap();
    let config = kube_sim::tls::client_config(ca).unwrap();
    let stream = tokio::net::TcpStream::connect(sim.handle.addr())
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1".to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .unwrap();
    let token = sim.handle.admin_token().unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}
