//! MariaDB's audit plugin (`server_audit`), read from its own log file (the plugin's "Log Format": `<timestamp>,
//! <serverhost>,<username>,<host>,<connectionid>,<queryid>,<operation>,<database>,<object>,<retcode>`). The database
//! must load it with `plugin_load_add = server_audit`, `server_audit_logging = ON` and
//! `server_audit_events = CONNECT,QUERY,TABLE`. A query's text is kept only redacted ([`super::redact`]).

use super::redact::{Dialect, redact};

/// One audit event, without the query's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// As the plugin wrote it (`YYYYMMDD HH:MM:SS`, the server's local time).
    pub at: String,
    pub user: String,
    /// Where the client connected from.
    pub host: String,
    pub connection_id: u64,
    pub query_id: u64,
    /// `CONNECT`, `FAILED_CONNECT`, `DISCONNECT`, `QUERY`, or a table operation: `READ`, `WRITE`, `CREATE`, `ALTER`,
    /// `RENAME`, `DROP`.
    pub operation: String,
    pub database: String,
    /// The table of a table operation; the redacted query of `QUERY`.
    pub object: String,
    /// The server's error code (0: success); none on table events.
    pub retcode: Option<i64>,
}

/// Reads one line of the plugin's log; `None` for a line that is not an event.
pub fn parse(line: &str) -> Option<Event> {
    let line = line.trim_end_matches(['\n', '\r']);
    let mut head = line.splitn(9, ',');
    let mut next = || head.next().map(str::to_string);
    let (at, _server, user, host) = (next()?, next()?, next()?, next()?);
    let (connection_id, query_id) = (next()?.parse().ok()?, next()?.parse().ok()?);
    let (operation, database, rest) = (next()?, next()?, next()?);
    // The object may hold commas (a query); the return code is the last field.
    let (object, retcode) = rest.rsplit_once(',')?;
    let object = match operation.as_str() {
        "QUERY" => redact(&unquote(object), Dialect::MySql),
        _ => object.to_string(),
    };
    let retcode = if retcode.is_empty() { None } else { Some(retcode.parse().ok()?) };
    Some(Event { at, user, host, connection_id, query_id, operation, database, object, retcode })
}

/// A query as the plugin quotes it: in single quotes, with `\` before quotes and backslashes inside.
fn unquote(s: &str) -> String {
    let inner = s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')).unwrap_or(s);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                Some(x) => out.push(x),
                None => {}
            },
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines in the format of the plugin's documentation ("Audit Plugin Log Format").
    #[test]
    fn reads_connections_queries_and_tables_and_keeps_no_value() {
        let q = parse(
            "20261203 08:00:01,db-0,sales,10.0.0.7,12,34,QUERY,crm,'SELECT * FROM invoices WHERE customer = \\'ACME, \
             Inc.\\' AND amount > 1000',0",
        )
        .expect("an event");
        assert_eq!(
            q,
            Event {
                at: "20261203 08:00:01".into(),
                user: "sales".into(),
                host: "10.0.0.7".into(),
                connection_id: 12,
                query_id: 34,
                operation: "QUERY".into(),
                database: "crm".into(),
                object: "SELECT * FROM invoices WHERE customer = ? AND amount > ?".into(),
                retcode: Some(0),
            }
        );
        let t = parse("20261203 08:00:01,db-0,sales,10.0.0.7,12,34,READ,crm,invoices,").expect("a table event");
        assert_eq!((t.operation.as_str(), t.object.as_str(), t.retcode), ("READ", "invoices", None));
        let failed = parse("20261203 08:00:02,db-0,sales,10.0.0.7,13,0,FAILED_CONNECT,,,1045").expect("an event");
        assert_eq!((failed.operation.as_str(), failed.retcode), ("FAILED_CONNECT", Some(1045)));
        assert_eq!(parse("not an audit line"), None);
    }
}
