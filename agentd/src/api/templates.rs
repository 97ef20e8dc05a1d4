//! Job templates: `GET /v1/templates`, `GET|PUT|DELETE /v1/templates/{name}`, and
//! `POST /v1/templates/{name}/jobs`, which makes a job from one. Templates are kept in the
//! agent's database (standalone mode); the reading and checking of manifests and the store's
//! work run on blocking threads, and a job made from a template reaches the core as any
//! submitted job does.

use std::sync::Arc;

use agentd_api::templates::TemplateSubmit;
use hyper::StatusCode;
use hyper::body::Bytes;

use super::{ApiError, ApiState, Body, Caller, json};
use crate::core::{Command, CoreError};
use crate::job::template;
use crate::store::{TemplateError, Templates};

/// What a template request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateRequest {
    List,
    Get {
        name: String,
    },
    Save {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Make a job from the template.
    Submit {
        name: String,
    },
}

impl TemplateRequest {
    pub(super) fn name(&self) -> &'static str {
        match self {
            TemplateRequest::List => "list_templates",
            TemplateRequest::Get { .. } => "get_template",
            TemplateRequest::Save { .. } => "save_template",
            TemplateRequest::Delete { .. } => "delete_template",
            TemplateRequest::Submit { .. } => "submit_template",
        }
    }
}

impl From<TemplateError> for ApiError {
    fn from(e: TemplateError) -> Self {
        match e {
            TemplateError::NotFound(name) => ApiError::NotFound(format!(
                "no template named {name:?}; agentctl template list shows them"
            )),
            // Turned into the caller's refusal by the handlers, which know the caller.
            TemplateError::NotOwner { .. } => ApiError::Forbidden {
                rule: "own-templates",
                message: e.to_string(),
            },
            TemplateError::TooManyForUser { .. } | TemplateError::TooMany { .. } => {
                ApiError::Conflict(e.to_string())
            }
            TemplateError::Store(e) => ApiError::Internal(e.to_string()),
        }
    }
}

/// Runs store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("the template request failed: {e}")))?
}

/// Answers a template request.
pub(super) async fn respond(
    state: &ApiState,
    caller: &Caller,
    request: TemplateRequest,
    body: Bytes,
    content_type: Option<&str>,
) -> Result<hyper::Response<Body>, ApiError> {
    let Some(templates) = state.templates.clone() else {
        return Err(ApiError::NotFound(
            "this agent keeps no job templates: templates are a standalone-mode feature in this \
             release; in cluster mode keep the manifests (in git, or as ConfigMaps) and submit \
             them with agentctl submit FILE"
                .to_owned(),
        ));
    };
    match request {
        TemplateRequest::List => {
            let list = blocking(move || {
                Ok(agentd_api::templates::TemplateList {
                    templates: templates.list().map_err(TemplateError::from)?,
                })
            })
            .await?;
            Ok(json(StatusCode::OK, &list))
        }
        TemplateRequest::Get { name } => {
            let template = blocking(move || Ok(templates.get(&name)?)).await?;
            Ok(json(StatusCode::OK, &template))
        }
        TemplateRequest::Save { name } => {
            super::check_manifest_type(content_type)?;
            save(state, caller, templates, name, body).await
        }
        TemplateRequest::Delete { name } => {
            let who = caller.clone();
            let deleted = blocking(move || {
                templates
                    .delete(&name, |owner| who.may_change_template(owner))
                    .map_err(|e| refusal(&who, &name, e))
            })
            .await?;
            Ok(json(StatusCode::OK, &deleted))
        }
        TemplateRequest::Submit { name } => submit(state, caller, templates, name, body).await,
    }
}

/// A store error as this caller's answer: a refusal names the rule and the owner.
fn refusal(caller: &Caller, name: &str, e: TemplateError) -> ApiError {
    match e {
        TemplateError::NotOwner { owner, .. } => caller.not_template_owner(name, &owner),
        other => other.into(),
    }
}

fn bad_name(name: &str) -> Result<(), ApiError> {
    template::check_name(name).map_err(|message| ApiError::BadRequest {
        message,
        field: Some("name".to_owned()),
    })
}

async fn save(
    state: &ApiState,
    caller: &Caller,
    templates: Templates,
    name: String,
    body: Bytes,
) -> Result<hyper::Response<Body>, ApiError> {
    caller.may_submit()?;
    bad_name(&name)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty: send a TrainingJob or TFJob manifest in YAML or JSON",
        ));
    }
    let manifest = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad_request("the manifest is not UTF-8 text: send YAML or JSON"))?;
    let admission = Arc::clone(&state.admission.borrow());
    let who = caller.clone();
    let (saved, template) = blocking(move || {
        template::check(manifest.as_bytes(), &name, &admission).map_err(CoreError::from)?;
        let saved = templates
            .save(
                &name,
                &manifest,
                &who.owner,
                crate::inventory::unix_now(),
                |owner| who.may_change_template(owner),
            )
            .map_err(|e| refusal(&who, &name, e))?;
        Ok((saved, templates.get(&name)?))
    })
    .await?;
    let status = match saved {
        crate::store::templates::Saved::Created => StatusCode::CREATED,
        crate::store::templates::Saved::Replaced => StatusCode::OK,
    };
    Ok(json(status, &template))
}

async fn submit(
    state: &ApiState,
    caller: &Caller,
    templates: Templates,
    name: String,
    body: Bytes,
) -> Result<hyper::Response<Body>, ApiError> {
    caller.may_submit()?;
    let request: TemplateSubmit = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a request to make a job from a template \
             ({{\"name\": \"NEW\", \"set\": [\"PATH=VALUE\", ...]}}): {e}"
        ))
    })?;
    let admission = Arc::clone(&state.admission.borrow());
    let template = blocking(move || Ok(templates.get(&name)?)).await?;
    caller.may_run_template(&template.name, &template.owner)?;
    let made = blocking(move || {
        Ok(template::instantiate(
            &template.manifest,
            &template.name,
            &request.name,
            &request.set,
            &admission,
        )
        .map_err(CoreError::from)?)
    })
    .await?;
    let status = state
        .core
        .ask(|reply| Command::Submit {
            job: Box::new(made.job),
            manifest: made.manifest,
            owner: caller.owner.clone(),
            reply,
        })
        .await?;
    Ok(json(StatusCode::CREATED, &status))
}
