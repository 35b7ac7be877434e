//! Requests to isolate pods through a NetworkGuard's alert-driven quarantine (its `spec.webhook` settings): from the
//! quarantine webhook (Alertmanager, Falcosidekick) and from an AccessMonitor's response. A request is recorded on
//! the named pods (annotations); the guard's controller carries it out through its quarantine plan like a spec
//! quarantine (the label its standing quarantine policy selects, status, release at the TTL). A refused request
//! changes nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::quarantine::{self, AFTER_BACKUP, BACKUP_DEADLINE, BY, PRE_QUARANTINE_LABEL, REASON, REQUESTED_BY};
use super::validate::validate;
use crate::api::{CrmBackupPolicy, NetworkGuard};
use crate::audit::Auditor;
use crate::k8s::meta::label_value;
use crate::netpol::selector_matches;

/// A request for isolation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Who asks: `alertmanager`, `falcosidekick`, `accessmonitor`.
    pub source: &'static str,
    /// Pods in the guard's namespace.
    pub pods: Vec<String>,
    pub reason: String,
}

/// The outcome of a request: status code and JSON body.
pub type Reply = (u16, Value);

pub fn err(code: u16, message: impl Into<String>) -> Reply {
    (code, json!({"error": message.into()}))
}

/// Carries out `request` through `guard`: every named pod must exist and be protected by the guard
/// (`spec.podSelector`), else nothing changes; pods already isolated (or waiting for their backup) by this guard are
/// left as they are, so a repeated request writes nothing and starts no second backup. Writes are audited as
/// `audit_as`.
pub async fn isolate(
    client: &Client,
    audit: &Auditor,
    audit_as: &str,
    guard: &NetworkGuard,
    request: &Request,
    now: jiff::Timestamp,
) -> Reply {
    let namespace = guard.metadata.namespace.as_deref().unwrap_or_default();
    let guard_name = guard.metadata.name.as_deref().unwrap_or_default();
    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), namespace);
    let Some(webhook) = guard.spec.webhook.as_ref().filter(|w| w.enabled) else {
        return err(409, format!("NetworkGuard {guard_name} has no enabled alert-driven quarantine (spec.webhook)"));
    };
    // An invalid guard is not reconciled, so an isolation would never be released: refuse, as its controller does.
    let times = match validate(guard) {
        Ok(v) => v.webhook,
        Err(errors) => {
            let errors = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            return err(409, format!("NetworkGuard {guard_name} is invalid ({errors}); nothing was changed"));
        }
    };
    let signed = |d| jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX);
    let Some((ttl, wait)) = times.map(|t| (signed(t.ttl), signed(t.backup_timeout))) else {
        return err(409, format!("NetworkGuard {guard_name} has no alert-driven quarantine settings (spec.webhook)"));
    };
    // Only pods the guard protects, and all of them exist: otherwise nothing changes.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut names = request.pods.clone();
    names.sort();
    names.dedup();
    let (mut found, mut missing, mut outside) = (vec![], vec![], vec![]);
    for name in &names {
        match pods.get_opt(name).await {
            Ok(Some(p)) if selector_matches(&guard.spec.pod_selector, &p.labels().clone()) => found.push(p),
            Ok(Some(_)) => outside.push(name.clone()),
            Ok(None) => missing.push(name.clone()),
            Err(e) => return err(503, format!("cannot read pod {name}: {e}")),
        }
    }
    if !outside.is_empty() {
        return err(
            403,
            format!(
                "NetworkGuard {guard_name} does not protect pod(s) {} (spec.podSelector does not select them), so it \
                 cannot isolate them; nothing was changed",
                outside.join(", ")
            ),
        );
    }
    if !missing.is_empty() {
        return err(404, format!("no pod {} in namespace {namespace}; nothing was changed", missing.join(", ")));
    }
    let label = label_value(guard_name);
    let spec_reason = guard.spec.quarantine.as_ref().map(|q| q.reason.as_str());
    let (already, new): (Vec<Pod>, Vec<Pod>) =
        found.into_iter().partition(|p| quarantine::holds(p, &label, spec_reason, now));
    let already: Vec<String> = already.iter().map(ResourceExt::name_any).collect();
    if new.is_empty() {
        return (200, json!({"isolating": [], "alreadyIsolated": already, "reason": request.reason}));
    }
    let backup_jobs = if webhook.backup_first {
        match pre_quarantine_backups(client, audit, audit_as, namespace, &label, ttl, now).await {
            Ok(jobs) => jobs,
            Err(e) => {
                // The incident does not wait for a backup that cannot start: isolate now, and say why.
                tracing::warn!(error = %e, source = request.source, "could not start the backup before isolating");
                vec![]
            }
        }
    } else {
        vec![]
    };
    let deadline = now.checked_add(wait).unwrap_or(jiff::Timestamp::MAX);
    let mut isolated = vec![];
    for pod in new.iter().map(ResourceExt::name_any) {
        let mut annotations = BTreeMap::from([
            (BY, Value::from(label.clone())),
            (REASON, Value::from(request.reason.clone())),
            (REQUESTED_BY, Value::from(request.source)),
        ]);
        // The request is recorded on the pod; the guard's controller carries it out through its quarantine plan
        // (label, since and until, status, release at the TTL): at once, or once the backup Jobs have ended (or at
        // the deadline).
        annotations.insert(AFTER_BACKUP, backup_jobs.join(",").into());
        if !backup_jobs.is_empty() {
            annotations.insert(BACKUP_DEADLINE, deadline.to_string().into());
        }
        let mut meta = json!({});
        meta["annotations"] = json!(annotations);
        match pods.patch(&pod, &PatchParams::default(), &Patch::Merge(&json!({"metadata": meta}))).await {
            Ok(_) => {
                let what = if backup_jobs.is_empty() {
                    format!("isolation requested for {}", webhook.ttl)
                } else {
                    format!("isolation after backup, by {deadline}")
                };
                audit.record(audit_as, "patch", "Pod", namespace, &pod, &format!("{what}: {}", request.reason));
                isolated.push(pod);
            }
            Err(e) => return err(503, format!("cannot annotate pod {pod}: {e}")),
        }
    }
    // Touch the guard so that its controller isolates the pods and schedules the release at once.
    let touch = json!({"metadata": {"annotations": {"crmguard.io/last-webhook-call": now.to_string()}}});
    match guards.patch(guard_name, &PatchParams::default(), &Patch::Merge(&touch)).await {
        Ok(_) => audit.record(audit_as, "patch", "NetworkGuard", namespace, guard_name, "last webhook call"),
        Err(e) => tracing::warn!(error = %e, source = request.source, "could not nudge the NetworkGuard"),
    }
    tracing::info!(namespace, guard = guard_name, source = request.source, pods = ?isolated, "quarantine requested");
    if backup_jobs.is_empty() {
        (202, json!({"isolating": isolated, "alreadyIsolated": already, "ttl": webhook.ttl, "reason": request.reason}))
    } else {
        (
            202,
            json!({"pendingBackup": backup_jobs, "pods": isolated, "alreadyIsolated": already,
                   "isolateBy": deadline.to_string(), "reason": request.reason}),
        )
    }
}

