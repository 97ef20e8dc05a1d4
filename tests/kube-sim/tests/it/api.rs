//! The HTTP API's semantics, checked over raw HTTP.

use serde_json::{Value, json};

use crate::common::{self, get, next_event, post, request, watch_lines};

#[tokio::test]
async fn errors_are_status_objects_with_reason_and_code() {
    let sim = common::start_default().await;
    let (code, s) = get(&sim, "/api/v1/namespaces/default/pods/missing").await;
    assert_eq!(
        (code, s["reason"].as_str(), s["code"].as_i64()),
        (404, Some("NotFound"), Some(404))
    );
    assert_eq!(s["message"], "pods \"missing\" not found");

    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
    assert_eq!(
        post(&sim, "/api/v1/namespaces/default/configmaps", &cm)
            .await
            .0,
        201
    );
    let (code, s) = post(&sim, "/api/v1/namespaces/default/configmaps", &cm).await;
    assert_eq!((code, s["reason"].as_str()), (409, Some("AlreadyExists")));

    let mut stale = cm.clone();
    stale["metadata"]["resourceVersion"] = json!("1");
    let (code, s) = request(
        &sim,
        "PUT",
        "/api/v1/namespaces/default/configmaps/c",
        "application/json",
        &stale.to_string(),
    )
    .await;
    assert_eq!((code, s["reason"].as_str()), (409, Some("Conflict")));
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("the object has been modified")
    );

    let (code, s) = post(
        &sim,
        "/api/v1/namespaces/default/pods",
        &json!({"metadata": {"name": "p"}, "spec": {}}),
    )
    .await;
    assert_eq!((code, s["reason"].as_str()), (422, Some("Invalid")));
    assert_eq!(s["details"]["causes"][0]["field"], "spec.containers");

    let (code, s) = post(
        &sim,
        "/api/v1/namespaces",
        &json!({"metadata": {"name": "bad", "labels": "x"}}),
    )
    .await;
    assert_eq!(
        (code, s["details"]["causes"][0]["field"].as_str()),
        (422, Some("metadata.labels"))
    );
    let (code, _) = post(
        &sim,
        "/api/v1/namespaces/default/services",
        &json!({"metadata": {"name": "bad"}, "spec": "x"}),
    )
    .await;
    assert_eq!(code, 422);

    let (code, s) = request(
        &sim,
        "PUT",
        "/api/v1/namespaces/default/pods",
        "application/json",
        "{}",
    )
    .await;
    assert_eq!(
        (code, s["reason"].as_str()),
        (405, Some("MethodNotAllowed"))
    );

    let (code, s) = request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/c",
        "application/apply-patch+yaml",
        "{}",
    )
    .await;
    assert_eq!(
        (code, s["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    assert!(s["message"].as_str().unwrap().contains("server-side apply"));

    let (code, _) = post(&sim, "/api/v1/namespaces/nowhere/configmaps", &cm).await;
    assert_eq!(code, 404);

    let (code, _) = request(
        &sim,
        "DELETE",
        "/api/v1/namespaces/default/configmaps/c?dryRun=All",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        get(&sim, "/api/v1/namespaces/default/configmaps/c").await.0,
        200,
        "a refused dry run deletes nothing"
    );
}

#[tokio::test]
async fn create_fills_metadata_and_generate_name() {
    let sim = common::start_default().await;
    let (code, p) = post(
        &sim,
        "/api/v1/namespaces/default/pods",
        &json!({"metadata": {"generateName": "job-"},
        "spec": {"containers": [{"name": "c", "image": "x:1"}]}}),
    )
    .await;
    assert_eq!(code, 201);
    let name = p["metadata"]["name"].as_str().unwrap();
    assert!(name.starts_with("job-") && name.len() == 9, "{name}");
    assert_eq!(p["metadata"]["uid"].as_str().unwrap().len(), 36);
    assert!(
        p["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(p["status"]["phase"], "Pending");
    let rv1: u64 = p["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, p2) = post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "x"}}),
    )
    .await;
    let rv2: u64 = p2["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv2 > rv1, "one global counter across resources");
}

#[tokio::test]
async fn list_selectors_and_pagination() {
    let sim = common::start_default().await;
    for i in 0..7 {
        let tier = if i % 2 == 0 { "a" } else { "b" };
        let cm = json!({"metadata": {"name": format!("cm-{i}"), "labels": {"tier": tier, "n": i.to_string()}}});
        post(&sim, "/api/v1/namespaces/default/configmaps", &cm).await;
    }
    let names = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, l) = get(
        &sim,
        "/api/v1/namespaces/default/configmaps?labelSelector=tier%20in%20(a),n!=0",
    )
    .await;
    assert_eq!(names(&l), ["cm-2", "cm-4", "cm-6"]);
    let (_, l) = get(
        &sim,
        "/api/v1/configmaps?fieldSelector=metadata.name%3Dcm-3",
    )
    .await;
    assert_eq!(names(&l), ["cm-3"]);
    let (code, s) = get(&sim, "/api/v1/configmaps?labelSelector=tier%20in%20a").await;
    assert_eq!((code, s["reason"].as_str()), (400, Some("BadRequest")));

    let mut seen = Vec::new();
    let mut path = "/api/v1/namespaces/default/configmaps?limit=3".to_string();
    loop {
        let (_, page) = get(&sim, &path).await;
        assert!(page["items"].as_array().unwrap().len() <= 3);
        seen.extend(names(&page));
        match page["metadata"]["continue"].as_str() {
            Some(c) => path = format!("/api/v1/namespaces/default/configmaps?limit=3&continue={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
}

#[tokio::test]
async fn watch_resumes_from_resource_version_and_expires() {
    let config = kube_sim::SimConfig {
        watch_history: 5,
        ..kube_sim::SimConfig::default()
    };
    let sim = common::start(config).await;
    let (_, first) = post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "w0"}}),
    )
    .await;
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "w1"}}),
    )
    .await;
    let mut rx = watch_lines(
        &sim,
        &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}"),
    )
    .await;
    let ev = next_event(&mut rx).await;
    assert_eq!(
        (
            ev["type"].as_str(),
            ev["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("w1"))
    );
    request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/w1",
        "application/merge-patch+json",
        r#"{"data":{"k":"v"}}"#,
    )
    .await;
    let ev = next_event(&mut rx).await;
    assert_eq!(
        (ev["type"].as_str(), ev["object"]["data"]["k"].as_str()),
        (Some("MODIFIED"), Some("v"))
    );

    for i in 2..10 {
        post(
            &sim,
            "/api/v1/namespaces/default/configmaps",
            &json!({"metadata": {"name": format!("w{i}")}}),
        )
        .await;
    }
    let mut old = watch_lines(
        &sim,
        &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}"),
    )
    .await;
    let ev = next_event(&mut old).await;
    assert_eq!(ev["type"], "ERROR");
    assert_eq!(ev["object"]["code"], 410);
    assert_eq!(ev["object"]["reason"], "Expired");
}

