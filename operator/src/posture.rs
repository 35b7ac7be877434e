//! The security posture of a CRM namespace: findings with severities computed from the crmguard resources in it
//! (their specs, and their status when they come from a cluster), a score, and the same as a
//! `wgpolicyk8s.io/v1alpha2` PolicyReport (the format Kyverno, Trivy and policy-reporter read). Pure: the operator
//! feeds it from its caches, `crmguard report` from files or from a cluster.

use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::api::access_policy::conditions::CredentialsIssued;
use crate::api::backup_policy::TlsMode;
use crate::api::backup_policy::conditions::BackupHealthy;
use crate::api::condition::Reason;
use crate::api::{AccessPolicy, CrmBackupPolicy, NetworkGuard};

/// How old the newest verified restore drill may be before it is a finding.
pub const DRILL_MAX_AGE: Duration = Duration::from_secs(30 * 86400);
/// Results kept in one report (one report per namespace, never growing without bound).
pub const MAX_RESULTS: usize = 200;

/// Outcome of one check, as PolicyReport spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Fail,
    Warn,
    Pass,
    /// Cannot be judged here (e.g. status is needed and the input has none).
    Skip,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Fail => "fail",
            Outcome::Warn => "warn",
            Outcome::Pass => "pass",
            Outcome::Skip => "skip",
        }
    }
}

/// Severity, as PolicyReport spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Critical,
    High,
    Medium,
    Low,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::High => "high",
            Severity::Medium => "medium",
            Severity::Low => "low",
        }
    }
    /// Points a failure of this severity takes off the score (a warning takes half).
    fn weight(self) -> u32 {
        match self {
            Severity::Critical => 30,
            Severity::High => 15,
            Severity::Medium => 8,
            Severity::Low => 3,
        }
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Check id, e.g. `backup-within-rpo`.
    pub check: &'static str,
    pub category: &'static str,
    pub severity: Severity,
    pub outcome: Outcome,
    /// `Kind/name` the finding is about; None for the namespace as a whole.
    pub resource: Option<(String, String)>,
    pub message: String,
}

/// The posture of one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub namespace: String,
    pub findings: Vec<Finding>,
    /// 100 minus the weights of failures (warnings count half), never below 0.
    pub score: u32,
}

impl Report {
    pub fn count(&self, o: Outcome) -> usize {
        self.findings.iter().filter(|f| f.outcome == o).count()
    }
}

/// What is known about a namespace.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub namespace: String,
    pub backups: Vec<CrmBackupPolicy>,
    pub guards: Vec<NetworkGuard>,
    pub access: Vec<AccessPolicy>,
    /// True when the resources carry their status (from a cluster); false for files.
    pub with_status: bool,
}

fn cond<'a>(conds: &'a [Condition], t: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == t)
}

fn res(kind: &str, name: String) -> Option<(String, String)> {
    Some((kind.to_string(), name))
}

fn finding(
    check: &'static str,
    category: &'static str,
    severity: Severity,
    outcome: Outcome,
    resource: Option<(String, String)>,
    message: impl Into<String>,
) -> Finding {
    Finding { check, category, severity, outcome, resource, message: message.into() }
}

/// Assesses a namespace at `now`.
pub fn assess(inputs: &Inputs, now: Timestamp) -> Report {
    let mut f = Vec::new();
    backup_findings(inputs, now, &mut f);
    network_findings(inputs, &mut f);
    access_findings(inputs, &mut f);
    f.sort_by(|a, b| (a.outcome, a.severity, a.check, &a.resource).cmp(&(b.outcome, b.severity, b.check, &b.resource)));
    let lost: u32 = f
        .iter()
        .map(|x| match x.outcome {
            Outcome::Fail => x.severity.weight(),
            Outcome::Warn => x.severity.weight() / 2,
            _ => 0,
        })
        .sum();
    Report { namespace: inputs.namespace.clone(), findings: f, score: 100u32.saturating_sub(lost) }
}

