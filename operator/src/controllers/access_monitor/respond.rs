//! The automated response: findings of the rules `spec.response.triggers` names open an incident per team (later
//! findings join the open one). An incident is carried out once it is in status (the next read): it holds the
//! team's credentials (the AccessPolicy's controller reads the open incidents of the monitors it accepts, revokes
//! every lease the team's Secret records and issues none while one is open) and isolates the team's pods through a
//! NetworkGuard's alert-driven quarantine. An acknowledgement (`crmguard.io/acknowledge` on the monitor) closes the
//! incident; deleting the monitor closes all of them. The targets opt in (`acceptHoldsFrom`,
//! `webhook.accessMonitors`). A dry run only says what it would do.

use std::collections::BTreeSet;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::api::access_monitor::{AccessMonitorEvent, AccessMonitorStatus, Incident, Response};
use crate::api::{AccessMonitor, AccessPolicy, NetworkGuard};
use crate::audit::AccessRecord;
use crate::controllers::contract::{Context, Error, Note};
use crate::controllers::network_guard::request::{self, Request};
use crate::monitor::attribution::{Identities, team_accounts};
use crate::monitor::rules::Found;

/// The annotation on the monitor that acknowledges incidents: their ids, comma-separated.
pub const ACKNOWLEDGE: &str = "crmguard.io/acknowledge";
/// Incidents kept in status (every open one, then the newest acknowledged).
pub const INCIDENTS_KEPT: usize = 20;
/// Pods and addresses an incident keeps at most.
pub const ORIGINS_KEPT: usize = 20;
/// Controller name of the response's writes in the audit trail.
const AUDIT_AS: &str = "accessmonitor";

/// What the response did in one pass.
#[derive(Debug, Default)]
pub struct Outcome {
    pub events: Vec<Note<AccessMonitorStatus>>,
}

/// Opens incidents for `found`, carries out the pending ones, closes the acknowledged ones. `incidents` is the
/// status's list (as written), updated in place.
pub async fn respond(
    ctx: &Context,
    m: &AccessMonitor,
    r: Option<&Response>,
    found: &[Found],
    ids: &Identities,
    incidents: &mut Vec<Incident>,
) -> Result<Outcome, Error> {
    let now = (ctx.now)();
    let mut out = Outcome::default();
    let written: BTreeSet<String> = incidents.iter().map(|i| i.id.clone()).collect();
    let mut records = Vec::new();
    if let Some(r) = r {
        let opened = open(r, found, ids, incidents);
        for i in incidents.iter_mut().filter(|i| opened.contains(&i.id)) {
            let what =
                format!("incident {}: team {} (AccessPolicy {}) for {:?}", i.id, i.team, i.access_policy, i.rules);
            if r.dry_run {
                i.actions = would(ctx, m, r, i).await?;
                out.events.push(Note::warning(
                    AccessMonitorEvent::WouldRespond,
                    format!("dry run, nothing done: {what}: {}", i.actions.join("; ")),
                ));
            } else {
                out.events.push(Note::warning(
                    AccessMonitorEvent::IncidentOpened,
                    format!("{what}: responding at the next read"),
                ));
            }
            records.push(record(m, i, now, if r.dry_run { "dry-run" } else { "incident" }));
        }
    }
    // Incidents in status since an earlier pass are carried out (again, until done).
    for i in incidents.iter_mut().filter(|i| i.pending && i.acknowledged.is_none() && written.contains(&i.id)) {
        let Some(r) = r.filter(|r| !r.dry_run) else { continue };
        let (actions, done, failed) = carry_out(ctx, m, r, i, now).await?;
        i.actions = actions;
        i.pending = !done;
        i.failed = failed;
        if done {
            out.events.push(Note::warning(
                AccessMonitorEvent::Responded,
                format!("incident {} of team {}: {}", i.id, i.team, i.actions.join("; ")),
            ));
            records.push(record(m, i, now, "response"));
        }
    }
    acknowledge(m, incidents, now, &mut out, &mut records);
    // Recorded once the pass got through (a pass that fails is made again).
    for r in records {
        ctx.audit.access(r);
    }
    let (open, done): (Vec<Incident>, Vec<Incident>) = incidents.drain(..).partition(|i| i.acknowledged.is_none());
    let keep = INCIDENTS_KEPT.max(open.len());
    incidents.extend(open);
    incidents.extend(done);
    incidents.truncate(keep);
    Ok(out)
}

