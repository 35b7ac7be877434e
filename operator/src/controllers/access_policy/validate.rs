//! Checks of an AccessPolicy beyond the CRD schema, and the warnings it deserves.

use std::collections::BTreeMap;

use super::lease::Delivery;
use crate::api::access_policy::AccessPolicy;
use crate::controllers::BuildContext;
use crate::k8s::meta::Owner;
use crate::validation::FieldError;

/// An AccessPolicy that passed every check, with the warnings to report as a condition.
#[derive(Clone, Debug)]
pub struct ValidatedAccessPolicy {
    pub owner: Owner,
    pub policy: AccessPolicy,
    /// Things that are allowed but deserve attention (e.g. wildcard grants), one sentence each.
    pub warnings: Vec<String>,
    /// Each team's credential settings, parsed.
    pub deliveries: BTreeMap<String, Delivery>,
    /// Teams whose credentials an accepted AccessMonitor's open incident holds: team -> the hold (read by the
    /// reconcile from the monitors `spec.acceptHoldsFrom` names; none offline).
    pub holds: BTreeMap<String, String>,
}

impl ValidatedAccessPolicy {
    /// The credential settings of the team named `team` (every team of the spec has its own; the CRD's defaults
    /// answer for a name it does not hold).
    pub fn delivery(&self, team: &str) -> Delivery {
        self.deliveries.get(team).copied().unwrap_or(Delivery::DEFAULT)
    }
}

/// Validates an AccessPolicy, including the installation's limits on Vault paths and addresses
/// ([`super::ceiling::AccessLimits`]); the Kubernetes grant ceiling needs the cluster and is checked in the
/// reconcile ([`super::ceiling::beyond`]).
pub fn validate(policy: &AccessPolicy, ctx: &BuildContext) -> Result<ValidatedAccessPolicy, Vec<FieldError>> {
    let owner = super::super::owner_of(policy)?;
    let mut errors = ctx.access.vault_errors(policy, ctx.vault_addr.as_deref());
    let mut warnings = Vec::new();
    let mut deliveries = BTreeMap::new();
    for (i, team) in policy.spec.teams.iter().enumerate() {
        for (j, grant) in team.kubernetes.iter().enumerate() {
            if grant.verbs.iter().any(|v| v == "*")
                || grant.resources.iter().any(|r| r == "*")
                || grant.api_groups.iter().any(|g| g == "*")
            {
                warnings.push(format!(
                    "team {:?} grant spec.teams[{i}].kubernetes[{j}] uses a wildcard; list the verbs and resources it needs",
                    team.name
                ));
            }
            if grant.resources.iter().any(|r| r == "secrets") && grant.resource_names.is_empty() {
                warnings.push(format!(
                    "team {:?} may read every Secret in the namespace (spec.teams[{i}].kubernetes[{j}]); restrict it with resourceNames",
                    team.name
                ));
            }
        }
        if let Some(d) = Delivery::parse(team, i, &mut errors) {
            deliveries.insert(team.name.clone(), d);
        }
        for (j, s) in team.subjects.iter().enumerate() {
            if s.kind == crate::api::access_policy::SubjectKind::ServiceAccount && s.name.contains(':') {
                errors.push(FieldError::new(
                    format!("spec.teams[{i}].subjects[{j}].name"),
                    "write the ServiceAccount's name and put its namespace in `namespace`, not system:serviceaccount:ns:name",
                ));
            }
        }
    }
    if let Some(vault) = &policy.spec.vault
        && vault.connection_secret_ref.is_some()
    {
        let conns: std::collections::BTreeSet<&str> =
            policy.spec.teams.iter().filter_map(|t| t.database.as_ref()).map(|d| d.connection.as_str()).collect();
        if conns.len() > 1 {
            errors.push(FieldError::new(
                "spec.vault.connectionSecretRef",
                format!(
                    "configures one database connection, but the teams use {}; give every team the same \
                     database.connection, or configure the connections in Vault and drop connectionSecretRef",
                    conns.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(ValidatedAccessPolicy { owner, policy: policy.clone(), warnings, deliveries, holds: BTreeMap::new() })
    } else {
        Err(errors)
    }
}
