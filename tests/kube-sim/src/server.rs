//! The HTTP edge: parses Kubernetes API paths, query parameters and bodies, calls the store,
//! and writes JSON, `Table` and watch-stream responses with `Status` objects for errors.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::access;
use crate::audit::AuditLog;
use crate::auth::{self, Authenticator, UserInfo};
use crate::defaults;
use crate::fault::{FaultSpec, FaultSwitch};
use crate::kubelet::{Kubelets, PodLogs};
use crate::patch;
use crate::rbac::{self, Attributes, AuthorizationMode};
use crate::resources::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{
    DeleteOptions, EventType, Propagation, Store, StoreError, WatchEnd, WatchEvent, WatchFrom,
    WriteMode,
};
use crate::table::{self, IncludeObject};

/// The largest request body accepted, as a real server's default.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// A response body: whole, or a stream of watch events.
pub enum ApiBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Self::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
}

/// What handlers share.
pub struct ApiState {
    pub store: Arc<Store>,
    pub logs: Arc<PodLogs>,
    pub addr: SocketAddr,
    pub bookmark_interval: Duration,
    pub auth: Authenticator,
    pub authorization: AuthorizationMode,
    pub audit: Option<AuditLog>,
    /// The simulated kubelets, for the control endpoint.
    pub kubelets: Option<Arc<Kubelets>>,
    /// While on, every API request is answered with the fault's error status.
    pub fault: FaultSwitch,
}

type Resp = Response<ApiBody>;

fn json_response(code: StatusCode, body: &Value) -> Resp {
    bytes_response(
        code,
        "application/json",
        Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
    )
}

fn bytes_response(code: StatusCode, content_type: &str, body: Bytes) -> Resp {
    let mut r = Response::new(ApiBody::Full(Some(body)));
    *r.status_mut() = code;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn status_object(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut s = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code});
    if let Some(d) = details {
        s["details"] = d;
    }
    s
}

/// Maps every store error to its HTTP status and `Status.reason`; no catch-all arm, so a new
/// error cannot ship without one.
fn error_response(err: &StoreError) -> Resp {
    let message = err.to_string();
    let (code, reason, details) = match err {
        StoreError::NotFound { resource, name } => {
            let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
            (
                StatusCode::NOT_FOUND,
                "NotFound",
                Some(json!({"name": name, "group": group, "kind": kind})),
            )
        }
        StoreError::AlreadyExists { resource, name } => {
            let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
            (
                StatusCode::CONFLICT,
                "AlreadyExists",
                Some(json!({"name": name, "group": group, "kind": kind})),
            )
        }
        StoreError::Conflict { resource, name, .. } => {
            let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
            (
                StatusCode::CONFLICT,
                "Conflict",
                Some(json!({"name": name, "group": group, "kind": kind})),
            )
        }
        StoreError::Invalid {
            group,
            kind,
            name,
            causes,
        } => {
            let causes: Vec<Value> = causes
                .iter()
                .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                .collect();
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                Some(json!({"name": name, "group": group, "kind": kind, "causes": causes})),
            )
        }
        StoreError::Gone(_) => (StatusCode::GONE, "Expired", None),
        StoreError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequest", None),
        StoreError::Forbidden { resource, name, .. } => (
            StatusCode::FORBIDDEN,
            "Forbidden",
            Some(json!({"name": name, "kind": resource})),
        ),
        StoreError::MethodNotAllowed(_) => {
            (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", None)
        }
        StoreError::UnsupportedMediaType(_) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            None,
        ),
    };
    json_response(
        code,
        &status_object(code.as_u16(), reason, &message, details),
    )
}

fn not_found_path() -> Resp {
    json_response(
        StatusCode::NOT_FOUND,
        &status_object(
            404,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ),
    )
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Self(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }

    fn number(&self, k: &str) -> Result<Option<i64>, StoreError> {
        self.get(k)
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| StoreError::BadRequest(format!("{k}: {v:?} is not an integer")))
            })
            .transpose()
    }
}

/// A parsed resource path.
struct Target {
    ty: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

enum Route {
    Version,
    Health,
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    Resource(Box<Target>, bool),
    OpenApiV2,
    OpenApiRoot,
    OpenApiGroupVersion(String),
    /// `POST /kube-sim/v1/nodes/{name}/{stop|restart}`: the simulator's own control endpoint.
    Control(String, String),
    /// `POST /kube-sim/v1/fault` (a [`FaultSpec`]) or `DELETE` it: the fault switch.
    Fault,
    /// `POST /kube-sim/v1/compact`: [`Store::compact`].
    Compact,
    Unknown,
}

fn route(store: &Store, path: &str) -> Route {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest) = match s.as_slice() {
        ["version"] => return Route::Version,
        ["kube-sim", "v1", "nodes", node, action] => {
            return Route::Control((*node).to_string(), (*action).to_string());
        }
        ["kube-sim", "v1", "fault"] => return Route::Fault,
        ["kube-sim", "v1", "compact"] => return Route::Compact,
        ["healthz" | "livez" | "readyz", ..] => return Route::Health,
        ["openapi", "v2"] => return Route::OpenApiV2,
        ["openapi", "v3"] => return Route::OpenApiRoot,
        ["openapi", "v3", gv @ ..] => return Route::OpenApiGroupVersion(gv.join("/")),
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", g] => return Route::Group((*g).to_string()),
        ["api", v] => return Route::Resources(String::new(), (*v).to_string()),
        ["apis", g, v] => return Route::Resources((*g).to_string(), (*v).to_string()),
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::Unknown,
    };
    let (watch_prefix, rest) = match rest {
        ["watch", r @ ..] => (true, r),
        r => (false, r),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, r @ ..] if !(r.is_empty() || r.len() == 1 && r[0] == "status") => {
            (Some((*ns).to_string()), r)
        }
        r => (None, r),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_string()), None),
        [p, n, sub] => (*p, Some((*n).to_string()), Some((*sub).to_string())),
        _ => return Route::Unknown,
    };
    let Some(ty) = store.resource_type(group, version, plural) else {
        return Route::Unknown;
    };
    if namespace.is_some() && !ty.namespaced {
        return Route::Unknown;
    }
    if let Some(sub) = &sub
        && !ty.subresources.iter().any(|s| s == sub)
    {
        return Route::Unknown;
    }
    Route::Resource(
        Box::new(Target {
            ty,
            namespace,
            name,
            subresource: sub,
        }),
        watch_prefix,
    )
}

