//! AccessPolicy against real OpenBao (Vault's API) and PostgreSQL, with the real `crmguard run` process: the
//! sales team's credential reads sales tables and is refused on invoices (finance the reverse), rotation gives
//! new working credentials and the old ones die after the grace period, one rotation = one workload restart
//! (an operator restart alone restarts nothing), expired grants leave RBAC and Vault, deletion leaves nothing
//! in Vault and revokes every lease, and a sealed or unreachable Vault is a condition, not a crash loop.
//! No credential value ever appears in the operator's log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use crmguard::api::AccessPolicy;
use e2e::services::{OpenBao, Postgres};
use e2e::{Cluster, Operator, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::Role;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn cond(ap: &AccessPolicy, t: &str) -> Option<(String, String, String)> {
    ap.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn bao_json(bao: &OpenBao, args: &[&str]) -> Option<Value> {
    let mut a = args.to_vec();
    a.insert(1, "-format=json");
    bao.cli(&a).ok().and_then(|s| serde_json::from_str(&s).ok())
}

fn bao_list(bao: &OpenBao, path: &str) -> Vec<String> {
    bao_json(bao, &["list", path])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn creds(s: &Secret) -> (String, String) {
    let d = s.data.clone().unwrap_or_default();
    let get = |k: &str| String::from_utf8(d.get(k).map(|b| b.0.clone()).unwrap_or_default()).unwrap();
    (get("username"), get("password"))
}

fn now_plus(secs: i64) -> String {
    jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap()
        .round(jiff::Unit::Second)
        .unwrap()
        .to_string()
}

struct Fixture {
    bao: &'static OpenBao,
    pg: &'static Postgres,
    db: String,
    auth_mount: String,
    db_mount: String,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let (bao, pg) = (OpenBao::shared(), Postgres::shared());
        let id = format!("{tag}{}", std::process::id());
        let db = format!("crm_{id}");
        pg.sql("postgres", &format!("CREATE DATABASE {db}"));
        pg.sql(
            &db,
            "CREATE TABLE accounts (id int PRIMARY KEY, name text);
             CREATE TABLE contacts (id int PRIMARY KEY, account int, email text);
             CREATE TABLE deals (id int PRIMARY KEY, account int, amount numeric);
             CREATE TABLE invoices (id int PRIMARY KEY, account int, total numeric);
             INSERT INTO accounts SELECT i, 'Account ' || i FROM generate_series(1, 7) i;
             INSERT INTO contacts SELECT i, i % 7 + 1, 'c' || i || '@example.com' FROM generate_series(1, 20) i;
             INSERT INTO deals SELECT i, i % 7 + 1, i * 100 FROM generate_series(1, 5) i;
             INSERT INTO invoices SELECT i, i % 7 + 1, i * 42 FROM generate_series(1, 3) i;",
        );
        let (auth_mount, db_mount) = (format!("k8s-{id}"), format!("db-{id}"));
        bao.cli(&["auth", "enable", &format!("-path={auth_mount}"), "kubernetes"]).unwrap();
        bao.cli(&["secrets", "enable", &format!("-path={db_mount}"), "database"]).unwrap();
        Fixture { bao, pg, db, auth_mount, db_mount }
    }

    fn connection_secret(&self, ns: &str) -> Secret {
        let url = format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{}?sslmode=disable",
            self.pg.port, self.db
        );
        serde_json::from_value(json!({
            "metadata": {"name": "crm-vault-connection", "namespace": ns},
            "stringData": {"connection_url": url, "username": self.pg.user, "password": self.pg.password},
        }))
        .unwrap()
    }
}

/// The policy: sales reads accounts/contacts/deals, finance reads invoices. `sales_update` adds UPDATE on
/// deals to sales (a rotation); `expiring` adds a Kubernetes and a Vault grant to sales that expire then.
fn policy(f: &Fixture, ns: &str, sales_update: bool, expiring: Option<&str>) -> Value {
    let mut sales_grants = vec![json!({"tables": ["accounts", "contacts", "deals"], "privileges": ["SELECT"]})];
    if sales_update {
        sales_grants.push(json!({"tables": ["deals"], "privileges": ["UPDATE"]}));
    }
    let mut k8s = vec![json!({"resources": ["pods"], "verbs": ["get", "list"]})];
    let mut vault = vec![json!({"path": format!("secret/data/{ns}/sales/*"), "capabilities": ["read", "list"]})];
    if let Some(at) = expiring {
        k8s.push(json!({"resources": ["configmaps"], "verbs": ["get"], "expiresAt": at}));
        vault.push(json!({"path": format!("secret/data/{ns}/break-glass"), "capabilities": ["read"], "expiresAt": at}));
    }
    json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "crm-access", "namespace": ns},
        "spec": {
            "vault": {
                "address": f.bao.addr(), "kubernetesAuthMount": f.auth_mount, "databaseMount": f.db_mount,
                "connectionSecretRef": {"name": "crm-vault-connection", "key": "connection_url"},
            },
            "teams": [
                {
                    "name": "sales",
                    "subjects": [{"kind": "ServiceAccount", "name": "sales-app"}, {"kind": "Group", "name": "crm-sales"}],
                    "kubernetes": k8s, "vault": vault,
                    "database": {"connection": "crm", "grants": sales_grants},
                    "credentials": {"ttl": "10m", "maxTtl": "1h", "revokeGracePeriod": "3s",
                                    "restartWorkloads": [{"kind": "Deployment", "name": "sales-reports"}]},
                },
                {
                    "name": "finance",
                    "subjects": [{"kind": "ServiceAccount", "name": "finance-app"}],
                    "database": {"connection": "crm", "grants": [{"tables": ["invoices"], "privileges": ["SELECT"]}]},
                    "credentials": {},
                },
            ],
        },
    })
}

