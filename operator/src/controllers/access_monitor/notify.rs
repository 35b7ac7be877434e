//! An AccessMonitor's findings and incidents beyond its status: a policy report (`<monitor>-findings`, OpenReports'
//! `Report` or a wgpolicyk8s.io `PolicyReport`, whichever the cluster serves) and alerts to the operator's
//! Alertmanagers (`--alertmanager-url`). What goes out names rules, users, tables and teams, never a value.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};

use super::validate::ValidatedAccessMonitor;
use crate::alerting::Alert;
use crate::api::AccessMonitor;
use crate::api::access_monitor::{AccessMonitorEvent, AccessMonitorStatus, FindingRule, Incident};
use crate::controllers::contract::{Context, Note};
use crate::k8s::apply::{Owned, apply_owned};
use crate::k8s::meta::{NAME_MAX, Owner, child_name};
use crate::k8s::reports::ReportKind;
use crate::monitor::baseline::Baseline;
use crate::monitor::rules::Found;

/// Findings kept for delivery while no Alertmanager takes them (the oldest are dropped beyond).
pub const UNSENT_KEPT: usize = 500;
/// An open incident's alert is sent again this often; it ends by itself four times this after the last send (as
/// Prometheus does), so an operator that stops cannot leave it firing for ever.
pub const RESEND: Duration = Duration::from_secs(60);
/// A report is written again after this even when nothing changed (someone may have deleted or edited it).
pub const REWRITE: Duration = Duration::from_secs(600);

/// What was sent and written, kept between passes (in this process).
#[derive(Clone, Debug, Default)]
pub struct Sent {
    /// Finding alerts not delivered yet.
    pub unsent: Vec<Alert>,
    /// Per incident id: when its alert was last delivered, and whether as resolved.
    pub incidents: BTreeMap<String, (Instant, bool)>,
    /// Alertmanager refused or could not be reached at the last attempt.
    pub failing: bool,
    /// The report last written: its kind, a digest of its body, when.
    pub report: Option<(ReportKind, u64, Instant)>,
    /// The digest of the baseline last written.
    pub baseline: Option<u64>,
    /// Objects whose name someone else holds, already said: (name, holder).
    pub held: BTreeSet<(String, String)>,
}

/// The severity of a rule's findings, on the policy-report scale.
pub fn severity(rule: FindingRule) -> &'static str {
    match rule {
        FindingRule::RevokedCredential | FindingRule::UnknownIdentity | FindingRule::ReadVolume => "high",
        FindingRule::UnusualVolume | FindingRule::RowVolume => "high",
        FindingRule::OutsideGrants | FindingRule::ForeignWorkload => "high",
        FindingRule::DdlOutsideWindow | FindingRule::FailedLogins => "medium",
    }
}

