//! The Vault half of an AccessPolicy: make Vault hold exactly the objects [`vault_objects`] describes (and
//! nothing else under the policy's prefix), and keep each team's database credentials issued, renewed, rotated
//! and revoked, delivered into a Secret owned by the policy. Vault trouble becomes conditions and a retry,
//! never a crash loop. Credential values go only into the Secret's `data`; never into logs, Events or status.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};

use super::lease::{self, IssueReason, State, Step};
use super::validate::ValidatedAccessPolicy;
use super::vault_objects::{self, Engine, VaultObjects};
use crate::api::AccessPolicy;
use crate::api::access_policy::AccessPolicyEvent as Event;
use crate::api::access_policy::conditions::{CredentialsIssued, VaultConfigured};
use crate::api::access_policy::{Team, VaultSettings, WorkloadKind};
use crate::api::condition::Status;
use crate::controllers::contract::{Cond, Context, Error, Note, VaultAction, VaultWrite};
use crate::k8s::apply::{ObjectPatch, is_subset};
use crate::k8s::meta::{NAME_MAX, child_name};
use crate::vault::admin::{ApiError, VaultApi};

/// The finalizer that holds an AccessPolicy until its Vault objects and leases are gone.
pub const FINALIZER: &str = "crmguard.io/vault-cleanup";

/// How soon to look again when Vault could not be used.
pub const VAULT_RETRY: Duration = Duration::from_secs(10);

/// Per-team results for the status.
#[derive(Clone, Debug, Default)]
pub struct TeamOut {
    pub vault_policy: Option<String>,
    pub vault_roles: Vec<String>,
    pub secret_name: Option<String>,
    pub expires_at: Option<Timestamp>,
}

/// What the Vault half produced.
#[derive(Debug)]
pub struct Outcome {
    pub vault: Cond,
    pub credentials: Cond,
    pub secrets: Vec<Value>,
    pub patches: Vec<ObjectPatch>,
    pub events: Vec<Note>,
    pub teams: BTreeMap<String, TeamOut>,
    pub objects: VaultObjects,
    /// Next instant something is due (renewal, rotation, revocation, grant expiry).
    pub next: Option<Timestamp>,
    /// Retry sooner because Vault could not be used.
    pub retry: Option<Duration>,
    /// resourceVersion of the connection Secret now written to Vault.
    pub connection_secret_version: Option<String>,
    /// Vault writes made, for the audit trail.
    pub audit: Vec<VaultWrite>,
}

impl Outcome {
    fn new(objects: VaultObjects) -> Outcome {
        Outcome {
            vault: Cond::new(VaultConfigured::NotRequested, Status::True, "no team has Vault or database grants"),
            credentials: Cond::new(CredentialsIssued::NotRequested, Status::True, "no team has database grants"),
            secrets: vec![],
            patches: vec![],
            events: vec![],
            teams: BTreeMap::new(),
            next: objects.next_expiry,
            objects,
            retry: None,
            connection_secret_version: None,
            audit: vec![],
        }
    }

    /// Vault could not be used: say why, retry soon, and keep reporting what earlier passes created (so that
    /// status, and deletion's cleanup, still know it).
    fn vault_failed(&mut self, e: &ApiError, p: &AccessPolicy, now: Timestamp) {
        for t in p.status.iter().flat_map(|s| s.teams.iter()) {
            self.teams.insert(
                t.name.clone(),
                TeamOut {
                    vault_policy: t.vault_policy.clone(),
                    vault_roles: t.vault_roles.clone(),
                    secret_name: t.secret_name.clone(),
                    expires_at: t.credentials_expire_at.as_ref().map(|x| x.0),
                },
            );
        }
        self.vault = Cond::new(VaultConfigured::from(e.reason()), Status::False, e.to_string());
        self.credentials = Cond::new(
            CredentialsIssued::from(e.reason()),
            Status::False,
            "credentials cannot be issued or renewed while Vault cannot be used (see VaultConfigured); \
             Secrets already delivered stay until their leases end",
        );
        self.retry = Some(VAULT_RETRY);
        let lapsed: Vec<String> = self
            .teams
            .iter()
            .filter_map(|(team, t)| t.expires_at.filter(|x| *x <= now).map(|x| format!("{team} (at {x})")))
            .collect();
        if !lapsed.is_empty() {
            let msg = format!("database credentials expired without renewal: {}", lapsed.join(", "));
            self.credentials.message = format!("{msg}; {}", self.credentials.message);
            self.events
                .push(Note::warning(Event::CredentialsExpired, format!("{msg}, because Vault cannot be used: {e}")));
        }
    }

