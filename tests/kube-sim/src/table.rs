//! Server-side printing: the `meta.k8s.io/v1 Table` that `kubectl get` asks for with
//! `Accept: application/json;as=Table`, with the columns a real server prints for the built-in
//! types and a CRD's `additionalPrinterColumns` for custom resources.

use serde_json::{Value, json};

use crate::clock;
use crate::resources::ResourceType;

/// How much of each object a row carries (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

fn col(name: &str, type_: &str, format: &str, priority: i64, description: &str) -> Value {
    json!({"name": name, "type": type_, "format": format, "priority": priority, "description": description})
}

fn s<'a>(obj: &'a Value, ptr: &str) -> &'a str {
    obj.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn age(obj: &Value) -> String {
    clock::age(
        obj.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str),
    )
}

fn name_col() -> Value {
    col(
        "Name",
        "string",
        "name",
        0,
        "Name must be unique within a namespace.",
    )
}

fn age_col() -> Value {
    col(
        "Age",
        "string",
        "",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    )
}

/// The column definitions for a type.
pub fn columns(ty: &ResourceType) -> Vec<Value> {
    if let Some(custom) = &ty.printer_columns {
        if custom.is_empty() {
            return vec![name_col(), age_col()];
        }
        let mut cols = vec![name_col()];
        for c in custom {
            let type_ = if c.type_ == "date" {
                "string"
            } else {
                c.type_.as_str()
            };
            cols.push(col(&c.name, type_, "", c.priority, &c.description));
        }
        return cols;
    }
    match (ty.group.as_str(), ty.plural.as_str()) {
        ("", "pods") => vec![
            name_col(),
            col(
                "Ready",
                "string",
                "",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                "",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                "",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
            ),
            age_col(),
            col(
                "IP",
                "string",
                "",
                1,
                "IP address allocated to the pod. Routable at least within the cluster. Empty if not yet allocated.",
            ),
            col(
                "Node",
                "string",
                "",
                1,
                "NodeName is a request to schedule this pod onto a specific node.",
            ),
            col(
                "Nominated Node",
                "string",
                "",
                1,
                "nominatedNodeName is set when this pod preempts other pods on the node.",
            ),
            col(
                "Readiness Gates",
                "string",
                "",
                1,
                "If specified, all readiness gates will be evaluated for pod readiness.",
            ),
        ],
        ("", "nodes") => vec![
            name_col(),
            col("Status", "string", "", 0, "The status of the node"),
            col("Roles", "string", "", 0, "The roles of the node"),
            age_col(),
            col(
                "Version",
                "string",
                "",
                0,
                "Kubelet Version reported by the node.",
            ),
            col(
                "Internal-IP",
                "string",
                "",
                1,
                "List of addresses reachable to the node.",
            ),
            col(
                "External-IP",
                "string",
                "",
                1,
                "List of addresses reachable to the node.",
            ),
            col(
                "OS-Image",
                "string",
                "",
                1,
                "OS Image reported by the node from /etc/os-release.",
            ),
            col(
                "Kernel-Version",
                "string",
                "",
                1,
                "Kernel Version reported by the node.",
            ),
            col(
                "Container-Runtime",
                "string",
                "",
                1,
                "Container runtime version reported by the node.",
            ),
        ],
        ("", "namespaces") => vec![
            name_col(),
            col("Status", "string", "", 0, "The status of the namespace"),
            age_col(),
        ],
        ("", "services") => vec![
            name_col(),
            col("Type", "string", "", 0, "The type of the service"),
            col(
                "Cluster-IP",
                "string",
                "",
                0,
                "The cluster IP of the service",
            ),
            col(
                "External-IP",
                "string",
                "",
                0,
                "The external IP of the service",
            ),
            col("Port(s)", "string", "", 0, "The ports of the service"),
            age_col(),
            col("Selector", "string", "", 1, "The selector of the service"),
        ],
        ("" | "events.k8s.io", "events") => vec![
            col(
                "Last Seen",
                "string",
                "",
                0,
                "Time when this event was last seen",
            ),
            col("Type", "string", "", 0, "Type of this event"),
            col("Reason", "string", "", 0, "Reason of this event"),
            col("Object", "string", "", 0, "The object this event is about"),
            col("Message", "string", "", 0, "Message of this event"),
        ],
        ("", "configmaps") => vec![
            name_col(),
            col("Data", "integer", "", 0, "Number of keys"),
            age_col(),
        ],
        ("coordination.k8s.io", "leases") => vec![
            name_col(),
            col("Holder", "string", "", 0, "The holder of the lease"),
            age_col(),
        ],
        ("apiextensions.k8s.io", _) => vec![
            name_col(),
            col("Created At", "date", "", 0, "The creation time"),
        ],
        _ => vec![name_col(), age_col()],
    }
}

