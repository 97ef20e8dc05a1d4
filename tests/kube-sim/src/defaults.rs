//! What the API server fills in on create for built-in types (pod status and spec defaults,
//! service cluster IPs, namespace phase and finalizer, CRD conditions), and the checks that make a
//! create or update `Invalid`.

use serde_json::{Value, json};

use crate::clock;
use crate::resources::ResourceType;

/// A field error, as `Status.details.causes` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldCause {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl FieldCause {
    pub fn required(field: &str) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueRequired",
            message: "Required value".into(),
        }
    }

    pub fn invalid(field: &str, value: &str, why: &str) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {value:?}: {why}"),
        }
    }
}

/// RFC 1123 subdomain: what most object names must be.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

const NAME_RULE: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

/// What the RBAC API validates: a binding's `roleRef` and subjects, a rule's verbs.
fn validate_rbac(ty: &ResourceType, obj: &Value) -> Vec<FieldCause> {
    let mut causes = Vec::new();
    if ty.kind.ends_with("Binding") {
        let kind = obj.pointer("/roleRef/kind").and_then(Value::as_str);
        let allowed: &[&str] = if ty.kind == "RoleBinding" {
            &["Role", "ClusterRole"]
        } else {
            &["ClusterRole"]
        };
        match kind {
            None => causes.push(FieldCause::required("roleRef.kind")),
            Some(k) if !allowed.contains(&k) => causes.push(FieldCause {
                field: "roleRef.kind".into(),
                reason: "FieldValueNotSupported",
                message: format!("Unsupported value: {k:?}: supported values: {allowed:?}"),
            }),
            Some(_) => {}
        }
        if obj
            .pointer("/roleRef/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            causes.push(FieldCause::required("roleRef.name"));
        }
        let subjects = obj.get("subjects").and_then(Value::as_array);
        for (i, s) in subjects.into_iter().flatten().enumerate() {
            match s.get("kind").and_then(Value::as_str) {
                Some("User" | "Group" | "ServiceAccount") => {}
                other => causes.push(FieldCause {
                    field: format!("subjects[{i}].kind"),
                    reason: "FieldValueNotSupported",
                    message: format!(
                        "Unsupported value: {:?}: supported values: \"ServiceAccount\", \"User\", \"Group\"",
                        other.unwrap_or("")
                    ),
                }),
            }
            if s.get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                causes.push(FieldCause::required(&format!("subjects[{i}].name")));
            }
        }
    } else {
        let rules = obj.get("rules").and_then(Value::as_array);
        for (i, r) in rules.into_iter().flatten().enumerate() {
            if r.get("verbs")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                causes.push(FieldCause::required(&format!("rules[{i}].verbs")));
            }
        }
    }
    causes
}

/// Validation a real server would reject with 422 before storing anything.
pub fn validate(ty: &ResourceType, obj: &Value) -> Vec<FieldCause> {
    let mut causes = Vec::new();
    for (ptr, field) in [
        ("/metadata/labels", "metadata.labels"),
        ("/metadata/annotations", "metadata.annotations"),
    ] {
        match obj.pointer(ptr) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.values().all(Value::is_string) => {}
            Some(_) => causes.push(FieldCause::invalid(
                field,
                "",
                "must be a map of string keys to string values",
            )),
        }
    }
    for (ptr, field, want_array) in [
        ("/metadata/finalizers", "metadata.finalizers", true),
        (
            "/metadata/ownerReferences",
            "metadata.ownerReferences",
            true,
        ),
        ("/spec", "spec", false),
        ("/status", "status", false),
    ] {
        let ok = match obj.pointer(ptr) {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) if want_array => {
                field != "metadata.finalizers" || a.iter().all(Value::is_string)
            }
            Some(Value::Object(_)) => !want_array,
            Some(_) => false,
        };
        if !ok {
            let what = if want_array {
                "must be a list"
            } else {
                "must be an object"
            };
            causes.push(FieldCause::invalid(field, "", what));
        }
    }
    if !causes.is_empty() {
        return causes;
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if ty.group == crate::resources::RBAC_GROUP {
        // RBAC objects only need a name that is a valid path segment (`system:discovery`).
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '%']) {
            causes.push(FieldCause::invalid(
                "metadata.name",
                name,
                "may not be '.' or '..' and may not contain '/' or '%'",
            ));
        }
        causes.extend(validate_rbac(ty, obj));
    } else if !is_dns_subdomain(name) {
        causes.push(FieldCause::invalid("metadata.name", name, NAME_RULE));
    }
    if ty.is_builtin() && ty.group.is_empty() && ty.plural == "pods" {
        match obj.pointer("/spec/containers").and_then(Value::as_array) {
            None => causes.push(FieldCause::required("spec.containers")),
            Some(cs) if cs.is_empty() => causes.push(FieldCause::required("spec.containers")),
            Some(cs) => {
                for (i, c) in cs.iter().enumerate() {
                    if c.get("name")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        causes.push(FieldCause::required(&format!("spec.containers[{i}].name")));
                    }
                    if c.get("image")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
                    {
                        causes.push(FieldCause::required(&format!("spec.containers[{i}].image")));
                    }
                }
            }
        }
    }
    if ty.plural == "services"
        && ty.group.is_empty()
        && let Some(ports) = obj.pointer("/spec/ports").and_then(Value::as_array)
    {
        for (i, p) in ports.iter().enumerate() {
            if !p
                .get("port")
                .and_then(Value::as_i64)
                .is_some_and(|n| (1..=65535).contains(&n))
            {
                causes.push(FieldCause::required(&format!("spec.ports[{i}].port")));
            }
        }
    }
    causes
}

