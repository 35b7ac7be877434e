//! A database pod's log as the API serves it with `timestamps=true` (each line behind the kubelet's RFC 3339 time
//! and a space) turned into accesses: when, which database user, what kind of statement, on which table. The
//! kubelet's time orders and positions the lines (reading resumes after the last one read); the database's own
//! time is not used.

use jiff::Timestamp;

use super::sessions::{Client, Connection, Sessions, UNKNOWN};
use super::{pgaudit, server_audit};

/// What kind of access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// A read of a table (SELECT, COPY TO).
    Read,
    /// A change of a table's rows (INSERT, UPDATE, DELETE, TRUNCATE, COPY FROM).
    Write,
    /// A change of the schema (CREATE, ALTER, DROP, ...).
    Ddl,
    /// A change of roles or privileges (GRANT, REVOKE, CREATE ROLE, ...).
    Role,
    /// A statement the database refused for want of a privilege.
    Denied,
    /// A login that failed (wrong password, unknown user).
    LoginFailed,
    /// Anything else the audit log records (functions, `SET`, ...).
    Other,
}

impl Kind {
    /// As access records and the CLI name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Ddl => "ddl",
            Kind::Role => "role",
            Kind::Denied => "denied",
            Kind::LoginFailed => "login-failed",
            Kind::Other => "other",
        }
    }
}

/// One access, without any value of the statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The kubelet's time of the log line.
    pub at: Timestamp,
    pub user: String,
    pub kind: Kind,
    /// e.g. `SELECT`, `ALTER TABLE`, `INSERT`.
    pub command: String,
    /// `schema.table` (`database.table` on MariaDB), when the entry names one.
    pub object: Option<String>,
    /// Where it came from, as far as known.
    pub client: Client,
}

/// The lines of a log served with `timestamps=true`: (kubelet time, line). A line without a readable time is
/// skipped.
pub fn timed(log: &str) -> Vec<(Timestamp, &str)> {
    log.lines()
        .filter_map(|l| {
            let (t, rest) = l.split_once(' ').unwrap_or((l, ""));
            Some((t.parse().ok()?, rest))
        })
        .collect()
}

/// The accesses in PostgreSQL's log lines (pgaudit entries, refused statements, failed logins), read behind the
/// log line prefix [`pgaudit::LOG_LINE_PREFIX`]. A record that spans lines is timed by its first line. The log's
/// connection lines (`log_connections`) go into `sessions`, whose client addresses the accesses take.
pub fn postgres(lines: &[(Timestamp, &str)], sessions: &mut Sessions) -> Vec<Access> {
    let mut records: Vec<(Timestamp, String)> = Vec::new();
    for (at, line) in lines {
        match records.last_mut() {
            Some((_, r)) if !pgaudit::starts_record(line) => {
                r.push('\n');
                r.push_str(line.strip_prefix('\t').unwrap_or(line));
            }
            _ => records.push((*at, (*line).to_string())),
        }
    }
    records.iter().filter_map(|(at, r)| postgres_record(*at, r, sessions)).collect()
}

fn postgres_record(at: Timestamp, record: &str, sessions: &mut Sessions) -> Option<Access> {
    let client = |pid: u64, user: &str, sessions: &mut Sessions| Client {
        session: Some(pid),
        address: sessions.address(pid, user, at),
        pod: None,
        account: None,
    };
    if let Some(e) = pgaudit::parse(record) {
        let kind = match e.class {
            pgaudit::Class::Read => Kind::Read,
            pgaudit::Class::Write => Kind::Write,
            pgaudit::Class::Ddl => Kind::Ddl,
            pgaudit::Class::Role => Kind::Role,
            _ => Kind::Other,
        };
        let object = (!e.object_name.is_empty()).then_some(e.object_name);
        let client = client(e.pid, &e.user, sessions);
        return Some(Access { at, user: e.user, kind, command: e.command, object, client });
    }
    let p = pgaudit::prefixed(record)?;
    if p.level == "LOG" {
        // Only as PostgreSQL writes them: the connection before the login (`[unknown]@[unknown]`), the login behind
        // its own user (any session can log a message of its choosing behind its own prefix).
        match Connection::parse(p.message)? {
            Connection::Received { host } if p.user == UNKNOWN && p.database == UNKNOWN => {
                sessions.connected(p.pid, host, at)
            }
            Connection::Authorized { user } if user == p.user => sessions.authorized(p.pid, user, at),
            _ => {}
        }
        return None;
    }
    // PostgreSQL's messages (src/backend/libpq/auth.c, aclchk.c): `password authentication failed for user "x"`,
    // `permission denied for table t` (also view, sequence, schema, function).
    if p.level == "FATAL" {
        let rest = p.message.strip_prefix("password authentication failed for user \"")?;
        let user = rest.split_once('"')?.0;
        let client = client(p.pid, user, sessions);
        return Some(Access {
            at,
            user: user.into(),
            kind: Kind::LoginFailed,
            command: "LOGIN".into(),
            object: None,
            client,
        });
    }
    if p.level == "ERROR" {
        let rest = p.message.strip_prefix("permission denied for ")?;
        let (what, name) = rest.split_once(' ')?;
        let name = name.lines().next().unwrap_or_default().trim();
        return Some(Access {
            at,
            user: p.user.into(),
            kind: Kind::Denied,
            command: what.to_uppercase(),
            object: Some(name.into()),
            client: client(p.pid, p.user, sessions),
        });
    }
    None
}

