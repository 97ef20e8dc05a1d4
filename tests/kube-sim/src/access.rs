//! Access reviews (`authorization.k8s.io/v1` SelfSubjectAccessReview and SubjectAccessReview):
//! answered from the authorizer, never stored. `kubectl auth can-i` posts them in protobuf, so
//! the few protobuf messages involved are decoded here.

use serde_json::{Map, Value, json};

use crate::auth::UserInfo;
use crate::rbac::Attributes;

/// Reads one varint; `None` at a malformed or truncated one.
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}

/// The length-delimited fields of a message as (field number, bytes); other wire types are
/// skipped.
fn fields(buf: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    let bad = || "the protobuf body is malformed".to_string();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos).ok_or_else(bad)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(buf, &mut pos).ok_or_else(bad)?;
            }
            1 => pos += 8,
            2 => {
                let len =
                    usize::try_from(varint(buf, &mut pos).ok_or_else(bad)?).map_err(|_| bad())?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or_else(bad)?;
                out.push((field, &buf[pos..end]));
                pos = end;
            }
            5 => pos += 4,
            _ => return Err(bad()),
        }
    }
    if pos > buf.len() {
        return Err(bad());
    }
    Ok(out)
}

fn string_fields(buf: &[u8], names: &[(u64, &str)]) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    for (f, bytes) in fields(buf)? {
        if let Some((_, name)) = names.iter().find(|(n, _)| *n == f) {
            m.insert(
                (*name).to_string(),
                json!(String::from_utf8_lossy(bytes).into_owned()),
            );
        }
    }
    Ok(m)
}

/// Decodes a protobuf-encoded SelfSubjectAccessReview or SubjectAccessReview (the `k8s\0`
/// envelope around a `runtime.Unknown`) into its JSON form.
pub fn decode_protobuf(body: &[u8]) -> Result<Value, String> {
    let inner = body
        .strip_prefix(b"k8s\0")
        .ok_or("the protobuf body does not start with the k8s envelope")?;
    let mut kind = String::new();
    let mut api_version = String::new();
    let mut raw: &[u8] = &[];
    for (f, bytes) in fields(inner)? {
        match f {
            1 => {
                let tm = string_fields(bytes, &[(1, "apiVersion"), (2, "kind")])?;
                api_version = tm
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .into();
                kind = tm.get("kind").and_then(Value::as_str).unwrap_or("").into();
            }
            2 => raw = bytes,
            _ => {}
        }
    }
    let mut spec = Map::new();
    for (f, bytes) in fields(raw)? {
        if f != 2 {
            continue;
        }
        let mut groups = Vec::new();
        for (sf, sb) in fields(bytes)? {
            match sf {
                1 => {
                    let ra = string_fields(
                        sb,
                        &[
                            (1, "namespace"),
                            (2, "verb"),
                            (3, "group"),
                            (4, "version"),
                            (5, "resource"),
                            (6, "subresource"),
                            (7, "name"),
                        ],
                    )?;
                    spec.insert("resourceAttributes".into(), Value::Object(ra));
                }
                2 => {
                    let na = string_fields(sb, &[(1, "path"), (2, "verb")])?;
                    spec.insert("nonResourceAttributes".into(), Value::Object(na));
                }
                3 => {
                    spec.insert("user".into(), json!(String::from_utf8_lossy(sb)));
                }
                4 => groups.push(json!(String::from_utf8_lossy(sb))),
                _ => {}
            }
        }
        if !groups.is_empty() {
            spec.insert("groups".into(), Value::Array(groups));
        }
    }
    Ok(json!({"apiVersion": api_version, "kind": kind, "spec": spec}))
}

/// The request a review asks about, and the user it asks for (`None`: the requester).
pub fn review_attributes(
    review: &Value,
    self_review: bool,
) -> Result<(Attributes, Option<UserInfo>), String> {
    let s = |p: &str| {
        review
            .pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let attrs = if review.pointer("/spec/resourceAttributes").is_some() {
        Attributes {
            verb: s("/spec/resourceAttributes/verb"),
            resource_request: true,
            group: s("/spec/resourceAttributes/group"),
            resource: s("/spec/resourceAttributes/resource"),
            subresource: s("/spec/resourceAttributes/subresource"),
            namespace: s("/spec/resourceAttributes/namespace"),
            name: s("/spec/resourceAttributes/name"),
            path: String::new(),
        }
    } else if review.pointer("/spec/nonResourceAttributes").is_some() {
        Attributes {
            verb: s("/spec/nonResourceAttributes/verb"),
            path: s("/spec/nonResourceAttributes/path"),
            ..Attributes::default()
        }
    } else {
        return Err("spec.resourceAttributes or spec.nonResourceAttributes: Required value: exactly one must be set".into());
    };
    if attrs.verb.is_empty() {
        return Err("spec.resourceAttributes.verb: Required value".into());
    }
    if self_review {
        return Ok((attrs, None));
    }
    let user = s("/spec/user");
    let groups: Vec<String> = review
        .pointer("/spec/groups")
        .and_then(Value::as_array)
        .map(|g| {
            g.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if user.is_empty() && groups.is_empty() {
        return Err(
            "spec.user: Required value: at least one of user or group must be specified".into(),
        );
    }
    Ok((
        attrs,
        Some(UserInfo {
            name: user,
            uid: s("/spec/uid"),
            groups,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![(field << 3) | 2, u8::try_from(bytes.len()).unwrap()];
        v.extend_from_slice(bytes);
        v
    }

    #[test]
    fn decodes_a_protobuf_self_subject_access_review() {
        let ra = [
            ld(1, b"agentd-system"),
            ld(2, b"create"),
            ld(3, b"coordination.k8s.io"),
            ld(5, b"leases"),
        ]
        .concat();
        let spec = ld(1, &ra);
        let raw = [ld(1, b""), ld(2, &spec), ld(3, b"")].concat();
        let tm = [
            ld(1, b"authorization.k8s.io/v1"),
            ld(2, b"SelfSubjectAccessReview"),
        ]
        .concat();
        let mut body = b"k8s\0".to_vec();
        body.extend([ld(1, &tm), ld(2, &raw)].concat());
        let v = decode_protobuf(&body).unwrap();
        assert_eq!(v["kind"], "SelfSubjectAccessReview");
        let (a, user) = review_attributes(&v, true).unwrap();
        assert!(user.is_none());
        assert_eq!(
            (
                a.verb.as_str(),
                a.group.as_str(),
                a.resource.as_str(),
                a.namespace.as_str()
            ),
            ("create", "coordination.k8s.io", "leases", "agentd-system")
        );
        assert!(decode_protobuf(b"k8s\0\x0a\x7f").is_err());
        assert!(decode_protobuf(b"{}").is_err());
    }

    #[test]
    fn subject_access_reviews_need_a_user_or_group() {
        let v = json!({"spec": {"resourceAttributes": {"verb": "get", "resource": "pods"}}});
        assert!(
            review_attributes(&v, false)
                .unwrap_err()
                .contains("spec.user")
        );
        let v = json!({"spec": {"user": "alice", "resourceAttributes": {"verb": "get", "resource": "pods"}}});
        assert_eq!(
            review_attributes(&v, false).unwrap().1.unwrap().name,
            "alice"
        );
        assert!(review_attributes(&json!({"spec": {}}), true).is_err());
    }
}
