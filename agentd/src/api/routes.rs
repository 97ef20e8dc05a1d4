//! Matches a method and path to a `Route`, with its query parameters parsed and checked. Unknown
//! paths are 404; a known path with the wrong method is 405 naming the methods it takes; a bad
//! query parameter is 400 naming it.

use agentd_api::jobs::JobState;
use hyper::Method;

use super::ApiError;
use super::templates::TemplateRequest;

/// Every request the API understands, with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Status,
    Node,
    ListJobs {
        queue: Option<String>,
        state: Option<JobState>,
        /// Only this user's jobs.
        user: Option<String>,
    },
    SubmitJob,
    GetJob {
        name: String,
        /// Also a job removed a moment ago (its last status), for clients waiting on it.
        removed: bool,
    },
    CancelJob {
        name: String,
    },
    JobLogs {
        name: String,
        replica: Option<String>,
        follow: bool,
    },
    Queues,
    Nodes,
    /// `POST /v1/nodes/{name}/drain` (`drain: true`) or `/resume` (`drain: false`).
    DrainNode {
        name: String,
        drain: bool,
    },
    Events {
        after: i64,
        limit: u32,
        job: Option<String>,
    },
    History(super::history::HistoryRequest),
    Template(super::templates::TemplateRequest),
}

impl Route {
    pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Self, ApiError> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let query = Query::parse(query.unwrap_or(""))?;
        let not_allowed = |allowed: &'static str| ApiError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allowed,
        };
        let get = method == Method::GET || method == Method::HEAD;
        let route = match (segments.as_slice(), get) {
            (["healthz"], true) => Route::Healthz,
            (["readyz"], true) => Route::Readyz,
            (["v1", "status"], true) => Route::Status,
            (["v1", "node"], true) => Route::Node,
            (["v1", "queues"], true) => Route::Queues,
            (["v1", "nodes"], true) => Route::Nodes,
            (["v1", "nodes", name, action @ ("drain" | "resume")], false)
                if method == Method::POST =>
            {
                Route::DrainNode {
                    name: decode(name)?,
                    drain: *action == "drain",
                }
            }
            (["v1", "templates", name, "jobs"], false) if method == Method::POST => {
                Route::Template(TemplateRequest::Submit {
                    name: decode(name)?,
                })
            }
            (["v1", "nodes", _, "drain" | "resume"] | ["v1", "templates", _, "jobs"], _) => {
                return Err(not_allowed("POST"));
            }
            (
                ["healthz" | "readyz"]
                | [
                    "v1",
                    "status" | "node" | "nodes" | "queues" | "events" | "history" | "templates",
                ]
                | ["v1", "jobs", _, "logs"],
                false,
            ) => return Err(not_allowed("GET")),
            (["v1", "jobs"], true) => Route::ListJobs {
                queue: query.get("queue").map(str::to_owned),
                user: query.get("user").map(str::to_owned),
                state: match query.get("state") {
                    None => None,
                    Some(s) => Some(JobState::parse(s).ok_or_else(|| ApiError::BadRequest {
                        message: format!(
                            "unknown state {s:?}; states: {}",
                            JobState::ALL.map(JobState::as_str).join(", ")
                        ),
                        field: Some("state".to_owned()),
                    })?),
                },
            },
            (["v1", "jobs"], false) if method == Method::POST => Route::SubmitJob,
            (["v1", "jobs"], false) => return Err(not_allowed("GET, POST")),
            (["v1", "jobs", name], true) => Route::GetJob {
                name: decode(name)?,
                removed: query.flag("removed")?,
            },
            (["v1", "jobs", name], false) if method == Method::DELETE => Route::CancelJob {
                name: decode(name)?,
            },
            (["v1", "jobs", _], false) => return Err(not_allowed("GET, DELETE")),
            (["v1", "jobs", name, "logs"], true) => Route::JobLogs {
                name: decode(name)?,
                replica: query.get("replica").map(str::to_owned),
                follow: query.flag("follow")?,
            },
            (["v1", "history"], true) => Route::History(super::history::parse(&query)?),
            (["v1", "templates"], true) => Route::Template(TemplateRequest::List),
            (["v1", "templates", name], true) => Route::Template(TemplateRequest::Get {
                name: decode(name)?,
            }),
            (["v1", "templates", name], false) if method == Method::PUT => {
                Route::Template(TemplateRequest::Save {
                    name: decode(name)?,
                })
            }
            (["v1", "templates", name], false) if method == Method::DELETE => {
                Route::Template(TemplateRequest::Delete {
                    name: decode(name)?,
                })
            }
            (["v1", "templates", _], false) => return Err(not_allowed("GET, PUT, DELETE")),
            (["v1", "events"], true) => Route::Events {
                after: query.number("after")?.unwrap_or(0),
                limit: query.number("limit")?.map_or(Ok(1000), |n: i64| {
                    u32::try_from(n)
                        .ok()
                        .filter(|n| (1..=10_000).contains(n))
                        .ok_or_else(|| ApiError::BadRequest {
                            message: "must be between 1 and 10000".to_owned(),
                            field: Some("limit".to_owned()),
                        })
                })?,
                job: query.get("job").map(str::to_owned),
            },
            _ => return Err(ApiError::NotFound(format!("no such API path: {path}"))),
        };
        Ok(route)
    }

    /// A stable name for logs and metrics, without the path parameters.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Status => "status",
            Route::Node => "node",
            Route::ListJobs { .. } => "list_jobs",
            Route::SubmitJob => "submit_job",
            Route::GetJob { .. } => "get_job",
            Route::CancelJob { .. } => "cancel_job",
            Route::JobLogs { .. } => "job_logs",
            Route::Queues => "queues",
            Route::Nodes => "nodes",
            Route::DrainNode { drain: true, .. } => "drain_node",
            Route::DrainNode { drain: false, .. } => "resume_node",
            Route::Events { .. } => "events",
            Route::History(_) => "history",
            Route::Template(request) => request.name(),
        }
    }
}

