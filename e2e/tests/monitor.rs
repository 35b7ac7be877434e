//! The access monitor's collection against real databases (issue 18, in progress): PostgreSQL 15 with pgaudit and
//! MariaDB with its audit plugin. The entries they write are read from their logs, attributed to the database user
//! that ran them, classed and tied to the table, and keep no value of the statements (expected classes and objects
//! from the plugins' documentation).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a test failure

use crmguard::monitor::pgaudit::{self, Class};
use crmguard::monitor::server_audit;
use e2e::services::{MariaDb, Postgres};

#[tokio::test]
async fn pgaudit_entries_are_read_attributed_and_keep_no_value() {
    let pg = Postgres::audited(&["pgaudit.log=read,write,ddl,role", "pgaudit.log_relation=on"]);
    pg.sql(
        "postgres",
        "CREATE EXTENSION pgaudit; CREATE SCHEMA crm; CREATE TABLE crm.invoices (id int, customer text, amount numeric);
         CREATE ROLE sales LOGIN PASSWORD 'sales-Pw-1'; GRANT USAGE ON SCHEMA crm TO sales;
         GRANT SELECT, INSERT ON crm.invoices TO sales;",
    );
    let secret = "ACME Secret Customer";
    let sales = |sql: &str| pg.try_sql_as("postgres", "sales", "sales-Pw-1", sql).unwrap();
    sales(&format!("INSERT INTO crm.invoices VALUES (7, '{secret}', 1234.5)"));
    sales(&format!("SELECT *\nFROM crm.invoices\nWHERE customer = '{secret}' AND amount > 1000"));
    let entries = e2e::eventually(10, "the entries in the log", || async {
        let log = std::fs::read_to_string(&pg.log).map_err(|e| e.to_string())?;
        let entries: Vec<pgaudit::Entry> = pgaudit::records(&log).iter().filter_map(|r| pgaudit::parse(r)).collect();
        let read = entries.iter().any(|e| e.user == "sales" && e.class == Class::Read);
        if read { Ok(entries) } else { Err(format!("{} entries", entries.len())) }
    })
    .await;
    let of = |user: &str, class: Class| -> Vec<&pgaudit::Entry> {
        entries.iter().filter(|e| e.user == user && e.class == class).collect()
    };
    let ddl = of("postgres", Class::Ddl);
    assert!(ddl.iter().any(|e| e.command == "CREATE TABLE" && e.object_name == "crm.invoices"), "{ddl:?}");
    let role = of("postgres", Class::Role);
    assert!(role.iter().any(|e| e.command == "GRANT"), "{role:?}");
    // pgaudit hides the password in the CREATE ROLE entry only; the GRANT entries carry the whole query text.
    assert!(role.iter().all(|e| !e.statement.contains("sales-Pw-1")), "no password: {role:?}");
    let write = of("sales", Class::Write);
    assert_eq!(write.len(), 1, "{write:?}");
    assert_eq!((write[0].command.as_str(), write[0].object_name.as_str()), ("INSERT", "crm.invoices"));
    assert_eq!(write[0].statement, "INSERT INTO crm.invoices VALUES (?, ?, ?)");
    let read = of("sales", Class::Read);
    assert_eq!(read.len(), 1, "{read:?}");
    assert_eq!((read[0].command.as_str(), read[0].object_type.as_str()), ("SELECT", "TABLE"));
    assert_eq!(read[0].object_name, "crm.invoices");
    assert_eq!(read[0].statement, "SELECT *\nFROM crm.invoices\nWHERE customer = ? AND amount > ?");
    assert!(entries.iter().all(|e| e.database == "postgres"));
    assert!(!format!("{entries:?}").contains(secret), "no value of a statement is kept");
}

