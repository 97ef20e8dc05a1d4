//! Job templates: a saved manifest made into a job with a new name and a few values changed.
//!
//! A value is set with `PATH=VALUE`, where `PATH` is a field path as validation errors print it
//! (`spec.tfReplicaSpecs.Worker.replicas`, `...containers[0].image`, `metadata.labels.team`;
//! a key with dots in it is written `["agentd.io/team"]`) and `VALUE` is read as one YAML
//! scalar (`8` a number, `true` a boolean, `"8"` text; nothing at all is empty text). Mappings
//! on the way that the template does not have are created; a list is indexed only within its
//! length. The job made is then admitted like any submitted manifest, and records the template
//! and the values in annotations (`agentd.io/template`, `agentd.io/template-values`).
//!
//! Pure apart from [`super::admit`]'s look at the file system.

use agentd_api::templates::{
    TEMPLATE_ANNOTATION, TEMPLATE_VALUES_ANNOTATION, TemplateUse, TemplateValue,
};
use serde_json::Value;

use super::admit::admit_made_from_template;
use super::manifest::read_document;
use super::{Admission, FieldError, SpecError, TrainingJob, admit};

/// The most `--set` values one job may be made with.
pub const MAX_SETS: usize = 100;

/// Checks a template's name: the rule of job names.
pub fn check_name(name: &str) -> Result<(), String> {
    if super::validate::is_dns_label(name) {
        return Ok(());
    }
    Err(format!(
        "{name:?} is not a valid template name: use at most 63 characters of lower-case letters, \
         digits and '-', starting with a letter and ending with a letter or digit"
    ))
}

/// Checks a manifest saved as template `name`: it must be one that could be submitted, once it
/// is given a job name. A manifest without `metadata.name` is checked under the template's name
/// (each job made from it is named when it is made).
pub fn check(manifest: &[u8], name: &str, rules: &Admission) -> Result<(), SpecError> {
    let mut document = read_document(manifest)?;
    if let Some(metadata) = document.as_object_mut().and_then(|top| {
        top.entry("metadata")
            .or_insert_with(|| Value::Object(serde_json::Map::new()))
            .as_object_mut()
    }) {
        let unnamed = metadata
            .get("name")
            .is_none_or(|n| n.is_null() || n.as_str() == Some(""));
        if unnamed {
            metadata.insert("name".to_owned(), Value::String(name.to_owned()));
        }
    }
    admit(&to_bytes(&document), rules).map(drop)
}

/// A job made from a template.
#[derive(Debug)]
pub struct Made {
    pub job: TrainingJob,
    /// The manifest the job was made of (JSON), as the job stores it.
    pub manifest: String,
    pub used: TemplateUse,
}