fn pod_cells(pod: &Value) -> Vec<Value> {
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array);
    let total = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = statuses.map_or(0, |c| {
        c.iter()
            .filter(|c| c.get("ready") == Some(&json!(true)))
            .count()
    });
    let restarts: i64 = statuses.map_or(0, |c| {
        c.iter()
            .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
            .sum()
    });
    let mut reason = match s(pod, "/status/reason") {
        "" => s(pod, "/status/phase").to_string(),
        r => r.to_string(),
    };
    for c in statuses.into_iter().flatten() {
        if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
            reason = r.to_string();
        } else if let Some(r) = c
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str)
        {
            reason = r.to_string();
        } else if c.pointer("/state/terminated").is_some() {
            let code = c
                .pointer("/state/terminated/exitCode")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            reason = format!("ExitCode:{code}");
        }
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        reason = if s(pod, "/status/reason") == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    let ip = match s(pod, "/status/podIP") {
        "" => "<none>",
        ip => ip,
    };
    let node = match s(pod, "/spec/nodeName") {
        "" => "<none>",
        n => n,
    };
    let nominated = match s(pod, "/status/nominatedNodeName") {
        "" => "<none>",
        n => n,
    };
    vec![
        json!(s(pod, "/metadata/name")),
        json!(format!("{ready}/{total}")),
        json!(reason),
        json!(restarts.to_string()),
        json!(age(pod)),
        json!(ip),
        json!(node),
        json!(nominated),
        json!("<none>"),
    ]
}

fn node_cells(node: &Value) -> Vec<Value> {
    let conds = node.pointer("/status/conditions").and_then(Value::as_array);
    let ready = conds
        .into_iter()
        .flatten()
        .find(|c| c.get("type") == Some(&json!("Ready")))
        .and_then(|c| c.get("status").and_then(Value::as_str));
    let mut status = match ready {
        Some("True") => "Ready".to_string(),
        _ => "NotReady".to_string(),
    };
    if node.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let mut roles: Vec<&str> = node
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .collect()
        })
        .unwrap_or_default();
    roles.sort_unstable();
    let addr = |t: &str| {
        node.pointer("/status/addresses")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|x| x.get("type") == Some(&json!(t))))
            .and_then(|x| x.get("address").and_then(Value::as_str))
            .unwrap_or("<none>")
            .to_string()
    };
    vec![
        json!(s(node, "/metadata/name")),
        json!(status),
        json!(if roles.is_empty() {
            "<none>".to_string()
        } else {
            roles.join(",")
        }),
        json!(age(node)),
        json!(s(node, "/status/nodeInfo/kubeletVersion")),
        json!(addr("InternalIP")),
        json!(addr("ExternalIP")),
        json!(s(node, "/status/nodeInfo/osImage")),
        json!(s(node, "/status/nodeInfo/kernelVersion")),
        json!(s(node, "/status/nodeInfo/containerRuntimeVersion")),
    ]
}

fn service_cells(svc: &Value) -> Vec<Value> {
    let ports: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) => format!("{port}:{np}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let selector: Vec<String> = svc
        .pointer("/spec/selector")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    vec![
        json!(s(svc, "/metadata/name")),
        json!(s(svc, "/spec/type")),
        json!(match s(svc, "/spec/clusterIP") {
            "" => "<none>",
            ip => ip,
        }),
        json!("<none>"),
        json!(if ports.is_empty() {
            "<none>".to_string()
        } else {
            ports.join(",")
        }),
        json!(age(svc)),
        json!(if selector.is_empty() {
            "<none>".to_string()
        } else {
            selector.join(",")
        }),
    ]
}