#[tokio::test]
async fn mariadb_audit_events_are_read_attributed_and_keep_no_value() {
    let db = MariaDb::audited();
    db.sql(
        "",
        "CREATE DATABASE crm; CREATE TABLE crm.invoices (id int, customer text, amount decimal(10,2));
         CREATE USER 'sales'@'%' IDENTIFIED BY 'sales-Pw-2'; GRANT SELECT, INSERT ON crm.invoices TO 'sales'@'%';",
    );
    let secret = "ACME Secret Customer";
    let sales = |sql: &str| db.try_sql_as("crm", "sales", "sales-Pw-2", sql);
    sales(&format!("INSERT INTO invoices VALUES (7, '{secret}', 1234.5)")).unwrap();
    sales(&format!("SELECT *\nFROM invoices\nWHERE customer = \"{secret}\" AND amount > 1000")).unwrap();
    assert!(db.try_sql_as("crm", "sales", "wrong-password", "SELECT 1").is_err());
    let events = e2e::eventually(10, "the events in the audit log", || async {
        let log = std::fs::read_to_string(&db.audit_log).map_err(|e| e.to_string())?;
        let events: Vec<server_audit::Event> = log.lines().filter_map(server_audit::parse).collect();
        let failed = events.iter().any(|e| e.user == "sales" && e.operation == "FAILED_CONNECT");
        if failed { Ok(events) } else { Err(format!("{} events:\n{log}", events.len())) }
    })
    .await;
    let of = |op: &str| -> Vec<&server_audit::Event> {
        events.iter().filter(|e| e.user == "sales" && e.operation == op).collect()
    };
    assert!(of("READ").iter().any(|e| (e.database.as_str(), e.object.as_str()) == ("crm", "invoices")), "{events:?}");
    assert!(of("WRITE").iter().any(|e| (e.database.as_str(), e.object.as_str()) == ("crm", "invoices")), "{events:?}");
    let queries: Vec<&str> = of("QUERY").iter().map(|e| e.object.as_str()).collect();
    assert!(queries.contains(&"INSERT INTO invoices VALUES (?, ?, ?)"), "{queries:?}");
    assert!(queries.contains(&"SELECT *\nFROM invoices\nWHERE customer = ? AND amount > ?"), "{queries:?}");
    assert_eq!(of("FAILED_CONNECT")[0].retcode, Some(1045), "access denied");
    assert!(!format!("{events:?}").contains(secret), "no value of a query is kept");
    assert!(!format!("{events:?}").contains("sales-Pw-2"), "no password is kept");
}