/// How the client wants objects back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Representation {
    Object,
    Table(IncludeObject),
    Metadata,
}

fn representation(req_accept: &str, q: &Query) -> Representation {
    if req_accept.contains("as=Table") {
        let include = match q.get("includeObject") {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        };
        Representation::Table(include)
    } else if req_accept.contains("as=PartialObjectMetadata") {
        Representation::Metadata
    } else {
        Representation::Object
    }
}

/// The object as the requested version shows it.
fn present<'a>(ty: &ResourceType, obj: &'a Value) -> Cow<'a, Value> {
    if ty.group == "events.k8s.io" {
        return Cow::Owned(defaults::event_to_events_v1(obj));
    }
    let want = ty.api_version();
    if obj.get("apiVersion").and_then(Value::as_str) == Some(want.as_str()) {
        Cow::Borrowed(obj)
    } else {
        let mut o = obj.clone();
        o["apiVersion"] = json!(want);
        Cow::Owned(o)
    }
}

fn metadata_only(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata").cloned().unwrap_or(json!({}))})
}

fn render_one(ty: &ResourceType, obj: &Value, rep: Representation, rv: u64) -> Value {
    match rep {
        Representation::Object => present(ty, obj).into_owned(),
        Representation::Metadata => metadata_only(obj),
        Representation::Table(inc) => table::table(ty, &[&present(ty, obj)], inc, true, rv, None),
    }
}

