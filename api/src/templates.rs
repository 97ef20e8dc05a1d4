//! Job templates: saved manifests that jobs are made from, with a few values changed
//! (`agentctl template`, `agentctl submit --template`).

use serde::{Deserialize, Serialize};

use crate::jobs::Owner;

/// `GET /v1/templates/{name}`: a template as it was saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub name: String,
    /// Who saved it first: they (and admins) may replace or delete it.
    pub owner: Owner,
    pub created_at: f64,
    pub updated_at: f64,
    /// The manifest as saved (YAML or JSON text).
    pub manifest: String,
}

/// One template as `GET /v1/templates` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateSummary {
    pub name: String,
    pub owner: Owner,
    pub created_at: f64,
    pub updated_at: f64,
    /// The manifest's size in bytes.
    pub bytes: u64,
}

/// `GET /v1/templates`: every template on the agent, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateList {
    pub templates: Vec<TemplateSummary>,
}

/// `POST /v1/templates/{name}/jobs`: a job made from the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSubmit {
    /// The new job's name (`metadata.name`).
    pub name: String,
    /// `PATH=VALUE` each, applied in order: `PATH` a field path as validation errors print it
    /// (`spec.tfReplicaSpecs.Worker.replicas`), `VALUE` read as a YAML scalar.
    #[serde(default)]
    pub set: Vec<String>,
}

/// One value a job was made with: a field path and the value put there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateValue {
    pub path: String,
    pub value: serde_json::Value,
}

/// The template a job was made from and the values it was made with, as the job records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateUse {
    pub name: String,
    #[serde(default)]
    pub values: Vec<TemplateValue>,
}

/// The annotation that names the template a job was made from.
pub const TEMPLATE_ANNOTATION: &str = "agentd.io/template";
/// The annotation that holds the values a job was made with (a JSON list of
/// [`TemplateValue`]).
pub const TEMPLATE_VALUES_ANNOTATION: &str = "agentd.io/template-values";

impl TemplateUse {
    /// What a job's annotations say it was made from, if anything.
    pub fn from_annotations<'a>(mut get: impl FnMut(&str) -> Option<&'a str>) -> Option<Self> {
        let name = get(TEMPLATE_ANNOTATION)?.to_owned();
        let values = get(TEMPLATE_VALUES_ANNOTATION)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default();
        Some(Self { name, values })
    }
}