/// Opens an incident per team for the findings `r` triggers on, newest first; a team's open incident of the same
/// mode (live or dry run) takes its later findings. Returns the new incidents' ids. Findings of users that are no
/// team's open nothing.
pub fn open(r: &Response, found: &[Found], ids: &Identities, incidents: &mut Vec<Incident>) -> Vec<String> {
    let mut opened = Vec::new();
    for f in found.iter().filter(|f| r.triggers.contains(&f.rule)) {
        let Some((team, policy)) = ids.who(&f.user).team() else { continue };
        let same = |i: &&mut Incident| {
            i.acknowledged.is_none() && i.dry_run == r.dry_run && i.team == team && i.access_policy == policy
        };
        if let Some(i) = incidents.iter_mut().find(same) {
            if !i.rules.contains(&f.rule) {
                i.rules.push(f.rule);
            }
            // A pod the response has not isolated yet is isolated in this pass (the incident is in status already).
            if join(&mut i.pods, &f.origins.pods) {
                i.pending |= !i.dry_run;
            }
            join(&mut i.addresses, &f.origins.addresses);
            continue;
        }
        let mut id = format!("{policy}-{team}-{}", f.at.as_second());
        while incidents.iter().any(|i| i.id == id) {
            id.push('x');
        }
        opened.push(id.clone());
        incidents.insert(
            0,
            Incident {
                id,
                team: team.into(),
                access_policy: policy.into(),
                rules: vec![f.rule],
                detected: Time(f.at),
                actions: vec![],
                dry_run: r.dry_run,
                acknowledged: None,
                holds_credentials: r.revoke_credentials && !r.dry_run,
                pending: !r.dry_run,
                failed: None,
                pods: f.origins.pods.iter().take(ORIGINS_KEPT).cloned().collect(),
                addresses: f.origins.addresses.iter().take(ORIGINS_KEPT).cloned().collect(),
            },
        );
    }
    opened
}

/// Adds to `kept` (sorted, at most [`ORIGINS_KEPT`]) what it lacks of `more`; whether anything was added.
fn join(kept: &mut Vec<String>, more: &BTreeSet<String>) -> bool {
    let before = kept.len();
    for m in more {
        if kept.len() < ORIGINS_KEPT && !kept.contains(m) {
            kept.push(m.clone());
        }
    }
    kept.sort();
    kept.len() > before
}

/// The incident as a record of the access stream.
fn record(m: &AccessMonitor, i: &Incident, now: Timestamp, access: &str) -> AccessRecord {
    AccessRecord {
        time: i.detected.0.to_string(),
        until: now.to_string(),
        namespace: m.metadata.namespace.clone().unwrap_or_default(),
        monitor: m.metadata.name.clone().unwrap_or_default(),
        user: String::new(),
        identity: format!("team {} (AccessPolicy {})", i.team, i.access_policy),
        team: Some(i.team.clone()),
        policy: Some(i.access_policy.clone()),
        access: access.into(),
        object: None,
        count: 1,
        finding: Some(format!("{:?}", i.rules)),
        message: Some(format!("incident {}: {}", i.id, i.actions.join("; "))),
        pods: i.pods.clone(),
        addresses: i.addresses.clone(),
    }
}

