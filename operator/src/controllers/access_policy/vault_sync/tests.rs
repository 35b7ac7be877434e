//! The Vault half against in-memory executors: objects written when they differ, stale ones removed (only the
//! policy's own), credentials delivered, Secrets of teams without grants removed with their leases, and what the
//! finalizer leaves behind (nothing of the policy's).

use super::cleanup::{remove_all, touched};
use super::fake::{FakeSecrets, FakeVault};
use super::*;

const POLICY: &str = r#"
apiVersion: crmguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: crm-access, namespace: crm, uid: u1}
spec:
  vault: {}
  teams:
    - name: sales
      subjects: [{kind: ServiceAccount, name: sales-app}]
      vault: [{path: "secret/data/crm/sales/*", capabilities: [read]}]
      database:
        connection: crm
        grants: [{tables: [deals], privileges: [SELECT]}]
      credentials: {}
    - name: finance
      subjects: [{kind: ServiceAccount, name: finance-app}]
      vault: [{path: "secret/data/crm/finance/*", capabilities: [read]}]
"#;

const NOW: &str = "2026-12-01T00:00:00Z";

fn policy(yaml: &str) -> (AccessPolicy, ValidatedAccessPolicy) {
    let p: AccessPolicy = serde_saphyr::from_str(yaml).expect("policy");
    let mut ctx = crate::controllers::BuildContext::default();
    ctx.access.vault_path_prefixes = vec![String::new()];
    let v = super::super::validate::validate(&p, &ctx).expect("valid");
    (p, v)
}

/// A database connection configured in Vault by its administrator.
fn connection() -> (&'static str, Value) {
    ("database/config/crm", json!({"plugin_name": "postgresql-database-plugin"}))
}

async fn run(p: &AccessPolicy, v: &ValidatedAccessPolicy, vault: &FakeVault, secrets: &FakeSecrets) -> Outcome {
    pass(p, v, Some(vault), secrets, NOW.parse().unwrap()).await.expect("pass")
}

/// The policy as its status records what a pass delivered (what the runtime writes after the pass).
fn with_status(mut p: AccessPolicy, out: &Outcome) -> AccessPolicy {
    let teams = out
        .teams
        .iter()
        .map(|(name, t)| crate::api::access_policy::TeamStatus {
            name: name.clone(),
            vault_policy: t.vault_policy.clone(),
            vault_roles: t.vault_roles.clone(),
            secret_name: t.secret_name.clone(),
            ..Default::default()
        })
        .collect();
    let status = p.status.get_or_insert_with(Default::default);
    status.teams = teams;
    status.connection_secret_version = out.connection_secret_version.clone();
    p
}

fn delivered(out: &Outcome) -> Vec<Secret> {
    out.secrets.iter().map(|s| serde_json::from_value(s.clone()).expect("a Secret")).collect()
}

fn owned_secret(name: &str, owner_uid: &str, leases: &[(&str, &str)]) -> Secret {
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "crm",
            "ownerReferences": [{"apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy", "name": "crm-access",
                                 "uid": owner_uid}],
            "annotations": leases.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        },
        "data": {"username": "dXNlcg=="},
    }))
    .expect("Secret")
}

#[tokio::test]
async fn a_pass_writes_what_differs_removes_only_its_own_stale_objects_and_delivers_credentials() {
    let (p, v) = policy(POLICY);
    let own_stale = "sys/policies/acl/crmguard_crm_crm-access_marketing";
    // Another policy whose name starts with this one's: its objects are not under this policy's prefix.
    let others = "sys/policies/acl/crmguard_crm_crm-access-2_sales";
    let vault = FakeVault::holding(&[
        connection(),
        (own_stale, json!({"policy": "path \"secret/*\" {capabilities = [\"read\"]}"})),
        (others, json!({"policy": "path \"secret/*\" {capabilities = [\"read\"]}"})),
        ("sys/policies/acl/default", json!({"policy": ""})),
    ]);
    let secrets = FakeSecrets::default();
    let out = run(&p, &v, &vault, &secrets).await;

    assert_eq!((out.vault.status, out.vault.reason), (Status::True, "Synced"), "{}", out.vault.message);
    assert_eq!(
        (out.credentials.status, out.credentials.reason),
        (Status::True, "Issued"),
        "{}",
        out.credentials.message
    );
    for team in ["sales", "finance"] {
        let policy = out.teams[team].vault_policy.clone().expect("a Vault policy per team");
        assert!(vault.holds(&format!("sys/policies/acl/{policy}")), "{team}'s policy written");
        for role in &out.teams[team].vault_roles {
            assert!(vault.holds(&format!("auth/kubernetes/role/{role}")), "{team}'s auth role {role} written");
        }
        assert!(!out.teams[team].vault_roles.is_empty(), "{team} has an auth role");
    }
    assert_eq!(vault.calls_of("write database/roles/").len(), 1, "one database role: sales'");
    assert!(!vault.holds(own_stale), "a stale object under the policy's prefix is removed");
    assert!(vault.holds(others) && vault.holds("sys/policies/acl/default"), "other policies' objects stay");
    assert_eq!(vault.calls_of("delete "), [format!("delete {own_stale}")]);
    // The sales Secret carries a freshly issued credential; finance has no database grants, so no Secret.
    let sent = delivered(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].metadata.name.as_deref(), Some("crm-access-sales-db"));
    let user = &sent[0].data.as_ref().expect("data")["username"].0;
    assert!(String::from_utf8_lossy(user).starts_with("v-"), "the issued username");
    assert_eq!(vault.live.lock().unwrap().len(), 1, "one lease");
    // Every Vault write is in the audit: 2 policies, 2 auth roles, 1 database role, 1 stale removal, 1 lease.
    let count = |a: VaultAction| out.audit.iter().filter(|w| w.action == a).count();
    assert_eq!(
        (count(VaultAction::Write), count(VaultAction::Delete), count(VaultAction::LeaseIssue)),
        (2 + 2 + 1, 1, 1),
        "{:?}",
        out.audit
    );

    // The next pass, with the Secret delivered and the status written: nothing is asked but reads.
    let p = with_status(p, &out);
    let secrets = FakeSecrets::holding(sent);
    let before = vault.calls.lock().unwrap().len();
    let again = run(&p, &v, &vault, &secrets).await;
    let calls: Vec<String> = vault.calls.lock().unwrap()[before..].to_vec();
    assert!(calls.iter().all(|c| c.starts_with("read ") || c.starts_with("list ")), "{calls:?}");
    assert!(again.audit.is_empty() && again.events.is_empty(), "{:?} {:?}", again.audit, again.events);
    assert_eq!(delivered(&again)[0].data, delivered(&out)[0].data, "the same credential is delivered again");
}