fn backup_findings(inputs: &Inputs, now: Timestamp, f: &mut Vec<Finding>) {
    if inputs.backups.is_empty() {
        f.push(finding(
            "backup-policy",
            "Backup",
            Severity::Critical,
            Outcome::Fail,
            None,
            "no CrmBackupPolicy: the CRM database is not backed up by crmguard",
        ));
        return;
    }
    for p in &inputs.backups {
        let r = || res("CrmBackupPolicy", p.name_any());
        f.push(if p.spec.encryption.enabled {
            finding("backup-encrypted", "Backup", Severity::High, Outcome::Pass, r(), "backups are encrypted")
        } else {
            finding(
                "backup-encrypted",
                "Backup",
                Severity::High,
                Outcome::Fail,
                r(),
                "encryption.enabled is false: customer data leaves the cluster readable",
            )
        });
        let mut plain = Vec::new();
        if p.spec.destination.endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
            plain.push("the S3 endpoint is plain http");
        }
        if matches!(p.spec.source.tls_mode, TlsMode::Disable | TlsMode::Prefer) {
            plain.push("the database connection does not require TLS");
        }
        f.push(if plain.is_empty() {
            finding(
                "encrypted-in-transit",
                "Transport",
                Severity::Medium,
                Outcome::Pass,
                r(),
                "TLS to S3 and the database",
            )
        } else {
            finding("encrypted-in-transit", "Transport", Severity::Medium, Outcome::Fail, r(), plain.join("; "))
        });
        let mut static_creds = Vec::new();
        if p.spec.source.credentials.secret_ref.is_some() {
            static_creds.push(
                "the database password is a long-lived Secret (source.credentials.vault issues short-lived ones)",
            );
        }
        if p.spec.destination.credentials.as_ref().is_some_and(|c| c.secret_ref.is_some()) {
            static_creds.push(
                "the S3 keys are a long-lived Secret (destination.credentials.vault, or none for the pod's workload identity)",
            );
        }
        f.push(if static_creds.is_empty() {
            finding("short-lived-credentials", "Access", Severity::Low, Outcome::Pass, r(), "no long-lived credentials")
        } else {
            finding("short-lived-credentials", "Access", Severity::Low, Outcome::Warn, r(), static_creds.join("; "))
        });
        if p.spec.verification.restore_drill.is_none() {
            f.push(finding(
                "restore-drill",
                "Recovery",
                Severity::Medium,
                Outcome::Fail,
                r(),
                "no restore drill: nothing proves the backups restore (verification.restoreDrill)",
            ));
        }
        if !inputs.with_status {
            f.push(finding(
                "backup-within-rpo",
                "Backup",
                Severity::Critical,
                Outcome::Skip,
                r(),
                "needs the policy's status: run the report against the cluster",
            ));
            continue;
        }
        let st = p.status.clone().unwrap_or_default();
        match cond(&st.conditions, BackupHealthy::TYPE) {
            Some(c) if c.status == "True" => f.push(finding(
                "backup-within-rpo",
                "Backup",
                Severity::Critical,
                Outcome::Pass,
                r(),
                c.message.clone(),
            )),
            Some(c) if c.reason == "NoBackupYet" => f.push(finding(
                "backup-within-rpo",
                "Backup",
                Severity::Critical,
                Outcome::Warn,
                r(),
                format!("{}: {}", c.reason, c.message),
            )),
            Some(c) => f.push(finding(
                "backup-within-rpo",
                "Backup",
                Severity::Critical,
                Outcome::Fail,
                r(),
                format!("{}: {}", c.reason, c.message),
            )),
            None => f.push(finding(
                "backup-within-rpo",
                "Backup",
                Severity::Critical,
                Outcome::Skip,
                r(),
                "the policy has not been reconciled yet",
            )),
        }
        f.push(if st.rejected_reports.is_empty() {
            finding(
                "backup-reports-authentic",
                "Backup",
                Severity::High,
                Outcome::Pass,
                r(),
                "every job report came from the policy's own, signed jobs",
            )
        } else {
            finding(
                "backup-reports-authentic",
                "Backup",
                Severity::High,
                Outcome::Fail,
                r(),
                format!(
                    "job reports ignored as not the policy's own (someone tried to fake backup health?): {}",
                    st.rejected_reports
                        .iter()
                        .map(|x| format!("{} ({})", x.job, x.reason))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        });
        if p.spec.verification.restore_drill.is_some() {
            let last = st.last_verified_restore.as_ref().and_then(|v| v.time.as_ref()).map(|t| t.0);
            let max = SignedDuration::try_from(DRILL_MAX_AGE).unwrap_or_default();
            f.push(match last {
                Some(t) if now.duration_since(t) <= max => finding(
                    "restore-drill",
                    "Recovery",
                    Severity::Medium,
                    Outcome::Pass,
                    r(),
                    format!("last verified restore {t}"),
                ),
                Some(t) => finding(
                    "restore-drill",
                    "Recovery",
                    Severity::Medium,
                    Outcome::Fail,
                    r(),
                    format!("the newest verified restore drill ({t}) is older than 30 days"),
                ),
                None => finding(
                    "restore-drill",
                    "Recovery",
                    Severity::Medium,
                    Outcome::Warn,
                    r(),
                    "no restore drill has succeeded yet",
                ),
            });
        }
    }
}

fn network_findings(inputs: &Inputs, f: &mut Vec<Finding>) {
    let full = inputs.guards.iter().any(|g| g.spec.default_deny.ingress && g.spec.default_deny.egress);
    f.push(match (inputs.guards.is_empty(), full) {
        (true, _) => finding(
            "network-default-deny",
            "Network",
            Severity::High,
            Outcome::Fail,
            None,
            "no NetworkGuard: every pod may reach the CRM and the CRM may reach anything",
        ),
        (false, false) => finding(
            "network-default-deny",
            "Network",
            Severity::High,
            Outcome::Fail,
            None,
            "no NetworkGuard denies both ingress and egress by default",
        ),
        (false, true) => finding(
            "network-default-deny",
            "Network",
            Severity::High,
            Outcome::Pass,
            None,
            "default deny in both directions",
        ),
    });
    for g in &inputs.guards {
        let r = || res("NetworkGuard", g.name_any());
        if !inputs.with_status {
            continue;
        }
        let st = g.status.clone().unwrap_or_default();
        f.push(if st.uncovered_pods.is_empty() {
            finding(
                "pods-covered",
                "Network",
                Severity::High,
                Outcome::Pass,
                r(),
                "every pod in the namespace is covered",
            )
        } else {
            finding(
                "pods-covered",
                "Network",
                Severity::High,
                Outcome::Fail,
                r(),
                format!("pods outside every NetworkGuard: {}", st.uncovered_pods.join(", ")),
            )
        });
        let q = st.quarantined_pods.unwrap_or(0);
        if q > 0 {
            let pods: Vec<String> = st.quarantines.iter().map(|x| x.pod.clone()).collect();
            f.push(finding(
                "active-quarantine",
                "Incident",
                Severity::High,
                Outcome::Warn,
                r(),
                format!("{q} pod(s) isolated: {}", pods.join(", ")),
            ));
        }
    }
}

fn access_findings(inputs: &Inputs, f: &mut Vec<Finding>) {
    for a in &inputs.access {
        let r = || res("AccessPolicy", a.name_any());
        let wildcard = a
            .spec
            .teams
            .iter()
            .flat_map(|t| t.kubernetes.iter())
            .any(|g| g.verbs.iter().chain(&g.resources).chain(&g.api_groups).any(|x| x == "*"));
        f.push(if wildcard {
            finding("rbac-wildcards", "Access", Severity::Medium, Outcome::Fail, r(), "a team grant uses '*'")
        } else {
            finding("rbac-wildcards", "Access", Severity::Medium, Outcome::Pass, r(), "grants name verbs and resources")
        });
        if inputs.with_status
            && let Some(c) = a.status.as_ref().and_then(|s| cond(&s.conditions, CredentialsIssued::TYPE))
            && c.status != "True"
        {
            f.push(finding(
                "credentials-issued",
                "Access",
                Severity::High,
                Outcome::Fail,
                r(),
                format!("{}: {}", c.reason, c.message),
            ));
        }
    }
}

/// Groups the crmguard resources of input files by namespace (`default_ns` for those that name none). Documents
/// that are not crmguard resources, or do not parse, are left out (`crmguard plan` reports them).
pub fn inputs_from_documents(docs: &[crate::document::Document], default_ns: Option<&str>) -> Vec<Inputs> {
    let mut by_ns: std::collections::BTreeMap<String, Inputs> = std::collections::BTreeMap::new();
    for d in docs {
        let mut v = crate::validation::with_defaults(&d.value);
        let ns = v["metadata"]["namespace"].as_str().map(str::to_string).or(default_ns.map(str::to_string));
        let ns = ns.unwrap_or_else(|| "default".into());
        v["metadata"]["namespace"] = json!(ns);
        let entry = by_ns.entry(ns.clone()).or_insert_with(|| Inputs { namespace: ns, ..Inputs::default() });
        match v["kind"].as_str() {
            Some("CrmBackupPolicy") => entry.backups.extend(crate::validation::read_typed(&v).ok()),
            Some("NetworkGuard") => entry.guards.extend(crate::validation::read_typed(&v).ok()),
            Some("AccessPolicy") => entry.access.extend(crate::validation::read_typed(&v).ok()),
            _ => {}
        }
    }
    by_ns.into_values().filter(|i| !(i.backups.is_empty() && i.guards.is_empty() && i.access.is_empty())).collect()
}

/// The crmguard resources of `namespace` in a cluster, with their status.
pub async fn inputs_from_cluster(client: &kube::Client, namespace: &str) -> Result<Inputs, kube::Error> {
    let lp = kube::api::ListParams::default();
    Ok(Inputs {
        namespace: namespace.to_string(),
        backups: kube::Api::<CrmBackupPolicy>::namespaced(client.clone(), namespace).list(&lp).await?.items,
        guards: kube::Api::<NetworkGuard>::namespaced(client.clone(), namespace).list(&lp).await?.items,
        access: kube::Api::<AccessPolicy>::namespaced(client.clone(), namespace).list(&lp).await?.items,
        with_status: true,
    })
}

/// The report as a `wgpolicyk8s.io/v1alpha2` PolicyReport named `crmguard` (bounded to [`MAX_RESULTS`]).
pub fn policy_report(report: &Report, now: Timestamp) -> Value {
    let seconds = now.as_second();
    let mut results: Vec<Value> = report
        .findings
        .iter()
        .take(MAX_RESULTS)
        .map(|x| {
            let mut v = json!({
                "source": "crmguard",
                "policy": format!("crmguard-{}", x.check),
                "category": x.category,
                "severity": x.severity.as_str(),
                "result": x.outcome.as_str(),
                "message": x.message.chars().take(1000).collect::<String>(),
                "timestamp": {"seconds": seconds, "nanos": 0},
            });
            if let Some((kind, name)) = &x.resource {
                v["resources"] = json!([{
                    "apiVersion": "crmguard.io/v1alpha1", "kind": kind, "name": name, "namespace": report.namespace,
                }]);
            }
            v
        })
        .collect();
    if report.findings.len() > MAX_RESULTS {
        results.push(json!({"source": "crmguard", "policy": "crmguard-truncated", "result": "skip",
            "message": format!("{} more findings not listed", report.findings.len() - MAX_RESULTS),
            "timestamp": {"seconds": seconds, "nanos": 0}}));
    }
    json!({
        "apiVersion": "wgpolicyk8s.io/v1alpha2",
        "kind": "PolicyReport",
        "metadata": {
            "name": "crmguard",
            "namespace": report.namespace,
            "labels": {"app.kubernetes.io/managed-by": "crmguard", "app.kubernetes.io/name": "crmguard"},
            "annotations": {"crmguard.io/score": report.score.to_string()},
        },
        "summary": {
            "pass": report.count(Outcome::Pass), "fail": report.count(Outcome::Fail),
            "warn": report.count(Outcome::Warn), "error": 0, "skip": report.count(Outcome::Skip),
        },
        "results": results,
    })
}

/// The report for people.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "namespace {}: score {}/100 ({} fail, {} warn, {} pass, {} skipped)\n",
        report.namespace,
        report.score,
        report.count(Outcome::Fail),
        report.count(Outcome::Warn),
        report.count(Outcome::Pass),
        report.count(Outcome::Skip)
    );
    for x in &report.findings {
        let what = x.resource.as_ref().map(|(k, n)| format!(" {k}/{n}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<4} {:<8} {}{what}: {}",
            x.outcome.as_str().to_uppercase(),
            x.severity.as_str(),
            x.check,
            x.message
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(extra: Value, status: Value) -> CrmBackupPolicy {
        let mut v = json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "CrmBackupPolicy",
            "metadata": {"name": "db", "namespace": "crm"},
            "spec": {
                "source": {"engine": "postgres", "host": "db", "database": "crm", "tlsMode": "require",
                           "credentials": {"vault": {"authRole": "r", "path": "database/creds/backup"}}},
                "schedule": {"cron": "@daily"},
                "destination": {"bucket": "b", "endpoint": "https://s3"},
                "encryption": {"key": {"secretRef": {"name": "k", "key": "key"}}},
                "verification": {"restoreDrill": {"cron": "@weekly", "scratchDatabase": "scratch"}},
            },
            "status": status,
        });
        merge(&mut v, &extra);
        crate::validation::read_typed(&crate::validation::with_defaults(&v)).expect("policy")
    }

    /// RFC 7386 merge patch (null removes).
    fn merge(target: &mut Value, patch: &Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    fn guard(status: Value) -> NetworkGuard {
        let v = json!({"apiVersion": "crmguard.io/v1alpha1", "kind": "NetworkGuard",
            "metadata": {"name": "fw", "namespace": "crm"}, "spec": {"podSelector": {}}, "status": status});
        crate::validation::read_typed(&crate::validation::with_defaults(&v)).expect("guard")
    }

    fn healthy() -> Value {
        json!({"conditions": [{"type": "BackupHealthy", "status": "True", "reason": "BackupVerified", "message": "ok",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "lastVerifiedRestore": {"backupId": "x", "time": "2026-01-20T00:00:00Z"}})
    }

    fn now() -> Timestamp {
        "2026-02-01T00:00:00Z".parse().expect("time")
    }

    fn outcome(r: &Report, check: &str) -> Vec<Outcome> {
        r.findings.iter().filter(|f| f.check == check).map(|f| f.outcome).collect()
    }

    fn inputs(backups: Vec<CrmBackupPolicy>, guards: Vec<NetworkGuard>) -> Inputs {
        Inputs { namespace: "crm".into(), backups, guards, access: vec![], with_status: true }
    }

    #[test]
    fn a_well_protected_namespace_scores_100() {
        let r = assess(&inputs(vec![backup(json!({}), healthy())], vec![guard(json!({"uncoveredPods": []}))]), now());
        assert_eq!(r.count(Outcome::Fail) + r.count(Outcome::Warn), 0, "{}", render(&r));
        assert_eq!(r.score, 100);
    }

    #[test]
    fn each_finding_is_raised_and_cleared() {
        // No backup policy, no guard.
        let r = assess(&inputs(vec![], vec![]), now());
        assert_eq!(outcome(&r, "backup-policy"), [Outcome::Fail]);
        assert_eq!(outcome(&r, "network-default-deny"), [Outcome::Fail]);
        assert!(r.score <= 55, "{}", r.score);
        // Unencrypted, plaintext, static password, no drill, stale.
        let stale = json!({"conditions": [{"type": "BackupHealthy", "status": "False", "reason": "BackupTooOld",
            "message": "newest verified backup is 3d old", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let bad = backup(
            json!({"spec": {"encryption": {"enabled": false, "key": null}, "destination": {"endpoint": "http://s3", "credentials": {"secretRef": {"name": "s3"}}},
                   "source": {"tlsMode": "disable", "credentials": {"vault": null, "secretRef": {"name": "db"}}},
                   "verification": {"restoreDrill": null}}}),
            stale,
        );
        let r = assess(
            &inputs(
                vec![bad],
                vec![guard(json!({"uncoveredPods": ["web-0"], "quarantinedPods": 1,
            "quarantines": [{"pod": "api-1", "reason": "falco", "requestedBy": "spec", "since": "2026-01-31T00:00:00Z"}]}))],
            ),
            now(),
        );
        for (check, want) in [
            ("backup-encrypted", Outcome::Fail),
            ("encrypted-in-transit", Outcome::Fail),
            ("short-lived-credentials", Outcome::Warn),
            ("restore-drill", Outcome::Fail),
            ("backup-within-rpo", Outcome::Fail),
            ("pods-covered", Outcome::Fail),
            ("active-quarantine", Outcome::Warn),
        ] {
            assert_eq!(outcome(&r, check), [want], "{check}: {}", render(&r));
        }
        let creds = r.findings.iter().find(|f| f.check == "short-lived-credentials").expect("finding");
        assert!(creds.message.contains("database password") && creds.message.contains("S3 keys"), "{}", creds.message);
        // 100 - (30 + 15 + 15 + 8 + 8) - (15 + 3) / 2 with integer halves: 16.
        assert_eq!(r.score, 16, "{}", render(&r));
        // An old drill is a finding; a recent one clears it.
        let mut old = healthy();
        old["lastVerifiedRestore"]["time"] = json!("2025-11-01T00:00:00Z");
        let r = assess(&inputs(vec![backup(json!({}), old)], vec![]), now());
        assert_eq!(outcome(&r, "restore-drill"), [Outcome::Fail]);
        // From files there is no status: the status checks are skipped, not passed.
        let mut files = inputs(vec![backup(json!({}), json!(null))], vec![guard(json!(null))]);
        files.with_status = false;
        let r = assess(&files, now());
        assert_eq!(outcome(&r, "backup-within-rpo"), [Outcome::Skip]);
        assert!(outcome(&r, "pods-covered").is_empty());
    }

    #[test]
    fn the_policy_report_is_bounded_and_summarised() {
        let mut many = inputs(vec![], vec![]);
        many.backups = (0..150)
            .map(|i| {
                let mut b = backup(json!({"spec": {"encryption": {"enabled": false, "key": null}}}), healthy());
                b.metadata.name = Some(format!("db-{i}"));
                b
            })
            .collect();
        let r = assess(&many, now());
        let pr = policy_report(&r, now());
        assert_eq!(pr["kind"], "PolicyReport");
        assert_eq!(pr["results"].as_array().expect("results").len(), MAX_RESULTS + 1);
        assert_eq!(pr["summary"]["fail"], r.count(Outcome::Fail));
        assert_eq!(pr["metadata"]["annotations"]["crmguard.io/score"], "0");
        let first = &pr["results"][0];
        assert_eq!((first["result"].as_str(), first["severity"].as_str()), (Some("fail"), Some("high")), "worst first");
    }
}