/// What a dry run would do.
async fn would(ctx: &Context, m: &AccessMonitor, r: &Response, i: &Incident) -> Result<Vec<String>, Error> {
    let mut actions = Vec::new();
    if r.revoke_credentials {
        actions.push(format!(
            "would hold the credentials of team {}: AccessPolicy {} revokes its leases, none issued until acknowledged",
            i.team, i.access_policy
        ));
    }
    if let Some(guard) = &r.quarantine_through {
        let ns = m.metadata.namespace.clone().unwrap_or_default();
        let policy = Api::<AccessPolicy>::namespaced(ctx.client.clone(), &ns).get_opt(&i.access_policy).await?;
        let (pods, whose) = targets(ctx, &ns, policy.as_ref(), i).await?;
        actions.push(match pods.is_empty() {
            true => format!("would isolate nothing: {}", nothing_to_isolate(i)),
            false => format!("would isolate pod(s) [{}]{whose} through NetworkGuard {guard}", pods.join(", ")),
        });
    }
    Ok(actions)
}

/// Carries out a live incident's response: (actions, done, why it failed). A refusal by a target ends it (done,
/// failed); an API error fails the pass, which is made again.
async fn carry_out(
    ctx: &Context,
    m: &AccessMonitor,
    r: &Response,
    i: &Incident,
    now: Timestamp,
) -> Result<(Vec<String>, bool, Option<String>), Error> {
    let ns = m.metadata.namespace.clone().unwrap_or_default();
    let name = m.metadata.name.clone().unwrap_or_default();
    let policy = Api::<AccessPolicy>::namespaced(ctx.client.clone(), &ns).get_opt(&i.access_policy).await?;
    let (mut actions, mut failures) = (Vec::new(), Vec::new());
    if i.holds_credentials {
        match &policy {
            Some(p) if p.spec.accept_holds_from.contains(&name) => {
                nudge(ctx, &ns, &i.access_policy, &format!("hold: incident {}", i.id)).await?;
                actions.push(format!(
                    "credentials held: AccessPolicy {} revokes the team's leases and issues none until acknowledged",
                    i.access_policy
                ));
            }
            Some(_) => failures.push(format!(
                "AccessPolicy {} does not accept holds from AccessMonitor {name} (spec.acceptHoldsFrom)",
                i.access_policy
            )),
            None => failures.push(format!("AccessPolicy {} does not exist", i.access_policy)),
        }
    }
    if let Some(guard) = &r.quarantine_through {
        let (pods, whose) = targets(ctx, &ns, policy.as_ref(), i).await?;
        let g = Api::<NetworkGuard>::namespaced(ctx.client.clone(), &ns).get_opt(guard).await?;
        match g {
            _ if pods.is_empty() => actions.push(nothing_to_isolate(i)),
            None => failures.push(format!("NetworkGuard {guard} does not exist")),
            Some(g) if !g.spec.webhook.as_ref().is_some_and(|w| w.access_monitors.contains(&name)) => failures.push(
                format!("NetworkGuard {guard} does not accept AccessMonitor {name} (spec.webhook.accessMonitors)"),
            ),
            Some(g) => {
                let reason = format!("AccessMonitor {name}: incident {} ({:?}) of team {}", i.id, i.rules, i.team);
                let req = Request { source: "accessmonitor", pods: pods.clone(), reason };
                let (code, body) = request::isolate(&ctx.client, &ctx.audit, AUDIT_AS, &g, &req, now).await;
                if code < 300 {
                    actions.push(format!(
                        "isolation of pod(s) {}{whose} requested through NetworkGuard {guard}",
                        pods.join(", ")
                    ));
                } else if code >= 500 {
                    // The API server did not answer: the pass is made again.
                    return Ok((i.actions.clone(), false, i.failed.clone()));
                } else {
                    let why = body["error"].as_str().unwrap_or_default();
                    failures.push(format!("NetworkGuard {guard} refused to isolate {}: {why}", pods.join(", ")));
                }
            }
        }
    }
    let failed = (!failures.is_empty()).then(|| failures.join("; "));
    actions.extend(failures.iter().map(|f| format!("refused: {f}")));
    Ok((actions, true, failed))
}

