//! The access monitor against real databases (issue 18): PostgreSQL 15 with pgaudit and MariaDB with its audit
//! plugin. The entries they write are read from their logs, attributed to the database user that ran them and the pod
//! it ran from, classed and tied to the table, and keep no value of the statements (expected classes and objects from
//! the plugins' documentation); rules, statistics, baselines, alerts and reports; exfiltrations detected and contained
//! on both databases.

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
    let entries = eventually(10, "the entries in the log", || async {
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
    let events = eventually(10, "the events in the audit log", || async {
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

use crmguard::api::AccessPolicy;
use crmguard::api::access_monitor::{AccessMonitor, AccessMonitorStatus, FindingRule};
use e2e::services::OpenBao;
use e2e::{Cluster, Operator, eventually};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// A value of the customer data that must never leave the database through crmguard.
const SECRET: &str = "ACME Secret Customer";

/// A namespace with: a real PostgreSQL 15 with pgaudit (database `crm`: invoices, contacts, payroll; a role
/// `mallory` nobody issued), its log served as pod `crm-db-0`'s by a test node; the operator (chart RBAC, an audit
/// directory) with OpenBao; an AccessPolicy whose team sales (ServiceAccount sales-app) may SELECT invoices and
/// contacts, and the sales team's current credentials.
struct Monitored {
    _cluster: Cluster,
    client: kube::Client,
    ns: String,
    pg: Postgres,
    op: Operator,
    /// How the operator was started (to start it again).
    started: (String, Vec<String>),
    audit_dir: e2e::TempDir,
    secrets: Api<Secret>,
    monitors: Api<AccessMonitor>,
    node: e2e::nodelog::LogNode,
}

impl Monitored {
    async fn start(test: &str) -> Monitored {
        Monitored::start_with(test, &[]).await
    }

    /// With more arguments for the operator.
    async fn start_with(test: &str, more: &[&str]) -> Monitored {
        Monitored::start_full(test, more, &[]).await
    }

    /// With more settings for PostgreSQL too.
    async fn start_full(test: &str, more: &[&str], pg_settings: &[String]) -> Monitored {
        let cluster = Cluster::start(test).await;
        let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
        // pg_stat_statements too (the rows read, spec.database.statistics); the later setting overrides audited's.
        let mut settings = vec![
            "pgaudit.log=read,write,ddl,role",
            "pgaudit.log_relation=on",
            "shared_preload_libraries=pgaudit,pg_stat_statements",
        ];
        settings.extend(pg_settings.iter().map(String::as_str));
        let pg = Postgres::audited(&settings);
        let bao = OpenBao::shared();
        let id = format!("{test}-{}", std::process::id());
        pg.sql("postgres", "CREATE DATABASE crm");
        pg.sql(
            "crm",
            &format!(
                "CREATE EXTENSION pgaudit;
                 CREATE TABLE invoices (id int PRIMARY KEY, customer text, total numeric);
                 CREATE TABLE contacts (id int PRIMARY KEY, email text);
                 CREATE TABLE payroll (id int PRIMARY KEY, salary numeric);
                 INSERT INTO invoices SELECT i, '{SECRET}', i * 42 FROM generate_series(1, 50) i;
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
        let audit_dir = e2e::TempDir::new("audit");
        let audit_path = audit_dir.path.display().to_string();
        let mut args = vec![
            "--leader-election=false",
            "--namespace",
            &ns,
            "--vault-addr",
            &addr,
            "--audit-dir",
            &audit_path,
            "--audit-flush-seconds",
            "1",
        ];
        args.extend(more);
        let kubeconfig = e2e::install_chart_rbac(&cluster, e2e::Admission::WithoutPolicy).await;
        let op = Operator::start_with_env(&kubeconfig, &args, &[("VAULT_TOKEN", bao.token.as_str())]);
        op.wait_ready(60).await;
        let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
        let ap: AccessPolicy = serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
            "metadata": {"name": "crm-access", "namespace": ns},
            "spec": {
                "vault": {"address": addr, "kubernetesAuthMount": auth_mount, "databaseMount": db_mount,
                          "connectionSecretRef": {"name": "crm-vault-connection", "key": "connection_url"}},
                "acceptHoldsFrom": ["crm-db"],
                "teams": [{
                    "name": "sales", "subjects": [{"kind": "ServiceAccount", "name": "sales-app"}],
                    "database": {"connection": "crm", "grants": [{"tables": ["invoices", "contacts"], "privileges": ["SELECT"]}]},
                    "credentials": {},
                }],
            },
        }))
        .unwrap();
        aps.create(&PostParams::default(), &ap).await.unwrap();
        let monitors = Api::namespaced(client.clone(), &ns);
        let started = (kubeconfig, args.iter().map(|a| a.to_string()).collect());
        let m = Monitored { _cluster: cluster, client, ns, pg, op, started, audit_dir, secrets, monitors, node };
        m.credentials(None).await;
        m
    }

    /// Stops the operator and starts it again (nothing it kept in memory survives).
    async fn restart_operator(&mut self) {
        self.stop_operator();
        self.start_operator().await;
    }

    fn stop_operator(&mut self) {
        let _ = self.op.child.kill();
        let _ = self.op.child.wait();
    }

    /// Starts the operator again after [`Monitored::stop_operator`].
    async fn start_operator(&mut self) {
        let (kubeconfig, args) = &self.started;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.op = Operator::start_with_env(kubeconfig, &args, &[("VAULT_TOKEN", OpenBao::shared().token.as_str())]);
        self.op.wait_ready(60).await;
    }

    /// The sales team's credentials once its Secret records them (other than `not`).
    async fn credentials(&self, not: Option<&str>) -> (String, String) {
        eventually(90, "the sales team's credentials", || async {
            let s = self.secrets.get_opt("crm-access-sales-db").await.map_err(|e| e.to_string())?.ok_or("no Secret")?;
            let d = s.data.clone().unwrap_or_default();
            let get = |k: &str| String::from_utf8(d.get(k).map(|b| b.0.clone()).unwrap_or_default()).unwrap();
            let annotated = s.metadata.annotations.as_ref().and_then(|a| a.get("crmguard.io/username")).cloned();
            let user = get("username");
            if !user.is_empty() && annotated.as_deref() == Some(user.as_str()) && Some(user.as_str()) != not {
                Ok((user, get("password")))
            } else {
                Err(format!("the Secret's user {user:?}, annotation {annotated:?}; log: {}", tail(&self.op.logs())))
            }
        })
        .await
    }

    /// Creates AccessMonitor `crm-db` with these rules (and response) and waits until it reads the pod's log.
    async fn monitor(&self, rules: Value, response: Option<Value>) {
        self.monitor_with(rules, response, None).await;
    }

    /// With `spec.database.statistics`.
    async fn monitor_with(&self, rules: Value, response: Option<Value>, statistics: Option<Value>) {
        let mut spec = json!({
            "database": {"engine": "postgres", "podSelector": {"matchLabels": {"app": "crm-db"}}},
            "accessPolicies": ["crm-access"],
            "identities": [{"user": self.pg.user, "name": "dba (the database owner)"}],
            "interval": "1s",
            "rules": rules,
        });
        if let Some(r) = response {
            spec["response"] = r;
        }
        if let Some(st) = statistics {
            spec["database"]["statistics"] = st;
        }
        let monitor: AccessMonitor = serde_json::from_value(json!({
            "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
            "metadata": {"name": "crm-db", "namespace": self.ns}, "spec": spec,
        }))
        .unwrap();
        self.monitors.create(&PostParams::default(), &monitor).await.unwrap();
        let reading = self
            .until("the monitor reading the pod's log", |s| {
                s.conditions.iter().any(|c| c.type_ == "Collecting" && c.status == "True" && c.reason == "Reading")
            })
            .await;
        assert_eq!(reading.pod.as_deref(), Some("crm-db-0"));
    }

    /// The monitoring role the statistics log in as (pg_read_all_stats only), and pg_stat_statements in `crm`.
    fn statistics_role(&self) {
        self.pg.sql(
            "crm",
            "CREATE EXTENSION pg_stat_statements;
             CREATE ROLE crm_monitor LOGIN PASSWORD 'monitor-Pw-1' IN ROLE pg_read_all_stats;",
        );
    }

    /// The monitoring role's Secret `crm-db-monitor` (CloudNativePG's keys), over plain TCP to 127.0.0.1.
    async fn statistics_secret(&self) {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "crm-db-monitor"},
            "stringData": {"host": "127.0.0.1", "port": self.pg.port.to_string(), "username": "crm_monitor",
                           "password": "monitor-Pw-1", "dbname": "crm"},
        }))
        .unwrap();
        self.secrets.create(&PostParams::default(), &secret).await.unwrap();
    }

    /// The monitor's status once `ok` holds for it.
    async fn until(&self, what: &str, ok: impl Fn(&AccessMonitorStatus) -> bool) -> AccessMonitorStatus {
        monitor_until(&self.monitors, &self.op, what, ok).await
    }

    /// The notes of the namespace's Events of `reason`, once there are at least `n`.
    async fn notes(&self, reason: &str, n: usize) -> Vec<String> {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        eventually(30, &format!("{n} {reason} Event(s)"), || async {
            let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
            let notes: Vec<String> =
                list.items.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).filter_map(|e| e.note).collect();
            if notes.len() >= n { Ok(notes) } else { Err(format!("{notes:?}")) }
        })
        .await
    }

    /// `crmguard audit access` on the test's audit directory.
    fn audit_access(&self, extra: &[&str]) -> std::process::Output {
        let dir = self.audit_dir.path.display().to_string();
        let mut a = vec!["audit", "access", "--audit-dir", dir.as_str()];
        a.extend(extra);
        e2e::crmguard(&a)
    }

    /// Everything crmguard said or kept: its log, the monitor, the namespace's Events, the access stream.
    async fn everything(&self) -> String {
        let mut trail = String::new();
        for f in std::fs::read_dir(self.audit_dir.path.join("crmguard-audit/operator-access")).unwrap() {
            trail.push_str(&std::fs::read_to_string(f.unwrap().path()).unwrap());
        }
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client.clone(), &self.ns);
        let events = serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap();
        let monitor = serde_json::to_string(&self.monitors.get("crm-db").await.unwrap()).unwrap();
        format!("{}\n{monitor}\n{events}\n{trail}", self.op.logs())
    }
}