    fn audit(&mut self, action: VaultAction, path: String, reason: impl Into<String>) {
        self.audit.push(VaultWrite { action, path, reason: reason.into() });
    }

    fn note(&mut self, t: Timestamp) {
        self.next = Some(self.next.map_or(t, |n| n.min(t)));
    }
}

/// The policy's Vault settings (`spec.vault`, or the defaults).
pub fn settings(p: &AccessPolicy) -> VaultSettings {
    p.spec.vault.clone().unwrap_or_default()
}

/// Name of the Secret that receives a team's credentials.
pub fn secret_name(policy: &str, team: &Team) -> String {
    team.credentials
        .as_ref()
        .and_then(|c| c.secret_name.clone())
        .unwrap_or_else(|| child_name(policy, &format!("{}-db", team.name), NAME_MAX))
}

/// Pod-template annotation that restarts a workload once per credential generation.
pub fn restart_annotation(policy: &str, team: &str) -> String {
    format!("crmguard.io/creds-{}", child_name(policy, team, 50))
}

fn mount(m: &str) -> &str {
    m.trim_matches('/')
}

/// Brings Vault and the credential Secrets in line with the policy at `now`.
pub async fn reconcile(
    p: &AccessPolicy,
    v: &ValidatedAccessPolicy,
    ctx: &Context,
    now: Timestamp,
) -> Result<Outcome, Error> {
    let objects = vault_objects::build(v, now);
    let mut out = Outcome::new(objects.clone());
    let wants = p.spec.teams.iter().any(|t| !t.vault.is_empty() || t.database.is_some());
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &v.owner.namespace);
    if !wants {
        remove_stale_secrets(p, v, &secrets, None, &BTreeSet::new(), &mut out).await?;
        return Ok(out);
    }
    let s = settings(p);
    let api = match ctx.vault.address(s.address.as_deref()) {
        Ok(addr) => ctx.vault.api(&addr).await,
        Err(e) => Err(e),
    };
    let api = match api {
        Ok(api) => api,
        Err(e) => {
            out.vault_failed(&e, p, now);
            return Ok(out);
        }
    };
    match sync_objects(p, &api, &s, &objects, &secrets, &mut out).await {
        Ok(engines) => {
            issue_credentials(p, v, &api, &s, &objects, &engines, &secrets, now, &mut out).await?;
        }
        Err(e) => {
            if matches!(e, ApiError::Forbidden { .. }) {
                ctx.vault.forget(api.addr()).await;
            }
            out.vault_failed(&e, p, now);
        }
    }
    Ok(out)
}