fn rule_name(rule: FindingRule) -> String {
    format!("{rule:?}")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The alert of a finding: `CrmAccessFinding`, one per monitor, rule, user and table (Alertmanager folds repeats);
/// resolved after Alertmanager's `resolve_timeout`.
pub fn finding_alert(m: &AccessMonitor, f: &Found) -> Alert {
    let (ns, name) =
        (m.metadata.namespace.as_deref().unwrap_or_default(), m.metadata.name.as_deref().unwrap_or_default());
    let rule = rule_name(f.rule);
    Alert {
        labels: labels(&[
            ("alertname", "CrmAccessFinding"),
            ("severity", "warning"),
            ("namespace", ns),
            ("accessmonitor", name),
            ("rule", &rule),
            ("user", &f.user),
            ("object", f.object.as_deref().unwrap_or_default()),
        ]),
        annotations: {
            let from = f.origins.describe().unwrap_or_default();
            let mut a = labels(&[
                ("summary", &format!("{rule} by {}", f.identity)),
                ("description", &f.message),
                ("identity", &f.identity),
            ]);
            // Where the statements came from (pods, addresses), when known.
            if !from.is_empty() {
                a.insert("from".into(), from);
            }
            a
        },
        starts_at: f.at,
        ends_at: None,
    }
}

/// The alert of an incident, `CrmAccessIncident`: firing while it is open (ending [`firing_for`] after `now`, sent
/// again before), resolved at its acknowledgement; a dry run's is sent once, resolved after Alertmanager's
/// `resolve_timeout`.
pub fn incident_alert(m: &AccessMonitor, i: &Incident, now: Timestamp, interval: Duration) -> Alert {
    let (ns, name) =
        (m.metadata.namespace.as_deref().unwrap_or_default(), m.metadata.name.as_deref().unwrap_or_default());
    let rules: Vec<String> = i.rules.iter().map(|r| rule_name(*r)).collect();
    let ends_at = match &i.acknowledged {
        Some(t) => Some(t.0),
        None if i.dry_run => None,
        None => {
            Some(now.checked_add(SignedDuration::try_from(firing_for(interval)).unwrap_or_default()).unwrap_or(now))
        }
    };
    let mut summary =
        format!("incident {} of team {} (AccessPolicy {}): {}", i.id, i.team, i.access_policy, rules.join(", "));
    if i.dry_run {
        summary.push_str(" (dry run: nothing was done)");
    }
    Alert {
        labels: labels(&[
            ("alertname", "CrmAccessIncident"),
            ("severity", if i.dry_run { "info" } else { "critical" }),
            ("namespace", ns),
            ("accessmonitor", name),
            ("incident", &i.id),
            ("team", &i.team),
            ("dry_run", if i.dry_run { "true" } else { "" }),
        ]),
        annotations: labels(&[
            ("summary", &summary),
            ("description", &i.actions.join("; ")),
            (
                "acknowledge",
                &format!("kubectl annotate accessmonitor {name} -n {ns} {}={}", super::respond::ACKNOWLEDGE, i.id),
            ),
        ]),
        starts_at: i.detected.0,
        ends_at,
    }
}

/// How long an open incident's alert fires after a send: four [`RESEND`]s, or three passes of a slower monitor.
pub fn firing_for(interval: Duration) -> Duration {
    (RESEND * 4).max(interval * 3)
}

/// The alerts due this pass: the findings not delivered yet and these new ones, and the incidents whose alert
/// is new, due again, or resolved since it was last sent. Returns them with the incident ids they carry.
pub fn due(
    m: &AccessMonitor,
    status: &AccessMonitorStatus,
    found: &[Found],
    sent: &Sent,
    now: Timestamp,
    interval: Duration,
) -> (Vec<Alert>, Vec<(String, bool)>) {
    let mut alerts = sent.unsent.clone();
    alerts.extend(found.iter().map(|f| finding_alert(m, f)));
    let mut carried = Vec::new();
    for i in &status.incidents {
        let resolved = i.acknowledged.is_some();
        let send = match sent.incidents.get(&i.id) {
            // One acknowledged before this process sent it (e.g. across a restart) has nothing left to say.
            None => !resolved,
            // A dry run's alert is sent once (it holds nothing, so nothing is resolved).
            Some(_) if i.dry_run => false,
            Some((_, true)) => false,
            Some((_, false)) if resolved => true,
            Some((at, false)) => at.elapsed() >= RESEND,
        };
        if send {
            alerts.push(incident_alert(m, i, now, interval));
            carried.push((i.id.clone(), resolved));
        }
    }
    (alerts, carried)
}

/// The monitor's policy report: a `fail` result per finding in status (the newest) and per open incident.
pub fn report(m: &AccessMonitor, owner: &Owner, status: &AccessMonitorStatus) -> Value {
    let name = m.metadata.name.as_deref().unwrap_or_default();
    let mut results: Vec<Value> = status
        .findings
        .iter()
        .map(|f| {
            let mut properties = json!({"user": f.user, "identity": f.identity});
            if let Some(o) = &f.object {
                properties["object"] = o.clone().into();
            }
            json!({
                "source": "crmguard",
                "policy": name,
                "rule": rule_name(f.rule),
                "category": "Database access",
                "severity": severity(f.rule),
                "result": "fail",
                "scored": true,
                "message": f.message,
                "properties": properties,
                "timestamp": {"seconds": f.at.0.as_second(), "nanos": f.at.0.subsec_nanosecond()},
            })
        })
        .collect();
    for i in status.incidents.iter().filter(|i| i.acknowledged.is_none() && !i.dry_run) {
        let rules: Vec<String> = i.rules.iter().map(|r| rule_name(*r)).collect();
        results.push(json!({
            "source": "crmguard",
            "policy": name,
            "rule": "Incident",
            "category": "Database access",
            "severity": "critical",
            "result": "fail",
            "scored": true,
            "message": format!("incident {} of team {} is open ({}): {}", i.id, i.team, rules.join(", "),
                i.actions.join("; ")),
            "properties": {"incident": i.id, "team": i.team, "accessPolicy": i.access_policy},
            "timestamp": {"seconds": i.detected.0.as_second(), "nanos": i.detected.0.subsec_nanosecond()},
        }));
    }
    let mut meta = owner.child_meta(child_name(name, "findings", NAME_MAX), "access-monitor");
    if let Some(r) = meta.owner_references.as_mut().and_then(|r| r.first_mut()) {
        // A report does not hold up its monitor's deletion.
        r.block_owner_deletion = None;
    }
    json!({
        "metadata": meta,
        "source": "crmguard",
        "scope": {"apiVersion": owner.api_version, "kind": owner.kind, "name": owner.name,
                  "namespace": owner.namespace, "uid": owner.uid},
        "summary": {"pass": 0, "fail": results.len(), "warn": 0, "error": 0, "skip": 0},
        "results": results,
    })
}

/// What a pass says about its notifications, as Events.
pub type Notes = Vec<Note<AccessMonitorStatus>>;

/// Sends what is due to the Alertmanagers (when the operator has any), writes the report when it changed and the
/// learned baseline when an hour was learned. None fails the pass: an Alertmanager that refuses is retried at the
/// next pass (`AlertsUndelivered` says so once), a report or baseline that cannot be written is written at the
/// next pass; one whose name someone else holds is left alone (`NameTaken`, once).
pub async fn notify(
    ctx: &Context,
    m: &AccessMonitor,
    v: &ValidatedAccessMonitor,
    status: &AccessMonitorStatus,
    found: &[Found],
    baseline: Option<&Baseline>,
    sent: &mut Sent,
) -> Notes {
    let (owner, interval) = (&v.owner, v.interval);
    let mut notes = Notes::new();
    if let Some(am) = &ctx.alertmanagers {
        let (alerts, carried) = due(m, status, found, sent, (ctx.now)(), interval);
        if !alerts.is_empty() {
            match am.send(&alerts).await {
                Ok(()) => {
                    sent.unsent.clear();
                    for (id, resolved) in carried {
                        sent.incidents.insert(id, (Instant::now(), resolved));
                    }
                    sent.failing = false;
                    ctx.metrics.alerted("sent", alerts.len());
                }
                Err(e) => {
                    let mut unsent: Vec<Alert> =
                        alerts.into_iter().filter(|a| a.labels["alertname"] == "CrmAccessFinding").collect();
                    let over = unsent.len().saturating_sub(UNSENT_KEPT);
                    unsent.drain(..over);
                    sent.unsent = unsent;
                    ctx.metrics.alerted("failed", 1);
                    tracing::warn!(error = %e, "the Alertmanagers took no alert; sent again at the next pass");
                    if !sent.failing {
                        notes.push(Note::warning(AccessMonitorEvent::AlertsUndelivered, e));
                    }
                    sent.failing = true;
                }
            }
        }
        let live: BTreeSet<&String> = status.incidents.iter().map(|i| &i.id).collect();
        sent.incidents.retain(|id, _| live.contains(id));
    }
    write_report(ctx, m, owner, status, sent, &mut notes).await;
    write_baseline(ctx, m, owner, baseline, sent, &mut notes).await;
    notes
}

/// Applies `body` unless someone else holds its name (said once per name and holder); true when written.
async fn write_owned(
    api: &Api<DynamicObject>,
    what: &str,
    body: &Value,
    owner: &Owner,
    sent: &mut Sent,
    notes: &mut Notes,
) -> bool {
    let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
    match apply_owned(api, &name, body, owner, "crmguard/accessmonitor").await {
        Ok(Owned::Applied) => {
            sent.held.retain(|(n, _)| *n != name);
            true
        }
        Ok(Owned::Held(holder)) => {
            if sent.held.insert((name.clone(), holder.clone())) {
                notes.push(Note::warning(
                    AccessMonitorEvent::NameTaken,
                    format!(
                        "{what} {name} exists and belongs to {holder}: it is left alone, so the monitor's {what} is \
                         not written; remove that object or rename the monitor"
                    ),
                ));
            }
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, object = %name, "cannot write the monitor's {what}; written at the next pass");
            false
        }
    }
}

