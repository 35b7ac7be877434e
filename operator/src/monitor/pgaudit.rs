//! pgaudit's audit entries, read from PostgreSQL's log (pgaudit's "Format": `AUDIT: <AUDIT_TYPE>,<STATEMENT_ID>,
//! <SUBSTATEMENT_ID>,<CLASS>,<COMMAND>,<OBJECT_TYPE>,<OBJECT_NAME>,<STATEMENT>,<PARAMETER>`, CSV after the log line
//! prefix). Who ran the statement comes from the prefix, which the database must be configured with:
//! `log_line_prefix = '%m [%p] %q%u@%d '` (time, process, user@database), with `shared_preload_libraries =
//! 'pgaudit'` and `CREATE EXTENSION pgaudit` in the database (without the extension, DDL entries carry no object
//! name). The statement is kept only redacted ([`super::redact`]) and the parameters never: no customer data leaves
//! the database through this. (Seen on PostgreSQL 15 with pgaudit 1.7: every statement of a multi-statement query
//! carries the whole query text, and pgaudit hides a password only in the entry of its own statement; the redaction
//! removes it from the others.)

use super::redact::{Dialect, redact};

/// The log line prefix crmguard reads (`log_line_prefix` in postgresql.conf).
pub const LOG_LINE_PREFIX: &str = "%m [%p] %q%u@%d ";

/// pgaudit's statement classes (`pgaudit.log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Read,
    Write,
    Function,
    Role,
    Ddl,
    Misc,
    MiscSet,
}

impl Class {
    fn parse(s: &str) -> Option<Class> {
        Some(match s {
            "READ" => Class::Read,
            "WRITE" => Class::Write,
            "FUNCTION" => Class::Function,
            "ROLE" => Class::Role,
            "DDL" => Class::Ddl,
            "MISC" => Class::Misc,
            "MISC_SET" => Class::MiscSet,
            _ => return None,
        })
    }
}

/// One audit entry, without the statement's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The prefix's time as PostgreSQL wrote it (`%m`, e.g. `2026-12-03 07:00:00.123 UTC`).
    pub at: String,
    /// The server process (`%p`): one per session.
    pub pid: u64,
    /// The database user (`%u`) and database (`%d`).
    pub user: String,
    pub database: String,
    /// `SESSION` or `OBJECT` audit.
    pub object_audit: bool,
    pub statement_id: u64,
    pub substatement_id: u64,
    pub class: Class,
    /// e.g. `SELECT`, `ALTER TABLE`.
    pub command: String,
    /// e.g. `TABLE` (empty when pgaudit has none).
    pub object_type: String,
    /// Fully qualified, e.g. `crm.invoices` (empty when pgaudit has none).
    pub object_name: String,
    /// The statement with its literal values replaced by `?`.
    pub statement: String,
}

/// The records of PostgreSQL's stderr log: a record starts with the prefix's time (`%m`, `YYYY-MM-DD `), and a
/// statement that spans lines goes on in the lines that follow it, each behind a tab.
pub fn records(log: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines() {
        match out.last_mut() {
            Some(r) if !starts_record(line) => {
                r.push('\n');
                r.push_str(line.strip_prefix('\t').unwrap_or(line));
            }
            _ => out.push(line.to_string()),
        }
    }
    out
}

/// Whether a line starts a record: the prefix's time (`%m`, `YYYY-MM-DD `).
pub fn starts_record(l: &str) -> bool {
    let b = l.as_bytes();
    b.len() > 11
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'-'
        && b[8..10].iter().all(u8::is_ascii_digit)
        && b[10] == b' '
}

/// Reads one audit entry from a log record (a record may span several lines when the statement does). `None`
/// for records that are not pgaudit entries or do not carry the expected prefix.
pub fn parse(record: &str) -> Option<Entry> {
    // `<time> [<pid>] <user>@<db> <LEVEL>:  AUDIT: <fields>`
    let p = prefixed(record)?;
    let (at, user, database) = (p.at, p.user, p.database);
    let rest = p.message.strip_prefix("AUDIT: ")?;
    let fields = csv_fields(rest.trim_end_matches(['\n', '\r']));
    if !(8..=9).contains(&fields.len()) {
        return None;
    }
    let object_audit = match fields[0].as_str() {
        "SESSION" => false,
        "OBJECT" => true,
        _ => return None,
    };
    Some(Entry {
        at: at.to_string(),
        pid: p.pid,
        user: user.to_string(),
        database: database.to_string(),
        object_audit,
        statement_id: fields[1].parse().ok()?,
        substatement_id: fields[2].parse().ok()?,
        class: Class::parse(&fields[3])?,
        command: fields[4].clone(),
        object_type: fields[5].clone(),
        object_name: fields[6].clone(),
        statement: redact(&fields[7], Dialect::Postgres),
    })
}