/// Writes policies, auth roles, database connection and roles; deletes what is stale under the prefix.
/// Returns the SQL dialect of every connection the teams use.
async fn sync_objects(
    p: &AccessPolicy,
    api: &VaultApi,
    s: &VaultSettings,
    objects: &VaultObjects,
    secrets: &Api<Secret>,
    out: &mut Outcome,
) -> Result<BTreeMap<String, Result<Engine, String>>, ApiError> {
    let (auth, db) = (mount(&s.kubernetes_auth_mount), mount(&s.database_mount));
    let mut written = 0;
    for t in &objects.teams {
        let path = format!("sys/policies/acl/{}", t.policy_name);
        let text = t.policy.to_string();
        let current = api.read(&path).await?;
        if current.as_ref().and_then(|c| c["data"]["policy"].as_str()) != Some(text.as_str()) {
            api.write(&path, &json!({ "policy": text })).await?;
            written += 1;
            out.audit(VaultAction::Write, path, format!("policy of team {}", t.team));
        }
        for r in &t.auth_roles {
            let path = format!("auth/{auth}/role/{}", r.name);
            if write_if_changed(api, &path, &r.body).await? == 1 {
                written += 1;
                out.audit(VaultAction::Write, path, format!("Kubernetes-auth role of team {}", t.team));
            }
        }
    }
    // Connections: configured from the referenced Secret when asked, else read to learn their engine.
    let mut engines = BTreeMap::new();
    let connections: BTreeSet<&str> =
        objects.teams.iter().filter_map(|t| t.db_role.as_ref()).map(|r| r.connection.as_str()).collect();
    for conn in &connections {
        if let Some(sel) = &s.connection_secret_ref {
            let roles: Vec<&str> = objects
                .teams
                .iter()
                .filter_map(|t| t.db_role.as_ref())
                .filter(|r| r.connection == *conn)
                .map(|r| r.name.as_str())
                .collect();
            match configure_connection(api, db, conn, &sel.name, &roles, p, secrets).await {
                Ok((version, n)) => {
                    out.connection_secret_version = Some(version);
                    written += n;
                    if n > 0 {
                        out.audit(
                            VaultAction::Write,
                            format!("{db}/config/{conn}"),
                            "database connection from spec.vault.connectionSecretRef",
                        );
                    }
                }
                Err(ConnError::Vault(e)) => return Err(e),
                Err(ConnError::Secret(msg)) => {
                    engines.insert(conn.to_string(), Err(msg));
                    continue;
                }
            }
        }
        let engine = match api.read(&format!("{db}/config/{conn}")).await? {
            Some(c) => Ok(Engine::from_plugin(c["data"]["plugin_name"].as_str().unwrap_or_default())),
            None => Err(format!(
                "Vault has no database connection {conn:?} at {db}/config/{conn}: configure it in Vault, or set \
                 spec.vault.connectionSecretRef so crmguard configures it"
            )),
        };
        engines.insert(conn.to_string(), engine);
    }
    for t in &objects.teams {
        let Some(role) = &t.db_role else { continue };
        let Some(Ok(engine)) = engines.get(&role.connection) else { continue };
        if vault_objects::check_identifiers(role).is_err() {
            continue; // reported with the team's credentials
        }
        let body = vault_objects::db_role_body(*engine, role);
        let path = format!("{db}/roles/{}", role.name);
        if write_if_changed(api, &path, &body).await? == 1 {
            written += 1;
            out.audit(
                VaultAction::Write,
                path,
                format!(
                    "database role of team {}: {}",
                    t.team,
                    role.grants.iter().cloned().collect::<Vec<_>>().join(",")
                ),
            );
        }
    }
    // Anything else under this policy's prefix is stale (a removed team, a namespace no longer bound).
    let want_policies: BTreeSet<&str> = objects.teams.iter().map(|t| t.policy_name.as_str()).collect();
    let want_auth: BTreeSet<&str> =
        objects.teams.iter().flat_map(|t| t.auth_roles.iter().map(|r| r.name.as_str())).collect();
    let want_db: BTreeSet<&str> =
        objects.teams.iter().filter_map(|t| t.db_role.as_ref().map(|r| r.name.as_str())).collect();
    let removed = remove_under_prefix(api, s, &objects.prefix, &want_policies, &want_auth, &want_db).await?;
    for path in &removed {
        out.audit(VaultAction::Delete, path.clone(), "stale: no longer in the policy");
    }
    let removed = removed.len();
    let (np, na, nd) = (want_policies.len(), want_auth.len(), want_db.len());
    let mut msg = format!(
        "Vault at {}: {np} policies, {na} Kubernetes-auth roles (mount {auth}), {nd} database roles (mount {db})",
        api.addr()
    );
    if written + removed > 0 {
        msg.push_str(&format!("; {written} written and {removed} stale removed in this pass"));
    }
    let missing: Vec<String> = engines.values().filter_map(|e| e.as_ref().err().cloned()).collect();
    out.vault = if missing.is_empty() {
        Cond::new(VaultConfigured::Synced, Status::True, msg)
    } else {
        out.retry = Some(VAULT_RETRY);
        Cond::new(VaultConfigured::DatabaseConnectionMissing, Status::False, missing.join("; "))
    };
    for t in &objects.teams {
        let team = out.teams.entry(t.team.clone()).or_default();
        team.vault_policy = Some(t.policy_name.clone());
        team.vault_roles = t.auth_roles.iter().map(|r| r.name.clone()).collect();
    }
    Ok(engines)
}

async fn write_if_changed(api: &VaultApi, path: &str, body: &Value) -> Result<usize, ApiError> {
    let current = api.read(path).await?;
    if current.as_ref().is_some_and(|c| is_subset(body, &c["data"])) {
        return Ok(0);
    }
    api.write(path, body).await?;
    Ok(1)
}

