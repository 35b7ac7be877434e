//! Alert-driven quarantine: `POST /webhook/quarantine/<namespace>/<networkguard>` with an Alertmanager or
//! Falcosidekick payload and `Authorization: Bearer <token>` (the token lives in the Secret the guard's
//! `spec.webhook.tokenSecretRef` names). The request is recorded on the named pods (annotations); the guard's
//! controller carries it out through its quarantine plan like a spec quarantine (the label its standing quarantine
//! policy selects, status, release at the TTL). Refused calls change nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::api::{CrmBackupPolicy, NetworkGuard};
use crate::controllers::network_guard::quarantine::{
    self, AFTER_BACKUP, BACKUP_DEADLINE, BY, PRE_QUARANTINE_LABEL, REASON, REQUESTED_BY,
};
use crate::controllers::network_guard::validate::validate;
use crate::k8s::meta::label_value;
use crate::netpol::selector_matches;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1 << 20;

/// A request for isolation parsed from an alert payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `alertmanager` or `falcosidekick`.
    pub source: &'static str,
    /// Pods named by the alert(s) in the guard's namespace.
    pub pods: Vec<String>,
    pub reason: String,
}

/// Parses an Alertmanager (webhook v4) or Falcosidekick payload; only pods in `namespace` are taken.
pub fn parse(body: &[u8], namespace: &str) -> Result<Request, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let s = |x: &Value| x.as_str().map(str::to_string);
    if let Some(alerts) = v.get("alerts").and_then(Value::as_array) {
        let mut pods = vec![];
        let mut reasons = vec![];
        for a in alerts.iter().filter(|a| a.get("status").and_then(Value::as_str) != Some("resolved")) {
            let labels = &a["labels"];
            let ns_ok = s(&labels["namespace"]).is_none_or(|n| n == namespace);
            if let (Some(pod), true) = (s(&labels["pod"]), ns_ok) {
                pods.push(pod);
                let name = s(&labels["alertname"]).unwrap_or_else(|| "alert".into());
                let summary = s(&a["annotations"]["summary"]).map(|x| format!(": {x}")).unwrap_or_default();
                reasons.push(format!("{name}{summary}"));
            }
        }
        if pods.is_empty() {
            return Err(format!("no firing alert names a pod (labels.pod) in namespace {namespace}"));
        }
        reasons.dedup();
        return Ok(Request { source: "alertmanager", pods, reason: format!("alertmanager: {}", reasons.join("; ")) });
    }
    if let (Some(rule), Some(fields)) = (s(&v["rule"]), v.get("output_fields")) {
        let pod = s(&fields["k8s.pod.name"]).ok_or("falcosidekick payload without output_fields[\"k8s.pod.name\"]")?;
        if s(&fields["k8s.ns.name"]).is_some_and(|n| n != namespace) {
            return Err(format!("the event is about a pod in another namespace than {namespace}"));
        }
        let priority = s(&v["priority"]).map(|p| format!(" ({p})")).unwrap_or_default();
        return Ok(Request { source: "falcosidekick", pods: vec![pod], reason: format!("falco: {rule}{priority}") });
    }
    Err("neither an Alertmanager webhook payload (alerts[]) nor a Falcosidekick event (rule, output_fields)".into())
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The outcome of a call: status code and JSON body (never containing the token).
pub type Reply = (u16, Value);

fn err(code: u16, message: impl Into<String>) -> Reply {
    (code, json!({"error": message.into()}))
}

/// What the webhook needs besides the request: the API client and the audit trail (every write is a record).
#[derive(Clone)]
pub struct Webhook {
    pub client: Client,
    pub audit: crate::audit::Auditor,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("audit", &self.audit).finish_non_exhaustive()
    }
}

/// Controller name in the audit records of webhook writes.
const AUDIT_AS: &str = "quarantine-webhook";

