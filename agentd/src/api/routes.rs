//! Matches a method and path to a `Route`. Unknown paths are 404; a known path with the wrong
//! method is 405 naming the methods it takes.

use hyper::Method;

use super::ApiError;

/// Every request the API understands, with its path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Readyz,
    Status,
    Node,
}

impl Route {
    pub fn parse(method: &Method, path: &str) -> Result<Self, ApiError> {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let get_only = |route: Route| {
            if method == Method::GET || method == Method::HEAD {
                Ok(route)
            } else {
                Err(ApiError::MethodNotAllowed {
                    method: method.to_string(),
                    path: path.to_owned(),
                    allowed: "GET",
                })
            }
        };
        match segments.as_slice() {
            ["healthz"] => get_only(Route::Healthz),
            ["readyz"] => get_only(Route::Readyz),
            ["v1", "status"] => get_only(Route::Status),
            ["v1", "node"] => get_only(Route::Node),
            _ => Err(ApiError::NotFound(format!("no such API path: {path}"))),
        }
    }

    /// A stable name for logs and metrics, without the path parameters.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Status => "status",
            Route::Node => "node",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_paths() {
        assert_eq!(Route::parse(&Method::GET, "/v1/status").unwrap(), Route::Status);
        assert_eq!(Route::parse(&Method::GET, "/v1/status/").unwrap(), Route::Status);
        assert!(matches!(Route::parse(&Method::GET, "/v2/status"), Err(ApiError::NotFound(_))));
        assert!(matches!(
            Route::parse(&Method::POST, "/v1/node"),
            Err(ApiError::MethodNotAllowed { allowed: "GET", .. })
        ));
    }
}