fn tail(log: &str) -> String {
    e2e::last_lines(log, 15)
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
    let m = Monitored::start("monitor-pg").await;
    let (su, sp) = m.credentials(None).await;
    m.monitor(json!({"ddl": {}, "readVolume": [{"tables": ["public.invoices"], "maxPerMinute": 5}]}), None).await;

    // Normal work: the team reads what it is granted. Nothing is flagged.
    let as_sales = |sql: &str| m.pg.try_sql_as("crm", &su, &sp, sql);
    assert_eq!(as_sales("SELECT count(*) FROM contacts").as_deref(), Ok("20"));
    assert_eq!(
        as_sales(&format!("SELECT total FROM invoices WHERE customer = '{SECRET}' AND id = 7")).as_deref(),
        Ok("294")
    );
    let normal = m.until("the normal reads counted", |s| s.entries.unwrap_or(0) >= 2).await;
    assert_eq!(normal.findings, vec![], "normal work is not a finding");
    let clean = normal.conditions.iter().find(|c| c.type_ == "Clean").unwrap();
    assert_eq!((clean.status.as_str(), clean.reason.as_str()), ("True", "NoFindings"));

    // Exfiltration: invoices read in bulk, a table outside the grants, DDL, and a user nobody issued.
    // 12 reads: whatever minute boundary falls among them, one minute holds more than 5.
    for _ in 0..12 {
        as_sales("SELECT * FROM invoices").unwrap();
    }
    assert!(as_sales("SELECT * FROM payroll").unwrap_err().contains("permission denied"));
    m.pg.sql("crm", "ALTER TABLE contacts ADD COLUMN note text");
    m.pg.try_sql_as("crm", "mallory", "mallory-Pw-1", "SELECT email FROM contacts").unwrap();
    let want = [
        (FindingRule::ReadVolume, su.clone(), Some("public.invoices".to_string())),
        (FindingRule::OutsideGrants, su.clone(), Some("payroll".to_string())),
        (FindingRule::DdlOutsideWindow, m.pg.user.clone(), Some("public.contacts".to_string())),
        (FindingRule::UnknownIdentity, "mallory".to_string(), Some("public.contacts".to_string())),
    ];
    let flagged = m
        .until("the findings", |s| {
            let got: Vec<(FindingRule, String, Option<String>)> =
                s.findings.iter().map(|f| (f.rule, f.user.clone(), f.object.clone())).collect();
            want.iter().all(|w| got.contains(w))
        })
        .await;
    let findings = flagged.findings;
    assert!(
        !findings
            .iter()
            .any(|f| f.user == su && f.rule == FindingRule::OutsideGrants && f.object.as_deref() != Some("payroll")),
        "the granted reads are no finding: {findings:#?}"
    );
    let volume = findings.iter().find(|f| f.rule == FindingRule::ReadVolume).unwrap();
    assert_eq!(volume.identity, "team sales (AccessPolicy crm-access)");
    assert_eq!(flagged.finding_count, Some(findings.len() as i64));
    let clean = flagged.conditions.iter().find(|c| c.type_ == "Clean").unwrap();
    assert_eq!((clean.status.as_str(), clean.reason.as_str()), ("False", "FindingsMade"));
    let notes = m.notes("AccessFinding", 4).await;
    assert!(notes.iter().any(|n| n.starts_with("ReadVolume: more than 5 reads of public.invoices")), "{notes:?}");

    // The access stream of the audit trail: intact, and it answers "who read the invoices, and was it normal?".
    let out = eventually(30, "the access records in the audit trail", || async {
        let out = m.audit_access(&["--table", "public.invoices", "--team", "sales", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
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
    let dir = m.audit_dir.path.display().to_string();
    let verify = e2e::crmguard(&["audit", "verify", "--audit-dir", &dir, "--audit-stream", "operator-access"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let table = m.audit_access(&["--team", "sales", "--since", "1h"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.contains("public.invoices") && table.contains("finding(s)"), "{table}");

    // Nothing of the data, nor any password, left the database through the operator.
    let everything = m.everything().await;
    for leak in [SECRET, sp.as_str(), "mallory-Pw-1", m.pg.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
}

/// Rows, not statements: the sales team's credential reads the whole invoices table a few times, which the log shows
/// as a handful of statements (under any statement limit) but pg_stat_statements counts as 250 rows. Expected from
/// `rules.rowVolume`'s documentation (RowVolumeRule, DatabaseStatistics): a monitoring role with only
/// pg_read_all_stats, its Secret in CloudNativePG's keys; while the Secret is missing `RowsCounted=False
/// SecretUnusable` holds Ready back; then the sample runs, single-row reads are no finding, and one finding per
/// minute names the team, the table and more rows than the limit. No value and no password leaves the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_read_by_rows_is_counted_from_pg_stat_statements() {
    let m = Monitored::start("monitor-rows").await;
    let (su, sp) = m.credentials(None).await;
    m.statistics_role();
    let stats = json!({"secretName": "crm-db-monitor", "sslMode": "disable"});
    m.monitor_with(json!({"rowVolume": [{"tables": ["public.invoices"], "maxRowsPerMinute": 100}]}), None, Some(stats))
        .await;
    let cond = |s: &AccessMonitorStatus, t: &str| {
        s.conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let missing = m
        .until("RowsCounted=False for the missing Secret", |s| {
            cond(s, "RowsCounted").is_some_and(|c| c.1 == "SecretUnusable")
        })
        .await;
    let (_, _, message) = cond(&missing, "RowsCounted").unwrap();
    assert!(message.contains("Secret crm-db-monitor does not exist"), "{message}");
    assert_eq!(cond(&missing, "Ready").map(|c| (c.0, c.1)), Some(("False".into(), "SecretUnusable".into())));

    m.statistics_secret().await;
    let sampling = m
        .until("RowsCounted=True", |s| {
            cond(s, "RowsCounted").is_some_and(|c| c.0 == "True") && cond(s, "Ready").is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(cond(&sampling, "RowsCounted").map(|c| c.1), Some("Sampling".into()));

    // Normal work: single rows, under any limit.
    let as_sales = |sql: &str| m.pg.try_sql_as("crm", &su, &sp, sql);
    for id in 1..=5 {
        as_sales(&format!("SELECT total FROM invoices WHERE id = {id}")).unwrap();
    }
    // Five reads of the whole table (50 rows each): whichever minute boundary falls among them, one minute holds at
    // least 150 rows, more than 100.
    for _ in 0..5 {
        as_sales("SELECT * FROM invoices").unwrap();
    }
    let flagged =
        m.until("the RowVolume finding", |s| s.findings.iter().any(|f| f.rule == FindingRule::RowVolume)).await;
    let rows: Vec<&crmguard::api::access_monitor::Finding> =
        flagged.findings.iter().filter(|f| f.rule == FindingRule::RowVolume).collect();
    let f = rows[0];
    assert_eq!((f.user.as_str(), f.object.as_deref()), (su.as_str(), Some("public.invoices")));
    assert_eq!(f.identity, "team sales (AccessPolicy crm-access)");
    let n: u64 = f.message.split(' ').next().unwrap().parse().unwrap();
    assert!((101..=255).contains(&n), "{}", f.message);
    assert!(
        f.message.contains("read within a minute by team sales (AccessPolicy crm-access) (limit 100"),
        "{}",
        f.message
    );
    // The monitoring role's own statements (in the audit log too) are known: crmguard's statistics role.
    assert!(
        flagged.findings.iter().all(|f| f.rule == FindingRule::RowVolume),
        "only the rows broke a rule: {:#?}",
        flagged.findings
    );
    let notes = m.notes("AccessFinding", 1).await;
    assert!(notes.iter().any(|n| n.starts_with("RowVolume: ")), "{notes:?}");
    let everything = m.everything().await;
    for leak in [SECRET, sp.as_str(), "monitor-Pw-1", m.pg.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
}

/// `sslMode: verify-full` on the real thing (DatabaseStatistics' documentation): PostgreSQL with TLS, its certificate
/// for 127.0.0.1 only, from a CA of the test's own. Another CA in the Secret's `ca.crt`, or the right CA with a host
/// name the certificate is not for (`localhost`), is refused before any login (`RowsCounted=False
/// DatabaseUnreachable`, naming the certificate; the server logs no login of the role); with the server's CA and its
/// address the role logs in over TLS (the server's own log says so) and the sample runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statistics_over_tls_trust_only_the_secrets_ca_and_the_hosts_name() {
    let (mut settings, ca, _tls_dir) = Postgres::tls_files();
    let (_, other_ca, _other_dir) = Postgres::tls_files();
    settings.push("log_connections=on".into());
    let m = Monitored::start_full("monitor-tls", &[], &settings).await;
    m.statistics_role();
    let secret = |host: &str, ca: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "crm-db-monitor"},
            "stringData": {"host": host, "port": m.pg.port.to_string(), "username": "crm_monitor",
                           "password": "monitor-Pw-1", "dbname": "crm", "ca.crt": ca},
        }))
        .unwrap()
    };
    let replace = |s: Secret| async {
        let mut s = s;
        s.metadata.resource_version = m.secrets.get("crm-db-monitor").await.unwrap().metadata.resource_version;
        m.secrets.replace("crm-db-monitor", &PostParams::default(), &s).await.unwrap();
    };
    let rows_counted = |s: &AccessMonitorStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "RowsCounted")
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let logins = || {
        std::fs::read_to_string(&m.pg.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("connection authorized: user=crm_monitor"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };

    m.secrets.create(&PostParams::default(), &secret("127.0.0.1", &other_ca)).await.unwrap();
    let stats = json!({"secretName": "crm-db-monitor", "sslMode": "verify-full"});
    m.monitor_with(json!({"rowVolume": [{"tables": ["public.invoices"], "maxRowsPerMinute": 100}]}), None, Some(stats))
        .await;
    let untrusted = m
        .until("another CA's certificate refused", |s| {
            rows_counted(s).is_some_and(|c| c.1 == "DatabaseUnreachable" && c.2.contains("invalid peer certificate"))
        })
        .await;
    assert!(rows_counted(&untrusted).unwrap().2.contains("certificate"), "{untrusted:#?}");
    // Passes come at the interval (1s): every refused connection is a line in the database's log (log_connections),
    // so every pass finds new lines and a status to write, whose change must not start the next pass at once.
    // Measured over real time (the interval is real time): a pass and the reconcile its status write starts, each
    // second.
    let series = "crmguard_reconcile_total{controller=\"accessmonitor\"}";
    let before = m.op.metric(series).unwrap_or(0.0);
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let n = m.op.metric(series).unwrap_or(0.0) - before;
    assert!((2.0..=15.0).contains(&n), "{n} reconciles of the monitor in 5 s at an interval of 1 s");

    replace(secret("localhost", &ca)).await;
    m.until("a certificate not for the host's name refused", |s| {
        rows_counted(s).is_some_and(|c| {
            c.1 == "DatabaseUnreachable" && c.2.contains("certificate not valid for name \"localhost\"")
        })
    })
    .await;
    assert_eq!(logins(), Vec::<String>::new(), "no login over a connection whose certificate was refused");

    replace(secret("127.0.0.1", &ca)).await;
    m.until("the sample over TLS", |s| rows_counted(s).is_some_and(|c| c.0 == "True")).await;
    let logins = logins();
    assert!(!logins.is_empty() && logins.iter().all(|l| l.contains("SSL enabled")), "{logins:?}");
}

/// The automated response on the real things (expected from the AccessMonitor's documented response, Response in
/// api::access_monitor): a bulk read of the invoices by the sales team's credential opens an incident; the
/// credential is revoked in Vault (the real login fails), the team's Secret is emptied and the AccessPolicy says why;
/// the pod running as the team's ServiceAccount is isolated through the NetworkGuard; the revoked credential's next
/// use is itself a finding. The acknowledgement gives the team a new, working credential. A dry run says what it
/// would do and does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exfiltration_is_contained_and_released_on_acknowledgement() {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let m = Monitored::start("monitor-respond").await;
    let (su, sp) = m.credentials(None).await;
    // The team's workload: a pod running as its ServiceAccount, behind a NetworkGuard with alert-driven quarantine.
    let sas: Api<ServiceAccount> = Api::namespaced(m.client.clone(), &m.ns);
    sas.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "sales-app"}})).unwrap())
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(m.client.clone(), &m.ns);
    crm_pod(&m.client, &m.ns, "sales-app-0", Some("sales-app"), None).await;
    quarantine_guard(&m.client, &m.ns).await;
    m.monitor(
        json!({"readVolume": [{"tables": ["public.invoices"], "maxPerMinute": 5}]}),
        Some(json!({"triggers": ["ReadVolume"], "revokeCredentials": true, "quarantineThrough": "crm-firewall"})),
    )
    .await;

    let as_sales = |sql: &str| m.pg.try_sql_as("crm", &su, &sp, sql);
    // The bulk read: the response may cut it short (the credential stops working mid-way).
    let mut read = 0;
    while read < 12 && as_sales("SELECT * FROM invoices").is_ok() {
        read += 1;
    }
    assert!(read > 5, "{read} reads");
    let contained = m
        .until("an incident for team sales, its credentials held", |s| {
            s.incidents.iter().any(|i| i.team == "sales" && i.actions.iter().any(|a| a.starts_with("credentials held")))
        })
        .await;
    let incident = contained.incidents[0].clone();
    assert!(incident.holds_credentials && !incident.pending, "{incident:#?}");
    assert_eq!((incident.access_policy.as_str(), incident.dry_run), ("crm-access", false));
    assert!(
        incident
            .actions
            .iter()
            .any(|a| a == "isolation of pod(s) sales-app-0 requested through NetworkGuard crm-firewall"),
        "{incident:#?}"
    );
    let settled = contained.conditions.iter().find(|c| c.type_ == "Settled").unwrap();
    assert_eq!((settled.status.as_str(), settled.reason.as_str()), ("False", "IncidentOpen"), "{settled:?}");
    // Contained: the credential no longer logs in, the Secret is empty, the AccessPolicy says why.
    let refused = eventually(30, "the revoked credential refused by PostgreSQL", || async {
        match as_sales("SELECT 1") {
            Err(e) => Ok(e),
            Ok(_) => Err("still logs in".to_string()),
        }
    })
    .await;
    assert!(refused.contains("password authentication failed"), "{refused}");
    let aps: Api<AccessPolicy> = Api::namespaced(m.client.clone(), &m.ns);
    eventually(30, "the AccessPolicy's CredentialsHeld", || async {
        let ap = aps.get("crm-access").await.map_err(|e| e.to_string())?;
        let c = ap.status.unwrap_or_default().conditions.into_iter().find(|c| c.type_ == "CredentialsIssued");
        match c {
            Some(c) if c.reason == "CredentialsHeld" && c.message.contains(&incident.id) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let held = m.secrets.get("crm-access-sales-db").await.unwrap();
    assert!(held.data.unwrap_or_default().values().all(|v| v.0.is_empty()), "the held Secret keeps no credential");
    let pod = isolated(&pods, "sales-app-0").await;
    assert!(pod.metadata.annotations.unwrap_or_default().values().any(|v| v.contains(&incident.id)));
    // The revoked credential, used again, is a finding of its own.
    let _ = as_sales("SELECT count(*) FROM contacts");
    m.until("the revoked credential's use", |s| {
        s.findings.iter().any(|f| f.rule == FindingRule::RevokedCredential && f.user == su)
    })
    .await;
    m.notes("IncidentOpened", 1).await;
    m.notes("Responded", 1).await;

    // Acknowledged: the hold is lifted and the team gets a new credential that works.
    let ack = json!({"metadata": {"annotations": {"crmguard.io/acknowledge": incident.id}}});
    m.monitors.patch("crm-db", &PatchParams::default(), &Patch::Merge(&ack)).await.unwrap();
    let released = m.until("the incident acknowledged", |s| s.incidents.iter().all(|i| i.acknowledged.is_some())).await;
    let settled = released.conditions.iter().find(|c| c.type_ == "Settled").unwrap();
    assert_eq!(settled.reason, "NoOpenIncident");
    let (su2, sp2) = m.credentials(Some(&su)).await;
    assert_eq!(m.pg.try_sql_as("crm", &su2, &sp2, "SELECT count(*) FROM contacts").as_deref(), Ok("20"));
    m.notes("IncidentAcknowledged", 1).await;
    // The revoked credential's user is remembered in status (an operator restart keeps knowing it as revoked).
    m.until("the revoked user in status", |s| {
        s.revoked_users.iter().any(|r| r.user == su && r.team == "sales" && r.access_policy == "crm-access")
    })
    .await;

    // A dry run: the next bulk read opens an incident that only says what it would do.
    let dry = json!({"spec": {"response": {"triggers": ["ReadVolume"], "dryRun": true, "revokeCredentials": true,
        "quarantineThrough": "crm-firewall"}, "rules": {"readVolume": [{"tables": ["public.invoices"], "maxPerMinute": 5}]}}});
    m.monitors.patch("crm-db", &PatchParams::default(), &Patch::Merge(&dry)).await.unwrap();
    for _ in 0..12 {
        m.pg.try_sql_as("crm", &su2, &sp2, "SELECT * FROM invoices").unwrap();
    }
    let dry_run = m.until("a dry-run incident", |s| s.incidents.iter().any(|i| i.dry_run)).await;
    // A monitor the AccessPolicy does not accept holds nothing: its incident says why (failed before: any monitor
    // of the namespace could hold any team's credentials).
    let rogue: AccessMonitor = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
        "metadata": {"name": "rogue", "namespace": m.ns},
        "spec": {"database": {"engine": "postgres", "podSelector": {"matchLabels": {"app": "crm-db"}}},
                 "interval": "1s", "rules": {"readVolume": [{"tables": ["public.invoices"], "maxPerMinute": 1}]},
                 "response": {"triggers": ["ReadVolume"], "revokeCredentials": true}},
    }))
    .unwrap();
    m.monitors.create(&PostParams::default(), &rogue).await.unwrap();
    eventually(30, "the rogue monitor reading", || async {
        let s = m.monitors.get("rogue").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        if s.pod.is_some() { Ok(()) } else { Err(format!("{s:?}")) }
    })
    .await;
    for _ in 0..3 {
        m.pg.try_sql_as("crm", &su2, &sp2, "SELECT * FROM invoices").unwrap();
    }
    let refused = eventually(30, "the rogue incident refused", || async {
        let s = m.monitors.get("rogue").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        match s.incidents.iter().find_map(|i| i.failed.clone()) {
            Some(f) => Ok((f, s)),
            None => Err(format!("{s:#?}")),
        }
    })
    .await;
    assert!(refused.0.contains("does not accept holds from AccessMonitor rogue"), "{}", refused.0);
    let settled = refused.1.conditions.iter().find(|c| c.type_ == "Settled").unwrap();
    assert_eq!(settled.reason, "ResponseFailed");
    let ap = aps.get("crm-access").await.unwrap();
    let issued = ap.status.unwrap_or_default().conditions.into_iter().find(|c| c.type_ == "CredentialsIssued").unwrap();
    assert_eq!(issued.reason, "Issued", "{issued:?}");
    m.monitors.delete("rogue", &Default::default()).await.unwrap();
    let i = dry_run.incidents.iter().find(|i| i.dry_run).unwrap();
    assert!(i.actions.iter().all(|a| a.starts_with("would ")), "{i:#?}");
    m.notes("WouldRespond", 1).await;
    assert_eq!(m.pg.try_sql_as("crm", &su2, &sp2, "SELECT count(*) FROM contacts").as_deref(), Ok("20"));
    let settled = dry_run.conditions.iter().find(|c| c.type_ == "Settled").unwrap();
    assert_eq!(settled.reason, "NoOpenIncident", "a dry run holds nothing");

    let everything = m.everything().await;
    for leak in [SECRET, sp.as_str(), sp2.as_str(), m.pg.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
    eventually(30, "the response and the dry run in the access stream", || async {
        let records = String::from_utf8_lossy(&m.audit_access(&["--team", "sales", "-o", "json"]).stdout).to_string();
        let both = records.contains("\"access\":\"response\"") && records.contains("\"access\":\"dry-run\"");
        if both { Ok(()) } else { Err(records) }
    })
    .await;
    // Normal reads of a team credential that touch no table are no finding either.
    assert!(
        !m.everything().await.contains("outside the grants of team sales (AccessPolicy crm-access): read"),
        "a SELECT 1 is outside no grant"
    );
}

/// NetworkGuard `crm-firewall` over the pods labelled `part-of: crm`, whose alert-driven quarantine (10 min) accepts
/// AccessMonitor `crm-db`'s requests, and its token Secret.
async fn quarantine_guard(client: &kube::Client, ns: &str) {
    let token: Secret = serde_json::from_value(json!({"metadata": {"name": "quarantine-token"},
        "stringData": {"token": "t0ken-for-alertmanager"}}))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &token).await.unwrap();
    let guard = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "NetworkGuard", "metadata": {"name": "crm-firewall"},
        "spec": {"podSelector": {"matchLabels": {"part-of": "crm"}},
                 "webhook": {"tokenSecretRef": {"name": "quarantine-token", "key": "token"}, "ttl": "10m",
                             "accessMonitors": ["crm-db"]}},
    }))
    .unwrap();
    Api::<crmguard::api::NetworkGuard>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &guard)
        .await
        .unwrap();
}

