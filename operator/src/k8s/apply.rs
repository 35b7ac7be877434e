//! Server-side apply of a controller's children with one field manager, skipping children that already hold
//! every desired field (so a steady-state reconcile writes nothing), and pruning children no longer desired.

use std::collections::BTreeSet;

use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::Value;

use super::cache::{Cache, Table};
use super::meta::{OWNER_LABEL, Owner};

/// The kinds crmguard writes (children it creates, and pods it labels for quarantine), with their plurals.
pub const CHILD_KINDS: [(&str, &str, &str); 12] = [
    ("v1", "Pod", "pods"),
    ("v1", "ConfigMap", "configmaps"),
    ("v1", "ServiceAccount", "serviceaccounts"),
    ("batch/v1", "CronJob", "cronjobs"),
    ("batch/v1", "Job", "jobs"),
    ("rbac.authorization.k8s.io/v1", "Role", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
    ("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
    ("v1", "Secret", "secrets"),
    // Workloads restarted after a credential rotation (a pod-template annotation).
    ("apps/v1", "Deployment", "deployments"),
    ("apps/v1", "StatefulSet", "statefulsets"),
    ("apps/v1", "DaemonSet", "daemonsets"),
];

/// ApiResource of a child kind.
pub fn api_resource(api_version: &str, kind: &str) -> Option<ApiResource> {
    child_kind(api_version, kind).map(|(_, ar)| ar)
}

/// True when every field of `desired` is present in `current` with the same value (arrays element-wise, same
/// length). Fields the API server adds (defaults, status, managedFields) do not matter.
pub fn is_subset(desired: &Value, current: &Value) -> bool {
    match (desired, current) {
        (Value::Object(d), Value::Object(c)) => d.iter().all(|(k, v)| c.get(k).is_some_and(|cv| is_subset(v, cv))),
        (Value::Array(d), Value::Array(c)) => d.len() == c.len() && d.iter().zip(c).all(|(x, y)| is_subset(x, y)),
        (d, c) => d == c,
    }
}

/// What an apply pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// `Kind/name` of children written.
    pub applied: Vec<String>,
    /// `Kind/name` of children already as desired.
    pub unchanged: Vec<String>,
    /// `Kind/name` of children deleted because no longer desired.
    pub pruned: Vec<String>,
}

/// Error of an apply pass.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("child {0} has an apiVersion/kind crmguard does not manage")]
    UnknownKind(String),
    #[error("applying {child}: {source}")]
    Kube { child: String, source: kube::Error },
    /// Objects of the wanted names exist but are not this owner's (no controller reference to it): they were
    /// left alone, the other children were applied.
    #[error("{}", .0.iter().map(|(c, h)| format!("{c} exists and belongs to {h}")).collect::<Vec<_>>().join("; "))]
    OwnedByAnother(Vec<(String, String)>),
}

/// What [`apply_owned`] did.
#[derive(Debug)]
pub enum Owned {
    /// Written (created, or updated as `owner`'s).
    Applied,
    /// An object of that name exists and is not `owner`'s: left alone; who holds it.
    Held(String),
}

/// Server-side applies `body` (named `name`, with `owner` as its controller) unless an object of that name exists
/// that `owner` does not control: crmguard never takes over what someone else holds (a write that would be a way
/// for whoever names a resource to overwrite, and through garbage collection delete, another tool's object). For
/// objects outside the children's pipeline (optional kinds, e.g. policy reports).
pub async fn apply_owned(
    api: &Api<DynamicObject>,
    name: &str,
    body: &Value,
    owner: &Owner,
    manager: &str,
) -> Result<Owned, kube::Error> {
    let mut body = body.clone();
    // The version read (or, for an absent object, one no stored object has): an object made or changed in
    // between makes the server refuse the write (409), and the next pass looks again.
    body["metadata"]["resourceVersion"] = match api.get_opt(name).await? {
        Some(current) => {
            let current = serde_json::to_value(current).unwrap_or_default();
            if let Some(h) = holder(&current, owner) {
                return Ok(Owned::Held(h));
            }
            current["metadata"]["resourceVersion"].clone()
        }
        None => CREATE_ONLY.into(),
    };
    api.patch(name, &PatchParams::apply(manager).force(), &Patch::Apply(&body)).await?;
    Ok(Owned::Applied)
}