/// Deletes the policies and roles under `prefix` that are not wanted; returns their paths.
async fn remove_under_prefix(
    api: &VaultApi,
    s: &VaultSettings,
    prefix: &str,
    policies: &BTreeSet<&str>,
    auth_roles: &BTreeSet<&str>,
    db_roles: &BTreeSet<&str>,
) -> Result<Vec<String>, ApiError> {
    let (auth, db) = (mount(&s.kubernetes_auth_mount), mount(&s.database_mount));
    let mut removed = Vec::new();
    for (list, item, wanted) in [
        ("sys/policies/acl".to_string(), "sys/policies/acl", policies),
        (format!("auth/{auth}/role"), &*format!("auth/{auth}/role"), auth_roles),
        (format!("{db}/roles"), &*format!("{db}/roles"), db_roles),
    ] {
        for name in api.list(&list).await? {
            if name.starts_with(prefix) && !wanted.contains(name.as_str()) {
                api.delete(&format!("{item}/{name}")).await?;
                tracing::info!(vault_object = %format!("{item}/{name}"), "removed stale Vault object");
                removed.push(format!("{item}/{name}"));
            }
        }
    }
    Ok(removed)
}

enum ConnError {
    Vault(ApiError),
    Secret(String),
}

/// Writes `<db>/config/<conn>` from the Secret when Vault's copy differs or the Secret changed since the last
/// write (its resourceVersion is recorded in the policy's status). Returns (resourceVersion, writes).
async fn configure_connection(
    api: &VaultApi,
    db: &str,
    conn: &str,
    secret: &str,
    roles: &[&str],
    p: &AccessPolicy,
    secrets: &Api<Secret>,
) -> Result<(String, usize), ConnError> {
    let missing = |what: String| {
        ConnError::Secret(format!(
            "spec.vault.connectionSecretRef: {what}; the Secret needs connection_url, username and password (and \
             optionally plugin_name)"
        ))
    };
    let sec = secrets
        .get_opt(secret)
        .await
        .map_err(|e| missing(format!("cannot read Secret {secret:?}: {e}")))?
        .ok_or_else(|| missing(format!("Secret {secret:?} not found")))?;
    let data = sec.data.unwrap_or_default();
    let field = |k: &str| data.get(k).map(|b| String::from_utf8_lossy(&b.0).trim().to_string());
    let (Some(url), Some(user), Some(pass)) = (field("connection_url"), field("username"), field("password")) else {
        return Err(missing(format!("Secret {secret:?} lacks a key")));
    };
    let plugin = field("plugin_name").unwrap_or_else(|| "postgresql-database-plugin".into());
    let version = sec.metadata.resource_version.unwrap_or_default();
    let visible = json!({
        "plugin_name": plugin,
        "connection_details": {"connection_url": url, "username": user},
        "allowed_roles": roles,
    });
    let path = format!("{db}/config/{conn}");
    let current = api.read(&path).await.map_err(ConnError::Vault)?;
    let recorded = p.status.as_ref().and_then(|s| s.connection_secret_version.as_deref());
    if current.as_ref().is_some_and(|c| is_subset(&visible, &c["data"])) && recorded == Some(version.as_str()) {
        return Ok((version, 0));
    }
    let body = json!({
        "plugin_name": plugin, "connection_url": url, "username": user, "password": pass,
        "allowed_roles": roles, "verify_connection": true,
    });
    api.write(&path, &body).await.map_err(|e| {
        // Vault's message may quote the connection; keep the credentials out of it.
        let scrub = |m: String| m.replace(&pass, "<redacted>").replace(&user, "<user>");
        ConnError::Vault(match e {
            ApiError::Status { op, path, code, message } => {
                ApiError::Status { op, path, code, message: scrub(message) }
            }
            other => other,
        })
    })?;
    tracing::info!(vault_object = %path, "database connection configured from Secret");
    Ok((version, 1))
}

