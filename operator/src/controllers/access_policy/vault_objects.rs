//! Pure builder: validated AccessPolicy -> the Vault objects of each team at `now` (a policy document, the
//! Kubernetes-auth roles that bind the team's ServiceAccounts to it, and a database role whose creation
//! statements grant exactly the team's live table privileges).
//!
//! Every name starts with `crmguard_<namespace>_<policy>_`, so the objects of one AccessPolicy are found (and
//! removed) by prefix; none of the parts can contain `_`, so two policies never share a prefix.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::lease::Delivery;
use super::validate::ValidatedAccessPolicy;
use crate::api::access_policy::{SqlPrivilege, SubjectKind, Team, VaultCapability};

/// SQL dialect of the database behind a Vault connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    Mysql,
}

impl Engine {
    /// From the connection's `plugin_name` in Vault.
    pub fn from_plugin(plugin: &str) -> Engine {
        if plugin.contains("mysql") { Engine::Mysql } else { Engine::Postgres }
    }
}

/// A Kubernetes-auth role.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthRole {
    pub name: String,
    pub body: Value,
}

/// A database secrets engine role for one team.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbRole {
    pub name: String,
    pub connection: String,
    /// Live privileges as `PRIVILEGE schema.table`, sorted; also the fingerprint of issued credentials.
    pub grants: BTreeSet<String>,
    pub ttl_seconds: u64,
    pub max_ttl_seconds: u64,
}

/// The Vault objects of one team.
#[derive(Clone, Debug, PartialEq)]
pub struct TeamVault {
    pub team: String,
    pub policy_name: String,
    /// The Vault policy as JSON (Vault accepts JSON and HCL; JSON cannot be broken out of by a path string).
    pub policy: Value,
    pub auth_roles: Vec<AuthRole>,
    pub db_role: Option<DbRole>,
}

/// The Vault objects of a whole AccessPolicy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VaultObjects {
    /// Prefix of every object name of this policy.
    pub prefix: String,
    pub teams: Vec<TeamVault>,
    /// Vault and database grants left out because they expired, as `<team>: <description>`.
    pub expired: Vec<String>,
    /// The next future `expiresAt` of a Vault or database grant.
    pub next_expiry: Option<Timestamp>,
}

/// Name prefix of the Vault objects of policy `name` in `namespace`.
pub fn prefix(namespace: &str, name: &str) -> String {
    format!("crmguard_{namespace}_{name}_")
}

fn capability(c: VaultCapability) -> &'static str {
    match c {
        VaultCapability::Create => "create",
        VaultCapability::Read => "read",
        VaultCapability::Update => "update",
        VaultCapability::Patch => "patch",
        VaultCapability::Delete => "delete",
        VaultCapability::List => "list",
        VaultCapability::Deny => "deny",
    }
}

fn privilege(p: SqlPrivilege) -> &'static str {
    match p {
        SqlPrivilege::Select => "SELECT",
        SqlPrivilege::Insert => "INSERT",
        SqlPrivilege::Update => "UPDATE",
        SqlPrivilege::Delete => "DELETE",
    }
}

fn live(
    expires: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Timestamp,
) -> Result<(), Timestamp> {
    match expires {
        Some(t) if t.0 <= now => Err(t.0),
        _ => Ok(()),
    }
}