/// A pod labelled `part-of: crm` (and `app: <account>`), running as ServiceAccount `account` (none: the namespace's
/// default) with address `ip` when given: the test acts as its kubelet.
async fn crm_pod(client: &kube::Client, ns: &str, name: &str, account: Option<&str>, ip: Option<&str>) {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut pod = json!({
        "metadata": {"name": name, "labels": {"part-of": "crm"}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    });
    if let Some(a) = account {
        pod["metadata"]["labels"]["app"] = json!(a);
        pod["spec"]["serviceAccountName"] = json!(a);
    }
    pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap()).await.unwrap();
    if let Some(ip) = ip {
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    }
}

/// The incident's statements came only from pod `pod`, and its response asked guard `crm-firewall` to isolate that pod.
fn isolates_only(incident: &crmguard::api::access_monitor::Incident, pod: &str) {
    assert_eq!(incident.pods, [pod], "{incident:#?}");
    let asked = format!(
        "isolation of pod(s) {pod} (the statements came from them) requested through NetworkGuard crm-firewall"
    );
    assert!(incident.actions.contains(&asked), "{incident:#?}");
}

/// Pod `name` once the guard `crm-firewall` has isolated it (its quarantine label).
async fn isolated(pods: &Api<k8s_openapi::api::core::v1::Pod>, name: &str) -> k8s_openapi::api::core::v1::Pod {
    eventually(30, &format!("pod {name} isolated"), || async {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        let l = p.metadata.labels.clone().unwrap_or_default();
        if l.get("crmguard.io/quarantine").map(String::as_str) == Some("crm-firewall") {
            Ok(p)
        } else {
            Err(format!("{l:?}"))
        }
    })
    .await
}

