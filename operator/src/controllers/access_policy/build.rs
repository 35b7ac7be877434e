//! Pure builder: validated AccessPolicy -> one Role and RoleBinding per team with exactly the team's
//! Kubernetes grants that have not expired at `now`.

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::jiff::Timestamp;

use super::validate::ValidatedAccessPolicy;
use crate::api::access_policy::{SubjectKind, Team};
use crate::k8s::meta::{NAME_MAX, child_name};

/// RBAC of one team.
#[derive(Clone, Debug)]
pub struct TeamRbac {
    pub team: String,
    pub role: Role,
    pub binding: RoleBinding,
}

/// What the builder produced, and what it left out because it expired.
#[derive(Clone, Debug, Default)]
pub struct Rbac {
    pub teams: Vec<TeamRbac>,
    /// Grants left out because their `expiresAt` passed, as `<team>: <description>`.
    pub expired: Vec<String>,
    /// The next future `expiresAt` of a Kubernetes grant (the controller requeues at that instant).
    pub next_expiry: Option<Timestamp>,
}

/// Name of a team's Role and RoleBinding.
pub fn role_name(policy: &str, team: &str) -> String {
    child_name(policy, team, NAME_MAX)
}

fn subjects(team: &Team, namespace: &str) -> Vec<Subject> {
    team.subjects
        .iter()
        .map(|s| match s.kind {
            SubjectKind::ServiceAccount => Subject {
                kind: "ServiceAccount".into(),
                name: s.name.clone(),
                namespace: Some(s.namespace.clone().unwrap_or_else(|| namespace.to_string())),
                api_group: None,
            },
            SubjectKind::User | SubjectKind::Group => Subject {
                kind: if s.kind == SubjectKind::User { "User".into() } else { "Group".into() },
                name: s.name.clone(),
                namespace: None,
                api_group: Some("rbac.authorization.k8s.io".into()),
            },
        })
        .collect()
}

/// Builds the per-team RBAC at time `now`. Teams without live Kubernetes grants get no Role.
pub fn build(v: &ValidatedAccessPolicy, now: Timestamp) -> Rbac {
    let owner = &v.owner;
    let mut out = Rbac::default();
    for team in &v.policy.spec.teams {
        let mut rules = Vec::new();
        for grant in &team.kubernetes {
            if let Some(exp) = &grant.expires_at {
                if exp.0 <= now {
                    out.expired.push(format!(
                        "{}: {} on {} (expired {})",
                        team.name,
                        grant.verbs.join(","),
                        grant.resources.join(","),
                        exp.0
                    ));
                    continue;
                }
                out.next_expiry = Some(out.next_expiry.map_or(exp.0, |n| n.min(exp.0)));
            }
            rules.push(PolicyRule {
                api_groups: Some(grant.api_groups.clone()),
                resources: Some(grant.resources.clone()),
                verbs: grant.verbs.clone(),
                resource_names: (!grant.resource_names.is_empty()).then(|| grant.resource_names.clone()),
                non_resource_urls: None,
            });
        }
        if rules.is_empty() {
            continue;
        }
        let name = role_name(&owner.name, &team.name);
        let component = format!("rbac-{}", team.name);
        out.teams.push(TeamRbac {
            team: team.name.clone(),
            role: Role { metadata: owner.child_meta(name.clone(), &component), rules: Some(rules) },
            binding: RoleBinding {
                metadata: owner.child_meta(name.clone(), &component),
                role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name },
                subjects: Some(subjects(team, &owner.namespace)),
            },
        });
    }
    out
}
