//! The manifests in packaging/kubernetes/: `kubectl apply` works against kube-sim with HTTPS,
//! tokens and RBAC on, and each ServiceAccount's token can do what its role allows and nothing
//! more, as `kubectl auth can-i` answers.

use std::path::PathBuf;

use crate::kubectl::{kubectl, kubectl_available, kubectl_stdin};

fn manifests() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../packaging/kubernetes")
}

const NS: &str = "agentd-system";

/// (verb, resource, extra args, allowed)
type Check = (&'static str, &'static str, &'static [&'static str], bool);

const NODE: &[Check] = &[
    ("create", "leases.coordination.k8s.io", &["-n", NS], true),
    ("update", "leases.coordination.k8s.io", &["-n", NS], true),
    ("get", "leases.coordination.k8s.io", &["-n", NS], true),
    ("watch", "agentnodes.agentd.io", &["-n", NS], true),
    ("create", "agentnodes.agentd.io", &["-n", NS], true),
    ("update", "agentnodes.agentd.io", &["-n", NS], true),
    (
        "patch",
        "agentnodes.agentd.io",
        &["-n", NS, "--subresource", "status"],
        true,
    ),
    ("create", "trainingjobs.agentd.io", &["-n", NS], true),
    ("get", "trainingjobs.agentd.io", &["-n", NS], true),
    ("watch", "trainingjobs.agentd.io", &["-n", NS], true),
    ("delete", "trainingjobs.agentd.io", &["-n", NS], true),
    // Nothing outside its namespace, nothing cluster-wide, nothing the leader does.
    ("delete", "leases.coordination.k8s.io", &["-n", NS], false),
    (
        "create",
        "leases.coordination.k8s.io",
        &["-n", "kube-node-lease"],
        false,
    ),
    (
        "watch",
        "leases.coordination.k8s.io",
        &["-n", "kube-node-lease"],
        false,
    ),
    ("create", "agentnodes.agentd.io", &["-n", "default"], false),
    (
        "update",
        "trainingjobs.agentd.io",
        &["-n", NS, "--subresource", "status"],
        false,
    ),
    ("list", "nodes", &[], false),
    ("patch", "nodes", &[], false),
    ("create", "pods", &["-n", NS], false),
    ("get", "secrets", &["-n", NS], false),
    // The queue ConfigMap, and no other.
    ("get", "configmaps/agentd-queues", &["-n", NS], true),
    ("watch", "configmaps/agentd-queues", &["-n", NS], true),
    ("get", "configmaps/other", &["-n", NS], false),
    ("list", "configmaps", &["-n", NS], false),
    ("get", "configmaps/agentd-queues", &["-n", "default"], false),
    (
        "create",
        "rolebindings.rbac.authorization.k8s.io",
        &["-n", NS],
        false,
    ),
];

const LEADER: &[Check] = &[
    ("patch", "nodes", &[], true),
    ("list", "nodes", &[], true),
    ("watch", "nodes", &[], true),
    ("create", "pods", &["-n", "default"], true),
    (
        "create",
        "pods",
        &["-n", "default", "--subresource", "binding"],
        true,
    ),
    ("delete", "pods", &["-n", "default"], true),
    ("create", "services", &["-n", "default"], true),
    ("watch", "events.events.k8s.io", &["-n", "default"], true),
    (
        "update",
        "trainingjobs.agentd.io",
        &["-n", "default", "--subresource", "status"],
        true,
    ),
    // Its jobs are kept in TrainingJobs, in whatever namespace they name.
    ("create", "trainingjobs.agentd.io", &["-n", "default"], true),
    ("delete", "trainingjobs.agentd.io", &["-n", "default"], true),
    ("list", "agentnodes.agentd.io", &["-n", NS], true),
    // The election's Lease.
    (
        "get",
        "leases.coordination.k8s.io/agentd-leader",
        &["-n", NS],
        true,
    ),
    (
        "update",
        "leases.coordination.k8s.io/agentd-leader",
        &["-n", NS],
        true,
    ),
    ("create", "leases.coordination.k8s.io", &["-n", NS], true),
    // Also a node agent.
    ("update", "leases.coordination.k8s.io", &["-n", NS], true),
    (
        "patch",
        "agentnodes.agentd.io",
        &["-n", NS, "--subresource", "status"],
        true,
    ),
    // The kubelets' Leases, to tell a lost node.
    (
        "watch",
        "leases.coordination.k8s.io",
        &["-n", "kube-node-lease"],
        true,
    ),
    (
        "list",
        "leases.coordination.k8s.io",
        &["-n", "kube-node-lease"],
        true,
    ),
    // Not more.
    (
        "update",
        "leases.coordination.k8s.io",
        &["-n", "kube-node-lease"],
        false,
    ),
    ("delete", "nodes", &[], false),
    ("create", "nodes", &[], false),
    ("update", "nodes", &["--subresource", "status"], false),
    ("get", "secrets", &["-n", "default"], false),
    (
        "update",
        "pods",
        &["-n", "default", "--subresource", "status"],
        false,
    ),
    (
        "create",
        "leases.coordination.k8s.io",
        &["-n", "kube-node-lease"],
        false,
    ),
    (
        "delete",
        "leases.coordination.k8s.io/agentd-leader",
        &["-n", NS],
        false,
    ),
    (
        "update",
        "leases.coordination.k8s.io/agentd-leader",
        &["-n", "default"],
        false,
    ),
    (
        "create",
        "clusterrolebindings.rbac.authorization.k8s.io",
        &[],
        false,
    ),
    ("delete", "namespaces", &[], false),
];

