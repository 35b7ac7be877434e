//! What the cluster administrator allows AccessPolicies to hand out at all: the grant ceiling (a ClusterRole
//! whose rules every team's Kubernetes grant must be covered by), the Vault path prefixes teams' `vault[]`
//! paths must stay under, and the Vault addresses the operator may present its own credentials to.
//!
//! The ceiling is enforced three times: the chart's ValidatingAdmissionPolicy refuses such a policy at
//! admission, [`beyond`] makes the operator refuse it (Ready=False, nothing applied), and the operator holds no
//! `escalate`/`bind`, only the ceiling itself, so the API server's own RBAC escalation check refuses any Role
//! beyond it even if both were bypassed.

use k8s_openapi::api::rbac::v1::PolicyRule;

use crate::api::access_policy::AccessPolicy;
use crate::validation::FieldError;

/// The administrator's limits on what AccessPolicies may grant (operator flags, chart values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLimits {
    /// Name of the ClusterRole every team's Kubernetes grant must be a subset of (`--grant-ceiling`).
    pub grant_ceiling: String,
    /// Prefixes every team's `vault[].path` must start with; `{namespace}` stands for the policy's namespace
    /// (`--vault-path-prefix`). Empty: no `vault[]` grants at all.
    pub vault_path_prefixes: Vec<String>,
    /// Vault addresses a policy's `spec.vault.address` may name besides the operator's own (`--vault-allowed-address`):
    /// the operator logs in there with its own credentials.
    pub vault_addresses: Vec<String>,
}

/// The chart's ceiling ClusterRole name for release `crmguard`, and the flag's default.
pub const DEFAULT_GRANT_CEILING: &str = "crmguard-grantable";

/// The default Vault path prefixes: a namespace's own KV v2 data and metadata.
pub const DEFAULT_VAULT_PATH_PREFIXES: [&str; 2] = ["secret/data/{namespace}/", "secret/metadata/{namespace}/"];

impl Default for AccessLimits {
    fn default() -> Self {
        AccessLimits {
            grant_ceiling: DEFAULT_GRANT_CEILING.into(),
            vault_path_prefixes: DEFAULT_VAULT_PATH_PREFIXES.iter().map(|s| (*s).to_string()).collect(),
            vault_addresses: vec![],
        }
    }
}

impl AccessLimits {
    /// Checks the flags: prefixes end in `/` (so `secret/data/crm` cannot also admit `secret/data/crm-other`).
    pub fn check(&self) -> Result<(), String> {
        for p in &self.vault_path_prefixes {
            if !p.ends_with('/') || p.starts_with('/') || p.contains('*') || p.contains('+') {
                return Err(format!(
                    "--vault-path-prefix {p:?}: a prefix is a Vault path without globs and without a leading '/', \
                     ending in '/', such as secret/data/{{namespace}}/"
                ));
            }
        }
        Ok(())
    }

    /// Field errors for `vault[]` paths outside the prefixes and for a `spec.vault.address` the operator may not
    /// present its credentials to (`operator_addr` is the operator's own `--vault-addr`).
    pub fn vault_errors(&self, policy: &AccessPolicy, operator_addr: Option<&str>) -> Vec<FieldError> {
        let ns = policy.metadata.namespace.as_deref().unwrap_or_default();
        let prefixes: Vec<String> = self.vault_path_prefixes.iter().map(|p| p.replace("{namespace}", ns)).collect();
        let mut errors = Vec::new();
        for (i, team) in policy.spec.teams.iter().enumerate() {
            for (j, g) in team.vault.iter().enumerate() {
                if !prefixes.iter().any(|p| g.path.starts_with(p.as_str())) {
                    let allowed = if prefixes.is_empty() {
                        "this installation allows no vault[] grants (Helm value accessPolicy.vaultPathPrefixes is empty)"
                            .to_string()
                    } else {
                        format!("paths must start with {}", prefixes.join(" or "))
                    };
                    errors.push(FieldError::new(
                        format!("spec.teams[{i}].vault[{j}].path"),
                        format!(
                            "{:?} is outside the Vault paths AccessPolicies may grant: {allowed}; ask the cluster \
                             administrator to add a prefix (Helm value accessPolicy.vaultPathPrefixes)",
                            g.path
                        ),
                    ));
                }
            }
        }
        let norm = |a: &str| a.trim_end_matches('/').to_string();
        if let Some(addr) = policy.spec.vault.as_ref().and_then(|v| v.address.as_deref()) {
            let allowed = operator_addr.into_iter().chain(self.vault_addresses.iter().map(String::as_str));
            if !allowed.map(norm).any(|a| a == norm(addr)) {
                errors.push(FieldError::new(
                    "spec.vault.address",
                    format!(
                        "{addr:?} is not a Vault the operator may log in to with its own credentials; leave it out \
                         to use the operator's Vault, or ask the cluster administrator to allow it (Helm value \
                         vault.allowedAddresses)"
                    ),
                ));
            }
        }
        errors
    }
}