fn hex(s: &str) -> String {
    use std::fmt::Write;
    s.bytes().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn continue_token(rv: u64, key: &(String, String)) -> String {
    hex(&format!("{rv}/{}/{}", key.0, key.1))
}

fn parse_continue(token: &str) -> Result<(u64, (String, String)), StoreError> {
    let bad = || {
        StoreError::BadRequest(format!(
            "continue key {token:?} is not valid: it must be a token returned by a previous list"
        ))
    };
    let s = unhex(token).ok_or_else(bad)?;
    let mut parts = s.splitn(3, '/');
    let rv = parts.next().and_then(|r| r.parse().ok()).ok_or_else(bad)?;
    let ns = parts.next().ok_or_else(bad)?.to_string();
    let name = parts.next().ok_or_else(bad)?.to_string();
    Ok((rv, (ns, name)))
}

struct Selectors {
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Selectors {
    fn parse(ty: &ResourceType, q: &Query) -> Result<Self, StoreError> {
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))
            .map_err(|e| StoreError::BadRequest(e.to_string()))?;
        let mut fields = FieldSelector::parse(q.get("fieldSelector").unwrap_or(""))
            .map_err(|e| StoreError::BadRequest(e.to_string()))?;
        if ty.group == "events.k8s.io" {
            fields.rename_prefix("regarding.", "involvedObject.");
        }
        Ok(Self { labels, fields })
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

/// What a request asks to do, for authorization and the audit log.
fn attributes(route: &Route, method: &Method, q: &Query, path: &str) -> Attributes {
    let Route::Resource(t, watch_prefix) = route else {
        return Attributes {
            verb: rbac::non_resource_verb(method).into(),
            path: path.into(),
            ..Attributes::default()
        };
    };
    let watching = *watch_prefix || q.flag("watch");
    let verb = rbac::verb_of(method, t.name.is_some(), watching);
    // A list or watch of one object by name is authorized as that object, as on a real server,
    // so resourceNames rules can allow it.
    let name = t.name.clone().unwrap_or_else(|| {
        if matches!(verb, "list" | "watch") {
            q.get("fieldSelector")
                .and_then(|f| f.strip_prefix("metadata.name="))
                .filter(|n| !n.contains(','))
                .unwrap_or("")
                .to_string()
        } else {
            String::new()
        }
    });
    Attributes {
        verb: verb.into(),
        resource_request: true,
        group: t.ty.group.clone(),
        resource: t.ty.plural.clone(),
        subresource: t.subresource.clone().unwrap_or_default(),
        namespace: t.namespace.clone().unwrap_or_default(),
        name,
        path: path.into(),
    }
}

/// Applies `Impersonate-User` / `Impersonate-Group` headers (as `kubectl --as/--as-group`
/// sends them): the request runs as the impersonated user when the real one may `impersonate`
/// that user (or ServiceAccount) and each group; otherwise the refused attributes come back.
fn impersonate(
    state: &ApiState,
    user: UserInfo,
    headers: &http::HeaderMap,
) -> Result<UserInfo, Box<(String, Attributes)>> {
    let Some(target) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    else {
        return Ok(user);
    };
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect();
    let as_user = UserInfo {
        name: target.to_string(),
        uid: String::new(),
        groups: groups
            .iter()
            .cloned()
            .chain([auth::AUTHENTICATED.to_string()])
            .collect(),
    };
    let mut checks = vec![match as_user.service_account() {
        Some((ns, name)) => ("serviceaccounts", ns.to_string(), name.to_string()),
        None => ("users", String::new(), target.to_string()),
    }];
    checks.extend(groups.iter().map(|g| ("groups", String::new(), g.clone())));
    for (resource, namespace, name) in checks {
        let a = Attributes {
            verb: "impersonate".into(),
            resource_request: true,
            resource: resource.into(),
            namespace,
            name,
            ..Attributes::default()
        };
        let allowed = state.authorization == AuthorizationMode::AlwaysAllow
            || rbac::authorize(&state.store, &user, &a).is_some();
        if !allowed {
            return Err(Box::new((user.name, a)));
        }
    }
    Ok(as_user)
}

fn unauthorized() -> Resp {
    json_response(
        StatusCode::UNAUTHORIZED,
        &status_object(401, "Unauthorized", "Unauthorized", None),
    )
}

fn forbidden(a: &Attributes, user: &str) -> Resp {
    let details = if a.resource_request {
        json!({"name": a.name, "group": a.group, "kind": a.resource})
    } else {
        json!({})
    };
    json_response(
        StatusCode::FORBIDDEN,
        &status_object(403, "Forbidden", &a.forbidden_message(user), Some(details)),
    )
}

/// Serves one request: authenticates, authorizes, serves, and writes the audit line.
pub async fn handle(state: Arc<ApiState>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let (parts, body) = req.into_parts();
    let q = Query::parse(parts.uri.query());
    let route = route(&state.store, parts.uri.path());
    let attrs = attributes(&route, &parts.method, &q, parts.uri.path());
    let authenticated = state
        .auth
        .authenticate(&parts.headers)
        .map(|user| impersonate(&state, user, &parts.headers));
    let (user, resp) = match authenticated {
        Err(_) => (auth::ANONYMOUS.to_string(), unauthorized()),
        Ok(Err(denied)) => {
            let (user, attrs) = *denied;
            let resp = forbidden(&attrs, &user);
            (user, resp)
        }
        Ok(Ok(user)) if !matches!(route, Route::Control(..) | Route::Fault | Route::Compact) => {
            // An overloaded server answers before it authorizes or serves anything.
            match state.fault.active(std::time::Instant::now()) {
                Some(f) => (user.name, fault_response(&f)),
                None => authorize_and_serve(&state, user, &parts, body, route, &attrs, &q).await,
            }
        }
        Ok(Ok(user)) => authorize_and_serve(&state, user, &parts, body, route, &attrs, &q).await,
    };
    if let Some(audit) = &state.audit {
        let created = (attrs.verb == "create" && attrs.name.is_empty())
            .then(|| created_name(&resp))
            .flatten();
        audit.record(
            &user,
            &parts,
            &attrs,
            created.as_deref().unwrap_or(&attrs.name),
            resp.status().as_u16(),
        );
    }
    Ok(resp)
}

/// The name of the object a create made, from the answer: as kube-apiserver completes an
/// audit event's `objectRef` from the request's object, so that the log says what was created.
fn created_name(resp: &Resp) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Object {
        metadata: Metadata,
    }
    #[derive(serde::Deserialize)]
    struct Metadata {
        name: String,
    }
    if !resp.status().is_success() {
        return None;
    }
    let ApiBody::Full(Some(bytes)) = resp.body() else {
        return None;
    };
    serde_json::from_slice::<Object>(bytes)
        .ok()
        .map(|o| o.metadata.name)
}

/// A request answered by the fault switch: its `Status`, with `Retry-After` where
/// kube-apiserver sends one.
fn fault_response(f: &FaultSpec) -> Resp {
    let (status, retry_after) = f.answer();
    let code = StatusCode::from_u16(f.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut resp = json_response(code, &status);
    if let Some(seconds) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
    }
    resp
}

async fn authorize_and_serve(
    state: &Arc<ApiState>,
    user: UserInfo,
    parts: &http::request::Parts,
    body: Incoming,
    route: Route,
    attrs: &Attributes,
    q: &Query,
) -> (String, Resp) {
    let allowed = match &route {
        Route::Control(..) | Route::Fault | Route::Compact => user.is_master(),
        _ => {
            state.authorization == AuthorizationMode::AlwaysAllow
                || rbac::authorize(&state.store, &user, attrs).is_some()
        }
    };
    let resp = if allowed {
        serve(state, &user, parts, body, route, q).await
    } else {
        forbidden(attrs, &user.name)
    };
    (user.name, resp)
}

async fn serve(
    state: &Arc<ApiState>,
    user: &UserInfo,
    parts: &http::request::Parts,
    body: Incoming,
    route: Route,
    q: &Query,
) -> Resp {
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_response(&StoreError::BadRequest(format!(
                "reading the request body: {e}"
            )));
        }
    };
    if body.len() > MAX_BODY {
        return json_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &status_object(
                413,
                "RequestEntityTooLarge",
                "the request body exceeds 3 MiB",
                None,
            ),
        );
    }
    let header = |h: header::HeaderName| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let accept = header(header::ACCEPT);
    let content_type = header(header::CONTENT_TYPE);
    match route {
        Route::Version => json_response(
            StatusCode::OK,
            &json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-sim", "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2", "compiler": "gc", "platform": "linux/amd64"}),
        ),
        Route::Health => bytes_response(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok"),
        ),
        Route::CoreVersions => json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": state.addr.to_string()}]}),
        ),
        Route::Groups => {
            let types = state.store.types();
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for t in types.iter().filter(|t| !t.group.is_empty()) {
                match groups.iter_mut().find(|(g, _)| *g == t.group) {
                    Some((_, vs)) if !vs.contains(&t.version) => vs.push(t.version.clone()),
                    Some(_) => {}
                    None => groups.push((t.group.clone(), vec![t.version.clone()])),
                }
            }
            let groups: Vec<Value> = groups
                .iter()
                .map(|(g, vs)| resources::api_group(g, vs))
                .collect();
            json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        Route::Group(g) => {
            let mut versions: Vec<String> = Vec::new();
            for t in state.store.types().iter().filter(|t| t.group == g) {
                if !versions.contains(&t.version) {
                    versions.push(t.version.clone());
                }
            }
            if versions.is_empty() {
                not_found_path()
            } else {
                json_response(StatusCode::OK, &resources::api_group(&g, &versions))
            }
        }
        Route::Resources(g, v) => {
            let types = state.store.types();
            let matching: Vec<&ResourceType> = types
                .iter()
                .filter(|t| t.group == g && t.version == v)
                .collect();
            if matching.is_empty() {
                not_found_path()
            } else {
                let gv = if g.is_empty() { v } else { format!("{g}/{v}") };
                json_response(StatusCode::OK, &resources::resource_list(&gv, &matching))
            }
        }
        Route::OpenApiV2 => openapi_v2(&accept),
        Route::OpenApiRoot => {
            let mut paths = serde_json::Map::new();
            for t in state.store.types() {
                let gv = if t.group.is_empty() {
                    format!("api/{}", t.version)
                } else {
                    format!("apis/{}/{}", t.group, t.version)
                };
                let url = format!("/openapi/v3/{gv}?hash={:016X}", state.store.current_rv());
                paths.insert(gv, json!({"serverRelativeURL": url}));
            }
            json_response(StatusCode::OK, &json!({"paths": paths}))
        }
        Route::OpenApiGroupVersion(gv) => match openapi_group_version(&state.store, &gv) {
            Some(doc) => json_response(StatusCode::OK, &doc),
            None => not_found_path(),
        },
        Route::Unknown => not_found_path(),
        Route::Control(node, action) => control(state, &node, &action, &parts.method),
        Route::Fault => fault_control(state, &parts.method, &body),
        Route::Compact => compact(state, &parts.method),
        Route::Resource(target, _) if target.ty.group == resources::AUTHORIZATION_GROUP => {
            match access_review(state, user, &parts.method, &target, &content_type, &body) {
                Ok(r) => r,
                Err(e) => error_response(&e),
            }
        }
        Route::Resource(target, watch_prefix) => {
            let rep = representation(&accept, q);
            match serve_resource(
                state,
                &parts.method,
                &target,
                q,
                rep,
                watch_prefix,
                &content_type,
                &body,
            ) {
                Ok(r) => r,
                Err(e) => error_response(&e),
            }
        }
    }
}