/// The whole path on real things: PostgreSQL 15 with pgaudit writes its log; a test node serves it as the database
/// pod's container log; the operator reads it through the real API server (`pods/log`), attributes the sales team's
/// short-lived credential (issued by an AccessPolicy through OpenBao) to the team, keeps quiet during the team's
/// normal work, and reports (status, Events, the access stream of the audit trail) a bulk read of the invoices, a
/// read the database refused, DDL outside any change window and a user nobody issued. Expected findings from the
/// AccessMonitor's rules as documented (api::access_monitor::Rules), not from the code's output. No value of a
/// statement and no password appears in status, Events, the operator's log or the audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_team_credential_exfiltrating_invoices_is_attributed_and_reported() {
    use crmguard::api::AccessPolicy;
    use crmguard::api::access_monitor::{AccessMonitor, FindingRule};
    use e2e::services::OpenBao;
    use e2e::{Cluster, Operator, eventually};
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, ListParams, PostParams};
    use serde_json::json;

    let cluster = Cluster::start("monitor-pg").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let pg = Postgres::audited(&["pgaudit.log=read,write,ddl,role", "pgaudit.log_relation=on"]);
    let bao = OpenBao::shared();
    let id = format!("m{}", std::process::id());
    let secret = "ACME Secret Customer";
    pg.sql("postgres", "CREATE DATABASE crm");
    pg.sql(
        "crm",
        &format!(
            "CREATE EXTENSION pgaudit;
             CREATE TABLE invoices (id int PRIMARY KEY, customer text, total numeric);
             CREATE TABLE contacts (id int PRIMARY KEY, email text);
             CREATE TABLE payroll (id int PRIMARY KEY, salary numeric);
             INSERT INTO invoices SELECT i, '{secret}', i * 42 FROM generate_series(1, 50) i;
             INSERT INTO contacts SELECT i, 'c' || i || '@example.com' FROM generate_series(1, 20) i;
             CREATE ROLE mallory LOGIN PASSWORD 'mallory-Pw-1'; GRANT SELECT ON contacts TO mallory;"
        ),
    );
    let (auth_mount, db_mount) = (format!("k8s-{id}"), format!("db-{id}"));
    bao.cli(&["auth", "enable", &format!("-path={auth_mount}"), "kubernetes"]).unwrap();
    bao.cli(&["secrets", "enable", &format!("-path={db_mount}"), "database"]).unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let url = format!("postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/crm?sslmode=disable", pg.port);
    let connection: Secret = serde_json::from_value(json!({
        "metadata": {"name": "crm-vault-connection", "namespace": ns},
        "stringData": {"connection_url": url, "username": pg.user, "password": pg.password},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &connection).await.unwrap();

    // The database pod, its log served by a node as a kubelet serves it.
    let node = e2e::nodelog::LogNode::start(&client, &format!("node-{ns}")).await;
    node.pod(&client, &ns, "crm-db-0", &[("app", "crm-db")], "postgres", &pg.log).await;

    let addr = bao.addr();
    let args = ["--leader-election=false", "--namespace", &ns, "--vault-addr", &addr];
    let audit_dir = e2e::TempDir::new("audit");
    let audit_path = audit_dir.path.display().to_string();
    let mut all_args = args.to_vec();
    all_args.extend(["--audit-dir", &audit_path, "--audit-flush-seconds", "1"]);
    let kubeconfig = e2e::install_chart_rbac(&cluster, e2e::Admission::WithoutPolicy).await;
    let op = Operator::start_with_env(&kubeconfig, &all_args, &[("VAULT_TOKEN", bao.token.as_str())]);
    op.wait_ready(60).await;

    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    let ap: AccessPolicy = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "crm-access", "namespace": ns},
        "spec": {
            "vault": {"address": addr, "kubernetesAuthMount": auth_mount, "databaseMount": db_mount,
                      "connectionSecretRef": {"name": "crm-vault-connection", "key": "connection_url"}},
            "teams": [{
                "name": "sales", "subjects": [{"kind": "ServiceAccount", "name": "sales-app"}],
                "database": {"connection": "crm", "grants": [{"tables": ["invoices", "contacts"], "privileges": ["SELECT"]}]},
                "credentials": {},
            }],
        },
    }))
    .unwrap();
    aps.create(&PostParams::default(), &ap).await.unwrap();
    let sales = eventually(90, "the sales team's credentials", || async {
        let s = secrets.get_opt("crm-access-sales-db").await.map_err(|e| e.to_string())?.ok_or("no Secret yet")?;
        let d = s.data.clone().unwrap_or_default();
        let get = |k: &str| String::from_utf8(d.get(k).map(|b| b.0.clone()).unwrap_or_default()).unwrap();
        let annotated = s.metadata.annotations.as_ref().and_then(|a| a.get("crmguard.io/username")).cloned();
        if annotated.as_deref() == Some(get("username").as_str()) {
            Ok((get("username"), get("password")))
        } else {
            Err(format!("the Secret's user annotation {annotated:?}; log: {}", op.logs()))
        }
    })
    .await;
    let (su, sp) = sales;

    let monitors: Api<AccessMonitor> = Api::namespaced(client.clone(), &ns);
    let monitor: AccessMonitor = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
        "metadata": {"name": "crm-db", "namespace": ns},
        "spec": {
            "database": {"engine": "postgres", "podSelector": {"matchLabels": {"app": "crm-db"}}},
            "accessPolicies": ["crm-access"],
            "identities": [{"user": pg.user, "name": "dba (the database owner)"}],
            "interval": "1s",
            "rules": {"ddl": {}, "readVolume": [{"tables": ["public.invoices"], "maxPerMinute": 5}]},
        },
    }))
    .unwrap();
    monitors.create(&PostParams::default(), &monitor).await.unwrap();
    let status = |m: &AccessMonitor| m.status.clone().unwrap_or_default();
    let reading = eventually(60, "the monitor reading the pod's log", || async {
        let m = monitors.get("crm-db").await.map_err(|e| e.to_string())?;
        let c = status(&m).conditions.into_iter().find(|c| c.type_ == "Collecting");
        match c {
            Some(c) if c.status == "True" && c.reason == "Reading" => Ok(m),
            other => Err(format!("{other:?}; log: {}", op.logs())),
        }
    })
    .await;
    assert_eq!(status(&reading).pod.as_deref(), Some("crm-db-0"));

    // Normal work: the team reads what it is granted. Nothing is flagged.
    let as_sales = |sql: &str| pg.try_sql_as("crm", &su, &sp, sql);
    assert_eq!(as_sales("SELECT count(*) FROM contacts").as_deref(), Ok("20"));
    assert_eq!(
        as_sales(&format!("SELECT total FROM invoices WHERE customer = '{secret}' AND id = 7")).as_deref(),
        Ok("294")
    );
    let normal = eventually(30, "the normal reads counted", || async {
        let m = monitors.get("crm-db").await.map_err(|e| e.to_string())?;
        if status(&m).entries.unwrap_or(0) >= 2 { Ok(m) } else { Err(format!("{:?}", status(&m))) }
    })
    .await;
    assert_eq!(status(&normal).findings, vec![], "normal work is not a finding");
    let clean = status(&normal).conditions.into_iter().find(|c| c.type_ == "Clean").unwrap();
    assert_eq!((clean.status.as_str(), clean.reason.as_str()), ("True", "NoFindings"));

    // Exfiltration: invoices read in bulk, a table outside the grants, DDL, and a user nobody issued.
    // 12 reads: whatever minute boundary falls among them, one minute holds more than 5.
    for _ in 0..12 {
        as_sales("SELECT * FROM invoices").unwrap();
    }
    assert!(as_sales("SELECT * FROM payroll").unwrap_err().contains("permission denied"));
    pg.sql("crm", "ALTER TABLE contacts ADD COLUMN note text");
    pg.try_sql_as("crm", "mallory", "mallory-Pw-1", "SELECT email FROM contacts").unwrap();
    let want = [
        (FindingRule::ReadVolume, su.clone(), Some("public.invoices".to_string())),
        (FindingRule::OutsideGrants, su.clone(), Some("payroll".to_string())),
        (FindingRule::DdlOutsideWindow, pg.user.clone(), Some("public.contacts".to_string())),
        (FindingRule::UnknownIdentity, "mallory".to_string(), Some("public.contacts".to_string())),
    ];
    let flagged = eventually(30, "the findings", || async {
        let m = monitors.get("crm-db").await.map_err(|e| e.to_string())?;
        let got: Vec<(FindingRule, String, Option<String>)> =
            status(&m).findings.iter().map(|f| (f.rule, f.user.clone(), f.object.clone())).collect();
        if want.iter().all(|w| got.contains(w)) { Ok(m) } else { Err(format!("{got:?}")) }
    })
    .await;
    let findings = status(&flagged).findings;
    let granted = |f: &&crmguard::api::access_monitor::Finding| {
        f.user == su && f.rule == FindingRule::OutsideGrants && f.object.as_deref() != Some("payroll")
    };
    assert!(!findings.iter().any(|f| granted(&f) && f.object.as_deref() != Some("public.payroll")), "{findings:#?}");
    let volume = findings.iter().find(|f| f.rule == FindingRule::ReadVolume).unwrap();
    assert_eq!(volume.identity, "team sales (AccessPolicy crm-access)");
    assert_eq!(status(&flagged).finding_count, Some(findings.len() as i64));
    let clean = status(&flagged).conditions.into_iter().find(|c| c.type_ == "Clean").unwrap();
    assert_eq!((clean.status.as_str(), clean.reason.as_str()), ("False", "FindingsMade"));
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let notes = eventually(30, "AccessFinding Events", || async {
        let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let notes: Vec<String> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("AccessFinding"))
            .filter_map(|e| e.note)
            .collect();
        if notes.len() >= 4 { Ok(notes) } else { Err(format!("{notes:?}")) }
    })
    .await;
    assert!(notes.iter().any(|n| n.starts_with("ReadVolume: more than 5 reads of public.invoices")), "{notes:?}");

    // The access stream of the audit trail: intact, and it answers "who read the invoices, and was it normal?".
    let cli = |extra: &[&str]| {
        let mut a = vec!["audit", "access", "--audit-dir", audit_path.as_str()];
        a.extend(extra);
        e2e::crmguard(&a)
    };
    let out = eventually(30, "the access records in the audit trail", || async {
        let out = cli(&["--table", "public.invoices", "--team", "sales", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let records: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let reads: u64 = records.iter().filter(|r| r["access"] == "read").filter_map(|r| r["count"].as_u64()).sum();
        let found = records.iter().any(|r| r["finding"] == "ReadVolume");
        if out.status.success() && reads >= 13 && found {
            Ok(text)
        } else {
            Err(format!("{} reads, finding {found}: {text}{}", reads, String::from_utf8_lossy(&out.stderr)))
        }
    })
    .await;
    assert!(out.contains(&su), "{out}");
    let verify = e2e::crmguard(&["audit", "verify", "--audit-dir", &audit_path, "--audit-stream", "operator-access"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let table = cli(&["--team", "sales", "--since", "1h"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains("public.invoices") && table.contains("finding(s)"), "{table}");

    // Nothing of the data, nor any password, left the database through the operator.
    let mut trail = String::new();
    for f in std::fs::read_dir(audit_dir.path.join("crmguard-audit/operator-access")).unwrap() {
        trail.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
    }
    let everything = format!(
        "{}\n{}\n{notes:?}\n{trail}",
        op.logs(),
        serde_json::to_string(&monitors.get("crm-db").await.unwrap()).unwrap()
    );
    for leak in [secret, sp.as_str(), "mallory-Pw-1", pg.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
}