async fn write_report(
    ctx: &Context,
    m: &AccessMonitor,
    owner: &Owner,
    status: &AccessMonitorStatus,
    sent: &mut Sent,
    notes: &mut Notes,
) {
    let body = report(m, owner, status);
    let digest = crate::k8s::cache::digest_of(&[&body.to_string()]);
    let kind = match ctx.reports.get(&ctx.client).await {
        Ok(Some(kind)) => kind,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether a policy report CRD is installed");
            return;
        }
    };
    if sent.report.is_some_and(|(k, d, at)| k == kind && d == digest && at.elapsed() < REWRITE) {
        return;
    }
    let name = body["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let api = kind.api(&ctx.client, &owner.namespace);
    if !write_owned(&api, "findings report", &kind.stamp(body), owner, sent, notes).await {
        return;
    }
    let before = sent.report.replace((kind, digest, Instant::now()));
    if before.is_none_or(|(k, d, _)| k != kind || d != digest) {
        ctx.metrics.wrote(CONTROLLER, "apply", 1);
        let why = format!("{} finding(s) in status", status.findings.len());
        ctx.audit.record(CONTROLLER, "apply", kind.kind, &owner.namespace, &name, &why);
    }
    // Written as another kind before (the cluster's report CRDs changed): that one, if still the monitor's, goes.
    if let Some((old, _, _)) = before.filter(|(k, _, _)| *k != kind) {
        let api = old.api(&ctx.client, &owner.namespace);
        let ours = api.get_opt(&name).await.ok().flatten().is_some_and(|o| {
            o.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid && r.controller == Some(true))
        });
        if ours && api.delete(&name, &Default::default()).await.is_ok() {
            ctx.audit.record(CONTROLLER, "delete", old.kind, &owner.namespace, &name, "written as another kind now");
        }
    }
}

