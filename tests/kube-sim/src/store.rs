//! The object store: every object as JSON keyed by resource, namespace and name, one global
//! resourceVersion counter, a bounded history of events per resource for watches that resume from
//! a resourceVersion, and the server-side semantics of writes (optimistic concurrency, status
//! split, finalizers, owner-reference garbage collection, namespace termination).
//!
//! Writers never wait for watchers: each watcher has a bounded channel and is dropped (and told
//! 410 Gone) when it falls behind. The store knows nothing of HTTP.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::clock;
use crate::defaults::{self, FieldCause};
use crate::resources::{self, GroupResource, ResourceType};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{resource} {name:?} not found")]
    NotFound { resource: String, name: String },
    #[error("{resource} {name:?} already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {reason}")]
    Conflict {
        resource: String,
        name: String,
        reason: String,
    },
    #[error("{kind} {name:?} is invalid: {}", causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect::<Vec<_>>().join(", "))]
    Invalid {
        group: String,
        kind: String,
        name: String,
        causes: Vec<FieldCause>,
    },
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{resource} {name:?} is forbidden: {reason}")]
    Forbidden {
        resource: String,
        name: String,
        reason: String,
    },
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change to one object. `previous` lets a filtered watch turn a change that leaves its
/// selector into `DELETED`, as a real server does.
#[derive(Debug)]
pub struct WatchEvent {
    pub kind: EventType,
    pub object: Arc<Value>,
    pub previous: Option<Arc<Value>>,
    pub rv: u64,
    /// The object's JSON, encoded once for all watchers that send it unchanged.
    pub encoded: std::sync::OnceLock<bytes::Bytes>,
}

impl WatchEvent {
    fn new(kind: EventType, object: Arc<Value>, previous: Option<Arc<Value>>, rv: u64) -> Self {
        Self {
            kind,
            object,
            previous,
            rv,
            encoded: std::sync::OnceLock::new(),
        }
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// Synthetic `ADDED` for every current object, then changes (no resourceVersion, or "0").
    Snapshot,
    /// Every change after this resourceVersion.
    Version(u64),
}

/// A registered watch: what happened before registration, then a live channel.
pub struct Watch {
    pub initial: Vec<Arc<WatchEvent>>,
    pub events: mpsc::Receiver<Arc<WatchEvent>>,
    /// Why the store ended this watch, once it has: one of [`WatchEnd`]'s values.
    pub ended: Arc<AtomicU8>,
    pub rv: u64,
}

/// Why the store ended a watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WatchEnd {
    /// Not ended by the store (the client went, or the events came to an end).
    No = 0,
    /// The watcher fell behind: its channel was full.
    TooSlow = 1,
    /// The history was compacted ([`Store::compact`]): no resourceVersion before now can be
    /// resumed from.
    Compacted = 2,
}

impl WatchEnd {
    pub fn of(ended: &AtomicU8) -> Self {
        match ended.load(Ordering::SeqCst) {
            1 => Self::TooSlow,
            2 => Self::Compacted,
            _ => Self::No,
        }
    }
}

struct Watcher {
    namespace: Option<String>,
    tx: mpsc::Sender<Arc<WatchEvent>>,
    ended: Arc<AtomicU8>,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Arc<Value>>,
    /// The event that produced each current object, whose cached encoding lists reuse.
    latest: HashMap<(String, String), Arc<WatchEvent>>,
    history: VecDeque<Arc<WatchEvent>>,
    /// Every event with a resourceVersion above this one is still in `history`.
    floor: u64,
    watchers: Vec<Watcher>,
}

/// Identifies one stored object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub gr: GroupResource,
    pub namespace: String,
    pub name: String,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// The main resource: `.status` is kept as stored for types with a status subresource.
    Spec,
    /// The `status` subresource: only `.status` changes.
    Status,
    /// Controllers inside the simulator (binding, kubelets): everything but identity.
    Whole,
}

/// How a delete treats the object's dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    Orphan,
    #[default]
    Background,
    Foreground,
}

#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub grace_period_seconds: Option<i64>,
    pub propagation: Option<Propagation>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

/// A page of a list.
pub struct ListPage {
    pub items: Vec<Arc<Value>>,
    /// For each item, the event that stored it, carrying its encoded JSON once computed.
    pub stored: Vec<Option<Arc<WatchEvent>>>,
    pub rv: u64,
    pub next: Option<(String, String)>,
    pub remaining: usize,
}

