//! Fidelity with kube-rs: typed `Api` calls, `watcher` and `reflector` against the simulator.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;

use crate::common;

async fn client(sim: &common::Sim) -> kube::Client {
    let kc = Kubeconfig::read_from(sim.kubeconfig()).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

fn pod(name: &str, labels: &serde_json::Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "busybox:1.36"}]}})).unwrap()
}

#[tokio::test]
async fn typed_api_crud_patch_and_errors() {
    let sim = common::start(kube_sim::SimConfig {
        nodes: 1,
        ..kube_sim::SimConfig::default()
    })
    .await;
    let client = client(&sim).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created = pods
        .create(&PostParams::default(), &pod("a", &json!({"app": "x"})))
        .await
        .unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));
    pods.create(&PostParams::default(), &pod("b", &json!({"app": "y"})))
        .await
        .unwrap();

    let listed = pods
        .list(&ListParams::default().labels("app in (x)"))
        .await
        .unwrap();
    assert_eq!(
        listed
            .items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect::<Vec<_>>(),
        ["a"]
    );

    let patched = pods
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"spec": {"containers": [{"name": "main", "image": "busybox:1.37"}]}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.spec.unwrap().containers[0].image.as_deref(),
        Some("busybox:1.37")
    );
    let patched = pods
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"k": "v"}}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.annotations.unwrap()["k"], "v");

    let mut stale = created_clone(&pods, "a").await;
    stale.metadata.resource_version = Some("2".into());
    match pods.replace("a", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (409, "Conflict")),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match pods
        .patch(
            "a",
            &PatchParams::apply("agentd"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Pod"})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (415, "UnsupportedMediaType"));
        }
        other => panic!("expected 415, got {other:?}"),
    }
    match pods.get("nope").await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound")),
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(pods.get_opt("nope").await.unwrap().is_none());

    pods.create_subresource::<_, serde_json::Value>("binding", "a", &PostParams::default(),
        &json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "a"}, "target": {"kind": "Node", "name": "node-0"}}))
        .await
        .unwrap();
    assert_eq!(
        pods.get("a")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .as_deref(),
        Some("node-0")
    );

    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes.get("node-0").await.unwrap();
    assert_eq!(n.status.unwrap().capacity.unwrap()["nvidia.com/gpu"].0, "8");

    let deleted = pods.delete("b", &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_left());
    assert!(pods.get_opt("b").await.unwrap().is_none());
}

async fn created_clone(pods: &Api<Pod>, name: &str) -> Pod {
    pods.get(name).await.unwrap()
}

#[tokio::test]
async fn watcher_and_reflector_follow_changes() {
    let sim = common::start_default().await;
    let client = client(&sim).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"w": "1"}}})).unwrap()
    };
    cms.create(&PostParams::default(), &cm("before"))
        .await
        .unwrap();

    let (reader, writer) = reflector::store::<ConfigMap>();
    let cfg = watcher::Config::default().labels("w=1");
    let rf = reflector(writer, watcher(cms.clone(), cfg.clone())).applied_objects();
    tokio::spawn(rf.for_each(|_| futures::future::ready(())));

    let mut applied = watcher(cms.clone(), cfg).applied_objects().boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), applied.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.metadata.name.as_deref(), Some("before"));

    for i in 0..20 {
        cms.create(&PostParams::default(), &cm(&format!("cm-{i}")))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    while names.len() < 20 {
        let o = tokio::time::timeout(Duration::from_secs(10), applied.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        names.push(o.metadata.name.unwrap());
    }
    assert_eq!(names[0], "cm-0");
    assert_eq!(names[19], "cm-19");

    cms.delete("cm-3", &DeleteParams::default()).await.unwrap();
    common::eventually(10, "the reflector to hold 20 objects", || async {
        let state = reader.state();
        (state.len() == 20
            && state
                .iter()
                .all(|c| c.metadata.name.as_deref() != Some("cm-3")))
        .then_some(())
    })
    .await;
}

/// kube-rs over HTTPS: the CA and a bearer token from kubeconfigs kube-sim writes, a typed
/// call that RBAC allows and one it refuses as a 403 `Forbidden` API error.
#[tokio::test]
async fn https_with_bearer_tokens_and_rbac() {
    let sim = crate::auth::start_secure(kube_sim::SimConfig {
        nodes: 1,
        ..kube_sim::SimConfig::default()
    })
    .await;
    let admin = client(&sim).await;
    let nodes: Api<Node> = Api::all(admin.clone());
    let listed = nodes.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);

    let sa = sim
        .handle
        .service_account_token("default", "reader")
        .expect("tokens are on");
    let path = crate::auth::kubeconfig_for(&sim, "reader", &sa.token);
    let kc = Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert!(config.cluster_url.to_string().starts_with("https://"));
    let reader = kube::Client::try_from(config).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(reader.clone(), "default");
    match cms.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403);
            assert_eq!(s.reason, "Forbidden");
            assert!(s.message.contains("User \"system:serviceaccount:default:reader\" cannot list resource \"configmaps\""), "{}", s.message);
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(json!({
        "metadata": {"name": "cm-reader", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "get"]}]}))
    .unwrap();
    let binding: k8s_openapi::api::rbac::v1::RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "reader-cm", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}]}))
    .unwrap();
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), "default")
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    assert!(cms.list(&ListParams::default()).await.is_ok());
    let err = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 403));
}
