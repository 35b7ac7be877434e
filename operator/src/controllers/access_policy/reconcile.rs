//! AccessPolicy: validate -> per-team RBAC at `now` -> Vault policies, roles and credentials -> applied;
//! requeued at the next grant expiry or lease renewal, and retried after 30 s while Vault cannot be used.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;

use super::{build, ceiling, validate, vault_sync};
use crate::api::AccessPolicy;
use crate::api::access_policy::AccessPolicyEvent;
use crate::api::access_policy::TeamStatus;
use crate::api::access_policy::conditions::{LeastPrivilege, RbacApplied};
use crate::api::condition::Status;
use crate::controllers::contract::{Cond, Context, Desired, Error, Note, Other, Reconcilable, Watch};
use crate::validation::FieldError;

impl Reconcilable for AccessPolicy {
    const CONTROLLER: &'static str = "accesspolicy";
    type Status = crate::api::AccessPolicyStatus;
    const WATCHES: &'static [Watch] = &[Watch::Owns(Other::Role), Watch::Owns(Other::RoleBinding)];
    const FINALIZER: Option<&'static str> = Some(vault_sync::FINALIZER);

    fn needs_finalizer(&self) -> bool {
        self.spec.vault.is_some()
    }

    async fn cleanup(&self, ctx: &Context) -> Result<(), Error> {
        vault_sync::cleanup(self, ctx).await
    }

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired<Self::Status>, Vec<FieldError>>, Error> {
        let mut v = match validate::validate(self, &ctx.build) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        // The open incidents of the AccessMonitors the policy accepts hold their teams' credentials.
        let monitors: Api<crate::api::AccessMonitor> = Api::namespaced(ctx.client.clone(), &v.owner.namespace);
        for name in &self.spec.accept_holds_from {
            if let Some(m) = monitors.get_opt(name).await? {
                v.holds.extend(m.holds(&v.owner.name));
            }
        }
        if let Some(refused) = check_ceiling(self, ctx).await? {
            // Nothing is applied or pruned and Vault is not touched; retried at the resync, so a ceiling the
            // administrator widens (or creates) takes effect without an edit of the policy.
            // The status keeps describing what is in effect (its teams tell the finalizer what to clean up).
            return Ok(Ok(Desired {
                conditions: vec![refused],
                requeue_after: Some(ctx.resync),
                status: self.status.clone().unwrap_or_default(),
                ..Desired::default()
            }));
        }
        let now = (ctx.now)();
        let rbac = build::build(&v, now);
        let vault = vault_sync::reconcile(self, &v, ctx, now).await?;
        let mut d = Desired::<Self::Status> {
            owner: Some(v.owner.clone()),
            prune: vec![("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")],
            ..Desired::default()
        };
        for t in &rbac.teams {
            d.child(&t.role)?;
            d.child(&t.binding)?;
        }
        d.children.extend(vault.secrets.iter().cloned());
        d.patches = vault.patches.clone();
        d.events = vault.events.clone();
        d.audit = vault.audit.clone();
        // Grants that expired since the last status: one Event each.
        let known: BTreeSet<&str> = self
            .status
            .iter()
            .flat_map(|s| s.teams.iter())
            .flat_map(|t| t.expired_grants.iter().map(String::as_str))
            .collect();
        let expired: Vec<&String> = rbac.expired.iter().chain(vault.objects.expired.iter()).collect();
        for e in expired.iter().filter(|e| !known.contains(e.split_once(": ").map_or("", |(_, g)| g))) {
            d.events.push(Note::warning(AccessPolicyEvent::GrantExpired, format!("{e}; removed from RBAC and Vault")));
        }
        let mut teams = vec![];
        for t in &self.spec.teams {
            let r = rbac.teams.iter().find(|r| r.team == t.name);
            let o = vault.teams.get(&t.name).cloned().unwrap_or_default();
            let prefix = format!("{}: ", t.name);
            let expired_grants: Vec<&str> = expired.iter().filter_map(|e| e.strip_prefix(&prefix)).collect();
            if let Some(e) = o.expires_at {
                let labels = vec![("team", t.name.clone())];
                d.gauges.push(("credentials_expiry_timestamp_seconds", labels, e.as_second() as f64));
            }
            teams.push(TeamStatus {
                name: t.name.clone(),
                role: r.and_then(|r| r.role.metadata.name.clone()),
                vault_policy: o.vault_policy,
                vault_roles: o.vault_roles,
                secret_name: o.secret_name,
                credentials_expire_at: o.expires_at.map(Time),
                expired_grants: expired_grants.into_iter().map(String::from).collect(),
            });
        }
        let mut rbac_msg = format!("{} Role(s) and RoleBinding(s) in effect", rbac.teams.len());
        if !rbac.expired.is_empty() {
            rbac_msg.push_str(&format!("; expired and removed: {}", rbac.expired.join("; ")));
        }
        d.conditions.push(Cond::new(RbacApplied::Applied, Status::True, rbac_msg));
        d.conditions.push(vault.vault.clone());
        d.conditions.push(vault.credentials.clone());
        d.conditions.push(if v.warnings.is_empty() {
            Cond::new(LeastPrivilege::NoWildcards, Status::True, "every grant names its verbs and resources")
        } else {
            Cond::new(LeastPrivilege::BroadGrant, Status::False, v.warnings.join("; "))
        });
        d.status.team_count = Some(i32::try_from(self.spec.teams.len()).unwrap_or(i32::MAX));
        d.status.teams = teams;
        d.status.connection_secret_version = match &vault.connection_secret_version {
            Some(version) => Some(version.clone()),
            // Keep what was written while Vault is briefly unusable.
            None if vault.vault.status != Status::True => {
                self.status.as_ref().and_then(|s| s.connection_secret_version.clone())
            }
            None => None,
        };
        let next = [rbac.next_expiry, vault.next].into_iter().flatten().min();
        if let Some(next) = next {
            d.status.next_expiry = Some(Time(next));
            let wait = std::time::Duration::try_from(next.duration_since(now)).unwrap_or_default();
            d.requeue_after = Some(wait + std::time::Duration::from_secs(1));
        }
        if let Some(retry) = vault.retry {
            d.requeue_after = Some(d.requeue_after.map_or(retry, |r| r.min(retry)));
        }
        Ok(Ok(d))
    }
}

