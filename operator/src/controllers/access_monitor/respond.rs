//! The automated response: findings of the rules `spec.response.triggers` names open an incident per team (later
//! findings join the open one); the team's credentials are held (the AccessPolicy's controller revokes every lease
//! its Secret records and issues none while the hold is there) and its pods isolated through a NetworkGuard's
//! alert-driven quarantine. An acknowledgement (`crmguard.io/acknowledge` on the monitor) lifts the hold. Every
//! write is audited; a dry run only says what it would do.

use std::collections::BTreeSet;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::api::access_monitor::{AccessMonitorEvent, AccessMonitorStatus, Incident, Response};
use crate::api::access_policy::SubjectKind;
use crate::api::{AccessMonitor, AccessPolicy, NetworkGuard};
use crate::audit::AccessRecord;
use crate::controllers::access_policy::lease::HELD_BY;
use crate::controllers::contract::{Context, Error, Note};
use crate::controllers::network_guard::request::{self, Request};
use crate::monitor::attribution::Identities;
use crate::monitor::rules::Found;

/// The annotation on the monitor that acknowledges incidents: their ids, comma-separated.
pub const ACKNOWLEDGE: &str = "crmguard.io/acknowledge";
/// Incidents kept in status (every open one, then the newest acknowledged).
pub const INCIDENTS_KEPT: usize = 20;
/// Controller name of the response's writes in the audit trail.
const AUDIT_AS: &str = "accessmonitor";

/// What the response did in one pass.
#[derive(Debug, Default)]
pub struct Outcome {
    pub events: Vec<Note<AccessMonitorStatus>>,
    /// A response that could not be carried out, for the `Settled` condition.
    pub failures: Vec<String>,
}

/// The value of a hold this monitor's incident `id` puts on a team's Secret.
fn hold(m: &AccessMonitor, id: &str) -> String {
    let ns = m.metadata.namespace.as_deref().unwrap_or_default();
    format!("AccessMonitor {ns}/{}: incident {id}", m.metadata.name.as_deref().unwrap_or_default())
}

/// Opens incidents for `found` and carries out the response; then lifts what acknowledged incidents held.
/// `incidents` is the status's list, updated in place.
pub async fn respond(
    ctx: &Context,
    m: &AccessMonitor,
    r: Option<&Response>,
    found: &[Found],
    ids: &Identities,
    incidents: &mut Vec<Incident>,
) -> Result<Outcome, Error> {
    let ns = m.metadata.namespace.clone().unwrap_or_default();
    let now = (ctx.now)();
    let mut out = Outcome::default();
    // Findings by team: one incident per team while it is open.
    let mut opened: BTreeSet<String> = BTreeSet::new();
    let asked = |f: &&Found| r.is_some_and(|r| r.triggers.contains(&f.rule));
    for f in found.iter().filter(asked) {
        let Some((team, policy)) = ids.who(&f.user).team() else { continue };
        match incidents.iter_mut().find(|i| i.acknowledged.is_none() && i.team == team && i.access_policy == policy) {
            Some(i) => {
                if !i.rules.contains(&f.rule) {
                    i.rules.push(f.rule);
                }
            }
            None => {
                let id = format!("{team}-{}", f.at.as_second());
                opened.insert(id.clone());
                incidents.insert(
                    0,
                    Incident {
                        id,
                        team: team.into(),
                        access_policy: policy.into(),
                        rules: vec![f.rule],
                        detected: Time(f.at),
                        actions: vec![],
                        dry_run: r.is_some_and(|r| r.dry_run),
                        acknowledged: None,
                    },
                );
            }
        }
    }
    for i in incidents.iter_mut().filter(|i| opened.contains(&i.id)) {
        let Some(r) = r else { break };
        let policy = access_policy(ctx, &ns, &i.access_policy).await?;
        if r.revoke_credentials {
            i.actions.push(hold_credentials(ctx, m, r.dry_run, i, policy.as_ref(), &mut out).await);
        }
        if let Some(guard) = &r.quarantine_through {
            i.actions.push(quarantine(ctx, m, r.dry_run, guard, i, policy.as_ref(), now, &mut out).await?);
        }
        let what = format!(
            "incident {}: team {} (AccessPolicy {}) for {:?}: {}",
            i.id,
            i.team,
            i.access_policy,
            i.rules,
            i.actions.join("; ")
        );
        out.events.push(if r.dry_run {
            Note::warning(AccessMonitorEvent::WouldRespond, format!("dry run, nothing done: {what}"))
        } else {
            Note::warning(AccessMonitorEvent::IncidentOpened, what)
        });
        ctx.audit.access(AccessRecord {
            time: i.detected.0.to_string(),
            until: now.to_string(),
            namespace: ns.clone(),
            monitor: m.metadata.name.clone().unwrap_or_default(),
            user: String::new(),
            identity: format!("team {} (AccessPolicy {})", i.team, i.access_policy),
            team: Some(i.team.clone()),
            policy: Some(i.access_policy.clone()),
            access: if r.dry_run { "dry-run".into() } else { "response".into() },
            object: None,
            count: 1,
            finding: Some(format!("{:?}", i.rules)),
            message: Some(format!("incident {}: {}", i.id, i.actions.join("; "))),
        });
    }
    acknowledge(ctx, m, incidents, now, &mut out).await?;
    // Every open incident stays; then the newest acknowledged ones.
    let (open, done): (Vec<Incident>, Vec<Incident>) = incidents.drain(..).partition(|i| i.acknowledged.is_none());
    incidents.extend(open);
    incidents.extend(done);
    incidents.truncate(INCIDENTS_KEPT.max(incidents.iter().filter(|i| i.acknowledged.is_none()).count()));
    Ok(out)
}