/// A session of a workload, connected from the pod's own address (a test's pods are told apart by their loopback
/// addresses, 127.0.0.x, as the test kubelet gives them).
async fn connect_from(pod_ip: &str, port: u16, user: &str, password: &str) -> tokio_postgres::Client {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{pod_ip}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let mut config = tokio_postgres::Config::new();
    config.user(user).password(password).dbname("crm");
    let (client, connection) = config.connect_raw(stream, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Which workload a statement came from (issue 18: a team's identity maps to its workloads, and the response
/// isolates "the offending workload's pods"). The sales team's credential, copied into another workload (pod
/// `intruder-0`: another ServiceAccount, its own address) and used there for a bulk read of the invoices, is placed
/// at that pod; the team's own pod `sales-app-0` reads contacts. Expected from the documentation (Finding.pods,
/// Incident.pods, the README's attribution section; PostgreSQL's `pg_stat_activity.client_addr` and
/// `log_connections`): the intruder's session began before the monitor read the log, so only pg_stat_activity (the
/// statistics role's sample) knows its address; the team pod's session is short (gone before any sample), so only
/// the log's connection line does; connection lines the intruder logs itself (`RAISE LOG`) change nothing. The
/// findings name `intruder-0`, the incident isolates `intruder-0` and not `sales-app-0`, and the access records say
/// which pod read what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_credential_is_placed_at_the_pod_that_used_it_and_only_that_pod_is_isolated() {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let m = Monitored::start_full("monitor-clients", &[], &["log_connections=on".to_string()]).await;
    let (su, sp) = m.credentials(None).await;
    let intruder = connect_from("127.0.0.9", m.pg.port, &su, &sp).await;
    // (When the server logged the connection, with room for the node's time of the line.)
    let connected = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(200);
    m.statistics_role();
    m.statistics_secret().await;
    let sas: Api<ServiceAccount> = Api::namespaced(m.client.clone(), &m.ns);
    for sa in ["sales-app", "intruder"] {
        let account = serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap();
        sas.create(&PostParams::default(), &account).await.unwrap();
    }
    // Two running pods with their addresses (the test acts as their kubelet).
    let pods: Api<Pod> = Api::namespaced(m.client.clone(), &m.ns);
    crm_pod(&m.client, &m.ns, "sales-app-0", Some("sales-app"), Some("127.0.0.7")).await;
    crm_pod(&m.client, &m.ns, "intruder-0", Some("intruder"), Some("127.0.0.9")).await;
    quarantine_guard(&m.client, &m.ns).await;
    // The intruder connected before the monitor was created: its connection line is never read (the monitor reads
    // from its creation, a time in whole seconds): the monitor is created once the clock is in a later second.
    while jiff::Timestamp::now().as_second() <= connected.as_second() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stats = json!({"secretName": "crm-db-monitor", "sslMode": "disable"});
    m.monitor_with(
        json!({"readVolume": [{"tables": ["public.invoices"], "maxPerMinute": 5}], "foreignWorkload": true}),
        Some(json!({"triggers": ["ReadVolume", "ForeignWorkload"], "revokeCredentials": false,
                    "quarantineThrough": "crm-firewall"})),
        Some(stats),
    )
    .await;
    // The team's own pod: one short session.
    let app = connect_from("127.0.0.7", m.pg.port, &su, &sp).await;
    app.simple_query("SELECT count(*) FROM contacts").await.unwrap();
    drop(app);
    // The intruder tries to pass for the team's pod: connection lines of its own making (any session may log a
    // message; PostgreSQL writes it behind the session's own prefix).
    intruder
        .batch_execute(
            "DO $$BEGIN RAISE LOG 'connection received: host=127.0.0.7 port=1'; \
             RAISE LOG 'connection authorized: user=crm_app database=crm'; END$$",
        )
        .await
        .unwrap();
    for _ in 0..8 {
        intruder.simple_query("SELECT * FROM invoices").await.unwrap();
    }
    let responded = m
        .until("the incident's isolation requested", |s| {
            s.incidents.iter().any(|i| i.actions.iter().any(|a| a.starts_with("isolation of pod(s)")))
        })
        .await;
    let incident = &responded.incidents[0];
    isolates_only(incident, "intruder-0");
    let f = m.until("the ReadVolume finding", |s| s.findings.iter().any(|f| f.rule == FindingRule::ReadVolume)).await;
    let f = f.findings.iter().find(|f| f.rule == FindingRule::ReadVolume).unwrap();
    assert_eq!((f.pods.as_slice(), f.addresses.as_slice()), (&["intruder-0".to_string()][..], &[][..]), "{f:#?}");
    // rules.foreignWorkload: the intruder's pod does not run as the team's ServiceAccount; the team's pod does.
    let foreign: Vec<_> = responded.findings.iter().filter(|f| f.rule == FindingRule::ForeignWorkload).collect();
    // (Once per pod and minute: the reads may straddle a minute.)
    assert!(!foreign.is_empty() && foreign.iter().all(|f| f.pods == ["intruder-0"]), "{:#?}", responded.findings);
    assert_eq!(
        foreign[0].message,
        "a credential of team sales (AccessPolicy crm-access) used from pod intruder-0, which runs as ServiceAccount \
         intruder, not as one of the team's (sales-app)"
    );
    let notes = m.notes("AccessFinding", 1).await;
    assert!(
        notes.iter().any(|n| n.starts_with("ReadVolume: ") && n.ends_with("(from pod(s) intruder-0)")),
        "{notes:?}"
    );
    isolated(&pods, "intruder-0").await;
    // The guard's quarantine policy selects the isolated pod by that label and allows it nothing (both policy types,
    // no rule: all its traffic is denied, as the NetworkPolicy documentation has it).
    let policies: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = Api::namespaced(m.client.clone(), &m.ns);
    let q = policies.get("crm-firewall.quarantine").await.unwrap().spec.unwrap();
    let selects = q.pod_selector.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default();
    assert_eq!(selects.get("crmguard.io/quarantine").map(String::as_str), Some("crm-firewall"), "{q:?}");
    assert_eq!(q.policy_types.as_deref(), Some(&["Ingress".to_string(), "Egress".to_string()][..]), "{q:?}");
    assert!(q.ingress.is_none() && q.egress.is_none(), "{q:?}");
    let app_labels = pods.get("sales-app-0").await.unwrap().metadata.labels.unwrap_or_default();
    assert!(!app_labels.contains_key("crmguard.io/quarantine"), "the team's own pod is not isolated: {app_labels:?}");
    // Who read what, from where, in the access stream.
    let records = eventually(30, "both pods' reads in the access stream", || async {
        let out = m.audit_access(&["--team", "sales", "-o", "json"]);
        let records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|r: &Value| r["access"] == "read")
            .collect();
        let from = |table: &str| {
            records
                .iter()
                .filter(|r| r["object"] == table)
                .flat_map(|r| r["pods"].as_array().cloned().unwrap_or_default())
                .filter_map(|p| p.as_str().map(String::from))
                .collect::<BTreeSet<String>>()
        };
        let (invoices, contacts) = (from("public.invoices"), from("public.contacts"));
        if invoices.contains("intruder-0") && contacts.contains("sales-app-0") {
            Ok((invoices, contacts))
        } else {
            Err(format!("invoices read from {invoices:?}, contacts from {contacts:?}"))
        }
    })
    .await;
    assert_eq!(records.0, BTreeSet::from(["intruder-0".to_string()]), "only the intruder read the invoices");
    assert_eq!(records.1, BTreeSet::from(["sales-app-0".to_string()]), "only the team's pod read the contacts");
    let everything = m.everything().await;
    for leak in [SECRET, sp.as_str(), "monitor-Pw-1", m.pg.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
}

/// Findings and incidents leave the cluster the ways platform teams collect them, checked on the real things: a
/// real Alertmanager (its v2 API lists an alert while its endsAt is ahead, folds alerts of equal labels) and
/// OpenReports' own Report CRD (its schema, not ours, on the real API server). Expected from the documentation (the
/// README's alert names and labels, api::access_monitor, the CRD): a bulk read of the invoices is a `ReadVolume`
/// finding alert of the team's user on that table; the incident it opens fires as `CrmAccessIncident` until it is
/// acknowledged, then leaves Alertmanager's active alerts; the monitor's report `crm-db-findings` holds a `fail`
/// result per finding and per open incident, goes with the monitor (garbage collection), and the posture report
/// is an OpenReports Report too. An Alertmanager that does not answer (listed first) does not stop delivery to
/// the one that does. No value and no password in either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn findings_and_incidents_reach_alertmanager_and_an_openreports_report() {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let am = e2e::services::Alertmanager::start();
    let dead = format!("http://127.0.0.1:{}", e2e::free_port());
    let urls = format!("{dead},{}", am.url());
    let mut m = Monitored::start_with("monitor-alerts", &["--alertmanager-url", &urls, "--posture-seconds", "1"]).await;
    // The CRD as OpenReports publishes it, installed while the operator runs (it asks discovery again within a
    // minute).
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(m.client.clone());
    crds.patch(
        "reports.openreports.io",
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(e2e::services::openreports_crd()),
    )
    .await
    .unwrap();
    let gvk = GroupVersionKind::gvk("openreports.io", "v1alpha1", "Report");
    let reports: Api<DynamicObject> =
        Api::namespaced_with(m.client.clone(), &m.ns, &ApiResource::from_gvk_with_plural(&gvk, "reports"));
    let (su, sp) = m.credentials(None).await;
    m.monitor(
        json!({"readVolume": [{"tables": ["public.invoices"], "maxPerMinute": 5}],
               "baseline": {"tables": ["public.invoices"], "minReads": 1}}),
        Some(json!({"triggers": ["ReadVolume"], "revokeCredentials": true})),
    )
    .await;
    // The baseline starts learning: its ConfigMap, the monitor's child, holds the hour being counted (and nothing
    // is unusual before three weeks of that hour were observed).
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(m.client.clone(), &m.ns);
    let saved = eventually(30, "the baseline's ConfigMap", || async {
        cms.get_opt("crm-db-baseline").await.map_err(|e| e.to_string())?.ok_or_else(|| "absent".to_string())
    })
    .await;
    assert_eq!(saved.metadata.owner_references.unwrap()[0].name, "crm-db");
    let learned: Value = serde_json::from_str(&saved.data.unwrap()["baseline.json"]).unwrap();
    let hour = learned["hour"].as_i64().unwrap();
    let now = jiff::Timestamp::now().as_second() / 3600;
    assert!(hour == now || hour == now - 1, "the hour counted: {learned}");
    let bulk = format!("SELECT * FROM invoices WHERE customer = '{SECRET}' OR total > 0");
    for _ in 0..10 {
        if m.pg.try_sql_as("crm", &su, &sp, &bulk).is_err() {
            break;
        }
    }
    // The incident, once its response is carried out (the team's credentials held: acknowledged before that, there
    // would be no hold to release and no new credential).
    let status = m
        .until("an incident, the team's credentials held", |s| {
            s.incidents.iter().any(|i| i.actions.iter().any(|a| a.starts_with("credentials held")))
        })
        .await;
    let incident = status.incidents[0].id.clone();
    assert!(status.findings.iter().all(|f| f.rule != FindingRule::UnusualVolume), "learning: {status:#?}");
    // ... and the AccessPolicy has carried out the hold (the team's Secret emptied).
    eventually(60, "the team's Secret emptied by the hold", || async {
        let s = m.secrets.get("crm-access-sales-db").await.map_err(|e| e.to_string())?;
        let empty = s.data.unwrap_or_default().values().all(|v| v.0.is_empty());
        if empty { Ok(()) } else { Err(tail(&m.op.logs())) }
    })
    .await;

    let named = |alerts: &[Value], name: &str| -> Option<Value> {
        alerts.iter().find(|a| a["labels"]["alertname"] == name).cloned()
    };
    let alerts = eventually(90, "the finding and the incident in Alertmanager", || async {
        let alerts = am.alerts();
        match (named(&alerts, "CrmAccessFinding"), named(&alerts, "CrmAccessIncident")) {
            (Some(_), Some(_)) => Ok(alerts),
            _ => Err(format!("{alerts:#?}; operator: {}", tail(&m.op.logs()))),
        }
    })
    .await;
    let finding = named(&alerts, "CrmAccessFinding").unwrap();
    let l = &finding["labels"];
    assert_eq!(
        (&l["rule"], &l["user"], &l["object"], &l["namespace"], &l["accessmonitor"], &l["severity"]),
        (
            &json!("ReadVolume"),
            &json!(su),
            &json!("public.invoices"),
            &json!(m.ns),
            &json!("crm-db"),
            &json!("warning")
        ),
        "{finding:#}"
    );
    assert!(finding["annotations"]["description"].as_str().unwrap().contains("public.invoices"), "{finding:#}");
    let fired = named(&alerts, "CrmAccessIncident").unwrap();
    let l = &fired["labels"];
    assert_eq!(
        (&l["incident"], &l["team"], &l["severity"]),
        (&json!(incident), &json!("sales"), &json!("critical")),
        "{fired:#}"
    );
    assert!(
        fired["annotations"]["acknowledge"].as_str().unwrap().contains(&format!("crmguard.io/acknowledge={incident}")),
        "{fired:#}"
    );
    let ends: jiff::Timestamp = fired["endsAt"].as_str().unwrap().parse().unwrap();
    assert!(ends > jiff::Timestamp::now(), "an open incident's alert has not ended: {fired:#}");

    // The report: a fail result per finding and one for the open incident, its summary counting them.
    let report = eventually(90, "the findings report with the incident", || async {
        let r = reports.get_opt("crm-db-findings").await.map_err(|e| e.to_string())?;
        let r = serde_json::to_value(r.ok_or("no report")?).unwrap();
        let results = r["results"].as_array().cloned().unwrap_or_default();
        let finds = results.iter().any(|x| x["rule"] == "ReadVolume" && x["properties"]["user"] == json!(su));
        let open = results.iter().any(|x| x["rule"] == "Incident" && x["properties"]["incident"] == json!(incident));
        if finds && open { Ok(r) } else { Err(format!("{r:#}; operator: {}", tail(&m.op.logs()))) }
    })
    .await;
    let results = report["results"].as_array().unwrap();
    assert!(results.iter().all(|x| x["result"] == "fail" && x["policy"] == "crm-db"), "{report:#}");
    assert_eq!(report["summary"]["fail"], json!(results.len()), "{report:#}");
    let owner = &report["metadata"]["ownerReferences"][0];
    assert_eq!((&owner["kind"], &owner["name"]), (&json!("AccessMonitor"), &json!("crm-db")), "{report:#}");
    assert_eq!((&report["scope"]["kind"], &report["scope"]["name"]), (&json!("AccessMonitor"), &json!("crm-db")));
    // The posture report went to the same API.
    eventually(30, "the posture report as an OpenReports Report", || async {
        reports.get_opt("crmguard").await.map_err(|e| e.to_string())?.map(drop).ok_or_else(|| "absent".to_string())
    })
    .await;

    // Acknowledged: the incident's alert is resolved (no longer active), its result leaves the report.
    let ack = json!({"metadata": {"annotations": {"crmguard.io/acknowledge": incident}}});
    m.monitors.patch("crm-db", &PatchParams::default(), &Patch::Merge(&ack)).await.unwrap();
    eventually(60, "the incident's alert resolved", || async {
        let alerts = am.alerts();
        match named(&alerts, "CrmAccessIncident") {
            None => Ok(()),
            Some(a) => Err(format!("{a:#}")),
        }
    })
    .await;
    eventually(60, "the incident's result gone from the report", || async {
        let r = serde_json::to_value(reports.get("crm-db-findings").await.map_err(|e| e.to_string())?).unwrap();
        let open = r["results"].as_array().into_iter().flatten().any(|x| x["rule"] == "Incident");
        if open { Err(format!("{r:#}")) } else { Ok(()) }
    })
    .await;

    // The acknowledgement gave the team a new credential: the old one is revoked, and the status remembers it. After
    // an operator restart (memory gone), a login with it is still the revoked credential's use (failed before: an
    // unknown user's failed login, kept only as a pseudonym and no finding).
    m.credentials(Some(&su)).await;
    m.until("the revoked user in status", |s| s.revoked_users.iter().any(|r| r.user == su)).await;
    m.restart_operator().await;
    let refused = m.pg.try_sql_as("crm", &su, &sp, "SELECT 1").unwrap_err();
    assert!(refused.contains("password authentication failed"), "{refused}");
    m.until("the revoked credential's login after the restart", |s| {
        s.findings.iter().any(|f| f.rule == FindingRule::RevokedCredential && f.user == su)
    })
    .await;
    let posture = serde_json::to_string(&reports.get("crmguard").await.unwrap()).unwrap();
    let baseline = serde_json::to_string(&cms.get("crm-db-baseline").await.unwrap()).unwrap();
    let out = format!(
        "{}\n{report}\n{}\n{posture}\n{baseline}\n{}",
        serde_json::to_string(&am.alerts()).unwrap(),
        am.logs(),
        m.everything().await
    );
    assert!(out.contains("public.invoices"), "what is checked holds the accesses");
    for leak in [SECRET, sp.as_str(), m.pg.password.as_str()] {
        assert!(!out.contains(leak), "{leak:?} leaked into Alertmanager, a report, the baseline, Events or the log");
    }
    // The report goes with its monitor.
    m.monitors.delete("crm-db", &Default::default()).await.unwrap();
    eventually(60, "the report garbage-collected", || async {
        match reports.get_opt("crm-db-findings").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(_) => Err("still there".to_string()),
        }
    })
    .await;
}