struct Inner {
    rv: u64,
    types: Vec<ResourceType>,
    collections: HashMap<GroupResource, Collection>,
    /// Owner uid to the objects whose ownerReferences name it.
    dependents: HashMap<String, HashSet<ObjectRef>>,
    /// uid to object, for resolving owners.
    by_uid: HashMap<String, ObjectRef>,
    /// uids of objects with a deletionTimestamp, so garbage collection need not scan everything.
    terminating: HashSet<String>,
    /// Nodes whose simulated kubelet finishes pod deletion gracefully.
    kubelet_nodes: HashSet<String>,
    next_cluster_ip: u32,
    /// Internal subscribers (simulated kubelets), unbounded because they are ours and prompt.
    listeners: Vec<(GroupResource, mpsc::UnboundedSender<Arc<WatchEvent>>)>,
    /// (involved uid, reason, message) to the event that already reports it, for counting.
    event_index: HashMap<(String, String, String), String>,
}

pub struct Store {
    inner: Mutex<Inner>,
    history: usize,
    watch_buffer: usize,
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| {
            f.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether two JSON objects are equal but for the fields `ignored`; compared in place, as the
/// kubelets' status writes come by the thousand.
fn same_but(a: &Map<String, Value>, b: &Map<String, Value>, ignored: &[&str]) -> bool {
    let kept = |m: &Map<String, Value>| m.keys().filter(|k| !ignored.contains(&k.as_str())).count();
    kept(a) == kept(b)
        && a.iter()
            .filter(|(k, _)| !ignored.contains(&k.as_str()))
            .all(|(k, v)| b.get(k) == Some(v))
}

/// Whether two objects are the same but for `resourceVersion` and `managedFields`: a write
/// that changes nothing else is no change.
fn same_but_version(a: &Value, b: &Value) -> bool {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return a == b;
    };
    same_but(a, b, &["metadata"])
        && match (a.get("metadata"), b.get("metadata")) {
            (Some(Value::Object(ma)), Some(Value::Object(mb))) => {
                same_but(ma, mb, &["resourceVersion", "managedFields"])
            }
            (ma, mb) => ma == mb,
        }
}

impl Store {
    pub fn new(history: usize, watch_buffer: usize) -> Self {
        let mut collections = HashMap::new();
        let types = resources::builtins();
        for t in &types {
            collections
                .entry(t.group_resource())
                .or_insert_with(Collection::default);
        }
        let store = Self {
            inner: Mutex::new(Inner {
                rv: 1,
                types,
                collections,
                dependents: HashMap::new(),
                by_uid: HashMap::new(),
                terminating: HashSet::new(),
                kubelet_nodes: HashSet::new(),
                next_cluster_ip: 1,
                listeners: Vec::new(),
                event_index: HashMap::new(),
            }),
            history: history.max(1),
            watch_buffer: watch_buffer.max(1),
        };
        let ns_type = store
            .resource_type("", "v1", "namespaces")
            .expect("built-in");
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            store.create(&ns_type, "", obj).expect("fresh store");
        }
        let svc = store.resource_type("", "v1", "services").expect("built-in");
        let kubernetes = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 6443}]}});
        store
            .create(&svc, "default", kubernetes)
            .expect("fresh store");
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough JSON; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// All served types (built-ins and those of established CRDs).
    pub fn types(&self) -> Vec<ResourceType> {
        self.lock().types.clone()
    }

    pub fn resource_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// Marks a node as run by a simulated kubelet, which then completes graceful pod deletion.
    pub fn set_kubelet_node(&self, node: &str, present: bool) {
        let mut inner = self.lock();
        if present {
            inner.kubelet_nodes.insert(node.to_string());
        } else {
            inner.kubelet_nodes.remove(node);
        }
    }

    /// Every change to `gr`, for in-process controllers.
    pub fn subscribe(&self, gr: GroupResource) -> mpsc::UnboundedReceiver<Arc<WatchEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().listeners.push((gr, tx));
        rx
    }

    pub fn get(&self, ty: &ResourceType, ns: &str, name: &str) -> Result<Arc<Value>, StoreError> {
        let inner = self.lock();
        inner.get(&ty.group_resource(), ns, name).cloned()
    }

    /// Objects matching `filter`, in (namespace, name) order, starting after `after`.
    pub fn list(
        &self,
        ty: &ResourceType,
        ns: Option<&str>,
        filter: &dyn Fn(&Value) -> bool,
        limit: Option<usize>,
        after: Option<&(String, String)>,
    ) -> ListPage {
        let inner = self.lock();
        let rv = inner.rv;
        let Some(col) = inner.collections.get(&ty.group_resource()) else {
            return ListPage {
                items: Vec::new(),
                stored: Vec::new(),
                rv,
                next: None,
                remaining: 0,
            };
        };
        let start = match (after, ns) {
            (Some(k), _) => std::ops::Bound::Excluded((*k).clone()),
            (None, Some(ns)) => std::ops::Bound::Included((ns.to_string(), String::new())),
            (None, None) => std::ops::Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut stored = Vec::new();
        let mut next = None;
        let mut remaining = 0;
        for (key, obj) in col.objects.range((start, std::ops::Bound::Unbounded)) {
            if let Some(ns) = ns
                && key.0 != ns
            {
                break;
            }
            if !filter(obj) {
                continue;
            }
            if next.is_some() {
                remaining += 1;
                continue;
            }
            items.push(obj.clone());
            stored.push(col.latest.get(key).cloned());
            if limit.is_some_and(|l| items.len() >= l) {
                next = Some(key.clone());
            }
        }
        if remaining == 0 {
            next = None;
        }
        ListPage {
            items,
            stored,
            rv,
            next,
            remaining,
        }
    }

    pub fn watch(
        &self,
        ty: &ResourceType,
        ns: Option<&str>,
        from: WatchFrom,
    ) -> Result<Watch, StoreError> {
        let mut inner = self.lock();
        let rv = inner.rv;
        let gr = ty.group_resource();
        let col = inner.collections.entry(gr).or_default();
        let in_ns = |key: &(String, String)| ns.is_none_or(|n| key.0 == n);
        let initial = match from {
            WatchFrom::Snapshot => col
                .objects
                .iter()
                .filter(|(k, _)| in_ns(k))
                .map(|(_, o)| Arc::new(WatchEvent::new(EventType::Added, o.clone(), None, rv)))
                .collect(),
            WatchFrom::Version(v) => {
                if v < col.floor {
                    return Err(StoreError::Gone(format!(
                        "too old resource version: {v} ({})",
                        col.floor + 1
                    )));
                }
                col.history
                    .iter()
                    .filter(|e| e.rv > v)
                    .filter(|e| {
                        ns.is_none_or(|n| meta_str(&e.object, "namespace").unwrap_or("") == n)
                    })
                    .cloned()
                    .collect()
            }
        };
        let (tx, events) = mpsc::channel(self.watch_buffer);
        let ended = Arc::new(AtomicU8::new(WatchEnd::No as u8));
        col.watchers.push(Watcher {
            namespace: ns.map(str::to_string),
            tx,
            ended: ended.clone(),
        });
        Ok(Watch {
            initial,
            events,
            ended,
            rv,
        })
    }

    pub fn create(
        &self,
        ty: &ResourceType,
        ns: &str,
        obj: Value,
    ) -> Result<Arc<Value>, StoreError> {
        self.create_by(ty, ns, obj, None)
    }

    /// Creates an object as `manager` (the request's `fieldManager`), recorded in
    /// `metadata.managedFields` as the API server records the writer of every field.
    pub fn create_by(
        &self,
        ty: &ResourceType,
        ns: &str,
        mut obj: Value,
        manager: Option<&str>,
    ) -> Result<Arc<Value>, StoreError> {
        if !obj.is_object() {
            return Err(StoreError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        let mut inner = self.lock();
        let gr = ty.group_resource();
        if obj.get("metadata").is_none_or(|m| !m.is_object()) {
            obj["metadata"] = json!({});
        }
        let name = match meta_str(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => match meta_str(&obj, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => format!("{prefix}{}", clock::name_suffix()),
                None => {
                    return Err(StoreError::Invalid {
                        group: ty.group.clone(),
                        kind: ty.kind.clone(),
                        name: String::new(),
                        causes: vec![FieldCause {
                            field: "metadata.name".into(),
                            reason: "FieldValueRequired",
                            message: "Required value: name or generateName is required".into(),
                        }],
                    });
                }
            },
        };
        let ns = if ty.namespaced {
            if ns.is_empty() {
                return Err(StoreError::BadRequest(format!(
                    "{} is namespaced: the request needs a namespace",
                    gr.qualified()
                )));
            }
            if let Some(body_ns) = meta_str(&obj, "namespace").filter(|n| !n.is_empty() && *n != ns)
            {
                return Err(StoreError::BadRequest(format!(
                    "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                )));
            }
            let nsgr = GroupResource::new("", "namespaces");
            match inner.get(&nsgr, "", ns) {
                Err(_) => {
                    return Err(StoreError::NotFound {
                        resource: "namespaces".into(),
                        name: ns.into(),
                    });
                }
                Ok(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(StoreError::Forbidden {
                        resource: gr.qualified(),
                        name,
                        reason: format!(
                            "unable to create new content in namespace {ns} because it is being terminated"
                        ),
                    });
                }
                Ok(_) => {}
            }
            ns.to_string()
        } else {
            String::new()
        };
        let md = &mut obj["metadata"];
        md["name"] = json!(name);
        if ty.namespaced {
            md["namespace"] = json!(ns);
        } else if let Some(m) = md.as_object_mut() {
            m.remove("namespace");
        }
        let causes = defaults::validate(ty, &obj);
        if !causes.is_empty() {
            return Err(StoreError::Invalid {
                group: ty.group.clone(),
                kind: ty.kind.clone(),
                name,
                causes,
            });
        }
        if inner
            .collections
            .get(&gr)
            .is_some_and(|c| c.objects.contains_key(&(ns.clone(), name.clone())))
        {
            return Err(StoreError::AlreadyExists {
                resource: gr.qualified(),
                name,
            });
        }
        obj["apiVersion"] = json!(ty.storage_api_version());
        obj["kind"] = json!(ty.kind);
        let md = obj["metadata"].as_object_mut().expect("set above");
        for k in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        ] {
            md.remove(k);
        }
        if let Some(manager) = manager {
            md.insert(
                "managedFields".into(),
                json!([{
                    "manager": manager,
                    "operation": "Update",
                    "apiVersion": ty.storage_api_version(),
                    "time": clock::now(),
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {},
                }]),
            );
        }
        md.insert("uid".into(), json!(clock::uuid()));
        md.insert("creationTimestamp".into(), json!(clock::now()));
        md.insert("generation".into(), json!(1));
        let ip_counter = &mut inner.next_cluster_ip;
        defaults::on_create(ty, &mut obj, || {
            *ip_counter += 1;
            format!("10.96.{}.{}", (*ip_counter >> 8) & 0xff, *ip_counter & 0xff)
        });
        if gr == GroupResource::new("apiextensions.k8s.io", "customresourcedefinitions") {
            let new_types = resources::from_crd(&obj).map_err(|e| StoreError::Invalid {
                group: ty.group.clone(),
                kind: ty.kind.clone(),
                name: name.clone(),
                causes: vec![FieldCause {
                    field: "spec".into(),
                    reason: "FieldValueInvalid",
                    message: e.to_string(),
                }],
            })?;
            for t in new_types {
                inner.collections.entry(t.group_resource()).or_default();
                inner.types.push(t);
            }
        }
        let obj = inner.commit(&gr, &ns, &name, Some(obj), self.history);
        Ok(obj.expect("created"))
    }

    /// Replaces an object through `change`, which sees the current object and returns the new
    /// one; `mode` says which part of the object the write may change.
    pub fn update_with(
        &self,
        ty: &ResourceType,
        ns: &str,
        name: &str,
        mode: WriteMode,
        change: impl FnOnce(&Value) -> Result<Value, StoreError>,
    ) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let gr = ty.group_resource();
        let ns = if ty.namespaced { ns } else { "" };
        let old = inner.get(&gr, ns, name)?.clone();
        let mut new = change(&old)?;
        if !new.is_object() {
            return Err(StoreError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        let old_rv = meta_str(&old, "resourceVersion").unwrap_or("");
        if let Some(rv) = meta_str(&new, "resourceVersion").filter(|r| !r.is_empty())
            && rv != old_rv
        {
            return Err(StoreError::Conflict {
                    resource: gr.qualified(),
                    name: name.into(),
                    reason: "the object has been modified; please apply your changes to the latest version and try again".into(),
                });
        }
        if let Some(n) = meta_str(&new, "name")
            && n != name
        {
            return Err(StoreError::BadRequest(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        if mode == WriteMode::Status {
            let mut merged = (*old).clone();
            merged["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            new = merged;
        } else {
            if new.get("metadata").is_none_or(|m| !m.is_object()) {
                new["metadata"] = json!({});
            }
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "generation",
            ] {
                match old["metadata"].get(k) {
                    Some(v) => new["metadata"][k] = v.clone(),
                    None => {
                        if let Some(m) = new["metadata"].as_object_mut() {
                            m.remove(k);
                        }
                    }
                }
            }
            new["metadata"]["name"] = json!(name);
            if ty.has_status() && mode == WriteMode::Spec {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            let spec_changed = match (old.as_object(), new.as_object()) {
                (Some(old), Some(new)) => !same_but(old, new, &["metadata", "status"]),
                _ => *old != new,
            };
            if spec_changed {
                let g = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(1);
                new["metadata"]["generation"] = json!(g + 1);
            }
        }
        let causes = defaults::validate(ty, &new);
        if !causes.is_empty() {
            return Err(StoreError::Invalid {
                group: ty.group.clone(),
                kind: ty.kind.clone(),
                name: name.into(),
                causes,
            });
        }
        new["apiVersion"] = json!(ty.storage_api_version());
        new["kind"] = json!(ty.kind);
        if same_but_version(&new, &old) {
            return Ok(old);
        }
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        if gr == GroupResource::new("apiextensions.k8s.io", "customresourcedefinitions")
            && !deleting
        {
            // A changed CRD changes what is served: versions, scope, columns, subresources.
            let new_types = resources::from_crd(&new).map_err(|e| StoreError::Invalid {
                group: ty.group.clone(),
                kind: ty.kind.clone(),
                name: name.into(),
                causes: vec![FieldCause {
                    field: "spec".into(),
                    reason: "FieldValueInvalid",
                    message: e.to_string(),
                }],
            })?;
            if let Some(first) = new_types.first() {
                let (g, p) = (first.group.clone(), first.plural.clone());
                inner.types.retain(|t| !(t.group == g && t.plural == p));
            }
            for t in new_types {
                inner.collections.entry(t.group_resource()).or_default();
                inner.types.push(t);
            }
        }
        // As the API server's registry: an update removes a terminating object once nothing
        // holds it, but not a pod whose graceful shutdown its kubelet has yet to finish.
        let grace_left = new
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .is_some_and(|g| g > 0);
        if deleting && finalizers(&new).is_empty() && !grace_left {
            inner.commit(&gr, ns, name, None, self.history);
            inner.collect_garbage(self.history);
            let mut gone = new;
            gone["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
            return Ok(Arc::new(gone));
        }
        Ok(inner
            .commit(&gr, ns, name, Some(new), self.history)
            .expect("updated"))
    }

    /// Deletes an object, or marks it for deletion when finalizers or a graceful pod shutdown
    /// must run first. Returns the object as it was last seen and whether it is gone.
    pub fn delete(
        &self,
        ty: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOptions,
    ) -> Result<(Arc<Value>, bool), StoreError> {
        let mut inner = self.lock();
        let gr = ty.group_resource();
        let ns = if ty.namespaced { ns } else { "" };
        let old = inner.get(&gr, ns, name)?.clone();
        if let Some(uid) = &opts.precondition_uid
            && meta_str(&old, "uid") != Some(uid)
        {
            return Err(StoreError::Conflict {
                resource: gr.qualified(),
                name: name.into(),
                reason: format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or("")
                ),
            });
        }
        if let Some(rv) = &opts.precondition_rv
            && meta_str(&old, "resourceVersion") != Some(rv)
        {
            return Err(StoreError::Conflict {
                    resource: gr.qualified(),
                    name: name.into(),
                    reason: "the object has been modified; please apply your changes to the latest version and try again".into(),
                });
        }
        let is_pod = gr == GroupResource::new("", "pods");
        let on_kubelet = is_pod
            && old
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| inner.kubelet_nodes.contains(n));
        let phase_done = matches!(
            old.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        let grace = opts.grace_period_seconds.unwrap_or_else(|| {
            old.pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30)
        });
        let propagation = opts.propagation.unwrap_or_default();
        let mut fins = finalizers(&old);
        let already = old.pointer("/metadata/deletionTimestamp").is_some();
        if propagation == Propagation::Orphan {
            inner.orphan_dependents(&old, self.history);
        }
        if propagation == Propagation::Foreground
            && !fins.iter().any(|f| f == "foregroundDeletion")
            && inner
                .dependents
                .get(meta_str(&old, "uid").unwrap_or(""))
                .is_some_and(|d| !d.is_empty())
        {
            fins.push("foregroundDeletion".into());
        }
        let graceful = on_kubelet && grace > 0 && !phase_done;
        let is_namespace = gr == GroupResource::new("", "namespaces");
        if fins.is_empty() && !graceful && !is_namespace {
            inner.commit(&gr, ns, name, None, self.history);
            inner.collect_garbage(self.history);
            return Ok((old, true));
        }
        if already && !(graceful || is_namespace) && fins == finalizers(&old) {
            return Ok((old, false));
        }
        let mut new = (*old).clone();
        if !already {
            new["metadata"]["deletionTimestamp"] = json!(clock::now());
            new["metadata"]["deletionGracePeriodSeconds"] = json!(if graceful { grace } else { 0 });
        }
        new["metadata"]["finalizers"] = json!(fins);
        if fins.is_empty()
            && let Some(m) = new["metadata"].as_object_mut()
        {
            m.remove("finalizers");
        }
        if is_namespace {
            new["status"]["phase"] = json!("Terminating");
        }
        let obj = inner
            .commit(&gr, ns, name, Some(new), self.history)
            .expect("updated");
        if propagation == Propagation::Foreground {
            let uid = meta_str(&obj, "uid").unwrap_or("").to_string();
            inner.delete_dependents(&uid, self.history);
        }
        if is_namespace {
            inner.empty_namespace(name, self.history);
        }
        inner.collect_garbage(self.history);
        Ok((obj, false))
    }

    /// Compacts the history (no resume from before, as after etcd's compaction) and ends every
    /// watch (as an API server whose watch cache starts again does): every open watch ends with
    /// 410 `Expired`, and no watch can resume from a resourceVersion before now (its client
    /// must list again).
    pub fn compact(&self) {
        let mut inner = self.lock();
        let rv = inner.rv;
        for col in inner.collections.values_mut() {
            col.history.clear();
            col.floor = rv;
            for w in col.watchers.drain(..) {
                w.ended.store(WatchEnd::Compacted as u8, Ordering::SeqCst);
            }
        }
    }

    /// Records a core/v1 event about `involved`, counting repeats as a real event recorder
    /// does.
    pub fn record_event(
        &self,
        involved: &Value,
        type_: &str,
        reason: &str,
        message: &str,
        component: &str,
        host: &str,
    ) {
        let mut inner = self.lock();
        let ns = meta_str(involved, "namespace")
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
            .to_string();
        let terminating = inner
            .get(&GroupResource::new("", "namespaces"), "", &ns)
            .map_or(true, |n| n.pointer("/metadata/deletionTimestamp").is_some());
        if terminating {
            // Namespace lifecycle admission refuses new content in a terminating namespace.
            return;
        }
        let uid = meta_str(involved, "uid").unwrap_or("").to_string();
        let key = (uid.clone(), reason.to_string(), message.to_string());
        let gr = GroupResource::new("", "events");
        let now = clock::now();
        if let Some(existing) = inner.event_index.get(&key).cloned()
            && let Ok(ev) = inner.get(&gr, &ns, &existing)
        {
            let mut ev = (**ev).clone();
            let count = ev.get("count").and_then(Value::as_i64).unwrap_or(1);
            ev["count"] = json!(count + 1);
            ev["lastTimestamp"] = json!(now);
            inner.commit(&gr, &ns, &existing, Some(ev), self.history);
            return;
        }
        let involved_name = meta_str(involved, "name").unwrap_or("");
        let name = format!("{involved_name}.{}", clock::random_hex(16));
        let mut io = json!({
            "apiVersion": involved.get("apiVersion").cloned().unwrap_or(Value::Null),
            "kind": involved.get("kind").cloned().unwrap_or(Value::Null),
            "name": involved_name, "uid": uid,
            "resourceVersion": meta_str(involved, "resourceVersion").unwrap_or(""),
        });
        if let Some(n) = meta_str(involved, "namespace") {
            io["namespace"] = json!(n);
        }
        let ev = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns, "uid": clock::uuid(), "creationTimestamp": now},
            "involvedObject": io, "reason": reason, "message": message, "type": type_,
            "source": {"component": component, "host": host},
            "reportingComponent": component, "reportingInstance": host,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1, "eventTime": Value::Null,
        });
        inner.commit(&gr, &ns, &name, Some(ev), self.history);
        inner.event_index.insert(key, name);
    }
}

impl Inner {
    fn get(&self, gr: &GroupResource, ns: &str, name: &str) -> Result<&Arc<Value>, StoreError> {
        self.collections
            .get(gr)
            .and_then(|c| c.objects.get(&(ns.to_string(), name.to_string())))
            .ok_or_else(|| StoreError::NotFound {
                resource: gr.qualified(),
                name: name.into(),
            })
    }

    /// Stores (`Some`) or removes (`None`) an object under a new resourceVersion, keeps the
    /// owner index and CRD types in step, and tells watchers.
    fn commit(
        &mut self,
        gr: &GroupResource,
        ns: &str,
        name: &str,
        obj: Option<Value>,
        history: usize,
    ) -> Option<Arc<Value>> {
        self.rv += 1;
        let rv = self.rv;
        let key = (ns.to_string(), name.to_string());
        let col = self.collections.entry(gr.clone()).or_default();
        let previous = col.objects.get(&key).cloned();
        let (kind, object) = if let Some(mut o) = obj {
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            let o = Arc::new(o);
            col.objects.insert(key.clone(), o.clone());
            (
                if previous.is_some() {
                    EventType::Modified
                } else {
                    EventType::Added
                },
                o,
            )
        } else {
            let prev = col.objects.remove(&key)?;
            let mut o = (*prev).clone();
            o["metadata"]["resourceVersion"] = json!(rv.to_string());
            (EventType::Deleted, Arc::new(o))
        };
        let event = Arc::new(WatchEvent::new(kind, object.clone(), previous.clone(), rv));
        if kind == EventType::Deleted {
            col.latest.remove(&key);
        } else {
            col.latest.insert(key, event.clone());
        }
        col.history.push_back(event.clone());
        while col.history.len() > history {
            if let Some(e) = col.history.pop_front() {
                col.floor = e.rv;
            }
        }
        let obj_ns = ns;
        col.watchers.retain(|w| {
            if w.namespace.as_deref().is_some_and(|n| n != obj_ns) {
                return !w.tx.is_closed();
            }
            match w.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    w.ended.store(WatchEnd::TooSlow as u8, Ordering::SeqCst);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        self.listeners
            .retain(|(lgr, tx)| lgr != gr || tx.send(event.clone()).is_ok());
        let oref = ObjectRef {
            gr: gr.clone(),
            namespace: ns.into(),
            name: name.into(),
        };
        if let Some(prev) = &previous {
            for owner in owner_uids(prev) {
                if let Some(d) = self.dependents.get_mut(&owner) {
                    d.remove(&oref);
                }
            }
        }
        if kind == EventType::Deleted {
            if let Some(uid) = meta_str(&object, "uid") {
                self.by_uid.remove(uid);
                self.terminating.remove(uid);
            }
            if gr.resource == "customresourcedefinitions"
                && gr.group == "apiextensions.k8s.io"
                && let (Some(g), Some(p)) = (
                    object.pointer("/spec/group").and_then(Value::as_str),
                    object.pointer("/spec/names/plural").and_then(Value::as_str),
                )
            {
                self.types.retain(|t| !(t.group == g && t.plural == p));
                self.collections.remove(&GroupResource::new(g, p));
            }
            if gr.resource == "events" {
                self.event_index.retain(|_, v| v != name);
            }
        } else {
            if let Some(uid) = meta_str(&object, "uid") {
                self.by_uid.insert(uid.to_string(), oref.clone());
                if object.pointer("/metadata/deletionTimestamp").is_some() {
                    self.terminating.insert(uid.to_string());
                }
            }
            for owner in owner_uids(&object) {
                self.dependents
                    .entry(owner)
                    .or_default()
                    .insert(oref.clone());
            }
        }
        (kind != EventType::Deleted).then_some(object)
    }

    fn orphan_dependents(&mut self, owner: &Value, history: usize) {
        let uid = meta_str(owner, "uid").unwrap_or("").to_string();
        let deps: Vec<ObjectRef> = self.dependents.remove(&uid).into_iter().flatten().collect();
        for d in deps {
            let Ok(obj) = self.get(&d.gr, &d.namespace, &d.name) else {
                continue;
            };
            let mut obj = (**obj).clone();
            if let Some(refs) = obj
                .pointer_mut("/metadata/ownerReferences")
                .and_then(Value::as_array_mut)
            {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
            }
            self.commit(&d.gr, &d.namespace, &d.name, Some(obj), history);
        }
    }

    fn delete_dependents(&mut self, uid: &str, history: usize) {
        let deps: Vec<ObjectRef> = self
            .dependents
            .get(uid)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for d in deps {
            self.delete_ref(&d, history);
        }
    }

    /// Deletes one object as the garbage collector would: at once unless finalizers or a
    /// kubelet's graceful shutdown hold it.
    fn delete_ref(&mut self, d: &ObjectRef, history: usize) {
        let Ok(obj) = self.get(&d.gr, &d.namespace, &d.name) else {
            return;
        };
        if obj.pointer("/metadata/deletionTimestamp").is_some() {
            return;
        }
        let graceful = d.gr == GroupResource::new("", "pods")
            && obj
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| self.kubelet_nodes.contains(n))
            && !matches!(
                obj.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            );
        if finalizers(obj).is_empty() && !graceful {
            self.commit(&d.gr, &d.namespace, &d.name, None, history);
            return;
        }
        let grace = obj
            .pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30);
        let mut obj = (**obj).clone();
        obj["metadata"]["deletionTimestamp"] = json!(clock::now());
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(if graceful { grace } else { 0 });
        self.commit(&d.gr, &d.namespace, &d.name, Some(obj), history);
    }

    /// Starts deleting everything in a terminating namespace.
    fn empty_namespace(&mut self, ns: &str, history: usize) {
        let mut refs = Vec::new();
        for t in &self.types {
            if !t.namespaced {
                continue;
            }
            let gr = t.group_resource();
            if let Some(col) = self.collections.get(&gr) {
                for (k, _) in col.objects.range((ns.to_string(), String::new())..) {
                    if k.0 != ns {
                        break;
                    }
                    refs.push(ObjectRef {
                        gr: gr.clone(),
                        namespace: k.0.clone(),
                        name: k.1.clone(),
                    });
                }
            }
        }
        refs.sort_by(|a, b| (&a.gr, &a.name).cmp(&(&b.gr, &b.name)));
        refs.dedup();
        for r in refs {
            self.delete_ref(&r, history);
        }
    }

    fn namespace_is_empty(&self, ns: &str) -> bool {
        self.collections.iter().all(|(gr, col)| {
            gr.resource == "namespaces"
                || col
                    .objects
                    .range((ns.to_string(), String::new())..)
                    .next()
                    .is_none_or(|(k, _)| k.0 != ns)
        })
    }

    /// Background garbage collection, foreground completion and namespace finalization, run
    /// after every delete until nothing more changes.
    fn collect_garbage(&mut self, history: usize) {
        loop {
            let mut work = Vec::new();
            for (owner, deps) in &self.dependents {
                if self.by_uid.contains_key(owner) {
                    continue;
                }
                for d in deps {
                    let Ok(obj) = self.get(&d.gr, &d.namespace, &d.name) else {
                        continue;
                    };
                    if owner_uids(obj).iter().all(|u| !self.by_uid.contains_key(u)) {
                        work.push(d.clone());
                    }
                }
            }
            self.dependents
                .retain(|owner, deps| self.by_uid.contains_key(owner) || !deps.is_empty());
            let mut finished = Vec::new();
            for uid in &self.terminating {
                let Some(r) = self.by_uid.get(uid) else {
                    continue;
                };
                let Ok(obj) = self.get(&r.gr, &r.namespace, &r.name) else {
                    continue;
                };
                if obj.pointer("/metadata/deletionTimestamp").is_none() {
                    continue;
                }
                let fins = finalizers(obj);
                let waiting = fins.iter().any(|f| f == "foregroundDeletion")
                    && self.dependents.get(uid).is_none_or(HashSet::is_empty);
                let ns_done = r.gr == GroupResource::new("", "namespaces")
                    && self.namespace_is_empty(&r.name);
                if waiting || ns_done {
                    finished.push((r.clone(), obj.clone()));
                }
            }
            let before = self.rv;
            for d in work {
                // Orphaned dependents go the way the foreground deleter would send them.
                self.delete_ref(&d, history);
            }
            for (r, obj) in finished {
                let mut obj = (*obj).clone();
                let fins: Vec<String> = finalizers(&obj)
                    .into_iter()
                    .filter(|f| f != "foregroundDeletion")
                    .collect();
                let is_ns = r.gr.resource == "namespaces" && r.gr.group.is_empty();
                if fins.is_empty() || is_ns {
                    self.commit(&r.gr, &r.namespace, &r.name, None, history);
                } else {
                    obj["metadata"]["finalizers"] = json!(fins);
                    self.commit(&r.gr, &r.namespace, &r.name, Some(obj), history);
                }
            }
            if self.rv == before {
                break;
            }
        }
    }
}

/// Runs garbage collection after an update that may have removed the last finalizer or an
/// owner; exposed for the HTTP layer.
impl Store {
    pub fn collect_garbage(&self) {
        let mut inner = self.lock();
        inner.collect_garbage(self.history);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::same_but_version;

    #[test]
    fn a_write_that_changes_only_the_version_or_managed_fields_is_no_change() {
        let pod = json!({"metadata": {"name": "p", "resourceVersion": "1",
                                      "managedFields": [{"manager": "a"}], "labels": {"a": "b"}},
                         "spec": {"nodeName": "n"}, "status": {"phase": "Pending"}});
        let mut same = pod.clone();
        same["metadata"]["resourceVersion"] = json!("2");
        same["metadata"]["managedFields"] = json!([{"manager": "b"}]);
        assert!(same_but_version(&pod, &same));
        let mut without = pod.clone();
        without["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        assert!(same_but_version(&pod, &without));

        let mut status = pod.clone();
        status["status"]["phase"] = json!("Running");
        let mut label = pod.clone();
        label["metadata"]["labels"]["a"] = json!("c");
        let mut extra = pod.clone();
        extra["metadata"]["annotations"] = json!({"x": "y"});
        let mut fewer = pod.clone();
        fewer.as_object_mut().unwrap().remove("status");
        for changed in [status, label, extra, fewer] {
            assert!(!same_but_version(&pod, &changed), "{changed}");
            assert!(!same_but_version(&changed, &pod), "{changed}");
        }
    }
}