/// The AccessPolicy an incident is about, as the watch shows it (read when the watch has not listed yet).
async fn access_policy(ctx: &Context, ns: &str, name: &str) -> Result<Option<AccessPolicy>, Error> {
    if let Some(all) = ctx.watched_access_policies(ns) {
        return Ok(all.into_iter().find(|p| p.metadata.name.as_deref() == Some(name)));
    }
    Ok(Api::<AccessPolicy>::namespaced(ctx.client.clone(), ns).get_opt(name).await?)
}

/// The team's credentials Secret, from the policy's status.
fn team_secret(policy: Option<&AccessPolicy>, team: &str) -> Option<String> {
    policy?.status.as_ref()?.teams.iter().find(|t| t.name == team)?.secret_name.clone()
}

/// Puts the incident's hold on the team's Secret and nudges its AccessPolicy, whose controller revokes the leases.
async fn hold_credentials(
    ctx: &Context,
    m: &AccessMonitor,
    dry_run: bool,
    i: &Incident,
    policy: Option<&AccessPolicy>,
    out: &mut Outcome,
) -> String {
    let ns = m.metadata.namespace.clone().unwrap_or_default();
    let Some(secret) = team_secret(policy, &i.team) else {
        return format!("no credentials Secret of team {} to hold", i.team);
    };
    if dry_run {
        return format!("would hold the credentials (Secret {secret}): leases revoked, none issued until acknowledged");
    }
    let patch = json!({"metadata": {"annotations": {HELD_BY: hold(m, &i.id)}}});
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = secrets.patch_metadata(&secret, &PatchParams::default(), &Patch::Merge(&patch)).await {
        out.failures.push(format!("holding Secret {secret} failed: {e}"));
        return format!("holding the credentials (Secret {secret}) failed: {e}");
    }
    ctx.audit.record(AUDIT_AS, "patch", "Secret", &ns, &secret, &format!("hold: incident {}", i.id));
    nudge(ctx, &ns, &i.access_policy, "hold").await;
    format!("credentials held (Secret {secret}): AccessPolicy {} revokes its leases", i.access_policy)
}

/// Touches the AccessPolicy so that its controller sees a hold placed or lifted at once.
async fn nudge(ctx: &Context, ns: &str, policy: &str, why: &str) {
    let now = (ctx.now)().to_string();
    let touch = json!({"metadata": {"annotations": {"crmguard.io/last-access-monitor-action": now}}});
    match Api::<AccessPolicy>::namespaced(ctx.client.clone(), ns)
        .patch_metadata(policy, &PatchParams::default(), &Patch::Merge(&touch))
        .await
    {
        Ok(_) => ctx.audit.record(AUDIT_AS, "patch", "AccessPolicy", ns, policy, why),
        Err(e) => tracing::warn!(error = %e, policy, "could not nudge the AccessPolicy"),
    }
}