/// The fault switch's control endpoint: `POST` a [`FaultSpec`] to turn a fault on, `DELETE` to
/// turn it off. Only `system:masters` gets here.
fn fault_control(state: &ApiState, method: &Method, body: &Bytes) -> Resp {
    let now = std::time::Instant::now();
    let message = match *method {
        Method::POST => {
            let spec = match serde_json::from_slice::<FaultSpec>(body) {
                Ok(spec) => FaultSpec::new(spec.status, spec.for_millis.map(Duration::from_millis)),
                Err(e) => {
                    return error_response(&StoreError::BadRequest(format!(
                        "the fault must be {{\"status\": 429|500|503|504, \"forMillis\": N}} (forMillis optional): {e}"
                    )));
                }
            };
            match spec {
                Ok(spec) => {
                    state.fault.set(spec, now);
                    match spec.for_millis {
                        Some(ms) => {
                            format!("every API request answers {} for {ms} ms", spec.status)
                        }
                        None => format!("every API request answers {} until cleared", spec.status),
                    }
                }
                Err(e) => return error_response(&StoreError::BadRequest(e.to_string())),
            }
        }
        Method::DELETE => {
            if state.fault.clear(now) {
                "fault cleared".to_owned()
            } else {
                "no fault was in force".to_owned()
            }
        }
        _ => {
            return error_response(&StoreError::MethodNotAllowed(format!(
                "{method} is not allowed on the fault endpoint: use POST or DELETE"
            )));
        }
    };
    json_response(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200,
                "message": message}),
    )
}

/// Compacts the store's history: every watch ends with 410 `Expired` and must list again.
fn compact(state: &ApiState, method: &Method) -> Resp {
    if method != Method::POST {
        return error_response(&StoreError::MethodNotAllowed(format!(
            "{method} is not allowed on the compact endpoint: use POST"
        )));
    }
    state.store.compact();
    json_response(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200,
                "message": format!("compacted at resourceVersion {}", state.store.current_rv())}),
    )
}

/// The control endpoint: stops or restarts a simulated node's kubelet, for scripts driving a
/// simulator that runs as its own process. Only `system:masters` gets here.
fn control(state: &ApiState, node: &str, action: &str, method: &Method) -> Resp {
    if method != Method::POST {
        return error_response(&StoreError::MethodNotAllowed(format!(
            "{method} is not allowed on the control endpoint: use POST"
        )));
    }
    let Some(kubelets) = &state.kubelets else {
        return not_found_path();
    };
    let done = match action {
        "stop" => kubelets.stop_node(node),
        "restart" => kubelets.restart_node(node),
        other => {
            return error_response(&StoreError::BadRequest(format!(
                "control action {other:?} is not known: use \"stop\" or \"restart\""
            )));
        }
    };
    if !done {
        return json_response(
            StatusCode::NOT_FOUND,
            &status_object(
                404,
                "NotFound",
                &format!("node {node:?} is not a simulated node"),
                Some(json!({"name": node, "kind": "nodes"})),
            ),
        );
    }
    json_response(
        StatusCode::OK,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200,
                "message": format!("node {node}: {action} done")}),
    )
}

/// Answers a SelfSubjectAccessReview (about the requester) or a SubjectAccessReview (about the
/// user in its spec) from the authorizer.
fn access_review(
    state: &ApiState,
    user: &UserInfo,
    method: &Method,
    t: &Target,
    content_type: &str,
    body: &[u8],
) -> Result<Resp, StoreError> {
    if method != Method::POST || t.name.is_some() {
        return Err(StoreError::MethodNotAllowed(format!(
            "the server does not allow this method on the requested resource: {method} {}",
            t.ty.group_resource().qualified()
        )));
    }
    let review = if content_type.contains("protobuf") {
        access::decode_protobuf(body).map_err(StoreError::BadRequest)?
    } else {
        parse_body(content_type, body)?
    };
    let self_review = t.ty.kind == "SelfSubjectAccessReview";
    let (attrs, subject) =
        access::review_attributes(&review, self_review).map_err(|message| StoreError::Invalid {
            group: t.ty.group.clone(),
            kind: t.ty.kind.clone(),
            name: String::new(),
            causes: vec![defaults::FieldCause {
                field: "spec".into(),
                reason: "FieldValueRequired",
                message,
            }],
        })?;
    let subject = subject.unwrap_or_else(|| user.clone());
    let reason = match state.authorization {
        AuthorizationMode::AlwaysAllow => Some("authorization is off (AlwaysAllow)".to_string()),
        AuthorizationMode::Rbac => rbac::authorize(&state.store, &subject, &attrs),
    };
    let mut out = json!({"kind": t.ty.kind, "apiVersion": t.ty.api_version(),
                         "metadata": {"creationTimestamp": null},
                         "spec": review.get("spec").cloned().unwrap_or(json!({}))});
    out["status"] = match reason {
        Some(r) => json!({"allowed": true, "reason": r}),
        None => json!({"allowed": false}),
    };
    Ok(json_response(StatusCode::CREATED, &out))
}