/// The pods an incident isolates: those its statements came from when any was placed (a stolen credential is used
/// from another pod than the team's); none when they came only from addresses no pod has; the team's when nothing is
/// known of where they came from. And how the action names them.
async fn targets(
    ctx: &Context,
    ns: &str,
    policy: Option<&AccessPolicy>,
    i: &Incident,
) -> Result<(Vec<String>, &'static str), Error> {
    match (i.pods.is_empty(), i.addresses.is_empty()) {
        (false, _) => Ok((i.pods.clone(), " (the statements came from them)")),
        (true, false) => Ok((vec![], "")),
        (true, true) => Ok((team_pods(ctx, ns, policy, &i.team).await?, "")),
    }
}

/// Why an incident isolates no pod.
fn nothing_to_isolate(i: &Incident) -> String {
    if i.addresses.is_empty() {
        format!("no pod of team {}'s ServiceAccounts to isolate", i.team)
    } else {
        format!(
            "no pod to isolate: the statements came from address(es) {}, which no pod of the namespace has",
            i.addresses.join(", ")
        )
    }
}

/// The pods that have not finished and run as team `team`'s ServiceAccounts (its policy's subjects in `ns`).
async fn team_pods(ctx: &Context, ns: &str, policy: Option<&AccessPolicy>, team: &str) -> Result<Vec<String>, Error> {
    let accounts: BTreeSet<String> = policy.map(|p| team_accounts(p, team)).unwrap_or_default();
    if accounts.is_empty() {
        return Ok(vec![]);
    }
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), ns).list(&ListParams::default()).await?.items;
    let mut names: Vec<String> = pods
        .into_iter()
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .filter(|p| {
            p.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).is_some_and(|a| accounts.contains(a))
        })
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Touches the AccessPolicy so that its controller reads the monitors' incidents at once.
async fn nudge(ctx: &Context, ns: &str, policy: &str, why: &str) -> Result<(), Error> {
    let now = (ctx.now)().to_string();
    let touch = json!({"metadata": {"annotations": {"crmguard.io/last-access-monitor-action": now}}});
    Api::<AccessPolicy>::namespaced(ctx.client.clone(), ns)
        .patch_metadata(policy, &PatchParams::default(), &Patch::Merge(&touch))
        .await?;
    ctx.audit.record(AUDIT_AS, "patch", "AccessPolicy", ns, policy, why);
    Ok(())
}