/// The baseline's ConfigMap, written when what was learned changed (an hour ended); removed with the rule.
async fn write_baseline(
    ctx: &Context,
    m: &AccessMonitor,
    owner: &Owner,
    baseline: Option<&Baseline>,
    sent: &mut Sent,
    notes: &mut Notes,
) {
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &owner.namespace,
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "ConfigMap"), "configmaps"),
    );
    let name = baseline_name(m);
    let Some(b) = baseline else {
        // The rule was removed: what it learned goes (if it is the monitor's).
        if sent.baseline.take().is_some() {
            let ours = api.get_opt(&name).await.ok().flatten().is_some_and(|o| {
                o.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid && r.controller == Some(true))
            });
            if ours && api.delete(&name, &Default::default()).await.is_ok() {
                ctx.audit.record(CONTROLLER, "delete", "ConfigMap", &owner.namespace, &name, "rules.baseline removed");
            }
        }
        return;
    };
    let json = b.to_json();
    let digest = crate::k8s::cache::digest_of(&[&json]);
    if sent.baseline == Some(digest) {
        return;
    }
    let mut meta = owner.child_meta(name.clone(), "access-baseline");
    if let Some(r) = meta.owner_references.as_mut().and_then(|r| r.first_mut()) {
        r.block_owner_deletion = None;
    }
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {BASELINE_KEY: json}});
    if write_owned(&api, "baseline ConfigMap", &body, owner, sent, notes).await {
        sent.baseline = Some(digest);
        ctx.metrics.wrote(CONTROLLER, "apply", 1);
        ctx.audit.record(CONTROLLER, "apply", "ConfigMap", &owner.namespace, &name, "an hour of reads learned");
    }
}

/// The name of the monitor's baseline ConfigMap.
pub fn baseline_name(m: &AccessMonitor) -> String {
    child_name(m.metadata.name.as_deref().unwrap_or_default(), "baseline", NAME_MAX)
}

/// The key of the learned baseline in that ConfigMap.
pub const BASELINE_KEY: &str = "baseline.json";