/// Who holds an object that is not `owner`'s: its controller, or nobody crmguard knows.
fn holder(current: &Value, owner: &Owner) -> Option<String> {
    let refs = current["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
    let controller = refs.iter().find(|r| r["controller"] == Value::Bool(true));
    match controller {
        Some(r) if r["uid"].as_str() == Some(owner.uid.as_str()) => None,
        Some(r) => Some(format!("{} {}", r["kind"].as_str().unwrap_or("?"), r["name"].as_str().unwrap_or("?"))),
        None => Some("no controller (made by hand or by another tool)".into()),
    }
}

fn describe(v: &Value) -> String {
    format!("{}/{}", v["kind"].as_str().unwrap_or("?"), v["metadata"]["name"].as_str().unwrap_or("?"))
}

/// The resourceVersion of an apply that must only create: the server creates an absent object (an apply that
/// creates ignores it) and answers 409 Conflict for any existing one, whose resourceVersion differs (etcd's
/// revision 1 is taken before any object can be stored).
const CREATE_ONLY: &str = "1";

/// The kinds in the order children are created: what a child refers to exists before it (a Job's
/// ServiceAccount, a RoleBinding's Role, a CronJob's ConfigMap).
const CREATION_ORDER: [&str; 8] =
    ["ServiceAccount", "Secret", "ConfigMap", "Role", "RoleBinding", "NetworkPolicy", "CronJob", "Job"];

fn creation_rank(obj: &Value) -> usize {
    let kind = obj["kind"].as_str().unwrap_or_default();
    CREATION_ORDER.iter().position(|k| *k == kind).unwrap_or(CREATION_ORDER.len())
}

/// The kind's name as the cache knows it, and its ApiResource (one lookup in [`CHILD_KINDS`]).
fn child_kind(api_version: &str, kind: &str) -> Option<(Table, ApiResource)> {
    let (_, k, plural) = CHILD_KINDS.iter().find(|(v, k, _)| *v == api_version && *k == kind)?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    Some((*k, ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)))
}

/// How many children of one kind (one step of [`CREATION_ORDER`]) are written at once: a guard's policies do not
/// refer to each other, and one after another its reconcile took as many round trips as it has rules.
const AT_ONCE: usize = 8;

/// What became of one child.
enum Outcome {
    Applied,
    Unchanged,
    /// An object of that name is someone else's: who holds it.
    Held(String),
}

