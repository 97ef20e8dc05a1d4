//! Fidelity with `kubectl`: each step asserts what kubectl printed.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common;

pub fn gang_crd() -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gangs.agentd.io"},
        "spec": {"group": "agentd.io", "scope": "Namespaced",
            "names": {"plural": "gangs", "singular": "gang", "kind": "Gang", "shortNames": ["gg"]},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"}]}]}})
}

/// Whether kubectl is here; `ci-deps.sh` installs it (Debian `kubernetes-client`).
pub fn kubectl_available() -> bool {
    std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub async fn kubectl(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    kubectl_stdin(kubeconfig, args, None).await
}

pub async fn kubectl_stdin(
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped());
    cmd.env("HOME", kubeconfig.parent().expect("dir"));
    let mut child = cmd.spawn().expect("kubectl runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        tokio::io::AsyncWriteExt::write_all(&mut input, text.as_bytes())
            .await
            .expect("stdin written");
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_mins(1), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish in 60s"))
        .expect("kubectl output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const APP: &str = r"
apiVersion: v1
kind: Namespace
metadata:
  name: train
---
apiVersion: agentd.io/v1
kind: Gang
metadata:
  name: g1
  namespace: train
spec:
  size: 2
---
apiVersion: v1
kind: Pod
metadata:
  name: worker-0
  namespace: train
  labels: {app: train, role: worker}
  annotations: {sim.agentd.io/log: 'epoch 1 loss 0.5'}
spec:
  nodeName: node-0
  containers:
  - name: tf
    image: tensorflow/tensorflow:2.16.1
    ports: [{containerPort: 2222, name: grpc}]
---
apiVersion: v1
kind: Pod
metadata:
  name: worker-1
  namespace: train
  labels: {app: train, role: worker}
spec:
  nodeName: node-1
  containers:
  - name: tf
    image: tensorflow/tensorflow:2.16.1
---
apiVersion: v1
kind: Pod
metadata:
  name: chief
  namespace: train
  labels: {app: train, role: chief}
spec:
  nodeName: node-1
  containers:
  - name: tf
    image: tensorflow/tensorflow:2.16.1
---
apiVersion: v1
kind: Service
metadata:
  name: train-svc
  namespace: train
spec:
  selector: {app: train}
  ports: [{port: 2222, name: grpc}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_get_watch_describe_logs_delete() {
    assert!(
        kubectl_available(),
        "kubectl is not installed: run tests/kube-sim/ci-deps.sh (apt-get install -y --no-install-recommends kubernetes-client)"
    );
    let config = kube_sim::SimConfig {
        nodes: 2,
        time_scale: kube_sim::TimeScale::new(10.0).unwrap(),
        ..kube_sim::SimConfig::default()
    };
    let sim = common::start(config).await;
    let kc = sim.kubeconfig();
    let crd_file = sim.dir.path().join("crd.json");
    fs_err::write(&crd_file, gang_crd().to_string()).unwrap();
    let app_file = sim.dir.path().join("app.yaml");
    fs_err::write(&app_file, APP).unwrap();

    let (ok, out, err) = kubectl(&kc, &["apply", "-f", crd_file.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "customresourcedefinition.apiextensions.k8s.io/gangs.agentd.io created"
    );

    let (ok, out, err) = kubectl(&kc, &["apply", "-f", app_file.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "namespace/train created",
            "gang.agentd.io/g1 created",
            "pod/worker-0 created",
            "pod/worker-1 created",
            "pod/chief created",
            "service/train-svc created"
        ]
    );

    let (ok, out, err) = kubectl(&kc, &["apply", "-f", app_file.to_str().unwrap()]).await;
    assert!(ok, "{err}");
    assert!(
        out.lines().all(|l| l.ends_with(" unchanged")),
        "second apply changes nothing:\n{out}"
    );

    let (ok, out, err) = kubectl(
        &kc,
        &[
            "wait",
            "--for=condition=Ready",
            "pod/worker-0",
            "pod/worker-1",
            "-n",
            "train",
            "--timeout=30s",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("pod/worker-0 condition met"), "{out}");

    let (ok, out, err) = kubectl(&kc, &["get", "pods", "-n", "train", "-o", "wide"]).await;
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "READY",
            "STATUS",
            "RESTARTS",
            "AGE",
            "IP",
            "NODE",
            "NOMINATED",
            "NODE",
            "READINESS",
            "GATES"
        ]
    );
    let w0: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("worker-0"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        (w0[1], w0[2], w0[3], w0[6]),
        ("1/1", "Running", "0", "node-0")
    );
    assert!(w0[5].starts_with("10.244."), "{out}");

    let (ok, out, _) = kubectl(&kc, &["get", "gangs", "-n", "train"]).await;
    assert!(ok);
    let rows: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0], ["NAME", "SIZE", "PHASE"]);
    assert_eq!(rows[1][..2], ["g1", "2"]);

    let (ok, out, _) = kubectl(
        &kc,
        &["get", "pod", "worker-0", "-n", "train", "-o", "json"],
    )
    .await;
    assert!(ok);
    let pod: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(pod["spec"]["containers"][0]["ports"][0]["protocol"], "TCP");

    let (_, out, _) = kubectl(
        &kc,
        &[
            "get",
            "pods",
            "-n",
            "train",
            "-l",
            "role=worker",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["pod/worker-0", "pod/worker-1"]
    );
    let (_, out, _) = kubectl(
        &kc,
        &[
            "get",
            "pods",
            "-n",
            "train",
            "-l",
            "role in (chief),app",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(out.trim(), "pod/chief");
    let (_, out, _) = kubectl(
        &kc,
        &[
            "get",
            "pods",
            "-n",
            "train",
            "--field-selector",
            "spec.nodeName=node-1",
            "-o",
            "name",
        ],
    )
    .await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["pod/chief", "pod/worker-1"]
    );

    let (_, out, _) = kubectl(&kc, &["get", "svc", "train-svc", "-n", "train"]).await;
    assert!(
        out.contains("ClusterIP") && out.contains("2222/TCP"),
        "{out}"
    );
    let (_, out, _) = kubectl(&kc, &["get", "nodes"]).await;
    assert!(
        out.lines().nth(1).unwrap().starts_with("node-0") && out.contains("Ready"),
        "{out}"
    );

    let mut watch = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["get", "pods", "-n", "train", "--watch"])
        .env("HOME", sim.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.starts_with("NAME"), "{first}");
    // No pause needed before the create: `kubectl get -w` watches from the resourceVersion of
    // its list, so a pod created after the list is replayed to it even if the watch starts later.
    let (ok, _, err) = kubectl(
        &kc,
        &[
            "run",
            "late",
            "-n",
            "train",
            "--image=busybox:1.36",
            "--restart=Never",
            "--overrides",
            r#"{"spec":{"nodeName":"node-0"}}"#,
        ],
    )
    .await;
    assert!(ok, "{err}");
    let seen = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with("late") {
                return l;
            }
        }
        String::new()
    })
    .await
    .expect("the watch shows the new pod");
    assert!(
        seen.contains("Pending") || seen.contains("Running") || seen.contains("ContainerCreating"),
        "{seen}"
    );
    let _ = watch.kill().await;

    let (ok, out, err) = kubectl(&kc, &["describe", "pod", "worker-0", "-n", "train"]).await;
    assert!(ok, "{err}");
    for want in [
        "Name:",
        "worker-0",
        "Node:",
        "node-0/",
        "Status:",
        "Running",
        "tensorflow/tensorflow:2.16.1",
        "Events:",
        "Pulling",
        "Started",
    ] {
        assert!(out.contains(want), "describe lacks {want:?}:\n{out}");
    }

    let (ok, out, err) = kubectl(&kc, &["logs", "worker-0", "-n", "train"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().next(), Some("epoch 1 loss 0.5"));

    let (_, uid, _) = kubectl(
        &kc,
        &[
            "get",
            "gang",
            "g1",
            "-n",
            "train",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )
    .await;
    let owned = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owned", "namespace": "train",
        "ownerReferences": [{"apiVersion": "agentd.io/v1", "kind": "Gang", "name": "g1", "uid": uid, "blockOwnerDeletion": true}]}});
    let (ok, out, err) = kubectl_stdin(&kc, &["apply", "-f", "-"], Some(&owned.to_string())).await;
    assert!(ok && out.contains("configmap/owned created"), "{out}{err}");
    let (ok, out, err) = kubectl(
        &kc,
        &[
            "delete",
            "gang",
            "g1",
            "-n",
            "train",
            "--cascade=foreground",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "gang.agentd.io \"g1\" deleted");
    let (ok, _, err) = kubectl(&kc, &["get", "configmap", "owned", "-n", "train"]).await;
    assert!(!ok);
    assert!(
        err.contains("Error from server (NotFound): configmaps \"owned\" not found"),
        "{err}"
    );

    let (ok, out, err) = kubectl(&kc, &["delete", "namespace", "train"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "namespace \"train\" deleted");
    let (_, _, err) = kubectl(&kc, &["get", "namespace", "train"]).await;
    assert!(err.contains("namespaces \"train\" not found"), "{err}");
}

const READER_ROLE: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: default}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: alice-reads-pods, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}
"#;

