//! Every way a request can fail, and the one place each is given its HTTP status.

use agentd_api::error::FieldProblem;
use agentd_api::{ErrorBody, ErrorCode};
use hyper::StatusCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}; allowed: {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("{message}")]
    BadRequest {
        message: String,
        field: Option<String>,
    },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the job spec is invalid")]
    Invalid(Vec<FieldProblem>),
    #[error("{0}")]
    Unauthorized(String),
    /// A rule refused the request; `rule` is its short name (`own-jobs`, `admin-only`).
    #[error("forbidden by rule {rule}: {message}")]
    Forbidden { rule: &'static str, message: String },
    #[error("{0}")]
    TooManyRequests(String),
    #[error("the request body did not arrive within {after:?}")]
    RequestTimeout { after: std::time::Duration },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            field: None,
        }
    }

    /// The status and body. No `_` arm: a new error cannot ship without a status.
    pub fn to_response_parts(&self) -> (StatusCode, ErrorBody) {
        let message = self.to_string();
        let (status, code) = match self {
            Self::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            Self::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::MethodNotAllowed)
            }
            Self::BadRequest { .. } => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            Self::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::UnsupportedMediaType,
            ),
            Self::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::PayloadTooLarge)
            }
            Self::Invalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidSpec),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
            Self::Forbidden { .. } => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            Self::RequestTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, ErrorCode::RequestTimeout),
            Self::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
            Self::Conflict(_) => (StatusCode::CONFLICT, ErrorCode::Conflict),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
        };
        let mut body = ErrorBody::new(code, message);
        match self {
            Self::BadRequest {
                field: Some(field), ..
            } => body.error.field = Some(field.clone()),
            Self::Forbidden { rule, .. } => body.error.rule = Some((*rule).to_owned()),
            Self::Invalid(problems) => {
                if let [first, ..] = problems.as_slice() {
                    body.error.field = Some(first.field.clone());
                    body.error.message = format!(
                        "the job spec is invalid: {}: {}{}",
                        first.field,
                        first.message,
                        match problems.len() {
                            1 => String::new(),
                            n => format!(" (and {} more problems, listed in details)", n - 1),
                        }
                    );
                }
                body.error.details.clone_from(problems);
            }
            _ => {}
        }
        (status, body)
    }
}