/// The accesses in MariaDB's audit plugin lines: table reads and writes and DDL (`TABLE` events), failed logins
/// (`FAILED_CONNECT`), and queries the server refused for want of a privilege (error 1142, 1143, 1044).
pub fn mariadb(lines: &[(Timestamp, &str)]) -> Vec<Access> {
    lines
        .iter()
        .filter_map(|(at, line)| {
            let e = server_audit::parse(line)?;
            let table = || Some(format!("{}.{}", e.database, e.object));
            let (kind, object) = match e.operation.as_str() {
                "READ" => (Kind::Read, table()),
                "WRITE" => (Kind::Write, table()),
                "CREATE" | "ALTER" | "RENAME" | "DROP" => (Kind::Ddl, table()),
                "FAILED_CONNECT" => (Kind::LoginFailed, None),
                // ER_TABLEACCESS_DENIED_ERROR, ER_COLUMNACCESS_DENIED_ERROR, ER_DBACCESS_DENIED_ERROR
                "QUERY" if matches!(e.retcode, Some(1142 | 1143 | 1044)) => {
                    (Kind::Denied, (!e.database.is_empty()).then(|| e.database.clone()))
                }
                _ => return None,
            };
            let command = if kind == Kind::Denied { "QUERY".to_string() } else { e.operation.clone() };
            let client =
                Client { session: Some(e.connection_id), address: Some(e.host.clone()), pod: None, account: None };
            Some(Access { at: *at, user: e.user.clone(), kind, command, object, client })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Lines as `kubectl logs --timestamps` shows them, the messages as PostgreSQL 15 and pgaudit write them (the
    /// connection lines with `log_connections` on); session 41 logs connection lines of its own making (`RAISE LOG`).
    #[test]
    fn postgres_entries_refusals_and_failed_logins_become_accesses() {
        let log = "\
2026-12-03T08:59:59.000000000Z 2026-12-03 08:59:59.000 UTC [41] [unknown]@[unknown] LOG:  connection received: host=10.244.1.7 port=51234
2026-12-03T08:59:59.100000000Z 2026-12-03 08:59:59.100 UTC [41] v-sales-1@crm LOG:  connection authorized: user=v-sales-1 database=crm application_name=psql
2026-12-03T09:00:00.100000000Z 2026-12-03 09:00:00.099 UTC [41] v-sales-1@crm LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,crm.invoices,\"SELECT *
2026-12-03T09:00:00.100000100Z \tFROM crm.invoices WHERE customer = 'ACME'\",<not logged>
2026-12-03T09:00:01.000000000Z 2026-12-03 09:00:01.000 UTC [41] v-sales-1@crm ERROR:  permission denied for table payroll
2026-12-03T09:00:01.000000100Z 2026-12-03 09:00:01.000 UTC [41] v-sales-1@crm STATEMENT:  SELECT * FROM crm.payroll WHERE salary > 100000
2026-12-03T09:00:01.200000000Z 2026-12-03 09:00:01.200 UTC [41] v-sales-1@crm LOG:  connection received: host=10.244.1.99 port=1
2026-12-03T09:00:01.300000000Z 2026-12-03 09:00:01.300 UTC [41] v-sales-1@crm LOG:  connection authorized: user=mallory database=crm
2026-12-03T09:00:01.500000000Z 2026-12-03 09:00:01.500 UTC [41] v-sales-1@crm LOG:  disconnection: session time: 0:00:02.500 user=v-sales-1 database=crm host=10.244.1.7 port=51234
2026-12-03T09:00:01.600000000Z 2026-12-03 09:00:01.600 UTC [45] [unknown]@[unknown] LOG:  connection received: host=10.244.1.8 port=5
2026-12-03T09:00:01.700000000Z 2026-12-03 09:00:01.700 UTC [45] crm_app@crm LOG:  connection authorized: user=crm_app database=crm
2026-12-03T09:00:01.800000000Z 2026-12-03 09:00:01.800 UTC [45] crm_app@crm LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,crm.contacts,SELECT 1 FROM crm.contacts,<not logged>
2026-12-03T09:00:02.000000000Z 2026-12-03 09:00:02.000 UTC [42] mallory@crm FATAL:  password authentication failed for user \"mallory\"
2026-12-03T09:00:02.000000100Z 2026-12-03 09:00:02.000 UTC [42] mallory@crm DETAIL:  Role \"mallory\" does not exist.
2026-12-03T09:00:03.000000000Z 2026-12-03 09:00:03.000 UTC [43] postgres@crm LOG:  AUDIT: SESSION,1,1,DDL,ALTER TABLE,TABLE,crm.invoices,ALTER TABLE crm.invoices ADD COLUMN note text DEFAULT 'x',<not logged>
2026-12-03T09:00:03.500000000Z 2026-12-03 09:00:03.500 UTC [41] v-sales-1@crm LOG:  AUDIT: SESSION,1,1,READ,SELECT,TABLE,crm.invoices,SELECT 1 FROM crm.invoices,<not logged>
2026-12-03T09:00:04.000000000Z 2026-12-03 09:00:04.000 UTC [44] LOG:  checkpoint starting: time
not a timed line
";
        let mut sessions = Sessions::default();
        let accesses = postgres(&timed(log), &mut sessions);
        let a = |at_: &str, user: &str, kind, command: &str, object: Option<&str>, pid: u64, address: Option<&str>| {
            let client = Client { session: Some(pid), address: address.map(Into::into), pod: None, account: None };
            Access {
                at: at(at_),
                user: user.into(),
                kind,
                command: command.into(),
                object: object.map(Into::into),
                client,
            }
        };
        let pod = Some("10.244.1.7");
        assert_eq!(
            accesses,
            vec![
                a("2026-12-03T09:00:00.1Z", "v-sales-1", Kind::Read, "SELECT", Some("crm.invoices"), 41, pod),
                a("2026-12-03T09:00:01Z", "v-sales-1", Kind::Denied, "TABLE", Some("payroll"), 41, pod),
                a(
                    "2026-12-03T09:00:01.8Z",
                    "crm_app",
                    Kind::Read,
                    "SELECT",
                    Some("crm.contacts"),
                    45,
                    Some("10.244.1.8")
                ),
                a("2026-12-03T09:00:02Z", "mallory", Kind::LoginFailed, "LOGIN", None, 42, None),
                a("2026-12-03T09:00:03Z", "postgres", Kind::Ddl, "ALTER TABLE", Some("crm.invoices"), 43, None),
                // The session's own (forged) connection, login and disconnection lines changed nothing.
                a("2026-12-03T09:00:03.5Z", "v-sales-1", Kind::Read, "SELECT", Some("crm.invoices"), 41, pod),
            ]
        );
        assert!(!format!("{accesses:?}").contains("ACME"));
    }

    /// Lines in the plugin's "Log Format".
    #[test]
    fn mariadb_table_events_refusals_and_failed_logins_become_accesses() {
        let log = "\
2026-12-03T09:00:00Z 20261203 09:00:00,db-0,sales,10.0.0.7,12,34,QUERY,crm,'SELECT * FROM invoices',0
2026-12-03T09:00:00.1Z 20261203 09:00:00,db-0,sales,10.0.0.7,12,34,READ,crm,invoices,
2026-12-03T09:00:01Z 20261203 09:00:01,db-0,sales,10.0.0.7,12,35,QUERY,crm,'SELECT * FROM payroll',1142
2026-12-03T09:00:02Z 20261203 09:00:02,db-0,mallory,10.0.0.9,13,0,FAILED_CONNECT,,,1045
2026-12-03T09:00:03Z 20261203 09:00:03,db-0,root,localhost,14,36,ALTER,crm,invoices,
";
        let got: Vec<(Kind, &str, Option<String>)> = mariadb(&timed(log))
            .into_iter()
            .map(|a| (a.kind, if a.user == "sales" { "sales" } else { "other" }, a.object))
            .collect();
        let clients: Vec<Option<String>> = mariadb(&timed(log)).into_iter().map(|a| a.client.address).collect();
        assert_eq!(clients, ["10.0.0.7", "10.0.0.7", "10.0.0.9", "localhost"].map(|c| Some(c.to_string())));
        assert_eq!(
            got,
            vec![
                (Kind::Read, "sales", Some("crm.invoices".into())),
                (Kind::Denied, "sales", Some("crm".into())),
                (Kind::LoginFailed, "other", None),
                (Kind::Ddl, "other", Some("crm.invoices".into())),
            ]
        );
    }
}