/// Reads the grant ceiling ClusterRole and checks every Kubernetes grant against it: `Some(condition)` when the
/// policy must not be applied (a grant beyond the ceiling, or no ceiling installed).
async fn check_ceiling(p: &AccessPolicy, ctx: &Context) -> Result<Option<Cond<crate::api::AccessPolicyStatus>>, Error> {
    if p.spec.teams.iter().all(|t| t.kubernetes.is_empty()) {
        return Ok(None);
    }
    let name = &ctx.build.access.grant_ceiling;
    // From the watch of the ceiling once it has listed it, else read.
    let rules = match ctx.cache.ceiling() {
        Some(rules) => rules,
        None => {
            let roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(ctx.client.clone());
            roles.get_opt(name).await?.map(|r| r.rules.unwrap_or_default())
        }
    };
    let Some(rules) = rules else {
        return Ok(Some(Cond::new(
            RbacApplied::GrantCeilingMissing,
            Status::False,
            format!(
                "the grant ceiling ClusterRole {name} does not exist, so no Kubernetes grant can be checked and none \
                 is applied; install it with the Helm chart (accessPolicy.grantCeiling) or name another with \
                 --grant-ceiling"
            ),
        )));
    };
    let errors = ceiling::beyond(p, name, &rules);
    if errors.is_empty() {
        return Ok(None);
    }
    let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    Ok(Some(Cond::new(RbacApplied::BeyondGrantCeiling, Status::False, format!("refused, nothing applied: {message}"))))
}