/// Evaluates the simple JSONPath subset CRDs use in practice: `.a.b`, `.a[0].b`.
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path
        .trim_start_matches('.')
        .split('.')
        .filter(|s| !s.is_empty())
    {
        let (field, indexes) = seg.split_once('[').map_or((seg, ""), |(f, rest)| (f, rest));
        if !field.is_empty() {
            cur = cur.get(field)?;
        }
        for idx in indexes.split('[').filter(|s| !s.is_empty()) {
            let i: usize = idx.trim_end_matches(']').parse().ok()?;
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

/// The cells of one row.
pub fn cells(ty: &ResourceType, obj: &Value) -> Vec<Value> {
    if let Some(custom) = &ty.printer_columns {
        let mut row = vec![json!(s(obj, "/metadata/name"))];
        if custom.is_empty() {
            row.push(json!(age(obj)));
        }
        for c in custom {
            let v = json_path(obj, &c.json_path).cloned().unwrap_or(Value::Null);
            row.push(if c.type_ == "date" {
                json!(clock::age(v.as_str()))
            } else {
                v
            });
        }
        return row;
    }
    match (ty.group.as_str(), ty.plural.as_str()) {
        ("", "pods") => pod_cells(obj),
        ("", "nodes") => node_cells(obj),
        ("", "services") => service_cells(obj),
        ("", "namespaces") => vec![
            json!(s(obj, "/metadata/name")),
            json!(s(obj, "/status/phase")),
            json!(age(obj)),
        ],
        ("" | "events.k8s.io", "events") => {
            let io = obj
                .get("involvedObject")
                .or_else(|| obj.get("regarding"))
                .cloned()
                .unwrap_or(json!({}));
            let last = obj
                .get("lastTimestamp")
                .or_else(|| obj.get("deprecatedLastTimestamp"))
                .and_then(Value::as_str);
            vec![
                json!(clock::age(last)),
                json!(s(obj, "/type")),
                json!(s(obj, "/reason")),
                json!(format!(
                    "{}/{}",
                    s(&io, "/kind").to_lowercase(),
                    s(&io, "/name")
                )),
                json!(
                    obj.get("message")
                        .or_else(|| obj.get("note"))
                        .and_then(Value::as_str)
                        .unwrap_or("")
                ),
            ]
        }
        ("", "configmaps") => vec![
            json!(s(obj, "/metadata/name")),
            json!(
                obj.get("data")
                    .and_then(Value::as_object)
                    .map_or(0, serde_json::Map::len)
            ),
            json!(age(obj)),
        ],
        ("coordination.k8s.io", "leases") => vec![
            json!(s(obj, "/metadata/name")),
            json!(s(obj, "/spec/holderIdentity")),
            json!(age(obj)),
        ],
        ("apiextensions.k8s.io", _) => vec![
            json!(s(obj, "/metadata/name")),
            json!(s(obj, "/metadata/creationTimestamp")),
        ],
        _ => vec![json!(s(obj, "/metadata/name")), json!(age(obj))],
    }
}

/// One row, with the object embedded as `includeObject` asks.
pub fn row(ty: &ResourceType, obj: &Value, include: IncludeObject) -> Value {
    let mut row = json!({"cells": cells(ty, obj)});
    match include {
        IncludeObject::None => {}
        IncludeObject::Metadata => {
            row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                   "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))});
        }
        IncludeObject::Object => row["object"] = obj.clone(),
    }
    row
}

/// A whole table.
pub fn table(
    ty: &ResourceType,
    objs: &[&Value],
    include: IncludeObject,
    headers: bool,
    rv: u64,
    cont: Option<&str>,
) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
        "columnDefinitions": if headers { Value::Array(columns(ty)) } else { Value::Null },
        "rows": objs.iter().map(|o| row(ty, o, include)).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_rows_summarise_container_state() {
        let ty = crate::resources::builtins()
            .into_iter()
            .find(|t| t.plural == "pods")
            .unwrap();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "node-0"},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "containerStatuses": [
                {"name": "a", "ready": true, "restartCount": 2, "state": {"running": {}}},
                {"name": "b", "ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let c = cells(&ty, &pod);
        assert_eq!(c[1], "1/2");
        assert_eq!(c[2], "CrashLoopBackOff");
        assert_eq!(c[3], "3");
        assert_eq!(c[6], "node-0");
        assert_eq!(columns(&ty).len(), c.len());
    }

    #[test]
    fn json_path_subset() {
        let v = json!({"spec": {"items": [{"n": 1}, {"n": 2}]}});
        assert_eq!(json_path(&v, ".spec.items[1].n"), Some(&json!(2)));
        assert_eq!(json_path(&v, ".spec.missing"), None);
    }
}