fn qos_class(pod: &Value) -> &'static str {
    let containers = pod.pointer("/spec/containers").and_then(Value::as_array);
    let mut any = false;
    let mut guaranteed = true;
    for c in containers.into_iter().flatten() {
        let req = c.pointer("/resources/requests").and_then(Value::as_object);
        let lim = c.pointer("/resources/limits").and_then(Value::as_object);
        any |= req.is_some_and(|m| !m.is_empty()) || lim.is_some_and(|m| !m.is_empty());
        let full = lim.is_some_and(|l| l.contains_key("cpu") && l.contains_key("memory"))
            && req.is_none_or(|r| lim.is_some_and(|l| r.iter().all(|(k, v)| l.get(k) == Some(v))));
        guaranteed &= full;
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

fn set_default(obj: &mut Value, key: &str, v: Value) {
    if let Some(m) = obj.as_object_mut() {
        m.entry(key.to_string()).or_insert(v);
    }
}

/// Fills in defaults for a new object of a built-in type; `cluster_ip` is the next free service
/// address, used only for services.
pub fn on_create(ty: &ResourceType, obj: &mut Value, cluster_ip: impl FnOnce() -> String) {
    if !ty.group.is_empty() && ty.group != "apiextensions.k8s.io" {
        if !ty.is_builtin() && ty.has_status() {
            // Custom resources with a status subresource ignore status on create.
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        return;
    }
    match ty.plural.as_str() {
        "namespaces" => {
            let name = obj
                .pointer("/metadata/name")
                .cloned()
                .unwrap_or(Value::Null);
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            obj["spec"]["finalizers"] = json!(["kubernetes"]);
            obj["status"] = json!({"phase": "Active"});
        }
        "pods" => {
            let spec = &mut obj["spec"];
            set_default(spec, "restartPolicy", json!("Always"));
            set_default(spec, "terminationGracePeriodSeconds", json!(30));
            set_default(spec, "dnsPolicy", json!("ClusterFirst"));
            set_default(spec, "schedulerName", json!("default-scheduler"));
            set_default(spec, "serviceAccountName", json!("default"));
            set_default(spec, "priority", json!(0));
            set_default(spec, "enableServiceLinks", json!(true));
            set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
            set_default(spec, "securityContext", json!({}));
            if let Some(cs) = spec.get_mut("containers").and_then(Value::as_array_mut) {
                for c in cs {
                    let latest = c.get("image").and_then(Value::as_str).is_some_and(|i| {
                        !i.rsplit('/').next().unwrap_or(i).contains(':') || i.ends_with(":latest")
                    });
                    set_default(
                        c,
                        "imagePullPolicy",
                        json!(if latest { "Always" } else { "IfNotPresent" }),
                    );
                    set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                    set_default(c, "terminationMessagePolicy", json!("File"));
                    set_default(c, "resources", json!({}));
                    if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                        for p in ports {
                            set_default(p, "protocol", json!("TCP"));
                        }
                    }
                }
            }
            let qos = qos_class(obj);
            obj["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        "services" => {
            let spec = &mut obj["spec"];
            set_default(spec, "type", json!("ClusterIP"));
            set_default(spec, "sessionAffinity", json!("None"));
            if spec.get("clusterIP").is_none() {
                let ip = cluster_ip();
                spec["clusterIP"] = json!(ip);
                spec["clusterIPs"] = json!([ip]);
            }
            set_default(spec, "ipFamilies", json!(["IPv4"]));
            set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
            set_default(spec, "internalTrafficPolicy", json!("Cluster"));
            if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                for p in ports {
                    set_default(p, "protocol", json!("TCP"));
                    let port = p.get("port").cloned().unwrap_or(Value::Null);
                    set_default(p, "targetPort", port);
                }
            }
            obj["status"] = json!({"loadBalancer": {}});
        }
        "customresourcedefinitions" => {
            let now = clock::now();
            let names = obj.pointer("/spec/names").cloned().unwrap_or(json!({}));
            let stored: Vec<Value> = obj
                .pointer("/spec/versions")
                .and_then(Value::as_array)
                .map(|vs| {
                    vs.iter()
                        .filter(|v| v.get("storage") == Some(&json!(true)))
                        .filter_map(|v| v.get("name").cloned())
                        .collect()
                })
                .unwrap_or_default();
            obj["status"] = json!({
                "acceptedNames": names,
                "storedVersions": stored,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now}
                ]
            });
        }
        "events" if ty.group.is_empty() => {
            let now = clock::now();
            set_default(obj, "count", json!(1));
            set_default(obj, "firstTimestamp", json!(now));
            set_default(obj, "lastTimestamp", json!(now));
            set_default(obj, "type", json!("Normal"));
        }
        _ => {}
    }
}

