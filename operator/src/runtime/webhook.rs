//! Alert-driven quarantine: `POST /webhook/quarantine/<namespace>/<networkguard>` with an Alertmanager or
//! Falcosidekick payload and `Authorization: Bearer <token>` (the token lives in the Secret the guard's
//! `spec.webhook.tokenSecretRef` names). The named pods are labelled and annotated like a spec quarantine, so
//! the guard's standing quarantine policy cuts them off and its TTL releases them. Refused calls change nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::api::{CrmBackupPolicy, NetworkGuard};
use crate::controllers::network_guard::build::QUARANTINE_LABEL;
use crate::controllers::network_guard::quarantine::{BY, REASON, REQUESTED_BY, SINCE, UNTIL};
use crate::k8s::meta::label_value;

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

/// Handles one call.
pub async fn handle(
    client: &Client,
    path: &str,
    authorization: Option<&str>,
    body: &[u8],
    now: jiff::Timestamp,
) -> Reply {
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
    let ttl = match crate::api::common::parse_duration(&webhook.ttl)
        .ok()
        .and_then(|d| jiff::SignedDuration::try_from(d).ok())
    {
        Some(t) => t,
        None => return err(500, "spec.webhook.ttl cannot be parsed"),
    };
    let until = now.checked_add(ttl).unwrap_or(jiff::Timestamp::MAX);
    let backup = if webhook.backup_first { trigger_backups(client, namespace, now).await } else { Ok(()) };
    if let Err(e) = backup {
        tracing::warn!(error = %e, "webhook: could not trigger the backup before isolating");
    }
    let label = label_value(guard_name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut isolated = vec![];
    for pod in &request.pods {
        let annotations = BTreeMap::from([
            (BY, label.clone()),
            (REASON, request.reason.clone()),
            (REQUESTED_BY, request.source.to_string()),
            (SINCE, now.to_string()),
            (UNTIL, until.to_string()),
        ]);
        let patch = json!({"metadata": {"labels": {QUARANTINE_LABEL: label}, "annotations": annotations}});
        match pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => isolated.push(pod.clone()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return err(503, format!("cannot label pod {pod}: {e}")),
        }
    }
    // Touch the guard so that its controller records the isolation and schedules the release at once.
    let touch = json!({"metadata": {"annotations": {"crmguard.io/last-webhook-call": now.to_string()}}});
    if let Err(e) = guards.patch(guard_name, &PatchParams::default(), &Patch::Merge(&touch)).await {
        tracing::warn!(error = %e, "webhook: could not nudge the NetworkGuard");
    }
    tracing::info!(namespace, guard = guard_name, source = request.source, pods = ?isolated, %until, "webhook quarantine");
    (202, json!({"isolated": isolated, "until": until.to_string(), "reason": request.reason}))
}

/// Starts one Job from each backup CronJob of the namespace (like `kubectl create job --from=cronjob/...`).
async fn trigger_backups(client: &Client, namespace: &str, now: jiff::Timestamp) -> Result<(), kube::Error> {
    let policies: Api<CrmBackupPolicy> = Api::namespaced(client.clone(), namespace);
    let cron_jobs: Api<CronJob> = Api::namespaced(client.clone(), namespace);
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    for p in policies.list(&ListParams::default()).await?.items {
        let Some(cj_name) = p.status.as_ref().and_then(|s| s.cron_job_name.clone()) else { continue };
        let Some(cj) = cron_jobs.get_opt(&cj_name).await? else { continue };
        let Some(template) = cj.spec.as_ref().map(|s| s.job_template.clone()) else { continue };
        let name = crate::k8s::meta::child_name(&cj_name, &format!("pre-quarantine-{}", now.as_second()), 63);
        let job = Job {
            metadata: ObjectMeta {
                name: Some(name),
                labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
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
    }
    Ok(())
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