/// Builds the Vault objects at `now`. `database_mount` and `auth_mount` come from `spec.vault`.
pub fn build(v: &ValidatedAccessPolicy, now: Timestamp) -> VaultObjects {
    let owner = &v.owner;
    let settings = v.policy.spec.vault.clone().unwrap_or_default();
    let db_mount = settings.database_mount.trim_matches('/').to_string();
    let mut out = VaultObjects { prefix: prefix(&owner.namespace, &owner.name), ..VaultObjects::default() };
    let mut note_expiry = |t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        if let Some(t) = t
            && t.0 > now
        {
            out.next_expiry = Some(out.next_expiry.map_or(t.0, |n: Timestamp| n.min(t.0)));
        }
    };
    let mut teams = Vec::new();
    let mut expired = Vec::new();
    for team in &v.policy.spec.teams {
        if team.vault.is_empty() && team.database.is_none() {
            continue;
        }
        let base = format!("{}{}", out.prefix, team.name);
        let mut paths: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
        for g in &team.vault {
            note_expiry(g.expires_at.as_ref());
            if let Err(at) = live(g.expires_at.as_ref(), now) {
                expired.push(format!("{}: Vault {} (expired {at})", team.name, g.path));
                continue;
            }
            paths.entry(g.path.clone()).or_default().extend(g.capabilities.iter().map(|c| capability(*c)));
        }
        let db_role = team.database.as_ref().and_then(|db| {
            let mut grants = BTreeSet::new();
            for g in &db.grants {
                note_expiry(g.expires_at.as_ref());
                let what = || {
                    format!(
                        "{} on {}",
                        g.privileges.iter().map(|p| privilege(*p)).collect::<Vec<_>>().join(","),
                        g.tables.iter().map(|t| format!("{}.{t}", g.schema)).collect::<Vec<_>>().join(",")
                    )
                };
                if let Err(at) = live(g.expires_at.as_ref(), now) {
                    expired.push(format!("{}: database {} (expired {at})", team.name, what()));
                    continue;
                }
                for t in &g.tables {
                    for p in &g.privileges {
                        grants.insert(format!("{} {}.{t}", privilege(*p), g.schema));
                    }
                }
            }
            let delivery = v.delivery(&team.name);
            (!grants.is_empty()).then(|| DbRole {
                name: base.clone(),
                connection: db.connection.clone(),
                grants,
                ttl_seconds: Delivery::secs(delivery.ttl),
                max_ttl_seconds: Delivery::secs(delivery.max_ttl),
            })
        });
        if let Some(r) = &db_role {
            paths.entry(format!("{db_mount}/creds/{}", r.name)).or_default().insert("read");
        }
        let policy = json!({
            "path": paths.iter().map(|(p, caps)| (p.clone(), json!({"capabilities": caps.iter().collect::<Vec<_>>()})))
                .collect::<serde_json::Map<String, Value>>()
        });
        teams.push(TeamVault {
            team: team.name.clone(),
            auth_roles: auth_roles(team, v.delivery(&team.name), &base, &owner.namespace),
            policy_name: base,
            policy,
            db_role,
        });
    }
    out.teams = teams;
    out.expired = expired;
    out
}

/// One Kubernetes-auth role per namespace of the team's ServiceAccounts (Vault binds names x namespaces, so one
/// role for several namespaces would admit a same-named account in each): `<base>` for the policy's namespace,
/// `<base>_<namespace>` for others. Users and groups do not log in through Kubernetes auth.
fn auth_roles(team: &Team, delivery: Delivery, base: &str, namespace: &str) -> Vec<AuthRole> {
    let mut by_ns: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in team.subjects.iter().filter(|s| s.kind == SubjectKind::ServiceAccount) {
        by_ns.entry(s.namespace.clone().unwrap_or_else(|| namespace.to_string())).or_default().insert(s.name.clone());
    }
    by_ns
        .into_iter()
        .map(|(ns, names)| AuthRole {
            name: if ns == namespace { base.to_string() } else { format!("{base}_{ns}") },
            body: json!({
                "bound_service_account_names": names,
                "bound_service_account_namespaces": [ns],
                "token_policies": [base],
                "token_ttl": Delivery::secs(delivery.ttl),
                "token_max_ttl": Delivery::secs(delivery.max_ttl),
            }),
        })
        .collect()
}

fn quote_ident(engine: Engine, ident: &str) -> String {
    // Identifiers are validated as plain identifiers by the CRD and `check_identifiers`; quoting keeps case and
    // is a second line of defence.
    match engine {
        Engine::Postgres => format!("\"{}\"", ident.replace('"', "\"\"")),
        Engine::Mysql => format!("`{}`", ident.replace('`', "``")),
    }
}

/// Refuses identifiers that are not plain (letters, digits, underscore; not starting with a digit).
pub fn check_identifiers(role: &DbRole) -> Result<(), String> {
    for g in &role.grants {
        let target = g.split_once(' ').map(|(_, t)| t).unwrap_or_default();
        for ident in target.split('.') {
            let ok = ident.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && ident.len() <= 63;
            if !ok {
                return Err(format!("{ident:?} is not a plain SQL identifier"));
            }
        }
    }
    Ok(())
}