fn deployment(ns: &str) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "sales-reports", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "sales-reports"}},
            "template": {"metadata": {"labels": {"app": "sales-reports"}},
                         "spec": {"containers": [{"name": "app", "image": "busybox"}]}},
        },
    }))
    .unwrap()
}

async fn secret(api: &Api<Secret>, name: &str) -> Secret {
    eventually(60, &format!("Secret {name}"), || async {
        api.get_opt(name).await.map_err(|e| e.to_string())?.ok_or_else(|| "absent".to_string())
    })
    .await
}

/// A cluster namespace with the Vault connection Secret, a PostgreSQL database and Vault mounts of its own.
async fn start(test: &str, tag: &str) -> (Cluster, kube::Client, String, Fixture, Api<Secret>) {
    let cluster = Cluster::start(test).await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let f = Fixture::new(tag);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets.create(&PostParams::default(), &f.connection_secret(&ns)).await.unwrap();
    (cluster, client, ns, f, secrets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_get_exactly_their_data_rotation_expiry_and_cleanup() {
    let (cluster, client, ns, f, secrets) = start("access-vault", "a").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments.create(&PostParams::default(), &deployment(&ns)).await.unwrap();
    let addr = f.bao.addr();
    let args = ["--leader-election=false", "--namespace", &ns, "--vault-addr", &addr];
    let env = [("VAULT_TOKEN", f.bao.token.as_str())];
    // The operator runs with exactly the chart's RBAC: the real API server's escalation checks apply to the
    // Roles it creates for the teams.
    let kubeconfig = e2e::install_chart_rbac(&cluster, e2e::Admission::WithoutPolicy).await;
    let mut op = Operator::start_with_env(&kubeconfig, &args, &env);
    op.wait_ready(60).await;

    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    let ap: AccessPolicy = serde_json::from_value(policy(&f, &ns, false, None)).unwrap();
    aps.create(&PostParams::default(), &ap).await.unwrap();
    let ap = ready(&aps, &op, 1).await;
    assert_eq!(ap.metadata.finalizers, Some(vec!["crmguard.io/vault-cleanup".to_string()]));
    let (s, r, m) = cond(&ap, "CredentialsIssued").unwrap();
    assert_eq!((s.as_str(), r.as_str()), ("True", "Issued"), "{m}");
    assert!(!m.contains(&f.pg.password));

    // Vault holds the team's policy, Kubernetes-auth role and database role, with exactly its grants.
    let prefix = format!("crmguard_{ns}_crm-access_");
    let sales_policy = bao_json(f.bao, &["read", &format!("sys/policies/acl/{prefix}sales")]).expect("sales policy");
    let text = sales_policy["data"]["policy"].as_str().unwrap();
    let doc: Value = serde_json::from_str(text).unwrap();
    assert_eq!(doc["path"][format!("secret/data/{ns}/sales/*")]["capabilities"], json!(["list", "read"]));
    assert_eq!(doc["path"][format!("{}/creds/{prefix}sales", f.db_mount)]["capabilities"], json!(["read"]));
    let role = bao_json(f.bao, &["read", &format!("auth/{}/role/{prefix}sales", f.auth_mount)]).expect("auth role");
    assert_eq!(role["data"]["bound_service_account_names"], json!(["sales-app"]));
    assert_eq!(role["data"]["bound_service_account_namespaces"], json!([ns]));
    assert_eq!(role["data"]["token_policies"], json!([format!("{prefix}sales")]));
    let mut db_roles = bao_list(f.bao, &format!("{}/roles", f.db_mount));
    db_roles.sort();
    assert_eq!(db_roles, [format!("{prefix}finance"), format!("{prefix}sales")]);

    // Real SQL with the delivered credentials: each team sees its own tables only.
    let sales_secret = secret(&secrets, "crm-access-sales-db").await;
    let finance_secret = secret(&secrets, "crm-access-finance-db").await;
    let (su, sp) = creds(&sales_secret);
    let (fu, fp) = creds(&finance_secret);
    let mut seen_passwords = vec![sp.clone(), fp.clone(), f.pg.password.clone()];
    assert_eq!(f.pg.try_sql_as(&f.db, &su, &sp, "SELECT count(*) FROM accounts").as_deref(), Ok("7"));
    assert_eq!(f.pg.try_sql_as(&f.db, &su, &sp, "SELECT count(*) FROM contacts").as_deref(), Ok("20"));
    let refused = f.pg.try_sql_as(&f.db, &su, &sp, "SELECT count(*) FROM invoices").unwrap_err();
    assert!(refused.contains("permission denied"), "{refused}");
    assert!(f.pg.try_sql_as(&f.db, &su, &sp, "UPDATE deals SET amount = 1").unwrap_err().contains("permission denied"));
    assert_eq!(f.pg.try_sql_as(&f.db, &fu, &fp, "SELECT count(*) FROM invoices").as_deref(), Ok("3"));
    assert!(
        f.pg.try_sql_as(&f.db, &fu, &fp, "SELECT count(*) FROM accounts").unwrap_err().contains("permission denied")
    );
    let expires =
        ap.status.as_ref().unwrap().teams.iter().find(|t| t.name == "sales").unwrap().credentials_expire_at.clone();
    let expires = expires.expect("status names the expiry").0.as_second() as f64;
    let series = format!(
        "crmguard_credentials_expiry_timestamp_seconds{{namespace=\"{ns}\",name=\"crm-access\",team=\"sales\"}}"
    );
    assert_eq!(op.metric(&series), Some(expires), "the expiry is on /metrics for CredentialsExpiring");

    // The listed workload got one restart for this credential generation.
    let annotation = crmguard::controllers::access_policy::vault_sync::restart_annotation("crm-access", "sales");
    let restart_of = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(&annotation).cloned())
    };
    let d1 = eventually(30, "the restart annotation", || async {
        let d = deployments.get("sales-reports").await.map_err(|e| e.to_string())?;
        restart_of(&d).map(|_| d).ok_or_else(|| "not yet".to_string())
    })
    .await;
    let issued_1 = restart_of(&d1).unwrap();

    // Rotation: sales gains UPDATE on deals -> new credentials that can update; the old ones die after 3 s.
    let p = policy(&f, &ns, true, None);
    aps.patch("crm-access", &PatchParams::default(), &Patch::Merge(&json!({"spec": p["spec"]}))).await.unwrap();
    ready(&aps, &op, 2).await;
    let rotated = eventually(30, "new sales credentials", || async {
        let s = secrets.get("crm-access-sales-db").await.map_err(|e| e.to_string())?;
        if creds(&s).0 != su { Ok(s) } else { Err("same user".into()) }
    })
    .await;
    let (su2, sp2) = creds(&rotated);
    seen_passwords.push(sp2.clone());
    assert_eq!(f.pg.try_sql_as(&f.db, &su2, &sp2, "UPDATE deals SET amount = amount WHERE id = 1").as_deref(), Ok(""));
    assert!(
        f.pg.try_sql_as(&f.db, &su2, &sp2, "SELECT count(*) FROM invoices").unwrap_err().contains("permission denied")
    );
    eventually(30, "the old sales credential to stop working", || async {
        match f.pg.try_sql_as(&f.db, &su, &sp, "SELECT 1") {
            Err(_) => Ok(()),
            Ok(_) => Err("still works".to_string()),
        }
    })
    .await;
    let d2 = eventually(30, "one more restart", || async {
        let d = deployments.get("sales-reports").await.map_err(|e| e.to_string())?;
        if restart_of(&d) != Some(issued_1.clone()) { Ok(d) } else { Err("not yet".into()) }
    })
    .await;
    let gen2 = d2.metadata.generation.unwrap();
    assert_eq!(gen2, d1.metadata.generation.unwrap() + 1, "one rotation = one restart");
    // Finance was not rotated.
    assert_eq!(creds(&secrets.get("crm-access-finance-db").await.unwrap()).0, fu);

    // An operator restart alone restarts nothing and issues nothing.
    let mut logs = op.logs();
    drop(op);
    op = Operator::start_with_env(&kubeconfig, &args, &env);
    op.wait_ready(60).await;
    eventually(60, "the new operator to reconcile the policy", || async {
        match op.metric("crmguard_reconcile_total{controller=\"accesspolicy\"}") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    ready(&aps, &op, 2).await;
    let d3 = deployments.get("sales-reports").await.unwrap();
    assert_eq!(d3.metadata.generation, Some(gen2), "no restart from an operator restart");
    assert_eq!(creds(&secrets.get("crm-access-sales-db").await.unwrap()).0, su2);

    // Expiring grants: present until their time, then gone from RBAC and Vault, with an Event.
    let at = now_plus(8);
    let p = policy(&f, &ns, true, Some(&at));
    aps.patch("crm-access", &PatchParams::default(), &Patch::Merge(&json!({"spec": p["spec"]}))).await.unwrap();
    ready(&aps, &op, 3).await;
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    let policy_text = || {
        bao_json(f.bao, &["read", &format!("sys/policies/acl/{prefix}sales")])
            .and_then(|v| v["data"]["policy"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    assert!(policy_text().contains("break-glass"), "the grant is live until {at}");
    let role_rules = || async { serde_json::to_string(&roles.get("crm-access-sales").await.unwrap().rules).unwrap() };
    assert!(role_rules().await.contains("configmaps"));
    eventually(60, "the expired grants to leave RBAC and Vault", || async {
        let (v, k) = (policy_text(), role_rules().await);
        if !v.contains("break-glass") && !k.contains("configmaps") && v.contains(&format!("secret/data/{ns}/sales/*")) {
            Ok(())
        } else {
            Err(format!("vault: {v}; rbac: {k}"))
        }
    })
    .await;
    // The status is written right after the children and Vault: wait for it too.
    let expired = eventually(30, "status to list the expired grants", || async {
        let ap = aps.get("crm-access").await.map_err(|e| e.to_string())?;
        let sales = ap.status.unwrap_or_default().teams.into_iter().find(|t| t.name == "sales").unwrap_or_default();
        if sales.expired_grants.len() == 2 {
            Ok(sales.expired_grants)
        } else {
            Err(format!("{:?}", sales.expired_grants))
        }
    })
    .await;
    assert!(
        expired.iter().any(|g| g.contains("break-glass")) && expired.iter().any(|g| g.contains("configmaps")),
        "{expired:?}"
    );

    // Deletion: the finalizer revokes every lease and removes every Vault object of the policy.
    aps.delete("crm-access", &DeleteParams::default()).await.unwrap();
    eventually(60, "the AccessPolicy to be gone", || async {
        match aps.get_opt("crm-access").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(ap) => Err(format!("still there: {:?}; {}", ap.metadata.finalizers, tail(&op.logs()))),
        }
    })
    .await;
    let leftovers: Vec<String> = [
        bao_list(f.bao, "sys/policies/acl"),
        bao_list(f.bao, &format!("auth/{}/role", f.auth_mount)),
        bao_list(f.bao, &format!("{}/roles", f.db_mount)),
    ]
    .concat()
    .into_iter()
    .filter(|n| n.starts_with(&prefix))
    .collect();
    assert!(leftovers.is_empty(), "left in Vault: {leftovers:?}");
    for (user, pass) in [(&su2, &sp2), (&fu, &fp)] {
        assert!(f.pg.try_sql_as(&f.db, user, pass, "SELECT 1").is_err(), "{user} was revoked");
    }
    let roles_left =
        f.pg.sql("postgres", &format!("SELECT count(*) FROM pg_roles WHERE rolname IN ('{su}', '{su2}', '{fu}')"));
    assert_eq!(roles_left, "0", "revocation dropped the database roles");

    // No credential in any log line.
    logs.push_str(&op.logs());
    for p in &seen_passwords {
        assert!(!logs.contains(p.as_str()), "a credential value appears in the operator's log");
    }
}

async fn ready(aps: &Api<AccessPolicy>, op: &Operator, generation: i64) -> AccessPolicy {
    eventually(90, "AccessPolicy Ready=True", || async {
        let ap = aps.get("crm-access").await.map_err(|e| e.to_string())?;
        let st = ap.status.clone().unwrap_or_default();
        match cond(&ap, "Ready") {
            Some((s, _, _)) if s == "True" && st.observed_generation == Some(generation) => Ok(ap),
            other => Err(format!("{other:?} {:?}; log tail: {}", st.conditions, tail(&op.logs()))),
        }
    })
    .await
}

fn tail(log: &str) -> String {
    e2e::last_lines(log, 15)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_or_unreachable_vault_is_reported_and_recovered_from() {
    let cluster = Cluster::start("access-sealed").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let bao = OpenBao::start_private();
    let closed = format!("http://127.0.0.1:{}", e2e::free_port());
    // Policies name their own Vault here, so the operator must be allowed to log in to both.
    let allowed = format!("{},{closed}", bao.addr());
    let args = ["--leader-election=false", "--namespace", &ns, "--vault-allowed-address", &allowed];
    let op = Operator::start_with_env(&cluster.kubeconfig, &args, &[("VAULT_TOKEN", bao.token.as_str())]);
    op.wait_ready(60).await;
    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    let mk = |name: &str, addr: &str| -> AccessPolicy {
        serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"vault": {"address": addr}, "teams": [{
                "name": "support", "subjects": [{"kind": "Group", "name": "support"}],
                "vault": [{"path": format!("secret/data/{ns}/support/*"), "capabilities": ["read"]}],
            }]},
        }))
        .unwrap()
    };
    aps.create(&PostParams::default(), &mk("ok", &bao.addr())).await.unwrap();
    aps.create(&PostParams::default(), &mk("nowhere", &closed)).await.unwrap();
    let wait = |name: &'static str, want: (&'static str, &'static str)| {
        let aps = aps.clone();
        async move {
            eventually(60, &format!("{name}: VaultConfigured {want:?}"), || async {
                let ap = aps.get(name).await.map_err(|e| e.to_string())?;
                match cond(&ap, "VaultConfigured") {
                    Some((s, r, m)) if (s.as_str(), r.as_str()) == want => Ok(m),
                    other => Err(format!("{other:?}")),
                }
            })
            .await
        }
    };
    wait("ok", ("True", "Synced")).await;
    let m = wait("nowhere", ("False", "VaultUnreachable")).await;
    assert!(m.contains(&closed), "{m}");

    bao.cli(&["operator", "seal"]).unwrap();
    // Any event makes the operator look again (it also retries on its own within its resync).
    aps.patch("ok", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"annotations": {"poke": "1"}}})))
        .await
        .unwrap();
    let m = wait("ok", ("False", "VaultSealed")).await;
    assert!(m.contains("sealed"), "{m}");
    let ready = cond(&aps.get("ok").await.unwrap(), "Ready").unwrap();
    assert_eq!((ready.0.as_str(), ready.1.as_str()), ("False", "VaultSealed"));
    let mut child = op;
    assert!(child.child.try_wait().unwrap().is_none(), "the operator keeps running");
    bao.cli(&["operator", "unseal", &bao.unseal_key()]).unwrap();
    // Recovery needs no poke: the operator retries by itself.
    wait("ok", ("True", "Synced")).await;
    assert!(child.child.try_wait().unwrap().is_none());
    assert!(!child.logs().contains(&bao.unseal_key()));
    let _ = &mut child;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_connection_gets_mysql_grants_on_exactly_the_teams_tables() {
    let cluster = Cluster::start("access-mysql").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let (bao, maria) = (OpenBao::shared(), e2e::services::MariaDb::shared());
    let id = std::process::id();
    let db = format!("crm_m{id}");
    maria.sql(
        "mysql",
        &format!(
            "CREATE DATABASE {db}; CREATE TABLE {db}.accounts (id int PRIMARY KEY); \
             CREATE TABLE {db}.invoices (id int PRIMARY KEY); INSERT INTO {db}.invoices VALUES (1), (2);"
        ),
    );
    // The connection is configured in Vault by hand here (no connectionSecretRef): crmguard learns the engine
    // from its plugin_name.
    let mount = format!("dbm-{id}");
    bao.mysql_connection(&mount, maria);
    let op = Operator::start_with_env(
        &cluster.kubeconfig,
        &["--leader-election=false", "--namespace", &ns, "--vault-addr", &bao.addr()],
        &[("VAULT_TOKEN", bao.token.as_str())],
    );
    op.wait_ready(60).await;
    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    let ap: AccessPolicy = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "crm-access", "namespace": ns},
        "spec": {"vault": {"databaseMount": mount}, "teams": [{
            "name": "finance", "subjects": [{"kind": "Group", "name": "finance"}],
            "database": {"connection": "crm", "grants": [{"schema": db, "tables": ["invoices"], "privileges": ["SELECT"]}]},
            "credentials": {"secretName": "finance-mysql"},
        }]},
    }))
    .unwrap();
    aps.create(&PostParams::default(), &ap).await.unwrap();
    ready(&aps, &op, 1).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let (user, pass) = creds(&secret(&secrets, "finance-mysql").await);
    assert_eq!(maria.try_sql_as("", &user, &pass, &format!("SELECT count(*) FROM {db}.invoices")).as_deref(), Ok("2"));
    let refused = maria.try_sql_as("", &user, &pass, &format!("SELECT count(*) FROM {db}.accounts")).unwrap_err();
    assert!(refused.contains("denied"), "{refused}");
    // Deleting the policy revokes the lease: the MySQL user is dropped.
    aps.delete("crm-access", &DeleteParams::default()).await.unwrap();
    eventually(60, "the MySQL user to be dropped", || async {
        match maria.try_sql_as("", &user, &pass, "SELECT 1") {
            Err(_) => Ok(()),
            Ok(_) => Err("still logs in".to_string()),
        }
    })
    .await;
    assert!(!op.logs().contains(&pass), "a credential value appears in the operator's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_in_place_at_the_configured_fraction() {
    let (cluster, client, ns, f, secrets) = start("access-renew", "r").await;
    let op = Operator::start_with_env(
        &cluster.kubeconfig,
        &["--leader-election=false", "--namespace", &ns, "--vault-addr", &f.bao.addr()],
        &[("VAULT_TOKEN", f.bao.token.as_str())],
    );
    op.wait_ready(60).await;
    // A 1-minute lease renewed at 10 %: every ~6 s, same credential, later expiry.
    let mut p = policy(&f, &ns, false, None);
    p["spec"]["teams"][0]["credentials"] = json!({"ttl": "1m", "maxTtl": "1h", "renewAtPercent": 10});
    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    aps.create(&PostParams::default(), &serde_json::from_value(p).unwrap()).await.unwrap();
    ready(&aps, &op, 1).await;
    let annotations = |s: &Secret| s.metadata.annotations.clone().unwrap_or_default();
    let first = secret(&secrets, "crm-access-sales-db").await;
    let (a1, (user, pass)) = (annotations(&first), creds(&first));
    let renewed = eventually(40, "a renewal", || async {
        let s = secrets.get("crm-access-sales-db").await.map_err(|e| e.to_string())?;
        let a = annotations(&s);
        if a.get("crmguard.io/renewed-at") != a1.get("crmguard.io/renewed-at") { Ok(s) } else { Err("not yet".into()) }
    })
    .await;
    let a2 = annotations(&renewed);
    assert_eq!(creds(&renewed), (user.clone(), pass.clone()), "renewal keeps the credential");
    assert_eq!(a2["crmguard.io/lease-id"], a1["crmguard.io/lease-id"]);
    assert_eq!(a2["crmguard.io/issued-at"], a1["crmguard.io/issued-at"]);
    let exp = |a: &std::collections::BTreeMap<String, String>| {
        a["crmguard.io/expires-at"].parse::<jiff::Timestamp>().unwrap()
    };
    assert!(exp(&a2) > exp(&a1), "the lease was extended: {} -> {}", exp(&a1), exp(&a2));
    assert_eq!(f.pg.try_sql_as(&f.db, &user, &pass, "SELECT count(*) FROM deals").as_deref(), Ok("5"));
    // Vault agrees: the lease's expiry moved.
    let lease =
        bao_json(f.bao, &["write", "sys/leases/lookup", &format!("lease_id={}", a2["crmguard.io/lease-id"])]).unwrap();
    let vault_expiry: jiff::Timestamp = lease["data"]["expire_time"].as_str().unwrap().parse().unwrap();
    assert!((vault_expiry.as_second() - exp(&a2).as_second()).abs() <= 2, "{vault_expiry} vs {}", exp(&a2));
    assert!(!op.logs().contains(&pass));
}