async fn check(kubeconfig: &std::path::Path, who: &str, checks: &[Check]) {
    let mut wrong = Vec::new();
    for (verb, resource, extra, want) in checks {
        let mut args = vec!["auth", "can-i", verb, resource];
        args.extend_from_slice(extra);
        let (ok, out, err) = kubectl(kubeconfig, &args).await;
        let answer = out.trim();
        if answer != if *want { "yes" } else { "no" } || ok != *want {
            wrong.push(format!(
                "{who}: can-i {args:?} -> {answer:?} {err}",
                args = &args[2..]
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

const EXAMPLES: &str = r"
apiVersion: agentd.io/v1alpha1
kind: TrainingJob
metadata: {name: mnist, namespace: agentd-system}
spec:
  queue: fast
  replicaSpecs:
    Worker:
      replicas: 2
      restartPolicy: ExitCode
      template:
        spec:
          containers: [{name: tensorflow, image: tensorflow/tensorflow:latest}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_of_the_manifests_and_each_role_can_do_what_it_allows_and_no_more() {
    assert!(
        kubectl_available(),
        "kubectl is not installed: run tests/kube-sim/ci-deps.sh"
    );
    let sim = crate::auth::start_secure(kube_sim::SimConfig::default()).await;
    let admin = sim.kubeconfig();
    let dir = manifests().display().to_string();
    let (ok, out, err) = kubectl(&admin, &["apply", "-f", &dir]).await;
    assert!(ok, "{out}{err}");
    for want in [
        "namespace/agentd-system created",
        "customresourcedefinition.apiextensions.k8s.io/agentnodes.agentd.io created",
        "customresourcedefinition.apiextensions.k8s.io/trainingjobs.agentd.io created",
        "serviceaccount/agentd-node created",
        "serviceaccount/agentd-leader created",
        "role.rbac.authorization.k8s.io/agentd-node created",
        "role.rbac.authorization.k8s.io/agentd-leader created",
        "clusterrole.rbac.authorization.k8s.io/agentd-leader created",
        "rolebinding.rbac.authorization.k8s.io/agentd-node created",
        "rolebinding.rbac.authorization.k8s.io/agentd-leader created",
        "clusterrolebinding.rbac.authorization.k8s.io/agentd-leader created",
    ] {
        assert!(
            out.lines().any(|l| l == want),
            "missing {want:?} in:\n{out}"
        );
    }
    // Applying again changes nothing.
    let (ok, out, err) = kubectl(&admin, &["apply", "-f", &dir]).await;
    assert!(ok, "{out}{err}");
    assert!(out.lines().all(|l| l.ends_with(" unchanged")), "{out}");

    let node = sim.handle.service_account_token(NS, "agentd-node").unwrap();
    let leader = sim
        .handle
        .service_account_token(NS, "agentd-leader")
        .unwrap();
    let node_kc = crate::auth::kubeconfig_for(&sim, "node", &node.token);
    let leader_kc = crate::auth::kubeconfig_for(&sim, "leader", &leader.token);
    check(&node_kc, "agentd-node", NODE).await;
    check(&leader_kc, "agentd-leader", LEADER).await;

    // The node's token really creates a TrainingJob, and the printer columns show it.
    let (ok, out, err) = kubectl_stdin(&node_kc, &["apply", "-f", "-"], Some(EXAMPLES)).await;
    assert!(ok, "{out}{err}");
    let (ok, out, err) = kubectl(&node_kc, &["get", "tj", "-n", NS]).await;
    assert!(ok, "{err}");
    let header: Vec<&str> = out
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "STATE", "REASON", "GPUS", "AGE"], "{out}");
    assert!(
        out.lines().nth(1).is_some_and(|l| l.starts_with("mnist ")),
        "{out}"
    );
    // ... and is refused outside its rights, with the server's message.
    let (ok, _, err) = kubectl(&node_kc, &["get", "nodes"]).await;
    assert!(!ok);
    assert!(err.contains("User \"system:serviceaccount:agentd-system:agentd-node\" cannot list resource \"nodes\""), "{err}");
    let audit = crate::auth::audit_lines(&sim);
    assert!(audit.iter().any(
        |l| l["user"] == "system:serviceaccount:agentd-system:agentd-node"
            && l["verb"] == "list"
            && l["resource"] == "nodes"
            && l["code"] == 403
    ));
}