/// A log record behind the prefix: `<time> [<pid>] <user>@<db> <LEVEL>:  <message>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefixed<'a> {
    pub at: &'a str,
    /// The server process (`%p`).
    pub pid: u64,
    pub user: &'a str,
    pub database: &'a str,
    /// `LOG`, `ERROR`, `FATAL`, ...
    pub level: &'a str,
    pub message: &'a str,
}

/// Splits a record into its prefix's fields and its message; `None` without the expected prefix.
pub fn prefixed(record: &str) -> Option<Prefixed<'_>> {
    let (at, rest) = record.split_once(" [")?;
    let (pid, rest) = rest.split_once("] ")?;
    let pid = pid.parse().ok()?;
    let (who, rest) = rest.split_once(' ')?;
    let (level, message) = rest.split_once(":  ")?;
    let (user, database) = who.rsplit_once('@')?;
    if level.is_empty() || !level.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) {
        return None;
    }
    Some(Prefixed { at, pid, user, database, level, message })
}

/// The fields of one CSV record: separated by commas, a field in double quotes may hold commas, newlines and doubled
/// quotes.
fn csv_fields(s: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', false) if field.is_empty() => quoted = true,
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', true) => quoted = false,
            (',', false) => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFIX: &str = "2026-12-03 07:00:00.123 UTC [4711] v-kubernet-crm-acce-sales-x1@crm LOG:  ";

    /// Entries as pgaudit's documentation shows them (its README's examples), behind the prefix above.
    #[test]
    fn reads_who_what_and_which_object_and_keeps_no_value() {
        let e = parse(&format!(
            "{PREFIX}AUDIT: SESSION,2,1,READ,SELECT,TABLE,crm.invoices,\"SELECT * FROM crm.invoices WHERE \
             customer = 'ACME, Inc.' AND amount > 1000\",<not logged>"
        ))
        .expect("an entry");
        assert_eq!(
            e,
            Entry {
                at: "2026-12-03 07:00:00.123 UTC".into(),
                pid: 4711,
                user: "v-kubernet-crm-acce-sales-x1".into(),
                database: "crm".into(),
                object_audit: false,
                statement_id: 2,
                substatement_id: 1,
                class: Class::Read,
                command: "SELECT".into(),
                object_type: "TABLE".into(),
                object_name: "crm.invoices".into(),
                statement: "SELECT * FROM crm.invoices WHERE customer = ? AND amount > ?".into(),
            }
        );
        // The example of pgaudit's README: a DO block (no object) and the DDL it ran.
        let block = parse(&format!(
            "{PREFIX}AUDIT: SESSION,33,1,FUNCTION,DO,,,\"DO $$\nBEGIN\n    EXECUTE 'CREATE TABLE import' || \
             'ant_table (id INT)';\nEND $$;\",<not logged>"
        ))
        .expect("an entry");
        assert_eq!((block.class, block.command.as_str(), block.object_name.as_str()), (Class::Function, "DO", ""));
        assert_eq!(block.statement, "DO ?;");
        let ddl = parse(&format!(
            "{PREFIX}AUDIT: SESSION,33,2,DDL,CREATE TABLE,TABLE,public.important_table,CREATE TABLE important_table \
             (id INT),<not logged>"
        ))
        .expect("an entry");
        assert_eq!((ddl.class, ddl.object_name.as_str()), (Class::Ddl, "public.important_table"));
        assert_eq!(ddl.statement, "CREATE TABLE important_table (id INT)");
    }

    #[test]
    fn parameters_are_never_kept_and_other_lines_are_not_entries() {
        let e = parse(&format!(
            "{PREFIX}AUDIT: OBJECT,5,1,WRITE,UPDATE,TABLE,crm.contacts,\"UPDATE crm.contacts SET email = $1 WHERE id \
             = $2\",\"jane@example.com,17\""
        ))
        .expect("an entry");
        assert!(e.object_audit);
        assert!(!format!("{e:?}").contains("jane@example.com"), "{e:?}");
        assert_eq!(e.statement, "UPDATE crm.contacts SET email = $1 WHERE id = $2");
        for other in [
            "2026-12-03 07:00:00.123 UTC [4711] app@crm LOG:  connection authorized: user=app database=crm",
            "2026-12-03 07:00:00.123 UTC [4711] app@crm LOG:  AUDIT: SESSION,1,1,NOPE,SELECT,,,SELECT 1,<none>",
            "AUDIT: SESSION,1,1,READ,SELECT,,,SELECT 1,<none>",
        ] {
            assert_eq!(parse(other), None, "{other}");
        }
    }
}
