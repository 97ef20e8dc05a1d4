//! Label and field selectors as `list` and `watch` accept them in their query string.
//!
//! Label selectors follow the full `labels.Parse` grammar (`=`, `==`, `!=`, `in`, `notin`,
//! existence, `!` non-existence, `>` and `<`). Field selectors accept `=`, `==` and `!=` on any
//! dotted path into the object; a real server allows only a few fields per resource, so this one is
//! more permissive, never less.

use serde_json::Value;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error("unable to parse requirement {requirement:?}: {reason}")]
    Label { requirement: String, reason: String },
    #[error("invalid field selector {selector:?}: {reason}")]
    Field { selector: String, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LabelRequirement {
    key: String,
    op: LabelOp,
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelRequirement>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn valid_label_key(key: &str) -> bool {
    let name = key.rsplit_once('/').map_or(key, |(_, n)| n);
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in split_top_level(s) {
            reqs.push(parse_requirement(part.trim())?);
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| {
            let v = get(&r.key);
            match &r.op {
                LabelOp::Eq(want) => v == Some(want.as_str()),
                LabelOp::NotEq(want) => v != Some(want.as_str()),
                LabelOp::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => v.is_none_or(|v| !set.iter().any(|s| s == v)),
                LabelOp::Exists => v.is_some(),
                LabelOp::NotExists => v.is_none(),
                LabelOp::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                LabelOp::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            }
        })
    }
}

fn parse_requirement(part: &str) -> Result<LabelRequirement, SelectorError> {
    let err = |reason: &str| SelectorError::Label {
        requirement: part.to_string(),
        reason: reason.to_string(),
    };
    let check_key = |k: &str| {
        if valid_label_key(k) {
            Ok(k.to_string())
        } else {
            Err(err(
                "key must be a qualified name: alphanumerics, '-', '_' or '.', at most 63 characters, optional DNS prefix and '/'",
            ))
        }
    };
    let check_value = |v: &str| {
        let v = v.trim();
        if valid_label_value(v) {
            Ok(v.to_string())
        } else {
            Err(err(
                "value must be at most 63 alphanumerics, '-', '_' or '.'",
            ))
        }
    };
    if part.is_empty() {
        return Err(err("empty requirement"));
    }
    if let Some(key) = part.strip_prefix('!') {
        return Ok(LabelRequirement {
            key: check_key(key.trim())?,
            op: LabelOp::NotExists,
        });
    }
    for (word, negate) in [(" notin ", true), (" in ", false)] {
        if let Some((key, rest)) = part.split_once(word) {
            let rest = rest.trim();
            let inner = rest
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| err("set must be in parentheses, e.g. env in (prod,dev)"))?;
            let values = inner
                .split(',')
                .map(check_value)
                .collect::<Result<Vec<_>, _>>()?;
            let key = check_key(key.trim())?;
            let op = if negate {
                LabelOp::NotIn(values)
            } else {
                LabelOp::In(values)
            };
            return Ok(LabelRequirement { key, op });
        }
    }
    for (sym, kind) in [("!=", 0), ("==", 1), ("=", 1), (">", 2), ("<", 3)] {
        if let Some((key, value)) = part.split_once(sym) {
            let key = check_key(key.trim())?;
            let op = match kind {
                0 => LabelOp::NotEq(check_value(value)?),
                1 => LabelOp::Eq(check_value(value)?),
                _ => {
                    let n = value
                        .trim()
                        .parse::<i64>()
                        .map_err(|_| err("'>' and '<' need an integer value"))?;
                    if kind == 2 {
                        LabelOp::Gt(n)
                    } else {
                        LabelOp::Lt(n)
                    }
                }
            };
            return Ok(LabelRequirement { key, op });
        }
    }
    Ok(LabelRequirement {
        key: check_key(part)?,
        op: LabelOp::Exists,
    })
}

/// A parsed `fieldSelector`: a conjunction of equalities and inequalities on dotted paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, true, v)
            } else {
                return Err(SelectorError::Field {
                    selector: s.to_string(),
                    reason: format!("{part:?} has no operator; use field=value or field!=value"),
                });
            };
            reqs.push((path.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    /// Rewrites field paths, for API versions that name a field differently from storage
    /// (`events.k8s.io/v1` says `regarding` where core/v1 says `involvedObject`).
    pub fn rename_prefix(&mut self, from: &str, to: &str) {
        for (path, _, _) in &mut self.0 {
            if let Some(rest) = path.strip_prefix(from) {
                *path = format!("{to}{rest}");
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every requirement holds; a missing field reads as the empty string, as a real
    /// server's field label conversion does for unset fields.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, equal, want)| {
            let got = path
                .split('.')
                .try_fold(obj, |v, seg| v.get(seg))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            (got == *want) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: &Value) -> Value {
        json!({"metadata": {"name": "p", "labels": labels}, "spec": {"nodeName": "node-1"}, "status": {"phase": "Running"}})
    }

    #[test]
    fn label_selector_full_syntax() {
        let p = pod(&json!({"app": "web", "tier": "front", "gen": "3"}));
        for (sel, want) in [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web, db)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("missing notin (x)", true),
            ("gen>2,gen<4", true),
            ("gen>3", false),
            ("app=web,tier in (front),!missing", true),
            ("", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&p),
                want,
                "{sel}"
            );
        }
    }

    #[test]
    fn bad_label_selectors_name_the_requirement() {
        let e = LabelSelector::parse("app in web").unwrap_err();
        assert!(e.to_string().contains("parentheses"), "{e}");
        assert!(LabelSelector::parse("a=b,,c").is_err());
        assert!(LabelSelector::parse("gen>x").is_err());
    }

    #[test]
    fn field_selector_on_nested_paths() {
        let p = pod(&json!({}));
        let f = FieldSelector::parse("spec.nodeName=node-1,status.phase!=Failed").unwrap();
        assert!(f.matches(&p));
        assert!(!FieldSelector::parse("metadata.name=q").unwrap().matches(&p));
        assert!(FieldSelector::parse("spec.missing=").unwrap().matches(&p));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