/// An OpenAPI v2 document with no definitions. Older kubectl releases (Debian's 1.20) fetch it,
/// in protobuf, before validating a manifest, and skip validation of kinds it does not define.
fn openapi_v2(accept: &str) -> Resp {
    if accept.contains("protobuf") {
        // gnostic openapi_v2.Document { swagger = 1: "2.0", info = 2: Info { title = 1, version = 2 } }
        let mut info = vec![0x0a, 10];
        info.extend_from_slice(b"Kubernetes");
        info.extend_from_slice(&[0x12, 7]);
        info.extend_from_slice(b"v1.33.0");
        let mut doc = vec![0x0a, 3];
        doc.extend_from_slice(b"2.0");
        doc.push(0x12);
        doc.push(u8::try_from(info.len()).unwrap_or(0));
        doc.extend_from_slice(&info);
        return bytes_response(StatusCode::OK, "application/octet-stream", Bytes::from(doc));
    }
    json_response(
        StatusCode::OK,
        &json!({"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": {}, "definitions": {}}),
    )
}

/// A minimal OpenAPI v3 document for one group version: the PATCH operation of each resource,
/// tagged with its group-version-kind and the `fieldValidation` parameter, which is what kubectl
/// reads to decide that the server validates fields and it need not. No schemas are published,
/// so clients fall back to their compiled-in types.
fn openapi_group_version(store: &Store, gv: &str) -> Option<Value> {
    let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), (*v).to_string()),
        ["apis", g, v] => ((*g).to_string(), (*v).to_string()),
        _ => return None,
    };
    let types: Vec<ResourceType> = store
        .types()
        .into_iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    if types.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for t in &types {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let path = if t.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{prefix}/{}/{{name}}", t.plural)
        };
        let params = json!([
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}
        ]);
        let gvk = json!({"group": t.group, "version": t.version, "kind": t.kind});
        paths.insert(path, json!({
            "get": {"operationId": format!("read{}", t.kind), "x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk,
                    "responses": {"200": {"description": "OK"}}},
            "put": {"operationId": format!("replace{}", t.kind), "x-kubernetes-action": "put", "x-kubernetes-group-version-kind": gvk,
                    "parameters": params, "responses": {"200": {"description": "OK"}}},
            "patch": {"operationId": format!("patch{}", t.kind), "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk,
                      "parameters": params, "responses": {"200": {"description": "OK"}}},
        }));
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths, "components": {"schemas": {}}}),
    )
}

fn parse_body(content_type: &str, body: &[u8]) -> Result<Value, StoreError> {
    if content_type.contains("yaml") {
        serde_saphyr::from_slice(body)
            .map_err(|e| StoreError::BadRequest(format!("the request body is not valid YAML: {e}")))
    } else if content_type.contains("protobuf") {
        Err(StoreError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format {content_type:?}: accepted media types include application/json and application/yaml"
        )))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| StoreError::BadRequest(format!("the request body is not valid JSON: {e}")))
    }
}