#[tokio::test]
async fn a_connection_vault_does_not_have_is_named_and_no_credential_is_issued() {
    let (p, v) = policy(POLICY);
    let vault = FakeVault::default();
    let out = run(&p, &v, &vault, &FakeSecrets::default()).await;
    assert_eq!((out.vault.status, out.vault.reason), (Status::False, "DatabaseConnectionMissing"));
    assert!(out.vault.message.contains("database/config/crm"), "{}", out.vault.message);
    assert!(out.vault.message.contains("spec.vault.connectionSecretRef"), "names the fix: {}", out.vault.message);
    assert_eq!(out.credentials.reason, "DatabaseConnectionMissing");
    assert!(vault.calls_of("issue ").is_empty() && out.secrets.is_empty());
    assert_eq!(out.retry, Some(VAULT_RETRY));
}

#[tokio::test]
async fn a_connection_from_a_secret_is_written_once_per_version_of_the_secret_and_its_password_stays_out() {
    let yaml = POLICY.replace("  vault: {}", "  vault: {connectionSecretRef: {name: crm-db-admin, key: password}}");
    let (p, v) = policy(&yaml);
    let admin = |version: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "crm-db-admin", "namespace": "crm", "resourceVersion": version},
            "data": {"connection_url": "cG9zdGdyZXNxbDovL3t7dXNlcm5hbWV9fTp7e3Bhc3N3b3JkfX1AZGI6NTQzMi9jcm0=",
                     "username": "dmF1bHRhZG1pbg==", "password": "czNjcjN0LXB3"},
        }))
        .expect("Secret")
    };
    let vault = FakeVault::default();
    let out = run(&p, &v, &vault, &FakeSecrets::holding(vec![admin("7")])).await;
    assert_eq!(out.vault.reason, "Synced", "{}", out.vault.message);
    let sent = vault.written.lock().unwrap().iter().find(|(p, _)| p == "database/config/crm").cloned();
    assert_eq!(sent.expect("the connection written").1["password"], "s3cr3t-pw");
    assert_eq!(out.connection_secret_version.as_deref(), Some("7"));
    assert!(out.audit.iter().any(|w| w.path == "database/config/crm"));
    assert!(!format!("{:?}", out.audit).contains("s3cr3t-pw"), "the password is not in the audit");

    let p = with_status(p, &out);
    let writes = vault.calls_of("write database/config/").len();
    run(&p, &v, &vault, &FakeSecrets::holding(vec![admin("7")])).await;
    assert_eq!(vault.calls_of("write database/config/").len(), writes, "the same Secret: not written again");
    run(&p, &v, &vault, &FakeSecrets::holding(vec![admin("8")])).await;
    assert_eq!(vault.calls_of("write database/config/").len(), writes + 1, "a changed Secret is written");
}

