//! An API-server stand-in that speaks the Kubernetes HTTP protocol well enough for kube::Client, kube-runtime
//! Controllers and kubectl, for the tests on machines where no kube-apiserver can run. See README.md beside
//! this file for what it models and what it does not.

pub mod authz;
pub mod ssa;
pub mod store;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::sync::broadcast;

use store::{ApiError, Event, ResourceType, Store};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Shared state of a running stand-in.
#[derive(Debug)]
pub struct State {
    pub store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// Write requests (POST, PUT, PATCH, DELETE) served, by `verb resource`.
    pub writes: Mutex<BTreeMap<String, u64>>,
    /// Requests served in all.
    pub requests: AtomicU64,
    /// Injected faults.
    pub faults: Faults,
}

/// Faults a reliability test can inject.
#[derive(Debug, Default)]
pub struct Faults {
    /// The next N write requests (POST/PUT/PATCH/DELETE) fail with 500 InternalError.
    pub fail_writes: AtomicU64,
    /// Limits `fail_writes` to one resource (plural, e.g. `networkpolicies`); all resources when None.
    pub fail_resource: Mutex<Option<String>>,
    /// Every request waits this many milliseconds first.
    pub latency_ms: AtomicU64,
    /// Bumped to end every open watch stream (clients must re-list or resume).
    pub watch_epoch: AtomicU64,
}

/// A running stand-in on 127.0.0.1.
#[derive(Debug)]
pub struct ApiServer {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: version.into(),
        plural: plural.into(),
        kind: kind.into(),
        namespaced,
        status_subresource: !matches!(
            kind,
            "ConfigMap"
                | "Secret"
                | "ServiceAccount"
                | "Event"
                | "Role"
                | "RoleBinding"
                | "ClusterRole"
                | "ClusterRoleBinding"
                | "Lease"
                | "NetworkPolicy"
        ),
    }
}

/// The built-in kinds the operator and its tests use.
pub fn builtin_types() -> Vec<ResourceType> {
    vec![
        builtin("", "v1", "namespaces", "Namespace", false),
        builtin("", "v1", "pods", "Pod", true),
        builtin("", "v1", "secrets", "Secret", true),
        builtin("", "v1", "configmaps", "ConfigMap", true),
        builtin("", "v1", "serviceaccounts", "ServiceAccount", true),
        builtin("", "v1", "events", "Event", true),
        builtin("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", true),
        builtin("", "v1", "services", "Service", true),
        builtin("events.k8s.io", "v1", "events", "Event", true),
        builtin("batch", "v1", "jobs", "Job", true),
        builtin("batch", "v1", "cronjobs", "CronJob", true),
        builtin("apps", "v1", "deployments", "Deployment", true),
        builtin("apps", "v1", "statefulsets", "StatefulSet", true),
        builtin("apps", "v1", "daemonsets", "DaemonSet", true),
        builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
        builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", true),
        builtin("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", false),
        builtin("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", false),
        builtin("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", true),
        builtin("coordination.k8s.io", "v1", "leases", "Lease", true),
        builtin("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", false),
    ]
}

impl ApiServer {
    /// Starts a stand-in on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<ApiServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut store = Store::default();
        for t in builtin_types() {
            store.register(t);
        }
        let (events, _) = broadcast::channel(65_536);
        let state = Arc::new(State {
            store: Mutex::new(store),
            events,
            writes: Mutex::new(BTreeMap::new()),
            requests: AtomicU64::new(0),
            faults: Faults::default(),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Ok(ApiServer { addr, state, task })
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server (what the operator process and kubectl are given).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {}\nusers:\n- name: standin\n  user:\n    token: standin\ncontexts:\n- name: standin\n  context:\n    cluster: standin\n    user: standin\n    namespace: default\ncurrent-context: standin\n",
            self.url()
        )
    }

    /// A kubeconfig that authenticates as a ServiceAccount, which RBAC objects in the stand-in then authorize.
    pub fn kubeconfig_as_service_account(&self, namespace: &str, name: &str) -> String {
        self.kubeconfig().replace("token: standin", &format!("token: serviceaccount:{namespace}:{name}"))
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let url: http::Uri = self.url().parse().unwrap_or_default();
        let config = kube::Config::new(url);
        kube::Client::try_from(config).unwrap_or_else(|e| panic!("client for the stand-in: {e}"))
    }