/// Issues, renews, rotates and revokes each team's credentials; builds the Secrets and restart patches.
#[allow(clippy::too_many_arguments)]
async fn issue_credentials(
    p: &AccessPolicy,
    v: &ValidatedAccessPolicy,
    api: &VaultApi,
    s: &VaultSettings,
    objects: &VaultObjects,
    engines: &BTreeMap<String, Result<Engine, String>>,
    secrets: &Api<Secret>,
    now: Timestamp,
    out: &mut Outcome,
) -> Result<(), Error> {
    let owner = &v.owner;
    let db = mount(&s.database_mount);
    let mut issued = Vec::new();
    let mut failed: Vec<(String, CredentialsIssued)> = Vec::new();
    let mut wanted_secrets = BTreeSet::new();
    for team in &p.spec.teams {
        let Some(role) = objects.teams.iter().find(|t| t.team == team.name).and_then(|t| t.db_role.as_ref()) else {
            continue;
        };
        let name = secret_name(&owner.name, team);
        let failed_before = failed.len();
        wanted_secrets.insert(name.clone());
        out.teams.entry(team.name.clone()).or_default().secret_name = Some(name.clone());
        if let Err(e) = vault_objects::check_identifiers(role) {
            failed.push((format!("{}: {e}", team.name), CredentialsIssued::InvalidGrant));
            continue;
        }
        match engines.get(&role.connection) {
            Some(Ok(_)) => {}
            Some(Err(msg)) => {
                failed.push((format!("{}: {msg}", team.name), CredentialsIssued::DatabaseConnectionMissing));
                continue;
            }
            None => continue,
        }
        let current = secrets.get_opt(&name).await?;
        if let Some(c) = &current
            && !c.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid)
        {
            failed.push((
                format!(
                    "{}: Secret {name:?} exists and is not managed by this AccessPolicy; delete it or set \
                     credentials.secretName to another name",
                    team.name
                ),
                CredentialsIssued::SecretConflict,
            ));
            continue;
        }
        let d = v.delivery(&team.name);
        let grants = role.grants.iter().cloned().collect::<Vec<_>>().join(",");
        let annotations = current.as_ref().and_then(|c| c.metadata.annotations.clone()).unwrap_or_default();
        let mut state = State::from_annotations(&annotations);
        let mut data = current.as_ref().and_then(|c| c.data.clone()).unwrap_or_default();
        // A replaced credential whose grace period is over.
        if let Some(prev) = state.previous.clone()
            && now >= prev.revoke_at
        {
            match api.revoke(&prev.lease_id).await {
                Ok(()) => {
                    state.previous = None;
                    out.audit(
                        VaultAction::LeaseRevoke,
                        format!("{db}/creds/{}", role.name),
                        format!("team {}: previous credential, grace period over", team.name),
                    );
                    out.events.push(Note::normal(
                        Event::CredentialsRevoked,
                        format!("team {}: the previous database credential was revoked", team.name),
                    ));
                }
                Err(e) => out.events.push(Note::warning(
                    Event::RevokeFailed,
                    format!("team {}: revoking the previous credential failed, retrying: {e}", team.name),
                )),
            }
        }
        let mut step = lease::decide(now, &state, &grants, &d);
        if step == Step::Renew {
            let lease_id = state.current.as_ref().map(|l| l.lease_id.clone()).unwrap_or_default();
            match api.renew(&lease_id, d.ttl).await {
                Ok(dur) if dur > Duration::ZERO => {
                    if let Some(l) = state.current.as_mut() {
                        l.renewed_at = now;
                        l.expires_at =
                            now.checked_add(SignedDuration::try_from(dur).unwrap_or_default()).unwrap_or(l.expires_at);
                    }
                    tracing::info!(team = %team.name, expires_at = %state.current.as_ref().map(|l| l.expires_at.to_string()).unwrap_or_default(), "database credential lease renewed");
                    out.audit(
                        VaultAction::LeaseRenew,
                        format!("{db}/creds/{}", role.name),
                        format!("team {}", team.name),
                    );
                }
                Ok(_) | Err(ApiError::Status { code: 400, .. }) => step = Step::Issue(IssueReason::Expired),
                Err(e) => {
                    failed.push((format!("{}: renewing the lease failed: {e}", team.name), e.reason().into()));
                }
            }
        }
        if let Step::Issue(reason) = step {
            // A still older credential waiting for revocation would lose its bookkeeping: revoke it now.
            if let Some(prev) = state.previous.take()
                && let Err(e) = api.revoke(&prev.lease_id).await
            {
                out.events.push(Note::warning(Event::RevokeFailed, format!("team {}: {e}", team.name)));
            }
            match api.read_leased(&format!("{db}/creds/{}", role.name)).await {
                Ok(leased) => {
                    let first = state.current.is_none();
                    let lease_duration = leased.lease_duration;
                    state = lease::issued(
                        now,
                        &state,
                        reason,
                        lease::NewLease {
                            lease_id: leased.lease_id,
                            duration: lease_duration,
                            renewable: leased.renewable,
                        },
                        &grants,
                        &d,
                    );
                    data.clear();
                    for k in ["username", "password"] {
                        let val = leased.data.get(k).and_then(Value::as_str).unwrap_or_default();
                        data.insert(k.to_string(), k8s_openapi::ByteString(val.as_bytes().to_vec()));
                    }
                    let until = state.current.as_ref().map(|l| l.expires_at.to_string()).unwrap_or_default();
                    let restarts: Vec<String> = team
                        .credentials
                        .iter()
                        .flat_map(|c| c.restart_workloads.iter())
                        .map(|w| format!("{:?}/{}", w.kind, w.name))
                        .collect();
                    let restarts = if restarts.is_empty() {
                        String::new()
                    } else {
                        format!("; restarting {}", restarts.join(", "))
                    };
                    out.events.push(if first {
                        Note::normal(Event::CredentialsIssued, format!("team {}: database credentials issued into Secret {name}, lease until {until}{restarts}", team.name))
                    } else {
                        Note::normal(Event::CredentialsRotated, format!("team {}: new database credentials in Secret {name} ({}), lease until {until}; the previous one is revoked {}{restarts}", team.name, reason.describe(), if reason.revoke_at_once() { "now".to_string() } else { format!("after the grace period ({})", team.credentials.as_ref().map(|c| c.revoke_grace_period.as_str()).unwrap_or("5m")) }))
                    });
                    tracing::info!(team = %team.name, secret = %name, reason = reason.describe(), "database credentials issued");
                    out.audit(
                        VaultAction::LeaseIssue,
                        format!("{db}/creds/{}", role.name),
                        format!("team {}: {} into Secret {name}", team.name, reason.describe()),
                    );
                }
                Err(e) => {
                    failed.push((format!("{}: issuing credentials failed: {e}", team.name), e.reason().into()));
                    if current.is_none() {
                        continue;
                    }
                }
            }
        }
        let Some(l) = state.current.clone() else { continue };
        if let Some(due) = lease::next_due(&state, &d) {
            out.note(due);
        }
        out.teams.entry(team.name.clone()).or_default().expires_at = Some(l.expires_at);
        if failed.len() == failed_before {
            issued.push(format!("{} (Secret {name}, lease until {})", team.name, l.expires_at));
        }
        let mut meta = owner.child_meta(name.clone(), &format!("credentials-{}", team.name));
        meta.annotations = Some(state.annotations());
        let b64 = base64::engine::general_purpose::STANDARD;
        let data_json: serde_json::Map<String, Value> =
            data.iter().map(|(k, v)| (k.clone(), Value::String(b64.encode(&v.0)))).collect();
        out.secrets.push(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "data": data_json,
        }));
        // One rolling restart per credential generation: the annotation carries the issue time, so the same
        // credential (e.g. after an operator restart) patches nothing new.
        for w in team.credentials.iter().flat_map(|c| c.restart_workloads.iter()) {
            let kind = match w.kind {
                WorkloadKind::Deployment => "Deployment",
                WorkloadKind::StatefulSet => "StatefulSet",
                WorkloadKind::DaemonSet => "DaemonSet",
            };
            out.patches.push(ObjectPatch {
                api_version: "apps/v1",
                kind,
                name: w.name.clone(),
                patch: json!({"spec": {"template": {"metadata": {"annotations": {
                    restart_annotation(&owner.name, &team.name): l.issued_at.to_string()
                }}}}}),
            });
        }
    }
    out.credentials = if let Some((_, reason)) = failed.first() {
        out.retry = Some(VAULT_RETRY);
        Cond::new(*reason, Status::False, failed.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join("; "))
    } else if issued.is_empty() {
        Cond::new(CredentialsIssued::NotRequested, Status::True, "no team has live database grants")
    } else {
        Cond::new(CredentialsIssued::Issued, Status::True, issued.join("; "))
    };
    remove_stale_secrets(p, v, secrets, Some(api), &wanted_secrets, out).await
}