/// Vault `creation_statements` that create a login with exactly `role.grants`.
pub fn creation_statements(engine: Engine, role: &DbRole) -> Vec<String> {
    // (privilege, schema) -> tables
    let mut grouped: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for g in &role.grants {
        let Some((p, target)) = g.split_once(' ') else { continue };
        let Some((schema, table)) = target.split_once('.') else { continue };
        grouped.entry((p, schema)).or_default().push(table);
    }
    let schemas: BTreeSet<&str> = grouped.keys().map(|(_, s)| *s).collect();
    let mut out = Vec::new();
    match engine {
        Engine::Postgres => {
            out.push(
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';".to_string(),
            );
            for s in &schemas {
                out.push(format!("GRANT USAGE ON SCHEMA {} TO \"{{{{name}}}}\";", quote_ident(engine, s)));
            }
            for ((p, s), tables) in &grouped {
                let list: Vec<String> =
                    tables.iter().map(|t| format!("{}.{}", quote_ident(engine, s), quote_ident(engine, t))).collect();
                out.push(format!("GRANT {p} ON TABLE {} TO \"{{{{name}}}}\";", list.join(", ")));
            }
        }
        Engine::Mysql => {
            out.push("CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';".to_string());
            for ((p, s), tables) in &grouped {
                for t in tables {
                    out.push(format!(
                        "GRANT {p} ON {}.{} TO '{{{{name}}}}'@'%';",
                        quote_ident(engine, s),
                        quote_ident(engine, t)
                    ));
                }
            }
        }
    }
    out
}