    /// Total write requests served so far.
    pub fn write_count(&self) -> u64 {
        self.state.writes.lock().map(|w| w.values().sum()).unwrap_or(0)
    }

    /// Makes the next `n` write requests (to `resource`, a plural such as `networkpolicies`, or to any
    /// resource) fail with 500.
    pub fn fail_next_writes(&self, n: u64, resource: Option<&str>) {
        if let Ok(mut r) = self.state.faults.fail_resource.lock() {
            *r = resource.map(str::to_string);
        }
        self.state.faults.fail_writes.store(n, Ordering::SeqCst);
    }

    /// Delays every request by `ms` milliseconds.
    pub fn set_latency_ms(&self, ms: u64) {
        self.state.faults.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// Ends every open watch stream, as a load balancer or API server restart would.
    pub fn drop_watches(&self) {
        self.state.faults.watch_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Forgets the watch event log, so that resuming watches get 410 Gone (as after etcd compaction).
    pub fn compact(&self) {
        if let Ok(mut s) = self.state.store.lock() {
            s.compact();
        }
    }
}

fn respond(code: u16, body: &Value) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(bytes).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn error(e: &ApiError) -> Response<Body> {
    respond(e.code, &e.status())
}

/// A parsed resource path.
#[derive(Debug, Default)]
struct Target {
    group: String,
    version: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: String,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let mut t = Target { group, version, ..Target::default() };
    match rest {
        ["namespaces", ns, plural, tail @ ..] => {
            t.namespace = Some(ns.to_string());
            t.plural = plural.to_string();
            t.name = tail.first().map(|s| s.to_string());
            t.subresource = tail.get(1).map(|s| s.to_string()).unwrap_or_default();
        }
        [plural, tail @ ..] if !plural.is_empty() => {
            t.plural = plural.to_string();
            t.name = tail.first().map(|s| s.to_string());
            t.subresource = tail.get(1).map(|s| s.to_string()).unwrap_or_default();
        }
        _ => return None,
    }
    Some(t)
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Label selector matching (`a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`).
pub fn matches_selector(labels: &Value, selector: &str) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    split_selector(selector).iter().all(|req| {
        let req = req.trim();
        if req.is_empty() {
            return true;
        }
        if let Some((k, v)) = req.split_once("!=") {
            return get(k.trim()) != Some(v.trim());
        }
        if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
            return get(k.trim()) == Some(v.trim());
        }
        if let Some((k, set)) = req.split_once(" notin ") {
            let vals = parse_set(set);
            return get(k.trim()).is_none_or(|v| !vals.contains(&v.to_string()));
        }
        if let Some((k, set)) = req.split_once(" in ") {
            let vals = parse_set(set);
            return get(k.trim()).is_some_and(|v| vals.contains(&v.to_string()));
        }
        if let Some(k) = req.strip_prefix('!') {
            return get(k.trim()).is_none();
        }
        get(req).is_some()
    })
}

fn split_selector(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out
}

fn parse_set(s: &str) -> Vec<String> {
    s.trim().trim_start_matches('(').trim_end_matches(')').split(',').map(|v| v.trim().to_string()).collect()
}

fn matches_fields(obj: &Value, selector: &str) -> bool {
    split_selector(selector).iter().all(|req| {
        let Some((k, v)) = req.split_once('=') else { return true };
        let k = k.trim_end_matches('=').trim();
        match k {
            "metadata.name" => obj["metadata"]["name"] == v.trim(),
            "metadata.namespace" => obj["metadata"]["namespace"] == v.trim(),
            _ => true,
        }
    })
}

async fn body_json(req: Request<Incoming>) -> Result<(Value, String), ApiError> {
    let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("application/json").to_string();
    let bytes =
        req.into_body().collect().await.map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?.to_bytes();
    let v: Value = if ct.contains("yaml") {
        serde_saphyr::from_slice(&bytes).map_err(|e| ApiError::new(400, "BadRequest", format!("invalid YAML: {e}")))?
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(400, "BadRequest", format!("invalid JSON ({ct}, {} bytes): {e}", bytes.len())))?
    };
    Ok((v, ct))
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            if let Some(t) = target.as_object_mut() {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

fn broadcast_all(state: &State, events: Vec<Event>) {
    for e in events {
        let _ = state.events.send(e);
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let latency = state.faults.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let is_write = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE);
    let targeted = state
        .faults
        .fail_resource
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .is_none_or(|r| parse_path(req.uri().path()).is_some_and(|t| t.plural == r));
    if is_write
        && targeted
        && state.faults.fail_writes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    {
        return error(&ApiError::new(
            500,
            "InternalError",
            "injected fault: the stand-in failed this write on purpose",
        ));
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/api" => {
            return respond(200, &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}));
        }
        "/apis" => return respond(200, &discovery_groups(&state)),
        "/version" => {
            return respond(
                200,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-crmguard-standin", "platform": "linux/amd64"}),
            );
        }
        "/healthz" | "/readyz" | "/livez" => return respond(200, &json!("ok")),
        _ => {}
    }
    if path == "/apis/authentication.k8s.io/v1/tokenreviews" && req.method() == Method::POST {
        let who = authz::caller(req.headers().get("authorization").and_then(|v| v.to_str().ok()));
        if who == authz::Caller::Anonymous {
            return error(&ApiError::new(401, "Unauthorized", "Unauthorized"));
        }
        return match body_json(req).await {
            Ok((body, _)) => respond(201, &token_review(&body)),
            Err(e) => error(&e),
        };
    }
    // Group-version discovery: /api/<version> and /apis/<group>/<version>.
    match path.trim_matches('/').split('/').collect::<Vec<_>>().as_slice() {
        ["api", version] => return respond(200, &discovery_resources(&state, "", version)),
        ["apis", group, version] => return respond(200, &discovery_resources(&state, group, version)),
        _ => {}
    }
    let Some(target) = parse_path(&path) else {
        return error(&ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    };
    let rtype = match state.store.lock() {
        Ok(s) => s.find_type(&target.group, &target.version, &target.plural),
        Err(_) => None,
    };
    let Some(rtype) = rtype else {
        return error(&ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    };
    let q = query(&req);
    let method = req.method().clone();
    let who = authz::caller(req.headers().get("authorization").and_then(|v| v.to_str().ok()));
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = authz::verb(method.as_str(), target.name.is_some(), watching);
    let ns_for_authz = target.namespace.clone().unwrap_or_default();
    let permitted = state.store.lock().is_ok_and(|s| {
        authz::allowed(&s, &who, verb, &rtype, &target.subresource, &ns_for_authz, target.name.as_deref())
    });
    if !permitted {
        let user = match &who {
            authz::Caller::ServiceAccount { namespace, name } => format!("system:serviceaccount:{namespace}:{name}"),
            _ => "system:anonymous".to_string(),
        };
        let resource = if target.subresource.is_empty() {
            rtype.plural.clone()
        } else {
            format!("{}/{}", rtype.plural, target.subresource)
        };
        let scope = if ns_for_authz.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{ns_for_authz}\"")
        };
        return error(&ApiError::new(
            403,
            "Forbidden",
            format!(
                "{resource} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
                rtype.group
            ),
        ));
    }
    if let (true, Ok(mut w)) = (method != Method::GET, state.writes.lock()) {
        *w.entry(format!("{method} {}", rtype.plural)).or_insert(0) += 1;
    }
    let ns = target.namespace.clone().unwrap_or_default();
    let result: Result<Response<Body>, ApiError> = match (method, &target.name) {
        (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            return watch(state, rtype, target.namespace.clone(), q);
        }
        (Method::GET, None) => list(&state, &rtype, target.namespace.as_deref(), &q),
        (Method::GET, Some(name)) => {
            state.store.lock().map_err(poisoned).and_then(|s| s.get(&rtype, &ns, name)).map(|v| respond(200, &v))
        }
        (Method::POST, None) => match body_json(req).await {
            Ok((body, _)) => {
                let body_ns = body["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
                let ns = if ns.is_empty() { body_ns } else { ns };
                create(&state, &rtype, &ns, body, Some(q.get("fieldManager").map_or("unknown", String::as_str)))
            }
            Err(e) => Err(e),
        },
        (Method::PUT, Some(name)) => match body_json(req).await {
            Ok((body, _)) => write(
                &state,
                &rtype,
                &ns,
                name,
                &target.subresource,
                body,
                Some(q.get("fieldManager").map_or("unknown", String::as_str)),
            ),
            Err(e) => Err(e),
        },
        (Method::PATCH, Some(name)) => {
            let name = name.clone();
            match body_json(req).await {
                Ok((body, ct)) => patch(&state, &rtype, &ns, &name, &target.subresource, body, &ct, &q),
                Err(e) => Err(e),
            }
        }
        (Method::DELETE, Some(name)) => {
            let r = state.store.lock().map_err(poisoned).and_then(|mut s| s.delete(&rtype, &ns, name));
            r.map(|(obj, evs)| {
                broadcast_all(&state, evs);
                respond(200, &obj)
            })
        }
        (m, _) => Err(ApiError::new(405, "MethodNotAllowed", format!("{m} is not supported on {path}"))),
    };
    result.unwrap_or_else(|e| error(&e))
}

