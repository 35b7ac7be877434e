//! AccessPolicy: validate -> per-team RBAC at `now` -> applied; requeued at the next grant expiry.
//! Vault policies, roles and credentials are not managed yet; a spec that asks for them is reported as such.

use serde_json::json;

use super::{build, validate};
use crate::api::AccessPolicy;
use crate::api::condition::Status;
use crate::runtime::reconcile::{Cond, Context, Desired, Error, Reconcilable};
use crate::validation::FieldError;

impl Reconcilable for AccessPolicy {
    const CONTROLLER: &'static str = "accesspolicy";

    async fn desired(&self, ctx: &Context) -> Result<Result<Desired, Vec<FieldError>>, Error> {
        let v = match validate::validate(self) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let now = (ctx.now)();
        let rbac = build::build(&v, now);
        let mut d = Desired {
            owner: Some(v.owner.clone()),
            prune: vec![("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding")],
            required: vec!["RbacApplied", "VaultConfigured"],
            ..Desired::default()
        };
        let mut teams = vec![];
        for t in &rbac.teams {
            d.children.extend(serde_json::to_value(&t.role).ok());
            d.children.extend(serde_json::to_value(&t.binding).ok());
            teams.push(json!({"name": t.team, "role": t.role.metadata.name}));
        }
        for t in &self.spec.teams {
            if !rbac.teams.iter().any(|r| r.team == t.name) {
                teams.push(json!({"name": t.name}));
            }
        }
        let mut rbac_msg = format!("{} Role(s) and RoleBinding(s) in effect", rbac.teams.len());
        if !rbac.expired.is_empty() {
            rbac_msg.push_str(&format!("; expired and removed: {}", rbac.expired.join("; ")));
        }
        d.conditions.push(Cond::new("RbacApplied", Status::True, "Applied", rbac_msg));
        let wants_vault = self.spec.teams.iter().any(|t| !t.vault.is_empty() || t.database.is_some());
        d.conditions.push(if wants_vault {
            Cond::new(
                "VaultConfigured",
                Status::False,
                "NotImplemented",
                "this crmguard build applies the Kubernetes RBAC only; Vault policies, roles and database credentials \
                 are not managed yet, so no credentials are issued",
            )
        } else {
            Cond::new("VaultConfigured", Status::True, "NotRequested", "no team has Vault or database grants")
        });
        d.conditions.push(if v.warnings.is_empty() {
            Cond::new("LeastPrivilege", Status::True, "NoWildcards", "every grant names its verbs and resources")
        } else {
            Cond::new("LeastPrivilege", Status::False, "BroadGrant", v.warnings.join("; "))
        });
        d.status.insert("teamCount".into(), json!(self.spec.teams.len()));
        d.status.insert("teams".into(), json!(teams));
        if let Some(next) = rbac.next_expiry {
            d.status.insert("nextExpiry".into(), json!(next.to_string()));
            let wait = next.duration_since(now);
            d.requeue_after =
                Some(std::time::Duration::try_from(wait).unwrap_or_default() + std::time::Duration::from_secs(1));
        }
        Ok(Ok(d))
    }
}