/// Makes job `job_name` from template `template_name` (its `manifest` as saved) with `sets`
/// applied in order, and admits it. Every problem is reported at its field: a set that cannot
/// be read or applied at the path it names, and, once every set applied, the new manifest's.
pub fn instantiate(
    manifest: &str,
    template_name: &str,
    job_name: &str,
    sets: &[String],
    rules: &Admission,
) -> Result<Made, SpecError> {
    if sets.len() > MAX_SETS {
        return Err(SpecError::Invalid(vec![FieldError::new(
            "set",
            format!(
                "{} values given; a job is made with at most {MAX_SETS}",
                sets.len()
            ),
        )]));
    }
    let mut document = read_document(manifest.as_bytes())?;
    let mut errors = Vec::new();
    let mut values = Vec::new();
    for set in sets {
        match parse_set(set).and_then(|(path, steps, value)| {
            apply(&mut document, &path, &steps, value.clone()).map(|()| (path, value))
        }) {
            Ok((path, value)) => values.push(TemplateValue { path, value }),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(SpecError::Invalid(errors));
    }
    let used = TemplateUse {
        name: template_name.to_owned(),
        values,
    };
    name_and_annotate(&mut document, job_name, &used);
    let manifest = String::from_utf8(to_bytes(&document)).unwrap_or_default();
    let job = admit_made_from_template(manifest.as_bytes(), rules).map_err(|e| match e {
        SpecError::Invalid(errors) => SpecError::Invalid(
            errors
                .into_iter()
                .map(|e| blame_unknown_field(e, &used.values))
                .collect(),
        ),
        other @ SpecError::Syntax { .. } => other,
    })?;
    Ok(Made {
        job,
        manifest,
        used,
    })
}

fn to_bytes(document: &Value) -> Vec<u8> {
    // A JSON value always serializes.
    serde_json::to_vec(document).unwrap_or_default()
}

/// Names the job and records the template in its annotations.
fn name_and_annotate(document: &mut Value, job_name: &str, used: &TemplateUse) {
    let Some(top) = document.as_object_mut() else {
        return;
    };
    let metadata = top
        .entry("metadata")
        .or_insert_with(|| Value::Object(serde_json::Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(serde_json::Map::new());
    }
    metadata["name"] = Value::String(job_name.to_owned());
    if !metadata["annotations"].is_object() {
        metadata["annotations"] = Value::Object(serde_json::Map::new());
    }
    metadata["annotations"][TEMPLATE_ANNOTATION] = Value::String(used.name.clone());
    metadata["annotations"][TEMPLATE_VALUES_ANNOTATION] =
        Value::String(serde_json::to_string(&used.values).unwrap_or_default());
}

/// A field the manifest's form does not have is reported where the reader noticed it (the
/// mapping that held it); where a set put it there, the set's path says better what to fix.
fn blame_unknown_field(error: FieldError, values: &[TemplateValue]) -> FieldError {
    if !error.message.contains("unknown field") {
        return error;
    }
    let within = |path: &str| {
        path == error.field
            || error.field.is_empty()
            || path
                .strip_prefix(error.field.as_str())
                .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
    };
    match values.iter().rev().find(|v| within(&v.path)) {
        Some(v) => FieldError::new(
            v.path.clone(),
            format!(
                "no such field in the manifest's form (set with --set): {}",
                error.message
            ),
        ),
        None => error,
    }
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Splits `PATH=VALUE` and reads both.
fn parse_set(set: &str) -> Result<(String, Vec<Step>, Value), FieldError> {
    let Some((path, value)) = split_set(set) else {
        return Err(FieldError::new(
            "set",
            format!("{set:?} is not PATH=VALUE, e.g. spec.tfReplicaSpecs.Worker.replicas=8"),
        ));
    };
    let steps = parse_path(path).map_err(|message| FieldError::new(path, message))?;
    if matches!(steps.as_slice(), [Step::Key(m), Step::Key(n)] if m == "metadata" && n == "name") {
        return Err(FieldError::new(
            path,
            "the job's name is given on its own (--name), not set",
        ));
    }
    let value = parse_scalar(value).map_err(|message| FieldError::new(path, message))?;
    Ok((path.to_owned(), steps, value))
}

/// The `=` that ends the path: the first outside brackets.
fn split_set(set: &str) -> Option<(&str, &str)> {
    let mut depth = 0_u32;
    let mut quoted = false;
    for (i, c) in set.char_indices() {
        match c {
            '"' if depth > 0 => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => depth = depth.saturating_sub(1),
            '=' if depth == 0 => return Some((&set[..i], &set[i + 1..])),
            _ => {}
        }
    }
    None
}

/// Reads `a.b[0].c["d.e"]`.
fn parse_path(path: &str) -> Result<Vec<Step>, String> {
    let hint = "write a field path as validation errors print it, e.g. \
                spec.tfReplicaSpecs.Worker.template.spec.containers[0].image";
    if path.is_empty() {
        return Err(format!("the path is empty; {hint}"));
    }
    let mut steps = Vec::new();
    let mut rest = path;
    let mut expect_key = true;
    while !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('[') {
            let (step, after) = if let Some(quoted) = inner.strip_prefix('"') {
                let end = quoted
                    .find("\"]")
                    .ok_or_else(|| format!("a quoted key is not closed with \"]; {hint}"))?;
                (Step::Key(quoted[..end].to_owned()), &quoted[end + 2..])
            } else {
                let end = inner
                    .find(']')
                    .ok_or_else(|| format!("a '[' is not closed; {hint}"))?;
                let index = inner[..end].parse::<usize>().map_err(|_| {
                    format!(
                        "[{}] is not a list index: use a number, or [\"key\"] for a key",
                        &inner[..end]
                    )
                })?;
                (Step::Index(index), &inner[end + 1..])
            };
            if steps.is_empty() {
                return Err(format!("the path starts with an index; {hint}"));
            }
            steps.push(step);
            rest = after;
            expect_key = false;
            continue;
        }
        let key_text = if expect_key {
            rest
        } else {
            rest.strip_prefix('.')
                .ok_or_else(|| format!("expected '.' or '[' after ']'; {hint}"))?
        };
        let end = key_text.find(['.', '[']).unwrap_or(key_text.len());
        if end == 0 {
            return Err(format!("the path has an empty key; {hint}"));
        }
        steps.push(Step::Key(key_text[..end].to_owned()));
        rest = &key_text[end..];
        if let Some(after_dot) = rest.strip_prefix('.') {
            if after_dot.is_empty() {
                return Err(format!("the path ends with '.'; {hint}"));
            }
            rest = after_dot;
            expect_key = true;
        } else {
            expect_key = false;
        }
    }
    Ok(steps)
}

/// Reads one YAML scalar, as YAML 1.2 reads it (`true`/`false` only for booleans).
fn parse_scalar(text: &str) -> Result<Value, String> {
    if text.trim().is_empty() {
        return Ok(Value::String(text.to_owned()));
    }
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.with_snippet = false;
    let value: Value = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| format!("{text:?} is not a YAML value: {e}"))?;
    match value {
        Value::Array(_) | Value::Object(_) => Err(format!(
            "{text:?} is a YAML {}; a value set here is one number, boolean or text (quote it, \
             '\"{text}\"', to set it as text)",
            if value.is_array() { "list" } else { "mapping" }
        )),
        scalar => Ok(scalar),
    }
}

/// What a JSON value is, for a person.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Puts `value` at `steps` in `document`, creating mappings on the way; `path` names the
/// field in errors.
fn apply(document: &mut Value, path: &str, steps: &[Step], value: Value) -> Result<(), FieldError> {
    let mut at = document;
    let mut walked = String::new();
    for step in steps {
        let here = if walked.is_empty() {
            "the manifest".to_owned()
        } else {
            walked.clone()
        };
        match step {
            Step::Key(key) => {
                if at.is_null() {
                    *at = Value::Object(serde_json::Map::new());
                }
                let Value::Object(map) = at else {
                    return Err(FieldError::new(
                        path,
                        format!(
                            "{here} is {}, not a mapping: it has no field {key:?}",
                            kind_of(at)
                        ),
                    ));
                };
                at = map.entry(key.clone()).or_insert(Value::Null);
                if !walked.is_empty() {
                    walked.push('.');
                }
                walked.push_str(key);
            }
            Step::Index(index) => {
                let Value::Array(items) = at else {
                    return Err(FieldError::new(
                        path,
                        match at {
                            Value::Null => format!(
                                "{here} is not in the template, so it has no item [{index}]"
                            ),
                            other => format!("{here} is {}, not a list", kind_of(other)),
                        },
                    ));
                };
                let len = items.len();
                at = items.get_mut(*index).ok_or_else(|| {
                    FieldError::new(
                        path,
                        format!(
                            "{here} has {len} item{}: index {index} is past its end (indexes \
                             start at 0)",
                            if len == 1 { "" } else { "s" }
                        ),
                    )
                })?;
                walked.push_str(&format!("[{index}]"));
            }
        }
    }
    *at = value;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "\
apiVersion: kubeflow.org/v1
kind: TFJob
metadata:
  name: base
spec:
  tfReplicaSpecs:
    Worker:
      replicas: 2
      restartPolicy: Never
      template:
        spec:
          containers:
          - name: tensorflow
            image: tf:2
            command: [/bin/true]
";

    fn rules() -> Admission {
        Admission::new(["fast".to_owned()], "fast", 64)
    }

    fn made(sets: &[&str]) -> Result<Made, SpecError> {
        let sets: Vec<String> = sets.iter().map(|s| (*s).to_owned()).collect();
        instantiate(TEMPLATE, "tf2", "run-1", &sets, &rules())
    }

    fn problems(sets: &[&str]) -> Vec<(String, String)> {
        match made(sets) {
            Err(SpecError::Invalid(errors)) => {
                errors.into_iter().map(|e| (e.field, e.message)).collect()
            }
            other => panic!("{sets:?}: expected problems, got {other:?}"),
        }
    }

    #[test]
    fn paths_read_as_validation_errors_print_them() {
        assert_eq!(
            parse_path("spec.tfReplicaSpecs.Worker.template.spec.containers[0].image").unwrap(),
            [
                "spec",
                "tfReplicaSpecs",
                "Worker",
                "template",
                "spec",
                "containers"
            ]
            .iter()
            .map(|k| Step::Key((*k).to_owned()))
            .chain([Step::Index(0), Step::Key("image".to_owned())])
            .collect::<Vec<_>>()
        );
        assert_eq!(
            parse_path("metadata.labels[\"agentd.io/team\"]").unwrap(),
            vec![
                Step::Key("metadata".into()),
                Step::Key("labels".into()),
                Step::Key("agentd.io/team".into())
            ]
        );
        for bad in ["", "a..b", "a.", "[0]", "a[x]", "a[0", "a[0]b", "a[\"b"] {
            assert!(parse_path(bad).is_err(), "{bad:?} must be refused");
        }
        assert_eq!(
            split_set("metadata.labels[\"a=b\"]=c=d"),
            Some(("metadata.labels[\"a=b\"]", "c=d"))
        );
    }

    #[test]
    fn values_are_yaml_scalars() {
        assert_eq!(parse_scalar("8").unwrap(), serde_json::json!(8));
        assert_eq!(parse_scalar("true").unwrap(), serde_json::json!(true));
        assert_eq!(parse_scalar("\"8\"").unwrap(), serde_json::json!("8"));
        assert_eq!(
            parse_scalar("tf:2.15").unwrap(),
            serde_json::json!("tf:2.15")
        );
        assert_eq!(parse_scalar("").unwrap(), serde_json::json!(""));
        assert_eq!(parse_scalar("yes").unwrap(), serde_json::json!("yes"));
        assert!(parse_scalar("[1, 2]").unwrap_err().contains("list"));
        assert!(parse_scalar("{a: 1}").unwrap_err().contains("mapping"));
    }

    #[test]
    fn a_job_is_made_with_the_values_set_and_records_them() {
        let made = made(&[
            "spec.tfReplicaSpecs.Worker.replicas=3",
            "spec.tfReplicaSpecs.Worker.template.spec.containers[0].image=tf:2.15",
            "metadata.labels.team=ads",
        ])
        .unwrap();
        assert_eq!(made.job.name, "run-1");
        assert_eq!(made.job.total_replicas(), 3);
        assert_eq!(made.job.labels["team"], "ads");
        assert_eq!(made.job.annotations[TEMPLATE_ANNOTATION], "tf2");
        let recorded =
            TemplateUse::from_annotations(|k| made.job.annotations.get(k).map(String::as_str))
                .unwrap();
        assert_eq!(recorded, made.used);
        assert_eq!(recorded.values.len(), 3);
        assert_eq!(recorded.values[0].value, serde_json::json!(3));
        // The manifest stored with the job reads back as the same job.
        let again = crate::job::parse(made.manifest.as_bytes()).unwrap();
        assert_eq!(again.spec.replica_specs, made.job.spec.replica_specs);
        assert_eq!(again.annotations, made.job.annotations);
    }

    #[test]
    fn only_agentd_writes_the_template_record_into_a_job() {
        // The manifest of a job made from a template, submitted as a plain manifest: it would
        // claim a template it did not come from.
        let made = made(&["spec.tfReplicaSpecs.Worker.replicas=3"]).unwrap();
        let Err(SpecError::Invalid(errors)) = admit(made.manifest.as_bytes(), &rules()) else {
            panic!("a hand-written template record must be refused");
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "metadata.annotations[\"agentd.io/template\"]",
                "metadata.annotations[\"agentd.io/template-values\"]"
            ]
        );
        assert!(errors[0].message.contains("--template"), "{errors:?}");
        // A template that carries one is refused when saved, and other annotations are fine.
        let claims = TEMPLATE.replace(
            "  name: base\n",
            "  name: base\n  annotations:\n    agentd.io/template: other\n    team: ads\n",
        );
        assert!(check(claims.as_bytes(), "tf2", &rules()).is_err());
        let plain = TEMPLATE.replace(
            "  name: base\n",
            "  name: base\n  annotations:\n    team: ads\n",
        );
        check(plain.as_bytes(), "tf2", &rules()).unwrap();
    }

    #[test]
    fn a_path_outside_the_manifest_is_refused_naming_it() {
        assert_eq!(
            problems(&["spec.tfReplicaSpecs.Worker.template.spec.containers[1].image=x"]),
            [(
                "spec.tfReplicaSpecs.Worker.template.spec.containers[1].image".to_owned(),
                "spec.tfReplicaSpecs.Worker.template.spec.containers has 1 item: index 1 is \
                 past its end (indexes start at 0)"
                    .to_owned()
            )]
        );
        let unknown = problems(&["spec.tfReplicaSpecs.Worker.replica=8"]);
        assert_eq!(unknown.len(), 1, "{unknown:?}");
        assert_eq!(unknown[0].0, "spec.tfReplicaSpecs.Worker.replica");
        assert!(unknown[0].1.contains("no such field"), "{unknown:?}");
        let unknown = problems(&["spec.tfReplicaSpecs.Worker.template.spec.containers[0].imag=x"]);
        assert_eq!(
            unknown[0].0, "spec.tfReplicaSpecs.Worker.template.spec.containers[0].imag",
            "{unknown:?}"
        );
        let scalar = problems(&["spec.tfReplicaSpecs.Worker.replicas.count=1"]);
        assert_eq!(scalar[0].0, "spec.tfReplicaSpecs.Worker.replicas.count");
        assert!(
            scalar[0].1.contains("is a number, not a mapping"),
            "{scalar:?}"
        );
        assert_eq!(problems(&["metadata.name=x"])[0].0, "metadata.name");
        assert_eq!(problems(&["replicas"])[0].0, "set");
    }

    #[test]
    fn a_value_that_fails_validation_is_refused_at_its_field() {
        let invalid = problems(&["spec.tfReplicaSpecs.Worker.replicas=-1"]);
        assert_eq!(invalid.len(), 1, "{invalid:?}");
        assert_eq!(invalid[0].0, "spec.tfReplicaSpecs.Worker.replicas");
        assert!(invalid[0].1.contains("got -1"), "{invalid:?}");
        // Every problem at once, each at its field.
        let two = problems(&[
            "spec.tfReplicaSpecs.Worker.replicas=\"3\"",
            "spec.runPolicy.backoffLimit=-2",
        ]);
        let fields: Vec<&str> = two.iter().map(|(f, _)| f.as_str()).collect();
        assert!(
            fields.contains(&"spec.tfReplicaSpecs.Worker.replicas")
                && fields.contains(&"spec.runPolicy.backoffLimit"),
            "{two:?}"
        );
    }

    #[test]
    fn a_template_is_checked_as_a_manifest_when_saved() {
        check(TEMPLATE.as_bytes(), "tf2", &rules()).unwrap();
        // No name: checked under the template's.
        let unnamed = TEMPLATE.replace("metadata:\n  name: base\n", "");
        check(unnamed.as_bytes(), "tf2", &rules()).unwrap();
        let broken = TEMPLATE.replace("replicas: 2", "replicas: -2").replace(
            "spec:\n  tfReplicaSpecs:",
            "spec:\n  runPolicy:\n    backoffLimit: -1\n  tfReplicaSpecs:",
        );
        let Err(SpecError::Invalid(errors)) = check(broken.as_bytes(), "tf2", &rules()) else {
            panic!("a broken template must be refused");
        };
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.tfReplicaSpecs.Worker.replicas")
                && fields.contains(&"spec.runPolicy.backoffLimit"),
            "{errors:?}"
        );
    }
}