/// Creates ConfigMap `name` in `default`; its resourceVersion.
async fn configmap(sim: &common::Sim, name: &str) -> String {
    let (code, made) = post(
        sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": name}}),
    )
    .await;
    assert_eq!(code, 201, "{made}");
    made["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `POST /kube-sim/v1/compact` (`kube-sim compact`) compacts the history and ends every watch:
/// an open watch ends with 410 `Expired`, a resume from before it is refused the same way, and
/// a watch from the current resourceVersion goes on.
#[tokio::test]
async fn compaction_expires_open_watches_and_earlier_resource_versions() {
    let sim = common::start_default().await;
    let rv = configmap(&sim, "c0").await;
    let path =
        |rv: &str| format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}");
    let mut open = watch_lines(&sim, &path(&rv)).await;
    configmap(&sim, "c-before").await;
    assert_eq!(next_event(&mut open).await["type"], "ADDED");
    let (code, said) = post(&sim, "/kube-sim/v1/compact", &json!({})).await;
    assert_eq!(code, 200, "{said}");
    let ev = next_event(&mut open).await;
    assert_eq!(
        (&ev["type"], &ev["object"]["code"], &ev["object"]["reason"]),
        (&json!("ERROR"), &json!(410), &json!("Expired")),
        "{ev}"
    );
    let ev = next_event(&mut watch_lines(&sim, &path(&rv)).await).await;
    assert_eq!(
        (&ev["type"], &ev["object"]["code"]),
        (&json!("ERROR"), &json!(410)),
        "{ev}"
    );
    let (_, list) = get(&sim, "/api/v1/namespaces/default/configmaps").await;
    let now = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut fresh = watch_lines(&sim, &path(&now)).await;
    configmap(&sim, "c1").await;
    let ev = next_event(&mut fresh).await;
    assert_eq!(
        (&ev["type"], &ev["object"]["metadata"]["name"]),
        (&json!("ADDED"), &json!("c1"))
    );
}

#[tokio::test]
async fn filtered_watch_sees_objects_leave_the_selector_and_gets_bookmarks() {
    let sim = common::start_default().await;
    post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "f", "labels": {"keep": "yes"}}}),
    )
    .await;
    let mut rx = watch_lines(&sim, "/api/v1/namespaces/default/configmaps?watch=1&labelSelector=keep%3Dyes&allowWatchBookmarks=true").await;
    assert_eq!(next_event(&mut rx).await["type"], "ADDED");
    request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/f",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"keep":"no"}}}"#,
    )
    .await;
    assert_eq!(next_event(&mut rx).await["type"], "DELETED");
    let bm = next_event(&mut rx).await;
    assert_eq!(bm["type"], "BOOKMARK");
    assert!(
        bm["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn a_slow_watcher_is_dropped_with_410_and_writers_do_not_wait() {
    let config = kube_sim::SimConfig {
        watch_buffer: 8,
        ..kube_sim::SimConfig::default()
    };
    let sim = common::start(config).await;
    let store = sim.handle.store().clone();
    let ty = store.resource_type("", "v1", "configmaps").unwrap();
    let mut w = store
        .watch(
            &ty,
            None,
            kube_sim::store::WatchFrom::Version(store.current_rv()),
        )
        .unwrap();
    // Nothing reads the watch: if writers waited for watchers, this loop would never end.
    for i in 0..2000 {
        store
            .create(
                &ty,
                "default",
                json!({"metadata": {"name": format!("s{i}")}}),
            )
            .unwrap();
    }
    assert_eq!(
        kube_sim::store::WatchEnd::of(&w.ended),
        kube_sim::store::WatchEnd::TooSlow
    );
    let mut delivered = 0;
    while w.events.recv().await.is_some() {
        delivered += 1;
    }
    assert_eq!(
        delivered, 8,
        "the buffered prefix is delivered, then the channel closes"
    );
}

#[tokio::test]
async fn status_subresource_is_split_from_spec() {
    let sim = common::start_default().await;
    post(
        &sim,
        "/api/v1/namespaces/default/pods",
        &common::pod("s", &json!({})),
    )
    .await;
    let (_, p) = request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/pods/s",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"x":"1"}},"status":{"phase":"Running"}}"#,
    )
    .await;
    assert_eq!(
        (
            p["metadata"]["labels"]["x"].as_str(),
            p["status"]["phase"].as_str()
        ),
        (Some("1"), Some("Pending"))
    );
    let (_, p) = request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/pods/s/status",
        "application/merge-patch+json",
        r#"{"metadata":{"labels":{"x":"2"}},"status":{"phase":"Running"}}"#,
    )
    .await;
    assert_eq!(
        (
            p["metadata"]["labels"]["x"].as_str(),
            p["status"]["phase"].as_str()
        ),
        (Some("1"), Some("Running"))
    );
}