/// The body of `<mount>/roles/<name>`.
pub fn db_role_body(engine: Engine, role: &DbRole) -> Value {
    json!({
        "db_name": role.connection,
        "creation_statements": creation_statements(engine, role),
        "default_ttl": role.ttl_seconds,
        "max_ttl": role.max_ttl_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AccessPolicy;

    fn policy(yaml: &str) -> ValidatedAccessPolicy {
        let mut p: AccessPolicy = serde_saphyr::from_str(yaml).expect("policy");
        p.metadata.uid = Some("u1".into());
        // The builder is tested on its own: every path admitted (the prefixes are tested in `ceiling`).
        let mut ctx = crate::controllers::BuildContext::default();
        ctx.access.vault_path_prefixes = vec![String::new()];
        super::super::validate::validate(&p, &ctx).expect("valid")
    }

    const SALES_FINANCE: &str = r#"
apiVersion: crmguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: crm-access, namespace: crm}
spec:
  vault: {}
  teams:
    - name: sales
      subjects:
        - {kind: ServiceAccount, name: sales-app}
        - {kind: ServiceAccount, name: reports, namespace: bi}
        - {kind: Group, name: sales-team}
      vault:
        - {path: "secret/data/crm/sales/*", capabilities: [read, list]}
        - {path: "secret/data/crm/break-glass", capabilities: [read], expiresAt: "2026-01-01T00:00:00Z"}
      database:
        connection: crm
        grants:
          - {tables: [accounts, contacts, deals], privileges: [SELECT]}
          - {tables: [deals], privileges: [UPDATE], expiresAt: "2027-01-01T00:00:00Z"}
      credentials: {ttl: 10m, maxTtl: 1h}
    - name: finance
      subjects: [{kind: ServiceAccount, name: finance-app}]
      database:
        connection: crm
        grants: [{schema: billing, tables: [invoices], privileges: [SELECT, INSERT]}]
      credentials: {}
    - name: ops
      subjects: [{kind: User, name: alice}]
      kubernetes: [{resources: [pods], verbs: [get]}]
"#;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("time")
    }

    #[test]
    fn teams_get_exactly_their_grants() {
        let objs = build(&policy(SALES_FINANCE), at("2026-06-01T00:00:00Z"));
        assert_eq!(objs.prefix, "crmguard_crm_crm-access_");
        assert_eq!(objs.teams.len(), 2, "ops has no Vault or database grants");
        let sales = &objs.teams[0];
        assert_eq!(sales.policy_name, "crmguard_crm_crm-access_sales");
        assert_eq!(
            sales.policy,
            json!({"path": {
                "database/creds/crmguard_crm_crm-access_sales": {"capabilities": ["read"]},
                "secret/data/crm/sales/*": {"capabilities": ["list", "read"]},
            }}),
            "the expired break-glass path is gone"
        );
        assert_eq!(objs.expired, vec!["sales: Vault secret/data/crm/break-glass (expired 2026-01-01T00:00:00Z)"]);
        assert_eq!(objs.next_expiry, Some(at("2027-01-01T00:00:00Z")));
        let db = sales.db_role.as_ref().expect("db role");
        assert_eq!(
            db.grants.iter().map(String::as_str).collect::<Vec<_>>(),
            ["SELECT public.accounts", "SELECT public.contacts", "SELECT public.deals", "UPDATE public.deals"]
        );
        assert_eq!((db.ttl_seconds, db.max_ttl_seconds), (600, 3600));
        // One Kubernetes-auth role per ServiceAccount namespace; the group logs in some other way.
        let names: Vec<&str> = sales.auth_roles.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["crmguard_crm_crm-access_sales_bi", "crmguard_crm_crm-access_sales"]);
        assert_eq!(sales.auth_roles[1].body["bound_service_account_names"], json!(["sales-app"]));
        assert_eq!(sales.auth_roles[1].body["bound_service_account_namespaces"], json!(["crm"]));
        assert_eq!(sales.auth_roles[1].body["token_policies"], json!(["crmguard_crm_crm-access_sales"]));
        let finance = objs.teams[1].db_role.as_ref().expect("finance role");
        assert_eq!(finance.grants.iter().collect::<Vec<_>>(), ["INSERT billing.invoices", "SELECT billing.invoices"]);
        assert_eq!((finance.ttl_seconds, finance.max_ttl_seconds), (3600, 86400), "CRD defaults");
    }

    #[test]
    fn expired_database_grants_leave_the_role() {
        let objs = build(&policy(SALES_FINANCE), at("2027-06-01T00:00:00Z"));
        let db = objs.teams[0].db_role.as_ref().expect("db role");
        assert!(!db.grants.contains("UPDATE public.deals"));
        assert_eq!(objs.expired.len(), 2);
        assert_eq!(objs.next_expiry, None);
    }

    #[test]
    fn creation_statements_grant_only_the_listed_tables() {
        let objs = build(&policy(SALES_FINANCE), at("2026-06-01T00:00:00Z"));
        let sales = objs.teams[0].db_role.as_ref().expect("db role");
        assert_eq!(
            creation_statements(Engine::Postgres, sales),
            [
                "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
                "GRANT USAGE ON SCHEMA \"public\" TO \"{{name}}\";",
                "GRANT SELECT ON TABLE \"public\".\"accounts\", \"public\".\"contacts\", \"public\".\"deals\" TO \"{{name}}\";",
                "GRANT UPDATE ON TABLE \"public\".\"deals\" TO \"{{name}}\";",
            ]
        );
        let finance = objs.teams[1].db_role.as_ref().expect("finance role");
        assert_eq!(
            creation_statements(Engine::Mysql, finance),
            [
                "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
                "GRANT INSERT ON `billing`.`invoices` TO '{{name}}'@'%';",
                "GRANT SELECT ON `billing`.`invoices` TO '{{name}}'@'%';",
            ]
        );
        assert_eq!(db_role_body(Engine::Postgres, finance)["db_name"], "crm");
        assert!(check_identifiers(sales).is_ok());
        let mut bad = sales.clone();
        bad.grants.insert("SELECT public.x\"; DROP TABLE y; --".into());
        assert!(check_identifiers(&bad).is_err());
    }

    #[test]
    fn a_path_cannot_break_out_of_the_policy_document() {
        let evil =
            SALES_FINANCE.replace("secret/data/crm/sales/*", "x\\\" { capabilities = [\\\"sudo\\\"] } path \\\"sys/*");
        let objs = build(&policy(&evil), at("2026-06-01T00:00:00Z"));
        let doc = objs.teams[0].policy["path"].as_object().expect("paths");
        assert_eq!(doc.len(), 2, "one odd path key, not a new rule: {doc:?}");
        assert!(doc.keys().any(|k| k.contains("sudo")));
        assert!(!doc.contains_key("sys/*"));
    }
}