/// kubectl over HTTPS with tokens: the admin kubeconfig works, `auth can-i` answers from RBAC
/// and a denied `get` prints the server's Forbidden message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_over_https_with_tokens_and_rbac() {
    assert!(
        kubectl_available(),
        "kubectl is not installed: run tests/kube-sim/ci-deps.sh"
    );
    let sim = crate::auth::start_secure(kube_sim::SimConfig {
        nodes: 1,
        ..kube_sim::SimConfig::default()
    })
    .await;
    let admin = sim.kubeconfig();
    let alice = crate::auth::kubeconfig_for(&sim, "alice", "alice-token");
    // kubectl prompts for a password when a kubeconfig has no credentials; a token nobody has
    // is the unauthenticated case it can run.
    let stranger = crate::auth::kubeconfig_for(&sim, "stranger", "no-such-token");

    let (ok, out, err) = kubectl(&admin, &["get", "nodes", "-o", "name"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "node/node-0");
    let (ok, _, err) = kubectl(&stranger, &["get", "nodes"]).await;
    assert!(!ok);
    assert!(
        err.contains("You must be logged in to the server (Unauthorized)"),
        "{err}"
    );

    let (ok, out, _) = kubectl(&alice, &["auth", "can-i", "list", "pods", "-n", "default"]).await;
    assert!(!ok);
    assert_eq!(out.trim(), "no");
    let (ok, _, err) = kubectl(&alice, &["get", "pods", "-n", "default"]).await;
    assert!(!ok);
    assert!(
        err.contains("Error from server (Forbidden): pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""),
        "{err}"
    );

    let (ok, out, err) = kubectl_stdin(&admin, &["apply", "-f", "-"], Some(READER_ROLE)).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("role.rbac.authorization.k8s.io/pod-reader created"),
        "{out}"
    );
    assert!(
        out.contains("rolebinding.rbac.authorization.k8s.io/alice-reads-pods created"),
        "{out}"
    );

    let (ok, out, err) = kubectl(&alice, &["auth", "can-i", "list", "pods", "-n", "default"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "yes");
    let (ok, out, _) = kubectl(
        &alice,
        &["auth", "can-i", "delete", "pods", "-n", "default"],
    )
    .await;
    assert!(!ok);
    assert_eq!(out.trim(), "no");
    let (ok, out, _) = kubectl(
        &alice,
        &["auth", "can-i", "list", "pods", "-n", "kube-system"],
    )
    .await;
    assert!(!ok);
    assert_eq!(out.trim(), "no");
    let (ok, out, err) = kubectl(&alice, &["get", "pods", "-n", "default"]).await;
    assert!(ok, "{err}");
    assert!(
        out.is_empty() && err.contains("No resources found"),
        "{out}{err}"
    );
    let (ok, _, err) = kubectl(&alice, &["get", "nodes"]).await;
    assert!(!ok);
    assert!(err.contains("Error from server (Forbidden): nodes is forbidden: User \"alice\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"), "{err}");
    // The admin may act as others (impersonation); alice may not.
    let (ok, out, err) = kubectl(
        &admin,
        &[
            "auth", "can-i", "list", "pods", "-n", "default", "--as", "alice",
        ],
    )
    .await;
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "yes");
    let (ok, out, _) = kubectl(&admin, &["auth", "can-i", "list", "nodes", "--as", "alice"]).await;
    assert!(!ok);
    assert_eq!(out.trim(), "no");
    let (ok, _, err) = kubectl(&alice, &["get", "pods", "--as", "kube-sim-admin"]).await;
    assert!(!ok);
    assert!(err.contains("users \"kube-sim-admin\" is forbidden: User \"alice\" cannot impersonate resource \"users\" in API group \"\" at the cluster scope"), "{err}");
}
