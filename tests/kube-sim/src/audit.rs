//! The audit log: one JSON line per request served, written as the response leaves, so tests
//! can count writes per user and find the requests that were refused.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::json;

use crate::rbac::Attributes;

/// An open audit log file.
pub struct AuditLog {
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Creates (or truncates) the file.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: Mutex::new(std::fs::File::create(path)?),
        })
    }

    /// Appends one line: who did what to which object, and the response code. `name` is the
    /// object's: for a create, whose URL names none, the name of the object created (as
    /// kube-apiserver fills `objectRef.name` from the object).
    pub fn record(
        &self,
        user: &str,
        request: &http::request::Parts,
        a: &Attributes,
        name: &str,
        code: u16,
    ) {
        let user_agent = request
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let line = json!({
            // Microseconds, as kube-apiserver's `stageTimestamp`.
            "timestamp": crate::clock::now_micros(),
            "user": user,
            // The request's User-Agent header, as kube-apiserver's `userAgent`.
            "userAgent": user_agent,
            "verb": a.verb,
            "method": request.method.as_str(),
            "uri": request.uri.to_string(),
            "apiGroup": a.group,
            "resource": a.resource,
            "subresource": a.subresource,
            "namespace": a.namespace,
            "name": name,
            "code": code,
        });
        let mut text = line.to_string();
        text.push('\n');
        let mut f = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // One write per line, so a reader never sees half a line from two requests.
        if let Err(e) = f.write_all(text.as_bytes()) {
            tracing::warn!(error = %e, "writing the audit log");
        }
    }
}