fn poisoned<T>(_: T) -> ApiError {
    ApiError::new(500, "InternalError", "store lock poisoned")
}

fn list(
    state: &State,
    t: &ResourceType,
    ns: Option<&str>,
    q: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let s = state.store.lock().map_err(poisoned)?;
    let items: Vec<Value> = s
        .list(t, ns)
        .into_iter()
        .filter(|o| q.get("labelSelector").is_none_or(|sel| matches_selector(&o["metadata"]["labels"], sel)))
        .filter(|o| q.get("fieldSelector").is_none_or(|sel| matches_fields(o, sel)))
        .collect();
    Ok(respond(
        200,
        &json!({"apiVersion": t.api_version(), "kind": format!("{}List", t.kind),
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    ))
}

/// Admission for crmguard's own kinds: schema defaults are applied and stored (as the API server does), then
/// the object is validated against the CRD's OpenAPI schema and CEL rules (transition rules with `old`).
fn admit(t: &ResourceType, body: Value, old: Option<&Value>, sub: &str) -> Result<Value, ApiError> {
    let mut body = body;
    if body["apiVersion"].is_null() {
        body["apiVersion"] = json!(t.api_version());
        body["kind"] = json!(t.kind);
    }
    if t.group != crmguard::api::common::GROUP || sub == "status" {
        return Ok(body);
    }
    let body = crmguard::validation::with_defaults(&body);
    let errors = crmguard::validation::admit_update(&body, old);
    if errors.is_empty() {
        return Ok(body);
    }
    let name = body["metadata"]["name"].as_str().unwrap_or_default();
    let details: Vec<String> = errors.iter().map(ToString::to_string).collect();
    Err(ApiError::new(422, "Invalid", format!("{}.{} \"{name}\" is invalid: {}", t.kind, t.group, details.join(", "))))
}

/// Creates an object; `manager` (for non-apply writes) becomes the owner of every field it set.
fn create(
    state: &State,
    t: &ResourceType,
    ns: &str,
    body: Value,
    manager: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let mut body = admit(t, body, None, "")?;
    if let Some(m) = manager {
        ssa::record_update(None, &mut body, m);
    }
    let (obj, ev) = state.store.lock().map_err(poisoned)?.create(t, ns, body)?;
    after_write(state, t, &obj);
    broadcast_all(state, vec![ev]);
    Ok(respond(201, &obj))
}

/// Replaces an object after admission (with the old object, so transition rules apply); `manager` (for
/// non-apply writes) becomes the owner of the fields it changed.
fn write(
    state: &State,
    t: &ResourceType,
    ns: &str,
    name: &str,
    sub: &str,
    body: Value,
    manager: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let old = state.store.lock().map_err(poisoned)?.get(t, ns, name)?;
    let mut body = admit(t, body, Some(&old), sub)?;
    if let Some(m) = manager {
        ssa::record_update(Some(&old), &mut body, m);
    }
    let (obj, evs) = state.store.lock().map_err(poisoned)?.replace(t, ns, name, body, sub)?;
    after_write(state, t, &obj);
    broadcast_all(state, evs);
    Ok(respond(200, &obj))
}

/// Registers the resource type a CustomResourceDefinition defines.
fn after_write(state: &State, t: &ResourceType, obj: &Value) {
    if t.kind != "CustomResourceDefinition" {
        return;
    }
    let spec = &obj["spec"];
    let Ok(mut s) = state.store.lock() else { return };
    for v in spec["versions"].as_array().into_iter().flatten() {
        s.register(ResourceType {
            group: spec["group"].as_str().unwrap_or_default().into(),
            version: v["name"].as_str().unwrap_or_default().into(),
            plural: spec["names"]["plural"].as_str().unwrap_or_default().into(),
            kind: spec["names"]["kind"].as_str().unwrap_or_default().into(),
            namespaced: spec["scope"] == "Namespaced",
            status_subresource: v["subresources"]["status"].is_object(),
        });
    }
}

#[allow(clippy::too_many_arguments)]
fn patch(
    state: &State,
    t: &ResourceType,
    ns: &str,
    name: &str,
    sub: &str,
    body: Value,
    content_type: &str,
    q: &BTreeMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let is_apply = content_type.starts_with("application/apply-patch");
    if is_apply && q.get("fieldManager").is_none_or(String::is_empty) {
        return Err(ApiError::new(422, "Invalid", "fieldManager: Required value: is required for apply patch"));
    }
    let manager = q.get("fieldManager").cloned().unwrap_or_else(|| "unknown".into());
    // Bind first: the store lock must be released before create() takes it again.
    let existing = state.store.lock().map_err(poisoned)?.get(t, ns, name);
    if is_apply {
        let force = q.get("force").is_some_and(|f| f == "true");
        let mut body = body;
        body["metadata"]["name"] = json!(name);
        if let Some(m) = body["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        return match existing {
            Ok(current) => {
                let mut obj = ssa::apply(Some(&current), &body, &manager, force)?;
                obj["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
                write(state, t, ns, name, sub, obj, None)
            }
            Err(e) if e.code == 404 => {
                let obj = ssa::apply(None, &body, &manager, force)?;
                create(state, t, ns, obj, None)
            }
            Err(e) => Err(e),
        };
    }
    let mut obj = existing?;
    if content_type.starts_with("application/json-patch+json") {
        // A JSON Patch may set metadata.resourceVersion on purpose (optimistic concurrency via `test`/`replace`).
        let p: json_patch::Patch =
            serde_json::from_value(body).map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?;
        json_patch::patch(&mut obj, &p)
            .map_err(|e| ApiError::new(422, "Invalid", format!("json patch failed: {e}")))?;
    } else {
        // merge-patch+json and strategic-merge-patch+json (approximated as a merge patch); no precondition on
        // resourceVersion here.
        // `get_mut`, not indexing: `body["metadata"]` would insert `metadata: null`, which the merge patch
        // would then apply as "delete all metadata".
        let mut body = body;
        if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        merge_patch(&mut obj, &body);
    }
    write(state, t, ns, name, sub, obj, Some(&manager))
}

fn watch(state: Arc<State>, t: ResourceType, ns: Option<String>, q: BTreeMap<String, String>) -> Response<Body> {
    let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(1800u64);
    let label_sel = q.get("labelSelector").cloned();
    let field_sel = q.get("fieldSelector").cloned();
    let mut rx = state.events.subscribe();
    let epoch = state.faults.watch_epoch.load(Ordering::SeqCst);
    let st = state.clone();
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1024);
    let matches = move |e: &Event| {
        e.group == t.group
            && e.plural == t.plural
            && ns.as_ref().is_none_or(|n| &e.namespace == n)
            && label_sel.as_ref().is_none_or(|s| matches_selector(&e.object["metadata"]["labels"], s))
            && field_sel.as_ref().is_none_or(|s| matches_fields(&e.object, s))
    };
    let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{}\n", v))));
    // Replay from the event log, or refuse a resourceVersion that is too old.
    let (backlog, current, gone) = match state.store.lock() {
        Ok(s) => {
            if from != 0 && from < s.oldest_watchable() {
                (vec![], s.rv, true)
            } else {
                (s.events.iter().filter(|e| e.rv > from && from != 0).cloned().collect::<Vec<_>>(), s.rv, false)
            }
        }
        Err(_) => (vec![], 0, true),
    };
    tokio::spawn(async move {
        if gone {
            let _ = tx
                .send(line(json!({"type": "ERROR", "object": ApiError::new(410, "Expired", format!("too old resource version: {from} ({current})")).status()})))
                .await;
            return;
        }
        let mut last = from.max(if from == 0 { current } else { 0 });
        for e in backlog.into_iter().filter(|e| matches(e)) {
            last = e.rv;
            if tx.send(line(json!({"type": e.type_, "object": e.object}))).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut drop_check = tokio::time::interval(Duration::from_millis(50));
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = drop_check.tick() => {
                    if st.faults.watch_epoch.load(Ordering::SeqCst) != epoch { return; }
                }
                _ = tick.tick(), if bookmarks => {
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": "", "apiVersion": "", "metadata": {"resourceVersion": last.to_string()}}});
                    if tx.send(line(bm)).await.is_err() { return; }
                }
                ev = rx.recv() => match ev {
                    Ok(e) => {
                        if e.rv <= last || !matches(&e) { continue; }
                        last = e.rv;
                        if tx.send(line(json!({"type": e.type_, "object": e.object}))).await.is_err() { return; }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(body_rx);
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

fn discovery_groups(state: &State) -> Value {
    let Ok(s) = state.store.lock() else { return json!({}) };
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in s.types.iter().filter(|t| !t.group.is_empty()) {
        let vs = groups.entry(t.group.clone()).or_default();
        if !vs.contains(&t.version) {
            vs.push(t.version.clone());
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> =
                vs.iter().map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v})).collect();
            json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn discovery_resources(state: &State, group: &str, version: &str) -> Value {
    let Ok(s) = state.store.lock() else { return json!({}) };
    let mut resources = vec![];
    for t in s.types.iter().filter(|t| t.group == group && t.version == version) {
        let verbs = ["create", "delete", "get", "list", "patch", "update", "watch"];
        resources.push(json!({"name": t.plural, "singularName": t.kind.to_lowercase(), "namespaced": t.namespaced, "kind": t.kind, "verbs": verbs}));
        if t.status_subresource {
            resources.push(json!({"name": format!("{}/status", t.plural), "singularName": "", "namespaced": t.namespaced, "kind": t.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// A TokenReview (what Vault's Kubernetes auth asks): a `serviceaccount:<ns>:<name>` token, or a ServiceAccount
/// JWT whose claims name the account (`kubernetes.io.namespace` / `.serviceaccount.name` / `.uid`, or the legacy
/// `kubernetes.io/serviceaccount/*` claims), is authenticated as that ServiceAccount. JWT signatures are NOT
/// checked here (a real API server checks them); the stand-in README says so.
pub fn token_review(review: &Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let account = match token.strip_prefix("serviceaccount:").and_then(|r| r.split_once(':')) {
        Some((ns, name)) => Some((ns.to_string(), name.to_string(), String::new())),
        None => jwt_account(token),
    };
    let status = match account {
        Some((ns, name, uid)) => json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{name}"),
                "uid": uid,
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            },
            "audiences": review["spec"]["audiences"].clone(),
        }),
        None => json!({"authenticated": false, "error": "token is not a ServiceAccount token of this stand-in"}),
    };
    json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status})
}

fn jwt_account(token: &str) -> Option<(String, String, String)> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let k = &claims["kubernetes.io"];
    let str_of = |v: &Value| v.as_str().map(str::to_string);
    let ns = str_of(&k["namespace"]).or_else(|| str_of(&claims["kubernetes.io/serviceaccount/namespace"]))?;
    let name = str_of(&k["serviceaccount"]["name"])
        .or_else(|| str_of(&claims["kubernetes.io/serviceaccount/service-account.name"]))?;
    let uid = str_of(&k["serviceaccount"]["uid"])
        .or_else(|| str_of(&claims["kubernetes.io/serviceaccount/service-account.uid"]))
        .unwrap_or_default();
    Some((ns, name, uid))
}