/// The backup Jobs an isolation waits for: the ones this guard started in the last `ttl` (one backup per
/// incident), else one new Job from each backup CronJob of the namespace (like `kubectl create job
/// --from=cronjob/...`). Empty when the namespace has no backup policy.
async fn pre_quarantine_backups(
    client: &Client,
    audit: &Auditor,
    audit_as: &str,
    namespace: &str,
    label: &str,
    ttl: jiff::SignedDuration,
    now: jiff::Timestamp,
) -> Result<Vec<String>, kube::Error> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("{PRE_QUARANTINE_LABEL}={label}"));
    let since = now.checked_sub(ttl).unwrap_or(jiff::Timestamp::MIN);
    let recent: Vec<String> = jobs
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|j| j.metadata.creation_timestamp.as_ref().is_some_and(|t| t.0 >= since))
        .map(|j| j.name_any())
        .collect();
    if !recent.is_empty() {
        return Ok(recent);
    }
    let policies: Api<CrmBackupPolicy> = Api::namespaced(client.clone(), namespace);
    let cron_jobs: Api<CronJob> = Api::namespaced(client.clone(), namespace);
    let mut started = vec![];
    for p in policies.list(&ListParams::default()).await?.items {
        let Some(cj_name) = p.status.as_ref().and_then(|s| s.cron_job_name.clone()) else { continue };
        let Some(cj) = cron_jobs.get_opt(&cj_name).await? else { continue };
        let Some(template) = cj.spec.as_ref().map(|s| s.job_template.clone()) else { continue };
        let name = crate::k8s::meta::child_name(&cj_name, &format!("pre-quarantine-{}", now.as_second()), 63);
        let mut labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        labels.insert(PRE_QUARANTINE_LABEL.into(), label.into());
        let job = Job {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels),
                owner_references: Some(vec![OwnerReference {
                    api_version: "batch/v1".into(),
                    kind: "CronJob".into(),
                    name: cj_name.clone(),
                    uid: cj.uid().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                annotations: Some(BTreeMap::from([("cronjob.kubernetes.io/instantiate".into(), "manual".into())])),
                ..ObjectMeta::default()
            },
            spec: template.spec,
            status: None,
        };
        jobs.create(&PostParams::default(), &job).await?;
        audit.record(audit_as, "create", "Job", namespace, &name, "backup before a webhook quarantine");
        started.push(name);
    }
    Ok(started)
}
