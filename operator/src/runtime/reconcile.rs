//! The reconcile pipeline shared by every controller: resolve + validate + build (per kind, in
//! [`Reconcilable::desired`]) -> apply -> status, with conditions, Events on transitions and backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DeserializeGuard, DynamicObject};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::{Map, Value, json};

use crate::api::condition::{
    self, READY, ReadyReason, ReasonSet, ReconcileEvent, Status, new_condition, set_condition,
};
use crate::controllers::contract::{Cond, Context, Desired, Error, Reconcilable};
use crate::k8s::apply::{ApplyError, apply_children, patch_objects};
use crate::k8s::events::{Event, EventType};
use crate::k8s::managed_fields;
use crate::k8s::meta::Owner;
use crate::validation::FieldError;

fn now_time(ctx: &Context) -> Time {
    Time((ctx.now)())
}

/// Backoff after `n` consecutive failures: 1s doubling to a 5 minute cap, with 50-100 % jitter.
pub fn backoff(n: u32, jitter_unit: f64) -> Duration {
    let base = 1u64.checked_shl(n.min(16)).unwrap_or(u64::MAX).min(300);
    Duration::from_secs_f64(base as f64 * (0.5 + 0.5 * jitter_unit.clamp(0.0, 1.0)))
}

fn jitter() -> f64 {
    // Sub-second clock noise is plenty to spread retries; no RNG dependency.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

fn key<K: Resource>(obj: &K) -> String {
    format!("{}/{}", obj.meta().namespace.clone().unwrap_or_default(), obj.meta().name.clone().unwrap_or_default())
}

/// The reconcile function handed to kube-runtime's Controller.
pub async fn reconcile<K: Reconcilable>(guard: Arc<DeserializeGuard<K>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = guard.meta().name.clone().unwrap_or_default();
    let namespace = guard.meta().namespace.clone().unwrap_or_default();
    let span = tracing::info_span!("reconcile", controller = K::CONTROLLER, object = %format!("{namespace}/{name}"));
    let _enter = span.enter();
    ctx.metrics.reconciled(K::CONTROLLER);
    let result = reconcile_inner(&guard, &ctx).await;
    ctx.metrics.observe_duration(K::CONTROLLER, started.elapsed());
    if let (true, Ok(mut f)) = (result.is_ok(), ctx.failures.lock()) {
        f.remove(&key(guard.as_ref()));
    }
    if let Err(e) = &result {
        // Repeated identical errors are folded into one Event series by the recorder, so a retry loop does
        // not flood the namespace.
        let event = Event {
            type_: EventType::Warning,
            reason: ReconcileEvent::ReconcileFailed.as_str().into(),
            note: format!("{} error, retrying with backoff: {e}", e.category()),
            action: "Reconcile".into(),
            related: None,
        };
        publish(&ctx, guard.as_ref(), event, K::CONTROLLER).await;
    }
    result
}

async fn reconcile_inner<K: Reconcilable>(guard: &DeserializeGuard<K>, ctx: &Context) -> Result<Action, Error> {
    // Right after the start the children's watches may not have listed yet (past the limit, reads stand in).
    ctx.cache.until_synced(Duration::from_secs(30)).await;
    let finalizers = guard.meta().finalizers.clone().unwrap_or_default();
    let has_finalizer = K::FINALIZER.is_some_and(|f| finalizers.iter().any(|x| x == f));
    if guard.meta().deletion_timestamp.is_some() {
        // Children go with their owner through owner references; state outside the cluster is removed by the
        // kind's cleanup before our finalizer is released.
        let (ns, name) = (guard.meta().namespace.clone().unwrap_or_default(), guard.name_any());
        ctx.metrics.set_object(&K::kind(&()), &ns, &name, &[]);
        ctx.cache.forget_object(K::CONTROLLER, guard.meta().uid.as_deref().unwrap_or_default());
        if let (true, Some(f), Ok(obj)) = (has_finalizer, K::FINALIZER, &guard.0) {
            obj.cleanup(ctx).await?;
            set_finalizers(guard, ctx, finalizers.iter().filter(|x| *x != f).cloned().collect()).await?;
            tracing::info!(finalizer = f, "cleaned up; finalizer removed");
        }
        return Ok(Action::await_change());
    }
    let namespace = guard.meta().namespace.clone().unwrap_or_default();
    if ctx.cache.terminating(&namespace) {
        // The namespace controller is removing everything in it, this resource included (whose deletion then
        // runs the cleanup above): writing children or status now would only race it.
        tracing::debug!(%namespace, "namespace is being deleted; nothing is written");
        return Ok(Action::await_change());
    }
    let uid = guard.meta().uid.clone().unwrap_or_default();
    let version = guard.meta().resource_version.clone().unwrap_or_default();
    if ctx.cache.predates_own_write(K::CONTROLLER, &uid, &version) {
        // The watch shows the resource from before this process's last status write, and is about to show the write
        // (whose event reconciles it again): reconciling the older object now would only read its status.
        tracing::debug!("the watch has not shown the last status write yet");
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if let (false, Some(f), Ok(obj)) = (has_finalizer, K::FINALIZER, &guard.0)
        && obj.needs_finalizer()
    {
        set_finalizers(guard, ctx, finalizers.iter().cloned().chain([f.to_string()]).collect()).await?;
    }
    let desired = match &guard.0 {
        Ok(obj) => obj.desired(ctx).await?,
        Err(invalid) => Err(vec![FieldError::new("", format!("cannot be read: {}", invalid.error))]),
    };
    if let Ok(Desired { wait: Some(after), .. }) = &desired {
        tracing::debug!(?after, "waiting for another controller's first pass; nothing written");
        return Ok(Action::requeue(*after));
    }
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), guard.meta().namespace.as_deref().unwrap_or_default(), &ar);
    let name = guard.meta().name.clone().unwrap_or_default();
    let generation = guard.meta().generation;
    let manager = format!("crmguard/{}", K::CONTROLLER);
    // The current status as the server holds it: remembered for the cached object's resourceVersion, or as the
    // watch shows it, or read (the cached object may predate our last status write by more than the watch's lag).
    let current_status = match ctx.cache.status(K::CONTROLLER, &uid, &version) {
        Some(s) => s,
        None => match watched_status(guard, ctx, &uid, &version) {
            Some(s) => s,
            None => {
                let current = api.get_status(&name).await?;
                let status = current.data.get("status").cloned().unwrap_or(json!({}));
                ctx.cache.remember_status(K::CONTROLLER, &uid, current.metadata.resource_version.as_deref(), &status);
                status
            }
        },
    };
    let mut conditions: Vec<Condition> =
        serde_json::from_value(current_status.get("conditions").cloned().unwrap_or(json!([]))).unwrap_or_default();
    let now = now_time(ctx);
    let mut status: Map<String, Value>;
    let mut gauges = Vec::new();
    // A write the API server refused is reported (Ready=False, ApplyFailed) and then returned for backoff.
    let mut apply_error: Option<Error> = None;
    let (ready, ready_reason, ready_message, requeue) = match desired {
        Err(errors) => {
            // Nothing is applied or pruned: the status keeps describing what is still in effect (e.g. the
            // AccessPolicy's teams, which its finalizer reads to know what to clean up in Vault).
            status = fields_of(&current_status)?;
            let message =
                format!("invalid spec: {}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
            (Status::False, ReadyReason::InvalidSpec.as_str(), message, None)
        }
        Ok(desired) => {
            if let Some(owner) = &desired.owner
                && let Err(e) = apply_desired::<K>(ctx, &manager, owner, &desired).await
            {
                if refused(&e).is_none() {
                    return Err(e);
                }
                apply_error = Some(e);
            }
            // Events describe changes made; after a refused write they wait for the retry.
            for n in desired.events.iter().filter(|_| apply_error.is_none()) {
                let event = Event {
                    type_: if n.warning { EventType::Warning } else { EventType::Normal },
                    reason: n.reason.to_string(),
                    note: n.note.clone(),
                    action: "Reconcile".into(),
                    related: n.related.clone(),
                };
                publish(ctx, guard, event, K::CONTROLLER).await;
            }
            for c in &desired.conditions {
                set_condition(
                    &mut conditions,
                    new_condition(c.type_, c.status, c.reason, c.message.clone(), generation, &now),
                );
            }
            status = fields_of(&desired.status)?;
            gauges = desired.gauges.clone();
            let failing: Vec<&Cond<K::Status>> = desired.conditions.iter().filter(|c| c.holds_back()).collect();
            match (apply_error.as_ref().and_then(refused), failing.first()) {
                (Some((reason, message)), _) => (Status::False, reason, message, None),
                (None, None) => (
                    Status::True,
                    ReadyReason::Reconciled.as_str(),
                    "everything the spec asks for is in place".to_string(),
                    desired.requeue_after,
                ),
                (None, Some(c)) => {
                    (Status::False, c.reason, format!("{}: {}", c.type_, c.message), desired.requeue_after)
                }
            }
        }
    };
    gauges.push((
        "resource_ready",
        vec![("kind", K::kind(&()).to_string())],
        f64::from(u8::from(ready == Status::True)),
    ));
    ctx.metrics.set_object(&K::kind(&()), guard.meta().namespace.as_deref().unwrap_or_default(), &name, &gauges);
    let was = condition::find(&conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
    set_condition(&mut conditions, new_condition(READY, ready, ready_reason, ready_message.clone(), generation, &now));
    status.insert("observedGeneration".into(), json!(generation));
    status.insert("conditions".into(), serde_json::to_value(&conditions).unwrap_or(json!([])));
    let new_status = Value::Object(status);
    if typed_status(guard, &new_status) != typed_status(guard, &current_status) {
        let written = write_status::<K>(ctx, &api, &name, &manager, new_status).await?;
        let held = written.data.get("status").cloned().unwrap_or(json!({}));
        ctx.cache.remember_written_status(K::CONTROLLER, &uid, written.metadata.resource_version.as_deref(), &held);
        ctx.metrics.wrote(K::CONTROLLER, "status", 1);
        let ns = guard.meta().namespace.clone().unwrap_or_default();
        ctx.audit.record(
            K::CONTROLLER,
            "status",
            &K::kind(&()),
            &ns,
            &name,
            &format!("Ready={} ({ready_reason})", ready.as_str()),
        );
    }
    if was != Some((ready.as_str().to_string(), ready_reason.to_string())) {
        let type_ = if ready == Status::True { EventType::Normal } else { EventType::Warning };
        let event = Event {
            type_,
            reason: ready_reason.to_string(),
            note: ready_message.clone(),
            action: "Reconcile".into(),
            related: None,
        };
        publish(ctx, guard, event, K::CONTROLLER).await;
    }
    if let Some(e) = apply_error {
        return Err(e);
    }
    Ok(match requeue {
        _ if ready_reason == ReadyReason::InvalidSpec.as_str() => Action::await_change(),
        Some(after) => Action::requeue(after.min(ctx.resync)),
        None => Action::requeue(ctx.resync),
    })
}

/// Writes the whole status by server-side apply of the status subresource as `manager`: a field the status no
/// longer has is removed because nobody else owns it. Status an earlier version wrote with merge patches is moved
/// to the apply as well (once per object, `k8s::managed_fields`), so that its fields can go too; the move is best
/// effort: the status is written either way, and a move that fails is tried again at the next status write.
async fn write_status<K: Reconcilable>(
    ctx: &Context,
    api: &Api<DynamicObject>,
    name: &str,
    manager: &str,
    status: Value,
) -> Result<DynamicObject, Error> {
    let body = json!({
        "apiVersion": K::api_version(&()), "kind": K::kind(&()),
        "metadata": {"name": name}, "status": status,
    });
    let params = PatchParams::apply(manager).force();
    let written = api.patch_status(name, &params, &Patch::Apply(&body)).await?;
    let entries = written.metadata.managed_fields.as_deref().unwrap_or_default();
    let Some(moved) = managed_fields::move_to_apply(entries, manager, "status", managed_fields::LEGACY_STATUS_MANAGERS)
    else {
        return Ok(written);
    };
    // The resourceVersion makes the move conditional: after a write in between (409) it waits for the next one.
    let patch = json!({"metadata": {"resourceVersion": written.metadata.resource_version, "managedFields": moved}});
    let pp = PatchParams { field_manager: Some(manager.to_string()), ..PatchParams::default() };
    if let Err(e) = api.patch(name, &pp, &Patch::Merge(&patch)).await {
        tracing::warn!(error = %e, "status fields written by merge patches before could not be moved to server-side apply; tried again at the next status write");
        return Ok(written);
    }
    ctx.metrics.wrote(K::CONTROLLER, "managedFields", 1);
    let ns = written.metadata.namespace.clone().unwrap_or_default();
    ctx.audit.record(K::CONTROLLER, "patch", &K::kind(&()), &ns, name, "status fields moved to server-side apply");
    tracing::info!("status written by merge patches before is now owned by server-side apply");
    // Applied again: the fields only the merge patches had set, and this status no longer has, are removed now.
    match api.patch_status(name, &params, &Patch::Apply(&body)).await {
        Ok(again) => Ok(again),
        Err(e) => {
            tracing::warn!(error = %e, "status applied again after the move failed; its stale fields go at the next status write");
            Ok(written)
        }
    }
}

/// `status` as the resource's type holds it (what the CRD's schema keeps of it; e.g. an empty list and an absent
/// one are the same), so that statuses from the watch (typed) and from the server (raw) compare; as it is when the
/// object could not be read as its type.
fn typed_status<K: Reconcilable>(guard: &DeserializeGuard<K>, status: &Value) -> Value {
    let typed = guard.0.as_ref().ok().and_then(|obj| {
        let mut v = serde_json::to_value(obj).ok()?;
        v["status"] = status.clone();
        let k: K = serde_json::from_value(v).ok()?;
        serde_json::to_value(&k).ok().map(|v| v.get("status").cloned().unwrap_or(json!({})))
    });
    typed.unwrap_or_else(|| status.clone())
}

/// The status the watch shows, when it can be trusted without a read: nothing was remembered for the resource
/// (the watch's object is the newest this process has seen), or what was remembered is the same (e.g. only its
/// labels changed since our last status write). `None`: read it (the watch may not show our last write yet).
fn watched_status<K: Reconcilable>(
    guard: &DeserializeGuard<K>,
    ctx: &Context,
    uid: &str,
    version: &str,
) -> Option<Value> {
    let obj = guard.0.as_ref().ok()?;
    let shown = serde_json::to_value(obj).ok()?.get("status").cloned().unwrap_or(json!({}));
    let status = match ctx.cache.remembered_status(K::CONTROLLER, uid) {
        None => shown,
        Some(last) if typed_status(guard, &last) == shown => last,
        Some(_) => return None,
    };
    ctx.cache.remember_status(K::CONTROLLER, uid, Some(version), &status);
    Some(status)
}

/// The fields of a kind's status as JSON, without those the runtime writes (`observedGeneration`, `conditions`).
fn fields_of(status: &impl serde::Serialize) -> Result<Map<String, Value>, Error> {
    match serde_json::to_value(status).map_err(|e| Error::Serialize(e.to_string()))? {
        Value::Object(mut fields) => {
            fields.remove("observedGeneration");
            fields.remove("conditions");
            Ok(fields)
        }
        other => Err(Error::Serialize(format!("a status is an object, not {other}"))),
    }
}

/// Applies the children, prunes what is no longer desired, patches other objects, and audits every write.
async fn apply_desired<K: Reconcilable>(
    ctx: &Context,
    manager: &str,
    owner: &Owner,
    desired: &Desired<K::Status>,
) -> Result<(), Error> {
    let because = format!("{} {}/{}", K::kind(&()), owner.namespace, owner.name);
    // Made while `desired` was computed: recorded whatever happens next.
    for w in &desired.audit {
        let detail = format!("{} ({because})", w.reason);
        ctx.audit.record(K::CONTROLLER, w.action.as_str(), "Vault", &owner.namespace, &w.path, &detail);
    }
    let children = apply_children(&ctx.client, &ctx.cache, manager, owner, &desired.children, &desired.prune).await;
    // Patches of other objects (e.g. a quarantine's label) do not wait for the children: a child the API server
    // refuses must not hold an isolation back.
    let patched = patch_objects(&ctx.client, &owner.namespace, &desired.patches).await;
    if let Ok(patched) = &patched {
        ctx.metrics.wrote(K::CONTROLLER, "patch", patched.len());
        for c in patched {
            ctx.audit.record_child(K::CONTROLLER, "patch", &owner.namespace, c, &format!("requested by {because}"));
        }
    }
    let report = children?;
    ctx.metrics.wrote(K::CONTROLLER, "apply", report.applied.len());
    ctx.metrics.wrote(K::CONTROLLER, "prune", report.pruned.len());
    for c in &report.applied {
        ctx.audit.record_child(K::CONTROLLER, "apply", &owner.namespace, c, &format!("desired by {because}"));
    }
    for c in &report.pruned {
        ctx.audit.record_child(K::CONTROLLER, "prune", &owner.namespace, c, &format!("no longer desired by {because}"));
    }
    if !report.applied.is_empty() || !report.pruned.is_empty() {
        tracing::info!(applied = ?report.applied, pruned = ?report.pruned, "children reconciled");
    }
    patched?;
    Ok(())
}

/// `Ready=False` for a write the API server refused: reason `ApplyFailed` and its message (a Secret's is left
/// out: a refusal could quote what was written). Transport errors and conflicts are only retried.
fn refused(e: &Error) -> Option<(&'static str, String)> {
    if let Error::Apply(ApplyError::OwnedByAnother(_)) = e {
        let message = format!("{e}: crmguard does not take over objects it does not own; rename or delete them");
        return Some((ReadyReason::NameConflict.as_str(), message));
    }
    let (child, status) = match e {
        Error::Apply(ApplyError::Kube { child, source: kube::Error::Api(s) }) => (child.as_str(), s),
        Error::Kube(kube::Error::Api(s)) => ("an object", s),
        _ => return None,
    };
    if status.code == 409 || status.code == 429 {
        return None;
    }
    let message = if child.starts_with("Secret/") {
        format!(
            "the API server refused to write {child} (HTTP {}, {}); retrying with backoff",
            status.code, status.reason
        )
    } else {
        format!(
            "the API server refused to write {child} (HTTP {}): {}; retrying with backoff",
            status.code, status.message
        )
    };
    Some((ReadyReason::ApplyFailed.as_str(), message))
}

/// Publishes an Event about the object (a failure is only logged) and audits it.
async fn publish<K: Reconcilable>(ctx: &Context, guard: &DeserializeGuard<K>, event: Event, controller: &str) {
    let ns = guard.meta().namespace.clone().unwrap_or_default();
    match ctx.recorder.publish(&event, &guard.object_ref(&())).await {
        Ok(()) => ctx.audit.record(controller, "event", &K::kind(&()), &ns, &guard.name_any(), &event.reason),
        Err(e) => tracing::warn!(error = %e, "could not publish an Event"),
    }
}

/// Replaces the object's finalizers, guarded by its resourceVersion (a concurrent change makes this fail and
/// the reconcile retry with the fresh object).
async fn set_finalizers<K: Reconcilable>(
    guard: &DeserializeGuard<K>,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), guard.meta().namespace.as_deref().unwrap_or_default(), &ar);
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": guard.meta().resource_version}});
    api.patch(&guard.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
    ctx.metrics.wrote(K::CONTROLLER, "finalizer", 1);
    let ns = guard.meta().namespace.clone().unwrap_or_default();
    let reason = if guard.meta().deletion_timestamp.is_some() {
        "cleanup done, released"
    } else {
        "added before anything is created outside the cluster"
    };
    ctx.audit.record(K::CONTROLLER, "finalizer", &K::kind(&()), &ns, &guard.name_any(), reason);
    Ok(())
}

/// Error policy: count the failure, back off exponentially with jitter.
pub fn error_policy<K: Reconcilable>(guard: Arc<DeserializeGuard<K>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(K::CONTROLLER, error.category());
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key(guard.as_ref())).or_insert(0);
            *n += 1;
            *n
        })
        .unwrap_or(1);
    let delay = backoff(n - 1, jitter());
    tracing::warn!(controller = K::CONTROLLER, object = %guard.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        assert_eq!(backoff(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(30, 1.0), Duration::from_secs(300));
        assert!(backoff(5, 0.5) < backoff(5, 1.0));
    }
}