const CONTROLLER: &str = <AccessMonitor as crate::controllers::contract::Reconcilable>::CONTROLLER;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn monitor() -> AccessMonitor {
        serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
            "metadata": {"name": "crm-db", "namespace": "crm", "uid": "u-1"},
            "spec": {"database": {"engine": "postgres", "podSelector": {}}, "rules": {}},
        }))
        .unwrap()
    }

    fn incident(id: &str, acknowledged: bool, dry_run: bool) -> Incident {
        let t: Timestamp = "2026-12-03T10:00:00Z".parse().unwrap();
        Incident {
            id: id.into(),
            team: "sales".into(),
            access_policy: "crm-access".into(),
            rules: vec![FindingRule::ReadVolume],
            detected: Time(t),
            actions: vec!["credentials held (Secret crm-access-sales-db)".into()],
            dry_run,
            acknowledged: acknowledged.then(|| Time(t.checked_add(SignedDuration::from_mins(5)).unwrap())),
            holds_credentials: !dry_run,
            pending: false,
            failed: None,
            pods: vec![],
            addresses: vec![],
        }
    }

    const I: Duration = Duration::from_secs(5);

    fn ids(carried: &[(String, bool)]) -> Vec<&str> {
        carried.iter().map(|(i, _)| i.as_str()).collect()
    }

    /// An open incident is alerted at once, again after RESEND, and once more, ended, at its acknowledgement; a
    /// dry run's once; one acknowledged before this process sent anything is not alerted at all.
    #[test]
    fn incidents_are_alerted_while_open_and_resolved_once() {
        let m = monitor();
        let now: Timestamp = "2026-12-03T10:01:00Z".parse().unwrap();
        let status = AccessMonitorStatus {
            incidents: vec![incident("open", false, false), incident("dry", false, true), incident("old", true, false)],
            ..AccessMonitorStatus::default()
        };
        let mut sent = Sent::default();
        let (alerts, carried) = due(&m, &status, &[], &sent, now, I);
        assert_eq!(ids(&carried), ["open", "dry"]);
        assert_eq!(alerts[0].ends_at, Some(now.checked_add(SignedDuration::from_mins(4)).unwrap()));
        // A monitor that reads every 5 minutes keeps its incident firing across three of its passes.
        let slow = incident_alert(&m, &status.incidents[0], now, Duration::from_secs(300));
        assert_eq!(slow.ends_at, Some(now.checked_add(SignedDuration::from_mins(15)).unwrap()));
        assert_eq!(alerts[0].labels["severity"], "critical");
        assert_eq!((alerts[1].ends_at, alerts[1].labels["severity"].as_str()), (None, "info"));
        for (id, resolved) in carried {
            sent.incidents.insert(id, (Instant::now(), resolved));
        }
        let (alerts, _) = due(&m, &status, &[], &sent, now, I);
        assert!(alerts.is_empty(), "nothing due within RESEND: {alerts:?}");
        let long_ago = Instant::now().checked_sub(RESEND).unwrap();
        sent.incidents.insert("open".into(), (long_ago, false));
        sent.incidents.insert("dry".into(), (long_ago, false));
        let (_, carried) = due(&m, &status, &[], &sent, now, I);
        assert_eq!(ids(&carried), ["open"], "only the open incident is sent again");
        let acknowledged = AccessMonitorStatus { incidents: vec![incident("open", true, false)], ..status.clone() };
        let (alerts, carried) = due(&m, &acknowledged, &[], &sent, now, I);
        assert_eq!(carried, [("open".to_string(), true)]);
        assert_eq!(alerts[0].ends_at, acknowledged.incidents[0].acknowledged.as_ref().map(|t| t.0));
        sent.incidents.insert("open".into(), (Instant::now(), true));
        assert!(due(&m, &acknowledged, &[], &sent, now, I).0.is_empty(), "resolved once");
    }

    /// Findings not delivered stay due with the new ones; the report has a fail result per finding and per open
    /// incident (not a dry run's, not an acknowledged one's), owned by the monitor without blocking its deletion.
    #[test]
    fn undelivered_findings_stay_due_and_the_report_lists_what_is_open() {
        let m = monitor();
        let at: Timestamp = "2026-12-03T10:00:30Z".parse().unwrap();
        let f = Found {
            rule: FindingRule::ReadVolume,
            user: "v-sales-1".into(),
            identity: "team sales (AccessPolicy crm-access)".into(),
            origins: Default::default(),
            object: Some("public.invoices".into()),
            message: "6 SELECT on public.invoices within a minute (limit 5)".into(),
            at,
        };
        let sent = Sent { unsent: vec![finding_alert(&m, &f)], ..Sent::default() };
        let (alerts, _) = due(&m, &AccessMonitorStatus::default(), std::slice::from_ref(&f), &sent, at, I);
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[1].labels["object"], "public.invoices");
        let status = AccessMonitorStatus {
            findings: vec![crate::api::access_monitor::Finding {
                rule: f.rule,
                user: f.user.clone(),
                identity: f.identity.clone(),
                object: f.object.clone(),
                message: f.message.clone(),
                at: Time(at),
                pods: vec![],
                addresses: vec![],
            }],
            incidents: vec![incident("open", false, false), incident("dry", false, true), incident("old", true, false)],
            ..AccessMonitorStatus::default()
        };
        let owner = crate::controllers::owner_of(&m).unwrap();
        let r = report(&m, &owner, &status);
        let rules: Vec<&str> = r["results"].as_array().unwrap().iter().map(|x| x["rule"].as_str().unwrap()).collect();
        assert_eq!(rules, ["ReadVolume", "Incident"]);
        assert_eq!(r["summary"]["fail"], 2);
        assert_eq!(r["metadata"]["name"], "crm-db-findings");
        assert_eq!(r["metadata"]["ownerReferences"][0]["controller"], true);
        assert!(r["metadata"]["ownerReferences"][0].get("blockOwnerDeletion").is_none());
        assert_eq!(r["results"][0]["timestamp"], json!({"seconds": at.as_second(), "nanos": 0}));
    }
}
