//! The one error body every failing request gets: `{"error":{"code","message","field"?}}`.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable error class. Scripts match on these; messages are for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidSpec,
    /// No credentials, or credentials the agent does not accept (HTTP 401).
    Unauthorized,
    /// The caller is known but a rule forbids the request (HTTP 403); `rule` names it.
    Forbidden,
    /// The caller sent more requests than its rate allows (HTTP 429).
    TooManyRequests,
    /// The request did not arrive in time (HTTP 408).
    RequestTimeout,
    NotFound,
    MethodNotAllowed,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unavailable,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// Path of the offending field, such as `spec.replicaSpecs.Worker.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For `forbidden`: the authorization rule that refused the request, such as `own-jobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Further problems found in the same request, when validation found more than one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<FieldProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
                field: None,
                rule: None,
                details: Vec::new(),
            },
        }
    }

    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.error.field = Some(field.into());
        self
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &self.error;
        if !e.details.is_empty() {
            let count = e.details.len();
            write!(
                f,
                "the job spec is invalid ({count} problem{}):",
                if count == 1 { "" } else { "s" }
            )?;
            for problem in &e.details {
                write!(f, "\n  {}: {}", problem.field, problem.message)?;
            }
            return Ok(());
        }
        match &e.field {
            Some(field) if !e.message.starts_with(field.as_str()) => {
                write!(f, "{field}: {}", e.message)
            }
            _ => f.write_str(&e.message),
        }
    }
}