/// Handles one call. Every named pod must exist and be protected by the guard (`spec.podSelector`), else
/// nothing changes; pods already isolated (or waiting for their backup) by this guard are left as they are, so a
/// repeated alert writes nothing and starts no second backup.
pub async fn handle(w: &Webhook, path: &str, authorization: Option<&str>, body: &[u8], now: jiff::Timestamp) -> Reply {
    let client = &w.client;
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["webhook", "quarantine", namespace, guard_name] = parts.as_slice() else {
        return err(404, "use POST /webhook/quarantine/<namespace>/<networkguard>");
    };
    let guards: Api<NetworkGuard> = Api::namespaced(client.clone(), namespace);
    let guard = match guards.get_opt(guard_name).await {
        Ok(Some(g)) => g,
        Ok(None) => return err(401, "unauthorized"),
        Err(e) => return err(503, format!("cannot read the NetworkGuard: {e}")),
    };
    // Unknown guards, disabled webhooks and bad tokens all answer the same 401, so a caller learns nothing.
    let Some(webhook) = guard.spec.webhook.as_ref().filter(|w| w.enabled) else { return err(401, "unauthorized") };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let expected = match secrets.get_opt(&webhook.token_secret_ref.name).await {
        Ok(Some(s)) => s.data.and_then(|d| d.get(&webhook.token_secret_ref.key).map(|b| b.0.clone())),
        Ok(None) => None,
        Err(e) => return err(503, format!("cannot read the token Secret: {e}")),
    };
    let presented = authorization.and_then(|h| h.strip_prefix("Bearer ")).map(|t| t.trim().as_bytes().to_vec());
    match (expected, presented) {
        (Some(e), Some(p)) if !e.is_empty() && same(e.trim_ascii(), &p) => {}
        _ => return err(401, "unauthorized"),
    }
    let request = match parse(body, namespace) {
        Ok(r) => r,
        Err(m) => return err(400, m),
    };
    // An invalid guard is not reconciled, so an isolation would never be released: refuse, as its controller does.
    let times = match validate(&guard) {
        Ok(v) => v.webhook,
        Err(errors) => {
            let errors = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
            return err(409, format!("NetworkGuard {guard_name} is invalid ({errors}); nothing was changed"));
        }
    };
    let signed = |d| jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX);
    let Some((ttl, wait)) = times.map(|t| (signed(t.ttl), signed(t.backup_timeout))) else {
        return err(401, "unauthorized");
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
        match pre_quarantine_backups(w, namespace, &label, ttl, now).await {
            Ok(jobs) => jobs,
            Err(e) => {
                // The incident does not wait for a backup that cannot start: isolate now, and say why.
                tracing::warn!(error = %e, "webhook: could not start the backup before isolating");
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
                w.audit.record(AUDIT_AS, "patch", "Pod", namespace, &pod, &format!("{what}: {}", request.reason));
                isolated.push(pod);
            }
            Err(e) => return err(503, format!("cannot annotate pod {pod}: {e}")),
        }
    }
    // Touch the guard so that its controller isolates the pods and schedules the release at once.
    let touch = json!({"metadata": {"annotations": {"crmguard.io/last-webhook-call": now.to_string()}}});
    match guards.patch(guard_name, &PatchParams::default(), &Patch::Merge(&touch)).await {
        Ok(_) => w.audit.record(AUDIT_AS, "patch", "NetworkGuard", namespace, guard_name, "last webhook call"),
        Err(e) => tracing::warn!(error = %e, "webhook: could not nudge the NetworkGuard"),
    }
    tracing::info!(namespace, guard = guard_name, source = request.source, pods = ?isolated, "webhook quarantine");
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
    w: &Webhook,
    namespace: &str,
    label: &str,
    ttl: jiff::SignedDuration,
    now: jiff::Timestamp,
) -> Result<Vec<String>, kube::Error> {
    let client = &w.client;
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
        w.audit.record(AUDIT_AS, "create", "Job", namespace, &name, "backup before a webhook quarantine");
        started.push(name);
    }
    Ok(started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alertmanager_payloads_name_pods_and_reasons() {
        let body = json!({"version": "4", "status": "firing", "alerts": [
            {"status": "firing", "labels": {"alertname": "CrmShell", "namespace": "crm", "pod": "web-0"},
             "annotations": {"summary": "shell in web"}},
            {"status": "resolved", "labels": {"alertname": "Old", "namespace": "crm", "pod": "web-9"}},
            {"status": "firing", "labels": {"alertname": "Elsewhere", "namespace": "shop", "pod": "x"}}]});
        let r = parse(body.to_string().as_bytes(), "crm").unwrap();
        assert_eq!(r.pods, ["web-0"]);
        assert_eq!(r.source, "alertmanager");
        assert_eq!(r.reason, "alertmanager: CrmShell: shell in web");
    }

    #[test]
    fn falcosidekick_events_name_the_pod() {
        let body = json!({"rule": "Terminal shell in container", "priority": "Warning", "output": "...",
            "output_fields": {"k8s.pod.name": "web-0", "k8s.ns.name": "crm"}});
        let r = parse(body.to_string().as_bytes(), "crm").unwrap();
        assert_eq!(
            (r.source, r.pods.clone(), r.reason.as_str()),
            ("falcosidekick", vec!["web-0".to_string()], "falco: Terminal shell in container (Warning)")
        );
        assert!(parse(body.to_string().as_bytes(), "other").unwrap_err().contains("another namespace"));
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        assert!(parse(b"not json", "crm").unwrap_err().contains("not JSON"));
        assert!(parse(b"{}", "crm").unwrap_err().contains("neither an Alertmanager"));
        assert!(parse(br#"{"alerts": []}"#, "crm").unwrap_err().contains("no firing alert"));
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