/// The README's Vault policy for the operator, with this test's mounts.
fn documented_operator_policy(auth_mount: &str, db_mount: &str) -> String {
    let readme = std::fs::read_to_string(e2e::repo_root().join("README.md")).unwrap();
    let start = readme.find("```hcl\n").expect("the README documents the operator's Vault policy") + 7;
    let end = start + readme[start..].find("```").unwrap();
    readme[start..end]
        .replace("auth/kubernetes/", &format!("auth/{auth_mount}/"))
        .replace("\"database/", &format!("\"{db_mount}/"))
}

/// The operator logs in to OpenBao with its ServiceAccount token (signed by the real API server), which OpenBao
/// checks with the API server's TokenReview, and the README's Vault policy is all it needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_logs_in_with_kubernetes_auth_and_the_documented_policy_suffices() {
    let cluster = Cluster::start("access-k8s-auth").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    // The operator's identity: the chart's ServiceAccount crmguard-system/crmguard with the chart's RBAC.
    let kubeconfig = e2e::install_chart_rbac(&cluster, e2e::Admission::WithoutPolicy).await;
    // Vault reviews tokens with a ServiceAccount of its own that may create TokenReviews, as documented for
    // Vault's Kubernetes auth.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    sas.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "vault-auth"}})).unwrap())
        .await
        .unwrap();
    let crb: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{ns}-vault-auth")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
        "subjects": [{"kind": "ServiceAccount", "name": "vault-auth", "namespace": ns}],
    }))
    .unwrap();
    Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &crb)
        .await
        .unwrap();
    let reviewer = e2e::ControlPlane::token_for(&client, &ns, "vault-auth", &[]).await;
    let f = Fixture::new("k");
    // The connection configured by hand, as the documented policy only reads connections.
    f.bao
        .cli(&[
            "write",
            &format!("{}/config/crm", f.db_mount),
            "plugin_name=postgresql-database-plugin",
            &format!(
                "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/{}?sslmode=disable",
                f.pg.port, f.db
            ),
            &format!("username={}", f.pg.user),
            &format!("password={}", f.pg.password),
            "allowed_roles=*",
        ])
        .unwrap();
    // The operator's identity in Vault: exactly the README's policy, bound to its ServiceAccount.
    let dir = e2e::TempDir::new("k8s-auth");
    let policy_file = dir.path.join("operator.hcl");
    std::fs::write(&policy_file, documented_operator_policy(&f.auth_mount, &f.db_mount)).unwrap();
    f.bao.cli(&["policy", "write", "crmguard-operator-e2e", policy_file.to_str().unwrap()]).unwrap();
    let op_mount = format!("k8s-op-{}", std::process::id());
    f.bao.cli(&["auth", "enable", &format!("-path={op_mount}"), "kubernetes"]).unwrap();
    f.bao
        .cli(&[
            "write",
            &format!("auth/{op_mount}/config"),
            &format!("kubernetes_host={}", cluster.cp.server),
            &format!("token_reviewer_jwt={reviewer}"),
            "disable_local_ca_jwt=true",
            &format!("kubernetes_ca_cert={}", cluster.cp.ca_pem),
        ])
        .unwrap();
    f.bao
        .cli(&[
            "write",
            &format!("auth/{op_mount}/role/crmguard-operator"),
            "bound_service_account_names=crmguard",
            "bound_service_account_namespaces=crmguard-system",
            "token_policies=crmguard-operator-e2e",
            "token_ttl=20m",
        ])
        .unwrap();
    // The operator's ServiceAccount token, as its pod would have it (signed by the API server).
    let jwt = dir.path.join("token");
    std::fs::write(&jwt, e2e::ControlPlane::token_for(&client, "crmguard-system", "crmguard", &[]).await).unwrap();
    let addr = f.bao.addr();
    let op = Operator::start(
        &kubeconfig,
        &[
            "--leader-election=false",
            "--namespace",
            &ns,
            "--vault-addr",
            &addr,
            "--vault-auth-mount",
            &op_mount,
            "--vault-role",
            "crmguard-operator",
            "--vault-token-file",
            jwt.to_str().unwrap(),
        ],
    );
    op.wait_ready(60).await;
    let mut p = policy(&f, &ns, false, None);
    p["spec"]["vault"].as_object_mut().unwrap().remove("connectionSecretRef");
    p["spec"]["teams"][0]["credentials"].as_object_mut().unwrap().remove("restartWorkloads");
    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    aps.create(&PostParams::default(), &serde_json::from_value(p).unwrap()).await.unwrap();
    ready(&aps, &op, 1).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let (user, pass) = creds(&secret(&secrets, "crm-access-sales-db").await);
    assert_eq!(f.pg.try_sql_as(&f.db, &user, &pass, "SELECT count(*) FROM accounts").as_deref(), Ok("7"));
    // Cleanup works with the same identity and policy.
    aps.delete("crm-access", &DeleteParams::default()).await.unwrap();
    eventually(60, "the AccessPolicy to be gone", || async {
        match aps.get_opt("crm-access").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err(tail(&op.logs())),
        }
    })
    .await;
    assert!(f.pg.try_sql_as(&f.db, &user, &pass, "SELECT 1").is_err(), "the lease was revoked");
    assert!(!op.logs().contains(&pass));
}