fn check_kind(ty: &ResourceType, obj: &Value) -> Result<(), StoreError> {
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && k != ty.kind
    {
        return Err(StoreError::BadRequest(format!(
            "the kind of the body ({k}) does not match the resource {} (kind {})",
            ty.plural, ty.kind
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn serve_resource(
    state: &Arc<ApiState>,
    method: &Method,
    t: &Target,
    q: &Query,
    rep: Representation,
    watch_prefix: bool,
    content_type: &str,
    body: &[u8],
) -> Result<Resp, StoreError> {
    let store = &state.store;
    let ty = &t.ty;
    let ns = t.namespace.as_deref().unwrap_or("");
    let to_storage = |v: Value| {
        if ty.group == "events.k8s.io" {
            defaults::event_from_events_v1(&v)
        } else {
            v
        }
    };
    if method != Method::GET && q.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return Err(StoreError::BadRequest(
            "dryRun is not supported by kube-sim".into(),
        ));
    }
    match (method, t.name.as_deref(), t.subresource.as_deref()) {
        (&Method::GET, None, None) if watch_prefix || q.flag("watch") => watch(state, t, q, rep),
        (&Method::GET, None, None) => list(store, t, q, rep),
        (&Method::GET, Some(name), None | Some("status")) => {
            let obj = store.get(ty, ns, name)?;
            Ok(json_response(
                StatusCode::OK,
                &render_one(ty, &obj, rep, store.current_rv()),
            ))
        }
        (&Method::GET, Some(name), Some("log")) => pod_log(state, ty, ns, name, q),
        (&Method::POST, None, None) => {
            let obj = to_storage(parse_body(content_type, body)?);
            check_kind(ty, &obj)?;
            // As kube-apiserver: the writer is the request's fieldManager, else "unknown"
            // (the real server falls back to the client's user agent, which is not kept here).
            let manager = q.get("fieldManager").unwrap_or("unknown");
            let created = store.create_by(ty, ns, obj, Some(manager))?;
            Ok(json_response(
                StatusCode::CREATED,
                &render_one(ty, &created, rep, store.current_rv()),
            ))
        }
        (&Method::POST, Some(name), Some("binding")) => {
            let b = parse_body(content_type, body)?;
            let node = b
                .pointer("/target/name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| StoreError::Invalid {
                    group: String::new(),
                    kind: "Binding".into(),
                    name: name.into(),
                    causes: vec![defaults::FieldCause::required("target.name")],
                })?;
            let node = node.to_string();
            let bound = store.update_with(ty, ns, name, WriteMode::Whole, |cur| {
                if let Some(existing) = cur.pointer("/spec/nodeName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                    return Err(StoreError::Conflict { resource: "pods/binding".into(), name: name.into(),
                        reason: format!("pod {name} is already assigned to node {existing:?}") });
                }
                let mut p = cur.clone();
                p["spec"]["nodeName"] = json!(node);
                let conds = p["status"]["conditions"].as_array().cloned().unwrap_or_default();
                let mut conds: Vec<Value> = conds.into_iter().filter(|c| c.get("type") != Some(&json!("PodScheduled"))).collect();
                conds.push(json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": crate::clock::now()}));
                p["status"]["conditions"] = json!(conds);
                Ok(p)
            })?;
            store.record_event(
                &bound,
                "Normal",
                "Scheduled",
                &format!("Successfully assigned {ns}/{name} to {node}"),
                "default-scheduler",
                "",
            );
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (&Method::POST, Some(name), Some("eviction")) => {
            let e = parse_body(content_type, body)?;
            let opts = delete_options(e.get("deleteOptions").unwrap_or(&Value::Null), q)?;
            store.delete(ty, ns, name, &opts)?;
            Ok(json_response(
                StatusCode::CREATED,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            ))
        }
        (&Method::PUT, Some(name), sub @ (None | Some("status"))) => {
            let obj = to_storage(parse_body(content_type, body)?);
            check_kind(ty, &obj)?;
            let mode = if sub.is_some() {
                WriteMode::Status
            } else {
                WriteMode::Spec
            };
            let updated = store.update_with(ty, ns, name, mode, |_| Ok(obj))?;
            Ok(json_response(
                StatusCode::OK,
                &render_one(ty, &updated, rep, store.current_rv()),
            ))
        }
        (&Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
            let p = patch_request(ty, content_type, body)?;
            let mode = if sub.is_some() {
                WriteMode::Status
            } else {
                WriteMode::Spec
            };
            let events_v1 = ty.group == "events.k8s.io";
            let updated = store.update_with(ty, ns, name, mode, |cur| {
                let mut doc = if events_v1 {
                    defaults::event_to_events_v1(cur)
                } else {
                    cur.clone()
                };
                match &p {
                    PatchBody::Merge(v) => patch::merge_patch(&mut doc, v),
                    PatchBody::Json(v) => {
                        patch::json_patch(&mut doc, v).map_err(|e| StoreError::Invalid {
                            group: ty.group.clone(),
                            kind: ty.kind.clone(),
                            name: name.into(),
                            causes: vec![defaults::FieldCause {
                                field: "patch".into(),
                                reason: "FieldValueInvalid",
                                message: e.to_string(),
                            }],
                        })?;
                    }
                    PatchBody::Strategic(v) => {
                        patch::strategic_merge(&mut doc, v)
                            .map_err(|e| StoreError::BadRequest(e.to_string()))?;
                    }
                }
                Ok(if events_v1 {
                    defaults::event_from_events_v1(&doc)
                } else {
                    doc
                })
            })?;
            Ok(json_response(
                StatusCode::OK,
                &render_one(ty, &updated, rep, store.current_rv()),
            ))
        }
        (&Method::DELETE, Some(name), None) => {
            let b = if body.is_empty() {
                Value::Null
            } else {
                parse_body(content_type, body)?
            };
            let opts = delete_options(&b, q)?;
            let (obj, gone) = store.delete(ty, ns, name, &opts)?;
            let code = if gone {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok(json_response(
                code,
                &render_one(ty, &obj, rep, store.current_rv()),
            ))
        }
        (&Method::DELETE, None, None) => {
            let b = if body.is_empty() {
                Value::Null
            } else {
                parse_body(content_type, body)?
            };
            let opts = delete_options(&b, q)?;
            let sel = Selectors::parse(ty, q)?;
            let page = store.list(ty, t.namespace.as_deref(), &|o| sel.matches(o), None, None);
            let mut items = Vec::new();
            for o in page.items {
                let n = o
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let ons = o
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if let Ok((d, _)) = store.delete(ty, ons, n, &opts) {
                    items.push(present(ty, &d).into_owned());
                }
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", ty.kind), "apiVersion": ty.api_version(),
                "metadata": {"resourceVersion": store.current_rv().to_string()}, "items": items}),
            ))
        }
        _ => Err(StoreError::MethodNotAllowed(format!(
            "the server does not allow this method on the requested resource: {method} {}{}",
            ty.group_resource().qualified(),
            t.subresource
                .as_deref()
                .map(|s| format!("/{s}"))
                .unwrap_or_default()
        ))),
    }
}

enum PatchBody {
    Merge(Value),
    Json(Value),
    Strategic(Value),
}

fn patch_request(
    ty: &ResourceType,
    content_type: &str,
    body: &[u8],
) -> Result<PatchBody, StoreError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    let parse = || {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| StoreError::BadRequest(format!("the patch is not valid JSON: {e}")))
    };
    match ct {
        "application/merge-patch+json" => Ok(PatchBody::Merge(parse()?)),
        "application/json-patch+json" => Ok(PatchBody::Json(parse()?)),
        "application/strategic-merge-patch+json" if ty.is_builtin() => Ok(PatchBody::Strategic(parse()?)),
        "application/strategic-merge-patch+json" => Err(StoreError::UnsupportedMediaType(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json (strategic merge patch is not supported for custom resources)".into(),
        )),
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => Err(StoreError::UnsupportedMediaType(
            "server-side apply (application/apply-patch+yaml) is not supported by kube-sim; use client-side apply (kubectl apply without --server-side), a merge patch or a JSON patch".into(),
        )),
        other => Err(StoreError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format {other:?} - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
        ))),
    }
}

