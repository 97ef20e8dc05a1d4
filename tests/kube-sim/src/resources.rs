//! The resource types the simulator serves: the built-in ones and those each
//! CustomResourceDefinition adds, and the discovery documents that describe them.

use serde_json::{Value, json};

/// Where objects of one resource are stored: its API group and plural name. All served versions
/// of a resource share one collection, as etcd storage does.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupResource {
    pub group: String,
    pub resource: String,
}

impl GroupResource {
    pub fn new(group: &str, resource: &str) -> Self {
        Self {
            group: group.to_string(),
            resource: resource.to_string(),
        }
    }

    /// `pods` for the core group, `leases.coordination.k8s.io` otherwise, as error messages
    /// print it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

/// A printer column of a CRD's `additionalPrinterColumns`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub json_path: String,
    pub priority: i64,
    pub description: String,
}

/// One served version of one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Subresources served under `…/{name}/{subresource}`.
    pub subresources: Vec<String>,
    /// `None` for built-ins, whose table columns are known here; CRD columns otherwise.
    pub printer_columns: Option<Vec<PrinterColumn>>,
}

impl ResourceType {
    /// Where objects of this type are stored. `events.k8s.io/v1` events are core/v1 events
    /// seen through another version, as in a real server, so both share one collection.
    pub fn group_resource(&self) -> GroupResource {
        if self.group == "events.k8s.io" && self.plural == "events" {
            return GroupResource::new("", "events");
        }
        GroupResource::new(&self.group, &self.plural)
    }

    /// The apiVersion objects of this type are stored under.
    pub fn storage_api_version(&self) -> String {
        if self.group == "events.k8s.io" && self.plural == "events" {
            return "v1".into();
        }
        self.api_version()
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn has_status(&self) -> bool {
        self.subresources.iter().any(|s| s == "status")
    }

    /// Whether the type is defined here rather than by a CRD; strategic merge patch only works
    /// for these.
    pub fn is_builtin(&self) -> bool {
        self.printer_columns.is_none()
    }
}

fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    subresources: &[&str],
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| (*s).to_string()).collect(),
        categories: if matches!(plural, "pods" | "services") {
            vec!["all".into()]
        } else {
            vec![]
        },
        subresources: subresources.iter().map(|s| (*s).to_string()).collect(),
        printer_columns: None,
    }
}

pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
/// Access reviews: answered, never stored.
pub const AUTHORIZATION_GROUP: &str = "authorization.k8s.io";

/// The built-in types.
pub fn builtins() -> Vec<ResourceType> {
    vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            &["status"],
        ),
        builtin("", "v1", "nodes", "Node", false, &["no"], &["status"]),
        builtin(
            "",
            "v1",
            "pods",
            "Pod",
            true,
            &["po"],
            &["status", "binding", "eviction", "log"],
        ),
        builtin("", "v1", "services", "Service", true, &["svc"], &["status"]),
        builtin("", "v1", "events", "Event", true, &["ev"], &[]),
        builtin("", "v1", "configmaps", "ConfigMap", true, &["cm"], &[]),
        builtin("", "v1", "secrets", "Secret", true, &[], &[]),
        builtin("events.k8s.io", "v1", "events", "Event", true, &["ev"], &[]),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            &[],
        ),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            &[],
        ),
        builtin(RBAC_GROUP, "v1", "roles", "Role", true, &[], &[]),
        builtin(
            RBAC_GROUP,
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            &[],
        ),
        builtin(
            RBAC_GROUP,
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            &[],
        ),
        builtin(
            RBAC_GROUP,
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            &[],
        ),
        builtin(
            AUTHORIZATION_GROUP,
            "v1",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            false,
            &[],
            &[],
        ),
        builtin(
            AUTHORIZATION_GROUP,
            "v1",
            "subjectaccessreviews",
            "SubjectAccessReview",
            false,
            &[],
            &[],
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            &["status"],
        ),
    ]
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CrdError {
    #[error("spec.{field}: Required value")]
    Missing { field: String },
    #[error("spec.scope: Unsupported value {0:?}: supported values: \"Cluster\", \"Namespaced\"")]
    Scope(String),
    #[error(
        "metadata.name: Invalid value {name:?}: must be spec.names.plural+\".\"+spec.group ({want:?})"
    )]
    Name { name: String, want: String },
}