#[tokio::test]
async fn strategic_merge_patch_merges_containers_by_name() {
    let sim = common::start_default().await;
    let mut pod = common::pod("sm", &json!({}));
    pod["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "1"}]);
    post(&sim, "/api/v1/namespaces/default/pods", &pod).await;
    let (code, p) = request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/pods/sm",
        "application/strategic-merge-patch+json",
        r#"{"spec":{"containers":[{"name":"main","env":[{"name":"B","value":"2"}]}]}}"#,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(p["spec"]["containers"][0]["image"], "busybox:1.36");
    assert_eq!(
        p["spec"]["containers"][0]["env"],
        json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
    );
    let (code, _) = request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/pods/sm",
        "application/json-patch+json",
        r#"[{"op":"replace","path":"/metadata/labels/app","value":"other"}]"#,
    )
    .await;
    assert_eq!(code, 200);
    let (_, p) = get(&sim, "/api/v1/namespaces/default/pods/sm").await;
    assert_eq!(p["metadata"]["labels"]["app"], "other");
}

#[tokio::test]
async fn finalizers_hold_deletion_and_owner_references_are_collected() {
    let sim = common::start_default().await;
    let (_, owner) = post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "owner"}}),
    )
    .await;
    let uid = owner["metadata"]["uid"].as_str().unwrap();
    let oref = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid, "blockOwnerDeletion": true}]);
    post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "dep", "ownerReferences": oref}}),
    )
    .await;
    post(&sim, "/api/v1/namespaces/default/configmaps", &json!({"metadata": {"name": "held", "ownerReferences": oref, "finalizers": ["agentd.io/hold"]}})).await;

    let (code, o) = request(
        &sim,
        "DELETE",
        "/api/v1/namespaces/default/configmaps/owner",
        "application/json",
        r#"{"propagationPolicy":"Foreground"}"#,
    )
    .await;
    assert_eq!(code, 202);
    assert_eq!(o["metadata"]["finalizers"], json!(["foregroundDeletion"]));
    assert_eq!(
        get(&sim, "/api/v1/namespaces/default/configmaps/dep")
            .await
            .0,
        404
    );
    let (_, held) = get(&sim, "/api/v1/namespaces/default/configmaps/held").await;
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(
        get(&sim, "/api/v1/namespaces/default/configmaps/owner")
            .await
            .0,
        200,
        "foreground owner waits for its dependents"
    );
    request(
        &sim,
        "PATCH",
        "/api/v1/namespaces/default/configmaps/held",
        "application/merge-patch+json",
        r#"{"metadata":{"finalizers":null}}"#,
    )
    .await;
    assert_eq!(
        get(&sim, "/api/v1/namespaces/default/configmaps/held")
            .await
            .0,
        404
    );
    assert_eq!(
        get(&sim, "/api/v1/namespaces/default/configmaps/owner")
            .await
            .0,
        404
    );

    let (_, o2) = post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "o2"}}),
    )
    .await;
    let oref2 = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "o2", "uid": o2["metadata"]["uid"]}]);
    post(
        &sim,
        "/api/v1/namespaces/default/configmaps",
        &json!({"metadata": {"name": "orphan", "ownerReferences": oref2}}),
    )
    .await;
    request(
        &sim,
        "DELETE",
        "/api/v1/namespaces/default/configmaps/o2?propagationPolicy=Orphan",
        "application/json",
        "",
    )
    .await;
    let (code, orphan) = get(&sim, "/api/v1/namespaces/default/configmaps/orphan").await;
    assert_eq!(code, 200);
    assert!(
        orphan["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
}

#[tokio::test]
async fn discovery_lists_crd_types_once_created() {
    let sim = common::start_default().await;
    let (_, groups) = get(&sim, "/apis").await;
    assert!(
        groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "coordination.k8s.io")
    );
    let (_, core) = get(&sim, "/api/v1").await;
    let pods = core["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pods")
        .unwrap()
        .clone();
    assert_eq!(pods["kind"], "Pod");
    assert!(
        core["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "pods/binding")
    );
    assert_eq!(get(&sim, "/apis/agentd.io/v1").await.0, 404);
    post(
        &sim,
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        &crate::kubectl::gang_crd(),
    )
    .await;
    let (code, list) = get(&sim, "/apis/agentd.io/v1").await;
    assert_eq!(code, 200);
    assert_eq!(list["resources"][0]["name"], "gangs");
    assert_eq!(list["resources"][1]["name"], "gangs/status");
    let (code, _) = post(&sim, "/apis/agentd.io/v1/namespaces/default/gangs", &json!({"apiVersion": "agentd.io/v1", "kind": "Gang", "metadata": {"name": "g"}, "spec": {"size": 2}})).await;
    assert_eq!(code, 201);
    let (code, _) = request(
        &sim,
        "PATCH",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gangs.agentd.io",
        "application/json-patch+json",
        r#"[{"op": "add", "path": "/spec/versions/-", "value": {"name": "v2", "served": true, "storage": false}}]"#,
    )
    .await;
    assert_eq!(code, 200);
    let (code, g) = get(&sim, "/apis/agentd.io/v2/namespaces/default/gangs/g").await;
    assert_eq!(
        (code, g["apiVersion"].as_str()),
        (200, Some("agentd.io/v2")),
        "a new version is served at once"
    );
    let (code, _) = request(
        &sim,
        "DELETE",
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/gangs.agentd.io",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        get(&sim, "/apis/agentd.io/v1/namespaces/default/gangs")
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn events_are_one_collection_seen_through_two_versions() {
    let sim = common::start_default().await;
    let ev = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e1"},
        "regarding": {"kind": "Pod", "name": "p", "namespace": "default"}, "note": "gang admitted",
        "reason": "Admitted", "type": "Normal", "reportingController": "agentd.io/scheduler", "reportingInstance": "agentd-0",
        "action": "Admit", "eventTime": "2026-01-01T00:00:00.000000Z"});
    let (code, created) = post(
        &sim,
        "/apis/events.k8s.io/v1/namespaces/default/events",
        &ev,
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["note"], "gang admitted");
    let (_, core) = get(&sim, "/api/v1/namespaces/default/events/e1").await;
    assert_eq!(
        (
            core["message"].as_str(),
            core["involvedObject"]["name"].as_str()
        ),
        (Some("gang admitted"), Some("p"))
    );
    let (_, listed) = get(
        &sim,
        "/apis/events.k8s.io/v1/namespaces/default/events?fieldSelector=regarding.name%3Dp",
    )
    .await;
    assert_eq!(listed["items"][0]["reason"], "Admitted");
    assert_eq!(listed["items"][0]["apiVersion"], "events.k8s.io/v1");
}