/// Applies `desired` (objects with apiVersion, kind and metadata; created in [`CREATION_ORDER`], the children of
/// one kind several at once) and prunes children of `owner` of the `prune` kinds that carry the owner label and a
/// reference to the owner but are no longer desired. A child the cache vouches for is not read; the others are
/// read, compared and written only when they differ.
pub async fn apply_children(
    client: &Client,
    cache: &Cache,
    manager: &str,
    owner: &Owner,
    desired: &[Value],
    prune: &[(&str, &str)],
) -> Result<ApplyReport, ApplyError> {
    use futures::StreamExt as _;
    let mut report = ApplyReport::default();
    let params = PatchParams::apply(manager).force();
    let mut wanted = BTreeSet::new();
    let mut conflicts = Vec::new();
    let ns = owner.namespace.as_str();
    let mut ordered: Vec<&Value> = desired.iter().collect();
    ordered.sort_by_key(|o| creation_rank(o));
    for step in ordered.chunk_by(|a, b| creation_rank(a) == creation_rank(b)) {
        let mut children = Vec::with_capacity(step.len());
        for obj in step {
            let child = describe(obj);
            let (table, ar) =
                child_kind(obj["apiVersion"].as_str().unwrap_or_default(), obj["kind"].as_str().unwrap_or_default())
                    .ok_or_else(|| ApplyError::UnknownKind(child.clone()))?;
            wanted.insert(child.clone());
            children.push((*obj, child, table, ar));
        }
        // In order of `desired` whatever order they finish in; the first error is returned once the step is done.
        let mut writes = Vec::with_capacity(children.len());
        for (obj, child, table, ar) in children {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
            writes.push(apply_child(cache, api, &params, owner, table, obj, child));
        }
        let outcomes: Vec<(String, Result<Outcome, ApplyError>)> =
            futures::stream::iter(writes).buffered(AT_ONCE).collect().await;
        let mut failed = None;
        for (child, outcome) in outcomes {
            match outcome {
                Ok(Outcome::Applied) => report.applied.push(child),
                Ok(Outcome::Unchanged) => report.unchanged.push(child),
                Ok(Outcome::Held(h)) => conflicts.push((child, h)),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
    let label = owner.owner_label_value();
    for (api_version, kind) in prune {
        let Some((table, ar)) = child_kind(api_version, kind) else { continue };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        let existing = match cache.owned_by(table, ns, &owner.uid, &label) {
            Some(names) => names,
            None => api
                .list(&ListParams::default().labels(&format!("{OWNER_LABEL}={label}")))
                .await
                .map_err(|source| ApplyError::Kube { child: format!("{kind}/*"), source })?
                .items
                .into_iter()
                .filter(|o| o.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid))
                .filter_map(|o| o.metadata.name)
                .collect(),
        };
        for name in existing {
            let child = format!("{kind}/{name}");
            if wanted.contains(&child) {
                continue;
            }
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => report.pruned.push(child),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => return Err(ApplyError::Kube { child, source }),
            }
            cache.deleted(table, ns, &name);
        }
    }
    if conflicts.is_empty() { Ok(report) } else { Err(ApplyError::OwnedByAnother(conflicts)) }
}

/// [`apply_one`], named for the report.
async fn apply_child(
    cache: &Cache,
    api: Api<DynamicObject>,
    params: &PatchParams,
    owner: &Owner,
    table: Table,
    obj: &Value,
    child: String,
) -> (String, Result<Outcome, ApplyError>) {
    let outcome = apply_one(cache, &api, params, owner, table, obj, &child).await;
    (child, outcome)
}

/// One child: vouched for by the cache, created without a read when the cache knows it is absent, else read,
/// compared and applied when it differs. Never takes over an object someone else holds.
async fn apply_one(
    cache: &Cache,
    api: &Api<DynamicObject>,
    params: &PatchParams,
    owner: &Owner,
    table: Table,
    obj: &Value,
    child: &str,
) -> Result<Outcome, ApplyError> {
    let ns = owner.namespace.as_str();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let failed = |source| ApplyError::Kube { child: child.to_string(), source };
    if cache.is_verified(table, ns, name, obj) {
        return Ok(Outcome::Unchanged);
    }
    if cache.absent(table, ns, name) {
        // Not among the objects crmguard labels: created without a read by an apply that may only create
        // (a resourceVersion no stored object has makes the server refuse it for one that exists).
        let mut create = obj.clone();
        create["metadata"]["resourceVersion"] = Value::from(CREATE_ONLY);
        match api.patch(name, params, &Patch::Apply(&create)).await {
            Ok(made) => {
                let rv = made.metadata.resource_version.as_deref().unwrap_or_default();
                cache.verified(table, ns, name, rv, obj, &made);
                return Ok(Outcome::Applied);
            }
            // Someone else's object of that name (or ours, not yet seen by the watch): read it below.
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => return Err(failed(source)),
        }
    }
    let current = api.get_opt(name).await.map_err(failed)?;
    let current = current.and_then(|c| serde_json::to_value(c).ok());
    // Never take over an object someone else holds (a forced apply would): report it instead.
    if let Some(h) = current.as_ref().and_then(|c| holder(c, owner)) {
        return Ok(Outcome::Held(h));
    }
    if let Some(c) = current.as_ref().filter(|c| is_subset(obj, c)) {
        cache.verified(table, ns, name, c["metadata"]["resourceVersion"].as_str().unwrap_or_default(), obj, c);
        return Ok(Outcome::Unchanged);
    }
    // Conditional on what was read (an absent object: one no stored object has): an object made or replaced in
    // between, perhaps someone else's, makes the server refuse the write (409) and the retry looks again.
    let mut body = obj.clone();
    body["metadata"]["resourceVersion"] = match &current {
        Some(c) => c["metadata"]["resourceVersion"].clone(),
        None => Value::from(CREATE_ONLY),
    };
    let applied = api.patch(name, params, &Patch::Apply(&body)).await.map_err(failed)?;
    let rv = applied.metadata.resource_version.as_deref().unwrap_or_default();
    cache.verified(table, ns, name, rv, obj, &applied);
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subset_ignores_server_added_fields_but_not_drift() {
        let desired = json!({"spec": {"a": 1, "list": [{"x": 1}]}, "metadata": {"labels": {"l": "v"}}});
        let server = json!({"spec": {"a": 1, "b": 2, "list": [{"x": 1, "default": true}]},
                            "metadata": {"labels": {"l": "v"}, "uid": "u"}, "status": {}});
        assert!(is_subset(&desired, &server));
        let drifted = json!({"spec": {"a": 2, "list": [{"x": 1}]}, "metadata": {"labels": {"l": "v"}}});
        assert!(!is_subset(&desired, &drifted));
        let extra_item = json!({"spec": {"a": 1, "list": [{"x": 1}, {"x": 2}]}, "metadata": {"labels": {"l": "v"}}});
        assert!(!is_subset(&desired, &extra_item));
    }

    #[test]
    fn children_are_created_after_what_they_refer_to() {
        let kinds = ["Job", "CronJob", "RoleBinding", "Role", "ConfigMap", "ServiceAccount", "NetworkPolicy"];
        let mut objs: Vec<Value> = kinds.iter().map(|k| json!({"kind": k})).collect();
        objs.sort_by_key(creation_rank);
        let order: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        let pos = |k: &str| order.iter().position(|x| *x == k).unwrap();
        assert!(pos("ServiceAccount") < pos("Job") && pos("ServiceAccount") < pos("CronJob"));
        assert!(pos("Role") < pos("RoleBinding") && pos("ConfigMap") < pos("CronJob"));
    }

    #[test]
    fn every_child_kind_has_an_api_resource() {
        for (v, k, plural) in CHILD_KINDS {
            assert_eq!(api_resource(v, k).unwrap().plural, plural);
        }
        assert!(api_resource("v1", "Service").is_none());
    }
}

/// A merge patch to an existing object crmguard does not own (e.g. a pod's quarantine label).
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectPatch {
    pub api_version: &'static str,
    pub kind: &'static str,
    pub name: String,
    pub patch: Value,
}

/// Applies merge patches in `namespace`; an object that already holds the patch is not written (so a steady
/// state writes nothing), and one that is gone is skipped.
pub async fn patch_objects(
    client: &Client,
    namespace: &str,
    patches: &[ObjectPatch],
) -> Result<Vec<String>, ApplyError> {
    let mut done = Vec::new();
    for p in patches {
        let child = format!("{}/{}", p.kind, p.name);
        let ar = api_resource(p.api_version, p.kind).ok_or_else(|| ApplyError::UnknownKind(child.clone()))?;
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        let current = api.get_opt(&p.name).await.map_err(|source| ApplyError::Kube { child: child.clone(), source })?;
        match current.and_then(|c| serde_json::to_value(c).ok()) {
            None => continue,
            Some(c) if is_subset(&p.patch, &c) => continue,
            Some(_) => {}
        }
        match api.patch(&p.name, &PatchParams::default(), &Patch::Merge(&p.patch)).await {
            Ok(_) => done.push(child),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(ApplyError::Kube { child, source }),
        }
    }
    Ok(done)
}
