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