/// The status of monitor `crm-db` once `ok` holds for it.
async fn monitor_until(
    monitors: &Api<AccessMonitor>,
    op: &Operator,
    what: &str,
    ok: impl Fn(&AccessMonitorStatus) -> bool,
) -> AccessMonitorStatus {
    eventually(60, what, || async {
        let s = monitors.get("crm-db").await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        if ok(&s) { Ok(s) } else { Err(format!("{s:#?}; log: {}", tail(&op.logs()))) }
    })
    .await
}

/// MariaDB's log served as pod `crm-mariadb-0`'s (label app=crm-mariadb, container mariadb) by a node of its own, and
/// the operator (chart RBAC) watching the cluster's namespace, with OpenBao as its Vault when given.
async fn mariadb_pod_and_operator(
    cluster: &Cluster,
    db: &MariaDb,
    vault: Option<&OpenBao>,
) -> (e2e::nodelog::LogNode, Operator) {
    let (client, ns) = (&cluster.client, &cluster.namespace);
    let node = e2e::nodelog::LogNode::start(client, &format!("node-{ns}")).await;
    node.pod(client, ns, "crm-mariadb-0", &[("app", "crm-mariadb")], "mariadb", &db.log).await;
    let kubeconfig = e2e::install_chart_rbac(cluster, e2e::Admission::WithoutPolicy).await;
    let mut args = vec!["--leader-election=false".to_string(), "--namespace".into(), ns.clone()];
    let mut env = vec![];
    if let Some(bao) = vault {
        args.extend(["--vault-addr".to_string(), bao.addr()]);
        env.push(("VAULT_TOKEN", bao.token.as_str()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let op = Operator::start_with_env(&kubeconfig, &args, &env);
    op.wait_ready(60).await;
    (node, op)
}

/// MariaDB's audit plugin writing to the server's stderr (`server_audit_file_path = /dev/stderr`, the README's
/// setting for a container) reaches the monitor through the pod's log, interleaved with the server's own lines.
/// Expected from the rules' documentation: the application's user on its listed table is no finding; on another
/// table it is outside its grants; a user nobody named is unknown; more failed logins per minute than allowed are a
/// finding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_audit_events_reach_the_monitor_through_the_pods_log() {
    let cluster = Cluster::start("monitor-mariadb").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let db = MariaDb::audited_to_stderr();
    db.sql(
        "",
        &format!(
            "CREATE DATABASE crm; CREATE TABLE crm.invoices (id int, customer text);
             CREATE TABLE crm.payroll (id int, salary int);
             INSERT INTO crm.invoices VALUES (1, '{SECRET}');
             CREATE USER 'intruder'@'%' IDENTIFIED BY 'intr-Pw-3'; GRANT SELECT ON crm.invoices TO 'intruder'@'%';"
        ),
    );
    let (_node, op) = mariadb_pod_and_operator(&cluster, &db, None).await;
    let monitors: Api<AccessMonitor> = Api::namespaced(client.clone(), &ns);
    let monitor: AccessMonitor = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
        "metadata": {"name": "crm-db", "namespace": ns},
        "spec": {
            "database": {"engine": "mysql", "podSelector": {"matchLabels": {"app": "crm-mariadb"}}},
            "identities": [{"user": db.user, "name": "crm-web", "tables": ["crm.invoices"]}],
            "interval": "1s",
            "rules": {"failedLogins": {"maxPerMinute": 2}},
        },
    }))
    .unwrap();
    monitors.create(&PostParams::default(), &monitor).await.unwrap();
    let status = |what: &'static str, ok: fn(&AccessMonitorStatus) -> bool| monitor_until(&monitors, &op, what, ok);
    status("the monitor reading", |s| s.conditions.iter().any(|c| c.type_ == "Collecting" && c.reason == "Reading"))
        .await;

    assert_eq!(
        db.try_sql("crm", &format!("SELECT count(*) FROM invoices WHERE customer = '{SECRET}'")).as_deref(),
        Ok("1")
    );
    let normal = status("the application's read", |s| s.entries.unwrap_or(0) >= 1).await;
    assert_eq!(normal.findings, vec![], "the application on its own table is no finding");
    db.try_sql("crm", "SELECT count(*) FROM payroll").unwrap();
    // The intruder reads from a pod of its own (its address as its kubelet would report it): the audit event's host
    // places the read at that pod.
    crm_pod(&client, &ns, "intruder-0", None, Some("127.0.0.9")).await;
    db.try_sql_from("127.0.0.9", "crm", "intruder", "intr-Pw-3", "SELECT * FROM invoices").unwrap();
    for _ in 0..3 {
        assert!(db.try_sql_as("crm", &db.user, "wrong-password", "SELECT 1").is_err());
    }
    let found = status("the findings", |s| s.findings.len() >= 3).await;
    let got: Vec<(FindingRule, &str, Option<&str>)> =
        found.findings.iter().map(|f| (f.rule, f.user.as_str(), f.object.as_deref())).collect();
    for want in [
        (FindingRule::OutsideGrants, db.user.as_str(), Some("crm.payroll")),
        (FindingRule::UnknownIdentity, "intruder", Some("crm.invoices")),
        (FindingRule::FailedLogins, db.user.as_str(), None),
    ] {
        assert!(got.contains(&want), "{want:?} in {got:?}");
    }
    let intruder = found.findings.iter().find(|f| f.user == "intruder").unwrap();
    assert_eq!(intruder.pods, ["intruder-0"], "{intruder:#?}");
    let everything =
        format!("{}\n{}", op.logs(), serde_json::to_string(&monitors.get("crm-db").await.unwrap()).unwrap());
    for leak in [SECRET, "intr-Pw-3", db.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
}

