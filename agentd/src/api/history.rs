//! `GET /v1/history`: finished jobs with their accounting, or their summary by user or queue.
//! The query runs on the history's own database connection, on a blocking thread: a page of
//! history never waits for the core, nor the core for it.

use agentd_api::history::SummaryBy;
use agentd_api::jobs::JobState;
use hyper::StatusCode;

use super::routes::Query;
use super::{ApiError, Body, json};
use crate::core::CoreHandle;
use crate::store::{Cursor, HistoryFilter};

/// Entries in a page when the caller names no `limit`.
pub const DEFAULT_LIMIT: u32 = 100;

/// A history request, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRequest {
    pub filter: HistoryFilter,
    pub cursor: Option<Cursor>,
    pub limit: u32,
    /// A summary grouped this way instead of a page of jobs.
    pub summary: Option<SummaryBy>,
}

// `HistoryFilter` holds times as f64, which are never NaN here (parsing refuses them).
impl Eq for HistoryRequest {}

fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::BadRequest {
        message: message.into(),
        field: Some(field.to_owned()),
    }
}

fn time(query: &Query, key: &str) -> Result<Option<f64>, ApiError> {
    query
        .get(key)
        .map(|v| {
            v.parse::<f64>()
                .ok()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .ok_or_else(|| bad(key, format!("{v:?} is not a time: give Unix seconds")))
        })
        .transpose()
}

/// Reads the query parameters of `GET /v1/history`.
pub(super) fn parse(query: &Query) -> Result<HistoryRequest, ApiError> {
    let state = match query.get("state") {
        None => None,
        Some(s) => Some(
            JobState::parse(s)
                .filter(|s| s.is_finished())
                .ok_or_else(|| {
                    bad(
                        "state",
                        format!(
                            "{s:?} is not a finished state; states: Succeeded, Failed, Cancelled"
                        ),
                    )
                })?,
        ),
    };
    let limit = query.number("limit")?.map_or(Ok(DEFAULT_LIMIT), |n| {
        u32::try_from(n)
            .ok()
            .filter(|n| (1..=crate::store::history::MAX_PAGE).contains(n))
            .ok_or_else(|| {
                bad(
                    "limit",
                    format!("must be between 1 and {}", crate::store::history::MAX_PAGE),
                )
            })
    })?;
    let cursor = query
        .get("cursor")
        .map(|c| {
            Cursor::parse(c).ok_or_else(|| {
                bad(
                    "cursor",
                    format!(
                        "{c:?} is not a cursor: pass next_cursor of the previous page as it came"
                    ),
                )
            })
        })
        .transpose()?;
    let summary = query
        .get("summary")
        .map(|s| {
            SummaryBy::parse(s)
                .ok_or_else(|| bad("summary", format!("{s:?}: summarize by user or queue")))
        })
        .transpose()?;
    let filter = HistoryFilter {
        user: query.get("user").map(str::to_owned),
        state,
        queue: query.get("queue").map(str::to_owned),
        since: time(query, "since")?,
        until: time(query, "until")?,
        name_prefix: query.get("name").map(str::to_owned),
    };
    if let (Some(since), Some(until)) = (filter.since, filter.until)
        && since > until
    {
        return Err(bad("until", "is before since"));
    }
    Ok(HistoryRequest {
        filter,
        cursor,
        limit,
        summary,
    })
}

/// Answers a history request from the store.
pub(super) async fn respond(
    core: &CoreHandle,
    request: HistoryRequest,
) -> Result<hyper::Response<Body>, ApiError> {
    let Some(history) = core.history() else {
        return Err(ApiError::NotFound(
            "this agent keeps no job history: in cluster mode the TrainingJob objects are the \
             history (kubectl get trainingjobs -A)"
                .to_owned(),
        ));
    };
    let failed = |e: crate::store::StoreError| ApiError::Internal(e.to_string());
    tokio::task::spawn_blocking(move || match request.summary {
        Some(by) => history
            .summary(&request.filter, by)
            .map(|s| json(StatusCode::OK, &s))
            .map_err(failed),
        None => history
            .page(&request.filter, request.cursor, request.limit)
            .map(|p| json(StatusCode::OK, &p))
            .map_err(failed),
    })
    .await
    .map_err(|e| ApiError::Internal(format!("reading the history failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use hyper::Method;

    use super::*;
    use crate::api::Route;

    fn route(query: &str) -> Result<HistoryRequest, ApiError> {
        match Route::parse(&Method::GET, "/v1/history", Some(query))? {
            Route::History(request) => Ok(request),
            other => panic!("not a history route: {other:?}"),
        }
    }

    fn field(query: &str) -> String {
        match route(query) {
            Err(ApiError::BadRequest {
                field: Some(field), ..
            }) => field,
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn history_parameters_are_read_and_checked_by_name() {
        let request = route(
            "user=alice&state=failed&queue=fast&since=10&until=20.5&name=mnist-&limit=5\
             &cursor=15.25:7",
        )
        .unwrap();
        assert_eq!(
            request.filter,
            HistoryFilter {
                user: Some("alice".into()),
                state: Some(JobState::Failed),
                queue: Some("fast".into()),
                since: Some(10.0),
                until: Some(20.5),
                name_prefix: Some("mnist-".into()),
            }
        );
        assert_eq!(
            request.cursor,
            Some(Cursor {
                finished: 15.25,
                id: 7
            })
        );
        assert_eq!(request.limit, 5);
        assert_eq!(route("").unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(
            route("summary=queue").unwrap().summary,
            Some(SummaryBy::Queue)
        );
        assert_eq!(field("state=running"), "state");
        assert_eq!(field("limit=0"), "limit");
        assert_eq!(field("limit=1001"), "limit");
        assert_eq!(field("cursor=yesterday"), "cursor");
        assert_eq!(field("since=NaN"), "since");
        assert_eq!(field("since=20&until=10"), "until");
        assert_eq!(field("summary=node"), "summary");
        assert!(matches!(
            Route::parse(&Method::POST, "/v1/history", None),
            Err(ApiError::MethodNotAllowed { allowed: "GET", .. })
        ));
    }
}
