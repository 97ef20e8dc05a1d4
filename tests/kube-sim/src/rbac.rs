//! RBAC authorization over the `rbac.authorization.k8s.io/v1` objects in the store, evaluated as
//! kube-apiserver's RBAC authorizer does: a request is allowed when a ClusterRoleBinding, or a
//! RoleBinding in the request's namespace, binds a subject matching the user to a role with a
//! rule covering the request. `system:masters` may do everything. There are no deny rules.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::store::Store;

/// Which authorizer runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthorizationMode {
    /// Everything is allowed (today's behaviour).
    #[default]
    AlwaysAllow,
    /// Roles, ClusterRoles and their bindings decide.
    Rbac,
}

impl std::str::FromStr for AuthorizationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "AlwaysAllow" => Ok(Self::AlwaysAllow),
            "RBAC" => Ok(Self::Rbac),
            other => Err(format!(
                "authorization mode {other:?} is not supported: use \"RBAC\" or \"AlwaysAllow\""
            )),
        }
    }
}

/// What a request asks to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    /// False for non-resource paths such as `/version` or `/apis`.
    pub resource_request: bool,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// The URL path, for non-resource requests.
    pub path: String,
}

impl Attributes {
    /// `pods` or `pods/log`.
    pub fn resource_with_sub(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// The message of a 403, worded as kube-apiserver words it.
    pub fn forbidden_message(&self, user: &str) -> String {
        if !self.resource_request {
            return format!(
                "forbidden: User {user:?} cannot {} path {:?}",
                self.verb, self.path
            );
        }
        let what = qualified(&self.group, &self.resource_with_sub());
        let object = if self.name.is_empty() {
            what.clone()
        } else {
            format!("{what} {:?}", self.name)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace {:?}", self.namespace)
        };
        format!(
            "{object} is forbidden: User {user:?} cannot {} resource {:?} in API group {:?} {scope}",
            self.verb,
            self.resource_with_sub(),
            self.group
        )
    }
}

fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

/// The verb of a resource request, from its method and shape.
pub fn verb_of(method: &http::Method, has_name: bool, watch: bool) -> &'static str {
    match *method {
        http::Method::GET | http::Method::HEAD if watch => "watch",
        http::Method::GET | http::Method::HEAD if has_name => "get",
        http::Method::GET | http::Method::HEAD => "list",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if has_name => "delete",
        http::Method::DELETE => "deletecollection",
        _ => "unknown",
    }
}

/// The verb of a non-resource request.
pub fn non_resource_verb(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET | http::Method::HEAD => "get",
        http::Method::POST => "post",
        http::Method::PUT => "put",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "unknown",
    }
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn has(list: &[String], want: &str) -> bool {
    list.iter().any(|s| s == "*" || s == want)
}

/// Whether one PolicyRule covers the request.
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let verbs = strings(rule, "verbs");
    if !has(&verbs, &a.verb) {
        return false;
    }
    if !a.resource_request {
        return strings(rule, "nonResourceURLs").iter().any(|u| {
            u == "*"
                || *u == a.path
                || u.strip_suffix('*')
                    .is_some_and(|prefix| a.path.starts_with(prefix))
        });
    }
    if !has(&strings(rule, "apiGroups"), &a.group) {
        return false;
    }
    let combined = a.resource_with_sub();
    let resource_ok = strings(rule, "resources").iter().any(|r| {
        r == "*"
            || *r == combined
            || (a.subresource.is_empty() && *r == a.resource)
            || (!a.subresource.is_empty() && *r == format!("*/{}", a.subresource))
            || (!a.subresource.is_empty() && *r == format!("{}/*", a.resource))
    });
    if !resource_ok {
        return false;
    }
    let names = strings(rule, "resourceNames");
    names.is_empty() || (!a.name.is_empty() && names.contains(&a.name))
}

/// Whether a binding's subject is this user. `binding_ns` is the binding's namespace, which a
/// ServiceAccount subject without a namespace defaults to.
fn subject_matches(subject: &Value, user: &UserInfo, binding_ns: &str) -> bool {
    let s = |k: &str| subject.get(k).and_then(Value::as_str).unwrap_or("");
    match s("kind") {
        "User" => s("name") == user.name,
        "Group" => user.groups.iter().any(|g| g == s("name")),
        "ServiceAccount" => {
            let ns = if s("namespace").is_empty() {
                binding_ns
            } else {
                s("namespace")
            };
            user.service_account() == Some((ns, s("name")))
        }
        _ => false,
    }
}

fn rbac_type(store: &Store, plural: &str) -> Option<crate::resources::ResourceType> {
    store.resource_type("rbac.authorization.k8s.io", "v1", plural)
}