/// Containment on MariaDB too (issue 18: "detected and contained automatically on the real databases"). A team's
/// MariaDB credential issued through Vault's mysql plugin (as `a_mysql_connection_gets_mysql_grants_...` issues one)
/// reads the invoices in bulk from a pod of its own. Expected from the response's documentation (Response,
/// Incident, the README): the incident holds the team's credentials (the MariaDB login is refused afterwards, the
/// user dropped by Vault), isolates the pod the reads came from (the audit event's host), and nothing of the data
/// or any password appears in the operator's log or the monitor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exfiltration_on_mariadb_is_contained() {
    use k8s_openapi::api::core::v1::Pod;
    let cluster = Cluster::start("monitor-mariadb-respond").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let db = MariaDb::audited_to_stderr();
    let rows: Vec<String> = (1..=20).map(|i| format!("({i}, '{SECRET}')")).collect();
    db.sql(
        "",
        &format!(
            "CREATE DATABASE crm; CREATE TABLE crm.invoices (id int PRIMARY KEY, customer text);
             INSERT INTO crm.invoices VALUES {};",
            rows.join(", ")
        ),
    );
    let bao = OpenBao::shared();
    let mount = format!("dbm-respond-{}", std::process::id());
    bao.mysql_connection(&mount, &db);
    let (_node, op) = mariadb_pod_and_operator(&cluster, &db, Some(bao)).await;
    let aps: Api<AccessPolicy> = Api::namespaced(client.clone(), &ns);
    let ap: AccessPolicy = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessPolicy",
        "metadata": {"name": "crm-access", "namespace": ns},
        "spec": {"vault": {"databaseMount": mount}, "acceptHoldsFrom": ["crm-db"], "teams": [{
            "name": "sales", "subjects": [{"kind": "Group", "name": "sales"}],
            "database": {"connection": "crm", "grants": [{"schema": "crm", "tables": ["invoices"], "privileges": ["SELECT"]}]},
            "credentials": {"secretName": "sales-mysql"},
        }]},
    }))
    .unwrap();
    aps.create(&PostParams::default(), &ap).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let (user, pass) = eventually(90, "the sales team's MariaDB credential", || async {
        let s = secrets.get_opt("sales-mysql").await.map_err(|e| e.to_string())?.ok_or("no Secret")?;
        let d = s.data.unwrap_or_default();
        let get = |k: &str| String::from_utf8(d.get(k).map(|b| b.0.clone()).unwrap_or_default()).unwrap();
        if get("username").is_empty() { Err(tail(&op.logs())) } else { Ok((get("username"), get("password"))) }
    })
    .await;
    // The pod the credential is used from, behind a guard that accepts the monitor's quarantine requests.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    crm_pod(&client, &ns, "report-job-0", None, Some("127.0.0.9")).await;
    quarantine_guard(&client, &ns).await;
    let monitors: Api<AccessMonitor> = Api::namespaced(client.clone(), &ns);
    let monitor: AccessMonitor = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
        "metadata": {"name": "crm-db", "namespace": ns},
        "spec": {
            "database": {"engine": "mysql", "podSelector": {"matchLabels": {"app": "crm-mariadb"}}},
            "accessPolicies": ["crm-access"],
            "identities": [{"user": db.user, "name": "dba"}],
            "interval": "1s",
            "rules": {"readVolume": [{"tables": ["crm.invoices"], "maxPerMinute": 5}]},
            "response": {"triggers": ["ReadVolume"], "revokeCredentials": true, "quarantineThrough": "crm-firewall"},
        },
    }))
    .unwrap();
    monitors.create(&PostParams::default(), &monitor).await.unwrap();
    monitor_until(&monitors, &op, "the monitor reading", |s| {
        s.conditions.iter().any(|c| c.type_ == "Collecting" && c.reason == "Reading")
    })
    .await;
    // The bulk read (the response may cut it short).
    let mut read = 0;
    while read < 12 && db.try_sql_from("127.0.0.9", "crm", &user, &pass, "SELECT * FROM invoices").is_ok() {
        read += 1;
    }
    assert!(read > 5, "{read} reads");
    let contained = monitor_until(&monitors, &op, "the incident carried out", |s| {
        s.incidents.iter().any(|i| !i.pending && i.actions.iter().any(|a| a.starts_with("credentials held")))
    })
    .await;
    let incident = &contained.incidents[0];
    isolates_only(incident, "report-job-0");
    let refused = eventually(60, "the held credential refused by MariaDB", || async {
        match db.try_sql_as("crm", &user, &pass, "SELECT 1") {
            Err(e) => Ok(e),
            Ok(_) => Err("still logs in".to_string()),
        }
    })
    .await;
    assert!(refused.contains("Access denied"), "{refused}");
    isolated(&pods, "report-job-0").await;
    let everything =
        format!("{}\n{}", op.logs(), serde_json::to_string(&monitors.get("crm-db").await.unwrap()).unwrap());
    for leak in [SECRET, pass.as_str(), db.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
}