/// Secrets this policy delivered earlier for teams that no longer get credentials: their leases are revoked
/// and the Secrets deleted.
async fn remove_stale_secrets(
    p: &AccessPolicy,
    v: &ValidatedAccessPolicy,
    api_secrets: &Api<Secret>,
    api: Option<&VaultApi>,
    wanted: &BTreeSet<String>,
    out: &mut Outcome,
) -> Result<(), Error> {
    let previous: BTreeSet<String> = p
        .status
        .iter()
        .flat_map(|s| s.teams.iter())
        .filter_map(|t| t.secret_name.clone())
        .filter(|n| !wanted.contains(n))
        .collect();
    for name in previous {
        let Some(sec) = api_secrets.get_opt(&name).await? else { continue };
        if !sec.metadata.owner_references.iter().flatten().any(|r| r.uid == v.owner.uid) {
            continue;
        }
        if let Some(api) = api {
            revoke_all(api, &sec).await.map_err(|e| Error::Cleanup(e.to_string()))?;
            out.audit(VaultAction::LeaseRevoke, format!("Secret {name}"), "the team no longer has database grants");
        } else {
            // Without Vault the leases simply run out; the Secret must not outlive the grant.
            tracing::warn!(secret = %name, "removing credentials without Vault access; their leases expire on their own");
        }
        match api_secrets.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        out.events.push(Note::normal(
            Event::CredentialsRemoved,
            format!("Secret {name}: the team no longer has database grants; its leases were revoked"),
        ));
    }
    Ok(())
}