fn role_rules(store: &Store, binding: &Value, binding_ns: &str) -> Vec<Value> {
    let kind = binding
        .pointer("/roleRef/kind")
        .and_then(Value::as_str)
        .unwrap_or("");
    let name = binding
        .pointer("/roleRef/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (plural, ns) = match kind {
        "ClusterRole" => ("clusterroles", ""),
        "Role" if !binding_ns.is_empty() => ("roles", binding_ns),
        _ => return Vec::new(),
    };
    let Some(ty) = rbac_type(store, plural) else {
        return Vec::new();
    };
    store
        .get(&ty, ns, name)
        .ok()
        .and_then(|r| r.get("rules").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// Why a request was allowed, or `None` when it is denied.
pub fn authorize(store: &Store, user: &UserInfo, a: &Attributes) -> Option<String> {
    if user.is_master() {
        return Some("user is in system:masters".into());
    }
    let bound = |b: &Arc<Value>, ns: &str| -> bool {
        b.get("subjects")
            .and_then(Value::as_array)
            .is_some_and(|subs| subs.iter().any(|s| subject_matches(s, user, ns)))
    };
    let allows = |b: &Arc<Value>, ns: &str| -> bool {
        bound(b, ns)
            && role_rules(store, b, ns)
                .iter()
                .any(|rule| rule_allows(rule, a))
    };
    let name_of = |b: &Arc<Value>| {
        b.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    if let Some(ty) = rbac_type(store, "clusterrolebindings") {
        let page = store.list(&ty, None, &|_| true, None, None);
        if let Some(b) = page.items.iter().find(|b| allows(b, "")) {
            return Some(format!("allowed by ClusterRoleBinding {:?}", name_of(b)));
        }
    }
    if a.resource_request
        && !a.namespace.is_empty()
        && let Some(ty) = rbac_type(store, "rolebindings")
    {
        let page = store.list(&ty, Some(&a.namespace), &|_| true, None, None);
        if let Some(b) = page.items.iter().find(|b| allows(b, &a.namespace)) {
            return Some(format!(
                "allowed by RoleBinding {:?} in namespace {:?}",
                name_of(b),
                a.namespace
            ));
        }
    }
    None
}

/// The ClusterRoles and ClusterRoleBindings every real cluster starts with that matter here:
/// `cluster-admin` for `system:masters`, discovery and health for every authenticated user, and
/// `system:basic-user` so anyone can ask what they may do (`kubectl auth can-i`).
pub fn bootstrap_objects() -> Vec<(&'static str, Value)> {
    let labels = json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    let role = |name: &str, rules: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": name, "labels": labels}, "rules": rules})
    };
    let binding = |name: &str, groups: &[&str]| {
        let subjects: Vec<Value> = groups
            .iter()
            .map(|g| json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g}))
            .collect();
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": name, "labels": labels},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
               "subjects": subjects})
    };
    vec![
        (
            "clusterroles",
            role(
                "cluster-admin",
                json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                       {"nonResourceURLs": ["*"], "verbs": ["*"]}]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:discovery",
                json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez",
                        "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:basic-user",
                json!([{"apiGroups": ["authorization.k8s.io"],
                        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]}]),
            ),
        ),
        (
            "clusterroles",
            role(
                "system:public-info-viewer",
                json!([{"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "clusterrolebindings",
            binding("cluster-admin", &[crate::auth::MASTERS]),
        ),
        (
            "clusterrolebindings",
            binding("system:discovery", &[crate::auth::AUTHENTICATED]),
        ),
        (
            "clusterrolebindings",
            binding("system:basic-user", &[crate::auth::AUTHENTICATED]),
        ),
        (
            "clusterrolebindings",
            binding(
                "system:public-info-viewer",
                &[crate::auth::AUTHENTICATED, "system:unauthenticated"],
            ),
        ),
    ]
}

/// Creates [`bootstrap_objects`] in a fresh store.
pub fn bootstrap(store: &Store) -> Result<(), crate::store::StoreError> {
    for (plural, obj) in bootstrap_objects() {
        if let Some(ty) = rbac_type(store, plural) {
            store.create(&ty, "", obj)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(
        verb: &str,
        group: &str,
        resource: &str,
        sub: &str,
        ns: &str,
        name: &str,
    ) -> Attributes {
        Attributes {
            verb: verb.into(),
            resource_request: true,
            group: group.into(),
            resource: resource.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
            path: String::new(),
        }
    }

    #[test]
    fn rules_match_groups_resources_subresources_verbs_and_names() {
        let rule = json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                          "verbs": ["get", "update"], "resourceNames": ["agentd-node-a"]});
        let get = attrs(
            "get",
            "coordination.k8s.io",
            "leases",
            "",
            "ns",
            "agentd-node-a",
        );
        assert!(rule_allows(&rule, &get));
        assert!(!rule_allows(
            &rule,
            &Attributes {
                name: "agentd-node-b".into(),
                ..get.clone()
            }
        ));
        assert!(!rule_allows(
            &rule,
            &Attributes {
                verb: "delete".into(),
                ..get.clone()
            }
        ));
        assert!(!rule_allows(
            &rule,
            &Attributes {
                group: String::new(),
                ..get.clone()
            }
        ));
        // resourceNames cannot restrict list or create, which carry no name.
        assert!(!rule_allows(
            &rule,
            &Attributes {
                verb: "get".into(),
                name: String::new(),
                ..get.clone()
            }
        ));

        let status =
            json!({"apiGroups": ["agentd.io"], "resources": ["agentnodes/status"], "verbs": ["*"]});
        let main = attrs("patch", "agentd.io", "agentnodes", "", "ns", "n");
        let sub = attrs("patch", "agentd.io", "agentnodes", "status", "ns", "n");
        assert!(!rule_allows(&status, &main));
        assert!(rule_allows(&status, &sub));
        let main_only =
            json!({"apiGroups": ["agentd.io"], "resources": ["agentnodes"], "verbs": ["*"]});
        assert!(rule_allows(&main_only, &main));
        assert!(!rule_allows(&main_only, &sub));
        let any_status = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["patch"]});
        assert!(rule_allows(&any_status, &sub));
        assert!(!rule_allows(&any_status, &main));
    }

    #[test]
    fn non_resource_urls() {
        let rule = json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]});
        let a = |path: &str| Attributes {
            verb: "get".into(),
            path: path.into(),
            ..Default::default()
        };
        assert!(rule_allows(&rule, &a("/version")));
        assert!(rule_allows(&rule, &a("/apis/agentd.io/v1alpha1")));
        assert!(!rule_allows(&rule, &a("/healthz")));
    }

    #[test]
    fn forbidden_messages_match_kube_apiserver() {
        let a = attrs("list", "", "pods", "", "default", "");
        assert_eq!(
            a.forbidden_message("alice"),
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        let a = attrs("get", "", "nodes", "", "", "node-0");
        assert_eq!(
            a.forbidden_message("bob"),
            "nodes \"node-0\" is forbidden: User \"bob\" cannot get resource \"nodes\" in API group \"\" at the cluster scope"
        );
        let a = attrs("patch", "agentd.io", "agentnodes", "status", "ns", "n");
        assert!(
            a.forbidden_message("x")
                .starts_with("agentnodes/status.agentd.io \"n\" is forbidden")
        );
    }

    #[test]
    fn bindings_grant_roles_to_users_groups_and_service_accounts() {
        let store = Store::new(100, 100);
        bootstrap(&store).unwrap();
        let ty = |p: &str| rbac_type(&store, p).unwrap();
        store
            .create(
                &ty("roles"),
                "default",
                json!({"metadata": {"name": "reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]}),
            )
            .unwrap();
        store
            .create(&ty("rolebindings"), "default", json!({"metadata": {"name": "sa-reads"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "bot", "namespace": "default"},
                             {"kind": "Group", "name": "readers"}]}))
            .unwrap();
        let sa = UserInfo {
            name: "system:serviceaccount:default:bot".into(),
            uid: String::new(),
            groups: vec!["system:authenticated".into()],
        };
        let list_pods = attrs("list", "", "pods", "", "default", "");
        assert!(authorize(&store, &sa, &list_pods).is_some());
        assert!(
            authorize(
                &store,
                &sa,
                &Attributes {
                    namespace: "other".into(),
                    ..list_pods.clone()
                }
            )
            .is_none()
        );
        assert!(
            authorize(
                &store,
                &sa,
                &Attributes {
                    verb: "delete".into(),
                    ..list_pods.clone()
                }
            )
            .is_none()
        );
        let other_sa = UserInfo {
            name: "system:serviceaccount:other:bot".into(),
            ..sa.clone()
        };
        assert!(authorize(&store, &other_sa, &list_pods).is_none());
        let reader = UserInfo {
            name: "carol".into(),
            uid: String::new(),
            groups: vec!["readers".into()],
        };
        assert!(authorize(&store, &reader, &list_pods).is_some());
        // Discovery and can-i come from the bootstrap roles.
        let discovery = Attributes {
            verb: "get".into(),
            path: "/apis/rbac.authorization.k8s.io/v1".into(),
            ..Default::default()
        };
        assert!(authorize(&store, &sa, &discovery).is_some());
        let ssar = attrs(
            "create",
            "authorization.k8s.io",
            "selfsubjectaccessreviews",
            "",
            "",
            "",
        );
        assert!(authorize(&store, &sa, &ssar).is_some());
        let admin = UserInfo {
            name: "admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into()],
        };
        assert!(
            authorize(
                &store,
                &admin,
                &attrs("delete", "", "nodes", "", "", "node-0")
            )
            .is_some()
        );
    }
}
