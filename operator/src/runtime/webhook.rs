//! Alert-driven quarantine: `POST /webhook/quarantine/<namespace>/<networkguard>` with an Alertmanager or
//! Falcosidekick payload and `Authorization: Bearer <token>` (the token lives in the Secret the guard's
//! `spec.webhook.tokenSecretRef` names). The request is recorded on the named pods (annotations); the guard's
//! controller carries it out through its quarantine plan like a spec quarantine (the label its standing quarantine
//! policy selects, status, release at the TTL). Refused calls change nothing.

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use serde_json::Value;

use crate::api::NetworkGuard;
use crate::controllers::network_guard::request::{self, Reply, Request, err};

/// Largest accepted request body.
pub const MAX_BODY: usize = 1 << 20;

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
    request::isolate(client, &w.audit, AUDIT_AS, &guard, &request, now).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