/// Decoded query parameters.
pub(super) struct Query(Vec<(String, String)>);

impl Query {
    fn parse(text: &str) -> Result<Self, ApiError> {
        let mut pairs = Vec::new();
        for part in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((decode(k)?, decode(v)?));
        }
        Ok(Self(pairs))
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None | Some("false" | "0") => Ok(false),
            Some("" | "true" | "1") => Ok(true),
            Some(other) => Err(ApiError::BadRequest {
                message: format!("{other:?} is not a boolean: use true or false"),
                field: Some(key.to_owned()),
            }),
        }
    }

    pub(super) fn number(&self, key: &str) -> Result<Option<i64>, ApiError> {
        self.get(key)
            .map(|v| {
                v.parse().map_err(|_| ApiError::BadRequest {
                    message: format!("{v:?} is not a whole number"),
                    field: Some(key.to_owned()),
                })
            })
            .transpose()
    }
}

/// Percent-decodes one path segment or query component (`+` is a space in queries).
fn decode(text: &str) -> Result<String, ApiError> {
    let bad = || ApiError::bad_request(format!("malformed percent-encoding in {text:?}"));
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text.get(i + 1..i + 3).ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_paths() {
        assert_eq!(
            Route::parse(&Method::GET, "/v1/status", None).unwrap(),
            Route::Status
        );
        assert_eq!(
            Route::parse(&Method::GET, "/v1/status/", None).unwrap(),
            Route::Status
        );
        assert!(matches!(
            Route::parse(&Method::GET, "/v2/status", None),
            Err(ApiError::NotFound(_))
        ));
        assert!(matches!(
            Route::parse(&Method::POST, "/v1/node", None),
            Err(ApiError::MethodNotAllowed { allowed: "GET", .. })
        ));
        assert!(matches!(
            Route::parse(&Method::PUT, "/v1/jobs/x", None),
            Err(ApiError::MethodNotAllowed {
                allowed: "GET, DELETE",
                ..
            })
        ));
    }

    #[test]
    fn node_routes() {
        assert_eq!(
            Route::parse(&Method::GET, "/v1/nodes", None).unwrap(),
            Route::Nodes
        );
        assert_eq!(
            Route::parse(&Method::POST, "/v1/nodes/gpu-7/drain", None).unwrap(),
            Route::DrainNode {
                name: "gpu-7".into(),
                drain: true
            }
        );
        assert_eq!(
            Route::parse(&Method::POST, "/v1/nodes/gpu-7/resume", None).unwrap(),
            Route::DrainNode {
                name: "gpu-7".into(),
                drain: false
            }
        );
        assert!(matches!(
            Route::parse(&Method::GET, "/v1/nodes/gpu-7/drain", None),
            Err(ApiError::MethodNotAllowed {
                allowed: "POST",
                ..
            })
        ));
        assert!(matches!(
            Route::parse(&Method::POST, "/v1/nodes", None),
            Err(ApiError::MethodNotAllowed { allowed: "GET", .. })
        ));
        assert!(matches!(
            Route::parse(&Method::POST, "/v1/nodes/gpu-7/reboot", None),
            Err(ApiError::NotFound(_))
        ));
    }

    #[test]
    fn template_routes() {
        let parse = |method: Method, path: &str| Route::parse(&method, path, None);
        assert_eq!(
            parse(Method::GET, "/v1/templates").unwrap(),
            Route::Template(TemplateRequest::List)
        );
        assert_eq!(
            parse(Method::PUT, "/v1/templates/tf2").unwrap(),
            Route::Template(TemplateRequest::Save { name: "tf2".into() })
        );
        assert_eq!(
            parse(Method::GET, "/v1/templates/tf2").unwrap(),
            Route::Template(TemplateRequest::Get { name: "tf2".into() })
        );
        assert_eq!(
            parse(Method::DELETE, "/v1/templates/tf2").unwrap(),
            Route::Template(TemplateRequest::Delete { name: "tf2".into() })
        );
        assert_eq!(
            parse(Method::POST, "/v1/templates/tf2/jobs").unwrap(),
            Route::Template(TemplateRequest::Submit { name: "tf2".into() })
        );
        assert!(matches!(
            parse(Method::POST, "/v1/templates"),
            Err(ApiError::MethodNotAllowed { allowed: "GET", .. })
        ));
        assert!(matches!(
            parse(Method::POST, "/v1/templates/tf2"),
            Err(ApiError::MethodNotAllowed {
                allowed: "GET, PUT, DELETE",
                ..
            })
        ));
        assert!(matches!(
            parse(Method::GET, "/v1/templates/tf2/jobs"),
            Err(ApiError::MethodNotAllowed {
                allowed: "POST",
                ..
            })
        ));
    }

    #[test]
    fn query_parameters_are_checked() {
        assert_eq!(
            Route::parse(&Method::GET, "/v1/jobs", Some("state=running&queue=fast")).unwrap(),
            Route::ListJobs {
                queue: Some("fast".into()),
                state: Some(JobState::Running),
                user: None,
            }
        );
        let err = Route::parse(&Method::GET, "/v1/jobs", Some("state=sleeping")).unwrap_err();
        assert!(
            matches!(err, ApiError::BadRequest { field: Some(ref f), .. } if f == "state"),
            "{err}"
        );
        assert_eq!(
            Route::parse(
                &Method::GET,
                "/v1/jobs/mnist/logs",
                Some("replica=worker-1&follow")
            )
            .unwrap(),
            Route::JobLogs {
                name: "mnist".into(),
                replica: Some("worker-1".into()),
                follow: true
            }
        );
        assert!(Route::parse(&Method::GET, "/v1/events", Some("limit=0")).is_err());
        assert!(Route::parse(&Method::GET, "/v1/jobs/%zz", None).is_err());
    }
}