/// Revokes the current and previous leases recorded on a credentials Secret.
async fn revoke_all(api: &VaultApi, sec: &Secret) -> Result<(), ApiError> {
    let a = sec.metadata.annotations.clone().unwrap_or_default();
    for k in [lease::LEASE_ID, lease::PREVIOUS_LEASE_ID] {
        if let Some(id) = a.get(k) {
            api.revoke(id).await?;
        }
    }
    Ok(())
}

/// Finalizer work: revoke every lease the policy's Secrets record, delete every Vault object under its prefix
/// and the database connection it configured. Idempotent.
pub async fn cleanup(p: &AccessPolicy, ctx: &Context) -> Result<(), Error> {
    let owner = super::super::owner_of(p).map_err(|e| Error::Cleanup(format!("{e:?}")))?;
    let touched =
        p.status.iter().flat_map(|s| s.teams.iter()).any(|t| t.vault_policy.is_some() || t.secret_name.is_some());
    if !touched {
        // Nothing was ever created in Vault for this policy (its status would name it).
        return Ok(());
    }
    let s = settings(p);
    let fail = |e: ApiError| Error::Cleanup(e.to_string());
    let addr = ctx.vault.address(s.address.as_deref()).map_err(fail)?;
    let api = ctx.vault.api(&addr).await.map_err(fail)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let mut names: BTreeSet<String> = p.spec.teams.iter().map(|t| secret_name(&owner.name, t)).collect();
    names.extend(p.status.iter().flat_map(|s| s.teams.iter()).filter_map(|t| t.secret_name.clone()));
    let mut revoked = 0;
    for name in names {
        let Some(sec) = secrets.get_opt(&name).await? else { continue };
        if sec.metadata.owner_references.iter().flatten().any(|r| r.uid == owner.uid) {
            revoke_all(&api, &sec).await.map_err(fail)?;
            revoked += 1;
            ctx.audit.record(
                "accesspolicy",
                VaultAction::LeaseRevoke.as_str(),
                "Vault",
                &owner.namespace,
                &format!("Secret {name}"),
                "policy deleted",
            );
        }
    }
    let none = BTreeSet::new();
    let prefix = vault_objects::prefix(&owner.namespace, &owner.name);
    let removed = remove_under_prefix(&api, &s, &prefix, &none, &none, &none).await.map_err(fail)?;
    for path in &removed {
        ctx.audit.record(
            "accesspolicy",
            VaultAction::Delete.as_str(),
            "Vault",
            &owner.namespace,
            path,
            "policy deleted",
        );
    }
    let removed = removed.len();
    if s.connection_secret_ref.is_some() {
        let conns: BTreeSet<&str> =
            p.spec.teams.iter().filter_map(|t| t.database.as_ref()).map(|d| d.connection.as_str()).collect();
        for c in conns {
            let path = format!("{}/config/{c}", mount(&s.database_mount));
            api.delete(&path).await.map_err(fail)?;
            ctx.audit.record(
                "accesspolicy",
                VaultAction::Delete.as_str(),
                "Vault",
                &owner.namespace,
                &path,
                "policy deleted",
            );
        }
    }
    tracing::info!(revoked_secrets = revoked, removed_objects = removed, "Vault cleanup done");
    Ok(())
}