/// `events.k8s.io/v1` shape of a stored core/v1 event.
/// Field names of a core/v1 event and of the same field in an `events.k8s.io/v1` event.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("related", "related"),
    ("message", "note"),
    ("reason", "reason"),
    ("type", "type"),
    ("action", "action"),
    ("eventTime", "eventTime"),
    ("reportingComponent", "reportingController"),
    ("reportingInstance", "reportingInstance"),
    ("count", "deprecatedCount"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("source", "deprecatedSource"),
    ("series", "series"),
];

pub fn event_to_events_v1(core: &Value) -> Value {
    let mut e = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": core.get("metadata").cloned().unwrap_or(json!({})),
    });
    for &(from, to) in EVENT_FIELDS {
        if let Some(v) = core.get(from).filter(|v| !v.is_null()) {
            e[to] = v.clone();
        }
    }
    e
}

/// core/v1 shape of an `events.k8s.io/v1` event being stored.
pub fn event_from_events_v1(ev: &Value) -> Value {
    let mut e = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": ev.get("metadata").cloned().unwrap_or(json!({})),
    });
    for &(to, from) in EVENT_FIELDS {
        if let Some(v) = ev.get(from).filter(|v| !v.is_null()) {
            e[to] = v.clone();
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_dns_subdomains() {
        assert!(is_dns_subdomain("node-0.example"));
        assert!(!is_dns_subdomain("Node"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain(""));
    }

    #[test]
    fn pod_defaults_and_qos() {
        let ty = crate::resources::builtins()
            .into_iter()
            .find(|t| t.plural == "pods")
            .unwrap();
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}, "status": {"phase": "Running"}});
        on_create(&ty, &mut pod, String::new);
        assert_eq!(
            pod["status"],
            json!({"phase": "Pending", "qosClass": "BestEffort"})
        );
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert!(
            validate(&ty, &json!({"metadata": {"name": "p"}, "spec": {}}))[0].field
                == "spec.containers"
        );
    }

    #[test]
    fn events_convert_both_ways() {
        let core = json!({"apiVersion": "v1", "kind": "Event", "metadata": {"name": "e"}, "involvedObject": {"name": "p"}, "message": "hi", "reason": "Started", "count": 2});
        let v1 = event_to_events_v1(&core);
        assert_eq!(v1["regarding"]["name"], "p");
        assert_eq!(v1["note"], "hi");
        assert_eq!(event_from_events_v1(&v1), core);
    }
}