/// Without the chart's admission policy (turned off, or an AccessPolicy written before the ceiling narrowed),
/// the operator itself refuses what the cluster administrator does not allow: a Kubernetes grant beyond the
/// grant ceiling ClusterRole (the attack of issue 15: a user bound to `*` on `*/*`), a Vault path outside the
/// namespace's prefixes, and a Vault address it would have to present its own credentials to. Nothing is
/// applied, and nothing connects to that address. Behind it, the API server refuses the operator's own identity
/// any Role beyond the ceiling: the chart gives it no escalate or bind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_beyond_the_administrators_limits_are_refused_and_nothing_is_applied() {
    let cluster = Cluster::start("access-limits").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let kubeconfig = e2e::install_chart_rbac(&cluster, e2e::Admission::WithoutPolicy).await;
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_addr = format!("http://{}", trap.local_addr().unwrap());
    let op = Operator::start(&kubeconfig, &["--leader-election=false", "--namespace", &ns]);
    op.wait_ready(60).await;
    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    let mallory = json!([{"kind": "User", "name": "mallory"}]);
    let mk = |name: &str, team: Value, vault: Option<Value>| {
        e2e::one_team_policy(&ns, name, "ops", mallory.clone(), team, vault)
    };
    let cases = [
        (
            mk("everything", json!({"kubernetes": [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]}), None),
            "BeyondGrantCeiling",
            vec!["spec.teams[0].kubernetes[0]: grants * on */* beyond the grant ceiling (ClusterRole crmguard-grantable)".to_string()],
        ),
        (
            mk(
                "secrets",
                json!({"kubernetes": [{"resources": ["pods"], "verbs": ["get"]},
                                      {"resources": ["secrets"], "verbs": ["get", "list"]}]}),
                None,
            ),
            "BeyondGrantCeiling",
            vec!["spec.teams[0].kubernetes[1]: grants get,list on core/secrets beyond".to_string()],
        ),
        (
            mk("vault-sys", json!({"vault": [{"path": "sys/*", "capabilities": ["read"]}]}), Some(json!({}))),
            "InvalidSpec",
            vec![format!("spec.teams[0].vault[0].path: \"sys/*\" is outside the Vault paths AccessPolicies may grant: paths must start with secret/data/{ns}/ or secret/metadata/{ns}/")],
        ),
        (
            mk(
                "vault-elsewhere",
                json!({"vault": [{"path": format!("secret/data/{ns}/x"), "capabilities": ["read"]}]}),
                Some(json!({"address": trap_addr})),
            ),
            "InvalidSpec",
            vec!["spec.vault.address: \"".to_string() + &trap_addr + "\" is not a Vault the operator may log in to"],
        ),
    ];
    for (ap, _, _) in &cases {
        aps.create(&PostParams::default(), ap).await.unwrap();
    }
    for (ap, reason, wants) in &cases {
        let name = ap.metadata.name.clone().unwrap();
        let got = eventually(30, &format!("{name} to be refused"), || async {
            let ap = aps.get(&name).await.map_err(|e| e.to_string())?;
            match cond(&ap, "Ready") {
                Some((s, r, m)) if s == "False" && r == *reason => Ok(m),
                other => Err(format!("{other:?}\n{}", tail(&op.logs()))),
            }
        })
        .await;
        for want in wants {
            assert!(got.contains(want.as_str()), "{name}: {got}\nwants: {want}");
        }
        if name == "secrets" {
            assert!(!got.contains("kubernetes[0]"), "the grant within the ceiling is not named: {got}");
        }
    }
    let roles: Api<Role> = Api::namespaced(client.clone(), &ns);
    assert!(roles.list(&Default::default()).await.unwrap().items.is_empty(), "no Role was applied");
    assert!(
        matches!(trap.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing connected to the address the operator may not log in to"
    );
    let mallory = e2e::ControlPlane::client_for(&cluster.cp.kubeconfig_for("mallory", &["crm-visitors"])).await;
    let r = Api::<Secret>::namespaced(mallory, &ns).list(&Default::default()).await;
    assert!(matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403), "mallory reads no Secret: {r:?}");

    // The backstop: the operator's own identity may create a Role within the ceiling, and the API server's
    // escalation check refuses one beyond the ceiling and the operator's own rights (it reads Secrets by name
    // only, never lists them).
    let as_operator: Api<Role> = Api::namespaced(e2e::ControlPlane::client_for(&kubeconfig).await, &ns);
    let role = |name: &str, resource: &str, verb: &str| -> Role {
        serde_json::from_value(json!({"metadata": {"name": name},
            "rules": [{"apiGroups": [""], "resources": [resource], "verbs": [verb]}]}))
        .unwrap()
    };
    as_operator.create(&PostParams::default(), &role("within", "pods", "list")).await.unwrap();
    let r = as_operator.create(&PostParams::default(), &role("beyond", "secrets", "list")).await;
    assert!(
        matches!(r, Err(kube::Error::Api(ref s)) if s.code == 403 && s.message.contains("attempting to grant RBAC permissions not currently held")),
        "the API server refuses the operator a Role beyond the ceiling: {r:?}"
    );
}
