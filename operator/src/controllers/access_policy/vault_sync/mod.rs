//! The Vault half of an AccessPolicy: make Vault hold exactly the objects [`vault_objects`] describes (and
//! nothing else under the policy's prefix), and keep each team's database credentials issued, renewed, rotated
//! and revoked, delivered into a Secret owned by the policy. Vault trouble becomes conditions and a retry,
//! never a crash loop. Credential values go only into the Secret's `data`; never into logs, Events or status.
//!
//! `objects`: Vault's policies, auth roles and database connection and roles; `credentials`: each team's leases
//! (issue, renew, rotate, revoke) and Secret; `cleanup`: what a deleted policy leaves in Vault. What to write is
//! decided from the spec, the leases the Secrets record and the clock ([`vault_objects::build`], [`lease::decide`]);
//! the writes go through the executors of `ops` (Vault and the namespace's Secrets), which the unit tests double.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use serde_json::{Value, json};

use super::lease::{self, IssueReason, State, Step};
use super::validate::ValidatedAccessPolicy;
use super::vault_objects::{self, Engine, VaultObjects};
use crate::api::access_policy::AccessPolicyEvent as Event;
use crate::api::access_policy::conditions::{CredentialsIssued, VaultConfigured};
use crate::api::access_policy::{Team, VaultSettings, WorkloadKind};
use crate::api::condition::Status;
use crate::api::{AccessPolicy, AccessPolicyStatus};
use crate::controllers::contract::{Cond, Context, Error, Note, VaultAction, VaultWrite};
use crate::k8s::apply::{ObjectPatch, is_subset};
use crate::k8s::meta::{NAME_MAX, child_name};
use crate::vault::admin::ApiError;

mod cleanup;
mod credentials;
#[cfg(test)]
mod fake;
mod objects;
mod ops;
#[cfg(test)]
mod tests;

pub use cleanup::cleanup;
use credentials::{issue_credentials, remove_stale_secrets};
use objects::sync_objects;
use ops::{SecretOps, VaultOps};

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
    pub vault: Cond<AccessPolicyStatus>,
    pub credentials: Cond<AccessPolicyStatus>,
    pub secrets: Vec<Value>,
    pub patches: Vec<ObjectPatch>,
    pub events: Vec<Note<AccessPolicyStatus>>,
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
    /// Vault refused the operator's token: its session is to be forgotten (a new login at the next pass).
    pub forbidden: bool,
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
            forbidden: false,
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
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &v.owner.namespace);
    if !wants_vault(p) {
        return pass(p, v, None::<&crate::vault::admin::VaultApi>, &secrets, now).await;
    }
    let s = settings(p);
    let api = match ctx.vault.address(s.address.as_deref()) {
        Ok(addr) => ctx.vault.api(&addr).await,
        Err(e) => Err(e),
    };
    match api {
        Ok(api) => {
            let out = pass(p, v, Some(&api), &secrets, now).await?;
            if out.forbidden {
                ctx.vault.forget(api.addr()).await;
            }
            Ok(out)
        }
        Err(e) => {
            let mut out = Outcome::new(vault_objects::build(v, now));
            out.vault_failed(&e, p, now);
            Ok(out)
        }
    }
}

/// Whether any team asks for Vault paths or database credentials.
fn wants_vault(p: &AccessPolicy) -> bool {
    p.spec.teams.iter().any(|t| !t.vault.is_empty() || t.database.is_some())
}

/// One pass over Vault (`None` when no team asks for it) and the namespace's Secrets.
async fn pass<V: VaultOps>(
    p: &AccessPolicy,
    v: &ValidatedAccessPolicy,
    vault: Option<&V>,
    secrets: &impl SecretOps,
    now: Timestamp,
) -> Result<Outcome, Error> {
    let objects = vault_objects::build(v, now);
    let mut out = Outcome::new(objects.clone());
    let Some(api) = vault else {
        remove_stale_secrets(p, v, secrets, None::<&V>, &BTreeSet::new(), &mut out).await?;
        return Ok(out);
    };
    let s = settings(p);
    match sync_objects(p, api, &s, &objects, secrets, &mut out).await {
        Ok(engines) => issue_credentials(p, v, api, &s, &objects, &engines, secrets, now, &mut out).await?,
        Err(e) => {
            out.forbidden = matches!(e, ApiError::Forbidden { .. });
            out.vault_failed(&e, p, now);
        }
    }
    Ok(out)
}