/// Whether `rules` allow `verb` on `group`/`resource` (with subresource, as `pods/log`) named `name` (None:
/// every name), with the RBAC authorizer's matching: `*` in a rule matches anything, `*/<sub>` matches that
/// subresource of any resource, and a requested `*` is allowed only by a rule's `*`.
pub fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str, name: Option<&str>) -> bool {
    let sub = resource.split_once('/').map(|(_, s)| s);
    rules.iter().any(|r| {
        let groups = r.api_groups.as_deref().unwrap_or_default();
        let resources = r.resources.as_deref().unwrap_or_default();
        let names = r.resource_names.as_deref().unwrap_or_default();
        groups.iter().any(|g| g == "*" || g == group)
            && resources.iter().any(|x| {
                x == "*" || x == resource || sub.is_some_and(|s| x.strip_prefix("*/").is_some_and(|xs| xs == s))
            })
            && r.verbs.iter().any(|v| v == "*" || v == verb)
            && (names.is_empty() || name.is_some_and(|n| names.iter().any(|x| x == n)))
    })
}

/// Every Kubernetes grant of the policy that the ceiling's rules do not cover, as a field error naming the
/// grant and exactly what is beyond the ceiling.
pub fn beyond(policy: &AccessPolicy, ceiling: &str, rules: &[PolicyRule]) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (i, team) in policy.spec.teams.iter().enumerate() {
        for (j, g) in team.kubernetes.iter().enumerate() {
            let names: Vec<Option<&str>> = if g.resource_names.is_empty() {
                vec![None]
            } else {
                g.resource_names.iter().map(|n| Some(n.as_str())).collect()
            };
            let mut over = Vec::new();
            for group in &g.api_groups {
                for resource in &g.resources {
                    let verbs: Vec<&str> = g
                        .verbs
                        .iter()
                        .filter(|v| !names.iter().all(|n| allows(rules, group, resource, v, *n)))
                        .map(String::as_str)
                        .collect();
                    if !verbs.is_empty() {
                        let group = if group.is_empty() { "core" } else { group.as_str() };
                        over.push(format!("{} on {group}/{resource}", verbs.join(",")));
                    }
                }
            }
            if !over.is_empty() {
                errors.push(FieldError::new(
                    format!("spec.teams[{i}].kubernetes[{j}]"),
                    format!(
                        "grants {} beyond the grant ceiling (ClusterRole {ceiling}); narrow the grant, or ask the \
                         cluster administrator to add it to the ceiling (Helm value accessPolicy.grantCeiling.rules)",
                        over.join("; ")
                    ),
                ));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(v: serde_json::Value) -> Vec<PolicyRule> {
        serde_json::from_value(v).expect("rules")
    }

    /// Expected values written from the RBAC documentation ("Referring to resources": `*` matches all,
    /// subresources are `resource/subresource`, `*/scale` style, resourceNames restrict to those names and cannot
    /// restrict list/create), not from the code.
    #[test]
    fn rule_matching_follows_the_rbac_documentation() {
        let r = rules(json!([
            {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]},
            {"apiGroups": ["apps"], "resources": ["*/scale"], "verbs": ["patch"]},
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"], "resourceNames": ["crm-config"]},
        ]));
        let table = [
            ("", "pods", "get", None, true),
            ("", "pods/log", "list", None, true),
            ("", "pods/exec", "get", None, false),
            ("", "pods", "delete", None, false),
            ("", "pods", "*", None, false),
            ("", "*", "get", None, false),
            ("*", "pods", "get", None, false),
            ("apps", "pods", "get", None, false),
            ("apps", "deployments/scale", "patch", None, true),
            ("apps", "deployments", "patch", None, false),
            ("", "configmaps", "get", Some("crm-config"), true),
            ("", "configmaps", "get", Some("other"), false),
            ("", "configmaps", "get", None, false),
            ("", "secrets", "get", None, false),
        ];
        for (group, resource, verb, name, want) in table {
            assert_eq!(allows(&r, group, resource, verb, name), want, "{verb} {group}/{resource} {name:?}");
        }
        let all = rules(json!([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]));
        assert!(allows(&all, "", "*", "*", None), "a wildcard ceiling allows a wildcard grant");
    }

    fn policy(teams: serde_json::Value, vault: Option<serde_json::Value>) -> AccessPolicy {
        let mut spec = json!({"teams": teams});
        if let Some(v) = vault {
            spec["vault"] = v;
        }
        serde_json::from_value(json!({"apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "p", "namespace": "crm"}, "spec": spec}))
        .expect("policy")
    }

    #[test]
    fn grants_beyond_the_ceiling_are_named_field_by_field() {
        let ceiling = rules(json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]));
        let p = policy(
            json!([{"name": "sales", "subjects": [{"kind": "User", "name": "mallory"}], "kubernetes": [
                {"resources": ["pods"], "verbs": ["get"]},
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"resources": ["pods", "secrets"], "verbs": ["list", "delete"]},
            ]}]),
            None,
        );
        let errors = beyond(&p, "crmguard-grantable", &ceiling);
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.teams[0].kubernetes[1]", "spec.teams[0].kubernetes[2]"]);
        assert!(errors[0].to_string().contains("* on */*"), "{}", errors[0]);
        assert!(errors[1].to_string().contains("delete on core/pods; list,delete on core/secrets"), "{}", errors[1]);
        assert!(errors[1].to_string().contains("ClusterRole crmguard-grantable"), "{}", errors[1]);
    }

    #[test]
    fn vault_paths_stay_under_the_namespaces_prefixes_and_addresses_are_allowed_ones() {
        let limits = AccessLimits::default();
        let team = |path: &str| {
            json!([{"name": "t", "subjects": [{"kind": "Group", "name": "g"}],
            "vault": [{"path": path, "capabilities": ["read"]}]}])
        };
        let ok = |path: &str| limits.vault_errors(&policy(team(path), Some(json!({}))), None).is_empty();
        assert!(ok("secret/data/crm/sales/*"));
        assert!(ok("secret/metadata/crm/sales"));
        for bad in ["sys/*", "secret/data/other/*", "secret/data/crm-other/x", "secret/data/*", "auth/token/create"] {
            assert!(!ok(bad), "{bad} must be refused");
        }
        let addr = |a: &str| policy(team("secret/data/crm/x"), Some(json!({"address": a})));
        let e = limits.vault_errors(&addr("http://attacker.example:8200"), Some("https://vault.vault.svc:8200"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "spec.vault.address");
        assert!(
            limits
                .vault_errors(&addr("https://vault.vault.svc:8200/"), Some("https://vault.vault.svc:8200"))
                .is_empty()
        );
        let more = AccessLimits { vault_addresses: vec!["https://dr-vault:8200".into()], ..AccessLimits::default() };
        assert!(more.vault_errors(&addr("https://dr-vault:8200"), None).is_empty());
        let none = AccessLimits { vault_path_prefixes: vec![], ..AccessLimits::default() };
        let e = none.vault_errors(&policy(team("secret/data/crm/x"), Some(json!({}))), None);
        assert!(e[0].to_string().contains("allows no vault[] grants"), "{}", e[0]);
    }

    #[test]
    fn prefixes_must_end_in_a_slash_and_hold_no_globs() {
        assert!(AccessLimits::default().check().is_ok());
        for bad in ["secret/data/crm", "/secret/", "secret/*/", "secret/+/"] {
            let l = AccessLimits { vault_path_prefixes: vec![bad.into()], ..AccessLimits::default() };
            assert!(l.check().is_err(), "{bad}");
        }
    }
}
