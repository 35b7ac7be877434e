//! RBAC authorization, so that tests can run the operator with exactly the chart's permissions.
//!
//! Bearer token `standin` (the default kubeconfig) and requests without a token (the tests' in-process client)
//! are cluster admins; any other token is anonymous and refused. A token `serviceaccount:<ns>:<name>` acts as
//! that ServiceAccount, and is allowed a request only when a RoleBinding in the request's namespace or a
//! ClusterRoleBinding grants it through Role/ClusterRole rules (verbs, apiGroups, resources incl. subresources,
//! resourceNames). Not modelled: aggregation, non-resource URLs, impersonation, and the escalation checks on
//! creating Roles/RoleBindings (`escalate`/`bind`).

use serde_json::Value;

use super::store::{ResourceType, Store};

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    ServiceAccount { namespace: String, name: String },
    Anonymous,
}

/// Identifies the caller from the Authorization header.
pub fn caller(authorization: Option<&str>) -> Caller {
    match authorization.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim) {
        Some("standin") => Caller::Admin,
        Some(t) => match t.strip_prefix("serviceaccount:").and_then(|r| r.split_once(':')) {
            Some((ns, name)) => Caller::ServiceAccount { namespace: ns.into(), name: name.into() },
            None => Caller::Anonymous,
        },
        None => Caller::Admin,
    }
}

/// The RBAC verb of a request.
pub fn verb(method: &str, has_name: bool, watch: bool) -> &'static str {
    match (method, has_name, watch) {
        ("GET", _, true) => "watch",
        ("GET", true, _) => "get",
        ("GET", false, _) => "list",
        ("POST", _, _) => "create",
        ("PUT", _, _) => "update",
        ("PATCH", _, _) => "patch",
        ("DELETE", true, _) => "delete",
        _ => "deletecollection",
    }
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str).collect()
}

fn rule_allows(rule: &Value, verb: &str, group: &str, resource: &str, name: Option<&str>) -> bool {
    let any = |list: Vec<&str>, want: &str| list.iter().any(|x| *x == "*" || *x == want);
    let names = strs(&rule["resourceNames"]);
    any(strs(&rule["verbs"]), verb)
        && any(strs(&rule["apiGroups"]), group)
        && any(strs(&rule["resources"]), resource)
        && (names.is_empty() || name.is_some_and(|n| names.contains(&n)))
}

fn binds(binding: &Value, ns: &str, name: &str) -> bool {
    binding["subjects"].as_array().into_iter().flatten().any(|s| {
        s["kind"] == "ServiceAccount" && s["name"] == name && s["namespace"].as_str().unwrap_or_default() == ns
    })
}

/// Decides a request. `namespace` is the request's namespace ("" for cluster-scoped or all-namespace requests).
pub fn allowed(
    store: &Store,
    caller: &Caller,
    verb: &str,
    t: &ResourceType,
    subresource: &str,
    namespace: &str,
    name: Option<&str>,
) -> bool {
    let (sa_ns, sa_name) = match caller {
        Caller::Admin => return true,
        Caller::Anonymous => return false,
        Caller::ServiceAccount { namespace, name } => (namespace.as_str(), name.as_str()),
    };
    let resource = if subresource.is_empty() { t.plural.clone() } else { format!("{}/{subresource}", t.plural) };
    let objects = |plural: &'static str| {
        store.objects.iter().filter(move |(k, _)| k.group == "rbac.authorization.k8s.io" && k.plural == plural)
    };
    let role_rules = |kind: &str, role_name: &str, role_ns: &str| -> Vec<Value> {
        let plural = if kind == "ClusterRole" { "clusterroles" } else { "roles" };
        objects(plural)
            .filter(|(k, _)| k.name == role_name && (plural == "clusterroles" || k.namespace == role_ns))
            .flat_map(|(_, v)| v["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let grants = |rules: Vec<Value>| rules.iter().any(|r| rule_allows(r, verb, &t.group, &resource, name));
    let cluster = objects("clusterrolebindings").filter(|(_, b)| binds(b, sa_ns, sa_name)).any(|(_, b)| {
        grants(role_rules(
            b["roleRef"]["kind"].as_str().unwrap_or_default(),
            b["roleRef"]["name"].as_str().unwrap_or_default(),
            "",
        ))
    });
    if cluster {
        return true;
    }
    !namespace.is_empty()
        && objects("rolebindings").filter(|(k, b)| k.namespace == namespace && binds(b, sa_ns, sa_name)).any(
            |(_, b)| {
                grants(role_rules(
                    b["roleRef"]["kind"].as_str().unwrap_or_default(),
                    b["roleRef"]["name"].as_str().unwrap_or_default(),
                    namespace,
                ))
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn callers_and_verbs() {
        assert_eq!(caller(Some("Bearer standin")), Caller::Admin);
        assert_eq!(
            caller(Some("Bearer serviceaccount:ops:crmguard")),
            Caller::ServiceAccount { namespace: "ops".into(), name: "crmguard".into() }
        );
        assert_eq!(caller(None), Caller::Admin);
        assert_eq!(caller(Some("Bearer nonsense")), Caller::Anonymous);
        assert_eq!(verb("GET", false, true), "watch");
        assert_eq!(verb("GET", true, false), "get");
        assert_eq!(verb("PATCH", true, false), "patch");
    }

    #[test]
    fn rules_match_groups_resources_subresources_and_names() {
        let r = json!({"apiGroups": ["crmguard.io"], "resources": ["networkguards/status"], "verbs": ["patch"]});
        assert!(rule_allows(&r, "patch", "crmguard.io", "networkguards/status", Some("x")));
        assert!(!rule_allows(&r, "patch", "crmguard.io", "networkguards", Some("x")));
        assert!(!rule_allows(&r, "get", "crmguard.io", "networkguards/status", Some("x")));
        let n = json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["token"]});
        assert!(rule_allows(&n, "get", "", "secrets", Some("token")));
        assert!(!rule_allows(&n, "get", "", "secrets", Some("other")));
    }
}