fn delete_options(body: &Value, q: &Query) -> Result<DeleteOptions, StoreError> {
    let grace = body
        .get("gracePeriodSeconds")
        .and_then(Value::as_i64)
        .or(q.number("gracePeriodSeconds")?);
    let policy = body
        .get("propagationPolicy")
        .and_then(Value::as_str)
        .or_else(|| q.get("propagationPolicy"))
        .map(|p| match p {
            "Orphan" => Ok(Propagation::Orphan),
            "Background" => Ok(Propagation::Background),
            "Foreground" => Ok(Propagation::Foreground),
            other => Err(StoreError::BadRequest(format!(
                "propagationPolicy: Unsupported value {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
            ))),
        })
        .transpose()?;
    let policy = match (
        policy,
        body.get("orphanDependents").and_then(Value::as_bool),
    ) {
        (Some(p), _) => Some(p),
        (None, Some(true)) => Some(Propagation::Orphan),
        (None, _) => None,
    };
    Ok(DeleteOptions {
        grace_period_seconds: grace,
        propagation: policy,
        precondition_uid: body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string),
        precondition_rv: body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

fn list(store: &Store, t: &Target, q: &Query, rep: Representation) -> Result<Resp, StoreError> {
    let ty = &t.ty;
    let sel = Selectors::parse(ty, q)?;
    let limit = q.number("limit")?.filter(|l| *l > 0).map(|l| l as usize);
    let cont = q
        .get("continue")
        .filter(|c| !c.is_empty())
        .map(parse_continue)
        .transpose()?;
    let (first_rv, after) = match cont {
        Some((rv, key)) => (Some(rv), Some(key)),
        None => (None, None),
    };
    let page = store.list(
        ty,
        t.namespace.as_deref(),
        &|o| sel.matches(o),
        limit,
        after.as_ref(),
    );
    let rv = first_rv.unwrap_or(page.rv);
    let next = page.next.as_ref().map(|k| continue_token(rv, k));
    if let Representation::Table(inc) = rep {
        let objs: Vec<Cow<'_, Value>> = page.items.iter().map(|o| present(ty, o)).collect();
        let refs: Vec<&Value> = objs.iter().map(AsRef::as_ref).collect();
        let mut tbl = table::table(ty, &refs, inc, true, rv, next.as_deref());
        if page.remaining > 0 {
            tbl["metadata"]["remainingItemCount"] = json!(page.remaining);
        }
        return Ok(json_response(StatusCode::OK, &tbl));
    }
    let (kind, api_version) = match rep {
        Representation::Metadata => (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        ),
        _ => (format!("{}List", ty.kind), ty.api_version()),
    };
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(n) = &next {
        meta["continue"] = json!(n);
        meta["remainingItemCount"] = json!(page.remaining);
    }
    let mut out = Vec::with_capacity(256 + page.items.len() * 512);
    out.extend_from_slice(
        format!("{{\"kind\":\"{kind}\",\"apiVersion\":\"{api_version}\",\"metadata\":").as_bytes(),
    );
    serde_json::to_writer(&mut out, &meta).map_err(|e| StoreError::BadRequest(e.to_string()))?;
    out.extend_from_slice(b",\"items\":[");
    for (i, (o, stored)) in page.items.iter().zip(&page.stored).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match (rep, stored) {
            (Representation::Metadata, _) => serde_json::to_writer(&mut out, &metadata_only(o))
                .map_err(|e| StoreError::BadRequest(e.to_string()))?,
            (_, Some(ev)) if Arc::ptr_eq(&ev.object, o) => {
                out.extend_from_slice(&encode_object(ty, ev));
            }
            _ => serde_json::to_writer(&mut out, present(ty, o).as_ref())
                .map_err(|e| StoreError::BadRequest(e.to_string()))?,
        }
    }
    out.extend_from_slice(b"]}");
    Ok(bytes_response(
        StatusCode::OK,
        "application/json",
        Bytes::from(out),
    ))
}

fn pod_log(
    state: &ApiState,
    ty: &ResourceType,
    ns: &str,
    name: &str,
    q: &Query,
) -> Result<Resp, StoreError> {
    let pod = state.store.get(ty, ns, name)?;
    let containers: Vec<String> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let container = match q.get("container").filter(|c| !c.is_empty()) {
        Some(c) if containers.iter().any(|x| x == c) => c.to_string(),
        Some(c) => {
            return Err(StoreError::BadRequest(format!(
                "container {c} is not valid for pod {name}"
            )));
        }
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(StoreError::BadRequest(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            )));
        }
    };
    let Some(mut text) = state.logs.get(ns, name, &container) else {
        let reason = pod
            .pointer("/status/containerStatuses")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c.get("name") == Some(&json!(container))))
            .and_then(|c| c.pointer("/state/waiting/reason").and_then(Value::as_str))
            .unwrap_or("ContainerCreating");
        return Err(StoreError::BadRequest(format!(
            "container {container:?} in pod {name:?} is waiting to start: {reason}"
        )));
    };
    if let Some(n) = q.number("tailLines")? {
        let lines: Vec<&str> = text.lines().collect();
        let keep = lines.len().saturating_sub(n.max(0) as usize);
        text = lines[keep..].iter().fold(String::new(), |mut out, l| {
            out.push_str(l);
            out.push('\n');
            out
        });
    }
    if !q.flag("follow") {
        return Ok(bytes_response(
            StatusCode::OK,
            "text/plain",
            Bytes::from(text),
        ));
    }
    // Following, as the kubelet does: what there is, then what is added, until the container
    // has terminated or the pod is gone.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let (store, logs) = (state.store.clone(), state.logs.clone());
    let (ty, ns, name) = (ty.clone(), ns.to_owned(), name.to_owned());
    // How much of the whole log has gone out (`text` may be its tail only).
    let mut sent = state
        .logs
        .get(&ns, &name, &container)
        .map_or(0, |l| l.len());
    tokio::spawn(async move {
        if !text.is_empty() && tx.send(Bytes::from(text)).await.is_err() {
            return;
        }
        loop {
            let terminated = match store.get(&ty, &ns, &name) {
                Err(_) => true,
                Ok(pod) => pod
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .and_then(|cs| cs.iter().find(|c| c.get("name") == Some(&json!(container))))
                    .is_some_and(|c| c.pointer("/state/terminated").is_some()),
            };
            let latest = logs.get(&ns, &name, &container).unwrap_or_default();
            // The log only grows while the pod exists; one that was replaced starts again.
            let new = latest.get(sent..).unwrap_or(&latest).to_owned();
            sent = latest.len();
            if !new.is_empty() && tx.send(Bytes::from(new)).await.is_err() {
                return;
            }
            if terminated || tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut r = Response::new(ApiBody::Stream(rx));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(r)
}

/// The object of an event as JSON in the requested version; the encoding is cached on the
/// event when the stored form is what the client sees, so watchers and lists share it.
fn encode_object(ty: &ResourceType, ev: &WatchEvent) -> Bytes {
    match present(ty, &ev.object) {
        Cow::Borrowed(o) => ev
            .encoded
            .get_or_init(|| Bytes::from(serde_json::to_vec(o).unwrap_or_default()))
            .clone(),
        Cow::Owned(o) => Bytes::from(serde_json::to_vec(&o).unwrap_or_default()),
    }
}

fn event_line(
    ty: &ResourceType,
    kind: &str,
    ev: &WatchEvent,
    rep: Representation,
    headers: bool,
) -> Bytes {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    match rep {
        Representation::Object => {
            out.extend_from_slice(&encode_object(ty, ev));
        }
        Representation::Metadata => {
            let _ = serde_json::to_writer(&mut out, &metadata_only(&ev.object));
        }
        Representation::Table(inc) => {
            let _ = serde_json::to_writer(
                &mut out,
                &table::table(ty, &[&present(ty, &ev.object)], inc, headers, ev.rv, None),
            );
        }
    }
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

fn bookmark(ty: &ResourceType, rv: u64, initial_end: bool) -> Bytes {
    let mut md = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        md["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let obj = json!({"type": "BOOKMARK", "object": {"kind": ty.kind, "apiVersion": ty.api_version(), "metadata": md}});
    let mut v = serde_json::to_vec(&obj).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

fn error_event(code: u16, reason: &str, message: &str) -> Bytes {
    let obj = json!({"type": "ERROR", "object": status_object(code, reason, message, None)});
    let mut v = serde_json::to_vec(&obj).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The type a filtered watch reports for a change, or `None` when the watcher should not see it.
fn filtered_kind(ev: &WatchEvent, sel: &Selectors) -> Option<EventType> {
    let now = sel.matches(&ev.object);
    match ev.kind {
        EventType::Added => now.then_some(EventType::Added),
        EventType::Deleted => now.then_some(EventType::Deleted),
        EventType::Modified => {
            let before = ev.previous.as_deref().is_some_and(|p| sel.matches(p));
            match (before, now) {
                (true, true) => Some(EventType::Modified),
                (false, true) => Some(EventType::Added),
                (true, false) => Some(EventType::Deleted),
                (false, false) => None,
            }
        }
    }
}

fn watch(
    state: &Arc<ApiState>,
    t: &Target,
    q: &Query,
    rep: Representation,
) -> Result<Resp, StoreError> {
    let ty = t.ty.clone();
    let sel = Selectors::parse(&ty, q)?;
    if let Some(name) = &t.name {
        return Err(StoreError::BadRequest(format!(
            "watch of a single object {name:?}: use fieldSelector=metadata.name={name}"
        )));
    }
    let send_initial = q.flag("sendInitialEvents");
    let from = match q.get("resourceVersion").unwrap_or("") {
        _ if send_initial => WatchFrom::Snapshot,
        "" | "0" => WatchFrom::Snapshot,
        v => WatchFrom::Version(v.parse().map_err(|_| {
            StoreError::BadRequest(format!(
                "resourceVersion: {v:?} is not a valid resource version"
            ))
        })?),
    };
    let bookmarks = q.flag("allowWatchBookmarks");
    let timeout = q
        .number("timeoutSeconds")?
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s as u64));
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let resp = {
        let mut r = Response::new(ApiBody::Stream(rx));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        r
    };
    let w = match state.store.watch(&ty, t.namespace.as_deref(), from) {
        Ok(w) => w,
        Err(StoreError::Gone(msg)) => {
            let _ = tx.try_send(error_event(410, "Expired", &msg));
            return Ok(resp);
        }
        Err(e) => return Err(e),
    };
    let store = state.store.clone();
    let interval = state.bookmark_interval;
    tokio::spawn(async move {
        let mut headers = true;
        let mut line = |ev: &WatchEvent, kind: EventType| {
            let l = event_line(&ty, kind.as_str(), ev, rep, headers);
            headers = false;
            l
        };
        for ev in &w.initial {
            if let Some(kind) = filtered_kind(ev, &sel)
                && tx.send(line(ev, kind)).await.is_err()
            {
                return;
            }
        }
        if send_initial && tx.send(bookmark(&ty, w.rv, true)).await.is_err() {
            return;
        }
        let mut events = w.events;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            let sleep_until =
                deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_hours(24));
            tokio::select! {
                ev = events.recv() => if let Some(ev) = ev {
                    // Events already waiting go out in one chunk: one write for many events
                    // keeps a busy watcher from costing a system call per event.
                    let mut batch = Vec::new();
                    let mut next = Some(ev);
                    while let Some(ev) = next.take() {
                        if let Some(kind) = filtered_kind(&ev, &sel) {
                            batch.extend_from_slice(&line(&ev, kind));
                        }
                        if batch.len() < 256 * 1024 {
                            next = events.try_recv().ok();
                        }
                    }
                    if !batch.is_empty() && tx.send(Bytes::from(batch)).await.is_err() { return; }
                } else {
                    match WatchEnd::of(&w.ended) {
                        WatchEnd::TooSlow => {
                            let _ = tx.send(error_event(410, "Gone", "the watch was dropped because the client did not keep up with events; start a new watch")).await;
                        }
                        WatchEnd::Compacted => {
                            let _ = tx.send(error_event(410, "Expired", "too old resource version: the history was compacted; list again")).await;
                        }
                        WatchEnd::No => {}
                    }
                    return;
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = store.current_rv();
                    while let Ok(ev) = events.try_recv() {
                        if let Some(kind) = filtered_kind(&ev, &sel)
                            && tx.send(line(&ev, kind)).await.is_err() { return; }
                    }
                    if tx.send(bookmark(&ty, rv, false)).await.is_err() { return; }
                }
                () = tokio::time::sleep_until(sleep_until) => return,
                () = tx.closed() => return,
            }
        }
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip() {
        let key = ("ns".to_string(), "pod-7".to_string());
        assert_eq!(
            parse_continue(&continue_token(42, &key)).unwrap(),
            (42, key)
        );
        assert!(parse_continue("zz").is_err());
    }

    #[test]
    fn query_decoding() {
        let q = Query::parse(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1"));
        assert_eq!(q.get("labelSelector"), Some("app=web,tier in (a)"));
        assert!(q.flag("watch"));
    }
}