#[tokio::test]
async fn a_team_that_lost_its_grants_loses_its_secret_and_leases_but_a_secret_the_policy_does_not_own_stays() {
    let yaml = format!(
        "{POLICY}status:\n  teams:\n    - {{name: marketing, secretName: crm-access-marketing-db}}\n    - {{name: legacy, \
         secretName: shared-db}}\n"
    );
    let (p, v) = policy(&yaml);
    let vault = FakeVault::holding(&[connection()]);
    let secrets = FakeSecrets::holding(vec![
        owned_secret(
            "crm-access-marketing-db",
            "u1",
            &[(lease::LEASE_ID, "database/creds/m/2"), (lease::PREVIOUS_LEASE_ID, "database/creds/m/1")],
        ),
        owned_secret("shared-db", "someone-else", &[(lease::LEASE_ID, "database/creds/x/1")]),
    ]);
    let out = run(&p, &v, &vault, &secrets).await;
    assert_eq!(secrets.names(), ["shared-db"], "the marketing Secret is deleted, the foreign one stays");
    assert_eq!(vault.calls_of("revoke "), ["revoke database/creds/m/2", "revoke database/creds/m/1"]);
    assert!(out.events.iter().any(|e| e.reason == "CredentialsRemoved" && e.note.contains("crm-access-marketing-db")));
    assert!(
        out.audit.iter().any(|w| w.action == VaultAction::LeaseRevoke && w.path == "Secret crm-access-marketing-db")
    );

    // Without any team asking for Vault, the Secret still goes (its leases run out on their own).
    let none = r#"
apiVersion: crmguard.io/v1alpha1
kind: AccessPolicy
metadata: {name: crm-access, namespace: crm, uid: u1}
spec:
  teams: [{name: ops, subjects: [{kind: Group, name: ops}]}]
status:
  teams: [{name: marketing, secretName: crm-access-marketing-db}]
"#;
    let (p, v) = policy(none);
    let secrets = FakeSecrets::holding(vec![owned_secret("crm-access-marketing-db", "u1", &[])]);
    pass(&p, &v, None::<&FakeVault>, &secrets, NOW.parse().unwrap()).await.expect("pass");
    assert!(secrets.names().is_empty());
}

#[tokio::test]
async fn the_finalizer_leaves_nothing_of_the_policy_in_vault_and_audits_each_removal() {
    let yaml = POLICY.replace("  vault: {}", "  vault: {connectionSecretRef: {name: crm-db-admin, key: password}}");
    let (p, v) = policy(&yaml);
    let admin: Secret = serde_json::from_value(json!({
        "metadata": {"name": "crm-db-admin", "namespace": "crm", "resourceVersion": "1"},
        "data": {"connection_url": "eA==", "username": "eA==", "password": "eA=="},
    }))
    .expect("Secret");
    let others = "sys/policies/acl/crmguard_crm_other-policy_sales";
    let vault = FakeVault::holding(&[(others, json!({"policy": ""}))]);
    let out = run(&p, &v, &vault, &FakeSecrets::holding(vec![admin.clone()])).await;
    assert!(!touched(&p), "nothing recorded yet: nothing to clean up");
    let p = with_status(p, &out);
    assert!(touched(&p));
    let mut held = delivered(&out);
    held.push(admin);
    let secrets = FakeSecrets::holding(held);

    let mut done = Vec::new();
    remove_all(&p, &v.owner, &vault, &secrets, &mut done).await.expect("cleanup");
    let left: Vec<String> = vault.paths.lock().unwrap().keys().cloned().collect();
    assert_eq!(left, [others], "only another policy's object is left");
    assert!(vault.live.lock().unwrap().is_empty(), "the issued lease is revoked");
    let count = |a: VaultAction| done.iter().filter(|w| w.action == a).count();
    // 1 Secret's leases; 2 policies, 2 auth roles, 1 database role, 1 connection.
    assert_eq!((count(VaultAction::LeaseRevoke), count(VaultAction::Delete)), (1, 6), "{done:?}");
    assert!(done.iter().all(|w| w.reason == "policy deleted"));
    // Idempotent: a second run (the finalizer retried) finds nothing and fails on nothing.
    let mut again = Vec::new();
    remove_all(&p, &v.owner, &vault, &secrets, &mut again).await.expect("cleanup again");
}

#[tokio::test]
async fn a_token_vault_refuses_is_reported_and_its_session_forgotten_and_what_status_names_is_kept() {
    let yaml =
        format!("{POLICY}status:\n  teams:\n    - {{name: sales, vaultPolicy: p, secretName: crm-access-sales-db}}\n");
    let (p, v) = policy(&yaml);
    let vault = FakeVault {
        fails: Some(ApiError::Forbidden { op: "GET".into(), path: "sys/policies/acl/p".into() }),
        ..FakeVault::default()
    };
    let out = run(&p, &v, &vault, &FakeSecrets::default()).await;
    assert!(out.forbidden, "the operator's Vault session is to be forgotten");
    assert_eq!((out.vault.status, out.vault.reason), (Status::False, "VaultPermissionDenied"));
    assert_eq!(out.credentials.reason, "VaultPermissionDenied");
    assert_eq!(out.retry, Some(VAULT_RETRY));
    // What the status names stays known (the finalizer reads it to clean up).
    assert_eq!(out.teams["sales"].secret_name.as_deref(), Some("crm-access-sales-db"));
    assert!(out.secrets.is_empty() && out.audit.is_empty());
}