/// Rows read on MariaDB (DatabaseStatistics' documentation): performance_schema counts rows per statement and per
/// user, so a user's rows of a table are at most the lesser of the table's and the user's, counted for the users the
/// audit log places at the table. Expected: a server without performance_schema is `StatisticsUnreadable` naming
/// it; with `sslMode: verify-full`, another CA and a name the certificate is not for are refused
/// (`DatabaseUnreachable`), the right CA and address sample (the monitoring user may log in only over TLS); the
/// application reading single invoices while it reads the whole product catalogue is no finding (the invoices' own
/// rows bound it); an analyst reading the invoices in bulk is a `RowVolume` finding, the idle application none; no
/// value and no password in the operator's log, the monitor or the Events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_read_on_mariadb_is_counted_from_performance_schema() {
    let cluster = Cluster::start("monitor-mariadb-rows").await;
    let (client, ns) = (cluster.client.clone(), cluster.namespace.clone());
    let (mut options, ca, _tls) = MariaDb::tls_files();
    let (_, other_ca, _other_tls) = MariaDb::tls_files();
    options.push("--performance-schema=ON".into());
    let db = MariaDb::audited_to_stderr_with(&options);
    let off = MariaDb::shared();
    off.sql(
        "",
        "CREATE USER IF NOT EXISTS 'crm_monitor'@'%' IDENTIFIED BY 'monitor-Pw-1';
         GRANT SELECT ON performance_schema.* TO 'crm_monitor'@'%';",
    );
    let rows = |n: usize, text: &str| (1..=n).map(|i| format!("({i}, '{text}')")).collect::<Vec<_>>().join(", ");
    db.sql(
        "",
        &format!(
            "CREATE DATABASE crm; CREATE TABLE crm.invoices (id int, customer text);
             CREATE TABLE crm.products (id int, name text);
             INSERT INTO crm.invoices VALUES {}; INSERT INTO crm.products VALUES {};
             CREATE USER 'analyst'@'%' IDENTIFIED BY 'anal-Pw-4'; GRANT SELECT ON crm.* TO 'analyst'@'%';
             CREATE USER 'crm_monitor'@'%' IDENTIFIED BY 'monitor-Pw-1' REQUIRE SSL;
             GRANT SELECT ON performance_schema.* TO 'crm_monitor'@'%';",
            rows(100, SECRET),
            rows(500, "widget"),
        ),
    );
    let (_node, op) = mariadb_pod_and_operator(&cluster, &db, None).await;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = |port: u16, host: &str, ca: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "crm-db-monitor"},
            "stringData": {"host": host, "port": port.to_string(), "username": "crm_monitor",
                           "password": "monitor-Pw-1", "ca.crt": ca},
        }))
        .unwrap()
    };
    let replace = |s: Secret| {
        let secrets = secrets.clone();
        async move {
            let mut s = s;
            s.metadata.resource_version = secrets.get("crm-db-monitor").await.unwrap().metadata.resource_version;
            secrets.replace("crm-db-monitor", &PostParams::default(), &s).await.unwrap();
        }
    };
    secrets.create(&PostParams::default(), &secret(off.port, "127.0.0.1", "")).await.unwrap();
    let monitors: Api<AccessMonitor> = Api::namespaced(client.clone(), &ns);
    let monitor: AccessMonitor = serde_json::from_value(json!({
        "apiVersion": "crmguard.io/v1alpha1", "kind": "AccessMonitor",
        "metadata": {"name": "crm-db", "namespace": ns},
        "spec": {
            "database": {"engine": "mysql", "podSelector": {"matchLabels": {"app": "crm-mariadb"}},
                         "statistics": {"secretName": "crm-db-monitor", "sslMode": "disable"}},
            "identities": [{"user": db.user, "name": "crm-web", "tables": ["crm.invoices", "crm.products"]},
                           {"user": "analyst", "name": "reporting", "tables": ["crm.invoices"]}],
            "interval": "1s",
            "rules": {"rowVolume": [{"tables": ["crm.invoices"], "maxRowsPerMinute": 100}]},
        },
    }))
    .unwrap();
    monitors.create(&PostParams::default(), &monitor).await.unwrap();
    let until = |what: &'static str, ok: Box<dyn Fn(&AccessMonitorStatus) -> bool + Send + Sync>| {
        monitor_until(&monitors, &op, what, ok)
    };
    let rows_counted =
        |reason: &'static str, text: &'static str| -> Box<dyn Fn(&AccessMonitorStatus) -> bool + Send + Sync> {
            Box::new(move |s: &AccessMonitorStatus| {
                s.conditions.iter().any(|c| c.type_ == "RowsCounted" && c.reason == reason && c.message.contains(text))
            })
        };
    until("performance_schema OFF said", rows_counted("StatisticsUnreadable", "performance_schema is OFF")).await;

    replace(secret(db.port, "127.0.0.1", &other_ca)).await;
    let verify =
        json!({"spec": {"database": {"statistics": {"secretName": "crm-db-monitor", "sslMode": "verify-full"}}}});
    monitors.patch("crm-db", &PatchParams::default(), &Patch::Merge(&verify)).await.unwrap();
    until("another CA's certificate refused", rows_counted("DatabaseUnreachable", "certificate")).await;
    replace(secret(db.port, "localhost", &ca)).await;
    until("a name the certificate is not for refused", rows_counted("DatabaseUnreachable", "not valid for name")).await;
    replace(secret(db.port, "127.0.0.1", &ca)).await;
    until("the sample over TLS", rows_counted("Sampling", "performance_schema")).await;

    // The application's normal work: single invoices, and the whole catalogue (1,500 rows) three times.
    for id in 1..=5 {
        db.try_sql("crm", &format!("SELECT * FROM invoices WHERE id = {id}")).unwrap();
    }
    for _ in 0..3 {
        db.try_sql("crm", "SELECT * FROM products").unwrap();
    }
    // A pass that read the log past this moment sampled after it (a pass reads the log, then samples): the
    // application's rows are counted by then. The monitoring role's own entries come at every pass.
    let done = jiff::Timestamp::now();
    until(
        "a pass after the application's reads",
        Box::new(move |s: &AccessMonitorStatus| {
            s.read_until.as_deref().and_then(|t| t.parse::<jiff::Timestamp>().ok()).is_some_and(|t| t > done)
        }),
    )
    .await;
    let normal = monitors.get("crm-db").await.unwrap().status.unwrap_or_default();
    assert_eq!(normal.findings, vec![], "the application's normal work is no finding");

    // The analyst takes the invoices, whole, three times (300 rows): whichever minute boundary falls among them, one
    // minute holds at least 200.
    for _ in 0..3 {
        db.try_sql_as("crm", "analyst", "anal-Pw-4", "SELECT * FROM invoices").unwrap();
    }
    let flagged = until(
        "the RowVolume finding",
        Box::new(|s: &AccessMonitorStatus| s.findings.iter().any(|f| f.rule == FindingRule::RowVolume)),
    )
    .await;
    let got: Vec<(&str, Option<&str>)> =
        flagged.findings.iter().map(|f| (f.user.as_str(), f.object.as_deref())).collect();
    assert_eq!(got, vec![("analyst", Some("crm.invoices"))], "{:#?}", flagged.findings);
    let f = &flagged.findings[0];
    assert_eq!(f.rule, FindingRule::RowVolume);
    let n: u64 = f.message.split(' ').next().unwrap().parse().unwrap();
    assert!((101..=300).contains(&n), "{}", f.message);
    assert!(
        f.message.contains("read within a minute by reporting") && f.message.contains("performance_schema"),
        "{}",
        f.message
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let events = serde_json::to_string(&events.list(&ListParams::default()).await.unwrap().items).unwrap();
    let everything =
        format!("{}\n{}\n{events}", op.logs(), serde_json::to_string(&monitors.get("crm-db").await.unwrap()).unwrap());
    for leak in [SECRET, "anal-Pw-4", "monitor-Pw-1", db.password.as_str()] {
        assert!(!everything.contains(leak), "{leak:?} leaked");
    }
}

