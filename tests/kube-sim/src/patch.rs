//! The three patch formats the API server accepts: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902) and strategic merge patch for built-in types, which merges the lists kubectl and
//! kube-rs patch (containers, env, ports, volumes, volume mounts, conditions) by their key.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("the JSON patch must be an array of operations")]
    NotAnArray,
    #[error("JSON patch operation {index}: {reason}")]
    Operation { index: usize, reason: String },
    #[error("strategic merge patch: {0}")]
    Strategic(String),
}

/// RFC 7386: objects merge recursively, `null` deletes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in patch {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    if path.is_empty() {
        return Err("the root document cannot be the target here".into());
    }
    if !path.starts_with('/') {
        return Err(format!("path {path:?} must start with '/'"));
    }
    let (parent, last) = path.rsplit_once('/').unwrap_or(("", path));
    Ok((parent.to_string(), unescape(last)))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(&parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            if last == "-" {
                a.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("{last:?} is not an array index"))?;
            if i > a.len() {
                return Err(format!(
                    "index {i} is past the end of the array at {parent:?}"
                ));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("parent {parent:?} of {path:?} does not exist")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(&parent) {
        Some(Value::Object(m)) => m
            .remove(&last)
            .ok_or_else(|| format!("{path:?} does not exist")),
        Some(Value::Array(a)) => {
            let i: usize = last
                .parse()
                .map_err(|_| format!("{last:?} is not an array index"))?;
            if i >= a.len() {
                return Err(format!("index {i} is out of range at {parent:?}"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("{path:?} does not exist")),
    }
}

/// RFC 6902, all six operations; the patch applies atomically (to a copy) or not at all.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let ops = patch.as_array().ok_or(PatchError::NotAnArray)?;
    let mut doc = target.clone();
    for (index, op) in ops.iter().enumerate() {
        let fail = |reason: String| PatchError::Operation { index, reason };
        let field = |name: &str| {
            op.get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| fail(format!("missing string field {name:?}")))
        };
        let path = field("path")?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| fail("missing field \"value\"".into()))
        };
        match field("op")? {
            "add" => add(&mut doc, path, value()?).map_err(fail)?,
            "remove" => {
                remove(&mut doc, path).map_err(fail)?;
            }
            "replace" => {
                if doc.pointer(path).is_none() {
                    return Err(fail(format!("{path:?} does not exist")));
                }
                *doc.pointer_mut(path).expect("checked above") = value()?;
            }
            "move" => {
                let from = field("from")?;
                let v = remove(&mut doc, from).map_err(fail)?;
                add(&mut doc, path, v).map_err(fail)?;
            }
            "copy" => {
                let from = field("from")?;
                let v = doc
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| fail(format!("{from:?} does not exist")))?;
                add(&mut doc, path, v).map_err(fail)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(fail(format!("test failed: {path:?} differs")));
                }
            }
            other => {
                return Err(fail(format!(
                    "unknown op {other:?}; allowed: add, remove, replace, move, copy, test"
                )));
            }
        }
    }
    *target = doc;
    Ok(())
}

/// The key a built-in list field is merged by, as the `patchMergeKey` tags in k8s.io/api say.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "ports" => {
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        _ => return None,
    })
}

/// Strategic merge patch as far as kubectl and kube-rs use it on built-in types: keyed lists merge
/// element by element, `$patch: delete` removes an element, `$patch: replace` replaces a list or
/// map, `$setElementOrder/…` and `$retainKeys` are accepted, and `finalizers` merges as a set.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), PatchError> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut p = patch.clone();
        p.remove("$patch");
        *target = Value::Object(p);
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    for (k, v) in patch {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" || k == "$patch" {
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(existing)), Value::Array(gone)) = (t.get_mut(field), v) {
                existing.retain(|e| !gone.contains(e));
            }
            continue;
        }
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Array(items) => {
                let existing = t
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                merge_list(k, existing, items)?;
            }
            Value::Object(_) => strategic_merge(t.entry(k.clone()).or_insert(Value::Null), v)?,
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

fn merge_list(field: &str, existing: &mut Value, items: &[Value]) -> Result<(), PatchError> {
    if field == "finalizers" {
        let Value::Array(e) = existing else {
            *existing = Value::Array(items.to_vec());
            return Ok(());
        };
        for i in items {
            if !e.contains(i) {
                e.push(i.clone());
            }
        }
        return Ok(());
    }
    let replace_directive = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let Some(key) = merge_key(field, items).filter(|_| !replace_directive) else {
        let kept: Vec<Value> = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        *existing = Value::Array(kept);
        return Ok(());
    };
    let Value::Array(e) = existing else {
        *existing = Value::Array(items.to_vec());
        return Ok(());
    };
    for item in items {
        let id = item.get(key).ok_or_else(|| {
            PatchError::Strategic(format!(
                "an element of {field:?} lacks its merge key {key:?}"
            ))
        })?;
        let pos = e.iter().position(|x| x.get(key) == Some(id));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(p) = pos {
                e.remove(p);
            }
            continue;
        }
        if let Some(p) = pos {
            strategic_merge(&mut e[p], item)?;
        } else {
            let mut fresh = Value::Null;
            strategic_merge(&mut fresh, item)?;
            e.push(fresh);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_deletes_with_null() {
        let mut v = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut v, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
        assert_eq!(v, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_is_atomic() {
        let mut v = json!({"a": [1, 2], "b": "x"});
        json_patch(&mut v, &json!([{"op": "add", "path": "/a/-", "value": 3}, {"op": "replace", "path": "/b", "value": "y"}])).unwrap();
        assert_eq!(v, json!({"a": [1, 2, 3], "b": "y"}));
        let before = v.clone();
        let err = json_patch(
            &mut v,
            &json!([{"op": "remove", "path": "/b"}, {"op": "test", "path": "/a/0", "value": 9}]),
        )
        .unwrap_err();
        assert!(matches!(err, PatchError::Operation { index: 1, .. }));
        assert_eq!(v, before);
    }

    #[test]
    fn strategic_merge_keys_containers_env_and_ports_by_name() {
        let mut pod = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "E1", "value": "1"}], "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "y:1"}
        ]}, "metadata": {"finalizers": ["f1"]}});
        strategic_merge(&mut pod, &json!({
            "$setElementOrder/containers": [{"name": "a"}, {"name": "b"}],
            "metadata": {"finalizers": ["f2"]},
            "spec": {"containers": [
                {"name": "a", "image": "x:2", "env": [{"name": "E2", "value": "2"}], "ports": [{"containerPort": 80, "name": "http"}]},
                {"name": "b", "$patch": "delete"}
            ]}
        })).unwrap();
        assert_eq!(
            pod,
            json!({"spec": {"containers": [
            {"name": "a", "image": "x:2", "env": [{"name": "E1", "value": "1"}, {"name": "E2", "value": "2"}], "ports": [{"containerPort": 80, "name": "http"}]}
        ]}, "metadata": {"finalizers": ["f1", "f2"]}})
        );
    }
}