/// The types a CustomResourceDefinition serves, one per served version.
pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, CrdError> {
    let s = |p: &str| crd.pointer(p).and_then(Value::as_str).map(str::to_string);
    let req = |p: &str, field: &str| {
        s(p).ok_or_else(|| CrdError::Missing {
            field: field.into(),
        })
    };
    let group = req("/spec/group", "group")?;
    let plural = req("/spec/names/plural", "names.plural")?;
    let kind = req("/spec/names/kind", "names.kind")?;
    let singular = s("/spec/names/singular").unwrap_or_else(|| kind.to_lowercase());
    let namespaced = match req("/spec/scope", "scope")?.as_str() {
        "Namespaced" => true,
        "Cluster" => false,
        other => return Err(CrdError::Scope(other.into())),
    };
    let want = format!("{plural}.{group}");
    let name = s("/metadata/name").unwrap_or_default();
    if name != want {
        return Err(CrdError::Name { name, want });
    }
    let strings = |p: &str| -> Vec<String> {
        crd.pointer(p)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let versions = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| CrdError::Missing {
            field: "versions".into(),
        })?;
    let mut out = Vec::new();
    for v in versions {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let version = v
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| CrdError::Missing {
                field: "versions[].name".into(),
            })?;
        let mut subresources = Vec::new();
        if v.pointer("/subresources/status").is_some() {
            subresources.push("status".to_string());
        }
        if v.pointer("/subresources/scale").is_some() {
            subresources.push("scale".to_string());
        }
        let columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .map(|c| PrinterColumn {
                        name: c.get("name").and_then(Value::as_str).unwrap_or("").into(),
                        type_: c
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or("string")
                            .into(),
                        json_path: c
                            .get("jsonPath")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                        priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                        description: c
                            .get("description")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .into(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(ResourceType {
            group: group.clone(),
            version: version.into(),
            plural: plural.clone(),
            singular: singular.clone(),
            kind: kind.clone(),
            namespaced,
            short_names: strings("/spec/names/shortNames"),
            categories: strings("/spec/names/categories"),
            subresources,
            printer_columns: Some(columns),
        });
    }
    Ok(out)
}

fn verbs(t: &ResourceType) -> Value {
    json!([
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch"
    ])
    .as_array()
    .map(|a| {
        let mut a = a.clone();
        if t.group == AUTHORIZATION_GROUP {
            a = vec![json!("create")];
        }
        if t.plural == "events" || t.plural == "leases" {
            a.retain(|v| v != "deletecollection");
        }
        Value::Array(a)
    })
    .unwrap_or_default()
}

/// The `APIResourceList` for one group version.
pub fn resource_list(group_version: &str, types: &[&ResourceType]) -> Value {
    let mut resources = Vec::new();
    for t in types {
        let mut r = json!({
            "name": t.plural, "singularName": t.singular, "namespaced": t.namespaced,
            "kind": t.kind, "verbs": verbs(t),
        });
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        for sub in &t.subresources {
            let (kind, verbs) = match sub.as_str() {
                "status" => (t.kind.as_str(), json!(["get", "patch", "update"])),
                "binding" => ("Binding", json!(["create"])),
                "eviction" => ("Eviction", json!(["create"])),
                "log" => ("Pod", json!(["get"])),
                "finalize" => ("Namespace", json!(["update"])),
                _ => ("Scale", json!(["get", "patch", "update"])),
            };
            resources.push(json!({
                "name": format!("{}/{sub}", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": kind, "verbs": verbs,
            }));
        }
    }
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// The `APIGroup` for one named group, its versions newest first as given.
pub fn api_group(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group,
           "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_yields_one_type_per_served_version() {
        let crd = json!({"metadata": {"name": "gangs.agentd.io"}, "spec": {
        "group": "agentd.io", "scope": "Namespaced",
        "names": {"plural": "gangs", "kind": "Gang", "shortNames": ["gg"]},
        "versions": [
            {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
             "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}]},
            {"name": "v0", "served": false, "storage": false}
        ]}});
        let types = from_crd(&crd).unwrap();
        assert_eq!(types.len(), 1);
        assert!(types[0].has_status());
        assert_eq!(types[0].singular, "gang");
        assert_eq!(
            types[0].printer_columns.as_ref().unwrap()[0].json_path,
            ".spec.size"
        );
        let mut bad = crd.clone();
        bad["metadata"]["name"] = json!("wrong");
        assert!(matches!(from_crd(&bad), Err(CrdError::Name { .. })));
    }
}