/// Incidents the monitor's annotation acknowledges are closed (their holds end with them; the AccessPolicy's
/// controller looks again while it holds a team).
fn acknowledge(
    m: &AccessMonitor,
    incidents: &mut [Incident],
    now: Timestamp,
    out: &mut Outcome,
    records: &mut Vec<AccessRecord>,
) {
    let acked: BTreeSet<&str> = m
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACKNOWLEDGE))
        .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    for i in incidents.iter_mut().filter(|i| i.acknowledged.is_none() && acked.contains(i.id.as_str())) {
        i.acknowledged = Some(Time(now));
        i.pending = false;
        out.events.push(Note::normal(
            AccessMonitorEvent::IncidentAcknowledged,
            format!("incident {} of team {} acknowledged: its hold ends, new credentials are issued", i.id, i.team),
        ));
        records.push(record(m, i, now, "acknowledged"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::access_monitor::FindingRule;
    use crate::monitor::attribution::TeamUsers;

    fn ids() -> Identities {
        let policy: AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "crm-access", "namespace": "crm"},
            "spec": {"vault": {}, "teams": [{"name": "sales", "subjects": [{"kind": "Group", "name": "s"}],
                "credentials": {}, "database": {"connection": "crm",
                "grants": [{"tables": ["invoices"], "privileges": ["SELECT"]}]}}]}
        }))
        .unwrap();
        let teams = [TeamUsers { policy: "crm-access".into(), team: "sales".into(), users: vec!["v-sales".into()] }];
        Identities::build(&[policy], &teams, &[], &Identities::default(), Timestamp::UNIX_EPOCH)
    }

    fn found(rule: FindingRule, user: &str, sec: i64) -> Found {
        Found {
            rule,
            user: user.into(),
            identity: String::new(),
            origins: Default::default(),
            object: None,
            message: String::new(),
            at: Timestamp::from_second(1_796_000_000 + sec).unwrap(),
        }
    }

    fn response(dry_run: bool) -> Response {
        Response {
            triggers: vec![FindingRule::ReadVolume, FindingRule::OutsideGrants],
            dry_run,
            revoke_credentials: true,
            quarantine_through: None,
        }
    }

    /// As `Response` documents it: one incident per team while it is open, later findings join it; other rules,
    /// unknown users open nothing; an acknowledged incident takes nothing more; a dry run and a live response keep
    /// their incidents apart.
    #[test]
    fn findings_open_one_incident_per_team_and_mode() {
        let mut incidents = vec![];
        let live = response(false);
        let opened = open(
            &live,
            &[
                found(FindingRule::ReadVolume, "v-sales", 0),
                found(FindingRule::OutsideGrants, "v-sales", 1),
                found(FindingRule::UnknownIdentity, "v-sales", 2),
                found(FindingRule::ReadVolume, "mallory", 3),
            ],
            &ids(),
            &mut incidents,
        );
        assert_eq!(opened, ["crm-access-sales-1796000000"]);
        assert_eq!(incidents[0].rules, [FindingRule::ReadVolume, FindingRule::OutsideGrants]);
        assert!(incidents[0].pending && incidents[0].holds_credentials);
        // A dry run opens its own, which holds nothing and is not pending.
        let dry = open(&response(true), &[found(FindingRule::ReadVolume, "v-sales", 4)], &ids(), &mut incidents);
        assert_eq!(dry.len(), 1);
        assert!(!incidents[0].pending && !incidents[0].holds_credentials && incidents[0].dry_run);
        // Acknowledged: the next finding opens a new incident (the same second gets a distinct id).
        for i in incidents.iter_mut() {
            i.acknowledged = Some(Time(Timestamp::UNIX_EPOCH));
        }
        let again = open(&live, &[found(FindingRule::ReadVolume, "v-sales", 0)], &ids(), &mut incidents);
        assert_eq!(again, ["crm-access-sales-1796000000x"]);
        assert_eq!(incidents.len(), 3);
    }

    /// As `Incident.pods` documents it: the pods its findings came from; a pod a later finding brings makes a
    /// carried-out incident pending again (that pod is isolated at the next read); a dry run's stays as it is.
    #[test]
    fn an_incident_isolates_the_pods_its_findings_came_from() {
        let from = |rule, sec, pods: &[&str]| {
            let mut f = found(rule, "v-sales", sec);
            f.origins.pods = pods.iter().map(|p| p.to_string()).collect();
            f
        };
        let mut incidents = vec![];
        open(&response(false), &[from(FindingRule::ReadVolume, 0, &["intruder-0"])], &ids(), &mut incidents);
        assert_eq!(incidents[0].pods, ["intruder-0"]);
        // Carried out.
        incidents[0].pending = false;
        open(&response(false), &[from(FindingRule::OutsideGrants, 1, &["intruder-0"])], &ids(), &mut incidents);
        assert!(!incidents[0].pending, "no new pod, nothing more to do");
        open(&response(false), &[from(FindingRule::ReadVolume, 2, &["intruder-1"])], &ids(), &mut incidents);
        assert_eq!(incidents[0].pods, ["intruder-0", "intruder-1"]);
        assert!(incidents[0].pending, "the new pod is isolated at the next read");
        let mut dry = vec![];
        open(&response(true), &[from(FindingRule::ReadVolume, 0, &["a"])], &ids(), &mut dry);
        open(&response(true), &[from(FindingRule::ReadVolume, 1, &["b"])], &ids(), &mut dry);
        assert_eq!(dry[0].pods, ["a", "b"]);
        assert!(!dry[0].pending, "a dry run carries nothing out");
    }
}