/// A database container that restarts (an OOM kill) leaves the lines the monitor had not read yet in the previous
/// container's log, which the kubelet keeps (`kubectl logs --previous`); expected from the AccessMonitor's status
/// documentation (`restartCount`): they are read, before the new container's. Here the operator is down meanwhile (so
/// nothing of it in memory helps): a statement of a role nobody issued, then the restart, then the DBA's own
/// statement; started again, the monitor reports the unknown identity and records the new restart count. A second
/// time two restarts while it is down: the container in between is gone, and a `LinesSkipped` Event says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_containers_log_is_read_after_a_database_restart() {
    let mut m = Monitored::start("monitor-restart").await;
    m.monitor(json!({}), None).await;
    m.until("the restart count recorded", |s| s.restart_count == Some(0)).await;
    m.stop_operator();
    m.pg.try_sql_as("crm", "mallory", "mallory-Pw-1", "SELECT * FROM contacts").unwrap();
    // In the container's log (as the node serves it) before it restarts.
    eventually(30, "mallory's entry in the container's log", || async {
        if m.node.holds(&m.ns, "crm-db-0", "postgres", "mallory@crm LOG:  AUDIT") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    m.node.restart(&m.client, &m.ns, "crm-db-0", "postgres").await;
    m.pg.sql("crm", "SELECT count(*) FROM invoices");
    m.start_operator().await;
    let found = m
        .until("mallory's read from the previous container's log", |s| {
            s.findings.iter().any(|f| f.rule == FindingRule::UnknownIdentity && f.user == "mallory")
        })
        .await;
    let f = found.findings.iter().find(|f| f.user == "mallory").unwrap();
    assert_eq!(f.object.as_deref(), Some("public.contacts"));
    m.until("the new restart count", |s| s.restart_count == Some(1)).await;

    // Twice while the operator is down: the first new container's log is gone.
    m.stop_operator();
    m.node.restart(&m.client, &m.ns, "crm-db-0", "postgres").await;
    m.node.restart(&m.client, &m.ns, "crm-db-0", "postgres").await;
    m.start_operator().await;
    m.until("the restart count after two restarts", |s| s.restart_count == Some(3)).await;
    let notes = m.notes("LinesSkipped", 1).await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("restarted 2 time(s)") && n.contains("the logs of 1 container(s) between are gone")),
        "{notes:?}"
    );
}

/// A StatefulSet's database pod deleted and created again under its name (a node drained, a rollout) is another pod
/// with another log: what the old one wrote after the last read went with it. Expected from the AccessMonitor's status
/// documentation (`podUID`) and the kubelet's (a pod's logs are deleted with it): the monitor says so with a
/// `LinesSkipped` Event naming the pod, records the new UID, and reads the new pod's log from the start (no restart
/// count carried over). Here the operator is down meanwhile: mallory's read before the replacement is lost (and said
/// to be), the one after it is a finding. Failed before: the same name was taken for the same log, nothing was said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_pod_replaced_under_its_name_is_said_to_have_lost_its_unread_lines() {
    let mut m = Monitored::start("monitor-replaced").await;
    m.monitor(json!({}), None).await;
    let first = m.until("the pod's UID recorded", |s| s.pod_uid.is_some()).await;
    m.stop_operator();
    m.pg.try_sql_as("crm", "mallory", "mallory-Pw-1", "SELECT * FROM contacts").unwrap();
    eventually(30, "mallory's entry in the old pod's log", || async {
        if m.node.holds(&m.ns, "crm-db-0", "postgres", "mallory@crm LOG:  AUDIT") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    m.node.replace(&m.client, &m.ns, "crm-db-0", "postgres").await;
    let replaced_at = jiff::Timestamp::now();
    // A finding's time is in whole seconds: the read after the replacement is in a later second than the one before.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    m.pg.try_sql_as("crm", "mallory", "mallory-Pw-1", "SELECT email FROM contacts").unwrap();
    m.start_operator().await;
    let s = m
        .until("mallory's read from the new pod's log", |s| {
            s.findings.iter().any(|f| f.rule == FindingRule::UnknownIdentity && f.user == "mallory")
        })
        .await;
    assert_ne!(s.pod_uid, first.pod_uid, "the new pod's UID is recorded");
    assert_eq!(s.pod.as_deref(), Some("crm-db-0"));
    let mallory: Vec<_> = s.findings.iter().filter(|f| f.user == "mallory").collect();
    assert_eq!(mallory.len(), 1, "only the read after the replacement was in a log: {mallory:?}");
    assert!(mallory[0].at.0.as_second() > replaced_at.as_second(), "{mallory:?} is the read after the replacement");
    let notes = m.notes("LinesSkipped", 1).await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("pod crm-db-0 was replaced by a new pod of the same name")
                && n.contains("were not read")),
        "{notes:?}"
    );
    assert_eq!(s.restart_count, Some(0), "the new pod's container has not restarted");
}