/// Requests the isolation of the pods that run as the team's ServiceAccounts through `guard`.
#[allow(clippy::too_many_arguments)]
async fn quarantine(
    ctx: &Context,
    m: &AccessMonitor,
    dry_run: bool,
    guard: &str,
    i: &Incident,
    policy: Option<&AccessPolicy>,
    now: Timestamp,
    out: &mut Outcome,
) -> Result<String, Error> {
    let ns = m.metadata.namespace.clone().unwrap_or_default();
    let accounts: BTreeSet<String> = policy
        .iter()
        .flat_map(|p| p.spec.teams.iter().filter(|t| t.name == i.team))
        .flat_map(|t| t.subjects.iter())
        .filter(|s| s.kind == SubjectKind::ServiceAccount && s.namespace.as_deref().is_none_or(|n| n == ns))
        .map(|s| s.name.clone())
        .collect();
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns).list(&ListParams::default()).await?.items;
    let mut names: Vec<String> = pods
        .into_iter()
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .filter(|p| p.spec.as_ref().and_then(|s| s.service_account_name.as_ref()).is_some_and(|a| accounts.contains(a)))
        .filter_map(|p| p.metadata.name)
        .collect();
    names.sort();
    let accounts = accounts.into_iter().collect::<Vec<_>>().join(", ");
    if names.is_empty() {
        return Ok(format!("no running pod of the team's ServiceAccount(s) [{accounts}] to isolate"));
    }
    if dry_run {
        return Ok(format!("would isolate pod(s) {} through NetworkGuard {guard}", names.join(", ")));
    }
    let Some(g) = Api::<NetworkGuard>::namespaced(ctx.client.clone(), &ns).get_opt(guard).await? else {
        out.failures.push(format!("NetworkGuard {guard} does not exist"));
        return Ok(format!("isolating pod(s) {} failed: NetworkGuard {guard} does not exist", names.join(", ")));
    };
    let reason = format!(
        "AccessMonitor {}: incident {} ({:?}) of team {}",
        m.metadata.name.as_deref().unwrap_or_default(),
        i.id,
        i.rules,
        i.team
    );
    let req = Request { source: "accessmonitor", pods: names.clone(), reason };
    let (code, body) = request::isolate(&ctx.client, &ctx.audit, AUDIT_AS, &g, &req, now).await;
    Ok(if code < 300 {
        format!("isolation of pod(s) {} requested through NetworkGuard {guard}", names.join(", "))
    } else {
        let why = body["error"].as_str().unwrap_or_default().to_string();
        out.failures.push(format!("NetworkGuard {guard} refused to isolate {}: {why}", names.join(", ")));
        format!("isolating pod(s) {} through NetworkGuard {guard} was refused (HTTP {code}): {why}", names.join(", "))
    })
}

/// Incidents the monitor's annotation acknowledges: marked, and the holds they placed lifted.
async fn acknowledge(
    ctx: &Context,
    m: &AccessMonitor,
    incidents: &mut [Incident],
    now: Timestamp,
    out: &mut Outcome,
) -> Result<(), Error> {
    let acked: BTreeSet<&str> = m
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACKNOWLEDGE))
        .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let ns = m.metadata.namespace.clone().unwrap_or_default();
    for i in incidents.iter_mut().filter(|i| i.acknowledged.is_none() && acked.contains(i.id.as_str())) {
        if !i.dry_run {
            let policy = access_policy(ctx, &ns, &i.access_policy).await?;
            if let Some(secret) = team_secret(policy.as_ref(), &i.team) {
                let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
                let ours = secrets
                    .get_metadata_opt(&secret)
                    .await?
                    .is_some_and(|s| s.metadata.annotations.unwrap_or_default().get(HELD_BY) == Some(&hold(m, &i.id)));
                if ours {
                    let lift = json!({"metadata": {"annotations": {HELD_BY: null}}});
                    secrets.patch_metadata(&secret, &PatchParams::default(), &Patch::Merge(&lift)).await?;
                    ctx.audit.record(
                        AUDIT_AS,
                        "patch",
                        "Secret",
                        &ns,
                        &secret,
                        &format!("hold lifted: incident {}", i.id),
                    );
                    nudge(ctx, &ns, &i.access_policy, "hold lifted").await;
                }
            }
        }
        i.acknowledged = Some(Time(now));
        out.events.push(Note::normal(
            AccessMonitorEvent::IncidentAcknowledged,
            format!("incident {} of team {} acknowledged: new credentials are issued", i.id, i.team),
        ));
    }
    Ok(())
}
